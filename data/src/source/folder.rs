//! A folder of image files, searched recursively in a sorted (deterministic) order and decoded on
//! `get`. ImageFolder layout (every image inside a first-level sub-folder, at least two of them) gives
//! class labels from the sub-folder names, sorted.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::config::DEFAULT_PIXEL_LIMIT;
use crate::decode::decode_rgb;
use crate::error::{BadInput, BadReason, DataError};
use crate::source::{rel_id, Sample, Source};

/// Extensions listed as candidates (case-insensitive); the format itself is taken from the content.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "jpe", "jfif", "png", "webp"];
/// Image extensions that this build does not decode: listed as rejected so `scan` can report them.
const UNSUPPORTED_EXTENSIONS: &[&str] = &[
    "gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "jxl", "jp2", "ico", "svg", "ppm", "pgm",
    "pbm", "pnm", "tga", "psd", "exr", "hdr", "dng", "cr2", "nef",
];

/// A streamed folder of images.
#[derive(Debug)]
pub struct FolderSource {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    classes: Vec<String>,
    rejected: Vec<BadInput>,
    pixel_limit: u64,
}

fn extension_of(path: &Path) -> Option<String> {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

impl FolderSource {
    /// Lists `root` with the default pixel limit.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, DataError> {
        Self::open_with(root.as_ref(), DEFAULT_PIXEL_LIMIT)
    }

    /// Lists `root` (recursively, sorted, hidden entries skipped, symlink loops cut).
    pub fn open_with(root: &Path, pixel_limit: u64) -> Result<Self, DataError> {
        let meta = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
        if !meta.is_dir() {
            return Err(DataError::io(
                root,
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a folder"),
            ));
        }
        let mut listing = Listing {
            visited: HashSet::new(),
            files: Vec::new(),
            rejected: Vec::new(),
            n_other: 0,
        };
        listing.walk(root, Path::new(""))?;
        let Listing {
            files: rel,
            rejected,
            n_other,
            ..
        } = listing;
        if rel.is_empty() {
            return Err(DataError::NoReadableImages {
                path: root.to_path_buf(),
                detail: format!(
                    "no .jpg/.jpeg/.png/.webp file found; {} unsupported image file(s), {} other file(s)",
                    rejected.len(),
                    n_other
                ),
            });
        }
        let (labels, classes) = image_folder_labels(&rel);
        Ok(FolderSource {
            root: root.to_path_buf(),
            files: rel,
            labels,
            classes,
            rejected,
            pixel_limit,
        })
    }

    /// The file of sample `index`.
    pub fn path(&self, index: u64) -> Option<PathBuf> {
        self.files.get(index as usize).map(|f| self.root.join(f))
    }
}

/// Labels from first-level folder names when every file sits in one and there are at least two.
/// Classes are the names as text, sorted; each distinct name is converted once, not once per
/// file (1.28 M of them in ImageNet).
fn image_folder_labels(rel: &[PathBuf]) -> (Option<Vec<u32>>, Vec<String>) {
    fn first(p: &Path) -> Option<&OsStr> {
        let mut comps = p.components();
        let c = comps.next()?;
        comps.next()?; // a file directly in the root has a single component
        Some(c.as_os_str())
    }
    let firsts: Option<Vec<&OsStr>> = rel.iter().map(|p| first(p)).collect();
    let Some(firsts) = firsts else {
        return (None, Vec::new());
    };
    let distinct: HashSet<&OsStr> = firsts.iter().copied().collect();
    let mut classes: Vec<String> = distinct
        .iter()
        .map(|d| d.to_string_lossy().into_owned())
        .collect();
    classes.sort();
    classes.dedup();
    if classes.len() < 2 {
        return (None, Vec::new());
    }
    let label: HashMap<&OsStr, u32> = distinct
        .into_iter()
        .map(|d| {
            let text = d.to_string_lossy();
            let k = classes
                .binary_search_by(|c| c.as_str().cmp(&text))
                .expect("class listed");
            (d, k as u32)
        })
        .collect();
    let labels = firsts.iter().map(|f| label[f]).collect();
    (Some(labels), classes)
}

