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
use super::loader::{self, LoadedBatch, LoaderMsg};
use super::supervisor::{self, SupMsg};
use super::{Ctx, EXIT_DEVICE, EXIT_FATAL, EXIT_OK};
use crate::engine;

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
    /// Evaluation results (from the evaluator).
    Evaluated {
        step: u64,
        result: Box<serde_json::Value>,
    },
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
    save_due: bool,
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
        if let Some(c) = ractor::registry::where_is(name.to_string()) {
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
        self.ctx.plan.hparams(step)
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
                for bad in &b.bad_inputs {
                    self.ctx.board.run(|r| r.bad_inputs += 1);
                    metrics::counter!("dinod_bad_inputs_total").increment(1);
                    ctx.event(
                        Level::Warn,
                        "data.bad_input",
                        Some(loader::NAME),
                        Some(step),
                        format!(
                            "skipped unreadable input {}: {}",
                            bad.path.display(),
                            bad.reason
                        ),
                        json!({"path": bad.path, "reason": bad.reason.to_string()}),
                    );
                    let _ = ctx.store.quarantine_add(
                        &format!("file:{}", bad.path.display()),
                        &json!({"reason": bad.reason.to_string(), "step": step}),
                    );
                }
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
            teacher: Box::new(teacher),
            reply,
        })
        .await
        .map_err(StepFail::Redo)?
        .map_err(StepFail::Redo)?;
        let spike = self.is_spike(summary.losses.total);
        if !summary.finite || spike {
            if let Some(c) = ractor::registry::where_is(TRAINER.to_string()) {
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
        let p = &self.ctx.plan.config.runtime.bad_steps;
        p.spike_factor > 0.0
            && self.losses.len() >= p.spike_window.max(1)
            && loss > p.spike_factor * self.median_loss().abs()
    }

    fn committed(&mut self, s: &StepSummary) {
        let ctx = &self.ctx;
        let p = &ctx.plan.config.runtime.bad_steps;
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
        let b = ctx.plan.config.train.batch_size as f64;
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
        } else if (s.step + 1) % ctx.plan.config.runtime.log_every_steps.max(1) == 0 {
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
        let every = ctx.plan.config.checkpoint.every_steps;
        if step > 0 && step % every == 0 {
            self.save_due = true;
        }
        if !(self.save_due || force)
            || self.save_in_flight.is_some()
            || now_ms() < self.save_backoff_until
        {
            return;
        }
        let Some(cell) = ractor::registry::where_is(checkpointer::NAME.to_string()) else {
            return;
        };
        let t0 = Instant::now();
        let payload = {
            let eng = ctx.engine.lock();
            if eng.dirty {
                return;
            }
            match engine::snapshot(&eng, &ctx.plan) {
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
        self.save_in_flight = Some(step);
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
        let p = ctx.plan.config.runtime.bad_steps.clone();
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
        call(&self.ctx.board, loader::NAME, move |reply| {
            LoaderMsg::Reset(cursor, reply)
        })
        .await?
        .map_err(|e| format!("resetting the data loader: {e}"))
    }

    /// Final checkpoint (synchronous), then stop the tree.
    async fn finish(&mut self, code: i32, why: &str) {
        let ctx = self.ctx.clone();
        self.stopping = true;
        // wait for a save in flight
        for _ in 0..600 {
            if self.save_in_flight.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Saved messages are handled by this actor: poll the store instead
            if let Ok(Some(l)) = ctx.store.latest_step() {
                if Some(l) == self.save_in_flight {
                    self.save_in_flight = None;
                }
            }
        }
        let (step, dirty) = {
            let e = ctx.engine.lock();
            (e.ts.step, e.dirty)
        };
        let latest = ctx.store.latest_step().ok().flatten();
        if !dirty && latest != Some(step) {
            let snap = {
                let e = ctx.engine.lock();
                engine::snapshot(&e, &ctx.plan)
            };
            match snap {
                Ok(p) => {
                    let store = ctx.store.clone();
                    match tokio::task::spawn_blocking(move || store.save(&p)).await {
                        Ok(Ok(rep)) => ctx.event(
                            Level::Info,
                            "checkpoint.saved",
                            Some(NAME),
                            Some(step),
                            format!(
                                "final checkpoint at step {step} ({:.1} MB)",
                                rep.bytes as f64 / 1e6
                            ),
                            json!({"bytes": rep.bytes, "final": true}),
                        ),
                        Ok(Err(e)) => ctx.event(
                            Level::Error,
                            "checkpoint.failed",
                            Some(NAME),
                            Some(step),
                            format!("final checkpoint failed: {e}"),
                            json!({}),
                        ),
                        Err(e) => ctx.event(
                            Level::Error,
                            "checkpoint.failed",
                            Some(NAME),
                            Some(step),
                            format!("final checkpoint task failed: {e}"),
                            json!({}),
                        ),
                    }
                }
                Err(e) => ctx.event(
                    Level::Error,
                    "checkpoint.snapshot_failed",
                    Some(NAME),
                    Some(step),
                    format!("{e:#}"),
                    json!({}),
                ),
            }
        }
        let fp = engine::fingerprint(&ctx.engine.lock().ts).ok();
        ctx.board.run(|r| {
            r.step = step;
            r.fingerprint = fp;
        });
        if let Some(pb) = self.progress.take() {
            pb.finish_and_clear();
        }
        ctx.event(
            Level::Info,
            "run.stopped",
            Some(NAME),
            Some(step),
            format!("stopped at step {step}: {why}"),
            json!({"exit_code": code}),
        );
        let _ = super::control::write_final_status(&ctx);
        ctx.set_exit(code);
        for r in self.stop_replies.drain(..) {
            let _ = r.send(format!("stopped at step {step}"));
        }
        supervisor::send(SupMsg::Shutdown);
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
        ctx.board.run(|r| {
            r.pid = std::process::id();
            r.step = step;
            r.max_steps = ctx.max_steps;
            r.stage = "pretrain".into();
            r.last_checkpoint = latest;
        });
        let _ = me.cast(CoordMsg::Tick);
        Ok(CoordState {
            ctx,
            paused: false,
            stopping: false,
            save_in_flight: None,
            save_due: false,
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
                let step = ctx.engine.lock().ts.step;
                if ctx.max_steps.is_some_and(|m| step >= m) {
                    st.finish(EXIT_OK, "reached the target step").await;
                    return Ok(());
                }
                ctx.board.phase(NAME, ActorPhase::Step);
                match st.run_step().await {
                    Ok(summary) => {
                        st.committed(&summary);
                        st.maybe_save(&me, false);
                    }
                    Err(StepFail::Redo(why)) => {
                        let dirty = ctx.engine.lock().dirty;
                        if dirty {
                            if let Err(e) = ctx.reload(&why) {
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
                    st.finish(EXIT_OK, "stop requested").await;
                }
            }
            CoordMsg::Saved {
                step,
                blocking_ms,
                outcome,
            } => {
                st.save_in_flight = None;
                match *outcome {
                    Ok(rep) => {
                        let durable = rep.durable().as_secs_f64() * 1e3;
                        ctx.board.run(|r| {
                            r.last_checkpoint = Some(step);
                            r.last_checkpoint_blocking_ms = blocking_ms;
                            r.last_checkpoint_durable_ms = durable;
                        });
                        metrics::histogram!("dinod_checkpoint_durable_seconds")
                            .record(durable / 1e3);
                        metrics::gauge!("dinod_last_checkpoint_step").set(step as f64);
                        ctx.event(
                            Level::Info,
                            "checkpoint.saved",
                            Some(checkpointer::NAME),
                            Some(step),
                            format!("checkpoint at step {step}: {:.1} MB, blocking {blocking_ms:.0} ms, durable {durable:.0} ms", rep.bytes as f64 / 1e6),
                            json!({"bytes": rep.bytes, "blocking_ms": blocking_ms, "durable_ms": durable, "deleted": rep.deleted}),
                        );
                    }
                    Err(e) => {
                        metrics::counter!("dinod_checkpoint_failures_total").increment(1);
                        st.save_due = true;
                        st.save_backoff_until = now_ms() + 5_000;
                        ctx.event(Level::Error, "checkpoint.failed", Some(checkpointer::NAME), Some(step), format!("checkpoint at step {step} failed, training continues and the save is retried: {e}"), json!({"error": e}));
                    }
                }
            }
            CoordMsg::DeviceLost(why) => {
                let policy = ctx.plan.config.runtime.on_gpu_loss;
                let step = ctx.engine.lock().ts.step;
                ctx.event(
                    Level::Error,
                    "device.lost",
                    Some(TRAINER),
                    Some(step),
                    format!("device context lost ({why}); policy {policy:?}"),
                    json!({"policy": format!("{policy:?}")}),
                );
                match policy {
                    crate::config::OnDeviceLoss::Exit => {
                        st.finish(EXIT_DEVICE, "device context lost").await
                    }
                    // on the CPU build the "device" is the CPU: waiting or falling back both mean
                    // continuing once the trainer is back
                    _ => {}
                }
            }
            CoordMsg::Evaluated { step, result } => {
                ctx.board.run(|r| r.probes = (*result).clone());
                let _ = step;
            }
            CoordMsg::SetStage { stage, reply } => {
                let _ = reply.send(Err(format!(
                    "stage `{stage}`: stage control is not available in this build"
                )));
            }
        }
        Ok(())
    }
}
