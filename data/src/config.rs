//! Configuration of crops, augmentations, masks and loading, with the defaults of the official recipe
//! (`dinov3/configs/ssl_default_config.yaml`, `dinov3/data/augmentations.py`, `dinov3/data/collate.py`).
//!
//! Every type deserialises from TOML with `deny_unknown_fields`; missing keys take the defaults.
//! `validate` reports every violation at once.

use serde::{Deserialize, Serialize};

use crate::rng::{domain, KeyedRng};
use crate::source::SourceSpec;
use crate::DataError;

/// ImageNet mean used by the official normalisation.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation used by the official normalisation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Default pixel limit (width x height) above which an image is refused without being decoded;
/// the same number as Pillow's decompression-bomb threshold.
pub const DEFAULT_PIXEL_LIMIT: u64 = 89_478_485;

/// Which Gaussian-blur probabilities the crops get.
///
/// The official `GaussianBlur` wrapper passes `1 - p` to torchvision's `RandomApply`, so the released
/// DINOv2/DINOv3 models were trained with the call-site values inverted (dinov3 issue #286, PR #342).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlurConvention {
    /// What released models were trained with: global crop 1 never blurred, global crop 2 with p 0.9,
    /// local crops with p 0.5.
    #[default]
    AsTrained,
    /// The probabilities as written at the call sites: 1.0 / 0.1 / 0.5.
    AsWritten,
    /// No blur at all (ablations, tiny images).
    Off,
}

impl BlurConvention {
    /// Blur probability of global crop 0, global crop 1 and every local crop.
    pub fn probabilities(self) -> [f64; 3] {
        match self {
            BlurConvention::AsTrained => [0.0, 0.9, 0.5],
            BlurConvention::AsWritten => [1.0, 0.1, 0.5],
            BlurConvention::Off => [0.0, 0.0, 0.0],
        }
    }
}

/// `RandomApply(ColorJitter(brightness, contrast, saturation, hue), p)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColorJitterConfig {
    /// Probability that the jitter is applied to a crop.
    pub p: f64,
    /// Brightness factor drawn from [1 - b, 1 + b].
    pub brightness: f64,
    /// Contrast factor drawn from [1 - c, 1 + c].
    pub contrast: f64,
    /// Saturation factor drawn from [1 - s, 1 + s].
    pub saturation: f64,
    /// Hue shift drawn from [-h, h] (fraction of a turn, at most 0.5).
    pub hue: f64,
}

impl Default for ColorJitterConfig {
    fn default() -> Self {
        ColorJitterConfig {
            p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
        }
    }
}

/// The crop sizes in force for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropSizes {
    /// Global crop side.
    pub global: u32,
    /// Local crop side.
    pub local: u32,
    /// Gram-teacher crop side, when the Gram loss is on.
    #[serde(default)]
    pub gram: Option<u32>,
}

/// High-resolution adaptation: the global/local/Gram sizes are drawn per batch from a list.
///
/// The official stage builds one loader per size tuple and mixes them with fixed ratios
/// (`[0.3, 0.3, 0.3, 0.05, 0.05]`); here the tuple is a pure function of (seed, batch index), so every
/// image of a batch shares the sizes and a resumed run draws the same ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HighResConfig {
    /// The size tuples.
    pub sizes: Vec<CropSizes>,
    /// Their probabilities (normalised; must be as many as `sizes`).
    pub probs: Vec<f64>,
}

impl HighResConfig {
    /// The official 7B high-resolution adaptation mix (`dinov3_vit7b16_high_res_adapt.yaml`).
    pub fn official_7b() -> Self {
        let t = |global, local, gram| CropSizes {
            global,
            local,
            gram: Some(gram),
        };
        HighResConfig {
            sizes: vec![
                t(512, 112, 768),
                t(768, 112, 1152),
                t(768, 168, 1152),
                t(768, 224, 1152),
                t(768, 336, 1152),
            ],
            probs: vec![0.3, 0.3, 0.3, 0.05, 0.05],
        }
    }

