//! The fast samplers on CUDA as one replayed CUDA graph: every network evaluation of a run is a
//! stage of the same shape — Heun churn and the network input (`fast_prepare`), the network, the
//! denoiser and the solver's update (`fast_update`) — so one stage is captured once and replayed
//! once per evaluation, with one `cuGraphLaunch` instead of the network's ~575 launches.
//!
//! What differs between stages (σ̂, the network label and score scales, the DPM weights and
//! history buffers, Heun's stage kind, churn stds and noise draws) is the stage table of
//! [`super::plan`], uploaded once and indexed on the device by the step counter, as the PC graph
//! does ([`crate::sample::graph`]). The plan holds the eager solvers' own scalars and the kernels
//! repeat their launches' arithmetic, so graph and eager fast samplers give the same bits
//! (checked on a GPU by [`fast_graph_parity`], `srsde-fast selftest` and tests/cuda_graph.rs).
//!
//! [`super::fast_sample_from`] uses a graph whenever the PC sampler would (CUDA, a
//! [`ScoreModel`] on the same device handle, graphs on); if building it fails it prints one note
//! and samples eagerly for the rest of the process.
use std::any::Any;
use std::marker::PhantomData;

use super::plan::{plan, Stage, Update};
use super::{FastConfig, FastSolver};
use crate::autograd::Graph;
use crate::backend::cuda::graph::{
    CapturedGraph, FastRow, FastTable, NoiseLayout, SamplerTables, StepCounter,
};
use crate::backend::cuda::selftest::SelftestRow;
use crate::backend::cuda::Cuda;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ncsnpp::{Forward, Ncsnpp};
use crate::model::{NetConfig, ScoreFn, ScoreModel};
use crate::sample::graph::{cast_ref, cuda_graphs_enabled, fall_back, fresh_copy, graph_network, score_row};
use crate::sample::{NoiseStream, StepInfo};
use crate::sde::Sde;
use crate::tensor::Tensor;

/// A fast sampler run as one captured stage replayed once per network evaluation.
///
/// Built from a model, the run's settings, the guide `y` (batch and resolution), the start x̂_T
/// and the noise stream positioned after the prior; [`stage`](FastGraph::stage) replays one
/// evaluation, [`finish`](FastGraph::finish) checks the device status and returns the sample
/// (the last denoiser output). The graph reads the model's weights: the borrow keeps them alive.
pub struct FastGraph<'m> {
    /// Declared first so that it is destroyed before the buffers its kernels use.
    graph: CapturedGraph,
    cuda: Cuda,
    _tables: SamplerTables,
    _fast: FastTable,
    counter: StepCounter,
    xh: Tensor<Cuda>,
    /// Kept alive for the graph, which reads and writes it.
    _point: Tensor<Cuda>,
    xnet: Tensor<Cuda>,
    /// The denoiser buffers (the DPM history rotates through them).
    d: Vec<Tensor<Cuda>>,
    _y: Tensor<Cuda>,
    _twin: Option<Ncsnpp<Cuda>>,
    stages: Vec<Stage>,
    done: usize,
    _model: PhantomData<&'m ScoreModel<Cuda>>,
}

/// The device state one recorded stage works on.
struct State<'a> {
    xh: &'a Tensor<Cuda>,
    point: &'a Tensor<Cuda>,
    xnet: &'a Tensor<Cuda>,
    d: [&'a Tensor<Cuda>; 3],
}

/// What one recorded stage does, and with what.
struct StageRecipe<'a> {
    cuda: &'a Cuda,
    net: &'a Ncsnpp<Cuda>,
    y: &'a Tensor<Cuda>,
    tables: &'a SamplerTables,
    fast: &'a FastTable,
}

impl StageRecipe<'_> {
    /// Queue one stage on the stream (the state is updated in place).
    fn record(&self, c: &StepCounter, s: &State<'_>) -> Result<()> {
        let cuda = self.cuda;
        cuda.sampler_begin_step(self.tables, c)?;
        cuda.fast_prepare(self.tables, self.fast, c, s.xh, s.point, s.xnet)?;
        let g = Graph::inference(cuda);
        let input = g.constant(cuda.interleave_channels(s.xnet, self.y)?);
        let h = self
            .net
            .forward(&g, &input, &self.tables.labels, Forward::default())?
            .value;
        cuda.fast_update(self.tables, self.fast, c, s.xh, s.point, &h, s.d)?;
        cuda.sampler_end_step(c)
    }
}

