//! Training SR-SDE score networks the way the original `run_lib.train` does: continuous DSM loss
//! ([`loss`]), Adam with linear warm-up and global grad-norm clipping plus an EMA of the weights
//! ([`optim`]), a face-folder loader that builds the LR guide on the fly ([`data`]), atomic
//! resumable checkpoints and inference export ([`checkpoint`]) and the loop itself ([`run`]).
//!
//! Every random draw of a run (the times t, the noise z, dropout masks, the data order and flips)
//! comes from the counter-based Philox RNG keyed by the run's seed and a counter (the step, the
//! epoch, the sample index). A run's randomness is therefore a pure function of (seed, step,
//! sample counter): a checkpoint needs to store only those counters to resume exactly.
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod init;
pub mod loss;
pub mod optim;
pub mod pack;
pub mod run;
pub mod validate;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Independent random streams of a training run (mixed into the Philox counter so that no two
/// purposes ever share numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Diffusion times t ~ U[eps, 1] (counter: step).
    Time = 1,
    /// Unit noise z (counter: step).
    Noise = 2,
    /// Dropout masks (counter: step).
    Dropout = 3,
    /// Per-epoch shuffle of the data (counter: epoch).
    Shuffle = 4,
    /// Random horizontal flips (counter: sample index).
    Flip = 5,
    /// Random initial weights (counter: 0).
    Init = 6,
}

/// A 64-bit seed for one use of one stream: Philox of (counter, stream) under the run seed.
pub fn stream_seed(seed: u64, stream: Stream, counter: u64) -> u64 {
    let w = crate::rng::philox4x32(
        [counter as u32, (counter >> 32) as u32, stream as u32, 0x5eed_5de5],
        [seed as u32, (seed >> 32) as u32],
    );
    (w[0] as u64) | ((w[1] as u64) << 32)
}

/// Optimisation hyper-parameters of a run (the original `config.optim` / `config.training`
/// fields that matter), stored in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// Model preset the run started from (informational; the full config is stored too).
    pub preset: String,
    pub batch: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Linear warm-up length in steps (0: none).
    pub warmup: u64,
    /// Global L2 grad-norm clip; negative disables it (as the original).
    pub grad_clip: f64,
    pub ema_rate: f64,
    /// Smallest diffusion time drawn (the loss's `eps`).
    pub t_eps: f64,
    /// Random horizontal flips of the training faces (VE: off, VP/subVP: on in the original).
    pub flip: bool,
    pub seed: u64,
    /// Share of the data files held out for validation: it decides the training stream, so a
    /// resumed run keeps it. Checkpoints written before the split existed held out none.
    #[serde(default)]
    pub val_fraction: f64,
    /// The weights a run started from (`train --init-from`) instead of a fresh initialisation,
    /// with the training they had already had; None for a fresh run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitFrom>,
    /// The learning rate's decay after the warm-up (absent: constant, as the original). Unlike the
    /// other settings it may be set or changed on resume (`train --lr-decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_decay: Option<crate::train::optim::LrDecay>,
    /// The noise levels' distribution (absent in older checkpoints: the paper's).
    #[serde(default, skip_serializing_if = "NoiseDist::is_paper")]
    pub noise_dist: NoiseDist,
}

/// How a run draws the noise levels of its training steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoiseDist {
    /// The paper's t ~ U[t_eps, 1] (for VE: σ log-uniform on [σ_min, σ_max]).
    #[default]
    Paper,
    /// ln σ ~ N(mean, std²) truncated to [σ_min, σ_max] (EDM's choice; VE only).
    LogNormal { mean: f64, std: f64 },
}

impl NoiseDist {
    fn is_paper(&self) -> bool {
        *self == NoiseDist::Paper
    }

    /// Parse `paper` or `log-normal:MEAN,STD` (MEAN, STD of ln σ).
    pub fn parse(s: &str) -> Result<NoiseDist> {
        if s == "paper" || s == "log-uniform" {
            return Ok(NoiseDist::Paper);
        }
        let bad = || {
            Error::Config(format!(
                "noise distribution `{s}`: expected `paper` or `log-normal:MEAN,STD` (of ln σ)"
            ))
        };
        let rest = s.strip_prefix("log-normal:").ok_or_else(bad)?;
        let (m, d) = rest.split_once(',').ok_or_else(bad)?;
        let (mean, std): (f64, f64) = (
            m.trim().parse().map_err(|_| bad())?,
            d.trim().parse().map_err(|_| bad())?,
        );
        if !(mean.is_finite() && std.is_finite() && std > 0.0) {
            return Err(bad());
        }
        Ok(NoiseDist::LogNormal { mean, std })
    }

    /// The form [`NoiseDist::parse`] reads.
    pub fn describe(&self) -> String {
        match self {
            NoiseDist::Paper => "paper".into(),
            NoiseDist::LogNormal { mean, std } => format!("log-normal:{mean},{std}"),
        }
    }
}

/// Where the starting weights of a `--init-from` run came from, and the training totals they
/// carried (0 when the source does not record them), so exports can report cumulative totals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitFrom {
    /// The weights file or folder as given.
    pub source: String,
    /// Optimisation steps behind the source weights (over all earlier runs).
    pub steps: u64,
    /// Training images seen by the source weights (over all earlier runs).
    pub images: u64,
    /// Earlier runs (sessions started fresh or from weights) behind the source weights.
    pub runs: u64,
}

impl Hyper {
    /// The original's settings (Adam 2e-4, β 0.9/0.999, eps 1e-8, warm-up 5000, clip 1, batch 2,
    /// t_eps 1e-5) for a model config: EMA rate from the config, flips for VP/subVP only.
    pub fn paper(preset: &str, config: &crate::model::NetConfig) -> Hyper {
        Hyper {
            preset: preset.to_string(),
            batch: 2,
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            warmup: 5000,
            grad_clip: 1.0,
            ema_rate: config.model.ema_rate,
            t_eps: 1e-5,
            flip: config.sde() != crate::model::SdeKind::Ve,
            seed: 42,
            val_fraction: crate::train::data::VAL_FRACTION,
            init: None,
            lr_decay: None,
            noise_dist: NoiseDist::Paper,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch == 0 {
            return bad("batch size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate {} must be finite and ≥ 0", self.lr));
        }
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            return bad("Adam betas must lie in [0, 1)".into());
        }
        if self.adam_eps.is_nan() || self.adam_eps <= 0.0 {
            return bad("Adam eps must be > 0".into());
        }
        if let Some(d) = &self.lr_decay {
            d.validate()?;
        }
        if !(0.0..=1.0).contains(&self.ema_rate) {
            return bad(format!("EMA rate {} must lie in [0, 1]", self.ema_rate));
        }
        if !(self.t_eps > 0.0 && self.t_eps < 1.0) {
            return bad(format!("t_eps {} must lie in (0, 1)", self.t_eps));
        }
        Ok(())
    }
}
