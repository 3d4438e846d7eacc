//! Multi-head self-attention with 2-D RoPE on the patch tokens, fused per (image, head):
//! split q/k/v out of the packed `qkv` projection, rotate the patch rows, scores,
//! softmax and the weighted sum, without materialising transposed copies. The backward
//! pass recomputes nothing but the cheap rotations: it keeps the rotated q, k, v and the
//! attention probabilities.

use candle_core::{bail, Result, Tensor};
#[allow(unused_imports)]
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::float_dispatch;
use crate::host::{from_vec, view, View};
use crate::nn::{lane_dot, lane_max, lane_sum, rows_dim};
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
    (0..q)
        .map(|k| base.powf(4.0 * k as f64 / head_dim as f64))
        .collect()
}

/// RoPE tables for an `h x w` patch grid with per-axis ("separate") coordinate
/// normalisation to `[-1, 1]`, multiplied by `rescale` (1 outside training). Computed in
/// f64 and stored in `dtype`.
pub fn rope_tables(
    h: usize,
    w: usize,
    head_dim: usize,
    base: f64,
    rescale: f64,
    dtype: candle_core::DType,
) -> Result<Rope> {
    if !head_dim.is_multiple_of(4) {
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

/// What [`attention_bwd`] needs from one group's forward pass: on the CPU, the packed
/// projections as they entered the forward pass (shared with the caller's tensor, not
/// copied; the rotations are recomputed) and the attention probabilities
/// `[batch * heads, tokens, tokens]`; on a device, [`crate::portable::AttnCache`].
pub struct AttnCache(Cache);

enum Cache {
    Host(HostCache),
    Device(crate::portable::AttnCache),
}

struct HostCache {
    shape: SeqShape,
    row0: usize,
    dim: usize,
    qkv: Tensor,
    bias: Option<Tensor>,
    probs: Tensor,
    rope: Option<Rope>,
}

#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(*mut T);
// SAFETY: used only to write disjoint (row, column-range) windows from parallel tasks.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Rows of the register tile of [`tile`].
const MR: usize = 8;
/// Columns of the register tile of [`tile`] (one AVX-512 register of f32).
const NR: usize = 16;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Geometry of one (image, head) task, with the padded sizes of its scratch buffers:
/// token rows padded to `nr` (a multiple of [`MR`]), token columns of the score matrix
/// padded to `np` (a multiple of [`NR`]), channels padded to `dhp`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geo {
    n: usize,
    nr: usize,
    np: usize,
    dh: usize,
    dhp: usize,
    d: usize,
    prefix: usize,
    heads: usize,
}

impl Geo {
    fn new(s: &SeqShape, d: usize) -> Self {
        let n = s.tokens;
        let dh = d / s.heads;
        Geo {
            n,
            nr: round_up(n, MR),
            np: round_up(n, NR),
            dh,
            dhp: round_up(dh, NR),
            d,
            prefix: s.prefix,
            heads: s.heads,
        }
    }
}

/// Per-thread scratch of one attention call. Padding rows and columns are zero when the
/// buffers are created and no task writes them, which the tiled products rely on.
pub(crate) struct Scratch<T> {
    /// `(n, dh, d, heads, backward)` the buffers were laid out for.
    key: (usize, usize, usize, usize, bool),
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// `k^T` in the forward pass, `v^T` in the backward pass: `[dh, np]`.
    t: Vec<T>,
    /// Scores / probabilities `[nr, np]`.
    p: Vec<T>,
    /// Backward: `dP` then `dS`, `[nr, np]`.
    dp: Vec<T>,
    /// Backward: `dO`, `dQ`, `dK`, `[nr, dhp]` each.
    dout: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
}

thread_local! {
    /// This thread's recent attention scratches (one per geometry: global and local crops,
    /// forward and backward), reused across blocks and steps so that tasks neither allocate
    /// nor clear memory.
    static SCRATCH: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratches kept per thread.
const SCRATCH_SLOTS: usize = 6;

/// Runs `f` with this thread's scratch for geometry `g`, creating it if needed.
fn with_scratch<T: Real, R>(g: &Geo, backward: bool, f: impl FnOnce(&mut Scratch<T>) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut slots = cell.borrow_mut();
        let key = (g.n, g.dh, g.d, g.heads, backward);
        let pos = slots
            .iter()
            .position(|b| b.downcast_ref::<Scratch<T>>().is_some_and(|s| s.key == key));
        let pos = pos.unwrap_or_else(|| {
            if slots.len() == SCRATCH_SLOTS {
                slots.remove(0);
            }
            slots.push(Box::new(Scratch::<T>::new(g, backward)));
            slots.len() - 1
        });
        f(slots[pos]
            .downcast_mut::<Scratch<T>>()
            .expect("scratch of type T"))
    })
}

