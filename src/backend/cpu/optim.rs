//! The optimiser arithmetic on host slices: torch's single-tensor Adam and the EMA of the weights
//! (see `crate::train::optim` for the schedule around them). These functions are the CPU twins of
//! kernels/optim.cu and the reference the CUDA kernels are checked against; the CPU backend's
//! `adam_update` / `ema_update` run them, in parallel over chunks (elementwise, so chunking does
//! not change a single bit).
use std::mem::MaybeUninit;

use super::CpuFloat;

/// Adam's per-update constants, computed in f64 exactly as torch's single-tensor Adam does and
/// rounded once to the element type. Shared by the host loop and the CUDA launcher so both round
/// the same way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdamConsts<T> {
    /// 1 − β1
    pub w1: T,
    /// β2
    pub b2: T,
    /// 1 − β2
    pub w2: T,
    pub eps: T,
    /// √(1 − β2^step)
    pub bc2_sqrt: T,
    /// lr / (1 − β1^step)
    pub step_size: T,
}

impl<T: CpuFloat> AdamConsts<T> {
    pub(crate) fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, step: u64) -> Self {
        let bc1 = 1.0 - beta1.powi(step as i32);
        AdamConsts {
            w1: T::from_f64(1.0 - beta1),
            b2: T::from_f64(beta2),
            w2: T::from_f64(1.0 - beta2),
            eps: T::from_f64(eps),
            bc2_sqrt: T::from_f64((1.0 - beta2.powi(step as i32)).sqrt()),
            step_size: T::from_f64(lr / bc1),
        }
    }
}

/// One Adam update of one tensor, in the order and precision of torch's single-tensor Adam:
/// g ← g·grad_scale; m ← m + (1−β1)(g − m); v ← β2·v + (1−β2)·g²;
/// p ← p − (lr / (1−β1^step)) · m / (√v / √(1−β2^step) + eps). `step` counts this update (≥ 1).
#[allow(clippy::too_many_arguments)]
pub fn adam_update<T: CpuFloat>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    grad_scale: T,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
) {
    let c = AdamConsts::<T>::new(lr, beta1, beta2, eps, step);
    adam_update_with(p, g, m, v, grad_scale, &c);
}

/// [`adam_update`] with its constants already rounded.
pub(crate) fn adam_update_with<T: CpuFloat>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    grad_scale: T,
    c: &AdamConsts<T>,
) {
    debug_assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    for i in 0..p.len() {
        (p[i], m[i], v[i]) = adam_element(p[i], g[i], m[i], v[i], grad_scale, c);
    }
}

/// Adam on one element: (p′, m′, v′). The one place the update's arithmetic is written, so the
/// in-place host loop and the backend's written-once loop round identically.
#[inline(always)]
fn adam_element<T: CpuFloat>(p: T, g: T, m: T, v: T, grad_scale: T, c: &AdamConsts<T>) -> (T, T, T) {
    let gi = g * grad_scale;
    let m = m + c.w1 * (gi - m);
    let v = v * c.b2 + c.w2 * gi * gi;
    let denom = v.sqrt() / c.bc2_sqrt + c.eps;
    (p - c.step_size * (m / denom), m, v)
}

/// [`adam_update_with`] into fresh outputs: (p2, m2, v2)[i] = the update of element i of (p, m, v),
/// every output element written once (all slices of one length).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn adam_update_into<T: CpuFloat>(
    (p, g, m, v): (&[T], &[T], &[T], &[T]),
    p2: &mut [MaybeUninit<T>],
    m2: &mut [MaybeUninit<T>],
    v2: &mut [MaybeUninit<T>],
    grad_scale: T,
    c: &AdamConsts<T>,
) {
    let n = p.len();
    let (g, m, v, p2, m2, v2) = (
        &g[..n],
        &m[..n],
        &v[..n],
        &mut p2[..n],
        &mut m2[..n],
        &mut v2[..n],
    );
    for i in 0..n {
        let (pi, mi, vi) = adam_element(p[i], g[i], m[i], v[i], grad_scale, c);
        p2[i].write(pi);
        m2[i].write(mi);
        v2[i].write(vi);
    }
}

/// Adam of one chunk in place, then the EMA of its shadow towards the updated parameter: the
/// element functions of [`adam_update_into`] and [`ema_update_into`] (`k` = 1 − decay, rounded),
/// so the same bits as the two passes, in one.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn adam_ema_update_in_place<T: CpuFloat>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    shadow: &mut [T],
    grad_scale: T,
    c: &AdamConsts<T>,
    k: T,
) {
    let n = p.len();
    let (g, m, v, shadow) = (&g[..n], &mut m[..n], &mut v[..n], &mut shadow[..n]);
    for i in 0..n {
        let (pi, mi, vi) = adam_element(p[i], g[i], m[i], v[i], grad_scale, c);
        (p[i], m[i], v[i]) = (pi, mi, vi);
        shadow[i] = ema_element(shadow[i], pi, k);
    }
}

/// One EMA update: s ← s − (1 − decay)·(s − p).
pub fn ema_update<T: CpuFloat>(shadow: &mut [T], p: &[T], decay: f64) {
    let k = T::from_f64(1.0 - decay);
    for (s, &p) in shadow.iter_mut().zip(p) {
        *s = ema_element(*s, p, k);
    }
}

