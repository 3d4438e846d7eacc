//! Running every probe on a model and the probe sets: [`run_probes`] extracts the
//! features once per set, runs the probes the set's labels allow, measures what each
//! costs, and returns a serde [`ProbeReport`]. [`ProbeReport::metrics`] condenses it to the
//! [`ProbeMetrics`] the stage machine watches.

use std::time::Instant;

use model::vit::Vit;
use serde::{Deserialize, Serialize};

use crate::dense::{
    dense_probe_sampled, train_rows, train_stride, DenseGeometry, DenseResult, DenseSettings,
    PatchTargets,
};
use crate::error::{ProbeError, Result};
use crate::features::{extract, extract_set, FeatureSet, ProbeSet, RowSample};
use crate::knn::{knn, KnnResult};
use crate::linear::{fit_softmax, FitConfig, FitReport, Targets};
use crate::locality::{
    collapse_indicators, correspondence, locality, CollapseIndicators, CorrespondenceConfig,
    CorrespondenceResult, LocalityResult, ViewGeometry,
};

/// Probe settings; every cost is bounded by a size here (and by the probe sets' sizes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Neighbours of the k-NN probe.
    #[serde(default = "d_k")]
    pub knn_k: usize,
    /// k-NN vote temperature.
    #[serde(default = "d_temp")]
    pub knn_temperature: f64,
    /// L2 penalty of the CLS linear probe.
    #[serde(default = "d_l2")]
    pub linear_l2: f64,
    /// Most L-BFGS iterations of the CLS linear probe.
    #[serde(default = "d_iters")]
    pub linear_iters: usize,
    /// L2 penalty of the dense linear probe.
    #[serde(default = "d_l2")]
    pub dense_l2: f64,
    /// Most L-BFGS iterations of the dense linear probe.
    #[serde(default = "d_iters")]
    pub dense_iters: usize,
    /// At most this many training patches for the dense probe (even stride over all).
    #[serde(default = "d_dense_rows")]
    pub dense_max_train_patches: usize,
    /// Patch-level training targets of the dense probe.
    #[serde(default)]
    pub dense_targets: PatchTargets,
    /// Test images used by the locality and collapse indicators.
    #[serde(default = "d_locality_images")]
    pub locality_images: usize,
    /// Far distance of the locality score in patches (`None`: half the grid side, >= 2).
    #[serde(default)]
    pub far_radius: Option<usize>,
    /// Patch rows used for the effective rank.
    #[serde(default = "d_rank_rows")]
    pub rank_rows: usize,
    /// The dense correspondence probe.
    #[serde(default)]
    pub correspondence: CorrespondenceConfig,
    /// Images per backbone forward.
    #[serde(default = "d_batch")]
    pub batch: usize,
}

fn d_k() -> usize {
    20
}
fn d_temp() -> f64 {
    0.07
}
fn d_l2() -> f64 {
    1e-3
}
fn d_iters() -> usize {
    100
}
fn d_dense_rows() -> usize {
    50_000
}
fn d_locality_images() -> usize {
    64
}
fn d_rank_rows() -> usize {
    4096
}
fn d_batch() -> usize {
    32
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            knn_k: d_k(),
            knn_temperature: d_temp(),
            linear_l2: d_l2(),
            linear_iters: d_iters(),
            dense_l2: d_l2(),
            dense_iters: d_iters(),
            dense_max_train_patches: d_dense_rows(),
            dense_targets: PatchTargets::default(),
            locality_images: d_locality_images(),
            far_radius: None,
            rank_rows: d_rank_rows(),
            correspondence: CorrespondenceConfig::default(),
            batch: d_batch(),
        }
    }
}

impl ProbeConfig {
    /// Every problem with these values.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        if self.knn_k == 0 {
            p.push("knn_k must be positive".into());
        }
        if self.knn_temperature.is_nan() || self.knn_temperature <= 0.0 {
            p.push(format!(
                "knn_temperature {} must be positive",
                self.knn_temperature
            ));
        }
        for (name, v) in [("linear_l2", self.linear_l2), ("dense_l2", self.dense_l2)] {
            if v.is_nan() || v < 0.0 {
                p.push(format!("{name} {v} must be >= 0"));
            }
        }
        for (name, v, max) in [
            ("linear_iters", self.linear_iters, 10_000),
            ("dense_iters", self.dense_iters, 10_000),
            ("batch", self.batch, 4096),
            ("rank_rows", self.rank_rows, 1 << 20),
            (
                "dense_max_train_patches",
                self.dense_max_train_patches,
                1 << 24,
            ),
        ] {
            if v == 0 || v > max {
                p.push(format!("{name} {v} must be in 1..={max}"));
            }
        }
        if self.locality_images == 0 {
            p.push("locality_images must be positive".into());
        }
        if self.far_radius == Some(0) {
            p.push("far_radius must be positive".into());
        }
        p
    }
}

