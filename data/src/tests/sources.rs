//! Sources: procedural scenes (exact label maps, learnable classes), ImageFolder labels.

use std::f64::consts::PI;

use super::util::{pattern_image, write_jpeg, write_png};
use crate::source::synthetic::inside;
use crate::{FolderSource, Source, SourceSpec, SyntheticConfig, SyntheticScenes, SHAPE_CLASSES};

fn rgb_to_hsv(p: [u8; 3]) -> (f64, f64, f64) {
    let [r, g, b] = p.map(|v| f64::from(v) / 255.0);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let c = max - min;
    let h = if c == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / c).rem_euclid(6.0)
    } else if max == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    } / 6.0;
    (h, if max == 0.0 { 0.0 } else { c / max }, max)
}

#[test]
fn synthetic_scenes_are_pure_functions_of_seed_and_index() {
    let src = SyntheticScenes::new(SyntheticConfig {
        size: 64,
        ..Default::default()
    });
    let a = src.get(17).expect("scene");
    let b = src.get(17).expect("scene");
    assert_eq!(a.image, b.image);
    assert_eq!(a.label_map, b.label_map);
    assert_ne!(a.image, src.get(18).expect("scene").image);
    let other = SyntheticScenes::new(SyntheticConfig {
        seed: 1,
        size: 64,
        ..Default::default()
    });
    assert_ne!(a.image, other.get(17).expect("scene").image);
    assert_eq!(a.image.dimensions(), (64, 64));
    assert_eq!(src.n_classes(), Some(SHAPE_CLASSES.len()));
    assert!(src.has_label_maps());
}

#[test]
fn synthetic_label_maps_match_the_pixels() {
    // Objects are saturated with a class-tied hue; the background is muted. If the label map were
    // shifted, transposed or stale, labelled pixels would not carry their class hue.
    let src = SyntheticScenes::new(SyntheticConfig {
        size: 64,
        ..Default::default()
    });
    let (mut obj_ok, mut obj_total, mut bg_ok, mut bg_total) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..60 {
        let s = src.get(i).expect("scene");
        let lm = s.label_map.expect("map");
        for (x, y, p) in s.image.enumerate_pixels() {
            let (h, sat, _) = rgb_to_hsv(p.0);
            match lm.get(x, y) {
                0 => {
                    bg_total += 1;
                    bg_ok += usize::from(sat < 0.42);
                }
                l => {
                    obj_total += 1;
                    let want = f64::from(l - 1) / SHAPE_CLASSES.len() as f64;
                    let d = (h - want).rem_euclid(1.0);
                    obj_ok += usize::from(d.min(1.0 - d) < 0.07 && sat > 0.3);
                }
            }
        }
    }
    assert!(
        obj_ok as f64 / obj_total as f64 > 0.97,
        "object pixels with their class hue: {obj_ok}/{obj_total}"
    );
    assert!(
        bg_ok as f64 / bg_total as f64 > 0.97,
        "muted background pixels: {bg_ok}/{bg_total}"
    );
}

#[test]
fn synthetic_labels_are_balanced_and_the_largest_object_wins() {
    let src = SyntheticScenes::new(SyntheticConfig {
        size: 48,
        ..Default::default()
    });
    let mut counts = [0usize; 8];
    for i in 0..400 {
        let s = src.get(i).expect("scene");
        let label = s.label.expect("label") as usize;
        counts[label] += 1;
        // The image label is the class of the largest visible object, so its class covers at least
        // as much as... at least some pixels, and usually the most.
        let lm = s.label_map.expect("map");
        assert!(
            lm.data.iter().any(|&v| v as usize == label + 1),
            "scene {i}: label class not visible"
        );
    }
    assert!(counts.iter().all(|&c| c > 25), "class counts {counts:?}");
}

