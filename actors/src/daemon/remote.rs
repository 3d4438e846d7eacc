//! Data parallelism over processes (`[runtime.cluster]`): the daemon is rank 0 of a group
//! of `dinod worker` processes that join it over TCP (`crate::cluster`).
//!
//! Rank 0 owns the run: the `TrainState`, the stage machine, the data loader and the
//! checkpoints. Each worker keeps a copy of the trainable state (student, teacher, Gram
//! teacher, AdamW moments) and moves it as rank 0 moves its own, DDP-style: every member
//! ends a step with the same all-reduced gradients, and rank 0's next order says how the
//! step ended (committed with these clipping factors, learning rates and EMA momentum,
//! or discarded), so the worker applies the same AdamW and EMA updates to the same bits.
//! Rank 0 sends the whole state only when a worker's copy cannot follow by itself: a
//! newly admitted group, a reload of the state (resume, rollback), a new Gram teacher,
//! or anything else that moved rank 0's step, update count or Gram teacher otherwise
//! than by one committed step ([`Held`]). Every `runtime.cluster.verify_every_steps`
//! steps the order carries rank 0's digest of its state, and a worker whose copy differs
//! fails the group, which is admitted again with the whole state. Per step a worker
//! receives its part of the global batch (or, with `worker_data = "local"`, which batch
//! to build its part of from its own `data.source`: [`LocalData`], checked against
//! rank 0's digest of that part on the same steps) and the summed gradients, and sends
//! its gradients: the weights no longer cross the network each step.
//!
//! Each worker computes each phase exactly as a thread member computes on its copy of
//! rank 0's weights, taking part in the group-wide Sinkhorn-Knopp sums and the gradient
//! and loss all-reduces, so a run over processes trains bit for bit what the same group
//! of threads trains.
//!
//! Failures: a worker that dies fails rank 0's next collective at once (its connection
//! closes), which is a recoverable device fault: the trainer restarts, the group is
//! dropped and the step is redone on a group admitted again on the same listener, within
//! `runtime.cluster.join_wait_s`. A worker whose group fails joins again by itself and
//! gets the whole state again; at the end of the run the daemon says goodbye and the
//! workers exit 0.
//!
//! Must not know: the loss maths (it calls `model`'s phases), the actors' protocol.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::board::Board;
use super::faults::Faults;
use crate::cluster::{self, TcpMember};
use crate::config::Plan;
use model::dist::Collective;
use model::{Batch, StepHparams, TrainState};

/// The daemon's side: its listener (bound once, on first use), the current group and
/// what its workers' copies of the state hold.
#[derive(Default)]
pub struct ClusterSlot {
    listener: OnceLock<TcpListener>,
    group: Mutex<Option<Arc<TcpMember>>>,
    copies: Mutex<Copies>,
    /// The size of the last group formed (0: none yet): `runtime.cluster.nodes`, or fewer
    /// with `min_nodes`. Rank 0's loader loads its part of that many.
    formed: std::sync::atomic::AtomicUsize,
    /// Changes of the group's size for the event log (`cluster.short`, `cluster.regroup`),
    /// taken by the caller of [`ClusterSlot::group`], which knows the step.
    news: Mutex<Vec<GroupNews>>,
}

/// A change of the group's size, for an event.
#[derive(Debug, Clone)]
pub struct GroupNews {
    pub warn: bool,
    pub kind: &'static str,
    pub message: String,
    pub fields: serde_json::Value,
}

/// Where a copy of the state stands: the same `Held` on rank 0 and on a worker means the
/// same bits, as long as nothing changes rank 0's weights without moving one of these
/// (the step and update count move with every commit, `gram_updates` with every new
/// Gram teacher, `generation` with every reload of the whole state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    step: u64,
    optim_t: u64,
    gram_updates: u32,
    gram_teacher: bool,
    generation: u64,
}

impl Held {
    fn of(ts: &TrainState, generation: u64) -> Held {
        Held {
            step: ts.step,
            optim_t: ts.optim.t,
            gram_updates: ts.gram_updates,
            gram_teacher: ts.gram_teacher.is_some(),
            generation,
        }
    }

    /// Where one committed step (AdamW, EMA) takes a copy.
    fn committed(self) -> Held {
        Held {
            step: self.step + 1,
            optim_t: self.optim_t + 1,
            ..self
        }
    }
}

/// Rank 0's record of the workers' copies: what they hold since the last order, and how
/// the step they computed ended here (its clipping, AdamW and EMA, noted as they happen).
#[derive(Default)]
struct Copies {
    held: Option<Held>,
    clip: Option<(u64, [f64; 3])>,
    adamw: Option<(u64, StepHparams)>,
    ema: Option<(u64, f64)>,
    /// Rank 0 made a new Gram teacher from its EMA teacher, standing at this step with
    /// this Gram-teacher count.
    gram_refresh: Option<(u64, u32)>,
    /// Whole states sent since the daemon started, the step of the last one, and the last
    /// step whose order carried the digest (for `dinod status`).
    full_syncs: u64,
    full_sync_step: Option<u64>,
    verified_step: Option<u64>,
    /// How long rank 0's backward pass waits for the group's gradient sums after it
    /// ends: a moving mean over the recent steps, in ms (for `dinod status`).
    grad_wait_ms: Option<f64>,
    /// How long rank 0 waits per step for each member (by rank) to enter the group's
    /// sums: a moving mean over the recent steps of this group, in ms.
    member_wait_ms: Vec<f64>,
}

impl Copies {
    /// How the workers' copies get to `now`, rank 0's state: as they are, by the commit
    /// of the step they computed (when every part of it was noted and nothing else moved
    /// the state), else with the whole state.
    fn sync_to(&self, now: Held) -> CopySync {
        match self.held {
            Some(h) if h == now => CopySync::Keep,
            Some(h) if h.committed() == now => match self.commit_of(h.step) {
                Some(c) => CopySync::Commit(c),
                None => CopySync::Full,
            },
            // the commit, then a Gram teacher copied from the EMA teacher right after it
            Some(h)
                if Held {
                    gram_updates: h.gram_updates + 1,
                    gram_teacher: true,
                    ..h.committed()
                } == now
                    && self.gram_refresh == Some((now.step, now.gram_updates)) =>
            {
                match self.commit_of(h.step) {
                    Some(c) => CopySync::Commit(Commit {
                        gram_from_teacher: true,
                        ..c
                    }),
                    None => CopySync::Full,
                }
            }
            _ => CopySync::Full,
        }
    }

    /// The commit of `step` as rank 0 made it, if every part of it was noted.
    fn commit_of(&self, step: u64) -> Option<Commit> {
        match (self.clip, self.adamw, self.ema) {
            (Some((a, clip)), Some((b, hp)), Some((c, momentum)))
                if a == step && b == step && c == step =>
            {
                Some(Commit {
                    step,
                    clip,
                    hp: StepHparams { momentum, ..hp },
                    gram_from_teacher: false,
                })
            }
            _ => None,
        }
    }
}

