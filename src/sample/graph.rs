//! Predictor–corrector sampling on CUDA as a replayed CUDA graph: one sampler step (corrector
//! network evaluations and fused Langevin updates, predictor evaluation and fused update) is
//! captured once per run and replayed N times, so the host does one `cuGraphLaunch` per step.
//!
//! What changes per step lives in device memory (see [`crate::backend::cuda::graph`]): the step
//! counter, the table of per-step scalars built here by the same functions the eager sampler
//! calls ([`ScoreModel::conditioning`], [`ReverseDiffusion::coefficients`], …), and noise whose
//! Philox offsets reproduce [`NoiseStream::next`]. Graph and eager samplers therefore produce the
//! same bits (checked on a GPU by [`graph_parity`], tests/cuda_graph.rs and `srsde-fast selftest`).
//!
//! [`pc_sample_with_noise`](super::pc_sample_with_noise) uses a graph whenever the backend is CUDA,
//! the score is a [`ScoreModel`] on the same device handle and graphs are enabled
//! ([`set_cuda_graphs`], on by default); if building the graph fails it prints one note, samples
//! eagerly, and keeps sampling eagerly for the rest of the process.
//!
//! The network's `scale_by_sigma` reads σ back to the host, which a capture cannot do; for such
//! networks the graph runs a twin network without it (sharing the weights' device buffers) and
//! applies the 1/σ factor itself, rounded exactly as the network does.
use std::any::Any;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};

use super::pc::{pc_sample_eager, NoiseStream, StepInfo};
use super::{CorrectorKind, EulerMaruyama, LangevinNorm, PredictorKind, ReverseDiffusion, SamplerConfig};
use crate::autograd::Graph;
use crate::backend::cuda::graph::{CapturedGraph, NoiseLayout, SamplerTables, StepCounter, StepRow};
use crate::backend::cuda::selftest::SelftestRow;
use crate::backend::cuda::Cuda;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ncsnpp::{Forward, Ncsnpp};
use crate::model::{NetConfig, ScoreFn, ScoreModel};
use crate::sde::Sde;
use crate::tensor::Tensor;

const ON: u8 = 0;
const OFF: u8 = 1;
const FAILED: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(ON);

/// Turn the CUDA-graph sampler on or off for this process (`--cuda-graph on|off`; on by default).
pub fn set_cuda_graphs(on: bool) {
    MODE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Whether PC and fast sampling on CUDA use graphs (off when disabled, or after a capture failed;
/// see also [`crate::sample::fast::graph`]).
pub fn cuda_graphs_enabled() -> bool {
    MODE.load(Ordering::Relaxed) == ON
}

/// The first failure switches graphs off for the process, with one line saying why.
pub(crate) fn fall_back(e: &Error) {
    if MODE.swap(FAILED, Ordering::Relaxed) == ON {
        eprintln!("note: CUDA graph sampler unavailable, sampling without graphs ({e})");
    }
}

pub(crate) fn cast_ref<T: 'static, U: 'static>(t: &T) -> Option<&U> {
    (t as &dyn Any).downcast_ref::<U>()
}

/// A whole PC sampler run as one captured step replayed N times.
///
/// Built from a model, a sampler configuration, the guide `y` (which fixes batch and resolution)
/// and a noise stream; [`step`](PcGraph::step) replays one step, [`run`](PcGraph::run) several,
/// [`finish`](PcGraph::finish) checks the device status and returns the sample. The graph reads
/// the model's weights: the borrow keeps them alive and unchanged.
pub struct PcGraph<'m> {
    /// Declared first so that it is destroyed before the buffers its kernels use.
    graph: CapturedGraph,
    cuda: Cuda,
    _tables: SamplerTables,
    counter: StepCounter,
    x: Tensor<Cuda>,
    x_mean: Tensor<Cuda>,
    _y: Tensor<Cuda>,
    _twin: Option<Ncsnpp<Cuda>>,
    grid: Vec<f32>,
    done: usize,
    return_mean: bool,
    _model: PhantomData<&'m ScoreModel<Cuda>>,
}

/// What one recorded step does, and with what.
struct StepRecipe<'a> {
    cuda: &'a Cuda,
    net: &'a Ncsnpp<Cuda>,
    y: &'a Tensor<Cuda>,
    tables: &'a SamplerTables,
    predictor: PredictorKind,
    langevin_steps: usize,
    snr: f64,
    batch_norm: bool,
}

