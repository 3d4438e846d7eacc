//! Device-independent twins of the ops in [`crate::nn`], [`crate::attention`],
//! [`crate::loss`] and [`crate::optim`], written only with candle tensor operations that
//! have CUDA kernels (cuBLAS matmuls, broadcast arithmetic, `exp`/`erf`/`gelu_erf`,
//! reductions, `index_select`, `narrow`, `cat`, `where_cond`), so the same code runs on
//! `Device::Cpu` (where the tests check it against the fused CPU kernels and the f64
//! reference twins) and on `Device::Cuda` when the crate is built with the `cuda` feature.
//!
//! Every function has the signature and the return values of its CPU namesake, with these
//! exceptions (all because device memory cannot be written through host slices):
//! * functions that update in place on the CPU (`*_into`, `select_rows_add_into`,
//!   `copy_into`) write through [`write_into`] (candle's `slice_set`, a device copy);
//!   [`layer_norm_sel_bwd_add`] and friends return the new tensor instead;
//! * [`adamw_update`] takes the moments `m`, `v` as tensors and returns the new
//!   `(param, m, v)`; [`ema_update`] returns the new teacher tensor;
//! * attention caches are this module's [`AttnCache`] (rotated q, k, v and the
//!   probabilities, all on the device), not [`crate::attention::AttnCache`];
//! * the losses also come as `*_t` variants that keep the loss on the device (a host
//!   `f64` forces a device synchronisation).
//!
//! Host-side metadata (row selections, masks, index lists, pairings) stays a host argument
//! as in the CPU API and is uploaded as small index tensors per call.
//!
//! # Element types
//! * **f32, f64**: every op.
//! * **bf16 (and f16)**: matmuls run in the input type (on the GPU: cuBLAS with f32
//!   accumulation), as do the cheap elementwise ops, gathers, scatters and token
//!   assembly. Everything that reduces or needs range runs in f32 and returns to the input
//!   type: LayerNorm statistics (its caches and `dw`/`db` stay in f32 when `w` is f32),
//!   the GELU derivative, the attention softmax and its backward, the RoPE rotation,
//!   L2 normalisation. The losses (Sinkhorn-Knopp, soft cross-entropy, KoLeo, Gram) run
//!   in f32 as the official code does (`.float()` before the loss); Sinkhorn-Knopp
//!   returns f32 for half inputs, the loss gradients come back in the input type.
//! * AdamW and EMA run in the parameter's type (f32 master weights); a bf16 gradient is
//!   widened first.
//!
//! Mixed inputs are not promoted implicitly (candle refuses mixed-dtype arithmetic),
//! except where stated: LayerNorm accepts f32 `w`/`b` with half `x`, the optimizer
//! accepts a half gradient with f32 state.

use candle_core::{bail, DType, Device, Result, Shape, Tensor, D};

use crate::attention::{AttnGroup, Rope, SeqShape};
use crate::nn::{rows_dim, LnCache, RowBlocks};
use crate::optim::AdamWStep;

// ============================================================================ helpers

/// The type arithmetic runs in for inputs of type `dt`: f32 for half types, `dt` otherwise.
pub fn compute_dtype(dt: DType) -> DType {
    match dt {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

fn check_float(t: &Tensor, what: &str) -> Result<DType> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(t.dtype()),
        d => bail!("{what}: unsupported dtype {d:?} (f64, f32, bf16 or f16)"),
    }
}

/// `t` in its compute type (a no-op for f32 / f64).
fn up(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(compute_dtype(t.dtype()))
}

/// `t` as a `[rows, d]` matrix over its last dimension.
fn mat(t: &Tensor) -> Result<(Tensor, usize, usize)> {
    let (r, d) = rows_dim(t)?;
    Ok((t.reshape((r, d))?, r, d))
}

/// A `u32` index tensor on `dev`.
fn index(ix: &[usize], dev: &Device) -> Result<Tensor> {
    let v = ix
        .iter()
        .map(|&i| {
            u32::try_from(i)
                .map_err(|_| candle_core::Error::Msg(format!("index {i} does not fit u32")))
        })
        .collect::<Result<Vec<u32>>>()?;
    let n = v.len();
    Tensor::from_vec(v, n, dev)
}

/// A `[n, 1]` column of host values in type `dt` on `dev`.
fn column(v: &[f64], dt: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(v.to_vec(), (v.len(), 1), dev)?.to_dtype(dt)
}

/// A `[n, 1]` u8 column (1 where `m != 0`) on `dev`.
fn mask_column(m: &[u8], dev: &Device) -> Result<Tensor> {
    let v: Vec<u8> = m.iter().map(|&b| u8::from(b != 0)).collect();
    Tensor::from_vec(v, (m.len(), 1), dev)
}

/// Column sums of a `[rows, d]` matrix, `[d]`: one `ones[1, rows] x` product (a coalesced
/// cuBLAS call on the GPU, where a reduction over the leading dimension reads strided).
fn col_sum(x: &Tensor) -> Result<Tensor> {
    let (r, d) = x.dims2()?;
    if r == 0 {
        return Tensor::zeros(d, x.dtype(), x.device());
    }
    Tensor::ones((1, r), x.dtype(), x.device())?
        .matmul(&x.contiguous()?)?
        .reshape(d)
}

/// Whether every entry of `ix` is distinct and below `rows`.
fn unique_rows(ix: &[usize], rows: usize) -> bool {
    let mut seen = vec![false; rows];
    ix.iter()
        .all(|&r| r < rows && !std::mem::replace(&mut seen[r], true))
}

/// `x + scatter(u)`: row `i` of `u [n, d]` is added to row `rows[i]` of `x [R, d]`. With
/// distinct rows this is a gather (fully parallel on the GPU): rows of `x` that receive
/// nothing gather an appended zero row, so they come out bit-identical. Repeated rows
/// fall back to candle's `index_add` (accumulates in order).
fn scatter_add_rows(x: &Tensor, rows: &[usize], u: &Tensor) -> Result<Tensor> {
    let (r, d) = x.dims2()?;
    let n = rows.len();
    if u.dims() != [n, d] {
        bail!("scatter: {:?} rows for {n} targets of width {d}", u.dims())
    }
    if rows.iter().any(|&i| i >= r) {
        bail!("scatter: target row out of range (of {r})")
    }
    if n == r && rows.iter().enumerate().all(|(i, &j)| i == j) {
        return x + u;
    }
    if unique_rows(rows, r) {
        let mut inv = vec![n; r];
        for (i, &row) in rows.iter().enumerate() {
            inv[row] = i;
        }
        let pad = Tensor::cat(&[u, &Tensor::zeros((1, d), u.dtype(), u.device())?], 0)?;
        return x + pad.index_select(&index(&inv, x.device())?, 0)?;
    }
    x.index_add(&index(rows, x.device())?, u, 0)
}

/// Overwrites the elements of `dst` with those of `src` in place on any device (same
/// shape and type; `dst` must be contiguous). Every clone of `dst` sees the new values.
pub fn write_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.dims() != src.dims() || dst.dtype() != src.dtype() {
        bail!(
            "write_into: {:?} {:?} into {:?} {:?}",
            src.dims(),
            src.dtype(),
            dst.dims(),
            dst.dtype()
        )
    }
    if !dst.is_contiguous() {
        bail!("write_into: the destination is not contiguous")
    }
    if dst.elem_count() == 0 {
        return Ok(());
    }
    // a fresh copy: `src` may be a view of `dst`'s storage (candle does not expose the
    // check), and `slice_set` must not read what it is writing; of the view only (`copy`
    // would clone the whole storage under it)
    let src = src.force_contiguous()?;
    dst.flatten_all()?.slice_set(&src.flatten_all()?, 0, 0)
}

