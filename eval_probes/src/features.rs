//! Frozen features and the labelled images they come from.
//!
//! [`extract`] runs the backbone in eval mode over bounded batches and keeps the
//! final-norm CLS and patch tokens on the host ([`FeatureSet`]). [`ProbeSet`] is a fixed,
//! labelled set of evaluation images (train part first, then test part), built
//! deterministically from a `data::Source` with the evaluation transform: the image-level
//! label, and the per-pixel label map resized with nearest-neighbour sampling to the
//! image size.

use candle_core::Tensor;
use model::vit::{CropGroup, Vit};
use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};

/// Final-norm tokens of `n` images, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    /// Number of images.
    pub n: usize,
    /// Token width D.
    pub dim: usize,
    /// Patch grid (rows, cols); P = rows * cols.
    pub grid: (usize, usize),
    /// CLS tokens `[n, D]`.
    pub cls: Vec<f32>,
    /// Patch tokens `[n, P, D]`, row-major grid.
    pub patches: Vec<f32>,
}

impl FeatureSet {
    /// Builds a set from host buffers, checking the sizes.
    pub fn new(
        n: usize,
        dim: usize,
        grid: (usize, usize),
        cls: Vec<f32>,
        patches: Vec<f32>,
    ) -> Result<Self> {
        let p = grid.0 * grid.1;
        if dim == 0 || p == 0 {
            return Err(ProbeError::shape(
                "feature set",
                format!("width {dim} and grid {grid:?} must be non-empty"),
            ));
        }
        if cls.len() != n * dim || patches.len() != n * p * dim {
            return Err(ProbeError::shape(
                "feature set",
                format!("{n} images of {p} patches and width {dim} need {} CLS and {} patch values, got {} and {}", n * dim, n * p * dim, cls.len(), patches.len()),
            ));
        }
        Ok(Self {
            n,
            dim,
            grid,
            cls,
            patches,
        })
    }

    /// Patches per image.
    pub fn n_patches(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// The CLS token of image `i`.
    pub fn cls_of(&self, i: usize) -> &[f32] {
        &self.cls[i * self.dim..(i + 1) * self.dim]
    }

    /// The patch tokens of image `i`, `[P, D]`.
    pub fn patches_of(&self, i: usize) -> &[f32] {
        let s = self.n_patches() * self.dim;
        &self.patches[i * s..(i + 1) * s]
    }

    /// Images `range` as a new set.
    pub fn slice(&self, range: std::ops::Range<usize>) -> FeatureSet {
        let s = self.n_patches() * self.dim;
        FeatureSet {
            n: range.len(),
            dim: self.dim,
            grid: self.grid,
            cls: self.cls[range.start * self.dim..range.end * self.dim].to_vec(),
            patches: self.patches[range.start * s..range.end * s].to_vec(),
        }
    }
}

/// Runs `vit` in eval mode over `images [n, 3, H, W]` (host, normalised) in batches of at
/// most `batch` images and returns the final-norm tokens.
pub fn extract(
    vit: &Vit,
    images: &[f32],
    n: usize,
    size: (usize, usize),
    batch: usize,
) -> Result<FeatureSet> {
    let per = 3 * size.0 * size.1;
    if images.len() != n * per {
        return Err(ProbeError::shape(
            "images",
            format!(
                "{} values for {n} images of 3x{}x{}",
                images.len(),
                size.0,
                size.1
            ),
        ));
    }
    // one batch on the host at a time, never a second copy of all the images
    let got = extract_batches(vit, n, size, batch, 0..n, None, |r| {
        Ok(ops::host::from_vec(
            images[r.start * per..r.end * per].to_vec(),
            (r.len(), 3, size.0, size.1),
        )?)
    })?;
    FeatureSet::new(
        n,
        vit.cfg.embed_dim,
        grid_of(vit, size)?,
        got.cls,
        got.patches,
    )
}

/// [`extract`] for a candle tensor `[n, 3, H, W]` of any float dtype, on any device: each
/// batch is moved to the backbone's device (a GPU extracts, the features come back to the
/// host).
pub fn extract_tensor(vit: &Vit, images: &Tensor, batch: usize) -> Result<FeatureSet> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(ProbeError::shape(
            "images",
            format!("expected 3 channels, got {c}"),
        ));
    }
    let got = extract_batches(vit, n, (h, w), batch, 0..n, None, |r| {
        Ok(images.narrow(0, r.start, r.len())?)
    })?;
    FeatureSet::new(
        n,
        vit.cfg.embed_dim,
        grid_of(vit, (h, w))?,
        got.cls,
        got.patches,
    )
}

