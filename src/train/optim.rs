//! The optimiser of the original `losses.optimization_manager` + `models/ema.py`:
//!
//! * learning rate lr·min(step/warmup, 1) where `step` counts the steps completed *before* this
//!   one (`state['step']` is incremented after `optimize_fn`), so the very first update uses lr = 0:
//!   it still advances Adam's moments and step count but leaves the weights unchanged; beyond the
//!   original, an optional cosine decay ([`LrDecay`], `train --lr-decay`) takes over from its
//!   first step on (the original keeps lr constant);
//! * `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the global L2 norm over all gradients,
//!   every gradient multiplied by min(max_norm / (norm + 1e-6), 1);
//! * `torch.optim.Adam` (no weight decay, bias-corrected, single-tensor float32 arithmetic);
//! * EMA of the trainable weights with decay min(rate, (1 + k)/(10 + k)), where k is the number of
//!   EMA updates *including* this one (the original increments `num_updates` first), so the
//!   first update uses 2/11. The frozen Fourier W is excluded (it has no gradient).
//!
//! The per-element arithmetic lives in [`adam_update`] and [`ema_update`] (host slices, defined
//! with the CPU backend); the trainer runs the same arithmetic on its backend through
//! `Backend::adam_update` / `Backend::ema_update` (fused kernels on CUDA), and this host-side
//! [`Adam`] / [`Ema`] is the checkpoint format and the reference they are tested against.
use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// Adam's hyper-parameters plus the schedule and clip of `optimization_manager`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Warm-up length in steps; 0 disables the warm-up.
    pub warmup: u64,
    /// Max global grad norm; negative disables clipping.
    pub grad_clip: f64,
    /// A decay of the learning rate after the warm-up (None: constant, as the original).
    pub decay: Option<LrDecay>,
}

/// A half-cosine decay of the learning rate from `from` at completed step `start` to `to` at
/// `start + steps`, and `to` after it. Not in the original (its lr is constant after the warm-up):
/// a run trained at a constant lr on small batches stops improving at a noise floor that a lower lr
/// gets under, so a run that has plateaued is annealed (`train --lr-decay`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrDecay {
    pub start: u64,
    pub steps: u64,
    pub from: f64,
    pub to: f64,
}

impl LrDecay {
    /// The learning rate after `completed` steps (`from` before the decay starts).
    pub fn lr(&self, completed: u64) -> f64 {
        if completed <= self.start {
            return self.from;
        }
        let done = ((completed - self.start) as f64 / self.steps.max(1) as f64).min(1.0);
        self.to + (self.from - self.to) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
    }

    pub fn validate(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if self.steps == 0 || !ok(self.from) || !ok(self.to) {
            return Err(Error::Config(format!(
                "learning-rate decay over {} steps from {} to {}: needs ≥ 1 step and finite rates ≥ 0",
                self.steps, self.from, self.to
            )));
        }
        Ok(())
    }
}

/// The learning rate of the update that follows `completed` earlier steps: the warm-up, then the
/// decay once it has started.
pub fn scheduled_lr(c: &AdamConfig, completed: u64) -> f64 {
    match c.decay {
        Some(d) if completed >= d.start => d.lr(completed),
        _ => warmup_lr(c.lr, c.warmup, completed),
    }
}

/// The learning rate of the update that follows `completed` earlier steps.
pub fn warmup_lr(lr: f64, warmup: u64, completed: u64) -> f64 {
    if warmup == 0 {
        lr
    } else {
        lr * (completed as f64 / warmup as f64).min(1.0)
    }
}

/// Global L2 norm over a set of gradients (accumulated in f64).
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    grads
        .into_iter()
        .map(crate::backend::cpu::optim::squared_norm)
        .sum::<f64>()
        .sqrt()
}

/// `clip_grad_norm_`'s multiplier for a gradient norm: min(max_norm/(norm + 1e-6), 1); 1 when
/// clipping is disabled (max_norm < 0).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm < 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}

/// The per-element arithmetic: torch's single-tensor Adam and the EMA step, on host slices. They
/// live with the CPU backend (the twins of the CUDA kernels in kernels/optim.cu) and are
/// re-exported here, where the schedule around them is.
pub use crate::backend::cpu::optim::{adam_update, ema_update};

