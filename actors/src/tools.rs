//! Offline commands that do not need a daemon: `parity`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;

use crate::cli::EXIT_FAILED;

/// `dinod parity FIXTURE...`: runs each fixture and prints each tensor's relative error.
pub fn parity(
    files: &[PathBuf],
    dtype: &str,
    device: &str,
    verbose: bool,
    json: bool,
) -> Result<i32> {
    let dtypes: Vec<DType> = match dtype {
        "f64" => vec![DType::F64],
        "f32" => vec![DType::F32],
        "bf16" => vec![DType::BF16],
        "both" => vec![DType::F64, DType::F32],
        d => bail!("unknown dtype `{d}` (use f64, f32, both or bf16)"),
    };
    let dev = ops::portable::device(device)?;
    if dev.is_cpu() && dtypes.contains(&DType::BF16) {
        // the fused CPU kernels are f32/f64: bf16 runs the device code path on the host
        ops::portable::set_force_on_cpu(true);
    }
    let mut all_ok = true;
    for f in files {
        let bytes =
            std::fs::read(f).with_context(|| format!("cannot read fixture {}", f.display()))?;
        let fx = model::fixture::Fixture::parse(&bytes)
            .with_context(|| format!("fixture {}", f.display()))?;
        for &dt in &dtypes {
            let rows = model::parity::run_on(&fx, dt, &dev).with_context(|| {
                format!("running fixture {} in {dt:?} on {device}", f.display())
            })?;
            let bad = rows.iter().filter(|r| !r.ok()).count();
            all_ok &= bad == 0;
            let worst = rows
                .iter()
                .filter(|r| r.dtype != "meta")
                .map(|r| r.rel_err)
                .fold(0.0f64, f64::max);
            if json {
                for r in &rows {
                    println!(
                        "{}",
                        serde_json::json!({"fixture": f.display().to_string(), "dtype": format!("{dt:?}"), "tensor": r.name, "rel_err": r.rel_err, "tol": r.tol, "torch_bf16": r.torch_bf16, "ok": r.ok()})
                    );
                }
            } else {
                for r in rows.iter().filter(|r| verbose || !r.ok()) {
                    // where PyTorch's own bf16 error widens the bar, say so
                    let torch = r
                        .torch_bf16
                        .map(|t| format!(", PyTorch bf16 {t:.2e}"))
                        .unwrap_or_default();
                    println!(
                        "  {:<5} {:<60} {:>10.3e}  (tol {:.2e}{torch}) {}",
                        r.dtype,
                        r.name,
                        r.rel_err,
                        r.tol,
                        if r.ok() { "ok" } else { "FAIL" }
                    );
                }
                // bf16 tensors over the flat 2e-2 that pass on PyTorch's own bf16 error
                let widened: Vec<String> = rows
                    .iter()
                    .filter(|r| r.ok() && r.rel_err >= model::parity::TOL_BF16)
                    .filter_map(|r| {
                        r.torch_bf16
                            .map(|t| format!("{} {:.2e} (PyTorch {t:.2e})", r.name, r.rel_err))
                    })
                    .collect();
                let widened = if widened.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} over 2e-2 but within {}x PyTorch's own bf16 error: {}",
                        widened.len(),
                        model::parity::TORCH_BF16_FACTOR,
                        widened.join(", ")
                    )
                };
                println!(
                    "{} [{dt:?}, {device}]: {} tensors, {} out of tolerance, worst relative error {worst:.3e}{widened} -> {}",
                    f.display(),
                    rows.len(),
                    bad,
                    if bad == 0 { "PASS" } else { "FAIL" }
                );
            }
        }
    }
    Ok(if all_ok { 0 } else { EXIT_FAILED })
}
