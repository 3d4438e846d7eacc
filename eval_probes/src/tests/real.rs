//! One real probe run: a small random-init ViT on the built-in synthetic scenes. Every
//! value lands in its range and two runs give the same report (timings aside).

use candle_core::DType;
use model::vit::Vit;
use model::VitConfig;

use crate::{run_probes, train_stride, ProbeConfig, ProbeSet, ProbeSetConfig};

/// A 2-block, 32-wide ViT with 8-pixel patches (cheap enough for unit tests).
pub(crate) fn tiny_vit_config() -> VitConfig {
    let mut c = VitConfig::preset("vit_pico").expect("preset exists");
    c.embed_dim = 32;
    c.depth = 2;
    c.num_heads = 2;
    c.ffn_ratio = 2.0;
    c.patch_size = 8;
    c.n_storage_tokens = 1;
    c
}

#[test]
fn random_init_vit_on_synthetic_scenes_gives_in_range_deterministic_probes() {
    let vit = Vit::init(&tiny_vit_config(), 7, DType::F32).unwrap();
    let src = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 1,
        size: 48,
        len: 10_000,
        ..Default::default()
    });
    let set = ProbeSet::build(
        "synthetic",
        &src,
        None,
        &ProbeSetConfig {
            size: 48,
            n_train: 40,
            n_test: 16,
            workers: 1,
            ..ProbeSetConfig::default()
        },
    )
    .unwrap();
    let cfg = ProbeConfig {
        knn_k: 10,
        linear_iters: 30,
        dense_iters: 30,
        batch: 16,
        ..ProbeConfig::default()
    };
    let a = run_probes(&vit, std::slice::from_ref(&set), &cfg).unwrap();
    let r = &a.sets[0];
    assert_eq!((r.n_train, r.n_test, r.grid), (40, 16, (6, 6)));
    let unit = |v: f64| (0.0..=1.0).contains(&v);
    let knn = r.knn.as_ref().unwrap();
    let lin = r.linear.as_ref().unwrap();
    let dense = r.dense.as_ref().unwrap();
    assert!(unit(knn.top1) && unit(knn.top5) && knn.top5 >= knn.top1);
    assert!(unit(lin.top1) && unit(lin.train_top1));
    assert!(unit(dense.miou) && unit(dense.pixel_accuracy) && unit(dense.patch_accuracy));
    assert_eq!(dense.per_class_iou.len(), 9);
    assert!(dense.per_class_iou[0].is_some(), "background is present");
    let loc = &r.locality;
    assert!(
        (-1.0..=1.0).contains(&loc.neighbour_sim)
            && (-1.0..=1.0).contains(&loc.far_sim)
            && (-1.0..=1.0).contains(&loc.map_consistency)
    );
    let col = &r.collapse;
    assert!(
        col.effective_rank >= 1.0
            && col.effective_rank <= 32.0
            && col.patch_std > 0.0
            && (-1.0..=1.0).contains(&col.cls_patch_cos)
    );
    let corr = r.correspondence.as_ref().unwrap();
    assert!(unit(corr.accuracy) && corr.n_patches > 0, "{corr:?}");
    assert!(r.timing.extract_ms > 0.0 && r.timing.dense_ms > 0.0 && a.total_ms > 0.0);
    // Deterministic: a second run gives the same numbers.
    let mut b = run_probes(&vit, std::slice::from_ref(&set), &cfg).unwrap();
    let mut a2 = a.clone();
    for rep in [&mut a2, &mut b] {
        rep.total_ms = 0.0;
        rep.sets
            .iter_mut()
            .for_each(|s| s.timing = Default::default());
    }
    assert_eq!(a2, b);
    let m = a.metrics();
    assert_eq!(m.dense_miou, Some(dense.miou));
    assert_eq!(m.correspondence, Some(corr.accuracy));
    // The report serialises for the probe history.
    let json = serde_json::to_string(&a).unwrap();
    let back: crate::ProbeReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.sets[0].dense.as_ref().unwrap().per_class_iou.len(), 9);
    assert!((back.sets[0].locality.score - loc.score).abs() < 1e-12);
}

