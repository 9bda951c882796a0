//! Sharded f16 exports (`export --dtype f16 --shard-mib N`) and the default-model lookup of
//! `upscale`/`eval` without `--model`: round trip within f16 rounding, every shard within the
//! limit, a missing or corrupt shard named in the error, the `SRSDE_MODEL` override end to end.
//! All with small random-weight models (no embedded weights are needed or used).
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::model::default::ENV_VAR;
use srsde_fast::model::load::{load_network, load_weights};
use srsde_fast::model::sharded::{load_sharded, save_sharded, INDEX_FILE};
use srsde_fast::model::weights::StorageType;
use srsde_fast::model::NetConfig;
use srsde_fast::tensor::HostTensor;
use srsde_fast::train::checkpoint::CHECKPOINT_FILE;
use srsde_fast::train::init::paper_init;
use srsde_fast::train::run::Trainer;
use srsde_fast::train::Hyper;

/// ve-tiny (nf 16, the paper's 7 levels at 128×128) with its original random initialisation.
fn tiny_model() -> (NetConfig, BTreeMap<String, HostTensor>) {
    let cfg = NetConfig::preset("ve-tiny").unwrap();
    let w = paper_init(&cfg, 5);
    (cfg, w)
}

const KIB: usize = 1024;

fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn f16_shards_round_trip_within_rounding_and_stay_under_the_limit() {
    let (cfg, w) = tiny_model();
    let n_values: usize = w.values().map(|t| t.data.len()).sum();
    let tmp = TempDir::new("shards");
    let dir = tmp.path("model");
    let limit = 256 * KIB;
    let index = save_sharded(&dir, &cfg, &w, StorageType::F16, limit, None).unwrap();

    // The f16 data alone needs this many shards at least; the packing may use one more.
    let min_shards = (2 * n_values).div_ceil(limit);
    let shards = shard_files(&dir);
    println!(
        "{n_values} values → {} shards (limit {} KiB)",
        shards.len(),
        limit / KIB
    );
    assert!(shards.len() >= min_shards.max(2), "{} shards", shards.len());
    assert!(shards.len() <= min_shards + 1, "{} shards", shards.len());
    assert_eq!(index.shards.len(), shards.len());
    for (i, p) in shards.iter().enumerate() {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            name,
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        );
        let size = std::fs::metadata(p).unwrap().len();
        assert!(size as usize <= limit, "{name}: {size} bytes > {limit}");
        assert_eq!(size, index.shards[i].bytes);
    }
    assert_eq!(index.dtype, "f16");
    assert_eq!(index.parameters as usize, n_values);

    // Loaded through the folder and through the index: the same f32 tensors, each value within
    // f16 rounding (relative 2^-11 for normal values, 2^-25 absolute near zero).
    let (_, cfg2, got) = load_sharded(&dir).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(got.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    let mut worst = 0.0f64;
    for (name, t) in &w {
        let g = &got[name];
        assert_eq!(g.shape, t.shape, "{name}");
        for (a, b) in t.data.iter().zip(&g.data) {
            let err = (*a as f64 - *b as f64).abs();
            let bound = (a.abs() as f64 * 2f64.powi(-11)).max(2f64.powi(-25));
            assert!(err <= bound, "{name}: {a} stored as {b}");
            if a.abs() > 1e-3 {
                worst = worst.max(err / a.abs() as f64);
            }
        }
    }
    println!("worst relative f16 rounding error {worst:.2e}");
    let lw = load_weights(&dir.join(INDEX_FILE), None).unwrap();
    assert_eq!(lw.weights, got);
    // And as a network, through the same path `--model DIR` takes.
    let (net, _) = load_network(&CpuF32::new(), &dir, None).unwrap();
    assert_eq!(net.config, cfg);
}

