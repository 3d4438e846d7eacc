//! iBOT masks: exact counts and ratios of the official collate, block structure, determinism, the
//! derived index/weight tensors, and agreement with the golden fixtures' masks.

use std::collections::HashMap;
use std::path::Path;

use crate::mask::linspace_f32;
use crate::{
    generate_masks, mask_indices, masked_counts, masks_weight, n_masked, KeyedRng, MaskConfig,
    MaskGenerator,
};

fn row_sums(masks: &[u8], n_patches: usize) -> Vec<usize> {
    masks
        .chunks_exact(n_patches)
        .map(|r| r.iter().filter(|&&m| m != 0).count())
        .collect()
}

#[test]
fn linspace_is_torch_float32() {
    let l = linspace_f32(0.1, 0.5, 5);
    assert_eq!(
        l,
        vec![0.1f32, 0.1 + 0.1f32, 0.5 - 0.1f32 * 2.0, 0.5 - 0.1f32, 0.5]
    );
    // (0.5f - 0.1f) / 4 is the float32 step torch uses.
    let step = (0.5f32 - 0.1f32) / 4.0;
    assert_eq!(l[1], 0.1f32 + step);
}

#[test]
fn masked_counts_follow_the_official_collate() {
    let cfg = MaskConfig::default();
    // B = 2: 4 global crops, int(4 * 0.5) = 2 masked, ratios linspace(0.1, 0.5, 3)[1..] = 0.3, 0.5.
    assert_eq!(masked_counts(&cfg, 4, 196), vec![58, 98]);
    // B = 4 on a 4x4 grid (the losses fixture): ratios 0.2, 0.3, 0.4, 0.5.
    assert_eq!(masked_counts(&cfg, 8, 16), vec![3, 4, 6, 8]);
    for b in [1usize, 2, 3, 8, 32, 64] {
        let counts = masked_counts(&cfg, 2 * b, 196);
        assert_eq!(counts.len(), b, "exactly int(2B * 0.5) crops are masked");
        let ratios: Vec<f64> = counts.iter().map(|&c| c as f64 / 196.0).collect();
        assert!(ratios.windows(2).all(|w| w[0] <= w[1]));
        assert!(
            ratios[0] > 0.1 - 1e-9 && (ratios[b - 1] - 0.5).abs() < 1e-9,
            "{ratios:?}"
        );
    }
    let third = MaskConfig {
        sample_probability: 0.3,
        ..MaskConfig::default()
    };
    assert_eq!(masked_counts(&third, 10, 100).len(), 3);
}

#[test]
fn batch_masks_have_exact_counts_and_are_shuffled() {
    let cfg = MaskConfig::default();
    let (b, grid) = (16usize, 14usize);
    let n = grid * grid;
    let mut masked_rows = vec![0usize; 2 * b];
    for batch in 0..40 {
        let masks = generate_masks(&cfg, 2 * b, grid, 9, batch);
        assert_eq!(masks.len(), 2 * b * n);
        assert!(masks.iter().all(|&m| m <= 1));
        let mut sums = row_sums(&masks, n);
        for (r, &s) in sums.iter().enumerate() {
            masked_rows[r] += usize::from(s > 0);
        }
        sums.sort();
        let mut want = masked_counts(&cfg, 2 * b, n);
        want.extend(std::iter::repeat_n(0, b));
        want.sort();
        assert_eq!(sums, want, "batch {batch}");
    }
    assert!(
        masked_rows.iter().all(|&k| k > 5 && k < 35),
        "masks are spread over rows: {masked_rows:?}"
    );
    assert_eq!(
        generate_masks(&cfg, 32, 14, 9, 3),
        generate_masks(&cfg, 32, 14, 9, 3)
    );
    assert_ne!(
        generate_masks(&cfg, 32, 14, 9, 3),
        generate_masks(&cfg, 32, 14, 9, 4)
    );
    assert_ne!(
        generate_masks(&cfg, 32, 14, 9, 3),
        generate_masks(&cfg, 32, 14, 10, 3)
    );
}

