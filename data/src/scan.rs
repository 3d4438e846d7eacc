//! `dinod data scan`: read every sample of a source once and report what is there (images, classes,
//! sizes) and every unreadable file with the reason, before a run depends on it.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::error::{BadInput, DataError};
use crate::source::{OpenOptions, Source, SourceSpec};

/// Options of a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanOptions {
    /// Read at most this many samples, spread evenly over the source from its first sample
    /// to its last (so a quick check reaches every shard and class of a sorted source);
    /// `None` reads all. An unbounded source reads from index 0 (1000 without a limit).
    pub max_images: Option<u64>,
    /// Decoding threads (the report does not depend on it).
    pub n_workers: usize,
    /// How to open the source.
    pub open: OpenOptions,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            max_images: None,
            n_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            open: OpenOptions::default(),
        }
    }
}

/// Images per class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassCount {
    /// Class name.
    pub name: String,
    /// Readable images of that class.
    pub count: u64,
}

/// Images per range of the shorter side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SizeBucket {
    /// Range, e.g. `256-511`.
    pub label: String,
    /// Readable images in it.
    pub count: u64,
}

const BUCKETS: [(u32, &str); 8] = [
    (32, "<32"),
    (64, "32-63"),
    (128, "64-127"),
    (256, "128-255"),
    (512, "256-511"),
    (1024, "512-1023"),
    (2048, "1024-2047"),
    (u32::MAX, ">=2048"),
];

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScanReport {
    /// The source, described.
    pub description: String,
    /// Its folder or file.
    pub location: PathBuf,
    /// Samples the source lists (`None`: unbounded).
    pub listed: Option<u64>,
    /// Samples read.
    pub scanned: u64,
    /// Whether the samples read were spread over a larger source (a `max_images` below its
    /// length) rather than all of it.
    pub spread: bool,
    /// Samples that decoded.
    pub readable: u64,
    /// Images per class (empty when unlabelled).
    pub classes: Vec<ClassCount>,
    /// Smallest width and height seen (independently).
    pub min_size: Option<(u32, u32)>,
    /// Largest width and height seen (independently).
    pub max_size: Option<(u32, u32)>,
    /// Shorter-side histogram.
    pub size_histogram: Vec<SizeBucket>,
    /// Whether samples carry label maps.
    pub has_label_maps: bool,
    /// Every unreadable or unsupported file with its reason.
    pub bad: Vec<BadInput>,
}

impl ScanReport {
    /// No bad file and at least one readable image.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.readable > 0
    }
}

impl fmt::Display for ScanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source: {}", self.description)?;
        let listed = self
            .listed
            .map_or("unbounded".to_string(), |n| n.to_string());
        let spread = if self.spread {
            ", spread evenly over the source"
        } else {
            ""
        };
        writeln!(
            f,
            "images: {} readable of {} scanned ({} listed{spread})",
            self.readable, self.scanned, listed
        )?;
        if self.readable == 0 {
            writeln!(f, "no readable image in {}", self.location.display())?;
        }
        if let (Some(min), Some(max)) = (self.min_size, self.max_size) {
            writeln!(
                f,
                "sizes: width {}..{}, height {}..{}",
                min.0, max.0, min.1, max.1
            )?;
            let hist: Vec<String> = self
                .size_histogram
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| format!("{}: {}", b.label, b.count))
                .collect();
            writeln!(f, "shorter side: {}", hist.join(", "))?;
        }
        if self.classes.is_empty() {
            writeln!(f, "classes: none (unlabelled)")?;
        } else {
            let cls: Vec<String> = self
                .classes
                .iter()
                .map(|c| format!("{} {}", c.name, c.count))
                .collect();
            writeln!(f, "classes: {} ({})", self.classes.len(), cls.join(", "))?;
        }
        if self.has_label_maps {
            writeln!(f, "label maps: yes")?;
        }
        writeln!(f, "bad files: {}", self.bad.len())?;
        for b in &self.bad {
            writeln!(f, "  {b}")?;
        }
        Ok(())
    }
}

/// Samples a scan reads from a generated source when no limit is given.
const GENERATED_SCAN_DEFAULT: u64 = 1000;

/// How far a running scan is, for a caller that reports progress from another thread.
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Samples the scan will read (set once the source is open).
    pub total: AtomicU64,
    /// Samples read so far.
    pub done: AtomicU64,
    /// Of those, unreadable.
    pub bad: AtomicU64,
}

/// Opens and scans a source. A synthetic source is generated, not read, so without `max_images`
/// only its first 1000 scenes are checked.
pub fn scan(spec: &SourceSpec, opts: &ScanOptions) -> Result<ScanReport, DataError> {
    scan_with_progress(spec, opts, &ScanProgress::default())
}

/// [`scan`], counting into `progress` as it goes.
pub fn scan_with_progress(
    spec: &SourceSpec,
    opts: &ScanOptions,
    progress: &ScanProgress,
) -> Result<ScanReport, DataError> {
    let source = spec.open_with(&opts.open)?;
    let mut opts = opts.clone();
    if matches!(spec, SourceSpec::Synthetic { .. }) && opts.max_images.is_none() {
        opts.max_images = Some(GENERATED_SCAN_DEFAULT);
    }
    scan_source_with_progress(&*source, &opts, progress)
}

