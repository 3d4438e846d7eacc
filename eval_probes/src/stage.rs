//! The training-stage machine: Pretrain → GramAnchor → HighResAdapt → (Distill | Continue),
//! driven by probe metrics (method spec §6, §8 item 4).
//!
//! It is pure: [`StageMachine::observe`] takes an evaluation's [`ProbeMetrics`],
//! [`StageMachine::on_step`] checks step budgets, [`StageMachine::force`] records a manual
//! switch; each may return a [`Transition`] (serialisable, with the metrics that caused
//! it). [`StageMachine::overrides`] is a pure function of (state, config, step) giving the
//! recipe changes of the current stage at that step: Gram weight ramp, Gram-teacher
//! refreshes, LR factor and warm-up, teacher momentum, local-DINO weight, crop setting.
//! [`StageState`] is what goes into every checkpoint; the config comes from the run
//! config (so it can be tuned on resume).
//!
//! Conventions: an evaluation "at step s" scores the weights after `s` optimizer steps; a
//! transition at `s` makes the new stage apply from step `s` on (`overrides(s)` is the
//! new stage's first step). Evaluations at or before the last observed step are ignored,
//! so replaying them after a resume changes nothing.

use std::fmt;
use std::str::FromStr;

use ops::schedule::Schedule;
use serde::{Deserialize, Serialize};

use crate::report::ProbeMetrics;

/// A training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// DINO + iBOT + KoLeo, no Gram loss.
    Pretrain,
    /// Gram anchoring / refinement (§6.2).
    GramAnchor,
    /// Mixed high-resolution adaptation with a fixed Gram teacher (§6.3).
    HighResAdapt,
    /// Multi-student distillation (§6.4).
    Distill,
    /// Training goes on at a constant LR, indefinitely.
    Continue,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Pretrain,
        Stage::GramAnchor,
        Stage::HighResAdapt,
        Stage::Distill,
        Stage::Continue,
    ];

    /// The snake_case name (as in configs and the CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::GramAnchor => "gram_anchor",
            Stage::HighResAdapt => "high_res_adapt",
            Stage::Distill => "distill",
            Stage::Continue => "continue",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown stage {s:?} (expected one of {})",
                    Stage::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

/// Which probe metric stands for "dense quality".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenseMetric {
    /// Dense linear probe mIoU (mean over probe sets with label maps).
    #[default]
    Miou,
    /// Dense linear probe pixel accuracy.
    PixelAccuracy,
    /// Label-free dense correspondence accuracy.
    Correspondence,
    /// Label-free locality score.
    Locality,
}

impl DenseMetric {
    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            DenseMetric::Miou => "miou",
            DenseMetric::PixelAccuracy => "pixel_accuracy",
            DenseMetric::Correspondence => "correspondence",
            DenseMetric::Locality => "locality",
        }
    }

    /// The value of this metric in `m`, if measured and finite.
    pub fn of(self, m: &ProbeMetrics) -> Option<f64> {
        match self {
            DenseMetric::Miou => m.dense_miou,
            DenseMetric::PixelAccuracy => m.dense_pixel_accuracy,
            DenseMetric::Correspondence => m.correspondence,
            DenseMetric::Locality => m.locality,
        }
        .filter(|v| v.is_finite())
    }
}

/// A tolerated drop below a reference value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// In metric units (`{ absolute = 0.01 }`).
    Absolute(f64),
    /// As a fraction of the reference's magnitude (`{ relative = 0.03 }` = 3 %).
    Relative(f64),
}

impl Threshold {
    /// The tolerated drop below `reference`.
    pub fn margin(self, reference: f64) -> f64 {
        match self {
            Threshold::Absolute(t) => t,
            Threshold::Relative(r) => r * reference.abs(),
        }
    }

    fn value(self) -> f64 {
        match self {
            Threshold::Absolute(t) | Threshold::Relative(t) => t,
        }
    }
}

/// What the LR factor multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrBase {
    /// The recipe's LR schedule at the step.
    Schedule,
    /// The schedule's peak, held constant (the official later stages run constant LRs).
    Peak,
}

/// Which crop sizes the data pipeline uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropSetting {
    /// The recipe's global/local sizes.
    Base,
    /// The mixed larger global sizes of high-resolution adaptation.
    HighRes,
}

/// Where the run goes after high-resolution adaptation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterHighRes {
    /// Keep training at a constant LR.
    #[default]
    Continue,
    /// Hand over to multi-student distillation (students are configured).
    Distill,
}

/// When Gram anchoring copies the EMA teacher into the Gram teacher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshPolicy {
    /// The official schedule: every `refresh_every` steps of the stage, whatever the EMA
    /// teacher is worth at that moment.
    Schedule,
    /// Due `refresh_every` steps after the stage began or after the last refresh, and done
    /// at the first step from then on at which an evaluation made since that point scores
    /// the EMA teacher's dense metric at least as high as the Gram teacher's. After a
    /// switch triggered by a dense decline the EMA teacher is still the degraded one, and
    /// the schedule replaced the best-dense anchor with it (EXPERIMENTS.md, e2: the first
    /// refresh copied a 0.32 teacher over the 0.47 anchor, and the run levelled off at
    /// 0.42; with the anchor kept it recovered fully). Once the EMA teacher is at least as
    /// good, this is the schedule. Where nothing says what the Gram teacher scores (no
    /// dense evaluation before the stage), the schedule's timing applies.
    #[default]
    Probe,
}

impl RefreshPolicy {
    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            RefreshPolicy::Schedule => "schedule",
            RefreshPolicy::Probe => "probe",
        }
    }
}

