//! Data parallelism on one machine: a group of members, one thread each, every member
//! with its own device, its own copy of the `TrainState` and its part of every global
//! batch (`model::dist`). The all-reduce is `model::dist::ThreadGroup` for members on the
//! CPU and NCCL for members on GPUs (`cuda` feature, one GPU per member: `cuda:0`,
//! `cuda:1`, ...). `dinod bench dp` runs it.
//!
//! Across machines nothing is implemented; `docs/multi-node.md` is the design (a TCP
//! rendezvous that hands out rank 0's NCCL id, `ncclCommInitRank` per GPU, the state
//! broadcast from rank 0, control messages to the workers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::Plan;
use model::dist::{Collective, ThreadGroup};
use model::{StepHparams, TrainState};

/// The members of a group on `device` (`cpu`: threads of this process; `cuda`: GPUs
/// `0..members` with NCCL). Member `r` runs on the returned device `r`. A member waits
/// at most `timeout` in one collective for the others, then fails it
/// ([`model::dist::TIMED_OUT`]).
pub fn group(
    device: &str,
    members: usize,
    timeout: Duration,
) -> Result<Vec<(Box<dyn Collective>, Device)>> {
    if members == 0 {
        bail!("a group needs at least one member");
    }
    if device == "cpu" {
        return Ok(ThreadGroup::with_timeout(members, timeout)
            .into_iter()
            .map(|m| (Box::new(m) as Box<dyn Collective>, Device::Cpu))
            .collect());
    }
    if device == "cuda" {
        return nccl_group(members, timeout);
    }
    bail!("data parallelism runs on `cpu` or `cuda` (all visible GPUs from cuda:0), not `{device}`")
}

/// The abort state that the members of a device group share: set by the first member
/// that fails ([`Collective::abort`]), after which the others stop waiting for it; and
/// whether a member's wait timed out ([`Collective::timed_out`]).
#[derive(Debug, Default)]
pub struct GroupAbort {
    /// Set with `reason`: read on every poll without the lock.
    aborted: AtomicBool,
    reason: Mutex<Option<String>>,
    timed_out: AtomicBool,
}

/// A group step failed because a member waited longer than
/// `runtime.collective_timeout_s` for the others: a member stopped answering. The daemon
/// treats it as a recoverable device fault (the group is dropped and rebuilt).
#[derive(Debug)]
pub struct CollectiveTimedOut(pub String);

impl std::fmt::Display for CollectiveTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CollectiveTimedOut {}

impl GroupAbort {
    /// Records that a member's wait timed out.
    pub fn set_timed_out(&self) {
        self.timed_out.store(true, Ordering::SeqCst);
    }

