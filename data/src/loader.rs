//! Batch assembly on worker threads, deterministic whatever the number of threads.
//!
//! The sample stream is the concatenation of epochs; epoch `e` visits the source in a keyed
//! permutation of (seed, e). Batch `k` takes the next `B` stream positions, its crop sizes are drawn
//! from (seed, k) and its masks from (seed, k); each sample's crops from (seed, epoch, position, crop).
//! A [`Cursor`] (epoch, position, batches done) therefore fixes every later batch: resuming from the
//! cursor of a batch yields exactly the batches an uninterrupted run would have produced.
//!
//! Threads: one dispatcher hands out one job per sample (bounded by `prefetch` batches not yet
//! taken), `n_workers` workers decode and augment straight into the rows of the batch buffers
//! (crop-major: crop `c` of sample `b` is row `c * B + b`), and the worker finishing a batch draws
//! its masks and queues it. `next_batch` returns batches in order.
//!
//! Bad input: when position `p` maps to an unreadable sample `i`, the sample `i + 1` (mod len) is
//! tried, then `i + 2`, ... (crops still keyed by `p`), so the substitution depends only on the data.
//! Each unreadable file is reported once, in the batch where it was first met, and counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::augment::{Augmenter, CropSink, SampleKey};
use crate::config::{CropConfig, CropSizes, DataConfig, MaskConfig, Order};
use crate::error::{BadInput, DataError};
use crate::mask;
use crate::rng::{domain, Permutation};
use crate::source::Source;

/// Position in the sample stream; stored in the training checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch of the next sample.
    pub epoch: u64,
    /// Position of the next sample within its epoch's order.
    pub index_in_epoch: u64,
    /// Batches produced before this point (keys the masks and crop sizes of the next batch).
    pub batches_done: u64,
    /// Samples in the source the position counts in (`None` in cursors saved before it was
    /// recorded): a source that changed since makes the position meaningless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_len: Option<u64>,
}

impl Cursor {
    /// The cursor after one more batch of `batch_size` samples from a source of `len` samples.
    pub fn after_batch(self, batch_size: u64, len: Option<u64>) -> Cursor {
        let mut c = self;
        c.index_in_epoch += batch_size;
        if let Some(n) = len.filter(|&n| n > 0) {
            c.epoch += c.index_in_epoch / n;
            c.index_in_epoch %= n;
        }
        c.batches_done += 1;
        c.source_len = len;
        c
    }

    /// This cursor for a source of `len` samples. Unchanged when the source is the one it
    /// counts in. When the source has changed size since (files added or deleted, shards
    /// added), the position in the epoch's order means nothing any more (and may lie past
    /// the end): the current epoch ends there and the next begins, at its first sample.
    pub fn for_source(self, len: Option<u64>) -> (Cursor, Option<SourceChange>) {
        let resized = matches!((self.source_len, len), (Some(a), Some(b)) if a != b);
        let past_end = len.is_some_and(|n| self.index_in_epoch >= n);
        if !resized && !past_end {
            return (
                Cursor {
                    source_len: len.or(self.source_len),
                    ..self
                },
                None,
            );
        }
        let next = Cursor {
            epoch: self.epoch + u64::from(self.index_in_epoch > 0),
            index_in_epoch: 0,
            batches_done: self.batches_done,
            source_len: len,
        };
        let change = SourceChange {
            before: self.source_len,
            now: len,
            epoch: self.epoch,
            position: self.index_in_epoch,
            next_epoch: next.epoch,
        };
        (next, Some(change))
    }
}

/// A source whose size differs from the one a saved cursor counts in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceChange {
    /// Samples when the cursor was saved (`None`: not recorded).
    pub before: Option<u64>,
    /// Samples now.
    pub now: Option<u64>,
    /// The epoch the cursor was in.
    pub epoch: u64,
    /// Its position in that epoch.
    pub position: u64,
    /// The epoch the loader starts, at its first sample.
    pub next_epoch: u64,
}

impl std::fmt::Display for SourceChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |v: Option<u64>| v.map_or("an unknown number of".to_string(), |v| v.to_string());
        write!(
            f,
            "the data source has {} samples, {} when position {} of epoch {} was saved; ",
            n(self.now),
            n(self.before),
            self.position,
            self.epoch
        )?;
        if self.next_epoch == self.epoch {
            write!(f, "epoch {} starts again from its first sample", self.epoch)
        } else {
            write!(
                f,
                "epoch {} ends there and epoch {} begins",
                self.epoch, self.next_epoch
            )
        }
    }
}

