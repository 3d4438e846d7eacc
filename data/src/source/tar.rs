//! Tar shards in the WebDataset layout: the usual way large image sets are stored and shipped
//! (ImageNet-21k, LAION, DataComp), and a folder packed with `tar` reads the same way.
//!
//! A source is one `.tar` file, a folder of them (its `*.tar` files, sorted by name), or a
//! brace range `shard-{000000..000146}.tar` (every shard in it must exist). Shards are
//! indexed once, at open, by reading their headers only (one small read per member, shards on
//! several threads), and each `get` reads one member's bytes at its offset: random access, so
//! the loader's deterministic cursor works as it does for a folder.
//!
//! Samples are WebDataset's: consecutive members that share a key (the member path up to the
//! first `.` of its file name; a leading `./` dropped) form one sample. Its image is the
//! member whose extension is a JPEG/PNG/WebP one (`jpg` preferred over a compound one such as
//! `seg.png`). Labels come from a `cls` (or `cls.txt`) member holding an integer, when every
//! sample has one; otherwise from ImageFolder-style first-level folders inside the archive,
//! as for a folder source; otherwise the source is unlabelled.
//!
//! Damage is reported, not fatal: a header whose checksum does not match, or a member that
//! runs past the end of its file (a truncated copy), ends that shard's index there. The
//! members before it are used, the shard is listed in [`Source::rejected`] with the byte
//! offset, and `dinod data scan` exits 1. A member that does not decode is a [`BadInput`]
//! at `get`, as a bad file in a folder is. Formats read: POSIX ustar (name prefix), GNU
//! (long names), pax (`path` and `size` records). A hard link reads as the member it names
//! (tar stores a file's second name so); symbolic links, folders and other entry types are
//! skipped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::decode::decode_rgb;
use crate::error::{BadInput, BadReason, DataError};
use crate::source::folder::{image_folder_labels, IMAGE_EXTENSIONS, UNSUPPORTED_EXTENSIONS};
use crate::source::{Sample, Source};

const BLOCK: u64 = 512;
/// Threads walking shards at once. A walk waits on one small read after another, so it
/// is bound by the disk's (or the network's) latency, not by the cores: a cold walk of
/// ImageNet-sized shards took 46 s on 4 threads, 25 s on 16 and 20 s on 64 here.
const INDEX_THREADS: usize = 32;

/// Tar shards read as one source.
#[derive(Debug)]
pub struct TarSource {
    /// What was given (file, folder or brace pattern), for messages.
    given: PathBuf,
    shards: Vec<PathBuf>,
    samples: Vec<Member>,
    labels: Option<Vec<u32>>,
    classes: Vec<String>,
    label_origin: &'static str,
    rejected: Vec<BadInput>,
    pixel_limit: u64,
    from_cache: usize,
    n_unread_images: usize,
    open: OpenShards,
}

/// Shard files stay open once read from (up to a bound, [`open_shard_bound`], the oldest
/// opened closed first): a sample is then one `pread`, with no
/// `open` (a metadata round trip on a network file system, which is what shards are
/// for). Also, a shard replaced while the run reads it is read as it was indexed, from the
/// file still open, rather than at the old offsets of the new file.
#[derive(Debug)]
struct OpenShards {
    files: std::sync::Mutex<OpenFiles>,
    max: usize,
}

/// Open files by shard, and the order they were opened in (the oldest is closed first).
type OpenFiles = (
    std::collections::HashMap<u32, std::sync::Arc<File>>,
    std::collections::VecDeque<u32>,
);

/// How many shard files a source keeps open when the process may hold `nofile`
/// descriptors (its soft `RLIMIT_NOFILE`): a quarter of them, the rest left to everything
/// else (sockets, the checkpoint store, the other sources), at least 16 and at most 4096.
/// At the usual soft limit of 1024 that is 256; `dinod` raises its soft limit to the hard
/// one at start, so the common layouts (ImageNet's 1 282 shards of 1 000 samples, or 147
/// of 8 715) stay open whole. With more shards than the bound, a sample from a closed one
/// opens it (and closes the oldest opened).
pub fn open_shard_bound(nofile: u64) -> usize {
    (nofile / 4).clamp(16, 4096) as usize
}

/// The process's soft limit on open files (1024 when it cannot be read).
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur
    } else {
        1024
    }
}

impl OpenShards {
    fn new(max: usize) -> Self {
        Self {
            files: Default::default(),
            max: max.max(1),
        }
    }

