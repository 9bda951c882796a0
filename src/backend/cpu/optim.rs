//! The optimiser arithmetic on host slices: torch's single-tensor Adam and the EMA of the weights
//! (see `crate::train::optim` for the schedule around them). These functions are the CPU twins of
//! kernels/optim.cu and the reference the CUDA kernels are checked against; the CPU backend's
//! `adam_update` / `ema_update` run them, in parallel over chunks (elementwise, so chunking does
//! not change a single bit).
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
        let gi = g[i] * grad_scale;
        m[i] += c.w1 * (gi - m[i]);
        v[i] = v[i] * c.b2 + c.w2 * gi * gi;
        let denom = v[i].sqrt() / c.bc2_sqrt + c.eps;
        p[i] -= c.step_size * (m[i] / denom);
    }
}

/// One EMA update: s ← s − (1 − decay)·(s − p).
pub fn ema_update<T: CpuFloat>(shadow: &mut [T], p: &[T], decay: f64) {
    let k = T::from_f64(1.0 - decay);
    for (s, &p) in shadow.iter_mut().zip(p) {
        *s -= k * (*s - p);
    }
}

/// Σx² of a slice, accumulated in f64 in index order (the per-tensor term of the global norm).
pub fn squared_norm<T: CpuFloat>(x: &[T]) -> f64 {
    x.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>()
}