    /// The sizes of batch `batch_index` (deterministic in (seed, batch_index)).
    pub fn pick(&self, seed: u64, batch_index: u64) -> CropSizes {
        let total: f64 = self.probs.iter().sum();
        let mut u = KeyedRng::new(&[seed, domain::SIZES, batch_index]).uniform() * total;
        for (sizes, &p) in self.sizes.iter().zip(&self.probs) {
            if u < p {
                return *sizes;
            }
            u -= p;
        }
        *self.sizes.last().expect("validated: sizes is not empty")
    }
}

/// Multi-crop geometry and photometric augmentation (official defaults: 2 x 224 + 8 x 96).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CropConfig {
    /// Global crop side (`crops.global_crops_size`).
    pub global_size: u32,
    /// Local crop side (`crops.local_crops_size`).
    pub local_size: u32,
    /// Number of local crops (`crops.local_crops_number`).
    pub n_local: usize,
    /// RandomResizedCrop area range of global crops (`crops.global_crops_scale`).
    pub global_scale: (f64, f64),
    /// RandomResizedCrop area range of local crops (`crops.local_crops_scale`).
    pub local_scale: (f64, f64),
    /// RandomResizedCrop aspect-ratio range (torchvision default 3/4 .. 4/3).
    pub ratio: (f64, f64),
    /// Gram-teacher crop side (`crops.gram_teacher_crops_size`); `None` when the Gram loss is off.
    pub gram_size: Option<u32>,
    /// The Gram crop gets no colour jitter, grayscale, blur or solarize
    /// (`crops.gram_teacher_no_distortions`; true in the gram-anchor and high-res configs).
    pub gram_teacher_no_distortions: bool,
    /// Horizontal-flip probability (`crops.horizontal_flips`: 0.5, off in the 7B configs).
    pub flip_p: f64,
    /// Colour jitter.
    pub color_jitter: ColorJitterConfig,
    /// `RandomGrayscale` probability.
    pub grayscale_p: f64,
    /// Blur probabilities convention.
    pub blur: BlurConvention,
    /// Gaussian-blur sigma range (uniform).
    pub blur_sigma: (f64, f64),
    /// Gaussian-blur kernel size (odd).
    pub blur_kernel: usize,
    /// Solarize probability of global crop 1 (the second one).
    pub solarize_p: f64,
    /// Solarize threshold on the 0..255 scale (pixels >= threshold are inverted).
    pub solarize_threshold: u8,
    /// Normalisation mean.
    pub mean: [f32; 3],
    /// Normalisation standard deviation.
    pub std: [f32; 3],
    /// Mixed crop sizes per batch (high-resolution stage); overrides the three sizes above.
    pub high_res: Option<HighResConfig>,
}

impl Default for CropConfig {
    fn default() -> Self {
        CropConfig {
            global_size: 224,
            local_size: 96,
            n_local: 8,
            global_scale: (0.32, 1.0),
            local_scale: (0.05, 0.32),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            gram_size: None,
            gram_teacher_no_distortions: false,
            flip_p: 0.5,
            color_jitter: ColorJitterConfig::default(),
            grayscale_p: 0.2,
            blur: BlurConvention::AsTrained,
            blur_sigma: (0.1, 2.0),
            blur_kernel: 9,
            solarize_p: 0.2,
            solarize_threshold: 128,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            high_res: None,
        }
    }
}

impl CropConfig {
    /// The sizes of batch `batch_index`: the fixed sizes, or a draw from `high_res`.
    pub fn sizes_for_batch(&self, seed: u64, batch_index: u64) -> CropSizes {
        match &self.high_res {
            Some(hr) => hr.pick(seed, batch_index),
            None => CropSizes {
                global: self.global_size,
                local: self.local_size,
                gram: self.gram_size,
            },
        }
    }

    /// Every size tuple a batch can get.
    pub fn all_sizes(&self) -> Vec<CropSizes> {
        match &self.high_res {
            Some(hr) => hr.sizes.clone(),
            None => vec![CropSizes {
                global: self.global_size,
                local: self.local_size,
                gram: self.gram_size,
            }],
        }
    }