/// The EMA decay of the update that follows `updates` earlier ones: min(rate, (1 + k)/(10 + k))
/// with k = updates + 1 (the original counts this update first).
pub fn ema_decay(rate: f64, updates: u64) -> f64 {
    let k = (updates + 1) as f64;
    rate.min((1.0 + k) / (10.0 + k))
}

/// What one Adam step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate used (after warm-up).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Multiplier applied to the gradients by the clip.
    pub clip_scale: f64,
}

/// Adam state over named tensors: first and second moments and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub config: AdamConfig,
    /// Number of updates applied so far (torch's per-parameter `step`; all parameters share it).
    pub steps: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl Adam {
    /// Zero moments for each `(name, numel)`.
    pub fn new(config: AdamConfig, params: impl IntoIterator<Item = (String, usize)>) -> Adam {
        let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
        for (name, n) in params {
            m.insert(name.clone(), vec![0.0; n]);
            v.insert(name, vec![0.0; n]);
        }
        Adam {
            config,
            steps: 0,
            m,
            v,
        }
    }

    /// Clip the gradients globally and apply one Adam update to every parameter Adam tracks.
    /// `completed` is the number of training steps before this one (drives the warm-up).
    /// Every tracked parameter must have a gradient (the original's params all receive one).
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, HostTensor>,
        grads: &BTreeMap<String, Vec<f32>>,
        completed: u64,
    ) -> Result<AdamStep> {
        for (name, m) in &self.m {
            let g = grads
                .get(name)
                .ok_or_else(|| Error::Other(format!("optimizer: no gradient for `{name}`")))?;
            let p = params
                .get(name)
                .ok_or_else(|| Error::Other(format!("optimizer: no parameter `{name}`")))?;
            if g.len() != m.len() || p.data.len() != m.len() {
                return Err(Error::shape("adam", format!("`{name}`: sizes differ")));
            }
        }
        let c = &self.config;
        let norm = global_norm(self.m.keys().map(|n| grads[n].as_slice()));
        let scale = clip_scale(norm, c.grad_clip);
        let lr = scheduled_lr(c, completed);
        self.steps += 1;
        for (name, m) in self.m.iter_mut() {
            let v = self.v.get_mut(name).expect("m and v share keys");
            let p = params.get_mut(name).expect("checked above");
            adam_update(
                &mut p.data,
                &grads[name],
                m,
                v,
                scale as f32,
                lr,
                c.beta1,
                c.beta2,
                c.eps,
                self.steps,
            );
        }
        Ok(AdamStep {
            lr,
            grad_norm: norm,
            clip_scale: scale,
        })
    }
}

/// Exponential moving average of the trainable weights (`models/ema.py`).
#[derive(Clone, Debug, PartialEq)]
pub struct Ema {
    pub rate: f64,
    /// Updates applied so far (`num_updates`).
    pub updates: u64,
    pub shadow: BTreeMap<String, Vec<f32>>,
}

impl Ema {
    /// Start from a copy of the named parameters.
    pub fn new<'a>(rate: f64, params: impl IntoIterator<Item = (&'a String, &'a HostTensor)>) -> Ema {
        let shadow = params
            .into_iter()
            .map(|(n, t)| (n.clone(), t.data.clone()))
            .collect();
        Ema {
            rate,
            updates: 0,
            shadow,
        }
    }

    /// The decay the next update will use.
    pub fn next_decay(&self) -> f64 {
        ema_decay(self.rate, self.updates)
    }

    /// Move every shadow tensor towards the current parameter; returns the decay used.
    pub fn update(&mut self, params: &BTreeMap<String, HostTensor>) -> Result<f64> {
        for (name, s) in &self.shadow {
            match params.get(name) {
                Some(p) if p.data.len() == s.len() => {}
                _ => {
                    return Err(Error::Other(format!(
                        "EMA: parameter `{name}` missing or resized"
                    )))
                }
            }
        }
        let decay = self.next_decay();
        self.updates += 1;
        for (name, s) in self.shadow.iter_mut() {
            ema_update(s, &params[name].data, decay);
        }
        Ok(decay)
    }
}
