//! Network layers as explicit forward/backward pairs on row-major `[rows, dim]` tensors:
//! Linear, LayerNorm, exact GELU, LayerScale, L2 normalisation, row gathers and scatters,
//! patch unfolding and token assembly.
//!
//! Every forward returns what its backward needs (a cache); backward functions return
//! fresh gradient tensors and never touch their inputs. The CPU path runs fused,
//! vectorised, row-parallel kernels; reductions over rows are split into fixed-size chunks
//! summed in order, so results do not depend on the number of threads.

use candle_core::{bail, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::float_dispatch;
use crate::host::{assume_init_vec, from_vec, uninit_vec, view};
use crate::linalg::{gemm_new, gemm_raw, MatRef};
use crate::real::Real;
use crate::simd::simd_kernel;
use std::mem::MaybeUninit;

#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: used only to write disjoint rows from parallel tasks.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Rows per chunk for parallel loops and ordered partial reductions.
pub(crate) const ROW_CHUNK: usize = 32;

/// `(rows, dim)` of a tensor read as a matrix over its last dimension.
pub fn rows_dim(t: &Tensor) -> Result<(usize, usize)> {
    let dims = t.dims();
    let Some(&d) = dims.last() else {
        bail!("expected at least one dimension")
    };
    Ok((t.elem_count() / d.max(1), d))
}

/// Sums per-chunk partial vectors in chunk order (deterministic).
pub(crate) fn sum_partials<T: Real>(parts: Vec<Vec<T>>, d: usize) -> Vec<T> {
    let mut out = vec![T::zero(); d];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

// ----------------------------------------------------------------------------- Linear

/// `y = x W^T + b` for `x: [.., in]`, `w: [out, in]`, `b: [out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::linear(x, w, b);
    }
    let (m, k) = rows_dim(x)?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        bail!("linear: input dim {k} vs weight {:?}", w.dims())
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().unwrap() = n;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let ws = view::<T>(w)?;
        let (a, bm) = (MatRef::rm(&xs, k), MatRef::rm_t(&ws, k));
        let out = match b {
            None => gemm_new(m, n, k, a, bm, T::one(), true),
            Some(b) => {
                let bs = view::<T>(b)?;
                if bs.len() != n {
                    bail!("linear: bias {:?} for {n} outputs", b.dims())
                }
                // bias rows first, then the product accumulates onto them
                let mut out: Vec<T> = Vec::with_capacity(m * n);
                let ptr = SyncPtr(out.as_mut_ptr());
                (0..m.div_ceil(ROW_CHUNK)).into_par_iter().for_each(|c| {
                    for r in c * ROW_CHUNK..m.min((c + 1) * ROW_CHUNK) {
                        // SAFETY: row r < m lies inside the capacity; rows are disjoint.
                        unsafe { std::ptr::copy_nonoverlapping(bs.as_ptr(), ptr.get().add(r * n), n) };
                    }
                });
                // SAFETY: every element was written above; the product only adds to the
                // initialised window, after which the length covers initialised memory.
                unsafe {
                    gemm_raw(m, n, k, out.as_mut_ptr(), n, true, a, bm, T::one(), true);
                    out.set_len(m * n);
                }
                out
            }
        };
        from_vec(out, shape)
    })
}

/// Gradients of [`linear`]: `(dx if wanted, dW, db if the layer has a bias)`.
pub fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    has_bias: bool,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    if crate::portable::active(x) {
        return crate::portable::linear_bwd(x, w, dy, want_dx, has_bias);
    }
    let (m, k) = rows_dim(x)?;
    let (n, _) = w.dims2()?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let ws = view::<T>(w)?;
        let dys = view::<T>(dy)?;
        if dys.len() != m * n {
            bail!("linear_bwd: gradient {:?} for {m} rows of {n} outputs", dy.dims())
        }
        let dx = if want_dx {
            let dx = gemm_new(m, k, n, MatRef::rm(&dys, n), MatRef::rm(&ws, k), T::one(), true);
            Some(from_vec(dx, x.shape().clone())?)
        } else { None };
        let dw = gemm_new(n, k, m, MatRef::rm_t(&dys, n), MatRef::rm(&xs, k), T::one(), true);
        let db = if has_bias { Some(from_vec(col_sum::<T>(&dys, n), n)?) } else { None };
        Ok((dx, from_vec(dw, (n, k))?, db))
    })
}

/// The input gradient of [`linear`] alone, `dy W` (`[.., in]`, shaped like `x_shape`).
pub fn linear_dx(dy: &Tensor, w: &Tensor, x_shape: &Shape) -> Result<Tensor> {
    if crate::portable::active(dy) {
        return crate::portable::linear_dx(dy, w, x_shape);
    }
    let (m, n) = rows_dim(dy)?;
    let (n2, k) = w.dims2()?;
    if n != n2 || x_shape.elem_count() != m * k {
        bail!(
            "linear_dx: gradient {:?}, weight {:?}, input {x_shape:?}",
            dy.dims(),
            w.dims()
        )
    }
    float_dispatch!(dy.dtype(), T => {
        let dys = view::<T>(dy)?;
        let ws = view::<T>(w)?;
        let dx = gemm_new(m, k, n, MatRef::rm(&dys, n), MatRef::rm(&ws, k), T::one(), true);
        from_vec(dx, x_shape.clone())
    })
}

/// The weight gradient of [`linear`] alone, `dy^T x` (`[out, in]`).
pub fn linear_dw(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::linear_dw(x, dy);
    }
    let (m, k) = rows_dim(x)?;
    let (m2, n) = rows_dim(dy)?;
    if m != m2 {
        bail!(
            "linear_dw: input {:?} vs gradient {:?}",
            x.dims(),
            dy.dims()
        )
    }
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let dys = view::<T>(dy)?;
        let dw = gemm_new(n, k, m, MatRef::rm_t(&dys, n), MatRef::rm(&xs, k), T::one(), true);
        from_vec(dw, (n, k))
    })
}

