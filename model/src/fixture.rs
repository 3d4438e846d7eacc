//! Reading golden fixtures: a safetensors file whose `__metadata__["config"]` is a JSON
//! description of the case (sizes, hyper-parameters). The caller reads the bytes; this
//! module parses them and builds the matching configs, so nothing about a fixture's sizes
//! is hard-coded.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::config::{HeadConfig, LossConfig, OptimConfig, VitConfig};

/// Errors reading a fixture.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// Not a safetensors file, or unreadable tensors.
    #[error("not a valid fixture file: {0}")]
    Format(String),
    /// The metadata lacks a key or has the wrong type.
    #[error("fixture config: {0}")]
    Config(String),
    /// A tensor the fixture kind needs is missing.
    #[error("fixture has no tensor `{0}`")]
    Missing(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The fixture file cannot be read.
    #[error("cannot read fixture {path}: {cause}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why (in the message, so not also a `source()`).
        cause: std::io::Error,
    },
}

/// A parsed fixture.
pub struct Fixture {
    /// The JSON config from the metadata.
    pub config: Value,
    tensors: HashMap<String, Tensor>,
}

/// Where the golden fixtures are: `$DINOD_GOLDEN`, else `shared/golden` beside the
/// checkout (where CI has it).
pub fn golden_dir() -> std::path::PathBuf {
    std::env::var_os("DINOD_GOLDEN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden")
        })
}

impl Fixture {
    /// Reads and parses the fixture file `name` in [`golden_dir`].
    pub fn golden(name: &str) -> Result<Self, FixtureError> {
        let path = golden_dir().join(name);
        let bytes = std::fs::read(&path).map_err(|cause| FixtureError::Io { path, cause })?;
        Self::parse(&bytes)
    }