/// The identity every node of `plan`'s group must share.
pub fn identity(plan: &Plan) -> cluster::Identity {
    cluster::Identity {
        code_version: crate::engine::CODE_VERSION.to_string(),
        config_hash: plan.config_hash.clone(),
        // (a worker's `--device`, in its plan)
        device: plan.config.runtime.device.clone(),
    }
}

impl ClusterSlot {
    /// The group of `[runtime.cluster]` (None without one), admitted on first use and
    /// kept until [`ClusterSlot::reset`]; `dinod status` follows the admission on `board`.
    /// `regroup` (at a step's start, before any order of it): a group formed with fewer
    /// than `nodes` is formed again when a worker is waiting to join.
    pub fn group(
        &self,
        plan: &Plan,
        board: &Board,
        regroup: bool,
    ) -> Result<Option<Arc<TcpMember>>> {
        let Some(c) = &plan.config.runtime.cluster else {
            return Ok(None);
        };
        let mut g = self
            .group
            .lock()
            .map_err(|_| anyhow!("the cluster lock is poisoned"))?;
        let mut first = None;
        if let Some(m) = &*g {
            // a group formed short (runtime.cluster.min_nodes) admits a worker that came
            // back: its connection waits in the listener's backlog until this step
            let back = match (regroup && m.world() < c.nodes, self.listener.get()) {
                (true, Some(l)) => {
                    let token = cluster::Token::from_file(&c.token_file)?;
                    cluster::vet_waiting(l, &identity(plan), &token)
                }
                _ => None,
            };
            let v = match back {
                None => return Ok(Some(m.clone())),
                // (not a node of this group: the group stands)
                Some(Err((from, why))) => {
                    tracing::warn!(%from, "refused a node: {why}");
                    eprintln!("refused the node at {from}: {why}");
                    return Ok(Some(m.clone()));
                }
                Some(Ok(v)) => v,
            };
            let from = v.from();
            let why = format!(
                "the group of {} of {} nodes is formed again: the node at {from} is back",
                m.world(),
                c.nodes
            );
            eprintln!("{why}");
            self.tell(GroupNews {
                warn: false,
                kind: "cluster.regroup",
                message: why.clone(),
                fields: serde_json::json!({"nodes": m.world(), "planned": c.nodes, "back": from.to_string()}),
            });
            // its workers hear why and join again; the step goes on with the new group
            m.dissolve(&why);
            *g = None;
            self.forget_copies();
            first = Some(v);
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
            let mut st = st.clone();
            board.run(|r| {
                // (what the copies were sent so far stays shown while a group is admitted)
                st.copies = r.cluster.take().and_then(|c| c.copies);
                r.cluster = Some(st);
            });
        };
        let m = cluster::admit_group(
            l,
            cluster::GroupSize {
                nodes: c.nodes,
                fewest: c.fewest(),
            },
            first,
            &identity(plan),
            &token,
            Duration::from_secs_f64(c.join_wait_s),
            Duration::from_secs_f64(rt.collective_timeout_s),
            c.reduce,
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
        let was = self
            .formed
            .swap(m.world(), std::sync::atomic::Ordering::SeqCst);
        if m.world() < c.nodes && was != m.world() {
            self.tell(GroupNews {
                warn: true,
                kind: "cluster.short",
                message: format!(
                    "the group formed with {} of {} nodes after waiting {:.0} s for the others (runtime.cluster.min_nodes = {}): training goes on with the global batch split among them; a node that comes back is admitted at the next step",
                    m.world(),
                    c.nodes,
                    c.join_wait_s,
                    c.fewest()
                ),
                fields: serde_json::json!({"nodes": m.world(), "planned": c.nodes}),
            });
        } else if m.world() == c.nodes && was != 0 && was < c.nodes {
            self.tell(GroupNews {
                warn: false,
                kind: "cluster.complete",
                message: format!("the group has all {} nodes again", c.nodes),
                fields: serde_json::json!({"nodes": c.nodes, "was": was}),
            });
        }
        // a new group's workers hold nothing yet
        self.forget_copies();
        *g = Some(m.clone());
        Ok(Some(m))
    }

    fn tell(&self, n: GroupNews) {
        match self.news.lock() {
            Ok(mut v) => v.push(n),
            Err(e) => e.into_inner().push(n),
        }
    }

    /// The changes of the group's size since the last call, for the event log.
    pub fn take_news(&self) -> Vec<GroupNews> {
        match self.news.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(e) => std::mem::take(&mut *e.into_inner()),
        }
    }

    /// The size of the last group formed, the daemon included (`None` before the first).
    pub fn formed(&self) -> Option<usize> {
        match self.formed.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            n => Some(n),
        }
    }

    /// Drops the group after a failure (the next step admits the workers again).
    pub fn reset(&self) {
        if let Ok(mut g) = self.group.lock() {
            *g = None;
        }
        self.forget_copies();
    }

    fn forget_copies(&self) {
        let mut c = match self.copies.lock() {
            Ok(c) => c,
            Err(e) => e.into_inner(),
        };
        *c = Copies {
            full_syncs: c.full_syncs,
            full_sync_step: c.full_sync_step,
            verified_step: c.verified_step,
            grad_wait_ms: c.grad_wait_ms,
            ..Copies::default()
        };
    }

    fn copies(&self) -> std::sync::MutexGuard<'_, Copies> {
        match self.copies.lock() {
            Ok(c) => c,
            Err(e) => e.into_inner(),
        }
    }

    /// Shows the copies' status (and this process's traffic) in `dinod status`.
    pub fn publish(&self, board: &Board, worker_data: crate::config::WorkerData) {
        let (sent_bytes, received_bytes) = cluster::traffic();
        let st = {
            let c = self.copies();
            cluster::CopiesStatus {
                whole_states: c.full_syncs,
                whole_state_step: c.full_sync_step,
                verified_step: c.verified_step,
                sent_bytes,
                received_bytes,
                worker_data: match worker_data {
                    crate::config::WorkerData::Sent => "sent",
                    crate::config::WorkerData::Local => "local",
                }
                .into(),
                grad_wait_ms: c.grad_wait_ms,
                member_wait_ms: c.member_wait_ms.clone(),
            }
        };
        board.run(|r| {
            if let Some(g) = &mut r.cluster {
                g.copies = Some(st);
            }
        });
    }

    /// Rank 0's backward pass of a step waited `waited` for the group's gradient sums
    /// after it ended (the communication the overlap did not hide).
    pub fn note_grad_wait(&self, waited: Duration) {
        let ms = waited.as_secs_f64() * 1e3;
        metrics::gauge!("dinod_cluster_grad_wait_seconds").set(waited.as_secs_f64());
        let mut c = self.copies();
        // a mean over about the last 10 steps, the first step as it is
        c.grad_wait_ms = Some(c.grad_wait_ms.map_or(ms, |m| 0.9 * m + 0.1 * ms));
    }

    /// How long rank 0 waited in one step for each member (by rank) to enter the sums
    /// ([`TcpMember::take_waits`]): a straggler, a slower GPU or link, shows here.
    pub fn note_member_waits(&self, waits: &[Duration]) {
        for (r, w) in waits.iter().enumerate().skip(1) {
            metrics::gauge!("dinod_cluster_member_wait_seconds", "rank" => r.to_string())
                .set(w.as_secs_f64());
        }
        let mut c = self.copies();
        let ms: Vec<f64> = waits.iter().map(|w| w.as_secs_f64() * 1e3).collect();
        // a mean over about the last 10 steps of this group, the first step as it is
        c.member_wait_ms = if c.member_wait_ms.len() == ms.len() {
            c.member_wait_ms
                .iter()
                .zip(&ms)
                .map(|(m, x)| 0.9 * m + 0.1 * x)
                .collect()
        } else {
            ms
        };
    }

    /// Rank 0 clipped the group's gradients of `step` by `coefs` (the workers hold the
    /// same gradients, unclipped).
    pub fn note_clip(&self, step: u64, coefs: [f64; 3]) {
        self.copies().clip = Some((step, coefs));
    }

    /// Rank 0 applied AdamW to the gradients of `step` with `hp`'s rates.
    pub fn note_adamw(&self, step: u64, hp: &StepHparams) {
        self.copies().adamw = Some((step, *hp));
    }

    /// Rank 0 moved its teacher after the commit of `step` with `momentum`.
    pub fn note_ema(&self, step: u64, momentum: f64) {
        self.copies().ema = Some((step, momentum));
    }

    /// Rank 0 copied its EMA teacher into a new Gram teacher; `ts` is its state right
    /// after. The workers' copies do the same with their own teachers instead of being
    /// sent the whole state.
    pub fn note_gram_refresh(&self, ts: &TrainState) {
        self.copies().gram_refresh = Some((ts.step, ts.gram_updates));
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
            // the step's error ends with the group's reason more often than not: said once
            let step = format!("{e:#}");
            let head = match step.strip_suffix(why.as_str()) {
                Some(h) => h.trim_end_matches(|c: char| c == ':' || c.is_whitespace()),
                None => step.as_str(),
            };
            let failed = anyhow::Error::new(cluster::GroupFailed(why.clone()));
            if head.is_empty() {
                failed
            } else {
                failed.context(head.to_string())
            }
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

/// How rank 0 ended the step whose gradients the workers hold: the same update, applied
/// to the same bits, gives the same state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Commit {
    step: u64,
    /// The clipping factors of the backbone and the heads (1: not clipped).
    clip: [f64; 3],
    /// The rates AdamW used and the EMA's momentum.
    hp: StepHparams,
    /// After the update, rank 0 copied its EMA teacher into a new Gram teacher (a
    /// refresh): the copy does the same with its own teacher, the same bits.
    #[serde(default)]
    gram_from_teacher: bool,
}

