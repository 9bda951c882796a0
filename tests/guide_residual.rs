//! The guide-residual (EDM-preconditioned) parameterization: the score ↔ denoiser algebra, the
//! F ≡ 0 network as the exact score of the Gaussian residual prior N(y, σ_d²) (so the ODE samplers
//! land where that prior's ODE lands, and a start at the guide returns the guide exactly), the
//! training loss's gradients against central finite differences in f64, and the config's storage.
use std::collections::BTreeMap;

use srsde_fast::autograd::Graph;
use srsde_fast::backend::cpu::Cpu;
use srsde_fast::backend::Backend;
use srsde_fast::check::rel_err_f64;
use srsde_fast::model::config::{Parameterization, PrecondCoefs};
use srsde_fast::model::ncsnpp::{param_specs, Forward};
use srsde_fast::model::{Ncsnpp, NetConfig, ScoreFn, ScoreModel};
use srsde_fast::sample::{fast_sample, fast_sample_from, FastConfig, FastSolver, NoiseStream};
use srsde_fast::sde::Sde;
use srsde_fast::tensor::HostTensor;
use srsde_fast::train::loss::{draw_train_times, dsm_loss};
use srsde_fast::train::NoiseDist;

type B = Cpu<f64>;

/// The tiny guide-residual preset at 16×16 (levels 16, 8, 4, 2; attention at 16).
fn tiny_config(sigma_data: f64) -> NetConfig {
    let mut c = NetConfig::preset("ve-res-tiny").unwrap();
    c.data.image_size = 16;
    c.model.parameterization = Parameterization::GuideResidual { sigma_data };
    c.validate().unwrap();
    c
}

fn uniform(be: &B, shape: &[usize], seed: u64) -> srsde_fast::tensor::Tensor<B> {
    be.rand_uniform(shape, seed, 0).unwrap()
}

/// The same network with its last conv (the output layer) set to zero: F ≡ 0 exactly.
fn zero_output(be: &B, cfg: &NetConfig, seed: u64) -> ScoreModel<B> {
    let net = Ncsnpp::random(be, cfg.clone(), seed).unwrap();
    let mut host = net.to_host().unwrap();
    let last_module = param_specs(cfg)
        .iter()
        .filter_map(|(n, _, _)| n.split('.').nth(1)?.parse::<usize>().ok())
        .max()
        .unwrap();
    let prefix = format!("all_modules.{last_module}.");
    let mut zeroed = 0;
    for (name, t) in host.iter_mut() {
        if name.starts_with(&prefix) {
            *t = HostTensor::new(t.shape.clone(), vec![0.0; t.data.len()]);
            zeroed += 1;
        }
    }
    assert_eq!(zeroed, 2, "the output conv has a weight and a bias");
    ScoreModel::new(Ncsnpp::from_weights(be, cfg.clone(), &host, "<zeroed>").unwrap())
}

#[test]
fn coefficients_match_their_definitions() {
    for &(s, d) in &[(0.01, 0.09), (0.09, 0.09), (10.0, 0.09), (3.0, 0.5)] {
        let c = PrecondCoefs::new(s, d);
        let r = (s * s + d * d).sqrt();
        assert!((c.c_skip - d * d / (r * r)).abs() < 1e-15);
        assert!((c.c_out - s * d / r).abs() < 1e-15);
        assert!((c.c_in - 1.0 / r).abs() < 1e-15);
        // The target of F has unit variance for a residual of RMS σ_d: c_skip² σ²... ⇒ (c_skip² σ² +
        // (1 − c_skip)² d²)/c_out² = 1.
        let var = ((c.c_skip * s).powi(2) + ((1.0 - c.c_skip) * d).powi(2)) / c.c_out.powi(2);
        assert!((var - 1.0).abs() < 1e-12, "target variance {var}");
    }
}

