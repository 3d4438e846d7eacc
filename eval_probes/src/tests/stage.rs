//! The stage machine driven by metric sequences: a sustained degradation switches to
//! Gram anchoring (and names the best checkpoint), noise and isolated dips do not,
//! recovery plus plateau moves on to high-resolution adaptation, budgets end stages,
//! ramps and refreshes follow the official schedules (or wait for the probes to say the EMA
//! teacher is at least as good as the Gram teacher), and everything round-trips serde.

use crate::{
    cosine_ramp, AfterHighRes, CropSetting, DenseMetric, GramRefresh, GramTeacherSource, LrBase,
    MetricPoint, ProbeMetrics, RefreshPolicy, Rule, Stage, StageConfig, StageMachine, StageState,
    Threshold, TransitionReason,
};

fn miou(v: f64) -> ProbeMetrics {
    ProbeMetrics {
        dense_miou: Some(v),
        knn_top1: Some(0.5),
        ..ProbeMetrics::default()
    }
}

/// Feeds `values` at steps `start, start + every, ...`; returns the transitions with their index.
fn feed(
    m: &mut StageMachine,
    start: u64,
    every: u64,
    values: &[f64],
) -> Vec<(usize, crate::Transition)> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, &v)| {
            m.observe(start + i as u64 * every, &miou(v))
                .map(|t| (i, t))
        })
        .collect()
}

fn cfg() -> StageConfig {
    let mut c = StageConfig {
        degradation_threshold: Threshold::Absolute(0.02),
        patience: 3,
        ..StageConfig::default()
    };
    c.gram_anchor.min_steps = 200;
    c.gram_anchor.plateau_delta = 0.005;
    c.gram_anchor.plateau_patience = 3;
    c.gram_anchor.recovery_tolerance = Threshold::Absolute(0.01);
    c
}

#[test]
fn sustained_degradation_switches_to_gram_anchoring_from_the_best_checkpoint() {
    let mut m = StageMachine::new(cfg());
    // Peak 0.40 at step 300, then three evaluations more than 0.02 below it.
    let t = feed(
        &mut m,
        100,
        100,
        &[0.30, 0.35, 0.40, 0.39, 0.37, 0.36, 0.35],
    );
    assert_eq!(t.len(), 1);
    let (i, tr) = &t[0];
    assert_eq!(
        (*i, tr.from, tr.to, tr.step),
        (6, Stage::Pretrain, Stage::GramAnchor, 700)
    );
    assert_eq!(
        tr.gram_teacher,
        Some(GramTeacherSource::BestDenseCheckpoint {
            step: 300,
            value: 0.40
        })
    );
    match &tr.reason {
        TransitionReason::Automatic {
            rule:
                Rule::DenseDegraded {
                    best,
                    current,
                    consecutive,
                    margin,
                    metric,
                },
            metrics,
        } => {
            assert_eq!(
                (
                    best.step,
                    best.value,
                    *current,
                    *consecutive,
                    *margin,
                    *metric
                ),
                (
                    300,
                    0.40,
                    MetricPoint {
                        step: 700,
                        value: 0.35
                    },
                    3,
                    0.02,
                    DenseMetric::Miou
                )
            );
            assert_eq!(metrics.as_ref().unwrap().dense_miou, Some(0.35));
        }
        other => panic!("unexpected reason {other:?}"),
    }
    assert_eq!(m.stage(), Stage::GramAnchor);
    assert_eq!(m.state().stage_start, 700);
    assert_eq!(m.history().len(), 1);
}

