//! The score function of a trained network under its SDE — the original `get_score_fn`
//! (continuous training): VE nets are conditioned on σ(t) and already output the score
//! (scale_by_sigma); VP/subVP nets are conditioned on 999·t and predict the noise, so
//! score = −output / std(t). Guide-residual VE nets ([`crate::model::config::Parameterization::GuideResidual`]) are
//! preconditioned denoisers of x − y: score = (D − x)/σ² with D = y + c_skip·(x − y) + c_out·F.
use crate::autograd::{Graph, Var};
use crate::backend::Backend;
use crate::error::Result;
use crate::model::config::{NetConfig, PrecondCoefs, SdeKind};
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

    /// σ_d when the network is a guide-residual denoiser, None for the paper's form.
    pub fn guide_residual(&self) -> Option<f64> {
        self.net.config.model.parameterization.sigma_data()
    }

    /// The guide-residual network's raw output F at per-sample noise levels `sigmas`, and each
    /// sample's coefficients: the input is interleave(c_in·(x − y), 2y − 1) and the label σ.
    /// Errors for a paper-form network.
    pub fn residual_net_var(
        &self,
        g: &Graph<B>,
        x: &Tensor<B>,
        y: &Tensor<B>,
        sigmas: &[f64],
        opts: Forward<'_, B>,
    ) -> Result<(Var<B>, Vec<PrecondCoefs>)> {
        let Some(sigma_data) = self.guide_residual() else {
            return Err(crate::error::Error::Config(
                "residual_net_var: the network is not in the guide_residual form".into(),
            ));
        };
        let be = self.net.backend();
        let n = sigmas.len();
        let coefs: Vec<PrecondCoefs> = sigmas.iter().map(|&s| PrecondCoefs::new(s, sigma_data)).collect();
        let c_in: Vec<f64> = coefs.iter().map(|c| c.c_in).collect();
        let residual = be.axpby(1.0, x, -1.0, y)?;
        let x_in = be.scale_per_sample(&residual, &be.from_f64(&[n], &c_in)?)?;
        let y_in = be.affine(y, 2.0, -1.0)?;
        let input = g.constant(be.interleave_channels(&x_in, &y_in)?);
        let labels = be.from_f64(&[n], sigmas)?;
        let f = self.net.forward(g, &input, &labels, opts)?;
        Ok((f, coefs))
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
        if self.guide_residual().is_some() {
            // score = (D − x)/σ² = (c_out/σ²)·F − c_in²·(x − y), since (1 − c_skip)/σ² = c_in².
            let sigmas: Vec<f64> = t.iter().map(|&t| self.sde.marginal_std(t)).collect();
            let (f, coefs) = self.residual_net_var(g, x, y, &sigmas, opts)?;
            let n = t.len();
            let out: Vec<f64> = coefs
                .iter()
                .zip(&sigmas)
                .map(|(c, s)| c.c_out / (s * s))
                .collect();
            let skip: Vec<f64> = coefs.iter().map(|c| -c.c_in * c.c_in).collect();
            let residual = be.axpby(1.0, x, -1.0, y)?;
            let skip = be.scale_per_sample(&residual, &be.from_f64(&[n], &skip)?)?;
            return g.add(
                &g.scale_per_sample(&f, &be.from_f64(&[n], &out)?)?,
                &g.constant(skip),
            );
        }
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

    fn prior_mean_is_guide(&self) -> bool {
        self.guide_residual().is_some()
    }
}
