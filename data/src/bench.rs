//! `dinod bench data`: multi-crop throughput of the loader on a real source, with a single-thread
//! breakdown of decode versus augmentation time.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::augment::{Augmenter, SampleKey};
use crate::config::{CropConfig, MaskConfig, Order};
use crate::error::DataError;
use crate::loader::{Cursor, Loader, LoaderOptions};
use crate::source::SourceSpec;

/// What one benchmark measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    /// The source, described.
    pub description: String,
    /// Worker threads.
    pub n_workers: usize,
    /// Samples timed (after one warm-up batch).
    pub n_samples: u64,
    /// Batch size used.
    pub batch_size: usize,
    /// Wall-clock seconds of the timed part.
    pub wall_s: f64,
    /// Throughput of the loader.
    pub samples_per_s: f64,
    /// Throughput divided by the number of workers.
    pub samples_per_s_per_worker: f64,
    /// Mean read + decode time per sample on one thread (ms).
    pub decode_ms: f64,
    /// Mean multi-crop augmentation time per sample on one thread (ms).
    pub augment_ms: f64,
    /// Crops per sample, e.g. `2x224 + 8x96`.
    pub crops: String,
    /// CPU seconds the whole process used during the timed part (Linux; `None` elsewhere).
    pub cpu_s: Option<f64>,
    /// Samples per CPU-second: the per-core throughput, robust to other load on the machine.
    pub samples_per_cpu_s: Option<f64>,
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} workers: {:.1} samples/s ({:.1} per worker, {} per CPU-second), {} samples of {} in {:.2} s, batch {}; \
             one thread: decode {:.2} ms + augment {:.2} ms per sample ({})",
            self.n_workers,
            self.samples_per_s,
            self.samples_per_s_per_worker,
            self.samples_per_cpu_s.map_or("?".to_string(), |v| format!("{v:.1}")),
            self.n_samples,
            self.crops,
            self.wall_s,
            self.batch_size,
            self.decode_ms,
            self.augment_ms,
            self.description
        )
    }
}

/// Runs the loader with `n_workers` threads for about `n_samples` samples (whole batches of 32, after
/// one warm-up batch) and measures decode and augmentation on the calling thread.
pub fn bench_multicrop(
    spec: &SourceSpec,
    cfg: &CropConfig,
    n_workers: usize,
    n_samples: u64,
) -> Result<BenchResult, DataError> {
    cfg.validate()?;
    let source = spec.open()?;
    let sizes = cfg.sizes_for_batch(0, 0);
    let crops = format!("2x{} + {}x{}", sizes.global, cfg.n_local, sizes.local);

    // Single-thread breakdown.
    let len = source.len().unwrap_or(u64::MAX);
    let n_probe = n_samples.clamp(1, 64).min(len);
    let mut augmenter = Augmenter::new(cfg.clone());
    let (mut decode_s, mut augment_s, mut probed) = (0.0, 0.0, 0u64);
    for i in 0..n_probe {
        let t0 = Instant::now();
        let Ok(sample) = source.get(i) else { continue };
        let t1 = Instant::now();
        let out = augmenter.multicrop(
            &sample.image,
            sizes,
            SampleKey {
                seed: 0,
                epoch: 0,
                position: i,
            },
        );
        std::hint::black_box(&out);
        decode_s += (t1 - t0).as_secs_f64();
        augment_s += t1.elapsed().as_secs_f64();
        probed += 1;
    }

    let batch_size = 32usize;
    let n_batches = n_samples.div_ceil(batch_size as u64).max(1);
    let masks = MaskConfig {
        patch_size: gcd(sizes.global, 16),
        ..MaskConfig::default()
    };
    let opts = LoaderOptions {
        batch_size,
        seed: 0,
        crops: cfg.clone(),
        masks,
        n_workers: n_workers.max(1),
        prefetch: 2 * n_workers.max(1),
        order: Order::Shuffled,
        part: None,
    };
    let mut loader = Loader::new(source.clone(), opts, Cursor::default())?;
    std::hint::black_box(loader.next_batch()?);
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    for _ in 0..n_batches {
        let batch = loader.next_batch()?;
        loader.recycle(std::hint::black_box(batch));
    }
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = process_cpu_seconds().zip(cpu_start).map(|(b, a)| b - a);
    let timed = n_batches * batch_size as u64;
    let samples_per_s = timed as f64 / wall_s;
    Ok(BenchResult {
        description: source.describe(),
        n_workers: n_workers.max(1),
        n_samples: timed,
        batch_size,
        wall_s,
        samples_per_s,
        samples_per_s_per_worker: samples_per_s / n_workers.max(1) as f64,
        decode_ms: 1e3 * decode_s / probed.max(1) as f64,
        augment_ms: 1e3 * augment_s / probed.max(1) as f64,
        crops,
        cpu_s,
        samples_per_cpu_s: cpu_s.filter(|&c| c > 0.0).map(|c| timed as f64 / c),
    })
}

/// User + system CPU time of this process, from `/proc/self/stat` (clock ticks of 1/100 s).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
