//! The floating-point element types the kernels run on (f32 for training, f64 for the
//! fixture tests), and the few transcendental functions the kernels need in a form the
//! compiler can vectorise.
//!
//! For f32 `exp` and `erf` are branch-free polynomial approximations (bit manipulation
//! plus Horner chains) so that loops calling them auto-vectorise; both are within a few
//! ulp of libm, which the tests check. For f64 they call libm: f64 exists to reproduce
//! the reference fixtures to 1e-6, not to be fast.

use candle_core::WithDType;

/// An element type every kernel supports.
pub trait Real:
    WithDType + num_traits::Float + std::iter::Sum + Default + Send + Sync + std::fmt::Debug
{
    /// `e^x`, vectorisable for f32.
    fn vexp(self) -> Self;
    /// The error function, vectorisable for f32.
    fn verf(self) -> Self;
    /// Conversion from an f64 constant.
    #[inline(always)]
    fn c(v: f64) -> Self {
        <Self as WithDType>::from_f64(v)
    }
    /// Conversion to f64.
    #[inline(always)]
    fn f(self) -> f64 {
        <Self as WithDType>::to_f64(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn vexp(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn verf(self) -> Self {
        libm::erf(self)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn vexp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn verf(self) -> Self {
        erf_f32(self)
    }
}

/// Cephes-style `expf`: range reduction by `ln 2`, a degree-6 polynomial and an exponent
/// built from integer bits. Relative error below 2 ulp on [-87, 88]; saturates outside.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.376_26);
    // round-half-even lowers to one vector instruction (`round` to ties-away does not and
    // becomes a scalar libm call that stops the loop from vectorising)
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r2 + r + 1.0;
    // 2^n through the exponent bits; n is an integer in [-126, 127] after the clamp, so
    // n + 127 + 2^23 holds n + 127 exactly in its low mantissa bits (a float-to-int cast
    // would saturate and not vectorise).
    let bits = (n + 8_388_735.0).to_bits() << 23;
    y * f32::from_bits(bits)
}

/// `erf` for f32 as a rational approximation on [-4, 4] (saturated outside, where
/// |erf| rounds to 1 in f32). Maximum absolute error about 1e-7.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_5e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}
