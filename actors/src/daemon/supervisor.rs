//! The root supervisor and its restart policy, written as code (ractor has none):
//! - per-child restart with exponential backoff;
//! - an intensity limit (at most `max_restarts` restarts of one child within `window_s`);
//!   past it the supervisor escalates: it stops the tree and the process exits with
//!   status 70 so an outside supervisor (systemd) can take over;
//! - restart order follows dependencies (rest-for-one along the data flow): a teacher
//!   restart also restarts the trainer and the EMA updater;
//! - a watchdog checks every actor's current phase against its timeout; a hung actor is
//!   reported and restarted, and if the run still makes no progress (a compute thread
//!   stuck in the kernel cannot be cancelled) the process exits with status 76.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoints::Level;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde_json::json;

use super::board::{now_ms, ActorPhase};
use super::checkpointer::CheckpointerActor;
use super::compute::{fault_of_actor_err, DeviceFault, EmaActor, TeacherActor, TrainerActor};
use super::control::ControlActor;
use super::coordinator::{CoordMsg, CoordinatorActor};
use super::evaluator::EvaluatorActor;
use super::loader::LoaderActor;
use super::{Ctx, EXIT_FATAL, EXIT_HUNG};

/// Actor name.
pub const NAME: &str = "supervisor";

/// Children in start order.
pub const ORDER: [&str; 8] = [
    "control",
    "checkpointer",
    "evaluator",
    "data_loader",
    "teacher",
    "trainer",
    "ema",
    "coordinator",
];

/// What else must restart when `name` does.
pub fn dependents(name: &str) -> &'static [&'static str] {
    match name {
        "teacher" => &["trainer", "ema"],
        "trainer" => &["ema"],
        _ => &[],
    }
}

/// Messages.
pub enum SupMsg {
    /// Restart a child (after its backoff).
    Restart(String),
    /// Watchdog tick.
    Watch,
    /// Stop everything (the run is over).
    Shutdown,
}

/// The children of a run in start order: the fixed tree of a self-supervised run, or the
/// teacher and one actor per student of a distillation run.
pub fn order(ctx: &Ctx) -> Vec<String> {
    if ctx.students.is_empty() {
        ORDER.iter().map(|s| s.to_string()).collect()
    } else {
        let mut v = vec!["control".to_string(), "teacher".to_string()];
        v.extend(ctx.students.iter().map(|s| s.actor()));
        v.push("coordinator".to_string());
        v
    }
}

/// Casts a message to the supervisor, if it runs.
pub fn send(msg: SupMsg) {
    if let Some(c) = ractor::registry::where_is(NAME) {
        let _ = ActorRef::<SupMsg>::from(c).cast(msg);
    }
}

/// The supervisor.
pub struct SupervisorActor;

/// Its state.
pub struct SupState {
    ctx: Arc<Ctx>,
    children: BTreeMap<String, ActorCell>,
    restarts: HashMap<String, VecDeque<Instant>>,
    consecutive: HashMap<String, u32>,
    expected_stop: HashSet<String>,
    restarting: HashSet<String>,
    shutting_down: bool,
    hung: HashMap<String, u64>,
    escalate_at: Option<(Instant, u64)>,
}

