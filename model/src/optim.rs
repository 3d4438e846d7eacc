//! Our own AdamW (candle's cannot be saved): official parameter groups (no weight decay on
//! biases, norms and LayerScale; layer-wise LR decay; patch-embedding LR x0.2; the heads'
//! `last_layer` on its own LR schedule), per-module gradient clipping, and the EMA update
//! of the teacher. The moments are plain host vectors so a checkpoint can store and
//! restore them bit for bit.

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::OptimConfig;
use crate::params::{Grads, ParamSet};
use ops::optim::{adamw_update, AdamWStep};

/// Optimizer treatment of one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// Multiplier on the scheduled LR.
    pub lr_multiplier: f64,
    /// Multiplier on the scheduled weight decay.
    pub wd_multiplier: f64,
    /// Uses the last-layer LR (0 while the last layer is frozen).
    pub is_last_layer: bool,
}

/// The official group of a parameter (`dinov3/train/param_groups.py`).
/// `layer_id`/`depth` only matter for backbone parameters (`is_backbone`).
pub fn param_group(
    name: &str,
    is_backbone: bool,
    layer_id: usize,
    depth: usize,
    cfg: &OptimConfig,
) -> ParamGroup {
    let wd_multiplier = if name.ends_with("bias") || name.contains("norm") || name.contains("gamma")
    {
        0.0
    } else {
        1.0
    };
    let mut lr_multiplier = if is_backbone {
        cfg.layerwise_decay
            .powi((depth + 1 - layer_id.min(depth + 1)) as i32)
    } else {
        1.0
    };
    if is_backbone && name.contains("patch_embed") {
        lr_multiplier *= cfg.patch_embed_lr_mult;
    }
    ParamGroup {
        lr_multiplier,
        wd_multiplier,
        is_last_layer: name.contains("last_layer"),
    }
}

/// First and second moments of one parameter.
#[derive(Clone, Debug)]
pub enum Moments {
    /// f32 training.
    F32 {
        /// exp_avg
        m: Vec<f32>,
        /// exp_avg_sq
        v: Vec<f32>,
    },
    /// f64 (fixture tests).
    F64 {
        /// exp_avg
        m: Vec<f64>,
        /// exp_avg_sq
        v: Vec<f64>,
    },
    /// Beside a parameter that lives off the host (or on the host while
    /// `ops::portable::set_force_on_cpu` is on): tensors of the parameter's shape, type and
    /// device. Each update replaces them with new tensors (never writes in place), so a
    /// clone keeps its values.
    Tensors {
        /// exp_avg
        m: Tensor,
        /// exp_avg_sq
        v: Tensor,
    },
}

impl PartialEq for Moments {
    /// Equal values (bit for bit for the host variants; element-wise for tensors).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::F32 { m, v }, Self::F32 { m: m2, v: v2 }) => m == m2 && v == v2,
            (Self::F64 { m, v }, Self::F64 { m: m2, v: v2 }) => m == m2 && v == v2,
            (Self::Tensors { m, v }, Self::Tensors { m: m2, v: v2 }) => {
                let host = |t: &Tensor| {
                    t.flatten_all()
                        .and_then(|t| t.to_dtype(DType::F64))
                        .and_then(|t| t.to_vec1::<f64>())
                };
                matches!((host(m), host(m2)), (Ok(a), Ok(b)) if a == b)
                    && matches!((host(v), host(v2)), (Ok(a), Ok(b)) if a == b)
            }
            _ => false,
        }
    }
}