static FORCE_ON_CPU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the ops of [`crate::nn`], [`crate::attention`], [`crate::loss`] and
/// [`crate::optim`] route a call on `t` to this module: always for tensors off the CPU
/// (the fused kernels read host memory), and on the CPU too while
/// [`set_force_on_cpu`] is on.
#[inline]
pub fn active(t: &Tensor) -> bool {
    !t.device().is_cpu() || FORCE_ON_CPU.load(std::sync::atomic::Ordering::Relaxed)
}

/// Routes every op through this module even on the CPU (process-wide). For tests: the
/// whole training step then runs the device code path on the host, where it can be
/// compared with the golden fixtures and the fused kernels without a GPU. Only for a
/// process (test binary) of its own: it changes what every thread computes.
pub fn set_force_on_cpu(on: bool) {
    FORCE_ON_CPU.store(on, std::sync::atomic::Ordering::Relaxed)
}

/// Whether [`set_force_on_cpu`] is on.
pub fn forced_on_cpu() -> bool {
    FORCE_ON_CPU.load(std::sync::atomic::Ordering::Relaxed)
}

/// Parses a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. Fails with a clear message
/// when this build has no CUDA support or the device cannot be opened.
pub fn device(spec: &str) -> Result<Device> {
    let s = spec.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("bad device `{spec}`: use cpu, cuda or cuda:N"),
        },
        None => bail!("bad device `{spec}`: use cpu, cuda or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device `{spec}`: this dinod was built without CUDA support (build it with \
             scripts/build-cuda.sh, i.e. `--features cuda`)"
        )
    }
    Device::new_cuda(ordinal)
        .map_err(|e| candle_core::Error::Msg(format!("cannot open CUDA device {ordinal}: {e}")))
}

/// Waits for the device's queued work (a no-op on the CPU); for timing.
pub fn synchronize(dev: &Device) -> Result<()> {
    dev.synchronize()
}

// ============================================================================ Linear

/// `y = x W^T + b` for `x: [.., in]`, `w: [out, in]`, `b: [out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    check_float(x, "linear")?;
    let (x2, m, k) = mat(x)?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        bail!("linear: input dim {k} vs weight {:?}", w.dims())
    }
    if let Some(b) = b {
        if b.elem_count() != n {
            bail!("linear: bias {:?} for {n} outputs", b.dims())
        }
    }
    let cd = compute_dtype(x.dtype());
    let y = match b {
        // Half types on the CPU: the bias joins the f32 accumulator and the sum is rounded
        // once, as PyTorch's addmm does. Rounding the product to bf16 first and then the
        // sum again loses the product's low bits where the bias cancels part of it; in the
        // iBOT head (small bottleneck activations, softmax at temperature 0.1) that doubled
        // the last layer's bf16 gradient error (BENCHMARKS.md, "bf16: scatter or a
        // systematic difference?"). The inputs are already half, so the f32 product is exactly a half
        // GEMM with f32 accumulation. On CUDA this would turn bias layers into f32 GEMMs,
        // which is unmeasured, so the GPU keeps the bf16 GEMM and a separate bias add.
        Some(b) if cd != x.dtype() && x.device().is_cpu() => x2
            .to_dtype(cd)?
            .matmul(&w.to_dtype(cd)?.t()?)?
            .broadcast_add(&b.to_dtype(cd)?.reshape((1, n))?)?
            .to_dtype(x.dtype())?,
        Some(b) => x2.matmul(&w.t()?)?.broadcast_add(&b.reshape((1, n))?)?,
        None => x2.matmul(&w.t()?)?,
    };
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rows_dim checked the rank") = n;
    debug_assert_eq!(m * n, shape.iter().product::<usize>());
    y.reshape(shape)
}

/// Gradients of [`linear`]: `(dx if wanted, dW, db if the layer has a bias)`.
pub fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    has_bias: bool,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let (m, _) = rows_dim(x)?;
    let (n, _) = w.dims2()?;
    if dy.elem_count() != m * n {
        bail!(
            "linear_bwd: gradient {:?} for {m} rows of {n} outputs",
            dy.dims()
        )
    }
    let dx = if want_dx {
        Some(linear_dx(dy, w, x.shape())?)
    } else {
        None
    };
    let dw = linear_dw(x, dy)?;
    let db = if has_bias {
        Some(col_sum(&dy.reshape((m, n))?)?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

/// The input gradient of [`linear`] alone, `dy W` (`[.., in]`, shaped like `x_shape`).
pub fn linear_dx(dy: &Tensor, w: &Tensor, x_shape: &Shape) -> Result<Tensor> {
    let (dy2, m, n) = mat(dy)?;
    let (n2, k) = w.dims2()?;
    if n != n2 || x_shape.elem_count() != m * k {
        bail!(
            "linear_dx: gradient {:?}, weight {:?}, input {x_shape:?}",
            dy.dims(),
            w.dims()
        )
    }
    dy2.matmul(w)?.reshape(x_shape.clone())
}

/// The weight gradient of [`linear`] alone, `dy^T x` (`[out, in]`).
pub fn linear_dw(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (x2, m, _) = mat(x)?;
    let (dy2, m2, _) = mat(dy)?;
    if m != m2 {
        bail!(
            "linear_dw: input {:?} vs gradient {:?}",
            x.dims(),
            dy.dims()
        )
    }
    dy2.t()?.matmul(&x2)
}

/// Column sums of a `[.., d]` tensor (the bias gradient of a linear layer), `[d]`.
pub fn col_sums(x: &Tensor) -> Result<Tensor> {
    col_sum(&mat(x)?.0)
}

// ========================================================================= LayerNorm

/// LayerNorm over the last dimension (biased variance), `y = (x - mean) * rstd * w + b`.
/// Statistics in the compute type; `y` in `x`'s type; the cache in the compute type.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, LnCache)> {
    check_float(x, "layer_norm")?;
    let (x2, rows, d) = mat(x)?;
    if w.elem_count() != d || b.elem_count() != d {
        bail!(
            "layer_norm: weight {:?} / bias {:?} for rows of {d}",
            w.dims(),
            b.dims()
        )
    }
    let cd = compute_dtype(x.dtype());
    let xf = x2.to_dtype(cd)?;
    let mean = xf.mean_keepdim(1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let rstd = var.affine(1.0, eps)?.sqrt()?.recip()?;
    let wf = w.reshape((1, d))?.to_dtype(cd)?;
    let bf = b.reshape((1, d))?.to_dtype(cd)?;
    let y = xc
        .broadcast_mul(&rstd)?
        .broadcast_mul(&wf)?
        .broadcast_add(&bf)?
        .to_dtype(x.dtype())?
        .reshape(x.shape().clone())?;
    let cache = LnCache {
        mean: mean.reshape(rows)?,
        rstd: rstd.reshape(rows)?,
    };
    Ok((y, cache))
}

/// [`layer_norm`] of the selected rows of `x` (all rows without a selection): output row
/// `i` is the normalised source row `sel.source_rows()[i]`. Output `[selected rows, d]`.
pub fn layer_norm_sel(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, LnCache)> {
    match sel {
        None => layer_norm(x, w, b, eps),
        Some(s) => {
            let (x2, rows, _) = mat(x)?;
            let src = s.source_rows();
            if src.iter().any(|&r| r >= rows) {
                bail!("layer_norm_sel: selection beyond {rows} rows")
            }
            layer_norm(&x2.index_select(&index(&src, x.device())?, 0)?, w, b, eps)
        }
    }
}

/// `(dx, dw, db)` of LayerNorm rows `x2 [n, d]` (already gathered) with their cache.
fn ln_grads(
    x2: &Tensor,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, d) = x2.dims2()?;
    if dy.elem_count() != n * d || cache.mean.elem_count() != n || w.elem_count() != d {
        bail!(
            "layer_norm backward: gradient {:?} for {n} rows of width {d}",
            dy.dims()
        )
    }
    let cd = compute_dtype(x2.dtype());
    let xf = x2.to_dtype(cd)?;
    let g = dy.reshape((n, d))?.to_dtype(cd)?;
    let mean = cache.mean.reshape((n, 1))?.to_dtype(cd)?;
    let rstd = cache.rstd.reshape((n, 1))?.to_dtype(cd)?;
    let xh = xf.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
    let gw = g.broadcast_mul(&w.reshape((1, d))?.to_dtype(cd)?)?;
    let mg = gw.mean_keepdim(1)?;
    let mgx = (&gw * &xh)?.mean_keepdim(1)?;
    let dx = gw
        .broadcast_sub(&mg)?
        .sub(&xh.broadcast_mul(&mgx)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(x2.dtype())?;
    let dw = col_sum(&(&g * &xh)?)?.to_dtype(w.dtype())?;
    let db = col_sum(&g)?.to_dtype(w.dtype())?;
    Ok((dx, dw, db))
}

/// Gradients of [`layer_norm`]: `(dx, dw, db)`.
pub fn layer_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (x2, _, _) = mat(x)?;
    let (dx, dw, db) = ln_grads(&x2, w, cache, dy)?;
    Ok((dx.reshape(x.shape().clone())?, dw, db))
}

/// Backward of [`layer_norm_sel`] returning the new accumulator: `dx_acc` (shaped like
/// `x`) plus the input gradient of every selected row on its source row, and `(dw, db)`.
/// A row selected twice is refused, as on the CPU.
pub fn layer_norm_sel_bwd_add(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
    dx_acc: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if dx_acc.dims() != x.dims() {
        bail!(
            "layer_norm_sel_bwd: accumulator {:?} vs input {:?}",
            dx_acc.dims(),
            x.dims()
        )
    }
    let (x2, rows, d) = mat(x)?;
    let acc = dx_acc.reshape((rows, d))?;
    let (src, xs) = match sel {
        None => ((0..rows).collect::<Vec<_>>(), x2),
        Some(s) => {
            let src = s.source_rows();
            if !unique_rows(&src, rows) {
                bail!("layer_norm backward: selection row out of range or repeated")
            }
            let xs = x2.index_select(&index(&src, x.device())?, 0)?;
            (src, xs)
        }
    };
    let (dx, dw, db) = ln_grads(&xs, w, cache, dy)?;
    let acc = scatter_add_rows(&acc, &src, &dx)?.reshape(dx_acc.shape().clone())?;
    Ok((acc, dw, db))
}

/// Backward of [`layer_norm_sel`] into `dx_acc` (updated in place through
/// [`write_into`]); returns `(dw, db)`.
pub fn layer_norm_sel_bwd_into(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    w: &Tensor,
    cache: &LnCache,
    dy: &Tensor,
    dx_acc: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (acc, dw, db) = layer_norm_sel_bwd_add(x, sel, w, cache, dy, dx_acc)?;
    write_into(dx_acc, &acc)?;
    Ok((dw, db))
}

// ============================================================================== GELU

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    check_float(x, "gelu")?;
    x.gelu_erf()
}

