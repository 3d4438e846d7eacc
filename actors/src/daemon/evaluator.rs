//! The evaluator actor: runs the probes on a frozen snapshot of the EMA teacher on its own
//! thread, records the results in the probe history, scores the checkpoint of that step
//! (best-by-dense retention), and answers the coordinator, which feeds the stage machine.
//! Probe sets are built once, lazily, on the evaluator's thread.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use super::board::ActorPhase;
use super::worker::Worker;
use super::Ctx;
use eval_probes::{ProbeMetrics, ProbeSet};
use model::vit::Vit;

/// Actor name.
pub const NAME: &str = "evaluator";

/// Result of one evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Evaluation {
    /// Evaluated step.
    pub step: u64,
    /// Scalar metrics (what the stage machine reads).
    pub metrics: ProbeMetrics,
    /// The full report.
    pub report: serde_json::Value,
    /// Wall time, building the sets included.
    pub ms: f64,
    /// Where the features were extracted (`cpu`, `cuda:N`).
    pub device: String,
    /// Why they were extracted on the host instead of the probe device (it failed there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

impl Evaluation {
    /// Where the probes ran, for messages: `cuda:0`, or `cpu (after cuda:0 failed: ...)`.
    pub fn place(&self) -> String {
        match &self.fallback {
            Some(why) => format!("{} ({why})", self.device),
            None => self.device.clone(),
        }
    }
}

/// Records a finished evaluation in the event log: `probe.done` (`{what}probes at step S
/// on DEVICE in T s: METRICS`), after a `probe.fallback` warning when the probes had to
/// run on the host. `what` says whose probes (`""`: the run's EMA teacher).
pub fn report_done(ctx: &Ctx, actor: &str, step: Option<u64>, what: &str, ev: &Evaluation) {
    let at = step.map(|s| format!(" at step {s}")).unwrap_or_default();
    if let Some(why) = &ev.fallback {
        ctx.event(
            checkpoints::Level::Warn,
            "probe.fallback",
            Some(actor),
            step,
            format!("{what}probes{at} ran on the host {why}"),
            serde_json::json!({"device": ev.device, "why": why}),
        );
    }
    ctx.event(
        checkpoints::Level::Info,
        "probe.done",
        Some(actor),
        step,
        format!(
            "{what}probes{at} on {} in {:.1} s: {}",
            ev.place(),
            ev.ms / 1e3,
            serde_json::to_string(&ev.metrics).unwrap_or_default()
        ),
        serde_json::json!({"metrics": ev.metrics, "ms": ev.ms, "device": ev.device, "fallback": ev.fallback}),
    );
}

/// [`evaluate`] on `vit`'s device and, if that fails off the host, again on a host copy:
/// the live probes must not starve the stage machine because the GPU is short of memory
/// or failed under them (training notices a lost device itself). `inject`: a
/// `device_error` fault armed for this actor at `step` fails the device attempt (on a
/// CPU run too, where the retry is then on the same host).
pub fn evaluate_or_on_host(
    vit: &Vit,
    sets: &[ProbeSet],
    cfg: &crate::config::EvalSection,
    step: u64,
    inject: Option<(&super::faults::Faults, &str)>,
) -> Result<Evaluation> {
    let injected = inject
        .is_some_and(|(faults, actor)| faults.take("device_error", Some(actor), step).is_some());
    let first = if injected {
        Err(anyhow::anyhow!(
            "injected device error in the probes at step {step}"
        ))
    } else {
        evaluate(vit, sets, cfg, step)
    };
    let e = match first {
        Ok(ev) => return Ok(ev),
        // on the host already: the same probes would fail the same way again
        Err(e) if vit.device().is_cpu() && !injected => return Err(e),
        Err(e) => e,
    };
    let on = device_name(&vit.device());
    let host = match vit.to_device(&candle_core::Device::Cpu) {
        Ok(h) => h,
        Err(_) => return Err(e),
    };
    let mut ev = evaluate(&host, sets, cfg, step)
        .with_context(|| format!("after the probes failed on {on}: {e:#}"))?;
    ev.fallback = Some(format!("after {on} failed: {e:#}"));
    Ok(ev)
}

/// Messages.
pub enum EvalMsg {
    /// Probe this teacher snapshot.
    Evaluate {
        step: u64,
        teacher: Box<Vit>,
        reply: RpcReplyPort<Result<Evaluation, String>>,
    },
    /// Periodic self-check (heartbeat; where an injected `panic:evaluator` fires).
    Tick,
}

/// The actor.
pub struct EvaluatorActor;

/// Its state.
pub struct EvalState {
    ctx: Arc<Ctx>,
    worker: Worker,
}

