//! `srsde-fast upscale`: super-resolve 16×16 faces to 128×128 with a trained score model.
//!
//! A super-resolved face is a hypothesis, not evidence: every output says how it was made and how
//! sure it is, and a broken input or a broken result is an error, never a picture.
//!
//! The steps, ordered so that the command fails early and never half-way through a long run:
//! 1. expand the inputs (files; folders recursively, sorted) and read every LR face — a file that
//!    cannot be read, or decodes only in part (a truncated or corrupt JPEG or PNG, unless
//!    `--accept-truncated`), is reported by name and skipped, and the run fails at the end;
//! 2. name every output (`{stem}_sr.png`, `{stem}_sr_{k}.png`, the sidecar `{stem}_sr.json`; with
//!    `--samples` also `{stem}_mean.png`, `{stem}_std.png`, `{stem}_strip.png`; `{stem}_lr.png`
//!    with `--save-lr`; equal stems from different folders are told apart) and refuse existing
//!    files unless `--force`, before the model is even loaded;
//! 3. load the model (weights holding a NaN or an infinity are an error naming file and tensor)
//!    and pick the sampler (the paper's one for the model's SDE unless told);
//! 4. sample in batches of (face, hypothesis k); once a face's K hypotheses are done, check them —
//!    a non-finite value fails the face, which then gets no file at all — and write its files,
//!    every PNG carrying its provenance record ([`crate::provenance`]) in a text chunk, the same
//!    record in the sidecar.
//!
//! With `--json`, stdout carries one JSON object per face ([`FaceLine`], JSON Lines) and the
//! human log goes to stderr.
//!
//! Noise: item (i, k) — hypothesis k of the face at position i of the input list, counted from
//! `--first-index` — draws from its own stream with seed [`item_seed`]`(seed, i, k)`, whatever
//! batch it lands in. With per-image Langevin norms (the default) a face's result therefore does
//! not depend on `--batch` or on its batch companions (so one face of a folder run is reproduced
//! alone with its `--first-index`); `--langevin-norm batch` (the original's coupling) does depend
//! on them.
//!
//! Test hook (not a user option): the environment variable [`POISON_ENV`]`=<i>` writes a NaN into
//! the samples of the face with noise index i, so tests can check end to end that a non-finite
//! sample fails its face.
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::eval::metrics::{consistency, FloatImage, Layout};
use crate::io::degrade::upsample_guide_chw;
use crate::io::{self, CropMode, Partial, LR_SIZE};
use crate::model::ScoreModel;
use crate::provenance::{
    DeviceInfo, HypothesisInfo, InputInfo, ModelInfo, NoiseInfo, OutputInfo, Provenance, SamplerInfo,
    UncertaintyInfo, CAUTION, FORMAT, PNG_KEY,
};
use crate::sample::{
    preset_help, sample_with_noise, CorrectorKind, LangevinNorm, NoiseStream, PredictorKind, SamplerConfig,
    StepInfo, PRESETS,
};
use crate::sde::Sde;
use crate::uncertainty::{self, Spread};

/// Test-only: the noise index of a face whose samples get a NaN (see the module docs).
pub const POISON_ENV: &str = "SRSDE_TEST_POISON_SAMPLE";

/// The sampler a paper-parameterized VE model uses on the CPU when `--sampler` is not given.
pub const CPU_DEFAULT_SAMPLER: &str = "dpm2";
/// The sampler and network evaluations a guide-residual model uses on the CPU when `--sampler` is
/// not given: chosen by measurement on held-out faces for the shipped model (docs/training.md,
/// "Default sampler"). Few deterministic steps stay close to the posterior mean — the most faithful
/// output, under a second a face on 2 cores; more `--steps` add sharper but invented detail.
pub const CPU_DEFAULT_RESIDUAL: (&str, usize) = ("dpm1", 2);

/// The sampler (and, if it fixes one, the step count) that a model gets on the CPU without
/// `--sampler`: the paper's samplers take about half an hour a face there. None: keep the paper's.
pub fn cpu_default_sampler(config: &crate::model::NetConfig) -> Option<(&'static str, Option<usize>)> {
    if config.sde_schedule().name() != "ve" {
        return None;
    }
    Some(match config.model.parameterization.sigma_data() {
        Some(_) => (CPU_DEFAULT_RESIDUAL.0, Some(CPU_DEFAULT_RESIDUAL.1)),
        None => (CPU_DEFAULT_SAMPLER, None),
    })
}

/// Frames of x̄ in the `--trajectory` animation (after the LR guide), spread evenly over the steps.
pub const TRAJECTORY_FRAMES: usize = 50;
/// Display time of one trajectory frame.
const TRAJECTORY_DELAY_MS: u32 = 80;
/// The final picture is repeated this many times so the animation rests on it (~1 s).
const TRAJECTORY_HOLD: usize = 12;
/// Plain (non-terminal) progress lines: at every tenth of the work, and at least this often.
const PLAIN_LOG_EVERY: Duration = Duration::from_secs(30);

/// `--langevin-norm`: how the Langevin corrector measures its step size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LangevinNormArg {
    /// One step size per image (an image's result does not depend on its batch).
    PerImage,
    /// One step size for the whole batch, as the original code.
    Batch,
}

impl From<LangevinNormArg> for LangevinNorm {
    fn from(a: LangevinNormArg) -> Self {
        match a {
            LangevinNormArg::PerImage => LangevinNorm::PerImage,
            LangevinNormArg::Batch => LangevinNorm::Batch,
        }
    }
}

/// `--crop`: what to do with a non-square input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CropArg {
    /// Refuse it (the face must be cropped by the user).
    None,
    /// Keep the largest centred square.
    Center,
}

impl From<CropArg> for CropMode {
    fn from(a: CropArg) -> Self {
        match a {
            CropArg::None => CropMode::Reject,
            CropArg::Center => CropMode::Center,
        }
    }
}

