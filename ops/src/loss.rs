//! The recipe's losses and their building blocks: Sinkhorn-Knopp centering, soft-target
//! cross-entropy (DINO and iBOT), KoLeo, the Gram loss and bicubic resizing of patch
//! features. Each training loss returns its value and the gradient of that value with
//! respect to the student-side input; teacher-side inputs never get gradients.

use candle_core::{bail, Result, Tensor};
#[allow(unused_imports)]
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::float_dispatch;
use crate::host::{from_vec, view};
use crate::linalg::{gemm_into, MatRef};
use crate::nn::{
    l2_normalize, l2_normalize_bwd, lane_dot, lane_max, lane_sum, rows_dim, sum_partials,
    PAR_ELEMS, ROW_CHUNK,
};
use crate::real::Real;
use crate::simd::simd_kernel;

/// Sinkhorn-Knopp centering of teacher logits `[n, k]` at temperature `temp`, as the
/// official code does it (no max subtraction, `iters` alternating normalisations).
/// Returns `[n, k]` rows that sum to one. Parallel over row chunks; the column sums are
/// per-chunk partial sums added in chunk order and the row sums use fixed lanes, so the
/// result does not depend on the number of threads.
pub fn sinkhorn_knopp(logits: &Tensor, temp: f64, iters: usize) -> Result<Tensor> {
    if crate::portable::active(logits) {
        return crate::portable::sinkhorn_knopp(logits, temp, iters);
    }
    let (n, k) = rows_dim(logits)?;
    float_dispatch!(logits.dtype(), T => {
        let l = view::<T>(logits)?;
        let inv_t = T::c(1.0 / temp);
        let chunk = k.max(1) * ROW_CHUNK;
        // q[i, j] with i over samples (the transpose of the official K x N layout).
        let mut q = vec![T::zero(); n * k];
        let parts: Vec<T> = q
            .par_chunks_mut(chunk)
            .zip(l.par_chunks(chunk))
            .map(|(qc, lc)| sk_exp(lc, inv_t, qc))
            .collect();
        let total = parts.iter().fold(T::zero(), |a, &b| a + b);
        let (nt, kt) = (T::c(n as f64), T::c(k as f64));
        // column sums of q / total, in chunk order
        let col_sums = |q: &[T], pre: T| -> Vec<T> {
            let parts: Vec<Vec<T>> = q
                .par_chunks(chunk)
                .map(|qc| {
                    let mut p = vec![T::zero(); k];
                    sk_colsum(qc, pre, &mut p);
                    p
                })
                .collect();
            sum_partials(parts, k)
        };
        let inv_total = T::one() / total;
        // the first normalisation (q /= total) is folded into the first column pass
        let mut pre = inv_total;
        for _ in 0..iters {
            // rows of the official Q are prototypes: normalise each prototype's mass to 1/K;
            // columns are samples: then each sample's mass to 1/N.
            let colsum = col_sums(&q, pre);
            q.par_chunks_mut(chunk).for_each(|qc| sk_normalise(qc, pre, &colsum, kt, nt));
            pre = T::one();
        }
        if iters == 0 {
            q.par_chunks_mut(PAR_ELEMS).for_each(|c| c.iter_mut().for_each(|v| *v *= inv_total));
        }
        q.par_chunks_mut(PAR_ELEMS).for_each(|c| c.iter_mut().for_each(|v| *v *= nt));
        from_vec(q, logits.shape().clone())
    })
}

