//! The dense linear probe: a linear classifier on final-norm patch tokens, trained on
//! patch-level labels (the class histogram of each patch's pixel block, or its majority
//! class), scored per pixel after bilinearly upsampling the patch logits to the
//! label-map resolution (`F.interpolate(mode="bilinear", align_corners=False)`, as the
//! official segmentation head does). Reports mIoU and pixel accuracy.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};
use crate::linear::{argmax, fit_softmax, FitConfig, FitReport, Targets};

/// What a patch is trained to predict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchTargets {
    /// The class histogram of the patch's pixels (soft cross-entropy).
    #[default]
    Soft,
    /// The most frequent class of the patch's pixels (ties to the lower class).
    Majority,
}

/// Result of one dense probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseResult {
    /// Mean IoU over the classes present in the test label maps.
    pub miou: f64,
    /// Fraction of test pixels classified right.
    pub pixel_accuracy: f64,
    /// Fraction of test patches whose predicted class is their majority class.
    pub patch_accuracy: f64,
    /// IoU per class (index 0 = background); `None` for classes absent from the test maps.
    pub per_class_iou: Vec<Option<f64>>,
    /// Training patches the classifier was fitted on.
    pub n_train_patches: usize,
    /// Test images.
    pub n_test_images: usize,
    /// How the fit ended.
    pub fit: FitReport,
}

/// Geometry shared by the feature grid and the label maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseGeometry {
    /// Label-map size (H, W) in pixels.
    pub size: (usize, usize),
    /// Patch grid (rows, cols).
    pub grid: (usize, usize),
    /// Classes including background.
    pub n_classes: usize,
}

impl DenseGeometry {
    fn patch_of(&self, y: usize, x: usize) -> usize {
        let gy = y * self.grid.0 / self.size.0;
        let gx = x * self.grid.1 / self.size.1;
        gy * self.grid.1 + gx
    }
}

/// Class histograms of every patch's pixel block: `[n * P, n_classes]`, rows summing to 1.
pub fn patch_histograms(label_maps: &[u8], geo: &DenseGeometry) -> Result<Vec<f32>> {
    let (h, w) = geo.size;
    let p = geo.grid.0 * geo.grid.1;
    let c = geo.n_classes;
    if h * w == 0 || label_maps.len() % (h * w) != 0 {
        return Err(ProbeError::shape(
            "label maps",
            format!("{} values are not maps of {h}x{w}", label_maps.len()),
        ));
    }
    let n = label_maps.len() / (h * w);
    let mut counts = vec![0u32; n * p * c];
    for (i, map) in label_maps.chunks_exact(h * w).enumerate() {
        for y in 0..h {
            for x in 0..w {
                let k = map[y * w + x] as usize;
                if k >= c {
                    return Err(ProbeError::shape(
                        "label maps",
                        format!("class {k} is not below {c}"),
                    ));
                }
                counts[(i * p + geo.patch_of(y, x)) * c + k] += 1;
            }
        }
    }
    Ok(counts
        .chunks_exact(c)
        .flat_map(|row| {
            let total: u32 = row.iter().sum();
            row.iter().map(move |&v| {
                if total == 0 {
                    0.0
                } else {
                    v as f32 / total as f32
                }
            })
        })
        .collect())
}

/// `values [gh, gw, ch]` resized to `[H, W, ch]` by bilinear interpolation with
/// `align_corners = False` (pixel centres; the source coordinate is clamped at 0).
pub fn upsample_bilinear(
    values: &[f32],
    grid: (usize, usize),
    channels: usize,
    out: (usize, usize),
) -> Vec<f32> {
    let mut res = vec![0f32; out.0 * out.1 * channels];
    let ys: Vec<_> = (0..out.0).map(|y| taps(y, grid.0, out.0)).collect();
    let xs: Vec<_> = (0..out.1).map(|x| taps(x, grid.1, out.1)).collect();
    for (y, &(y0, y1, ly)) in ys.iter().enumerate() {
        for (x, &(x0, x1, lx)) in xs.iter().enumerate() {
            let o = (y * out.1 + x) * channels;
            interp(
                values,
                grid.1,
                channels,
                (y0, y1, ly),
                (x0, x1, lx),
                &mut res[o..o + channels],
            );
        }
    }
    res
}

