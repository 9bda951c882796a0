//! Every implemented CUDA op against its CPU twin (`Cpu::<f32>`) on fresh random inputs.
//!
//! Each case draws its inputs from the Philox generator under a per-run seed (so a failure can be
//! replayed), runs the op on both backends and compares with the norm-wise relative error. The
//! CUDA handle poisons every new output buffer with NaN, so an element a kernel fails to write
//! makes the error infinite. Bounds: f32 1e-5, TF32 2e-3, bf16 2e-2; uniform noise and dropout
//! masks must match exactly, normal noise to 1e-6 (only libm's last-ulp differences in ln/cos).
use super::{Cuda, Precision};
use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Fir, UpFirDn};
use crate::check::rel_err;
use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::Tensor;

/// One compared op.
#[derive(Clone, Debug)]
pub struct SelftestRow {
    pub op: String,
    pub shape: String,
    pub precision: Precision,
    pub rel_err: f64,
    pub bound: f64,
    pub pass: bool,
    /// The error the CUDA op (or the reference) returned, if any.
    pub error: Option<String>,
}

impl std::fmt::Display for SelftestRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<24} {:<40} {:<5} {:>10.3e} {:>8.0e} {}",
            self.op,
            self.shape,
            self.precision.as_str(),
            self.rel_err,
            self.bound,
            if self.pass { "ok" } else { "FAIL" }
        )?;
        if let Some(e) = &self.error {
            write!(f, "  ({e})")?;
        }
        Ok(())
    }
}

/// How a case's input is drawn.
#[derive(Clone, Copy, Debug)]
enum Dist {
    /// mean + std·N(0, 1)
    Normal(f32, f32),
    /// exp(U(lo, hi)): positive, log-uniform (noise levels σ)
    LogUniform(f32, f32),
    /// U(lo, hi)
    Uniform(f32, f32),
}

#[derive(Clone, Debug)]
enum Op {
    Add,
    Axpby(f64, f64),
    Mul,
    Affine(f64, f64),
    ScalePerSample,
    Silu,
    SiluBackward,
    AddChannelBias,
    SumSpatial,
    SumSquares,
    Concat,
    Slice(usize, usize),
    Interleave,
    Linear,
    Nin,
    Conv {
        stride: usize,
        pad: usize,
    },
    /// conv2d_fused: inputs x, w, b, channel bias [N, O], residual; out = α·(conv + cb) + β·r.
    ConvFused {
        stride: usize,
        pad: usize,
        alpha: f64,
        beta: f64,
    },
    GroupNorm {
        groups: usize,
        silu: bool,
    },
    Attention,
    // Backward ops: inputs are the forward's inputs (without bias) followed by dy; each of the
    // three gradients is compared on a row of its own.
    LinearBackward,
    NinBackward,
    ConvBackward {
        stride: usize,
        pad: usize,
    },
    /// conv2d_backward_saved from what conv2d_fused_saving kept of x (CUDA bf16: the forward
    /// GEMM's NHWC copy whenever the weight gradient reads NHWC).
    ConvBackwardSaved {
        stride: usize,
        pad: usize,
    },
    GroupNormBackward {
        groups: usize,
        silu: bool,
    },
    /// group_norm_backward_saved with what group_norm_saving kept (CUDA: the forward's
    /// statistics partials when it took the split path).
    GroupNormBackwardSaved {
        groups: usize,
        silu: bool,
    },
    AttentionBackward,
    UpFirDn(Fir, UpFirDn),
    UpFirDnBackward(Fir, UpFirDn, Vec<usize>),
    Fourier,
    Sinusoidal {
        dim: usize,
        max_positions: f64,
    },
    Randn(Vec<usize>, u64),
    Uniform(Vec<usize>, u64),
    Dropout(Vec<usize>, f64, u64),
}

struct Case {
    name: &'static str,
    op: Op,
    inputs: Vec<(Vec<usize>, Dist)>,
    precision: Precision,
    bound: f64,
}

