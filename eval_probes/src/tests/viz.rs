//! Pictures: the PCA image of features that encode a label map segments it (its colours
//! are explained by the labels) while noise features do not; similarity maps, layouts and
//! curves come out as valid PNGs of the right size.

use image::{Rgb, RgbImage};

use super::util::{centres, Normal};
use crate::{
    curves_png, denormalize, label_agreement, patch_similarities, pca_rgb, pca_rgb_shared,
    render_curves, render_runs, resize_nearest, side_by_side, similarity_map, write_png, RunCurves,
    REFRESH_COLOUR,
};

/// A 16x16 patch label map: background, a square, a disc and a bar.
fn label_grid(g: usize) -> Vec<u8> {
    let mut m = vec![0u8; g * g];
    for y in 0..g {
        for x in 0..g {
            let (fy, fx) = (y as f32 / g as f32, x as f32 / g as f32);
            m[y * g + x] = if (0.1..0.45).contains(&fy) && (0.1..0.45).contains(&fx) {
                1
            } else if (fy - 0.7).powi(2) + (fx - 0.65).powi(2) < 0.05 {
                2
            } else if (0.05..0.95).contains(&fx) && (0.85..0.95).contains(&fy) {
                3
            } else {
                0
            };
        }
    }
    m
}

fn encoded(labels: &[u8], dim: usize, noise: f32, rng: &mut Normal) -> Vec<f32> {
    let c = centres(4, dim, 1.0, &mut Normal::new(77));
    labels
        .iter()
        .flat_map(|&l| {
            c[l as usize]
                .iter()
                .map(|v| v + noise * rng.next())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A file name in the system temp folder unique to this process (each test removes its file).
fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("eval_probes-test-{}-{name}", std::process::id()))
}

#[test]
fn pca_of_label_encoding_features_segments_the_label_map_and_noise_does_not() {
    let mut rng = Normal::new(21);
    let g = 16;
    let labels = label_grid(g);
    let good = pca_rgb(&encoded(&labels, 48, 0.3, &mut rng), (g, g)).unwrap();
    assert_eq!(good.dimensions(), (16, 16));
    let a = label_agreement(&good, &labels).unwrap();
    assert!(a > 0.9, "label-encoding features: agreement {a}");
    let noise = pca_rgb(&rng.vec(g * g * 48), (g, g)).unwrap();
    let b = label_agreement(&noise, &labels).unwrap();
    assert!(b < 0.1, "noise features: agreement {b}");
    // Deterministic: the same features give the same picture.
    let mut rng2 = Normal::new(21);
    assert_eq!(
        pca_rgb(&encoded(&labels, 48, 0.3, &mut rng2), (g, g)).unwrap(),
        good
    );
    assert!(pca_rgb(&[0.0; 10], (4, 4)).is_err());
}

#[test]
fn shared_pca_gives_the_same_colours_across_resolutions() {
    let mut rng = Normal::new(22);
    let (small, big) = (label_grid(8), label_grid(16));
    let fs = encoded(&small, 32, 0.1, &mut rng);
    let fb = encoded(&big, 32, 0.1, &mut rng);
    let pics = pca_rgb_shared(&[(&fs, (8, 8)), (&fb, (16, 16))]).unwrap();
    assert_eq!(
        (pics[0].dimensions(), pics[1].dimensions()),
        ((8, 8), (16, 16))
    );
    let mean_colour = |img: &RgbImage, lab: &[u8], k: u8| -> [f64; 3] {
        let px: Vec<&Rgb<u8>> = img
            .pixels()
            .zip(lab)
            .filter(|(_, &l)| l == k)
            .map(|(p, _)| p)
            .collect();
        std::array::from_fn(|c| px.iter().map(|p| f64::from(p[c])).sum::<f64>() / px.len() as f64)
    };
    for k in 0..4 {
        let (a, b) = (
            mean_colour(&pics[0], &small, k),
            mean_colour(&pics[1], &big, k),
        );
        let d = (0..3).map(|c| (a[c] - b[c]).abs()).fold(0.0, f64::max);
        assert!(d < 25.0, "class {k}: {a:?} vs {b:?}");
    }
    let row = side_by_side(&[
        resize_nearest(&pics[0], 64, 64),
        resize_nearest(&pics[1], 128, 128),
    ]);
    assert_eq!(row.dimensions(), (64 + 8 + 128, 128));
    let path = tmp("pca.png");
    write_png(&row, &path).unwrap();
    let back = image::open(&path).unwrap().to_rgb8();
    assert_eq!(back, row, "PNG round trip");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn similarity_map_covers_the_image_and_peaks_on_the_query_class() {
    let mut rng = Normal::new(23);
    let g = 16;
    let labels = label_grid(g);
    let feats = encoded(&labels, 32, 0.2, &mut rng);
    let q = 3 * g + 3; // inside the square (class 1)
    let sims = patch_similarities(&feats, (g, g), q).unwrap();
    let mean_of = |pred: &dyn Fn(u8) -> bool| {
        let v: Vec<f32> = sims
            .iter()
            .zip(&labels)
            .filter(|(_, &l)| pred(l))
            .map(|(s, _)| *s)
            .collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    assert!(mean_of(&|l| l == 1) > 0.9 && mean_of(&|l| l != 1) < 0.3);
    let img = RgbImage::from_pixel(128, 96, Rgb([40, 40, 40]));
    let map = similarity_map(&feats, (g, g), (3 * 8 + 4, 3 * 6 + 3), &img).unwrap();
    assert_eq!(map.dimensions(), (128, 96));
    // Bright (high-similarity) inside the square, dark over the background far away.
    let lum = |x: u32, y: u32| {
        map.get_pixel(x, y)
            .0
            .iter()
            .map(|&c| u32::from(c))
            .sum::<u32>()
    };
    assert!(
        lum(20, 15) > lum(120, 5) + 100,
        "{} vs {}",
        lum(20, 15),
        lum(120, 5)
    );
    assert!(similarity_map(&feats, (g, g), (128, 0), &img).is_err());
    let path = tmp("sim.png");
    write_png(&map, &path).unwrap();
    assert_eq!(image::image_dimensions(&path).unwrap(), (128, 96));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn denormalize_inverts_the_eval_normalisation() {
    let (mean, std) = (data::IMAGENET_MEAN, data::IMAGENET_STD);
    let raw = [0.0f32, 0.5, 1.0, 0.25];
    let px: Vec<f32> = (0..3)
        .flat_map(|c| raw.iter().map(move |v| (v - mean[c]) / std[c]))
        .collect();
    let img = denormalize(&px, (2, 2), mean, std).unwrap();
    assert_eq!(img.get_pixel(1, 0).0, [128, 128, 128]);
    assert_eq!(img.get_pixel(0, 1).0, [255, 255, 255]);
}

#[test]
fn curves_are_a_png_of_the_right_size_with_transitions_marked() {
    let loss: Vec<(u64, f64)> = (0..200)
        .map(|s| (s * 10, 11.0 - (s as f64).ln_1p()))
        .collect();
    let mut miou: Vec<(u64, f64)> = (0..20).map(|s| (s * 100, 0.2 + 0.01 * s as f64)).collect();
    miou.push((2000, f64::NAN));
    let series = vec![
        ("loss".to_string(), loss),
        ("dense mIoU".to_string(), miou),
        ("empty".to_string(), vec![]),
    ];
    let transitions = vec![
        (1200, "gram_anchor".to_string()),
        (1800, "high_res_adapt".to_string()),
    ];
    let path = tmp("curves.png");
    curves_png(&series, &transitions, &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(img.dimensions(), (1000, 3 * 220));
    let red = img
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60)
        .count();
    assert!(red > 3 * 100, "transition lines drawn ({red} red pixels)");
    let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(inked > 5000, "axes, text and lines drawn ({inked} pixels)");
    // Rendering is deterministic and works without any series.
    assert_eq!(
        render_curves(&series, &transitions, 1000, 220).unwrap(),
        img
    );
    assert_eq!(
        render_curves(&[], &[], 400, 150).unwrap().dimensions(),
        (400, 150)
    );
}

/// Two runs in the same panels: both lines drawn in their own colours (a branch and its
/// control can be told apart), one panel per series name even where a run lacks one, a
/// legend, and the branch's own transition marked.
#[test]
fn runs_share_panels_and_each_has_its_colour() {
    let shared: Vec<(u64, f64)> = (0..10).map(|s| (s * 100, 0.4 + 0.01 * s as f64)).collect();
    let branch = RunCurves {
        label: "branch".into(),
        series: vec![
            (
                "dense mIoU".into(),
                shared.iter().map(|&(s, v)| (s, v + 0.05)).collect(),
            ),
            ("loss gram".into(), vec![(500, 0.2), (900, 0.05)]),
        ],
        transitions: vec![(500, "pretrain -> gram_anchor".into())],
        refreshes: vec![],
    };
    let control = RunCurves {
        label: "control".into(),
        series: vec![("dense mIoU".into(), shared)],
        transitions: vec![],
        refreshes: vec![],
    };
    let img = render_runs(&[branch.clone(), control.clone()], 800, 200).unwrap();
    assert_eq!(
        img.dimensions(),
        (800, 2 * 200),
        "one panel per series name"
    );
    let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
    let (blue, green) = (count([31, 119, 180]), count([44, 160, 44]));
    assert!(
        blue > 200 && green > 200,
        "both runs drawn: {blue} and {green} pixels"
    );
    let red = img
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60)
        .count();
    assert!(
        red > 2 * 100,
        "the branch's transition marked ({red} red pixels)"
    );
    // the same two runs in the other order swap the colours, not the picture's layout
    let swapped = render_runs(&[control, branch], 800, 200).unwrap();
    assert_eq!(swapped.dimensions(), img.dimensions());
    assert_ne!(swapped, img);
}

/// Gram-teacher refreshes are marked in their own colour in every panel, apart from the
/// stage transitions, and only where a run has them.
#[test]
fn gram_refreshes_are_marked_in_every_panel() {
    let run = |refreshes: Vec<u64>| RunCurves {
        label: "run".into(),
        series: vec![
            (
                "loss".into(),
                (0..10).map(|s| (s * 100, 1.0 / (1.0 + s as f64))).collect(),
            ),
            (
                "dense mIoU".into(),
                (0..10).map(|s| (s * 100, 0.3 + 0.01 * s as f64)).collect(),
            ),
        ],
        transitions: vec![(300, "pretrain -> gram_anchor".into())],
        refreshes,
    };
    let pink = |img: &image::RgbImage, x0: u32, x1: u32| {
        img.enumerate_pixels()
            .filter(|(x, _, p)| {
                (x0..x1).contains(x)
                    && p.0 == [REFRESH_COLOUR.0, REFRESH_COLOUR.1, REFRESH_COLOUR.2]
            })
            .count()
    };
    let plain = render_runs(&[run(vec![])], 800, 200).unwrap();
    assert_eq!(pink(&plain, 0, 800), 0, "no refresh, no mark");
    let marked = render_runs(&[run(vec![500, 700])], 800, 200).unwrap();
    // both panels: most of their plot height, for each of the two marks
    assert!(
        pink(&marked, 0, 800) > 2 * 2 * 100,
        "{} pink pixels",
        pink(&marked, 0, 800)
    );
    // the two marks are where their steps are: in the right half of the axis
    assert_eq!(pink(&marked, 0, 400), 0);
    // the transition is still drawn in red
    let red = marked
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60)
        .count();
    assert!(red > 2 * 100, "{red} red pixels");
}
