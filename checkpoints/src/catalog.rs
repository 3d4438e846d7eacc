//! The sled catalog: small records only (manifests, pointers, events, probes, status snapshots,
//! quarantine). Tensors never go in here: sled 0.34 never reclaims large values (11x disk growth
//! after 20 checkpoints in our measurement). Keys that carry a step are big-endian `u64`, so
//! sled's byte order is step order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::error::{Error, Problem, Result};
use crate::fsx::now_ms;

/// Version of the catalog layout written by this build.
pub const CATALOG_SCHEMA: u32 = 1;

const KEY_LATEST: &[u8] = b"latest";
const KEY_SCHEMA: &[u8] = b"schema";
const PREFIX_BAD: &[u8] = b"bad/";

/// Severity of an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Normal operation (a checkpoint saved).
    Info,
    /// Something went wrong and was handled (a fallback, a restart).
    Warn,
    /// Something went wrong and was not handled.
    Error,
}

/// One entry of the append-only event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Severity.
    pub level: Level,
    /// Dotted kind, e.g. `checkpoint.saved`, `checkpoint.fallback`, `actor.restarted`.
    pub kind: String,
    /// The actor concerned, if any.
    pub actor: Option<String>,
    /// The training step concerned, if any.
    pub step: Option<u64>,
    /// One line for humans.
    pub message: String,
    /// Structured details.
    #[serde(default)]
    pub fields: serde_json::Value,
}

impl Event {
    /// An event stamped now, with no actor, step or fields.
    pub fn new(level: Level, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Event {
            ts_ms: now_ms(),
            level,
            kind: kind.into(),
            actor: None,
            step: None,
            message: message.into(),
            fields: serde_json::Value::Null,
        }
    }

    /// Sets the actor.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the step.
    pub fn step(mut self, step: u64) -> Self {
        self.step = Some(step);
        self
    }

    /// Sets the structured fields.
    pub fn fields(mut self, fields: serde_json::Value) -> Self {
        self.fields = fields;
        self
    }
}

/// An event with its sequence number (strictly increasing, never reused, survives restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Sequence number; pass the last one seen to `events_since` to follow the log.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// One recorded probe result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Probe name, e.g. `knn_top1`.
    pub name: String,
    /// Step of the evaluated weights.
    pub step: u64,
    /// The result, as the evaluator chose to encode it.
    pub value: serde_json::Value,
}

/// Kinds of the events this crate writes.
pub mod event_kind {
    /// A checkpoint was committed.
    pub const SAVED: &str = "checkpoint.saved";
    /// A save failed; nothing was committed.
    pub const SAVE_FAILED: &str = "checkpoint.save_failed";
    /// Loading skipped a checkpoint that failed verification.
    pub const FALLBACK: &str = "checkpoint.fallback";
    /// No checkpoint verified.
    pub const NONE_VALID: &str = "checkpoint.none_valid";
    /// Retention deleted checkpoints.
    pub const DELETED: &str = "checkpoint.deleted";
    /// Retention could not delete a directory (it is retried later).
    pub const GC_FAILED: &str = "checkpoint.gc_failed";
    /// A leftover temporary or uncommitted directory was removed at open.
    pub const CLEANED: &str = "checkpoint.cleaned";
    /// The catalog was empty and was rebuilt from the `manifest.json` files.
    pub const CATALOG_REBUILT: &str = "catalog.rebuilt";
}

pub(crate) fn be(step: u64) -> [u8; 8] {
    step.to_be_bytes()
}

pub(crate) fn from_be(bytes: &[u8]) -> Option<u64> {
    bytes.get(..8)?.try_into().ok().map(u64::from_be_bytes)
}

fn bad_key(step: u64) -> Vec<u8> {
    [PREFIX_BAD, &be(step)].concat()
}

fn probe_key(name: &str, step: u64) -> Vec<u8> {
    [name.as_bytes(), &[0u8], &be(step)].concat()
}

fn score_key(step: u64, metric: &str) -> Vec<u8> {
    [&be(step)[..], metric.as_bytes()].concat()
}

/// A manifest as stored: raw bytes, parsed lazily so that one unparsable record does not hide
/// the others.
pub(crate) struct RawManifest {
    pub(crate) step: u64,
    pub(crate) bytes: sled::IVec,
}

/// Old values of the keys a commit touches, to undo it if the flush fails.
pub(crate) struct Undo {
    step: u64,
    manifest: Option<sled::IVec>,
    latest: Option<sled::IVec>,
    bad: Option<sled::IVec>,
}

pub(crate) struct Catalog {
    pub(crate) path: PathBuf,
    db: sled::Db,
    manifests: sled::Tree,
    meta: sled::Tree,
    scores: sled::Tree,
    events: sled::Tree,
    probes: sled::Tree,
    status: sled::Tree,
    quarantine: sled::Tree,
    max_events: u64,
    event_lock: Mutex<()>,
}

