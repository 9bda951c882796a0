//! Variance-preserving SDE (DDPM): dx = −½β(t)x dt + √β(t) dw, β(t) = β₀ + t(β₁ − β₀).
use super::{discrete_index, log_mean_coef, Discretized};

/// VP SDE. The paper uses β₀ = 0.1, β₁ = 20, N = 2000.
#[derive(Clone, Debug, PartialEq)]
pub struct VpSde {
    pub beta_min: f64,
    pub beta_max: f64,
    /// Number of discrete steps (`model.num_scales`).
    pub n: usize,
}

impl VpSde {
    /// β(t) = β₀ + t(β₁ − β₀).
    pub fn beta(&self, t: f64) -> f64 {
        self.beta_min + t * (self.beta_max - self.beta_min)
    }

    /// e^{m(t)}, m(t) = −¼t²(β₁−β₀) − ½tβ₀.
    pub fn marginal_mean_coef(&self, t: f64) -> f64 {
        log_mean_coef(self.beta_min, self.beta_max, t).exp()
    }

    /// √(1 − e^{2m(t)}).
    pub fn marginal_std(&self, t: f64) -> f64 {
        (1.0 - (2.0 * log_mean_coef(self.beta_min, self.beta_max, t)).exp()).sqrt()
    }

    /// −½β(t).
    pub fn drift_coef(&self, t: f64) -> f64 {
        -0.5 * self.beta(t)
    }

    /// √β(t).
    pub fn diffusion(&self, t: f64) -> f64 {
        self.beta(t).sqrt()
    }

    /// Discrete β_i = linspace(β₀/N, β₁/N, N)_i.
    pub fn discrete_beta(&self, i: usize) -> f64 {
        let n = self.n.max(2) as f64;
        let (lo, hi) = (self.beta_min / n, self.beta_max / n);
        lo + (hi - lo) * i as f64 / (n - 1.0)
    }

    /// α_i = 1 − β_i.
    pub fn alpha(&self, i: usize) -> f64 {
        1.0 - self.discrete_beta(i)
    }

    /// DDPM discretisation: f = (√α_i − 1)·x, G = √β_i at i = floor(t(N−1)) (float32 index).
    pub fn discretize(&self, t: f64) -> Discretized {
        let i = discrete_index(t, self.n);
        Discretized {
            f_coef: self.alpha(i).sqrt() - 1.0,
            g: self.discrete_beta(i).sqrt(),
        }
    }
}