impl Moments {
    /// Zero moments for a parameter of `n` elements.
    pub fn zeros(n: usize, dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }),
            DType::F64 => Ok(Self::F64 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }),
            d => bail!("optimizer state in {d:?} is not supported"),
        }
    }
    /// Zero moments for `param`: host vectors for a host parameter, tensors beside it
    /// otherwise (see [`Moments::Tensors`]).
    pub fn zeros_like(param: &Tensor) -> Result<Self> {
        if ops::portable::active(param) {
            Ok(Self::Tensors {
                m: param.zeros_like()?,
                v: param.zeros_like()?,
            })
        } else {
            Self::zeros(param.elem_count(), param.dtype())
        }
    }

    /// The same moments placed for `param` (see [`Moments::zeros_like`]): host vectors
    /// for a host parameter, tensors of its shape on its device otherwise.
    pub fn placed_for(&self, param: &Tensor) -> Result<Self> {
        let (m, v) = self.to_tensors(param.dims())?;
        if ops::portable::active(param) {
            Ok(Self::Tensors {
                m: m.to_dtype(param.dtype())?.to_device(param.device())?,
                v: v.to_dtype(param.dtype())?.to_device(param.device())?,
            })
        } else {
            Self::from_tensors(&m, &v, param.dtype())
        }
    }

    /// Moments from tensors (e.g. a checkpoint), converted to `dtype`.
    pub fn from_tensors(m: &Tensor, v: &Tensor, dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::F32 {
                m: ops::host::to_vec(m)?,
                v: ops::host::to_vec(v)?,
            }),
            DType::F64 => Ok(Self::F64 {
                m: ops::host::to_vec(m)?,
                v: ops::host::to_vec(v)?,
            }),
            d => bail!("optimizer state in {d:?} is not supported"),
        }
    }
    /// The moments as two CPU tensors of `shape`.
    pub fn to_tensors(&self, shape: &[usize]) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Self::Tensors { m, v } => (
                m.to_device(&candle_core::Device::Cpu)?
                    .reshape(shape)?
                    .copy()?,
                v.to_device(&candle_core::Device::Cpu)?
                    .reshape(shape)?
                    .copy()?,
            ),
            Self::F32 { m, v } => (
                ops::host::from_vec(m.clone(), shape)?,
                ops::host::from_vec(v.clone(), shape)?,
            ),
            Self::F64 { m, v } => (
                ops::host::from_vec(m.clone(), shape)?,
                ops::host::from_vec(v.clone(), shape)?,
            ),
        })
    }
}

/// AdamW state of one module.
#[derive(Clone, Debug)]
pub struct ModuleOptim {
    /// Group of each parameter (aligned with the module's [`ParamSet`]).
    pub groups: Vec<ParamGroup>,
    /// Moments of each parameter.
    pub moments: Vec<Moments>,
}

/// The whole optimizer: one [`ModuleOptim`] per student module plus the step count.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Settings.
    pub cfg: OptimConfig,
    /// Updates taken so far (the next update uses `t + 1` for bias correction).
    pub t: u64,
    /// Per-module state, in [`crate::ssl::ROLES`] order.
    pub modules: Vec<ModuleOptim>,
}

/// Learning rates and decay for one update (schedules already applied).
#[derive(Clone, Copy, Debug)]
pub struct OptimHparams {
    /// Scheduled LR.
    pub lr: f64,
    /// LR of the heads' last layers (0 while frozen).
    pub last_layer_lr: f64,
    /// Scheduled weight decay.
    pub weight_decay: f64,
}

/// Result of clipping one module's gradients.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ClipStat {
    /// Gradient norm before clipping.
    pub total_norm: f64,
    /// Factor applied (`min(1, max_norm / (norm + 1e-6))`).
    pub coef: f64,
}

/// Clips one module's gradients in place to `max_norm` (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_module(grads: &Grads, max_norm: f64) -> Result<ClipStat> {
    let total_norm = grads.sum_sq()?.sqrt();
    let coef = (max_norm / (total_norm + 1e-6)).min(1.0);
    apply_clip_coef(grads, coef)?;
    Ok(ClipStat { total_norm, coef })
}

