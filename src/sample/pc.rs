//! The predictor–corrector loop (score_sde's `pc_sampler`, with sr-sde's LR guide `y`).
use super::corrector::{Langevin, NoneCorrector};
use super::predictor::{EulerMaruyama, NonePredictor, ReverseDiffusion};
use super::{CorrectorKind, PredictorKind, SamplerConfig, Update};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ScoreFn;
use crate::sde::Sde;
use crate::tensor::Tensor;

/// Standard normal draws from the counter RNG: each draw starts where the last one ended, so every
/// draw of a run is fresh and the whole run is reproducible from the seed (on any backend).
///
/// With [`NoiseStream::per_image`], image n of the batch draws from its own seed, so its noise —
/// and, with per-image Langevin norms, its whole result — does not depend on which other images
/// share its batch or where it sits in it.
#[derive(Clone, Debug)]
pub struct NoiseStream {
    pub seed: u64,
    /// Index of the next element to draw (per image, for per-image streams).
    pub offset: u64,
    /// One seed per image of the batch; empty = one stream for the whole batch.
    pub image_seeds: Vec<u64>,
}

impl NoiseStream {
    pub fn new(seed: u64) -> Self {
        NoiseStream {
            seed,
            offset: 0,
            image_seeds: Vec::new(),
        }
    }

    /// One independent stream per image of the batch.
    pub fn per_image(seeds: Vec<u64>) -> Self {
        NoiseStream {
            seed: seeds.first().copied().unwrap_or(0),
            offset: 0,
            image_seeds: seeds,
        }
    }

    /// N(0, I) of `shape`; advances the offset by its size (per image for per-image streams).
    pub fn next<B: Backend>(&mut self, backend: &B, shape: &[usize]) -> Result<Tensor<B>> {
        if self.image_seeds.is_empty() {
            let z = backend.randn(shape, self.seed, self.offset)?;
            self.offset += z.numel() as u64;
            return Ok(z);
        }
        let n = self.image_seeds.len();
        if shape.first() != Some(&n) {
            return Err(Error::shape(
                "noise",
                format!("{shape:?} for {n} per-image streams"),
            ));
        }
        let per: usize = shape[1..].iter().product();
        // Draw each image's block, then lay the blocks end to end: a concat along dim 1 of
        // [1, per, 1, 1] views is exactly the contiguous batch.
        let parts = self
            .image_seeds
            .iter()
            .map(|&s| backend.randn(&[1, per, 1, 1], s, self.offset))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor<B>> = parts.iter().collect();
        let z = backend.concat_channels(&refs)?.reshape(shape)?;
        self.offset += per as u64;
        Ok(z)
    }
}

/// What the observer of [`pc_sample`] sees after each time step.
pub struct StepInfo<'a, B: Backend> {
    /// 0-based index of the step just done.
    pub step: usize,
    /// Total number of steps N.
    pub total: usize,
    /// The time t_i of this step.
    pub t: f64,
    /// The sample after the step.
    pub x: &'a Tensor<B>,
    /// Its noise-free part x̄ (what the sampler returns after the last step when denoising).
    pub x_mean: &'a Tensor<B>,
}

/// Sample x₀ ~ p₀(x | y) by predictor–corrector sampling of the reverse SDE.
///
/// x starts from the prior N(0, σ²I) shaped like `y` (σ = σ_max for VE, 1 otherwise); for each t_i
/// of torch.linspace(1, eps, N) (float32): corrector steps, then one predictor step, then
/// `observer`. Returns x̄ of the last predictor step if `cfg.denoise`, else x. N is `cfg.steps`:
/// the SDE's discrete schedule is rebuilt with it. The result is in the score's data space (the
/// caller applies the inverse scaler, e.g. (x+1)/2 for VP/subVP models).
pub fn pc_sample<B: Backend, S: ScoreFn<B> + 'static>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &SamplerConfig,
    seed: u64,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    pc_sample_with_noise(backend, score, sde, y, cfg, NoiseStream::new(seed), observer)
}