impl StepRecipe<'_> {
    /// Queue one sampler step on the stream: x (and x̄) are updated in place.
    fn record(&self, c: &StepCounter, x: &Tensor<Cuda>, x_mean: &Tensor<Cuda>) -> Result<()> {
        let cuda = self.cuda;
        cuda.sampler_begin_step(self.tables, c)?;
        let mut draw = 0u64;
        for _ in 0..self.langevin_steps {
            let h = self.network(x)?;
            cuda.langevin_update(self.tables, c, x, &h, draw, self.snr, self.batch_norm)?;
            draw += 1;
        }
        if self.predictor != PredictorKind::None {
            let h = self.network(x)?;
            cuda.predictor_update(self.tables, c, x, x_mean, &h, draw)?;
        }
        cuda.sampler_end_step(c)
    }

    /// The raw network output at x (before the score scales of the step table).
    fn network(&self, x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
        let g = Graph::inference(self.cuda);
        let input = g.constant(self.cuda.interleave_channels(x, self.y)?);
        Ok(self
            .net
            .forward(&g, &input, &self.tables.labels, Forward::default())?
            .value)
    }
}

/// Langevin steps per time step and whether a predictor runs: the draws of one step.
fn draws(cfg: &SamplerConfig) -> (usize, usize) {
    let c = if cfg.corrector == CorrectorKind::Langevin {
        cfg.corrector_steps
    } else {
        0
    };
    (c, usize::from(cfg.predictor != PredictorKind::None))
}

/// One [`StepRow`] per time step of `sde` (already rebuilt with the run's N), computed by the same
/// functions, with the same f64 → f32 roundings, as the eager sampler: the network label and
/// output scale of [`ScoreModel::conditioning`], 1/label when `sigma_in_graph` (the network's
/// `scale_by_sigma`, rounded as the network rounds it), the predictor's coefficients and the
/// Langevin α.
pub fn step_rows<B: Backend>(
    model: &ScoreModel<B>,
    sde: &Sde,
    predictor: PredictorKind,
    sigma_in_graph: bool,
) -> Vec<StepRow> {
    sde.timesteps()
        .iter()
        .map(|&t| {
            let t = t as f64;
            let (a, b, sigma) = match predictor {
                PredictorKind::ReverseDiffusion => ReverseDiffusion::coefficients(sde, t),
                PredictorKind::EulerMaruyama => EulerMaruyama::coefficients(sde, t),
                PredictorKind::None => (1.0, 0.0, 0.0),
            };
            StepRow {
                pred_a: a as f32,
                pred_b: b as f32,
                pred_sigma: sigma as f32,
                langevin_alpha: sde.langevin_alpha(t),
                ..score_row(model, t, sigma_in_graph)
            }
        })
        .collect()
}

/// The network's side of a [`StepRow`] at time t: its label and the score scales (the rest 0).
pub(crate) fn score_row<B: Backend>(model: &ScoreModel<B>, t: f64, sigma_in_graph: bool) -> StepRow {
    let (labels, out_scale) = model.conditioning(&[t]);
    let label = labels[0] as f32;
    StepRow {
        label,
        score_scale1: if sigma_in_graph { 1.0 / label } else { 1.0 },
        score_scale2: out_scale.map_or(1.0, |s| s[0] as f32),
        ..StepRow::default()
    }
}

