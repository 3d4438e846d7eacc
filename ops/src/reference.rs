//! Naive f64 twins of every op: plain loops written straight from the formulas, used by
//! the tests (against the fast kernels and through finite differences for gradients).
//! Deliberately slow and obvious; never used on a training path.

/// `x [m, k] * w[n, k]^T + b`.
pub fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = b.map(|b| b[j]).unwrap_or(0.0);
            for t in 0..k {
                s += x[i * k + t] * w[j * k + t];
            }
            y[i * n + j] = s;
        }
    }
    y
}

/// LayerNorm over rows of length `d`.
pub fn layer_norm(x: &[f64], w: &[f64], b: &[f64], d: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (r, row) in x.chunks(d).enumerate() {
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        for i in 0..d {
            y[r * d + i] = (row[i] - mean) / (var + eps).sqrt() * w[i] + b[i];
        }
    }
    y
}

/// Exact GELU.
pub fn gelu(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)))
        .collect()
}

/// Row L2 normalisation `x / max(||x||, eps)`.
pub fn l2_normalize(x: &[f64], d: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (r, row) in x.chunks(d).enumerate() {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(eps);
        for i in 0..d {
            y[r * d + i] = row[i] / n;
        }
    }
    y
}

/// RoPE applied to one head vector with tables `sin`, `cos` of the same length.
pub fn rope(z: &[f64], sin: &[f64], cos: &[f64]) -> Vec<f64> {
    let h = z.len() / 2;
    let rot: Vec<f64> = (0..z.len())
        .map(|j| if j < h { -z[j + h] } else { z[j - h] })
        .collect();
    (0..z.len())
        .map(|j| z[j] * cos[j] + rot[j] * sin[j])
        .collect()
}

/// Multi-head attention on packed `qkv [batch * n, 3d]`; rope tables `[n - prefix, dh]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    qkv: &[f64],
    batch: usize,
    n: usize,
    d: usize,
    heads: usize,
    prefix: usize,
    sin: Option<&[f64]>,
    cos: Option<&[f64]>,
) -> Vec<f64> {
    let dh = d / heads;
    let mut out = vec![0.0; batch * n * d];
    for b in 0..batch {
        for h in 0..heads {
            let get = |i: usize, part: usize| -> Vec<f64> {
                let s = (b * n + i) * 3 * d + part * d + h * dh;
                let mut z = qkv[s..s + dh].to_vec();
                if part < 2 && i >= prefix {
                    if let (Some(sn), Some(cs)) = (sin, cos) {
                        let r = i - prefix;
                        z = rope(&z, &sn[r * dh..(r + 1) * dh], &cs[r * dh..(r + 1) * dh]);
                    }
                }
                z
            };
            let q: Vec<Vec<f64>> = (0..n).map(|i| get(i, 0)).collect();
            let k: Vec<Vec<f64>> = (0..n).map(|i| get(i, 1)).collect();
            let v: Vec<Vec<f64>> = (0..n).map(|i| get(i, 2)).collect();
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        q[i].iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f64>() / (dh as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dh {
                    out[(b * n + i) * d + h * dh + c] = (0..n).map(|j| e[j] / z * v[j][c]).sum();
                }
            }
        }
    }
    out
}

/// Sinkhorn-Knopp in the official `K x N` layout, returned as `[n, k]`.
pub fn sinkhorn_knopp(logits: &[f64], n: usize, k: usize, temp: f64, iters: usize) -> Vec<f64> {
    let mut q = vec![vec![0.0; n]; k];
    for i in 0..n {
        for j in 0..k {
            q[j][i] = (logits[i * k + j] / temp).exp();
        }
    }
    let s: f64 = q.iter().flatten().sum();
    q.iter_mut().flatten().for_each(|v| *v /= s);
    for _ in 0..iters {
        for row in q.iter_mut() {
            let rs: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v = *v / rs / k as f64);
        }
        for i in 0..n {
            let cs: f64 = (0..k).map(|j| q[j][i]).sum();
            for row in q.iter_mut() {
                row[i] = row[i] / cs / n as f64;
            }
        }
    }
    let mut out = vec![0.0; n * k];
    for i in 0..n {
        for j in 0..k {
            out[i * k + j] = q[j][i] * n as f64;
        }
    }
    out
}

/// `-sum_k t_k log_softmax(s / temp)_k` for one pair of rows.
pub fn soft_ce(s: &[f64], t: &[f64], temp: f64) -> f64 {
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max) / temp;
    let lse = m + s.iter().map(|v| (v / temp - m).exp()).sum::<f64>().ln();
    -s.iter()
        .zip(t)
        .map(|(a, b)| b * (a / temp - lse))
        .sum::<f64>()
}

