//! Layers of the score networks, built from autograd ops. Each layer knows its parameter names
//! (relative to its prefix, in PyTorch registration order) and shapes, and runs its forward pass on a
//! [`Graph`]. Names and semantics follow score_sde_pytorch's `layers.py`/`layerspp.py`.
use std::collections::BTreeMap;

use crate::autograd::{Graph, Var};
use crate::backend::{Backend, Fir, UpFirDn};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Parameter name → shape, in state-dict (registration) order.
pub type ParamSpecs = Vec<(String, Vec<usize>)>;

/// The weights a forward pass reads, and the graph it records on.
pub struct Ctx<'a, B: Backend> {
    pub g: &'a Graph<B>,
    pub weights: &'a BTreeMap<String, Tensor<B>>,
    /// Dropout probability in training mode (0 at inference).
    pub dropout: f64,
    /// Seed for dropout masks; each dropout site draws from its own offset range.
    pub dropout_seed: u64,
    dropout_offset: std::cell::Cell<u64>,
}

impl<'a, B: Backend> Ctx<'a, B> {
    pub fn new(g: &'a Graph<B>, weights: &'a BTreeMap<String, Tensor<B>>) -> Self {
        Ctx {
            g,
            weights,
            dropout: 0.0,
            dropout_seed: 0,
            dropout_offset: std::cell::Cell::new(0),
        }
    }
    pub fn with_dropout(mut self, p: f64, seed: u64) -> Self {
        self.dropout = p;
        self.dropout_seed = seed;
        self
    }
    /// The parameter `name` as a graph leaf.
    pub fn p(&self, name: &str) -> Result<Var<B>> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::Other(format!("model weight `{name}` is not loaded")))?;
        Ok(self.g.param(name, t))
    }
    fn dropout(&self, x: &Var<B>) -> Result<Var<B>> {
        if self.dropout <= 0.0 {
            return Ok(x.clone());
        }
        let off = self.dropout_offset.get();
        self.dropout_offset.set(off + x.value.numel() as u64);
        self.g.dropout(x, self.dropout, self.dropout_seed, off)
    }
}

fn join(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
}

/// nn.Conv2d with bias, square kernel, symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub prefix: String,
    pub in_ch: usize,
    pub out_ch: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn conv3x3(prefix: String, in_ch: usize, out_ch: usize) -> Self {
        Conv2d {
            prefix,
            in_ch,
            out_ch,
            k: 3,
            stride: 1,
            pad: 1,
        }
    }
    pub fn conv1x1(prefix: String, in_ch: usize, out_ch: usize) -> Self {
        Conv2d {
            prefix,
            in_ch,
            out_ch,
            k: 1,
            stride: 1,
            pad: 0,
        }
    }
    pub fn params(&self) -> ParamSpecs {
        vec![
            (
                join(&self.prefix, "weight"),
                vec![self.out_ch, self.in_ch, self.k, self.k],
            ),
            (join(&self.prefix, "bias"), vec![self.out_ch]),
        ]
    }
    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, x: &Var<B>) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "weight"))?;
        let b = cx.p(&join(&self.prefix, "bias"))?;
        cx.g.conv2d(x, &w, &b, self.stride, self.pad)
    }
    /// The convolution with a residual block's epilogue: + chan_bias[n, o], then
    /// alpha·y + beta·r for `residual` = (r, alpha, beta) — one fused op at inference.
    pub fn forward_fused<B: Backend>(
        &self,
        cx: &Ctx<B>,
        x: &Var<B>,
        chan_bias: Option<&Var<B>>,
        residual: Option<(&Var<B>, f64, f64)>,
    ) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "weight"))?;
        let b = cx.p(&join(&self.prefix, "bias"))?;
        cx.g.conv2d_fused(x, &w, &b, self.stride, self.pad, chan_bias, residual)
    }
    /// A 1×1 conv of the channel concatenation of `parts` (`Graph::conv1x1_parts`).
    pub fn forward_parts<B: Backend>(&self, cx: &Ctx<B>, parts: &[&Var<B>]) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "weight"))?;
        let b = cx.p(&join(&self.prefix, "bias"))?;
        cx.g.conv1x1_parts(parts, &w, &b)
    }
}