/// Column sums of a `[.., d]` tensor (the bias gradient of a linear layer), `[d]`.
pub fn col_sums(x: &Tensor) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::col_sums(x);
    }
    let (_, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        from_vec(col_sum::<T>(&xs, d), d)
    })
}

/// Column sums of a row-major `[rows, d]` slice, chunked and ordered.
pub(crate) fn col_sum<T: Real>(a: &[T], d: usize) -> Vec<T> {
    let parts: Vec<Vec<T>> = a
        .par_chunks(d * ROW_CHUNK * 4)
        .map(|c| {
            let mut p = vec![T::zero(); d];
            col_sum_chunk(c, d, &mut p);
            p
        })
        .collect();
    sum_partials(parts, d)
}

simd_kernel! {
    fn col_sum_chunk<T>(a: &[T], d: usize, out: &mut [T]) {
        for r in a.chunks_exact(d) {
            for (o, &v) in out.iter_mut().zip(r) { *o += v; }
        }
    }
}

// -------------------------------------------------------------------------- LayerNorm

/// Per-row statistics kept by [`layer_norm`] for its backward pass.
pub struct LnCache {
    /// Row means, `[rows]`.
    pub mean: Tensor,
    /// Row reciprocal standard deviations `1/sqrt(var + eps)`, `[rows]`.
    pub rstd: Tensor,
}

/// LayerNorm over the last dimension (biased variance), `y = (x - mean) * rstd * w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, LnCache)> {
    if crate::portable::active(x) {
        return crate::portable::layer_norm(x, w, b, eps);
    }
    layer_norm_sel(x, None, w, b, eps)
}

/// [`layer_norm`] of the selected rows of `x` (all rows without a selection): output row
/// `i` is the normalised source row `sel.source_rows()[i]`, so a gather and a LayerNorm
/// happen in one pass. Output `[selected rows, d]`.
pub fn layer_norm_sel(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, LnCache)> {
    if crate::portable::active(x) {
        return crate::portable::layer_norm_sel(x, sel, w, b, eps);
    }
    let (rows, d) = rows_dim(x)?;
    let src = sel.map(|s| s.source_rows());
    if let Some(src) = &src {
        if src.iter().any(|&r| r >= rows) {
            bail!("layer_norm_sel: selection beyond {rows} rows")
        }
    }
    let out_rows = src.as_ref().map_or(rows, |s| s.len());
    let shape: Shape = if src.is_some() {
        (out_rows, d).into()
    } else {
        x.shape().clone()
    };
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let ws = view::<T>(w)?;
        let bs = view::<T>(b)?;
        let mut y = uninit_vec::<T>(out_rows * d);
        let mut mean = vec![T::zero(); out_rows];
        let mut rstd = vec![T::zero(); out_rows];
        let eps = T::c(eps);
        y.par_chunks_mut(d * ROW_CHUNK)
            .zip(mean.par_chunks_mut(ROW_CHUNK))
            .zip(rstd.par_chunks_mut(ROW_CHUNK))
            .enumerate()
            .for_each(|(ci, ((yc, mc), rc))| {
                for (r, yr) in yc.chunks_mut(d).enumerate() {
                    let i = ci * ROW_CHUNK + r;
                    let row = src.as_ref().map_or(i, |s| s[i]);
                    let (m, sd) = ln_row_fwd(&xs[row * d..(row + 1) * d], &ws, &bs, eps, yr);
                    mc[r] = m;
                    rc[r] = sd;
                }
            });
        let cache = LnCache { mean: from_vec(mean, out_rows)?, rstd: from_vec(rstd, out_rows)? };
        // SAFETY: every output row was written by `ln_row_fwd`.
        Ok((from_vec(unsafe { assume_init_vec(y) }, shape)?, cache))
    })
}

simd_kernel! {
    fn ln_row_fwd<T>(x: &[T], w: &[T], b: &[T], eps: T, y: &mut [MaybeUninit<T>]) -> (T, T) {
        let d = T::c(x.len() as f64);
        let mean = lane_sum(x) / d;
        let mut acc = [T::zero(); 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 { let v = c[i] - mean; acc[i] += v * v; }
        }
        let mut var = acc.iter().fold(T::zero(), |a, &b| a + b);
        for &v in chunks.remainder() { let v = v - mean; var += v * v; }
        let rstd = T::one() / (var / d + eps).sqrt();
        for i in 0..x.len() { y[i] = MaybeUninit::new((x[i] - mean) * rstd * w[i] + b[i]); }
        (mean, rstd)
    }
}

/// Largest element, with 16 independent lanes (vectorises; exact, so order-free).
#[inline(always)]
pub(crate) fn lane_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc
        .iter()
        .fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
    for &v in chunks.remainder() {
        m = if v > m { v } else { m };
    }
    m
}

/// Sum with 16 independent accumulators (vectorises; order fixed).
#[inline(always)]
pub(crate) fn lane_sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, &b| a + b);
    for &v in chunks.remainder() {
        s += v;
    }
    s
}

/// Dot product with 16 independent accumulators.
#[inline(always)]
pub(crate) fn lane_dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, &b| a + b);
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// Gradients of [`layer_norm`]: `(dx, dw, db)`.
pub fn layer_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if crate::portable::active(x) {
        return crate::portable::layer_norm_bwd(x, w, cache, dy);
    }
    let (rows, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let mut dx = vec![T::zero(); rows * d];
        let (dw, db) = ln_bwd_impl::<T>(x, None, w, cache, dy, &mut dx, false)?;
        Ok((from_vec(dx, x.shape().clone())?, dw, db))
    })
}