/// Scans an open source.
pub fn scan_source(source: &dyn Source, opts: &ScanOptions) -> Result<ScanReport, DataError> {
    scan_source_with_progress(source, opts, &ScanProgress::default())
}

/// The `k`-th of `n` samples a scan reads from a source of `len` (`None`: unbounded):
/// spread evenly when `n < len`, from the first sample to the last (distinct, since the
/// step is at least 1).
fn scan_index(k: u64, n: u64, len: Option<u64>) -> u64 {
    match len {
        Some(len) if n < len && n > 1 => {
            (u128::from(k) * u128::from(len - 1) / u128::from(n - 1)) as u64
        }
        Some(len) if n < len => 0,
        _ => k,
    }
}

/// [`scan_source`], counting into `progress` as it goes.
pub fn scan_source_with_progress(
    source: &dyn Source,
    opts: &ScanOptions,
    progress: &ScanProgress,
) -> Result<ScanReport, DataError> {
    let len = source.len();
    let n = match (len, opts.max_images) {
        (Some(len), Some(max)) => len.min(max),
        (Some(len), None) => len,
        (None, max) => max.unwrap_or(GENERATED_SCAN_DEFAULT),
    };
    progress.total.store(n, Ordering::Relaxed);
    let n_workers = opts.n_workers.max(1) as u64;
    type Item = (u64, Result<(u32, u32, Option<u32>), BadInput>);
    let parts: Vec<Result<Vec<Item>, DataError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n_workers)
            .map(|w| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut k = w;
                    while k < n {
                        let i = scan_index(k, n, len);
                        match source.get(i) {
                            Ok(s) => {
                                out.push((i, Ok((s.image.width(), s.image.height(), s.label))))
                            }
                            Err(DataError::BadInput(b)) => {
                                progress.bad.fetch_add(1, Ordering::Relaxed);
                                out.push((i, Err(b)))
                            }
                            Err(e) => return Err(e),
                        }
                        progress.done.fetch_add(1, Ordering::Relaxed);
                        k += n_workers;
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(DataError::Loader("scan thread panicked".into())))
            })
            .collect()
    });
    let mut items = Vec::with_capacity(n as usize);
    for p in parts {
        items.extend(p?);
    }
    items.sort_by_key(|(i, _)| *i);
    let names = source.class_names();
    let mut class_counts = vec![0u64; names.len()];
    let mut hist = vec![0u64; BUCKETS.len()];
    let mut min: Option<(u32, u32)> = None;
    let mut max: Option<(u32, u32)> = None;
    let mut readable = 0;
    let mut bad = Vec::new();
    for (_, item) in items {
        match item {
            Ok((w, h, label)) => {
                readable += 1;
                min = Some(min.map_or((w, h), |(a, b)| (a.min(w), b.min(h))));
                max = Some(max.map_or((w, h), |(a, b)| (a.max(w), b.max(h))));
                let short = w.min(h);
                let bucket = BUCKETS
                    .iter()
                    .position(|(limit, _)| short < *limit)
                    .unwrap_or(BUCKETS.len() - 1);
                hist[bucket] += 1;
                if let Some(c) = label.and_then(|l| class_counts.get_mut(l as usize)) {
                    *c += 1;
                }
            }
            Err(b) => bad.push(b),
        }
    }
    bad.extend(source.rejected().iter().cloned());
    Ok(ScanReport {
        description: source.describe(),
        location: source.location(),
        listed: source.len(),
        scanned: n,
        spread: len.is_some_and(|len| n < len),
        readable,
        classes: names
            .iter()
            .zip(class_counts)
            .map(|(name, count)| ClassCount {
                name: name.clone(),
                count,
            })
            .collect(),
        min_size: min,
        max_size: max,
        size_histogram: BUCKETS
            .iter()
            .zip(hist)
            .map(|((_, label), count)| SizeBucket {
                label: label.to_string(),
                count,
            })
            .collect(),
        has_label_maps: source.has_label_maps(),
        bad,
    })
}

#[cfg(test)]
mod tests {
    use super::scan_index;

    #[test]
    fn a_spread_scan_reads_distinct_samples_from_the_first_to_the_last() {
        for (n, len) in [(2, 3), (3, 11), (7, 8), (10, 1_281_167), (999, 1000)] {
            let idx: Vec<u64> = (0..n).map(|k| scan_index(k, n, Some(len))).collect();
            assert_eq!((idx[0], idx[n as usize - 1]), (0, len - 1), "{n} of {len}");
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "{n} of {len}: {idx:?}");
        }
        assert_eq!(scan_index(0, 1, Some(5)), 0);
        // all of a source, and an unbounded one, read in order
        assert_eq!(scan_index(4, 5, Some(5)), 4);
        assert_eq!(scan_index(4, 10, None), 4);
    }
}
