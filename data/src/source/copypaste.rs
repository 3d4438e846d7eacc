//! Copy-paste segmentation from real photos: the dense-evaluation set of `datasets.md`
//! ("Fallback plan", item 1).
//!
//! Foregrounds are Tux Paint photo cut-outs with hand-made alpha mattes (class = the first two folder
//! levels, e.g. `animals/birds`); a "photo-like" filter (many distinct opaque colours) drops clip-art.
//! Each scene is a random square crop of a real wallpaper photo with 1-3 cut-outs pasted at random
//! scale, position and flip, later ones occluding earlier ones. The label map is exact: a pixel gets
//! `class + 1` where the pasted alpha is > 127 (0 = background). Cut-outs are split into train and
//! test *by file*, per class, so no object appears in both splits. Everything is a pure function of
//! the seed and the input files, so a rebuild gives the same bytes.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use fast_image_resize as fr;
use image::{GrayImage, RgbImage, RgbaImage};
use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_PIXEL_LIMIT;
use crate::decode::decode_rgb;
use crate::error::{BadInput, BadReason, DataError};
use crate::rng::{domain, KeyedRng};
use crate::source::{rel_id, LabelMap, Sample, Source, Split};

/// Manifest format version.
pub(crate) const MANIFEST_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";

/// Parameters of the copy-paste builder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopyPasteConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Scene side in pixels.
    pub size: u32,
    /// Scenes in the train split.
    pub n_train: usize,
    /// Scenes in the test split.
    pub n_test: usize,
    /// Fewest cut-outs per scene.
    pub min_objects: u32,
    /// Most cut-outs per scene.
    pub max_objects: u32,
    /// Longer side of a pasted cut-out as a fraction of the scene side (uniform range).
    pub object_scale: (f64, f64),
    /// A cut-out is photo-like when its opaque pixels have more distinct colours than this.
    pub min_unique_colors: usize,
    /// Classes with fewer photo-like cut-outs are dropped.
    pub min_stamps_per_class: usize,
    /// Fraction of each class's cut-out files held out for the test split (at least one).
    pub test_fraction: f64,
    /// Backgrounds are downscaled to at most this side once, before cropping.
    pub background_max_side: u32,
    /// Threads used to build (the output does not depend on it, so it is not recorded).
    #[serde(skip)]
    pub n_threads: usize,
}

impl Default for CopyPasteConfig {
    fn default() -> Self {
        CopyPasteConfig {
            seed: 0,
            size: 224,
            n_train: 2000,
            n_test: 500,
            min_objects: 1,
            max_objects: 3,
            object_scale: (0.3, 0.7),
            min_unique_colors: 3000,
            min_stamps_per_class: 6,
            test_fraction: 0.25,
            background_max_side: 1280,
            n_threads: 2,
        }
    }
}

/// One pasted cut-out of a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PastedObject {
    /// Class index.
    pub class: u32,
    /// The cut-out file, relative to the stamps folder.
    pub stamp: String,
    /// Left edge in the scene (may be negative: partly outside).
    pub left: i64,
    /// Top edge in the scene.
    pub top: i64,
    /// Pasted width.
    pub width: u32,
    /// Pasted height.
    pub height: u32,
    /// Whether the cut-out was mirrored.
    pub flipped: bool,
    /// Pixels of the label map that show this object after occlusion.
    pub visible_pixels: u64,
}

/// One scene of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyPasteEntry {
    /// `train/000012` etc.
    pub id: String,
    /// Image file, relative to the set folder.
    pub image: String,
    /// Label-map file (8-bit grey PNG, 0 = background, class + 1), relative to the set folder.
    pub label_map: String,
    /// Image-level class: the object with the largest visible area.
    pub label: u32,
    /// Pasted objects in paste (depth) order, first = farthest.
    pub objects: Vec<PastedObject>,
    /// Background photo file name and the square crop taken from it (left, top, side), in pixels of
    /// the downscaled background.
    pub background: (String, f64, f64, f64),
}

/// `manifest.json` of a built set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyPasteManifest {
    /// Format version.
    pub version: u32,
    /// The builder parameters.
    pub config: CopyPasteConfig,
    /// Class names (index = label).
    pub classes: Vec<String>,
    /// Cut-out files used by the train split, per class.
    pub train_stamps: Vec<Vec<String>>,
    /// Cut-out files used by the test split, per class.
    pub test_stamps: Vec<Vec<String>>,
    /// Background photos used.
    pub backgrounds: Vec<String>,
    /// Train scenes.
    pub train: Vec<CopyPasteEntry>,
    /// Test scenes.
    pub test: Vec<CopyPasteEntry>,
}

