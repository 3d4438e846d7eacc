//! Helpers: small real image files and small configs.

use std::path::Path;

use image::{ImageBuffer, Rgb, RgbImage};

use crate::{CropConfig, LoaderOptions, MaskConfig, Order};

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
    }
}
