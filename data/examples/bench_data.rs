//! Multi-crop loader throughput, as `dinod bench data` reports it.
//!
//! `cargo run -p data --release --example bench_data -- [SPEC] [N_SAMPLES] [WORKERS...]`
//! (default: `folder:../shared/data/jpeg500`, 1024 samples, workers 1 and 2; 2x224 + 8x96 crops with
//! every augmentation of the recipe on).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec: data::SourceSpec = args
        .first()
        .map_or("folder:../shared/data/jpeg500", String::as_str)
        .parse()?;
    let n_samples: u64 = args.get(1).map_or(Ok(1024), |s| s.parse())?;
    let workers: Vec<usize> = if args.len() > 2 {
        args[2..]
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?
    } else {
        vec![1, 2]
    };
    let cfg = data::CropConfig::default();
    for w in workers {
        let res = data::bench_multicrop(&spec, &cfg, w, n_samples)?;
        println!("{res}");
    }
    Ok(())
}
