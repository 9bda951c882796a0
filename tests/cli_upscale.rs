//! End to end: `srsde-fast upscale` on the CPU with the tiny golden VE model (nf 16) and a few steps,
//! over a folder of good, odd and broken inputs.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{ColorType, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use srsde_fast::io::{load_hr_face, make_lr_chw, save_png, CropMode};

use common::{write_golden_model, TempDir};

/// The golden nf16 VE network as a weights file (`param.*` minus the derived `sigmas`, config and
/// data from the metadata).
fn write_model(path: &Path) {
    write_golden_model("ncsnpp_ve_nf16.safetensors", path)
}

/// The inputs: a real 16×16 LR face (a validation face degraded as the paper does), a 16-bit
/// grayscale face, a 32×32 RGBA image, a non-square image and a file that is not an image.
fn write_inputs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let hr_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/val128/celebahq_000004.jpg");
    let hr = load_hr_face(&hr_path, 128, CropMode::Reject).unwrap();
    let (lr, _) = make_lr_chw(&hr.pixels, 128, 128);
    save_png(&dir.join("good.png"), &lr, 3, 16, 16, false).unwrap();

    let plane = 16 * 16;
    let gray: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(16, 16, |x, y| {
        let p = (y * 16 + x) as usize;
        let v = (lr[p] + lr[plane + p] + lr[2 * plane + p]) / 3.0;
        Luma([(v * 65535.0) as u16])
    });
    gray.save(dir.join("gray.png")).unwrap();

    let rgba: RgbaImage = ImageBuffer::from_fn(32, 32, |x, y| {
        Rgba([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8, 128])
    });
    rgba.save(dir.join("rgba.png")).unwrap();

    let wide: RgbImage = ImageBuffer::from_fn(20, 16, |x, y| Rgb([(x * 12) as u8, (y * 15) as u8, 90]));
    wide.save(dir.join("wide.png")).unwrap();

    std::fs::write(
        dir.join("broken.png"),
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    )
    .unwrap();
}

fn upscale(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
        .arg("upscale")
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .expect("run srsde-fast");
    eprintln!(
        "$ srsde-fast upscale {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Decoded size and colour type of a PNG.
fn png_info(path: &Path) -> (u32, u32, ColorType) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height(), img.color())
}

