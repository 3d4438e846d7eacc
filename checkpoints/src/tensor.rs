//! Named tensor blobs: the only tensor representation this crate knows. A blob is a dtype, a
//! shape and little-endian bytes, exactly what a safetensors file stores; converting to and from
//! model tensors is the caller's job. f32 and f64 blobs keep their bytes in a vector of their
//! elements (on a little-endian host, where the two are the same bytes), so a tensor read from
//! a file is handed over as a `Vec<f32>` without being copied again ([`TensorBlob::into_f32_vec`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element type of a tensor; mirrors `safetensors::Dtype` one to one.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dtype {
    /// Boolean, one byte.
    BOOL,
    /// 4-bit float (MX format).
    F4,
    /// 6-bit float, e2m3.
    F6_E2M3,
    /// 6-bit float, e3m2.
    F6_E3M2,
    /// Unsigned byte.
    U8,
    /// Signed byte.
    I8,
    /// 8-bit float, e5m2.
    F8_E5M2,
    /// 8-bit float, e4m3.
    F8_E4M3,
    /// 8-bit exponent-only scale.
    F8_E8M0,
    /// 8-bit float, e4m3 fnuz.
    F8_E4M3FNUZ,
    /// 8-bit float, e5m2 fnuz.
    F8_E5M2FNUZ,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single.
    F32,
    /// Complex of two f32.
    C64,
    /// IEEE double.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Bits per element.
    pub fn bitsize(self) -> usize {
        self.to_safetensors().bitsize()
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            Dtype::BOOL => S::BOOL,
            Dtype::F4 => S::F4,
            Dtype::F6_E2M3 => S::F6_E2M3,
            Dtype::F6_E3M2 => S::F6_E3M2,
            Dtype::U8 => S::U8,
            Dtype::I8 => S::I8,
            Dtype::F8_E5M2 => S::F8_E5M2,
            Dtype::F8_E4M3 => S::F8_E4M3,
            Dtype::F8_E8M0 => S::F8_E8M0,
            Dtype::F8_E4M3FNUZ => S::F8_E4M3FNUZ,
            Dtype::F8_E5M2FNUZ => S::F8_E5M2FNUZ,
            Dtype::I16 => S::I16,
            Dtype::U16 => S::U16,
            Dtype::F16 => S::F16,
            Dtype::BF16 => S::BF16,
            Dtype::I32 => S::I32,
            Dtype::U32 => S::U32,
            Dtype::F32 => S::F32,
            Dtype::C64 => S::C64,
            Dtype::F64 => S::F64,
            Dtype::I64 => S::I64,
            Dtype::U64 => S::U64,
        }
    }

    /// `None` for a dtype added to safetensors after this crate was written.
    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::BOOL => Dtype::BOOL,
            S::F4 => Dtype::F4,
            S::F6_E2M3 => Dtype::F6_E2M3,
            S::F6_E3M2 => Dtype::F6_E3M2,
            S::U8 => Dtype::U8,
            S::I8 => Dtype::I8,
            S::F8_E5M2 => Dtype::F8_E5M2,
            S::F8_E4M3 => Dtype::F8_E4M3,
            S::F8_E8M0 => Dtype::F8_E8M0,
            S::F8_E4M3FNUZ => Dtype::F8_E4M3FNUZ,
            S::F8_E5M2FNUZ => Dtype::F8_E5M2FNUZ,
            S::I16 => Dtype::I16,
            S::U16 => Dtype::U16,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::I32 => Dtype::I32,
            S::U32 => Dtype::U32,
            S::F32 => Dtype::F32,
            S::C64 => Dtype::C64,
            S::F64 => Dtype::F64,
            S::I64 => Dtype::I64,
            S::U64 => Dtype::U64,
            _ => return None,
        })
    }
}

/// Number of bytes a tensor of this dtype and shape occupies, or `None` on overflow or a
/// sub-byte dtype whose element count does not fill whole bytes.
pub(crate) fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bits = n.checked_mul(dtype.bitsize())?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// Whether a vector of f32 or f64 holds the little-endian bytes of its elements.
const TYPED: bool = cfg!(target_endian = "little");