#[test]
fn block_generator_places_blocks_then_tops_up_exactly() {
    let cfg = MaskConfig::default();
    let gen = MaskGenerator::new(14, 14, &cfg);
    let mut rng = KeyedRng::new(&[11]);
    let mut with_neighbour = 0usize;
    let mut total = 0usize;
    for count in [0usize, 1, 3, 19, 58, 98, 150, 196] {
        for _ in 0..20 {
            let m = gen.generate(count, &mut rng);
            assert_eq!(n_masked(&m), count);
            if (19..=98).contains(&count) {
                for i in 0..14 {
                    for j in 0..14 {
                        if m[i * 14 + j] == 1 {
                            total += 1;
                            let nb = [
                                (i.wrapping_sub(1), j),
                                (i + 1, j),
                                (i, j.wrapping_sub(1)),
                                (i, j + 1),
                            ];
                            with_neighbour += usize::from(
                                nb.iter()
                                    .any(|&(a, b)| a < 14 && b < 14 && m[a * 14 + b] == 1),
                            );
                        }
                    }
                }
            }
        }
    }
    // Rectangular blocks: nearly every masked patch touches another (a uniform random mask at these
    // densities would have far fewer).
    assert!(
        with_neighbour as f64 / total as f64 > 0.9,
        "{with_neighbour}/{total}"
    );
}

#[test]
fn mask_indices_and_weights() {
    let masks = [0u8, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    assert_eq!(mask_indices(&masks), vec![1, 2, 8]);
    assert_eq!(masks_weight(&masks, 4), vec![0.5, 0.5, 1.0]);
    assert_eq!(n_masked(&masks), 3);
}

/// Reads the uint8 `input.masks` and friends from a golden safetensors file.
/// Tensor name -> (shape, dtype, raw bytes).
type Tensors = HashMap<String, (Vec<usize>, String, Vec<u8>)>;

fn fixture_tensors(path: &Path) -> Option<Tensors> {
    let bytes = std::fs::read(path).ok()?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).ok()?;
    let data = &bytes[8 + header_len..];
    let mut out = HashMap::new();
    for name in [
        "input.masks",
        "input.mask_indices",
        "input.masks_weight",
        "input.n_masked_patches",
    ] {
        let t = header.get(name)?;
        let shape = t["shape"]
            .as_array()?
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()?;
        let off = t["data_offsets"].as_array()?;
        let (a, b) = (off[0].as_u64()? as usize, off[1].as_u64()? as usize);
        out.insert(
            name.to_string(),
            (shape, t["dtype"].as_str()?.to_string(), data[a..b].to_vec()),
        );
    }
    Some(out)
}

#[test]
fn golden_fixture_masks_have_the_official_counts_and_derived_tensors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden");
    let mut checked = 0;
    for file in ["losses.safetensors", "train_step.safetensors"] {
        let Some(t) = fixture_tensors(&dir.join(file)) else {
            eprintln!(
                "golden fixture {file} not found under {}: skipped",
                dir.display()
            );
            continue;
        };
        let (shape, dtype, masks) = &t["input.masks"];
        assert_eq!(dtype, "U8");
        let (n_crops, n_patches) = (shape[0], shape[1]);
        let mut sums = row_sums(masks, n_patches);
        sums.sort();
        let mut want = masked_counts(&MaskConfig::default(), n_crops, n_patches);
        want.extend(std::iter::repeat_n(0, n_crops - want.len()));
        want.sort();
        assert_eq!(
            sums, want,
            "{file}: per-crop masked counts of the official collate"
        );
        let (_, _, idx) = &t["input.mask_indices"];
        let idx: Vec<u32> = idx
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
            .collect();
        assert_eq!(mask_indices(masks), idx, "{file}: mask_indices");
        let (_, wdtype, w) = &t["input.masks_weight"];
        assert_eq!(wdtype, "F64");
        let w: Vec<f64> = w
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let ours = masks_weight(masks, n_patches);
        assert_eq!(ours.len(), w.len());
        for (a, b) in ours.iter().zip(&w) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-7,
                "{file}: weight {a} vs {b}"
            );
        }
        let (_, _, nm) = &t["input.n_masked_patches"];
        assert_eq!(
            n_masked(masks) as i64,
            i64::from_le_bytes(nm[..8].try_into().expect("8 bytes"))
        );
        checked += 1;
    }
    eprintln!("checked {checked} golden fixture(s)");
}