/// Gram anchoring (§6.2); every value scaled-down-configurable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GramAnchorConfig {
    /// Gram loss weight after the ramp (official 2.0).
    pub gram_weight: f64,
    /// Steps of the cosine ramp 0 → `gram_weight` (official 1000).
    pub ramp_steps: u64,
    /// Refresh the Gram teacher from the EMA teacher every this many steps (official 10k).
    pub refresh_every: u64,
    /// At most this many refreshes (official 3).
    pub max_refreshes: u32,
    /// When a due refresh happens: on the schedule (official) or once the probes say the
    /// EMA teacher is at least as good as the Gram teacher (the default).
    pub refresh_policy: RefreshPolicy,
    /// Gram-teacher crop size as a multiple of the global crop (official 2).
    pub gram_teacher_scale: f64,
    /// What `lr_factor` multiplies.
    pub lr_base: LrBase,
    /// LR factor (official 3e-5 / 5e-5 = 0.6).
    pub lr_factor: f64,
    /// Constant teacher momentum (official 0.999).
    pub momentum: f64,
    /// Local-crop DINO loss weight at the stage start (official 1).
    pub local_dino_weight_start: f64,
    /// Local-crop DINO loss weight after its ramp (official 0.5).
    pub local_dino_weight_end: f64,
    /// Steps of the cosine ramp of the local-DINO weight.
    pub local_dino_ramp_steps: u64,
    /// The dense metric counts as recovered within this of the pretraining best.
    pub recovery_tolerance: Threshold,
    /// An evaluation improves on the stage's best only by more than this (metric units).
    pub plateau_delta: f64,
    /// Plateau = this many evaluations in a row without such an improvement.
    pub plateau_patience: u32,
    /// Leave the stage also without recovery once the dense metric has not improved by
    /// more than `plateau_delta` for this many evaluations: anchoring has stopped helping,
    /// and waiting for a bar it cannot reach would keep the run here for ever
    /// (EXPERIMENTS.md, e2: it levelled off at 0.42 under a bar of 0.46). `None`: wait for
    /// recovery (or `max_steps`).
    pub stall_patience: Option<u32>,
    /// No automatic exit before this many steps in the stage.
    pub min_steps: u64,
    /// Leave the stage after this many steps even without recovery (`None`: never).
    pub max_steps: Option<u64>,
}

impl Default for GramAnchorConfig {
    fn default() -> Self {
        Self {
            gram_weight: 2.0,
            ramp_steps: 1000,
            refresh_every: 1000,
            max_refreshes: 3,
            refresh_policy: RefreshPolicy::Probe,
            gram_teacher_scale: 2.0,
            lr_base: LrBase::Peak,
            lr_factor: 0.6,
            momentum: 0.999,
            local_dino_weight_start: 1.0,
            local_dino_weight_end: 0.5,
            local_dino_ramp_steps: 1000,
            recovery_tolerance: Threshold::Relative(0.02),
            plateau_delta: 0.005,
            plateau_patience: 3,
            stall_patience: Some(6),
            min_steps: 1000,
            max_steps: None,
        }
    }
}

/// High-resolution adaptation (§6.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HighResConfig {
    /// Length of the stage in steps (official 30k).
    pub steps: u64,
    /// Fixed Gram weight (official 1.5).
    pub gram_weight: f64,
    /// Gram-teacher crop size as a multiple of the global crop (official 1.5).
    pub gram_teacher_scale: f64,
    /// What `lr_factor` multiplies.
    pub lr_base: LrBase,
    /// LR factor after the warm-up (official 1.25e-5 / 5e-5 = 0.25).
    pub lr_factor: f64,
    /// Cosine LR warm-up from 0 over this many steps (official 10k).
    pub lr_warmup_steps: u64,
    /// Constant teacher momentum (official 0.999).
    pub momentum: f64,
    /// Local-crop DINO weight (official 0.5).
    pub local_dino_weight: f64,
}

impl Default for HighResConfig {
    fn default() -> Self {
        Self {
            steps: 3000,
            gram_weight: 1.5,
            gram_teacher_scale: 1.5,
            lr_base: LrBase::Peak,
            lr_factor: 0.25,
            lr_warmup_steps: 1000,
            momentum: 0.999,
            local_dino_weight: 0.5,
        }
    }
}

/// The open-ended stage after high-resolution adaptation when nothing is distilled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContinueConfig {
    /// What `lr_factor` multiplies.
    pub lr_base: LrBase,
    /// Constant LR factor.
    pub lr_factor: f64,
    /// Gram weight against the fixed Gram teacher (0 turns the Gram loss off).
    pub gram_weight: f64,
    /// Gram-teacher crop size as a multiple of the global crop.
    pub gram_teacher_scale: f64,
    /// Crop setting.
    pub crops: CropSetting,
    /// Constant teacher momentum.
    pub momentum: f64,
    /// Local-crop DINO weight.
    pub local_dino_weight: f64,
}

impl Default for ContinueConfig {
    fn default() -> Self {
        Self {
            lr_base: LrBase::Peak,
            lr_factor: 0.25,
            gram_weight: 1.5,
            gram_teacher_scale: 2.0,
            crops: CropSetting::Base,
            momentum: 0.999,
            local_dino_weight: 0.5,
        }
    }
}

