//! The DINOv3 vision transformer: patch embedding, `[CLS, registers, patches]` tokens,
//! pre-norm blocks with 2-D RoPE attention and LayerScale, batch-subset drop path, a final
//! LayerNorm. Parameter names are the official `state_dict` keys.
//!
//! Several crop groups (e.g. the masked global crops and the local crops) run through one
//! call, packed row-wise like the official `forward_features_list`: token-wise layers see
//! all groups at once, attention runs per group. Backward is explicit: the training
//! forward returns a cache that `backward` consumes.

use candle_core::{bail, DType, Result, Tensor};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::config::VitConfig;
use crate::params::{init_tensor, Grads, Init, ParamSet};
use ops::attention::{self, AttnCache, AttnGroup, Rope, SeqShape};
use ops::nn::{self, LnCache, RowBlocks};

#[derive(Clone, Debug)]
struct BlockIx {
    n1w: usize,
    n1b: usize,
    qkv_w: usize,
    qkv_b: Option<usize>,
    proj_w: usize,
    proj_b: Option<usize>,
    ls1: usize,
    n2w: usize,
    n2b: usize,
    fc1_w: usize,
    fc1_b: Option<usize>,
    fc2_w: usize,
    fc2_b: Option<usize>,
    ls2: usize,
}

impl BlockIx {
    /// Every parameter of the block.
    fn all(&self) -> Vec<usize> {
        let mut v = vec![
            self.n1w,
            self.n1b,
            self.qkv_w,
            self.proj_w,
            self.ls1,
            self.n2w,
            self.n2b,
            self.fc1_w,
            self.fc2_w,
            self.ls2,
        ];
        v.extend(
            [self.qkv_b, self.proj_b, self.fc1_b, self.fc2_b]
                .into_iter()
                .flatten(),
        );
        v.sort_unstable();
        v
    }
}

#[derive(Clone, Debug)]
struct VitIx {
    cls: usize,
    storage: Option<usize>,
    mask: usize,
    patch_w: usize,
    patch_b: usize,
    blocks: Vec<BlockIx>,
    norm_w: usize,
    norm_b: usize,
}

/// A ViT backbone and its parameters.
#[derive(Clone, Debug)]
pub struct Vit {
    /// Architecture.
    pub cfg: VitConfig,
    /// Parameters, named as the official `state_dict`.
    pub params: ParamSet,
    ix: VitIx,
}

/// One group of crops of equal size going through the backbone together.
#[derive(Clone, Copy)]
pub struct CropGroup<'a> {
    /// Images `[n, 3, H, W]`.
    pub images: &'a Tensor,
    /// iBOT masks `[n * P]` (1 = replace the patch by the mask token), or none.
    pub masks: Option<&'a [u8]>,
}

/// Where a group's tokens sit in the packed token matrix.
#[derive(Clone, Copy, Debug)]
pub struct GroupLayout {
    /// Images in the group.
    pub n: usize,
    /// Patch grid (rows, cols).
    pub grid: (usize, usize),
    /// Tokens per image (1 + registers + patches).
    pub tokens: usize,
    /// First row of the group in the packed matrix.
    pub row0: usize,
}

impl GroupLayout {
    /// Patches per image.
    pub fn patches(&self) -> usize {
        self.grid.0 * self.grid.1
    }
}

/// The backbone outputs after the final norm (`x_norm_*` in the official code).
pub struct Features {
    /// Every token of every group, `[sum_g n_g * tokens_g, D]`.
    pub x_norm: Tensor,
    /// Per-group layout.
    pub groups: Vec<GroupLayout>,
    /// CLS + registers.
    pub prefix: usize,
}

impl Features {
    /// Normalised CLS tokens of group `g`, `[n, D]`.
    pub fn cls(&self, g: usize) -> Result<Tensor> {
        let l = self.groups[g];
        nn::select_rows(&self.x_norm, l.n, l.tokens, l.row0, 1)
    }
    /// Normalised patch tokens of group `g`, `[n * P, D]` (image-major, row-major grid).
    pub fn patches(&self, g: usize) -> Result<Tensor> {
        let l = self.groups[g];
        nn::select_rows(
            &self.x_norm,
            l.n,
            l.tokens,
            l.row0 + self.prefix,
            l.patches(),
        )
    }
    /// Normalised register tokens of group `g`, `[n * R, D]`.
    pub fn storage(&self, g: usize) -> Result<Tensor> {
        let l = self.groups[g];
        nn::select_rows(&self.x_norm, l.n, l.tokens, l.row0 + 1, self.prefix - 1)
    }
}