/// What a listing finds: image files relative to the root, in order, and the rest.
struct Listing {
    visited: HashSet<PathBuf>,
    files: Vec<PathBuf>,
    rejected: Vec<BadInput>,
    n_other: usize,
}

impl Listing {
    /// Lists `dir` (`rel` below the root) depth first, entries sorted by name: the order
    /// of sorting whole paths, without comparing their shared prefix over and over.
    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<(), DataError> {
        let canonical = std::fs::canonicalize(dir).map_err(|e| DataError::io(dir, e))?;
        if !self.visited.insert(canonical) {
            return Ok(()); // a symlink loop or a second link to the same folder
        }
        // the entry's own type comes with the listing on most file systems: no stat per
        // file, which at ImageNet's 1.28 M files was most of a cold listing; a symlink is
        // followed with a stat
        let mut entries: Vec<(std::ffi::OsString, std::fs::FileType)> = std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .map(|e| e.and_then(|e| Ok((e.file_name(), e.file_type()?))))
            .collect::<Result<_, _>>()
            .map_err(|e| DataError::io(dir, e))?;
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in entries {
            if name.as_encoded_bytes().starts_with(b".") {
                continue; // hidden
            }
            let path = Path::new(&name);
            let kind = if kind.is_symlink() {
                match std::fs::metadata(dir.join(&name)) {
                    Ok(meta) => meta.file_type(),
                    Err(_) => {
                        // A dangling symlink: report it if it looks like an image, otherwise ignore it.
                        if extension_of(path)
                            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
                        {
                            self.rejected.push(BadInput {
                                path: dir.join(&name),
                                index: None,
                                reason: BadReason::Io("dangling link".into()),
                            });
                        }
                        continue;
                    }
                }
            } else {
                kind
            };
            if kind.is_dir() {
                self.walk(&dir.join(&name), &rel.join(&name))?;
            } else if kind.is_file() {
                match extension_of(path) {
                    Some(e) if IMAGE_EXTENSIONS.contains(&e.as_str()) => {
                        self.files.push(rel.join(&name))
                    }
                    Some(e) if UNSUPPORTED_EXTENSIONS.contains(&e.as_str()) => {
                        self.rejected.push(BadInput {
                            path: dir.join(&name),
                            index: None,
                            reason: BadReason::Unsupported(format!(".{e} file")),
                        })
                    }
                    _ => self.n_other += 1,
                }
            }
        }
        Ok(())
    }
}

impl Source for FolderSource {
    fn len(&self) -> Option<u64> {
        Some(self.files.len() as u64)
    }

    fn get(&self, index: u64) -> Result<Sample, DataError> {
        let Some(rel) = self.files.get(index as usize) else {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.files.len() as u64,
                what: self.describe(),
            });
        };
        let path = self.root.join(rel);
        let bad = |reason| {
            DataError::BadInput(BadInput {
                path: path.clone(),
                index: Some(index),
                reason,
            })
        };
        let bytes = std::fs::read(&path).map_err(|e| bad(BadReason::Io(e.to_string())))?;
        let image = decode_rgb(&bytes, self.pixel_limit).map_err(bad)?;
        Ok(Sample {
            image,
            label: self.labels.as_ref().map(|l| l[index as usize]),
            label_map: None,
            id: rel_id(Path::new(""), rel),
        })
    }

    fn n_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|_| self.classes.len())
    }

    fn class_names(&self) -> &[String] {
        &self.classes
    }

    fn describe(&self) -> String {
        let classes = match self.labels {
            Some(_) => format!(", {} classes from sub-folders", self.classes.len()),
            None => ", unlabelled".to_string(),
        };
        format!(
            "folder {} ({} image files{classes})",
            self.root.display(),
            self.files.len()
        )
    }

    fn rejected(&self) -> &[BadInput] {
        &self.rejected
    }

    fn location(&self) -> PathBuf {
        self.root.clone()
    }
}