/// Backward of [`layer_norm_sel`]: adds the input gradient of every selected row onto its
/// source row of `dx_acc` (same shape as `x`, updated in place; a row selected twice
/// would be a bug and is refused) and returns `(dw, db)`.
pub fn layer_norm_sel_bwd_into(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
    dx_acc: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if crate::portable::active(x) {
        return crate::portable::layer_norm_sel_bwd_into(x, sel, w, cache, dy, dx_acc);
    }
    if dx_acc.dims() != x.dims() {
        bail!(
            "layer_norm_sel_bwd_into: accumulator {:?} vs input {:?}",
            dx_acc.dims(),
            x.dims()
        )
    }
    float_dispatch!(x.dtype(), T => {
        let out = std::cell::RefCell::new(None);
        crate::host::inplace::<T>(dx_acc, |acc| {
            *out.borrow_mut() = Some(ln_bwd_impl::<T>(x, sel, w, cache, dy, acc, true));
        })?;
        out.into_inner().expect("the in-place op ran")
    })
}

/// Shared LayerNorm backward: row `i` of `dy` belongs to source row `src(i)` of `x`; its
/// input gradient is written (or added, with `accumulate`) to that row of `dx`.
fn ln_bwd_impl<T: Real>(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
    dx: &mut [T],
    accumulate: bool,
) -> Result<(Tensor, Tensor)> {
    let (rows, d) = rows_dim(x)?;
    let src = sel.map(|s| s.source_rows());
    let n = src.as_ref().map_or(rows, |s| s.len());
    if let Some(src) = &src {
        let mut seen = vec![false; rows];
        for &r in src {
            if r >= rows || std::mem::replace(&mut seen[r], true) {
                bail!("layer_norm backward: selection row {r} out of range or repeated")
            }
        }
    }
    if dy.elem_count() != n * d || cache.mean.elem_count() != n || dx.len() != rows * d {
        bail!(
            "layer_norm backward: gradient {:?} for {n} selected rows of width {d}",
            dy.dims()
        )
    }
    let xs = view::<T>(x)?;
    let ws = view::<T>(w)?;
    let ms = view::<T>(&cache.mean)?;
    let rs = view::<T>(&cache.rstd)?;
    let dys = view::<T>(dy)?;
    let dptr = SyncPtr(dx.as_mut_ptr());
    let parts: Vec<(Vec<T>, Vec<T>)> = (0..n.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|ci| {
            let mut dw = vec![T::zero(); d];
            let mut db = vec![T::zero(); d];
            for i in ci * ROW_CHUNK..n.min((ci + 1) * ROW_CHUNK) {
                let row = src.as_ref().map_or(i, |s| s[i]);
                // SAFETY: source rows are distinct (checked above), so each row of `dx` is
                // written by exactly one task; `row < rows` keeps the window in bounds.
                let dxr = unsafe { std::slice::from_raw_parts_mut(dptr.get().add(row * d), d) };
                let o = i * d;
                ln_row_bwd(
                    &xs[row * d..(row + 1) * d],
                    &ws,
                    ms[i],
                    rs[i],
                    &dys[o..o + d],
                    dxr,
                    &mut dw,
                    &mut db,
                    accumulate,
                );
            }
            (dw, db)
        })
        .collect();
    let (pw, pb): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    Ok((
        from_vec(sum_partials(pw, d), d)?,
        from_vec(sum_partials(pb, d), d)?,
    ))
}

simd_kernel! {
    #[allow(clippy::too_many_arguments)]
    fn ln_row_bwd<T>(x: &[T], w: &[T], mean: T, rstd: T, dy: &[T], dx: &mut [T], dw: &mut [T], db: &mut [T], accumulate: bool) {
        let d = x.len();
        let mut sg = [T::zero(); 16];
        let mut sgx = [T::zero(); 16];
        let mut i = 0;
        while i + 16 <= d {
            for l in 0..16 {
                let xh = (x[i + l] - mean) * rstd;
                let g = dy[i + l] * w[i + l];
                sg[l] += g;
                sgx[l] += g * xh;
                dw[i + l] += dy[i + l] * xh;
                db[i + l] += dy[i + l];
            }
            i += 16;
        }
        let mut s_g = sg.iter().fold(T::zero(), |a, &b| a + b);
        let mut s_gx = sgx.iter().fold(T::zero(), |a, &b| a + b);
        while i < d {
            let xh = (x[i] - mean) * rstd;
            let g = dy[i] * w[i];
            s_g += g;
            s_gx += g * xh;
            dw[i] += dy[i] * xh;
            db[i] += dy[i];
            i += 1;
        }
        let inv_d = T::one() / T::c(d as f64);
        let mg = s_g * inv_d;
        let mgx = s_gx * inv_d;
        if accumulate {
            for i in 0..d {
                let xh = (x[i] - mean) * rstd;
                dx[i] += rstd * (dy[i] * w[i] - mg - xh * mgx);
            }
        } else {
            for i in 0..d {
                let xh = (x[i] - mean) * rstd;
                dx[i] = rstd * (dy[i] * w[i] - mg - xh * mgx);
            }
        }
    }
}

// ------------------------------------------------------------------------------- GELU

pub(crate) const PAR_ELEMS: usize = 1 << 14;

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::gelu(x);
    }
    gelu_bias(x, None)
}

/// `gelu(x + b)` with the bias `b [d]` broadcast over the rows of `x [.., d]`: the bias add
/// of the preceding linear layer fused into the activation (`x` is the bias-free product).
pub fn gelu_bias(x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::gelu_bias(x, b);
    }
    let (_, d) = rows_dim(x)?;
    if b.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "gelu_bias: bias of {} elements for rows of {d}",
            b.map_or(0, |b| b.elem_count())
        )
    }
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let bs = b.map(view::<T>).transpose()?;
        let mut y = uninit_vec::<T>(xs.len());
        let chunk = d.max(1) * ROW_CHUNK;
        y.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                gelu_fwd_k(xr, bs.as_deref(), yr);
            }
        });
        // SAFETY: every chunk of rows was written by the kernel above.
        from_vec(unsafe { assume_init_vec(y) }, x.shape().clone())
    })
}