/// Every `stride`-th patch row of a set's first `images` images, counted image-major from
/// the first image's first patch: the training rows the dense probe fits on
/// ([`crate::dense::train_stride`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSample {
    /// The sample is drawn from images `0..images`.
    pub images: usize,
    /// Every `stride`-th row (at least 1).
    pub stride: usize,
}

/// What [`extract_set`] keeps of a probe set's features.
#[derive(Clone, Debug, PartialEq)]
pub struct SetFeatures {
    /// The CLS token of every image, `[n, D]`.
    pub cls: Vec<f32>,
    /// The full features (CLS and patch tokens) of the kept images only.
    pub part: FeatureSet,
    /// The sampled patch rows `[k, D]` (empty without a [`RowSample`]).
    pub sampled: Vec<f32>,
}

/// The features of a probe set's images: the CLS token of every image, the full
/// [`FeatureSet`] (CLS and patch tokens) of images `keep` only, and the rows of `sample`.
/// Each batch is normalised from the set's bytes and moved to the backbone's device on its
/// own; patch tokens of the other images are never copied off the device. A labelled set
/// without label maps needs patch tokens only for the few images of the locality probes:
/// for 15 000 images at 224 px and width 768, keeping them all would hold 9 GB; the dense
/// probe fits on a bounded sample of its training patches.
pub fn extract_set(
    vit: &Vit,
    set: &ProbeSet,
    batch: usize,
    keep: std::ops::Range<usize>,
    sample: Option<RowSample>,
) -> Result<SetFeatures> {
    set.validate()?;
    let n = set.len();
    if keep.start > keep.end
        || keep.end > n
        || sample.is_some_and(|s| s.images > n || s.stride == 0)
    {
        return Err(ProbeError::shape(
            "kept patch tokens",
            format!("images {keep:?} and sample {sample:?} of {n}"),
        ));
    }
    let (h, w) = set.size;
    let got = extract_batches(vit, n, set.size, batch, keep.clone(), sample, |r| {
        Ok(ops::host::from_vec(
            set.pixels(r.clone()),
            (r.len(), 3, h, w),
        )?)
    })?;
    let dim = vit.cfg.embed_dim;
    let part = FeatureSet::new(
        keep.len(),
        dim,
        grid_of(vit, set.size)?,
        got.cls[keep.start * dim..keep.end * dim].to_vec(),
        got.patches,
    )?;
    Ok(SetFeatures {
        cls: got.cls,
        part,
        sampled: got.sampled,
    })
}

/// The patch grid of `size` images, which must be whole patches.
fn grid_of(vit: &Vit, (h, w): (usize, usize)) -> Result<(usize, usize)> {
    let p = vit.cfg.patch_size;
    if h % p != 0 || w % p != 0 || h == 0 || w == 0 {
        return Err(ProbeError::shape(
            "images",
            format!("size {h}x{w} is not a multiple of the patch size {p}"),
        ));
    }
    Ok((h / p, w / p))
}

/// The host buffers [`extract_batches`] fills.
struct Extracted {
    cls: Vec<f32>,
    patches: Vec<f32>,
    sampled: Vec<f32>,
}

