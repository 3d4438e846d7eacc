//! Every fast op against its naive f64 twin on random inputs of several shapes, and every
//! backward pass against central finite differences of the twin.

use candle_core::{DType, Tensor};
use rand::RngExt;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::attention::{
    attention, attention_bwd, attention_groups, attention_groups_bwd, attention_groups_infer,
    attention_infer, rope_tables, AttnGroup, SeqShape,
};
use crate::host::{from_vec, to_vec};
use crate::loss::{
    bicubic_matrix, gram_loss, koleo, resize_tokens, resize_tokens_bwd, sinkhorn_knopp,
    sinkhorn_knopp_group, soft_cross_entropy,
};
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
    assert!(
        e < tol,
        "{name}: gradient rel err {e:e} (analytic {:?} vs numeric {:?})",
        &ana[..ana.len().min(4)],
        &num[..num.len().min(4)]
    );
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
        let (dx, dw, db) = linear_bwd(
            &t(&x, &[m, k]),
            &t(&w, &[n, k]),
            &t(&g, &[m, n]),
            true,
            true,
        )
        .unwrap();
        check_grad(
            "linear dx",
            |xx| dot(&r::linear(xx, &w, Some(&b), m, k, n), &g),
            &x,
            &v(&dx.unwrap()),
            1e-7,
        );
        check_grad(
            "linear dw",
            |ww| dot(&r::linear(&x, ww, Some(&b), m, k, n), &g),
            &w,
            &v(&dw),
            1e-7,
        );
        let db = db.unwrap();
        check_grad(
            "linear db",
            |bb| dot(&r::linear(&x, &w, Some(bb), m, k, n), &g),
            &b,
            &v(&db),
            1e-7,
        );
        // the split pieces the ViT backward overlaps on two cores give the same gradients
        let (xt, wt, gt) = (t(&x, &[m, k]), t(&w, &[n, k]), t(&g, &[m, n]));
        let dx2 = linear_dx(&gt, &wt, xt.shape()).unwrap();
        check_grad(
            "linear_dx",
            |xx| dot(&r::linear(xx, &w, Some(&b), m, k, n), &g),
            &x,
            &v(&dx2),
            1e-7,
        );
        assert_eq!(dx2.dims(), &[m, k]);
        check_grad(
            "linear_dw",
            |ww| dot(&r::linear(&x, ww, Some(&b), m, k, n), &g),
            &w,
            &v(&linear_dw(&xt, &gt).unwrap()),
            1e-7,
        );
        assert!(rel(&v(&col_sums(&gt).unwrap()), &v(&db)) < 1e-12);
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
        let (dx, dw, db) =
            layer_norm_bwd(&t(&x, &[rows, d]), &t(&w, &[d]), &cache, &t(&g, &[rows, d])).unwrap();
        check_grad(
            "ln dx",
            |xx| dot(&r::layer_norm(xx, &w, &b, d, 1e-5), &g),
            &x,
            &v(&dx),
            1e-6,
        );
        check_grad(
            "ln dw",
            |ww| dot(&r::layer_norm(&x, ww, &b, d, 1e-5), &g),
            &w,
            &v(&dw),
            1e-7,
        );
        check_grad(
            "ln db",
            |bb| dot(&r::layer_norm(&x, &w, bb, d, 1e-5), &g),
            &b,
            &v(&db),
            1e-7,
        );
    }
}

