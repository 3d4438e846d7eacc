//! `dinod bench step`: times the full training step (teacher, Gram teacher, student
//! forward, losses, backward, clipping + AdamW, EMA) on random crops of the configured
//! sizes, and reports the median over several iterations after a warm-up, the split by
//! phase, images/s, achieved GFLOP/s and peak RSS.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::Plan;
use model::{
    apply_step_observed, clip_gradients, compute_step_observed, Batch, Phase, StepHparams,
    TrainState,
};

/// Median timings of one benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct StepBench {
    /// Config file.
    pub config: String,
    /// Parameters of the student (backbone + heads).
    pub params: usize,
    /// Iterations timed (after warm-up).
    pub iters: usize,
    /// Median wall time of a whole step.
    pub median_ms: f64,
    /// Fastest step.
    pub min_ms: f64,
    /// Median per phase: teacher, gram_teacher, student_forward, losses, backward, optimizer, ema.
    pub phases_ms: Vec<(String, f64)>,
    /// Images per second at the median.
    pub images_per_s: f64,
    /// Matrix FLOPs per step (analytic).
    pub gflop_per_step: f64,
    /// Achieved GFLOP/s at the median.
    pub gflops: f64,
    /// Peak resident set size of the process (VmHWM).
    pub peak_rss_mib: f64,
    /// Threads of the compute pool.
    pub threads: usize,
    /// Vector instruction set the kernels dispatched to.
    pub simd: String,
    /// Device the step ran on (`cpu`, `cuda:0`).
    pub device: String,
    /// Element type of the compute (the master weights stay in the recipe's type).
    pub compute_dtype: String,
    /// Images per batch.
    pub batch_size: usize,
}

/// How to run [`bench_step`].
#[derive(Clone, Debug)]
pub struct StepBenchOpts {
    /// Untimed iterations first.
    pub warmup: usize,
    /// Timed iterations.
    pub iters: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Compute type override: `f32`, `f64` or `bf16` (f32 master weights).
    pub precision: Option<String>,
    /// `train.batch_size` override.
    pub batch_size: Option<usize>,
}

impl Default for StepBenchOpts {
    fn default() -> Self {
        Self {
            warmup: 2,
            iters: 5,
            device: "cpu".into(),
            precision: None,
            batch_size: None,
        }
    }
}

/// Peak RSS of this process in MiB (`VmHWM`), 0 where unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn noise(seed: u64, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(model::params::init_tensor(
        seed,
        "bench-images",
        shape,
        model::params::Init::Normal(1.0),
        DType::F32,
    )?
    .to_dtype(dtype)?
    .to_device(&Device::Cpu)?)
}

/// A batch of random crops with the configured sizes and real iBOT masks.
pub fn synthetic_batch(plan: &Plan, seed: u64) -> Result<Batch> {
    let cfg = &plan.config;
    let b = cfg.train.batch_size;
    let crops = &cfg.data.crops;
    let dtype = cfg.precision.dtype();
    let (g, l) = (crops.global_size as usize, crops.local_size as usize);
    let global = noise(seed, &[2 * b, 3, g, g], dtype)?;
    let local = if crops.n_local > 0 {
        Some(noise(seed + 1, &[crops.n_local * b, 3, l, l], dtype)?)
    } else {
        None
    };
    let gram = match crops.gram_size {
        Some(s) => Some(noise(seed + 2, &[2 * b, 3, s as usize, s as usize], dtype)?),
        None => None,
    };
    let grid = g / plan.ssl.backbone.patch_size;
    let masks = data::generate_masks(&cfg.data.masks, 2 * b, grid, seed, 0);
    Ok(Batch::new(b, global, local, gram, masks)?)
}

/// The device and compute type of a benchmark: `device` (`cpu`, `cuda`, `cuda:N`) and
/// `precision` (`f32`, `f64` or `bf16`; the recipe's when `None`). bf16 on the CPU runs the
/// device code path (the fused CPU kernels are f32/f64).
pub fn bench_device(plan: &Plan, device: &str, precision: Option<&str>) -> Result<(Device, DType)> {
    let dev = ops::portable::device(device)?;
    let compute = match precision {
        None => plan.config.precision.compute_dtype(),
        Some("f32") => DType::F32,
        Some("f64") => DType::F64,
        Some("bf16") => DType::BF16,
        Some(p) => anyhow::bail!("unknown precision `{p}` (f32, f64 or bf16)"),
    };
    if dev.is_cpu() && compute == DType::BF16 {
        ops::portable::set_force_on_cpu(true);
    }
    Ok((dev, compute))
}

