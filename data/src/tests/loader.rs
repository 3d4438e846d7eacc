//! The loader: byte-identical batches for any worker count, resume from a cursor, epoch order,
//! crop-major layout, high-resolution size mixes.

use std::path::PathBuf;
use std::sync::Arc;

use image::{Rgb, RgbImage};

use super::util::{part_of, small_opts, without_bad_inputs};
use crate::rng::Permutation;
use crate::{
    CropSizes, Cursor, DataError, HighResConfig, HostBatch, Loader, Order, Sample, Source,
    SyntheticConfig, SyntheticScenes,
};

fn synthetic(len: u64) -> Arc<dyn Source> {
    Arc::new(SyntheticScenes::new(SyntheticConfig {
        size: 40,
        len,
        ..Default::default()
    }))
}

fn run(
    source: &Arc<dyn Source>,
    opts: crate::LoaderOptions,
    start: Cursor,
    n: usize,
) -> Vec<HostBatch> {
    let mut loader = Loader::new(Arc::clone(source), opts, start).expect("loader");
    (0..n)
        .map(|_| loader.next_batch().expect("batch"))
        .collect()
}

#[test]
fn loader_and_sources_can_move_between_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Loader>();
    send::<HostBatch>();
    send_sync::<Arc<dyn Source>>();
    send_sync::<crate::FolderSource>();
    send_sync::<crate::IdxSource>();
    send_sync::<crate::CopyPasteSource>();
    send_sync::<SyntheticScenes>();
}

#[test]
fn batches_are_byte_identical_for_any_worker_count() {
    let source = synthetic(10);
    let one = run(&source, small_opts(4, 1), Cursor::default(), 6);
    for workers in [2, 3] {
        let many = run(&source, small_opts(4, workers), Cursor::default(), 6);
        assert!(one == many, "{workers} workers differ from 1");
    }
    // Sanity: the batches are not trivially equal to each other.
    assert_ne!(one[0].global_crops, one[1].global_crops);
    let b = &one[0];
    assert_eq!(b.global_crops.len(), 2 * 4 * 3 * 32 * 32);
    assert_eq!(b.local_crops.len(), 3 * 4 * 3 * 16 * 16);
    assert_eq!(b.masks.len(), 2 * 4 * 16);
    assert_eq!(b.n_masked(), b.mask_indices().len());
    assert_eq!(b.masks_weight().len(), b.n_masked());
    assert!(b.global_crops.iter().all(|v| v.is_finite()));
}

#[test]
fn resuming_from_a_cursor_equals_the_uninterrupted_stream() {
    let source = synthetic(10);
    let all = run(&source, small_opts(4, 2), Cursor::default(), 7);
    let cursor = all[2].cursor_after;
    // The cursor survives a checkpoint round trip.
    let json = serde_json::to_string(&cursor).expect("serialise");
    let cursor: Cursor = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(
        cursor,
        Cursor {
            epoch: 1,
            index_in_epoch: 2,
            batches_done: 3,
            source_len: Some(10),
        }
    );
    let resumed = run(&source, small_opts(4, 3), cursor, 4);
    assert!(all[3..] == resumed[..], "resumed batches differ");
}

