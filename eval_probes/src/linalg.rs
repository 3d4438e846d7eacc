//! Host linear algebra the probes need: row-major f32 matrices whose products go through
//! `ops::nn::linear` (the gemm kernels, deterministic for any thread count), per-column
//! standardisation, row normalisation, and a symmetric eigensolver (Householder
//! tridiagonalisation + implicit QL, the EISPACK `tred2`/`tql2` pair as JAMA writes it)
//! for PCA pictures and the effective rank.

use candle_core::Tensor;

use crate::error::{ProbeError, Result};

/// A row-major `rows x cols` f32 matrix held as a CPU tensor, so products run on gemm.
#[derive(Clone)]
pub(crate) struct Mat {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    t: Tensor,
}

impl Mat {
    pub(crate) fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(ProbeError::shape(
                "matrix",
                format!("{} values for {rows}x{cols}", data.len()),
            ));
        }
        Ok(Self {
            rows,
            cols,
            t: ops::host::from_vec(data, (rows, cols))?,
        })
    }

    /// `self [m, k] * other [n, k]^T + bias [n]`, as a host vector `[m, n]`.
    pub(crate) fn mul_t(&self, other: &Mat, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        if self.cols != other.cols {
            return Err(ProbeError::shape(
                "matrix product",
                format!(
                    "{}x{} times ({}x{})^T",
                    self.rows, self.cols, other.rows, other.cols
                ),
            ));
        }
        if self.rows == 0 || other.rows == 0 {
            return Ok(vec![0.0; self.rows * other.rows]);
        }
        let b = match bias {
            Some(b) => Some(ops::host::from_vec(b.to_vec(), b.len())?),
            None => None,
        };
        let out = ops::nn::linear(&self.t, &other.t, b.as_ref())?;
        Ok(ops::host::to_vec::<f32>(&out)?)
    }
}

/// Transposes a row-major `rows x cols` slice.
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = a[r * cols + c];
        }
    }
    out
}

/// Per-column mean and standard deviation (f64 accumulation), with a floor on the std so
/// constant columns map to 0 instead of dividing by zero.
pub(crate) fn column_stats(x: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f64; cols];
    for r in x.chunks_exact(cols) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += f64::from(v);
        }
    }
    let n = rows.max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; cols];
    for r in x.chunks_exact(cols) {
        for ((s, &v), m) in var.iter_mut().zip(r).zip(&mean) {
            let d = f64::from(v) - m;
            *s += d * d;
        }
    }
    let std = var
        .iter()
        .map(|s| ((s / n).sqrt().max(1e-6)) as f32)
        .collect();
    (mean.iter().map(|&m| m as f32).collect(), std)
}

/// `(x - mean) / std` per column, in place.
pub(crate) fn standardize(x: &mut [f32], mean: &[f32], std: &[f32]) {
    let cols = mean.len();
    for r in x.chunks_exact_mut(cols) {
        for ((v, m), s) in r.iter_mut().zip(mean).zip(std) {
            *v = (*v - m) / s;
        }
    }
}

/// Rows scaled to unit L2 norm (rows of norm below 1e-12 become zero).
pub(crate) fn l2_rows(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for r in out.chunks_exact_mut(cols) {
        let n = r
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        let inv = if n > 1e-12 { (1.0 / n) as f32 } else { 0.0 };
        r.iter_mut().for_each(|v| *v *= inv);
    }
    out
}

/// Covariance of the rows of `x [rows, cols]` (divided by `rows`) and the column means.
pub(crate) fn covariance(x: &[f32], rows: usize, cols: usize) -> Result<(Vec<f64>, Vec<f32>)> {
    let (mean, _) = column_stats(x, rows, cols);
    let mut centred = x.to_vec();
    for r in centred.chunks_exact_mut(cols) {
        for (v, m) in r.iter_mut().zip(&mean) {
            *v -= m;
        }
    }
    let xt = Mat::new(transpose(&centred, rows, cols), cols, rows)?;
    let c = xt.mul_t(&xt, None)?;
    let n = rows.max(1) as f64;
    Ok((c.iter().map(|&v| f64::from(v) / n).collect(), mean))
}

/// Eigen-decomposition of a symmetric `n x n` matrix (row-major): eigenvalues in
/// descending order and the matching unit eigenvectors (`vectors[k]` has length `n`).
/// Each eigenvector's sign is fixed so that its largest-magnitude entry is positive.
pub(crate) fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    if a.len() != n * n {
        return Err(ProbeError::shape(
            "eigen",
            format!("{} values for {n}x{n}", a.len()),
        ));
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(ProbeError::shape("eigen", "matrix has non-finite entries"));
    }
    if n == 0 {
        return Ok((vec![], vec![]));
    }
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| 0.5 * (a[i * n + j] + a[j * n + i]))
                .collect()
        })
        .collect();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tred2(n, &mut v, &mut d, &mut e);
    tql2(n, &mut v, &mut d, &mut e)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]).then(i.cmp(&j)));
    let values = order.iter().map(|&k| d[k]).collect();
    let vectors = order
        .iter()
        .map(|&k| {
            let mut col: Vec<f64> = (0..n).map(|i| v[i][k]).collect();
            let big = col
                .iter()
                .copied()
                .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            if big < 0.0 {
                col.iter_mut().for_each(|x| *x = -*x);
            }
            col
        })
        .collect();
    Ok((values, vectors))
}

/// Householder reduction of the symmetric matrix in `v` to tridiagonal form (`d` the
/// diagonal, `e` the sub-diagonal); `v` becomes the accumulated orthogonal transform.
#[allow(clippy::needless_range_loop)]
fn tred2(n: usize, v: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64]) {
    d[..n].copy_from_slice(&v[n - 1][..n]);
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[i - 1][j];
                v[i][j] = 0.0;
                v[j][i] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for j in 0..i {
                e[j] = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[j][i] = f;
                g = e[j] + v[j][j] * f;
                for k in j + 1..i {
                    g += v[k][j] * d[k];
                    e[k] += v[k][j] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[k][j] -= f * e[k] + g * d[k];
                }
                d[j] = v[i - 1][j];
                v[i][j] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        v[n - 1][i] = v[i][i];
        v[i][i] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[k][i + 1] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[k][i + 1] * v[k][j];
                }
                for k in 0..=i {
                    v[k][j] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[k][i + 1] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[n - 1][j];
        v[n - 1][j] = 0.0;
    }
    v[n - 1][n - 1] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL iterations on the tridiagonal matrix from [`tred2`]: `d` becomes the
/// eigenvalues, the columns of `v` the eigenvectors.
fn tql2(n: usize, v: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64]) -> Result<()> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 100 {
                    return Err(ProbeError::shape("eigen", "QL iteration did not converge"));
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for row in v.iter_mut() {
                        h = row[i + 1];
                        row[i + 1] = s * row[i] + c * h;
                        row[i] = c * row[i] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

/// Effective rank (Roy and Vetterli 2007): `exp(H(p))` with `p_k = lambda_k / sum lambda`
/// over the non-negative eigenvalues. 1 for a rank-one spectrum, `n` for a flat one.
pub(crate) fn effective_rank(eigenvalues: &[f64]) -> f64 {
    let pos: Vec<f64> = eigenvalues.iter().map(|&l| l.max(0.0)).collect();
    let total: f64 = pos.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = pos
        .iter()
        .filter(|&&l| l > 0.0)
        .map(|&l| l / total)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}
