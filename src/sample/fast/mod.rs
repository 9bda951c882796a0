//! Fast samplers: deterministic solvers of the probability-flow ODE (and a churned, stochastic
//! variant) that reach the PC sampler's quality in tens of network evaluations instead of thousands.
//!
//! All three SDEs are integrated in the VE-type variables (x̂, σ̂) = (x/α, σ/α) of
//! [`schedule`], where the ODE reads dx̂/dσ̂ = (x̂ − D)/σ̂ with the denoiser D = x̂ + σ̂²·α·s(α·x̂, t):
//! - [`FastSolver::Heun`]: Karras et al. (2022) Algorithms 1/2 in σ̂;
//! - [`FastSolver::Dpm`]: the multistep exponential integrator DPM-Solver++(qM) in λ = −ln σ̂,
//!   the polynomial through the last q denoiser values integrated exactly ([`expint`]); the first
//!   steps use the lower orders their history allows. Order 1 is DDIM, which on this ODE is also
//!   exactly Euler in σ̂ (x̂' = (σ̂'/σ̂)·x̂ + (1 − σ̂'/σ̂)·D), so there is no separate Euler solver.
//!
//! Schedule: `steps` is the number of network evaluations, exactly. The σ̂ levels run from σ̂(1)
//! to σ̂(eps) (eps = the SDE's `sampling_eps`, as the PC sampler), spaced with Karras' ρ, and the
//! last step goes from σ̂(eps) to σ̂ = 0, i.e. returns the denoiser D(x̂, σ̂(eps)) — Tweedie's
//! estimate of x₀ and the ODE counterpart of the PC sampler's `noise_removal` (which returns the
//! noise-free x̄ of its last step; for VE that x̄ = x + σ_min²·s is Tweedie's D at σ ≈ σ_min, the
//! score taken at σ(eps) = 1.0001·σ_min). Heun spends 2 evaluations
//! per step and 1 on the final (Euler) step, as Karras; with an even budget its first step is an
//! Euler step too. DPM spends 1 per level.
//!
//! Churn η ∈ [0, 1] moves from the ODE (0) to the full reverse SDE (1) through the family of
//! reverse SDEs with the same marginals, dx̂ = (1 + η)·(x̂ − D)·dσ̂/σ̂ + √(η·|dσ̂²|)·dw̄:
//! - DPM: integrated exactly in its linear part (SDE-DPM-Solver++): each step contracts by
//!   e^{−(1+η)h} and adds fresh noise of std σ̂_{i+1}·√(1 − e^{−2ηh});
//! - Heun: Karras' churn, fresh noise raising σ̂_i to σ̂_i·e^{ηh} before the ODE step
//!   (which injects the same noise per step as the SDE to first order), never above σ̂(1) and not
//!   on the final denoising step.
//!
//! Noise comes from a [`NoiseStream`] (per image with [`NoiseStream::per_image`]): x_T first, then one
//! draw per churned step, so an image's result does not depend on its batch companions.
pub mod expint;
pub mod graph;
pub mod plan;
pub mod schedule;

use super::{NoiseStream, StepInfo};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ScoreFn;
use crate::sde::Sde;
use crate::tensor::Tensor;

/// The integrator of a fast sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastSolver {
    /// Heun in σ̂ (second order; two evaluations per step, the final step Euler).
    Heun,
    /// DPM-Solver++ multistep of this order (1 = DDIM, 2, 3; one evaluation per step).
    Dpm { order: usize },
}

impl FastSolver {
    /// The order of accuracy of the deterministic solver.
    pub fn order(&self) -> usize {
        match self {
            FastSolver::Heun => 2,
            FastSolver::Dpm { order } => *order,
        }
    }

    /// A one-line description, e.g. "DPM-Solver++(2M)".
    pub fn describe(&self) -> String {
        match self {
            FastSolver::Heun => "Heun (2nd order, probability-flow ODE)".into(),
            FastSolver::Dpm { order: 1 } => {
                "DPM-Solver++(1) = DDIM = Euler in σ̂ (probability-flow ODE)".into()
            }
            FastSolver::Dpm { order } => format!("DPM-Solver++({order}M) multistep (probability-flow ODE)"),
        }
    }
}

