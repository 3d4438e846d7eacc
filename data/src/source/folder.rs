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
pub(crate) const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "jpe", "jfif", "png", "webp"];
/// Image extensions that this build does not decode: listed as rejected so `scan` can report them.
pub(crate) const UNSUPPORTED_EXTENSIONS: &[&str] = &[
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
        Self::open_observed(root, pixel_limit, None)
    }

    /// [`FolderSource::open_with`], counting the top-level folders listed into `progress`
    /// as it goes (a listing of ImageNet's 1.28 M files is seconds here, more on a network
    /// file system).
    pub fn open_observed(
        root: &Path,
        pixel_limit: u64,
        progress: Option<&super::OpenProgress>,
    ) -> Result<Self, DataError> {
        let meta = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
        if !meta.is_dir() {
            return Err(DataError::io(
                root,
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a folder"),
            ));
        }
        let Listing {
            files: rel,
            rejected,
            n_other,
        } = Listing::of(root, progress)?;
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
pub(crate) fn image_folder_labels(rel: &[PathBuf]) -> (Option<Vec<u32>>, Vec<String>) {
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
#[derive(Default)]
struct Listing {
    files: Vec<PathBuf>,
    rejected: Vec<BadInput>,
    n_other: usize,
}

/// One step of a depth-first listing, as a walker records it.
enum Ev {
    /// A folder is walked (its canonical path); its entries follow, then `Leave`.
    Enter(PathBuf),
    Leave,
    /// An image, relative to the root.
    File(PathBuf),
    Rejected(BadInput),
    Other,
    /// The sub-folder listed by job `i` (only in the root's record).
    Job(usize),
    /// The walk stopped on an error here.
    Failed,
}

/// Most threads listing sub-folders at once: a listing waits on the file system (a
/// network one above all), so more threads than cores still help.
const MAX_LIST_THREADS: usize = 16;

impl Listing {
    /// Lists `root` depth first, entries sorted by name (the order of sorting whole paths,
    /// without comparing their shared prefix over and over), each folder once (symlink loops
    /// and second links cut). The root's sub-folders are listed on several threads, each
    /// recording what it finds; the records are then replayed in order against one set of
    /// walked folders, which gives exactly the one-thread order. A walk that fails is
    /// listed again on one thread, which stops at the first error in order.
    fn of(root: &Path, progress: Option<&super::OpenProgress>) -> Result<Self, DataError> {
        let mut jobs = Vec::new();
        let mut top = Vec::new();
        if record(
            root,
            Path::new(""),
            &mut HashSet::new(),
            &mut top,
            Some(&mut jobs),
        )
        .is_ok()
        {
            // the root is walked before any job: a link back to it is cut in each job
            let root_canonical = match top.first() {
                Some(Ev::Enter(c)) => Some(c.clone()),
                _ => None,
            };
            let mut records = list_jobs(&jobs, root_canonical.as_ref(), progress);
            let mut listing = Listing::default();
            if listing.replay(top, &mut records, &mut HashSet::new()) {
                return Ok(listing);
            }
        }
        let mut one = Vec::new();
        let walked = record(root, Path::new(""), &mut HashSet::new(), &mut one, None);
        let mut listing = Listing::default();
        listing.replay(one, &mut [], &mut HashSet::new());
        walked.map(|()| listing)
    }

    /// Applies a record, moving its paths (a job's record is taken when its place comes);
    /// false where it reaches a failure (the walk is then done again on one thread, which
    /// stops there with the error).
    fn replay(
        &mut self,
        events: Vec<Ev>,
        jobs: &mut [Vec<Ev>],
        walked: &mut HashSet<PathBuf>,
    ) -> bool {
        // depth inside a folder walked before (its record is skipped)
        let mut skip = 0usize;
        for ev in events {
            match ev {
                Ev::Enter(c) => {
                    if skip > 0 || !walked.insert(c) {
                        skip += 1;
                    }
                }
                Ev::Leave => skip = skip.saturating_sub(1),
                // a record stops at its failure: what followed it is missing
                Ev::Failed => return false,
                _ if skip > 0 => {}
                Ev::File(p) => self.files.push(p),
                Ev::Rejected(b) => self.rejected.push(b),
                Ev::Other => self.n_other += 1,
                Ev::Job(i) => {
                    let record = std::mem::take(&mut jobs[i]);
                    if !self.replay(record, jobs, walked) {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// Records `(dir, rel)` for every job on up to [`MAX_LIST_THREADS`] threads.
fn list_jobs(
    jobs: &[(PathBuf, PathBuf)],
    walked_before: Option<&PathBuf>,
    progress: Option<&super::OpenProgress>,
) -> Vec<Vec<Ev>> {
    if let Some(p) = progress.filter(|_| !jobs.is_empty()) {
        p.start(super::Counted::Folders, jobs.len());
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(4, MAX_LIST_THREADS)
        .min(jobs.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    // a job a panicked worker did not hand back reads as a failure
    let mut out: Vec<Vec<Ev>> = jobs.iter().map(|_| vec![Ev::Failed]).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((dir, rel)) = jobs.get(i) else { break };
                        mine.push((i, record_job(dir, rel, walked_before)));
                        if let Some(p) = progress {
                            p.one_done(false);
                        }
                    }
                    mine
                })
            })
            .collect();
        for (i, events) in workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
        {
            out[i] = events;
        }
    });
    out
}

fn record_job(dir: &Path, rel: &Path, walked_before: Option<&PathBuf>) -> Vec<Ev> {
    let mut events = Vec::new();
    let mut visited: HashSet<PathBuf> = walked_before.into_iter().cloned().collect();
    if record(dir, rel, &mut visited, &mut events, None).is_err() {
        events.push(Ev::Failed);
    }
    events
}

/// Records the depth-first listing of `dir` (`rel` below the root) into `out`, each folder
/// once per `visited`. With `jobs`, the sub-folders of `dir` are not walked but recorded
/// as jobs to list apart. On an error the record stops (its caller marks it failed).
fn record(
    dir: &Path,
    rel: &Path,
    visited: &mut HashSet<PathBuf>,
    out: &mut Vec<Ev>,
    mut jobs: Option<&mut Vec<(PathBuf, PathBuf)>>,
) -> Result<(), DataError> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| DataError::io(dir, e))?;
    if !visited.insert(canonical.clone()) {
        return Ok(()); // a symlink loop or a second link to the same folder
    }
    out.push(Ev::Enter(canonical));
    // the entry's own type comes with the listing on most file systems: no stat per file,
    // which at ImageNet's 1.28 M files was most of a cold listing; a symlink is followed
    // with a stat
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
                    if extension_of(path).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                        out.push(Ev::Rejected(BadInput {
                            path: dir.join(&name),
                            index: None,
                            reason: BadReason::Io("dangling link".into()),
                        }));
                    }
                    continue;
                }
            }
        } else {
            kind
        };
        if kind.is_dir() {
            match jobs.as_deref_mut() {
                Some(jobs) => {
                    out.push(Ev::Job(jobs.len()));
                    jobs.push((dir.join(&name), rel.join(&name)));
                }
                None => record(&dir.join(&name), &rel.join(&name), visited, out, None)?,
            }
        } else if kind.is_file() {
            match extension_of(path) {
                Some(e) if IMAGE_EXTENSIONS.contains(&e.as_str()) => {
                    out.push(Ev::File(rel.join(&name)))
                }
                Some(e) if UNSUPPORTED_EXTENSIONS.contains(&e.as_str()) => {
                    out.push(Ev::Rejected(BadInput {
                        path: dir.join(&name),
                        index: None,
                        reason: BadReason::Unsupported(format!(".{e} file")),
                    }))
                }
                _ => out.push(Ev::Other),
            }
        }
    }
    out.push(Ev::Leave);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str) -> Ev {
        Ev::File(PathBuf::from(p))
    }

    /// Replaying records: a folder walked before is skipped with everything under it, jobs
    /// are replayed where they stand, and a failure anywhere not skipped asks for the walk
    /// again on one thread.
    #[test]
    fn replay_skips_folders_walked_before_and_reports_failures() {
        let enter = |c: &str| Ev::Enter(PathBuf::from(c));
        let mut jobs = vec![
            vec![
                enter("/r/a"),
                file("a/1.jpg"),
                enter("/r/b"),
                file("a/l/1.jpg"),
                Ev::Leave,
                Ev::Leave,
            ],
            vec![
                enter("/r/b"),
                file("b/1.jpg"),
                enter("/r/c"),
                file("b/c/1.jpg"),
                Ev::Leave,
                Ev::Leave,
            ],
            vec![enter("/r/c"), file("c/1.jpg"), Ev::Other, Ev::Leave],
        ];
        let top = vec![
            enter("/r"),
            file("0.jpg"),
            Ev::Job(0),
            Ev::Job(1),
            Ev::Job(2),
            file("z.jpg"),
            Ev::Leave,
        ];
        let mut l = Listing::default();
        assert!(l.replay(top, &mut jobs, &mut HashSet::new()));
        let got: Vec<_> = l
            .files
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        // `b` was walked through `a/l`, and `c` through `b` ... which was skipped: `c` is
        // walked in its own job
        assert_eq!(got, ["0.jpg", "a/1.jpg", "a/l/1.jpg", "c/1.jpg", "z.jpg"]);
        assert_eq!(l.n_other, 1);
        // a failure asks for the walk again, also inside a skipped folder: the record
        // stops there, so what followed it is missing
        let mut skipped = vec![
            vec![enter("/r/a"), Ev::Leave],
            vec![enter("/r/a"), Ev::Failed],
        ];
        let top = vec![enter("/r"), Ev::Job(0), Ev::Job(1), Ev::Leave];
        assert!(!Listing::default().replay(top, &mut skipped, &mut HashSet::new()));
        let mut failed = vec![vec![enter("/r/a"), file("a/1.jpg"), Ev::Failed]];
        let top = vec![enter("/r"), Ev::Job(0), Ev::Leave];
        assert!(!Listing::default().replay(top, &mut failed, &mut HashSet::new()));
    }
}