/// Runs the step benchmark.
pub fn bench_step(plan: &Plan, origin: &str, opts: &StepBenchOpts) -> Result<StepBench> {
    let (warmup, iters) = (opts.warmup, opts.iters);
    let mut plan = plan.clone();
    if let Some(b) = opts.batch_size {
        anyhow::ensure!(b > 0, "--batch-size must be positive");
        plan.config.train.batch_size = b;
    }
    let plan = &plan;
    let cfg = &plan.config;
    let master = cfg.precision.dtype();
    let (dev, compute) = bench_device(plan, &opts.device, opts.precision.as_deref())?;
    let mut st = TrainState::new(&plan.ssl, cfg.seed, master)
        .context("building the model")?
        .to_device(&dev)
        .context("moving the model to the device")?;
    let gram_on = cfg.data.crops.gram_size.is_some();
    if gram_on {
        st.refresh_gram_teacher()?;
    }
    let batch = synthetic_batch(plan, cfg.seed)?
        .to_device(&dev)?
        .cast(compute)?;
    let sync = || ops::portable::synchronize(&dev);
    let mut hp: StepHparams = plan.hparams(1_000_000);
    if gram_on {
        hp.gram_weight = 1.0;
    }
    let names = [
        "teacher",
        "gram_teacher",
        "student_forward",
        "losses",
        "backward",
        "optimizer",
        "ema",
    ];
    let phase_ix = |p: Phase| match p {
        Phase::Teacher => 0,
        Phase::GramTeacher => 1,
        Phase::StudentForward => 2,
        Phase::Losses => 3,
        Phase::Backward => 4,
        Phase::Optimizer => 5,
        Phase::Ema => 6,
    };
    let mut totals = vec![];
    let mut phases: Vec<Vec<f64>> = vec![vec![]; names.len()];
    for it in 0..warmup + iters {
        let mut times = [0.0f64; 7];
        let t0 = Instant::now();
        let mut last = t0;
        let mut obs = |p: Phase| {
            // queued device work belongs to the phase that queued it
            let _ = sync();
            let now = Instant::now();
            times[phase_ix(p)] += (now - last).as_secs_f64() * 1e3;
            last = now;
        };
        let out = if compute == master {
            compute_step_observed(&st, &batch, &hp, &mut obs)?
        } else {
            // mixed precision: the casts of the master weights are part of the step
            let view = st.compute_view(compute)?;
            compute_step_observed(&view, &batch, &hp, &mut obs)?
        };
        let clip = clip_gradients(&st.cfg, &out.grads)?;
        if clip.is_err() || !out.losses.is_finite() {
            anyhow::bail!("non-finite step during the benchmark: {:?}", out.losses);
        }
        apply_step_observed(&mut st, &out.grads, &hp, &mut obs)?;
        drop(out);
        sync()?;
        let total = t0.elapsed().as_secs_f64() * 1e3;
        if it >= warmup {
            totals.push(total);
            for (i, t) in times.iter().enumerate() {
                phases[i].push(*t);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            0.5 * (v[v.len() / 2 - 1] + v[v.len() / 2])
        }
    };
    let median_ms = median(&mut totals);
    let min_ms = totals.first().copied().unwrap_or(0.0);
    let crops = &cfg.data.crops;
    let b = cfg.train.batch_size;
    let flops = model::flops::step_flops(
        &plan.ssl,
        b,
        crops.global_size as usize,
        crops.n_local,
        crops.local_size as usize,
        batch.mask_indices.len(),
        crops.gram_size.map(|s| s as usize),
    );
    let gflop = flops.total() / 1e9;
    Ok(StepBench {
        config: origin.to_string(),
        params: st.student.numel(),
        iters,
        median_ms,
        min_ms,
        phases_ms: names
            .iter()
            .zip(phases.iter_mut())
            .map(|(n, v)| (n.to_string(), median(v)))
            .collect(),
        images_per_s: b as f64 / (median_ms / 1e3),
        gflop_per_step: gflop,
        gflops: gflop / (median_ms / 1e3),
        peak_rss_mib: peak_rss_mib(),
        threads: rayon::current_num_threads(),
        simd: format!("{:?}", ops::simd_level()),
        device: match &dev {
            Device::Cpu => "cpu".to_string(),
            d => format!("{:?}", d.location()),
        },
        compute_dtype: format!("{compute:?}").to_lowercase(),
        batch_size: b,
    })
}
