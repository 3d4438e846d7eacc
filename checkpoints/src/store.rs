//! The store: the save and load protocols, verification, retention and the catalog records.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::catalog::{event_kind, Catalog, Event, Level, ProbeRecord, StoredEvent};
use crate::error::{Error, Problem, Result, SaveStage};
use crate::fault::{FaultInjector, FaultStage};
use crate::fsx::{self, now_ms, LockFile};
use crate::manifest::{
    classify_dir_name, dir_name, CheckpointPayload, DirKind, FileEntry, Manifest, MANIFEST_FORMAT,
};
use crate::retention::{keep_reasons, CheckpointInfo, KeepReason, Retention};
use crate::tensor::{group_file_name, valid_group_name, TensorGroup};
use crate::tensorfile::{self, Expect, SaveIo};

/// Name of the manifest copy inside each checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// How to open a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Which checkpoints to keep.
    pub retention: Retention,
    /// Size bound of the event log; the oldest entries are trimmed. At least 1.
    pub max_events: u64,
    /// sled page cache size in bytes (the catalog is small; sled's default is 1 GiB).
    pub catalog_cache_bytes: u64,
    /// Fault injection for tests and the daemon's fault flags; `None` in normal operation.
    pub fault_injector: Option<Arc<dyn FaultInjector>>,
    /// Bytes the checkpoints must leave free on their file system: a save that would eat
    /// into them is refused before it writes anything ([`Error::NoSpace`]), and a save
    /// after which one more checkpoint would not fit logs `checkpoint.disk_low`.
    pub min_free_bytes: u64,
}

impl StoreOptions {
    /// Defaults: 100 000 events, 32 MiB catalog cache, no fault injection.
    pub fn new(retention: Retention) -> Self {
        StoreOptions {
            retention,
            max_events: 100_000,
            catalog_cache_bytes: 32 << 20,
            fault_injector: None,
            min_free_bytes: 0,
        }
    }

    /// Sets the bytes the checkpoints must leave free (see [`StoreOptions::min_free_bytes`]).
    pub fn with_min_free_bytes(mut self, n: u64) -> Self {
        self.min_free_bytes = n;
        self
    }

    /// Sets the event-log bound.
    pub fn with_max_events(mut self, n: u64) -> Self {
        self.max_events = n;
        self
    }

    /// Installs a fault injector.
    pub fn with_fault_injector(mut self, injector: Arc<dyn FaultInjector>) -> Self {
        self.fault_injector = Some(injector);
        self
    }
}

/// What a successful save did and how long each phase took.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    /// The committed step.
    pub step: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// Bytes written (all files, `manifest.json` included).
    pub bytes: u64,
    /// The files as recorded in the manifest.
    pub files: Vec<FileEntry>,
    /// Serializing, hashing and writing the files.
    pub write: Duration,
    /// `fsync` of files and directories, and the rename.
    pub fsync: Duration,
    /// Catalog transaction plus its flush: after this the checkpoint is durable and visible.
    pub commit: Duration,
    /// Retention (deleting old checkpoints).
    pub gc: Duration,
    /// Steps deleted by retention.
    pub deleted: Vec<u64>,
    /// Retention failure, if any; the save itself succeeded and deletion is retried later.
    pub gc_error: Option<String>,
    /// Set when the file system has no room for one more checkpoint of this size beside
    /// the bytes that must stay free: the next save will be refused unless space is freed.
    pub disk_low: Option<crate::error::DiskLow>,
}

impl SaveReport {
    /// Time until the checkpoint was durable (write + fsync + commit).
    pub fn durable(&self) -> Duration {
        self.write + self.fsync + self.commit
    }

    /// Everything, GC included.
    pub fn total(&self) -> Duration {
        self.durable() + self.gc
    }

    /// Throughput to durability, in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.durable().as_secs_f64().max(1e-9)
    }
}

/// A verified, loaded checkpoint.
#[derive(Debug, Clone)]
pub struct LoadedCheckpoint {
    /// Its manifest (step, versions, the caller's meta).
    pub manifest: Manifest,
    /// The groups, in manifest order.
    pub groups: Vec<TensorGroup>,
    /// Newer checkpoints skipped by `load_latest_valid`, newest first, with the reason.
    pub skipped: Vec<(u64, Problem)>,
    /// Bytes read and hashed.
    pub bytes: u64,
    /// Time to read, hash and parse.
    pub elapsed: Duration,
}

impl LoadedCheckpoint {
    /// The step.
    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    /// The caller's opaque metadata.
    pub fn meta(&self) -> &serde_json::Value {
        &self.manifest.meta
    }

    /// One group by name.
    pub fn group(&self, name: &str) -> Option<&TensorGroup> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// Takes one group out by name.
    pub fn take_group(&mut self, name: &str) -> Option<TensorGroup> {
        let idx = self.groups.iter().position(|g| g.name == name)?;
        Some(self.groups.remove(idx))
    }
}

/// Result of verifying one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The step.
    pub step: u64,
    /// Every problem found (empty: the checkpoint is valid).
    pub problems: Vec<Problem>,
    /// Bytes read and hashed.
    pub bytes: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One line of `dinod checkpoints list`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointEntry {
    /// The step.
    pub step: u64,
    /// Directory name under `checkpoints/` (empty if the manifest does not parse).
    pub dir: String,
    /// Save time, ms since the epoch.
    pub created_at_ms: Option<u64>,
    /// Bytes of all files.
    pub bytes: u64,
    /// Number of tensor files.
    pub n_files: usize,
    /// Config hash recorded at save time.
    pub config_hash: String,
    /// Code version recorded at save time.
    pub code_version: String,
    /// `latest` points here.
    pub is_latest: bool,
    /// Newer than `latest` (left over from before a rollback); deleted at the next save.
    pub superseded: bool,
    /// Scores recorded with `set_score`.
    pub scores: BTreeMap<String, f64>,
    /// The problem found by the last verification, if it failed.
    pub bad: Option<Problem>,
    /// Set when the manifest itself does not parse.
    pub manifest_error: Option<String>,
    /// Why retention keeps it (empty: deleted at the next save).
    pub keep: Vec<KeepReason>,
}