/// One batch in host memory, laid out like the golden fixtures (crop-major).
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Index of this batch in the run (`cursor.batches_done` before it).
    pub batch_index: u64,
    /// Images in the batch (B; with [`LoaderOptions::part`], those of the part).
    pub batch_size: usize,
    /// Local crops per image.
    pub n_local: usize,
    /// Global crop side G.
    pub global_size: u32,
    /// Local crop side L.
    pub local_size: u32,
    /// Gram-teacher crop side S, when on.
    pub gram_size: Option<u32>,
    /// Patch size of the mask grid.
    pub patch_size: u32,
    /// `[2B, 3, G, G]` normalised, row `c * B + b`.
    pub global_crops: Vec<f32>,
    /// `[n_local * B, 3, L, L]`, row `c * B + b`.
    pub local_crops: Vec<f32>,
    /// `[2B, 3, S, S]`, the Gram view of each global crop (same rows).
    pub gram_crops: Option<Vec<f32>>,
    /// `[2B, P]` iBOT masks, 1 = masked, P = (G / patch)^2.
    pub masks: Vec<u8>,
    /// Image-level labels.
    pub labels: Vec<Option<u32>>,
    /// Sample ids.
    pub sample_ids: Vec<String>,
    /// Source index of each sample (after any substitution for bad input).
    pub source_indices: Vec<u64>,
    /// Unreadable files first met while building this batch (log them, quarantine them).
    pub bad_inputs: Vec<BadInput>,
    /// Samples of this batch replaced by a neighbour because their file was unreadable.
    pub n_substituted: usize,
    /// The cursor after this batch (store it with the step that consumes the batch).
    pub cursor_after: Cursor,
}

impl HostBatch {
    /// Patches per global crop.
    pub fn n_patches(&self) -> usize {
        ((self.global_size / self.patch_size) as usize).pow(2)
    }
    /// Flat ascending indices of masked patches in `[2B * P]`.
    pub fn mask_indices(&self) -> Vec<u32> {
        mask::mask_indices(&self.masks)
    }
    /// `1 / (masked patches of its crop)` per masked patch.
    pub fn masks_weight(&self) -> Vec<f32> {
        mask::masks_weight(&self.masks, self.n_patches())
    }
    /// Number of masked patches.
    pub fn n_masked(&self) -> usize {
        mask::n_masked(&self.masks)
    }
}

/// Everything a [`Loader`] needs besides the source and the start cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    /// Images per batch.
    pub batch_size: usize,
    /// Run seed.
    pub seed: u64,
    /// Crops and augmentation.
    pub crops: CropConfig,
    /// iBOT masks.
    pub masks: MaskConfig,
    /// Worker threads (the batches do not depend on it).
    pub n_workers: usize,
    /// Batches prepared ahead of `next_batch`.
    pub prefetch: usize,
    /// Sample order within an epoch.
    pub order: Order,
    /// Build only this member's part of every batch (data parallelism with each member
    /// loading its own images); `None`: the whole batch.
    pub part: Option<Part>,
}

/// Member `rank` of a data-parallel group of `world`: its part of a global batch of B
/// images is images `rank * B / world ..` (B / world of them), every crop and mask row
/// exactly as in the whole batch, which [`Loader`] builds without reading the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// The member.
    pub rank: usize,
    /// Members in the group (it must divide the batch size).
    pub world: usize,
}

impl Part {
    /// The images of a global batch of `batch_size` that this part holds.
    pub fn range(self, batch_size: usize) -> std::ops::Range<usize> {
        let m = batch_size / self.world.max(1);
        self.rank * m..(self.rank + 1) * m
    }
}

impl LoaderOptions {
    /// Options from the `[data]` config section.
    pub fn from_config(cfg: &DataConfig, batch_size: usize, seed: u64) -> Self {
        let n_workers = cfg
            .n_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        LoaderOptions {
            batch_size,
            seed,
            crops: cfg.crops.clone(),
            masks: cfg.masks.clone(),
            n_workers,
            prefetch: cfg.prefetch,
            order: cfg.order,
            part: None,
        }
    }