impl<T: Real> Scratch<T> {
    fn new(g: &Geo, backward: bool) -> Self {
        let z = |len: usize| vec![T::zero(); len];
        let (rows, cols) = (g.nr * g.dhp, g.nr * g.np);
        let bw = |len: usize| if backward { z(len) } else { vec![] };
        Scratch {
            key: (g.n, g.dh, g.d, g.heads, backward),
            q: z(rows),
            k: z(rows),
            v: z(rows),
            t: z(g.dh * g.np),
            p: z(cols),
            dp: bw(cols),
            dout: bw(rows),
            dq: bw(rows),
            dk: bw(rows),
        }
    }
}

/// The `MR x NR` block `C[r][c] = sum_{k < kk} A[r][k] * B[k][c]` with
/// `A[r][k] = a[r * ars + k * aks]` and `B[k][c] = b[k * bks + c]`, accumulated in registers
/// with fused multiply-adds in the fixed order k = 0, 1, ...
///
/// # Safety
/// Every `a[r * ars + k * aks]` for `r < MR`, `k < kk` and every `b[k * bks + c]` for
/// `c < NR`, `k < kk` must be in bounds.
#[inline(always)]
unsafe fn tile<T: Real>(
    a: *const T,
    ars: usize,
    aks: usize,
    b: *const T,
    bks: usize,
    kk: usize,
) -> [[T; NR]; MR] {
    let mut acc = [[T::zero(); NR]; MR];
    for k in 0..kk {
        // SAFETY: in bounds by the caller's contract.
        let bv: [T; NR] = unsafe { std::ptr::read_unaligned(b.add(k * bks) as *const [T; NR]) };
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let av = unsafe { *a.add(r * ars + k * aks) };
            for c in 0..NR {
                row[c] = av.mul_add(bv[c], row[c]);
            }
        }
    }
    acc
}

