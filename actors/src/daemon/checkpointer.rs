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
        if p.stage == FaultStage::Write
            && p.bytes_written > 0
            && self.0.take("io_error", None, p.step).is_some()
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
        st.ctx.faults.maybe_panic(NAME, step);
        st.ctx.board.phase(NAME, ActorPhase::Checkpoint);
        let ctx = st.ctx.clone();
        let r = st
            .worker
            .run(move || {
                ctx.faults.maybe_slow(NAME, step);
                ctx.store.save(&payload).map_err(|e| format!("{e}"))
            })
            .await
            .unwrap_or_else(|e| Err(format!("{e:#}")));
        st.ctx.board.phase(NAME, ActorPhase::Idle);
        let _ = reply_to.cast(CoordMsg::Saved {
            step,
            blocking_ms,
            outcome: Box::new(r),
        });
        Ok(())
    }
}
