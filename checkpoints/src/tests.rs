//! Unit and single-process tests. Process-level guarantees (SIGKILL loops, a real full disk, a
//! second process) are in `tests/process.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::manifest::{classify_dir_name, DirKind};
use crate::tensorfile::{header_bytes, write_group, SaveIo};
use crate::*;

// ---- helpers -----------------------------------------------------------------------------------

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn f32s(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// Three groups of about `kib` KiB each in total, content a function of `step`.
fn payload(step: u64, kib: usize) -> CheckpointPayload {
    let n = kib * 256 / 3;
    let group = |name: &str, salt: u64| {
        TensorGroup::new(
            name,
            vec![
                TensorBlob::from_f32("w", &[n / 4, 4], &f32s(step * 31 + salt, n / 4 * 4)).unwrap(),
                TensorBlob::from_f32("b", &[7], &f32s(step * 17 + salt, 7)).unwrap(),
                TensorBlob::from_i64("count", &[], &[step as i64]).unwrap(),
            ],
        )
    };
    CheckpointPayload::new(step)
        .with_group(group("student", 1))
        .with_group(group("teacher", 2))
        .with_group(group("optimizer", 3))
        .with_versions(format!("cfg-{}", step % 3), "test-1.0")
        .with_meta(json!({ "cursor": { "epoch": 0, "sample": step * 64 }, "rng": [step, 42] }))
}

fn open(dir: &Path, keep_last: usize) -> Store {
    Store::open(dir, StoreOptions::new(Retention::keep_last(keep_last))).unwrap()
}

fn open_with_fault(dir: &Path, keep_last: usize, fault: Arc<InjectFault>) -> Store {
    Store::open(
        dir,
        StoreOptions::new(Retention::keep_last(keep_last)).with_fault_injector(fault),
    )
    .unwrap()
}

/// Names under `checkpoints/`, sorted.
fn entries(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store.checkpoints_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn file_of(store: &Store, step: u64, group: &str) -> PathBuf {
    let m = store.manifest(step).unwrap();
    store
        .checkpoints_dir()
        .join(&m.dir)
        .join(&m.file(group).unwrap().file)
}

fn flip_byte(path: &Path, offset_from_end: u64) {
    let mut bytes = fs::read(path).unwrap();
    let i = bytes.len() - offset_from_end as usize;
    bytes[i] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

fn assert_same_groups(loaded: &LoadedCheckpoint, payload: &CheckpointPayload) {
    assert_eq!(loaded.groups.len(), payload.groups.len());
    for g in &payload.groups {
        let l = loaded.group(&g.name).expect("group loaded");
        assert_eq!(l.tensors.len(), g.tensors.len(), "group {}", g.name);
        for t in &g.tensors {
            assert_eq!(l.get(&t.name), Some(t), "tensor {}/{}", g.name, t.name);
        }
    }
}

/// The group as safetensors' own views, for its reference writer.
fn views_of(group: &TensorGroup) -> Vec<(String, safetensors::tensor::TensorView<'_>)> {
    group
        .tensors
        .iter()
        .map(|t| {
            let v = safetensors::tensor::TensorView::new(
                t.dtype.to_safetensors(),
                t.shape.clone(),
                t.bytes(),
            )
            .unwrap();
            (t.name.clone(), v)
        })
        .collect()
}

fn events_of(store: &Store, kind: &str) -> Vec<StoredEvent> {
    store
        .recent_events(10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event.kind == kind)
        .collect()
}

// ---- tensors and the file format -----------------------------------------------------------------

#[test]
fn blob_conversions_round_trip_bit_exactly() {
    let f = [
        1.5f32,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::MIN_POSITIVE,
        3.0e-42,
    ];
    let b = TensorBlob::from_f32("f", &[2, 3], &f).unwrap();
    assert_eq!(
        (b.dtype, b.bytes().len(), b.n_elements()),
        (Dtype::F32, 24, 6)
    );
    // the same bytes held as bytes: an equal blob, the same elements
    let raw = TensorBlob::new("f", Dtype::F32, vec![2, 3], b.bytes().to_vec()).unwrap();
    assert_eq!(raw, b);
    assert_eq!(
        raw.into_f32_vec()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        f.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let back = b.to_f32_vec().unwrap();
    assert_eq!(
        back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        f.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let d = [std::f64::consts::PI, -1e300];
    assert_eq!(
        TensorBlob::from_f64("d", &[2], &d)
            .unwrap()
            .to_f64_vec()
            .unwrap(),
        d
    );
    let u = [0u8, 255, 7];
    assert_eq!(
        TensorBlob::from_u8("u", &[3], &u)
            .unwrap()
            .to_u8_vec()
            .unwrap(),
        u
    );
    let i = [i64::MIN, -1, i64::MAX];
    assert_eq!(
        TensorBlob::from_i64("i", &[3], &i)
            .unwrap()
            .to_i64_vec()
            .unwrap(),
        i
    );
    let q = [u64::MAX, 1];
    assert_eq!(
        TensorBlob::from_u64("q", &[2], &q)
            .unwrap()
            .to_u64_vec()
            .unwrap(),
        q
    );
    // Little-endian layout, as safetensors requires.
    assert_eq!(
        TensorBlob::from_i64("le", &[], &[1]).unwrap().bytes(),
        [1, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn blob_rejects_mismatched_sizes_and_types() {
    let err = TensorBlob::from_f32("w", &[2, 2], &[1.0; 3]).unwrap_err();
    assert!(
        err.to_string()
            .contains("tensor w: F32 [2, 2] needs 16 bytes, got 12"),
        "{err}"
    );
    let err = TensorBlob::from_f32("w", &[2], &[1.0, 2.0])
        .unwrap()
        .to_f64_vec()
        .unwrap_err();
    assert!(
        err.to_string().contains("dtype is F32, asked for F64"),
        "{err}"
    );
    // Sub-byte dtype: 3 F4 elements are 12 bits, not whole bytes.
    assert!(TensorBlob::new("x", Dtype::F4, vec![3], vec![0, 0]).is_err());
    assert!(TensorBlob::new("x", Dtype::F4, vec![4], vec![0, 0]).is_ok());
}

#[test]
fn written_files_are_byte_identical_to_safetensors_serialize() {
    let dir = tempfile::tempdir().unwrap();
    let group = TensorGroup::new(
        "mixed",
        vec![
            TensorBlob::from_u8("z_bytes", &[5], &[1, 2, 3, 4, 5]).unwrap(),
            TensorBlob::from_f32("a_weight", &[2, 3], &f32s(1, 6)).unwrap(),
            TensorBlob::from_f64("m_moment", &[2], &[0.25, -8.0]).unwrap(),
            TensorBlob::from_i64("step", &[], &[12]).unwrap(),
        ],
    );
    let path = dir.path().join("mixed.safetensors");
    let mut file = fs::File::create(&path).unwrap();
    let mut io = SaveIo {
        step: 12,
        injector: None,
        bytes_written: 0,
    };
    let written = write_group(&mut io, &mut file, &path, &group).unwrap();
    drop(file);
    let ours = fs::read(&path).unwrap();
    assert_eq!(written.size, ours.len() as u64);
    assert_eq!(written.blake3, blake3::hash(&ours).to_hex().to_string());

    let views = views_of(&group);
    let meta = std::collections::HashMap::from([(
        "dinod".to_owned(),
        "checkpoint step=12 group=mixed".to_owned(),
    )]);
    let reference = safetensors::serialize(views, Some(meta)).unwrap();
    assert_eq!(ours, reference, "same bytes as safetensors::serialize");
    assert_eq!(
        &ours[..header_bytes(12, &group).unwrap().len()],
        &reference[..header_bytes(12, &group).unwrap().len()]
    );

    let parsed = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let w = parsed.tensor("a_weight").unwrap();
    assert_eq!(
        (w.shape(), w.data()),
        (&[2usize, 3][..], group.get("a_weight").unwrap().bytes())
    );
}

#[test]
fn dir_names_classify() {
    assert_eq!(classify_dir_name("step-000000001234"), DirKind::Step(1234));
    assert_eq!(
        classify_dir_name("step-000000001234-2"),
        DirKind::Step(1234)
    );
    assert_eq!(
        classify_dir_name("step-1234567890123"),
        DirKind::Step(1_234_567_890_123)
    );
    assert_eq!(classify_dir_name("step-000000001234.tmp"), DirKind::Tmp);
    assert_eq!(classify_dir_name("step-000000001234-1.tmp"), DirKind::Tmp);
    for foreign in [
        "step-12",
        "step-00000000123x",
        "notes",
        "step-000000001234-",
        "step-000000001234-a",
    ] {
        assert_eq!(classify_dir_name(foreign), DirKind::Foreign, "{foreign}");
    }
}

// ---- retention (pure) ------------------------------------------------------------------------

fn infos(steps: impl IntoIterator<Item = u64>) -> Vec<CheckpointInfo> {
    steps
        .into_iter()
        .map(|step| CheckpointInfo {
            step,
            score: None,
            bad: false,
            bytes: 100,
        })
        .collect()
}

#[test]
fn retention_keeps_the_newest_n() {
    let existing = infos(1..=10);
    assert_eq!(
        plan_retention(&existing, &Retention::keep_last(3)),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(
        plan_retention(&existing, &Retention::keep_last(20)),
        Vec::<u64>::new()
    );
    // Order of the input does not matter.
    let shuffled = infos([5, 1, 9, 3, 10, 2]);
    assert_eq!(
        plan_retention(&shuffled, &Retention::keep_last(2)),
        vec![1, 2, 3, 5]
    );
    assert!(plan_retention(&[], &Retention::keep_last(2)).is_empty());
}

#[test]
fn retention_never_deletes_the_newest_two_even_with_an_invalid_policy() {
    let existing = infos(1..=5);
    for keep_last in [0, 1] {
        assert_eq!(
            plan_retention(&existing, &Retention::keep_last(keep_last)),
            vec![1, 2, 3]
        );
    }
}

#[test]
fn retention_keep_every_and_keep_best() {
    let mut existing = infos(1..=12);
    for info in &mut existing {
        info.score = Some(match info.step {
            3 => 0.9,
            7 => 0.9, // tie with 3: the newer wins
            8 => f64::NAN,
            11 => 0.1,
            _ => 0.5,
        });
    }
    let higher = Retention::keep_last(2)
        .with_keep_every(5)
        .with_keep_best("knn", true);
    assert_eq!(
        plan_retention(&existing, &higher),
        vec![1, 2, 3, 4, 6, 8, 9]
    );
    let reasons = keep_reasons(&existing, &higher);
    assert_eq!(
        reasons[&7],
        vec![KeepReason::Best {
            metric: "knn".into(),
            value: 0.9
        }]
    );
    assert_eq!(reasons[&10], vec![KeepReason::Every { n: 5 }]);
    assert_eq!(reasons[&12], vec![KeepReason::Latest, KeepReason::Recent]);

    let lower = Retention::keep_last(2).with_keep_best("loss", false);
    let kept: Vec<u64> = keep_reasons(&existing, &lower)
        .into_iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        kept,
        vec![11, 12],
        "step 11 is best by lowest score and also recent"
    );
}

/// `keep_every` keeps one checkpoint per multiple: the first valid one at or after it. A
/// save that came late (the daemon defers a due save while the previous one is still
/// being written) stands for its multiple instead of being deleted with none kept for it.
#[test]
fn retention_keep_every_keeps_a_late_save_for_its_multiple() {
    let policy = Retention::keep_last(2).with_keep_every(3);
    let kept = |existing: &[CheckpointInfo]| -> Vec<(u64, Vec<KeepReason>)> {
        keep_reasons(existing, &policy)
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .collect()
    };
    let every = KeepReason::Every { n: 3 };
    // 6 was saved at 7: 7 stands for 6; 8 is in the same window and goes
    let k = kept(&infos([1, 3, 7, 8, 9, 12, 13, 14]));
    let steps: Vec<u64> = k.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [3, 7, 9, 12, 13, 14]);
    assert_eq!(k[1].1, vec![every.clone()]);
    // on time, the multiple itself is the one
    let k = kept(&infos([3, 6, 7, 8]));
    assert_eq!(k.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3, 6, 7, 8]);
    assert!(!k[2].1.contains(&every), "{k:?}");
    // a corrupt one at the multiple: the next valid one stands for it
    let mut existing = infos([3, 6, 7, 20, 21]);
    existing[1].bad = true;
    let reasons = keep_reasons(&existing, &policy);
    assert_eq!(reasons[&7], vec![every.clone()]);
    assert!(reasons[&6].is_empty());
    // steps before the first multiple stand for none (step 0 itself does)
    let reasons = keep_reasons(&infos([0, 1, 2, 20, 21]), &policy);
    assert_eq!(reasons[&0], vec![every.clone()]);
    assert!(reasons[&1].is_empty() && reasons[&2].is_empty());
}

/// A disk budget: while the kept checkpoints hold more bytes than `max_bytes`, the oldest
/// kept only by `keep_every` is deleted; the latest, the recent and the best never are.
#[test]
fn retention_over_its_disk_budget_deletes_the_oldest_kept_every_first() {
    // 100 bytes each; 12 checkpoints
    let mut existing = infos(1..=12);
    existing[1].score = Some(0.9); // step 2 is the best
    let policy = Retention::keep_last(2)
        .with_keep_every(2)
        .with_keep_best("dense", true);
    // no budget: 2 (best, every), 4, 6, 8, 10 (every), 11, 12 (recent)
    assert_eq!(plan_retention(&existing, &policy), vec![1, 3, 5, 7, 9]);
    // 500 bytes: 7 kept, so the two oldest kept only for keep_every go (4 and 6); the
    // best at step 2 stays though it is older
    let budget = policy.clone().with_max_bytes(500);
    assert_eq!(
        plan_retention(&existing, &budget),
        vec![1, 3, 4, 5, 6, 7, 9]
    );
    let reasons = keep_reasons(&existing, &budget);
    assert_eq!(reasons[&8], vec![KeepReason::Every { n: 2 }]);
    assert!(reasons[&2].contains(&KeepReason::Every { n: 2 }));
    // a budget below what must be kept: every keep_every one goes, the rest stays
    let tiny = policy.with_max_bytes(1);
    assert_eq!(
        plan_retention(&existing, &tiny),
        vec![1, 3, 4, 5, 6, 7, 8, 9, 10]
    );
    // checkpoints of unknown size count nothing
    let unknown: Vec<CheckpointInfo> = infos(1..=12)
        .into_iter()
        .map(|i| CheckpointInfo { bytes: 0, ..i })
        .collect();
    assert_eq!(
        plan_retention(
            &unknown,
            &Retention::keep_last(2).with_keep_every(2).with_max_bytes(1)
        ),
        vec![1, 3, 5, 7, 9]
    );
}

#[test]
fn retention_does_not_count_corrupt_checkpoints() {
    let mut existing = infos(1..=10);
    existing[8].bad = true; // 9
    existing[9].bad = true; // 10
    existing[4].score = Some(100.0); // 5 is best ...
    existing[4].bad = true; // ... but corrupt, so not kept for it
    existing[2].score = Some(50.0);
    let policy = Retention::keep_last(2)
        .with_keep_every(4)
        .with_keep_best("knn", true);
    let reasons = keep_reasons(&existing, &policy);
    assert_eq!(reasons[&10], vec![KeepReason::Latest, KeepReason::Recent]);
    assert_eq!(reasons[&9], vec![KeepReason::Recent]);
    assert_eq!(
        reasons[&8],
        vec![KeepReason::RecentValid, KeepReason::Every { n: 4 }]
    );
    assert_eq!(reasons[&7], vec![KeepReason::RecentValid]);
    assert_eq!(
        reasons[&3],
        vec![KeepReason::Best {
            metric: "knn".into(),
            value: 50.0
        }]
    );
    assert_eq!(plan_retention(&existing, &policy), vec![1, 2, 5, 6]);
}

#[test]
fn retention_validation_reports_every_problem() {
    assert!(Retention::keep_last(2).validate().is_ok());
    let bad = Retention {
        keep_last: 1,
        keep_every: Some(0),
        keep_best: Some(KeepBest {
            metric: String::new(),
            higher_is_better: true,
        }),
        max_bytes: Some(0),
    };
    let msg = bad.validate().unwrap_err().to_string();
    for needle in [
        "keep_last = 1",
        "keep_every = 0",
        "max_bytes = 0",
        "keep_best.metric is empty",
    ] {
        assert!(msg.contains(needle), "{msg}");
    }
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path(), StoreOptions::new(Retention::keep_last(1))).unwrap_err();
    assert!(matches!(err, Error::InvalidRetention(_)), "{err}");
    // Retention is a config section: unknown keys are rejected.
    let parsed: std::result::Result<Retention, _> =
        serde_json::from_value(json!({ "keep_last": 3, "keep_lats": 2 }));
    assert!(parsed.is_err());
}

// ---- save and load -----------------------------------------------------------------------------

#[test]
fn save_then_load_round_trips_and_reports_phases() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    assert!(store.load_latest().unwrap().is_none());
    assert!(
        store.load_latest_valid().unwrap().is_none(),
        "fresh directory: nothing to load"
    );

    let p = payload(7, 300);
    let report = store.save(&p).unwrap();
    assert_eq!(report.step, 7);
    assert_eq!(report.dir, dir.path().join("checkpoints/step-000000000007"));
    assert_eq!(report.files.len(), 3);
    let on_disk: u64 = fs::read_dir(&report.dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(
        report.bytes, on_disk,
        "bytes counts every file, manifest.json included"
    );
    assert!(report.bytes > p.data_bytes());
    assert!(report.write > std::time::Duration::ZERO && report.commit > std::time::Duration::ZERO);
    assert!(report.deleted.is_empty() && report.gc_error.is_none());

    assert_eq!(store.latest_step().unwrap(), Some(7));
    let before = crate::bytes_read();
    let loaded = store.load(7).unwrap();
    assert_same_groups(&loaded, &p);
    // the process-wide count of tensor bytes read grew by at least this load's (other
    // tests read in parallel)
    assert!(crate::bytes_read() - before >= p.data_bytes());
    let m = &loaded.manifest;
    assert_eq!(
        (m.step, m.previous_step, m.format),
        (7, None, MANIFEST_FORMAT)
    );
    assert_eq!(
        (m.config_hash.as_str(), m.code_version.as_str()),
        ("cfg-1", "test-1.0")
    );
    assert_eq!(loaded.meta(), &p.meta);
    assert_eq!(
        m.files.iter().map(|f| f.group.as_str()).collect::<Vec<_>>(),
        ["student", "teacher", "optimizer"]
    );

    // The copy in the directory equals the catalog record.
    let copy: Manifest =
        serde_json::from_slice(&fs::read(report.dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(&copy, m);

    let second = store.save(&payload(8, 300)).unwrap();
    assert_eq!(store.manifest(8).unwrap().previous_step, Some(7));
    let teacher = store.load_group(8, "teacher").unwrap();
    assert_eq!(teacher.name, "teacher");
    for t in &payload(8, 300).groups[1].tensors {
        assert_eq!(teacher.get(&t.name), Some(t));
    }
    assert!(store.load_group(8, "nope").is_err());
    assert_eq!(events_of(&store, event_kind::SAVED).len(), 2);
    assert!(second.mb_per_s() > 0.0);
    assert!(matches!(
        store.load(99),
        Err(Error::NotFound { step: 99, .. })
    ));

    // Survives a reopen.
    drop(store);
    let store = open(dir.path(), 2);
    let loaded = store.load_latest().unwrap().unwrap();
    assert_eq!(loaded.step(), 8);
    assert_same_groups(&loaded, &payload(8, 300));
    assert!(store.verify_all().unwrap().iter().all(VerifyReport::ok));
}

/// Floats are read straight into vectors of their elements, which the caller takes over
/// without a copy; a group file also reads without the store (beside a running daemon),
/// verified against its manifest entry.
#[test]
fn loaded_floats_are_handed_over_without_a_copy_and_a_group_reads_without_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    let (w, d) = (f32s(1, 1000), [0.25f64, -1e300, f64::NAN]);
    let group = TensorGroup::new(
        "g",
        vec![
            TensorBlob::from_f32("w", &[10, 100], &w).unwrap(),
            TensorBlob::from_f64("d", &[3], &d).unwrap(),
            TensorBlob::from_i64("c", &[], &[-5]).unwrap(),
        ],
    );
    store
        .save(&CheckpointPayload::new(3).with_group(group.clone()))
        .unwrap();
    let by_name = |g: &TensorGroup| {
        let mut t = g.tensors.clone();
        t.sort_by(|a, b| a.name.cmp(&b.name));
        t
    };
    let mut loaded = store.load_group(3, "g").unwrap();
    assert_eq!(by_name(&loaded), by_name(&group));

    let b = loaded.take("w").unwrap();
    let at = b.bytes().as_ptr();
    let v = b.into_f32_vec().unwrap();
    assert_eq!(v, w);
    let b = loaded.take("d").unwrap();
    let at64 = b.bytes().as_ptr();
    let v64 = b.into_f64_vec().unwrap();
    assert_eq!(
        v64.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        d.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    if cfg!(target_endian = "little") {
        assert_eq!(
            v.as_ptr().cast::<u8>(),
            at,
            "the f32 vector is the one read"
        );
        assert_eq!(
            v64.as_ptr().cast::<u8>(),
            at64,
            "the f64 vector is the one read"
        );
    }
    assert_eq!(loaded.take("c").unwrap().to_i64_vec().unwrap(), [-5]);
    assert!(loaded.take("c").is_none() && loaded.tensors.is_empty());

    // without the store (which stays open: it holds the directory's lock)
    let path = file_of(&store, 3, "g");
    let manifest = store.manifest(3).unwrap();
    let entry = manifest.file("g").unwrap();
    assert_eq!(
        by_name(&read_group_file(&path, entry).unwrap()),
        by_name(&group)
    );
    flip_byte(&path, 3);
    assert!(matches!(
        read_group_file(&path, entry),
        Err(Problem::HashMismatch { .. })
    ));
}

/// A file no manifest describes, written by safetensors itself, reads as a group.
#[test]
fn a_foreign_safetensors_file_reads_without_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let w = f32s(9, 12);
    let group = TensorGroup::new(
        "teacher",
        vec![
            TensorBlob::from_f32("blocks.0.w", &[3, 4], &w).unwrap(),
            TensorBlob::from_f64("d", &[2], &[1.0, -2.5]).unwrap(),
            TensorBlob::from_u8("m", &[3], &[1, 0, 1]).unwrap(),
        ],
    );
    let views = views_of(&group);
    let path = dir.path().join("t.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let (mut read, hash) = read_safetensors(&path, "teacher").unwrap();
    assert_eq!(
        hash,
        blake3::hash(&fs::read(&path).unwrap()).to_hex().to_string()
    );
    assert_eq!(read.name, "teacher");
    read.tensors.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(read.tensors, group.tensors);
    assert!(matches!(
        read_safetensors(&dir.path().join("none"), "teacher"),
        Err(Problem::MissingFile { .. })
    ));
    fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(
        read_safetensors(&path, "teacher"),
        Err(Problem::Unparsable { .. })
    ));
}

#[test]
fn invalid_payloads_are_rejected_before_any_io() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    let t = || TensorBlob::from_f32("w", &[1], &[1.0]).unwrap();
    let cases = [
        CheckpointPayload::new(1),
        CheckpointPayload::new(1).with_group(TensorGroup::new("../evil", vec![t()])),
        CheckpointPayload::new(1)
            .with_group(TensorGroup::new("a", vec![t()]))
            .with_group(TensorGroup::new("a", vec![t()])),
        CheckpointPayload::new(1).with_group(TensorGroup::new("a", vec![t(), t()])),
        CheckpointPayload::new(1).with_group(TensorGroup::new(
            "a",
            vec![TensorBlob {
                name: "w".into(),
                dtype: Dtype::F32,
                shape: vec![3],
                data: crate::tensor::Data::Bytes(vec![0; 4]),
            }],
        )),
    ];
    for p in &cases {
        let err = store.save(p).unwrap_err();
        assert_eq!(err.save_stage(), Some(SaveStage::Validate), "{err}");
    }
    assert!(entries(&store).is_empty());
    assert_eq!(store.latest_step().unwrap(), None);
}

#[test]
fn flipped_byte_is_detected_and_loading_falls_back_without_losing_needed_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    for step in 1..=3 {
        store.save(&payload(step, 200)).unwrap();
    }
    assert_eq!(store.steps().unwrap(), vec![2, 3]);
    let teacher = file_of(&store, 3, "teacher");
    flip_byte(&teacher, 100); // inside the tensor data: the header still parses

    let err = store.load_latest().unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Invalid {
                step: 3,
                problem: Problem::HashMismatch { .. }
            }
        ),
        "{err}"
    );

    let loaded = store.load_latest_valid().unwrap().unwrap();
    assert_eq!(loaded.step(), 2);
    assert_same_groups(&loaded, &payload(2, 200));
    assert_eq!(loaded.skipped.len(), 1);
    assert!(
        matches!(&loaded.skipped[0], (3, Problem::HashMismatch { file, .. }) if file == &teacher)
    );

    let fallbacks = events_of(&store, event_kind::FALLBACK);
    assert_eq!(fallbacks.len(), 1, "one event per fallback");
    let ev = &fallbacks[0].event;
    assert_eq!((ev.level, ev.step), (Level::Warn, Some(3)));
    assert_eq!(ev.fields["file"], json!(teacher));
    assert_eq!(ev.fields["next"], json!(2));
    assert!(
        ev.message.contains("teacher.safetensors") && ev.message.contains("falling back to step 2"),
        "{}",
        ev.message
    );

    // The corruption is recorded; `list` and `verify` show it.
    let list = store.list().unwrap();
    assert!(matches!(list[1].bad, Some(Problem::HashMismatch { .. })));
    assert!(list[1].is_latest);
    let report = store.verify(3).unwrap();
    assert_eq!(report.problems.len(), 1);

    // Training resumed from 2 saves 4: the corrupt 3 does not count as one of the newest
    // valid two, so 2 is kept.
    let r = store.save(&payload(4, 200)).unwrap();
    assert!(r.deleted.is_empty(), "{:?}", r.deleted);
    assert_eq!(store.steps().unwrap(), vec![2, 3, 4]);
    let reasons: Vec<Vec<KeepReason>> = store.list().unwrap().into_iter().map(|e| e.keep).collect();
    assert_eq!(reasons[0], vec![KeepReason::RecentValid]);
    assert_same_groups(&store.load(2).unwrap(), &payload(2, 200));

    // One more valid save and both 2 and the corrupt 3 go.
    let r = store.save(&payload(5, 200)).unwrap();
    assert_eq!(r.deleted, vec![2, 3]);
    assert_eq!(entries(&store), ["step-000000000004", "step-000000000005"]);
}

#[test]
fn resaving_a_step_after_a_fallback_replaces_the_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3);
    for step in 1..=3 {
        store.save(&payload(step, 100)).unwrap();
    }
    flip_byte(&file_of(&store, 3, "optimizer"), 1);
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 2);
    // The trainer resumes from 2 and reaches step 3 again.
    let again = payload(3, 100).with_meta(json!({ "second": true }));
    let r = store.save(&again).unwrap();
    assert_eq!(
        r.dir.file_name().unwrap(),
        "step-000000000003-1",
        "the old directory is not reused"
    );
    assert_eq!(
        entries(&store),
        [
            "step-000000000001",
            "step-000000000002",
            "step-000000000003-1"
        ]
    );
    let loaded = store.load_latest_valid().unwrap().unwrap();
    assert_eq!(
        (loaded.step(), loaded.meta()),
        (3, &json!({ "second": true }))
    );
    assert!(loaded.skipped.is_empty());
    assert!(
        store.list().unwrap().iter().all(|e| e.bad.is_none()),
        "bad marker cleared by the re-save"
    );
}

