//! The PC sampler end to end with an analytic score: data x₀ ~ N(μ, s²) per element, whose
//! marginal under each SDE is N(a(t)μ, a(t)²s² + std(t)²), so the exact score is known and the
//! sampler must land back on N(μ, s²).
use std::cell::Cell;

use srsde_fast::backend::cpu::Cpu;
use srsde_fast::backend::Backend;
use srsde_fast::error::{Error, Result};
use srsde_fast::model::ScoreFn;
use srsde_fast::sample::{
    pc_sample, pc_sample_with_noise, CorrectorKind, LangevinNorm, NoiseStream, PredictorKind, SamplerConfig,
    StepInfo,
};
use srsde_fast::sde::Sde;
use srsde_fast::tensor::Tensor;

type B = Cpu<f32>;

/// Exact score of Gaussian data under the SDE's marginal; counts its evaluations.
struct GaussianScore {
    backend: B,
    sde: Sde,
    mu: f64,
    s: f64,
    calls: Cell<usize>,
}

impl GaussianScore {
    fn new(sde: &Sde, mu: f64, s: f64) -> Self {
        GaussianScore {
            backend: B::new(),
            sde: sde.clone(),
            mu,
            s,
            calls: Cell::new(0),
        }
    }
}

impl ScoreFn<B> for GaussianScore {
    fn score(&self, x: &Tensor<B>, y: &Tensor<B>, t: f64) -> Result<Tensor<B>> {
        assert_eq!(x.shape(), y.shape(), "the score sees x with the guide's shape");
        self.calls.set(self.calls.get() + 1);
        let a = self.sde.marginal_mean_coef(t);
        let std = self.sde.marginal_std(t);
        let var = a * a * self.s * self.s + std * std;
        // −(x − aμ)/var
        self.backend.affine(x, -1.0 / var, a * self.mu / var)
    }
}

const SHAPE: [usize; 4] = [4, 3, 16, 16];

fn guide(b: &B) -> Tensor<B> {
    b.zeros(&SHAPE).unwrap()
}

fn run(sde: &Sde, cfg: &SamplerConfig, score: &GaussianScore, seed: u64) -> Vec<f32> {
    let b = B::new();
    let out = pc_sample(&b, score, sde, &guide(&b), cfg, seed, &mut |_| Ok(())).unwrap();
    assert_eq!(out.shape(), &SHAPE);
    b.to_f32(&out).unwrap()
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Run a preset with `steps` steps on N(μ, s²) data and check the sample's moments.
fn recovers_gaussian(sde: &Sde, cfg: SamplerConfig, mu: f64, s: f64) {
    let score = GaussianScore::new(sde, mu, s);
    let v = run(sde, &cfg, &score, 11);
    assert!(v.iter().all(|x| x.is_finite()));
    let (m, sd) = mean_std(&v);
    println!(
        "{} {:?}+{:?}: mean {m:.4} (want {mu}), std {sd:.4} (want {s})",
        sde.name(),
        cfg.predictor,
        cfg.corrector
    );
    // 3072 values: the standard error of the mean is s/55; allow discretisation bias on top.
    assert!((m - mu).abs() < 0.03, "mean {m} vs {mu}");
    assert!((sd / s - 1.0).abs() < 0.05, "std {sd} vs {s}");
    assert_eq!(score.calls.get(), cfg.nfe(), "network evaluations");
}

fn preset(name: &str, sde: &Sde, steps: usize) -> SamplerConfig {
    SamplerConfig {
        steps,
        ..SamplerConfig::preset(name, sde).unwrap()
    }
}

#[test]
fn ve_reverse_diffusion_recovers_gaussian() {
    let sde = Sde::paper_ve();
    recovers_gaussian(&sde, preset("sde-ve", &sde, 200), 0.5, 0.2);
}

#[test]
fn ve_reverse_diffusion_with_langevin_recovers_gaussian() {
    let sde = Sde::paper_ve();
    recovers_gaussian(&sde, preset("sde-ve-cs", &sde, 200), 0.5, 0.2);
    let batch = SamplerConfig {
        langevin_norm: LangevinNorm::Batch,
        ..preset("sde-ve-cs", &sde, 200)
    };
    recovers_gaussian(&sde, batch, 0.5, 0.2);
}

#[test]
fn vp_euler_maruyama_recovers_gaussian() {
    let sde = Sde::paper_vp();
    recovers_gaussian(&sde, preset("sde-vp", &sde, 200), 0.3, 0.5);
}

#[test]
fn subvp_euler_maruyama_recovers_gaussian() {
    let sde = Sde::paper_subvp();
    recovers_gaussian(&sde, preset("sde-subvp", &sde, 200), 0.3, 0.5);
}

/// The original crashes here (subVP has no α table); ours uses VP's α.
#[test]
fn langevin_works_on_subvp() {
    let sde = Sde::paper_subvp();
    for norm in [LangevinNorm::PerImage, LangevinNorm::Batch] {
        let cfg = SamplerConfig {
            corrector: CorrectorKind::Langevin,
            snr: 0.16,
            corrector_steps: 2,
            langevin_norm: norm,
            ..preset("sde-subvp", &sde, 200)
        };
        assert_eq!(cfg.nfe(), 600);
        recovers_gaussian(&sde, cfg, 0.3, 0.5);
    }
}

#[test]
fn seed_determines_output() {
    let sde = Sde::paper_ve();
    let cfg = preset("sde-ve-cs", &sde, 20);
    let score = GaussianScore::new(&sde, 0.5, 0.2);
    let a = run(&sde, &cfg, &score, 1);
    let b = run(&sde, &cfg, &score, 1);
    let c = run(&sde, &cfg, &score, 2);
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "different seed, different output");
    // Denoising returns x̄ of the last step, not x.
    let noisy = run(
        &sde,
        &SamplerConfig {
            denoise: false,
            ..cfg
        },
        &score,
        1,
    );
    assert_ne!(a, noisy);
}

