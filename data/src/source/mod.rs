//! Image sources: one object-safe trait, four kinds, and the spec strings that name them.
//!
//! A source maps an index to a [`Sample`] (an RGB8 image, an optional class label, an optional
//! per-pixel label map and an id). Sources decode on `get`; nothing is loaded up front except what is
//! small by nature (an IDX file, a manifest, a file list).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use image::RgbImage;

use crate::config::DEFAULT_PIXEL_LIMIT;
use crate::error::{BadInput, DataError};

pub(crate) mod copypaste;
pub(crate) mod folder;
pub(crate) mod idx;
pub(crate) mod synthetic;
pub(crate) mod tar;

/// Per-pixel classes of a sample, the same size as its image, row-major.
/// Value 0 is background; value `k + 1` is image-level class `k` of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height` class values.
    pub data: Vec<u8>,
}

impl LabelMap {
    /// The value at (x, y).
    pub fn get(&self, x: u32, y: u32) -> u8 {
        self.data[y as usize * self.width as usize + x as usize]
    }
}

/// One image with what is known about it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The pixels, 8-bit RGB.
    pub image: RgbImage,
    /// Image-level class, when the source has classes.
    pub label: Option<u32>,
    /// Per-pixel classes, when the source has them.
    pub label_map: Option<LabelMap>,
    /// A stable name (relative path, `train/123`, ...).
    pub id: String,
}

/// A source of images. Implementations are cheap to share between worker threads.
pub trait Source: Send + Sync {
    /// Number of samples, `None` when unbounded.
    fn len(&self) -> Option<u64>;
    /// True when the source has no sample at all.
    fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
    /// Reads and decodes sample `index`. An unreadable sample is `DataError::BadInput`.
    fn get(&self, index: u64) -> Result<Sample, DataError>;
    /// Number of image-level classes, when labelled.
    fn n_classes(&self) -> Option<usize>;
    /// Class names (index = label), empty when unlabelled.
    fn class_names(&self) -> &[String];
    /// True when samples carry per-pixel label maps.
    fn has_label_maps(&self) -> bool {
        false
    }
    /// One line saying what this is (kind, path, size, classes).
    fn describe(&self) -> String;
    /// Files found while listing that will never be read (unsupported formats), for `scan`.
    fn rejected(&self) -> &[BadInput] {
        &[]
    }
    /// The folder or file the source reads, for error messages.
    fn location(&self) -> PathBuf;
}

/// Which half of a dataset with a standard split.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training half.
    #[default]
    Train,
    /// Held-out half.
    Test,
}

impl Split {
    /// `train` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split {other:?} (expected train or test)")),
        }
    }
}

/// A data source named by a string: `folder:PATH`, `tar:PATH`, `idx:PATH[:train|test]`,
/// `synthetic[:SEED[:SIZE]]` or `copypaste:PATH[:train|test]`.
/// Deserialises from the same string (e.g. `source = "folder:/data/photos"` in TOML).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SourceSpec {
    /// A folder of JPEG/PNG/WebP files, searched recursively (ImageFolder layout gives labels).
    Folder(PathBuf),
    /// Tar shards in the WebDataset layout: one `.tar` file, a folder of them, or a brace
    /// range such as `shards-{000000..000146}.tar`.
    Tar(PathBuf),
    /// IDX files (MNIST / Fashion-MNIST), gzipped or not: a folder holding the standard file names,
    /// or one images file.
    Idx {
        /// Folder or images file.
        path: PathBuf,
        /// Which split, for a folder.
        split: Split,
    },
    /// Procedural scenes with exact label maps (the default, needs no download).
    Synthetic {
        /// Scene seed (different seeds give disjoint-looking sets).
        seed: u64,
        /// Image side in pixels (default 96).
        size: Option<u32>,
    },
    /// A copy-paste segmentation set built by [`crate::build_copy_paste`].
    CopyPaste {
        /// The built folder (holds `manifest.json`).
        path: PathBuf,
        /// Which split.
        split: Split,
    },
}

impl Default for SourceSpec {
    fn default() -> Self {
        SourceSpec::Synthetic {
            seed: 0,
            size: None,
        }
    }
}

