//! Fault injection for the save path. The store asks its injector before every IO step of a
//! save; an `Err` is treated exactly like the OS returning that error. Tests and the daemon's
//! `--inject io-error-on-save` use this; production stores have no injector.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// The IO steps of a save at which a fault can be injected, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultStage {
    /// Before each chunk written to a tensor file (or `manifest.json`).
    Write,
    /// Before the `fsync` of each file.
    FileSync,
    /// Before renaming `step-….tmp` to its final name.
    Rename,
    /// Before the `fsync` of the checkpoint directory and its parent.
    DirSync,
    /// Before the catalog transaction.
    CatalogCommit,
    /// After the catalog transaction, before the flush that makes it durable (the store must undo
    /// the transaction).
    CatalogFlush,
    /// Before deleting each old checkpoint (retention); a failure here must not fail the save.
    Gc,
}

impl fmt::Display for FaultStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultStage::Write => "write",
            FaultStage::FileSync => "file_sync",
            FaultStage::Rename => "rename",
            FaultStage::DirSync => "dir_sync",
            FaultStage::CatalogCommit => "catalog_commit",
            FaultStage::CatalogFlush => "catalog_flush",
            FaultStage::Gc => "gc",
        })
    }
}

/// Where a save is when it consults the injector.
#[derive(Debug, Clone, Copy)]
pub struct FaultPoint<'a> {
    /// The IO step about to happen.
    pub stage: FaultStage,
    /// The step being saved.
    pub step: u64,
    /// The file or directory concerned.
    pub path: &'a Path,
    /// Bytes written to files by this save so far (before this chunk).
    pub bytes_written: u64,
    /// Size of the chunk about to be written (0 for non-write stages).
    pub len: u64,
}

/// Decides whether an IO step fails. Implementations must be cheap: `check` runs once per
/// written chunk (a few MiB).
pub trait FaultInjector: Send + Sync + fmt::Debug {
    /// `Err` makes the store behave as if the OS had returned that error at this point.
    fn check(&self, point: &FaultPoint<'_>) -> io::Result<()>;
}

/// A ready-made injector: fail at one stage, a given number of times. For
/// [`FaultStage::Write`] it fails the first chunk that would cross `after_bytes` bytes of this save.
#[derive(Debug)]
pub struct InjectFault {
    stage: FaultStage,
    after_bytes: u64,
    skip: AtomicU32,
    remaining: AtomicU32,
    errno: i32,
}

impl InjectFault {
    /// Fail once at `stage` with `EIO`.
    pub fn once(stage: FaultStage) -> Self {
        InjectFault {
            stage,
            after_bytes: 0,
            skip: AtomicU32::new(0),
            remaining: AtomicU32::new(1),
            errno: libc::EIO,
        }
    }

    /// Fail the first write that crosses `n` bytes of the save, once, with `EIO`.
    pub fn write_after_bytes(n: u64) -> Self {
        InjectFault {
            after_bytes: n,
            ..InjectFault::once(FaultStage::Write)
        }
    }

    /// Fail `times` times instead of once.
    pub fn times(self, times: u32) -> Self {
        self.remaining.store(times, Ordering::SeqCst);
        self
    }

    /// Let the first `n` matching points pass (e.g. fail the second directory fsync).
    pub fn skip(self, n: u32) -> Self {
        self.skip.store(n, Ordering::SeqCst);
        self
    }

    /// Use this OS error number (e.g. `libc::ENOSPC`) instead of `EIO`.
    pub fn errno(mut self, errno: i32) -> Self {
        self.errno = errno;
        self
    }

    /// How many failures are still armed.
    pub fn remaining(&self) -> u32 {
        self.remaining.load(Ordering::SeqCst)
    }
}

impl FaultInjector for InjectFault {
    fn check(&self, point: &FaultPoint<'_>) -> io::Result<()> {
        if point.stage != self.stage {
            return Ok(());
        }
        if point.stage == FaultStage::Write && point.bytes_written + point.len <= self.after_bytes {
            return Ok(());
        }
        let skipped = self
            .skip
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if skipped {
            return Ok(());
        }
        let armed = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !armed {
            return Ok(());
        }
        // A raw OS error, so callers classify it exactly like a real one
        // (`Error::is_disk_full` for ENOSPC, ...).
        Err(io::Error::from_raw_os_error(self.errno))
    }
}