/// Source taps `(i0, i1, weight of i1)` of output index `o` when resizing `n_in -> n_out`.
fn taps(o: usize, n_in: usize, n_out: usize) -> (usize, usize, f32) {
    let src = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n_in - 1);
    let i1 = (i0 + 1).min(n_in - 1);
    (i0, i1, (src - i0 as f64) as f32)
}

fn interp(
    v: &[f32],
    gw: usize,
    ch: usize,
    (y0, y1, ly): (usize, usize, f32),
    (x0, x1, lx): (usize, usize, f32),
    out: &mut [f32],
) {
    let at = |y: usize, x: usize| &v[(y * gw + x) * ch..(y * gw + x + 1) * ch];
    let (a, b, c, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
    for k in 0..ch {
        let top = a[k] * (1.0 - lx) + b[k] * lx;
        let bot = c[k] * (1.0 - lx) + d[k] * lx;
        out[k] = top * (1.0 - ly) + bot * ly;
    }
}

/// A confusion matrix `counts[truth * C + pred]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confusion {
    /// Classes.
    pub n_classes: usize,
    /// Pixel counts.
    pub counts: Vec<u64>,
}

impl Confusion {
    /// An empty matrix.
    pub fn new(n_classes: usize) -> Self {
        Self {
            n_classes,
            counts: vec![0; n_classes * n_classes],
        }
    }

    /// Counts one prediction.
    pub fn add(&mut self, truth: usize, pred: usize) {
        self.counts[truth * self.n_classes + pred] += 1;
    }

    /// Adds another matrix.
    pub fn merge(&mut self, other: &Confusion) {
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
    }

