//! The run configuration: one typed TOML file. Unknown keys are rejected, and every
//! problem (unknown keys, bad values, inconsistent sizes) is reported at once with its key
//! and a hint. Derived values (the scaled LR, the schedules) are computed into a [`Plan`]
//! and never written back into the config.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use model::{HeadConfig, LossConfig, OptimConfig, SslConfig, StepHparams, VitConfig};
use ops::schedule::Schedule;

/// The recipe `dinod run` uses when no `--config` is given (embedded in the binary).
pub const DEFAULT_RECIPE: &str = include_str!("../../configs/default.toml");

/// Element type of training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (CPU training).
    #[default]
    F32,
    /// 64-bit floats (debugging, parity).
    F64,
    /// Mixed precision as the official code trains: f32 master weights, optimizer state and
    /// checkpoints; the step computes in bf16 (GPUs; on the CPU it runs the device code
    /// path, which is slow).
    Bf16,
}

impl Precision {
    /// The type of the master weights, the optimizer state and the checkpoints.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 | Precision::Bf16 => candle_core::DType::F32,
            Precision::F64 => candle_core::DType::F64,
        }
    }

    /// The type the step computes in (batches, casts of the weights).
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::Bf16 => candle_core::DType::BF16,
            p => p.dtype(),
        }
    }
}

/// `[model]`: a preset plus overrides.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A backbone preset (`vit_pico`, `vit_tiny`, `vit_small`, `vit_base`, `vit_large`).
    #[serde(default)]
    pub preset: Option<String>,
    /// Backbone fields; override the preset's.
    #[serde(default)]
    pub backbone: toml::Table,
    /// DINO head.
    pub dino_head: HeadConfig,
    /// iBOT head.
    pub ibot_head: HeadConfig,
    /// Loss weights.
    #[serde(default)]
    pub loss: LossConfig,
    /// Optimizer.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Weights a new run starts from instead of drawing them: `safetensors:FILE` (the
    /// official `state_dict` names, as `dinod export` writes them; the heads too when the
    /// file has them, `--with-heads`) or `state:DIR` (the EMA teacher of another run, heads
    /// included). The backbone must match this section; a head the file lacks is drawn
    /// from the seed. Student and teacher start equal. Read once, when the state directory
    /// holds no checkpoint: a resume continues from its checkpoint.
    #[serde(default)]
    pub init: Option<String>,
}

/// How the base LR scales with the batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScaling {
    /// Official `sqrt_wrt_1024`: `lr * 4 * sqrt(B / 1024)`.
    #[default]
    #[serde(rename = "sqrt_wrt_1024", alias = "sqrt_wrt1024")]
    SqrtWrt1024,
    /// Use `lr` as given.
    None,
}

/// `[train]`: batch and schedules. After warm-up every value is constant (DINOv3's
/// open-ended recipe).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Images per step.
    pub batch_size: usize,
    /// Stop after this many steps (none = train until stopped).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Base learning rate (before scaling).
    pub lr: f64,
    /// LR scaling rule.
    #[serde(default)]
    pub lr_scaling: LrScaling,
    /// Linear LR warm-up from 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Weight decay (constant).
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// EMA momentum (constant).
    #[serde(default = "d_momentum")]
    pub momentum: f64,
    /// Teacher temperature after its warm-up.
    #[serde(default = "d_tt")]
    pub teacher_temp: f64,
    /// Teacher temperature at step 0.
    #[serde(default = "d_tt0")]
    pub teacher_temp_start: f64,
    /// Teacher temperature warm-up length.
    #[serde(default)]
    pub teacher_temp_warmup_steps: u64,
    /// The heads' last layers get LR 0 for this many steps.
    #[serde(default)]
    pub freeze_last_layer_steps: u64,
}

fn d_wd() -> f64 {
    0.04
}
fn d_momentum() -> f64 {
    0.994
}
fn d_tt() -> f64 {
    0.07
}
fn d_tt0() -> f64 {
    0.04
}

/// `[checkpoint]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every N committed steps.
    #[serde(default = "d_every")]
    pub every_steps: u64,
    /// Also save once this many seconds have passed since the last save (at the next step
    /// boundary): bounds in wall time what a kill loses, whatever a step costs (steps of
    /// high-resolution adaptation are slower; a GPU is faster than the CPU).
    #[serde(default)]
    pub every_seconds: Option<f64>,
    /// Newest checkpoints always kept (at least 2).
    #[serde(default = "d_keep_last")]
    pub keep_last: usize,
    /// Also keep one checkpoint per multiple of this: the first at or after it (a save
    /// deferred by a few steps while the previous one was written stands for its
    /// multiple).
    #[serde(default)]
    pub keep_every: Option<u64>,
    /// Keep the best checkpoint by the dense probe.
    #[serde(default = "d_true")]
    pub keep_best_dense: bool,
    /// Disk budget of the kept checkpoints in GB: over it, the oldest kept only by
    /// `keep_every` are deleted (a run that never stops would otherwise fill its disk
    /// with them). The newest `keep_last`, the latest and the best are always kept.
    #[serde(default)]
    pub max_disk_gb: Option<f64>,
    /// GB the checkpoints must leave free on their file system (for the catalog, the
    /// logs, the system): a save that would eat into them is refused before it writes
    /// anything, and `checkpoint.disk_low` warns when the next one would not fit.
    #[serde(default = "d_min_free_gb")]
    pub min_free_gb: f64,
}

fn d_min_free_gb() -> f64 {
    0.25
}

fn d_every() -> u64 {
    100
}
fn d_keep_last() -> usize {
    2
}
fn d_true() -> bool {
    true
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every_steps: d_every(),
            every_seconds: None,
            keep_last: d_keep_last(),
            keep_every: None,
            keep_best_dense: true,
            max_disk_gb: None,
            min_free_gb: d_min_free_gb(),
        }
    }
}

/// Hang detection: a phase that lasts longer than its timeout marks the actor hung.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSection {
    /// Producing one batch.
    #[serde(default = "d_hb_load")]
    pub load_s: f64,
    /// One teacher or student compute call.
    #[serde(default = "d_hb_step")]
    pub step_s: f64,
    /// One probe run.
    #[serde(default = "d_hb_eval")]
    pub eval_s: f64,
    /// One checkpoint write.
    #[serde(default = "d_hb_ckpt")]
    pub checkpoint_s: f64,
    /// How often the watchdog looks.
    #[serde(default = "d_hb_check")]
    pub check_every_ms: u64,
    /// After a hung actor was restarted, how long to wait for the step to move again
    /// before the process exits (a thread stuck in compute cannot be cancelled).
    #[serde(default = "d_hb_escalate")]
    pub escalate_after_s: f64,
    /// How long the start (reading and verifying the checkpoint, opening the data source,
    /// loading a teacher) may go without moving on (a new phase, or its progress counter
    /// moving) before the daemon stops pinging the service manager's watchdog, which then
    /// restarts it: a start stuck on a hung read is not fed for ever.
    #[serde(default = "d_hb_start")]
    pub start_s: f64,
}

fn d_hb_start() -> f64 {
    600.0
}

fn d_hb_load() -> f64 {
    120.0
}
fn d_hb_step() -> f64 {
    600.0
}
fn d_hb_eval() -> f64 {
    1800.0
}
fn d_hb_ckpt() -> f64 {
    600.0
}
fn d_hb_check() -> u64 {
    1000
}
fn d_hb_escalate() -> f64 {
    120.0
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        Self {
            load_s: d_hb_load(),
            step_s: d_hb_step(),
            eval_s: d_hb_eval(),
            checkpoint_s: d_hb_ckpt(),
            check_every_ms: d_hb_check(),
            escalate_after_s: d_hb_escalate(),
            start_s: d_hb_start(),
        }
    }
}

/// What happens to NaN/Inf losses and loss spikes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadStepSection {
    /// A loss above `spike_factor` times the median of the last `spike_window` committed
    /// losses is a spike (checked once the window is full; 0 disables).
    #[serde(default = "d_spike")]
    pub spike_factor: f64,
    /// Losses in the spike reference window.
    #[serde(default = "d_spike_window")]
    pub spike_window: usize,
    /// Bad steps within `window_steps` that trigger a rollback to the last checkpoint.
    #[serde(default = "d_max_bad")]
    pub max_bad_in_window: usize,
    /// The bad-step window, in steps.
    #[serde(default = "d_bad_window")]
    pub window_steps: u64,
    /// Rollbacks allowed before the run halts for an operator.
    #[serde(default = "d_max_rollbacks")]
    pub max_rollbacks: u32,
    /// Times in a row one step may fail to compute (an actor error, not a bad loss) and be
    /// redone before the run stops with the error (exit 70): a failure that repeats is a
    /// bug or a broken setup, not a transient fault.
    #[serde(default = "d_max_redos")]
    pub max_redos: u32,
}

