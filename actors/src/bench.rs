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
    proc_status_kib("VmHWM:").map_or(0.0, |k| k / 1024.0)
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

/// The layers with a bias of a vit_base/16 step at 224 px (batch 64, 2 global + 8 local
/// crops at 96 px, 4 registers, iBOT on ~30% of the global patches): name, rows, in, out.
const LINEAR_SHAPES: [(&str, usize, usize, usize); 7] = [
    ("patch_embed", 43_520, 768, 768),
    ("blocks.attn.qkv", 46_720, 768, 2304),
    ("blocks.mlp.fc1", 46_720, 768, 3072),
    ("dino_head.mlp.0", 640, 768, 2048),
    ("dino_head.mlp.4", 640, 2048, 256),
    ("ibot_head.mlp.0", 7_526, 768, 2048),
    ("ibot_head.mlp.4", 7_526, 2048, 256),
];

/// Deterministic values uniform in `[-a, a]` (a xorshift stream; candle's own RNG cannot be
/// seeded on the CPU).
fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}

/// `dinod bench linear`: what rounding a bf16 layer's output once would cost. For every
/// layer with a bias of a vit_base/16 step (rows divided by `rows_div`), on bf16 inputs:
/// `bf16`, the GEMM in bf16 (f32 accumulation, output rounded to bf16) and then the bias
/// added in bf16, a second rounding (what the device path does); `f32`, the same inputs
/// widened, one f32 GEMM, the bias added in f32 and the sum rounded once (what PyTorch's
/// addmm computes, and what the CPU path does). Reports the median time of each and their
/// error against the same product in f64.
pub fn bench_linear(
    device: &str,
    rows_div: usize,
    warmup: usize,
    iters: usize,
) -> Result<serde_json::Value> {
    anyhow::ensure!(
        rows_div > 0 && iters > 0,
        "--rows-div and --iters must be positive"
    );
    let dev = ops::portable::device(device)?;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<(f64, Tensor)> {
        let mut v = vec![];
        let mut out = f()?;
        for i in 0..warmup + iters {
            ops::portable::synchronize(&dev)?;
            let t0 = Instant::now();
            out = f()?;
            ops::portable::synchronize(&dev)?;
            if i >= warmup {
                v.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok((v[v.len() / 2], out))
    };
    // max |y - ref| / max |ref| and mean |y - ref| / mean |ref|, in f64
    let err = |y: &Tensor, r: &Tensor| -> Result<(f64, f64)> {
        let d = (y.to_dtype(DType::F64)? - r)?.abs()?;
        let ra = r.abs()?;
        let max = d.max_all()?.to_scalar::<f64>()? / ra.max_all()?.to_scalar::<f64>()?;
        let mean = d.mean_all()?.to_scalar::<f64>()? / ra.mean_all()?.to_scalar::<f64>()?;
        Ok((max, mean))
    };
    let mut rows_out = vec![];
    for (i, &(name, rows, k, n)) in LINEAR_SHAPES.iter().enumerate() {
        let m = (rows / rows_div).max(1);
        let seed = 1 + i as u64 * 3;
        let up = |v: Vec<f32>, shape: (usize, usize)| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(DType::BF16)?)
        };
        let x = up(uniform(m * k, 1.7, seed), (m, k))?;
        let w = up(uniform(n * k, 1.7 / (k as f32).sqrt(), seed + 1), (n, k))?;
        // a bias as large as the products, so that it cancels part of them
        let b = up(uniform(n, 1.0, seed + 2), (1, n))?;
        let (bf16_ms, y_bf16) = time(&|| x.matmul(&w.t()?)?.broadcast_add(&b))?;
        let (x32, w32, b32) = (
            x.to_dtype(DType::F32)?,
            w.to_dtype(DType::F32)?,
            b.to_dtype(DType::F32)?,
        );
        let (f32_ms, y_f32) = time(&|| {
            x.to_dtype(DType::F32)?
                .matmul(&w.to_dtype(DType::F32)?.t()?)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?
                .to_dtype(DType::BF16)
        })?;
        let (f32_gemm_ms, _) = time(&|| x32.matmul(&w32.t()?)?.broadcast_add(&b32))?;
        let reference = x
            .to_dtype(DType::F64)?
            .matmul(&w.to_dtype(DType::F64)?.t()?)?
            .broadcast_add(&b.to_dtype(DType::F64)?)?;
        let (bf16_max, bf16_mean) = err(&y_bf16, &reference)?;
        let (f32_max, f32_mean) = err(&y_f32, &reference)?;
        rows_out.push(serde_json::json!({
            "layer": name, "rows": m, "in": k, "out": n,
            "bf16_ms": bf16_ms, "f32_round_once_ms": f32_ms, "f32_gemm_only_ms": f32_gemm_ms,
            "time_ratio": f32_ms / bf16_ms,
            "bf16_err_max": bf16_max, "bf16_err_mean": bf16_mean,
            "f32_round_once_err_max": f32_max, "f32_round_once_err_mean": f32_mean,
            "error_ratio_mean": bf16_mean / f32_mean,
        }));
    }
    Ok(serde_json::json!({
        "device": device,
        "rows_div": rows_div,
        "iters": iters,
        "layers": rows_out,
    }))
}