#[test]
fn shape_tests_agree_with_polygon_and_circle_references() {
    fn in_polygon(pts: &[(f64, f64)], u: f64, v: f64) -> bool {
        let mut inside = false;
        let n = pts.len();
        for i in 0..n {
            let (a, b) = (pts[i], pts[(i + n - 1) % n]);
            if (a.1 > v) != (b.1 > v) && u < (b.0 - a.0) * (v - a.1) / (b.1 - a.1) + a.0 {
                inside = !inside;
            }
        }
        inside
    }
    let star: Vec<(f64, f64)> = (0..10)
        .map(|k| {
            let r = if k % 2 == 0 { 1.0 } else { 0.45 };
            let a = k as f64 * PI / 5.0;
            (r * a.cos(), r * a.sin())
        })
        .collect();
    let s3 = 3f64.sqrt();
    let triangle = [(0.0, 1.0), (-s3 / 2.0, -0.5), (s3 / 2.0, -0.5)];
    let square = [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)];
    let bar = [(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)];
    let cross = [
        (-0.3, -0.95),
        (0.3, -0.95),
        (0.3, -0.3),
        (0.95, -0.3),
        (0.95, 0.3),
        (0.3, 0.3),
        (0.3, 0.95),
        (-0.3, 0.95),
        (-0.3, 0.3),
        (-0.95, 0.3),
        (-0.95, -0.3),
        (-0.3, -0.3),
    ];
    let mut mismatches = [0usize; 8];
    let steps = 181;
    for i in 0..steps {
        for j in 0..steps {
            // Offsets avoid sampling exactly on edges, where the two tests may round differently.
            let u = -1.1 + 2.2 * (i as f64 + 0.37) / steps as f64;
            let v = -1.1 + 2.2 * (j as f64 + 0.61) / steps as f64;
            let r2 = u * u + v * v;
            let want = [
                r2 <= 1.0,
                in_polygon(&square, u, v),
                in_polygon(&triangle, u, v),
                (0.55 * 0.55..=1.0).contains(&r2),
                in_polygon(&star, u, v),
                in_polygon(&cross, u, v),
                r2 <= 1.0 && (u - 0.45).powi(2) + v * v > 0.64,
                in_polygon(&bar, u, v),
            ];
            for class in 0..8 {
                mismatches[class] += usize::from(inside(class, u, v) != want[class]);
            }
        }
    }
    assert_eq!(
        mismatches, [0; 8],
        "per-class disagreements with the references"
    );
}

#[test]
fn image_folder_layout_gives_sorted_class_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    for (k, (class, name)) in [
        ("dog", "b.jpg"),
        ("cat", "z.png"),
        ("dog", "sub/a.jpg"),
        ("cat", "a.jpg"),
        ("emu", "q.webp.jpg"),
    ]
    .iter()
    .enumerate()
    {
        let path = root.join(class).join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        if name.ends_with(".png") {
            write_png(&path, &pattern_image(20, 16, k as u32));
        } else {
            write_jpeg(&path, &pattern_image(20, 16, k as u32));
        }
    }
    let src = SourceSpec::Folder(root.to_path_buf()).open().expect("open");
    assert_eq!(src.class_names(), ["cat", "dog", "emu"]);
    assert_eq!(src.n_classes(), Some(3));
    let got: Vec<(String, Option<u32>)> = (0..src.len().expect("finite"))
        .map(|i| src.get(i).map(|s| (s.id, s.label)).expect("sample"))
        .collect();
    assert_eq!(
        got,
        vec![
            ("cat/a.jpg".to_string(), Some(0)),
            ("cat/z.png".to_string(), Some(0)),
            ("dog/b.jpg".to_string(), Some(1)),
            ("dog/sub/a.jpg".to_string(), Some(1)),
            ("emu/q.webp.jpg".to_string(), Some(2)),
        ]
    );
    assert!(src.describe().contains("3 classes"));
    // One sub-folder only is not a labelling.
    let single = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(single.path().join("images")).expect("mkdir");
    write_jpeg(&single.path().join("images/x.jpg"), &pattern_image(8, 8, 0));
    assert_eq!(
        FolderSource::open(single.path()).expect("open").n_classes(),
        None
    );
}