/// The op's outputs (one for a forward op, the gradients for a backward op).
fn apply<B: Backend>(b: &B, op: &Op, x: &[Tensor<B>]) -> Result<Vec<Tensor<B>>> {
    let grads = |g: crate::backend::Grads3<B>| vec![g.dx, g.dw, g.db];
    Ok(match op {
        Op::LinearBackward => grads(b.linear_backward(&x[0], &x[1], &x[2])?),
        Op::NinBackward => grads(b.nin_backward(&x[0], &x[1], &x[2])?),
        Op::ConvBackward { stride, pad } => grads(b.conv2d_backward(&x[0], &x[1], &x[2], *stride, *pad)?),
        Op::ConvBackwardSaved { stride, pad } => {
            let none = crate::backend::ConvEpilogue {
                channel_bias: None,
                residual: None,
            };
            let (_, kept) = b.conv2d_fused_saving(&x[0], &x[1], None, *stride, *pad, &none)?;
            grads(b.conv2d_backward_saved(&kept, &x[1], &x[2], *stride, *pad)?)
        }
        Op::GroupNormBackward { groups, silu } => {
            grads(b.group_norm_backward(&x[0], &x[1], &x[2], &x[3], *groups, 1e-6, *silu)?)
        }
        Op::GroupNormBackwardSaved { groups, silu } => {
            let (_, kept) = b.group_norm_saving(&x[0], &x[1], &x[2], *groups, 1e-6, *silu)?;
            grads(b.group_norm_backward_saved(&x[0], &kept, &x[1], &x[2], &x[3], *groups, 1e-6, *silu)?)
        }
        Op::AttentionBackward => {
            let (dq, dk, dv) = b.attention_backward(&x[0], &x[1], &x[2], &x[3])?;
            vec![dq, dk, dv]
        }
        _ => vec![apply_forward(b, op, x)?],
    })
}

/// Names of the op's outputs, for the rows ("" for a single output).
fn output_names(op: &Op) -> &'static [&'static str] {
    match op {
        Op::LinearBackward | Op::NinBackward | Op::ConvBackward { .. } | Op::ConvBackwardSaved { .. } => {
            &["dx", "dw", "db"]
        }
        Op::GroupNormBackward { .. } | Op::GroupNormBackwardSaved { .. } => &["dx", "dgamma", "dbeta"],
        Op::AttentionBackward => &["dq", "dk", "dv"],
        _ => &[""],
    }
}

fn apply_forward<B: Backend>(b: &B, op: &Op, x: &[Tensor<B>]) -> Result<Tensor<B>> {
    match op {
        Op::Add => b.add(&x[0], &x[1]),
        Op::Axpby(a, c) => b.axpby(*a, &x[0], *c, &x[1]),
        Op::Mul => b.mul(&x[0], &x[1]),
        Op::Affine(s, t) => b.affine(&x[0], *s, *t),
        Op::ScalePerSample => b.scale_per_sample(&x[0], &x[1]),
        Op::Silu => b.silu(&x[0]),
        Op::SiluBackward => b.silu_backward(&x[0], &x[1]),
        Op::AddChannelBias => b.add_channel_bias(&x[0], &x[1]),
        Op::SumSpatial => b.sum_spatial(&x[0]),
        Op::SumSquares => b.sum_squares_per_sample(&x[0]),
        Op::Concat => b.concat_channels(&x.iter().collect::<Vec<_>>()),
        Op::Slice(s, l) => b.slice_channels(&x[0], *s, *l),
        Op::Interleave => b.interleave_channels(&x[0], &x[1]),
        Op::Linear => b.linear(&x[0], &x[1], x.get(2)),
        Op::Nin => b.nin(&x[0], &x[1], &x[2]),
        Op::Conv { stride, pad } => b.conv2d(&x[0], &x[1], x.get(2), *stride, *pad),
        Op::ConvFused {
            stride,
            pad,
            alpha,
            beta,
        } => {
            let epi = crate::backend::ConvEpilogue {
                channel_bias: Some(&x[3]),
                residual: Some((&x[4], *alpha, *beta)),
            };
            b.conv2d_fused(&x[0], &x[1], Some(&x[2]), *stride, *pad, &epi)
        }
        Op::GroupNorm { groups, silu } => b.group_norm(&x[0], &x[1], &x[2], *groups, 1e-6, *silu),
        Op::Attention => b.attention(&x[0], &x[1], &x[2]),
        Op::UpFirDn(f, g) => b.upfirdn2d(&x[0], f, *g),
        Op::UpFirDnBackward(f, g, xs) => b.upfirdn2d_backward(&x[0], xs, f, *g),
        Op::Fourier => b.fourier_embedding(&x[0], &x[1]),
        Op::Sinusoidal { dim, max_positions } => b.sinusoidal_embedding(&x[0], *dim, *max_positions),
        Op::Randn(shape, seed) => b.randn(shape, *seed, 1 << 33),
        Op::Uniform(shape, seed) => b.rand_uniform(shape, *seed, 12345),
        Op::Dropout(shape, p, seed) => b.dropout_mask(shape, *p, *seed, 7),
        Op::LinearBackward
        | Op::NinBackward
        | Op::ConvBackward { .. }
        | Op::ConvBackwardSaved { .. }
        | Op::GroupNormBackward { .. }
        | Op::GroupNormBackwardSaved { .. }
        | Op::AttentionBackward => Err(Error::Other("selftest: a backward op has several outputs".into())),
    }
}

fn draw(shape: &[usize], dist: Dist, seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    (0..n as u64)
        .map(|i| match dist {
            Dist::Normal(m, s) => m + s * rng::normal(seed, i),
            Dist::LogUniform(lo, hi) => (lo + (hi - lo) * rng::uniform(seed, i)).exp(),
            Dist::Uniform(lo, hi) => lo + (hi - lo) * rng::uniform(seed, i),
        })
        .collect()
}