/// Sinkhorn-Knopp over samples spread across a group of processes, as the official
/// distributed code does it: `logits` are this member's `[n, k]` rows, and `reduce` sums
/// a vector element-wise over the group in place (all-reduce). The total mass, the
/// prototypes' masses and the sample count `N_total` are group-wide; each sample's row is
/// normalised locally. Every member calls `reduce` exactly `2 + iters` times, in the same
/// order, whatever its `n` (a member with no rows still takes part). Host arithmetic in
/// f64; the result has the dtype and device of `logits`. With a `reduce` that does nothing
/// it is [`sinkhorn_knopp`] (up to rounding).
pub fn sinkhorn_knopp_group(
    logits: &Tensor,
    temp: f64,
    iters: usize,
    reduce: &mut dyn FnMut(&mut [f64]) -> Result<()>,
) -> Result<Tensor> {
    let (n, k) = rows_dim(logits)?;
    let l: Vec<f64> = logits
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let inv_t = 1.0 / temp;
    let mut q: Vec<f64> = l.iter().map(|v| (v * inv_t).exp()).collect();
    let mut head = [n as f64, q.iter().sum::<f64>()];
    reduce(&mut head)?;
    let (n_total, total) = (head[0], head[1]);
    let mut colsum = vec![0.0; k];
    if n_total > 0.0 {
        q.iter_mut().for_each(|v| *v /= total);
    }
    for _ in 0..iters {
        colsum.iter_mut().for_each(|c| *c = 0.0);
        for row in q.chunks_exact(k.max(1)) {
            for (c, v) in colsum.iter_mut().zip(row) {
                *c += v;
            }
        }
        reduce(&mut colsum)?;
        for row in q.chunks_exact_mut(k.max(1)) {
            for (v, c) in row.iter_mut().zip(&colsum) {
                *v = *v / c / k as f64;
            }
            let rs: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v = *v / rs / n_total);
        }
    }
    q.iter_mut().for_each(|v| *v *= n_total);
    Tensor::from_vec(q, (n, k), &candle_core::Device::Cpu)?
        .to_dtype(logits.dtype())?
        .to_device(logits.device())
}

simd_kernel! {
    /// `q = exp(l * inv_t)` on a chunk of rows; returns the chunk's sum (fixed lanes).
    fn sk_exp<T>(l: &[T], inv_t: T, q: &mut [T]) -> T {
        for i in 0..q.len() { q[i] = (l[i] * inv_t).vexp(); }
        lane_sum(q)
    }
}

simd_kernel! {
    /// Adds `pre * q` of every row of the chunk into `colsum` (`pre` folds in `1 / total`).
    fn sk_colsum<T>(q: &[T], pre: T, colsum: &mut [T]) {
        let k = colsum.len();
        for r in q.chunks_exact(k) {
            for j in 0..k { colsum[j] += r[j] * pre; }
        }
    }
}

simd_kernel! {
    /// `q = q * pre / colsum / K`, then each row `q = q / rowsum / N`.
    fn sk_normalise<T>(q: &mut [T], pre: T, colsum: &[T], kt: T, nt: T) {
        let k = colsum.len();
        for r in q.chunks_exact_mut(k) {
            for j in 0..k { r[j] = r[j] * pre / colsum[j] / kt; }
            let s = lane_sum(r);
            for v in r.iter_mut() { *v = *v / s / nt; }
        }
    }
}

