//! The three forward SDEs of score_sde / sr-sde (T = 1): variance exploding ([`VeSde`]), variance
//! preserving ([`VpSde`]) and sub-variance preserving ([`SubVpSde`]), gathered in [`Sde`].
//!
//! Every SDE here is linear in x: the marginal mean is `coef·x0`, the drift is `coef·x` and the
//! discretised update is `f = coef·x`, so all schedules are scalars of t, computed in f64. The
//! samplers (`crate::sample`) turn these scalars into backend ops.
//!
//! Two pieces of float32 torch arithmetic of the original are replicated because they decide which
//! discrete table entry is used: the sampling grid ([`timesteps`], torch's float32 `linspace`) and the
//! table index `(t·(N−1)).long()` computed on a float32 `t` ([`discrete_index`]).
pub mod subvp;
pub mod ve;
pub mod vp;

pub use subvp::SubVpSde;
pub use ve::VeSde;
pub use vp::VpSde;

use crate::error::{Error, Result};

/// One step of an SDE's own discretisation at time t: x_{i+1} = x_i + f + G·z with `f = f_coef·x`
/// (the `discretize` method of the original `SDE` classes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Discretized {
    pub f_coef: f64,
    pub g: f64,
}

/// One of the three SDEs. Methods take a scalar t ∈ [0, 1] shared by the batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Sde {
    Ve(VeSde),
    Vp(VpSde),
    SubVp(SubVpSde),
}

impl Sde {
    /// The paper's VE SDE: σ ∈ [0.01, 348], N = 2000 (sr_ve.py).
    pub fn paper_ve() -> Sde {
        Sde::Ve(VeSde {
            sigma_min: 0.01,
            sigma_max: 348.0,
            n: 2000,
        })
    }
    /// The paper's VP SDE: β ∈ [0.1, 20], N = 2000.
    pub fn paper_vp() -> Sde {
        Sde::Vp(VpSde {
            beta_min: 0.1,
            beta_max: 20.0,
            n: 2000,
        })
    }
    /// The paper's subVP SDE: β ∈ [0.1, 20], N = 2000.
    pub fn paper_subvp() -> Sde {
        Sde::SubVp(SubVpSde {
            beta_min: 0.1,
            beta_max: 20.0,
            n: 2000,
        })
    }