const F32_BOUND: f64 = 1e-5;

/// One conv2d case: input (N, C, H, W), O output channels, k×k kernel, stride, pad, with bias.
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize, bool);

/// The models' convs (6 → 128 first conv, 128 → 256, the strided VP pyramid conv, 1×1 skips,
/// the 128 → 3 output conv) plus odd sizes, stride 2 and 3, and a 5×5 kernel.
const CONVS: &[ConvCase] = &[
    (1, 6, 32, 32, 128, 3, 1, 1, true),
    (2, 128, 16, 16, 256, 3, 1, 1, true),
    (2, 128, 17, 17, 256, 3, 2, 0, true),
    (3, 5, 11, 13, 7, 3, 2, 1, true),
    (2, 512, 8, 8, 256, 1, 1, 0, true),
    (1, 128, 64, 64, 3, 3, 1, 1, true),
    (1, 128, 64, 64, 128, 3, 1, 1, false),
    (2, 4, 10, 10, 6, 5, 3, 2, false),
    // Wide enough for the 128-pixel tiles of the pipelined bf16 kernel; C off its 32-channel tile.
    (2, 40, 96, 96, 64, 3, 1, 1, true),
];

fn bound_for(p: Precision) -> f64 {
    match p {
        Precision::F32 => F32_BOUND,
        Precision::Tf32 => 2e-3,
        Precision::Bf16 => 2e-2,
    }
}

fn n01() -> Dist {
    Dist::Normal(0.0, 1.0)
}