/// The kernel row of a plan stage: the eager sampler's f64 scalars rounded to f32 as its launches
/// round them (`as f32`), 1 − r computed in f64 as the eager Euler step does.
fn fast_row(st: &Stage) -> FastRow {
    let mut r = FastRow {
        in_scale: st.alpha as f32,
        in_shift: 0.0,
        d_coef: st.score_coef() as f32,
        d_slot: st.slot as i32,
        flags: if st.alpha == 1.0 { 0 } else { FastRow::IN_AFFINE },
        ..FastRow::default()
    };
    if let Some((std, draw)) = st.pre_noise {
        r.flags |= FastRow::PRE_NOISE;
        r.pre_std = std as f32;
        r.pre_draw = draw;
    }
    match &st.update {
        Update::Final => r.kind = FastRow::FINAL,
        Update::Dpm { decay, terms, noise } => {
            r.kind = FastRow::DPM;
            r.c0 = *decay as f32;
            r.n_terms = terms.len() as i32;
            for (q, &(w, slot)) in terms.iter().enumerate() {
                r.w[q] = w as f32;
                r.slot[q] = slot as i32;
            }
            if let Some((std, draw)) = noise {
                r.flags |= FastRow::POST_NOISE;
                r.post_std = *std as f32;
                r.post_draw = *draw;
            }
        }
        Update::Euler { r: ratio, commit } => {
            r.kind = FastRow::EULER;
            r.c0 = *ratio as f32;
            r.c1 = (1.0 - ratio) as f32;
            if *commit {
                r.flags |= FastRow::COMMIT;
            }
        }
        Update::Heun { c_half, c_d } => {
            r.kind = FastRow::HEUN;
            r.c0 = *c_half as f32;
            r.c1 = *c_d as f32;
        }
    }
    r
}

/// Seeds and layout of the noise after the prior, one draw per "step" (the table numbers the
/// draws): what `noise` would hand the eager sampler draw by draw.
fn noise_layout(noise: &NoiseStream, batch: usize, per: usize) -> (Vec<u64>, NoiseLayout) {
    let per_image = !noise.image_seeds.is_empty();
    let seeds = if per_image {
        noise.image_seeds.clone()
    } else {
        vec![noise.seed]
    };
    let layout = NoiseLayout {
        base: noise.offset,
        draws_per_step: 1,
        draw_size: if per_image { per } else { batch * per } as u64,
        per_image,
    };
    (seeds, layout)
}

fn validate(cfg: &FastConfig, steps: usize, shape: &[usize], noise: &NoiseStream) -> Result<()> {
    cfg.validate(steps)?;
    if shape.len() != 4 || shape.iter().product::<usize>() == 0 {
        return Err(Error::shape(
            "fast graph",
            format!("guide y must be a non-empty [N, C, H, W] batch, got {shape:?}"),
        ));
    }
    if !noise.image_seeds.is_empty() && noise.image_seeds.len() != shape[0] {
        return Err(Error::shape(
            "fast graph",
            format!(
                "{} per-image seeds for a batch of {}",
                noise.image_seeds.len(),
                shape[0]
            ),
        ));
    }
    Ok(())
}