/// Everything `srsde-fast upscale` takes except the device (the caller picks the backend).
#[derive(Args, Clone, Debug)]
pub struct UpscaleOptions {
    /// Images (PNG, JPEG, WebP, BMP) or folders of them (searched recursively, in sorted order).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder (created if missing): `{stem}_sr.png` and its provenance `{stem}_sr.json` per face.
    #[arg(short = 'o', long = "out-dir", value_name = "OUTDIR")]
    pub out_dir: PathBuf,
    /// Weights: a .safetensors file with its config (see `convert`), a sharded export folder (see
    /// `export --shard-mib`) or the original checkpoint .pth [default: $SRSDE_MODEL, else the model
    /// bundled in the binary].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sampler preset [default: the paper's for the model's SDE: sde-ve-cs for VE, sde-vp / sde-subvp;
    /// on the CPU a fast one for VE models: dpm1 with 2 evaluations for guide-residual models such as
    /// the bundled one, dpm2 for the paper's].
    ///
    /// The paper's samplers (sde-*) run the predictor–corrector loop for N steps. The fast ones
    /// (ode-heun, dpm*) solve the probability-flow ODE on a Karras noise schedule (--rho) and end with a
    /// denoising step; for them --steps counts network evaluations, and --churn makes them stochastic.
    #[arg(long, value_parser = sampler_value_parser())]
    pub sampler: Option<String>,
    /// PC samplers: number of time steps N [default: the model config's num_scales]. Fast samplers:
    /// number of network evaluations, exactly [default: the preset's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Fast samplers: churn in [0, 1] between the deterministic probability-flow ODE (0) and the full
    /// reverse SDE (1) [default: 0].
    #[arg(long, value_name = "S")]
    pub churn: Option<f64>,
    /// Fast samplers: Karras' ρ of the noise schedule; larger puts more steps at low noise, `inf` is
    /// uniform in log σ [default: 7 for ode-heun, inf for dpm*].
    #[arg(long)]
    pub rho: Option<f64>,
    /// Langevin corrector signal-to-noise ratio [default: 0.075] (samplers with a corrector only).
    #[arg(long)]
    pub snr: Option<f64>,
    /// How the Langevin step size measures norms.
    #[arg(long, value_enum, default_value = "per-image")]
    pub langevin_norm: LangevinNormArg,
    /// Random seed [default: from the clock]; printed on every run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hypotheses per face (K > 1 writes `{stem}_sr_{k}.png`, k = 0..K-1). Given (even as 1), also
    /// writes their per-pixel mean `{stem}_mean.png`, standard deviation `{stem}_std.png` (a heat
    /// map, its scale in the provenance) and the strip LR | hypotheses | mean | std `{stem}_strip.png`.
    #[arg(long, value_name = "K")]
    pub samples: Option<usize>,
    /// The std (in intensity levels, 0–255) at the top of the std heat map's colours [default: per
    /// face, its largest std rounded up to a round number; fix it to compare faces].
    #[arg(long, value_name = "LEVELS")]
    pub std_scale: Option<f64>,
    /// Faces (× hypotheses) sampled together; larger is faster on a GPU.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Write the denoising animation of the first face (GIF) to this file.
    #[arg(long, value_name = "GIF")]
    pub trajectory: Option<PathBuf>,
    /// Also write the network's guide, the bicubic upsampling of the LR face, as `{stem}_lr.png`.
    #[arg(long)]
    pub save_lr: bool,
    /// What to do with non-square inputs.
    #[arg(long, value_enum, default_value = "none")]
    pub crop: CropArg,
    /// Super-resolve what decodes of a truncated or corrupt image (the missing part grey) instead of
    /// refusing it; its provenance records that the input was partial.
    #[arg(long)]
    pub accept_truncated: bool,
    /// Noise numbering of the first input: input i draws the noise of position N + i (`info` uses it
    /// to reproduce one face of a folder run on its own).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub first_index: usize,
    /// Print one JSON object per face on stdout (JSON Lines: input, outputs, timings, consistency,
    /// error); the log goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
}

impl UpscaleOptions {
    /// Options with the command line's defaults.
    pub fn new(inputs: Vec<PathBuf>, out_dir: PathBuf, model: Option<PathBuf>) -> Self {
        UpscaleOptions {
            inputs,
            out_dir,
            model,
            sampler: None,
            steps: None,
            churn: None,
            rho: None,
            snr: None,
            langevin_norm: LangevinNormArg::PerImage,
            seed: None,
            samples: None,
            std_scale: None,
            batch: 1,
            trajectory: None,
            save_lr: false,
            crop: CropArg::None,
            accept_truncated: false,
            first_index: 0,
            json: false,
            force: false,
        }
    }

    /// Hypotheses per face (K): `--samples`, else 1.
    pub fn hypotheses(&self) -> usize {
        self.samples.unwrap_or(1)
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct UpscaleReport {
    /// The seed used (given or drawn from the clock).
    pub seed: u64,
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
    /// Inputs (or outputs) that failed, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// One summary per input face (what `--json` prints), in the order they finished.
    pub faces: Vec<FaceLine>,
}

impl UpscaleReport {
    /// `Ok` when nothing failed; otherwise an error naming the failed files (for the exit code).
    pub fn into_result(self) -> Result<()> {
        if self.failed.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self.failed.iter().map(|(p, _)| p.display().to_string()).collect();
        Err(Error::Other(format!(
            "{} file(s) failed: {} (wrote {} file(s))",
            names.len(),
            names.join(", "),
            self.written.len()
        )))
    }
}

/// One face in the machine-readable run summary (`--json`, one line each).
#[derive(Clone, Debug, Serialize)]
pub struct FaceLine {
    /// The input as given (or found in a folder).
    pub input: String,
    /// Its noise index (absent when the input was never read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Whether every file of the face was written.
    pub ok: bool,
    /// The files written for it.
    pub outputs: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hypotheses: Vec<HypothesisLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<UncertaintyInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// What went wrong (null when nothing did).
    pub error: Option<String>,
}

/// One hypothesis in a [`FaceLine`].
#[derive(Clone, Debug, Serialize)]
pub struct HypothesisLine {
    pub k: usize,
    /// Its PNG (absent when it could not be written).
    pub file: Option<String>,
    pub item_seed: u64,
    /// LR consistency (MSE, 0–255 scale, of the SR shrunk to 16×16 vs the input).
    pub consistency: f64,
}

/// Wall-clock seconds spent on a face (its share of the batches it was sampled in).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timings {
    pub sampling_s: f64,
    pub writing_s: f64,
}

impl FaceLine {
    fn failed(input: &Path, index: Option<usize>, error: String, timings: Option<Timings>) -> FaceLine {
        FaceLine {
            input: input.display().to_string(),
            index,
            ok: false,
            outputs: Vec::new(),
            hypotheses: Vec::new(),
            uncertainty: None,
            timings,
            error: Some(error),
        }
    }
}

/// The noise seed of hypothesis `k` of input `index`: a SplitMix64 hash of
/// (seed, index, k), so every face and hypothesis gets its own, unrelated noise stream.
pub fn item_seed(seed: u64, index: usize, k: usize) -> u64 {
    mix64(mix64(mix64(seed) ^ index as u64) ^ (k as u64).rotate_left(32))
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed from the clock and the process id, kept to 32 bits so it is easy to type back.
fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    mix64(nanos ^ ((std::process::id() as u64) << 40)) >> 32
}

/// Where the human log goes: stdout, or stderr with `--json` (stdout then holds only JSON lines).
#[derive(Clone, Copy, Debug)]
struct Log {
    json: bool,
}

impl Log {
    fn info(&self, msg: &str) {
        if self.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }

    fn face(&self, line: &FaceLine, report: &mut UpscaleReport) {
        if self.json {
            match serde_json::to_string(line) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("error: JSON summary of {}: {e}", line.input),
            }
        }
        report.faces.push(line.clone());
    }
}

/// One readable input face.
struct Face {
    path: PathBuf,
    /// Noise index: `--first-index` + position in the (deduplicated) input list.
    index: usize,
    /// The 16×16 LR, CHW in [0,1].
    lr: Vec<f32>,
    gray: bool,
    /// For the provenance: the file's absolute path and SHA-256, what was partial about it, notes.
    abs: String,
    sha256: String,
    partial: Option<String>,
    notes: Vec<String>,
    out: Outputs,
}

/// The files of one face.
#[derive(Default)]
struct Outputs {
    /// `sr[k]` for hypothesis k.
    sr: Vec<PathBuf>,
    /// The provenance sidecar `{stem}_sr.json`.
    sidecar: PathBuf,
    /// `--save-lr`: the guide.
    lr: Option<PathBuf>,
    /// `--samples`: mean, std heat map, strip.
    mean: Option<PathBuf>,
    std: Option<PathBuf>,
    strip: Option<PathBuf>,
}

impl Outputs {
    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        self.sr
            .iter()
            .chain(&self.lr)
            .chain(&self.mean)
            .chain(&self.std)
            .chain(&self.strip)
            .chain(std::iter::once(&self.sidecar))
    }
}

/// A face's hypotheses as they come out of the batches.
struct Pending {
    outs: Vec<Option<Vec<f32>>>,
    sampling_s: f64,
}

