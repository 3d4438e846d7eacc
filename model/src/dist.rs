//! Data parallelism: one step over a global batch split across the members of a group
//! (GPUs of a machine, or threads in the tests), each holding an identical `TrainState`.
//!
//! What is group-wide, as in the official distributed code: the Sinkhorn-Knopp
//! normalisations of the DINO and iBOT targets (total mass, prototype masses, sample
//! count), the gradients (averaged, so every member applies the same update and the
//! students, teachers and optimizer states stay identical), and the reported losses
//! (averaged). What stays per member, also as officially: KoLeo (nearest neighbours within
//! the member's images), the batch-wide Gram matrix when `gram_per_image = false`, and
//! the drop-path subsets. With those off (or one member), a step of `W` members on
//! `B / W` images each equals the one-member step on the `B` images up to rounding.
//!
//! The transport is a [`Collective`]: [`Solo`] (one member), [`ThreadGroup`] (members in
//! one process: deterministic sums in rank order), or a device library (NCCL) behind the
//! same trait. This module only calls it; it starts no threads.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::params::{Grads, ParamSet};
use crate::ssl::LossTerms;
use crate::ssl::{ModelGrads, SslModel};
use crate::state::{
    finish_step, student_phase, teacher_phase_in, Batch, StepError, StepHparams, StepReport,
    TrainState,
};

/// Every transport's error for a collective that waited longer than its timeout for the
/// other members says this (for people; callers ask [`Collective::timed_out`]).
pub const TIMED_OUT: &str = "collective timed out";

/// An all-reduce among the members of a group.
pub trait Collective: Send + Sync {
    /// This member's index, `0..world`.
    fn rank(&self) -> usize;
    /// Members in the group.
    fn world(&self) -> usize;
    /// Sums `v` element-wise over every member, in place; every member gets the same
    /// result. Every member must make the same calls in the same order with vectors of
    /// the same length.
    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<()>;
    /// This member failed and will make no more calls: the others' pending and future
    /// calls fail with `why` instead of waiting for it. The default does nothing (the
    /// transport's own timeout applies).
    fn abort(&self, _why: &str) {}
    /// Whether a call of this member failed because it waited longer than the
    /// transport's timeout for the others (a member that stopped answering).
    fn timed_out(&self) -> bool {
        false
    }
    /// The element-wise sum of `t` over the group, as a new tensor of `t`'s shape, type
    /// and device. The default goes through the host in f64; a device transport (NCCL)
    /// reduces device buffers in place of it.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        reduce_on_host(&|v| self.all_reduce_sum(v), t)
    }
}

/// [`Collective::all_reduce_sum_tensor`] through the host in f64 (the default, and a
/// device transport's fallback for types it does not reduce itself).
pub fn reduce_on_host(
    all_reduce_sum: &dyn Fn(&mut [f64]) -> Result<()>,
    t: &Tensor,
) -> Result<Tensor> {
    let mut v: Vec<f64> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    all_reduce_sum(&mut v)?;
    Tensor::from_vec(v, t.dims(), &Device::Cpu)?
        .to_dtype(t.dtype())?
        .to_device(t.device())
}

/// The group of one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _v: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

struct Round {
    /// Completed rounds.
    round: u64,
    /// Members that deposited in the current round.
    arrived: usize,
    /// Members yet to read the last result.
    left: usize,
    slots: Vec<Vec<f64>>,
    result: std::result::Result<Vec<f64>, String>,
    /// Set by [`Collective::abort`]: every call fails with it from then on.
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Round>,
    cv: Condvar,
    /// Set when a member's wait timed out.
    timed_out: std::sync::atomic::AtomicBool,
}

