//! `ops`: the numerics of the DINOv3 recipe on candle tensors, each with a hand-written,
//! tested backward pass.
//!
//! Owns: Linear, LayerNorm, exact GELU, LayerScale, fused multi-head attention with 2-D
//! RoPE, L2 normalisation, token assembly and patch unfolding (`nn`, `attention`);
//! Sinkhorn-Knopp, soft-target cross-entropy, KoLeo, the Gram loss and bicubic resizing
//! (`loss`); the fused AdamW / EMA arithmetic (`optim`); schedules as pure functions of
//! the step (`schedule`); and naive f64 reference twins of every op (`reference`).
//!
//! Must not know: the model's structure, configs files, IO, clocks, threads of its own
//! (it uses the global rayon pool), actors or storage.
//!
//! Why not candle's autograd: candle-nn's fused LayerNorm / softmax / RoPE silently drop
//! gradients, its backward allocates a zero tensor and an add for every graph node, and it
//! keeps the whole graph alive. The model calls explicit forward/backward pairs instead;
//! each pair here is checked against finite differences and against its reference twin.
//!
//! Kernels run on the CPU in f32 or f64; other devices get an error from the dispatch
//! until their paths exist.

pub mod attention;
pub mod host;
mod linalg;
pub mod loss;
pub mod nn;
pub mod optim;
pub mod portable;
pub mod real;
pub mod reference;
pub mod schedule;
mod simd;

pub use real::Real;
pub use simd::{level as simd_level, Level as SimdLevel};

#[cfg(test)]
mod tests;
