//! The copy-paste segmentation builder: deterministic, split by cut-out file, exact label maps that
//! agree with the recorded geometry, readable back as a source; and on the real photos when fetched.

use std::collections::HashSet;
use std::path::Path;

use image::{Rgba, RgbaImage};

use super::util::{pattern_image, write_jpeg, write_png};
use crate::source::copypaste::resize_rgba;
use crate::{build_copy_paste, CopyPasteConfig, CopyPasteSource, Source, SourceSpec, Split};

/// A disc cut-out with noisy colours (many distinct opaque colours) and a soft transparent border.
fn stamp(seed: u32, w: u32, h: u32) -> RgbaImage {
    RgbaImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (
            f64::from(x) / f64::from(w) - 0.5,
            f64::from(y) / f64::from(h) - 0.5,
        );
        let r = (dx * dx + dy * dy).sqrt();
        let a = ((0.45 - r) * 20.0 * 255.0).clamp(0.0, 255.0) as u8;
        let n = x
            .wrapping_mul(7919)
            .wrapping_add(y.wrapping_mul(104_729))
            .wrapping_add(seed * 31);
        Rgba([
            (n % 256) as u8,
            ((n / 3) % 256) as u8,
            ((seed * 60 + x) % 256) as u8,
            a,
        ])
    })
}

fn make_inputs(root: &Path) {
    let classes = [
        ("animals/birds", 4),
        ("food/fruit", 3),
        ("plants/flowers", 3),
        ("tools/hammers", 1),
    ];
    for (c, (class, n)) in classes.iter().enumerate() {
        for k in 0..*n {
            let path = root.join("stamps").join(class).join(format!("s{k}.png"));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            write_png(
                &path,
                &stamp((c * 10 + k) as u32, 40 + 7 * k as u32, 36 + 5 * c as u32),
            );
        }
    }
    // Clip-art folders and files above the class level are ignored.
    let cartoon = root.join("stamps/animals/birds/cartoon/c.png");
    std::fs::create_dir_all(cartoon.parent().expect("parent")).expect("mkdir");
    write_png(&cartoon, &stamp(99, 40, 40));
    write_png(&root.join("stamps/animals/top.png"), &stamp(98, 40, 40));
    std::fs::create_dir_all(root.join("bg")).expect("mkdir");
    write_jpeg(&root.join("bg/one.jpg"), &pattern_image(200, 150, 1));
    write_jpeg(&root.join("bg/two.jpg"), &pattern_image(160, 220, 2));
}

fn small_cfg() -> CopyPasteConfig {
    CopyPasteConfig {
        size: 64,
        n_train: 12,
        n_test: 6,
        min_unique_colors: 50,
        min_stamps_per_class: 2,
        n_threads: 2,
        ..Default::default()
    }
}

#[test]
fn builds_deterministically_with_disjoint_cutouts_per_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_inputs(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let stamps = dir.path().join("stamps");
    let bg = dir.path().join("bg");
    let ma = build_copy_paste(&stamps, &bg, &a, &small_cfg()).expect("build a");
    let mb = build_copy_paste(
        &stamps,
        &bg,
        &b,
        &CopyPasteConfig {
            n_threads: 1,
            ..small_cfg()
        },
    )
    .expect("build b");
    assert_eq!(ma.train, mb.train);
    assert_eq!(ma.test, mb.test);
    for e in ma.train.iter().chain(&ma.test) {
        assert_eq!(
            std::fs::read(a.join(&e.image)).expect("a"),
            std::fs::read(b.join(&e.image)).expect("b"),
            "{}",
            e.id
        );
        assert_eq!(
            std::fs::read(a.join(&e.label_map)).expect("a"),
            std::fs::read(b.join(&e.label_map)).expect("b")
        );
    }
    assert_eq!(
        ma.classes,
        vec!["animals/birds", "food/fruit", "plants/flowers"],
        "classes with too few cut-outs dropped"
    );
    for c in 0..ma.classes.len() {
        let train: HashSet<&String> = ma.train_stamps[c].iter().collect();
        assert!(!train.is_empty() && !ma.test_stamps[c].is_empty());
        assert!(
            ma.test_stamps[c].iter().all(|s| !train.contains(s)),
            "class {c} shares cut-outs"
        );
    }
    let test_stamps: HashSet<&String> = ma.test_stamps.iter().flatten().collect();
    for e in &ma.test {
        assert!(
            e.objects.iter().all(|o| test_stamps.contains(&o.stamp)),
            "{} uses a train cut-out",
            e.id
        );
        assert!(e
            .objects
            .iter()
            .all(|o| !o.stamp.contains("cartoon") && o.stamp != "animals/top.png"));
    }
}

