//! Fused, in-place optimizer arithmetic: the AdamW update (PyTorch semantics, decoupled
//! weight decay, bias correction), the EMA lerp and gradient scaling. One pass over
//! memory per parameter, parallel over fixed chunks.

use candle_core::Result;
#[allow(unused_imports)]
use num_traits::{Float, One, Zero};
use rayon::prelude::*;
use std::cell::RefCell;

use crate::float_dispatch;
use crate::host::{inplace, inplace2};
use crate::real::Real;
use crate::simd::simd_kernel;

/// Hyper-parameters of one AdamW update of one parameter tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate for this parameter (schedule times its multiplier).
    pub lr: f64,
    /// Weight decay for this parameter (schedule times its multiplier).
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// The 1-based step count used for bias correction.
    pub t: u64,
}

const CHUNK: usize = 1 << 14;

simd_kernel! {
    #[allow(clippy::too_many_arguments)]
    fn adamw_k<T>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], decay: T, b1: T, b2: T, step: T, bc2_sqrt: T, eps: T) {
        let one = T::one();
        for i in 0..p.len() {
            let gi = g[i];
            let mi = b1 * m[i] + (one - b1) * gi;
            let vi = b2 * v[i] + (one - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() / bc2_sqrt + eps;
            p[i] = p[i] * decay - step * mi / denom;
        }
    }
}

/// One AdamW update of `param` in place, with the moments `m`, `v` held on the host.
/// `grad` is read-only. Matches `torch.optim.AdamW` (the PyTorch formula, evaluated in `T`).
pub fn adamw_update<T: Real>(
    param: &candle_core::Tensor,
    grad: &candle_core::Tensor,
    m: &mut [T],
    v: &mut [T],
    h: &AdamWStep,
) -> Result<()> {
    if !param.device().is_cpu() {
        candle_core::bail!(
            "adamw_update: the parameter is on {:?}; device parameters keep their moments \
             on the device (use adamw_update_tensors)",
            param.device()
        )
    }
    let state = RefCell::new((m, v));
    let bc1 = 1.0 - h.beta1.powi(h.t as i32);
    let bc2 = 1.0 - h.beta2.powi(h.t as i32);
    let decay = T::c(1.0 - h.lr * h.weight_decay);
    let step = T::c(h.lr / bc1);
    let bc2s = T::c(bc2.sqrt());
    let (b1, b2, eps) = (T::c(h.beta1), T::c(h.beta2), T::c(h.eps));
    inplace2::<T>(param, grad, |p, g| {
        let mut st = state.borrow_mut();
        let (m, v) = &mut *st;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((pc, gc), (mc, vc))| {
                adamw_k(pc, gc, mc, vc, decay, b1, b2, step, bc2s, eps)
            });
    })
}

/// One AdamW update of `param` in place with the moments held as tensors beside it
/// (device parameters); the new moments replace `m`, `v` (fresh tensors, so a clone of
/// the old ones keeps its values). The arithmetic is [`crate::portable::adamw_update`]'s;
/// on the CPU the host-slice [`adamw_update`] is the fused path.
pub fn adamw_update_tensors(
    param: &candle_core::Tensor,
    grad: &candle_core::Tensor,
    m: &mut candle_core::Tensor,
    v: &mut candle_core::Tensor,
    h: &AdamWStep,
) -> Result<()> {
    let (p, m2, v2) = crate::portable::adamw_update(param, grad, m, v, h)?;
    crate::portable::write_into(param, &p)?;
    *m = m2;
    *v = v2;
    Ok(())
}

/// `teacher <- m * teacher + (1 - m) * student`, in place on `teacher`.
pub fn ema_update(
    teacher: &candle_core::Tensor,
    student: &candle_core::Tensor,
    momentum: f64,
) -> Result<()> {
    if crate::portable::active(teacher) {
        let t = crate::portable::ema_update(teacher, student, momentum)?;
        return crate::portable::write_into(teacher, &t);
    }
    float_dispatch!(teacher.dtype(), T => {
        let (a, b) = (T::c(momentum), T::c(1.0 - momentum));
        inplace2::<T>(teacher, student, |t, s| {
            t.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK)).for_each(|(tc, sc)| {
                for i in 0..tc.len() { tc[i] = a * tc[i] + b * sc[i]; }
            })
        })
    })
}

/// `x <- s * x` in place.
pub fn scale_inplace(x: &candle_core::Tensor, s: f64) -> Result<()> {
    if crate::portable::active(x) {
        return crate::portable::scale_inplace(x, s);
    }
    float_dispatch!(x.dtype(), T => {
        let s = T::c(s);
        inplace::<T>(x, |d| d.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s)))
    })
}

/// Copies `src` into `dst` in place (same shape and dtype).
pub fn copy_into(dst: &candle_core::Tensor, src: &candle_core::Tensor) -> Result<()> {
    if crate::portable::active(dst) {
        return crate::portable::copy_into(dst, src);
    }
    float_dispatch!(dst.dtype(), T => inplace2::<T>(dst, src, |d, s| d.copy_from_slice(s)))
}