/// The CLS linear probe's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearResult {
    /// Test accuracy.
    pub top1: f64,
    /// Accuracy on the training part (a fit check).
    pub train_top1: f64,
    /// Training images.
    pub n_train: usize,
    /// Test images.
    pub n_test: usize,
    /// How the fit ended.
    pub fit: FitReport,
}

/// Milliseconds spent per probe.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Backbone forwards of the set's images.
    pub extract_ms: f64,
    /// k-NN.
    pub knn_ms: f64,
    /// CLS linear probe.
    pub linear_ms: f64,
    /// Dense linear probe.
    pub dense_ms: f64,
    /// Locality and collapse indicators.
    pub locality_ms: f64,
    /// Correspondence probe (its two view forwards included).
    pub correspondence_ms: f64,
}

/// Probe results of one probe set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetReport {
    /// The set's name.
    pub name: String,
    /// Training images.
    pub n_train: usize,
    /// Test images.
    pub n_test: usize,
    /// Image size (H, W).
    pub size: (usize, usize),
    /// Patch grid.
    pub grid: (usize, usize),
    /// k-NN on CLS (sets with image labels).
    pub knn: Option<KnnResult>,
    /// Linear probe on CLS (sets with image labels).
    pub linear: Option<LinearResult>,
    /// Dense linear probe (sets with label maps).
    pub dense: Option<DenseResult>,
    /// Locality of the patch similarity maps (test images).
    pub locality: LocalityResult,
    /// Collapse indicators (test images).
    pub collapse: CollapseIndicators,
    /// Dense correspondence (needs the model; `None` when disabled or run on features).
    pub correspondence: Option<CorrespondenceResult>,
    /// Cost.
    pub timing: Timing,
}

/// Everything one probe run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Training step of the evaluated weights, filled in by the caller.
    pub step: Option<u64>,
    /// One entry per probe set, in the order given.
    pub sets: Vec<SetReport>,
    /// Wall time of the whole run.
    pub total_ms: f64,
}