/// The list of cases: the models' channel counts (6 → 128/256/512, 3 out), stride 2, odd sizes.
fn cases(seed: u64) -> Vec<Case> {
    let f32c = |name, op, inputs| Case {
        name,
        op,
        inputs,
        precision: Precision::F32,
        bound: F32_BOUND,
    };
    let mut v = Vec::new();
    for shape in [vec![2, 128, 16, 16], vec![3, 5, 7, 9]] {
        let two = vec![(shape.clone(), n01()), (shape.clone(), n01())];
        v.push(f32c("add", Op::Add, two.clone()));
        v.push(f32c("axpby", Op::Axpby(0.7, -1.3), two.clone()));
        v.push(f32c("mul", Op::Mul, two.clone()));
        v.push(f32c(
            "affine",
            Op::Affine(1.5, -0.25),
            vec![(shape.clone(), n01())],
        ));
        v.push(f32c(
            "scale_per_sample",
            Op::ScalePerSample,
            vec![(shape.clone(), n01()), (vec![shape[0]], n01())],
        ));
        v.push(f32c(
            "silu",
            Op::Silu,
            vec![(shape.clone(), Dist::Normal(0.0, 4.0))],
        ));
        v.push(f32c(
            "silu_backward",
            Op::SiluBackward,
            vec![(shape.clone(), Dist::Normal(0.0, 4.0)), (shape.clone(), n01())],
        ));
        v.push(f32c(
            "add_channel_bias",
            Op::AddChannelBias,
            vec![(shape.clone(), n01()), (shape[..2].to_vec(), n01())],
        ));
        v.push(f32c(
            "sum_spatial",
            Op::SumSpatial,
            vec![(shape.clone(), Dist::Normal(0.3, 1.0))],
        ));
        v.push(f32c("interleave_channels", Op::Interleave, two));
    }
    v.push(f32c(
        "sum_spatial",
        Op::SumSpatial,
        vec![(vec![2, 16, 128, 128], Dist::Normal(0.1, 1.0))],
    ));
    v.push(f32c(
        "sum_squares_per_sample",
        Op::SumSquares,
        vec![(vec![4, 3, 128, 128], n01())],
    ));
    v.push(f32c(
        "sum_squares_per_sample",
        Op::SumSquares,
        vec![(vec![3, 5, 7, 9], n01())],
    ));
    v.push(f32c(
        "concat_channels",
        Op::Concat,
        vec![
            (vec![2, 128, 8, 8], n01()),
            (vec![2, 64, 8, 8], n01()),
            (vec![2, 3, 8, 8], n01()),
        ],
    ));
    v.push(f32c(
        "slice_channels",
        Op::Slice(5, 17),
        vec![(vec![2, 64, 9, 7], n01())],
    ));
    v.push(f32c(
        "slice_channels",
        Op::Slice(0, 3),
        vec![(vec![3, 6, 16, 16], n01())],
    ));

    v.push(f32c(
        "linear",
        Op::Linear,
        vec![
            (vec![4, 128], n01()),
            (vec![512, 128], Dist::Normal(0.0, 0.1)),
            (vec![512], n01()),
        ],
    ));
    v.push(f32c(
        "linear",
        Op::Linear,
        vec![(vec![3, 37], n01()), (vec![19, 37], n01())],
    ));

    // GEMM-backed ops at every precision.
    for p in Precision::ALL {
        let b = bound_for(p);
        let w = |s: f32| Dist::Normal(0.0, s);
        v.push(Case {
            name: "nin",
            op: Op::Nin,
            inputs: vec![
                (vec![2, 256, 16, 16], n01()),
                (vec![256, 256], w(0.06)),
                (vec![256], n01()),
            ],
            precision: p,
            bound: b,
        });
        v.push(Case {
            name: "nin",
            op: Op::Nin,
            inputs: vec![(vec![3, 5, 7, 9], n01()), (vec![5, 11], n01()), (vec![11], n01())],
            precision: p,
            bound: b,
        });
        for &(n, c, h, wd, o, k, stride, pad, bias) in CONVS {
            let mut inputs = vec![
                (vec![n, c, h, wd], n01()),
                (vec![o, c, k, k], w(1.0 / ((c * k * k) as f32).sqrt())),
            ];
            if bias {
                inputs.push((vec![o], n01()));
            }
            v.push(Case {
                name: "conv2d",
                op: Op::Conv { stride, pad },
                inputs,
                precision: p,
                bound: b,
            });
        }
        // The residual-block epilogue (fused into the bf16 kernel, separate ops otherwise), with
        // and without split-K (batch 1 at 8×8 splits K).
        for &(n, c, h, wd, o) in &[(2usize, 64usize, 32usize, 32usize, 128usize), (1, 256, 8, 8, 256)] {
            let s = std::f64::consts::FRAC_1_SQRT_2;
            v.push(Case {
                name: "conv2d_fused",
                op: Op::ConvFused {
                    stride: 1,
                    pad: 1,
                    alpha: s,
                    beta: s,
                },
                inputs: vec![
                    (vec![n, c, h, wd], n01()),
                    (vec![o, c, 3, 3], w(1.0 / ((c * 9) as f32).sqrt())),
                    (vec![o], n01()),
                    (vec![n, o], n01()),
                    (vec![n, o, h, wd], n01()),
                ],
                precision: p,
                bound: b,
            });
        }
    }

    for (shape, groups, silu) in [
        (vec![2, 128, 16, 16], 32, true),
        (vec![2, 256, 8, 8], 32, false),
        (vec![1, 128, 128, 128], 32, true),
        (vec![3, 12, 5, 7], 4, false),
    ] {
        let c = shape[1];
        v.push(f32c(
            "group_norm",
            Op::GroupNorm { groups, silu },
            vec![
                (shape, Dist::Normal(0.5, 2.0)),
                (vec![c], Dist::Normal(1.0, 0.3)),
                (vec![c], n01()),
            ],
        ));
    }
    for shape in [
        vec![2, 256, 16, 16],
        vec![1, 512, 2, 2],
        vec![3, 32, 5, 7],
        vec![1, 64, 24, 24],
        vec![9, 64, 16, 16], // enough 16-query blocks to fill a 132-SM device: attn_forward
    ] {
        let inputs = vec![(shape.clone(), n01()), (shape.clone(), n01()), (shape, n01())];
        v.push(f32c("attention", Op::Attention, inputs));
    }

    backward_cases(&mut v);

    let k4 = [1.0f32, 3.0, 3.0, 1.0];
    let odd = Fir {
        taps: vec![0.3, -0.1, 0.5, 0.25, 0.7, -0.4],
        kh: 3,
        kw: 2,
    };
    let firs = [
        (
            "down2",
            Fir::separable(&k4, 1.0),
            UpFirDn {
                up: 1,
                down: 2,
                pad0: 1,
                pad1: 1,
            },
        ),
        (
            "up2",
            Fir::separable(&k4, 4.0),
            UpFirDn {
                up: 2,
                down: 1,
                pad0: 2,
                pad1: 1,
            },
        ),
        (
            "blur",
            Fir::separable(&k4, 1.0),
            UpFirDn {
                up: 1,
                down: 1,
                pad0: 2,
                pad1: 2,
            },
        ),
        (
            "odd",
            odd,
            UpFirDn {
                up: 3,
                down: 2,
                pad0: -1,
                pad1: 2,
            },
        ),
    ];
    for shape in [vec![2, 128, 16, 16], vec![3, 5, 7, 9]] {
        for (_, fir, g) in &firs {
            v.push(f32c(
                "upfirdn2d",
                Op::UpFirDn(fir.clone(), *g),
                vec![(shape.clone(), n01())],
            ));
            let (oh, ow) = (g.out_size(shape[2], fir.kh), g.out_size(shape[3], fir.kw));
            v.push(f32c(
                "upfirdn2d_backward",
                Op::UpFirDnBackward(fir.clone(), *g, shape.clone()),
                vec![(vec![shape[0], shape[1], oh, ow], n01())],
            ));
        }
    }

    v.push(f32c(
        "fourier_embedding",
        Op::Fourier,
        vec![
            (vec![4], Dist::LogUniform(0.01f32.ln(), 348f32.ln())),
            (vec![128], Dist::Normal(0.0, 16.0)),
        ],
    ));
    v.push(f32c(
        "sinusoidal_embedding",
        Op::Sinusoidal {
            dim: 128,
            max_positions: 10000.0,
        },
        vec![(vec![5], Dist::Uniform(0.0, 999.0))],
    ));
    let exact = |name, op| Case {
        name,
        op,
        inputs: vec![],
        precision: Precision::F32,
        bound: 0.0,
    };
    v.push(Case {
        bound: 1e-6,
        ..exact("randn", Op::Randn(vec![2, 3, 17, 19], seed))
    });
    v.push(exact("rand_uniform", Op::Uniform(vec![3, 1000], seed ^ 0x5555)));
    v.push(exact(
        "dropout_mask",
        Op::Dropout(vec![4, 999], 0.1, seed.rotate_left(17)),
    ));
    v
}