/// The checkpoint store of one state directory. `Send + Sync`: share it in an `Arc` between the
/// writer thread and readers. Holds the directory's lock for its whole life.
pub struct Store {
    dir: PathBuf,
    ckpt_dir: PathBuf,
    catalog: Catalog,
    retention: Retention,
    injector: Option<Arc<dyn FaultInjector>>,
    min_free_bytes: u64,
    /// Serializes saves (and their retention).
    save_lock: Mutex<()>,
    /// Readers of checkpoint files hold it shared; retention holds it exclusively while it
    /// deletes, so a load never sees a directory vanish under it.
    files_lock: RwLock<()>,
    poisoned: AtomicBool,
    _lock: LockFile,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Outcome of the save phases before the commit.
struct Staged {
    manifest: Manifest,
    final_dir: PathBuf,
    bytes: u64,
    write: Duration,
    fsync: Duration,
}

/// A failed phase and whether the final directory already exists.
struct Failed {
    stage: SaveStage,
    error: Error,
    renamed: bool,
}

impl Store {
    /// Opens (creating if needed) the state directory `dir`: takes its lock, opens the catalog,
    /// removes leftovers of interrupted saves, and rebuilds an empty catalog from the checkpoint
    /// directories if there are any.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let dir = dir.as_ref().to_owned();
        options.retention.validate()?;
        if options.max_events == 0 {
            return Err(Error::InvalidPayload(
                "max_events must be at least 1".into(),
            ));
        }
        fs::create_dir_all(&dir).map_err(|e| Error::io("create state directory", &dir, e))?;
        let lock = LockFile::acquire(&dir)?;
        let ckpt_dir = dir.join("checkpoints");
        fs::create_dir_all(&ckpt_dir)
            .map_err(|e| Error::io("create checkpoints directory", &ckpt_dir, e))?;
        let catalog = Catalog::open(
            &dir.join("catalog"),
            options.catalog_cache_bytes,
            options.max_events,
        )?;
        let store = Store {
            dir,
            ckpt_dir,
            catalog,
            retention: options.retention,
            injector: options.fault_injector,
            min_free_bytes: options.min_free_bytes,
            save_lock: Mutex::new(()),
            files_lock: RwLock::new(()),
            poisoned: AtomicBool::new(false),
            _lock: lock,
        };
        store.recover()?;
        Ok(store)
    }