/// `C = alpha * A B` for `A` of `m_pad x kk` (rows padded to [`MR`], strides `ars`, `aks`)
/// and `B` of `kk x n_pad` (row stride `bks`, columns padded to [`NR`]); stores rows
/// `< m_store` and columns `< n_store` of `C` at `c[i * ldc + j]`. Each element is one
/// chain of fused multiply-adds over k in order, so the result does not depend on the
/// tiling or on the thread.
///
/// # Safety
/// `c` must be valid for writes at every stored position, and no other thread may access
/// those positions during the call.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn small_mm<T: Real>(
    (m_pad, n_pad, kk): (usize, usize, usize),
    (a, ars, aks): (&[T], usize, usize),
    (b, bks): (&[T], usize),
    (c, ldc, m_store, n_store): (*mut T, usize, usize, usize),
    alpha: T,
) {
    if kk == 0 || m_store == 0 || n_store == 0 {
        return;
    }
    assert!(m_pad % MR == 0 && n_pad % NR == 0 && m_store <= m_pad && n_store <= n_pad);
    assert!(
        (m_pad - 1) * ars + (kk - 1) * aks < a.len(),
        "small_mm: A out of bounds"
    );
    assert!(
        (kk - 1) * bks + n_pad <= b.len(),
        "small_mm: B out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == candle_core::DType::F32 && crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: T is f32 (same layout); AVX-512 was detected at run time; bounds as
        // checked above and the caller's contract on `c`.
        unsafe {
            avx512::small_mm_f32(
                (m_store, n_store, n_pad, kk),
                (a.as_ptr() as *const f32, ars, aks),
                (b.as_ptr() as *const f32, bks),
                (c as *mut f32, ldc),
                alpha.f() as f32,
            )
        };
        return;
    }
    for i0 in (0..m_store).step_by(MR) {
        for c0 in (0..n_store).step_by(NR) {
            // SAFETY: i0 + MR <= m_pad and c0 + NR <= n_pad, checked above.
            let acc = unsafe {
                tile(
                    a.as_ptr().add(i0 * ars),
                    ars,
                    aks,
                    b.as_ptr().add(c0),
                    bks,
                    kk,
                )
            };
            let rows = MR.min(m_store - i0);
            let cols = NR.min(n_store - c0);
            for (r, row) in acc.iter().enumerate().take(rows) {
                for (cc, &val) in row.iter().enumerate().take(cols) {
                    // SAFETY: a stored position, valid by the caller's contract.
                    unsafe { *c.add((i0 + r) * ldc + c0 + cc) = val * alpha };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// [`super::small_mm`] for f32 with explicit AVX-512: `8 x 32` register tiles (16
    /// accumulators, enough to keep both FMA ports busy) where the padded width allows,
    /// `8 x 16` at the edge; B rows loaded as vectors, A elements broadcast, one FMA chain
    /// per output element (the same chain for either tile width).
    ///
    /// # Safety
    /// AVX-512F must be available; the bounds of `super::small_mm` hold.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn small_mm_f32(
        (m_store, n_store, n_pad, kk): (usize, usize, usize, usize),
        (a, ars, aks): (*const f32, usize, usize),
        (b, bks): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        alpha: f32,
    ) {
        let al = _mm512_set1_ps(alpha);
        let mask = |cols: usize| -> __mmask16 {
            if cols >= NR {
                0xffff
            } else {
                (1u16 << cols) - 1
            }
        };
        for i0 in (0..m_store).step_by(MR) {
            let rows = MR.min(m_store - i0);
            let mut c0 = 0;
            while c0 < n_store {
                // SAFETY (whole block): in bounds by the caller's contract; c0 + 32 <= n_pad
                // for the wide tile, c0 + 16 <= n_pad otherwise.
                unsafe {
                    let ap = a.add(i0 * ars);
                    let bp = b.add(c0);
                    if c0 + 2 * NR <= n_pad && n_store - c0 > NR {
                        let mut lo = [_mm512_setzero_ps(); MR];
                        let mut hi = [_mm512_setzero_ps(); MR];
                        for k in 0..kk {
                            let b0 = _mm512_loadu_ps(bp.add(k * bks));
                            let b1 = _mm512_loadu_ps(bp.add(k * bks + NR));
                            let ak = ap.add(k * aks);
                            for r in 0..MR {
                                let av = _mm512_set1_ps(*ak.add(r * ars));
                                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
                            }
                        }
                        let m1 = mask(n_store - c0 - NR);
                        for r in 0..rows {
                            let dst = c.add((i0 + r) * ldc + c0);
                            _mm512_storeu_ps(dst, _mm512_mul_ps(lo[r], al));
                            _mm512_mask_storeu_ps(dst.add(NR), m1, _mm512_mul_ps(hi[r], al));
                        }
                        c0 += 2 * NR;
                    } else {
                        let mut acc = [_mm512_setzero_ps(); MR];
                        for k in 0..kk {
                            let bv = _mm512_loadu_ps(bp.add(k * bks));
                            let ak = ap.add(k * aks);
                            for (r, acc_r) in acc.iter_mut().enumerate() {
                                *acc_r =
                                    _mm512_fmadd_ps(_mm512_set1_ps(*ak.add(r * ars)), bv, *acc_r);
                            }
                        }
                        let m0 = mask(n_store - c0);
                        for (r, acc_r) in acc.iter().enumerate().take(rows) {
                            _mm512_mask_storeu_ps(
                                c.add((i0 + r) * ldc + c0),
                                m0,
                                _mm512_mul_ps(*acc_r, al),
                            );
                        }
                        c0 += NR;
                    }
                }
            }
        }
    }
}

/// `dst = src` for short rows, as 16-element block moves (a plain copy of unknown length
/// would become a `memcpy` call per row, which dominates at head dimension 64).
#[inline(always)]
fn copy_row<T: Real>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (a, b) in (&mut d).zip(&mut s) {
        let v: [T; 16] = b.try_into().expect("16-element chunk");
        a.copy_from_slice(&v);
    }
    for (a, &b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = b;
    }
}

/// [`copy_row`] into raw (possibly uninitialised) memory.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` elements.
#[inline(always)]
unsafe fn store_row<T: Real>(dst: *mut T, src: &[T]) {
    let mut s = src.chunks_exact(16);
    let mut j = 0;
    for b in &mut s {
        let v: [T; 16] = b.try_into().expect("16-element chunk");
        // SAFETY: j + 16 <= src.len(), inside the caller's window.
        unsafe { std::ptr::write_unaligned(dst.add(j) as *mut [T; 16], v) };
        j += 16;
    }
    for &v in s.remainder() {
        // SAFETY: j < src.len().
        unsafe { dst.add(j).write(v) };
        j += 1;
    }
}

/// `dst = src + bias` for short rows (see [`copy_row`]).
#[inline(always)]
fn add_row<T: Real>(dst: &mut [T], src: &[T], bias: &[T]) {
    assert!(dst.len() == src.len() && bias.len() == src.len());
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    let mut b = bias.chunks_exact(16);
    for ((o, x), c) in (&mut d).zip(&mut s).zip(&mut b) {
        let x: [T; 16] = x.try_into().expect("16-element chunk");
        let c: [T; 16] = c.try_into().expect("16-element chunk");
        let mut v = [T::zero(); 16];
        for l in 0..16 {
            v[l] = x[l] + c[l];
        }
        o.copy_from_slice(&v);
    }
    for ((o, &x), &c) in d
        .into_remainder()
        .iter_mut()
        .zip(s.remainder())
        .zip(b.remainder())
    {
        *o = x + c;
    }
}

/// RoPE on one head vector: `z cos + rotate_half(z) sin`, or its inverse (the transpose,
/// used on gradients) with `inverse`.
#[inline(always)]
fn rope_apply<T: Real>(z: &mut [T], sin: &[T], cos: &[T], inverse: bool) {
    let half = z.len() / 2;
    let (z1, z2) = z.split_at_mut(half);
    let (s1, s2) = sin.split_at(half);
    let (c1, c2) = cos.split_at(half);
    // the inverse is the same rotation with the sines negated
    let sg = if inverse { -T::one() } else { T::one() };
    let mut j = 0;
    let arr = |x: &[T]| -> [T; 16] { x.try_into().expect("16-element chunk") };
    while j + 16 <= half {
        let r = j..j + 16;
        let (a, b) = (arr(&z1[r.clone()]), arr(&z2[r.clone()]));
        let (sa, sb) = (arr(&s1[r.clone()]), arr(&s2[r.clone()]));
        let (ca, cb) = (arr(&c1[r.clone()]), arr(&c2[r.clone()]));
        let mut o1 = [T::zero(); 16];
        let mut o2 = [T::zero(); 16];
        for l in 0..16 {
            o1[l] = a[l] * ca[l] - sg * b[l] * sa[l];
            o2[l] = b[l] * cb[l] + sg * a[l] * sb[l];
        }
        z1[r.clone()].copy_from_slice(&o1);
        z2[r].copy_from_slice(&o2);
        j += 16;
    }
    while j < half {
        let (a, b) = (z1[j], z2[j]);
        z1[j] = a * c1[j] - sg * b * s1[j];
        z2[j] = b * c2[j] + sg * a * s2[j];
        j += 1;
    }
}

/// In-place softmax of one row in separate vectorisable passes (max, exp, sum, scale);
/// the sum runs over fixed lanes, so the result is deterministic.
#[inline(always)]
fn softmax_row<T: Real>(row: &mut [T]) {
    let m = lane_max(row);
    for v in row.iter_mut() {
        *v = (*v - m).vexp();
    }
    let inv = T::one() / lane_sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Copies the task's q, k, v rows out of the packed projections (row stride `3d`) into
/// the padded scratch, adding the projection bias when given, and rotates the patch rows
/// of q and k.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn load_qkv<T: Real>(
    x: &[T],
    bias: Option<&[T]>,
    b: usize,
    h: usize,
    g: &Geo,
    rope: Option<(&[T], &[T])>,
    sc: &mut Scratch<T>,
) {
    let (n, d, dh, dhp) = (g.n, g.d, g.dh, g.dhp);
    let cols = [
        h * dh..(h + 1) * dh,
        d + h * dh..d + (h + 1) * dh,
        2 * d + h * dh..2 * d + (h + 1) * dh,
    ];
    for i in 0..n {
        let row = &x[(b * n + i) * 3 * d..(b * n + i + 1) * 3 * d];
        let dst = i * dhp..i * dhp + dh;
        for (buf, c) in [&mut sc.q, &mut sc.k, &mut sc.v].into_iter().zip(&cols) {
            match bias {
                Some(bias) => add_row(&mut buf[dst.clone()], &row[c.clone()], &bias[c.clone()]),
                None => copy_row(&mut buf[dst.clone()], &row[c.clone()]),
            }
        }
        if let (Some((sin, cos)), true) = (rope, i >= g.prefix) {
            let t = (i - g.prefix) * dh..(i - g.prefix + 1) * dh;
            rope_apply(
                &mut sc.q[dst.clone()],
                &sin[t.clone()],
                &cos[t.clone()],
                false,
            );
            rope_apply(&mut sc.k[dst], &sin[t.clone()], &cos[t], false);
        }
    }
}

/// `dst[t * np + j] = src[j * dhp + t]` for `j < n`, `t < dh`.
#[inline(always)]
fn transpose_into<T: Real>(src: &[T], g: &Geo, dst: &mut [T]) {
    assert!(g.n <= g.np && g.n * g.dhp <= src.len() && g.dh * g.np <= dst.len() && g.dh <= g.dhp);
    for j in 0..g.n {
        let s = &src[j * g.dhp..j * g.dhp + g.dh];
        for (t, &v) in s.iter().enumerate() {
            // SAFETY: t < dh and j < n <= np, so t * np + j < dh * np <= dst.len().
            unsafe { *dst.get_unchecked_mut(t * g.np + j) = v };
        }
    }
}

simd_kernel! {
    /// Forward of one (image, head): scores, softmax, weighted sum into `out` (row stride
    /// `d`); the probabilities also go to `probs` (`[n, n]`) when given.
    #[allow(clippy::too_many_arguments)]
    fn attn_fwd_task<T>(
        x: &[T],
        bias: Option<&[T]>,
        rope: Option<(&[T], &[T])>,
        t: usize,
        g: &Geo,
        scale: T,
        sc: &mut Scratch<T>,
        out: SyncPtr<T>,
        probs: Option<SyncPtr<T>>
    ) {
        let (b, h) = (t / g.heads, t % g.heads);
        let (n, np, nr, dh, dhp) = (g.n, g.np, g.nr, g.dh, g.dhp);
        load_qkv(x, bias, b, h, g, rope, sc);
        transpose_into(&sc.k, g, &mut sc.t);
        // S = scale q k^T over all padded rows (padding rows and columns come out zero)
        // SAFETY: `p` is this thread's scratch of nr x np elements.
        unsafe { small_mm((nr, np, dh), (&sc.q, dhp, 1), (&sc.t, np), (sc.p.as_mut_ptr(), np, nr, np), scale) };
        for i in 0..n {
            softmax_row(&mut sc.p[i * np..i * np + n]);
        }
        if let Some(pr) = probs {
            for i in 0..n {
                // SAFETY: the task's window of n x n probabilities is its own.
                unsafe { store_row(pr.get().add(i * n), &sc.p[i * np..i * np + n]) };
            }
        }
        // O = P V, written to rows b*n.. and columns h*dh.. of the output
        // SAFETY: task (b, h) is the only writer of that window of `out`.
        unsafe {
            small_mm((nr, dhp, n), (&sc.p, np, 1), (&sc.v, dhp), (out.get().add(b * n * g.d + h * dh), g.d, n, dh), T::one())
        };
    }
}

simd_kernel! {
    /// Backward of one (image, head): writes the task's q, k and v columns of `dqkv`.
    #[allow(clippy::too_many_arguments)]
    fn attn_bwd_task<T>(
        x: &[T],
        bias: Option<&[T]>,
        rope: Option<(&[T], &[T])>,
        t: usize,
        g: &Geo,
        scale: T,
        probs: &[T],
        dout: &[T],
        sc: &mut Scratch<T>,
        dqkv: SyncPtr<T>
    ) {
        let (b, h) = (t / g.heads, t % g.heads);
        let (n, np, nr, dh, dhp, d) = (g.n, g.np, g.nr, g.dh, g.dhp, g.d);
        load_qkv(x, bias, b, h, g, rope, sc);
        transpose_into(&sc.v, g, &mut sc.t);
        for i in 0..n {
            let src = (b * n + i) * d + h * dh;
            copy_row(&mut sc.dout[i * dhp..i * dhp + dh], &dout[src..src + dh]);
            copy_row(&mut sc.p[i * np..i * np + n], &probs[i * n..(i + 1) * n]);
        }
        let base = (b * n) * 3 * d + h * dh;
        // dV = P^T dO, straight into the v columns of dqkv
        // SAFETY: task (b, h) is the only writer of its head's columns in its rows.
        unsafe {
            small_mm((nr, dhp, n), (&sc.p, 1, np), (&sc.dout, dhp), (dqkv.get().add(base + 2 * d), 3 * d, n, dh), T::one())
        };
        // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) * scale in place
        // SAFETY: `dp` is this thread's scratch of nr x np elements.
        unsafe { small_mm((nr, np, dh), (&sc.dout, dhp, 1), (&sc.t, np), (sc.dp.as_mut_ptr(), np, nr, np), T::one()) };
        for i in 0..n {
            let pr = &sc.p[i * np..i * np + n];
            let dr = &mut sc.dp[i * np..i * np + n];
            let dot = lane_dot(pr, dr);
            for j in 0..n {
                dr[j] = pr[j] * (dr[j] - dot) * scale;
            }
        }
        // dQ = dS K and dK = dS^T Q (on the rotated vectors), then rotate back
        // SAFETY: `dq` and `dk` are this thread's scratch of nr x dhp elements.
        unsafe {
            small_mm((nr, dhp, n), (&sc.dp, np, 1), (&sc.k, dhp), (sc.dq.as_mut_ptr(), dhp, nr, dhp), T::one());
            small_mm((nr, dhp, n), (&sc.dp, 1, np), (&sc.q, dhp), (sc.dk.as_mut_ptr(), dhp, nr, dhp), T::one());
        }
        for i in 0..n {
            let (dq, dk) = (&mut sc.dq[i * dhp..i * dhp + dh], &mut sc.dk[i * dhp..i * dhp + dh]);
            if let (Some((sin, cos)), true) = (rope, i >= g.prefix) {
                let r = (i - g.prefix) * dh..(i - g.prefix + 1) * dh;
                rope_apply(dq, &sin[r.clone()], &cos[r.clone()], true);
                rope_apply(dk, &sin[r.clone()], &cos[r], true);
            }
            let row = base + i * 3 * d;
            // SAFETY: as for dV.
            unsafe {
                store_row(dqkv.get().add(row), dq);
                store_row(dqkv.get().add(row + d), dk);
            }
        }
    }
}

/// One group of equally long sequences inside a packed `[rows, 3D]` projection matrix
/// (e.g. the global or the local crops): its rows start at `row0`.
#[derive(Clone, Copy, Debug)]
pub struct AttnGroup<'a> {
    /// First row of the group.
    pub row0: usize,
    /// Sequences, tokens, prefix and heads of the group.
    pub shape: SeqShape,
    /// RoPE tables of the group's patch grid.
    pub rope: Option<&'a Rope>,
}

/// Checks one group against the packed matrix; returns the model width `D`.
fn check(rows: usize, d3: usize, g: &AttnGroup<'_>) -> Result<usize> {
    let s = &g.shape;
    if !d3.is_multiple_of(3) || g.row0 + s.batch * s.tokens > rows {
        bail!(
            "attention: group {s:?} at row {} does not fit a [{rows}, {d3}] projection",
            g.row0
        )
    }
    let d = d3 / 3;
    if s.heads == 0 || !d.is_multiple_of(s.heads) {
        bail!("attention: dim {d} not divisible by {} heads", s.heads)
    }
    let dh = d / s.heads;
    if !dh.is_multiple_of(2) {
        bail!("attention: head dim {dh} must be even")
    }
    if s.prefix > s.tokens {
        bail!(
            "attention: prefix {} longer than the sequence {}",
            s.prefix,
            s.tokens
        )
    }
    if let Some(r) = g.rope {
        let (n, w) = r.sin.dims2()?;
        if n != s.tokens - s.prefix || w != dh || r.cos.dims() != r.sin.dims() {
            bail!(
                "attention: rope table {:?} for {} patch tokens of head dim {dh}",
                r.sin.dims(),
                s.tokens - s.prefix
            )
        }
    }
    Ok(d)
}

/// Checks that the groups tile the rows of the packed matrix in order.
fn check_groups(qkv: &Tensor, groups: &[AttnGroup<'_>]) -> Result<usize> {
    let (rows, d3) = rows_dim(qkv)?;
    check_tiling(rows, d3, groups)
}

/// Checks each group against a `[rows, d3]` packed projection and that the groups tile
/// its rows in order; returns the model width `D` (the fused kernel's and
/// `ops::portable`'s one check).
pub(crate) fn check_tiling(rows: usize, d3: usize, groups: &[AttnGroup<'_>]) -> Result<usize> {
    if groups.is_empty() {
        bail!("attention: no groups")
    }
    let mut next = 0;
    for g in groups {
        check(rows, d3, g)?;
        if g.row0 != next {
            bail!(
                "attention: groups must tile the rows in order (group at row {} after row {next})",
                g.row0
            )
        }
        next = g.row0 + g.shape.batch * g.shape.tokens;
    }
    if next != rows {
        bail!("attention: groups cover {next} of {rows} rows")
    }
    Ok(d3 / 3)
}

/// Tasks per rayon job: enough to amortise the job overhead, small enough to balance.
const TASKS_PER_JOB: usize = 4;

/// `(group, first task, end task)` of every rayon job over all groups.
fn jobs(groups: &[AttnGroup<'_>]) -> Vec<(usize, usize, usize)> {
    let mut out = vec![];
    for (gi, g) in groups.iter().enumerate() {
        let tasks = g.shape.batch * g.shape.heads;
        for t0 in (0..tasks).step_by(TASKS_PER_JOB) {
            out.push((gi, t0, tasks.min(t0 + TASKS_PER_JOB)));
        }
    }
    out
}

/// Contiguous copies of a group's RoPE tables (views borrow from these).
fn tables(rope: Option<&Rope>) -> Result<Option<(Tensor, Tensor)>> {
    rope.map(|r| Ok((r.sin.contiguous()?, r.cos.contiguous()?)))
        .transpose()
}

/// Checks the optional packed projection bias `[3D]`.
fn check_bias(bias: Option<&Tensor>, d: usize) -> Result<()> {
    match bias {
        Some(b) if b.elem_count() != 3 * d => bail!(
            "attention: bias {:?} for a [{}] projection",
            b.dims(),
            3 * d
        ),
        _ => Ok(()),
    }
}

fn forward<T: Real>(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    groups: &[AttnGroup<'_>],
    keep_probs: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let d = check_groups(qkv, groups)?;
    check_bias(bias, d)?;
    let qkv = qkv.contiguous()?;
    let x = view::<T>(&qkv)?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let bv = bias.as_ref().map(view::<T>).transpose()?;
    let rows = x.len() / (3 * d).max(1);
    let geos: Vec<Geo> = groups.iter().map(|g| Geo::new(&g.shape, d)).collect();
    let tabs: Vec<Option<(Tensor, Tensor)>> = groups
        .iter()
        .map(|g| tables(g.rope))
        .collect::<Result<_>>()?;
    let views = tabs
        .iter()
        .map(|t| {
            t.as_ref()
                .map(|(s, c)| Ok::<_, candle_core::Error>((view::<T>(s)?, view::<T>(c)?)))
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    // outputs are written (through raw pointers) by exactly one task each: no zeroing
    let mut out: Vec<T> = Vec::with_capacity(rows * d);
    let optr = SyncPtr(out.as_mut_ptr());
    let mut probs: Vec<Vec<T>> = groups
        .iter()
        .map(|gr| {
            Vec::with_capacity(if keep_probs {
                gr.shape.batch * gr.shape.heads * gr.shape.tokens * gr.shape.tokens
            } else {
                0
            })
        })
        .collect();
    let pptrs: Vec<SyncPtr<T>> = probs.iter_mut().map(|p| SyncPtr(p.as_mut_ptr())).collect();
    jobs(groups).into_par_iter().for_each(|(gi, t0, t1)| {
        let (g, gr) = (&geos[gi], &groups[gi]);
        let tab = views[gi].as_ref().map(|(s, c)| (&s[..], &c[..]));
        let xg = &x[gr.row0 * 3 * d..];
        // SAFETY: the group's rows start at row0 < rows (checked), inside the capacity.
        let og = SyncPtr(unsafe { optr.get().add(gr.row0 * d) });
        let scale = T::c(1.0 / (g.dh as f64).sqrt());
        let nn = g.n * g.n;
        with_scratch(g, false, |sc| {
            for t in t0..t1 {
                // SAFETY: task t owns probabilities t*n*n .. (t+1)*n*n of its group.
                let pr = keep_probs.then(|| SyncPtr(unsafe { pptrs[gi].get().add(t * nn) }));
                attn_fwd_task(xg, bv.as_deref(), tab, t, g, scale, sc, og, pr);
            }
        })
    });
    // SAFETY: the groups tile all rows and every (image, head) task wrote its n rows of
    // its head's dh columns, so every output element is initialised; likewise every task
    // wrote its n x n probabilities.
    unsafe {
        out.set_len(rows * d);
        for (p, gr) in probs.iter_mut().zip(groups) {
            if keep_probs {
                p.set_len(gr.shape.batch * gr.shape.heads * gr.shape.tokens * gr.shape.tokens);
            }
        }
    }
    let out = from_vec(out, (rows, d))?;
    let probs = probs
        .into_iter()
        .zip(groups)
        .filter(|_| keep_probs)
        .map(|(p, gr)| {
            from_vec(
                p,
                (
                    gr.shape.batch * gr.shape.heads,
                    gr.shape.tokens,
                    gr.shape.tokens,
                ),
            )
        })
        .collect::<Result<_>>()?;
    Ok((out, probs))
}

/// Training forward of several groups packed in one `[rows, 3D]` projection matrix (the
/// groups tile its rows in order), with the projection's bias `[3D]` added on the fly
/// when given (so the projection itself can skip it): one parallel pass over every
/// (image, head) of every group, writing one `[rows, D]` output. Returns one cache per
/// group; the caches share `qkv`'s storage, which must not change before the backward.
pub fn attention_groups(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    groups: &[AttnGroup<'_>],
) -> Result<(Tensor, Vec<AttnCache>)> {
    if crate::portable::active(qkv) {
        let (out, caches) = crate::portable::attention_groups(qkv, bias, groups)?;
        return Ok((
            out,
            caches
                .into_iter()
                .map(|c| AttnCache(Cache::Device(c)))
                .collect(),
        ));
    }
    let (out, probs) = float_dispatch!(qkv.dtype(), T => forward::<T>(qkv, bias, groups, true)?);
    let d = qkv.dim(1)? / 3;
    let caches = groups
        .iter()
        .zip(probs)
        .map(|(g, probs)| {
            AttnCache(Cache::Host(HostCache {
                shape: g.shape,
                row0: g.row0,
                dim: d,
                qkv: qkv.clone(),
                bias: bias.cloned(),
                probs,
                rope: g.rope.cloned(),
            }))
        })
        .collect();
    Ok((out, caches))
}

/// [`attention_groups`] without caches (teacher, Gram teacher, probes).
pub fn attention_groups_infer(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    groups: &[AttnGroup<'_>],
) -> Result<Tensor> {
    if crate::portable::active(qkv) {
        return crate::portable::attention_groups_infer(qkv, bias, groups);
    }
    Ok(float_dispatch!(qkv.dtype(), T => forward::<T>(qkv, bias, groups, false)?).0)
}

/// Forward for training of one group: the attention output `[batch * tokens, D]` and a
/// cache (sharing `qkv`'s storage).
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

/// Forward without a cache (teacher, Gram teacher, probes).
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

/// Gradient of [`attention_groups`] with respect to the packed `qkv` (and, summed over
/// rows, its bias), `[rows, 3D]`, from the gradient of the packed output `[rows, D]`; one
/// parallel pass over all groups.
pub fn attention_groups_bwd(caches: &[AttnCache], dout: &Tensor) -> Result<Tensor> {
    if caches.is_empty() {
        bail!("attention_groups_bwd: no groups")
    }
    if let Some(dev) = caches
        .iter()
        .map(|c| match &c.0 {
            Cache::Device(d) => Some(d),
            Cache::Host(_) => None,
        })
        .collect::<Option<Vec<_>>>()
    {
        return crate::portable::attention_groups_bwd_refs(&dev, dout);
    }
    let caches = caches
        .iter()
        .map(|c| match &c.0 {
            Cache::Host(h) => Ok(h),
            Cache::Device(_) => bail!("attention_groups_bwd: caches from different devices"),
        })
        .collect::<Result<Vec<_>>>()?;
    let first = caches[0];
    let d = first.dim;
    let (rows, dd) = rows_dim(dout)?;
    let mut next = 0;
    for c in &caches {
        if c.dim != d || c.row0 != next || rows_dim(&c.qkv)? != (rows, 3 * d) {
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
    let groups: Vec<AttnGroup<'_>> = caches
        .iter()
        .map(|c| AttnGroup {
            row0: c.row0,
            shape: c.shape,
            rope: c.rope.as_ref(),
        })
        .collect();
    float_dispatch!(dout.dtype(), T => {
        let qkv = first.qkv.contiguous()?;
        let x = view::<T>(&qkv)?;
        let bias = first.bias.as_ref().map(|b| b.contiguous()).transpose()?;
        let bv = bias.as_ref().map(view::<T>).transpose()?;
        let dout = dout.contiguous()?;
        let go = view::<T>(&dout)?;
        let geos: Vec<Geo> = groups.iter().map(|g| Geo::new(&g.shape, d)).collect();
        let probs: Vec<View<'_, T>> = caches.iter().map(|c| view::<T>(&c.probs)).collect::<Result<_>>()?;
        let tabs: Vec<Option<(Tensor, Tensor)>> = groups.iter().map(|g| tables(g.rope)).collect::<Result<_>>()?;
        let views = tabs
            .iter()
            .map(|t| t.as_ref().map(|(s, c)| Ok::<_, candle_core::Error>((view::<T>(s)?, view::<T>(c)?))).transpose())
            .collect::<Result<Vec<_>>>()?;
        let mut dqkv: Vec<T> = Vec::with_capacity(rows * 3 * d);
        let dptr = SyncPtr(dqkv.as_mut_ptr());
        jobs(&groups).into_par_iter().for_each(|(gi, t0, t1)| {
            let (g, gr) = (&geos[gi], &groups[gi]);
            let tab = views[gi].as_ref().map(|(s, c)| (&s[..], &c[..]));
            let xg = &x[gr.row0 * 3 * d..];
            let gog = &go[gr.row0 * d..];
            // SAFETY: row0 < rows, so the offset stays inside the capacity.
            let dg = SyncPtr(unsafe { dptr.get().add(gr.row0 * 3 * d) });
            let scale = T::c(1.0 / (g.dh as f64).sqrt());
            let nn = g.n * g.n;
            with_scratch(g, true, |sc| {
                for t in t0..t1 {
                    attn_bwd_task(xg, bv.as_deref(), tab, t, g, scale, &probs[gi][t * nn..(t + 1) * nn], gog, sc, dg);
                }
            })
        });
        // SAFETY: every task wrote the q, k and v columns of its head in its rows, and the
        // groups tile all rows, so every element is initialised.
        unsafe { dqkv.set_len(rows * 3 * d) };
        from_vec(dqkv, (rows, 3 * d))
    })
}