/// The `[stages]` section of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageConfig {
    /// The metric watched for dense degradation and recovery.
    pub dense_metric: DenseMetric,
    /// Pretrain → GramAnchor when the metric is more than this below its best ...
    pub degradation_threshold: Threshold,
    /// ... for this many evaluations in a row.
    pub patience: u32,
    /// No automatic switch before this step.
    pub min_pretrain_steps: u64,
    /// Gram anchoring.
    pub gram_anchor: GramAnchorConfig,
    /// High-resolution adaptation.
    pub high_res: HighResConfig,
    /// What follows high-resolution adaptation.
    pub after_high_res: AfterHighRes,
    /// The open-ended stage.
    #[serde(rename = "continue")]
    pub continue_: ContinueConfig,
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            dense_metric: DenseMetric::Miou,
            degradation_threshold: Threshold::Relative(0.03),
            patience: 3,
            min_pretrain_steps: 0,
            gram_anchor: GramAnchorConfig::default(),
            high_res: HighResConfig::default(),
            after_high_res: AfterHighRes::Continue,
            continue_: ContinueConfig::default(),
        }
    }
}

impl StageConfig {
    /// Every problem with these values, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        let mut nonneg = |key: &str, v: f64| {
            if !(v >= 0.0 && v.is_finite()) {
                p.push(format!("stages.{key} = {v} must be a finite number >= 0"));
            }
        };
        nonneg("degradation_threshold", self.degradation_threshold.value());
        let g = &self.gram_anchor;
        nonneg("gram_anchor.gram_weight", g.gram_weight);
        nonneg("gram_anchor.gram_teacher_scale", g.gram_teacher_scale);
        nonneg("gram_anchor.lr_factor", g.lr_factor);
        nonneg(
            "gram_anchor.local_dino_weight_start",
            g.local_dino_weight_start,
        );
        nonneg("gram_anchor.local_dino_weight_end", g.local_dino_weight_end);
        nonneg(
            "gram_anchor.recovery_tolerance",
            g.recovery_tolerance.value(),
        );
        nonneg("gram_anchor.plateau_delta", g.plateau_delta);
        let h = &self.high_res;
        nonneg("high_res.gram_weight", h.gram_weight);
        nonneg("high_res.gram_teacher_scale", h.gram_teacher_scale);
        nonneg("high_res.lr_factor", h.lr_factor);
        nonneg("high_res.local_dino_weight", h.local_dino_weight);
        let c = &self.continue_;
        nonneg("continue.lr_factor", c.lr_factor);
        nonneg("continue.gram_weight", c.gram_weight);
        nonneg("continue.gram_teacher_scale", c.gram_teacher_scale);
        nonneg("continue.local_dino_weight", c.local_dino_weight);
        for (key, m) in [
            ("gram_anchor.momentum", g.momentum),
            ("high_res.momentum", h.momentum),
            ("continue.momentum", c.momentum),
        ] {
            if !(0.0..=1.0).contains(&m) {
                p.push(format!("stages.{key} = {m} must be in [0, 1]"));
            }
        }
        if self.patience == 0 {
            p.push("stages.patience must be at least 1".into());
        }
        if g.stall_patience == Some(0) {
            p.push("stages.gram_anchor.stall_patience must be at least 1 (or absent)".into());
        }
        if g.plateau_patience == 0 {
            p.push("stages.gram_anchor.plateau_patience must be at least 1".into());
        }
        if g.max_refreshes > 0 && g.refresh_every == 0 {
            p.push(
                "stages.gram_anchor.refresh_every must be positive when max_refreshes > 0".into(),
            );
        }
        if g.max_steps.is_some_and(|m| m < g.min_steps) {
            p.push(format!(
                "stages.gram_anchor.max_steps {:?} is below min_steps {}",
                g.max_steps, g.min_steps
            ));
        }
        if h.steps == 0 {
            p.push("stages.high_res.steps must be positive".into());
        }
        if h.lr_warmup_steps > h.steps {
            p.push(format!(
                "stages.high_res.lr_warmup_steps {} exceeds the stage length {}",
                h.lr_warmup_steps, h.steps
            ));
        }
        p
    }
}

/// A recorded value of the dense metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Evaluation step.
    pub step: u64,
    /// Value.
    pub value: f64,
}

/// A Gram-teacher refresh of Gram anchoring, as recorded when it happened.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GramRefresh {
    /// The step before which the EMA teacher was copied.
    pub step: u64,
    /// The latest dense evaluation of the EMA teacher at that moment (what the Gram
    /// teacher scores from then on, as far as the probes know).
    pub ema_dense: Option<MetricPoint>,
}

/// The next Gram-teacher refresh of Gram anchoring, and what it waits for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefreshOutlook {
    /// The policy.
    pub policy: RefreshPolicy,
    /// Refreshes of the stage so far (one at the step asked about included).
    pub done: u32,
    /// At most this many.
    pub max: u32,
    /// The step from which the next one is due.
    pub due_step: u64,
    /// What it waits for once due (policy `probe`, when the Gram teacher's score is
    /// known), and whether that holds now.
    pub gate: Option<Condition>,
    /// Whether the refresh happens before the step asked about.
    pub now: bool,
}

/// Where the Gram teacher of a stage comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GramTeacherSource {
    /// The EMA teacher of the checkpoint at the best pretraining dense score.
    BestDenseCheckpoint {
        /// Its step.
        step: u64,
        /// Its dense score.
        value: f64,
    },
    /// A copy of the current EMA teacher at this step.
    EmaTeacher {
        /// The step.
        step: u64,
    },
}