/// The run's probe sets, built on first use and then shared by everything in the process
/// that probes (the evaluator, the frozen teacher, the students): one copy, which survives
/// a restart of the evaluator.
pub fn shared_sets(ctx: &Ctx) -> Result<Arc<Vec<ProbeSet>>> {
    let mut g = ctx
        .probe_sets
        .lock()
        .map_err(|_| anyhow::anyhow!("the probe sets lock is poisoned"))?;
    if g.is_none() {
        *g = Some(Arc::new(build_sets(&ctx.plan.config.eval)?));
    }
    Ok(g.clone().expect("built above"))
}

/// Builds the configured probe sets.
pub fn build_sets(cfg: &crate::config::EvalSection) -> Result<Vec<ProbeSet>> {
    let mut out = vec![];
    for s in &cfg.sets {
        let train = s
            .train
            .open()
            .with_context(|| format!("probe set {}: opening {}", s.name, s.train))?;
        let test = match &s.test {
            Some(t) => Some(
                t.open()
                    .with_context(|| format!("probe set {}: opening {t}", s.name))?,
            ),
            None => None,
        };
        out.push(
            ProbeSet::build(&s.name, train.as_ref(), test.as_deref(), &s.set)
                .with_context(|| format!("probe set {}", s.name))?,
        );
    }
    Ok(out)
}

/// A copy of a backbone for the probes, in f32 on the device `eval.device` names (`on`):
/// `auto` is where the backbone is (the run's device: a GPU run extracts its probe
/// features on the GPU), `cpu` the host, `cuda:N` a GPU. Always a copy, so training may
/// go on changing the original. The probes' fits run on the host either way.
pub fn probe_copy(vit: &Vit, on: &str) -> anyhow::Result<Vit> {
    let dev = match on {
        "auto" => vit.device(),
        spec => crate::runtime::device(spec)?,
    };
    let copy = if vit.device().same_device(&dev) {
        vit.deep_clone()?
    } else {
        vit.to_device(&dev)?
    };
    Ok(if copy.dtype() == candle_core::DType::F32 {
        copy
    } else {
        copy.cast(candle_core::DType::F32)?
    })
}

/// How a device is named in reports: `cpu`, `cuda:N`.
pub fn device_name(dev: &candle_core::Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Runs the probes on a backbone (used by the evaluator and by `dinod probe`).
pub fn evaluate(
    vit: &Vit,
    sets: &[ProbeSet],
    cfg: &crate::config::EvalSection,
    step: u64,
) -> Result<Evaluation> {
    let t0 = Instant::now();
    let mut report = eval_probes::run_probes(vit, sets, &cfg.probes)?;
    report.step = Some(step);
    let metrics = report.metrics();
    Ok(Evaluation {
        fallback: None,
        device: device_name(&vit.device()),
        step,
        metrics,
        report: serde_json::to_value(&report)?,
        ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

impl Actor for EvaluatorActor {
    type Msg = EvalMsg;
    type State = EvalState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        ctx: Arc<Ctx>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.register(NAME, "evaluator");
        me.send_interval(std::time::Duration::from_millis(200), || EvalMsg::Tick);
        Ok(EvalState {
            worker: Worker::spawn("dinod-eval")?,
            ctx,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EvalMsg::Tick => {
                let step = st.ctx.engine.lock().ts.step;
                st.ctx.faults.maybe_panic_since(NAME, step);
            }
            EvalMsg::Evaluate {
                step,
                teacher,
                reply,
            } => {
                st.ctx.board.handled(NAME);
                st.ctx.board.phase(NAME, ActorPhase::Eval);
                let ctx = st.ctx.clone();
                let r = st
                    .worker
                    .run(move || -> Result<Evaluation> {
                        let t0 = Instant::now();
                        let sets = shared_sets(&ctx)?;
                        let mut ev = evaluate_or_on_host(&teacher, &sets, &ctx.plan.config.eval, step, Some((&ctx.faults, NAME)))?;
                        ev.ms = t0.elapsed().as_secs_f64() * 1e3;
                        ctx.store.record_probe(step, "probes", &serde_json::json!({"metrics": ev.metrics, "ms": ev.ms, "report": ev.report}))?;
                        if let Some(d) = ev.metrics.dense_miou {
                            ctx.store.set_score(step, "dense", d)?;
                        }
                        Ok(ev)
                    })
                    .await?;
                st.ctx.board.phase(NAME, ActorPhase::Idle);
                let _ = reply.send(r.map_err(|e| format!("{e:#}")));
            }
        }
        Ok(())
    }
}
