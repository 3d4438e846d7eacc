//! `dinod probe` and `dinod viz`: probes and pictures from a checkpoint's EMA teacher,
//! read straight from the checkpoint files (verified against their manifest), so they work
//! while the daemon runs.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::cli::load_plan;
use crate::client;
use crate::commands::write_atomically;
use crate::weights::{checkpoint_manifest, read_group, vit_config};
use model::vit::{CropGroup, Vit};

/// The EMA-teacher backbone of a checkpoint (latest valid one when `step` is none).
pub fn load_teacher(state_dir: &Path, step: Option<u64>) -> Result<(u64, Vit)> {
    let (manifest, mut blobs) = read_group(state_dir, step, "teacher")?;
    let cfg = vit_config(&manifest)?;
    let vit = crate::engine::vit_from_blobs(&cfg, DType::F32, |n| blobs.take(n))?;
    Ok((manifest.step, vit))
}

/// The run config stored with a checkpoint.
fn checkpoint_plan(state_dir: &Path, step: u64) -> Result<crate::config::Plan> {
    let m = checkpoint_manifest(state_dir, step)?;
    let text = m.meta["config_toml"]
        .as_str()
        .ok_or_else(|| anyhow!("checkpoint {step} has no config"))?;
    Ok(crate::config::parse(
        text,
        &format!("the config stored with checkpoint {step}"),
    )?)
}

