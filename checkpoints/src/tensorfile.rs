//! Streaming safetensors IO with a BLAKE3 hash computed on the same pass.
//!
//! Writing produces the same bytes as `safetensors::serialize` (same tensor order, same header),
//! without building the whole file in memory, in chunks so a fault can be injected mid-file.
//! Reading hashes every byte, parses the header with safetensors' own `Metadata` (which validates
//! offsets), and reads each tensor straight into its own buffer (a vector of its elements for
//! floats): one pass, no second copy.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{Error, Problem, Result};
use crate::fault::{FaultInjector, FaultPoint, FaultStage};
use crate::tensor::{Data, Dtype, TensorBlob, TensorGroup};

/// Chunk size for writes (and fault checks) and for streamed reads.
pub(crate) const CHUNK: usize = 4 << 20;
/// safetensors refuses headers above 100 MB; so do we.
const MAX_HEADER: u64 = 100_000_000;

/// Shared state of one save: fault injector, step, bytes written so far.
pub(crate) struct SaveIo<'a> {
    pub(crate) step: u64,
    pub(crate) injector: Option<&'a dyn FaultInjector>,
    pub(crate) bytes_written: u64,
}

impl SaveIo<'_> {
    pub(crate) fn check(&self, stage: FaultStage, path: &Path, len: u64) -> io::Result<()> {
        match self.injector {
            Some(inj) => inj.check(&FaultPoint {
                stage,
                step: self.step,
                path,
                bytes_written: self.bytes_written,
                len,
            }),
            None => Ok(()),
        }
    }

    /// Writes `bytes` in chunks, consulting the injector before each chunk.
    pub(crate) fn write_all(
        &mut self,
        file: &mut File,
        path: &Path,
        bytes: &[u8],
        hasher: Option<&mut blake3::Hasher>,
    ) -> Result<()> {
        let mut hasher = hasher;
        for chunk in bytes.chunks(CHUNK) {
            self.check(FaultStage::Write, path, chunk.len() as u64)
                .and_then(|()| file.write_all(chunk))
                .map_err(|e| Error::io("write", path, e))?;
            if let Some(h) = hasher.as_deref_mut() {
                h.update(chunk);
            }
            self.bytes_written += chunk.len() as u64;
        }
        Ok(())
    }
}

/// What a written file turned out to be.
pub(crate) struct Written {
    pub(crate) size: u64,
    pub(crate) blake3: String,
    pub(crate) n_tensors: usize,
}

/// The `__metadata__` of every file we write: one entry, so the header bytes are deterministic
/// (safetensors keeps metadata in a `HashMap`, whose order would vary between runs).
fn file_metadata(step: u64, group: &str) -> HashMap<String, String> {
    HashMap::from([(
        "dinod".to_owned(),
        format!("checkpoint step={step} group={group}"),
    )])
}

/// Tensors in safetensors' canonical order: descending dtype alignment, then name.
fn canonical_order(group: &TensorGroup) -> Vec<&TensorBlob> {
    let mut order: Vec<&TensorBlob> = group.tensors.iter().collect();
    order.sort_by(|a, b| {
        b.dtype
            .to_safetensors()
            .cmp(&a.dtype.to_safetensors())
            .then_with(|| a.name.cmp(&b.name))
    });
    order
}

