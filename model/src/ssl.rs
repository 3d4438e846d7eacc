//! The SSL objective as `SSLMetaArch.compute_losses` assembles it: teacher targets with
//! Sinkhorn-Knopp centering, the DINO loss (local terms against both teacher global crops,
//! cross-pair global terms), iBOT on the masked patches, KoLeo on the student's global
//! class tokens, and the Gram loss against the (resized) Gram-teacher patches; plus the
//! gradients of the weighted total with respect to the student features and heads.

use candle_core::{bail, DType, Result, Tensor};

use crate::config::{HeadConfig, SslConfig, VitConfig};
use crate::head::{Head, HeadCache};
use crate::params::{init_tensor, Grads, Init, ParamSet};
use crate::vit::Vit;
use ops::{loss, nn};

/// Backbone plus DINO and iBOT heads: the student, or its EMA teacher.
#[derive(Clone, Debug)]
pub struct SslModel {
    /// The ViT.
    pub backbone: Vit,
    /// DINO (class token) head.
    pub dino_head: Head,
    /// iBOT (patch) head.
    pub ibot_head: Head,
}

/// The three module roles, in the order used for clipping, optimizer state and files.
pub const ROLES: [&str; 3] = ["backbone", "dino_head", "ibot_head"];

impl SslModel {
    /// A freshly initialised model (official init, our seeded streams).
    pub fn init(cfg: &SslConfig, seed: u64, dtype: DType) -> Result<Self> {
        Self::build(cfg, |name, shape, init| {
            init_tensor(seed, name, shape, init, dtype)
        })
    }

    /// Builds a model whose tensors come from `make("<role>.<key>", shape, init)` (the
    /// builders check each shape): nothing is drawn that a checkpoint then overwrites.
    pub fn build(
        cfg: &SslConfig,
        mut make: impl FnMut(&str, &[usize], Init) -> Result<Tensor>,
    ) -> Result<Self> {
        let d = cfg.backbone.embed_dim;
        Ok(Self {
            backbone: Vit::build(&cfg.backbone, |n, s, i| {
                make(&format!("backbone.{n}"), s, i)
            })?,
            dino_head: Head::build(&cfg.dino_head, d, |n, s, i| {
                make(&format!("dino_head.{n}"), s, i)
            })?,
            ibot_head: Head::build(&cfg.ibot_head, d, |n, s, i| {
                make(&format!("ibot_head.{n}"), s, i)
            })?,
        })
    }