#[test]
fn score_is_denoiser_minus_x_over_sigma_squared() {
    let be = B::new();
    let sd = 0.09;
    let cfg = tiny_config(sd);
    let model = ScoreModel::new(Ncsnpp::random(&be, cfg, 3).unwrap());
    assert_eq!(model.guide_residual(), Some(sd));
    assert!(model.prior_mean_is_guide());
    let shape = [2, 3, 16, 16];
    let y = uniform(&be, &shape, 1);
    for &t in &[1e-5, 0.3, 0.7, 1.0] {
        let sigma = model.sde.marginal_std(t);
        let noise = be.randn(&shape, 11, 0).unwrap();
        let x = be.axpby(1.0, &y, sigma, &noise).unwrap();
        let g = Graph::inference(&be);
        let (f, coefs) = model
            .residual_net_var(&g, &x, &y, &[sigma, sigma], Forward::default())
            .unwrap();
        let (xs, ys, fs) = (
            be.to_f64(&x).unwrap(),
            be.to_f64(&y).unwrap(),
            be.to_f64(&f.value).unwrap(),
        );
        let c = coefs[0];
        assert_eq!(c, PrecondCoefs::new(sigma, sd));
        let d: Vec<f64> = (0..xs.len())
            .map(|i| ys[i] + c.c_skip * (xs[i] - ys[i]) + c.c_out * fs[i])
            .collect();
        let want: Vec<f64> = (0..xs.len()).map(|i| (d[i] - xs[i]) / (sigma * sigma)).collect();
        let got = be.to_f64(&model.score(&x, &y, t).unwrap()).unwrap();
        let e = rel_err_f64(&got, &want);
        assert!(e < 1e-10, "t = {t}: score vs (D − x)/σ²: {e:e}");
        // And back: x + σ²·score is the denoiser.
        let back: Vec<f64> = (0..xs.len()).map(|i| xs[i] + sigma * sigma * got[i]).collect();
        assert!(rel_err_f64(&back, &d) < 1e-9);
        assert!(
            fs.iter().any(|v| v.abs() > 1e-6),
            "a random network's F is not zero"
        );
    }
}

#[test]
fn zero_network_is_the_gaussian_residual_prior() {
    let be = B::new();
    let sd = 0.09;
    let model = zero_output(&be, &tiny_config(sd), 5);
    let shape = [2, 3, 16, 16];
    let y = uniform(&be, &shape, 2);
    let sde = model.sde.clone();
    let Sde::Ve(ve) = &sde else { panic!("VE") };
    // F ≡ 0: score = −(x − y)/(σ² + σ_d²), the exact score of x₀ ~ N(y, σ_d²).
    let x = be.axpby(1.0, &y, 0.5, &be.randn(&shape, 4, 0).unwrap()).unwrap();
    let t = 0.4;
    let s2 = ve.sigma(t).powi(2);
    let (xs, ys) = (be.to_f64(&x).unwrap(), be.to_f64(&y).unwrap());
    let want: Vec<f64> = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| -(x - y) / (s2 + sd * sd))
        .collect();
    assert!(rel_err_f64(&be.to_f64(&model.score(&x, &y, t).unwrap()).unwrap(), &want) < 1e-12);

    // The ODE samplers from x_T = y + σ_max·z: the prior's ODE solution, then the final denoiser,
    // y + (x_T − y)·σ_d²/(√(σ_e² + σ_d²)·√(σ_max² + σ_d²)) with σ_e = σ(eps).
    let (smax, se) = (ve.sigma(1.0), ve.sigma(sde.sampling_eps()));
    let factor = sd * sd / ((se * se + sd * sd).sqrt() * (smax * smax + sd * sd).sqrt());
    for (solver, steps, tol) in [
        (FastSolver::Dpm { order: 2 }, 200, 1e-3),
        (FastSolver::Dpm { order: 3 }, 200, 1e-3),
        (FastSolver::Heun, 201, 1e-3),
    ] {
        let noise = NoiseStream::per_image(vec![7, 8]);
        let z = be.to_f64(&noise.clone().next(&be, &shape).unwrap()).unwrap();
        let cfg = FastConfig::new(solver);
        let out = fast_sample(&be, &model, &sde, &y, &cfg, steps, noise, &mut |_| Ok(())).unwrap();
        let got: Vec<f64> = be
            .to_f64(&out)
            .unwrap()
            .iter()
            .zip(&ys)
            .map(|(o, y)| o - y)
            .collect();
        let want: Vec<f64> = z.iter().map(|z| smax * z * factor).collect();
        let e = rel_err_f64(&got, &want);
        assert!(e < tol, "{solver:?} {steps}: residual vs the prior's ODE {e:e}");
        // Started at the guide itself, every solver returns the guide (to the rounding of its updates).
        let mut no_noise = NoiseStream::new(0);
        let at_guide = fast_sample_from(
            &be,
            &model,
            &sde,
            &y,
            &cfg,
            10,
            &y,
            &mut no_noise,
            &mut |_| Ok(()),
        )
        .unwrap();
        let e = rel_err_f64(&be.to_f64(&at_guide).unwrap(), &ys);
        assert!(e < 1e-14, "{solver:?} from x_T = y: {e:e}");
    }
}