/// `dinod probe`.
pub fn probe(
    state_dir: &Path,
    step: Option<u64>,
    config: Option<&PathBuf>,
    device: &str,
    json_out: bool,
) -> Result<i32> {
    if !crate::config::valid_device(device) {
        bail!("--device must be cpu, cuda or cuda:N, not `{device}`");
    }
    let (s, vit) = load_teacher(state_dir, step)?;
    let plan = match config {
        Some(c) => load_plan(Some(c))?,
        None => checkpoint_plan(state_dir, s)?,
    };
    if plan.config.eval.sets.is_empty() {
        bail!("no probe sets: the run's config has no [[eval.sets]]; pass --config with one");
    }
    let sets = crate::daemon::evaluator::build_sets(&plan.config.eval)?;
    let vit = crate::daemon::evaluator::probe_copy(&vit, device)?;
    let ev = crate::daemon::evaluator::evaluate(&vit, &sets, &plan.config.eval, s)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&ev)?);
    } else {
        // a distillation student's directory holds that student's EMA as its "teacher"
        let whose = match (
            state_dir.parent().and_then(|p| p.file_name()),
            state_dir.file_name(),
        ) {
            (Some(p), Some(n)) if p == "students" => {
                format!("student {}'s EMA", n.to_string_lossy())
            }
            _ => "the EMA teacher".to_string(),
        };
        println!(
            "probes of {whose} at step {s} on {} ({:.1} s)",
            ev.device,
            ev.ms / 1e3
        );
        let m = serde_json::to_value(&ev.metrics)?;
        for (k, v) in m.as_object().into_iter().flatten() {
            println!(
                "  {k:<22} {}",
                v.as_f64()
                    .map(|x| format!("{x:.4}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(0)
}

/// Loads an image file and applies the evaluation transform at `size`.
fn image_at(path: &Path, size: u32) -> Result<(Tensor, image::RgbImage)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let img = data::decode_rgb(&bytes, data::DEFAULT_PIXEL_LIMIT)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let sample = data::Sample {
        image: img,
        label: None,
        label_map: None,
        id: path.display().to_string(),
    };
    let cfg = data::EvalConfig {
        size,
        ..Default::default()
    };
    let ev = data::eval_transform(&sample, &cfg);
    let s = size as usize;
    let t = Tensor::from_vec(ev.pixels.clone(), (1, 3, s, s), &Device::Cpu)?;
    let shown = eval_probes::denormalize(&ev.pixels, (s, s), cfg.mean, cfg.std)?;
    Ok((t, shown))
}

fn patches_of(vit: &Vit, t: &Tensor) -> Result<(Vec<f32>, (usize, usize))> {
    let f = vit.forward(&[CropGroup {
        images: t,
        masks: None,
    }])?;
    Ok((ops::host::to_vec::<f32>(&f.patches(0)?)?, f.groups[0].grid))
}

/// `dinod viz pca`.
pub fn pca(
    state_dir: &Path,
    step: Option<u64>,
    image: &Path,
    out: &Path,
    sizes: &[u32],
) -> Result<i32> {
    let (s, vit) = load_teacher(state_dir, step)?;
    let p = vit.cfg.patch_size as u32;
    let sizes: Vec<u32> = if sizes.is_empty() {
        vec![4 * p, 8 * p, 12 * p]
    } else {
        sizes.to_vec()
    };
    if let Some(bad) = sizes.iter().find(|&&x| x == 0 || x % p != 0) {
        bail!("size {bad} is not a positive multiple of the patch size {p}");
    }
    let mut maps = vec![];
    let mut shown = vec![];
    for &sz in &sizes {
        let (t, img) = image_at(image, sz)?;
        maps.push(patches_of(&vit, &t)?);
        shown.push(img);
    }
    let refs: Vec<(&[f32], (usize, usize))> =
        maps.iter().map(|(v, g)| (v.as_slice(), *g)).collect();
    let pcas = eval_probes::pca_rgb_shared(&refs)?;
    // each PCA map upscaled to its input's size, under the input
    let display = *sizes.iter().max().unwrap_or(&p);
    let mut tiles = vec![];
    for (img, pc) in shown.iter().zip(&pcas) {
        let top = eval_probes::resize_nearest(img, display, display);
        let bottom = eval_probes::resize_nearest(pc, display, display);
        let mut col =
            image::RgbImage::from_pixel(display, 2 * display + 8, image::Rgb([255, 255, 255]));
        image::imageops::replace(&mut col, &top, 0, 0);
        image::imageops::replace(&mut col, &bottom, 0, i64::from(display) + 8);
        tiles.push(col);
    }
    write_atomically(out, |tmp| {
        Ok(eval_probes::write_png(
            &eval_probes::side_by_side(&tiles),
            tmp,
        )?)
    })?;
    println!(
        "wrote {} (PCA of the step-{s} EMA teacher at {:?} px)",
        out.display(),
        sizes
    );
    Ok(0)
}

/// `dinod viz similarity`.
pub fn similarity(
    state_dir: &Path,
    step: Option<u64>,
    image: &Path,
    out: &Path,
    point: &str,
    size: Option<u32>,
) -> Result<i32> {
    let (s, vit) = load_teacher(state_dir, step)?;
    let p = vit.cfg.patch_size as u32;
    let size = size.unwrap_or(12 * p);
    if !size.is_multiple_of(p) {
        bail!("--size {size} is not a multiple of the patch size {p}");
    }
    let (x, y) = point
        .split_once(',')
        .ok_or_else(|| anyhow!("--point must be X,Y"))?;
    let (x, y): (u32, u32) = (x.trim().parse()?, y.trim().parse()?);
    if x >= size || y >= size {
        bail!("--point {x},{y} is outside the {size}x{size} image");
    }
    let (t, img) = image_at(image, size)?;
    let (patches, grid) = patches_of(&vit, &t)?;
    let map = eval_probes::similarity_map(&patches, grid, (x, y), &img)?;
    write_atomically(out, |tmp| Ok(eval_probes::write_png(&map, tmp)?))?;
    println!(
        "wrote {} (similarity to the patch at {x},{y}, step-{s} EMA teacher)",
        out.display()
    );
    Ok(0)
}

/// A run's losses, probe metrics and stage transitions (`{"train", "probes",
/// "transitions"}`), from its daemon or (stopped) its store.
pub fn history_of(state_dir: &Path) -> Result<Value> {
    // a distillation student's directory (`STATE/students/NAME`): while the run's daemon
    // holds its store open, the daemon answers for it
    let student = state_dir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "students"))
        .and_then(|p| p.parent())
        .zip(state_dir.file_name().and_then(|n| n.to_str()));
    if let Some((run, name)) = student {
        if let Some(v) = client::request(run, &json!({"cmd": "history", "student": name}))? {
            return Ok(v);
        }
    }
    Ok(
        match client::request(state_dir, &json!({"cmd": "history"}))? {
            Some(v) => v,
            None => {
                let store = client::open_offline(state_dir)?;
                let stage = match store.load_latest_valid()? {
                    Some(ck) => crate::engine::run_meta(&ck)?.stage,
                    None => Value::Null,
                };
                crate::daemon::control::history_doc(&store, &stage).map_err(|e| anyhow!(e))?
            }
        },
    )
}

/// A run's losses, probe metrics and stage transitions as curves.
fn run_curves(state_dir: &Path, label: String) -> Result<eval_probes::RunCurves> {
    let doc = history_of(state_dir)?;
    let mut series: Vec<eval_probes::Series> = vec![];
    let train = doc["train"].as_array().cloned().unwrap_or_default();
    for k in [
        "total",
        "dino_local",
        "dino_global",
        "ibot",
        "koleo",
        "gram",
    ] {
        let pts: Vec<(u64, f64)> = train
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r["value"]["losses"][k].as_f64()?)))
            .collect();
        if !pts.is_empty() && (k != "gram" || pts.iter().any(|p| p.1 != 0.0)) {
            series.push((format!("loss {k}"), pts));
        }
    }
    let probes = doc["probes"].as_array().cloned().unwrap_or_default();
    for k in [
        "knn_top1",
        "linear_top1",
        "dense_miou",
        "locality",
        "correspondence",
        "cls_patch_cos",
    ] {
        let pts: Vec<(u64, f64)> = probes
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r["metrics"][k].as_f64()?)))
            .collect();
        if !pts.is_empty() {
            series.push((k.to_string(), pts));
        }
    }
    let transitions: Vec<(u64, String)> = doc["transitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t["step"].as_u64()?,
                format!(
                    "{} -> {}",
                    t["from"].as_str().unwrap_or("?"),
                    t["to"].as_str().unwrap_or("?")
                ),
            ))
        })
        .collect();
    if series.is_empty() {
        bail!(
            "{} has no history yet (losses are recorded every runtime.log_every_steps steps)",
            state_dir.display()
        );
    }
    let refreshes: Vec<u64> = doc["gram_refreshes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["step"].as_u64())
        .collect();
    Ok(eval_probes::RunCurves {
        label,
        series,
        transitions,
        refreshes,
    })
}