/// A blob's little-endian bytes, kept in an allocation of its element type where that is
/// the same bytes: a checkpoint is read straight into the vectors that become the model's
/// tensors (at vit_base, converting 2.1 GB out of byte buffers was most of a resume).
#[derive(Clone)]
pub(crate) enum Data {
    Bytes(Vec<u8>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Data {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Data::Bytes(b) => b,
            Data::F32(v) => bytemuck::cast_slice(v),
            Data::F64(v) => bytemuck::cast_slice(v),
        }
    }

    /// `len` zeroed bytes for a tensor of `dtype`, to be filled through
    /// [`Data::bytes_mut`] (a file read straight into a float tensor's memory).
    pub(crate) fn zeroed(dtype: Option<Dtype>, len: usize) -> Data {
        match dtype {
            Some(Dtype::F32) if TYPED && len.is_multiple_of(4) => Data::F32(vec![0.0; len / 4]),
            Some(Dtype::F64) if TYPED && len.is_multiple_of(8) => Data::F64(vec![0.0; len / 8]),
            _ => Data::Bytes(vec![0; len]),
        }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Data::Bytes(b) => b,
            Data::F32(v) => bytemuck::cast_slice_mut(v),
            Data::F64(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// One named tensor: dtype, shape and its bytes in little-endian order.
#[derive(Clone)]
pub struct TensorBlob {
    /// Name inside its group, e.g. `blocks.0.attn.qkv.weight`.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The bytes; their length is checked against dtype and shape.
    pub(crate) data: Data,
}

/// Blobs are equal when their names, dtypes, shapes and bytes are (NaNs included, bit for bit).
impl PartialEq for TensorBlob {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.dtype == other.dtype
            && self.shape == other.shape
            && self.bytes() == other.bytes()
    }
}

impl Eq for TensorBlob {}

impl std::fmt::Debug for TensorBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorBlob")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes().len())
            .finish()
    }
}

/// Floats: kept as a vector of elements (one copy in, none out of an owned blob).
macro_rules! float_conversions {
    ($( $from:ident, $from_vec:ident, $to:ident, $into:ident, $t:ty, $dtype:expr, $variant:ident; )*) => {
        $(
            #[doc = concat!("A blob from a `", stringify!($t), "` slice (copied once); fails if the shape does not hold `data.len()` elements.")]
            pub fn $from(name: impl Into<String>, shape: &[usize], data: &[$t]) -> Result<Self> {
                Self::$from_vec(name, shape, data.to_vec())
            }

            #[doc = concat!("A blob that takes over a `Vec<", stringify!($t), ">`; fails if the shape does not hold `data.len()` elements.")]
            pub fn $from_vec(name: impl Into<String>, shape: &[usize], data: Vec<$t>) -> Result<Self> {
                let data = if TYPED {
                    Data::$variant(data)
                } else {
                    Data::Bytes(data.iter().flat_map(|x| x.to_le_bytes()).collect())
                };
                let blob = TensorBlob { name: name.into(), dtype: $dtype, shape: shape.to_vec(), data };
                blob.validate()?;
                Ok(blob)
            }

            #[doc = concat!("The elements as `", stringify!($t), "` (a copy); fails unless the dtype is ", stringify!($dtype), ".")]
            pub fn $to(&self) -> Result<Vec<$t>> {
                self.expect_dtype($dtype)?;
                Ok(match &self.data {
                    Data::$variant(v) => v.clone(),
                    d => decode_le(d.bytes(), <$t>::from_le_bytes),
                })
            }

            #[doc = concat!("The elements as `", stringify!($t), "`, without a copy for a blob read from a file or made from a vector; fails unless the dtype is ", stringify!($dtype), ".")]
            pub fn $into(self) -> Result<Vec<$t>> {
                self.expect_dtype($dtype)?;
                Ok(match self.data {
                    Data::$variant(v) => v,
                    d => decode_le(d.bytes(), <$t>::from_le_bytes),
                })
            }
        )*
    };
}

fn decode_le<T, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from_le(c.try_into().expect("chunks of N bytes")))
        .collect()
}

