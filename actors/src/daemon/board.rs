//! The status board: what every actor is doing right now (phase, since when, restarts,
//! queue depth, last heartbeat) and the run's headline numbers. Actors write to it; the
//! control socket, the watchdog, metrics and the catalog snapshots read it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What an actor is busy with; each has its own hang timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ActorPhase {
    /// Waiting for work.
    Idle,
    /// Producing a batch.
    Load,
    /// Teacher or student compute of a step.
    Step,
    /// Running probes.
    Eval,
    /// Writing a checkpoint.
    Checkpoint,
}

/// One actor's line in `dinod actors`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActorStatus {
    /// Registered name.
    pub name: String,
    /// Kind (data_loader, teacher, trainer, ema, evaluator, checkpointer, control, coordinator).
    pub kind: String,
    /// running, failed, restarting, stopped.
    pub state: String,
    /// Current phase.
    pub phase: ActorPhase,
    /// Since when (ms since epoch).
    pub phase_since_ms: u64,
    /// Last sign of life.
    pub last_heartbeat_ms: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Messages sent to it and not yet handled.
    pub mailbox: i64,
    /// Messages handled.
    pub handled: u64,
    /// Last failure, if any.
    pub last_error: Option<String>,
}

/// Headline numbers of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunStatus {
    /// pid of the daemon.
    pub pid: u32,
    /// Current stage.
    pub stage: String,
    /// Committed steps.
    pub step: u64,
    /// Target step (none = forever).
    pub max_steps: Option<u64>,
    /// Paused by the operator.
    pub paused: bool,
    /// Last losses.
    pub losses: Option<model::ssl::LossTerms>,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Images per second (moving average).
    pub images_per_s: f64,
    /// Step time (moving average), ms.
    pub step_ms: f64,
    /// Last durable checkpoint step.
    pub last_checkpoint: Option<u64>,
    /// Blocking part of the last save, ms.
    pub last_checkpoint_blocking_ms: f64,
    /// Durable latency of the last save, ms.
    pub last_checkpoint_durable_ms: f64,
    /// Last probe results.
    pub probes: serde_json::Value,
    /// Bad inputs skipped by the data loader.
    pub bad_inputs: u64,
    /// Steps discarded (NaN, Inf, spike).
    pub bad_steps: u64,
    /// Rollbacks to a checkpoint.
    pub rollbacks: u64,
    /// Time of the last committed step.
    pub last_step_ms: u64,
    /// Data cursor.
    pub data_cursor: serde_json::Value,
    /// Fingerprint of the state at the last checkpoint (for resume checks).
    pub fingerprint: Option<String>,
    /// Where the step runs: the device, `waiting for DEVICE`, or `cpu (fallback from
    /// DEVICE)`.
    #[serde(default)]
    pub device: String,
    /// The batch size in force (smaller after a fall-back to the CPU).
    #[serde(default)]
    pub batch_size: usize,
    /// Per-student lines of a distillation run.
    #[serde(default)]
    pub students: std::collections::BTreeMap<String, serde_json::Value>,
    /// The weights a run initialised from `[model] init` started from (spec and source),
    /// kept in its checkpoints.
    #[serde(default)]
    pub init: Option<serde_json::Value>,
    /// Saves that failed since the last one that succeeded (none: the last save succeeded).
    #[serde(default)]
    pub failed_saves: Option<FailedSaves>,
    /// Why the run is stopping, from the moment the coordinator stops stepping until the
    /// process ends (the final checkpoint of a large model takes seconds to write); none
    /// while it trains.
    #[serde(default)]
    pub stopping: Option<String>,
    /// The group of processes (`[runtime.cluster]`): who has joined, or whom the daemon
    /// is waiting for.
    #[serde(default)]
    pub cluster: Option<crate::cluster::GroupStatus>,
}

/// Checkpoint saves that failed in a row: training goes on, but what it trains since the
/// last checkpoint is at risk until a save succeeds (`dinod status` shows it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedSaves {
    /// How many in a row.
    pub count: u64,
    /// The step of the first of them.
    pub since_step: u64,
    /// The step of the latest.
    pub last_step: u64,
    /// The latest error.
    pub last_error: String,
}

impl FailedSaves {
    /// Adds a failed save of `step` to the streak in `slot` (starting one if none).
    pub fn note(slot: &mut Option<FailedSaves>, step: u64, error: &str) {
        let f = slot.get_or_insert(FailedSaves {
            count: 0,
            since_step: step,
            last_step: step,
            last_error: String::new(),
        });
        f.count += 1;
        f.last_step = step;
        f.last_error = error.to_string();
    }
}

/// The shared board.
#[derive(Default)]
pub struct Board {
    actors: Mutex<BTreeMap<String, ActorStatus>>,
    run: Mutex<RunStatus>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Board {
    /// Registers (or re-registers after a restart) an actor as running and idle.
    pub fn register(&self, name: &str, kind: &str) {
        let now = now_ms();
        let mut a = lock(&self.actors);
        let e = a.entry(name.to_string()).or_insert_with(|| ActorStatus {
            name: name.to_string(),
            kind: kind.to_string(),
            state: "running".into(),
            phase: ActorPhase::Idle,
            phase_since_ms: now,
            last_heartbeat_ms: now,
            restarts: 0,
            mailbox: 0,
            handled: 0,
            last_error: None,
        });
        e.state = "running".into();
        e.phase = ActorPhase::Idle;
        e.phase_since_ms = now;
        e.last_heartbeat_ms = now;
        e.mailbox = 0;
    }

    /// Enters a phase (also a heartbeat).
    pub fn phase(&self, name: &str, phase: ActorPhase) {
        let now = now_ms();
        if let Some(e) = lock(&self.actors).get_mut(name) {
            if e.phase != phase {
                e.phase = phase;
                e.phase_since_ms = now;
            }
            e.last_heartbeat_ms = now;
        }
    }

    /// A message was queued for `name`.
    pub fn queued(&self, name: &str) {
        if let Some(e) = lock(&self.actors).get_mut(name) {
            e.mailbox += 1;
        }
    }

    /// A message was handled by `name`.
    pub fn handled(&self, name: &str) {
        if let Some(e) = lock(&self.actors).get_mut(name) {
            e.mailbox = (e.mailbox - 1).max(0);
            e.handled += 1;
            e.last_heartbeat_ms = now_ms();
        }
    }

    /// Marks a failure and counts the coming restart.
    pub fn failed(&self, name: &str, err: &str) {
        if let Some(e) = lock(&self.actors).get_mut(name) {
            e.state = "restarting".into();
            e.last_error = Some(err.to_string());
            e.restarts += 1;
        }
    }

    /// Marks an actor stopped.
    pub fn stopped(&self, name: &str) {
        if let Some(e) = lock(&self.actors).get_mut(name) {
            e.state = "stopped".into();
            e.phase = ActorPhase::Idle;
        }
    }

    /// A copy of every actor line.
    pub fn actors(&self) -> Vec<ActorStatus> {
        lock(&self.actors).values().cloned().collect()
    }

    /// One actor's line.
    pub fn actor(&self, name: &str) -> Option<ActorStatus> {
        lock(&self.actors).get(name).cloned()
    }

    /// Updates the run status.
    pub fn run<R>(&self, f: impl FnOnce(&mut RunStatus) -> R) -> R {
        f(&mut lock(&self.run))
    }

    /// A copy of the run status.
    pub fn run_status(&self) -> RunStatus {
        lock(&self.run).clone()
    }
}