    /// Checks every constraint and lists all violations.
    pub fn validate(&self) -> Result<(), DataError> {
        let mut errs = Vec::new();
        for sizes in self.all_sizes() {
            if sizes.global == 0 || sizes.local == 0 || sizes.gram == Some(0) {
                errs.push(format!("crop sizes must be positive, got {sizes:?}"));
            }
        }
        let range_ok = |(a, b): (f64, f64)| a > 0.0 && a <= b && b <= 1.0;
        if !range_ok(self.global_scale) {
            errs.push(format!(
                "global_scale {:?} must satisfy 0 < min <= max <= 1",
                self.global_scale
            ));
        }
        if !range_ok(self.local_scale) {
            errs.push(format!(
                "local_scale {:?} must satisfy 0 < min <= max <= 1",
                self.local_scale
            ));
        }
        if !(self.ratio.0 > 0.0 && self.ratio.0 <= self.ratio.1) {
            errs.push(format!(
                "ratio {:?} must satisfy 0 < min <= max",
                self.ratio
            ));
        }
        let probs = [
            ("flip_p", self.flip_p),
            ("color_jitter.p", self.color_jitter.p),
            ("grayscale_p", self.grayscale_p),
            ("solarize_p", self.solarize_p),
        ];
        for (name, p) in probs {
            if !(0.0..=1.0).contains(&p) {
                errs.push(format!("{name} = {p} is not a probability"));
            }
        }
        let cj = &self.color_jitter;
        for (name, v, max) in [
            ("brightness", cj.brightness, 1.0),
            ("contrast", cj.contrast, 1.0),
            ("saturation", cj.saturation, 1.0),
            ("hue", cj.hue, 0.5),
        ] {
            if !(0.0..=max).contains(&v) {
                errs.push(format!("color_jitter.{name} = {v} must be in [0, {max}]"));
            }
        }
        if !(self.blur_sigma.0 > 0.0 && self.blur_sigma.0 <= self.blur_sigma.1) {
            errs.push(format!(
                "blur_sigma {:?} must satisfy 0 < min <= max",
                self.blur_sigma
            ));
        }
        if self.blur_kernel.is_multiple_of(2) {
            errs.push(format!("blur_kernel = {} must be odd", self.blur_kernel));
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            errs.push(format!("std {:?} must be positive", self.std));
        }
        if let Some(hr) = &self.high_res {
            if hr.sizes.is_empty() {
                errs.push("high_res.sizes is empty".to_string());
            }
            if hr.sizes.len() != hr.probs.len() {
                errs.push(format!(
                    "high_res has {} sizes but {} probs",
                    hr.sizes.len(),
                    hr.probs.len()
                ));
            }
            if hr.probs.iter().any(|&p| !(p >= 0.0 && p.is_finite()))
                || hr.probs.iter().sum::<f64>() <= 0.0
            {
                errs.push(format!(
                    "high_res.probs {:?} must be non-negative with a positive sum",
                    hr.probs
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(DataError::Config(errs))
        }
    }
}

/// iBOT masking as the official collate (`ibot.mask_sample_probability`, `ibot.mask_ratio_min_max`,
/// `MaskingGenerator` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskConfig {
    /// Fraction of the 2B global crops that are masked (exactly `int(2B * p)` crops).
    pub sample_probability: f64,
    /// The masked crops get ratios `linspace(min, max, n + 1)[1..]`.
    pub ratio_min_max: (f64, f64),
    /// ViT patch size: the mask grid of a G-pixel crop is (G / patch)^2.
    pub patch_size: u32,
    /// Smallest block the generator places (`min_num_patches`).
    pub min_num_patches: usize,
    /// Largest block as a fraction of the grid (`max_num_patches = 0.5 * N`).
    pub max_block_ratio: f64,
    /// Block aspect ratios are log-uniform in [min_aspect, 1 / min_aspect].
    pub min_aspect: f64,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            sample_probability: 0.5,
            ratio_min_max: (0.1, 0.5),
            patch_size: 16,
            min_num_patches: 4,
            max_block_ratio: 0.5,
            min_aspect: 0.3,
        }
    }
}

