//! Multi-crop geometry, pixel kernels against naive references, Gram-view alignment, probabilities.

use image::{Rgb, RgbImage};

use super::util::{pattern_image, small_crops};
use crate::augment::eval::eval_box;
use crate::augment::pixels;
use crate::{
    eval_transform, random_resized_crop, Augmenter, BlurConvention, ColorJitterConfig, CropConfig,
    CropSizes, EvalConfig, KeyedRng, SampleKey, Source, SyntheticConfig, SyntheticScenes,
};

fn no_photometric(mut cfg: CropConfig) -> CropConfig {
    cfg.color_jitter.p = 0.0;
    cfg.grayscale_p = 0.0;
    cfg.blur = BlurConvention::Off;
    cfg.solarize_p = 0.0;
    cfg
}

fn key(position: u64) -> SampleKey {
    SampleKey {
        seed: 3,
        epoch: 0,
        position,
    }
}

#[test]
fn random_resized_crop_boxes_follow_torchvision() {
    let mut rng = KeyedRng::new(&[1]);
    for _ in 0..2000 {
        let (w, h) = (500, 375);
        let b = random_resized_crop(&mut rng, w, h, (0.32, 1.0), (0.75, 4.0 / 3.0));
        assert!(
            b.left + b.width <= w && b.top + b.height <= h,
            "{b:?} outside"
        );
        let area = f64::from(b.width * b.height) / f64::from(w * h);
        // Rounding of w and h moves the area by at most a few percent.
        assert!(
            (0.30..=1.0).contains(&area),
            "area fraction {area} for {b:?}"
        );
        let ratio = f64::from(b.width) / f64::from(b.height);
        assert!((0.74..=1.35).contains(&ratio), "ratio {ratio} for {b:?}");
    }
    // No attempt can fit a 1000x10 strip with area >= 90 %: torchvision's fallback is a center crop
    // clamped to the largest ratio: h = 10, w = round(10 * 4/3) = 13, centered.
    let b = random_resized_crop(&mut rng, 1000, 10, (0.9, 1.0), (0.75, 4.0 / 3.0));
    assert_eq!((b.top, b.left, b.height, b.width), (0, 493, 10, 13));
    let b = random_resized_crop(&mut rng, 10, 1000, (0.9, 1.0), (0.75, 4.0 / 3.0));
    assert_eq!((b.top, b.left, b.height, b.width), (493, 0, 13, 10));
}