#[test]
fn rollback_supersedes_newer_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3);
    for step in [10, 20, 30, 40] {
        store.save(&payload(step, 50)).unwrap();
    }
    assert_eq!(store.steps().unwrap(), vec![20, 30, 40]);
    // Rollback to 20 (e.g. repeated NaN losses): the next save is step 30 again.
    let r = store
        .save(&payload(30, 50).with_meta(json!("retrained")))
        .unwrap();
    assert_eq!(
        r.deleted,
        vec![40],
        "40 belongs to the abandoned trajectory"
    );
    assert_eq!(store.steps().unwrap(), vec![20, 30]);
    assert_eq!(store.latest_step().unwrap(), Some(30));
    assert_eq!(
        store.load_latest().unwrap().unwrap().meta(),
        &json!("retrained")
    );
    assert_eq!(
        entries(&store),
        ["step-000000000020", "step-000000000030-1"]
    );
    assert_eq!(store.manifest(30).unwrap().previous_step, Some(40));
}

#[test]
fn every_kind_of_damage_is_named_and_none_valid_lists_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    for step in 1..=6 {
        store.save(&payload(step, 40)).unwrap();
    }
    // 6: a missing file; 5: truncated; 4: bytes appended; 3: header corrupted (flip the first
    // byte of the JSON); 2: the directory is gone; 1: the catalog record does not parse.
    fs::remove_file(file_of(&store, 6, "student")).unwrap();
    let f5 = file_of(&store, 5, "teacher");
    let len = fs::metadata(&f5).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&f5)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let f4 = file_of(&store, 4, "optimizer");
    let mut bytes = fs::read(&f4).unwrap();
    bytes.extend_from_slice(b"junk");
    fs::write(&f4, bytes).unwrap();
    let f3 = file_of(&store, 3, "student");
    let mut bytes = fs::read(&f3).unwrap();
    bytes[8] = b'[';
    fs::write(&f3, bytes).unwrap();
    fs::remove_dir_all(store.checkpoints_dir().join(store.manifest(2).unwrap().dir)).unwrap();
    store
        .catalog()
        .manifests_tree()
        .insert(1u64.to_be_bytes(), &b"{ not json"[..])
        .unwrap();

    let err = store.load_latest_valid().unwrap_err();
    let Error::NoValidCheckpoint { problems, .. } = &err else {
        panic!("{err}")
    };
    let kinds: Vec<(u64, &str)> = problems
        .iter()
        .map(|(s, p)| {
            (
                *s,
                match p {
                    Problem::MissingFile { .. } => "missing",
                    Problem::SizeMismatch { .. } => "size",
                    Problem::HashMismatch { .. } => "hash",
                    Problem::ManifestUnparsable { .. } => "manifest",
                    Problem::Unparsable { .. } => "unparsable",
                    Problem::Unreadable { .. } => "unreadable",
                },
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (6, "missing"),
            (5, "size"),
            (4, "size"),
            (3, "hash"),
            (2, "missing"),
            (1, "manifest")
        ]
    );
    let msg = err.to_string();
    assert!(
        msg.contains("step 6: ") && msg.contains("student.safetensors: file is missing"),
        "{msg}"
    );
    assert_eq!(events_of(&store, event_kind::FALLBACK).len(), 6);
    assert_eq!(events_of(&store, event_kind::NONE_VALID).len(), 1);

    let reports = store.verify_all().unwrap();
    let counts: Vec<usize> = reports.iter().map(|r| r.problems.len()).collect();
    assert_eq!(
        counts,
        [1, 3, 1, 1, 1, 1],
        "verify reports every file: {reports:?}"
    );
    let list = store.list().unwrap();
    assert!(list[0].manifest_error.is_some());
    assert!(list
        .iter()
        .all(|e| e.bad.is_some() || e.manifest_error.is_some()));
}

