//! `srsde-fast` command line: parses arguments, calls the library, prints. No logic of its own.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::backend::cuda::{self, Cuda, Precision};
use srsde_fast::backend::Backend;
use srsde_fast::bench;
use srsde_fast::model::load::{load_weights, save_weights};
use srsde_fast::model::weights::StorageType;
use srsde_fast::model::{NetConfig, ScoreModel};
use srsde_fast::provenance::{describe, Provenance};

#[derive(Parser)]
#[command(
    name = "srsde-fast",
    version,
    about = "Score-based SDE face super-resolution (16×16 → 128×128)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// PC sampling on CUDA as one captured CUDA graph per run (falls back to eager if capture fails).
    #[arg(long, global = true, value_enum, default_value = "on")]
    cuda_graph: OnOff,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// CUDA when a GPU and kernels are available, else the CPU (with a note).
    Auto,
    Cpu,
    Cuda,
}

/// GEMM arithmetic (storage and master weights stay f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    /// Exact f32 (CUDA SIMT, CPU vector FMA).
    F32,
    /// TF32 tensor cores, f32 accumulate (CUDA only).
    Tf32,
    /// bf16 operands, f32 accumulate: CUDA tensor cores, or on the CPU the AMX tiles of Intel
    /// Xeons from Sapphire Rapids on (the convolutions).
    Bf16,
}

/// The CPU backend in `precision`: f32, or bf16 on the AMX tiles (an error where there are none).
fn cpu_in(be: CpuF32, precision: PrecisionArg) -> Result<CpuF32> {
    match precision {
        PrecisionArg::F32 => Ok(be),
        PrecisionArg::Bf16 => Ok(be.with_bf16_tiles(true)?),
        PrecisionArg::Tf32 => {
            bail!("--precision tf32 needs the CUDA backend (the CPU has f32 and, with AMX, bf16)")
        }
    }
}

/// The CUDA backend in `precision` (an error where this build has no kernels for it).
fn cuda_in(be: &Cuda, precision: PrecisionArg) -> Result<Cuda> {
    let p = precision.precision();
    if !be.supports(p) {
        bail!("this build has no {p} tensor-core kernels");
    }
    Ok(be.with_precision(p))
}

