//! Measures what one probe run costs: a random-init ViT preset on the built-in synthetic
//! scenes, every probe at the default settings, timings printed per probe.
//!
//! `cargo run --release -p eval_probes --example probe_cost -- [PRESET] [SIZE] [N_TRAIN] [N_TEST] [PICTURES_DIR]`
//! (defaults: `vit_pico 112 512 256`). With a pictures folder it also writes, for the first
//! test image, the PCA picture at three input resolutions side by side and a similarity map.

use std::time::Instant;

use candle_core::DType;
use eval_probes::{
    denormalize, extract, pca_rgb_shared, resize_nearest, run_probes, side_by_side, similarity_map,
    write_png, ProbeConfig, ProbeSet, ProbeSetConfig,
};
use model::vit::Vit;
use model::VitConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let preset = arg(0, "vit_pico");
    let size: u32 = arg(1, "112").parse()?;
    let n_train: usize = arg(2, "512").parse()?;
    let n_test: usize = arg(3, "256").parse()?;
    let cfg = VitConfig::preset(&preset).ok_or_else(|| format!("unknown preset {preset:?}"))?;
    let vit = Vit::init(&cfg, 0, DType::F32)?;
    let src = data::SyntheticScenes::new(data::SyntheticConfig {
        seed: 0,
        size: 96,
        len: 1 << 20,
        ..Default::default()
    });
    let t = Instant::now();
    let set = ProbeSet::build(
        "synthetic",
        &src,
        None,
        &ProbeSetConfig {
            size,
            n_train,
            n_test,
            ..ProbeSetConfig::default()
        },
    )?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let probe_cfg = ProbeConfig::default();
    let report = run_probes(&vit, std::slice::from_ref(&set), &probe_cfg)?;
    let r = &report.sets[0];
    println!(
        "model {preset} (D={}, depth {}), {} threads",
        cfg.embed_dim,
        cfg.depth,
        rayon::current_num_threads()
    );
    println!("probe set: {n_train} train + {n_test} test images at {size}px, grid {:?}; built in {build_ms:.0} ms", r.grid);
    let t = &r.timing;
    println!(
        "extract {:.0} ms | knn {:.1} ms | linear {:.0} ms ({} it) | dense {:.0} ms ({} it) | locality+collapse {:.0} ms | correspondence {:.0} ms | total {:.0} ms",
        t.extract_ms,
        t.knn_ms,
        t.linear_ms,
        r.linear.as_ref().map_or(0, |l| l.fit.iterations),
        t.dense_ms,
        r.dense.as_ref().map_or(0, |d| d.fit.iterations),
        t.locality_ms,
        t.correspondence_ms,
        report.total_ms
    );
    println!("{}", serde_json::to_string_pretty(&report.metrics())?);
    if let Some(dir) = args.get(4) {
        pictures(&vit, &src, std::path::Path::new(dir))?;
    }
    Ok(())
}

/// PCA pictures of one scene at three resolutions and a similarity map, into `dir`.
fn pictures(
    vit: &Vit,
    src: &data::SyntheticScenes,
    dir: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let sample = src.generate(1);
    let p = vit.cfg.patch_size as u32;
    let sizes = [4 * p, 7 * p, 12 * p];
    let mut feats = vec![];
    for &s in &sizes {
        let img = data::eval_transform(
            &sample,
            &data::EvalConfig {
                size: s,
                ..Default::default()
            },
        );
        feats.push((
            extract(vit, &img.pixels, 1, (s as usize, s as usize), 1)?,
            img,
        ));
    }
    let maps: Vec<(&[f32], (usize, usize))> = feats
        .iter()
        .map(|(f, _)| (f.patches.as_slice(), f.grid))
        .collect();
    let pcs = pca_rgb_shared(&maps)?;
    let mut row = vec![resize_nearest(&sample.image, 224, 224)];
    row.extend(pcs.iter().map(|pc| resize_nearest(pc, 224, 224)));
    write_png(&side_by_side(&row), &dir.join("pca.png"))?;
    let (f, img) = &feats[2];
    let s = sizes[2] as usize;
    let rgb = denormalize(&img.pixels, (s, s), data::IMAGENET_MEAN, data::IMAGENET_STD)?;
    let big = resize_nearest(&rgb, 384, 384);
    write_png(
        &similarity_map(&f.patches, f.grid, (192, 192), &big)?,
        &dir.join("similarity.png"),
    )?;
    println!("pictures written to {}", dir.display());
    Ok(())
}
