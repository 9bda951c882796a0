//! A small tape-based reverse-mode autograd over the [`Backend`] ops.
//!
//! A [`Graph`] either records (training: every op pushes a backward closure holding what it needs)
//! or does not (inference: ops just compute, intermediates are freed as soon as the last `Var`
//! holding them drops — no tape, no saved activations). Model code is written once against `Graph`.
use std::cell::RefCell;
use std::collections::HashMap;

use crate::backend::{channel_counts, Backend, ConvEpilogue, Fir, PartsGrads, UpFirDn};
use crate::error::{Error, Result};
use crate::tensor::{same_shape, Tensor};

/// A value in a graph, with the id of its tape node when it takes part in differentiation.
#[derive(Clone)]
pub struct Var<B: Backend> {
    pub value: Tensor<B>,
    node: Option<usize>,
}

impl<B: Backend> Var<B> {
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    /// True when gradients flow through this value.
    pub fn tracked(&self) -> bool {
        self.node.is_some()
    }
}

/// One gradient per input of a node (None where an input needs none).
type InputGrads<B> = Vec<Option<Tensor<B>>>;
type BackwardFn<B> = Box<dyn Fn(&B, &Tensor<B>) -> Result<InputGrads<B>>>;

struct Node<B: Backend> {
    inputs: Vec<Option<usize>>,
    backward: Option<BackwardFn<B>>, // None for leaves (parameters)
    /// Per input: the constant factor its gradient carries on top of what `backward` returns
    /// (1 for most ops; the skip connection's 1/√2, a `scale`'s s). Kept as a pending factor
    /// instead of a pass over the gradient: see [`Graph::backward`].
    scales: Vec<f64>,
}

/// A gradient and the constant factor it still has to be multiplied by.
struct Pending<B: Backend> {
    grad: Tensor<B>,
    scale: f64,
}

/// Gradients after `Graph::backward`, by parameter name.
pub struct Gradients<B: Backend> {
    pub by_name: HashMap<String, Tensor<B>>,
}

pub struct Graph<B: Backend> {
    backend: B,
    recording: bool,
    nodes: RefCell<Vec<Node<B>>>,
    params: RefCell<HashMap<String, usize>>,
    /// Whether `backward` keeps constant factors pending (the CPU) or applies them node by node.
    defer_factors: bool,
}

impl<B: Backend> Graph<B> {
    /// A graph that keeps no tape: for inference.
    pub fn inference(backend: &B) -> Self {
        Self::new(backend, false)
    }
    /// A graph that records every op for `backward`: for training and gradient checks.
    pub fn training(backend: &B) -> Self {
        Self::new(backend, true)
    }
    fn new(backend: &B, recording: bool) -> Self {
        Graph {
            backend: backend.clone(),
            recording,
            nodes: RefCell::new(Vec::new()),
            params: RefCell::new(HashMap::new()),
            defer_factors: backend.is_cpu(),
        }
    }
    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// A constant input (never differentiated).
    pub fn constant(&self, t: Tensor<B>) -> Var<B> {
        Var { value: t, node: None }
    }

    /// A named trainable parameter: a leaf whose gradient `backward` reports under `name`.
    /// Asking twice for the same name returns the same leaf.
    pub fn param(&self, name: &str, t: &Tensor<B>) -> Var<B> {
        if !self.recording {
            return Var {
                value: t.clone(),
                node: None,
            };
        }
        if let Some(&id) = self.params.borrow().get(name) {
            return Var {
                value: t.clone(),
                node: Some(id),
            };
        }
        let id = self.push(Vec::new(), None, Vec::new());
        self.params.borrow_mut().insert(name.to_string(), id);
        Var {
            value: t.clone(),
            node: Some(id),
        }
    }

