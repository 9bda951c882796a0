//! CUDA-graph sampling against the eager CUDA sampler (sample::graph). Needs a GPU: without one
//! every test prints "skipped: no GPU" and returns.
//!
//! The tests share one lock: a capture must not overlap another thread's synchronising calls on
//! the same device (a pool trim, a context synchronize).
use std::sync::Mutex;

use srsde_fast::backend::cuda::{self, Cuda, Precision};
use srsde_fast::backend::Backend;
use srsde_fast::model::ncsnpp::Ncsnpp;
use srsde_fast::model::{NetConfig, ScoreModel};
use srsde_fast::sample::fast::graph::{fast_graph_parity, fast_parity_cases, FastGraph, FastParityCase};
use srsde_fast::sample::fast::{fast_sample, fast_sample_eager, schedule, FastConfig, FastSolver};
use srsde_fast::sample::graph::{cuda_graphs_enabled, graph_parity, ParityCase, PcGraph};
use srsde_fast::sample::pc::pc_sample_eager;
use srsde_fast::sample::{pc_sample_with_noise, LangevinNorm, NoiseStream, SamplerConfig};

static GPU: Mutex<()> = Mutex::new(());

fn device() -> Option<(Cuda, std::sync::MutexGuard<'static, ()>)> {
    if !cuda::cuda_available() || cuda::built_without_kernels().is_some() {
        println!("skipped: no GPU");
        return None;
    }
    let guard = GPU.lock().unwrap_or_else(|p| p.into_inner());
    Some((Cuda::new(0).expect("a CUDA device is present"), guard))
}

fn check(cuda: &Cuda, case: ParityCase<'_>) {
    let p = graph_parity(cuda, &case, 17).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    println!(
        "{case:?} [{}]: rel err {:.2e}, bitwise {}, {} nodes per step",
        cuda.precision(),
        p.rel_err,
        p.identical,
        p.nodes
    );
    assert!(
        p.rel_err <= 1e-6,
        "{case:?}: graph vs eager rel err {}",
        p.rel_err
    );
    assert!(
        p.nodes > 10,
        "{case:?}: a step of a network has more than {} nodes",
        p.nodes
    );
}

#[test]
fn graph_matches_eager_sde_ve() {
    let Some((cuda, _lock)) = device() else { return };
    for batch in [1, 3] {
        check(&cuda, ParityCase::new("ve-tiny", "sde-ve", batch, false));
        check(&cuda, ParityCase::new("ve-tiny", "sde-ve", batch, true));
    }
}

#[test]
fn graph_matches_eager_sde_ve_cs_langevin() {
    let Some((cuda, _lock)) = device() else { return };
    for batch in [1, 3] {
        check(&cuda, ParityCase::new("ve-tiny", "sde-ve-cs", batch, true));
        check(&cuda, ParityCase::new("ve-tiny", "sde-ve-cs", batch, false));
        check(
            &cuda,
            ParityCase {
                langevin_norm: LangevinNorm::Batch,
                ..ParityCase::new("ve-tiny", "sde-ve-cs", batch, true)
            },
        );
    }
    // Two corrector steps per time step: the second draw of a step.
    let mut two = ParityCase::new("ve-tiny", "sde-ve-cs", 2, true);
    two.steps = 3;
    let p = graph_parity(&cuda, &two, 5).unwrap();
    assert!(p.rel_err <= 1e-6, "{}", p.rel_err);
}

#[test]
fn graph_matches_eager_sde_vp() {
    let Some((cuda, _lock)) = device() else { return };
    for batch in [1, 3] {
        check(&cuda, ParityCase::new("vp-tiny", "sde-vp", batch, false));
        check(&cuda, ParityCase::new("vp-tiny", "sde-vp", batch, true));
    }
}

#[test]
fn graph_matches_eager_in_bf16() {
    let Some((cuda, _lock)) = device() else { return };
    if !cuda.supports(Precision::Bf16) {
        println!("skipped: no bf16 kernels in this build");
        return;
    }
    check(
        &cuda.with_precision(Precision::Bf16),
        ParityCase::new("ve-tiny", "sde-ve-cs", 2, true),
    );
}