    fn get(&self, shard: u32, path: &Path) -> std::io::Result<std::sync::Arc<File>> {
        let lock = || self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = lock().0.get(&shard) {
            return Ok(f.clone());
        }
        // opened without the lock: another worker may read a cached shard meanwhile
        let f = std::sync::Arc::new(File::open(path)?);
        let mut g = lock();
        let (files, order) = &mut *g;
        if let Some(raced) = files.get(&shard) {
            return Ok(raced.clone());
        }
        if files.len() >= self.max {
            if let Some(oldest) = order.pop_front() {
                files.remove(&oldest);
            }
        }
        files.insert(shard, f.clone());
        order.push_back(shard);
        Ok(f)
    }

    fn count(&self) -> usize {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }
}

/// An image member: where its bytes are.
#[derive(Debug, Clone)]
struct Member {
    shard: u32,
    offset: u64,
    len: u64,
    /// Its path inside the archive.
    name: Box<str>,
}

/// One member as the header walk sees it.
#[derive(Debug)]
struct Entry {
    name: String,
    offset: u64,
    len: u64,
    /// The content of a small member (`cls` labels), when it is one.
    small: Option<Vec<u8>>,
}

/// What indexing one shard finds.
#[derive(Debug, Default)]
struct ShardIndex {
    entries: Vec<Entry>,
    /// Why the walk stopped early.
    damage: Option<String>,
}

impl TarSource {
    /// Opens `spec`: a `.tar` file, a folder of them, or a brace range of shard files.
    /// With `index_cache`, each shard's index is kept there and read back by later opens
    /// while the shard is unchanged (its size, times and inode), instead of walking its
    /// headers again (see [`crate::default_index_cache`]).
    pub fn open_with(
        spec: &Path,
        pixel_limit: u64,
        index_cache: Option<&Path>,
    ) -> Result<Self, DataError> {
        Self::open_observed(spec, pixel_limit, index_cache, None)
    }

    /// [`TarSource::open_with`], counting the shards indexed into `progress` as it goes
    /// (a first open of ImageNet-sized shards walks for 20 s on a local disk, minutes on a
    /// network file system: whoever waits can say how far it is).
    pub fn open_observed(
        spec: &Path,
        pixel_limit: u64,
        index_cache: Option<&Path>,
        progress: Option<&super::OpenProgress>,
    ) -> Result<Self, DataError> {
        let shards = shard_paths(spec)?;
        if shards.len() > u32::MAX as usize {
            return Err(DataError::Format {
                path: spec.to_path_buf(),
                reason: format!("{} shards is more than this reader indexes", shards.len()),
            });
        }
        let (indexes, from_cache) = index_all(&shards, index_cache, progress)?;
        let mut samples = Vec::new();
        let mut cls: Vec<Option<Result<u32, String>>> = Vec::new();
        let mut rejected = Vec::new();
        let mut n_other = 0usize;
        // image members that are not their sample's image (a `seg.png` field, or a file
        // `a.v2.jpg` beside `a.jpg`: the same key)
        let mut n_unread_images = 0usize;
        for (s, (shard, index)) in shards.iter().zip(indexes).enumerate() {
            for group in group_by_key(&index.entries) {
                let mut image: Option<&Entry> = None;
                let mut label = None;
                for e in group {
                    let ext = extension(&e.name).to_ascii_lowercase();
                    let last = ext.rsplit('.').next().unwrap_or("");
                    if IMAGE_EXTENSIONS.contains(&last) {
                        // an exact image field beats a compound one (`jpg` over `seg.png`)
                        let exact = IMAGE_EXTENSIONS.contains(&ext.as_str());
                        let have_exact = image.is_some_and(|i| {
                            IMAGE_EXTENSIONS
                                .contains(&extension(&i.name).to_ascii_lowercase().as_str())
                        });
                        if image.is_none() || (exact && !have_exact) {
                            image = Some(e);
                        }
                        n_unread_images += 1;
                    } else if UNSUPPORTED_EXTENSIONS.contains(&last) {
                        rejected.push(BadInput {
                            path: shard.join(&e.name),
                            index: None,
                            reason: BadReason::Unsupported(format!(".{last} member")),
                        });
                    } else if ext == "cls" || ext == "cls.txt" {
                        label = Some(parse_cls(e));
                    } else {
                        n_other += 1;
                    }
                }
                if let Some(img) = image {
                    n_unread_images -= 1;
                    samples.push(Member {
                        shard: s as u32,
                        offset: img.offset,
                        len: img.len,
                        name: img.name.as_str().into(),
                    });
                    cls.push(label);
                }
            }
            if let Some(why) = index.damage {
                rejected.push(BadInput {
                    path: shard.clone(),
                    index: None,
                    reason: BadReason::Corrupt(why),
                });
            }
        }
        if samples.is_empty() {
            return Err(DataError::NoReadableImages {
                path: spec.to_path_buf(),
                detail: format!(
                    "{} shard(s) hold no .jpg/.jpeg/.png/.webp member; {} damaged or unsupported{}, {} other member(s)",
                    shards.len(),
                    rejected.len(),
                    rejected
                        .first()
                        .map(|b| format!(" (the first: {b})"))
                        .unwrap_or_default(),
                    n_other
                ),
            });
        }
        let (labels, classes, label_origin) = labels_of(&samples, &cls, &shards, &mut rejected);
        Ok(TarSource {
            given: spec.to_path_buf(),
            shards,
            samples,
            labels,
            classes,
            label_origin,
            rejected,
            pixel_limit,
            from_cache,
            n_unread_images,
            open: OpenShards::new(open_shard_bound(nofile_limit())),
        })
    }

