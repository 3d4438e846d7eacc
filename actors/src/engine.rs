//! The training state shared by the compute actors, and its conversion to and from
//! checkpoints.
//!
//! The state lives in one [`Engine`] (think of it as device memory): the Teacher actor
//! reads the EMA teacher, the Trainer mutates the student and optimizer, the EMA updater
//! moves the teacher. Steps are sequential, so the lock is never contended. A `dirty` flag
//! is set while a commit is being applied; if an actor dies with it set, the state is torn
//! and is reloaded from the last checkpoint, otherwise the uncommitted step is simply
//! redone (compute reads the state without changing it).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use checkpoints::{CheckpointPayload, LoadedCheckpoint, TensorBlob, TensorGroup};
use serde::{Deserialize, Serialize};

use crate::config::Plan;
use model::optim::Moments;
use model::params::ParamSet;
use model::ssl::SslModel;
use model::vit::Vit;
use model::TrainState;

/// The code version written into every checkpoint.
pub const CODE_VERSION: &str = concat!("dinod ", env!("CARGO_PKG_VERSION"));

/// Small, serialisable run state kept beside the tensors (in the manifest meta).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunMeta {
    /// Committed steps.
    pub step: u64,
    /// AdamW step count.
    pub optim_t: u64,
    /// Run seed.
    pub seed: u64,
    /// Data cursor after the last committed batch.
    pub data_cursor: serde_json::Value,
    /// Gram-teacher refreshes done.
    pub gram_updates: u32,
    /// Stage machine state (opaque to the engine).
    #[serde(default)]
    pub stage: serde_json::Value,
    /// Counters (bad steps, rollbacks, restarts...).
    #[serde(default)]
    pub counters: serde_json::Value,
    /// The model config the tensors belong to.
    pub model: model::SslConfig,
    /// Element type of the tensors.
    pub precision: crate::config::Precision,
}

/// The shared training state.
pub struct EngineState {
    /// Everything the step reads and writes.
    pub ts: TrainState,
    /// Set while a commit is being applied (torn state if an actor dies now).
    pub dirty: bool,
    /// Stage machine state, serialised (owned by the evaluator's logic).
    pub stage: serde_json::Value,
    /// Counters persisted with checkpoints.
    pub counters: serde_json::Value,
}

/// A handle to the shared state, and how many times it was replaced wholesale.
#[derive(Clone)]
pub struct Engine(Arc<Mutex<EngineState>>, Arc<AtomicU64>);

impl Engine {
    /// Wraps a state.
    pub fn new(st: EngineState) -> Self {
        Self(Arc::new(Mutex::new(st)), Arc::new(AtomicU64::new(0)))
    }

    /// Counts [`Engine::replace`] calls: a state with the same step, update count and
    /// Gram teacher as before may still hold other weights after a reload (the copies
    /// of a group of processes are sent again when this moves).
    pub fn generation(&self) -> u64 {
        self.1.load(Ordering::SeqCst)
    }