/// Soft-target cross-entropy `-sum_k t_k log_softmax(s / temp)_k` where each student row
/// `r` is paired with any number of target rows: `pairs[r] = [(target_row, weight), ..]`.
/// Returns the weighted loss of every student row and the gradient of
/// `sum_r grad_scale[r] * loss[r]` with respect to the student logits.
pub fn soft_cross_entropy(
    student: &Tensor,
    targets: &Tensor,
    pairs: &[Vec<(usize, f64)>],
    temp: f64,
    grad_scale: &[f64],
) -> Result<(Vec<f64>, Tensor)> {
    if crate::portable::active(student) {
        return crate::portable::soft_cross_entropy(student, targets, pairs, temp, grad_scale);
    }
    let (rows, k) = rows_dim(student)?;
    let (trows, k2) = rows_dim(targets)?;
    if k != k2 || pairs.len() != rows || grad_scale.len() != rows {
        bail!(
            "soft_cross_entropy: student {:?}, targets {:?}, {} pairs",
            student.dims(),
            targets.dims(),
            pairs.len()
        )
    }
    if pairs.iter().flatten().any(|&(t, _)| t >= trows) {
        bail!("soft_cross_entropy: target row out of range")
    }
    float_dispatch!(student.dtype(), T => {
        let s = view::<T>(student)?;
        let t = view::<T>(targets)?;
        let mut grad = vec![T::zero(); rows * k];
        let inv_t = T::c(1.0 / temp);
        let losses: Vec<f64> = grad
            .par_chunks_mut(k.max(1))
            .enumerate()
            .map_init(
                || vec![T::zero(); k],
                |e, (r, g)| {
                    if pairs[r].is_empty() {
                        return 0.0;
                    }
                    let sr = &s[r * k..(r + 1) * k];
                    // e = exp(s / T - max), z = sum e, lse = max + ln z
                    let (m, z) = ce_softmax(sr, inv_t, e);
                    let lse = m + z.ln();
                    // combined target sum_pairs w t (in g), its mass and the loss
                    // -sum_j t_j (s_j / T - lse) = lse sum_j t_j - dot(t, s) / T
                    let mut loss = T::zero();
                    let mut mass = T::zero();
                    for (pi, &(ti, w)) in pairs[r].iter().enumerate() {
                        let w = T::c(w);
                        let tr = &t[ti * k..(ti + 1) * k];
                        let (tsum, tdot) = ce_accumulate(tr, sr, w, pi == 0, g);
                        loss += w * (lse * tsum - tdot * inv_t);
                        mass += w * tsum;
                    }
                    ce_grad(e, T::one() / z, mass, T::c(grad_scale[r]) * inv_t, g);
                    loss.f()
                },
            )
            .collect();
        Ok((losses, from_vec(grad, student.shape().clone())?))
    })
}

simd_kernel! {
    /// `e = exp(s * inv_t - m)` with `m = max(s) * inv_t`; returns `(m, sum e)`.
    fn ce_softmax<T>(s: &[T], inv_t: T, e: &mut [T]) -> (T, T) {
        let m = lane_max(s) * inv_t;
        for j in 0..e.len() { e[j] = (s[j] * inv_t - m).vexp(); }
        (m, lane_sum(e))
    }
}

simd_kernel! {
    /// `g (=|+=) w t`; returns `(sum t, dot(t, s))`.
    fn ce_accumulate<T>(t: &[T], s: &[T], w: T, first: bool, g: &mut [T]) -> (T, T) {
        if first {
            for j in 0..g.len() { g[j] = w * t[j]; }
        } else {
            for j in 0..g.len() { g[j] += w * t[j]; }
        }
        (lane_sum(t), lane_dot(t, s))
    }
}

simd_kernel! {
    /// `g = (softmax * mass - g) * scale` with `softmax = e * inv_z`.
    fn ce_grad<T>(e: &[T], inv_z: T, mass: T, scale: T, g: &mut [T]) {
        for j in 0..g.len() { g[j] = (e[j] * inv_z * mass - g[j]) * scale; }
    }
}

/// KoLeo on one crop's features `[n, d]`: `-mean_i log(||x_i - x_nn(i) + 1e-8|| + 1e-8)`
/// on L2-normalised rows (eps 1e-8), nearest neighbour by dot product with the diagonal
/// excluded. Returns the loss and `d loss / d x`.
pub fn koleo(x: &Tensor) -> Result<(f64, Tensor)> {
    if crate::portable::active(x) {
        return crate::portable::koleo(x);
    }
    let (n, d) = rows_dim(x)?;
    if n < 2 {
        bail!("KoLeo needs at least 2 samples per crop, got {n}")
    }
    let (y, norms) = l2_normalize(x, 1e-8)?;
    let (loss, dy) = float_dispatch!(x.dtype(), T => {
        let ys = view::<T>(&y)?;
        let mut dots = vec![T::zero(); n * n];
        gemm_into(n, n, d, &mut dots, n, false, MatRef::rm(&ys, d), MatRef::rm_t(&ys, d), T::one(), true);
        let eps = T::c(1e-8);
        let mut dy = vec![T::zero(); n * d];
        let mut loss = 0.0f64;
        let inv_n = T::one() / T::c(n as f64);
        for i in 0..n {
            dots[i * n + i] = -T::one();
            let row = &dots[i * n..(i + 1) * n];
            let mut nn = 0;
            for j in 1..n { if row[j] > row[nn] { nn = j; } }
            let mut dist2 = T::zero();
            let mut diff = vec![T::zero(); d];
            for c in 0..d {
                diff[c] = ys[i * d + c] - ys[nn * d + c] + eps;
                dist2 += diff[c] * diff[c];
            }
            let dist = dist2.sqrt();
            loss -= (dist + eps).ln().f();
            // d(-log(dist + eps))/d dist = -1/(dist + eps); mean over n
            let gd = -inv_n / (dist + eps);
            if dist > T::zero() {
                for c in 0..d {
                    let gc = gd * diff[c] / dist;
                    dy[i * d + c] += gc;
                    dy[nn * d + c] -= gc;
                }
            }
        }
        (loss / n as f64, from_vec(dy, (n, d))?)
    });
    let dx = l2_normalize_bwd(&y, &norms, &dy, 1e-8)?;
    Ok((loss, dx))
}

