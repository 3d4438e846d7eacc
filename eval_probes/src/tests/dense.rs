//! The dense probe: bilinear upsampling equals PyTorch's `align_corners=False`, patch
//! histograms and IoU on hand examples, and the probe itself gives mIoU ~ 1 when patch
//! features encode the label map and a low mIoU when they are noise.

use super::util::{centres, Normal};
use crate::{
    dense_probe, dense_probe_sampled, patch_histograms, sample_rows, train_stride,
    upsample_bilinear, Confusion, DenseGeometry, DenseSettings, FitConfig, PatchTargets,
};

#[test]
fn bilinear_upsampling_matches_torch_align_corners_false() {
    // torch.nn.functional.interpolate(torch.arange(4.).view(1, 1, 2, 2), size=4,
    //                                 mode="bilinear", align_corners=False)
    let want = [
        0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
    ];
    let got = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0], (2, 2), 1, (4, 4));
    assert_eq!(got, want);
    // Channels interleave; identity size keeps values.
    let v = [1.0, -1.0, 2.0, -2.0];
    assert_eq!(upsample_bilinear(&v, (1, 2), 2, (1, 2)), v);
}

#[test]
fn patch_histograms_count_each_block() {
    // 4x4 map, 2x2 grid of 2x2-pixel patches, 3 classes.
    let map = [0, 0, 1, 1, 0, 2, 1, 1, 2, 2, 0, 1, 2, 2, 1, 0];
    let geo = DenseGeometry {
        size: (4, 4),
        grid: (2, 2),
        n_classes: 3,
    };
    let h = patch_histograms(&map, &geo).unwrap();
    assert_eq!(
        h,
        vec![0.75, 0.0, 0.25, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0]
    );
    assert!(patch_histograms(&[5; 16], &geo).is_err());
}