    /// Locks the state. A panic while it was held leaves it poisoned; the lock is still
    /// taken (the `dirty` flag says whether the state is usable).
    pub fn lock(&self) -> MutexGuard<'_, EngineState> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Replaces the whole state (after a reload).
    pub fn replace(&self, st: EngineState) {
        let mut g = self.lock();
        *g = st;
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

fn blobs_of(prefix: &str, ps: &ParamSet, out: &mut Vec<TensorBlob>) -> Result<()> {
    for (n, t) in ps.names().iter().zip(ps.tensors()) {
        out.push(tensor_blob(&format!("{prefix}{n}"), t)?);
    }
    Ok(())
}

/// A tensor's elements on the host, as f64 (an f64 tensor) or f32 (any other type):
/// borrowed from a host tensor, or the host copy of any other.
enum HostElems<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
}

/// Calls `f` with the elements of `t`: a host tensor of f32 or f64 is read in place,
/// anything else is copied to the host first (f32 unless it is f64).
fn with_host_elems<R>(t: &Tensor, f: impl FnOnce(HostElems<'_>) -> R) -> Result<R> {
    if t.device().is_cpu() {
        match t.dtype() {
            DType::F32 => {
                return Ok(ops::host::with_slice(t, |s: &[f32]| {
                    f(HostElems::F32(Cow::Borrowed(s)))
                })?)
            }
            DType::F64 => {
                return Ok(ops::host::with_slice(t, |s: &[f64]| {
                    f(HostElems::F64(Cow::Borrowed(s)))
                })?)
            }
            _ => {}
        }
    }
    Ok(match t.dtype() {
        DType::F64 => f(HostElems::F64(Cow::Owned(t.flatten_all()?.to_vec1()?))),
        _ => f(HostElems::F32(Cow::Owned(
            t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        ))),
    })
}

/// A host copy of a tensor as a checkpoint blob (f32 or f64), made with one copy: a host
/// tensor of f32 or f64 is copied into the blob, the host copy of any other (a GPU
/// tensor's) becomes the blob (a vit_base checkpoint is 2.1 GB, and the copy is the part
/// of a save that blocks training).
pub fn tensor_blob(name: &str, t: &Tensor) -> Result<TensorBlob> {
    let shape = t.dims().to_vec();
    Ok(with_host_elems(t, |e| match e {
        HostElems::F32(s) => TensorBlob::from_f32_vec(name, &shape, s.into_owned()),
        HostElems::F64(s) => TensorBlob::from_f64_vec(name, &shape, s.into_owned()),
    })??)
}

fn model_group(name: &str, m: &SslModel) -> Result<TensorGroup> {
    let mut blobs = vec![];
    for (role, ps) in m.modules() {
        blobs_of(&format!("{role}."), ps, &mut blobs)?;
    }
    Ok(TensorGroup::new(name, blobs))
}

/// Takes a host copy of the state at a step boundary (the blocking part of a save).
pub fn snapshot(st: &EngineState, plan: &Plan) -> Result<CheckpointPayload> {
    let ts = &st.ts;
    let mut payload = CheckpointPayload::new(ts.step)
        .with_group(model_group("student", &ts.student)?)
        .with_group(model_group("teacher", &ts.teacher)?);
    if let Some(g) = &ts.gram_teacher {
        let mut blobs = vec![];
        blobs_of("backbone.", &g.params, &mut blobs)?;
        payload = payload.with_group(TensorGroup::new("gram_teacher", blobs));
    }
    let mut opt = vec![];
    for ((role, ps), mo) in ts.student.modules().iter().zip(&ts.optim.modules) {
        for ((n, t), m) in ps.names().iter().zip(ps.tensors()).zip(&mo.moments) {
            let (a, b) = (
                format!("exp_avg.{role}.{n}"),
                format!("exp_avg_sq.{role}.{n}"),
            );
            let dims = t.dims();
            // host moments straight into the blobs: one copy each
            match m {
                Moments::F32 { m, v } => {
                    opt.push(TensorBlob::from_f32(a, dims, m)?);
                    opt.push(TensorBlob::from_f32(b, dims, v)?);
                }
                Moments::F64 { m, v } => {
                    opt.push(TensorBlob::from_f64(a, dims, m)?);
                    opt.push(TensorBlob::from_f64(b, dims, v)?);
                }
                Moments::Tensors { m, v } => {
                    opt.push(tensor_blob(&a, &m.reshape(dims)?)?);
                    opt.push(tensor_blob(&b, &v.reshape(dims)?)?);
                }
            }
        }
    }
    payload = payload.with_group(TensorGroup::new("optimizer", opt));
    let meta = RunMeta {
        step: ts.step,
        optim_t: ts.optim.t,
        seed: ts.seed,
        data_cursor: ts.data_cursor.clone(),
        gram_updates: ts.gram_updates,
        stage: st.stage.clone(),
        counters: st.counters.clone(),
        model: ts.cfg.clone(),
        precision: plan.config.precision,
    };
    let meta = serde_json::json!({
        "run": meta,
        "config_toml": plan.effective_toml,
    });
    Ok(payload
        .with_versions(plan.config_hash.clone(), CODE_VERSION.to_string())
        .with_meta(meta))
}

/// A host tensor of `dtype` that takes over the blob's elements (a blob read from a file, or
/// made from a vector, hands its `Vec` over without a copy; a cast to another float type
/// copies). Half-precision blobs (bf16, f16: weights stored to save space) are widened.
fn to_tensor(b: TensorBlob, dtype: DType) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    let shape = b.shape.clone();
    let t = match b.dtype {
        checkpoints::Dtype::F64 => Tensor::from_vec(b.into_f64_vec()?, shape, &dev)?,
        checkpoints::Dtype::F32 => Tensor::from_vec(b.into_f32_vec()?, shape, &dev)?,
        // little-endian bytes, as safetensors stores them, read as the host's halves
        checkpoints::Dtype::BF16 if cfg!(target_endian = "little") => {
            Tensor::from_raw_buffer(b.bytes(), DType::BF16, &shape, &dev)?
        }
        checkpoints::Dtype::F16 if cfg!(target_endian = "little") => {
            Tensor::from_raw_buffer(b.bytes(), DType::F16, &shape, &dev)?
        }
        d => bail!("tensor {} has unsupported dtype {d:?}", b.name),
    };
    Ok(t.to_dtype(dtype)?)
}

/// The AdamW moments of a parameter of `len` elements, as host vectors of the master type
/// that take over the blobs' elements.
fn moments_from_blobs(m: TensorBlob, v: TensorBlob, len: usize, dtype: DType) -> Result<Moments> {
    for b in [&m, &v] {
        if b.n_elements() != len {
            bail!(
                "{} has shape {:?}, but its parameter has {len} elements",
                b.name,
                b.shape
            );
        }
    }
    // stored in the master type, which a resume cannot change (`check_architecture`)
    Ok(match dtype {
        DType::F32 => Moments::F32 {
            m: m.into_f32_vec()?,
            v: v.into_f32_vec()?,
        },
        DType::F64 => Moments::F64 {
            m: m.into_f64_vec()?,
            v: v.into_f64_vec()?,
        },
        d => bail!("optimizer state in {d:?} is not supported"),
    })
}

/// A model whose tensors are the blobs `take("<role>.<key>")`, as host tensors in `dtype`
/// (the builders check each shape) that take over the blobs' elements. Nothing is drawn or
/// copied that the blobs then overwrite: at vit_base, initialising first and loading after
/// was most of a resume, and converting out of byte buffers most of what was left.
pub fn model_from_blobs(
    cfg: &model::SslConfig,
    dtype: DType,
    mut take: impl FnMut(&str) -> Option<TensorBlob>,
) -> Result<SslModel> {
    Ok(SslModel::build(cfg, |n, _, _| {
        found_tensor(take(n), n, dtype)
    })?)
}

/// [`model_from_blobs`] for a backbone: its tensors are `take("backbone.<key>")`.
pub fn vit_from_blobs(
    cfg: &model::VitConfig,
    dtype: DType,
    mut take: impl FnMut(&str) -> Option<TensorBlob>,
) -> Result<Vit> {
    Ok(Vit::build(cfg, |n, _, _| {
        let name = format!("backbone.{n}");
        found_tensor(take(&name), &name, dtype)
    })?)
}

fn found_tensor(b: Option<TensorBlob>, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
    let Some(b) = b else {
        candle_core::bail!("missing parameter `{name}`")
    };
    to_tensor(b, dtype).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
}

/// The run metadata of a loaded checkpoint.
pub fn run_meta(ck: &LoadedCheckpoint) -> Result<RunMeta> {
    let v = ck
        .meta()
        .get("run")
        .cloned()
        .context("checkpoint has no run metadata")?;
    serde_json::from_value(v).context("checkpoint run metadata")
}

/// Checks that a checkpoint's model can be loaded with the current config.
pub fn check_architecture(meta: &RunMeta, plan: &Plan) -> Result<()> {
    let a = &meta.model;
    let b = &plan.ssl;
    let mut diffs = vec![];
    if !a.backbone.same_architecture(&b.backbone) {
        diffs.push(format!(
            "backbone {}x{}x{} (patch {}) vs {}x{}x{} (patch {})",
            a.backbone.embed_dim,
            a.backbone.depth,
            a.backbone.num_heads,
            a.backbone.patch_size,
            b.backbone.embed_dim,
            b.backbone.depth,
            b.backbone.num_heads,
            b.backbone.patch_size
        ));
    }
    if a.dino_head != b.dino_head {
        diffs.push(format!("dino_head {:?} vs {:?}", a.dino_head, b.dino_head));
    }
    if a.ibot_head != b.ibot_head {
        diffs.push(format!("ibot_head {:?} vs {:?}", a.ibot_head, b.ibot_head));
    }
    // the master type must match; the compute type may change (f32 <-> bf16 mixed)
    if meta.precision.dtype() != plan.config.precision.dtype() {
        diffs.push(format!(
            "precision {:?} vs {:?}",
            meta.precision, plan.config.precision
        ));
    }
    if !diffs.is_empty() {
        bail!(
            "the state directory holds a run whose architecture differs from this config ({}); use another --state-dir, or the config the run was started with",
            diffs.join("; ")
        );
    }
    Ok(())
}

/// Rebuilds the engine state from a loaded checkpoint, whose tensors it takes over.
pub fn restore(mut ck: LoadedCheckpoint, plan: &Plan) -> Result<EngineState> {
    let meta = run_meta(&ck)?;
    check_architecture(&meta, plan)?;
    let dtype = plan.config.precision.dtype();
    // the models are built from the checkpoint's tensors directly: nothing is drawn or
    // copied that the checkpoint then overwrites (at vit_base that was most of a resume)
    let mut model = |name: &str| -> Result<SslModel> {
        let mut g = ck
            .take_group(name)
            .with_context(|| format!("checkpoint has no {name} group"))?;
        model_from_blobs(&plan.ssl, dtype, |n| g.take(n)).with_context(|| format!("group `{name}`"))
    };
    let (student, teacher) = (model("student")?, model("teacher")?);
    let mut ts = TrainState::from_models(&plan.ssl, meta.seed, student, teacher)?;
    if let Some(mut g) = ck.take_group("gram_teacher") {
        let vit = vit_from_blobs(&plan.ssl.backbone, dtype, |n| g.take(n))
            .context("group `gram_teacher`")?;
        ts.gram_teacher = Some(vit);
    }
    let mut opt = ck
        .take_group("optimizer")
        .context("checkpoint has no optimizer group")?;
    for (mi, (role, ps)) in ts.student.modules().into_iter().enumerate() {
        for (pi, (n, t)) in ps.names().iter().zip(ps.tensors()).enumerate() {
            let mut take = |which: &str| {
                opt.take(&format!("{which}.{role}.{n}"))
                    .with_context(|| format!("optimizer state for {role}.{n}"))
            };
            let (m, v) = (take("exp_avg")?, take("exp_avg_sq")?);
            ts.optim.modules[mi].moments[pi] = moments_from_blobs(m, v, t.elem_count(), dtype)
                .with_context(|| format!("optimizer state for {role}.{n}"))?;
        }
    }
    ts.optim.t = meta.optim_t;
    ts.step = meta.step;
    ts.data_cursor = meta.data_cursor.clone();
    ts.gram_updates = meta.gram_updates;
    let ts = place(ts, plan)?;
    Ok(EngineState {
        ts,
        dirty: false,
        stage: meta.stage,
        counters: meta.counters,
    })
}

/// The state on the run's device (`runtime.device`; built on the host, moved once).
pub fn place(ts: TrainState, plan: &Plan) -> Result<TrainState> {
    let dev = crate::runtime::device(&plan.config.runtime.device)?;
    if dev.is_cpu() && !ops::portable::forced_on_cpu() {
        return Ok(ts);
    }
    // (on the CPU with the device code path forced, e.g. bf16: the optimizer moments
    // become tensors as on a device, so a resumed run computes what a fresh one does)
    ts.to_device(&dev)
        .with_context(|| format!("moving the state to {}", plan.config.runtime.device))
}

/// A fresh state for a new run: drawn from the seed, or started from the weights of
/// `[model] init` (then with what was loaded).
pub fn fresh(plan: &Plan) -> Result<(EngineState, Option<InitReport>)> {
    let (seed, dtype) = (plan.config.seed, plan.config.precision.dtype());
    let (ts, report) = match &plan.config.model.init {
        Some(spec) => {
            let (weights, source) = crate::weights::read_weights(spec, &plan.ssl.backbone)
                .with_context(|| format!("model.init `{spec}`"))?;
            let (student, r) = model_from_init(&plan.ssl, seed, dtype, weights)
                .with_context(|| format!("model.init `{spec}`"))?;
            let teacher = student.deep_clone()?;
            let ts = TrainState::from_models(&plan.ssl, seed, student, teacher)?;
            let r = InitReport {
                spec: spec.clone(),
                source,
                ..r
            };
            (ts, Some(r))
        }
        None => (TrainState::new(&plan.ssl, seed, dtype)?, None),
    };
    let ts = place(ts, plan)?;
    // what the run started from, in every checkpoint it writes (events are trimmed)
    let counters = match &report {
        Some(r) => serde_json::json!({"init": {"spec": r.spec, "source": r.source}}),
        None => serde_json::json!({}),
    };
    Ok((
        EngineState {
            ts,
            dirty: false,
            stage: serde_json::Value::Null,
            counters,
        },
        report,
    ))
}

/// What a new run took from `[model] init`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InitReport {
    /// The source, as configured.
    pub spec: String,
    /// Which weights they were: the checkpoint's step, the BLAKE3 of what was read.
    pub source: String,
    /// Parameter tensors loaded, per module (`backbone`, `dino_head`, `ibot_head`); a
    /// head with none was drawn from the seed.
    pub loaded: Vec<(String, usize)>,
    /// Tensors of the source that are not parameters of the model (buffers such as
    /// `rope_embed.periods`), not used.
    pub unused: Vec<String>,
}