/// The rule behind an automatic transition, with the numbers that fired it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The dense metric stayed more than `margin` below its best for `consecutive` evaluations.
    DenseDegraded {
        /// The metric watched.
        metric: DenseMetric,
        /// Best value and its step.
        best: MetricPoint,
        /// The evaluation that completed the run of degraded evaluations.
        current: MetricPoint,
        /// Degraded evaluations in a row.
        consecutive: u32,
        /// The drop tolerated below `best`.
        margin: f64,
    },
    /// The dense metric came back to the pretraining best (within tolerance) and stopped improving.
    DenseRecovered {
        /// The metric watched.
        metric: DenseMetric,
        /// The pretraining best it was compared to (`None` when never measured).
        reference: Option<f64>,
        /// The evaluation that fired the rule.
        current: MetricPoint,
        /// The stage's best value.
        stage_best: f64,
        /// Evaluations without an improvement larger than `plateau_delta`.
        evals_without_improvement: u32,
    },
    /// The dense metric stopped improving under Gram anchoring without reaching the
    /// recovery bar (`stall_patience`).
    DenseStalled {
        /// The metric watched.
        metric: DenseMetric,
        /// The recovery bar it did not reach.
        bar: f64,
        /// The evaluation that fired the rule.
        current: MetricPoint,
        /// The stage's best value.
        stage_best: f64,
        /// Evaluations without an improvement larger than `plateau_delta`.
        evals_without_improvement: u32,
    },
    /// Gram anchoring reached its `max_steps`.
    GramStepLimit {
        /// Steps spent in the stage.
        steps: u64,
    },
    /// High-resolution adaptation ran its `steps`.
    HighResComplete {
        /// Steps spent in the stage.
        steps: u64,
    },
}

/// Why a transition happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionReason {
    /// Decided by the machine.
    Automatic {
        /// The rule that fired.
        rule: Rule,
        /// The evaluation that fired it (`None` for step budgets).
        metrics: Option<ProbeMetrics>,
    },
    /// Forced by a person (`dinod stage set`).
    Manual {
        /// Free text given with the command.
        note: String,
    },
}

/// One stage change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Stage left.
    pub from: Stage,
    /// Stage entered.
    pub to: Stage,
    /// First step of the new stage.
    pub step: u64,
    /// Why.
    pub reason: TransitionReason,
    /// When the new stage needs a (new) Gram teacher: where to take it from.
    pub gram_teacher: Option<GramTeacherSource>,
    /// The Gram-teacher refreshes of the stage left (its record goes with it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gram_refreshes_before: Vec<GramRefresh>,
}

impl Transition {
    /// Why it happened, in one line with the numbers that decided it (`dinod stage`).
    pub fn describe(&self) -> String {
        match &self.reason {
            TransitionReason::Manual { note } if note.is_empty() => "manual".into(),
            TransitionReason::Manual { note } => format!("manual: {note}"),
            TransitionReason::Automatic { rule, .. } => match rule {
                Rule::DenseDegraded {
                    metric,
                    best,
                    current,
                    consecutive,
                    margin,
                } => format!(
                    "{} {:.4} at step {}: {} in a row more than {margin:.4} below the best {:.4} (step {})",
                    metric.name(),
                    current.value,
                    current.step,
                    evaluations(*consecutive),
                    best.value,
                    best.step
                ),
                Rule::DenseStalled {
                    metric,
                    bar,
                    current,
                    stage_best,
                    evals_without_improvement,
                } => format!(
                    "{} {:.4} at step {}: no gain for {} (stage best {stage_best:.4}), below the recovery bar {bar:.4}: anchoring stopped helping",
                    metric.name(),
                    current.value,
                    current.step,
                    evaluations(*evals_without_improvement)
                ),
                Rule::DenseRecovered {
                    metric,
                    reference,
                    current,
                    stage_best,
                    evals_without_improvement,
                } => format!(
                    "{} {:.4} at step {}: recovered to the pretraining best {} within tolerance (stage best {stage_best:.4}), no gain for {}",
                    metric.name(),
                    current.value,
                    current.step,
                    reference.map_or("(none)".into(), |r| format!("{r:.4}")),
                    evaluations(*evals_without_improvement)
                ),
                Rule::GramStepLimit { steps } => {
                    format!("{steps} steps of Gram anchoring (its max_steps)")
                }
                Rule::HighResComplete { steps } => {
                    format!("{steps} steps of high-resolution adaptation")
                }
            },
        }
    }
}

/// The dense metric Gram anchoring must reach to count as recovered: the pretraining best
/// less the tolerance (`None` before any evaluation). The rule and the outlook share it.
fn recovery_bar(g: &GramAnchorConfig, best: Option<MetricPoint>) -> Option<f64> {
    best.map(|b| b.value - g.recovery_tolerance.margin(b.value))
}

/// "1 evaluation", "3 evaluations".
fn evaluations(n: u32) -> String {
    format!("{n} evaluation{}", if n == 1 { "" } else { "s" })
}

/// One condition of the next automatic transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// What must hold, with where the run stands, in words.
    pub what: String,
    /// Whether it holds now.
    pub met: bool,
}

/// The next automatic transition and what it waits for (`dinod stage`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outlook {
    /// The stage it leads to.
    pub next: Stage,
    /// Conditions that must all hold at an evaluation.
    pub all_of: Vec<Condition>,
    /// A step budget that moves the run on regardless, and the steps left of it.
    pub or_after: Option<(u64, u64)>,
    /// Another condition that moves the run on by itself (after the stage's minimum steps):
    /// Gram anchoring's stall rule.
    #[serde(default)]
    pub or_when: Option<Condition>,
}

