//! SDE schedules and single sampler updates against the original (golden/sde_steps.safetensors).
mod common;

use common::Golden;
use srsde_fast::backend::cpu::Cpu;
use srsde_fast::backend::Backend;
use srsde_fast::check::{rel_err, rel_err_f64};
use srsde_fast::sample::{EulerMaruyama, Langevin, LangevinNorm, ReverseDiffusion, Update};
use srsde_fast::sde::Sde;
use srsde_fast::tensor::HostTensor;

const TOL: f64 = 1e-5;

fn sdes() -> [Sde; 3] {
    [Sde::paper_ve(), Sde::paper_vp(), Sde::paper_subvp()]
}

/// Every schedule value at each (x[i], t[i]), compared per time point so that the tiny values near
/// t = 0 are held to the same relative bound as the large ones.
#[test]
fn schedules_match_original() {
    let g = Golden::load("sde_steps.safetensors");
    let ts = &g.get("t").1;
    let (xshape, xs) = g.get("x");
    let per = xshape[1..].iter().product::<usize>();
    let worst = std::cell::Cell::new(0.0f64);
    for sde in sdes() {
        let name = sde.name();
        let scalar = |key: &str, f: &dyn Fn(f64) -> f64| {
            let want = &g.get(&format!("{name}.{key}")).1;
            for (i, &t) in ts.iter().enumerate() {
                let err = rel_err_f64(&[f(t)], &[want[i]]);
                worst.set(worst.get().max(err));
                assert!(
                    err < TOL,
                    "{name}.{key} at t={t}: {} vs {} (rel {err:e})",
                    f(t),
                    want[i]
                );
            }
        };
        scalar("marginal_std", &|t| sde.marginal_std(t));
        scalar("diffusion", &|t| sde.diffusion(t));
        scalar("discretize_G", &|t| sde.discretize(t).g);
        let linear = |key: &str, coef: &dyn Fn(f64) -> f64| {
            let want = &g.get(&format!("{name}.{key}")).1;
            for (i, &t) in ts.iter().enumerate() {
                let x = &xs[i * per..(i + 1) * per];
                let got: Vec<f64> = x.iter().map(|v| coef(t) * v).collect();
                let err = rel_err_f64(&got, &want[i * per..(i + 1) * per]);
                worst.set(worst.get().max(err));
                assert!(err < TOL, "{name}.{key} at t={t}: rel {err:e}");
            }
        };
        linear("marginal_mean", &|t| sde.marginal_mean_coef(t));
        linear("drift", &|t| sde.drift_coef(t));
        linear("discretize_f", &|t| sde.discretize(t).f_coef);
    }
    println!("worst schedule rel err {:.2e}", worst.get());
}

struct StepInputs {
    x: HostTensor,
    score: HostTensor,
    noise: HostTensor,
    t: f64,
}

fn step_inputs(g: &Golden) -> StepInputs {
    let t = g.get("step.t").1[0];
    assert!(g.get("step.t").1.iter().all(|&v| v == t), "one t for the batch");
    StepInputs {
        x: g.host("step.x"),
        score: g.host("step.score"),
        noise: g.host("step.noise"),
        t,
    }
}

fn download(b: &Cpu<f32>, u: &Update<Cpu<f32>>) -> (Vec<f32>, Vec<f32>) {
    (b.to_f32(&u.x).unwrap(), b.to_f32(&u.x_mean).unwrap())
}

fn check(g: &Golden, key: &str, got: (Vec<f32>, Vec<f32>)) {
    for (part, v) in [("x", got.0), ("x_mean", got.1)] {
        let want = g.host(&format!("{key}.{part}"));
        let err = rel_err(&v, &want.data);
        println!("{key}.{part}: rel err {err:.2e}");
        assert!(err < TOL, "{key}.{part}: rel err {err:e}");
    }
}

