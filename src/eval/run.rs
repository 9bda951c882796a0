//! `srsde-fast eval`: the paper's evaluation on a folder of HR faces.
//!
//! For every HR face (sorted, `--limit` first ones): the LR input is made as the paper does
//! (antialiased bilinear 128→16), the network's guide is its bicubic upsampling, and the face is
//! super-resolved `--samples` times by each method (the sampler, or one sampler per snr of
//! `--snr-sweep`). Metrics compare 8-bit images, quantised as saved PNGs: PSNR, SSIM, LR
//! consistency and the face-descriptor cosine CS (and L2). Two reference rows frame the table:
//! `bicubic` (the guide itself as the SR) and `HR vs HR` (the ground truth against itself).
//!
//! Resuming: `OUTDIR/eval_config.json` records the options that shape the results, and each face's
//! metrics are appended to `OUTDIR/results.jsonl` (one flushed line per face) as soon as they are
//! known. A rerun with the same options skips the faces already there; other options in the same
//! OUTDIR are an error unless `--force`, which starts over. The reports (`report.md`,
//! `report.json`, `per_image.csv`, the figures and the contact sheet) are rebuilt from the JSONL at
//! the end of every run, so a resumed run writes the same reports as an uninterrupted one.
//!
//! Noise: sample k of face i uses the stream [`item_seed`]`(seed, i, k)` (per-image Langevin norms),
//! so a face's result does not depend on `--batch`, on resuming, or on the snr (the sweep compares
//! snr values on the same noise).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::eval::face::{cosine, face_chip, l2, Descriptor, FaceNet};
use crate::eval::metrics::{consistency, psnr, ssim, FloatImage, ImageU8, Layout};
use crate::eval::plot;
use crate::eval::report::{self, ImageRecord, MethodRecord, MethodSummary, Metrics, SpreadRecord};
use crate::io::{self, CropMode};
use crate::model::ScoreModel;
use crate::sample::{sample_with_noise, CorrectorKind, LangevinNorm, NoiseStream, SamplerConfig};
use crate::sde::Sde;
use crate::uncertainty::Spread;
use crate::upscale::{fast_overrides, item_seed, sampler_value_parser};

/// Row name of the ground truth against itself.
pub const HR_VS_HR: &str = "HR vs HR";
/// Row name of the bicubic guide used as the SR.
pub const BICUBIC: &str = "bicubic";

/// Files in OUTDIR.
pub const CONFIG_FILE: &str = "eval_config.json";
pub const RESULTS_FILE: &str = "results.jsonl";
pub const REPORT_MD: &str = "report.md";
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_CSV: &str = "per_image.csv";
pub const FIG4_FILE: &str = "fig4_snr.png";
pub const FIG5_FILE: &str = "fig5_cs_psnr.png";
pub const SHEET_FILE: &str = "contact_sheet.png";
/// Folder of the SR tiles kept for the contact sheet (sample 0 of each method, first faces).
pub const SHEET_DIR: &str = "sheet";

