//! The training loop: [`Trainer`] (one optimisation step on a batch) and [`train`] (a whole run
//! in a folder: data loading, logging, checkpoints, resume, time limit and clean stop).
//!
//! A step is exactly the original `step_fn` + `optimize_fn` + EMA update: DSM loss and its
//! gradients with the step's t, z and dropout masks; global grad-norm clip; Adam with the warm-up
//! lr of the steps completed so far; EMA update; step + 1.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ncsnpp::param_specs;
use crate::model::{Ncsnpp, NetConfig, ScoreModel};
use crate::tensor::{HostTensor, Tensor};
use crate::train::checkpoint::{adam_config, Checkpoint, TrainState, CHECKPOINT_FILE};
use crate::train::data::{Batch, FaceFolder, Loader, LoaderOptions};
use crate::train::device::{DeviceAdam, DeviceEma};
use crate::train::loss::{draw_noise, draw_train_times, dropout_seed, dsm_loss};
use crate::train::optim::{scheduled_lr, warmup_lr, LrDecay};
use crate::train::validate::{write_grid, ValSet};
use crate::train::Hyper;

/// File name of a run's JSONL log inside the run folder.
pub const LOG_FILE: &str = "train_log.jsonl";

/// What one training step did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepReport {
    /// Steps completed after this one.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clip_scale: f64,
    pub ema_decay: f64,
}

/// A network with its optimiser state, all on the network's backend: the network's weights are
/// the master weights (f32), with Adam's moments and the EMA shadow beside them
/// ([`crate::train::device`]). A step copies nothing to the host but the loss and the gradient
/// norm's per-tensor sums; checkpoints, validation and export download on demand.
pub struct Trainer<B: Backend> {
    /// The network; its weights are the current parameters.
    pub model: ScoreModel<B>,
    pub hyper: Hyper,
    pub adam: DeviceAdam<B>,
    pub ema: DeviceEma<B>,
    /// Steps completed.
    pub step: u64,
}

impl<B: Backend> Trainer<B> {
    /// A fresh run from given weights (e.g. [`crate::train::init::paper_init`]).
    pub fn from_weights(
        backend: &B,
        config: NetConfig,
        hyper: Hyper,
        params: BTreeMap<String, HostTensor>,
    ) -> Result<Trainer<B>> {
        hyper.validate()?;
        let trainable: Vec<String> = param_specs(&config)
            .into_iter()
            .filter(|s| s.2)
            .map(|s| s.0)
            .collect();
        let net = Ncsnpp::from_weights(backend, config, &params, "<initial weights>")?;
        let w = net.weights();
        let adam = DeviceAdam::new(backend, adam_config(&hyper), trainable.iter().map(|n| (n, &w[n])))?;
        let ema = DeviceEma::new(hyper.ema_rate, trainable.iter().map(|n| (n, &w[n])));
        Ok(Trainer {
            model: ScoreModel::new(net),
            hyper,
            adam,
            ema,
            step: 0,
        })
    }

    /// A fresh run with the original initialisation, seeded by the run seed.
    pub fn new(backend: &B, config: NetConfig, hyper: Hyper) -> Result<Trainer<B>> {
        let params = crate::train::init::paper_init(&config, hyper.seed);
        Self::from_weights(backend, config, hyper, params)
    }

    /// Continue from a checkpoint.
    pub fn from_checkpoint(backend: &B, ck: Checkpoint) -> Result<Trainer<B>> {
        let net = Ncsnpp::from_weights(backend, ck.config, &ck.params, "<checkpoint>")?;
        let adam = DeviceAdam::upload(backend, &ck.adam, net.weights())?;
        let ema = DeviceEma::upload(backend, &ck.ema, net.weights())?;
        Ok(Trainer {
            model: ScoreModel::new(net),
            hyper: ck.hyper,
            adam,
            ema,
            step: ck.state.step,
        })
    }

    fn backend(&self) -> &B {
        self.model.net.backend()
    }

    /// A host copy of every current weight (trainable and frozen).
    pub fn params(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.model.net.to_host()
    }

    /// The full state copied to the host, with the data stream position `next_sample`.
    pub fn checkpoint(&self, next_sample: u64) -> Result<Checkpoint> {
        Ok(Checkpoint {
            config: self.model.net.config.clone(),
            hyper: self.hyper.clone(),
            state: TrainState {
                step: self.step,
                next_sample,
            },
            params: self.params()?,
            adam: self.adam.download(self.backend())?,
            ema: self.ema.download(self.backend())?,
        })
    }

    /// Write the full state atomically to `dest` (see [`Checkpoint::save`]).
    pub fn save_checkpoint(&self, next_sample: u64, dest: &Path) -> Result<()> {
        self.checkpoint(next_sample)?.save(dest)
    }

