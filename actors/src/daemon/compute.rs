//! The compute actors. Each owns a dedicated OS thread; the tensors live in the shared
//! [`crate::engine::Engine`].
//! - `teacher`: EMA-teacher forward, heads and Sinkhorn-Knopp targets; Gram-teacher
//!   features.
//! - `trainer`: student forward, losses, backward, clipping; holds the gradients of the
//!   uncommitted step until the coordinator commits (AdamW) or discards it.
//! - `ema`: moves the teacher toward the student after a commit.

use std::sync::Arc;

use anyhow::{bail, Result};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use super::board::ActorPhase;
use super::loader::LoadedBatch;
use super::worker::Worker;
use super::Ctx;
use model::dist::Collective;
use model::optim::{ClipStat, OptimHparams};
use model::ssl::{LossTerms, ModelGrads};
use model::{StepHparams, TeacherOutput};

/// Name of the teacher actor.
pub const TEACHER: &str = "teacher";
/// Name of the trainer actor of the (single) student.
pub const TRAINER: &str = "trainer";
/// Name of the EMA actor.
pub const EMA: &str = "ema";

/// A device error raised by a compute actor, classified.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum DeviceFault {
    /// The device can be used again after restarting the actor.
    Recoverable(String),
    /// The context is unusable: checkpoint and exit so the process is restarted.
    Lost(String),
}

/// CUDA driver errors after which the context cannot be used again (sticky errors, a
/// device that is gone): the process must be restarted.
const CONTEXT_LOST: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_NO_DEVICE",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_DEINITIALIZED",
    "CUDA_ERROR_SYSTEM_NOT_READY",
    "CUDA_ERROR_UNKNOWN",
    "CUBLAS_STATUS_EXECUTION_FAILED",
];

/// Classifies an error message of the compute path: a CUDA / cuBLAS error whose context
/// survives (out of memory, a bad launch configuration) or a failed NCCL collective is
/// recoverable by restarting the actor; a sticky error or a vanished device loses the
/// context. `None`: not a device
/// error (a bug or bad data: the ordinary restart policy handles it).
pub fn classify_device_error(msg: &str) -> Option<DeviceFault> {
    if CONTEXT_LOST.iter().any(|c| msg.contains(c)) {
        return Some(DeviceFault::Lost(msg.to_string()));
    }
    if msg.contains("CUDA_ERROR_") || msg.contains("CUBLAS_STATUS_") || msg.contains("cuda error") {
        return Some(DeviceFault::Recoverable(msg.to_string()));
    }
    // a failed NCCL collective (a peer's CUDA error, a lost connection): the failed group
    // is dropped and the restarted actor builds a fresh one; if the context itself is
    // gone, the next CUDA call says so with a context-losing error
    if NCCL_FAILED.iter().any(|c| msg.contains(c)) {
        return Some(DeviceFault::Recoverable(msg.to_string()));
    }
    None
}

/// NCCL results that fail a collective (`ncclResult_t`, as cudarc prints them).
const NCCL_FAILED: &[&str] = &[
    "ncclUnhandledCudaError",
    "ncclSystemError",
    "ncclInternalError",
    "ncclRemoteError",
];

/// The device fault an error carries: injected ([`DeviceFaultError`]) or a real CUDA
/// error recognised by [`classify_device_error`].
pub fn device_fault(e: &anyhow::Error) -> Option<DeviceFault> {
    if let Some(DeviceFaultError(f)) = e.downcast_ref::<DeviceFaultError>() {
        return Some(f.clone());
    }
    // a member that stopped answering (its GPU hung, a stall): the others gave up
    // waiting; the group is dropped (NCCL: aborted) and the step redone on a fresh one
    if e.downcast_ref::<crate::dp::CollectiveTimedOut>().is_some()
        || e.downcast_ref::<crate::cluster::GroupFailed>().is_some()
    {
        return Some(DeviceFault::Recoverable(format!("{e:#}")));
    }
    classify_device_error(&format!("{e:#}"))
}

