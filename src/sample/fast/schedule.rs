//! Noise levels of the fast samplers: every SDE here has marginals x_t = α(t)·x₀ + σ(t)·ε, so
//! x̂ = x/α has the VE-type marginal x₀ + σ̂·ε with σ̂(t) = σ(t)/α(t) (Karras et al. 2022, §2 / Table 1).
//! The probability-flow ODE of every SDE is then the same ODE in (x̂, σ̂):
//!
//! dx̂/dσ̂ = (x̂ − D(x̂, σ̂)) / σ̂,   D = x̂ + σ̂²·α·s(α·x̂, t(σ̂))   (the Tweedie denoiser),
//!
//! which the solvers integrate on a grid of σ̂ values. This module maps t ↔ σ̂ for each SDE and
//! builds the grid.
use crate::error::{Error, Result};
use crate::sde::{log_mean_coef, Sde};

/// α(t) = E[x_t | x₀]/x₀: 1 for VE, e^{m(t)} for VP and subVP.
pub fn alpha(sde: &Sde, t: f64) -> f64 {
    match sde {
        Sde::Ve(_) => 1.0,
        Sde::Vp(s) => log_mean_coef(s.beta_min, s.beta_max, t).exp(),
        Sde::SubVp(s) => log_mean_coef(s.beta_min, s.beta_max, t).exp(),
    }
}

/// σ̂(t) = std(t)/α(t), the noise level of x̂ = x/α (computed without cancellation near t = 0):
/// VE σ(t); VP √(e^{−2m} − 1); subVP (1 − e^{2m})/e^{m} = 2·sinh(−m).
pub fn sigma_hat(sde: &Sde, t: f64) -> f64 {
    match sde {
        Sde::Ve(s) => s.sigma(t),
        Sde::Vp(s) => (-2.0 * log_mean_coef(s.beta_min, s.beta_max, t)).exp_m1().sqrt(),
        Sde::SubVp(s) => 2.0 * (-log_mean_coef(s.beta_min, s.beta_max, t)).sinh(),
    }
}

/// The time t with σ̂(t) = `sigma` (the inverse of [`sigma_hat`]; no clamping to [0, 1]).
pub fn time_of_sigma(sde: &Sde, sigma: f64) -> f64 {
    let (beta_min, beta_max, neg_m) = match sde {
        Sde::Ve(s) => return (sigma / s.sigma_min).ln() / (s.sigma_max / s.sigma_min).ln(),
        // σ̂² = e^{−2m} − 1.
        Sde::Vp(s) => (s.beta_min, s.beta_max, 0.5 * (sigma * sigma).ln_1p()),
        // σ̂ = 2 sinh(−m).
        Sde::SubVp(s) => (s.beta_min, s.beta_max, (0.5 * sigma).asinh()),
    };
    // −m(t) = a·t² + b·t with a = ¼(β₁ − β₀), b = ½β₀: the positive root, in the form that does not
    // cancel for small −m.
    let (a, b) = (0.25 * (beta_max - beta_min), 0.5 * beta_min);
    2.0 * neg_m / (b + (b * b + 4.0 * a * neg_m).sqrt())
}

/// The σ̂ grid of a fast sampler: `n` levels from σ̂(1) down to σ̂(eps) (`sampling_eps`), spaced as
/// Karras et al. (2022, eq. 5): σ̂_i = (σ̂_max^{1/ρ} + i/(n−1)·(σ̂_min^{1/ρ} − σ̂_max^{1/ρ}))^ρ.
/// ρ = ∞ spaces them uniformly in log σ̂ (for VE: uniformly in t); larger ρ puts more of them at
/// low noise. The final step to σ̂ = 0 (the denoiser) is not part of the grid.
pub fn sigma_grid(sde: &Sde, n: usize, rho: f64) -> Result<Vec<f64>> {
    if n < 1 {
        return Err(Error::Config(
            "a fast sampler needs at least one noise level".into(),
        ));
    }
    if rho.is_nan() || rho <= 0.0 {
        return Err(Error::Config(format!(
            "schedule rho must be positive (or inf), got {rho}"
        )));
    }
    let hi = sigma_hat(sde, 1.0);
    let lo = sigma_hat(sde, sde.sampling_eps());
    if n == 1 {
        return Ok(vec![hi]);
    }
    let last = (n - 1) as f64;
    Ok((0..n)
        .map(|i| {
            let f = i as f64 / last;
            if i == 0 {
                hi
            } else if i == n - 1 {
                lo
            } else if rho.is_infinite() {
                (hi.ln() + f * (lo.ln() - hi.ln())).exp()
            } else {
                let (a, b) = (hi.powf(1.0 / rho), lo.powf(1.0 / rho));
                (a + f * (b - a)).powf(rho)
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_hat_matches_the_marginals_and_inverts() {
        for sde in [Sde::paper_ve(), Sde::paper_vp(), Sde::paper_subvp()] {
            for &t in &[1e-5, 1e-3, 0.1, 0.5, 1.0] {
                let s = sigma_hat(&sde, t);
                let want = sde.marginal_std(t) / sde.marginal_mean_coef(t);
                assert!(
                    (s / want - 1.0).abs() < 1e-9,
                    "{} t {t}: {s} vs {want}",
                    sde.name()
                );
                assert!((alpha(&sde, t) - sde.marginal_mean_coef(t)).abs() < 1e-15);
                let back = time_of_sigma(&sde, s);
                assert!(
                    (back - t).abs() < 1e-12 * t.max(1e-3),
                    "{} t {t} -> {back}",
                    sde.name()
                );
            }
        }
    }

    #[test]
    fn grid_spacing() {
        let ve = Sde::paper_ve();
        let g = sigma_grid(&ve, 5, f64::INFINITY).unwrap();
        assert_eq!(g[0], 348.0);
        assert_eq!(g[4], sigma_hat(&ve, 1e-5));
        // Uniform in log σ = uniform in t for VE.
        for (i, s) in g.iter().enumerate() {
            let t = time_of_sigma(&ve, *s);
            assert!((t - (1.0 - i as f64 / 4.0 * (1.0 - 1e-5))).abs() < 1e-12);
        }
        let k = sigma_grid(&Sde::paper_vp(), 10, 7.0).unwrap();
        assert!(k.windows(2).all(|w| w[1] < w[0]));
        // ρ = 7 lies between uniform σ̂ (ρ = 1) and log-uniform spacing (ρ = ∞).
        let l = sigma_grid(&Sde::paper_vp(), 10, f64::INFINITY).unwrap();
        assert!(k[5] < k[0] && k[5] > l[5]);
        assert!(sigma_grid(&ve, 5, 0.0).is_err() && sigma_grid(&ve, 5, f64::NAN).is_err());
    }
}
