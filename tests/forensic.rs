//! Outputs a forensic analyst can trust (`upscale` on the CPU with the tiny golden VE model and a
//! few steps): broken inputs and broken results are named errors that never become pictures, every
//! PNG carries its provenance and reproduces byte for byte from it, and `--samples K` maps the
//! spread of the hypotheses.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use srsde_fast::eval::metrics::{consistency, FloatImage, Layout};
use srsde_fast::io::{load_hr_face, load_lr_face, make_lr_chw, save_png, CropMode};
use srsde_fast::model::sha256::sha256_hex;
use srsde_fast::provenance::Provenance;
use srsde_fast::uncertainty::colormap_lut;
use srsde_fast::upscale::{item_seed, POISON_ENV};

use common::{write_golden_model, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_srsde-fast");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove(POISON_ENV);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run srsde-fast");
    eprintln!(
        "$ srsde-fast {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn upscale(args: &[&str], env: &[(&str, &str)]) -> Output {
    let all: Vec<&str> = ["upscale", "--device", "cpu"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    run(&all, env)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn val_face(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/val128")
        .join(name)
}

/// The paper's 16×16 LR of a validation face, written as a PNG.
fn write_lr(path: &Path, hr_name: &str) {
    let hr = load_hr_face(&val_face(hr_name), 128, CropMode::Reject).unwrap();
    let (lr, _) = make_lr_chw(&hr.pixels, 128, 128);
    save_png(path, &lr, 3, 16, 16, false).unwrap();
}

/// The golden nf16 VE model with its noise scale σ_max replaced (None: as it is).
fn write_model(path: &Path, sigma_max: Option<f64>) {
    write_golden_model("ncsnpp_ve_nf16.safetensors", path);
    if let Some(sm) = sigma_max {
        let lw = srsde_fast::model::load::load_weights(path, None).unwrap();
        let mut cfg = lw.config;
        cfg.model.sigma_max = sm;
        std::fs::remove_file(path).unwrap();
        srsde_fast::model::load::save_weights(
            path,
            &cfg,
            &lw.weights,
            srsde_fast::model::weights::StorageType::F32,
        )
        .unwrap();
    }
}

/// Every file in `dir`, sorted (none when it does not exist).
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn provenance(png: &Path) -> Provenance {
    let bytes = std::fs::read(png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    Provenance::from_png(&bytes, s(png))
        .unwrap()
        .unwrap_or_else(|| panic!("{} carries no provenance", png.display()))
}

fn rgb(png: &Path) -> Vec<u8> {
    image::open(png)
        .unwrap_or_else(|e| panic!("{}: {e}", png.display()))
        .to_rgb8()
        .into_raw()
}

/// A folder mixing good faces, a truncated JPEG, a truncated PNG and a face whose sample is
/// forced to NaN: each bad one is a named error with nothing written for it, the good ones are
/// written, the exit code is non-zero; `--json` gives one parseable line per face on stdout.
/// With `--accept-truncated` the truncated ones are super-resolved, their provenance saying so.
#[test]
fn bad_inputs_and_non_finite_samples_are_named_errors_and_the_rest_is_written() {
    let tmp = TempDir::new("bad-inputs");
    let model = tmp.path("m.safetensors");
    write_model(&model, None);
    let dir = tmp.path("in");
    std::fs::create_dir_all(&dir).unwrap();
    write_lr(&dir.join("a_good.png"), "celebahq_000004.jpg");
    // Half of a real JPEG: the lenient decoder would fill the rest with grey.
    let jpg = std::fs::read(val_face("celebahq_000009.jpg")).unwrap();
    std::fs::write(dir.join("b_cut.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    write_lr(&dir.join("c_good.png"), "celebahq_000014.jpg");
    // A 64×64 PNG cut in its image data: only its first rows decode.
    let hr = load_hr_face(&val_face("celebahq_000016.jpg"), 128, CropMode::Reject).unwrap();
    let big = tmp.path("big.png");
    let small: Vec<f32> = srsde_fast::io::resize_antialias_chw(
        &hr.pixels,
        3,
        128,
        128,
        64,
        64,
        srsde_fast::io::ResizeKernel::Triangle,
    );
    save_png(&big, &small, 3, 64, 64, false).unwrap();
    let png = std::fs::read(&big).unwrap();
    std::fs::write(dir.join("d_cut.png"), &png[..png.len() * 6 / 10]).unwrap();
    write_lr(&dir.join("e_nan.png"), "celebahq_000016.jpg");

    let out = tmp.path("out");
    let args = [
        s(&dir),
        "-o",
        s(&out),
        "--model",
        s(&model),
        "--sampler",
        "dpm2",
        "--steps",
        "2",
        "--seed",
        "3",
        "--json",
    ];
    // e_nan.png is the fifth input: noise index 4.
    let r = upscale(&args, &[(POISON_ENV, "4")]);
    let (so, se) = (stdout(&r), stderr(&r));
    assert!(!r.status.success(), "bad inputs must fail the run");
    assert!(
        se.contains("b_cut.jpg")
            && se.contains("truncated or corrupt JPEG")
            && se.contains("--accept-truncated"),
        "{se}"
    );
    assert!(
        se.contains("d_cut.png") && se.contains("truncated or corrupt PNG"),
        "{se}"
    );
    assert!(se.contains("e_nan.png") && se.contains("non-finite"), "{se}");
    assert_eq!(
        files(&out),
        [
            "a_good_sr.json",
            "a_good_sr.png",
            "c_good_sr.json",
            "c_good_sr.png"
        ],
        "exactly the good faces' files"
    );
    // The human log went to stderr; stdout holds one JSON object per face.
    assert!(se.contains("seed: 3") && se.contains("wrote "), "{se}");
    let lines: Vec<serde_json::Value> = so
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 5, "{so}");
    let line = |name: &str| {
        lines
            .iter()
            .find(|l| l["input"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("no line for {name}"))
    };
    for good in ["a_good.png", "c_good.png"] {
        let l = line(good);
        assert_eq!(l["ok"], true, "{l}");
        assert!(l["error"].is_null(), "{l}");
        assert_eq!(l["outputs"].as_array().unwrap().len(), 2, "{l}");
        let c = l["hypotheses"][0]["consistency"].as_f64().unwrap();
        assert!(c.is_finite() && c >= 0.0, "{l}");
        assert!(l["timings"]["sampling_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    for (bad, why) in [
        ("b_cut.jpg", "truncated"),
        ("d_cut.png", "truncated"),
        ("e_nan.png", "non-finite"),
    ] {
        let l = line(bad);
        assert_eq!(l["ok"], false, "{l}");
        let e = l["error"].as_str().unwrap();
        assert!(e.contains(bad) && e.contains(why), "{l}");
        assert!(l["outputs"].as_array().unwrap().is_empty(), "{l}");
    }

    // Accepted on request: written, and their provenance says the input was partial.
    let out2 = tmp.path("out2");
    let mut args2 = args.to_vec();
    args2[2] = s(&out2);
    args2.push("--accept-truncated");
    let r = upscale(&args2, &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    for cut in ["b_cut", "d_cut"] {
        let p = provenance(&out2.join(format!("{cut}_sr.png")));
        let partial = p.input.partial.as_deref().unwrap_or_default();
        assert!(partial.contains("truncated"), "{cut}: {partial:?}");
        assert!(p.device.accept_truncated && p.reproduce.contains("--accept-truncated"));
    }
    assert!(provenance(&out2.join("a_good_sr.png")).input.partial.is_none());
}

/// Weights holding a NaN: an error naming the file and the tensor, and no picture at all (it used
/// to be an all-black PNG and exit code 0).
#[test]
fn nan_weights_fail_the_run_before_anything_is_written() {
    let tmp = TempDir::new("nan-weights");
    let face = tmp.path("face.png");
    write_lr(&face, "celebahq_000004.jpg");
    let good = tmp.path("good.safetensors");
    write_model(&good, None);
    let lw = srsde_fast::model::load::load_weights(&good, None).unwrap();
    let mut w = lw.weights.clone();
    let name = w
        .keys()
        .find(|k| k.ends_with("Conv_0.weight"))
        .expect("a conv weight")
        .clone();
    w.get_mut(&name).unwrap().data[7] = f32::NAN;
    let bad = tmp.path("nan.safetensors");
    srsde_fast::model::load::save_weights(&bad, &lw.config, &w, srsde_fast::model::weights::StorageType::F32)
        .unwrap();
    let out = tmp.path("out");
    let r = upscale(
        &[s(&face), "-o", s(&out), "--model", s(&bad), "--steps", "2"],
        &[],
    );
    let se = stderr(&r);
    assert!(!r.status.success());
    assert!(
        se.contains("nan.safetensors") && se.contains(&name) && se.contains("non-finite"),
        "{se}"
    );
    assert!(
        files(&out).iter().all(|f| !f.ends_with(".png")),
        "{:?}",
        files(&out)
    );
}

/// The provenance reads back from a written PNG (`info`), names the input and the model by
/// SHA-256, the seeds and the LR consistency of that very picture; the command it prints, run
/// again, writes byte-identical files.
#[test]
fn provenance_reads_back_and_its_command_reproduces_the_files_byte_for_byte() {
    let tmp = TempDir::new("provenance");
    let model = tmp.path("m.safetensors");
    write_model(&model, None);
    let dir = tmp.path("in");
    std::fs::create_dir_all(&dir).unwrap();
    write_lr(&dir.join("a.png"), "celebahq_000004.jpg");
    write_lr(&dir.join("b.png"), "celebahq_000009.jpg");
    let out = tmp.path("out");
    // Churn makes the fast sampler draw noise at every step: the reproduction needs every seed.
    let r = upscale(
        &[
            s(&dir),
            "-o",
            s(&out),
            "--model",
            s(&model),
            "--sampler",
            "dpm2",
            "--steps",
            "3",
            "--churn",
            "0.5",
            "--samples",
            "2",
            "--seed",
            "9",
            "--save-lr",
        ],
        &[],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let target = out.join("b_sr_1.png");

    // What the record says, checked against the files themselves.
    let p = provenance(&target);
    assert_eq!(p.output.role, "sr");
    assert_eq!(p.output.hypothesis, Some(1));
    assert_eq!(
        p.input.sha256,
        sha256_hex(&std::fs::read(dir.join("b.png")).unwrap())
    );
    assert_eq!(p.input.file, s(&dir.join("b.png").canonicalize().unwrap()));
    assert_eq!(p.model.sha256, sha256_hex(&std::fs::read(&model).unwrap()));
    assert_eq!(p.model.hashed, "file");
    assert_eq!((p.noise.seed, p.noise.index, p.noise.samples), (9, 1, 2));
    assert_eq!(p.hypotheses[1].item_seed, item_seed(9, 1, 1));
    assert_eq!((p.sampler.name.as_str(), p.sampler.steps), ("dpm2", 3));
    assert_eq!(p.sampler.churn, Some(0.5));
    assert_eq!(
        (p.device.backend.as_str(), p.device.precision.as_str()),
        ("cpu", "f32")
    );
    assert_eq!(p.software, format!("srsde-fast {}", env!("CARGO_PKG_VERSION")));
    // Its consistency is that of the picture in the file against the input LR.
    let sr = load_hr_face(&target, 128, CropMode::Reject).unwrap();
    let lr = load_lr_face(&dir.join("b.png"), CropMode::Reject).unwrap();
    let c = consistency(img(&sr.pixels, 128), img(&lr.pixels, 16)).unwrap();
    let recorded = p.output.consistency.unwrap();
    assert!((c - recorded).abs() < 1e-6 * c.max(1.0), "{c} vs {recorded}");
    // Every PNG written carries a record, each saying what it is.
    for (f, role) in [
        ("b_sr_0.png", "sr"),
        ("b_mean.png", "mean"),
        ("b_std.png", "std"),
        ("b_strip.png", "strip"),
        ("b_lr.png", "lr"),
        ("a_sr_0.png", "sr"),
    ] {
        assert_eq!(provenance(&out.join(f)).output.role, role, "{f}");
    }
    // The sidecar is the face's record, listing its files.
    let side: Provenance = serde_json::from_slice(&std::fs::read(out.join("b_sr.json")).unwrap()).unwrap();
    assert_eq!(side.output.role, "face");
    assert!(side.files.contains(&"b_sr_1.png".to_string()), "{:?}", side.files);
    assert_eq!(
        (side.input.clone(), side.hypotheses.clone()),
        (p.input.clone(), p.hypotheses.clone())
    );

    // `info` prints it, and the command that reproduces it.
    let info = run(&["info", s(&target)], &[]);
    let text = stdout(&info);
    assert!(info.status.success(), "{}", stderr(&info));
    for want in [
        "hypothesis 1 of 2",
        "sha256 matches",
        s(&model),
        "dpm2",
        "seed 9, input index 1",
        "consistency:",
        "not evidence",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("reproduce"))
        .expect("a reproduce line");
    let cmd = lines[at + 1].trim();
    assert!(
        cmd.starts_with("srsde-fast upscale ") && cmd.contains("-o OUTDIR"),
        "{cmd}"
    );
    assert!(
        cmd.contains("--first-index 1") && cmd.contains("--seed 9") && cmd.contains("--save-lr"),
        "{cmd}"
    );

    // Run it (alone, not in the folder) and compare the face's files byte for byte.
    let again = tmp.path("again");
    let shell = format!(
        "{}{}",
        BIN,
        &cmd["srsde-fast".len()..].replace("OUTDIR", s(&again))
    );
    let r = Command::new("sh").args(["-c", &shell]).output().unwrap();
    assert!(r.status.success(), "{shell}\n{}", stderr(&r));
    assert_eq!(files(&again).len(), 7, "{:?}", files(&again));
    for f in files(&again) {
        assert!(
            std::fs::read(out.join(&f)).unwrap() == std::fs::read(again.join(&f)).unwrap(),
            "{f} differs from the original"
        );
    }

    // A changed input is flagged; a PNG without a record is an error, not a guess.
    std::fs::write(dir.join("b.png"), b"changed").unwrap();
    let text = stdout(&run(&["info", s(&target)], &[]));
    assert!(text.contains("CHANGED"), "{text}");
    let plain = tmp.path("plain.png");
    save_png(&plain, &[0.5; 3 * 16 * 16], 3, 16, 16, false).unwrap();
    let r = run(&["info", s(&plain)], &[]);
    assert!(!r.status.success());
    assert!(
        stderr(&r).contains("without srsde-fast provenance"),
        "{}",
        stderr(&r)
    );
}

/// The mean and std maps agree with the mean and std computed here from the K written hypotheses
/// (to u8 quantisation); with K = 1 the std is 0 everywhere.
#[test]
fn mean_and_std_maps_match_a_direct_computation() {
    let tmp = TempDir::new("uncertainty");
    let model = tmp.path("m.safetensors");
    // σ_max 0.1: the untrained golden model then leaves a moderate, non-saturated spread.
    write_model(&model, Some(0.1));
    let face = tmp.path("face.png");
    write_lr(&face, "celebahq_000004.jpg");
    let run_k = |k: &str, out: &Path| {
        let r = upscale(
            &[
                s(&face),
                "-o",
                s(out),
                "--model",
                s(&model),
                "--sampler",
                "dpm2",
                "--steps",
                "3",
                "--samples",
                k,
                "--seed",
                "4",
            ],
            &[],
        );
        assert!(r.status.success(), "{}", stderr(&r));
    };
    let lut = colormap_lut();

    let out = tmp.path("k3");
    run_k("3", &out);
    let hyps: Vec<Vec<u8>> = (0..3)
        .map(|k| rgb(&out.join(format!("face_sr_{k}.png"))))
        .collect();
    let n = 128 * 128;
    let mut direct_std = vec![0.0f64; n];
    let mean_png = rgb(&out.join("face_mean.png"));
    for p in 0..n {
        let mut var = 0.0;
        for c in 0..3 {
            let v: Vec<f64> = hyps.iter().map(|h| h[p * 3 + c] as f64).collect();
            let m = v.iter().sum::<f64>() / 3.0;
            assert!(
                (mean_png[p * 3 + c] as f64 - m).abs() <= 0.5 + 1e-6,
                "mean pixel {p} channel {c}: {} vs {m}",
                mean_png[p * 3 + c]
            );
            var += v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 3.0;
        }
        direct_std[p] = (var / 3.0).sqrt();
    }
    let prov = provenance(&out.join("face_std.png"));
    let u = prov.uncertainty.clone().expect("uncertainty recorded");
    let scale = u.std_scale;
    let max = direct_std.iter().copied().fold(0.0, f64::max);
    let mean_std = direct_std.iter().sum::<f64>() / n as f64;
    assert!(max > 1.0, "the hypotheses should differ (max std {max})");
    assert!(scale >= max, "the scale {scale} must cover the largest std {max}");
    assert!(
        (u.mean_std - mean_std).abs() < 1e-9 * mean_std.max(1.0),
        "{} vs {mean_std}",
        u.mean_std
    );
    assert!((u.max_std - max).abs() < 1e-9 * max, "{} vs {max}", u.max_std);
    // Every heat-map pixel is the colour of its std on the recorded scale.
    let heat = rgb(&out.join("face_std.png"));
    let step = scale / 255.0;
    for p in 0..n {
        let colour = [heat[p * 3], heat[p * 3 + 1], heat[p * 3 + 2]];
        let ok = (0..256)
            .filter(|&i| lut[i] == colour)
            .any(|i| (i as f64 * step - direct_std[p]).abs() <= 0.5 * step + 1e-9);
        assert!(
            ok,
            "pixel {p}: colour {colour:?} does not show std {}",
            direct_std[p]
        );
    }
    // The strip: LR | 3 hypotheses | mean | std, 128-pixel tiles with 2-pixel gutters.
    let strip = image::open(out.join("face_strip.png")).unwrap();
    assert_eq!(strip.width(), 6 * 130 + 2);

    // K = 1: the std is zero everywhere (the bottom colour), the mean is the sample.
    let out1 = tmp.path("k1");
    run_k("1", &out1);
    assert_eq!(
        files(&out1),
        [
            "face_mean.png",
            "face_sr.json",
            "face_sr.png",
            "face_std.png",
            "face_strip.png"
        ]
    );
    let u1 = provenance(&out1.join("face_std.png")).uncertainty.unwrap();
    assert_eq!((u1.mean_std, u1.max_std), (0.0, 0.0));
    assert!(rgb(&out1.join("face_std.png"))
        .chunks_exact(3)
        .all(|c| c == lut[0]));
    assert_eq!(rgb(&out1.join("face_mean.png")), rgb(&out1.join("face_sr.png")));
}

/// The spread of the hypotheses grows with the noise level the sampler starts from (the model's
/// σ_max: the prior the ODE sampler starts from is N(0, σ_max²)); the same face, seed and sampler.
#[test]
fn spread_grows_with_the_starting_noise_level() {
    let tmp = TempDir::new("spread");
    let face = tmp.path("face.png");
    write_lr(&face, "celebahq_000004.jpg");
    let mut spreads = Vec::new();
    for sigma_max in [0.02, 0.1, 0.3] {
        let model = tmp.path(&format!("m{sigma_max}.safetensors"));
        write_model(&model, Some(sigma_max));
        let out = tmp.path(&format!("out{sigma_max}"));
        let r = upscale(
            &[
                s(&face),
                "-o",
                s(&out),
                "--model",
                s(&model),
                "--sampler",
                "dpm2",
                "--steps",
                "3",
                "--samples",
                "3",
                "--seed",
                "1",
            ],
            &[],
        );
        assert!(r.status.success(), "{}", stderr(&r));
        let side: Provenance =
            serde_json::from_slice(&std::fs::read(out.join("face_sr.json")).unwrap()).unwrap();
        spreads.push(side.uncertainty.unwrap().mean_std);
    }
    eprintln!("mean per-pixel std at σ_max 0.02, 0.1, 0.3: {spreads:?}");
    assert!(
        spreads.windows(2).all(|w| w[1] > 1.5 * w[0]),
        "the spread must grow with σ_max: {spreads:?}"
    );
}

fn img(data: &[f32], side: usize) -> FloatImage<'_> {
    FloatImage {
        data,
        channels: 3,
        height: side,
        width: side,
        layout: Layout::Chw,
    }
}