/// The device fault of a failed compute result, a lost context marked on the device
/// health first (the coordinator must see the loss before the caller replies). The caller
/// then fails its actor with [`DeviceFaultError`] so that the supervisor classifies it.
pub fn note_device_fault<T>(ctx: &Ctx, r: &Result<T>) -> Option<DeviceFault> {
    let fault = r.as_ref().err().and_then(device_fault);
    if let Some(DeviceFault::Lost(m)) = &fault {
        ctx.device.mark_lost(m, None);
    }
    fault
}

/// Fails with a recoverable device error if a `device_error` fault is armed for `actor`
/// at `step` (the trainer, or a distillation student).
pub fn injected_device_error(faults: &super::faults::Faults, actor: &str, step: u64) -> Result<()> {
    if faults.take("device_error", Some(actor), step).is_some() {
        bail!(DeviceFaultError(DeviceFault::Recoverable(format!(
            "injected device error at step {step}"
        ))));
    }
    Ok(())
}

/// The faults of member `r` (> 0) of a data-parallel group at `step`: `slow:member:R`
/// holds it back (a GPU that stalls while the others wait in the all-reduce; longer than
/// `runtime.collective_timeout_s`, the collective times out); `device_error:member:R`
/// fails it with a recoverable device error (one GPU of the group failing while the
/// others are in the step). Rank 0 is the actor's own (`device_error:ACTOR`).
pub fn injected_member_fault(faults: &super::faults::Faults, r: usize, step: u64) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    let member = format!("member:{r}");
    faults.maybe_slow(&member, step);
    if faults.take("device_error", Some(&member), step).is_some() {
        bail!(DeviceFaultError(DeviceFault::Recoverable(format!(
            "injected device error in data-parallel member {r} at step {step}"
        ))));
    }
    Ok(())
}

/// Teacher messages.
pub enum TeacherMsg {
    /// Compute the targets of a batch.
    Targets {
        step: u64,
        batch: Arc<LoadedBatch>,
        hp: StepHparams,
        /// One output per data-parallel member, rank 0 first (one without).
        reply: RpcReplyPort<Result<Vec<TeacherOutput>, String>>,
    },
}

/// The teacher actor.
pub struct TeacherActor;

/// State of a compute actor: the context and its thread.
pub struct ComputeState {
    ctx: Arc<Ctx>,
    worker: Worker,
    pending: Option<Pending>,
}

/// The uncommitted step of the trainer.
pub struct Pending {
    step: u64,
    grads: ModelGrads,
}

