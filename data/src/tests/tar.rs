//! Tar shards written by GNU tar, in each format it writes, read as the files they hold;
//! WebDataset samples and labels; damaged and truncated shards.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::util::{pattern_image, write_jpeg, write_png};
use crate::{
    BadReason, DataError, FolderSource, OpenOptions, Source, SourceSpec, TarSource,
    DEFAULT_PIXEL_LIMIT,
};

/// Runs GNU tar in `cwd` (the archives are made by the real tool, not by our own writer).
fn tar(cwd: &Path, args: &[&str]) {
    let out = Command::new("tar")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("GNU tar runs (the tests make their archives with it)");
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open(path: &Path) -> TarSource {
    TarSource::open_with(path, DEFAULT_PIXEL_LIMIT, None).expect("open tar source")
}

/// An ImageFolder of JPEG and PNG files in two classes, one of them at a path longer than
/// a tar header's 100-byte name field (ustar stores it with a prefix, GNU with a long-name
/// entry, pax with a `path` record).
fn image_folder(root: &Path) -> Vec<PathBuf> {
    let deep = format!("dog/deep/{}", "d".repeat(70));
    let mut files = vec![];
    for (i, dir) in ["cat", "cat", "cat", "dog", "dog", &deep]
        .iter()
        .enumerate()
    {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        let img = pattern_image(40 + i as u32, 30, i as u32);
        let name = if i == 5 {
            format!("{dir}/{}.jpg", "n".repeat(40))
        } else if i % 2 == 0 {
            format!("{dir}/{i}.jpg")
        } else {
            format!("{dir}/{i}.png")
        };
        if name.ends_with("jpg") {
            write_jpeg(&root.join(&name), &img);
        } else {
            write_png(&root.join(&name), &img);
        }
        files.push(PathBuf::from(name));
    }
    assert!(files[5].to_string_lossy().len() > 100);
    files
}

fn assert_same_samples(tar: &dyn Source, folder: &dyn Source, shard_of: &dyn Fn(usize) -> String) {
    assert_eq!(tar.len(), folder.len(), "{}", tar.describe());
    assert_eq!(tar.class_names(), folder.class_names());
    for i in 0..folder.len().unwrap() {
        let (t, f) = (tar.get(i).unwrap(), folder.get(i).unwrap());
        assert_eq!(t.image, f.image, "sample {i}");
        assert_eq!(t.label, f.label, "sample {i}");
        assert_eq!(t.id, format!("{}/{}", shard_of(i as usize), f.id));
    }
}

/// A folder packed by `tar --sort=name` reads as the folder does, sample for sample, in
/// every format GNU tar writes; split into shards, it reads the same through a brace range
/// and through a folder of shards.
#[test]
fn a_folder_packed_by_tar_reads_as_the_folder_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    image_folder(&root);
    let folder = FolderSource::open(&root).unwrap();
    assert_eq!(folder.class_names(), ["cat", "dog"]);
    // a second name of one file: tar stores it as a hard link
    std::fs::hard_link(root.join("cat/0.jpg"), root.join("dog/0-again.jpg")).unwrap();
    let folder = FolderSource::open(&root).unwrap();
    for format in ["gnu", "pax", "ustar"] {
        let name = format!("{format}.tar");
        let archive = dir.path().join(&name);
        tar(
            dir.path(),
            &[
                &format!("--format={format}"),
                "--sort=name",
                "-cf",
                &name,
                "-C",
                "in",
                ".",
            ],
        );
        let src = open(&archive);
        assert!(src.rejected().is_empty(), "{format}: {:?}", src.rejected());
        assert!(
            src.describe().contains("2 classes from folders"),
            "{}",
            src.describe()
        );
        assert_same_samples(&src, &folder, &|_| name.clone());
    }
    // one shard per class: a brace range and a folder of shards
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for (k, class) in ["cat", "dog"].iter().enumerate() {
        let out = shards.join(format!("s-{k:02}.tar"));
        tar(&root, &["--sort=name", "-cf", out.to_str().unwrap(), class]);
    }
    let no_cache = OpenOptions {
        index_cache: None,
        ..OpenOptions::default()
    };
    let shard_of = |i: usize| format!("s-{:02}.tar", usize::from(i >= 3));
    let spec: SourceSpec = format!("tar:{}/s-{{00..01}}.tar", shards.display())
        .parse()
        .unwrap();
    assert_same_samples(&*spec.open_with(&no_cache).unwrap(), &folder, &shard_of);
    let spec: SourceSpec = format!("tar:{}", shards.display()).parse().unwrap();
    assert_eq!(spec.to_string(), format!("tar:{}", shards.display()));
    assert_same_samples(&*spec.open_with(&no_cache).unwrap(), &folder, &shard_of);
    // a shard the range names but the disk lacks is an error that names it
    let missing = format!("{}/s-{{00..02}}.tar", shards.display());
    let err = TarSource::open_with(Path::new(&missing), DEFAULT_PIXEL_LIMIT, None).unwrap_err();
    assert!(err.to_string().contains("s-02.tar"), "{err}");
    // a folder without shards
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = TarSource::open_with(&empty, DEFAULT_PIXEL_LIMIT, None).unwrap_err();
    assert!(err.to_string().contains("no .tar file"), "{err}");
}