    /// Keeps at most `n` shard files open (by default [`open_shard_bound`] of the process's
    /// limit when the source was opened), for a process whose descriptors are needed
    /// elsewhere.
    pub fn with_max_open_files(mut self, n: usize) -> Self {
        self.open = OpenShards::new(n);
        self
    }

    /// The most shard files this source keeps open at once.
    pub fn max_open_files(&self) -> usize {
        self.open.max
    }

    /// How many shard files are open now (read from since the open, up to a bound).
    pub fn open_files(&self) -> usize {
        self.open.count()
    }

    /// How many shards' indexes were read from the index cache at open.
    pub fn indexes_from_cache(&self) -> usize {
        self.from_cache
    }

    /// The shard files, in index order.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }
}

/// Labels from `cls` members when every sample has a valid one, else from first-level
/// folders inside the archives, else none. A `cls` member that is not an integer is
/// reported (and the source falls back).
fn labels_of(
    samples: &[Member],
    cls: &[Option<Result<u32, String>>],
    shards: &[PathBuf],
    rejected: &mut Vec<BadInput>,
) -> (Option<Vec<u32>>, Vec<String>, &'static str) {
    for (m, c) in samples.iter().zip(cls) {
        if let Some(Err(why)) = c {
            rejected.push(BadInput {
                path: shards[m.shard as usize].join(&*m.name),
                index: None,
                reason: BadReason::Corrupt(why.clone()),
            });
        }
    }
    let from_cls: Option<Vec<u32>> = cls
        .iter()
        .map(|c| c.as_ref().and_then(|r| r.as_ref().ok().copied()))
        .collect();
    if let Some(labels) = from_cls {
        let n = labels.iter().max().map_or(0, |m| *m as usize + 1);
        let classes = (0..n).map(|k| k.to_string()).collect();
        return (Some(labels), classes, "cls members");
    }
    let rel: Vec<PathBuf> = samples.iter().map(|m| PathBuf::from(&*m.name)).collect();
    match image_folder_labels(&rel) {
        (Some(l), c) => (Some(l), c, "folders in the archive"),
        (None, _) => (None, Vec::new(), ""),
    }
}

fn parse_cls(e: &Entry) -> Result<u32, String> {
    let bytes = e.small.as_deref().unwrap_or_default();
    let text = std::str::from_utf8(bytes).unwrap_or("").trim();
    match text.parse::<u32>() {
        Ok(k) if k < MAX_CLASSES => Ok(k),
        Ok(k) => Err(format!(
            "class member {} holds class {k}, more than the {MAX_CLASSES} classes a source may have",
            e.name
        )),
        Err(_) => Err(format!(
            "class member {} holds {:?}, not a class index",
            e.name,
            text.chars().take(40).collect::<String>()
        )),
    }
}

/// Class indexes at or above this are refused: a class list is allocated up to the
/// largest index, and no labelled image set has nearly so many (ImageNet-21k: 21 841).
const MAX_CLASSES: u32 = 1 << 20;

/// The extension WebDataset gives a member: everything after the first `.` of its file name.
fn extension(name: &str) -> &str {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.split_once('.').map_or("", |(_, ext)| ext)
}

/// The sample key of a member: its path without the extension.
fn key(name: &str) -> &str {
    let ext = extension(name);
    if ext.is_empty() {
        name
    } else {
        &name[..name.len() - ext.len() - 1]
    }
}

/// Runs of consecutive members with the same key.
fn group_by_key(entries: &[Entry]) -> impl Iterator<Item = &[Entry]> {
    entries.chunk_by(|a, b| key(&a.name) == key(&b.name))
}