/// Seeds and layout of the noise a run draws after its prior, for `batch` images of `per`
/// elements: what `noise` (positioned after the prior draw) would hand the eager sampler.
pub fn noise_layout(
    noise: &NoiseStream,
    cfg: &SamplerConfig,
    batch: usize,
    per: usize,
) -> (Vec<u64>, NoiseLayout) {
    let (c, p) = draws(cfg);
    let per_image = !noise.image_seeds.is_empty();
    let seeds = if per_image {
        noise.image_seeds.clone()
    } else {
        vec![noise.seed]
    };
    let layout = NoiseLayout {
        base: noise.offset,
        draws_per_step: (c + p) as u64,
        draw_size: if per_image { per } else { batch * per } as u64,
        per_image,
    };
    (seeds, layout)
}

/// A copy of `x` in a fresh buffer (the graph updates its state in place; callers' tensors are
/// never written).
pub(crate) fn fresh_copy(cuda: &Cuda, x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    let (_, c, _, _) = x.dims4("pc graph state")?;
    cuda.slice_channels(x, 0, c)
}

/// The network the graph runs: the model's own, or — when it ends with `scale_by_sigma`, which
/// reads σ back to the host — a twin without it that shares the model's weight buffers.
pub(crate) fn graph_network(net: &Ncsnpp<Cuda>) -> Result<Option<Ncsnpp<Cuda>>> {
    if !net.config.model.scale_by_sigma {
        return Ok(None);
    }
    let mut config = net.config.clone();
    config.model.scale_by_sigma = false;
    let cuda = net.backend();
    let mut twin = Ncsnpp::from_weights(cuda, config, &net.to_host()?, "<graph twin>")?;
    twin.set_weights(net.weights().clone())?;
    // The twin's own uploads are free again: give them back to the driver.
    cuda.trim_pool()?;
    Ok(Some(twin))
}

impl<'m> PcGraph<'m> {
    /// Draw the prior from `noise` (as the eager sampler does), then build the graph for `cfg`
    /// over the batch of `y`: one eager warm-up step on scratch state, then the capture.
    pub fn new(
        model: &'m ScoreModel<Cuda>,
        sde: &Sde,
        cfg: &SamplerConfig,
        y: &Tensor<Cuda>,
        mut noise: NoiseStream,
    ) -> Result<Self> {
        validate(cfg, y.shape())?;
        let cuda = model.net.backend().clone();
        let sde = sde.with_steps(cfg.steps)?;
        let x0 = crate::model::prior_start(&cuda, model, &noise.next(&cuda, y.shape())?, sde.prior_std(), y)?;
        Self::from_start(model, &sde, cfg, y, &x0, &noise)
    }

    /// The graph for `cfg` starting from `x_start` (not modified), with `noise` positioned where
    /// the first step draws; `sde` must already have the run's N (`sde.with_steps(cfg.steps)`).
    pub fn from_start(
        model: &'m ScoreModel<Cuda>,
        sde: &Sde,
        cfg: &SamplerConfig,
        y: &Tensor<Cuda>,
        x_start: &Tensor<Cuda>,
        noise: &NoiseStream,
    ) -> Result<Self> {
        validate(cfg, y.shape())?;
        if sde.n() != cfg.steps {
            return Err(Error::Config(format!(
                "pc graph: the SDE has N = {}, the sampler {} steps",
                sde.n(),
                cfg.steps
            )));
        }
        crate::tensor::same_shape("pc graph", x_start.shape(), y.shape())?;
        let cuda = model.net.backend().clone();
        let (batch, _, _, _) = y.dims4("pc graph guide")?;
        let per = y.numel() / batch;
        let twin = graph_network(&model.net)?;
        let rows = step_rows(model, sde, cfg.predictor, twin.is_some());
        let (seeds, layout) = noise_layout(noise, cfg, batch, per);
        let tables = cuda.sampler_tables(&rows, &seeds, layout, batch, per)?;
        let counter = cuda.step_counter()?;
        let x = fresh_copy(&cuda, x_start)?;
        let x_mean = fresh_copy(&cuda, x_start)?;
        let recipe = StepRecipe {
            cuda: &cuda,
            net: twin.as_ref().unwrap_or(&model.net),
            y,
            tables: &tables,
            predictor: cfg.predictor,
            langevin_steps: draws(cfg).0,
            snr: cfg.snr,
            batch_norm: cfg.langevin_norm == LangevinNorm::Batch,
        };
        // Warm-up on scratch state: loads every kernel and fills the allocator's free lists
        // outside the capture, and surfaces ordinary errors with their own messages.
        {
            let scratch = cuda.step_counter()?;
            let (xs, xms) = (fresh_copy(&cuda, x_start)?, fresh_copy(&cuda, x_start)?);
            recipe.record(&scratch, &xs, &xms)?;
            cuda.synchronize()?;
        }
        let (graph, ()) = cuda.capture(|| recipe.record(&counter, &x, &x_mean))?;
        Ok(PcGraph {
            graph,
            cuda: cuda.clone(),
            _tables: tables,
            counter,
            x,
            x_mean,
            _y: y.clone(),
            _twin: twin,
            grid: sde.timesteps(),
            done: 0,
            return_mean: cfg.denoise && cfg.predictor != PredictorKind::None,
            _model: PhantomData,
        })
    }

