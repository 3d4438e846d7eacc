//! Every fast op against its naive f64 twin on random inputs of several shapes, and every
//! backward pass against central finite differences of the twin.

use candle_core::{DType, Tensor};
use rand::RngExt;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::attention::{attention, attention_bwd, attention_infer, rope_tables, SeqShape};
use crate::host::{from_vec, to_vec};
use crate::loss::{bicubic_matrix, gram_loss, koleo, resize_tokens, resize_tokens_bwd, sinkhorn_knopp, soft_cross_entropy};
use crate::nn::*;
use crate::optim::{adamw_update, ema_update, AdamWStep};
use crate::reference as r;
use crate::schedule::Schedule;

fn rv(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn t(v: &[f64], shape: &[usize]) -> Tensor {
    from_vec(v.to_vec(), shape).unwrap()
}

fn v(x: &Tensor) -> Vec<f64> {
    to_vec::<f64>(x).unwrap()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Central differences of `f` at `x` for up to 40 evenly spread coordinates; compares
/// with `analytic` on those coordinates.
fn check_grad(name: &str, f: impl Fn(&[f64]) -> f64, x: &[f64], analytic: &[f64], tol: f64) {
    let h = 1e-6;
    let step = (x.len() / 40).max(1);
    let mut num = vec![];
    let mut ana = vec![];
    for i in (0..x.len()).step_by(step) {
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        num.push((f(&xp) - f(&xm)) / (2.0 * h));
        ana.push(analytic[i]);
    }
    let e = rel(&ana, &num);
    assert!(e < tol, "{name}: gradient rel err {e:e} (analytic {:?} vs numeric {:?})", &ana[..ana.len().min(4)], &num[..num.len().min(4)]);
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn linear_matches_reference_and_gradients() {
    for &(m, k, n) in &[(3, 5, 4), (37, 64, 96), (130, 17, 33)] {
        let x = rv(m * k, 1);
        let w = rv(n * k, 2);
        let b = rv(n, 3);
        let y = linear(&t(&x, &[m, k]), &t(&w, &[n, k]), Some(&t(&b, &[n]))).unwrap();
        assert!(rel(&v(&y), &r::linear(&x, &w, Some(&b), m, k, n)) < 1e-12);
        let g = rv(m * n, 4);
        let (dx, dw, db) = linear_bwd(&t(&x, &[m, k]), &t(&w, &[n, k]), &t(&g, &[m, n]), true, true).unwrap();
        check_grad("linear dx", |xx| dot(&r::linear(xx, &w, Some(&b), m, k, n), &g), &x, &v(&dx.unwrap()), 1e-7);
        check_grad("linear dw", |ww| dot(&r::linear(&x, ww, Some(&b), m, k, n), &g), &w, &v(&dw), 1e-7);
        check_grad("linear db", |bb| dot(&r::linear(&x, &w, Some(bb), m, k, n), &g), &b, &v(&db.unwrap()), 1e-7);
    }
}

#[test]
fn layer_norm_matches_reference_and_gradients() {
    for &(rows, d) in &[(1, 5), (7, 17), (40, 64), (33, 384)] {
        let x: Vec<f64> = rv(rows * d, 5).iter().map(|v| v * 3.0 + 0.5).collect();
        let w: Vec<f64> = rv(d, 6).iter().map(|v| 1.0 + 0.2 * v).collect();
        let b = rv(d, 7);
        let (y, cache) = layer_norm(&t(&x, &[rows, d]), &t(&w, &[d]), &t(&b, &[d]), 1e-5).unwrap();
        assert!(rel(&v(&y), &r::layer_norm(&x, &w, &b, d, 1e-5)) < 1e-12);
        let g = rv(rows * d, 8);
        let (dx, dw, db) = layer_norm_bwd(&t(&x, &[rows, d]), &t(&w, &[d]), &cache, &t(&g, &[rows, d])).unwrap();
        check_grad("ln dx", |xx| dot(&r::layer_norm(xx, &w, &b, d, 1e-5), &g), &x, &v(&dx), 1e-6);
        check_grad("ln dw", |ww| dot(&r::layer_norm(&x, ww, &b, d, 1e-5), &g), &w, &v(&dw), 1e-7);
        check_grad("ln db", |bb| dot(&r::layer_norm(&x, &w, bb, d, 1e-5), &g), &b, &v(&db), 1e-7);
    }
}

#[test]
fn layer_norm_f32_close_to_f64() {
    let (rows, d) = (50, 384);
    let x = rv(rows * d, 9);
    let w = rv(d, 10);
    let b = rv(d, 11);
    let (y, _) = layer_norm(&t(&x, &[rows, d]).to_dtype(DType::F32).unwrap(), &t(&w, &[d]).to_dtype(DType::F32).unwrap(), &t(&b, &[d]).to_dtype(DType::F32).unwrap(), 1e-5).unwrap();
    assert!(rel(&v(&y.to_dtype(DType::F64).unwrap()), &r::layer_norm(&x, &w, &b, d, 1e-5)) < 1e-6);
}

#[test]
fn fast_exp_and_erf_are_accurate() {
    let mut max_exp = 0f64;
    let mut max_erf = 0f64;
    for i in 0..200_000 {
        let x = ((-87.0 + 175.0 * i as f64 / 200_000.0) as f32) as f64;
        let e = crate::real::exp_f32(x as f32) as f64;
        max_exp = max_exp.max(((e - x.exp()) / x.exp()).abs());
        let z = ((-6.0 + 12.0 * i as f64 / 200_000.0) as f32) as f64;
        max_erf = max_erf.max((crate::real::erf_f32(z as f32) as f64 - libm::erf(z)).abs());
    }
    assert!(max_exp < 3e-7, "exp_f32 max rel err {max_exp:e}");
    assert!(max_erf < 5e-7, "erf_f32 max abs err {max_erf:e}");
}

#[test]
fn gelu_matches_reference_and_gradients() {
    let x: Vec<f64> = rv(3000, 12).iter().map(|v| v * 6.0).collect();
    let y = gelu(&t(&x, &[3000])).unwrap();
    assert!(rel(&v(&y), &r::gelu(&x)) < 1e-14);
    let y32 = gelu(&t(&x, &[3000]).to_dtype(DType::F32).unwrap()).unwrap();
    assert!(rel(&v(&y32.to_dtype(DType::F64).unwrap()), &r::gelu(&x)) < 1e-6);
    let g = rv(3000, 13);
    let dx = gelu_bwd(&t(&x, &[3000]), &t(&g, &[3000])).unwrap();
    check_grad("gelu", |xx| dot(&r::gelu(xx), &g), &x, &v(&dx), 1e-7);
    let dx32 = gelu_bwd(&t(&x, &[3000]).to_dtype(DType::F32).unwrap(), &t(&g, &[3000]).to_dtype(DType::F32).unwrap()).unwrap();
    assert!(rel(&v(&dx32.to_dtype(DType::F64).unwrap()), &v(&dx)) < 1e-6);
}

#[test]
fn layerscale_and_l2norm_gradients() {
    let (rows, d) = (9, 12);
    let x = rv(rows * d, 14);
    let gm = rv(d, 15);
    let g = rv(rows * d, 16);
    let f = |xx: &[f64], gg: &[f64]| -> Vec<f64> { xx.chunks(d).flat_map(|r| r.iter().zip(gg).map(|(a, b)| a * b).collect::<Vec<_>>()).collect() };
    let y = mul_row(&t(&x, &[rows, d]), &t(&gm, &[d])).unwrap();
    assert!(rel(&v(&y), &f(&x, &gm)) < 1e-15);
    let (dx, dg) = mul_row_bwd(&t(&x, &[rows, d]), &t(&gm, &[d]), &t(&g, &[rows, d])).unwrap();
    check_grad("ls dx", |xx| dot(&f(xx, &gm), &g), &x, &v(&dx), 1e-8);
    check_grad("ls dgamma", |gg| dot(&f(&x, gg), &g), &gm, &v(&dg), 1e-8);
    let (y, n) = l2_normalize(&t(&x, &[rows, d]), 1e-12).unwrap();
    assert!(rel(&v(&y), &r::l2_normalize(&x, d, 1e-12)) < 1e-14);
    let dx = l2_normalize_bwd(&y, &n, &t(&g, &[rows, d]), 1e-12).unwrap();
    check_grad("l2norm", |xx| dot(&r::l2_normalize(xx, d, 1e-12), &g), &x, &v(&dx), 1e-7);
}

#[test]
fn attention_matches_reference_and_gradients() {
    // (batch, grid h, grid w, prefix, heads, head dim)
    for &(b, gh, gw, prefix, heads, dh) in &[(2, 2, 3, 5, 2, 8), (3, 1, 4, 1, 3, 4), (1, 3, 3, 0, 1, 16)] {
        let n = prefix + gh * gw;
        let d = heads * dh;
        let qkv = rv(b * n * 3 * d, 17);
        let rope = rope_tables(gh, gw, dh, 100.0, 1.3, DType::F64).unwrap();
        let (sin, cos) = (v(&rope.sin), v(&rope.cos));
        let s = SeqShape { batch: b, tokens: n, prefix, heads };
        let (out, cache) = attention(&t(&qkv, &[b * n, 3 * d]), s, Some(&rope)).unwrap();
        let reference = r::attention(&qkv, b, n, d, heads, prefix, Some(&sin), Some(&cos));
        assert!(rel(&v(&out), &reference) < 1e-12);
        let inf = attention_infer(&t(&qkv, &[b * n, 3 * d]), s, Some(&rope)).unwrap();
        assert!(rel(&v(&inf), &reference) < 1e-12);
        let g = rv(b * n * d, 18);
        let dq = attention_bwd(&cache, &t(&g, &[b * n, d])).unwrap();
        check_grad("attention", |x| dot(&r::attention(x, b, n, d, heads, prefix, Some(&sin), Some(&cos)), &g), &qkv, &v(&dq), 1e-6);
    }
}

#[test]
fn tokens_and_patches() {
    // im2col + linear equals a direct stride-p convolution
    let (n, c, h, w, p, dim) = (2, 3, 8, 12, 4, 5);
    let img = rv(n * c * h * w, 19);
    let wt = rv(dim * c * p * p, 20);
    let cols = im2col(&t(&img, &[n, c, h, w]), p).unwrap();
    let y = v(&linear(&cols, &t(&wt, &[dim, c * p * p]), None).unwrap());
    for b in 0..n {
        for i in 0..h / p {
            for j in 0..w / p {
                for o in 0..dim {
                    let mut s = 0.0;
                    for ch in 0..c {
                        for ky in 0..p {
                            for kx in 0..p {
                                s += img[((b * c + ch) * h + i * p + ky) * w + j * p + kx] * wt[((o * c + ch) * p + ky) * p + kx];
                            }
                        }
                    }
                    let row = (b * (h / p) + i) * (w / p) + j;
                    assert!((y[row * dim + o] - s).abs() < 1e-12);
                }
            }
        }
    }
    // token assembly and its adjoint
    let (nb, np, r_, d) = (3, 4, 2, 5);
    let pt = rv(nb * np * d, 21);
    let cls = rv(d, 22);
    let st = rv(r_ * d, 23);
    let mt = rv(d, 24);
    let masks: Vec<u8> = (0..nb * np).map(|i| (i % 3 == 0) as u8).collect();
    let f = |pt: &[f64], cls: &[f64], st: &[f64], mt: &[f64]| {
        v(&assemble_tokens(&t(pt, &[nb * np, d]), nb, &t(cls, &[d]), &t(st, &[r_, d]), &t(mt, &[d]), Some(&masks)).unwrap())
    };
    let g = rv(nb * (1 + r_ + np) * d, 25);
    let (dp, dc, ds, dm) = assemble_tokens_bwd(&t(&g, &[nb * (1 + r_ + np), d]), nb, r_, Some(&masks)).unwrap();
    check_grad("tok patches", |x| dot(&f(x, &cls, &st, &mt), &g), &pt, &v(&dp), 1e-8);
    check_grad("tok cls", |x| dot(&f(&pt, x, &st, &mt), &g), &cls, &v(&dc), 1e-8);
    check_grad("tok storage", |x| dot(&f(&pt, &cls, x, &mt), &g), &st, &v(&ds), 1e-8);
    check_grad("tok mask", |x| dot(&f(&pt, &cls, &st, x), &g), &mt, &v(&dm), 1e-8);
}

#[test]
fn row_blocks_roundtrip() {
    let x = rv(10 * 3, 26);
    let sel = RowBlocks { starts: vec![6, 0], lens: vec![2, 3], scales: vec![2.0, 2.0] };
    let g = gather_blocks(&t(&x, &[10, 3]), &sel).unwrap();
    assert_eq!(v(&g), [&x[18..24], &x[0..9]].concat());
    let rr = rv(5 * 3, 27);
    let y = v(&scatter_add_blocks(&t(&x, &[10, 3]), &sel, &t(&rr, &[5, 3]), false).unwrap());
    for i in 0..30 {
        let row = i / 3;
        let add = if row < 3 { 2.0 * rr[i + 6] } else if (6..8).contains(&row) { 2.0 * rr[i - 18] } else { 0.0 };
        assert!((y[i] - x[i] - add).abs() < 1e-15);
    }
    // adjoint: <scatter(s r), g> = <r, gather_scaled(g)>
    let g = rv(30, 28);
    let lhs = dot(&(0..30).map(|i| y[i] - x[i]).collect::<Vec<_>>(), &g);
    let rhs = dot(&rr, &v(&gather_blocks_scaled(&t(&g, &[10, 3]), &sel).unwrap()));
    assert!((lhs - rhs).abs() < 1e-12);
}

#[test]
fn sinkhorn_knopp_matches_reference() {
    for &(n, k, temp) in &[(8, 40, 0.07), (21, 7, 0.04), (3, 100, 0.1)] {
        let l = rv(n * k, 28);
        let q = v(&sinkhorn_knopp(&t(&l, &[n, k]), temp, 3).unwrap());
        assert!(rel(&q, &r::sinkhorn_knopp(&l, n, k, temp, 3)) < 1e-12);
        for row in q.chunks(k) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }
}

#[test]
fn soft_cross_entropy_matches_reference_and_gradients() {
    let (rows, trows, k) = (5, 3, 11);
    let s = rv(rows * k, 29);
    let tg = v(&sinkhorn_knopp(&t(&rv(trows * k, 30), &[trows, k]), 0.07, 3).unwrap());
    let pairs: Vec<Vec<(usize, f64)>> = vec![vec![(0, 0.5), (1, 0.5)], vec![(2, 1.0)], vec![], vec![(1, 0.25)], vec![(0, 1.0), (2, 0.3)]];
    let gs = vec![1.0, 2.0, 1.0, 0.5, 1.0];
    let f = |s: &[f64]| -> f64 {
        (0..rows).map(|r_| gs[r_] * pairs[r_].iter().map(|&(ti, w)| w * r::soft_ce(&s[r_ * k..(r_ + 1) * k], &tg[ti * k..(ti + 1) * k], 0.1)).sum::<f64>()).sum()
    };
    let (losses, g) = soft_cross_entropy(&t(&s, &[rows, k]), &t(&tg, &[trows, k]), &pairs, 0.1, &gs).unwrap();
    let total: f64 = losses.iter().zip(&gs).map(|(l, w)| l * w).sum();
    assert!((total - f(&s)).abs() < 1e-12);
    check_grad("soft ce", f, &s, &v(&g), 1e-7);
}

#[test]
fn koleo_matches_reference_and_gradients() {
    for &(n, d) in &[(4, 6), (9, 16)] {
        let x = rv(n * d, 31);
        let (l, g) = koleo(&t(&x, &[n, d])).unwrap();
        assert!((l - r::koleo(&x, n, d)).abs() < 1e-12);
        check_grad("koleo", |xx| r::koleo(xx, n, d), &x, &v(&g), 1e-6);
    }
}

#[test]
fn gram_loss_matches_reference_and_gradients() {
    let (n_img, p, d) = (3, 5, 7);
    let s = rv(n_img * p * d, 32);
    let tg = rv(n_img * p * d, 33);
    for &per_image in &[true, false] {
        let groups = if per_image { n_img } else { 1 };
        let (l, g) = gram_loss(&t(&s, &[n_img * p, d]), &t(&tg, &[n_img * p, d]), n_img, per_image).unwrap();
        assert!((l - r::gram(&s, &tg, groups, d)).abs() < 1e-13);
        check_grad("gram", |x| r::gram(x, &tg, groups, d), &s, &v(&g), 1e-6);
    }
}

#[test]
fn bicubic_resize_matches_reference_and_is_linear() {
    for &(hin, win, hout, wout) in &[(8, 8, 4, 4), (6, 6, 3, 3), (5, 7, 3, 2), (3, 3, 7, 5)] {
        let (n_img, d) = (2, 3);
        let x = rv(n_img * hin * win * d, 34);
        let y = v(&resize_tokens(&t(&x, &[n_img * hin * win, d]), n_img, (hin, win), (hout, wout)).unwrap());
        for b in 0..n_img {
            for c in 0..d {
                let chan: Vec<f64> = (0..hin * win).map(|i| x[(b * hin * win + i) * d + c]).collect();
                let refr = r::bicubic(&chan, hin, win, hout, wout);
                for i in 0..hout * wout {
                    assert!((y[(b * hout * wout + i) * d + c] - refr[i]).abs() < 1e-12);
                }
            }
        }
        let g = rv(n_img * hout * wout * d, 35);
        let adj = v(&resize_tokens_bwd(&t(&g, &[n_img * hout * wout, d]), n_img, (hin, win), (hout, wout)).unwrap());
        assert!((dot(&y, &g) - dot(&x, &adj)).abs() < 1e-10);
    }
    // rows of the weight matrix sum to one (interpolation preserves constants)
    for row in bicubic_matrix(8, 3).chunks(8) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

#[test]
fn adamw_and_ema_match_reference() {
    let n = 40_000;
    let p = rv(n, 36);
    let g = rv(n, 37);
    let mut m: Vec<f64> = rv(n, 38).iter().map(|v| v * 0.1).collect();
    let mut vv: Vec<f64> = rv(n, 39).iter().map(|v| v * v * 0.01).collect();
    let (mut m2, mut v2) = (m.clone(), vv.clone());
    let pt = t(&p, &[n]);
    let h = AdamWStep { lr: 1e-3, weight_decay: 0.04, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 10 };
    adamw_update(&pt, &t(&g, &[n]), &mut m, &mut vv, &h).unwrap();
    let expect = r::adamw(&p, &g, &mut m2, &mut v2, 1e-3, 0.04, 0.9, 0.999, 1e-8, 10);
    assert!(rel(&v(&pt), &expect) < 1e-14);
    assert!(rel(&m, &m2) < 1e-15 && rel(&vv, &v2) < 1e-15);
    let tt = t(&p, &[n]);
    ema_update(&tt, &t(&g, &[n]), 0.99).unwrap();
    let e: Vec<f64> = p.iter().zip(&g).map(|(a, b)| 0.99 * a + 0.01 * b).collect();
    assert!(rel(&v(&tt), &e) < 1e-15);
}

#[test]
fn schedules_follow_the_official_arrays() {
    let s = Schedule { start: 0.0, peak: 1.0, end: 0.1, warmup: 4, cosine: 10 };
    assert_eq!(s.at(0), 0.0);
    assert_eq!(s.at(2), 0.5);
    assert_eq!(s.at(4), 1.0);
    assert!((s.at(9) - (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * 0.5).cos()))).abs() < 1e-12);
    assert_eq!(s.at(14), 0.1);
    assert_eq!(s.at(1_000_000), 0.1);
    let c = Schedule::warmup_constant(0.0, 2e-3, 100);
    assert_eq!(c.at(50), 1e-3);
    assert_eq!(c.at(100), 2e-3);
    assert_eq!(c.at(10_000_000), 2e-3);
}
