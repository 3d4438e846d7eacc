//! Analytic FLOP counts of a training step (matrix products only, 2 FLOPs per
//! multiply-add), for the achieved-GFLOP/s figure of `dinod bench step` and MFU.

use crate::config::{HeadConfig, SslConfig, VitConfig};

/// FLOPs of one step by phase.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StepFlops {
    /// Teacher backbone and heads (forward only).
    pub teacher: f64,
    /// Gram teacher (forward only).
    pub gram_teacher: f64,
    /// Student backbone and heads forward.
    pub student_forward: f64,
    /// Student backward (input and weight gradients).
    pub student_backward: f64,
}

impl StepFlops {
    /// Sum of all phases.
    pub fn total(&self) -> f64 {
        self.teacher + self.gram_teacher + self.student_forward + self.student_backward
    }
}

/// Forward FLOPs of a backbone on `n` images of `h x w` pixels: `(embed, blocks)`.
pub fn backbone_forward(cfg: &VitConfig, n: usize, h: usize, w: usize) -> (f64, f64) {
    let p = cfg.patch_size;
    let patches = (h / p) * (w / p);
    let tokens = (1 + cfg.n_storage_tokens + patches) as f64;
    let (d, hid) = (cfg.embed_dim as f64, cfg.hidden_dim() as f64);
    let n = n as f64;
    let embed = 2.0 * n * patches as f64 * (3 * p * p) as f64 * d;
    let per_token = 2.0 * (3.0 * d * d + d * d + 2.0 * d * hid);
    let attn = 2.0 * 2.0 * n * tokens * tokens * d;
    (embed, cfg.depth as f64 * (n * tokens * per_token + attn))
}

/// Forward FLOPs of a head on `rows` inputs of width `in_dim`.
pub fn head_forward(cfg: &HeadConfig, in_dim: usize, rows: usize) -> f64 {
    let mut f = 0.0;
    let mut i = in_dim as f64;
    for l in 0..cfg.nlayers.max(1) {
        let o = if l + 1 == cfg.nlayers.max(1) {
            cfg.bottleneck_dim
        } else {
            cfg.hidden_dim
        } as f64;
        f += 2.0 * i * o;
        i = o;
    }
    f += 2.0 * cfg.bottleneck_dim as f64 * cfg.n_prototypes as f64;
    f * rows as f64
}

/// FLOPs of one step for `b` images with 2 global crops of `g` px, `n_local` local crops of
/// `l` px, `masked` masked patches, and (optionally) Gram crops of `s` px.
pub fn step_flops(
    cfg: &SslConfig,
    b: usize,
    g: usize,
    n_local: usize,
    l: usize,
    masked: usize,
    gram: Option<usize>,
) -> StepFlops {
    let bb = &cfg.backbone;
    let d = bb.embed_dim;
    let (te, tb) = backbone_forward(bb, 2 * b, g, g);
    let teacher =
        te + tb + head_forward(&cfg.dino_head, d, 2 * b) + head_forward(&cfg.ibot_head, d, masked);
    let gram_teacher = gram.map(|s| {
        let (e, blk) = backbone_forward(bb, 2 * b, s, s);
        e + blk
    });
    let (ge, gb) = backbone_forward(bb, 2 * b, g, g);
    let (le, lb) = if n_local > 0 {
        backbone_forward(bb, n_local * b, l, l)
    } else {
        (0.0, 0.0)
    };
    let heads = head_forward(&cfg.dino_head, d, (2 + n_local) * b)
        + head_forward(&cfg.ibot_head, d, masked);
    let student_forward = ge + gb + le + lb + heads;
    // backward: weight and input gradients for blocks and heads, weight only for the embedding
    let student_backward = 2.0 * (gb + lb + heads) + (ge + le);
    StepFlops {
        teacher,
        gram_teacher: gram_teacher.unwrap_or(0.0),
        student_forward,
        student_backward,
    }
}