    fn validate(&self) -> Result<(), DataError> {
        let mut errs = Vec::new();
        for res in [self.crops.validate(), self.masks.validate(&self.crops)] {
            if let Err(DataError::Config(e)) = res {
                errs.extend(e);
            }
        }
        if self.batch_size == 0 {
            errs.push("batch_size must be at least 1".into());
        }
        if self.n_workers == 0 {
            errs.push("n_workers must be at least 1".into());
        }
        if self.prefetch == 0 {
            errs.push("prefetch must be at least 1".into());
        }
        if let Some(p) = self.part {
            if p.world == 0 || p.rank >= p.world || !self.batch_size.is_multiple_of(p.world) {
                errs.push(format!(
                    "member {} of {} cannot have its part of a batch of {} images (the group's size must divide the batch size)",
                    p.rank, p.world, self.batch_size
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(DataError::Config(errs))
        }
    }
}

/// Rows of one batch tensor written by several workers at once; each row has exactly one writer.
struct RawRows {
    ptr: *mut f32,
    row_len: usize,
    n_rows: usize,
}

// SAFETY: the pointer targets a buffer owned by the same `BatchJob`, which outlives every writer; each
// row is written by the single job of its slot, and the buffer is read only after all jobs finished
// (the `remaining` counter's AcqRel decrement orders those writes before the read).
unsafe impl Send for RawRows {}
unsafe impl Sync for RawRows {}

impl RawRows {
    fn new(buf: &mut [f32], n_rows: usize) -> Self {
        RawRows {
            ptr: buf.as_mut_ptr(),
            row_len: buf.len() / n_rows.max(1),
            n_rows,
        }
    }
    /// Start of row `r`.
    fn row_ptr(&self, r: usize) -> *mut f32 {
        assert!(r < self.n_rows, "row {r} of {}", self.n_rows);
        // SAFETY: r < n_rows, so the offset stays inside the buffer.
        unsafe { self.ptr.add(r * self.row_len) }
    }
}

struct Buffers {
    global: Vec<f32>,
    local: Vec<f32>,
    gram: Option<Vec<f32>>,
}

#[derive(Default)]
struct SlotResult {
    label: Option<u32>,
    id: String,
    source_index: u64,
    bad: Vec<BadInput>,
    error: Option<DataError>,
}

struct BatchJob {
    index: u64,
    sizes: CropSizes,
    /// Images built: the batch's, or the part's.
    batch_size: usize,
    /// The whole batch's images, and the first of them this job builds.
    global_batch: usize,
    first: usize,
    cursor_after: Cursor,
    global: RawRows,
    local: RawRows,
    gram: Option<RawRows>,
    buffers: Mutex<Option<Buffers>>,
    slots: Mutex<Vec<SlotResult>>,
    remaining: AtomicUsize,
}

struct SampleJob {
    batch: Arc<BatchJob>,
    slot: usize,
    key: SampleKey,
    source_index: u64,
}

struct Shared {
    source: Arc<dyn Source>,
    opts: LoaderOptions,
    known_bad: RwLock<HashMap<u64, BadInput>>,
    stop: AtomicBool,
}

/// Writes one sample's crops into its batch rows.
struct RowSink<'a> {
    job: &'a BatchJob,
    slot: usize,
}

impl CropSink for RowSink<'_> {
    fn global_pair(&mut self, c: usize) -> (&mut [f32], Option<&mut [f32]>) {
        let r = c * self.job.batch_size + self.slot;
        let g = &self.job.global;
        // SAFETY: row r belongs to this slot only (see `RawRows`), and `&mut self` keeps the two
        // returned slices, which live in different buffers, from being requested twice at once.
        let global = unsafe { std::slice::from_raw_parts_mut(g.row_ptr(r), g.row_len) };
        let gram = self
            .job
            .gram
            .as_ref()
            .map(|s| unsafe { std::slice::from_raw_parts_mut(s.row_ptr(r), s.row_len) });
        (global, gram)
    }
    fn local(&mut self, c: usize) -> &mut [f32] {
        let r = c * self.job.batch_size + self.slot;
        let l = &self.job.local;
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(l.row_ptr(r), l.row_len) }
    }
}

type BatchResult = (u64, Result<HostBatch, DataError>);

