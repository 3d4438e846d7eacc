//! The checkpointer actor: writes snapshots through the store on its own thread (the
//! coordinator only pays for the host copy), one save at a time, and reports the outcome
//! back. A failed save never stops training; the previous checkpoint stays the latest.

use std::sync::Arc;

use checkpoints::{CheckpointPayload, FaultInjector, FaultPoint, FaultStage, SaveReport};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::board::ActorPhase;
use super::coordinator::CoordMsg;
use super::faults::Faults;
use super::worker::Worker;
use super::Ctx;

/// Actor name.
pub const NAME: &str = "checkpointer";

/// Messages.
pub enum CkptMsg {
    /// Write this snapshot and report to the coordinator.
    Save {
        payload: Box<CheckpointPayload>,
        blocking_ms: f64,
        reply_to: ActorRef<CoordMsg>,
    },
}

/// The actor.
pub struct CheckpointerActor;

/// Its state.
pub struct CkptState {
    ctx: Arc<Ctx>,
    worker: Worker,
}

/// Injects the configured `io_error` faults into the store's write path (an ENOSPC in the
/// middle of a tensor file, as a full disk would).
#[derive(Debug)]
pub struct ConfigFaults(pub Arc<Faults>);

impl FaultInjector for ConfigFaults {
    fn check(&self, p: &FaultPoint<'_>) -> std::io::Result<()> {
        // `slow:checkpointer@STEP` holds the save of that step before its first byte,
        // whoever saves (this actor, or the coordinator's final and consistent saves)
        if p.stage == FaultStage::Write && p.bytes_written == 0 {
            self.0.maybe_slow(NAME, p.step);
        }
        if p.stage == FaultStage::Write
            && p.bytes_written > 0
            && self.0.take_since("io_error", p.step).is_some()
        {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

/// Outcome of a save, sent to the coordinator.
pub type SaveOutcome = Result<SaveReport, String>;

impl Actor for CheckpointerActor {
    type Msg = CkptMsg;
    type State = CkptState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(NAME, "checkpointer");
        Ok(CkptState {
            worker: Worker::spawn("dinod-ckpt")?,
            ctx,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let CkptMsg::Save {
            payload,
            blocking_ms,
            reply_to,
        } = msg;
        st.ctx.board.handled(NAME);
        let step = payload.step;
        st.ctx.faults.maybe_panic_since(NAME, step);
        st.ctx.board.phase(NAME, ActorPhase::Checkpoint);
        let ctx = st.ctx.clone();
        let r = st
            .worker
            .run(move || {
                ctx.store
                    .save(&payload)
                    .map_err(|e| save_error_text(&e.into()))
            })
            .await
            .unwrap_or_else(|e| Err(format!("{e:#}")));
        st.ctx.board.phase(NAME, ActorPhase::Idle);
        record(&st.ctx, step, blocking_ms, &r);
        st.ctx
            .saving
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = reply_to.cast(CoordMsg::Saved {
            step,
            blocking_ms,
            outcome: Box::new(r),
        });
        Ok(())
    }
}

/// Puts a saved checkpoint on the status board and the metrics (every save: the
/// checkpointer's, and the coordinator's final or consistent one). Returns the durable ms.
pub fn note_saved(ctx: &Ctx, step: u64, blocking_ms: f64, rep: &SaveReport) -> f64 {
    let durable = rep.durable().as_secs_f64() * 1e3;
    ctx.board.run(|s| {
        s.last_checkpoint = Some(step);
        s.last_checkpoint_blocking_ms = blocking_ms;
        s.last_checkpoint_durable_ms = durable;
        s.failed_saves = None;
    });
    metrics::histogram!("dinod_checkpoint_durable_seconds").record(durable / 1e3);
    metrics::gauge!("dinod_last_checkpoint_step").set(step as f64);
    durable
}

/// Puts a failed save of the run on the status board and the metrics (every save: the
/// checkpointer's, and the coordinator's final or consistent one).
pub fn note_failed(ctx: &Ctx, step: u64, error: &str) {
    ctx.board
        .run(|s| count_failed(&mut s.failed_saves, step, error));
}

/// Counts a failed save in the metrics and adds it to the streak in `slot` (the run's on
/// the board, or a student's).
pub fn count_failed(slot: &mut Option<super::board::FailedSaves>, step: u64, error: &str) {
    metrics::counter!("dinod_checkpoint_failures_total").increment(1);
    super::board::FailedSaves::note(slot, step, error);
}

/// A failed save as the operator reads it, for every save of the run and of its
/// students: one refused for space names the settings that decide it (the store does
/// not know the config).
pub fn save_error_text(e: &anyhow::Error) -> String {
    let refused = e.chain().any(|c| {
        c.downcast_ref::<checkpoints::Error>()
            .is_some_and(|s| s.save_stage() == Some(checkpoints::SaveStage::Space))
    });
    if refused {
        format!("{e:#} (the reserve is checkpoint.min_free_gb; checkpoint.max_disk_gb bounds the kept checkpoints)")
    } else {
        format!("{e:#}")
    }
}

/// After a save: a `checkpoint.disk_low` warning when one more checkpoint of this size
/// would not fit (the next save will be refused unless space is freed).
pub fn warn_if_disk_low(ctx: &Ctx, actor: &str, step: u64, rep: &checkpoints::SaveReport) {
    if let Some(why) = &rep.disk_low {
        metrics::counter!("dinod_checkpoint_disk_low_total").increment(1);
        ctx.event(
            checkpoints::Level::Warn,
            "checkpoint.disk_low",
            Some(actor),
            Some(step),
            format!("{why}; free space, lower checkpoint.keep_last or keep_every, or set checkpoint.max_disk_gb"),
            serde_json::json!({"bytes": rep.bytes, "available": why.available, "reserve": why.reserve}),
        );
    }
}

/// Records the outcome of a save: status board, metrics, event.
pub fn record(ctx: &Ctx, step: u64, blocking_ms: f64, r: &SaveOutcome) {
    use checkpoints::Level;
    match r {
        Ok(rep) => {
            let durable = note_saved(ctx, step, blocking_ms, rep);
            ctx.event(
                Level::Info,
                "checkpoint.saved",
                Some(NAME),
                Some(step),
                format!("checkpoint at step {step}: {:.1} MB, blocking {blocking_ms:.0} ms, durable {durable:.0} ms", rep.bytes as f64 / 1e6),
                serde_json::json!({"bytes": rep.bytes, "blocking_ms": blocking_ms, "durable_ms": durable, "deleted": rep.deleted}),
            );
            warn_if_disk_low(ctx, NAME, step, rep);
        }
        Err(e) => {
            note_failed(ctx, step, e);
            ctx.event(Level::Error, "checkpoint.failed", Some(NAME), Some(step), format!("checkpoint at step {step} failed; training continues and the save will be retried: {e}"), serde_json::json!({"error": e}));
        }
    }
}