impl<'m> FastGraph<'m> {
    /// The graph for `steps` evaluations of `cfg` on `sde`, starting from x̂_T = `xh_start` (x_T/α(1),
    /// not modified) with `noise` positioned after the prior: one eager warm-up stage on scratch
    /// state, then the capture.
    pub fn new(
        model: &'m ScoreModel<Cuda>,
        sde: &Sde,
        cfg: &FastConfig,
        steps: usize,
        y: &Tensor<Cuda>,
        xh_start: &Tensor<Cuda>,
        noise: &NoiseStream,
    ) -> Result<Self> {
        validate(cfg, steps, y.shape(), noise)?;
        crate::tensor::same_shape("fast graph", xh_start.shape(), y.shape())?;
        let cuda = model.net.backend().clone();
        let plan = plan(sde, cfg, steps)?;
        let (batch, _, _, _) = y.dims4("fast graph guide")?;
        let per = y.numel() / batch;
        let twin = graph_network(&model.net)?;
        let score_rows: Vec<_> = plan
            .stages
            .iter()
            .map(|st| score_row(model, st.t, twin.is_some()))
            .collect();
        let (seeds, layout) = noise_layout(noise, batch, per);
        let tables = cuda.sampler_tables(&score_rows, &seeds, layout, batch, per)?;
        let rows: Vec<FastRow> = plan.stages.iter().map(fast_row).collect();
        let fast = cuda.fast_table(&tables, &rows)?;
        let counter = cuda.step_counter()?;
        let fresh =
            |n: usize| -> Result<Vec<Tensor<Cuda>>> { (0..n).map(|_| fresh_copy(&cuda, xh_start)).collect() };
        let (xh, point, xnet) = {
            let mut v = fresh(3)?;
            (v.remove(0), v.remove(0), v.remove(0))
        };
        let d = fresh(plan.slots)?;
        let recipe = StageRecipe {
            cuda: &cuda,
            net: twin.as_ref().unwrap_or(&model.net),
            y,
            tables: &tables,
            fast: &fast,
        };
        // The kernels take three denoiser buffers; the ones a plan does not use alias slot 0.
        let slots = |d: &[Tensor<Cuda>]| -> [Tensor<Cuda>; 3] {
            let pick = |k: usize| d.get(k).unwrap_or(&d[0]).clone();
            [pick(0), pick(1), pick(2)]
        };
        // Warm-up on scratch state (row 0): loads every kernel and fills the allocator's free
        // lists outside the capture, and surfaces ordinary errors with their own messages.
        {
            let scratch = cuda.step_counter()?;
            let s = fresh(3 + plan.slots)?;
            let sd = slots(&s[3..]);
            let state = State {
                xh: &s[0],
                point: &s[1],
                xnet: &s[2],
                d: [&sd[0], &sd[1], &sd[2]],
            };
            recipe.record(&scratch, &state)?;
            cuda.synchronize()?;
        }
        let dd = slots(&d);
        let state = State {
            xh: &xh,
            point: &point,
            xnet: &xnet,
            d: [&dd[0], &dd[1], &dd[2]],
        };
        let (graph, ()) = cuda.capture(|| recipe.record(&counter, &state))?;
        Ok(FastGraph {
            graph,
            cuda: cuda.clone(),
            _tables: tables,
            _fast: fast,
            counter,
            xh,
            _point: point,
            xnet,
            d,
            _y: y.clone(),
            _twin: twin,
            stages: plan.stages,
            done: 0,
            _model: PhantomData,
        })
    }

    /// Replay one stage (one network evaluation; queued, nothing waits).
    pub fn stage(&mut self) -> Result<()> {
        if self.done >= self.stages.len() {
            return Err(Error::Other(format!(
                "fast graph: all {} evaluations have run",
                self.stages.len()
            )));
        }
        self.graph.launch()?;
        self.done += 1;
        Ok(())
    }

    /// Back to the first stage (the state is kept): lets benchmarks replay more evaluations.
    pub fn rewind(&mut self) -> Result<()> {
        self.counter.reset(&self.cuda)?;
        self.done = 0;
        Ok(())
    }

    pub fn stages_done(&self) -> usize {
        self.done
    }
    pub fn total_stages(&self) -> usize {
        self.stages.len()
    }
    /// Nodes (≈ kernel launches) of one replayed stage.
    pub fn nodes(&self) -> usize {
        self.graph.nodes()
    }
    /// The network input of the last replayed stage (α·point). Updated in place: read, don't keep.
    pub fn x(&self) -> &Tensor<Cuda> {
        &self.xnet
    }
    /// The solver state x̂ (Heun: before the second stage of a step). Same caveat as [`FastGraph::x`].
    pub fn x_hat(&self) -> &Tensor<Cuda> {
        &self.xh
    }
    /// The denoiser output of the last replayed stage (of the first stage before any replay).
    pub fn denoised(&self) -> &Tensor<Cuda> {
        let slot = self.stages[self.done.saturating_sub(1)].slot;
        &self.d[slot]
    }

    /// Wait for the queued stages and report a stage past the end of the table.
    pub fn check(&self) -> Result<()> {
        if self.counter.read(&self.cuda)?.overrun {
            return Err(Error::Other(
                "fast graph: a stage ran past the end of its table".into(),
            ));
        }
        Ok(())
    }

    /// Check, then the sample: the last stage's denoiser output.
    pub fn finish(self) -> Result<Tensor<Cuda>> {
        self.check()?;
        Ok(self.denoised().clone())
    }