struct Stamp {
    name: String,
    image: RgbaImage,
}

fn list_files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            list_files(&p, exts, out)?;
        } else if p
            .extension()
            .is_some_and(|e| exts.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Crops an RGBA image to the bounding box of its opaque (alpha > 127) pixels.
fn trim_to_alpha(img: &RgbaImage) -> Option<RgbaImage> {
    let (w, h) = img.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p[3] > 127 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    (x1 > x0 && y1 > y0)
        .then(|| image::imageops::crop_imm(img, x0, y0, x1 - x0, y1 - y0).to_image())
}

fn unique_opaque_colors(img: &RgbaImage) -> usize {
    let mut seen = HashSet::with_capacity(4096);
    for p in img.pixels() {
        if p[3] > 127 {
            seen.insert(u32::from_le_bytes([p[0], p[1], p[2], 0]));
        }
    }
    seen.len()
}

/// Loads the photo-like cut-outs, grouped by class (first two folder levels; `cartoon` folders skipped).
fn load_stamps(
    stamps_dir: &Path,
    cfg: &CopyPasteConfig,
) -> Result<BTreeMap<String, Vec<Stamp>>, DataError> {
    let mut files = Vec::new();
    list_files(stamps_dir, &["png"], &mut files)?;
    let mut by_class: BTreeMap<String, Vec<Stamp>> = BTreeMap::new();
    for path in files {
        let rel = rel_id(stamps_dir, &path);
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.len() < 3 || parts.contains(&"cartoon") {
            continue;
        }
        let class = format!("{}/{}", parts[0], parts[1]);
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let Ok(img) = image::load_from_memory(&bytes) else {
            continue;
        };
        if !img.color().has_alpha() {
            continue;
        }
        let Some(img) = trim_to_alpha(&img.to_rgba8()) else {
            continue;
        };
        if img.width() < 24
            || img.height() < 24
            || unique_opaque_colors(&img) <= cfg.min_unique_colors
        {
            continue;
        }
        by_class.entry(class).or_default().push(Stamp {
            name: rel,
            image: img,
        });
    }
    by_class.retain(|_, v| v.len() >= cfg.min_stamps_per_class);
    Ok(by_class)
}

fn load_backgrounds(dir: &Path, max_side: u32) -> Result<Vec<(String, RgbImage)>, DataError> {
    let mut files = Vec::new();
    list_files(dir, &["jpg", "jpeg", "png", "webp"], &mut files)?;
    let mut out = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let Ok(img) = decode_rgb(&bytes, DEFAULT_PIXEL_LIMIT) else {
            continue;
        };
        let (w, h) = img.dimensions();
        let scale = (f64::from(max_side) / f64::from(w.max(h))).min(1.0);
        let img = if scale < 1.0 {
            let (nw, nh) = (
                ((f64::from(w) * scale).round() as u32).max(1),
                ((f64::from(h) * scale).round() as u32).max(1),
            );
            resize_rgb(&img, (0.0, 0.0, f64::from(w), f64::from(h)), nw, nh)
        } else {
            img
        };
        out.push((rel_id(dir, &path), img));
    }
    Ok(out)
}

fn resize_rgb(src: &RgbImage, crop: (f64, f64, f64, f64), w: u32, h: u32) -> RgbImage {
    let src_ref =
        fr::images::ImageRef::new(src.width(), src.height(), src.as_raw(), fr::PixelType::U8x3)
            .expect("valid view");
    let mut dst = fr::images::Image::new(w, h, fr::PixelType::U8x3);
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
        .crop(crop.0, crop.1, crop.2, crop.3);
    fr::Resizer::new()
        .resize(&src_ref, &mut dst, &opts)
        .expect("same pixel types");
    RgbImage::from_raw(w, h, dst.into_vec()).expect("w*h*3 bytes")
}

pub(crate) fn resize_rgba(src: &RgbaImage, w: u32, h: u32) -> RgbaImage {
    let src_ref =
        fr::images::ImageRef::new(src.width(), src.height(), src.as_raw(), fr::PixelType::U8x4)
            .expect("valid view");
    let mut dst = fr::images::Image::new(w, h, fr::PixelType::U8x4);
    let opts =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    fr::Resizer::new()
        .resize(&src_ref, &mut dst, &opts)
        .expect("same pixel types");
    RgbaImage::from_raw(w, h, dst.into_vec()).expect("w*h*4 bytes")
}