/// Everything the machine remembers; saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageState {
    /// Current stage.
    pub stage: Stage,
    /// Step at which it began.
    pub stage_start: u64,
    /// Evaluations observed (all stages).
    pub evals: u64,
    /// Step of the last evaluation observed.
    pub last_eval_step: Option<u64>,
    /// Best dense value during pretraining (the Gram-teacher candidate).
    pub best_dense: Option<MetricPoint>,
    /// Consecutive degraded evaluations (pretraining).
    pub degraded_evals: u32,
    /// Best dense value of the current stage (plateau detection).
    pub stage_best: Option<MetricPoint>,
    /// Evaluations in the current stage since `stage_best` last improved by more than `plateau_delta`.
    pub evals_since_improvement: u32,
    /// Where the current Gram teacher came from.
    pub gram_teacher: Option<GramTeacherSource>,
    /// Every transition so far, oldest first.
    pub history: Vec<Transition>,
    /// The latest evaluation of the dense metric (any stage): what a probe-driven Gram
    /// refresh compares with the Gram teacher's score.
    #[serde(default)]
    pub last_dense: Option<MetricPoint>,
    /// The Gram-teacher refreshes of the current stage, oldest first.
    #[serde(default)]
    pub gram_refreshes: Vec<GramRefresh>,
}

impl Default for StageState {
    fn default() -> Self {
        Self {
            stage: Stage::Pretrain,
            stage_start: 0,
            evals: 0,
            last_eval_step: None,
            best_dense: None,
            degraded_evals: 0,
            stage_best: None,
            evals_since_improvement: 0,
            gram_teacher: None,
            history: vec![],
            last_dense: None,
            gram_refreshes: vec![],
        }
    }
}

/// The window of a stage's LR warm-up (a cosine-shaped ramp from 0, as the official
/// high-resolution schedule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LrWarmup {
    /// First step of the warm-up.
    pub start_step: u64,
    /// Its length.
    pub steps: u64,
}

/// The recipe changes the current stage makes at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageOverrides {
    /// The stage.
    pub stage: Stage,
    /// Steps since the stage began.
    pub stage_step: u64,
    /// What `lr_factor` multiplies.
    pub lr_base: LrBase,
    /// LR multiplier at this step (the warm-up included).
    pub lr_factor: f64,
    /// The stage's LR warm-up window, if any (cosine-shaped from 0 as the official
    /// high-res schedule).
    pub lr_warmup: Option<LrWarmup>,
    /// Constant teacher momentum, or `None` for the recipe's schedule.
    pub momentum: Option<f64>,
    /// Weight of the local-crop DINO loss.
    pub local_dino_weight: f64,
    /// Crop setting.
    pub crops: CropSetting,
    /// Gram loss weight (0 while the ramp starts or when the stage has no Gram loss).
    pub gram_weight: f64,
    /// Gram-teacher crop size as a multiple of the global crop; `None` when the stage runs
    /// no Gram teacher.
    pub gram_teacher_scale: Option<f64>,
    /// Copy the EMA teacher into the Gram teacher before this step.
    pub refresh_gram_teacher_now: bool,
    /// Refreshes of the stage up to and including this step.
    pub gram_refreshes: u32,
}

impl StageOverrides {
    /// The LR at `step` given the recipe's base schedule.
    pub fn lr(&self, base: &Schedule, step: u64) -> f64 {
        let b = match self.lr_base {
            LrBase::Schedule => base.at(step),
            LrBase::Peak => base.peak,
        };
        b * self.lr_factor
    }
}

/// Cosine ramp `from → to` over `steps` (the official `linear_warmup_cosine_decay` with
/// start = peak = `from`, end = `to`, no linear warm-up).
pub fn cosine_ramp(from: f64, to: f64, steps: u64, t: u64) -> f64 {
    Schedule {
        start: from,
        peak: from,
        end: to,
        warmup: 0,
        cosine: steps,
    }
    .at(t)
}

/// The stage machine: a config plus the state that is checkpointed.
#[derive(Clone, Debug, PartialEq)]
pub struct StageMachine {
    cfg: StageConfig,
    state: StageState,
}

impl StageMachine {
    /// A fresh run, in `Pretrain` from step 0.
    pub fn new(cfg: StageConfig) -> Self {
        Self {
            cfg,
            state: StageState::default(),
        }
    }

    /// A resumed run.
    pub fn resume(cfg: StageConfig, state: StageState) -> Self {
        Self { cfg, state }
    }

    /// The checkpointed state.
    pub fn state(&self) -> &StageState {
        &self.state
    }

    /// The config.
    pub fn config(&self) -> &StageConfig {
        &self.cfg
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.state.stage
    }

    /// Every transition so far.
    pub fn history(&self) -> &[Transition] {
        &self.state.history
    }

    /// Feeds one evaluation of the weights at `step`, applying any transition from that
    /// same step ([`Self::observe_at`] with `apply_step = step`).
    pub fn observe(&mut self, step: u64, m: &ProbeMetrics) -> Option<Transition> {
        self.observe_at(step, step, m)
    }