/// `gelu(x + b)` with the bias `b [d]` broadcast over the rows of `x [.., d]`.
pub fn gelu_bias(x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        None => gelu(x),
        Some(b) => {
            let (x2, _, d) = mat(x)?;
            if b.elem_count() != d {
                bail!(
                    "gelu_bias: bias of {} elements for rows of {d}",
                    b.elem_count()
                )
            }
            x2.broadcast_add(&b.reshape((1, d))?)?
                .gelu_erf()?
                .reshape(x.shape().clone())
        }
    }
}

/// `dy * gelu'(v)` in the compute type, returned in `v`'s type.
fn gelu_grad(v: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let vf = up(v)?;
    let g = dy.to_dtype(vf.dtype())?;
    let cdf = vf
        .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
        .erf()?
        .affine(0.5, 0.5)?;
    let pdf = vf
        .sqr()?
        .affine(-0.5, 0.0)?
        .exp()?
        .affine(FRAC_1_SQRT_2PI, 0.0)?;
    (g * (cdf + (vf * pdf)?)?)?.to_dtype(v.dtype())
}

/// Gradient of [`gelu`] with respect to its input.
pub fn gelu_bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if dy.dims() != x.dims() {
        bail!(
            "gelu backward: gradient {:?} for input {:?}",
            dy.dims(),
            x.dims()
        )
    }
    gelu_grad(x, dy)
}

/// Gradient of [`gelu_bias`]: `(dy * gelu'(x + b), db if b)`. Returns a new tensor (the
/// CPU version reuses `dy`'s storage; the values are the same).
pub fn gelu_bias_bwd_into(
    x: &Tensor,
    b: Option<&Tensor>,
    dy: Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let (x2, _, d) = mat(x)?;
    if dy.dims() != x.dims() || b.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "gelu backward: gradient {:?} for input {:?}",
            dy.dims(),
            x.dims()
        )
    }
    match b {
        None => Ok((gelu_grad(x, &dy)?, None)),
        Some(b) => {
            let v = x2.broadcast_add(&b.reshape((1, d))?)?;
            let g = gelu_grad(&v, &dy.reshape(v.shape())?)?;
            let db = col_sum(&g)?;
            Ok((g.reshape(x.shape().clone())?, Some(db)))
        }
    }
}

// ======================================================================== LayerScale

/// `y = x * gamma` (gamma broadcast over rows).
pub fn mul_row(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    let (x2, _, d) = mat(x)?;
    x2.broadcast_mul(&gamma.reshape((1, d))?)?
        .reshape(x.shape().clone())
}

/// Gradients of [`mul_row`]: `(dx = dy * gamma, dgamma = sum_rows(dy * x))`.
pub fn mul_row_bwd(x: &Tensor, gamma: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (x2, rows, d) = mat(x)?;
    let g = dy.reshape((rows, d))?;
    let dx = g
        .broadcast_mul(&gamma.reshape((1, d))?)?
        .reshape(x.shape().clone())?;
    Ok((dx, col_sum(&(&g * &x2)?)?))
}

// ====================================================================== L2 normalise

/// `y = x / max(||x||, eps)` per row; returns `y` (in `x`'s type) and the row norms
/// `||x||` (`[rows]`, compute type).
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check_float(x, "l2_normalize")?;
    let (x2, rows, _) = mat(x)?;
    let xf = up(&x2)?;
    let n = xf.sqr()?.sum_keepdim(1)?.sqrt()?;
    let y = xf
        .broadcast_div(&n.maximum(eps)?)?
        .to_dtype(x.dtype())?
        .reshape(x.shape().clone())?;
    Ok((y, n.reshape(rows)?))
}

/// Gradient of [`l2_normalize`]: `dx = (dy - y (y . dy)) / ||x||` where the norm exceeds
/// `eps`, else `dy / eps` (the clamp is constant there).
pub fn l2_normalize_bwd(y: &Tensor, norms: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let (y2, rows, d) = mat(y)?;
    let yf = up(&y2)?;
    let g = dy.reshape((rows, d))?.to_dtype(yf.dtype())?;
    let n = norms.reshape((rows, 1))?.to_dtype(yf.dtype())?;
    let dot = (&yf * &g)?.sum_keepdim(1)?;
    let big = g
        .sub(&yf.broadcast_mul(&dot)?)?
        .broadcast_div(&n.maximum(eps)?)?;
    let small = g.affine(1.0 / eps, 0.0)?;
    let keep = n.gt(eps)?.broadcast_as((rows, d))?.contiguous()?;
    keep.where_cond(&big, &small)?
        .to_dtype(y.dtype())?
        .reshape(y.shape().clone())
}

