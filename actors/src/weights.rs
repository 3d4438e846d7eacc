//! Model weights read from outside the running state: a checkpoint group straight from a
//! state directory (no catalog lock, so beside a running daemon), and the weights a
//! distillation teacher or a new run's `[model] init` names (`state:DIR`,
//! `safetensors:FILE`), under the model's parameter names.
//!
//! Owns the mapping from those sources to `<role>.<key>` names; must not know the
//! engine's state or the actors.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Reads a checkpoint's group straight from its directory (no catalog lock, so it works
/// while the daemon runs), verifying sizes and BLAKE3 hashes against `manifest.json`; with
/// that manifest (read once: retention may delete the checkpoint right after).
pub fn read_group(
    state_dir: &Path,
    step: Option<u64>,
    group: &str,
) -> Result<(checkpoints::Manifest, checkpoints::TensorGroup)> {
    let dir = state_dir.join("checkpoints");
    let steps = checkpoint_dirs(state_dir)?;
    let candidates: Vec<&(u64, PathBuf)> = match step {
        Some(s) => steps.iter().filter(|(t, _)| *t == s).collect(),
        None => steps.iter().rev().collect(),
    };
    let mut problems = vec![];
    for (s, p) in candidates {
        let attempt = || -> Result<(checkpoints::Manifest, checkpoints::TensorGroup)> {
            let manifest: checkpoints::Manifest =
                serde_json::from_slice(&std::fs::read(p.join(checkpoints::MANIFEST_FILE))?)?;
            let f = manifest
                .file(group)
                .ok_or_else(|| anyhow!("no `{group}` group"))?;
            let g = checkpoints::read_group_file(&p.join(&f.file), f)?;
            Ok((manifest, g))
        };
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => problems.push(format!("step {s}: {e:#}")),
        }
    }
    bail!(
        "no valid checkpoint with a `{group}` group in {}: {}",
        dir.display(),
        if problems.is_empty() {
            "none found".to_string()
        } else {
            problems.join("; ")
        }
    )
}

/// The checkpoint directories of a state directory by step, oldest first (their
/// manifests unread).
fn checkpoint_dirs(state_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = state_dir.join("checkpoints");
    let mut steps: Vec<(u64, PathBuf)> = vec![];
    for e in std::fs::read_dir(&dir)
        .with_context(|| format!("{} holds no checkpoints", dir.display()))?
    {
        let p = e?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if name.ends_with(".tmp") || !name.starts_with("step-") {
            continue;
        }
        if let Ok(s) = name["step-".len()..]
            .split('-')
            .next()
            .unwrap_or("")
            .parse::<u64>()
        {
            steps.push((s, p));
        }
    }
    steps.sort();
    Ok(steps)
}

/// The manifest of the checkpoint of `step`, read from its directory.
pub fn checkpoint_manifest(state_dir: &Path, step: u64) -> Result<checkpoints::Manifest> {
    let Some((_, p)) = checkpoint_dirs(state_dir)?
        .into_iter()
        .find(|(s, _)| *s == step)
    else {
        bail!(
            "no checkpoint of step {step} in {}",
            state_dir.join("checkpoints").display()
        )
    };
    let path = p.join(checkpoints::MANIFEST_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} does not parse", path.display()))
}

/// The backbone config recorded in a checkpoint's manifest.
pub fn vit_config(manifest: &checkpoints::Manifest) -> Result<model::VitConfig> {
    let v = manifest.meta["run"]["model"]["backbone"].clone();
    serde_json::from_value(v).context("the checkpoint's backbone config")
}

/// The weights `spec` names, under the model's names (`backbone.<key>`, `dino_head.*`,
/// `ibot_head.*`), and which they are (the checkpoint's step, the file's BLAKE3):
/// `state:DIR` is the EMA teacher of DIR's newest valid checkpoint (its backbone must have
/// the architecture of `backbone`), `safetensors:FILE` a file with the official
/// `state_dict` names, as `dinod export` writes it (heads with `--with-heads`), in f32,
/// f64, bf16 or f16 (widened to the run's master type).
pub fn read_weights(
    spec: &str,
    backbone: &model::VitConfig,
) -> Result<(checkpoints::TensorGroup, String)> {
    if let Some(dir) = spec.strip_prefix("state:") {
        let (manifest, blobs) = read_group(Path::new(dir), None, "teacher")?;
        let cfg = vit_config(&manifest)?;
        if !cfg.same_architecture(backbone) {
            bail!(
                "the teacher in {dir} is a {}x{}x{} ViT, but [model] describes {}x{}x{}",
                cfg.embed_dim,
                cfg.depth,
                cfg.num_heads,
                backbone.embed_dim,
                backbone.depth,
                backbone.num_heads
            );
        }
        let hash = manifest.file("teacher").map_or("?", |f| f.blake3.as_str());
        Ok((
            blobs,
            format!("the EMA teacher of step {}, blake3 {hash}", manifest.step),
        ))
    } else if let Some(file) = spec.strip_prefix("safetensors:") {
        // read straight into the tensors' vectors: a large model is held once
        let (mut g, hash) = checkpoints::read_safetensors(Path::new(file), "teacher")?;
        for t in &mut g.tensors {
            use checkpoints::Dtype as D;
            if !matches!(t.dtype, D::F32 | D::F64 | D::BF16 | D::F16) {
                bail!("{file}: tensor {} has dtype {:?}", t.name, t.dtype);
            }
            // official backbone names carry no prefix; heads are `dino_head.*` / `ibot_head.*`
            if !(t.name.starts_with("dino_head.") || t.name.starts_with("ibot_head.")) {
                t.name = format!("backbone.{}", t.name);
            }
        }
        Ok((g, format!("blake3 {hash}")))
    } else {
        bail!("`{spec}`: use state:DIR or safetensors:FILE")
    }
}