#[test]
fn missing_or_corrupt_shards_are_named() {
    let (cfg, w) = tiny_model();
    let tmp = TempDir::new("bad_shards");
    let dir = tmp.path("model");
    save_sharded(&dir, &cfg, &w, StorageType::F16, 256 * KIB, None).unwrap();
    let shards = shard_files(&dir);
    let second = shards[1].clone();
    let name = second.file_name().unwrap().to_string_lossy().into_owned();
    let good = std::fs::read(&second).unwrap();

    // Missing.
    std::fs::remove_file(&second).unwrap();
    let e = load_weights(&dir, None).err().expect("an error").to_string();
    assert!(e.contains(&name) && e.contains("missing"), "{e}");

    // One flipped byte in the tensor data: same size, different sha256.
    let mut bad = good.clone();
    let k = bad.len() - 10;
    bad[k] ^= 0x40;
    std::fs::write(&second, &bad).unwrap();
    let e = load_weights(&dir, None).err().expect("an error").to_string();
    assert!(e.contains(&name) && e.contains("sha256"), "{e}");

    // Truncated.
    std::fs::write(&second, &good[..good.len() / 2]).unwrap();
    let e = load_weights(&dir, None).err().expect("an error").to_string();
    assert!(e.contains(&name) && e.contains("bytes"), "{e}");

    // Restored: loads again.
    std::fs::write(&second, &good).unwrap();
    load_weights(&dir, None).unwrap();

    // A folder without an index says so.
    let empty = tmp.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = load_weights(&empty, None).err().expect("an error").to_string();
    assert!(e.contains(INDEX_FILE), "{e}");
}

fn srsde(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_srsde-fast"));
    cmd.args(args).env_remove(ENV_VAR);
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

#[test]
fn export_cli_writes_f16_shards_with_the_training_record() {
    let (cfg, w) = tiny_model();
    let tmp = TempDir::new("export_cli");
    let run = tmp.path("run");
    std::fs::create_dir_all(&run).unwrap();
    let be = CpuF32::new();
    let mut hyper = Hyper::paper("ve-tiny", &cfg);
    hyper.batch = 3;
    let mut tr = Trainer::from_weights(&be, cfg.clone(), hyper, w).unwrap();
    tr.step = 7; // as if 7 steps of batch 3 were done
    tr.save_checkpoint(21, &run.join(CHECKPOINT_FILE)).unwrap();

    let out = tmp.path("export");
    let (r, o) = (run.to_str().unwrap(), out.to_str().unwrap());
    let res = srsde(
        &["export", r, "-o", o, "--dtype", "f16", "--shard-mib", "0.25"],
        &[],
    );
    assert!(res.status.success());
    let n = shard_files(&out).len();
    assert!(n >= 2, "{n} shards");
    for p in shard_files(&out) {
        assert!(std::fs::metadata(&p).unwrap().len() <= 256 * 1024);
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["training"]["steps"], 7);
    assert_eq!(index["training"]["images_seen"], 21);
    assert_eq!(index["training"]["runs"], 1);
    assert_eq!(index["dtype"], "f16");

    // An existing export is kept without --force; with it, a larger shard size replaces the
    // export and leaves no stale shard behind.
    let again = srsde(&["export", r, "-o", o, "--dtype", "f16", "--shard-mib", "1"], &[]);
    assert!(!again.status.success());
    assert_eq!(shard_files(&out).len(), n);
    let forced = srsde(
        &[
            "export",
            r,
            "-o",
            o,
            "--dtype",
            "f16",
            "--shard-mib",
            "8",
            "--force",
        ],
        &[],
    );
    assert!(forced.status.success());
    let names: Vec<String> = shard_files(&out)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["model-00001-of-00001.safetensors"]);
    load_weights(&out, None).unwrap();
}

/// A synthetic 16×16 RGB "face" (a smooth pattern; the plumbing is under test, not the picture).
fn write_lr(path: &Path) {
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 15) as u8, (y * 15) as u8, 128]));
    img.save(path).unwrap();
}

