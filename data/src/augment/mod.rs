//! The DINOv3 multi-crop augmentation (`dinov3/data/augmentations.py`) and the evaluation transform.
//!
//! Per sample: 2 global crops and `n_local` local crops, each a RandomResizedCrop (torchvision's
//! 10-attempt algorithm with its center-crop fallback, bicubic resampling done by `fast_image_resize`
//! with the crop box inside the resizer), a horizontal flip, then colour jitter (p 0.8, the four
//! operations in random order), grayscale (p 0.2), Gaussian blur (kernel 9, sigma U(0.1, 2), per-crop
//! probability by [`BlurConvention`](crate::BlurConvention)) and solarize (global crop 1 only, p 0.2),
//! then ImageNet normalisation. With a Gram-teacher size, the global crop box is resampled once at
//! max(global, gram) and resized to both sizes, so the two views share crop box and flip; with
//! `gram_teacher_no_distortions` the Gram view gets no photometric change.
//!
//! Every crop draws from its own stream keyed by (seed, epoch, position in epoch, crop index), in a
//! fixed order: crop box, flip, jitter (apply?, order, four factors), grayscale, blur (apply?, sigma),
//! solarize. The result is therefore independent of threads and of every other crop.

pub(crate) mod eval;
pub(crate) mod pixels;

use fast_image_resize as fr;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::config::{CropConfig, CropSizes};
use crate::rng::{domain, KeyedRng};
use pixels::BlurScratch;

/// A crop rectangle in source pixels (torchvision's `(i, j, h, w)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// Python's `round` (half to even) as torchvision relies on.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// torchvision `RandomResizedCrop.get_params`: up to 10 attempts at a box with area fraction in
/// `scale` and log-uniform aspect ratio in `ratio` that fits the image, else a center crop clamped to
/// the ratio range.
pub fn random_resized_crop(
    rng: &mut KeyedRng,
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropBox {
    let area = f64::from(width) * f64::from(height);
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform_range(scale.0, scale.1);
        let aspect = rng.uniform_range(log_ratio.0, log_ratio.1).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if 0.0 < w && w <= f64::from(width) && 0.0 < h && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.below(u64::from(height - h) + 1) as u32;
            let left = rng.below(u64::from(width - w) + 1) as u32;
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            (round_half_even(f64::from(width) / ratio.0) as u32).max(1),
        )
    } else if in_ratio > ratio.1 {
        (
            (round_half_even(f64::from(height) * ratio.1) as u32).max(1),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Colour-jitter parameters of one crop.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JitterParams {
    /// Order of the operations: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    pub order: [u8; 4],
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue shift (turns).
    pub hue: f32,
}

/// Photometric choices of one crop.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Photometric {
    /// Colour jitter, when applied.
    pub jitter: Option<JitterParams>,
    /// Converted to grey.
    pub grayscale: bool,
    /// Gaussian blur sigma, when blurred.
    pub blur_sigma: Option<f32>,
    /// Solarized.
    pub solarize: bool,
}

/// What was done to one crop (for tests, debugging and pictures).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CropRecord {
    /// The crop box in the source image.
    pub crop_box: CropBox,
    /// Horizontally flipped.
    pub flipped: bool,
    /// Photometric choices (of the student view for global crops).
    pub photometric: Photometric,
}

/// Identifies a sample's random streams: (seed, epoch, position within the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Run seed.
    pub seed: u64,
    /// Epoch.
    pub epoch: u64,
    /// Position in the epoch's order.
    pub position: u64,
}

impl SampleKey {
    fn crop_rng(&self, crop: usize) -> KeyedRng {
        KeyedRng::new(&[
            self.seed,
            domain::AUGMENT,
            self.epoch,
            self.position,
            crop as u64,
        ])
    }
}

/// The crops of one sample, planar normalised f32, crop-major within each kind.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiCrop {
    /// Sizes used.
    pub sizes: CropSizes,
    /// `[2, 3, G, G]`.
    pub global: Vec<f32>,
    /// `[n_local, 3, L, L]`.
    pub local: Vec<f32>,
    /// `[2, 3, S, S]` when a Gram size is set.
    pub gram: Option<Vec<f32>>,
    /// One record per crop: global 0, global 1, then the locals.
    pub records: Vec<CropRecord>,
}

