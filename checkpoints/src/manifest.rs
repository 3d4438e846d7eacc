//! What the caller hands to `save` and what the catalog records about each checkpoint.

use serde::{Deserialize, Serialize};

use crate::tensor::TensorGroup;

/// Version of the manifest layout; bumped on incompatible changes.
pub const MANIFEST_FORMAT: u32 = 1;

/// Everything one checkpoint holds. `meta` is opaque to the store (config text, data cursor,
/// RNG state, optimizer scalars, stage machine, ...); the typed fields are what the store itself
/// and the operator tools need.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPayload {
    /// Training step this state belongs to.
    pub step: u64,
    /// One safetensors file per group (`student`, `teacher`, `optimizer`, ...).
    pub groups: Vec<TensorGroup>,
    /// Hash of the effective config, so a resume can refuse a mismatched one.
    pub config_hash: String,
    /// Version of the code that wrote the checkpoint (e.g. git describe).
    pub code_version: String,
    /// Opaque metadata; stored in the manifest as is.
    pub meta: serde_json::Value,
}

impl CheckpointPayload {
    /// An empty payload for `step`; add groups with [`CheckpointPayload::with_group`].
    pub fn new(step: u64) -> Self {
        CheckpointPayload {
            step,
            groups: Vec::new(),
            config_hash: String::new(),
            code_version: String::new(),
            meta: serde_json::Value::Null,
        }
    }

    /// Adds a group.
    pub fn with_group(mut self, group: TensorGroup) -> Self {
        self.groups.push(group);
        self
    }

    /// Sets the config hash and code version.
    pub fn with_versions(
        mut self,
        config_hash: impl Into<String>,
        code_version: impl Into<String>,
    ) -> Self {
        self.config_hash = config_hash.into();
        self.code_version = code_version.into();
        self
    }

    /// Sets the opaque metadata.
    pub fn with_meta(mut self, meta: serde_json::Value) -> Self {
        self.meta = meta;
        self
    }

    /// Bytes of tensor data over all groups.
    pub fn data_bytes(&self) -> u64 {
        self.groups.iter().map(TensorGroup::data_bytes).sum()
    }
}

/// One file of a checkpoint, as recorded at save time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Group name.
    pub group: String,
    /// File name inside the checkpoint directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file, lowercase hex.
    pub blake3: String,
    /// Number of tensors in the file.
    pub n_tensors: usize,
}

/// The catalog record of one committed checkpoint (also written as `manifest.json` in its
/// directory, from which a lost catalog is rebuilt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] at write time.
    pub format: u32,
    /// Training step.
    pub step: u64,
    /// Wall-clock time of the save, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Directory name under `checkpoints/` (`step-000000001234`, or with a `-N` suffix when a
    /// step was saved again after a rollback).
    pub dir: String,
    /// The files, in payload order.
    pub files: Vec<FileEntry>,
    /// Hash of the effective config.
    pub config_hash: String,
    /// Version of the writing code.
    pub code_version: String,
    /// The step `latest` pointed to when this one was saved.
    pub previous_step: Option<u64>,
    /// The caller's opaque metadata.
    pub meta: serde_json::Value,
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The entry of one group.
    pub fn file(&self, group: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.group == group)
    }
}

/// Directory name for a step; `attempt` > 0 when the plain name is taken.
pub(crate) fn dir_name(step: u64, attempt: u32) -> String {
    if attempt == 0 {
        format!("step-{step:012}")
    } else {
        format!("step-{step:012}-{attempt}")
    }
}

/// What a name under `checkpoints/` is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DirKind {
    /// A (possibly committed) checkpoint directory of this step.
    Step(u64),
    /// A temporary directory of an unfinished save.
    Tmp,
    /// Something we did not create.
    Foreign,
}

pub(crate) fn classify_dir_name(name: &str) -> DirKind {
    let Some(rest) = name.strip_prefix("step-") else {
        return DirKind::Foreign;
    };
    let (rest, tmp) = match rest.strip_suffix(".tmp") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (digits, suffix) = match rest.split_once('-') {
        Some((d, s)) => (d, Some(s)),
        None => (rest, None),
    };
    let well_formed = digits.len() >= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && suffix.is_none_or(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    match (well_formed, tmp, digits.parse::<u64>()) {
        (true, true, _) => DirKind::Tmp,
        (true, false, Ok(step)) => DirKind::Step(step),
        _ => DirKind::Foreign,
    }
}
