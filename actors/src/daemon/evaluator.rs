//! The evaluator actor: runs the probes on frozen snapshots of the EMA teacher on its own
//! thread and reports the results (and stage decisions) to the coordinator.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::worker::Worker;
use super::Ctx;

/// Actor name.
pub const NAME: &str = "evaluator";

/// Messages.
pub enum EvalMsg {}

/// The actor.
pub struct EvaluatorActor;

/// Its state.
pub struct EvalState {
    _ctx: Arc<Ctx>,
    _worker: Worker,
}

impl Actor for EvaluatorActor {
    type Msg = EvalMsg;
    type State = EvalState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(NAME, "evaluator");
        Ok(EvalState {
            _worker: Worker::spawn("dinod-eval")?,
            _ctx: ctx,
        })
    }
}
