//! How long opening a `tar:` source takes: the header walk of every shard that every process
//! start (and every restart after a crash) pays before its first step.
//!
//! `cargo run -p data --release --example index_tar -- DIR [--make SHARDS PER_SHARD [BYTES] [--dense]]`
//!
//! `--make` first writes DIR/shard-NNNNNN.tar, WebDataset shards of PER_SHARD samples, each a
//! `KEY.cls` member (its class, 1000 classes) and a `KEY.jpg` member of BYTES bytes (default
//! 110 000, ImageNet's mean JPEG) whose data is a hole in a sparse file: the headers sit
//! where they would in real shards, but the disk holds only them. ImageNet's train split
//! as 147 shards of about 1 GB is `--make 147 8715`. `--dense` writes the data (a byte
//! pattern) instead, as real shards hold it, so a cold walk also pays the kernel's read-ahead. Prints the sample count, the seconds
//! and the problems found. For a cold index drop the
//! page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`).

use std::io::{Seek, SeekFrom, Write};

use data::Source;

/// A ustar header for a regular file.
fn header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&c| u32::from(c)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

fn make(
    dir: &std::path::Path,
    shards: usize,
    per: usize,
    bytes: u64,
    dense: bool,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let padded = bytes.div_ceil(512) * 512;
    // --dense: the data is written (a byte pattern), as in real shards, instead of a hole
    let pattern: Vec<u8> = if dense {
        (0..padded).map(|i| (i * 131 % 251) as u8 + 1).collect()
    } else {
        Vec::new()
    };
    for s in 0..shards {
        let mut f = std::io::BufWriter::new(std::fs::File::create(
            dir.join(format!("shard-{s:06}.tar")),
        )?);
        for i in 0..per {
            let key = format!("{:09}", s * per + i);
            let cls = format!("{}", (s * per + i) % 1000);
            f.write_all(&header(&format!("{key}.cls"), cls.len() as u64))?;
            let mut block = [0u8; 512];
            block[..cls.len()].copy_from_slice(cls.as_bytes());
            f.write_all(&block)?;
            f.write_all(&header(&format!("{key}.jpg"), bytes))?;
            if dense {
                f.write_all(&pattern)?;
            } else {
                f.seek(SeekFrom::Current(padded as i64))?;
            }
        }
        f.write_all(&[0u8; 1024])?;
        f.flush()?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        return Err("usage: index_tar DIR [--make SHARDS PER_SHARD [BYTES] [--dense]]".into());
    };
    if args.get(1).map(String::as_str) == Some("--make") {
        let shards: usize = args.get(2).ok_or("--make SHARDS PER_SHARD")?.parse()?;
        let per: usize = args.get(3).ok_or("--make SHARDS PER_SHARD")?.parse()?;
        let dense = args.iter().any(|a| a == "--dense");
        let bytes: u64 = args
            .get(4)
            .filter(|b| *b != "--dense")
            .map_or(Ok(110_000), |b| b.parse())?;
        make(std::path::Path::new(dir), shards, per, bytes, dense)?;
    }
    let t = std::time::Instant::now();
    let src = data::TarSource::open_with(
        std::path::Path::new(dir),
        data::DEFAULT_PIXEL_LIMIT,
        data::default_index_cache().as_deref(),
    )?;
    let secs = t.elapsed().as_secs_f64();
    let n = src.len().unwrap_or(0);
    println!(
        "{n} samples in {} shards, {} classes, indexed in {secs:.2} s ({} from the index cache); {} problems",
        src.shards().len(),
        src.class_names().len(),
        src.indexes_from_cache(),
        src.rejected().len(),
    );
    Ok(())
}