/// Loss of the tiny residual model with one weight moved by `delta` at element `i`, and the move
/// the f32 weight actually made.
#[allow(clippy::too_many_arguments)]
fn loss_with(
    be: &B,
    cfg: &NetConfig,
    host: &BTreeMap<String, HostTensor>,
    name: &str,
    i: usize,
    delta: f64,
    data: &(
        srsde_fast::tensor::Tensor<B>,
        srsde_fast::tensor::Tensor<B>,
        srsde_fast::tensor::Tensor<B>,
    ),
    t: &[f64],
) -> (f64, f64) {
    let mut w = host.clone();
    let v = &mut w.get_mut(name).unwrap().data[i];
    let before = *v as f64;
    *v = (before + delta) as f32;
    let moved = *v as f64 - before;
    let model = ScoreModel::new(Ncsnpp::from_weights(be, cfg.clone(), &w, "<fd>").unwrap());
    (
        dsm_loss(&model, &data.0, &data.1, t, &data.2, 0, false)
            .unwrap()
            .loss,
        moved,
    )
}

#[test]
fn loss_gradients_match_finite_differences() {
    let be = B::new();
    let cfg = tiny_config(0.09);
    let net = Ncsnpp::random(&be, cfg.clone(), 9).unwrap();
    let host = net.to_host().unwrap();
    let model = ScoreModel::new(net);
    let shape = [2, 3, 16, 16];
    let y = uniform(&be, &shape, 21);
    let x0 = be
        .axpby(1.0, &y, 0.09, &be.randn(&shape, 22, 0).unwrap())
        .unwrap();
    let z = be.randn(&shape, 23, 0).unwrap();
    let t = [0.2, 0.8];
    let out = dsm_loss(&model, &x0, &y, &t, &z, 0, true).unwrap();
    let grads = out.grads.unwrap();
    let data = (x0, y, z);
    // One weight per kind of layer: the output conv, a dense of the time embedding, the input conv,
    // and a GroupNorm scale; two elements each.
    let specs = param_specs(&cfg);
    let pick = |pred: &dyn Fn(&str, &[usize]) -> bool| -> String {
        specs
            .iter()
            .find(|(n, s, trained)| *trained && pred(n, s))
            .map(|(n, _, _)| n.clone())
            .expect("such a parameter")
    };
    let last = specs.last().unwrap().0.clone();
    let names = [
        last.clone(),
        pick(&|n, s| n.starts_with("all_modules.1.") && s.len() == 2),
        pick(&|n, s| n.starts_with("all_modules.3.") && s.len() == 4),
        pick(&|n, _| n.contains("GroupNorm") && n.ends_with("weight")),
    ];
    let mut checked = 0;
    for name in &names {
        let g = be.to_f64(&grads.by_name[name]).unwrap();
        let n = g.len();
        for &i in &[0, n / 2] {
            let h = 1e-4;
            let (up, d_up) = loss_with(&be, &cfg, &host, name, i, h, &data, &t);
            let (down, d_down) = loss_with(&be, &cfg, &host, name, i, -h, &data, &t);
            let fd = (up - down) / (d_up - d_down);
            let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-6));
            assert!(
                err < 1e-3,
                "{name}[{i}]: autograd {} vs finite differences {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn loss_of_the_zero_network_is_about_one() {
    // F ≡ 0 has loss E[T²]; T has unit variance when the residual's RMS is σ_d. Data with a
    // residual of RMS exactly σ_d per pixel (±σ_d) give ≈ 1 at every σ.
    let be = B::new();
    let sd = 0.09;
    let model = zero_output(&be, &tiny_config(sd), 1);
    let shape = [4, 3, 16, 16];
    let y = uniform(&be, &shape, 31);
    let signs: Vec<f64> = be
        .to_f64(&be.rand_uniform(&shape, 32, 0).unwrap())
        .unwrap()
        .iter()
        .map(|u| if *u < 0.5 { -sd } else { sd })
        .collect();
    let x0 = be.add(&y, &be.from_f64(&shape, &signs).unwrap()).unwrap();
    let z = be.randn(&shape, 33, 0).unwrap();
    for t in [[0.05; 4], [0.5; 4], [0.95; 4]] {
        let l = dsm_loss(&model, &x0, &y, &t, &z, 0, false).unwrap().loss;
        assert!((l - 1.0).abs() < 0.15, "t = {}: loss {l}", t[0]);
    }
}

#[test]
fn log_normal_noise_levels() {
    let sde = NetConfig::preset("ve-res").unwrap().sde_schedule();
    let Sde::Ve(ve) = &sde else { panic!("VE") };
    let dist = NoiseDist::parse("log-normal:-2.0,1.5").unwrap();
    assert_eq!(dist, NoiseDist::LogNormal { mean: -2.0, std: 1.5 });
    assert_eq!(NoiseDist::parse(&dist.describe()).unwrap(), dist);
    assert!(NoiseDist::parse("log-normal:1").is_err());
    assert!(NoiseDist::parse("log-normal:1,-1").is_err());
    let t = draw_train_times(&dist, &sde, 5, 0, 20_000, 1e-5).unwrap();
    assert_eq!(t, draw_train_times(&dist, &sde, 5, 0, 20_000, 1e-5).unwrap());
    let ln: Vec<f64> = t.iter().map(|&t| ve.sigma(t).ln()).collect();
    assert!(ln
        .iter()
        .all(|l| (ve.sigma_min.ln() - 1e-9..=ve.sigma_max.ln() + 1e-9).contains(l)));
    // N(−2, 1.5²) truncated to [ln 0.01, ln 10] has mean −1.8718 and std 1.3524 (the truncated
    // normal's formulas); 20,000 draws put the sample mean within ≈ 0.01 of it.
    let mean = ln.iter().sum::<f64>() / ln.len() as f64;
    let std = (ln.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / ln.len() as f64).sqrt();
    assert!((mean + 1.8718).abs() < 0.04, "mean {mean}");
    assert!((std - 1.3524).abs() < 0.04, "std {std}");
    assert_eq!(
        draw_train_times(&NoiseDist::Paper, &sde, 5, 0, 8, 1e-5).unwrap(),
        srsde_fast::train::loss::draw_times(5, 0, 8, 1e-5)
    );
    let vp = NetConfig::preset("vp-tiny").unwrap().sde_schedule();
    assert!(draw_train_times(&dist, &vp, 5, 0, 8, 1e-5).is_err());
}

#[test]
fn config_round_trips_and_paper_configs_are_unchanged() {
    let c = NetConfig::preset("ve-res").unwrap();
    let json = c.model_json();
    assert!(
        json.contains(r#""parameterization":{"kind":"guide_residual","sigma_data":0.09}"#),
        "{json}"
    );
    assert_eq!(NetConfig::from_json(&json, Some(&c.data_json())).unwrap(), c);
    for p in ["ve-paper", "vp-paper", "ve-small", "ve-tiny"] {
        let json = NetConfig::preset(p).unwrap().model_json();
        assert!(!json.contains("parameterization"), "{p}: {json}");
    }
    // Bad combinations are refused.
    let mut bad = c.clone();
    bad.model.scale_by_sigma = true;
    assert!(bad.validate().is_err());
    let mut bad = c.clone();
    bad.model.parameterization = Parameterization::GuideResidual { sigma_data: 0.0 };
    assert!(bad.validate().is_err());
    let mut bad = NetConfig::preset("vp-tiny").unwrap();
    bad.model.parameterization = Parameterization::GuideResidual { sigma_data: 0.1 };
    assert!(bad.validate().is_err());
}

#[test]
fn cpu_default_sampler_follows_the_parameterization() {
    use srsde_fast::upscale::{cpu_default_sampler, CPU_DEFAULT_RESIDUAL, CPU_DEFAULT_SAMPLER};
    let res = NetConfig::preset("ve-res").unwrap();
    assert_eq!(
        cpu_default_sampler(&res),
        Some((CPU_DEFAULT_RESIDUAL.0, Some(CPU_DEFAULT_RESIDUAL.1)))
    );
    assert_eq!(
        cpu_default_sampler(&NetConfig::preset("ve-small").unwrap()),
        Some((CPU_DEFAULT_SAMPLER, None))
    );
    assert_eq!(cpu_default_sampler(&NetConfig::preset("vp-tiny").unwrap()), None);
    // The default is a valid configuration of its sampler for this model.
    let cfg = srsde_fast::sample::SamplerConfig::preset(CPU_DEFAULT_RESIDUAL.0, &res.sde_schedule()).unwrap();
    assert!(cfg.fast.is_some(), "the CPU default is one of the fast samplers");
}
