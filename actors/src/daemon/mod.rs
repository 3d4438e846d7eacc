//! The daemon: a supervision tree of actors that trains until stopped, survives actor
//! failures, and keeps every committed step recoverable.
//!
//! ```text
//! supervisor ─┬─ control        (Unix socket, CLI requests)
//!             ├─ checkpointer   (async saves on its own thread)
//!             ├─ evaluator      (probes on teacher snapshots, stage decisions)
//!             ├─ data_loader    (decode + multi-crop on worker threads)
//!             ├─ teacher        (EMA-teacher forward, Sinkhorn-Knopp, Gram teacher)
//!             ├─ trainer        (student forward/backward, AdamW)
//!             ├─ ema            (teacher <- EMA of the student)
//!             └─ coordinator    (drives the step protocol, commit/discard, policies)
//! ```
//! Restart order follows the data flow (rest-for-one): a failed `data_loader` restarts
//! itself; a failed `teacher` restarts `teacher`, `trainer`, `ema`; and so on.

pub mod board;
pub mod checkpointer;
pub mod compute;
pub mod control;
pub mod coordinator;
pub mod device;
pub mod distill;
pub mod evaluator;
pub mod faults;
pub mod loader;
pub mod notify;
pub mod remote;
pub mod startup;
pub mod supervisor;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use checkpoints::{Event, Level, Retention, Store, StoreOptions, StoredEvent};

use crate::config::Plan;
use crate::engine::{self, Engine};
use board::Board;
use faults::Faults;

/// Exit status: the run was stopped or reached its target.
pub const EXIT_OK: i32 = 0;
/// Exit status: the supervisor gave up (restart intensity exceeded) or a fatal error.
pub const EXIT_FATAL: i32 = 70;
/// Exit status: the run stopped (on request or at its target), but its final checkpoint
/// could not be written (a full disk, an I/O error): what it trained since its last
/// checkpoint is lost. Not a "restart me": the disk needs a look first.
pub const EXIT_UNSAVED: i32 = 74;
/// Exit status: the accelerator context is unusable; restart the process (systemd).
pub const EXIT_DEVICE: i32 = 75;
/// Exit status: a hung compute thread could not be recovered in-process.
pub const EXIT_HUNG: i32 = 76;

/// Options of `dinod run` besides the config.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// State directory.
    pub state_dir: PathBuf,
    /// Stop after this step (overrides the config).
    pub max_steps: Option<u64>,
    /// Show a progress bar (stderr is a terminal).
    pub progress: bool,
}

/// Everything the actors share.
pub struct Ctx {
    /// Validated config.
    pub plan: Plan,
    /// State directory.
    pub state_dir: PathBuf,
    /// Training state.
    pub engine: Engine,
    /// Checkpoint store and catalog.
    pub store: Arc<Store>,
    /// Status board.
    pub board: Arc<Board>,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// The opened data source.
    pub source: Arc<dyn data::Source>,
    /// Target step.
    pub max_steps: Option<u64>,
    /// Exit status decided by whoever stops the run.
    pub exit_code: AtomicI32,
    /// Progress bar requested.
    pub progress: bool,
    /// A save is being written by the checkpointer.
    pub saving: std::sync::atomic::AtomicBool,
    /// The students of a distillation run (empty in a self-supervised run).
    pub students: Vec<Arc<distill::StudentRun>>,
    /// The frozen teacher of a distillation run.
    pub frozen_teacher: Option<Arc<model::ssl::SslModel>>,
    /// Stop requested (distillation students finish their step and save).
    pub stopping: std::sync::atomic::AtomicBool,
    /// Paused by the operator (distillation students).
    pub paused: std::sync::atomic::AtomicBool,
    /// The stage machine entered `distill` in a run whose students learn from its own
    /// teacher: the self-supervised tree stops (after its final checkpoint) and the
    /// students' tree starts.
    pub handoff: std::sync::atomic::AtomicBool,
    /// The accelerator's health (`runtime.on_gpu_loss` acts on it).
    pub device: device::DeviceHealth,
    /// The plan after a fall-back to the CPU (`on_gpu_loss = "cpu"`); set at most once.
    pub fallback: std::sync::OnceLock<Plan>,
    /// The data-parallel group (`runtime.data_parallel` > 1), built on first use.
    pub group: std::sync::Mutex<Option<crate::dp::Members>>,
    /// The group of processes (`[runtime.cluster]`): the listener and the admitted
    /// workers, built on first use.
    pub cluster: remote::ClusterSlot,
    /// Held for the whole of a collective step over `group` where several actors could
    /// start one at once (the distillation teacher and every student): the members'
    /// collectives must not interleave.
    pub group_turn: std::sync::Mutex<()>,
    /// The frozen distillation teacher on each member's device (data parallel), built on
    /// first use; the member on the run's device shares `frozen_teacher`.
    pub frozen_replicas: std::sync::Mutex<Vec<Arc<model::ssl::SslModel>>>,
    /// The run's probe sets, built on first use and shared by everything that probes (the
    /// evaluator, the frozen teacher, the students): [`evaluator::shared_sets`].
    pub probe_sets: std::sync::Mutex<Option<Arc<Vec<eval_probes::ProbeSet>>>>,
    /// The frozen distillation teacher has been probed in this process (once, as the
    /// reference the students' probes are read against).
    pub teacher_probed: std::sync::atomic::AtomicBool,
}