#[test]
fn noise_and_isolated_dips_do_not_trigger() {
    let mut m = StageMachine::new(cfg());
    // Jitter within the threshold around a plateau, and dips that recover before `patience`.
    let noise = [
        0.40, 0.395, 0.405, 0.39, 0.40, 0.392, 0.398, 0.37, 0.36, 0.40, 0.37, 0.37, 0.39, 0.36,
        0.40,
    ];
    assert!(feed(&mut m, 100, 100, &noise).is_empty());
    assert_eq!(m.stage(), Stage::Pretrain);
    assert_eq!(m.state().best_dense.unwrap().value, 0.405);
    // A relative threshold scales with the best: 5 % of 0.405 is 0.02025, so 0.386 is not degraded.
    let mut rel = StageMachine::new(StageConfig {
        degradation_threshold: Threshold::Relative(0.05),
        ..cfg()
    });
    assert!(feed(&mut rel, 100, 100, &[0.405, 0.386, 0.386, 0.386, 0.386]).is_empty());
    assert_eq!(feed(&mut rel, 600, 100, &[0.38, 0.38, 0.38]).len(), 1);
    // `min_pretrain_steps` holds the switch back.
    let mut late = StageMachine::new(StageConfig {
        min_pretrain_steps: 10_000,
        ..cfg()
    });
    assert!(feed(&mut late, 100, 100, &[0.4, 0.3, 0.3, 0.3, 0.3, 0.3]).is_empty());
    assert_eq!(feed(&mut late, 10_000, 100, &[0.3]).len(), 1);
}

#[test]
fn missing_stale_and_duplicate_evaluations_change_nothing() {
    let mut m = StageMachine::new(cfg());
    feed(&mut m, 100, 100, &[0.40, 0.30, 0.30]);
    let before = m.state().clone();
    // No dense metric in this evaluation (e.g. no labelled set): ignored for the rule.
    assert!(m
        .observe(
            400,
            &ProbeMetrics {
                knn_top1: Some(0.9),
                ..ProbeMetrics::default()
            }
        )
        .is_none());
    assert_eq!(m.state().degraded_evals, before.degraded_evals);
    // A replay of step 300 (after a resume) and a NaN are ignored.
    assert!(m.observe(300, &miou(0.1)).is_none());
    assert!(m.observe(500, &miou(f64::NAN)).is_none());
    assert_eq!(m.state().degraded_evals, 2);
    assert!(m.observe(600, &miou(0.3)).is_some());
}

fn in_gram_anchor() -> StageMachine {
    let mut m = StageMachine::new(cfg());
    assert_eq!(feed(&mut m, 100, 100, &[0.40, 0.30, 0.30, 0.30]).len(), 1);
    assert_eq!(m.state().stage_start, 400);
    m
}

#[test]
fn recovery_and_plateau_move_on_to_high_resolution() {
    let mut m = in_gram_anchor();
    // Climbing back: no exit while improving, even once recovered.
    assert!(feed(&mut m, 500, 100, &[0.32, 0.36, 0.392, 0.40]).is_empty());
    // Plateau: three evaluations without an improvement above 0.005.
    let t = feed(&mut m, 900, 100, &[0.402, 0.401, 0.403]);
    assert_eq!(t.len(), 1);
    let tr = &t[0].1;
    assert_eq!(
        (tr.from, tr.to, tr.step),
        (Stage::GramAnchor, Stage::HighResAdapt, 1100)
    );
    assert_eq!(
        tr.gram_teacher,
        Some(GramTeacherSource::EmaTeacher { step: 1100 })
    );
    match &tr.reason {
        TransitionReason::Automatic {
            rule:
                Rule::DenseRecovered {
                    reference,
                    current,
                    stage_best,
                    evals_without_improvement,
                    ..
                },
            ..
        } => {
            assert_eq!(
                (
                    *reference,
                    *current,
                    *stage_best,
                    *evals_without_improvement
                ),
                (
                    Some(0.40),
                    MetricPoint {
                        step: 1100,
                        value: 0.403
                    },
                    0.40,
                    3
                )
            );
        }
        other => panic!("unexpected reason {other:?}"),
    }
}