async fn spawn_child(
    name: &str,
    ctx: &Arc<Ctx>,
    sup: ActorCell,
) -> Result<ActorCell, ractor::SpawnErr> {
    let n = Some(name.to_string());
    let c = ctx.clone();
    if !ctx.students.is_empty() {
        // a distillation run
        return Ok(match name {
            "control" => Actor::spawn_linked(n, ControlActor, c, sup)
                .await?
                .0
                .get_cell(),
            "teacher" => Actor::spawn_linked(n, super::distill::DistillTeacherActor, c, sup)
                .await?
                .0
                .get_cell(),
            "coordinator" => Actor::spawn_linked(n, super::distill::DistillCoordinator, c, sup)
                .await?
                .0
                .get_cell(),
            other => match ctx.students.iter().position(|s| s.actor() == other) {
                Some(i) => Actor::spawn_linked(n, super::distill::StudentActor, (c, i), sup)
                    .await?
                    .0
                    .get_cell(),
                None => {
                    return Err(ractor::SpawnErr::StartupFailed(
                        format!("unknown child {other}").into(),
                    ))
                }
            },
        });
    }
    Ok(match name {
        "control" => Actor::spawn_linked(n, ControlActor, c, sup)
            .await?
            .0
            .get_cell(),
        "checkpointer" => Actor::spawn_linked(n, CheckpointerActor, c, sup)
            .await?
            .0
            .get_cell(),
        "evaluator" => Actor::spawn_linked(n, EvaluatorActor, c, sup)
            .await?
            .0
            .get_cell(),
        "data_loader" => Actor::spawn_linked(n, LoaderActor, c, sup)
            .await?
            .0
            .get_cell(),
        "teacher" => Actor::spawn_linked(n, TeacherActor, c, sup)
            .await?
            .0
            .get_cell(),
        "trainer" => Actor::spawn_linked(n, TrainerActor, c, sup)
            .await?
            .0
            .get_cell(),
        "ema" => Actor::spawn_linked(n, EmaActor, c, sup).await?.0.get_cell(),
        "coordinator" => Actor::spawn_linked(n, CoordinatorActor, c, sup)
            .await?
            .0
            .get_cell(),
        other => {
            return Err(ractor::SpawnErr::StartupFailed(
                format!("unknown child {other}").into(),
            ))
        }
    })
}

/// Why a child went down, as the restart policy and the restart metric see it.
#[derive(Debug, Clone, PartialEq)]
enum Down {
    /// A device fault: typed by the compute actors
    /// ([`DeviceFaultError`](super::compute::DeviceFaultError)), or an untyped
    /// error whose text names a CUDA error.
    Device(DeviceFault),
    /// Killed by the watchdog.
    Hung,
    /// A panic (ractor hands it over as the panic's message only).
    Panic,
    /// Any other error or stop.
    Other,
}

impl Down {
    fn of_failure(err: &ActorProcessingErr) -> Down {
        match fault_of_actor_err(err) {
            Some(f) => Down::Device(f),
            // ractor boxes a panic's payload as a bare string: the injected panics say
            // so, a real one is an ordinary error to the restart policy either way
            None if format!("{err}").contains("panic") => Down::Panic,
            None => Down::Other,
        }
    }

    /// The `reason` label of `dinod_actor_restarts_total`.
    fn reason(&self) -> &'static str {
        match self {
            Down::Device(DeviceFault::Lost(_)) => "device_lost",
            Down::Device(DeviceFault::Recoverable(_)) => "device_error",
            Down::Hung => "hung",
            Down::Panic => "panic",
            Down::Other => "error",
        }
    }
}

impl SupState {
    fn timeout_s(&self, phase: ActorPhase) -> f64 {
        let h = &self.ctx.plan.config.runtime.heartbeat;
        match phase {
            ActorPhase::Idle => f64::INFINITY,
            ActorPhase::Load => h.load_s,
            ActorPhase::Step => h.step_s,
            ActorPhase::Eval => h.eval_s,
            ActorPhase::Checkpoint => h.checkpoint_s,
        }
    }

    fn on_child_down(&mut self, me: &ActorRef<SupMsg>, name: String, why: String, cause: Down) {
        if self.shutting_down {
            return;
        }
        if self.expected_stop.remove(&name) {
            return;
        }
        self.children.remove(&name);
        let ctx = self.ctx.clone();
        ctx.board.failed(&name, &why);
        let reason = cause.reason();
        metrics::counter!("dinod_actor_restarts_total", "actor" => name.clone(), "reason" => reason).increment(1);
        let step = ctx.engine.lock().ts.step;
        if let Down::Device(DeviceFault::Lost(m)) = &cause {
            if let Some(c) = ractor::registry::where_is(super::coordinator::NAME) {
                let _ = ActorRef::<CoordMsg>::from(c).cast(CoordMsg::DeviceLost(m.clone()));
            }
        }
        // intensity limit
        let r = &ctx.plan.config.runtime.restart;
        let window = Duration::from_secs_f64(r.window_s);
        let q = self.restarts.entry(name.clone()).or_default();
        let now = Instant::now();
        q.push_back(now);
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        if q.len() as u32 > r.max_restarts {
            ctx.event(Level::Error, "supervisor.meltdown", Some(NAME), Some(step), format!("{name} failed {} times within {:.0} s ({why}); giving up so the process can be restarted from its last checkpoint", q.len(), r.window_s), json!({"actor": name}));
            ctx.set_exit(EXIT_FATAL);
            self.shutdown(me);
            return;
        }
        // stop the dependents; they restart with it, in order
        for d in dependents(&name) {
            if let Some(c) = self.children.remove(*d) {
                self.expected_stop.insert(d.to_string());
                c.stop(Some(format!("restarting with {name}")));
            }
        }
        let n = self.consecutive.entry(name.clone()).or_insert(0);
        let backoff = (r.backoff_ms.saturating_mul(1u64 << (*n).min(16))).min(r.backoff_max_ms);
        *n += 1;
        ctx.event(
            Level::Warn,
            "actor.restarting",
            Some(&name),
            Some(step),
            format!(
                "{name} failed ({why}); restarting in {backoff} ms with {}",
                if dependents(&name).is_empty() {
                    "no dependents".to_string()
                } else {
                    dependents(&name).join(", ")
                }
            ),
            json!({"reason": reason, "backoff_ms": backoff, "error": why}),
        );
        self.restarting.insert(name.clone());
        me.send_after(Duration::from_millis(backoff), move || {
            SupMsg::Restart(name)
        });
    }