    /// Replay one step (queued; nothing waits).
    pub fn step(&mut self) -> Result<()> {
        if self.done >= self.grid.len() {
            return Err(Error::Other(format!(
                "pc graph: all {} steps have run",
                self.grid.len()
            )));
        }
        self.graph.launch()?;
        self.done += 1;
        Ok(())
    }

    /// Replay `n` steps.
    pub fn run(&mut self, n: usize) -> Result<()> {
        (0..n).try_for_each(|_| self.step())
    }

    /// Back to step 0 (the state x is kept): lets benchmarks replay more than N steps.
    pub fn rewind(&mut self) -> Result<()> {
        self.counter.reset(&self.cuda)?;
        self.done = 0;
        Ok(())
    }

    pub fn steps_done(&self) -> usize {
        self.done
    }
    pub fn total_steps(&self) -> usize {
        self.grid.len()
    }
    /// The time t_i of step i.
    pub fn t(&self, i: usize) -> f64 {
        self.grid.get(i).copied().unwrap_or(f32::NAN) as f64
    }
    /// Nodes (≈ kernel launches) of one replayed step.
    pub fn nodes(&self) -> usize {
        self.graph.nodes()
    }
    /// Bytes of intermediate buffers the graph keeps.
    pub fn graph_memory_bytes(&self) -> usize {
        self.graph.memory_bytes()
    }

    /// The current sample. Its buffer is updated in place by later steps: read it, don't keep it.
    pub fn x(&self) -> &Tensor<Cuda> {
        &self.x
    }
    /// x̄ of the last predictor step (x itself without a predictor); same caveat as [`PcGraph::x`].
    pub fn x_mean(&self) -> &Tensor<Cuda> {
        if self.return_mean {
            &self.x_mean
        } else {
            &self.x
        }
    }

    /// Wait for the queued steps and report what the kernels flagged (a non-finite Langevin step
    /// size — the eager sampler's error — or a step past the table).
    pub fn check(&self) -> Result<()> {
        let st = self.counter.read(&self.cuda)?;
        if let Some(i) = st.bad_langevin_step {
            return Err(Error::Other(format!(
                "Langevin step size not finite at step {i} (t = {}): the score has zero or non-finite norm",
                self.t(i as usize)
            )));
        }
        if st.overrun {
            return Err(Error::Other(
                "pc graph: a step ran past the end of its table".into(),
            ));
        }
        Ok(())
    }

    /// Check, then the sample: x̄ of the last step when denoising, else x.
    pub fn finish(self) -> Result<Tensor<Cuda>> {
        self.check()?;
        Ok(if self.return_mean {
            self.x_mean.clone()
        } else {
            self.x.clone()
        })
    }
}

fn validate(cfg: &SamplerConfig, shape: &[usize]) -> Result<()> {
    cfg.validate()?;
    if cfg.fast.is_some() {
        return Err(Error::Config(
            "pc graph: this configuration names a fast sampler, not a PC one".into(),
        ));
    }
    if shape.len() != 4 || shape.iter().product::<usize>() == 0 {
        return Err(Error::shape(
            "pc graph",
            format!("guide y must be a non-empty [N, C, H, W] batch, got {shape:?}"),
        ));
    }
    Ok(())
}