/// The multi-crop data loader.
pub struct Loader {
    shared: Arc<Shared>,
    tokens: Option<SyncSender<()>>,
    recycled: Sender<Buffers>,
    done_rx: Receiver<BatchResult>,
    pending: BTreeMap<u64, Result<HostBatch, DataError>>,
    next_index: u64,
    cursor: Cursor,
    reported: HashSet<PathBuf>,
    bad_log: Vec<BadInput>,
    n_substituted: u64,
    threads: Vec<JoinHandle<()>>,
    source_change: Option<SourceChange>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("source", &self.shared.source.describe())
            .field("opts", &self.shared.opts)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// Starts the dispatcher and worker threads; batches begin at `start`.
    pub fn new(
        source: Arc<dyn Source>,
        opts: LoaderOptions,
        start: Cursor,
    ) -> Result<Loader, DataError> {
        opts.validate()?;
        if source.is_empty() {
            return Err(DataError::NoReadableImages {
                path: source.location(),
                detail: "the source is empty".into(),
            });
        }
        let (start, source_change) = start.for_source(source.len());
        let shared = Arc::new(Shared {
            source,
            opts,
            known_bad: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let prefetch = shared.opts.prefetch;
        let (token_tx, token_rx) = mpsc::sync_channel::<()>(prefetch);
        for _ in 0..prefetch {
            token_tx.send(()).expect("receiver alive");
        }
        let (job_tx, job_rx) =
            mpsc::sync_channel::<SampleJob>(shared.opts.batch_size.max(4 * shared.opts.n_workers));
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<BatchResult>();
        let (recycled_tx, recycled_rx) = mpsc::channel::<Buffers>();
        let mut threads = Vec::new();
        {
            let shared = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("data-dispatch".into())
                    .spawn(move || dispatch(&shared, start, &token_rx, &job_tx, &recycled_rx))
                    .map_err(|e| DataError::Loader(format!("cannot start dispatcher: {e}")))?,
            );
        }
        for w in 0..shared.opts.n_workers {
            let shared = Arc::clone(&shared);
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("data-worker-{w}"))
                    .spawn(move || work(&shared, &job_rx, &done_tx))
                    .map_err(|e| DataError::Loader(format!("cannot start worker: {e}")))?,
            );
        }
        Ok(Loader {
            shared,
            tokens: Some(token_tx),
            recycled: recycled_tx,
            done_rx,
            pending: BTreeMap::new(),
            next_index: start.batches_done,
            cursor: start,
            reported: HashSet::new(),
            bad_log: Vec::new(),
            n_substituted: 0,
            threads,
            source_change,
        })
    }

    /// How the start cursor was moved because the source changed size since it was saved.
    pub fn source_change(&self) -> Option<&SourceChange> {
        self.source_change.as_ref()
    }

    /// The next batch, in order. An error (a source with no readable image, a panic) is returned
    /// once per failed batch; later calls go on with the next batch.
    pub fn next_batch(&mut self) -> Result<HostBatch, DataError> {
        let result = loop {
            if let Some(r) = self.pending.remove(&self.next_index) {
                break r;
            }
            match self.done_rx.recv() {
                Ok((i, r)) => {
                    self.pending.insert(i, r);
                }
                Err(_) => return Err(DataError::Loader("worker threads exited".into())),
            }
        };
        self.next_index += 1;
        if let Some(tokens) = &self.tokens {
            let _ = tokens.send(());
        }
        let mut batch = result?;
        let mut fresh = Vec::new();
        for b in batch.bad_inputs.drain(..) {
            if self.reported.insert(b.path.clone()) {
                fresh.push(b);
            }
        }
        self.bad_log.extend(fresh.iter().cloned());
        self.n_substituted += batch.n_substituted as u64;
        batch.bad_inputs = fresh;
        self.cursor = batch.cursor_after;
        Ok(batch)
    }

    /// Hands a consumed batch's buffers back for reuse by a later batch of the same sizes (optional;
    /// it saves the page faults of fresh allocations). Every element of a reused buffer is overwritten.
    pub fn recycle(&self, batch: HostBatch) {
        let _ = self.recycled.send(Buffers {
            global: batch.global_crops,
            local: batch.local_crops,
            gram: batch.gram_crops,
        });
    }

    /// The cursor after the last batch returned (the start cursor before the first).
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Every unreadable file met so far, each once, in the order met.
    pub fn bad_inputs(&self) -> &[BadInput] {
        &self.bad_log
    }

    /// Number of distinct unreadable files met so far.
    pub fn n_bad(&self) -> usize {
        self.bad_log.len()
    }

    /// Samples replaced by a neighbour because their file was unreadable.
    pub fn n_substituted(&self) -> u64 {
        self.n_substituted
    }

    /// The options it was started with.
    pub fn options(&self) -> &LoaderOptions {
        &self.shared.opts
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.shared.source
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.tokens = None; // wakes the dispatcher, which closes the job queue, which ends the workers
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn dispatch(
    shared: &Shared,
    start: Cursor,
    tokens: &Receiver<()>,
    jobs: &SyncSender<SampleJob>,
    recycled: &Receiver<Buffers>,
) {
    let opts = &shared.opts;
    let len = shared.source.len();
    let b = opts.batch_size;
    // the images built: the whole batch, or this member's part of it
    let built = opts.part.map_or(0..b, |p| p.range(b));
    let mb = built.len();
    let mut cursor = start;
    let mut perm: Option<(u64, Permutation)> = None;
    let mut pool: Vec<Buffers> = Vec::new();
    while tokens.recv().is_ok() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let sizes = opts.crops.sizes_for_batch(opts.seed, cursor.batches_done);
        let row = |side: u32| 3 * (side as usize).pow(2);
        let lens = (
            2 * mb * row(sizes.global),
            opts.crops.n_local * mb * row(sizes.local),
            sizes.gram.map(|s| 2 * mb * row(s)),
        );
        pool.extend(recycled.try_iter());
        pool.truncate(opts.prefetch + 2);
        // A recycled buffer needs no zeroing: every row is written in full by its sample's job.
        let reused = pool
            .iter()
            .position(|p| (p.global.len(), p.local.len(), p.gram.as_ref().map(Vec::len)) == lens);
        let mut buffers = match reused {
            Some(i) => pool.swap_remove(i),
            None => Buffers {
                global: vec![0.0; lens.0],
                local: vec![0.0; lens.1],
                gram: lens.2.map(|n| vec![0.0; n]),
            },
        };
        let job = Arc::new(BatchJob {
            index: cursor.batches_done,
            sizes,
            batch_size: mb,
            global_batch: b,
            first: built.start,
            cursor_after: cursor.after_batch(b as u64, len),
            global: RawRows::new(&mut buffers.global, 2 * mb),
            local: RawRows::new(&mut buffers.local, opts.crops.n_local * mb),
            gram: buffers.gram.as_mut().map(|g| RawRows::new(g, 2 * mb)),
            buffers: Mutex::new(Some(buffers)),
            slots: Mutex::new((0..mb).map(|_| SlotResult::default()).collect()),
            remaining: AtomicUsize::new(mb),
        });
        let (mut epoch, mut position) = (cursor.epoch, cursor.index_in_epoch);
        for slot in 0..b {
            let source_index = match (len, opts.order) {
                (Some(n), Order::Shuffled) => {
                    if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        perm = Some((
                            epoch,
                            Permutation::new(n, &[opts.seed, domain::PERMUTATION, epoch]),
                        ));
                    }
                    perm.as_ref().map_or(position, |(_, p)| p.apply(position))
                }
                _ => position,
            };
            let key = SampleKey {
                seed: opts.seed,
                epoch,
                position,
            };
            // (every position is walked, so the part's samples are the whole batch's)
            if built.contains(&slot)
                && jobs
                    .send(SampleJob {
                        batch: Arc::clone(&job),
                        slot: slot - built.start,
                        key,
                        source_index,
                    })
                    .is_err()
            {
                return;
            }
            position += 1;
            if len.is_some_and(|n| position >= n) {
                position = 0;
                epoch += 1;
            }
        }
        cursor = job.cursor_after;
    }
}

