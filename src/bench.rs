//! Benchmarks shared by `srsde-fast bench` and the criterion benches: one network evaluation
//! (NFE) and one predictor–corrector step, timed on any backend, plus the process's peak memory.
use std::time::Instant;

use crate::autograd::Graph;
use crate::backend::Backend;
use crate::error::Result;
use crate::model::ncsnpp::{Forward, Ncsnpp};
use crate::model::{NetConfig, ScoreModel};
use crate::sample::pc::{corrector_step, predictor_step};
use crate::sample::{NoiseStream, SamplerConfig};

/// Timing summary of repeated runs, in milliseconds.
#[derive(Clone, Debug)]
pub struct Timing {
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
}

fn summarise(mut ms: Vec<f64>) -> Timing {
    ms.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Timing {
        runs: ms.len(),
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
    }
}

/// Time `f` `iters` times after one warm-up run; `sync` waits for queued device work.
pub fn time_it(
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
    sync: impl Fn() -> Result<()>,
) -> Result<Timing> {
    f()?;
    sync()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        sync()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(summarise(ms))
}

/// Forward FLOPs per image of the paper presets, from the analytic count in the spec (§7).
pub fn known_gflop_per_nfe(preset: &str) -> Option<f64> {
    match preset {
        "ve-paper" => Some(133.9),
        "vp-paper" | "subvp-paper" => Some(567.6),
        _ => None,
    }
}

/// A network of `preset` with deterministic random weights (benchmarks need no trained model).
pub fn random_network<B: Backend>(backend: &B, preset: &str) -> Result<Ncsnpp<B>> {
    let mut cfg = NetConfig::preset(preset)?;
    cfg.model.dropout = 0.0;
    Ncsnpp::random(backend, cfg, 1234)
}

/// One inference forward pass (no tape) at `batch`, timed.
pub fn time_nfe<B: Backend>(net: &Ncsnpp<B>, batch: usize, iters: usize) -> Result<Timing> {
    let be = net.backend();
    let size = net.config.data.image_size;
    let c = net.config.data.num_channels;
    let x = be.randn(&[batch, c, size, size], 1, 0)?;
    let labels = be.from_f32(&[batch], &vec![1.0; batch])?;
    time_it(
        iters,
        || {
            let g = Graph::inference(be);
            net.forward(&g, &g.constant(x.clone()), &labels, Forward::default())?;
            Ok(())
        },
        || be.synchronize(),
    )
}

/// One step of the paper's VE sampler (`sde-ve-cs`: Langevin corrector + reverse-diffusion
/// predictor = 2 NFE + updates) at `batch`, timed.
pub fn time_pc_step<B: Backend>(model: &ScoreModel<B>, batch: usize, iters: usize) -> Result<Timing> {
    let be = model.net.backend();
    let size = model.net.config.data.image_size;
    let sde = &model.sde;
    let preset = if matches!(sde, crate::sde::Sde::Ve(_)) {
        "sde-ve-cs"
    } else {
        "sde-vp"
    };
    let cfg = SamplerConfig::preset(preset, sde)?;
    let langevin = cfg.langevin();
    let y = be.rand_uniform(&[batch, 3, size, size], 2, 0)?;
    let mut x = be.randn(&[batch, 3, size, size], 3, 0)?;
    let mut noise = NoiseStream::new(4);
    let t = 0.5;
    time_it(
        iters,
        || {
            let c = corrector_step(be, model, sde, cfg.corrector, &langevin, &x, &y, t, &mut noise)?;
            let p = predictor_step(be, model, sde, cfg.predictor, &c.x, &y, t, &mut noise)?;
            x = p.x;
            Ok(())
        },
        || be.synchronize(),
    )
}