/// What one probe run of a recipe costs: `dinod bench probes`.
#[derive(Debug, Serialize)]
pub struct ProbeBench {
    /// The recipe.
    pub config: String,
    /// Where the features were extracted (the fits run on the host).
    pub device: String,
    /// Backbone width.
    pub embed_dim: usize,
    /// Backbone depth.
    pub depth: usize,
    /// Building the probe sets (decode, resize, crop) in ms.
    pub build_ms: f64,
    /// What the built sets hold in memory, MiB.
    pub sets_mib: f64,
    /// Resident memory once the sets are built (the model not yet made), MiB.
    pub rss_after_build_mib: f64,
    /// Peak resident memory while the probes ran, MiB.
    pub probe_peak_rss_mib: f64,
    /// What the probes needed beyond that (peak minus the resident memory before), MiB.
    pub probe_extra_mib: f64,
    /// The whole probe run, ms.
    pub probe_ms: f64,
    /// Per set: images and what each probe took.
    pub sets: Vec<ProbeBenchSet>,
}

/// One set of [`ProbeBench`].
#[derive(Debug, Serialize)]
pub struct ProbeBenchSet {
    /// The set's name.
    pub name: String,
    /// Training images.
    pub n_train: usize,
    /// Test images.
    pub n_test: usize,
    /// Image side.
    pub size: usize,
    /// Per probe, ms.
    pub timing: eval_probes::Timing,
}

/// Resident memory of this process now in MiB (`VmRSS`), 0 where unavailable.
fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:").map_or(0.0, |k| k / 1024.0)
}

/// A `kB` field of `/proc/self/status` (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Starts a new peak-RSS window (Linux: writing 5 to `clear_refs` resets `VmHWM`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Builds `plan`'s probe sets, makes a random-init backbone of its model on `device` (in
/// f32, as the evaluator's copy) and runs every probe once, as the evaluator does; reports
/// the time per probe and the memory the sets and the probes hold.
pub fn bench_probes(plan: &Plan, origin: &str, device: &str) -> Result<ProbeBench> {
    anyhow::ensure!(
        !plan.config.eval.sets.is_empty(),
        "{origin} has no [[eval.sets]]"
    );
    let dev = crate::runtime::device(device)?;
    reset_peak_rss();
    let t = Instant::now();
    let sets = crate::daemon::evaluator::build_sets(&plan.config.eval)?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let sets_mib = sets.iter().map(|s| s.heap_bytes()).sum::<usize>() as f64 / (1 << 20) as f64;
    let rss_after_build_mib = rss_mib();
    let cfg = &plan.ssl.backbone;
    let vit = model::vit::Vit::init(cfg, plan.config.seed, DType::F32)
        .context("building the backbone")?
        .to_device(&dev)?;
    let before = rss_mib();
    reset_peak_rss();
    let ev = crate::daemon::evaluator::evaluate(&vit, &sets, &plan.config.eval, 0)?;
    let probe_peak_rss_mib = peak_rss_mib();
    let report: eval_probes::ProbeReport = serde_json::from_value(ev.report.clone())?;
    Ok(ProbeBench {
        config: origin.to_string(),
        device: ev.device.clone(),
        embed_dim: cfg.embed_dim,
        depth: cfg.depth,
        build_ms,
        sets_mib,
        rss_after_build_mib,
        probe_peak_rss_mib,
        probe_extra_mib: probe_peak_rss_mib - before,
        probe_ms: ev.ms,
        sets: report
            .sets
            .into_iter()
            .map(|s| ProbeBenchSet {
                name: s.name,
                n_train: s.n_train,
                n_test: s.n_test,
                size: s.size.0,
                timing: s.timing,
            })
            .collect(),
    })
}
