//! Pixel kernels of the augmentation, on planar float crops (`[3, S, S]`, values in [0, 1] until
//! normalised): conversion from interleaved RGB8 (with the horizontal flip folded in), the four colour
//! jitter operations with torchvision's tensor semantics (each clamps to [0, 1]), grayscale, a
//! separable Gaussian blur with reflect padding, solarize and normalisation. The loops are written over
//! whole planes so the compiler vectorises them.

/// ITU-R 601 luma weights as torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// Splits `[3, n]` planes into R, G, B.
#[inline]
pub(crate) fn split_planes(planes: &mut [f32], n: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (r, rest) = planes[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, b)
}

/// Interleaved RGB8 `side x side` to planar f32 in [0, 1], mirrored horizontally when `flip`.
pub(crate) fn to_planes(src: &[u8], side: usize, flip: bool, dst: &mut [f32]) {
    let n = side * side;
    let (r, g, b) = split_planes(dst, n);
    const INV: f32 = 1.0 / 255.0;
    for y in 0..side {
        let row = &src[y * side * 3..(y + 1) * side * 3];
        let span = y * side..(y + 1) * side;
        let (ro, go, bo) = (&mut r[span.clone()], &mut g[span.clone()], &mut b[span]);
        if flip {
            for (x, px) in row.chunks_exact(3).rev().enumerate() {
                ro[x] = f32::from(px[0]) * INV;
                go[x] = f32::from(px[1]) * INV;
                bo[x] = f32::from(px[2]) * INV;
            }
        } else {
            for (x, px) in row.chunks_exact(3).enumerate() {
                ro[x] = f32::from(px[0]) * INV;
                go[x] = f32::from(px[1]) * INV;
                bo[x] = f32::from(px[2]) * INV;
            }
        }
    }
}

/// `x <- clamp(x * f, 0, 1)`.
pub(crate) fn adjust_brightness(planes: &mut [f32], f: f32) {
    for v in planes {
        *v = (*v * f).clamp(0.0, 1.0);
    }
}

/// Blend every pixel with the mean grey level of the whole crop: `clamp(f x + (1 - f) mean)`.
pub(crate) fn adjust_contrast(planes: &mut [f32], n: usize, f: f32) {
    let (r, g, b) = split_planes(planes, n);
    let mut sum = 0.0f64;
    for row in 0..n.div_ceil(1024) {
        let span = row * 1024..((row + 1) * 1024).min(n);
        let mut s = 0.0f32;
        for i in span {
            s += LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i];
        }
        sum += f64::from(s);
    }
    let mean = (sum / n as f64) as f32;
    let offset = (1.0 - f) * mean;
    for v in r.iter_mut().chain(g.iter_mut()).chain(b.iter_mut()) {
        *v = (f * *v + offset).clamp(0.0, 1.0);
    }
}

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

/// Rotates the HSV hue by `shift` turns (torchvision `adjust_hue`: RGB -> HSV, `h = (h + shift) mod 1`,
/// HSV -> RGB). The rotation keeps the max and min channel, so it is computed from them directly.
pub(crate) fn adjust_hue(planes: &mut [f32], n: usize, shift: f32) {
    let (r, g, b) = split_planes(planes, n);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (rr, gg, bb) = (*r, *g, *b);
        let maxc = rr.max(gg).max(bb);
        let minc = rr.min(gg).min(bb);
        let cr = maxc - minc;
        if cr <= 0.0 {
            continue; // grey: hue undefined, unchanged
        }
        let inv = 1.0 / cr;
        let h = if maxc == rr {
            (gg - bb) * inv
        } else if maxc == gg {
            2.0 + (bb - rr) * inv
        } else {
            4.0 + (rr - gg) * inv
        };
        let mut h = h / 6.0 + shift;
        h -= h.floor();
        let h6 = h * 6.0;
        let sector = h6.floor();
        let f = h6 - sector;
        let (v, p) = (maxc, minc);
        let q = maxc - cr * f;
        let t = minc + cr * f;
        let (nr, ng, nb) = match sector as i32 {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        *r = nr;
        *g = ng;
        *b = nb;
    }
}

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

/// Pixels at or above `threshold` (on the 0..1 scale) are inverted.
pub(crate) fn solarize(planes: &mut [f32], threshold: f32) {
    for v in planes {
        if *v >= threshold {
            *v = 1.0 - *v;
        }
    }
}

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

/// torchvision's Gaussian kernel: `exp(-x^2 / (2 sigma^2))` at `x = -k/2 ..= k/2`, normalised.
pub(crate) fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size / 2) as f32;
    let mut k: Vec<f32> = (0..size).map(|i| (-0.5 * ((i as f32 - half) / sigma).powi(2)).exp()).collect();
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
pub(crate) fn gaussian_blur(planes: &mut [f32], side: usize, kernel: &[f32], scratch: &mut BlurScratch) {
    let n = side * side;
    let half = kernel.len() / 2;
    scratch.tmp.resize(n, 0.0);
    scratch.row.resize(side + 2 * half, 0.0);
    for c in 0..3 {
        let plane = &mut planes[c * n..(c + 1) * n];
        // Horizontal pass into tmp.
        for y in 0..side {
            let src = &plane[y * side..(y + 1) * side];
            let row = &mut scratch.row;
            row[half..half + side].copy_from_slice(src);
            for p in 0..half {
                row[half - 1 - p] = src[reflect(-(p as isize) - 1, side)];
                row[half + side + p] = src[reflect((side + p) as isize, side)];
            }
            let out = &mut scratch.tmp[y * side..(y + 1) * side];
            out.fill(0.0);
            for (k, &w) in kernel.iter().enumerate() {
                for (o, s) in out.iter_mut().zip(&row[k..k + side]) {
                    *o += w * s;
                }
            }
        }
        // Vertical pass back into the plane.
        for y in 0..side {
            let out = &mut plane[y * side..(y + 1) * side];
            out.fill(0.0);
            for (k, &w) in kernel.iter().enumerate() {
                let sy = reflect(y as isize + k as isize - half as isize, side);
                let src = &scratch.tmp[sy * side..(sy + 1) * side];
                for (o, s) in out.iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        }
    }
}