/// Members of a group inside one process (one per thread). Sums are taken in rank
/// order, so a run is bit-reproducible. A member that waits longer than the timeout for
/// the others fails its call instead of hanging.
#[derive(Clone)]
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl ThreadGroup {
    /// `world` members, waiting at most 5 minutes for each other.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        Self::with_timeout(world, Duration::from_secs(300))
    }

    /// `world` members, waiting at most `timeout` for each other.
    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(Round {
                round: 0,
                arrived: 0,
                left: 0,
                slots: vec![vec![]; world],
                result: Ok(vec![]),
                aborted: None,
            }),
            cv: Condvar::new(),
            timed_out: Default::default(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("all-reduce: a member panicked".into())
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn abort(&self, why: &str) {
        self.abort_group(why)
    }
    fn timed_out(&self) -> bool {
        self.shared
            .timed_out
            .load(std::sync::atomic::Ordering::SeqCst)
    }
    fn all_reduce_sum(&self, v: &mut [f64]) -> Result<()> {
        let sh = &*self.shared;
        let mut g = sh.state.lock().map_err(poisoned)?;
        let wait = |g, what: &str| -> Result<std::sync::MutexGuard<'_, Round>> {
            let (g, to) = sh.cv.wait_timeout(g, sh.timeout).map_err(poisoned)?;
            if to.timed_out() {
                sh.timed_out
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                bail!(
                    "all-reduce: {TIMED_OUT}: member {} waited {:.1} s for {what}",
                    self.rank,
                    sh.timeout.as_secs_f64()
                )
            }
            Ok(g)
        };
        let aborted = |g: &Round| -> Result<()> {
            match &g.aborted {
                Some(why) => bail!("all-reduce: the group was aborted ({why})"),
                None => Ok(()),
            }
        };
        aborted(&g)?;
        // the previous result must be read by everyone before it is overwritten
        while g.left > 0 {
            g = wait(g, "the others to read the previous result")?;
            aborted(&g)?;
        }
        g.slots[self.rank] = v.to_vec();
        g.arrived += 1;
        let mine = g.round;
        if g.arrived == sh.world {
            let n = g.slots[0].len();
            g.result = if g.slots.iter().all(|s| s.len() == n) {
                let mut acc = vec![0.0; n];
                for s in &g.slots {
                    acc.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                }
                Ok(acc)
            } else {
                Err(format!(
                    "all-reduce: members sent vectors of lengths {:?}",
                    g.slots.iter().map(Vec::len).collect::<Vec<_>>()
                ))
            };
            g.arrived = 0;
            g.left = sh.world;
            g.round += 1;
            sh.cv.notify_all();
        } else {
            while g.round == mine {
                g = wait(g, "the others to arrive")?;
                aborted(&g)?;
            }
        }
        let r = g.result.clone();
        g.left -= 1;
        if g.left == 0 {
            sh.cv.notify_all();
        }
        drop(g);
        match r {
            Ok(sum) => {
                v.copy_from_slice(&sum);
                Ok(())
            }
            Err(e) => bail!("{e}"),
        }
    }
}

impl ThreadGroup {
    fn abort_group(&self, why: &str) {
        let sh = &*self.shared;
        let mut g = match sh.state.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        if g.aborted.is_none() {
            g.aborted = Some(format!("member {} failed: {why}", self.rank));
        }
        sh.cv.notify_all();
    }
}

impl Batch {
    /// Member `rank`'s part of the batch among `world`: images `rank * B/W ..` of every
    /// crop (global, local, Gram) and their masks. `B` must divide by `world`.
    pub fn shard(&self, rank: usize, world: usize) -> Result<Batch> {
        let b = self.batch_size;
        if world == 0 || rank >= world || !b.is_multiple_of(world) {
            bail!("cannot give member {rank} of {world} its part of a batch of {b} images")
        }
        let m = b / world;
        // crop-major rows: crop c of image i is row c * B + i
        let rows = |t: &Tensor, crops: usize| -> Result<Tensor> {
            let parts: Vec<Tensor> = (0..crops)
                .map(|c| t.narrow(0, c * b + rank * m, m))
                .collect::<Result<_>>()?;
            Tensor::cat(&parts, 0)
        };
        let p = self.masks.len() / (2 * b);
        let mut masks = Vec::with_capacity(2 * m * p);
        for c in 0..2 {
            let start = (c * b + rank * m) * p;
            masks.extend_from_slice(&self.masks[start..start + m * p]);
        }
        Batch::new(
            m,
            rows(&self.global, 2)?,
            self.local
                .as_ref()
                .map(|l| rows(l, self.n_local))
                .transpose()?,
            self.gram.as_ref().map(|g| rows(g, 2)).transpose()?,
            masks,
        )
    }
}