/// Where the crops of one sample go (the loader writes straight into batch rows).
pub(crate) trait CropSink {
    /// Global crop `c` (`3 G G` floats) and, when a Gram size is set, its Gram view (`3 S S`).
    fn global_pair(&mut self, c: usize) -> (&mut [f32], Option<&mut [f32]>);
    /// Local crop `c` (`3 L L` floats).
    fn local(&mut self, c: usize) -> &mut [f32];
}

struct OwnedSink<'a>(&'a mut MultiCrop, usize, usize, usize);

impl CropSink for OwnedSink<'_> {
    fn global_pair(&mut self, c: usize) -> (&mut [f32], Option<&mut [f32]>) {
        let (g, s) = (self.1, self.3);
        let gram = self.0.gram.as_mut().map(|v| &mut v[c * s..(c + 1) * s]);
        (&mut self.0.global[c * g..(c + 1) * g], gram)
    }
    fn local(&mut self, c: usize) -> &mut [f32] {
        let l = self.2;
        &mut self.0.local[c * l..(c + 1) * l]
    }
}

/// Reusable state of one worker: the resizer and scratch buffers, so a sample allocates nothing.
pub struct Augmenter {
    cfg: CropConfig,
    resizer: fr::Resizer,
    u8_big: Vec<u8>,
    u8_small: Vec<u8>,
    planes: Vec<f32>,
    blur: BlurScratch,
    kernel_cache: Vec<f32>,
}