/// Runs `srsde-fast upscale` on `backend`, printing the seed, model, sampler, device, notes and
/// progress. Per-file problems (unreadable or partial inputs, non-finite samples, failed writes)
/// are reported and collected in the report (the caller turns them into the exit code with
/// [`UpscaleReport::into_result`]); bad options, existing outputs, the model and the device are
/// errors.
pub fn run<B: Backend>(opts: &UpscaleOptions, backend: &B) -> Result<UpscaleReport> {
    let log = Log { json: opts.json };
    // `--model` or the default model (see crate::model::default); resolved first so a missing
    // model fails before anything is read or written.
    let model_source = crate::model::default::resolve(opts.model.as_deref())?;
    let samples = opts.hypotheses();
    if samples == 0 || opts.batch == 0 {
        return Err(Error::Config("--samples and --batch must be at least 1".into()));
    }
    if opts.steps.is_some_and(|n| n < 2) {
        return Err(Error::Config("--steps must be at least 2".into()));
    }
    if opts.std_scale.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err(Error::Config(
            "--std-scale must be a positive number of intensity levels".into(),
        ));
    }
    let poison = match std::env::var(POISON_ENV) {
        Ok(v) => Some(
            v.trim()
                .parse::<usize>()
                .map_err(|_| Error::Config(format!("{POISON_ENV}={v}: expected a face index")))?,
        ),
        Err(_) => None,
    };
    let seed = opts.seed.unwrap_or_else(clock_seed);
    match opts.seed {
        Some(_) => log.info(&format!("seed: {seed}")),
        None => log.info(&format!(
            "seed: {seed} (from the clock; pass --seed {seed} to repeat this run)"
        )),
    }
    let mut report = UpscaleReport {
        seed,
        ..Default::default()
    };

    // 1. Inputs.
    let files = collect_inputs(&opts.inputs, &mut report, log);
    let mut faces = load_faces(&files, opts, &mut report, log);
    if faces.is_empty() {
        if report.failed.is_empty() {
            return Err(Error::Config(format!(
                "no images (png, jpg, jpeg, webp, bmp) found in {}",
                list_paths(&opts.inputs)
            )));
        }
        eprintln!("error: none of the inputs could be read");
        return Ok(report);
    }

    // 2. Outputs: all named and checked before any long work.
    plan_outputs(&mut faces, opts)?;

    // 3. Model and sampler.
    let lw = crate::model::default::load_source(&model_source)?;
    let net = crate::model::Ncsnpp::from_weights(backend, lw.config, &lw.weights, &model_source.describe())?;
    for n in lw.notes {
        eprintln!("note: {n}");
    }
    let centered = net.config.data.centered;
    let size = net.config.data.image_size;
    let form = match net.config.model.parameterization.sigma_data() {
        Some(sd) => format!(", guide-residual σ_d {sd:.4}"),
        None => String::new(),
    };
    let summary = format!(
        "{} SDE{form}, nf {}, ch_mult {:?}, {} res-blocks per level, {} parameters, {size}×{size}, data in {}",
        net.config.sde_schedule().name(),
        net.config.model.nf,
        net.config.model.ch_mult,
        net.config.model.num_res_blocks,
        net.num_params(),
        if centered { "[-1,1]" } else { "[0,1]" }
    );
    log.info(&format!(
        "model: {} ({} SDE{form}, nf {}, {} parameters, data in {})",
        model_source.describe(),
        net.config.sde_schedule().name(),
        net.config.model.nf,
        net.num_params(),
        if centered { "[-1,1]" } else { "[0,1]" }
    ));
    let (model_sha, hashed) = model_source.sha256()?;
    let model_info = ModelInfo {
        source: match &model_source {
            crate::model::default::ModelSource::Embedded => "embedded".to_string(),
            crate::model::default::ModelSource::Path(p) => absolute(p),
        },
        sha256: model_sha,
        hashed: hashed.to_string(),
        summary,
    };
    let model = ScoreModel::new(net);
    // On a CPU the paper's sampler (2000 predictor–corrector steps, 4000 network evaluations) takes
    // about half an hour per face, so without --sampler a VE model samples with a fast one there.
    let cpu_default;
    let opts = match cpu_default_sampler(&model.net.config) {
        Some((sampler, steps)) if opts.sampler.is_none() && backend.is_cpu() => {
            cpu_default = UpscaleOptions {
                sampler: Some(sampler.to_string()),
                steps: opts.steps.or(steps),
                ..opts.clone()
            };
            eprintln!(
                "note: on the CPU the default sampler is {sampler} (fast); --sampler sde-ve-cs runs the paper's"
            );
            &cpu_default
        }
        _ => opts,
    };
    let (name, cfg) = sampler_config(opts, &model.sde)?;
    log.info(&format!("sampler: {}", describe_sampler(&name, &cfg)));
    log.info(&format!("device: {}", backend.name()));
    let langevin = cfg.corrector == CorrectorKind::Langevin;
    let batch_coupled = langevin && cfg.langevin_norm == LangevinNorm::Batch;
    if opts.batch > 1 && batch_coupled && faces.len() * samples > 1 {
        eprintln!(
            "note: --langevin-norm batch couples the faces of a batch (as the original): a result depends \
             on its batch companions"
        );
    }
    let writer = FaceWriter {
        opts,
        size,
        seed,
        samples,
        backend: if backend.is_cpu() { "cpu" } else { "cuda" },
        precision: backend.precision_name(),
        model: model_info,
        sampler: SamplerInfo {
            name: name.clone(),
            description: describe_sampler(&name, &cfg),
            steps: cfg.steps,
            nfe: cfg.nfe(),
            snr: langevin.then_some(cfg.snr),
            langevin_norm: langevin.then(|| {
                match cfg.langevin_norm {
                    LangevinNorm::PerImage => "per-image",
                    LangevinNorm::Batch => "batch",
                }
                .to_string()
            }),
            churn: cfg.fast.map(|f| f.churn),
            rho: cfg.fast.map(|f| f.rho.to_string()),
        },
        device_name: backend.name(),
        cuda_graph: (!backend.is_cpu()).then(crate::sample::graph::cuda_graphs_enabled),
        batch_coupled,
    };

    // 4. Sampling.
    let items: Vec<(usize, usize)> = (0..faces.len())
        .flat_map(|f| (0..samples).map(move |k| (f, k)))
        .collect();
    let n_batches = items.len().div_ceil(opts.batch);
    log.info(&format!(
        "upscaling {} face(s) × {} sample(s) in {n_batches} batch(es) of up to {}, {} {} each → {}",
        faces.len(),
        samples,
        opts.batch,
        cfg.steps,
        if cfg.fast.is_some() {
            "network evaluations"
        } else {
            "steps"
        },
        opts.out_dir.display()
    ));
    let frame_steps = trajectory_steps(cfg.steps);
    let started = Instant::now();
    let mut progress = Progress::new((items.len() * cfg.steps) as u64, log);
    let plane = 3 * size * size;
    let mut pending: HashMap<usize, Pending> = HashMap::new();
    for (b, chunk) in items.chunks(opts.batch).enumerate() {
        let batch_started = Instant::now();
        let n = chunk.len();
        let guides: Vec<Vec<f32>> = chunk
            .iter()
            .map(|&(f, _)| upsample_guide_chw(&faces[f].lr, LR_SIZE, LR_SIZE, size, size))
            .collect();
        let y_data: Vec<f32> = guides
            .iter()
            .flatten()
            .map(|&v| if centered { 2.0 * v - 1.0 } else { v })
            .collect();
        let y = backend.from_f32(&[n, 3, size, size], &y_data)?;
        let noise = NoiseStream::per_image(
            chunk
                .iter()
                .map(|&(f, k)| item_seed(seed, faces[f].index, k))
                .collect(),
        );
        // The trajectory follows the first face's first hypothesis: item 0 of batch 0.
        let mut frames: Option<Vec<(Vec<f32>, usize, usize)>> =
            (b == 0 && opts.trajectory.is_some()).then(|| vec![(guides[0].clone(), size, size)]);
        let x = sample_with_noise(
            backend,
            &model,
            &model.sde,
            &y,
            &cfg,
            noise,
            &mut |info: StepInfo<'_, B>| {
                progress.advance(n as u64);
                if let Some(frames) = frames.as_mut() {
                    if frame_steps.binary_search(&info.step).is_ok() {
                        let xm = backend.to_f32(info.x_mean)?;
                        frames.push((to_unit(&xm[..plane], centered), size, size));
                    }
                }
                Ok(())
            },
        )?;
        let mut out = to_unit(&backend.to_f32(&x)?, centered);
        if let Some(p) = poison {
            for (j, &(f, _)) in chunk.iter().enumerate() {
                if faces[f].index == p {
                    out[j * plane + plane / 2] = f32::NAN;
                }
            }
        }
        let share = batch_started.elapsed().as_secs_f64() / n as f64;

        if let (Some(mut frames), Some(path)) = (frames, &opts.trajectory) {
            let written = if out[..plane].iter().all(|v| v.is_finite()) {
                let last = frames.last().cloned().expect("the guide is the first frame");
                frames.extend(std::iter::repeat_n(last, TRAJECTORY_HOLD));
                io::encode_gif(&frames, TRAJECTORY_DELAY_MS)
                    .and_then(|gif| io::write_file(path, &gif, opts.force))
            } else {
                Err(Error::Other(format!(
                    "{}: not written: the first face's sample is not finite",
                    path.display()
                )))
            };
            record(path, written, &mut progress, &mut report);
        }
        for (j, &(f, k)) in chunk.iter().enumerate() {
            let p = pending.entry(f).or_insert_with(|| Pending {
                outs: vec![None; samples],
                sampling_s: 0.0,
            });
            p.outs[k] = Some(out[j * plane..][..plane].to_vec());
            p.sampling_s += share;
            if p.outs.iter().all(Option::is_some) {
                let p = pending.remove(&f).expect("the face is pending");
                let line = writer.finish(&faces[f], p, &mut progress, &mut report);
                log.face(&line, &mut report);
            }
        }
    }
    progress.finish();
    log.info(&format!(
        "done in {}: wrote {} file(s) to {}{}",
        human_duration(started.elapsed().as_secs_f64()),
        report.written.len(),
        opts.out_dir.display(),
        match report.failed.len() {
            0 => String::new(),
            n => format!("; {n} file(s) failed"),
        }
    ));
    Ok(report)
}

/// What every face's files share: the run's settings and the provenance parts that do not
/// depend on the face.
struct FaceWriter<'a> {
    opts: &'a UpscaleOptions,
    size: usize,
    seed: u64,
    samples: usize,
    backend: &'static str,
    precision: &'static str,
    model: ModelInfo,
    sampler: SamplerInfo,
    device_name: String,
    cuda_graph: Option<bool>,
    batch_coupled: bool,
}