/// A model whose backbone, and each head the weights have, take over the weights'
/// tensors; a head they lack is drawn from the seed as a new run draws it (each tensor's
/// draw depends only on the seed and its name), and nothing else is drawn.
fn model_from_init(
    cfg: &model::SslConfig,
    seed: u64,
    dtype: DType,
    mut weights: TensorGroup,
) -> Result<(SslModel, InitReport)> {
    let module = |n: &str| n.split_once('.').map_or(n, |(m, _)| m).to_string();
    let given: std::collections::BTreeSet<String> =
        weights.tensors.iter().map(|t| module(&t.name)).collect();
    let mut loaded: Vec<(String, usize)> = ["backbone", "dino_head", "ibot_head"]
        .iter()
        .map(|m| (m.to_string(), 0))
        .collect();
    // the module of the tensor made last: the one a shape check fails on
    let mut last = String::new();
    let built = SslModel::build(cfg, |name, shape, init| {
        let role = module(name);
        last.clone_from(&role);
        if role != "backbone" && !given.contains(&role) {
            return model::params::init_tensor(seed, name, shape, init, dtype);
        }
        if let Some(c) = loaded.iter_mut().find(|(m, _)| *m == role) {
            c.1 += 1;
        }
        found_tensor(weights.take(name), name, dtype)
    });
    let m = match built {
        Ok(m) => m,
        Err(e) if last != "backbone" => {
            return Err(anyhow::Error::from(e).context(format!(
                "the source's {last} does not fit [model]'s (a source without heads, such as an export without --with-heads, starts them from the seed)"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    // named as in the source: a backbone's keys carry no prefix there
    let mut unused: Vec<String> = weights
        .tensors
        .into_iter()
        .map(|t| match t.name.strip_prefix("backbone.") {
            Some(key) => key.to_string(),
            None => t.name,
        })
        .collect();
    unused.sort();
    Ok((
        m,
        InitReport {
            spec: String::new(),
            source: String::new(),
            loaded,
            unused,
        },
    ))
}

/// Byte-level fingerprint of the trainable state (weights, teacher, moments, step, cursor),
/// for the bit-exact resume tests and `dinod status`.
pub fn fingerprint(ts: &TrainState) -> Result<String> {
    let mut h = blake3::Hasher::new();
    hash_weights(&mut h, ts)?;
    h.update(ts.data_cursor.to_string().as_bytes());
    Ok(h.finalize().to_hex().to_string())
}

/// [`fingerprint`] without the data cursor: what the copies of a group of processes
/// hold (weights, teacher, Gram teacher, moments, step, update count).
pub fn weights_digest(ts: &TrainState) -> Result<String> {
    let mut h = blake3::Hasher::new();
    hash_weights(&mut h, ts)?;
    Ok(h.finalize().to_hex().to_string())
}

fn hash_weights(h: &mut blake3::Hasher, ts: &TrainState) -> Result<()> {
    for m in [&ts.student, &ts.teacher] {
        for (_, ps) in m.modules() {
            for t in ps.tensors() {
                hash_tensor(h, t)?;
            }
        }
    }
    if let Some(g) = &ts.gram_teacher {
        for t in g.params.tensors() {
            hash_tensor(h, t)?;
        }
    }
    for mo in &ts.optim.modules {
        for m in &mo.moments {
            match m {
                Moments::F32 { m, v } => {
                    hash_le(h, m, f32::to_le_bytes);
                    hash_le(h, v, f32::to_le_bytes);
                }
                Moments::F64 { m, v } => {
                    hash_le(h, m, f64::to_le_bytes);
                    hash_le(h, v, f64::to_le_bytes);
                }
                // the same bytes as the host variants: m's elements, then v's
                Moments::Tensors { m, v } => {
                    hash_tensor(h, m)?;
                    hash_tensor(h, v)?;
                }
            }
        }
    }
    h.update(&ts.step.to_le_bytes());
    h.update(&ts.optim.t.to_le_bytes());
    Ok(())
}

fn hash_tensor(h: &mut blake3::Hasher, t: &Tensor) -> Result<()> {
    with_host_elems(t, |e| match e {
        HostElems::F32(s) => hash_le(h, &s, f32::to_le_bytes),
        HostElems::F64(s) => hash_le(h, &s, f64::to_le_bytes),
    })
}

/// Feeds `xs` to the hasher as their little-endian bytes, one block at a time: the same
/// stream as one update per element, which at vit_base (527 M elements in the weights,
/// the teacher and the moments) took 7 s of every stop.
fn hash_le<T: Copy, const N: usize>(h: &mut blake3::Hasher, xs: &[T], le: fn(T) -> [u8; N]) {
    let mut buf = Vec::with_capacity(64 * 1024);
    for block in xs.chunks(64 * 1024 / N) {
        buf.clear();
        for &x in block {
            buf.extend_from_slice(&le(x));
        }
        h.update(&buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashing in blocks is the byte stream of one update per element: fingerprints
    /// written by earlier builds (in `dinod status`, in the resume tests) stay comparable.
    #[test]
    fn block_hashing_is_the_per_element_stream() {
        // longer than one block of either type, and not a multiple of it
        let xs: Vec<f32> = (0..40_000).map(|i| (i as f32).sin() * 1e3).collect();
        let ys: Vec<f64> = xs.iter().map(|&x| f64::from(x) / 3.0).collect();
        let mut a = blake3::Hasher::new();
        for x in &xs {
            a.update(&x.to_le_bytes());
        }
        for y in &ys {
            a.update(&y.to_le_bytes());
        }
        let mut b = blake3::Hasher::new();
        hash_le(&mut b, &xs, f32::to_le_bytes);
        hash_le(&mut b, &ys, f64::to_le_bytes);
        assert_eq!(a.finalize(), b.finalize());
        // a host tensor read in place hashes as its elements
        let t = Tensor::from_vec(xs.clone(), (200, 200), &candle_core::Device::Cpu).unwrap();
        let mut c = blake3::Hasher::new();
        hash_tensor(&mut c, &t).unwrap();
        let mut d = blake3::Hasher::new();
        hash_le(&mut d, &xs, f32::to_le_bytes);
        assert_eq!(c.finalize(), d.finalize());
    }

    /// A tensor becomes a blob of its elements: read in place on the host, or through
    /// its f32 host copy (a GPU tensor's, or one of another type).
    #[test]
    fn a_tensor_blob_holds_the_elements_of_any_tensor() {
        let xs: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = Tensor::from_vec(xs.clone(), (2, 3, 4), &candle_core::Device::Cpu).unwrap();
        let b = tensor_blob("t", &t).unwrap();
        assert_eq!(
            (b.dtype, b.shape.clone()),
            (checkpoints::Dtype::F32, vec![2, 3, 4])
        );
        assert_eq!(b.to_f32_vec().unwrap(), xs);
        // bf16 holds these halves exactly; the blob is its f32 copy
        let b = tensor_blob("h", &t.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(
            (b.dtype, b.shape.clone()),
            (checkpoints::Dtype::F32, vec![2, 3, 4])
        );
        assert_eq!(b.into_f32_vec().unwrap(), xs);
        let d = t.to_dtype(DType::F64).unwrap().t().unwrap();
        let b = tensor_blob("d", &d).unwrap();
        assert_eq!(
            (b.dtype, b.shape.clone()),
            (checkpoints::Dtype::F64, vec![2, 4, 3])
        );
        assert_eq!(
            b.to_f64_vec().unwrap(),
            d.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
    }

    /// A state saved by the real store and restored from it is the same state, moments
    /// included; a moment of the wrong size is refused with its name.
    #[test]
    fn a_restored_state_is_the_saved_one_and_a_misshapen_moment_is_named() {
        let plan = crate::cli::load_plan(None).unwrap();
        let (mut st, init) = fresh(&plan).unwrap();
        assert!(init.is_none());
        st.ts.step = 5;
        st.ts.optim.t = 5;
        for (k, mo) in st.ts.optim.modules.iter_mut().enumerate() {
            for (j, m) in mo.moments.iter_mut().enumerate() {
                if let Moments::F32 { m, v } = m {
                    for (i, (a, b)) in m.iter_mut().zip(v.iter_mut()).enumerate() {
                        *a = ((i + 7 * j + 13 * k) as f32).sin();
                        *b = ((i + j + k) as f32).cos().abs();
                    }
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = checkpoints::Store::open(
            dir.path(),
            checkpoints::StoreOptions::new(checkpoints::Retention::keep_last(4)),
        )
        .unwrap();
        let mut payload = snapshot(&st, &plan).unwrap();
        store.save(&payload).unwrap();
        let back = restore(store.load(5).unwrap(), &plan).unwrap();
        assert_eq!(back.ts.step, 5);
        assert_eq!(fingerprint(&back.ts).unwrap(), fingerprint(&st.ts).unwrap());

        // one element short: the optimizer cannot pair it with its parameter
        let opt = payload
            .groups
            .iter_mut()
            .find(|g| g.name == "optimizer")
            .unwrap();
        let name = "exp_avg_sq.backbone.cls_token";
        let b = opt.take(name).expect("the class token has moments");
        let short = b.to_f32_vec().unwrap()[1..].to_vec();
        opt.tensors
            .push(TensorBlob::from_f32_vec(name, &[short.len()], short).unwrap());
        payload.step = 6;
        store.save(&payload).unwrap();
        let err = match restore(store.load(6).unwrap(), &plan) {
            Ok(_) => panic!("a moment one element short was restored"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(name) && err.contains("its parameter has"),
            "{err}"
        );
    }
}