simd_kernel! {
    fn gelu_fwd_k<T>(x: &[T], b: Option<&[T]>, y: &mut [MaybeUninit<T>]) {
        let h = T::c(0.5);
        let r = T::c(std::f64::consts::FRAC_1_SQRT_2);
        match b {
            Some(b) => {
                for i in 0..y.len() {
                    let v = x[i] + b[i];
                    y[i] = MaybeUninit::new(h * v * (T::one() + (v * r).verf()));
                }
            }
            None => {
                for i in 0..y.len() {
                    let v = x[i];
                    y[i] = MaybeUninit::new(h * v * (T::one() + (v * r).verf()));
                }
            }
        }
    }
}

/// Gradient of [`gelu`] with respect to its input.
pub fn gelu_bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::gelu_bwd(x, dy);
    }
    Ok(gelu_bias_bwd_into(x, None, dy.copy()?)?.0)
}

/// Gradient of [`gelu_bias`]: `dy <- dy * gelu'(x + b)` with respect to `x`, computed in
/// place in `dy`'s storage, which is returned, and, with a bias, its gradient (the column
/// sums, accumulated in the same pass in row-chunk order). `dy` must own its storage
/// (e.g. a fresh gradient).
pub fn gelu_bias_bwd_into(
    x: &Tensor,
    b: Option<&Tensor>,
    dy: Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    if crate::portable::active(x) {
        return crate::portable::gelu_bias_bwd_into(x, b, dy);
    }
    let (_, d) = rows_dim(x)?;
    if dy.dims() != x.dims() || b.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "gelu backward: gradient {:?} for input {:?}",
            dy.dims(),
            x.dims()
        )
    }
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let bs = b.map(view::<T>).transpose()?;
        let chunk = d.max(1) * ROW_CHUNK;
        let parts = std::cell::RefCell::new(vec![]);
        crate::host::inplace::<T>(&dy, |g| {
            *parts.borrow_mut() = g
                .par_chunks_mut(chunk)
                .zip(xs.par_chunks(chunk))
                .map(|(gc, xc)| {
                    let mut p = vec![T::zero(); if bs.is_some() { d } else { 0 }];
                    for (gr, xr) in gc.chunks_mut(d).zip(xc.chunks(d)) {
                        gelu_bwd_k(xr, bs.as_deref(), gr, &mut p);
                    }
                    p
                })
                .collect();
        })?;
        let db = if b.is_some() { Some(from_vec(sum_partials(parts.into_inner(), d), d)?) } else { None };
        Ok((dy, db))
    })
}

simd_kernel! {
    fn gelu_bwd_k<T>(x: &[T], b: Option<&[T]>, dy: &mut [T], db: &mut [T]) {
        let h = T::c(0.5);
        let r = T::c(std::f64::consts::FRAC_1_SQRT_2);
        let inv_sqrt_2pi = T::c(0.398_942_280_401_432_7);
        let grad = |v: T, g: T| {
            let cdf = h * (T::one() + (v * r).verf());
            let pdf = inv_sqrt_2pi * (-h * v * v).vexp();
            g * (cdf + v * pdf)
        };
        match b {
            Some(b) => {
                for i in 0..dy.len() {
                    let g = grad(x[i] + b[i], dy[i]);
                    dy[i] = g;
                    db[i] += g;
                }
            }
            None => {
                for i in 0..dy.len() {
                    dy[i] = grad(x[i], dy[i]);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------- LayerScale

/// `y = x * gamma` (gamma broadcast over rows).
pub fn mul_row(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::mul_row(x, gamma);
    }
    let (_, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let gs = view::<T>(gamma)?;
        let mut y = vec![T::zero(); xs.len()];
        y.par_chunks_mut(d * ROW_CHUNK).zip(xs.par_chunks(d * ROW_CHUNK)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                for i in 0..d { yr[i] = xr[i] * gs[i]; }
            }
        });
        from_vec(y, x.shape().clone())
    })
}

/// Gradients of [`mul_row`]: `(dx = dy * gamma, dgamma = sum_rows(dy * x))`.
pub fn mul_row_bwd(x: &Tensor, gamma: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if crate::portable::active(x) {
        return crate::portable::mul_row_bwd(x, gamma, dy);
    }
    let (_, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let gs = view::<T>(gamma)?;
        let dys = view::<T>(dy)?;
        let mut dx = vec![T::zero(); xs.len()];
        let parts: Vec<Vec<T>> = dx
            .par_chunks_mut(d * ROW_CHUNK)
            .zip(xs.par_chunks(d * ROW_CHUNK).zip(dys.par_chunks(d * ROW_CHUNK)))
            .map(|(dxc, (xc, gc))| {
                let mut p = vec![T::zero(); d];
                for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    for i in 0..d {
                        dxr[i] = gr[i] * gs[i];
                        p[i] += gr[i] * xr[i];
                    }
                }
                p
            })
            .collect();
        Ok((from_vec(dx, x.shape().clone())?, from_vec(sum_partials(parts, d), d)?))
    })
}

// ---------------------------------------------------------------------- L2 normalise

/// `y = x / max(||x||, eps)` per row; returns `y` and the row norms `||x||`.
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if crate::portable::active(x) {
        return crate::portable::l2_normalize(x, eps);
    }
    let (rows, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let mut y = vec![T::zero(); xs.len()];
        let mut norms = vec![T::zero(); rows];
        let eps = T::c(eps);
        y.par_chunks_mut(d * ROW_CHUNK).zip(norms.par_chunks_mut(ROW_CHUNK)).enumerate().for_each(|(ci, (yc, nc))| {
            for (r, yr) in yc.chunks_mut(d).enumerate() {
                let o = (ci * ROW_CHUNK + r) * d;
                let xr = &xs[o..o + d];
                let n = lane_dot(xr, xr).sqrt();
                nc[r] = n;
                let inv = T::one() / n.max(eps);
                for i in 0..d { yr[i] = xr[i] * inv; }
            }
        });
        Ok((from_vec(y, x.shape().clone())?, from_vec(norms, rows)?))
    })
}

