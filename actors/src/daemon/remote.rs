//! Data parallelism over processes (`[runtime.cluster]`): the daemon is rank 0 of a group
//! of `dinod worker` processes that join it over TCP (`crate::cluster`).
//!
//! Rank 0 keeps everything that has state: the `TrainState`, AdamW, the EMA, the stage
//! machine, the data loader and the checkpoints. A worker is stateless between steps:
//! for each phase of a step, rank 0 sends it the weights the phase reads (the teacher and
//! the Gram teacher, then the student, in master precision) and its part of the global
//! batch; the worker computes that phase on them exactly as a thread member computes on
//! its copy of rank 0's weights, taking part in the group-wide Sinkhorn-Knopp sums and
//! the gradient and loss all-reduces. Rank 0 ends with the group's mean gradients, as
//! with thread members, so a run over processes trains bit for bit what the same group of
//! threads trains.
//!
//! Failures: a worker that dies fails rank 0's next collective at once (its connection
//! closes), which is a recoverable device fault: the trainer restarts, the group is
//! dropped and the step is redone on a group admitted again on the same listener, within
//! `runtime.cluster.join_wait_s`. A worker whose group fails joins again by itself; at
//! the end of the run the daemon says goodbye and the workers exit 0.
//!
//! Must not know: the loss maths (it calls `model`'s phases), the actors' protocol.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::board::Board;
use crate::cluster::{self, TcpMember};
use crate::config::Plan;
use model::dist::Collective;
use model::{Batch, StepHparams, TrainState};

/// The daemon's side: its listener (bound once, on first use) and the current group.
#[derive(Default)]
pub struct ClusterSlot {
    listener: OnceLock<TcpListener>,
    group: Mutex<Option<Arc<TcpMember>>>,
}

/// The identity every node of `plan`'s group must share.
pub fn identity(plan: &Plan) -> cluster::Identity {
    cluster::Identity {
        code_version: crate::engine::CODE_VERSION.to_string(),
        config_hash: plan.config_hash.clone(),
    }
}

impl ClusterSlot {
    /// The group of `[runtime.cluster]` (None without one), admitted on first use and
    /// kept until [`ClusterSlot::reset`]; `dinod status` follows the admission on `board`.
    pub fn group(&self, plan: &Plan, board: &Board) -> Result<Option<Arc<TcpMember>>> {
        let Some(c) = &plan.config.runtime.cluster else {
            return Ok(None);
        };
        let mut g = self
            .group
            .lock()
            .map_err(|_| anyhow!("the cluster lock is poisoned"))?;
        if let Some(m) = &*g {
            return Ok(Some(m.clone()));
        }
        let l = match self.listener.get() {
            Some(l) => l,
            None => {
                if let Some(w) = cluster::Token::permission_warning(&c.token_file) {
                    tracing::warn!("{w}");
                }
                let l = cluster::bind(&c.listen)?;
                let at = l.local_addr()?;
                tracing::info!(%at, nodes = c.nodes, "listening for workers");
                eprintln!("listening on {at} for {} worker(s)", c.nodes - 1);
                self.listener.get_or_init(|| l)
            }
        };
        let token = cluster::Token::from_file(&c.token_file)?;
        let rt = &plan.config.runtime;
        let note = |st: &cluster::GroupStatus| {
            metrics::gauge!("dinod_cluster_nodes").set((st.joined.len() + 1) as f64);
            let st = st.clone();
            board.run(|r| r.cluster = Some(st));
        };
        let m = cluster::admit_group(
            l,
            c.nodes,
            &identity(plan),
            &token,
            Duration::from_secs_f64(c.join_wait_s),
            Duration::from_secs_f64(rt.collective_timeout_s),
            &note,
            // a stop request (`dinod stop`, SIGTERM) must not wait out the admission
            &|| board.run(|r| r.stopping.is_some()),
        );
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                let stopping = board.run(|r| r.stopping.is_some());
                set_state(
                    board,
                    if stopping { "stopped" } else { "failed" },
                    &format!("{e:#}"),
                );
                return Err(e).context("admitting the cluster's workers");
            }
        };
        let m = Arc::new(m);
        *g = Some(m.clone());
        Ok(Some(m))
    }

    /// Drops the group after a failure (the next step admits the workers again).
    pub fn reset(&self) {
        if let Ok(mut g) = self.group.lock() {
            *g = None;
        }
    }

    /// The run is over: the workers are told so and exit.
    pub fn bye(&self) {
        if let Ok(mut g) = self.group.lock() {
            if let Some(m) = g.take() {
                m.bye();
            }
        }
    }
}