const SPEC_FORMS: &str = "expected folder:PATH, tar:PATH, idx:PATH[:train|test], synthetic[:SEED[:SIZE]] or copypaste:PATH[:train|test]";

fn split_suffix(rest: &str) -> (&str, Option<Split>) {
    for split in [Split::Train, Split::Test] {
        if let Some(path) = rest.strip_suffix(&format!(":{}", split.as_str())) {
            return (path, Some(split));
        }
    }
    (rest, None)
}

impl FromStr for SourceSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        let err = |reason: String| DataError::Spec {
            spec: s.to_string(),
            reason,
        };
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (s, None),
        };
        let need_path = |rest: Option<&str>| -> Result<String, DataError> {
            match rest {
                Some(p) if !p.is_empty() => Ok(p.to_string()),
                _ => Err(err(format!("{kind} needs a path, as in {kind}:PATH"))),
            }
        };
        match kind {
            "folder" => Ok(SourceSpec::Folder(PathBuf::from(need_path(rest)?))),
            "tar" => Ok(SourceSpec::Tar(PathBuf::from(need_path(rest)?))),
            "idx" | "copypaste" => {
                let full = need_path(rest)?;
                let (path, split) = split_suffix(&full);
                if path.is_empty() {
                    return Err(err(format!("{kind} needs a path before the split")));
                }
                let path = PathBuf::from(path);
                let split = split.unwrap_or_default();
                Ok(if kind == "idx" {
                    SourceSpec::Idx { path, split }
                } else {
                    SourceSpec::CopyPaste { path, split }
                })
            }
            "synthetic" => {
                let mut parts = rest
                    .map(|r| r.split(':').collect::<Vec<_>>())
                    .unwrap_or_default();
                if parts.len() > 2 {
                    return Err(err(
                        "synthetic takes at most a seed and a size: synthetic[:SEED[:SIZE]]".into(),
                    ));
                }
                let size = if parts.len() == 2 {
                    let v = parts.pop().unwrap_or_default();
                    let size: u32 = v
                        .parse()
                        .map_err(|_| err(format!("size {v:?} is not a positive integer")))?;
                    if !(8..=4096).contains(&size) {
                        return Err(err(format!("size {size} must be between 8 and 4096")));
                    }
                    Some(size)
                } else {
                    None
                };
                let seed = match parts.first() {
                    Some(v) => v
                        .parse()
                        .map_err(|_| err(format!("seed {v:?} is not an unsigned integer")))?,
                    None => 0,
                };
                Ok(SourceSpec::Synthetic { seed, size })
            }
            "" => Err(err(format!("empty spec; {SPEC_FORMS}"))),
            other => Err(err(format!("unknown source kind {other:?}; {SPEC_FORMS}"))),
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Folder(p) => write!(f, "folder:{}", p.display()),
            SourceSpec::Tar(p) => write!(f, "tar:{}", p.display()),
            SourceSpec::Idx { path, split } => {
                write!(f, "idx:{}:{}", path.display(), split.as_str())
            }
            SourceSpec::Synthetic { seed, size: None } => write!(f, "synthetic:{seed}"),
            SourceSpec::Synthetic {
                seed,
                size: Some(s),
            } => write!(f, "synthetic:{seed}:{s}"),
            SourceSpec::CopyPaste { path, split } => {
                write!(f, "copypaste:{}:{}", path.display(), split.as_str())
            }
        }
    }
}

impl TryFrom<String> for SourceSpec {
    type Error = DataError;
    fn try_from(s: String) -> Result<Self, DataError> {
        s.parse()
    }
}

impl From<SourceSpec> for String {
    fn from(spec: SourceSpec) -> String {
        spec.to_string()
    }
}

/// What an open counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A `tar:` source's shards, indexed (walked or read from the index cache).
    Shards,
    /// A `folder:` source's top-level folders (the classes of an ImageFolder), listed.
    Folders,
}

/// How far a source's open has got, updated by the open as it goes and read by whoever
/// waits on it (the daemon's `status` while it starts): a `tar:` source counts the shards
/// indexed, a `folder:` source the top-level folders listed; the others open without
/// counting.
#[derive(Debug, Default)]
pub struct OpenProgress {
    counted: std::sync::OnceLock<Counted>,
    total: AtomicUsize,
    done: AtomicUsize,
    from_cache: AtomicUsize,
}