/// nn.Linear (weight (out, in)).
#[derive(Clone, Debug)]
pub struct Linear {
    pub prefix: String,
    pub in_f: usize,
    pub out_f: usize,
}

impl Linear {
    pub fn params(&self) -> ParamSpecs {
        vec![
            (join(&self.prefix, "weight"), vec![self.out_f, self.in_f]),
            (join(&self.prefix, "bias"), vec![self.out_f]),
        ]
    }
    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, x: &Var<B>) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "weight"))?;
        let b = cx.p(&join(&self.prefix, "bias"))?;
        cx.g.linear(x, &w, &b)
    }
}

/// nn.GroupNorm with groups = min(C/4, 32), eps 1e-6, optionally fused with the SiLU that follows it.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub prefix: String,
    pub ch: usize,
}

impl GroupNorm {
    pub const EPS: f64 = 1e-6;
    pub fn groups(&self) -> usize {
        (self.ch / 4).clamp(1, 32)
    }
    pub fn params(&self) -> ParamSpecs {
        vec![
            (join(&self.prefix, "weight"), vec![self.ch]),
            (join(&self.prefix, "bias"), vec![self.ch]),
        ]
    }
    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, x: &Var<B>, silu: bool) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "weight"))?;
        let b = cx.p(&join(&self.prefix, "bias"))?;
        cx.g.group_norm(x, &w, &b, self.groups(), Self::EPS, silu)
    }
    /// `forward` of the channel concatenation of `parts` (`Graph::group_norm_parts`).
    pub fn forward_parts<B: Backend>(&self, cx: &Ctx<B>, parts: &[&Var<B>], silu: bool) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "weight"))?;
        let b = cx.p(&join(&self.prefix, "bias"))?;
        cx.g.group_norm_parts(parts, &w, &b, self.groups(), Self::EPS, silu)
    }
}

/// score_sde's NIN: a per-pixel linear map with W stored (in, out).
#[derive(Clone, Debug)]
pub struct Nin {
    pub prefix: String,
    pub in_ch: usize,
    pub out_ch: usize,
}

impl Nin {
    pub fn params(&self) -> ParamSpecs {
        vec![
            (join(&self.prefix, "W"), vec![self.in_ch, self.out_ch]),
            (join(&self.prefix, "b"), vec![self.out_ch]),
        ]
    }
    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, x: &Var<B>) -> Result<Var<B>> {
        let w = cx.p(&join(&self.prefix, "W"))?;
        let b = cx.p(&join(&self.prefix, "b"))?;
        cx.g.nin(x, &w, &b)
    }
}

/// The FIR resampling of up_or_down_sampling.py with a separable kernel (the models use [1,3,3,1]).
#[derive(Clone, Debug)]
pub struct FirResample {
    pub kernel: Vec<f32>,
}

