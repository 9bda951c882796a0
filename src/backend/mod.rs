//! The `Backend` trait: every operation the models, samplers and trainer need, forward and backward.
//!
//! Two implementations: [`cpu::Cpu`] (the reference, generic over f32/f64 so gradient checks can run
//! in double precision) and `cuda::Cuda` (hand-written kernels). The CUDA backend is tested against
//! the CPU one op by op; the CPU one is tested against the golden vectors of the original code.
//!
//! Conventions: tensors are NCHW and contiguous; conv weights OIHW; `Linear` weights (out, in) as in
//! PyTorch; `NIN` weights (in, out) as in score_sde's `NIN` layer. Scalars are passed as f64 and
//! rounded to the backend's element type. Every op validates shapes and returns `Error::Shape`
//! rather than panicking.
pub mod cpu;
pub mod cuda;
pub(crate) mod shapes;

use crate::error::Result;
use crate::tensor::Tensor;

/// A 2-d FIR filter for `upfirdn2d`, stored row-major (kh × kw). Applied as a true convolution
/// (kernel flipped), exactly like StyleGAN2's `upfirdn2d` that score_sde uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Fir {
    pub taps: Vec<f32>,
    pub kh: usize,
    pub kw: usize,
}

impl Fir {
    /// outer(k, k) / sum(outer) · gain — score_sde's `_setup_kernel(k) * gain`.
    pub fn separable(k: &[f32], gain: f32) -> Fir {
        let n = k.len();
        let s: f32 = k.iter().sum::<f32>().powi(2);
        let mut taps = Vec::with_capacity(n * n);
        for a in k {
            for b in k {
                taps.push(a * b / s * gain);
            }
        }
        Fir { taps, kh: n, kw: n }
    }
}

/// Geometry of one `upfirdn2d`: upsample by zero insertion, pad (negative pads crop), FIR filter,
/// keep every `down`-th sample. Output size: (H·up + pad0 + pad1 − kh) / down + 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpFirDn {
    pub up: usize,
    pub down: usize,
    pub pad0: isize,
    pub pad1: isize,
}

impl UpFirDn {
    pub fn out_size(&self, n: usize, k: usize) -> usize {
        let padded = (n * self.up) as isize + self.pad0 + self.pad1 - k as isize;
        (padded / self.down as isize + 1).max(0) as usize
    }
}

/// The settings of one fused Adam update ([`Backend::adam_update`]): torch's single-tensor Adam
/// (no weight decay) plus the multiplier the global grad-norm clip puts on the gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate of this update (after warm-up).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// This update's number, counted from 1 (Adam's bias correction uses β^step).
    pub step: u64,
    /// Multiplier applied to the gradient before anything else (the clip scale; 1 without clip).
    pub grad_scale: f64,
}

impl AdamStep {
    /// The checks every backend makes: g, m and v shaped like p, a step of at least 1 (the bias
    /// correction divides by 1 − β1^step) and finite settings.
    pub(crate) fn validate(&self, p: &[usize], g: &[usize], m: &[usize], v: &[usize]) -> Result<()> {
        let op = "adam_update";
        crate::tensor::same_shape(op, g, p)?;
        crate::tensor::same_shape(op, m, p)?;
        crate::tensor::same_shape(op, v, p)?;
        if self.step == 0 || self.step > i32::MAX as u64 {
            return Err(crate::error::Error::Config(format!(
                "adam_update: step {} out of range (counted from 1)",
                self.step
            )));
        }
        let all = [self.lr, self.beta1, self.beta2, self.eps, self.grad_scale];
        if all.iter().any(|v| !v.is_finite())
            || !(0.0..1.0).contains(&self.beta1)
            || !(0.0..1.0).contains(&self.beta2)
        {
            return Err(crate::error::Error::Config(format!(
                "adam_update: invalid settings {self:?}"
            )));
        }
        Ok(())
    }
}

/// Checks of [`Backend::ema_update`]: same shapes, decay in [0, 1].
pub(crate) fn validate_ema(shadow: &[usize], p: &[usize], decay: f64) -> Result<()> {
    crate::tensor::same_shape("ema_update", p, shadow)?;
    if !(0.0..=1.0).contains(&decay) {
        return Err(crate::error::Error::Config(format!(
            "ema_update: decay {decay} outside [0, 1]"
        )));
    }
    Ok(())
}