/// The scalar metrics the stage machine and the probe history track: each is the mean
/// over the probe sets that have it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeMetrics {
    /// k-NN top-1 accuracy.
    pub knn_top1: Option<f64>,
    /// Linear-probe top-1 accuracy.
    pub linear_top1: Option<f64>,
    /// Dense-probe mIoU.
    pub dense_miou: Option<f64>,
    /// Dense-probe pixel accuracy.
    pub dense_pixel_accuracy: Option<f64>,
    /// Locality score.
    pub locality: Option<f64>,
    /// Dense correspondence accuracy.
    pub correspondence: Option<f64>,
    /// Effective rank of the patch features.
    pub effective_rank: Option<f64>,
    /// Mean cos(CLS, patch).
    pub cls_patch_cos: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl ProbeReport {
    /// The scalar metrics of this report.
    pub fn metrics(&self) -> ProbeMetrics {
        let s = &self.sets;
        ProbeMetrics {
            knn_top1: mean(s.iter().filter_map(|r| r.knn.as_ref().map(|k| k.top1))),
            linear_top1: mean(s.iter().filter_map(|r| r.linear.as_ref().map(|k| k.top1))),
            dense_miou: mean(s.iter().filter_map(|r| r.dense.as_ref().map(|d| d.miou))),
            dense_pixel_accuracy: mean(
                s.iter()
                    .filter_map(|r| r.dense.as_ref().map(|d| d.pixel_accuracy)),
            ),
            locality: mean(s.iter().map(|r| r.locality.score)),
            correspondence: mean(
                s.iter()
                    .filter_map(|r| r.correspondence.as_ref().map(|c| c.accuracy)),
            ),
            effective_rank: mean(s.iter().map(|r| r.collapse.effective_rank)),
            cls_patch_cos: mean(s.iter().map(|r| r.collapse.cls_patch_cos)),
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Runs every applicable probe of `cfg` on each set with `vit` (eval mode, final-norm
/// tokens). The result's `step` is `None`; the caller knows it.
pub fn run_probes(vit: &Vit, sets: &[ProbeSet], cfg: &ProbeConfig) -> Result<ProbeReport> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(ProbeError::Config(problems));
    }
    // Check every set before the first forward: a set the model cannot run, or whose
    // images are too small for the correspondence views, is a config error.
    let p = vit.cfg.patch_size;
    for set in sets {
        set.validate()?;
        if set.size.0 % p != 0 || set.size.1 % p != 0 {
            return Err(ProbeError::ProbeSet {
                name: set.name.clone(),
                reason: format!(
                    "image size {:?} is not a multiple of the patch size {p}",
                    set.size
                ),
            });
        }
        if cfg.correspondence.images > 0 {
            ViewGeometry::new(
                set.size,
                p,
                cfg.correspondence.shift,
                cfg.correspondence.flip,
            )?;
        }
    }
    let t0 = Instant::now();
    let mut out = vec![];
    for set in sets {
        let t = Instant::now();
        // patch tokens only where a probe reads them: the test part and a sample of the
        // training part's rows for the dense probe, the locality images of the test part
        // otherwise
        let (keep, sample) = if set.label_maps.is_some() {
            let rows = set.n_train * (set.size.0 / p) * (set.size.1 / p);
            let sample = RowSample {
                images: set.n_train,
                stride: train_stride(rows, cfg.dense_max_train_patches),
            };
            (set.n_train..set.len(), Some(sample))
        } else {
            (locality_images(set, cfg), None)
        };
        let got = extract_set(vit, set, cfg.batch, keep.clone(), sample)?;
        let extract_ms = ms(t);
        let dense_train = sample.map(|_| got.sampled.as_slice());
        let mut rep = probe_parts(set, &got.cls, &got.part, keep.start, dense_train, cfg)?;
        drop(got);
        rep.timing.extract_ms = extract_ms;
        let n_corr = cfg.correspondence.images.min(set.n_test());
        if n_corr > 0 {
            let t = Instant::now();
            let images = set.pixels(set.n_train..set.n_train + n_corr);
            let res = correspondence(
                &images,
                n_corr,
                set.size,
                vit.cfg.patch_size,
                &cfg.correspondence,
                |px, n, size| extract(vit, px, n, size, cfg.batch),
            )?;
            rep.correspondence = Some(res);
            rep.timing.correspondence_ms = ms(t);
        }
        out.push(rep);
    }
    Ok(ProbeReport {
        step: None,
        sets: out,
        total_ms: ms(t0),
    })
}

/// The images of `set` the locality and collapse indicators read: the first
/// `cfg.locality_images` of its test part.
fn locality_images(set: &ProbeSet, cfg: &ProbeConfig) -> std::ops::Range<usize> {
    set.n_train..set.n_train + cfg.locality_images.min(set.n_test())
}

/// Every probe that needs only features: k-NN and linear on CLS (when `set` has image
/// labels), the dense probe (when it has label maps), locality and collapse indicators on
/// the test part. `features` must be those of `set`'s images, in order.
pub fn probe_features(
    set: &ProbeSet,
    features: &FeatureSet,
    cfg: &ProbeConfig,
) -> Result<SetReport> {
    if features.n != set.len() {
        return Err(ProbeError::shape(
            "features",
            format!(
                "{} feature rows for the {} images of {:?}",
                features.n,
                set.len(),
                set.name
            ),
        ));
    }
    let rows = set.n_train * features.n_patches();
    let dense_train = set.label_maps.as_ref().map(|_| {
        train_rows(
            &features.patches[..rows * features.dim],
            features.dim,
            cfg.dense_max_train_patches,
        )
    });
    probe_parts(set, &features.cls, features, 0, dense_train.as_deref(), cfg)
}

/// [`probe_features`] on the CLS tokens `cls [n, D]` of every image and the full features
/// `part` of images `from..from + part.n` only, which must cover every image whose patch
/// tokens a probe reads (the test part for the dense probe, the locality images
/// otherwise); `dense_train` are the training rows the dense probe fits on (see
/// [`crate::dense::dense_probe_sampled`]), given when the set has label maps. Nothing here
/// copies more than those locality images' features.
fn probe_parts(
    set: &ProbeSet,
    cls: &[f32],
    part: &FeatureSet,
    from: usize,
    dense_train: Option<&[f32]>,
    cfg: &ProbeConfig,
) -> Result<SetReport> {
    set.validate()?;
    let d = part.dim;
    let n = set.len();
    let covers = |r: &std::ops::Range<usize>| from <= r.start && r.end <= from + part.n;
    let local = locality_images(set, cfg);
    let dense_needs = set.label_maps.is_some().then_some(set.n_train..n);
    if cls.len() != n * d
        || !covers(&local)
        || dense_needs.as_ref().is_some_and(|r| !covers(r))
        || dense_needs.is_some() != dense_train.is_some()
    {
        return Err(ProbeError::shape(
            "features",
            format!(
                "{} CLS values and patch tokens of images {from}..{} for the {n} images of {:?} (width {d})",
                cls.len(),
                from + part.n,
                set.name
            ),
        ));
    }
    let (n_tr, n_te) = (set.n_train, set.n_test());
    let (cls_train, cls_test) = cls.split_at(n_tr * d);
    // the patch tokens of images r, which `covers` checked are in `part`
    let patches = |r: std::ops::Range<usize>| {
        let s = part.n_patches() * d;
        &part.patches[(r.start - from) * s..(r.end - from) * s]
    };
    let mut timing = Timing::default();
    let (mut knn_res, mut linear_res, mut dense_res) = (None, None, None);
    if let Some(labels) = &set.labels {
        let (ytr, yte) = labels.split_at(n_tr);
        let t = Instant::now();
        knn_res = Some(knn(
            cls_train,
            ytr,
            cls_test,
            yte,
            d,
            set.n_classes,
            cfg.knn_k,
            cfg.knn_temperature,
        )?);
        timing.knn_ms = ms(t);
        let t = Instant::now();
        let (clf, fit) = fit_softmax(
            cls_train,
            d,
            Targets::Hard(ytr),
            set.n_classes,
            &FitConfig {
                l2: cfg.linear_l2,
                max_iters: cfg.linear_iters,
            },
        )?;
        let acc = |x: &[f32], y: &[u32]| -> Result<f64> {
            Ok(clf
                .predict(x)?
                .iter()
                .zip(y)
                .filter(|(a, b)| a == b)
                .count() as f64
                / y.len().max(1) as f64)
        };
        linear_res = Some(LinearResult {
            top1: acc(cls_test, yte)?,
            train_top1: acc(cls_train, ytr)?,
            n_train: n_tr,
            n_test: n_te,
            fit,
        });
        timing.linear_ms = ms(t);
    }
    if let (Some(maps), Some(train_rows)) = (&set.label_maps, dense_train) {
        let t = Instant::now();
        let hw = set.size.0 * set.size.1;
        let geo = DenseGeometry {
            size: set.size,
            grid: part.grid,
            n_classes: set.n_dense_classes(),
        };
        let settings = DenseSettings {
            targets: cfg.dense_targets,
            fit: FitConfig {
                l2: cfg.dense_l2,
                max_iters: cfg.dense_iters,
            },
            max_train_patches: cfg.dense_max_train_patches,
        };
        dense_res = Some(dense_probe_sampled(
            train_rows,
            &maps[..n_tr * hw],
            patches(n_tr..n),
            &maps[n_tr * hw..],
            d,
            &geo,
            &settings,
        )?);
        timing.dense_ms = ms(t);
    }
    let t = Instant::now();
    let sub = part.slice(local.start - from..local.end - from);
    let loc = locality(&sub, cfg.far_radius)?;
    let collapse = collapse_indicators(&sub, cfg.rank_rows)?;
    timing.locality_ms = ms(t);
    Ok(SetReport {
        name: set.name.clone(),
        n_train: n_tr,
        n_test: n_te,
        size: set.size,
        grid: part.grid,
        knn: knn_res,
        linear: linear_res,
        dense: dense_res,
        locality: loc,
        collapse,
        correspondence: None,
        timing,
    })
}