impl Actor for TeacherActor {
    type Msg = TeacherMsg;
    type State = ComputeState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(TEACHER, "teacher");
        Ok(ComputeState {
            worker: Worker::spawn("dinod-teacher")?,
            ctx,
            pending: None,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let TeacherMsg::Targets {
            step,
            batch,
            hp,
            reply,
        } = msg;
        st.ctx.board.handled(TEACHER);
        st.ctx.faults.maybe_panic(TEACHER, step);
        st.ctx.board.phase(TEACHER, ActorPhase::Step);
        let ctx = st.ctx.clone();
        let r = st
            .worker
            .run(move || -> Result<Vec<TeacherOutput>> {
                ctx.faults.maybe_slow(TEACHER, step);
                // admitting the workers can take minutes: not under the engine's lock,
                // which `dinod status` and the checkpointer need meanwhile
                // (a group formed short admits a worker that is back here, at a step's
                // start: runtime.cluster.min_nodes)
                let cluster = ctx.cluster.group(ctx.plan(), &ctx.board, true);
                let news = ctx.cluster.take_news();
                if !news.is_empty() {
                    // (the run's device line counts the processes)
                    let (device, _) = super::coordinator::device_line(&ctx);
                    ctx.board.run(|r| r.device = device);
                }
                for n in news {
                    let level = if n.warn {
                        checkpoints::Level::Warn
                    } else {
                        checkpoints::Level::Info
                    };
                    ctx.event(
                        level,
                        n.kind,
                        Some(TEACHER),
                        Some(step),
                        n.message,
                        n.fields,
                    );
                }
                let cluster = cluster?;
                let eng = ctx.engine.lock();
                if eng.ts.step != step {
                    bail!(
                        "teacher asked for step {step} but the state is at step {}",
                        eng.ts.step
                    );
                }
                let dt = ctx.plan().config.precision.compute_dtype();
                if let Some(cm) = cluster {
                    // rank 0's own part loaded for a group of another size (one formed
                    // with runtime.cluster.min_nodes, or again with all): the step is
                    // redone on a batch loaded for this one, before any order, so the
                    // group stands
                    if let Some(p) = batch.part.filter(|p| p.world != cm.world()) {
                        bail!(
                            "batch {} was loaded for a group of {} nodes, and the group has {} now: the step is redone on a batch loaded for it",
                            batch.batch_index,
                            p.world,
                            cm.world()
                        )
                    }
                    // the workers get their parts of the batch and how their copies of
                    // the state follow; rank 0 computes its part here, Sinkhorn-Knopp
                    // over all
                    let ts: &model::TrainState = &eng.ts;
                    let r = (|| -> Result<Vec<TeacherOutput>> {
                        let cfg = (ctx.plan().config.runtime.cluster.as_ref())
                            .ok_or_else(|| anyhow::anyhow!("a group without [runtime.cluster]"))?;
                        super::remote::order_teacher_phase(
                            &ctx.cluster,
                            &cm,
                            ts,
                            ctx.engine.generation(),
                            cfg,
                            &batch,
                            &ctx.source,
                            ctx.plan(),
                            &hp,
                        )?;
                        ctx.cluster.publish(&ctx.board, cfg.worker_data);
                        let dev = ts.device();
                        let view = ts.phase_view(model::Side::Teacher, dt, &dev)?;
                        let shard = batch.part_for(0, cm.world())?;
                        Ok(vec![model::teacher_phase_in(
                            &view,
                            &shard,
                            &hp,
                            Some(&*cm),
                            &mut |_| {},
                        )?])
                    })();
                    return r
                        .map_err(|e| super::remote::group_error(&ctx.cluster, &ctx.board, &cm, e));
                }
                if let Some(members) = crate::dp::members(&ctx.group, ctx.plan())? {
                    // every member on its part of the batch, Sinkhorn-Knopp over all
                    let ts: &model::TrainState = &eng.ts;
                    let n = members.len();
                    let outs = crate::dp::on_members(&members, |r, comm, dev| {
                        let view = ts.phase_view(model::Side::Teacher, dt, dev)?;
                        let shard = batch.batch.shard(r, n)?.to_device(dev)?;
                        Ok(model::teacher_phase_in(
                            &view,
                            &shard,
                            &hp,
                            Some(comm),
                            &mut |_| {},
                        )?)
                    });
                    if outs.is_err() {
                        crate::dp::reset(&ctx.group);
                    }
                    return outs;
                }
                // mixed precision: the teachers are cast to `dt` (otherwise shared)
                let view = eng
                    .ts
                    .phase_view(model::Side::Teacher, dt, &eng.ts.device())?;
                drop(eng);
                Ok(vec![model::teacher_phase(
                    &view,
                    &batch.batch,
                    &hp,
                    &mut |_| {},
                )?])
            })
            .await?;
        st.ctx.board.phase(TEACHER, ActorPhase::Idle);
        let fault = note_device_fault(&st.ctx, &r);
        let _ = reply.send(r.map_err(|e| format!("{e:#}")));
        if let Some(f) = fault {
            // a device fault fails the actor: the supervisor classifies it
            return Err(Box::new(DeviceFaultError(f)));
        }
        Ok(())
    }
}

/// What the trainer reports for a computed (not yet committed) step.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StepSummary {
    /// The step.
    pub step: u64,
    /// Loss values.
    pub losses: LossTerms,
    /// Gradient norms before clipping (backbone, DINO head, iBOT head).
    pub norms: [f64; 3],
    /// Clipping applied (only meaningful when finite).
    pub clip: [ClipStat; 3],
    /// Every loss and norm finite.
    pub finite: bool,
}

