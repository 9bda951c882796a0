//! `NCSNpp` of score_sde_pytorch as modified by sr-sde — one class for all three SDEs: with the VE
//! config it is NCSN++ (Fourier embedding, input-skip pyramid, scale_by_sigma); with the VP/subVP
//! config it is the DDPM++-style network (positional embedding, residual FIR-conv pyramid, dropout).
//! The module list mirrors the original constructor one to one, so `all_modules.{i}` names and the
//! captured activations line up with the reference.
use std::collections::BTreeMap;

use crate::autograd::{Graph, Var};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::config::{EmbeddingType, NetConfig, ProgressiveInput};
use crate::nn::{AttnBlock, Conv2d, Ctx, FirResample, GroupNorm, Linear, ParamSpecs, ResBlock, Resample};
use crate::tensor::{HostTensor, Tensor};

/// One entry of `all_modules`.
#[derive(Clone, Debug)]
enum Module {
    /// GaussianFourierProjection: frozen W [nf].
    Fourier {
        prefix: String,
        size: usize,
    },
    Linear(Linear),
    Conv(Conv2d),
    Res(ResBlock),
    Attn(AttnBlock),
    /// Combine (input_skip, sum): h + Conv1x1(pyramid).
    Combine(Conv2d),
    /// Downsample(with_conv, fir) of the residual pyramid: FIR blur then 3×3 conv stride 2.
    PyramidDown(Conv2d),
    Norm(GroupNorm),
}

/// The network: config, module list and weights on a backend.
pub struct Ncsnpp<B: Backend> {
    pub config: NetConfig,
    modules: Vec<Module>,
    weights: BTreeMap<String, Tensor<B>>,
    backend: B,
}

/// Receives (module index, output) during a forward pass.
pub type CaptureFn<'a, B> = &'a mut dyn FnMut(usize, &Tensor<B>);

/// Options of one forward pass.
pub struct Forward<'a, B: Backend> {
    /// Dropout probability to apply (training); 0 for inference.
    pub dropout: f64,
    pub dropout_seed: u64,
    /// Called with (module index, output) after each module of `all_modules`, for layer-by-layer
    /// debugging against the reference.
    pub capture: Option<CaptureFn<'a, B>>,
}

impl<B: Backend> Default for Forward<'_, B> {
    fn default() -> Self {
        Forward {
            dropout: 0.0,
            dropout_seed: 0,
            capture: None,
        }
    }
}

fn build_modules(cfg: &NetConfig) -> Vec<Module> {
    let m = &cfg.model;
    let nf = m.nf;
    let fir = FirResample {
        kernel: m.fir_kernel.clone(),
    };
    let channels = cfg.data.num_channels;
    let temb_dim = 4 * nf;
    let levels = m.ch_mult.len();
    let res_at = |level: usize| cfg.data.image_size >> level;
    let mut mods: Vec<Module> = Vec::new();
    let prefix = |i: usize| format!("all_modules.{i}");
    let res = |i: usize, in_ch: usize, out_ch: usize, resample: Resample| {
        Module::Res(ResBlock {
            prefix: prefix(i),
            in_ch,
            out_ch,
            temb_dim,
            resample,
            skip_rescale: m.skip_rescale,
            fir: fir.clone(),
        })
    };
    let attn = |i: usize, ch: usize| {
        Module::Attn(AttnBlock {
            prefix: prefix(i),
            ch,
            skip_rescale: m.skip_rescale,
        })
    };

    let embed_dim = match m.embedding_type {
        EmbeddingType::Fourier => {
            mods.push(Module::Fourier {
                prefix: prefix(0),
                size: nf,
            });
            2 * nf
        }
        EmbeddingType::Positional => nf,
    };
    let i = mods.len();
    mods.push(Module::Linear(Linear {
        prefix: prefix(i),
        in_f: embed_dim,
        out_f: temb_dim,
    }));
    mods.push(Module::Linear(Linear {
        prefix: prefix(i + 1),
        in_f: temb_dim,
        out_f: temb_dim,
    }));

    let mut pyramid_ch = channels;
    mods.push(Module::Conv(Conv2d::conv3x3(prefix(mods.len()), channels, nf)));
    let mut hs_c = vec![nf];
    let mut in_ch = nf;
    for level in 0..levels {
        for _ in 0..m.num_res_blocks {
            let out_ch = nf * m.ch_mult[level];
            mods.push(res(mods.len(), in_ch, out_ch, Resample::None));
            in_ch = out_ch;
            if m.attn_resolutions.contains(&res_at(level)) {
                mods.push(attn(mods.len(), in_ch));
            }
            hs_c.push(in_ch);
        }
        if level != levels - 1 {
            mods.push(res(mods.len(), in_ch, in_ch, Resample::Down));
            match m.progressive_input {
                ProgressiveInput::InputSkip => {
                    mods.push(Module::Combine(Conv2d::conv1x1(
                        format!("{}.Conv_0", prefix(mods.len())),
                        pyramid_ch,
                        in_ch,
                    )));
                }
                ProgressiveInput::Residual => {
                    mods.push(Module::PyramidDown(Conv2d {
                        prefix: format!("{}.Conv2d_0", prefix(mods.len())),
                        in_ch: pyramid_ch,
                        out_ch: in_ch,
                        k: 3,
                        stride: 2,
                        pad: 0,
                    }));
                    pyramid_ch = in_ch;
                }
                ProgressiveInput::None => {}
            }
            hs_c.push(in_ch);
        }
    }
    in_ch = *hs_c.last().expect("non-empty");
    mods.push(res(mods.len(), in_ch, in_ch, Resample::None));
    mods.push(attn(mods.len(), in_ch));
    mods.push(res(mods.len(), in_ch, in_ch, Resample::None));
    for level in (0..levels).rev() {
        for _ in 0..=m.num_res_blocks {
            let out_ch = nf * m.ch_mult[level];
            let skip = hs_c.pop().expect("skip channels");
            mods.push(res(mods.len(), in_ch + skip, out_ch, Resample::None));
            in_ch = out_ch;
        }
        if m.attn_resolutions.contains(&res_at(level)) {
            mods.push(attn(mods.len(), in_ch));
        }
        if level != 0 {
            mods.push(res(mods.len(), in_ch, in_ch, Resample::Up));
        }
    }
    debug_assert!(hs_c.is_empty());
    mods.push(Module::Norm(GroupNorm {
        prefix: prefix(mods.len()),
        ch: in_ch,
    }));
    mods.push(Module::Conv(Conv2d::conv3x3(
        prefix(mods.len()),
        in_ch,
        channels / 2,
    )));
    mods
}

