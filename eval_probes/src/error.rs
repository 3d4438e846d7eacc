//! The one error type of the crate. Probes fail for three kinds of reasons: the caller
//! handed inconsistent shapes or an invalid config (a bug or a config mistake upstream),
//! the model or data crate failed underneath, or a picture could not be written.

use std::path::PathBuf;

/// Everything that can go wrong in `eval_probes`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A tensor kernel or the model forward failed.
    #[error("tensor operation failed: {0}")]
    Tensor(candle_core::Error),
    /// Loading probe images failed.
    #[error("loading probe images: {0}")]
    Data(data::DataError),
    /// A config value is out of range; every problem is listed.
    #[error("invalid config: {}", .0.join("; "))]
    Config(Vec<String>),
    /// Inputs disagree about their sizes.
    #[error("{what}: {detail}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// What does not match.
        detail: String,
    },
    /// A probe set cannot be built or used as asked.
    #[error("probe set {name:?}: {reason}")]
    ProbeSet {
        /// The set's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A picture could not be written.
    #[error("writing {}: {reason}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plot renderer failed.
    #[error("plotting: {0}")]
    Plot(String),
}

// The wrapped errors are in the messages, so they are not also a `source()`: an error
// chain (`{:#}`) would print them twice.
impl From<candle_core::Error> for ProbeError {
    fn from(e: candle_core::Error) -> Self {
        ProbeError::Tensor(e)
    }
}

impl From<data::DataError> for ProbeError {
    fn from(e: data::DataError) -> Self {
        ProbeError::Data(e)
    }
}

impl ProbeError {
    pub(crate) fn shape(what: &'static str, detail: impl Into<String>) -> Self {
        ProbeError::Shape {
            what,
            detail: detail.into(),
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = ProbeError> = std::result::Result<T, E>;