/// The batched forward under the extractors: `fetch(range)` gives images `range` as a
/// `[k, 3, H, W]` tensor (any float dtype, any device); returns every image's CLS token
/// `[n, D]`, the patch tokens `[|keep|, P, D]` of images `keep` and the rows of `sample`
/// (selected on the device).
fn extract_batches(
    vit: &Vit,
    n: usize,
    size: (usize, usize),
    batch: usize,
    keep: std::ops::Range<usize>,
    sample: Option<RowSample>,
    mut fetch: impl FnMut(std::ops::Range<usize>) -> Result<Tensor>,
) -> Result<Extracted> {
    let grid = grid_of(vit, size)?;
    let p = grid.0 * grid.1;
    let dim = vit.cfg.embed_dim;
    let batch = batch.max(1);
    let mut cls = Vec::with_capacity(n * dim);
    let mut patches = Vec::with_capacity(keep.len() * p * dim);
    let mut sampled =
        Vec::with_capacity(sample.map_or(0, |s| (s.images * p).div_ceil(s.stride)) * dim);
    let dtype = vit.dtype();
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let chunk = fetch(start..end)?
            .to_device(&vit.device())?
            .to_dtype(dtype)?
            .contiguous()?;
        let f = vit.forward(&[CropGroup {
            images: &chunk,
            masks: None,
        }])?;
        cls.extend(ops::host::to_vec::<f32>(&f.cls(0)?)?);
        // `[k * P, D]`, image-major
        let tokens = f.patches(0)?;
        let (a, b) = (keep.start.max(start), keep.end.min(end));
        if a < b {
            let kept = tokens.narrow(0, (a - start) * p, (b - a) * p)?;
            patches.extend(ops::host::to_vec::<f32>(&kept)?);
        }
        if let Some(s) = sample {
            // (extract_set checked that the stride is positive)
            let stride = s.stride;
            // rows start * P .. min(end, images) * P of the sample's row numbering
            let (first, last) = (start * p, end.min(s.images) * p);
            let rows: Vec<u32> = (first.next_multiple_of(stride)..last)
                .step_by(stride)
                .map(|g| (g - first) as u32)
                .collect();
            if !rows.is_empty() {
                let k = rows.len();
                let idx = Tensor::from_vec(rows, k, tokens.device())?;
                sampled.extend(ops::host::to_vec::<f32>(&tokens.index_select(&idx, 0)?)?);
            }
        }
        start = end;
    }
    Ok(Extracted {
        cls,
        patches,
        sampled,
    })
}

/// How a probe set is drawn from a source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSetConfig {
    /// Side of the (square) evaluation images; a multiple of the patch size.
    #[serde(default = "d_size")]
    pub size: u32,
    /// Shorter side after resizing, before the centre crop (`None`: `size`, the whole short
    /// side is kept, which dense probes want).
    #[serde(default)]
    pub resize_size: Option<u32>,
    /// Training images of the probes (k-NN bank, linear-probe fit, dense-probe fit).
    #[serde(default = "d_n_train")]
    pub n_train: usize,
    /// Held-out images the probes are scored on.
    #[serde(default = "d_n_test")]
    pub n_test: usize,
    /// Decode threads while building; 0 (the default): one per available core. The result
    /// does not depend on it. A set is built when it is first probed, while training waits
    /// for the evaluation, so the cores are free.
    #[serde(default)]
    pub workers: usize,
}

fn d_size() -> u32 {
    112
}
fn d_n_train() -> usize {
    512
}
fn d_n_test() -> usize {
    256
}

/// Upper bound on the images of one probe set (cost guard against a config typo).
pub const MAX_PROBE_IMAGES: usize = 50_000;

impl Default for ProbeSetConfig {
    fn default() -> Self {
        Self {
            size: d_size(),
            resize_size: None,
            n_train: d_n_train(),
            n_test: d_n_test(),
            workers: 0,
        }
    }
}

