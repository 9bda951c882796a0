//! The fast samplers on a problem with a known answer: data x₀ ~ N(μ_c, s_c²) per channel c, whose
//! marginal under each SDE is N(α(t)μ_c, α(t)²s_c² + std(t)²), so the exact score is analytic.
//! In x̂ = x/α with σ̂ = std/α the probability-flow ODE is then solved exactly by
//! x̂(σ̂) − μ = (x̂(σ̂₀) − μ)·√((s² + σ̂²)/(s² + σ̂₀²)), and the samplers' final denoising step maps
//! x̂ at σ̂(eps) to μ + s²/(s² + σ̂²)·(x̂ − μ). Every sampler is checked against that map (its error
//! must fall at the solver's order as the steps double) and for the final distribution N(μ, s²).
//! Last, `srsde-fast upscale --sampler dpm2 --steps 10` runs end to end on the tiny golden model.
mod common;

use std::cell::Cell;
use std::process::{Command, Output};

use srsde_fast::backend::cpu::Cpu;
use srsde_fast::backend::Backend;
use srsde_fast::check::rel_err_f64 as rel_err;
use srsde_fast::error::Result;
use srsde_fast::model::ScoreFn;
use srsde_fast::sample::{
    fast_sample, fast_sample_from, pc_sample_with_noise, sample_with_noise, FastConfig, FastSolver,
    NoiseStream, SamplerConfig, StepInfo,
};
use srsde_fast::sde::Sde;
use srsde_fast::tensor::Tensor;

type B = Cpu<f64>;

const MU: [f64; 3] = [0.4, -0.3, 0.1];
const S: [f64; 3] = [0.5, 0.2, 0.35];

/// Exact score of the per-channel Gaussian data under the SDE's marginal; counts its evaluations.
struct GaussianScore {
    backend: B,
    sde: Sde,
    calls: Cell<usize>,
}

impl GaussianScore {
    fn new(sde: &Sde) -> Self {
        GaussianScore {
            backend: B::new(),
            sde: sde.clone(),
            calls: Cell::new(0),
        }
    }
}

impl ScoreFn<B> for GaussianScore {
    fn score(&self, x: &Tensor<B>, y: &Tensor<B>, t: f64) -> Result<Tensor<B>> {
        assert_eq!(x.shape(), y.shape(), "the score sees x with the guide's shape");
        assert!(t > 0.0 && t <= 1.0 + 1e-12, "t = {t} outside (0, 1]");
        self.calls.set(self.calls.get() + 1);
        let a = self.sde.marginal_mean_coef(t);
        let std = self.sde.marginal_std(t);
        let plane: usize = x.shape()[2..].iter().product();
        let v = self.backend.to_f64(x)?;
        let out: Vec<f64> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = (i / plane) % 3;
                -(x - a * MU[c]) / (a * a * S[c] * S[c] + std * std)
            })
            .collect();
        self.backend.from_f64(x.shape(), &out)
    }
}

const SHAPE: [usize; 4] = [4, 3, 8, 8];

/// The exact result of the ODE plus the final denoising step, from x_T (at t = 1).
fn exact(sde: &Sde, x_t: &[f64], plane: usize) -> Vec<f64> {
    let sh = |t: f64| sde.marginal_std(t) / sde.marginal_mean_coef(t);
    let (a1, s0, sm) = (sde.marginal_mean_coef(1.0), sh(1.0), sh(sde.sampling_eps()));
    x_t.iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = (i / plane) % 3;
            let (mu, s2) = (MU[c], S[c] * S[c]);
            let xm = mu + (x / a1 - mu) * ((s2 + sm * sm) / (s2 + s0 * s0)).sqrt();
            mu + s2 / (s2 + sm * sm) * (xm - mu)
        })
        .collect()
}

fn all_sdes() -> [Sde; 3] {
    [Sde::paper_ve(), Sde::paper_vp(), Sde::paper_subvp()]
}

fn solvers() -> [FastSolver; 4] {
    [
        FastSolver::Heun,
        FastSolver::Dpm { order: 1 },
        FastSolver::Dpm { order: 2 },
        FastSolver::Dpm { order: 3 },
    ]
}

