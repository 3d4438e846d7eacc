//! `TrainState`, the one value that survives a restart, and `train_step`, the pure
//! function that advances it by one step. No IO, no clocks, no threads of its own.
//!
//! A step is a transaction: [`compute_step`] reads the state and returns losses and
//! gradients; [`apply_step`] clips, updates and moves the EMA teacher. The runtime
//! checks the outcome in between and may discard it (NaN, spike) without touching state.

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::SslConfig;
use crate::optim::{clip_module, ema, AdamW, ClipStat, OptimHparams};
use crate::params::stream;
use crate::params::Grads;
use crate::ssl::{
    ssl_losses, CropCounts, HeadOutputs, LossTerms, LossWeights, ModelGrads, SslModel,
    StudentFeatures, TeacherTargets,
};
use crate::vit::{CropGroup, FeatureGrads, Vit};

/// One batch as the step consumes it (crop-major rows, as the official collate).
#[derive(Clone)]
pub struct Batch {
    /// Images per batch, B.
    pub batch_size: usize,
    /// Local crops per image.
    pub n_local: usize,
    /// Global crops `[2B, 3, G, G]`.
    pub global: Tensor,
    /// Local crops `[n_local * B, 3, L, L]`.
    pub local: Option<Tensor>,
    /// Gram-teacher crops `[2B, 3, S, S]`, when the Gram loss is active.
    pub gram: Option<Tensor>,
    /// iBOT masks `[2B * P]`, 1 = masked.
    pub masks: Vec<u8>,
    /// Flat indices of the masked patches in `[2B * P]`, ascending.
    pub mask_indices: Vec<usize>,
    /// `1 / #masked in its crop` for each masked patch.
    pub masks_weight: Vec<f64>,
}

impl Batch {
    /// Builds a batch and derives the mask indices and weights from `masks`.
    pub fn new(
        batch_size: usize,
        global: Tensor,
        local: Option<Tensor>,
        gram: Option<Tensor>,
        masks: Vec<u8>,
    ) -> Result<Self> {
        let (n2, _, _, _) = global.dims4()?;
        if n2 != 2 * batch_size {
            bail!("global crops: {n2} rows for batch {batch_size} (expected 2B, crop-major)")
        }
        let n_local = match &local {
            Some(l) => {
                let (nl, _, _, _) = l.dims4()?;
                if nl % batch_size != 0 {
                    bail!("local crops: {nl} rows is not a multiple of batch {batch_size}")
                }
                nl / batch_size
            }
            None => 0,
        };
        if let Some(g) = &gram {
            if g.dims4()?.0 != n2 {
                bail!("gram crops: {} rows vs {n2} global crops", g.dims4()?.0)
            }
        }
        if !masks.len().is_multiple_of(n2) {
            bail!("masks: {} entries for {n2} crops", masks.len())
        }
        let p = masks.len() / n2;
        let mut mask_indices = vec![];
        let mut masks_weight = vec![];
        for c in 0..n2 {
            let row = &masks[c * p..(c + 1) * p];
            let cnt = row.iter().filter(|&&m| m != 0).count();
            for (i, &m) in row.iter().enumerate() {
                if m != 0 {
                    mask_indices.push(c * p + i);
                    masks_weight.push(1.0 / cnt.max(1) as f64);
                }
            }
        }
        Ok(Self {
            batch_size,
            n_local,
            global,
            local,
            gram,
            masks,
            mask_indices,
            masks_weight,
        })
    }
}

impl Batch {
    /// The same batch with its images in `dt` (masks and weights are host metadata).
    pub fn cast(&self, dt: DType) -> Result<Self> {
        Ok(Self {
            batch_size: self.batch_size,
            n_local: self.n_local,
            global: self.global.to_dtype(dt)?,
            local: self.local.as_ref().map(|t| t.to_dtype(dt)).transpose()?,
            gram: self.gram.as_ref().map(|t| t.to_dtype(dt)).transpose()?,
            masks: self.masks.clone(),
            mask_indices: self.mask_indices.clone(),
            masks_weight: self.masks_weight.clone(),
        })
    }