#[test]
fn a_file_with_the_recorded_hash_that_does_not_parse_is_reported_as_unparsable() {
    // Only reachable if a writer bug produced a bad file: rewrite one file with garbage and
    // record the garbage's hash, as such a writer would have.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    store.save(&payload(1, 20)).unwrap();
    let path = file_of(&store, 1, "student");
    let garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}        ".to_vec();
    fs::write(&path, &garbage).unwrap();
    let mut m = store.manifest(1).unwrap();
    m.files[0].size = garbage.len() as u64;
    m.files[0].blake3 = blake3::hash(&garbage).to_hex().to_string();
    store
        .catalog()
        .manifests_tree()
        .insert(1u64.to_be_bytes(), serde_json::to_vec(&m).unwrap())
        .unwrap();
    let err = store.load(1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                problem: Problem::Unparsable { .. },
                ..
            }
        ),
        "{err}"
    );
}

// ---- injected IO faults ----------------------------------------------------------------------------

#[test]
fn an_injected_fault_at_any_stage_leaves_the_previous_checkpoint_latest() {
    let cases = [
        (
            InjectFault::write_after_bytes(1 << 20),
            SaveStage::WriteFiles,
        ),
        (
            InjectFault::once(FaultStage::Write).errno(libc::ENOSPC),
            SaveStage::WriteFiles,
        ),
        (
            InjectFault::once(FaultStage::FileSync),
            SaveStage::SyncFiles,
        ),
        (InjectFault::once(FaultStage::DirSync), SaveStage::SyncDir),
        (InjectFault::once(FaultStage::Rename), SaveStage::Rename),
        (
            InjectFault::once(FaultStage::DirSync).skip(1),
            SaveStage::SyncDir,
        ), // after the rename
        (
            InjectFault::once(FaultStage::CatalogCommit),
            SaveStage::CatalogCommit,
        ),
        (
            InjectFault::once(FaultStage::CatalogFlush),
            SaveStage::CatalogCommit,
        ),
    ];
    for (i, (fault, stage)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path(), 2).save(&payload(1, 2048)).unwrap();
        let fault = Arc::new(fault);
        let store = open_with_fault(dir.path(), 2, fault.clone());
        let err = store.save(&payload(2, 2048)).unwrap_err();
        assert_eq!(err.save_stage(), Some(stage), "case {i}: {err}");
        assert!(matches!(&err, Error::Save { step: 2, .. }), "case {i}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "names the path: {err}"
        );
        assert_eq!(fault.remaining(), 0, "case {i}: the fault fired");
        assert_eq!(err.is_disk_full(), i == 1, "case {i}");

        assert_eq!(store.latest_step().unwrap(), Some(1), "case {i}");
        assert_eq!(store.steps().unwrap(), vec![1], "case {i}");
        assert_eq!(
            entries(&store),
            ["step-000000000001"],
            "case {i}: partial directory removed"
        );
        assert_same_groups(
            &store.load_latest_valid().unwrap().unwrap(),
            &payload(1, 2048),
        );
        let failed = events_of(&store, event_kind::SAVE_FAILED);
        assert_eq!(failed.len(), 1, "case {i}");
        assert_eq!(failed[0].event.fields["leftover_removed"], json!(true));

        // The fault is spent: the same payload now saves.
        store.save(&payload(2, 2048)).unwrap();
        assert_eq!(store.latest_step().unwrap(), Some(2), "case {i}");
        drop(store);
        let store = open(dir.path(), 2);
        assert_eq!(
            store.load_latest_valid().unwrap().unwrap().step(),
            2,
            "case {i}"
        );
        assert_eq!(
            entries(&store),
            ["step-000000000001", "step-000000000002"],
            "case {i}"
        );
    }
}

