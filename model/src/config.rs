//! Typed architecture and recipe settings owned by the model: the ViT, its heads, the
//! loss weights and the optimizer. Presets follow `dinov3/models/vision_transformer.py`;
//! every field can be overridden from a TOML recipe. Validation reports every problem at
//! once.

use serde::{Deserialize, Serialize};

/// The backbone architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Token width D.
    pub embed_dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads (D must divide by 4 * heads for RoPE).
    pub num_heads: usize,
    /// MLP hidden width = ffn_ratio * D.
    #[serde(default = "d_ffn_ratio")]
    pub ffn_ratio: f64,
    /// Patch size in pixels.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Register ("storage") tokens.
    #[serde(default = "d_registers")]
    pub n_storage_tokens: usize,
    /// LayerScale initial value.
    #[serde(default = "d_layerscale")]
    pub layerscale_init: f64,
    /// LayerNorm epsilon (1e-5 for `layernormbf16`, the released models' norm).
    #[serde(default = "d_ln_eps")]
    pub layernorm_eps: f64,
    /// Bias on the qkv projection.
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    /// Zero the key part of the qkv bias (`LinearKMaskedBias`).
    #[serde(default = "d_true")]
    pub mask_k_bias: bool,
    /// Bias on the attention output projection.
    #[serde(default = "d_true")]
    pub proj_bias: bool,
    /// Biases in the MLP.
    #[serde(default = "d_true")]
    pub ffn_bias: bool,
    /// RoPE base (period of the slowest channel pair).
    #[serde(default = "d_rope_base")]
    pub rope_base: f64,
    /// Training-time RoPE coordinate rescale R: a log-uniform factor in [1/R, R] per block
    /// and crop group (student only). `None` disables it.
    #[serde(default)]
    pub rope_rescale: Option<f64>,
    /// Batch-subset drop path rate (same in every block; student only).
    #[serde(default)]
    pub drop_path: f64,
}

fn d_ffn_ratio() -> f64 {
    4.0
}
fn d_patch() -> usize {
    16
}
fn d_registers() -> usize {
    4
}
fn d_layerscale() -> f64 {
    1e-5
}
fn d_ln_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_rope_base() -> f64 {
    100.0
}

impl VitConfig {
    /// A named preset: `vit_pico` (96/6/2, for quick CPU runs), `vit_tiny` (192/12/3),
    /// `vit_small` (384/12/6), `vit_base` (768/12/12), `vit_large` (1024/24/16); all with
    /// patch 16, 4 registers, LayerScale 1e-5, masked key bias, RoPE base 100.
    pub fn preset(name: &str) -> Option<Self> {
        let (d, depth, heads) = match name {
            "vit_pico" => (96, 6, 2),
            "vit_tiny" => (192, 12, 3),
            "vit_small" => (384, 12, 6),
            "vit_base" => (768, 12, 12),
            "vit_large" => (1024, 24, 16),
            _ => return None,
        };
        Some(Self {
            embed_dim: d,
            depth,
            num_heads: heads,
            ffn_ratio: 4.0,
            patch_size: 16,
            n_storage_tokens: 4,
            layerscale_init: 1e-5,
            layernorm_eps: 1e-5,
            qkv_bias: true,
            mask_k_bias: true,
            proj_bias: true,
            ffn_bias: true,
            rope_base: 100.0,
            rope_rescale: None,
            drop_path: 0.0,
        })
    }

    /// Names of the presets.
    pub const PRESETS: [&'static str; 5] =
        ["vit_pico", "vit_tiny", "vit_small", "vit_base", "vit_large"];

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads.max(1)
    }

    /// MLP hidden width.
    pub fn hidden_dim(&self) -> usize {
        (self.embed_dim as f64 * self.ffn_ratio) as usize
    }

    /// Every inconsistency, each as `(key, message)`.
    pub fn problems(&self, prefix: &str) -> Vec<(String, String)> {
        let mut p = vec![];
        let k = |s: &str| format!("{prefix}.{s}");
        if self.embed_dim == 0 || self.depth == 0 || self.num_heads == 0 {
            p.push((
                k("embed_dim"),
                "embed_dim, depth and num_heads must be positive".into(),
            ));
        } else if !self.embed_dim.is_multiple_of(4 * self.num_heads) {
            p.push((
                k("num_heads"),
                format!(
                    "2-D RoPE needs embed_dim ({}) divisible by 4 * num_heads ({})",
                    self.embed_dim,
                    4 * self.num_heads
                ),
            ));
        }
        if self.patch_size == 0 {
            p.push((k("patch_size"), "must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            p.push((
                k("drop_path"),
                format!("must be in [0, 1), got {}", self.drop_path),
            ));
        }
        if let Some(r) = self.rope_rescale {
            if r < 1.0 {
                p.push((
                    k("rope_rescale"),
                    format!("must be >= 1 (the factor is drawn in [1/R, R]), got {r}"),
                ));
            }
        }
        if self.ffn_ratio <= 0.0 {
            p.push((k("ffn_ratio"), "must be positive".into()));
        }
        if self.layernorm_eps <= 0.0 {
            p.push((k("layernorm_eps"), "must be positive".into()));
        }
        p
    }