    /// The same batch with its images on `dev` (masks and weights are host metadata).
    pub fn to_device(&self, dev: &candle_core::Device) -> Result<Self> {
        let mv = |t: &Tensor| -> Result<Tensor> {
            if t.device().same_device(dev) {
                Ok(t.clone())
            } else {
                t.to_device(dev)
            }
        };
        Ok(Self {
            batch_size: self.batch_size,
            n_local: self.n_local,
            global: mv(&self.global)?,
            local: self.local.as_ref().map(mv).transpose()?,
            gram: self.gram.as_ref().map(mv).transpose()?,
            masks: self.masks.clone(),
            mask_indices: self.mask_indices.clone(),
            masks_weight: self.masks_weight.clone(),
        })
    }
}

/// The scheduled values for one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepHparams {
    /// Learning rate.
    pub lr: f64,
    /// LR of the heads' last layers (0 while frozen).
    pub last_layer_lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// EMA teacher momentum.
    pub momentum: f64,
    /// Teacher temperature.
    pub teacher_temp: f64,
    /// Gram loss weight (0 = off).
    pub gram_weight: f64,
    /// Factor on the local DINO terms.
    pub local_dino_weight: f64,
}

/// Everything that must survive a restart.
#[derive(Debug)]
pub struct TrainState {
    /// Architecture and objective.
    pub cfg: SslConfig,
    /// Seed of every random stream of the run.
    pub seed: u64,
    /// Committed steps.
    pub step: u64,
    /// The student (trained).
    pub student: SslModel,
    /// The EMA teacher.
    pub teacher: SslModel,
    /// The frozen Gram teacher, once Gram anchoring has started.
    pub gram_teacher: Option<Vit>,
    /// AdamW moments and step count.
    pub optim: AdamW,
    /// Position of the data stream (owned by the data loader, opaque here).
    pub data_cursor: serde_json::Value,
    /// Gram-teacher refreshes done so far.
    pub gram_updates: u32,
}

impl TrainState {
    /// A fresh run: student initialised from `seed`, teacher an exact copy.
    pub fn new(cfg: &SslConfig, seed: u64, dtype: DType) -> Result<Self> {
        let student = SslModel::init(cfg, seed, dtype)?;
        let teacher = student.deep_clone()?;
        Self::from_models(cfg, seed, student, teacher)
    }

    /// A state at step 0 around a given student and teacher, with zero AdamW moments (a
    /// resume builds its models from the checkpoint and then loads the rest).
    pub fn from_models(
        cfg: &SslConfig,
        seed: u64,
        student: SslModel,
        teacher: SslModel,
    ) -> Result<Self> {
        let optim = new_optimizer(cfg, &student)?;
        Ok(Self {
            cfg: cfg.clone(),
            seed,
            step: 0,
            student,
            teacher,
            gram_teacher: None,
            optim,
            data_cursor: serde_json::Value::Null,
            gram_updates: 0,
        })
    }

    /// The same state with every tensor on `dev`: student, teacher, Gram teacher and the
    /// AdamW moments (tensors beside their parameters off the host, host vectors on it).
    /// Everything else (step, seed, data cursor) is shared host metadata.
    pub fn to_device(&self, dev: &candle_core::Device) -> Result<Self> {
        let student = self.student.to_device(dev)?;
        let optim = self.optim.placed_for(&[
            &student.backbone.params,
            &student.dino_head.params,
            &student.ibot_head.params,
        ])?;
        Ok(Self {
            cfg: self.cfg.clone(),
            seed: self.seed,
            step: self.step,
            teacher: self.teacher.to_device(dev)?,
            gram_teacher: self
                .gram_teacher
                .as_ref()
                .map(|g| g.to_device(dev))
                .transpose()?,
            student,
            optim,
            data_cursor: self.data_cursor.clone(),
            gram_updates: self.gram_updates,
        })
    }

