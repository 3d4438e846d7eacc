//! Named parameter storage. A module's parameters live in one ordered [`ParamSet`] whose
//! names are exactly the official PyTorch `state_dict` keys (a contract, tested against
//! the golden fixtures); gradients live in a [`Grads`] aligned with it. Initialisation
//! follows the official `init_weights` and draws from our own seeded ChaCha streams (one
//! stream per parameter name), so two runs with the same seed start bit-identical.

use candle_core::{bail, DType, Device, Result, Tensor};
use rand::{Rng, RngExt};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How a parameter is initialised (official `init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Truncated normal, std 0.02, cut at +-2 (absolute), as `nn.init.trunc_normal_`.
    TruncNormal,
    /// Normal with the given std (CLS and register tokens: 0.02).
    Normal(f64),
    /// Uniform in `[-b, b]` (patch embedding: `b = 1/sqrt(fan_in)`).
    Uniform(f64),
    /// A constant (LayerNorm 1/0, LayerScale, biases 0, mask token 0).
    Const(f64),
}

/// An ordered list of named tensors (one module's parameters).
#[derive(Clone, Debug, Default)]
pub struct ParamSet {
    names: Vec<String>,
    tensors: Vec<Tensor>,
}

impl ParamSet {
    /// Appends a parameter; returns its index.
    pub fn push(&mut self, name: impl Into<String>, t: Tensor) -> usize {
        self.names.push(name.into());
        self.tensors.push(t);
        self.tensors.len() - 1
    }
    /// The tensor at `i`.
    pub fn get(&self, i: usize) -> &Tensor {
        &self.tensors[i]
    }
    /// Replaces the tensor at `i` (same shape required).
    pub fn set(&mut self, i: usize, t: Tensor) -> Result<()> {
        if t.dims() != self.tensors[i].dims() {
            bail!(
                "parameter {}: shape {:?} vs {:?}",
                self.names[i],
                t.dims(),
                self.tensors[i].dims()
            )
        }
        self.tensors[i] = t;
        Ok(())
    }
    /// Parameter names in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
    /// Tensors in order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    /// Number of parameters tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// Index of a name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.elem_count()).sum()
    }
    /// A copy that shares no storage with `self`.
    pub fn deep_clone(&self) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.copy())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names: self.names.clone(),
            tensors,
        })
    }
    /// Every tensor on `dev` (new storage; a no-op copy-free clone when already there).
    pub fn to_device(&self, dev: &Device) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                if t.device().same_device(dev) {
                    Ok(t.clone())
                } else {
                    t.to_device(dev)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names: self.names.clone(),
            tensors,
        })
    }
    /// Every tensor in `dtype` for computing (shares storage where the type already
    /// matches; read-only use: the copies are not parameters).
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.to_dtype(dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names: self.names.clone(),
            tensors,
        })
    }
    /// Converts every tensor to `dtype` (new storage).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.to_dtype(dtype)?.copy())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names: self.names.clone(),
            tensors,
        })
    }
    /// Overwrites every tensor with the one of the same name from `lookup`, checking shapes.
    pub fn load_from(&mut self, mut lookup: impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
        for (n, t) in self.names.iter().zip(self.tensors.iter_mut()) {
            let Some(src) = lookup(n) else {
                bail!("missing parameter `{n}`")
            };
            if src.dims() != t.dims() {
                bail!(
                    "parameter `{n}`: shape {:?}, expected {:?}",
                    src.dims(),
                    t.dims()
                )
            }
            *t = src.to_dtype(t.dtype())?.contiguous()?.copy()?;
        }
        Ok(())
    }
}

/// Gradients aligned with a [`ParamSet`] (`None` = no gradient reached that parameter).
#[derive(Clone, Debug)]
pub struct Grads {
    /// One slot per parameter.
    pub tensors: Vec<Option<Tensor>>,
}

impl Grads {
    /// Empty slots for `n` parameters.
    pub fn new(n: usize) -> Self {
        Self {
            tensors: vec![None; n],
        }
    }
    /// Stores (or accumulates into) the gradient of parameter `i`.
    pub fn add(&mut self, i: usize, g: Tensor) -> Result<()> {
        self.tensors[i] = Some(match self.tensors[i].take() {
            None => g,
            Some(prev) => ops::nn::axpy(&prev, &g, 1.0)?,
        });
        Ok(())
    }
    /// The gradient of parameter `i`.
    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.tensors[i].as_ref()
    }
    /// Sum of squares of every gradient (f64 accumulation).
    pub fn sum_sq(&self) -> Result<f64> {
        let mut s = 0.0;
        // device gradients: summed on the device, one synchronisation for the module
        let mut dev: Option<Tensor> = None;
        for g in self.tensors.iter().flatten() {
            if g.device().is_cpu() {
                s += ops::nn::sum_sq(g)?;
            } else {
                let t = ops::portable::sum_sq_t(g)?.to_dtype(DType::F64)?;
                dev = Some(match dev {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
        }
        if let Some(d) = dev {
            s += d.to_scalar::<f64>()?;
        }
        Ok(s)
    }
    /// Multiplies every gradient by `c` in place.
    pub fn scale(&self, c: f64) -> Result<()> {
        for g in self.tensors.iter().flatten() {
            ops::optim::scale_inplace(g, c)?;
        }
        Ok(())
    }
}

/// A ChaCha8 stream derived from `(seed, label)`: independent streams per purpose, stable
/// across versions of our code as long as labels stay the same.
pub fn stream(seed: u64, label: &str) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    // FNV-1a of the label spread over the rest of the key.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in label.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    key[8..16].copy_from_slice(&h.to_le_bytes());
    key[16..24].copy_from_slice(
        &h.rotate_left(29)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .to_le_bytes(),
    );
    key[24..32].copy_from_slice(&(label.len() as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A standard normal draw (Box-Muller on two uniforms in (0, 1]).
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Creates a tensor of `shape` initialised by `init` from the stream `(seed, name)`.
pub fn init_tensor(
    seed: u64,
    name: &str,
    shape: &[usize],
    init: Init,
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = stream(seed, name);
    let trunc = |rng: &mut ChaCha8Rng| loop {
        let z = 0.02 * normal(rng);
        if (-2.0..=2.0).contains(&z) {
            break z;
        }
    };
    let v: Vec<f64> = match init {
        Init::Const(c) => vec![c; n],
        Init::Normal(std) => {
            draw_in_chunks(&rng, n, NORMAL_WORDS, |r| Some(std * normal(r))).unwrap_or_default()
        }
        Init::Uniform(b) => (0..n).map(|_| rng.random_range(-b..b)).collect(),
        // a draw past the cut (never, in practice: a Box-Muller normal stays within 8.6
        // standard deviations, the cut is at 100) takes more of the stream: then the
        // chunks' positions are wrong, and the tensor is drawn again in one piece
        Init::TruncNormal => draw_in_chunks(&rng, n, NORMAL_WORDS, |r| {
            let z = 0.02 * normal(r);
            (-2.0..=2.0).contains(&z).then_some(z)
        })
        .unwrap_or_else(|| (0..n).map(|_| trunc(&mut rng)).collect()),
    };
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Stream words (u32) one [`normal`] draw takes: two f64 uniforms of one u64 each.
const NORMAL_WORDS: u128 = 4;
/// Elements per chunk of a parallel draw.
const DRAW_CHUNK: usize = 1 << 16;

/// `n` draws of `f` from the stream `rng`, each taking exactly `words` words of it, in
/// chunks on rayon's threads: chunk `c` starts at word `c * DRAW_CHUNK * words`, so the
/// values are those of drawing one after the other (a vit_base with its heads is 132 M
/// draws). `None` when `f` says a draw did not take exactly `words` (it returns `None`).
fn draw_in_chunks(
    rng: &ChaCha8Rng,
    n: usize,
    words: u128,
    f: impl Fn(&mut ChaCha8Rng) -> Option<f64> + Sync,
) -> Option<Vec<f64>> {
    use rayon::prelude::*;
    let base = rng.get_word_pos();
    let mut v = vec![0.0; n];
    let whole = v.par_chunks_mut(DRAW_CHUNK).enumerate().all(|(c, out)| {
        let mut r = rng.clone();
        r.set_word_pos(base + (c * DRAW_CHUNK) as u128 * words);
        out.iter_mut().all(|x| f(&mut r).map(|y| *x = y).is_some())
    });
    whole.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel draw gives every element the value of drawing one after the other
    /// from the tensor's stream, across chunk boundaries, for each kind of draw; a draw
    /// that takes more of the stream than assumed sends the caller back to one piece.
    #[test]
    fn a_drawn_tensor_is_the_sequential_draw_of_its_stream() {
        let shape = [3, DRAW_CHUNK / 2 + 5]; // 1.5 chunks and a ragged end
        let n = shape[0] * shape[1];
        for (init, name) in [
            (Init::Normal(0.7), "blocks.0.ls1.gamma"),
            (Init::TruncNormal, "blocks.3.attn.qkv.weight"),
            (Init::Uniform(0.25), "patch_embed.proj.weight"),
        ] {
            let got: Vec<f64> = init_tensor(9, name, &shape, init, DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut rng = stream(9, name);
            let want: Vec<f64> = (0..n)
                .map(|_| match init {
                    Init::Normal(s) => s * normal(&mut rng),
                    Init::TruncNormal => loop {
                        let z = 0.02 * normal(&mut rng);
                        if (-2.0..=2.0).contains(&z) {
                            break z;
                        }
                    },
                    Init::Uniform(b) => rng.random_range(-b..b),
                    Init::Const(c) => c,
                })
                .collect();
            assert_eq!(got, want, "{name}");
        }
        let rng = stream(1, "x");
        let mut calls = std::sync::atomic::AtomicUsize::new(0);
        let refused = draw_in_chunks(&rng, 3 * DRAW_CHUNK, NORMAL_WORDS, |r| {
            let k = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (k != 5).then(|| normal(r))
        });
        assert!(refused.is_none());
        assert!(*calls.get_mut() > 5);
    }
}