/// The 8-byte length prefix plus the padded JSON header.
pub(crate) fn header_bytes(step: u64, group: &TensorGroup) -> Result<Vec<u8>> {
    let mut infos = Vec::with_capacity(group.tensors.len());
    let mut offset = 0usize;
    for t in canonical_order(group) {
        t.validate()?;
        let end = offset + t.bytes().len();
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype.to_safetensors(),
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let metadata = Metadata::new(Some(file_metadata(step, &group.name)), infos)
        .map_err(|e| Error::InvalidPayload(format!("group {}: {e}", group.name)))?;
    let mut json = serde_json::to_vec(&metadata)
        .map_err(|e| Error::InvalidPayload(format!("group {}: {e}", group.name)))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes one group as a safetensors file into an already created (empty) `file`.
pub(crate) fn write_group(
    io: &mut SaveIo<'_>,
    file: &mut File,
    path: &Path,
    group: &TensorGroup,
) -> Result<Written> {
    let header = header_bytes(io.step, group)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    io.write_all(file, path, &header, Some(&mut hasher))?;
    size += header.len() as u64;
    for t in canonical_order(group) {
        io.write_all(file, path, t.bytes(), Some(&mut hasher))?;
        size += t.bytes().len() as u64;
    }
    Ok(Written {
        size,
        blake3: hasher.finalize().to_hex().to_string(),
        n_tensors: group.tensors.len(),
    })
}

/// What the manifest says a file should be.
pub(crate) struct Expect<'a> {
    pub(crate) group: &'a str,
    pub(crate) size: u64,
    pub(crate) blake3: &'a str,
}

/// Tensor bytes of checkpoint and weight files read (and hashed) by this process so far,
/// by every reader: loads, verifies, exports. For whoever waits on a read to say how far
/// it is (the daemon's start reading a large checkpoint).
static BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// See [`BYTES_READ`]: a count that only grows.
pub fn bytes_read() -> u64 {
    BYTES_READ.load(Ordering::Relaxed)
}

/// Reads (`load = true`) or only verifies a group file. Every byte is hashed in both modes.
pub(crate) fn read_group(
    path: &Path,
    expect: &Expect<'_>,
    load: bool,
) -> std::result::Result<Option<TensorGroup>, Problem> {
    Ok(read_file(path, expect.group, Some(expect), load)?.0)
}

/// Reads a safetensors file that no manifest describes (a model exported by `dinod export`
/// or by other tools) as the group `group`, with the BLAKE3 hash of the file (what was
/// read, for a record of it): the header is checked as a checkpoint's is and floats are
/// read straight into vectors of their elements, but there is no size or hash to check
/// it against.
pub fn read_safetensors(
    path: &Path,
    group: &str,
) -> std::result::Result<(TensorGroup, String), Problem> {
    match read_file(path, group, None, true)? {
        (Some(g), hash) => Ok((g, hash)),
        (None, _) => Err(Problem::Unreadable {
            file: path.to_owned(),
            error: "internal error: a file read to load returned no data".into(),
        }),
    }
}

fn read_file(
    path: &Path,
    group: &str,
    expect: Option<&Expect<'_>>,
    load: bool,
) -> std::result::Result<(Option<TensorGroup>, String), Problem> {
    let unreadable = |e: io::Error| Problem::Unreadable {
        file: path.to_owned(),
        error: e.to_string(),
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Problem::MissingFile {
                file: path.to_owned(),
            })
        }
        Err(e) => return Err(unreadable(e)),
    };
    let actual = file.metadata().map_err(unreadable)?.len();
    if let Some(expect) = expect.filter(|e| e.size != actual) {
        return Err(Problem::SizeMismatch {
            file: path.to_owned(),
            expected: expect.size,
            actual,
        });
    }

    let mut hasher = blake3::Hasher::new();
    let mut consumed = 0u64;
    let parsed = parse_header(&mut file, &mut hasher, &mut consumed, actual).map_err(unreadable)?;

    let mut tensors = Vec::new();
    let mut parse_error = None;
    match parsed {
        Ok(metadata) if load => {
            for name in metadata.offset_keys() {
                let Some(info) = metadata.info(&name) else {
                    continue;
                };
                let len = info.data_offsets.1 - info.data_offsets.0;
                let dtype = Dtype::from_safetensors(info.dtype);
                // straight into the memory of the tensor's elements: no second buffer
                let mut data = Data::zeroed(dtype, len);
                file.read_exact(data.bytes_mut()).map_err(unreadable)?;
                hasher.update(data.bytes());
                BYTES_READ.fetch_add(len as u64, Ordering::Relaxed);
                consumed += len as u64;
                match dtype {
                    Some(dtype) => tensors.push(TensorBlob {
                        name,
                        dtype,
                        shape: info.shape.clone(),
                        data,
                    }),
                    None if parse_error.is_none() => {
                        parse_error =
                            Some(format!("tensor {name}: unsupported dtype {:?}", info.dtype))
                    }
                    None => {}
                }
            }
        }
        Ok(_) => {}
        Err(e) => parse_error = Some(e),
    }
    // Hash whatever is left (everything after the header in verify mode, nothing in load
    // mode).
    stream_hash(&mut file, &mut hasher, actual - consumed).map_err(unreadable)?;
    let hash = hasher.finalize().to_hex().to_string();
    if let Some(expect) = expect.filter(|e| e.blake3 != hash) {
        return Err(Problem::HashMismatch {
            file: path.to_owned(),
            expected: expect.blake3.to_owned(),
            actual: hash,
        });
    }
    if let Some(error) = parse_error {
        return Err(Problem::Unparsable {
            file: path.to_owned(),
            error,
        });
    }
    Ok((load.then(|| TensorGroup::new(group, tensors)), hash))
}

/// Reads and hashes the length prefix and header. The outer `io::Result` is a read failure, the
/// inner `Result` a header that does not parse (the caller still hashes the rest of the file, so
/// that corruption is reported as a hash mismatch rather than as a parse error).
fn parse_header(
    file: &mut File,
    hasher: &mut blake3::Hasher,
    consumed: &mut u64,
    size: u64,
) -> io::Result<std::result::Result<Metadata, String>> {
    if size < 8 {
        return Ok(Err(format!(
            "file has {size} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    hasher.update(&len);
    *consumed += 8;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > size {
        return Ok(Err(format!(
            "header length {n} is invalid for a {size}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)?;
    hasher.update(&header);
    *consumed += n;
    let metadata: Metadata = match serde_json::from_slice(&header) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("header: {e}"))),
    };
    let data_len = metadata.data_len() as u64;
    if 8 + n + data_len != size {
        return Ok(Err(format!(
            "header describes {} bytes, file has {size}",
            8 + n + data_len
        )));
    }
    Ok(Ok(metadata))
}

fn stream_hash(file: &mut File, hasher: &mut blake3::Hasher, mut remaining: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(remaining as usize)];
    while remaining > 0 {
        let n = (remaining as usize).min(buf.len());
        file.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        BYTES_READ.fetch_add(n as u64, Ordering::Relaxed);
        remaining -= n as u64;
    }
    Ok(())
}