impl PrecisionArg {
    fn precision(self) -> Precision {
        match self {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Tf32 => Precision::Tf32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StorageArg {
    F32,
    F16,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert an original sr-sde checkpoint.pth (EMA weights) to safetensors with its config.
    Convert {
        /// The checkpoint (`checkpoint.pth`) or a safetensors file.
        input: PathBuf,
        /// Output .safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        /// Use this preset's config instead of inferring it from the tensor shapes.
        #[arg(long)]
        preset: Option<String>,
        /// Storage type of the written weights.
        #[arg(long, value_enum, default_value = "f32")]
        storage: StorageArg,
        /// Overwrite an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Print what a file is: a weights file's config and parameter count; for a PNG written by
    /// `upscale`, how it was made (input, model, sampler, seeds, device), how sure it is, whether
    /// the input still matches, and the command line that reproduces it byte for byte.
    Info {
        /// A weights file (or sharded export), or a PNG written by `upscale` (e.g. out/face_sr.png).
        file: PathBuf,
    },
    /// Time one network evaluation and one sampler step.
    Bench {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// Model preset (random weights).
        #[arg(long, default_value = "ve-paper")]
        preset: String,
        /// Batch size of the NFE timing.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed repetitions (after one warm-up).
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Also time one predictor–corrector step (2 NFE + updates).
        #[arg(long)]
        pc_step: bool,
        /// Time one training step instead (loss, backward, clip, Adam, EMA; random data), with
        /// images/s and, on CUDA, the peak device memory.
        #[arg(long)]
        train: bool,
        /// GEMM precision to time [default: every one this build and device support — on the CPU
        /// f32, and bf16 where the CPU has AMX tiles].
        #[arg(long, value_enum)]
        precision: Option<PrecisionArg>,
    },
    /// Check every CUDA kernel against the CPU backend on fresh random inputs.
    Selftest {
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Train a score network on a folder of faces (DSM loss, Adam, EMA, resumable checkpoints).
    Train {
        #[command(flatten)]
        args: Box<srsde_fast::train::run::TrainArgs>,
        /// Where to train: the whole step (forward, backward, Adam, EMA) runs on that backend.
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// GEMM precision: tf32/bf16 run the convolutions on CUDA tensor cores, bf16 on the CPU on
        /// AMX tiles (Intel Xeon Sapphire Rapids or later), with f32 master weights, gradients and
        /// optimiser state.
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
    },
    /// Maintenance: re-encode a training folder to fit a size budget, held-out faces kept verbatim
    /// (scripts/pack_train_data.sh).
    #[command(hide = true)]
    PackFaces {
        #[command(flatten)]
        args: srsde_fast::train::pack::PackArgs,
    },
    /// Make the paper's 16×16 LR face of HR faces (antialiased ×8 downsampling): `{stem}_lr16.png`
    /// per face in OUTDIR, ready for `upscale` (e.g. to compare its result with the HR).
    Degrade {
        /// HR face images or folders of them (square, ≥ 128×128; larger ones are resized to 128 first).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(short = 'o', long = "out-dir", value_name = "OUTDIR")]
        out_dir: PathBuf,
        /// Overwrite existing outputs.
        #[arg(long)]
        force: bool,
    },
    /// Write a training checkpoint's EMA weights as an inference weights file.
    Export {
        #[command(flatten)]
        args: srsde_fast::train::run::ExportArgs,
    },
    /// Super-resolve 16×16 faces to 128×128: writes `{stem}_sr.png` per input into OUTDIR.
    #[command(after_long_help = UPSCALE_EXAMPLES)]
    Upscale {
        #[command(flatten)]
        opts: srsde_fast::upscale::UpscaleOptions,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// GEMM precision: tf32/bf16 run the convolutions on CUDA tensor cores, bf16 on the CPU on AMX
        /// tiles (faster, less exact; recorded in every output's provenance).
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
    },
    /// Evaluate on HR faces: PSNR, SSIM, consistency, CS table (+ snr sweep figures), resumable.
    Eval {
        #[command(flatten)]
        opts: srsde_fast::eval::run::EvalOptions,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// GEMM precision, as for `upscale` (recorded in the report's device line).
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
    },
}

/// Shown by `srsde-fast upscale --help`.
const UPSCALE_EXAMPLES: &str = "\
Examples:
  srsde-fast upscale assets/examples/astronaut_lr16.png -o out/
      The bundled example face through the bundled model → out/astronaut_lr16_sr.png (on a CPU:
      dpm1, 2 network evaluations, about a second).
  srsde-fast upscale faces/ -o out/ --model model/ --samples 4 --seed 7
      Every 16×16 face in faces/, four hypotheses each (out/NAME_sr_0.png … _3.png), with another
      model: a sharded export folder (`srsde-fast export --shard-mib 16`), a .safetensors file or the
      original .pth; --save-lr also writes the bicubic guide.
  srsde-fast upscale face.png -o out/ --samples 8 --steps 10
      Eight hypotheses, their per-pixel mean (out/face_mean.png), their standard deviation as a heat
      map (out/face_std.png: dark = pinned down by the input, bright = invented) and the strip
      LR | hypotheses | mean | std (out/face_strip.png).
  srsde-fast info out/face_sr.png
      How an output was made (input and model SHA-256, sampler, seeds, device, its LR consistency)
      and the command line that writes it again byte for byte; every PNG carries this record, and
      out/face_sr.json holds it too. --json prints one JSON line per face for scripts.
  srsde-fast upscale face.png -o out/ --sampler sde-ve-cs --steps 1000
      The paper's own predictor–corrector sampler (slow on a CPU: 2 evaluations per step).
  srsde-fast degrade hr_faces/ -o lr/
      The paper's 16×16 LR of HR faces, to try the model where the answer is known.

Without --model the model is $SRSDE_MODEL if set, else the one bundled in the binary (built from
assets/model/: guide-residual ve-res, non-commercial research use only, see its MODEL_CARD.md),
else a sharded export in ~/.local/share/srsde-fast/model/.

What it gives (rows LR | SR | HR of the bundled example): docs/images/example_strip.png —
measured on 298 held-out faces: PSNR 24.19 dB, CS 0.9276 vs bicubic 21.10 dB, 0.9049
(docs/eval/).";

fn main() {
    let cli = Cli::parse();
    // The command runs on a worker of the CPU backend's thread pool, so that each op's parallel
    // work starts on this thread instead of waking the pool and sleeping until it is done.
    if let Err(e) = srsde_fast::backend::cpu::on_worker(|| run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    srsde_fast::sample::graph::set_cuda_graphs(cli.cuda_graph == OnOff::On);
    match cli.cmd {
        Cmd::Convert {
            input,
            output,
            preset,
            storage,
            force,
        } => {
            if output.exists() && !force {
                bail!("{} exists; pass --force to overwrite it", output.display());
            }
            let over = preset.as_deref().map(NetConfig::preset).transpose()?;
            let lw = load_weights(&input, over)?;
            for n in &lw.notes {
                println!("note: {n}");
            }
            let storage = match storage {
                StorageArg::F32 => StorageType::F32,
                StorageArg::F16 => StorageType::F16,
            };
            save_weights(&output, &lw.config, &lw.weights, storage)?;
            let n: usize = lw.weights.values().map(|t| t.numel()).sum();
            println!(
                "wrote {} ({} tensors, {n} parameters, {:?})",
                output.display(),
                lw.weights.len(),
                lw.config.sde()
            );
        }
        Cmd::Info { file } if is_png(&file) => {
            let name = file.display().to_string();
            let bytes = std::fs::read(&file).with_context(|| name.clone())?;
            match Provenance::from_png(&bytes, &name)? {
                Some(p) => print!("{}", describe(&name, &p)),
                None => bail!(
                    "{name}: a PNG without srsde-fast provenance (not written by `srsde-fast upscale`, or \
                     its text chunks were stripped): nothing says how it was made"
                ),
            }
        }
        Cmd::Info { file: model } => {
            let lw = load_weights(&model, None)?;
            for n in &lw.notes {
                println!("note: {n}");
            }
            let n: usize = lw.weights.values().map(|t| t.numel()).sum();
            println!("{}: {:?} SDE, {n} parameters", model.display(), lw.config.sde());
            println!("config: {}", lw.config.model_json());
            println!("data:   {}", lw.config.data_json());
        }
        Cmd::Bench {
            device,
            preset,
            batch,
            iters,
            pc_step,
            train,
            precision,
        } => match pick_device(device)? {
            Picked::Cpu(be) => {
                let chosen = match precision {
                    Some(p) => vec![p],
                    None if CpuF32::bf16_tiles_available() => vec![PrecisionArg::F32, PrecisionArg::Bf16],
                    None => vec![PrecisionArg::F32],
                };
                for p in chosen {
                    let be = cpu_in(be.clone(), p)?;
                    if train {
                        bench_train(&be, &preset, batch, iters)?
                    } else {
                        bench_on(&be, &preset, batch, iters, pc_step)?
                    }
                }
            }
            Picked::Cuda(be) => {
                let all = [Precision::F32, Precision::Tf32, Precision::Bf16];
                let chosen: Vec<Precision> = match precision {
                    Some(p) => vec![p.precision()],
                    None => all.into_iter().filter(|&p| be.supports(p)).collect(),
                };
                for p in chosen {
                    if !be.supports(p) {
                        bail!("this build has no {p} tensor-core kernels");
                    }
                    println!("precision {}", p.as_str());
                    let be = be.with_precision(p);
                    let _ = be.kernel_profile(); // start the per-kernel profile (if on) afresh
                    if train {
                        be.reset_pool_peak();
                        bench_train(&be, &preset, batch, iters)?;
                        let st = be.pool_stats();
                        println!(
                            "peak device memory: {:.0} MiB in use, {:.0} MiB reserved by the pool",
                            st.peak_bytes_in_use as f64 / (1 << 20) as f64,
                            st.peak_bytes_reserved as f64 / (1 << 20) as f64
                        );
                    } else {
                        bench_on(&be, &preset, batch, iters, pc_step)?;
                    }
                    print_kernel_profile(&be);
                }
            }
        },
        Cmd::Selftest { seed } => {
            let cu = Cuda::new(0).context("selftest needs a CUDA device")?;
            println!("device: {}", cu.device_name());
            let rows = cuda::selftest::selftest(&cu, seed)?;
            println!("{}", cuda::selftest::header());
            let mut failed = 0;
            for r in &rows {
                println!("{r}");
                failed += usize::from(!r.pass);
            }
            // Whole networks end to end (random weights) in every precision the build supports.
            let mut total = rows.len();
            for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
                if !cu.supports(p) {
                    continue;
                }
                let bound = match p {
                    Precision::F32 => 1e-4,
                    Precision::Tf32 => 2e-3,
                    Precision::Bf16 => 2e-2,
                };
                for preset in ["ve-tiny", "vp-tiny", "ve-small", "ve-res"] {
                    let e = bench::network_parity(&cu.with_precision(p), preset, 2, seed)?;
                    let pass = e <= bound;
                    total += 1;
                    failed += usize::from(!pass);
                    println!(
                        "network {preset:<9} batch 2  {:<5} rel err {e:.2e}  bound {bound:.0e}  {}",
                        p.as_str(),
                        if pass { "ok" } else { "FAIL" }
                    );
                }
            }
            // The fused optimiser (Adam, EMA, gradient norms) against the host formulas.
            for r in cuda::optim::selftest_rows(&cu, seed)? {
                println!("{r}");
                total += 1;
                failed += usize::from(!r.pass);
            }
            // PC sampling replayed from a CUDA graph against the eager CUDA sampler.
            for r in srsde_fast::sample::graph::graph_selftest(&cu, seed)? {
                println!("{r}");
                total += 1;
                failed += usize::from(!r.pass);
            }
            println!("{} passed, {} failed", total - failed, failed);
            if failed > 0 {
                bail!("{failed} CUDA op checks failed");
            }
        }
        Cmd::Train {
            args,
            device,
            precision,
        } => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || {
                if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::process::exit(130); // second Ctrl-C: abort now
                }
                eprintln!("\nstopping after this step and writing a checkpoint (Ctrl-C again aborts)");
            })
            .context("installing the Ctrl-C handler")?;
            let opts = args.options();
            let summary = match pick_device(device)? {
                Picked::Cpu(be) => {
                    let be = cpu_in(be, precision)?;
                    if precision == PrecisionArg::Bf16 {
                        eprintln!(
                            "training on {} (bf16 convolutions, f32 master weights)",
                            be.name()
                        );
                    }
                    srsde_fast::train::run::train(&be, &opts, &stop)?
                }
                Picked::Cuda(be) => {
                    let be = cuda_in(&be, precision)?;
                    eprintln!(
                        "training on {} ({} GEMMs, f32 master weights)",
                        be.device_name(),
                        precision.precision()
                    );
                    srsde_fast::train::run::train(&be, &opts, &stop)?
                }
            };
            println!("{summary}");
        }
        Cmd::Export { args } => println!("{}", srsde_fast::train::run::export_cli(&args)?),
        Cmd::Degrade {
            inputs,
            out_dir,
            force,
        } => {
            let (written, failed) = srsde_fast::io::degrade::write_lr_faces(&inputs, &out_dir, force)?;
            // Each message names its file.
            for (_, why) in &failed {
                eprintln!("error: {why}");
            }
            println!("wrote {} LR face(s) into {}", written.len(), out_dir.display());
            if !failed.is_empty() {
                bail!("{} file(s) could not be degraded (named above)", failed.len());
            }
        }
        Cmd::PackFaces { args } => println!("{}", srsde_fast::train::pack::pack_cli(&args)?),
        Cmd::Upscale {
            opts,
            device,
            precision,
        } => {
            let report = match pick_device(device)? {
                Picked::Cpu(be) => srsde_fast::upscale::run(&opts, &cpu_in(be, precision)?)?,
                Picked::Cuda(be) => srsde_fast::upscale::run(&opts, &cuda_in(&be, precision)?)?,
            };
            report.into_result()?;
        }
        Cmd::Eval {
            opts,
            device,
            precision,
        } => {
            let summary = match pick_device(device)? {
                Picked::Cpu(be) => srsde_fast::eval::run::run(&opts, &cpu_in(be, precision)?)?,
                Picked::Cuda(be) => srsde_fast::eval::run::run(&opts, &cuda_in(&be, precision)?)?,
            };
            if !summary.skipped.is_empty() {
                bail!(
                    "{} HR file(s) could not be evaluated (named above)",
                    summary.skipped.len()
                );
            }
        }
    }
    Ok(())
}

/// True when `path` is a file starting with the PNG signature.
fn is_png(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut sig = [0u8; 8];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut sig))
            .is_ok()
        && sig == *b"\x89PNG\r\n\x1a\n"
}

