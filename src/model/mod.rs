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