    fn push(&self, inputs: Vec<Option<usize>>, backward: Option<BackwardFn<B>>, scales: Vec<f64>) -> usize {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            inputs,
            backward,
            scales,
        });
        nodes.len() - 1
    }

    /// Whether an op on these inputs goes on the tape (recording, and some input tracked).
    fn records(&self, inputs: &[&Var<B>]) -> bool {
        self.recording && inputs.iter().any(|v| v.tracked())
    }

    /// Record an op's result. `backward` maps dL/d(out) to dL/d(input_k) for each input (None where
    /// an input needs no gradient). Nothing is recorded when no input is tracked.
    fn record(
        &self,
        value: Tensor<B>,
        inputs: &[&Var<B>],
        backward: impl Fn(&B, &Tensor<B>) -> Result<Vec<Option<Tensor<B>>>> + 'static,
    ) -> Var<B> {
        self.record_scaled(value, inputs, vec![1.0; inputs.len()], backward)
    }

    /// [`Graph::record`] for an op whose input k's gradient is `scales[k]` times what `backward`
    /// returns for it: the factor stays pending (no pass over the gradient for it).
    fn record_scaled(
        &self,
        value: Tensor<B>,
        inputs: &[&Var<B>],
        scales: Vec<f64>,
        backward: impl Fn(&B, &Tensor<B>) -> Result<Vec<Option<Tensor<B>>>> + 'static,
    ) -> Var<B> {
        debug_assert_eq!(scales.len(), inputs.len());
        if !self.records(inputs) {
            return Var { value, node: None };
        }
        let ids = inputs.iter().map(|v| v.node).collect();
        let id = self.push(ids, Some(Box::new(backward)), scales);
        Var {
            value,
            node: Some(id),
        }
    }

    /// Reverse pass from a scalar-per-sample or scalar output `out`, seeded with `seed`
    /// (dL/d(out), same shape as out). Returns the gradient of every parameter reached.
    ///
    /// Every gradient travels with a pending constant factor: a backward rule is linear in the
    /// upstream gradient, so a node runs on the bare gradient and its inputs' factors multiply
    /// (the 1/√2 of every skip connection costs no pass). Two gradients meeting with the same
    /// factor (the two branches of a residual block) add as they are; with different factors they
    /// are combined in one axpby. A parameter's gradient is multiplied by its factor at the end,
    /// all in one `scale_many`.
    ///
    /// That is the CPU's way (a pass over a 128×128 gradient saved per skip connection). A device
    /// applies each node's factors as it goes instead (one pass over the incoming gradient when they
    /// are all equal, as before), because its `scale_many` would still cost a launch per
    /// parameter at the end.
    pub fn backward(&self, out: &Var<B>, seed: Tensor<B>) -> Result<Gradients<B>> {
        let lazy = self.defer_factors;
        let root = out
            .node
            .ok_or_else(|| Error::Other("backward: output is not tracked".into()))?;
        same_shape("backward seed", out.shape(), seed.shape())?;
        let nodes = self.nodes.borrow();
        let be = &self.backend;
        let mut grads: Vec<Option<Pending<B>>> = (0..=root).map(|_| None).collect();
        grads[root] = Some(Pending {
            grad: seed,
            scale: 1.0,
        });
        for id in (0..=root).rev() {
            let Some(g) = grads[id].take() else { continue };
            let node = &nodes[id];
            let Some(bw) = &node.backward else {
                grads[id] = Some(g); // leaf: keep
                continue;
            };
            let (input_grads, factors) = if lazy {
                (bw(be, &g.grad)?, node.scales.clone())
            } else {
                apply_factors(be, bw, &g.grad, &node.scales)?
            };
            for ((inp, ig), &factor) in node.inputs.iter().zip(input_grads).zip(&factors) {
                if let (Some(i), Some(ig)) = (inp, ig) {
                    let scale = g.scale * factor;
                    grads[*i] = Some(match grads[*i].take() {
                        Some(acc) if acc.scale == scale => Pending {
                            grad: be.add_into(acc.grad, &ig)?,
                            scale,
                        },
                        Some(acc) => Pending {
                            grad: be.axpby_into(acc.scale, acc.grad, scale, &ig)?,
                            scale: 1.0,
                        },
                        None => Pending { grad: ig, scale },
                    });
                }
            }
        }
        let mut by_name = HashMap::new();
        let mut to_scale = Vec::new();
        for (name, &id) in self.params.borrow().iter() {
            if let Some(Some(g)) = grads.get(id) {
                if g.scale == 1.0 {
                    by_name.insert(name.clone(), g.grad.clone());
                } else {
                    to_scale.push((name.clone(), &g.grad, g.scale));
                }
            }
        }
        let tensors: Vec<&Tensor<B>> = to_scale.iter().map(|(_, t, _)| *t).collect();
        let scales: Vec<f64> = to_scale.iter().map(|(_, _, s)| *s).collect();
        let scaled = be.scale_many(&tensors, &scales)?;
        for ((name, _, _), grad) in to_scale.into_iter().zip(scaled) {
            by_name.insert(name, grad);
        }
        Ok(Gradients { by_name })
    }

    // ---- ops (each with its backward rule) -----------------------------------------------------

    pub fn add(&self, a: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.add(&a.value, &b.value)?;
        Ok(self.record(y, &[a, b], |_, g| Ok(vec![Some(g.clone()), Some(g.clone())])))
    }

    /// alpha·a + beta·b.
    pub fn axpby(&self, alpha: f64, a: &Var<B>, beta: f64, b: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.axpby(alpha, &a.value, beta, &b.value)?;
        Ok(self.record_scaled(y, &[a, b], vec![alpha, beta], |_, g| {
            Ok(vec![Some(g.clone()), Some(g.clone())])
        }))
    }

    pub fn scale(&self, x: &Var<B>, s: f64) -> Result<Var<B>> {
        let y = self.backend.affine(&x.value, s, 0.0)?;
        Ok(self.record_scaled(y, &[x], vec![s], |_, g| Ok(vec![Some(g.clone())])))
    }

    /// scale·x + shift.
    pub fn affine(&self, x: &Var<B>, scale: f64, shift: f64) -> Result<Var<B>> {
        let y = self.backend.affine(&x.value, scale, shift)?;
        Ok(self.record_scaled(y, &[x], vec![scale], |_, g| Ok(vec![Some(g.clone())])))
    }

    pub fn mul(&self, a: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.mul(&a.value, &b.value)?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        let (ta, tb) = (a.tracked(), b.tracked());
        Ok(self.record(y, &[a, b], move |be, g| {
            Ok(vec![
                if ta { Some(be.mul(g, &bv)?) } else { None },
                if tb { Some(be.mul(g, &av)?) } else { None },
            ])
        }))
    }

    /// x[n,...]·s[n] with a constant per-sample scalar s.
    pub fn scale_per_sample(&self, x: &Var<B>, s: &Tensor<B>) -> Result<Var<B>> {
        let y = self.backend.scale_per_sample(&x.value, s)?;
        let s = s.clone();
        Ok(self.record(y, &[x], move |be, g| Ok(vec![Some(be.scale_per_sample(g, &s)?)])))
    }

    pub fn silu(&self, x: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.silu(&x.value)?;
        let xv = x.value.clone();
        Ok(self.record(y, &[x], move |be, g| Ok(vec![Some(be.silu_backward(&xv, g)?)])))
    }

    /// x[N,C,H,W] + b[N,C] broadcast over space.
    pub fn add_channel_bias(&self, x: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.add_channel_bias(&x.value, &b.value)?;
        Ok(self.record(y, &[x, b], |be, g| {
            Ok(vec![Some(g.clone()), Some(be.sum_spatial(g)?)])
        }))
    }

    /// Per-sample Σx² → [N].
    pub fn sum_squares_per_sample(&self, x: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.sum_squares_per_sample(&x.value)?;
        let xv = x.value.clone();
        Ok(self.record(y, &[x], move |be, g| {
            // d/dx Σx² = 2x, times the per-sample upstream gradient.
            Ok(vec![Some(be.scale_per_sample(&be.affine(&xv, 2.0, 0.0)?, g)?)])
        }))
    }

    pub fn concat_channels(&self, xs: &[&Var<B>]) -> Result<Var<B>> {
        let vals: Vec<&Tensor<B>> = xs.iter().map(|v| &v.value).collect();
        let y = self.backend.concat_channels(&vals)?;
        let sizes = channel_counts(&vals);
        Ok(self.record(y, xs, move |be, g| {
            Ok(be.split_channels(g, &sizes)?.into_iter().map(Some).collect())
        }))
    }

    pub fn interleave_channels(&self, x: &Var<B>, y: &Var<B>) -> Result<Var<B>> {
        if x.tracked() || y.tracked() {
            return Err(Error::Other(
                "interleave_channels: inputs are not differentiable".into(),
            ));
        }
        Ok(self.constant(self.backend.interleave_channels(&x.value, &y.value)?))
    }

    pub fn linear(&self, x: &Var<B>, w: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.linear(&x.value, &w.value, Some(&b.value))?;
        let (xv, wv) = (x.value.clone(), w.value.clone());
        Ok(self.record(y, &[x, w, b], move |be, g| {
            let gr = be.linear_backward(&xv, &wv, g)?;
            Ok(vec![Some(gr.dx), Some(gr.dw), Some(gr.db)])
        }))
    }

    pub fn nin(&self, x: &Var<B>, w: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.nin(&x.value, &w.value, &b.value)?;
        let (xv, wv) = (x.value.clone(), w.value.clone());
        Ok(self.record(y, &[x, w, b], move |be, g| {
            let gr = be.nin_backward(&xv, &wv, g)?;
            Ok(vec![Some(gr.dx), Some(gr.dw), Some(gr.db)])
        }))
    }

    pub fn conv2d(&self, x: &Var<B>, w: &Var<B>, b: &Var<B>, stride: usize, pad: usize) -> Result<Var<B>> {
        self.conv2d_fused(x, w, b, stride, pad, None, None)
    }

    /// conv2d, then + chan_bias[n, o], then alpha·y + beta·r for `residual` = (r, alpha, beta):
    /// one fused backend op ([`Backend::conv2d_fused`]). Recorded as one node whose backward runs
    /// the separate ops' backward in their order (the skip's scaling as pending factors, the
    /// channel-bias sum, the conv's backward), so the gradients equal those of composing the ops
    /// by hand.
    #[allow(clippy::too_many_arguments)] // the conv's arguments plus the epilogue
    pub fn conv2d_fused(
        &self,
        x: &Var<B>,
        w: &Var<B>,
        b: &Var<B>,
        stride: usize,
        pad: usize,
        chan_bias: Option<&Var<B>>,
        residual: Option<(&Var<B>, f64, f64)>,
    ) -> Result<Var<B>> {
        let epi = ConvEpilogue {
            channel_bias: chan_bias.map(|v| &v.value),
            residual: residual.map(|(r, a, be)| (&r.value, a, be)),
        };
        let mut inputs = vec![x, w, b];
        inputs.extend(chan_bias);
        inputs.extend(residual.map(|(r, _, _)| r));
        let be = &self.backend;
        if !self.records(&inputs) {
            let y = be.conv2d_fused(&x.value, &w.value, Some(&b.value), stride, pad, &epi)?;
            return Ok(Var { value: y, node: None });
        }
        // What the backward needs of x is the backend's choice (CUDA bf16 keeps the GEMM's
        // bf16 copy, so x's f32 buffer is freed once the forward moves on).
        let (y, xv) = be.conv2d_fused_saving(&x.value, &w.value, Some(&b.value), stride, pad, &epi)?;
        let wv = w.value.clone();
        let has_cb = chan_bias.is_some();
        let has_skip = residual.is_some();
        // The skip connection alpha·y + beta·r: the conv's inputs and the channel bias get
        // alpha·g, the residual beta·g, both as pending factors (no pass over g).
        let (alpha, beta) = residual.map_or((1.0, 1.0), |(_, a, b)| (a, b));
        let mut scales = vec![alpha; inputs.len()];
        if has_skip {
            scales[inputs.len() - 1] = beta;
        }
        Ok(self.record_scaled(y, &inputs, scales, move |be, g| {
            let gcb = if has_cb { Some(be.sum_spatial(g)?) } else { None };
            let gc = be.conv2d_backward_saved(&xv, &wv, g, stride, pad)?;
            let mut grads = vec![Some(gc.dx), Some(gc.dw), Some(gc.db)];
            if has_cb {
                grads.push(gcb);
            }
            if has_skip {
                grads.push(Some(g.clone()));
            }
            Ok(grads)
        }))
    }

    /// `group_norm` of the channel concatenation of `parts`, which a backend that
    /// [`reads_channel_parts`](Backend::reads_channel_parts) never builds (its backward hands
    /// each part its own gradient). Inputs: the parts, γ, β.
    pub fn group_norm_parts(
        &self,
        parts: &[&Var<B>],
        gamma: &Var<B>,
        beta: &Var<B>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Var<B>> {
        let be = &self.backend;
        let values: Vec<&Tensor<B>> = parts.iter().map(|v| &v.value).collect();
        let (y, stats) = be.group_norm_parts_saving(&values, &gamma.value, &beta.value, groups, eps, silu)?;
        let mut inputs = parts.to_vec();
        inputs.extend([gamma, beta]);
        if !self.records(&inputs) {
            return Ok(Var { value: y, node: None });
        }
        let pv: Vec<Tensor<B>> = values.into_iter().cloned().collect();
        let (gv, bv) = (gamma.value.clone(), beta.value.clone());
        Ok(self.record(y, &inputs, move |be, g| {
            let refs: Vec<&Tensor<B>> = pv.iter().collect();
            let gr = be.group_norm_parts_backward_saved(&refs, &stats, &gv, &bv, g, groups, eps, silu)?;
            Ok(parts_input_grads(gr))
        }))
    }

    /// A 1×1 conv of the channel concatenation of `parts` ([`Backend::conv1x1_parts`]).
    /// Inputs: the parts, w, b.
    pub fn conv1x1_parts(&self, parts: &[&Var<B>], w: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        let values: Vec<&Tensor<B>> = parts.iter().map(|v| &v.value).collect();
        let y = self.backend.conv1x1_parts(&values, &w.value, &b.value)?;
        let mut inputs = parts.to_vec();
        inputs.extend([w, b]);
        let pv: Vec<Tensor<B>> = values.into_iter().cloned().collect();
        let wv = w.value.clone();
        Ok(self.record(y, &inputs, move |be, g| {
            let refs: Vec<&Tensor<B>> = pv.iter().collect();
            let gr = be.conv1x1_parts_backward(&refs, &wv, g)?;
            Ok(parts_input_grads(gr))
        }))
    }

    pub fn group_norm(
        &self,
        x: &Var<B>,
        gamma: &Var<B>,
        beta: &Var<B>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Var<B>> {
        let be = &self.backend;
        if !self.records(&[x, gamma, beta]) {
            let y = be.group_norm(&x.value, &gamma.value, &beta.value, groups, eps, silu)?;
            return Ok(Var { value: y, node: None });
        }
        let (y, stats) = be.group_norm_saving(&x.value, &gamma.value, &beta.value, groups, eps, silu)?;
        let (xv, gv, bv) = (x.value.clone(), gamma.value.clone(), beta.value.clone());
        Ok(self.record(y, &[x, gamma, beta], move |be, g| {
            let gr = be.group_norm_backward_saved(&xv, &stats, &gv, &bv, g, groups, eps, silu)?;
            Ok(vec![Some(gr.dx), Some(gr.dw), Some(gr.db)])
        }))
    }

    pub fn attention(&self, q: &Var<B>, k: &Var<B>, v: &Var<B>) -> Result<Var<B>> {
        let y = self.backend.attention(&q.value, &k.value, &v.value)?;
        let (qv, kv, vv) = (q.value.clone(), k.value.clone(), v.value.clone());
        Ok(self.record(y, &[q, k, v], move |be, g| {
            let (dq, dk, dv) = be.attention_backward(&qv, &kv, &vv, g)?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        }))
    }

    pub fn upfirdn2d(&self, x: &Var<B>, fir: &Fir, geom: UpFirDn) -> Result<Var<B>> {
        let y = self.backend.upfirdn2d(&x.value, fir, geom)?;
        let (shape, fir) = (x.shape().to_vec(), fir.clone());
        Ok(self.record(y, &[x], move |be, g| {
            Ok(vec![Some(be.upfirdn2d_backward(g, &shape, &fir, geom)?)])
        }))
    }

    /// Inverted dropout with a mask drawn from (seed, offset); identity when p = 0.
    pub fn dropout(&self, x: &Var<B>, p: f64, seed: u64, offset: u64) -> Result<Var<B>> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.constant(self.backend.dropout_mask(x.shape(), p, seed, offset)?);
        self.mul(x, &mask)
    }
}