/// The shard files a spec names.
fn shard_paths(spec: &Path) -> Result<Vec<PathBuf>, DataError> {
    let text = spec.to_string_lossy();
    if let Some(paths) = expand_braces(&text).map_err(|reason| DataError::Format {
        path: spec.to_path_buf(),
        reason,
    })? {
        for p in &paths {
            std::fs::metadata(p).map_err(|e| DataError::io(p, e))?;
        }
        return Ok(paths);
    }
    let meta = std::fs::metadata(spec).map_err(|e| DataError::io(spec, e))?;
    if !meta.is_dir() {
        return Ok(vec![spec.to_path_buf()]);
    }
    let files: Vec<PathBuf> = std::fs::read_dir(spec)
        .map_err(|e| DataError::io(spec, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DataError::io(spec, e))?;
    let n_compressed = files
        .iter()
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            [".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"]
                .iter()
                .any(|x| name.to_ascii_lowercase().ends_with(x))
        })
        .count();
    let mut shards: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            !name.starts_with('.') && name.to_ascii_lowercase().ends_with(".tar") && p.is_file()
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(DataError::NoReadableImages {
            path: spec.to_path_buf(),
            detail: if n_compressed > 0 {
                format!(
                    "no .tar file in the folder, but {n_compressed} compressed archive(s): \
                     tar sources read uncompressed shards only (decompress them first)"
                )
            } else {
                "no .tar file in the folder".into()
            },
        });
    }
    Ok(shards)
}

/// `a-{000..012}.tar` → `a-000.tar` .. `a-012.tar` (zero-padded to the first bound's width);
/// `None` without a brace.
fn expand_braces(text: &str) -> Result<Option<Vec<PathBuf>>, String> {
    let Some(open) = text.find('{') else {
        return Ok(None);
    };
    let Some(close) = text[open..].find('}').map(|c| open + c) else {
        return Err("a `{` without its `}`".into());
    };
    let inner = &text[open + 1..close];
    let Some((lo, hi)) = inner.split_once("..") else {
        return Err(format!(
            "{{{inner}}} is not a range such as {{000000..000146}}"
        ));
    };
    let (a, b) = match (lo.parse::<u64>(), hi.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b => (a, b),
        _ => {
            return Err(format!(
                "{{{inner}}} is not a range of two increasing integers"
            ))
        }
    };
    if text[close + 1..].contains('{') {
        return Err("only one brace range is supported".into());
    }
    if b - a >= 10_000_000 {
        return Err(format!("{{{inner}}} names more than 10 million shards"));
    }
    let width = lo.len();
    Ok(Some(
        (a..=b)
            .map(|i| {
                PathBuf::from(format!(
                    "{}{i:0width$}{}",
                    &text[..open],
                    &text[close + 1..]
                ))
            })
            .collect(),
    ))
}

/// Indexes every shard, on several threads; results in shard order, and how many came
/// from the cache. An unreadable shard (it cannot be opened) is an error; a damaged one is
/// reported in its index.
fn index_all(
    shards: &[PathBuf],
    cache: Option<&Path>,
    progress: Option<&super::OpenProgress>,
) -> Result<(Vec<ShardIndex>, usize), DataError> {
    if let Some(p) = progress {
        p.start(super::Counted::Shards, shards.len());
    }
    let threads = INDEX_THREADS.min(shards.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<Result<(ShardIndex, bool), DataError>>> =
        shards.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = shards.get(i) else { break };
                        let r = cached_index(path, cache);
                        if let Some(p) = progress {
                            p.one_done(matches!(r, Ok((_, true))));
                        }
                        mine.push((i, r));
                    }
                    mine
                })
            })
            .collect();
        for (i, r) in workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
        {
            out[i] = Some(r);
        }
    });
    let mut hits = 0;
    let indexes = out
        .into_iter()
        .zip(shards)
        .map(|(r, p)| {
            let (index, hit) = r.unwrap_or_else(|| {
                Err(DataError::Format {
                    path: p.clone(),
                    reason: "the thread indexing this shard failed".into(),
                })
            })?;
            hits += usize::from(hit);
            Ok(index)
        })
        .collect::<Result<_, DataError>>()?;
    if let Some(cache) = cache.filter(|_| hits < shards.len()) {
        prune_cache(cache);
    }
    Ok((indexes, hits))
}

