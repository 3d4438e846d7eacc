//! Probe sets are drawn deterministically with label maps at the image size, and feature
//! extraction does not depend on the batch size.

use candle_core::DType;
use model::vit::Vit;

use super::real::tiny_vit_config;
use crate::features::split_for_tests;
use crate::{extract, extract_set, ProbeSet, ProbeSetConfig};

#[test]
fn interleaved_split_is_disjoint_and_spread() {
    let idx: Vec<u64> = (0..10).map(|i| i * 7).collect();
    let (tr, te) = split_for_tests(&idx, 3);
    assert_eq!((tr.len(), te.len()), (7, 3));
    assert_eq!(te, vec![21, 42, 63], "every third-or-so entry");
    let mut all: Vec<u64> = tr.iter().chain(&te).copied().collect();
    all.sort();
    assert_eq!(all, idx);
}

#[test]
fn probe_sets_are_deterministic_with_label_maps_at_image_size() {
    let src = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 3,
        size: 64,
        len: 1000,
        ..Default::default()
    });
    let cfg = ProbeSetConfig {
        size: 32,
        n_train: 6,
        n_test: 4,
        ..ProbeSetConfig::default()
    };
    let a = ProbeSet::build("synthetic", &src, None, &cfg).unwrap();
    assert_eq!(
        (a.len(), a.n_train, a.n_test(), a.size, a.n_classes),
        (10, 6, 4, (32, 32), 8)
    );
    assert_eq!(a.rgb.len(), 10 * 3 * 32 * 32);
    let maps = a.label_maps.as_ref().unwrap();
    assert_eq!(maps.len(), 10 * 32 * 32);
    assert!(maps.iter().all(|&v| v <= 8) && maps.iter().any(|&v| v > 0));
    // Nearest-neighbour resizing: every map value is a class of the source map.
    let s0 = data::Source::get(&src, 0).unwrap();
    let src_classes: std::collections::BTreeSet<u8> =
        s0.label_map.unwrap().data.into_iter().collect();
    let pos = a.ids.iter().position(|id| id.ends_with("/0")).unwrap();
    assert!(maps[pos * 1024..(pos + 1) * 1024]
        .iter()
        .all(|v| src_classes.contains(v)));
    let b = ProbeSet::build(
        "synthetic",
        &src,
        None,
        &ProbeSetConfig {
            workers: 1,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(a, b, "independent of the worker count");
    // Two sources: train from one, test from the other.
    let other = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 4,
        size: 64,
        len: 1000,
        ..Default::default()
    });
    let c = ProbeSet::build("two", &src, Some(&other), &cfg).unwrap();
    assert_eq!((c.n_train, c.n_test()), (6, 4));
    assert!(c.ids[6..].iter().all(|id| id.starts_with("synthetic-4/")));
    assert!(ProbeSet::build("bad", &src, None, &ProbeSetConfig { n_test: 0, ..cfg }).is_err());
}

#[test]
fn extraction_does_not_depend_on_the_batch_size() {
    let vit = Vit::init(&tiny_vit_config(), 1, DType::F32).unwrap();
    let src = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 5,
        size: 32,
        len: 100,
        ..Default::default()
    });
    let set = ProbeSet::build(
        "s",
        &src,
        None,
        &ProbeSetConfig {
            size: 32,
            n_train: 3,
            n_test: 2,
            ..ProbeSetConfig::default()
        },
    )
    .unwrap();
    let images = set.pixels(0..5);
    let a = extract(&vit, &images, 5, (32, 32), 5).unwrap();
    let b = extract(&vit, &images, 5, (32, 32), 2).unwrap();
    assert_eq!((a.n, a.dim, a.grid), (5, 32, (4, 4)));
    assert_eq!((a.cls.len(), a.patches.len()), (5 * 32, 5 * 16 * 32));
    let diff = max_diff(&a.patches, &b.patches).max(max_diff(&a.cls, &b.cls));
    assert!(diff < 1e-5, "batch 5 vs 2 differ by {diff}");
    assert!(extract(&vit, &images[1..], 5, (32, 32), 2).is_err());
    // A set's features with patch tokens for some images only, and a strided sample of
    // rows: the tokens of a full extraction (to rounding between batch sizes), whatever the
    // batches and wherever the kept images and the sampled rows fall in them (a batch of
    // 2 images is 32 rows, which a stride of 5 or 7 does not divide).
    let cases = [
        (2, 1..4, Some((3, 5))),
        (5, 3..5, Some((5, 1))),
        (3, 0..5, None),
        (1, 2..2, Some((2, 7))),
        (2, 3..5, Some((3, 100))),
        (2, 0..0, Some((0, 3))),
    ];
    for (batch, keep, sample) in cases {
        let sample = sample.map(|(images, stride)| crate::RowSample { images, stride });
        let got = extract_set(&vit, &set, batch, keep.clone(), sample).unwrap();
        assert!(max_diff(&got.cls, &a.cls) < 1e-5, "batch {batch}");
        let want = a.slice(keep.clone());
        let part = &got.part;
        assert_eq!((part.n, part.grid), (keep.len(), (4, 4)));
        let diff = max_diff(&part.patches, &want.patches).max(max_diff(&part.cls, &want.cls));
        assert!(diff < 1e-5, "batch {batch}, kept {keep:?}: {diff}");
        let want = sample.map_or(vec![], |s| {
            crate::sample_rows(&a.patches[..s.images * 16 * 32], 32, s.stride)
        });
        let rows = sample.map_or(0, |s| (s.images * 16).div_ceil(s.stride));
        assert_eq!(got.sampled.len(), rows * 32, "{sample:?}");
        let diff = max_diff(&got.sampled, &want);
        assert!(diff < 1e-5, "batch {batch}, sample {sample:?}: {diff}");
    }
    assert!(
        extract_set(&vit, &set, 2, 4..6, None).is_err(),
        "past the set"
    );
    let past = crate::RowSample {
        images: 6,
        stride: 2,
    };
    assert!(extract_set(&vit, &set, 2, 0..1, Some(past)).is_err());
    assert!(
        extract(&vit, &vec![0.0; 3 * 30 * 30], 1, (30, 30), 1).is_err(),
        "not a multiple of the patch"
    );
}

/// The largest absolute difference of two equally long slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
