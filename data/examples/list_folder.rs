//! How long opening a `folder:` source takes: the recursive, sorted listing every process
//! start (and every restart after a crash) pays before its first step.
//!
//! `cargo run -p data --release --example list_folder -- DIR [--make CLASSES PER_CLASS]`
//!
//! `--make` first fills DIR with an ImageFolder tree of empty `.JPEG` files (ImageNet's
//! train split is 1000 x 1281); the listing never opens a file. Prints the file count, the
//! seconds and a hash of the order and the classes, to compare two builds. For a cold
//! listing drop the page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`).

use std::hash::{Hash, Hasher};

use data::Source;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        return Err("usage: list_folder DIR [--make CLASSES PER_CLASS]".into());
    };
    if args.get(1).map(String::as_str) == Some("--make") {
        let classes: usize = args.get(2).ok_or("--make CLASSES PER_CLASS")?.parse()?;
        let per: usize = args.get(3).ok_or("--make CLASSES PER_CLASS")?.parse()?;
        for c in 0..classes {
            let class = format!("n{c:08}");
            let d = std::path::Path::new(dir).join(&class);
            std::fs::create_dir_all(&d)?;
            for i in 0..per {
                std::fs::File::create(d.join(format!("{class}_{i}.JPEG")))?;
            }
        }
    }
    let t = std::time::Instant::now();
    let src = data::FolderSource::open(dir)?;
    let secs = t.elapsed().as_secs_f64();
    let n = src.len().unwrap_or(0);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for i in 0..n {
        src.path(i).hash(&mut h);
    }
    src.class_names().hash(&mut h);
    println!(
        "{n} files, {} classes, listed in {secs:.2} s; order and classes hash {:016x}",
        src.class_names().len(),
        h.finish()
    );
    Ok(())
}