/// `dinod viz curves`: one run, or (`compare`: `LABEL=DIR` or `DIR`) that run and others in
/// the same panels.
pub fn curves(
    state_dir: &Path,
    label: Option<&str>,
    compare: &[String],
    out: &Path,
) -> Result<i32> {
    let name = |dir: &Path| {
        dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let mut runs = vec![run_curves(
        state_dir,
        label.map_or_else(|| name(state_dir), str::to_string),
    )?];
    for c in compare {
        let (label, dir) = match c.split_once('=') {
            Some((l, d)) if !l.is_empty() => (l.to_string(), PathBuf::from(d)),
            _ => (name(Path::new(c)), PathBuf::from(c)),
        };
        let run = run_curves(&dir, label).with_context(|| format!("--compare {c}"))?;
        runs.push(run);
    }
    write_atomically(out, |tmp| Ok(eval_probes::runs_png(&runs, tmp)?))?;
    let transitions: usize = runs.iter().map(|r| r.transitions.len()).sum();
    let refreshes: usize = runs.iter().map(|r| r.refreshes.len()).sum();
    println!(
        "wrote {} ({} runs, {} series, {} stage transitions, {} Gram-teacher refreshes)",
        out.display(),
        runs.len(),
        runs.iter().map(|r| r.series.len()).sum::<usize>(),
        transitions,
        refreshes
    );
    Ok(0)
}