/// Averages the gradients over the group in place: one all-reduce of all of them,
/// flattened into one buffer on their device (f64 if they are f64, else f32: half
/// gradients are reduced in f32). `student` gives every parameter's shape: a member
/// without a gradient for a parameter (no masked patch in its images, so no iBOT-head
/// gradient) contributes zeros, and a parameter stays without a gradient only where no
/// member has one.
pub fn all_reduce_mean_grads(
    comm: &dyn Collective,
    grads: &mut ModelGrads,
    student: &SslModel,
) -> Result<()> {
    let params = student.modules();
    all_reduce_mean_parts(
        comm,
        vec![
            (params[0].0, &mut grads.backbone, params[0].1),
            (params[1].0, &mut grads.dino_head, params[1].1),
            (params[2].0, &mut grads.ibot_head, params[2].1),
        ],
    )
}

/// [`all_reduce_mean_grads`] of the heads' gradients only (DINO, then iBOT): with the
/// backbone's averaged apart ([`all_reduce_mean_tensors`]), the same result bits as one
/// all-reduce of all three, since every element is summed over the same members in the
/// same order. So a member can average the heads' gradients while its backbone's
/// backward pass runs ([`crate::student_phase_split`]).
pub fn all_reduce_mean_head_grads(
    comm: &dyn Collective,
    dino_head: &mut Grads,
    ibot_head: &mut Grads,
    student: &SslModel,
) -> Result<()> {
    let params = student.modules();
    all_reduce_mean_parts(
        comm,
        vec![
            (params[1].0, dino_head, params[1].1),
            (params[2].0, ibot_head, params[2].1),
        ],
    )
}

