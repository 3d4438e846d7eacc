//! The recipe's losses and their building blocks: Sinkhorn-Knopp centering, soft-target
//! cross-entropy (DINO and iBOT), KoLeo, the Gram loss and bicubic resizing of patch
//! features. Each training loss returns its value and the gradient of that value with
//! respect to the student-side input; teacher-side inputs never get gradients.

#[allow(unused_imports)]
use num_traits::{Float, One, Zero};
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use crate::float_dispatch;
use crate::host::{from_vec, view};
use crate::linalg::{gemm_into, MatRef};
use crate::nn::{l2_normalize, l2_normalize_bwd, rows_dim};
use crate::real::Real;

/// Sinkhorn-Knopp centering of teacher logits `[n, k]` at temperature `temp`, as the
/// official code does it (no max subtraction, `iters` alternating normalisations).
/// Returns `[n, k]` rows that sum to one.
pub fn sinkhorn_knopp(logits: &Tensor, temp: f64, iters: usize) -> Result<Tensor> {
    let (n, k) = rows_dim(logits)?;
    float_dispatch!(logits.dtype(), T => {
        let l = view::<T>(logits)?;
        let inv_t = T::c(1.0 / temp);
        // q[i, j] with i over samples (the transpose of the official K x N layout).
        let mut q: Vec<T> = l.iter().map(|&v| (v * inv_t).exp()).collect();
        let total = q.iter().fold(T::zero(), |a, &b| a + b);
        q.iter_mut().for_each(|v| *v = *v / total);
        let (nt, kt) = (T::c(n as f64), T::c(k as f64));
        let mut colsum = vec![T::zero(); k];
        for _ in 0..iters {
            // rows of the official Q are prototypes: normalise each prototype's mass to 1/K.
            colsum.iter_mut().for_each(|c| *c = T::zero());
            for r in q.chunks(k) { for j in 0..k { colsum[j] = colsum[j] + r[j]; } }
            for r in q.chunks_mut(k) { for j in 0..k { r[j] = r[j] / colsum[j] / kt; } }
            // columns of the official Q are samples: each sample's mass to 1/N.
            for r in q.chunks_mut(k) {
                let s = r.iter().fold(T::zero(), |a, &b| a + b);
                r.iter_mut().for_each(|v| *v = *v / s / nt);
            }
        }
        q.iter_mut().for_each(|v| *v = *v * nt);
        from_vec(q, logits.shape().clone())
    })
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
    let (rows, k) = rows_dim(student)?;
    let (trows, k2) = rows_dim(targets)?;
    if k != k2 || pairs.len() != rows || grad_scale.len() != rows {
        bail!("soft_cross_entropy: student {:?}, targets {:?}, {} pairs", student.dims(), targets.dims(), pairs.len())
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
            .par_chunks_mut(k)
            .enumerate()
            .map(|(r, g)| {
                if pairs[r].is_empty() {
                    return 0.0;
                }
                let sr = &s[r * k..(r + 1) * k];
                let m = sr.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a }) * inv_t;
                let mut z = T::zero();
                for &v in sr { z = z + (v * inv_t - m).vexp(); }
                let lse = m + z.ln();
                // combined target and its mass
                let mut loss = T::zero();
                let mut mass = T::zero();
                for j in 0..k { g[j] = T::zero(); }
                for &(ti, w) in &pairs[r] {
                    let w = T::c(w);
                    let tr = &t[ti * k..(ti + 1) * k];
                    for j in 0..k {
                        let ls = sr[j] * inv_t - lse;
                        loss = loss - w * tr[j] * ls;
                        mass = mass + w * tr[j];
                        g[j] = g[j] + w * tr[j];
                    }
                }
                let gs = T::c(grad_scale[r]) * inv_t;
                for j in 0..k {
                    let p = (sr[j] * inv_t - lse).vexp();
                    g[j] = (p * mass - g[j]) * gs;
                }
                loss.f()
            })
            .collect();
        Ok((losses, from_vec(grad, student.shape().clone())?))
    })
}

/// KoLeo on one crop's features `[n, d]`: `-mean_i log(||x_i - x_nn(i) + 1e-8|| + 1e-8)`
/// on L2-normalised rows (eps 1e-8), nearest neighbour by dot product with the diagonal
/// excluded. Returns the loss and `d loss / d x`.
pub fn koleo(x: &Tensor) -> Result<(f64, Tensor)> {
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
                dist2 = dist2 + diff[c] * diff[c];
            }
            let dist = dist2.sqrt();
            loss -= (dist + eps).ln().f();
            // d(-log(dist + eps))/d dist = -1/(dist + eps); mean over n
            let gd = -inv_n / (dist + eps);
            if dist > T::zero() {
                for c in 0..d {
                    let gc = gd * diff[c] / dist;
                    dy[i * d + c] = dy[i * d + c] + gc;
                    dy[nn * d + c] = dy[nn * d + c] - gc;
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
pub fn gram_loss(student: &Tensor, target: &Tensor, n_img: usize, per_image: bool) -> Result<(f64, Tensor)> {
    let (rows, d) = rows_dim(student)?;
    if target.dims() != student.dims() || rows % n_img != 0 {
        bail!("gram_loss: student {:?} vs target {:?} for {n_img} images", student.dims(), target.dims())
    }
    let (groups, p) = if per_image { (n_img, rows / n_img) } else { (1, rows) };
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
                    *a = *a - b;
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
pub fn resize_tokens(x: &Tensor, n_img: usize, hw_in: (usize, usize), hw_out: (usize, usize)) -> Result<Tensor> {
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
pub fn resize_tokens_bwd(g: &Tensor, n_img: usize, hw_in: (usize, usize), hw_out: (usize, usize)) -> Result<Tensor> {
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