fn d_max_redos() -> u32 {
    8
}

fn d_spike() -> f64 {
    10.0
}
fn d_spike_window() -> usize {
    50
}
fn d_max_bad() -> usize {
    3
}
fn d_bad_window() -> u64 {
    100
}
fn d_max_rollbacks() -> u32 {
    5
}

impl Default for BadStepSection {
    fn default() -> Self {
        Self {
            spike_factor: d_spike(),
            spike_window: d_spike_window(),
            max_bad_in_window: d_max_bad(),
            window_steps: d_bad_window(),
            max_rollbacks: d_max_rollbacks(),
            max_redos: d_max_redos(),
        }
    }
}

/// Restart policy of the supervision tree.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    /// Restarts of one actor allowed within `window_s` before the supervisor escalates.
    #[serde(default = "d_max_restarts")]
    pub max_restarts: u32,
    /// The intensity window.
    #[serde(default = "d_restart_window")]
    pub window_s: f64,
    /// First restart delay; doubles per consecutive failure.
    #[serde(default = "d_backoff")]
    pub backoff_ms: u64,
    /// Largest restart delay.
    #[serde(default = "d_backoff_max")]
    pub backoff_max_ms: u64,
}

fn d_max_restarts() -> u32 {
    5
}
fn d_restart_window() -> f64 {
    60.0
}
fn d_backoff() -> u64 {
    50
}
fn d_backoff_max() -> u64 {
    5000
}

impl Default for RestartSection {
    fn default() -> Self {
        Self {
            max_restarts: d_max_restarts(),
            window_s: d_restart_window(),
            backoff_ms: d_backoff(),
            backoff_max_ms: d_backoff_max(),
        }
    }
}

/// An injected fault (for tests and drills).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// `panic`, `nan`, `slow`, `io_error`, `device_error`, `device_lost`.
    pub kind: String,
    /// Which actor (for `panic`, `slow`): data_loader, teacher, trainer, ema, evaluator,
    /// checkpointer, control, coordinator, `student:NAME`; for `device_error` and `slow`
    /// also `member:R`, member R > 0 of a data-parallel group (in the student's step).
    /// `device_error` fires in the trainer, a student, a member, or the evaluator (its
    /// probes then run again on the host).
    /// `slow:startup@0+MS` holds the daemon's start (at the end of the data source's open)
    /// for MS milliseconds, to drill what it does before its actor tree runs.
    #[serde(default)]
    pub actor: Option<String>,
    /// At which step.
    pub step: u64,
    /// How many times it fires (per process).
    #[serde(default = "d_times")]
    pub times: u32,
    /// Duration of a `slow` fault.
    #[serde(default)]
    pub duration_ms: u64,
}

fn d_times() -> u32 {
    1
}

impl std::str::FromStr for FaultSpec {
    type Err = String;
    /// `KIND[:ACTOR]@STEP[xTIMES][+MS]`, e.g. `panic:trainer@12`, `nan@30x2`, `slow:teacher@5+3000`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (head, rest) = s
            .split_once('@')
            .ok_or_else(|| format!("fault `{s}`: expected KIND[:ACTOR]@STEP"))?;
        let (kind, actor) = match head.split_once(':') {
            Some((k, a)) => (k.to_string(), Some(a.to_string())),
            None => (head.to_string(), None),
        };
        let (rest, duration_ms) = match rest.split_once('+') {
            Some((r, ms)) => (
                r,
                ms.parse::<u64>()
                    .map_err(|e| format!("fault `{s}`: duration: {e}"))?,
            ),
            None => (rest, 0),
        };
        let (step, times) = match rest.split_once('x') {
            Some((st, t)) => (
                st,
                t.parse::<u32>()
                    .map_err(|e| format!("fault `{s}`: times: {e}"))?,
            ),
            None => (rest, 1),
        };
        let step = step
            .parse::<u64>()
            .map_err(|e| format!("fault `{s}`: step: {e}"))?;
        let f = FaultSpec {
            kind,
            actor,
            step,
            times,
            duration_ms,
        };
        f.check()?;
        Ok(f)
    }
}

impl FaultSpec {
    /// Checks the kind and actor names.
    pub fn check(&self) -> Result<(), String> {
        const KINDS: [&str; 8] = [
            "panic",
            "nan",
            "slow",
            "io_error",
            "device_error",
            "device_lost",
            "error",
            "drift",
        ];
        const ACTORS: [&str; 9] = [
            "startup",
            "data_loader",
            "teacher",
            "trainer",
            "ema",
            "evaluator",
            "checkpointer",
            "control",
            "coordinator",
        ];
        if !KINDS.contains(&self.kind.as_str()) {
            return Err(format!(
                "unknown fault kind `{}` (one of {})",
                self.kind,
                KINDS.join(", ")
            ));
        }
        // member R > 0 of a data-parallel group (rank 0 is the computing actor itself)
        let member = |a: &str| {
            a.strip_prefix("member:")
                .and_then(|r| r.parse::<usize>().ok())
                .is_some_and(|r| r > 0)
        };
        if let Some(a) = &self.actor {
            if !ACTORS.contains(&a.as_str()) && !a.starts_with("student:") && !member(a) {
                return Err(format!(
                    "unknown actor `{a}` (one of {}, student:NAME, member:R with R > 0)",
                    ACTORS.join(", ")
                ));
            }
        }
        if let Some(a) = self.actor.as_deref().filter(|a| member(a)) {
            if !matches!(self.kind.as_str(), "device_error" | "slow") {
                return Err(format!(
                    "fault `{}` cannot be aimed at `{a}`: only device_error and slow fire in a data-parallel member",
                    self.kind
                ));
            }
        }
        if self.kind == "drift" && self.actor.is_some() {
            return Err(format!(
                "fault `drift` fires in a cluster's worker (`dinod worker --inject drift@STEP`), not in `{}`",
                self.actor.as_deref().unwrap_or_default()
            ));
        }
        if matches!(self.kind.as_str(), "panic" | "slow") && self.actor.is_none() {
            return Err(format!("fault `{}` needs an actor", self.kind));
        }
        if self.actor.as_deref() == Some("startup") && (self.kind != "slow" || self.step != 0) {
            return Err(format!(
                "fault `{}:startup@{}`: the start takes a slow fault at step 0 only (`slow:startup@0+MS`)",
                self.kind, self.step
            ));
        }
        // the other kinds fire in one place: aimed at another actor they would never fire
        if let Some(a) = &self.actor {
            let (fires, only) = match self.kind.as_str() {
                "nan" => (
                    a == "trainer" || a.starts_with("student:"),
                    "trainer or student:NAME",
                ),
                "device_error" => (
                    a == "trainer" || a == "evaluator" || a.starts_with("student:") || member(a),
                    "trainer, evaluator, student:NAME or member:R",
                ),
                "device_lost" => (a == "trainer", "trainer"),
                "io_error" => (a == "checkpointer", "checkpointer"),
                "error" => (a == "teacher", "teacher (of a distillation)"),
                _ => (true, ""),
            };
            if !fires {
                return Err(format!(
                    "fault `{}` fires in the {only} only, not in `{a}`",
                    self.kind
                ));
            }
        }
        Ok(())
    }
}

