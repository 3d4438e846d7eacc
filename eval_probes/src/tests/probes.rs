//! k-NN and the CLS linear probe on features whose answer is known: separable clusters
//! are classified perfectly, label-independent noise scores chance, and the k-NN vote
//! weights behave as `exp(sim / T)`.

use super::util::{centres, clustered, Normal};
use crate::{
    fit_softmax, knn, probe_features, FeatureSet, FitConfig, ProbeConfig, ProbeSet, Targets,
};

fn labels(n: usize, k: u32, rng: &mut Normal) -> Vec<u32> {
    (0..n).map(|_| rng.below(u64::from(k)) as u32).collect()
}

const FIT: FitConfig = FitConfig {
    l2: 1e-3,
    max_iters: 100,
};

#[test]
fn separable_clusters_are_classified_perfectly() {
    let mut rng = Normal::new(1);
    let (dim, k) = (32, 5);
    let c = centres(k, dim, 1.0, &mut rng);
    let (ytr, yte) = (
        labels(300, k as u32, &mut rng),
        labels(200, k as u32, &mut rng),
    );
    let (xtr, xte) = (
        clustered(&ytr, &c, 0.2, &mut rng),
        clustered(&yte, &c, 0.2, &mut rng),
    );
    let r = knn(&xtr, &ytr, &xte, &yte, dim, k, 20, 0.07).unwrap();
    assert!(r.top1 >= 0.99, "k-NN top-1 {}", r.top1);
    assert_eq!(r.top5, 1.0);
    let (clf, fit) = fit_softmax(&xtr, dim, Targets::Hard(&ytr), k, &FIT).unwrap();
    let pred = clf.predict(&xte).unwrap();
    let acc = pred.iter().zip(&yte).filter(|(a, b)| a == b).count() as f64 / yte.len() as f64;
    assert!(acc >= 0.99, "linear accuracy {acc}");
    assert!(fit.loss < 0.1 && fit.iterations > 0, "{fit:?}");
}

#[test]
fn label_independent_features_score_chance() {
    let mut rng = Normal::new(2);
    let (dim, k) = (16, 4);
    let (ytr, yte) = (
        labels(400, k as u32, &mut rng),
        labels(600, k as u32, &mut rng),
    );
    let (xtr, xte) = (rng.vec(400 * dim), rng.vec(600 * dim));
    let r = knn(&xtr, &ytr, &xte, &yte, dim, k, 20, 0.07).unwrap();
    assert!(
        (r.top1 - 0.25).abs() < 0.07,
        "k-NN top-1 {} should be near chance 0.25",
        r.top1
    );
    let (clf, _) = fit_softmax(&xtr, dim, Targets::Hard(&ytr), k, &FIT).unwrap();
    let pred = clf.predict(&xte).unwrap();
    let acc = pred.iter().zip(&yte).filter(|(a, b)| a == b).count() as f64 / yte.len() as f64;
    assert!(
        (acc - 0.25).abs() < 0.07,
        "linear accuracy {acc} should be near chance 0.25"
    );
}

#[test]
fn knn_votes_are_weighted_by_exp_sim_over_t() {
    // One neighbour of class 0 at cos 0.9, two of class 1 at cos 0.5.
    let s = (1.0f32 - 0.25).sqrt();
    let t = (1.0f32 - 0.81).sqrt();
    let bank = vec![0.9, t, 0.5, s, 0.5, -s];
    let labels = [0u32, 1, 1];
    let q = vec![1.0, 0.0];
    // T = 0.07: exp(0.9/0.07) >> 2 exp(0.5/0.07), class 0 wins.
    assert_eq!(
        knn(&bank, &labels, &q, &[0], 2, 2, 3, 0.07).unwrap().top1,
        1.0
    );
    // T = 10: the votes are nearly uniform, two neighbours beat one.
    assert_eq!(
        knn(&bank, &labels, &q, &[1], 2, 2, 3, 10.0).unwrap().top1,
        1.0
    );
    // k = 1 only sees the nearest.
    assert_eq!(
        knn(&bank, &labels, &q, &[0], 2, 2, 1, 10.0).unwrap().top1,
        1.0
    );
    assert!(
        knn(&bank, &labels, &q, &[5], 2, 2, 3, 0.07).is_err(),
        "labels out of range"
    );
    assert!(
        knn(&bank, &labels, &q[..1], &[0], 2, 2, 3, 0.07).is_err(),
        "ragged features"
    );
}