#[test]
fn a_stall_below_the_recovery_bar_moves_on_after_stall_patience() {
    let mut m = in_gram_anchor();
    // climbing, but not to the bar (the best 0.40 less the tolerance): no exit while it improves
    assert!(feed(&mut m, 500, 100, &[0.30, 0.32, 0.34]).is_empty());
    // then flat: five evaluations without a gain above 0.005 are not yet a stall
    assert!(feed(&mut m, 800, 100, &[0.343, 0.341, 0.344, 0.34, 0.342]).is_empty());
    let o = m.outlook(1200).unwrap();
    assert!(o.or_when.as_ref().is_some_and(|c| !c.met), "{o:?}");
    let t = feed(&mut m, 1300, 100, &[0.339]);
    assert_eq!(t.len(), 1, "the sixth evaluation without a gain is a stall");
    let tr = &t[0].1;
    assert_eq!((tr.to, tr.step), (Stage::HighResAdapt, 1300));
    match &tr.reason {
        TransitionReason::Automatic {
            rule:
                Rule::DenseStalled {
                    bar,
                    stage_best,
                    evals_without_improvement,
                    ..
                },
            ..
        } => {
            assert!((bar - 0.39).abs() < 1e-12, "{bar}");
            assert_eq!((*stage_best, *evals_without_improvement), (0.34, 6));
        }
        other => panic!("unexpected reason {other:?}"),
    }
    assert!(
        tr.describe().contains("below the recovery bar 0.3900"),
        "{}",
        tr.describe()
    );
}

#[test]
fn a_plateau_without_recovery_stays_until_the_step_limit() {
    // without the stall rule, only the step budget ends an unrecovered stage
    let mut c = cfg();
    c.gram_anchor.stall_patience = None;
    let mut m = StageMachine::resume(c, in_gram_anchor().state().clone());
    assert!(feed(
        &mut m,
        500,
        100,
        &[0.33, 0.33, 0.332, 0.331, 0.33, 0.33, 0.33, 0.33]
    )
    .is_empty());
    assert_eq!(m.stage(), Stage::GramAnchor);
    let mut c = cfg();
    c.gram_anchor.stall_patience = None;
    c.gram_anchor.max_steps = Some(1000);
    let mut m = StageMachine::resume(c, m.state().clone());
    assert!(m.on_step(1399).is_none());
    let t = m.on_step(1400).unwrap();
    assert_eq!((t.to, t.step), (Stage::HighResAdapt, 1400));
    assert!(matches!(
        t.reason,
        TransitionReason::Automatic {
            rule: Rule::GramStepLimit { steps: 1000 },
            metrics: None
        }
    ));
}

#[test]
fn recovery_is_not_accepted_before_min_steps() {
    let mut c = cfg();
    c.gram_anchor.min_steps = 2000;
    let mut m = StageMachine::new(c);
    feed(&mut m, 100, 100, &[0.40, 0.30, 0.30, 0.30]);
    assert!(feed(&mut m, 500, 100, &[0.40, 0.40, 0.40, 0.40, 0.40]).is_empty());
    assert_eq!(feed(&mut m, 2400, 100, &[0.40]).len(), 1);
}