enum Picked {
    Cpu(CpuF32),
    Cuda(Cuda),
}

/// Resolve `--device`: auto falls back to the CPU with a one-line note; cuda fails clearly.
fn pick_device(d: DeviceArg) -> Result<Picked> {
    match d {
        DeviceArg::Cpu => Ok(Picked::Cpu(CpuF32::new())),
        DeviceArg::Cuda => Ok(Picked::Cuda(Cuda::new(0).context("--device cuda")?)),
        DeviceArg::Auto => match Cuda::new(0) {
            Ok(c) => Ok(Picked::Cuda(c)),
            Err(e) => {
                eprintln!("note: using the CPU ({e})");
                Ok(Picked::Cpu(CpuF32::new()))
            }
        },
    }
}

fn bench_on<B: Backend>(be: &B, preset: &str, batch: usize, iters: usize, pc_step: bool) -> Result<()> {
    let net = bench::random_network(be, preset)?;
    println!("device: {}", be.name());
    println!("model: {preset} ({} parameters), 128×128", net.num_params());
    let t = bench::time_nfe(&net, batch, iters)?;
    let per_img = t.median_ms / batch as f64;
    let flops = bench::known_gflop_per_nfe(preset)
        .map(|g| format!(", {:.1} GFLOP/s", g * batch as f64 / (t.median_ms / 1e3)))
        .unwrap_or_default();
    println!(
        "forward (NFE) batch {batch}: median {:.1} ms (min {:.1}, {} runs), {:.1} NFE/s{flops}",
        t.median_ms,
        t.min_ms,
        t.runs,
        1e3 / per_img
    );
    if pc_step {
        let model = ScoreModel::new(net);
        let t = bench::time_pc_step(&model, batch, iters)?;
        println!(
            "PC step (2 NFE + updates) batch {batch}: median {:.1} ms (min {:.1})",
            t.median_ms, t.min_ms
        );
        match bench::time_pc_step_graph(&model, batch, iters) {
            Ok(Some((g, nodes))) => println!(
                "PC step, CUDA graph ({nodes} nodes) batch {batch}: median {:.1} ms (min {:.1}); eager {:.1} ms",
                g.median_ms, g.min_ms, t.median_ms
            ),
            Ok(None) => {}
            Err(e) => println!("PC step, CUDA graph batch {batch}: failed ({e})"),
        }
        // A whole fast-sampler run (dpm2, 20 network evaluations): eager vs the CUDA graph.
        match bench::time_fast_sample_graph(&model, 20, batch, iters.min(5)) {
            Ok(Some((eager, g, nodes))) => println!(
                "dpm2 20 steps, CUDA graph ({nodes} nodes per evaluation) batch {batch}: median {:.1} ms \
                 (min {:.1}); eager {:.1} ms",
                g.median_ms, g.min_ms, eager.median_ms
            ),
            Ok(None) => {}
            Err(e) => println!("dpm2 20 steps, CUDA graph batch {batch}: failed ({e})"),
        }
    }
    if let Some(b) = bench::peak_rss_bytes() {
        println!("peak memory (RSS): {:.0} MiB", b as f64 / (1 << 20) as f64);
    }
    Ok(())
}

