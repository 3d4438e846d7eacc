//! Helpers: small real image files and small configs.

use std::path::Path;

use image::{ImageBuffer, Rgb, RgbImage};

use crate::{CropConfig, HostBatch, LoaderOptions, MaskConfig, Order};

/// A colourful RGB image with structure (gradients and a checker) so crops differ.
pub(crate) fn pattern_image(w: u32, h: u32, salt: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        let checker = ((x / 7 + y / 5 + salt) % 2) as u8 * 60;
        Rgb([
            (x * 255 / w.max(1)) as u8 ^ checker,
            (y * 255 / h.max(1)) as u8,
            ((x + y + salt * 37) % 256) as u8,
        ])
    })
}

/// Writes `img` as a JPEG (quality 90).
pub(crate) fn write_jpeg(path: &Path, img: &RgbImage) {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(img)
        .expect("encode jpeg");
    std::fs::write(path, bytes).expect("write jpeg");
}

/// Writes any image buffer as PNG.
pub(crate) fn write_png<P, C>(path: &Path, img: &ImageBuffer<P, C>)
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    img.save_with_format(path, image::ImageFormat::Png)
        .expect("write png");
}

/// Small crops for fast tests: 2x32 + 3x16, patch 8, everything on.
pub(crate) fn small_crops() -> CropConfig {
    CropConfig {
        global_size: 32,
        local_size: 16,
        n_local: 3,
        ..CropConfig::default()
    }
}

/// Loader options around `small_crops`.
pub(crate) fn small_opts(batch_size: usize, n_workers: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        seed: 7,
        crops: small_crops(),
        masks: MaskConfig {
            patch_size: 8,
            ..MaskConfig::default()
        },
        n_workers,
        prefetch: 2,
        order: Order::Shuffled,
        part: None,
    }
}

/// Member `rank` of `world`'s part of a whole batch, cut from it row by row (crop-major
/// rows: crop c of image i is row c * B + i). Bad inputs are not cut (they belong to
/// whoever read the file).
pub(crate) fn part_of(whole: &HostBatch, rank: usize, world: usize) -> HostBatch {
    let b = whole.batch_size;
    let m = b / world;
    let images = rank * m..(rank + 1) * m;
    let cut = |v: &[f32], crops: usize| -> Vec<f32> {
        let row = v.len() / (crops * b);
        (0..crops)
            .flat_map(|c| v[(c * b + images.start) * row..(c * b + images.end) * row].iter())
            .copied()
            .collect()
    };
    let p = whole.n_patches();
    let masks = (0..2)
        .flat_map(|c| whole.masks[(c * b + images.start) * p..(c * b + images.end) * p].iter())
        .copied()
        .collect();
    HostBatch {
        batch_size: m,
        global_crops: cut(&whole.global_crops, 2),
        local_crops: cut(&whole.local_crops, whole.n_local),
        gram_crops: whole.gram_crops.as_ref().map(|g| cut(g, 2)),
        masks,
        labels: whole.labels[images.clone()].to_vec(),
        sample_ids: whole.sample_ids[images.clone()].to_vec(),
        source_indices: whole.source_indices[images].to_vec(),
        bad_inputs: Vec::new(),
        n_substituted: 0,
        ..whole.clone()
    }
}

/// A part with its bad-input bookkeeping cleared, to compare with [`part_of`].
pub(crate) fn without_bad_inputs(mut part: HostBatch) -> HostBatch {
    part.bad_inputs.clear();
    part.n_substituted = 0;
    part
}