/// Averages the gradients of `parts` (each module's role, gradients and parameters) in
/// one all-reduce of their flattened concatenation, plus one of which are present.
fn all_reduce_mean_parts(
    comm: &dyn Collective,
    mut parts: Vec<(&'static str, &mut Grads, &ParamSet)>,
) -> Result<()> {
    let w = comm.world();
    if w == 1 {
        return Ok(());
    }
    let Some(dev) = parts
        .iter()
        .find_map(|(_, _, ps)| (!ps.is_empty()).then(|| ps.get(0).device().clone()))
    else {
        return Ok(());
    };
    let mut held = parts
        .iter()
        .flat_map(|(_, g, _)| g.tensors.iter().flatten().map(|t| t.dtype()));
    // the type the gradients come back in: the compute type, the same on every member
    // (every member has gradients of the first module: the backbone, or the DINO head),
    // even for a slot this member lacked
    let first = held.next();
    let wide = if first == Some(DType::F64) || held.any(|d| d == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let grad_dt = first.unwrap_or(wide);
    let mut present: Vec<f64> = vec![];
    let mut flat: Vec<Tensor> = vec![];
    for (role, g, ps) in &parts {
        if g.tensors.len() != ps.len() {
            bail!(
                "all-reduce: {} gradients for {} parameters of {role}",
                g.tensors.len(),
                ps.len(),
            )
        }
        for (i, t) in g.tensors.iter().enumerate() {
            match t {
                Some(t) => {
                    present.push(1.0);
                    flat.push(t.flatten_all()?.to_dtype(wide)?);
                }
                None => {
                    present.push(0.0);
                    flat.push(Tensor::zeros(ps.get(i).elem_count(), wide, &dev)?);
                }
            }
        }
    }
    comm.all_reduce_sum(&mut present)?;
    let mut means = mean_of_flat(comm, flat)?.into_iter();
    let mut slot = 0;
    for (_, g, ps) in parts.iter_mut() {
        for i in 0..ps.len() {
            let mean = means.next().expect("one per slot");
            if present[slot] > 0.0 {
                g.tensors[i] = Some(unflatten(&mean, ps.get(i).dims(), grad_dt)?);
            }
            slot += 1;
        }
    }
    Ok(())
}

/// The group's mean of each of `flat` (1-D, all of one type): one all-reduce of their
/// concatenation, then each one's slice of it.
fn mean_of_flat(comm: &dyn Collective, flat: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let lens: Vec<usize> = flat.iter().map(|t| t.elem_count()).collect();
    let flat_all = Tensor::cat(&flat, 0)?;
    drop(flat);
    let sum = comm.all_reduce_sum_tensor(&flat_all)?;
    let mean = sum.affine(1.0 / comm.world() as f64, 0.0)?;
    let mut off = 0;
    lens.into_iter()
        .map(|n| {
            let t = mean.narrow(0, off, n);
            off += n;
            t
        })
        .collect()
}

/// A slice of a mean as a gradient of `dims` in `dt`: an independent tensor of its own
/// size (clipping scales gradients in place: `copy` of a view would clone the whole flat
/// buffer, once per parameter).
fn unflatten(mean: &Tensor, dims: &[usize], dt: DType) -> Result<Tensor> {
    let t = mean.reshape(dims)?;
    if t.dtype() == dt {
        t.force_contiguous()
    } else {
        t.to_dtype(dt)
    }
}

/// Averages `grads` (gradients every member has, the same parameters in the same order
/// on every member: a group of a backbone's, handed out by
/// [`crate::vit::Vit::backward_observed`] as its backward pass goes) over the group:
/// each one's mean, in its own type. Every element gets the bits
/// [`all_reduce_mean_grads`] gives it.
pub fn all_reduce_mean_tensors(comm: &dyn Collective, grads: &[Tensor]) -> Result<Vec<Tensor>> {
    if comm.world() == 1 {
        return Ok(grads.to_vec());
    }
    let wide = if grads.iter().any(|t| t.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let flat = grads
        .iter()
        .map(|t| t.flatten_all()?.to_dtype(wide))
        .collect::<Result<Vec<_>>>()?;
    let means = mean_of_flat(comm, flat)?;
    grads
        .iter()
        .zip(&means)
        .map(|(g, m)| unflatten(m, g.dims(), g.dtype()))
        .collect()
}

/// Averages the loss values over the group in place.
pub fn all_reduce_mean_losses(comm: &dyn Collective, l: &mut LossTerms) -> Result<()> {
    let w = comm.world();
    if w == 1 {
        return Ok(());
    }
    let mut v = [
        l.dino_local,
        l.dino_global,
        l.koleo,
        l.ibot,
        l.gram,
        l.total,
    ];
    comm.all_reduce_sum(&mut v)?;
    let inv = 1.0 / w as f64;
    l.dino_local = v[0] * inv;
    l.dino_global = v[1] * inv;
    l.koleo = v[2] * inv;
    l.ibot = v[3] * inv;
    l.gram = v[4] * inv;
    l.total = v[5] * inv;
    Ok(())
}

/// One data-parallel training step: this member's `shard` of the global batch
/// ([`Batch::shard`]), group-wide Sinkhorn-Knopp, averaged gradients and losses, the same
/// clipping and update on every member. A non-finite step changes nothing on any member
/// (they all see the same averaged values).
pub fn train_step_group(
    st: &mut TrainState,
    shard: &Batch,
    hp: &StepHparams,
    comm: &dyn Collective,
) -> std::result::Result<StepReport, StepError> {
    let t = teacher_phase_in(st, shard, hp, Some(comm), &mut |_| {})?;
    let mut out = student_phase(st, shard, hp, t, &mut |_| {})?;
    all_reduce_mean_grads(comm, &mut out.grads, &st.student)?;
    all_reduce_mean_losses(comm, &mut out.losses)?;
    finish_step(st, out, hp)
}
