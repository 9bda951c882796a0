//! The element types the CPU backend computes in.
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A float the CPU backend can run on: f32 (production) or f64 (gradient checks). Sealed, because
/// the `gemm` crate only dispatches real kernels for these two.
pub trait CpuFloat:
    sealed::Sealed
    + Copy
    + Default
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    /// "f32" or "f64".
    const NAME: &'static str;
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn from_usize(v: usize) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn max(self, other: Self) -> Self;
    /// self·a + b rounded once: an FMA instruction inside `simd::vectorized`, a correctly
    /// rounded library call outside it (the same bits).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// 1 / (1 + e^(−x)).
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
    /// e^x by a branch-free formula that vectorizes where one exists (f32: ≤ 2 ulp, inputs
    /// below −87 give e^−87), else the library's.
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

macro_rules! impl_cpu_float {
    ($t:ty, $name:expr, $sigmoid:expr, $exp_fast:expr) => {
        impl CpuFloat for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline(always)]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn sigmoid(self) -> Self {
                $sigmoid(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
        }
    };
}

// f32 (the production type) takes a branch-free exp that vectorizes (≤ 2 ulp); f64 (gradient
// checks) keeps the library's exp.
impl_cpu_float!(
    f32,
    "f32",
    |x: f32| 1.0 / (1.0 + super::simd::exp_f32(-x)),
    super::simd::exp_f32
);
impl_cpu_float!(f64, "f64", |x: f64| 1.0 / (1.0 + (-x).exp()), |x: f64| x.exp());