/// Accumulates the gradient with respect to [`Features::x_norm`] from per-group pieces.
pub struct FeatureGrads {
    d: Tensor,
    groups: Vec<GroupLayout>,
    prefix: usize,
}

impl FeatureGrads {
    /// Zero gradient for these features.
    pub fn zeros(f: &Features) -> Result<Self> {
        Ok(Self {
            d: f.x_norm.zeros_like()?,
            groups: f.groups.clone(),
            prefix: f.prefix,
        })
    }
    /// Adds `g [n, D]` to the CLS rows of group `gi` (in place).
    pub fn add_cls(&mut self, gi: usize, g: &Tensor) -> Result<()> {
        let l = self.groups[gi];
        nn::select_rows_add_into(&self.d, g, l.n, l.tokens, l.row0, 1)
    }
    /// Adds `g [n * P, D]` to the patch rows of group `gi` (in place).
    pub fn add_patches(&mut self, gi: usize, g: &Tensor) -> Result<()> {
        let l = self.groups[gi];
        nn::select_rows_add_into(&self.d, g, l.n, l.tokens, l.row0 + self.prefix, l.patches())
    }
    /// The accumulated gradient.
    pub fn into_tensor(self) -> Tensor {
        self.d
    }
}

/// What one block's backward needs. `x` and `x1` are the residual stream entering the
/// attention and the MLP branch (shared with the previous block's output, not copied);
/// the branches' LayerNorms read their selected rows from them.
struct BlockCache {
    sel1: Option<RowBlocks>,
    sel2: Option<RowBlocks>,
    x: Tensor,
    ln1: LnCache,
    h1: Tensor,
    attn: Vec<AttnCache>,
    a: Tensor,
    o: Tensor,
    x1: Tensor,
    ln2: LnCache,
    h2: Tensor,
    u: Tensor,
    g: Tensor,
    m: Tensor,
}

/// What [`Vit::backward`] needs from a training forward.
pub struct VitCache {
    layouts: Vec<GroupLayout>,
    masks: Vec<Option<Vec<u8>>>,
    cols: Tensor,
    blocks: Vec<BlockCache>,
    x_last: Tensor,
    ln_final: LnCache,
}

/// Randomness of one training forward (drop path subsets, RoPE rescale), drawn from the
/// caller's stream.
enum Mode<'a> {
    Train(&'a mut ChaCha8Rng),
    Infer,
}

impl Vit {
    /// Builds a backbone with the official initialisation drawn from `seed`.
    pub fn init(cfg: &VitConfig, seed: u64, dtype: DType) -> Result<Self> {
        Self::build(cfg, |name, shape, init| {
            init_tensor(seed, &format!("backbone.{name}"), shape, init, dtype)
        })
    }