/// Trainer messages.
pub enum TrainerMsg {
    /// Student forward/backward for a step, given the teacher's output.
    Compute {
        step: u64,
        batch: Arc<LoadedBatch>,
        hp: StepHparams,
        /// The teacher's outputs, one per data-parallel member.
        teacher: Vec<TeacherOutput>,
        reply: RpcReplyPort<Result<StepSummary, String>>,
    },
    /// Apply the pending step's gradients (AdamW). Marks the engine dirty until the EMA is done.
    Commit {
        step: u64,
        hp: StepHparams,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Drop the pending step.
    Discard { step: u64 },
}

/// The trainer actor (one per student).
pub struct TrainerActor;

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = ComputeState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(TRAINER, "trainer");
        Ok(ComputeState {
            worker: Worker::spawn("dinod-trainer")?,
            ctx,
            pending: None,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        st.ctx.board.handled(TRAINER);
        match msg {
            TrainerMsg::Compute {
                step,
                batch,
                hp,
                teacher,
                reply,
            } => {
                st.ctx.faults.maybe_panic(TRAINER, step);
                st.pending = None;
                st.ctx.board.phase(TRAINER, ActorPhase::Step);
                let ctx = st.ctx.clone();
                let r = st
                    .worker
                    .run(move || -> Result<(StepSummary, ModelGrads)> {
                        ctx.faults.maybe_slow(TRAINER, step);
                        injected_device_error(&ctx.faults, TRAINER, step)?;
                        if let Some(f) = ctx.faults.take("device_lost", Some(TRAINER), step) {
                            // `+MS`: the device stays away that long (probes fail)
                            let why = format!("injected loss of the device context at step {step}");
                            ctx.device.mark_lost(
                                &why,
                                (f.duration_ms > 0)
                                    .then(|| std::time::Duration::from_millis(f.duration_ms)),
                            );
                            bail!(DeviceFaultError(DeviceFault::Lost(why)));
                        }
                        // (before the engine's lock, as in the teacher)
                        let cluster = ctx.cluster.group(ctx.plan(), &ctx.board, false)?;
                        let eng = ctx.engine.lock();
                        if eng.ts.step != step {
                            bail!(
                                "trainer asked for step {step} but the state is at step {}",
                                eng.ts.step
                            );
                        }
                        let dt = ctx.plan().config.precision.compute_dtype();
                        let mut out = if let Some(cm) = cluster {
                            let Some(t) = teacher.into_iter().next() else {
                                bail!("no teacher output");
                            };
                            let ts: &model::TrainState = &eng.ts;
                            let r = (|| -> Result<model::StepOutcome> {
                                super::remote::order_student_phase(
                                    &cm,
                                    ts,
                                    ctx.engine.generation(),
                                    &hp,
                                )?;
                                let dev = ts.device();
                                let view = ts.phase_view(model::Side::Student, dt, &dev)?;
                                let shard = batch.part_for(0, cm.world())?;
                                // rank 0 ends with the group's mean gradient
                                let local =
                                    ctx.plan().config.runtime.cluster.as_ref().is_some_and(|c| {
                                        c.worker_data == crate::config::WorkerData::Local
                                    });
                                let over = super::remote::student_phase_over(
                                    &cm,
                                    &view,
                                    &shard,
                                    &hp,
                                    t,
                                    local.then_some(&[]),
                                )?;
                                super::remote::report_workers_bad_inputs(
                                    &ctx,
                                    step,
                                    batch.batch_index,
                                    &over.bad,
                                );
                                ctx.cluster.note_grad_wait(over.grad_wait);
                                // (the teacher phase's sums and this phase's, this step)
                                ctx.cluster.note_member_waits(&cm.take_waits());
                                Ok(over.out)
                            })();
                            r.map_err(|e| {
                                super::remote::group_error(&ctx.cluster, &ctx.board, &cm, e)
                            })?
                        } else if let Some(members) = crate::dp::members(&ctx.group, ctx.plan())? {
                            let n = members.len();
                            if teacher.len() != n {
                                bail!("{} teacher outputs for {n} members", teacher.len());
                            }
                            let slots: Vec<std::sync::Mutex<Option<TeacherOutput>>> = teacher
                                .into_iter()
                                .map(|t| std::sync::Mutex::new(Some(t)))
                                .collect();
                            let ts: &model::TrainState = &eng.ts;
                            let outs = crate::dp::on_members(&members, |r, comm, dev| {
                                injected_member_fault(&ctx.faults, r, step)?;
                                let t = slots[r]
                                    .lock()
                                    .map_err(|_| anyhow::anyhow!("slot lock poisoned"))?
                                    .take()
                                    .ok_or_else(|| anyhow::anyhow!("no teacher output"))?;
                                let view = ts.phase_view(model::Side::Student, dt, dev)?;
                                let shard = batch.batch.shard(r, n)?.to_device(dev)?;
                                let mut out =
                                    model::student_phase(&view, &shard, &hp, t, &mut |_| {})?;
                                // every member ends with the group's mean gradient
                                model::dist::all_reduce_mean_grads(
                                    comm,
                                    &mut out.grads,
                                    &view.student,
                                )?;
                                model::dist::all_reduce_mean_losses(comm, &mut out.losses)?;
                                Ok((r == 0).then_some(out))
                            });
                            match outs {
                                Ok(mut v) => v.swap_remove(0).expect("rank 0 reports"),
                                Err(e) => {
                                    crate::dp::reset(&ctx.group);
                                    return Err(e);
                                }
                            }
                        } else {
                            let Some(t) = teacher.into_iter().next() else {
                                bail!("no teacher output");
                            };
                            // mixed precision: the student is cast to `dt` (otherwise
                            // shared); its gradients are widened by AdamW
                            let view =
                                eng.ts
                                    .phase_view(model::Side::Student, dt, &eng.ts.device())?;
                            model::student_phase(&view, &batch.batch, &hp, t, &mut |_| {})?
                        };
                        if ctx.faults.take("nan", Some(TRAINER), step).is_some() {
                            out.losses.total = f64::NAN;
                        }
                        let clip = model::clip_gradients(&eng.ts.cfg, &out.grads)?;
                        let (norms, clip, finite_norms) = match clip {
                            Ok(c) => (c.map(|s| s.total_norm), c, true),
                            Err(n) => (n, [ClipStat::default(); 3], false),
                        };
                        let finite = finite_norms && out.losses.is_finite();
                        if finite {
                            // the workers' copies clip their (same) gradients by these
                            ctx.cluster.note_clip(step, clip.map(|c| c.coef));
                        }
                        Ok((
                            StepSummary {
                                step,
                                losses: out.losses,
                                norms,
                                clip,
                                finite,
                            },
                            out.grads,
                        ))
                    })
                    .await?;
                st.ctx.board.phase(TRAINER, ActorPhase::Idle);
                let lost = note_device_fault(&st.ctx, &r);
                match r {
                    Ok((summary, grads)) => {
                        if summary.finite {
                            st.pending = Some(Pending { step, grads });
                        }
                        let _ = reply.send(Ok(summary));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("{e:#}")));
                        if let Some(f) = lost {
                            // a device fault fails the actor: the supervisor classifies it
                            return Err(Box::new(DeviceFaultError(f)));
                        }
                    }
                }
            }
            TrainerMsg::Commit { step, hp, reply } => {
                let Some(p) = st.pending.take() else {
                    let _ = reply.send(Err(format!("no computed step {step} to commit")));
                    return Ok(());
                };
                if p.step != step {
                    let _ = reply.send(Err(format!("pending step {} is not {step}", p.step)));
                    return Ok(());
                }
                st.ctx.board.phase(TRAINER, ActorPhase::Step);
                let ctx = st.ctx.clone();
                let r = st
                    .worker
                    .run(move || -> Result<()> {
                        let mut eng = ctx.engine.lock();
                        eng.dirty = true;
                        let ts = &mut eng.ts;
                        let h = OptimHparams {
                            lr: hp.lr,
                            last_layer_lr: hp.last_layer_lr,
                            weight_decay: hp.weight_decay,
                        };
                        ts.optim.step(
                            &[
                                &ts.student.backbone.params,
                                &ts.student.dino_head.params,
                                &ts.student.ibot_head.params,
                            ],
                            &[&p.grads.backbone, &p.grads.dino_head, &p.grads.ibot_head],
                            &h,
                        )?;
                        ctx.cluster.note_adamw(step, &hp);
                        Ok(())
                    })
                    .await?;
                st.ctx.board.phase(TRAINER, ActorPhase::Idle);
                let _ = reply.send(r.map_err(|e| format!("{e:#}")));
            }
            TrainerMsg::Discard { step } => {
                if st.pending.as_ref().map(|p| p.step) == Some(step) {
                    st.pending = None;
                }
            }
        }
        Ok(())
    }
}