    /// Replay every remaining stage, calling `observer` after each as the eager sampler does (the
    /// network input as `x`, D as `x_mean`, viewed as the caller's backend type), then finish.
    fn run<B: Backend>(
        mut self,
        observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
    ) -> Result<Tensor<Cuda>> {
        let total = self.stages.len();
        while self.done < total {
            self.stage()?;
            let (Some(x), Some(d)) = (
                cast_ref::<Tensor<Cuda>, Tensor<B>>(self.x()),
                cast_ref::<Tensor<Cuda>, Tensor<B>>(self.denoised()),
            ) else {
                return Err(Error::Other(
                    "fast graph: observer of another backend type".into(),
                ));
            };
            observer(StepInfo {
                step: self.done - 1,
                total,
                t: self.stages[self.done - 1].t,
                x,
                x_mean: d,
            })?;
        }
        self.finish()
    }
}

/// The graph path of [`super::fast_sample_from`], at x̂_T = `xh`: `Ok(None)` when it does not apply
/// (not CUDA, not a [`ScoreModel`] on the same device handle, graphs off, inputs the eager path
/// rejects with its own message) or when the graph could not be built (one note, then eager for
/// the rest of the process). On success `noise` is advanced past the run's draws, as the eager
/// sampler leaves it. Errors while sampling are returned as they are.
#[allow(clippy::too_many_arguments)]
pub(crate) fn try_fast_sample<B: Backend, S: ScoreFn<B> + 'static>(
    backend: &B,
    score: &S,
    sde: &Sde,
    y: &Tensor<B>,
    cfg: &FastConfig,
    steps: usize,
    xh: &Tensor<B>,
    noise: &mut NoiseStream,
    observer: &mut dyn FnMut(StepInfo<'_, B>) -> Result<()>,
) -> Result<Option<Tensor<B>>> {
    if !cuda_graphs_enabled() || validate(cfg, steps, y.shape(), noise).is_err() {
        return Ok(None);
    }
    let (Some(cuda), Some(model), Some(y), Some(xh)) = (
        cast_ref::<B, Cuda>(backend),
        cast_ref::<S, ScoreModel<Cuda>>(score),
        cast_ref::<Tensor<B>, Tensor<Cuda>>(y),
        cast_ref::<Tensor<B>, Tensor<Cuda>>(xh),
    ) else {
        return Ok(None);
    };
    // The captured network stage computes the paper form's score; guide-residual models
    // (input scaled by c_in, the skip term) run the eager loop on CUDA for now.
    if !cuda.same_stream(model.net.backend()) || model.guide_residual().is_some() {
        return Ok(None);
    }
    let graph = match FastGraph::new(model, sde, cfg, steps, y, xh, noise) {
        Ok(g) => g,
        Err(e) => {
            fall_back(&e);
            return Ok(None);
        }
    };
    let draws = plan(sde, cfg, steps)?.draws;
    let size = if noise.image_seeds.is_empty() {
        y.numel()
    } else {
        y.numel() / y.shape()[0]
    };
    let out: Box<dyn Any> = Box::new(graph.run(observer)?);
    noise.offset += draws * size as u64;
    match out.downcast::<Tensor<B>>() {
        Ok(t) => Ok(Some(*t)),
        Err(_) => Err(Error::Other("fast graph: result of another backend type".into())),
    }
}

/// One fast-graph-against-eager comparison ([`fast_graph_parity`]).
#[derive(Clone, Copy, Debug)]
pub struct FastParityCase<'a> {
    /// Network preset (random weights), e.g. `ve-tiny`.
    pub net: &'a str,
    pub solver: FastSolver,
    pub steps: usize,
    pub churn: f64,
    pub batch: usize,
    /// Per-image noise streams (`NoiseStream::per_image`) or one stream.
    pub per_image: bool,
}

/// How a graph-replayed fast run compares with the eager CUDA fast sampler on the same inputs.
#[derive(Clone, Debug)]
pub struct FastParity {
    pub rel_err: f64,
    /// Every element has the same bits.
    pub identical: bool,
    /// Nodes of the captured stage.
    pub nodes: usize,
    /// The observer saw every evaluation with the eager sampler's (step, t), in order.
    pub steps_match: bool,
}