impl Module {
    fn params(&self) -> ParamSpecs {
        match self {
            Module::Fourier { prefix, size } => vec![(format!("{prefix}.W"), vec![*size])],
            Module::Linear(l) => l.params(),
            Module::Conv(c) | Module::Combine(c) | Module::PyramidDown(c) => c.params(),
            Module::Res(r) => r.params(),
            Module::Attn(a) => a.params(),
            Module::Norm(n) => n.params(),
        }
    }
}

/// Every weight of the network in state-dict order, with its shape and whether it is trained
/// (the Fourier W is a frozen parameter). The `sigmas` buffer is not listed: it is derived.
pub fn param_specs(cfg: &NetConfig) -> Vec<(String, Vec<usize>, bool)> {
    build_modules(cfg)
        .iter()
        .flat_map(|m| {
            let frozen = matches!(m, Module::Fourier { .. });
            m.params().into_iter().map(move |(n, s)| (n, s, !frozen))
        })
        .collect()
}

impl<B: Backend> Ncsnpp<B> {
    /// Build from host weights (names as in the original state dict, without "module."), checking
    /// that every tensor is present with the right shape. `source` names the file in errors.
    pub fn from_weights(
        backend: &B,
        config: NetConfig,
        weights: &BTreeMap<String, HostTensor>,
        source: &str,
    ) -> Result<Self> {
        config.validate()?;
        let modules = build_modules(&config);
        let mut on_device = BTreeMap::new();
        for m in &modules {
            for (name, shape) in m.params() {
                let t = weights.get(&name).ok_or_else(|| Error::Weights {
                    file: source.into(),
                    tensor: name.clone(),
                    msg: "missing".into(),
                })?;
                if t.shape != shape {
                    return Err(Error::Weights {
                        file: source.into(),
                        tensor: name,
                        msg: format!("shape {:?} in file, model config expects {:?}", t.shape, shape),
                    });
                }
                on_device.insert(name, t.to_device(backend)?);
            }
        }
        Ok(Ncsnpp {
            config,
            modules,
            weights: on_device,
            backend: backend.clone(),
        })
    }

