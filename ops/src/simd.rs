//! Runtime selection of the widest vector instruction set for the hand-written kernels.
//!
//! The kernel bodies are plain generic Rust; `simd_kernel!` compiles each body three
//! times (AVX-512, AVX2+FMA, baseline) and picks one at run time, so one binary runs on
//! any x86-64 machine (the GPU hosts included) and still uses AVX-512 here.

use std::sync::OnceLock;

/// The instruction-set level the kernels were dispatched to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 F/BW/VL with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Whatever the compile target offers.
    Baseline,
}

/// The level used on this machine (detected once).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("DINOD_NO_SIMD").is_some() {
            return Level::Baseline;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                return Level::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Defines `pub(crate) fn $name<T: Real>(args) -> ret` that runs `$body` compiled for the
/// best available instruction set. The body must be `#[inline(always)]`-friendly code.
macro_rules! simd_kernel {
    ($(#[$m:meta])* fn $name:ident<$T:ident>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub(crate) fn $name<$T: $crate::real::Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<$T: $crate::real::Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn v4<$T: $crate::real::Real>($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3<$T: $crate::real::Real>($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match $crate::simd::level() {
                // SAFETY: the level was detected at run time, so the features are present.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Avx512 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Avx2 => unsafe { v3($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use simd_kernel;
