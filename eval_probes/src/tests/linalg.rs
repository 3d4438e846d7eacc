//! The symmetric eigensolver, the effective rank and the gemm-backed product against
//! naive references.

use super::util::Normal;
use crate::linalg::{effective_rank, symmetric_eigen, Mat};

fn random_symmetric(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Normal::new(seed);
    let b: Vec<f64> = (0..n * n).map(|_| f64::from(rng.next())).collect();
    let mut a = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            a[i * n + j] = b[i * n + j] + b[j * n + i];
        }
    }
    a
}

#[test]
fn eigen_reconstructs_a_random_symmetric_matrix() {
    for &n in &[1usize, 2, 7, 40] {
        let a = random_symmetric(n, n as u64);
        let (vals, vecs) = symmetric_eigen(&a, n).unwrap();
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "descending order");
        for i in 0..n {
            for j in 0..n {
                let rec: f64 = (0..n).map(|k| vals[k] * vecs[k][i] * vecs[k][j]).sum();
                assert!(
                    (rec - a[i * n + j]).abs() < 1e-9,
                    "n={n} ({i},{j}): {rec} vs {}",
                    a[i * n + j]
                );
                let dot: f64 = (0..n).map(|k| vecs[i][k] * vecs[j][k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-9, "orthonormal");
            }
        }
    }
}

#[test]
fn eigen_of_a_diagonal_matrix_is_its_sorted_diagonal_with_fixed_signs() {
    let a = vec![1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 3.0];
    let (vals, vecs) = symmetric_eigen(&a, 3).unwrap();
    assert_eq!(
        vals.iter().map(|v| v.round()).collect::<Vec<_>>(),
        vec![5.0, 3.0, 1.0]
    );
    assert_eq!(
        vecs[0].iter().map(|v| v.round()).collect::<Vec<_>>(),
        vec![0.0, 1.0, 0.0]
    );
    assert!(symmetric_eigen(&[f64::NAN], 1).is_err());
}

#[test]
fn effective_rank_is_one_for_a_line_and_n_for_a_flat_spectrum() {
    assert!((effective_rank(&[4.0, 0.0, 0.0]) - 1.0).abs() < 1e-12);
    assert!((effective_rank(&[2.0; 8]) - 8.0).abs() < 1e-9);
    let mid = effective_rank(&[4.0, 1.0, 0.25]);
    assert!(mid > 1.0 && mid < 3.0);
    assert_eq!(effective_rank(&[0.0, 0.0]), 0.0);
}

#[test]
fn matrix_product_matches_naive_loops() {
    let mut rng = Normal::new(3);
    let (m, n, k) = (37, 70, 19);
    let a = rng.vec(m * k);
    let b = rng.vec(n * k);
    let bias = rng.vec(n);
    let got = Mat::new(a.clone(), m, k)
        .unwrap()
        .mul_t(&Mat::new(b.clone(), n, k).unwrap(), Some(&bias))
        .unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum::<f32>() + bias[j];
            assert!((got[i * n + j] - want).abs() < 1e-4);
        }
    }
    assert!(Mat::new(a, m, k)
        .unwrap()
        .mul_t(&Mat::new(vec![0.0; 4], 2, 2).unwrap(), None)
        .is_err());
}
