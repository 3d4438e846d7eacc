//! Multi-head self-attention with 2-D RoPE on the patch tokens, fused per (image, head):
//! split q/k/v out of the packed `qkv` projection, rotate the patch rows, scores,
//! softmax and the weighted sum, without materialising transposed copies. The backward
//! pass recomputes nothing but the cheap rotations: it keeps the rotated q, k, v and the
//! attention probabilities.

#[allow(unused_imports)]
use num_traits::{Float, One, Zero};
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use crate::float_dispatch;
use crate::host::{from_vec, view};
use crate::linalg::{gemm_into, MatRef};
use crate::nn::rows_dim;
use crate::real::Real;
use crate::simd::simd_kernel;

/// RoPE sine/cosine tables for one token grid, `[h * w, head_dim]` each.
#[derive(Clone, Debug)]
pub struct Rope {
    /// `sin(theta)` per patch and channel.
    pub sin: Tensor,
    /// `cos(theta)` per patch and channel.
    pub cos: Tensor,
}

/// The RoPE periods `base^(4k / head_dim)` for `k < head_dim / 4`.
pub fn rope_periods(head_dim: usize, base: f64) -> Vec<f64> {
    let q = head_dim / 4;
    (0..q).map(|k| base.powf(4.0 * k as f64 / head_dim as f64)).collect()
}