    /// Whether a member's wait timed out.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// Marks the group failed by member `rank` (the first reason is kept).
    pub fn set(&self, rank: usize, why: &str) {
        let mut g = match self.reason.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        if g.is_none() {
            *g = Some(format!("member {rank} failed: {why}"));
        }
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// Why the group was aborted, if it was.
    pub fn reason(&self) -> Option<String> {
        if !self.aborted.load(Ordering::SeqCst) {
            return None;
        }
        match self.reason.lock() {
            Ok(g) => g.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }
}

/// Waits until `done()` says that member `rank`'s collective has finished on its device,
/// by polling it (NCCL's own wait would block for ever on a member that never arrives).
/// Fails when `abort` is set (another member failed: its call will never come), after
/// `timeout` ([`model::dist::TIMED_OUT`]: a member that stopped), or with `done`'s error.
pub fn await_collective(
    rank: usize,
    mut done: impl FnMut() -> std::result::Result<bool, String>,
    abort: &GroupAbort,
    timeout: Duration,
) -> candle_core::Result<()> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => candle_core::bail!("NCCL all-reduce: {e}"),
        }
        if let Some(why) = abort.reason() {
            candle_core::bail!("NCCL all-reduce: the group was aborted ({why})")
        }
        let waited = start.elapsed();
        if waited >= timeout {
            abort.set_timed_out();
            candle_core::bail!(
                "NCCL all-reduce: {}: member {rank} waited {:.1} s for the others",
                model::dist::TIMED_OUT,
                waited.as_secs_f64()
            )
        }
        // a gradient all-reduce takes milliseconds: spin briefly, then sleep in steps
        // far below that
        polls += 1;
        if polls < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[cfg(feature = "cuda")]
fn nccl_group(members: usize, timeout: Duration) -> Result<Vec<(Box<dyn Collective>, Device)>> {
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
    let abort = Arc::new(GroupAbort::default());
    Ok(comms
        .into_iter()
        .zip(devices)
        .map(|(c, d)| {
            let m = nccl::NcclMember::new(c, abort.clone(), timeout);
            (Box::new(m) as Box<dyn Collective>, d)
        })
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(_members: usize, _timeout: Duration) -> Result<Vec<(Box<dyn Collective>, Device)>> {
    Err(anyhow!(
        "this dinod was built without the `cuda` feature (scripts/build-cuda.sh builds it)"
    ))
}

#[cfg(feature = "cuda")]
mod nccl {
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    pub use candle_core::cuda_backend::cudarc::driver::CudaStream;
    pub use candle_core::cuda_backend::cudarc::nccl::safe::Comm;
    use candle_core::cuda_backend::cudarc::nccl::safe::ReduceOp;
    use candle_core::op::BackpropOp;
    use candle_core::CudaStorage;
    use candle_core::{DType, Storage, Tensor};
    use model::dist::Collective;

    use super::GroupAbort;

    /// One GPU's NCCL communicator. NCCL communicators must not be used by two threads at
    /// once; the mutex serialises the calls, which is what makes sharing it sound.
    ///
    /// A call returns only once its collective has finished on the device, waited for by
    /// polling ([`super::await_collective`]) so that a member that fails (`abort`) or
    /// stops (`timeout`) fails the others' calls instead of blocking them in NCCL. The
    /// failed group is then dropped, and dropping a `Comm` is `ncclCommAbort`, which ends
    /// the collective still pending on the device.
    pub struct NcclMember {
        comm: Mutex<Option<Comm>>,
        rank: usize,
        world: usize,
        abort: Arc<GroupAbort>,
        timeout: Duration,
    }

    // SAFETY: the communicator is only touched under the mutex, and NCCL allows a
    // communicator to be used from any thread as long as calls do not overlap.
    unsafe impl Send for NcclMember {}
    unsafe impl Sync for NcclMember {}

    impl NcclMember {
        pub fn new(comm: Comm, abort: Arc<GroupAbort>, timeout: Duration) -> Self {
            let (rank, world) = (comm.rank(), comm.world_size());
            Self {
                comm: Mutex::new(Some(comm)),
                rank,
                world,
                abort,
                timeout,
            }
        }

        fn comm(&self) -> candle_core::Result<MutexGuard<'_, Option<Comm>>> {
            let g = self
                .comm
                .lock()
                .map_err(|_| candle_core::Error::Msg("NCCL: a member panicked".into()))?;
            if g.is_none() {
                candle_core::bail!("NCCL all-reduce: the communicator is gone");
            }
            Ok(g)
        }

        /// Waits for everything enqueued on `stream` so far (the collective just issued).
        fn finish(&self, stream: &CudaStream) -> candle_core::Result<()> {
            let ev = stream.record_event(None).map_err(|e| err("event", e))?;
            super::await_collective(
                self.rank,
                || ev.try_is_complete().map_err(|e| format!("{e:?}")),
                &self.abort,
                self.timeout,
            )
        }
    }

    impl Drop for NcclMember {
        fn drop(&mut self) {
            let comm = match self.comm.get_mut() {
                Ok(c) => c.take(),
                Err(e) => e.into_inner().take(),
            };
            // cudarc's `Comm` aborts itself when dropped and panics if NCCL reports an
            // error doing so (a communicator on a dead GPU): nothing is left to clean then
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(comm)));
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
        fn abort(&self, why: &str) {
            self.abort.set(self.rank, why)
        }
        fn timed_out(&self) -> bool {
            self.abort.timed_out()
        }
        fn all_reduce_sum(&self, v: &mut [f64]) -> candle_core::Result<()> {
            let g = self.comm()?;
            let comm = g.as_ref().expect("checked by comm()");
            let stream = comm.stream();
            let mut d = stream.clone_htod(v).map_err(|e| err("upload", e))?;
            comm.all_reduce_in_place(&mut d, &ReduceOp::Sum)
                .map_err(|e| err("reduce", e.0))?;
            self.finish(&stream)?;
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
            let g = self.comm()?;
            let comm = g.as_ref().expect("checked by comm()");
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
            self.finish(&stream)?;
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
        let timeout = Duration::from_secs_f64(rt.collective_timeout_s);
        *g = Some(Arc::new(group(kind, rt.data_parallel, timeout)?));
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
        let e = errs.swap_remove(root);
        if members.iter().any(|(c, _)| c.timed_out()) {
            return Err(CollectiveTimedOut(format!("{e:#}")).into());
        }
        return Err(e);
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
    /// How the members sum: `threads` (one process), `nccl` (GPUs of one process) or
    /// `tcp` (one member per process, `cluster`).
    pub transport: String,
    /// This process's member (0 unless the group spans processes).
    pub rank: usize,
    /// The fingerprint of this member's state after the steps (`engine::fingerprint`):
    /// equal fingerprints are bit-identical students and teachers.
    pub fingerprint: String,
}

/// A group whose members are processes, one member each (`dinod bench dp --listen` and
/// `--join`).
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// Coordinator or worker.
    pub role: ClusterRole,
    /// The shared token file.
    pub token_file: std::path::PathBuf,
    /// How long the coordinator waits for every node, and a worker for the coordinator.
    pub join_wait: Duration,
    /// A worker's address for the other workers' links in a mesh (`--mesh-listen`,
    /// `--mesh-advertise`).
    pub mesh: crate::cluster::MeshAddr,
}

/// Which side of the rendezvous this process is.
#[derive(Clone, Debug)]
pub enum ClusterRole {
    /// Rank 0: listens on `addr` for `nodes - 1` workers.
    Listen {
        /// `HOST:PORT` (port 0 picks one; the address is printed).
        addr: String,
        /// Processes in the group, this one included.
        nodes: usize,
        /// How the group sums.
        reduce: crate::cluster::Reduce,
    },
    /// A worker: joins the coordinator at `addr`.
    Join {
        /// The coordinator's `HOST:PORT`.
        addr: String,
    },
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
    /// One member per process, over TCP, instead of `members` in this process.
    pub cluster: Option<ClusterOpts>,
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
    if opts.cluster.is_none() {
        check_split(b, opts.members)?;
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
    let timeout = Duration::from_secs_f64(plan.config.runtime.collective_timeout_s);
    if let Some(c) = &opts.cluster {
        return bench_dp_cluster(plan, origin, opts, c, &batch, &fresh, &hp, timeout);
    }
    let group = group(&opts.device, opts.members, timeout)?;
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
    let median_ms = median(results[0].0.clone());
    let max_rel_vs_single = if opts.check {
        Some(vs_single(opts, &batch, &fresh, &hp, steps, &results[0].2)?)
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
        transport: if opts.device == "cpu" {
            "threads"
        } else {
            "nccl"
        }
        .into(),
        rank: 0,
        fingerprint: results[0].1.clone(),
    })
}

fn check_split(b: usize, members: usize) -> Result<()> {
    if !b.is_multiple_of(members) {
        bail!("the batch of {b} images does not split into {members} members");
    }
    if b / members < 2 {
        bail!(
            "{members} members would get {} image(s) each; KoLeo needs at least 2 per member",
            b / members
        );
    }
    Ok(())
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    if times.is_empty() {
        0.0
    } else {
        times[times.len() / 2]
    }
}

/// The largest difference of `got` (a member's student weights) from one member that
/// ran the same steps on the whole batch, relative to the largest weight.
fn vs_single(
    opts: &DpBenchOpts,
    batch: &model::Batch,
    fresh: &dyn Fn(&Device) -> Result<TrainState>,
    hp: &StepHparams,
    steps: usize,
    got: &[f64],
) -> Result<f64> {
    // (the device rank 0 computed on: `cuda` is `cuda:0`)
    let dev = crate::runtime::device(&opts.device)?;
    let mut st = fresh(&dev)?;
    let whole = batch.to_device(&dev)?;
    for _ in 0..steps {
        model::train_step(&mut st, &whole, hp).context("the one-member reference step")?;
    }
    let want = student_weights(&st)?;
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    Ok(diff / scale)
}

/// [`bench_dp`] with this process as one member of a group of processes
/// ([`crate::cluster`]): the coordinator admits the workers, every process steps on its
/// part of the batch, and the members' fingerprints are compared at the end.
#[allow(clippy::too_many_arguments)]
fn bench_dp_cluster(
    plan: &Plan,
    origin: &str,
    opts: &DpBenchOpts,
    c: &ClusterOpts,
    batch: &model::Batch,
    fresh: &dyn Fn(&Device) -> Result<TrainState>,
    hp: &StepHparams,
    timeout: Duration,
) -> Result<DpBench> {
    // one device per process; on a GPU the sums cross the hosts' links as on the CPU
    // (NCCL across processes is not built: docs/multi-node.md)
    let dev = crate::runtime::device(&opts.device)?;
    let b = plan.config.train.batch_size;
    let token = crate::cluster::Token::from_file(&c.token_file)?;
    // the batch override is part of what every node must agree on
    let me = crate::cluster::Identity {
        code_version: crate::engine::CODE_VERSION.to_string(),
        config_hash: blake3::hash(format!("{} batch {b}", plan.config_hash).as_bytes())
            .to_hex()
            .to_string(),
        device: opts.device.clone(),
    };
    let member = group_of_processes(c, &me, &token, timeout, &|nodes| check_split(b, nodes))?;
    let world = member.world();
    check_split(b, world)?;
    let steps = opts.warmup + opts.iters;
    let r = run_member(&member, &dev, batch, fresh, hp, steps, opts.warmup);
    let (times, fp, weights) = match r {
        Ok(r) => r,
        Err(e) => {
            member.abort(&format!("{e:#}"));
            return Err(e);
        }
    };
    let all = member
        .gather(&fp)
        .context("comparing the members' states at the end")?;
    let members_identical = all.iter().all(|f| *f == fp);
    let max_rel_vs_single = if opts.check && member.rank() == 0 {
        Some(vs_single(opts, batch, fresh, hp, steps, &weights)?)
    } else {
        None
    };
    let median_ms = median(times);
    Ok(DpBench {
        config: origin.to_string(),
        device: opts.device.clone(),
        members: world,
        batch_size: b,
        iters: opts.iters,
        median_ms,
        images_per_s: b as f64 / (median_ms / 1e3).max(1e-12),
        members_identical,
        max_rel_vs_single,
        transport: "tcp".into(),
        rank: member.rank(),
        fingerprint: fp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait of a device member: it returns when the collective finishes, fails at
    /// once when another member aborts the group, fails after its timeout when nobody
    /// does, and passes the device's own error on (so that it is classified).
    #[test]
    fn a_device_member_stops_waiting_on_abort_timeout_or_error() {
        let abort = GroupAbort::default();
        let long = Duration::from_secs(60);
        // finishes after a few polls
        let mut polls = 0;
        await_collective(
            0,
            || {
                polls += 1;
                Ok(polls >= 100)
            },
            &abort,
            long,
        )
        .unwrap();
        assert_eq!(polls, 100);

        // another member fails while this one waits
        let t0 = Instant::now();
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                abort.set(1, "out of memory");
                abort.set(2, "a later failure");
            });
            await_collective(0, || Ok(false), &abort, long).unwrap_err()
        })
        .to_string();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(e.contains("group was aborted"), "{e}");
        assert!(e.contains("member 1 failed: out of memory"), "{e}");
        assert!(!e.contains("later"), "{e}");
        assert_eq!(
            abort.reason().as_deref(),
            Some("member 1 failed: out of memory")
        );

        // nobody arrives and nobody aborts
        let fresh = GroupAbort::default();
        let t0 = Instant::now();
        let e = await_collective(3, || Ok(false), &fresh, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert!(
            e.contains(model::dist::TIMED_OUT) && e.contains("member 3"),
            "{e}"
        );
        assert!(fresh.timed_out() && !abort.timed_out());

        // the device's error wins over waiting
        let e = await_collective(0, || Err("CUDA_ERROR_ILLEGAL_ADDRESS".into()), &fresh, long)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{e}");
    }
}

/// This process's member of the group `c` describes: rank 0 listening (after `check`
/// of the group's size), or a worker joining.
fn group_of_processes(
    c: &ClusterOpts,
    me: &crate::cluster::Identity,
    token: &crate::cluster::Token,
    timeout: Duration,
    check: &dyn Fn(usize) -> Result<()>,
) -> Result<crate::cluster::TcpMember> {
    match &c.role {
        ClusterRole::Listen {
            addr,
            nodes,
            reduce,
        } => {
            check(*nodes)?;
            crate::cluster::listen(
                addr,
                *nodes,
                me,
                token,
                c.join_wait,
                timeout,
                *reduce,
                |a| eprintln!("listening on {a} for {} more node(s)", nodes - 1),
            )
        }
        ClusterRole::Join { addr } => {
            crate::cluster::join(addr, me, token, c.join_wait, timeout, &c.mesh)
        }
    }
}

/// What `dinod bench allreduce` measured on one member.
#[derive(Clone, Debug, Serialize)]
pub struct AllReduceBench {
    /// This member's rank.
    pub rank: usize,
    /// Where its vector lives (`--device`): on a GPU the sum's time includes the copies
    /// to the host and back.
    pub device: String,
    /// Processes in the group.
    pub nodes: usize,
    /// `mesh` or `star`.
    pub reduce: String,
    /// f32 values per sum.
    pub values: usize,
    /// Timed sums.
    pub iters: usize,
    /// Median, fastest and slowest wall time of one sum on this member.
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// The vector's bytes over the median time (nccl-tests' "algbw"), GB/s.
    pub algbw_gb_s: f64,
    /// `algbw * 2 (nodes - 1) / nodes`: what each link would carry with an optimal
    /// algorithm (nccl-tests' "busbw"), GB/s.
    pub busbw_gb_s: f64,
    /// Bytes this process sent and received per timed sum (frames included).
    pub sent_bytes_per_sum: f64,
    pub received_bytes_per_sum: f64,
    /// This member's sums equal, bit for bit, the sum in rank order from zero in f64
    /// that it computes itself from every member's known vector.
    pub sums_correct: bool,
    /// Every member's sums were correct (gathered at the end).
    pub all_members_correct: bool,
}

/// Member `rank`'s vector in `dinod bench allreduce`: known to every member, so each can
/// check the sums.
fn allreduce_vector(rank: usize, values: usize) -> Vec<f32> {
    (0..values)
        .map(|i| {
            let x = ((i as u64 * 2_654_435_761 + rank as u64 * 40_503) % 65_521) as f32;
            x * 1e-4 - 3.0 + rank as f32 * 1e-3
        })
        .collect()
}

/// `dinod bench allreduce`: joins or forms a group of processes and times `iters` sums
/// of `values` f32 after `warmup` untimed ones, through [`Collective::all_reduce_sum_tensor`]
/// (the gradients' path). The workers take the three numbers from rank 0.
pub fn bench_allreduce(
    c: &ClusterOpts,
    device: &str,
    values: usize,
    warmup: usize,
    iters: usize,
) -> Result<AllReduceBench> {
    if values == 0 || iters == 0 {
        return Err(crate::cli::usage("--values and --iters must be positive"));
    }
    // (before joining: a node without its device fails alone)
    let dev = crate::runtime::device(device)?;
    let token = crate::cluster::Token::from_file(&c.token_file)?;
    let me = crate::cluster::Identity {
        code_version: crate::engine::CODE_VERSION.to_string(),
        config_hash: blake3::hash(b"dinod bench allreduce").to_hex().to_string(),
        device: device.to_string(),
    };
    let timeout = Duration::from_secs(300);
    let member = group_of_processes(c, &me, &token, timeout, &|_| Ok(()))?;
    let (rank, world) = (member.rank(), member.world());
    // the workers sum what rank 0 was told to
    let all = member
        .gather(&format!("{values} {warmup} {iters}"))
        .context("hearing rank 0's sums")?;
    let ask: Vec<usize> = all[0]
        .split(' ')
        .map(|x| x.parse())
        .collect::<std::result::Result<_, _>>()
        .context("rank 0's sums")?;
    let [values, warmup, iters] = ask[..] else {
        bail!("rank 0 asked for {:?}", all[0])
    };
    let want: Vec<u32> = {
        let all: Vec<Vec<f32>> = (0..world).map(|r| allreduce_vector(r, values)).collect();
        (0..values)
            .map(|i| {
                let s = all.iter().fold(0.0f64, |a, v| a + v[i] as f64);
                (s as f32).to_bits()
            })
            .collect()
    };
    let t =
        Tensor::from_vec(allreduce_vector(rank, values), values, &Device::Cpu)?.to_device(&dev)?;
    let mut times = vec![];
    let mut correct = true;
    let mut traffic0 = crate::cluster::traffic();
    for it in 0..warmup + iters {
        if it == warmup {
            traffic0 = crate::cluster::traffic();
        }
        let t0 = Instant::now();
        let s = member.all_reduce_sum_tensor(&t)?;
        // (the copy back onto a GPU is done when the device is)
        dev.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if it >= warmup {
            times.push(ms);
        }
        let got = s.to_vec1::<f32>()?;
        correct &= got.iter().zip(&want).all(|(g, w)| g.to_bits() == *w);
    }
    let traffic1 = crate::cluster::traffic();
    let all = member
        .gather(if correct { "correct" } else { "wrong" })
        .context("gathering the members' checks")?;
    let median = median(times.clone());
    let bytes = values as f64 * 4.0;
    let algbw = bytes / (median / 1e3) / 1e9;
    Ok(AllReduceBench {
        rank,
        device: device.to_string(),
        nodes: world,
        reduce: match member.reduce() {
            crate::cluster::Reduce::Mesh => "mesh",
            crate::cluster::Reduce::Star => "star",
        }
        .into(),
        values,
        iters,
        median_ms: median,
        min_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        max_ms: times.iter().cloned().fold(0.0, f64::max),
        algbw_gb_s: algbw,
        busbw_gb_s: algbw * 2.0 * (world - 1) as f64 / world as f64,
        sent_bytes_per_sum: (traffic1.0 - traffic0.0) as f64 / iters as f64,
        received_bytes_per_sum: (traffic1.1 - traffic0.1) as f64 / iters as f64,
        sums_correct: correct,
        all_members_correct: all.iter().all(|s| s == "correct"),
    })
}