/// A fast sampler's settings (the number of evaluations is `SamplerConfig::steps`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastConfig {
    pub solver: FastSolver,
    /// Karras' ρ of the σ̂ schedule; `f64::INFINITY` = uniform in log σ̂ (for VE: uniform in t).
    /// Default [`FastSolver::default_rho`].
    pub rho: f64,
    /// η ∈ [0, 1]: 0 = the deterministic ODE, 1 = the full reverse SDE (see the module docs).
    pub churn: f64,
}

impl FastSolver {
    /// The schedule each solver's paper recommends: Karras' ρ = 7 for Heun; uniform in log σ̂ (the
    /// logSNR spacing of DPM-Solver for low-resolution pixel models) for DPM. On the Gaussian test
    /// problem (tests/fast_samplers.rs) these are also the better choice at 17–33 evaluations for
    /// DPM; for Heun neither wins on every SDE.
    pub fn default_rho(&self) -> f64 {
        match self {
            FastSolver::Heun => 7.0,
            FastSolver::Dpm { .. } => f64::INFINITY,
        }
    }
}

impl FastConfig {
    /// `solver` on its default schedule, without churn.
    pub fn new(solver: FastSolver) -> Self {
        FastConfig {
            solver,
            rho: solver.default_rho(),
            churn: 0.0,
        }
    }

    /// Check the values for a run of `steps` evaluations.
    pub fn validate(&self, steps: usize) -> Result<()> {
        if let FastSolver::Dpm { order } = self.solver {
            if !(1..=3).contains(&order) {
                return Err(Error::Config(format!(
                    "DPM-Solver order must be 1, 2 or 3, got {order}"
                )));
            }
        }
        if steps < 2 {
            return Err(Error::Config(format!(
                "a fast sampler needs at least 2 network evaluations, got {steps}"
            )));
        }
        if self.rho.is_nan() || self.rho <= 0.0 {
            return Err(Error::Config(format!(
                "schedule rho must be positive (or inf), got {}",
                self.rho
            )));
        }
        if !(0.0..=1.0).contains(&self.churn) {
            return Err(Error::Config(format!(
                "churn must be in [0, 1] (0 = ODE, 1 = full SDE), got {}",
                self.churn
            )));
        }
        Ok(())
    }
}

/// Sample x₀ ~ p₀(x | y) with `steps` network evaluations: x_T ~ N(0, prior_std²) from `noise`, then
/// [`fast_sample_from`]. `observer` is called after every network evaluation (see there).
#[allow(clippy::too_many_arguments)]
pub fn fast_sample<B: Backend, S: ScoreFn<B> + 'static>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &FastConfig,
    steps: usize,
    mut noise: NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    cfg.validate(steps)?;
    check_guide(y)?;
    let x_t = crate::model::prior_start(
        backend,
        score,
        &noise.next(backend, y.shape())?,
        sde.prior_std(),
        y,
    )?;
    fast_sample_from(backend, score, sde, y, cfg, steps, &x_t, &mut noise, observer)
}

/// Integrate from a given x_T (at t = 1, in the SDE's x space, shaped like `y`) to x₀ with `steps`
/// network evaluations; `noise` is only drawn from when churning. After every evaluation,
/// `observer` sees its index (0..steps), its time t, the point x it was evaluated at and the
/// denoised estimate D as `x_mean`; the last D is the result.
///
/// On CUDA with a [`crate::model::ScoreModel`] the evaluations are one captured CUDA graph
/// replayed `steps` times (same results; see [`graph`]); otherwise, or if that fails, the eager
/// solvers ([`fast_sample_eager`]).
#[allow(clippy::too_many_arguments)]
pub fn fast_sample_from<B: Backend, S: ScoreFn<B> + 'static>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &FastConfig,
    steps: usize,
    x_t: &Tensor<B>,
    noise: &mut NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    let xh = start(backend, sde, y, cfg, steps, x_t)?;
    if let Some(x) = graph::try_fast_sample(backend, score, sde, y, cfg, steps, &xh, noise, observer)? {
        return Ok(x);
    }
    solve(backend, score, sde, y, cfg, steps, xh, noise, observer)
}