/// A shard's index from the cache when it holds one for the shard as it is now; otherwise
/// walked, and stored there. The cache is best effort: a cache that cannot be read or
/// written, or an entry that fails its checksum, only costs the walk.
fn cached_index(path: &Path, cache: Option<&Path>) -> Result<(ShardIndex, bool), DataError> {
    let Some(cache) = cache else {
        return Ok((index_shard(path)?, false));
    };
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    let identity = identity(path, &meta);
    let file = cache.join(format!("{}.idx", &blake3::hash(&identity).to_hex()[..32]));
    if let Some(index) = std::fs::read(&file)
        .ok()
        .and_then(|bytes| decode_index(&bytes, &identity))
    {
        touch(&file);
        return Ok((index, true));
    }
    let index = index_shard(path)?;
    // only a shard unchanged while it was walked is worth keeping
    let unchanged = std::fs::metadata(path).is_ok_and(|m| identity == self::identity(path, &m));
    if unchanged && std::fs::create_dir_all(cache).is_ok() {
        let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
        if std::fs::write(&tmp, encode_index(&index, &identity)).is_err()
            || std::fs::rename(&tmp, &file).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((index, false))
}

/// Cache entries not used for this long are deleted (their shards are gone or unused).
const CACHE_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// Marks a cache entry as used (at most once a day, so a hit rarely writes).
fn touch(file: &Path) {
    let now = SystemTime::now();
    let stale = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > Duration::from_secs(24 * 3600));
    if stale {
        if let Ok(f) = File::options().write(true).open(file) {
            let _ = f.set_modified(now);
        }
    }
}

/// Deletes the cache's entries unused for [`CACHE_KEEP`], and temporary files a killed
/// writer left, a day old.
fn prune_cache(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let keep = if name.ends_with(".idx") {
            CACHE_KEEP
        } else if name.contains(".tmp.") {
            Duration::from_secs(24 * 3600)
        } else {
            continue;
        };
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default());
        if age.is_ok_and(|a| a > keep) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What identifies a shard's content without reading it: its absolute path, size,
/// modification and change times and inode (the change time moves on every write and
/// cannot be set back, so a shard replaced by another of the same size and date differs).
fn identity(path: &Path, meta: &std::fs::Metadata) -> Vec<u8> {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut id = abs.as_os_str().as_encoded_bytes().to_vec();
    id.push(0);
    id.extend(meta.len().to_le_bytes());
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        for v in [
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        ] {
            id.extend(v.to_le_bytes());
        }
        id.extend(meta.ino().to_le_bytes());
        id.extend(meta.dev().to_le_bytes());
    }
    #[cfg(not(unix))]
    if let Ok(t) = meta.modified() {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id.extend(d.as_nanos().to_le_bytes());
    }
    id
}

const INDEX_MAGIC: &[u8; 8] = b"dinodTI1";

/// A cached index: magic, the shard's identity, the entries and the damage, then the
/// BLAKE3 of all of it.
fn encode_index(index: &ShardIndex, identity: &[u8]) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend((b.len() as u64).to_le_bytes());
        out.extend(b);
    }
    let mut out = INDEX_MAGIC.to_vec();
    bytes(&mut out, identity);
    out.extend((index.entries.len() as u64).to_le_bytes());
    for e in &index.entries {
        bytes(&mut out, e.name.as_bytes());
        out.extend(e.offset.to_le_bytes());
        out.extend(e.len.to_le_bytes());
        match &e.small {
            Some(s) => {
                out.push(1);
                bytes(&mut out, s);
            }
            None => out.push(0),
        }
    }
    match &index.damage {
        Some(d) => {
            out.push(1);
            bytes(&mut out, d.as_bytes());
        }
        None => out.push(0),
    }
    let sum = blake3::hash(&out);
    out.extend(sum.as_bytes());
    out
}

/// The index in `bytes` when they are whole (checksum) and for this `identity`.
fn decode_index(bytes: &[u8], identity: &[u8]) -> Option<ShardIndex> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if n > self.0.len() {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn u8(&mut self) -> Option<u8> {
            Some(self.take(1)?[0])
        }
        fn bytes(&mut self) -> Option<&'a [u8]> {
            let n = usize::try_from(self.u64()?).ok()?;
            self.take(n)
        }
        fn text(&mut self) -> Option<String> {
            String::from_utf8(self.bytes()?.to_vec()).ok()
        }
    }
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = Reader(body);
    if r.take(8)? != INDEX_MAGIC || r.bytes()? != identity {
        return None;
    }
    let n = r.u64()?;
    let mut entries = Vec::with_capacity(usize::try_from(n).ok()?.min(1 << 24));
    for _ in 0..n {
        let name = r.text()?;
        let (offset, len) = (r.u64()?, r.u64()?);
        let small = match r.u8()? {
            0 => None,
            _ => Some(r.bytes()?.to_vec()),
        };
        entries.push(Entry {
            name,
            offset,
            len,
            small,
        });
    }
    let damage = match r.u8()? {
        0 => None,
        _ => Some(r.text()?),
    };
    r.0.is_empty().then_some(ShardIndex { entries, damage })
}