    fn shutdown(&mut self, me: &ActorRef<SupMsg>) {
        self.shutting_down = true;
        for name in order(&self.ctx).iter().rev() {
            if let Some(c) = self.children.remove(name) {
                c.stop(Some("shutdown".into()));
                self.ctx.board.stopped(name);
            }
        }
        me.stop(Some("shutdown".into()));
    }
}

impl Actor for SupervisorActor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut children = BTreeMap::new();
        for name in order(&ctx) {
            let cell = spawn_child(&name, &ctx, me.get_cell()).await?;
            children.insert(name, cell);
        }
        me.send_interval(
            Duration::from_millis(ctx.plan.config.runtime.heartbeat.check_every_ms.max(10)),
            || SupMsg::Watch,
        );
        Ok(SupState {
            ctx,
            children,
            restarts: HashMap::new(),
            consecutive: HashMap::new(),
            expected_stop: HashSet::new(),
            restarting: HashSet::new(),
            shutting_down: false,
            hung: HashMap::new(),
            escalate_at: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::Shutdown => st.shutdown(&me),
            SupMsg::Restart(name) => {
                if st.shutting_down {
                    return Ok(());
                }
                st.restarting.remove(&name);
                let mut to_start = vec![name.clone()];
                to_start.extend(dependents(&name).iter().map(|s| s.to_string()));
                for n in order(&st.ctx)
                    .iter()
                    .filter(|o| to_start.iter().any(|t| t == *o))
                {
                    let n = n.as_str();
                    if st.children.contains_key(n) {
                        continue;
                    }
                    // the old actor's name must be free before the new one registers
                    for _ in 0..100 {
                        if ractor::registry::where_is(n).is_none() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    match spawn_child(n, &st.ctx, me.get_cell()).await {
                        Ok(c) => {
                            st.children.insert(n.to_string(), c);
                            let step = st.ctx.engine.lock().ts.step;
                            st.ctx.event(
                                Level::Info,
                                "actor.restarted",
                                Some(n),
                                Some(step),
                                format!("{n} restarted"),
                                json!({}),
                            );
                        }
                        Err(e) => st.on_child_down(
                            &me,
                            n.to_string(),
                            format!("restart failed: {e}"),
                            Down::Other,
                        ),
                    }
                }
            }
            SupMsg::Watch => {
                let ctx = st.ctx.clone();
                let now = now_ms();
                let run = ctx.board.run_status();
                // recovered? forget older hang episodes
                if let Some((_, step)) = st.escalate_at {
                    if run.step > step {
                        st.escalate_at = None;
                        st.hung.clear();
                    }
                }
                for a in ctx.board.actors() {
                    if a.state != "running" || a.phase == ActorPhase::Idle {
                        continue;
                    }
                    let age = (now.saturating_sub(a.phase_since_ms)) as f64 / 1e3;
                    let limit = st.timeout_s(a.phase);
                    if age > limit && !st.hung.contains_key(&a.name) {
                        st.hung.insert(a.name.clone(), now);
                        ctx.event(Level::Error, "actor.hung", Some(&a.name), Some(run.step), format!("{} has been in phase {:?} for {age:.0} s (timeout {limit:.0} s); restarting it", a.name, a.phase), json!({"phase": a.phase, "seconds": age}));
                        if st.escalate_at.is_none() {
                            st.escalate_at = Some((Instant::now(), run.step));
                        }
                        if let Some(c) = st.children.get(&a.name) {
                            c.kill();
                        }
                    }
                }
                if let Some((t, step)) = st.escalate_at {
                    let limit =
                        Duration::from_secs_f64(ctx.plan.config.runtime.heartbeat.escalate_after_s);
                    if t.elapsed() > limit && ctx.board.run_status().step <= step {
                        ctx.event(Level::Error, "supervisor.hang_escalated", Some(NAME), Some(step), format!("no progress {:.0} s after restarting hung actors: a compute thread is stuck; exiting with status {EXIT_HUNG} so the process is restarted from its last checkpoint", limit.as_secs_f64()), json!({}));
                        let _ = ctx.store.flush();
                        std::process::exit(EXIT_HUNG);
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let name = cell.get_name().unwrap_or_else(|| "?".into());
                let cause = Down::of_failure(&err);
                st.on_child_down(&me, name, format!("{err}"), cause);
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let name = cell.get_name().unwrap_or_else(|| "?".into());
                let hung = st.hung.contains_key(&name);
                let (why, cause) = match (hung, reason) {
                    (true, _) => ("hung (killed by the watchdog)".to_string(), Down::Hung),
                    (false, Some(r)) => (format!("stopped unexpectedly: {r}"), Down::Other),
                    (false, None) => ("stopped unexpectedly".to_string(), Down::Other),
                };
                st.on_child_down(&me, name, why, cause);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Spawns the tree and waits for the end; returns the exit status.
pub async fn run_tree(ctx: Arc<Ctx>) -> anyhow::Result<i32> {
    if let Some(port) = ctx.plan.config.runtime.metrics_port {
        super::control::start_metrics(&ctx, port);
    }
    let (sup, handle) = Actor::spawn(Some(NAME.to_string()), SupervisorActor, ctx.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the supervision tree: {e}"))?;
    // SIGTERM / SIGINT reach the coordinator through the process's lifecycle
    // (`startup::Lifecycle`): drain, checkpoint, exit 0
    handle
        .await
        .map_err(|e| anyhow::anyhow!("supervisor task failed: {e}"))?;
    drop(sup);
    Ok(ctx.exit_code.load(std::sync::atomic::Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::super::compute::{actor_err, DeviceFaultError};
    use super::*;

    fn lost(m: &str) -> DeviceFault {
        DeviceFault::Lost(m.into())
    }

    #[test]
    fn a_failed_actor_is_classified_by_its_error_type_not_its_wording() {
        // the compute actors' typed fault, boxed directly
        let e: ActorProcessingErr = Box::new(DeviceFaultError(lost("step 7")));
        assert_eq!(Down::of_failure(&e), Down::Device(lost("step 7")));
        // through anyhow, with context on top: `actor_err` keeps the type (anyhow's own
        // boxing would hide it)
        let a = anyhow::Error::new(DeviceFaultError(DeviceFault::Recoverable("oom".into())))
            .context("student s1 at step 9");
        assert_eq!(
            Down::of_failure(&actor_err(a)),
            Down::Device(DeviceFault::Recoverable("oom".into()))
        );
        // an untyped error naming a sticky CUDA error still loses the device
        let e = actor_err(anyhow::anyhow!("ema: CUDA_ERROR_ILLEGAL_ADDRESS"));
        assert!(matches!(
            Down::of_failure(&e),
            Down::Device(DeviceFault::Lost(_))
        ));
        // words alone are not a device fault any more: an error that merely says so
        let e = actor_err(anyhow::anyhow!(
            "config: device context lost is not a setting"
        ));
        assert_eq!(Down::of_failure(&e), Down::Other);
        assert_eq!(Down::of_failure(&e).reason(), "error");
        let e: ActorProcessingErr = From::from("injected panic in trainer at step 3");
        assert_eq!(Down::of_failure(&e).reason(), "panic");
        assert_eq!(Down::Device(lost("x")).reason(), "device_lost");
    }
}