/// Replay every step of `graph`, calling `observer` after each (with the live state, viewed as
/// the caller's backend type), then finish.
fn run_graph<B: Backend>(
    graph: &mut PcGraph<'_>,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Tensor<Cuda>> {
    let total = graph.total_steps();
    for i in 0..total {
        graph.step()?;
        let (Some(x), Some(x_mean)) = (
            cast_ref::<Tensor<Cuda>, Tensor<B>>(graph.x()),
            cast_ref::<Tensor<Cuda>, Tensor<B>>(graph.x_mean()),
        ) else {
            return Err(Error::Other("pc graph: observer of another backend type".into()));
        };
        observer(StepInfo {
            step: i,
            total,
            t: graph.t(i),
            x,
            x_mean,
        })?;
    }
    graph.check()?;
    Ok(if graph.return_mean {
        graph.x_mean.clone()
    } else {
        graph.x.clone()
    })
}

/// [`pc_sample_with_noise`](super::pc_sample_with_noise) on CUDA through a graph, with no fallback:
/// errors if the graph cannot be built.
pub fn pc_sample_graph(
    model: &ScoreModel<Cuda>,
    sde: &Sde,
    y: &Tensor<Cuda>,
    cfg: &SamplerConfig,
    noise: NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, Cuda>) -> Result<()>,
) -> Result<Tensor<Cuda>> {
    let mut graph = PcGraph::new(model, sde, cfg, y, noise)?;
    run_graph(&mut graph, observer)
}

/// The graph path of `pc_sample_with_noise`: `Ok(None)` when it does not apply (not CUDA, not a
/// [`ScoreModel`] on the same device handle, graphs off, a configuration the eager path should
/// reject with its own message) or when the graph could not be built (one note, then eager for
/// the rest of the process). Errors while sampling are returned as they are.
pub(crate) fn try_pc_sample<B: Backend, S: ScoreFn<B> + 'static>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &SamplerConfig,
    noise: &NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Option<Tensor<B>>> {
    // Inputs the eager path rejects are left to it (its messages; graphs stay on).
    let seeds_fit = noise.image_seeds.is_empty() || y.shape().first() == Some(&noise.image_seeds.len());
    if !cuda_graphs_enabled() || validate(cfg, y.shape()).is_err() || !seeds_fit {
        return Ok(None);
    }
    let (Some(cuda), Some(model), Some(y)) = (
        cast_ref::<B, Cuda>(backend),
        cast_ref::<S, ScoreModel<Cuda>>(score),
        cast_ref::<Tensor<B>, Tensor<Cuda>>(y),
    ) else {
        return Ok(None);
    };
    // The captured network stage computes the paper form's score; guide-residual models
    // (input scaled by c_in, the skip term) run the eager loop on CUDA for now.
    if !cuda.same_stream(model.net.backend()) || model.guide_residual().is_some() {
        return Ok(None);
    }
    let mut graph = match PcGraph::new(model, sde, cfg, y, noise.clone()) {
        Ok(g) => g,
        Err(e) => {
            fall_back(&e);
            return Ok(None);
        }
    };
    let out: Box<dyn Any> = Box::new(run_graph(&mut graph, observer)?);
    match out.downcast::<Tensor<B>>() {
        Ok(t) => Ok(Some(*t)),
        Err(_) => Err(Error::Other("pc graph: result of another backend type".into())),
    }
}

/// How a graph-replayed run compares with the eager CUDA sampler on the same inputs.
#[derive(Clone, Debug)]
pub struct GraphParity {
    pub rel_err: f64,
    /// Every element has the same bits.
    pub identical: bool,
    /// Nodes of the captured step.
    pub nodes: usize,
}

