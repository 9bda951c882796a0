//! Wider vectors for the CPU backend's own loops.
//!
//! The crate builds for the baseline x86-64 target (SSE2), so that one binary runs on every x86-64
//! CPU; the GEMM kernels pick AVX2/AVX-512 at run time, but the backend's elementwise loops,
//! GroupNorm and reductions would stay at 4-wide SSE2 without help. [`vectorized`] runs a closure
//! compiled for AVX-512F (16 f32 lanes) or AVX2 (8 lanes), whichever this CPU has: the closure is
//! inlined into a function that carries `#[target_feature(enable = …)]`, so LLVM vectorizes its
//! loops at that width. `SRSDE_CPU_SIMD=avx2` or `=baseline` caps the level (tests, A/B runs).
//!
//! LLVM never contracts `a * b + c` into a fused multiply-add (no fast-math), so every level rounds
//! every operation the same way and gives bitwise equal results. Where a loop wants the fused
//! operation (the exp polynomial, GroupNorm's affine maps) it says so with `mul_add`: one FMA
//! instruction at both vector levels (both enable FMA; the AVX2 level needs a CPU with it), a
//! correctly rounded library call at baseline, the same bits either way.
//! The loops themselves are written to vectorize: fixed-width lane arrays for reductions
//! (`[f64; LANES]`: a fixed summation order, independent of the vector width and of the thread
//! count) and branch-free arithmetic such as [`exp_f32`].

/// Lanes of the reductions' accumulator arrays (two AVX2 registers of f64).
pub(crate) const LANES: usize = 8;

/// Runs `f` compiled for AVX-512F or AVX2 when this CPU has it, else as built (baseline). Pass the closure
/// as `vectorized(#[inline(always)] || …)`: LLVM inlines it into the AVX2 function only when told
/// to, and a closure it does not inline runs at baseline width.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            Level::Avx512 => {
                // SAFETY: the CPU supports AVX-512F and FMA (checked by simd_level).
                return unsafe { run_avx512(f) };
            }
            Level::Avx2 => {
                // SAFETY: the CPU supports AVX2 and FMA (checked by simd_level).
                return unsafe { run_avx2(f) };
            }
            Level::Baseline => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The widest vectors this CPU has, capped by `SRSDE_CPU_SIMD` (`avx2` or `baseline`).
#[cfg(target_arch = "x86_64")]
fn simd_level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("SRSDE_CPU_SIMD").unwrap_or_default();
        if cap != "baseline"
            && cap != "avx2"
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("fma")
        {
            Level::Avx512
        } else if cap != "baseline" && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Level::Avx2
        } else {
            Level::Baseline
        }
    })
}

/// Which instruction set the backend's own loops run with ("avx512", "avx2" or "baseline"; for
/// reports).
pub fn level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            Level::Avx512 => return "avx512",
            Level::Avx2 => return "avx2",
            Level::Baseline => {}
        }
    }
    "baseline"
}

/// e^x for f32, branch-free so that loops over it vectorize: x = n·ln2 + r with n = round(x·log₂e)
/// and |r| ≤ ln2/2, e^r by Cephes' degree-6 polynomial (`expf`), 2ⁿ put into the exponent bits.
/// Relative error ≤ 2 ulp over the clamped range [−87, 88]; inputs beyond it give e^−87 or e^88
/// (the logistic function needs no more), NaN stays NaN. Fused multiply-adds throughout: one
/// instruction each inside [`vectorized`] (which enables FMA), a correctly rounded library call
/// outside it, so every route gives the same bits.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer (to nearest even) and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = p.mul_add(r * r, r) + 1.0;
    er * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Σ f(xᵢ) in f64 over [`LANES`] accumulators (vectorizes; fixed order).
#[inline(always)]
pub(crate) fn sum_f64<T: Copy>(xs: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut total = fold_lanes(&acc);
    for &v in rest {
        total += f(v);
    }
    total
}

/// Σ (aᵢ·bᵢ) (the product in T, rounded once, summed in f64) over [`LANES`] accumulators.
#[inline(always)]
pub(crate) fn dot_f64<T: super::float::CpuFloat>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let whole = n - n % LANES;
    for (ca, cb) in a[..whole].chunks_exact(LANES).zip(b[..whole].chunks_exact(LANES)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += (x * y).to_f64();
        }
    }
    let mut total = fold_lanes(&acc);
    for (&x, &y) in a[whole..].iter().zip(&b[whole..]) {
        total += (x * y).to_f64();
    }
    total
}

/// Elements per block of [`block_sum`].
const BLOCK: usize = 1024;

/// Σ f(xᵢ): within each block of BLOCK elements over 16 lanes in T, the blocks' sums in f64, in a
/// fixed order (the same at every vector width). Twice the vector width of [`sum_f64`] and no
/// conversions in the inner loop; the f32 partial sums cover at most 64 elements a lane.
#[inline(always)]
pub(crate) fn block_sum<T: super::float::CpuFloat>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks(BLOCK) {
        let mut acc = [T::ZERO; 16];
        let chunks = block.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        let mut sum = acc.iter().fold(0.0f64, |s, &a| s + a.to_f64());
        for &v in rest {
            sum += f(v).to_f64();
        }
        total += sum;
    }
    total
}

/// The lanes of an accumulator added up in a fixed order.
#[inline(always)]
pub(crate) fn fold_lanes(acc: &[f64; LANES]) -> f64 {
    let half: [f64; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    (half[0] + half[2]) + (half[1] + half[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        // 2 ulp of f32 ≈ 2.4e-7.
        assert!(worst < 2.4e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 1e-37);
        assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
    }

    #[test]
    fn the_vectorized_path_gives_the_baseline_bits() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        // The exp polynomial's FMAs and an explicit one: a single instruction when vectorized, the
        // library's correctly rounded fmaf at baseline.
        let work = || -> (Vec<f32>, f64, f64) {
            let ys = xs
                .iter()
                .map(|&v| v.mul_add(1.37, -0.25) / (1.0 + exp_f32(-v)))
                .collect();
            (
                ys,
                sum_f64(&xs, |v| v as f64 * v as f64),
                block_sum(&xs, |v| v * v),
            )
        };
        assert_eq!(vectorized(work), work());
    }

    #[test]
    fn sums_match_a_plain_sum() {
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let plain: f64 = xs.iter().map(|&v| v as f64).sum();
        assert!((sum_f64(&xs, |v| v as f64) - plain).abs() < 1e-12);
    }
}