    /// Short name: "ve", "vp" or "subvp".
    pub fn name(&self) -> &'static str {
        match self {
            Sde::Ve(_) => "ve",
            Sde::Vp(_) => "vp",
            Sde::SubVp(_) => "subvp",
        }
    }

    /// Number of discretisation steps N (`model.num_scales`).
    pub fn n(&self) -> usize {
        match self {
            Sde::Ve(s) => s.n,
            Sde::Vp(s) => s.n,
            Sde::SubVp(s) => s.n,
        }
    }

    /// The same SDE with N = `n` steps; the discrete tables follow N, as when the original is run
    /// with a different `model.num_scales`.
    pub fn with_steps(&self, n: usize) -> Result<Sde> {
        let mut s = self.clone();
        match &mut s {
            Sde::Ve(v) => v.n = n,
            Sde::Vp(v) => v.n = n,
            Sde::SubVp(v) => v.n = n,
        }
        s.validate()?;
        Ok(s)
    }

    /// Check the parameters (positive, ordered, N ≥ 2).
    pub fn validate(&self) -> Result<()> {
        let (name, lo, hi, n) = match self {
            Sde::Ve(s) => ("sigma", s.sigma_min, s.sigma_max, s.n),
            Sde::Vp(s) => ("beta", s.beta_min, s.beta_max, s.n),
            Sde::SubVp(s) => ("beta", s.beta_min, s.beta_max, s.n),
        };
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > lo) {
            return Err(Error::Config(format!(
                "{} SDE needs 0 < {name}_min < {name}_max, got {lo} and {hi}",
                self.name()
            )));
        }
        if n < 2 {
            return Err(Error::Config(format!(
                "{} SDE needs N >= 2 steps, got {n}",
                self.name()
            )));
        }
        Ok(())
    }

    /// Marginal mean coefficient: E[x_t | x_0] = coef·x_0.
    pub fn marginal_mean_coef(&self, t: f64) -> f64 {
        match self {
            Sde::Ve(_) => 1.0,
            Sde::Vp(s) => s.marginal_mean_coef(t),
            Sde::SubVp(s) => s.marginal_mean_coef(t),
        }
    }

    /// Marginal standard deviation of x_t | x_0 as the original computes it (subVP: 1 − e^{2m}).
    pub fn marginal_std(&self, t: f64) -> f64 {
        match self {
            Sde::Ve(s) => s.sigma(t),
            Sde::Vp(s) => s.marginal_std(t),
            Sde::SubVp(s) => s.marginal_std(t),
        }
    }

    /// Drift coefficient: f(x, t) = coef·x.
    pub fn drift_coef(&self, t: f64) -> f64 {
        match self {
            Sde::Ve(_) => 0.0,
            Sde::Vp(s) => s.drift_coef(t),
            Sde::SubVp(s) => s.drift_coef(t),
        }
    }

    /// Diffusion coefficient g(t).
    pub fn diffusion(&self, t: f64) -> f64 {
        match self {
            Sde::Ve(s) => s.diffusion(t),
            Sde::Vp(s) => s.diffusion(t),
            Sde::SubVp(s) => s.diffusion(t),
        }
    }

    /// The SDE's discretisation at t (VE: SMLD, VP: DDPM, subVP: Euler–Maruyama with Δt = 1/N).
    pub fn discretize(&self, t: f64) -> Discretized {
        match self {
            Sde::Ve(s) => s.discretize(t),
            Sde::Vp(s) => s.discretize(t),
            Sde::SubVp(s) => s.discretize(t),
        }
    }

    /// Standard deviation of the prior N(0, std²·I) the sampler starts from.
    pub fn prior_std(&self) -> f64 {
        match self {
            Sde::Ve(s) => s.sigma_max,
            Sde::Vp(_) | Sde::SubVp(_) => 1.0,
        }
    }

    /// Smallest time of the sampling grid (`sampling.eps`): VE 1e-5, VP/subVP 1e-3.
    pub fn sampling_eps(&self) -> f64 {
        match self {
            Sde::Ve(_) => 1e-5,
            Sde::Vp(_) | Sde::SubVp(_) => 1e-3,
        }
    }

    /// The α of the Langevin corrector's step size: 1 for VE, the DDPM α_i = 1 − β_i at
    /// i = [`discrete_index`]`(t)` for VP. For subVP the original crashes (its class has no
    /// `alphas`); as an extension we use VP's α schedule with the same β range.
    pub fn langevin_alpha(&self, t: f64) -> f64 {
        match self {
            Sde::Ve(_) => 1.0,
            Sde::Vp(s) => s.alpha(discrete_index(t, s.n)),
            Sde::SubVp(s) => s.as_vp().alpha(discrete_index(t, s.n)),
        }
    }

    /// The sampling grid: torch.linspace(1, eps, N) in float32 (see [`torch_linspace_f32`]).
    pub fn timesteps(&self) -> Vec<f32> {
        timesteps(self.n(), self.sampling_eps())
    }
}

/// `(t * (N − 1) / T).long()` of the original, where `t` is a float32 tensor: the product is rounded
/// to float32 before truncation, so near an integer the index can differ by one from the exact
/// floor(t·(N−1)). `t` is first rounded to f32 (exact for times that came from [`timesteps`]).
/// The result is clamped to [0, N−1] (the original would index out of range for t outside [0, 1]).
pub fn discrete_index(t: f64, n: usize) -> usize {
    let prod = (t as f32) * ((n.max(1) - 1) as f32);
    // float → int casts truncate toward zero and saturate (negative and NaN give 0), like `.long()`
    // on the values that can occur here.
    (prod as usize).min(n.saturating_sub(1))
}

/// torch.linspace(start, end, n) in float32 as torch computes it (CPU scalar path and CUDA kernel):
/// step = (end − start)/(n − 1) in f32; element i = start + i·step for i < n/2 and
/// end − (n − 1 − i)·step otherwise, each product and sum rounded to f32. Both end points are
/// therefore exact. (torch's vectorised CPU path and an FMA-contracted CUDA build can differ by one
/// ulp on some elements; the original samples on a GPU.)
pub fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        start + step * i as f32
                    } else {
                        end - step * (n - 1 - i) as f32
                    }
                })
                .collect()
        }
    }
}

