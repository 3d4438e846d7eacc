//! Matrix products on row-major slices through the `gemm` crate (AVX-512 microkernels,
//! deterministic for any thread count). Transposes are expressed with strides, never copied.

use crate::real::Real;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Row-major `rows x cols` matrix.
    pub fn rm(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rm_t(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: 1, cs: cols }
    }
    /// A view with explicit strides.
    pub fn strided(data: &'a [T], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }
}

/// Whether a product of this size is worth splitting across threads.
fn parallelism(m: usize, n: usize, k: usize, allow: bool) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if allow && threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m x n] (row stride ldd) = (accumulate ? dst : 0) + scale * a[m x k] * b[k x n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    ldd: usize,
    accumulate: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    scale: T,
    allow_parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * ldd..i * ldd + n].iter_mut().for_each(|v| *v = T::zero());
            }
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * ldd + n, "gemm: destination too small");
    assert!(a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs, "gemm: lhs too small");
    assert!(b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs, "gemm: rhs too small");
    // SAFETY: the asserts above bound every index the product touches; gemm reads `a`
    // and `b` and writes only the `m x n` window of `dst` with the given strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism(m, n, k, allow_parallel),
        )
    }
}