    /// Random weights (for benchmarks and tests): N(0, 1/fan_in) weights, small random biases,
    /// GroupNorm γ = 1 ± 0.1; Fourier W ~ scale·N(0,1). Deterministic in `seed`.
    pub fn random(backend: &B, config: NetConfig, seed: u64) -> Result<Self> {
        let mut host = BTreeMap::new();
        let mut offset = 0u64;
        for (name, shape, _) in param_specs(&config) {
            let n: usize = shape.iter().product();
            let mut data = vec![0f32; n];
            crate::rng::fill_normal(&mut data, seed, offset);
            offset += n as u64;
            let fan_in: usize = if shape.len() >= 2 {
                if name.ends_with(".W") {
                    shape[0]
                } else {
                    shape[1..].iter().product()
                }
            } else {
                1
            };
            let is_gn_weight = name.contains("GroupNorm") && name.ends_with("weight")
                || (shape.len() == 1 && name.ends_with("weight"));
            for v in data.iter_mut() {
                *v = if name.ends_with("all_modules.0.W") {
                    *v * config.model.fourier_scale as f32
                } else if is_gn_weight {
                    1.0 + 0.1 * *v
                } else if shape.len() == 1 {
                    0.05 * *v
                } else {
                    *v / (fan_in as f32).sqrt()
                };
            }
            host.insert(name, HostTensor::new(shape, data));
        }
        Self::from_weights(backend, config, &host, "<random init>")
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn weights(&self) -> &BTreeMap<String, Tensor<B>> {
        &self.weights
    }
    /// Number of parameters (incl. the frozen Fourier W).
    pub fn num_params(&self) -> usize {
        self.weights.values().map(|t| t.numel()).sum()
    }
    /// Copy every weight back to the host (state-dict names).
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.weights
            .iter()
            .map(|(n, t)| Ok((n.clone(), HostTensor::from_device(&self.backend, t)?)))
            .collect()
    }
    /// Runs `f` on the weights themselves, e.g. an optimiser that updates them in place (their
    /// buffers then have no other owner to copy for); the names and shapes must stay as they were
    /// (else an error, and the network keeps what `f` left).
    pub fn update_weights<R>(
        &mut self,
        f: impl FnOnce(&mut BTreeMap<String, Tensor<B>>) -> Result<R>,
    ) -> Result<R> {
        let before: Vec<(String, Vec<usize>)> = self
            .weights
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().to_vec()))
            .collect();
        let r = f(&mut self.weights)?;
        let same = before.len() == self.weights.len()
            && before
                .iter()
                .zip(&self.weights)
                .all(|((n, s), (n2, t))| n == n2 && s[..] == *t.shape());
        if !same {
            return Err(Error::Other(
                "update_weights: the names or shapes of the weights changed".into(),
            ));
        }
        Ok(r)
    }
    /// Replace the weights (same names and shapes).
    pub fn set_weights(&mut self, weights: BTreeMap<String, Tensor<B>>) -> Result<()> {
        for (n, t) in &self.weights {
            let new = weights
                .get(n)
                .ok_or_else(|| Error::Other(format!("set_weights: `{n}` missing")))?;
            crate::tensor::same_shape("set_weights", t.shape(), new.shape())?;
        }
        self.weights = weights;
        Ok(())
    }

    /// The network: `input` is the 6-channel interleaved [x_R, y_R, x_G, y_G, x_B, y_B] batch,
    /// `time_cond` [N] the conditioning label (VE: σ(t); VP/subVP: 999·t). Returns the raw output
    /// (for VE already divided by σ, i.e. the score, when scale_by_sigma).
    pub fn forward(
        &self,
        g: &Graph<B>,
        input: &Var<B>,
        time_cond: &Tensor<B>,
        mut opts: Forward<'_, B>,
    ) -> Result<Var<B>> {
        let cfg = &self.config;
        let (n, c, h, w) = input.value.dims4("ncsnpp input")?;
        let size = cfg.data.image_size;
        if c != cfg.data.num_channels || h != size || w != size {
            return Err(Error::shape(
                "ncsnpp input",
                format!(
                    "got [{n},{c},{h},{w}], model expects [N,{},{size},{size}]",
                    cfg.data.num_channels
                ),
            ));
        }
        if time_cond.shape() != [n] {
            return Err(Error::shape(
                "ncsnpp time_cond",
                format!("{:?}, expected [{n}]", time_cond.shape()),
            ));
        }
        let be = &self.backend;
        let cx = Ctx::new(g, &self.weights).with_dropout(opts.dropout, opts.dropout_seed);
        let mut capture = |i: usize, v: &Var<B>| {
            if let Some(f) = opts.capture.as_mut() {
                f(i, &v.value);
            }
        };
        let mods = &self.modules;
        let mut mi = 0;
        let module = |mi: usize| &mods[mi];

        // Time embedding.
        let emb = match module(0) {
            Module::Fourier { prefix, .. } => {
                let wv = self.weights.get(&format!("{prefix}.W")).expect("checked at load");
                let e = g.constant(be.fourier_embedding(time_cond, wv)?);
                capture(0, &e);
                mi = 1;
                e
            }
            _ => g.constant(be.sinusoidal_embedding(time_cond, cfg.model.nf, 10000.0)?),
        };
        let Module::Linear(d0) = module(mi) else {
            unreachable!("module list starts with the temb denses")
        };
        let temb = d0.forward(&cx, &emb)?;
        capture(mi, &temb);
        let Module::Linear(d1) = module(mi + 1) else {
            unreachable!()
        };
        let temb = d1.forward(&cx, &g.silu(&temb)?)?;
        capture(mi + 1, &temb);
        mi += 2;
        let act_temb = g.silu(&temb)?;

        // The guide-residual form feeds its own scaled inputs (c_in·(x − y), 2y − 1).
        let x = if cfg.data.centered || cfg.model.parameterization.sigma_data().is_some() {
            input.clone()
        } else {
            g.affine(input, 2.0, -1.0)?
        };
        let mut pyramid = x.clone();

        let run = |mi: usize, h: &Var<B>| -> Result<Var<B>> {
            match &mods[mi] {
                Module::Res(r) => r.forward(&cx, h, &act_temb),
                Module::Attn(a) => a.forward(&cx, h),
                Module::Conv(cv) => cv.forward(&cx, h),
                other => Err(Error::Other(format!("unexpected module {other:?} at {mi}"))),
            }
        };

        let Module::Conv(conv_in) = module(mi) else {
            unreachable!()
        };
        let h0 = conv_in.forward(&cx, &x)?;
        capture(mi, &h0);
        mi += 1;
        let mut hs = vec![h0];
        let levels = cfg.model.ch_mult.len();
        let fir = FirResample {
            kernel: cfg.model.fir_kernel.clone(),
        };
        for level in 0..levels {
            for _ in 0..cfg.model.num_res_blocks {
                let mut h = run(mi, hs.last().expect("non-empty"))?;
                capture(mi, &h);
                mi += 1;
                if matches!(mods.get(mi), Some(Module::Attn(_))) {
                    h = run(mi, &h)?;
                    capture(mi, &h);
                    mi += 1;
                }
                hs.push(h);
            }
            if level != levels - 1 {
                let mut h = run(mi, hs.last().expect("non-empty"))?;
                capture(mi, &h);
                mi += 1;
                match &mods[mi] {
                    Module::Combine(conv) => {
                        pyramid = fir.down(g, &pyramid)?;
                        h = g.add(&h, &conv.forward(&cx, &pyramid)?)?;
                        capture(mi, &h);
                        mi += 1;
                    }
                    Module::PyramidDown(conv) => {
                        let blurred = fir.blur_for_conv_down(g, &pyramid, conv.k)?;
                        let p = conv.forward(&cx, &blurred)?;
                        capture(mi, &p);
                        pyramid = if cfg.model.skip_rescale {
                            let s = std::f64::consts::FRAC_1_SQRT_2;
                            g.axpby(s, &p, s, &h)?
                        } else {
                            g.add(&p, &h)?
                        };
                        h = pyramid.clone();
                        mi += 1;
                    }
                    _ => {}
                }
                hs.push(h);
            }
        }
        let mut h = hs.last().expect("non-empty").clone();
        for _ in 0..3 {
            h = run(mi, &h)?;
            capture(mi, &h);
            mi += 1;
        }
        for level in (0..levels).rev() {
            for _ in 0..=cfg.model.num_res_blocks {
                let skip = hs.pop().expect("skip connection");
                h = match &mods[mi] {
                    Module::Res(r) => r.forward_parts(&cx, &[&h, &skip], &act_temb)?,
                    _ => run(mi, &g.concat_channels(&[&h, &skip])?)?,
                };
                capture(mi, &h);
                mi += 1;
            }
            if matches!(mods.get(mi), Some(Module::Attn(_))) {
                h = run(mi, &h)?;
                capture(mi, &h);
                mi += 1;
            }
            if level != 0 {
                h = run(mi, &h)?;
                capture(mi, &h);
                mi += 1;
            }
        }
        let Module::Norm(gn) = &mods[mi] else {
            unreachable!()
        };
        h = gn.forward(&cx, &h, false)?;
        capture(mi, &h);
        h = g.silu(&h)?;
        mi += 1;
        h = run(mi, &h)?;
        capture(mi, &h);
        debug_assert_eq!(mi + 1, mods.len());
        if cfg.model.scale_by_sigma {
            let inv = be.from_f32(
                &[n],
                &be.to_f32(time_cond)?.iter().map(|s| 1.0 / s).collect::<Vec<_>>(),
            )?;
            h = g.scale_per_sample(&h, &inv)?;
        }
        Ok(h)
    }
}
