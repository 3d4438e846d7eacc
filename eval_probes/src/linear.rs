//! Multinomial logistic regression on frozen features, trained on the host: per-feature
//! standardisation with the training statistics (what the official probes' BatchNorm
//! does), an L2 penalty on the weights (not the biases), and L-BFGS with an Armijo
//! backtracking line search from a zero start for at most a fixed number of iterations.
//! Every step is a deterministic function of the inputs (the gemm products do not depend
//! on the thread count), so two fits on the same features give the same bits.
//!
//! Targets are either hard classes (the CLS probe) or per-row class distributions (the
//! dense probe's patch-level class histograms); both minimise the cross-entropy.

use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};
use crate::linalg::{column_stats, standardize, transpose, Mat};
use ops::real::exp_f32;
use rayon::prelude::*;

/// Rows per parallel chunk of the softmax pass.
const ROW_CHUNK: usize = 1024;

/// What each training row should predict.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// One class per row.
    Hard(&'a [u32]),
    /// A class distribution per row, `[n, n_classes]`, rows summing to 1.
    Soft(&'a [f32]),
}

/// Settings of one fit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitConfig {
    /// L2 penalty `l2 / 2 * ||W||^2` added to the mean cross-entropy.
    pub l2: f64,
    /// Most L-BFGS iterations.
    pub max_iters: usize,
}

/// How a fit ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// L-BFGS iterations taken.
    pub iterations: usize,
    /// Objective evaluations (each is two passes over the data).
    pub evaluations: usize,
    /// Final objective (mean cross-entropy + penalty).
    pub loss: f64,
    /// Final gradient max-norm.
    pub grad_norm: f64,
}

/// A trained linear classifier with its input standardisation.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxClassifier {
    /// Input width.
    pub dim: usize,
    /// Classes.
    pub n_classes: usize,
    /// Weights `[n_classes, dim]` on standardised inputs.
    pub weights: Vec<f32>,
    /// Biases `[n_classes]`.
    pub bias: Vec<f32>,
    /// Training means per input feature.
    pub mean: Vec<f32>,
    /// Training standard deviations per input feature.
    pub std: Vec<f32>,
}

impl SoftmaxClassifier {
    /// Logits `[n, n_classes]` of raw (unstandardised) rows `x [n, dim]`.
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() % self.dim.max(1) != 0 {
            return Err(ProbeError::shape(
                "classifier input",
                format!("{} values are not rows of width {}", x.len(), self.dim),
            ));
        }
        let n = x.len() / self.dim.max(1);
        let mut xs = x.to_vec();
        standardize(&mut xs, &self.mean, &self.std);
        let xm = Mat::new(xs, n, self.dim)?;
        let w = Mat::new(self.weights.clone(), self.n_classes, self.dim)?;
        xm.mul_t(&w, Some(&self.bias))
    }

    /// The arg-max class of each row (ties to the lower class).
    pub fn predict(&self, x: &[f32]) -> Result<Vec<u32>> {
        Ok(self
            .logits(x)?
            .chunks_exact(self.n_classes)
            .map(argmax)
            .collect())
    }
}

/// Index of the largest value (first on ties).
pub(crate) fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Fits a multinomial logistic regression of `targets` on `x [n, dim]`.
pub fn fit_softmax(
    x: &[f32],
    dim: usize,
    targets: Targets<'_>,
    n_classes: usize,
    cfg: &FitConfig,
) -> Result<(SoftmaxClassifier, FitReport)> {
    if dim == 0 || n_classes == 0 || x.len() % dim != 0 {
        return Err(ProbeError::shape(
            "logistic regression",
            format!("{} values, width {dim}, {n_classes} classes", x.len()),
        ));
    }
    let n = x.len() / dim;
    match targets {
        Targets::Hard(y) if y.len() != n || y.iter().any(|&c| c as usize >= n_classes) => {
            return Err(ProbeError::shape(
                "logistic regression targets",
                format!(
                    "{} labels for {n} rows, all must be below {n_classes}",
                    y.len()
                ),
            ));
        }
        Targets::Soft(q) if q.len() != n * n_classes => {
            return Err(ProbeError::shape(
                "logistic regression targets",
                format!(
                    "{} soft values for {n} rows of {n_classes} classes",
                    q.len()
                ),
            ));
        }
        _ => {}
    }
    if n == 0 {
        return Err(ProbeError::shape("logistic regression", "no training rows"));
    }
    if cfg.l2 < 0.0 {
        return Err(ProbeError::Config(vec![format!(
            "l2 penalty {} must be >= 0",
            cfg.l2
        )]));
    }
    let (mean, std) = column_stats(x, n, dim);
    let mut xs = x.to_vec();
    standardize(&mut xs, &mean, &std);
    let problem = Problem {
        xt: Mat::new(transpose(&xs, n, dim), dim, n)?,
        x: Mat::new(xs, n, dim)?,
        n,
        dim,
        c: n_classes,
        targets,
        l2: cfg.l2,
    };
    let (theta, report) = lbfgs(
        |t| problem.eval(t),
        vec![0.0; n_classes * (dim + 1)],
        cfg.max_iters,
    )?;
    let weights = theta[..n_classes * dim].iter().map(|&v| v as f32).collect();
    let bias = theta[n_classes * dim..].iter().map(|&v| v as f32).collect();
    Ok((
        SoftmaxClassifier {
            dim,
            n_classes,
            weights,
            bias,
            mean,
            std,
        },
        report,
    ))
}