    /// Moves a catalog that no longer opens (sled reports corruption) aside to
    /// `catalog.broken-<ms>` (never deleted) and opens the store, which rebuilds the catalog
    /// from the `manifest.json` of every checkpoint directory. Events, probes, status and
    /// quarantine records of the old catalog are not recovered.
    pub fn rebuild_catalog(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let dir = dir.as_ref();
        {
            let _lock = LockFile::acquire(dir)?;
            let catalog = dir.join("catalog");
            if catalog.exists() {
                let aside = dir.join(format!("catalog.broken-{}", now_ms()));
                fs::rename(&catalog, &aside)
                    .map_err(|e| Error::io("move broken catalog aside", &catalog, e))?;
            }
        }
        Store::open(dir, options)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/checkpoints`.
    pub fn checkpoints_dir(&self) -> &Path {
        &self.ckpt_dir
    }

    /// The retention policy in force.
    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Bytes allocated under the state directory (checkpoints and catalog).
    pub fn disk_usage(&self) -> Result<u64> {
        fsx::disk_usage(&self.dir).map_err(|e| Error::io("measure disk usage", &self.dir, e))
    }

    // ---- open-time recovery ----------------------------------------------------------------

    /// Removes `*.tmp` directories (interrupted saves) and directories no manifest references
    /// (saves interrupted between rename and commit, or deletions interrupted by a crash). If the
    /// catalog has no manifest at all while checkpoint directories exist, the catalog was lost:
    /// rebuild it from their `manifest.json` instead of deleting anything.
    fn recover(&self) -> Result<()> {
        let entries = self.scan_dirs()?;
        for (name, kind) in &entries {
            if *kind == DirKind::Tmp {
                self.remove_leftover(name, "temporary directory of an interrupted save")?;
            }
        }
        let step_dirs: Vec<&String> = entries
            .iter()
            .filter(|(_, k)| matches!(k, DirKind::Step(_)))
            .map(|(n, _)| n)
            .collect();
        if step_dirs.is_empty() {
            return Ok(());
        }
        if !self.catalog.has_manifests()? {
            return self.import_dirs(&step_dirs);
        }
        let referenced = self.referenced_dirs()?;
        for name in step_dirs {
            if !referenced.contains(name) {
                self.remove_leftover(name, "checkpoint directory not committed to the catalog")?;
            }
        }
        Ok(())
    }

    fn scan_dirs(&self) -> Result<Vec<(String, DirKind)>> {
        let read = fs::read_dir(&self.ckpt_dir)
            .map_err(|e| Error::io("list checkpoints directory", &self.ckpt_dir, e))?;
        let mut out = Vec::new();
        for entry in read {
            let entry =
                entry.map_err(|e| Error::io("list checkpoints directory", &self.ckpt_dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = classify_dir_name(&name);
            if kind != DirKind::Foreign {
                out.push((name, kind));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn referenced_dirs(&self) -> Result<HashSet<String>> {
        Ok(self
            .catalog
            .raw_manifests()?
            .into_iter()
            .filter_map(|raw| serde_json::from_slice::<Manifest>(&raw.bytes).ok())
            .map(|m| m.dir)
            .collect())
    }

    fn remove_leftover(&self, name: &str, why: &str) -> Result<()> {
        let path = self.ckpt_dir.join(name);
        fs::remove_dir_all(&path).map_err(|e| Error::io("remove leftover directory", &path, e))?;
        fsx::fsync_dir(&self.ckpt_dir).map_err(|e| Error::io("fsync", &self.ckpt_dir, e))?;
        self.event(
            Event::new(
                Level::Info,
                event_kind::CLEANED,
                format!("removed {}: {why}", path.display()),
            )
            .fields(json!({ "path": path, "reason": why })),
        );
        Ok(())
    }

    /// Rebuilds an empty catalog from the `manifest.json` of each checkpoint directory. Every
    /// parsable manifest is imported; directories whose files fail verification are imported
    /// and marked bad, so fallback and retention treat them as usual.
    fn import_dirs(&self, names: &[&String]) -> Result<()> {
        let mut found: BTreeMap<u64, Manifest> = BTreeMap::new();
        let mut skipped = Vec::new();
        for name in names {
            let path = self.ckpt_dir.join(name.as_str()).join(MANIFEST_FILE);
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()))
                .and_then(|m| {
                    if &m.dir == *name {
                        Ok(m)
                    } else {
                        Err(format!("manifest names directory {}", m.dir))
                    }
                });
            match parsed {
                // Two directories for one step: a re-save after a rollback; the newer wins.
                Ok(m) => match found.get(&m.step) {
                    Some(old) if old.created_at_ms > m.created_at_ms => {}
                    _ => {
                        found.insert(m.step, m);
                    }
                },
                Err(e) => skipped.push(format!("{}: {e}", path.display())),
            }
        }
        let Some(&latest) = found.keys().next_back() else {
            self.event(
                Event::new(
                    Level::Warn,
                    event_kind::CATALOG_REBUILT,
                    format!(
                        "catalog is empty and no checkpoint directory has a readable manifest; left them in place: {}",
                        skipped.join("; ")
                    ),
                )
                .fields(json!({ "skipped": skipped })),
            );
            return Ok(());
        };
        let records = found
            .values()
            .map(|m| Ok((m.step, encode_manifest(m)?)))
            .collect::<Result<Vec<_>>>()?;
        self.catalog.import(&records, latest)?;
        let mut bad = Vec::new();
        for m in found.values() {
            let report = self.verify_manifest(m);
            if let Some(p) = report.problems.iter().find(|p| p.is_corruption()) {
                self.catalog.set_bad(m.step, Some(p))?;
                bad.push(m.step);
            }
        }
        let steps: Vec<u64> = found.keys().copied().collect();
        self.event(
            Event::new(
                Level::Warn,
                event_kind::CATALOG_REBUILT,
                format!(
                    "catalog was empty; imported {} checkpoints from their manifest.json (latest {latest}, {} failed verification)",
                    steps.len(),
                    bad.len()
                ),
            )
            .fields(json!({ "imported": steps, "bad": bad, "skipped": skipped })),
        );
        Ok(())
    }

    // ---- save ----------------------------------------------------------------------------

    /// Writes a checkpoint and commits it; see the crate docs for the protocol. On error
    /// nothing is committed, `latest` is unchanged and the partial directory is removed.
    /// Saving step `s` supersedes every committed checkpoint with step `>= s` (a rollback
    /// re-trains those steps); they are deleted after the new commit is durable.
    pub fn save(&self, payload: &CheckpointPayload) -> Result<SaveReport> {
        let step = payload.step;
        self.check_poisoned()?;
        let _save = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        validate_payload(payload).map_err(|e| Error::Save {
            step,
            stage: SaveStage::Validate,
            cause: Box::new(e),
        })?;

        let previous = self.catalog.latest()?;
        let name = self.free_dir_name(step)?;
        let tmp = self.ckpt_dir.join(format!("{name}.tmp"));
        let final_dir = self.ckpt_dir.join(&name);

        if let Err(error) = self.check_space(payload) {
            let f = Failed {
                stage: SaveStage::Space,
                error,
                renamed: false,
            };
            return Err(self.abort_save(step, f, &tmp, &final_dir));
        }

        let staged = match self.stage(payload, &name, previous, &tmp, &final_dir) {
            Ok(s) => s,
            Err(f) => return Err(self.abort_save(step, f, &tmp, &final_dir)),
        };

        let t = Instant::now();
        if let Err(e) = self.commit(&staged.manifest) {
            let f = Failed {
                stage: SaveStage::CatalogCommit,
                error: e,
                renamed: true,
            };
            return Err(self.abort_save(step, f, &tmp, &final_dir));
        }
        let commit = t.elapsed();

        self.event(
            Event::new(
                Level::Info,
                event_kind::SAVED,
                format!("saved checkpoint step {step} ({} bytes)", staged.bytes),
            )
            .step(step)
            .fields(json!({
                "dir": staged.final_dir,
                "bytes": staged.bytes,
                "write_ms": ms(staged.write),
                "fsync_ms": ms(staged.fsync),
                "commit_ms": ms(commit),
            })),
        );

        let t = Instant::now();
        let (deleted, gc_error) = match self.collect_garbage(step) {
            Ok((deleted, None)) => (deleted, None),
            Ok((deleted, Some(e))) | Err((deleted, e)) => {
                self.event(
                    Event::new(
                        Level::Warn,
                        event_kind::GC_FAILED,
                        format!(
                            "retention after step {step} failed (retried at the next save): {e}"
                        ),
                    )
                    .step(step)
                    .fields(json!({ "error": e.to_string() })),
                );
                (deleted, Some(e.to_string()))
            }
        };
        Ok(SaveReport {
            step,
            dir: staged.final_dir,
            bytes: staged.bytes,
            files: staged.manifest.files,
            write: staged.write,
            fsync: staged.fsync,
            commit,
            gc: t.elapsed(),
            deleted,
            gc_error,
            disk_low: self.disk_low(staged.bytes),
        })
    }

    /// Refuses a checkpoint that would not fit beside the bytes that must stay free, before
    /// anything is written (writing it would fail part way, or fill the disk that the
    /// system and the logs need). A file system that cannot say is not checked.
    fn check_space(&self, payload: &CheckpointPayload) -> Result<()> {
        let Ok(available) = fsx::available_bytes(&self.ckpt_dir) else {
            return Ok(());
        };
        let needed: u64 = payload.groups.iter().map(|g| g.data_bytes()).sum();
        if available < needed.saturating_add(self.min_free_bytes) {
            return Err(Error::NoSpace {
                dir: self.ckpt_dir.clone(),
                available,
                needed,
                reserve: self.min_free_bytes,
            });
        }
        Ok(())
    }

    /// After a save of `bytes`: why the next one would not fit, if it would not.
    fn disk_low(&self, bytes: u64) -> Option<crate::error::DiskLow> {
        let available = fsx::available_bytes(&self.ckpt_dir).ok()?;
        (available < bytes.saturating_add(self.min_free_bytes)).then(|| crate::error::DiskLow {
            dir: self.ckpt_dir.clone(),
            available,
            next: bytes,
            reserve: self.min_free_bytes,
        })
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Poisoned {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// `step-…` if free, else `step-…-N`: a directory still referenced (the checkpoint being
    /// replaced stays valid until the new commit is durable) or left on disk is never reused.
    fn free_dir_name(&self, step: u64) -> Result<String> {
        let referenced = self.referenced_dirs()?;
        let mut attempt = 0;
        loop {
            let name = dir_name(step, attempt);
            if !referenced.contains(&name) && !self.ckpt_dir.join(&name).exists() {
                return Ok(name);
            }
            attempt += 1;
        }
    }

    /// Phase 1: files into the temporary directory, fsync, rename, fsync the parent.
    fn stage(
        &self,
        payload: &CheckpointPayload,
        name: &str,
        previous: Option<u64>,
        tmp: &Path,
        final_dir: &Path,
    ) -> std::result::Result<Staged, Failed> {
        let fail = |stage, renamed| {
            move |error| Failed {
                stage,
                error,
                renamed,
            }
        };
        let io_fail = |stage, op: &'static str, path: &Path, renamed| {
            let path = path.to_owned();
            move |e: io::Error| Failed {
                stage,
                error: Error::io(op, path, e),
                renamed,
            }
        };
        let mut io = SaveIo {
            step: payload.step,
            injector: self.injector.as_deref(),
            bytes_written: 0,
        };

        // Leftover of an earlier failed attempt whose cleanup also failed.
        if tmp.exists() {
            fs::remove_dir_all(tmp).map_err(io_fail(
                SaveStage::Prepare,
                "remove stale",
                tmp,
                false,
            ))?;
        }
        fs::create_dir(tmp).map_err(io_fail(SaveStage::Prepare, "create directory", tmp, false))?;

        let t = Instant::now();
        let mut open_files: Vec<(File, PathBuf)> = Vec::with_capacity(payload.groups.len() + 1);
        let mut entries = Vec::with_capacity(payload.groups.len());
        for group in &payload.groups {
            let file_name = group_file_name(&group.name);
            let path = tmp.join(&file_name);
            let mut file = create_new(&path).map_err(io_fail(
                SaveStage::WriteFiles,
                "create",
                &path,
                false,
            ))?;
            let written = tensorfile::write_group(&mut io, &mut file, &path, group)
                .map_err(fail(SaveStage::WriteFiles, false))?;
            entries.push(FileEntry {
                group: group.name.clone(),
                file: file_name,
                size: written.size,
                blake3: written.blake3,
                n_tensors: written.n_tensors,
            });
            open_files.push((file, path));
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            step: payload.step,
            created_at_ms: now_ms(),
            dir: name.to_owned(),
            files: entries,
            config_hash: payload.config_hash.clone(),
            code_version: payload.code_version.clone(),
            previous_step: previous,
            meta: payload.meta.clone(),
        };
        let manifest_bytes =
            encode_manifest(&manifest).map_err(fail(SaveStage::WriteFiles, false))?;
        let manifest_path = tmp.join(MANIFEST_FILE);
        let mut file = create_new(&manifest_path).map_err(io_fail(
            SaveStage::WriteFiles,
            "create",
            &manifest_path,
            false,
        ))?;
        io.write_all(&mut file, &manifest_path, &manifest_bytes, None)
            .map_err(fail(SaveStage::WriteFiles, false))?;
        open_files.push((file, manifest_path));
        let write = t.elapsed();

        let t = Instant::now();
        for (file, path) in &open_files {
            io.check(FaultStage::FileSync, path, 0)
                .and_then(|()| file.sync_all())
                .map_err(io_fail(SaveStage::SyncFiles, "fsync", path, false))?;
        }
        drop(open_files);
        io.check(FaultStage::DirSync, tmp, 0)
            .and_then(|()| fsx::fsync_dir(tmp))
            .map_err(io_fail(SaveStage::SyncDir, "fsync directory", tmp, false))?;
        io.check(FaultStage::Rename, tmp, 0)
            .and_then(|()| fs::rename(tmp, final_dir))
            .map_err(io_fail(
                SaveStage::Rename,
                "rename to final name",
                tmp,
                false,
            ))?;
        io.check(FaultStage::DirSync, &self.ckpt_dir, 0)
            .and_then(|()| fsx::fsync_dir(&self.ckpt_dir))
            .map_err(io_fail(
                SaveStage::SyncDir,
                "fsync directory",
                &self.ckpt_dir,
                true,
            ))?;
        let fsync = t.elapsed();

        Ok(Staged {
            manifest,
            final_dir: final_dir.to_owned(),
            bytes: io.bytes_written,
            write,
            fsync,
        })
    }

    /// Phase 2: one catalog transaction (manifest + `latest`), then flush. If the flush fails,
    /// the transaction is undone and flushed again; if that fails too the store is poisoned.
    fn commit(&self, manifest: &Manifest) -> Result<()> {
        let step = manifest.step;
        let bytes = encode_manifest(manifest)?;
        let check = |stage| {
            let io = SaveIo {
                step,
                injector: self.injector.as_deref(),
                bytes_written: 0,
            };
            io.check(stage, &self.catalog.path, 0)
                .map_err(|e| Error::io("catalog commit", &self.catalog.path, e))
        };
        check(FaultStage::CatalogCommit)?;
        let undo = self.catalog.commit(step, &bytes)?;
        let flushed = check(FaultStage::CatalogFlush).and_then(|()| self.catalog.flush());
        if let Err(e) = flushed {
            if self
                .catalog
                .undo(&undo)
                .and_then(|()| self.catalog.flush())
                .is_err()
            {
                // Unknown what reached the disk: keep the directory (it may be referenced) and
                // refuse further saves until the store is reopened.
                self.poisoned.store(true, Ordering::SeqCst);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes what a failed save left and turns the failure into the returned error.
    fn abort_save(&self, step: u64, failed: Failed, tmp: &Path, final_dir: &Path) -> Error {
        let leftover = if failed.renamed { final_dir } else { tmp };
        let keep = self.poisoned.load(Ordering::SeqCst);
        let cleanup = if keep || !leftover.exists() {
            Ok(())
        } else {
            fs::remove_dir_all(leftover).and_then(|()| fsx::fsync_dir(&self.ckpt_dir))
        };
        let error = Error::Save {
            step,
            stage: failed.stage,
            cause: Box::new(failed.error),
        };
        let cleanup_note = match &cleanup {
            Ok(()) => String::new(),
            Err(e) => format!(
                "; removing {} also failed ({e}); it is removed at the next open",
                leftover.display()
            ),
        };
        self.event(
            Event::new(
                Level::Error,
                event_kind::SAVE_FAILED,
                format!("{error}{cleanup_note}"),
            )
            .step(step)
            .fields(json!({
                "stage": failed.stage,
                "error": error.to_string(),
                "disk_full": error.is_disk_full(),
                "leftover_removed": cleanup.is_ok(),
            })),
        );
        error
    }

    /// Phase 3: retention, after the commit is durable. Returns the deleted steps and, if a
    /// deletion failed, the error (the rest is retried at the next save or open).
    #[allow(clippy::type_complexity)]
    fn collect_garbage(
        &self,
        latest: u64,
    ) -> std::result::Result<(Vec<u64>, Option<Error>), (Vec<u64>, Error)> {
        let _files = self.files_lock.write().unwrap_or_else(|p| p.into_inner());
        let raws = self.catalog.raw_manifests().map_err(|e| (Vec::new(), e))?;
        let infos = self.infos(&raws, latest).map_err(|e| (Vec::new(), e))?;
        let reasons = keep_reasons(&infos, &self.retention);
        let mut delete: Vec<u64> = reasons
            .iter()
            .filter(|(_, r)| r.is_empty())
            .map(|(&s, _)| s)
            .collect();
        delete.extend(raws.iter().map(|r| r.step).filter(|&s| s > latest));
        let kept: BTreeSet<u64> = raws
            .iter()
            .map(|r| r.step)
            .filter(|s| !delete.contains(s))
            .collect();
        let stray_scores: Vec<sled::IVec> = self
            .catalog
            .score_keys()
            .map_err(|e| (Vec::new(), e))?
            .into_iter()
            .filter(|(s, _)| *s <= latest && !kept.contains(s) && !delete.contains(s))
            .map(|(_, k)| k)
            .collect();
        if delete.is_empty() && stray_scores.is_empty() {
            return Ok((Vec::new(), self.sweep_unreferenced(latest).err()));
        }
        // Forget first (durably), then delete: a crash in between leaves unreferenced
        // directories, which the next open removes.
        self.catalog
            .forget(&delete, &stray_scores)
            .and_then(|()| self.catalog.flush())
            .map_err(|e| (Vec::new(), e))?;
        if !delete.is_empty() {
            self.event(
                Event::new(
                    Level::Info,
                    event_kind::DELETED,
                    format!("retention deleted steps {delete:?}"),
                )
                .step(latest)
                .fields(json!({ "deleted": delete })),
            );
        }
        Ok((delete, self.sweep_unreferenced(latest).err()))
    }

    /// Deletes every step directory no manifest references (deleted, superseded or replaced
    /// checkpoints). Runs under the save lock, so no save is in flight.
    fn sweep_unreferenced(&self, step: u64) -> Result<()> {
        let referenced = self.referenced_dirs()?;
        let mut first_error = None;
        for (name, kind) in self.scan_dirs()? {
            if !matches!(kind, DirKind::Step(_)) || referenced.contains(&name) {
                continue;
            }
            let path = self.ckpt_dir.join(&name);
            let io = SaveIo {
                step,
                injector: self.injector.as_deref(),
                bytes_written: 0,
            };
            let res = io
                .check(FaultStage::Gc, &path, 0)
                .and_then(|()| fs::remove_dir_all(&path));
            if let Err(e) = res {
                first_error.get_or_insert(Error::io("delete old checkpoint", &path, e));
            }
        }
        fsx::fsync_dir(&self.ckpt_dir).map_err(|e| Error::io("fsync", &self.ckpt_dir, e))?;
        first_error.map_or(Ok(()), Err)
    }

    /// Retention inputs for the committed checkpoints with step `<= latest`.
    fn infos(
        &self,
        raws: &[crate::catalog::RawManifest],
        latest: u64,
    ) -> Result<Vec<CheckpointInfo>> {
        let metric = self.retention.keep_best.as_ref().map(|b| b.metric.as_str());
        raws.iter()
            .filter(|r| r.step <= latest)
            .map(|r| {
                let score = match metric {
                    Some(m) => self.catalog.scores(r.step)?.get(m).copied(),
                    None => None,
                };
                let parsed = serde_json::from_slice::<Manifest>(&r.bytes).ok();
                let bad = parsed.is_none() || self.catalog.bad(r.step)?.is_some();
                let bytes = parsed.map_or(0, |m| m.total_bytes());
                Ok(CheckpointInfo {
                    step: r.step,
                    score,
                    bad,
                    bytes,
                })
            })
            .collect()
    }

    // ---- load and verify -------------------------------------------------------------------

    /// The step `latest` points to.
    pub fn latest_step(&self) -> Result<Option<u64>> {
        self.catalog.latest()
    }

    /// Committed steps, ascending.
    pub fn steps(&self) -> Result<Vec<u64>> {
        Ok(self
            .catalog
            .raw_manifests()?
            .iter()
            .map(|r| r.step)
            .collect())
    }

    /// The manifest of a committed step.
    pub fn manifest(&self, step: u64) -> Result<Manifest> {
        let raw = self
            .catalog
            .raw_manifest(step)?
            .ok_or_else(|| Error::NotFound {
                step,
                dir: self.dir.clone(),
            })?;
        decode_manifest(&raw).map_err(|problem| Error::Invalid { step, problem })
    }

    /// Loads and verifies one checkpoint (sizes, BLAKE3 hashes, safetensors structure). A
    /// corrupt one is marked bad in the catalog (retention then keeps more valid ones).
    pub fn load(&self, step: u64) -> Result<LoadedCheckpoint> {
        let _files = self.files_lock.read().unwrap_or_else(|p| p.into_inner());
        let manifest = self.manifest(step)?;
        self.load_manifest(manifest)
    }

    /// Loads one group of one checkpoint, verifying only that file.
    pub fn load_group(&self, step: u64, group: &str) -> Result<TensorGroup> {
        let _files = self.files_lock.read().unwrap_or_else(|p| p.into_inner());
        let manifest = self.manifest(step)?;
        let entry = manifest.file(group).ok_or_else(|| {
            Error::InvalidPayload(format!(
                "checkpoint step {step} has no group {group:?} (groups: {})",
                manifest
                    .files
                    .iter()
                    .map(|f| f.group.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let path = self.ckpt_dir.join(&manifest.dir).join(&entry.file);
        read_group_file(&path, entry).map_err(|problem| self.invalid(step, problem))
    }

    /// Loads what `latest` points to, verified; `Ok(None)` for a fresh directory. No fallback:
    /// see [`Store::load_latest_valid`].
    pub fn load_latest(&self) -> Result<Option<LoadedCheckpoint>> {
        match self.catalog.latest()? {
            Some(step) => self.load(step).map(Some),
            None => Ok(None),
        }
    }

    /// Loads the newest checkpoint that verifies, walking back from `latest`. Each skipped
    /// checkpoint produces one `checkpoint.fallback` event naming the step, the file and the
    /// reason. `Ok(None)` for a fresh directory; an error listing every problem if checkpoints
    /// exist but none is valid.
    pub fn load_latest_valid(&self) -> Result<Option<LoadedCheckpoint>> {
        let _files = self.files_lock.read().unwrap_or_else(|p| p.into_inner());
        let raws = self.catalog.raw_manifests()?;
        if raws.is_empty() {
            return Ok(None);
        }
        let latest = self.catalog.latest()?.unwrap_or(u64::MAX);
        let candidates: Vec<u64> = raws
            .iter()
            .rev()
            .map(|r| r.step)
            .filter(|&s| s <= latest)
            .collect();
        let mut skipped: Vec<(u64, Problem)> = Vec::new();
        for (i, &step) in candidates.iter().enumerate() {
            let attempt = self.manifest(step).and_then(|m| self.load_manifest(m));
            match attempt {
                Ok(mut ckpt) => {
                    ckpt.skipped = skipped;
                    return Ok(Some(ckpt));
                }
                Err(Error::Invalid { problem, .. }) => {
                    let next = candidates.get(i + 1).copied();
                    let file = problem_file(&problem);
                    self.event(
                        Event::new(
                            Level::Warn,
                            event_kind::FALLBACK,
                            format!(
                                "checkpoint step {step} is invalid ({problem}); {}",
                                match next {
                                    Some(n) => format!("falling back to step {n}"),
                                    None => "no older checkpoint left".to_owned(),
                                }
                            ),
                        )
                        .step(step)
                        .fields(json!({
                            "step": step,
                            "file": file,
                            "problem": problem,
                            "next": next,
                        })),
                    );
                    skipped.push((step, problem));
                }
                Err(e) => return Err(e),
            }
        }
        let err = Error::NoValidCheckpoint {
            dir: self.dir.clone(),
            problems: skipped,
        };
        self.event(Event::new(
            Level::Error,
            event_kind::NONE_VALID,
            err.to_string(),
        ));
        Err(err)
    }

    fn load_manifest(&self, manifest: Manifest) -> Result<LoadedCheckpoint> {
        let t = Instant::now();
        let step = manifest.step;
        let dir = self.ckpt_dir.join(&manifest.dir);
        let mut groups = Vec::with_capacity(manifest.files.len());
        let mut bytes = 0;
        for entry in &manifest.files {
            let path = dir.join(&entry.file);
            groups.push(read_group_file(&path, entry).map_err(|p| self.invalid(step, p))?);
            bytes += entry.size;
        }
        Ok(LoadedCheckpoint {
            manifest,
            groups,
            skipped: Vec::new(),
            bytes,
            elapsed: t.elapsed(),
        })
    }

    /// Records corruption in the catalog (best effort) and builds the error.
    fn invalid(&self, step: u64, problem: Problem) -> Error {
        if problem.is_corruption() {
            // Failing to record the marker must not hide the problem itself.
            let _ = self.catalog.set_bad(step, Some(&problem));
        }
        Error::Invalid { step, problem }
    }

    /// Checks every file of one checkpoint without keeping the data; records the result in the
    /// catalog (marks it bad, or clears an old marker).
    pub fn verify(&self, step: u64) -> Result<VerifyReport> {
        let _files = self.files_lock.read().unwrap_or_else(|p| p.into_inner());
        let report = match self.manifest(step) {
            Ok(m) => self.verify_manifest(&m),
            Err(Error::Invalid { problem, .. }) => VerifyReport {
                step,
                problems: vec![problem],
                bytes: 0,
                elapsed: Duration::ZERO,
            },
            Err(e) => return Err(e),
        };
        let first_corruption = report.problems.iter().find(|p| p.is_corruption());
        if first_corruption.is_some() || report.ok() {
            self.catalog.set_bad(step, first_corruption)?;
        }
        Ok(report)
    }

    /// [`Store::verify`] for every committed checkpoint, ascending.
    pub fn verify_all(&self) -> Result<Vec<VerifyReport>> {
        self.steps()?.into_iter().map(|s| self.verify(s)).collect()
    }

    fn verify_manifest(&self, manifest: &Manifest) -> VerifyReport {
        let t = Instant::now();
        let dir = self.ckpt_dir.join(&manifest.dir);
        let mut problems = Vec::new();
        let mut bytes = 0;
        for entry in &manifest.files {
            let path = dir.join(&entry.file);
            let expect = Expect {
                group: &entry.group,
                size: entry.size,
                blake3: &entry.blake3,
            };
            match tensorfile::read_group(&path, &expect, false) {
                Ok(_) => bytes += entry.size,
                Err(p) => problems.push(p),
            }
        }
        VerifyReport {
            step: manifest.step,
            problems,
            bytes,
            elapsed: t.elapsed(),
        }
    }

    /// Every committed checkpoint with its size, scores, validity and keep reasons, ascending.
    pub fn list(&self) -> Result<Vec<CheckpointEntry>> {
        let raws = self.catalog.raw_manifests()?;
        let latest = self.catalog.latest()?;
        let reasons = match latest {
            Some(l) => keep_reasons(&self.infos(&raws, l)?, &self.retention),
            None => BTreeMap::new(),
        };
        raws.iter()
            .map(|raw| {
                let parsed = decode_manifest(&raw.bytes);
                let m = parsed.as_ref().ok();
                Ok(CheckpointEntry {
                    step: raw.step,
                    dir: m.map(|m| m.dir.clone()).unwrap_or_default(),
                    created_at_ms: m.map(|m| m.created_at_ms),
                    bytes: m.map_or(0, Manifest::total_bytes),
                    n_files: m.map_or(0, |m| m.files.len()),
                    config_hash: m.map(|m| m.config_hash.clone()).unwrap_or_default(),
                    code_version: m.map(|m| m.code_version.clone()).unwrap_or_default(),
                    is_latest: latest == Some(raw.step),
                    superseded: latest.is_some_and(|l| raw.step > l),
                    scores: self.catalog.scores(raw.step)?,
                    bad: self.catalog.bad(raw.step)?,
                    manifest_error: parsed.as_ref().err().map(ToString::to_string),
                    keep: reasons.get(&raw.step).cloned().unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Records a score used by `keep_best` retention (e.g. the evaluator's dense probe) for a
    /// step; scores of steps that never get a checkpoint are pruned by retention.
    pub fn set_score(&self, step: u64, metric: &str, value: f64) -> Result<()> {
        if metric.is_empty() {
            return Err(Error::InvalidPayload("score metric name is empty".into()));
        }
        self.catalog.set_score(step, metric, value)
    }

    /// Scores recorded for a step.
    pub fn scores(&self, step: u64) -> Result<BTreeMap<String, f64>> {
        self.catalog.scores(step)
    }

    // ---- events, probes, status, quarantine ---------------------------------------------------

    /// Appends an event (durable: flushed) and returns its sequence number.
    pub fn append_event(&self, event: &Event) -> Result<u64> {
        self.catalog.append_event(event)
    }

    /// Best-effort event from inside the store: a failing catalog must not mask the error the
    /// event describes.
    fn event(&self, event: Event) {
        let _ = self.catalog.append_event(&event);
    }

    /// Events with `seq > after`, oldest first, at most `limit` (follow the log with the last
    /// seq seen; 0 = from the start).
    pub fn events_since(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>> {
        self.catalog.events_since(after, limit)
    }

    /// The newest `n` events, oldest first.
    pub fn recent_events(&self, n: usize) -> Result<Vec<StoredEvent>> {
        self.catalog.recent_events(n)
    }

    /// Records a probe result for a step (durable).
    pub fn record_probe(&self, step: u64, name: &str, value: &serde_json::Value) -> Result<()> {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::InvalidPayload(format!(
                "invalid probe name {name:?}"
            )));
        }
        self.catalog.record_probe(step, name, value)
    }

    /// All results of one probe, ascending by step.
    pub fn probe_history(&self, name: &str) -> Result<Vec<ProbeRecord>> {
        self.catalog.probe_history(name)
    }

    /// The newest result of every probe, by name.
    pub fn latest_probes(&self) -> Result<Vec<ProbeRecord>> {
        self.catalog.latest_probes()
    }

    /// Stores a status snapshot (e.g. an actor's state). Not flushed: snapshots are frequent and
    /// the last few hundred milliseconds may be lost in a crash.
    pub fn put_status(&self, key: &str, value: &serde_json::Value) -> Result<()> {
        self.catalog.put_status(key, value)
    }

    /// Removes a status snapshot.
    pub fn remove_status(&self, key: &str) -> Result<()> {
        self.catalog.remove_status(key)
    }

    /// All status snapshots by key.
    pub fn status_all(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        self.catalog.status_all()
    }

    /// Quarantines a bad batch or file (durable).
    pub fn quarantine_add(&self, key: &str, value: &serde_json::Value) -> Result<()> {
        self.catalog.quarantine_add(key, value)
    }

    /// Whether a key is quarantined.
    pub fn quarantine_contains(&self, key: &str) -> Result<bool> {
        self.catalog.quarantine_contains(key)
    }

    /// All quarantined keys with their records.
    pub fn quarantine_list(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        self.catalog.quarantine_list()
    }

    /// Makes every catalog write so far durable (status snapshots included).
    pub fn flush(&self) -> Result<()> {
        self.catalog.flush()
    }

    #[cfg(test)]
    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(m)
        .map_err(|e| Error::InvalidPayload(format!("manifest does not encode: {e}")))
}

fn decode_manifest(bytes: &[u8]) -> std::result::Result<Manifest, Problem> {
    serde_json::from_slice(bytes).map_err(|e| Problem::ManifestUnparsable {
        error: e.to_string(),
    })
}

fn problem_file(p: &Problem) -> Option<&Path> {
    match p {
        Problem::ManifestUnparsable { .. } => None,
        Problem::MissingFile { file }
        | Problem::SizeMismatch { file, .. }
        | Problem::HashMismatch { file, .. }
        | Problem::Unparsable { file, .. }
        | Problem::Unreadable { file, .. } => Some(file),
    }
}

/// `read_group(.., load = true)` always returns the group; this guards the invariant without
/// a panic.
/// Reads the group file at `path` and checks it against its manifest entry (size, BLAKE3,
/// safetensors structure), without a store: also for readers beside a running daemon, which
/// holds the catalog (`dinod export`, `viz`, a distillation teacher from `state:DIR`). Float
/// tensors are read straight into vectors of their elements.
pub fn read_group_file(
    path: &Path,
    entry: &FileEntry,
) -> std::result::Result<TensorGroup, Problem> {
    let expect = Expect {
        group: &entry.group,
        size: entry.size,
        blake3: &entry.blake3,
    };
    tensorfile::read_group(path, &expect, true)?.ok_or_else(|| Problem::Unreadable {
        file: path.to_owned(),
        error: "internal error: a group read to load returned no data".into(),
    })
}

fn validate_payload(payload: &CheckpointPayload) -> Result<()> {
    if payload.groups.is_empty() {
        return Err(Error::InvalidPayload(format!(
            "step {}: no tensor groups",
            payload.step
        )));
    }
    let mut groups = HashSet::new();
    for group in &payload.groups {
        if !valid_group_name(&group.name) {
            return Err(Error::InvalidPayload(format!(
                "group name {:?}: use 1-100 characters from [A-Za-z0-9_-]",
                group.name
            )));
        }
        if !groups.insert(group.name.as_str()) {
            return Err(Error::InvalidPayload(format!(
                "group {:?} appears twice",
                group.name
            )));
        }
        let mut names = HashSet::new();
        for t in &group.tensors {
            if t.name.is_empty() || t.name == "__metadata__" {
                return Err(Error::InvalidPayload(format!(
                    "group {}: invalid tensor name {:?}",
                    group.name, t.name
                )));
            }
            if !names.insert(t.name.as_str()) {
                return Err(Error::InvalidPayload(format!(
                    "group {}: tensor {:?} appears twice",
                    group.name, t.name
                )));
            }
            t.validate()?;
        }
    }
    Ok(())
}