/// A device fault carried through `anyhow` and ractor errors.
#[derive(Debug, Clone)]
pub struct DeviceFaultError(pub DeviceFault);

impl std::fmt::Display for DeviceFaultError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            DeviceFault::Recoverable(m) => write!(f, "recoverable device error: {m}"),
            DeviceFault::Lost(m) => write!(f, "device context lost: {m}"),
        }
    }
}

impl std::error::Error for DeviceFaultError {}

/// An actor's error for ractor that keeps a device fault typed: a [`DeviceFaultError`]
/// inside `e` becomes the boxed error itself (anyhow's own boxing would hide it from
/// [`fault_of_actor_err`]); anything else is boxed as anyhow does.
pub fn actor_err(e: anyhow::Error) -> ActorProcessingErr {
    match e.downcast::<DeviceFaultError>() {
        Ok(f) => Box::new(f),
        Err(e) => e.into(),
    }
}

/// The device fault an actor failed with, as its supervisor sees it: the typed
/// [`DeviceFaultError`] the compute actors fail with, or an untyped error whose text
/// names a CUDA / cuBLAS error ([`classify_device_error`]). `None`: not a device fault.
pub fn fault_of_actor_err(err: &ActorProcessingErr) -> Option<DeviceFault> {
    match err.downcast_ref::<DeviceFaultError>() {
        Some(DeviceFaultError(f)) => Some(f.clone()),
        None => classify_device_error(&format!("{err:#}")),
    }
}