/// pc_sample_with_noise takes the graph path on CUDA (no fallback note, graphs stay on) and
/// returns what the eager loop returns; the observer sees every step.
#[test]
fn pc_sample_uses_the_graph_on_cuda() {
    let Some((cuda, _lock)) = device() else { return };
    let mut config = NetConfig::preset("ve-tiny").unwrap();
    config.model.dropout = 0.0;
    let model = ScoreModel::new(Ncsnpp::random(&cuda, config, 3).unwrap());
    let mut cfg = SamplerConfig::preset("sde-ve-cs", &model.sde).unwrap();
    cfg.steps = 5;
    let y = cuda.rand_uniform(&[2, 3, 128, 128], 9, 0).unwrap();
    let noise = NoiseStream::per_image(vec![1, 2]);
    let mut seen = Vec::new();
    let got = pc_sample_with_noise(&cuda, &model, &model.sde, &y, &cfg, noise.clone(), &mut |info| {
        seen.push((info.step, info.total));
        Ok(())
    })
    .unwrap();
    assert!(cuda_graphs_enabled(), "the graph path fell back to eager");
    assert_eq!(seen, (0..5).map(|i| (i, 5)).collect::<Vec<_>>());
    let want = pc_sample_eager(&cuda, &model, &model.sde, &y, &cfg, noise, &mut |_| Ok(())).unwrap();
    let (a, b) = (cuda.to_f32(&got).unwrap(), cuda.to_f32(&want).unwrap());
    assert!(srsde_fast::check::rel_err(&a, &b) <= 1e-6);
}

/// Stepping, the step limit, rewinding, and the graph's memory going back to the pool.
#[test]
fn pc_graph_steps_rewinds_and_releases_memory() {
    let Some((cuda, _lock)) = device() else { return };
    let mut config = NetConfig::preset("vp-tiny").unwrap();
    config.model.dropout = 0.0;
    let model = ScoreModel::new(Ncsnpp::random(&cuda, config, 4).unwrap());
    let mut cfg = SamplerConfig::preset("sde-vp", &model.sde).unwrap();
    cfg.steps = 3;
    let y = cuda.zeros(&[1, 3, 128, 128]).unwrap();
    let graph_bytes;
    {
        let mut g = PcGraph::new(&model, &model.sde, &cfg, &y, NoiseStream::new(1)).unwrap();
        graph_bytes = g.graph_memory_bytes();
        assert!(graph_bytes > 0);
        g.run(3).unwrap();
        assert!(g.step().is_err(), "a fourth step of three must be refused");
        g.check().unwrap();
        g.rewind().unwrap();
        g.run(2).unwrap();
        assert_eq!(g.steps_done(), 2);
        let x = g.finish().unwrap();
        assert!(cuda.to_f32(&x).unwrap().iter().all(|v| v.is_finite()));
    }
    // Dropping the graph returns its blocks to the free lists (vp-tiny has no scale_by_sigma, so
    // no twin network and no pool trim in between).
    let cached = cuda.pool_stats().bytes_cached;
    assert!(
        cached >= graph_bytes,
        "{cached} bytes cached, the graph held {graph_bytes}"
    );
    // A second graph on the same handle builds (no capture state left behind).
    let mut g = PcGraph::new(&model, &model.sde, &cfg, &y, NoiseStream::new(2)).unwrap();
    g.run(3).unwrap();
    g.finish().unwrap();
}

/// A capture that synchronizes fails cleanly: an error, and the stream and allocator work after.
#[test]
fn failed_capture_leaves_the_device_usable() {
    let Some((cuda, _lock)) = device() else { return };
    let t = cuda.zeros(&[8]).unwrap();
    let r = cuda.capture(|| {
        let u = cuda.affine(&t, 2.0, 1.0)?;
        cuda.to_f32(&u) // a host copy + synchronize: not capturable
    });
    assert!(r.is_err(), "capturing a host read must fail");
    let u = cuda.affine(&t, 2.0, 1.0).unwrap();
    assert_eq!(cuda.to_f32(&u).unwrap(), vec![1.0; 8]);
    // And a plain capture records without running, then replays: out = 2·x + 1.
    let x = cuda.from_f32(&[8], &[3.0; 8]).unwrap();
    let (graph, out) = cuda.capture(|| cuda.affine(&x, 2.0, 1.0)).unwrap();
    graph.launch().unwrap();
    graph.launch().unwrap();
    assert_eq!(cuda.to_f32(&out).unwrap(), vec![7.0; 8]);
    drop(graph); // before `out`, whose buffer the graph writes
}

fn check_fast(cuda: &Cuda, case: FastParityCase<'_>) {
    let p = fast_graph_parity(cuda, &case, 23).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    println!(
        "{case:?} [{}]: rel err {:.2e}, bitwise {}, {} nodes per evaluation",
        cuda.precision(),
        p.rel_err,
        p.identical,
        p.nodes
    );
    assert!(
        p.rel_err <= 1e-6,
        "{case:?}: fast graph vs eager rel err {}",
        p.rel_err
    );
    assert!(
        p.steps_match,
        "{case:?}: the observer saw other steps than the eager sampler's"
    );
    assert!(
        p.nodes > 10,
        "{case:?}: a stage with a network has more than {} nodes",
        p.nodes
    );
}