impl FirResample {
    /// `downsample_2d(x, k, factor=2)`: pad ((p+1)/2, p/2) with p = len(k) − 2, filter, stride 2.
    pub fn down<B: Backend>(&self, g: &Graph<B>, x: &Var<B>) -> Result<Var<B>> {
        let p = self.kernel.len() as isize - 2;
        let geom = UpFirDn {
            up: 1,
            down: 2,
            pad0: (p + 1) / 2,
            pad1: p / 2,
        };
        g.upfirdn2d(x, &Fir::separable(&self.kernel, 1.0), geom)
    }
    /// `upsample_2d(x, k, factor=2)`: zero-insert ×2, kernel gain 4, pad ((p+1)/2 + 1, p/2).
    pub fn up<B: Backend>(&self, g: &Graph<B>, x: &Var<B>) -> Result<Var<B>> {
        let p = self.kernel.len() as isize - 2;
        let geom = UpFirDn {
            up: 2,
            down: 1,
            pad0: (p + 1) / 2 + 1,
            pad1: p / 2,
        };
        g.upfirdn2d(x, &Fir::separable(&self.kernel, 4.0), geom)
    }
    /// The blur in front of `conv_downsample_2d` for a kw×kw conv: pad ((p+1)/2, p/2),
    /// p = len(k) − 2 + kw − 1, no resampling (the strided conv that follows does it).
    pub fn blur_for_conv_down<B: Backend>(&self, g: &Graph<B>, x: &Var<B>, kw: usize) -> Result<Var<B>> {
        let p = self.kernel.len() as isize - 2 + kw as isize - 1;
        let geom = UpFirDn {
            up: 1,
            down: 1,
            pad0: (p + 1) / 2,
            pad1: p / 2,
        };
        g.upfirdn2d(x, &Fir::separable(&self.kernel, 1.0), geom)
    }
}

/// Whether a res-block resamples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    None,
    Up,
    Down,
}

/// `ResnetBlockBigGANpp`: GN-SiLU, optional FIR up/down of both paths, conv, + Dense(SiLU(temb)),
/// GN-SiLU, dropout, conv, 1×1 shortcut when the shape changes, (x + h)/√2 with skip_rescale.
#[derive(Clone, Debug)]
pub struct ResBlock {
    pub prefix: String,
    pub in_ch: usize,
    pub out_ch: usize,
    pub temb_dim: usize,
    pub resample: Resample,
    pub skip_rescale: bool,
    pub fir: FirResample,
}

impl ResBlock {
    fn gn0(&self) -> GroupNorm {
        GroupNorm {
            prefix: join(&self.prefix, "GroupNorm_0"),
            ch: self.in_ch,
        }
    }
    fn conv0(&self) -> Conv2d {
        Conv2d::conv3x3(join(&self.prefix, "Conv_0"), self.in_ch, self.out_ch)
    }
    fn dense0(&self) -> Linear {
        Linear {
            prefix: join(&self.prefix, "Dense_0"),
            in_f: self.temb_dim,
            out_f: self.out_ch,
        }
    }
    fn gn1(&self) -> GroupNorm {
        GroupNorm {
            prefix: join(&self.prefix, "GroupNorm_1"),
            ch: self.out_ch,
        }
    }
    fn conv1(&self) -> Conv2d {
        Conv2d::conv3x3(join(&self.prefix, "Conv_1"), self.out_ch, self.out_ch)
    }
    fn shortcut(&self) -> Option<Conv2d> {
        (self.in_ch != self.out_ch || self.resample != Resample::None)
            .then(|| Conv2d::conv1x1(join(&self.prefix, "Conv_2"), self.in_ch, self.out_ch))
    }
    pub fn params(&self) -> ParamSpecs {
        let mut v = self.gn0().params();
        v.extend(self.conv0().params());
        v.extend(self.dense0().params());
        v.extend(self.gn1().params());
        v.extend(self.conv1().params());
        if let Some(c) = self.shortcut() {
            v.extend(c.params());
        }
        v
    }
    /// `act_temb` is SiLU(temb), shared by all blocks of a forward pass.
    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, x: &Var<B>, act_temb: &Var<B>) -> Result<Var<B>> {
        let g = cx.g;
        let mut h = self.gn0().forward(cx, x, true)?;
        let mut x = x.clone();
        match self.resample {
            Resample::Up => {
                h = self.fir.up(g, &h)?;
                x = self.fir.up(g, &x)?;
            }
            Resample::Down => {
                h = self.fir.down(g, &h)?;
                x = self.fir.down(g, &x)?;
            }
            Resample::None => {}
        }
        self.after_norm0(cx, h, act_temb, || match self.shortcut() {
            Some(c) => c.forward(cx, &x),
            None => Ok(x.clone()),
        })
    }

    /// The block after GroupNorm_0 (and its resampling): conv0 with the time-embedding bias in
    /// its epilogue, GN-SiLU, dropout, conv1 with the skip connection `skip()` in its epilogue.
    fn after_norm0<B: Backend>(
        &self,
        cx: &Ctx<B>,
        h: Var<B>,
        act_temb: &Var<B>,
        skip: impl FnOnce() -> Result<Var<B>>,
    ) -> Result<Var<B>> {
        let t = self.dense0().forward(cx, act_temb)?;
        let h = self.conv0().forward_fused(cx, &h, Some(&t), None)?;
        let h = self.gn1().forward(cx, &h, true)?;
        let h = cx.dropout(&h)?;
        let x = skip()?;
        let s = if self.skip_rescale {
            std::f64::consts::FRAC_1_SQRT_2
        } else {
            1.0
        };
        self.conv1().forward_fused(cx, &h, None, Some((&x, s, s)))
    }
}