    /// Whether two configs describe the same parameter shapes (what resume checks).
    pub fn same_architecture(&self, other: &Self) -> bool {
        self.embed_dim == other.embed_dim
            && self.depth == other.depth
            && self.num_heads == other.num_heads
            && self.hidden_dim() == other.hidden_dim()
            && self.patch_size == other.patch_size
            && self.n_storage_tokens == other.n_storage_tokens
            && self.qkv_bias == other.qkv_bias
            && self.proj_bias == other.proj_bias
            && self.ffn_bias == other.ffn_bias
    }
}

/// A DINO or iBOT projection head: an MLP to an L2-normalised bottleneck, then a plain
/// linear layer onto the prototypes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// MLP hidden width.
    pub hidden_dim: usize,
    /// Bottleneck width.
    pub bottleneck_dim: usize,
    /// Number of prototypes K.
    pub n_prototypes: usize,
    /// MLP layers (3 in every official config).
    #[serde(default = "d_nlayers")]
    pub nlayers: usize,
}

fn d_nlayers() -> usize {
    3
}

impl HeadConfig {
    /// Problems with this head, each as `(key, message)`.
    pub fn problems(&self, prefix: &str) -> Vec<(String, String)> {
        let mut p = vec![];
        if self.hidden_dim == 0 || self.bottleneck_dim == 0 || self.n_prototypes == 0 {
            p.push((
                prefix.to_string(),
                "hidden_dim, bottleneck_dim and n_prototypes must be positive".into(),
            ));
        }
        if self.nlayers == 0 {
            p.push((format!("{prefix}.nlayers"), "must be at least 1".into()));
        }
        p
    }
}

/// Loss weights and temperatures of the SSL objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of the DINO (class-token) loss.
    #[serde(default = "d_one")]
    pub dino_loss_weight: f64,
    /// Weight of the iBOT (masked patch) loss.
    #[serde(default = "d_one")]
    pub ibot_loss_weight: f64,
    /// Weight of KoLeo (applied as `weight * 2 * mean over the two global crops`).
    #[serde(default = "d_koleo")]
    pub koleo_loss_weight: f64,
    /// Student temperature of the DINO and iBOT cross-entropies.
    #[serde(default = "d_student_temp")]
    pub student_temp: f64,
    /// Sinkhorn-Knopp iterations.
    #[serde(default = "d_sk")]
    pub sinkhorn_iterations: usize,
    /// Gram loss per image (`true`, the 7B configs) or over the whole batch.
    #[serde(default = "d_true")]
    pub gram_per_image: bool,
}

fn d_one() -> f64 {
    1.0
}
fn d_koleo() -> f64 {
    0.1
}
fn d_student_temp() -> f64 {
    0.1
}
fn d_sk() -> usize {
    3
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            dino_loss_weight: 1.0,
            ibot_loss_weight: 1.0,
            koleo_loss_weight: 0.1,
            student_temp: 0.1,
            sinkhorn_iterations: 3,
            gram_per_image: true,
        }
    }
}

/// AdamW and parameter-group settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// AdamW beta1.
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    /// AdamW beta2.
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    /// AdamW epsilon.
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Gradient clipping max norm, applied separately to backbone, DINO head, iBOT head.
    #[serde(default = "d_clip")]
    pub clip_grad: f64,
    /// Layer-wise LR decay rho.
    #[serde(default = "d_layer_decay")]
    pub layerwise_decay: f64,
    /// Extra LR multiplier on the patch embedding.
    #[serde(default = "d_patch_mult")]
    pub patch_embed_lr_mult: f64,
}

fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    3.0
}
fn d_layer_decay() -> f64 {
    0.9
}
fn d_patch_mult() -> f64 {
    0.2
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad: 3.0,
            layerwise_decay: 0.9,
            patch_embed_lr_mult: 0.2,
        }
    }
}

/// Everything that fixes the shapes and the objective of an SSL model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    /// Backbone.
    pub backbone: VitConfig,
    /// DINO head.
    pub dino_head: HeadConfig,
    /// iBOT head (separate from the DINO head, as DINOv3 asserts).
    pub ibot_head: HeadConfig,
    /// Loss settings.
    #[serde(default)]
    pub loss: LossConfig,
    /// Optimizer settings.
    #[serde(default)]
    pub optim: OptimConfig,
}

impl SslConfig {
    /// Every problem, each as `(key, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = self.backbone.problems("model.backbone");
        p.extend(self.dino_head.problems("model.dino_head"));
        p.extend(self.ibot_head.problems("model.ibot_head"));
        if self.dino_head.n_prototypes == 0 {
            p.push((
                "model.dino_head.n_prototypes".into(),
                "must be positive".into(),
            ));
        }
        if self.loss.student_temp <= 0.0 {
            p.push(("model.loss.student_temp".into(), "must be positive".into()));
        }
        if self.optim.clip_grad <= 0.0 {
            p.push(("model.optim.clip_grad".into(), "must be positive".into()));
        }
        p
    }
}