/// Gradient of [`l2_normalize`]: `dx = (dy - y (y . dy)) / ||x||` where the norm exceeds
/// `eps`, else `dy / eps` (the clamp is constant there).
pub fn l2_normalize_bwd(y: &Tensor, norms: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::portable::active(y) {
        return crate::portable::l2_normalize_bwd(y, norms, dy, eps);
    }
    let (_, d) = rows_dim(y)?;
    float_dispatch!(y.dtype(), T => {
        let ys = view::<T>(y)?;
        let ns = view::<T>(norms)?;
        let dys = view::<T>(dy)?;
        let mut dx = vec![T::zero(); ys.len()];
        let eps = T::c(eps);
        dx.par_chunks_mut(d * ROW_CHUNK).enumerate().for_each(|(ci, dxc)| {
            for (r, dxr) in dxc.chunks_mut(d).enumerate() {
                let row = ci * ROW_CHUNK + r;
                let o = row * d;
                let (yr, gr) = (&ys[o..o + d], &dys[o..o + d]);
                let n = ns[row];
                if n > eps {
                    let dot = lane_dot(yr, gr);
                    let inv = T::one() / n;
                    for i in 0..d { dxr[i] = (gr[i] - yr[i] * dot) * inv; }
                } else {
                    let inv = T::one() / eps;
                    for i in 0..d { dxr[i] = gr[i] * inv; }
                }
            }
        });
        from_vec(dx, y.shape().clone())
    })
}

// ------------------------------------------------------------ elementwise combinations

/// `a + s * b` for tensors of equal shape.
pub fn axpy(a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    if crate::portable::active(a) {
        return crate::portable::axpy(a, b, s);
    }
    if a.dims() != b.dims() {
        bail!("axpy: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    float_dispatch!(a.dtype(), T => {
        let xs = view::<T>(a)?;
        let ys = view::<T>(b)?;
        let s = T::c(s);
        let mut out = vec![T::zero(); xs.len()];
        out.par_chunks_mut(PAR_ELEMS)
            .zip(xs.par_chunks(PAR_ELEMS).zip(ys.par_chunks(PAR_ELEMS)))
            .for_each(|(o, (x, y))| axpy_k(x, y, s, o));
        from_vec(out, a.shape().clone())
    })
}

simd_kernel! {
    fn axpy_k<T>(x: &[T], y: &[T], s: T, o: &mut [T]) {
        for i in 0..o.len() { o[i] = x[i] + s * y[i]; }
    }
}

/// `s * a`.
pub fn scale(a: &Tensor, s: f64) -> Result<Tensor> {
    if crate::portable::active(a) {
        return crate::portable::scale(a, s);
    }
    float_dispatch!(a.dtype(), T => {
        let xs = view::<T>(a)?;
        let s = T::c(s);
        let mut out = vec![T::zero(); xs.len()];
        out.par_chunks_mut(PAR_ELEMS).zip(xs.par_chunks(PAR_ELEMS)).for_each(|(o, x)| {
            for i in 0..o.len() { o[i] = x[i] * s; }
        });
        from_vec(out, a.shape().clone())
    })
}

// ------------------------------------------------------------------ row blocks (drop path)

/// A selection of row blocks of a `[rows, d]` matrix: block `i` is rows
/// `starts[i] .. starts[i] + lens[i]`, added back with weight `scales[i]`. Used for the
/// batch-subset residual dropping ("drop path") where each selected sample is a
/// contiguous block of tokens and the residual is rescaled by `batch / subset`.
#[derive(Clone, Debug)]
pub struct RowBlocks {
    /// First row of each block, in the order the blocks are gathered.
    pub starts: Vec<usize>,
    /// Rows per block, one entry per block.
    pub lens: Vec<usize>,
    /// Residual scale per block.
    pub scales: Vec<f64>,
}

impl RowBlocks {
    /// Total rows selected.
    pub fn rows(&self) -> usize {
        self.lens.iter().sum()
    }

    /// The source row of every selected row, in gather order.
    pub fn source_rows(&self) -> Vec<usize> {
        self.starts
            .iter()
            .zip(&self.lens)
            .flat_map(|(&s, &l)| s..s + l)
            .collect()
    }

    /// The residual scale of every selected row, in gather order.
    pub fn row_scales(&self) -> Vec<f64> {
        self.scales
            .iter()
            .zip(&self.lens)
            .flat_map(|(&s, &l)| std::iter::repeat_n(s, l))
            .collect()
    }
}

/// `(source row, scale)` of every selected row; every row with scale 1 without a selection.
fn selection(sel: Option<&RowBlocks>, rows: usize) -> Result<(Vec<usize>, Vec<f64>)> {
    let (src, sc) = match sel {
        Some(s) => (s.source_rows(), s.row_scales()),
        None => ((0..rows).collect(), vec![1.0; rows]),
    };
    let mut seen = vec![false; rows];
    for &r in &src {
        if r >= rows || std::mem::replace(&mut seen[r], true) {
            bail!("row selection: row {r} out of range (of {rows}) or repeated")
        }
    }
    Ok((src, sc))
}