/// The PC step of [`time_pc_step`] replayed from a CUDA graph (sampler::graph::PcGraph: one
/// `cuGraphLaunch` per step), from t = 1 down, at `batch`: the timing and the graph's nodes per
/// step. `None` on backends other than CUDA.
pub fn time_pc_step_graph<B: Backend>(
    model: &ScoreModel<B>,
    batch: usize,
    iters: usize,
) -> Result<Option<(Timing, usize)>> {
    use crate::backend::cuda::Cuda;
    let Some(model) = (model as &dyn std::any::Any).downcast_ref::<ScoreModel<Cuda>>() else {
        return Ok(None);
    };
    let be = model.net.backend();
    let size = model.net.config.data.image_size;
    let preset = if matches!(model.sde, crate::sde::Sde::Ve(_)) {
        "sde-ve-cs"
    } else {
        "sde-vp"
    };
    let cfg = SamplerConfig::preset(preset, &model.sde)?;
    let y = be.rand_uniform(&[batch, 3, size, size], 2, 0)?;
    let mut graph = crate::sample::graph::PcGraph::new(model, &model.sde, &cfg, &y, NoiseStream::new(4))?;
    let nodes = graph.nodes();
    let t = time_it(
        iters,
        || {
            if graph.steps_done() == graph.total_steps() {
                graph.rewind()?;
            }
            graph.step()
        },
        || be.synchronize(),
    )?;
    Ok(Some((t, nodes)))
}

/// A whole DPM-Solver++(2M) run of `steps` network evaluations at `batch` (σ̂ from the top down to
/// the denoised result), eager ([`crate::sample::fast::fast_sample_eager`]: every kernel launched
/// from the host) and replayed from the fast sampler's CUDA graph
/// ([`crate::sample::fast::graph::FastGraph`], built once outside the timing: one `cuGraphLaunch`
/// per evaluation). Returns (eager, graph, nodes per evaluation); `None` on backends other than CUDA.
pub fn time_fast_sample_graph<B: Backend>(
    model: &ScoreModel<B>,
    steps: usize,
    batch: usize,
    iters: usize,
) -> Result<Option<(Timing, Timing, usize)>> {
    use crate::backend::cuda::Cuda;
    use crate::sample::fast::{fast_sample_eager, graph::FastGraph, schedule, FastConfig, FastSolver};
    let Some(model) = (model as &dyn std::any::Any).downcast_ref::<ScoreModel<Cuda>>() else {
        return Ok(None);
    };
    let be = model.net.backend();
    let size = model.net.config.data.image_size;
    let sde = &model.sde;
    let cfg = FastConfig::new(FastSolver::Dpm { order: 2 });
    let y = be.rand_uniform(&[batch, 3, size, size], 2, 0)?;
    let eager = time_it(
        iters,
        || {
            fast_sample_eager(be, model, sde, &y, &cfg, steps, NoiseStream::new(4), &mut |_| {
                Ok(())
            })
            .map(|_| ())
        },
        || be.synchronize(),
    )?;
    let mut noise = NoiseStream::new(4);
    let x_t = be.affine(&noise.next(be, y.shape())?, sde.prior_std(), 0.0)?;
    let xh = be.affine(&x_t, 1.0 / schedule::alpha(sde, 1.0), 0.0)?;
    let mut graph = FastGraph::new(model, sde, &cfg, steps, &y, &xh, &noise)?;
    let nodes = graph.nodes();
    let replayed = time_it(
        iters,
        || {
            graph.rewind()?;
            (0..steps).try_for_each(|_| graph.stage())
        },
        || be.synchronize(),
    )?;
    graph.check()?;
    Ok(Some((eager, replayed, nodes)))
}

/// A trainer for a `preset` network at `batch` and a batch of random data at `image_size`: what
/// one training step (DSM loss, backward, grad clip, Adam, EMA update) runs on, for
/// [`time_train_step`] and the criterion bench.
pub fn train_step_fixture<B: Backend>(
    backend: &B,
    preset: &str,
    image_size: usize,
    batch: usize,
) -> Result<(crate::train::run::Trainer<B>, crate::train::data::Batch)> {
    use crate::train::{data::Batch, run::Trainer, Hyper};
    let mut cfg = NetConfig::preset(preset)?;
    cfg.data.image_size = image_size;
    cfg.validate()?;
    let mut hyper = Hyper::paper(preset, &cfg);
    hyper.batch = batch;
    hyper.warmup = 0;
    let trainer = Trainer::new(backend, cfg, hyper)?;
    let shape = [batch, 3, image_size, image_size];
    let data = Batch {
        hr: backend.to_f32(&backend.rand_uniform(&shape, 5, 0)?)?,
        guide: backend.to_f32(&backend.rand_uniform(&shape, 6, 0)?)?,
        len: batch,
        size: image_size,
        files: vec![0; batch],
    };
    Ok((trainer, data))
}