    /// A read-only twin of this state for computing a step in `dt` (mixed precision: the
    /// master weights stay in their type here, the twin holds casts of the student,
    /// teacher and Gram teacher and no optimizer moments). Run [`compute_step`] on the
    /// twin, then [`apply_step`] on `self` with the twin's gradients (the optimizer widens
    /// half gradients to the master type). With `dt` equal to the parameters' type the
    /// twin shares every tensor with `self`.
    pub fn compute_view(&self, dt: DType) -> Result<Self> {
        Ok(self.twin(
            self.student.cast(dt)?,
            self.teacher.cast(dt)?,
            self.gram_teacher.as_ref().map(|g| g.cast(dt)).transpose()?,
        ))
    }

    /// A read-only twin for one side of a step, in `dt` on `dev`: the teacher side casts
    /// and moves the EMA and Gram teachers, the student side the student; the other side's
    /// modules are shared, uncast, and must not be read. For a mixed-precision step (the
    /// teacher and trainer each cast only what they compute with) and for the members of
    /// a data-parallel group on other devices. In the state's own type and device it
    /// shares every tensor.
    pub fn phase_view(&self, side: Side, dt: DType, dev: &candle_core::Device) -> Result<Self> {
        let own = self.student.backbone.params.get(0).dtype();
        let moved = |m: SslModel| -> Result<SslModel> {
            if dev.same_device(&self.device()) {
                Ok(m)
            } else {
                m.to_device(dev)
            }
        };
        let (sdt, tdt) = match side {
            Side::Teacher => (own, dt),
            Side::Student => (dt, own),
        };
        let mut student = self.student.cast(sdt)?;
        let mut teacher = self.teacher.cast(tdt)?;
        let mut gram_teacher = self
            .gram_teacher
            .as_ref()
            .map(|g| g.cast(tdt))
            .transpose()?;
        match side {
            Side::Student => student = moved(student)?,
            Side::Teacher => {
                teacher = moved(teacher)?;
                if !dev.same_device(&self.device()) {
                    gram_teacher = gram_teacher.map(|g| g.to_device(dev)).transpose()?;
                }
            }
        }
        Ok(self.twin(student, teacher, gram_teacher))
    }

    /// A state with these modules and `self`'s step, config and optimizer step count, but
    /// no optimizer moments and no data cursor: what a view computes with.
    fn twin(&self, student: SslModel, teacher: SslModel, gram_teacher: Option<Vit>) -> Self {
        Self {
            cfg: self.cfg.clone(),
            seed: self.seed,
            step: self.step,
            student,
            teacher,
            gram_teacher,
            optim: AdamW {
                cfg: self.optim.cfg.clone(),
                t: self.optim.t,
                modules: vec![],
            },
            data_cursor: serde_json::Value::Null,
            gram_updates: self.gram_updates,
        }
    }

    /// The device the student's parameters live on.
    pub fn device(&self) -> candle_core::Device {
        self.student.backbone.device()
    }

    /// Copies the EMA teacher's backbone into the Gram teacher (hard copy, `update_gram(m=0)`).
    pub fn refresh_gram_teacher(&mut self) -> Result<()> {
        self.gram_teacher = Some(self.teacher.backbone.deep_clone()?);
        self.gram_updates += 1;
        Ok(())
    }
}

/// The side of a step a [`TrainState::phase_view`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// EMA teacher and Gram teacher forwards.
    Teacher,
    /// Student forward and backward.
    Student,
}

/// A fresh optimizer for a student model.
pub fn new_optimizer(cfg: &SslConfig, student: &SslModel) -> Result<AdamW> {
    let depth = cfg.backbone.depth;
    let bb = &student.backbone;
    AdamW::new(
        &cfg.optim,
        &[
            (true, &bb.params, depth),
            (false, &student.dino_head.params, depth),
            (false, &student.ibot_head.params, depth),
        ],
        |n| bb.layer_id(n),
    )
}

/// Intermediate values of a step, for inspection and parity checks.
pub struct Trace {
    /// Teacher targets.
    pub teacher: TeacherTargets,
    /// Student features.
    pub student: StudentFeatures,
    /// Student head outputs.
    pub heads: HeadOutputs,
    /// Resized Gram-teacher patches, when the Gram loss was on.
    pub gram_target: Option<Tensor>,
}

