//! Correctors: MCMC steps at a fixed t that move x towards p_t using the score.
use super::Update;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::sde::Sde;
use crate::tensor::Tensor;

/// How the Langevin step size ε = 2α(r·‖z‖/‖s‖)² measures the norms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LangevinNorm {
    /// ‖s‖ and ‖z‖ of each image: one ε per image, so an image's result does not depend on the
    /// other images of the batch.
    #[default]
    PerImage,
    /// The batch means of the per-image norms, one ε for the whole batch — what the original does
    /// (results then depend on the batch composition).
    Batch,
}

/// Annealed Langevin corrector (score_sde's `LangevinCorrector`): per step, with s = s(x, t) and
/// z ~ N(0, I): ε = 2α(r‖z‖/‖s‖)², x̄ = x + ε·s, x = x̄ + √(2ε)·z, where α = 1 for VE and the DDPM
/// α_i for VP (and, an extension, for subVP: see [`Sde::langevin_alpha`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Langevin {
    /// Signal-to-noise ratio r.
    pub snr: f64,
    /// Steps per time step (`n_steps_each`).
    pub n_steps: usize,
    pub norm: LangevinNorm,
}

impl Langevin {
    /// The per-image step sizes ε[n] from the per-image squared norms of the score and the noise.
    pub fn step_sizes(&self, sde: &Sde, t: f64, score_sq: &[f64], noise_sq: &[f64]) -> Result<Vec<f64>> {
        let alpha = sde.langevin_alpha(t);
        let eps_of = |g: f64, z: f64| 2.0 * alpha * (self.snr * z / g).powi(2);
        let eps: Vec<f64> = match self.norm {
            LangevinNorm::PerImage => score_sq
                .iter()
                .zip(noise_sq)
                .map(|(&g, &z)| eps_of(g.sqrt(), z.sqrt()))
                .collect(),
            LangevinNorm::Batch => {
                let mean_norm = |v: &[f64]| v.iter().map(|x| x.sqrt()).sum::<f64>() / v.len().max(1) as f64;
                vec![eps_of(mean_norm(score_sq), mean_norm(noise_sq)); score_sq.len()]
            }
        };
        // A zero score gives ε = ∞ (NaN in the original); refuse it rather than return NaNs.
        if let Some(bad) = eps.iter().find(|e| !e.is_finite()) {
            return Err(Error::Other(format!(
                "Langevin step size {bad} at t = {t}: the score has zero or non-finite norm"
            )));
        }
        Ok(eps)
    }

    /// One Langevin step given the score `score` = s(x, t) and unit noise `noise` (both shaped as x).
    pub fn update<B: Backend>(
        &self,
        backend: &B,
        sde: &Sde,
        x: &Tensor<B>,
        score: &Tensor<B>,
        noise: &Tensor<B>,
        t: f64,
    ) -> Result<Update<B>> {
        // Only 2·batch scalars cross to the host: the norms in, the step sizes out.
        let score_sq = backend.to_f64(&backend.sum_squares_per_sample(score)?)?;
        let noise_sq = backend.to_f64(&backend.sum_squares_per_sample(noise)?)?;
        let eps = self.step_sizes(sde, t, &score_sq, &noise_sq)?;
        let noise_scale: Vec<f64> = eps.iter().map(|e| (2.0 * e).sqrt()).collect();
        let n = eps.len();
        let eps = backend.from_f64(&[n], &eps)?;
        let noise_scale = backend.from_f64(&[n], &noise_scale)?;
        let x_mean = backend.add(x, &backend.scale_per_sample(score, &eps)?)?;
        let x = backend.add(&x_mean, &backend.scale_per_sample(noise, &noise_scale)?)?;
        Ok(Update { x, x_mean })
    }
}

/// No corrector: x is left as it is and no score is evaluated.
pub struct NoneCorrector;

impl NoneCorrector {
    pub fn update<B: Backend>(x: &Tensor<B>) -> Update<B> {
        Update {
            x: x.clone(),
            x_mean: x.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_sizes_per_image_and_batch() {
        let sde = Sde::paper_ve();
        let lv = |norm| Langevin {
            snr: 0.1,
            n_steps: 1,
            norm,
        };
        // ‖s‖ = (1, 2), ‖z‖ = (3, 3).
        let (g, z) = ([1.0, 4.0], [9.0, 9.0]);
        let per = lv(LangevinNorm::PerImage).step_sizes(&sde, 0.5, &g, &z).unwrap();
        assert!((per[0] - 2.0 * 0.09).abs() < 1e-12 && (per[1] - 2.0 * 0.0225).abs() < 1e-12);
        let batch = lv(LangevinNorm::Batch).step_sizes(&sde, 0.5, &g, &z).unwrap();
        let want = 2.0 * (0.1 * 3.0 / 1.5f64).powi(2);
        assert!(batch.iter().all(|&e| (e - want).abs() < 1e-12));
        // VP scales by α_i < 1; a zero score is an error, not a NaN.
        let vp = lv(LangevinNorm::Batch)
            .step_sizes(&Sde::paper_vp(), 0.5, &g, &z)
            .unwrap();
        assert!(vp[0] < want && vp[0] > 0.99 * want);
        assert!(lv(LangevinNorm::PerImage)
            .step_sizes(&sde, 0.5, &[0.0, 1.0], &z)
            .is_err());
    }
}