/// Scales one module's gradients by a clipping factor ([`ClipStat::coef`]); a factor of 1
/// leaves them untouched.
pub fn apply_clip_coef(grads: &Grads, coef: f64) -> Result<()> {
    if coef < 1.0 {
        grads.scale(coef)?;
    }
    Ok(())
}

impl AdamW {
    /// Fresh state for modules `(is_backbone, params, depth)`.
    pub fn new(
        cfg: &OptimConfig,
        modules: &[(bool, &ParamSet, usize)],
        layer_id: impl Fn(&str) -> usize,
    ) -> Result<Self> {
        let mut out = vec![];
        for &(is_backbone, ps, depth) in modules {
            let groups = ps
                .names()
                .iter()
                .map(|n| param_group(n, is_backbone, layer_id(n), depth, cfg))
                .collect();
            let moments = ps
                .tensors()
                .iter()
                .map(Moments::zeros_like)
                .collect::<Result<_>>()?;
            out.push(ModuleOptim { groups, moments });
        }
        Ok(Self {
            cfg: cfg.clone(),
            t: 0,
            modules: out,
        })
    }

    /// One update of every parameter that has a gradient; increments `t`.
    pub fn step(&mut self, params: &[&ParamSet], grads: &[&Grads], h: &OptimHparams) -> Result<()> {
        if params.len() != self.modules.len() || grads.len() != self.modules.len() {
            bail!(
                "optimizer has {} modules, got {} parameter sets",
                self.modules.len(),
                params.len()
            )
        }
        self.t += 1;
        for ((ps, gs), st) in params.iter().zip(grads).zip(self.modules.iter_mut()) {
            for (i, t) in ps.tensors().iter().enumerate() {
                let Some(g) = gs.get(i) else { continue };
                // mixed precision: half gradients are widened to the master type
                let widened;
                let g = if g.dtype() != t.dtype() {
                    widened = g.to_dtype(t.dtype())?;
                    &widened
                } else {
                    g
                };
                let grp = st.groups[i];
                let lr = if grp.is_last_layer {
                    h.last_layer_lr
                } else {
                    h.lr
                } * grp.lr_multiplier;
                let step = AdamWStep {
                    lr,
                    weight_decay: h.weight_decay * grp.wd_multiplier,
                    beta1: self.cfg.beta1,
                    beta2: self.cfg.beta2,
                    eps: self.cfg.eps,
                    t: self.t,
                };
                match &mut st.moments[i] {
                    Moments::F32 { m, v } => adamw_update::<f32>(t, g, m, v, &step)?,
                    Moments::F64 { m, v } => adamw_update::<f64>(t, g, m, v, &step)?,
                    Moments::Tensors { m, v } => {
                        ops::optim::adamw_update_tensors(t, g, m, v, &step)?
                    }
                }
            }
        }
        Ok(())
    }
}

impl AdamW {
    /// The same state with every module's moments placed for `params` (aligned with
    /// [`AdamW::modules`]; see [`Moments::placed_for`]).
    pub fn placed_for(&self, params: &[&ParamSet]) -> Result<Self> {
        if params.len() != self.modules.len() {
            bail!(
                "optimizer has {} modules, got {} parameter sets",
                self.modules.len(),
                params.len()
            )
        }
        let modules = self
            .modules
            .iter()
            .zip(params)
            .map(|(st, ps)| {
                Ok(ModuleOptim {
                    groups: st.groups.clone(),
                    moments: st
                        .moments
                        .iter()
                        .zip(ps.tensors())
                        .map(|(mo, t)| mo.placed_for(t))
                        .collect::<Result<_>>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            t: self.t,
            modules,
        })
    }
}

/// `teacher <- m * teacher + (1 - m) * student` for every parameter of one module.
pub fn ema(teacher: &ParamSet, student: &ParamSet, momentum: f64) -> Result<()> {
    for (t, s) in teacher.tensors().iter().zip(student.tensors()) {
        ops::optim::ema_update(t, s, momentum)?;
    }
    Ok(())
}