impl FaultSpec {
    /// A fault the daemon fires (`drift` fires in `dinod worker`).
    pub fn check_daemon(&self) -> Result<(), String> {
        if self.kind == "drift" {
            return Err(
                "fault `drift` fires in a cluster's worker: `dinod worker --inject drift@STEP`"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What to do when the accelerator is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnDeviceLoss {
    /// Checkpoint what is consistent and exit with status 75 (an outside supervisor restarts).
    #[default]
    Exit,
    /// Wait and probe for the device, then continue.
    Wait,
    /// Continue on the CPU at a reduced batch size.
    Cpu,
}

/// `[runtime]`: the daemon's operational settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// Prometheus endpoint port on 127.0.0.1 (0 = any free port; absent = off).
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// Log a progress line every N steps (when not on a terminal).
    #[serde(default = "d_log_every")]
    pub log_every_steps: u64,
    /// Hang detection.
    #[serde(default)]
    pub heartbeat: HeartbeatSection,
    /// NaN / spike policy.
    #[serde(default)]
    pub bad_steps: BadStepSection,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartSection,
    /// Where the training step runs: `cpu`, `cuda` or `cuda:N` (a `--features cuda`
    /// build). The data pipeline, probes and checkpoints stay on the host.
    #[serde(default = "d_device")]
    pub device: String,
    /// Accelerator loss policy (`"cpu"` cannot be combined with `[runtime.cluster]`).
    #[serde(default)]
    pub on_gpu_loss: OnDeviceLoss,
    /// `on_gpu_loss = "wait"`: seconds between probes of the lost device.
    #[serde(default = "d_gpu_probe_every")]
    pub gpu_probe_every_s: f64,
    /// `on_gpu_loss = "wait"`: give up (checkpoint, exit 75) after this many seconds
    /// without the device; 0 waits for ever.
    #[serde(default)]
    pub gpu_wait_max_s: f64,
    /// `on_gpu_loss = "cpu"`: the batch size on the CPU (default: a quarter of
    /// `train.batch_size`, at least 2). The LR is rescaled for it by `train.lr_scaling`.
    #[serde(default)]
    pub cpu_batch_size: Option<usize>,
    /// Data parallelism: members sharing each global batch (`train.batch_size` split
    /// evenly). On `device = "cpu"` they are threads of this process (for testing: no
    /// speed-up on a CPU); on `device = "cuda"` one GPU each, `cuda:0 .. cuda:N-1`, with
    /// NCCL. Rank 0 holds the state, optimizes and checkpoints; the others compute on
    /// copies of it each step.
    #[serde(default = "d_data_parallel")]
    pub data_parallel: usize,
    /// Data parallelism: how long a member waits in one all-reduce for the others before
    /// the collective fails (a member that stopped: its GPU hung, a peer that died). The
    /// group is then dropped (on NCCL: `ncclCommAbort`) and the step redone on a fresh
    /// one, as for any recoverable device fault. Below `heartbeat.step_s`, or the hang
    /// watchdog fires first.
    #[serde(default = "d_collective_timeout")]
    pub collective_timeout_s: f64,
    /// Data parallelism over processes, on this machine or others: this daemon is rank
    /// 0 and `dinod worker` processes join it over TCP (`actors::cluster`).
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
    /// Injected faults.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
}

fn d_data_parallel() -> usize {
    1
}

/// `[runtime.cluster]`: a data-parallel group of processes. The daemon (rank 0) owns the
/// run: it checkpoints, loads the data and runs the stage machine; each `dinod worker`
/// keeps a copy of the trainable state that follows rank 0's updates, computes its part
/// of every global batch, and the gradients are averaged over TCP. Each process computes
/// on `runtime.device`: the CPU, or one GPU (the sums then go through the host).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// `HOST:PORT` the daemon listens on for workers (TCP; not the control socket).
    pub listen: String,
    /// Processes in the group, the daemon included (at least 2).
    pub nodes: usize,
    /// The shared secret's file (at least 16 characters, the same on every node). It is
    /// proved with a challenge, never sent.
    pub token_file: PathBuf,
    /// How long the daemon waits for every worker when it (re)builds the group; then the
    /// step fails like a device fault, or the group forms with the nodes that came when
    /// they are at least `min_nodes`. Below `runtime.heartbeat.step_s`.
    #[serde(default = "d_cluster_join_wait")]
    pub join_wait_s: f64,
    /// Every this many steps the workers check that their copies of the state are rank
    /// 0's (a digest of every weight and moment); a copy that differs fails the group,
    /// which gets the whole state again. 0: never.
    #[serde(default = "d_cluster_verify_every")]
    pub verify_every_steps: u64,
    /// Where a worker's images come from: `"sent"` (rank 0 loads the whole batch and
    /// sends each worker its part: nothing is needed on the worker's machine) or
    /// `"local"` (each worker opens `data.source` itself and builds only its part, bit
    /// for bit the same rows; the source must hold the same files on every node, which
    /// rank 0 checks against a digest of the worker's images every
    /// `verify_every_steps`).
    #[serde(default)]
    pub worker_data: WorkerData,
    /// How the group sums the gradients: `"mesh"` (every pair of nodes holds a link and
    /// each node sums a 1/`nodes` share of every large vector: about 2 (nodes - 1) / nodes
    /// vectors cross each node's link per sum; the workers must accept connections from
    /// each other, on an ephemeral port of the address they reach the daemon from) or
    /// `"star"` (every sum goes through the daemon, whose link carries 2 (nodes - 1)
    /// vectors; the workers need no inbound connections). The same bits either way.
    #[serde(default)]
    pub reduce: crate::cluster::Reduce,
    /// The fewest nodes the group trains with (default: `nodes`, every one). When an
    /// admission has waited `join_wait_s` and at least this many nodes came, the group
    /// forms with those, the global batch split among them, instead of failing the step:
    /// a worker whose machine is gone for good does not stop the run. Once the group is
    /// short, a worker that comes back is admitted at the next step (the group is formed
    /// again, with the whole state sent). `train.batch_size` must split into every size
    /// from `min_nodes` to `nodes` (3 to 4: a multiple of 12; 4 to 8: of 840).
    #[serde(default)]
    pub min_nodes: Option<usize>,
}

impl ClusterSection {
    /// [`ClusterSection::min_nodes`], or `nodes`.
    pub fn fewest(&self) -> usize {
        self.min_nodes.unwrap_or(self.nodes)
    }
}

/// `runtime.cluster.worker_data`: who loads a worker's part of each batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WorkerData {
    /// Rank 0 sends it with the teacher order.
    #[default]
    Sent,
    /// The worker reads it from its own `data.source`.
    Local,
}

fn d_cluster_verify_every() -> u64 {
    100
}

fn d_cluster_join_wait() -> f64 {
    120.0
}

fn d_collective_timeout() -> f64 {
    300.0
}

fn d_log_every() -> u64 {
    10
}

fn d_device() -> String {
    "cpu".into()
}

fn d_gpu_probe_every() -> f64 {
    30.0
}

/// Whether `s` names a device: `cpu`, `cuda` or `cuda:N`.
pub fn valid_device(s: &str) -> bool {
    s == "cpu"
        || s == "cuda"
        || s.strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            metrics_port: None,
            log_every_steps: d_log_every(),
            heartbeat: HeartbeatSection::default(),
            bad_steps: BadStepSection::default(),
            restart: RestartSection::default(),
            device: d_device(),
            on_gpu_loss: OnDeviceLoss::Exit,
            gpu_probe_every_s: d_gpu_probe_every(),
            gpu_wait_max_s: 0.0,
            cpu_batch_size: None,
            data_parallel: d_data_parallel(),
            collective_timeout_s: d_collective_timeout(),
            cluster: None,
            faults: vec![],
        }
    }
}

/// One labelled probe set. (No `deny_unknown_fields` here: serde cannot combine it with
/// `flatten`; the flattened `ProbeSetConfig` rejects unknown keys itself.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeSetSection {
    /// Name in reports.
    pub name: String,
    /// Source of the probe's training images (labels, and label maps for the dense probe).
    pub train: data::SourceSpec,
    /// Source of the held-out images (default: held out from `train`).
    #[serde(default)]
    pub test: Option<data::SourceSpec>,
    /// Sizes and counts.
    #[serde(flatten)]
    pub set: eval_probes::ProbeSetConfig,
}

/// `[eval]`: live probes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Probe the EMA teacher every N steps (0 = never). A checkpoint is written at every
    /// evaluated step, so the best-dense checkpoint exists when Gram anchoring needs it.
    #[serde(default)]
    pub every_steps: u64,
    /// Probe sets.
    #[serde(default)]
    pub sets: Vec<ProbeSetSection>,
    /// Probe settings (cost bounds).
    #[serde(default)]
    pub probes: eval_probes::ProbeConfig,
    /// Where the probe features are extracted: `auto` (where the model trains: a GPU run
    /// probes on its GPU while training waits), `cpu`, or `cuda:N`. The probes' fits
    /// (k-NN, linear, dense) run on the host.
    #[serde(default = "d_eval_device")]
    pub device: String,
}

fn d_eval_device() -> String {
    "auto".into()
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every_steps: 0,
            sets: vec![],
            probes: Default::default(),
            device: d_eval_device(),
        }
    }
}

/// `[stages]`: automatic stage transitions, and the crops of high-resolution adaptation.
/// (Unknown keys are rejected by the flattened `StageConfig`.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagesSection {
    /// Let the probes move the run through its stages.
    #[serde(default = "d_true")]
    pub automatic: bool,
    /// The state machine's thresholds and stage settings.
    #[serde(flatten)]
    pub machine: eval_probes::StageConfig,
    /// Mixed global/local sizes of high-resolution adaptation (Gram sizes are derived from
    /// `high_res.gram_teacher_scale`); default: 1.5x and 2x the base global size.
    #[serde(default)]
    pub high_res_crops: Option<data::HighResConfig>,
}

impl Default for StagesSection {
    fn default() -> Self {
        Self {
            automatic: true,
            machine: eval_probes::StageConfig::default(),
            high_res_crops: None,
        }
    }
}

