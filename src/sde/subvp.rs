//! Sub-variance-preserving SDE (Song et al. 2021): dx = −½β(t)x dt + √(β(t)(1 − e^{−2∫β})) dw.
use super::{log_mean_coef, Discretized, VpSde};

/// subVP SDE. The paper uses β₀ = 0.1, β₁ = 20, N = 2000.
#[derive(Clone, Debug, PartialEq)]
pub struct SubVpSde {
    pub beta_min: f64,
    pub beta_max: f64,
    /// Number of steps of the Euler–Maruyama discretisation (`model.num_scales`).
    pub n: usize,
}

impl SubVpSde {
    /// The VP SDE with the same β range and N (shares β(t), the mean and, for Langevin, α_i).
    pub fn as_vp(&self) -> VpSde {
        VpSde {
            beta_min: self.beta_min,
            beta_max: self.beta_max,
            n: self.n,
        }
    }

    /// e^{m(t)}, as VP.
    pub fn marginal_mean_coef(&self, t: f64) -> f64 {
        log_mean_coef(self.beta_min, self.beta_max, t).exp()
    }

    /// 1 − e^{2m(t)} — without a square root, exactly as the original (its training used this value,
    /// so checkpoints depend on it).
    pub fn marginal_std(&self, t: f64) -> f64 {
        1.0 - (2.0 * log_mean_coef(self.beta_min, self.beta_max, t)).exp()
    }

    /// −½β(t), as VP.
    pub fn drift_coef(&self, t: f64) -> f64 {
        -0.5 * self.as_vp().beta(t)
    }

    /// √(β(t)·(1 − e^{−2β₀t − (β₁−β₀)t²})).
    pub fn diffusion(&self, t: f64) -> f64 {
        let discount = 1.0 - (-2.0 * self.beta_min * t - (self.beta_max - self.beta_min) * t * t).exp();
        (self.as_vp().beta(t) * discount).sqrt()
    }

    /// The generic Euler–Maruyama discretisation of the base `SDE` class: f = drift·(1/N),
    /// G = g·√(1/N).
    pub fn discretize(&self, t: f64) -> Discretized {
        let dt = 1.0 / self.n as f64;
        Discretized {
            f_coef: self.drift_coef(t) * dt,
            g: self.diffusion(t) * dt.sqrt(),
        }
    }
}
