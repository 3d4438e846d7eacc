//! Deterministic randomness: every random choice of the crate comes from a `ChaCha8Rng` whose 32-byte
//! seed is a hash of a key (run seed, domain, epoch, sample position, crop index, ...).
//!
//! The samplers (uniform floats, bounded integers, Bernoulli draws, shuffles) are written here rather
//! than taken from `rand`, so their values depend only on ChaCha8's output stream, which is specified,
//! and not on the sampling algorithms of a `rand` release. Never use a thread or OS RNG in this crate.

use rand_chacha::rand_core::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Domains keep streams of different purposes apart even when the other key parts coincide.
pub(crate) mod domain {
    /// Per-epoch sample order.
    pub(crate) const PERMUTATION: u64 = 0x7065_726d;
    /// Per-crop augmentation parameters.
    pub(crate) const AUGMENT: u64 = 0x6175_676d;
    /// Per-batch iBOT masks.
    pub(crate) const MASK: u64 = 0x6d61_736b;
    /// Per-batch choice of high-resolution crop sizes.
    pub(crate) const SIZES: u64 = 0x7369_7a65;
    /// Procedural scenes.
    pub(crate) const SYNTHETIC: u64 = 0x7379_6e74;
    /// Copy-paste segmentation set.
    pub(crate) const COPYPASTE: u64 = 0x636f_7079;
}

#[inline]
fn mix64(mut z: u64) -> u64 {
    // SplitMix64 finaliser (Stafford variant 13): a bijection with full avalanche.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes a key (any number of u64 parts; the length is part of the key) into a ChaCha seed.
pub(crate) fn derive_seed(parts: &[u64]) -> [u8; 32] {
    let mut h = 0x243f_6a88_85a3_08d3u64 ^ (parts.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &p in parts {
        h = mix64(h ^ mix64(p.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    let mut seed = [0u8; 32];
    for (i, chunk) in seed.chunks_exact_mut(8).enumerate() {
        let word = mix64(h.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    seed
}

/// A keyed ChaCha8 stream with the few samplers the crate needs.
#[derive(Debug, Clone)]
pub struct KeyedRng(ChaCha8Rng);

impl KeyedRng {
    /// The stream for a key; the same key always gives the same stream.
    pub fn new(parts: &[u64]) -> Self {
        KeyedRng(ChaCha8Rng::from_seed(derive_seed(parts)))
    }

    /// 64 raw bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [a, b) (or [b, a) when b < a, like Python's `random.uniform`).
    #[inline]
    pub fn uniform_range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.uniform()
    }

    /// Uniform integer in [0, n), unbiased (Lemire's multiply-and-reject). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform integer in [lo, hi] (both inclusive, like Python's `random.randint`).
    pub fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        debug_assert!(lo <= hi);
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    /// True with probability `p` (one draw, whatever `p` is).
    #[inline]
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A keyed pseudo-random permutation of `0..n` without a table (a balanced Feistel network on the
/// next even number of bits, with cycle walking), so an epoch over millions of images costs no memory
/// and any position can be mapped on its own.
#[derive(Debug, Clone)]
pub(crate) struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 6],
}

impl Permutation {
    pub(crate) fn new(n: u64, key: &[u64]) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut rng = KeyedRng::new(key);
        let keys = std::array::from_fn(|_| rng.next_u64());
        Permutation { n, half_bits, keys }
    }

    #[inline]
    fn round(&self, r: u64, key: u64) -> u64 {
        mix64(r ^ key) & ((1u64 << self.half_bits) - 1)
    }

    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for &k in &self.keys {
            let next = l ^ self.round(r, k);
            l = r;
            r = next;
        }
        (l << self.half_bits) | r
    }

    /// The element at position `i` (< n).
    pub(crate) fn apply(&self, i: u64) -> u64 {
        // outside the domain the cycle walk below may never return
        assert!(
            i < self.n,
            "position {i} outside a permutation of {}",
            self.n
        );
        if self.n <= 1 {
            return i;
        }
        let mut x = i;
        loop {
            x = self.encrypt(x);
            if x < self.n {
                return x;
            }
        }
    }
}
