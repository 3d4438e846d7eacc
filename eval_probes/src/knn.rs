//! Weighted k-NN on L2-normalised features, as DINO's `eval_knn.py` / dinov3's `knn.py`:
//! cosine similarity to every training feature, the top k neighbours vote for their class
//! with weight `exp(sim / T)`, the class with the largest total wins.

use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};
use crate::linalg::{l2_rows, Mat};

/// Result of one k-NN evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnnResult {
    /// Neighbours used.
    pub k: usize,
    /// Vote temperature.
    pub temperature: f64,
    /// Fraction of test items whose top-voted class is right.
    pub top1: f64,
    /// Fraction whose class is among the five best-voted (1.0 with five classes or fewer).
    pub top5: f64,
    /// Training items (the neighbour bank).
    pub n_train: usize,
    /// Test items scored.
    pub n_test: usize,
}

/// Test rows scored per similarity block (bounds memory to `BLOCK * n_train` floats).
const BLOCK: usize = 256;

/// Weighted k-NN: `train [n_train, dim]` with `train_labels`, scored on `test [n_test, dim]`.
/// Features need not be normalised (they are normalised here). Ties in similarity are
/// broken by training index and ties in votes by class index, so the result is exact.
#[allow(clippy::too_many_arguments)]
pub fn knn(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    n_classes: usize,
    k: usize,
    temperature: f64,
) -> Result<KnnResult> {
    let n_train = train_labels.len();
    let n_test = test_labels.len();
    if train.len() != n_train * dim || test.len() != n_test * dim {
        return Err(ProbeError::shape(
            "k-NN features",
            format!(
                "{} train / {} test values for {n_train} / {n_test} rows of width {dim}",
                train.len(),
                test.len()
            ),
        ));
    }
    if let Some(c) = train_labels
        .iter()
        .chain(test_labels)
        .find(|&&c| c as usize >= n_classes)
    {
        return Err(ProbeError::shape(
            "k-NN labels",
            format!("label {c} is not below {n_classes}"),
        ));
    }
    if dim == 0 || k == 0 || temperature.is_nan() || temperature <= 0.0 || n_train == 0 {
        return Err(ProbeError::Config(vec![format!("k-NN needs width > 0, k > 0, temperature > 0 and a non-empty bank (width {dim}, k {k}, T {temperature}, {n_train} items)")]));
    }
    let k = k.min(n_train);
    let bank = Mat::new(l2_rows(train, dim), n_train, dim)?;
    let queries = l2_rows(test, dim);
    let (mut hit1, mut hit5) = (0usize, 0usize);
    for (b, block) in queries.chunks(BLOCK * dim.max(1)).enumerate() {
        let rows = block.len() / dim.max(1);
        let q = Mat::new(block.to_vec(), rows, dim)?;
        let sims = q.mul_t(&bank, None)?;
        for r in 0..rows {
            let votes = vote(
                &sims[r * n_train..(r + 1) * n_train],
                train_labels,
                n_classes,
                k,
                temperature,
            );
            let truth = test_labels[b * BLOCK + r] as usize;
            let rank = ranking(&votes);
            if rank[0] == truth {
                hit1 += 1;
            }
            if rank.iter().take(5).any(|&c| c == truth) {
                hit5 += 1;
            }
        }
    }
    let frac = |h: usize| {
        if n_test == 0 {
            0.0
        } else {
            h as f64 / n_test as f64
        }
    };
    Ok(KnnResult {
        k,
        temperature,
        top1: frac(hit1),
        top5: frac(hit5),
        n_train,
        n_test,
    })
}

/// Class votes of one query: the `k` most similar bank items each add `exp(sim / T)`.
fn vote(sims: &[f32], labels: &[u32], n_classes: usize, k: usize, t: f64) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..sims.len()).collect();
    let cmp = |a: &usize, b: &usize| sims[*b].total_cmp(&sims[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    let mut votes = vec![0.0; n_classes];
    for i in idx {
        votes[labels[i] as usize] += (f64::from(sims[i]) / t).exp();
    }
    votes
}

/// Classes by decreasing vote, ties to the lower class index.
fn ranking(votes: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..votes.len()).collect();
    order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
    order
}