// ========================================================== elementwise combinations

/// `a + s * b` for tensors of equal shape.
pub fn axpy(a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("axpy: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    a + b.affine(s, 0.0)?
}

/// `s * a`.
pub fn scale(a: &Tensor, s: f64) -> Result<Tensor> {
    a.affine(s, 0.0)
}

// ================================================================ row blocks (drop path)

/// `(source row, scale)` of every selected row, refusing repeats as the CPU does.
fn selection(sel: Option<&RowBlocks>, rows: usize) -> Result<(Vec<usize>, Vec<f64>)> {
    let (src, sc) = match sel {
        Some(s) => (s.source_rows(), s.row_scales()),
        None => ((0..rows).collect(), vec![1.0; rows]),
    };
    if !unique_rows(&src, rows) {
        bail!("row selection: row out of range (of {rows}) or repeated")
    }
    Ok((src, sc))
}

/// The LayerScale'd residual update of drop path: `x + scatter(scale * ((r + bias) * gamma))`
/// (see [`crate::nn::residual_add`]).
pub fn residual_add(
    x: &Tensor,
    sel: Option<&RowBlocks>,
    gamma: &Tensor,
    r: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x2, rows, d) = mat(x)?;
    let (src, scales) = selection(sel, rows)?;
    let n = src.len();
    if r.elem_count() != n * d || bias.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "residual_add: branch {:?} for {n} selected rows of width {d}",
            r.dims()
        )
    }
    let mut u = r.reshape((n, d))?;
    if let Some(b) = bias {
        u = u.broadcast_add(&b.reshape((1, d))?)?;
    }
    u = u.broadcast_mul(&gamma.reshape((1, d))?)?;
    if sel.is_some() {
        u = u.broadcast_mul(&column(&scales, x.dtype(), x.device())?)?;
    }
    scatter_add_rows(&x2, &src, &u)?.reshape(x.shape().clone())
}

/// Gradients of [`residual_add`] for the branch: `(dr, dgamma, dbias)` (see
/// [`crate::nn::residual_add_bwd`]).
pub fn residual_add_bwd(
    dy: &Tensor,
    sel: Option<&RowBlocks>,
    gamma: &Tensor,
    r: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (g2, rows, d) = mat(dy)?;
    let (src, scales) = selection(sel, rows)?;
    let n = src.len();
    if r.elem_count() != n * d || bias.is_some_and(|b| b.elem_count() != d) {
        bail!(
            "residual_add_bwd: branch {:?} for {n} selected rows of width {d}",
            r.dims()
        )
    }
    let t = match sel {
        None => g2,
        Some(_) => g2
            .index_select(&index(&src, dy.device())?, 0)?
            .broadcast_mul(&column(&scales, dy.dtype(), dy.device())?)?,
    };
    let dr = t.broadcast_mul(&gamma.reshape((1, d))?)?;
    let mut rb = r.reshape((n, d))?;
    if let Some(b) = bias {
        rb = rb.broadcast_add(&b.reshape((1, d))?)?;
    }
    let dgamma = col_sum(&(&t * &rb)?)?;
    let dbias = if bias.is_some() {
        Some(col_sum(&dr)?)
    } else {
        None
    };
    let shape: Shape = if sel.is_some() {
        (n, d).into()
    } else {
        r.shape().clone()
    };
    Ok((dr.reshape(shape)?, dgamma, dbias))
}

/// Gathers the selected row blocks into a new `[sel.rows(), d]` tensor.
pub fn gather_blocks(x: &Tensor, sel: &RowBlocks) -> Result<Tensor> {
    let (x2, rows, _) = mat(x)?;
    let src = sel.source_rows();
    if src.iter().any(|&r| r >= rows) {
        bail!("gather_blocks: selection beyond {rows} rows")
    }
    x2.index_select(&index(&src, x.device())?, 0)
}

/// `x + scatter(scale * r)` (see [`crate::nn::scatter_add_blocks`]).
pub fn scatter_add_blocks(
    x: &Tensor,
    sel: &RowBlocks,
    r: &Tensor,
    unscaled: bool,
) -> Result<Tensor> {
    let (x2, _, d) = mat(x)?;
    let src = sel.source_rows();
    let mut u = r.reshape((src.len(), d))?;
    if !unscaled {
        u = u.broadcast_mul(&column(&sel.row_scales(), x.dtype(), x.device())?)?;
    }
    scatter_add_rows(&x2, &src, &u)?.reshape(x.shape().clone())
}

/// The adjoint of [`scatter_add_blocks`] for `r`: each gathered block times its scale.
pub fn gather_blocks_scaled(dy: &Tensor, sel: &RowBlocks) -> Result<Tensor> {
    gather_blocks(dy, sel)?.broadcast_mul(&column(&sel.row_scales(), dy.dtype(), dy.device())?)
}

// ================================================================ patches and tokens

/// Unfolds images `[n, c, h, w]` into patch rows `[n * (h/p) * (w/p), c * p * p]`
/// (channel-major inside a patch, matching a `[D, c, p, p]` convolution weight).
pub fn im2col(images: &Tensor, p: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    if p == 0 || h % p != 0 || w % p != 0 {
        bail!("image size {h}x{w} is not a multiple of the patch size {p}")
    }
    let (gh, gw) = (h / p, w / p);
    images
        .reshape(vec![n, c, gh, p, gw, p])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .contiguous()?
        .reshape((n * gh * gw, c * p * p))
}

/// Builds the token sequence `[CLS, R registers, P patches]` for each of `n` images from
/// patch embeddings `[n * P, D]`; rows whose mask byte is non-zero take `mask_token`.
/// Output `[n * (1 + R + P), D]`.
pub fn assemble_tokens(
    patches: &Tensor,
    n: usize,
    cls: &Tensor,
    storage: &Tensor,
    mask_token: &Tensor,
    masks: Option<&[u8]>,
) -> Result<Tensor> {
    let (p2, rows, d) = mat(patches)?;
    let p = rows / n.max(1);
    if n == 0 || p * n != rows {
        bail!("assemble_tokens: {rows} patch rows for {n} images")
    }
    let r = if storage.elem_count() == 0 {
        0
    } else {
        rows_dim(storage)?.0
    };
    let dev = patches.device();
    let mut patches = p2;
    if let Some(m) = masks {
        if m.len() != rows {
            bail!(
                "assemble_tokens: {} mask entries for {rows} patches",
                m.len()
            )
        }
        let mt = mask_token.reshape((1, d))?.broadcast_as((rows, d))?;
        let cond = mask_column(m, dev)?.broadcast_as((rows, d))?;
        patches = cond.where_cond(&mt, &patches)?;
    }
    let mut parts = vec![cls
        .reshape((1, 1, d))?
        .broadcast_as((n, 1, d))?
        .contiguous()?];
    if r > 0 {
        parts.push(
            storage
                .reshape((1, r, d))?
                .broadcast_as((n, r, d))?
                .contiguous()?,
        );
    }
    parts.push(patches.reshape((n, p, d))?);
    Tensor::cat(&parts, 1)?.reshape((n * (1 + r + p), d))
}