    /// The batch as device tensors in the model's data space (VP/subVP: both x0 and the guide
    /// mapped to [−1,1], as the original scaler does to the 6-channel record).
    pub fn batch_tensors(&self, batch: &Batch) -> Result<(Tensor<B>, Tensor<B>)> {
        let be = self.backend();
        let shape = [batch.len, 3, batch.size, batch.size];
        let centered = self.model.net.config.data.centered;
        let scale = |v: &[f32]| -> Vec<f32> {
            if centered {
                v.iter().map(|x| x * 2.0 - 1.0).collect()
            } else {
                v.to_vec()
            }
        };
        Ok((
            be.from_f32(&shape, &scale(&batch.hr))?,
            be.from_f32(&shape, &scale(&batch.guide))?,
        ))
    }

    /// One optimisation step on `batch`: loss and gradients, global norm (one small download),
    /// clip, fused Adam on every parameter, fused EMA, and the network takes the new weights.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepReport> {
        let (x0, y) = self.batch_tensors(batch)?;
        let be = self.backend().clone();
        let h = &self.hyper;
        let t = draw_train_times(
            &h.noise_dist,
            &self.model.sde,
            h.seed,
            self.step,
            batch.len,
            h.t_eps,
        )?;
        let z = draw_noise(&be, x0.shape(), h.seed, self.step)?;
        let out = dsm_loss(
            &self.model,
            &x0,
            &y,
            &t,
            &z,
            dropout_seed(h.seed, self.step),
            true,
        )?;
        if !out.loss.is_finite() {
            return Err(Error::Other(format!(
                "loss is {} at step {}; stopping without updating the weights",
                out.loss,
                self.step + 1
            )));
        }
        let grads = out.grads.expect("requested");
        if let Some(name) = self.adam.names().find(|n| !grads.by_name.contains_key(*n)) {
            return Err(Error::Other(format!("no gradient reached `{name}`")));
        }
        // Adam and the EMA on the network's own weights: where no other tensor holds a buffer,
        // the backend updates it in place.
        let (adam, ema, step) = (&mut self.adam, &mut self.ema, self.step);
        let (a, ema_decay) = self
            .model
            .net
            .update_weights(|w| adam.step_with_ema(&be, w, &grads.by_name, step, ema))?;
        drop(grads);
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: out.loss,
            lr: a.lr,
            grad_norm: a.grad_norm,
            clip_scale: a.clip_scale,
            ema_decay,
        })
    }

    /// A copy of the network carrying the EMA weights (what inference, validation and the
    /// sample grids use). Goes through the host: the shadow (and the frozen weights) are
    /// downloaded and the copy built from them.
    pub fn ema_model(&self) -> Result<ScoreModel<B>> {
        let be = self.backend();
        let shadow = self.ema.shadow();
        let w = self
            .model
            .net
            .weights()
            .iter()
            .map(|(name, p)| {
                let t = shadow.get(name).unwrap_or(p);
                Ok((name.clone(), HostTensor::from_device(be, t)?))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let net = Ncsnpp::from_weights(be, self.model.net.config.clone(), &w, "<EMA weights>")?;
        Ok(ScoreModel::new(net))
    }
}

/// Settings of `srsde-fast train`. `None` hyper-parameters take the paper's values on a fresh run
/// and the checkpoint's on resume (where giving a different value is an error).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub preset: String,
    /// Total number of steps of the run (a resumed run continues up to it); None: the paper's
    /// `n_iters` for the SDE ([`paper_steps`]).
    pub steps: Option<u64>,
    pub resume: bool,
    /// Start a new run from these weights (an export, a weights file or a training checkpoint's
    /// EMA weights) instead of a fresh initialisation: the config is the weights', the optimiser
    /// starts afresh with a short warm-up ([`FINETUNE_WARMUP`] unless `warmup` is given), the
    /// preset is ignored. Refused together with `resume`.
    pub init_from: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub ckpt_every: u64,
    /// Stop (with a checkpoint) after this much wall time.
    pub max_minutes: Option<f64>,
    pub image_size: Option<usize>,
    pub nf: Option<usize>,
    pub ch_mult: Option<Vec<usize>>,
    pub batch: Option<usize>,
    pub lr: Option<f64>,
    pub warmup: Option<u64>,
    pub ema_rate: Option<f64>,
    pub grad_clip: Option<f64>,
    pub flip: Option<bool>,
    pub seed: Option<u64>,
    /// Data decoding threads.
    pub workers: usize,
    /// MiB of decoded faces the loader keeps in memory.
    pub data_cache_mib: usize,
    /// Write a log line every this many steps (≥ 1).
    pub log_every: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Share of the data files held out for validation (never trained on; 0: none). None: the
    /// default for a fresh run, the checkpoint's value on resume (it decides the training stream).
    pub val_fraction: Option<f64>,
    /// Log the validation loss every this many steps (0: never).
    pub val_every: u64,
    /// Write a sample grid every this many steps (None: as `val_every`; 0: never).
    pub grid_every: Option<u64>,
    /// Sampler steps of the grid samples.
    pub grid_steps: usize,
    /// Residual blocks per level (fresh runs; None: the preset's).
    pub num_res_blocks: Option<usize>,
    /// Largest VE noise level σ_max (fresh runs; None: the preset's).
    pub sigma_max: Option<f64>,
    /// σ_d of a guide-residual model (fresh runs; None: measured on the training faces).
    pub sigma_data: Option<f64>,
    /// The training noise levels' distribution (None: the paper's t ~ U[eps, 1]).
    pub noise_dist: Option<crate::train::NoiseDist>,
    /// Anneal the learning rate over this many steps (a half cosine), from where the run is (after
    /// the warm-up of a new run; at the checkpoint's step on resume) down to `lr_final`.
    pub lr_decay: Option<u64>,
    /// The learning rate the decay ends at (None: a tenth of the run's lr).
    pub lr_final: Option<f64>,
}

