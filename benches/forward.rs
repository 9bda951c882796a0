//! Criterion benchmarks on the CPU backend: one forward pass (NFE) of the paper's VE network and
//! of `ve-small` at 128×128, batch 1, and one predictor–corrector step (2 NFE + updates).
//! `srsde-fast bench` prints the same measurements (and the CUDA ones) as a table.
use criterion::{criterion_group, criterion_main, Criterion};

use srsde_fast::autograd::Graph;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::backend::Backend;
use srsde_fast::bench::random_network;
use srsde_fast::model::ncsnpp::Forward;
use srsde_fast::model::ScoreModel;
use srsde_fast::sample::pc::{corrector_step, predictor_step};
use srsde_fast::sample::{NoiseStream, SamplerConfig};

fn forward(c: &mut Criterion) {
    let be = CpuF32::new();
    let mut group = c.benchmark_group("cpu_forward_128");
    group.sample_size(10);
    for preset in ["ve-small", "ve-paper"] {
        let net = random_network(&be, preset).expect("network");
        let x = be.randn(&[1, 6, 128, 128], 1, 0).unwrap();
        let label = be.from_f32(&[1], &[1.0]).unwrap();
        group.bench_function(preset, |b| {
            b.iter(|| {
                let g = Graph::inference(&be);
                net.forward(&g, &g.constant(x.clone()), &label, Forward::default())
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn pc_step(c: &mut Criterion) {
    let be = CpuF32::new();
    let mut group = c.benchmark_group("cpu_pc_step_128");
    group.sample_size(10);
    for preset in ["ve-small", "ve-paper"] {
        let model = ScoreModel::new(random_network(&be, preset).expect("network"));
        let cfg = SamplerConfig::preset("sde-ve-cs", &model.sde).unwrap();
        let langevin = cfg.langevin();
        let y = be.rand_uniform(&[1, 3, 128, 128], 2, 0).unwrap();
        let x = be.randn(&[1, 3, 128, 128], 3, 0).unwrap();
        let mut noise = NoiseStream::new(4);
        group.bench_function(preset, |b| {
            b.iter(|| {
                let c = corrector_step(
                    &be,
                    &model,
                    &model.sde,
                    cfg.corrector,
                    &langevin,
                    &x,
                    &y,
                    0.5,
                    &mut noise,
                )
                .unwrap();
                predictor_step(&be, &model, &model.sde, cfg.predictor, &c.x, &y, 0.5, &mut noise).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward, pc_step);
criterion_main!(benches);