#[test]
fn a_failed_deletion_does_not_fail_the_save_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 2);
        store.save(&payload(1, 50)).unwrap();
        store.save(&payload(2, 50)).unwrap();
    }
    let fault = Arc::new(InjectFault::once(FaultStage::Gc));
    let store = open_with_fault(dir.path(), 2, fault.clone());
    let r = store.save(&payload(3, 50)).unwrap();
    assert_eq!(fault.remaining(), 0);
    assert_eq!(r.deleted, vec![1], "forgotten by the catalog");
    assert!(
        r.gc_error.as_deref().unwrap().contains("step-000000000001"),
        "{:?}",
        r.gc_error
    );
    assert_eq!(
        entries(&store),
        [
            "step-000000000001",
            "step-000000000002",
            "step-000000000003"
        ]
    );
    assert_eq!(events_of(&store, event_kind::GC_FAILED).len(), 1);
    assert_eq!(store.steps().unwrap(), vec![2, 3]);

    let r = store.save(&payload(4, 50)).unwrap();
    assert_eq!((r.deleted, r.gc_error), (vec![2], None));
    assert_eq!(entries(&store), ["step-000000000003", "step-000000000004"]);
}

// ---- the state directory ---------------------------------------------------------------------

#[test]
fn a_second_open_of_the_same_directory_is_refused_with_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    let err = Store::open(dir.path(), StoreOptions::new(Retention::keep_last(2))).unwrap_err();
    assert!(
        matches!(&err, Error::InUse { pid: Some(p), .. } if *p == std::process::id()),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "state directory {} is in use by pid {}",
            dir.path().display(),
            std::process::id()
        )
    );
    drop(store);
    open(dir.path(), 2);
}

