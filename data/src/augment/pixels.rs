//! Pixel kernels of the augmentation, on planar float crops (`[3, S, S]`, values in [0, 1] until
//! normalised): conversion from interleaved RGB8 (with the horizontal flip folded in), the four colour
//! jitter operations with torchvision's tensor semantics (each clamps to [0, 1]), grayscale, a
//! separable Gaussian blur with reflect padding, solarize and normalisation. The loops are written over
//! whole planes so the compiler vectorises them.

/// ITU-R 601 luma weights as torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// Compiles a kernel twice, generic and with AVX2 enabled, and picks one at run time. Only the vector
/// width changes (no FMA, no reassociation), so both versions give bit-identical results.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            generic($($arg),*)
        }
    };
}

/// Splits `[3, n]` planes into R, G, B.
#[inline]
pub(crate) fn split_planes(planes: &mut [f32], n: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (r, rest) = planes[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, b)
}

multiversion! {
/// Interleaved RGB8 `side x side` to planar f32 in [0, 1], mirrored horizontally when `flip`.
pub(crate) fn to_planes(src: &[u8], side: usize, flip: bool, dst: &mut [f32]) {
    const LANES: usize = 8;
    const INV: f32 = 1.0 / 255.0;
    let n = side * side;
    let (r, g, b) = split_planes(dst, n);
    let full = side / LANES * LANES;
    for y in 0..side {
        let row = &src[y * side * 3..(y + 1) * side * 3];
        let span = y * side..(y + 1) * side;
        let (ro, go, bo) = (&mut r[span.clone()], &mut g[span.clone()], &mut b[span]);
        // Eight pixels at a time through fixed-size arrays, so the deinterleave vectorises.
        for x0 in (0..full).step_by(LANES) {
            let px: &[u8; 3 * LANES] = row[x0 * 3..x0 * 3 + 3 * LANES].try_into().expect("24 bytes");
            let (mut cr, mut cg, mut cb) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                cr[l] = f32::from(px[3 * l]) * INV;
                cg[l] = f32::from(px[3 * l + 1]) * INV;
                cb[l] = f32::from(px[3 * l + 2]) * INV;
            }
            if flip {
                cr.reverse();
                cg.reverse();
                cb.reverse();
                let at = side - x0 - LANES;
                ro[at..at + LANES].copy_from_slice(&cr);
                go[at..at + LANES].copy_from_slice(&cg);
                bo[at..at + LANES].copy_from_slice(&cb);
            } else {
                ro[x0..x0 + LANES].copy_from_slice(&cr);
                go[x0..x0 + LANES].copy_from_slice(&cg);
                bo[x0..x0 + LANES].copy_from_slice(&cb);
            }
        }
        for x in full..side {
            let at = if flip { side - 1 - x } else { x };
            ro[at] = f32::from(row[3 * x]) * INV;
            go[at] = f32::from(row[3 * x + 1]) * INV;
            bo[at] = f32::from(row[3 * x + 2]) * INV;
        }
    }
}
}

multiversion! {
    /// `x <- clamp(x * f, 0, 1)`.
    pub(crate) fn adjust_brightness(planes: &mut [f32], f: f32) {
        for v in planes {
            *v = (*v * f).clamp(0.0, 1.0);
        }
    }
}

/// Blend every pixel with the mean grey level of the whole crop: `clamp(f x + (1 - f) mean)`.
pub(crate) fn adjust_contrast(planes: &mut [f32], n: usize, f: f32) {
    let mean = mean_grey(planes, n);
    let offset = (1.0 - f) * mean;
    blend_constant(&mut planes[..3 * n], f, offset);
}

