//! The trainer's device-resident optimiser (fused Adam / EMA on the backend, one download for
//! the gradient norm) against the host reference optimiser (`train::optim::Adam` / `Ema`) fed
//! the same gradients: on the CPU backend the two agree bit for bit, step after step. On a GPU,
//! a CUDA trainer follows the CPU one (skipped without a GPU).

use std::collections::BTreeMap;

use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::backend::cuda::{cuda_available, Cuda};
use srsde_fast::backend::Backend;
use srsde_fast::check::rel_err;
use srsde_fast::model::NetConfig;
use srsde_fast::train::data::Batch;
use srsde_fast::train::loss::{draw_noise, draw_times, dropout_seed, dsm_loss};
use srsde_fast::train::run::Trainer;
use srsde_fast::train::Hyper;

/// A small VE network at 32×32 with dropout, lr large enough (no warm-up) and a clip small
/// enough that every step is clipped and moves the weights.
fn setup() -> (NetConfig, Hyper) {
    let mut cfg = NetConfig::preset("ve-tiny").unwrap();
    cfg.data.image_size = 32;
    cfg.model.ch_mult = vec![1, 2];
    cfg.model.dropout = 0.1;
    let mut h = Hyper::paper("ve-tiny", &cfg);
    h.batch = 2;
    h.lr = 1e-3;
    h.warmup = 0;
    h.grad_clip = 1.0;
    h.seed = 11;
    (cfg, h)
}

fn batch(step: u64) -> Batch {
    let n = 2 * 3 * 32 * 32;
    Batch {
        hr: (0..n as u64)
            .map(|i| srsde_fast::rng::uniform(100 + step, i))
            .collect(),
        guide: (0..n as u64)
            .map(|i| srsde_fast::rng::uniform(200 + step, i))
            .collect(),
        len: 2,
        size: 32,
        files: vec![0; 2],
    }
}

#[test]
fn cpu_trainer_equals_the_host_optimiser_bitwise() {
    let be = CpuF32::new();
    let (cfg, hyper) = setup();
    let mut tr = Trainer::new(&be, cfg, hyper.clone()).unwrap();
    let mut params = tr.params().unwrap();
    let mut adam = tr.adam.download(&be).unwrap();
    let mut ema = tr.ema.download(&be).unwrap();
    for step in 0..3u64 {
        let b = batch(step);
        // The reference: the same loss and gradients, then the host optimiser.
        let (x0, y) = tr.batch_tensors(&b).unwrap();
        let t = draw_times(hyper.seed, step, b.len, hyper.t_eps);
        let z = draw_noise(&be, x0.shape(), hyper.seed, step).unwrap();
        let out = dsm_loss(&tr.model, &x0, &y, &t, &z, dropout_seed(hyper.seed, step), true).unwrap();
        let grads = out.grads.unwrap();
        let host_grads: BTreeMap<String, Vec<f32>> = adam
            .m
            .keys()
            .map(|n| (n.clone(), be.to_f32(&grads.by_name[n]).unwrap()))
            .collect();
        let want = adam.step(&mut params, &host_grads, step).unwrap();
        let want_decay = ema.update(&params).unwrap();

        let rep = tr.train_step(&b).unwrap();
        assert_eq!(rep.loss.to_bits(), out.loss.to_bits(), "step {step}: loss");
        assert_eq!(
            rep.grad_norm.to_bits(),
            want.grad_norm.to_bits(),
            "step {step}: norm"
        );
        assert_eq!(rep.clip_scale, want.clip_scale);
        assert!(rep.clip_scale < 1.0, "the clip is exercised");
        assert_eq!((rep.lr, rep.ema_decay), (want.lr, want_decay));
        assert_eq!(tr.params().unwrap(), params, "step {step}: weights");
        assert_eq!(tr.adam.download(&be).unwrap(), adam, "step {step}: Adam state");
        assert_eq!(tr.ema.download(&be).unwrap(), ema, "step {step}: EMA");
    }
    // The checkpoint carries the same state; a trainer resumed from it continues identically.
    let ck = tr.checkpoint(6).unwrap();
    assert_eq!(
        (ck.params.clone(), ck.adam.clone(), ck.ema.clone()),
        (params, adam, ema)
    );
    let mut resumed = Trainer::from_checkpoint(&be, ck).unwrap();
    let (a, b) = (
        tr.train_step(&batch(3)).unwrap(),
        resumed.train_step(&batch(3)).unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(tr.params().unwrap(), resumed.params().unwrap());
}

/// On a GPU: the CUDA trainer (f32 GEMMs) against the CPU trainer over three steps.
#[test]
fn cuda_trainer_follows_the_cpu_trainer() {
    if !cuda_available() {
        println!("skipped: no GPU");
        return;
    }
    let cuda = Cuda::new(0).unwrap();
    let cpu = CpuF32::new();
    let (cfg, hyper) = setup();
    let mut tc = Trainer::new(&cpu, cfg.clone(), hyper.clone()).unwrap();
    let mut tg = Trainer::new(&cuda, cfg, hyper).unwrap();
    for step in 0..3u64 {
        let (rc, rg) = (
            tc.train_step(&batch(step)).unwrap(),
            tg.train_step(&batch(step)).unwrap(),
        );
        println!(
            "step {step}: loss cpu {} cuda {}; norm {} vs {}",
            rc.loss, rg.loss, rc.grad_norm, rg.grad_norm
        );
        assert!((rc.loss - rg.loss).abs() <= 1e-4 * rc.loss.abs(), "loss");
        assert!(
            (rc.grad_norm - rg.grad_norm).abs() <= 1e-3 * rc.grad_norm,
            "grad norm"
        );
        assert_eq!((rc.lr, rc.ema_decay), (rg.lr, rg.ema_decay));
    }
    let (pc, pg) = (tc.params().unwrap(), tg.params().unwrap());
    let flat = |m: &BTreeMap<String, srsde_fast::tensor::HostTensor>| -> Vec<f32> {
        m.values().flat_map(|t| t.data.iter().copied()).collect()
    };
    let e = rel_err(&flat(&pg), &flat(&pc));
    println!("weights after 3 steps: rel err {e:.2e}");
    assert!(e < 1e-5, "weights {e}");
    let (ec, eg) = (tc.ema.download(&cpu).unwrap(), tg.ema.download(&cuda).unwrap());
    let flat_e = |m: &BTreeMap<String, Vec<f32>>| -> Vec<f32> { m.values().flatten().copied().collect() };
    assert!(rel_err(&flat_e(&eg.shadow), &flat_e(&ec.shadow)) < 1e-5, "EMA");
}