/// Relative error of the sampler with `steps` evaluations against the exact map, from a fixed x_T.
fn ode_error(sde: &Sde, solver: FastSolver, rho: f64, steps: usize) -> f64 {
    let b = B::new();
    let score = GaussianScore::new(sde);
    let y = b.zeros(&SHAPE).unwrap();
    let x_t = b
        .affine(&b.randn(&SHAPE, 5, 0).unwrap(), sde.prior_std(), 0.0)
        .unwrap();
    let cfg = FastConfig {
        rho,
        ..FastConfig::new(solver)
    };
    let mut noise = NoiseStream::new(0);
    let out = fast_sample_from(
        &b,
        &score,
        sde,
        &y,
        &cfg,
        steps,
        &x_t,
        &mut noise,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(score.calls.get(), steps);
    let want = exact(sde, &b.to_f64(&x_t).unwrap(), SHAPE[2] * SHAPE[3]);
    rel_err(&b.to_f64(&out).unwrap(), &want)
}

/// Errors at 2^k + 1 evaluations (2^k intervals down to σ̂(eps) for the one-evaluation solvers,
/// 2^(k−1) Heun steps), and the observed orders between successive doublings.
fn convergence(sde: &Sde, solver: FastSolver, rho: f64, ks: std::ops::RangeInclusive<u32>) -> Vec<f64> {
    let errs: Vec<(usize, f64)> = ks
        .map(|k| {
            let n = (1usize << k) + 1;
            (n, ode_error(sde, solver, rho, n))
        })
        .collect();
    let orders: Vec<f64> = errs.windows(2).map(|w| (w[0].1 / w[1].1).log2()).collect();
    println!(
        "{:5} {:40} rho {rho}: {}  orders {}",
        sde.name(),
        solver.describe(),
        errs.iter()
            .map(|(n, e)| format!("{n}:{e:.2e}"))
            .collect::<Vec<_>>()
            .join(" "),
        orders
            .iter()
            .map(|p| format!("{p:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    orders
}

#[test]
fn every_solver_converges_at_its_order() {
    for sde in all_sdes() {
        for solver in solvers() {
            let p = solver.order() as f64;
            for rho in [7.0, f64::INFINITY] {
                let orders = convergence(&sde, solver, rho, 4..=8);
                // Asymptotically: the last two doublings (32 → 64 → 128 intervals).
                for &o in &orders[orders.len() - 2..] {
                    assert!(
                        o > p - 0.5,
                        "{} {solver:?} rho {rho}: observed order {o:.2} < {}",
                        sde.name(),
                        p - 0.5
                    );
                }
            }
        }
    }
}

#[test]
fn higher_orders_reach_the_exact_answer_in_fewer_evaluations() {
    // On each solver's default schedule: 1% of the exact answer takes DDIM more than 129
    // evaluations, DPM-Solver++(3M) 33.
    for sde in all_sdes() {
        for (solver, steps, below) in [
            (FastSolver::Dpm { order: 1 }, 129, false),
            (FastSolver::Heun, 129, true),
            (FastSolver::Dpm { order: 2 }, 65, true),
            (FastSolver::Dpm { order: 3 }, 33, true),
        ] {
            let e = ode_error(&sde, solver, solver.default_rho(), steps);
            println!("{} {solver:?} {steps} evaluations: rel err {e:.2e}", sde.name());
            assert_eq!(e < 1e-2, below, "{} {solver:?} {steps}: {e}", sde.name());
        }
    }
}

/// Per-channel sample mean and std of a [N, 3, H, W] result.
fn channel_moments(v: &[f64], shape: &[usize]) -> Vec<(f64, f64)> {
    let plane = shape[2] * shape[3];
    (0..3)
        .map(|c| {
            let xs: Vec<f64> = v
                .chunks_exact(plane)
                .enumerate()
                .filter(|(i, _)| i % 3 == c)
                .flat_map(|(_, p)| p.iter().copied())
                .collect();
            let n = xs.len() as f64;
            let m = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
            (m, var.sqrt())
        })
        .collect()
}

/// Runs the preset-like configuration through [`sample_with_noise`] on a large batch and checks the
/// per-channel moments against N(μ_c, s_c²).
fn recovers_gaussian(sde: &Sde, solver: FastSolver, steps: usize, churn: f64) {
    let b = B::new();
    let shape = [16, 3, 32, 32]; // 16384 values per channel: the mean's standard error is s/128
    let score = GaussianScore::new(sde);
    let cfg = SamplerConfig {
        steps,
        fast: Some(FastConfig {
            churn,
            ..FastConfig::new(solver)
        }),
        ..SamplerConfig::preset("dpm2", sde).unwrap()
    };
    let y = b.zeros(&shape).unwrap();
    let out = sample_with_noise(&b, &score, sde, &y, &cfg, NoiseStream::new(21), &mut |_| Ok(())).unwrap();
    assert_eq!(score.calls.get(), steps);
    let v = b.to_f64(&out).unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    for (c, (m, sd)) in channel_moments(&v, &shape).into_iter().enumerate() {
        println!(
            "{} {solver:?} churn {churn} {steps}: channel {c} mean {m:.4} (want {}), std {sd:.4} (want {})",
            sde.name(),
            MU[c],
            S[c]
        );
        assert!(
            (m - MU[c]).abs() < 0.05 * S[c],
            "{} mean {m} vs {}",
            sde.name(),
            MU[c]
        );
        assert!(
            (sd / S[c] - 1.0).abs() < 0.04,
            "{} std {sd} vs {}",
            sde.name(),
            S[c]
        );
    }
}

#[test]
fn every_solver_reaches_the_data_distribution() {
    for sde in all_sdes() {
        for (solver, steps) in [
            (FastSolver::Heun, 65),
            (FastSolver::Dpm { order: 1 }, 200),
            (FastSolver::Dpm { order: 2 }, 33),
            (FastSolver::Dpm { order: 3 }, 25),
        ] {
            recovers_gaussian(&sde, solver, steps, 0.0);
        }
    }
}

#[test]
fn churned_samplers_reach_the_data_distribution() {
    // Between the ODE and the full reverse SDE; the SDE needs more steps than the ODE.
    for sde in all_sdes() {
        for churn in [0.5, 1.0] {
            recovers_gaussian(&sde, FastSolver::Heun, 101, churn);
            recovers_gaussian(&sde, FastSolver::Dpm { order: 2 }, 100, churn);
        }
    }
}

#[test]
fn steps_count_network_evaluations_exactly() {
    let b = B::new();
    let sde = Sde::paper_vp();
    let y = b.zeros(&SHAPE).unwrap();
    for solver in solvers() {
        for churn in [0.0, 0.7] {
            for steps in [2, 3, 4, 5, 10, 11] {
                let score = GaussianScore::new(&sde);
                let cfg = FastConfig {
                    churn,
                    ..FastConfig::new(solver)
                };
                let mut seen = Vec::new();
                let mut last = Vec::new();
                let out = fast_sample(
                    &b,
                    &score,
                    &sde,
                    &y,
                    &cfg,
                    steps,
                    NoiseStream::new(3),
                    &mut |info: StepInfo<'_, B>| {
                        assert_eq!(info.total, steps);
                        seen.push((info.step, info.t));
                        last = b.to_f64(info.x_mean)?;
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(score.calls.get(), steps, "{solver:?} churn {churn}");
                assert_eq!(seen.len(), steps);
                assert!(seen.iter().enumerate().all(|(i, &(s, _))| s == i));
                assert!((seen[0].1 - 1.0).abs() < 1e-9, "starts at t = 1");
                assert!((seen[steps - 1].1 - 1e-3).abs() < 1e-12, "ends at eps");
                assert_eq!(
                    b.to_f64(&out).unwrap(),
                    last,
                    "the result is the last denoised estimate"
                );
            }
        }
    }
    // Too few evaluations, a bad churn or rho: errors, not panics.
    let score = GaussianScore::new(&sde);
    let run = |cfg: FastConfig, steps| {
        fast_sample(
            &b,
            &score,
            &sde,
            &y,
            &cfg,
            steps,
            NoiseStream::new(0),
            &mut |_| Ok(()),
        )
    };
    assert!(run(FastConfig::new(FastSolver::Heun), 1).is_err());
    for bad in [
        FastConfig {
            churn: -0.1,
            ..FastConfig::new(FastSolver::Heun)
        },
        FastConfig {
            rho: 0.0,
            ..FastConfig::new(FastSolver::Heun)
        },
        FastConfig::new(FastSolver::Dpm { order: 4 }),
    ] {
        assert!(run(bad, 10).is_err(), "{bad:?}");
    }
}

#[test]
fn a_faces_result_does_not_depend_on_its_batch() {
    let b = B::new();
    let sde = Sde::paper_ve();
    let score = GaussianScore::new(&sde);
    let seeds = [101u64, 202, 303];
    let one = [1, 3, 8, 8];
    let plane: usize = one.iter().product();
    for (solver, churn) in [
        (FastSolver::Heun, 0.6),
        (FastSolver::Dpm { order: 3 }, 0.6),
        (FastSolver::Dpm { order: 2 }, 0.0),
    ] {
        let cfg = FastConfig {
            churn,
            ..FastConfig::new(solver)
        };
        let run = |seeds: &[u64]| {
            let y = b.zeros(&[seeds.len(), 3, 8, 8]).unwrap();
            let out = fast_sample(
                &b,
                &score,
                &sde,
                &y,
                &cfg,
                12,
                NoiseStream::per_image(seeds.to_vec()),
                &mut |_| Ok(()),
            )
            .unwrap();
            b.to_f64(&out).unwrap()
        };
        let batch = run(&seeds);
        for (i, &s) in seeds.iter().enumerate() {
            assert_eq!(
                run(&[s]),
                batch[i * plane..(i + 1) * plane],
                "{solver:?}: image {i}"
            );
        }
        // Reversed order: the same images, moved.
        let rev = run(&[303, 202, 101]);
        assert_eq!(rev[..plane], batch[2 * plane..]);
        if churn > 0.0 {
            // The churn really draws noise: another seed for the first image changes it.
            assert_ne!(run(&[999])[..], batch[..plane]);
        }
    }
}

#[test]
fn churn_is_stochastic_and_zero_churn_is_the_ode() {
    let b = B::new();
    let sde = Sde::paper_subvp();
    let score = GaussianScore::new(&sde);
    let y = b.zeros(&SHAPE).unwrap();
    let x_t = b.randn(&SHAPE, 8, 0).unwrap();
    let run = |churn: f64, seed: u64| {
        let cfg = FastConfig {
            churn,
            ..FastConfig::new(FastSolver::Dpm { order: 2 })
        };
        let out = fast_sample_from(
            &b,
            &score,
            &sde,
            &y,
            &cfg,
            15,
            &x_t,
            &mut NoiseStream::new(seed),
            &mut |_| Ok(()),
        )
        .unwrap();
        b.to_f64(&out).unwrap()
    };
    assert_eq!(run(0.0, 1), run(0.0, 2), "the ODE draws no noise");
    assert_ne!(run(0.3, 1), run(0.3, 2));
    assert_eq!(run(0.3, 1), run(0.3, 1));
}

#[test]
fn pc_presets_are_unchanged_by_the_dispatch() {
    let b = B::new();
    let sde = Sde::paper_ve();
    let score = GaussianScore::new(&sde);
    let y = b.zeros(&SHAPE).unwrap();
    let cfg = SamplerConfig {
        steps: 20,
        ..SamplerConfig::preset("sde-ve-cs", &sde).unwrap()
    };
    let a = sample_with_noise(&b, &score, &sde, &y, &cfg, NoiseStream::new(4), &mut |_| Ok(())).unwrap();
    let p = pc_sample_with_noise(&b, &score, &sde, &y, &cfg, NoiseStream::new(4), &mut |_| Ok(())).unwrap();
    assert_eq!(b.to_f64(&a).unwrap(), b.to_f64(&p).unwrap());
    // The PC loop refuses a fast configuration instead of silently running no predictor.
    let fast = SamplerConfig::preset("dpm2", &sde).unwrap();
    assert!(pc_sample_with_noise(&b, &score, &sde, &y, &fast, NoiseStream::new(4), &mut |_| Ok(())).is_err());
}

fn srsde(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
        .args(args)
        .output()
        .expect("run srsde-fast");
    eprintln!(
        "$ srsde-fast {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn upscale_help_lists_the_fast_presets() {
    let out = srsde(&["upscale", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "ode-heun",
        "dpm2",
        "dpm3",
        "sde-ve-cs",
        "DPM-Solver++(2M)",
        "default 25 network evaluations",
        "--churn",
        "--rho",
    ] {
        assert!(help.contains(want), "`upscale --help` lacks `{want}`");
    }
}

#[test]
fn upscale_cli_runs_fast_samplers() {
    use common::{write_golden_model, TempDir};
    let tmp = TempDir::new("fast-upscale");
    let model = tmp.path("ve_nf16.safetensors");
    write_golden_model("ncsnpp_ve_nf16.safetensors", &model);
    let face = tmp.path("in/face.png");
    std::fs::create_dir_all(tmp.path("in")).unwrap();
    let lr: Vec<f32> = (0..3 * 16 * 16)
        .map(|i| ((i * 37) % 101) as f32 / 100.0)
        .collect();
    srsde_fast::io::save_png(&face, &lr, 3, 16, 16, false).unwrap();
    let (face, model) = (face.to_str().unwrap(), model.to_str().unwrap());
    let out_dir = tmp.path("out");
    let out_dir = out_dir.to_str().unwrap();
    let base = [
        "upscale", "--device", "cpu", face, "-o", out_dir, "--model", model, "--seed", "3",
    ];
    let with =
        |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };

    let r = srsde(&with(&["--sampler", "dpm2", "--steps", "10"]));
    assert!(r.status.success());
    let stdout = String::from_utf8_lossy(&r.stdout);
    for want in [
        "sampler: dpm2",
        "DPM-Solver++(2M)",
        "ρ inf",
        "churn 0",
        "10 network evaluations per face",
    ] {
        assert!(stdout.contains(want), "stdout lacks `{want}`");
    }
    let sr = tmp.path("out/face_sr.png");
    let img = image::open(&sr).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
    let first = std::fs::read(&sr).unwrap();

    // Heun with churn on a log-uniform schedule (3 evaluations), over the first output.
    let r = srsde(&with(&[
        "--sampler",
        "ode-heun",
        "--steps",
        "3",
        "--churn",
        "0.5",
        "--rho",
        "inf",
        "--force",
    ]));
    assert!(r.status.success());
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("Heun") && stdout.contains("churn 0.5") && stdout.contains("ρ inf"),
        "{stdout}"
    );
    assert_ne!(std::fs::read(&sr).unwrap(), first);

    // --churn belongs to the fast samplers; a bad churn is refused before sampling.
    for bad in [
        &["--sampler", "sde-ve", "--churn", "0.5", "--force"][..],
        &["--sampler", "dpm2", "--churn", "2", "--force"],
    ] {
        let r = srsde(&with(bad));
        assert!(!r.status.success());
        assert!(String::from_utf8_lossy(&r.stderr).contains("churn"));
    }
}

#[test]
fn eval_cli_runs_a_fast_sampler_and_resumes_only_the_same_one() {
    use common::{write_golden_model, TempDir};
    let tmp = TempDir::new("fast-eval");
    let model = tmp.path("ve_nf16.safetensors");
    write_golden_model("ncsnpp_ve_nf16.safetensors", &model);
    let hr = tmp.path("hr");
    std::fs::create_dir_all(&hr).unwrap();
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/val128");
    std::fs::copy(src.join("celebahq_000004.jpg"), hr.join("a.jpg")).unwrap();
    let out = tmp.path("out");
    let (model, hr, out_s) = (
        model.to_str().unwrap(),
        hr.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let base = [
        "eval", "--device", "cpu", "--model", model, "--hr", hr, "-o", out_s, "--seed", "1",
    ];
    let with =
        |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };

    let r = srsde(&with(&["--sampler", "dpm2", "--steps", "4"]));
    assert!(r.status.success());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("dpm2 (rho inf, churn 0), 4 steps"), "{md}");
    assert!(md.contains("| dpm2"), "a table row for the sampler: {md}");
    // Another churn is another configuration: resuming refuses it without --force.
    let r = srsde(&with(&["--sampler", "dpm2", "--steps", "4", "--churn", "0.5"]));
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("rho/churn"));
}
