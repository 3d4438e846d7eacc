//! Real broken files in a real folder: each is converted correctly or skipped with its reason, the
//! loader substitutes deterministically and reports each file once, and a source with no readable
//! image stops with an error naming its path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{GrayImage, ImageBuffer, LumaA, Rgb, Rgba};

use super::util::{pattern_image, small_opts, write_jpeg, write_png};
use crate::{
    decode_rgb, scan, BadReason, Cursor, DataError, FolderSource, Loader, ScanOptions, Source,
    SourceSpec,
};

/// A PNG whose header announces `w x h` RGB pixels, with a valid CRC, followed by a token IDAT.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn cmyk_jpeg(w: u16, h: u16, cmyk: [u8; 4]) -> Vec<u8> {
    let data: Vec<u8> = (0..usize::from(w) * usize::from(h))
        .flat_map(|_| cmyk)
        .collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 95)
        .encode(&data, w, h, jpeg_encoder::ColorType::Cmyk)
        .expect("encode cmyk");
    out
}

type ReasonCheck = fn(&BadReason) -> bool;

struct Folder {
    _dir: tempfile::TempDir,
    root: PathBuf,
    good: Vec<&'static str>,
    bad: Vec<(&'static str, ReasonCheck)>,
}

fn build_folder() -> Folder {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("photos");
    std::fs::create_dir_all(root.join("nested/deeper")).expect("mkdir");
    let p = |name: &str| root.join(name);
    let img = pattern_image(64, 48, 1);
    write_jpeg(&p("a_good.jpg"), &img);
    write_png(&p("b_good.png"), &pattern_image(40, 40, 2));
    write_jpeg(&p("nested/c_good.JPEG"), &pattern_image(70, 50, 3));
    write_png(
        &p("nested/deeper/d_gray.png"),
        &GrayImage::from_fn(30, 20, |x, y| image::Luma([(x * 8 + y) as u8])),
    );
    write_png(
        &p("e_rgba.png"),
        &ImageBuffer::from_fn(20, 20, |x, _| {
            Rgba([0u8, 0, 255, if x < 10 { 0 } else { 255 }])
        }),
    );
    write_png(
        &p("f_16bit.png"),
        &ImageBuffer::from_fn(16, 16, |_, _| Rgb([0x8080u16, 0xffff, 0x0000])),
    );
    write_png(
        &p("g_gray_alpha.png"),
        &ImageBuffer::from_fn(12, 12, |_, _| LumaA([100u8, 255])),
    );
    std::fs::write(p("h_cmyk.jpg"), cmyk_jpeg(16, 16, [0, 255, 255, 0])).expect("write");
    let mut gray_jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut gray_jpeg)
        .encode_image(&GrayImage::from_pixel(16, 16, image::Luma([77])))
        .expect("encode");
    std::fs::write(p("i_gray.jpg"), gray_jpeg).expect("write");