#[test]
fn gram_weight_and_local_dino_weight_follow_cosine_ramps() {
    let mut c = cfg();
    c.gram_anchor.ramp_steps = 1000;
    c.gram_anchor.local_dino_ramp_steps = 1000;
    let mut m = StageMachine::new(c);
    m.force(Stage::GramAnchor, 5000, "test");
    let at = |s: u64| m.overrides(s);
    assert_eq!(at(5000).gram_weight, 0.0);
    assert!(
        (at(5500).gram_weight - 1.0).abs() < 1e-12,
        "half way: {}",
        at(5500).gram_weight
    );
    assert!((at(5250).gram_weight - (1.0 - (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12);
    assert_eq!(at(6000).gram_weight, 2.0);
    assert_eq!(at(9000).gram_weight, 2.0);
    assert_eq!(at(5000).local_dino_weight, 1.0);
    assert!((at(5500).local_dino_weight - 0.75).abs() < 1e-12);
    assert_eq!(at(7000).local_dino_weight, 0.5);
    let o = at(5100);
    assert_eq!(
        (
            o.lr_base,
            o.lr_factor,
            o.momentum,
            o.crops,
            o.gram_teacher_scale
        ),
        (LrBase::Peak, 0.6, Some(0.999), CropSetting::Base, Some(2.0))
    );
    assert_eq!(
        cosine_ramp(0.0, 2.0, 0, 0),
        2.0,
        "no ramp: full weight at once"
    );
}

#[test]
fn gram_teacher_is_refreshed_every_interval_at_most_max_times() {
    let mut c = cfg();
    c.gram_anchor.refresh_every = 1000;
    c.gram_anchor.max_refreshes = 3;
    c.gram_anchor.refresh_policy = RefreshPolicy::Schedule;
    let mut m = StageMachine::new(c);
    m.force(Stage::GramAnchor, 2500, "test");
    let refreshes: Vec<u64> = (2400..12_000)
        .filter(|&s| m.overrides(s).refresh_gram_teacher_now)
        .collect();
    assert_eq!(refreshes, vec![3500, 4500, 5500]);
    assert_eq!(m.overrides(3499).gram_refreshes, 0);
    assert_eq!(m.overrides(3500).gram_refreshes, 1);
    assert_eq!(m.overrides(11_000).gram_refreshes, 3);
    assert_eq!(m.gram_refresh_steps(3499), Vec::<u64>::new());
    assert_eq!(m.gram_refresh_steps(4600), vec![3500, 4500]);
    assert_eq!(m.gram_refresh_steps(11_000), vec![3500, 4500, 5500]);
    // Pure function of (state, step): a resumed machine agrees.
    let r = StageMachine::resume(m.config().clone(), m.state().clone());
    assert!((2400..12_000).all(|s| r.overrides(s) == m.overrides(s)));
    // Records keep the EMA teacher's score; on the schedule they do not move the timing.
    let mut rec = r.clone();
    rec.record_refresh(3500);
    assert_eq!(rec.state().gram_refreshes.len(), 1);
    assert!((2400..12_000).all(|s| rec.overrides(s) == m.overrides(s)));
    let o = m.next_refresh(4000).unwrap();
    assert_eq!((o.done, o.due_step, o.now, o.gate), (1, 4500, false, None));
    assert!(m.next_refresh(5500).unwrap().now);
    assert_eq!(m.next_refresh(5501), None, "all three done");
    // With a Gram weight of 0 (an ablation) there is no Gram loss to refresh a teacher for.
    for policy in [RefreshPolicy::Schedule, RefreshPolicy::Probe] {
        let mut c = m.config().clone();
        c.gram_anchor.gram_weight = 0.0;
        c.gram_anchor.refresh_policy = policy;
        let mut m = StageMachine::new(c);
        m.force(Stage::GramAnchor, 2500, "test");
        assert!((2400..12_000).all(|s| !m.overrides(s).refresh_gram_teacher_now));
        assert_eq!(m.gram_refresh_steps(11_000), Vec::<u64>::new());
        assert_eq!(m.next_refresh(3500), None);
    }
}

#[test]
fn a_probe_driven_refresh_waits_until_the_ema_teacher_is_as_good_as_the_gram_teacher() {
    let mut c = cfg();
    c.gram_anchor.refresh_every = 1000;
    c.gram_anchor.max_refreshes = 2;
    assert_eq!(
        c.gram_anchor.refresh_policy,
        RefreshPolicy::Probe,
        "the default"
    );
    c.gram_anchor.stall_patience = None;
    c.gram_anchor.plateau_patience = 100;
    let mut m = StageMachine::new(c);
    // Peak 0.40 at step 300; the decline switches at 600 with that checkpoint as the anchor.
    assert_eq!(
        feed(&mut m, 100, 100, &[0.30, 0.35, 0.40, 0.30, 0.30, 0.30]).len(),
        1
    );
    assert_eq!(m.state().stage_start, 600);
    assert_eq!(
        m.gram_teacher_dense(),
        Some(MetricPoint {
            step: 300,
            value: 0.40
        })
    );
    // Due at 1600, but the EMA teacher is the degraded one: the schedule would copy it
    // over the anchor here; the probe policy holds the refresh.
    let o = m.next_refresh(1600).unwrap();
    assert_eq!((o.due_step, o.done, o.now), (1600, 0, false));
    let gate = o.gate.unwrap();
    assert!(!gate.met);
    assert!(
        gate.what.contains("after step 600") && gate.what.contains("0.4000: none yet"),
        "{}",
        gate.what
    );
    assert!(m.observe(1600, &miou(0.33)).is_none());
    assert!(m.observe(1800, &miou(0.399)).is_none());
    let gate = m.next_refresh(1900).unwrap().gate.unwrap();
    assert!(!gate.met && gate.what.contains("latest 0.3990 at step 1800"));
    assert!((600..2000).all(|s| !m.overrides(s).refresh_gram_teacher_now));
    assert_eq!(m.overrides(1999).gram_refreshes, 0);
    // An evaluation at the anchor's score opens it: the refresh happens at the next step.
    assert!(m.observe(2000, &miou(0.40)).is_none());
    let ov = m.overrides(2000);
    assert!(ov.refresh_gram_teacher_now);
    assert_eq!(ov.gram_refreshes, 1);
    // It is recorded (idempotently) with the score that opened it; the next is due 1000
    // steps later, against that score, and needs an evaluation made after it.
    m.record_refresh(2000);
    m.record_refresh(2000);
    assert_eq!(
        m.state().gram_refreshes,
        vec![GramRefresh {
            step: 2000,
            ema_dense: Some(MetricPoint {
                step: 2000,
                value: 0.40
            })
        }]
    );
    assert!(!m.overrides(2000).refresh_gram_teacher_now);
    assert_eq!(m.overrides(2000).gram_refreshes, 1);
    assert_eq!(m.gram_refresh_steps(2500), vec![2000]);
    assert_eq!(m.gram_refresh_steps(1999), Vec::<u64>::new());
    let o = m.next_refresh(3000).unwrap();
    assert_eq!(
        (o.due_step, o.now),
        (3000, false),
        "2000's evaluation is the copy's own"
    );
    assert!(m.observe(2800, &miou(0.45)).is_none());
    assert!(!m.overrides(2900).refresh_gram_teacher_now, "not due yet");
    assert!(m.overrides(3000).refresh_gram_teacher_now);
    // A resumed machine (the state as checkpointed) decides the same.
    let back: StageState =
        serde_json::from_str(&serde_json::to_string(m.state()).unwrap()).unwrap();
    let r = StageMachine::resume(m.config().clone(), back);
    assert!((600..5000).all(|s| r.overrides(s) == m.overrides(s)));
    m.record_refresh(3100);
    assert_eq!(m.gram_refresh_steps(9000), vec![2000, 3100]);
    assert_eq!(m.next_refresh(9000), None, "max_refreshes done");
    assert_eq!(m.overrides(9000).gram_refreshes, 2);
    // Switching stages hands them to the transition's record; a record outside Gram
    // anchoring is ignored.
    let t = m.force(Stage::HighResAdapt, 9000, "test");
    assert!(m.state().gram_refreshes.is_empty());
    assert_eq!(
        t.gram_refreshes_before
            .iter()
            .map(|r| r.step)
            .collect::<Vec<_>>(),
        vec![2000, 3100]
    );
    m.record_refresh(9100);
    assert!(m.state().gram_refreshes.is_empty());
    // A manual switch with no dense evaluation before it: nothing says what the Gram
    // teacher scores, so the schedule's timing applies (one refresh per due point).
    let mut m = StageMachine::new(m.config().clone());
    m.force(Stage::GramAnchor, 500, "test");
    assert_eq!(m.gram_teacher_dense(), None);
    assert!(!m.overrides(1499).refresh_gram_teacher_now);
    let o = m.next_refresh(1500).unwrap();
    assert!(o.now && o.gate.is_none());
    m.record_refresh(1500);
    assert!(!m.overrides(1501).refresh_gram_teacher_now);
    assert!(m.overrides(2500).refresh_gram_teacher_now);
}

#[test]
fn stage_state_from_before_refresh_records_still_loads() {
    let mut m = in_gram_anchor();
    feed(&mut m, 500, 100, &[0.32]);
    let mut v = serde_json::to_value(m.state()).unwrap();
    let o = v.as_object_mut().unwrap();
    assert!(o.remove("last_dense").is_some() && o.remove("gram_refreshes").is_some());
    let old: StageState = serde_json::from_value(v).unwrap();
    assert_eq!(old.last_dense, None);
    assert!(old.gram_refreshes.is_empty());
    assert_eq!(
        m.state().last_dense,
        Some(MetricPoint {
            step: 500,
            value: 0.32
        })
    );
}

#[test]
fn high_resolution_warms_up_the_lr_and_ends_after_its_budget() {
    let mut c = cfg();
    c.high_res.steps = 3000;
    c.high_res.lr_warmup_steps = 1000;
    let mut m = StageMachine::new(c.clone());
    let t = m.force(Stage::HighResAdapt, 10_000, "test");
    assert_eq!(
        t.gram_teacher,
        Some(GramTeacherSource::EmaTeacher { step: 10_000 })
    );
    let o = m.overrides(10_000);
    assert_eq!(
        (
            o.lr_factor,
            o.crops,
            o.gram_weight,
            o.gram_teacher_scale,
            o.local_dino_weight
        ),
        (0.0, CropSetting::HighRes, 1.5, Some(1.5), 0.5)
    );
    assert_eq!(o.lr_warmup.unwrap().start_step, 10_000);
    assert!((m.overrides(10_500).lr_factor - 0.125).abs() < 1e-12);
    assert_eq!(m.overrides(11_000).lr_factor, 0.25);
    let base = ops::schedule::Schedule {
        start: 0.0,
        peak: 1e-3,
        end: 1e-6,
        warmup: 100,
        cosine: 100_000,
    };
    assert!((m.overrides(11_000).lr(&base, 11_000) - 2.5e-4).abs() < 1e-15);
    assert!(m.on_step(12_999).is_none());
    let t = m.on_step(13_000).unwrap();
    assert_eq!((t.from, t.to), (Stage::HighResAdapt, Stage::Continue));
    let o = m.overrides(20_000);
    assert_eq!(
        (o.stage, o.lr_factor, o.lr_warmup, o.gram_weight),
        (Stage::Continue, 0.25, None, 1.5)
    );
    // With students configured the run goes to distillation instead.
    c.after_high_res = AfterHighRes::Distill;
    let mut d = StageMachine::new(c);
    d.force(Stage::HighResAdapt, 0, "test");
    assert_eq!(d.on_step(3000).unwrap().to, Stage::Distill);
    let o = d.overrides(4000);
    assert_eq!(
        (o.gram_weight, o.gram_teacher_scale, o.lr_base),
        (0.0, None, LrBase::Schedule)
    );
}

#[test]
fn pretrain_overrides_leave_the_recipe_alone() {
    let m = StageMachine::new(cfg());
    let o = m.overrides(123);
    assert_eq!(
        (
            o.stage,
            o.lr_base,
            o.lr_factor,
            o.momentum,
            o.local_dino_weight,
            o.gram_weight,
            o.refresh_gram_teacher_now
        ),
        (
            Stage::Pretrain,
            LrBase::Schedule,
            1.0,
            None,
            1.0,
            0.0,
            false
        )
    );
    let base = ops::schedule::Schedule {
        start: 0.0,
        peak: 1e-3,
        end: 1e-6,
        warmup: 100,
        cosine: 1000,
    };
    assert_eq!(o.lr(&base, 50), base.at(50));
}

#[test]
fn manual_transitions_are_recorded_and_everything_round_trips_serde() {
    let mut m = StageMachine::new(cfg());
    feed(&mut m, 100, 100, &[0.5]);
    let t = m.force(Stage::GramAnchor, 150, "operator saw blurry maps");
    assert_eq!(
        t.reason,
        TransitionReason::Manual {
            note: "operator saw blurry maps".into()
        }
    );
    assert_eq!(
        t.gram_teacher,
        Some(GramTeacherSource::BestDenseCheckpoint {
            step: 100,
            value: 0.5
        })
    );
    feed(&mut m, 200, 100, &[0.45, 0.5]);
    let json = serde_json::to_string(m.state()).unwrap();
    let back: StageState = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, m.state());
    let r = StageMachine::resume(cfg(), back);
    assert_eq!(r.overrides(777), m.overrides(777));
    let cfg_json = serde_json::to_string(&cfg()).unwrap();
    assert_eq!(
        serde_json::from_str::<StageConfig>(&cfg_json).unwrap(),
        cfg()
    );
    assert!(
        cfg_json.contains(r#""degradation_threshold":{"absolute":0.02}"#),
        "{cfg_json}"
    );
    assert!(cfg_json.contains(r#""continue":{"#));
    let o = serde_json::to_string(&m.overrides(1000)).unwrap();
    assert!(o.contains(r#""stage":"gram_anchor""#), "{o}");
    assert_eq!(
        "high-res-adapt".parse::<Stage>().unwrap(),
        Stage::HighResAdapt
    );
    assert!("warmup".parse::<Stage>().is_err());
}

#[test]
fn stage_config_defaults_and_validation() {
    let c: StageConfig =
        serde_json::from_str(r#"{"patience": 5, "gram_anchor": {"gram_weight": 1.0}}"#).unwrap();
    assert_eq!(
        (
            c.patience,
            c.gram_anchor.gram_weight,
            c.gram_anchor.max_refreshes
        ),
        (5, 1.0, 3)
    );
    assert!(serde_json::from_str::<StageConfig>(r#"{"patiance": 5}"#).is_err());
    assert!(serde_json::from_str::<StageConfig>(r#"{"gram_anchor": {"weight": 5}}"#).is_err());
    assert!(StageConfig::default().problems().is_empty());
    let mut bad = StageConfig {
        patience: 0,
        degradation_threshold: Threshold::Relative(-0.1),
        ..StageConfig::default()
    };
    bad.gram_anchor.momentum = 1.5;
    bad.high_res.lr_warmup_steps = bad.high_res.steps + 1;
    assert_eq!(bad.problems().len(), 4, "{:?}", bad.problems());
}

#[test]
fn late_results_start_the_stage_when_applied_and_stale_snapshots_are_ignored() {
    let mut m = StageMachine::new(cfg());
    // Evaluations of the weights at 100..400 whose results arrive 40 steps later.
    let mut got = None;
    for (i, v) in [0.40, 0.30, 0.30, 0.30].into_iter().enumerate() {
        let s = 100 + 100 * i as u64;
        got = got.or(m.observe_at(s, s + 40, &miou(v)));
    }
    let t = got.expect("degradation fires");
    assert_eq!((t.step, m.state().stage_start), (440, 440));
    assert_eq!(
        t.gram_teacher,
        Some(GramTeacherSource::BestDenseCheckpoint {
            step: 100,
            value: 0.40
        })
    );
    assert_eq!(
        m.overrides(440).gram_weight,
        0.0,
        "the ramp starts when the stage is applied"
    );
    // A snapshot taken before the stage began (step 420) says nothing about it.
    assert!(m.observe_at(420, 470, &miou(0.9)).is_none());
    assert_eq!(m.state().stage_best, None);
    assert_eq!(m.state().evals, 4);
}

/// `outlook` says what the next automatic transition waits for, with the numbers the
/// machine will compare, and marks each condition as it comes true; `describe` gives a
/// transition's reason in one line.
#[test]
fn the_outlook_tracks_each_condition_of_the_next_transition() {
    let mut m = StageMachine::new(cfg());
    let o = m.outlook(0).expect("pretraining has a next stage");
    assert_eq!(o.next, Stage::GramAnchor);
    assert_eq!((o.all_of.len(), o.all_of[0].met), (1, false));
    assert!(
        o.all_of[0].what.contains("a first miou evaluation"),
        "{o:?}"
    );
    // best 0.40 at step 100, two degraded evaluations of three
    assert!(feed(&mut m, 100, 100, &[0.40, 0.30, 0.30]).is_empty());
    let o = m.outlook(300).unwrap();
    let c = &o.all_of[0];
    assert!(!c.met);
    assert!(
        c.what
            .contains("more than 0.0200 below its best 0.4000 (step 100)")
            && c.what.ends_with("2 so far"),
        "{}",
        c.what
    );
    let t = feed(&mut m, 400, 100, &[0.30]);
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0].1.describe(),
        "miou 0.3000 at step 400: 3 evaluations in a row more than 0.0200 below the best 0.4000 (step 100)"
    );
    // Gram anchoring from step 400: the bar is 0.40 - 0.01
    let o = m.outlook(450).unwrap();
    assert_eq!(o.next, Stage::HighResAdapt);
    let met: Vec<bool> = o.all_of.iter().map(|c| c.met).collect();
    assert_eq!(met, [false, false, false], "{o:?}");
    assert!(o.all_of[0].what.contains("at or above 0.3900"), "{o:?}");
    assert!(o.all_of[2]
        .what
        .contains("at least 200 steps in the stage: 50 so far"));
    assert_eq!(o.or_after, None);
    // recovered (0.395 >= 0.39), 200 steps in, one evaluation without gain
    assert!(feed(&mut m, 500, 100, &[0.395, 0.396]).is_empty());
    let o = m.outlook(600).unwrap();
    let met: Vec<bool> = o.all_of.iter().map(|c| c.met).collect();
    assert_eq!(met, [true, false, true], "{o:?}");
    assert!(o.all_of[1].what.ends_with("1 so far"), "{o:?}");
    // plateau: the transition fires, and high-res counts its budget down
    let t = feed(&mut m, 700, 100, &[0.396, 0.395]);
    assert_eq!(t.len(), 1);
    assert!(t[0]
        .1
        .describe()
        .starts_with("miou 0.3950 at step 800: recovered to the pretraining best 0.4000"));
    let o = m.outlook(900).unwrap();
    assert_eq!(o.next, Stage::Continue);
    assert!(o.all_of.is_empty());
    let budget = m.config().high_res.steps;
    assert_eq!(o.or_after, Some((budget, budget - 100)));
    // manual transitions say so; the open-ended stage has no outlook
    let t = m.force(Stage::Continue, 950, "by hand");
    assert_eq!(t.describe(), "manual: by hand");
    assert_eq!(m.outlook(1000), None);
}

/// Forced into Gram anchoring before any evaluation there is no bar: a stall cannot be
/// "below" it, so only the recovered-and-plateaued rule applies (and no NaN bar reaches a
/// checkpoint's JSON).
#[test]
fn without_a_pretraining_best_a_stall_is_a_plateau() {
    let mut c = cfg();
    c.gram_anchor.stall_patience = Some(1);
    c.gram_anchor.min_steps = 0;
    let mut m = StageMachine::new(c);
    m.force(Stage::GramAnchor, 0, "test");
    let t = feed(&mut m, 100, 100, &[0.3, 0.3, 0.3, 0.3]);
    assert_eq!(t.len(), 1);
    assert!(matches!(
        t[0].1.reason,
        TransitionReason::Automatic {
            rule: Rule::DenseRecovered {
                reference: None,
                ..
            },
            ..
        }
    ));
    serde_json::to_string(m.state()).unwrap();
}