    /// Feeds one evaluation of the weights at `eval_step` whose result arrives when training
    /// is at `apply_step` (evaluations run on snapshots, off the training thread). A
    /// transition starts its stage at `apply_step` (at least `eval_step`); the rule and the
    /// best checkpoint refer to evaluation steps. Evaluations at or before the last observed
    /// one, or of weights from before the current stage began, are ignored; so is one
    /// without the watched metric (budgets are still checked at `apply_step`).
    pub fn observe_at(
        &mut self,
        eval_step: u64,
        apply_step: u64,
        m: &ProbeMetrics,
    ) -> Option<Transition> {
        let step = eval_step;
        let apply = apply_step.max(eval_step);
        if let Some(t) = self.on_step(apply) {
            self.state.last_eval_step = Some(step);
            return Some(t);
        }
        let s = &mut self.state;
        if s.last_eval_step.is_some_and(|last| step <= last) || step < s.stage_start {
            return None;
        }
        s.last_eval_step = Some(step);
        s.evals += 1;
        let metric = self.cfg.dense_metric;
        let v = metric.of(m)?;
        s.last_dense = Some(MetricPoint { step, value: v });
        // Plateau bookkeeping of the current stage.
        let plateau_delta = self.cfg.gram_anchor.plateau_delta;
        match s.stage_best {
            Some(b) if v <= b.value + plateau_delta => s.evals_since_improvement += 1,
            _ => {
                s.stage_best = Some(MetricPoint { step, value: v });
                s.evals_since_improvement = 0;
            }
        }
        match s.stage {
            Stage::Pretrain => {
                match s.best_dense {
                    Some(b) if v <= b.value => {
                        let margin = self.cfg.degradation_threshold.margin(b.value);
                        if b.value - v > margin {
                            s.degraded_evals += 1;
                        } else {
                            s.degraded_evals = 0;
                        }
                    }
                    _ => {
                        s.best_dense = Some(MetricPoint { step, value: v });
                        s.degraded_evals = 0;
                    }
                }
                let best = s.best_dense.expect("set above");
                if s.degraded_evals >= self.cfg.patience && step >= self.cfg.min_pretrain_steps {
                    let rule = Rule::DenseDegraded {
                        metric,
                        best,
                        current: MetricPoint { step, value: v },
                        consecutive: s.degraded_evals,
                        margin: self.cfg.degradation_threshold.margin(best.value),
                    };
                    let teacher = GramTeacherSource::BestDenseCheckpoint {
                        step: best.step,
                        value: best.value,
                    };
                    return Some(self.enter(
                        Stage::GramAnchor,
                        apply,
                        TransitionReason::Automatic {
                            rule,
                            metrics: Some(m.clone()),
                        },
                        Some(teacher),
                    ));
                }
                None
            }
            Stage::GramAnchor => {
                let g = &self.cfg.gram_anchor;
                let reference = s.best_dense.map(|b| b.value);
                let bar = recovery_bar(g, s.best_dense);
                let recovered = bar.is_none_or(|b| v >= b);
                let plateaued = s.evals_since_improvement >= g.plateau_patience;
                let stalled = g
                    .stall_patience
                    .is_some_and(|p| s.evals_since_improvement >= p);
                let stage_best = s.stage_best.map_or(v, |b| b.value);
                let current = MetricPoint { step, value: v };
                let rule = if step - s.stage_start < g.min_steps {
                    None
                } else if recovered && plateaued {
                    Some(Rule::DenseRecovered {
                        metric,
                        reference,
                        current,
                        stage_best,
                        evals_without_improvement: s.evals_since_improvement,
                    })
                } else if let Some(bar) = bar.filter(|_| stalled && !recovered) {
                    // (not recovered implies a bar: there is a pretraining best)
                    Some(Rule::DenseStalled {
                        metric,
                        bar,
                        current,
                        stage_best,
                        evals_without_improvement: s.evals_since_improvement,
                    })
                } else {
                    None
                };
                if let Some(rule) = rule {
                    let teacher = GramTeacherSource::EmaTeacher { step: apply };
                    return Some(self.enter(
                        Stage::HighResAdapt,
                        apply,
                        TransitionReason::Automatic {
                            rule,
                            metrics: Some(m.clone()),
                        },
                        Some(teacher),
                    ));
                }
                None
            }
            Stage::HighResAdapt | Stage::Distill | Stage::Continue => None,
        }
    }

    /// Checks the step budgets (call before every step): Gram anchoring's `max_steps` and
    /// the length of high-resolution adaptation.
    pub fn on_step(&mut self, step: u64) -> Option<Transition> {
        let s = &self.state;
        let in_stage = step.saturating_sub(s.stage_start);
        match s.stage {
            Stage::GramAnchor
                if self
                    .cfg
                    .gram_anchor
                    .max_steps
                    .is_some_and(|m| in_stage >= m) =>
            {
                let reason = TransitionReason::Automatic {
                    rule: Rule::GramStepLimit { steps: in_stage },
                    metrics: None,
                };
                Some(self.enter(
                    Stage::HighResAdapt,
                    step,
                    reason,
                    Some(GramTeacherSource::EmaTeacher { step }),
                ))
            }
            Stage::HighResAdapt if in_stage >= self.cfg.high_res.steps => {
                let to = match self.cfg.after_high_res {
                    AfterHighRes::Continue => Stage::Continue,
                    AfterHighRes::Distill => Stage::Distill,
                };
                let reason = TransitionReason::Automatic {
                    rule: Rule::HighResComplete { steps: in_stage },
                    metrics: None,
                };
                Some(self.enter(to, step, reason, None))
            }
            _ => None,
        }
    }