fn shape_text(c: &Case) -> String {
    let ins: Vec<String> = c.inputs.iter().map(|(s, _)| format!("{s:?}")).collect();
    let extra = match &c.op {
        Op::Conv { stride, pad }
        | Op::ConvBackward { stride, pad }
        | Op::ConvBackwardSaved { stride, pad } => format!(" s{stride} p{pad}"),
        Op::ConvFused {
            stride,
            pad,
            alpha,
            beta,
        } => format!(" s{stride} p{pad} α{alpha:.3} β{beta:.3}"),
        Op::GroupNorm { groups, silu }
        | Op::GroupNormBackward { groups, silu }
        | Op::GroupNormBackwardSaved { groups, silu } => {
            format!(" g{groups}{}", if *silu { "+silu" } else { "" })
        }
        Op::UpFirDn(f, g) | Op::UpFirDnBackward(f, g, _) => {
            format!(
                " k{}x{} up{} dn{} pad{},{}",
                f.kh, f.kw, g.up, g.down, g.pad0, g.pad1
            )
        }
        Op::Randn(s, _) | Op::Uniform(s, _) | Op::Dropout(s, _, _) => format!("{s:?}"),
        _ => String::new(),
    };
    format!("{}{}", ins.join(" "), extra)
}

/// Run every case; `seed` picks the inputs (print it so a failure can be replayed).
pub fn selftest(cuda: &Cuda, seed: u64) -> Result<Vec<SelftestRow>> {
    selftest_against(cuda, &Cpu::<f32>::new(), seed)
}

/// The same against any reference backend (e.g. `Cpu::<f64>` for a stricter look).
pub fn selftest_against<R: Backend>(cuda: &Cuda, reference: &R, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut rows = Vec::new();
    for (ci, case) in cases(seed).into_iter().enumerate() {
        let host: Vec<Vec<f32>> = case
            .inputs
            .iter()
            .enumerate()
            .map(|(ii, (shape, dist))| {
                draw(
                    shape,
                    *dist,
                    seed.wrapping_mul(1000).wrapping_add((ci * 8 + ii) as u64),
                )
            })
            .collect();
        let want = (|| {
            let xs = case
                .inputs
                .iter()
                .zip(&host)
                .map(|((s, _), d)| reference.from_f32(s, d))
                .collect::<Result<Vec<_>>>()?;
            apply(reference, &case.op, &xs)?
                .iter()
                .map(|y| reference.to_f32(y))
                .collect::<Result<Vec<_>>>()
        })();
        // bf16 GEMMs run three times: as the backend picks the input layout for this size, and
        // with every GEMM forced onto the NHWC-input kernels (rows "[nhwc]", "[nhwc-k64]").
        let gemm = matches!(
            case.op,
            Op::Conv { .. }
                | Op::ConvFused { .. }
                | Op::ConvBackward { .. }
                | Op::ConvBackwardSaved { .. }
                | Op::Nin
                | Op::NinBackward
                | Op::Linear
                | Op::LinearBackward
        );
        // Forced layouts: NHWC from 0 pixels, with 32- (false) or 64-channel (true) K tiles.
        let layouts: &[Option<bool>] = if gemm && case.precision == Precision::Bf16 {
            &[None, Some(false), Some(true)]
        } else {
            &[None]
        };
        for &layout in layouts {
            let mut dev = cuda.with_precision(case.precision).with_poison(true);
            if let Some(k64) = layout {
                // The 32-channel rows also keep the 32-pixel-tile layout pass covered.
                dev = dev.with_nhwc_min_pixels(0).with_nhwc_k64(k64).with_nhwc_wide(k64);
            }
            let got = (|| {
                let xs = case
                    .inputs
                    .iter()
                    .zip(&host)
                    .map(|((s, _), d)| dev.from_f32(s, d))
                    .collect::<Result<Vec<_>>>()?;
                let ys = apply(&dev, &case.op, &xs)?;
                dev.synchronize()?;
                ys.iter().map(|y| dev.to_f32(y)).collect::<Result<Vec<_>>>()
            })();
            for (oi, out_name) in output_names(&case.op).iter().enumerate() {
                let (rel, error) = match (&got, &want) {
                    (Ok(g), Ok(w)) => match (g.get(oi), w.get(oi)) {
                        (Some(g), Some(w)) => (rel_err(g, w), None),
                        _ => (f64::INFINITY, Some(format!("output {out_name} missing"))),
                    },
                    (Err(e), _) => (f64::INFINITY, Some(format!("cuda: {e}"))),
                    (_, Err(e)) => (f64::INFINITY, Some(format!("reference: {e}"))),
                };
                let mut op = if out_name.is_empty() {
                    case.name.to_string()
                } else {
                    format!("{}.{out_name}", case.name)
                };
                match layout {
                    Some(false) => op.push_str("[nhwc]"),
                    Some(true) => op.push_str("[nhwc-k64]"),
                    None => {}
                }
                rows.push(SelftestRow {
                    op,
                    shape: shape_text(&case),
                    precision: case.precision,
                    rel_err: rel,
                    bound: case.bound,
                    pass: error.is_none() && rel <= case.bound,
                    error,
                });
            }
            // A failed launch leaves the context unusable: report what we have.
            if fatal(rows.last()) {
                return Ok(rows);
            }
        }
    }
    rows.extend(training_gradients(cuda, reference, seed));
    Ok(rows)
}