#[test]
fn observer_sees_every_step() {
    let b = B::new();
    let sde = Sde::paper_vp();
    let cfg = preset("sde-vp", &sde, 25);
    let score = GaussianScore::new(&sde, 0.3, 0.5);
    let mut seen = Vec::new();
    let mut last_mean = Vec::new();
    let out = pc_sample(&b, &score, &sde, &guide(&b), &cfg, 3, &mut |info: StepInfo<B>| {
        assert_eq!(info.total, 25);
        assert_eq!(info.x_mean.shape(), &SHAPE);
        seen.push((info.step, info.t));
        last_mean = b.to_f32(info.x_mean)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), 25);
    assert!(seen.iter().enumerate().all(|(i, &(s, _))| s == i));
    assert_eq!(seen[0].1, 1.0);
    assert_eq!(seen[24].1, 1e-3f32 as f64);
    assert!(seen.windows(2).all(|w| w[1].1 < w[0].1), "time runs backwards");
    assert_eq!(b.to_f32(&out).unwrap(), last_mean, "the result is the last x̄");

    // An observer error stops the run and comes back to the caller.
    let mut calls = 0;
    let err = pc_sample(&b, &score, &sde, &guide(&b), &cfg, 3, &mut |_| {
        calls += 1;
        if calls == 5 {
            Err(Error::Other("cancelled".into()))
        } else {
            Ok(())
        }
    });
    assert!(matches!(err, Err(Error::Other(m)) if m == "cancelled"));
    assert_eq!(calls, 5);
}

/// With no predictor and no corrector the result is the prior sample: N(0, σ_max²) for VE.
#[test]
fn prior_has_the_sde_std() {
    let sde = Sde::paper_ve();
    let cfg = SamplerConfig {
        predictor: PredictorKind::None,
        corrector: CorrectorKind::None,
        ..preset("sde-ve", &sde, 10)
    };
    let score = GaussianScore::new(&sde, 0.5, 0.2);
    let (m, sd) = mean_std(&run(&sde, &cfg, &score, 5));
    assert!(
        m.abs() < 0.1 * 348.0 && (sd / 348.0 - 1.0).abs() < 0.05,
        "prior mean {m}, std {sd}"
    );
    assert_eq!(score.calls.get(), 0);
}

#[test]
fn bad_configs_are_errors() {
    let b = B::new();
    let sde = Sde::paper_ve();
    let score = GaussianScore::new(&sde, 0.5, 0.2);
    let one_step = preset("sde-ve", &sde, 1);
    assert!(matches!(
        pc_sample(&b, &score, &sde, &guide(&b), &one_step, 0, &mut |_| Ok(())),
        Err(Error::Config(_))
    ));
    let bad_snr = SamplerConfig {
        snr: -1.0,
        ..preset("sde-ve-cs", &sde, 10)
    };
    assert!(matches!(
        pc_sample(&b, &score, &sde, &guide(&b), &bad_snr, 0, &mut |_| Ok(())),
        Err(Error::Config(_))
    ));
}

/// With per-image noise streams and per-image Langevin norms, an image's result is the same whether
/// it is sampled alone or beside other images, at any position in the batch.
#[test]
fn per_image_streams_make_results_independent_of_the_batch() {
    let b = B::new();
    let sde = Sde::paper_ve().with_steps(20).unwrap();
    let mut cfg = SamplerConfig::preset("sde-ve-cs", &sde).unwrap();
    cfg.steps = 20;
    assert_eq!(cfg.langevin_norm, LangevinNorm::PerImage);
    let score = GaussianScore::new(&sde, 0.5, 0.2);
    let one = [1, 3, 8, 8];
    let alone = pc_sample_with_noise(
        &b,
        &score,
        &sde,
        &b.zeros(&one).unwrap(),
        &cfg,
        NoiseStream::per_image(vec![77]),
        &mut |_| Ok(()),
    )
    .unwrap();
    let pair = pc_sample_with_noise(
        &b,
        &score,
        &sde,
        &b.zeros(&[2, 3, 8, 8]).unwrap(),
        &cfg,
        NoiseStream::per_image(vec![5, 77]),
        &mut |_| Ok(()),
    )
    .unwrap();
    let alone = b.to_f32(&alone).unwrap();
    let pair = b.to_f32(&pair).unwrap();
    assert_eq!(
        &pair[alone.len()..],
        &alone[..],
        "image with seed 77 must not depend on its batch-mate"
    );
    assert_ne!(
        &pair[..alone.len()],
        &alone[..],
        "different seeds give different images"
    );
}