impl OpenProgress {
    /// The open starts counting `total` units of `what`.
    pub(crate) fn start(&self, what: Counted, total: usize) {
        let _ = self.counted.set(what);
        self.total.store(total, Ordering::Relaxed);
    }

    /// One unit is done (`cached`: a shard's index read from the cache).
    pub(crate) fn one_done(&self, cached: bool) {
        if cached {
            self.from_cache.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Units done, of how many, and how many of them from the index cache.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
            self.from_cache.load(Ordering::Relaxed),
        )
    }

    /// `85 of 147 shards indexed (12 from the index cache)`, `412 of 1000 folders listed`;
    /// none before a count starts.
    pub fn describe(&self) -> Option<String> {
        let (done, total, cached) = self.counts();
        match self.counted.get()? {
            Counted::Shards => Some(format!(
                "{done} of {total} shards indexed{}",
                if cached > 0 {
                    format!(" ({cached} from the index cache)")
                } else {
                    String::new()
                }
            )),
            Counted::Folders => Some(format!("{done} of {total} folders listed")),
        }
    }
}

/// Options for opening a source.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Images with more pixels are refused before decoding.
    pub pixel_limit: u64,
    /// Number of samples of a synthetic source (its index space is unbounded; this sets the epoch).
    pub synthetic_len: u64,
    /// Where `tar:` sources keep their shards' indexes between opens (`None`: walk every
    /// shard's headers at every open).
    pub index_cache: Option<PathBuf>,
    /// Where the open counts how far it has got (`tar:` shards indexed, `folder:`
    /// top-level folders listed).
    pub progress: Option<Arc<OpenProgress>>,
}

/// Options are equal when they open alike and count into the same progress, if any.
impl PartialEq for OpenOptions {
    fn eq(&self, other: &Self) -> bool {
        self.pixel_limit == other.pixel_limit
            && self.synthetic_len == other.synthetic_len
            && self.index_cache == other.index_cache
            && match (&self.progress, &other.progress) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            pixel_limit: DEFAULT_PIXEL_LIMIT,
            synthetic_len: synthetic::DEFAULT_LEN,
            index_cache: default_index_cache(),
            progress: None,
        }
    }
}

/// Where shard indexes are cached by default: `$DINOD_CACHE_DIR/tar-index`, else
/// `$XDG_CACHE_HOME/dinod/tar-index`, else `$HOME/.cache/dinod/tar-index`; none when
/// `DINOD_CACHE_DIR` is `off` or no home is known.
pub fn default_index_cache() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = match var("DINOD_CACHE_DIR") {
        Some(d) if d.as_os_str() == "off" => return None,
        Some(d) => d,
        None => var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))?
            .join("dinod"),
    };
    Some(base.join("tar-index"))
}

impl SourceSpec {
    /// Opens the source with default options.
    pub fn open(&self) -> Result<Arc<dyn Source>, DataError> {
        self.open_with(&OpenOptions::default())
    }

    /// Opens the source.
    pub fn open_with(&self, opts: &OpenOptions) -> Result<Arc<dyn Source>, DataError> {
        Ok(match self {
            SourceSpec::Folder(path) => Arc::new(folder::FolderSource::open_observed(
                path,
                opts.pixel_limit,
                opts.progress.as_deref(),
            )?),
            SourceSpec::Tar(path) => Arc::new(tar::TarSource::open_observed(
                path,
                opts.pixel_limit,
                opts.index_cache.as_deref(),
                opts.progress.as_deref(),
            )?),
            SourceSpec::Idx { path, split } => Arc::new(idx::IdxSource::open(path, *split)?),
            SourceSpec::Synthetic { seed, size } => {
                let mut cfg = synthetic::SyntheticConfig {
                    seed: *seed,
                    len: opts.synthetic_len,
                    ..Default::default()
                };
                if let Some(size) = size {
                    cfg.size = *size;
                }
                Arc::new(synthetic::SyntheticScenes::new(cfg))
            }
            SourceSpec::CopyPaste { path, split } => {
                Arc::new(copypaste::CopyPasteSource::open(path, *split)?)
            }
        })
    }
}

/// `path` relative to `root` as a string with `/` separators (sample ids).
pub(crate) fn rel_id(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}
