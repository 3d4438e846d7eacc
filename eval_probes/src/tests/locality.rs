//! Label-free signals: smooth patch features are more local than the same features with
//! shuffled positions; collapse indicators separate isotropic from rank-one features; the
//! correspondence probe rewards content features and fails position-only ones.

use super::util::Normal;
use crate::{
    collapse_indicators, correspondence, gram_drift, locality, CorrespondenceConfig, FeatureSet,
    ViewGeometry,
};

/// Patch features that vary smoothly over the grid (low-frequency cosines per channel).
fn smooth_features(n: usize, grid: (usize, usize), dim: usize, rng: &mut Normal) -> Vec<f32> {
    let mut out = vec![];
    for _ in 0..n {
        let waves: Vec<(f32, f32, f32)> = (0..dim)
            .map(|_| (0.5 * rng.next(), 0.5 * rng.next(), 3.0 * rng.next()))
            .collect();
        for y in 0..grid.0 {
            for x in 0..grid.1 {
                out.extend(
                    waves
                        .iter()
                        .map(|&(a, b, ph)| (a * y as f32 + b * x as f32 + ph).cos()),
                );
            }
        }
    }
    out
}

fn shuffled(patches: &[f32], n: usize, p: usize, dim: usize, rng: &mut Normal) -> Vec<f32> {
    let mut out = Vec::with_capacity(patches.len());
    for i in 0..n {
        let mut order: Vec<usize> = (0..p).collect();
        for a in (1..p).rev() {
            order.swap(a, rng.below(a as u64 + 1) as usize);
        }
        for &j in &order {
            let o = (i * p + j) * dim;
            out.extend_from_slice(&patches[o..o + dim]);
        }
    }
    out
}

#[test]
fn smooth_features_are_more_local_than_shuffled_ones() {
    let mut rng = Normal::new(11);
    let (n, grid, dim) = (16, (8, 8), 32);
    let smooth = smooth_features(n, grid, dim, &mut rng);
    let shuf = shuffled(&smooth, n, 64, dim, &mut rng);
    let fs = FeatureSet::new(n, dim, grid, vec![0.0; n * dim], smooth).unwrap();
    let fr = FeatureSet::new(n, dim, grid, vec![0.0; n * dim], shuf).unwrap();
    let a = locality(&fs, None).unwrap();
    let b = locality(&fr, None).unwrap();
    assert_eq!(a.far_radius, 4);
    assert!(a.score > 0.2, "smooth score {}", a.score);
    assert!(b.score.abs() < 0.05, "shuffled score {}", b.score);
    assert!(
        a.map_consistency > b.map_consistency + 0.3,
        "consistency {} vs {}",
        a.map_consistency,
        b.map_consistency
    );
    // Identical patches: no locality at all.
    let flat =
        FeatureSet::new(1, 4, (4, 4), vec![0.0; 4], [1.0, 2.0, 3.0, 4.0].repeat(16)).unwrap();
    let c = locality(&flat, Some(2)).unwrap();
    assert!(
        c.score.abs() < 1e-6 && (c.neighbour_sim - 1.0).abs() < 1e-6 && c.map_consistency == 0.0
    );
}

#[test]
fn collapse_indicators_separate_isotropic_from_rank_one_features() {
    let mut rng = Normal::new(12);
    let (n, grid, dim) = (32, (8, 8), 16);
    let iso = FeatureSet::new(n, dim, grid, rng.vec(n * dim), rng.vec(n * 64 * dim)).unwrap();
    let r = collapse_indicators(&iso, 4096).unwrap();
    assert!(
        r.effective_rank > 15.0,
        "isotropic effective rank {}",
        r.effective_rank
    );
    assert!(
        (r.patch_std - 1.0).abs() < 0.1 && r.cls_patch_cos.abs() < 0.05,
        "{r:?}"
    );
    let dir = rng.vec(dim);
    let line: Vec<f32> = (0..n * 64)
        .flat_map(|_| {
            let a = rng.next();
            dir.iter().map(move |d| a * d).collect::<Vec<_>>()
        })
        .collect();
    let cls: Vec<f32> = (0..n).flat_map(|_| dir.clone()).collect();
    let one = FeatureSet::new(n, dim, grid, cls, line).unwrap();
    let r1 = collapse_indicators(&one, 1000).unwrap();
    assert!(
        r1.effective_rank < 1.01,
        "rank-one effective rank {}",
        r1.effective_rank
    );
    assert!(r1.rank_rows <= 1000);
    // Patches equal to the CLS token.
    let same = FeatureSet::new(
        2,
        3,
        (2, 2),
        vec![1.0, 2.0, 2.0, 0.5, 0.0, 1.0],
        [[1.0, 2.0, 2.0].repeat(4), [0.5, 0.0, 1.0].repeat(4)].concat(),
    )
    .unwrap();
    assert!((collapse_indicators(&same, 100).unwrap().cls_patch_cos - 1.0).abs() < 1e-6);
}