impl ProbeSetConfig {
    /// Every problem with these values.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        if self.size < 8 || self.size > 2048 {
            p.push(format!("probe set size {} must be in 8..=2048", self.size));
        }
        if self.resize_size.is_some_and(|r| r < self.size) {
            p.push(format!(
                "probe set resize_size {:?} is smaller than size {}",
                self.resize_size, self.size
            ));
        }
        if self.n_train == 0 || self.n_test == 0 {
            p.push("probe set n_train and n_test must be positive".into());
        }
        if self.n_train + self.n_test > MAX_PROBE_IMAGES {
            p.push(format!(
                "probe set n_train + n_test = {} exceeds {MAX_PROBE_IMAGES}",
                self.n_train + self.n_test
            ));
        }
        p
    }
}

/// A fixed labelled set of evaluation images: the first `n_train` are the probes' training
/// part, the rest the test part.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSet {
    /// Name used in reports (e.g. `synthetic`, `copypaste`).
    pub name: String,
    /// Image size (H, W).
    pub size: (usize, usize),
    /// `[n, 3, H, W]` RGB8 planes after the evaluation transform's resize and crop, before
    /// normalisation: a quarter of the floats' memory. [`ProbeSet::pixels`] normalises.
    pub rgb: Vec<u8>,
    /// The normalisation of [`ProbeSet::rgb`] (the transform's mean and std).
    pub norm: data::Normalizer,
    /// Image-level classes, when every image has one.
    pub labels: Option<Vec<u32>>,
    /// `[n, H, W]` per-pixel classes (0 = background, `k + 1` = class `k`), when the source
    /// has label maps.
    pub label_maps: Option<Vec<u8>>,
    /// Number of image-level classes (dense classes are `n_classes + 1` with background).
    pub n_classes: usize,
    /// How many of the images form the training part.
    pub n_train: usize,
    /// Sample ids, for reports and debugging.
    pub ids: Vec<String>,
}