impl TrainOptions {
    /// Defaults for everything but the data and run folders.
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>, preset: &str, steps: u64) -> TrainOptions {
        TrainOptions {
            data: data.into(),
            out: out.into(),
            preset: preset.to_string(),
            steps: Some(steps),
            resume: false,
            init_from: None,
            ckpt_every: 5000,
            max_minutes: None,
            image_size: None,
            nf: None,
            ch_mult: None,
            batch: None,
            lr: None,
            warmup: None,
            ema_rate: None,
            grad_clip: None,
            flip: None,
            seed: None,
            workers: 2,
            data_cache_mib: 2048,
            log_every: 1,
            progress: false,
            val_fraction: None,
            val_every: 500,
            grid_every: None,
            grid_steps: 50,
            num_res_blocks: None,
            sigma_max: None,
            sigma_data: None,
            noise_dist: None,
            lr_decay: None,
            lr_final: None,
        }
    }

    /// The model config of a fresh run: the preset with the size overrides applied.
    pub fn net_config(&self) -> Result<NetConfig> {
        let mut c = NetConfig::preset(&self.preset)?;
        if let Some(s) = self.image_size {
            c.data.image_size = s;
        }
        if let Some(nf) = self.nf {
            c.model.nf = nf;
        }
        if let Some(m) = &self.ch_mult {
            c.model.ch_mult = m.clone();
        }
        if let Some(b) = self.num_res_blocks {
            c.model.num_res_blocks = b;
        }
        if let Some(s) = self.sigma_max {
            c.model.sigma_max = s;
        }
        if let Some(sd) = self.sigma_data {
            if c.model.parameterization.sigma_data().is_none() {
                return Err(Error::Config(format!(
                    "--sigma-data applies to guide-residual presets; `{}` is in the paper's form",
                    self.preset
                )));
            }
            c.model.parameterization =
                crate::model::config::Parameterization::GuideResidual { sigma_data: sd };
        }
        c.validate()?;
        Ok(c)
    }

    /// The hyper-parameters of a fresh run.
    pub fn hyper(&self, config: &NetConfig) -> Hyper {
        let mut h = Hyper::paper(&self.preset, config);
        h.batch = self.batch.unwrap_or(h.batch);
        h.lr = self.lr.unwrap_or(h.lr);
        h.warmup = self.warmup.unwrap_or(h.warmup);
        h.ema_rate = self.ema_rate.unwrap_or(h.ema_rate);
        h.grad_clip = self.grad_clip.unwrap_or(h.grad_clip);
        h.flip = self.flip.unwrap_or(h.flip);
        h.seed = self.seed.unwrap_or(h.seed);
        h.val_fraction = self.val_fraction.unwrap_or(h.val_fraction);
        h.noise_dist = self.noise_dist.unwrap_or(h.noise_dist);
        h.lr_decay = self.new_lr_decay(&h, h.warmup);
        h
    }

    /// The `--lr-decay` of a new run whose decay starts after `start` completed steps.
    fn new_lr_decay(&self, h: &Hyper, start: u64) -> Option<LrDecay> {
        self.lr_decay.map(|steps| LrDecay {
            start,
            steps,
            from: warmup_lr(h.lr, h.warmup, start),
            to: self.lr_final.unwrap_or(h.lr / 10.0),
        })
    }

    /// The decay of a resumed run at `step`: the checkpoint's unless `--lr-decay` is given; given
    /// with the checkpoint's own steps and final lr it changes nothing (so repeating the command
    /// that set it resumes exactly), else a new decay starts here from the lr the run is at.
    fn resumed_lr_decay(&self, h: &Hyper, step: u64) -> Option<LrDecay> {
        let Some(steps) = self.lr_decay else {
            return h.lr_decay;
        };
        let to = self.lr_final.unwrap_or(h.lr / 10.0);
        match h.lr_decay {
            Some(d) if d.steps == steps && d.to == to => Some(d),
            _ => Some(LrDecay {
                start: step,
                steps,
                from: scheduled_lr(&adam_config(h), step),
                to,
            }),
        }
    }

    /// On resume, every setting given explicitly must agree with the checkpoint.
    fn check_resume(&self, ck: &Checkpoint) -> Result<()> {
        let (h, c) = (&ck.hyper, &ck.config);
        let mut diffs = Vec::new();
        let mut cmp = |flag: &str, given: Option<String>, stored: String| {
            if let Some(g) = given {
                if g != stored {
                    diffs.push(format!("--{flag} {g} (checkpoint: {stored})"));
                }
            }
        };
        cmp("batch", self.batch.map(|v| v.to_string()), h.batch.to_string());
        cmp("lr", self.lr.map(|v| v.to_string()), h.lr.to_string());
        cmp("warmup", self.warmup.map(|v| v.to_string()), h.warmup.to_string());
        cmp(
            "ema-rate",
            self.ema_rate.map(|v| v.to_string()),
            h.ema_rate.to_string(),
        );
        cmp(
            "grad-clip",
            self.grad_clip.map(|v| v.to_string()),
            h.grad_clip.to_string(),
        );
        cmp("flip", self.flip.map(|v| v.to_string()), h.flip.to_string());
        cmp("seed", self.seed.map(|v| v.to_string()), h.seed.to_string());
        cmp(
            "noise-dist",
            self.noise_dist.map(|d| d.describe()),
            h.noise_dist.describe(),
        );
        cmp(
            "num-res-blocks",
            self.num_res_blocks.map(|v| v.to_string()),
            c.model.num_res_blocks.to_string(),
        );
        cmp(
            "sigma-max",
            self.sigma_max.map(|v| v.to_string()),
            c.model.sigma_max.to_string(),
        );
        cmp(
            "val-fraction",
            self.val_fraction.map(|v| v.to_string()),
            h.val_fraction.to_string(),
        );
        cmp(
            "image-size",
            self.image_size.map(|v| v.to_string()),
            c.data.image_size.to_string(),
        );
        cmp("nf", self.nf.map(|v| v.to_string()), c.model.nf.to_string());
        cmp(
            "ch-mult",
            self.ch_mult.as_ref().map(|v| format!("{v:?}")),
            format!("{:?}", c.model.ch_mult),
        );
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "a resumed run keeps the settings of its checkpoint; these differ: {}",
                diffs.join(", ")
            )))
        }
    }
}