/// [`pc_sample`] drawing from a given noise stream (e.g. [`NoiseStream::per_image`]).
///
/// On CUDA with a [`crate::model::ScoreModel`] the steps are one captured CUDA graph replayed N
/// times (same results; see [`super::graph`]); otherwise, or if that fails, [`pc_sample_eager`].
pub fn pc_sample_with_noise<B: Backend, S: ScoreFn<B> + 'static>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &SamplerConfig,
    noise: NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    if let Some(x) = super::graph::try_pc_sample(backend, score, sde, y, cfg, &noise, observer)? {
        return Ok(x);
    }
    pc_sample_eager(backend, score, sde, y, cfg, noise, observer)
}

/// [`pc_sample_with_noise`] as a loop of backend ops, on any backend (no CUDA graph).
pub fn pc_sample_eager<B: Backend, S: ScoreFn<B>>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &SamplerConfig,
    mut noise: NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    cfg.validate()?;
    if cfg.fast.is_some() {
        return Err(Error::Config(
            "pc_sample: this configuration names a fast sampler; run it with sample::sample_with_noise"
                .into(),
        ));
    }
    if y.shape().is_empty() || y.numel() == 0 {
        return Err(Error::shape(
            "pc_sample",
            format!("guide y must be a non-empty batch, got {:?}", y.shape()),
        ));
    }
    let sde = sde.with_steps(cfg.steps)?;
    let langevin = cfg.langevin();
    let shape = y.shape().to_vec();

    let mut x = crate::model::prior_start(backend, score, &noise.next(backend, &shape)?, sde.prior_std(), y)?;
    let mut x_mean = x.clone();
    let grid = sde.timesteps();
    for (i, &t) in grid.iter().enumerate() {
        let t = t as f64;
        x = corrector_step(
            backend,
            score,
            &sde,
            cfg.corrector,
            &langevin,
            &x,
            y,
            t,
            &mut noise,
        )?
        .x;
        let up = predictor_step(backend, score, &sde, cfg.predictor, &x, y, t, &mut noise)?;
        (x, x_mean) = (up.x, up.x_mean);
        observer(StepInfo {
            step: i,
            total: grid.len(),
            t,
            x: &x,
            x_mean: &x_mean,
        })?;
    }
    Ok(if cfg.denoise { x_mean } else { x })
}

/// One predictor update at t: evaluates the score (unless `None`) and draws fresh noise.
#[allow(clippy::too_many_arguments)]
pub fn predictor_step<B: Backend, S: ScoreFn<B>>(
    backend: &B,
    score: &S,
    sde: &Sde,
    kind: PredictorKind,
    x: &Tensor<B>,
    y: &Tensor<B>,
    t: f64,
    noise: &mut NoiseStream,
) -> Result<Update<B>> {
    match kind {
        PredictorKind::None => Ok(NonePredictor::update(x)),
        PredictorKind::ReverseDiffusion => {
            let s = score.score(x, y, t)?;
            let z = noise.next(backend, x.shape())?;
            ReverseDiffusion::update(backend, sde, x, &s, &z, t)
        }
        PredictorKind::EulerMaruyama => {
            let s = score.score(x, y, t)?;
            let z = noise.next(backend, x.shape())?;
            EulerMaruyama::update(backend, sde, x, &s, &z, t)
        }
    }
}

/// All corrector updates at t (`langevin.n_steps` of them, or none).
#[allow(clippy::too_many_arguments)]
pub fn corrector_step<B: Backend, S: ScoreFn<B>>(
    backend: &B,
    score: &S,
    sde: &Sde,
    kind: CorrectorKind,
    langevin: &Langevin,
    x: &Tensor<B>,
    y: &Tensor<B>,
    t: f64,
    noise: &mut NoiseStream,
) -> Result<Update<B>> {
    let mut up = NoneCorrector::update(x);
    if kind == CorrectorKind::Langevin {
        for _ in 0..langevin.n_steps {
            let s = score.score(&up.x, y, t)?;
            let z = noise.next(backend, x.shape())?;
            up = langevin.update(backend, sde, &up.x, &s, &z, t)?;
        }
    }
    Ok(up)
}