/// (p', m', v') of one parameter after an Adam update: an element of
/// [`Backend::adam_update_many`]'s result.
pub type AdamUpdate<B> = (Tensor<B>, Tensor<B>, Tensor<B>);

/// Shared references to the tensors of a list of mutable ones.
pub(crate) fn shared_refs<'a, B: Backend>(ts: &'a [&mut Tensor<B>]) -> Vec<&'a Tensor<B>> {
    ts.iter().map(|t| &**t).collect()
}

/// Checks of the list ops ([`Backend::adam_update_many`], [`Backend::ema_update_many`]): every
/// list holds one tensor per parameter, so all lengths are equal.
pub(crate) fn validate_list_lengths(op: &'static str, lens: &[usize]) -> Result<()> {
    if lens.windows(2).any(|w| w[0] != w[1]) {
        return Err(crate::error::Error::shape(
            op,
            format!("tensor lists of different lengths {lens:?}"),
        ));
    }
    Ok(())
}

/// What [`Backend::conv2d_fused`] adds to a convolution's output before it is written: the
/// epilogue of a residual block, so inference makes one pass over the output instead of three.
pub struct ConvEpilogue<'a, B: Backend> {
    /// [N, O]: added per sample and output channel (a res-block's time-embedding projection).
    pub channel_bias: Option<&'a Tensor<B>>,
    /// (r, alpha, beta) with r shaped like the output: out = alpha·(conv + biases) + beta·r
    /// (the block's skip connection, alpha = beta = 1/√2 with skip_rescale).
    pub residual: Option<(&'a Tensor<B>, f64, f64)>,
}

/// `conv2d_fused` as separate ops — the CPU backend's implementation and any backend's fallback;
/// the same ops in the same order as the unfused model code (`axpby(beta, r, alpha, y)`, or
/// `add(r, y)` when both factors are 1), so results are identical to it.
pub fn conv2d_fused_composed<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    b: Option<&Tensor<B>>,
    stride: usize,
    pad: usize,
    epi: &ConvEpilogue<B>,
) -> Result<Tensor<B>> {
    let mut y = be.conv2d(x, w, b, stride, pad)?;
    if let Some(cb) = epi.channel_bias {
        y = be.add_channel_bias(&y, cb)?;
    }
    if let Some((r, alpha, beta)) = epi.residual {
        y = if alpha == 1.0 && beta == 1.0 {
            be.add(r, &y)?
        } else {
            be.axpby(beta, r, alpha, &y)?
        };
    }
    Ok(y)
}

/// The channel count of each of `parts` (dimension 1; 0 for a tensor of lower rank, which the
/// ops' shape checks refuse).
pub fn channel_counts<B: Backend>(parts: &[&Tensor<B>]) -> Vec<usize> {
    parts
        .iter()
        .map(|p| p.shape().get(1).copied().unwrap_or(0))
        .collect()
}

/// Gradients of an op over a channel concatenation's parts: each part's dx, then the weight's
/// and the bias's (γ's and β's for a GroupNorm).
pub struct PartsGrads<B: Backend> {
    pub dx: Vec<Tensor<B>>,
    pub dw: Tensor<B>,
    pub db: Tensor<B>,
}

/// Gradients of an op with parameters: input, weight, bias.
pub struct Grads3<B: Backend> {
    pub dx: Tensor<B>,
    pub dw: Tensor<B>,
    pub db: Tensor<B>,
}