/// The LayerScale'd residual update of drop path: `x + scatter(scale * ((r + bias) * gamma))`,
/// i.e. row `i` of the branch output `r` (laid out as the selection gathers; `bias`, the
/// bias of the branch's last linear layer, fused here) is multiplied by `gamma`, scaled by
/// its block's residual scale and added to its source row of `x`; other rows are copied.
/// Without a selection, `x + (r + bias) * gamma`. One parallel pass.
pub fn residual_add(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    gamma: &Tensor,
    r: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::residual_add(x, sel, gamma, r, bias);
    }
    let (rows, d) = rows_dim(x)?;
    let (src, scales) = selection(sel, rows)?;
    if r.elem_count() != src.len() * d || bias.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "residual_add: branch {:?} for {} selected rows of width {d}",
            r.dims(),
            src.len()
        )
    }
    let mut inv = vec![usize::MAX; rows];
    for (i, &row) in src.iter().enumerate() {
        inv[row] = i;
    }
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let rs = view::<T>(r)?;
        let gs = view::<T>(gamma)?;
        let bs = bias.map(view::<T>).transpose()?;
        let sc: Vec<T> = scales.iter().map(|&v| T::c(v)).collect();
        let mut out = uninit_vec::<T>(rows * d);
        out.par_chunks_mut(d * ROW_CHUNK).enumerate().for_each(|(ci, oc)| {
            for (k, orow) in oc.chunks_mut(d).enumerate() {
                let row = ci * ROW_CHUNK + k;
                let xr = &xs[row * d..(row + 1) * d];
                match inv[row] {
                    usize::MAX => residual_row(xr, None, &gs, bs.as_deref(), T::zero(), orow),
                    i => residual_row(xr, Some(&rs[i * d..(i + 1) * d]), &gs, bs.as_deref(), sc[i], orow),
                }
            }
        });
        // SAFETY: every row was written by `residual_row`.
        from_vec(unsafe { assume_init_vec(out) }, x.shape().clone())
    })
}

simd_kernel! {
    fn residual_row<T>(x: &[T], r: Option<&[T]>, gamma: &[T], bias: Option<&[T]>, s: T, out: &mut [MaybeUninit<T>]) {
        match (r, bias) {
            (None, _) => for i in 0..out.len() { out[i] = MaybeUninit::new(x[i]); },
            (Some(r), None) => for i in 0..out.len() { out[i] = MaybeUninit::new(x[i] + s * (r[i] * gamma[i])); },
            (Some(r), Some(b)) => for i in 0..out.len() {
                out[i] = MaybeUninit::new(x[i] + s * ((r[i] + b[i]) * gamma[i]));
            },
        }
    }
}

/// Gradients of [`residual_add`] for the branch: `(dr, dgamma, dbias)` with
/// `dr[i] = (scale_i * dy[src_i]) * gamma`, `dgamma = sum_i (scale_i * dy[src_i]) * (r[i] + bias)`
/// and, with a bias, `dbias = sum_i dr[i]` (accumulated in the same pass, in row-chunk
/// order). The gradient with respect to `x` is `dy` itself.
pub fn residual_add_bwd(
    dy: &Tensor,
    sel: Option<&RowBlocks>,
    gamma: &Tensor,
    r: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    if crate::portable::active(dy) {
        return crate::portable::residual_add_bwd(dy, sel, gamma, r, bias);
    }
    let (rows, d) = rows_dim(dy)?;
    let (src, scales) = selection(sel, rows)?;
    let n = src.len();
    if r.elem_count() != n * d || bias.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "residual_add_bwd: branch {:?} for {n} selected rows of width {d}",
            r.dims()
        )
    }
    float_dispatch!(dy.dtype(), T => {
        let gs = view::<T>(dy)?;
        let rs = view::<T>(r)?;
        let gm = view::<T>(gamma)?;
        let bs = bias.map(view::<T>).transpose()?;
        let sc: Vec<T> = scales.iter().map(|&v| T::c(v)).collect();
        let mut dr = uninit_vec::<T>(n * d);
        let parts: Vec<(Vec<T>, Vec<T>)> = dr
            .par_chunks_mut(d * ROW_CHUNK)
            .enumerate()
            .map(|(ci, dc)| {
                let mut p = vec![T::zero(); d];
                let mut pb = vec![T::zero(); d];
                for (k, drow) in dc.chunks_mut(d).enumerate() {
                    let i = ci * ROW_CHUNK + k;
                    let row = src[i];
                    residual_row_bwd(&gs[row * d..(row + 1) * d], &rs[i * d..(i + 1) * d], &gm, bs.as_deref(), sc[i], drow, &mut p, &mut pb);
                }
                (p, pb)
            })
            .collect();
        let shape: Shape = if sel.is_some() { (n, d).into() } else { r.shape().clone() };
        let (pg, pb): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        let dbias = if bias.is_some() { Some(from_vec(sum_partials(pb, d), d)?) } else { None };
        // SAFETY: every row of `dr` was written by `residual_row_bwd`.
        Ok((from_vec(unsafe { assume_init_vec(dr) }, shape)?, from_vec(sum_partials(pg, d), d)?, dbias))
    })
}

simd_kernel! {
    #[allow(clippy::too_many_arguments)]
    fn residual_row_bwd<T>(dy: &[T], r: &[T], gamma: &[T], bias: Option<&[T]>, s: T, dr: &mut [MaybeUninit<T>], dgamma: &mut [T], dbias: &mut [T]) {
        match bias {
            None => for i in 0..dr.len() {
                let t = dy[i] * s;
                dr[i] = MaybeUninit::new(t * gamma[i]);
                dgamma[i] += t * r[i];
            },
            Some(b) => for i in 0..dr.len() {
                let t = dy[i] * s;
                let g = t * gamma[i];
                dr[i] = MaybeUninit::new(g);
                dgamma[i] += t * (r[i] + b[i]);
                dbias[i] += g;
            },
        }
    }
}

/// Gathers the selected row blocks into a new `[sel.rows(), d]` tensor.
pub fn gather_blocks(x: &Tensor, sel: &RowBlocks) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::gather_blocks(x, sel);
    }
    let (_, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let mut out = Vec::with_capacity(sel.rows() * d);
        for (&s, &l) in sel.starts.iter().zip(&sel.lens) {
            out.extend_from_slice(&xs[s * d..(s + l) * d]);
        }
        from_vec(out, (sel.rows(), d))
    })
}