/// Reads `buf.len()` bytes at `offset`, or fewer at the end of the file; returns how many.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        #[cfg(unix)]
        let n = std::os::unix::fs::FileExt::read_at(file, &mut buf[done..], offset + done as u64);
        #[cfg(not(unix))]
        let n = {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = file;
            f.seek(SeekFrom::Start(offset + done as u64))
                .and_then(|_| f.read(&mut buf[done..]))
        };
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The compression a file starts with, by its magic bytes.
fn compressed(start: &[u8]) -> Option<&'static str> {
    [
        (&b"\x1f\x8b"[..], "gzip"),
        (b"BZh", "bzip2"),
        (b"\xfd7zXZ\0", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
    ]
    .into_iter()
    .find_map(|(magic, kind)| start.starts_with(magic).then_some(kind))
}

/// The last read of a shard's header walk: one read of [`Window::SIZE`] bytes serves a
/// label member (its header and data block) and the header of the image member after it,
/// instead of one read each. Not larger: on shards that hold their image data, an 8 KB
/// window made the kernel read 766 MiB where 2 KB reads 357 MiB (BENCHMARKS.md).
struct Window {
    buf: Vec<u8>,
    start: u64,
    filled: usize,
}

impl Window {
    const SIZE: usize = 2048;

    fn new() -> Self {
        Window {
            buf: vec![0; Self::SIZE],
            start: 0,
            filled: 0,
        }
    }

    /// Up to `n` bytes at `off` (fewer at the end of the file), read again only when the
    /// window does not hold them.
    fn get(&mut self, file: &File, off: u64, n: usize) -> std::io::Result<&[u8]> {
        let end = self.start + self.filled as u64;
        if off < self.start || off + n as u64 > end {
            self.start = off;
            self.filled = read_at(file, &mut self.buf, off)?;
        }
        let s = (off - self.start) as usize;
        Ok(&self.buf[s..(s + n).min(self.filled)])
    }
}

/// A NUL- (or space-) terminated header field as text.
fn field(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// A numeric header field: octal text, or base-256 when its first byte has the high bit.
fn number(b: &[u8]) -> Option<u64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        if b[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = u64::from(b[0] & 0x3f);
        for &c in &b[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(c))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field(b))
        .ok()?
        .trim_matches([' ', '\0']);
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// Whether the header's checksum (the sum of its bytes, the checksum field read as spaces)
/// matches the one it stores.
fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(stored) = number(&h[148..156]) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(c)
            }
        })
        .sum();
    sum == stored
}

/// The `path` and `size` records of a pax extended header.
fn pax_records(data: &[u8]) -> (Option<String>, Option<u64>) {
    let (mut path, mut size) = (None, None);
    let mut rest = data;
    while !rest.is_empty() {
        // "LEN key=value\n", LEN counting the whole record
        let Some(sp) = rest.iter().position(|&c| c == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|t| t.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp || len > rest.len() {
            break;
        }
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|&c| c == b'=') {
            let (k, v) = (&record[..eq], &record[eq + 1..]);
            match k {
                b"path" => path = Some(String::from_utf8_lossy(v).into_owned()),
                b"size" => size = std::str::from_utf8(v).ok().and_then(|t| t.parse().ok()),
                _ => {}
            }
        }
        rest = &rest[len..];
    }
    (path, size)
}

/// The member path as WebDataset keys it: no leading `./` or `/`.
fn clean_name(name: &str) -> String {
    let mut n = name;
    loop {
        if let Some(r) = n.strip_prefix("./") {
            n = r;
        } else if let Some(r) = n.strip_prefix('/') {
            n = r;
        } else {
            break;
        }
    }
    n.to_string()
}