#[test]
fn each_epoch_is_a_keyed_permutation_of_the_source() {
    let source = synthetic(12);
    let batches = run(&source, small_opts(6, 2), Cursor::default(), 4);
    let epoch = |k: usize| -> Vec<u64> {
        batches[2 * k]
            .source_indices
            .iter()
            .chain(&batches[2 * k + 1].source_indices)
            .copied()
            .collect()
    };
    for k in 0..2 {
        let mut seen = epoch(k);
        seen.sort();
        assert_eq!(
            seen,
            (0..12).collect::<Vec<_>>(),
            "epoch {k} visits every sample once"
        );
    }
    assert_ne!(epoch(0), epoch(1), "epochs are shuffled differently");
    assert_ne!(epoch(0), (0..12).collect::<Vec<_>>(), "epoch 0 is shuffled");
    assert_eq!(
        batches[3].cursor_after,
        Cursor {
            epoch: 2,
            index_in_epoch: 0,
            batches_done: 4,
            source_len: Some(12),
        }
    );
    let mut sequential = small_opts(6, 1);
    sequential.order = Order::Sequential;
    let seq = run(&source, sequential, Cursor::default(), 2);
    assert_eq!(seq[0].source_indices, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(
        seq[0].labels,
        (0..6)
            .map(|i| source.get(i).expect("sample").label)
            .collect::<Vec<_>>()
    );
}

#[test]
fn feistel_permutation_is_a_bijection() {
    for n in [1u64, 2, 3, 7, 64, 1000, 12345] {
        let p = Permutation::new(n, &[1, 2, n]);
        let mut seen = vec![false; n as usize];
        for i in 0..n {
            let j = p.apply(i);
            assert!(j < n && !seen[j as usize], "n = {n}: {i} -> {j}");
            seen[j as usize] = true;
        }
    }
}

/// Image `i` is a flat colour that encodes `i`, label `i`.
struct Flat(u64);

impl Source for Flat {
    fn len(&self) -> Option<u64> {
        Some(self.0)
    }
    fn get(&self, index: u64) -> Result<Sample, DataError> {
        let v = (index * 20) as u8;
        Ok(Sample {
            image: RgbImage::from_pixel(24, 20, Rgb([v, 255 - v, 7])),
            label: Some(index as u32),
            label_map: None,
            id: index.to_string(),
        })
    }
    fn n_classes(&self) -> Option<usize> {
        None
    }
    fn class_names(&self) -> &[String] {
        &[]
    }
    fn describe(&self) -> String {
        "flat colours".into()
    }
    fn location(&self) -> PathBuf {
        PathBuf::from("flat")
    }
}

#[test]
fn rows_are_crop_major() {
    let mut opts = small_opts(3, 2);
    opts.order = Order::Sequential;
    opts.crops.color_jitter.p = 0.0;
    opts.crops.grayscale_p = 0.0;
    opts.crops.solarize_p = 0.0;
    opts.crops.blur = crate::BlurConvention::Off;
    let source: Arc<dyn Source> = Arc::new(Flat(6));
    let batch = run(&source, opts.clone(), Cursor::default(), 2)
        .pop()
        .expect("batch");
    assert_eq!(batch.source_indices, vec![3, 4, 5]);
    assert_eq!(batch.labels, vec![Some(3), Some(4), Some(5)]);
    let (mean, std) = (opts.crops.mean[0], opts.crops.std[0]);
    let red = |row: &[f32]| ((row[0] * std + mean) * 255.0).round() as u64;
    let (g, l) = (3 * 32 * 32, 3 * 16 * 16);
    for c in 0..2 {
        for b in 0..3 {
            let row = &batch.global_crops[(c * 3 + b) * g..(c * 3 + b + 1) * g];
            assert_eq!(
                red(row),
                (3 + b as u64) * 20,
                "global crop {c} of image {b}"
            );
        }
    }
    for c in 0..3 {
        for b in 0..3 {
            let row = &batch.local_crops[(c * 3 + b) * l..(c * 3 + b + 1) * l];
            assert_eq!(red(row), (3 + b as u64) * 20, "local crop {c} of image {b}");
        }
    }
}

/// Two crop-size tuples drawn half and half, each with a Gram view.
fn two_size_mix() -> HighResConfig {
    HighResConfig {
        sizes: vec![
            CropSizes {
                global: 32,
                local: 16,
                gram: Some(48),
            },
            CropSizes {
                global: 48,
                local: 24,
                gram: Some(64),
            },
        ],
        probs: vec![0.5, 0.5],
    }
}

#[test]
fn high_resolution_sizes_are_drawn_per_batch() {
    let mut opts = small_opts(2, 2);
    opts.crops.high_res = Some(two_size_mix());
    opts.crops.gram_teacher_no_distortions = true;
    let source = synthetic(8);
    let batches = run(&source, opts.clone(), Cursor::default(), 10);
    let mut used = std::collections::HashSet::new();
    for b in &batches {
        let s = CropSizes {
            global: b.global_size,
            local: b.local_size,
            gram: b.gram_size,
        };
        assert_eq!(s, opts.crops.sizes_for_batch(opts.seed, b.batch_index));
        used.insert(s);
        let (g, l, gr) = (
            s.global as usize,
            s.local as usize,
            s.gram.expect("gram") as usize,
        );
        assert_eq!(b.global_crops.len(), 2 * 2 * 3 * g * g);
        assert_eq!(b.local_crops.len(), 3 * 2 * 3 * l * l);
        assert_eq!(
            b.gram_crops.as_ref().map(Vec::len),
            Some(2 * 2 * 3 * gr * gr)
        );
        assert_eq!(b.masks.len(), 2 * 2 * (g / 8) * (g / 8));
    }
    assert_eq!(used.len(), 2, "both size tuples occur in 10 batches");
    let again = run(&source, opts, batches[4].cursor_after, 3);
    assert!(batches[5..8] == again[..]);
    let official = HighResConfig::official_7b();
    let mut counts = [0usize; 5];
    for k in 0..4000 {
        let s = official.pick(1, k);
        counts[official.sizes.iter().position(|x| *x == s).expect("listed")] += 1;
    }
    let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 4000.0).collect();
    for (f, p) in freq.iter().zip(&official.probs) {
        assert!((f - p).abs() < 0.03, "{freq:?}");
    }
}

