//! `dinod bench chaos`: how much training survives failures, measured on the real daemon.
//!
//! The daemon runs as a child process twice for the same wall time: once fault-free, then
//! under chaos: a SIGKILL every `kill_every` seconds (the process is started again at
//! once, as an outside supervisor would) and `faults_per_kill` in-process faults armed
//! between two kills (actor panics, a device error, a NaN step; `--inject`). The figure is
//! the step efficiency: steps trained under chaos over steps trained without, in the same
//! time, the form in which torchft publishes its (82.3 % at one failure per 60 s). Each
//! kill also reports the steps it lost (back to the last checkpoint) and the time from the
//! kill to the first new step (process start, catalog, checkpoint load, first batch).
//! At the end the state directory's checkpoints must verify.
//!
//! It only drives processes and reads their status; it knows nothing of the training.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::client;

/// What `dinod bench chaos` is asked to do.
#[derive(Clone, Debug)]
pub struct ChaosOpts {
    /// The recipe (default: the built-in one).
    pub config: Option<PathBuf>,
    /// `--data` for the runs.
    pub data: Option<String>,
    /// `--checkpoint-every` for the runs.
    pub checkpoint_every: Option<u64>,
    /// Wall time of each run, counted from its first step.
    pub seconds: f64,
    /// Seconds between two SIGKILLs (0: none).
    pub kill_every: f64,
    /// In-process faults armed between two kills (spread evenly in steps).
    pub faults_per_kill: usize,
    /// Picks the in-process faults.
    pub seed: u64,
    /// Where the two runs keep their state and logs (created; must not hold a run).
    pub workdir: PathBuf,
}

/// One SIGKILL and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct Kill {
    /// Seconds after the chaos run's first step.
    pub at_s: f64,
    /// The step the daemon had reached.
    pub step_before: u64,
    /// The checkpoint it resumed from.
    pub resumed_at: u64,
    /// Steps trained again.
    pub lost_steps: u64,
    /// From the kill to the first new step.
    pub recovery_s: f64,
}

/// The result.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosBench {
    /// The recipe (`built-in` when none was given).
    pub config: String,
    /// Wall time of each run.
    pub seconds: f64,
    /// Seconds between SIGKILLs.
    pub kill_every_s: f64,
    /// In-process faults between two kills.
    pub faults_per_kill: usize,
    /// Steps of the fault-free run in `seconds`.
    pub baseline_steps: u64,
    /// Its rate.
    pub baseline_steps_per_s: f64,
    /// Steps of the chaos run in `seconds` (where it stood at the end, lost steps retrained).
    pub chaos_steps: u64,
    /// `chaos_steps / baseline_steps`.
    pub step_efficiency: f64,
    /// Failures in the chaos run: SIGKILLs plus in-process faults that fired.
    pub failures: usize,
    /// Seconds of chaos per failure.
    pub seconds_per_failure: f64,
    /// Every SIGKILL.
    pub kills: Vec<Kill>,
    /// The in-process faults armed (`KIND:ACTOR@STEP`).
    pub armed: Vec<String>,
    /// Those that fired, by the events they left (`actor.restarting` naming an injected
    /// fault, `step.discarded`).
    pub fired: usize,
    /// Median of the kills' recovery times.
    pub recovery_s_median: Option<f64>,
    /// Mean steps lost per kill.
    pub lost_steps_mean: Option<f64>,
    /// `dinod checkpoints verify` on the chaos run's state at the end.
    pub checkpoints_verified: bool,
}

/// The in-process faults the chaos run draws from (each restarts an actor or discards a
/// step; none of them is fatal).
const FAULTS: &[&str] = &[
    "panic:data_loader",
    "panic:teacher",
    "panic:trainer",
    "panic:ema",
    "device_error:trainer",
    "nan:trainer",
];

struct Daemon {
    child: Child,
    state: PathBuf,
}

