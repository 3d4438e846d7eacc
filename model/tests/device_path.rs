//! The device code path (`ops::portable` behind every op, moments as tensors beside the
//! parameters, in-place updates through device copies, attention caches of the device
//! kind) run end to end on the host and checked against the golden fixtures, so the
//! plumbing a GPU run depends on is proven on every CI machine. The GPU itself is
//! checked by `scripts/gpu-check.sh` (`dinod parity --device cuda`).
//!
//! A test binary of its own: `ops::portable::set_force_on_cpu` is process-wide.

use candle_core::{DType, Device};
use model::fixture::Fixture;
use model::optim::Moments;
use model::parity::run_on;

fn golden(name: &str) -> Fixture {
    Fixture::golden(name).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_parity(file: &str, dtype: DType) {
    ops::portable::set_force_on_cpu(true);
    let rows = run_on(&golden(file), dtype, &Device::Cpu).unwrap();
    assert!(
        rows.len() > 10,
        "{file}: only {} tensors compared",
        rows.len()
    );
    if dtype == DType::BF16 && file != "vit_forward.safetensors" {
        // the PyTorch table covers every gradient (a regenerated table that lost rows
        // would silently narrow the bar back to 2e-2)
        let uncovered: Vec<&str> = rows
            .iter()
            .filter(|r| r.name.starts_with("grad.") && r.torch_bf16.is_none())
            .map(|r| r.name.as_str())
            .collect();
        assert!(
            uncovered.is_empty(),
            "{file}: no PyTorch bf16 error for {uncovered:?}"
        );
    }
    // bf16: 2e-2, or 2.5x PyTorch's own bf16 error where that is larger (`dinod parity`'s
    // bar; the patch embedding's gradient is at 3.2e-2 here and 3.25e-2 in PyTorch)
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| format!("{} {:e} (tol {:e})", r.name, r.rel_err, r.tol))
        .collect();
    assert!(
        bad.is_empty(),
        "{file} in {dtype:?} on the device path: {} of {} tensors out of tolerance:\n{}",
        bad.len(),
        rows.len(),
        bad.join("\n")
    );
}

#[test]
fn device_path_vit_forward_matches_official() {
    assert_parity("vit_forward.safetensors", DType::F64);
    assert_parity("vit_forward.safetensors", DType::F32);
    assert_parity("vit_forward.safetensors", DType::BF16);
}

#[test]
fn device_path_losses_match_official() {
    assert_parity("losses.safetensors", DType::F64);
    assert_parity("losses.safetensors", DType::F32);
    assert_parity("losses.safetensors", DType::BF16);
}

#[test]
fn device_path_train_step_matches_official() {
    assert_parity("train_step.safetensors", DType::F64);
    assert_parity("train_step.safetensors", DType::F32);
    assert_parity("train_step.safetensors", DType::BF16);
}

/// Moments beside device parameters are tensors; a clone of the optimizer keeps its
/// values when the original steps (updates replace the tensors, never write in place).
#[test]
fn device_moments_are_tensors_and_clones_stay_put() {
    ops::portable::set_force_on_cpu(true);
    let p = candle_core::Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
    let g = candle_core::Tensor::new(&[0.5f32, 0.5, -0.5], &Device::Cpu).unwrap();
    let mo = Moments::zeros_like(&p).unwrap();
    let Moments::Tensors { mut m, mut v } = mo.clone() else {
        panic!("host moments for a device-path parameter")
    };
    let h = ops::optim::AdamWStep {
        lr: 0.1,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        t: 1,
    };
    ops::optim::adamw_update_tensors(&p, &g, &mut m, &mut v, &h).unwrap();
    assert_eq!(mo, Moments::zeros_like(&p).unwrap(), "the clone changed");
    // first AdamW step: p - lr * sign(g)
    let got = p.to_vec1::<f32>().unwrap();
    for (a, b) in got.iter().zip([0.9f32, -2.1, 3.1]) {
        assert!((a - b).abs() < 1e-5, "{got:?}");
    }
    let host = Moments::Tensors { m, v }.placed_for(&p).unwrap();
    assert!(matches!(host, Moments::Tensors { .. }));
}
