//! Data parallelism on one machine: a group of members, one thread each, every member
//! with its own device, its own copy of the `TrainState` and its part of every global
//! batch (`model::dist`). The all-reduce is `model::dist::ThreadGroup` for members on the
//! CPU and NCCL for members on GPUs (`cuda` feature, one GPU per member: `cuda:0`,
//! `cuda:1`, ...). `dinod bench dp` runs it.
//!
//! Across machines nothing is implemented; `docs/multi-node.md` is the design (a TCP
//! rendezvous that hands out rank 0's NCCL id, `ncclCommInitRank` per GPU, the state
//! broadcast from rank 0, control messages to the workers).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde::Serialize;

use crate::config::Plan;
use model::dist::{Collective, ThreadGroup};
use model::{StepHparams, TrainState};

/// The members of a group on `device` (`cpu`: threads of this process; `cuda`: GPUs
/// `0..members` with NCCL). Member `r` runs on the returned device `r`.
pub fn group(device: &str, members: usize) -> Result<Vec<(Box<dyn Collective>, Device)>> {
    if members == 0 {
        bail!("a group needs at least one member");
    }
    if device == "cpu" {
        return Ok(ThreadGroup::new(members)
            .into_iter()
            .map(|m| (Box::new(m) as Box<dyn Collective>, Device::Cpu))
            .collect());
    }
    if device == "cuda" {
        return nccl_group(members);
    }
    bail!("data parallelism runs on `cpu` or `cuda` (all visible GPUs from cuda:0), not `{device}`")
}

#[cfg(feature = "cuda")]
fn nccl_group(members: usize) -> Result<Vec<(Box<dyn Collective>, Device)>> {
    // the process's handles (`runtime::device`): rank 0 is the daemon's own device
    let devices: Vec<Device> = (0..members)
        .map(|i| crate::runtime::device(&format!("cuda:{i}")))
        .collect::<Result<_>>()?;
    let streams = devices
        .iter()
        .map(|d| match d {
            Device::Cuda(c) => Ok(c.cuda_stream()),
            _ => Err(anyhow!("not a CUDA device")),
        })
        .collect::<Result<Vec<_>>>()?;
    let comms = nccl::Comm::from_devices(streams)
        .map_err(|e| anyhow!("NCCL could not set up {members} GPUs: {:?}", e.0))?;
    Ok(comms
        .into_iter()
        .zip(devices)
        .map(|(c, d)| (Box::new(nccl::NcclMember::new(c)) as Box<dyn Collective>, d))
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(_members: usize) -> Result<Vec<(Box<dyn Collective>, Device)>> {
    Err(anyhow!(
        "this dinod was built without the `cuda` feature (scripts/build-cuda.sh builds it)"
    ))
}

#[cfg(feature = "cuda")]
mod nccl {
    use std::sync::Mutex;

    pub use candle_core::cuda_backend::cudarc::nccl::safe::Comm;
    use candle_core::cuda_backend::cudarc::nccl::safe::ReduceOp;
    use candle_core::op::BackpropOp;
    use candle_core::CudaStorage;
    use candle_core::{DType, Storage, Tensor};
    use model::dist::Collective;

    /// One GPU's NCCL communicator. NCCL communicators must not be used by two threads at
    /// once; the mutex serialises the calls, which is what makes sharing it sound.
    pub struct NcclMember {
        comm: Mutex<Comm>,
        rank: usize,
        world: usize,
    }

    // SAFETY: the communicator is only touched under the mutex, and NCCL allows a
    // communicator to be used from any thread as long as calls do not overlap.
    unsafe impl Send for NcclMember {}
    unsafe impl Sync for NcclMember {}

    impl NcclMember {
        pub fn new(comm: Comm) -> Self {
            let (rank, world) = (comm.rank(), comm.world_size());
            Self {
                comm: Mutex::new(comm),
                rank,
                world,
            }
        }
    }

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("NCCL all-reduce: {what}: {e:?}"))
    }

    impl Collective for NcclMember {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, v: &mut [f64]) -> candle_core::Result<()> {
            let comm = self
                .comm
                .lock()
                .map_err(|_| candle_core::Error::Msg("NCCL: a member panicked".into()))?;
            let stream = comm.stream();
            let mut d = stream.clone_htod(v).map_err(|e| err("upload", e))?;
            comm.all_reduce_in_place(&mut d, &ReduceOp::Sum)
                .map_err(|e| err("reduce", e.0))?;
            stream.memcpy_dtoh(&d, v).map_err(|e| err("download", e))?;
            stream.synchronize().map_err(|e| err("synchronize", e))?;
            Ok(())
        }

        /// Device buffers are reduced where they are (f32 and f64 on a GPU); anything
        /// else goes through the host.
        fn all_reduce_sum_tensor(&self, t: &Tensor) -> candle_core::Result<Tensor> {
            if !t.device().is_cuda() || !matches!(t.dtype(), DType::F32 | DType::F64) {
                return model::dist::reduce_on_host(&|v| self.all_reduce_sum(v), t);
            }
            let t = t.contiguous()?;
            let n = t.elem_count();
            let comm = self
                .comm
                .lock()
                .map_err(|_| candle_core::Error::Msg("NCCL: a member panicked".into()))?;
            let stream = comm.stream();
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                candle_core::bail!("NCCL all-reduce: not a CUDA tensor")
            };
            let start = layout.start_offset();
            let out = match t.dtype() {
                DType::F32 => {
                    let src = cs.as_cuda_slice::<f32>()?;
                    let mut dst = stream.alloc_zeros::<f32>(n).map_err(|e| err("alloc", e))?;
                    comm.all_reduce(&src.slice(start..start + n), &mut dst, &ReduceOp::Sum)
                        .map_err(|e| err("reduce", e.0))?;
                    CudaStorage::wrap_cuda_slice(dst, cs.device.clone())
                }
                _ => {
                    let src = cs.as_cuda_slice::<f64>()?;
                    let mut dst = stream.alloc_zeros::<f64>(n).map_err(|e| err("alloc", e))?;
                    comm.all_reduce(&src.slice(start..start + n), &mut dst, &ReduceOp::Sum)
                        .map_err(|e| err("reduce", e.0))?;
                    CudaStorage::wrap_cuda_slice(dst, cs.device.clone())
                }
            };
            drop(storage);
            Ok(Tensor::from_storage(
                Storage::Cuda(out),
                t.dims(),
                BackpropOp::none(),
                false,
            ))
        }
    }
}

