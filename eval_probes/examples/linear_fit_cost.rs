//! What the CLS linear probe's fit costs at a size the probe sets cannot reach on this
//! machine: ImageNet's 1000 classes. Fits `fit_softmax` (L-BFGS, as the live probes do)
//! to N clustered Gaussian rows of width D in C classes, each row its class centre plus
//! noise; prints the wall time and the fit report (iterations, evaluations).
//!
//! `cargo run --release -p eval_probes --example linear_fit_cost -- N D C MAX_ITERS [NOISE]`
//! (`vitb16-gpu.toml`: 10000 768 1000 100). More noise: more iterations, up to MAX_ITERS.
use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .take(4)
        .map(|a| a.parse().expect("N D C MAX_ITERS are counts"))
        .collect();
    assert_eq!(
        args.len(),
        4,
        "usage: linear_fit_cost N D C MAX_ITERS [NOISE]"
    );
    let (n, d, c, iters) = (args[0], args[1], args[2], args[3]);
    let noise = std::env::args()
        .nth(5)
        .map_or(2.0, |v| v.parse::<f32>().expect("NOISE is a number"));
    let mut s = 12345u64;
    let mut r = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let centres: Vec<f32> = (0..c * d).map(|_| r()).collect();
    let y: Vec<u32> = (0..n).map(|i| (i % c) as u32).collect();
    let x: Vec<f32> = (0..n * d)
        .map(|k| centres[(y[k / d] as usize) * d + k % d] + noise * r())
        .collect();
    let t = Instant::now();
    let (_, rep) = eval_probes::fit_softmax(
        &x,
        d,
        eval_probes::Targets::Hard(&y),
        c,
        &eval_probes::FitConfig {
            l2: 1e-3,
            max_iters: iters,
        },
    )
    .unwrap();
    println!(
        "{n} rows x {d} in {c} classes, noise {noise}: {:.1} s on {} threads, {rep:?}",
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
}