/// Sample a [`FastParityCase`] on `cuda` once eagerly ([`super::fast_sample_eager`]) and once
/// through a [`FastGraph`], and compare the results (and the observers' steps and times).
pub fn fast_graph_parity(cuda: &Cuda, case: &FastParityCase<'_>, seed: u64) -> Result<FastParity> {
    let batch = case.batch;
    let mut config = NetConfig::preset(case.net)?;
    config.model.dropout = 0.0;
    let size = config.data.image_size;
    let centered = config.data.centered;
    let model = ScoreModel::new(Ncsnpp::random(cuda, config, seed)?);
    let cfg = FastConfig {
        churn: case.churn,
        ..FastConfig::new(case.solver)
    };
    let u = cuda.rand_uniform(&[batch, 3, size, size], seed ^ 0x5eed, 0)?;
    let y = if centered { cuda.affine(&u, 2.0, -1.0)? } else { u };
    let mut noise = if case.per_image {
        NoiseStream::per_image((0..batch as u64).map(|i| seed.wrapping_add(100 + i)).collect())
    } else {
        NoiseStream::new(seed.wrapping_add(7))
    };
    let sde = model.sde.clone();
    let mut eager_steps = Vec::new();
    let eager = super::fast_sample_eager(
        cuda,
        &model,
        &sde,
        &y,
        &cfg,
        case.steps,
        noise.clone(),
        &mut |i| {
            eager_steps.push((i.step, i.t));
            Ok(())
        },
    )?;
    // The graph path from the same start: the prior as fast_sample draws it, then x̂_T.
    let x_t = crate::model::prior_start(cuda, &model, &noise.next(cuda, y.shape())?, sde.prior_std(), &y)?;
    let xh = cuda.affine(&x_t, 1.0 / super::schedule::alpha(&sde, 1.0), 0.0)?;
    let graph = FastGraph::new(&model, &sde, &cfg, case.steps, &y, &xh, &noise)?;
    let nodes = graph.nodes();
    let mut graph_steps = Vec::new();
    let replayed = graph.run::<Cuda>(&mut |i| {
        graph_steps.push((i.step, i.t));
        Ok(())
    })?;
    let (a, b) = (cuda.to_f32(&replayed)?, cuda.to_f32(&eager)?);
    Ok(FastParity {
        rel_err: crate::check::rel_err(&a, &b),
        identical: a.len() == b.len() && a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
        nodes,
        steps_match: graph_steps == eager_steps,
    })
}

/// The selftest's fast cases: dpm2, dpm3 and ode-heun with and without churn, batch 1 and 3,
/// per-image and one noise stream, on ve-tiny and vp-tiny (5 or 6 evaluations: every DPM history
/// length, Heun with and without an Euler-only first step).
pub fn fast_parity_cases() -> Vec<FastParityCase<'static>> {
    let case = |net, solver, steps, churn, batch, per_image| FastParityCase {
        net,
        solver,
        steps,
        churn,
        batch,
        per_image,
    };
    let (dpm2, dpm3, heun) = (
        FastSolver::Dpm { order: 2 },
        FastSolver::Dpm { order: 3 },
        FastSolver::Heun,
    );
    vec![
        case("ve-tiny", dpm2, 5, 0.0, 1, false),
        case("ve-tiny", dpm2, 5, 0.5, 3, true),
        case("ve-tiny", dpm3, 6, 0.0, 3, true),
        case("ve-tiny", dpm3, 6, 0.3, 1, false),
        case("ve-tiny", heun, 5, 0.0, 1, false),
        case("ve-tiny", heun, 6, 0.5, 3, true),
        case("vp-tiny", dpm2, 5, 0.5, 3, false),
        case("vp-tiny", dpm3, 6, 0.0, 1, true),
        case("vp-tiny", heun, 6, 0.4, 1, false),
        case("vp-tiny", heun, 5, 0.0, 3, true),
    ]
}

fn solver_name(s: FastSolver) -> String {
    match s {
        FastSolver::Heun => "ode-heun".into(),
        FastSolver::Dpm { order } => format!("dpm{order}"),
    }
}