/// `x + scatter(scale * r)`: adds the rows of `r` (laid out as [`gather_blocks`] would),
/// times each block's scale, back onto the selected blocks of `x`; other rows are copied
/// unchanged. With `unscaled`, the scales are ignored (the adjoint of a plain gather).
pub fn scatter_add_blocks(
    x: &Tensor,
    sel: &RowBlocks,
    r: &Tensor,
    unscaled: bool,
) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::scatter_add_blocks(x, sel, r, unscaled);
    }
    let (_, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let rs = view::<T>(r)?;
        let mut out = xs.to_vec();
        let mut off = 0;
        for ((&s, &l), &sc) in sel.starts.iter().zip(&sel.lens).zip(&sel.scales) {
            let a = if unscaled { T::one() } else { T::c(sc) };
            let dst = &mut out[s * d..(s + l) * d];
            let src = &rs[off * d..(off + l) * d];
            for i in 0..dst.len() { dst[i] += a * src[i]; }
            off += l;
        }
        from_vec(out, x.shape().clone())
    })
}

/// The adjoint of [`scatter_add_blocks`] for `r`: each gathered block times its scale.
pub fn gather_blocks_scaled(dy: &Tensor, sel: &RowBlocks) -> Result<Tensor> {
    if crate::portable::active(dy) {
        return crate::portable::gather_blocks_scaled(dy, sel);
    }
    let (_, d) = rows_dim(dy)?;
    float_dispatch!(dy.dtype(), T => {
        let xs = view::<T>(dy)?;
        let mut out = Vec::with_capacity(sel.rows() * d);
        for ((&s, &l), &sc) in sel.starts.iter().zip(&sel.lens).zip(&sel.scales) {
            let sc = T::c(sc);
            out.extend(xs[s * d..(s + l) * d].iter().map(|&v| v * sc));
        }
        from_vec(out, (sel.rows(), d))
    })
}

// ---------------------------------------------------------------- patches and tokens

/// Unfolds images `[n, c, h, w]` into patch rows `[n * (h/p) * (w/p), c * p * p]`
/// (channel-major inside a patch, matching a `[D, c, p, p]` convolution weight).
pub fn im2col(images: &Tensor, p: usize) -> Result<Tensor> {
    if crate::portable::active(images) {
        return crate::portable::im2col(images, p);
    }
    let (n, c, h, w) = images.dims4()?;
    if h % p != 0 || w % p != 0 {
        bail!("image size {h}x{w} is not a multiple of the patch size {p}")
    }
    let (gh, gw) = (h / p, w / p);
    let cols = c * p * p;
    float_dispatch!(images.dtype(), T => {
        let xs = view::<T>(images)?;
        let mut out = vec![T::zero(); n * gh * gw * cols];
        out.par_chunks_mut(gh * gw * cols).enumerate().for_each(|(img, oc)| {
            let base = img * c * h * w;
            for i in 0..gh {
                for j in 0..gw {
                    let row = &mut oc[(i * gw + j) * cols..(i * gw + j + 1) * cols];
                    for ch in 0..c {
                        for ky in 0..p {
                            let src = base + ch * h * w + (i * p + ky) * w + j * p;
                            row[ch * p * p + ky * p..ch * p * p + ky * p + p].copy_from_slice(&xs[src..src + p]);
                        }
                    }
                }
            }
        });
        from_vec(out, (n * gh * gw, cols))
    })
}

/// Builds the token sequence `[CLS, R registers, P patches]` for each of `n` images from
/// patch embeddings `[n * P, D]`; rows whose mask byte is 1 take `mask_token` instead.
/// Output `[n * (1 + R + P), D]`.
pub fn assemble_tokens(
    patches: &Tensor,
    n: usize,
    cls: &Tensor,
    storage: &Tensor,
    mask_token: &Tensor,
    masks: Option<&[u8]>,
) -> Result<Tensor> {
    if crate::portable::active(patches) {
        return crate::portable::assemble_tokens(patches, n, cls, storage, mask_token, masks);
    }
    let (rows, d) = rows_dim(patches)?;
    let p = rows / n.max(1);
    let (r, _) = rows_dim(storage)?;
    let r = if storage.elem_count() == 0 { 0 } else { r };
    let nt = 1 + r + p;
    if let Some(m) = masks {
        if m.len() != rows {
            bail!(
                "assemble_tokens: {} mask entries for {rows} patches",
                m.len()
            )
        }
    }
    float_dispatch!(patches.dtype(), T => {
        let ps = view::<T>(patches)?;
        let cs = view::<T>(cls)?;
        let ss = view::<T>(storage)?;
        let ms = view::<T>(mask_token)?;
        let mut out = vec![T::zero(); n * nt * d];
        out.par_chunks_mut(nt * d).enumerate().for_each(|(b, o)| {
            o[..d].copy_from_slice(&cs[..d]);
            o[d..(1 + r) * d].copy_from_slice(&ss[..r * d]);
            for i in 0..p {
                let dst = &mut o[(1 + r + i) * d..(2 + r + i) * d];
                let masked = masks.map(|m| m[b * p + i] != 0).unwrap_or(false);
                if masked {
                    dst.copy_from_slice(&ms[..d]);
                } else {
                    dst.copy_from_slice(&ps[(b * p + i) * d..(b * p + i + 1) * d]);
                }
            }
        });
        from_vec(out, (n * nt, d))
    })
}