/// One graph-against-eager comparison ([`graph_parity`]).
#[derive(Clone, Copy, Debug)]
pub struct ParityCase<'a> {
    /// Network preset (random weights), e.g. `ve-tiny`.
    pub net: &'a str,
    /// PC sampler preset, e.g. `sde-ve-cs`.
    pub sampler: &'a str,
    pub batch: usize,
    /// Per-image noise streams (`NoiseStream::per_image`) or one stream.
    pub per_image: bool,
    pub steps: usize,
    pub langevin_norm: LangevinNorm,
}

impl<'a> ParityCase<'a> {
    pub fn new(net: &'a str, sampler: &'a str, batch: usize, per_image: bool) -> Self {
        ParityCase {
            net,
            sampler,
            batch,
            per_image,
            steps: 4,
            langevin_norm: LangevinNorm::PerImage,
        }
    }
}

/// Sample a [`ParityCase`] on `cuda` once eagerly ([`pc_sample_eager`]) and once through a graph,
/// and compare the results.
pub fn graph_parity(cuda: &Cuda, case: &ParityCase<'_>, seed: u64) -> Result<GraphParity> {
    let (batch, per_image) = (case.batch, case.per_image);
    let mut config = NetConfig::preset(case.net)?;
    config.model.dropout = 0.0;
    let size = config.data.image_size;
    let centered = config.data.centered;
    let model = ScoreModel::new(Ncsnpp::random(cuda, config, seed)?);
    let mut cfg = SamplerConfig::preset(case.sampler, &model.sde)?;
    cfg.steps = case.steps;
    cfg.langevin_norm = case.langevin_norm;
    let u = cuda.rand_uniform(&[batch, 3, size, size], seed ^ 0x5eed, 0)?;
    let y = if centered { cuda.affine(&u, 2.0, -1.0)? } else { u };
    let noise = if per_image {
        NoiseStream::per_image((0..batch as u64).map(|i| seed.wrapping_add(100 + i)).collect())
    } else {
        NoiseStream::new(seed.wrapping_add(7))
    };
    let eager = pc_sample_eager(cuda, &model, &model.sde, &y, &cfg, noise.clone(), &mut |_| Ok(()))?;
    let mut graph = PcGraph::new(&model, &model.sde, &cfg, &y, noise)?;
    let nodes = graph.nodes();
    let replayed = run_graph::<Cuda>(&mut graph, &mut |_| Ok(()))?;
    let (a, b) = (cuda.to_f32(&replayed)?, cuda.to_f32(&eager)?);
    Ok(GraphParity {
        rel_err: crate::check::rel_err(&a, &b),
        identical: a.len() == b.len() && a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
        nodes,
    })
}