/// WebDataset samples: consecutive members sharing a key; the image is the `jpg`/`png`/
/// `webp` member (an exact field before a compound one such as `seg.png`), labels come
/// from `cls` members; unsupported images are reported, other fields ignored.
#[test]
fn webdataset_samples_take_their_labels_from_cls_members() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("wds");
    std::fs::create_dir(&w).unwrap();
    let img = |i: u32| pattern_image(32, 24 + i, i);
    write_jpeg(&w.join("000000.jpg"), &img(0));
    std::fs::write(w.join("000000.cls"), "2\n").unwrap();
    std::fs::write(w.join("000000.json"), "{}").unwrap();
    write_png(&w.join("000001.seg.png"), &img(9));
    write_jpeg(&w.join("000001.jpg"), &img(1));
    std::fs::write(w.join("000001.cls"), "0").unwrap();
    write_png(&w.join("000002.seg.png"), &img(2));
    std::fs::write(w.join("000002.cls"), "1").unwrap();
    std::fs::write(w.join("000003.gif"), b"GIF89a").unwrap();
    std::fs::write(w.join("000004.txt"), "a caption without an image").unwrap();
    let members = [
        "000000.jpg",
        "000000.cls",
        "000000.json",
        "000001.seg.png",
        "000001.jpg",
        "000001.cls",
        "000002.seg.png",
        "000002.cls",
        "000003.gif",
        "000004.txt",
    ];
    let mut args = vec!["--format=pax", "-cf", "../w.tar"];
    args.extend(members);
    tar(&w, &args);
    let src = open(&dir.path().join("w.tar"));
    assert_eq!(src.len(), Some(3));
    assert_eq!(src.n_classes(), Some(3));
    assert_eq!(src.class_names(), ["0", "1", "2"]);
    let labels: Vec<_> = (0..3).map(|i| src.get(i).unwrap().label).collect();
    assert_eq!(labels, [Some(2), Some(0), Some(1)]);
    let one = src.get(1).unwrap();
    assert_eq!(one.id, "w.tar/000001.jpg");
    let decoded = |p: &str| {
        crate::decode_rgb(&std::fs::read(w.join(p)).unwrap(), DEFAULT_PIXEL_LIMIT).unwrap()
    };
    assert_eq!(one.image, decoded("000001.jpg"));
    assert_eq!(src.get(2).unwrap().image, img(2));
    assert_eq!(src.rejected().len(), 1, "{:?}", src.rejected());
    assert!(src.rejected()[0].path.ends_with("w.tar/000003.gif"));
    assert!(matches!(
        src.rejected()[0].reason,
        BadReason::Unsupported(_)
    ));
    assert!(
        src.describe().contains("3 classes from cls members"),
        "{}",
        src.describe()
    );
    // the `seg.png` beside sample 1's `jpg` is not read, and says so
    assert!(
        src.describe()
            .contains("; 1 more image member(s) share a sample's key"),
        "{}",
        src.describe()
    );

    // a class member that is not a number: reported, and the source is unlabelled rather
    // than mislabelled
    std::fs::write(w.join("000001.cls"), "tabby").unwrap();
    let mut args = vec!["-cf", "../bad-cls.tar"];
    args.extend(&members[..8]);
    tar(&w, &args);
    let src = open(&dir.path().join("bad-cls.tar"));
    assert_eq!(src.len(), Some(3));
    assert_eq!(src.n_classes(), None);
    let why = src
        .rejected()
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        why.contains("000001.cls holds \"tabby\", not a class index"),
        "{why}"
    );
    // nor does an index past any real label set (it would size the class list)
    std::fs::write(w.join("000001.cls"), "4000000000").unwrap();
    tar(&w, &args);
    let src = open(&dir.path().join("bad-cls.tar"));
    assert_eq!(src.n_classes(), None);
    let why = src
        .rejected()
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        why.contains("000001.cls holds class 4000000000, more than the 1048576"),
        "{why}"
    );
}

