//! The DINO / iBOT projection head (`dinov3/layers/dino_head.py`): an MLP with GELU to a
//! bottleneck, L2 normalisation (eps 1e-12), and a plain bias-free linear layer onto the
//! prototypes (no weight normalisation in DINOv3).

use candle_core::{bail, DType, Result, Tensor};

use crate::config::HeadConfig;
use crate::params::{init_tensor, Grads, Init, ParamSet};
use ops::nn;

/// A projection head and its parameters (`mlp.{0,2,4}.*`, `last_layer.weight`).
#[derive(Clone, Debug)]
pub struct Head {
    /// Sizes.
    pub cfg: HeadConfig,
    /// Input width.
    pub in_dim: usize,
    /// Parameters, named as the official `state_dict`.
    pub params: ParamSet,
    layers: Vec<(usize, usize)>,
    last: usize,
}

/// What [`Head::backward`] needs.
pub struct HeadCache {
    inputs: Vec<Tensor>,
    pre_act: Vec<Tensor>,
    y: Tensor,
    norms: Tensor,
}

impl Head {
    /// A head with the official initialisation (trunc-normal 0.02 weights, zero biases)
    /// drawn from `seed` under the name `role` (e.g. `dino_head`).
    pub fn init(
        cfg: &HeadConfig,
        in_dim: usize,
        role: &str,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(cfg, in_dim, |name, shape, init| {
            init_tensor(seed, &format!("{role}.{name}"), shape, init, dtype)
        })
    }

    /// Builds a head whose tensors come from `make(name, shape, init)`.
    pub fn build(
        cfg: &HeadConfig,
        in_dim: usize,
        mut make: impl FnMut(&str, &[usize], Init) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut ps = ParamSet::default();
        let mut layers = vec![];
        let nl = cfg.nlayers.max(1);
        for l in 0..nl {
            let i = if l == 0 { in_dim } else { cfg.hidden_dim };
            let o = if l == nl - 1 {
                cfg.bottleneck_dim
            } else {
                cfg.hidden_dim
            };
            let wname = format!("mlp.{}.weight", 2 * l);
            let bname = format!("mlp.{}.bias", 2 * l);
            let w = make(&wname, &[o, i], Init::TruncNormal)?;
            let b = make(&bname, &[o], Init::Const(0.0))?;
            if w.dims() != [o, i] || b.dims() != [o] {
                bail!(
                    "head layer {l}: unexpected shapes {:?} / {:?}",
                    w.dims(),
                    b.dims()
                )
            }
            layers.push((ps.push(wname, w), ps.push(bname, b)));
        }
        let lw = make(
            "last_layer.weight",
            &[cfg.n_prototypes, cfg.bottleneck_dim],
            Init::TruncNormal,
        )?;
        if lw.dims() != [cfg.n_prototypes, cfg.bottleneck_dim] {
            bail!(
                "head last layer: shape {:?}, expected {:?}",
                lw.dims(),
                [cfg.n_prototypes, cfg.bottleneck_dim]
            )
        }
        let last = ps.push("last_layer.weight", lw);
        Ok(Self {
            cfg: cfg.clone(),
            in_dim,
            params: ps,
            layers,
            last,
        })
    }

    /// The same head with a copy of the parameters.
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            in_dim: self.in_dim,
            params: self.params.deep_clone()?,
            layers: self.layers.clone(),
            last: self.last,
        })
    }

    /// The same head with its parameters cast to `dt` (see [`ParamSet::cast`]).
    pub fn cast(&self, dt: DType) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            in_dim: self.in_dim,
            params: self.params.cast(dt)?,
            layers: self.layers.clone(),
            last: self.last,
        })
    }

    /// The same head with its parameters on `dev`.
    pub fn to_device(&self, dev: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            in_dim: self.in_dim,
            params: self.params.to_device(dev)?,
            layers: self.layers.clone(),
            last: self.last,
        })
    }

    /// Index of `last_layer.weight` in the parameter set.
    pub fn last_layer_index(&self) -> usize {
        self.last
    }

    /// The L2-normalised bottleneck features `[rows, bottleneck]` (no prototype layer);
    /// what a distillation teacher shares with its students.
    pub fn bottleneck(&self, x: &Tensor) -> Result<Tensor> {
        let mut z = x.clone();
        let n = self.layers.len();
        for (l, &(w, b)) in self.layers.iter().enumerate() {
            z = nn::linear(&z, self.params.get(w), Some(self.params.get(b)))?;
            if l + 1 < n {
                z = nn::gelu(&z)?;
            }
        }
        Ok(nn::l2_normalize(&z, 1e-12)?.0)
    }

    /// Prototype scores of already-normalised bottleneck features.
    pub fn prototypes(&self, y: &Tensor) -> Result<Tensor> {
        nn::linear(y, self.params.get(self.last), None)
    }

    /// Logits `[rows, K]` in eval mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.prototypes(&self.bottleneck(x)?)
    }

    /// Logits and a cache for [`Head::backward`].
    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, HeadCache)> {
        let mut z = x.clone();
        let n = self.layers.len();
        let mut inputs = vec![];
        let mut pre_act = vec![];
        for (l, &(w, b)) in self.layers.iter().enumerate() {
            inputs.push(z.clone());
            let h = nn::linear(&z, self.params.get(w), Some(self.params.get(b)))?;
            if l + 1 < n {
                z = nn::gelu(&h)?;
                pre_act.push(h);
            } else {
                z = h;
            }
        }
        let (y, norms) = nn::l2_normalize(&z, 1e-12)?;
        let logits = nn::linear(&y, self.params.get(self.last), None)?;
        Ok((
            logits,
            HeadCache {
                inputs,
                pre_act,
                y,
                norms,
            },
        ))
    }

    /// Gradients of the parameters and of the input, given `d loss / d logits`.
    pub fn backward(&self, c: HeadCache, dlogits: &Tensor) -> Result<(Tensor, Grads)> {
        let mut grads = Grads::new(self.params.len());
        let (dy, dw, _) = nn::linear_bwd(&c.y, self.params.get(self.last), dlogits, true, false)?;
        grads.add(self.last, dw)?;
        let mut dz = nn::l2_normalize_bwd(&c.y, &c.norms, &dy.expect("dx requested"), 1e-12)?;
        let n = self.layers.len();
        for l in (0..n).rev() {
            let (w, b) = self.layers[l];
            let dh = if l + 1 < n {
                nn::gelu_bwd(&c.pre_act[l], &dz)?
            } else {
                dz
            };
            let (dx, dw, db) = nn::linear_bwd(&c.inputs[l], self.params.get(w), &dh, true, true)?;
            grads.add(w, dw)?;
            grads.add(b, db.expect("bias"))?;
            dz = dx.expect("dx requested");
        }
        Ok((dz, grads))
    }
}