/// The listing's order is a depth-first walk whose entries are sorted as whole paths (the
/// order every run's data cursor counts in), also for names where sorting names and
/// sorting path strings disagree (`a` < `a.b` < `a0` as paths; `a.b/` < `a/` as strings),
/// a name that is not UTF-8, and links: a second link to a folder and a loop are walked
/// once, a dangling link is reported, also when the link and its folder are listed on
/// different threads.
#[test]
fn folder_listing_order_is_the_depth_first_order_of_sorted_paths() {
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let names = ["a", "a.b", "a0", "A", "a b", "a-b", "ü"];
    for d in names.iter().chain(&["a/sub", "a/sub.x", "a.b/a"]) {
        for f in [
            "x.jpg", "X.JPEG", "a.png", "a.b.jpg", "a-b.webp", "ab.jpg", ".h.jpg", "n.txt",
        ] {
            let p = root.join(d).join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, b"").expect("write");
        }
    }
    std::fs::write(
        root.join("a")
            .join(std::ffi::OsStr::from_bytes(b"\xff.jpg")),
        b"",
    )
    .expect("write");
    std::os::unix::fs::symlink("../a.b", root.join("a0/link")).expect("link");
    std::os::unix::fs::symlink("..", root.join("a/sub/loop")).expect("link");
    std::os::unix::fs::symlink("nowhere.jpg", root.join("A/gone.jpg")).expect("link");
    // links across the root's folders, which are listed on different threads: `A` comes
    // first and walks `a0` through its link, so `a0` itself is not walked again; a link
    // back to the root is cut
    std::os::unix::fs::symlink("../a0", root.join("A/fwd")).expect("link");
    std::os::unix::fs::symlink("..", root.join("a.b/up")).expect("link");

    // the definition, written plainly: whole paths sorted, folders walked once
    fn walk(dir: &Path, seen: &mut Vec<PathBuf>, out: &mut Vec<PathBuf>) {
        if !seen.contains(&std::fs::canonicalize(dir).expect("canonical")) {
            seen.push(std::fs::canonicalize(dir).expect("canonical"));
        } else {
            return;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.file_name().expect("name").as_bytes().starts_with(b".") {
                continue;
            }
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => walk(&p, seen, out),
                Ok(m) if m.is_file() => {
                    let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase());
                    if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png" | "webp")) {
                        out.push(p)
                    }
                }
                _ => {}
            }
        }
    }
    let mut want = vec![];
    walk(root, &mut vec![], &mut want);
    let progress = crate::OpenProgress::default();
    let src =
        FolderSource::open_observed(root, crate::config::DEFAULT_PIXEL_LIMIT, Some(&progress))
            .expect("open");
    // the root's folders (7 names), each listed once, whatever the links
    assert_eq!(progress.counts(), (7, 7, 0));
    assert_eq!(progress.describe().unwrap(), "7 of 7 folders listed");
    let got: Vec<PathBuf> = (0..src.len().expect("finite"))
        .map(|i| src.path(i).expect("path"))
        .collect();
    assert_eq!(got, want);
    assert!(got.len() > 50, "{}", got.len());
    assert_eq!(src.rejected().len(), 1, "{:?}", src.rejected());
    assert!(got.iter().any(|p| p.ends_with("A/fwd/x.jpg")));
    assert!(!got.iter().any(|p| p.starts_with(root.join("a0"))));
    // every file sits in a folder: ImageFolder classes, sorted as text (`a.b` and `a0`
    // are walked through `A/fwd` only, so their files are in class `A`)
    assert_eq!(src.class_names(), ["A", "a", "a b", "a-b", "ü"]);
}

/// A sub-folder that cannot be listed (here: deeper than the longest path the system
/// takes) fails the listing with its path, as a one-thread walk does: the threads that
/// list sub-folders hand a failure back to it.
#[test]
fn a_folder_that_cannot_be_listed_fails_the_listing_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    for d in ["a", "b", "c"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
        std::fs::write(root.join(d).join("x.jpg"), b"").expect("write");
    }
    // 25 levels of 200-character names below `b`, made one `cd` at a time
    let name = "d".repeat(200);
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && for i in $(seq 1 25); do mkdir {name} && cd {name} || exit 0; done",
            root.join("b").display()
        ))
        .status()
        .expect("sh");
    assert!(made.success());
    let err = FolderSource::open(root).expect_err("a folder past the longest path");
    let text = err.to_string();
    assert!(
        text.contains(&format!("{}/b/{name}", root.display())),
        "{text}"
    );
}