struct Scene {
    image: RgbImage,
    labels: GrayImage,
    entry: CopyPasteEntry,
}

fn make_scene(
    cfg: &CopyPasteConfig,
    split: Split,
    index: usize,
    stamps: &[Vec<&Stamp>],
    backgrounds: &[(String, RgbImage)],
) -> Scene {
    let size = cfg.size;
    let s = f64::from(size);
    let mut rng = KeyedRng::new(&[cfg.seed, domain::COPYPASTE, split as u64, index as u64]);
    let (bg_name, bg) = &backgrounds[rng.below(backgrounds.len() as u64) as usize];
    let (bw, bh) = (f64::from(bg.width()), f64::from(bg.height()));
    let side = rng.uniform_range(0.35, 1.0) * bw.min(bh);
    let (left, top) = (rng.uniform() * (bw - side), rng.uniform() * (bh - side));
    let mut canvas = resize_rgb(bg, (left, top, side, side), size, size);
    let mut labels = vec![0u8; (size * size) as usize];
    let mut owner = vec![u8::MAX; (size * size) as usize];
    let n_objects =
        rng.int_inclusive(i64::from(cfg.min_objects), i64::from(cfg.max_objects)) as usize;
    let mut objects = Vec::with_capacity(n_objects);
    for k in 0..n_objects {
        let class = rng.below(stamps.len() as u64) as usize;
        let stamp = stamps[class][rng.below(stamps[class].len() as u64) as usize];
        let (sw, sh) = stamp.image.dimensions();
        let longer = rng.uniform_range(cfg.object_scale.0, cfg.object_scale.1) * s;
        let scale = longer / f64::from(sw.max(sh));
        let (tw, th) = (
            ((f64::from(sw) * scale).round() as u32).max(1),
            ((f64::from(sh) * scale).round() as u32).max(1),
        );
        let flipped = rng.bernoulli(0.5);
        let ox =
            (rng.uniform_range(-0.25 * f64::from(tw), s - 0.75 * f64::from(tw))).round() as i64;
        let oy =
            (rng.uniform_range(-0.25 * f64::from(th), s - 0.75 * f64::from(th))).round() as i64;
        let pasted = resize_rgba(&stamp.image, tw, th);
        for y in 0..th as i64 {
            let cy = oy + y;
            if cy < 0 || cy >= i64::from(size) {
                continue;
            }
            for x in 0..tw as i64 {
                let cx = ox + x;
                if cx < 0 || cx >= i64::from(size) {
                    continue;
                }
                let sx = if flipped { tw as i64 - 1 - x } else { x };
                let p = pasted.get_pixel(sx as u32, y as u32);
                let a = u32::from(p[3]);
                let dst = canvas.get_pixel_mut(cx as u32, cy as u32);
                for c in 0..3 {
                    dst[c] =
                        ((u32::from(p[c]) * a + u32::from(dst[c]) * (255 - a) + 127) / 255) as u8;
                }
                if a > 127 {
                    let i = (cy * i64::from(size) + cx) as usize;
                    labels[i] = class as u8 + 1;
                    owner[i] = k as u8;
                }
            }
        }
        objects.push(PastedObject {
            class: class as u32,
            stamp: stamp.name.clone(),
            left: ox,
            top: oy,
            width: tw,
            height: th,
            flipped,
            visible_pixels: 0,
        });
    }
    for &o in &owner {
        if o != u8::MAX {
            objects[o as usize].visible_pixels += 1;
        }
    }
    let main = (0..objects.len())
        .max_by_key(|&k| (objects[k].visible_pixels, std::cmp::Reverse(k)))
        .unwrap_or(0);
    let id = format!("{}/{index:06}", split.as_str());
    Scene {
        image: canvas,
        labels: GrayImage::from_raw(size, size, labels).expect("size*size bytes"),
        entry: CopyPasteEntry {
            image: format!("{id}.png"),
            label_map: format!("{id}_labels.png"),
            id,
            label: objects[main].class,
            objects,
            background: (bg_name.clone(), left, top, side),
        },
    }
}

