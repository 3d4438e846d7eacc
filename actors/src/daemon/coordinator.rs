//! The coordinator drives the step protocol and owns the run's policies:
//!
//! ```text
//! data_loader --batch--> teacher --targets--> trainer --summary--> coordinator
//! coordinator: finite and no spike? --commit--> trainer (AdamW) --> ema (teacher, step+1)
//!                                  --discard-> retry once, then quarantine the batch;
//!                                              K bad steps in a window: roll back
//! every N steps: snapshot (host copy) --> checkpointer (async IO)
//! ```
//! A step is a transaction: nothing observable changes before the commit, and a failure
//! of any actor before the commit simply redoes the step. A failure during the commit
//! (dirty state) reloads the last checkpoint; replaying from there is bit-exact.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoints::Level;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::json;

use super::board::{now_ms, ActorPhase};
use super::checkpointer::{self, CkptMsg, SaveOutcome};
use super::compute::{EmaMsg, StepSummary, TeacherMsg, TrainerMsg, EMA, TEACHER, TRAINER};
use super::evaluator;
use super::loader::{self, LoadedBatch, LoaderMsg};
use super::supervisor::{self, SupMsg};
use super::{Ctx, EXIT_DEVICE, EXIT_FATAL, EXIT_OK, EXIT_UNSAVED};
use crate::config::OnDeviceLoss;
use crate::{engine, stages};

/// The EMA-teacher backbone stored in the checkpoint of `step` (the Gram teacher of the
/// best-dense evaluation).
pub fn load_teacher_backbone(ctx: &Ctx, step: u64) -> anyhow::Result<model::vit::Vit> {
    let mut group = ctx.store.load_group(step, "teacher")?;
    let dtype = ctx.plan().config.precision.dtype();
    let vit = engine::vit_from_blobs(&ctx.plan().ssl.backbone, dtype, |n| group.take(n))
        .map_err(|e| e.context(format!("the teacher backbone of checkpoint {step}")))?;
    let dev = crate::runtime::device(&ctx.plan().config.runtime.device)?;
    Ok(if dev.is_cpu() {
        vit
    } else {
        vit.to_device(&dev)?
    })
}

/// Actor name.
pub const NAME: &str = "coordinator";

/// Messages.
pub enum CoordMsg {
    /// Do the next step.
    Tick,
    /// Stop stepping until `Resume`.
    Pause,
    /// Continue.
    Resume,
    /// Drain, checkpoint and stop the daemon.
    Stop { reply: Option<RpcReplyPort<String>> },
    /// A save finished.
    Saved {
        step: u64,
        blocking_ms: f64,
        outcome: Box<SaveOutcome>,
    },
    /// The device context is unusable (from the supervisor).
    DeviceLost(String),
    /// Force a stage (from the CLI), recorded as manual.
    SetStage {
        stage: String,
        reply: RpcReplyPort<Result<String, String>>,
    },
}

/// The actor.
pub struct CoordinatorActor;

/// Why a step did not commit.
enum StepFail {
    /// An actor failed or answered late; redo from the committed state.
    Redo(String),
    /// NaN, Inf or spike.
    Bad(String, Arc<LoadedBatch>),
    /// Give up.
    Fatal(String),
}