/// Gradients of [`assemble_tokens`]: `(dpatches, dcls [D], dstorage [R, D], dmask_token [D])`.
pub fn assemble_tokens_bwd(
    dtokens: &Tensor,
    n: usize,
    r: usize,
    masks: Option<&[u8]>,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    if crate::portable::active(dtokens) {
        return crate::portable::assemble_tokens_bwd(dtokens, n, r, masks);
    }
    let (rows, d) = rows_dim(dtokens)?;
    let nt = rows / n.max(1);
    let p = nt - 1 - r;
    float_dispatch!(dtokens.dtype(), T => {
        let g = view::<T>(dtokens)?;
        let mut dp = vec![T::zero(); n * p * d];
        let mut dc = vec![T::zero(); d];
        let mut ds = vec![T::zero(); r * d];
        let mut dm = vec![T::zero(); d];
        for b in 0..n {
            let o = &g[b * nt * d..(b + 1) * nt * d];
            for i in 0..d { dc[i] += o[i]; }
            for i in 0..r * d { ds[i] += o[d + i]; }
            for i in 0..p {
                let src = &o[(1 + r + i) * d..(2 + r + i) * d];
                if masks.map(|m| m[b * p + i] != 0).unwrap_or(false) {
                    for k in 0..d { dm[k] += src[k]; }
                } else {
                    dp[(b * p + i) * d..(b * p + i + 1) * d].copy_from_slice(src);
                }
            }
        }
        Ok((from_vec(dp, (n * p, d))?, from_vec(dc, d)?, from_vec(ds, (r, d))?, from_vec(dm, d)?))
    })
}

/// Selects rows `b * stride + offset + i` for `i < count` of every block `b < n`
/// (e.g. the CLS row or the patch rows of each image) into `[n * count, d]`.
pub fn select_rows(
    x: &Tensor,
    n: usize,
    stride: usize,
    offset: usize,
    count: usize,
) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::select_rows(x, n, stride, offset, count);
    }
    let (_, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let mut out = Vec::with_capacity(n * count * d);
        for b in 0..n {
            let s = (b * stride + offset) * d;
            out.extend_from_slice(&xs[s..s + count * d]);
        }
        from_vec(out, (n * count, d))
    })
}

/// Adds `g` (laid out as [`select_rows`] returns) into rows of `acc` (in a new tensor).
pub fn select_rows_bwd_add(
    acc: &Tensor,
    g: &Tensor,
    n: usize,
    stride: usize,
    offset: usize,
    count: usize,
) -> Result<Tensor> {
    if crate::portable::active(acc) {
        return crate::portable::select_rows_bwd_add(acc, g, n, stride, offset, count);
    }
    let (_, d) = rows_dim(acc)?;
    float_dispatch!(acc.dtype(), T => {
        let gs = view::<T>(g)?;
        let mut out = view::<T>(acc)?.to_vec();
        for b in 0..n {
            let s = (b * stride + offset) * d;
            let src = &gs[b * count * d..(b + 1) * count * d];
            for (o, &v) in out[s..s + count * d].iter_mut().zip(src) { *o += v; }
        }
        from_vec(out, acc.shape().clone())
    })
}

/// Adds `g` (laid out as [`select_rows`] returns) into the selected rows of `acc`, in place.
pub fn select_rows_add_into(
    acc: &Tensor,
    g: &Tensor,
    n: usize,
    stride: usize,
    offset: usize,
    count: usize,
) -> Result<()> {
    if crate::portable::active(acc) {
        return crate::portable::select_rows_add_into(acc, g, n, stride, offset, count);
    }
    let (rows, d) = rows_dim(acc)?;
    if g.elem_count() != n * count * d || (n > 0 && (n - 1) * stride + offset + count > rows) {
        bail!(
            "select_rows_add_into: {:?} into {:?} ({n} x {count} rows)",
            g.dims(),
            acc.dims()
        )
    }
    float_dispatch!(acc.dtype(), T => {
        let gs = view::<T>(g)?;
        crate::host::inplace::<T>(acc, |out| {
            for b in 0..n {
                let s = (b * stride + offset) * d;
                let src = &gs[b * count * d..(b + 1) * count * d];
                for (o, &v) in out[s..s + count * d].iter_mut().zip(src) {
                    *o += v;
                }
            }
        })
    })
}

/// Gathers arbitrary rows `[idx.len(), d]`.
pub fn index_rows(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::index_rows(x, idx);
    }
    let (rows, d) = rows_dim(x)?;
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let mut out = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            if i >= rows { bail!("index_rows: row {i} out of {rows}") }
            out.extend_from_slice(&xs[i * d..(i + 1) * d]);
        }
        from_vec(out, (idx.len(), d))
    })
}

/// Adjoint of [`index_rows`]: scatters (adds) `g` rows into a zero `[rows, d]` tensor.
pub fn index_rows_bwd(g: &Tensor, idx: &[usize], rows: usize) -> Result<Tensor> {
    if crate::portable::active(g) {
        return crate::portable::index_rows_bwd(g, idx, rows);
    }
    let (_, d) = rows_dim(g)?;
    float_dispatch!(g.dtype(), T => {
        let gs = view::<T>(g)?;
        let mut out = vec![T::zero(); rows * d];
        for (k, &i) in idx.iter().enumerate() {
            for j in 0..d { out[i * d + j] += gs[k * d + j]; }
        }
        from_vec(out, (rows, d))
    })
}

/// Concatenates matrices with the same number of columns along rows.
pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    if parts.first().is_some_and(|t| crate::portable::active(t)) {
        return crate::portable::cat_rows(parts);
    }
    Tensor::cat(parts, 0)
}

/// Sum of squares of all elements, accumulated in f64.
pub fn sum_sq(x: &Tensor) -> Result<f64> {
    if crate::portable::active(x) {
        return crate::portable::sum_sq(x);
    }
    float_dispatch!(x.dtype(), T => {
        let xs = view::<T>(x)?;
        let parts: Vec<f64> = xs.par_chunks(PAR_ELEMS).map(|c| lane_dot(c, c).f()).collect();
        Ok(parts.iter().sum())
    })
}