#[test]
fn sets_the_model_cannot_probe_are_refused_before_any_forward() {
    let vit = Vit::init(&tiny_vit_config(), 7, DType::F32).unwrap();
    let src = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 2,
        size: 32,
        len: 100,
        ..Default::default()
    });
    let small = ProbeSetConfig {
        size: 16,
        n_train: 3,
        n_test: 2,
        workers: 1,
        ..ProbeSetConfig::default()
    };
    let set = ProbeSet::build("small", &src, None, &small).unwrap();
    // 16 px images leave no room for two 2x2-patch views 12 px apart.
    let err = run_probes(&vit, std::slice::from_ref(&set), &ProbeConfig::default()).unwrap_err();
    assert!(err.to_string().contains("correspondence"), "{err}");
    // Without the correspondence probe the same set runs.
    let mut cfg = ProbeConfig::default();
    cfg.correspondence.images = 0;
    let r = run_probes(&vit, std::slice::from_ref(&set), &cfg).unwrap();
    assert!(r.sets[0].correspondence.is_none() && r.sets[0].dense.is_some());
    // A size that is not a multiple of the patch is refused.
    let odd = ProbeSet::build("odd", &src, None, &ProbeSetConfig { size: 20, ..small }).unwrap();
    let err = run_probes(&vit, std::slice::from_ref(&odd), &cfg).unwrap_err();
    assert!(
        err.to_string().contains("multiple of the patch size"),
        "{err}"
    );
}

/// `run_probes` keeps patch tokens only where a probe reads them (a set without label
/// maps: its locality images); the report is the one the probes give on every image's
/// full features, with and without label maps.
#[test]
fn probing_with_the_needed_patch_tokens_only_gives_the_full_features_report() {
    let vit = Vit::init(&tiny_vit_config(), 3, DType::F32).unwrap();
    let src = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 4,
        size: 32,
        len: 1000,
        ..Default::default()
    });
    let with_maps = ProbeSet::build(
        "maps",
        &src,
        None,
        &ProbeSetConfig {
            size: 32,
            n_train: 24,
            n_test: 12,
            workers: 1,
            ..ProbeSetConfig::default()
        },
    )
    .unwrap();
    let without = ProbeSet {
        name: "no maps".into(),
        label_maps: None,
        ..with_maps.clone()
    };
    let mut cfg = ProbeConfig {
        knn_k: 5,
        linear_iters: 10,
        dense_iters: 10,
        locality_images: 5,
        batch: 7,
        ..ProbeConfig::default()
    };
    cfg.correspondence.images = 0;
    // 24 training images of 16 patches: every row, and every 11th (37 at most), which
    // does not fall on image or batch boundaries
    let mut sampled = cfg.clone();
    sampled.dense_max_train_patches = 37;
    for (set, cfg) in [(&with_maps, &cfg), (&with_maps, &sampled), (&without, &cfg)] {
        let full = crate::extract(
            &vit,
            &set.pixels(0..set.len()),
            set.len(),
            set.size,
            cfg.batch,
        )
        .unwrap();
        let mut want = crate::probe_features(set, &full, cfg).unwrap();
        let mut got = run_probes(&vit, std::slice::from_ref(set), cfg)
            .unwrap()
            .sets
            .remove(0);
        want.timing = Default::default();
        got.timing = Default::default();
        assert_eq!(got, want, "{}", set.name);
        assert_eq!(got.dense.is_some(), set.label_maps.is_some());
        if let Some(d) = &got.dense {
            let rows: usize = 24 * 16;
            assert_eq!(
                d.n_train_patches,
                rows.div_ceil(train_stride(rows, cfg.dense_max_train_patches))
            );
        }
    }
    // features that miss the patch tokens a probe reads are refused
    let full = crate::extract(&vit, &without.pixels(0..36), 36, (32, 32), 7).unwrap();
    assert!(crate::probe_features(&without, &full.slice(0..30), &cfg).is_err());
}