/// The error of a failed step of rank 0 over the group: a failure of the group itself
/// (a member gone, failed or silent; see [`cluster::GroupFailed`]) becomes a
/// recoverable device fault; rank 0's own failure aborts the group so the workers stop
/// waiting, and stays what it was. Either way the group is dropped.
pub fn group_error(
    slot: &ClusterSlot,
    board: &Board,
    m: &TcpMember,
    e: anyhow::Error,
) -> anyhow::Error {
    slot.reset();
    match m.failure() {
        Some(why) => {
            set_state(
                board,
                "failed",
                &format!("the group failed ({why}); it is admitted again at the next step"),
            );
            anyhow::Error::new(cluster::GroupFailed(why)).context(format!("{e:#}"))
        }
        None => {
            m.abort(&format!("{e:#}"));
            e
        }
    }
}

/// Marks the group's status `state` with a line saying why (the workers it had are gone
/// from it).
fn set_state(board: &Board, state: &str, line: &str) {
    // this process is the group that is left
    metrics::gauge!("dinod_cluster_nodes").set(1.0);
    if state == "failed" {
        metrics::counter!("dinod_cluster_group_failures_total").increment(1);
    }
    board.run(|r| {
        let mut st = r.cluster.take().unwrap_or_default();
        st.state = state.into();
        st.joined.clear();
        st.line = line.to_string();
        r.cluster = Some(st);
    });
}

/// Which phase of a step an order is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Teacher,
    Student,
}

/// What rank 0 tells a worker about a phase; the tensors follow it in the message.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    phase: Phase,
    step: u64,
    seed: u64,
    optim_t: u64,
    gram_updates: u32,
    hp: StepHparams,
    /// Teacher phase: the worker's part of the batch (images per member, whether local
    /// and Gram crops follow) and whether a Gram teacher's weights follow.
    shard: Option<ShardMeta>,
    gram_teacher: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardMeta {
    batch_size: usize,
    local: bool,
    gram: bool,
}

