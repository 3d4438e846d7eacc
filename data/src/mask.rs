//! iBOT masks exactly as the official collate (`dinov3/data/collate.py`, `dinov3/data/masking.py`).
//!
//! Over the 2B global crops of a batch, `int(2B * p)` crops are masked; masked crop `i` gets
//! `int(N * linspace(min, max, n + 1)[i + 1])` patches (float32 like torch), placed by the BEiT
//! block-wise generator and topped up with uniformly random patches to the exact count; the list of
//! masks (masked and empty) is shuffled across crops. Layout `[2B, N]` u8, 1 = masked, row `c * B + b`
//! (crop-major like every crop tensor). All draws come from the stream keyed by (seed, batch index).

use crate::config::MaskConfig;
use crate::rng::{domain, KeyedRng};

/// The BEiT block-wise `MaskingGenerator` on an `height x width` patch grid.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskGenerator {
    height: usize,
    width: usize,
    min_num_patches: f64,
    max_num_patches: f64,
    log_aspect: (f64, f64),
}

impl MaskGenerator {
    /// A generator for a grid, with `max_num_patches = max_block_ratio * N` (official: 0.5 N).
    pub fn new(height: usize, width: usize, cfg: &MaskConfig) -> Self {
        MaskGenerator {
            height,
            width,
            min_num_patches: cfg.min_num_patches as f64,
            max_num_patches: cfg.max_block_ratio * (height * width) as f64,
            log_aspect: (cfg.min_aspect.ln(), (1.0 / cfg.min_aspect).ln()),
        }
    }

    /// Places one block (`_mask`): up to 10 attempts; returns the number of newly masked patches.
    fn place_block(&self, mask: &mut [u8], max_mask_patches: f64, rng: &mut KeyedRng) -> usize {
        let mut delta = 0;
        for _ in 0..10 {
            let target_area = rng.uniform_range(self.min_num_patches, max_mask_patches);
            let aspect = rng
                .uniform_range(self.log_aspect.0, self.log_aspect.1)
                .exp();
            let h = (target_area * aspect).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                let top = rng.int_inclusive(0, (self.height - h) as i64) as usize;
                let left = rng.int_inclusive(0, (self.width - w) as i64) as usize;
                let mut already = 0usize;
                for i in top..top + h {
                    already += mask[i * self.width + left..i * self.width + left + w]
                        .iter()
                        .filter(|&&m| m != 0)
                        .count();
                }
                let new = (h * w - already) as f64;
                if 0.0 < new && new <= max_mask_patches {
                    for i in top..top + h {
                        for m in &mut mask[i * self.width + left..i * self.width + left + w] {
                            if *m == 0 {
                                *m = 1;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// A mask with exactly `n_masked` patches (row-major `height * width`, 1 = masked).
    pub fn generate(&self, n_masked: usize, rng: &mut KeyedRng) -> Vec<u8> {
        let n = self.height * self.width;
        let n_masked = n_masked.min(n);
        let mut mask = vec![0u8; n];
        let mut count = 0usize;
        while count < n_masked {
            let max_mask_patches = ((n_masked - count) as f64).min(self.max_num_patches);
            let delta = self.place_block(&mut mask, max_mask_patches, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        if count < n_masked {
            // Top up with uniformly random free patches (random.sample of the free positions).
            let mut free: Vec<usize> = (0..n).filter(|&i| mask[i] == 0).collect();
            let need = n_masked - count;
            for k in 0..need {
                let j = k + rng.below((free.len() - k) as u64) as usize;
                free.swap(k, j);
                mask[free[k]] = 1;
            }
        }
        mask
    }
}

/// `torch.linspace(start, end, steps)` in float32, with torch's two-sided formula.
pub(crate) fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Number of patches of each masked crop, in generation order (before the shuffle).
pub fn masked_counts(cfg: &MaskConfig, n_crops: usize, n_patches: usize) -> Vec<usize> {
    let n_masked_crops = (n_crops as f64 * cfg.sample_probability) as usize;
    let probs = linspace_f32(
        cfg.ratio_min_max.0 as f32,
        cfg.ratio_min_max.1 as f32,
        n_masked_crops + 1,
    );
    (0..n_masked_crops)
        .map(|i| (n_patches as f32 * probs[i + 1]) as usize)
        .collect()
}

/// The masks of one batch: `[n_crops, grid * grid]` u8, crop-major, keyed by (seed, batch index).
pub fn generate_masks(
    cfg: &MaskConfig,
    n_crops: usize,
    grid: usize,
    seed: u64,
    batch_index: u64,
) -> Vec<u8> {
    let n_patches = grid * grid;
    let mut rng = KeyedRng::new(&[seed, domain::MASK, batch_index]);
    let generator = MaskGenerator::new(grid, grid, cfg);
    let mut masks: Vec<Vec<u8>> = masked_counts(cfg, n_crops, n_patches)
        .into_iter()
        .map(|k| generator.generate(k, &mut rng))
        .collect();
    masks.resize(n_crops, vec![0u8; n_patches]);
    rng.shuffle(&mut masks);
    masks.concat()
}

/// Flat indices (ascending) of the masked patches in `[n_crops * n_patches]`.
pub fn mask_indices(masks: &[u8]) -> Vec<u32> {
    masks
        .iter()
        .enumerate()
        .filter(|(_, &m)| m != 0)
        .map(|(i, _)| i as u32)
        .collect()
}

/// Per masked patch (in `mask_indices` order): `1 / (number of masked patches of its crop)`.
pub fn masks_weight(masks: &[u8], n_patches: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for row in masks.chunks_exact(n_patches) {
        let k = row.iter().filter(|&&m| m != 0).count();
        out.extend(std::iter::repeat_n(1.0 / k.max(1) as f32, k));
    }
    out
}

/// Total number of masked patches.
pub fn n_masked(masks: &[u8]) -> usize {
    masks.iter().filter(|&&m| m != 0).count()
}