#[test]
fn confusion_gives_iou_over_present_classes() {
    let mut c = Confusion::new(3);
    // class 0: 3 right, 1 called 1; class 1: 2 right; class 2 absent but predicted once (from class 0).
    for _ in 0..3 {
        c.add(0, 0);
    }
    c.add(0, 1);
    c.add(1, 1);
    c.add(1, 1);
    c.add(0, 2);
    let iou = c.iou();
    assert_eq!(iou[0], Some(3.0 / 5.0));
    assert_eq!(iou[1], Some(2.0 / 3.0));
    assert_eq!(iou[2], None);
    assert!((c.miou() - (0.6 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    assert!((c.accuracy() - 5.0 / 7.0).abs() < 1e-12);
}

/// How patch classes are laid out.
#[derive(Clone, Copy)]
enum Layout {
    /// Every patch an independent uniform class (worst case for upsampling: corners everywhere).
    Checker,
    /// Background with two patch-aligned rectangles of 2-4 patches a side (objects).
    Regions,
}

/// Images of `grid` patches of `p` pixels; the label map repeats each patch's class over
/// its pixel block, and the feature is the class centre plus noise (or pure noise).
fn blocky_set(
    n: usize,
    grid: (usize, usize),
    p: usize,
    classes: usize,
    layout: Layout,
    encode: bool,
    rng: &mut Normal,
) -> (Vec<f32>, Vec<u8>) {
    let dim = 24;
    let c = centres(classes, dim, 1.0, &mut Normal::new(99));
    let (h, w) = (grid.0 * p, grid.1 * p);
    let mut feats = vec![];
    let mut maps = vec![0u8; n * h * w];
    for i in 0..n {
        let mut cls = vec![0usize; grid.0 * grid.1];
        match layout {
            Layout::Checker => cls
                .iter_mut()
                .for_each(|k| *k = rng.below(classes as u64) as usize),
            Layout::Regions => {
                for _ in 0..2 {
                    let k = 1 + rng.below(classes as u64 - 1) as usize;
                    let (rh, rw) = (2 + rng.below(3) as usize, 2 + rng.below(3) as usize);
                    let (y0, x0) = (
                        rng.below((grid.0 - rh + 1) as u64) as usize,
                        rng.below((grid.1 - rw + 1) as u64) as usize,
                    );
                    for y in y0..y0 + rh {
                        cls[y * grid.1 + x0..y * grid.1 + x0 + rw]
                            .iter_mut()
                            .for_each(|v| *v = k);
                    }
                }
            }
        }
        for (j, &k) in cls.iter().enumerate() {
            if encode {
                feats.extend(c[k].iter().map(|v| v + 0.3 * rng.next()));
            } else {
                feats.extend(rng.vec(dim));
            }
            let (gy, gx) = (j / grid.1, j % grid.1);
            for y in gy * p..(gy + 1) * p {
                for x in gx * p..(gx + 1) * p {
                    maps[i * h * w + y * w + x] = k as u8;
                }
            }
        }
    }
    (feats, maps)
}

#[test]
fn features_that_encode_the_label_map_give_miou_near_one() {
    let mut rng = Normal::new(7);
    let (grid, p, classes) = ((8, 8), 4, 4);
    let (ftr, mtr) = blocky_set(30, grid, p, classes, Layout::Regions, true, &mut rng);
    let (fte, mte) = blocky_set(12, grid, p, classes, Layout::Regions, true, &mut rng);
    let geo = DenseGeometry {
        size: (32, 32),
        grid,
        n_classes: classes,
    };
    for targets in [PatchTargets::Soft, PatchTargets::Majority] {
        let s = DenseSettings {
            targets,
            fit: FitConfig {
                l2: 1e-3,
                max_iters: 100,
            },
            max_train_patches: 10_000,
        };
        let r = dense_probe(&ftr, &mtr, &fte, &mte, 24, &geo, &s).unwrap();
        // Only pixels near object corners can be lost to the bilinear upsampling.
        assert!(r.miou > 0.93, "{targets:?}: mIoU {}", r.miou);
        assert!(
            r.pixel_accuracy > 0.97,
            "{targets:?}: pixel accuracy {}",
            r.pixel_accuracy
        );
        assert_eq!(r.patch_accuracy, 1.0);
        assert_eq!((r.n_train_patches, r.n_test_images), (30 * 64, 12));
        // A cap on training patches keeps every third patch and still separates the classes.
        let capped = DenseSettings {
            max_train_patches: 640,
            ..s
        };
        let rc = dense_probe(&ftr, &mtr, &fte, &mte, 24, &geo, &capped).unwrap();
        assert_eq!(rc.n_train_patches, 640);
        assert!(rc.miou > 0.93, "capped: mIoU {}", rc.miou);
        // given only the rows it fits on, the same result; every training row is refused
        let rows = sample_rows(&ftr, 24, train_stride(30 * 64, 640));
        assert_eq!(rows.len(), 640 * 24);
        let rs = dense_probe_sampled(&rows, &mtr, &fte, &mte, 24, &geo, &capped).unwrap();
        assert_eq!(rs, rc);
        assert!(dense_probe_sampled(&ftr, &mtr, &fte, &mte, 24, &geo, &capped).is_err());
    }
}

#[test]
fn noise_features_give_a_low_miou() {
    let mut rng = Normal::new(8);
    let (grid, p, classes) = ((4, 4), 8, 4);
    let (ftr, mtr) = blocky_set(30, grid, p, classes, Layout::Checker, false, &mut rng);
    let (fte, mte) = blocky_set(12, grid, p, classes, Layout::Checker, false, &mut rng);
    let geo = DenseGeometry {
        size: (32, 32),
        grid,
        n_classes: classes,
    };
    let s = DenseSettings {
        targets: PatchTargets::Soft,
        fit: FitConfig {
            l2: 1e-3,
            max_iters: 100,
        },
        max_train_patches: 10_000,
    };
    let r = dense_probe(&ftr, &mtr, &fte, &mte, 24, &geo, &s).unwrap();
    assert!(r.miou < 0.3, "mIoU {} should be near chance", r.miou);
    assert!(
        r.pixel_accuracy < 0.45,
        "pixel accuracy {}",
        r.pixel_accuracy
    );
    // Mismatched sizes are refused.
    assert!(dense_probe(&ftr[1..], &mtr, &fte, &mte, 24, &geo, &s).is_err());
}
