//! Save/load throughput of the checkpoint store and disk usage under retention.
//!
//! ```text
//! cargo run --release -p checkpoints --example bench -- [MB per checkpoint] [saves] [dir]
//! ```
//!
//! Defaults: 100 MB, 5 saves, a temporary directory under `$TMPDIR`. Prints the phases of every
//! save (write, fsync, commit, GC), then load, `load_latest_valid` and verify times, then the
//! disk usage after 30 saves of a 4 MB checkpoint with `keep_last = 2`.

use std::time::Instant;

use checkpoints::{
    disk_usage, CheckpointPayload, Retention, Store, StoreOptions, TensorBlob, TensorGroup,
};

fn payload(step: u64, bytes: usize) -> CheckpointPayload {
    // Four groups shaped like a ViT checkpoint: student, teacher, Gram teacher, optimizer (2x).
    let groups = [
        ("student", 1),
        ("teacher", 1),
        ("gram_teacher", 1),
        ("optimizer", 2),
    ];
    let unit = bytes / 5 / 4; // f32 elements per share
    let mut state = step.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = CheckpointPayload::new(step).with_versions("bench", env!("CARGO_PKG_VERSION"));
    for (name, shares) in groups {
        let n = unit * shares;
        let n_tensors = 24;
        let tensors = (0..n_tensors)
            .map(|i| {
                let len = n / n_tensors;
                let data: Vec<f32> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 40) as f32
                    })
                    .collect();
                TensorBlob::from_f32(format!("blocks.{i}.weight"), &[len], &data).unwrap()
            })
            .collect();
        p = p.with_group(TensorGroup::new(name, tensors));
    }
    p.with_meta(serde_json::json!({ "step": step }))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mb: usize = args
        .first()
        .map_or(100, |s| s.parse().expect("MB per checkpoint"));
    let saves: u64 = args
        .get(1)
        .map_or(5, |s| s.parse().expect("number of saves"));
    let tmp;
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_owned()
        }
    };

    let store = Store::open(&dir, StoreOptions::new(Retention::keep_last(2))).unwrap();
    println!("state directory {}", dir.display());
    for step in 1..=saves {
        let p = payload(step, size_mb * 1_000_000);
        let r = store.save(&p).unwrap();
        println!(
            "save step {step}: {:.1} MB  write {:6.1} ms  fsync {:6.1} ms  commit {:5.1} ms  gc {:5.1} ms  -> durable in {:6.1} ms ({:.0} MB/s)",
            mb(r.bytes),
            r.write.as_secs_f64() * 1e3,
            r.fsync.as_secs_f64() * 1e3,
            r.commit.as_secs_f64() * 1e3,
            r.gc.as_secs_f64() * 1e3,
            r.durable().as_secs_f64() * 1e3,
            r.mb_per_s()
        );
    }
    let t = Instant::now();
    let ckpt = store.load_latest_valid().unwrap().unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "load_latest_valid: {:.1} MB in {:.1} ms ({:.0} MB/s, page cache warm)",
        mb(ckpt.bytes),
        secs * 1e3,
        mb(ckpt.bytes) / secs
    );
    drop(ckpt);
    let t = Instant::now();
    let report = store.verify(saves).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "verify: {:.1} MB in {:.1} ms ({:.0} MB/s)",
        mb(report.bytes),
        secs * 1e3,
        mb(report.bytes) / secs
    );
    println!("disk usage: {:.1} MB", mb(store.disk_usage().unwrap()));
    drop(store);

    let small = tempfile::tempdir().unwrap();
    let store = Store::open(small.path(), StoreOptions::new(Retention::keep_last(2))).unwrap();
    let mut ckpt_bytes = 0;
    for step in 1..=30 {
        ckpt_bytes = store.save(&payload(step, 4_000_000)).unwrap().bytes;
    }
    println!(
        "30 saves of {:.1} MB, keep_last 2: {:.2} MB on disk ({:.2} checkpoints), catalog {:.3} MB",
        mb(ckpt_bytes),
        mb(store.disk_usage().unwrap()),
        store.disk_usage().unwrap() as f64 / ckpt_bytes as f64,
        mb(disk_usage(&small.path().join("catalog")).unwrap())
    );
}