    /// IoU per class; `None` where the class has no ground-truth pixel.
    pub fn iou(&self) -> Vec<Option<f64>> {
        let c = self.n_classes;
        (0..c)
            .map(|k| {
                let tp = self.counts[k * c + k];
                let gt: u64 = self.counts[k * c..(k + 1) * c].iter().sum();
                let pred: u64 = (0..c).map(|t| self.counts[t * c + k]).sum();
                (gt > 0).then(|| tp as f64 / (gt + pred - tp) as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes with ground-truth pixels (0 when there are none).
    pub fn miou(&self) -> f64 {
        let v: Vec<f64> = self.iou().into_iter().flatten().collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Fraction on the diagonal.
    pub fn accuracy(&self) -> f64 {
        let total: u64 = self.counts.iter().sum();
        let diag: u64 = (0..self.n_classes)
            .map(|k| self.counts[k * self.n_classes + k])
            .sum();
        if total == 0 {
            0.0
        } else {
            diag as f64 / total as f64
        }
    }
}

/// Dense probe settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseSettings {
    /// Patch training targets.
    pub targets: PatchTargets,
    /// The logistic-regression fit.
    pub fit: FitConfig,
    /// At most this many training patches, taken at an even stride (bounds the fit's cost).
    pub max_train_patches: usize,
}

/// The even stride at which the dense probe samples `rows` training patch rows down to at
/// most `max`: it fits on rows `0, stride, 2 * stride, ...` (counted image-major).
pub fn train_stride(rows: usize, max: usize) -> usize {
    rows.div_ceil(max.max(1)).max(1)
}

/// Every `stride`-th row of `rows [k, dim]`, from row 0.
pub fn sample_rows(rows: &[f32], dim: usize, stride: usize) -> Vec<f32> {
    rows.chunks_exact(dim)
        .step_by(stride.max(1))
        .flatten()
        .copied()
        .collect()
}

/// The rows of `train_patches [rows, dim]` the dense probe fits on with at most `max`
/// rows: all of them in place, or every [`train_stride`]-th one.
pub fn train_rows(train_patches: &[f32], dim: usize, max: usize) -> std::borrow::Cow<'_, [f32]> {
    let stride = train_stride(train_patches.len() / dim.max(1), max);
    if stride == 1 {
        train_patches.into()
    } else {
        sample_rows(train_patches, dim, stride).into()
    }
}

/// Trains on `train_patches [n_tr * P, D]` with `train_maps [n_tr, H, W]` and scores on the
/// test images.
pub fn dense_probe(
    train_patches: &[f32],
    train_maps: &[u8],
    test_patches: &[f32],
    test_maps: &[u8],
    dim: usize,
    geo: &DenseGeometry,
    settings: &DenseSettings,
) -> Result<DenseResult> {
    let (h, w) = geo.size;
    let p = geo.grid.0 * geo.grid.1;
    let n_tr = train_maps.len() / (h * w).max(1);
    if train_patches.len() != n_tr * p * dim {
        return Err(ProbeError::shape(
            "dense probe",
            format!(
                "{} training patch values for {n_tr} label maps, grid {:?}, width {dim}",
                train_patches.len(),
                geo.grid
            ),
        ));
    }
    dense_probe_sampled(
        &train_rows(train_patches, dim, settings.max_train_patches),
        train_maps,
        test_patches,
        test_maps,
        dim,
        geo,
        settings,
    )
}

/// [`dense_probe`] given only the training rows it fits on: `train_rows` are rows
/// `0, s, 2s, ...` of the training patch tokens `[n_tr * P, D]`, where `s` is
/// [`train_stride`]`(n_tr * P, settings.max_train_patches)`. A caller that extracts
/// features batch by batch need not hold every training image's patch tokens.
pub fn dense_probe_sampled(
    train_rows: &[f32],
    train_maps: &[u8],
    test_patches: &[f32],
    test_maps: &[u8],
    dim: usize,
    geo: &DenseGeometry,
    settings: &DenseSettings,
) -> Result<DenseResult> {
    let (h, w) = geo.size;
    let p = geo.grid.0 * geo.grid.1;
    let c = geo.n_classes;
    if geo.grid.0 == 0 || geo.grid.1 == 0 || geo.grid.0 > h || geo.grid.1 > w || c < 2 {
        return Err(ProbeError::shape(
            "dense probe",
            format!("grid {:?} over {h}x{w} pixels with {c} classes", geo.grid),
        ));
    }
    let n_tr = train_maps.len() / (h * w);
    let n_te = test_maps.len() / (h * w);
    let stride = train_stride(n_tr * p, settings.max_train_patches);
    if train_rows.len() != (n_tr * p).div_ceil(stride) * dim
        || test_patches.len() != n_te * p * dim
        || train_maps.len() != n_tr * h * w
        || test_maps.len() != n_te * h * w
    {
        return Err(ProbeError::shape(
            "dense probe",
            format!("{} sampled training (stride {stride}) / {} test patch values and {} / {} label values for grid {:?}, width {dim}, maps {h}x{w}", train_rows.len(), test_patches.len(), train_maps.len(), test_maps.len(), geo.grid),
        ));
    }
    let hist = sample_rows(&patch_histograms(train_maps, geo)?, c, stride);
    let n_fit = hist.len() / c;
    let majority: Vec<u32> = hist.chunks_exact(c).map(argmax).collect();
    let targets = match settings.targets {
        PatchTargets::Soft => Targets::Soft(&hist),
        PatchTargets::Majority => Targets::Hard(&majority),
    };
    let (clf, fit) = fit_softmax(train_rows, dim, targets, c, &settings.fit)?;
    let logits = clf.logits(test_patches)?;
    let test_hist = patch_histograms(test_maps, geo)?;
    let patch_hits = logits
        .chunks_exact(c)
        .zip(test_hist.chunks_exact(c))
        .filter(|(l, t)| argmax(l) == argmax(t))
        .count();
    let ys: Vec<_> = (0..h).map(|y| taps(y, geo.grid.0, h)).collect();
    let xs: Vec<_> = (0..w).map(|x| taps(x, geo.grid.1, w)).collect();
    let conf = (0..n_te)
        .into_par_iter()
        .map(|i| {
            let lg = &logits[i * p * c..(i + 1) * p * c];
            let map = &test_maps[i * h * w..(i + 1) * h * w];
            let mut m = Confusion::new(c);
            let mut px = vec![0f32; c];
            for (y, &ty) in ys.iter().enumerate() {
                for (x, &tx) in xs.iter().enumerate() {
                    interp(lg, geo.grid.1, c, ty, tx, &mut px);
                    m.add(map[y * w + x] as usize, argmax(&px) as usize);
                }
            }
            m
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(Confusion::new(c), |mut a, b| {
            a.merge(&b);
            a
        });
    Ok(DenseResult {
        miou: conf.miou(),
        pixel_accuracy: conf.accuracy(),
        patch_accuracy: if n_te == 0 {
            0.0
        } else {
            patch_hits as f64 / (n_te * p) as f64
        },
        per_class_iou: conf.iou(),
        n_train_patches: n_fit,
        n_test_images: n_te,
        fit,
    })
}