#[test]
fn layer_norm_f32_close_to_f64() {
    let (rows, d) = (50, 384);
    let x = rv(rows * d, 9);
    let w = rv(d, 10);
    let b = rv(d, 11);
    let (y, _) = layer_norm(
        &t(&x, &[rows, d]).to_dtype(DType::F32).unwrap(),
        &t(&w, &[d]).to_dtype(DType::F32).unwrap(),
        &t(&b, &[d]).to_dtype(DType::F32).unwrap(),
        1e-5,
    )
    .unwrap();
    assert!(
        rel(
            &v(&y.to_dtype(DType::F64).unwrap()),
            &r::layer_norm(&x, &w, &b, d, 1e-5)
        ) < 1e-6
    );
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
    let dx32 = gelu_bwd(
        &t(&x, &[3000]).to_dtype(DType::F32).unwrap(),
        &t(&g, &[3000]).to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    assert!(rel(&v(&dx32.to_dtype(DType::F64).unwrap()), &v(&dx)) < 1e-6);
}

#[test]
fn layerscale_and_l2norm_gradients() {
    let (rows, d) = (9, 12);
    let x = rv(rows * d, 14);
    let gm = rv(d, 15);
    let g = rv(rows * d, 16);
    let f = |xx: &[f64], gg: &[f64]| -> Vec<f64> {
        xx.chunks(d)
            .flat_map(|r| r.iter().zip(gg).map(|(a, b)| a * b).collect::<Vec<_>>())
            .collect()
    };
    let y = mul_row(&t(&x, &[rows, d]), &t(&gm, &[d])).unwrap();
    assert!(rel(&v(&y), &f(&x, &gm)) < 1e-15);
    let (dx, dg) = mul_row_bwd(&t(&x, &[rows, d]), &t(&gm, &[d]), &t(&g, &[rows, d])).unwrap();
    check_grad("ls dx", |xx| dot(&f(xx, &gm), &g), &x, &v(&dx), 1e-8);
    check_grad("ls dgamma", |gg| dot(&f(&x, gg), &g), &gm, &v(&dg), 1e-8);
    let (y, n) = l2_normalize(&t(&x, &[rows, d]), 1e-12).unwrap();
    assert!(rel(&v(&y), &r::l2_normalize(&x, d, 1e-12)) < 1e-14);
    let dx = l2_normalize_bwd(&y, &n, &t(&g, &[rows, d]), 1e-12).unwrap();
    check_grad(
        "l2norm",
        |xx| dot(&r::l2_normalize(xx, d, 1e-12), &g),
        &x,
        &v(&dx),
        1e-7,
    );
}

#[test]
fn attention_matches_reference_and_gradients() {
    // (batch, grid h, grid w, prefix, heads, head dim)
    for &(b, gh, gw, prefix, heads, dh) in
        &[(2, 2, 3, 5, 2, 8), (3, 1, 4, 1, 3, 4), (1, 3, 3, 0, 1, 16)]
    {
        let n = prefix + gh * gw;
        let d = heads * dh;
        let qkv = rv(b * n * 3 * d, 17);
        let rope = rope_tables(gh, gw, dh, 100.0, 1.3, DType::F64).unwrap();
        let (sin, cos) = (v(&rope.sin), v(&rope.cos));
        let s = SeqShape {
            batch: b,
            tokens: n,
            prefix,
            heads,
        };
        let (out, cache) = attention(&t(&qkv, &[b * n, 3 * d]), s, Some(&rope)).unwrap();
        let reference = r::attention(&qkv, b, n, d, heads, prefix, Some(&sin), Some(&cos));
        assert!(rel(&v(&out), &reference) < 1e-12);
        let inf = attention_infer(&t(&qkv, &[b * n, 3 * d]), s, Some(&rope)).unwrap();
        assert!(rel(&v(&inf), &reference) < 1e-12);
        let g = rv(b * n * d, 18);
        let dq = attention_bwd(&cache, &t(&g, &[b * n, d])).unwrap();
        check_grad(
            "attention",
            |x| {
                dot(
                    &r::attention(x, b, n, d, heads, prefix, Some(&sin), Some(&cos)),
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
                                s += img[((b * c + ch) * h + i * p + ky) * w + j * p + kx]
                                    * wt[((o * c + ch) * p + ky) * p + kx];
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
        v(&assemble_tokens(
            &t(pt, &[nb * np, d]),
            nb,
            &t(cls, &[d]),
            &t(st, &[r_, d]),
            &t(mt, &[d]),
            Some(&masks),
        )
        .unwrap())
    };
    let g = rv(nb * (1 + r_ + np) * d, 25);
    let (dp, dc, ds, dm) =
        assemble_tokens_bwd(&t(&g, &[nb * (1 + r_ + np), d]), nb, r_, Some(&masks)).unwrap();
    check_grad(
        "tok patches",
        |x| dot(&f(x, &cls, &st, &mt), &g),
        &pt,
        &v(&dp),
        1e-8,
    );
    check_grad(
        "tok cls",
        |x| dot(&f(&pt, x, &st, &mt), &g),
        &cls,
        &v(&dc),
        1e-8,
    );
    check_grad(
        "tok storage",
        |x| dot(&f(&pt, &cls, x, &mt), &g),
        &st,
        &v(&ds),
        1e-8,
    );
    check_grad(
        "tok mask",
        |x| dot(&f(&pt, &cls, &st, x), &g),
        &mt,
        &v(&dm),
        1e-8,
    );
}

#[test]
fn row_blocks_roundtrip() {
    let x = rv(10 * 3, 26);
    let sel = RowBlocks {
        starts: vec![6, 0],
        lens: vec![2, 3],
        scales: vec![2.0, 2.0],
    };
    let g = gather_blocks(&t(&x, &[10, 3]), &sel).unwrap();
    assert_eq!(v(&g), [&x[18..24], &x[0..9]].concat());
    let rr = rv(5 * 3, 27);
    let y = v(&scatter_add_blocks(&t(&x, &[10, 3]), &sel, &t(&rr, &[5, 3]), false).unwrap());
    for i in 0..30 {
        let row = i / 3;
        let add = if row < 3 {
            2.0 * rr[i + 6]
        } else if (6..8).contains(&row) {
            2.0 * rr[i - 18]
        } else {
            0.0
        };
        assert!((y[i] - x[i] - add).abs() < 1e-15);
    }
    // adjoint: <scatter(s r), g> = <r, gather_scaled(g)>
    let g = rv(30, 28);
    let lhs = dot(&(0..30).map(|i| y[i] - x[i]).collect::<Vec<_>>(), &g);
    let rhs = dot(
        &rr,
        &v(&gather_blocks_scaled(&t(&g, &[10, 3]), &sel).unwrap()),
    );
    assert!((lhs - rhs).abs() < 1e-12);
}

/// An all-reduce among test threads (sum, any order).
struct TestGroup {
    barrier: std::sync::Barrier,
    acc: std::sync::Mutex<Vec<f64>>,
}

impl TestGroup {
    fn reduce(&self, v: &mut [f64]) {
        self.barrier.wait();
        {
            let mut a = self.acc.lock().unwrap();
            if a.is_empty() {
                a.resize(v.len(), 0.0);
            }
            a.iter_mut().zip(v.iter()).for_each(|(a, b)| *a += b);
        }
        self.barrier.wait();
        v.copy_from_slice(&self.acc.lock().unwrap());
        if self.barrier.wait().is_leader() {
            self.acc.lock().unwrap().clear();
        }
    }
}

#[test]
fn sinkhorn_knopp_over_a_group_equals_it_over_the_whole_batch() {
    let (k, temp) = (40, 0.07);
    // three members with 5, 0 and 8 rows: a member without rows still takes part
    let sizes = [5usize, 0, 8];
    let n: usize = sizes.iter().sum();
    let l = rv(n * k, 31);
    let whole = r::sinkhorn_knopp(&l, n, k, temp, 3);
    let g = TestGroup {
        barrier: std::sync::Barrier::new(sizes.len()),
        acc: std::sync::Mutex::new(vec![]),
    };
    let parts: Vec<Vec<f64>> = std::thread::scope(|s| {
        let mut start = 0;
        let hs: Vec<_> = sizes
            .iter()
            .map(|&m| {
                let rows = l[start * k..(start + m) * k].to_vec();
                start += m;
                let g = &g;
                s.spawn(move || {
                    let q = sinkhorn_knopp_group(&t(&rows, &[m, k]), temp, 3, &mut |v| {
                        g.reduce(v);
                        Ok(())
                    })
                    .unwrap();
                    assert_eq!(q.dims(), &[m, k]);
                    v(&q)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let joined: Vec<f64> = parts.concat();
    assert!(rel(&joined, &whole) < 1e-12, "{}", rel(&joined, &whole));
    // alone, it is the fused kernel
    let alone = sinkhorn_knopp_group(&t(&l, &[n, k]), temp, 3, &mut |_| Ok(())).unwrap();
    let fused = sinkhorn_knopp(&t(&l, &[n, k]), temp, 3).unwrap();
    assert!(rel(&v(&alone), &v(&fused)) < 1e-12);
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
    let pairs: Vec<Vec<(usize, f64)>> = vec![
        vec![(0, 0.5), (1, 0.5)],
        vec![(2, 1.0)],
        vec![],
        vec![(1, 0.25)],
        vec![(0, 1.0), (2, 0.3)],
    ];
    let gs = vec![1.0, 2.0, 1.0, 0.5, 1.0];
    let f = |s: &[f64]| -> f64 {
        (0..rows)
            .map(|r_| {
                gs[r_]
                    * pairs[r_]
                        .iter()
                        .map(|&(ti, w)| {
                            w * r::soft_ce(&s[r_ * k..(r_ + 1) * k], &tg[ti * k..(ti + 1) * k], 0.1)
                        })
                        .sum::<f64>()
            })
            .sum()
    };
    let (losses, g) =
        soft_cross_entropy(&t(&s, &[rows, k]), &t(&tg, &[trows, k]), &pairs, 0.1, &gs).unwrap();
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
        let (l, g) = gram_loss(
            &t(&s, &[n_img * p, d]),
            &t(&tg, &[n_img * p, d]),
            n_img,
            per_image,
        )
        .unwrap();
        assert!((l - r::gram(&s, &tg, groups, d)).abs() < 1e-13);
        check_grad("gram", |x| r::gram(x, &tg, groups, d), &s, &v(&g), 1e-6);
    }
}

#[test]
fn bicubic_resize_matches_reference_and_is_linear() {
    for &(hin, win, hout, wout) in &[(8, 8, 4, 4), (6, 6, 3, 3), (5, 7, 3, 2), (3, 3, 7, 5)] {
        let (n_img, d) = (2, 3);
        let x = rv(n_img * hin * win * d, 34);
        let y = v(&resize_tokens(
            &t(&x, &[n_img * hin * win, d]),
            n_img,
            (hin, win),
            (hout, wout),
        )
        .unwrap());
        for b in 0..n_img {
            for c in 0..d {
                let chan: Vec<f64> = (0..hin * win)
                    .map(|i| x[(b * hin * win + i) * d + c])
                    .collect();
                let refr = r::bicubic(&chan, hin, win, hout, wout);
                for i in 0..hout * wout {
                    assert!((y[(b * hout * wout + i) * d + c] - refr[i]).abs() < 1e-12);
                }
            }
        }
        let g = rv(n_img * hout * wout * d, 35);
        let adj = v(&resize_tokens_bwd(
            &t(&g, &[n_img * hout * wout, d]),
            n_img,
            (hin, win),
            (hout, wout),
        )
        .unwrap());
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
    let h = AdamWStep {
        lr: 1e-3,
        weight_decay: 0.04,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        t: 10,
    };
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
    let s = Schedule {
        start: 0.0,
        peak: 1.0,
        end: 0.1,
        warmup: 4,
        cosine: 10,
    };
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

fn f32t(v: &[f64], shape: &[usize]) -> Tensor {
    t(v, shape).to_dtype(DType::F32).unwrap()
}

fn v32(x: &Tensor) -> Vec<f64> {
    to_vec::<f64>(&x.to_dtype(DType::F64).unwrap()).unwrap()
}

/// A drop-path style selection over `n` sequences of `tokens` rows: every other sequence,
/// scaled like the official `b / subset`.
fn sample_selection(n: usize, tokens: usize) -> RowBlocks {
    let chosen: Vec<usize> = (0..n).filter(|i| i % 2 == 1).collect();
    let sc = n as f64 / chosen.len() as f64;
    RowBlocks {
        starts: chosen.iter().map(|&i| i * tokens).collect(),
        lens: vec![tokens; chosen.len()],
        scales: vec![sc; chosen.len()],
    }
}

#[test]
fn layer_norm_on_selected_rows_matches_reference_and_gradients() {
    let (n, tokens, d) = (5, 3, 17);
    let rows = n * tokens;
    let x: Vec<f64> = rv(rows * d, 40).iter().map(|v| v * 2.0 + 0.3).collect();
    let w: Vec<f64> = rv(d, 41).iter().map(|v| 1.0 + 0.3 * v).collect();
    let b = rv(d, 42);
    for sel in [None, Some(sample_selection(n, tokens))] {
        let src: Vec<usize> = sel
            .as_ref()
            .map_or((0..rows).collect(), |s| s.source_rows());
        let (y, cache) = layer_norm_sel(
            &t(&x, &[rows, d]),
            sel.as_ref(),
            &t(&w, &[d]),
            &t(&b, &[d]),
            1e-5,
        )
        .unwrap();
        assert!(rel(&v(&y), &r::layer_norm_rows(&x, &src, &w, &b, d, 1e-5)) < 1e-12);
        let g = rv(src.len() * d, 43);
        // the input gradient is added onto an existing accumulator, only on selected rows
        let acc0 = rv(rows * d, 44);
        let acc = t(&acc0, &[rows, d]);
        let (dw, db) = layer_norm_sel_bwd_into(
            &t(&x, &[rows, d]),
            sel.as_ref(),
            &t(&w, &[d]),
            &cache,
            &t(&g, &[src.len(), d]),
            &acc,
        )
        .unwrap();
        let dx: Vec<f64> = v(&acc).iter().zip(&acc0).map(|(a, b)| a - b).collect();
        let f = |xx: &[f64], ww: &[f64], bb: &[f64]| {
            dot(&r::layer_norm_rows(xx, &src, ww, bb, d, 1e-5), &g)
        };
        check_grad("ln sel dx", |xx| f(xx, &w, &b), &x, &dx, 1e-6);
        check_grad("ln sel dw", |ww| f(&x, ww, &b), &w, &v(&dw), 1e-7);
        check_grad("ln sel db", |bb| f(&x, &w, bb), &b, &v(&db), 1e-7);
    }
}

#[test]
fn residual_add_matches_reference_and_gradients() {
    let (n, tokens, d) = (6, 4, 9);
    let rows = n * tokens;
    let x = rv(rows * d, 45);
    let gm = rv(d, 46);
    let bias = rv(d, 47);
    for sel in [None, Some(sample_selection(n, tokens))] {
        let (src, sc) = match &sel {
            Some(s) => (s.source_rows(), s.row_scales()),
            None => ((0..rows).collect(), vec![1.0; rows]),
        };
        let rr = rv(src.len() * d, 48);
        for b in [None, Some(&bias[..])] {
            let bt = b.map(|b| t(b, &[d]));
            let y = residual_add(
                &t(&x, &[rows, d]),
                sel.as_ref(),
                &t(&gm, &[d]),
                &t(&rr, &[src.len(), d]),
                bt.as_ref(),
            )
            .unwrap();
            assert!(rel(&v(&y), &r::residual_add(&x, &src, &sc, &gm, &rr, b, d)) < 1e-14);
            let g = rv(rows * d, 49);
            let (dr, dg, dbias) = residual_add_bwd(
                &t(&g, &[rows, d]),
                sel.as_ref(),
                &t(&gm, &[d]),
                &t(&rr, &[src.len(), d]),
                bt.as_ref(),
            )
            .unwrap();
            assert_eq!(dbias.is_some(), b.is_some());
            let f = |xx: &[f64], gg: &[f64], r_: &[f64], bb: Option<&[f64]>| {
                dot(&r::residual_add(xx, &src, &sc, gg, r_, bb, d), &g)
            };
            check_grad("residual dr", |r_| f(&x, &gm, r_, b), &rr, &v(&dr), 1e-8);
            check_grad(
                "residual dgamma",
                |gg| f(&x, gg, &rr, b),
                &gm,
                &v(&dg),
                1e-8,
            );
            if let Some(db) = dbias {
                check_grad(
                    "residual dbias",
                    |bb| f(&x, &gm, &rr, Some(bb)),
                    &bias,
                    &v(&db),
                    1e-8,
                );
            }
            // and the gradient with respect to x is the identity
            check_grad("residual dx", |xx| f(xx, &gm, &rr, b), &x, &g, 1e-8);
        }
    }
}

#[test]
fn gelu_with_bias_matches_reference_and_gradients() {
    let (rows, d) = (7, 13);
    let x: Vec<f64> = rv(rows * d, 50).iter().map(|v| v * 4.0).collect();
    let b = rv(d, 51);
    let y = gelu_bias(&t(&x, &[rows, d]), Some(&t(&b, &[d]))).unwrap();
    assert!(rel(&v(&y), &r::gelu_bias(&x, &b, d)) < 1e-14);
    let g = rv(rows * d, 52);
    let (dx, db) =
        gelu_bias_bwd_into(&t(&x, &[rows, d]), Some(&t(&b, &[d])), t(&g, &[rows, d])).unwrap();
    check_grad(
        "gelu bias dx",
        |xx| dot(&r::gelu_bias(xx, &b, d), &g),
        &x,
        &v(&dx),
        1e-7,
    );
    check_grad(
        "gelu bias db",
        |bb| dot(&r::gelu_bias(&x, bb, d), &g),
        &b,
        &v(&db.unwrap()),
        1e-7,
    );
    // f32 within f32 rounding of the f64 result
    let y32 = gelu_bias(&f32t(&x, &[rows, d]), Some(&f32t(&b, &[d]))).unwrap();
    assert!(rel(&v32(&y32), &v(&y)) < 1e-6);
}

#[test]
fn grouped_attention_with_bias_matches_reference_and_gradients() {
    // two groups of different lengths (like global and local crops) in one packed matrix
    let (heads, dh, prefix) = (2, 8, 2);
    let d = heads * dh;
    let groups_def = [(2usize, 2usize, 3usize), (3, 2, 2)]; // (batch, grid h, grid w)
    let ropes: Vec<_> = groups_def
        .iter()
        .map(|&(_, gh, gw)| rope_tables(gh, gw, dh, 100.0, 1.0, DType::F64).unwrap())
        .collect();
    let mut groups = vec![];
    let mut row0 = 0;
    for (&(b, gh, gw), rope) in groups_def.iter().zip(&ropes) {
        let shape = SeqShape {
            batch: b,
            tokens: prefix + gh * gw,
            prefix,
            heads,
        };
        groups.push(AttnGroup {
            row0,
            shape,
            rope: Some(rope),
        });
        row0 += b * shape.tokens;
    }
    let rows = row0;
    let qkv = rv(rows * 3 * d, 53);
    let bias = rv(3 * d, 54);
    let reference = |q: &[f64], bb: &[f64]| -> Vec<f64> {
        let q = r::add_row_bias(q, bb);
        let mut out = vec![];
        for (g, rope) in groups.iter().zip(&ropes) {
            let s = g.shape;
            let part = &q[g.row0 * 3 * d..(g.row0 + s.batch * s.tokens) * 3 * d];
            let (sin, cos) = (v(&rope.sin), v(&rope.cos));
            out.extend(r::attention(
                part,
                s.batch,
                s.tokens,
                d,
                heads,
                prefix,
                Some(&sin),
                Some(&cos),
            ));
        }
        out
    };
    let bt = t(&bias, &[3 * d]);
    let (out, caches) = attention_groups(&t(&qkv, &[rows, 3 * d]), Some(&bt), &groups).unwrap();
    assert!(rel(&v(&out), &reference(&qkv, &bias)) < 1e-12);
    let inf = attention_groups_infer(&t(&qkv, &[rows, 3 * d]), Some(&bt), &groups).unwrap();
    assert!(rel(&v(&inf), &reference(&qkv, &bias)) < 1e-12);
    let g = rv(rows * d, 55);
    let dq = v(&attention_groups_bwd(&caches, &t(&g, &[rows, d])).unwrap());
    check_grad(
        "grouped attention dqkv",
        |x| dot(&reference(x, &bias), &g),
        &qkv,
        &dq,
        1e-6,
    );
    let db: Vec<f64> = (0..3 * d)
        .map(|c| dq.chunks(3 * d).map(|row| row[c]).sum())
        .collect();
    check_grad(
        "grouped attention dbias",
        |bb| dot(&reference(&qkv, bb), &g),
        &bias,
        &db,
        1e-6,
    );
}

#[test]
fn attention_f32_at_model_sizes_matches_f64() {
    // the shapes of the benchmarks (head dim 64; 21, 69 and 261 tokens) exercise the
    // vectorised f32 tiles, their edges and the wide tile
    for &(b, g, heads) in &[(3usize, 4usize, 2usize), (2, 8, 1), (1, 16, 1)] {
        let dh = 64;
        let (prefix, n) = (5, 5 + g * g);
        let d = heads * dh;
        let qkv = rv(b * n * 3 * d, 56);
        let rope64 = rope_tables(g, g, dh, 100.0, 1.0, DType::F64).unwrap();
        let rope32 = rope_tables(g, g, dh, 100.0, 1.0, DType::F32).unwrap();
        let s = SeqShape {
            batch: b,
            tokens: n,
            prefix,
            heads,
        };
        let (o64, c64) = attention(&t(&qkv, &[b * n, 3 * d]), s, Some(&rope64)).unwrap();
        let (o32, c32) = attention(&f32t(&qkv, &[b * n, 3 * d]), s, Some(&rope32)).unwrap();
        assert!(rel(&v32(&o32), &v(&o64)) < 1e-5, "forward n={n}");
        let gr = rv(b * n * d, 57);
        let d64 = attention_bwd(&c64, &t(&gr, &[b * n, d])).unwrap();
        let d32 = attention_bwd(&c32, &f32t(&gr, &[b * n, d])).unwrap();
        assert!(rel(&v32(&d32), &v(&d64)) < 1e-5, "backward n={n}");
    }
}

#[test]
fn f32_losses_match_f64() {
    let (n, k) = (37, 300);
    let l: Vec<f64> = rv(n * k, 58).iter().map(|v| v * 0.3).collect();
    let q64 = sinkhorn_knopp(&t(&l, &[n, k]), 0.07, 3).unwrap();
    let q32 = sinkhorn_knopp(&f32t(&l, &[n, k]), 0.07, 3).unwrap();
    assert!(rel(&v32(&q32), &v(&q64)) < 1e-5);
    assert!(rel(&v(&q64), &r::sinkhorn_knopp(&l, n, k, 0.07, 3)) < 1e-12);
    let s = rv(n * k, 59);
    let pairs: Vec<Vec<(usize, f64)>> = (0..n)
        .map(|i| vec![(i, 0.5), ((i + 1) % n, 0.25)])
        .collect();
    let gs = vec![1.0; n];
    let (l64, g64) = soft_cross_entropy(&t(&s, &[n, k]), &q64, &pairs, 0.1, &gs).unwrap();
    let (l32, g32) = soft_cross_entropy(&f32t(&s, &[n, k]), &q32, &pairs, 0.1, &gs).unwrap();
    assert!(rel(&l32, &l64) < 1e-5);
    assert!(rel(&v32(&g32), &v(&g64)) < 1e-5);
}

#[test]
fn select_rows_add_into_is_the_adjoint_of_select_rows() {
    let (n, stride, offset, count, d) = (3, 5, 1, 2, 4);
    let acc0 = rv(n * stride * d, 60);
    let g = rv(n * count * d, 61);
    let acc = t(&acc0, &[n * stride, d]);
    select_rows_add_into(&acc, &t(&g, &[n * count, d]), n, stride, offset, count).unwrap();
    let expect = v(&select_rows_bwd_add(
        &t(&acc0, &[n * stride, d]),
        &t(&g, &[n * count, d]),
        n,
        stride,
        offset,
        count,
    )
    .unwrap());
    assert_eq!(v(&acc), expect);
}

#[test]
fn kernels_are_bit_identical_for_any_thread_count() {
    // fixed-size chunks and ordered reductions: 1, 2 and 3 threads give the same bits
    let (n, tokens, heads, dh) = (5, 21, 2, 64);
    let d = heads * dh;
    let rows = n * tokens;
    let run = || -> Vec<Vec<f64>> {
        let x = f32t(&rv(rows * d, 62), &[rows, d]);
        let w = f32t(&rv(d, 63), &[d]);
        let sel = sample_selection(n, tokens);
        let (h, cache) = layer_norm_sel(&x, Some(&sel), &w, &w, 1e-5).unwrap();
        let acc = f32t(&rv(rows * d, 64), &[rows, d]);
        let (dw, db) = layer_norm_sel_bwd_into(&x, Some(&sel), &w, &cache, &h, &acc).unwrap();
        let y = residual_add(&x, Some(&sel), &w, &h, Some(&w)).unwrap();
        let (dr, dg, dbias) = residual_add_bwd(&y, Some(&sel), &w, &h, Some(&w)).unwrap();
        let rope = rope_tables(4, 4, dh, 100.0, 1.0, DType::F32).unwrap();
        let qkv = f32t(&rv(rows * 3 * d, 65), &[rows, 3 * d]);
        let s = SeqShape {
            batch: n,
            tokens,
            prefix: 5,
            heads,
        };
        let (o, c) = attention(&qkv, s, Some(&rope)).unwrap();
        let dq = attention_bwd(&c, &o).unwrap();
        let q = sinkhorn_knopp(&f32t(&rv(40 * 500, 66), &[40, 500]), 0.07, 3).unwrap();
        let pairs: Vec<Vec<(usize, f64)>> = (0..40).map(|i| vec![(i, 1.0)]).collect();
        let (_, ce) = soft_cross_entropy(&q, &q, &pairs, 0.1, &[1.0; 40]).unwrap();
        [h, acc, dw, db, y, dr, dg, dbias.unwrap(), o, dq, q, ce]
            .iter()
            .map(v32)
            .collect()
    };
    let results: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&k| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(k)
                .build()
                .unwrap()
                .install(run)
        })
        .collect();
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "results depend on the thread count"
    );
}