#[test]
fn an_unusable_state_directory_is_a_typed_error_naming_the_path() {
    // Root ignores permission bits, so use paths no one can create: a directory below a
    // regular file (ENOTDIR).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let state = file.join("state");
    let err = Store::open(&state, StoreOptions::new(Retention::keep_last(2))).unwrap_err();
    assert!(
        matches!(&err, Error::Io { op: "create state directory", path, .. } if path == &state),
        "{err}"
    );
    assert!(err.to_string().contains("not-a-dir/state"), "{err}");

    // The directory becomes unusable while the store is open: `checkpoints/` replaced by a
    // regular file. The save fails with the path, nothing is committed, and it works again
    // once the directory is back.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    let ckpts = store.checkpoints_dir().to_owned();
    fs::remove_dir(&ckpts).unwrap();
    fs::write(&ckpts, b"oops").unwrap();
    let err = store.save(&payload(1, 10)).unwrap_err();
    assert_eq!(err.save_stage(), Some(SaveStage::Prepare), "{err}");
    assert!(
        err.to_string()
            .contains("checkpoints/step-000000000001.tmp"),
        "{err}"
    );
    assert_eq!(store.latest_step().unwrap(), None);
    fs::remove_file(&ckpts).unwrap();
    fs::create_dir(&ckpts).unwrap();
    store.save(&payload(1, 10)).unwrap();
}

