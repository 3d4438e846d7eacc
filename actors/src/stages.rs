//! Glue between the stage machine (`eval_probes`) and the run: the schedule values, crop
//! sizes and Gram-teacher size each stage implies.

use eval_probes::{CropSetting, StageMachine, StageOverrides, StageState};
use model::StepHparams;

use crate::config::Plan;

/// The stage machine of a run, resumed from its serialised state (or fresh).
pub fn machine(plan: &Plan, state: &serde_json::Value) -> StageMachine {
    let cfg = plan.config.stages.machine.clone();
    match serde_json::from_value::<StageState>(state.clone()) {
        Ok(st) if !state.is_null() => StageMachine::resume(cfg, st),
        _ => StageMachine::new(cfg),
    }
}

/// What `dinod stage` shows: the stage state, what the next automatic transition waits
/// for (it needs the recipe's thresholds), the Gram-teacher refreshes so far and what the
/// next one waits for. The live
/// daemon builds it from its plan; the offline command from the recipe stored with the
/// latest checkpoint, so both say the same.
pub fn stage_doc(plan: &Plan, state: &serde_json::Value, step: u64) -> serde_json::Value {
    let automatic = plan.config.stages.automatic;
    let m = machine(plan, state);
    let outlook = automatic.then(|| m.outlook(step)).flatten();
    serde_json::json!({
        "stage": state,
        "step": step,
        "automatic": automatic,
        "outlook": outlook,
        "gram_refreshes": {
            "steps": m.gram_refresh_steps(step),
            "max": m.config().gram_anchor.max_refreshes,
            "policy": m.config().gram_anchor.refresh_policy,
            "next": m.next_refresh(step),
        },
    })
}

/// The serialised state of a machine (what goes into checkpoints).
pub fn state_json(m: &StageMachine) -> serde_json::Value {
    serde_json::to_value(m.state()).unwrap_or(serde_json::Value::Null)
}

fn round_to(px: f64, patch: usize) -> u32 {
    let p = patch as f64;
    ((px / p).round().max(1.0) * p) as u32
}

/// The crop configuration of the current stage.
pub fn crops(plan: &Plan, ov: &StageOverrides) -> data::CropConfig {
    let patch = plan.ssl.backbone.patch_size;
    let mut c = plan.config.data.crops.clone();
    if ov.crops == CropSetting::HighRes {
        let hr = plan
            .config
            .stages
            .high_res_crops
            .clone()
            .unwrap_or_else(|| {
                let g = c.global_size as f64;
                let t = |k: f64| data::CropSizes {
                    global: round_to(g * k, patch),
                    local: c.local_size,
                    gram: None,
                };
                data::HighResConfig {
                    sizes: vec![t(1.5), t(2.0)],
                    probs: vec![0.5, 0.5],
                }
            });
        c.high_res = Some(hr);
    }
    match ov.gram_teacher_scale {
        Some(k) => {
            c.gram_teacher_no_distortions = true;
            c.gram_size = Some(round_to(c.global_size as f64 * k, patch));
            if let Some(hr) = &mut c.high_res {
                for t in &mut hr.sizes {
                    t.gram = Some(round_to(t.global as f64 * k, patch));
                }
            }
        }
        None => {
            c.gram_size = None;
            if let Some(hr) = &mut c.high_res {
                for t in &mut hr.sizes {
                    t.gram = None;
                }
            }
        }
    }
    c
}

/// The schedule values of `step` in the current stage.
pub fn hparams(plan: &Plan, ov: &StageOverrides, step: u64, has_gram_teacher: bool) -> StepHparams {
    let base = plan.hparams(step);
    let lr = ov.lr(&plan.lr, step);
    StepHparams {
        lr,
        last_layer_lr: if step < plan.config.train.freeze_last_layer_steps {
            0.0
        } else {
            lr
        },
        weight_decay: base.weight_decay,
        momentum: ov.momentum.unwrap_or(base.momentum),
        teacher_temp: base.teacher_temp,
        gram_weight: if has_gram_teacher {
            ov.gram_weight
        } else {
            0.0
        },
        local_dino_weight: ov.local_dino_weight,
    }
}