pub trait Backend: Clone + Send + Sync + Sized + 'static {
    /// Device buffer of elements; cloning must be cheap (reference counted).
    type Buf: Clone + Send + Sync;

    /// Human-readable name, e.g. "cpu (2 threads)" or "cuda: NVIDIA H200".
    fn name(&self) -> String;
    /// Whether this backend computes on the host CPU (commands pick lighter defaults there, e.g.
    /// a fast sampler).
    fn is_cpu(&self) -> bool {
        false
    }
    /// The arithmetic of the matrix products: "f32", or on CUDA "tf32"/"bf16" (tensor cores).
    /// Results record it; a result that is not finite names it when it is a reduced one.
    fn precision_name(&self) -> &'static str {
        "f32"
    }

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>>;
    #[allow(clippy::wrong_self_convention)] // a backend creates tensors on its own device
    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor<Self>>;
    #[allow(clippy::wrong_self_convention)]
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<Tensor<Self>>;
    fn to_f32(&self, x: &Tensor<Self>) -> Result<Vec<f32>>;
    fn to_f64(&self, x: &Tensor<Self>) -> Result<Vec<f64>>;
    /// Wait for queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    // ---- elementwise --------------------------------------------------------------------------
    /// a + b (same shape).
    fn add(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// acc + b, where the backend may reuse `acc`'s storage when nothing else holds it (the
    /// autograd's gradient accumulation). Same result as `add`. Default: `add`.
    fn add_into(&self, acc: Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.add(&acc, b)
    }
    /// alpha·a + beta·b (same shape).
    fn axpby(&self, alpha: f64, a: &Tensor<Self>, beta: f64, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// alpha·acc + beta·b, reusing `acc`'s storage when nothing else holds it (the autograd's
    /// accumulation of gradients with different pending factors). Same result as `axpby`.
    /// Default: `axpby`.
    fn axpby_into(&self, alpha: f64, acc: Tensor<Self>, beta: f64, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.axpby(alpha, &acc, beta, b)
    }
    /// a ⊙ b (same shape).
    fn mul(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// scale·x + shift.
    fn affine(&self, x: &Tensor<Self>, scale: f64, shift: f64) -> Result<Tensor<Self>>;
    /// x[n, ...] · s[n] for a per-sample scalar s of shape [N].
    fn scale_per_sample(&self, x: &Tensor<Self>, s: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// SiLU(x) = x·sigmoid(x).
    fn silu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// dL/dx of SiLU given x and dL/dy.
    fn silu_backward(&self, x: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// x[N,C,H,W] + b[N,C] broadcast over H,W (the time-embedding add of a res-block).
    fn add_channel_bias(&self, x: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// Σ over H,W: [N,C,H,W] → [N,C] (backward of `add_channel_bias`).
    fn sum_spatial(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// Σ of squares per sample: [N, ...] → [N].
    fn sum_squares_per_sample(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    // ---- layout -------------------------------------------------------------------------------
    /// Concatenate NCHW tensors along C.
    fn concat_channels(&self, xs: &[&Tensor<Self>]) -> Result<Tensor<Self>>;
    /// Channels [start, start+len) of an NCHW tensor.
    fn slice_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>>;
    /// [x_0, y_0, x_1, y_1, ...]: channel interleave of two [N,C,H,W] tensors → [N,2C,H,W]
    /// (score_sde sr's `merge_xy`).
    fn interleave_channels(&self, x: &Tensor<Self>, y: &Tensor<Self>) -> Result<Tensor<Self>>;

    // ---- dense layers -------------------------------------------------------------------------
    /// x[N,I] · w[O,I]ᵀ + b[O] → [N,O] (PyTorch Linear).
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, b: Option<&Tensor<Self>>) -> Result<Tensor<Self>>;
    fn linear_backward(&self, x: &Tensor<Self>, w: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Grads3<Self>>;
    /// Per-pixel linear: y[n,o,p] = Σ_c x[n,c,p]·w[c,o] + b[o], w stored (in, out).
    fn nin(&self, x: &Tensor<Self>, w: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    fn nin_backward(&self, x: &Tensor<Self>, w: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Grads3<Self>>;
    /// 2-d cross-correlation, NCHW × OIHW, zero padding `pad` on all sides, stride `stride`,
    /// optional bias [O] (PyTorch Conv2d).
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor<Self>>;
    /// `conv2d` plus a residual block's epilogue (see [`ConvEpilogue`]) in one op. Its gradients
    /// are those of the separate ops (`Graph::conv2d_fused` records it with their backward).
    /// Default: the separate ops.
    fn conv2d_fused(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Self>,
    ) -> Result<Tensor<Self>> {
        conv2d_fused_composed(self, x, w, b, stride, pad, epi)
    }
    /// What a recorded convolution keeps of its input x for its backward: x itself on the CPU;
    /// on CUDA in bf16, the bf16 NHWC copy the forward GEMM read whenever the weight gradient
    /// reads that layout too, so x need not be converted again and its f32 buffer can be freed.
    type ConvSaved: Clone + 'static;
    /// `conv2d_fused` for training: also returns what [`Backend::conv2d_backward_saved`] needs
    /// of x.
    fn conv2d_fused_saving(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Self>,
    ) -> Result<(Tensor<Self>, Self::ConvSaved)>;
    /// `conv2d_backward` from what [`Backend::conv2d_fused_saving`] kept of x.
    fn conv2d_backward_saved(
        &self,
        x: &Self::ConvSaved,
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
        stride: usize,
        pad: usize,
    ) -> Result<Grads3<Self>>;
    /// Gradients of `conv2d` w.r.t. input, weight and bias.
    fn conv2d_backward(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
        stride: usize,
        pad: usize,
    ) -> Result<Grads3<Self>>;

    // ---- normalisation ------------------------------------------------------------------------
    /// GroupNorm over (C/groups, H, W) per sample with affine gamma/beta [C] (biased variance,
    /// as PyTorch), then SiLU if `silu`.
    fn group_norm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor<Self>>;
    /// What a recorded `group_norm` keeps besides x for its backward: nothing on the CPU; on
    /// CUDA the forward's per-slice (Σx, Σx²) partials, so the backward need not read x once more
    /// for the statistics.
    type NormSaved: Clone + 'static;
    /// `group_norm` for training: also returns what [`Backend::group_norm_backward_saved`] takes.
    fn group_norm_saving(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor<Self>, Self::NormSaved)>;
    /// `group_norm_backward` with what [`Backend::group_norm_saving`] kept.
    #[allow(clippy::too_many_arguments)] // the forward's arguments plus dy and the saved stats
    fn group_norm_backward_saved(
        &self,
        x: &Tensor<Self>,
        saved: &Self::NormSaved,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Grads3<Self>>;
    /// Gradients of `group_norm` (input, gamma, beta); recomputes the statistics.
    #[allow(clippy::too_many_arguments)] // the forward's arguments plus dy
    fn group_norm_backward(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Grads3<Self>>;

    // ---- a channel concatenation read in place -------------------------------------------------
    /// Whether this backend's `*_parts` ops read a channel concatenation's parts in place (the
    /// CPU). Where not, the model concatenates once and runs the plain ops; the defaults below
    /// (concatenate, run, slice) are correct but would concatenate once per op.
    fn reads_channel_parts(&self) -> bool {
        false
    }
    /// `group_norm_saving` of the channel concatenation of `parts` (equal N, H, W).
    #[allow(clippy::too_many_arguments)]
    fn group_norm_parts_saving(
        &self,
        parts: &[&Tensor<Self>],
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor<Self>, Self::NormSaved)> {
        self.group_norm_saving(&self.concat_channels(parts)?, gamma, beta, groups, eps, silu)
    }
    /// Gradients of `group_norm_parts_saving`: dx of each part, dγ, dβ.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_parts_backward_saved(
        &self,
        parts: &[&Tensor<Self>],
        saved: &Self::NormSaved,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<PartsGrads<Self>> {
        let x = self.concat_channels(parts)?;
        let gr = self.group_norm_backward_saved(&x, saved, gamma, beta, dy, groups, eps, silu)?;
        Ok(PartsGrads {
            dx: self.split_channels(&gr.dx, &channel_counts(parts))?,
            dw: gr.dw,
            db: gr.db,
        })
    }
    /// A 1×1 conv (stride 1, no padding) of the channel concatenation of `parts`.
    fn conv1x1_parts(
        &self,
        parts: &[&Tensor<Self>],
        w: &Tensor<Self>,
        b: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        self.conv2d(&self.concat_channels(parts)?, w, Some(b), 1, 0)
    }
    /// Gradients of `conv1x1_parts`: dx of each part, dw, db.
    fn conv1x1_parts_backward(
        &self,
        parts: &[&Tensor<Self>],
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Result<PartsGrads<Self>> {
        let gr = self.conv2d_backward(&self.concat_channels(parts)?, w, dy, 1, 0)?;
        Ok(PartsGrads {
            dx: self.split_channels(&gr.dx, &channel_counts(parts))?,
            dw: gr.dw,
            db: gr.db,
        })
    }
    /// `x` cut along its channels into consecutive tensors of `sizes` channels each (the inverse of
    /// `concat_channels`; its gradient).
    fn split_channels(&self, x: &Tensor<Self>, sizes: &[usize]) -> Result<Vec<Tensor<Self>>> {
        let mut start = 0;
        sizes
            .iter()
            .map(|&c| {
                start += c;
                self.slice_channels(x, start - c, c)
            })
            .collect()
    }

    // ---- attention ----------------------------------------------------------------------------
    /// Spatial self-attention of score_sde's AttnBlockpp core: with L = H·W,
    /// w[n,i,j] = softmax_j(Σ_c q[n,c,i]·k[n,c,j] / √C), out[n,c,i] = Σ_j w[n,i,j]·v[n,c,j].
    /// q, k, v, out: [N,C,H,W].
    fn attention(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// Gradients (dq, dk, dv) of `attention`.
    fn attention_backward(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;

    // ---- FIR resampling -----------------------------------------------------------------------
    /// StyleGAN2 `upfirdn2d` on every channel of an NCHW tensor.
    fn upfirdn2d(&self, x: &Tensor<Self>, fir: &Fir, geom: UpFirDn) -> Result<Tensor<Self>>;
    /// The adjoint of `upfirdn2d` (its gradient w.r.t. x), given the input shape.
    fn upfirdn2d_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: &[usize],
        fir: &Fir,
        geom: UpFirDn,
    ) -> Result<Tensor<Self>>;

    // ---- embeddings ---------------------------------------------------------------------------
    /// Gaussian Fourier features of log σ: e[n] = [sin(2π·ln σ[n]·W), cos(2π·ln σ[n]·W)],
    /// sigma [N], w [M] → [N, 2M].
    fn fourier_embedding(&self, sigma: &Tensor<Self>, w: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// DDPM sinusoidal embedding of labels t [N] → [N, dim] (dim even): with h = dim/2,
    /// ω_k = exp(−k·ln(max_positions)/(h−1)), e = [sin(t·ω), cos(t·ω)].
    fn sinusoidal_embedding(&self, t: &Tensor<Self>, dim: usize, max_positions: f64) -> Result<Tensor<Self>>;

    // ---- randomness ---------------------------------------------------------------------------
    /// Standard normal noise from the Philox4x32-10 counter RNG (see `crate::rng`): element i of the
    /// result is `rng::normal(seed, offset + i)`, identical on every backend.
    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor<Self>>;
    /// Uniform [0,1) noise, element i = `rng::uniform(seed, offset + i)`.
    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor<Self>>;
    /// Inverted-dropout mask: element i = 0 if `rng::uniform(seed, offset + i) < p`, else 1/(1−p).
    fn dropout_mask(&self, shape: &[usize], p: f64, seed: u64, offset: u64) -> Result<Tensor<Self>>;

    // ---- optimiser ----------------------------------------------------------------------------
    /// One Adam update of one parameter, returning (p', m', v') (all shaped like `p`). In the
    /// element type, with the constants computed in f64 and rounded once —
    /// w1 = 1−β1, w2 = 1−β2, bc2 = √(1−β2^step), step_size = lr/(1−β1^step) — each element does
    /// exactly (every operation rounded, none fused):
    /// g = grad·grad_scale; m' = m + w1·(g − m); v' = v·β2 + (w2·g)·g;
    /// p' = p − step_size·(m' / (√v' / bc2 + eps)).
    /// This is `crate::train::optim::adam_update`, i.e. torch's single-tensor float32 Adam.
    /// `hp.step` must be at least 1.
    fn adam_update(
        &self,
        p: &Tensor<Self>,
        g: &Tensor<Self>,
        m: &Tensor<Self>,
        v: &Tensor<Self>,
        hp: &AdamStep,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;
    /// One EMA step of a shadow weight towards `p`: with k = 1 − decay rounded to the element
    /// type, shadow' = shadow − k·(shadow − p) (each operation rounded, none fused).
    fn ema_update(&self, shadow: &Tensor<Self>, p: &Tensor<Self>, decay: f64) -> Result<Tensor<Self>>;
    /// [`Backend::adam_update`] of many parameters with the same settings: element i of the result
    /// is `adam_update(params[i], grads[i], m[i], v[i], hp)`, bit for bit. The four lists must
    /// have the same length. A device does it in a few launches instead of one per tensor.
    /// Default: one `adam_update` per parameter.
    fn adam_update_many(
        &self,
        params: &[&Tensor<Self>],
        grads: &[&Tensor<Self>],
        m: &[&Tensor<Self>],
        v: &[&Tensor<Self>],
        hp: &AdamStep,
    ) -> Result<Vec<AdamUpdate<Self>>> {
        validate_list_lengths("adam_update_many", &[params.len(), grads.len(), m.len(), v.len()])?;
        (0..params.len())
            .map(|i| self.adam_update(params[i], grads[i], m[i], v[i], hp))
            .collect()
    }
    /// [`Backend::ema_update`] of many shadow tensors with the same decay: element i of the
    /// result is `ema_update(shadows[i], params[i], decay)`, bit for bit; the lists must have the
    /// same length. Default: one `ema_update` per tensor.
    fn ema_update_many(
        &self,
        shadows: &[&Tensor<Self>],
        params: &[&Tensor<Self>],
        decay: f64,
    ) -> Result<Vec<Tensor<Self>>> {
        validate_list_lengths("ema_update_many", &[shadows.len(), params.len()])?;
        shadows
            .iter()
            .zip(params)
            .map(|(s, p)| self.ema_update(s, p, decay))
            .collect()
    }
    /// One training step's optimiser work in place: [`Backend::adam_update_many`] of the
    /// parameters, then [`Backend::ema_update_many`] of `shadows` towards the updated parameters
    /// with `decay`, each tensor replaced by its update, bit for bit those two ops. A backend may
    /// update buffers that no other tensor shares where they are, in one pass (the CPU does); the
    /// default runs the two list ops. On an error nothing is replaced.
    #[allow(clippy::too_many_arguments)] // the two list ops' arguments
    fn adam_ema_update_many(
        &self,
        params: &mut [&mut Tensor<Self>],
        grads: &[&Tensor<Self>],
        m: &mut [&mut Tensor<Self>],
        v: &mut [&mut Tensor<Self>],
        shadows: &mut [&mut Tensor<Self>],
        hp: &AdamStep,
        decay: f64,
    ) -> Result<()> {
        let op = "adam_ema_update_many";
        validate_list_lengths(op, &[params.len(), grads.len(), m.len(), v.len(), shadows.len()])?;
        let refs = shared_refs::<Self>;
        let updated = self.adam_update_many(&refs(params), grads, &refs(m), &refs(v), hp)?;
        let new_params: Vec<&Tensor<Self>> = updated.iter().map(|u| &u.0).collect();
        let new_shadows = self.ema_update_many(&refs(shadows), &new_params, decay)?;
        if updated.len() != params.len() || new_shadows.len() != shadows.len() {
            return Err(crate::error::Error::Backend(format!(
                "{op}: {} updates and {} shadows for {} parameters",
                updated.len(),
                new_shadows.len(),
                params.len()
            )));
        }
        for (i, (p2, m2, v2)) in updated.into_iter().enumerate() {
            (*params[i], *m[i], *v[i]) = (p2, m2, v2);
        }
        for (s, s2) in shadows.iter_mut().zip(new_shadows) {
            **s = s2;
        }
        Ok(())
    }
    /// Σx² of each tensor (accumulated in f64), delivered to the host in one transfer: the terms
    /// of a global gradient norm with a single device synchronisation. The CPU backend sums each
    /// tensor over fixed f64 lanes (bit-identical to `crate::train::optim::global_norm`'s terms); a
    /// device may sum in another order (f64, so the difference is ~1e-16 relative).
    fn squared_norms(&self, xs: &[&Tensor<Self>]) -> Result<Vec<f64>>;
    /// `affine(xs[i], scales[i], 0)` of many tensors, bit for bit: the pending constant factors
    /// of the parameter gradients at the end of a backward pass (autograd), in one pass instead of
    /// a call per tensor. Default: one `affine` per tensor.
    fn scale_many(&self, xs: &[&Tensor<Self>], scales: &[f64]) -> Result<Vec<Tensor<Self>>> {
        validate_list_lengths("scale_many", &[xs.len(), scales.len()])?;
        xs.iter()
            .zip(scales)
            .map(|(x, &s)| self.affine(x, s, 0.0))
            .collect()
    }
}