/// One student of a distillation run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    /// Name (checkpoints in `STATE/students/NAME`, `dinod export --which student:NAME`).
    pub name: String,
    /// Backbone preset.
    #[serde(default)]
    pub preset: Option<String>,
    /// Backbone fields overriding the preset (patch size must equal the teacher's).
    #[serde(default)]
    pub backbone: toml::Table,
    /// DINO head (its `n_prototypes` must equal the teacher's).
    pub dino_head: HeadConfig,
    /// iBOT head (its `n_prototypes` must equal the teacher's).
    pub ibot_head: HeadConfig,
    /// Base LR (before scaling); `[train].lr` when absent.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Momentum of the student's EMA (the evaluated, exported model); `[train].momentum`
    /// when absent.
    #[serde(default)]
    pub momentum: Option<f64>,
}

/// `[distill]`: multi-student distillation from one frozen teacher, whose forward pass
/// runs once per batch for all students.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The frozen teacher: `self` (this run's own EMA teacher, when its stage machine leaves
    /// high-resolution adaptation: pretraining, Gram anchoring and adaptation run first in
    /// the same state directory, then the students start), `state:DIR` (the EMA teacher of the latest valid checkpoint of a
    /// dinod run; its architecture must match `[model]`) or `safetensors:FILE` (official
    /// state_dict names with `dino_head.*` / `ibot_head.*`, as `dinod export --with-heads`
    /// writes; architecture from `[model]`).
    pub teacher: String,
    /// Students may run at most this many batches apart (a slow one bounds the others).
    #[serde(default = "d_max_lag")]
    pub max_lag: u64,
    /// Teacher outputs kept in memory for students that fall behind (restarts, rollbacks);
    /// older batches are recomputed.
    #[serde(default = "d_ring")]
    pub keep_batches: usize,
    /// The students.
    pub students: Vec<StudentSection>,
}

fn d_max_lag() -> u64 {
    4
}
fn d_ring() -> usize {
    16
}

/// A student as the runtime uses it.
#[derive(Clone, Debug)]
pub struct StudentPlan {
    /// Name.
    pub name: String,
    /// Its model config.
    pub ssl: SslConfig,
    /// Its LR schedule (scaled).
    pub lr: Schedule,
    /// Its EMA momentum.
    pub momentum: f64,
    /// Its seed (run seed mixed with the name).
    pub seed: u64,
}

/// The whole run configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seed of every random stream (initialisation, data, masks, drop path).
    #[serde(default)]
    pub seed: u64,
    /// Element type.
    #[serde(default)]
    pub precision: Precision,
    /// Architecture and objective.
    pub model: ModelSection,
    /// Batch and schedules.
    pub train: TrainSection,
    /// Data source, crops, masks, loader.
    #[serde(default)]
    pub data: data::DataConfig,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Live probes.
    #[serde(default)]
    pub eval: EvalSection,
    /// Stage transitions.
    #[serde(default)]
    pub stages: StagesSection,
    /// Multi-student distillation (a distillation run when present).
    #[serde(default)]
    pub distill: Option<DistillSection>,
    /// Daemon settings.
    #[serde(default)]
    pub runtime: RuntimeSection,
}

/// One configuration problem.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigProblem {
    /// Dotted key.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// All problems of a config file.
#[derive(Debug)]
pub struct ConfigErrors {
    /// Where the config came from.
    pub origin: String,
    /// Every problem found.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid config {} ({} problem{}):",
            self.origin,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A validated config with its derived values.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The config as written (effective, after defaults).
    pub config: RunConfig,
    /// The model's config (preset merged with overrides).
    pub ssl: SslConfig,
    /// The effective config as TOML text (stored in checkpoints).
    pub effective_toml: String,
    /// blake3 of `effective_toml`.
    pub config_hash: String,
    /// LR schedule (scaled).
    pub lr: Schedule,
    /// Teacher temperature schedule.
    pub teacher_temp: Schedule,
    /// The students of a distillation run (empty otherwise).
    pub students: Vec<StudentPlan>,
}

/// `distill.teacher = "self"`: this run pretrains, anchors and adapts its own teacher, then
/// hands over to the students.
pub const SELF_TEACHER: &str = "self";

impl Plan {
    /// The students learn from this run's own teacher after its high-resolution stage
    /// (`distill.teacher = "self"`), rather than from a teacher given up front.
    pub fn distill_after_stages(&self) -> bool {
        !self.students.is_empty()
            && self
                .config
                .distill
                .as_ref()
                .is_some_and(|d| d.teacher == SELF_TEACHER)
    }

    /// The plan a run continues with on the CPU after losing its accelerator
    /// (`on_gpu_loss = "cpu"`): the same recipe on `cpu` at `runtime.cpu_batch_size`
    /// (default a quarter of the batch, at least 2), the LR rescaled for that batch by
    /// `train.lr_scaling`. Validated like any config.
    pub fn cpu_fallback(&self) -> Result<Plan, ConfigErrors> {
        let mut cfg = self.config.clone();
        let b = cfg.train.batch_size;
        cfg.train.batch_size = cfg.runtime.cpu_batch_size.unwrap_or((b / 4).max(2)).min(b);
        cfg.runtime.device = "cpu".into();
        cfg.runtime.data_parallel = 1;
        if cfg.precision == Precision::Bf16 {
            // the CPU kernels are f32: same master weights, f32 compute
            cfg.precision = Precision::F32;
        }
        let text = toml::to_string(&cfg).map_err(|e| ConfigErrors {
            origin: "the CPU fallback".into(),
            problems: vec![problem("(value)", e.to_string())],
        })?;
        parse(&text, "the CPU fallback")
    }

    /// The schedule values of `step` in the pretraining stage.
    pub fn hparams(&self, step: u64) -> StepHparams {
        let t = &self.config.train;
        let lr = self.lr.at(step);
        StepHparams {
            lr,
            last_layer_lr: if step < t.freeze_last_layer_steps {
                0.0
            } else {
                lr
            },
            weight_decay: t.weight_decay,
            momentum: t.momentum,
            teacher_temp: self.teacher_temp.at(step),
            gram_weight: 0.0,
            local_dino_weight: 1.0,
        }
    }
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key: key.into(),
        message: message.into(),
    }
}