impl FaceWriter<'_> {
    /// Checks a face's K hypotheses and writes its files; one summary line.
    fn finish(
        &self,
        face: &Face,
        p: Pending,
        progress: &mut Progress,
        report: &mut UpscaleReport,
    ) -> FaceLine {
        let started = Instant::now();
        let timings = |writing_s: f64| {
            Some(Timings {
                sampling_s: p.sampling_s,
                writing_s,
            })
        };
        let outs: Vec<Vec<f32>> = p.outs.iter().map(|o| o.clone().expect("complete")).collect();
        let fail = |msg: String, progress: &mut Progress, report: &mut UpscaleReport| {
            progress.eprintln(&format!("error: {msg}"));
            report.failed.push((face.path.clone(), msg.clone()));
            FaceLine::failed(&face.path, Some(face.index), msg, timings(0.0))
        };
        // No silent garbage: a NaN or infinity would be written as black.
        for (k, o) in outs.iter().enumerate() {
            let bad = o.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                let which = (self.samples > 1).then_some(k);
                let msg = non_finite_message(&face.path, which, bad, o.len(), self.backend, self.precision);
                return fail(msg, progress, report);
            }
        }
        match self.write_face(face, &outs, progress, report) {
            Ok((mut line, failed)) => {
                line.timings = timings(started.elapsed().as_secs_f64());
                if let Some(e) = failed {
                    line.ok = false;
                    line.error = Some(e);
                }
                line
            }
            Err(e) => fail(format!("{}: {e}", face.path.display()), progress, report),
        }
    }

    /// The provenance record shared by a face's files (role "face"; see [`Self::for_file`]).
    fn record(&self, face: &Face, consistencies: &[f64], unc: Option<UncertaintyInfo>) -> Provenance {
        let opts = self.opts;
        Provenance {
            format: FORMAT.into(),
            software: format!("srsde-fast {}", env!("CARGO_PKG_VERSION")),
            caution: CAUTION.into(),
            output: OutputInfo {
                role: "face".into(),
                hypothesis: None,
                consistency: None,
            },
            input: InputInfo {
                file: face.abs.clone(),
                sha256: face.sha256.clone(),
                partial: face.partial.clone(),
                notes: face.notes.clone(),
            },
            model: self.model.clone(),
            sampler: self.sampler.clone(),
            noise: NoiseInfo {
                seed: self.seed,
                index: face.index,
                samples: self.samples,
                uncertainty_maps: opts.samples.is_some(),
                batch: self.batch_coupled.then_some(opts.batch),
            },
            device: DeviceInfo {
                backend: self.backend.into(),
                name: self.device_name.clone(),
                precision: self.precision.into(),
                cuda_graph: self.cuda_graph,
                crop: match opts.crop {
                    CropArg::None => "none",
                    CropArg::Center => "center",
                }
                .into(),
                accept_truncated: opts.accept_truncated,
                std_scale: opts.std_scale,
                save_lr: opts.save_lr,
            },
            hypotheses: consistencies
                .iter()
                .enumerate()
                .map(|(k, &c)| HypothesisInfo {
                    k,
                    item_seed: item_seed(self.seed, face.index, k),
                    consistency: c,
                })
                .collect(),
            uncertainty: unc,
            reproduce: String::new(),
            files: Vec::new(),
        }
    }

    /// The face's record for one of its files, with the command that writes it again.
    fn for_file(
        base: &Provenance,
        role: &str,
        hypothesis: Option<usize>,
        consistency: Option<f64>,
    ) -> Provenance {
        let mut p = base.clone();
        p.output = OutputInfo {
            role: role.into(),
            hypothesis,
            consistency,
        };
        p.reproduce = p.reproduce_command();
        p
    }

    /// LR consistency of an 8-bit RGB picture (HWC) of the face.
    fn consistency(&self, face: &Face, rgb: &[u8]) -> Result<f64> {
        let chw = hwc_to_chw(rgb, self.size * self.size);
        consistency(
            FloatImage {
                data: &chw,
                channels: 3,
                height: self.size,
                width: self.size,
                layout: Layout::Chw,
            },
            FloatImage {
                data: &face.lr,
                channels: 3,
                height: LR_SIZE,
                width: LR_SIZE,
                layout: Layout::Chw,
            },
        )
    }

    /// Measures and writes a face's files: its hypotheses, guide, mean, std, strip and sidecar.
    /// Returns its summary line and, when some file could not be written, why.
    fn write_face(
        &self,
        face: &Face,
        outs: &[Vec<f32>],
        progress: &mut Progress,
        report: &mut UpscaleReport,
    ) -> Result<(FaceLine, Option<String>)> {
        let (size, force) = (self.size, self.opts.force);
        // The pictures as written (8-bit; gray ones as one channel), and as RGB for the measures.
        let px: Vec<Vec<u8>> = outs
            .iter()
            .map(|o| io::image::to_u8_pixels(o, 3, size, size, face.gray))
            .collect::<Result<_>>()?;
        let rgb: Vec<Vec<u8>> = px.iter().map(|p| as_rgb(p, face.gray)).collect();
        let consistencies: Vec<f64> = rgb
            .iter()
            .map(|r| self.consistency(face, r))
            .collect::<Result<_>>()?;
        let refs: Vec<&[u8]> = rgb.iter().map(|r| r.as_slice()).collect();
        let spread = self.opts.samples.is_some().then(|| Spread::of(&refs, size, size));
        let unc = spread.as_ref().map(|s| UncertaintyInfo {
            std_scale: self
                .opts
                .std_scale
                .unwrap_or_else(|| uncertainty::nice_scale(s.max_std())),
            mean_std: s.mean_std(),
            max_std: s.max_std(),
            colormap: uncertainty::COLORMAP.into(),
            strip_hypotheses: refs.len().min(uncertainty::STRIP_MAX_HYPOTHESES),
        });
        let base = self.record(face, &consistencies, unc.clone());

        let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        let png = |p: &Provenance, px: &[u8], gray: bool| -> Result<Vec<u8>> {
            io::encode_png_u8(px, size, size, gray, &[(PNG_KEY, &p.to_json()?)])
        };
        for (k, path) in face.out.sr.iter().enumerate() {
            let p = Self::for_file(&base, "sr", Some(k), Some(consistencies[k]));
            files.push((path.clone(), png(&p, &px[k], face.gray)?));
        }
        if let Some(path) = &face.out.lr {
            let guide = upsample_guide_chw(&face.lr, LR_SIZE, LR_SIZE, size, size);
            let p = Self::for_file(&base, "lr", None, None);
            let bytes =
                io::encode_png_with_text(&guide, 3, size, size, face.gray, &[(PNG_KEY, &p.to_json()?)])?;
            files.push((path.clone(), bytes));
        }
        if let (Some(s), Some(u)) = (&spread, &unc) {
            let mean_px = io::image::to_u8_pixels(&s.mean_chw(), 3, size, size, face.gray)?;
            let mean_rgb = as_rgb(&mean_px, face.gray);
            let mean_consistency = self.consistency(face, &mean_rgb)?;
            let heat = s.heat_map(u.std_scale);
            if let Some(path) = &face.out.mean {
                let p = Self::for_file(&base, "mean", None, Some(mean_consistency));
                files.push((path.clone(), png(&p, &mean_px, face.gray)?));
            }
            if let Some(path) = &face.out.std {
                let p = Self::for_file(&base, "std", None, None);
                files.push((path.clone(), png(&p, &heat, false)?));
            }
            if let Some(path) = &face.out.strip {
                let lr_px = io::image::to_u8_pixels(&face.lr, 3, LR_SIZE, LR_SIZE, false)?;
                let lr_big = uncertainty::enlarge_nearest(&lr_px, LR_SIZE, LR_SIZE, size);
                let cv = uncertainty::strip(&lr_big, &refs, &mean_rgb, &heat, u.std_scale, size);
                let p = Self::for_file(&base, "strip", None, None);
                let bytes =
                    io::encode_png_u8(&cv.rgb, cv.width, cv.height, false, &[(PNG_KEY, &p.to_json()?)])?;
                files.push((path.clone(), bytes));
            }
        }

        let mut line = FaceLine {
            input: face.path.display().to_string(),
            index: Some(face.index),
            ok: true,
            outputs: Vec::new(),
            hypotheses: Vec::new(),
            uncertainty: unc,
            timings: None,
            error: None,
        };
        let mut failed: Vec<String> = Vec::new();
        let mut names = Vec::new();
        for (path, bytes) in files {
            let written = io::write_file(&path, &bytes, force);
            if let Err(e) = &written {
                failed.push(e.to_string());
            } else {
                line.outputs.push(path.display().to_string());
                names.push(file_name(&path));
            }
            record(&path, written, progress, report);
        }
        // The sidecar: the face's record, listing the files written.
        let mut side = base;
        side.reproduce = side.reproduce_command();
        side.files = names;
        let sidecar = serde_json::to_string_pretty(&side)
            .map_err(|e| Error::Other(format!("provenance JSON: {e}")))
            .and_then(|s| io::write_file(&face.out.sidecar, format!("{s}\n").as_bytes(), force));
        if let Err(e) = &sidecar {
            failed.push(e.to_string());
        } else {
            line.outputs.push(face.out.sidecar.display().to_string());
        }
        record(&face.out.sidecar, sidecar, progress, report);
        line.hypotheses = consistencies
            .iter()
            .enumerate()
            .map(|(k, &c)| HypothesisLine {
                k,
                file: line
                    .outputs
                    .contains(&face.out.sr[k].display().to_string())
                    .then(|| face.out.sr[k].display().to_string()),
                item_seed: item_seed(self.seed, face.index, k),
                consistency: c,
            })
            .collect();
        Ok((line, (!failed.is_empty()).then(|| failed.join("; "))))
    }
}

