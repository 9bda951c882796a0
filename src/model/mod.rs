//! The score networks (NCSN++ for VE, the DDPM++-style network for VP/subVP), their configs and
//! weights.
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::Tensor;

/// A conditional score function s(x_t, t | y) ≈ ∇ log p_t(x_t | y), as samplers see it.
///
/// `x` and `y` are [N,3,H,W] in the model's data space (VE: [0,1]; VP/subVP: [−1,1]); `t` is the
/// continuous SDE time shared by the batch. The implementation does the channel interleave, the
/// time conditioning (σ(t) or 999·t) and the output scaling of the original `get_score_fn`.
pub trait ScoreFn<B: Backend> {
    fn score(&self, x: &Tensor<B>, y: &Tensor<B>, t: f64) -> Result<Tensor<B>>;

    /// Whether the prior the samplers start from is centred on the guide (x_T = y + σ_max·z, the
    /// guide-residual form) rather than on 0 (the paper's x_T = σ_max·z).
    fn prior_mean_is_guide(&self) -> bool {
        false
    }
}

/// The sampler's start x_T: `unit` noise scaled to the prior's std, plus the guide when `score`
/// centres its prior there.
pub fn prior_start<B: Backend, S: ScoreFn<B> + ?Sized>(
    backend: &B,
    score: &S,
    unit: &Tensor<B>,
    prior_std: f64,
    y: &Tensor<B>,
) -> Result<Tensor<B>> {
    if score.prior_mean_is_guide() {
        backend.axpby(prior_std, unit, 1.0, y)
    } else {
        backend.affine(unit, prior_std, 0.0)
    }
}

pub mod pickle;

pub mod config;
pub mod default;
pub mod load;
pub mod ncsnpp;
pub mod score;

pub use config::{NetConfig, SdeKind};
pub use ncsnpp::Ncsnpp;
pub use score::ScoreModel;
pub mod pth;
pub mod sha256;
pub mod sharded;
pub mod weights;
