//! `srsde-fast upscale`: super-resolve 16×16 faces to 128×128 with a trained score model.
//!
//! The steps, ordered so that the command fails early and never half-way through a long run:
//! 1. expand the inputs (files; folders recursively, sorted) and read every LR face — a file that
//!    cannot be read is reported by name and skipped, and the run fails at the end;
//! 2. name every output (`{stem}_sr.png`, `{stem}_sr_{k}.png`, `{stem}_lr.png`; equal stems from
//!    different folders are told apart) and refuse existing files unless `--force`, before the model
//!    is even loaded;
//! 3. load the model and pick the sampler (the paper's one for the model's SDE unless told);
//! 4. sample in batches of (face, hypothesis k) and write each batch's PNGs as soon as it is done.
//!
//! Noise: item (i, k) — hypothesis k of the face at position i of the input list — draws from its
//! own stream with seed [`item_seed`]`(seed, i, k)`, whatever batch it lands in. With per-image
//! Langevin norms (the default) a face's result therefore does not depend on `--batch` or on its
//! batch companions; `--langevin-norm batch` (the original's coupling) does depend on them.
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::degrade::upsample_guide_chw;
use crate::io::{self, CropMode, LR_SIZE};
use crate::model::ScoreModel;
use crate::sample::{
    preset_help, sample_with_noise, CorrectorKind, LangevinNorm, NoiseStream, PredictorKind, SamplerConfig,
    StepInfo, PRESETS,
};
use crate::sde::Sde;

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
    /// Output folder (created if missing): `{stem}_sr.png` per face.
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
    /// Hypotheses per face (K > 1 writes `{stem}_sr_{k}.png`, k = 0..K-1).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
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
            samples: 1,
            batch: 1,
            trajectory: None,
            save_lr: false,
            crop: CropArg::None,
            force: false,
        }
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

/// One readable input face.
struct Face {
    path: PathBuf,
    /// Position in the (deduplicated) input list: part of its noise seed.
    index: usize,
    /// The 16×16 LR, CHW in [0,1].
    lr: Vec<f32>,
    gray: bool,
    /// Output paths: `sr[k]` for hypothesis k, and the guide when `--save-lr`.
    sr: Vec<PathBuf>,
    lr_out: Option<PathBuf>,
}

/// Runs `srsde-fast upscale` on `backend`, printing the seed, model, sampler, device, notes and
/// progress. Per-file problems are reported and collected in the report (the caller turns them into
/// the exit code with [`UpscaleReport::into_result`]); bad options, existing outputs, the model and
/// the device are errors.
pub fn run<B: Backend>(opts: &UpscaleOptions, backend: &B) -> Result<UpscaleReport> {
    // `--model` or the default model (see crate::model::default); resolved first so a missing
    // model fails before anything is read or written.
    let model_source = crate::model::default::resolve(opts.model.as_deref())?;
    if opts.samples == 0 || opts.batch == 0 {
        return Err(Error::Config("--samples and --batch must be at least 1".into()));
    }
    if opts.steps.is_some_and(|n| n < 2) {
        return Err(Error::Config("--steps must be at least 2".into()));
    }
    let seed = opts.seed.unwrap_or_else(clock_seed);
    match opts.seed {
        Some(_) => println!("seed: {seed}"),
        None => println!("seed: {seed} (from the clock; pass --seed {seed} to repeat this run)"),
    }
    let mut report = UpscaleReport {
        seed,
        ..Default::default()
    };

    // 1. Inputs.
    let files = collect_inputs(&opts.inputs, &mut report);
    let mut faces = load_faces(&files, opts.crop.into(), &mut report);
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
    println!(
        "model: {} ({} SDE{form}, nf {}, {} parameters, data in {})",
        model_source.describe(),
        net.config.sde_schedule().name(),
        net.config.model.nf,
        net.num_params(),
        if centered { "[-1,1]" } else { "[0,1]" }
    );
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
    println!("sampler: {}", describe_sampler(&name, &cfg));
    println!("device: {}", backend.name());
    if opts.batch > 1 && cfg.langevin_norm == LangevinNorm::Batch && faces.len() * opts.samples > 1 {
        eprintln!(
            "note: --langevin-norm batch couples the faces of a batch (as the original): a result depends \
             on its batch companions"
        );
    }

    // 4. Sampling.
    let items: Vec<(usize, usize)> = (0..faces.len())
        .flat_map(|f| (0..opts.samples).map(move |k| (f, k)))
        .collect();
    let n_batches = items.len().div_ceil(opts.batch);
    println!(
        "upscaling {} face(s) × {} sample(s) in {n_batches} batch(es) of up to {}, {} {} each → {}",
        faces.len(),
        opts.samples,
        opts.batch,
        cfg.steps,
        if cfg.fast.is_some() {
            "network evaluations"
        } else {
            "steps"
        },
        opts.out_dir.display()
    );
    let frame_steps = trajectory_steps(cfg.steps);
    let started = Instant::now();
    let mut progress = Progress::new((items.len() * cfg.steps) as u64);
    let plane = 3 * size * size;
    for (b, chunk) in items.chunks(opts.batch).enumerate() {
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
        let out = to_unit(&backend.to_f32(&x)?, centered);

        for (j, &(f, k)) in chunk.iter().enumerate() {
            let face = &faces[f];
            let img = &out[j * plane..][..plane];
            save(
                &face.sr[k],
                img,
                size,
                face.gray,
                opts.force,
                &mut progress,
                &mut report,
            );
            if let (Some(lr_out), 0) = (&face.lr_out, k) {
                save(
                    lr_out,
                    &guides[j],
                    size,
                    face.gray,
                    opts.force,
                    &mut progress,
                    &mut report,
                );
            }
        }
        if let (Some(mut frames), Some(path)) = (frames, &opts.trajectory) {
            let last = frames.last().cloned().expect("the guide is the first frame");
            frames.extend(std::iter::repeat_n(last, TRAJECTORY_HOLD));
            let written = io::encode_gif(&frames, TRAJECTORY_DELAY_MS)
                .and_then(|gif| io::write_file(path, &gif, opts.force));
            record(path, written, &mut progress, &mut report);
        }
    }
    progress.finish();
    println!(
        "done in {}: wrote {} file(s) to {}{}",
        human_duration(started.elapsed().as_secs_f64()),
        report.written.len(),
        opts.out_dir.display(),
        match report.failed.len() {
            0 => String::new(),
            n => format!("; {n} file(s) failed"),
        }
    );
    Ok(report)
}