multiversion! {
    /// Mean of the grey level, summed in 16 fixed lanes (vectorisable, same result on every CPU).
    fn mean_grey(planes: &[f32], n: usize) -> f32 {
        let (r, rest) = planes[..3 * n].split_at(n);
        let (g, b) = rest.split_at(n);
        let mut lanes = [0.0f32; 16];
        let chunks = n / 16;
        for c in 0..chunks {
            let (r, g, b) = (&r[c * 16..c * 16 + 16], &g[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
            for l in 0..16 {
                lanes[l] += LUMA[0] * r[l] + LUMA[1] * g[l] + LUMA[2] * b[l];
            }
        }
        let mut sum: f64 = lanes.iter().map(|&v| f64::from(v)).sum();
        for i in chunks * 16..n {
            sum += f64::from(LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i]);
        }
        (sum / n as f64) as f32
    }
}

multiversion! {
    /// `x <- clamp(f x + offset, 0, 1)`.
    fn blend_constant(values: &mut [f32], f: f32, offset: f32) {
        for v in values {
            *v = (f * *v + offset).clamp(0.0, 1.0);
        }
    }
}

multiversion! {
/// Blend every pixel with its own grey level: `clamp(f x + (1 - f) grey)`.
pub(crate) fn adjust_saturation(planes: &mut [f32], n: usize, f: f32) {
    let (r, g, b) = split_planes(planes, n);
    let k = 1.0 - f;
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let grey = k * (LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b);
        *r = (f * *r + grey).clamp(0.0, 1.0);
        *g = (f * *g + grey).clamp(0.0, 1.0);
        *b = (f * *b + grey).clamp(0.0, 1.0);
    }
}
}

/// Hue rotation of one pixel (see [`adjust_hue`]); comparisons are written as selects so the loop
/// vectorises.
#[inline(always)]
fn hue_pixel(rr: f32, gg: f32, bb: f32, shift6: f32) -> (f32, f32, f32) {
    let max = |a: f32, b: f32| if a > b { a } else { b };
    let min = |a: f32, b: f32| if a < b { a } else { b };
    let maxc = max(max(rr, gg), bb);
    let minc = min(min(rr, gg), bb);
    let cr = maxc - minc;
    let inv = 1.0 / if cr > 0.0 { cr } else { 1.0 };
    let hr = (gg - bb) * inv;
    let hg = 2.0 + (bb - rr) * inv;
    let hb = 4.0 + (rr - gg) * inv;
    let h6 = if maxc == rr {
        hr
    } else if maxc == gg {
        hg
    } else {
        hb
    };
    // h6 in [-1, 5], shift6 in [-3, 3]: one wrap each way brings it to [0, 6).
    let h6 = h6 + shift6;
    let h6 = if h6 < 0.0 { h6 + 6.0 } else { h6 };
    let h6 = if h6 >= 6.0 { h6 - 6.0 } else { h6 };
    let channel = |offset: f32| {
        let k = offset + h6;
        let k = if k >= 6.0 { k - 6.0 } else { k };
        let m = min(k, 4.0 - k);
        let m = m.clamp(0.0, 1.0);
        maxc - cr * m
    };
    (channel(5.0), channel(3.0), channel(1.0))
}

multiversion! {
    /// Rotates the HSV hue by `shift` turns (torchvision `adjust_hue`: RGB -> HSV, `h = (h + shift) mod 1`,
    /// HSV -> RGB). The rotation keeps the max and min channel, so it is computed from them with the
    /// branch-free form of HSV -> RGB: channel `n` (R 5, G 3, B 1) is
    /// `max - chroma * clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6h) mod 6`. Grey pixels (chroma 0)
    /// come out unchanged.
    pub(crate) fn adjust_hue(planes: &mut [f32], n: usize, shift: f32) {
        const LANES: usize = 8;
        let (r, g, b) = split_planes(planes, n);
        let shift6 = shift * 6.0;
        let full = n / LANES * LANES;
        for ((r, g), b) in r[..full].chunks_exact_mut(LANES).zip(g[..full].chunks_exact_mut(LANES)).zip(b[..full].chunks_exact_mut(LANES)) {
            let (mut ro, mut go, mut bo) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                (ro[l], go[l], bo[l]) = hue_pixel(r[l], g[l], b[l], shift6);
            }
            r.copy_from_slice(&ro);
            g.copy_from_slice(&go);
            b.copy_from_slice(&bo);
        }
        for i in full..n {
            (r[i], g[i], b[i]) = hue_pixel(r[i], g[i], b[i], shift6);
        }
    }
}

multiversion! {
/// All three channels set to the grey level.
pub(crate) fn grayscale(planes: &mut [f32], n: usize) {
    let (r, g, b) = split_planes(planes, n);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let grey = LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b;
        *r = grey;
        *g = grey;
        *b = grey;
    }
}
}

