//! Builds the copy-paste segmentation set from the files `scripts/fetch-real-data.sh` extracted.
//!
//! `cargo run -p data --release --example build_copypaste -- REAL_DIR OUT_DIR [N_TRAIN N_TEST [SEED]]`
//! (REAL_DIR holds `stamps/` and `backgrounds/`; default `$HOME/.cache/dinod/real`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let home = std::env::var("HOME").unwrap_or_default();
    let real = args.first().map_or_else(
        || PathBuf::from(&home).join(".cache/dinod/real"),
        PathBuf::from,
    );
    let out = args.get(1).map_or_else(
        || PathBuf::from(&home).join(".cache/dinod/copypaste"),
        PathBuf::from,
    );
    let mut cfg = data::CopyPasteConfig::default();
    if let (Some(a), Some(b)) = (args.get(2), args.get(3)) {
        cfg.n_train = a.parse()?;
        cfg.n_test = b.parse()?;
    }
    if let Some(s) = args.get(4) {
        cfg.seed = s.parse()?;
    }
    let t = std::time::Instant::now();
    let m = data::build_copy_paste(&real.join("stamps"), &real.join("backgrounds"), &out, &cfg)?;
    println!(
        "built {} train + {} test scenes of {} px in {:.1} s into {}",
        m.train.len(),
        m.test.len(),
        cfg.size,
        t.elapsed().as_secs_f64(),
        out.display()
    );
    for (c, name) in m.classes.iter().enumerate() {
        let n_train = m.train.iter().filter(|e| e.label == c as u32).count();
        let n_test = m.test.iter().filter(|e| e.label == c as u32).count();
        println!(
            "  class {c} {name}: {} + {} cut-outs, {n_train} train / {n_test} test scenes labelled",
            m.train_stamps[c].len(),
            m.test_stamps[c].len()
        );
    }
    let src = data::CopyPasteSource::open(&out, data::Split::Test)?;
    use data::Source;
    println!("read back: {}", src.describe());
    Ok(())
}