/// Expands files and folders; a missing input is reported and skipped. The same file named twice
/// (say, as a file and inside a folder) is sampled once.
fn collect_inputs(inputs: &[PathBuf], report: &mut UpscaleReport) -> Vec<PathBuf> {
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
            }
        }
    }
    files
}

/// Reads the LR faces, printing each file's notes; an unreadable file is reported and skipped.
fn load_faces(files: &[PathBuf], crop: CropMode, report: &mut UpscaleReport) -> Vec<Face> {
    let mut faces = Vec::new();
    for (index, path) in files.iter().enumerate() {
        match io::load_lr_face(path, crop) {
            Ok(face) => {
                for note in &face.notes {
                    eprintln!("note: {}: {note}", path.display());
                }
                faces.push(Face {
                    path: path.clone(),
                    index,
                    lr: face.pixels,
                    gray: face.gray,
                    sr: Vec::new(),
                    lr_out: None,
                });
            }
            Err(e) => {
                eprintln!("error: {e}");
                report.failed.push((path.clone(), e.to_string()));
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
    for (face, stem) in faces.iter_mut().zip(&stems) {
        let plain = file_stem(&face.path);
        if *stem != plain {
            eprintln!(
                "note: {}: several inputs are named `{plain}`; its outputs are named `{stem}_…`",
                face.path.display()
            );
        }
        face.sr = if opts.samples == 1 {
            vec![opts.out_dir.join(format!("{stem}_sr.png"))]
        } else {
            (0..opts.samples)
                .map(|k| opts.out_dir.join(format!("{stem}_sr_{k}.png")))
                .collect()
        };
        face.lr_out = opts.save_lr.then(|| opts.out_dir.join(format!("{stem}_lr.png")));
    }
    let all: Vec<&PathBuf> = faces
        .iter()
        .flat_map(|f| f.sr.iter().chain(&f.lr_out))
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

/// Writes one PNG (grayscale when the input was), recording success or failure.
fn save(
    path: &Path,
    chw: &[f32],
    size: usize,
    gray: bool,
    force: bool,
    progress: &mut Progress,
    report: &mut UpscaleReport,
) {
    let written = io::encode_png(chw, 3, size, size, gray).and_then(|png| io::write_file(path, &png, force));
    record(path, written, progress, report);
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

/// Progress over images × steps: an indicatif bar on a terminal, plain log lines otherwise.
enum Progress {
    Bar(ProgressBar),
    Plain {
        total: u64,
        done: u64,
        start: Instant,
        last_log: Instant,
        next_tenth: u64,
    },
}

impl Progress {
    fn new(total: u64) -> Self {
        if std::io::stdout().is_terminal() {
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} image-steps · {per_sec} · ETA {eta}",
            )
            .expect("valid progress template")
            .progress_chars("=> ");
            Progress::Bar(
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout()).with_style(style),
            )
        } else {
            let now = Instant::now();
            Progress::Plain {
                total,
                done: 0,
                start: now,
                last_log: now,
                next_tenth: 1,
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
                    println!(
                        "progress: {done}/{total} image-steps ({:.0}%), {rate:.2} image-steps/s, elapsed {}, ETA {}",
                        100.0 * *done as f64 / *total as f64,
                        human_duration(secs),
                        human_duration(eta)
                    );
                }
            }
        }
    }

    fn println(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => bar.println(msg),
            Progress::Plain { .. } => println!("{msg}"),
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
    fn durations() {
        assert_eq!(human_duration(42.2), "42s");
        assert_eq!(human_duration(307.0), "5m07s");
        assert_eq!(human_duration(7380.0), "2h03m");
    }
}
