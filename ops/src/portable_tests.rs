//! The portable ops against the fused CPU kernels (same inputs, forward and backward, f64
//! within 1e-10 and f32 within 1e-5), against the naive f64 reference twins, against
//! finite differences where the composition is new (RoPE attention, LayerNorm), and in
//! bf16 against f64 at bf16 accuracy. All on `Device::Cpu` through candle's CPU backend,
//! which runs the same tensor operations the CUDA backend runs on a GPU.

use candle_core::{DType, Device, Tensor};
use rand::RngExt;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::attention::{self as cpu_attn, rope_tables, AttnGroup, SeqShape};
use crate::nn::{self as cpu, RowBlocks};
use crate::optim::AdamWStep;
use crate::portable as p;
use crate::reference as r;
use crate::{loss as cpu_loss, optim as cpu_optim};

/// Each element type the CPU kernels support, with the agreement required of the
/// portable path.
const DTS: [(DType, f64); 2] = [(DType::F64, 1e-10), (DType::F32, 1e-5)];

fn rv(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn t(v: &[f64], shape: &[usize], dt: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn v(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Asserts that `a` (portable) and `b` (CPU kernel or reference) agree to `tol` in
/// relative L2 error, with the same shape.
fn close(name: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes differ");
    let e = rel(&v(a), &v(b));
    assert!(e < tol, "{name}: relative error {e:e} >= {tol:e}");
}

fn close_v(name: &str, a: &Tensor, b: &[f64], tol: f64) {
    let e = rel(&v(a), b);
    assert!(e < tol, "{name}: relative error {e:e} >= {tol:e}");
}

/// Central differences of `f` at `x` on up to 40 spread coordinates against `analytic`.
fn check_grad(name: &str, f: impl Fn(&[f64]) -> f64, x: &[f64], analytic: &[f64], tol: f64) {
    let h = 1e-6;
    let step = (x.len() / 40).max(1);
    let (mut num, mut ana) = (vec![], vec![]);
    for i in (0..x.len()).step_by(step) {
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        num.push((f(&xp) - f(&xm)) / (2.0 * h));
        ana.push(analytic[i]);
    }
    let e = rel(&ana, &num);
    assert!(e < tol, "{name}: gradient rel err {e:e}");
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn blocks() -> RowBlocks {
    // rows 2..5 and 9..12 and 0..1 of a 13-row matrix, gathered out of order
    RowBlocks {
        starts: vec![9, 2, 0],
        lens: vec![3, 3, 1],
        scales: vec![1.25, 2.0, 0.5],
    }
}

// ---------------------------------------------------------------------------- linear

#[test]
fn linear_forward_and_backward_match_cpu() {
    for &(shape, n) in &[
        (&[3usize, 5][..], 4usize),
        (&[37, 64][..], 96),
        (&[130, 17][..], 33),
        (&[2, 7, 16][..], 9),
    ] {
        let k = *shape.last().unwrap();
        let m: usize = shape.iter().product::<usize>() / k;
        let (x, w, b, g) = (rv(m * k, 1), rv(n * k, 2), rv(n, 3), rv(m * n, 4));
        let mut gshape = shape.to_vec();
        *gshape.last_mut().unwrap() = n;
        for (dt, tol) in DTS {
            let (xt, wt, bt, gt) = (
                t(&x, shape, dt),
                t(&w, &[n, k], dt),
                t(&b, &[n], dt),
                t(&g, &gshape, dt),
            );
            close(
                "linear",
                &p::linear(&xt, &wt, Some(&bt)).unwrap(),
                &cpu::linear(&xt, &wt, Some(&bt)).unwrap(),
                tol,
            );
            close(
                "linear no bias",
                &p::linear(&xt, &wt, None).unwrap(),
                &cpu::linear(&xt, &wt, None).unwrap(),
                tol,
            );
            let (pdx, pdw, pdb) = p::linear_bwd(&xt, &wt, &gt, true, true).unwrap();
            let (cdx, cdw, cdb) = cpu::linear_bwd(&xt, &wt, &gt, true, true).unwrap();
            close("linear dx", &pdx.unwrap(), &cdx.unwrap(), tol);
            close("linear dw", &pdw, &cdw, tol);
            close("linear db", &pdb.unwrap(), &cdb.unwrap(), tol);
            let (none, _, nb) = p::linear_bwd(&xt, &wt, &gt, false, false).unwrap();
            assert!(none.is_none() && nb.is_none());
            close(
                "linear_dx",
                &p::linear_dx(&gt, &wt, xt.shape()).unwrap(),
                &cpu::linear_dx(&gt, &wt, xt.shape()).unwrap(),
                tol,
            );
            close(
                "linear_dw",
                &p::linear_dw(&xt, &gt).unwrap(),
                &cpu::linear_dw(&xt, &gt).unwrap(),
                tol,
            );
            close(
                "col_sums",
                &p::col_sums(&gt).unwrap(),
                &cpu::col_sums(&gt).unwrap(),
                tol,
            );
        }
        let y = p::linear(
            &t(&x, shape, DType::F64),
            &t(&w, &[n, k], DType::F64),
            Some(&t(&b, &[n], DType::F64)),
        )
        .unwrap();
        close_v(
            "linear vs reference",
            &y,
            &r::linear(&x, &w, Some(&b), m, k, n),
            1e-12,
        );
    }
    assert!(p::linear(
        &t(&rv(6, 1), &[2, 3], DType::F32),
        &t(&rv(8, 1), &[2, 4], DType::F32),
        None
    )
    .is_err());
}

// ------------------------------------------------------------------------- LayerNorm

#[test]
fn layer_norm_forward_and_backward_match_cpu() {
    for &(rows, d) in &[(1usize, 8usize), (13, 24), (70, 96)] {
        let x: Vec<f64> = rv(rows * d, 5).iter().map(|a| 3.0 * a + 0.7).collect();
        let (w, b, g) = (rv(d, 6), rv(d, 7), rv(rows * d, 8));
        for (dt, tol) in DTS {
            let (xt, wt, bt, gt) = (
                t(&x, &[rows, d], dt),
                t(&w, &[d], dt),
                t(&b, &[d], dt),
                t(&g, &[rows, d], dt),
            );
            let (py, pc) = p::layer_norm(&xt, &wt, &bt, 1e-5).unwrap();
            let (cy, cc) = cpu::layer_norm(&xt, &wt, &bt, 1e-5).unwrap();
            close("ln y", &py, &cy, tol);
            close("ln mean", &pc.mean, &cc.mean, tol);
            close("ln rstd", &pc.rstd, &cc.rstd, tol);
            let (pdx, pdw, pdb) = p::layer_norm_bwd(&xt, &wt, &pc, &gt).unwrap();
            let (cdx, cdw, cdb) = cpu::layer_norm_bwd(&xt, &wt, &cc, &gt).unwrap();
            close("ln dx", &pdx, &cdx, tol);
            close("ln dw", &pdw, &cdw, tol);
            close("ln db", &pdb, &cdb, tol);
        }
        let f = |xx: &[f64]| dot(&r::layer_norm(xx, &w, &b, d, 1e-5), &g);
        let (xt, wt, bt) = (
            t(&x, &[rows, d], DType::F64),
            t(&w, &[d], DType::F64),
            t(&b, &[d], DType::F64),
        );
        let (y, c) = p::layer_norm(&xt, &wt, &bt, 1e-5).unwrap();
        close_v(
            "ln vs reference",
            &y,
            &r::layer_norm(&x, &w, &b, d, 1e-5),
            1e-12,
        );
        let (dx, _, _) = p::layer_norm_bwd(&xt, &wt, &c, &t(&g, &[rows, d], DType::F64)).unwrap();
        check_grad("ln dx (finite differences)", f, &x, &v(&dx), 1e-6);
    }
}

#[test]
fn layer_norm_on_selected_rows_matches_cpu() {
    let (rows, d) = (13, 16);
    let sel = blocks();
    let n = sel.rows();
    let x = rv(rows * d, 9);
    let (w, b, g, acc) = (rv(d, 10), rv(d, 11), rv(n * d, 12), rv(rows * d, 13));
    for (dt, tol) in DTS {
        let (xt, wt, bt, gt) = (
            t(&x, &[rows, d], dt),
            t(&w, &[d], dt),
            t(&b, &[d], dt),
            t(&g, &[n, d], dt),
        );
        let (py, pc) = p::layer_norm_sel(&xt, Some(&sel), &wt, &bt, 1e-5).unwrap();
        let (cy, cc) = cpu::layer_norm_sel(&xt, Some(&sel), &wt, &bt, 1e-5).unwrap();
        close("ln_sel y", &py, &cy, tol);
        // in place: both accumulators start from the same values
        let (pacc, cacc) = (t(&acc, &[rows, d], dt), t(&acc, &[rows, d], dt));
        let alias = pacc.clone();
        let (pdw, pdb) = p::layer_norm_sel_bwd_into(&xt, Some(&sel), &wt, &pc, &gt, &pacc).unwrap();
        let (cdw, cdb) =
            cpu::layer_norm_sel_bwd_into(&xt, Some(&sel), &wt, &cc, &gt, &cacc).unwrap();
        close("ln_sel dx_acc", &pacc, &cacc, tol);
        close("ln_sel dx_acc through a clone", &alias, &cacc, tol);
        close("ln_sel dw", &pdw, &cdw, tol);
        close("ln_sel db", &pdb, &cdb, tol);
        // rows outside the selection are untouched, bit for bit
        let (av, pv) = (v(&t(&acc, &[rows, d], dt)), v(&pacc));
        for row in [1usize, 5, 6, 7, 8, 12] {
            assert_eq!(
                av[row * d..(row + 1) * d],
                pv[row * d..(row + 1) * d],
                "row {row} changed"
            );
        }
        // without a selection
        let (py, pc) = p::layer_norm_sel(&xt, None, &wt, &bt, 1e-5).unwrap();
        let (cy, cc) = cpu::layer_norm_sel(&xt, None, &wt, &bt, 1e-5).unwrap();
        close("ln_sel(None) y", &py, &cy, tol);
        let gfull = t(&rv(rows * d, 14), &[rows, d], dt);
        let (pacc, cacc) = (t(&acc, &[rows, d], dt), t(&acc, &[rows, d], dt));
        let (nacc, _, _) = p::layer_norm_sel_bwd_add(&xt, None, &wt, &pc, &gfull, &pacc).unwrap();
        cpu::layer_norm_sel_bwd_into(&xt, None, &wt, &cc, &gfull, &cacc).unwrap();
        close("ln_sel(None) dx_acc", &nacc, &cacc, tol);
        assert_eq!(
            v(&pacc),
            v(&t(&acc, &[rows, d], dt)),
            "the _add variant must not write"
        );
    }
    let xs = r::gather_rows(&x, &sel.source_rows(), d);
    let (y, _) = p::layer_norm_sel(
        &t(&x, &[rows, d], DType::F64),
        Some(&sel),
        &t(&w, &[d], DType::F64),
        &t(&b, &[d], DType::F64),
        1e-5,
    )
    .unwrap();
    close_v(
        "ln_sel vs reference",
        &y,
        &r::layer_norm(&xs, &w, &b, d, 1e-5),
        1e-12,
    );
    let repeated = RowBlocks {
        starts: vec![0, 1],
        lens: vec![2, 1],
        scales: vec![1.0, 1.0],
    };
    let xt = t(&x, &[rows, d], DType::F64);
    let (wt, bt) = (t(&w, &[d], DType::F64), t(&b, &[d], DType::F64));
    let (_, c) = p::layer_norm_sel(&xt, Some(&repeated), &wt, &bt, 1e-5).unwrap();
    let g3 = t(&rv(3 * d, 1), &[3, d], DType::F64);
    assert!(p::layer_norm_sel_bwd_add(
        &xt,
        Some(&repeated),
        &wt,
        &c,
        &g3,
        &xt.zeros_like().unwrap()
    )
    .is_err());
}

// ------------------------------------------------------------------------------ GELU

#[test]
fn gelu_forward_and_backward_match_cpu() {
    for &(rows, d) in &[(1usize, 5usize), (17, 48), (64, 130)] {
        let x: Vec<f64> = rv(rows * d, 15).iter().map(|a| 4.0 * a).collect();
        let (b, g) = (rv(d, 16), rv(rows * d, 17));
        for (dt, tol) in DTS {
            let (xt, bt, gt) = (
                t(&x, &[rows, d], dt),
                t(&b, &[d], dt),
                t(&g, &[rows, d], dt),
            );
            close(
                "gelu",
                &p::gelu(&xt).unwrap(),
                &cpu::gelu(&xt).unwrap(),
                tol,
            );
            close(
                "gelu_bias",
                &p::gelu_bias(&xt, Some(&bt)).unwrap(),
                &cpu::gelu_bias(&xt, Some(&bt)).unwrap(),
                tol,
            );
            close(
                "gelu_bwd",
                &p::gelu_bwd(&xt, &gt).unwrap(),
                &cpu::gelu_bwd(&xt, &gt).unwrap(),
                tol,
            );
            let (pdx, pdb) = p::gelu_bias_bwd_into(&xt, Some(&bt), gt.copy().unwrap()).unwrap();
            let (cdx, cdb) = cpu::gelu_bias_bwd_into(&xt, Some(&bt), gt.copy().unwrap()).unwrap();
            close("gelu_bias dx", &pdx, &cdx, tol);
            close("gelu_bias db", &pdb.unwrap(), &cdb.unwrap(), tol);
            let (pdx, none) = p::gelu_bias_bwd_into(&xt, None, gt.copy().unwrap()).unwrap();
            assert!(none.is_none());
            close(
                "gelu_bias(None) dx",
                &pdx,
                &cpu::gelu_bwd(&xt, &gt).unwrap(),
                tol,
            );
        }
        let y = p::gelu_bias(
            &t(&x, &[rows, d], DType::F64),
            Some(&t(&b, &[d], DType::F64)),
        )
        .unwrap();
        close_v(
            "gelu_bias vs reference",
            &y,
            &r::gelu_bias(&x, &b, d),
            1e-12,
        );
    }
}

// ------------------------------------------------------- LayerScale, L2 norm, axpy

#[test]
fn elementwise_ops_match_cpu() {
    let (rows, d) = (19, 40);
    let (x, gm, g, y2) = (
        rv(rows * d, 18),
        rv(d, 19),
        rv(rows * d, 20),
        rv(rows * d, 21),
    );
    for (dt, tol) in DTS {
        let (xt, gmt, gt, yt) = (
            t(&x, &[rows, d], dt),
            t(&gm, &[d], dt),
            t(&g, &[rows, d], dt),
            t(&y2, &[rows, d], dt),
        );
        close(
            "mul_row",
            &p::mul_row(&xt, &gmt).unwrap(),
            &cpu::mul_row(&xt, &gmt).unwrap(),
            tol,
        );
        let (pdx, pdg) = p::mul_row_bwd(&xt, &gmt, &gt).unwrap();
        let (cdx, cdg) = cpu::mul_row_bwd(&xt, &gmt, &gt).unwrap();
        close("mul_row dx", &pdx, &cdx, tol);
        close("mul_row dgamma", &pdg, &cdg, tol);
        close(
            "axpy",
            &p::axpy(&xt, &yt, -0.3).unwrap(),
            &cpu::axpy(&xt, &yt, -0.3).unwrap(),
            tol,
        );
        close(
            "scale",
            &p::scale(&xt, 1.7).unwrap(),
            &cpu::scale(&xt, 1.7).unwrap(),
            tol,
        );
        let ps = p::sum_sq(&xt).unwrap();
        let cs = cpu::sum_sq(&xt).unwrap();
        assert!((ps - cs).abs() <= tol * cs, "sum_sq {ps} vs {cs}");
        let parts = [&xt, &yt];
        close(
            "cat_rows",
            &p::cat_rows(&parts).unwrap(),
            &cpu::cat_rows(&parts).unwrap(),
            0.0 + f64::MIN_POSITIVE,
        );
    }
    assert!(p::axpy(
        &t(&x, &[rows, d], DType::F32),
        &t(&x[..d], &[1, d], DType::F32),
        1.0
    )
    .is_err());
}

#[test]
fn l2_normalize_matches_cpu_on_both_sides_of_eps() {
    let (rows, d) = (9, 33);
    let mut x = rv(rows * d, 22);
    // a zero row and a row shorter than eps take the clamped branch
    x[..d].iter_mut().for_each(|a| *a = 0.0);
    x[d..2 * d].iter_mut().for_each(|a| *a *= 1e-9);
    let g = rv(rows * d, 23);
    for (dt, tol) in DTS {
        for eps in [1e-8, 1e-6] {
            let (xt, gt) = (t(&x, &[rows, d], dt), t(&g, &[rows, d], dt));
            let (py, pn) = p::l2_normalize(&xt, eps).unwrap();
            let (cy, cn) = cpu::l2_normalize(&xt, eps).unwrap();
            close("l2 y", &py, &cy, tol);
            close("l2 norms", &pn, &cn, tol);
            let pdx = p::l2_normalize_bwd(&py, &pn, &gt, eps).unwrap();
            let cdx = cpu::l2_normalize_bwd(&cy, &cn, &gt, eps).unwrap();
            close("l2 dx", &pdx, &cdx, tol);
        }
    }
    let (y, _) = p::l2_normalize(&t(&x, &[rows, d], DType::F64), 1e-8).unwrap();
    close_v("l2 vs reference", &y, &r::l2_normalize(&x, d, 1e-8), 1e-12);
}

// ------------------------------------------------------------------ drop-path blocks

#[test]
fn residual_and_row_blocks_match_cpu() {
    let (rows, d) = (13, 12);
    let sel = blocks();
    let n = sel.rows();
    let (x, gm, bias, g) = (rv(rows * d, 24), rv(d, 25), rv(d, 26), rv(rows * d, 27));
    for (dt, tol) in DTS {
        let (xt, gmt, bt, gt) = (
            t(&x, &[rows, d], dt),
            t(&gm, &[d], dt),
            t(&bias, &[d], dt),
            t(&g, &[rows, d], dt),
        );
        for s in [Some(&sel), None] {
            let nr = s.map_or(rows, |s| s.rows());
            let rt = t(&rv(nr * d, 28), &[nr, d], dt);
            for b in [Some(&bt), None] {
                close(
                    "residual_add",
                    &p::residual_add(&xt, s, &gmt, &rt, b).unwrap(),
                    &cpu::residual_add(&xt, s, &gmt, &rt, b).unwrap(),
                    tol,
                );
                let (pdr, pdg, pdb) = p::residual_add_bwd(&gt, s, &gmt, &rt, b).unwrap();
                let (cdr, cdg, cdb) = cpu::residual_add_bwd(&gt, s, &gmt, &rt, b).unwrap();
                close("residual dr", &pdr, &cdr, tol);
                close("residual dgamma", &pdg, &cdg, tol);
                assert_eq!(pdb.is_some(), cdb.is_some());
                if let (Some(a), Some(c)) = (pdb, cdb) {
                    close("residual dbias", &a, &c, tol);
                }
            }
        }
        let rt = t(&rv(n * d, 29), &[n, d], dt);
        close(
            "gather_blocks",
            &p::gather_blocks(&xt, &sel).unwrap(),
            &cpu::gather_blocks(&xt, &sel).unwrap(),
            tol,
        );
        close(
            "gather_blocks_scaled",
            &p::gather_blocks_scaled(&xt, &sel).unwrap(),
            &cpu::gather_blocks_scaled(&xt, &sel).unwrap(),
            tol,
        );
        for unscaled in [false, true] {
            close(
                "scatter_add_blocks",
                &p::scatter_add_blocks(&xt, &sel, &rt, unscaled).unwrap(),
                &cpu::scatter_add_blocks(&xt, &sel, &rt, unscaled).unwrap(),
                tol,
            );
        }
        // rows outside the selection come out bit-identical
        let out = v(&p::residual_add(&xt, Some(&sel), &gmt, &rt, Some(&bt)).unwrap());
        let xv = v(&xt);
        for row in [1usize, 5, 6, 7, 8, 12] {
            assert_eq!(out[row * d..(row + 1) * d], xv[row * d..(row + 1) * d]);
        }
    }
    let r_ = rv(n * d, 30);
    let out = p::residual_add(
        &t(&x, &[rows, d], DType::F64),
        Some(&sel),
        &t(&gm, &[d], DType::F64),
        &t(&r_, &[n, d], DType::F64),
        Some(&t(&bias, &[d], DType::F64)),
    )
    .unwrap();
    close_v(
        "residual vs reference",
        &out,
        &r::residual_add(
            &x,
            &sel.source_rows(),
            &sel.row_scales(),
            &gm,
            &r_,
            Some(&bias),
            d,
        ),
        1e-12,
    );
    let repeated = RowBlocks {
        starts: vec![0, 1],
        lens: vec![2, 1],
        scales: vec![1.0, 1.0],
    };
    let xt = t(&x, &[rows, d], DType::F64);
    assert!(p::residual_add(
        &xt,
        Some(&repeated),
        &t(&gm, &[d], DType::F64),
        &t(&rv(3 * d, 1), &[3, d], DType::F64),
        None
    )
    .is_err());
}

// ---------------------------------------------------------------- patches and tokens

#[test]
fn patches_tokens_and_row_selection_match_cpu() {
    let (n, c, h, w, pz) = (3, 3, 8, 12, 4);
    let img = rv(n * c * h * w, 31);
    let (gh, gw) = (h / pz, w / pz);
    let p_ = gh * gw;
    let d = 10;
    let patches = rv(n * p_ * d, 32);
    let (cls, mt) = (rv(d, 33), rv(d, 34));
    let masks: Vec<u8> = (0..n * p_).map(|i| u8::from(i % 3 == 1)).collect();
    for (dt, tol) in DTS {
        let it = t(&img, &[n, c, h, w], dt);
        close(
            "im2col",
            &p::im2col(&it, pz).unwrap(),
            &cpu::im2col(&it, pz).unwrap(),
            tol,
        );
        let (pt, ct, mtt) = (
            t(&patches, &[n * p_, d], dt),
            t(&cls, &[d], dt),
            t(&mt, &[d], dt),
        );
        for r_ in [0usize, 4] {
            let st = if r_ == 0 {
                Tensor::zeros((0, d), dt, &Device::Cpu).unwrap()
            } else {
                t(&rv(r_ * d, 35), &[r_, d], dt)
            };
            for m in [Some(&masks[..]), None] {
                let pa = p::assemble_tokens(&pt, n, &ct, &st, &mtt, m).unwrap();
                close(
                    "assemble_tokens",
                    &pa,
                    &cpu::assemble_tokens(&pt, n, &ct, &st, &mtt, m).unwrap(),
                    tol,
                );
                let g = t(&rv(pa.elem_count(), 36), pa.dims(), dt);
                let (a, b, cc, dd) = p::assemble_tokens_bwd(&g, n, r_, m).unwrap();
                let (a2, b2, c2, d2) = cpu::assemble_tokens_bwd(&g, n, r_, m).unwrap();
                close("assemble dpatches", &a, &a2, tol);
                close("assemble dcls", &b, &b2, tol);
                close("assemble dstorage", &cc, &c2, tol);
                close("assemble dmask", &dd, &d2, tol);
            }
        }
        // select_rows: the strided-view path, the index path (last block shorter than
        // the stride) and the adjoints
        let x = t(&rv(23 * d, 37), &[23, d], dt);
        for &(nb, stride, off, cnt) in &[
            (4usize, 5usize, 1usize, 3usize),
            (4, 6, 0, 1),
            (3, 8, 2, 5),
            (2, 4, 0, 4),
        ] {
            let ps = p::select_rows(&x, nb, stride, off, cnt).unwrap();
            close(
                "select_rows",
                &ps,
                &cpu::select_rows(&x, nb, stride, off, cnt).unwrap(),
                tol,
            );
            let g = t(&rv(nb * cnt * d, 38), &[nb * cnt, d], dt);
            close(
                "select_rows_bwd_add",
                &p::select_rows_bwd_add(&x, &g, nb, stride, off, cnt).unwrap(),
                &cpu::select_rows_bwd_add(&x, &g, nb, stride, off, cnt).unwrap(),
                tol,
            );
            let (pa, ca) = (x.copy().unwrap(), x.copy().unwrap());
            p::select_rows_add_into(&pa, &g, nb, stride, off, cnt).unwrap();
            cpu::select_rows_add_into(&ca, &g, nb, stride, off, cnt).unwrap();
            close("select_rows_add_into", &pa, &ca, tol);
        }
        assert!(p::select_rows(&x, 3, 10, 0, 4).is_err());
        // index_rows with repeats, and its adjoint (which must add the repeats)
        let idx = [4usize, 0, 4, 22, 7, 7, 7];
        close(
            "index_rows",
            &p::index_rows(&x, &idx).unwrap(),
            &cpu::index_rows(&x, &idx).unwrap(),
            tol,
        );
        let g = t(&rv(idx.len() * d, 39), &[idx.len(), d], dt);
        close(
            "index_rows_bwd",
            &p::index_rows_bwd(&g, &idx, 23).unwrap(),
            &cpu::index_rows_bwd(&g, &idx, 23).unwrap(),
            tol,
        );
        let uniq = [3usize, 9, 0];
        let g = t(&rv(uniq.len() * d, 40), &[uniq.len(), d], dt);
        close(
            "index_rows_bwd unique",
            &p::index_rows_bwd(&g, &uniq, 23).unwrap(),
            &cpu::index_rows_bwd(&g, &uniq, 23).unwrap(),
            tol,
        );
        assert!(p::index_rows(&x, &[23]).is_err());
    }
}

// ------------------------------------------------------------------------- attention

/// (batch, grid h, grid w, prefix, heads, head dim)
const ATTN_SHAPES: [(usize, usize, usize, usize, usize, usize); 4] = [
    (2, 2, 3, 5, 2, 8),
    (3, 1, 4, 1, 3, 4),
    (1, 3, 3, 0, 1, 16),
    (2, 4, 4, 5, 2, 64),
];

#[test]
fn attention_matches_cpu_reference_and_finite_differences() {
    for &(b, gh, gw, prefix, heads, dh) in &ATTN_SHAPES {
        let n = prefix + gh * gw;
        let d = heads * dh;
        let qkv = rv(b * n * 3 * d, 41);
        let g = rv(b * n * d, 42);
        let s = SeqShape {
            batch: b,
            tokens: n,
            prefix,
            heads,
        };
        for (dt, tol) in DTS {
            let rope = rope_tables(gh, gw, dh, 100.0, 1.3, dt).unwrap();
            let (x, gt) = (t(&qkv, &[b * n, 3 * d], dt), t(&g, &[b * n, d], dt));
            for ro in [Some(&rope), None] {
                let (po, pc) = p::attention(&x, s, ro).unwrap();
                let (co, cc) = cpu_attn::attention(&x, s, ro).unwrap();
                close("attention", &po, &co, tol);
                close(
                    "attention_infer",
                    &p::attention_infer(&x, s, ro).unwrap(),
                    &co,
                    tol,
                );
                assert_eq!(pc.probs().dims(), [b, heads, n, n]);
                close(
                    "attention dqkv",
                    &p::attention_bwd(&pc, &gt).unwrap(),
                    &cpu_attn::attention_bwd(&cc, &gt).unwrap(),
                    tol,
                );
            }
        }
        if dh > 16 {
            continue; // the naive twin is slow at head dim 64; the CPU kernel covers it
        }
        let rope = rope_tables(gh, gw, dh, 100.0, 1.3, DType::F64).unwrap();
        let (sin, cos) = (v(&rope.sin), v(&rope.cos));
        let x = t(&qkv, &[b * n, 3 * d], DType::F64);
        let (out, cache) = p::attention(&x, s, Some(&rope)).unwrap();
        close_v(
            "attention vs reference",
            &out,
            &r::attention(&qkv, b, n, d, heads, prefix, Some(&sin), Some(&cos)),
            1e-12,
        );
        let dq = p::attention_bwd(&cache, &t(&g, &[b * n, d], DType::F64)).unwrap();
        check_grad(
            "portable attention (finite differences)",
            |xx| {
                dot(
                    &r::attention(xx, b, n, d, heads, prefix, Some(&sin), Some(&cos)),
                    &g,
                )
            },
            &qkv,
            &v(&dq),
            1e-6,
        );
    }
}

#[test]
fn attention_groups_with_bias_match_cpu() {
    // a global group (grid 3x3) and a local group (grid 2x2) packed in one matrix
    let (heads, dh, prefix) = (2, 8, 5);
    let d = heads * dh;
    let (bg, bl) = (2, 3);
    let (ng, nl) = (prefix + 9, prefix + 4);
    let rows = bg * ng + bl * nl;
    let qkv = rv(rows * 3 * d, 43);
    let bias = rv(3 * d, 44);
    let g = rv(rows * d, 45);
    for (dt, tol) in DTS {
        let rg = rope_tables(3, 3, dh, 100.0, 1.0, dt).unwrap();
        let rl = rope_tables(2, 2, dh, 100.0, 1.0, dt).unwrap();
        let groups = [
            AttnGroup {
                row0: 0,
                shape: SeqShape {
                    batch: bg,
                    tokens: ng,
                    prefix,
                    heads,
                },
                rope: Some(&rg),
            },
            AttnGroup {
                row0: bg * ng,
                shape: SeqShape {
                    batch: bl,
                    tokens: nl,
                    prefix,
                    heads,
                },
                rope: Some(&rl),
            },
        ];
        let (x, bt, gt) = (
            t(&qkv, &[rows, 3 * d], dt),
            t(&bias, &[3 * d], dt),
            t(&g, &[rows, d], dt),
        );
        for b in [Some(&bt), None] {
            let (po, pc) = p::attention_groups(&x, b, &groups).unwrap();
            let (co, cc) = cpu_attn::attention_groups(&x, b, &groups).unwrap();
            close("attention_groups", &po, &co, tol);
            close(
                "attention_groups_infer",
                &p::attention_groups_infer(&x, b, &groups).unwrap(),
                &co,
                tol,
            );
            close(
                "attention_groups dqkv",
                &p::attention_groups_bwd(&pc, &gt).unwrap(),
                &cpu_attn::attention_groups_bwd(&cc, &gt).unwrap(),
                tol,
            );
        }
        // the groups must tile the rows in order
        assert!(p::attention_groups(&x, None, &groups[1..]).is_err());
        assert!(p::attention_groups(&x, None, &[groups[1], groups[0]]).is_err());
    }
    // with the bias, the result equals attention on bias-added rows
    let x = t(&r::add_row_bias(&qkv, &bias), &[rows, 3 * d], DType::F64);
    let rg = rope_tables(3, 3, dh, 100.0, 1.0, DType::F64).unwrap();
    let rl = rope_tables(2, 2, dh, 100.0, 1.0, DType::F64).unwrap();
    let groups = [
        AttnGroup {
            row0: 0,
            shape: SeqShape {
                batch: bg,
                tokens: ng,
                prefix,
                heads,
            },
            rope: Some(&rg),
        },
        AttnGroup {
            row0: bg * ng,
            shape: SeqShape {
                batch: bl,
                tokens: nl,
                prefix,
                heads,
            },
            rope: Some(&rl),
        },
    ];
    let with_bias = p::attention_groups_infer(
        &t(&qkv, &[rows, 3 * d], DType::F64),
        Some(&t(&bias, &[3 * d], DType::F64)),
        &groups,
    )
    .unwrap();
    close(
        "bias folded",
        &with_bias,
        &p::attention_groups_infer(&x, None, &groups).unwrap(),
        1e-14,
    );
}

#[test]
fn rope_tables_on_places_the_tables() {
    let r = p::rope_tables_on(2, 3, 8, 100.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let c = rope_tables(2, 3, 8, 100.0, 1.0, DType::F32).unwrap();
    assert_eq!(v(&r.sin), v(&c.sin));
    assert_eq!(v(&r.cos), v(&c.cos));
}

// ---------------------------------------------------------------------------- losses

#[test]
fn sinkhorn_knopp_matches_cpu_and_reference() {
    for &(n, k, iters) in &[
        (4usize, 7usize, 3usize),
        (37, 300, 3),
        (64, 1000, 1),
        (5, 9, 0),
    ] {
        let l: Vec<f64> = rv(n * k, 46).iter().map(|a| a * 0.3).collect();
        for (dt, tol) in DTS {
            let lt = t(&l, &[n, k], dt);
            let q = p::sinkhorn_knopp(&lt, 0.07, iters).unwrap();
            assert_eq!(q.dtype(), dt);
            close(
                "sinkhorn_knopp",
                &q,
                &cpu_loss::sinkhorn_knopp(&lt, 0.07, iters).unwrap(),
                tol,
            );
        }
        let q = p::sinkhorn_knopp(&t(&l, &[n, k], DType::F64), 0.07, iters).unwrap();
        close_v(
            "sinkhorn vs reference",
            &q,
            &r::sinkhorn_knopp(&l, n, k, 0.07, iters),
            1e-12,
        );
    }
}

#[test]
fn soft_cross_entropy_matches_cpu() {
    let (rows, trows, k) = (11, 6, 50);
    let s = rv(rows * k, 47);
    let tgt =
        v(&p::sinkhorn_knopp(&t(&rv(trows * k, 48), &[trows, k], DType::F64), 0.1, 3).unwrap());
    // DINO-like pairings: several targets per row with weights, an empty row, repeats
    let pairs: Vec<Vec<(usize, f64)>> = (0..rows)
        .map(|i| match i % 4 {
            0 => vec![(i % trows, 0.5), ((i + 1) % trows, 0.25)],
            1 => vec![],
            2 => vec![(i % trows, 1.0)],
            _ => vec![(0, 0.3), (1, 0.3), (2, 0.4)],
        })
        .collect();
    let gs: Vec<f64> = (0..rows).map(|i| 0.1 * i as f64 - 0.2).collect();
    for (dt, tol) in DTS {
        let (st, tt) = (t(&s, &[rows, k], dt), t(&tgt, &[trows, k], dt));
        let (pl, pg) = p::soft_cross_entropy(&st, &tt, &pairs, 0.1, &gs).unwrap();
        let (cl, cg) = cpu_loss::soft_cross_entropy(&st, &tt, &pairs, 0.1, &gs).unwrap();
        let e = rel(&pl, &cl);
        assert!(e < tol, "soft CE losses: {e:e}");
        assert_eq!(pl[1], 0.0);
        close("soft CE grad", &pg, &cg, tol);
    }
    // iBOT-like identity pairing with unit weights takes the no-gather path
    let ident: Vec<Vec<(usize, f64)>> = (0..trows).map(|i| vec![(i, 1.0)]).collect();
    let ones = vec![1.0; trows];
    for (dt, tol) in DTS {
        let (st, tt) = (
            t(&s[..trows * k], &[trows, k], dt),
            t(&tgt, &[trows, k], dt),
        );
        let (pl, pg) = p::soft_cross_entropy(&st, &tt, &ident, 0.1, &ones).unwrap();
        let (cl, cg) = cpu_loss::soft_cross_entropy(&st, &tt, &ident, 0.1, &ones).unwrap();
        assert!(rel(&pl, &cl) < tol);
        close("soft CE identity grad", &pg, &cg, tol);
        for (i, l) in pl.iter().enumerate() {
            let want = r::soft_ce(&s[i * k..(i + 1) * k], &tgt[i * k..(i + 1) * k], 0.1);
            assert!(
                (l - want).abs() < 1e-5 * want.abs(),
                "row {i}: {l} vs {want}"
            );
        }
    }
    let st = t(&s, &[rows, k], DType::F64);
    assert!(p::soft_cross_entropy(
        &st,
        &t(&tgt, &[trows, k], DType::F64),
        &pairs[..3],
        0.1,
        &gs
    )
    .is_err());
}

#[test]
fn koleo_matches_cpu_and_reference() {
    for &(n, d) in &[(2usize, 3usize), (16, 24), (64, 96)] {
        let x = rv(n * d, 49);
        for (dt, tol) in DTS {
            let xt = t(&x, &[n, d], dt);
            let (pl, pg) = p::koleo(&xt).unwrap();
            let (cl, cg) = cpu_loss::koleo(&xt).unwrap();
            assert!((pl - cl).abs() <= tol * cl.abs(), "koleo {pl} vs {cl}");
            close("koleo grad", &pg, &cg, tol);
        }
        let (l, _) = p::koleo(&t(&x, &[n, d], DType::F64)).unwrap();
        let want = r::koleo(&x, n, d);
        assert!((l - want).abs() < 1e-12 * want.abs(), "{l} vs {want}");
    }
    assert!(p::koleo(&t(&[1.0, 2.0], &[1, 2], DType::F32)).is_err());
}

#[test]
fn gram_loss_matches_cpu_and_reference() {
    for &(n_img, pp, d) in &[(1usize, 4usize, 3usize), (3, 9, 16), (2, 49, 64)] {
        let (s, tg) = (rv(n_img * pp * d, 50), rv(n_img * pp * d, 51));
        for per_image in [true, false] {
            for (dt, tol) in DTS {
                let (st, tt) = (t(&s, &[n_img * pp, d], dt), t(&tg, &[n_img * pp, d], dt));
                let (pl, pg) = p::gram_loss(&st, &tt, n_img, per_image).unwrap();
                let (cl, cg) = cpu_loss::gram_loss(&st, &tt, n_img, per_image).unwrap();
                assert!((pl - cl).abs() <= tol * cl.abs(), "gram {pl} vs {cl}");
                close("gram grad", &pg, &cg, tol);
            }
            let (l, _) = p::gram_loss(
                &t(&s, &[n_img * pp, d], DType::F64),
                &t(&tg, &[n_img * pp, d], DType::F64),
                n_img,
                per_image,
            )
            .unwrap();
            let want = r::gram(&s, &tg, if per_image { n_img } else { 1 }, d);
            assert!((l - want).abs() < 1e-12 * want.abs(), "{l} vs {want}");
        }
    }
}

#[test]
fn resize_tokens_matches_cpu_and_reference() {
    for &(n_img, hin, win, hout, wout, d) in &[
        (2usize, 4usize, 4usize, 2usize, 2usize, 3usize),
        (3, 6, 5, 3, 4, 8),
        (1, 3, 3, 7, 6, 2),
    ] {
        let x = rv(n_img * hin * win * d, 52);
        let g = rv(n_img * hout * wout * d, 53);
        for (dt, tol) in DTS {
            let xt = t(&x, &[n_img * hin * win, d], dt);
            let gt = t(&g, &[n_img * hout * wout, d], dt);
            close(
                "resize_tokens",
                &p::resize_tokens(&xt, n_img, (hin, win), (hout, wout)).unwrap(),
                &cpu_loss::resize_tokens(&xt, n_img, (hin, win), (hout, wout)).unwrap(),
                tol,
            );
            close(
                "resize_tokens_bwd",
                &p::resize_tokens_bwd(&gt, n_img, (hin, win), (hout, wout)).unwrap(),
                &cpu_loss::resize_tokens_bwd(&gt, n_img, (hin, win), (hout, wout)).unwrap(),
                tol,
            );
        }
        // channel c of image i through the direct bicubic twin
        let y = v(&p::resize_tokens(
            &t(&x, &[n_img * hin * win, d], DType::F64),
            n_img,
            (hin, win),
            (hout, wout),
        )
        .unwrap());
        let (pin, pout) = (hin * win, hout * wout);
        for i in 0..n_img {
            for c in 0..d {
                let chan: Vec<f64> = (0..pin).map(|j| x[(i * pin + j) * d + c]).collect();
                let want = r::bicubic(&chan, hin, win, hout, wout);
                let got: Vec<f64> = (0..pout).map(|j| y[(i * pout + j) * d + c]).collect();
                assert!(rel(&got, &want) < 1e-12, "image {i} channel {c}");
            }
        }
    }
}

// ------------------------------------------------------------------------- optimizer

#[test]
fn adamw_and_ema_match_cpu() {
    let n = 1000;
    let (p0, m0, v0) = (
        rv(n, 54),
        rv(n, 55),
        rv(n, 56).iter().map(|a| a.abs()).collect::<Vec<_>>(),
    );
    let g = rv(n, 57);
    let h = AdamWStep {
        lr: 1e-3,
        weight_decay: 0.04,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        t: 7,
    };
    for (dt, tol) in DTS {
        let (pt, gt, mt, vt) = (
            t(&p0, &[40, 25], dt),
            t(&g, &[40, 25], dt),
            t(&m0, &[40, 25], dt),
            t(&v0, &[40, 25], dt),
        );
        let (pp, pm, pv) = p::adamw_update(&pt, &gt, &mt, &vt, &h).unwrap();
        let cp = pt.copy().unwrap();
        match dt {
            DType::F64 => {
                let (mut cm, mut cv) = (m0.clone(), v0.clone());
                cpu_optim::adamw_update::<f64>(&cp, &gt, &mut cm, &mut cv, &h).unwrap();
                close_v("adamw m", &pm, &cm, tol);
                close_v("adamw v", &pv, &cv, tol);
            }
            _ => {
                let mut cm: Vec<f32> = m0.iter().map(|&a| a as f32).collect();
                let mut cv: Vec<f32> = v0.iter().map(|&a| a as f32).collect();
                cpu_optim::adamw_update::<f32>(&cp, &gt, &mut cm, &mut cv, &h).unwrap();
                close_v(
                    "adamw m",
                    &pm,
                    &cm.iter().map(|&a| a as f64).collect::<Vec<_>>(),
                    tol,
                );
                close_v(
                    "adamw v",
                    &pv,
                    &cv.iter().map(|&a| a as f64).collect::<Vec<_>>(),
                    tol,
                );
            }
        }
        close("adamw param", &pp, &cp, tol);
        assert_eq!(
            v(&pt),
            v(&t(&p0, &[40, 25], dt)),
            "inputs must stay unchanged"
        );
        // a bf16 gradient is widened to the parameter's type
        let (pp16, _, _) =
            p::adamw_update(&pt, &gt.to_dtype(DType::BF16).unwrap(), &mt, &vt, &h).unwrap();
        assert_eq!(pp16.dtype(), dt);
        close("adamw with a bf16 gradient", &pp16, &cp, 1e-2);
        // EMA
        let tt = t(&rv(n, 58), &[n], dt);
        let st = t(&rv(n, 59), &[n], dt);
        let pe = p::ema_update(&tt, &st, 0.994).unwrap();
        let ce = tt.copy().unwrap();
        cpu_optim::ema_update(&ce, &st, 0.994).unwrap();
        close("ema", &pe, &ce, tol);
        // in-place helpers write through every clone
        let x = tt.copy().unwrap();
        let alias = x.clone();
        p::scale_inplace(&x, 0.5).unwrap();
        let cx = tt.copy().unwrap();
        cpu_optim::scale_inplace(&cx, 0.5).unwrap();
        close("scale_inplace", &alias, &cx, tol);
        p::copy_into(&x, &st).unwrap();
        assert_eq!(v(&alias), v(&st));
    }
    let (mut mm, mut vv) = (m0.clone(), v0.clone());
    let want = r::adamw(
        &p0,
        &g,
        &mut mm,
        &mut vv,
        h.lr,
        h.weight_decay,
        h.beta1,
        h.beta2,
        h.eps,
        h.t,
    );
    let (pp, _, _) = p::adamw_update(
        &t(&p0, &[n], DType::F64),
        &t(&g, &[n], DType::F64),
        &t(&m0, &[n], DType::F64),
        &t(&v0, &[n], DType::F64),
        &h,
    )
    .unwrap();
    close_v("adamw vs reference", &pp, &want, 1e-12);
}

#[test]
fn write_into_checks_its_arguments() {
    let a = t(&rv(6, 60), &[2, 3], DType::F32);
    assert!(p::write_into(&a, &t(&rv(6, 61), &[3, 2], DType::F32)).is_err());
    assert!(p::write_into(&a, &t(&rv(6, 61), &[2, 3], DType::F64)).is_err());
    assert!(p::write_into(&a.t().unwrap(), &t(&rv(6, 61), &[3, 2], DType::F32)).is_err());
    // a source that shares the destination's storage
    let before = v(&a);
    p::write_into(&a, &a.clone()).unwrap();
    assert_eq!(v(&a), before);
    // a non-contiguous source
    let src = t(&rv(6, 62), &[3, 2], DType::F32);
    p::write_into(&a, &src.t().unwrap()).unwrap();
    assert_eq!(v(&a), v(&src.t().unwrap()));
    // a rank-0 destination
    let s = Tensor::new(1.5f32, &Device::Cpu).unwrap();
    p::write_into(&s, &Tensor::new(2.5f32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(s.to_scalar::<f32>().unwrap(), 2.5);
}

// ---------------------------------------------------------------------- half precision

/// bf16 inputs: matmuls and elementwise ops in bf16, reductions and losses in f32; the
/// results must agree with f64 to bf16 accuracy and come back in the documented types.
#[test]
fn bf16_inputs_follow_the_dtype_rules() {
    let bf = DType::BF16;
    let tol = 3e-2;
    let (m, k, n) = (33, 64, 48);
    let (x, w, b) = (rv(m * k, 63), rv(n * k, 64), rv(n, 65));
    let y = p::linear(
        &t(&x, &[m, k], bf),
        &t(&w, &[n, k], bf),
        Some(&t(&b, &[n], bf)),
    )
    .unwrap();
    assert_eq!(y.dtype(), bf);
    close_v(
        "bf16 linear",
        &y,
        &r::linear(&x, &w, Some(&b), m, k, n),
        tol,
    );
    let g = rv(m * n, 66);
    let (dx, dw, db) = p::linear_bwd(
        &t(&x, &[m, k], bf),
        &t(&w, &[n, k], bf),
        &t(&g, &[m, n], bf),
        true,
        true,
    )
    .unwrap();
    let (cdx, cdw, cdb) = cpu::linear_bwd(
        &t(&x, &[m, k], DType::F64),
        &t(&w, &[n, k], DType::F64),
        &t(&g, &[m, n], DType::F64),
        true,
        true,
    )
    .unwrap();
    close(
        "bf16 linear dx",
        &dx.unwrap(),
        &cdx.unwrap().to_dtype(bf).unwrap(),
        tol,
    );
    close("bf16 linear dw", &dw, &cdw.to_dtype(bf).unwrap(), tol);
    close(
        "bf16 linear db",
        &db.unwrap(),
        &cdb.unwrap().to_dtype(bf).unwrap(),
        tol,
    );

    // LayerNorm: bf16 x with f32 master weights; statistics and dw/db in f32
    let d = 64;
    let xs: Vec<f64> = rv(m * d, 67).iter().map(|a| 2.0 * a + 0.5).collect();
    let (lw, lb) = (rv(d, 68), rv(d, 69));
    let (yb, cb) = p::layer_norm(
        &t(&xs, &[m, d], bf),
        &t(&lw, &[d], DType::F32),
        &t(&lb, &[d], DType::F32),
        1e-5,
    )
    .unwrap();
    assert_eq!(
        (yb.dtype(), cb.mean.dtype(), cb.rstd.dtype()),
        (bf, DType::F32, DType::F32)
    );
    close_v(
        "bf16 layer_norm",
        &yb,
        &r::layer_norm(&xs, &lw, &lb, d, 1e-5),
        tol,
    );
    let gl = rv(m * d, 70);
    let (dxb, dwb, dbb) = p::layer_norm_bwd(
        &t(&xs, &[m, d], bf),
        &t(&lw, &[d], DType::F32),
        &cb,
        &t(&gl, &[m, d], bf),
    )
    .unwrap();
    assert_eq!(
        (dxb.dtype(), dwb.dtype(), dbb.dtype()),
        (bf, DType::F32, DType::F32)
    );
    let x64 = t(&xs, &[m, d], DType::F64);
    let (_, c64) = cpu::layer_norm(
        &x64,
        &t(&lw, &[d], DType::F64),
        &t(&lb, &[d], DType::F64),
        1e-5,
    )
    .unwrap();
    let (dx64, dw64, db64) = cpu::layer_norm_bwd(
        &x64,
        &t(&lw, &[d], DType::F64),
        &c64,
        &t(&gl, &[m, d], DType::F64),
    )
    .unwrap();
    close("bf16 ln dx", &dxb, &dx64.to_dtype(bf).unwrap(), tol);
    close("bf16 ln dw", &dwb, &dw64.to_dtype(DType::F32).unwrap(), tol);
    close("bf16 ln db", &dbb, &db64.to_dtype(DType::F32).unwrap(), tol);

    // GELU
    let gx: Vec<f64> = rv(m * d, 71).iter().map(|a| 3.0 * a).collect();
    let gb = p::gelu(&t(&gx, &[m, d], bf)).unwrap();
    assert_eq!(gb.dtype(), bf);
    close_v("bf16 gelu", &gb, &r::gelu(&gx), tol);
    let gd = p::gelu_bwd(&t(&gx, &[m, d], bf), &t(&gl, &[m, d], bf)).unwrap();
    close(
        "bf16 gelu_bwd",
        &gd,
        &cpu::gelu_bwd(&t(&gx, &[m, d], DType::F64), &t(&gl, &[m, d], DType::F64))
            .unwrap()
            .to_dtype(bf)
            .unwrap(),
        tol,
    );

    // attention in bf16, softmax in f32
    let (bb, gh, gw, prefix, heads, dh) = (2, 3, 3, 5, 2, 16);
    let nt = prefix + gh * gw;
    let dd = heads * dh;
    let qkv = rv(bb * nt * 3 * dd, 72);
    let s = SeqShape {
        batch: bb,
        tokens: nt,
        prefix,
        heads,
    };
    let r64 = rope_tables(gh, gw, dh, 100.0, 1.0, DType::F64).unwrap();
    let rb = rope_tables(gh, gw, dh, 100.0, 1.0, bf).unwrap();
    let (ob, cbf) = p::attention(&t(&qkv, &[bb * nt, 3 * dd], bf), s, Some(&rb)).unwrap();
    assert_eq!(ob.dtype(), bf);
    let (o64, c64) =
        cpu_attn::attention(&t(&qkv, &[bb * nt, 3 * dd], DType::F64), s, Some(&r64)).unwrap();
    close("bf16 attention", &ob, &o64.to_dtype(bf).unwrap(), tol);
    let ga = rv(bb * nt * dd, 73);
    let db_ = p::attention_bwd(&cbf, &t(&ga, &[bb * nt, dd], bf)).unwrap();
    let d64 = cpu_attn::attention_bwd(&c64, &t(&ga, &[bb * nt, dd], DType::F64)).unwrap();
    close(
        "bf16 attention dqkv",
        &db_,
        &d64.to_dtype(bf).unwrap(),
        5e-2,
    );

    // losses in f32
    let (nn_, kk) = (24, 200);
    let l: Vec<f64> = rv(nn_ * kk, 74).iter().map(|a| a * 0.3).collect();
    let q = p::sinkhorn_knopp(&t(&l, &[nn_, kk], bf), 0.07, 3).unwrap();
    assert_eq!(q.dtype(), DType::F32);
    let q64 = cpu_loss::sinkhorn_knopp(&t(&l, &[nn_, kk], DType::F64), 0.07, 3).unwrap();
    close(
        "bf16 sinkhorn (inputs rounded to bf16)",
        &q,
        &q64.to_dtype(DType::F32).unwrap(),
        tol,
    );
    let sl = rv(nn_ * kk, 75);
    let pairs: Vec<Vec<(usize, f64)>> = (0..nn_).map(|i| vec![(i, 1.0)]).collect();
    let ones = vec![1.0; nn_];
    let (lb16, gb16) =
        p::soft_cross_entropy(&t(&sl, &[nn_, kk], bf), &q, &pairs, 0.1, &ones).unwrap();
    assert_eq!(gb16.dtype(), bf);
    let (l64, g64) =
        cpu_loss::soft_cross_entropy(&t(&sl, &[nn_, kk], DType::F64), &q64, &pairs, 0.1, &ones)
            .unwrap();
    assert!(
        rel(&lb16, &l64) < tol,
        "bf16 soft CE loss {:e}",
        rel(&lb16, &l64)
    );
    close("bf16 soft CE grad", &gb16, &g64.to_dtype(bf).unwrap(), 5e-2);
    let kx = rv(16 * 32, 76);
    let (kl, kg) = p::koleo(&t(&kx, &[16, 32], bf)).unwrap();
    assert_eq!(kg.dtype(), bf);
    let want = r::koleo(&v(&t(&kx, &[16, 32], bf)), 16, 32);
    assert!(
        (kl - want).abs() < 1e-4 * want.abs(),
        "bf16 koleo {kl} vs {want}"
    );
}

// ---------------------------------------------------------------------------- devices

#[test]
fn device_names_parse() {
    assert!(p::device("cpu").unwrap().is_cpu());
    for bad in ["gpu", "cuda:", "cuda:x", "cuda0", "metal"] {
        let e = p::device(bad).unwrap_err().to_string();
        assert!(e.contains("bad device"), "{bad}: {e}");
    }
    #[cfg(not(feature = "cuda"))]
    {
        let e = p::device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("without CUDA support"), "{e}");
        assert!(p::device("cuda").is_err());
    }
    p::synchronize(&Device::Cpu).unwrap();
}

#[test]
fn a_bf16_linear_with_bias_rounds_once_as_pytorch_does() {
    // x W^T + b with the bias cancelling most of the product: the result must be the f32
    // sum rounded to bf16 once, not the product rounded, then the sum rounded again
    let (m, k, n) = (16, 24, 12);
    let x = t(&rv(m * k, 1), &[m, k], DType::BF16);
    let w = t(&rv(n * k, 2), &[n, k], DType::BF16);
    let prod = x
        .to_dtype(DType::F32)
        .unwrap()
        .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
        .unwrap();
    // a bias that cancels the first row's product up to ~1% (in bf16)
    let b = prod
        .narrow(0, 0, 1)
        .unwrap()
        .affine(-0.99, 0.0)
        .unwrap()
        .reshape(n)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let once = prod
        .broadcast_add(&b.to_dtype(DType::F32).unwrap().reshape((1, n)).unwrap())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let y = p::linear(&x, &w, Some(&b)).unwrap();
    assert_eq!(v(&y), v(&once), "rounded once");
    let twice = prod
        .to_dtype(DType::BF16)
        .unwrap()
        .broadcast_add(&b.reshape((1, n)).unwrap())
        .unwrap();
    assert_ne!(v(&y), v(&twice), "the fixture must tell the two apart");
    // without a bias: the product rounded once
    let y0 = p::linear(&x, &w, None).unwrap();
    assert_eq!(v(&y0), v(&prod.to_dtype(DType::BF16).unwrap()));
    // f32 with a bias: product plus bias in f32, as before
    let (x32, w32, b32) = (
        x.to_dtype(DType::F32).unwrap(),
        w.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    let y32 = p::linear(&x32, &w32, Some(&b32)).unwrap();
    assert_eq!(
        v(&y32),
        v(&prod.broadcast_add(&b32.reshape((1, n)).unwrap()).unwrap())
    );
}