    /// A model whose tensors are copies of `lookup("<role>.<key>")`, in `dtype`.
    pub fn from_lookup(
        cfg: &SslConfig,
        dtype: DType,
        mut lookup: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<Self> {
        Self::build(cfg, |name, _, _| {
            let Some(src) = lookup(name) else {
                candle_core::bail!("missing parameter `{name}`")
            };
            src.to_dtype(dtype)?.contiguous()?.copy()
        })
    }

    /// A copy sharing no storage.
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.deep_clone()?,
            dino_head: self.dino_head.deep_clone()?,
            ibot_head: self.ibot_head.deep_clone()?,
        })
    }

    /// The same model with its parameters cast to `dt` (see [`ParamSet::cast`]).
    pub fn cast(&self, dt: DType) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.cast(dt)?,
            dino_head: self.dino_head.cast(dt)?,
            ibot_head: self.ibot_head.cast(dt)?,
        })
    }

    /// The same model with its parameters on `dev`.
    pub fn to_device(&self, dev: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.to_device(dev)?,
            dino_head: self.dino_head.to_device(dev)?,
            ibot_head: self.ibot_head.to_device(dev)?,
        })
    }

    /// `(role, parameters)` for the three modules.
    pub fn modules(&self) -> [(&'static str, &ParamSet); 3] {
        [
            ("backbone", &self.backbone.params),
            ("dino_head", &self.dino_head.params),
            ("ibot_head", &self.ibot_head.params),
        ]
    }

    /// Mutable access to the three parameter sets.
    pub fn modules_mut(&mut self) -> [(&'static str, &mut ParamSet); 3] {
        [
            ("backbone", &mut self.backbone.params),
            ("dino_head", &mut self.dino_head.params),
            ("ibot_head", &mut self.ibot_head.params),
        ]
    }

    /// Scalar parameter count.
    pub fn numel(&self) -> usize {
        self.modules().iter().map(|(_, p)| p.numel()).sum()
    }

    /// The backbone config.
    pub fn vit_config(&self) -> &VitConfig {
        &self.backbone.cfg
    }

    /// The head configs.
    pub fn head_configs(&self) -> (&HeadConfig, &HeadConfig) {
        (&self.dino_head.cfg, &self.ibot_head.cfg)
    }
}

/// Gradients of the three student modules.
pub struct ModelGrads {
    /// Backbone gradients.
    pub backbone: Grads,
    /// DINO head gradients.
    pub dino_head: Grads,
    /// iBOT head gradients.
    pub ibot_head: Grads,
}

impl ModelGrads {
    /// `(role, grads)` in [`ROLES`] order.
    pub fn modules(&self) -> [(&'static str, &Grads); 3] {
        [
            ("backbone", &self.backbone),
            ("dino_head", &self.dino_head),
            ("ibot_head", &self.ibot_head),
        ]
    }
}

/// The teacher's targets for one batch.
pub struct TeacherTargets {
    /// Teacher class tokens `[2B, D]` (crop-major).
    pub cls: Tensor,
    /// Teacher DINO-head logits `[2B, K]`.
    pub dino_logits: Tensor,
    /// Sinkhorn-Knopp targets for the DINO loss `[2B, K]`.
    pub dino_probs: Tensor,
    /// Teacher iBOT-head logits at the masked positions `[M, K]`.
    pub ibot_logits: Tensor,
    /// Sinkhorn-Knopp targets for the iBOT loss `[M, K]`.
    pub ibot_probs: Tensor,
}

/// Computes the teacher targets from the teacher's global-crop features: class tokens
/// `[2B, D]` and patch tokens `[2B * P, D]`.
pub fn teacher_targets(
    teacher: &SslModel,
    cls: &Tensor,
    patches: &Tensor,
    mask_indices: &[usize],
    temp: f64,
    sk_iters: usize,
) -> Result<TeacherTargets> {
    teacher_targets_in(teacher, cls, patches, mask_indices, temp, sk_iters, None)
}

/// [`teacher_targets`] for one member of a data-parallel group: the Sinkhorn-Knopp
/// normalisations run over the whole group (`comm`; `None` or a group of one is the
/// single-process computation).
pub fn teacher_targets_in(
    teacher: &SslModel,
    cls: &Tensor,
    patches: &Tensor,
    mask_indices: &[usize],
    temp: f64,
    sk_iters: usize,
    comm: Option<&dyn crate::dist::Collective>,
) -> Result<TeacherTargets> {
    if let Some(comm) = comm.filter(|c| c.world() > 1) {
        // the collectives must be made in the same order on every member: one head
        // after the other, and the iBOT normalisation even where nothing is masked
        let mut reduce = |v: &mut [f64]| comm.all_reduce_sum(v);
        let dino_logits = teacher.dino_head.forward(cls)?;
        let dino_probs = loss::sinkhorn_knopp_group(&dino_logits, temp, sk_iters, &mut reduce)?;
        let masked = nn::index_rows(patches, mask_indices)?;
        let ibot_logits = teacher.ibot_head.forward(&masked)?;
        let ibot_probs = loss::sinkhorn_knopp_group(&ibot_logits, temp, sk_iters, &mut reduce)?;
        return Ok(TeacherTargets {
            cls: cls.clone(),
            dino_logits,
            dino_probs,
            ibot_logits,
            ibot_probs,
        });
    }
    // the two heads are independent: run them side by side on the compute pool
    let (dino, ibot) = ops::host::join(
        || -> Result<(Tensor, Tensor)> {
            let logits = teacher.dino_head.forward(cls)?;
            let probs = loss::sinkhorn_knopp(&logits, temp, sk_iters)?;
            Ok((logits, probs))
        },
        || -> Result<(Tensor, Tensor)> {
            let masked = nn::index_rows(patches, mask_indices)?;
            let logits = teacher.ibot_head.forward(&masked)?;
            let probs = if mask_indices.is_empty() {
                logits.clone()
            } else {
                loss::sinkhorn_knopp(&logits, temp, sk_iters)?
            };
            Ok((logits, probs))
        },
    );
    let ((dino_logits, dino_probs), (ibot_logits, ibot_probs)) = (dino?, ibot?);
    Ok(TeacherTargets {
        cls: cls.clone(),
        dino_logits,
        dino_probs,
        ibot_logits,
        ibot_probs,
    })
}

/// The student features the losses read.
pub struct StudentFeatures {
    /// Class tokens of the global crops `[2B, D]`.
    pub cls_global: Tensor,
    /// Class tokens of the local crops `[n_local * B, D]`.
    pub cls_local: Tensor,
    /// Patch tokens of the (masked) global crops `[2B * P, D]`.
    pub patch_global: Tensor,
}

/// Per-step weights of the loss terms (schedules already applied).
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    /// Weight of the Gram loss (0 disables it).
    pub gram: f64,
    /// Extra factor on the local DINO terms (`reweight_dino_local_loss`; 1 normally).
    pub local_dino: f64,
}

/// The loss values of one step.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LossTerms {
    /// DINO, local crops vs teacher global crops (mean).
    pub dino_local: f64,
    /// DINO, cross-pair global terms (mean).
    pub dino_global: f64,
    /// KoLeo, mean over the two global crops.
    pub koleo: f64,
    /// iBOT masked-patch loss.
    pub ibot: f64,
    /// Gram loss (0 when inactive).
    pub gram: f64,
    /// The weighted total.
    pub total: f64,
}