impl std::fmt::Debug for Augmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Augmenter")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Augmenter {
    /// An augmenter for this config (validate the config first).
    pub fn new(cfg: CropConfig) -> Self {
        Augmenter {
            cfg,
            resizer: fr::Resizer::new(),
            u8_big: Vec::new(),
            u8_small: Vec::new(),
            planes: Vec::new(),
            blur: BlurScratch::default(),
            kernel_cache: Vec::new(),
        }
    }

    /// The config.
    pub fn config(&self) -> &CropConfig {
        &self.cfg
    }

    /// All crops of one sample into freshly allocated buffers.
    pub fn multicrop(&mut self, image: &RgbImage, sizes: CropSizes, key: SampleKey) -> MultiCrop {
        let g = 3 * (sizes.global as usize).pow(2);
        let l = 3 * (sizes.local as usize).pow(2);
        let s = sizes.gram.map_or(0, |s| 3 * (s as usize).pow(2));
        let mut out = MultiCrop {
            sizes,
            global: vec![0.0; 2 * g],
            local: vec![0.0; self.cfg.n_local * l],
            gram: sizes.gram.map(|_| vec![0.0; 2 * s]),
            records: Vec::with_capacity(2 + self.cfg.n_local),
        };
        let mut records = Vec::with_capacity(2 + self.cfg.n_local);
        self.run(
            image,
            sizes,
            key,
            &mut OwnedSink(&mut out, g, l, s),
            Some(&mut records),
        );
        out.records = records;
        out
    }

    /// All crops of one sample into `sink`.
    pub(crate) fn run(
        &mut self,
        image: &RgbImage,
        sizes: CropSizes,
        key: SampleKey,
        sink: &mut dyn CropSink,
        mut records: Option<&mut Vec<CropRecord>>,
    ) {
        let src = fr::images::ImageRef::new(
            image.width(),
            image.height(),
            image.as_raw(),
            fr::PixelType::U8x3,
        )
        .expect("an RgbImage buffer matches its dimensions");
        let blur_p = self.cfg.blur.probabilities();
        for (c, &crop_blur_p) in blur_p[..2].iter().enumerate() {
            let mut rng = key.crop_rng(c);
            let solarize_p = if c == 1 { self.cfg.solarize_p } else { 0.0 };
            let rec = self.global_crop(&src, &mut rng, sizes, crop_blur_p, solarize_p, sink, c);
            if let Some(r) = records.as_deref_mut() {
                r.push(rec);
            }
        }
        let side = sizes.local as usize;
        for c in 0..self.cfg.n_local {
            let mut rng = key.crop_rng(2 + c);
            let crop_box = random_resized_crop(
                &mut rng,
                image.width(),
                image.height(),
                self.cfg.local_scale,
                self.cfg.ratio,
            );
            let flipped = rng.bernoulli(self.cfg.flip_p);
            let photometric = self.draw_photometric(&mut rng, blur_p[2], 0.0);
            resize_u8(&mut self.resizer, &src, crop_box, side, &mut self.u8_small);
            let out = sink.local(c);
            pixels::to_planes(&self.u8_small, side, flipped, out);
            self.apply_photometric(Target::Slice(&mut *out), side, &photometric);
            pixels::normalize(out, side * side, &self.cfg.mean, &self.cfg.std);
            if let Some(r) = records.as_deref_mut() {
                r.push(CropRecord {
                    crop_box,
                    flipped,
                    photometric,
                });
            }
        }
    }

    fn draw_photometric(&self, rng: &mut KeyedRng, blur_p: f64, solarize_p: f64) -> Photometric {
        let cj = &self.cfg.color_jitter;
        let jitter = if rng.bernoulli(cj.p) {
            let mut order = [0u8, 1, 2, 3];
            rng.shuffle(&mut order);
            let mut factor =
                |amount: f64| rng.uniform_range((1.0 - amount).max(0.0), 1.0 + amount) as f32;
            let brightness = factor(cj.brightness);
            let contrast = factor(cj.contrast);
            let saturation = factor(cj.saturation);
            let hue = rng.uniform_range(-cj.hue, cj.hue) as f32;
            Some(JitterParams {
                order,
                brightness,
                contrast,
                saturation,
                hue,
            })
        } else {
            None
        };
        let grayscale = rng.bernoulli(self.cfg.grayscale_p);
        let blur_sigma = rng
            .bernoulli(blur_p)
            .then(|| rng.uniform_range(self.cfg.blur_sigma.0, self.cfg.blur_sigma.1) as f32);
        let solarize = rng.bernoulli(solarize_p);
        Photometric {
            jitter,
            grayscale,
            blur_sigma,
            solarize,
        }
    }

    fn apply_photometric(&mut self, target: Target<'_>, side: usize, p: &Photometric) {
        let planes: &mut [f32] = match target {
            Target::Slice(s) => s,
            Target::Scratch => &mut self.planes,
        };
        let n = side * side;
        if let Some(j) = p.jitter {
            for op in j.order {
                match op {
                    0 => pixels::adjust_brightness(&mut planes[..3 * n], j.brightness),
                    1 => pixels::adjust_contrast(planes, n, j.contrast),
                    2 => pixels::adjust_saturation(planes, n, j.saturation),
                    _ => {
                        if j.hue != 0.0 {
                            pixels::adjust_hue(planes, n, j.hue)
                        }
                    }
                }
            }
        }
        if p.grayscale {
            pixels::grayscale(planes, n);
        }
        if let Some(sigma) = p.blur_sigma {
            let kernel = &mut self.kernel_cache;
            *kernel = pixels::gaussian_kernel(self.cfg.blur_kernel, sigma);
            pixels::gaussian_blur(planes, side, kernel, &mut self.blur);
        }
        if p.solarize {
            pixels::solarize(
                &mut planes[..3 * n],
                f32::from(self.cfg.solarize_threshold) / 255.0,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn global_crop(
        &mut self,
        src: &fr::images::ImageRef<'_>,
        rng: &mut KeyedRng,
        sizes: CropSizes,
        blur_p: f64,
        solarize_p: f64,
        sink: &mut dyn CropSink,
        c: usize,
    ) -> CropRecord {
        let crop_box = random_resized_crop(
            rng,
            src.width(),
            src.height(),
            self.cfg.global_scale,
            self.cfg.ratio,
        );
        let flipped = rng.bernoulli(self.cfg.flip_p);
        let photometric = self.draw_photometric(rng, blur_p, solarize_p);
        let g = sizes.global as usize;
        let (mean, std) = (self.cfg.mean, self.cfg.std);
        let Some(s) = sizes.gram.map(|s| s as usize) else {
            resize_u8(&mut self.resizer, src, crop_box, g, &mut self.u8_big);
            let (out, _) = sink.global_pair(c);
            pixels::to_planes(&self.u8_big, g, flipped, out);
            self.apply_photometric(Target::Slice(&mut *out), g, &photometric);
            pixels::normalize(out, g * g, &mean, &std);
            return CropRecord {
                crop_box,
                flipped,
                photometric,
            };
        };
        // One crop at the larger size, resized to both sizes: identical box and flip.
        let m = g.max(s);
        resize_u8(&mut self.resizer, src, crop_box, m, &mut self.u8_big);
        if self.cfg.gram_teacher_no_distortions {
            // Gram view: geometry only. Student view: resized first, then distorted.
            let (global_out, gram_out) = sink.global_pair(c);
            let gram_out = gram_out.expect("sink has Gram rows when sizes.gram is set");
            let views: [(usize, &mut [f32], bool); 2] =
                [(s, gram_out, false), (g, global_out, true)];
            for (side, out, distort) in views {
                if side == m {
                    pixels::to_planes(&self.u8_big, m, flipped, out);
                } else {
                    resize_u8_square(&mut self.resizer, &self.u8_big, m, side, &mut self.u8_small);
                    pixels::to_planes(&self.u8_small, side, flipped, out);
                }
                if distort {
                    self.apply_photometric(Target::Slice(&mut *out), side, &photometric);
                }
                pixels::normalize(out, side * side, &mean, &std);
            }
        } else {
            // Distorted at the larger size, then resized to both (the official order).
            self.planes.resize(3 * m * m, 0.0);
            pixels::to_planes(&self.u8_big, m, flipped, &mut self.planes);
            self.apply_photometric(Target::Scratch, m, &photometric);
            pixels::normalize(&mut self.planes, m * m, &mean, &std);
            let (global_out, gram_out) = sink.global_pair(c);
            let gram_out = gram_out.expect("sink has Gram rows when sizes.gram is set");
            for (side, out) in [(g, global_out), (s, gram_out)] {
                if side == m {
                    out.copy_from_slice(&self.planes[..3 * m * m]);
                } else {
                    resize_planes(&mut self.resizer, &self.planes, m, side, out);
                }
            }
        }
        CropRecord {
            crop_box,
            flipped,
            photometric,
        }
    }
}

enum Target<'a> {
    Slice(&'a mut [f32]),
    Scratch,
}

fn bicubic() -> fr::ResizeOptions {
    fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
}

/// Resamples `crop_box` of `src` to `side x side` RGB8 into `dst`.
fn resize_u8(
    resizer: &mut fr::Resizer,
    src: &fr::images::ImageRef<'_>,
    crop_box: CropBox,
    side: usize,
    dst: &mut Vec<u8>,
) {
    dst.resize(side * side * 3, 0);
    let mut out =
        fr::images::Image::from_slice_u8(side as u32, side as u32, dst, fr::PixelType::U8x3)
            .expect("buffer sized");
    let opts = bicubic().crop(
        f64::from(crop_box.left),
        f64::from(crop_box.top),
        f64::from(crop_box.width),
        f64::from(crop_box.height),
    );
    resizer
        .resize(src, &mut out, &opts)
        .expect("same pixel type");
}

/// Resizes a square RGB8 buffer.
fn resize_u8_square(
    resizer: &mut fr::Resizer,
    src: &[u8],
    from: usize,
    to: usize,
    dst: &mut Vec<u8>,
) {
    let src = fr::images::ImageRef::new(
        from as u32,
        from as u32,
        &src[..from * from * 3],
        fr::PixelType::U8x3,
    )
    .expect("buffer sized");
    dst.resize(to * to * 3, 0);
    let mut out = fr::images::Image::from_slice_u8(to as u32, to as u32, dst, fr::PixelType::U8x3)
        .expect("buffer sized");
    resizer
        .resize(&src, &mut out, &bicubic())
        .expect("same pixel type");
}

/// Resizes `[3, from, from]` float planes to `[3, to, to]`.
fn resize_planes(resizer: &mut fr::Resizer, src: &[f32], from: usize, to: usize, dst: &mut [f32]) {
    for c in 0..3 {
        let plane = &src[c * from * from..(c + 1) * from * from];
        let src_img = fr::images::ImageRef::new(
            from as u32,
            from as u32,
            bytemuck::cast_slice(plane),
            fr::PixelType::F32,
        )
        .expect("buffer sized");
        let out_plane = &mut dst[c * to * to..(c + 1) * to * to];
        let mut out = fr::images::Image::from_slice_u8(
            to as u32,
            to as u32,
            bytemuck::cast_slice_mut(out_plane),
            fr::PixelType::F32,
        )
        .expect("buffer sized and aligned");
        resizer
            .resize(&src_img, &mut out, &bicubic())
            .expect("same pixel type");
    }
}

/// The resize helpers, for tests that rebuild a crop independently.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Bicubic resize of a square RGB8 image to `to x to`.
    pub(crate) fn resize_square(img: &RgbImage, to: usize, out: &mut Vec<u8>) {
        resize_u8_square(
            &mut fr::Resizer::new(),
            img.as_raw(),
            img.width() as usize,
            to,
            out,
        );
    }

    /// Bicubic resize of `[3, from, from]` float planes.
    pub(crate) fn resize_planes(src: &[f32], from: usize, to: usize, dst: &mut [f32]) {
        super::resize_planes(&mut fr::Resizer::new(), src, from, to, dst);
    }
}
