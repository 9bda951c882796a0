//! Predictor–corrector sampling of the reverse SDE (score_sde's `get_pc_sampler`, as sr-sde runs it).
//!
//! - [`predictor`]: one reverse-time step — [`ReverseDiffusion`], [`EulerMaruyama`], [`NonePredictor`];
//! - [`corrector`]: one Langevin MCMC step at fixed t — [`Langevin`], [`NoneCorrector`];
//! - [`pc`]: the loop [`pc_sample`] from the prior to x̄₀.
//!
//! Each update is a pure function of (x, score, unit noise, t) built from a few backend ops, so it
//! can be checked against the original without a network and later fused into one kernel.
pub mod corrector;
pub mod pc;
pub mod predictor;

pub use corrector::{Langevin, LangevinNorm, NoneCorrector};
pub use pc::{pc_sample, pc_sample_with_noise, NoiseStream, StepInfo};
pub use predictor::{EulerMaruyama, NonePredictor, ReverseDiffusion};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::sde::Sde;
use crate::tensor::Tensor;

/// The result of one predictor or corrector update: the new sample and its noise-free part
/// (x̄ = x before the noise term; the sampler returns the last x̄ when denoising).
pub struct Update<B: Backend> {
    pub x: Tensor<B>,
    pub x_mean: Tensor<B>,
}

/// Which predictor the PC loop uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictorKind {
    ReverseDiffusion,
    EulerMaruyama,
    None,
}

/// Which corrector the PC loop uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorrectorKind {
    Langevin,
    None,
}

/// Everything that defines a PC sampler run except the SDE, the score and the seed.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub predictor: PredictorKind,
    pub corrector: CorrectorKind,
    /// Langevin signal-to-noise ratio r (step size 2α(r‖z‖/‖s‖)²).
    pub snr: f64,
    /// Langevin steps per time step (`n_steps_each`).
    pub corrector_steps: usize,
    /// N: the number of time steps; the SDE's discrete schedule is rebuilt with this N.
    pub steps: usize,
    /// How the Langevin step size averages norms (per image, or over the batch as the original).
    pub langevin_norm: LangevinNorm,
    /// Return x̄ of the last predictor step (the original's `noise_removal = True`) instead of x.
    pub denoise: bool,
}

/// Names accepted by [`SamplerConfig::preset`].
pub const PRESETS: &[&str] = &["sde-ve", "sde-ve-cs", "sde-vp", "sde-subvp"];

impl SamplerConfig {
    /// A named configuration of the paper, with N taken from `sde`:
    /// - `sde-ve`: reverse diffusion, no corrector;
    /// - `sde-ve-cs`: reverse diffusion + Langevin (snr 0.075, one step) — the repository's VE default;
    /// - `sde-vp`, `sde-subvp`: Euler–Maruyama, no corrector.
    ///
    /// The preset must match the SDE kind (a VE preset on a VP SDE is an error).
    pub fn preset(name: &str, sde: &Sde) -> Result<SamplerConfig> {
        let (predictor, corrector, kind) = match name {
            "sde-ve" => (PredictorKind::ReverseDiffusion, CorrectorKind::None, "ve"),
            "sde-ve-cs" => (PredictorKind::ReverseDiffusion, CorrectorKind::Langevin, "ve"),
            "sde-vp" => (PredictorKind::EulerMaruyama, CorrectorKind::None, "vp"),
            "sde-subvp" => (PredictorKind::EulerMaruyama, CorrectorKind::None, "subvp"),
            _ => {
                return Err(Error::Config(format!(
                    "unknown sampler preset `{name}`; valid presets: {}",
                    PRESETS.join(", ")
                )))
            }
        };
        if sde.name() != kind {
            return Err(Error::Config(format!(
                "sampler preset `{name}` is for the {kind} SDE, but the model uses the {} SDE",
                sde.name()
            )));
        }
        Ok(SamplerConfig {
            predictor,
            corrector,
            snr: 0.075,
            corrector_steps: 1,
            steps: sde.n(),
            langevin_norm: LangevinNorm::default(),
            denoise: true,
        })
    }

    /// The paper's sampler for an SDE: `sde-ve-cs` for VE, `sde-vp` / `sde-subvp` otherwise.
    pub fn default_for(sde: &Sde) -> SamplerConfig {
        let name = match sde {
            Sde::Ve(_) => "sde-ve-cs",
            Sde::Vp(_) => "sde-vp",
            Sde::SubVp(_) => "sde-subvp",
        };
        // The names above are valid and match their SDE.
        Self::preset(name, sde).expect("preset of its own SDE")
    }

    /// The Langevin corrector this configuration describes.
    pub fn langevin(&self) -> Langevin {
        Langevin {
            snr: self.snr,
            n_steps: self.corrector_steps,
            norm: self.langevin_norm,
        }
    }

    /// Network evaluations per sample: N·(corrector steps + 1) (fewer with `None` parts).
    pub fn nfe(&self) -> usize {
        let c = if self.corrector == CorrectorKind::Langevin {
            self.corrector_steps
        } else {
            0
        };
        let p = usize::from(self.predictor != PredictorKind::None);
        self.steps * (c + p)
    }

    /// Check the values (N ≥ 2, a positive finite snr when Langevin runs).
    pub fn validate(&self) -> Result<()> {
        if self.steps < 2 {
            return Err(Error::Config(format!(
                "sampler needs at least 2 steps, got {}",
                self.steps
            )));
        }
        if self.corrector == CorrectorKind::Langevin && !(self.snr.is_finite() && self.snr > 0.0) {
            return Err(Error::Config(format!(
                "Langevin snr must be positive, got {}",
                self.snr
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let ve = Sde::paper_ve();
        let cs = SamplerConfig::preset("sde-ve-cs", &ve).unwrap();
        assert_eq!(cs.corrector, CorrectorKind::Langevin);
        assert_eq!((cs.snr, cs.corrector_steps, cs.steps), (0.075, 1, 2000));
        assert_eq!(cs.nfe(), 4000);
        assert_eq!(SamplerConfig::default_for(&ve), cs);
        let vp = SamplerConfig::preset("sde-vp", &Sde::paper_vp()).unwrap();
        assert_eq!(
            (vp.predictor, vp.corrector, vp.nfe()),
            (PredictorKind::EulerMaruyama, CorrectorKind::None, 2000)
        );
        let sub = Sde::paper_subvp().with_steps(100).unwrap();
        assert_eq!(SamplerConfig::preset("sde-subvp", &sub).unwrap().steps, 100);
        match SamplerConfig::preset("ddim", &ve) {
            Err(Error::Config(msg)) => {
                assert!(msg.contains("sde-ve-cs") && msg.contains("sde-subvp"), "{msg}")
            }
            other => panic!("expected a config error, got {:?}", other.map(|_| ())),
        }
        assert!(SamplerConfig::preset("sde-vp", &ve).is_err());
    }
}
