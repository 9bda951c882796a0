//! Criterion benchmarks: on the CPU backend one forward pass (NFE) of the paper's VE network and
//! of `ve-small` at 128×128, batch 1, one predictor–corrector step (2 NFE + updates), and one
//! training step of the default model's network (`ve-res`, batch 4); on a CUDA
//! device (when there is one; otherwise it prints that it skipped) the `ve-paper` NFE at batch 1 and
//! 64 and the PC step at batch 1 in f32/TF32/bf16. `srsde-fast bench` prints the same measurements,
//! plus the CUDA-graph PC step and the training step, as a table.
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};

use srsde_fast::autograd::Graph;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::backend::Backend;
use srsde_fast::bench::{random_network, train_step_fixture};
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

/// One predictor–corrector step (`sde-ve-cs`, batch 1, t = 0.5) of `model` as benchmark `name`,
/// waiting for the device after each.
fn bench_pc_step<B: Backend>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    be: &B,
    model: &ScoreModel<B>,
) {
    let cfg = SamplerConfig::preset("sde-ve-cs", &model.sde).unwrap();
    let langevin = cfg.langevin();
    let y = be.rand_uniform(&[1, 3, 128, 128], 2, 0).unwrap();
    let x = be.randn(&[1, 3, 128, 128], 3, 0).unwrap();
    let mut noise = NoiseStream::new(4);
    group.bench_function(name, |b| {
        b.iter(|| {
            let c = corrector_step(
                be,
                model,
                &model.sde,
                cfg.corrector,
                &langevin,
                &x,
                &y,
                0.5,
                &mut noise,
            )
            .unwrap();
            let out =
                predictor_step(be, model, &model.sde, cfg.predictor, &c.x, &y, 0.5, &mut noise).unwrap();
            be.synchronize().unwrap();
            out
        })
    });
}

fn pc_step(c: &mut Criterion) {
    let be = CpuF32::new();
    let mut group = c.benchmark_group("cpu_pc_step_128");
    group.sample_size(10);
    for preset in ["ve-small", "ve-paper"] {
        let model = ScoreModel::new(random_network(&be, preset).expect("network"));
        bench_pc_step(&mut group, preset, &be, &model);
    }
    group.finish();
}

fn cuda(c: &mut Criterion) {
    use srsde_fast::backend::cuda::{Cuda, Precision};
    let base = match Cuda::new(0) {
        Ok(be) => be,
        Err(e) => {
            eprintln!("cuda benchmarks skipped: no GPU ({e})");
            return;
        }
    };
    let mut group = c.benchmark_group("cuda_ve_paper_128");
    group.sample_size(10);
    for precision in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let be = base.with_precision(precision);
        let net = random_network(&be, "ve-paper").expect("network");
        for batch in [1usize, 64] {
            let x = be.randn(&[batch, 6, 128, 128], 1, 0).unwrap();
            let label = be.from_f32(&[batch], &vec![1.0; batch]).unwrap();
            group.bench_function(format!("nfe_b{batch}_{}", precision.as_str()), |b| {
                b.iter(|| {
                    let g = Graph::inference(&be);
                    let y = net
                        .forward(&g, &g.constant(x.clone()), &label, Forward::default())
                        .unwrap();
                    be.synchronize().unwrap();
                    y
                })
            });
        }
        let model = ScoreModel::new(net);
        bench_pc_step(
            &mut group,
            &format!("pc_step_b1_{}", precision.as_str()),
            &be,
            &model,
        );
    }
    group.finish();
}

/// One CPU training step (loss, backward, clip, Adam, EMA) of `ve-res` at batch 4, 128×128: the
/// step the default model trains with (issue 16; `srsde-fast bench --train --device cpu` prints its
/// per-op profile).
fn train_step(c: &mut Criterion) {
    let be = CpuF32::new();
    let mut group = c.benchmark_group("cpu_train_step_128");
    group.sample_size(10);
    let (mut trainer, data) = train_step_fixture(&be, "ve-res", 128, 4).expect("trainer");
    group.bench_function("ve-res_b4", |b| b.iter(|| trainer.train_step(&data).unwrap()));
    group.finish();
}

criterion_group!(benches, forward, pc_step, train_step, cuda);
criterion_main!(benches);