/// Selftest rows: graph-replayed fast sampling against the eager CUDA fast sampler on
/// [`fast_parity_cases`]; the bound is 1e-6 (the design target is bitwise equality), and the
/// observer must see the eager sampler's steps.
pub fn fast_graph_selftest(cuda: &Cuda, seed: u64) -> Vec<SelftestRow> {
    let bound = 1e-6;
    fast_parity_cases()
        .iter()
        .map(|case| {
            let r = fast_graph_parity(cuda, case, seed);
            let what = format!(
                "{} b{} {} NFE churn {}{}",
                case.net,
                case.batch,
                case.steps,
                case.churn,
                if case.per_image { " per-image" } else { "" }
            );
            let (rel_err, error, shape) = match &r {
                Ok(p) => (
                    p.rel_err,
                    (!p.steps_match)
                        .then(|| "the observer saw other steps than the eager sampler's".to_string()),
                    format!(
                        "{what}, {} nodes{}",
                        p.nodes,
                        if p.identical { ", bitwise" } else { "" }
                    ),
                ),
                Err(e) => (f64::INFINITY, Some(e.to_string()), what),
            };
            SelftestRow {
                op: format!("fast graph {}", solver_name(case.solver)),
                shape,
                precision: cuda.precision(),
                rel_err,
                bound,
                pass: error.is_none() && rel_err <= bound,
                error,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;

    /// The kernel rows carry the plan's scalars as the eager launches round them, flags and
    /// slots included.
    #[test]
    fn fast_rows_carry_the_plan() {
        let vp = Sde::paper_vp();
        let cfg = FastConfig {
            churn: 0.5,
            ..FastConfig::new(FastSolver::Dpm { order: 3 })
        };
        let p = plan(&vp, &cfg, 5).unwrap();
        let rows: Vec<FastRow> = p.stages.iter().map(fast_row).collect();
        for (r, st) in rows.iter().zip(&p.stages) {
            assert_eq!(r.in_scale, st.alpha as f32);
            assert_eq!(
                r.flags & FastRow::IN_AFFINE,
                FastRow::IN_AFFINE,
                "VP scales the input"
            );
            assert_eq!(r.d_coef, (st.sigma * st.sigma * st.alpha) as f32);
            assert_eq!(r.d_slot as usize, st.slot);
        }
        assert_eq!(rows[2].n_terms, 3);
        assert_eq!(rows[2].slot, [2, 1, 0]);
        assert_eq!(
            (rows[3].post_draw, rows[3].flags & FastRow::POST_NOISE),
            (3, FastRow::POST_NOISE)
        );
        assert_eq!(rows[4].kind, FastRow::FINAL);

        let heun = plan(
            &Sde::paper_ve(),
            &FastConfig {
                churn: 0.5,
                ..FastConfig::new(FastSolver::Heun)
            },
            6,
        )
        .unwrap();
        let rows: Vec<FastRow> = heun.stages.iter().map(fast_row).collect();
        let kinds: Vec<i32> = rows.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                FastRow::EULER,
                FastRow::EULER,
                FastRow::HEUN,
                FastRow::EULER,
                FastRow::HEUN,
                FastRow::FINAL
            ]
        );
        assert_eq!(
            rows[0].flags,
            FastRow::COMMIT,
            "VE: no affine; σ̂ clamped at the top: no churn"
        );
        assert_eq!(rows[1].flags, FastRow::PRE_NOISE);
        assert_eq!((rows[3].pre_draw, rows[1].pre_draw), (1, 0));
        if let Update::Euler { r, .. } = heun.stages[1].update {
            assert_eq!((rows[1].c0, rows[1].c1), (r as f32, (1.0 - r) as f32));
        }
    }

    /// The layout's elements are what NoiseStream::next draws, draw by draw.
    #[test]
    fn noise_layout_matches_the_eager_draws() {
        let cpu = CpuF32::new();
        let shape = [2usize, 3, 4, 5];
        let per = 60usize;
        for mut noise in [NoiseStream::per_image(vec![3, 4]), NoiseStream::new(9)] {
            noise.next(&cpu, &shape).unwrap(); // the prior
            let (seeds, layout) = noise_layout(&noise, 2, per);
            for draw in 0..3u64 {
                let z = cpu.to_f32(&noise.next(&cpu, &shape).unwrap()).unwrap();
                for (k, zk) in z.iter().enumerate() {
                    let (slot, index) =
                        layout.element(draw, 0, (k / per) as u64, (k % per) as u64, per as u64);
                    assert_eq!(zk.to_bits(), crate::rng::normal(seeds[slot], index).to_bits());
                }
            }
        }
    }
}