#[test]
fn upscale_folder_end_to_end() {
    let t0 = std::time::Instant::now();
    let tmp = TempDir::new("upscale");
    let model = tmp.path("ve_nf16.safetensors");
    write_model(&model);
    let inputs = tmp.path("in");
    write_inputs(&inputs);
    let out = tmp.path("out");
    let gif = tmp.path("out/trajectory.gif");
    // The paper's sampler, named: on the CPU the default would be the fast dpm2.
    let base = [
        s(&inputs),
        "-o",
        s(&out),
        "--model",
        s(&model),
        "--sampler",
        "sde-ve-cs",
        "--steps",
        "3",
    ];
    let first: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--seed", "11", "--save-lr", "--trajectory", s(&gif)])
        .collect();

    // Run 1: the good inputs are upscaled, the bad ones named, the exit code is non-zero.
    let r1 = upscale(&first);
    let (stdout, stderr) = text(&r1);
    assert!(!r1.status.success(), "bad inputs must fail the run");
    for line in [
        "seed: 11",
        "model: ",
        "sampler: sde-ve-cs",
        "3 steps",
        "device: cpu",
    ] {
        assert!(stdout.contains(line), "stdout lacks `{line}`");
    }
    assert!(
        stderr.contains("broken.png") && stderr.contains("cannot decode"),
        "corrupt file not named"
    );
    assert!(
        stderr.contains("wide.png") && stderr.contains("not square"),
        "non-square file not named"
    );
    assert!(
        stderr.contains("rgba.png") && stderr.contains("alpha"),
        "no note on the dropped alpha"
    );
    assert!(stderr.contains("resized 32×32"), "no note on the resize");
    assert!(!out.join("wide_sr.png").exists() && !out.join("broken_sr.png").exists());
    for name in ["good", "rgba"] {
        assert_eq!(
            png_info(&out.join(format!("{name}_sr.png"))),
            (128, 128, ColorType::Rgb8),
            "{name}"
        );
        assert_eq!(
            png_info(&out.join(format!("{name}_lr.png"))),
            (128, 128, ColorType::Rgb8),
            "{name}"
        );
    }
    assert_eq!(
        png_info(&out.join("gray_sr.png")),
        (128, 128, ColorType::L8),
        "gray stays gray"
    );
    assert_eq!(png_info(&out.join("gray_lr.png")), (128, 128, ColorType::L8));
    // The trajectory: the guide, one frame per step (3 steps), then the final picture held.
    let frames = {
        use image::AnimationDecoder;
        let dec =
            image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap()))
                .unwrap();
        dec.into_frames().collect_frames().unwrap()
    };
    assert!(frames.len() >= 4, "{} frames", frames.len());
    assert!(frames.iter().all(|f| f.buffer().dimensions() == (128, 128)));
    let sr1 = std::fs::read(out.join("good_sr.png")).unwrap();
    let gray1 = std::fs::read(out.join("gray_sr.png")).unwrap();

    // Run 2: the same command refuses to overwrite, naming the file and --force, and writes nothing.
    let r2 = upscale(&first);
    let (_, stderr) = text(&r2);
    assert!(!r2.status.success());
    assert!(
        stderr.contains("good_sr.png") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(out.join("good_sr.png")).unwrap(), sr1);

    // Run 3: with --force it runs again; the same seed gives byte-identical outputs.
    let forced: Vec<&str> = first.iter().copied().chain(["--force"]).collect();
    let r3 = upscale(&forced);
    assert!(text(&r3).0.contains("wrote"), "nothing written with --force");
    assert_eq!(
        std::fs::read(out.join("good_sr.png")).unwrap(),
        sr1,
        "same seed, different output"
    );
    assert_eq!(std::fs::read(out.join("gray_sr.png")).unwrap(), gray1);

    // Run 4: one good face, another seed, two hypotheses in one batch: exit code 0, `_sr_{k}` names,
    // results differ from the first seed's and from each other.
    let out4 = tmp.path("out4");
    let good = inputs.join("good.png");
    let args4 = [
        s(&good),
        "-o",
        s(&out4),
        "--model",
        s(&model),
        "--sampler",
        "sde-ve-cs",
        "--steps",
        "3",
        "--seed",
        "12",
        "--samples",
        "2",
        "--batch",
        "2",
    ];
    let r4 = upscale(&args4);
    assert!(r4.status.success(), "a clean run must succeed");
    let k0 = std::fs::read(out4.join("good_sr_0.png")).unwrap();
    let k1 = std::fs::read(out4.join("good_sr_1.png")).unwrap();
    assert_eq!(png_info(&out4.join("good_sr_1.png")), (128, 128, ColorType::Rgb8));
    assert!(!out4.join("good_sr.png").exists());
    assert_ne!(k0, k1, "two hypotheses are identical");
    assert_ne!(k0, sr1, "a different seed gave the same output");
    eprintln!("end-to-end test took {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn upscale_without_model_says_what_to_do() {
    let tmp = TempDir::new("nomodel");
    let face = tmp.path("a.png");
    save_png(&face, &[0.5; 3 * 16 * 16], 3, 16, 16, false).unwrap();
    if srsde_fast::model::default::has_embedded() {
        // The lookup with a bundled model is covered by tests/sharded_weights.rs.
        println!("skipped: this build bundles a default model");
        return;
    }
    // No override and no installed model either.
    let r = Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
        .args(["upscale", "--device", "cpu", s(&face), "-o", s(&tmp.path("out"))])
        .env_remove(srsde_fast::model::default::ENV_VAR)
        .env("XDG_DATA_HOME", tmp.path("home"))
        .output()
        .expect("run srsde-fast");
    let (_, stderr) = text(&r);
    assert!(!r.status.success());
    assert!(
        stderr.contains("--model") && stderr.contains("no bundled default model"),
        "{stderr}"
    );
    assert!(
        !tmp.path("out").exists(),
        "nothing may be created without a model"
    );
}

#[test]
fn same_stem_in_two_folders_is_not_overwritten() {
    let tmp = TempDir::new("stems");
    let model = tmp.path("m.safetensors");
    write_model(&model);
    for dir in ["a", "b"] {
        std::fs::create_dir_all(tmp.path(dir)).unwrap();
        save_png(
            &tmp.path(dir).join("face.png"),
            &[0.4; 3 * 16 * 16],
            3,
            16,
            16,
            false,
        )
        .unwrap();
    }
    let out = tmp.path("out");
    let r = upscale(&[
        s(&tmp.path("a")),
        s(&tmp.path("b")),
        "-o",
        s(&out),
        "--model",
        s(&model),
        "--steps",
        "2",
        "--sampler",
        "sde-ve",
        "--seed",
        "1",
    ]);
    assert!(r.status.success());
    assert!(out.join("a_face_sr.png").exists() && out.join("b_face_sr.png").exists());
    assert!(!out.join("face_sr.png").exists());
}