/// Losses and gradients of one step, not yet applied.
pub struct StepOutcome {
    /// Loss values.
    pub losses: LossTerms,
    /// Gradients of the student modules (before clipping).
    pub grads: ModelGrads,
    /// Intermediate values.
    pub trace: Trace,
}

/// What a committed step reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StepReport {
    /// The step that was committed (0-based; the state's `step` is now this + 1).
    pub step: u64,
    /// Loss values.
    pub losses: LossTerms,
    /// Clipping of backbone, DINO head, iBOT head.
    pub clip: [ClipStat; 3],
    /// The schedule values used.
    pub hparams: StepHparams,
}

/// Why a step was not committed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A loss or gradient norm is NaN or infinite; nothing was changed.
    #[error("non-finite step {step}: losses {losses:?}, gradient norms {norms:?}")]
    NonFinite {
        /// The step.
        step: u64,
        /// The losses.
        losses: LossTerms,
        /// Gradient norms of the three modules.
        norms: [f64; 3],
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Phases of a step, reported to an observer as each one completes (so callers can time
/// them without the model knowing clocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Teacher forward, heads and Sinkhorn-Knopp.
    Teacher,
    /// Gram-teacher forward and resize.
    GramTeacher,
    /// Student backbone forward.
    StudentForward,
    /// Heads, losses and their gradients.
    Losses,
    /// Backbone backward.
    Backward,
    /// Clipping and AdamW.
    Optimizer,
    /// EMA teacher update.
    Ema,
}

/// Teacher, Gram teacher and student forward, losses and backward. Reads the state only.
pub fn compute_step(st: &TrainState, batch: &Batch, hp: &StepHparams) -> Result<StepOutcome> {
    compute_step_observed(st, batch, hp, &mut |_| {})
}

/// What the teacher side computes for one batch: SK targets and the Gram target.
pub struct TeacherOutput {
    /// DINO / iBOT targets.
    pub targets: TeacherTargets,
    /// Resized Gram-teacher patches when the Gram loss is on.
    pub gram_target: Option<Tensor>,
}

/// The teacher side of a step: EMA-teacher forward on the unmasked global crops, heads,
/// Sinkhorn-Knopp; Gram-teacher forward and bicubic resize when the Gram loss is on.
pub fn teacher_phase(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    obs: &mut dyn FnMut(Phase),
) -> Result<TeacherOutput> {
    teacher_phase_in(st, batch, hp, None, obs)
}

/// [`teacher_phase`] for one member of a data-parallel group (`crate::dist`): the
/// Sinkhorn-Knopp normalisations run over the group.
pub fn teacher_phase_in(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    comm: Option<&dyn crate::dist::Collective>,
    obs: &mut dyn FnMut(Phase),
) -> Result<TeacherOutput> {
    let cfg = &st.cfg;
    let b = batch.batch_size;
    let tf = st.teacher.backbone.forward(&[CropGroup {
        images: &batch.global,
        masks: None,
    }])?;
    let targets = crate::ssl::teacher_targets_in(
        &st.teacher,
        &tf.cls(0)?,
        &tf.patches(0)?,
        &batch.mask_indices,
        hp.teacher_temp,
        cfg.loss.sinkhorn_iterations,
        comm,
    )?;
    obs(Phase::Teacher);
    let gram_target = if hp.gram_weight != 0.0 {
        let Some(gt) = &st.gram_teacher else {
            bail!("the Gram loss is on but there is no Gram teacher")
        };
        let Some(crops) = &batch.gram else {
            bail!("the Gram loss is on but the batch has no Gram crops")
        };
        let gf = gt.forward(&[CropGroup {
            images: crops,
            masks: None,
        }])?;
        let p = cfg.backbone.patch_size;
        let (_, _, gh, gw) = batch.global.dims4()?;
        let tgt =
            ops::loss::resize_tokens(&gf.patches(0)?, 2 * b, gf.groups[0].grid, (gh / p, gw / p))?;
        obs(Phase::GramTeacher);
        Some(tgt)
    } else {
        None
    };
    Ok(TeacherOutput {
        targets,
        gram_target,
    })
}

/// DINO and iBOT targets of a (frozen or EMA) teacher for a batch: teacher forward on the
/// unmasked global crops, heads, Sinkhorn-Knopp.
pub fn frozen_teacher_targets(
    teacher: &SslModel,
    sk_iters: usize,
    batch: &Batch,
    hp: &StepHparams,
    comm: Option<&dyn crate::dist::Collective>,
) -> Result<TeacherTargets> {
    let tf = teacher.backbone.forward(&[CropGroup {
        images: &batch.global,
        masks: None,
    }])?;
    crate::ssl::teacher_targets_in(
        teacher,
        &tf.cls(0)?,
        &tf.patches(0)?,
        &batch.mask_indices,
        hp.teacher_temp,
        sk_iters,
        comm,
    )
}

/// The teacher side of a distillation step: a frozen teacher's targets, computed once per
/// batch and shared by every student (no Gram loss in distillation). With `comm`, one
/// member of a data-parallel group on its part of the batch: the Sinkhorn-Knopp
/// normalisations run over the group, so the parts' targets are the whole batch's.
pub fn distill_teacher_phase(
    teacher: &SslModel,
    sk_iters: usize,
    batch: &Batch,
    hp: &StepHparams,
    comm: Option<&dyn crate::dist::Collective>,
) -> Result<TeacherOutput> {
    Ok(TeacherOutput {
        targets: frozen_teacher_targets(teacher, sk_iters, batch, hp, comm)?,
        gram_target: None,
    })
}

/// The student side of a distillation step: as [`student_phase`], but the student sees its
/// global crops unmasked; the iBOT loss is still taken at the sampled mask positions
/// (patch-level distillation on a random subset), as the official multi-distillation does.
pub fn distill_student_phase(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    teacher: TeacherOutput,
    obs: &mut dyn FnMut(Phase),
) -> Result<StepOutcome> {
    student_phase_impl(st, batch, hp, teacher, obs, false)
}

/// The student side of a step given the teacher's output: student forward on masked
/// global and local crops, losses, backward. Reads the state only.
pub fn student_phase(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    teacher: TeacherOutput,
    obs: &mut dyn FnMut(Phase),
) -> Result<StepOutcome> {
    student_phase_impl(st, batch, hp, teacher, obs, true)
}

fn student_phase_impl(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    teacher: TeacherOutput,
    obs: &mut dyn FnMut(Phase),
    masked: bool,
) -> Result<StepOutcome> {
    let (dino_head, ibot_head, rest) = student_phase_begin(st, batch, hp, teacher, obs, masked)?;
    rest.run(st, dino_head, ibot_head, obs)
}

fn student_phase_begin(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    teacher: TeacherOutput,
    obs: &mut dyn FnMut(Phase),
    masked: bool,
) -> Result<(Grads, Grads, BackboneBackward)> {
    let cfg = &st.cfg;
    let b = batch.batch_size;
    let mut rng = stream(st.seed, &format!("train_step/{}", st.step));
    let mut groups = vec![CropGroup {
        images: &batch.global,
        masks: if masked { Some(&batch.masks) } else { None },
    }];
    if let Some(l) = &batch.local {
        groups.push(CropGroup {
            images: l,
            masks: None,
        });
    }
    let (sf, cache) = st.student.backbone.forward_train(&groups, &mut rng)?;
    obs(Phase::StudentForward);
    let d = cfg.backbone.embed_dim;
    let cls_local = if batch.local.is_some() {
        sf.cls(1)?
    } else {
        Tensor::zeros((0, d), sf.x_norm.dtype(), sf.x_norm.device())?
    };
    let student = StudentFeatures {
        cls_global: sf.cls(0)?,
        cls_local,
        patch_global: sf.patches(0)?,
    };
    let lr = ssl_losses(
        cfg,
        &st.student.dino_head,
        &st.student.ibot_head,
        &student,
        &teacher.targets,
        teacher.gram_target.as_ref(),
        &batch.mask_indices,
        &batch.masks_weight,
        CropCounts {
            batch: b,
            n_local: batch.n_local,
        },
        LossWeights {
            gram: hp.gram_weight,
            local_dino: hp.local_dino_weight,
        },
    )?;
    obs(Phase::Losses);
    let mut fg = FeatureGrads::zeros(&sf)?;
    fg.add_cls(0, &lr.features.cls_global)?;
    if batch.local.is_some() {
        fg.add_cls(1, &lr.features.cls_local)?;
    }
    fg.add_patches(0, &lr.features.patch_global)?;
    let rest = BackboneBackward {
        cache,
        d_features: fg.into_tensor(),
        losses: lr.terms,
        trace: Trace {
            teacher: teacher.targets,
            student,
            heads: lr.heads,
            gram_target: teacher.gram_target,
        },
    };
    Ok((lr.dino_head, lr.ibot_head, rest))
}

/// The backbone's backward pass of a student phase whose heads' gradients are already
/// out ([`student_phase_split`]).
pub struct BackboneBackward {
    cache: crate::vit::VitCache,
    d_features: Tensor,
    losses: LossTerms,
    trace: Trace,
}

impl BackboneBackward {
    /// Computes the backbone's gradients and completes the phase's outcome with the heads'
    /// gradients `dino_head` and `ibot_head` (as split off, or averaged over a group
    /// meanwhile).
    pub fn run(
        self,
        st: &TrainState,
        dino_head: Grads,
        ibot_head: Grads,
        obs: &mut dyn FnMut(Phase),
    ) -> Result<StepOutcome> {
        Ok(self
            .backbone_observed(st, obs, &mut |_, _| Ok(()))?
            .outcome(dino_head, ibot_head))
    }

    /// Computes the backbone's gradients, handing each group of final gradients to
    /// `ready` as the pass goes ([`crate::vit::Vit::backward_observed`]).
    pub fn backbone_observed(
        self,
        st: &TrainState,
        obs: &mut dyn FnMut(Phase),
        ready: &mut dyn FnMut(&mut Grads, &[usize]) -> Result<()>,
    ) -> Result<BackboneDone> {
        let backbone =
            st.student
                .backbone
                .backward_observed(self.cache, &self.d_features, ready)?;
        obs(Phase::Backward);
        Ok(BackboneDone {
            backbone,
            losses: self.losses,
            trace: self.trace,
        })
    }
}

/// A student phase whose backward pass is done; the heads' gradients complete it.
pub struct BackboneDone {
    /// The backbone's gradients.
    pub backbone: Grads,
    losses: LossTerms,
    trace: Trace,
}

impl BackboneDone {
    /// The phase's outcome with the heads' gradients.
    pub fn outcome(self, dino_head: Grads, ibot_head: Grads) -> StepOutcome {
        StepOutcome {
            losses: self.losses,
            grads: ModelGrads {
                backbone: self.backbone,
                dino_head,
                ibot_head,
            },
            trace: self.trace,
        }
    }
}

/// [`student_phase`] in two parts: up to the losses, which gives the heads' gradients
/// (final: the backbone's backward pass does not change them) and the rest, the
/// backbone's backward pass ([`BackboneBackward::run`]). A data-parallel member can
/// average the heads' gradients over its group while it computes the backbone's; the
/// outcome is the one [`student_phase`] gives, bit for bit.
pub fn student_phase_split(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    teacher: TeacherOutput,
    obs: &mut dyn FnMut(Phase),
) -> Result<(Grads, Grads, BackboneBackward)> {
    student_phase_begin(st, batch, hp, teacher, obs, true)
}

/// [`compute_step`] with a callback after each phase.
pub fn compute_step_observed(
    st: &TrainState,
    batch: &Batch,
    hp: &StepHparams,
    obs: &mut dyn FnMut(Phase),
) -> Result<StepOutcome> {
    let t = teacher_phase(st, batch, hp, obs)?;
    student_phase(st, batch, hp, t, obs)
}

/// Clips the gradients per module and returns the statistics, or the norms if any is not
/// finite (then nothing should be applied).
pub fn clip_gradients(
    cfg: &SslConfig,
    grads: &ModelGrads,
) -> Result<std::result::Result<[ClipStat; 3], [f64; 3]>> {
    let mut stats = [ClipStat::default(); 3];
    let mut norms = [0.0; 3];
    for (i, (_, g)) in grads.modules().iter().enumerate() {
        norms[i] = g.sum_sq()?.sqrt();
    }
    if norms.iter().any(|n| !n.is_finite()) {
        return Ok(Err(norms));
    }
    for (i, (_, g)) in grads.modules().iter().enumerate() {
        stats[i] = clip_module(g, cfg.optim.clip_grad)?;
    }
    Ok(Ok(stats))
}

/// Scales `grads` by the factors [`clip_gradients`] reported for the same gradients
/// ([`ClipStat::coef`]): the bits clipping gives, without summing the norms again (a
/// copy of the state elsewhere follows the member that clipped).
pub fn apply_clip(grads: &ModelGrads, coefs: [f64; 3]) -> Result<()> {
    for ((_, g), c) in grads.modules().iter().zip(coefs) {
        crate::optim::apply_clip_coef(g, c)?;
    }
    Ok(())
}

/// Applies already-clipped gradients: AdamW on the student, EMA on the teacher, `step + 1`.
pub fn apply_step(st: &mut TrainState, grads: &ModelGrads, hp: &StepHparams) -> Result<()> {
    apply_step_observed(st, grads, hp, &mut |_| {})
}

/// [`apply_step`] with a callback after the optimizer and after the EMA.
pub fn apply_step_observed(
    st: &mut TrainState,
    grads: &ModelGrads,
    hp: &StepHparams,
    obs: &mut dyn FnMut(Phase),
) -> Result<()> {
    let h = OptimHparams {
        lr: hp.lr,
        last_layer_lr: hp.last_layer_lr,
        weight_decay: hp.weight_decay,
    };
    st.optim.step(
        &[
            &st.student.backbone.params,
            &st.student.dino_head.params,
            &st.student.ibot_head.params,
        ],
        &[&grads.backbone, &grads.dino_head, &grads.ibot_head],
        &h,
    )?;
    obs(Phase::Optimizer);
    ema(
        &st.teacher.backbone.params,
        &st.student.backbone.params,
        hp.momentum,
    )?;
    ema(
        &st.teacher.dino_head.params,
        &st.student.dino_head.params,
        hp.momentum,
    )?;
    ema(
        &st.teacher.ibot_head.params,
        &st.student.ibot_head.params,
        hp.momentum,
    )?;
    obs(Phase::Ema);
    st.step += 1;
    Ok(())
}

/// One training step: schedule values in, state advanced, report out. A step whose loss
/// or gradient norm is not finite changes nothing and returns [`StepError::NonFinite`].
pub fn train_step(
    st: &mut TrainState,
    batch: &Batch,
    hp: &StepHparams,
) -> std::result::Result<StepReport, StepError> {
    let out = compute_step(st, batch, hp)?;
    finish_step(st, out, hp)
}

/// The end of a step whose gradients are computed: clip, refuse a non-finite step
/// (changing nothing), apply, report.
pub fn finish_step(
    st: &mut TrainState,
    out: StepOutcome,
    hp: &StepHparams,
) -> std::result::Result<StepReport, StepError> {
    let clip = match clip_gradients(&st.cfg, &out.grads)? {
        Ok(c) if out.losses.is_finite() => c,
        Ok(c) => {
            return Err(StepError::NonFinite {
                step: st.step,
                losses: out.losses,
                norms: c.map(|s| s.total_norm),
            })
        }
        Err(norms) => {
            return Err(StepError::NonFinite {
                step: st.step,
                losses: out.losses,
                norms,
            })
        }
    };
    let step = st.step;
    apply_step(st, &out.grads, hp)?;
    Ok(StepReport {
        step,
        losses: out.losses,
        clip,
        hparams: *hp,
    })
}