    /// Builds a backbone whose tensors come from `make(name, shape, init)`.
    pub fn build(
        cfg: &VitConfig,
        mut make: impl FnMut(&str, &[usize], Init) -> Result<Tensor>,
    ) -> Result<Self> {
        let d = cfg.embed_dim;
        let p = cfg.patch_size;
        let hid = cfg.hidden_dim();
        let mut ps = ParamSet::default();
        let mut add =
            |ps: &mut ParamSet, name: String, shape: &[usize], init: Init| -> Result<usize> {
                let t = make(&name, shape, init)?;
                if t.dims() != shape {
                    bail!(
                        "parameter {name}: got shape {:?}, expected {shape:?}",
                        t.dims()
                    )
                }
                Ok(ps.push(name, t))
            };
        let cls = add(&mut ps, "cls_token".into(), &[1, 1, d], Init::Normal(0.02))?;
        let storage = if cfg.n_storage_tokens > 0 {
            Some(add(
                &mut ps,
                "storage_tokens".into(),
                &[1, cfg.n_storage_tokens, d],
                Init::Normal(0.02),
            )?)
        } else {
            None
        };
        let mask = add(&mut ps, "mask_token".into(), &[1, d], Init::Const(0.0))?;
        let bound = 1.0 / ((3 * p * p) as f64).sqrt();
        let patch_w = add(
            &mut ps,
            "patch_embed.proj.weight".into(),
            &[d, 3, p, p],
            Init::Uniform(bound),
        )?;
        let patch_b = add(
            &mut ps,
            "patch_embed.proj.bias".into(),
            &[d],
            Init::Uniform(bound),
        )?;
        let mut blocks = vec![];
        for i in 0..cfg.depth {
            let b = |s: &str| format!("blocks.{i}.{s}");
            let n1w = add(&mut ps, b("norm1.weight"), &[d], Init::Const(1.0))?;
            let n1b = add(&mut ps, b("norm1.bias"), &[d], Init::Const(0.0))?;
            let qkv_w = add(
                &mut ps,
                b("attn.qkv.weight"),
                &[3 * d, d],
                Init::TruncNormal,
            )?;
            let qkv_b = if cfg.qkv_bias {
                Some(add(
                    &mut ps,
                    b("attn.qkv.bias"),
                    &[3 * d],
                    Init::Const(0.0),
                )?)
            } else {
                None
            };
            let proj_w = add(&mut ps, b("attn.proj.weight"), &[d, d], Init::TruncNormal)?;
            let proj_b = if cfg.proj_bias {
                Some(add(&mut ps, b("attn.proj.bias"), &[d], Init::Const(0.0))?)
            } else {
                None
            };
            let ls1 = add(
                &mut ps,
                b("ls1.gamma"),
                &[d],
                Init::Const(cfg.layerscale_init),
            )?;
            let n2w = add(&mut ps, b("norm2.weight"), &[d], Init::Const(1.0))?;
            let n2b = add(&mut ps, b("norm2.bias"), &[d], Init::Const(0.0))?;
            let fc1_w = add(&mut ps, b("mlp.fc1.weight"), &[hid, d], Init::TruncNormal)?;
            let fc1_b = if cfg.ffn_bias {
                Some(add(&mut ps, b("mlp.fc1.bias"), &[hid], Init::Const(0.0))?)
            } else {
                None
            };
            let fc2_w = add(&mut ps, b("mlp.fc2.weight"), &[d, hid], Init::TruncNormal)?;
            let fc2_b = if cfg.ffn_bias {
                Some(add(&mut ps, b("mlp.fc2.bias"), &[d], Init::Const(0.0))?)
            } else {
                None
            };
            let ls2 = add(
                &mut ps,
                b("ls2.gamma"),
                &[d],
                Init::Const(cfg.layerscale_init),
            )?;
            blocks.push(BlockIx {
                n1w,
                n1b,
                qkv_w,
                qkv_b,
                proj_w,
                proj_b,
                ls1,
                n2w,
                n2b,
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
                ls2,
            });
        }
        let norm_w = add(&mut ps, "norm.weight".into(), &[d], Init::Const(1.0))?;
        let norm_b = add(&mut ps, "norm.bias".into(), &[d], Init::Const(0.0))?;
        Ok(Self {
            cfg: cfg.clone(),
            params: ps,
            ix: VitIx {
                cls,
                storage,
                mask,
                patch_w,
                patch_b,
                blocks,
                norm_w,
                norm_b,
            },
        })
    }

    /// Element type of the parameters.
    pub fn dtype(&self) -> DType {
        self.params.get(0).dtype()
    }