/// Header line matching `SelftestRow`'s Display.
pub fn header() -> String {
    format!(
        "{:<24} {:<40} {:<5} {:>10} {:>8} {}",
        "op", "shape", "prec", "rel_err", "bound", "result"
    )
}

/// Whether a row's error leaves the CUDA context unusable (a failed launch).
fn fatal(row: Option<&SelftestRow>) -> bool {
    row.and_then(|r| r.error.as_deref())
        .is_some_and(|e| e.contains("CUDA_ERROR_ILLEGAL") || e.contains("CUDA_ERROR_LAUNCH"))
}

/// Backward cases: the forward shapes plus odd strided geometries ((H+2p−K) % s ≠ 0), 1×1 with
/// padding, and batches large enough that the weight gradient is split over pixels.
fn backward_cases(v: &mut Vec<Case>) {
    let f32c = |name, op, inputs| Case {
        name,
        op,
        inputs,
        precision: Precision::F32,
        bound: F32_BOUND,
    };
    let n01 = n01();
    let w = |s: f32| Dist::Normal(0.0, s);
    v.push(f32c(
        "linear_backward",
        Op::LinearBackward,
        vec![(vec![4, 128], n01), (vec![512, 128], w(0.1)), (vec![4, 512], n01)],
    ));
    v.push(f32c(
        "linear_backward",
        Op::LinearBackward,
        vec![(vec![3, 37], n01), (vec![19, 37], n01), (vec![3, 19], n01)],
    ));
    const EXTRA_CONVS: &[ConvCase] = &[
        (2, 5, 10, 9, 6, 3, 2, 0, false),
        (1, 3, 12, 11, 4, 3, 2, 1, false),
        (1, 6, 7, 8, 5, 1, 1, 1, false),
        (8, 64, 32, 32, 64, 3, 1, 1, false),
        (4, 128, 64, 64, 128, 3, 1, 1, false),
    ];
    for p in Precision::ALL {
        let b = bound_for(p);
        for (x, wt) in [
            (vec![2, 256, 16, 16], vec![256, 256]),
            (vec![3, 5, 7, 9], vec![5, 11]),
            (vec![16, 128, 32, 32], vec![128, 64]),
        ] {
            let dy = vec![x[0], wt[1], x[2], x[3]];
            let s = 1.0 / (wt[0] as f32).sqrt();
            v.push(Case {
                name: "nin_backward",
                op: Op::NinBackward,
                inputs: vec![(x, n01), (wt, w(s)), (dy, n01)],
                precision: p,
                bound: b,
            });
        }
        for &(n, c, h, wd, o, k, stride, pad, _) in CONVS.iter().chain(EXTRA_CONVS) {
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (wd + 2 * pad - k) / stride + 1);
            let inputs = vec![
                (vec![n, c, h, wd], n01),
                (vec![o, c, k, k], w(1.0 / ((c * k * k) as f32).sqrt())),
                (vec![n, o, oh, ow], n01),
            ];
            // The training route too: the backward from what the forward kept (bf16 only; at
            // f32/TF32 that is x itself, this row).
            if p == Precision::Bf16 {
                v.push(Case {
                    name: "conv2d_backward_saved",
                    op: Op::ConvBackwardSaved { stride, pad },
                    inputs: inputs.clone(),
                    precision: p,
                    bound: b,
                });
            }
            v.push(Case {
                name: "conv2d_backward",
                op: Op::ConvBackward { stride, pad },
                inputs,
                precision: p,
                bound: b,
            });
        }
    }
    for (shape, groups, silu) in [
        (vec![2, 128, 16, 16], 32, true),
        (vec![2, 256, 8, 8], 32, false),
        (vec![2, 128, 64, 64], 32, true),
        (vec![3, 12, 5, 7], 4, false),
        (vec![3, 12, 5, 7], 4, true),
        (vec![2, 9, 1, 1], 3, true),
        // The split kernels (gn_bwd_*): batch 1 at 128×128, and H·W odd (no float4) in 17 spans.
        (vec![1, 128, 128, 128], 32, true),
        (vec![2, 16, 45, 47], 4, false),
    ] {
        let c = shape[1];
        let inputs = vec![
            (shape.clone(), Dist::Normal(0.5, 2.0)),
            (vec![c], Dist::Normal(1.0, 0.3)),
            (vec![c], n01),
            (shape, n01),
        ];
        v.push(f32c(
            "group_norm_backward",
            Op::GroupNormBackward { groups, silu },
            inputs.clone(),
        ));
        // The training route: statistics from the forward's partials where it kept them.
        v.push(f32c(
            "group_norm_backward_saved",
            Op::GroupNormBackwardSaved { groups, silu },
            inputs,
        ));
    }
    for shape in [
        vec![2, 256, 16, 16],
        vec![1, 512, 2, 2],
        vec![3, 32, 5, 7],
        vec![2, 64, 17, 15],
        vec![8, 256, 16, 16],
    ] {
        let inputs = vec![(shape.clone(), n01); 4];
        v.push(f32c("attention_backward", Op::AttentionBackward, inputs));
    }
}