/// One full training step of a `preset` network at `batch` on random data at `image_size`,
/// timed ([`train_step_fixture`]). Needs a backend with backward kernels.
pub fn time_train_step<B: Backend>(
    backend: &B,
    preset: &str,
    image_size: usize,
    batch: usize,
    iters: usize,
) -> Result<Timing> {
    let (mut trainer, data) = train_step_fixture(backend, preset, image_size, batch)?;
    time_it(
        iters,
        || trainer.train_step(&data).map(|_| ()),
        || backend.synchronize(),
    )
}

/// [`time_train_step`] with the CPU per-op profile on (`backend::cpu::profile`): the timing, and
/// the table over every step run (the warm-up included) with GFLOP/s per GEMM kind, the non-GEMM
/// share, and the step's GEMM rate as a share of the forward conv's rate measured in the same run.
/// On other backends the table is empty (their ops do not report to it).
pub fn profile_train_step<B: Backend>(
    backend: &B,
    preset: &str,
    image_size: usize,
    batch: usize,
    iters: usize,
) -> Result<(Timing, String)> {
    use crate::backend::cpu::profile;
    profile::enable(true);
    let _ = profile::take();
    let t0 = Instant::now();
    let timing = time_train_step(backend, preset, image_size, batch, iters);
    let wall = t0.elapsed().as_secs_f64();
    let stats = profile::take();
    profile::enable(false);
    let timing = timing?;
    let steps = iters.max(1) + 1;
    let mut table = profile::format_table(&stats, steps);
    let profiled: f64 = stats.values().map(|s| s.self_s).sum();
    let rate = |kinds: &[&str]| {
        let (f, t) = kinds
            .iter()
            .filter_map(|k| stats.get(k))
            .fold((0.0, 0.0), |(f, t), s| (f + s.flops, t + s.self_s));
        f / t.max(1e-12) / 1e9
    };
    let fwd = rate(&["gemm conv forward"]);
    let all = rate(&profile::GEMM_KINDS);
    table.push_str(&format!(
        "step wall {:.1} ms ({:.1} % of it outside the backend ops: autograd, loss, host work); \
         GEMM rate over the step {all:.1} GFLOP/s = {:.0} % of the forward conv's {fwd:.1} GFLOP/s\n",
        1e3 * wall / steps as f64,
        100.0 * (1.0 - profiled / wall.max(1e-12)),
        100.0 * all / fwd.max(1e-12)
    ));
    Ok((timing, table))
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// End-to-end parity of a backend with the CPU reference: the same random-weight network of
/// `preset` evaluated on both at batch `batch`; returns the norm-wise relative error of the output.
pub fn network_parity<B: Backend>(other: &B, preset: &str, batch: usize, seed: u64) -> Result<f64> {
    let cpu = crate::backend::cpu::CpuF32::new();
    let mut cfg = NetConfig::preset(preset)?;
    cfg.model.dropout = 0.0;
    let net_cpu = Ncsnpp::random(&cpu, cfg.clone(), seed)?;
    let net_other = Ncsnpp::from_weights(other, cfg.clone(), &net_cpu.to_host()?, "<random init>")?;
    let size = cfg.data.image_size;
    let shape = [batch, cfg.data.num_channels, size, size];
    let x = cpu.to_f32(&cpu.rand_uniform(&shape, seed + 1, 0)?)?;
    let labels: Vec<f32> = (0..batch)
        .map(|i| 0.05 + 10.0 * i as f32 / batch as f32)
        .collect();
    let run = |be: &dyn Fn() -> Result<Vec<f32>>| be();
    let want = run(&|| {
        let g = Graph::inference(&cpu);
        let out = net_cpu.forward(
            &g,
            &g.constant(cpu.from_f32(&shape, &x)?),
            &cpu.from_f32(&[batch], &labels)?,
            Forward::default(),
        )?;
        cpu.to_f32(&out.value)
    })?;
    let got = run(&|| {
        let g = Graph::inference(other);
        let out = net_other.forward(
            &g,
            &g.constant(other.from_f32(&shape, &x)?),
            &other.from_f32(&[batch], &labels)?,
            Forward::default(),
        )?;
        other.to_f32(&out.value)
    })?;
    Ok(crate::check::rel_err(&got, &want))
}