/// The per-kernel GPU time table of a `SRSDE_CUDA_PROFILE=1` run (warm-up and timed runs
/// together), heaviest first.
fn print_kernel_profile(be: &Cuda) {
    let Some(prof) = be.kernel_profile() else { return };
    let total: f64 = prof.by_kernel.iter().map(|r| r.2).sum();
    // SRSDE_CUDA_PROFILE_ROWS=N lists N kernels and N launch shapes (default 30 and 25).
    let rows: Option<usize> = std::env::var("SRSDE_CUDA_PROFILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok());
    println!("kernel profile (SRSDE_CUDA_PROFILE=1; launches serialised): {total:.1} ms in all");
    for (name, n, ms) in prof.by_kernel.iter().take(rows.unwrap_or(30)) {
        println!("  {ms:9.2} ms {:5.1} % {n:7}x  {name}", 100.0 * ms / total);
    }
    println!("heaviest launch shapes (kernel, grid):");
    for (name, grid, n, ms) in prof.by_launch.iter().take(rows.unwrap_or(25)) {
        println!(
            "  {ms:9.2} ms {:5.1} % {n:7}x  {name} {grid:?}  ({:.1} µs each)",
            100.0 * ms / total,
            1e3 * ms / *n as f64
        );
    }
}

fn bench_train<B: Backend>(be: &B, preset: &str, batch: usize, iters: usize) -> Result<()> {
    let size = NetConfig::preset(preset)?.data.image_size;
    println!("device: {}", be.name());
    // On the CPU the step runs with the per-op profile on (a clock read per op) and prints it.
    let (t, profile) = if be.is_cpu() {
        bench::profile_train_step(be, preset, size, batch, iters)?
    } else {
        (
            bench::time_train_step(be, preset, size, batch, iters)?,
            String::new(),
        )
    };
    println!(
        "train step ({preset}, {size}×{size}) batch {batch}: median {:.1} ms (min {:.1}, {} runs), {:.2} images/s",
        t.median_ms,
        t.min_ms,
        t.runs,
        batch as f64 / (t.median_ms / 1e3)
    );
    if let Some(b) = bench::peak_rss_bytes() {
        println!("peak memory (RSS): {:.0} MiB", b as f64 / (1 << 20) as f64);
    }
    if !profile.is_empty() {
        println!("\nper-op profile (self time on the calling thread):\n{profile}");
    }
    Ok(())
}