fn work(shared: &Shared, jobs: &Mutex<Receiver<SampleJob>>, done: &Sender<BatchResult>) {
    let mut augmenter = Augmenter::new(shared.opts.crops.clone());
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            continue;
        }
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| process(shared, &mut augmenter, &job)))
                .unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    augmenter = Augmenter::new(shared.opts.crops.clone());
                    SlotResult {
                        error: Some(DataError::Loader(format!(
                            "worker panicked on source index {}: {msg}",
                            job.source_index
                        ))),
                        ..SlotResult::default()
                    }
                });
        if let Ok(mut slots) = job.batch.slots.lock() {
            slots[job.slot] = result;
        }
        if job.batch.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A panic here must still deliver a result, or `next_batch` would wait forever.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| finish(shared, &job.batch)))
                .unwrap_or_else(|_| {
                    Err(DataError::Loader(format!(
                        "panic while finishing batch {}",
                        job.batch.index
                    )))
                });
            let _ = done.send((job.batch.index, result));
        }
    }
}

/// Reads the sample (substituting neighbours for unreadable ones) and writes its crops.
fn process(shared: &Shared, augmenter: &mut Augmenter, job: &SampleJob) -> SlotResult {
    let source = &*shared.source;
    let len = source.len();
    let max_tries = len.unwrap_or(10_000);
    let mut index = job.source_index;
    let mut bad = Vec::new();
    let mut tries = 0u64;
    let sample = loop {
        let known = shared
            .known_bad
            .read()
            .ok()
            .and_then(|m| m.get(&index).cloned());
        match known {
            Some(b) => bad.push(b),
            None => match source.get(index) {
                Ok(sample) => break sample,
                Err(DataError::BadInput(b)) => {
                    if let Ok(mut m) = shared.known_bad.write() {
                        m.insert(index, b.clone());
                    }
                    bad.push(b);
                }
                Err(e) => {
                    return SlotResult {
                        error: Some(e),
                        ..SlotResult::default()
                    }
                }
            },
        }
        tries += 1;
        if tries >= max_tries {
            let detail = match len {
                Some(n) => format!("all {n} samples are unreadable, e.g. {}", bad[0]),
                None => format!(
                    "{max_tries} consecutive samples are unreadable, e.g. {}",
                    bad[0]
                ),
            };
            return SlotResult {
                error: Some(DataError::NoReadableImages {
                    path: source.location(),
                    detail,
                }),
                ..SlotResult::default()
            };
        }
        index = match len {
            Some(n) => (index + 1) % n,
            None => index.wrapping_add(1),
        };
    };
    augmenter.run(
        &sample.image,
        job.batch.sizes,
        job.key,
        &mut RowSink {
            job: &job.batch,
            slot: job.slot,
        },
        None,
    );
    SlotResult {
        label: sample.label,
        id: sample.id,
        source_index: index,
        bad,
        error: None,
    }
}