    /// The next automatic transition from the current stage at `step`, and how far the
    /// run is from each of its conditions; `None` in the open-ended stages.
    pub fn outlook(&self, step: u64) -> Option<Outlook> {
        let s = &self.state;
        let metric = self.cfg.dense_metric.name();
        let in_stage = step.saturating_sub(s.stage_start);
        let cond = |what: String, met: bool| Condition { what, met };
        let min_steps = |min: u64, at: u64, what: &str| {
            cond(format!("at least {min} {what}: {at} so far"), at >= min)
        };
        match s.stage {
            Stage::Pretrain => {
                let p = self.cfg.patience;
                let mut all_of = vec![match s.best_dense {
                    Some(b) => cond(
                        format!(
                            "{metric} more than {:.4} below its best {:.4} (step {}) for {} in a row: {} so far",
                            self.cfg.degradation_threshold.margin(b.value),
                            b.value,
                            b.step,
                            evaluations(p),
                            s.degraded_evals
                        ),
                        s.degraded_evals >= p,
                    ),
                    None => cond(format!("a first {metric} evaluation"), false),
                }];
                if self.cfg.min_pretrain_steps > 0 {
                    all_of.push(min_steps(self.cfg.min_pretrain_steps, step, "steps"));
                }
                Some(Outlook {
                    next: Stage::GramAnchor,
                    all_of,
                    or_after: None,
                    or_when: None,
                })
            }
            Stage::GramAnchor => {
                let g = &self.cfg.gram_anchor;
                let best = s.stage_best.map_or("none yet".into(), |b| {
                    format!("{:.4} at step {}", b.value, b.step)
                });
                let recovered = match (s.best_dense, recovery_bar(g, s.best_dense)) {
                    (Some(r), Some(bar)) => {
                        cond(
                            format!(
                                "{metric} at or above {bar:.4} (the pretraining best {:.4} less the tolerance): best in this stage {best}",
                                r.value
                            ),
                            s.stage_best.is_some_and(|b| b.value >= bar),
                        )
                    }
                    _ => cond(format!("(no pretraining best: any {metric})"), true),
                };
                Some(Outlook {
                    next: Stage::HighResAdapt,
                    all_of: vec![
                        recovered,
                        cond(
                            format!(
                                "no gain above {} for {}: {} so far",
                                g.plateau_delta,
                                evaluations(g.plateau_patience),
                                s.evals_since_improvement
                            ),
                            s.evals_since_improvement >= g.plateau_patience,
                        ),
                        min_steps(g.min_steps, in_stage, "steps in the stage"),
                    ],
                    or_after: g.max_steps.map(|m| (m, m.saturating_sub(in_stage))),
                    or_when: g.stall_patience.map(|p| {
                        cond(
                            format!(
                                "no gain above {} for {} without recovering (anchoring stopped helping): {} so far",
                                g.plateau_delta,
                                evaluations(p),
                                s.evals_since_improvement
                            ),
                            s.evals_since_improvement >= p,
                        )
                    }),
                })
            }
            Stage::HighResAdapt => Some(Outlook {
                next: match self.cfg.after_high_res {
                    AfterHighRes::Continue => Stage::Continue,
                    AfterHighRes::Distill => Stage::Distill,
                },
                all_of: vec![],
                or_after: Some((
                    self.cfg.high_res.steps,
                    self.cfg.high_res.steps.saturating_sub(in_stage),
                )),
                or_when: None,
            }),
            Stage::Distill | Stage::Continue => None,
        }
    }

    /// Switches to `to` at `step` because a person said so (forcing the current stage
    /// restarts it: its ramps, refresh schedule and plateau counters begin again).
    pub fn force(&mut self, to: Stage, step: u64, note: &str) -> Transition {
        let teacher = match to {
            Stage::GramAnchor => Some(match self.state.best_dense {
                Some(b) => GramTeacherSource::BestDenseCheckpoint {
                    step: b.step,
                    value: b.value,
                },
                None => GramTeacherSource::EmaTeacher { step },
            }),
            Stage::HighResAdapt => Some(GramTeacherSource::EmaTeacher { step }),
            _ => None,
        };
        self.enter(
            to,
            step,
            TransitionReason::Manual {
                note: note.to_string(),
            },
            teacher,
        )
    }

    fn enter(
        &mut self,
        to: Stage,
        step: u64,
        reason: TransitionReason,
        gram_teacher: Option<GramTeacherSource>,
    ) -> Transition {
        let s = &mut self.state;
        let t = Transition {
            from: s.stage,
            to,
            step,
            reason,
            gram_teacher: gram_teacher.clone(),
            gram_refreshes_before: std::mem::take(&mut s.gram_refreshes),
        };
        s.stage = to;
        s.stage_start = step;
        s.degraded_evals = 0;
        s.stage_best = None;
        s.evals_since_improvement = 0;
        if gram_teacher.is_some() {
            s.gram_teacher = gram_teacher;
        }
        s.history.push(t.clone());
        t
    }

    /// The steps at which Gram anchoring has refreshed the Gram teacher from the EMA
    /// teacher, as of `step` (none outside `gram_anchor`). On the schedule, a function of
    /// the stage's start, the config and the step; with the probe policy, the recorded ones.
    pub fn gram_refresh_steps(&self, step: u64) -> Vec<u64> {
        if self.state.stage != Stage::GramAnchor {
            return vec![];
        }
        let g = &self.cfg.gram_anchor;
        match g.refresh_policy {
            _ if g.refresh_every == 0 || g.gram_weight == 0.0 => vec![],
            RefreshPolicy::Schedule => {
                let r = step.saturating_sub(self.state.stage_start);
                (1..=(r / g.refresh_every).min(u64::from(g.max_refreshes)))
                    .map(|k| self.state.stage_start + k * g.refresh_every)
                    .collect()
            }
            RefreshPolicy::Probe => self
                .state
                .gram_refreshes
                .iter()
                .map(|r| r.step)
                .filter(|&s| s <= step)
                .collect(),
        }
    }

    /// What the Gram teacher scores on the dense metric, as far as the probes know: the
    /// EMA teacher's latest evaluation when it was last copied, or the best-dense
    /// checkpoint's score the stage began with.
    pub fn gram_teacher_dense(&self) -> Option<MetricPoint> {
        match self.state.gram_refreshes.last() {
            Some(r) => r.ema_dense,
            None => match self.state.gram_teacher {
                Some(GramTeacherSource::BestDenseCheckpoint { step, value }) => {
                    Some(MetricPoint { step, value })
                }
                _ => None,
            },
        }
    }

