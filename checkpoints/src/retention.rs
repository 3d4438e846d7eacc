//! Which checkpoints to keep: a pure function of the existing checkpoints and the policy, so it
//! is unit-tested without touching a disk. The store applies the plan only after the newest
//! commit is durable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Fewest checkpoints ever kept: the newest may be the one being written or the one that turns
/// out corrupt (torchtitan rejects `keep_latest_k = 1` for the same reason).
pub const MIN_KEEP_LAST: usize = 2;

/// Retention policy; the `[checkpoint.retention]` section of the run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep the newest `keep_last` checkpoints (and, in addition, the newest `keep_last` that are
    /// not known to be corrupt). At least [`MIN_KEEP_LAST`].
    pub keep_last: usize,
    /// Also keep one checkpoint per multiple of this: the first valid one at or after it
    /// (a save that came a few steps late, the previous one still being written, stands
    /// for its multiple; before, it was deleted and the multiple had none).
    #[serde(default)]
    pub keep_every: Option<u64>,
    /// Also keep the best checkpoint by a score recorded with `Store::set_score`.
    #[serde(default)]
    pub keep_best: Option<KeepBest>,
    /// Disk budget of the kept checkpoints in bytes: while they hold more, the oldest one
    /// kept only by `keep_every` is deleted. The newest `keep_last`, the latest and the
    /// best are never deleted for it (they may exceed the budget on their own).
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// "Keep the best checkpoint by this metric".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepBest {
    /// Score name, as passed to `Store::set_score` (e.g. `knn_top1`).
    pub metric: String,
    /// Whether a higher score is better.
    pub higher_is_better: bool,
}

impl Retention {
    /// Keep the newest `n` only.
    pub fn keep_last(n: usize) -> Self {
        Retention {
            keep_last: n,
            keep_every: None,
            keep_best: None,
            max_bytes: None,
        }
    }

    /// Also keep every `n`th step.
    pub fn with_keep_every(mut self, n: u64) -> Self {
        self.keep_every = Some(n);
        self
    }

    /// Also keep the best by `metric`.
    pub fn with_keep_best(mut self, metric: impl Into<String>, higher_is_better: bool) -> Self {
        self.keep_best = Some(KeepBest {
            metric: metric.into(),
            higher_is_better,
        });
        self
    }

    /// Also bound the kept checkpoints' bytes (see [`Retention::max_bytes`]).
    pub fn with_max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = Some(n);
        self
    }

    /// Rejects policies that could delete a checkpoint still needed.
    pub fn validate(&self) -> Result<()> {
        let mut errors = Vec::new();
        if self.keep_last < MIN_KEEP_LAST {
            errors.push(format!(
                "keep_last = {} but at least {MIN_KEEP_LAST} are needed (the newest may be corrupt or still being written)",
                self.keep_last
            ));
        }
        if self.keep_every == Some(0) {
            errors.push("keep_every = 0; use a positive step count or leave it out".to_owned());
        }
        if self.max_bytes == Some(0) {
            errors.push("max_bytes = 0; use a positive budget or leave it out".to_owned());
        }
        if let Some(best) = &self.keep_best {
            if best.metric.is_empty() {
                errors.push("keep_best.metric is empty".to_owned());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidRetention(errors.join("; ")))
        }
    }
}

/// What retention needs to know about one committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// Its step.
    pub step: u64,
    /// Its score for the policy's `keep_best` metric, if recorded.
    pub score: Option<f64>,
    /// Verification found it corrupt.
    pub bad: bool,
    /// Bytes of its files (0 where unknown).
    pub bytes: u64,
}

/// Why a checkpoint is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum KeepReason {
    /// The newest checkpoint (where `latest` points).
    Latest,
    /// Among the newest `keep_last`.
    Recent,
    /// Among the newest `keep_last` not known to be corrupt.
    RecentValid,
    /// The first valid checkpoint at or after a multiple of `keep_every` (before the
    /// next multiple).
    Every {
        /// The `keep_every` value.
        n: u64,
    },
    /// Best score for the `keep_best` metric.
    Best {
        /// Metric name.
        metric: String,
        /// Its score.
        value: f64,
    },
}