/// dpm2, dpm3 and ode-heun with and without churn, batch 1 and 3, per-image and one stream, on
/// ve-tiny and vp-tiny: the graph gives the eager fast sampler's result.
#[test]
fn fast_graph_matches_eager() {
    let Some((cuda, _lock)) = device() else { return };
    for case in fast_parity_cases() {
        check_fast(&cuda, case);
    }
    // dpm1 (one term, no history) and a longer dpm3 run with churn.
    let base = fast_parity_cases()[0];
    check_fast(
        &cuda,
        FastParityCase {
            solver: FastSolver::Dpm { order: 1 },
            churn: 0.7,
            ..base
        },
    );
    check_fast(
        &cuda,
        FastParityCase {
            solver: FastSolver::Dpm { order: 3 },
            steps: 12,
            churn: 0.2,
            batch: 2,
            ..base
        },
    );
}

#[test]
fn fast_graph_matches_eager_in_bf16() {
    let Some((cuda, _lock)) = device() else { return };
    if !cuda.supports(Precision::Bf16) {
        println!("skipped: no bf16 kernels in this build");
        return;
    }
    let bf16 = cuda.with_precision(Precision::Bf16);
    for case in fast_parity_cases().into_iter().filter(|c| c.batch == 3) {
        check_fast(&bf16, case);
    }
}

/// fast_sample takes the graph path on CUDA (no fallback note, graphs stay on), returns what the
/// eager solvers return, and its observer sees every evaluation; stepping past the end is refused.
#[test]
fn fast_sample_uses_the_graph_on_cuda() {
    let Some((cuda, _lock)) = device() else { return };
    let mut config = NetConfig::preset("ve-tiny").unwrap();
    config.model.dropout = 0.0;
    let model = ScoreModel::new(Ncsnpp::random(&cuda, config, 3).unwrap());
    let cfg = FastConfig {
        churn: 0.3,
        ..FastConfig::new(FastSolver::Dpm { order: 2 })
    };
    let y = cuda.rand_uniform(&[2, 3, 128, 128], 9, 0).unwrap();
    let noise = NoiseStream::per_image(vec![1, 2]);
    let mut seen = Vec::new();
    let got = fast_sample(
        &cuda,
        &model,
        &model.sde,
        &y,
        &cfg,
        6,
        noise.clone(),
        &mut |info| {
            seen.push((info.step, info.total));
            Ok(())
        },
    )
    .unwrap();
    assert!(cuda_graphs_enabled(), "the fast graph path fell back to eager");
    assert_eq!(seen, (0..6).map(|i| (i, 6)).collect::<Vec<_>>());
    let want = fast_sample_eager(&cuda, &model, &model.sde, &y, &cfg, 6, noise.clone(), &mut |_| {
        Ok(())
    })
    .unwrap();
    let (a, b) = (cuda.to_f32(&got).unwrap(), cuda.to_f32(&want).unwrap());
    assert!(srsde_fast::check::rel_err(&a, &b) <= 1e-6);

    let mut n = noise;
    let x_t = cuda
        .affine(&n.next(&cuda, y.shape()).unwrap(), model.sde.prior_std(), 0.0)
        .unwrap();
    let xh = cuda
        .affine(&x_t, 1.0 / schedule::alpha(&model.sde, 1.0), 0.0)
        .unwrap();
    let mut g = FastGraph::new(&model, &model.sde, &cfg, 6, &y, &xh, &n).unwrap();
    for _ in 0..6 {
        g.stage().unwrap();
    }
    assert!(g.stage().is_err(), "a seventh evaluation of six must be refused");
    let x = g.finish().unwrap();
    assert_eq!(
        cuda.to_f32(&x).unwrap(),
        a,
        "FastGraph::finish gives fast_sample's result"
    );
}

/// The bench row "dpm2, CUDA graph vs eager" runs (ve-tiny, 4 evaluations, batch 1).
#[test]
fn fast_graph_bench_runs() {
    let Some((cuda, _lock)) = device() else { return };
    let model = ScoreModel::new(srsde_fast::bench::random_network(&cuda, "ve-tiny").unwrap());
    let (eager, graph, nodes) = srsde_fast::bench::time_fast_sample_graph(&model, 4, 1, 2)
        .unwrap()
        .unwrap();
    println!(
        "dpm2 4 NFE b1: eager {:.2} ms, graph {:.2} ms ({nodes} nodes)",
        eager.median_ms, graph.median_ms
    );
    assert!(eager.median_ms > 0.0 && graph.median_ms > 0.0 && nodes > 10);
}