/// Builds the copy-paste set into `out_dir` (`train/`, `test/`, `manifest.json`, written last).
pub fn build_copy_paste(
    stamps_dir: &Path,
    backgrounds_dir: &Path,
    out_dir: &Path,
    cfg: &CopyPasteConfig,
) -> Result<CopyPasteManifest, DataError> {
    let mut errs = Vec::new();
    if cfg.size < 16 {
        errs.push(format!("size {} is too small (at least 16)", cfg.size));
    }
    if cfg.min_objects == 0 || cfg.min_objects > cfg.max_objects || cfg.max_objects > 250 {
        errs.push(format!(
            "objects range {}..={} must satisfy 1 <= min <= max <= 250",
            cfg.min_objects, cfg.max_objects
        ));
    }
    let (a, b) = cfg.object_scale;
    if !(a > 0.0 && a <= b) {
        errs.push(format!(
            "object_scale {:?} must satisfy 0 < min <= max",
            cfg.object_scale
        ));
    }
    if !(0.0..1.0).contains(&cfg.test_fraction) {
        errs.push(format!(
            "test_fraction {} must be in [0, 1)",
            cfg.test_fraction
        ));
    }
    if !errs.is_empty() {
        return Err(DataError::Config(errs));
    }
    let by_class = load_stamps(stamps_dir, cfg)?;
    if by_class.len() < 2 {
        return Err(DataError::NoReadableImages {
            path: stamps_dir.to_path_buf(),
            detail: format!(
                "found {} class(es) with at least {} photo-like cut-outs with alpha; need 2 (run scripts/fetch-real-data.sh)",
                by_class.len(),
                cfg.min_stamps_per_class
            ),
        });
    }
    let backgrounds = load_backgrounds(backgrounds_dir, cfg.background_max_side)?;
    if backgrounds.is_empty() {
        return Err(DataError::NoReadableImages {
            path: backgrounds_dir.to_path_buf(),
            detail: "no background photo".into(),
        });
    }
    let classes: Vec<String> = by_class.keys().cloned().collect();
    // Split by file, per class, with a seeded shuffle.
    let mut train_stamps: Vec<Vec<&Stamp>> = Vec::new();
    let mut test_stamps: Vec<Vec<&Stamp>> = Vec::new();
    for (c, stamps) in by_class.values().enumerate() {
        let mut order: Vec<&Stamp> = stamps.iter().collect();
        KeyedRng::new(&[cfg.seed, domain::COPYPASTE, u64::MAX, c as u64]).shuffle(&mut order);
        let n_test =
            ((stamps.len() as f64 * cfg.test_fraction).round() as usize).clamp(1, stamps.len() - 1);
        test_stamps.push(order[..n_test].to_vec());
        train_stamps.push(order[n_test..].to_vec());
    }
    for split in ["train", "test"] {
        let dir = out_dir.join(split);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    }
    let mut entries: [Vec<CopyPasteEntry>; 2] = [Vec::new(), Vec::new()];
    for (split, n, stamps) in [
        (Split::Train, cfg.n_train, &train_stamps),
        (Split::Test, cfg.n_test, &test_stamps),
    ] {
        let n_threads = cfg.n_threads.max(1);
        let results: Vec<Result<Vec<(usize, CopyPasteEntry)>, DataError>> =
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..n_threads)
                    .map(|t| {
                        let backgrounds = &backgrounds;
                        scope.spawn(move || {
                            let mut out = Vec::new();
                            for i in (t..n).step_by(n_threads) {
                                let scene = make_scene(cfg, split, i, stamps, backgrounds);
                                let img_path = out_dir.join(&scene.entry.image);
                                scene.image.save(&img_path).map_err(|e| DataError::Encode {
                                    path: img_path.clone(),
                                    reason: e.to_string(),
                                })?;
                                let lbl_path = out_dir.join(&scene.entry.label_map);
                                scene
                                    .labels
                                    .save(&lbl_path)
                                    .map_err(|e| DataError::Encode {
                                        path: lbl_path.clone(),
                                        reason: e.to_string(),
                                    })?;
                                out.push((i, scene.entry));
                            }
                            Ok(out)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(DataError::Loader("builder thread panicked".into()))
                        })
                    })
                    .collect()
            });
        let mut all = Vec::with_capacity(n);
        for r in results {
            all.extend(r?);
        }
        all.sort_by_key(|(i, _)| *i);
        entries[split as usize] = all.into_iter().map(|(_, e)| e).collect();
    }
    let [train, test] = entries;
    let names = |v: &Vec<Vec<&Stamp>>| -> Vec<Vec<String>> {
        v.iter()
            .map(|c| {
                let mut n: Vec<String> = c.iter().map(|s| s.name.clone()).collect();
                n.sort();
                n
            })
            .collect()
    };
    let manifest = CopyPasteManifest {
        version: MANIFEST_VERSION,
        config: cfg.clone(),
        classes,
        train_stamps: names(&train_stamps),
        test_stamps: names(&test_stamps),
        backgrounds: backgrounds.iter().map(|(n, _)| n.clone()).collect(),
        train,
        test,
    };
    let path = out_dir.join(MANIFEST);
    let tmp = out_dir.join(format!("{MANIFEST}.tmp"));
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| DataError::Format {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, json).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
    Ok(manifest)
}