/// End to end: the training-loss gradient of every trainable parameter of the `ve-tiny` network
/// (the paper's DSM loss) and of `ve-res-tiny` (the guide-residual wrapper and its EDM loss) —
/// random weights, a batch of 2 at 128×128 — on CUDA at each precision against the reference
/// backend; see [`compare_training`].
pub fn training_gradients<R: Backend>(cuda: &Cuda, reference: &R, seed: u64) -> Vec<SelftestRow> {
    let mut rows = Vec::new();
    for p in Precision::ALL {
        if !cuda.supports(p) {
            continue;
        }
        for preset in TRAIN_PRESETS {
            rows.extend(compare_training(
                &cuda.with_precision(p).with_poison(true),
                reference,
                preset,
                p,
                seed,
            ));
            if fatal(rows.last()) {
                return rows;
            }
        }
    }
    rows
}

/// The networks of the end-to-end training rows: the paper's form and the guide-residual one.
const TRAIN_PRESETS: [&str; 2] = ["ve-tiny", "ve-res-tiny"];

/// (per-sample losses, gradients by name) of the training loss of `preset` on one backend.
type TrainRun = (Vec<f64>, std::collections::BTreeMap<String, Vec<f32>>);

#[allow(clippy::too_many_arguments)]
fn train_run<B: Backend>(
    b: &B,
    preset: &str,
    seed: u64,
    x0: &[f32],
    y: &[f32],
    z: &[f32],
    t: &[f64],
    shape: &[usize],
) -> Result<TrainRun> {
    use crate::model::{Ncsnpp, NetConfig, ScoreModel};
    let cfg = NetConfig::preset(preset)?;
    let model = ScoreModel::new(Ncsnpp::random(b, cfg, seed)?);
    let (x0, y, z) = (
        b.from_f32(shape, x0)?,
        b.from_f32(shape, y)?,
        b.from_f32(shape, z)?,
    );
    let out = crate::train::loss::dsm_loss(&model, &x0, &y, t, &z, 0, true)?;
    let grads = out
        .grads
        .ok_or_else(|| Error::Other("dsm_loss returned no gradients".into()))?;
    let mut by_name = std::collections::BTreeMap::new();
    for (name, g) in &grads.by_name {
        by_name.insert(name.clone(), b.to_f32(g)?);
    }
    Ok((out.per_sample, by_name))
}