/// The members of the daemon's group, rank 0 first.
pub type Members = Arc<Vec<(Box<dyn Collective>, Device)>>;

/// The group of `runtime.data_parallel` members for `plan` (None for one), built on first
/// use and kept in `slot`; [`reset`] drops it after a failure (an aborted group stays
/// aborted).
pub fn members(slot: &Mutex<Option<Members>>, plan: &Plan) -> Result<Option<Members>> {
    let rt = &plan.config.runtime;
    if rt.data_parallel <= 1 {
        return Ok(None);
    }
    let mut g = slot
        .lock()
        .map_err(|_| anyhow!("the group lock is poisoned"))?;
    if g.is_none() {
        let kind = if rt.device == "cpu" { "cpu" } else { "cuda" };
        *g = Some(Arc::new(group(kind, rt.data_parallel)?));
    }
    Ok(g.clone())
}

/// Forgets the group (the next step builds a fresh one).
pub fn reset(slot: &Mutex<Option<Members>>) {
    if let Ok(mut g) = slot.lock() {
        *g = None;
    }
}

/// Runs `f(rank, comm, device)` for every member at once (rank 0 on this thread) and
/// returns the results in rank order. If one fails, the group is aborted so the others'
/// collectives fail at once, and the first failure that is not such an abort is returned.
pub fn on_members<T: Send>(
    members: &[(Box<dyn Collective>, Device)],
    f: impl Fn(usize, &dyn Collective, &Device) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let run = |r: usize| -> Result<T> {
        let (comm, dev) = &members[r];
        let out = f(r, comm.as_ref(), dev).with_context(|| format!("data-parallel member {r}"));
        if let Err(e) = &out {
            comm.abort(&format!("{e:#}"));
        }
        out
    };
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..members.len())
            .map(|r| {
                let run = &run;
                s.spawn(move || run(r))
            })
            .collect();
        let mut out = vec![run(0)];
        for h in hs {
            out.push(
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a data-parallel member panicked"))),
            );
        }
        out
    });
    if results.iter().any(|r| r.is_err()) {
        let mut errs: Vec<anyhow::Error> = results.into_iter().filter_map(|r| r.err()).collect();
        let root = errs
            .iter()
            .position(|e| !format!("{e:#}").contains("group was aborted"))
            .unwrap_or(0);
        return Err(errs.swap_remove(root));
    }
    Ok(results.into_iter().map(|r| r.expect("checked")).collect())
}

/// What `dinod bench dp` measured.
#[derive(Clone, Debug, Serialize)]
pub struct DpBench {
    /// Config file.
    pub config: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Members of the group.
    pub members: usize,
    /// Images per global batch (each member gets `batch_size / members`).
    pub batch_size: usize,
    /// Iterations timed (after warm-up).
    pub iters: usize,
    /// Median wall time of a group step (member 0's clock; the all-reduces keep the
    /// members in step).
    pub median_ms: f64,
    /// Global images per second at the median.
    pub images_per_s: f64,
    /// Whether every member ended with the same weights (they must).
    pub members_identical: bool,
    /// With `--check`: the largest difference of the student weights from one member
    /// running the same steps on the whole batch, relative to the largest weight.
    /// KoLeo, the batch-wide Gram matrix and drop path are per member (as officially),
    /// so it is at rounding level only with those off.
    pub max_rel_vs_single: Option<f64>,
}