/// Walks one shard's headers. Errors only when the file cannot be opened or read; damage
/// ends the walk and is described in the index.
fn index_shard(path: &Path) -> Result<ShardIndex, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut index = ShardIndex::default();
    let mut off = 0u64;
    // a GNU long name or pax record for the next member
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    // regular members by name, for hard links to them
    let mut regular: std::collections::HashMap<String, usize> = Default::default();
    // header plus the first data block, so a small member (a label) comes with its header
    let mut buf = [0u8; 1024];
    let mut window = Window::new();
    loop {
        if off >= file_len {
            // no end-of-archive blocks: some writers stop at the last member
            break;
        }
        let got = window
            .get(&file, off, buf.len())
            .map_err(|e| DataError::io(path, e))?;
        let n = got.len();
        buf[..n].copy_from_slice(got);
        if n < 512 {
            index.damage = Some(format!(
                "truncated: {n} bytes of a header at byte {off} (the file ends there)"
            ));
            break;
        }
        if off == 0 {
            if let Some(kind) = compressed(&buf[..n]) {
                index.damage = Some(format!(
                    "a {kind}-compressed archive: tar sources read uncompressed shards only, \
                     each sample at its offset (decompress it first)"
                ));
                break;
            }
        }
        let h: &[u8; 512] = buf[..512].try_into().expect("512 bytes");
        if h.iter().all(|&c| c == 0) {
            break; // end of archive
        }
        let damaged = |why: String| {
            format!(
                "{why} at byte {off}; the {} member(s) before it are used, the rest of the shard is not",
                index.entries.len()
            )
        };
        if !checksum_ok(h) {
            index.damage = Some(damaged("tar header checksum mismatch".into()));
            break;
        }
        let Some(size) = number(&h[124..136]) else {
            index.damage = Some(damaged("unreadable size in the tar header".into()));
            break;
        };
        let size = pax_size.take().unwrap_or(size);
        let data = off + BLOCK;
        let Some(next) = size
            .checked_add(BLOCK - 1)
            .map(|s| data + s / BLOCK * BLOCK)
        else {
            index.damage = Some(damaged("impossible member size".into()));
            break;
        };
        if data + size > file_len {
            index.damage = Some(damaged(format!(
                "a member of {size} bytes runs past the end of the file ({file_len} bytes; a truncated copy)"
            )));
            break;
        }
        let read_data = |len: u64| -> Result<Vec<u8>, DataError> {
            let mut v = vec![0u8; len as usize];
            let got = read_at(&file, &mut v, data).map_err(|e| DataError::io(path, e))?;
            v.truncate(got);
            Ok(v)
        };
        match h[156] {
            b'L' => {
                let v = read_data(size.min(1 << 20))?;
                long_name = Some(String::from_utf8_lossy(field(&v)).into_owned());
            }
            b'x' => {
                let v = read_data(size.min(1 << 20))?;
                let (p, s) = pax_records(&v);
                if p.is_some() {
                    long_name = p;
                }
                pax_size = s;
            }
            b'0' | b'\0' | b'7' => {
                let name = match long_name.take() {
                    Some(n) => n,
                    None => {
                        let base = String::from_utf8_lossy(field(&h[0..100]));
                        // POSIX ustar splits long paths into a prefix; GNU uses those bytes
                        // for other things and says "ustar  "
                        if &h[257..263] == b"ustar\0" && h[345] != 0 {
                            let prefix = String::from_utf8_lossy(field(&h[345..500]));
                            format!("{prefix}/{base}")
                        } else {
                            base.into_owned()
                        }
                    }
                };
                // only labels are kept in the index; they come with their header
                let small = if !extension(&name).starts_with("cls") {
                    None
                } else if size <= BLOCK && n >= 512 + size as usize {
                    Some(buf[512..512 + size as usize].to_vec())
                } else {
                    Some(read_data(size.min(4096))?)
                };
                let name = clean_name(&name);
                regular.insert(name.clone(), index.entries.len());
                index.entries.push(Entry {
                    name,
                    offset: data,
                    len: size,
                    small,
                });
            }
            b'1' => {
                // a hard link (tar stores a file's second name so): the data of the
                // member it names, earlier in this shard, as a folder would read it
                let name = long_name
                    .take()
                    .unwrap_or_else(|| String::from_utf8_lossy(field(&h[0..100])).into_owned());
                let target = clean_name(&String::from_utf8_lossy(field(&h[157..257])));
                if let Some(&k) = regular.get(&target) {
                    let (offset, len, small) = {
                        let t = &index.entries[k];
                        (t.offset, t.len, t.small.clone())
                    };
                    index.entries.push(Entry {
                        name: clean_name(&name),
                        offset,
                        len,
                        small,
                    });
                }
            }
            _ => {
                // folders, links, global pax headers, devices: nothing to read
                long_name = None;
            }
        }
        off = next;
    }
    Ok(index)
}

impl Source for TarSource {
    fn len(&self) -> Option<u64> {
        Some(self.samples.len() as u64)
    }