impl Daemon {
    fn start(
        exe: &Path,
        opts: &ChaosOpts,
        state: &Path,
        faults: &[String],
        log: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.arg("run").arg("--state-dir").arg(state);
        if let Some(c) = &opts.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(d) = &opts.data {
            cmd.arg("--data").arg(d);
        }
        if let Some(n) = opts.checkpoint_every {
            cmd.arg("--checkpoint-every").arg(n.to_string());
        }
        for f in faults {
            cmd.arg("--inject").arg(f);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = cmd
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        Ok(Self {
            child,
            state: state.to_path_buf(),
        })
    }

    /// The live step, `None` while the daemon does not answer.
    fn step(&mut self) -> Result<Option<u64>> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "the daemon exited ({st}) during the benchmark; see the log in {}",
                self.state.parent().unwrap_or(&self.state).display()
            );
        }
        Ok(client::request(&self.state, &json!({"cmd": "status"}))
            .ok()
            .flatten()
            .and_then(|v| v["run"]["step"].as_u64()))
    }

    /// Polls until the step exceeds `after` (within `limit`).
    fn wait_past(&mut self, after: u64, limit: Duration) -> Result<(u64, Instant)> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.step()? {
                if s > after {
                    return Ok((s, Instant::now()));
                }
            }
            if t0.elapsed() > limit {
                bail!("the daemon made no step in {:.0} s", limit.as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Asks the daemon to stop (it checkpoints) and waits for it.
    fn stop(mut self) -> Result<()> {
        let _ = client::request(&self.state, &json!({"cmd": "stop"}));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(300) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill()
    }
}

impl Drop for Daemon {
    /// A benchmark that fails half-way must not leave a daemon training behind it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The latest committed step of a stopped run's state directory.
fn checkpoint_step(state: &Path) -> Result<u64> {
    let store = client::open_offline(state)?;
    Ok(store.latest_step()?.unwrap_or(0))
}

/// A small deterministic generator for the fault draw.
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Runs the benchmark (see the module doc).
pub fn bench_chaos(opts: &ChaosOpts) -> Result<ChaosBench> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(opts.seconds) || !(opts.kill_every == 0.0 || positive(opts.kill_every)) {
        bail!("--seconds must be positive and --kill-every at least 0");
    }
    if opts.kill_every == 0.0 && opts.faults_per_kill > 0 {
        bail!("in-process faults are spread between kills: give --kill-every");
    }
    let exe = std::env::current_exe().context("cannot find the dinod binary")?;
    std::fs::create_dir_all(&opts.workdir)?;
    let (base_dir, chaos_dir) = (opts.workdir.join("baseline"), opts.workdir.join("chaos"));
    for d in [&base_dir, &chaos_dir] {
        if d.exists() {
            bail!(
                "{} exists: give an empty --workdir (the runs must start fresh)",
                d.display()
            );
        }
    }
    let window = Duration::from_secs_f64(opts.seconds);
    let first_step = Duration::from_secs(600);

    // fault-free
    let mut d = Daemon::start(
        &exe,
        opts,
        &base_dir,
        &[],
        &opts.workdir.join("baseline.log"),
    )?;
    let (s0, t0) = d.wait_past(0, first_step)?;
    std::thread::sleep(window.saturating_sub(t0.elapsed()));
    let s1 = d
        .step()?
        .ok_or_else(|| anyhow!("the fault-free daemon stopped answering"))?;
    d.stop()?;
    let baseline = s1.saturating_sub(s0);
    if baseline == 0 {
        bail!("the fault-free run made no step in {} s", opts.seconds);
    }
    let rate = baseline as f64 / opts.seconds;

    // chaos
    let log = opts.workdir.join("chaos.log");
    let mut seed = opts.seed;
    let mut armed: Vec<String> = vec![];
    let mut arm = |from: u64, seed: &mut u64| -> Vec<String> {
        // spread evenly between this start and the next kill, in steps
        let span = rate * opts.kill_every;
        (1..=opts.faults_per_kill)
            .map(|k| {
                let at = from + 1 + (span * k as f64 / (opts.faults_per_kill + 1) as f64) as u64;
                let f = format!("{}@{at}", FAULTS[next(seed) as usize % FAULTS.len()]);
                armed.push(f.clone());
                f
            })
            .collect()
    };
    let faults = arm(0, &mut seed);
    let mut d = Daemon::start(&exe, opts, &chaos_dir, &faults, &log)?;
    let (c0, t0) = d.wait_past(0, first_step)?;
    let mut last = c0;
    let mut kills = vec![];
    let mut started = t0;
    loop {
        let end = t0 + window;
        let next_kill = (opts.kill_every > 0.0)
            .then(|| started + Duration::from_secs_f64(opts.kill_every))
            .filter(|k| *k < end);
        let until = next_kill.unwrap_or(end);
        while Instant::now() < until {
            if let Some(s) = d.step()? {
                last = s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let Some(_) = next_kill else { break };
        if let Some(s) = d.step()? {
            last = s;
        }
        let before = last;
        let at = Instant::now();
        d.kill()?;
        let resumed_at = checkpoint_step(&chaos_dir)?;
        let faults = arm(resumed_at, &mut seed);
        d = Daemon::start(&exe, opts, &chaos_dir, &faults, &log)?;
        let (s, t) = d.wait_past(resumed_at, first_step)?;
        last = s;
        started = t;
        kills.push(Kill {
            at_s: (at - t0).as_secs_f64(),
            step_before: before,
            resumed_at,
            lost_steps: before.saturating_sub(resumed_at),
            recovery_s: (t - at).as_secs_f64(),
        });
    }
    let c1 = d.step()?.unwrap_or(last);
    d.stop()?;
    // what fired, from the run's own event log
    let store = client::open_offline(&chaos_dir)?;
    let events = store.events_since(0, 1_000_000)?;
    drop(store);
    let fired = events
        .iter()
        .filter(|e| {
            (e.event.kind == "actor.restarting" && e.event.message.contains("injected"))
                || e.event.kind == "step.discarded"
        })
        .count();
    let verify = Command::new(&exe)
        .args(["checkpoints", "verify", "--state-dir"])
        .arg(&chaos_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let chaos = c1.saturating_sub(c0);
    let mut rec: Vec<f64> = kills.iter().map(|k| k.recovery_s).collect();
    rec.sort_by(f64::total_cmp);
    let failures = kills.len() + fired;
    Ok(ChaosBench {
        config: opts
            .config
            .as_ref()
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| "built-in".into()),
        seconds: opts.seconds,
        kill_every_s: opts.kill_every,
        faults_per_kill: opts.faults_per_kill,
        baseline_steps: baseline,
        baseline_steps_per_s: rate,
        chaos_steps: chaos,
        step_efficiency: chaos as f64 / baseline as f64,
        failures,
        seconds_per_failure: opts.seconds / failures.max(1) as f64,
        recovery_s_median: (!rec.is_empty()).then(|| rec[rec.len() / 2]),
        lost_steps_mean: (!kills.is_empty())
            .then(|| kills.iter().map(|k| k.lost_steps as f64).sum::<f64>() / kills.len() as f64),
        kills,
        armed,
        fired,
        checkpoints_verified: verify.success(),
    })
}