/// How a worker's copy reaches rank 0's state before a teacher phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
enum CopySync {
    /// The whole state follows the batch in the message: student, teacher, Gram teacher
    /// (if any), then each student parameter's AdamW moments.
    Full,
    /// The copy is rank 0's state already (the step is computed again, or is the first
    /// after a whole state): the gradients it holds are dropped.
    Keep,
    /// The copy applies this commit to the gradients it holds.
    Commit(Commit),
}

/// What rank 0 tells a worker about a phase; the tensors follow it in the message.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    phase: Phase,
    /// Where rank 0's state stands (the worker's copy must stand there too).
    held: Held,
    seed: u64,
    hp: StepHparams,
    /// Teacher phase: the worker's part of the batch (images per member, whether local
    /// and Gram crops follow) and how its copy follows rank 0's state.
    shard: Option<ShardMeta>,
    sync: Option<CopySync>,
    /// Rank 0's [`crate::engine::weights_digest`], every `verify_every_steps` steps.
    verify: Option<String>,
    /// Teacher phase with `worker_data = "local"`: which batch the worker loads its part
    /// of (no images follow).
    data: Option<DataRef>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardMeta {
    batch_size: usize,
    local: bool,
    gram: bool,
}

/// The batch a worker loads its part of itself: where rank 0's loader started it and
/// with which crops; with the digest of the worker's part, as rank 0 cut it from its
/// whole batch, every `verify_every_steps` steps.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct DataRef {
    batch_index: u64,
    cursor: data::Cursor,
    crops: data::CropConfig,
    source_len: Option<u64>,
    digest: Option<String>,
}

/// The order's reference to `batch` for a worker that loads its own part.
fn data_ref(
    batch: &super::loader::LoadedBatch,
    source_len: Option<u64>,
    digest: Option<String>,
) -> DataRef {
    DataRef {
        batch_index: batch.batch_index,
        cursor: batch.cursor_before,
        crops: (*batch.crops).clone(),
        source_len,
        digest,
    }
}

/// A failure a worker cannot mend by joining again (its data is not rank 0's): it exits.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// BLAKE3 of a part of a batch: its crops' values (as f32, exact for every compute
/// type) and masks, in order.
fn images_digest(b: &Batch) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for t in [Some(&b.global), b.local.as_ref(), b.gram.as_ref()]
        .into_iter()
        .flatten()
    {
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        h.update(&(v.len() as u64).to_le_bytes());
        for x in v {
            h.update(&x.to_le_bytes());
        }
    }
    h.update(&b.masks);
    Ok(h.finalize().to_hex().to_string())
}

/// A worker's own data (`worker_data = "local"`): the source, opened once, and a loader
/// of its part that goes on from batch to batch (prefetching) while rank 0's batches
/// follow each other, and starts again where rank 0's loader did otherwise.
struct LocalData {
    source: Arc<dyn data::Source>,
    cfg: data::DataConfig,
    batch_size: usize,
    seed: u64,
    loader: Option<data::Loader>,
}

impl LocalData {
    fn open(plan: &Plan) -> Result<LocalData> {
        let spec = &plan.config.data.source;
        eprintln!("opening the data source {spec}");
        let source = spec
            .open()
            .with_context(|| format!("this worker cannot open the data source {spec}"))?;
        eprintln!("data source: {}", source.describe());
        Ok(LocalData::with_source(
            plan,
            source,
            plan.config.data.prefetch,
        ))
    }

    /// Parts of `plan`'s batches from `source`, `prefetch` batches ahead.
    fn with_source(plan: &Plan, source: Arc<dyn data::Source>, prefetch: usize) -> LocalData {
        let mut cfg = plan.config.data.clone();
        cfg.prefetch = prefetch;
        LocalData {
            source,
            cfg,
            batch_size: plan.config.train.batch_size,
            seed: plan.config.seed,
            loader: None,
        }
    }