/// The sampling grid t_0 = 1 > … > t_{N−1} = eps: torch.linspace(1, eps, N) in float32.
pub fn timesteps(n: usize, eps: f64) -> Vec<f32> {
    torch_linspace_f32(1.0, eps as f32, n)
}

/// m(t) = −¼t²(β₁−β₀) − ½tβ₀, the log of the VP/subVP marginal mean coefficient.
pub(crate) fn log_mean_coef(beta_min: f64, beta_max: f64, t: f64) -> f64 {
    -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_end_points_are_exact() {
        // The second half counts back from `end`, so the last grid point is exactly eps in f32,
        // which start + (n−1)·step is not.
        let t = timesteps(2000, 1e-3);
        assert_eq!(t.len(), 2000);
        assert_eq!(t[0], 1.0);
        assert_eq!(t[1999], 1e-3f32);
        let step = (1e-3f32 - 1.0) / 1999.0;
        assert_ne!(1.0f32 + step * 1999.0, 1e-3f32);
        // Element 999 (first half) and 1000 (second half) by the two formulas.
        assert_eq!(t[999], 1.0 + step * 999.0);
        assert_eq!(t[1000], 1e-3f32 - step * 999.0);
        let ve = timesteps(2000, 1e-5);
        assert_eq!(ve[1999], 1e-5f32);
    }

    #[test]
    fn linspace_small_cases() {
        // Exactly representable steps: every point exact.
        assert_eq!(torch_linspace_f32(1.0, 0.0, 5), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(torch_linspace_f32(0.0, 1.0, 2), vec![0.0, 1.0]);
        assert_eq!(torch_linspace_f32(3.0, 1.0, 1), vec![3.0]);
        assert!(torch_linspace_f32(3.0, 1.0, 0).is_empty());
        // n = 3: the middle point (i = n/2 = 1) is already in the second half: end − 1·step.
        let step = (0.0f32 - 1.0) / 2.0f32;
        assert_eq!(torch_linspace_f32(1.0, 0.0, 3)[1], 0.0 - step);
        let v = torch_linspace_f32(1.0, 0.1, 4); // step = −0.3 (inexact in f32)
        let s = (0.1f32 - 1.0) / 3.0;
        assert_eq!(v, vec![1.0, 1.0 + s, 0.1 - s, 0.1]);
    }

    #[test]
    fn index_uses_float32_product() {
        // t = 0.5 → 999.5 → 999; the end points map to 0 and N−1.
        assert_eq!(discrete_index(0.5, 2000), 999);
        assert_eq!(discrete_index(1.0, 2000), 1999);
        assert_eq!(discrete_index(1e-5, 2000), 0);
        assert_eq!(discrete_index(2.0, 2000), 1999);
        assert_eq!(discrete_index(-1.0, 2000), 0);
        // A product that f32 rounds up across an integer: f32(0.7) = 0.699999988079071, so with
        // N = 11 the exact t·10 = 6.99999988… floors to 6, but the f32 product is 7.0 (the
        // neighbouring f32 values are 7 and 7 − 4.8e-7), so the original uses index 7.
        let t = 0.7f32 as f64;
        assert!((t * 10.0).floor() == 6.0);
        assert_eq!(discrete_index(t, 11), 7);
        // On the paper's VE grid this happens once: t_1 = 0.99949974 (f32), t_1·1999 = 1997.99998…
        // exactly, but 1998.0 in f32 — the original's reverse-diffusion step 1 uses σ_1998.
        let t1 = Sde::paper_ve().timesteps()[1] as f64;
        assert_eq!((t1 * 1999.0).floor(), 1997.0);
        assert_eq!(discrete_index(t1, 2000), 1998);
    }

    #[test]
    fn validate_rejects_bad_parameters() {
        assert!(Sde::paper_ve().validate().is_ok());
        assert!(Sde::paper_ve().with_steps(1).is_err());
        assert!(Sde::Vp(VpSde {
            beta_min: 1.0,
            beta_max: 0.5,
            n: 10
        })
        .validate()
        .is_err());
        assert!(Sde::Ve(VeSde {
            sigma_min: 0.0,
            sigma_max: 1.0,
            n: 10
        })
        .validate()
        .is_err());
        assert_eq!(Sde::paper_subvp().with_steps(100).unwrap().n(), 100);
    }
}