/// Offsets in `archive` where GNU tar put each member's header (found by name).
fn header_at(bytes: &[u8], name: &str) -> usize {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap_or_else(|| panic!("{name} in the archive"));
    assert_eq!(at % 512, 0, "{name} is a header name");
    at
}

/// A damaged header or a truncated copy ends that shard's index where the damage is: the
/// members before it are read, the shard is reported with the offset, the other shards
/// are whole. A member that does not decode is a bad sample with the member's path.
#[test]
fn a_damaged_shard_keeps_what_precedes_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    std::fs::create_dir(&root).unwrap();
    for i in 0..6u32 {
        write_jpeg(&root.join(format!("{i}.jpg")), &pattern_image(36, 28, i));
    }
    std::fs::write(root.join("6.jpg"), b"\xff\xd8 not really a jpeg").unwrap();
    let names: Vec<String> = (0..7).map(|i| format!("{i}.jpg")).collect();
    let mut args = vec!["-cf", "../whole.tar"];
    args.extend(names.iter().map(String::as_str));
    tar(&root, &args);
    let whole = std::fs::read(dir.path().join("whole.tar")).unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    std::fs::write(shards.join("a.tar"), &whole).unwrap();

    // member 3's header damaged: members 0-2 of that shard are kept
    let mut damaged = whole.clone();
    damaged[header_at(&whole, "3.jpg") + 2] ^= 0x20;
    std::fs::write(shards.join("b.tar"), &damaged).unwrap();
    // a copy cut inside member 5's data: members 0-4 are kept
    let cut = header_at(&whole, "5.jpg") + 512 + 100;
    std::fs::write(shards.join("c.tar"), &whole[..cut]).unwrap();

    let src = open(&shards);
    assert_eq!(src.len(), Some(7 + 3 + 5));
    let rejected: Vec<String> = src.rejected().iter().map(|b| b.to_string()).collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    let b_at = header_at(&whole, "3.jpg");
    assert!(rejected[0].contains("b.tar"), "{rejected:?}");
    assert!(
        rejected[0].contains(&format!(
            "checksum mismatch at byte {b_at}; the 3 member(s) before it are used"
        )),
        "{rejected:?}"
    );
    assert!(rejected[1].contains("c.tar"), "{rejected:?}");
    assert!(
        rejected[1].contains("runs past the end of the file"),
        "{rejected:?}"
    );
    // what is kept reads as the whole shard's first members
    let ids: Vec<String> = (0..src.len().unwrap())
        .map(|i| match src.get(i) {
            Ok(s) => s.id,
            Err(DataError::BadInput(b)) => format!("bad {}", b.path.display()),
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(ids[7..10], ["b.tar/0.jpg", "b.tar/1.jpg", "b.tar/2.jpg"]);
    assert_eq!(ids[14], "c.tar/4.jpg");
    assert_eq!(src.get(13).unwrap().image, src.get(3).unwrap().image);
    // the member that is not a JPEG is a bad sample named inside its shard
    assert!(
        ids[6].starts_with("bad ") && ids[6].ends_with("a.tar/6.jpg"),
        "{}",
        ids[6]
    );

    // a file that is not a tar at all holds nothing readable
    std::fs::write(dir.path().join("junk.tar"), vec![7u8; 3000]).unwrap();
    let err =
        TarSource::open_with(&dir.path().join("junk.tar"), DEFAULT_PIXEL_LIMIT, None).unwrap_err();
    assert!(matches!(err, DataError::NoReadableImages { .. }), "{err}");
    assert!(err.to_string().contains("1 damaged"), "{err}");

    // a compressed shard says what it is and what to do
    let gz = dir.path().join("whole.tar.gz");
    let o = Command::new("gzip")
        .args(["-k", dir.path().join("whole.tar").to_str().unwrap()])
        .status()
        .expect("gzip runs");
    assert!(o.success());
    let err = TarSource::open_with(&gz, DEFAULT_PIXEL_LIMIT, None).unwrap_err();
    assert!(matches!(err, DataError::NoReadableImages { .. }), "{err}");
    assert!(err.to_string().contains("gzip-compressed"), "{err}");
    let src = TarSource::open_with(&shards, DEFAULT_PIXEL_LIMIT, None).unwrap();
    std::fs::copy(&gz, shards.join("d.tar")).unwrap();
    let src2 = TarSource::open_with(&shards, DEFAULT_PIXEL_LIMIT, None).unwrap();
    assert_eq!(src2.len(), src.len());
    let why = src2.rejected().last().unwrap().to_string();
    assert!(
        why.contains("d.tar")
            && why.contains("gzip-compressed archive")
            && why.contains("decompress it first"),
        "{why}"
    );

    let packed = dir.path().join("packed");
    std::fs::create_dir(&packed).unwrap();
    std::fs::copy(&gz, packed.join("a.tar.gz")).unwrap();
    let err = TarSource::open_with(&packed, DEFAULT_PIXEL_LIMIT, None).unwrap_err();
    assert!(err.to_string().contains("1 compressed archive(s)"), "{err}");
}

/// A shard's index is kept in the cache and read back while the shard is unchanged: the
/// same samples, labels and reported damage; a changed shard is walked again, a cache
/// entry that fails its checksum is not used, and a cache that cannot be written costs
/// only the walk.
#[test]
fn shard_indexes_are_cached_until_the_shard_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    image_folder(&root);
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for class in ["cat", "dog"] {
        let out = shards.join(format!("{class}.tar"));
        tar(&root, &["--sort=name", "-cf", out.to_str().unwrap(), class]);
    }
    // a third shard, cut inside a member
    let whole = std::fs::read(shards.join("dog.tar")).unwrap();
    let cut = header_at(&whole, "dog/4.jpg") + 600;
    std::fs::write(shards.join("z.tar"), &whole[..cut]).unwrap();
    let cache = dir.path().join("cache");
    let open = |cache: &Path| {
        TarSource::open_with(&shards, DEFAULT_PIXEL_LIMIT, Some(cache)).expect("open")
    };
    let walked = TarSource::open_with(&shards, DEFAULT_PIXEL_LIMIT, None).unwrap();
    let first = open(&cache);
    assert_eq!(first.indexes_from_cache(), 0);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3);
    let again = open(&cache);
    assert_eq!(again.indexes_from_cache(), 3);
    for src in [&first, &again] {
        assert_eq!(src.describe(), walked.describe());
        assert_eq!(src.rejected(), walked.rejected());
        for i in 0..walked.len().unwrap() {
            let (a, b) = (src.get(i).unwrap(), walked.get(i).unwrap());
            assert_eq!((a.id, a.label, a.image), (b.id, b.label, b.image));
        }
    }
    // the damage is remembered, with where it is
    assert!(
        again.rejected()[0].to_string().contains("z.tar"),
        "{:?}",
        again.rejected()
    );

    // a shard rewritten with one more member is walked again
    write_jpeg(&root.join("cat/9.jpg"), &pattern_image(20, 20, 9));
    tar(
        &root,
        &[
            "--sort=name",
            "-cf",
            shards.join("cat.tar").to_str().unwrap(),
            "cat",
        ],
    );
    let changed = open(&cache);
    assert_eq!(changed.indexes_from_cache(), 2);
    assert_eq!(changed.len(), Some(walked.len().unwrap() + 1));
    assert_eq!(changed.get(3).unwrap().id, "cat.tar/cat/9.jpg");

    // every cache entry damaged: none is used, and each is written again
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let k = b.len() / 2;
        b[k] ^= 1;
        std::fs::write(&p, b).unwrap();
    }
    let rewalked = open(&cache);
    assert_eq!(rewalked.indexes_from_cache(), 0);
    assert_eq!(rewalked.len(), changed.len());
    assert_eq!(open(&cache).indexes_from_cache(), 3);

    // a cache where nothing can be written: the shards are walked, nothing fails
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let src = open(&not_a_dir.join("cache"));
    assert_eq!((src.indexes_from_cache(), src.len()), (0, changed.len()));

    // entries unused for 30 days are deleted when an open writes a new one; a used one is
    // kept (it was touched when read)
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(31 * 24 * 3600);
    let orphan = cache.join("0123456789abcdef0123456789abcdef.idx");
    std::fs::write(&orphan, b"an index of a shard deleted long ago").unwrap();
    for e in std::fs::read_dir(&cache).unwrap() {
        let f = std::fs::File::options()
            .write(true)
            .open(e.unwrap().path())
            .unwrap();
        f.set_modified(old).unwrap();
    }
    assert_eq!(open(&cache).indexes_from_cache(), 3);
    assert!(orphan.exists(), "nothing was written, so nothing is swept");
    std::fs::write(root.join("cat/9.jpg"), b"changed").unwrap();
    tar(
        &root,
        &[
            "--sort=name",
            "-cf",
            shards.join("cat.tar").to_str().unwrap(),
            "cat",
        ],
    );
    assert_eq!(open(&cache).indexes_from_cache(), 2);
    assert!(!orphan.exists());
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        3 + 1,
        "the used, and the new"
    );

    // `tar:` specs use the cache of their open options, and count the shards indexed
    let progress = std::sync::Arc::new(crate::OpenProgress::default());
    assert_eq!(progress.describe(), None);
    let opts = OpenOptions {
        index_cache: Some(cache.clone()),
        progress: Some(progress.clone()),
        ..OpenOptions::default()
    };
    let spec: SourceSpec = format!("tar:{}", shards.display()).parse().unwrap();
    let src = spec.open_with(&opts).unwrap();
    assert_eq!(src.len(), changed.len());
    let n = progress.counts().1;
    assert!(n >= 2, "{n}");
    assert_eq!(progress.counts(), (n, n, n));
    assert_eq!(
        progress.describe().unwrap(),
        format!("{n} of {n} shards indexed ({n} from the index cache)")
    );
    let progress = crate::OpenProgress::default();
    TarSource::open_observed(&shards, DEFAULT_PIXEL_LIMIT, None, Some(&progress)).unwrap();
    assert_eq!(
        progress.describe().unwrap(),
        format!("{n} of {n} shards indexed")
    );
}

