//! The checkpoint store of dinod: named tensor blobs in checksummed safetensors files, and a sled
//! catalog of small records (manifests, the `latest` pointer, the event log, probe history,
//! actor status snapshots, quarantined inputs), plus the retention policy.
//!
//! # What this crate must not know
//!
//! Nothing of the model, candle, tokio or the actors: it stores named tensor blobs
//! ([`TensorBlob`], [`TensorGroup`]) and opaque JSON metadata. It is the only crate of the
//! workspace that names sled; sled types never appear in its public API.
//!
//! # On-disk layout of a state directory `DIR`
//!
//! ```text
//! DIR/LOCK                          flock + pid of the owning process
//! DIR/catalog/                      sled: trees manifests (step -> manifest JSON), meta (latest,
//!                                   schema, bad markers), scores, events, probes, status, quarantine
//! DIR/checkpoints/step-000000001234/
//!     student.safetensors           one file per group, named by the caller
//!     teacher.safetensors
//!     ...
//!     manifest.json                 copy of the catalog record, to rebuild a lost catalog
//! DIR/checkpoints/step-000000001234.tmp/   a save in progress (or interrupted)
//! ```
//!
//! Tensors never go into sled: sled 0.34 keeps every large value ever written (measured: 11x
//! disk growth after 20 checkpoints, still growing). The catalog holds kilobytes.
//!
//! # Commit protocol ([`Store::save`])
//!
//! 1. Write each group to `step-….tmp/<group>.safetensors` (BLAKE3 computed while writing) and
//!    `manifest.json`; `fsync` every file and the directory; rename it to `step-…`; `fsync`
//!    `checkpoints/`.
//! 2. One sled transaction records the manifest (step, files with sizes and hashes, config hash,
//!    code version, previous step, the caller's meta) and moves `latest`; then `flush()`.
//! 3. Only then retention deletes old checkpoints: first their catalog records (flushed), then
//!    their directories.
//!
//! A failure in 1 or 2 removes the partial directory and leaves `latest` unchanged. Open removes
//! `*.tmp` directories and directories no manifest references; if the catalog is empty while
//! checkpoint directories exist, it is rebuilt from their `manifest.json`.
//!
//! # Invariants
//!
//! - A checkpoint is visible only after its catalog commit.
//! - `latest` always points to a fully written, fsynced checkpoint.
//! - Deletion happens only after the newer commit is durable, and never touches the newest two
//!   checkpoints, nor the newest `keep_last` that verified (see [`keep_reasons`]).
//! - Every byte loaded is verified against the size and BLAKE3 recorded at save time;
//!   [`Store::load_latest_valid`] falls back to older checkpoints, one event per fallback.
//! - One process owns a state directory at a time ([`Error::InUse`]).

#![warn(missing_docs, unreachable_pub)]

mod catalog;
mod error;
mod fault;
mod fsx;
mod manifest;
mod retention;
mod store;
mod tensor;
mod tensorfile;

#[cfg(test)]
mod tests;

pub use catalog::{event_kind, Event, Level, ProbeRecord, StoredEvent, CATALOG_SCHEMA};
pub use error::{DiskLow, Error, Problem, Result, SaveStage};
pub use fault::{FaultInjector, FaultPoint, FaultStage, InjectFault};
pub use fsx::{disk_usage, lock_holder, now_ms};
pub use manifest::{CheckpointPayload, FileEntry, Manifest, MANIFEST_FORMAT};
pub use retention::{
    keep_reasons, plan_retention, CheckpointInfo, KeepBest, KeepReason, Retention, MIN_KEEP_LAST,
};
pub use store::{
    read_group_file, CheckpointEntry, LoadedCheckpoint, SaveReport, Store, StoreOptions,
    VerifyReport, MANIFEST_FILE,
};
pub use tensor::{Dtype, TensorBlob, TensorGroup};
pub use tensorfile::{bytes_read, read_safetensors};
