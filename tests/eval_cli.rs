//! End to end: `srsde-fast eval` on the CPU with the tiny golden VE model (nf 16), 3 steps and a
//! two-value snr sweep on three validation faces: the report files, the reference rows, the
//! figures, and resuming after a lost JSONL line.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::eval::face::FaceNet;
use srsde_fast::eval::metrics::{consistency, psnr, ssim, FloatImage, ImageU8, Layout};
use srsde_fast::io::{load_hr_face, make_lr_chw, CropMode};

use common::TempDir;

/// The golden nf16 VE network as a weights file.
fn write_model(path: &Path) {
    common::write_golden_model("ncsnpp_ve_nf16.safetensors", path)
}

/// Four validation faces copied into `dir` (the evals use `--limit`).
fn write_faces(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/val128");
    [
        "celebahq_000004.jpg",
        "celebahq_000009.jpg",
        "celebahq_000014.jpg",
        "celebahq_000016.jpg",
    ]
    .iter()
    .map(|n| {
        let to = dir.join(n);
        std::fs::copy(src.join(n), &to).unwrap();
        to
    })
    .collect()
}

fn eval(model: &Path, hr: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "eval", "--device", "cpu", "--steps", "3", "--seed", "7", "--batch", "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, p) in [("--model", model), ("--hr", hr), ("-o", out)] {
        args.push(flag.into());
        args.push(p.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
        .args(&args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const REPORTS: [&str; 6] = [
    "report.md",
    "report.json",
    "per_image.csv",
    "fig4_snr.png",
    "fig5_cs_psnr.png",
    "contact_sheet.png",
];

#[test]
fn eval_end_to_end_with_sweep_and_resume() {
    let tmp = TempDir::new("e2e");
    let model = tmp.path("model.safetensors");
    write_model(&model);
    let hr_dir = tmp.path("hr");
    let faces = write_faces(&hr_dir);
    let out = tmp.path("out");
    let sweep = ["--snr-sweep", "0.05:0.1:0.05", "--limit", "3"];

    let o = eval(&model, &hr_dir, &out, &sweep);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("evaluated 3 face(s), reused 0"), "{}", text(&o));
    for f in REPORTS.iter().chain(&["results.jsonl", "eval_config.json"]) {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // Figures and sheet: PNGs of the expected size (sheet: 3 faces × rows LR, 2 SRs, HR).
    assert_eq!(png_size(&out.join("fig4_snr.png")), (960, 420));
    assert_eq!(png_size(&out.join("fig5_cs_psnr.png")), (520, 420));
    assert_eq!(
        png_size(&out.join("contact_sheet.png")),
        (3 * 130 + 2, 4 * 130 + 2)
    );

    // Table and rows.
    let md = String::from_utf8(read(&out.join("report.md"))).unwrap();
    assert!(md.contains("| HR vs HR | inf | 1.0000 |"), "{md}");
    assert!(md.contains("| bicubic |"), "{md}");
    assert!(
        md.contains("| sde-ve-cs (snr 0.05) |") && md.contains("| sde-ve-cs (snr 0.1) |"),
        "{md}"
    );
    let csv = String::from_utf8(read(&out.join("per_image.csv"))).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 4, "{csv}");

    let json: serde_json::Value = serde_json::from_slice(&read(&out.join("report.json"))).unwrap();
    let methods = json["methods"].as_array().unwrap();
    let names: Vec<&str> = methods.iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["HR vs HR", "bicubic", "sde-ve-cs", "sde-ve-cs"]);
    let hr_row = &methods[0];
    assert_eq!(hr_row["psnr"]["mean"], "inf");
    assert!((hr_row["ssim"]["mean"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert!((hr_row["cs"]["mean"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert!(hr_row["l2"]["mean"].as_f64().unwrap().abs() < 1e-9);
    // SR rows are real numbers, not degenerate.
    for m in &methods[2..] {
        let p = m["psnr"]["mean"].as_f64().unwrap();
        let cs = m["cs"]["mean"].as_f64().unwrap();
        assert!(p.is_finite() && p > 0.0 && cs.abs() <= 1.0, "{m}");
    }
    assert!(json["pearson_psnr_cs"].is_number() || json["pearson_psnr_cs"].is_null());

    // The bicubic row equals the metrics computed directly here.
    let be = CpuF32::new();
    let facenet = FaceNet::embedded(&be).unwrap();
    let images = json["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    for (i, face) in faces.iter().take(3).enumerate() {
        let hr = load_hr_face(face, 128, CropMode::Reject).unwrap();
        let (lr, guide) = make_lr_chw(&hr.pixels, 128, 128);
        let hr8 = ImageU8::from_chw_f32(3, 128, 128, &hr.pixels).unwrap();
        let bi8 = ImageU8::from_chw_f32(3, 128, 128, &guide).unwrap();
        let bi_back: Vec<f32> = {
            let mut v = vec![0.0; 3 * 128 * 128];
            for (p, px) in bi8.data.chunks_exact(3).enumerate() {
                for k in 0..3 {
                    v[k * 128 * 128 + p] = px[k] as f32 / 255.0;
                }
            }
            v
        };
        let img = |data, side| FloatImage {
            data,
            channels: 3,
            height: side,
            width: side,
            layout: Layout::Chw,
        };
        let want = [
            psnr(&hr8, &bi8).unwrap(),
            ssim(&hr8, &bi8).unwrap(),
            consistency(img(&bi_back, 128), img(&lr, 16)).unwrap(),
            facenet.compare_frames(&hr8, &bi8).unwrap().cosine,
        ];
        let rec = &images[i];
        assert_eq!(rec["file"], face.file_name().unwrap().to_str().unwrap());
        let got = &rec["methods"][1];
        assert_eq!(got["method"], "bicubic");
        let s = &got["samples"][0];
        let got = ["psnr", "ssim", "consistency", "cs"].map(|k| s[k].as_f64().unwrap());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            // PSNR/SSIM/consistency are the same computation; CS differs only by FaceNet batching.
            let tol = if k == 3 { 1e-5 } else { 1e-12 };
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "face {i} metric {k}: {g} vs {w}"
            );
        }
    }

    // Resume: lose the last face's line; only that face is recomputed and the reports are identical.
    let before: Vec<Vec<u8>> = REPORTS.iter().map(|f| read(&out.join(f))).collect();
    let jsonl = String::from_utf8(read(&out.join("results.jsonl"))).unwrap();
    let lines: Vec<&str> = jsonl.lines().collect();
    assert_eq!(lines.len(), 3);
    std::fs::write(out.join("results.jsonl"), format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let o = eval(&model, &hr_dir, &out, &sweep);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("evaluated 1 face(s), reused 2"), "{}", text(&o));
    for (f, b) in REPORTS.iter().zip(&before) {
        assert!(read(&out.join(f)) == *b, "{f} changed after resuming");
    }
    assert_eq!(read(&out.join("results.jsonl")), jsonl.as_bytes());

    // EVAL_CLI_KEEP=DIR keeps a copy of the reports for a look.
    if let Some(keep) = std::env::var_os("EVAL_CLI_KEEP") {
        std::fs::create_dir_all(&keep).unwrap();
        for f in REPORTS {
            std::fs::copy(out.join(f), Path::new(&keep).join(f)).unwrap();
        }
    }

    // Other options in the same OUTDIR: a clear error (before any sampling).
    let o = eval(
        &model,
        &hr_dir,
        &out,
        &["--snr-sweep", "0.05:0.15:0.05", "--limit", "3"],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--force") && text(&o).contains("snr"),
        "{}",
        text(&o)
    );
}

/// `--samples 2` on one face without a sweep: mean ± spread in the table, two CSV rows per SR
/// method, two different samples, and no sweep figures.
#[test]
fn eval_with_two_samples_reports_spread() {
    let tmp = TempDir::new("samples");
    let model = tmp.path("model.safetensors");
    write_model(&model);
    let hr_dir = tmp.path("hr");
    write_faces(&hr_dir);
    let out = tmp.path("out");
    let o = eval(
        &model,
        &hr_dir,
        &out,
        &["--samples", "2", "--limit", "1", "--sheet", "1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let md = String::from_utf8(read(&out.join("report.md"))).unwrap();
    let sr_row = md
        .lines()
        .find(|l| l.starts_with("| sde-ve-cs (snr 0.075) |"))
        .expect("SR row");
    assert_eq!(sr_row.matches('±').count(), 5, "{sr_row}");
    assert!(!out.join("fig4_snr.png").exists() && !out.join("fig5_cs_psnr.png").exists());
    assert_eq!(png_size(&out.join("contact_sheet.png")), (130 + 2, 3 * 130 + 2));
    let csv = String::from_utf8(read(&out.join("per_image.csv"))).unwrap();
    let sr: Vec<&str> = csv.lines().filter(|l| l.contains(",sde-ve-cs,")).collect();
    assert_eq!(sr.len(), 2, "{csv}");
    assert!(
        sr[0].starts_with("0,celebahq_000004.jpg,sde-ve-cs,0.075,0,"),
        "{}",
        sr[0]
    );
    assert!(
        sr[1].starts_with("0,celebahq_000004.jpg,sde-ve-cs,0.075,1,"),
        "{}",
        sr[1]
    );
    // Different noise per sample: different metrics.
    let tail = |l: &str| l.splitn(6, ',').nth(5).unwrap().to_string();
    assert_ne!(tail(sr[0]), tail(sr[1]));

    // The spread of the samples beside PSNR/CS, and the PSNR of their mean vs sample 1's.
    assert!(
        md.contains("| Method | Pixel std | PSNR of the mean ↑ | PSNR of sample 1 ↑ |"),
        "{md}"
    );
    let json: serde_json::Value = serde_json::from_slice(&read(&out.join("report.json"))).unwrap();
    let row = &json["methods"][2];
    assert_eq!(row["method"], "sde-ve-cs");
    let spread = &row["spread"];
    let first = json["images"][0]["methods"][2]["samples"][0]["psnr"]
        .as_f64()
        .unwrap();
    assert_eq!(spread["faces"], 1);
    assert!(spread["pixel_std"].as_f64().unwrap() > 0.0, "{spread}");
    assert!(spread["psnr_mean"].as_f64().unwrap().is_finite(), "{spread}");
    assert_eq!(spread["psnr_first"].as_f64().unwrap(), first, "{spread}");
    assert_eq!(
        json["images"][0]["methods"][2]["spread"]["pixel_std"],
        spread["pixel_std"]
    );
    // The reference rows have one sample each: no spread.
    assert!(json["methods"][1]["spread"].is_null());
    assert!(text(&o).contains("pixel std"), "{}", text(&o));
}

/// A corrupt HR file is reported by name and skipped; the other faces are still evaluated, the
/// reports are written, and the exit code is non-zero.
#[test]
fn a_bad_hr_file_does_not_stop_the_others() {
    let tmp = TempDir::new("badfile");
    let model = tmp.path("model.safetensors");
    write_model(&model);
    let hr_dir = tmp.path("hr");
    write_faces(&hr_dir);
    // Sorted first, so it is met before the good faces.
    std::fs::write(hr_dir.join("aaa_broken.png"), b"not a png at all").unwrap();
    // A truncated JPEG (the decoder would fill its lower part with grey) is no ground truth either.
    let jpg = read(&hr_dir.join("celebahq_000009.jpg"));
    std::fs::write(hr_dir.join("aab_cut.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    let out = tmp.path("out");
    let o = eval(&model, &hr_dir, &out, &["--limit", "1", "--sheet", "1"]);
    assert!(
        !o.status.success(),
        "a skipped file must make the exit code non-zero"
    );
    let t = text(&o);
    assert!(t.contains("aaa_broken.png"), "{t}");
    assert!(t.contains("aab_cut.jpg") && t.contains("truncated"), "{t}");
    let csv = String::from_utf8(read(&out.join("per_image.csv"))).unwrap();
    assert!(
        csv.contains("celebahq_000004.jpg") && !csv.contains("aaa_broken") && !csv.contains("aab_cut"),
        "{csv}"
    );
}