impl LossTerms {
    /// Whether every term is finite.
    pub fn is_finite(&self) -> bool {
        [
            self.dino_local,
            self.dino_global,
            self.koleo,
            self.ibot,
            self.gram,
            self.total,
        ]
        .iter()
        .all(|v| v.is_finite())
    }
}

/// Student head outputs, kept for inspection and parity checks.
pub struct HeadOutputs {
    /// DINO logits of the global crops `[2B, K]`.
    pub dino_global: Tensor,
    /// DINO logits of the local crops `[n_local * B, K]`.
    pub dino_local: Tensor,
    /// iBOT logits at the masked positions `[M, K]`.
    pub ibot: Tensor,
}

/// Gradients of the total loss with respect to the student features.
pub struct FeatureGradients {
    /// d / d cls_global.
    pub cls_global: Tensor,
    /// d / d cls_local.
    pub cls_local: Tensor,
    /// d / d patch_global.
    pub patch_global: Tensor,
}

/// Everything [`ssl_losses`] produces.
pub struct LossResult {
    /// Loss values.
    pub terms: LossTerms,
    /// Feature gradients.
    pub features: FeatureGradients,
    /// DINO head gradients.
    pub dino_head: Grads,
    /// iBOT head gradients.
    pub ibot_head: Grads,
    /// Student head outputs.
    pub heads: HeadOutputs,
}

/// Geometry of the crops in a batch.
#[derive(Clone, Copy, Debug)]
pub struct CropCounts {
    /// Images B.
    pub batch: usize,
    /// Local crops per image.
    pub n_local: usize,
}