/// [`fast_sample`] with the eager solvers (a loop of backend ops) on any backend: no CUDA graph.
#[allow(clippy::too_many_arguments)]
pub fn fast_sample_eager<B: Backend, S: ScoreFn<B>>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &FastConfig,
    steps: usize,
    mut noise: NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    cfg.validate(steps)?;
    check_guide(y)?;
    let x_t = crate::model::prior_start(
        backend,
        score,
        &noise.next(backend, y.shape())?,
        sde.prior_std(),
        y,
    )?;
    let xh = start(backend, sde, y, cfg, steps, &x_t)?;
    solve(backend, score, sde, y, cfg, steps, xh, &mut noise, observer)
}

/// Check the run and map x_T to the solvers' x̂_T = x_T/α(1).
fn start<B: Backend>(
    backend: &B,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &FastConfig,
    steps: usize,
    x_t: &Tensor<B>,
) -> Result<Tensor<B>> {
    cfg.validate(steps)?;
    check_guide(y)?;
    if x_t.shape() != y.shape() {
        return Err(Error::shape(
            "fast_sample",
            format!("x_T {:?} vs guide {:?}", x_t.shape(), y.shape()),
        ));
    }
    backend.affine(x_t, 1.0 / schedule::alpha(sde, 1.0), 0.0)
}

/// The eager solvers from x̂_T.
#[allow(clippy::too_many_arguments)]
fn solve<B: Backend, S: ScoreFn<B>>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &FastConfig,
    steps: usize,
    xh: Tensor<B>,
    noise: &mut NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<B>> {
    let mut den = Denoiser {
        backend,
        score,
        sde,
        y,
        observer,
        done: 0,
        total: steps,
    };
    match cfg.solver {
        FastSolver::Heun => heun(&mut den, cfg, steps, xh, noise),
        FastSolver::Dpm { order } => dpm_multistep(&mut den, cfg, order, steps, xh, noise),
    }
}

fn check_guide<B: Backend>(y: &Tensor<B>) -> Result<()> {
    if y.shape().is_empty() || y.numel() == 0 {
        return Err(Error::shape(
            "fast_sample",
            format!("guide y must be a non-empty batch, got {:?}", y.shape()),
        ));
    }
    Ok(())
}

/// Evaluates D(x̂, σ̂) (one network evaluation) and reports it to the observer.
struct Denoiser<'a, B: Backend, S: ScoreFn<B>> {
    backend: &'a B,
    score: &'a S,
    sde: &'a Sde,
    y: &'a Tensor<B>,
    observer: &'a mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
    done: usize,
    total: usize,
}

impl<B: Backend, S: ScoreFn<B>> Denoiser<'_, B, S> {
    /// D = x̂ + σ̂²·α·s(α·x̂, t(σ̂)).
    fn eval(&mut self, xh: &Tensor<B>, sigma: f64) -> Result<Tensor<B>> {
        let t = schedule::time_of_sigma(self.sde, sigma);
        let a = schedule::alpha(self.sde, t);
        let x = if a == 1.0 {
            xh.clone()
        } else {
            self.backend.affine(xh, a, 0.0)?
        };
        let s = self.score.score(&x, self.y, t)?;
        let d = self.backend.axpby(1.0, xh, sigma * sigma * a, &s)?;
        (self.observer)(StepInfo {
            step: self.done,
            total: self.total,
            t,
            x: &x,
            x_mean: &d,
        })?;
        self.done += 1;
        Ok(d)
    }
}