/// The DSM loss and its parameter gradients on `dev` against `reference`, as three rows: the
/// per-sample losses, all gradients together (norm-wise), and the worst single parameter. The
/// attention key bias (`…NIN_1.b`) is left out: its true gradient is 0 (softmax ignores a per-row
/// shift), so both sides hold only rounding noise. `precision` labels the rows and picks the
/// bounds (the per-op bounds grown by the depth of the network).
pub fn compare_training<D: Backend, R: Backend>(
    dev: &D,
    reference: &R,
    preset: &str,
    precision: Precision,
    seed: u64,
) -> Vec<SelftestRow> {
    let (n, hw) = (2usize, 128usize);
    let shape = [n, 3, hw, hw];
    let host = |k: u64, dist: Dist| draw(&shape, dist, seed.wrapping_mul(7919).wrapping_add(k));
    let (x0, y, z) = (
        host(1, Dist::Uniform(0.0, 1.0)),
        host(2, Dist::Uniform(0.0, 1.0)),
        host(3, n01()),
    );
    let t = [0.1, 0.6];
    let shape_text = format!("{preset} {shape:?} dsm t={t:?}");
    let bounds = match precision {
        Precision::F32 => [1e-5, 1e-4, 1e-3],
        Precision::Tf32 => [1e-2, 3e-2, 1e-1],
        Precision::Bf16 => [5e-2, 1e-1, 3e-1],
    };
    let want = train_run(reference, preset, seed, &x0, &y, &z, &t, &shape);
    let got = train_run(dev, preset, seed, &x0, &y, &z, &t, &shape);
    let mut rows = Vec::new();
    let mut row = |op: &str, shape: String, rel: f64, bound: f64, error: Option<String>| {
        rows.push(SelftestRow {
            op: op.to_string(),
            shape,
            precision,
            rel_err: rel,
            bound,
            pass: error.is_none() && rel <= bound,
            error,
        })
    };
    match (&got, &want) {
        (Err(e), _) => row(
            "train.loss",
            shape_text,
            f64::INFINITY,
            bounds[0],
            Some(format!("cuda: {e}")),
        ),
        (_, Err(e)) => row(
            "train.loss",
            shape_text,
            f64::INFINITY,
            bounds[0],
            Some(format!("reference: {e}")),
        ),
        (Ok((gl, gg)), Ok((wl, wg))) => {
            row(
                "train.loss",
                shape_text.clone(),
                crate::check::rel_err_f64(gl, wl),
                bounds[0],
                None,
            );
            let (mut all_got, mut all_want) = (Vec::new(), Vec::new());
            let (mut worst, mut worst_name, mut missing) = (0.0f64, String::new(), Vec::new());
            for (name, w) in wg {
                if name.ends_with("NIN_1.b") {
                    continue;
                }
                let Some(g) = gg.get(name) else {
                    missing.push(name.clone());
                    continue;
                };
                let e = rel_err(g, w);
                if e > worst || worst_name.is_empty() {
                    worst = e;
                    worst_name = name.clone();
                }
                all_got.extend_from_slice(g);
                all_want.extend_from_slice(w);
            }
            let error = (!missing.is_empty() || gg.len() != wg.len())
                .then(|| format!("{} vs {} gradients; missing: {missing:?}", gg.len(), wg.len()));
            row(
                "train.grads",
                format!("{shape_text} {} params", wg.len()),
                rel_err(&all_got, &all_want),
                bounds[1],
                error,
            );
            row("train.grad.worst", worst_name, worst, bounds[2], None);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every backward case is valid for the reference (shapes agree, one result per output
    /// name), checked on the CPU for the cases small enough to run quickly here.
    #[test]
    fn backward_cases_run_on_the_reference() {
        let cpu = Cpu::<f32>::new();
        let mut cases = Vec::new();
        backward_cases(&mut cases);
        let mut ran = 0;
        for case in &cases {
            let elems: usize = case.inputs.iter().map(|(s, _)| s.iter().product::<usize>()).sum();
            if elems > 300_000 {
                continue;
            }
            let xs: Vec<_> = case
                .inputs
                .iter()
                .map(|(s, d)| cpu.from_f32(s, &draw(s, *d, 5)).unwrap())
                .collect();
            let ys = apply(&cpu, &case.op, &xs).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(ys.len(), output_names(&case.op).len(), "{}", case.name);
            // dx has the input's shape and dw the weight's; dq, dk, dv all have q's.
            let want: Vec<&[usize]> = match case.op {
                Op::AttentionBackward => vec![xs[0].shape(); 3],
                _ => vec![xs[0].shape(), xs[1].shape()],
            };
            for (y, w) in ys.iter().zip(want) {
                assert_eq!(y.shape(), w, "{} {}", case.name, shape_text(case));
            }
            ran += 1;
        }
        assert!(ran >= 20, "{ran} cases ran");
    }

    /// The end-to-end rows on CPU f32 against CPU f64: the machinery works and the f32 bounds
    /// leave room for f32 rounding through the whole network.
    #[test]
    fn training_rows_pass_for_cpu_f32_against_f64() {
        for preset in TRAIN_PRESETS {
            let rows = compare_training(&Cpu::<f32>::new(), &Cpu::<f64>::new(), preset, Precision::F32, 3);
            for r in &rows {
                println!("{r}");
            }
            assert_eq!(rows.len(), 3);
            assert!(rows.iter().all(|r| r.pass), "{rows:#?}");
        }
    }
}
