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
use crate::error::Result;
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
    Conv { stride: usize, pad: usize },
    GroupNorm { groups: usize, silu: bool },
    Attention,
    UpFirDn(Fir, UpFirDn),
    UpFirDnBackward(Fir, UpFirDn, Vec<usize>),
    Fourier,
    Sinusoidal { dim: usize, max_positions: f64 },
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

fn apply<B: Backend>(b: &B, op: &Op, x: &[Tensor<B>]) -> Result<Tensor<B>> {
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
        Op::GroupNorm { groups, silu } => b.group_norm(&x[0], &x[1], &x[2], *groups, 1e-6, *silu),
        Op::Attention => b.attention(&x[0], &x[1], &x[2]),
        Op::UpFirDn(f, g) => b.upfirdn2d(&x[0], f, *g),
        Op::UpFirDnBackward(f, g, xs) => b.upfirdn2d_backward(&x[0], xs, f, *g),
        Op::Fourier => b.fourier_embedding(&x[0], &x[1]),
        Op::Sinusoidal { dim, max_positions } => b.sinusoidal_embedding(&x[0], *dim, *max_positions),
        Op::Randn(shape, seed) => b.randn(shape, *seed, 1 << 33),
        Op::Uniform(shape, seed) => b.rand_uniform(shape, *seed, 12345),
        Op::Dropout(shape, p, seed) => b.dropout_mask(shape, *p, *seed, 7),
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
    ] {
        let inputs = vec![(shape.clone(), n01()), (shape.clone(), n01()), (shape, n01())];
        v.push(f32c("attention", Op::Attention, inputs));
    }

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
        Op::Conv { stride, pad } => format!(" s{stride} p{pad}"),
        Op::GroupNorm { groups, silu } => format!(" g{groups}{}", if *silu { "+silu" } else { "" }),
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
            reference.to_f32(&apply(reference, &case.op, &xs)?)
        })();
        let dev = cuda.with_precision(case.precision).with_poison(true);
        let got = (|| {
            let xs = case
                .inputs
                .iter()
                .zip(&host)
                .map(|((s, _), d)| dev.from_f32(s, d))
                .collect::<Result<Vec<_>>>()?;
            let y = apply(&dev, &case.op, &xs)?;
            dev.synchronize()?;
            dev.to_f32(&y)
        })();
        let (rel, error) = match (&got, &want) {
            (Ok(g), Ok(w)) => (rel_err(g, w), None),
            (Err(e), _) => (f64::INFINITY, Some(format!("cuda: {e}"))),
            (_, Err(e)) => (f64::INFINITY, Some(format!("reference: {e}"))),
        };
        rows.push(SelftestRow {
            op: case.name.to_string(),
            shape: shape_text(&case),
            precision: case.precision,
            rel_err: rel,
            bound: case.bound,
            pass: error.is_none() && rel <= case.bound,
            error,
        });
        // A failed launch leaves the context unusable: report what we have.
        if let Some(e) = &rows.last().unwrap().error {
            if e.contains("CUDA_ERROR_ILLEGAL") || e.contains("CUDA_ERROR_LAUNCH") {
                break;
            }
        }
    }
    Ok(rows)
}

/// Header line matching `SelftestRow`'s Display.
pub fn header() -> String {
    format!(
        "{:<24} {:<40} {:<5} {:>10} {:>8} {}",
        "op", "shape", "prec", "rel_err", "bound", "result"
    )
}