struct Problem<'a> {
    x: Mat,
    xt: Mat,
    n: usize,
    dim: usize,
    c: usize,
    targets: Targets<'a>,
    l2: f64,
}

impl Problem<'_> {
    /// Objective and gradient at `theta = [W (c x dim), b (c)]`.
    fn eval(&self, theta: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (c, d, n) = (self.c, self.dim, self.n);
        let w: Vec<f32> = theta[..c * d].iter().map(|&v| v as f32).collect();
        let b: Vec<f32> = theta[c * d..].iter().map(|&v| v as f32).collect();
        let z = self.x.mul_t(&Mat::new(w, c, d)?, Some(&b))?;
        // Softmax, loss and dL/dz per row, on row chunks in parallel; the partial losses
        // are added in chunk order so the result does not depend on the thread count.
        let inv_n = 1.0 / n as f64;
        let parts: Vec<(f64, Vec<f32>)> = z
            .par_chunks(ROW_CHUNK * c)
            .enumerate()
            .map(|(ci, zc)| {
                let mut g = vec![0f32; zc.len()];
                let mut loss = 0f64;
                for (r, (row, gr)) in zc.chunks_exact(c).zip(g.chunks_exact_mut(c)).enumerate() {
                    let i = ci * ROW_CHUNK + r;
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut s = 0f32;
                    for (e, &zk) in gr.iter_mut().zip(row) {
                        *e = exp_f32(zk - m);
                        s += *e;
                    }
                    let lse = f64::from(m) + f64::from(s).ln();
                    let inv_s = 1.0 / s;
                    for k in 0..c {
                        let q = match self.targets {
                            Targets::Hard(y) => f32::from(u8::from(y[i] as usize == k)),
                            Targets::Soft(q) => q[i * c + k],
                        };
                        if q != 0.0 {
                            loss += f64::from(q) * (lse - f64::from(row[k]));
                        }
                        gr[k] = ((f64::from(gr[k] * inv_s - q)) * inv_n) as f32;
                    }
                }
                (loss, g)
            })
            .collect();
        let mut loss = 0f64;
        let mut g_rows = Vec::with_capacity(n * c);
        for (l, g) in parts {
            loss += l;
            g_rows.extend(g);
        }
        loss *= inv_n;
        let mut grad = vec![0f64; c * (d + 1)];
        // Bias gradient: column sums of G, in f64, in row order.
        for row in g_rows.chunks_exact(c) {
            for (gb, &v) in grad[c * d..].iter_mut().zip(row) {
                *gb += f64::from(v);
            }
        }
        let gt = transpose(&g_rows, n, c);
        let dw = Mat::new(gt, c, n)?.mul_t(&self.xt, None)?;
        for (j, (g, &wv)) in grad[..c * d].iter_mut().zip(&theta[..c * d]).enumerate() {
            *g = f64::from(dw[j]) + self.l2 * wv;
        }
        loss += 0.5 * self.l2 * theta[..c * d].iter().map(|v| v * v).sum::<f64>();
        Ok((loss, grad))
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Limited-memory BFGS (memory 10) with Armijo backtracking; stops after `max_iters`
/// iterations, when the gradient max-norm falls below 1e-6, or when no step decreases
/// the objective.
fn lbfgs(
    mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>,
    mut x: Vec<f64>,
    max_iters: usize,
) -> Result<(Vec<f64>, FitReport)> {
    const MEMORY: usize = 10;
    let (mut fx, mut g) = f(&x)?;
    let mut evaluations = 1;
    let mut hist: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::new();
    let mut iterations = 0;
    let gnorm = |g: &[f64]| g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    while iterations < max_iters && gnorm(&g) > 1e-6 {
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = match hist.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            None => 1.0 / dot(&g, &g).sqrt().max(1.0),
        };
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            hist.clear();
            let scale = 1.0 / dot(&g, &g).sqrt().max(1.0);
            d = g.iter().map(|v| -v * scale).collect();
            slope = dot(&g, &d);
        }
        let mut step = 1.0;
        let mut accepted = None;
        for _ in 0..40 {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(xi, di)| xi + step * di).collect();
            let (fxn, gn) = f(&xn)?;
            evaluations += 1;
            if fxn.is_finite() && fxn <= fx + 1e-4 * step * slope {
                accepted = Some((xn, fxn, gn));
                break;
            }
            step *= 0.5;
        }
        let Some((xn, fxn, gn)) = accepted else { break };
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 {
            if hist.len() == MEMORY {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        x = xn;
        fx = fxn;
        g = gn;
        iterations += 1;
    }
    let grad_norm = gnorm(&g);
    Ok((
        x,
        FitReport {
            iterations,
            evaluations,
            loss: fx,
            grad_norm,
        },
    ))
}