/// Gram loss between student patches `[n_img, p, d]` (rows `img * p + i`) and target
/// patches of the same shape, both L2-normalised per token (eps 1e-12).
/// `per_image = true`: mean over images of the mean squared difference of the per-image
/// `p x p` Gram matrices. `false`: one `(n_img p) x (n_img p)` Gram over the batch.
/// Returns the loss and its gradient with respect to the (unnormalised) student patches.
pub fn gram_loss(
    student: &Tensor,
    target: &Tensor,
    n_img: usize,
    per_image: bool,
) -> Result<(f64, Tensor)> {
    if crate::portable::active(student) {
        return crate::portable::gram_loss(student, target, n_img, per_image);
    }
    let (rows, d) = rows_dim(student)?;
    if target.dims() != student.dims() || rows % n_img != 0 {
        bail!(
            "gram_loss: student {:?} vs target {:?} for {n_img} images",
            student.dims(),
            target.dims()
        )
    }
    let (groups, p) = if per_image {
        (n_img, rows / n_img)
    } else {
        (1, rows)
    };
    let (ys, norms) = l2_normalize(student, 1e-12)?;
    let (yt, _) = l2_normalize(target, 1e-12)?;
    let (loss, dys) = float_dispatch!(student.dtype(), T => {
        let s = view::<T>(&ys)?;
        let t = view::<T>(&yt)?;
        let denom = (groups * p * p) as f64;
        let mut dy = vec![T::zero(); rows * d];
        let parts: Vec<f64> = dy
            .par_chunks_mut(p * d)
            .enumerate()
            .map(|(gi, dyg)| {
                let sg = &s[gi * p * d..(gi + 1) * p * d];
                let tg = &t[gi * p * d..(gi + 1) * p * d];
                let mut diff = vec![T::zero(); p * p];
                gemm_into(p, p, d, &mut diff, p, false, MatRef::rm(sg, d), MatRef::rm_t(sg, d), T::one(), false);
                let mut gt = vec![T::zero(); p * p];
                gemm_into(p, p, d, &mut gt, p, false, MatRef::rm(tg, d), MatRef::rm_t(tg, d), T::one(), false);
                let mut sq = 0.0f64;
                for (a, &b) in diff.iter_mut().zip(&gt) {
                    *a -= b;
                    sq += (*a * *a).f();
                }
                // d/dX of sum (XX^T - G)^2 / denom = 4 (XX^T - G) X / denom (symmetric)
                gemm_into(p, d, p, dyg, d, false, MatRef::rm(&diff, p), MatRef::rm(sg, d), T::c(4.0 / denom), false);
                sq
            })
            .collect();
        (parts.iter().sum::<f64>() / denom, from_vec(dy, student.shape().clone())?)
    });
    let dx = l2_normalize_bwd(&ys, &norms, &dys, 1e-12)?;
    Ok((loss, dx))
}