impl ProbeSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of test images.
    pub fn n_test(&self) -> usize {
        self.len() - self.n_train
    }

    /// Classes of the dense probe (background included).
    pub fn n_dense_classes(&self) -> usize {
        self.n_classes + 1
    }

    /// Bytes its buffers hold (pixels, label maps, labels).
    pub fn heap_bytes(&self) -> usize {
        self.rgb.len()
            + self.label_maps.as_ref().map_or(0, Vec::len)
            + self.labels.as_ref().map_or(0, |l| 4 * l.len())
    }

    /// Checks that every buffer matches the image count and size.
    pub fn validate(&self) -> Result<()> {
        let n = self.len();
        let (h, w) = self.size;
        let fail = |reason: String| {
            Err(ProbeError::ProbeSet {
                name: self.name.clone(),
                reason,
            })
        };
        if self.rgb.len() != n * 3 * h * w {
            return fail(format!(
                "{} pixel values for {n} images of 3x{h}x{w}",
                self.rgb.len()
            ));
        }
        if self.n_train == 0 || self.n_train >= n {
            return fail(format!(
                "needs at least one train and one test image (n_train {}, {n} images)",
                self.n_train
            ));
        }
        if let Some(l) = &self.labels {
            if l.len() != n {
                return fail(format!("{} labels for {n} images", l.len()));
            }
            if let Some(bad) = l.iter().find(|&&c| c as usize >= self.n_classes) {
                return fail(format!(
                    "label {bad} is not below n_classes {}",
                    self.n_classes
                ));
            }
        }
        if let Some(m) = &self.label_maps {
            if m.len() != n * h * w {
                return fail(format!(
                    "{} label-map values for {n} images of {h}x{w}",
                    m.len()
                ));
            }
            if let Some(bad) = m.iter().find(|&&c| c as usize > self.n_classes) {
                return fail(format!(
                    "label-map value {bad} exceeds n_classes {} (0 is background)",
                    self.n_classes
                ));
            }
        }
        Ok(())
    }

    /// Builds a probe set from `train` (and `test`, when the source has a separate test
    /// split; otherwise the test part comes from `train` too, disjoint from the training
    /// part). Indices are spread evenly over each source so that sources stored in class
    /// order still give every class to both parts. Unreadable samples are left out; the
    /// result is a pure function of the sources and `cfg`.
    pub fn build(
        name: &str,
        train: &dyn data::Source,
        test: Option<&dyn data::Source>,
        cfg: &ProbeSetConfig,
    ) -> Result<ProbeSet> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(ProbeError::Config(problems));
        }
        let fail = |reason: String| ProbeError::ProbeSet {
            name: name.to_string(),
            reason,
        };
        let len_of = |s: &dyn data::Source| {
            s.len()
                .ok_or_else(|| fail(format!("source {} has no length", s.describe())))
        };
        let (train_idx, test_idx) = match test {
            Some(t) => (
                spread(len_of(train)?, cfg.n_train),
                spread(len_of(t)?, cfg.n_test),
            ),
            None => split_interleaved(
                &spread(len_of(train)?, cfg.n_train + cfg.n_test),
                cfg.n_test,
            ),
        };
        let eval = data::EvalConfig {
            size: cfg.size,
            resize_size: cfg.resize_size,
            ..Default::default()
        };
        let workers = match cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let a = data::load_eval(train, &train_idx, &eval, workers)?;
        let b = data::load_eval(test.unwrap_or(train), &test_idx, &eval, workers)?;
        if a.labels.is_empty() || b.labels.is_empty() {
            return Err(fail(format!(
                "{} train and {} test images could be read",
                a.labels.len(),
                b.labels.len()
            )));
        }
        let n_classes = train.n_classes().unwrap_or(0);
        let labels: Option<Vec<u32>> = a.labels.iter().chain(&b.labels).copied().collect();
        let labels = labels.filter(|_| n_classes > 0);
        let label_maps = match (a.label_maps, b.label_maps) {
            (Some(mut x), Some(y)) => {
                x.extend(y);
                Some(x)
            }
            _ => None,
        };
        let n_classes = match (&label_maps, n_classes) {
            // A source with label maps but no class count: the largest value seen.
            (Some(m), 0) => m.iter().copied().max().unwrap_or(0) as usize,
            (_, c) => c,
        };
        let mut rgb = a.rgb;
        rgb.extend(b.rgb);
        let size = cfg.size as usize;
        let set = ProbeSet {
            name: name.to_string(),
            size: (size, size),
            rgb,
            norm: a.norm,
            labels,
            label_maps,
            n_classes,
            n_train: a.ids.len(),
            ids: a.ids.into_iter().chain(b.ids).collect(),
        };
        set.validate()?;
        Ok(set)
    }

    /// The normalised pixels `[k, 3, H, W]` of images `range`, as the backbone takes them.
    pub fn pixels(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        let hw = self.size.0 * self.size.1;
        self.norm
            .to_f32(&self.rgb[range.start * 3 * hw..range.end * 3 * hw], hw)
    }
}

/// `k` indices spread evenly over `0..len` (all of them when `k >= len`).
fn spread(len: u64, k: usize) -> Vec<u64> {
    let k = (k as u64).min(len);
    (0..k).map(|i| i * len / k).collect()
}

/// Splits `idx` into (train, test) with `n_test` test entries interleaved evenly.
fn split_interleaved(idx: &[u64], n_test: usize) -> (Vec<u64>, Vec<u64>) {
    let n = idx.len();
    let n_test = n_test.min(n.saturating_sub(1));
    let (mut tr, mut te) = (vec![], vec![]);
    for (j, &i) in idx.iter().enumerate() {
        // Bresenham: j is a test index when floor((j + 1) * t / n) steps up.
        if (j + 1) * n_test / n > j * n_test / n {
            te.push(i);
        } else {
            tr.push(i);
        }
    }
    (tr, te)
}

#[cfg(test)]
pub(crate) fn split_for_tests(idx: &[u64], n_test: usize) -> (Vec<u64>, Vec<u64>) {
    split_interleaved(idx, n_test)
}