/// Everything `srsde-fast eval` takes except the device.
#[derive(Args, Clone, Debug)]
pub struct EvalOptions {
    /// Weights: a .safetensors file with its config (see `convert`), a sharded export folder or the
    /// original checkpoint .pth [default: $SRSDE_MODEL, else the model bundled in the binary].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Folder of aligned HR faces (searched recursively, sorted); each is resized to the model's size.
    #[arg(long)]
    pub hr: PathBuf,
    /// Output folder: report.md, report.json, per_image.csv, results.jsonl, figures.
    #[arg(short = 'o', long = "out-dir", value_name = "OUTDIR")]
    pub out_dir: PathBuf,
    /// Sampler preset [default: the paper's for the model's SDE].
    ///
    /// The fast ones (ode-heun, dpm*) solve the probability-flow ODE; for them --steps counts network
    /// evaluations.
    #[arg(long, value_parser = sampler_value_parser())]
    pub sampler: Option<String>,
    /// PC samplers: number of time steps N [default: the model config's num_scales]. Fast samplers:
    /// number of network evaluations, exactly [default: the preset's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Fast samplers: churn in [0, 1] between the probability-flow ODE (0) and the full reverse SDE (1)
    /// [default: 0].
    #[arg(long, value_name = "S")]
    pub churn: Option<f64>,
    /// Fast samplers: Karras' ρ of the noise schedule, `inf` = uniform in log σ [default: 7 for
    /// ode-heun, inf for dpm*].
    #[arg(long)]
    pub rho: Option<f64>,
    /// Langevin snr [default: 0.075] (samplers with a corrector).
    #[arg(long, conflicts_with = "snr_sweep")]
    pub snr: Option<f64>,
    /// Evaluate one sampler per Langevin snr FROM, FROM+STEP, …, TO (inclusive); writes Fig. 4 and 5.
    #[arg(long, value_name = "FROM:TO:STEP")]
    pub snr_sweep: Option<String>,
    /// Evaluate only the first N faces.
    #[arg(long)]
    pub limit: Option<usize>,
    /// SR samples per face (the table then shows mean ± the per-face spread).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Faces sampled together (× samples); larger is faster on a GPU, results do not change.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Faces shown in the contact sheet.
    #[arg(long, default_value_t = 8)]
    pub sheet: usize,
    /// Discard the results of a different configuration in OUTDIR and start over.
    #[arg(long)]
    pub force: bool,
}

impl EvalOptions {
    /// Options with the command line's defaults.
    pub fn new(model: PathBuf, hr: PathBuf, out_dir: PathBuf) -> Self {
        EvalOptions {
            model: Some(model),
            hr,
            out_dir,
            sampler: None,
            steps: None,
            churn: None,
            rho: None,
            snr: None,
            snr_sweep: None,
            limit: None,
            samples: 1,
            seed: 0,
            batch: 1,
            sheet: 8,
            force: false,
        }
    }
}

/// What decides the results: recorded in `eval_config.json` and compared on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub model: String,
    pub model_bytes: u64,
    pub hr: String,
    pub files: Vec<String>,
    pub sampler: String,
    pub steps: usize,
    /// A fast sampler's schedule and churn ("rho 7, churn 0"); none for the PC samplers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast: Option<String>,
    /// The snr of each SR method (none for samplers without a corrector).
    pub snrs: Vec<Option<f64>>,
    pub samples: usize,
    pub seed: u64,
    pub image_size: usize,
}

/// What a run did.
#[derive(Debug)]
pub struct EvalSummary {
    /// Faces computed in this run.
    pub computed: usize,
    /// Faces taken from an earlier run's results.jsonl.
    pub reused: usize,
    /// Table rows.
    pub rows: Vec<MethodSummary>,
    /// Reports written.
    pub written: Vec<PathBuf>,
    /// HR files left out, each with the reason (the file name is in the message).
    pub skipped: Vec<String>,
}

/// One SR method: a sampler configuration.
struct Method {
    name: String,
    snr: Option<f64>,
    cfg: SamplerConfig,
}