/// Default warm-up of a `--init-from` run: the weights are trained already and only Adam's moments
/// start from zero, so a short ramp (vs the paper's 5000 steps from scratch) is enough to keep the
/// first, poorly normalised updates from disturbing them.
pub const FINETUNE_WARMUP: u64 = 200;

/// The weights of `--init-from SOURCE`, their config and the training totals (steps, images, runs)
/// recorded with them (zeros when the source records none).
pub struct InitWeights {
    pub config: NetConfig,
    pub weights: BTreeMap<String, HostTensor>,
    pub totals: (u64, u64, u64),
}

/// Read `--init-from SOURCE`: a training checkpoint (file or run folder: its EMA weights), a sharded
/// export (folder or index), a single weights file or an original `.pth`.
pub fn load_init_weights(src: &Path) -> Result<InitWeights> {
    use crate::model::{load, sharded, weights};
    use crate::train::checkpoint::{record_totals, training_record, FORMAT, TRAINING_KEY};
    let is_checkpoint = if src.is_dir() {
        src.join(CHECKPOINT_FILE).is_file()
    } else {
        src.extension().is_some_and(|e| e == "safetensors")
            && weights::read_safetensors_metadata(src)?
                .get("format")
                .is_some_and(|f| f == FORMAT)
    };
    if is_checkpoint {
        let ck = Checkpoint::load(src)?;
        let totals = record_totals(&training_record(&ck)).unwrap_or_default();
        return Ok(InitWeights {
            weights: ck.ema_weights(),
            config: ck.config,
            totals,
        });
    }
    let lw = load::load_weights(src, None)?;
    let record: Option<serde_json::Value> = if sharded::is_sharded_path(src) {
        let index = sharded::index_path(src);
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        sharded::parse_index(&text, &index.display().to_string())?.training
    } else if src.extension().is_some_and(|e| e == "safetensors") {
        weights::read_safetensors_metadata(src)?
            .get(TRAINING_KEY)
            .and_then(|t| serde_json::from_str(t).ok())
    } else {
        None
    };
    Ok(InitWeights {
        config: lw.config,
        weights: lw.weights,
        totals: record.as_ref().and_then(record_totals).unwrap_or_default(),
    })
}

/// A new run's trainer starting from `--init-from` weights (fresh Adam, EMA starting at them).
fn trainer_from_init<B: Backend>(backend: &B, opts: &TrainOptions, src: &Path) -> Result<Trainer<B>> {
    let init = load_init_weights(src)?;
    let c = &init.config;
    let mut diffs = Vec::new();
    let mut cmp = |flag: &str, given: Option<String>, stored: String| {
        if given.as_ref().is_some_and(|g| *g != stored) {
            diffs.push(format!(
                "--{flag} {} (weights: {stored})",
                given.unwrap_or_default()
            ));
        }
    };
    cmp(
        "image-size",
        opts.image_size.map(|v| v.to_string()),
        c.data.image_size.to_string(),
    );
    cmp("nf", opts.nf.map(|v| v.to_string()), c.model.nf.to_string());
    cmp(
        "ch-mult",
        opts.ch_mult.as_ref().map(|v| format!("{v:?}")),
        format!("{:?}", c.model.ch_mult),
    );
    if !diffs.is_empty() {
        return Err(Error::Config(format!(
            "--init-from takes the model config from the weights; these differ: {}",
            diffs.join(", ")
        )));
    }
    let mut hyper = opts.hyper(c);
    hyper.preset = format!("init-from {}", src.display());
    hyper.warmup = opts.warmup.unwrap_or(FINETUNE_WARMUP);
    hyper.lr_decay = opts.new_lr_decay(&hyper, hyper.warmup);
    let (steps, images, runs) = init.totals;
    hyper.init = Some(crate::train::InitFrom {
        source: src.display().to_string(),
        steps,
        images,
        runs,
    });
    if opts.progress {
        eprintln!(
            "starting from {} ({steps} steps, {images} images of earlier training); fresh Adam, warm-up {} steps",
            src.display(),
            hyper.warmup
        );
    }
    Trainer::from_weights(backend, init.config, hyper, init.weights)
}