/// Its state.
pub struct CoordState {
    ctx: Arc<Ctx>,
    paused: bool,
    stopping: bool,
    save_in_flight: Option<u64>,
    save_issued_restarts: u32,
    save_due: bool,
    /// When the last save was handed to the checkpointer (or the process started).
    last_save_at: Instant,
    need_loader_reset: bool,
    save_backoff_until: u64,
    losses: VecDeque<f64>,
    bad_steps: VecDeque<u64>,
    retry: Option<Arc<LoadedBatch>>,
    retried_step: Option<u64>,
    rollbacks: u32,
    step_ms: f64,
    last_commit: Option<Instant>,
    progress: Option<indicatif::ProgressBar>,
    stop_replies: Vec<RpcReplyPort<String>>,
    machine: eval_probes::StageMachine,
    /// Probes made for a lost device (`on_gpu_loss = "wait"`), while waiting.
    device_probes: Option<u32>,
    last_probe: Option<Instant>,
    /// The step being redone and how many times in a row it failed to compute.
    redo_streak: (u64, u32),
    /// The due Gram-teacher refresh last said to be held back, and the evaluation that held
    /// it (so it is said once per evaluation).
    refresh_held: Option<(u64, Option<u64>)>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Sends an RPC to a named actor, mapping every failure to a message.
pub async fn call<M, T, F>(board: &super::board::Board, name: &str, build: F) -> Result<T, String>
where
    M: ractor::Message,
    T: Send + 'static,
    F: FnOnce(RpcReplyPort<T>) -> M,
{
    // a restarting actor reappears after its backoff: wait a little for it
    let mut cell = None;
    for _ in 0..200 {
        if let Some(c) = ractor::registry::where_is(name) {
            cell = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let Some(cell) = cell else {
        return Err(format!("actor {name} is not running"));
    };
    let r: ActorRef<M> = cell.into();
    board.queued(name);
    match r.call(build, Some(CALL_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(format!("{name} did not answer in time")),
        Ok(ractor::rpc::CallResult::SenderError) => {
            Err(format!("{name} failed while handling the request"))
        }
        Err(e) => Err(format!("{name} is unreachable: {e}")),
    }
}

impl CoordState {
    fn hparams(&self, step: u64) -> model::StepHparams {
        let has_gram = self.ctx.engine.lock().ts.gram_teacher.is_some();
        stages::hparams(
            self.ctx.plan(),
            &self.machine.overrides(step),
            step,
            has_gram,
        )
    }

    /// Copies the EMA teacher into the Gram teacher when the stage says so (once per step,
    /// even if the step is redone), and records the refresh in the stage state under the
    /// same engine lock, so a checkpoint holds both or neither. A due refresh the probes
    /// hold back (policy `probe`) is said once per evaluation that kept it back.
    fn refresh_if_due(&mut self, step: u64) {
        let Some(next) = self.machine.next_refresh(step) else {
            return;
        };
        if !next.now {
            // due, so the gate is what holds it
            if let Some(gate) = next.gate.filter(|_| step >= next.due_step) {
                let key = (
                    next.due_step,
                    self.machine.state().last_dense.map(|p| p.step),
                );
                if self.refresh_held != Some(key) {
                    self.refresh_held = Some(key);
                    self.ctx.event(
                        Level::Info,
                        "stage.gram_refresh_held",
                        Some(NAME),
                        Some(step),
                        format!(
                            "Gram-teacher refresh due since step {} held back: it waits for {}",
                            next.due_step, gate.what
                        ),
                        json!({"due_step": next.due_step, "gram_teacher": self.machine.gram_teacher_dense(), "ema_teacher": self.machine.state().last_dense}),
                    );
                }
            }
            return;
        }
        let ctx = self.ctx.clone();
        let mut machine = self.machine.clone();
        machine.record_refresh(step);
        let mut eng = ctx.engine.lock();
        if eng
            .counters
            .get("gram_refreshed_at")
            .and_then(|v| v.as_u64())
            == Some(step)
        {
            return;
        }
        if let Err(e) = eng.ts.refresh_gram_teacher() {
            drop(eng);
            ctx.event(
                Level::Error,
                "stage.failed",
                Some(NAME),
                Some(step),
                format!("Gram-teacher refresh failed: {e}"),
                json!({}),
            );
            return;
        }
        if !eng.counters.is_object() {
            eng.counters = json!({});
        }
        eng.counters["gram_refreshed_at"] = json!(step);
        ctx.cluster.note_gram_refresh(&eng.ts);
        eng.stage = stages::state_json(&machine);
        let n = eng.ts.gram_updates;
        drop(eng);
        let anchor = self.machine.gram_teacher_dense();
        self.machine = machine;
        let ema = self.machine.state().last_dense;
        let score = match ema {
            Some(p) => format!(
                "; the EMA teacher's latest {} {:.4} at step {}",
                self.machine.config().dense_metric.name(),
                p.value,
                p.step
            ),
            None => String::new(),
        };
        ctx.event(
            Level::Info,
            "stage.gram_refresh",
            Some(NAME),
            Some(step),
            format!(
                "Gram teacher refreshed from the EMA teacher at step {step} (refresh {} of at most {}, policy {}{score})",
                next.done,
                next.max,
                next.policy.name()
            ),
            json!({"updates": n, "refresh": next.done, "policy": next.policy.name(), "ema_teacher": ema, "gram_teacher": anchor}),
        );
    }

    /// Re-reads the stage machine after the engine was reloaded.
    fn sync_machine(&mut self) {
        let st = self.ctx.engine.lock().stage.clone();
        self.machine = stages::machine(self.ctx.plan(), &st);
        let name = self.machine.stage().as_str().to_string();
        self.ctx.board.run(|r| r.stage = name);
        self.need_loader_reset = true;
    }

    /// Persists the machine's state into the engine (it goes into every checkpoint).
    fn store_machine(&self) {
        let js = stages::state_json(&self.machine);
        self.ctx.engine.lock().stage = js;
        let name = self.machine.stage().as_str().to_string();
        self.ctx.board.run(|r| r.stage = name);
    }

    /// Applies what a stage transition implies: the Gram teacher, the crops, the record.
    fn apply_transition(&mut self, t: eval_probes::Transition) -> Result<(), String> {
        let ctx = self.ctx.clone();
        match &t.gram_teacher {
            Some(eval_probes::GramTeacherSource::BestDenseCheckpoint { step, .. }) => {
                let vit = load_teacher_backbone(&ctx, *step).map_err(|e| {
                    format!("loading the Gram teacher from checkpoint {step}: {e:#}")
                })?;
                let mut eng = ctx.engine.lock();
                eng.ts.gram_teacher = Some(vit);
                eng.ts.gram_updates += 1;
            }
            Some(eval_probes::GramTeacherSource::EmaTeacher { .. }) => {
                let mut eng = ctx.engine.lock();
                eng.ts.refresh_gram_teacher().map_err(|e| e.to_string())?;
                ctx.cluster.note_gram_refresh(&eng.ts);
            }
            None => {}
        }
        self.store_machine();
        self.need_loader_reset = true;
        self.save_due = true;
        if t.to == eval_probes::Stage::Distill
            && ctx.students.is_empty()
            && ctx.plan().distill_after_stages()
        {
            // the teacher is final: this tree stops at its final checkpoint and the
            // students' tree takes over (daemon::run)
            ctx.handoff.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let reason = serde_json::to_value(&t.reason).unwrap_or_default();
        ctx.event(
            Level::Info,
            "stage.transition",
            Some(NAME),
            Some(t.step),
            format!("stage {} -> {} at step {}", t.from.as_str(), t.to.as_str(), t.step),
            json!({"from": t.from.as_str(), "to": t.to.as_str(), "reason": reason, "gram_teacher": t.gram_teacher}),
        );
        metrics::counter!("dinod_stage_transitions_total", "to" => t.to.as_str()).increment(1);
        Ok(())
    }

    /// Runs the probes on the current EMA teacher (synchronously: the transition a result
    /// triggers then happens at a deterministic step) and feeds the stage machine.
    async fn evaluate(&mut self) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let (step, teacher) = {
            let e = ctx.engine.lock();
            let copy =
                evaluator::probe_copy(&e.ts.teacher.backbone, &ctx.plan().config.eval.device);
            (e.ts.step, copy.map_err(|e| format!("{e:#}"))?)
        };
        let ev = call(&ctx.board, evaluator::NAME, move |reply| {
            evaluator::EvalMsg::Evaluate {
                step,
                teacher: Box::new(teacher),
                reply,
            }
        })
        .await??;
        let m = &ev.metrics;
        for (k, v) in [
            ("knn_top1", m.knn_top1),
            ("linear_top1", m.linear_top1),
            ("dense_miou", m.dense_miou),
            ("dense_pixel_accuracy", m.dense_pixel_accuracy),
            ("locality", m.locality),
            ("correspondence", m.correspondence),
        ] {
            if let Some(v) = v {
                metrics::gauge!("dinod_probe", "metric" => k).set(v);
            }
        }
        ctx.board
            .run(|r| r.probes = json!({"step": step, "metrics": ev.metrics, "ms": ev.ms}));
        evaluator::report_done(&ctx, evaluator::NAME, Some(step), "", &ev);
        if ctx.plan().config.stages.automatic {
            if let Some(t) = self.machine.observe_at(step, step, &ev.metrics) {
                // the Gram teacher may be the checkpoint a save in flight is writing
                self.wait_for_save().await;
                self.apply_transition(t)?;
            }
        }
        self.store_machine();
        self.save_due = true;
        Ok(())
    }

    async fn run_step(&mut self) -> Result<StepSummary, StepFail> {
        let ctx = self.ctx.clone();
        let (step, dirty) = {
            let e = ctx.engine.lock();
            (e.ts.step, e.dirty)
        };
        if dirty {
            return Err(StepFail::Redo("the state was left mid-commit".into()));
        }
        ctx.faults.maybe_panic(NAME, step);
        let batch = match self.retry.take() {
            Some(b) => b,
            None => {
                let b = call(&ctx.board, loader::NAME, LoaderMsg::Next)
                    .await
                    .map_err(StepFail::Redo)?
                    .map_err(|e| StepFail::Fatal(format!("data loader: {e}")))?;
                loader::report_bad_inputs(&ctx, loader::NAME, step, &b.bad_inputs);
                b
            }
        };
        if ctx
            .store
            .quarantine_contains(&format!("batch:{}", batch.batch_index))
            .unwrap_or(false)
        {
            // a batch quarantined before a rollback: skip it again, deterministically
            ctx.engine.lock().ts.data_cursor =
                serde_json::to_value(batch.cursor_after).unwrap_or_default();
            ctx.event(
                Level::Warn,
                "data.batch_skipped",
                Some(NAME),
                Some(step),
                format!("batch {} is quarantined and was skipped", batch.batch_index),
                json!({"batch": batch.batch_index}),
            );
            return Err(StepFail::Redo("skipped a quarantined batch".into()));
        }
        let hp = self.hparams(step);
        let b2 = batch.clone();
        let teacher = call(&ctx.board, TEACHER, move |reply| TeacherMsg::Targets {
            step,
            batch: b2,
            hp,
            reply,
        })
        .await
        .map_err(StepFail::Redo)?
        .map_err(StepFail::Redo)?;
        let b3 = batch.clone();
        let summary = call(&ctx.board, TRAINER, move |reply| TrainerMsg::Compute {
            step,
            batch: b3,
            hp,
            teacher,
            reply,
        })
        .await
        .map_err(StepFail::Redo)?
        .map_err(StepFail::Redo)?;
        let spike = self.is_spike(summary.losses.total);
        if !summary.finite || spike {
            if let Some(c) = ractor::registry::where_is(TRAINER) {
                let _ = ActorRef::<TrainerMsg>::from(c).cast(TrainerMsg::Discard { step });
            }
            let why = if summary.finite {
                format!(
                    "loss spike: {:.4} vs median {:.4}",
                    summary.losses.total,
                    self.median_loss()
                )
            } else {
                format!(
                    "non-finite step: losses {:?}, gradient norms {:?}",
                    summary.losses, summary.norms
                )
            };
            return Err(StepFail::Bad(why, batch));
        }
        call(&ctx.board, TRAINER, move |reply| TrainerMsg::Commit {
            step,
            hp,
            reply,
        })
        .await
        .map_err(StepFail::Redo)?
        .map_err(StepFail::Redo)?;
        let cursor = serde_json::to_value(batch.cursor_after).unwrap_or_default();
        let momentum = hp.momentum;
        call(&ctx.board, EMA, move |reply| EmaMsg::Update {
            step,
            momentum,
            cursor,
            reply,
        })
        .await
        .map_err(StepFail::Redo)?
        .map_err(StepFail::Redo)?;
        Ok(summary)
    }

    fn median_loss(&self) -> f64 {
        let mut v: Vec<f64> = self.losses.iter().copied().collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn is_spike(&self, loss: f64) -> bool {
        let p = &self.ctx.plan().config.runtime.bad_steps;
        p.spike_factor > 0.0
            && self.losses.len() >= p.spike_window.max(1)
            && loss > p.spike_factor * self.median_loss().abs()
    }

    fn committed(&mut self, s: &StepSummary) {
        let ctx = &self.ctx;
        let p = &ctx.plan().config.runtime.bad_steps;
        self.losses.push_back(s.losses.total);
        while self.losses.len() > p.spike_window.max(1) {
            self.losses.pop_front();
        }
        let now = Instant::now();
        if let Some(prev) = self.last_commit {
            let ms = (now - prev).as_secs_f64() * 1e3;
            self.step_ms = if self.step_ms == 0.0 {
                ms
            } else {
                0.9 * self.step_ms + 0.1 * ms
            };
        }
        self.last_commit = Some(now);
        let b = ctx.plan().config.train.batch_size as f64;
        let hp = self.hparams(s.step);
        let (step_ms, ips) = (
            self.step_ms,
            if self.step_ms > 0.0 {
                b / (self.step_ms / 1e3)
            } else {
                0.0
            },
        );
        let cursor = ctx.engine.lock().ts.data_cursor.clone();
        ctx.board.run(|r| {
            r.step = s.step + 1;
            r.losses = Some(s.losses);
            r.lr = hp.lr;
            r.step_ms = step_ms;
            r.images_per_s = ips;
            r.last_step_ms = now_ms();
            r.data_cursor = cursor;
        });
        metrics::gauge!("dinod_step").set((s.step + 1) as f64);
        // the loss history behind `dinod viz curves`
        if (s.step + 1).is_multiple_of(ctx.plan().config.runtime.log_every_steps.max(1)) {
            let rec = json!({"losses": s.losses, "lr": hp.lr, "gram_weight": hp.gram_weight, "stage": self.machine.stage().as_str(), "grad_norms": s.norms});
            if let Err(e) = ctx.store.record_probe(s.step + 1, "train", &rec) {
                tracing::warn!("cannot record the loss history: {e}");
            }
        }
        metrics::gauge!("dinod_last_step_timestamp_seconds").set(now_ms() as f64 / 1e3);
        metrics::gauge!("dinod_lr").set(hp.lr);
        metrics::gauge!("dinod_images_per_second").set(ips);
        metrics::histogram!("dinod_step_seconds").record(step_ms / 1e3);
        for (n, v) in [
            ("total", s.losses.total),
            ("dino_local", s.losses.dino_local),
            ("dino_global", s.losses.dino_global),
            ("ibot", s.losses.ibot),
            ("koleo", s.losses.koleo),
            ("gram", s.losses.gram),
        ] {
            metrics::gauge!("dinod_loss", "term" => n).set(v);
        }
        for (i, m) in ["backbone", "dino_head", "ibot_head"].iter().enumerate() {
            metrics::gauge!("dinod_grad_norm", "module" => *m).set(s.norms[i]);
        }
        if let Some(pb) = &self.progress {
            pb.set_position(s.step + 1);
            pb.set_message(format!("loss {:.4}  {:.1} img/s", s.losses.total, ips));
        } else if (s.step + 1).is_multiple_of(ctx.plan().config.runtime.log_every_steps.max(1)) {
            tracing::info!(
                step = s.step + 1,
                loss = s.losses.total,
                dino_local = s.losses.dino_local,
                dino_global = s.losses.dino_global,
                ibot = s.losses.ibot,
                koleo = s.losses.koleo,
                gram = s.losses.gram,
                lr = hp.lr,
                images_per_s = ips,
                step_ms = step_ms,
                "step"
            );
        }
    }

    /// Takes a snapshot and hands it to the checkpointer, unless a save is in flight.
    fn maybe_save(&mut self, me: &ActorRef<CoordMsg>, force: bool) {
        let ctx = self.ctx.clone();
        let step = ctx.engine.lock().ts.step;
        let every = ctx.plan().config.checkpoint.every_steps;
        if step > 0 && step.is_multiple_of(every) {
            self.save_due = true;
        }
        if let Some(secs) = ctx.plan().config.checkpoint.every_seconds {
            if step > 0 && self.last_save_at.elapsed().as_secs_f64() >= secs {
                self.save_due = true;
            }
        }
        if self.save_in_flight.is_some() {
            // a save whose checkpointer died with it will never report back
            let restarts = ctx
                .board
                .actor(checkpointer::NAME)
                .map(|a| a.restarts)
                .unwrap_or(0);
            if restarts > self.save_issued_restarts {
                ctx.event(
                    Level::Warn,
                    "checkpoint.lost",
                    Some(NAME),
                    self.save_in_flight,
                    "the checkpointer restarted during a save; saving again",
                    json!({}),
                );
                self.save_in_flight = None;
                self.save_due = true;
                ctx.saving.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if !(self.save_due || force)
            || self.save_in_flight.is_some()
            || now_ms() < self.save_backoff_until
        {
            return;
        }
        let Some(cell) = ractor::registry::where_is(checkpointer::NAME) else {
            return;
        };
        let t0 = Instant::now();
        let payload = {
            let eng = ctx.engine.lock();
            if eng.dirty {
                return;
            }
            match engine::snapshot(&eng, ctx.plan()) {
                Ok(p) => p,
                Err(e) => {
                    ctx.event(
                        Level::Error,
                        "checkpoint.snapshot_failed",
                        Some(NAME),
                        Some(step),
                        format!("cannot snapshot the state: {e:#}"),
                        json!({}),
                    );
                    return;
                }
            }
        };
        let blocking_ms = t0.elapsed().as_secs_f64() * 1e3;
        metrics::histogram!("dinod_checkpoint_blocking_seconds").record(blocking_ms / 1e3);
        self.save_due = false;
        self.last_save_at = Instant::now();
        self.save_in_flight = Some(step);
        self.save_issued_restarts = ctx
            .board
            .actor(checkpointer::NAME)
            .map(|a| a.restarts)
            .unwrap_or(0);
        ctx.saving.store(true, std::sync::atomic::Ordering::SeqCst);
        ctx.board.queued(checkpointer::NAME);
        let _ = ActorRef::<CkptMsg>::from(cell).cast(CkptMsg::Save {
            payload: Box::new(payload),
            blocking_ms,
            reply_to: me.clone(),
        });
    }

    async fn handle_bad(&mut self, why: String, batch: Arc<LoadedBatch>) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let step = ctx.engine.lock().ts.step;
        let p = ctx.plan().config.runtime.bad_steps.clone();
        self.ctx.board.run(|r| r.bad_steps += 1);
        metrics::counter!("dinod_bad_steps_total").increment(1);
        if self.retry.is_none() && self.retried_step != Some(step) {
            ctx.event(
                Level::Warn,
                "step.discarded",
                Some(NAME),
                Some(step),
                format!("step {step} not committed ({why}); retrying it once"),
                json!({"batch": batch.batch_index}),
            );
            self.retry = Some(batch);
            self.retried_step = Some(step);
            return Ok(());
        }
        // second failure: quarantine the batch and move past it
        let _ = ctx.store.quarantine_add(
            &format!("batch:{}", batch.batch_index),
            &json!({"step": step, "reason": why, "cursor_after": batch.cursor_after}),
        );
        ctx.engine.lock().ts.data_cursor =
            serde_json::to_value(batch.cursor_after).unwrap_or_default();
        ctx.event(
            Level::Warn,
            "step.quarantined",
            Some(NAME),
            Some(step),
            format!(
                "batch {} quarantined after a failed retry ({why})",
                batch.batch_index
            ),
            json!({"batch": batch.batch_index}),
        );
        self.bad_steps.push_back(step);
        while self
            .bad_steps
            .front()
            .is_some_and(|&s| s + p.window_steps < step)
        {
            self.bad_steps.pop_front();
        }
        if self.bad_steps.len() >= p.max_bad_in_window.max(1) {
            self.rollbacks += 1;
            self.bad_steps.clear();
            if self.rollbacks > p.max_rollbacks {
                return Err(format!(
                    "{} rollbacks: the run keeps producing bad steps; halting for an operator",
                    self.rollbacks - 1
                ));
            }
            ctx.board.run(|r| r.rollbacks += 1);
            metrics::counter!("dinod_rollbacks_total").increment(1);
            let at = ctx
                .reload("too many bad steps")
                .map_err(|e| format!("rollback failed: {e:#}"))?;
            self.sync_machine();
            ctx.event(
                Level::Warn,
                "run.rollback",
                Some(NAME),
                Some(step),
                format!(
                    "{} bad steps within {} steps: rolled back to step {at}",
                    p.max_bad_in_window, p.window_steps
                ),
                json!({"to": at}),
            );
            self.reset_loader().await?;
        }
        Ok(())
    }

    async fn reset_loader(&mut self) -> Result<(), String> {
        self.retry = None;
        let cursor = loader::committed_cursor(&self.ctx);
        let step = self.ctx.engine.lock().ts.step;
        let crops = stages::crops(self.ctx.plan(), &self.machine.overrides(step));
        call(&self.ctx.board, loader::NAME, move |reply| {
            LoaderMsg::Reset(cursor, Box::new(crops), reply)
        })
        .await?
        .map_err(|e| format!("resetting the data loader: {e}"))
    }

    /// Final checkpoint (synchronous), then stop the tree.
    /// Waits (up to 10 minutes) for a save in flight to commit or fail; its checkpointer
    /// records the outcome.
    async fn wait_for_save(&self) {
        for _ in 0..6000 {
            if !self.ctx.saving.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Applies `runtime.on_gpu_loss` to a lost device. Called by every tick while the
    /// device is lost; it runs no step. First the state is saved if it is consistent and
    /// newer than the last checkpoint (on a dead context that save fails and the last
    /// checkpoint is what survives). Then:
    /// - `exit`: stop with status 75, for the outside supervisor to restart the process;
    /// - `wait`: probe the device every `gpu_probe_every_s` (a fresh handle and a checked
    ///   matmul); when it answers, reload the last checkpoint onto it and go on. After
    ///   `gpu_wait_max_s` (if set) give up as `exit` does;
    /// - `cpu`: reload the last checkpoint onto the CPU and go on with the CPU plan
    ///   (`Plan::cpu_fallback`: smaller batch, LR rescaled) until the process restarts.
    ///   A second loss there exits.
    async fn on_device_lost(&mut self, me: &ActorRef<CoordMsg>, lost: super::device::Lost) {
        let ctx = self.ctx.clone();
        ctx.board.phase(NAME, ActorPhase::Idle);
        let spec = ctx.plan.config.runtime.device.clone();
        let policy = if ctx.fallback.get().is_some() {
            OnDeviceLoss::Exit
        } else {
            ctx.plan.config.runtime.on_gpu_loss
        };
        let step = ctx.engine.lock().ts.step;
        let first = self.device_probes.is_none();
        if first {
            ctx.event(
                Level::Error,
                "device.lost",
                Some(TRAINER),
                Some(step),
                format!("device context lost ({}); policy {policy:?}", lost.why),
                json!({"policy": format!("{policy:?}").to_lowercase(), "device": spec, "error": lost.why}),
            );
            self.device_probes = Some(0);
            self.retry = None;
            self.wait_for_save().await;
            self.save_in_flight = None;
            let (dirty, latest) = (
                ctx.engine.lock().dirty,
                ctx.store.latest_step().ok().flatten(),
            );
            if policy != OnDeviceLoss::Exit && !dirty && latest != Some(step) {
                self.save_now(false).await;
            }
        }
        match policy {
            OnDeviceLoss::Exit => self.finish(EXIT_DEVICE, "device context lost").await,
            OnDeviceLoss::Wait => {
                let rt = &ctx.plan.config.runtime;
                let every = Duration::from_secs_f64(rt.gpu_probe_every_s);
                if first {
                    ctx.event(
                        Level::Warn,
                        "device.waiting",
                        Some(NAME),
                        Some(step),
                        format!("waiting for {spec}: probing every {:.1} s{}", rt.gpu_probe_every_s,
                            if rt.gpu_wait_max_s > 0.0 { format!(" for at most {:.0} s", rt.gpu_wait_max_s) } else { String::new() }),
                        json!({"device": spec, "probe_every_s": rt.gpu_probe_every_s, "max_wait_s": rt.gpu_wait_max_s}),
                    );
                    ctx.board.run(|r| r.device = format!("waiting for {spec}"));
                    self.last_probe = Some(Instant::now());
                    me.send_after(every, || CoordMsg::Tick);
                    return;
                }
                // other ticks (a resume, a reset) must not make the probes more frequent
                if self
                    .last_probe
                    .is_some_and(|t| t.elapsed() < every.mul_f64(0.9))
                {
                    return;
                }
                self.last_probe = Some(Instant::now());
                let c = ctx.clone();
                // a group is back when every member's device answers
                let specs = crate::runtime::run_devices(&spec, rt.data_parallel);
                let probe = match tokio::task::spawn_blocking(move || {
                    specs.iter().try_for_each(|s| c.device.probe(s))
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("the probe task failed: {e}")),
                };
                let probes = self.device_probes.map_or(1, |n| n + 1);
                self.device_probes = Some(probes);
                let waited = lost.since.elapsed().as_secs_f64();
                match probe {
                    Ok(()) => {
                        ctx.device.clear();
                        self.device_probes = None;
                        self.last_probe = None;
                        if self
                            .resume_after_device_change(&format!(
                                "{spec} answered after {waited:.1} s"
                            ))
                            .await
                        {
                            ctx.event(
                                Level::Info,
                                "device.restored",
                                Some(NAME),
                                Some(ctx.engine.lock().ts.step),
                                format!("{spec} is back after {waited:.1} s and {probes} probes; training goes on from the last checkpoint"),
                                json!({"device": spec, "waited_s": waited, "probes": probes}),
                            );
                            ctx.board.run(|r| r.device = spec.clone());
                            let _ = me.cast(CoordMsg::Tick);
                        }
                    }
                    Err(e) if rt.gpu_wait_max_s > 0.0 && waited >= rt.gpu_wait_max_s => {
                        ctx.event(
                            Level::Error,
                            "device.wait_expired",
                            Some(NAME),
                            Some(step),
                            format!("{spec} did not come back within {:.0} s ({probes} probes, last: {e:#})", rt.gpu_wait_max_s),
                            json!({"device": spec, "waited_s": waited, "probes": probes}),
                        );
                        self.finish(EXIT_DEVICE, "the device did not come back")
                            .await;
                    }
                    Err(e) => {
                        if probes == 1 || probes.is_multiple_of(10) {
                            ctx.event(
                                Level::Warn,
                                "device.probe_failed",
                                Some(NAME),
                                Some(step),
                                format!("{spec} is still unavailable after {waited:.1} s (probe {probes}): {e:#}"),
                                json!({"device": spec, "waited_s": waited, "probes": probes}),
                            );
                        }
                        me.send_after(every, || CoordMsg::Tick);
                    }
                }
            }
            OnDeviceLoss::Cpu => {
                let fb = match ctx.plan.cpu_fallback() {
                    Ok(p) => p,
                    Err(e) => {
                        ctx.event(
                            Level::Error,
                            "run.fatal",
                            Some(NAME),
                            Some(step),
                            format!("no CPU plan to fall back to: {e}"),
                            json!({}),
                        );
                        self.finish(EXIT_DEVICE, "device context lost").await;
                        return;
                    }
                };
                let (b, b0) = (fb.config.train.batch_size, ctx.plan.config.train.batch_size);
                let (lr, lr0) = (fb.lr.at(u64::MAX), ctx.plan.lr.at(u64::MAX));
                let _ = ctx.fallback.set(fb);
                ctx.device.clear();
                self.device_probes = None;
                if self
                    .resume_after_device_change(&format!("{spec} lost; continuing on the CPU"))
                    .await
                {
                    ctx.event(
                        Level::Warn,
                        "device.fallback",
                        Some(NAME),
                        Some(ctx.engine.lock().ts.step),
                        format!("{spec} lost: training goes on on the CPU from the last checkpoint at batch size {b} (was {b0}), LR {lr:.3e} (was {lr0:.3e}), until the process is restarted"),
                        json!({"from": spec, "batch_size": b, "was_batch_size": b0, "lr": lr, "was_lr": lr0}),
                    );
                    let (device, batch_size) = device_line(&ctx);
                    ctx.board.run(|r| {
                        r.device = device;
                        r.batch_size = batch_size;
                    });
                    let _ = me.cast(CoordMsg::Tick);
                }
            }
        }
    }

    /// Reloads the last checkpoint onto the device of the plan in force and makes the
    /// loader start again at its cursor; false (after stopping the run) when that fails.
    async fn resume_after_device_change(&mut self, why: &str) -> bool {
        let ctx = self.ctx.clone();
        // a data-parallel group may hold handles of the lost device: the next step builds
        // a fresh one on the handles the probe opened
        crate::dp::reset(&ctx.group);
        let c = ctx.clone();
        let why2 = why.to_string();
        let r = match tokio::task::spawn_blocking(move || c.reload(&why2)).await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the reload task failed: {e}")),
        };
        if let Err(e) = r {
            let step = ctx.engine.lock().ts.step;
            ctx.event(
                Level::Error,
                "run.fatal",
                Some(NAME),
                Some(step),
                format!("cannot reload the last checkpoint: {e:#}"),
                json!({}),
            );
            self.finish(EXIT_DEVICE, "reload after a device change failed")
                .await;
            return false;
        }
        self.sync_machine();
        self.need_loader_reset = true;
        self.losses.clear();
        true
    }

    /// Writes the engine's state now (blocking this actor), reporting the outcome as an
    /// event: the final save of a stop, or what is consistent before a device loss is
    /// handled (which fails harmlessly when the state sits on a dead context). Returns
    /// whether the checkpoint was written.
    async fn save_now(&self, final_: bool) -> bool {
        let ctx = self.ctx.clone();
        let step = ctx.engine.lock().ts.step;
        let snap = {
            let e = ctx.engine.lock();
            engine::snapshot(&e, ctx.plan())
        };
        let error = match snap {
            Ok(p) => {
                let store = ctx.store.clone();
                let t0 = std::time::Instant::now();
                match tokio::task::spawn_blocking(move || store.save(&p)).await {
                    Ok(Ok(rep)) => {
                        // all of it blocks: the step waits for this save
                        let ms = t0.elapsed().as_secs_f64() * 1e3;
                        super::checkpointer::note_saved(&ctx, step, ms, &rep);
                        ctx.event(
                            Level::Info,
                            "checkpoint.saved",
                            Some(NAME),
                            Some(step),
                            format!(
                                "{} checkpoint at step {step} ({:.1} MB)",
                                if final_ { "final" } else { "consistent" },
                                rep.bytes as f64 / 1e6
                            ),
                            json!({"bytes": rep.bytes, "final": final_}),
                        );
                        super::checkpointer::warn_if_disk_low(&ctx, NAME, step, &rep);
                        return true;
                    }
                    Ok(Err(e)) => super::checkpointer::save_error_text(&e.into()),
                    Err(e) => format!("the save task failed: {e}"),
                }
            }
            Err(e) => format!("taking the snapshot failed: {e:#}"),
        };
        super::checkpointer::note_failed(&ctx, step, &error);
        ctx.event(
            Level::Error,
            "checkpoint.failed",
            Some(NAME),
            Some(step),
            format!(
                "{} checkpoint at step {step} failed: {error}",
                if final_ { "final" } else { "consistent" }
            ),
            json!({"final": final_}),
        );
        false
    }

    async fn finish(&mut self, code: i32, why: &str) {
        let ctx = self.ctx.clone();
        self.stopping = true;
        let reason = ctx
            .board
            .run(|r| r.stopping.get_or_insert_with(|| why.to_string()).clone());
        super::notify::stopping(&format!(
            "stopping ({reason}): writing the final checkpoint"
        ));
        self.wait_for_save().await;
        self.save_in_flight = None;
        let (step, dirty) = {
            let e = ctx.engine.lock();
            (e.ts.step, e.dirty)
        };
        let latest = ctx.store.latest_step().ok().flatten();
        // a hand-off re-saves its step: the checkpoint must carry the `distill` stage
        let handoff = ctx.handoff.load(std::sync::atomic::Ordering::SeqCst);
        let unsaved = !dirty && (latest != Some(step) || handoff) && !self.save_now(true).await;
        // a stop that loses the steps since the last checkpoint says so in its status; a
        // failure's own status (device, fatal) stays, it already means "look at me"
        let (code, why) = if unsaved && code == EXIT_OK {
            let last = latest.map_or("none".to_string(), |s| format!("step {s}"));
            (
                EXIT_UNSAVED,
                format!("{why}; the final checkpoint was not written (the newest is {last})"),
            )
        } else {
            (code, why.to_string())
        };
        let fp = engine::fingerprint(&ctx.engine.lock().ts).ok();
        ctx.board.run(|r| {
            r.step = step;
            r.fingerprint = fp;
        });
        if let Some(pb) = self.progress.take() {
            pb.finish_and_clear();
        }
        ctx.event(
            if unsaved { Level::Error } else { Level::Info },
            "run.stopped",
            Some(NAME),
            Some(step),
            format!("stopped at step {step}: {why}"),
            json!({"exit_code": code, "final_checkpoint": !unsaved}),
        );
        ctx.board.run(|r| r.stopping = None);
        let _ = super::control::write_final_status(&ctx);
        ctx.set_exit(code);
        let reply = if unsaved {
            format!("stopped at step {step}, but its final checkpoint was not written (see `dinod events`)")
        } else {
            format!("stopped at step {step}")
        };
        for r in self.stop_replies.drain(..) {
            let _ = r.send(reply.clone());
        }
        supervisor::send(SupMsg::Shutdown);
    }
}

/// What `dinod status` shows as the run's device, and the batch size in force.
pub(super) fn device_line(ctx: &Ctx) -> (String, usize) {
    let configured = &ctx.plan.config.runtime.device;
    let b = ctx.plan().config.train.batch_size;
    let n = ctx.plan().config.runtime.data_parallel;
    if ctx.fallback.get().is_some() {
        (format!("cpu (fallback from {configured})"), b)
    } else if let Some(c) = &ctx.plan().config.runtime.cluster {
        let n = ctx.cluster.formed().unwrap_or(c.nodes);
        (
            if n < c.nodes {
                format!(
                    "{configured} ({n} of {} data-parallel processes over TCP)",
                    c.nodes
                )
            } else {
                format!("{configured} ({n} data-parallel processes over TCP)")
            },
            b,
        )
    } else if n > 1 {
        (format!("{configured} ({n} data-parallel members)"), b)
    } else {
        (configured.clone(), b)
    }
}

impl Actor for CoordinatorActor {
    type Msg = CoordMsg;
    type State = CoordState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(NAME, "coordinator");
        let step = ctx.engine.lock().ts.step;
        let progress = if ctx.progress {
            let pb = match ctx.max_steps {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{elapsed_precise}] {wide_bar} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_position(step);
            Some(pb)
        } else {
            None
        };
        let latest = ctx.store.latest_step().ok().flatten();
        let (device, batch_size) = device_line(&ctx);
        let init = ctx.engine.lock().counters.get("init").cloned();
        ctx.board.run(|r| {
            r.pid = std::process::id();
            r.init = init;
            r.step = step;
            r.max_steps = ctx.max_steps;
            r.last_checkpoint = latest;
            r.device = device;
            r.batch_size = batch_size;
        });
        let machine = stages::machine(ctx.plan(), &ctx.engine.lock().stage);
        let stage_name = machine.stage().as_str().to_string();
        ctx.board.run(|r| r.stage = stage_name);
        let _ = me.cast(CoordMsg::Tick);
        Ok(CoordState {
            ctx,
            paused: false,
            stopping: false,
            save_in_flight: None,
            save_issued_restarts: 0,
            save_due: false,
            last_save_at: Instant::now(),
            need_loader_reset: true,
            save_backoff_until: 0,
            losses: VecDeque::new(),
            bad_steps: VecDeque::new(),
            retry: None,
            retried_step: None,
            rollbacks: 0,
            step_ms: 0.0,
            last_commit: None,
            progress,
            stop_replies: vec![],
            machine,
            device_probes: None,
            last_probe: None,
            redo_streak: (0, 0),
            refresh_held: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = st.ctx.clone();
        match msg {
            CoordMsg::Tick => {
                if st.stopping {
                    return Ok(());
                }
                if st.paused {
                    ctx.board.phase(NAME, ActorPhase::Idle);
                    me.send_after(Duration::from_millis(200), || CoordMsg::Tick);
                    return Ok(());
                }
                if let Some(lost) = ctx.device.lost() {
                    st.on_device_lost(&me, lost).await;
                    return Ok(());
                }
                let step = ctx.engine.lock().ts.step;
                if ctx.max_steps.is_some_and(|m| step >= m) {
                    st.finish(EXIT_OK, "reached the target step").await;
                    return Ok(());
                }
                ctx.board.phase(NAME, ActorPhase::Step);
                // step budgets of the stage, and a due Gram-teacher refresh
                if let Some(t) = st.machine.on_step(step) {
                    if let Err(e) = st.apply_transition(t) {
                        ctx.event(
                            Level::Error,
                            "stage.failed",
                            Some(NAME),
                            Some(step),
                            e.clone(),
                            json!({}),
                        );
                    }
                }
                st.refresh_if_due(step);
                // set by any transition into `distill`: this one, an evaluation's or a manual one
                if ctx.handoff.load(std::sync::atomic::Ordering::SeqCst) {
                    st.finish(EXIT_OK, "handing over to the distillation students")
                        .await;
                    return Ok(());
                }
                if st.need_loader_reset {
                    // a new coordinator does not know what the loader prefetched
                    if let Err(e) = st.reset_loader().await {
                        ctx.event(
                            Level::Warn,
                            "step.redo",
                            Some(NAME),
                            Some(step),
                            format!("data loader reset failed: {e}"),
                            json!({}),
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let _ = me.cast(CoordMsg::Tick);
                        return Ok(());
                    }
                    st.need_loader_reset = false;
                }
                match st.run_step().await {
                    Ok(summary) => {
                        st.committed(&summary);
                        // heartbeat to the actors that are otherwise idle
                        for n in [super::control::NAME, evaluator::NAME] {
                            if let Some(c) = ractor::registry::where_is(n) {
                                if n == evaluator::NAME {
                                    let _ = ActorRef::<evaluator::EvalMsg>::from(c)
                                        .cast(evaluator::EvalMsg::Tick);
                                } else {
                                    let _ = ActorRef::<super::control::ControlMsg>::from(c)
                                        .cast(super::control::ControlMsg::Tick);
                                }
                            }
                        }
                        let every = ctx.plan().config.eval.every_steps;
                        let now = summary.step + 1;
                        if every > 0
                            && now % every == 0
                            && st.machine.state().last_eval_step.is_none_or(|l| l < now)
                        {
                            if let Err(e) = st.evaluate().await {
                                ctx.event(
                                    Level::Error,
                                    "probe.failed",
                                    Some(evaluator::NAME),
                                    Some(now),
                                    format!("probes at step {now} failed: {e}"),
                                    json!({}),
                                );
                            }
                            // every evaluated step gets its checkpoint: the best-dense one may
                            // become the Gram teacher
                            for _ in 0..6000 {
                                if !ctx.saving.load(std::sync::atomic::Ordering::SeqCst) {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            st.save_in_flight = None;
                            st.save_backoff_until = 0;
                            st.maybe_save(&me, true);
                        } else {
                            st.maybe_save(&me, false);
                        }
                    }
                    Err(StepFail::Redo(_)) if ctx.device.lost().is_some() => {
                        // the next tick applies `runtime.on_gpu_loss`; a reload onto the
                        // lost device would only fail
                    }
                    Err(StepFail::Redo(why)) => {
                        if !why.starts_with("skipped") {
                            let n = if st.redo_streak.0 == step {
                                st.redo_streak.1 + 1
                            } else {
                                1
                            };
                            st.redo_streak = (step, n);
                            let max = ctx.plan().config.runtime.bad_steps.max_redos;
                            if n > max {
                                let msg = format!("step {step} failed {n} times in a row (runtime.bad_steps.max_redos = {max}); last error: {why}");
                                ctx.event(
                                    Level::Error,
                                    "run.fatal",
                                    Some(NAME),
                                    Some(step),
                                    msg.clone(),
                                    json!({"redos": n}),
                                );
                                st.finish(EXIT_FATAL, &msg).await;
                                return Ok(());
                            }
                        }
                        let dirty = ctx.engine.lock().dirty;
                        if dirty {
                            let reloaded = ctx.reload(&why);
                            st.sync_machine();
                            if let Err(e) = reloaded {
                                ctx.event(
                                    Level::Error,
                                    "run.fatal",
                                    Some(NAME),
                                    Some(step),
                                    format!("cannot reload the last checkpoint: {e:#}"),
                                    json!({}),
                                );
                                st.finish(EXIT_FATAL, "reload failed").await;
                                return Ok(());
                            }
                        } else if !why.starts_with("skipped") {
                            ctx.event(
                                Level::Warn,
                                "step.redo",
                                Some(NAME),
                                Some(step),
                                format!("step {step} will be redone: {why}"),
                                json!({}),
                            );
                        }
                        if !why.starts_with("skipped") {
                            if let Err(e) = st.reset_loader().await {
                                ctx.event(
                                    Level::Warn,
                                    "step.redo",
                                    Some(NAME),
                                    Some(step),
                                    format!("data loader reset failed: {e}"),
                                    json!({}),
                                );
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                    Err(StepFail::Bad(why, batch)) => {
                        if let Err(e) = st.handle_bad(why, batch).await {
                            ctx.event(
                                Level::Error,
                                "run.halted",
                                Some(NAME),
                                Some(step),
                                e.clone(),
                                json!({}),
                            );
                            st.finish(EXIT_FATAL, &e).await;
                            return Ok(());
                        }
                    }
                    Err(StepFail::Fatal(why)) => {
                        ctx.event(
                            Level::Error,
                            "run.fatal",
                            Some(NAME),
                            Some(step),
                            why.clone(),
                            json!({}),
                        );
                        st.finish(EXIT_FATAL, &why).await;
                        return Ok(());
                    }
                }
                ctx.board.phase(NAME, ActorPhase::Idle);
                let _ = me.cast(CoordMsg::Tick);
            }
            CoordMsg::Pause => {
                st.paused = true;
                ctx.board.run(|r| r.paused = true);
                ctx.event(
                    Level::Info,
                    "run.paused",
                    Some(NAME),
                    None,
                    "paused by the operator",
                    json!({}),
                );
            }
            CoordMsg::Resume => {
                st.paused = false;
                ctx.board.run(|r| r.paused = false);
                ctx.event(
                    Level::Info,
                    "run.resumed",
                    Some(NAME),
                    None,
                    "resumed by the operator",
                    json!({}),
                );
            }
            CoordMsg::Stop { reply } => {
                if let Some(r) = reply {
                    st.stop_replies.push(r);
                }
                if !st.stopping {
                    // who asked (`stop requested by SIGTERM`), as the status has said since
                    let why = ctx
                        .board
                        .run_status()
                        .stopping
                        .unwrap_or_else(|| "stop requested".into());
                    st.finish(EXIT_OK, &why).await;
                }
            }
            CoordMsg::Saved {
                step,
                blocking_ms: _,
                outcome,
            } => {
                // the checkpointer recorded the outcome; here only the retry policy
                if st.save_in_flight == Some(step) {
                    st.save_in_flight = None;
                }
                if outcome.is_err() {
                    st.save_due = true;
                    st.save_backoff_until = now_ms() + 2_000;
                }
            }
            CoordMsg::DeviceLost(why) => {
                // the supervisor saw an actor fail with a lost context; the next tick
                // applies `runtime.on_gpu_loss` (a compute actor usually marked it already)
                ctx.device.mark_lost_by_supervisor(&why);
            }
            CoordMsg::SetStage { stage, reply } => {
                let r = match stage.parse::<eval_probes::Stage>() {
                    Ok(to) => {
                        let step = ctx.engine.lock().ts.step;
                        st.wait_for_save().await;
                        let t = st.machine.force(to, step, "manual (dinod stage set)");
                        let msg = format!(
                            "stage {} -> {} at step {step} (manual)",
                            t.from.as_str(),
                            t.to.as_str()
                        );
                        st.apply_transition(t).map(|_| msg)
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}
