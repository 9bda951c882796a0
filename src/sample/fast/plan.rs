//! A fast sampler run written out as a list of stages, one per network evaluation, with every
//! scalar the eager solvers compute (σ̂, t, α, the solver weights, the churn noise std) and which
//! noise draw and which denoiser buffer each stage uses.
//!
//! The CUDA-graph sampler ([`super::graph`]) uploads this list as a device table and replays one
//! captured stage per evaluation; the eager solvers in [`super`] compute the same numbers inline.
//! [`plan`] mirrors their code expression by expression (the test below runs a plan with backend
//! ops and checks it against the eager sampler bit for bit).
//!
//! The state a plan acts on: x̂ (the solver's state), the point the network is evaluated at (x̂,
//! or Heun's Euler point), and `slots` denoiser buffers D (the DPM history rotates through them).
use super::{expint, schedule, FastConfig, FastSolver};
use crate::error::Result;
use crate::sde::Sde;

/// What a stage does after its evaluation D = D(point, σ̂) (stored in its slot).
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The last stage: D is the result.
    Final,
    /// DPM-Solver++ step: x̂' = decay·x̂ + Σ_j w_j·D_{slot_j} (`terms[0]` is this stage's D, the
    /// rest the history, newest first), then + std·z of draw `noise` when churning; point = x̂'.
    Dpm {
        decay: f64,
        terms: Vec<(f64, usize)>,
        noise: Option<(f64, u64)>,
    },
    /// Heun's first stage: point = r·x̂ + (1 − r)·D (the Euler point); with `commit` (an Euler-only
    /// step) x̂ = point as well.
    Euler { r: f64, commit: bool },
    /// Heun's second stage at the Euler point: x̂' = (½x̂ + c_half·point) + c_d·D; point = x̂'.
    Heun { c_half: f64, c_d: f64 },
}

/// One network evaluation and the update that follows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// σ̂ of the evaluation.
    pub sigma: f64,
    /// t(σ̂), the network's time.
    pub t: f64,
    /// α(t): the network sees α·point.
    pub alpha: f64,
    /// Heun churn before the evaluation: x̂ (= point) += std·z of this draw.
    pub pre_noise: Option<(f64, u64)>,
    /// The denoiser buffer D is written to.
    pub slot: usize,
    pub update: Update,
}

/// A whole run: `stages.len()` evaluations, `slots` denoiser buffers, `draws` noise draws after
/// the prior (numbered 0.. in the order the eager sampler makes them).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub stages: Vec<Stage>,
    pub slots: usize,
    pub draws: u64,
}

impl Stage {
    fn new(sde: &Sde, sigma: f64, slot: usize, update: Update) -> Stage {
        let t = schedule::time_of_sigma(sde, sigma);
        Stage {
            sigma,
            t,
            alpha: schedule::alpha(sde, t),
            pre_noise: None,
            slot,
            update,
        }
    }

    /// The factor of the score in D = point + σ̂²·α·s (as the eager denoiser computes it).
    pub fn score_coef(&self) -> f64 {
        self.sigma * self.sigma * self.alpha
    }
}

/// The stages of `cfg` with `steps` evaluations on `sde` (the same schedule and scalars as the
/// eager [`super::fast_sample_from`]).
pub fn plan(sde: &Sde, cfg: &FastConfig, steps: usize) -> Result<Plan> {
    cfg.validate(steps)?;
    match cfg.solver {
        FastSolver::Heun => heun(sde, cfg, steps),
        FastSolver::Dpm { order } => dpm(sde, cfg, order, steps),
    }
}

fn heun(sde: &Sde, cfg: &FastConfig, steps: usize) -> Result<Plan> {
    let (levels, euler_first) = match steps % 2 {
        1 => (steps.div_ceil(2), false),
        _ => (steps / 2 + 1, true),
    };
    let grid = schedule::sigma_grid(sde, levels, cfg.rho)?;
    let mut stages = Vec::with_capacity(steps);
    let mut draws = 0u64;
    for i in 0..levels - 1 {
        let (s_cur, s_next) = (grid[i], grid[i + 1]);
        let s_hat = if cfg.churn > 0.0 {
            (s_cur * (cfg.churn * (s_cur / s_next).ln()).exp()).min(grid[0])
        } else {
            s_cur
        };
        let pre_noise = (s_hat > s_cur).then(|| {
            draws += 1;
            ((s_hat * s_hat - s_cur * s_cur).sqrt(), draws - 1)
        });
        let r = s_next / s_hat;
        let second = !(euler_first && i == 0);
        let mut first = Stage::new(sde, s_hat, 0, Update::Euler { r, commit: !second });
        first.pre_noise = pre_noise;
        stages.push(first);
        if second {
            let update = Update::Heun {
                c_half: 1.0 - s_hat / (2.0 * s_next),
                c_d: -(s_next - s_hat) / (2.0 * s_next),
            };
            stages.push(Stage::new(sde, s_next, 0, update));
        }
    }
    stages.push(Stage::new(sde, grid[levels - 1], 0, Update::Final));
    Ok(Plan {
        stages,
        slots: 1,
        draws,
    })
}