#[test]
fn open_removes_leftovers_of_interrupted_saves() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = dir.path().join("checkpoints");
    {
        let store = open(dir.path(), 2);
        store.save(&payload(1, 20)).unwrap();
        store.save(&payload(2, 20)).unwrap();
    }
    // A save killed while writing, and one killed between rename and commit.
    fs::create_dir(ckpts.join("step-000000000003.tmp")).unwrap();
    fs::write(
        ckpts.join("step-000000000003.tmp/student.safetensors"),
        b"partial",
    )
    .unwrap();
    fs::create_dir(ckpts.join("step-000000000004")).unwrap();
    fs::write(ckpts.join("step-000000000004/manifest.json"), b"{}").unwrap();
    fs::write(ckpts.join("README"), b"not ours").unwrap();

    let store = open(dir.path(), 2);
    assert_eq!(
        entries(&store),
        ["README", "step-000000000001", "step-000000000002"]
    );
    assert_eq!(events_of(&store, event_kind::CLEANED).len(), 2);
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 2);
}

#[test]
fn a_lost_catalog_is_rebuilt_from_the_manifest_copies() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 3);
        for step in 1..=4 {
            store.save(&payload(step, 30)).unwrap();
        }
        flip_byte(&file_of(&store, 2, "teacher"), 3);
    }
    fs::remove_dir_all(dir.path().join("catalog")).unwrap();
    let store = open(dir.path(), 3);
    assert_eq!(store.steps().unwrap(), vec![2, 3, 4]);
    assert_eq!(store.latest_step().unwrap(), Some(4));
    let loaded = store.load_latest_valid().unwrap().unwrap();
    assert_same_groups(&loaded, &payload(4, 30));
    assert_eq!(loaded.manifest.previous_step, Some(3));
    let rebuilt = events_of(&store, event_kind::CATALOG_REBUILT);
    assert_eq!(rebuilt.len(), 1);
    assert_eq!(
        rebuilt[0].event.fields["bad"],
        json!([2]),
        "verified while importing"
    );
    assert!(store.list().unwrap()[0].bad.is_some());
}

