//! Deterministic random numbers and synthetic feature generators for the tests.

use data::KeyedRng;

/// A keyed stream of standard normal numbers (Box-Muller).
pub(crate) struct Normal(KeyedRng);

impl Normal {
    pub(crate) fn new(seed: u64) -> Self {
        Self(KeyedRng::new(&[0x7e57, seed]))
    }

    pub(crate) fn next(&mut self) -> f32 {
        let u1 = self.0.uniform().max(1e-12);
        let u2 = self.0.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }

    pub(crate) fn uniform(&mut self) -> f32 {
        self.0.uniform() as f32
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
}

/// `n` rows of width `dim`: row i is `centres[labels[i]] + noise * N(0, 1)`.
pub(crate) fn clustered(
    labels: &[u32],
    centres: &[Vec<f32>],
    noise: f32,
    rng: &mut Normal,
) -> Vec<f32> {
    labels
        .iter()
        .flat_map(|&l| {
            centres[l as usize]
                .iter()
                .map(|c| c + noise * rng.next())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `k` random class centres of width `dim`, scaled to norm about `scale * sqrt(dim)`.
pub(crate) fn centres(k: usize, dim: usize, scale: f32, rng: &mut Normal) -> Vec<Vec<f32>> {
    (0..k)
        .map(|_| rng.vec(dim).into_iter().map(|v| v * scale).collect())
        .collect()
}