/// Gradients of [`assemble_tokens`]: `(dpatches, dcls [D], dstorage [R, D], dmask_token [D])`.
pub fn assemble_tokens_bwd(
    dtokens: &Tensor,
    n: usize,
    r: usize,
    masks: Option<&[u8]>,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (rows, d) = rows_dim(dtokens)?;
    let nt = rows / n.max(1);
    if n == 0 || nt * n != rows || nt < 1 + r {
        bail!("assemble_tokens_bwd: {rows} token rows for {n} images with {r} registers")
    }
    let p = nt - 1 - r;
    let g = dtokens.reshape((n, nt, d))?;
    let dc = col_sum(&g.narrow(1, 0, 1)?.reshape((n, d))?)?;
    let ds = if r > 0 {
        col_sum(&g.narrow(1, 1, r)?.reshape((n, r * d))?)?.reshape((r, d))?
    } else {
        Tensor::zeros((0, d), dtokens.dtype(), dtokens.device())?
    };
    let dp = g.narrow(1, 1 + r, p)?.reshape((n * p, d))?;
    let (dp, dm) = match masks {
        None => (dp, Tensor::zeros(d, dtokens.dtype(), dtokens.device())?),
        Some(m) => {
            if m.len() != n * p {
                bail!(
                    "assemble_tokens_bwd: {} mask entries for {} patches",
                    m.len(),
                    n * p
                )
            }
            let mc = mask_column(m, dtokens.device())?;
            let w = mc.to_dtype(dtokens.dtype())?.reshape((1, n * p))?;
            let dm = w.matmul(&dp)?.reshape(d)?;
            let zeros = Tensor::zeros((n * p, d), dtokens.dtype(), dtokens.device())?;
            let dp = mc.broadcast_as((n * p, d))?.where_cond(&zeros, &dp)?;
            (dp, dm)
        }
    };
    Ok((dp, dc, ds, dm))
}

/// Row indices `b * stride + offset + i` for `i < count` and `b < n`, checked against `rows`.
fn strided_rows(
    rows: usize,
    n: usize,
    stride: usize,
    offset: usize,
    count: usize,
) -> Result<Vec<usize>> {
    if n > 0 && count > 0 && (n - 1) * stride + offset + count > rows {
        bail!("select_rows: {n} x {count} rows at stride {stride} + {offset} exceed {rows} rows")
    }
    Ok((0..n)
        .flat_map(|b| (0..count).map(move |i| b * stride + offset + i))
        .collect())
}

/// Selects rows `b * stride + offset + i` for `i < count` of every block `b < n` into
/// `[n * count, d]`.
pub fn select_rows(
    x: &Tensor,
    n: usize,
    stride: usize,
    offset: usize,
    count: usize,
) -> Result<Tensor> {
    let (x2, rows, d) = mat(x)?;
    if n * stride <= rows && offset + count <= stride {
        // a strided view: no index upload
        return x2
            .narrow(0, 0, n * stride)?
            .reshape((n, stride, d))?
            .narrow(1, offset, count)?
            .reshape((n * count, d));
    }
    let ix = strided_rows(rows, n, stride, offset, count)?;
    x2.index_select(&index(&ix, x.device())?, 0)
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
    let (a2, rows, d) = mat(acc)?;
    if g.elem_count() != n * count * d {
        bail!(
            "select_rows_bwd_add: {:?} into {:?} ({n} x {count} rows)",
            g.dims(),
            acc.dims()
        )
    }
    let ix = strided_rows(rows, n, stride, offset, count)?;
    scatter_add_rows(&a2, &ix, &g.reshape((n * count, d))?)?.reshape(acc.shape().clone())
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
    let out = select_rows_bwd_add(acc, g, n, stride, offset, count)?;
    write_into(acc, &out)
}

/// Gathers arbitrary rows `[idx.len(), d]`.
pub fn index_rows(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let (x2, rows, _) = mat(x)?;
    if let Some(&i) = idx.iter().find(|&&i| i >= rows) {
        bail!("index_rows: row {i} out of {rows}")
    }
    x2.index_select(&index(idx, x.device())?, 0)
}

/// Adjoint of [`index_rows`]: scatters (adds) `g` rows into a zero `[rows, d]` tensor.
pub fn index_rows_bwd(g: &Tensor, idx: &[usize], rows: usize) -> Result<Tensor> {
    let (g2, _, d) = mat(g)?;
    let zeros = Tensor::zeros((rows, d), g.dtype(), g.device())?;
    scatter_add_rows(&zeros, idx, &g2)
}

/// Concatenates matrices with the same number of columns along rows.
pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    Tensor::cat(parts, 0)
}

/// Sum of squares of all elements as a device scalar (f64 for f64 input, else f32).
pub fn sum_sq_t(x: &Tensor) -> Result<Tensor> {
    up(x)?.sqr()?.sum_all()
}

/// Sum of squares of all elements (synchronises with the device).
pub fn sum_sq(x: &Tensor) -> Result<f64> {
    sum_sq_t(x)?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

// ========================================================================= attention

/// RoPE tables as [`crate::attention::rope_tables`], placed on `device`.
pub fn rope_tables_on(
    h: usize,
    w: usize,
    head_dim: usize,
    base: f64,
    rescale: f64,
    dtype: DType,
    device: &Device,
) -> Result<Rope> {
    let r = crate::attention::rope_tables(h, w, head_dim, base, rescale, dtype)?;
    Ok(Rope {
        sin: r.sin.to_device(device)?,
        cos: r.cos.to_device(device)?,
    })
}

/// What [`attention_bwd`] needs, on the device of the forward pass: the rotated queries
/// and keys and the values (`[batch, heads, tokens, head_dim]`, contiguous), the
/// attention probabilities `[batch, heads, tokens, tokens]` and the RoPE tables extended
/// over the prefix tokens (identity rows).
pub struct AttnCache {
    shape: SeqShape,
    row0: usize,
    dim: usize,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    tables: Option<(Tensor, Tensor)>,
}

impl AttnCache {
    /// The attention probabilities `[batch, heads, tokens, tokens]`.
    pub fn probs(&self) -> &Tensor {
        &self.probs
    }
}

/// Checks that the groups tile the rows of the packed matrix in order; returns `D`.
fn check_groups(qkv: &Tensor, groups: &[AttnGroup<'_>]) -> Result<usize> {
    check_float(qkv, "attention")?;
    let (rows, d3) = qkv.dims2()?;
    crate::attention::check_tiling(rows, d3, groups)
}

/// `(sin, cos)` over all `tokens` rows in the compute type on `dev`: the prefix rows are
/// the identity rotation (sin 0, cos 1), so one broadcast rotates every row.
fn full_tables(
    r: &Rope,
    prefix: usize,
    dh: usize,
    cd: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let sin = r.sin.to_device(dev)?.to_dtype(cd)?;
    let cos = r.cos.to_device(dev)?.to_dtype(cd)?;
    if prefix == 0 {
        return Ok((sin, cos));
    }
    Ok((
        Tensor::cat(&[&Tensor::zeros((prefix, dh), cd, dev)?, &sin], 0)?,
        Tensor::cat(&[&Tensor::ones((prefix, dh), cd, dev)?, &cos], 0)?,
    ))
}

/// `[-z2, z1]` over the last dimension (`z = [z1, z2]`), the rotate-half pairing.
fn rotate_half(z: &Tensor) -> Result<Tensor> {
    let h = z.dim(D::Minus1)? / 2;
    Tensor::cat(
        &[
            &z.narrow(D::Minus1, h, h)?.neg()?,
            &z.narrow(D::Minus1, 0, h)?,
        ],
        D::Minus1,
    )
}

/// The transpose of [`rotate_half`]: `[u2, -u1]`.
fn rotate_half_t(u: &Tensor) -> Result<Tensor> {
    let h = u.dim(D::Minus1)? / 2;
    Tensor::cat(
        &[
            &u.narrow(D::Minus1, h, h)?,
            &u.narrow(D::Minus1, 0, h)?.neg()?,
        ],
        D::Minus1,
    )
}

/// `z cos + rotate_half(z) sin` on `[b, h, n, dh]` (tables `[n, dh]`), in the compute
/// type, returned contiguous in `z`'s type.
fn rope_fwd(z: &Tensor, tabs: &(Tensor, Tensor)) -> Result<Tensor> {
    let zf = up(z)?;
    let y = (zf.broadcast_mul(&tabs.1)? + rotate_half(&zf)?.broadcast_mul(&tabs.0)?)?;
    y.to_dtype(z.dtype())?.contiguous()
}

/// The transposed rotation (backward of [`rope_fwd`]): `dy cos + rotate_half^T(dy sin)`.
fn rope_bwd(dy: &Tensor, tabs: &(Tensor, Tensor)) -> Result<Tensor> {
    let g = up(dy)?;
    let dz = (g.broadcast_mul(&tabs.1)? + rotate_half_t(&g.broadcast_mul(&tabs.0)?)?)?;
    dz.to_dtype(dy.dtype())
}

/// Softmax over the last dimension of `scale * s`, with the row maximum subtracted, in the
/// compute type; returned in `s`'s type.
fn softmax_scaled(s: &Tensor, scale: f64) -> Result<Tensor> {
    let x = up(s)?.affine(scale, 0.0)?;
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&z)?.to_dtype(s.dtype())
}

/// Forward of one group: the output rows `[batch * tokens, D]` and, for training, the cache.
fn group_forward(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    g: &AttnGroup<'_>,
    d: usize,
    keep: bool,
) -> Result<(Tensor, Option<AttnCache>)> {
    let s = g.shape;
    let (b, n, h) = (s.batch, s.tokens, s.heads);
    let dh = d / h;
    let dev = qkv.device();
    let mut x = qkv.narrow(0, g.row0, b * n)?;
    if let Some(bias) = bias {
        x = x.broadcast_add(&bias.reshape((1, 3 * d))?)?;
    }
    let x = x.reshape((b, n, 3, h, dh))?;
    // [b, h, n, dh] views of q, k, v
    let part = |i: usize| -> Result<Tensor> { x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2) };
    let tables = g
        .rope
        .map(|r| full_tables(r, s.prefix, dh, compute_dtype(qkv.dtype()), dev))
        .transpose()?;
    let rot = |z: Tensor| -> Result<Tensor> {
        match &tables {
            Some(t) => rope_fwd(&z, t),
            None => z.contiguous(),
        }
    };
    let q = rot(part(0)?)?;
    let k = rot(part(1)?)?;
    let v = part(2)?.contiguous()?;
    let scale = 1.0 / (dh as f64).sqrt();
    let probs = softmax_scaled(&q.matmul(&k.t()?)?, scale)?;
    let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * n, d))?;
    let cache = keep.then_some(AttnCache {
        shape: s,
        row0: g.row0,
        dim: d,
        q,
        k,
        v,
        probs,
        tables,
    });
    Ok((out, cache))
}