impl Catalog {
    pub(crate) fn open(path: &Path, cache_bytes: u64, max_events: u64) -> Result<Catalog> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::LowSpace);
        // sled 0.34 panics on some corruptions instead of returning an error; turn that into a
        // typed error naming the catalog.
        let try_open = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())).map_err(
                |panic| {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    Error::catalog(path, "open (sled panicked)", msg)
                },
            )
        };
        // A catalog closed by this process a moment ago can still hold sled's file lock
        // while its background flusher winds down (seen as a reopen right after a drop
        // failing with WouldBlock): wait for it briefly. Another process cannot be the
        // holder: the store's own lock file is taken before the catalog is opened.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match try_open()? {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < give_up =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r.map_err(|e| Error::catalog(path, "open", e))?,
            }
        };
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| Error::catalog(path, "open tree", e))
        };
        let catalog = Catalog {
            path: path.to_owned(),
            manifests: tree("manifests")?,
            meta: tree("meta")?,
            scores: tree("scores")?,
            events: tree("events")?,
            probes: tree("probes")?,
            status: tree("status")?,
            quarantine: tree("quarantine")?,
            db,
            max_events,
            event_lock: Mutex::new(()),
        };
        catalog.check_schema()?;
        Ok(catalog)
    }

    fn err(&self, op: &'static str) -> impl Fn(sled::Error) -> Error + '_ {
        move |e| Error::catalog(&self.path, op, e)
    }

    fn check_schema(&self) -> Result<()> {
        match self.meta.get(KEY_SCHEMA).map_err(self.err("read schema"))? {
            Some(v) => {
                let found = v.as_ref().try_into().map(u32::from_be_bytes).map_err(|_| {
                    Error::catalog(&self.path, "read schema", "malformed schema record")
                })?;
                if found > CATALOG_SCHEMA {
                    return Err(Error::Schema {
                        path: self.path.clone(),
                        found,
                        supported: CATALOG_SCHEMA,
                    });
                }
                Ok(())
            }
            None => {
                self.meta
                    .insert(KEY_SCHEMA, &CATALOG_SCHEMA.to_be_bytes())
                    .map_err(self.err("write schema"))?;
                self.flush()
            }
        }
    }

    /// Makes every write so far durable (one fsync of sled's log).
    pub(crate) fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(self.err("flush"))
    }

    // ---- checkpoints -------------------------------------------------------------------

    pub(crate) fn latest(&self) -> Result<Option<u64>> {
        Ok(self
            .meta
            .get(KEY_LATEST)
            .map_err(self.err("read latest"))?
            .and_then(|v| from_be(&v)))
    }

    pub(crate) fn raw_manifest(&self, step: u64) -> Result<Option<sled::IVec>> {
        self.manifests
            .get(be(step))
            .map_err(self.err("read manifest"))
    }

    /// All manifests, ascending by step.
    pub(crate) fn raw_manifests(&self) -> Result<Vec<RawManifest>> {
        self.manifests
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(self.err("scan manifests"))?;
                let step = from_be(&k)
                    .ok_or_else(|| Error::catalog(&self.path, "scan manifests", "malformed key"))?;
                Ok(RawManifest { step, bytes: v })
            })
            .collect()
    }

    pub(crate) fn has_manifests(&self) -> Result<bool> {
        Ok(!self.manifests.is_empty())
    }

    /// Records the manifest and moves `latest` in one transaction (not yet flushed).
    pub(crate) fn commit(&self, step: u64, manifest: &[u8]) -> Result<Undo> {
        let res = (&self.manifests, &self.meta).transaction(|(manifests, meta)| {
            let undo = Undo {
                step,
                manifest: manifests.insert(&be(step), manifest)?,
                latest: meta.insert(KEY_LATEST, &be(step))?,
                bad: meta.remove(bad_key(step))?,
            };
            Ok::<_, ConflictableTransactionError<()>>(undo)
        });
        res.map_err(|e| self.tx_err("commit manifest", e))
    }

    /// Restores what [`Catalog::commit`] overwrote.
    pub(crate) fn undo(&self, undo: &Undo) -> Result<()> {
        let res = (&self.manifests, &self.meta).transaction(|(manifests, meta)| {
            match &undo.manifest {
                Some(old) => manifests.insert(&be(undo.step), old.clone())?,
                None => manifests.remove(&be(undo.step))?,
            };
            match &undo.latest {
                Some(old) => meta.insert(KEY_LATEST, old.clone())?,
                None => meta.remove(KEY_LATEST)?,
            };
            if let Some(old) = &undo.bad {
                meta.insert(bad_key(undo.step), old.clone())?;
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        res.map_err(|e| self.tx_err("undo commit", e))
    }

    fn tx_err(&self, op: &'static str, e: TransactionError<()>) -> Error {
        match e {
            TransactionError::Storage(e) => Error::catalog(&self.path, op, e),
            TransactionError::Abort(()) => Error::catalog(&self.path, op, "transaction aborted"),
        }
    }

    /// Removes manifests, bad markers and scores of `steps`, plus stray scores in `scores_only`,
    /// in one transaction (not yet flushed).
    pub(crate) fn forget(&self, steps: &[u64], stray_score_keys: &[sled::IVec]) -> Result<()> {
        let mut score_keys: Vec<sled::IVec> = stray_score_keys.to_vec();
        for &step in steps {
            for kv in self.scores.scan_prefix(be(step)) {
                score_keys.push(kv.map_err(self.err("scan scores"))?.0);
            }
        }
        let res =
            (&self.manifests, &self.meta, &self.scores).transaction(|(manifests, meta, scores)| {
                for &step in steps {
                    manifests.remove(&be(step))?;
                    meta.remove(bad_key(step))?;
                }
                for k in &score_keys {
                    scores.remove(k.clone())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            });
        res.map_err(|e| self.tx_err("forget checkpoints", e))
    }

    /// Inserts manifests found on disk into an empty catalog (rebuild) and sets `latest`.
    pub(crate) fn import(&self, manifests: &[(u64, Vec<u8>)], latest: u64) -> Result<()> {
        let res = (&self.manifests, &self.meta).transaction(|(m, meta)| {
            for (step, bytes) in manifests {
                m.insert(&be(*step), bytes.as_slice())?;
            }
            meta.insert(KEY_LATEST, &be(latest))?;
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        res.map_err(|e| self.tx_err("import manifests", e))?;
        self.flush()
    }

    pub(crate) fn bad(&self, step: u64) -> Result<Option<Problem>> {
        Ok(self
            .meta
            .get(bad_key(step))
            .map_err(self.err("read bad marker"))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records (or clears, with `None`) that verification found `step` corrupt; durable.
    pub(crate) fn set_bad(&self, step: u64, problem: Option<&Problem>) -> Result<()> {
        let key = bad_key(step);
        let changed = match problem {
            Some(p) => {
                let bytes = serde_json::to_vec(p)
                    .map_err(|e| Error::catalog(&self.path, "encode bad marker", e))?;
                self.meta
                    .insert(key, bytes)
                    .map_err(self.err("write bad marker"))?;
                true
            }
            None => self
                .meta
                .remove(key)
                .map_err(self.err("clear bad marker"))?
                .is_some(),
        };
        if changed {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn set_score(&self, step: u64, metric: &str, value: f64) -> Result<()> {
        self.scores
            .insert(score_key(step, metric), &value.to_le_bytes())
            .map_err(self.err("write score"))?;
        self.flush()
    }

    pub(crate) fn scores(&self, step: u64) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for kv in self.scores.scan_prefix(be(step)) {
            let (k, v) = kv.map_err(self.err("scan scores"))?;
            let metric = String::from_utf8_lossy(&k[8..]).into_owned();
            if let Ok(bytes) = <[u8; 8]>::try_from(v.as_ref()) {
                out.insert(metric, f64::from_le_bytes(bytes));
            }
        }
        Ok(out)
    }

    /// Every score key, with its step.
    pub(crate) fn score_keys(&self) -> Result<Vec<(u64, sled::IVec)>> {
        self.scores
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(self.err("scan scores"))?;
                Ok((from_be(&k).unwrap_or(0), k))
            })
            .collect()
    }

    // ---- events --------------------------------------------------------------------------

    pub(crate) fn append_event(&self, event: &Event) -> Result<u64> {
        let bytes =
            serde_json::to_vec(event).map_err(|e| Error::catalog(&self.path, "encode event", e))?;
        let _guard = self.event_lock.lock().unwrap_or_else(|p| p.into_inner());
        let last = self.events.last().map_err(self.err("read events"))?;
        let seq = last.and_then(|(k, _)| from_be(&k)).map_or(1, |s| s + 1);
        self.events
            .insert(be(seq), bytes)
            .map_err(self.err("append event"))?;
        // Trim the oldest so that at most `max_events` remain. Keys are contiguous, so the count
        // is `seq - first + 1`.
        if let Some((first, _)) = self.events.first().map_err(self.err("read events"))? {
            let first = from_be(&first).unwrap_or(seq);
            let count = seq - first + 1;
            if count > self.max_events {
                let mut batch = sled::Batch::default();
                for s in first..=(seq - self.max_events) {
                    batch.remove(&be(s));
                }
                self.events
                    .apply_batch(batch)
                    .map_err(self.err("trim events"))?;
            }
        }
        self.flush()?;
        Ok(seq)
    }

    fn decode_event(&self, k: &[u8], v: &[u8]) -> Result<StoredEvent> {
        let seq =
            from_be(k).ok_or_else(|| Error::catalog(&self.path, "read events", "malformed key"))?;
        let event =
            serde_json::from_slice(v).map_err(|e| Error::catalog(&self.path, "decode event", e))?;
        Ok(StoredEvent { seq, event })
    }

    pub(crate) fn events_since(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>> {
        let Some(start) = seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.events
            .range(be(start)..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(self.err("read events"))?;
                self.decode_event(&k, &v)
            })
            .collect()
    }

    pub(crate) fn recent_events(&self, n: usize) -> Result<Vec<StoredEvent>> {
        let mut out = self
            .events
            .iter()
            .rev()
            .take(n)
            .map(|kv| {
                let (k, v) = kv.map_err(self.err("read events"))?;
                self.decode_event(&k, &v)
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    // ---- probes, status, quarantine ------------------------------------------------------

    pub(crate) fn record_probe(
        &self,
        step: u64,
        name: &str,
        value: &serde_json::Value,
    ) -> Result<()> {
        let bytes =
            serde_json::to_vec(value).map_err(|e| Error::catalog(&self.path, "encode probe", e))?;
        self.probes
            .insert(probe_key(name, step), bytes)
            .map_err(self.err("write probe"))?;
        self.flush()
    }

    pub(crate) fn probe_history(&self, name: &str) -> Result<Vec<ProbeRecord>> {
        let prefix = [name.as_bytes(), &[0u8]].concat();
        self.probes
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(self.err("read probes"))?;
                self.decode_probe(&k, &v)
            })
            .collect()
    }

    fn decode_probe(&self, k: &[u8], v: &[u8]) -> Result<ProbeRecord> {
        let malformed = || Error::catalog(&self.path, "read probes", "malformed key");
        let split = k.len().checked_sub(9).ok_or_else(malformed)?;
        let name = String::from_utf8_lossy(&k[..split]).into_owned();
        let step = from_be(&k[split + 1..]).ok_or_else(malformed)?;
        let value =
            serde_json::from_slice(v).map_err(|e| Error::catalog(&self.path, "decode probe", e))?;
        Ok(ProbeRecord { name, step, value })
    }

    /// The newest record of every probe name.
    pub(crate) fn latest_probes(&self) -> Result<Vec<ProbeRecord>> {
        let mut out: Vec<ProbeRecord> = Vec::new();
        for kv in self.probes.iter() {
            let (k, v) = kv.map_err(self.err("read probes"))?;
            let rec = self.decode_probe(&k, &v)?;
            match out.last_mut() {
                Some(last) if last.name == rec.name => *last = rec,
                _ => out.push(rec),
            }
        }
        Ok(out)
    }

    fn put_json(
        &self,
        tree: &sled::Tree,
        key: &str,
        value: &serde_json::Value,
        flush: bool,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::catalog(&self.path, "encode record", e))?;
        tree.insert(key.as_bytes(), bytes)
            .map_err(self.err("write record"))?;
        if flush {
            self.flush()?;
        }
        Ok(())
    }

    fn all_json(&self, tree: &sled::Tree) -> Result<BTreeMap<String, serde_json::Value>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv.map_err(self.err("read records"))?;
                let value = serde_json::from_slice(&v)
                    .map_err(|e| Error::catalog(&self.path, "decode record", e))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), value))
            })
            .collect()
    }

    pub(crate) fn put_status(&self, key: &str, value: &serde_json::Value) -> Result<()> {
        // Snapshots are rewritten often and losing the last one is harmless: no fsync here;
        // sled's background flush (every 500 ms) persists them.
        self.put_json(&self.status, key, value, false)
    }

    pub(crate) fn remove_status(&self, key: &str) -> Result<()> {
        self.status
            .remove(key.as_bytes())
            .map(drop)
            .map_err(self.err("remove status"))
    }

    pub(crate) fn status_all(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        self.all_json(&self.status)
    }

    pub(crate) fn quarantine_add(&self, key: &str, value: &serde_json::Value) -> Result<()> {
        self.put_json(&self.quarantine, key, value, true)
    }

    pub(crate) fn quarantine_contains(&self, key: &str) -> Result<bool> {
        self.quarantine
            .contains_key(key.as_bytes())
            .map_err(self.err("read quarantine"))
    }

    pub(crate) fn quarantine_list(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        self.all_json(&self.quarantine)
    }

    /// Direct access for tests that corrupt records on purpose.
    #[cfg(test)]
    pub(crate) fn manifests_tree(&self) -> &sled::Tree {
        &self.manifests
    }
}
