//! A folder of image files, searched recursively in a sorted (deterministic) order and decoded on
//! `get`. ImageFolder layout (every image inside a first-level sub-folder, at least two of them) gives
//! class labels from the sub-folder names, sorted.

use std::collections::HashSet;
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
        let mut files = Vec::new();
        let mut rejected = Vec::new();
        let mut visited = HashSet::new();
        let mut n_other = 0usize;
        walk(root, &mut visited, &mut files, &mut rejected, &mut n_other)?;
        if files.is_empty() {
            return Err(DataError::NoReadableImages {
                path: root.to_path_buf(),
                detail: format!(
                    "no .jpg/.jpeg/.png/.webp file found; {} unsupported image file(s), {} other file(s)",
                    rejected.len(),
                    n_other
                ),
            });
        }
        let rel: Vec<PathBuf> = files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap_or(f).to_path_buf())
            .collect();
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
fn image_folder_labels(rel: &[PathBuf]) -> (Option<Vec<u32>>, Vec<String>) {
    let first = |p: &PathBuf| -> Option<String> {
        let mut comps = p.components();
        let c = comps.next()?;
        comps.next()?; // a file directly in the root has a single component
        Some(c.as_os_str().to_string_lossy().into_owned())
    };
    let firsts: Option<Vec<String>> = rel.iter().map(first).collect();
    let Some(firsts) = firsts else {
        return (None, Vec::new());
    };
    let mut classes: Vec<String> = firsts.clone();
    classes.sort();
    classes.dedup();
    if classes.len() < 2 {
        return (None, Vec::new());
    }
    let labels = firsts
        .iter()
        .map(|f| classes.binary_search(f).expect("class listed") as u32)
        .collect();
    (Some(labels), classes)
}

fn walk(
    dir: &Path,
    visited: &mut HashSet<PathBuf>,
    files: &mut Vec<PathBuf>,
    rejected: &mut Vec<BadInput>,
    n_other: &mut usize,
) -> Result<(), DataError> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| DataError::io(dir, e))?;
    if !visited.insert(canonical) {
        return Ok(()); // a symlink loop or a second link to the same folder
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            // A dangling symlink: report it if it looks like an image, otherwise ignore it.
            if extension_of(&path).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                rejected.push(BadInput {
                    path: path.clone(),
                    index: None,
                    reason: BadReason::Io("dangling link".into()),
                });
            }
            continue;
        };
        if meta.is_dir() {
            walk(&path, visited, files, rejected, n_other)?;
        } else if meta.is_file() {
            match extension_of(&path) {
                Some(e) if IMAGE_EXTENSIONS.contains(&e.as_str()) => files.push(path),
                Some(e) if UNSUPPORTED_EXTENSIONS.contains(&e.as_str()) => {
                    rejected.push(BadInput {
                        path,
                        index: None,
                        reason: BadReason::Unsupported(format!(".{e} file")),
                    })
                }
                _ => *n_other += 1,
            }
        }
    }
    Ok(())
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