/// KoLeo of one crop `[n, d]`, as the official `KoLeoLoss`.
pub fn koleo(x: &[f64], n: usize, d: usize) -> f64 {
    let y = l2_normalize(x, d, 1e-8);
    let mut loss = 0.0;
    for i in 0..n {
        let mut best = usize::MAX;
        let mut best_dot = f64::NEG_INFINITY;
        for j in 0..n {
            let dot = if i == j {
                -1.0
            } else {
                (0..d).map(|c| y[i * d + c] * y[j * d + c]).sum()
            };
            if dot > best_dot {
                best_dot = dot;
                best = j;
            }
        }
        let dist = (0..d)
            .map(|c| (y[i * d + c] - y[best * d + c] + 1e-8).powi(2))
            .sum::<f64>()
            .sqrt();
        loss -= (dist + 1e-8).ln();
    }
    loss / n as f64
}

/// Gram loss, per image (`groups = n_img`) or over the batch (`groups = 1`).
pub fn gram(s: &[f64], t: &[f64], groups: usize, d: usize) -> f64 {
    let ys = l2_normalize(s, d, 1e-12);
    let yt = l2_normalize(t, d, 1e-12);
    let p = s.len() / d / groups;
    let mut acc = 0.0;
    for g in 0..groups {
        for i in 0..p {
            for j in 0..p {
                let dot = |y: &[f64]| {
                    (0..d)
                        .map(|c| y[(g * p + i) * d + c] * y[(g * p + j) * d + c])
                        .sum::<f64>()
                };
                acc += (dot(&ys) - dot(&yt)).powi(2);
            }
        }
    }
    acc / (groups * p * p) as f64
}

/// Bicubic resize of one channel `[h_in, w_in]` to `[h_out, w_out]` written directly from
/// PyTorch's `upsample_bicubic2d` (align_corners false, a = -0.75, clamped taps).
pub fn bicubic(x: &[f64], h_in: usize, w_in: usize, h_out: usize, w_out: usize) -> Vec<f64> {
    let a = -0.75;
    let w = |t: f64| -> [f64; 4] {
        let c1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
        let c2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
        [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
    };
    let mut out = vec![0.0; h_out * w_out];
    for i in 0..h_out {
        let sy = (i as f64 + 0.5) * h_in as f64 / h_out as f64 - 0.5;
        let (fy, ty) = (sy.floor(), sy - sy.floor());
        for j in 0..w_out {
            let sx = (j as f64 + 0.5) * w_in as f64 / w_out as f64 - 0.5;
            let (fx, tx) = (sx.floor(), sx - sx.floor());
            let (wy, wx) = (w(ty), w(tx));
            let mut acc = 0.0;
            for (a_, wya) in wy.iter().enumerate() {
                let yy = (fy as i64 - 1 + a_ as i64).clamp(0, h_in as i64 - 1) as usize;
                for (b_, wxb) in wx.iter().enumerate() {
                    let xx = (fx as i64 - 1 + b_ as i64).clamp(0, w_in as i64 - 1) as usize;
                    acc += wya * wxb * x[yy * w_in + xx];
                }
            }
            out[i * w_out + j] = acc;
        }
    }
    out
}

/// One AdamW step on plain vectors (PyTorch formula); returns the new parameters.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &[f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    wd: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    t: u64,
) -> Vec<f64> {
    let mut out = p.to_vec();
    for i in 0..p.len() {
        out[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        out[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
    }
    out
}

/// Rows `src[i]` of a `[rows, d]` matrix, in order.
pub fn gather_rows(x: &[f64], src: &[usize], d: usize) -> Vec<f64> {
    src.iter()
        .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
        .collect()
}

/// LayerNorm of the selected rows `src` of `x` (a gather, then [`layer_norm`]).
pub fn layer_norm_rows(
    x: &[f64],
    src: &[usize],
    w: &[f64],
    b: &[f64],
    d: usize,
    eps: f64,
) -> Vec<f64> {
    layer_norm(&gather_rows(x, src, d), w, b, d, eps)
}

/// Drop-path residual update: `out = x`, then `out[src[i]] += scale[i] * ((r[i] + bias) * gamma)`.
pub fn residual_add(
    x: &[f64],
    src: &[usize],
    scales: &[f64],
    gamma: &[f64],
    r: &[f64],
    bias: Option<&[f64]>,
    d: usize,
) -> Vec<f64> {
    let mut out = x.to_vec();
    for (i, (&row, &s)) in src.iter().zip(scales).enumerate() {
        for c in 0..d {
            let v = r[i * d + c] + bias.map_or(0.0, |b| b[c]);
            out[row * d + c] += s * (v * gamma[c]);
        }
    }
    out
}

/// `gelu(x + b)` with `b` broadcast over rows of length `d`.
pub fn gelu_bias(x: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let shifted: Vec<f64> = x.iter().enumerate().map(|(i, v)| v + b[i % d]).collect();
    gelu(&shifted)
}

/// `qkv` rows plus a bias of length `3d` broadcast over rows.
pub fn add_row_bias(qkv: &[f64], bias: &[f64]) -> Vec<f64> {
    let w = bias.len();
    qkv.iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % w])
        .collect()
}