    /// This member's part of the batch `r`, as tensors of `dtype` on `dev`, and the
    /// unreadable files it met first there (each logged here).
    fn part(
        &mut self,
        r: &DataRef,
        part: data::Part,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> Result<(Batch, Vec<WorkerBadInput>)> {
        if r.source_len != self.source.len() {
            let n = |v: Option<u64>| v.map_or("an unknown number of".into(), |v| v.to_string());
            return Err(Fatal(format!(
                "this worker's data source {} holds {} samples, rank 0's {}: every node needs the same data at `data.source` for worker_data = \"local\"",
                self.cfg.source,
                n(self.source.len()),
                n(r.source_len)
            ))
            .into());
        }
        let follows = self.loader.as_ref().is_some_and(|l| {
            l.cursor() == r.cursor && l.options().crops == r.crops && l.options().part == Some(part)
        });
        if !follows {
            self.loader = None; // its threads stop before the new ones start
            let mut cfg = self.cfg.clone();
            cfg.crops = r.crops.clone();
            let mut opts = data::LoaderOptions::from_config(&cfg, self.batch_size, self.seed);
            opts.part = Some(part);
            self.loader = Some(data::Loader::new(self.source.clone(), opts, r.cursor)?);
        }
        let loader = self.loader.as_mut().expect("opened above");
        let h = loader.next_batch()?;
        if h.batch_index != r.batch_index {
            bail!(
                "this worker loaded batch {} where rank 0 ordered batch {}",
                h.batch_index,
                r.batch_index
            )
        }
        for b in &h.bad_inputs {
            tracing::warn!(
                "skipped unreadable input {}: {}",
                b.path.display(),
                b.reason
            );
        }
        let bad = h
            .bad_inputs
            .iter()
            .map(|b| WorkerBadInput {
                member: part.rank,
                path: b.path.display().to_string(),
                reason: b.reason.to_string(),
            })
            .collect();
        let batch = super::loader::to_batch(&h, dtype, true, dev)?;
        loader.recycle(h);
        Ok((batch, bad))
    }
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

/// Every tensor of the state a copy holds, in the order [`load_state`] reads them; the
/// AdamW moments as tensors of their parameters' shapes.
fn state_tensors(ts: &TrainState) -> Result<Vec<Tensor>> {
    let mut v: Vec<Tensor> = Vec::new();
    for m in [&ts.student, &ts.teacher] {
        for (_, ps) in m.modules() {
            v.extend(ps.tensors().iter().cloned());
        }
    }
    if let Some(g) = &ts.gram_teacher {
        v.extend(g.params.tensors().iter().cloned());
    }
    for ((_, ps), mo) in ts.student.modules().iter().zip(&ts.optim.modules) {
        for (p, mm) in ps.tensors().iter().zip(&mo.moments) {
            let (m, v2) = mm.to_tensors(p.dims())?;
            v.push(m);
            v.push(v2);
        }
    }
    Ok(v)
}

/// Rank 0, before its own teacher phase: sends every worker its part of `batch` and
/// what its copy needs to stand where `ts` stands (`generation`: the engine's, see
/// [`crate::engine::Engine::generation`]).
#[allow(clippy::too_many_arguments)]
pub fn order_teacher_phase(
    slot: &ClusterSlot,
    m: &TcpMember,
    ts: &TrainState,
    generation: u64,
    cfg: &crate::config::ClusterSection,
    batch: &super::loader::LoadedBatch,
    source: &Arc<dyn data::Source>,
    plan: &Plan,
    hp: &StepHparams,
) -> Result<()> {
    let verify_every = cfg.verify_every_steps;
    let world = m.world();
    let now = Held::of(ts, generation);
    let mut copies = slot.copies();
    let sync = copies.sync_to(now);
    let state = if sync == CopySync::Full {
        copies.full_syncs += 1;
        copies.full_sync_step = Some(ts.step);
        tracing::info!(
            step = ts.step,
            full_syncs = copies.full_syncs,
            "sending the workers the whole state"
        );
        state_tensors(ts)?
    } else {
        Vec::new()
    };
    let verify = (verify_every > 0 && ts.step.is_multiple_of(verify_every))
        .then(|| crate::engine::weights_digest(ts))
        .transpose()?;
    let local = cfg.worker_data == crate::config::WorkerData::Local;
    // rank 0 loaded its own part only: the workers' parts, to check theirs against, are
    // built here from the same source on the steps that check
    let mut checker = (local && verify.is_some() && batch.part.is_some())
        .then(|| LocalData::with_source(plan, source.clone(), 1));
    let b = &batch.batch;
    for r in 1..world {
        let part = data::Part { rank: r, world };
        let sent: Option<(Batch, Tensor)> = if local {
            None
        } else {
            let shard = batch.part_for(r, world)?;
            let masks = Tensor::from_vec(shard.masks.clone(), shard.masks.len(), &Device::Cpu)?;
            Some((shard, masks))
        };
        let data = if local {
            let digest = match (&verify, &mut checker) {
                (None, _) => None,
                (Some(_), Some(c)) => {
                    let r = data_ref(batch, source.len(), None);
                    let (theirs, _) = c.part(&r, part, b.global.dtype(), b.global.device())?;
                    Some(images_digest(&theirs)?)
                }
                (Some(_), None) => Some(images_digest(&batch.part_for(r, world)?)?),
            };
            Some(data_ref(batch, source.len(), digest))
        } else {
            None
        };
        let mut tensors: Vec<&Tensor> = Vec::new();
        if let Some((shard, masks)) = &sent {
            tensors.push(&shard.global);
            tensors.extend(shard.local.as_ref());
            tensors.extend(shard.gram.as_ref());
            tensors.push(masks);
        }
        tensors.extend(state.iter());
        let o = Order {
            phase: Phase::Teacher,
            held: now,
            seed: ts.seed,
            hp: *hp,
            shard: Some(ShardMeta {
                batch_size: if batch.part.is_some() {
                    b.batch_size
                } else {
                    b.batch_size / world
                },
                local: b.local.is_some(),
                gram: b.gram.is_some(),
            }),
            sync: Some(sync),
            verify: verify.clone(),
            data,
        };
        m.send_control(r, &message(&o, &tensors)?)
            .with_context(|| {
                format!(
                    "sending the teacher phase of step {} to member {r}",
                    ts.step
                )
            })?;
    }
    // (a failed send fails the group, which forgets what its copies held)
    copies.held = Some(now);
    if verify.is_some() {
        // (checked by each worker before its teacher phase, which this step needs)
        copies.verified_step = Some(ts.step);
    }
    copies.clip = None;
    copies.adamw = None;
    copies.ema = None;
    copies.gram_refresh = None;
    Ok(())
}

/// The student phase of one member of a group of processes (rank 0 and the workers run
/// the same): the gradients are averaged over the group on a second thread while the
/// backbone's backward pass runs here, as PyTorch's DDP overlaps its gradient buckets
/// with the backward pass: the heads' first (final once the losses are), then each
/// block's of the backbone as the pass leaves it; then the losses. Every element is
/// summed over the same members in the same order as one all-reduce of all the
/// gradients after the backward pass, so the bits are the same. With `bad` (members
/// loading their own images: the unreadable files this member met first in its part,
/// none on rank 0, whose loader reports its own), also every member's, gathered when
/// the group met any (a sum of their number first: one more exchange only then).
pub fn student_phase_over(
    m: &TcpMember,
    view: &TrainState,
    shard: &Batch,
    hp: &StepHparams,
    teacher: model::TeacherOutput,
    bad: Option<&[WorkerBadInput]>,
) -> Result<StudentOver> {
    let (dino, ibot, rest) = model::student_phase_split(view, shard, hp, teacher, &mut |_| {})?;
    // one thread makes the group's collectives, in the order every member makes them:
    // the heads, then each group of the backbone's gradients as its backward pass
    // finishes it
    enum Job {
        Heads(model::params::Grads, model::params::Grads),
        Backbone(Vec<usize>, Vec<Tensor>),
    }
    type Averaged = (
        model::params::Grads,
        model::params::Grads,
        Vec<(Vec<usize>, Vec<Tensor>)>,
    );
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let student = &view.student;
    let (averaged, done, grad_wait) = std::thread::scope(|s| {
        let comm = std::thread::Builder::new()
            .name("dinod-grad-allreduce".into())
            .spawn_scoped(s, move || -> candle_core::Result<Averaged> {
                let mut heads = None;
                let mut backbone = Vec::new();
                for job in rx {
                    match job {
                        Job::Heads(mut d, mut i) => {
                            model::dist::all_reduce_mean_head_grads(m, &mut d, &mut i, student)?;
                            heads = Some((d, i));
                        }
                        Job::Backbone(idx, ts) => {
                            backbone.push((idx, model::dist::all_reduce_mean_tensors(m, &ts)?));
                        }
                    }
                }
                let (d, i) = heads.ok_or_else(|| {
                    candle_core::Error::Msg("the heads' gradients never came".into())
                })?;
                Ok((d, i, backbone))
            });
        // (a send fails only once the thread stopped on an error, which its join says)
        let _ = tx.send(Job::Heads(dino, ibot));
        let done = rest.backbone_observed(view, &mut |_| {}, &mut |g, idx| {
            let ts = idx
                .iter()
                .map(|&i| {
                    g.tensors[i].take().ok_or_else(|| {
                        candle_core::Error::Msg(format!("no gradient of backbone parameter {i}"))
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let _ = tx.send(Job::Backbone(idx.to_vec(), ts));
            Ok(())
        });
        drop(tx);
        let backward_ended = std::time::Instant::now();
        let averaged = match comm {
            Ok(h) => h.join().unwrap_or_else(|_| {
                Err(candle_core::Error::Msg(
                    "the gradients' all-reduce panicked".into(),
                ))
            }),
            Err(e) => Err(candle_core::Error::Msg(format!(
                "cannot start the gradients' all-reduce: {e}"
            ))),
        };
        (averaged, done, backward_ended.elapsed())
    });
    let (dino, ibot, buckets) = averaged?;
    let mut done = done?;
    for (idx, means) in buckets {
        for (i, t) in idx.into_iter().zip(means) {
            done.backbone.tensors[i] = Some(t);
        }
    }
    let mut out = done.outcome(dino, ibot);
    model::dist::all_reduce_mean_losses(m, &mut out.losses)?;
    let bad = match bad {
        Some(mine) => {
            let mut v = [mine.len() as f64];
            m.all_reduce_sum(&mut v)?;
            if v[0] > 0.0 {
                let all = m.gather(&serde_json::to_string(mine)?)?;
                let mut met = vec![];
                for (r, list) in all.iter().enumerate() {
                    let list: Vec<WorkerBadInput> = serde_json::from_str(list)
                        .with_context(|| format!("member {r}'s unreadable files"))?;
                    met.extend(list);
                }
                met
            } else {
                vec![]
            }
        }
        None => vec![],
    };
    Ok(StudentOver {
        out,
        bad,
        grad_wait,
    })
}

/// What [`student_phase_over`] gives back.
pub struct StudentOver {
    /// The step's outcome, with the group's mean gradients and losses.
    pub out: model::StepOutcome,
    /// Every member's unreadable files (members loading their own images).
    pub bad: Vec<WorkerBadInput>,
    /// How long the gradient sums went on after this member's backward pass ended.
    pub grad_wait: Duration,
}

/// Rank 0 reports the unreadable files the workers met in their own parts of batch
/// `batch_index`, as its loader reports its own: per file the status count, the metric,
/// a `data.bad_input` event naming the worker and the file, and a quarantine record.
pub fn report_workers_bad_inputs(
    ctx: &super::Ctx,
    step: u64,
    batch_index: u64,
    bad: &[WorkerBadInput],
) {
    for b in bad {
        super::loader::report_bad_file(
            ctx,
            "trainer",
            step,
            &b.path,
            &b.reason,
            Some((b.member, batch_index)),
        );
    }
}

/// Rank 0, before its own student phase: tells every worker to compute it (the student
/// is in its copy).
pub fn order_student_phase(
    m: &TcpMember,
    ts: &TrainState,
    generation: u64,
    hp: &StepHparams,
) -> Result<()> {
    let o = Order {
        phase: Phase::Student,
        held: Held::of(ts, generation),
        seed: ts.seed,
        hp: *hp,
        shard: None,
        sync: None,
        verify: None,
        data: None,
    };
    let msg = message(&o, &[])?;
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
        // (decoded on the host: onto this copy's device)
        let t = t.to_dtype(want.dtype())?.to_device(want.device())?;
        params.set(i, t)?;
    }
    Ok(())
}

/// A worker takes rank 0's whole state (the tensors of [`state_tensors`]).
fn load_state(
    skel: &mut TrainState,
    held: &Held,
    it: &mut impl Iterator<Item = Tensor>,
) -> Result<()> {
    for (side, m) in [
        ("student", &mut skel.student),
        ("teacher", &mut skel.teacher),
    ] {
        load(&mut m.backbone.params, it, &format!("{side} backbone"))?;
        load(&mut m.dino_head.params, it, &format!("{side} DINO head"))?;
        load(&mut m.ibot_head.params, it, &format!("{side} iBOT head"))?;
    }
    if held.gram_teacher {
        if skel.gram_teacher.is_none() {
            skel.refresh_gram_teacher()?;
        }
        let g = skel.gram_teacher.as_mut().expect("made above");
        load(&mut g.params, it, "Gram teacher")?;
    } else {
        skel.gram_teacher = None;
    }
    let student = skel.student.modules();
    for ((role, ps), mo) in student.iter().zip(skel.optim.modules.iter_mut()) {
        for (i, p) in ps.tensors().iter().enumerate() {
            let (Some(m), Some(v)) = (it.next(), it.next()) else {
                bail!("the order has too few tensors for the {role}'s AdamW moments")
            };
            if m.dims() != p.dims() || v.dims() != p.dims() {
                bail!(
                    "the {role}'s moments of parameter {i} are {:?} in the order, its parameter {:?} here",
                    m.dims(),
                    p.dims()
                )
            }
            mo.moments[i] = model::optim::Moments::Tensors { m, v }.placed_for(p)?;
        }
    }
    skel.step = held.step;
    skel.optim.t = held.optim_t;
    skel.gram_updates = held.gram_updates;
    Ok(())
}

/// What a worker keeps between the two phases of a step.
struct Pending {
    step: u64,
    shard: Batch,
    teacher: model::TeacherOutput,
    /// Unreadable files first met in its own part (`worker_data = "local"`).
    bad: Option<Vec<WorkerBadInput>>,
}

/// An unreadable file a worker met in its own part of a batch (and replaced by a readable
/// sample, as every loader does), for rank 0's events and quarantine record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerBadInput {
    /// The worker's rank.
    pub member: usize,
    /// The file, as the worker names it (under its own `data.source`).
    pub path: String,
    /// Why it was skipped.
    pub reason: String,
}

/// A worker's copy of the state, and the gradients of the step it computed last.
struct Replica {
    ts: TrainState,
    /// Whether `ts` follows rank 0 (false until a whole state arrives).
    synced: bool,
    grads: Option<(u64, model::ssl::ModelGrads)>,
}

impl Replica {
    /// Brings the copy to where rank 0 stands for the teacher order `o`.
    fn follow(
        &mut self,
        o: &Order,
        it: &mut impl Iterator<Item = Tensor>,
        faults: &Faults,
    ) -> Result<()> {
        let sync = o.sync.context("a teacher order without its sync")?;
        let grads = self.grads.take();
        match sync {
            CopySync::Full => {
                load_state(&mut self.ts, &o.held, it)?;
                self.synced = true;
            }
            CopySync::Keep => {}
            CopySync::Commit(c) => {
                let Some((_, g)) = grads.filter(|(s, _)| *s == c.step) else {
                    bail!(
                        "rank 0 committed step {} but this worker holds no gradients of it",
                        c.step
                    )
                };
                model::state::apply_clip(&g, c.clip)?;
                model::apply_step(&mut self.ts, &g, &c.hp)?;
                if c.gram_from_teacher {
                    self.ts.refresh_gram_teacher()?;
                }
                if faults.take("drift", None, c.step).is_some() {
                    // a drill of the check below: one weight moved by one part in 10^6
                    let p = &mut self.ts.student.backbone.params;
                    let t = (p.get(0) * (1.0 + 1e-6))?;
                    p.set(0, t)?;
                    tracing::warn!(step = c.step, "injected drift of this worker's copy");
                }
            }
        }
        let here = Held::of(&self.ts, o.held.generation);
        if !self.synced || here != o.held {
            bail!(
                "this worker's copy of the state stands at {here:?}, rank 0 at {:?}: it cannot follow",
                o.held
            )
        }
        if let Some(want) = &o.verify {
            let have = crate::engine::weights_digest(&self.ts)?;
            if &have != want {
                bail!(
                    "this worker's copy of the state drifted from rank 0's at step {}: digest {} here, {} there",
                    o.held.step,
                    &have[..16],
                    &want[..16.min(want.len())]
                )
            }
        }
        Ok(())
    }
}

/// Serves one group until the coordinator says goodbye (`Ok`), or fails. `copy` is the
/// worker's copy of the state: a new group sends the whole state before its first step.
fn serve(
    m: &TcpMember,
    copy: &mut Replica,
    own: &mut Option<LocalData>,
    plan: &Plan,
    faults: &Faults,
) -> Result<()> {
    let dt = plan.config.precision.compute_dtype();
    let log_every = plan.config.runtime.log_every_steps.max(1);
    let mut pending: Option<Pending> = None;
    copy.synced = false;
    copy.grads = None;
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
        copy.ts.seed = o.seed;
        let step = o.held.step;
        let mut it = tensors.into_iter();
        let r = match o.phase {
            Phase::Teacher => (|| -> Result<()> {
                let meta = o
                    .shard
                    .as_ref()
                    .context("a teacher order without a batch")?;
                let mut bad = None;
                let shard = match (&o.data, own.as_mut()) {
                    (Some(r), Some(own)) => {
                        let part = data::Part {
                            rank: m.rank(),
                            world: m.world(),
                        };
                        let (shard, met) = own.part(r, part, dt, &copy.ts.device())?;
                        bad = Some(met);
                        if (shard.batch_size, shard.local.is_some(), shard.gram.is_some())
                            != (meta.batch_size, meta.local, meta.gram)
                        {
                            bail!(
                                "this worker's part of batch {} differs in shape from rank 0's ({} images, local crops {}, Gram crops {} here)",
                                r.batch_index,
                                shard.batch_size,
                                shard.local.is_some(),
                                shard.gram.is_some()
                            )
                        }
                        if let Some(want) = &r.digest {
                            let have = images_digest(&shard)?;
                            if &have != want {
                                return Err(Fatal(format!(
                                    "this worker's images of batch {} differ from rank 0's (digest {} here, {} there): `data.source` ({}) does not hold the same files on this node",
                                    r.batch_index,
                                    &have[..16],
                                    &want[..16.min(want.len())],
                                    plan.config.data.source
                                ))
                                .into());
                            }
                        }
                        shard
                    }
                    (Some(_), None) => bail!(
                        "rank 0 ordered this worker to load its own images, but it has no data source open"
                    ),
                    (None, _) => {
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
                        // (decoded on the host: onto this copy's device, as rank 0's
                        // loader places its batches)
                        Batch::new(meta.batch_size, global, local, gram, masks)?
                            .to_device(&copy.ts.device())?
                    }
                };
                copy.follow(&o, &mut it, faults)?;
                if it.next().is_some() {
                    bail!("the teacher order has more tensors than this model")
                }
                let view = copy
                    .ts
                    .phase_view(model::Side::Teacher, dt, &copy.ts.device())?;
                let teacher = model::teacher_phase_in(&view, &shard, &o.hp, Some(m), &mut |_| {})?;
                pending = Some(Pending {
                    step,
                    shard,
                    teacher,
                    bad,
                });
                Ok(())
            })(),
            Phase::Student => (|| -> Result<()> {
                let p = pending.take().filter(|p| p.step == step).with_context(|| {
                    format!("a student order for step {step} without its teacher phase")
                })?;
                if it.next().is_some() {
                    bail!("a student order with tensors")
                }
                let here = Held::of(&copy.ts, o.held.generation);
                if here != o.held {
                    bail!(
                        "a student order for {:?}; this worker's copy stands at {here:?}",
                        o.held
                    )
                }
                injected_worker_faults(faults, step)?;
                let view = copy
                    .ts
                    .phase_view(model::Side::Student, dt, &copy.ts.device())?;
                let out =
                    student_phase_over(m, &view, &p.shard, &o.hp, p.teacher, p.bad.as_deref())?.out;
                // the group's mean gradients, which rank 0 clips and commits (or not)
                copy.grads = Some((step, out.grads));
                if step.is_multiple_of(log_every) {
                    tracing::info!(step, loss = out.losses.total, "worker step");
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

/// A worker's drills in the student phase of STEP (`dinod worker --inject`):
/// `slow:trainer@STEP+MS` holds it back (a straggler, late into the step's sums);
/// `device_error@STEP` and `device_lost@STEP` fail it as a GPU fails, recoverably (the
/// group fails and the worker joins again) or taking the context with it (the worker
/// exits 75 for its supervisor to restart it).
fn injected_worker_faults(faults: &Faults, step: u64) -> Result<()> {
    use super::compute::{DeviceFault, DeviceFaultError, TRAINER};
    faults.maybe_slow(TRAINER, step);
    // (the trainer's drill, which a worker's `device_error@STEP` matches)
    super::compute::injected_device_error(faults, TRAINER, step)?;
    if faults.take("device_lost", None, step).is_some() {
        bail!(DeviceFaultError(DeviceFault::Lost(format!(
            "injected loss of this worker's device context at step {step}"
        ))));
    }
    Ok(())
}

/// Whether a worker's failure left its device's context unusable (a sticky CUDA error,
/// a GPU that is gone), as the daemon classifies its own ([`super::compute::device_fault`]).
fn device_lost(e: &anyhow::Error) -> bool {
    matches!(
        super::compute::device_fault(e),
        Some(super::compute::DeviceFault::Lost(_))
    )
}

/// `dinod worker`: joins the daemon at `addr` as one member of its `[runtime.cluster]`
/// group and serves it, joining again whenever the group fails, until the daemon ends
/// the run (exit 0) or no daemon admits it within `join_wait_s` (an error). On a GPU,
/// a fault that leaves the device's context unusable ends it with
/// [`super::EXIT_DEVICE`] (75) instead, as it ends the daemon: a process that cannot
/// compute any more must be restarted, not join again.
pub fn run_worker(
    plan: &Plan,
    addr: &str,
    inject: &[crate::config::FaultSpec],
    mesh: &cluster::MeshAddr,
) -> Result<i32> {
    let c =
        plan.config.runtime.cluster.as_ref().context(
            "the recipe has no [runtime.cluster]: a worker joins the group it describes",
        )?;
    if let Some(f) = inject.iter().find(|f| match f.kind.as_str() {
        "drift" | "device_error" | "device_lost" => f.actor.is_some(),
        "slow" => f.actor.as_deref() != Some("trainer"),
        _ => true,
    }) {
        return Err(crate::cli::usage(format!(
            "--inject: a worker takes `drift@STEP` (its copy moved after the commit of STEP), `device_error@STEP` and `device_lost@STEP` (its device fails in the step's student phase) and `slow:trainer@STEP+MS` (its student phase of STEP held back: a straggler), not `{}{}`",
            f.kind,
            f.actor.as_deref().map(|a| format!(":{a}")).unwrap_or_default()
        )));
    }
    let faults = Faults::new(inject);
    let token = cluster::Token::from_file(&c.token_file)?;
    if let Some(w) = cluster::Token::permission_warning(&c.token_file) {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    let rt = &plan.config.runtime;
    let timeout = Duration::from_secs_f64(rt.collective_timeout_s);
    let join_wait = Duration::from_secs_f64(c.join_wait_s);
    super::force_device_path_for_bf16(plan);
    eprintln!("building the model");
    let ts = TrainState::new(&plan.ssl, plan.config.seed, plan.config.precision.dtype())
        .context("building the worker's model")?;
    // placed as the daemon places its state, so the updates take the same code path
    let mut copy = Replica {
        ts: crate::engine::place(ts, plan)?,
        synced: false,
        grads: None,
    };
    // its own images: the source is opened before joining, so a node without the data
    // fails here, with the path, rather than in the group's first step
    let mut own = match c.worker_data {
        crate::config::WorkerData::Local => Some(LocalData::open(plan)?),
        crate::config::WorkerData::Sent => None,
    };
    let me = identity(plan);
    loop {
        let m = match cluster::join(addr, &me, &token, join_wait, timeout, mesh) {
            Ok(m) => m,
            // admitted, but the group failed while it formed (a mesh whose links did
            // not all stand, a coordinator that gave up waiting for the others)
            Err(e) if e.downcast_ref::<cluster::GroupFailed>().is_some() => {
                tracing::warn!("the group failed while it formed: {e:#}; joining again");
                eprintln!("the group failed while it formed: {e:#}; joining again");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e),
        };
        match serve(&m, &mut copy, &mut own, plan, &faults) {
            Ok(()) => {
                eprintln!("the daemon ended the run; this worker exits");
                return Ok(0);
            }
            Err(e) if e.downcast_ref::<Fatal>().is_some() => {
                eprintln!("this worker cannot serve the group: {e:#}");
                return Err(e);
            }
            Err(e) if device_lost(&e) => {
                // (its copy of the state is rank 0's: nothing of the run is lost here)
                tracing::error!("this worker's device is unusable: {e:#}");
                eprintln!(
                    "this worker's device is unusable: {e:#}; exit {} (restart it: the group is admitted again without it meanwhile)",
                    super::EXIT_DEVICE
                );
                return Ok(super::EXIT_DEVICE);
            }
            Err(e) => {
                tracing::warn!("the group failed: {e:#}; joining again");
                eprintln!("the group failed: {e:#}; joining again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(lr: f64) -> StepHparams {
        StepHparams {
            lr,
            last_layer_lr: lr,
            weight_decay: 0.04,
            momentum: 0.5,
            teacher_temp: 0.07,
            gram_weight: 0.0,
            local_dino_weight: 1.0,
        }
    }

    /// Gradients of the student's shapes: `k * sin(parameter)`.
    fn synthetic_grads(ts: &TrainState, k: f64) -> model::ssl::ModelGrads {
        let of = |ps: &model::params::ParamSet| model::params::Grads {
            tensors: ps
                .tensors()
                .iter()
                .map(|p| Some((p.sin().unwrap() * k).unwrap()))
                .collect(),
        };
        model::ssl::ModelGrads {
            backbone: of(&ts.student.backbone.params),
            dino_head: of(&ts.student.dino_head.params),
            ibot_head: of(&ts.student.ibot_head.params),
        }
    }

    /// An order's hyperparameters reach the worker bit for bit: the teacher temperature,
    /// rates and momentum of schedules over many steps, and arbitrary doubles. (serde_json
    /// parses some doubles one unit in the last place off without `float_roundtrip`: a
    /// worker then computed its part of a step with another teacher temperature, and a
    /// group of processes left the threads' bits at step 81-89 of the default recipe.)
    #[test]
    fn an_orders_hyperparameters_cross_bit_for_bit() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = i as f64 / 1000.0;
            let hp = StepHparams {
                lr: 5e-4 * (i as f64 / 300.0).min(1.0),
                last_layer_lr: 1e-3 * t,
                weight_decay: 0.04 + 0.16 * (0.5 - 0.5 * (std::f64::consts::PI * t).cos()),
                momentum: 0.992 + 0.008 * (0.5 - 0.5 * (std::f64::consts::PI * t).cos()),
                teacher_temp: 0.04 + (0.07 - 0.04) * t.min(1.0),
                gram_weight: f64::from_bits(x >> 2),
                local_dino_weight: (x as f64) / 3.0e19,
            };
            let o = Order {
                phase: Phase::Student,
                held: Held {
                    step: i,
                    optim_t: i,
                    gram_updates: 0,
                    gram_teacher: false,
                    generation: 0,
                },
                seed: 1,
                hp,
                shard: None,
                sync: Some(CopySync::Commit(Commit {
                    step: i,
                    clip: [hp.lr, hp.momentum, hp.teacher_temp],
                    hp,
                    gram_from_teacher: i % 2 == 0,
                })),
                verify: None,
                data: None,
            };
            let (back, _) = parse(&message(&o, &[]).unwrap()).unwrap();
            let bits = |h: &StepHparams| {
                [
                    h.lr,
                    h.last_layer_lr,
                    h.weight_decay,
                    h.momentum,
                    h.teacher_temp,
                    h.gram_weight,
                    h.local_dino_weight,
                ]
                .map(f64::to_bits)
            };
            assert_eq!(
                bits(&back.hp),
                bits(&hp),
                "step {i}: {:?} became {:?}",
                hp,
                back.hp
            );
            let Some(CopySync::Commit(c)) = back.sync else {
                panic!("no commit")
            };
            assert_eq!(bits(&c.hp), bits(&hp), "step {i}");
            assert_eq!(
                c.clip.map(f64::to_bits),
                [hp.lr, hp.momentum, hp.teacher_temp].map(f64::to_bits)
            );
        }
        // the batch a worker loads itself: the crops (their float scales and
        // probabilities, the high-resolution mix) cross exactly, or its images would differ
        let mut crops = data::CropConfig {
            high_res: Some(data::HighResConfig::official_7b()),
            ..data::CropConfig::default()
        };
        crops.global_scale.0 = 0.1 + 0.2;
        let r = DataRef {
            batch_index: 7,
            cursor: data::Cursor {
                epoch: 2,
                index_in_epoch: 5,
                batches_done: 7,
                source_len: Some(12),
            },
            crops,
            source_len: Some(12),
            digest: Some("ab".repeat(32)),
        };
        let o = Order {
            phase: Phase::Teacher,
            held: Held {
                step: 7,
                optim_t: 7,
                gram_updates: 0,
                gram_teacher: false,
                generation: 0,
            },
            seed: 1,
            hp: hp(1e-3),
            shard: None,
            sync: Some(CopySync::Keep),
            verify: None,
            data: Some(r),
        };
        let (back, _) = parse(&message(&o, &[]).unwrap()).unwrap();
        assert_eq!(back.data, o.data);
    }

    /// The copies follow by themselves only when rank 0 moved by exactly the commit they
    /// can apply; anything else sends the whole state.
    #[test]
    fn a_copy_follows_by_a_noted_commit_and_gets_the_whole_state_otherwise() {
        let at = Held {
            step: 7,
            optim_t: 7,
            gram_updates: 0,
            gram_teacher: false,
            generation: 1,
        };
        let mut c = Copies::default();
        assert_eq!(c.sync_to(at), CopySync::Full, "a new group holds nothing");
        c.held = Some(at);
        assert_eq!(c.sync_to(at), CopySync::Keep, "the step is computed again");
        let next = at.committed();
        assert_eq!(
            c.sync_to(next),
            CopySync::Full,
            "nothing noted of the commit"
        );
        c.clip = Some((7, [1.0, 0.25, 1.0]));
        c.adamw = Some((7, hp(1e-3)));
        assert_eq!(c.sync_to(next), CopySync::Full, "no EMA noted");
        c.ema = Some((6, 0.99));
        assert_eq!(c.sync_to(next), CopySync::Full, "the EMA of another step");
        c.ema = Some((7, 0.99));
        let want = Commit {
            step: 7,
            clip: [1.0, 0.25, 1.0],
            hp: StepHparams {
                momentum: 0.99,
                ..hp(1e-3)
            },
            gram_from_teacher: false,
        };
        assert_eq!(c.sync_to(next), CopySync::Commit(want));
        // the commit, then a Gram teacher copied from the EMA teacher: the copies do it too
        let refreshed = Held {
            gram_updates: 1,
            gram_teacher: true,
            ..next
        };
        assert_eq!(c.sync_to(refreshed), CopySync::Full, "no refresh noted");
        c.gram_refresh = Some((7, 1));
        assert_eq!(
            c.sync_to(refreshed),
            CopySync::Full,
            "a refresh before the commit"
        );
        c.gram_refresh = Some((8, 1));
        assert_eq!(
            c.sync_to(refreshed),
            CopySync::Commit(Commit {
                gram_from_teacher: true,
                ..want
            })
        );
        assert_eq!(
            c.sync_to(next),
            CopySync::Commit(want),
            "no refresh happened"
        );
        c.gram_refresh = None;
        // the same step and update count, but the state was reloaded, or has a new
        // Gram teacher, or went back to a checkpoint: the whole state
        for other in [
            Held {
                generation: 2,
                ..next
            },
            Held {
                gram_updates: 1,
                gram_teacher: true,
                ..next
            },
            Held {
                step: 4,
                optim_t: 4,
                ..at
            },
            Held { optim_t: 9, ..next },
        ] {
            assert_eq!(c.sync_to(other), CopySync::Full, "{other:?}");
        }
    }

    /// The whole state a worker is sent makes its copy rank 0's, moments included, and
    /// the same commit applied on both keeps them equal bit for bit.
    #[test]
    fn the_whole_state_makes_a_copy_and_a_commit_keeps_it_one() {
        let plan = crate::cli::load_plan(None).unwrap();
        let (mut st, _) = crate::engine::fresh(&plan).unwrap();
        let ts = &mut st.ts;
        ts.refresh_gram_teacher().unwrap();
        // rank 0 takes one step with made-up gradients
        let grads = synthetic_grads(ts, 0.3);
        model::apply_step(ts, &grads, &hp(1e-2)).unwrap();
        let held = Held::of(ts, 0);
        let tensors = state_tensors(ts).unwrap();
        let fresh_ts = TrainState::new(&plan.ssl, 99, plan.config.precision.dtype()).unwrap();
        let mut copy = crate::engine::place(fresh_ts, &plan).unwrap();
        assert_ne!(
            crate::engine::weights_digest(&copy).unwrap(),
            crate::engine::weights_digest(ts).unwrap()
        );
        let mut it = tensors.into_iter();
        load_state(&mut copy, &held, &mut it).unwrap();
        assert!(it.next().is_none(), "every tensor read");
        assert_eq!(
            crate::engine::weights_digest(&copy).unwrap(),
            crate::engine::weights_digest(ts).unwrap()
        );
        // the same clipped commit on both
        let (g0, g1) = (synthetic_grads(ts, 2.0), synthetic_grads(&copy, 2.0));
        let stats = model::clip_gradients(&ts.cfg, &g0).unwrap().unwrap();
        model::state::apply_clip(&g1, stats.map(|s| s.coef)).unwrap();
        assert!(
            stats.iter().any(|s| s.coef < 1.0),
            "nothing was clipped: {stats:?}"
        );
        model::apply_step(ts, &g0, &hp(1e-2)).unwrap();
        model::apply_step(&mut copy, &g1, &hp(1e-2)).unwrap();
        assert_eq!(
            crate::engine::weights_digest(&copy).unwrap(),
            crate::engine::weights_digest(ts).unwrap()
        );
        // a state of another model is refused with the parameter named
        let mut short = state_tensors(ts).unwrap();
        short.truncate(3);
        let err = load_state(&mut copy, &held, &mut short.into_iter()).unwrap_err();
        assert!(format!("{err:#}").contains("too few tensors"), "{err:#}");
    }
}