#[test]
fn a_corrupt_catalog_is_moved_aside_and_rebuilt_on_request() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 2);
        store.save(&payload(1, 30)).unwrap();
        store.save(&payload(2, 30)).unwrap();
    }
    // Garbage over sled's config and data files.
    for name in ["conf", "db"] {
        let path = dir.path().join("catalog").join(name);
        let len = fs::metadata(&path).unwrap().len() as usize;
        fs::write(&path, vec![0xa5; len.max(64)]).unwrap();
    }
    let err = Store::open(dir.path(), StoreOptions::new(Retention::keep_last(2))).unwrap_err();
    assert!(matches!(err, Error::Catalog { .. }), "{err}");
    assert!(err.to_string().contains("catalog"), "{err}");

    let store =
        Store::rebuild_catalog(dir.path(), StoreOptions::new(Retention::keep_last(2))).unwrap();
    assert_eq!(store.load_latest_valid().unwrap().unwrap().step(), 2);
    let aside: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("catalog.broken-"))
        .collect();
    assert_eq!(aside.len(), 1, "the broken catalog is kept for inspection");
}

/// Measures disk usage at the moment of the catalog commit, when the new checkpoint is on disk
/// and retention has not yet run: the peak of a save.
#[derive(Debug)]
struct PeakUsage {
    dir: PathBuf,
    peak: std::sync::atomic::AtomicU64,
}

impl FaultInjector for PeakUsage {
    fn check(&self, point: &FaultPoint<'_>) -> std::io::Result<()> {
        if point.stage == FaultStage::CatalogCommit {
            self.peak
                .fetch_max(disk_usage(&self.dir)?, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

#[test]
fn disk_usage_stays_bounded_with_keep_last_two() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(PeakUsage {
        dir: dir.path().to_owned(),
        peak: 0.into(),
    });
    let store = Store::open(
        dir.path(),
        StoreOptions::new(Retention::keep_last(2)).with_fault_injector(probe.clone()),
    )
    .unwrap();
    let mut ckpt_bytes = 0;
    for step in 1..=30 {
        let r = store.save(&payload(step, 3 * 1024)).unwrap();
        ckpt_bytes = r.bytes;
        for i in 0..5 {
            store
                .append_event(&Event::new(
                    Level::Info,
                    "test.filler",
                    format!("{step}/{i}"),
                ))
                .unwrap();
        }
        store.record_probe(step, "knn_top1", &json!(0.5)).unwrap();
    }
    assert_eq!(entries(&store).len(), 2);
    let total = store.disk_usage().unwrap();
    let catalog = disk_usage(&dir.path().join("catalog")).unwrap();
    let peak = probe.peak.load(std::sync::atomic::Ordering::SeqCst);
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "checkpoint {:.2} MiB; after 30 saves: total {:.2} MiB (catalog {:.2} MiB), peak during a save {:.2} MiB",
        mib(ckpt_bytes),
        mib(total),
        mib(catalog),
        mib(peak)
    );
    assert!(
        total <= 2 * ckpt_bytes + 2 * 1048576,
        "total {total} for checkpoints of {ckpt_bytes}"
    );
    assert!(
        peak >= 3 * ckpt_bytes,
        "peak {peak}: three checkpoints exist at commit time"
    );
    assert!(peak <= 3 * ckpt_bytes + 2 * 1048576, "peak {peak}");
    assert!(catalog < 2 * 1048576, "catalog {catalog}");
}

#[test]
fn scores_drive_keep_best() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention::keep_last(2).with_keep_best("knn_top1", true);
    let store = Store::open(dir.path(), StoreOptions::new(retention)).unwrap();
    for (step, score) in [(1, 0.2), (2, 0.7), (3, 0.4), (4, 0.5), (5, 0.6)] {
        store.save(&payload(step, 10)).unwrap();
        store.set_score(step, "knn_top1", score).unwrap();
        store.set_score(step, "other", 1.0 - score).unwrap();
    }
    store.set_score(99, "knn_top1", 1.0).unwrap(); // evaluated, never checkpointed
    store.save(&payload(6, 10)).unwrap();
    assert_eq!(store.steps().unwrap(), vec![2, 5, 6]);
    let list = store.list().unwrap();
    assert_eq!(
        list[0].keep,
        vec![KeepReason::Best {
            metric: "knn_top1".into(),
            value: 0.7
        }]
    );
    assert_eq!(list[0].scores.get("other"), Some(&0.30000000000000004));
    assert!(
        store.scores(1).unwrap().is_empty(),
        "scores of deleted steps are removed"
    );
    assert_eq!(
        store.scores(99).unwrap().len(),
        1,
        "a pending score above latest is kept"
    );
}

// ---- events, probes, status, quarantine -----------------------------------------------------------------

#[test]
fn the_event_log_is_bounded_and_its_sequence_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions::new(Retention::keep_last(2)).with_max_events(10);
    {
        let store = Store::open(dir.path(), options()).unwrap();
        for i in 1..=25u64 {
            let ev = Event::new(Level::Info, "actor.restarted", format!("restart {i}"))
                .actor("trainer-0")
                .step(i * 10)
                .fields(json!({ "i": i }));
            assert_eq!(store.append_event(&ev).unwrap(), i);
        }
        let recent = store.recent_events(100).unwrap();
        assert_eq!(
            recent.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (16..=25).collect::<Vec<_>>()
        );
        let since = store.events_since(20, 2).unwrap();
        assert_eq!(since.iter().map(|e| e.seq).collect::<Vec<_>>(), [21, 22]);
        assert_eq!(since[0].event.actor.as_deref(), Some("trainer-0"));
        assert_eq!(since[0].event.fields, json!({ "i": 21 }));
        assert!(store.events_since(25, 10).unwrap().is_empty());
        assert!(store.events_since(u64::MAX, 10).unwrap().is_empty());
    }
    let store = Store::open(dir.path(), options()).unwrap();
    let seq = store
        .append_event(&Event::new(Level::Warn, "x", "after reopen"))
        .unwrap();
    assert_eq!(seq, 26, "never reused");
    assert_eq!(
        store.recent_events(1).unwrap()[0].event.message,
        "after reopen"
    );
    assert_eq!(store.recent_events(100).unwrap().len(), 10);
    // JSON shape for `dinod events --json`.
    let v = serde_json::to_value(&store.recent_events(1).unwrap()[0]).unwrap();
    assert_eq!(
        (v["seq"].clone(), v["level"].clone(), v["kind"].clone()),
        (json!(26), json!("warn"), json!("x"))
    );
}

