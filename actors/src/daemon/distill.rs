//! Multi-student distillation: one frozen teacher, whose forward pass runs once per batch,
//! and one trainer actor per student.
//!
//! Students pull: student `s` asks the teacher actor for batch `k` (the next one it needs);
//! the teacher produces batches in order (data loader + teacher forward + Sinkhorn-Knopp)
//! and keeps the last few in memory, so every student sees the same teacher outputs. A
//! student may run at most `max_lag` batches ahead of the slowest, which bounds memory and
//! keeps a slow student from stalling the others beyond that queue. Each student has its
//! own state (student, EMA student, optimizer), its own checkpoints in
//! `STATE/students/NAME`, and fails alone: a panic or a NaN in one student restarts or
//! rolls back that student only; a student that fell behind the teacher's memory gets its
//! batches recomputed (the teacher is frozen, so they are identical).
//!
//! Data parallel (`runtime.data_parallel` > 1): the teacher actor runs every member on its
//! part of the batch (Sinkhorn-Knopp over the group) and keeps each part with its targets
//! on the member's device ([`Teaching::Parts`]); a student's step runs all members on
//! copies of its weights and applies the group's mean gradient to its one state. The
//! teacher and the students take turns on the group (`Ctx::group_turn`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use checkpoints::{Level, Store};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::json;

use super::board::{now_ms, ActorPhase};
use super::compute::{
    actor_err, injected_device_error, injected_member_fault, note_device_fault, DeviceFaultError,
};
use super::coordinator::{call, CoordMsg};
use super::loader::to_batch;
use super::worker::Worker;
use super::{Ctx, EXIT_DEVICE, EXIT_OK, EXIT_UNSAVED};
use crate::config::{Plan, StudentPlan};
use crate::engine::{self, Engine, EngineState};
use model::ssl::SslModel;
use model::{StepHparams, TeacherOutput, TrainState};

/// Name of the distillation teacher actor.
pub const TEACHER: &str = "teacher";

/// One student's run: its plan, state and store.
pub struct StudentRun {
    /// Name.
    pub name: String,
    /// The run plan with this student's model config (for snapshots and restores).
    pub plan: Plan,
    /// The student's schedule and EMA momentum.
    pub sp: StudentPlan,
    /// Its training state (student, EMA student, optimizer).
    pub engine: Engine,
    /// Its checkpoints.
    pub store: Arc<Store>,
    /// The batch index it needs next.
    pub next_batch: AtomicU64,
    /// Reached the target step (or stopped).
    pub done: AtomicBool,
}

impl StudentRun {
    /// Actor name.
    pub fn actor(&self) -> String {
        format!("student:{}", self.name)
    }
}

