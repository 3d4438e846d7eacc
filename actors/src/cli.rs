//! The `dinod` command line: parses arguments and dispatches to the daemon, its client
//! commands, and the offline tools (parity, bench, data scan, export).
//!
//! Exit codes: 0 success; 1 the command ran and found a problem (parity out of tolerance,
//! bad input files, a failed check); 2 usage or configuration error; 70, 75, 76 the
//! daemon must be restarted by its supervisor (it gave up, the GPU context is unusable, a
//! compute thread hung); 74 it stopped without writing its final checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config;

/// Exit status when a check ran and failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit status for usage and config errors.
pub const EXIT_USAGE: i32 = 2;

/// A command line the command cannot act on (a bad `--inject`, `--data` or count): exit
/// status [`EXIT_USAGE`], as for a bad config.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// dinod: a DINOv3 training daemon that never stops.
#[derive(Parser, Debug)]
#[command(name = "dinod", version, about, long_about = None)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the daemon keeps its state.
#[derive(clap::Args, Debug, Clone)]
pub struct StateDir {
    /// State directory (checkpoints, catalog, control socket).
    #[arg(long, default_value = "dinod-state", env = "DINOD_STATE_DIR")]
    pub state_dir: PathBuf,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train in the foreground (resumes the run in the state directory, if any).
    Run {
        /// Recipe (TOML); the built-in CPU recipe when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        dir: StateDir,
        /// Stop after this many committed steps.
        #[arg(long)]
        max_steps: Option<u64>,
        /// Data source, overriding the config: folder:PATH, idx:PATH[:train|test], synthetic[:SEED[:SIZE]], copypaste:PATH[:train|test].
        #[arg(long)]
        data: Option<String>,
        /// Inject a fault, KIND[:ACTOR]@STEP[xTIMES][+MS] (repeatable): panic, nan, slow, io_error, device_error, device_lost, error (a distillation teacher's targets of batch STEP fail with an error that is not a device fault); `slow:startup@0+MS` holds the start (the end of the data source's open) MS ms.
        #[arg(long = "inject")]
        inject: Vec<String>,
        /// Checkpoint every N steps, overriding the config.
        #[arg(long)]
        checkpoint_every: Option<u64>,
    },
    /// One member of a daemon's group of processes (`[runtime.cluster]`): joins the daemon
    /// at HOST:PORT with the same recipe and computes its part of every step until the
    /// daemon's run ends. Its copy of the state comes from the daemon and lives in memory
    /// only: killed, it is started again, joins again and is sent the state again.
    Worker {
        /// The daemon's recipe (the same file: its hash is checked at the join).
        #[arg(long)]
        config: PathBuf,
        /// The daemon's `runtime.cluster.listen` address, as reachable from here.
        #[arg(long, value_name = "HOST:PORT")]
        join: String,
        /// A drill of the copies' check: `drift@STEP` moves one weight of this worker's
        /// copy of the state after the commit of STEP (repeatable).
        #[arg(long = "inject")]
        inject: Vec<String>,
        /// In a mesh (`runtime.cluster.reduce = "mesh"`), where the other workers connect
        /// to this one: `IP` or `IP:PORT` (a fixed port for a firewall rule; `0.0.0.0:PORT`
        /// listens everywhere and announces the address this worker reached the daemon
        /// from). Default: an ephemeral port of that address.
        #[arg(long, value_name = "IP[:PORT]", value_parser = crate::cluster::mesh_listen_addr)]
        mesh_listen: Option<std::net::SocketAddr>,
        /// In a mesh, the address the other workers connect to where it is not the one
        /// listened on: a container's published port, a NAT's forwarded one (`HOST:PORT`;
        /// a name is resolved by the workers that connect).
        #[arg(long, value_name = "HOST:PORT", value_parser = crate::cluster::mesh_advertise_addr)]
        mesh_advertise: Option<String>,
        /// The GPU this worker computes on when the recipe's `runtime.device` is `cuda`:
        /// `cuda:N` (several workers on one machine, one GPU each). Default: the recipe's.
        #[arg(long, value_name = "cuda:N")]
        device: Option<String>,
    },
    /// Stage, step, losses, throughput, last checkpoint, probes.
    Status {
        #[command(flatten)]
        dir: StateDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The actor tree: state, phase and since when, restarts, mailbox, last heartbeat.
    Actors {
        #[command(flatten)]
        dir: StateDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent events.
    Events {
        #[command(flatten)]
        dir: StateDir,
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// Events after this sequence number.
        #[arg(long)]
        since: Option<u64>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List or verify checkpoints.
    Checkpoints {
        /// `list` or `verify`.
        #[arg(value_parser = ["list", "verify"], default_value = "list")]
        action: String,
        #[command(flatten)]
        dir: StateDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause stepping (the daemon keeps serving requests).
    Pause {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Resume stepping.
    Resume {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Drain the current step, write a checkpoint, exit.
    Stop {
        #[command(flatten)]
        dir: StateDir,
        /// Wait until the daemon has exited, then print how it stopped and exit with its
        /// status (0, or 74 when its final checkpoint could not be written).
        #[arg(long)]
        wait: bool,
    },
    /// Every evaluation of the run: probe metrics, stage, mean losses, transitions.
    History {
        #[command(flatten)]
        dir: StateDir,
        /// Print the raw history (losses, probes, transitions) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the stage and its history, or force one (`dinod stage set STAGE`).
    Stage {
        /// `set` to force a stage.
        action: Option<String>,
        /// The stage for `set`: pretrain, gram_anchor, high_res_adapt, distill, continue.
        stage: Option<String>,
        #[command(flatten)]
        dir: StateDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write weights with the official state_dict names (loadable by the official model).
    Export {
        #[command(flatten)]
        dir: StateDir,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// `teacher` (the EMA teacher, default) or `student`.
        #[arg(long, default_value = "teacher")]
        which: String,
        /// Checkpoint step (default: the latest valid one).
        #[arg(long)]
        step: Option<u64>,
        /// Also write the DINO and iBOT heads (prefixed `dino_head.`, `ibot_head.`).
        #[arg(long)]
        with_heads: bool,
        /// Element type of the file: f32, f64, bf16 or f16 (rounded to nearest even);
        /// default: the checkpoint's.
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Run the probes on a checkpoint's EMA teacher.
    Probe {
        #[command(flatten)]
        dir: StateDir,
        /// Checkpoint step (default: the latest valid one).
        #[arg(long)]
        checkpoint: Option<u64>,
        /// Take the probe sets from this recipe instead of the run's own config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to extract the features: cpu, cuda or cuda:N (a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pictures of the features and the run.
    Viz {
        /// What to draw.
        #[command(subcommand)]
        what: VizCommand,
    },
    /// Check a data source before training.
    Data {
        /// What to do.
        #[command(subcommand)]
        what: DataCommand,
    },
    /// Check our implementation against golden fixtures from the official code.
    Parity {
        /// Fixture files (safetensors with a `config` metadata entry).
        #[arg(required = true)]
        fixtures: Vec<PathBuf>,
        /// Element type(s) to run: f64, f32, both (f64 and f32) or bf16 (bf16 compute,
        /// f32 losses; the device code path; tolerance 2e-2, or 2.5x PyTorch's own bf16
        /// error on the tensor where that is larger).
        #[arg(long, default_value = "both")]
        dtype: String,
        /// Where to run: cpu, cuda or cuda:N (needs a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print every tensor, not only the summary and failures.
        #[arg(long, short)]
        verbose: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    Bench {
        /// What to benchmark.
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// `dinod viz ...`
#[derive(Subcommand, Debug)]
pub enum VizCommand {
    /// First three principal components of the patch features as RGB, at several input
    /// resolutions side by side (one PCA basis for all, so colours are comparable).
    Pca {
        #[command(flatten)]
        dir: StateDir,
        /// Checkpoint step (default: the latest valid one).
        #[arg(long)]
        step: Option<u64>,
        /// Input image.
        #[arg(long)]
        image: PathBuf,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Input resolutions (multiples of the patch size; default 4x, 8x and 12x the patch).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u32>,
    },
    /// Cosine similarity of one patch to all others, over the image.
    Similarity {
        #[command(flatten)]
        dir: StateDir,
        /// Checkpoint step (default: the latest valid one).
        #[arg(long)]
        step: Option<u64>,
        /// Input image.
        #[arg(long)]
        image: PathBuf,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Pixel `X,Y` in the resized image of side `--size`.
        #[arg(long)]
        point: String,
        /// Resolution the image is resized to (a multiple of the patch size).
        #[arg(long)]
        size: Option<u32>,
    },
    /// Losses and probe metrics over steps, stage transitions marked.
    Curves {
        #[command(flatten)]
        dir: StateDir,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// The run's name in the legend when runs are compared (default: the directory's name).
        #[arg(long)]
        label: Option<String>,
        /// Draw another run in the same panels, e.g. a branch's control (repeatable).
        #[arg(long, value_name = "[LABEL=]STATE_DIR")]
        compare: Vec<String>,
    },
}

/// `dinod data ...`
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Print what a source holds (images, classes, sizes) and every bad file; exit 1 if any.
    Scan {
        /// The source: folder:PATH, tar:PATH, idx:PATH[:split], synthetic,
        /// copypaste:PATH[:split].
        spec: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Read only N samples, spread evenly over the source (a quick check of a large
        /// one that still reaches every shard and class).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Decoding threads (default: one per core).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Build the real copy-paste segmentation set from extracted Debian packages.
    BuildCopypaste {
        /// Folder with the extracted stamps and wallpapers (scripts/fetch-real-data.sh).
        #[arg(long)]
        from: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// `dinod bench ...`
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Step efficiency under failures: the daemon for SECONDS fault-free, then as long
    /// under a SIGKILL every KILL_EVERY seconds (restarted at once) and in-process faults
    /// between kills; steps trained under chaos over steps trained without.
    Chaos {
        /// The recipe (default: the built-in one).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data source for the runs, overriding the recipe's.
        #[arg(long)]
        data: Option<String>,
        /// Checkpoint every N steps (what a kill loses is at most that).
        #[arg(long)]
        checkpoint_every: Option<u64>,
        /// Wall time of each run, from its first step.
        #[arg(long, default_value_t = 300.0)]
        seconds: f64,
        /// Seconds between SIGKILLs (0: none).
        #[arg(long, default_value_t = 60.0)]
        kill_every: f64,
        /// In-process faults (actor panics, a device error, a NaN step) between two kills.
        #[arg(long, default_value_t = 1)]
        faults_per_kill: usize,
        /// Picks the faults.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where the two runs keep their state and logs (must not hold them yet).
        #[arg(long)]
        workdir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The all-reduce of a group of processes alone (as nccl-tests' all_reduce_perf):
    /// every member sums a vector of f32 gradients-to-be over TCP; rank 0 checks the sums
    /// and reports the time per sum, the bandwidths and its own traffic. Run it on each
    /// node (`--listen` on one, `--join` on the others) to see what the network costs a
    /// step before training.
    Allreduce {
        /// This process is rank 0 and listens on HOST:PORT (port 0 picks one and prints
        /// it) for `--nodes` - 1 workers.
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "join", requires_all = ["nodes"])]
        listen: Option<String>,
        /// Processes in the group (with `--listen`), this one included.
        #[arg(long, requires = "listen")]
        nodes: Option<usize>,
        /// Join the group whose rank 0 listens at HOST:PORT.
        #[arg(long, value_name = "HOST:PORT", required_unless_present = "listen")]
        join: Option<String>,
        /// The group's shared secret (at least 16 characters).
        #[arg(long)]
        token_file: PathBuf,
        /// How the group sums (with `--listen`): `mesh` or `star`.
        #[arg(long, requires = "listen", default_value = "mesh", value_parser = ["mesh", "star"])]
        reduce: String,
        /// f32 values per sum (default: the default recipe's student, 2 496 032
        /// parameters; with `--listen`: the workers sum what rank 0 asks).
        #[arg(long, default_value_t = 2_496_032, requires = "listen")]
        values: usize,
        /// Untimed sums first (with `--listen`).
        #[arg(long, default_value_t = 2, requires = "listen")]
        warmup: usize,
        /// Timed sums, whose median is reported (with `--listen`).
        #[arg(long, default_value_t = 10, requires = "listen")]
        iters: usize,
        /// Seconds rank 0 waits for every node, and a worker for rank 0.
        #[arg(long, default_value_t = 120.0)]
        join_wait_s: f64,
        /// With `--join`, in a mesh: where the other workers connect to this one, as
        /// `dinod worker --mesh-listen`.
        #[arg(long, value_name = "IP[:PORT]", requires = "join", value_parser = crate::cluster::mesh_listen_addr)]
        mesh_listen: Option<std::net::SocketAddr>,
        /// With `--join`, in a mesh: the address the others connect to, as
        /// `dinod worker --mesh-advertise`.
        #[arg(long, value_name = "HOST:PORT", requires = "join", value_parser = crate::cluster::mesh_advertise_addr)]
        mesh_advertise: Option<String>,
        /// Where this member's vector lives: `cpu`, or a GPU (`cuda`, `cuda:N`), whose sums
        /// cross to the host and back as a GPU member's gradients do (timed with them).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Data parallelism: one step over a group of members (threads on the CPU, or one GPU
    /// each with NCCL), each on its part of the batch; checks the members stay identical.
    Dp {
        /// Recipe to time.
        #[arg(long)]
        config: PathBuf,
        /// Members of the group (`cuda`: GPUs cuda:0 .. cuda:N-1).
        #[arg(long, default_value_t = 2)]
        members: usize,
        /// `cpu` or `cuda`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Untimed iterations first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Override `train.batch_size` (the global batch).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Also run one member on the whole batch and report the largest weight difference.
        #[arg(long)]
        check: bool,
        /// A group of processes, one member each: this one is rank 0 and listens on
        /// HOST:PORT (port 0 picks one and prints it) for `--nodes` - 1 workers.
        #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["join", "members"], requires_all = ["nodes", "token_file"])]
        listen: Option<String>,
        /// Processes in the group (with `--listen`), this one included.
        #[arg(long, requires = "listen")]
        nodes: Option<usize>,
        /// How the group sums (with `--listen`): `mesh` (links between every pair of
        /// members; the workers accept connections from each other) or `star` (through
        /// this process).
        #[arg(long, requires = "listen", default_value = "mesh", value_parser = ["mesh", "star"])]
        reduce: String,
        /// Join the group whose coordinator listens at HOST:PORT, as one member.
        #[arg(
            long,
            value_name = "HOST:PORT",
            conflicts_with = "members",
            requires = "token_file"
        )]
        join: Option<String>,
        /// The group's shared secret (at least 16 characters), the same file content on
        /// every node; it is proved, never sent.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Seconds the coordinator waits for every node, and a worker for the coordinator.
        #[arg(long, default_value_t = 300.0)]
        join_wait_s: f64,
    },
    /// Cost of distilling 1..N students from one teacher pass versus separate runs.
    Distill {
        /// A distillation recipe (with `[distill]` students).
        #[arg(long)]
        config: PathBuf,
        /// Where to run: cpu, cuda or cuda:N (needs a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Override the recipe's `precision` (f32 or bf16; bf16 keeps f32 master weights).
        #[arg(long)]
        precision: Option<String>,
        /// Untimed iterations first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Also time the step over a data-parallel group of N members (`cuda`: GPUs
        /// cuda:0 .. cuda:N-1 with NCCL; `cpu`: threads) against one device.
        #[arg(long, default_value_t = 1)]
        members: usize,
        /// Override `train.batch_size` (the global batch).
        #[arg(long)]
        batch_size: Option<usize>,
    },
    /// What rounding a bf16 layer's output once (an f32 GEMM and bias add, as PyTorch's
    /// addmm) would cost against the bf16 GEMM plus a bf16 bias add, for the biased layers
    /// of a vit_base/16 step, with each one's error against f64.
    Linear {
        /// Where to run: cpu, cuda or cuda:N (needs a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Divide every layer's rows by this (the CPU needs about 64 to finish in seconds).
        #[arg(long, default_value_t = 1)]
        rows_div: usize,
        /// Untimed iterations first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// What one probe run of a recipe costs: builds its probe sets, runs every probe once
    /// on a random-init backbone of its model, and reports the time per probe and the
    /// memory the sets and the probes hold.
    Probes {
        /// The recipe (its `[[eval.sets]]`, `[eval.probes]` and model).
        #[arg(long)]
        config: PathBuf,
        /// Where to extract the features: cpu, cuda or cuda:N (the fits run on the host).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Multi-crop samples/s of the data pipeline.
    Data {
        /// The source.
        #[arg(long)]
        data: String,
        /// Worker threads to try (repeatable).
        #[arg(long = "workers", default_values_t = vec![1, 2])]
        workers: Vec<usize>,
        /// Samples per measurement.
        #[arg(long, default_value_t = 512)]
        samples: u64,
        /// Recipe whose crop settings to use (default: the official 2 x 224 + 8 x 96).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time the full training step (forward, backward, AdamW, EMA).
    Step {
        /// Recipe to time.
        #[arg(long)]
        config: PathBuf,
        /// Untimed iterations first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Where to run: cpu, cuda or cuda:N (needs a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Override the recipe's `precision` (f32 or bf16; bf16 keeps f32 master weights).
        #[arg(long)]
        precision: Option<String>,
        /// Override `train.batch_size`.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Loads and validates a config file (or the embedded default).
pub fn load_plan(path: Option<&PathBuf>) -> Result<config::Plan> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            Ok(config::parse(&text, &p.display().to_string())?)
        }
        None => Ok(config::parse(
            config::DEFAULT_RECIPE,
            "(built-in default recipe)",
        )?),
    }
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    crate::runtime::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    #[cfg(unix)]
    raise_open_file_limit();
    #[cfg(unix)]
    if !matches!(cli.command, Command::Run { .. } | Command::Worker { .. }) {
        // A one-shot command piped into `head` ends quietly when the reader goes away,
        // as Unix tools do, instead of panicking on the write. Not `run`: the daemon
        // writes to sockets whose clients may leave, and must survive that.
        // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dinod: error: {e:#}");
            if e.downcast_ref::<config::ConfigErrors>().is_some()
                || e.downcast_ref::<UsageError>().is_some()
            {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            }
        }
    }
}

/// Takes the hard limit on open files as the soft one (the soft limit is often 1024 of a
/// hard 524 288): a `tar:` source keeps a quarter of the soft limit of shard files open
/// (`data::open_shard_bound`), and a sample of a shard kept open costs no `open`, which on
/// a network file system is a round trip to the server.
#[cfg(unix)]
fn raise_open_file_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass and nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// `dinod worker --device`: another GPU of the recipe's kind. Every member of a group
/// computes on the same kind of device (their copies of the state move by the same
/// code), so a CPU recipe stays on the CPU and a GPU one on a GPU.
fn worker_device(recipe: &str, wanted: &str) -> Result<String> {
    let gpu = |d: &str| d != "cpu" && config::valid_device(d);
    if !gpu(wanted) {
        return Err(usage(format!(
            "--device: `cuda` or `cuda:N`, not `{wanted}`"
        )));
    }
    if !gpu(recipe) {
        return Err(usage(format!(
            "--device {wanted}: the recipe computes on `{recipe}`, and every member of a group computes on the daemon's kind of device"
        )));
    }
    Ok(wanted.to_string())
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run {
            config,
            dir,
            max_steps,
            data,
            inject,
            checkpoint_every,
        } => crate::commands::run(
            config.as_ref(),
            &dir.state_dir,
            max_steps,
            data.as_deref(),
            &inject,
            checkpoint_every,
        ),
        Command::Worker {
            config,
            join,
            inject,
            mesh_listen,
            mesh_advertise,
            device,
        } => {
            let mut plan = load_plan(Some(&config))?;
            if let Some(d) = device {
                // (the recipe's hash, checked at the join, stays the file's)
                plan.config.runtime.device = worker_device(&plan.config.runtime.device, &d)?;
            }
            let inject = inject
                .iter()
                .map(|f| {
                    f.parse()
                        .map_err(|e: String| usage(format!("--inject: {e}")))
                })
                .collect::<Result<Vec<crate::config::FaultSpec>>>()?;
            // its warnings (bad input, drift, a failed group) and step lines, as the
            // daemon logs its own
            crate::logging::init();
            let mesh = crate::cluster::MeshAddr {
                listen: mesh_listen,
                advertise: mesh_advertise,
            };
            crate::daemon::remote::run_worker(&plan, &join, &inject, &mesh)
        }
        Command::Status { dir, json } => crate::commands::status(&dir.state_dir, json),
        Command::Actors { dir, json } => crate::commands::actors(&dir.state_dir, json),
        Command::Events {
            dir,
            follow,
            since,
            limit,
            json,
        } => crate::commands::events(&dir.state_dir, follow, since, limit, json),
        Command::Checkpoints { action, dir, json } => {
            crate::commands::checkpoints(&dir.state_dir, &action, json)
        }
        Command::Pause { dir } => crate::commands::simple(&dir.state_dir, "pause"),
        Command::Resume { dir } => crate::commands::simple(&dir.state_dir, "resume"),
        Command::Stop { dir, wait } => {
            let code = crate::commands::simple(&dir.state_dir, "stop")?;
            if wait {
                crate::commands::wait_stopped(&dir.state_dir)
            } else {
                Ok(code)
            }
        }
        Command::History { dir, json } => crate::commands::history(&dir.state_dir, json),
        Command::Stage {
            action,
            stage,
            dir,
            json,
        } => crate::commands::stage(&dir.state_dir, action.as_deref(), stage.as_deref(), json),
        Command::Export {
            dir,
            out,
            which,
            step,
            with_heads,
            dtype,
        } => crate::commands::export(
            &dir.state_dir,
            &out,
            &which,
            step,
            with_heads,
            dtype.as_deref(),
        ),
        Command::Bench {
            what:
                BenchCommand::Chaos {
                    config,
                    data,
                    checkpoint_every,
                    seconds,
                    kill_every,
                    faults_per_kill,
                    seed,
                    workdir,
                    json,
                },
        } => {
            let r = crate::chaos::bench_chaos(&crate::chaos::ChaosOpts {
                config,
                data,
                checkpoint_every,
                seconds,
                kill_every,
                faults_per_kill,
                seed,
                workdir,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "fault-free: {} steps in {:.0} s ({:.2} steps/s)",
                    r.baseline_steps, r.seconds, r.baseline_steps_per_s
                );
                println!(
                    "chaos:      {} steps in {:.0} s under {} failures (one per {:.1} s: {} SIGKILLs, {} in-process faults fired of {} armed)",
                    r.chaos_steps,
                    r.seconds,
                    r.failures,
                    r.seconds_per_failure,
                    r.kills.len(),
                    r.fired,
                    r.armed.len()
                );
                println!("step efficiency {:.1}%", r.step_efficiency * 100.0);
                if let (Some(rec), Some(lost)) = (r.recovery_s_median, r.lost_steps_mean) {
                    println!(
                        "per SIGKILL: {lost:.1} steps lost on average, {rec:.1} s (median) from the kill to the first new step"
                    );
                }
                println!(
                    "checkpoints verify: {}",
                    if r.checkpoints_verified {
                        "ok"
                    } else {
                        "FAILED"
                    }
                );
            }
            Ok(if r.checkpoints_verified { 0 } else { 1 })
        }
        Command::Bench {
            what:
                BenchCommand::Dp {
                    config,
                    members,
                    device,
                    warmup,
                    iters,
                    batch_size,
                    check,
                    listen,
                    nodes,
                    reduce,
                    join,
                    token_file,
                    join_wait_s,
                },
        } => {
            let plan = load_plan(Some(&config))?;
            let role = match (listen, nodes, join) {
                (Some(addr), Some(nodes), None) => {
                    let reduce = if reduce == "star" {
                        crate::cluster::Reduce::Star
                    } else {
                        crate::cluster::Reduce::Mesh
                    };
                    Some(crate::dp::ClusterRole::Listen {
                        addr,
                        nodes,
                        reduce,
                    })
                }
                (None, None, Some(addr)) => Some(crate::dp::ClusterRole::Join { addr }),
                _ => None,
            };
            let cluster = match (role, token_file) {
                (Some(role), Some(token_file)) => Some(crate::dp::ClusterOpts {
                    role,
                    token_file,
                    join_wait: std::time::Duration::from_secs_f64(join_wait_s.max(0.0)),
                    mesh: crate::cluster::MeshAddr::default(),
                }),
                _ => None,
            };
            let opts = crate::dp::DpBenchOpts {
                warmup,
                iters,
                members,
                device,
                check,
                batch_size,
                cluster,
            };
            let r = crate::dp::bench_dp(&plan, &config.display().to_string(), &opts)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(if r.members_identical { 0 } else { 1 })
        }
        Command::Bench {
            what:
                BenchCommand::Allreduce {
                    listen,
                    nodes,
                    join,
                    token_file,
                    reduce,
                    values,
                    warmup,
                    iters,
                    join_wait_s,
                    mesh_listen,
                    mesh_advertise,
                    device,
                },
        } => {
            let role = match (listen, nodes, join) {
                (Some(addr), Some(nodes), _) => crate::dp::ClusterRole::Listen {
                    addr,
                    nodes,
                    reduce: if reduce == "star" {
                        crate::cluster::Reduce::Star
                    } else {
                        crate::cluster::Reduce::Mesh
                    },
                },
                (_, _, Some(addr)) => crate::dp::ClusterRole::Join { addr },
                _ => {
                    return Err(usage(
                        "give --listen HOST:PORT --nodes N, or --join HOST:PORT",
                    ))
                }
            };
            let c = crate::dp::ClusterOpts {
                role,
                token_file,
                join_wait: std::time::Duration::from_secs_f64(join_wait_s.max(0.0)),
                mesh: crate::cluster::MeshAddr {
                    listen: mesh_listen,
                    advertise: mesh_advertise,
                },
            };
            let r = crate::dp::bench_allreduce(&c, &device, values, warmup, iters)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(if r.sums_correct { 0 } else { 1 })
        }
        Command::Bench {
            what:
                BenchCommand::Linear {
                    device,
                    rows_div,
                    warmup,
                    iters,
                },
        } => {
            let r = crate::bench::bench_linear(&device, rows_div, warmup, iters)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(0)
        }
        Command::Bench {
            what:
                BenchCommand::Probes {
                    config,
                    device,
                    json,
                },
        } => {
            let plan = load_plan(Some(&config))?;
            let r = crate::bench::bench_probes(&plan, &config.display().to_string(), &device)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: D={} depth {} on {}; sets built in {:.1} s, holding {:.0} MiB (RSS {:.0} MiB); probes {:.1} s, peak RSS {:.0} MiB (+{:.0} MiB)",
                    r.config, r.embed_dim, r.depth, r.device, r.build_ms / 1e3, r.sets_mib,
                    r.rss_after_build_mib, r.probe_ms / 1e3, r.probe_peak_rss_mib, r.probe_extra_mib
                );
                for s in &r.sets {
                    let t = &s.timing;
                    println!(
                        "  {} ({} + {} at {} px): extract {:.1} s, knn {:.2} s, linear {:.2} s, dense {:.2} s, locality {:.2} s, correspondence {:.2} s",
                        s.name, s.n_train, s.n_test, s.size, t.extract_ms / 1e3, t.knn_ms / 1e3,
                        t.linear_ms / 1e3, t.dense_ms / 1e3, t.locality_ms / 1e3, t.correspondence_ms / 1e3
                    );
                }
            }
            Ok(0)
        }
        Command::Bench {
            what:
                BenchCommand::Distill {
                    config,
                    device,
                    precision,
                    warmup,
                    iters,
                    members,
                    batch_size,
                },
        } => {
            let mut plan = load_plan(Some(&config))?;
            if let Some(b) = batch_size {
                plan.config.train.batch_size = b;
            }
            if plan.students.is_empty() {
                anyhow::bail!("{} has no [distill] students", config.display());
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::daemon::distill::bench(
                    &plan,
                    &device,
                    precision.as_deref(),
                    warmup,
                    iters,
                    members
                )?)?
            );
            Ok(0)
        }
        Command::Probe {
            dir,
            checkpoint,
            config,
            device,
            json,
        } => crate::viz::probe(&dir.state_dir, checkpoint, config.as_ref(), &device, json),
        Command::Viz {
            what:
                VizCommand::Pca {
                    dir,
                    step,
                    image,
                    out,
                    sizes,
                },
        } => crate::viz::pca(&dir.state_dir, step, &image, &out, &sizes),
        Command::Viz {
            what:
                VizCommand::Similarity {
                    dir,
                    step,
                    image,
                    out,
                    point,
                    size,
                },
        } => crate::viz::similarity(&dir.state_dir, step, &image, &out, &point, size),
        Command::Viz {
            what:
                VizCommand::Curves {
                    dir,
                    out,
                    label,
                    compare,
                },
        } => crate::viz::curves(&dir.state_dir, label.as_deref(), &compare, &out),
        Command::Data {
            what:
                DataCommand::Scan {
                    spec,
                    json,
                    limit,
                    workers,
                },
        } => crate::commands::data_scan(&spec, json, limit, workers.map(usize::from)),
        Command::Data {
            what: DataCommand::BuildCopypaste { from, out, seed },
        } => crate::commands::build_copypaste(&from, &out, seed),
        Command::Bench {
            what:
                BenchCommand::Data {
                    data,
                    workers,
                    samples,
                    config,
                    json,
                },
        } => crate::commands::bench_data(&data, &workers, samples, config.as_ref(), json),
        Command::Parity {
            fixtures,
            dtype,
            device,
            verbose,
            json,
        } => crate::tools::parity(&fixtures, &dtype, &device, verbose, json),
        Command::Bench {
            what:
                BenchCommand::Step {
                    config,
                    warmup,
                    iters,
                    device,
                    precision,
                    batch_size,
                    json,
                },
        } => {
            let plan = load_plan(Some(&config))?;
            let opts = crate::bench::StepBenchOpts {
                warmup,
                iters,
                device,
                precision,
                batch_size,
            };
            let r = crate::bench::bench_step(&plan, &config.display().to_string(), &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("config          {}", r.config);
                println!("parameters      {:.2} M", r.params as f64 / 1e6);
                println!("threads / simd  {} / {}", r.threads, r.simd);
                println!(
                    "median          {:.1} ms/step (min {:.1}, {} iterations)",
                    r.median_ms, r.min_ms, r.iters
                );
                for (n, t) in &r.phases_ms {
                    println!("  {n:<16}{t:>9.1} ms");
                }
                println!("throughput      {:.1} images/s", r.images_per_s);
                println!(
                    "compute         {:.1} GFLOP/step, {:.1} GFLOP/s",
                    r.gflop_per_step, r.gflops
                );
                println!("peak RSS        {:.0} MiB", r.peak_rss_mib);
            }
            Ok(0)
        }
    }
}