impl Ctx {
    /// The context of a fresh process: nothing saved, paused or lost yet, no students.
    pub fn new(
        plan: Plan,
        opts: &RunOptions,
        faults: Arc<Faults>,
        engine: Engine,
        store: Arc<Store>,
        source: Arc<dyn data::Source>,
    ) -> Self {
        Self {
            max_steps: opts.max_steps.or(plan.config.train.max_steps),
            faults,
            plan,
            state_dir: opts.state_dir.clone(),
            engine,
            store,
            board: Arc::new(Board::default()),
            source,
            exit_code: AtomicI32::new(EXIT_OK),
            progress: opts.progress,
            saving: std::sync::atomic::AtomicBool::new(false),
            students: vec![],
            frozen_teacher: None,
            stopping: std::sync::atomic::AtomicBool::new(false),
            paused: std::sync::atomic::AtomicBool::new(false),
            handoff: std::sync::atomic::AtomicBool::new(false),
            device: device::DeviceHealth::default(),
            fallback: std::sync::OnceLock::new(),
            group: std::sync::Mutex::new(None),
            cluster: remote::ClusterSlot::default(),
            group_turn: std::sync::Mutex::new(()),
            frozen_replicas: std::sync::Mutex::new(vec![]),
            probe_sets: std::sync::Mutex::new(None),
            teacher_probed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The plan in force: the configured one, or the CPU fall-back's after a device loss
    /// under `on_gpu_loss = "cpu"` (same recipe, CPU, smaller batch, LR rescaled).
    pub fn plan(&self) -> &Plan {
        self.fallback.get().unwrap_or(&self.plan)
    }

    /// Records an event in the catalog and the log.
    pub fn event(
        &self,
        level: Level,
        kind: &str,
        actor: Option<&str>,
        step: Option<u64>,
        message: impl Into<String>,
        fields: serde_json::Value,
    ) {
        let message = message.into();
        match level {
            Level::Error => tracing::error!(kind, actor, step, fields = %fields, "{message}"),
            Level::Warn => tracing::warn!(kind, actor, step, fields = %fields, "{message}"),
            _ => tracing::info!(kind, actor, step, fields = %fields, "{message}"),
        }
        let mut e = Event::new(level, kind, message).fields(fields);
        if let Some(a) = actor {
            e = e.actor(a);
        }
        if let Some(s) = step {
            e = e.step(s);
        }
        if let Err(err) = self.store.append_event(&e) {
            tracing::error!("cannot record event {kind}: {err}");
        }
    }

    /// Sets the exit status (first writer wins over EXIT_OK).
    pub fn set_exit(&self, code: i32) {
        let _ = self
            .exit_code
            .compare_exchange(EXIT_OK, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Reloads the engine from the newest valid checkpoint (or a fresh state when none
    /// exists); returns the step it resumed at.
    pub fn reload(&self, why: &str) -> Result<u64> {
        let st = match self.store.load_latest_valid()? {
            Some(ck) => engine::restore(ck, self.plan())?,
            None => fresh(self.plan(), &self.store)?,
        };
        let step = st.ts.step;
        self.engine.replace(st);
        self.event(
            Level::Warn,
            "run.reloaded",
            None,
            Some(step),
            format!("state reloaded from the last checkpoint (step {step}): {why}"),
            serde_json::json!({"reason": why}),
        );
        Ok(step)
    }
}

/// The retention policy of a config.
pub fn retention(plan: &Plan) -> Retention {
    let c = &plan.config.checkpoint;
    Retention {
        keep_last: c.keep_last,
        keep_every: c.keep_every,
        keep_best: if c.keep_best_dense {
            Some(checkpoints::KeepBest {
                metric: "dense".into(),
                higher_is_better: true,
            })
        } else {
            None
        },
        max_bytes: c.max_disk_gb.map(|g| (g * 1e9) as u64),
    }
}

/// Opens (or creates) the state directory's store; configured `io_error` faults are
/// injected into its write path.
pub fn open_store(dir: &Path, plan: &Plan, faults: Option<Arc<Faults>>) -> Result<Store> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let mut opts = StoreOptions::new(retention(plan))
        .with_min_free_bytes((plan.config.checkpoint.min_free_gb * 1e9) as u64);
    if let Some(f) = faults {
        opts = opts.with_fault_injector(Arc::new(checkpointer::ConfigFaults(f)));
    }
    // a `dinod status` (or `events`, `checkpoints`) that found no daemon reads the catalog
    // under the directory's lock for a moment: wait that out rather than fail the start
    // (under systemd, a failed start is a restart loop while someone watches the status)
    let give_up = std::time::Instant::now() + LOCK_WAIT;
    let mut said = false;
    let store = loop {
        match Store::open(dir, opts.clone()) {
            Err(checkpoints::Error::InUse { pid, .. }) if std::time::Instant::now() < give_up => {
                if !said {
                    said = true;
                    tracing::info!(
                        "the state directory {} is held by {}; waiting up to {} s for it",
                        dir.display(),
                        pid.map(|p| format!("pid {p}"))
                            .unwrap_or_else(|| "another process".into()),
                        LOCK_WAIT.as_secs()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            r => {
                break r.with_context(|| {
                    format!("cannot open the state directory {}", dir.display())
                })?
            }
        }
    };
    Ok(store)
}

/// How long a starting daemon waits for another process to release its state directory
/// (the CLI's offline reads hold it for milliseconds; a second daemon holds it for good).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A fresh state for a new run; one started from `[model] init` records what it read
/// (`run.initialised`).
fn fresh(plan: &Plan, store: &Store) -> Result<engine::EngineState> {
    let (st, init) = engine::fresh(plan)?;
    if let Some(r) = init {
        let (message, fields) = init_message(&r);
        tracing::info!(kind = "run.initialised", "{message}");
        let _ = store.append_event(
            &Event::new(Level::Info, "run.initialised", message)
                .step(0)
                .fields(fields),
        );
    }
    Ok(st)
}

/// The `run.initialised` event of a new run started from `[model] init`.
fn init_message(r: &engine::InitReport) -> (String, serde_json::Value) {
    let modules: Vec<String> = r
        .loaded
        .iter()
        .map(|(m, n)| match n {
            0 => format!("{m} drawn from the seed"),
            n => format!("{m} {n} tensors"),
        })
        .collect();
    let mut message = format!(
        "a new run initialised from {} ({}): {}",
        r.spec,
        r.source,
        modules.join(", ")
    );
    if !r.unused.is_empty() {
        let shown: Vec<&str> = r.unused.iter().take(4).map(String::as_str).collect();
        message += &format!(
            "; {} tensors of the source are not parameters and were not used ({}{})",
            r.unused.len(),
            shown.join(", "),
            if r.unused.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    (message, serde_json::to_value(r).unwrap_or_default())
}

/// Events after which a process ended on purpose (anything else last in the log means
/// it was killed or crashed).
const CLEAN_ENDS: &[&str] = &["run.stopped", "run.fatal", "run.halted"];

/// Records this process's start (`run.started`): what it resumes from, and whether the
/// previous process stopped or was killed (its last event is not a clean end: the steps
/// since the last checkpoint are trained again). A warning in the latter case.
fn record_start(
    store: &Store,
    previous: Option<&StoredEvent>,
    latest: Option<u64>,
    distill_only: bool,
) {
    let pid = std::process::id();
    let from = match (latest, distill_only) {
        (_, true) => "a distillation (each student resumes from its own checkpoint)".to_string(),
        (Some(s), _) => format!("resuming from the checkpoint at step {s}"),
        (None, _) => "a new run".to_string(),
    };
    let unclean = previous.filter(|p| !CLEAN_ENDS.contains(&p.event.kind.as_str()));
    let (level, message) = match unclean {
        Some(p) => (
            Level::Warn,
            format!(
                "started (pid {pid}), {from}; the previous process did not stop (killed or crashed after `{}`{})",
                p.event.kind,
                p.event.step.map(|s| format!(" at step {s}")).unwrap_or_default()
            ),
        ),
        None => (Level::Info, format!("started (pid {pid}), {from}")),
    };
    if level == Level::Warn {
        tracing::warn!(kind = "run.started", "{message}");
    } else {
        tracing::info!(kind = "run.started", "{message}");
    }
    let e = Event::new(level, "run.started", message).fields(serde_json::json!({
        "pid": pid,
        "resumed_from": latest,
        "previous_stopped": previous.map(|_| unclean.is_none()),
        "previous_last_event": previous.map(|p| p.event.kind.clone()),
        "code_version": engine::CODE_VERSION,
    }));
    let _ = store.append_event(&e);
}

/// Opens the run's data source, saying so first (a `tar:` source walks its shards' headers
/// on a first open: seconds to minutes at ImageNet's size) and recording what it holds and
/// how long it took (`data.opened`).
fn open_source(
    plan: &Plan,
    store: &Store,
    faults: &Faults,
    life: &Arc<startup::Lifecycle>,
) -> Result<Arc<dyn data::Source>> {
    let spec = &plan.config.data.source;
    tracing::info!(kind = "data.opening", "opening the data source {spec}");
    life.enter(&format!("opening the data source {spec}"));
    let progress = Arc::new(data::OpenProgress::default());
    let counted = progress.clone();
    life.observe(move || counted.describe());
    let t = std::time::Instant::now();
    let opts = data::OpenOptions {
        progress: Some(progress),
        ..data::OpenOptions::default()
    };
    let source = spec
        .open_with(&opts)
        .with_context(|| format!("opening the data source {spec}"))?;
    // a drill: the open goes on (held after its work, so its progress shows)
    if let Some(f) = faults.take("slow", Some("startup"), 0) {
        tracing::warn!("injected fault: the start is held {} ms", f.duration_ms);
        std::thread::sleep(std::time::Duration::from_millis(f.duration_ms));
    }
    let secs = t.elapsed().as_secs_f64();
    let message = format!("data source opened in {secs:.2} s: {}", source.describe());
    tracing::info!(kind = "data.opened", "{message}");
    let e = Event::new(Level::Info, "data.opened", message).fields(serde_json::json!({
        "source": spec.to_string(),
        "samples": source.len(),
        "classes": source.n_classes(),
        "seconds": secs,
    }));
    let _ = store.append_event(&e);
    Ok(source)
}

/// The phase's progress: the checkpoint and weight bytes read (and hashed) since it began,
/// of `total` where known. Every byte of a checkpoint is read and hashed before a resume:
/// 2 GB for vit_base, tens of GB for the largest models, often from a network disk.
fn observe_bytes_read(life: &startup::Lifecycle, total: Option<u64>) {
    let from = checkpoints::bytes_read();
    life.observe(move || {
        let n = checkpoints::bytes_read().saturating_sub(from);
        match total {
            Some(t) => Some(format!(
                "{} of the newest checkpoint's {} read and checked",
                bytes_text(n),
                bytes_text(t)
            )),
            None => (n > 0).then(|| format!("{} read and checked", bytes_text(n))),
        }
    });
}

/// `2.11 GB`, `640 MB`.
fn bytes_text(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else {
        format!("{:.0} MB", b as f64 / 1e6)
    }
}

/// Runs the daemon in the foreground until it stops; returns the exit status.
pub fn run(plan: Plan, opts: RunOptions) -> Result<i32> {
    let faults = Arc::new(Faults::new(&plan.config.runtime.faults));
    let store = Arc::new(open_store(&opts.state_dir, &plan, Some(faults.clone()))?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("dinod-rt")
        .build()?;
    // from here a signal or `dinod stop` ends the start cleanly, and the control socket
    // says what the daemon is doing
    let life = startup::Lifecycle::begin(
        &rt,
        store.clone(),
        &opts.state_dir,
        "reading the checkpoints",
        std::time::Duration::from_secs_f64(plan.config.runtime.heartbeat.start_s),
    );
    force_device_path_for_bf16(&plan);
    let self_teacher = format!("state:{}", opts.state_dir.display());
    // how the previous process of this state directory ended, before this one writes
    let previous = store.recent_events(1)?.into_iter().next();
    // read once: it decides between the students and the self-supervised run, and is
    // what the latter resumes from
    // the newest checkpoint's size, if its manifest reads (a bad one is the fallback's
    // business below, not a reason to fail here)
    let newest_bytes = (store.latest_step().ok().flatten())
        .and_then(|s| store.manifest(s).ok())
        .map(|m| m.files.iter().map(|f| f.size).sum::<u64>());
    if newest_bytes.is_some() {
        observe_bytes_read(&life, newest_bytes);
    }
    let latest = store.load_latest_valid()?;
    life.resumes_from(latest.as_ref().map(|ck| ck.manifest.step));
    record_start(
        &store,
        previous.as_ref(),
        latest.as_ref().map(|ck| ck.manifest.step),
        !plan.students.is_empty() && !plan.distill_after_stages(),
    );
    if !plan.students.is_empty() {
        if !plan.distill_after_stages() {
            let spec = plan
                .config
                .distill
                .as_ref()
                .map(|d| d.teacher.clone())
                .unwrap_or_default();
            return run_distill(&rt, &life, plan, opts, store, faults, &spec);
        }
        if latest
            .as_ref()
            .is_some_and(|ck| in_distill_stage(ck.meta(), &plan))
        {
            drop(latest);
            return run_distill(&rt, &life, plan, opts, store, faults, &self_teacher);
        }
    }
    // resume or start
    let state = match latest {
        Some(ck) => {
            life.enter(&format!(
                "restoring the checkpoint at step {}",
                ck.manifest.step
            ));
            let st = engine::restore(ck, &plan)?;
            tracing::info!(
                step = st.ts.step,
                "resuming from checkpoint at step {}",
                st.ts.step
            );
            st
        }
        None => {
            life.enter("initialising a new run");
            fresh(&plan, &store)?
        }
    };
    let source = open_source(&plan, &store, &faults, &life)?;
    let ctx = Arc::new(Ctx::new(
        plan,
        &opts,
        faults,
        Engine::new(state),
        store,
        source,
    ));
    life.training(&ctx.board);
    let code = rt.block_on(supervisor::run_tree(ctx.clone()));
    life.tree_ended();
    // the workers of a group of processes exit with the run
    ctx.cluster.bye();
    let code = code?;
    let _ = ctx.store.flush();
    if code == EXIT_OK && ctx.handoff.load(Ordering::SeqCst) {
        // the final checkpoint carries stage `distill`: a restart resumes the students
        // (its manifest says so; the students' teacher load verifies the tensors)
        let latest = match ctx.store.latest_step()? {
            Some(step) => Some(ctx.store.manifest(step)?),
            None => None,
        };
        if !latest.is_some_and(|m| in_distill_stage(&m.meta, &ctx.plan)) {
            anyhow::bail!("the hand-off to distillation found no checkpoint in stage `distill` (the final save failed; see `dinod events`)");
        }
        ctx.event(
            Level::Info,
            "distill.handoff",
            None,
            None,
            "high-resolution adaptation done: the students start from this run's EMA teacher",
            serde_json::json!({"teacher": self_teacher}),
        );
        return run_distill(
            &rt,
            &life,
            ctx.plan.clone(),
            opts,
            ctx.store.clone(),
            ctx.faults.clone(),
            &self_teacher,
        );
    }
    Ok(code)
}

/// Whether a checkpoint's metadata puts the run in the `distill` stage: its teacher is final
/// and the students train.
fn in_distill_stage(meta: &serde_json::Value, plan: &Plan) -> bool {
    crate::stages::machine(plan, &meta["run"]["stage"]).stage() == eval_probes::Stage::Distill
}

/// A distillation run: the frozen teacher, the students with their own stores.
fn run_distill(
    rt: &tokio::runtime::Runtime,
    life: &Arc<startup::Lifecycle>,
    plan: Plan,
    opts: RunOptions,
    store: Arc<Store>,
    faults: Arc<Faults>,
    spec: &str,
) -> Result<i32> {
    life.enter(&format!("loading the teacher {spec}"));
    observe_bytes_read(life, None);
    let teacher = distill::load_teacher(&plan, spec)
        .with_context(|| format!("loading the teacher {spec}"))?;
    life.enter("opening the students' checkpoints");
    observe_bytes_read(life, None);
    let students = distill::open_students(&plan, &opts.state_dir, faults.clone(), &store)?;
    let source = open_source(&plan, &store, &faults, life)?;
    let engine = students[0].engine.clone();
    let ctx = Arc::new(Ctx {
        progress: false,
        students,
        frozen_teacher: Some(Arc::new(teacher)),
        ..Ctx::new(plan, &opts, faults, engine, store, source)
    });
    life.training(&ctx.board);
    let code = rt.block_on(supervisor::run_tree(ctx.clone()));
    life.tree_ended();
    let code = code?;
    let _ = ctx.store.flush();
    for s in &ctx.students {
        let _ = s.store.flush();
    }
    Ok(code)
}

/// The fused CPU kernels are f32/f64: `precision = "bf16"` on the CPU runs the device code
/// path on the host (the self-supervised run, the distillation and a cluster's workers
/// alike).
pub fn force_device_path_for_bf16(plan: &Plan) {
    if plan.config.precision == crate::config::Precision::Bf16
        && plan.config.runtime.device == "cpu"
    {
        tracing::warn!("precision = \"bf16\" on the CPU runs the device code path (slow); it is meant for GPUs");
        ops::portable::set_force_on_cpu(true);
    }
}