/// Most training faces a fresh guide-residual run reads to measure σ_d.
pub const SIGMA_DATA_FACES: usize = 1024;

/// σ_d of the guide-residual form: the RMS of x₀ − y (data space [0,1], y the paper's bicubic
/// guide) over the first `limit` readable faces of `files` (in their sorted order, so a run's
/// value depends only on the folder). Unreadable files are skipped; none readable is an error.
pub fn measure_sigma_data(files: &[PathBuf], size: usize, limit: usize) -> Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    let mut faces = 0;
    for f in files {
        if faces == limit {
            break;
        }
        let Ok(s) = crate::train::data::load_sample(f, size, false) else {
            continue;
        };
        sum +=
            s.hr.iter()
                .zip(&s.guide)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        count += s.hr.len();
        faces += 1;
    }
    if count == 0 {
        return Err(Error::Config("measuring σ_d: no readable training face".into()));
    }
    Ok((sum / count as f64).sqrt())
}

/// The original's `n_iters`: VE 2,400,001; VP/subVP 950,001.
pub fn paper_steps(sde: crate::model::SdeKind) -> u64 {
    match sde {
        crate::model::SdeKind::Ve => 2_400_001,
        _ => 950_001,
    }
}

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// All requested steps are done.
    Finished,
    /// The stop flag was raised (Ctrl-C).
    Interrupted,
    /// `max_minutes` elapsed.
    TimeLimit,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub start_step: u64,
    pub end_step: u64,
    /// Loss of every step done in this session, in order.
    pub losses: Vec<f64>,
    pub checkpoint: PathBuf,
    pub stopped: StopReason,
    /// Files skipped as unreadable, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    pub num_params: usize,
    pub seconds: f64,
}

#[derive(Serialize)]
struct LogLine {
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    clip_scale: f64,
    ema_decay: f64,
    images_per_s: f64,
    elapsed_s: f64,
    /// DSM loss of the held-out batch with the EMA weights (on validation steps only).
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
}