    // Broken files.
    let mut full = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut full, 90)
        .encode_image(&pattern_image(96, 96, 9))
        .expect("encode");
    std::fs::write(p("v_truncated.jpg"), &full[..full.len() * 6 / 10]).expect("write");
    std::fs::write(
        p("w_garbage.png"),
        (0..500u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .expect("write");
    std::fs::write(p("x_empty.jpg"), b"").expect("write");
    std::fs::write(p("nested/y_text.jpg"), b"this is not a picture\n").expect("write");
    std::fs::write(p("z_huge.png"), png_header_only(60_000, 60_000)).expect("write");
    std::fs::write(p("u_gif_named.png"), b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").expect("write");
    let mut png = Vec::new();
    pattern_image(64, 64, 4)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encode");
    let mid = png.len() / 2;
    for b in &mut png[mid..mid + 40] {
        *b ^= 0x5a;
    }
    std::fs::write(p("t_corrupt.png"), png).expect("write");
    std::fs::write(p("s_picture.bmp"), b"BM not decoded here").expect("write");
    std::fs::write(p("README.txt"), b"ignored").expect("write");
    std::fs::write(p(".hidden.jpg"), b"ignored").expect("write");
    Folder {
        _dir: dir,
        root,
        good: vec![
            "a_good.jpg",
            "b_good.png",
            "nested/c_good.JPEG",
            "nested/deeper/d_gray.png",
            "e_rgba.png",
            "f_16bit.png",
            "g_gray_alpha.png",
            "h_cmyk.jpg",
            "i_gray.jpg",
        ],
        bad: vec![
            ("v_truncated.jpg", |r| matches!(r, BadReason::Corrupt(_))),
            ("w_garbage.png", |r| *r == BadReason::NotAnImage),
            ("x_empty.jpg", |r| *r == BadReason::Empty),
            ("nested/y_text.jpg", |r| *r == BadReason::NotAnImage),
            ("z_huge.png", |r| {
                matches!(
                    r,
                    BadReason::TooLarge {
                        width: 60_000,
                        height: 60_000,
                        ..
                    }
                )
            }),
            (
                "u_gif_named.png",
                |r| matches!(r, BadReason::Unsupported(f) if f == "Gif"),
            ),
            ("t_corrupt.png", |r| matches!(r, BadReason::Corrupt(_))),
        ],
    }
}

fn decode_file(path: &Path) -> Result<image::RgbImage, BadReason> {
    decode_rgb(
        &std::fs::read(path).expect("read"),
        crate::DEFAULT_PIXEL_LIMIT,
    )
}

#[test]
fn odd_colour_types_are_converted_to_rgb8() {
    let f = build_folder();
    let px = |name: &str, x, y| *decode_file(&f.root.join(name)).expect(name).get_pixel(x, y);
    let gray = px("nested/deeper/d_gray.png", 3, 2);
    assert_eq!(gray, Rgb([26, 26, 26]), "grey replicated");
    assert_eq!(
        px("e_rgba.png", 2, 5),
        Rgb([255, 255, 255]),
        "transparent over white"
    );
    assert_eq!(px("e_rgba.png", 15, 5), Rgb([0, 0, 255]), "opaque kept");
    assert_eq!(
        px("f_16bit.png", 4, 4),
        Rgb([128, 255, 0]),
        "16-bit rounded to 8-bit"
    );
    assert_eq!(px("g_gray_alpha.png", 1, 1), Rgb([100, 100, 100]));
    let cmyk = px("h_cmyk.jpg", 8, 8);
    assert!(
        cmyk[0] > 200 && cmyk[1] < 60 && cmyk[2] < 60,
        "CMYK (0, 255, 255, 0) is red, got {cmyk:?}"
    );
    let g = px("i_gray.jpg", 5, 5);
    assert!(
        g[0] == g[1] && g[1] == g[2] && g[0].abs_diff(77) <= 2,
        "{g:?}"
    );
}

#[test]
fn each_broken_file_is_rejected_with_its_reason() {
    let f = build_folder();
    for (name, ok) in &f.bad {
        let reason = decode_file(&f.root.join(name)).expect_err(name);
        assert!(ok(&reason), "{name}: unexpected reason {reason}");
    }
    // The huge image is refused from its header alone, before any allocation.
    assert_eq!(
        crate::probe_dimensions(&png_header_only(60_000, 60_000)),
        Ok((60_000, 60_000))
    );
}

#[test]
fn folder_listing_is_sorted_recursive_and_reports_unsupported_files() {
    let f = build_folder();
    let src = FolderSource::open(&f.root).expect("open");
    assert_eq!(src.len(), Some((f.good.len() + f.bad.len()) as u64));
    let ids: Vec<String> = (0..src.len().unwrap_or(0))
        .map(|i| {
            src.path(i)
                .expect("path")
                .strip_prefix(&f.root)
                .expect("rel")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert!(!ids
        .iter()
        .any(|i| i.contains("hidden") || i.ends_with(".txt") || i.ends_with(".bmp")));
    assert_eq!(src.rejected().len(), 1);
    assert!(matches!(&src.rejected()[0].reason, BadReason::Unsupported(s) if s == ".bmp file"));
    assert_eq!(
        src.n_classes(),
        None,
        "images at the root: no ImageFolder labels"
    );
}

#[test]
fn scan_lists_every_bad_file_with_its_reason() {
    let f = build_folder();
    let report = scan(
        &SourceSpec::Folder(f.root.clone()),
        &ScanOptions {
            n_workers: 2,
            ..ScanOptions::default()
        },
    )
    .expect("scan");
    assert_eq!(report.readable, f.good.len() as u64);
    assert_eq!(report.bad.len(), f.bad.len() + 1, "{report}");
    for (name, ok) in &f.bad {
        let b = report
            .bad
            .iter()
            .find(|b| b.path == f.root.join(name))
            .unwrap_or_else(|| panic!("{name} not reported"));
        assert!(ok(&b.reason), "{name}: {}", b.reason);
    }
    assert!(!report.is_clean());
    let text = report.to_string();
    assert!(
        text.contains("z_huge.png: too large: 60000x60000"),
        "{text}"
    );
    assert!(text.contains("x_empty.jpg: empty file"), "{text}");
    assert_eq!(report.min_size, Some((12, 12)));
    assert_eq!(report.max_size, Some((70, 50)));
}

#[test]
fn loader_skips_bad_files_deterministically_and_reports_each_once() {
    let f = build_folder();
    let src: Arc<dyn Source> = Arc::new(FolderSource::open(&f.root).expect("open"));
    let n = src.len().expect("finite");
    let bad_paths: HashSet<PathBuf> = f.bad.iter().map(|(name, _)| f.root.join(name)).collect();
    let mut outputs = Vec::new();
    for workers in [1, 3] {
        let mut loader = Loader::new(Arc::clone(&src), small_opts(4, workers), Cursor::default())
            .expect("loader");
        let mut reported = Vec::new();
        let mut batches = Vec::new();
        for _ in 0..(3 * n as usize).div_ceil(4) {
            let b = loader.next_batch().expect("batch");
            for id in &b.sample_ids {
                assert!(
                    !bad_paths.contains(&f.root.join(id)),
                    "bad file {id} was used"
                );
            }
            reported.extend(b.bad_inputs.iter().map(|x| x.path.clone()));
            batches.push(b);
        }
        let unique: HashSet<PathBuf> = reported.iter().cloned().collect();
        assert_eq!(reported.len(), unique.len(), "each bad file reported once");
        assert_eq!(unique, bad_paths);
        assert_eq!(loader.n_bad(), f.bad.len());
        assert!(loader.n_substituted() >= f.bad.len() as u64);
        outputs.push(batches);
    }
    assert!(
        outputs[0] == outputs[1],
        "same batches with 1 and 3 workers"
    );
    // members loading their own parts substitute the same neighbours for the bad files
    for rank in 0..2 {
        let mut opts = small_opts(4, 2);
        opts.part = Some(crate::Part { rank, world: 2 });
        let mut loader = Loader::new(Arc::clone(&src), opts, Cursor::default()).expect("loader");
        for whole in &outputs[0] {
            let part = loader.next_batch().expect("part");
            assert!(
                super::util::part_of(whole, rank, 2) == super::util::without_bad_inputs(part),
                "batch {} of member {rank}",
                whole.batch_index
            );
        }
    }
}

#[test]
fn a_source_without_readable_images_stops_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("all_bad");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("a.jpg"), b"").expect("write");
    std::fs::write(root.join("b.png"), b"not a png").expect("write");
    let src: Arc<dyn Source> = Arc::new(FolderSource::open(&root).expect("lists two candidates"));
    let mut loader = Loader::new(src, small_opts(2, 2), Cursor::default()).expect("loader");
    let err = loader.next_batch().expect_err("nothing readable");
    assert!(
        matches!(&err, DataError::NoReadableImages { path, .. } if *path == root),
        "{err}"
    );
    assert!(
        err.to_string().contains("all_bad") && err.to_string().contains("unreadable"),
        "{err}"
    );

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    std::fs::write(empty.join("notes.txt"), b"x").expect("write");
    let err = FolderSource::open(&empty).expect_err("no candidates");
    assert!(
        matches!(&err, DataError::NoReadableImages { path, .. } if *path == empty),
        "{err}"
    );
    let missing = dir.path().join("missing");
    let err = FolderSource::open(&missing).expect_err("missing");
    assert!(
        matches!(&err, DataError::Io { path, .. } if *path == missing),
        "{err}"
    );
}

#[test]
fn a_limited_scan_is_spread_over_the_source_and_reaches_its_last_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..10 {
        write_png(
            &dir.path().join(format!("{i:02}.png")),
            &pattern_image(20, 16, i),
        );
    }
    // sorts last: a scan of the first samples would never read it
    std::fs::write(dir.path().join("99_broken.jpg"), b"not a jpeg").expect("write");
    let spec = SourceSpec::Folder(dir.path().to_path_buf());
    let report = |max| {
        scan(
            &spec,
            &ScanOptions {
                max_images: max,
                n_workers: 2,
                ..ScanOptions::default()
            },
        )
        .expect("scan")
    };
    let some = report(Some(3));
    assert_eq!(
        (some.scanned, some.readable, some.spread),
        (3, 2, true),
        "{some}"
    );
    assert_eq!(some.bad.len(), 1, "{some}");
    assert!(some.bad[0].path.ends_with("99_broken.jpg"), "{some}");
    assert!(
        some.to_string().contains("spread evenly over the source"),
        "{some}"
    );
    let all = report(None);
    assert_eq!(
        (all.scanned, all.readable, all.spread),
        (11, 10, false),
        "{all}"
    );
    let more = report(Some(50));
    assert_eq!((more.scanned, more.spread), (11, false), "{more}");
    let one = report(Some(1));
    assert_eq!((one.scanned, one.readable), (1, 1), "{one}");
}