fn message(order: &Order, tensors: &[&Tensor]) -> Result<Vec<u8>> {
    let head = serde_json::to_vec(order)?;
    let mut out = Vec::with_capacity(16 + head.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    cluster::encode_tensors(tensors, &mut out)?;
    Ok(out)
}

fn parse(msg: &[u8]) -> Result<(Order, Vec<Tensor>)> {
    if msg.len() < 8 {
        bail!("a control message of {} bytes", msg.len())
    }
    let n = u64::from_le_bytes(msg[..8].try_into().expect("8 bytes")) as usize;
    let head = msg
        .get(8..8 + n)
        .context("a control message ends in its header")?;
    let order: Order = serde_json::from_slice(head).context("an unreadable order")?;
    let (tensors, rest) = cluster::decode_tensors(&msg[8 + n..])?;
    if !rest.is_empty() {
        bail!("{} bytes after an order's tensors", rest.len())
    }
    Ok((order, tensors))
}

fn order(ts: &TrainState, phase: Phase, hp: &StepHparams, shard: Option<ShardMeta>) -> Order {
    Order {
        phase,
        step: ts.step,
        seed: ts.seed,
        optim_t: ts.optim.t,
        gram_updates: ts.gram_updates,
        hp: *hp,
        shard,
        gram_teacher: ts.gram_teacher.is_some(),
    }
}

fn teacher_tensors(ts: &TrainState) -> Vec<&Tensor> {
    let mut v: Vec<&Tensor> = ts
        .teacher
        .modules()
        .iter()
        .flat_map(|(_, ps)| ps.tensors().iter())
        .collect();
    if let Some(g) = &ts.gram_teacher {
        v.extend(g.params.tensors().iter());
    }
    v
}

fn student_tensors(ts: &TrainState) -> Vec<&Tensor> {
    ts.student
        .modules()
        .iter()
        .flat_map(|(_, ps)| ps.tensors().iter())
        .collect()
}

/// Rank 0, before its own teacher phase: sends every worker the teacher's weights and
/// its part of `batch`.
pub fn order_teacher_phase(
    m: &TcpMember,
    ts: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
) -> Result<()> {
    let world = m.world();
    let weights = teacher_tensors(ts);
    for r in 1..world {
        let shard = batch.shard(r, world)?;
        let masks = Tensor::from_vec(shard.masks.clone(), shard.masks.len(), &Device::Cpu)?;
        let mut tensors: Vec<&Tensor> = vec![&shard.global];
        tensors.extend(shard.local.as_ref());
        tensors.extend(shard.gram.as_ref());
        tensors.push(&masks);
        tensors.extend(weights.iter().copied());
        let meta = ShardMeta {
            batch_size: shard.batch_size,
            local: shard.local.is_some(),
            gram: shard.gram.is_some(),
        };
        let msg = message(&order(ts, Phase::Teacher, hp, Some(meta)), &tensors)?;
        m.send_control(r, &msg).with_context(|| {
            format!(
                "sending the teacher phase of step {} to member {r}",
                ts.step
            )
        })?;
    }
    Ok(())
}

/// Rank 0, before its own student phase: sends every worker the student's weights.
pub fn order_student_phase(m: &TcpMember, ts: &TrainState, hp: &StepHparams) -> Result<()> {
    let msg = message(&order(ts, Phase::Student, hp, None), &student_tensors(ts))?;
    for r in 1..m.world() {
        m.send_control(r, &msg).with_context(|| {
            format!(
                "sending the student phase of step {} to member {r}",
                ts.step
            )
        })?;
    }
    Ok(())
}

fn load(
    params: &mut model::params::ParamSet,
    it: &mut impl Iterator<Item = Tensor>,
    what: &str,
) -> Result<()> {
    for i in 0..params.len() {
        let t = it
            .next()
            .with_context(|| format!("the order has too few tensors for the {what}"))?;
        let want = params.get(i);
        if t.dims() != want.dims() {
            bail!(
                "the {what}'s parameter {i} is {:?} here and {:?} in the order: the nodes build different models",
                want.dims(),
                t.dims()
            )
        }
        let t = t.to_dtype(want.dtype())?;
        params.set(i, t)?;
    }
    Ok(())
}

/// What a worker keeps between the two phases of a step.
struct Pending {
    step: u64,
    shard: Batch,
    teacher: model::TeacherOutput,
}

/// Serves one group until the coordinator says goodbye (`Ok`), or fails. `skel` is the
/// worker's model (its weights are overwritten by every order).
fn serve(m: &TcpMember, skel: &mut TrainState, plan: &Plan) -> Result<()> {
    let dt = plan.config.precision.compute_dtype();
    let log_every = plan.config.runtime.log_every_steps.max(1);
    let mut pending: Option<Pending> = None;
    loop {
        let Some(msg) = m.recv_control()? else {
            return Ok(());
        };
        let (o, tensors) = match parse(&msg) {
            Ok(x) => x,
            Err(e) => {
                // the others must not wait for this member's next collective
                m.abort(&format!("{e:#}"));
                return Err(e);
            }
        };
        skel.step = o.step;
        skel.seed = o.seed;
        skel.optim.t = o.optim_t;
        skel.gram_updates = o.gram_updates;
        let mut it = tensors.into_iter();
        let r = match o.phase {
            Phase::Teacher => (|| -> Result<()> {
                let meta = o
                    .shard
                    .as_ref()
                    .context("a teacher order without a batch")?;
                let global = it.next().context("no global crops")?;
                let local = if meta.local {
                    Some(it.next().context("no local crops")?)
                } else {
                    None
                };
                let gram = if meta.gram {
                    Some(it.next().context("no Gram crops")?)
                } else {
                    None
                };
                let masks = it.next().context("no masks")?.to_vec1::<u8>()?;
                let shard = Batch::new(meta.batch_size, global, local, gram, masks)?;
                load(
                    &mut skel.teacher.backbone.params,
                    &mut it,
                    "teacher backbone",
                )?;
                load(
                    &mut skel.teacher.dino_head.params,
                    &mut it,
                    "teacher DINO head",
                )?;
                load(
                    &mut skel.teacher.ibot_head.params,
                    &mut it,
                    "teacher iBOT head",
                )?;
                if o.gram_teacher {
                    if skel.gram_teacher.is_none() {
                        skel.refresh_gram_teacher()?;
                    }
                    let g = skel.gram_teacher.as_mut().expect("made above");
                    load(&mut g.params, &mut it, "Gram teacher")?;
                } else {
                    skel.gram_teacher = None;
                }
                if it.next().is_some() {
                    bail!("the teacher order has more tensors than this model")
                }
                let view = skel.phase_view(model::Side::Teacher, dt, &Device::Cpu)?;
                let teacher = model::teacher_phase_in(&view, &shard, &o.hp, Some(m), &mut |_| {})?;
                pending = Some(Pending {
                    step: o.step,
                    shard,
                    teacher,
                });
                Ok(())
            })(),
            Phase::Student => (|| -> Result<()> {
                let p = pending
                    .take()
                    .filter(|p| p.step == o.step)
                    .with_context(|| {
                        format!(
                            "a student order for step {} without its teacher phase",
                            o.step
                        )
                    })?;
                load(
                    &mut skel.student.backbone.params,
                    &mut it,
                    "student backbone",
                )?;
                load(
                    &mut skel.student.dino_head.params,
                    &mut it,
                    "student DINO head",
                )?;
                load(
                    &mut skel.student.ibot_head.params,
                    &mut it,
                    "student iBOT head",
                )?;
                if it.next().is_some() {
                    bail!("the student order has more tensors than this model")
                }
                let view = skel.phase_view(model::Side::Student, dt, &Device::Cpu)?;
                let mut out = model::student_phase(&view, &p.shard, &o.hp, p.teacher, &mut |_| {})?;
                model::dist::all_reduce_mean_grads(m, &mut out.grads, &view.student)?;
                model::dist::all_reduce_mean_losses(m, &mut out.losses)?;
                if o.step.is_multiple_of(log_every) {
                    tracing::info!(step = o.step, loss = out.losses.total, "worker step");
                }
                Ok(())
            })(),
        };
        if let Err(e) = r {
            // the others must not wait for this member's next collective
            m.abort(&format!("{e:#}"));
            return Err(e);
        }
    }
}

/// `dinod worker`: joins the daemon at `addr` as one member of its `[runtime.cluster]`
/// group and serves it, joining again whenever the group fails, until the daemon ends
/// the run (exit 0) or no daemon admits it within `join_wait_s` (an error).
pub fn run_worker(plan: &Plan, addr: &str) -> Result<()> {
    let c =
        plan.config.runtime.cluster.as_ref().context(
            "the recipe has no [runtime.cluster]: a worker joins the group it describes",
        )?;
    let token = cluster::Token::from_file(&c.token_file)?;
    if let Some(w) = cluster::Token::permission_warning(&c.token_file) {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    let rt = &plan.config.runtime;
    let timeout = Duration::from_secs_f64(rt.collective_timeout_s);
    let join_wait = Duration::from_secs_f64(c.join_wait_s);
    eprintln!("building the model");
    let mut skel = TrainState::new(&plan.ssl, plan.config.seed, plan.config.precision.dtype())
        .context("building the worker's model")?;
    let me = identity(plan);
    loop {
        let m = cluster::join(addr, &me, &token, join_wait, timeout)?;
        match serve(&m, &mut skel, plan) {
            Ok(()) => {
                eprintln!("the daemon ended the run; this worker exits");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("the group failed: {e:#}; joining again");
                eprintln!("the group failed: {e:#}; joining again");
            }
        }
    }
}