multiversion! {
    /// Pixels at or above `threshold` (on the 0..1 scale) are inverted.
    pub(crate) fn solarize(planes: &mut [f32], threshold: f32) {
        for v in planes {
            *v = if *v >= threshold { 1.0 - *v } else { *v };
        }
    }
}

multiversion! {
/// `x <- (x - mean) / std`, per channel.
pub(crate) fn normalize(planes: &mut [f32], n: usize, mean: &[f32; 3], std: &[f32; 3]) {
    for c in 0..3 {
        let inv = 1.0 / std[c];
        let off = mean[c] * inv;
        for v in &mut planes[c * n..(c + 1) * n] {
            *v = *v * inv - off;
        }
    }
}
}

/// torchvision's Gaussian kernel: `exp(-x^2 / (2 sigma^2))` at `x = -k/2 ..= k/2`, normalised.
pub(crate) fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size / 2) as f32;
    let mut k: Vec<f32> = (0..size)
        .map(|i| (-0.5 * ((i as f32 - half) / sigma).powi(2)).exp())
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

/// Reflect padding index (`torch.nn.functional.pad(mode="reflect")`: -1 -> 1, n -> n - 2), repeated
/// for pads wider than the image.
#[inline]
pub(crate) fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// Scratch buffers of the blur.
#[derive(Debug, Default)]
pub(crate) struct BlurScratch {
    tmp: Vec<f32>,
    row: Vec<f32>,
}

/// Separable Gaussian blur of each `side x side` plane, in place.
pub(crate) fn gaussian_blur(
    planes: &mut [f32],
    side: usize,
    kernel: &[f32],
    scratch: &mut BlurScratch,
) {
    let n = side * side;
    let half = kernel.len() / 2;
    scratch.tmp.resize(n, 0.0);
    scratch.row.resize(side + 2 * half, 0.0);
    for c in 0..3 {
        let plane = &mut planes[c * n..(c + 1) * n];
        for y in 0..side {
            let src = &plane[y * side..(y + 1) * side];
            let row = &mut scratch.row;
            row[half..half + side].copy_from_slice(src);
            for p in 0..half {
                row[half - 1 - p] = src[reflect(-(p as isize) - 1, side)];
                row[half + side + p] = src[reflect((side + p) as isize, side)];
            }
            let out = &mut scratch.tmp[y * side..(y + 1) * side];
            if let Ok(k9) = <&[f32; 9]>::try_from(kernel) {
                conv9(out, |k| &row[k..k + side], k9);
            } else {
                conv_generic(out, |k| &row[k..k + side], kernel);
            }
        }
        for y in 0..side {
            let out = &mut plane[y * side..(y + 1) * side];
            let tmp = &scratch.tmp;
            let src_row = |k: usize| {
                let sy = reflect(y as isize + k as isize - half as isize, side);
                &tmp[sy * side..(sy + 1) * side]
            };
            if let Ok(k9) = <&[f32; 9]>::try_from(kernel) {
                conv9(out, src_row, k9);
            } else {
                conv_generic(out, src_row, kernel);
            }
        }
    }
}

/// `out = sum_k kernel[k] * src(k)`, any kernel size.
fn conv_generic<'a>(out: &mut [f32], src: impl Fn(usize) -> &'a [f32], kernel: &[f32]) {
    out.fill(0.0);
    for (k, &w) in kernel.iter().enumerate() {
        for (o, s) in out.iter_mut().zip(src(k)) {
            *o += w * s;
        }
    }
}

/// The 9-tap symmetric case, one pass with the taps in registers.
fn conv9<'a>(out: &mut [f32], src: impl Fn(usize) -> &'a [f32], k: &[f32; 9]) {
    let rows: [&[f32]; 9] = std::array::from_fn(src);
    conv9_rows(out, &rows, k);
}

multiversion! {
    fn conv9_rows(out: &mut [f32], rows: &[&[f32]; 9], k: &[f32; 9]) {
        let n = out.len();
        let [r0, r1, r2, r3, r4, r5, r6, r7, r8] = rows.map(|r| &r[..n]);
        for x in 0..n {
            out[x] = k[4] * r4[x] + k[0] * (r0[x] + r8[x]) + k[1] * (r1[x] + r7[x]) + k[2] * (r2[x] + r6[x]) + k[3] * (r3[x] + r5[x]);
        }
    }
}
