//! The crate's one error type. Every variant that touches the file system names the path, so a
//! message read in a log is enough to find the file (ripgrep's `WithPath` style).

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed.
    #[error("{op} {path}: {cause}")]
    Io {
        /// What the store was doing, e.g. "create directory".
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error (in the message, so not also a `source()`: an error chain would
        /// print it twice).
        cause: io::Error,
    },
    /// Another process (or another `Store` in this process) holds the state directory.
    #[error("state directory {dir} is in use by {}", match pid { Some(p) => format!("pid {p}"), None => "another process (pid unknown)".to_owned() })]
    InUse {
        /// The state directory.
        dir: PathBuf,
        /// The pid written in the lock file by the holder, when readable.
        pid: Option<u32>,
    },
    /// The catalog (the sled database) failed or is unusable.
    #[error("catalog {path}: {op}: {cause}")]
    Catalog {
        /// The catalog directory.
        path: PathBuf,
        /// What the store was doing.
        op: &'static str,
        /// The underlying error (sled's error or a captured panic message).
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The catalog was written by a newer version of this crate.
    #[error(
        "catalog {path} has schema version {found}; this build reads versions up to {supported}"
    )]
    Schema {
        /// The catalog directory.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },
    /// A save failed; nothing was committed and the previous `latest` is unchanged.
    #[error("saving checkpoint step {step} failed while {stage}: {cause}")]
    Save {
        /// The step being saved.
        step: u64,
        /// The phase that failed.
        stage: SaveStage,
        /// The cause.
        cause: Box<Error>,
    },
    /// The checkpoint would not fit: the file system has less room than its bytes plus the
    /// space the store must leave free. Nothing was written.
    #[error("{dir} has {} free; the checkpoint needs {} and {} must stay free", gb(*available), gb(*needed), gb(*reserve))]
    NoSpace {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Bytes available to this process there.
        available: u64,
        /// Bytes of the checkpoint's tensors.
        needed: u64,
        /// Bytes that must stay free.
        reserve: u64,
    },
    /// The caller handed the store something it cannot write.
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    /// The tensor data does not match its dtype and shape, or a conversion asked for the wrong type.
    #[error("tensor {name}: {reason}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A retention policy that could delete the checkpoint being written.
    #[error("invalid retention policy: {0}")]
    InvalidRetention(String),
    /// No manifest for this step in the catalog.
    #[error("no checkpoint for step {step} in {dir}")]
    NotFound {
        /// The requested step.
        step: u64,
        /// The state directory.
        dir: PathBuf,
    },
    /// The checkpoint exists but failed verification.
    #[error("checkpoint step {step} is invalid: {problem}")]
    Invalid {
        /// The step.
        step: u64,
        /// The first problem found.
        problem: Problem,
    },
    /// Checkpoints exist but none of them verifies.
    #[error("no valid checkpoint in {dir}; problems: {}", fmt_problems(problems))]
    NoValidCheckpoint {
        /// The state directory.
        dir: PathBuf,
        /// Every checkpoint tried, newest first, with its problem.
        problems: Vec<(u64, Problem)>,
    },
    /// An earlier catalog failure left the in-memory catalog in an unknown state.
    #[error("the store for {dir} is unusable after an earlier catalog failure; reopen it")]
    Poisoned {
        /// The state directory.
        dir: PathBuf,
    },
}

fn fmt_problems(problems: &[(u64, Problem)]) -> String {
    problems
        .iter()
        .map(|(step, p)| format!("step {step}: {p}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn catalog(
        path: impl Into<PathBuf>,
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Catalog {
            path: path.into(),
            op,
            cause: source.into(),
        }
    }

    /// The innermost IO error, looking through [`Error::Save`].
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { cause, .. } => Some(cause),
            Error::Save { cause, .. } => cause.io_error(),
            _ => None,
        }
    }

    /// True when the cause is a full disk: `ENOSPC`, `EDQUOT` or `EFBIG` (file size limit),
    /// or a save refused up front because it would not fit ([`Error::NoSpace`]).
    pub fn is_disk_full(&self) -> bool {
        let cause = match self {
            Error::Save { cause, .. } => cause,
            e => e,
        };
        matches!(cause, Error::NoSpace { .. })
            || self
                .io_error()
                .and_then(io::Error::raw_os_error)
                .is_some_and(|code| {
                    code == libc::ENOSPC || code == libc::EDQUOT || code == libc::EFBIG
                })
    }

    /// The failed save phase, when this is a save error.
    pub fn save_stage(&self) -> Option<SaveStage> {
        match self {
            Error::Save { stage, .. } => Some(*stage),
            _ => None,
        }
    }
}