fn dpm(sde: &Sde, cfg: &FastConfig, order: usize, steps: usize) -> Result<Plan> {
    let grid = schedule::sigma_grid(sde, steps, cfg.rho)?;
    let kappa = 1.0 + cfg.churn;
    let mut stages = Vec::with_capacity(steps);
    let mut draws = 0u64;
    // (λ_j, slot of D_j) of the latest levels, newest first; level i writes slot i mod order,
    // over the level that just left the history.
    let mut history: Vec<(f64, usize)> = Vec::with_capacity(order);
    for i in 0..steps - 1 {
        let slot = i % order;
        let lambda = -grid[i].ln();
        history.insert(0, (lambda, slot));
        history.truncate(order);
        let h = (grid[i] / grid[i + 1]).ln();
        let nodes: Vec<f64> = history.iter().map(|(l, _)| kappa * (l - lambda)).collect();
        let w = expint::exp_weights(kappa * h, &nodes);
        let terms = w.iter().zip(&history).map(|(&w, &(_, s))| (w, s)).collect();
        let noise = (cfg.churn > 0.0).then(|| {
            draws += 1;
            (grid[i + 1] * (-(-2.0 * cfg.churn * h).exp_m1()).sqrt(), draws - 1)
        });
        let update = Update::Dpm {
            decay: (-kappa * h).exp(),
            terms,
            noise,
        };
        stages.push(Stage::new(sde, grid[i], slot, update));
    }
    stages.push(Stage::new(
        sde,
        grid[steps - 1],
        (steps - 1) % order,
        Update::Final,
    ));
    Ok(Plan {
        stages,
        slots: order,
        draws,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;
    use crate::backend::Backend;
    use crate::model::ScoreFn;
    use crate::sample::fast::fast_sample_from;
    use crate::sample::NoiseStream;
    use crate::tensor::Tensor;

    type B = CpuF32;

    /// A cheap score with a nonlinearity, so every stage's input matters: s = −x/(1 + t) + 0.1·sin(x)·y.
    struct Toy(B);
    impl ScoreFn<B> for Toy {
        fn score(&self, x: &Tensor<B>, y: &Tensor<B>, t: f64) -> Result<Tensor<B>> {
            let (xv, yv) = (self.0.to_f32(x)?, self.0.to_f32(y)?);
            let k = (1.0 / (1.0 + t)) as f32;
            let v: Vec<f32> = xv
                .iter()
                .zip(&yv)
                .map(|(a, b)| -a * k + 0.1 * a.sin() * b)
                .collect();
            self.0.from_f32(x.shape(), &v)
        }
    }

    /// Noise of draw `draw` as the graph kernels compute it: element j of image n is
    /// rng::normal(seed, base + draw·draw_size + local) (see `NoiseLayout::element`).
    fn layout_noise(be: &B, noise: &NoiseStream, shape: &[usize], draw: u64) -> Tensor<B> {
        let batch = shape[0];
        let per: usize = shape[1..].iter().product();
        let per_image = !noise.image_seeds.is_empty();
        let size = if per_image { per } else { batch * per } as u64;
        let v: Vec<f32> = (0..batch * per)
            .map(|k| {
                let (n, j) = ((k / per) as u64, (k % per) as u64);
                let off = noise.offset + draw * size;
                if per_image {
                    crate::rng::normal(noise.image_seeds[n as usize], off + j)
                } else {
                    crate::rng::normal(noise.seed, off + n * per as u64 + j)
                }
            })
            .collect();
        be.from_f32(shape, &v).unwrap()
    }

    /// Run a plan with backend ops, buffer by buffer as the graph kernels do.
    fn run_plan(
        be: &B,
        sde: &Sde,
        y: &Tensor<B>,
        plan: &Plan,
        xh: &Tensor<B>,
        noise: &NoiseStream,
    ) -> Tensor<B> {
        let score = Toy(be.clone());
        let (mut xh, mut point) = (xh.clone(), xh.clone());
        let mut d: Vec<Option<Tensor<B>>> = vec![None; plan.slots];
        let _ = sde;
        for st in &plan.stages {
            if let Some((std, draw)) = st.pre_noise {
                let z = layout_noise(be, noise, xh.shape(), draw);
                xh = be.axpby(1.0, &xh, std, &z).unwrap();
                point = xh.clone();
            }
            let x = if st.alpha == 1.0 {
                point.clone()
            } else {
                be.affine(&point, st.alpha, 0.0).unwrap()
            };
            let s = score.score(&x, y, st.t).unwrap();
            let den = be.axpby(1.0, &point, st.score_coef(), &s).unwrap();
            d[st.slot] = Some(den.clone());
            match &st.update {
                Update::Final => return den,
                Update::Dpm {
                    decay,
                    terms,
                    noise: z,
                } => {
                    let mut next = be.axpby(*decay, &xh, terms[0].0, &den).unwrap();
                    for &(w, slot) in &terms[1..] {
                        next = be.axpby(1.0, &next, w, d[slot].as_ref().unwrap()).unwrap();
                    }
                    if let Some((std, draw)) = z {
                        let z = layout_noise(be, noise, xh.shape(), *draw);
                        next = be.axpby(1.0, &next, *std, &z).unwrap();
                    }
                    (xh, point) = (next.clone(), next);
                }
                Update::Euler { r, commit } => {
                    point = be.axpby(*r, &xh, 1.0 - r, &den).unwrap();
                    if *commit {
                        xh = point.clone();
                    }
                }
                Update::Heun { c_half, c_d } => {
                    let half = be.axpby(0.5, &xh, *c_half, &point).unwrap();
                    xh = be.axpby(1.0, &half, *c_d, &den).unwrap();
                    point = xh.clone();
                }
            }
        }
        unreachable!("a plan ends with its final stage")
    }

    /// Every solver, with and without churn, per-image and one noise stream, VE and VP: the plan
    /// run with backend ops gives the eager sampler's bits, and counts its draws.
    #[test]
    fn plan_reproduces_the_eager_sampler_bitwise() {
        let be = B::new();
        let shape = [2usize, 3, 4, 5];
        let y = be.rand_uniform(&shape, 3, 0).unwrap();
        let x_t = be.randn(&shape, 4, 0).unwrap();
        let solvers = [
            FastSolver::Heun,
            FastSolver::Dpm { order: 2 },
            FastSolver::Dpm { order: 3 },
        ];
        for sde in [Sde::paper_ve(), Sde::paper_vp()] {
            for solver in solvers {
                for churn in [0.0, 0.4] {
                    for steps in [2usize, 5, 6] {
                        for noise in [NoiseStream::per_image(vec![8, 9]), NoiseStream::new(6)] {
                            let cfg = FastConfig {
                                churn,
                                ..FastConfig::new(solver)
                            };
                            let p = plan(&sde, &cfg, steps).unwrap();
                            assert_eq!(p.stages.len(), steps);
                            let xh = be.affine(&x_t, 1.0 / schedule::alpha(&sde, 1.0), 0.0).unwrap();
                            let mut eager_noise = noise.clone();
                            let want = fast_sample_from(
                                &be,
                                &Toy(be.clone()),
                                &sde,
                                &y,
                                &cfg,
                                steps,
                                &x_t,
                                &mut eager_noise,
                                &mut |_| Ok(()),
                            )
                            .unwrap();
                            let got = run_plan(&be, &sde, &y, &p, &xh, &noise);
                            let (a, b) = (be.to_f32(&got).unwrap(), be.to_f32(&want).unwrap());
                            let what = format!("{} {solver:?} churn {churn} steps {steps}", sde.name());
                            assert!(
                                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                                "{what}: plan and eager differ"
                            );
                            let per = if noise.image_seeds.is_empty() { 120 } else { 60 };
                            assert_eq!(eager_noise.offset, p.draws * per, "{what}: draws");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dpm_slots_rotate_through_the_history() {
        let cfg = FastConfig::new(FastSolver::Dpm { order: 3 });
        let p = plan(&Sde::paper_ve(), &cfg, 6).unwrap();
        let slots: Vec<Vec<usize>> = p
            .stages
            .iter()
            .filter_map(|s| match &s.update {
                Update::Dpm { terms, .. } => Some(terms.iter().map(|t| t.1).collect()),
                _ => None,
            })
            .collect();
        assert_eq!(
            slots,
            vec![vec![0], vec![1, 0], vec![2, 1, 0], vec![0, 2, 1], vec![1, 0, 2]]
        );
        assert_eq!(p.stages[5].slot, 2);
        assert_eq!((p.slots, p.draws), (3, 0));
    }
}