/// [`ema_update`] into a fresh output: out[i] = the update of shadow element i (slices of one
/// length, every output element written once); `k` = 1 − decay, rounded.
#[inline(always)]
pub(crate) fn ema_update_into<T: CpuFloat>(shadow: &[T], p: &[T], out: &mut [MaybeUninit<T>], k: T) {
    for ((o, &s), &p) in out.iter_mut().zip(shadow).zip(p) {
        o.write(ema_element(s, p, k));
    }
}

/// One element of the EMA: s − k·(s − p) with k = 1 − decay.
#[inline(always)]
fn ema_element<T: CpuFloat>(s: T, p: T, k: T) -> T {
    s - k * (s - p)
}

/// Σx² of a slice, accumulated in f64 over fixed lanes (`simd::sum_f64`: vectorized, the same
/// order at every vector width): the per-tensor term of the global norm, here and in
/// `crate::train::optim::global_norm`.
pub fn squared_norm<T: CpuFloat>(x: &[T]) -> f64 {
    super::simd::vectorized(
        #[inline(always)]
        || super::simd::sum_f64(x, |v| v.to_f64() * v.to_f64()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;
    use crate::backend::{AdamStep, Backend};
    use crate::rng;

    fn draw(n: usize, s: f32, seed: u64) -> Vec<f32> {
        (0..n as u64).map(|i| s * rng::normal(seed, i)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The backend method (chunked over rayon) gives the host loop's exact bits, also across
    /// chunk boundaries (n > 4096) and with a clip scale and a late step.
    #[test]
    fn cpu_adam_update_is_the_host_loop_bitwise() {
        let be = CpuF32::new();
        for (n, step, scale) in [
            (5usize, 1u64, 1.0f64),
            (10_001, 3, 0.37),
            (4097, 2_400_000, 0.001),
        ] {
            let (p, g, m) = (draw(n, 0.1, 1), draw(n, 1.0, 2), draw(n, 0.05, 3));
            let v: Vec<f32> = draw(n, 0.01, 4).iter().map(|x| x.abs()).collect();
            let hp = AdamStep {
                lr: 2e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step,
                grad_scale: scale,
            };
            let t = |d: &[f32]| be.from_f32(&[n], d).unwrap();
            let (p2, m2, v2) = be.adam_update(&t(&p), &t(&g), &t(&m), &t(&v), &hp).unwrap();
            let (mut hp_, mut hm, mut hv) = (p.clone(), m.clone(), v.clone());
            adam_update(
                &mut hp_,
                &g,
                &mut hm,
                &mut hv,
                scale as f32,
                2e-4,
                0.9,
                0.999,
                1e-8,
                step,
            );
            assert_eq!(bits(&be.to_f32(&p2).unwrap()), bits(&hp_), "p n={n}");
            assert_eq!(bits(&be.to_f32(&m2).unwrap()), bits(&hm), "m n={n}");
            assert_eq!(bits(&be.to_f32(&v2).unwrap()), bits(&hv), "v n={n}");
            assert_ne!(hp_, p, "the update moved the weights");
        }
    }

    #[test]
    fn cpu_ema_update_and_norms_are_the_host_formulas_bitwise() {
        let be = CpuF32::new();
        let n = 9000;
        let (s, p) = (draw(n, 1.0, 5), draw(n, 1.0, 6));
        let out = be
            .ema_update(
                &be.from_f32(&[n], &s).unwrap(),
                &be.from_f32(&[n], &p).unwrap(),
                0.999,
            )
            .unwrap();
        let mut host = s.clone();
        ema_update(&mut host, &p, 0.999);
        assert_eq!(bits(&be.to_f32(&out).unwrap()), bits(&host));

        let xs: Vec<Vec<f32>> = [0usize, 1, 4097, 300]
            .iter()
            .map(|&k| draw(k, 0.5, k as u64))
            .collect();
        let ts: Vec<_> = xs.iter().map(|x| be.from_f32(&[x.len()], x).unwrap()).collect();
        let sums = be.squared_norms(&ts.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(sums.len(), 4);
        assert_eq!(sums[0], 0.0);
        let total = sums.iter().sum::<f64>().sqrt();
        let reference = crate::train::optim::global_norm(xs.iter().map(|x| x.as_slice()));
        assert_eq!(
            total.to_bits(),
            reference.to_bits(),
            "global norm from the per-tensor sums"
        );
    }

    #[test]
    fn bad_optimiser_inputs_are_errors() {
        let be = CpuF32::new();
        let a = be.zeros(&[3]).unwrap();
        let b = be.zeros(&[4]).unwrap();
        let hp = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
            grad_scale: 1.0,
        };
        assert!(be.adam_update(&a, &b, &a, &a, &hp).is_err(), "shape mismatch");
        assert!(
            be.adam_update(&a, &a, &a, &a, &AdamStep { step: 0, ..hp })
                .is_err(),
            "step 0"
        );
        assert!(
            be.adam_update(&a, &a, &a, &a, &AdamStep { beta2: 1.0, ..hp })
                .is_err(),
            "beta2 1"
        );
        assert!(be.ema_update(&a, &b, 0.9).is_err(), "shape mismatch");
        assert!(be.ema_update(&a, &a, 1.5).is_err(), "decay > 1");
        assert!(be.squared_norms(&[]).unwrap().is_empty());
    }
}