#[test]
fn label_maps_are_exact_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_inputs(dir.path());
    let out = dir.path().join("set");
    let m = build_copy_paste(
        &dir.path().join("stamps"),
        &dir.path().join("bg"),
        &out,
        &small_cfg(),
    )
    .expect("build");
    let src = SourceSpec::CopyPaste {
        path: out.clone(),
        split: Split::Train,
    }
    .open()
    .expect("open");
    assert_eq!(src.len(), Some(12));
    assert_eq!(src.n_classes(), Some(3));
    assert!(src.has_label_maps());
    for (i, e) in m.train.iter().enumerate() {
        let s = src.get(i as u64).expect("sample");
        let lm = s.label_map.expect("label map");
        assert_eq!((lm.width, lm.height), (64, 64));
        assert_eq!(s.label, Some(e.label));
        // Rebuild the label map from the recorded geometry and the cut-out files.
        let mut want = vec![0u8; 64 * 64];
        let mut owner = vec![usize::MAX; 64 * 64];
        for (k, o) in e.objects.iter().enumerate() {
            let full = image::open(dir.path().join("stamps").join(&o.stamp))
                .expect("stamp")
                .to_rgba8();
            let trimmed = trim(&full);
            let pasted = resize_rgba(&trimmed, o.width, o.height);
            for y in 0..o.height as i64 {
                for x in 0..o.width as i64 {
                    let (cx, cy) = (o.left + x, o.top + y);
                    if !(0..64).contains(&cx) || !(0..64).contains(&cy) {
                        continue;
                    }
                    let sx = if o.flipped { o.width as i64 - 1 - x } else { x };
                    if pasted.get_pixel(sx as u32, y as u32)[3] > 127 {
                        want[(cy * 64 + cx) as usize] = o.class as u8 + 1;
                        owner[(cy * 64 + cx) as usize] = k;
                    }
                }
            }
        }
        assert_eq!(lm.data, want, "{}", e.id);
        for (k, o) in e.objects.iter().enumerate() {
            assert_eq!(
                o.visible_pixels,
                owner.iter().filter(|&&w| w == k).count() as u64
            );
        }
        let best = e
            .objects
            .iter()
            .map(|o| o.visible_pixels)
            .max()
            .expect("objects");
        assert!(e
            .objects
            .iter()
            .any(|o| o.visible_pixels == best && o.class == e.label));
    }
    let test = CopyPasteSource::open(&out, Split::Test).expect("test split");
    assert_eq!(test.len(), Some(6));
    assert!(test.describe().contains("test split"));
}

fn trim(img: &RgbaImage) -> RgbaImage {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p[3] > 127 {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    image::imageops::crop_imm(img, x0, y0, x1 - x0, y1 - y0).to_image()
}

#[test]
fn builds_from_the_real_tux_paint_photos_when_fetched() {
    let real = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cache/dinod/real"))
        .filter(|p| p.join("stamps").is_dir());
    let Some(real) = real else {
        eprintln!("real photos not fetched (scripts/fetch-real-data.sh): skipped");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = CopyPasteConfig {
        size: 96,
        n_train: 8,
        n_test: 4,
        ..Default::default()
    };
    let m = build_copy_paste(
        &real.join("stamps"),
        &real.join("backgrounds"),
        dir.path(),
        &cfg,
    )
    .expect("build");
    assert!(m.classes.len() >= 5, "photo-like classes: {:?}", m.classes);
    assert!(
        m.classes.iter().any(|c| c == "animals/birds"),
        "{:?}",
        m.classes
    );
    assert!(m.backgrounds.len() >= 30);
    let src = CopyPasteSource::open(dir.path(), Split::Test).expect("open");
    let s = src.get(0).expect("sample");
    assert!(s.label_map.expect("map").data.iter().any(|&v| v > 0));
}