/// The losses and their gradients, from features (`SSLMetaArch.compute_losses`).
#[allow(clippy::too_many_arguments)]
pub fn ssl_losses(
    cfg: &SslConfig,
    dino_head: &Head,
    ibot_head: &Head,
    s: &StudentFeatures,
    t: &TeacherTargets,
    gram_target: Option<&Tensor>,
    mask_indices: &[usize],
    masks_weight: &[f64],
    counts: CropCounts,
    w: LossWeights,
) -> Result<LossResult> {
    let lc = &cfg.loss;
    let b = counts.batch;
    let nl = counts.n_local;
    let n_global = 2;
    if s.cls_global.dim(0)? != n_global * b || s.cls_local.dim(0)? != nl * b {
        bail!(
            "ssl_losses: {} global / {} local class tokens for batch {b} with {nl} local crops",
            s.cls_global.dim(0)?,
            s.cls_local.dim(0)?
        )
    }
    if mask_indices.len() != masks_weight.len() {
        bail!(
            "ssl_losses: {} mask indices vs {} weights",
            mask_indices.len(),
            masks_weight.len()
        )
    }
    // loss scales for 2 global and nl local crops (official: global_terms / total_terms)
    let global_terms = (n_global * (n_global - 1)) as f64;
    let local_terms = (n_global * nl) as f64;
    let total_terms = global_terms + local_terms;
    let global_scale = global_terms / total_terms;
    let local_scale = local_terms / total_terms;

    // The DINO, KoLeo, iBOT and Gram terms are independent until their feature gradients
    // are summed: they run side by side on the compute pool, and the sums below happen in
    // a fixed order, so the result does not depend on scheduling.
    let dino_part = || -> Result<_> {
        // DINO: one head pass over all class tokens (global rows first, then local rows)
        let cls_all = nn::cat_rows(&[&s.cls_global, &s.cls_local])?;
        let (dino_logits, dino_cache): (Tensor, HeadCache) = dino_head.forward_train(&cls_all)?;
        let rows = n_global * b + nl * b;
        let mut pairs = vec![vec![]; rows];
        let mut gscale = vec![0.0; rows];
        let wg = 1.0 / (n_global * b) as f64;
        for c in 0..n_global {
            for i in 0..b {
                let r = c * b + i;
                for tc in 0..n_global {
                    if tc != c {
                        pairs[r].push((tc * b + i, wg));
                    }
                }
                gscale[r] = lc.dino_loss_weight * global_scale;
            }
        }
        let wl = 1.0 / (nl * n_global * b) as f64;
        for c in 0..nl {
            for i in 0..b {
                let r = n_global * b + c * b + i;
                for tc in 0..n_global {
                    pairs[r].push((tc * b + i, wl));
                }
                gscale[r] = lc.dino_loss_weight * local_scale * w.local_dino;
            }
        }
        let (row_losses, d_dino_logits) = loss::soft_cross_entropy(
            &dino_logits,
            &t.dino_probs,
            &pairs,
            lc.student_temp,
            &gscale,
        )?;
        let dino_global: f64 = row_losses[..n_global * b].iter().sum();
        let dino_local: f64 = row_losses[n_global * b..].iter().sum();
        let (d_cls_all, dino_grads) = dino_head.backward(dino_cache, &d_dino_logits)?;
        Ok((dino_logits, dino_global, dino_local, d_cls_all, dino_grads))
    };
    let koleo_part = || -> Result<_> {
        // KoLeo on each global crop's class tokens (official: weight * sum over the 2 crops)
        let mut koleo_sum = 0.0;
        let mut kgrads = vec![];
        for c in 0..n_global {
            let x = s.cls_global.narrow(0, c * b, b)?;
            let (l, g) = loss::koleo(&x)?;
            koleo_sum += l;
            kgrads.push(nn::scale(&g, lc.koleo_loss_weight)?);
        }
        let kg = nn::cat_rows(&kgrads.iter().collect::<Vec<_>>())?;
        Ok((koleo_sum / n_global as f64, kg))
    };
    let (_, d) = nn::rows_dim(&s.patch_global)?;
    let patch_rows = s.patch_global.dim(0)?;
    let ibot_part = || -> Result<_> {
        // iBOT on the masked patches, each weighted 1/(#masked in its crop), divided by 2B
        if mask_indices.is_empty() {
            let k = ibot_head.cfg.n_prototypes;
            let (dt, dev) = (s.patch_global.dtype(), s.patch_global.device());
            return Ok((
                0.0,
                Tensor::zeros((0, k), dt, dev)?,
                Grads::new(ibot_head.params.len()),
                Tensor::zeros((patch_rows, d), dt, dev)?,
            ));
        }
        let masked = nn::index_rows(&s.patch_global, mask_indices)?;
        let (logits, cache) = ibot_head.forward_train(&masked)?;
        let m = mask_indices.len();
        let pairs: Vec<Vec<(usize, f64)>> = (0..m)
            .map(|i| vec![(i, masks_weight[i] / (n_global * b) as f64)])
            .collect();
        let gs = vec![lc.ibot_loss_weight; m];
        let (ls, dl) =
            loss::soft_cross_entropy(&logits, &t.ibot_probs, &pairs, lc.student_temp, &gs)?;
        let (dm, g) = ibot_head.backward(cache, &dl)?;
        Ok((
            ls.iter().sum::<f64>(),
            logits,
            g,
            nn::index_rows_bwd(&dm, mask_indices, patch_rows)?,
        ))
    };
    let gram_part = || -> Result<Option<(f64, Tensor)>> {
        // Gram anchoring
        match gram_target {
            Some(tg) if w.gram != 0.0 => Ok(Some(loss::gram_loss(
                &s.patch_global,
                tg,
                n_global * b,
                lc.gram_per_image,
            )?)),
            _ => Ok(None),
        }
    };
    let ((dino_r, koleo_r), (ibot_r, gram_r)) = ops::host::join(
        || ops::host::join(dino_part, koleo_part),
        || ops::host::join(ibot_part, gram_part),
    );
    let (dino_logits, dino_global, dino_local, d_cls_all, dino_grads) = dino_r?;
    let (koleo, kg) = koleo_r?;
    let (ibot, ibot_logits, ibot_grads, d_patch) = ibot_r?;
    let d_cls_global = d_cls_all.narrow(0, 0, n_global * b)?;
    let d_cls_local = d_cls_all.narrow(0, n_global * b, nl * b)?.contiguous()?;
    let d_cls_global = nn::axpy(&d_cls_global.contiguous()?, &kg, 1.0)?;
    let (gram, d_patch) = match gram_r? {
        Some((l, g)) => (l, nn::axpy(&d_patch, &g, w.gram)?),
        None => (0.0, d_patch),
    };

    let total = lc.dino_loss_weight
        * (local_scale * w.local_dino * dino_local + global_scale * dino_global)
        + lc.koleo_loss_weight * n_global as f64 * koleo
        + lc.ibot_loss_weight * ibot
        + w.gram * gram;
    Ok(LossResult {
        terms: LossTerms {
            dino_local,
            dino_global,
            koleo,
            ibot,
            gram,
            total,
        },
        features: FeatureGradients {
            cls_global: d_cls_global,
            cls_local: d_cls_local,
            patch_global: d_patch,
        },
        dino_head: dino_grads,
        ibot_head: ibot_grads,
        heads: HeadOutputs {
            dino_global: dino_logits.narrow(0, 0, n_global * b)?,
            dino_local: dino_logits.narrow(0, n_global * b, nl * b)?,
            ibot: ibot_logits,
        },
    })
}
