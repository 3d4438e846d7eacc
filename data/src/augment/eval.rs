//! The evaluation transform: resize the shorter side, center-crop, normalise; the label map gets the
//! same geometry with nearest-neighbour sampling so dense probes score against exact classes.

use fast_image_resize as fr;

use crate::augment::pixels;
use crate::config::EvalConfig;
use crate::error::{BadInput, DataError};
use crate::source::{Sample, Source};

/// One transformed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalImage {
    /// `[3, S, S]` normalised.
    pub pixels: Vec<f32>,
    /// `[S, S]` classes (0 = background) when the sample has a label map.
    pub label_map: Option<Vec<u8>>,
}

/// Source rectangle `(left, top, width, height)` that torchvision's `Resize(r)` + `CenterCrop(s)` keeps.
pub(crate) fn eval_box(width: u32, height: u32, resize: u32, size: u32) -> (f64, f64, f64, f64) {
    let (w, h) = (f64::from(width), f64::from(height));
    // torchvision: the short side becomes `resize`, the long side int(resize * long / short).
    let (new_w, new_h) = if width <= height {
        (f64::from(resize), (f64::from(resize) * h / w).floor())
    } else {
        ((f64::from(resize) * w / h).floor(), f64::from(resize))
    };
    let s = f64::from(size);
    let top = ((new_h - s) / 2.0).round_ties_even();
    let left = ((new_w - s) / 2.0).round_ties_even();
    let (sx, sy) = (w / new_w, h / new_h);
    (left * sx, top * sy, s * sx, s * sy)
}

/// Applies the evaluation transform to one sample.
pub fn eval_transform(sample: &Sample, cfg: &EvalConfig) -> EvalImage {
    let mut resizer = fr::Resizer::new();
    eval_transform_with(&mut resizer, sample, cfg)
}

fn eval_transform_with(resizer: &mut fr::Resizer, sample: &Sample, cfg: &EvalConfig) -> EvalImage {
    let (w, h) = sample.image.dimensions();
    let size = cfg.size as usize;
    let (left, top, bw, bh) = eval_box(w, h, cfg.resize_side(), cfg.size);
    let src = fr::images::ImageRef::new(w, h, sample.image.as_raw(), fr::PixelType::U8x3)
        .expect("buffer matches");
    let mut rgb = fr::images::Image::new(cfg.size, cfg.size, fr::PixelType::U8x3);
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
        .crop(left, top, bw, bh);
    resizer
        .resize(&src, &mut rgb, &opts)
        .expect("same pixel type");
    let mut out = vec![0.0; 3 * size * size];
    pixels::to_planes(rgb.buffer(), size, false, &mut out);
    pixels::normalize(&mut out, size * size, &cfg.mean, &cfg.std);
    let label_map = sample.label_map.as_ref().map(|lm| {
        let src = fr::images::ImageRef::new(lm.width, lm.height, &lm.data, fr::PixelType::U8)
            .expect("buffer matches");
        let mut dst = fr::images::Image::new(cfg.size, cfg.size, fr::PixelType::U8);
        let opts = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Nearest)
            .crop(left, top, bw, bh);
        resizer
            .resize(&src, &mut dst, &opts)
            .expect("same pixel type");
        dst.into_vec()
    });
    EvalImage {
        pixels: out,
        label_map,
    }
}

/// Evaluation images of a list of samples, stacked.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalBatch {
    /// Side of every image.
    pub size: u32,
    /// `[N, 3, S, S]` normalised.
    pub images: Vec<f32>,
    /// `[N, S, S]` classes when the source has label maps (0 where a sample lacks one).
    pub label_maps: Option<Vec<u8>>,
    /// Image-level labels.
    pub labels: Vec<Option<u32>>,
    /// Sample ids.
    pub ids: Vec<String>,
    /// Source indices actually loaded (unreadable ones are left out).
    pub indices: Vec<u64>,
    /// Samples that could not be read, in index order.
    pub bad: Vec<BadInput>,
}

/// Loads and transforms `indices` of `source` on `n_workers` threads (the result does not depend on
/// the number of threads). Unreadable samples are left out and listed in `bad`.
pub fn load_eval(
    source: &dyn Source,
    indices: &[u64],
    cfg: &EvalConfig,
    n_workers: usize,
) -> Result<EvalBatch, DataError> {
    cfg.validate()?;
    let n_workers = n_workers.max(1).min(indices.len().max(1));
    type Item = (u64, Result<(EvalImage, Option<u32>, String), BadInput>);
    let chunk = indices.len().div_ceil(n_workers).max(1);
    let results: Vec<Result<Vec<Item>, DataError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut resizer = fr::Resizer::new();
                    let mut out = Vec::with_capacity(part.len());
                    for &i in part {
                        match source.get(i) {
                            Ok(sample) => {
                                let img = eval_transform_with(&mut resizer, &sample, cfg);
                                out.push((i, Ok((img, sample.label, sample.id))));
                            }
                            Err(DataError::BadInput(b)) => out.push((i, Err(b))),
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(DataError::Loader("eval worker panicked".into())))
            })
            .collect()
    });
    let size = cfg.size as usize;
    let with_maps = source.has_label_maps();
    let mut batch = EvalBatch {
        size: cfg.size,
        images: Vec::with_capacity(indices.len() * 3 * size * size),
        label_maps: with_maps.then(|| Vec::with_capacity(indices.len() * size * size)),
        labels: Vec::new(),
        ids: Vec::new(),
        indices: Vec::new(),
        bad: Vec::new(),
    };
    for part in results {
        for (i, item) in part? {
            match item {
                Ok((img, label, id)) => {
                    batch.images.extend_from_slice(&img.pixels);
                    if let Some(maps) = batch.label_maps.as_mut() {
                        match img.label_map {
                            Some(m) => maps.extend_from_slice(&m),
                            None => maps.resize(maps.len() + size * size, 0),
                        }
                    }
                    batch.labels.push(label);
                    batch.ids.push(id);
                    batch.indices.push(i);
                }
                Err(b) => batch.bad.push(b),
            }
        }
    }
    Ok(batch)
}