/// Reads a built copy-paste set back (one split).
#[derive(Debug)]
pub struct CopyPasteSource {
    dir: PathBuf,
    split: Split,
    classes: Vec<String>,
    entries: Vec<CopyPasteEntry>,
}

impl CopyPasteSource {
    /// Opens `dir/manifest.json` and selects `split`.
    pub fn open(dir: &Path, split: Split) -> Result<Self, DataError> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let manifest: CopyPasteManifest =
            serde_json::from_slice(&bytes).map_err(|e| DataError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.version != MANIFEST_VERSION {
            return Err(DataError::Format {
                path,
                reason: format!(
                    "manifest version {} (this build reads {MANIFEST_VERSION}); rebuild the set",
                    manifest.version
                ),
            });
        }
        let entries = match split {
            Split::Train => manifest.train,
            Split::Test => manifest.test,
        };
        if entries.is_empty() {
            return Err(DataError::NoReadableImages {
                path,
                detail: format!("the {} split is empty", split.as_str()),
            });
        }
        Ok(CopyPasteSource {
            dir: dir.to_path_buf(),
            split,
            classes: manifest.classes,
            entries,
        })
    }

    /// The manifest entry of sample `index`.
    pub fn entry(&self, index: u64) -> Option<&CopyPasteEntry> {
        self.entries.get(index as usize)
    }
}

impl Source for CopyPasteSource {
    fn len(&self) -> Option<u64> {
        Some(self.entries.len() as u64)
    }

    fn get(&self, index: u64) -> Result<Sample, DataError> {
        let Some(entry) = self.entries.get(index as usize) else {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.entries.len() as u64,
                what: self.describe(),
            });
        };
        let bad = |path: &Path, reason| {
            DataError::BadInput(BadInput {
                path: path.to_path_buf(),
                index: Some(index),
                reason,
            })
        };
        let img_path = self.dir.join(&entry.image);
        let bytes =
            std::fs::read(&img_path).map_err(|e| bad(&img_path, BadReason::Io(e.to_string())))?;
        let image = decode_rgb(&bytes, DEFAULT_PIXEL_LIMIT).map_err(|r| bad(&img_path, r))?;
        let lbl_path = self.dir.join(&entry.label_map);
        let bytes =
            std::fs::read(&lbl_path).map_err(|e| bad(&lbl_path, BadReason::Io(e.to_string())))?;
        let labels = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .map_err(|e| bad(&lbl_path, BadReason::Corrupt(e.to_string())))?
            .to_luma8();
        if labels.dimensions() != image.dimensions() {
            return Err(bad(
                &lbl_path,
                BadReason::Corrupt(format!(
                    "label map is {:?}, image is {:?}",
                    labels.dimensions(),
                    image.dimensions()
                )),
            ));
        }
        let (width, height) = labels.dimensions();
        Ok(Sample {
            image,
            label: Some(entry.label),
            label_map: Some(LabelMap {
                width,
                height,
                data: labels.into_raw(),
            }),
            id: entry.id.clone(),
        })
    }

    fn n_classes(&self) -> Option<usize> {
        Some(self.classes.len())
    }

    fn class_names(&self) -> &[String] {
        &self.classes
    }

    fn has_label_maps(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "copy-paste segmentation {} {} split ({} scenes, {} classes)",
            self.dir.display(),
            self.split.as_str(),
            self.entries.len(),
            self.classes.len()
        )
    }

    fn location(&self) -> PathBuf {
        self.dir.clone()
    }
}
