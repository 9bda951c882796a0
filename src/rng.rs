//! Counter-based random numbers (Philox4x32-10, Salmon et al. 2011), so that the CPU and the CUDA
//! backend draw the same noise for the same (seed, element index) without sharing any state.
//! Element `i` of a draw uses counter (i_lo, i_hi, 0, 0) and key (seed_lo, seed_hi); its first two
//! output words give a uniform (word 0) or, via Box–Muller, a normal (words 0 and 1). The CUDA
//! kernels in kernels/rng.cuh compute exactly the same formulas in f32.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Ten Philox rounds on one 128-bit counter.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox_lanes(counter.map(|w| [w]), key).map(|[w]| w)
}

/// Ten Philox rounds on N counters at once, word-major (`c[w][lane]`): N = 1 is
/// [`philox4x32`]; wider, each word's lanes are one vector for a caller compiled for wide vectors.
#[allow(clippy::needless_range_loop)] // one lane index across the four words: the loop that vectorizes
#[inline(always)]
fn philox_lanes<const N: usize>(mut c: [[u32; N]; 4], key: [u32; 2]) -> [[u32; N]; 4] {
    let mut k = key;
    for _ in 0..10 {
        let mut next = [[0u32; N]; 4];
        for l in 0..N {
            let p0 = (M0 as u64) * (c[0][l] as u64);
            let p1 = (M1 as u64) * (c[2][l] as u64);
            next[0][l] = ((p1 >> 32) as u32) ^ c[1][l] ^ k[0];
            next[1][l] = p1 as u32;
            next[2][l] = ((p0 >> 32) as u32) ^ c[3][l] ^ k[1];
            next[3][l] = p0 as u32;
        }
        c = next;
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

fn words(seed: u64, index: u64) -> [u32; 4] {
    philox4x32(
        [index as u32, (index >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// Uniform in (0, 1]: (w0 + 1) / 2³² rounded to f32 (never 0, so ln is finite).
pub fn uniform_open0(w: u32) -> f32 {
    ((w as f64 + 1.0) * (1.0 / 4294967296.0)) as f32
}

/// Uniform in [0, 1) with 24 random bits.
pub fn uniform(seed: u64, index: u64) -> f32 {
    (words(seed, index)[0] >> 8) as f32 * (1.0 / 16777216.0)
}

/// Standard normal: Box–Muller on words 0 and 1, computed in f32.
pub fn normal(seed: u64, index: u64) -> f32 {
    let w = words(seed, index);
    box_muller(w[0], w[1])
}

/// Box–Muller on two output words, in f32.
#[inline(always)]
fn box_muller(w0: u32, w1: u32) -> f32 {
    let u1 = uniform_open0(w0);
    let u2 = (w1 >> 8) as f32 * (1.0 / 16777216.0);
    (-2.0f32 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Fill `out[i] = normal(seed, offset + i)`.
pub fn fill_normal(out: &mut [f32], seed: u64, offset: u64) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = normal(seed, offset + i as u64);
    }
}

/// Counters drawn together by [`fill_normal_lanes`].
const LANES: usize = 16;

/// [`fill_normal`], the same bits, with the Philox rounds of 16 counters at a time
/// ([`philox_lanes`]), so that a caller compiled for wide vectors (the CPU backend's
/// `simd::vectorized`) runs them as vector multiplies; Box–Muller stays per element (the library's
/// `ln` and `cos`).
#[inline(always)]
pub fn fill_normal_lanes(out: &mut [f32], seed: u64, offset: u64) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut chunks = out.chunks_exact_mut(LANES);
    let mut base = offset;
    for chunk in &mut chunks {
        let index: [u64; LANES] = std::array::from_fn(|l| base.wrapping_add(l as u64));
        let counters = [
            index.map(|i| i as u32),
            index.map(|i| (i >> 32) as u32),
            [0; LANES],
            [0; LANES],
        ];
        let c = philox_lanes(counters, key);
        for (l, o) in chunk.iter_mut().enumerate() {
            *o = box_muller(c[0][l], c[1][l]);
        }
        base = base.wrapping_add(LANES as u64);
    }
    for (i, o) in chunks.into_remainder().iter_mut().enumerate() {
        *o = normal(seed, base.wrapping_add(i as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vector from the Random123 distribution (philox4x32_10, zero counter/key).
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        // All-ones counter and key.
        assert_eq!(
            philox4x32([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }

    /// The lane version gives `normal`'s bits, across chunk and remainder, at an offset whose
    /// low word wraps inside a chunk.
    #[test]
    fn lanes_are_the_scalar_draws() {
        for (seed, offset, n) in [(7u64, 0u64, 100usize), (u64::MAX, (1 << 32) - 5, 37), (3, 11, 16)] {
            let mut a = vec![f32::NAN; n];
            let mut b = vec![f32::NAN; n];
            fill_normal(&mut a, seed, offset);
            fill_normal_lanes(&mut b, seed, offset);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "seed {seed} offset {offset}");
        }
    }

    #[test]
    fn normal_moments() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(7, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert_ne!(normal(7, 0), normal(8, 0));
    }
}
