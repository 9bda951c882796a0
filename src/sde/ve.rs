//! Variance-exploding SDE (SMLD / NCSN): dx = √(d[σ²(t)]/dt) dw with σ(t) = σ_min(σ_max/σ_min)^t.
use super::{discrete_index, Discretized};

/// VE SDE. The paper uses σ_min = 0.01, σ_max = 348, N = 2000.
#[derive(Clone, Debug, PartialEq)]
pub struct VeSde {
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// Number of discrete noise levels (`model.num_scales`).
    pub n: usize,
}

impl VeSde {
    /// σ(t) = σ_min·(σ_max/σ_min)^t — also the marginal std (the original does not subtract σ_min).
    pub fn sigma(&self, t: f64) -> f64 {
        self.sigma_min * (self.sigma_max / self.sigma_min).powf(t)
    }

    /// g(t) = σ(t)·√(2 ln(σ_max/σ_min)).
    pub fn diffusion(&self, t: f64) -> f64 {
        self.sigma(t) * (2.0 * (self.sigma_max.ln() - self.sigma_min.ln())).sqrt()
    }

    /// σ_i = exp(linspace(ln σ_min, ln σ_max, N))_i, ascending, i = 0..N−1.
    pub fn discrete_sigma(&self, i: usize) -> f64 {
        let (a, b) = (self.sigma_min.ln(), self.sigma_max.ln());
        let last = (self.n.max(2) - 1) as f64;
        (a + (b - a) * i as f64 / last).exp()
    }

    /// SMLD discretisation: f = 0, G = √(σ_i² − σ_{i−1}²) with i = floor(t(N−1)) (float32 index,
    /// see [`discrete_index`]) and σ_{−1} = 0.
    pub fn discretize(&self, t: f64) -> Discretized {
        let i = discrete_index(t, self.n);
        let sigma = self.discrete_sigma(i);
        let prev = if i == 0 { 0.0 } else { self.discrete_sigma(i - 1) };
        Discretized {
            f_coef: 0.0,
            g: (sigma * sigma - prev * prev).sqrt(),
        }
    }
}