/// The keep reasons of every checkpoint (an empty list means "delete"). Never deletes the newest
/// two, whatever the policy says.
pub fn keep_reasons(
    existing: &[CheckpointInfo],
    policy: &Retention,
) -> BTreeMap<u64, Vec<KeepReason>> {
    let mut by_step: BTreeMap<u64, &CheckpointInfo> = BTreeMap::new();
    for info in existing {
        // On duplicates, the one marked bad wins: be pessimistic about validity.
        let slot = by_step.entry(info.step).or_insert(info);
        if info.bad {
            *slot = info;
        }
    }
    let mut reasons: BTreeMap<u64, Vec<KeepReason>> =
        by_step.keys().map(|&s| (s, Vec::new())).collect();
    let keep_last = policy.keep_last.max(MIN_KEEP_LAST);

    let newest_first: Vec<&CheckpointInfo> = by_step.values().rev().copied().collect();
    if let Some(newest) = newest_first.first() {
        push(&mut reasons, newest.step, KeepReason::Latest);
    }
    for info in newest_first.iter().take(keep_last) {
        push(&mut reasons, info.step, KeepReason::Recent);
    }
    for info in newest_first.iter().filter(|i| !i.bad).take(keep_last) {
        if !reasons[&info.step].contains(&KeepReason::Recent) {
            push(&mut reasons, info.step, KeepReason::RecentValid);
        }
    }
    if let Some(n) = policy.keep_every.filter(|&n| n > 0) {
        // oldest first: the first of each multiple's window [k n, (k + 1) n), and step 0
        // itself only (the steps before the first multiple stand for none)
        let mut windows = std::collections::BTreeSet::new();
        for info in by_step.values().filter(|i| !i.bad) {
            let w = info.step / n;
            if (w > 0 || info.step == 0) && windows.insert(w) {
                push(&mut reasons, info.step, KeepReason::Every { n });
            }
        }
    }
    if let Some(best) = &policy.keep_best {
        let better = |a: f64, b: f64| if best.higher_is_better { a > b } else { a < b };
        // Newest first, strict comparison: ties go to the newest.
        let winner = newest_first
            .iter()
            .filter(|i| !i.bad)
            .filter_map(|i| i.score.filter(|s| s.is_finite()).map(|s| (i.step, s)))
            .fold(None, |acc: Option<(u64, f64)>, (step, s)| match acc {
                Some((_, b)) if !better(s, b) => acc,
                _ => Some((step, s)),
            });
        if let Some((step, value)) = winner {
            push(
                &mut reasons,
                step,
                KeepReason::Best {
                    metric: best.metric.clone(),
                    value,
                },
            );
        }
    }
    if let Some(max) = policy.max_bytes {
        // over the budget: the oldest checkpoints kept only for `keep_every` give way
        let mut total: u64 = reasons
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(s, _)| by_step[s].bytes)
            .sum();
        for (step, r) in reasons.iter_mut() {
            if total <= max {
                break;
            }
            if !r.is_empty() && r.iter().all(|k| matches!(k, KeepReason::Every { .. })) {
                total -= by_step[step].bytes;
                r.clear();
            }
        }
    }
    reasons
}

fn push(reasons: &mut BTreeMap<u64, Vec<KeepReason>>, step: u64, reason: KeepReason) {
    if let Some(list) = reasons.get_mut(&step) {
        list.push(reason);
    }
}

/// Steps to delete, ascending: those without a keep reason.
pub fn plan_retention(existing: &[CheckpointInfo], policy: &Retention) -> Vec<u64> {
    keep_reasons(existing, policy)
        .into_iter()
        .filter(|(_, r)| r.is_empty())
        .map(|(s, _)| s)
        .collect()
}