/// Heun in σ̂ (Karras et al. 2022, Algorithms 1 and 2).
fn heun<B: Backend, S: ScoreFn<B>>(
    den: &mut Denoiser<'_, B, S>,
    cfg: &FastConfig,
    steps: usize,
    mut xh: Tensor<B>,
    noise: &mut NoiseStream,
) -> Result<Tensor<B>> {
    let be = den.backend;
    // Levels: (levels − 1) two-evaluation steps + the final one-evaluation step, with the first step
    // Euler when the budget is even.
    let (levels, euler_first) = match steps % 2 {
        1 => (steps.div_ceil(2), false),
        _ => (steps / 2 + 1, true),
    };
    let grid = schedule::sigma_grid(den.sde, levels, cfg.rho)?;
    for i in 0..levels - 1 {
        let (s_cur, s_next) = (grid[i], grid[i + 1]);
        let s_hat = if cfg.churn > 0.0 {
            (s_cur * (cfg.churn * (s_cur / s_next).ln()).exp()).min(grid[0])
        } else {
            s_cur
        };
        if s_hat > s_cur {
            let z = noise.next(be, xh.shape())?;
            xh = be.axpby(1.0, &xh, (s_hat * s_hat - s_cur * s_cur).sqrt(), &z)?;
        }
        let d = den.eval(&xh, s_hat)?;
        // Euler: x̂ + (σ̂' − σ̂)(x̂ − D)/σ̂.
        let r = s_next / s_hat;
        let x_euler = be.axpby(r, &xh, 1.0 - r, &d)?;
        xh = if !(euler_first && i == 0) {
            // Heun: x̂ + (σ̂' − σ̂)/2·[(x̂ − D)/σ̂ + (x̂_e − D')/σ̂'] = ½x̂ + (1 − σ̂/(2σ̂'))·x̂_e − (σ̂' − σ̂)/(2σ̂')·D'.
            let d2 = den.eval(&x_euler, s_next)?;
            let half = be.axpby(0.5, &xh, 1.0 - s_hat / (2.0 * s_next), &x_euler)?;
            be.axpby(1.0, &half, -(s_next - s_hat) / (2.0 * s_next), &d2)?
        } else {
            x_euler
        };
    }
    // Final step σ̂(eps) → 0: Euler lands on the denoiser.
    den.eval(&xh, grid[levels - 1])
}

/// DPM-Solver++(qM) in λ = −ln σ̂, one evaluation per level; the last level's D is the result.
fn dpm_multistep<B: Backend, S: ScoreFn<B>>(
    den: &mut Denoiser<'_, B, S>,
    cfg: &FastConfig,
    order: usize,
    steps: usize,
    mut xh: Tensor<B>,
    noise: &mut NoiseStream,
) -> Result<Tensor<B>> {
    let be = den.backend;
    let grid = schedule::sigma_grid(den.sde, steps, cfg.rho)?;
    let kappa = 1.0 + cfg.churn;
    // (λ_j, D_j) of the latest levels, newest first.
    let mut history: Vec<(f64, Tensor<B>)> = Vec::with_capacity(order);
    for i in 0..steps - 1 {
        let d = den.eval(&xh, grid[i])?;
        let lambda = -grid[i].ln();
        history.insert(0, (lambda, d));
        history.truncate(order);
        let h = (grid[i] / grid[i + 1]).ln();
        let nodes: Vec<f64> = history.iter().map(|(l, _)| kappa * (l - lambda)).collect();
        let w = expint::exp_weights(kappa * h, &nodes);
        let mut next = be.axpby((-kappa * h).exp(), &xh, w[0], &history[0].1)?;
        for (wj, (_, dj)) in w.iter().zip(&history).skip(1) {
            next = be.axpby(1.0, &next, *wj, dj)?;
        }
        if cfg.churn > 0.0 {
            let z = noise.next(be, xh.shape())?;
            let std = grid[i + 1] * (-(-2.0 * cfg.churn * h).exp_m1()).sqrt();
            next = be.axpby(1.0, &next, std, &z)?;
        }
        xh = next;
    }
    // Final step σ̂(eps) → 0: every order lands on the denoiser.
    den.eval(&xh, grid[steps - 1])
}
