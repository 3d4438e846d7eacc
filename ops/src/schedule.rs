//! Schedules as pure functions of the step, as the official `linear_warmup_cosine_decay`
//! arrays define them (start -> peak linearly over `warmup` steps, endpoint excluded, then
//! a cosine from peak to `end` over `cosine` steps, then constant `end`). With
//! `peak == end` this is DINOv3's constant schedule after warm-up.

use serde::{Deserialize, Serialize};

/// One scheduled scalar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Value at step 0.
    pub start: f64,
    /// Value reached at the end of the warm-up.
    pub peak: f64,
    /// Value after the cosine phase (and forever after).
    pub end: f64,
    /// Warm-up length in steps.
    #[serde(default)]
    pub warmup: u64,
    /// Cosine length in steps after the warm-up (0 = jump straight to `end`).
    #[serde(default)]
    pub cosine: u64,
}

impl Schedule {
    /// A constant value.
    pub fn constant(v: f64) -> Self {
        Self {
            start: v,
            peak: v,
            end: v,
            warmup: 0,
            cosine: 0,
        }
    }

    /// Linear warm-up from `start` to `v`, then constant.
    pub fn warmup_constant(start: f64, v: f64, warmup: u64) -> Self {
        Self {
            start,
            peak: v,
            end: v,
            warmup,
            cosine: 0,
        }
    }

    /// The value at `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            // numpy linspace(start, peak, warmup, endpoint=False)
            return self.start + (self.peak - self.start) * step as f64 / self.warmup as f64;
        }
        let s = step - self.warmup;
        if s < self.cosine {
            let t = s as f64 / self.cosine as f64;
            return self.end
                + 0.5 * (self.peak - self.end) * (1.0 + (std::f64::consts::PI * t).cos());
        }
        self.end
    }
}