/// The phases of [`crate::Store::save`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveStage {
    /// Checking the payload (names, sizes).
    Validate,
    /// Checking that the checkpoint fits on the file system.
    Space,
    /// Creating the temporary directory.
    Prepare,
    /// Writing the safetensors files and `manifest.json`.
    WriteFiles,
    /// `fsync` of every file.
    SyncFiles,
    /// Renaming the temporary directory to its final name.
    Rename,
    /// `fsync` of the directories.
    SyncDir,
    /// Recording the manifest and moving `latest` in the catalog, then flushing it.
    CatalogCommit,
}

/// After a save, the file system has no room for one more checkpoint of its size beside
/// the bytes that must stay free: the next save will be refused unless space is freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskLow {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Bytes available there after the save.
    pub available: u64,
    /// Bytes of the checkpoint just saved (the next one's size, about).
    pub next: u64,
    /// Bytes that must stay free.
    pub reserve: u64,
}

impl fmt::Display for DiskLow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} free on {}: the next checkpoint ({}) will not fit beside the {} that must stay free",
            gb(self.available),
            self.dir.display(),
            gb(self.next),
            gb(self.reserve)
        )
    }
}

/// Bytes for messages: `1.25 GB`, `3.4 MB`, `812 kB`, `96 bytes`.
pub(crate) fn gb(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} kB", b / 1e3)
    } else {
        format!("{bytes} bytes")
    }
}

impl fmt::Display for SaveStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SaveStage::Validate => "validating the payload",
            SaveStage::Space => "checking the free space",
            SaveStage::Prepare => "creating the temporary directory",
            SaveStage::WriteFiles => "writing files",
            SaveStage::SyncFiles => "syncing files",
            SaveStage::Rename => "renaming the temporary directory",
            SaveStage::SyncDir => "syncing directories",
            SaveStage::CatalogCommit => "committing to the catalog",
        })
    }
}

/// Why a checkpoint failed verification. One per file (or per manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The manifest stored in the catalog does not parse.
    ManifestUnparsable {
        /// The parser's message.
        error: String,
    },
    /// A file listed in the manifest does not exist.
    MissingFile {
        /// The file.
        file: PathBuf,
    },
    /// A file has a different size than recorded.
    SizeMismatch {
        /// The file.
        file: PathBuf,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's BLAKE3 hash differs from the recorded one.
    HashMismatch {
        /// The file.
        file: PathBuf,
        /// Hash recorded in the manifest (hex).
        expected: String,
        /// Hash of the bytes on disk (hex).
        actual: String,
    },
    /// The file has the recorded hash but is not a safetensors file this crate can read.
    Unparsable {
        /// The file.
        file: PathBuf,
        /// The parser's message.
        error: String,
    },
    /// Reading the file failed (permissions, EIO, ...).
    Unreadable {
        /// The file.
        file: PathBuf,
        /// The OS error message.
        error: String,
    },
}

impl Problem {
    /// True for problems that say the bytes on disk are wrong (as opposed to a failed read,
    /// which may be transient). Only these mark a checkpoint as bad in the catalog.
    pub fn is_corruption(&self) -> bool {
        !matches!(self, Problem::Unreadable { .. })
    }
}

/// A problem is the whole error where no store is involved ([`crate::read_group_file`]).
impl std::error::Error for Problem {}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ManifestUnparsable { error } => write!(f, "manifest does not parse: {error}"),
            Problem::MissingFile { file } => write!(f, "{}: file is missing", file.display()),
            Problem::SizeMismatch {
                file,
                expected,
                actual,
            } => write!(
                f,
                "{}: size {actual} bytes, manifest says {expected}",
                file.display()
            ),
            Problem::HashMismatch {
                file,
                expected,
                actual,
            } => write!(
                f,
                "{}: blake3 {actual}, manifest says {expected}",
                file.display()
            ),
            Problem::Unparsable { file, error } => {
                write!(
                    f,
                    "{}: not a readable safetensors file: {error}",
                    file.display()
                )
            }
            Problem::Unreadable { file, error } => {
                write!(f, "{}: read failed: {error}", file.display())
            }
        }
    }
}