/// The batch index a student's state wants next.
pub fn next_batch_of(ts: &TrainState) -> u64 {
    ts.data_cursor
        .get("batch")
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// The plan of one student.
pub fn student_plan(plan: &Plan, sp: &StudentPlan) -> Plan {
    let mut p = plan.clone();
    p.ssl = sp.ssl.clone();
    p.lr = sp.lr.clone();
    p.students = vec![];
    p
}

/// Records in the run's event log (`dinod events`) each checkpoint of student `name` that
/// a load skipped because it did not verify (the student's own store logs it too, where
/// nobody looks).
fn report_fallbacks(log: &Store, name: &str, skipped: &[(u64, checkpoints::Problem)], loaded: u64) {
    for (step, problem) in skipped {
        let e = checkpoints::Event::new(
            Level::Warn,
            checkpoints::event_kind::FALLBACK,
            format!(
                "student {name}: checkpoint step {step} is invalid ({problem}); resumed from step {loaded}"
            ),
        )
        .actor(format!("student:{name}"))
        .step(*step)
        .fields(json!({"step": step, "problem": problem.to_string(), "resumed_from": loaded}));
        if let Err(err) = log.append_event(&e) {
            tracing::error!("cannot record a student's checkpoint fallback: {err}");
        }
    }
}

/// Opens (or resumes) every student of a distillation run; `log` is the run's store, whose
/// event log hears about student checkpoints skipped as invalid.
pub fn open_students(
    plan: &Plan,
    state_dir: &Path,
    faults: Arc<super::faults::Faults>,
    log: &Store,
) -> Result<Vec<Arc<StudentRun>>> {
    let mut out = vec![];
    for sp in &plan.students {
        let p = student_plan(plan, sp);
        let dir = state_dir.join("students").join(&sp.name);
        let store = Arc::new(super::open_store(&dir, &p, Some(faults.clone()))?);
        let st = match store.load_latest_valid()? {
            Some(ck) => {
                report_fallbacks(log, &sp.name, &ck.skipped, ck.manifest.step);
                engine::restore(ck, &p).with_context(|| format!("student {}", sp.name))?
            }
            None => {
                let ts = engine::place(
                    TrainState::new(&sp.ssl, sp.seed, plan.config.precision.dtype())?,
                    &p,
                )?;
                let mut st = EngineState {
                    ts,
                    dirty: false,
                    stage: json!({"stage": "distill"}),
                    counters: json!({}),
                };
                st.ts.data_cursor = json!({"batch": 0});
                st
            }
        };
        let next = next_batch_of(&st.ts);
        out.push(Arc::new(StudentRun {
            name: sp.name.clone(),
            plan: p,
            sp: sp.clone(),
            engine: Engine::new(st),
            store,
            next_batch: AtomicU64::new(next),
            done: AtomicBool::new(false),
        }));
    }
    Ok(out)
}

/// Loads the frozen teacher named by `[distill] teacher`.
pub fn load_teacher(plan: &Plan, spec: &str) -> Result<SslModel> {
    let dtype = plan.config.precision.dtype();
    let (mut blobs, _) = crate::weights::read_weights(spec, &plan.ssl.backbone)?;
    let m = engine::model_from_blobs(&plan.ssl, dtype, |n| blobs.take(n)).context(
        "building the teacher (a safetensors teacher needs its heads: dinod export --with-heads)",
    )?;
    // frozen: it computes in the compute type (bf16 under mixed precision), on the device
    let dev = crate::runtime::device(&plan.config.runtime.device)?;
    Ok(m.cast(plan.config.precision.compute_dtype())?
        .to_device(&dev)?)
}

/// A batch with the teacher's outputs, shared by every student.
pub struct Item {
    /// Batch index.
    pub index: u64,
    /// The batch and the teacher's targets.
    pub teacher: Teaching,
}

/// A batch and the teacher's targets for it, as the students will consume them.
pub enum Teaching {
    /// The whole batch and its targets, on the run's device.
    Whole(model::Batch, TeacherOutput),
    /// Data parallel: member `r`'s part of the batch (`Batch::shard`) and its targets, on
    /// member `r`'s device, Sinkhorn-Knopp normalised over the whole batch.
    Parts(Vec<(model::Batch, TeacherOutput)>),
}

/// A student's own copy of the teacher outputs (tensors share storage).
pub fn teacher_copy(t: &TeacherOutput) -> TeacherOutput {
    let x = &t.targets;
    TeacherOutput {
        targets: model::ssl::TeacherTargets {
            cls: x.cls.clone(),
            dino_logits: x.dino_logits.clone(),
            dino_probs: x.dino_probs.clone(),
            ibot_logits: x.ibot_logits.clone(),
            ibot_probs: x.ibot_probs.clone(),
        },
        gram_target: t.gram_target.clone(),
    }
}

/// Distillation teacher messages.
pub enum DTeacherMsg {
    /// The batch with this index and its teacher outputs; `None` while the asking student
    /// is too far ahead of the slowest one.
    Get {
        index: u64,
        reply: RpcReplyPort<Result<Option<Arc<Item>>, String>>,
    },
}

/// The distillation teacher actor.
pub struct DistillTeacherActor;

struct Producer {
    loader: Option<data::Loader>,
    produced: u64,
    ring: BTreeMap<u64, Arc<Item>>,
}

/// Its state.
pub struct DTeacherState {
    ctx: Arc<Ctx>,
    worker: Worker,
    prod: Arc<Mutex<Producer>>,
}

fn cursor_at(ctx: &Ctx, index: u64) -> data::Cursor {
    let b = ctx.plan.config.train.batch_size as u64;
    let len = ctx.source.len();
    let mut c = data::Cursor::default();
    for _ in 0..index {
        c = c.after_batch(b, len);
    }
    c
}

fn open_at(ctx: &Ctx, index: u64) -> Result<data::Loader> {
    let cfg = &ctx.plan.config;
    let opts = data::LoaderOptions::from_config(&cfg.data, cfg.train.batch_size, cfg.seed);
    Ok(data::Loader::new(
        ctx.source.clone(),
        opts,
        cursor_at(ctx, index),
    )?)
}

/// The frozen teacher on every member's device: the run's own where a member shares its
/// device (every member on the CPU), a copy elsewhere (one GPU per member).
fn replicas(ctx: &Ctx, members: &crate::dp::Members) -> Result<Vec<Arc<SslModel>>> {
    let teacher = ctx.frozen_teacher.as_ref().context("no frozen teacher")?;
    let mut r = ctx
        .frozen_replicas
        .lock()
        .map_err(|_| anyhow::anyhow!("the replica lock is poisoned"))?;
    if r.len() != members.len() {
        let home = crate::runtime::device(&ctx.plan.config.runtime.device)?;
        *r = members
            .iter()
            .map(|(_, dev)| -> Result<Arc<SslModel>> {
                Ok(if dev.same_device(&home) {
                    teacher.clone()
                } else {
                    Arc::new(teacher.to_device(dev)?)
                })
            })
            .collect::<Result<_>>()?;
    }
    Ok(r.clone())
}

/// Runs `f` on every member of `members`, alone on the group: the teacher and the
/// students take turns, since their collectives must not interleave. A failed group is
/// dropped (the next step builds a fresh one).
fn group_step<T: Send>(
    ctx: &Ctx,
    members: &crate::dp::Members,
    f: impl Fn(usize, &dyn model::dist::Collective, &candle_core::Device) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let _turn = ctx
        .group_turn
        .lock()
        .map_err(|_| anyhow::anyhow!("the group turn lock is poisoned"))?;
    let out = crate::dp::on_members(members, f);
    if out.is_err() {
        crate::dp::reset(&ctx.group);
    }
    out
}

fn teacher_outputs(ctx: &Ctx, index: u64, h: &data::HostBatch) -> Result<Item> {
    // an error that restarts nothing (as an NCCL internal error would be): the students
    // wait and ask for the batch again
    if ctx.faults.take("error", Some(TEACHER), index).is_some() {
        bail!("injected error computing the teacher's targets of batch {index}");
    }
    let teacher = ctx.frozen_teacher.as_ref().context("no frozen teacher")?;
    let batch = to_batch(
        h,
        ctx.plan.config.precision.compute_dtype(),
        false,
        &crate::runtime::device(&ctx.plan.config.runtime.device)?,
    )?;
    let hp = StepHparams {
        teacher_temp: ctx.plan.teacher_temp.at(index),
        ..ctx.plan.hparams(index)
    };
    let sk = ctx.plan.ssl.loss.sinkhorn_iterations;
    let out = match crate::dp::members(&ctx.group, &ctx.plan)? {
        // every member runs the teacher on its part: one teacher pass per image in all
        Some(members) => {
            let n = members.len();
            let teachers = replicas(ctx, &members)?;
            Teaching::Parts(group_step(ctx, &members, |r, comm, dev| {
                let part = batch.shard(r, n)?.to_device(dev)?;
                let out = model::distill_teacher_phase(&teachers[r], sk, &part, &hp, Some(comm))?;
                Ok((part, out))
            })?)
        }
        None => {
            let out = model::distill_teacher_phase(teacher, sk, &batch, &hp, None)?;
            Teaching::Whole(batch, out)
        }
    };
    Ok(Item {
        index,
        teacher: out,
    })
}

fn produce(ctx: &Ctx, prod: &mut Producer, index: u64) -> Result<Arc<Item>> {
    if let Some(it) = prod.ring.get(&index) {
        return Ok(it.clone());
    }
    if index < prod.produced {
        // fell out of memory: recompute (the teacher is frozen, the data keyed by position)
        let mut l = open_at(ctx, index)?;
        let h = l.next_batch()?;
        metrics::counter!("dinod_distill_recomputed_batches_total").increment(1);
        return Ok(Arc::new(teacher_outputs(ctx, index, &h)?));
    }
    if prod.loader.is_none() {
        prod.loader = Some(open_at(ctx, prod.produced)?);
    }
    let keep = ctx
        .plan
        .config
        .distill
        .as_ref()
        .map(|d| d.keep_batches)
        .unwrap_or(16) as u64;
    while prod.produced <= index {
        let h = prod.loader.as_mut().expect("opened above").next_batch()?;
        let i = prod.produced;
        // reported once, when first read (a recomputed batch meets them again)
        super::loader::report_bad_inputs(ctx, TEACHER, i, &h.bad_inputs);
        let item = match teacher_outputs(ctx, i, &h) {
            Ok(it) => Arc::new(it),
            Err(e) => {
                // the loader has moved past batch i: reopen it there next time, or batch
                // i + 1 would be produced as batch i
                prod.loader = None;
                return Err(e);
            }
        };
        prod.ring.insert(i, item);
        prod.produced += 1;
        while prod.ring.len() as u64 > keep {
            let first = *prod.ring.keys().next().expect("not empty");
            prod.ring.remove(&first);
        }
    }
    Ok(prod.ring.get(&index).expect("just produced").clone())
}

fn slowest(ctx: &Ctx) -> u64 {
    ctx.students
        .iter()
        .filter(|s| !s.done.load(Ordering::SeqCst))
        .map(|s| s.next_batch.load(Ordering::SeqCst))
        .min()
        .unwrap_or(u64::MAX)
}

impl Actor for DistillTeacherActor {
    type Msg = DTeacherMsg;
    type State = DTeacherState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(TEACHER, "teacher");
        let start = ctx
            .students
            .iter()
            .map(|s| s.next_batch.load(Ordering::SeqCst))
            .min()
            .unwrap_or(0);
        Ok(DTeacherState {
            worker: Worker::spawn("dinod-teacher")?,
            ctx,
            prod: Arc::new(Mutex::new(Producer {
                loader: None,
                produced: start,
                ring: BTreeMap::new(),
            })),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let DTeacherMsg::Get { index, reply } = msg;
        st.ctx.board.handled(TEACHER);
        let max_lag = st
            .ctx
            .plan
            .config
            .distill
            .as_ref()
            .map(|d| d.max_lag)
            .unwrap_or(4);
        if index > slowest(&st.ctx).saturating_add(max_lag) {
            let _ = reply.send(Ok(None));
            return Ok(());
        }
        st.ctx.faults.maybe_panic(TEACHER, index);
        if !st.ctx.plan.config.eval.sets.is_empty()
            && !st.ctx.teacher_probed.swap(true, Ordering::SeqCst)
        {
            // once per process, before the first batch: what the students are measured against
            st.ctx.board.phase(TEACHER, ActorPhase::Eval);
            let c = st.ctx.clone();
            match st.worker.run(move || probe_frozen_teacher(&c)).await? {
                Ok(ev) => {
                    st.ctx.board.run(|r| {
                        r.probes = json!({"of": "the frozen teacher", "metrics": ev.metrics, "ms": ev.ms})
                    });
                    super::evaluator::report_done(
                        &st.ctx,
                        TEACHER,
                        None,
                        "the frozen teacher: ",
                        &ev,
                    );
                }
                Err(e) => st.ctx.event(
                    Level::Warn,
                    "probe.failed",
                    Some(TEACHER),
                    None,
                    format!("probing the frozen teacher failed (distillation goes on): {e:#}"),
                    json!({}),
                ),
            }
        }
        st.ctx.board.phase(TEACHER, ActorPhase::Step);
        let ctx = st.ctx.clone();
        let prod = st.prod.clone();
        let r = st
            .worker
            .run(move || -> Result<Arc<Item>> {
                let mut p = prod
                    .lock()
                    .map_err(|_| anyhow::anyhow!("producer lock poisoned"))?;
                produce(&ctx, &mut p, index)
            })
            .await?;
        let produced = st.prod.lock().map(|p| p.produced).unwrap_or(0);
        st.ctx.board.phase(TEACHER, ActorPhase::Idle);
        st.ctx.board.run(|r| r.step = produced);
        let fault = note_device_fault(&st.ctx, &r);
        let _ = reply.send(r.map(Some).map_err(|e| format!("{e:#}")));
        match fault {
            // the supervisor classifies it: restart, or the device is lost (exit 75)
            Some(f) => Err(Box::new(DeviceFaultError(f))),
            None => Ok(()),
        }
    }
}

/// Student messages.
pub enum StudentMsg {
    /// Do the next step.
    Tick,
}

/// A student's trainer actor.
pub struct StudentActor;

/// Its state.
pub struct StudentState {
    ctx: Arc<Ctx>,
    run: Arc<StudentRun>,
    worker: Worker,
    retried: Option<u64>,
    losses: std::collections::VecDeque<f64>,
    step_ms: f64,
    last: Option<Instant>,
    /// The latest probes of this student's EMA: step and metrics (for `dinod status`).
    probes: Option<serde_json::Value>,
    /// When this student last saved (or started): `checkpoint.every_seconds`.
    last_save: Instant,
    /// Saves that failed since this student's last one that succeeded.
    failed_saves: Option<super::board::FailedSaves>,
}

/// Probes the frozen teacher (an f32 copy of its backbone on the probe device): the
/// reference the students' probes are read against.
fn probe_frozen_teacher(ctx: &Ctx) -> Result<super::evaluator::Evaluation> {
    let sets = super::evaluator::shared_sets(ctx)?;
    let teacher = ctx.frozen_teacher.as_ref().context("no frozen teacher")?;
    let vit = super::evaluator::probe_copy(&teacher.backbone, &ctx.plan.config.eval.device)?;
    super::evaluator::evaluate_or_on_host(&vit, &sets, &ctx.plan.config.eval, 0, None)
}

/// Probes student `run`'s EMA (what its checkpoints export) at `step`, on a copy on the
/// probe device, with the run's probe sets, and records the result in the student's
/// probe history.
fn probe_student(ctx: &Ctx, run: &StudentRun, step: u64) -> Result<super::evaluator::Evaluation> {
    let sets = super::evaluator::shared_sets(ctx)?;
    let vit = super::evaluator::probe_copy(
        &run.engine.lock().ts.teacher.backbone,
        &ctx.plan.config.eval.device,
    )?;
    let ev = super::evaluator::evaluate_or_on_host(&vit, &sets, &ctx.plan.config.eval, step, None)?;
    run.store.record_probe(
        step,
        "probes",
        &json!({"metrics": ev.metrics, "ms": ev.ms, "report": ev.report}),
    )?;
    if let Some(d) = ev.metrics.dense_miou {
        run.store.set_score(step, "dense", d)?;
    }
    Ok(ev)
}

fn save_student(run: &StudentRun) -> Result<checkpoints::SaveReport> {
    let eng = run.engine.lock();
    if eng.dirty {
        bail!("student {} is mid-commit", run.name);
    }
    let payload = engine::snapshot(&eng, &run.plan)?;
    drop(eng);
    Ok(run.store.save(&payload)?)
}

/// Records the outcome of a save of student `run` at `step` (a periodic one or its final
/// one): the event, the disk warning, and the streak of failed saves in `failed` that
/// `dinod status` shows. Returns whether it saved.
fn note_student_save(
    ctx: &Ctx,
    run: &StudentRun,
    step: u64,
    saved: Result<checkpoints::SaveReport>,
    final_: bool,
    failed: &mut Option<super::board::FailedSaves>,
) -> bool {
    let what = if final_ {
        "final checkpoint"
    } else {
        "checkpoint"
    };
    match saved {
        Ok(rep) => {
            ctx.event(
                Level::Info,
                "checkpoint.saved",
                Some(&run.actor()),
                Some(step),
                format!(
                    "student {} {what} at step {step}: {:.1} MB, {:.0} ms",
                    run.name,
                    rep.bytes as f64 / 1e6,
                    rep.durable().as_secs_f64() * 1e3
                ),
                json!({"bytes": rep.bytes, "final": final_}),
            );
            super::checkpointer::warn_if_disk_low(ctx, &run.actor(), step, &rep);
            *failed = None;
            true
        }
        Err(e) => {
            let error = super::checkpointer::save_error_text(&e);
            super::checkpointer::count_failed(failed, step, &error);
            let goes_on = if final_ { "" } else { " (training continues)" };
            ctx.event(
                Level::Error,
                "checkpoint.failed",
                Some(&run.actor()),
                Some(step),
                format!(
                    "student {} {what} at step {step} failed{goes_on}: {error}",
                    run.name
                ),
                json!({"final": final_}),
            );
            false
        }
    }
}

impl StudentState {
    fn hparams(&self, step: u64) -> StepHparams {
        let p = &self.run.plan;
        let lr = self.run.sp.lr.at(step);
        StepHparams {
            lr,
            last_layer_lr: if step < p.config.train.freeze_last_layer_steps {
                0.0
            } else {
                lr
            },
            weight_decay: p.config.train.weight_decay,
            momentum: self.run.sp.momentum,
            teacher_temp: p.teacher_temp.at(step),
            gram_weight: 0.0,
            local_dino_weight: 1.0,
        }
    }

    fn finish(&self, why: &str) {
        let run = &self.run;
        if run.done.load(Ordering::SeqCst) {
            return;
        }
        let step = run.engine.lock().ts.step;
        let mut failed = self.failed_saves.clone();
        if run.store.latest_step().ok().flatten() != Some(step)
            && !note_student_save(&self.ctx, run, step, save_student(run), true, &mut failed)
        {
            // the run's status says so, unless a device loss already set its own
            self.ctx.set_exit(EXIT_UNSAVED);
        }
        let fp = engine::fingerprint(&run.engine.lock().ts).ok();
        self.ctx.board.run(|r| {
            let entry = r
                .students
                .entry(run.name.clone())
                .or_insert_with(|| json!({}));
            entry["fingerprint"] = json!(fp);
            entry["failed_saves"] = json!(failed);
        });
        self.ctx.event(
            Level::Info,
            "student.done",
            Some(&run.actor()),
            Some(step),
            format!("student {} stopped at step {step}: {why}", run.name),
            json!({}),
        );
        // last: the coordinator ends the run once every student is done
        run.done.store(true, Ordering::SeqCst);
    }

    /// One step; returns whether to continue right away.
    async fn step(&mut self) -> Result<bool> {
        let ctx = self.ctx.clone();
        let run = self.run.clone();
        let name = run.actor();
        if ctx.stopping.load(Ordering::SeqCst) {
            self.finish("stop requested");
            return Ok(false);
        }
        if ctx.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Ok(true);
        }
        let (step, k, dirty) = {
            let e = run.engine.lock();
            (e.ts.step, next_batch_of(&e.ts), e.dirty)
        };
        if dirty {
            let ck = run.store.load_latest_valid()?;
            let st = match ck {
                Some(c) => {
                    report_fallbacks(&ctx.store, &run.name, &c.skipped, c.manifest.step);
                    engine::restore(c, &run.plan)?
                }
                None => bail!("student {} is torn and has no checkpoint", run.name),
            };
            let at = st.ts.step;
            run.next_batch
                .store(next_batch_of(&st.ts), Ordering::SeqCst);
            run.engine.replace(st);
            ctx.event(
                Level::Warn,
                "run.reloaded",
                Some(&name),
                Some(at),
                format!(
                    "student {} reloaded from its checkpoint at step {at}",
                    run.name
                ),
                json!({}),
            );
            return Ok(true);
        }
        run.next_batch.store(k, Ordering::SeqCst);
        if ctx.max_steps.is_some_and(|m| step >= m) {
            self.finish("reached the target step");
            return Ok(false);
        }
        ctx.faults.maybe_panic(&name, step);
        let item = match call(&ctx.board, TEACHER, move |reply| DTeacherMsg::Get {
            index: k,
            reply,
        })
        .await
        {
            Ok(Ok(Some(it))) => it,
            Ok(Ok(None)) => {
                // too far ahead of the slowest student: wait for it
                ctx.board.phase(&name, ActorPhase::Idle);
                tokio::time::sleep(Duration::from_millis(10)).await;
                return Ok(true);
            }
            Ok(Err(e)) | Err(e) => {
                ctx.event(
                    Level::Warn,
                    "step.redo",
                    Some(&name),
                    Some(step),
                    format!("student {} waits for the teacher: {e}", run.name),
                    json!({}),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(true);
            }
        };
        ctx.board.phase(&name, ActorPhase::Step);
        let hp = self.hparams(step);
        let (r2, c2, f2, x2) = (run.clone(), item.clone(), ctx.faults.clone(), ctx.clone());
        let nm = name.clone();
        let r = self
            .worker
            .run(move || -> Result<(model::ssl::LossTerms, [f64; 3], bool, Option<model::ssl::ModelGrads>)> {
                f2.maybe_slow(&nm, step);
                injected_device_error(&f2, &nm, step)?;
                let eng = r2.engine.lock();
                // mixed precision: the student computes on a cast of its master weights
                let dt = r2.plan.config.precision.compute_dtype();
                let mut out = match &c2.teacher {
                    Teaching::Whole(batch, t) => {
                        let view = eng.ts.phase_view(model::Side::Student, dt, &eng.ts.device())?;
                        model::distill_student_phase(&view, batch, &hp, teacher_copy(t), &mut |_| {})?
                    }
                    Teaching::Parts(parts) => {
                        // every member on its part, on a copy of this student's weights;
                        // all of them end with the group's mean gradient
                        let members = crate::dp::members(&x2.group, &x2.plan)?
                            .context("the batch was split for a data-parallel group, but there is none")?;
                        if parts.len() != members.len() {
                            bail!("{} parts of batch {k} for {} members", parts.len(), members.len());
                        }
                        let ts: &TrainState = &eng.ts;
                        let outs = group_step(&x2, &members, |r, comm, dev| {
                            injected_member_fault(&f2, r, step)?;
                            let (part, t) = &parts[r];
                            let view = ts.phase_view(model::Side::Student, dt, dev)?;
                            let mut out = model::distill_student_phase(&view, part, &hp, teacher_copy(t), &mut |_| {})?;
                            model::dist::all_reduce_mean_grads(comm, &mut out.grads, &view.student)?;
                            model::dist::all_reduce_mean_losses(comm, &mut out.losses)?;
                            Ok((r == 0).then_some(out))
                        })?;
                        outs.into_iter().next().flatten().context("member 0 reports the step")?
                    }
                };
                if f2.take("nan", Some(&nm), step).is_some() {
                    out.losses.total = f64::NAN;
                }
                let clip = model::clip_gradients(&eng.ts.cfg, &out.grads)?;
                Ok(match clip {
                    Ok(c) if out.losses.is_finite() => (out.losses, c.map(|s| s.total_norm), true, Some(out.grads)),
                    Ok(c) => (out.losses, c.map(|s| s.total_norm), false, None),
                    Err(n) => (out.losses, n, false, None),
                })
            })
            .await?;
        if let Some(f) = note_device_fault(&ctx, &r) {
            // the supervisor classifies it: this student restarts, or the device is lost
            return Err(DeviceFaultError(f).into());
        }
        let summary = r?;
        let (losses, norms, finite, grads) = summary;
        if !finite {
            if self.retried != Some(k) {
                self.retried = Some(k);
                ctx.event(Level::Warn, "step.discarded", Some(&name), Some(step), format!("student {}: step {step} not committed (losses {losses:?}); retrying it once", run.name), json!({}));
                return Ok(true);
            }
            let _ = run.store.quarantine_add(
                &format!("batch:{k}"),
                &json!({"step": step, "losses": format!("{losses:?}")}),
            );
            run.engine.lock().ts.data_cursor = json!({"batch": k + 1});
            ctx.event(
                Level::Warn,
                "step.quarantined",
                Some(&name),
                Some(step),
                format!(
                    "student {}: batch {k} skipped after a failed retry",
                    run.name
                ),
                json!({}),
            );
            return Ok(true);
        }
        let grads = grads.expect("finite steps carry gradients");
        let r3 = run.clone();
        self.worker
            .run(move || -> Result<()> {
                let mut eng = r3.engine.lock();
                eng.dirty = true;
                let ts = &mut eng.ts;
                let h = model::optim::OptimHparams {
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
                    &[&grads.backbone, &grads.dino_head, &grads.ibot_head],
                    &h,
                )?;
                model::optim::ema(
                    &ts.teacher.backbone.params,
                    &ts.student.backbone.params,
                    hp.momentum,
                )?;
                model::optim::ema(
                    &ts.teacher.dino_head.params,
                    &ts.student.dino_head.params,
                    hp.momentum,
                )?;
                model::optim::ema(
                    &ts.teacher.ibot_head.params,
                    &ts.student.ibot_head.params,
                    hp.momentum,
                )?;
                ts.step += 1;
                ts.data_cursor = json!({"batch": k + 1});
                eng.dirty = false;
                Ok(())
            })
            .await??;
        run.next_batch.store(k + 1, Ordering::SeqCst);
        // bookkeeping
        let now = Instant::now();
        if let Some(prev) = self.last {
            let ms = (now - prev).as_secs_f64() * 1e3;
            self.step_ms = if self.step_ms == 0.0 {
                ms
            } else {
                0.9 * self.step_ms + 0.1 * ms
            };
        }
        self.last = Some(now);
        self.losses.push_back(losses.total);
        if self.losses.len() > 50 {
            self.losses.pop_front();
        }
        let b = ctx.plan.config.train.batch_size as f64;
        let ips = if self.step_ms > 0.0 {
            b / (self.step_ms / 1e3)
        } else {
            0.0
        };
        let produced = ctx.board.run_status().step;
        let probes = self.probes.clone();
        let failed = self.failed_saves.clone();
        ctx.board.run(|r| {
            r.students.insert(run.name.clone(), json!({"step": step + 1, "batch": k + 1, "losses": losses, "grad_norms": norms, "images_per_s": ips, "step_ms": self.step_ms, "queue": produced.saturating_sub(k + 1), "probes": probes, "failed_saves": failed}));
            r.last_step_ms = now_ms();
        });
        metrics::gauge!("dinod_student_step", "student" => run.name.clone()).set((step + 1) as f64);
        metrics::gauge!("dinod_student_loss", "student" => run.name.clone()).set(losses.total);
        metrics::gauge!("dinod_last_step_timestamp_seconds").set(now_ms() as f64 / 1e3);
        let ev_cfg = &ctx.plan.config.eval;
        let evaluated = !ev_cfg.sets.is_empty()
            && ev_cfg.every_steps > 0
            && (step + 1) % ev_cfg.every_steps == 0;
        if evaluated {
            // the student's EMA, probed as the evaluator probes the teacher; a failed
            // evaluation is reported and training goes on
            ctx.board.phase(&name, ActorPhase::Eval);
            let (c5, r5) = (ctx.clone(), run.clone());
            match self
                .worker
                .run(move || probe_student(&c5, &r5, step + 1))
                .await?
            {
                Ok(ev) => {
                    let p = json!({"step": step + 1, "metrics": ev.metrics});
                    ctx.board.run(|r| {
                        if let Some(e) = r.students.get_mut(&run.name) {
                            e["probes"] = p.clone();
                        }
                    });
                    self.probes = Some(p);
                    super::evaluator::report_done(
                        &ctx,
                        &name,
                        Some(step + 1),
                        &format!("student {}: ", run.name),
                        &ev,
                    );
                }
                Err(e) => ctx.event(
                    Level::Warn,
                    "probe.failed",
                    Some(&name),
                    Some(step + 1),
                    format!(
                        "student {}: probes at step {} failed (training continues): {e:#}",
                        run.name,
                        step + 1
                    ),
                    json!({}),
                ),
            }
        }
        let ck = &ctx.plan.config.checkpoint;
        let timed = ck
            .every_seconds
            .is_some_and(|t| self.last_save.elapsed().as_secs_f64() >= t);
        // an evaluated step is saved too, as in a self-supervised run: the probe history
        // then names checkpoints (keep_best_dense keeps the best student)
        if (step + 1) % ck.every_steps == 0 || evaluated || timed {
            self.last_save = Instant::now();
            let r4 = run.clone();
            ctx.board.phase(&name, ActorPhase::Checkpoint);
            let saved = self.worker.run(move || save_student(&r4)).await?;
            note_student_save(&ctx, &run, step + 1, saved, false, &mut self.failed_saves);
        }
        if (step + 1) % ctx.plan.config.runtime.log_every_steps.max(1) == 0 {
            let _ = run.store.record_probe(
                step + 1,
                "train",
                &json!({"losses": losses, "lr": hp.lr, "grad_norms": norms}),
            );
            tracing::info!(student = %run.name, step = step + 1, loss = losses.total, images_per_s = ips, "student step");
        }
        ctx.board.phase(&name, ActorPhase::Idle);
        Ok(true)
    }
}

/// Arguments of a student actor.
pub type StudentArgs = (Arc<Ctx>, usize);

impl Actor for StudentActor {
    type Msg = StudentMsg;
    type State = StudentState;
    type Arguments = StudentArgs;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        (ctx, i): StudentArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let run = ctx.students[i].clone();
        ctx.board.register(&run.actor(), "trainer");
        // a restarted student keeps its streak of failed saves (the board outlives actors)
        let failed_saves = ctx
            .board
            .run_status()
            .students
            .get(&run.name)
            .and_then(|s| serde_json::from_value(s["failed_saves"].clone()).ok())
            .flatten();
        let _ = me.cast(StudentMsg::Tick);
        Ok(StudentState {
            worker: Worker::spawn(&format!("dinod-{}", run.name))?,
            ctx,
            retried: None,
            losses: Default::default(),
            step_ms: 0.0,
            last: None,
            last_save: Instant::now(),
            failed_saves,
            // the latest evaluation, possibly from an earlier process
            probes: run
                .store
                .latest_probes()
                .ok()
                .into_iter()
                .flatten()
                .find(|p| p.name == "probes")
                .map(|p| json!({"step": p.step, "metrics": p.value["metrics"]})),
            run,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let StudentMsg::Tick = msg;
        if st.run.done.load(Ordering::SeqCst) {
            return Ok(());
        }
        match st.step().await {
            Ok(true) => {
                let _ = me.cast(StudentMsg::Tick);
            }
            Ok(false) => {}
            Err(e) => return Err(actor_err(e)),
        }
        Ok(())
    }
}

/// The distillation coordinator: pause/resume/stop, completion, device loss.
pub struct DistillCoordinator;

/// Its state.
pub struct DCoordState {
    ctx: Arc<Ctx>,
    finished: bool,
}

impl Actor for DistillCoordinator {
    type Msg = CoordMsg;
    type State = DCoordState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(super::coordinator::NAME, "coordinator");
        let (device, batch_size) = super::coordinator::device_line(&ctx);
        ctx.board.run(|r| {
            r.pid = std::process::id();
            r.stage = "distill".into();
            r.max_steps = ctx.max_steps;
            r.device = device;
            r.batch_size = batch_size;
        });
        me.send_interval(Duration::from_millis(100), || CoordMsg::Tick);
        Ok(DCoordState {
            ctx,
            finished: false,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = st.ctx.clone();
        match msg {
            CoordMsg::Tick => {
                if !st.finished && ctx.students.iter().all(|s| s.done.load(Ordering::SeqCst)) {
                    st.finished = true;
                    let code = if ctx.stopping.load(Ordering::SeqCst) {
                        ctx.exit_code.load(Ordering::SeqCst)
                    } else {
                        EXIT_OK
                    };
                    // a student's refused final save (74) or a device loss set it first
                    ctx.set_exit(code);
                    let code = ctx.exit_code.load(Ordering::SeqCst);
                    ctx.event(
                        if code == EXIT_OK {
                            Level::Info
                        } else {
                            Level::Error
                        },
                        "run.stopped",
                        Some(super::coordinator::NAME),
                        None,
                        if code == EXIT_OK {
                            "every student stopped".to_string()
                        } else {
                            format!(
                                "every student stopped; exit status {code} (see the events before)"
                            )
                        },
                        json!({"exit_code": code}),
                    );
                    ctx.board.run(|r| r.stopping = None);
                    let _ = super::control::write_final_status(&ctx);
                    super::supervisor::send(super::supervisor::SupMsg::Shutdown);
                }
            }
            CoordMsg::Pause => {
                ctx.paused.store(true, Ordering::SeqCst);
                ctx.board.run(|r| r.paused = true);
                ctx.event(
                    Level::Info,
                    "run.paused",
                    Some(super::coordinator::NAME),
                    None,
                    "paused by the operator",
                    json!({}),
                );
            }
            CoordMsg::Resume => {
                ctx.paused.store(false, Ordering::SeqCst);
                ctx.board.run(|r| r.paused = false);
                ctx.event(
                    Level::Info,
                    "run.resumed",
                    Some(super::coordinator::NAME),
                    None,
                    "resumed by the operator",
                    json!({}),
                );
            }
            CoordMsg::Stop { reply } => {
                ctx.stopping.store(true, Ordering::SeqCst);
                let reason = ctx.board.run(|r| {
                    r.stopping
                        .get_or_insert_with(|| "stop requested: each student saves".into())
                        .clone()
                });
                super::notify::stopping(&format!("stopping ({reason})"));
                if let Some(r) = reply {
                    let _ = r.send("stopping".into());
                }
            }
            CoordMsg::DeviceLost(why) => {
                ctx.event(
                    Level::Error,
                    "device.lost",
                    None,
                    None,
                    format!("device context lost ({why})"),
                    json!({}),
                );
                ctx.exit_code.store(EXIT_DEVICE, Ordering::SeqCst);
                ctx.stopping.store(true, Ordering::SeqCst);
                ctx.board
                    .run(|r| r.stopping = Some(format!("device context lost ({why})")));
            }
            CoordMsg::Saved { .. } => {}
            CoordMsg::SetStage { reply, .. } => {
                let _ = reply.send(Err(
                    "this is a distillation run: it has no stages to set".into()
                ));
            }
        }
        Ok(())
    }
}

/// Per-batch cost of distilling `n` students from one teacher pass versus `n` separate
/// runs (`dinod bench distill`). `separate_ms`: the measured teacher + student step of
/// each student, summed; `teacher_plus_students_ms`: one teacher forward plus each
/// student's step as measured after a teacher forward (the bound);
/// `isolated_sum_ms`: the teacher and the students each timed alone (warm caches).
/// With `members > 1` it also times the step of all the students over a data-parallel
/// group (`cpu`: threads; `cuda`: GPUs 0..members-1 with NCCL), as the daemon runs it:
/// the teacher pass split over the members with group-wide Sinkhorn-Knopp, then each
/// student in turn over every member with the mean gradient (`group`).
pub fn bench(
    plan: &Plan,
    device: &str,
    precision: Option<&str>,
    warmup: usize,
    iters: usize,
    members: usize,
) -> Result<serde_json::Value> {
    let b = plan.config.train.batch_size;
    if members == 0 || (members > 1 && (!b.is_multiple_of(members) || b / members < 2)) {
        bail!("the batch of {b} images does not split into {members} members of at least 2 images (--batch-size)");
    }
    let (dev, dt) = crate::bench::bench_device(plan, device, precision)?;
    let master = plan.config.precision.dtype();
    // as the daemon holds them: the frozen teacher in the compute type, the students'
    // master weights in the recipe's type (each step computes on a cast of them)
    let teacher = SslModel::init(&plan.ssl, plan.config.seed, master)?
        .cast(dt)?
        .to_device(&dev)?;
    let students: Vec<TrainState> = plan
        .students
        .iter()
        .map(|s| TrainState::new(&s.ssl, s.seed, master)?.to_device(&dev))
        .collect::<candle_core::Result<_>>()?;
    let batch = crate::bench::synthetic_batch(plan, plan.config.seed)?
        .to_device(&dev)?
        .cast(dt)?;
    let hp = plan.hparams(1_000_000);
    let sk = plan.ssl.loss.sinkhorn_iterations;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut v = vec![];
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            f()?;
            ops::portable::synchronize(&dev)?;
            if i >= warmup {
                v.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        Ok(v[v.len() / 2])
    };
    let teacher_step = || model::distill_teacher_phase(&teacher, sk, &batch, &hp, None);
    let student_step = |s: &TrainState, t: &TeacherOutput| -> Result<()> {
        let view = s.phase_view(model::Side::Student, dt, &dev)?;
        let out = model::distill_student_phase(&view, &batch, &hp, teacher_copy(t), &mut |_| {})?;
        let _ = model::clip_gradients(&s.cfg, &out.grads)?;
        Ok(())
    };
    let teacher_ms = time(&mut || {
        teacher_step()?;
        Ok(())
    })?;
    let t = teacher_step()?;
    let mut student_ms = vec![];
    for s in &students {
        student_ms.push(time(&mut || student_step(s, &t))?);
    }
    // a separate run of student i: the teacher forward and that student, back to back
    let mut pair_ms = vec![];
    for s in &students {
        pair_ms.push(time(&mut || student_step(s, &teacher_step()?))?);
    }
    let mut rows = vec![];
    for n in 1..=students.len() {
        let shared = time(&mut || {
            let t = teacher_step()?;
            for s in &students[..n] {
                student_step(s, &t)?;
            }
            Ok(())
        })?;
        let separate: f64 = pair_ms[..n].iter().sum();
        // one teacher forward plus each student's step as it runs after a teacher forward
        let bound = separate - (n as f64 - 1.0) * teacher_ms;
        let isolated = teacher_ms + student_ms[..n].iter().sum::<f64>();
        rows.push(json!({"students": n, "shared_ms": shared, "separate_ms": separate, "teacher_plus_students_ms": bound, "isolated_sum_ms": isolated, "sharing_ratio": shared / separate, "overhead_vs_bound": shared / bound - 1.0}));
    }
    let group = if members > 1 {
        let shared_all = rows.last().and_then(|r| r["shared_ms"].as_f64());
        let ms = bench_group(
            plan, device, members, &teacher, &students, &batch, &hp, dt, &time,
        )?;
        Some(json!({
            "members": members,
            "all_students_ms": ms,
            "images_per_s": b as f64 / (ms / 1e3),
            "one_device_ms": shared_all,
            "speedup": shared_all.map(|one| one / ms),
        }))
    } else {
        None
    };
    let b = b as f64;
    Ok(json!({
        "group": group,
        "teacher_ms": teacher_ms,
        "students": plan.students.iter().zip(&student_ms).map(|(s, ms)| json!({"name": s.name, "step_ms": ms, "images_per_s": b / (ms / 1e3), "params": students.iter().find(|x| x.cfg == s.ssl).map(|x| x.student.numel())})).collect::<Vec<_>>(),
        "rows": rows,
        "device": device,
        "dtype": format!("{dt:?}"),
        "master_dtype": format!("{master:?}"),
        "threads": rayon::current_num_threads(),
    }))
}

/// Times a closure: the median wall time in ms of [`bench`]'s iterations.
type Timer<'a> = &'a dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<f64>;

/// The median time of one distillation batch over a group of `members` ([`bench`]).
#[allow(clippy::too_many_arguments)]
fn bench_group(
    plan: &Plan,
    device: &str,
    members: usize,
    teacher: &SslModel,
    students: &[TrainState],
    batch: &model::Batch,
    hp: &StepHparams,
    dt: candle_core::DType,
    time: Timer<'_>,
) -> Result<f64> {
    let kind = if device == "cpu" { "cpu" } else { "cuda" };
    let timeout = Duration::from_secs_f64(plan.config.runtime.collective_timeout_s);
    let group = crate::dp::group(kind, members, timeout)?;
    let sk = plan.ssl.loss.sinkhorn_iterations;
    // each member's copy of the frozen teacher and its part of the batch, on its device
    let teachers: Vec<SslModel> = group
        .iter()
        .map(|(_, d)| teacher.to_device(d))
        .collect::<candle_core::Result<_>>()?;
    let parts: Vec<model::Batch> = group
        .iter()
        .enumerate()
        .map(|(r, (_, d))| batch.shard(r, members)?.to_device(d))
        .collect::<candle_core::Result<_>>()?;
    time(&mut || {
        let targets = crate::dp::on_members(&group, |r, comm, _| {
            Ok(model::distill_teacher_phase(
                &teachers[r],
                sk,
                &parts[r],
                hp,
                Some(comm),
            )?)
        })?;
        for s in students {
            crate::dp::on_members(&group, |r, comm, dev| {
                let view = s.phase_view(model::Side::Student, dt, dev)?;
                let mut out = model::distill_student_phase(
                    &view,
                    &parts[r],
                    hp,
                    teacher_copy(&targets[r]),
                    &mut |_| {},
                )?;
                model::dist::all_reduce_mean_grads(comm, &mut out.grads, &view.student)?;
                model::dist::all_reduce_mean_losses(comm, &mut out.losses)?;
                if r == 0 {
                    let _ = model::clip_gradients(&s.cfg, &out.grads)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })
}
