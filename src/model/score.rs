//! The score function of a trained network under its SDE — the original `get_score_fn`
//! (continuous training): VE nets are conditioned on σ(t) and already output the score
//! (scale_by_sigma); VP/subVP nets are conditioned on 999·t and predict the noise, so
//! score = −output / std(t).
use crate::autograd::{Graph, Var};
use crate::backend::Backend;
use crate::error::Result;
use crate::model::config::{NetConfig, SdeKind};
use crate::model::ncsnpp::{Forward, Ncsnpp};
use crate::model::ScoreFn;
use crate::sde::{Sde, SubVpSde, VeSde, VpSde};
use crate::tensor::Tensor;

impl NetConfig {
    /// The SDE the weights were trained with, with N = `num_scales`.
    pub fn sde_schedule(&self) -> Sde {
        let m = &self.model;
        match self.sde() {
            SdeKind::Ve => Sde::Ve(VeSde {
                sigma_min: m.sigma_min,
                sigma_max: m.sigma_max,
                n: m.num_scales,
            }),
            SdeKind::Vp => Sde::Vp(VpSde {
                beta_min: m.beta_min,
                beta_max: m.beta_max,
                n: m.num_scales,
            }),
            SdeKind::Subvp => Sde::SubVp(SubVpSde {
                beta_min: m.beta_min,
                beta_max: m.beta_max,
                n: m.num_scales,
            }),
        }
    }
}

/// A network together with its SDE: what samplers and the loss evaluate.
pub struct ScoreModel<B: Backend> {
    pub net: Ncsnpp<B>,
    pub sde: Sde,
}

impl<B: Backend> ScoreModel<B> {
    pub fn new(net: Ncsnpp<B>) -> Self {
        let sde = net.config.sde_schedule();
        ScoreModel { net, sde }
    }

    /// Per-sample (time label fed to the net, factor applied to its output) for times `t`.
    pub fn conditioning(&self, t: &[f64]) -> (Vec<f64>, Option<Vec<f64>>) {
        match &self.sde {
            Sde::Ve(ve) => (t.iter().map(|&t| ve.sigma(t)).collect(), None),
            _ => (
                t.iter().map(|&t| 999.0 * t).collect(),
                Some(t.iter().map(|&t| -1.0 / self.sde.marginal_std(t)).collect()),
            ),
        }
    }

    /// Score on a graph (for training), per-sample times `t`; `x`, `y` in the model's data space.
    pub fn score_var(
        &self,
        g: &Graph<B>,
        x: &Tensor<B>,
        y: &Tensor<B>,
        t: &[f64],
        opts: Forward<'_, B>,
    ) -> Result<Var<B>> {
        let be = self.net.backend();
        let input = g.constant(be.interleave_channels(x, y)?);
        let (labels, out_scale) = self.conditioning(t);
        let labels = be.from_f64(&[t.len()], &labels)?;
        let h = self.net.forward(g, &input, &labels, opts)?;
        match out_scale {
            None => Ok(h),
            Some(s) => g.scale_per_sample(&h, &be.from_f64(&[t.len()], &s)?),
        }
    }
}

impl<B: Backend> ScoreFn<B> for ScoreModel<B> {
    fn score(&self, x: &Tensor<B>, y: &Tensor<B>, t: f64) -> Result<Tensor<B>> {
        let g = Graph::inference(self.net.backend());
        let ts = vec![t; x.batch()];
        Ok(self.score_var(&g, x, y, &ts, Forward::default())?.value)
    }
}