#[test]
fn probes_status_and_quarantine_persist() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 2);
        for step in [300, 100, 200] {
            store
                .record_probe(step, "knn_top1", &json!(step as f64 / 1000.0))
                .unwrap();
        }
        store
            .record_probe(100, "linear", &json!({ "top1": 0.5 }))
            .unwrap();
        store.record_probe(100, "knn", &json!(1)).unwrap(); // a prefix of another name
        assert!(store.record_probe(1, "bad\0name", &json!(1)).is_err());
        store
            .put_status("trainer-0", &json!({ "phase": "step", "since_ms": 5 }))
            .unwrap();
        store
            .put_status("teacher", &json!({ "phase": "idle" }))
            .unwrap();
        store
            .put_status("teacher", &json!({ "phase": "load" }))
            .unwrap();
        store.put_status("gone", &json!(null)).unwrap();
        store.remove_status("gone").unwrap();
        store
            .quarantine_add("batch:12:3", &json!({ "reason": "nan loss", "step": 12 }))
            .unwrap();
        store.flush().unwrap();
    }
    let store = open(dir.path(), 2);
    let hist = store.probe_history("knn_top1").unwrap();
    assert_eq!(
        hist.iter().map(|r| r.step).collect::<Vec<_>>(),
        [100, 200, 300]
    );
    assert_eq!(hist[2].value, json!(0.3));
    assert_eq!(store.probe_history("knn").unwrap().len(), 1);
    let latest: Vec<(String, u64)> = store
        .latest_probes()
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.step))
        .collect();
    assert_eq!(
        latest,
        [
            ("knn".to_owned(), 100),
            ("knn_top1".to_owned(), 300),
            ("linear".to_owned(), 100)
        ]
    );
    let status = store.status_all().unwrap();
    assert_eq!(status.keys().collect::<Vec<_>>(), ["teacher", "trainer-0"]);
    assert_eq!(status["teacher"], json!({ "phase": "load" }));
    assert!(store.quarantine_contains("batch:12:3").unwrap());
    assert!(!store.quarantine_contains("batch:12:4").unwrap());
    assert_eq!(
        store.quarantine_list().unwrap()["batch:12:3"]["reason"],
        json!("nan loss")
    );
}

#[test]
fn loads_during_concurrent_saves_never_see_false_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 2));
    store.save(&payload(1, 100)).unwrap();
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut loads = 0;
            while store.latest_step().unwrap() != Some(12) {
                let ckpt = store.load_latest_valid().unwrap().unwrap();
                assert!(ckpt.skipped.is_empty(), "{:?}", ckpt.skipped);
                assert_same_groups(&ckpt, &payload(ckpt.step(), 100));
                loads += 1;
            }
            loads
        })
    };
    for step in 2..=12 {
        store.save(&payload(step, 100)).unwrap();
    }
    let loads = reader.join().unwrap();
    assert!(loads > 0);
    assert!(events_of(&store, event_kind::FALLBACK).is_empty());
    assert!(store.list().unwrap().iter().all(|e| e.bad.is_none()));
}

#[test]
fn store_and_error_can_cross_threads() {
    // The daemon shares the store between its writer thread and readers, and wraps errors in
    // anyhow: both need `Send + Sync + 'static`.
    fn check<T: Send + Sync + 'static>() {}
    check::<Store>();
    check::<Error>();
    check::<LoadedCheckpoint>();
}

// ---- free space ------------------------------------------------------------------------------

fn step_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A checkpoint that would not fit beside the bytes that must stay free is refused before
/// anything is written, with a typed error that says what is free and what is needed; the
/// previous checkpoint stays the latest. One that fits, but after which the next would not,
/// is saved and says so.
#[test]
fn a_save_that_would_eat_into_the_free_reserve_is_refused_and_a_tight_one_warned() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = open(dir.path(), 2);
    let rep = roomy.save(&payload(1, 64)).unwrap();
    assert_eq!(rep.disk_low, None, "64 KiB fit twice on this disk");
    drop(roomy);
    let before = step_dirs(dir.path());

    let options =
        |reserve: u64| StoreOptions::new(Retention::keep_last(2)).with_min_free_bytes(reserve);
    let store = Store::open(dir.path(), options(u64::MAX / 2)).unwrap();
    let err = store.save(&payload(2, 64)).unwrap_err();
    match &err {
        Error::Save {
            step: 2,
            stage: SaveStage::Space,
            cause,
        } => assert!(matches!(**cause, Error::NoSpace { .. }), "{err}"),
        other => panic!("not a refusal for space: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("checking the free space") && msg.contains("must stay free"),
        "{msg}"
    );
    // the message carries its cause; a `source()` as well would print it twice in an
    // error chain (`{:#}` of anyhow, as the daemon logs it)
    assert!(std::error::Error::source(&err).is_none());
    assert_eq!(msg.matches("must stay free").count(), 1, "{msg}");
    assert_eq!(store.latest_step().unwrap(), Some(1));
    assert_eq!(
        step_dirs(dir.path()),
        before,
        "nothing written, no temporary directory"
    );
    let events = store.recent_events(10).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.event.kind == event_kind::SAVE_FAILED
                && e.event.fields["stage"] == "space"
                && e.event.fields["disk_full"] == true),
        "{events:?}"
    );
    drop(store);

    // a reserve that leaves room for this checkpoint and half of another
    let p = payload(3, 16 << 10);
    let needed: u64 = p.groups.iter().map(|g| g.data_bytes()).sum();
    let available = crate::fsx::available_bytes(&dir.path().join("checkpoints")).unwrap();
    assert!(
        available > 4 * needed,
        "this test needs {} bytes free",
        4 * needed
    );
    let store = Store::open(dir.path(), options(available - needed - needed / 2)).unwrap();
    let rep = store.save(&p).unwrap();
    let low = rep.disk_low.expect("the next checkpoint does not fit");
    assert_eq!(
        (low.next, low.reserve),
        (rep.bytes, available - needed - needed / 2)
    );
    assert!(low.available < low.next + low.reserve, "{low}");
    assert!(low.to_string().contains("will not fit"), "{low}");
    assert_eq!(store.latest_step().unwrap(), Some(3));
}
