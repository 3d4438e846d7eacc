//! Bridges between candle tensors and the slice kernels: borrowing a contiguous CPU
//! tensor as `&[T]`, mutating one in place, and building tensors from vectors.

use candle_core::{
    bail, CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Result, Shape, Storage, Tensor,
};

use crate::real::Real;

/// Calls `f` with the elements of `t` as a contiguous slice (copying only if `t` is not
/// contiguous). Fails for tensors that are not on the CPU or not of element type `T`.
pub fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("with_slice: tensor is not contiguous after contiguous()")
    };
    match &*storage {
        Storage::Cpu(cpu) => {
            let s = T::cpu_storage_as_slice(cpu)?;
            Ok(f(&s[start..end]))
        }
        _ => bail!("with_slice: tensor is not on the CPU"),
    }
}

/// Copies the elements of `t` (any float dtype) to a host vector of `T`.
pub fn to_vec<T: Real>(t: &Tensor) -> Result<Vec<T>> {
    let t = t.to_dtype(T::DTYPE)?.flatten_all()?;
    t.to_vec1::<T>()
}

/// Builds a CPU tensor from a vector.
pub fn from_vec<T: Real>(v: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape.into(), &Device::Cpu)
}

/// Runs `f` on the elements of `dst` in place. `dst` must be contiguous and on the CPU.
pub fn inplace<T: Real>(dst: &Tensor, f: impl Fn(&mut [T])) -> Result<()> {
    dst.inplace_op1(&Wrap1::<T, _>(f, std::marker::PhantomData))
}

/// Runs `f(dst, src)` with `dst` mutable and `src` read-only (both contiguous, CPU, same dtype).
pub fn inplace2<T: Real>(dst: &Tensor, src: &Tensor, f: impl Fn(&mut [T], &[T])) -> Result<()> {
    let src = src.contiguous()?;
    dst.inplace_op2(&src, &Wrap2::<T, _>(f, std::marker::PhantomData))
}

struct Wrap1<T, F>(F, std::marker::PhantomData<T>);

fn slice_mut<'a, T: Real>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("in-place op on a non-contiguous tensor")
    };
    let any: &mut dyn std::any::Any = match s {
        CpuStorage::F32(v) => v,
        CpuStorage::F64(v) => v,
        _ => bail!("in-place op on an unsupported dtype"),
    };
    match any.downcast_mut::<Vec<T>>() {
        Some(v) => Ok(&mut v[start..end]),
        None => bail!("in-place op: dtype mismatch"),
    }
}

impl<T: Real, F: Fn(&mut [T])> InplaceOp1 for Wrap1<T, F> {
    fn name(&self) -> &'static str {
        "dinod-inplace"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let d = slice_mut::<T>(s, l)?;
        (self.0)(d);
        Ok(())
    }
}

struct Wrap2<T, F>(F, std::marker::PhantomData<T>);

impl<T: Real, F: Fn(&mut [T], &[T])> InplaceOp2 for Wrap2<T, F> {
    fn name(&self) -> &'static str {
        "dinod-inplace2"
    }
    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<()> {
        let Some((a, b)) = sl.contiguous_offsets() else {
            bail!("in-place op with a non-contiguous source")
        };
        let src = &T::cpu_storage_as_slice(s)?[a..b];
        let dst = slice_mut::<T>(d, dl)?;
        if dst.len() != src.len() {
            bail!(
                "in-place op: {} destination vs {} source elements",
                dst.len(),
                src.len()
            )
        }
        (self.0)(dst, src);
        Ok(())
    }
}

/// Checks that a tensor has a float dtype the kernels support.
pub fn check_float(t: &Tensor, what: &str) -> Result<DType> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(t.dtype()),
        d => bail!("{what}: unsupported dtype {d:?} (kernels run in f32 or f64)"),
    }
}

/// Dispatches a generic expression on a tensor dtype: `float_dispatch!(dtype, T => expr)`.
#[macro_export]
macro_rules! float_dispatch {
    ($dt:expr, $T:ident => $e:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                $e
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $e
            }
            d => candle_core::bail!("unsupported dtype {d:?} (kernels run in f32 or f64)"),
        }
    };
}

/// A read-locked, contiguous view of a CPU tensor's elements.
pub struct View<'a, T> {
    _guard: candle_core::StorageRef<'a>,
    ptr: *const T,
    len: usize,
}

// SAFETY: the view is a shared, read-locked borrow of immutable data; sharing it across
// threads is as safe as sharing `&[T]`.
unsafe impl<T: Sync> Sync for View<'_, T> {}

impl<T> std::ops::Deref for View<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr..ptr+len` lies inside the storage vector, which the read guard keeps
        // alive and unmodified for the lifetime of the view.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Borrows a contiguous CPU tensor as a slice. Errors on other devices, dtypes, or on
/// non-contiguous layouts (call `.contiguous()` first).
pub fn view<T: Real>(t: &Tensor) -> Result<View<'_, T>> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("view: tensor of shape {:?} is not contiguous", t.shape())
    };
    let ptr = match &*storage {
        Storage::Cpu(cpu) => {
            let s = T::cpu_storage_as_slice(cpu)?;
            s[start..end].as_ptr()
        }
        _ => bail!("view: tensor is not on the CPU"),
    };
    Ok(View {
        _guard: storage,
        ptr,
        len: end - start,
    })
}

/// A vector of `n` uninitialised elements, for a kernel that writes every element (see
/// [`assume_init_vec`]). Skips the zeroing pass of `vec![0; n]`: the allocator hands back
/// reused heap memory, so zeroing it would be a full extra memory pass per op.
pub(crate) fn uninit_vec<T>(n: usize) -> Vec<std::mem::MaybeUninit<T>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit<T>` needs no initialisation and the capacity is `n`.
    unsafe { v.set_len(n) };
    v
}

/// Converts a fully written [`uninit_vec`] into a `Vec<T>` without copying.
///
/// # Safety
/// Every element must have been initialised.
pub(crate) unsafe fn assume_init_vec<T>(v: Vec<std::mem::MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has the layout of `T`; the caller guarantees every element
    // is initialised; pointer, length and capacity come from a live vector we no longer use.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// Runs `a` and `b`, side by side when the compute pool has an idle thread (rayon's
/// `join`); for callers without their own rayon dependency.
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    rayon::join(a, b)
}