/// A node's backward with its inputs' constant factors applied now (devices; see
/// [`Graph::backward`]): when all are equal, one pass over the incoming gradient before the rule
/// runs; else one pass over each input's gradient after it. Returns the gradients and factors of 1.
fn apply_factors<B: Backend>(
    be: &B,
    bw: &BackwardFn<B>,
    g: &Tensor<B>,
    factors: &[f64],
) -> Result<(InputGrads<B>, Vec<f64>)> {
    let ones = vec![1.0; factors.len()];
    let first = factors.first().copied().unwrap_or(1.0);
    if factors.iter().all(|&f| f == first) {
        let grads = if first == 1.0 {
            bw(be, g)?
        } else {
            bw(be, &be.affine(g, first, 0.0)?)?
        };
        return Ok((grads, ones));
    }
    let grads = bw(be, g)?
        .into_iter()
        .zip(factors)
        .map(|(ig, &f)| match ig {
            Some(t) if f != 1.0 => be.affine(&t, f, 0.0).map(Some),
            other => Ok(other),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((grads, ones))
}

/// A parts op's gradients in its recorded inputs' order: each part, then the weight and the bias.
fn parts_input_grads<B: Backend>(gr: PartsGrads<B>) -> Vec<Option<Tensor<B>>> {
    let mut grads: Vec<Option<Tensor<B>>> = gr.dx.into_iter().map(Some).collect();
    grads.extend([Some(gr.dw), Some(gr.db)]);
    grads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    /// Parameter gradients of a graph with every op that carries a factor (a conv with a scaled
    /// skip connection, axpby with unequal factors meeting an input's other gradient, scale,
    /// affine), in f64, with factors pending or applied node by node.
    fn gradients(defer_factors: bool) -> HashMap<String, Vec<f64>> {
        let be = Cpu::<f64>::new();
        let mut g = Graph::training(&be);
        g.defer_factors = defer_factors;
        let p = |name: &str, shape: &[usize], seed: u64| g.param(name, &be.randn(shape, seed, 0).unwrap());
        let x = p("x", &[2, 4, 6, 6], 1);
        let (w0, b0) = (p("w0", &[4, 4, 3, 3], 2), p("b0", &[4], 3));
        let (w1, b1) = (p("w1", &[4, 4, 3, 3], 4), p("b1", &[4], 5));
        let temb = p("temb", &[2, 4], 6);
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let h = g.conv2d_fused(&x, &w0, &b0, 1, 1, Some(&temb), None).unwrap();
        let y = g
            .conv2d_fused(&h, &w1, &b1, 1, 1, None, Some((&x, s, s)))
            .unwrap();
        let z = g.axpby(0.3, &y, 1.7, &x).unwrap();
        let u = g.scale(&z, 0.5).unwrap();
        let v = g.affine(&u, -2.0, 0.1).unwrap();
        let loss = g.sum_squares_per_sample(&v).unwrap();
        let grads = g
            .backward(&loss, be.from_f64(&[2], &[1.0, 0.5]).unwrap())
            .unwrap();
        grads
            .by_name
            .iter()
            .map(|(k, t)| (k.clone(), be.to_f64(t).unwrap()))
            .collect()
    }

    /// concat_channels' gradient is the upstream gradient cut back into the parts' channels:
    /// with L = Σ concat(a, b)², dL/da = 2a and dL/db = 2b (a part offset by a channel would get
    /// the other's values).
    #[test]
    fn a_concatenation_passes_each_part_its_channels_of_the_gradient() {
        let be = Cpu::<f64>::new();
        let g = Graph::training(&be);
        let a = g.param("a", &be.randn(&[2, 2, 3, 3], 1, 0).unwrap());
        let b = g.param("b", &be.randn(&[2, 3, 3, 3], 2, 0).unwrap());
        let cat = g.concat_channels(&[&a, &b]).unwrap();
        let loss = g.sum_squares_per_sample(&cat).unwrap();
        let grads = g
            .backward(&loss, be.from_f64(&[2], &[1.0, 1.0]).unwrap())
            .unwrap();
        for (name, part) in [("a", &a), ("b", &b)] {
            let want: Vec<f64> = be.to_f64(&part.value).unwrap().iter().map(|v| 2.0 * v).collect();
            assert_eq!(be.to_f64(&grads.by_name[name]).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn pending_factors_give_the_gradients_of_applied_ones() {
        let (pending, applied) = (gradients(true), gradients(false));
        assert_eq!(pending.len(), 6);
        for (name, want) in &applied {
            let got = &pending[name];
            let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(norm > 0.0 && diff <= 1e-13 * norm, "{name}: {diff:e} of {norm:e}");
        }
    }
}