/// Parses and validates a config; `origin` names it in messages.
pub fn parse(text: &str, origin: &str) -> Result<Plan, ConfigErrors> {
    let err = |problems| ConfigErrors {
        origin: origin.to_string(),
        problems,
    };
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| err(vec![problem("(syntax)", e.to_string().trim().to_string())]))?;
    // Every type rejects unknown keys; collect them all by removing each reported key and
    // deserialising again, so one run of `dinod` lists every misspelt key at once.
    let mut problems: Vec<ConfigProblem> = vec![];
    let mut cfg = loop {
        let mut ignored = BTreeSet::new();
        let parsed: Result<RunConfig, _> =
            serde_ignored::deserialize(toml::Value::Table(table.clone()), |path| {
                ignored.insert(path.to_string());
            });
        problems.extend(ignored.into_iter().map(|k| problem(k, "unknown key")));
        match parsed {
            Ok(c) => break c,
            Err(e) => {
                let msg = e.to_string();
                if let Some((path, field)) = unknown_field(&msg) {
                    let expected = msg
                        .split_once("expected ")
                        .map(|(_, x)| x.lines().next().unwrap_or("").trim().to_string())
                        .unwrap_or_default();
                    let key = if path.is_empty() {
                        field.clone()
                    } else {
                        format!("{path}.{field}")
                    };
                    if problems.len() < 100 && remove_key(&mut table, &path, &field) {
                        problems.push(problem(key, format!("unknown key (expected {expected})")));
                        continue;
                    }
                }
                problems.push(problem("(value)", msg.trim().replace('\n', " ")));
                return Err(err(problems));
            }
        }
    };
    // the backbone: preset merged with overrides
    let backbone = match build_backbone(&cfg.model) {
        Ok(b) => Some(b),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    if !valid_device(&cfg.runtime.device) {
        problems.push(problem(
            "runtime.device",
            format!("`{}`: use cpu, cuda or cuda:N", cfg.runtime.device),
        ));
    }
    let rt = &cfg.runtime;
    if !(rt.gpu_probe_every_s > 0.0 && rt.gpu_probe_every_s.is_finite()) {
        problems.push(problem(
            "runtime.gpu_probe_every_s",
            format!(
                "must be a positive number of seconds, got {}",
                rt.gpu_probe_every_s
            ),
        ));
    }
    if !(rt.gpu_wait_max_s >= 0.0 && rt.gpu_wait_max_s.is_finite()) {
        problems.push(problem(
            "runtime.gpu_wait_max_s",
            format!(
                "must be 0 (no limit) or a positive number of seconds, got {}",
                rt.gpu_wait_max_s
            ),
        ));
    }
    // a group of members (threads, GPUs or processes) splits the batch and waits in
    // collectives
    let split = |key: &str, n: usize, problems: &mut Vec<_>| {
        let b = cfg.train.batch_size;
        if !b.is_multiple_of(n) || b / n < 2 {
            problems.push(problem(
                key,
                format!("train.batch_size {b} must split into {n} parts of at least 2 images (KoLeo is per member)"),
            ));
        }
    };
    let hb = &rt.heartbeat;
    for (key, v) in [
        ("load_s", hb.load_s),
        ("step_s", hb.step_s),
        ("eval_s", hb.eval_s),
        ("checkpoint_s", hb.checkpoint_s),
        ("escalate_after_s", hb.escalate_after_s),
        ("start_s", hb.start_s),
    ] {
        if !(v.is_finite() && v > 0.0) {
            problems.push(problem(
                format!("runtime.heartbeat.{key}"),
                format!("must be a positive number of seconds, got {v}"),
            ));
        }
    }
    if hb.check_every_ms == 0 {
        problems.push(problem(
            "runtime.heartbeat.check_every_ms",
            "must be at least 1",
        ));
    }
    if rt.data_parallel > 1 || rt.cluster.is_some() {
        let t = rt.collective_timeout_s;
        if !(t > 0.0 && t < rt.heartbeat.step_s) {
            problems.push(problem(
                "runtime.collective_timeout_s",
                format!(
                    "must be positive and below runtime.heartbeat.step_s ({} s; the hang watchdog would fire first), got {t}",
                    rt.heartbeat.step_s
                ),
            ));
        }
    }
    if let Some(c) = &rt.cluster {
        if c.nodes < 2 {
            problems.push(problem(
                "runtime.cluster.nodes",
                format!(
                    "must be at least 2 (this daemon and a worker), got {}",
                    c.nodes
                ),
            ));
        } else {
            split("runtime.cluster.nodes", c.nodes, &mut problems);
        }
        match c.min_nodes {
            Some(m) if m < 2 || m > c.nodes => problems.push(problem(
                "runtime.cluster.min_nodes",
                format!(
                    "must be from 2 (this daemon and a worker) to nodes ({}), got {m}",
                    c.nodes
                ),
            )),
            Some(m) => {
                let b = cfg.train.batch_size;
                let bad: Vec<String> = (m..c.nodes)
                    .filter(|&n| !b.is_multiple_of(n) || b / n < 2)
                    .map(|n| n.to_string())
                    .collect();
                if !bad.is_empty() {
                    let gcd = |mut a: usize, mut b: usize| {
                        while b != 0 {
                            (a, b) = (b, a % b);
                        }
                        a
                    };
                    let lcm = (m..=c.nodes).fold(1usize, |l, n| l / gcd(l, n) * n);
                    problems.push(problem(
                        "runtime.cluster.min_nodes",
                        format!(
                            "train.batch_size {b} must split into every group size from {m} to {} (at least 2 images each: KoLeo is per member), and does not split into {}: such a batch is a multiple of {lcm}",
                            c.nodes,
                            bad.join(", ")
                        ),
                    ));
                }
            }
            None => {}
        }
        if rt.data_parallel > 1 {
            problems.push(problem(
                "runtime.cluster",
                "cannot be combined with runtime.data_parallel > 1 yet: one member per process",
            ));
        }
        if rt.device != "cpu" && rt.on_gpu_loss == OnDeviceLoss::Cpu {
            // the members share one batch split and must update their copies with the
            // same code: one of them cannot go on alone on the host at another batch
            problems.push(problem(
                "runtime.on_gpu_loss",
                "\"cpu\" cannot be combined with [runtime.cluster]: every member of a group computes on the same kind of device and batch; use \"exit\" (the supervisor restarts the daemon and the workers join again) or \"wait\"",
            ));
        }
        if cfg.distill.is_some() {
            problems.push(problem(
                "runtime.cluster",
                "distillation over a group of processes is not built: drop [distill] or [runtime.cluster]",
            ));
        }
        if !(c.join_wait_s > 0.0 && c.join_wait_s < rt.heartbeat.step_s) {
            problems.push(problem(
                "runtime.cluster.join_wait_s",
                format!(
                    "must be positive and below runtime.heartbeat.step_s ({} s), got {}",
                    rt.heartbeat.step_s, c.join_wait_s
                ),
            ));
        }
        if let Err(e) = crate::cluster::Token::from_file(&c.token_file) {
            problems.push(problem("runtime.cluster.token_file", format!("{e:#}")));
        }
    }
    if rt.data_parallel == 0 {
        problems.push(problem("runtime.data_parallel", "must be at least 1"));
    } else if rt.data_parallel > 1 {
        let n = rt.data_parallel;
        split("runtime.data_parallel", n, &mut problems);
        if !(rt.device == "cpu" || rt.device == "cuda" || rt.device == "cuda:0") {
            problems.push(problem(
                "runtime.data_parallel",
                format!(
                    "members run on cpu, or on cuda:0 .. cuda:{} with device = \"cuda\", not on {}",
                    n - 1,
                    rt.device
                ),
            ));
        }
    }
    if let Some(b) = rt.cpu_batch_size {
        if b < 2 || b > cfg.train.batch_size {
            problems.push(problem(
                "runtime.cpu_batch_size",
                format!(
                    "must be between 2 and train.batch_size ({}), got {b}",
                    cfg.train.batch_size
                ),
            ));
        }
    }
    let mut ssl = None;
    if let Some(backbone) = backbone {
        let s = SslConfig {
            backbone,
            dino_head: cfg.model.dino_head.clone(),
            ibot_head: cfg.model.ibot_head.clone(),
            loss: cfg.model.loss.clone(),
            optim: cfg.model.optim.clone(),
        };
        problems.extend(s.problems().into_iter().map(|(k, m)| problem(k, m)));
        ssl = Some(s);
    }
    if cfg
        .distill
        .as_ref()
        .is_some_and(|d| d.teacher == SELF_TEACHER)
    {
        // the students take over from this run's own EMA teacher when high-resolution
        // adaptation ends
        cfg.stages.machine.after_high_res = eval_probes::AfterHighRes::Distill;
    }
    let t = &cfg.train;
    if t.batch_size < 2 {
        problems.push(problem(
            "train.batch_size",
            "must be at least 2 (Sinkhorn-Knopp and KoLeo work across the batch)",
        ));
    }
    if !(t.lr > 0.0 && t.lr.is_finite()) {
        problems.push(problem(
            "train.lr",
            format!("must be a positive number, got {}", t.lr),
        ));
    }
    if !(0.0..=1.0).contains(&t.momentum) {
        problems.push(problem(
            "train.momentum",
            format!("EMA momentum must be in [0, 1], got {}", t.momentum),
        ));
    }
    if t.teacher_temp <= 0.0 || t.teacher_temp_start <= 0.0 {
        problems.push(problem(
            "train.teacher_temp",
            "temperatures must be positive",
        ));
    }
    if t.weight_decay < 0.0 {
        problems.push(problem("train.weight_decay", "must not be negative"));
    }
    if let Err(data::DataError::Config(errs)) = cfg.data.validate() {
        problems.extend(errs.into_iter().map(|m| problem("data", m)));
    }
    if let Some(s) = &ssl {
        if cfg.data.masks.patch_size as usize != s.backbone.patch_size {
            problems.push(problem(
                "data.masks.patch_size",
                format!(
                    "is {} but the backbone's patch_size is {} (they must agree)",
                    cfg.data.masks.patch_size, s.backbone.patch_size
                ),
            ));
        }
        for sizes in cfg.data.crops.all_sizes() {
            for (what, px) in [
                ("global", Some(sizes.global)),
                ("local", Some(sizes.local)),
                ("gram", sizes.gram),
            ] {
                if let Some(px) = px {
                    if !(px as usize).is_multiple_of(s.backbone.patch_size) {
                        problems.push(problem(
                            format!("data.crops.{what}_size"),
                            format!(
                                "{px} px is not a multiple of the patch size {}",
                                s.backbone.patch_size
                            ),
                        ));
                    }
                }
            }
        }
    }
    if cfg.checkpoint.keep_last < 2 {
        problems.push(problem(
            "checkpoint.keep_last",
            "must be at least 2 (the newest may still be in flight when the next is written)",
        ));
    }
    if cfg.checkpoint.every_steps == 0 {
        problems.push(problem("checkpoint.every_steps", "must be at least 1"));
    }
    if let Some(g) = cfg.checkpoint.max_disk_gb {
        if !(g.is_finite() && g > 0.0) {
            problems.push(problem(
                "checkpoint.max_disk_gb",
                format!("must be a positive number of GB, got {g}"),
            ));
        }
    }
    let f = cfg.checkpoint.min_free_gb;
    if !(f.is_finite() && f >= 0.0) {
        problems.push(problem(
            "checkpoint.min_free_gb",
            format!("must be a number of GB >= 0, got {f}"),
        ));
    }
    if let Some(t) = cfg.checkpoint.every_seconds {
        if !(t.is_finite() && t > 0.0) {
            problems.push(problem(
                "checkpoint.every_seconds",
                format!("must be a positive number of seconds, got {t}"),
            ));
        }
    }
    problems.extend(
        cfg.eval
            .probes
            .problems()
            .into_iter()
            .map(|m| problem("eval.probes", m)),
    );
    problems.extend(
        cfg.stages
            .machine
            .problems()
            .into_iter()
            .map(|m| problem("stages", m)),
    );
    if !(cfg.eval.device == "auto" || valid_device(&cfg.eval.device)) {
        problems.push(problem(
            "eval.device",
            format!(
                "must be auto, cpu, cuda or cuda:N, got `{}`",
                cfg.eval.device
            ),
        ));
    }
    if cfg.eval.every_steps > 0 && cfg.eval.sets.is_empty() {
        problems.push(problem(
            "eval.sets",
            "eval.every_steps is set but no probe set is configured",
        ));
    }
    for (i, set) in cfg.eval.sets.iter().enumerate() {
        problems.extend(
            set.set
                .problems()
                .into_iter()
                .map(|m| problem(format!("eval.sets[{i}]"), m)),
        );
        if let Some(s) = &ssl {
            if !(set.set.size as usize).is_multiple_of(s.backbone.patch_size) {
                problems.push(problem(
                    format!("eval.sets[{i}].size"),
                    format!(
                        "{} px is not a multiple of the patch size {}",
                        set.set.size, s.backbone.patch_size
                    ),
                ));
            }
        }
    }
    if let Some(init) = &cfg.model.init {
        if !(init.starts_with("state:") || init.starts_with("safetensors:")) {
            problems.push(problem(
                "model.init",
                format!("`{init}`: use state:DIR or safetensors:FILE"),
            ));
        }
        if cfg
            .distill
            .as_ref()
            .is_some_and(|d| d.teacher != SELF_TEACHER)
        {
            problems.push(problem(
                "model.init",
                "a distillation from a given teacher trains only its students, which are drawn from their seeds; init is for a self-supervised run",
            ));
        }
    }
    if let (Some(d), Some(teacher)) = (&cfg.distill, &ssl) {
        if d.students.is_empty() {
            problems.push(problem(
                "distill.students",
                "a distillation run needs at least one student",
            ));
        }
        if !(d.teacher == SELF_TEACHER
            || d.teacher.starts_with("state:")
            || d.teacher.starts_with("safetensors:"))
        {
            problems.push(problem(
                "distill.teacher",
                format!("`{}`: use self, state:DIR or safetensors:FILE", d.teacher),
            ));
        }
        if d.teacher == SELF_TEACHER && !cfg.stages.automatic {
            problems.push(problem("distill.teacher", "`self` hands over from this run's own stages after high-resolution adaptation: it needs stages.automatic = true"));
        }
        if d.max_lag == 0 || d.keep_batches == 0 {
            problems.push(problem(
                "distill",
                "max_lag and keep_batches must be at least 1",
            ));
        }
        let mut names = BTreeSet::new();
        for st in &d.students {
            let key = format!("distill.students.{}", st.name);
            if st.name.is_empty()
                || !st
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                || !names.insert(st.name.clone())
            {
                problems.push(problem(
                    key.clone(),
                    "names must be unique and use only letters, digits, `_` and `-`",
                ));
            }
            match student_ssl(st, teacher) {
                Ok(s) => {
                    problems.extend(
                        s.problems()
                            .into_iter()
                            .map(|(k, m)| problem(format!("{key}.{k}"), m)),
                    );
                    if s.backbone.patch_size != teacher.backbone.patch_size {
                        problems.push(problem(format!("{key}.backbone.patch_size"), format!("{} differs from the teacher's {} (students see the teacher's crops and masks)", s.backbone.patch_size, teacher.backbone.patch_size)));
                    }
                    if s.dino_head.n_prototypes != teacher.dino_head.n_prototypes
                        || s.ibot_head.n_prototypes != teacher.ibot_head.n_prototypes
                    {
                        problems.push(problem(format!("{key}.dino_head.n_prototypes"), "students must have the teacher's numbers of prototypes (they learn its targets)"));
                    }
                }
                Err(p) => problems.extend(p),
            }
        }
    }
    for (i, f) in cfg.runtime.faults.iter().enumerate() {
        if let Err(m) = f.check().and_then(|()| f.check_daemon()) {
            problems.push(problem(format!("runtime.faults[{i}]"), m));
        }
    }
    let r = &cfg.runtime.restart;
    if r.max_restarts == 0 || r.window_s <= 0.0 {
        problems.push(problem(
            "runtime.restart",
            "max_restarts and window_s must be positive",
        ));
    }
    if !problems.is_empty() {
        return Err(err(problems));
    }
    let ssl = ssl.expect("no problems means the model config was built");
    let effective_toml =
        toml::to_string(&cfg).map_err(|e| err(vec![problem("(internal)", e.to_string())]))?;
    let config_hash = blake3::hash(effective_toml.as_bytes()).to_hex().to_string();
    let scale = match t.lr_scaling {
        LrScaling::SqrtWrt1024 => 4.0 * (t.batch_size as f64 / 1024.0).sqrt(),
        LrScaling::None => 1.0,
    };
    let lr = Schedule::warmup_constant(0.0, t.lr * scale, t.warmup_steps);
    let teacher_temp = Schedule::warmup_constant(
        t.teacher_temp_start,
        t.teacher_temp,
        t.teacher_temp_warmup_steps,
    );
    let students = match &cfg.distill {
        Some(d) => d
            .students
            .iter()
            .map(|s| {
                let ssl_s = student_ssl(s, &ssl).expect("validated above");
                let seed = cfg.seed
                    ^ blake3::hash(s.name.as_bytes()).as_bytes()[..8]
                        .iter()
                        .fold(0u64, |a, &b| (a << 8) | b as u64);
                StudentPlan {
                    name: s.name.clone(),
                    ssl: ssl_s,
                    lr: Schedule::warmup_constant(
                        0.0,
                        s.lr.unwrap_or(t.lr) * scale,
                        t.warmup_steps,
                    ),
                    momentum: s.momentum.unwrap_or(t.momentum),
                    seed,
                }
            })
            .collect(),
        None => vec![],
    };
    Ok(Plan {
        config: cfg,
        ssl,
        effective_toml,
        config_hash,
        lr,
        teacher_temp,
        students,
    })
}