/// A sample is a read from a shard file kept open: no `open` per sample, at most a bound
/// of files open however many shards there are (here 256), and a shard replaced
/// on disk during the run is read as it was indexed (from the file still open) instead of
/// at the old offsets of the new file.
#[test]
fn shards_stay_open_up_to_a_bound_and_a_replaced_shard_reads_as_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    image_folder(&root);
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    tar(
        &root,
        &[
            "--sort=name",
            "-cf",
            shards.join("a.tar").to_str().unwrap(),
            "cat",
        ],
    );
    for i in 1..300 {
        std::fs::copy(shards.join("a.tar"), shards.join(format!("b{i:03}.tar"))).unwrap();
    }
    let src = open(&shards).with_max_open_files(256);
    assert_eq!(src.max_open_files(), 256);
    assert_eq!(src.len(), Some(300 * 3));
    assert_eq!(src.open_files(), 0);
    let first: Vec<_> = (0..3).map(|i| src.get(i).unwrap().image).collect();
    assert_eq!(
        src.open_files(),
        1,
        "three samples of one shard: one open file"
    );
    for i in 0..src.len().unwrap() {
        assert_eq!(
            src.get(i).unwrap().image,
            first[i as usize % 3],
            "sample {i}"
        );
    }
    assert_eq!(src.open_files(), 256);
    assert!(
        src.describe()
            .contains("at most 256 shard files are kept open"),
        "{}",
        src.describe()
    );
    // the first shard was closed for a later one: reading it again opens it again
    assert_eq!(src.get(1).unwrap().image, first[1]);

    // b299.tar is open (read last); replace it with another archive of other images
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("cat")).unwrap();
    for i in 0..6 {
        write_jpeg(
            &other.join(format!("cat/{i}.jpg")),
            &pattern_image(90, 70, 50 + i),
        );
    }
    let tmp = dir.path().join("new.tar");
    tar(
        &other,
        &["--sort=name", "-cf", tmp.to_str().unwrap(), "cat"],
    );
    std::fs::rename(&tmp, shards.join("b299.tar")).unwrap();
    for k in 0..3 {
        let s = src.get(299 * 3 + k).unwrap();
        assert_eq!(s.image, first[k as usize], "{}", s.id);
    }
}
