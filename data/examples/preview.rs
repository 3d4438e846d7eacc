//! Writes a contact sheet of a source's first samples (image, and label map when there is one) to a
//! PNG, to look at what a spec yields.
//!
//! `cargo run -p data --release --example preview -- SPEC OUT.png [N]`

use image::{imageops, Rgb, RgbImage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec: data::SourceSpec = args.first().map_or("synthetic", String::as_str).parse()?;
    let out = args.get(1).map_or("preview.png", String::as_str);
    let n: u64 = args.get(2).map_or(Ok(16), |s| s.parse())?;
    let source = spec.open()?;
    let n = n.min(source.len().unwrap_or(n));
    let cell = 128u32;
    let cols = 4u32;
    let rows = (n as u32).div_ceil(cols);
    let mut sheet = RgbImage::from_pixel(cols * cell * 2, rows * cell, Rgb([40, 40, 40]));
    let palette = |v: u8| -> Rgb<u8> {
        if v == 0 {
            return Rgb([0, 0, 0]);
        }
        let h = f64::from(v - 1) * 0.618_033_988_75 % 1.0;
        let c = |o: f64| ((((h + o) * 6.0) % 6.0 - 3.0).abs() - 1.0).clamp(0.0, 1.0);
        Rgb([
            (c(0.0) * 255.0) as u8,
            (c(2.0 / 3.0) * 255.0) as u8,
            (c(1.0 / 3.0) * 255.0) as u8,
        ])
    };
    for i in 0..n {
        let s = match source.get(i) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let (x, y) = ((i as u32 % cols) * cell * 2, (i as u32 / cols) * cell);
        let img = imageops::resize(&s.image, cell, cell, imageops::FilterType::Triangle);
        imageops::replace(&mut sheet, &img, i64::from(x), i64::from(y));
        if let Some(lm) = &s.label_map {
            let map = RgbImage::from_fn(lm.width, lm.height, |px, py| palette(lm.get(px, py)));
            let map = imageops::resize(&map, cell, cell, imageops::FilterType::Nearest);
            imageops::replace(&mut sheet, &map, i64::from(x + cell), i64::from(y));
        }
        let names = source.class_names();
        let label = s.label.map(|l| {
            names
                .get(l as usize)
                .cloned()
                .unwrap_or_else(|| l.to_string())
        });
        println!(
            "{i}: {} label {}",
            s.id,
            label.unwrap_or_else(|| "-".into())
        );
    }
    sheet.save(out)?;
    println!("wrote {out} ({})", source.describe());
    Ok(())
}