macro_rules! typed_conversions {
    ($( $from:ident, $to:ident, $t:ty, $dtype:expr; )*) => {
        $(
            #[doc = concat!("A blob from a `", stringify!($t), "` slice; fails if the shape does not hold `data.len()` elements.")]
            pub fn $from(name: impl Into<String>, shape: &[usize], data: &[$t]) -> Result<Self> {
                let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                Self::new(name, $dtype, shape.to_vec(), bytes)
            }

            #[doc = concat!("The elements as `", stringify!($t), "`; fails unless the dtype is ", stringify!($dtype), ".")]
            pub fn $to(&self) -> Result<Vec<$t>> {
                self.expect_dtype($dtype)?;
                Ok(decode_le(self.bytes(), <$t>::from_le_bytes))
            }
        )*
    };
}

impl TensorBlob {
    /// A blob from raw little-endian bytes; fails if `data` does not match dtype and shape.
    pub fn new(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Self> {
        let blob = TensorBlob {
            name: name.into(),
            dtype,
            shape,
            data: Data::Bytes(data),
        };
        blob.validate()?;
        Ok(blob)
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// Checks that the byte length matches dtype and shape.
    pub fn validate(&self) -> Result<()> {
        match byte_len(self.dtype, &self.shape) {
            Some(n) if n == self.bytes().len() => Ok(()),
            Some(n) => Err(Error::Tensor {
                name: self.name.clone(),
                reason: format!(
                    "{:?} {:?} needs {n} bytes, got {}",
                    self.dtype,
                    self.shape,
                    self.bytes().len()
                ),
            }),
            None => Err(Error::Tensor {
                name: self.name.clone(),
                reason: format!("{:?} {:?} has no whole byte size", self.dtype, self.shape),
            }),
        }
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn expect_dtype(&self, want: Dtype) -> Result<()> {
        if self.dtype == want {
            Ok(())
        } else {
            Err(Error::Tensor {
                name: self.name.clone(),
                reason: format!("dtype is {:?}, asked for {want:?}", self.dtype),
            })
        }
    }

    float_conversions! {
        from_f32, from_f32_vec, to_f32_vec, into_f32_vec, f32, Dtype::F32, F32;
        from_f64, from_f64_vec, to_f64_vec, into_f64_vec, f64, Dtype::F64, F64;
    }

    typed_conversions! {
        from_u8, to_u8_vec, u8, Dtype::U8;
        from_i64, to_i64_vec, i64, Dtype::I64;
        from_u64, to_u64_vec, u64, Dtype::U64;
        from_i32, to_i32_vec, i32, Dtype::I32;
        from_u32, to_u32_vec, u32, Dtype::U32;
    }
}

/// The tensors of one safetensors file, e.g. `teacher` → `teacher.safetensors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorGroup {
    /// Group name; becomes the file name, so `[A-Za-z0-9_-]`, not empty.
    pub name: String,
    /// The tensors; names unique within the group. A loaded group lists them in file order
    /// (safetensors' canonical order: by dtype, then name), not in the order they were saved;
    /// look them up by name with [`TensorGroup::get`].
    pub tensors: Vec<TensorBlob>,
}

impl TensorGroup {
    /// A group from its name and tensors.
    pub fn new(name: impl Into<String>, tensors: Vec<TensorBlob>) -> Self {
        TensorGroup {
            name: name.into(),
            tensors,
        }
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&TensorBlob> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Removes the tensor with this name and hands it over (to become a model's tensor
    /// without a copy).
    pub fn take(&mut self, name: &str) -> Option<TensorBlob> {
        let i = self.tensors.iter().position(|t| t.name == name)?;
        Some(self.tensors.swap_remove(i))
    }

    /// Total bytes of tensor data (excluding the safetensors header).
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes().len() as u64).sum()
    }

    /// File name of this group inside a checkpoint directory.
    pub fn file_name(&self) -> String {
        group_file_name(&self.name)
    }
}

pub(crate) fn group_file_name(group: &str) -> String {
    format!("{group}.safetensors")
}

/// Group names become file names: keep them boring.
pub(crate) fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
