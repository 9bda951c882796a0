//! The optimiser state where the training runs: Adam's moments and the EMA shadow as backend
//! tensors, updated by the fused list ops `Backend::adam_update_many` / `Backend::ema_update_many`
//! (a few multi-tensor kernel launches per step on CUDA), so a step never copies weights,
//! gradients or moments to the host. The only transfer is the per-tensor Σg² of the global
//! grad-norm clip (one small download per step).
//!
//! The schedule is that of the host [`Adam`] / [`Ema`] in [`crate::train::optim`] — the same
//! order of tensors, the same f64 norm, clip scale, warm-up lr, step and decay counters — and the
//! per-element arithmetic is the same function on the CPU backend, so a CPU run is bit-identical
//! to the host optimiser. [`DeviceAdam::upload`] / [`DeviceAdam::download`] (and the EMA's)
//! convert to and from the host types, which are the checkpoint format.
use std::collections::{BTreeMap, HashMap};

use crate::backend::{AdamStep, Backend};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::optim::{self, Adam, AdamConfig, Ema};

/// What one Adam step did (as [`optim::Adam::step`] reports it).
pub use crate::train::optim::AdamStep as AdamReport;

/// Adam over named parameters, its moments on the backend.
pub struct DeviceAdam<B: Backend> {
    pub config: AdamConfig,
    /// Updates applied so far (torch's per-parameter `step`, shared by all parameters).
    pub steps: u64,
    /// First and second moments by parameter name (sorted, as the host [`Adam`]).
    m: BTreeMap<String, Tensor<B>>,
    v: BTreeMap<String, Tensor<B>>,
}

fn upload_map<B: Backend>(
    be: &B,
    what: &str,
    data: &BTreeMap<String, Vec<f32>>,
    shapes: &BTreeMap<String, Tensor<B>>,
) -> Result<BTreeMap<String, Tensor<B>>> {
    data.iter()
        .map(|(name, d)| {
            let p = shapes
                .get(name)
                .ok_or_else(|| Error::Other(format!("{what} state for unknown parameter `{name}`")))?;
            Ok((name.clone(), be.from_f32(p.shape(), d)?))
        })
        .collect()
}

fn download_map<B: Backend>(be: &B, map: &BTreeMap<String, Tensor<B>>) -> Result<BTreeMap<String, Vec<f32>>> {
    map.iter().map(|(n, t)| Ok((n.clone(), be.to_f32(t)?))).collect()
}

