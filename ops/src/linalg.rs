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
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rm_t(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
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
    assert!(
        dst.len() >= (m - 1) * ldd + n,
        "gemm: destination too small"
    );
    // SAFETY: `dst` is a live, initialised slice covering the whole window.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            ldd,
            accumulate,
            a,
            b,
            scale,
            allow_parallel,
        )
    }
}

/// A new row-major `m x n` matrix `scale * a[m x k] * b[k x n]`, written by the product
/// itself without a zeroing pass first.
pub(crate) fn gemm_new<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    scale: T,
    allow_parallel: bool,
) -> Vec<T> {
    // gemm's kernel for tiny products (at most 16 x 16 outputs) stages the destination
    // through a buffer even when it does not use it, so those get initialised memory.
    if k == 0 || m * n <= 16 * 16 {
        let mut v = vec![T::zero(); m * n];
        gemm_into(m, n, k, &mut v, n, false, a, b, scale, allow_parallel);
        return v;
    }
    let mut v: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: with `accumulate = false` gemm writes every element of the `m x n` window
    // (row stride n) of the capacity without reading it, so all `m * n` elements are
    // initialised before `set_len`.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            v.as_mut_ptr(),
            n,
            false,
            a,
            b,
            scale,
            allow_parallel,
        );
        v.set_len(m * n);
    }
    v
}

/// [`gemm_into`] on a raw destination.
///
/// # Safety
/// `dst` must be valid for writes of the `m x n` window with row stride `ldd` (and for
/// reads of it, initialised, when `accumulate`), and not accessed by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
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
                for j in 0..n {
                    // SAFETY: inside the window, by the caller's contract.
                    unsafe { dst.add(i * ldd + j).write(T::zero()) };
                }
            }
        }
        return;
    }
    assert!(
        a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs,
        "gemm: lhs too small"
    );
    assert!(
        b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs,
        "gemm: rhs too small"
    );
    // SAFETY: the asserts bound every index of `a` and `b` the product reads; the caller
    // guarantees the destination window. gemm reads `dst` only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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