/// RoPE tables for an `h x w` patch grid with per-axis ("separate") coordinate
/// normalisation to `[-1, 1]`, multiplied by `rescale` (1 outside training). Computed in
/// f64 and stored in `dtype`.
pub fn rope_tables(h: usize, w: usize, head_dim: usize, base: f64, rescale: f64, dtype: candle_core::DType) -> Result<Rope> {
    if head_dim % 4 != 0 {
        bail!("RoPE needs a head dimension divisible by 4, got {head_dim}")
    }
    let periods = rope_periods(head_dim, base);
    let q = head_dim / 4;
    let mut sin = Vec::with_capacity(h * w * head_dim);
    let mut cos = Vec::with_capacity(h * w * head_dim);
    let mut ang = vec![0f64; head_dim / 2];
    for i in 0..h {
        for j in 0..w {
            let y = (2.0 * (i as f64 + 0.5) / h as f64 - 1.0) * rescale;
            let x = (2.0 * (j as f64 + 0.5) / w as f64 - 1.0) * rescale;
            for k in 0..q {
                ang[k] = 2.0 * std::f64::consts::PI * y / periods[k];
                ang[q + k] = 2.0 * std::f64::consts::PI * x / periods[k];
            }
            for _ in 0..2 {
                for &a in &ang {
                    sin.push(a.sin());
                    cos.push(a.cos());
                }
            }
        }
    }
    let shape = (h * w, head_dim);
    Ok(Rope {
        sin: Tensor::from_vec(sin, shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?,
        cos: Tensor::from_vec(cos, shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?,
    })
}

/// Shape of one attention call: `batch` sequences of `tokens` tokens, the first
/// `prefix` of which (CLS and registers) are not rotated.
#[derive(Clone, Copy, Debug)]
pub struct SeqShape {
    /// Number of sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Unrotated leading tokens per sequence.
    pub prefix: usize,
    /// Attention heads.
    pub heads: usize,
}

/// What [`attention_bwd`] needs.
pub struct AttnCache {
    shape: SeqShape,
    dim: usize,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    rope: Option<Rope>,
}

#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
// SAFETY: used only to write disjoint (row, column-range) windows from parallel tasks.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

simd_kernel! {
    fn rope_rows<T>(z: &mut [T], sin: &[T], cos: &[T], dh: usize, inverse: bool) {
        let half = dh / 2;
        let mut tmp = [T::zero(); 512];
        for (zr, (sr, cr)) in z.chunks_mut(dh).zip(sin.chunks(dh).zip(cos.chunks(dh))) {
            tmp[..dh].copy_from_slice(zr);
            if !inverse {
                for j in 0..half {
                    zr[j] = tmp[j] * cr[j] - tmp[j + half] * sr[j];
                    zr[j + half] = tmp[j + half] * cr[j + half] + tmp[j] * sr[j + half];
                }
            } else {
                for j in 0..half {
                    zr[j] = tmp[j] * cr[j] + tmp[j + half] * sr[j + half];
                    zr[j + half] = tmp[j + half] * cr[j + half] - tmp[j] * sr[j];
                }
            }
        }
    }
}

simd_kernel! {
    fn softmax_rows_inplace<T>(s: &mut [T], n: usize) {
        for row in s.chunks_mut(n) {
            let m = row.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
            let mut sum = T::zero();
            for v in row.iter_mut() { *v = (*v - m).vexp(); sum = sum + *v; }
            let inv = T::one() / sum;
            for v in row.iter_mut() { *v = *v * inv; }
        }
    }
}

simd_kernel! {
    fn softmax_bwd_rows<T>(p: &[T], dp: &mut [T], n: usize, scale: T) {
        for (pr, dr) in p.chunks(n).zip(dp.chunks_mut(n)) {
            let mut dot = T::zero();
            for i in 0..n { dot = dot + pr[i] * dr[i]; }
            for i in 0..n { dr[i] = pr[i] * (dr[i] - dot) * scale; }
        }
    }
}

fn check(qkv: &Tensor, s: &SeqShape, rope: Option<&Rope>) -> Result<(usize, usize)> {
    let (rows, d3) = rows_dim(qkv)?;
    if d3 % 3 != 0 || rows != s.batch * s.tokens {
        bail!("attention: qkv {:?} does not match {s:?}", qkv.dims())
    }
    let d = d3 / 3;
    if d % s.heads != 0 {
        bail!("attention: dim {d} not divisible by {} heads", s.heads)
    }
    let dh = d / s.heads;
    if dh > 512 {
        bail!("attention: head dim {dh} above 512 is not supported")
    }
    if let Some(r) = rope {
        let (n, w) = r.sin.dims2()?;
        if n != s.tokens - s.prefix || w != dh {
            bail!("attention: rope table {:?} for {} patch tokens of head dim {dh}", r.sin.dims(), s.tokens - s.prefix)
        }
    }
    Ok((d, dh))
}

/// Forward for training: returns the attention output `[batch * tokens, D]` and a cache.
pub fn attention(qkv: &Tensor, s: SeqShape, rope: Option<&Rope>) -> Result<(Tensor, AttnCache)> {
    let (d, dh) = check(qkv, &s, rope)?;
    let (n, h) = (s.tokens, s.heads);
    float_dispatch!(qkv.dtype(), T => {
        let x = view::<T>(qkv)?;
        let sin = rope.map(|r| view::<T>(&r.sin)).transpose()?;
        let cos = rope.map(|r| view::<T>(&r.cos)).transpose()?;
        let tasks = s.batch * h;
        let mut q = vec![T::zero(); tasks * n * dh];
        let mut k = vec![T::zero(); tasks * n * dh];
        let mut v = vec![T::zero(); tasks * n * dh];
        let mut p = vec![T::zero(); tasks * n * n];
        let mut out = vec![T::zero(); s.batch * n * d];
        let optr = SyncPtr(out.as_mut_ptr());
        let scale = T::c(1.0 / (dh as f64).sqrt());
        q.par_chunks_mut(n * dh)
            .zip(k.par_chunks_mut(n * dh))
            .zip(v.par_chunks_mut(n * dh).zip(p.par_chunks_mut(n * n)))
            .enumerate()
            .for_each(|(t, ((qb, kb), (vb, pb)))| {
                let (b, hh) = (t / h, t % h);
                split_heads(&x, b, hh, n, d, dh, qb, kb, vb);
                if let (Some(sin), Some(cos)) = (&sin, &cos) {
                    rope_rows(&mut qb[s.prefix * dh..], sin, cos, dh, false);
                    rope_rows(&mut kb[s.prefix * dh..], sin, cos, dh, false);
                }
                gemm_into(n, n, dh, pb, n, false, MatRef::rm(qb, dh), MatRef::rm_t(kb, dh), scale, false);
                softmax_rows_inplace(pb, n);
                let optr = optr;
                // SAFETY: task (b, hh) writes rows b*n..(b+1)*n, columns hh*dh..(hh+1)*dh only.
                let dst = unsafe { std::slice::from_raw_parts_mut(optr.0.add(b * n * d + hh * dh), (n - 1) * d + dh) };
                gemm_into(n, dh, n, dst, d, false, MatRef::rm(pb, n), MatRef::rm(vb, dh), T::one(), false);
            });
        let sh = (tasks, n, dh);
        let cache = AttnCache {
            shape: s,
            dim: d,
            q: from_vec(q, sh)?,
            k: from_vec(k, sh)?,
            v: from_vec(v, sh)?,
            probs: from_vec(p, (tasks, n, n))?,
            rope: rope.cloned(),
        };
        Ok((from_vec(out, (s.batch * n, d))?, cache))
    })
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn split_heads<T: Real>(x: &[T], b: usize, hh: usize, n: usize, d: usize, dh: usize, q: &mut [T], k: &mut [T], v: &mut [T]) {
    for i in 0..n {
        let row = &x[(b * n + i) * 3 * d..(b * n + i + 1) * 3 * d];
        q[i * dh..(i + 1) * dh].copy_from_slice(&row[hh * dh..(hh + 1) * dh]);
        k[i * dh..(i + 1) * dh].copy_from_slice(&row[d + hh * dh..d + (hh + 1) * dh]);
        v[i * dh..(i + 1) * dh].copy_from_slice(&row[2 * d + hh * dh..2 * d + (hh + 1) * dh]);
    }
}

/// Forward without a cache (teacher, Gram teacher, probes).
pub fn attention_infer(qkv: &Tensor, s: SeqShape, rope: Option<&Rope>) -> Result<Tensor> {
    let (d, dh) = check(qkv, &s, rope)?;
    let (n, h) = (s.tokens, s.heads);
    float_dispatch!(qkv.dtype(), T => {
        let x = view::<T>(qkv)?;
        let sin = rope.map(|r| view::<T>(&r.sin)).transpose()?;
        let cos = rope.map(|r| view::<T>(&r.cos)).transpose()?;
        let mut out = vec![T::zero(); s.batch * n * d];
        let optr = SyncPtr(out.as_mut_ptr());
        let scale = T::c(1.0 / (dh as f64).sqrt());
        (0..s.batch * h).into_par_iter().for_each_init(
            || (vec![T::zero(); n * dh], vec![T::zero(); n * dh], vec![T::zero(); n * dh], vec![T::zero(); n * n]),
            |(qb, kb, vb, pb), t| {
                let (b, hh) = (t / h, t % h);
                split_heads(&x, b, hh, n, d, dh, qb, kb, vb);
                if let (Some(sin), Some(cos)) = (&sin, &cos) {
                    rope_rows(&mut qb[s.prefix * dh..], sin, cos, dh, false);
                    rope_rows(&mut kb[s.prefix * dh..], sin, cos, dh, false);
                }
                gemm_into(n, n, dh, pb, n, false, MatRef::rm(qb, dh), MatRef::rm_t(kb, dh), scale, false);
                softmax_rows_inplace(pb, n);
                let optr = optr;
                // SAFETY: disjoint output window per task, as in `attention`.
                let dst = unsafe { std::slice::from_raw_parts_mut(optr.0.add(b * n * d + hh * dh), (n - 1) * d + dh) };
                gemm_into(n, dh, n, dst, d, false, MatRef::rm(pb, n), MatRef::rm(vb, dh), T::one(), false);
            },
        );
        from_vec(out, (s.batch * n, d))
    })
}

/// Gradient of [`attention`] with respect to its `qkv` input, `[batch * tokens, 3D]`.
pub fn attention_bwd(c: &AttnCache, dout: &Tensor) -> Result<Tensor> {
    let s = c.shape;
    let (n, h, d) = (s.tokens, s.heads, c.dim);
    let dh = d / h;
    float_dispatch!(dout.dtype(), T => {
        let g = view::<T>(dout)?;
        let q = view::<T>(&c.q)?;
        let k = view::<T>(&c.k)?;
        let v = view::<T>(&c.v)?;
        let p = view::<T>(&c.probs)?;
        let sin = c.rope.as_ref().map(|r| view::<T>(&r.sin)).transpose()?;
        let cos = c.rope.as_ref().map(|r| view::<T>(&r.cos)).transpose()?;
        let mut dqkv = vec![T::zero(); s.batch * n * 3 * d];
        let dptr = SyncPtr(dqkv.as_mut_ptr());
        let scale = T::c(1.0 / (dh as f64).sqrt());
        (0..s.batch * h).into_par_iter().for_each_init(
            || (vec![T::zero(); n * n], vec![T::zero(); n * dh], vec![T::zero(); n * dh], vec![T::zero(); n * dh]),
            |(dp, dq, dk, dv), t| {
                let (b, hh) = (t / h, t % h);
                let qb = &q[t * n * dh..(t + 1) * n * dh];
                let kb = &k[t * n * dh..(t + 1) * n * dh];
                let vb = &v[t * n * dh..(t + 1) * n * dh];
                let pb = &p[t * n * n..(t + 1) * n * n];
                let go = MatRef::strided(&g[b * n * d + hh * dh..], d, 1);
                // dV = P^T dO ; dP = dO V^T
                gemm_into(n, dh, n, dv, dh, false, MatRef::rm_t(pb, n), go, T::one(), false);
                gemm_into(n, n, dh, dp, n, false, go, MatRef::rm_t(vb, dh), T::one(), false);
                softmax_bwd_rows(pb, dp, n, scale);
                // dQ = dS K ; dK = dS^T Q (scale folded into dS)
                gemm_into(n, dh, n, dq, dh, false, MatRef::rm(dp, n), MatRef::rm(kb, dh), T::one(), false);
                gemm_into(n, dh, n, dk, dh, false, MatRef::rm_t(dp, n), MatRef::rm(qb, dh), T::one(), false);
                if let (Some(sin), Some(cos)) = (&sin, &cos) {
                    rope_rows(&mut dq[s.prefix * dh..], sin, cos, dh, true);
                    rope_rows(&mut dk[s.prefix * dh..], sin, cos, dh, true);
                }
                let dptr = dptr;
                for i in 0..n {
                    let row = (b * n + i) * 3 * d;
                    // SAFETY: task (b, hh) writes only the hh-th head columns of its own rows.
                    unsafe {
                        let base = dptr.0.add(row);
                        std::slice::from_raw_parts_mut(base.add(hh * dh), dh).copy_from_slice(&dq[i * dh..(i + 1) * dh]);
                        std::slice::from_raw_parts_mut(base.add(d + hh * dh), dh).copy_from_slice(&dk[i * dh..(i + 1) * dh]);
                        std::slice::from_raw_parts_mut(base.add(2 * d + hh * dh), dh).copy_from_slice(&dv[i * dh..(i + 1) * dh]);
                    }
                }
            },
        );
        from_vec(dqkv, (s.batch * n, 3 * d))
    })
}