impl<B: Backend> DeviceAdam<B> {
    /// Zero moments for each named parameter in `params` (shapes taken from there).
    pub fn new<'a>(
        be: &B,
        config: AdamConfig,
        params: impl IntoIterator<Item = (&'a String, &'a Tensor<B>)>,
    ) -> Result<Self> {
        let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
        for (name, p) in params {
            m.insert(name.clone(), be.zeros(p.shape())?);
            v.insert(name.clone(), be.zeros(p.shape())?);
        }
        Ok(DeviceAdam {
            config,
            steps: 0,
            m,
            v,
        })
    }

    /// The host state on the backend; `params` gives each moment its parameter's shape.
    pub fn upload(be: &B, adam: &Adam, params: &BTreeMap<String, Tensor<B>>) -> Result<Self> {
        Ok(DeviceAdam {
            config: adam.config.clone(),
            steps: adam.steps,
            m: upload_map(be, "adam_m", &adam.m, params)?,
            v: upload_map(be, "adam_v", &adam.v, params)?,
        })
    }

    /// A host copy (for checkpoints).
    pub fn download(&self, be: &B) -> Result<Adam> {
        Ok(Adam {
            config: self.config.clone(),
            steps: self.steps,
            m: download_map(be, &self.m)?,
            v: download_map(be, &self.v)?,
        })
    }

    /// Names of the parameters Adam updates, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.m.keys()
    }

    /// Clip the gradients globally and apply one Adam update to every tracked parameter of
    /// `params` (replaced in place by the updated tensors). `completed` is the number of training
    /// steps before this one (drives the warm-up). Exactly [`Adam::step`]'s schedule; the global
    /// norm is the one download of the step.
    pub fn step(
        &mut self,
        be: &B,
        params: &mut BTreeMap<String, Tensor<B>>,
        grads: &HashMap<String, Tensor<B>>,
        completed: u64,
    ) -> Result<AdamReport> {
        let (gs, hp, report) = self.prepare(be, params, grads, completed)?;
        // One list update over all parameters (a few launches on a device), in name order.
        let ps: Vec<&Tensor<B>> = self.m.keys().map(|name| &params[name]).collect();
        let ms: Vec<&Tensor<B>> = self.m.values().collect();
        let vs = self
            .m
            .keys()
            .map(|name| {
                self.v
                    .get(name)
                    .ok_or_else(|| Error::Other(format!("optimizer: no second moment for `{name}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let updated = be.adam_update_many(&ps, &gs, &ms, &vs, &hp)?;
        if updated.len() != self.m.len() {
            return Err(Error::Backend(format!(
                "adam_update_many returned {} updates for {} parameters",
                updated.len(),
                self.m.len()
            )));
        }
        for ((name, m), (p2, m2, v2)) in self.m.iter_mut().zip(updated) {
            *params.get_mut(name).expect("checked above") = p2;
            *m = m2;
            *self.v.get_mut(name).expect("checked above") = v2;
        }
        self.steps += 1;
        Ok(report)
    }

    /// [`DeviceAdam::step`] and then [`DeviceEma::update`] towards the updated parameters, in one
    /// backend call that updates the tensors in place where nothing else holds them
    /// (`Backend::adam_ema_update_many`): the same bits as the two calls. Returns the Adam report
    /// and the EMA decay used. An EMA over other parameters than Adam's takes the two calls.
    pub fn step_with_ema(
        &mut self,
        be: &B,
        params: &mut BTreeMap<String, Tensor<B>>,
        grads: &HashMap<String, Tensor<B>>,
        completed: u64,
        ema: &mut DeviceEma<B>,
    ) -> Result<(AdamReport, f64)> {
        if !ema.shadow.keys().eq(self.m.keys()) || !self.v.keys().eq(self.m.keys()) {
            let report = self.step(be, params, grads, completed)?;
            let decay = ema.update(be, params)?;
            return Ok((report, decay));
        }
        let (gs, hp, report) = self.prepare(be, params, grads, completed)?;
        let decay = ema.next_decay();
        // The parameters Adam updates, in its (name) order: both maps are sorted by name, and
        // `prepare` found every one of Adam's names among them, so the four lists line up (v and
        // the shadow have Adam's names: checked above).
        let mut ps: Vec<&mut Tensor<B>> = params
            .iter_mut()
            .filter(|(name, _)| self.m.contains_key(*name))
            .map(|(_, p)| p)
            .collect();
        let mut ms: Vec<&mut Tensor<B>> = self.m.values_mut().collect();
        let mut vs: Vec<&mut Tensor<B>> = self.v.values_mut().collect();
        let mut ss: Vec<&mut Tensor<B>> = ema.shadow.values_mut().collect();
        be.adam_ema_update_many(&mut ps, &gs, &mut ms, &mut vs, &mut ss, &hp, decay)?;
        self.steps += 1;
        ema.updates += 1;
        Ok((report, decay))
    }

    /// What a step needs before the update: each parameter's gradient in name order (checked
    /// against the parameter's and moments' shapes), the clip and schedule as an [`AdamStep`],
    /// and the report of the step.
    #[allow(clippy::type_complexity)]
    fn prepare<'g>(
        &self,
        be: &B,
        params: &BTreeMap<String, Tensor<B>>,
        grads: &'g HashMap<String, Tensor<B>>,
        completed: u64,
    ) -> Result<(Vec<&'g Tensor<B>>, AdamStep, AdamReport)> {
        let mut gs = Vec::with_capacity(self.m.len());
        for (name, m) in &self.m {
            let g = grads
                .get(name)
                .ok_or_else(|| Error::Other(format!("optimizer: no gradient for `{name}`")))?;
            let p = params
                .get(name)
                .ok_or_else(|| Error::Other(format!("optimizer: no parameter `{name}`")))?;
            if g.shape() != m.shape() || p.shape() != m.shape() {
                return Err(Error::shape("adam", format!("`{name}`: shapes differ")));
            }
            gs.push(g);
        }
        let c = &self.config;
        // As optim::global_norm: per-tensor f64 sums (fixed lanes) in name order, summed, square root.
        let norm = be.squared_norms(&gs)?.iter().sum::<f64>().sqrt();
        let scale = optim::clip_scale(norm, c.grad_clip);
        let lr = optim::scheduled_lr(c, completed);
        let hp = AdamStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            step: self.steps + 1,
            grad_scale: scale,
        };
        Ok((
            gs,
            hp,
            AdamReport {
                lr,
                grad_norm: norm,
                clip_scale: scale,
            },
        ))
    }
}

/// The EMA of the trainable weights, its shadow on the backend.
pub struct DeviceEma<B: Backend> {
    pub rate: f64,
    /// Updates applied so far (`num_updates`).
    pub updates: u64,
    shadow: BTreeMap<String, Tensor<B>>,
}

impl<B: Backend> DeviceEma<B> {
    /// Start from the named parameters themselves (tensors are immutable: no copy is made).
    pub fn new<'a>(rate: f64, params: impl IntoIterator<Item = (&'a String, &'a Tensor<B>)>) -> Self {
        DeviceEma {
            rate,
            updates: 0,
            shadow: params.into_iter().map(|(n, t)| (n.clone(), t.clone())).collect(),
        }
    }

    /// The host state on the backend; `params` gives each shadow tensor its shape.
    pub fn upload(be: &B, ema: &Ema, params: &BTreeMap<String, Tensor<B>>) -> Result<Self> {
        Ok(DeviceEma {
            rate: ema.rate,
            updates: ema.updates,
            shadow: upload_map(be, "ema", &ema.shadow, params)?,
        })
    }

    /// A host copy (for checkpoints).
    pub fn download(&self, be: &B) -> Result<Ema> {
        Ok(Ema {
            rate: self.rate,
            updates: self.updates,
            shadow: download_map(be, &self.shadow)?,
        })
    }

    /// The shadow tensors by parameter name.
    pub fn shadow(&self) -> &BTreeMap<String, Tensor<B>> {
        &self.shadow
    }

    /// The decay the next update will use.
    pub fn next_decay(&self) -> f64 {
        optim::ema_decay(self.rate, self.updates)
    }

    /// Move every shadow tensor towards the current parameter; returns the decay used.
    pub fn update(&mut self, be: &B, params: &BTreeMap<String, Tensor<B>>) -> Result<f64> {
        for (name, s) in &self.shadow {
            match params.get(name) {
                Some(p) if p.shape() == s.shape() => {}
                _ => {
                    return Err(Error::Other(format!(
                        "EMA: parameter `{name}` missing or resized"
                    )))
                }
            }
        }
        let decay = self.next_decay();
        let shadows: Vec<&Tensor<B>> = self.shadow.values().collect();
        let ps: Vec<&Tensor<B>> = self.shadow.keys().map(|name| &params[name]).collect();
        let updated = be.ema_update_many(&shadows, &ps, decay)?;
        if updated.len() != self.shadow.len() {
            return Err(Error::Backend(format!(
                "ema_update_many returned {} tensors for {} shadows",
                updated.len(),
                self.shadow.len()
            )));
        }
        for (s, s2) in self.shadow.values_mut().zip(updated) {
            *s = s2;
        }
        self.updates += 1;
        Ok(decay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;
    use crate::rng;

    fn draw(n: usize, s: f32, seed: u64) -> Vec<f32> {
        (0..n as u64).map(|i| s * rng::normal(seed, i)).collect()
    }

    fn bits<B: Backend>(be: &B, t: &Tensor<B>) -> Vec<u32> {
        be.to_f32(t).unwrap().iter().map(|x| x.to_bits()).collect()
    }

    fn refs<B: Backend>(x: &[Tensor<B>]) -> Vec<&Tensor<B>> {
        x.iter().collect()
    }

    fn mutable<B: Backend>(ts: &mut [Tensor<B>]) -> Vec<&mut Tensor<B>> {
        ts.iter_mut().collect()
    }

    fn hp() -> AdamStep {
        AdamStep {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 5,
            grad_scale: 0.4,
        }
    }

    /// The list ops (the default implementation) give element for element the per-tensor ops'
    /// bits, empty tensors included, and reject lists of different lengths or mismatched shapes.
    #[test]
    fn list_updates_are_the_per_tensor_updates() {
        let be = CpuF32::new();
        let shapes: [&[usize]; 5] = [&[3, 2], &[0], &[5000], &[1], &[4, 0, 2]];
        let t = |shape: &[usize], s: f32, seed: u64| {
            let n = shape.iter().product();
            let mut d = draw(n, s, seed);
            if s < 0.02 {
                d.iter_mut().for_each(|x| *x = x.abs()); // second moments are non-negative
            }
            be.from_f32(shape, &d).unwrap()
        };
        let [p, g, m, v, s]: [Vec<Tensor<CpuF32>>; 5] = std::array::from_fn(|k| {
            let scale = [0.1, 1.0, 0.05, 0.01, 0.3][k];
            shapes
                .iter()
                .enumerate()
                .map(|(i, sh)| t(sh, scale, (10 * k + i) as u64))
                .collect()
        });

        let many = be
            .adam_update_many(&refs(&p), &refs(&g), &refs(&m), &refs(&v), &hp())
            .unwrap();
        assert_eq!(many.len(), shapes.len());
        for (i, (p2, m2, v2)) in many.iter().enumerate() {
            let (p1, m1, v1) = be.adam_update(&p[i], &g[i], &m[i], &v[i], &hp()).unwrap();
            assert_eq!(p2.shape(), shapes[i]);
            assert_eq!(bits(&be, p2), bits(&be, &p1), "p' of tensor {i}");
            assert_eq!(bits(&be, m2), bits(&be, &m1), "m' of tensor {i}");
            assert_eq!(bits(&be, v2), bits(&be, &v1), "v' of tensor {i}");
        }
        assert_ne!(
            bits(&be, &many[2].0),
            bits(&be, &p[2]),
            "the update moved the weights"
        );

        let ema = be.ema_update_many(&refs(&s), &refs(&p), 0.99).unwrap();
        assert_eq!(ema.len(), shapes.len());
        for (i, s2) in ema.iter().enumerate() {
            let s1 = be.ema_update(&s[i], &p[i], 0.99).unwrap();
            assert_eq!(bits(&be, s2), bits(&be, &s1), "shadow of tensor {i}");
        }

        // Bad lists: different lengths, a mismatched shape, invalid settings.
        let short = refs(&g[..4]);
        assert!(be
            .adam_update_many(&refs(&p), &short, &refs(&m), &refs(&v), &hp())
            .is_err());
        let mut swapped = refs(&g);
        swapped.swap(0, 2);
        assert!(be
            .adam_update_many(&refs(&p), &swapped, &refs(&m), &refs(&v), &hp())
            .is_err());
        let step0 = AdamStep { step: 0, ..hp() };
        assert!(be
            .adam_update_many(&refs(&p), &refs(&g), &refs(&m), &refs(&v), &step0)
            .is_err());
        assert!(be.ema_update_many(&refs(&s), &refs(&p[1..]), 0.9).is_err());
        assert!(be.ema_update_many(&refs(&s), &swapped, 0.9).is_err());
        assert!(be.ema_update_many(&refs(&s), &refs(&p), 1.5).is_err());
        assert!(be.adam_update_many(&[], &[], &[], &[], &hp()).unwrap().is_empty());
        assert!(be.ema_update_many(&[], &[], 0.9).unwrap().is_empty());
    }

    /// `adam_ema_update_many` gives the bits of `adam_update_many` followed by `ema_update_many`
    /// towards the updated parameters; it updates unshared buffers in place (same allocation) and
    /// leaves tensors that share a buffer with the ones it was given untouched; a bad list
    /// replaces nothing.
    #[test]
    fn in_place_adam_and_ema_are_the_two_list_ops() {
        let be = CpuF32::new();
        let shapes: [&[usize]; 4] = [&[3, 2], &[0], &[9000], &[1]];
        let host: [Vec<Vec<f32>>; 5] = std::array::from_fn(|k| {
            let scale = [0.1, 1.0, 0.05, 0.01, 0.3][k];
            shapes
                .iter()
                .enumerate()
                .map(|(i, sh)| {
                    let d = draw(sh.iter().product(), scale, (10 * k + i) as u64);
                    if k == 3 {
                        d.iter().map(|x| x.abs()).collect()
                    } else {
                        d
                    }
                })
                .collect()
        });
        let make = |k: usize| -> Vec<Tensor<CpuF32>> {
            shapes
                .iter()
                .zip(&host[k])
                .map(|(sh, d)| be.from_f32(sh, d).unwrap())
                .collect()
        };
        let [p, g, m, v, s]: [Vec<Tensor<CpuF32>>; 5] = std::array::from_fn(make);
        let adam = be
            .adam_update_many(&refs(&p), &refs(&g), &refs(&m), &refs(&v), &hp())
            .unwrap();
        let new_p: Vec<&Tensor<CpuF32>> = adam.iter().map(|u| &u.0).collect();
        let ema = be.ema_update_many(&refs(&s), &new_p, 0.97).unwrap();

        for shared in [false, true] {
            let [mut p2, g2, mut m2, mut v2, mut s2]: [Vec<Tensor<CpuF32>>; 5] = std::array::from_fn(make);
            // Shared: other tensors hold the same buffers (as the EMA's shadow and the weights at
            // the start of a run); they must keep their values.
            let held = shared.then(|| (p2.clone(), m2.clone(), v2.clone(), s2.clone()));
            let before: Vec<*const f32> = p2.iter().map(|t| t.buf().as_ptr()).collect();
            be.adam_ema_update_many(
                &mut mutable(&mut p2),
                &refs(&g2),
                &mut mutable(&mut m2),
                &mut mutable(&mut v2),
                &mut mutable(&mut s2),
                &hp(),
                0.97,
            )
            .unwrap();
            for i in 0..shapes.len() {
                assert_eq!(p2[i].shape(), shapes[i]);
                assert_eq!(
                    bits(&be, &p2[i]),
                    bits(&be, &adam[i].0),
                    "p' of {i}, shared {shared}"
                );
                assert_eq!(
                    bits(&be, &m2[i]),
                    bits(&be, &adam[i].1),
                    "m' of {i}, shared {shared}"
                );
                assert_eq!(
                    bits(&be, &v2[i]),
                    bits(&be, &adam[i].2),
                    "v' of {i}, shared {shared}"
                );
                assert_eq!(
                    bits(&be, &s2[i]),
                    bits(&be, &ema[i]),
                    "shadow of {i}, shared {shared}"
                );
                let in_place = p2[i].buf().as_ptr() == before[i];
                if shapes[i].iter().product::<usize>() > 0 {
                    assert_eq!(
                        in_place, !shared,
                        "tensor {i}: in place {in_place}, shared {shared}"
                    );
                }
            }
            if let Some((hp_, hm, hv, hs)) = held {
                for (k, ts) in [(0, hp_), (2, hm), (3, hv), (4, hs)] {
                    for (i, t) in ts.iter().enumerate() {
                        assert_eq!(be.to_f32(t).unwrap(), host[k][i], "held tensor {k}/{i} changed");
                    }
                }
            }
        }

        // A list of another length replaces nothing.
        let [mut p3, g3, mut m3, mut v3, mut s3]: [Vec<Tensor<CpuF32>>; 5] = std::array::from_fn(make);
        let err = be.adam_ema_update_many(
            &mut mutable(&mut p3),
            &refs(&g3),
            &mut mutable(&mut m3),
            &mut mutable(&mut v3),
            &mut mutable(&mut s3)[1..],
            &hp(),
            0.97,
        );
        assert!(err.is_err());
        assert_eq!(be.to_f32(&p3[2]).unwrap(), host[0][2]);
        assert_eq!(be.to_f32(&s3[0]).unwrap(), host[4][0]);
    }
}