/// Options of [`bench_dp`].
#[derive(Clone, Debug)]
pub struct DpBenchOpts {
    /// Untimed iterations first.
    pub warmup: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Members of the group.
    pub members: usize,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Also run one member on the whole batch and compare.
    pub check: bool,
    /// `train.batch_size` override.
    pub batch_size: Option<usize>,
}

fn student_weights(st: &TrainState) -> Result<Vec<f64>> {
    let mut out = vec![];
    for (_, ps) in st.student.modules() {
        for t in ps.tensors() {
            out.extend(
                t.to_device(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
            );
        }
    }
    Ok(out)
}

/// One member's steps: its own state on `dev`, its part of the batch.
fn run_member(
    comm: &dyn Collective,
    dev: &Device,
    batch: &model::Batch,
    fresh: &dyn Fn(&Device) -> Result<TrainState>,
    hp: &StepHparams,
    steps: usize,
    warmup: usize,
) -> Result<MemberResult> {
    let mut st = fresh(dev)?;
    let shard = batch.shard(comm.rank(), comm.world())?.to_device(dev)?;
    let mut times = vec![];
    for it in 0..steps {
        let t0 = Instant::now();
        model::dist::train_step_group(&mut st, &shard, hp, comm)
            .map_err(|e| anyhow!("member {}: {e}", comm.rank()))?;
        ops::portable::synchronize(dev)?;
        if it >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok((
        times,
        crate::engine::fingerprint(&st)?,
        student_weights(&st)?,
    ))
}

/// What a member reports: its timed step lengths (ms), its state's fingerprint and its
/// student weights.
type MemberResult = (Vec<f64>, String, Vec<f64>);

/// Runs `warmup + iters` data-parallel steps of the recipe on random crops.
pub fn bench_dp(plan: &Plan, origin: &str, opts: &DpBenchOpts) -> Result<DpBench> {
    let mut plan = plan.clone();
    if let Some(b) = opts.batch_size {
        plan.config.train.batch_size = b;
    }
    let plan = &plan;
    let cfg = &plan.config;
    let b = cfg.train.batch_size;
    if !b.is_multiple_of(opts.members) {
        bail!(
            "the batch of {b} images does not split into {} members",
            opts.members
        );
    }
    if b / opts.members < 2 {
        bail!(
            "{} members would get {} image(s) each; KoLeo needs at least 2 per member",
            opts.members,
            b / opts.members
        );
    }
    let gram_on = cfg.data.crops.gram_size.is_some();
    let mut hp: StepHparams = plan.hparams(1_000_000);
    hp.gram_weight = if gram_on { 1.0 } else { 0.0 };
    let batch = crate::bench::synthetic_batch(plan, cfg.seed)?;
    let steps = opts.warmup + opts.iters;
    let fresh = |dev: &Device| -> Result<TrainState> {
        let mut st = TrainState::new(&plan.ssl, cfg.seed, cfg.precision.dtype())?.to_device(dev)?;
        if gram_on {
            st.refresh_gram_teacher()?;
        }
        Ok(st)
    };
    let group = group(&opts.device, opts.members)?;
    let results: Vec<Result<MemberResult>> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|(comm, dev)| {
                let (batch, fresh, hp) = (&batch, &fresh, &hp);
                s.spawn(move || -> Result<MemberResult> {
                    let comm: &dyn Collective = comm.as_ref();
                    let r = run_member(comm, &dev, batch, fresh, hp, steps, opts.warmup);
                    if let Err(e) = &r {
                        // the others must not wait for this member's next all-reduce
                        comm.abort(&format!("{e:#}"));
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a member panicked")))
            })
            .collect()
    });
    let results: Vec<MemberResult> = results.into_iter().collect::<Result<_>>()?;
    let members_identical = results.iter().all(|r| r.1 == results[0].1);
    let mut times = results[0].0.clone();
    times.sort_by(|a, b| a.total_cmp(b));
    let median_ms = if times.is_empty() {
        0.0
    } else {
        times[times.len() / 2]
    };
    let max_rel_vs_single = if opts.check {
        let dev = if opts.device == "cpu" {
            Device::Cpu
        } else {
            crate::runtime::device("cuda:0")?
        };
        let mut st = fresh(&dev)?;
        let whole = batch.to_device(&dev)?;
        for _ in 0..steps {
            model::train_step(&mut st, &whole, &hp).context("the one-member reference step")?;
        }
        let want = student_weights(&st)?;
        let got = &results[0].2;
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        let diff = got
            .iter()
            .zip(&want)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        Some(diff / scale)
    } else {
        None
    };
    Ok(DpBench {
        config: origin.to_string(),
        device: opts.device.clone(),
        members: opts.members,
        batch_size: b,
        iters: opts.iters,
        median_ms,
        images_per_s: b as f64 / (median_ms / 1e3).max(1e-12),
        members_identical,
        max_rel_vs_single,
    })
}