    fn get(&self, index: u64) -> Result<Sample, DataError> {
        let Some(m) = self.samples.get(index as usize) else {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.samples.len() as u64,
                what: self.describe(),
            });
        };
        let shard = &self.shards[m.shard as usize];
        let bad = |reason| {
            DataError::BadInput(BadInput {
                path: shard.join(&*m.name),
                index: Some(index),
                reason,
            })
        };
        let file = self
            .open
            .get(m.shard, shard)
            .map_err(|e| bad(BadReason::Io(e.to_string())))?;
        let mut bytes = vec![0u8; m.len as usize];
        let got =
            read_at(&file, &mut bytes, m.offset).map_err(|e| bad(BadReason::Io(e.to_string())))?;
        if got < bytes.len() {
            return Err(bad(BadReason::Io(format!(
                "the shard ends {} bytes into a {}-byte member (it changed since it was indexed)",
                got,
                bytes.len()
            ))));
        }
        if bytes.is_empty() {
            return Err(bad(BadReason::Empty));
        }
        let image = decode_rgb(&bytes, self.pixel_limit).map_err(bad)?;
        let shard_name = shard
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Sample {
            image,
            label: self.labels.as_ref().map(|l| l[index as usize]),
            label_map: None,
            id: format!("{shard_name}/{}", m.name),
        })
    }

    fn n_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|_| self.classes.len())
    }

    fn class_names(&self) -> &[String] {
        &self.classes
    }

    fn describe(&self) -> String {
        let classes = match self.labels {
            Some(_) => format!(
                ", {} classes from {}",
                self.classes.len(),
                self.label_origin
            ),
            None => ", unlabelled".to_string(),
        };
        let unread = match self.n_unread_images {
            0 => String::new(),
            n => format!(
                "; {n} more image member(s) share a sample's key and are not read (WebDataset \
                 keys end at a file name's first '.')"
            ),
        };
        let reopened = if self.shards.len() > self.open.max {
            format!(
                "; at most {} shard files are kept open (a quarter of the process's open-file \
                 limit, at most 4096), so samples of the others open their shard: raise the \
                 limit (`ulimit -n`, systemd `LimitNOFILE`) to keep them all open",
                self.open.max
            )
        } else {
            String::new()
        };
        format!(
            "tar {} ({} shard(s), {} images{classes}{unread}{reopened})",
            self.given.display(),
            self.shards.len(),
            self.samples.len()
        )
    }

    fn rejected(&self) -> &[BadInput] {
        &self.rejected
    }

    fn location(&self) -> PathBuf {
        self.given.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_extensions_are_webdataset_s() {
        assert_eq!(key("a/b/x.seg.png"), "a/b/x");
        assert_eq!(extension("a/b/x.seg.png"), "seg.png");
        assert_eq!(extension("a.d/x"), "");
        assert_eq!(key("a.d/x"), "a.d/x");
        assert_eq!(clean_name("./a/x.jpg"), "a/x.jpg");
    }

    #[test]
    fn brace_ranges_expand_with_their_padding() {
        let got = expand_braces("/d/s-{008..011}.tar")
            .expect("range")
            .expect("some");
        let got: Vec<String> = got.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            got,
            [
                "/d/s-008.tar",
                "/d/s-009.tar",
                "/d/s-010.tar",
                "/d/s-011.tar"
            ]
        );
        assert_eq!(expand_braces("/d/s.tar"), Ok(None));
        for bad in [
            "/d/{1..}.tar",
            "/d/{3..1}.tar",
            "/d/{1..2",
            "/d/{1..2}/{1..2}.tar",
        ] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_open_shard_bound_is_a_quarter_of_the_descriptor_limit_within_limits() {
        assert_eq!(open_shard_bound(1024), 256);
        assert_eq!(open_shard_bound(4096), 1024);
        assert_eq!(open_shard_bound(20_000), 4096);
        assert_eq!(open_shard_bound(1 << 20), 4096);
        assert_eq!(open_shard_bound(40), 16);
        assert_eq!(open_shard_bound(0), 16);
        let now = nofile_limit();
        assert!(now >= 16, "{now}");
    }

    #[test]
    fn numbers_read_octal_and_base_256() {
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(b"       \0"), Some(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 2; // 2 * 256^4
        assert_eq!(number(&big), Some(2 << 32));
        assert_eq!(number(b"12x\0"), None);
    }

    #[test]
    fn pax_records_give_path_and_size() {
        let rec = b"29 path=a/very/long/name.jpg\n11 size=42\n18 mtime=1.000000\n";
        assert_eq!(
            pax_records(rec),
            (Some("a/very/long/name.jpg".into()), Some(42))
        );
    }

    #[test]
    fn the_read_window_gives_the_bytes_a_direct_read_gives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        let mut w = Window::new();
        // inside one window, across its end, backwards, and running off the end of the file
        for (off, n) in [
            (0, 1024),
            (512, 1024),
            (1024, 1024),
            (1536, 1024),
            (0, 512),
            (4500, 1024),
            (4999, 1024),
            (5000, 1024),
        ] {
            let got = w.get(&file, off as u64, n).expect("read");
            let end = (off + n).min(bytes.len());
            assert_eq!(got, &bytes[off..end], "{n} bytes at {off}");
        }
    }
}