/// EMA messages.
pub enum EmaMsg {
    /// Move the teacher after the commit of `step`, then finish the commit (step + 1,
    /// cursor, clean).
    Update {
        step: u64,
        momentum: f64,
        cursor: serde_json::Value,
        reply: RpcReplyPort<Result<(), String>>,
    },
}

/// The EMA actor.
pub struct EmaActor;

impl Actor for EmaActor {
    type Msg = EmaMsg;
    type State = ComputeState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(EMA, "ema");
        Ok(ComputeState {
            worker: Worker::spawn("dinod-ema")?,
            ctx,
            pending: None,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let EmaMsg::Update {
            step,
            momentum,
            cursor,
            reply,
        } = msg;
        st.ctx.board.handled(EMA);
        st.ctx.faults.maybe_panic(EMA, step);
        st.ctx.board.phase(EMA, ActorPhase::Step);
        let ctx = st.ctx.clone();
        let r = st
            .worker
            .run(move || -> Result<()> {
                let mut eng = ctx.engine.lock();
                if !eng.dirty || eng.ts.step != step {
                    bail!(
                        "EMA for step {step} without a commit in progress (state at {}, dirty {})",
                        eng.ts.step,
                        eng.dirty
                    );
                }
                let ts = &mut eng.ts;
                model::optim::ema(
                    &ts.teacher.backbone.params,
                    &ts.student.backbone.params,
                    momentum,
                )?;
                model::optim::ema(
                    &ts.teacher.dino_head.params,
                    &ts.student.dino_head.params,
                    momentum,
                )?;
                model::optim::ema(
                    &ts.teacher.ibot_head.params,
                    &ts.student.ibot_head.params,
                    momentum,
                )?;
                ts.step += 1;
                ts.data_cursor = cursor;
                eng.dirty = false;
                ctx.cluster.note_ema(step, momentum);
                Ok(())
            })
            .await?;
        st.ctx.board.phase(EMA, ActorPhase::Idle);
        let _ = reply.send(r.map_err(|e| format!("{e:#}")));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_errors_are_classified() {
        // the messages as candle / cudarc print them
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert!(matches!(
            classify_device_error(oom),
            Some(DeviceFault::Recoverable(_))
        ));
        let sticky =
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")";
        assert!(matches!(
            classify_device_error(sticky),
            Some(DeviceFault::Lost(_))
        ));
        let gone = "cannot open CUDA device 0: DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")";
        assert!(matches!(
            classify_device_error(gone),
            Some(DeviceFault::Lost(_))
        ));
        assert!(matches!(
            classify_device_error("CUBLAS_STATUS_EXECUTION_FAILED"),
            Some(DeviceFault::Lost(_))
        ));
        assert!(matches!(
            classify_device_error("CUBLAS_STATUS_INVALID_VALUE in gemm"),
            Some(DeviceFault::Recoverable(_))
        ));
        // a failed NCCL collective: the actor restarts and the group is rebuilt
        assert!(matches!(
            classify_device_error(
                "data-parallel member 1: NCCL all-reduce: reduce: ncclRemoteError"
            ),
            Some(DeviceFault::Recoverable(_))
        ));
        assert!(matches!(
            classify_device_error("NCCL all-reduce: reduce: ncclUnhandledCudaError"),
            Some(DeviceFault::Recoverable(_))
        ));
        // a member gave up waiting for the others: restart, fresh group (known by its
        // type: the same words in an ordinary error are not a device fault)
        let msg = "data-parallel member 0: NCCL all-reduce: collective timed out: member 0 waited 300.0 s for the others";
        let e = anyhow::Error::new(crate::dp::CollectiveTimedOut(msg.into()));
        assert!(matches!(
            device_fault(&e.context("step 3")),
            Some(DeviceFault::Recoverable(_))
        ));
        assert_eq!(device_fault(&anyhow::anyhow!("{msg}")), None);
        // the device failed under the collective: the context is gone
        assert!(matches!(
            classify_device_error(
                "NCCL all-reduce: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")"
            ),
            Some(DeviceFault::Lost(_))
        ));
        // ordinary errors are not device faults
        assert_eq!(classify_device_error("shape mismatch in matmul"), None);
        assert_eq!(classify_device_error("corrupt JPEG"), None);
        // an injected fault keeps its class through anyhow
        let e = anyhow::Error::new(DeviceFaultError(DeviceFault::Lost("x".into())));
        assert_eq!(device_fault(&e), Some(DeviceFault::Lost("x".into())));
        let e = anyhow::anyhow!("step 3: {oom}");
        assert!(matches!(
            device_fault(&e),
            Some(DeviceFault::Recoverable(_))
        ));
    }
}