/// Called by the worker that completed the last slot of a batch.
fn finish(shared: &Shared, job: &BatchJob) -> Result<HostBatch, DataError> {
    let opts = &shared.opts;
    let slots = std::mem::take(
        &mut *job
            .slots
            .lock()
            .map_err(|_| DataError::Loader("slot lock poisoned".into()))?,
    );
    let buffers = job
        .buffers
        .lock()
        .map_err(|_| DataError::Loader("buffer lock poisoned".into()))?
        .take()
        .ok_or_else(|| DataError::Loader("batch finished twice".into()))?;
    let mut labels = Vec::with_capacity(slots.len());
    let mut sample_ids = Vec::with_capacity(slots.len());
    let mut source_indices = Vec::with_capacity(slots.len());
    let mut bad_inputs = Vec::new();
    let mut n_substituted = 0;
    for slot in slots {
        if let Some(e) = slot.error {
            return Err(e);
        }
        n_substituted += usize::from(!slot.bad.is_empty());
        labels.push(slot.label);
        sample_ids.push(slot.id);
        source_indices.push(slot.source_index);
        bad_inputs.extend(slot.bad);
    }
    let grid = (job.sizes.global / opts.masks.patch_size) as usize;
    // the masks are drawn for the whole batch; a part keeps its rows of them
    let all = mask::generate_masks(
        &opts.masks,
        2 * job.global_batch,
        grid,
        opts.seed,
        job.index,
    );
    let masks = if job.batch_size == job.global_batch {
        all
    } else {
        let p = grid * grid;
        let mut masks = Vec::with_capacity(2 * job.batch_size * p);
        for c in 0..2 {
            let start = (c * job.global_batch + job.first) * p;
            masks.extend_from_slice(&all[start..start + job.batch_size * p]);
        }
        masks
    };
    Ok(HostBatch {
        batch_index: job.index,
        batch_size: job.batch_size,
        n_local: opts.crops.n_local,
        global_size: job.sizes.global,
        local_size: job.sizes.local,
        gram_size: job.sizes.gram,
        patch_size: opts.masks.patch_size,
        global_crops: buffers.global,
        local_crops: buffers.local,
        gram_crops: buffers.gram,
        masks,
        labels,
        sample_ids,
        source_indices,
        bad_inputs,
        n_substituted,
        cursor_after: job.cursor_after,
    })
}
