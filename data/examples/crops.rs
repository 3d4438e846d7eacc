//! Writes the crops of one loader batch as a contact sheet, one image per row: global crop
//! 0, global crop 1, then the local crops, taken from the batch tensors exactly as the
//! trainer receives them (rows `c * B + b`). Use it to check by eye that every crop of a
//! row comes from the same image.
//!
//! `cargo run -p data --release --example crops -- SPEC OUT.png [GLOBAL LOCAL N_LOCAL ROWS]`

use data::{
    CropConfig, Cursor, Loader, LoaderOptions, MaskConfig, Order, IMAGENET_MEAN, IMAGENET_STD,
};
use image::{imageops, Rgb, RgbImage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec: data::SourceSpec = args.first().map_or("synthetic", String::as_str).parse()?;
    let out = args.get(1).map_or("crops.png", String::as_str);
    let num = |i: usize, d: u32| args.get(i).map_or(Ok(d), |s| s.parse::<u32>());
    let (g, l, n_local, rows) = (num(2, 64)?, num(3, 32)?, num(4, 6)?, num(5, 6)?);
    let crops = CropConfig {
        global_size: g,
        local_size: l,
        n_local: n_local as usize,
        ..CropConfig::default()
    };
    let masks = MaskConfig {
        patch_size: 8,
        ..MaskConfig::default()
    };
    let opts = LoaderOptions {
        batch_size: rows as usize,
        seed: 0,
        crops,
        masks,
        n_workers: 1,
        prefetch: 1,
        order: Order::Shuffled,
        part: None,
    };
    let mut loader = Loader::new(spec.open()?, opts, Cursor::default())?;
    let b = loader.next_batch()?;
    let bsz = b.batch_size;
    let cell = g;
    let mut sheet = RgbImage::from_pixel((2 + n_local) * cell, rows * cell, Rgb([40, 40, 40]));
    let crop_img = |data: &[f32], row: usize, side: u32| -> RgbImage {
        let plane = (side * side) as usize;
        let base = row * 3 * plane;
        RgbImage::from_fn(side, side, |x, y| {
            let i = (y * side + x) as usize;
            let px = |c: usize| {
                let v = data[base + c * plane + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c];
                (v.clamp(0.0, 1.0) * 255.0) as u8
            };
            Rgb([px(0), px(1), px(2)])
        })
    };
    for r in 0..bsz {
        for c in 0..2 {
            let img = crop_img(&b.global_crops, c * bsz + r, b.global_size);
            imageops::overlay(
                &mut sheet,
                &img,
                i64::from(c as u32 * cell),
                i64::from(r as u32 * cell),
            );
        }
        for c in 0..b.n_local {
            let img = crop_img(&b.local_crops, c * bsz + r, b.local_size);
            let img = imageops::resize(&img, cell, cell, imageops::FilterType::Nearest);
            imageops::overlay(
                &mut sheet,
                &img,
                i64::from((2 + c as u32) * cell),
                i64::from(r as u32 * cell),
            );
        }
    }
    sheet.save(out)?;
    println!(
        "wrote {out}: {bsz} images x (2 global + {} local) crops",
        b.n_local
    );
    Ok(())
}