/// Open the run's log for appending. A fresh run starts it empty; a resumed run drops the lines
/// of steps after its checkpoint (done before a crash, and about to be redone), so the log holds
/// each step once.
fn open_log(path: &Path, resume_from: Option<u64>) -> Result<std::fs::File> {
    match resume_from {
        None => {
            std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        }
        Some(step) if path.is_file() => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let keep: String = text
                .lines()
                .filter(|l| {
                    let v = serde_json::from_str::<serde_json::Value>(l).ok();
                    v.and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            if keep.len() != text.len() {
                std::fs::write(path, keep).map_err(|e| Error::io(path, e))?;
            }
        }
        Some(_) => {}
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Run (or resume) training in `opts.out`. Checks `stop` before every step; a raised flag ends the
/// run cleanly with a checkpoint, as does the time limit.
pub fn train<B: Backend>(backend: &B, opts: &TrainOptions, stop: &AtomicBool) -> Result<TrainSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let ckpt_path = opts.out.join(CHECKPOINT_FILE);
    if opts.resume && opts.init_from.is_some() {
        return Err(Error::Config(
            "--init-from starts a new run from weights and --resume continues a run from its checkpoint: \
             give only one of them"
                .into(),
        ));
    }
    let (mut trainer, next_sample) = if opts.resume {
        if !ckpt_path.is_file() {
            return Err(Error::Config(format!(
                "--resume: no checkpoint at {} (start a fresh run without --resume)",
                ckpt_path.display()
            )));
        }
        let mut ck = Checkpoint::load(&ckpt_path)?;
        opts.check_resume(&ck)?;
        ck.hyper.lr_decay = opts.resumed_lr_decay(&ck.hyper, ck.state.step);
        ck.hyper.validate()?;
        ck.adam.config = adam_config(&ck.hyper);
        if let (Some(d), true) = (ck.hyper.lr_decay, opts.progress) {
            eprintln!(
                "learning rate: cosine decay from {:e} at step {} to {:e} at step {}",
                d.from,
                d.start,
                d.to,
                d.start + d.steps
            );
        }
        let next = ck.state.next_sample;
        (Trainer::from_checkpoint(backend, ck)?, next)
    } else {
        if ckpt_path.exists() {
            return Err(Error::Config(format!(
                "{} already holds a checkpoint; pass --resume to continue it or choose another --out",
                opts.out.display()
            )));
        }
        let trainer = match &opts.init_from {
            Some(src) => trainer_from_init(backend, opts, src)?,
            None => {
                let mut config = opts.net_config()?;
                let hyper = opts.hyper(&config);
                if config.model.parameterization.sigma_data().is_some() && opts.sigma_data.is_none() {
                    let (train_part, _) =
                        FaceFolder::open(&opts.data)?.split_validation(hyper.val_fraction)?;
                    let sd = measure_sigma_data(&train_part.files, config.data.image_size, SIGMA_DATA_FACES)?;
                    if opts.progress {
                        eprintln!("σ_d (RMS of x0 − guide) over the first {SIGMA_DATA_FACES} training faces: {sd:.5}");
                    }
                    config.model.parameterization =
                        crate::model::config::Parameterization::GuideResidual { sigma_data: sd };
                }
                Trainer::new(backend, config, hyper)?
            }
        };
        (trainer, 0)
    };
    let start_step = trainer.step;
    let steps = opts
        .steps
        .unwrap_or_else(|| paper_steps(trainer.model.net.config.sde()));
    let h = trainer.hyper.clone();
    let (folder, held_out) = FaceFolder::open(&opts.data)?.split_validation(h.val_fraction)?;
    let grid_every = opts.grid_every.unwrap_or(opts.val_every);
    if grid_every > 0 && opts.grid_steps < 2 {
        return Err(Error::Config(format!(
            "--grid-steps must be at least 2, got {}",
            opts.grid_steps
        )));
    }
    let val_set = if opts.val_every > 0 || grid_every > 0 {
        ValSet::load(&held_out, trainer.model.net.config.data.image_size)
    } else {
        None
    };
    if val_set.is_none() && (opts.val_every > 0 || grid_every > 0) && opts.progress {
        eprintln!("note: no readable held-out validation face; no val_loss or sample grids");
    }
    let mut loader = Loader::start(
        folder,
        LoaderOptions {
            image_size: trainer.model.net.config.data.image_size,
            batch: h.batch,
            flip: h.flip,
            seed: h.seed,
            workers: opts.workers.max(1),
            prefetch: (4 * h.batch).max(8),
            cache_bytes: opts.data_cache_mib << 20,
        },
        next_sample,
    )?;
    let mut log = open_log(&opts.out.join(LOG_FILE), opts.resume.then_some(start_step))?;

    let bar = if opts.progress {
        indicatif::ProgressBar::new(steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(start_step.min(steps));

    let mut losses = Vec::new();
    let mut stopped = StopReason::Finished;
    let mut saved_at = None;
    while trainer.step < steps {
        if stop.load(Ordering::SeqCst) {
            stopped = StopReason::Interrupted;
            break;
        }
        if opts
            .max_minutes
            .is_some_and(|m| started.elapsed().as_secs_f64() >= m * 60.0)
        {
            stopped = StopReason::TimeLimit;
            break;
        }
        let t0 = Instant::now();
        let batch = loader.next_batch()?;
        let rep = trainer.train_step(&batch)?;
        let ips = batch.len as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        losses.push(rep.loss);
        let due = |every: u64| every > 0 && rep.step % every == 0;
        let mut val_loss = None;
        if let Some(vs) = &val_set {
            if due(opts.val_every) || due(grid_every) {
                let ema = trainer.ema_model()?;
                if due(opts.val_every) {
                    let v = vs.loss(&ema, h.t_eps)?;
                    bar.println(format!("step {}: val_loss {v:.4}", rep.step));
                    val_loss = Some(v);
                }
                if due(grid_every) {
                    let (img, gh, gw) = vs.grid(&ema, opts.grid_steps)?;
                    write_grid(&opts.out.join("samples"), rep.step, &img, gh, gw)?;
                }
            }
        }
        if rep.step % opts.log_every.max(1) == 0 || rep.step == steps || val_loss.is_some() {
            let line = LogLine {
                step: rep.step,
                loss: rep.loss,
                lr: rep.lr,
                grad_norm: rep.grad_norm,
                clip_scale: rep.clip_scale,
                ema_decay: rep.ema_decay,
                images_per_s: ips,
                elapsed_s: started.elapsed().as_secs_f64(),
                val_loss,
            };
            let text = serde_json::to_string(&line).map_err(|e| Error::Other(e.to_string()))?;
            writeln!(log, "{text}").map_err(|e| Error::io(opts.out.join(LOG_FILE), e))?;
        }
        bar.set_position(rep.step);
        bar.set_message(format!("loss {:.4} lr {:.2e} {ips:.1} img/s", rep.loss, rep.lr));
        if opts.ckpt_every > 0 && rep.step % opts.ckpt_every == 0 {
            trainer.save_checkpoint(loader.next_sample(), &ckpt_path)?;
            saved_at = Some(rep.step);
        }
    }
    if saved_at != Some(trainer.step) && (trainer.step > start_step || !ckpt_path.exists()) {
        trainer.save_checkpoint(loader.next_sample(), &ckpt_path)?;
    }
    log.sync_all()
        .map_err(|e| Error::io(opts.out.join(LOG_FILE), e))?;
    bar.finish_and_clear();
    Ok(TrainSummary {
        start_step,
        end_step: trainer.step,
        losses,
        checkpoint: ckpt_path,
        stopped,
        skipped: loader.skipped().to_vec(),
        num_params: trainer.model.net.num_params(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.stopped {
            StopReason::Finished => "finished",
            StopReason::Interrupted => "stopped (interrupt)",
            StopReason::TimeLimit => "stopped (time limit)",
        };
        let n = self.losses.len();
        let tail = &self.losses[n.saturating_sub(100)..];
        write!(
            f,
            "{why} at step {} ({} steps this session, {:.0} s)",
            self.end_step, n, self.seconds
        )?;
        if !tail.is_empty() {
            write!(
                f,
                ", mean loss of the last {} steps {:.4}",
                tail.len(),
                tail.iter().sum::<f64>() / tail.len() as f64
            )?;
        }
        write!(f, "; checkpoint {}", self.checkpoint.display())?;
        if !self.skipped.is_empty() {
            write!(
                f,
                "; {} unreadable files skipped (first: {}: {})",
                self.skipped.len(),
                self.skipped[0].0.display(),
                self.skipped[0].1
            )?;
        }
        Ok(())
    }
}

/// Command-line arguments of `srsde-fast train`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Folder of face images (recursively; any size ≥ the training size, non-square ones are
    /// centre-cropped; unreadable files are skipped).
    #[arg(long)]
    pub data: PathBuf,
    /// Model preset of a fresh run (ve-paper, vp-paper, subvp-paper, ve-small, ve-tiny, vp-tiny; the
    /// guide-residual ve-res, ve-res-tiny).
    #[arg(long, default_value = "ve-paper", conflicts_with = "init_from")]
    pub preset: String,
    /// Start a new run from trained weights instead of a fresh initialisation: a sharded export
    /// (folder or model.index.json), a weights file, or a run folder / checkpoint (its EMA weights).
    /// The model config comes from the weights; the optimiser starts afresh with a short warm-up
    /// (--warmup, default 200 steps here). Not with --resume.
    #[arg(long, value_name = "WEIGHTS", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Run folder: holds checkpoint.safetensors and train_log.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Total training steps [default: the paper's 2,400,001 (VE) / 950,001 (VP, subVP)].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Batch size [default: 2, as the paper].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Adam learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps [default: 5000; 200 with --init-from; 0 disables].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// EMA rate [default: the config's, 0.999 VE / 0.9999 VP].
    #[arg(long)]
    pub ema_rate: Option<f64>,
    /// Global grad-norm clip [default: 1; negative disables].
    #[arg(long, allow_negative_numbers = true)]
    pub grad_clip: Option<f64>,
    /// Random horizontal flips [default: false for VE, true for VP/subVP].
    #[arg(long)]
    pub flip: Option<bool>,
    /// Run seed: initial weights, t, noise, dropout, data order and flips [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write a checkpoint every K steps (0: only at the end).
    #[arg(long, default_value_t = 5000)]
    pub ckpt_every: u64,
    /// Continue the run in --out from its checkpoint, exactly where it stopped.
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many minutes.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Train at a reduced image size (e.g. 32 for fast CPU tests; must be divisible by 8 and by
    /// 2^(levels−1)).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Override the preset's base width nf.
    #[arg(long)]
    pub nf: Option<usize>,
    /// Override the preset's channel multipliers, e.g. 1,2,2 (fewer levels allow smaller images).
    #[arg(long, value_delimiter = ',')]
    pub ch_mult: Option<Vec<usize>>,
    /// Image decoding threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// MiB of decoded training faces kept in memory, so each file is decoded and degraded once
    /// per run (0: decode on every draw). The shared 5,941 faces at 128² take ≈ 330 MiB.
    #[arg(long, default_value_t = 2048)]
    pub data_cache_mib: usize,
    /// Write a log line every N steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Share of the data files held out for validation, chosen by file-name hash (seed-independent)
    /// and never trained on; 0 holds none out [default: 0.05; on --resume, the checkpoint's]
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Log the EMA weights' DSM loss on a fixed held-out batch (`val_loss`) every K steps (0: never).
    #[arg(long, default_value_t = 500)]
    pub val_every: u64,
    /// Write RUN/samples/step_NNNNNNN.png (rows LR | SR | HR) every K steps [default: --val-every; 0: never].
    #[arg(long)]
    pub grid_every: Option<u64>,
    /// Sampler steps of the grid samples (the model's default sampler, shortened).
    #[arg(long, default_value_t = 50)]
    pub grid_steps: usize,
    /// Override the preset's residual blocks per level.
    #[arg(long)]
    pub num_res_blocks: Option<usize>,
    /// Override the preset's largest noise level σ_max (VE).
    #[arg(long)]
    pub sigma_max: Option<f64>,
    /// σ_d of a guide-residual preset (ve-res, ve-res-tiny) [default: measured on the training faces].
    #[arg(long)]
    pub sigma_data: Option<f64>,
    /// Distribution of the training noise levels: `paper` (t ~ U[eps, 1]: σ log-uniform for VE) or
    /// `log-normal:MEAN,STD` of ln σ, truncated to [σ_min, σ_max] (EDM's; VE only) [default: paper].
    #[arg(long, value_parser = parse_noise_dist)]
    pub noise_dist: Option<crate::train::NoiseDist>,
    /// Anneal the learning rate along a half cosine over this many steps, down to --lr-final: from
    /// the end of the warm-up of a new run, or from the checkpoint's step and current lr on --resume
    /// (the one setting a resumed run may change; repeating the same --lr-decay/--lr-final keeps
    /// the decay already under way). Not in the paper (constant lr) [default: no decay].
    #[arg(long, value_name = "STEPS", value_parser = clap::value_parser!(u64).range(1..))]
    pub lr_decay: Option<u64>,
    /// The learning rate --lr-decay ends at [default: a tenth of --lr].
    #[arg(long, requires = "lr_decay")]
    pub lr_final: Option<f64>,
}

fn parse_noise_dist(s: &str) -> std::result::Result<crate::train::NoiseDist, String> {
    crate::train::NoiseDist::parse(s).map_err(|e| e.to_string())
}

impl TrainArgs {
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            data: self.data.clone(),
            out: self.out.clone(),
            preset: self.preset.clone(),
            steps: self.steps,
            resume: self.resume,
            init_from: self.init_from.clone(),
            ckpt_every: self.ckpt_every,
            max_minutes: self.max_minutes,
            image_size: self.image_size,
            nf: self.nf,
            ch_mult: self.ch_mult.clone(),
            batch: self.batch,
            lr: self.lr,
            warmup: self.warmup,
            ema_rate: self.ema_rate,
            grad_clip: self.grad_clip,
            flip: self.flip,
            seed: self.seed,
            workers: self.workers,
            data_cache_mib: self.data_cache_mib,
            log_every: self.log_every,
            progress: !self.quiet,
            val_fraction: self.val_fraction,
            val_every: self.val_every,
            grid_every: self.grid_every,
            grid_steps: self.grid_steps,
            num_res_blocks: self.num_res_blocks,
            sigma_max: self.sigma_max,
            sigma_data: self.sigma_data,
            noise_dist: self.noise_dist,
            lr_decay: self.lr_decay,
            lr_final: self.lr_final,
        }
    }
}

/// Storage type of exported weights (`export --dtype`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    F16,
}

/// Command-line arguments of `srsde-fast export`.
#[derive(clap::Args, Clone, Debug)]
pub struct ExportArgs {
    /// A run folder or a checkpoint file.
    pub checkpoint: PathBuf,
    /// Output: a weights file (.safetensors), or with --shard-mib a folder of shards and
    /// model.index.json; either loads with `upscale --model`.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Storage type of the weights (f16: half the size; loaded back as f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Same as --dtype f16.
    #[arg(long, conflicts_with = "dtype")]
    pub f16: bool,
    /// Write a sharded export into the folder OUTPUT: files of at most this many MiB each
    /// (model-00001-of-0000N.safetensors) plus model.index.json (config, sha256 of every shard).
    #[arg(long, value_name = "MIB")]
    pub shard_mib: Option<f64>,
    /// Overwrite an existing output (for a folder: replace the export in it).
    #[arg(long)]
    pub force: bool,
}

/// `srsde-fast export`: write a checkpoint's EMA weights for inference. Returns a summary line.
pub fn export_cli(args: &ExportArgs) -> Result<String> {
    use crate::model::sharded::INDEX_FILE;
    use crate::model::weights::StorageType;
    let (storage, dtype) = if args.f16 || args.dtype == DtypeArg::F16 {
        (StorageType::F16, "f16")
    } else {
        (StorageType::F32, "f32")
    };
    match args.shard_mib {
        None => {
            crate::io::check_new(&args.output, args.force)?;
            let step = crate::train::checkpoint::export(&args.checkpoint, &args.output, storage)?;
            Ok(format!(
                "wrote {} (EMA weights at step {step}, {dtype})",
                args.output.display()
            ))
        }
        Some(mib) => {
            if !(mib.is_finite() && mib > 0.0) {
                return Err(Error::Config(format!("--shard-mib {mib} must be positive")));
            }
            if args.output.is_file() {
                return Err(Error::Config(format!(
                    "{} is a file; a sharded export needs a folder",
                    args.output.display()
                )));
            }
            crate::io::check_new(&args.output.join(INDEX_FILE), args.force)?;
            let max = (mib * (1u64 << 20) as f64) as usize;
            let index =
                crate::train::checkpoint::export_sharded(&args.checkpoint, &args.output, storage, max)?;
            let total: u64 = index.shards.iter().map(|s| s.bytes).sum();
            let (steps, images, runs) = index
                .training
                .as_ref()
                .and_then(crate::train::checkpoint::record_totals)
                .unwrap_or_default();
            Ok(format!(
                "wrote {} ({} shard(s), {:.1} MiB in all, {dtype}); EMA weights after training in all: \
                 steps {steps}, images {images}, runs {runs}",
                args.output.join(INDEX_FILE).display(),
                index.shards.len(),
                total as f64 / (1u64 << 20) as f64
            ))
        }
    }
}
