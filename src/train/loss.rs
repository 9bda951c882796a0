//! The continuous denoising score-matching loss of the original `losses.get_sde_loss_fn`
//! (`continuous=True`, `likelihood_weighting=False`):
//!
//! t ~ U[eps, 1], z ~ N(0, I), x_t = mean(t)·x0 + std(t)·z, s = score(interleave(x_t, y), t),
//! per sample L = reduce((s·std(t) + z)²), batch loss = mean over samples,
//! where reduce is 0.5·sum over the pixels for VE (`reduce_mean=False`) and the mean over the
//! pixels for VP/subVP (`reduce_mean=True`). Only x is diffused; the LR guide y is never noised.
//!
//! Guide-residual networks (EDM preconditioning of x − y) take EDM's loss instead: with σ = σ(t),
//! x = x₀ + σz and D = y + c_skip·(x − y) + c_out·F, the loss λ(σ)·‖D − x₀‖² with λ = 1/c_out² is
//! ‖F − T‖², T = (x₀ − y − c_skip·(x − y))/c_out — a unit-variance target at every σ (T has
//! variance 1 when the residual has RMS σ_d, so F ≡ 0 scores ≈ 1) — averaged over the pixels.
use crate::autograd::{Gradients, Graph};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ncsnpp::Forward;
use crate::model::{ScoreModel, SdeKind};
use crate::tensor::{same_shape, Tensor};
use crate::train::{stream_seed, Stream};

/// Result of one loss evaluation.
pub struct LossOutput<B: Backend> {
    /// The batch loss (mean over samples).
    pub loss: f64,
    /// Each sample's loss before the batch mean.
    pub per_sample: Vec<f64>,
    /// Gradients of `loss` by parameter name (trainable parameters only); None without `with_grad`.
    pub grads: Option<Gradients<B>>,
}

/// Factor turning Σ(s·std + z)² of one sample into its loss: 0.5 for VE, 1/#elements otherwise.
pub fn per_sample_reduce(sde: SdeKind, elems_per_sample: usize) -> f64 {
    match sde {
        SdeKind::Ve => 0.5,
        SdeKind::Vp | SdeKind::Subvp => 1.0 / elems_per_sample as f64,
    }
}

/// The training times of one step under `dist`: the paper's t ~ U[eps, 1] ([`draw_times`]), or
/// σ log-normal (truncated to the SDE's [σ_min, σ_max] by redrawing) mapped to the VE time
/// t = ln(σ/σ_min)/ln(σ_max/σ_min), so that σ(t) is the drawn σ. Deterministic in (seed, step).
pub fn draw_train_times(
    dist: &crate::train::NoiseDist,
    sde: &crate::sde::Sde,
    seed: u64,
    step: u64,
    batch: usize,
    t_eps: f64,
) -> Result<Vec<f64>> {
    use crate::train::NoiseDist;
    let NoiseDist::LogNormal { mean, std } = *dist else {
        return Ok(draw_times(seed, step, batch, t_eps));
    };
    let crate::sde::Sde::Ve(ve) = sde else {
        return Err(Error::Config(
            "a log-normal σ distribution needs a VE model".into(),
        ));
    };
    let (lo, hi) = (ve.sigma_min.ln(), ve.sigma_max.ln());
    let s = stream_seed(seed, Stream::Time, step);
    (0..batch as u64)
        .map(|i| {
            // Box–Muller on two uniforms of the sample's own counters, redrawn until in range.
            for k in 0..64u64 {
                let c = (i * 64 + k) * 2;
                let u1 = (crate::rng::uniform(s, c) as f64).max(1e-12);
                let u2 = crate::rng::uniform(s, c + 1) as f64;
                let n = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let ln_sigma = mean + std * n;
                if (lo..=hi).contains(&ln_sigma) {
                    return Ok((ln_sigma - lo) / (hi - lo));
                }
            }
            Err(Error::Config(format!(
                "log-normal σ (mean {mean}, std {std}) almost never falls in [{}, {}]",
                ve.sigma_min, ve.sigma_max
            )))
        })
        .collect()
}

/// The times of one training step: t = u·(1 − eps) + eps with u ~ U[0,1), computed in float32 as
/// `torch.rand(B) * (T - eps) + eps` does. Deterministic in (seed, step).
pub fn draw_times(seed: u64, step: u64, batch: usize, t_eps: f64) -> Vec<f64> {
    let s = stream_seed(seed, Stream::Time, step);
    let (span, eps) = ((1.0 - t_eps) as f32, t_eps as f32);
    (0..batch)
        .map(|i| (crate::rng::uniform(s, i as u64) * span + eps) as f64)
        .collect()
}

