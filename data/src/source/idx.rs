//! IDX files (the MNIST / Fashion-MNIST format), gzipped or not (detected from the content).
//!
//! Format: two zero bytes, a type byte (0x08 = unsigned byte, the only one images use), the number of
//! dimensions, one big-endian u32 per dimension, then the values row-major. Images are
//! `[n, rows, cols]` (grey) or `[n, rows, cols, 3]` (RGB); labels are `[n]`.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::DataError;
use crate::source::{Sample, Source, Split};

/// Fashion-MNIST class names (label order of the dataset).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// An IDX image set with optional labels, held in memory (Fashion-MNIST train is 47 MB).
#[derive(Debug)]
pub struct IdxSource {
    path: PathBuf,
    split: Option<Split>,
    pixels: Vec<u8>,
    n: usize,
    rows: usize,
    cols: usize,
    channels: usize,
    labels: Option<Vec<u8>>,
    classes: Vec<String>,
}

/// Reads a file, gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                reason: format!("bad gzip data: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX header; returns the dimensions and the offset of the data.
pub(crate) fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, usize), DataError> {
    let fail = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(fail("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(fail(format!(
            "IDX element type 0x{:02x} is not supported (only 0x08, unsigned byte)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(fail(format!(
            "IDX header truncated ({ndim} dimensions, {} bytes)",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| fail("IDX dimensions overflow".into()))?;
    if bytes.len() - header != expected {
        return Err(fail(format!(
            "IDX dimensions {dims:?} need {expected} data bytes, the file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, header))
}

/// Finds `{prefix}-{kind}-ubyte[.gz]` in a folder.
fn find_in(dir: &Path, prefixes: &[&str], kind: &str) -> Option<PathBuf> {
    for prefix in prefixes {
        for suffix in ["", ".gz"] {
            let p = dir.join(format!("{prefix}-{kind}-ubyte{suffix}"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

impl IdxSource {
    /// Opens a folder with the standard file names (`train-…` / `t10k-…`, `images-idx3`, `labels-idx1`,
    /// optionally `.gz`) for `split`, or a single images file (its labels file is found by replacing
    /// `images-idx3` with `labels-idx1`; `split` is then ignored).
    pub fn open(path: &Path, split: Split) -> Result<Self, DataError> {
        let (images_path, labels_path, split) = if path.is_dir() {
            let prefixes: &[&str] = match split {
                Split::Train => &["train"],
                Split::Test => &["t10k", "test"],
            };
            let images = find_in(path, prefixes, "images-idx3").ok_or_else(|| {
                DataError::NoReadableImages {
                    path: path.to_path_buf(),
                    detail: format!(
                        "no {}-images-idx3-ubyte[.gz] file for the {} split",
                        prefixes[0],
                        split.as_str()
                    ),
                }
            })?;
            (images, find_in(path, prefixes, "labels-idx1"), Some(split))
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let labels = name
                .contains("images-idx3")
                .then(|| path.with_file_name(name.replace("images-idx3", "labels-idx1")));
            (path.to_path_buf(), labels.filter(|p| p.is_file()), None)
        };
        let bytes = read_maybe_gz(&images_path)?;
        let (dims, offset) = parse_idx(&images_path, &bytes)?;
        let (n, rows, cols, channels) = match dims[..] {
            [n, r, c] => (n, r, c, 1),
            [n, r, c, ch @ (1 | 3)] => (n, r, c, ch),
            _ => {
                return Err(DataError::Format {
                    path: images_path,
                    reason: format!(
                        "IDX images must be [n, rows, cols] or [n, rows, cols, 1|3], got {dims:?}"
                    ),
                })
            }
        };
        if n == 0 || rows == 0 || cols == 0 {
            return Err(DataError::NoReadableImages {
                path: images_path,
                detail: format!("IDX dimensions {dims:?}"),
            });
        }
        let mut pixels = bytes;
        pixels.drain(..offset);
        let labels = match labels_path {
            Some(lp) => {
                let lbytes = read_maybe_gz(&lp)?;
                let (ldims, loff) = parse_idx(&lp, &lbytes)?;
                if ldims != [n] {
                    return Err(DataError::Format {
                        path: lp,
                        reason: format!(
                            "labels have dimensions {ldims:?}, expected [{n}] to match the images"
                        ),
                    });
                }
                Some(lbytes[loff..].to_vec())
            }
            None => None,
        };
        let classes = match &labels {
            None => Vec::new(),
            Some(_)
                if images_path
                    .to_string_lossy()
                    .to_lowercase()
                    .contains("fashion") =>
            {
                FASHION_MNIST_CLASSES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }
            Some(l) => {
                let max = l.iter().copied().max().unwrap_or(0);
                (0..=max).map(|c| c.to_string()).collect()
            }
        };
        Ok(IdxSource {
            path: images_path,
            split,
            pixels,
            n,
            rows,
            cols,
            channels,
            labels,
            classes,
        })
    }

    /// The images file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for IdxSource {
    fn len(&self) -> Option<u64> {
        Some(self.n as u64)
    }

    fn get(&self, index: u64) -> Result<Sample, DataError> {
        if index >= self.n as u64 {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.n as u64,
                what: self.describe(),
            });
        }
        let i = index as usize;
        let size = self.rows * self.cols * self.channels;
        let px = &self.pixels[i * size..(i + 1) * size];
        let rgb: Vec<u8> = if self.channels == 3 {
            px.to_vec()
        } else {
            px.iter().flat_map(|&v| [v, v, v]).collect()
        };
        let image =
            RgbImage::from_raw(self.cols as u32, self.rows as u32, rgb).expect("rows*cols*3 bytes");
        let id = match self.split {
            Some(s) => format!("{}/{index}", s.as_str()),
            None => index.to_string(),
        };
        Ok(Sample {
            image,
            label: self.labels.as_ref().map(|l| u32::from(l[i])),
            label_map: None,
            id,
        })
    }

    fn n_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|_| self.classes.len())
    }

    fn class_names(&self) -> &[String] {
        &self.classes
    }

    fn describe(&self) -> String {
        let split = self
            .split
            .map(|s| format!(" {} split", s.as_str()))
            .unwrap_or_default();
        let labels = match self.labels {
            Some(_) => format!("{} classes", self.classes.len()),
            None => "no labels".into(),
        };
        format!(
            "idx {}{split} ({} images {}x{}x{}, {labels})",
            self.path.display(),
            self.n,
            self.cols,
            self.rows,
            self.channels
        )
    }

    fn location(&self) -> PathBuf {
        self.path.clone()
    }
}