/// Selftest rows for `srsde-fast selftest`: graph-replayed PC sampling against the eager CUDA
/// sampler (tiny random networks, 4 steps) for sde-ve, sde-ve-cs (Langevin, per-image noise) and
/// sde-vp at batch 1 and 3; the bound is 1e-6 (the design target is bitwise equality). Then the
/// fast samplers' graph against their eager path
/// ([`crate::sample::fast::graph::fast_graph_selftest`]).
pub fn graph_selftest(cuda: &Cuda, seed: u64) -> Result<Vec<SelftestRow>> {
    let cases = [
        ParityCase::new("ve-tiny", "sde-ve", 1, false),
        ParityCase::new("ve-tiny", "sde-ve-cs", 1, true),
        ParityCase::new("ve-tiny", "sde-ve-cs", 3, true),
        ParityCase::new("vp-tiny", "sde-vp", 3, false),
    ];
    let bound = 1e-6;
    let mut rows: Vec<SelftestRow> = cases
        .iter()
        .map(|case| {
            let (net, sampler, batch) = (case.net, case.sampler, case.batch);
            let r = graph_parity(cuda, case, seed);
            let (rel_err, error, shape) = match &r {
                Ok(p) => (
                    p.rel_err,
                    None,
                    format!(
                        "{net} b{batch} 4 steps, {} nodes{}",
                        p.nodes,
                        if p.identical { ", bitwise" } else { "" }
                    ),
                ),
                Err(e) => (f64::INFINITY, Some(e.to_string()), format!("{net} b{batch}")),
            };
            SelftestRow {
                op: format!("pc graph {sampler}"),
                shape,
                precision: cuda.precision(),
                rel_err,
                bound,
                pass: error.is_none() && rel_err <= bound,
                error,
            }
        })
        .collect();
    rows.extend(crate::sample::fast::graph::fast_graph_selftest(cuda, seed));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;

    /// The noise layout reproduces `NoiseStream::next` draw for draw: two steps of a Langevin +
    /// predictor sampler, per-image and one stream.
    #[test]
    fn noise_layout_matches_the_eager_draws() {
        let cpu = CpuF32::new();
        let shape = [2usize, 3, 4, 5];
        let (batch, per) = (2usize, 60usize);
        let cfg = SamplerConfig::preset("sde-ve-cs", &Sde::paper_ve()).unwrap();
        for mut noise in [NoiseStream::per_image(vec![11, 12]), NoiseStream::new(5)] {
            noise.next(&cpu, &shape).unwrap(); // the prior
            let (seeds, layout) = noise_layout(&noise, &cfg, batch, per);
            assert_eq!(layout.draws_per_step, 2);
            for step in 0..2u64 {
                for draw in 0..2u64 {
                    let z = cpu.to_f32(&noise.next(&cpu, &shape).unwrap()).unwrap();
                    for n in 0..batch {
                        for j in 0..per {
                            let (slot, index) = layout.element(step, draw, n as u64, j as u64, per as u64);
                            let want = crate::rng::normal(seeds[slot], index);
                            assert_eq!(
                                z[n * per + j].to_bits(),
                                want.to_bits(),
                                "step {step} draw {draw}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The step table holds what the eager sampler computes at each t: labels and scales from
    /// the model's conditioning, the predictor's coefficients, the Langevin α.
    #[test]
    fn step_rows_match_the_eager_scalars() {
        let cpu = CpuF32::new();
        let mut config = NetConfig::preset("ve-tiny").unwrap();
        config.model.dropout = 0.0;
        let ve = ScoreModel::new(Ncsnpp::random(&cpu, config, 1).unwrap());
        let sde = ve.sde.with_steps(5).unwrap();
        let rows = step_rows(&ve, &sde, PredictorKind::ReverseDiffusion, true);
        assert_eq!(rows.len(), 5);
        for (r, &t) in rows.iter().zip(&sde.timesteps()) {
            let t = t as f64;
            let sigma = ve.conditioning(&[t]).0[0] as f32;
            assert_eq!(r.label, sigma);
            assert_eq!(r.score_scale1, 1.0 / sigma);
            assert_eq!(r.score_scale2, 1.0);
            let (a, b, s) = ReverseDiffusion::coefficients(&sde, t);
            assert_eq!((r.pred_a, r.pred_b, r.pred_sigma), (a as f32, b as f32, s as f32));
            assert_eq!(r.langevin_alpha, 1.0);
        }
        let mut config = NetConfig::preset("vp-tiny").unwrap();
        config.model.dropout = 0.0;
        let vp = ScoreModel::new(Ncsnpp::random(&cpu, config, 1).unwrap());
        let sde = vp.sde.with_steps(4).unwrap();
        let rows = step_rows(&vp, &sde, PredictorKind::EulerMaruyama, false);
        for (r, &t) in rows.iter().zip(&sde.timesteps()) {
            let t = t as f64;
            assert_eq!(r.label, (999.0 * t) as f32);
            assert_eq!(r.score_scale1, 1.0);
            assert_eq!(r.score_scale2, (-1.0 / sde.marginal_std(t)) as f32);
            let (a, b, s) = EulerMaruyama::coefficients(&sde, t);
            assert_eq!((r.pred_a, r.pred_b, r.pred_sigma), (a as f32, b as f32, s as f32));
            assert_eq!(r.langevin_alpha, sde.langevin_alpha(t));
        }
    }

    #[test]
    fn graphs_can_be_switched_off_and_on() {
        set_cuda_graphs(false);
        assert!(!cuda_graphs_enabled());
        set_cuda_graphs(true);
        assert!(cuda_graphs_enabled());
    }
}