    /// The same architecture with a copy of the parameters (no shared storage).
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            params: self.params.deep_clone()?,
            ix: self.ix.clone(),
        })
    }

    /// The same architecture with its parameters cast to `dt` (see [`ParamSet::cast`]).
    pub fn cast(&self, dt: DType) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            params: self.params.cast(dt)?,
            ix: self.ix.clone(),
        })
    }

    /// The same architecture with its parameters on `dev`.
    pub fn to_device(&self, dev: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            params: self.params.to_device(dev)?,
            ix: self.ix.clone(),
        })
    }

    /// The device the parameters live on.
    pub fn device(&self) -> candle_core::Device {
        self.params.get(0).device().clone()
    }

    /// The official non-trainable buffers (`rope_embed.periods`, `blocks.i.attn.qkv.bias_mask`)
    /// as `(name, tensor)`, for export and the name contract.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let dt = self.dtype();
        let dev = candle_core::Device::Cpu;
        let mut out = vec![];
        let periods = attention::rope_periods(self.cfg.head_dim(), self.cfg.rope_base);
        let q = periods.len();
        out.push((
            "rope_embed.periods".to_string(),
            Tensor::from_vec(periods, q, &dev)?.to_dtype(dt)?,
        ));
        if self.cfg.qkv_bias && self.cfg.mask_k_bias {
            for i in 0..self.cfg.depth {
                out.push((
                    format!("blocks.{i}.attn.qkv.bias_mask"),
                    Tensor::from_vec(self.bias_mask(), 3 * self.cfg.embed_dim, &dev)?
                        .to_dtype(dt)?,
                ));
            }
        }
        Ok(out)
    }

    fn bias_mask(&self) -> Vec<f64> {
        let d = self.cfg.embed_dim;
        (0..3 * d)
            .map(|i| {
                if self.cfg.mask_k_bias && (d..2 * d).contains(&i) {
                    0.0
                } else {
                    1.0
                }
            })
            .collect()
    }

    fn p(&self, i: usize) -> &Tensor {
        self.params.get(i)
    }

    fn qkv_bias(&self, bi: &BlockIx) -> Result<Option<Tensor>> {
        match bi.qkv_b {
            None => Ok(None),
            Some(i) if self.cfg.mask_k_bias => {
                let b = self.p(i);
                let mask = Tensor::from_vec(self.bias_mask(), b.dims(), b.device())?
                    .to_dtype(b.dtype())?;
                Ok(Some(b.mul(&mask)?))
            }
            Some(i) => Ok(Some(self.p(i).clone())),
        }
    }

    fn prefix(&self) -> usize {
        1 + self.cfg.n_storage_tokens
    }

    fn layouts(&self, groups: &[CropGroup<'_>]) -> Result<Vec<GroupLayout>> {
        let p = self.cfg.patch_size;
        let mut row0 = 0;
        let mut out = vec![];
        for g in groups {
            let (n, c, h, w) = g.images.dims4()?;
            if c != 3 {
                bail!("expected 3-channel images, got {c}")
            }
            if h % p != 0 || w % p != 0 {
                bail!("image size {h}x{w} is not a multiple of the patch size {p}")
            }
            let grid = (h / p, w / p);
            let tokens = self.prefix() + grid.0 * grid.1;
            if let Some(m) = g.masks {
                if m.len() != n * grid.0 * grid.1 {
                    bail!(
                        "mask has {} entries for {n} images of {} patches",
                        m.len(),
                        grid.0 * grid.1
                    )
                }
            }
            out.push(GroupLayout {
                n,
                grid,
                tokens,
                row0,
            });
            row0 += n * tokens;
        }
        Ok(out)
    }

    /// Patch embedding and token assembly for all groups: returns the packed tokens and the
    /// unfolded patches (kept for the weight gradient).
    fn embed(&self, groups: &[CropGroup<'_>], layouts: &[GroupLayout]) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.embed_dim;
        let p = self.cfg.patch_size;
        let cols: Vec<Tensor> = groups
            .iter()
            .map(|g| nn::im2col(g.images, p))
            .collect::<Result<_>>()?;
        let cols = if cols.len() == 1 {
            cols[0].clone()
        } else {
            Tensor::cat(&cols, 0)?
        };
        let w2 = self.p(self.ix.patch_w).reshape((d, 3 * p * p))?;
        let emb = nn::linear(&cols, &w2, Some(self.p(self.ix.patch_b)))?;
        let storage = match self.ix.storage {
            Some(i) => self.p(i).reshape((self.cfg.n_storage_tokens, d))?,
            None => Tensor::zeros((0, d), self.dtype(), self.p(0).device())?,
        };
        let cls = self.p(self.ix.cls).reshape(d)?;
        let mask = self.p(self.ix.mask).reshape(d)?;
        let mut toks = vec![];
        let mut off = 0;
        for (g, l) in groups.iter().zip(layouts) {
            let e = emb.narrow(0, off, l.n * l.patches())?;
            off += l.n * l.patches();
            toks.push(nn::assemble_tokens(
                &e, l.n, &cls, &storage, &mask, g.masks,
            )?);
        }
        let x = if toks.len() == 1 {
            toks.pop().unwrap()
        } else {
            Tensor::cat(&toks, 0)?
        };
        Ok((x, cols))
    }

    fn ropes(&self, layouts: &[GroupLayout], rescale: &[f64]) -> Result<Vec<Rope>> {
        let dev = self.device();
        layouts
            .iter()
            .zip(rescale)
            .map(|(l, &s)| {
                let r = attention::rope_tables(
                    l.grid.0,
                    l.grid.1,
                    self.cfg.head_dim(),
                    self.cfg.rope_base,
                    s,
                    self.dtype(),
                )?;
                if dev.is_cpu() {
                    Ok(r)
                } else {
                    // once per forward, not once per block
                    Ok(Rope {
                        sin: r.sin.to_device(&dev)?,
                        cos: r.cos.to_device(&dev)?,
                    })
                }
            })
            .collect()
    }

    /// Backbone forward in eval mode (teacher, Gram teacher, probes): no drop path, no
    /// RoPE augmentation, nothing kept for a backward pass.
    pub fn forward(&self, groups: &[CropGroup<'_>]) -> Result<Features> {
        Ok(self.run(groups, Mode::Infer, None)?.0)
    }

    /// Eval-mode forward that also returns the residual stream entering block 0 and after
    /// every block (`[tokens_in, block0, ..]`), for parity checks.
    pub fn forward_traced(&self, groups: &[CropGroup<'_>]) -> Result<(Features, Vec<Tensor>)> {
        let mut trace = vec![];
        let f = self.run(groups, Mode::Infer, Some(&mut trace))?.0;
        Ok((f, trace))
    }

    /// Backbone forward in training mode: drop path and RoPE rescale drawn from `rng`.
    pub fn forward_train(
        &self,
        groups: &[CropGroup<'_>],
        rng: &mut ChaCha8Rng,
    ) -> Result<(Features, VitCache)> {
        let (f, c) = self.run(groups, Mode::Train(rng), None)?;
        Ok((f, c.expect("training forward keeps a cache")))
    }

    fn run(
        &self,
        groups: &[CropGroup<'_>],
        mut mode: Mode<'_>,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<(Features, Option<VitCache>)> {
        let layouts = self.layouts(groups)?;
        let (mut x, cols) = self.embed(groups, &layouts)?;
        if let Some(t) = trace.as_mut() {
            t.push(x.clone());
        }
        let ones = vec![1.0; layouts.len()];
        let fixed_ropes = self.ropes(&layouts, &ones)?;
        let mut caches = vec![];
        for bi in &self.ix.blocks {
            let (x2, cache) = match &mut mode {
                Mode::Infer => (self.block_infer(bi, &x, &layouts, &fixed_ropes)?, None),
                Mode::Train(rng) => {
                    let ropes = match self.cfg.rope_rescale {
                        Some(r) if r > 1.0 => {
                            let lr = r.ln();
                            let s: Vec<f64> = layouts
                                .iter()
                                .map(|_| rng.random_range(-lr..lr).exp())
                                .collect();
                            self.ropes(&layouts, &s)?
                        }
                        _ => fixed_ropes.clone(),
                    };
                    let (x2, c) = self.block_train(bi, &x, &layouts, &ropes, rng)?;
                    (x2, Some(c))
                }
            };
            if let Some(c) = cache {
                caches.push(c);
            }
            x = x2;
            if let Some(t) = trace.as_mut() {
                t.push(x.clone());
            }
        }
        let (xn, lnc) = nn::layer_norm(
            &x,
            self.p(self.ix.norm_w),
            self.p(self.ix.norm_b),
            self.cfg.layernorm_eps,
        )?;
        let feats = Features {
            x_norm: xn,
            groups: layouts.clone(),
            prefix: self.prefix(),
        };
        let cache = match mode {
            Mode::Infer => None,
            Mode::Train(_) => Some(VitCache {
                layouts,
                masks: groups.iter().map(|g| g.masks.map(|m| m.to_vec())).collect(),
                cols,
                blocks: caches,
                x_last: x,
                ln_final: lnc,
            }),
        };
        Ok((feats, cache))
    }

    fn attn_groups<'a>(&self, sub: &[(usize, usize)], ropes: &'a [Rope]) -> Vec<AttnGroup<'a>> {
        let mut row0 = 0;
        sub.iter()
            .zip(ropes)
            .map(|(&(n, tokens), rope)| {
                let shape = SeqShape {
                    batch: n,
                    tokens,
                    prefix: self.prefix(),
                    heads: self.cfg.num_heads,
                };
                let g = AttnGroup {
                    row0,
                    shape,
                    rope: Some(rope),
                };
                row0 += n * tokens;
                g
            })
            .collect()
    }

    fn block_infer(
        &self,
        bi: &BlockIx,
        x: &Tensor,
        layouts: &[GroupLayout],
        ropes: &[Rope],
    ) -> Result<Tensor> {
        let eps = self.cfg.layernorm_eps;
        // every bias is added by the op that consumes the product (attention, GELU,
        // residual), saving a pass over each output
        let (h, _) = nn::layer_norm(x, self.p(bi.n1w), self.p(bi.n1b), eps)?;
        let qkv = nn::linear(&h, self.p(bi.qkv_w), None)?;
        let sub: Vec<(usize, usize)> = layouts.iter().map(|l| (l.n, l.tokens)).collect();
        let qkv_b = self.qkv_bias(bi)?;
        let a = attention::attention_groups_infer(
            &qkv,
            qkv_b.as_ref(),
            &self.attn_groups(&sub, ropes),
        )?;
        let o = nn::linear(&a, self.p(bi.proj_w), None)?;
        let x = nn::residual_add(x, None, self.p(bi.ls1), &o, bi.proj_b.map(|i| self.p(i)))?;
        let (h2, _) = nn::layer_norm(&x, self.p(bi.n2w), self.p(bi.n2b), eps)?;
        let u = nn::linear(&h2, self.p(bi.fc1_w), None)?;
        let g = nn::gelu_bias(&u, bi.fc1_b.map(|i| self.p(i)))?;
        let m = nn::linear(&g, self.p(bi.fc2_w), None)?;
        nn::residual_add(&x, None, self.p(bi.ls2), &m, bi.fc2_b.map(|i| self.p(i)))
    }

    /// Draws the batch subset of one residual branch for every group (official
    /// `randperm(b)[:max(int(b * (1 - p)), 1)]`), or `None` without drop path.
    fn draw_subset(
        &self,
        layouts: &[GroupLayout],
        rng: &mut ChaCha8Rng,
    ) -> (Option<RowBlocks>, Vec<(usize, usize)>) {
        let p = self.cfg.drop_path;
        if p <= 0.0 {
            return (None, layouts.iter().map(|l| (l.n, l.tokens)).collect());
        }
        let mut sel = RowBlocks {
            starts: vec![],
            lens: vec![],
            scales: vec![],
        };
        let mut sub = vec![];
        for l in layouts {
            let k = ((l.n as f64 * (1.0 - p)) as usize).max(1);
            let mut idx: Vec<usize> = (0..l.n).collect();
            for i in 0..k {
                let j = rng.random_range(i..l.n);
                idx.swap(i, j);
            }
            let mut chosen = idx[..k].to_vec();
            chosen.sort_unstable();
            for s in chosen {
                sel.starts.push(l.row0 + s * l.tokens);
                sel.lens.push(l.tokens);
                sel.scales.push(l.n as f64 / k as f64);
            }
            sub.push((k, l.tokens));
        }
        (Some(sel), sub)
    }

    fn block_train(
        &self,
        bi: &BlockIx,
        x: &Tensor,
        layouts: &[GroupLayout],
        ropes: &[Rope],
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor, BlockCache)> {
        let eps = self.cfg.layernorm_eps;
        // attention branch on a batch subset per group (gathered by the LayerNorm)
        let (sel1, sub1) = self.draw_subset(layouts, rng);
        // (biases are added by the consumers of the products, as in `block_infer`)
        let (h1, ln1) = nn::layer_norm_sel(x, sel1.as_ref(), self.p(bi.n1w), self.p(bi.n1b), eps)?;
        let qkv = nn::linear(&h1, self.p(bi.qkv_w), None)?;
        let qkv_b = self.qkv_bias(bi)?;
        let (a, attn) =
            attention::attention_groups(&qkv, qkv_b.as_ref(), &self.attn_groups(&sub1, ropes))?;
        let o = nn::linear(&a, self.p(bi.proj_w), None)?;
        let x1 = nn::residual_add(
            x,
            sel1.as_ref(),
            self.p(bi.ls1),
            &o,
            bi.proj_b.map(|i| self.p(i)),
        )?;
        // MLP branch on another subset
        let (sel2, _) = self.draw_subset(layouts, rng);
        let (h2, ln2) =
            nn::layer_norm_sel(&x1, sel2.as_ref(), self.p(bi.n2w), self.p(bi.n2b), eps)?;
        let u = nn::linear(&h2, self.p(bi.fc1_w), None)?;
        let g = nn::gelu_bias(&u, bi.fc1_b.map(|i| self.p(i)))?;
        let m = nn::linear(&g, self.p(bi.fc2_w), None)?;
        let x2 = nn::residual_add(
            &x1,
            sel2.as_ref(),
            self.p(bi.ls2),
            &m,
            bi.fc2_b.map(|i| self.p(i)),
        )?;
        let cache = BlockCache {
            sel1,
            sel2,
            x: x.clone(),
            ln1,
            h1,
            attn,
            a,
            o,
            x1,
            ln2,
            h2,
            u,
            g,
            m,
        };
        Ok((x2, cache))
    }

    /// Backward of one block. `dx` (the gradient with respect to the block output) is
    /// updated in place into the gradient with respect to the block input: the residual
    /// path passes it through and each branch's LayerNorm adds its part onto its rows.
    ///
    /// The weight gradients are off the critical path (nothing downstream reads them), so
    /// each runs side by side with the next memory-bound step of the input-gradient chain
    /// (GELU, LayerNorm and attention backward), keeping both cores busy. Every result is
    /// computed the same way whichever thread runs it.
    fn block_backward(
        &self,
        bi: &BlockIx,
        c: BlockCache,
        dx: Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let p = |i: usize| self.p(i);
        let fc1_b = bi.fc1_b.map(p);
        // MLP branch: residual -> fc2 -> GELU -> fc1 -> LayerNorm
        let (dm, dls2, db2) =
            nn::residual_add_bwd(&dx, c.sel2.as_ref(), p(bi.ls2), &c.m, bi.fc2_b.map(p))?;
        let dg = nn::linear_dx(&dm, p(bi.fc2_w), c.g.shape())?;
        let (dw2, gelu) = ops::host::join(
            || nn::linear_dw(&c.g, &dm),
            || nn::gelu_bias_bwd_into(&c.u, fc1_b, dg),
        );
        let (du, db1) = gelu?;
        drop((c.g, c.u, dm));
        let dh2 = nn::linear_dx(&du, p(bi.fc1_w), c.h2.shape())?;
        // attention branch: LayerNorm (MLP) -> residual -> proj, beside dW1
        let (dw1, chain) = ops::host::join(
            || nn::linear_dw(&c.h2, &du),
            || -> Result<_> {
                let ln2 = nn::layer_norm_sel_bwd_into(
                    &c.x1,
                    c.sel2.as_ref(),
                    p(bi.n2w),
                    &c.ln2,
                    &dh2,
                    &dx,
                )?;
                let res1 =
                    nn::residual_add_bwd(&dx, c.sel1.as_ref(), p(bi.ls1), &c.o, bi.proj_b.map(p))?;
                let da = nn::linear_dx(&res1.0, p(bi.proj_w), c.a.shape())?;
                Ok((ln2, res1, da))
            },
        );
        let ((dn2w, dn2b), (d_o, dls1, dbp), da) = chain?;
        drop((du, dh2));
        let (dwp, dqkv) = ops::host::join(
            || nn::linear_dw(&c.a, &d_o),
            || attention::attention_groups_bwd(&c.attn, &da),
        );
        let dqkv = dqkv?;
        drop((c.attn, da, d_o));
        let dh1 = nn::linear_dx(&dqkv, p(bi.qkv_w), c.h1.shape())?;
        let (wq, ln1) = ops::host::join(
            || -> Result<_> {
                let db = bi.qkv_b.map(|_| nn::col_sums(&dqkv)).transpose()?;
                Ok((nn::linear_dw(&c.h1, &dqkv)?, db))
            },
            || nn::layer_norm_sel_bwd_into(&c.x, c.sel1.as_ref(), p(bi.n1w), &c.ln1, &dh1, &dx),
        );
        let ((dwq, dbq), (dn1w, dn1b)) = (wq?, ln1?);
        // gradients in a fixed order
        grads.add(bi.ls2, dls2)?;
        grads.add(bi.fc2_w, dw2?)?;
        if let (Some(i), Some(db)) = (bi.fc2_b, db2) {
            grads.add(i, db)?;
        }
        grads.add(bi.fc1_w, dw1?)?;
        if let (Some(i), Some(db)) = (bi.fc1_b, db1) {
            grads.add(i, db)?;
        }
        grads.add(bi.n2w, dn2w)?;
        grads.add(bi.n2b, dn2b)?;
        grads.add(bi.ls1, dls1)?;
        grads.add(bi.proj_w, dwp?)?;
        if let (Some(i), Some(db)) = (bi.proj_b, dbp) {
            grads.add(i, db)?;
        }
        grads.add(bi.qkv_w, dwq)?;
        if let (Some(i), Some(dbq)) = (bi.qkv_b, dbq) {
            let db = if self.cfg.mask_k_bias {
                let mask = Tensor::from_vec(self.bias_mask(), dbq.dims(), dbq.device())?
                    .to_dtype(dbq.dtype())?;
                dbq.mul(&mask)?
            } else {
                dbq
            };
            grads.add(i, db)?;
        }
        grads.add(bi.n1w, dn1w)?;
        grads.add(bi.n1b, dn1b)?;
        Ok(dx)
    }

    /// Gradients of every parameter given the gradient of the loss with respect to
    /// [`Features::x_norm`].
    pub fn backward(&self, cache: VitCache, d_xnorm: &Tensor) -> Result<Grads> {
        self.backward_observed(cache, d_xnorm, &mut |_, _| Ok(()))
    }

    /// [`Vit::backward`], calling `ready(grads, indices)` as soon as the gradients of
    /// the parameters `indices` are final: the final norm's, then each block's from the
    /// last, then the embeddings' and tokens'. `ready` may take those gradients out of
    /// `grads` (the pass does not read or write them again); a data-parallel member
    /// averages them over its group meanwhile, as DDP's gradient buckets.
    pub fn backward_observed(
        &self,
        cache: VitCache,
        d_xnorm: &Tensor,
        ready: &mut dyn FnMut(&mut Grads, &[usize]) -> Result<()>,
    ) -> Result<Grads> {
        let mut grads = Grads::new(self.params.len());
        let (mut dx, dnw, dnb) = nn::layer_norm_bwd(
            &cache.x_last,
            self.p(self.ix.norm_w),
            &cache.ln_final,
            d_xnorm,
        )?;
        grads.add(self.ix.norm_w, dnw)?;
        grads.add(self.ix.norm_b, dnb)?;
        ready(&mut grads, &[self.ix.norm_w, self.ix.norm_b])?;
        for (bi, bc) in self.ix.blocks.iter().zip(cache.blocks).rev() {
            dx = self.block_backward(bi, bc, dx, &mut grads)?;
            ready(&mut grads, &bi.all())?;
        }
        // token assembly and patch embedding
        let d = self.cfg.embed_dim;
        let r = self.cfg.n_storage_tokens;
        let mut dpatches = vec![];
        let mut dcls: Option<Tensor> = None;
        let mut dst: Option<Tensor> = None;
        let mut dmask: Option<Tensor> = None;
        let acc = |slot: &mut Option<Tensor>, t: Tensor| -> Result<()> {
            *slot = Some(match slot.take() {
                None => t,
                Some(p) => nn::axpy(&p, &t, 1.0)?,
            });
            Ok(())
        };
        for (l, m) in cache.layouts.iter().zip(&cache.masks) {
            let g = dx.narrow(0, l.row0, l.n * l.tokens)?;
            let (dp, dc, ds, dm) = nn::assemble_tokens_bwd(&g, l.n, r, m.as_deref())?;
            dpatches.push(dp);
            acc(&mut dcls, dc)?;
            acc(&mut dst, ds)?;
            acc(&mut dmask, dm)?;
        }
        let dp = if dpatches.len() == 1 {
            dpatches.pop().unwrap()
        } else {
            Tensor::cat(&dpatches, 0)?
        };
        let p = self.cfg.patch_size;
        let w2 = self.p(self.ix.patch_w).reshape((d, 3 * p * p))?;
        let (_, dw, db) = nn::linear_bwd(&cache.cols, &w2, &dp, false, true)?;
        grads.add(self.ix.patch_w, dw.reshape((d, 3, p, p))?)?;
        grads.add(self.ix.patch_b, db.expect("patch bias"))?;
        grads.add(
            self.ix.cls,
            dcls.expect("at least one group").reshape((1, 1, d))?,
        )?;
        if let Some(i) = self.ix.storage {
            grads.add(i, dst.expect("at least one group").reshape((1, r, d))?)?;
        }
        grads.add(
            self.ix.mask,
            dmask.expect("at least one group").reshape((1, d))?,
        )?;
        let mut last = vec![self.ix.cls, self.ix.mask, self.ix.patch_w, self.ix.patch_b];
        last.extend(self.ix.storage);
        last.sort_unstable();
        ready(&mut grads, &last)?;
        Ok(grads)
    }

    /// The layer id of a parameter for layer-wise LR decay: 0 for the embeddings and
    /// tokens, `i + 1` for block `i`, `depth + 1` for the final norm.
    pub fn layer_id(&self, name: &str) -> usize {
        if let Some(rest) = name.strip_prefix("blocks.") {
            rest.split('.')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .map(|i| i + 1)
                .unwrap_or(0)
        } else if name.starts_with("norm") {
            self.cfg.depth + 1
        } else {
            0
        }
    }
}