fn forward(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    groups: &[AttnGroup<'_>],
    keep: bool,
) -> Result<(Tensor, Vec<AttnCache>)> {
    let d = check_groups(qkv, groups)?;
    if let Some(b) = bias {
        if b.elem_count() != 3 * d {
            bail!(
                "attention: bias {:?} for a [{}] projection",
                b.dims(),
                3 * d
            )
        }
    }
    let mut outs = Vec::with_capacity(groups.len());
    let mut caches = Vec::with_capacity(groups.len());
    for g in groups {
        let (o, c) = group_forward(qkv, bias, g, d, keep)?;
        outs.push(o);
        caches.extend(c);
    }
    Ok((Tensor::cat(&outs, 0)?, caches))
}

/// Training forward of several groups packed in one `[rows, 3D]` projection matrix (the
/// groups tile its rows in order), with the projection's bias `[3D]` added when given:
/// per group, the packed rows are viewed as `[B, N, 3, H, Dh]`, the patch rows of q and
/// k rotated (rotate-half RoPE), and the scores, softmax and weighted sum run as batched
/// matmuls over `[B, H]`. Returns `[rows, D]` and one cache per group.
pub fn attention_groups(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    groups: &[AttnGroup<'_>],
) -> Result<(Tensor, Vec<AttnCache>)> {
    forward(qkv, bias, groups, true)
}

/// [`attention_groups`] without caches (teacher, Gram teacher, probes).
pub fn attention_groups_infer(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    groups: &[AttnGroup<'_>],
) -> Result<Tensor> {
    Ok(forward(qkv, bias, groups, false)?.0)
}

/// Forward for training of one group: the attention output `[batch * tokens, D]` and a cache.
pub fn attention(qkv: &Tensor, s: SeqShape, rope: Option<&Rope>) -> Result<(Tensor, AttnCache)> {
    let (out, mut caches) = attention_groups(
        qkv,
        None,
        &[AttnGroup {
            row0: 0,
            shape: s,
            rope,
        }],
    )?;
    Ok((out, caches.pop().expect("one group")))
}

/// Forward without a cache.
pub fn attention_infer(qkv: &Tensor, s: SeqShape, rope: Option<&Rope>) -> Result<Tensor> {
    attention_groups_infer(
        qkv,
        None,
        &[AttnGroup {
            row0: 0,
            shape: s,
            rope,
        }],
    )
}

/// Gradient of [`attention`] with respect to its `qkv` input, `[batch * tokens, 3D]`.
pub fn attention_bwd(c: &AttnCache, dout: &Tensor) -> Result<Tensor> {
    attention_groups_bwd(std::slice::from_ref(c), dout)
}

/// Backward of one group: `dqkv` rows `[batch * tokens, 3D]`.
fn group_backward(c: &AttnCache, dout: &Tensor) -> Result<Tensor> {
    let s = c.shape;
    let (b, n, h, d) = (s.batch, s.tokens, s.heads, c.dim);
    let dh = d / h;
    let scale = 1.0 / (dh as f64).sqrt();
    let go = dout
        .narrow(0, c.row0, b * n)?
        .reshape((b, n, h, dh))?
        .transpose(1, 2)?
        .contiguous()?;
    let dv = c.probs.t()?.matmul(&go)?;
    let dp = go.matmul(&c.v.t()?)?;
    // dS = P (dP - rowsum(dP P)), scaled for the product q k^T / sqrt(dh)
    let pf = up(&c.probs)?;
    let dpf = dp.to_dtype(pf.dtype())?;
    let rowdot = (&dpf * &pf)?.sum_keepdim(D::Minus1)?;
    let ds = (pf * dpf.broadcast_sub(&rowdot)?)?
        .affine(scale, 0.0)?
        .to_dtype(c.probs.dtype())?;
    let mut dq = ds.matmul(&c.k)?;
    let mut dk = ds.t()?.matmul(&c.q)?;
    if let Some(t) = &c.tables {
        dq = rope_bwd(&dq, t)?;
        dk = rope_bwd(&dk, t)?;
    }
    let parts = [dq, dk, dv]
        .iter()
        .map(|t| t.transpose(1, 2)?.contiguous()?.reshape((b, n, 1, h, dh)))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)?.reshape((b * n, 3 * d))
}

/// Gradient of [`attention_groups`] with respect to the packed `qkv` (and, summed over
/// rows, its bias), `[rows, 3D]`, from the gradient of the packed output `[rows, D]`.
pub fn attention_groups_bwd(caches: &[AttnCache], dout: &Tensor) -> Result<Tensor> {
    attention_groups_bwd_refs(&caches.iter().collect::<Vec<_>>(), dout)
}

/// [`attention_groups_bwd`] over borrowed caches.
pub(crate) fn attention_groups_bwd_refs(caches: &[&AttnCache], dout: &Tensor) -> Result<Tensor> {
    let Some(first) = caches.first() else {
        bail!("attention_groups_bwd: no groups")
    };
    let d = first.dim;
    let (rows, dd) = dout.dims2()?;
    let mut next = 0;
    for c in caches {
        if c.dim != d || c.row0 != next {
            bail!(
                "attention_groups_bwd: caches do not tile a [{rows}, {}] projection in order",
                3 * d
            )
        }
        next += c.shape.batch * c.shape.tokens;
    }
    if dd != d || next != rows {
        bail!(
            "attention_groups_bwd: gradient {:?} for {next} rows of width {d}",
            dout.dims()
        )
    }
    let parts = caches
        .iter()
        .map(|c| group_backward(c, dout))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

// ============================================================================ losses

/// Sinkhorn-Knopp centering of teacher logits `[n, k]` at temperature `temp` as the
/// official code does it (no max subtraction, `iters` alternating normalisations), in
/// f32 for half inputs (f64 stays f64). Returns `[n, k]` rows that sum to one, in the
/// compute type. No host synchronisation.
pub fn sinkhorn_knopp(logits: &Tensor, temp: f64, iters: usize) -> Result<Tensor> {
    check_float(logits, "sinkhorn_knopp")?;
    let (l, n, k) = mat(logits)?;
    let q = up(&l)?.affine(1.0 / temp, 0.0)?.exp()?;
    let mut q = q.broadcast_div(&q.sum_all()?)?;
    for _ in 0..iters {
        // rows of the official K x N matrix are prototypes: each prototype's mass to 1/K
        let colsum = col_sum(&q)?.reshape((1, k))?;
        q = q.broadcast_div(&colsum)?.affine(1.0 / k as f64, 0.0)?;
        // then each sample's mass to 1/N
        let rowsum = q.sum_keepdim(1)?;
        q = q.broadcast_div(&rowsum)?.affine(1.0 / n as f64, 0.0)?;
    }
    q.affine(n as f64, 0.0)?.reshape(logits.shape().clone())
}

/// [`soft_cross_entropy`] keeping the per-row losses on the device: `([rows]` losses in
/// the compute type, gradient in the student's type`)`.
pub fn soft_cross_entropy_t(
    student: &Tensor,
    targets: &Tensor,
    pairs: &[Vec<(usize, f64)>],
    temp: f64,
    grad_scale: &[f64],
) -> Result<(Tensor, Tensor)> {
    check_float(student, "soft_cross_entropy")?;
    let (s2, rows, k) = mat(student)?;
    let (t2, trows, k2) = mat(targets)?;
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
    let dev = student.device();
    let cd = compute_dtype(student.dtype());
    let s = s2.to_dtype(cd)?;
    let t = t2.to_dtype(cd)?;
    // combined target sum_pairs w t per student row, one gathered slot at a time
    let slots = pairs.iter().map(Vec::len).max().unwrap_or(0);
    let mut comb: Option<Tensor> = None;
    for p in 0..slots {
        let ix: Vec<usize> = pairs
            .iter()
            .map(|pr| pr.get(p).map_or(0, |x| x.0))
            .collect();
        let w: Vec<f64> = pairs
            .iter()
            .map(|pr| pr.get(p).map_or(0.0, |x| x.1))
            .collect();
        let identity = rows == trows && ix.iter().enumerate().all(|(i, &j)| i == j);
        let gathered = if identity {
            t.clone()
        } else {
            t.index_select(&index(&ix, dev)?, 0)?
        };
        let term = if w.iter().all(|&v| v == 1.0) {
            gathered
        } else {
            gathered.broadcast_mul(&column(&w, cd, dev)?)?
        };
        comb = Some(match comb {
            None => term,
            Some(c) => (c + term)?,
        });
    }
    let comb = match comb {
        Some(c) => c,
        None => Tensor::zeros((rows, k), cd, dev)?,
    };
    let inv_t = 1.0 / temp;
    let m = s.max_keepdim(1)?.affine(inv_t, 0.0)?;
    let e = s.affine(inv_t, 0.0)?.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(1)?;
    let lse = (m + z.log()?)?;
    let mass = comb.sum_keepdim(1)?;
    let dot = (&comb * &s)?.sum_keepdim(1)?;
    let loss = (lse.mul(&mass)? - dot.affine(inv_t, 0.0)?)?.reshape(rows)?;
    let gs: Vec<f64> = grad_scale.iter().map(|g| g * inv_t).collect();
    let grad = e
        .broadcast_div(&z)?
        .broadcast_mul(&mass)?
        .sub(&comb)?
        .broadcast_mul(&column(&gs, cd, dev)?)?
        .to_dtype(student.dtype())?
        .reshape(student.shape().clone())?;
    Ok((loss, grad))
}

/// Soft-target cross-entropy `-sum_k t_k log_softmax(s / temp)_k` where each student row
/// `r` is paired with any number of target rows (`pairs[r] = [(target_row, weight), ..]`).
/// Returns the weighted loss of every student row (copied to the host) and the gradient of
/// `sum_r grad_scale[r] * loss[r]` with respect to the student logits.
pub fn soft_cross_entropy(
    student: &Tensor,
    targets: &Tensor,
    pairs: &[Vec<(usize, f64)>],
    temp: f64,
    grad_scale: &[f64],
) -> Result<(Vec<f64>, Tensor)> {
    let (loss, grad) = soft_cross_entropy_t(student, targets, pairs, temp, grad_scale)?;
    Ok((loss.to_dtype(DType::F64)?.to_vec1::<f64>()?, grad))
}

/// [`koleo`] keeping the loss on the device (a scalar in the compute type).
pub fn koleo_t(x: &Tensor) -> Result<(Tensor, Tensor)> {
    check_float(x, "koleo")?;
    let (x2, n, _) = mat(x)?;
    if n < 2 {
        bail!("KoLeo needs at least 2 samples per crop, got {n}")
    }
    let dev = x.device();
    const EPS: f64 = 1e-8;
    let (y, norms) = l2_normalize(&up(&x2)?, EPS)?;
    let dots = y.matmul(&y.t()?)?;
    let eye: Vec<u8> = (0..n * n).map(|i| u8::from(i / n == i % n)).collect();
    let eye = Tensor::from_vec(eye, (n, n), dev)?;
    let dots = eye.where_cond(
        &Tensor::full(-1.0, (n, n), dev)?.to_dtype(y.dtype())?,
        &dots,
    )?;
    let nn = dots.argmax_keepdim(1)?.reshape(n)?;
    let diff = (&y - y.index_select(&nn, 0)?)?.affine(1.0, EPS)?;
    let dist = diff.sqr()?.sum_keepdim(1)?.sqrt()?;
    let loss = dist.affine(1.0, EPS)?.log()?.mean_all()?.neg()?;
    // d(-mean log(dist + eps)) / d diff = -(1/n) diff / (dist (dist + eps)) where dist > 0
    let gd = dist
        .affine(1.0, EPS)?
        .mul(&dist)?
        .recip()?
        .affine(-1.0 / n as f64, 0.0)?;
    let pos = dist.gt(0.0)?;
    let gd = pos.where_cond(&gd, &gd.zeros_like()?)?;
    let gc = diff.broadcast_mul(&gd)?;
    // dy[i] += gc[i], dy[nn(i)] -= gc[i]
    let dy = (&gc - gc.zeros_like()?.index_add(&nn, &gc, 0)?)?;
    let dx = l2_normalize_bwd(&y, &norms, &dy, EPS)?
        .to_dtype(x.dtype())?
        .reshape(x.shape().clone())?;
    Ok((loss, dx))
}

/// KoLeo on one crop's features `[n, d]`: `-mean_i log(||x_i - x_nn(i) + 1e-8|| + 1e-8)`
/// on L2-normalised rows, nearest neighbour by dot product with the diagonal excluded.
/// Returns the loss (copied to the host) and `d loss / d x`.
pub fn koleo(x: &Tensor) -> Result<(f64, Tensor)> {
    let (l, g) = koleo_t(x)?;
    Ok((l.to_dtype(DType::F64)?.to_scalar::<f64>()?, g))
}

/// [`gram_loss`] keeping the loss on the device.
pub fn gram_loss_t(
    student: &Tensor,
    target: &Tensor,
    n_img: usize,
    per_image: bool,
) -> Result<(Tensor, Tensor)> {
    check_float(student, "gram_loss")?;
    let (s2, rows, d) = mat(student)?;
    if target.dims() != student.dims() || n_img == 0 || rows % n_img != 0 {
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
    let (ys, norms) = l2_normalize(&up(&s2)?, 1e-12)?;
    let (yt, _) = l2_normalize(&up(&target.reshape((rows, d))?)?, 1e-12)?;
    let s3 = ys.reshape((groups, p, d))?;
    let t3 = yt.reshape((groups, p, d))?;
    let diff = (s3.matmul(&s3.t()?)? - t3.matmul(&t3.t()?)?)?;
    let denom = (groups * p * p) as f64;
    let loss = diff.sqr()?.sum_all()?.affine(1.0 / denom, 0.0)?;
    // d/dX of sum (XX^T - G)^2 / denom = 4 (XX^T - G) X / denom (symmetric)
    let dys = diff
        .matmul(&s3)?
        .affine(4.0 / denom, 0.0)?
        .reshape((rows, d))?;
    let dx = l2_normalize_bwd(&ys, &norms, &dys, 1e-12)?
        .to_dtype(student.dtype())?
        .reshape(student.shape().clone())?;
    Ok((loss, dx))
}

/// Gram loss between student patches `[n_img * p, d]` and target patches of the same
/// shape, both L2-normalised per token (see [`crate::loss::gram_loss`]). Returns the loss
/// (copied to the host) and its gradient with respect to the student patches.
pub fn gram_loss(
    student: &Tensor,
    target: &Tensor,
    n_img: usize,
    per_image: bool,
) -> Result<(f64, Tensor)> {
    let (l, g) = gram_loss_t(student, target, n_img, per_image)?;
    Ok((l.to_dtype(DType::F64)?.to_scalar::<f64>()?, g))
}

/// The `[h_out w_out, h_in w_in]` bicubic matrix on `dev` in type `dt`.
fn resize_matrix(
    hw_in: (usize, usize),
    hw_out: (usize, usize),
    dt: DType,
    dev: &Device,
) -> Result<Tensor> {
    let (pin, pout) = (hw_in.0 * hw_in.1, hw_out.0 * hw_out.1);
    let m = crate::loss::bicubic_resize_matrix(hw_in, hw_out);
    Tensor::from_vec(m, (pout, pin), dev)?.to_dtype(dt)
}

/// Bicubically resizes per-image token grids `[n_img * h_in * w_in, d]` to
/// `[n_img * h_out * w_out, d]` (PyTorch bicubic semantics; one matmul with the resize
/// matrix over all images, in the compute type; output in `x`'s type).
pub fn resize_tokens(
    x: &Tensor,
    n_img: usize,
    hw_in: (usize, usize),
    hw_out: (usize, usize),
) -> Result<Tensor> {
    let (x2, rows, d) = mat(x)?;
    let (pin, pout) = (hw_in.0 * hw_in.1, hw_out.0 * hw_out.1);
    if rows != n_img * pin {
        bail!("resize_tokens: {rows} rows for {n_img} grids of {hw_in:?}")
    }
    let cd = compute_dtype(x.dtype());
    let m = resize_matrix(hw_in, hw_out, cd, x.device())?;
    let cols = x2
        .to_dtype(cd)?
        .reshape((n_img, pin, d))?
        .transpose(0, 1)?
        .reshape((pin, n_img * d))?;
    m.matmul(&cols)?
        .reshape((pout, n_img, d))?
        .transpose(0, 1)?
        .reshape((n_img * pout, d))?
        .to_dtype(x.dtype())
}

/// Adjoint of [`resize_tokens`].
pub fn resize_tokens_bwd(
    g: &Tensor,
    n_img: usize,
    hw_in: (usize, usize),
    hw_out: (usize, usize),
) -> Result<Tensor> {
    let (g2, rows, d) = mat(g)?;
    let (pin, pout) = (hw_in.0 * hw_in.1, hw_out.0 * hw_out.1);
    if rows != n_img * pout {
        bail!("resize_tokens_bwd: {rows} rows for {n_img} grids of {hw_out:?}")
    }
    let cd = compute_dtype(g.dtype());
    let m = resize_matrix(hw_in, hw_out, cd, g.device())?;
    let cols = g2
        .to_dtype(cd)?
        .reshape((n_img, pout, d))?
        .transpose(0, 1)?
        .reshape((pout, n_img * d))?;
    m.t()?
        .matmul(&cols)?
        .reshape((pin, n_img, d))?
        .transpose(0, 1)?
        .reshape((n_img * pin, d))?
        .to_dtype(g.dtype())
}

// ========================================================================= optimizer

/// One AdamW update (PyTorch semantics, decoupled weight decay, bias correction) of
/// `param` with moments `m`, `v` (tensors of the parameter's shape and type, on its
/// device); returns the new `(param, m, v)`. A half gradient is widened to the
/// parameter's type.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    if grad.dims() != param.dims() || m.dims() != param.dims() || v.dims() != param.dims() {
        bail!(
            "adamw_update: param {:?}, grad {:?}, m {:?}, v {:?}",
            param.dims(),
            grad.dims(),
            m.dims(),
            v.dims()
        )
    }
    let bc1 = 1.0 - h.beta1.powi(h.t as i32);
    let bc2 = 1.0 - h.beta2.powi(h.t as i32);
    let g = grad.to_dtype(param.dtype())?;
    let m = (m.affine(h.beta1, 0.0)? + g.affine(1.0 - h.beta1, 0.0)?)?;
    let v = (v.affine(h.beta2, 0.0)? + g.sqr()?.affine(1.0 - h.beta2, 0.0)?)?;
    let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), h.eps)?;
    let p = (param.affine(1.0 - h.lr * h.weight_decay, 0.0)?
        - m.affine(h.lr / bc1, 0.0)?.div(&denom)?)?;
    Ok((p, m, v))
}

/// `m * teacher + (1 - m) * student`, as a new tensor.
pub fn ema_update(teacher: &Tensor, student: &Tensor, momentum: f64) -> Result<Tensor> {
    if teacher.dims() != student.dims() {
        bail!(
            "ema_update: teacher {:?} vs student {:?}",
            teacher.dims(),
            student.dims()
        )
    }
    teacher.affine(momentum, 0.0)?
        + student
            .to_dtype(teacher.dtype())?
            .affine(1.0 - momentum, 0.0)?
}

/// `x <- s * x` in place (through [`write_into`]).
pub fn scale_inplace(x: &Tensor, s: f64) -> Result<()> {
    write_into(x, &x.affine(s, 0.0)?)
}

/// Copies `src` into `dst` in place (same shape and dtype).
pub fn copy_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    write_into(dst, src)
}

#[cfg(test)]
#[path = "portable_tests.rs"]
mod tests;