    /// Parses fixture bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, FixtureError> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| FixtureError::Format(e.to_string()))?;
        let cfg = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .ok_or_else(|| {
                FixtureError::Config("no `config` in the safetensors metadata".into())
            })?;
        let config: Value = serde_json::from_str(cfg)
            .map_err(|e| FixtureError::Config(format!("config is not JSON: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| FixtureError::Format(e.to_string()))?;
        Ok(Self { config, tensors })
    }

    /// The fixture kind (`vit_forward`, `losses`, `train_step`).
    pub fn kind(&self) -> Result<String, FixtureError> {
        self.str_at(&["fixture"]).map(|s| s.to_string())
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Result<Tensor, FixtureError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| FixtureError::Missing(name.to_string()))
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names with a prefix, sorted.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// `(name without prefix, shape)` of every tensor under `prefix`.
    pub fn shapes_with_prefix(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        self.names_with_prefix(prefix)
            .into_iter()
            .map(|n| {
                (
                    n[prefix.len()..].to_string(),
                    self.tensors[&n].dims().to_vec(),
                )
            })
            .collect()
    }

    /// A u8 tensor as bytes.
    pub fn u8s(&self, name: &str) -> Result<Vec<u8>, FixtureError> {
        Ok(self
            .get(name)?
            .flatten_all()?
            .to_dtype(candle_core::DType::U8)?
            .to_vec1::<u8>()?)
    }

    /// An integer tensor as indices.
    pub fn indices(&self, name: &str) -> Result<Vec<usize>, FixtureError> {
        Ok(self
            .get(name)?
            .flatten_all()?
            .to_dtype(candle_core::DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as usize)
            .collect())
    }

    /// A float tensor as f64 values.
    pub fn f64s(&self, name: &str) -> Result<Vec<f64>, FixtureError> {
        Ok(self
            .get(name)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?)
    }

    fn at(&self, path: &[&str]) -> Result<&Value, FixtureError> {
        let mut v = &self.config;
        for p in path {
            v = v
                .get(p)
                .ok_or_else(|| FixtureError::Config(format!("missing key `{}`", path.join("."))))?;
        }
        Ok(v)
    }

    /// A number in the config.
    pub fn f64_at(&self, path: &[&str]) -> Result<f64, FixtureError> {
        self.at(path)?
            .as_f64()
            .ok_or_else(|| FixtureError::Config(format!("`{}` is not a number", path.join("."))))
    }

    /// An integer in the config.
    pub fn usize_at(&self, path: &[&str]) -> Result<usize, FixtureError> {
        self.at(path)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| FixtureError::Config(format!("`{}` is not an integer", path.join("."))))
    }

    /// A bool in the config (missing or null = false).
    pub fn bool_at(&self, path: &[&str]) -> bool {
        self.at(path)
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// A string in the config.
    pub fn str_at(&self, path: &[&str]) -> Result<&str, FixtureError> {
        self.at(path)?
            .as_str()
            .ok_or_else(|| FixtureError::Config(format!("`{}` is not a string", path.join("."))))
    }

    /// A pair of integers (e.g. a grid).
    pub fn pair_at(&self, path: &[&str]) -> Result<(usize, usize), FixtureError> {
        let v = self
            .at(path)?
            .as_array()
            .ok_or_else(|| FixtureError::Config(format!("`{}` is not a list", path.join("."))))?;
        let g = |i: usize| {
            v.get(i)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| FixtureError::Config(format!("`{}` is not a pair", path.join("."))))
        };
        Ok((g(0)?, g(1)?))
    }

    /// The backbone config, from `backbone` or from `official_cfg_overrides.student`.
    pub fn vit_config(&self) -> Result<VitConfig, FixtureError> {
        let (b, prefix): (&Value, &str) = match self.config.get("backbone") {
            Some(v) => (v, "backbone"),
            None => {
                let s = self.at(&["official_cfg_overrides", "student"])?;
                (s, "official_cfg_overrides.student")
            }
        };
        let get = |k: &str| {
            b.get(k)
                .ok_or_else(|| FixtureError::Config(format!("missing key `{prefix}.{k}`")))
        };
        let num = |k: &str| {
            get(k).and_then(|v| {
                v.as_f64()
                    .ok_or_else(|| FixtureError::Config(format!("`{prefix}.{k}` is not a number")))
            })
        };
        let flag = |k: &str| b.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        for unsupported in [
            "untie_cls_and_patch_norms",
            "untie_global_and_local_cls_norm",
        ] {
            if flag(unsupported) {
                return Err(FixtureError::Config(format!(
                    "`{prefix}.{unsupported} = true` is not supported"
                )));
            }
        }
        if let Some(f) = b.get("ffn_layer").and_then(|v| v.as_str()) {
            if f != "mlp" {
                return Err(FixtureError::Config(format!(
                    "ffn_layer `{f}` is not supported (only `mlp`)"
                )));
            }
        }
        for aug in [
            "pos_embed_rope_shift_coords",
            "pos_embed_rope_jitter_coords",
            "pos_embed_rope_rescale_coords",
        ] {
            if b.get(aug).map(|v| !v.is_null()).unwrap_or(false) {
                return Err(FixtureError::Config(format!(
                    "`{prefix}.{aug}` is random at training time and cannot be checked"
                )));
            }
        }
        // the embedding width: `embed_dim` in `backbone`, or from the spec / top level
        let embed_dim = match b.get("embed_dim").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => self
                .usize_at(&["spec", "backbone", "embed_dim"])
                .or_else(|_| self.usize_at(&["embed_dim"]))?,
        };
        let depth = match b.get("depth").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => self.usize_at(&["spec", "backbone", "depth"])?,
        };
        let num_heads = match b.get("num_heads").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => self.usize_at(&["spec", "backbone", "num_heads"])?,
        };
        let eps = match b.get("layernorm_eps").and_then(|v| v.as_f64()) {
            Some(e) => e,
            None => match b.get("norm_layer").and_then(|v| v.as_str()) {
                Some("layernorm") => 1e-6,
                _ => 1e-5,
            },
        };
        Ok(VitConfig {
            embed_dim,
            depth,
            num_heads,
            ffn_ratio: num("ffn_ratio")?,
            patch_size: num("patch_size")? as usize,
            n_storage_tokens: num("n_storage_tokens")? as usize,
            layerscale_init: num("layerscale_init").or_else(|_| num("layerscale"))?,
            layernorm_eps: eps,
            qkv_bias: flag("qkv_bias"),
            mask_k_bias: flag("mask_k_bias"),
            proj_bias: flag("proj_bias"),
            ffn_bias: flag("ffn_bias"),
            rope_base: num("pos_embed_rope_base")?,
            rope_rescale: None,
            drop_path: b
                .get("drop_path_rate")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0),
        })
    }

    /// The DINO and iBOT head configs.
    pub fn head_configs(&self) -> Result<(HeadConfig, HeadConfig), FixtureError> {
        let h = |p: &str| -> Result<HeadConfig, FixtureError> {
            let o = &["official_cfg_overrides", p];
            Ok(HeadConfig {
                hidden_dim: self.usize_at(&[o[0], o[1], "head_hidden_dim"])?,
                bottleneck_dim: self.usize_at(&[o[0], o[1], "head_bottleneck_dim"])?,
                n_prototypes: self.usize_at(&[o[0], o[1], "head_n_prototypes"])?,
                nlayers: self.usize_at(&[o[0], o[1], "head_nlayers"])?,
            })
        };
        Ok((h("dino")?, h("ibot")?))
    }

    /// Loss settings.
    pub fn loss_config(&self) -> Result<LossConfig, FixtureError> {
        Ok(LossConfig {
            dino_loss_weight: self.f64_at(&["loss", "dino_loss_weight"])?,
            ibot_loss_weight: self.f64_at(&["loss", "ibot_loss_weight"])?,
            koleo_loss_weight: self.f64_at(&["loss", "koleo_loss_weight"])?,
            student_temp: self.f64_at(&["loss", "student_temp"])?,
            sinkhorn_iterations: self.usize_at(&["loss", "sinkhorn_knopp_iterations"])?,
            gram_per_image: self.bool_at(&["gram", "img_level"]),
        })
    }

    /// Optimizer settings.
    pub fn optim_config(&self) -> Result<OptimConfig, FixtureError> {
        let o = ["official_cfg_overrides", "optim"];
        Ok(OptimConfig {
            beta1: self.f64_at(&[o[0], o[1], "adamw_beta1"])?,
            beta2: self.f64_at(&[o[0], o[1], "adamw_beta2"])?,
            eps: self.f64_at(&["optim", "eps"]).unwrap_or(1e-8),
            clip_grad: self.f64_at(&[o[0], o[1], "clip_grad"])?,
            layerwise_decay: self.f64_at(&[o[0], o[1], "layerwise_decay"])?,
            patch_embed_lr_mult: self.f64_at(&[o[0], o[1], "patch_embed_lr_mult"])?,
        })
    }
}