    /// The next Gram-teacher refresh as of `step` and what it waits for; `None` outside
    /// Gram anchoring, without a Gram loss, or once `max_refreshes` are done.
    pub fn next_refresh(&self, step: u64) -> Option<RefreshOutlook> {
        let g = &self.cfg.gram_anchor;
        if self.state.stage != Stage::GramAnchor
            || g.refresh_every == 0
            || g.max_refreshes == 0
            // without a Gram loss there is nothing to refresh a teacher for
            || g.gram_weight == 0.0
        {
            return None;
        }
        let start = self.state.stage_start;
        let r = step.saturating_sub(start);
        let max = g.max_refreshes;
        match g.refresh_policy {
            RefreshPolicy::Schedule => {
                let k = r / g.refresh_every;
                let now = r > 0 && r % g.refresh_every == 0 && k <= u64::from(max);
                let done = k.min(u64::from(max)) as u32;
                (now || done < max).then(|| RefreshOutlook {
                    policy: g.refresh_policy,
                    done,
                    max,
                    due_step: if now {
                        step
                    } else {
                        start + (k + 1) * g.refresh_every
                    },
                    gate: None,
                    now,
                })
            }
            RefreshPolicy::Probe => {
                let past: Vec<&GramRefresh> = self
                    .state
                    .gram_refreshes
                    .iter()
                    .filter(|x| x.step <= step)
                    .collect();
                let done = past.len() as u32;
                if done >= max {
                    return None;
                }
                let since = past.last().map_or(start, |x| x.step);
                let due_step = since + g.refresh_every;
                let metric = self.cfg.dense_metric.name();
                let gate = self.gram_teacher_dense().map(|gt| {
                    let fresh = self.state.last_dense.filter(|e| e.step > since);
                    let latest = match fresh {
                        Some(e) => format!("latest {:.4} at step {}", e.value, e.step),
                        None => "none yet".into(),
                    };
                    Condition {
                        what: format!(
                            "an evaluation after step {since} with the EMA teacher's {metric} at or above the Gram teacher's {:.4}: {latest}",
                            gt.value
                        ),
                        met: fresh.is_some_and(|e| e.value >= gt.value),
                    }
                });
                let now = step >= due_step && gate.as_ref().is_none_or(|c| c.met);
                Some(RefreshOutlook {
                    policy: g.refresh_policy,
                    done: done + u32::from(now),
                    max,
                    due_step,
                    gate,
                    now,
                })
            }
        }
    }

    /// Records that the Gram teacher was refreshed from the EMA teacher before `step`
    /// (call once the copy is made; a second call for the same step changes nothing).
    /// The probe policy counts its refreshes from these records; on the schedule they
    /// only keep the EMA teacher's score at the time.
    pub fn record_refresh(&mut self, step: u64) {
        let s = &mut self.state;
        if s.stage != Stage::GramAnchor || s.gram_refreshes.last().is_some_and(|r| r.step >= step) {
            return;
        }
        s.gram_refreshes.push(GramRefresh {
            step,
            ema_dense: s.last_dense,
        });
    }

    /// The recipe changes at `step` (a pure function of state, config and step).
    pub fn overrides(&self, step: u64) -> StageOverrides {
        let r = step.saturating_sub(self.state.stage_start);
        let base = StageOverrides {
            stage: self.state.stage,
            stage_step: r,
            lr_base: LrBase::Schedule,
            lr_factor: 1.0,
            lr_warmup: None,
            momentum: None,
            local_dino_weight: 1.0,
            crops: CropSetting::Base,
            gram_weight: 0.0,
            gram_teacher_scale: None,
            refresh_gram_teacher_now: false,
            gram_refreshes: 0,
        };
        match self.state.stage {
            Stage::Pretrain | Stage::Distill => base,
            Stage::GramAnchor => {
                let g = &self.cfg.gram_anchor;
                let (refresh, done) = match self.next_refresh(step) {
                    Some(o) => (o.now, o.done),
                    // all done (or none configured)
                    None => (false, self.gram_refresh_steps(step).len() as u32),
                };
                StageOverrides {
                    lr_base: g.lr_base,
                    lr_factor: g.lr_factor,
                    momentum: Some(g.momentum),
                    local_dino_weight: cosine_ramp(
                        g.local_dino_weight_start,
                        g.local_dino_weight_end,
                        g.local_dino_ramp_steps,
                        r,
                    ),
                    gram_weight: cosine_ramp(0.0, g.gram_weight, g.ramp_steps, r),
                    gram_teacher_scale: Some(g.gram_teacher_scale),
                    refresh_gram_teacher_now: refresh,
                    gram_refreshes: done,
                    ..base
                }
            }
            Stage::HighResAdapt => {
                let h = &self.cfg.high_res;
                StageOverrides {
                    lr_base: h.lr_base,
                    lr_factor: h.lr_factor * cosine_ramp(0.0, 1.0, h.lr_warmup_steps, r),
                    lr_warmup: (h.lr_warmup_steps > 0).then_some(LrWarmup {
                        start_step: self.state.stage_start,
                        steps: h.lr_warmup_steps,
                    }),
                    momentum: Some(h.momentum),
                    local_dino_weight: h.local_dino_weight,
                    crops: CropSetting::HighRes,
                    gram_weight: h.gram_weight,
                    gram_teacher_scale: Some(h.gram_teacher_scale),
                    ..base
                }
            }
            Stage::Continue => {
                let c = &self.cfg.continue_;
                StageOverrides {
                    lr_base: c.lr_base,
                    lr_factor: c.lr_factor,
                    momentum: Some(c.momentum),
                    local_dino_weight: c.local_dino_weight,
                    crops: c.crops,
                    gram_weight: c.gram_weight,
                    gram_teacher_scale: (c.gram_weight > 0.0).then_some(c.gram_teacher_scale),
                    ..base
                }
            }
        }
    }
}