#[test]
fn gram_drift_is_zero_for_equal_features_and_positive_otherwise() {
    let mut rng = Normal::new(13);
    let a = FeatureSet::new(3, 8, (3, 3), rng.vec(24), rng.vec(3 * 9 * 8)).unwrap();
    let b = FeatureSet::new(3, 8, (3, 3), rng.vec(24), rng.vec(3 * 9 * 8)).unwrap();
    assert_eq!(gram_drift(&a, &a).unwrap(), 0.0);
    assert!(gram_drift(&a, &b).unwrap() > 0.05);
    assert!(gram_drift(&a, &a.slice(0..2)).is_err());
}

#[test]
fn view_geometry_maps_patches_to_their_true_position() {
    // 64x64 images, patch 8, shift 16 (2 patches): views of 48x48 (6x6 patches).
    let g = ViewGeometry::new((64, 64), 8, Some(16), false).unwrap();
    assert_eq!((g.view, g.grid()), ((48, 48), (6, 6)));
    assert_eq!(g.true_position(0, 0), (2.0, 2.0));
    let f = ViewGeometry::new((64, 64), 8, Some(16), true).unwrap();
    // Flipped: view column 0 is the crop's last column, image column 16 + 47 -> A patch 7.5 - 0.5.
    assert_eq!(f.true_position(1, 0), (3.0, 7.0));
    // Default shift is 1.5 patches.
    assert_eq!(
        ViewGeometry::new((64, 64), 8, None, false).unwrap().shift,
        12
    );
    assert!(
        ViewGeometry::new((16, 16), 8, Some(8), false).is_err(),
        "views under 2x2 patches"
    );
    // Cutting: B's first pixel is the image pixel at (shift, shift) (or its mirror).
    let img: Vec<f32> = (0..3 * 64 * 64).map(|v| v as f32).collect();
    let (a, b) = g.cut(&img, 1, (64, 64));
    assert_eq!((a.len(), a[0], a[48]), (3 * 48 * 48, 0.0, 64.0));
    assert_eq!(b[0], (16 * 64 + 16) as f32);
    let (_, bf) = f.cut(&img, 1, (64, 64));
    assert_eq!(bf[0], (16 * 64 + 16 + 47) as f32);
}

/// A fake backbone that sees content, not position: per patch and channel, the mean of
/// each pixel row (unchanged by a horizontal flip).
fn content_features(px: &[f32], n: usize, size: (usize, usize), p: usize) -> FeatureSet {
    let (gh, gw) = (size.0 / p, size.1 / p);
    let dim = 3 * p;
    let mut patches = vec![];
    for i in 0..n {
        for gy in 0..gh {
            for gx in 0..gw {
                for c in 0..3 {
                    for y in 0..p {
                        let row = ((i * 3 + c) * size.0 + gy * p + y) * size.1 + gx * p;
                        patches.push(px[row..row + p].iter().sum::<f32>() / p as f32);
                    }
                }
            }
        }
    }
    FeatureSet::new(n, dim, (gh, gw), vec![0.0; n * dim], patches).unwrap()
}

/// A fake backbone that only knows where a patch is.
fn position_features(n: usize, size: (usize, usize), p: usize) -> FeatureSet {
    let (gh, gw) = (size.0 / p, size.1 / p);
    let patches = (0..n)
        .flat_map(|_| {
            (0..gh * gw).flat_map(|j| (0..gh * gw).map(move |k| if k == j { 1.0 } else { 0.0 }))
        })
        .collect();
    FeatureSet::new(n, gh * gw, (gh, gw), vec![0.0; n * gh * gw], patches).unwrap()
}

#[test]
fn correspondence_rewards_content_and_fails_pure_position() {
    let mut rng = Normal::new(14);
    let (n, size, p) = (8, (48, 48), 8);
    // Smooth random images: Gaussian blobs of random place, size and colour.
    let (h, w) = size;
    let mut images = vec![0f32; n * 3 * h * w];
    for i in 0..n {
        let blobs: Vec<[f32; 6]> = (0..16)
            .map(|_| {
                [
                    h as f32 * rng.uniform(),
                    w as f32 * rng.uniform(),
                    3.0 + 5.0 * rng.uniform(),
                    rng.next(),
                    rng.next(),
                    rng.next(),
                ]
            })
            .collect();
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let v: f32 = blobs
                        .iter()
                        .map(|b| {
                            b[3 + c]
                                * (-((y as f32 - b[0]).powi(2) + (x as f32 - b[1]).powi(2))
                                    / (2.0 * b[2] * b[2]))
                                    .exp()
                        })
                        .sum();
                    images[((i * 3 + c) * h + y) * w + x] = v + 0.02 * rng.next();
                }
            }
        }
    }
    for flip in [false, true] {
        let cfg = CorrespondenceConfig {
            images: n,
            shift: None,
            flip,
        };
        let good = correspondence(&images, n, size, p, &cfg, |px, m, s| {
            Ok(content_features(px, m, s, p))
        })
        .unwrap();
        assert!(
            good.accuracy > 0.8,
            "flip {flip}: content features score {}",
            good.accuracy
        );
        assert!(good.n_patches > 0 && good.view_grid == (4, 4));
        let bad = correspondence(&images, n, size, p, &cfg, |_, m, s| {
            Ok(position_features(m, s, p))
        })
        .unwrap();
        assert!(
            bad.accuracy < 0.2,
            "flip {flip}: position features score {}",
            bad.accuracy
        );
    }
}