#[test]
fn hue_rotation_matches_torchvision_formula() {
    // torchvision's _rgb2hsv / _hsv2rgb, written out in f64.
    fn reference(rgb: [f64; 3], shift: f64) -> [f64; 3] {
        let [r, g, b] = rgb;
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eqc = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eqc { 1.0 } else { maxc };
        let crd = if eqc { 1.0 } else { cr };
        let (rc, gc, bc) = ((maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd);
        let hr = if maxc == r { bc - gc } else { 0.0 };
        let hg = if maxc == g && maxc != r {
            2.0 + rc - bc
        } else {
            0.0
        };
        let hb = if maxc != g && maxc != r {
            4.0 + gc - rc
        } else {
            0.0
        };
        let h = ((hr + hg + hb) / 6.0 + 1.0) % 1.0;
        let h = (h + shift).rem_euclid(1.0);
        let v = maxc;
        let i = (h * 6.0).floor();
        let f = h * 6.0 - i;
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        match (i as i64).rem_euclid(6) {
            0 => [v, t, p],
            1 => [q, v, p],
            2 => [p, v, t],
            3 => [p, q, v],
            4 => [t, p, v],
            _ => [v, p, q],
        }
    }
    let mut rng = KeyedRng::new(&[2]);
    let n = 4096;
    let mut planes: Vec<f32> = (0..3 * n).map(|_| rng.uniform() as f32).collect();
    // A few greys and saturated primaries.
    for (i, px) in [
        [0.5f32; 3],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [0.0; 3],
    ]
    .iter()
    .enumerate()
    {
        for c in 0..3 {
            planes[c * n + i] = px[c];
        }
    }
    for shift in [-0.1f32, -0.03, 0.0004, 0.07, 0.1] {
        let mut out = planes.clone();
        pixels::adjust_hue(&mut out, n, shift);
        for i in 0..n {
            let rgb = [planes[i], planes[n + i], planes[2 * n + i]].map(f64::from);
            let want = reference(rgb, f64::from(shift));
            for c in 0..3 {
                let got = f64::from(out[c * n + i]);
                assert!(
                    (got - want[c]).abs() < 2e-5,
                    "shift {shift} pixel {rgb:?}: channel {c} {got} vs {}",
                    want[c]
                );
            }
        }
    }
}

#[test]
fn brightness_contrast_saturation_grayscale_solarize_match_definitions() {
    let mut rng = KeyedRng::new(&[4]);
    let n = 1000;
    let src: Vec<f32> = (0..3 * n).map(|_| rng.uniform() as f32).collect();
    let grey = |p: &[f32], i: usize| 0.2989 * p[i] + 0.587 * p[n + i] + 0.114 * p[2 * n + i];
    let mut b = src.clone();
    pixels::adjust_brightness(&mut b, 1.3);
    for i in 0..3 * n {
        assert!((b[i] - (src[i] * 1.3).min(1.0)).abs() < 1e-6);
    }
    let mean: f32 = (0..n).map(|i| grey(&src, i)).sum::<f32>() / n as f32;
    let mut c = src.clone();
    pixels::adjust_contrast(&mut c, n, 0.7);
    for i in 0..3 * n {
        assert!((c[i] - (0.7 * src[i] + 0.3 * mean).clamp(0.0, 1.0)).abs() < 1e-5);
    }
    let mut s = src.clone();
    pixels::adjust_saturation(&mut s, n, 1.2);
    for i in 0..n {
        let g = grey(&src, i);
        for ch in 0..3 {
            let want = (1.2 * src[ch * n + i] - 0.2 * g).clamp(0.0, 1.0);
            assert!((s[ch * n + i] - want).abs() < 1e-5);
        }
    }
    let mut g = src.clone();
    pixels::grayscale(&mut g, n);
    for i in 0..n {
        assert!(g[i] == g[n + i] && g[i] == g[2 * n + i] && (g[i] - grey(&src, i)).abs() < 1e-6);
    }
    let mut so = src.clone();
    pixels::solarize(&mut so, 128.0 / 255.0);
    for i in 0..3 * n {
        let want = if src[i] >= 128.0 / 255.0 {
            1.0 - src[i]
        } else {
            src[i]
        };
        assert_eq!(so[i], want);
    }
}

#[test]
fn separable_blur_equals_naive_2d_convolution_with_reflect_padding() {
    let kernel = pixels::gaussian_kernel(9, 1.3);
    assert!((kernel.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert!((kernel[0] - kernel[8]).abs() < 1e-9 && kernel[4] > kernel[3]);
    for side in [3usize, 5, 12] {
        let n = side * side;
        let mut rng = KeyedRng::new(&[5, side as u64]);
        let src: Vec<f32> = (0..3 * n).map(|_| rng.uniform() as f32).collect();
        let mut out = src.clone();
        pixels::gaussian_blur(&mut out, side, &kernel, &mut Default::default());
        for c in 0..3 {
            for y in 0..side {
                for x in 0..side {
                    let mut acc = 0.0f64;
                    for (ky, wy) in kernel.iter().enumerate() {
                        for (kx, wx) in kernel.iter().enumerate() {
                            let sy = pixels::reflect(y as isize + ky as isize - 4, side);
                            let sx = pixels::reflect(x as isize + kx as isize - 4, side);
                            acc += f64::from(*wy)
                                * f64::from(*wx)
                                * f64::from(src[c * n + sy * side + sx]);
                        }
                    }
                    let got = f64::from(out[c * n + y * side + x]);
                    assert!(
                        (got - acc).abs() < 1e-5,
                        "side {side} ({x},{y}): {got} vs {acc}"
                    );
                }
            }
        }
    }
    // torch reflect padding: -1 -> 1, n -> n - 2.
    assert_eq!(
        (
            pixels::reflect(-1, 5),
            pixels::reflect(5, 5),
            pixels::reflect(-4, 5),
            pixels::reflect(8, 5)
        ),
        (1, 3, 4, 0)
    );
}

#[test]
fn flip_mirrors_the_same_crop() {
    let img = pattern_image(90, 70, 1);
    let sizes = CropSizes {
        global: 32,
        local: 16,
        gram: None,
    };
    let mut plain = no_photometric(small_crops());
    plain.flip_p = 0.0;
    let mut flipped = plain.clone();
    flipped.flip_p = 1.0;
    let a = Augmenter::new(plain).multicrop(&img, sizes, key(5));
    let b = Augmenter::new(flipped).multicrop(&img, sizes, key(5));
    for (ra, rb) in a.records.iter().zip(&b.records) {
        assert_eq!(ra.crop_box, rb.crop_box);
        assert!(!ra.flipped && rb.flipped);
    }
    let s = 32;
    for row in 0..2 * 3 * s {
        for x in 0..s {
            assert_eq!(a.global[row * s + x], b.global[row * s + (s - 1 - x)]);
        }
    }
}

#[test]
fn crops_depend_only_on_their_key() {
    let img = pattern_image(80, 64, 2);
    let sizes = CropSizes {
        global: 32,
        local: 16,
        gram: None,
    };
    let mut aug = Augmenter::new(small_crops());
    let a = aug.multicrop(&img, sizes, key(1));
    let b = aug.multicrop(&img, sizes, key(1));
    assert_eq!(a, b, "same key, same bytes");
    let c = aug.multicrop(&img, sizes, key(2));
    assert_ne!(a.global, c.global);
    // Each crop has its own stream: more local crops leave the global and first local crops unchanged.
    let mut more = small_crops();
    more.n_local = 5;
    let d = Augmenter::new(more).multicrop(&img, sizes, key(1));
    assert_eq!(a.global, d.global);
    assert_eq!(a.local[..], d.local[..a.local.len()]);
    assert_eq!(a.records[..], d.records[..a.records.len()]);
}

#[test]
fn gram_views_share_box_and_flip_with_global_crops() {
    let img = pattern_image(120, 90, 3);
    let mut cfg = no_photometric(small_crops());
    cfg.flip_p = 0.5;
    cfg.gram_size = Some(64);
    cfg.gram_teacher_no_distortions = true;
    let sizes = CropSizes {
        global: 32,
        local: 16,
        gram: Some(64),
    };
    let (mean, std) = (cfg.mean, cfg.std);
    let mut aug = Augmenter::new(cfg.clone());
    for position in 0..8 {
        let out = aug.multicrop(&img, sizes, key(position));
        let gram = out.gram.as_ref().expect("gram views");
        for c in 0..2 {
            // Un-normalise the 64 px Gram view back to RGB8 (exact: it came from RGB8), undo the flip,
            // resize it to 32 px with the same bicubic filter and compare with the global crop.
            let g64 = &gram[c * 3 * 64 * 64..(c + 1) * 3 * 64 * 64];
            let flipped = out.records[c].flipped;
            let rgb = RgbImage::from_fn(64, 64, |x, y| {
                let sx = if flipped { 63 - x } else { x } as usize;
                Rgb(std::array::from_fn(|ch| {
                    ((g64[ch * 4096 + y as usize * 64 + sx] * std[ch] + mean[ch]) * 255.0).round()
                        as u8
                }))
            });
            let mut small = Vec::new();
            crate::augment::tests_support::resize_square(&rgb, 32, &mut small);
            let g32 = &out.global[c * 3 * 32 * 32..(c + 1) * 3 * 32 * 32];
            for y in 0..32usize {
                for x in 0..32usize {
                    let sx = if flipped { 31 - x } else { x };
                    for ch in 0..3 {
                        let want = f32::from(small[(y * 32 + sx) * 3 + ch]) / 255.0;
                        let got = g32[ch * 1024 + y * 32 + x] * std[ch] + mean[ch];
                        assert!(
                            (got - want).abs() < 1.5 / 255.0,
                            "crop {c} ({x},{y}) ch {ch}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    // Without `no_distortions` both views are resized from one distorted crop: the global crop is
    // the Gram view resized (here the Gram view is the larger crop itself).
    let mut distorted = small_crops();
    distorted.gram_size = Some(64);
    distorted.gram_teacher_no_distortions = false;
    let mut aug = Augmenter::new(distorted);
    let out = aug.multicrop(&img, sizes, key(11));
    let gram = out.gram.expect("gram views");
    for c in 0..2 {
        let mut resized = vec![0.0f32; 3 * 32 * 32];
        crate::augment::tests_support::resize_planes(
            &gram[c * 3 * 4096..(c + 1) * 3 * 4096],
            64,
            32,
            &mut resized,
        );
        assert_eq!(resized[..], out.global[c * 3 * 1024..(c + 1) * 3 * 1024]);
    }
}

#[test]
fn augmentation_probabilities_follow_the_recipe() {
    let img = pattern_image(24, 24, 4);
    let sizes = CropSizes {
        global: 8,
        local: 8,
        gram: None,
    };
    for (convention, want) in [
        (BlurConvention::AsTrained, [0.0, 0.9, 0.5]),
        (BlurConvention::AsWritten, [1.0, 0.1, 0.5]),
    ] {
        let cfg = CropConfig {
            blur: convention,
            n_local: 2,
            ..small_crops()
        };
        let mut aug = Augmenter::new(cfg);
        let n = 1500;
        let mut blur = [0usize; 3];
        let (mut jitter, mut grey, mut flip, mut sol1, mut sol_other) = (0, 0, 0, 0, 0);
        for i in 0..n {
            let out = aug.multicrop(&img, sizes, key(i));
            for (c, r) in out.records.iter().enumerate() {
                let kind = c.min(2);
                blur[kind] += usize::from(r.photometric.blur_sigma.is_some());
                if let Some(s) = r.photometric.blur_sigma {
                    assert!((0.1..2.0).contains(&s));
                }
                jitter += usize::from(r.photometric.jitter.is_some());
                grey += usize::from(r.photometric.grayscale);
                flip += usize::from(r.flipped);
                if c == 1 {
                    sol1 += usize::from(r.photometric.solarize);
                } else {
                    sol_other += usize::from(r.photometric.solarize);
                }
            }
        }
        let per_crop = |count: usize, crops: u64| count as f64 / (n * crops) as f64;
        let close = |got: f64, want: f64| (got - want).abs() < 0.04;
        assert!(
            close(per_crop(blur[0], 1), want[0]),
            "{convention:?} global 0 blur {}",
            per_crop(blur[0], 1)
        );
        assert!(
            close(per_crop(blur[1], 1), want[1]),
            "{convention:?} global 1 blur {}",
            per_crop(blur[1], 1)
        );
        assert!(
            close(per_crop(blur[2], 2), want[2]),
            "{convention:?} local blur {}",
            per_crop(blur[2], 2)
        );
        assert!(
            close(per_crop(jitter, 4), 0.8)
                && close(per_crop(grey, 4), 0.2)
                && close(per_crop(flip, 4), 0.5)
        );
        assert!(close(per_crop(sol1, 1), 0.2) && sol_other == 0);
    }
}

#[test]
fn jitter_factors_stay_in_their_ranges() {
    let cfg = CropConfig {
        color_jitter: ColorJitterConfig {
            p: 1.0,
            ..Default::default()
        },
        ..small_crops()
    };
    let mut aug = Augmenter::new(cfg);
    let img = pattern_image(20, 20, 0);
    let mut orders = std::collections::HashSet::new();
    for i in 0..300 {
        for r in aug
            .multicrop(
                &img,
                CropSizes {
                    global: 8,
                    local: 8,
                    gram: None,
                },
                key(i),
            )
            .records
        {
            let j = r.photometric.jitter.expect("p = 1");
            assert!((0.6..1.4).contains(&j.brightness) && (0.6..1.4).contains(&j.contrast));
            assert!((0.8..1.2).contains(&j.saturation) && (-0.1..0.1).contains(&j.hue));
            let mut sorted = j.order;
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
            orders.insert(j.order);
        }
    }
    assert_eq!(
        orders.len(),
        24,
        "all 24 orders of the four operations occur"
    );
}

#[test]
fn neutral_image_normalises_to_about_zero() {
    let mean = crate::IMAGENET_MEAN.map(|m| (m * 255.0).round() as u8);
    let img = RgbImage::from_pixel(50, 40, Rgb(mean));
    let out = Augmenter::new(no_photometric(small_crops())).multicrop(
        &img,
        CropSizes {
            global: 32,
            local: 16,
            gram: None,
        },
        key(0),
    );
    assert!(out.global.iter().chain(&out.local).all(|v| v.abs() < 0.01));
}

#[test]
fn eval_box_matches_torchvision_resize_and_center_crop() {
    // 500x375, Resize(256): 341x256; CenterCrop(224): top round(16) = 16, left round(58.5) = 58.
    let (l, t, w, h) = eval_box(500, 375, 256, 224);
    assert!((l - 58.0 * 500.0 / 341.0).abs() < 1e-9 && (t - 16.0 * 375.0 / 256.0).abs() < 1e-9);
    assert!((w - 224.0 * 500.0 / 341.0).abs() < 1e-9 && (h - 224.0 * 375.0 / 256.0).abs() < 1e-9);
    assert_eq!(eval_box(96, 96, 96, 96), (0.0, 0.0, 96.0, 96.0));
}

#[test]
fn eval_transform_keeps_label_maps_exact() {
    let src = SyntheticScenes::new(SyntheticConfig {
        size: 48,
        len: 10,
        ..Default::default()
    });
    let sample = src.get(3).expect("synthetic");
    let same = eval_transform(
        &sample,
        &EvalConfig {
            size: 48,
            ..Default::default()
        },
    );
    assert_eq!(
        same.label_map.as_deref(),
        Some(&sample.label_map.as_ref().expect("map").data[..])
    );
    // Identity geometry: the pixels are the normalised originals.
    let px = sample.image.get_pixel(10, 20);
    let want = (f32::from(px[1]) / 255.0 - crate::IMAGENET_MEAN[1]) / crate::IMAGENET_STD[1];
    assert!((same.pixels[48 * 48 + 20 * 48 + 10] - want).abs() < 1e-4);
    // Downscaled by 2 with nearest: every output label is the source label at the sampled pixel.
    let half = eval_transform(
        &sample,
        &EvalConfig {
            size: 24,
            ..Default::default()
        },
    );
    let lm = half.label_map.expect("map");
    let src_map = sample.label_map.expect("map");
    let mut agree = 0;
    for y in 0..24u32 {
        for x in 0..24u32 {
            let v = lm[(y * 24 + x) as usize];
            let candidates = [
                src_map.get(2 * x, 2 * y),
                src_map.get(2 * x + 1, 2 * y + 1),
                src_map.get(2 * x + 1, 2 * y),
                src_map.get(2 * x, 2 * y + 1),
            ];
            agree += usize::from(candidates.contains(&v));
        }
    }
    assert_eq!(
        agree,
        24 * 24,
        "nearest sampling takes a label of the covered 2x2 block"
    );
}

#[test]
fn the_eval_normalizer_gives_the_pixel_kernels_floats_bit_for_bit() {
    // every byte value in every channel, through the crops' kernels and through the table
    let side = 16;
    let rgb: Vec<u8> = (0..side * side * 3).map(|i| (i * 7 % 256) as u8).collect();
    let mean = crate::IMAGENET_MEAN;
    let std = crate::IMAGENET_STD;
    let mut want = vec![0f32; 3 * side * side];
    crate::augment::pixels::to_planes(&rgb, side, false, &mut want);
    crate::augment::pixels::normalize(&mut want, side * side, &mean, &std);
    let mut planes = vec![0u8; rgb.len()];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planes[c * side * side + i] = px[c];
        }
    }
    let got = crate::Normalizer::new(&mean, &std).to_f32(&planes, side * side);
    assert!(rgb.iter().collect::<std::collections::HashSet<_>>().len() == 256);
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // and a loaded batch, in the identity geometry (the crop is the whole image): its
    // bytes normalised are the kernels' floats of the original pixels, bit for bit
    let src = SyntheticScenes::new(SyntheticConfig {
        size: 32,
        len: 4,
        ..Default::default()
    });
    let cfg = EvalConfig {
        size: 32,
        ..Default::default()
    };
    let batch = crate::load_eval(&src, &[1, 2], &cfg, 1).expect("eval");
    let floats = batch.norm.to_f32(&batch.rgb, 32 * 32);
    for (k, i) in [1u64, 2].into_iter().enumerate() {
        let original = src.get(i).expect("sample").image;
        let mut want = vec![0f32; 3 * 32 * 32];
        pixels::to_planes(original.as_raw(), 32, false, &mut want);
        pixels::normalize(&mut want, 32 * 32, &mean, &std);
        let got = &floats[k * 3 * 32 * 32..(k + 1) * 3 * 32 * 32];
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits()),
            "image {i}"
        );
    }
}
