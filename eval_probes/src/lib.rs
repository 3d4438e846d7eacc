//! `eval_probes`: what dinod learns about its features while it trains, and what it does
//! about it.
//!
//! Owns:
//! - **feature extraction** from a frozen backbone in bounded batches ([`extract`],
//!   [`FeatureSet`]) and fixed labelled **probe sets** drawn deterministically from a
//!   `data::Source` through the evaluation transform ([`ProbeSet`]);
//! - the **probes**, each a function of (features, labels) with a serde result and a cost
//!   bounded by sizes in [`ProbeConfig`]: weighted k-NN on CLS ([`knn()`]), a multinomial
//!   logistic-regression probe on CLS ([`fit_softmax`]), the dense linear probe on patch
//!   tokens with mIoU / pixel accuracy ([`dense_probe`]), and label-free dense health
//!   signals: the locality score, dense correspondence between two crops of known
//!   geometry, collapse indicators and Gram drift ([`locality()`], [`correspondence()`],
//!   [`collapse_indicators`], [`gram_drift`]); [`run_probes`] runs them all and times them;
//! - the **stage machine** ([`StageMachine`]): Pretrain → GramAnchor → HighResAdapt →
//!   Distill | Continue, driven by probe metrics, its serde state checkpointed, its recipe
//!   overrides a pure function of (state, step);
//! - **pictures**: PCA-RGB and similarity maps of patch features, side-by-side layouts and
//!   training curves with stage transitions ([`pca_rgb`], [`similarity_map`],
//!   [`side_by_side`], [`curves_png`]).
//!
//! Must not know: actors, async runtimes, storage (sled, checkpoints), metrics sinks or
//! the CLI. Its only IO is writing the PNG files it is asked to write; probe history,
//! when to evaluate and where the Gram teacher's weights come from belong to the caller
//! (`actors/`), which feeds metrics in and applies the [`StageOverrides`] it gets back.
#![warn(missing_docs, unreachable_pub)]

mod dense;
mod error;
mod features;
mod knn;
mod linalg;
mod linear;
mod locality;
mod report;
mod stage;
mod viz;

#[cfg(test)]
mod tests;

pub use dense::{
    dense_probe, dense_probe_sampled, patch_histograms, sample_rows, train_rows, train_stride,
    upsample_bilinear, Confusion, DenseGeometry, DenseResult, DenseSettings, PatchTargets,
};
pub use error::{ProbeError, Result};
pub use features::{
    extract, extract_set, extract_tensor, FeatureSet, ProbeSet, ProbeSetConfig, RowSample,
    SetFeatures, MAX_PROBE_IMAGES,
};
pub use knn::{knn, KnnResult};
pub use linear::{fit_softmax, FitConfig, FitReport, SoftmaxClassifier, Targets};
pub use locality::{
    collapse_indicators, correspondence, correspondence_score, default_far_radius, gram_drift,
    locality, CollapseIndicators, CorrespondenceConfig, CorrespondenceResult, LocalityResult,
    ViewGeometry,
};
pub use report::{
    probe_features, run_probes, LinearResult, ProbeConfig, ProbeMetrics, ProbeReport, SetReport,
    Timing,
};
pub use stage::{
    cosine_ramp, AfterHighRes, Condition, ContinueConfig, CropSetting, DenseMetric,
    GramAnchorConfig, GramRefresh, GramTeacherSource, HighResConfig, LrBase, LrWarmup, MetricPoint,
    Outlook, RefreshOutlook, RefreshPolicy, Rule, Stage, StageConfig, StageMachine, StageOverrides,
    StageState, Threshold, Transition, TransitionReason,
};
pub use viz::{
    curves_png, denormalize, label_agreement, patch_similarities, pca_rgb, pca_rgb_shared,
    render_curves, render_runs, resize_nearest, runs_png, side_by_side, similarity_map, viridis,
    write_png, PcaBasis, RunCurves, Series, REFRESH_COLOUR,
};
