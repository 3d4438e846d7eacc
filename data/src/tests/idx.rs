//! IDX parsing on files written here (plain and gzipped), its errors, and the real Fashion-MNIST
//! when the Debian package is installed.

use std::io::Write;
use std::path::Path;

use crate::{DataError, IdxSource, Source, SourceSpec, Split};

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

fn write(path: &Path, bytes: &[u8], gz: bool) {
    if gz {
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(path).expect("create"),
            flate2::Compression::fast(),
        );
        enc.write_all(bytes).expect("write");
        enc.finish().expect("finish");
    } else {
        std::fs::write(path, bytes).expect("write");
    }
}

#[test]
fn idx_images_and_labels_plain_and_gzipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 3 images of 4 rows x 5 cols; pixel value = 100 * image + 10 * row + col.
    let pixels: Vec<u8> = (0..3u8)
        .flat_map(|i| (0..4u8).flat_map(move |r| (0..5u8).map(move |c| 100 * i + 10 * r + c)))
        .collect();
    for (gz, suffix) in [(false, ""), (true, ".gz")] {
        let sub = dir.path().join(if gz { "gz" } else { "plain" });
        std::fs::create_dir_all(&sub).expect("mkdir");
        write(
            &sub.join(format!("train-images-idx3-ubyte{suffix}")),
            &idx_bytes(&[3, 4, 5], &pixels),
            gz,
        );
        write(
            &sub.join(format!("train-labels-idx1-ubyte{suffix}")),
            &idx_bytes(&[3], &[2, 0, 1]),
            gz,
        );
        write(
            &sub.join(format!("t10k-images-idx3-ubyte{suffix}")),
            &idx_bytes(&[1, 4, 5], &pixels[..20]),
            gz,
        );
        let src = IdxSource::open(&sub, Split::Train).expect("open");
        assert_eq!(src.len(), Some(3));
        let s = src.get(2).expect("sample");
        assert_eq!(s.image.dimensions(), (5, 4));
        assert_eq!(
            s.image.get_pixel(3, 1).0,
            [213, 213, 213],
            "grey replicated, row-major"
        );
        assert_eq!(s.label, Some(1));
        assert_eq!(s.id, "train/2");
        assert_eq!(src.class_names(), ["0", "1", "2"]);
        let test = SourceSpec::Idx {
            path: sub.clone(),
            split: Split::Test,
        }
        .open()
        .expect("test split");
        assert_eq!(test.len(), Some(1));
        assert_eq!(
            test.get(0).expect("sample").label,
            None,
            "no labels file for the test split"
        );
        assert!(matches!(
            src.get(3),
            Err(DataError::IndexOutOfRange {
                index: 3,
                len: 3,
                ..
            })
        ));
        // A single images file finds its labels file.
        let single = IdxSource::open(
            &sub.join(format!("train-images-idx3-ubyte{suffix}")),
            Split::Test,
        )
        .expect("file");
        assert_eq!(single.get(0).expect("sample").label, Some(2));
    }
    // RGB IDX: [n, rows, cols, 3].
    let rgb = dir.path().join("rgb-images-idx3-ubyte");
    write(&rgb, &idx_bytes(&[1, 1, 2, 3], &[1, 2, 3, 4, 5, 6]), false);
    let s = IdxSource::open(&rgb, Split::Train)
        .expect("rgb")
        .get(0)
        .expect("sample");
    assert_eq!(s.image.as_raw(), &vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn malformed_idx_files_are_format_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("magic", vec![1, 2, 3, 4, 0, 0], "bad magic"),
        (
            "dtype",
            vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0],
            "element type 0x0d",
        ),
        (
            "short",
            idx_bytes(&[2, 2, 2], &[0; 7]),
            "need 8 data bytes, the file has 7",
        ),
        (
            "dims",
            idx_bytes(&[2, 2], &[0; 4]),
            "must be [n, rows, cols]",
        ),
        ("header", vec![0, 0, 8, 3, 0, 0], "header truncated"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        let err = IdxSource::open(&path, Split::Train).expect_err(name);
        assert!(
            matches!(&err, DataError::Format { path: p, .. } if *p == path),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
    std::fs::write(
        dir.path().join("l-images-idx3-ubyte"),
        idx_bytes(&[2, 1, 1], &[0, 0]),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("l-labels-idx1-ubyte"),
        idx_bytes(&[3], &[0, 0, 0]),
    )
    .expect("write");
    let err = IdxSource::open(&dir.path().join("l-images-idx3-ubyte"), Split::Train)
        .expect_err("count mismatch");
    assert!(err.to_string().contains("expected [2]"), "{err}");
    let err = IdxSource::open(dir.path(), Split::Train).expect_err("no standard names");
    assert!(matches!(err, DataError::NoReadableImages { .. }), "{err}");
}

#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").exists() {
        eprintln!("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or scripts/fetch-real-data.sh): skipped");
        return;
    }
    let train = SourceSpec::Idx {
        path: dir.to_path_buf(),
        split: Split::Train,
    }
    .open()
    .expect("train");
    let test = SourceSpec::Idx {
        path: dir.to_path_buf(),
        split: Split::Test,
    }
    .open()
    .expect("test");
    assert_eq!((train.len(), test.len()), (Some(60_000), Some(10_000)));
    assert_eq!(train.n_classes(), Some(10));
    assert_eq!(train.class_names()[9], "Ankle boot");
    let mut counts = [0usize; 10];
    for i in 0..10_000 {
        counts[test.get(i).expect("sample").label.expect("label") as usize] += 1;
    }
    assert_eq!(counts, [1000; 10], "t10k has 1000 images per class");
    let s = train.get(0).expect("sample");
    assert_eq!(s.image.dimensions(), (28, 28));
    assert_eq!(
        s.label,
        Some(9),
        "the first Fashion-MNIST training image is an ankle boot"
    );
}