/// The error for a face whose sample `which` (None: the only one) holds `bad` non-finite values of
/// `total`: it names the face and, after reduced-precision arithmetic, the precision and the way
/// out.
pub fn non_finite_message(
    face: &Path,
    which: Option<usize>,
    bad: usize,
    total: usize,
    backend: &str,
    precision: &str,
) -> String {
    let which = match which {
        Some(k) => format!("hypothesis {k}"),
        None => "the sample".to_string(),
    };
    let why = if precision != "f32" {
        format!(
            "the {backend} backend computed in reduced precision ({precision}), whose range or rounding \
             can overflow: rerun with --precision f32"
        )
    } else {
        "the model or the sampler diverged on it (check the weights; try another --sampler or other \
         --steps)"
            .to_string()
    };
    format!(
        "{}: {which} came out non-finite ({bad} of {total} values NaN or infinite), so nothing was \
         written for this face; {why}",
        face.display()
    )
}

/// 8-bit pixels as written (RGB, or one gray channel) → RGB.
fn as_rgb(px: &[u8], gray: bool) -> Vec<u8> {
    if gray {
        px.iter().flat_map(|&v| [v, v, v]).collect()
    } else {
        px.to_vec()
    }
}

/// HWC RGB bytes → CHW floats in [0,1].
fn hwc_to_chw(rgb: &[u8], pixels: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; 3 * pixels];
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * pixels + p] = px[c] as f32 / 255.0;
        }
    }
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `p` as an absolute path (canonical when it exists), for provenance records.
fn absolute(p: &Path) -> String {
    p.canonicalize()
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Expands files and folders; a missing input is reported and skipped. The same file named twice
/// (say, as a file and inside a folder) is sampled once.
fn collect_inputs(inputs: &[PathBuf], report: &mut UpscaleReport, log: Log) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for input in inputs {
        match io::collect_images(std::slice::from_ref(input)) {
            Ok(found) => {
                for f in found {
                    let key = f.canonicalize().unwrap_or_else(|_| f.clone());
                    if seen.insert(key) {
                        files.push(f);
                    } else {
                        eprintln!("note: {} given twice; upscaling it once", f.display());
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                report.failed.push((input.clone(), e.to_string()));
                log.face(&FaceLine::failed(input, None, e.to_string(), None), report);
            }
        }
    }
    files
}

/// Reads the LR faces, printing each file's notes; an unreadable file (or one that decodes only in
/// part, without `--accept-truncated`) is reported and skipped.
fn load_faces(files: &[PathBuf], opts: &UpscaleOptions, report: &mut UpscaleReport, log: Log) -> Vec<Face> {
    let partial = if opts.accept_truncated {
        Partial::Accept
    } else {
        Partial::Reject
    };
    let mut faces = Vec::new();
    for (pos, path) in files.iter().enumerate() {
        let index = opts.first_index + pos;
        let loaded = io::load_lr_face_with(path, opts.crop.into(), partial).and_then(|face| {
            // The provenance names the bytes: hashed from the file as it is now.
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            Ok((face, crate::model::sha256::sha256_hex(&bytes)))
        });
        match loaded {
            Ok((face, sha256)) => {
                for note in &face.notes {
                    eprintln!("note: {}: {note}", path.display());
                }
                faces.push(Face {
                    path: path.clone(),
                    index,
                    lr: face.pixels,
                    gray: face.gray,
                    abs: absolute(path),
                    sha256,
                    partial: face.partial,
                    notes: face.notes,
                    out: Outputs::default(),
                });
            }
            Err(e) => {
                eprintln!("error: {e}");
                report.failed.push((path.clone(), e.to_string()));
                log.face(&FaceLine::failed(path, Some(index), e.to_string(), None), report);
            }
        }
    }
    faces
}

/// Names every output file and checks, before any sampling, that none of them exists (unless
/// `--force`) and that no two coincide; creates the output folder.
fn plan_outputs(faces: &mut [Face], opts: &UpscaleOptions) -> Result<()> {
    let paths: Vec<PathBuf> = faces.iter().map(|f| f.path.clone()).collect();
    let stems = unique_stems(&paths);
    let dir = &opts.out_dir;
    for (face, stem) in faces.iter_mut().zip(&stems) {
        let plain = file_stem(&face.path);
        if *stem != plain {
            eprintln!(
                "note: {}: several inputs are named `{plain}`; its outputs are named `{stem}_…`",
                face.path.display()
            );
        }
        let maps = opts.samples.is_some();
        face.out = Outputs {
            sr: if opts.hypotheses() == 1 {
                vec![dir.join(format!("{stem}_sr.png"))]
            } else {
                (0..opts.hypotheses())
                    .map(|k| dir.join(format!("{stem}_sr_{k}.png")))
                    .collect()
            },
            sidecar: dir.join(format!("{stem}_sr.json")),
            lr: opts.save_lr.then(|| dir.join(format!("{stem}_lr.png"))),
            mean: maps.then(|| dir.join(format!("{stem}_mean.png"))),
            std: maps.then(|| dir.join(format!("{stem}_std.png"))),
            strip: maps.then(|| dir.join(format!("{stem}_strip.png"))),
        };
    }
    let all: Vec<&PathBuf> = faces
        .iter()
        .flat_map(|f| f.out.all())
        .chain(&opts.trajectory)
        .collect();
    let mut seen = HashSet::new();
    if let Some(dup) = all.iter().find(|p| !seen.insert(**p)) {
        return Err(Error::Config(format!(
            "{} would be written twice (is --trajectory one of the outputs?)",
            dup.display()
        )));
    }
    let existing: Vec<&PathBuf> = all
        .iter()
        .copied()
        .filter(|p| io::check_new(p, opts.force).is_err())
        .collect();
    if !existing.is_empty() {
        const SHOWN: usize = 5;
        let mut names = list_paths(&existing[..existing.len().min(SHOWN)]);
        if existing.len() > SHOWN {
            names += &format!(" and {} more", existing.len() - SHOWN);
        }
        return Err(Error::Other(format!(
            "output file(s) exist: {names}; pass --force to overwrite them (nothing was written)"
        )));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    if let Some(parent) = opts.trajectory.as_ref().and_then(|t| t.parent()) {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
    }
    Ok(())
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Output stems that tell the inputs apart: the file stem when it is unique; otherwise, for every
/// input sharing it, the stem prefixed with as many parent folder names as needed (`a_face`,
/// `b_face`), then the extension appended (`face_png`, `face_jpg`), then a counter as the last resort.
pub fn unique_stems(paths: &[PathBuf]) -> Vec<String> {
    // Candidates per path, from the plainest to the most specific.
    let candidates: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let stem = file_stem(p);
            let parents: Vec<String> = p
                .parent()
                .into_iter()
                .flat_map(|d| d.components().rev())
                .filter_map(|c| match c {
                    std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            let mut c = vec![stem.clone()];
            let mut name = stem;
            for dir in &parents {
                name = format!("{dir}_{name}");
                c.push(name.clone());
            }
            if let Some(ext) = p.extension() {
                c.push(format!("{name}_{}", ext.to_string_lossy()));
            }
            c
        })
        .collect();
    let mut level = vec![0usize; paths.len()];
    loop {
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, c) in candidates.iter().enumerate() {
            groups.entry(c[level[i]].as_str()).or_default().push(i);
        }
        let mut changed = false;
        for members in groups.values().filter(|m| m.len() > 1) {
            for &i in members {
                if level[i] + 1 < candidates[i].len() {
                    level[i] += 1;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut out: Vec<String> = (0..paths.len())
        .map(|i| candidates[i][level[i]].clone())
        .collect();
    let mut taken: HashSet<String> = HashSet::new();
    for name in out.iter_mut() {
        if !taken.insert(name.clone()) {
            let base = name.clone();
            *name = (2..)
                .map(|n| format!("{base}_{n}"))
                .find(|c| !taken.contains(c))
                .expect("an unused counter");
            taken.insert(name.clone());
        }
    }
    out
}

/// The sampler: the named preset (or the paper's for this SDE) with the options' overrides.
fn sampler_config(opts: &UpscaleOptions, sde: &Sde) -> Result<(String, SamplerConfig)> {
    let name = opts.sampler.clone().unwrap_or_else(|| {
        match sde {
            Sde::Ve(_) => "sde-ve-cs",
            Sde::Vp(_) => "sde-vp",
            Sde::SubVp(_) => "sde-subvp",
        }
        .to_string()
    });
    let mut cfg = SamplerConfig::preset(&name, sde)?;
    if let Some(n) = opts.steps {
        cfg.steps = n;
    }
    if let Some(snr) = opts.snr {
        if cfg.corrector == CorrectorKind::None {
            eprintln!("note: --snr has no effect: sampler {name} has no Langevin corrector");
        }
        cfg.snr = snr;
    }
    cfg.langevin_norm = opts.langevin_norm.into();
    fast_overrides(&mut cfg, &name, opts.churn, opts.rho)?;
    cfg.validate()?;
    Ok((name, cfg))
}

/// The `--sampler` values, each with its one-line help (shown by `--help`).
pub fn sampler_value_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        PRESETS
            .iter()
            .map(|&p| clap::builder::PossibleValue::new(p).help(preset_help(p))),
    )
}

/// Applies `--churn` and `--rho` to a fast sampler; for a PC sampler they are an error.
pub fn fast_overrides(
    cfg: &mut SamplerConfig,
    name: &str,
    churn: Option<f64>,
    rho: Option<f64>,
) -> Result<()> {
    match cfg.fast.as_mut() {
        Some(fast) => {
            fast.churn = churn.unwrap_or(fast.churn);
            fast.rho = rho.unwrap_or(fast.rho);
            Ok(())
        }
        None if churn.is_some() || rho.is_some() => Err(Error::Config(format!(
            "--churn and --rho apply to the fast samplers (ode-heun, dpm1, dpm2, dpm3), not to {name}"
        ))),
        None => Ok(()),
    }
}

/// One line saying what the sampler does and costs.
pub fn describe_sampler(name: &str, cfg: &SamplerConfig) -> String {
    if let Some(fast) = &cfg.fast {
        return format!(
            "{name}: {}, ρ {} noise schedule, {}, {} network evaluations per face",
            fast.solver.describe(),
            fast.rho,
            if fast.churn == 0.0 {
                "deterministic (churn 0)".to_string()
            } else {
                format!("churn {}", fast.churn)
            },
            cfg.steps
        );
    }
    let predictor = match cfg.predictor {
        PredictorKind::ReverseDiffusion => "reverse diffusion",
        PredictorKind::EulerMaruyama => "Euler–Maruyama",
        PredictorKind::None => "no predictor",
    };
    let corrector = match cfg.corrector {
        CorrectorKind::Langevin => format!(
            " + Langevin (snr {}, {} step(s), {} norm)",
            cfg.snr,
            cfg.corrector_steps,
            match cfg.langevin_norm {
                LangevinNorm::PerImage => "per-image",
                LangevinNorm::Batch => "batch",
            }
        ),
        CorrectorKind::None => String::new(),
    };
    format!(
        "{name}: {predictor}{corrector}, {} steps, {} network evaluations per face",
        cfg.steps,
        cfg.nfe()
    )
}

/// Step indices whose x̄ goes into the trajectory: up to [`TRAJECTORY_FRAMES`], evenly spread,
/// the last step always included (sorted, for binary search).
pub fn trajectory_steps(steps: usize) -> Vec<usize> {
    let frames = TRAJECTORY_FRAMES.min(steps);
    let mut v: Vec<usize> = (1..=frames).map(|f| f * steps / frames - 1).collect();
    v.dedup();
    v
}

/// Model data space → [0,1] (the inverse of the data scaler: (x+1)/2 for centred models).
fn to_unit(x: &[f32], centered: bool) -> Vec<f32> {
    if centered {
        x.iter().map(|&v| (v + 1.0) * 0.5).collect()
    } else {
        x.to_vec()
    }
}

fn record(path: &Path, written: Result<()>, progress: &mut Progress, report: &mut UpscaleReport) {
    match written {
        Ok(()) => {
            progress.println(&format!("wrote {}", path.display()));
            report.written.push(path.to_path_buf());
        }
        Err(e) => {
            progress.eprintln(&format!("error: {e}"));
            report.failed.push((path.to_path_buf(), e.to_string()));
        }
    }
}

fn list_paths<P: AsRef<Path>>(paths: &[P]) -> String {
    paths
        .iter()
        .map(|p| p.as_ref().display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Progress over images × steps: an indicatif bar on a terminal, plain log lines otherwise (on
/// stdout, or on stderr with `--json`).
enum Progress {
    Bar(ProgressBar),
    Plain {
        total: u64,
        done: u64,
        start: Instant,
        last_log: Instant,
        next_tenth: u64,
        log: Log,
    },
}

impl Progress {
    fn new(total: u64, log: Log) -> Self {
        let terminal = if log.json {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        };
        if terminal {
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} image-steps · {per_sec} · ETA {eta}",
            )
            .expect("valid progress template")
            .progress_chars("=> ");
            let target = if log.json {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::stdout()
            };
            Progress::Bar(ProgressBar::with_draw_target(Some(total), target).with_style(style))
        } else {
            let now = Instant::now();
            Progress::Plain {
                total,
                done: 0,
                start: now,
                last_log: now,
                next_tenth: 1,
                log,
            }
        }
    }

    fn advance(&mut self, n: u64) {
        match self {
            Progress::Bar(bar) => bar.inc(n),
            Progress::Plain {
                total,
                done,
                start,
                last_log,
                next_tenth,
                log,
            } => {
                *done += n;
                let tenth_reached = *done * 10 >= *next_tenth * *total;
                if tenth_reached || last_log.elapsed() >= PLAIN_LOG_EVERY {
                    while *next_tenth <= 10 && *done * 10 >= *next_tenth * *total {
                        *next_tenth += 1;
                    }
                    *last_log = Instant::now();
                    let secs = start.elapsed().as_secs_f64();
                    let rate = *done as f64 / secs.max(1e-9);
                    let eta = (*total - (*done).min(*total)) as f64 / rate.max(1e-12);
                    log.info(&format!(
                        "progress: {done}/{total} image-steps ({:.0}%), {rate:.2} image-steps/s, elapsed {}, ETA {}",
                        100.0 * *done as f64 / *total as f64,
                        human_duration(secs),
                        human_duration(eta)
                    ));
                }
            }
        }
    }

    fn println(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => bar.println(msg),
            Progress::Plain { log, .. } => log.info(msg),
        }
    }

    fn eprintln(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => bar.suspend(|| eprintln!("{msg}")),
            Progress::Plain { .. } => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            // The summary line that follows says what the bar said.
            bar.finish_and_clear();
        }
    }
}

/// "42s", "5m07s", "2h03m".
fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stems(paths: &[&str]) -> Vec<String> {
        unique_stems(&paths.iter().map(PathBuf::from).collect::<Vec<_>>())
    }

    #[test]
    fn stems_are_unique_and_plain_when_possible() {
        assert_eq!(stems(&["in/a.png", "in/b.jpg"]), ["a", "b"]);
        assert_eq!(
            stems(&["x/a/face.png", "x/b/face.png", "x/c/other.png"]),
            ["a_face", "b_face", "other"]
        );
        // Same folder, same stem: the extension tells them apart.
        assert_eq!(
            stems(&["in/face.png", "in/face.jpg"]),
            ["in_face_png", "in_face_jpg"]
        );
        // Equal after every rule: a counter.
        let s = stems(&["a/b_c.png", "a_b/c.png"]);
        assert_eq!(s.len(), 2);
        assert_ne!(s[0], s[1]);
    }

    #[test]
    fn seeds_differ_per_face_and_sample() {
        let s = [
            item_seed(1, 0, 0),
            item_seed(1, 1, 0),
            item_seed(1, 0, 1),
            item_seed(2, 0, 0),
        ];
        let set: HashSet<u64> = s.iter().copied().collect();
        assert_eq!(set.len(), s.len());
        assert_eq!(item_seed(7, 3, 2), item_seed(7, 3, 2));
    }

    #[test]
    fn trajectory_frames_spread_and_end_on_the_last_step() {
        let v = trajectory_steps(2000);
        assert_eq!(v.len(), TRAJECTORY_FRAMES);
        assert_eq!((v[0], *v.last().unwrap()), (39, 1999));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(trajectory_steps(3), [0, 1, 2]);
    }

    #[test]
    fn a_non_finite_sample_names_the_face_and_reduced_precision() {
        let f32_msg = non_finite_message(Path::new("in/b.png"), None, 3, 49152, "cpu", "f32");
        assert!(
            f32_msg.starts_with("in/b.png: the sample came out non-finite (3 of 49152"),
            "{f32_msg}"
        );
        assert!(f32_msg.contains("nothing was written") && !f32_msg.contains("--precision"));
        let bf16 = non_finite_message(Path::new("in/b.png"), Some(2), 1, 10, "cuda", "bf16");
        assert!(bf16.contains("hypothesis 2") && bf16.contains("bf16"), "{bf16}");
        assert!(bf16.contains("--precision f32"), "{bf16}");
        let tf32 = non_finite_message(Path::new("x.png"), None, 1, 10, "cuda", "tf32");
        assert!(
            tf32.contains("tf32") && tf32.contains("--precision f32"),
            "{tf32}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(42.2), "42s");
        assert_eq!(human_duration(307.0), "5m07s");
        assert_eq!(human_duration(7380.0), "2h03m");
    }
}