#[test]
fn soft_one_hot_targets_fit_like_hard_targets() {
    let mut rng = Normal::new(4);
    let (dim, k) = (8, 3);
    let c = centres(k, dim, 0.5, &mut rng);
    let y = labels(120, k as u32, &mut rng);
    let x = clustered(&y, &c, 0.5, &mut rng);
    let onehot: Vec<f32> = y
        .iter()
        .flat_map(|&l| (0..k).map(move |j| if j == l as usize { 1.0 } else { 0.0 }))
        .collect();
    let (a, ra) = fit_softmax(&x, dim, Targets::Hard(&y), k, &FIT).unwrap();
    let (b, rb) = fit_softmax(&x, dim, Targets::Soft(&onehot), k, &FIT).unwrap();
    assert_eq!(ra.iterations, rb.iterations);
    assert!((ra.loss - rb.loss).abs() < 1e-6);
    assert!(a
        .weights
        .iter()
        .zip(&b.weights)
        .all(|(u, v)| (u - v).abs() < 1e-4));
    // The same inputs give the same bits.
    let (a2, _) = fit_softmax(&x, dim, Targets::Hard(&y), k, &FIT).unwrap();
    assert_eq!(a, a2);
}

/// A probe set with clustered CLS features and patch features equal to a per-class code.
#[test]
fn probe_features_reports_every_probe_and_condenses_to_metrics() {
    let mut rng = Normal::new(5);
    let (dim, k, n, n_train) = (16, 3usize, 40, 30);
    let grid = (4, 4);
    let size = (16, 16);
    let c = centres(k + 1, dim, 1.0, &mut rng);
    let y = labels(n, k as u32, &mut rng);
    let cls = clustered(&y, &c[..k], 0.1, &mut rng);
    // Label maps: the image's class on the left half of the patch grid, background on the right.
    let mut maps = vec![];
    let mut patches = vec![];
    for &l in &y {
        for _py in 0..size.0 {
            for px in 0..size.1 {
                maps.push(if px < 8 { l as u8 + 1 } else { 0 });
            }
        }
        for _gy in 0..grid.0 {
            for gx in 0..grid.1 {
                let class = if gx < 2 { l as usize + 1 } else { 0 };
                patches.extend(c[class].iter().map(|v| v + 0.1 * rng.next()));
            }
        }
    }
    let set = ProbeSet {
        name: "toy".into(),
        size,
        rgb: vec![0; n * 3 * size.0 * size.1],
        norm: data::Normalizer::new(&data::IMAGENET_MEAN, &data::IMAGENET_STD),
        labels: Some(y.clone()),
        label_maps: Some(maps),
        n_classes: k,
        n_train,
        ids: (0..n).map(|i| format!("toy/{i}")).collect(),
    };
    let feats = FeatureSet::new(n, dim, grid, cls, patches).unwrap();
    let cfg = ProbeConfig {
        knn_k: 5,
        ..ProbeConfig::default()
    };
    let rep = probe_features(&set, &feats, &cfg).unwrap();
    assert_eq!((rep.n_train, rep.n_test, rep.grid), (30, 10, grid));
    assert!(rep.knn.as_ref().unwrap().top1 >= 0.99);
    assert!(rep.linear.as_ref().unwrap().top1 >= 0.99);
    let dense = rep.dense.as_ref().unwrap();
    assert!(
        dense.miou > 0.95 && dense.pixel_accuracy > 0.97,
        "{dense:?}"
    );
    assert!(rep.correspondence.is_none());
    let report = crate::ProbeReport {
        step: Some(7),
        sets: vec![rep.clone(), rep.clone()],
        total_ms: 0.0,
    };
    let m = report.metrics();
    assert_eq!(m.knn_top1, Some(rep.knn.as_ref().unwrap().top1));
    assert_eq!(m.dense_miou, Some(dense.miou));
    assert_eq!(m.locality, Some(rep.locality.score));
    assert_eq!(m.correspondence, None);
    // Features for the wrong number of images are refused.
    assert!(probe_features(&set, &feats.slice(0..10), &cfg).is_err());
}

#[test]
fn probe_config_has_defaults_and_rejects_unknown_keys() {
    let cfg: ProbeConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, ProbeConfig::default());
    assert_eq!((cfg.knn_k, cfg.knn_temperature), (20, 0.07));
    assert!(serde_json::from_str::<ProbeConfig>(r#"{"knn_kk": 3}"#).is_err());
    let bad = ProbeConfig {
        knn_k: 0,
        knn_temperature: -1.0,
        dense_iters: 0,
        ..ProbeConfig::default()
    };
    assert_eq!(bad.problems().len(), 3, "{:?}", bad.problems());
}