#[test]
fn invalid_options_are_reported_together() {
    let mut opts = small_opts(0, 0);
    opts.crops.global_size = 30; // not a multiple of patch 8
    opts.crops.flip_p = 1.5;
    let err = Loader::new(synthetic(4), opts, Cursor::default()).expect_err("invalid");
    let DataError::Config(list) = err else {
        panic!("expected a config error")
    };
    assert!(list.len() >= 4, "{list:?}");
    let text = list.join("\n");
    for needle in [
        "multiple of patch_size",
        "flip_p",
        "batch_size",
        "n_workers",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
}

#[test]
fn recycled_buffers_give_the_same_batches() {
    // Mixed sizes and distorted Gram views exercise every write path; a row left unwritten would show
    // stale data from an earlier batch.
    let mut opts = small_opts(3, 2);
    opts.crops.high_res = Some(HighResConfig {
        sizes: vec![
            CropSizes {
                global: 32,
                local: 16,
                gram: Some(48),
            },
            CropSizes {
                global: 16,
                local: 8,
                gram: Some(16),
            },
        ],
        probs: vec![0.5, 0.5],
    });
    opts.crops.gram_teacher_no_distortions = false;
    let source = synthetic(9);
    let plain = run(&source, opts.clone(), Cursor::default(), 8);
    let mut loader = Loader::new(Arc::clone(&source), opts, Cursor::default()).expect("loader");
    for (k, want) in plain.iter().enumerate() {
        let got = loader.next_batch().expect("batch");
        assert!(got == *want, "batch {k} differs with recycled buffers");
        loader.recycle(got);
    }
}

#[test]
fn eval_loading_is_independent_of_threads() {
    let source = synthetic(30);
    let cfg = crate::EvalConfig {
        size: 32,
        ..Default::default()
    };
    let indices: Vec<u64> = (0..13).collect();
    let one = crate::load_eval(&*source, &indices, &cfg, 1).expect("eval");
    let three = crate::load_eval(&*source, &indices, &cfg, 3).expect("eval");
    assert_eq!(one, three);
    assert_eq!(one.rgb.len(), 13 * 3 * 32 * 32);
    assert_eq!(one.label_maps.as_ref().map(Vec::len), Some(13 * 32 * 32));
    assert_eq!(one.indices, indices);
    assert!(one.labels.iter().all(Option::is_some));
    let report = crate::scan(
        &crate::SourceSpec::Synthetic {
            seed: 0,
            size: Some(32),
        },
        &crate::ScanOptions::default(),
    )
    .expect("scan");
    assert_eq!(
        (report.scanned, report.readable),
        (1000, 1000),
        "a generated source is sampled, not read whole"
    );
    assert!(report.is_clean() && report.classes.iter().all(|c| c.count > 50));
}

/// A source that changed size since a cursor was saved (files deleted, shards added):
/// the epoch ends at the saved position and the next begins at its first sample, and the
/// loader says so. Before, a position past the new end made the shuffled order walk
/// forever (the loader hung until the watchdog killed the process, at every restart).
#[test]
fn a_cursor_into_a_source_that_changed_size_starts_the_next_epoch() {
    let (big, small, bigger) = (synthetic(12), synthetic(6), synthetic(20));
    let saved = run(&big, small_opts(4, 2), Cursor::default(), 2)[1].cursor_after;
    assert_eq!(
        (saved.epoch, saved.index_in_epoch, saved.source_len),
        (0, 8, Some(12))
    );
    for (source, now) in [(&small, 6), (&bigger, 20)] {
        let loader = Loader::new(Arc::clone(source), small_opts(4, 2), saved).unwrap();
        let change = loader
            .source_change()
            .expect("the change is reported")
            .clone();
        assert_eq!(
            (
                change.before,
                change.now,
                change.epoch,
                change.position,
                change.next_epoch
            ),
            (Some(12), Some(now), 0, 8, 1)
        );
        assert!(change.to_string().contains(&format!(
            "the data source has {now} samples, 12 when position 8 of epoch 0 was saved; \
             epoch 0 ends there and epoch 1 begins"
        )));
        drop(loader);
        // the batches are those of a cursor at the start of epoch 1
        let moved = run(source, small_opts(4, 2), saved, 2);
        let fresh = Cursor {
            epoch: 1,
            index_in_epoch: 0,
            batches_done: saved.batches_done,
            source_len: Some(now),
        };
        assert!(moved == run(source, small_opts(4, 2), fresh, 2));
        assert_eq!(moved[1].cursor_after.source_len, Some(now));
    }
    // a cursor saved before sizes were recorded: moved only when it lies past the end
    let old = Cursor {
        source_len: None,
        ..saved
    };
    let loader = Loader::new(Arc::clone(&small), small_opts(4, 1), old).unwrap();
    assert_eq!(loader.source_change().map(|c| c.next_epoch), Some(1));
    let loader = Loader::new(Arc::clone(&bigger), small_opts(4, 1), old).unwrap();
    assert!(loader.source_change().is_none());
    // an unchanged source: nothing moves
    let loader = Loader::new(Arc::clone(&big), small_opts(4, 1), saved).unwrap();
    assert!(loader.source_change().is_none());
}

/// A member loading its own part of every batch gets exactly its rows of the whole batch:
/// every crop (high-resolution size mixes and Gram views included), every mask row,
/// label and sample, across epoch ends and from a resumed cursor; so a group whose
/// members load their own images trains on the batches one loader would give.
#[test]
fn a_members_part_is_its_rows_of_the_whole_batch() {
    let mut opts = small_opts(4, 2);
    opts.crops.high_res = Some(two_size_mix());
    let source = synthetic(10); // 10 samples, batches of 4: epochs end inside batches
    let whole = run(&source, opts.clone(), Cursor::default(), 7);
    for world in [1, 2, 4] {
        for rank in 0..world {
            let mut o = opts.clone();
            o.part = Some(crate::Part { rank, world });
            let parts = run(&source, o.clone(), Cursor::default(), 7);
            for (w, p) in whole.iter().zip(&parts) {
                assert!(
                    part_of(w, rank, world) == without_bad_inputs(p.clone()),
                    "batch {} of member {rank} of {world}",
                    w.batch_index
                );
            }
            let resumed = run(&source, o, whole[2].cursor_after, 3);
            assert!(
                parts[3..6] == resumed[..],
                "member {rank} of {world} resumed"
            );
        }
    }
    // a part the batch cannot be cut into is refused with the reason
    let mut o = opts;
    o.part = Some(crate::Part { rank: 0, world: 3 });
    let e = Loader::new(source, o, Cursor::default()).expect_err("3 does not divide 4");
    assert!(e.to_string().contains("must divide the batch size"), "{e}");
}