impl MaskConfig {
    /// Checks the masking config against every crop size it will see.
    pub fn validate(&self, crops: &CropConfig) -> Result<(), DataError> {
        let mut errs = Vec::new();
        if !(0.0..=1.0).contains(&self.sample_probability) {
            errs.push(format!(
                "sample_probability = {} is not a probability",
                self.sample_probability
            ));
        }
        let (a, b) = self.ratio_min_max;
        if !(0.0 <= a && a <= b && b <= 1.0) {
            errs.push(format!(
                "ratio_min_max {:?} must satisfy 0 <= min <= max <= 1",
                self.ratio_min_max
            ));
        }
        if self.patch_size == 0 {
            errs.push("patch_size must be positive".into());
        } else {
            for sizes in crops.all_sizes() {
                if sizes.global % self.patch_size != 0 {
                    errs.push(format!(
                        "global crop size {} is not a multiple of patch_size {}",
                        sizes.global, self.patch_size
                    ));
                }
            }
        }
        if !(self.min_aspect > 0.0 && self.min_aspect <= 1.0) {
            errs.push(format!(
                "min_aspect = {} must be in (0, 1]",
                self.min_aspect
            ));
        }
        if !(self.max_block_ratio > 0.0 && self.max_block_ratio <= 1.0) {
            errs.push(format!(
                "max_block_ratio = {} must be in (0, 1]",
                self.max_block_ratio
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(DataError::Config(errs))
        }
    }
}

/// Evaluation transform: resize the shorter side, center-crop, normalise (label maps: nearest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Output side.
    pub size: u32,
    /// Shorter side after resizing, before the center crop; `None` means `size` (no margin, the whole
    /// short side is kept, which dense probes want). The classic k-NN protocol uses 256 for 224.
    pub resize_size: Option<u32>,
    /// Normalisation mean.
    pub mean: [f32; 3],
    /// Normalisation standard deviation.
    pub std: [f32; 3],
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            size: 224,
            resize_size: None,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl EvalConfig {
    /// The shorter side after resizing.
    pub fn resize_side(&self) -> u32 {
        self.resize_size.unwrap_or(self.size)
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), DataError> {
        let mut errs = Vec::new();
        if self.size == 0 {
            errs.push("eval size must be positive".to_string());
        }
        if self.resize_side() < self.size {
            errs.push(format!(
                "resize_size {} is smaller than size {}",
                self.resize_side(),
                self.size
            ));
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            errs.push(format!("std {:?} must be positive", self.std));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(DataError::Config(errs))
        }
    }
}

/// Order of samples within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// A keyed permutation per (seed, epoch).
    #[default]
    Shuffled,
    /// Source order (evaluation, debugging).
    Sequential,
}

/// The `[data]` section of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Where the images come from (`folder:PATH`, `idx:PATH[:train|test]`, `synthetic[:SEED]`, ...).
    pub source: SourceSpec,
    /// Multi-crop augmentation.
    pub crops: CropConfig,
    /// iBOT masks.
    pub masks: MaskConfig,
    /// Decode/augment worker threads; `None` uses the available parallelism.
    pub n_workers: Option<usize>,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Sample order within an epoch.
    pub order: Order,
    /// Images with more pixels than this are refused before decoding.
    pub pixel_limit: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: SourceSpec::default(),
            crops: CropConfig::default(),
            masks: MaskConfig::default(),
            n_workers: None,
            prefetch: 2,
            order: Order::Shuffled,
            pixel_limit: DEFAULT_PIXEL_LIMIT,
        }
    }
}

impl DataConfig {
    /// Checks every part and lists all violations.
    pub fn validate(&self) -> Result<(), DataError> {
        let mut errs = Vec::new();
        for res in [self.crops.validate(), self.masks.validate(&self.crops)] {
            if let Err(DataError::Config(e)) = res {
                errs.extend(e);
            }
        }
        if self.prefetch == 0 {
            errs.push("prefetch must be at least 1".into());
        }
        if self.n_workers == Some(0) {
            errs.push("n_workers must be at least 1".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(DataError::Config(errs))
        }
    }
}
