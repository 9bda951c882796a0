//! Predictors: one step of the reverse-time SDE from t to the next grid point.
//!
//! With the SDE linear in x (f = c·x) each update is two `axpby`s: x̄ = a·x + b·s and x = x̄ + σ·z.
use super::Update;
use crate::backend::Backend;
use crate::error::Result;
use crate::sde::Sde;
use crate::tensor::Tensor;

/// Reverse diffusion (score_sde's `ReverseDiffusionPredictor`): reverses the SDE's own
/// discretisation (f = c·x, G) at t: x̄ = x − (f − G²·s) = (1 − c)·x + G²·s; x = x̄ + G·z.
/// For VE this is the SMLD ancestral step with the discrete σ table.
pub struct ReverseDiffusion;

impl ReverseDiffusion {
    /// Coefficients (a, b, σ) of x̄ = a·x + b·s, x = x̄ + σ·z at time t.
    pub fn coefficients(sde: &Sde, t: f64) -> (f64, f64, f64) {
        let d = sde.discretize(t);
        (1.0 - d.f_coef, d.g * d.g, d.g)
    }

    /// One update given the score `score` = s(x, t) and unit noise `noise`.
    pub fn update<B: Backend>(
        backend: &B,
        sde: &Sde,
        x: &Tensor<B>,
        score: &Tensor<B>,
        noise: &Tensor<B>,
        t: f64,
    ) -> Result<Update<B>> {
        let (a, b, sigma) = Self::coefficients(sde, t);
        affine_step(backend, x, score, noise, a, b, sigma)
    }
}

/// Euler–Maruyama on the reverse SDE (score_sde's `EulerMaruyamaPredictor`) with dt = −1/N — the
/// original's step, although the grid spacing is (1 − eps)/(N − 1):
/// x̄ = x + (c·x − g²·s)·dt; x = x̄ + g·√(−dt)·z.
pub struct EulerMaruyama;

impl EulerMaruyama {
    /// Coefficients (a, b, σ) of x̄ = a·x + b·s, x = x̄ + σ·z at time t.
    pub fn coefficients(sde: &Sde, t: f64) -> (f64, f64, f64) {
        let dt = -1.0 / sde.n() as f64;
        let (c, g) = (sde.drift_coef(t), sde.diffusion(t));
        (1.0 + c * dt, -g * g * dt, g * (-dt).sqrt())
    }

    /// One update given the score `score` = s(x, t) and unit noise `noise`.
    pub fn update<B: Backend>(
        backend: &B,
        sde: &Sde,
        x: &Tensor<B>,
        score: &Tensor<B>,
        noise: &Tensor<B>,
        t: f64,
    ) -> Result<Update<B>> {
        let (a, b, sigma) = Self::coefficients(sde, t);
        affine_step(backend, x, score, noise, a, b, sigma)
    }
}

/// No predictor: x is left as it is (x̄ = x) and no score is evaluated.
pub struct NonePredictor;

impl NonePredictor {
    pub fn update<B: Backend>(x: &Tensor<B>) -> Update<B> {
        Update {
            x: x.clone(),
            x_mean: x.clone(),
        }
    }
}

/// x̄ = a·x + b·s; x' = x̄ + σ·z.
fn affine_step<B: Backend>(
    backend: &B,
    x: &Tensor<B>,
    score: &Tensor<B>,
    noise: &Tensor<B>,
    a: f64,
    b: f64,
    sigma: f64,
) -> Result<Update<B>> {
    let x_mean = backend.axpby(a, x, b, score)?;
    let x = backend.axpby(1.0, &x_mean, sigma, noise)?;
    Ok(Update { x, x_mean })
}