/// Both predictors on every SDE (the original can run either on any SDE) with the fixed fake score
/// and noise of the golden file.
#[test]
fn predictor_updates_match_original() {
    let g = Golden::load("sde_steps.safetensors");
    let b = Cpu::<f32>::new();
    let inp = step_inputs(&g);
    let (x, s, z) = (
        inp.x.to_device(&b).unwrap(),
        inp.score.to_device(&b).unwrap(),
        inp.noise.to_device(&b).unwrap(),
    );
    for sde in sdes() {
        let rd = ReverseDiffusion::update(&b, &sde, &x, &s, &z, inp.t).unwrap();
        check(
            &g,
            &format!("step.{}.reverse_diffusion", sde.name()),
            download(&b, &rd),
        );
        let em = EulerMaruyama::update(&b, &sde, &x, &s, &z, inp.t).unwrap();
        check(
            &g,
            &format!("step.{}.euler_maruyama", sde.name()),
            download(&b, &em),
        );
    }
}

fn langevin(norm: LangevinNorm) -> Langevin {
    Langevin {
        snr: 0.075,
        n_steps: 1,
        norm,
    }
}

/// Batch-norm Langevin reproduces the original on VE and VP.
#[test]
fn langevin_batch_norm_matches_original() {
    let g = Golden::load("sde_steps.safetensors");
    let b = Cpu::<f32>::new();
    let inp = step_inputs(&g);
    let (x, s, z) = (
        inp.x.to_device(&b).unwrap(),
        inp.score.to_device(&b).unwrap(),
        inp.noise.to_device(&b).unwrap(),
    );
    for sde in [Sde::paper_ve(), Sde::paper_vp()] {
        let up = langevin(LangevinNorm::Batch)
            .update(&b, &sde, &x, &s, &z, inp.t)
            .unwrap();
        check(&g, &format!("step.{}.langevin", sde.name()), download(&b, &up));
    }
}

/// Per-image norms differ from batch norms on a batch of 3, agree on a batch of 1, and make each
/// image's update independent of the rest of the batch. subVP uses VP's α (our extension).
#[test]
fn langevin_per_image_norm() {
    let g = Golden::load("sde_steps.safetensors");
    let b = Cpu::<f32>::new();
    let inp = step_inputs(&g);
    let up = |sde: &Sde, norm, x: &HostTensor, s: &HostTensor, z: &HostTensor| {
        let (x, s, z) = (
            x.to_device(&b).unwrap(),
            s.to_device(&b).unwrap(),
            z.to_device(&b).unwrap(),
        );
        download(&b, &langevin(norm).update(&b, sde, &x, &s, &z, inp.t).unwrap())
    };
    let one = |h: &HostTensor, k: usize| {
        let per = h.numel() / h.shape[0];
        let mut shape = h.shape.clone();
        shape[0] = 1;
        HostTensor::new(shape, h.data[k * per..(k + 1) * per].to_vec())
    };
    for sde in [Sde::paper_ve(), Sde::paper_vp()] {
        let per_image = up(&sde, LangevinNorm::PerImage, &inp.x, &inp.score, &inp.noise);
        let batch = up(&sde, LangevinNorm::Batch, &inp.x, &inp.score, &inp.noise);
        let diff = rel_err(&per_image.0, &batch.0);
        assert!(
            diff > 1e-3,
            "{}: per-image and batch norms should differ on this batch ({diff:e})",
            sde.name()
        );
        let per = inp.x.numel() / 3;
        for k in 0..3 {
            let (x, s, z) = (one(&inp.x, k), one(&inp.score, k), one(&inp.noise, k));
            let p1 = up(&sde, LangevinNorm::PerImage, &x, &s, &z);
            let b1 = up(&sde, LangevinNorm::Batch, &x, &s, &z);
            assert!(
                rel_err(&p1.0, &b1.0) < 1e-7 && rel_err(&p1.1, &b1.1) < 1e-7,
                "batch of 1, image {k}"
            );
            let slice = &per_image.0[k * per..(k + 1) * per];
            assert!(rel_err(&p1.0, slice) < 1e-7, "image {k} depends on its batch");
        }
    }
    // subVP: same α schedule as VP, so the same Langevin update.
    let vp = up(
        &Sde::paper_vp(),
        LangevinNorm::Batch,
        &inp.x,
        &inp.score,
        &inp.noise,
    );
    let sub = up(
        &Sde::paper_subvp(),
        LangevinNorm::Batch,
        &inp.x,
        &inp.score,
        &inp.noise,
    );
    assert_eq!(vp, sub);
}