/// The VP model (data in [−1,1], Euler–Maruyama by default) and the original `.pth` checkpoint layout
/// both run through the command.
#[test]
fn vp_model_and_original_checkpoint() {
    let tmp = TempDir::new("vp-pth");
    let face = tmp.path("face.png");
    save_png(&face, &[0.3; 3 * 16 * 16], 3, 16, 16, false).unwrap();

    let vp = tmp.path("vp.safetensors");
    write_golden_model("ncsnpp_vp_nf16.safetensors", &vp);
    let out = tmp.path("vp-out");
    let r = upscale(&[
        s(&face),
        "-o",
        s(&out),
        "--model",
        s(&vp),
        "--steps",
        "2",
        "--seed",
        "3",
    ]);
    let (stdout, _) = text(&r);
    assert!(r.status.success());
    assert!(
        stdout.contains("vp SDE") && stdout.contains("data in [-1,1]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sampler: sde-vp: Euler–Maruyama, 2 steps"),
        "{stdout}"
    );
    assert_eq!(png_info(&out.join("face_sr.png")), (128, 128, ColorType::Rgb8));

    let pth = common::golden_path("srsde_checkpoint_ve_nf16.pth");
    let out = tmp.path("pth-out");
    let r = upscale(&[
        s(&face),
        "-o",
        s(&out),
        "--model",
        s(&pth),
        "--steps",
        "2",
        "--sampler",
        "sde-ve",
    ]);
    let (stdout, stderr) = text(&r);
    assert!(r.status.success());
    assert!(stderr.contains("EMA weights"), "{stderr}");
    assert!(
        stdout.contains("seed: ") && stdout.contains("from the clock"),
        "a drawn seed must be printed"
    );
    assert_eq!(png_info(&out.join("face_sr.png")), (128, 128, ColorType::Rgb8));
}

#[test]
fn degrade_writes_the_papers_lr_and_keeps_going_past_a_bad_file() {
    let tmp = TempDir::new("degrade");
    let dir = tmp.path("hr");
    std::fs::create_dir_all(&dir).unwrap();
    let hr_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/val128/celebahq_000004.jpg");
    std::fs::copy(&hr_path, dir.join("face.jpg")).unwrap();
    std::fs::write(dir.join("broken.png"), b"\x89PNG\r\n\x1a\nnot a png").unwrap();
    let out = tmp.path("lr");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
            .args(["degrade", s(&dir), "-o", s(&out)])
            .output()
            .expect("run srsde-fast")
    };
    let r = run();
    let (stdout, stderr) = text(&r);
    assert!(!r.status.success(), "a bad file makes the exit status fail");
    assert!(stderr.contains("broken.png"), "the bad file is named: {stderr}");
    assert!(stdout.contains("wrote 1 LR face"), "{stdout}");
    // The written LR is the paper's, quantized to 8 bits.
    let hr = load_hr_face(&dir.join("face.jpg"), 128, CropMode::Reject).unwrap();
    let (lr, _) = make_lr_chw(&hr.pixels, 128, 128);
    let written = image::open(out.join("face_lr16.png")).unwrap().to_rgb8();
    assert_eq!(written.dimensions(), (16, 16));
    for (i, p) in written.pixels().enumerate() {
        for c in 0..3 {
            let want = srsde_fast::io::image::quantize_u8(lr[c * 256 + i]);
            assert_eq!(p.0[c], want, "pixel {i} channel {c}");
        }
    }
    // Nothing is overwritten on a second run.
    let before = std::fs::read(out.join("face_lr16.png")).unwrap();
    let (_, stderr) = text(&run());
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(out.join("face_lr16.png")).unwrap(), before);
}

/// The README's main job: the bundled example through the bundled model with no `--model`, on the
/// CPU's default sampler — and the result is closer to the HR than the bicubic guide is.
#[test]
fn bundled_model_improves_on_bicubic_for_the_bundled_example() {
    if !srsde_fast::model::default::has_embedded() {
        println!("skipped: this build bundles no default model (assets/model/ holds no export)");
        return;
    }
    let tmp = TempDir::new("bundled");
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/examples");
    let out = tmp.path("out");
    let r = Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
        .args(["upscale", "--device", "cpu", "--save-lr"])
        .arg(examples.join("astronaut_lr16.png"))
        .args(["-o", s(&out)])
        .env_remove(srsde_fast::model::default::ENV_VAR)
        .output()
        .expect("run srsde-fast");
    let (stdout, stderr) = text(&r);
    assert!(r.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("bundled"), "the bundled model is used: {stdout}");
    let load = |p: &Path| {
        let f = load_hr_face(p, 128, CropMode::Reject).unwrap();
        srsde_fast::eval::metrics::ImageU8::from_chw_f32(3, 128, 128, &f.pixels).unwrap()
    };
    let hr = load(&examples.join("astronaut_hr128.png"));
    let sr = load(&out.join("astronaut_lr16_sr.png"));
    let bicubic = load(&out.join("astronaut_lr16_lr.png"));
    let psnr = |a| srsde_fast::eval::metrics::psnr(a, &hr).unwrap();
    let (p_sr, p_bic) = (psnr(&sr), psnr(&bicubic));
    println!("bundled example: PSNR SR {p_sr:.2} dB, bicubic {p_bic:.2} dB");
    assert!(p_sr > p_bic, "SR {p_sr:.2} dB is not above bicubic {p_bic:.2} dB");
}