/// Cubic-convolution weights (a = -0.75) of a 1-D resize from `n_in` to `n_out` samples,
/// PyTorch `interpolate(mode="bicubic", align_corners=False, antialias=False)` semantics:
/// source coordinate `(i + 0.5) * n_in / n_out - 0.5`, taps clamped to the border.
/// Returns a row-major `[n_out, n_in]` matrix.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f64> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let mut m = vec![0.0; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for i in 0..n_out {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let f = src.floor();
        let t = src - f;
        let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (tap, &wt) in w.iter().enumerate() {
            let idx = (f as i64 - 1 + tap as i64).clamp(0, n_in as i64 - 1) as usize;
            m[i * n_in + idx] += wt;
        }
    }
    m
}

/// The `[h_out * w_out, h_in * w_in]` matrix of a 2-D bicubic resize of a token grid.
pub fn bicubic_resize_matrix(hw_in: (usize, usize), hw_out: (usize, usize)) -> Vec<f64> {
    let mh = bicubic_matrix(hw_in.0, hw_out.0);
    let mw = bicubic_matrix(hw_in.1, hw_out.1);
    let (pin, pout) = (hw_in.0 * hw_in.1, hw_out.0 * hw_out.1);
    let mut m = vec![0.0; pout * pin];
    for i in 0..hw_out.0 {
        for j in 0..hw_out.1 {
            let row = &mut m[(i * hw_out.1 + j) * pin..(i * hw_out.1 + j + 1) * pin];
            for a in 0..hw_in.0 {
                let wa = mh[i * hw_in.0 + a];
                if wa == 0.0 {
                    continue;
                }
                for b in 0..hw_in.1 {
                    row[a * hw_in.1 + b] = wa * mw[j * hw_in.1 + b];
                }
            }
        }
    }
    m
}

/// Bicubically resizes per-image token grids: `x [n_img * h_in * w_in, d]` (rows
/// image-major, then row-major over the grid) to `[n_img * h_out * w_out, d]`.
pub fn resize_tokens(
    x: &Tensor,
    n_img: usize,
    hw_in: (usize, usize),
    hw_out: (usize, usize),
) -> Result<Tensor> {
    if crate::portable::active(x) {
        return crate::portable::resize_tokens(x, n_img, hw_in, hw_out);
    }
    let (rows, d) = rows_dim(x)?;
    let (pin, pout) = (hw_in.0 * hw_in.1, hw_out.0 * hw_out.1);
    if rows != n_img * pin {
        bail!("resize_tokens: {rows} rows for {n_img} grids of {hw_in:?}")
    }
    float_dispatch!(x.dtype(), T => {
        let m: Vec<T> = bicubic_resize_matrix(hw_in, hw_out).into_iter().map(T::c).collect();
        let xs = view::<T>(x)?;
        let mut out = vec![T::zero(); n_img * pout * d];
        out.par_chunks_mut(pout * d).enumerate().for_each(|(i, o)| {
            gemm_into(pout, d, pin, o, d, false, MatRef::rm(&m, pin), MatRef::rm(&xs[i * pin * d..(i + 1) * pin * d], d), T::one(), false);
        });
        from_vec(out, (n_img * pout, d))
    })
}

/// Adjoint of [`resize_tokens`] (for gradient checks; the recipe only resizes the frozen
/// Gram teacher's features).
pub fn resize_tokens_bwd(
    g: &Tensor,
    n_img: usize,
    hw_in: (usize, usize),
    hw_out: (usize, usize),
) -> Result<Tensor> {
    if crate::portable::active(g) {
        return crate::portable::resize_tokens_bwd(g, n_img, hw_in, hw_out);
    }
    let (_, d) = rows_dim(g)?;
    let (pin, pout) = (hw_in.0 * hw_in.1, hw_out.0 * hw_out.1);
    float_dispatch!(g.dtype(), T => {
        let m: Vec<T> = bicubic_resize_matrix(hw_in, hw_out).into_iter().map(T::c).collect();
        let gs = view::<T>(g)?;
        let mut out = vec![T::zero(); n_img * pin * d];
        out.par_chunks_mut(pin * d).enumerate().for_each(|(i, o)| {
            gemm_into(pin, d, pout, o, d, false, MatRef::rm_t(&m, pin), MatRef::rm(&gs[i * pout * d..(i + 1) * pout * d], d), T::one(), false);
        });
        from_vec(out, (n_img * pin, d))
    })
}