/// A student's model config: its backbone and heads, the teacher's loss and optimizer settings.
fn student_ssl(s: &StudentSection, teacher: &SslConfig) -> Result<SslConfig, Vec<ConfigProblem>> {
    let m = ModelSection {
        preset: s.preset.clone(),
        backbone: s.backbone.clone(),
        dino_head: s.dino_head.clone(),
        ibot_head: s.ibot_head.clone(),
        loss: teacher.loss.clone(),
        optim: teacher.optim.clone(),
        init: None,
    };
    let backbone = build_backbone(&m).map_err(|p| {
        p.into_iter()
            .map(|x| problem(format!("distill.students.{}.{}", s.name, x.key), x.message))
            .collect::<Vec<_>>()
    })?;
    Ok(SslConfig {
        backbone,
        dino_head: s.dino_head.clone(),
        ibot_head: s.ibot_head.clone(),
        loss: teacher.loss.clone(),
        optim: teacher.optim.clone(),
    })
}

fn build_backbone(m: &ModelSection) -> Result<VitConfig, Vec<ConfigProblem>> {
    let mut table = match &m.preset {
        Some(p) => match VitConfig::preset(p) {
            Some(v) => toml::Table::try_from(v).expect("presets serialise"),
            None => {
                return Err(vec![problem(
                    "model.preset",
                    format!(
                        "unknown preset `{p}`; choose one of {}",
                        VitConfig::PRESETS.join(", ")
                    ),
                )])
            }
        },
        None => toml::Table::new(),
    };
    for (k, v) in &m.backbone {
        table.insert(k.clone(), v.clone());
    }
    toml::Value::Table(table)
        .try_into::<VitConfig>()
        .map_err(|e| {
            let msg = e.to_string();
            vec![problem(
                "model.backbone",
                format!(
                    "{} (set `model.preset` or give embed_dim, depth and num_heads)",
                    msg.trim()
                ),
            )]
        })
}

/// `(path, field)` of a serde "unknown field" error from the toml deserializer.
fn unknown_field(msg: &str) -> Option<(String, String)> {
    let rest = msg.strip_prefix("unknown field `")?;
    let field = rest.split('`').next()?.to_string();
    let path = match msg.rsplit_once("in `") {
        Some((_, p)) => p.trim_end().trim_end_matches('`').to_string(),
        None => String::new(),
    };
    Some((path, field))
}