impl ResBlock {
    /// `forward` of the channel concatenation of `parts` (the up path's features and skip
    /// connection). Where the backend [`reads_channel_parts`](Backend::reads_channel_parts) (the
    /// CPU), the block's two readers of it, GroupNorm_0 and the 1×1 shortcut, read the parts in
    /// place: no concatenation forward, no slicing of its gradient backward. Else (or in a block
    /// that resamples, or has no shortcut) the parts are concatenated first.
    pub fn forward_parts<B: Backend>(
        &self,
        cx: &Ctx<B>,
        parts: &[&Var<B>],
        act_temb: &Var<B>,
    ) -> Result<Var<B>> {
        let g = cx.g;
        let shortcut = self.shortcut();
        let in_place =
            parts.len() > 1 && g.backend().reads_channel_parts() && self.resample == Resample::None;
        let Some(shortcut) = shortcut.filter(|_| in_place) else {
            return self.forward(cx, &g.concat_channels(parts)?, act_temb);
        };
        let h = self.gn0().forward_parts(cx, parts, true)?;
        self.after_norm0(cx, h, act_temb, || shortcut.forward_parts(cx, parts))
    }
}

/// x + h, or (x + h)/√2 with skip_rescale.
fn merge<B: Backend>(g: &Graph<B>, x: &Var<B>, h: &Var<B>, skip_rescale: bool) -> Result<Var<B>> {
    if skip_rescale {
        let s = std::f64::consts::FRAC_1_SQRT_2;
        g.axpby(s, x, s, h)
    } else {
        g.add(x, h)
    }
}

/// `AttnBlockpp`: GroupNorm, q/k/v NINs, softmax attention over all positions, output NIN, residual.
#[derive(Clone, Debug)]
pub struct AttnBlock {
    pub prefix: String,
    pub ch: usize,
    pub skip_rescale: bool,
}

impl AttnBlock {
    fn gn(&self) -> GroupNorm {
        GroupNorm {
            prefix: join(&self.prefix, "GroupNorm_0"),
            ch: self.ch,
        }
    }
    fn nin(&self, i: usize) -> Nin {
        Nin {
            prefix: join(&self.prefix, &format!("NIN_{i}")),
            in_ch: self.ch,
            out_ch: self.ch,
        }
    }
    pub fn params(&self) -> ParamSpecs {
        let mut v = self.gn().params();
        for i in 0..4 {
            v.extend(self.nin(i).params());
        }
        v
    }
    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, x: &Var<B>) -> Result<Var<B>> {
        let h = self.gn().forward(cx, x, false)?;
        let q = self.nin(0).forward(cx, &h)?;
        let k = self.nin(1).forward(cx, &h)?;
        let v = self.nin(2).forward(cx, &h)?;
        let a = cx.g.attention(&q, &k, &v)?;
        let h = self.nin(3).forward(cx, &a)?;
        merge(cx.g, x, &h, self.skip_rescale)
    }
}
