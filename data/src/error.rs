//! Typed errors of the crate, and the record of one unreadable input file.
//!
//! A [`BadInput`] is not fatal: the loader skips the sample, counts it and hands the record to the
//! caller (who logs one warning line and writes the quarantine file). A [`DataError`] stops the caller.

use std::fmt;
use std::path::PathBuf;

/// Why one input file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum BadReason {
    /// The file has zero bytes.
    Empty,
    /// The content is not a recognised image format, whatever the file name says.
    NotAnImage,
    /// A recognised image format that this build cannot decode (only JPEG, PNG and WebP are).
    Unsupported(String),
    /// The header announces more pixels than the limit (decompression-bomb guard); nothing decoded.
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The pixel limit in force.
        limit: u64,
    },
    /// The decoder failed (truncated or corrupt data, bad header, ...).
    Corrupt(String),
    /// The file could not be read.
    Io(String),
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::Empty => write!(f, "empty file (0 bytes)"),
            BadReason::NotAnImage => write!(f, "not an image (content matches no known image format)"),
            BadReason::Unsupported(format) => write!(f, "unsupported image format {format} (only JPEG, PNG and WebP are read)"),
            BadReason::TooLarge { width, height, limit } => write!(
                f,
                "too large: {width}x{height} = {} pixels exceeds the limit of {limit} (decompression bomb guard)",
                u64::from(*width) * u64::from(*height)
            ),
            BadReason::Corrupt(msg) => write!(f, "corrupt or truncated: {msg}"),
            BadReason::Io(msg) => write!(f, "cannot read: {msg}"),
        }
    }
}

/// One input file that was skipped, with the reason. `Display` gives the one warning line to log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadInput {
    /// The file (or, for generated sources, a pseudo path naming the sample).
    pub path: PathBuf,
    /// The source index of the sample, when it has one.
    pub index: Option<u64>,
    /// Why it was skipped.
    pub reason: BadReason,
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// Errors of the data crate.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The IO error (in the message, so not also a `source()`).
        cause: std::io::Error,
    },
    /// One sample is unreadable; the loader skips it (see [`BadInput`]).
    #[error("bad input {0}")]
    BadInput(BadInput),
    /// The source holds no readable image at all.
    #[error("{}: no readable image ({detail})", path.display())]
    NoReadableImages {
        /// The folder or file of the source.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// A data file is malformed (IDX header, manifest, ...).
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A source spec string could not be parsed.
    #[error("invalid data source {spec:?}: {reason}")]
    Spec {
        /// The string as given.
        spec: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// The configuration is invalid; every violation is listed.
    #[error("invalid data config: {}", .0.join("; "))]
    Config(Vec<String>),
    /// An index past the end of a finite source.
    #[error("index {index} out of range for {what} ({len} samples)")]
    IndexOutOfRange {
        /// The index asked for.
        index: u64,
        /// The source length.
        len: u64,
        /// The source, described.
        what: String,
    },
    /// An image could not be encoded or written (dataset builders).
    #[error("{}: cannot write image: {reason}", path.display())]
    Encode {
        /// The output file.
        path: PathBuf,
        /// The encoder's message.
        reason: String,
    },
    /// The loader's worker threads stopped (a panic or a closed channel).
    #[error("data loader stopped: {0}")]
    Loader(String),
}

impl DataError {
    /// Wraps an IO error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            cause: source,
        }
    }

    /// True for a single unreadable sample that a loader may skip.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, DataError::BadInput(_))
    }
}