#[test]
fn upscale_without_model_uses_the_override_or_explains() {
    let (cfg, w) = tiny_model();
    let tmp = TempDir::new("default_model");
    let model = tmp.path("model");
    save_sharded(&model, &cfg, &w, StorageType::F16, 256 * KIB, None).unwrap();
    let lr = tmp.path("face.png");
    write_lr(&lr);
    let out = tmp.path("out");
    let empty_home = tmp.path("home"); // no installed model there
    std::fs::create_dir_all(&empty_home).unwrap();
    let (l, o) = (lr.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "upscale", l, "-o", o, "--device", "cpu", "--steps", "2", "--seed", "1",
    ];

    // SRSDE_MODEL names the sharded export: no --model needed.
    let res = srsde(&args, &[(ENV_VAR, &model), ("XDG_DATA_HOME", &empty_home)]);
    assert!(res.status.success());
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains(&*model.display().to_string()), "{stdout}");
    // On the CPU a VE model samples with the fast dpm2 unless --sampler says otherwise.
    assert!(stdout.contains("sampler: dpm2"), "{stdout}");
    let sr = image::open(out.join("face_sr.png")).unwrap();
    assert_eq!((sr.width(), sr.height()), (128, 128));

    // Installed in the user data folder: found there when the binary has no bundled model.
    let installed = empty_home.join("srsde-fast/model");
    save_sharded(
        &installed,
        &cfg,
        &paper_init(&cfg, 6),
        StorageType::F16,
        256 * KIB,
        None,
    )
    .unwrap();
    let res = srsde(
        &[&args[..], &["--force"]].concat(),
        &[("XDG_DATA_HOME", &empty_home)],
    );
    assert!(res.status.success());
    let stdout = String::from_utf8_lossy(&res.stdout).into_owned();
    if srsde_fast::model::default::has_embedded() {
        assert!(stdout.contains("bundled default model"), "{stdout}");
    } else {
        assert!(stdout.contains(&*installed.display().to_string()), "{stdout}");
    }
    std::fs::remove_dir_all(&installed).unwrap();

    // Nothing anywhere: without a bundled model the error says so and how to get one.
    let res = srsde(
        &[&args[..], &["--force"]].concat(),
        &[("XDG_DATA_HOME", &empty_home)],
    );
    if srsde_fast::model::default::has_embedded() {
        println!("this build bundles a default model: it was used");
        assert!(res.status.success());
    } else {
        assert!(!res.status.success());
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            err.contains("no bundled default model") && err.contains("--model") && err.contains(ENV_VAR),
            "{err}"
        );
    }

    // A bad override is an error naming it (never a silent fallback to another model).
    let res = srsde(&args, &[(ENV_VAR, &tmp.path("nothing-here"))]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("nothing-here"));
}

#[test]
fn eval_without_model_uses_the_override() {
    let (cfg, w) = tiny_model();
    let tmp = TempDir::new("eval_default");
    let model = tmp.path("model");
    save_sharded(&model, &cfg, &w, StorageType::F16, 256 * KIB, None).unwrap();
    let hr = tmp.path("hr");
    std::fs::create_dir_all(&hr).unwrap();
    let face = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/val128/celebahq_000004.jpg");
    std::fs::copy(&face, hr.join("face.jpg")).unwrap();
    let out = tmp.path("eval");
    let (h, o) = (hr.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "eval",
        "--hr",
        h,
        "-o",
        o,
        "--device",
        "cpu",
        "--sampler",
        "dpm2",
        "--steps",
        "2",
        "--sheet",
        "0",
    ];
    let res = srsde(&args, &[(ENV_VAR, &model)]);
    assert!(res.status.success());
    assert!(out.join("report.md").is_file());
    // The run records the sharded export (its index) as the model, so a resume can check it.
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_config.json")).unwrap()).unwrap();
    let recorded = cfg_json["model"].as_str().unwrap();
    assert!(recorded.ends_with(INDEX_FILE), "{recorded}");
    let shard_bytes: u64 = shard_files(&model)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(cfg_json["model_bytes"], shard_bytes);
}

#[test]
fn upscale_help_shows_examples_and_the_model_lookup() {
    let res = srsde(&["upscale", "--help"], &[]);
    assert!(res.status.success());
    let help = String::from_utf8_lossy(&res.stdout);
    for want in [
        "--model model/",
        "LR",
        "SR",
        "sde-ve-cs",
        "assets/model/",
        ENV_VAR,
    ] {
        assert!(help.contains(want), "`{want}` missing from upscale --help");
    }
}

/// A NaN in a sharded export is an error naming the shard that holds it and the tensor.
#[test]
fn a_nan_in_a_shard_is_named_with_its_shard_and_tensor() {
    let (cfg, mut w) = tiny_model();
    let name = w.keys().nth(20).unwrap().clone();
    w.get_mut(&name).unwrap().data[1] = f32::NAN;
    let tmp = TempDir::new("nan-shard");
    let dir = tmp.path("model");
    let index = save_sharded(&dir, &cfg, &w, StorageType::F16, 256 * KIB, None).unwrap();
    assert!(index.shards.len() > 1);
    let shard = &index
        .shards
        .iter()
        .find(|s| s.tensors.contains(&name))
        .unwrap()
        .file;
    let e = load_weights(&dir, None)
        .err()
        .expect("a NaN must not load")
        .to_string();
    assert!(
        e.contains(shard.as_str()) && e.contains(&name) && e.contains("non-finite"),
        "{e}"
    );
}