/// Parses `FROM:TO:STEP` into FROM, FROM+STEP, … ≤ TO (values rounded to 1e-9 to drop float dust).
pub fn parse_sweep(s: &str) -> Result<Vec<f64>> {
    let bad = || {
        Error::Config(format!(
            "--snr-sweep {s:?}: expected FROM:TO:STEP, e.g. 0.05:0.3:0.025"
        ))
    };
    let parts: Vec<f64> = s
        .split(':')
        .map(|p| p.trim().parse::<f64>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let [from, to, step] = parts[..] else {
        return Err(bad());
    };
    if !(from.is_finite() && to.is_finite() && step.is_finite()) || from <= 0.0 || step <= 0.0 || to < from {
        return Err(Error::Config(format!(
            "--snr-sweep {s:?}: need 0 < FROM ≤ TO and STEP > 0"
        )));
    }
    let n = ((to - from) / step + 1e-9).floor() as usize + 1;
    if n > 1000 {
        return Err(Error::Config(format!(
            "--snr-sweep {s:?}: {n} values is too many"
        )));
    }
    Ok((0..n)
        .map(|i| ((from + i as f64 * step) * 1e9).round() / 1e9)
        .collect())
}

/// The SR methods: the sampler, or one per snr of the sweep.
fn methods(opts: &EvalOptions, sde: &Sde) -> Result<(String, Vec<Method>)> {
    let name = match &opts.sampler {
        Some(n) => n.clone(),
        None => match sde {
            Sde::Ve(_) => "sde-ve-cs",
            Sde::Vp(_) => "sde-vp",
            Sde::SubVp(_) => "sde-subvp",
        }
        .to_string(),
    };
    let mut base = SamplerConfig::preset(&name, sde)?;
    if let Some(n) = opts.steps {
        base.steps = n;
    }
    fast_overrides(&mut base, &name, opts.churn, opts.rho)?;
    base.langevin_norm = LangevinNorm::PerImage;
    let langevin = base.corrector == CorrectorKind::Langevin;
    let snrs: Vec<f64> = match (&opts.snr_sweep, opts.snr) {
        (Some(s), _) => {
            if !langevin {
                return Err(Error::Config(format!(
                    "--snr-sweep needs a sampler with a Langevin corrector (sde-ve-cs); {name} has none"
                )));
            }
            parse_sweep(s)?
        }
        (None, Some(snr)) => {
            if !langevin {
                return Err(Error::Config(format!(
                    "--snr has no effect: sampler {name} has no corrector"
                )));
            }
            vec![snr]
        }
        (None, None) => vec![base.snr],
    };
    let methods = snrs
        .into_iter()
        .map(|snr| {
            let mut cfg = base.clone();
            cfg.snr = snr;
            cfg.validate()?;
            Ok(Method {
                name: name.clone(),
                snr: langevin.then_some(snr),
                cfg,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((name, methods))
}

/// Runs `srsde-fast eval` on `backend`, printing progress; see the module docs.
pub fn run<B: Backend>(opts: &EvalOptions, backend: &B) -> Result<EvalSummary> {
    if opts.samples == 0 || opts.batch == 0 {
        return Err(Error::Config("--samples and --batch must be at least 1".into()));
    }
    if opts.limit == Some(0) {
        return Err(Error::Config("--limit must be at least 1".into()));
    }
    let all_files = io::collect_images(std::slice::from_ref(&opts.hr))?;
    if all_files.is_empty() {
        return Err(Error::Config(format!("no images found in {}", opts.hr.display())));
    }

    let model_source = crate::model::default::resolve(opts.model.as_deref())?;
    let lw = crate::model::default::load_source(&model_source)?;
    let net = crate::model::Ncsnpp::from_weights(backend, lw.config, &lw.weights, &model_source.describe())?;
    for n in lw.notes {
        eprintln!("note: {n}");
    }
    let centered = net.config.data.centered;
    let size = net.config.data.image_size;
    // One unreadable or unsuitable HR file is reported by name and left out; the others still run
    // (the caller exits non-zero at the end when any was skipped).
    let mut skipped = Vec::new();
    let mut files = Vec::new();
    for f in all_files {
        if opts.limit.is_some_and(|n| files.len() >= n) {
            break;
        }
        match io::load_hr_face(&f, size, CropMode::Reject) {
            Ok(_) => files.push(f),
            Err(e) => {
                eprintln!("error: skipping {e}");
                skipped.push(e.to_string());
            }
        }
    }
    if files.is_empty() {
        return Err(Error::Config(format!(
            "no usable images in {}",
            opts.hr.display()
        )));
    }
    let model = ScoreModel::new(net);
    let (sampler, methods) = methods(opts, &model.sde)?;
    let (model_id, model_bytes) = model_source.identity()?;
    let config = EvalConfig {
        model: model_id,
        model_bytes,
        hr: canonical(&opts.hr),
        files: files.iter().map(|f| relative(f, &opts.hr)).collect(),
        sampler: sampler.clone(),
        steps: methods[0].cfg.steps,
        fast: methods[0]
            .cfg
            .fast
            .map(|f| format!("rho {}, churn {}", f.rho, f.churn)),
        snrs: methods.iter().map(|m| m.snr).collect(),
        samples: opts.samples,
        seed: opts.seed,
        image_size: size,
    };
    let mut records = prepare_out_dir(opts, &config)?;
    let reused = records.len();
    println!(
        "eval: {} face(s) from {}, sampler {sampler}, {} steps, {} method(s) × {} sample(s), seed {}, device {}",
        files.len(),
        opts.hr.display(),
        config.steps,
        methods.len(),
        opts.samples,
        opts.seed,
        backend.name()
    );
    if reused > 0 {
        println!("resuming: {reused} face(s) already in {}", RESULTS_FILE);
    }

    let facenet = FaceNet::embedded(backend)?;
    let done: std::collections::HashSet<usize> = records.iter().map(|r| r.index).collect();
    let pending: Vec<usize> = (0..files.len()).filter(|i| !done.contains(i)).collect();
    let results_path = opts.out_dir.join(RESULTS_FILE);
    let mut jsonl = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results_path)
        .map_err(|e| Error::io(&results_path, e))?;
    let started = Instant::now();
    let ctx = Ctx {
        backend,
        model: &model,
        facenet: &facenet,
        methods: &methods,
        samples: opts.samples,
        seed: opts.seed,
        size,
        centered,
        sheet_dir: opts.out_dir.join(SHEET_DIR),
        sheet_faces: opts.sheet,
    };
    let mut computed = 0;
    for chunk in pending.chunks(opts.batch) {
        let faces = chunk
            .iter()
            .map(|&i| load_face(&files[i], &config.files[i], i, size))
            .collect::<Result<Vec<_>>>()?;
        for (face, rec) in faces.iter().zip(ctx.evaluate(&faces)?) {
            let line = serde_json::to_string(&rec).map_err(|e| Error::Other(format!("JSON: {e}")))?;
            writeln!(jsonl, "{line}")
                .and_then(|_| jsonl.flush())
                .and_then(|_| jsonl.sync_data())
                .map_err(|e| Error::io(&results_path, e))?;
            computed += 1;
            let last = rec.methods.last();
            println!(
                "[{}/{}] {}{}{}",
                reused + computed,
                files.len(),
                face.file.display(),
                last.and_then(|m| m.samples.first())
                    .map(|m| format!(": PSNR {:.2}, SSIM {:.4}, CS {:.4}", m.psnr, m.ssim, m.cs))
                    .unwrap_or_default(),
                last.and_then(|m| m.spread)
                    .map(|s| format!(
                        "; {} samples: pixel std {:.2}, PSNR of their mean {:.2}",
                        opts.samples, s.pixel_std, s.psnr_mean
                    ))
                    .unwrap_or_default()
            );
            // Report what a resumed run will read back: serde_json's float parsing is not always
            // bit-exact, so the records go through the same text either way.
            records.push(serde_json::from_str(&line).map_err(|e| Error::Other(format!("JSON: {e}")))?);
        }
    }
    records.sort_by_key(|r| r.index);
    println!(
        "evaluated {computed} face(s), reused {reused} in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let rows = report::summarize(&records);
    let written = write_reports(opts, &config, &records, &rows, &files, size)?;
    print!("{}", report::markdown_table(&rows));
    println!("wrote {}", list(&written));
    Ok(EvalSummary {
        computed,
        reused,
        rows,
        written,
        skipped,
    })
}

fn canonical(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// `file` relative to the `--hr` folder (as found by the folder walk).
fn relative(file: &Path, root: &Path) -> String {
    file.strip_prefix(root).unwrap_or(file).display().to_string()
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates OUTDIR, checks or writes the config sidecar, and reads the finished faces of an earlier
/// run with the same configuration. A results file whose last line was cut short (a crash while
/// writing) is rewritten without it.
fn prepare_out_dir(opts: &EvalOptions, config: &EvalConfig) -> Result<Vec<ImageRecord>> {
    let dir = &opts.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let results_path = dir.join(RESULTS_FILE);
    let json =
        |c: &EvalConfig| serde_json::to_string_pretty(c).map_err(|e| Error::Other(format!("JSON: {e}")));
    let old: Option<EvalConfig> = match std::fs::read_to_string(&cfg_path) {
        Ok(s) => Some(serde_json::from_str(&s).map_err(|e| {
            Error::format(
                cfg_path.display().to_string(),
                format!("{e}; remove it or pass --force to start over"),
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&cfg_path, e)),
    };
    let same = old.as_ref() == Some(config);
    if !same {
        if let (Some(old), false) = (&old, opts.force) {
            let diff = differing_fields(old, config);
            return Err(Error::Config(format!(
                "{} holds an evaluation with other options (differing: {}); use another OUTDIR or pass \
                 --force to discard it",
                dir.display(),
                diff.join(", ")
            )));
        }
        if old.is_none() && results_path.exists() && !opts.force {
            return Err(Error::Config(format!(
                "{} has no {CONFIG_FILE}; pass --force to discard it",
                results_path.display()
            )));
        }
        // A new evaluation: no earlier results count.
        if results_path.exists() {
            std::fs::remove_file(&results_path).map_err(|e| Error::io(&results_path, e))?;
        }
        io::write_file(&cfg_path, json(config)?.as_bytes(), true)?;
        return Ok(Vec::new());
    }
    let text = match std::fs::read_to_string(&results_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&results_path, e)),
    };
    let mut records: Vec<ImageRecord> = Vec::new();
    let mut dropped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<ImageRecord>(line) {
            Ok(r)
                if r.index < config.files.len()
                    && r.file == config.files[r.index]
                    && !records.iter().any(|o| o.index == r.index) =>
            {
                records.push(r)
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 || !text.is_empty() && !text.ends_with('\n') {
        eprintln!(
            "note: {}: {dropped} unreadable line(s) dropped; those faces are redone",
            results_path.display()
        );
        let mut s = String::new();
        for r in &records {
            s += &serde_json::to_string(r).map_err(|e| Error::Other(format!("JSON: {e}")))?;
            s.push('\n');
        }
        io::write_file(&results_path, s.as_bytes(), true)?;
    }
    Ok(records)
}

fn differing_fields(a: &EvalConfig, b: &EvalConfig) -> Vec<&'static str> {
    let mut d = Vec::new();
    let mut check = |name, differ: bool| {
        if differ {
            d.push(name)
        }
    };
    check("model", a.model != b.model || a.model_bytes != b.model_bytes);
    check("hr", a.hr != b.hr || a.files != b.files);
    check("sampler", a.sampler != b.sampler);
    check("steps", a.steps != b.steps);
    check("rho/churn", a.fast != b.fast);
    check("snr", a.snrs != b.snrs);
    check("samples", a.samples != b.samples);
    check("seed", a.seed != b.seed);
    check("image size", a.image_size != b.image_size);
    d
}

/// One HR face and what is derived from it.
struct Face {
    index: usize,
    file: PathBuf,
    /// Path relative to `--hr`, as recorded.
    name: String,
    hr_u8: ImageU8,
    /// The LR input: CHW, (size/8)².
    lr: Vec<f32>,
    /// Its bicubic upsampling: the network's guide and the `bicubic` row's SR.
    guide: Vec<f32>,
}

fn load_face(file: &Path, name: &str, index: usize, size: usize) -> Result<Face> {
    let loaded = io::load_hr_face(file, size, CropMode::Reject)?;
    let (lr, guide) = io::make_lr_chw(&loaded.pixels, size, size);
    Ok(Face {
        index,
        file: file.to_path_buf(),
        name: name.to_string(),
        hr_u8: ImageU8::from_chw_f32(3, size, size, &loaded.pixels)?,
        lr,
        guide,
    })
}

/// What every face's evaluation shares.
struct Ctx<'a, B: Backend> {
    backend: &'a B,
    model: &'a ScoreModel<B>,
    facenet: &'a FaceNet<B>,
    methods: &'a [Method],
    samples: usize,
    seed: u64,
    size: usize,
    centered: bool,
    sheet_dir: PathBuf,
    sheet_faces: usize,
}

impl<B: Backend> Ctx<'_, B> {
    /// Super-resolves the faces with every method and measures everything; one record per face.
    fn evaluate(&self, faces: &[Face]) -> Result<Vec<ImageRecord>> {
        let (size, k) = (self.size, self.samples);
        // sr[m][face * K + sample]: 8-bit SR images.
        let mut sr: Vec<Vec<ImageU8>> = Vec::new();
        for method in self.methods {
            let y_data: Vec<f32> = faces
                .iter()
                .flat_map(|f| std::iter::repeat_n(&f.guide, k))
                .flatten()
                .map(|&v| if self.centered { 2.0 * v - 1.0 } else { v })
                .collect();
            let n = faces.len() * k;
            let y = self.backend.from_f32(&[n, 3, size, size], &y_data)?;
            let seeds = faces
                .iter()
                .flat_map(|f| (0..k).map(move |s| item_seed(self.seed, f.index, s)))
                .collect();
            let x = sample_with_noise(
                self.backend,
                self.model,
                &self.model.sde,
                &y,
                &method.cfg,
                NoiseStream::per_image(seeds),
                &mut |_| Ok(()),
            )?;
            let out = self.backend.to_f32(&x)?;
            let plane = 3 * size * size;
            let imgs = out
                .chunks_exact(plane)
                .map(|c| {
                    let unit: Vec<f32> = if self.centered {
                        c.iter().map(|&v| (v + 1.0) * 0.5).collect()
                    } else {
                        c.to_vec()
                    };
                    ImageU8::from_chw_f32(3, size, size, &unit)
                })
                .collect::<Result<Vec<_>>>()?;
            sr.push(imgs);
        }

        let mut records = Vec::new();
        for (fi, face) in faces.iter().enumerate() {
            let bicubic = ImageU8::from_chw_f32(3, size, size, &face.guide)?;
            // Descriptors: HR, bicubic, then every method's samples, in one batch.
            let mut frames: Vec<&ImageU8> = vec![&face.hr_u8, &bicubic];
            for m in &sr {
                frames.extend(&m[fi * k..(fi + 1) * k]);
            }
            let chips = frames.iter().map(|f| face_chip(f)).collect::<Result<Vec<_>>>()?;
            let d = self.facenet.descriptors(&chips)?;
            let measure = |img: &ImageU8, desc: &Descriptor| self.measure(face, img, &d[0], desc);
            let mut methods = vec![
                MethodRecord {
                    method: HR_VS_HR.into(),
                    snr: None,
                    samples: vec![measure(&face.hr_u8, &d[0])?],
                    spread: None,
                },
                MethodRecord {
                    method: BICUBIC.into(),
                    snr: None,
                    samples: vec![measure(&bicubic, &d[1])?],
                    spread: None,
                },
            ];
            for (mi, method) in self.methods.iter().enumerate() {
                let samples = (0..k)
                    .map(|s| measure(&sr[mi][fi * k + s], &d[2 + mi * k + s]))
                    .collect::<Result<Vec<_>>>()?;
                let spread = if k > 1 {
                    let pics: Vec<&[u8]> = sr[mi][fi * k..(fi + 1) * k]
                        .iter()
                        .map(|img| img.data.as_slice())
                        .collect();
                    let spread = Spread::of(&pics, size, size);
                    let mean = ImageU8::from_chw_f32(3, size, size, &spread.mean_chw())?;
                    Some(SpreadRecord {
                        pixel_std: spread.mean_std(),
                        psnr_mean: psnr(&face.hr_u8, &mean)?,
                    })
                } else {
                    None
                };
                methods.push(MethodRecord {
                    method: method.name.clone(),
                    snr: method.snr,
                    samples,
                    spread,
                });
                if face.index < self.sheet_faces {
                    let tile = &sr[mi][fi * k];
                    let chw = u8_to_chw(tile);
                    let png = io::encode_png(&chw, 3, size, size, false)?;
                    std::fs::create_dir_all(&self.sheet_dir).map_err(|e| Error::io(&self.sheet_dir, e))?;
                    io::write_file(&self.sheet_dir.join(tile_name(face.index, mi)), &png, true)?;
                }
            }
            records.push(ImageRecord {
                index: face.index,
                file: face.name.clone(),
                methods,
            });
        }
        Ok(records)
    }

    /// The metrics of one 8-bit SR image of `face`.
    fn measure(&self, face: &Face, sr: &ImageU8, d_hr: &Descriptor, d_sr: &Descriptor) -> Result<Metrics> {
        let lr_side = self.size / crate::io::degrade::SR_FACTOR;
        let sr_chw = u8_to_chw(sr);
        let c = consistency(
            FloatImage {
                data: &sr_chw,
                channels: 3,
                height: self.size,
                width: self.size,
                layout: Layout::Chw,
            },
            FloatImage {
                data: &face.lr,
                channels: 3,
                height: lr_side,
                width: lr_side,
                layout: Layout::Chw,
            },
        )?;
        Ok(Metrics {
            psnr: psnr(&face.hr_u8, sr)?,
            ssim: ssim(&face.hr_u8, sr)?,
            consistency: c,
            cs: cosine(d_hr, d_sr),
            l2: l2(d_hr, d_sr),
        })
    }
}

fn tile_name(index: usize, method: usize) -> String {
    format!("{index:05}_m{method}.png")
}

/// An 8-bit HWC image as CHW floats in [0,1].
fn u8_to_chw(img: &ImageU8) -> Vec<f32> {
    let plane = img.height * img.width;
    let mut out = vec![0.0f32; img.data.len()];
    for (p, px) in img.data.chunks_exact(img.channels).enumerate() {
        for (k, &v) in px.iter().enumerate() {
            out[k * plane + p] = v as f32 / 255.0;
        }
    }
    out
}

/// The report files, rebuilt from all records.
fn write_reports(
    opts: &EvalOptions,
    config: &EvalConfig,
    records: &[ImageRecord],
    rows: &[MethodSummary],
    files: &[PathBuf],
    size: usize,
) -> Result<Vec<PathBuf>> {
    let dir = &opts.out_dir;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        io::write_file(&p, bytes, true)?;
        written.push(p);
        Ok(())
    };
    let sweep: Vec<&MethodSummary> = rows
        .iter()
        .filter(|r| r.snr.is_some() && config.snrs.len() > 1)
        .collect();
    let sweep_psnr: Vec<f64> = sweep.iter().map(|r| r.psnr.mean).collect();
    let sweep_cs: Vec<f64> = sweep.iter().map(|r| r.cs.mean).collect();
    let r = report::pearson(&sweep_psnr, &sweep_cs);

    let mut md = format!(
        "# Evaluation\n\n- model: `{}`\n- faces: {} from `{}`\n- sampler: {}, {} steps, {} sample(s) per face, \
         seed {}\n- metrics on 8-bit images; consistency: MSE (0–255) of the SR shrunk to {}×{} vs the LR \
         input; CS: cosine of dlib ResNet face descriptors{}\n\n",
        config.model,
        records.len(),
        config.hr,
        match &config.fast {
            Some(f) => format!("{} ({f})", config.sampler),
            None => config.sampler.clone(),
        },
        config.steps,
        config.samples,
        config.seed,
        size / 8,
        size / 8,
        if config.samples > 1 {
            "\n- with K > 1 samples: mean ± the mean over faces of the std over each face's samples; \
             pixel std: the mean over faces and pixels of the per-pixel std over the K samples (0–255)"
        } else {
            ""
        }
    );
    md += &report::markdown_table(rows);
    if !sweep.is_empty() {
        md += &format!(
            "\nsnr sweep: Pearson correlation of mean PSNR and mean CS over {} snr values: {}\n\n\
             ![Fig. 4]({FIG4_FILE})\n![Fig. 5]({FIG5_FILE})\n",
            sweep.len(),
            r.map(|r| format!("{r:.4}")).unwrap_or_else(|| "n/a".into())
        );
    }
    md += &format!("\n![LR | SR | HR]({SHEET_FILE})\n");
    put(REPORT_MD, md.as_bytes())?;

    #[derive(Serialize)]
    struct Json<'a> {
        config: &'a EvalConfig,
        methods: &'a [MethodSummary],
        pearson_psnr_cs: Option<f64>,
        images: &'a [ImageRecord],
    }
    let json = serde_json::to_string_pretty(&Json {
        config,
        methods: rows,
        pearson_psnr_cs: r,
        images: records,
    })
    .map_err(|e| Error::Other(format!("JSON: {e}")))?;
    put(REPORT_JSON, json.as_bytes())?;
    put(REPORT_CSV, report::csv(records).as_bytes())?;

    if !sweep.is_empty() {
        let snrs: Vec<f64> = sweep.iter().map(|r| r.snr.unwrap_or(f64::NAN)).collect();
        put(FIG4_FILE, &plot::snr_figure(&snrs, &sweep_psnr, &sweep_cs).png()?)?;
        put(FIG5_FILE, &plot::cs_psnr_figure(&sweep_psnr, &sweep_cs, r).png()?)?;
    }
    put(SHEET_FILE, &contact_sheet(opts, config, files, size)?.png()?)?;
    Ok(written)
}

/// Rows LR (nearest-neighbour enlarged) | SR of each method (sample 0) | HR, one column per face.
fn contact_sheet(
    opts: &EvalOptions,
    config: &EvalConfig,
    files: &[PathBuf],
    size: usize,
) -> Result<plot::Canvas> {
    let n = opts.sheet.min(files.len());
    let mut rows: Vec<Vec<Vec<u8>>> = vec![Vec::new(); config.snrs.len() + 2];
    for (i, file) in files.iter().take(n).enumerate() {
        let face = load_face(file, &config.files[i], i, size)?;
        let lr_side = size / crate::io::degrade::SR_FACTOR;
        let lr = ImageU8::from_chw_f32(3, lr_side, lr_side, &face.lr)?;
        rows[0].push(nearest(&lr, size));
        for m in 0..config.snrs.len() {
            let p = opts.out_dir.join(SHEET_DIR).join(tile_name(i, m));
            // A face computed by a run with a smaller --sheet has no tile: shown grey.
            let tile = match image::open(&p) {
                Ok(img) if (img.width() as usize, img.height() as usize) == (size, size) => {
                    img.to_rgb8().into_raw()
                }
                _ => {
                    eprintln!(
                        "note: {} missing; its contact sheet tile is left grey",
                        p.display()
                    );
                    vec![128; size * size * 3]
                }
            };
            rows[1 + m].push(tile);
        }
        rows[config.snrs.len() + 1].push(face.hr_u8.data.clone());
    }
    Ok(plot::contact_sheet(&rows, size))
}

/// An RGB image enlarged to `size × size` by pixel repetition.
fn nearest(img: &ImageU8, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let (sy, sx) = (y * img.height / size, x * img.width / size);
            let i = (sy * img.width + sx) * img.channels;
            out.extend_from_slice(&img.data[i..i + 3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_parsing() {
        assert_eq!(parse_sweep("0.05:0.3:0.025").unwrap().len(), 11);
        assert_eq!(parse_sweep("0.05:0.1:0.025").unwrap(), [0.05, 0.075, 0.1]);
        assert_eq!(parse_sweep("0.1:0.1:1").unwrap(), [0.1]);
        for bad in ["0.1:0.05:0.01", "0:1:0.1", "0.1:0.2", "a:b:c", "0.1:0.2:0"] {
            assert!(parse_sweep(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fast_sampler_methods() {
        let sde = Sde::paper_ve();
        let mut opts = EvalOptions::new("m".into(), "hr".into(), "out".into());
        opts.sampler = Some("dpm2".into());
        opts.steps = Some(12);
        opts.rho = Some(7.0);
        let (name, m) = methods(&opts, &sde).unwrap();
        assert_eq!((name.as_str(), m.len(), m[0].snr), ("dpm2", 1, None));
        let fast = m[0].cfg.fast.unwrap();
        assert_eq!(
            (m[0].cfg.steps, m[0].cfg.nfe(), fast.rho, fast.churn),
            (12, 12, 7.0, 0.0)
        );
        // Langevin options do not apply to a fast sampler; --churn does not apply to a PC one.
        opts.snr = Some(0.1);
        assert!(methods(&opts, &sde).is_err());
        opts.snr = None;
        opts.sampler = Some("sde-ve".into());
        assert!(methods(&opts, &sde).is_err());
        opts.rho = None;
        assert!(methods(&opts, &sde).unwrap().1[0].cfg.fast.is_none());
    }
}