/// The unit noise z of one training step, shape `shape`. Deterministic in (seed, step).
pub fn draw_noise<B: Backend>(be: &B, shape: &[usize], seed: u64, step: u64) -> Result<Tensor<B>> {
    be.randn(shape, stream_seed(seed, Stream::Noise, step), 0)
}

/// The dropout seed of one training step.
pub fn dropout_seed(seed: u64, step: u64) -> u64 {
    stream_seed(seed, Stream::Dropout, step)
}

/// Evaluate the DSM loss for given times `t` and noise `z` (`x0`, `y`, `z`: [N,3,H,W] in the model's
/// data space). With `with_grad` the model runs in training mode (dropout of the config, masks
/// from `dropout_seed`) and the gradients of the batch loss are returned; without, it runs in eval
/// mode (no dropout, no tape), like the original's eval loss.
pub fn dsm_loss<B: Backend>(
    model: &ScoreModel<B>,
    x0: &Tensor<B>,
    y: &Tensor<B>,
    t: &[f64],
    z: &Tensor<B>,
    dropout_seed: u64,
    with_grad: bool,
) -> Result<LossOutput<B>> {
    let be = model.net.backend();
    let (n, c, h, w) = x0.dims4("dsm_loss x0")?;
    same_shape("dsm_loss y", y.shape(), x0.shape())?;
    same_shape("dsm_loss z", z.shape(), x0.shape())?;
    if t.len() != n {
        return Err(Error::shape(
            "dsm_loss t",
            format!("{} times for a batch of {n}", t.len()),
        ));
    }
    if n == 0 {
        return Err(Error::shape("dsm_loss", "empty batch"));
    }
    let mean: Vec<f64> = t.iter().map(|&t| model.sde.marginal_mean_coef(t)).collect();
    let std: Vec<f64> = t.iter().map(|&t| model.sde.marginal_std(t)).collect();
    let std_t = be.from_f64(&[n], &std)?;
    let xt = be.add(
        &be.scale_per_sample(x0, &be.from_f64(&[n], &mean)?)?,
        &be.scale_per_sample(z, &std_t)?,
    )?;

    let g = if with_grad {
        Graph::training(be)
    } else {
        Graph::inference(be)
    };
    let opts = Forward {
        dropout: if with_grad {
            model.net.config.model.dropout
        } else {
            0.0
        },
        dropout_seed,
        capture: None,
    };
    let (sq, reduce) = if model.guide_residual().is_some() {
        // ‖F − T‖², T = (x₀ − y)/c_out − (c_skip/c_out)·(x − y), mean over the pixels.
        let (f, coefs) = model.residual_net_var(&g, &xt, y, &std, opts)?;
        let a: Vec<f64> = coefs.iter().map(|c| -1.0 / c.c_out).collect();
        let b: Vec<f64> = coefs.iter().map(|c| c.c_skip / c.c_out).collect();
        let r0 = be.axpby(1.0, x0, -1.0, y)?;
        let rt = be.axpby(1.0, &xt, -1.0, y)?;
        let minus_target = be.add(
            &be.scale_per_sample(&r0, &be.from_f64(&[n], &a)?)?,
            &be.scale_per_sample(&rt, &be.from_f64(&[n], &b)?)?,
        )?;
        let r = g.add(&f, &g.constant(minus_target))?;
        (g.sum_squares_per_sample(&r)?, 1.0 / (c * h * w) as f64)
    } else {
        let score = model.score_var(&g, &xt, y, t, opts)?;
        let r = g.add(&g.scale_per_sample(&score, &std_t)?, &g.constant(z.clone()))?;
        (
            g.sum_squares_per_sample(&r)?,
            per_sample_reduce(model.net.config.sde(), c * h * w),
        )
    };
    let per_sample: Vec<f64> = be.to_f64(&sq.value)?.iter().map(|v| v * reduce).collect();
    let loss = per_sample.iter().sum::<f64>() / n as f64;
    let grads = if with_grad {
        // d(batch loss)/d(Σ² of sample i) = reduce / N.
        let seed = be.from_f64(&[n], &vec![reduce / n as f64; n])?;
        Some(g.backward(&sq, seed)?)
    } else {
        None
    };
    Ok(LossOutput {
        loss,
        per_sample,
        grads,
    })
}