/// Removes `path.field` from a TOML table; whether it was there.
fn remove_key(table: &mut toml::Table, path: &str, field: &str) -> bool {
    let mut t = table;
    if !path.is_empty() {
        for part in path.split('.') {
            match t.get_mut(part) {
                Some(toml::Value::Table(inner)) => t = inner,
                _ => return false,
            }
        }
    }
    t.remove(field).is_some()
}

#[cfg(test)]
mod tests {
    /// A fault parses with or without its actor, and one aimed at an actor where its kind
    /// never fires is refused instead of silently never firing.
    #[test]
    fn an_injected_fault_is_aimed_where_it_fires() {
        use super::FaultSpec;
        let f: FaultSpec = "device_error:trainer@30x2+5".parse().unwrap();
        assert_eq!(
            (
                f.kind.as_str(),
                f.actor.as_deref(),
                f.step,
                f.times,
                f.duration_ms
            ),
            ("device_error", Some("trainer"), 30, 2, 5)
        );
        for ok in [
            "device_error@3",
            "device_error:student:s@3",
            "device_error:member:2@3",
            "device_error:evaluator@4",
            "slow:member:1@3+2000",
            "device_lost:trainer@3",
            "nan:student:s@4",
            "io_error:checkpointer@2",
            "panic:teacher@1",
            "error:teacher@3",
        ] {
            assert!(ok.parse::<FaultSpec>().is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("error:trainer@3", "teacher (of a distillation)"),
            (
                "device_error:teacher@3",
                "trainer, evaluator, student:NAME or member:R",
            ),
            ("device_lost:student:s@3", "fires in the trainer only"),
            ("nan:ema@3", "trainer or student:NAME"),
            ("io_error:trainer@3", "checkpointer only"),
            ("panic@3", "needs an actor"),
            ("oops@3", "unknown fault kind"),
            ("panic:nobody@3", "unknown actor"),
            ("device_error:member:0@3", "unknown actor"),
            (
                "nan:member:1@3",
                "only device_error and slow fire in a data-parallel member",
            ),
            (
                "panic:member:1@3",
                "only device_error and slow fire in a data-parallel member",
            ),
            ("device_error:trainer", "expected KIND[:ACTOR]@STEP"),
        ] {
            let e = bad.parse::<FaultSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// Every recipe shipped in `configs/` (the built-in default among them) is valid.
    #[test]
    fn every_shipped_recipe_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            if let Err(e) = super::parse(&text, &p.display().to_string()) {
                panic!("{e}");
            }
            n += 1;
        }
        assert!(n >= 4, "only {n} recipes in {}", dir.display());
        let plan = super::parse(super::DEFAULT_RECIPE, "built-in").unwrap();
        assert_eq!(plan.config.train.lr_scaling, super::LrScaling::SqrtWrt1024);
        assert_eq!(plan.config.runtime.device, "cpu");
    }

    /// `model.init` names a source dinod reads, and only for a self-supervised run; the
    /// source itself is read when a new run starts (a stored config must still parse once
    /// the file is gone).
    /// Every heartbeat limit must be a positive number: a zero or negative one would make
    /// every phase look hung (or, for the start, starve the watchdog at once).
    #[test]
    fn heartbeat_limits_are_validated() {
        let e = super::parse(
            &format!(
                "{}\n[runtime.heartbeat]\nload_s = -1.0\nstart_s = 0.0\ncheck_every_ms = 0\n",
                super::DEFAULT_RECIPE
            ),
            "t",
        )
        .unwrap_err()
        .to_string();
        for key in [
            "runtime.heartbeat.load_s",
            "runtime.heartbeat.start_s",
            "runtime.heartbeat.check_every_ms",
        ] {
            assert!(e.contains(key), "{key} missing in: {e}");
        }
        assert!(!e.contains("runtime.heartbeat.step_s"), "{e}");
        let ok = super::parse(
            &format!(
                "{}\n[runtime.heartbeat]\nstart_s = 30.0\n",
                super::DEFAULT_RECIPE
            ),
            "t",
        )
        .unwrap();
        assert_eq!(ok.config.runtime.heartbeat.start_s, 30.0);
    }

    #[test]
    fn the_init_source_is_validated() {
        assert!(super::DEFAULT_RECIPE.contains("\n[model]\n"));
        let with = |spec: &str, extra: &str| {
            let text = super::DEFAULT_RECIPE
                .replace("\n[model]\n", &format!("\n[model]\ninit = \"{spec}\"\n"));
            super::parse(&format!("{text}{extra}"), "t")
        };
        for ok in ["safetensors:/nowhere/w.safetensors", "state:/nowhere"] {
            let plan = with(ok, "").unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(plan.config.model.init.as_deref(), Some(ok));
        }
        assert_eq!(
            super::parse(super::DEFAULT_RECIPE, "t")
                .unwrap()
                .config
                .model
                .init,
            None
        );
        let e = with("w.safetensors", "").unwrap_err().to_string();
        assert!(
            e.contains("model.init") && e.contains("safetensors:FILE"),
            "{e}"
        );
        let distill = concat!(
            "\n[distill]\nteacher = \"state:/t\"\n[[distill.students]]\nname = \"s\"\n",
            "preset = \"vit_pico\"\n",
            "dino_head = { hidden_dim = 16, bottleneck_dim = 8, n_prototypes = 4096 }\n",
            "ibot_head = { hidden_dim = 16, bottleneck_dim = 8, n_prototypes = 4096 }\n"
        );
        let e = with("state:/nowhere", distill).unwrap_err().to_string();
        assert!(
            e.contains("model.init") && e.contains("only its students"),
            "{e}"
        );
    }

    /// `runtime.device` is checked when the config is read, before any device is opened.
    #[test]
    fn the_device_is_validated() {
        for ok in ["cpu", "cuda", "cuda:0", "cuda:7"] {
            let text = format!(
                "{}\n[runtime]\ndevice = \"{ok}\"\n",
                strip_runtime(super::DEFAULT_RECIPE)
            );
            let plan = super::parse(&text, "t").unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(plan.config.runtime.device, ok);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", ""] {
            let text = format!(
                "{}\n[runtime]\ndevice = \"{bad}\"\n",
                strip_runtime(super::DEFAULT_RECIPE)
            );
            let e = super::parse(&text, "t").unwrap_err().to_string();
            assert!(e.contains("runtime.device"), "{bad}: {e}");
        }
        // where the probes extract their features
        let eval_on = |d: &str| {
            assert!(super::DEFAULT_RECIPE.contains("\n[eval]\n"));
            super::DEFAULT_RECIPE.replace("\n[eval]\n", &format!("\n[eval]\ndevice = \"{d}\"\n"))
        };
        assert_eq!(
            super::parse(super::DEFAULT_RECIPE, "t")
                .unwrap()
                .config
                .eval
                .device,
            "auto"
        );
        for ok in ["auto", "cpu", "cuda:1"] {
            let plan = super::parse(&eval_on(ok), "t").unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(plan.config.eval.device, ok);
        }
        let e = super::parse(&eval_on("gpu"), "t").unwrap_err().to_string();
        assert!(e.contains("eval.device"), "{e}");
        // a time-based checkpoint cadence
        assert!(super::DEFAULT_RECIPE.contains("\n[checkpoint]\n"));
        let every = |t: &str| {
            super::DEFAULT_RECIPE.replace(
                "\n[checkpoint]\n",
                &format!("\n[checkpoint]\nevery_seconds = {t}\n"),
            )
        };
        let plan = super::parse(&every("300.0"), "t").unwrap();
        assert_eq!(plan.config.checkpoint.every_seconds, Some(300.0));
        for bad in ["0.0", "-1.0"] {
            let e = super::parse(&every(bad), "t").unwrap_err().to_string();
            assert!(e.contains("checkpoint.every_seconds"), "{bad}: {e}");
        }
        // the disk: a budget for the kept checkpoints and a reserve that must stay free
        let disk = |k: &str| {
            super::DEFAULT_RECIPE.replace("\n[checkpoint]\n", &format!("\n[checkpoint]\n{k}\n"))
        };
        let plan = super::parse(&disk("max_disk_gb = 40.0\nmin_free_gb = 2.0"), "t").unwrap();
        assert_eq!(plan.config.checkpoint.max_disk_gb, Some(40.0));
        assert_eq!(
            crate::daemon::retention(&plan).max_bytes,
            Some(40_000_000_000)
        );
        let plan = super::parse(super::DEFAULT_RECIPE, "t").unwrap();
        assert_eq!(plan.config.checkpoint.min_free_gb, 0.25);
        assert_eq!(crate::daemon::retention(&plan).max_bytes, None);
        for (bad, key) in [
            ("max_disk_gb = 0.0", "checkpoint.max_disk_gb"),
            ("max_disk_gb = -3.0", "checkpoint.max_disk_gb"),
            ("min_free_gb = -1.0", "checkpoint.min_free_gb"),
            ("min_free_gb = nan", "checkpoint.min_free_gb"),
        ] {
            let e = super::parse(&disk(bad), "t").unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    /// The device-loss keys are checked when the config is read, and the CPU fallback
    /// plan is the same recipe at the smaller batch with the LR rescaled for it.
    #[test]
    fn the_device_loss_policy_is_validated_and_the_cpu_plan_rescales() {
        let with = |rt: &str| {
            format!(
                "{}\n[runtime]\n{rt}\n",
                strip_runtime(super::DEFAULT_RECIPE)
            )
        };
        for (bad, key) in [
            ("gpu_probe_every_s = 0.0", "runtime.gpu_probe_every_s"),
            ("gpu_probe_every_s = -1.0", "runtime.gpu_probe_every_s"),
            ("gpu_wait_max_s = -5.0", "runtime.gpu_wait_max_s"),
            ("cpu_batch_size = 1", "runtime.cpu_batch_size"),
            ("cpu_batch_size = 100000", "runtime.cpu_batch_size"),
            ("on_gpu_loss = \"retry\"", "on_gpu_loss"),
            ("data_parallel = 0", "runtime.data_parallel"),
            ("data_parallel = 7", "runtime.data_parallel"),
            (
                "device = \"cuda:1\"\ndata_parallel = 2",
                "runtime.data_parallel",
            ),
            (
                "data_parallel = 2\ncollective_timeout_s = 0.0",
                "runtime.collective_timeout_s",
            ),
            (
                "data_parallel = 2\ncollective_timeout_s = 900.0",
                "runtime.collective_timeout_s",
            ),
        ] {
            let e = super::parse(&with(bad), "t").unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let plan = super::parse(
            &with("device = \"cuda:0\"\non_gpu_loss = \"cpu\"\ncpu_batch_size = 8\ngpu_wait_max_s = 600.0\ndata_parallel = 2"),
            "t",
        )
        .unwrap();
        assert_eq!(plan.config.runtime.on_gpu_loss, super::OnDeviceLoss::Cpu);
        let b = plan.config.train.batch_size;
        let fb = plan.cpu_fallback().unwrap();
        assert_eq!(fb.config.runtime.device, "cpu");
        assert_eq!(fb.config.runtime.data_parallel, 1);
        assert_eq!(fb.config.train.batch_size, 8);
        // sqrt scaling with respect to 1024 (the default recipe's rule)
        let (lr0, lr) = (plan.lr.at(u64::MAX), fb.lr.at(u64::MAX));
        let want = lr0 * (8.0 / b as f64).sqrt();
        assert!((lr - want).abs() < 1e-12 * want.max(1.0), "{lr} vs {want}");
        // everything else is the recipe's
        assert_eq!(fb.config.train.warmup_steps, plan.config.train.warmup_steps);
        assert_eq!(
            format!("{:?}", fb.config.model),
            format!("{:?}", plan.config.model)
        );
        // without cpu_batch_size: a quarter of the batch, at least 2
        let plan = super::parse(&with("on_gpu_loss = \"cpu\""), "t").unwrap();
        assert_eq!(
            plan.cpu_fallback().unwrap().config.train.batch_size,
            (b / 4).max(2)
        );
    }

    /// `[runtime.cluster]` is checked when the config is read: the group's size against
    /// the batch, the combinations not built (threads per process, distillation, falling back to the
    /// CPU on a GPU's loss),
    /// the waits against the hang watchdog, and the token file.
    #[test]
    fn the_cluster_section_is_validated() {
        // (removed when the test ends, passed or not)
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let good = dir.join("token");
        std::fs::write(&good, "sixteen-chars-or-more\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "tiny\n").unwrap();
        let with = |rt: &str, cl: &str, tok: &std::path::Path| {
            format!(
                "{}\n[runtime]\n{rt}\n[runtime.cluster]\nlisten = \"127.0.0.1:7700\"\ntoken_file = \"{}\"\n{cl}\n",
                strip_runtime(super::DEFAULT_RECIPE),
                tok.display()
            )
        };
        let plan = super::parse(&with("", "nodes = 4", &good), "t").unwrap();
        let c = plan.config.runtime.cluster.as_ref().unwrap();
        assert_eq!((c.nodes, c.join_wait_s), (4, 120.0));
        assert_eq!(c.reduce, crate::cluster::Reduce::Mesh);
        // an elastic group: 8 nodes, trained on with 4 to 8 (32 splits into 4 and 8 only)
        let plan = super::parse(&with("", "nodes = 8\nmin_nodes = 8", &good), "t").unwrap();
        assert_eq!(plan.config.runtime.cluster.as_ref().unwrap().fewest(), 8);
        let plan = super::parse(&with("", "nodes = 4", &good), "t").unwrap();
        assert_eq!(plan.config.runtime.cluster.as_ref().unwrap().fewest(), 4);
        let e = super::parse(&with("", "nodes = 8\nmin_nodes = 4", &good), "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not split into 5, 6, 7: such a batch is a multiple of 840"),
            "{e}"
        );
        // one GPU per process: the sums cross the hosts' links (wait or exit on a loss)
        for loss in ["", "on_gpu_loss = \"wait\"", "on_gpu_loss = \"exit\""] {
            let rt = format!("device = \"cuda\"\n{loss}");
            let plan = super::parse(&with(&rt, "nodes = 2", &good), "t").unwrap();
            assert_eq!(plan.config.runtime.device, "cuda");
        }
        let plan = super::parse(&with("", "nodes = 4\nreduce = \"star\"", &good), "t").unwrap();
        let c = plan.config.runtime.cluster.as_ref().unwrap();
        assert_eq!(c.reduce, crate::cluster::Reduce::Star);
        for (rt, cl, tok, key) in [
            (
                "",
                "nodes = 2\nreduce = \"ring\"",
                &good,
                "expected `mesh` or `star`",
            ),
            ("", "nodes = 1", &good, "runtime.cluster.nodes"),
            (
                "",
                "nodes = 4\nmin_nodes = 1",
                &good,
                "runtime.cluster.min_nodes",
            ),
            (
                "",
                "nodes = 4\nmin_nodes = 5",
                &good,
                "runtime.cluster.min_nodes",
            ),
            // the default batch of 32 does not split into 3
            (
                "",
                "nodes = 4\nmin_nodes = 2",
                &good,
                "runtime.cluster.min_nodes",
            ),
            ("", "nodes = 5", &good, "runtime.cluster.nodes"),
            ("", "nodes = 32", &good, "runtime.cluster.nodes"),
            (
                "data_parallel = 2",
                "nodes = 2",
                &good,
                "cannot be combined with runtime.data_parallel",
            ),
            (
                "device = \"cuda\"\non_gpu_loss = \"cpu\"",
                "nodes = 2",
                &good,
                "runtime.on_gpu_loss",
            ),
            (
                "",
                "nodes = 2\njoin_wait_s = 0.0",
                &good,
                "runtime.cluster.join_wait_s",
            ),
            (
                "",
                "nodes = 2\njoin_wait_s = 900.0",
                &good,
                "runtime.cluster.join_wait_s",
            ),
            (
                "collective_timeout_s = 700.0",
                "nodes = 2",
                &good,
                "runtime.collective_timeout_s",
            ),
            ("", "nodes = 2", &short, "at least 16"),
            (
                "",
                "nodes = 2",
                &dir.join("absent"),
                "cannot read the cluster token file",
            ),
            ("", "nodes = 2\nport = 3", &good, "port"),
        ] {
            let e = match super::parse(&with(rt, cl, tok), "t") {
                Ok(_) => panic!("{rt} / {cl} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(key), "{rt} / {cl}: {e}");
        }
        let e = super::parse(
            &format!(
                "{}\n[distill]\nteacher = \"self\"\n[[distill.students]]\nname = \"s\"\npreset = \"vit_pico\"\nbackbone = {{ embed_dim = 32, depth = 2, num_heads = 2, patch_size = 8 }}\ndino_head = {{ hidden_dim = 32, bottleneck_dim = 16, n_prototypes = 64 }}\nibot_head = {{ hidden_dim = 32, bottleneck_dim = 16, n_prototypes = 64 }}\n",
                with("", "nodes = 2", &good)
            ),
            "t",
        );
        let e = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("distillation over a group"), "{e}");
    }

    /// The default recipe without its `[runtime]` table (so a test can append one).
    fn strip_runtime(text: &str) -> String {
        let mut out = vec![];
        let mut skip = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skip = line.trim() == "[runtime]" || line.starts_with("[runtime.");
            }
            if !skip {
                out.push(line);
            }
        }
        out.join("\n")
    }
}
