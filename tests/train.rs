//! Training: the DSM loss against the original's gradients, Adam/EMA/clip/warm-up against their
//! formulas, the data loader, a tiny CPU run that learns, exact resume, crash-safe checkpoints and
//! export of inference weights.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::Golden;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::backend::Backend;
use srsde_fast::check::rel_err;
use srsde_fast::model::load::load_weights;
use srsde_fast::model::ncsnpp::param_specs;
use srsde_fast::model::weights::StorageType;
use srsde_fast::model::{Ncsnpp, NetConfig, ScoreModel};
use srsde_fast::tensor::HostTensor;
use srsde_fast::train::checkpoint::{self, Checkpoint, CHECKPOINT_FILE};
use srsde_fast::train::data::{epoch_permutation, load_sample, FaceCache, FaceFolder, Loader, LoaderOptions};
use srsde_fast::train::init::paper_init;
use srsde_fast::train::loss::{draw_times, dsm_loss};
use srsde_fast::train::optim::{
    adam_update, clip_scale, global_norm, scheduled_lr, warmup_lr, Adam, AdamConfig, Ema, LrDecay,
};
use srsde_fast::train::run::{train, StopReason, TrainOptions, Trainer};

fn faces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/faces128")
}

/// A fresh empty folder under the system temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("srsde_train_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A folder with the first `n` faces of ../shared/data/faces128 (sorted by name).
fn face_subset(name: &str, n: usize) -> PathBuf {
    let dir = scratch(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(faces_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "png"))
        .collect();
    files.sort();
    for f in files.iter().take(n) {
        std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// A small VE network for fast CPU runs: 32×32 images, 3 levels, nf 16, attention at 16.
fn tiny_options(data: &Path, out: &Path, steps: u64) -> TrainOptions {
    let mut o = TrainOptions::new(data, out, "ve-tiny", steps);
    o.image_size = Some(32);
    o.ch_mult = Some(vec![1, 2, 2]);
    o.batch = Some(4);
    o.lr = Some(2e-3);
    o.warmup = Some(5);
    o.seed = Some(7);
    o.ckpt_every = 0;
    o
}

// ---- loss against the reference --------------------------------------------------------------

#[test]
fn dsm_loss_gradients_match_reference_ve() {
    check_loss_against_reference("ncsnpp_ve_nf16.safetensors");
}

#[test]
fn dsm_loss_gradients_match_reference_vp() {
    check_loss_against_reference("ncsnpp_vp_nf16.safetensors");
}

/// Our loss with the golden t and z: loss and every trainable parameter's gradient within 1e-4.
fn check_loss_against_reference(file: &str) {
    let golden = Golden::load(file);
    let cfg = NetConfig::from_json(
        &golden.metadata["config"],
        golden.metadata.get("data").map(|s| s.as_str()),
    )
    .unwrap();
    let mut w = BTreeMap::new();
    for name in golden.names_with_prefix("param.") {
        let key = name.trim_start_matches("param.").to_string();
        if key != "sigmas" {
            w.insert(key, golden.host(&name));
        }
    }
    let be = CpuF32::new();
    let model = ScoreModel::new(Ncsnpp::from_weights(&be, cfg.clone(), &w, "golden").unwrap());
    let dev = |n: &str| golden.host(n).to_device(&be).unwrap();
    let t: Vec<f64> = golden.get("input.t").1.clone();
    let out = dsm_loss(
        &model,
        &dev("input.x0"),
        &dev("input.y"),
        &t,
        &dev("input.z"),
        0,
        true,
    )
    .unwrap();
    let want = golden.get("output.loss").1[0];
    let e = ((out.loss - want) / want).abs();
    println!("{file}: loss {} vs {want} (rel {e:.2e})", out.loss);
    assert!(e < 1e-4, "loss rel err {e}");
    assert_eq!(out.per_sample.len(), 2);

    let grads = out.grads.unwrap();
    let (mut worst, mut count) = (0f64, 0);
    for (name, _, trainable) in param_specs(&cfg) {
        if !trainable {
            assert!(!grads.by_name.contains_key(&name), "frozen {name} got a gradient");
            continue;
        }
        let got = be.to_f32(&grads.by_name[&name]).unwrap();
        let want = golden.host(&format!("grad.{name}")).data;
        count += 1;
        if name.ends_with("NIN_1.b") {
            // Softmax ignores a per-row constant: the key bias's true gradient is 0 (both sides
            // hold rounding noise). Require it to be negligible next to the query bias gradient.
            let scale = rel_norm(
                &be.to_f32(&grads.by_name[&name.replace("NIN_1.b", "NIN_0.b")])
                    .unwrap(),
            );
            assert!(
                rel_norm(&got) <= 1e-4 * scale && rel_norm(&want) <= 1e-4 * scale,
                "{name}"
            );
            continue;
        }
        let e = rel_err(&got, &want);
        worst = worst.max(e);
        assert!(e < 1e-4, "grad.{name}: rel err {e}");
    }
    assert_eq!(count, golden.names_with_prefix("grad.").len());
    println!("{file}: {count} gradients, worst rel err {worst:.2e}");
}

fn rel_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn times_are_uniform_in_eps_one_and_seeded() {
    let t = draw_times(3, 0, 10_000, 1e-5);
    assert!(t.iter().all(|&t| (1e-5..=1.0).contains(&t)));
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    assert_eq!(t, draw_times(3, 0, 10_000, 1e-5));
    assert_ne!(t[..4], draw_times(3, 1, 4, 1e-5)[..]);
}

// ---- optimiser ------------------------------------------------------------------------------

#[test]
fn adam_matches_torch_formula_with_warmup_and_clip() {
    let cfg = AdamConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        warmup: 2,
        grad_clip: 1.0,
        decay: None,
    };
    let p0 = vec![0.5f32, -1.0, 2.0];
    let q0 = vec![0.25f32];
    let mut params = BTreeMap::from([
        ("a".to_string(), HostTensor::new(vec![3], p0.clone())),
        ("b".to_string(), HostTensor::new(vec![1], q0.clone())),
    ]);
    let mut adam = Adam::new(cfg.clone(), [("a".to_string(), 3), ("b".to_string(), 1)]);
    // Step gradients: the first two have norm > 1 (clipped), the third < 1 (not clipped).
    let steps = [
        (vec![3.0f32, 0.0, 4.0], vec![0.0f32]),
        (vec![1.0, -2.0, 0.5], vec![2.0]),
        (vec![0.1, 0.2, -0.3], vec![0.05]),
    ];
    // Reference in f64.
    let mut p: Vec<f64> = p0.iter().chain(&q0).map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0f64; 4], vec![0f64; 4]);
    for (k, (ga, gb)) in steps.iter().enumerate() {
        let g: Vec<f64> = ga.iter().chain(gb).map(|&x| x as f64).collect();
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = (1.0 / (norm + 1e-6)).min(1.0);
        let lr = 0.1 * (k as f64 / 2.0).min(1.0); // completed steps before this one: k
        let step = (k + 1) as i32;
        for i in 0..4 {
            let gi = g[i] * scale;
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.999 * v[i] + 0.001 * gi * gi;
            let mhat = m[i] / (1.0 - 0.9f64.powi(step));
            let vhat = v[i] / (1.0 - 0.999f64.powi(step));
            p[i] -= lr * mhat / (vhat.sqrt() + 1e-8);
        }
        let grads = BTreeMap::from([("a".to_string(), ga.clone()), ("b".to_string(), gb.clone())]);
        let st = adam.step(&mut params, &grads, k as u64).unwrap();
        assert!((st.grad_norm - norm).abs() < 1e-6 * norm, "norm");
        assert!((st.clip_scale - scale).abs() < 1e-9, "clip");
        assert_eq!(st.lr, lr, "warm-up lr");
        let got: Vec<f32> = params["a"]
            .data
            .iter()
            .chain(&params["b"].data)
            .copied()
            .collect();
        let want: Vec<f32> = p.iter().map(|&x| x as f32).collect();
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "step {}: params {got:?} vs {want:?}", k + 1);
        let gm: Vec<f32> = adam.m["a"].iter().chain(&adam.m["b"]).copied().collect();
        let gv: Vec<f32> = adam.v["a"].iter().chain(&adam.v["b"]).copied().collect();
        assert!(rel_err(&gm, &m.iter().map(|&x| x as f32).collect::<Vec<_>>()) < 1e-6);
        assert!(rel_err(&gv, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()) < 1e-6);
        if k == 0 {
            // The original's off-by-one warm-up: the first update has lr 0 (moments still move).
            assert_eq!(params["a"].data, p0);
            assert!(adam.m["a"].iter().any(|&x| x != 0.0));
        }
    }
    assert_eq!(adam.steps, 3);
}

#[test]
fn optimizer_pieces() {
    assert_eq!(warmup_lr(2e-4, 5000, 0), 0.0);
    assert_eq!(warmup_lr(2e-4, 5000, 2500), 1e-4);
    assert_eq!(warmup_lr(2e-4, 5000, 9000), 2e-4);
    assert_eq!(warmup_lr(2e-4, 0, 0), 2e-4);
    // The decay takes over from its start: from → to along a half cosine, then stays at `to`.
    let decay = LrDecay {
        start: 100,
        steps: 50,
        from: 4e-4,
        to: 1e-4,
    };
    let mut cfg = AdamConfig {
        lr: 4e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        warmup: 80,
        grad_clip: 1.0,
        decay: Some(decay),
    };
    assert_eq!(scheduled_lr(&cfg, 40), 2e-4, "warm-up before the decay");
    assert_eq!(scheduled_lr(&cfg, 100), 4e-4);
    assert!((scheduled_lr(&cfg, 125) - 2.5e-4).abs() < 1e-15);
    assert!((scheduled_lr(&cfg, 150) - 1e-4).abs() < 1e-15);
    assert_eq!(scheduled_lr(&cfg, 10_000), 1e-4);
    assert!(scheduled_lr(&cfg, 110) > scheduled_lr(&cfg, 120));
    cfg.decay = None;
    assert_eq!(scheduled_lr(&cfg, 10_000), 4e-4);
    assert!(LrDecay { steps: 0, ..decay }.validate().is_err());
    assert!(LrDecay {
        to: f64::NAN,
        ..decay
    }
    .validate()
    .is_err());
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert!((clip_scale(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    assert_eq!(clip_scale(100.0, -1.0), 1.0);
    assert!((global_norm([&[3.0f32][..], &[4.0f32][..]]) - 5.0).abs() < 1e-12);
    // Bias correction: the first step moves every weight by ≈ lr·sign(g) whatever |g|.
    let (mut p, mut m, mut v) = (vec![0f32; 2], vec![0f32; 2], vec![0f32; 2]);
    adam_update(
        &mut p,
        &[1e-3, -50.0],
        &mut m,
        &mut v,
        1.0,
        0.01,
        0.9,
        0.999,
        1e-8,
        1,
    );
    assert!((p[0] + 0.01).abs() < 1e-6 && (p[1] - 0.01).abs() < 1e-6, "{p:?}");
}

#[test]
fn ema_matches_formula() {
    let p = BTreeMap::from([("w".to_string(), HostTensor::new(vec![2], vec![1.0, -2.0]))]);
    let mut ema = Ema::new(0.999, p.iter());
    let mut shadow = [1.0f64, -2.0];
    let targets = [[2.0f32, 0.0], [0.0, 1.0], [5.0, 5.0]];
    for (k, tgt) in targets.iter().enumerate() {
        let q = BTreeMap::from([("w".to_string(), HostTensor::new(vec![2], tgt.to_vec()))]);
        let n = (k + 1) as f64; // the original counts this update first
        let decay = 0.999f64.min((1.0 + n) / (10.0 + n));
        assert_eq!(ema.next_decay(), decay);
        assert_eq!(ema.update(&q).unwrap(), decay);
        for i in 0..2 {
            shadow[i] -= (1.0 - decay) * (shadow[i] - tgt[i] as f64);
        }
        let want: Vec<f32> = shadow.iter().map(|&x| x as f32).collect();
        assert!(rel_err(&ema.shadow["w"], &want) < 1e-6, "update {}", k + 1);
    }
    assert_eq!(ema.updates, 3);
    // Late updates are capped by the rate.
    ema.updates = 1_000_000;
    assert_eq!(ema.next_decay(), 0.999);
}

// ---- initialisation -------------------------------------------------------------------------

#[test]
fn paper_init_follows_the_original_scales() {
    let mut cfg = NetConfig::preset("ve-tiny").unwrap();
    cfg.data.image_size = 32;
    cfg.model.ch_mult = vec![1, 2, 2];
    let w = paper_init(&cfg, 1);
    let specs = param_specs(&cfg);
    assert_eq!(w.len(), specs.len());
    let max_abs = |n: &str| w[n].data.iter().fold(0f32, |a, &b| a.max(b.abs()));
    for (name, shape, trainable) in &specs {
        assert_eq!(&w[name].shape, shape);
        if name.ends_with("bias") || name.ends_with(".b") {
            assert!(w[name].data.iter().all(|&v| v == 0.0), "{name} not zero");
        }
        if name.ends_with("Conv_1.weight") || name.ends_with("NIN_3.W") {
            assert!(max_abs(name) < 1e-4, "{name} should start near zero");
        }
        if name.ends_with("Conv_0.weight") && name.contains("all_modules.4.") {
            let fan = (shape[1] * 9 + shape[0] * 9) as f32 / 2.0;
            let limit = (3.0 / fan).sqrt();
            assert!(
                max_abs(name) <= limit && max_abs(name) > 0.8 * limit,
                "{name} uniform range"
            );
        }
        if !trainable {
            assert!(max_abs(name) > 5.0, "Fourier W ~ 16·N(0,1)");
        }
    }
    let last = &specs[specs.len() - 2].0;
    assert!(max_abs(last) < 1e-4, "output conv starts near zero");
    assert!(w["all_modules.4.GroupNorm_0.weight"]
        .data
        .iter()
        .all(|&v| v == 1.0));
    assert_eq!(paper_init(&cfg, 1), w);
    assert_ne!(
        paper_init(&cfg, 2)["all_modules.3.weight"],
        w["all_modules.3.weight"]
    );
}

// ---- data -----------------------------------------------------------------------------------

fn loader_opts(seed: u64, flip: bool) -> LoaderOptions {
    LoaderOptions {
        image_size: 32,
        batch: 3,
        flip,
        seed,
        workers: 2,
        prefetch: 6,
        cache_bytes: 64 << 20,
    }
}

#[test]
fn loader_order_is_seeded_and_resumable() {
    let dir = face_subset("order", 5);
    let folder = FaceFolder::open(&dir).unwrap();
    let files_of = |seed: u64, start: u64, batches: usize| -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut l = Loader::start(folder.clone(), loader_opts(seed, true), start).unwrap();
        (0..batches)
            .map(|_| l.next_batch().map(|b| (b.files, b.hr)).unwrap())
            .collect()
    };
    let a = files_of(1, 0, 4);
    assert_eq!(a, files_of(1, 0, 4), "same seed, same batches");
    assert_ne!(
        a.iter().map(|b| b.0.clone()).collect::<Vec<_>>(),
        files_of(2, 0, 4).iter().map(|b| b.0.clone()).collect::<Vec<_>>()
    );
    // Starting at sample 6 (after two batches of 3) continues the same stream.
    assert_eq!(a[2..], files_of(1, 6, 2)[..]);
    // Each epoch visits every file once.
    let order: Vec<usize> = a.iter().flat_map(|b| b.0.clone()).collect();
    let mut first: Vec<usize> = order[..5].to_vec();
    first.sort();
    assert_eq!(first, vec![0, 1, 2, 3, 4]);
    assert_eq!(&order[..5], &epoch_permutation(5, 1, 0)[..]);
    assert_ne!(epoch_permutation(100, 1, 0), epoch_permutation(100, 1, 1));
}

#[test]
fn the_face_cache_gives_the_decoded_samples_bit_for_bit() {
    let dir = face_subset("cache", 2);
    let folder = FaceFolder::open(&dir).unwrap();
    // 128: the faces' own size (kept as bytes); 32: resized, so kept as floats.
    for size in [128, 32] {
        let cache = FaceCache::new(2, 64 << 20);
        for round in 0..2 {
            for file in 0..2 {
                for flip in [false, true] {
                    let want = load_sample(&folder.files[file], size, flip).unwrap();
                    let got = cache.sample(&folder, file, size, flip).unwrap();
                    assert!(
                        got == want,
                        "size {size}, round {round}, file {file}, flip {flip}: cached sample differs"
                    );
                }
            }
        }
        let per_face = cache.used_bytes() / 2;
        let lr = 2 * 3 * (size / 8).pow(2) * 4;
        if size == 128 {
            assert_eq!(per_face, 3 * 128 * 128 + lr, "8-bit faces kept as bytes");
        } else {
            assert_eq!(per_face, 4 * 3 * 32 * 32 + lr, "resized faces kept as floats");
        }
    }
    // Over budget: nothing is kept, the samples are the same.
    let cache = FaceCache::new(2, 1000);
    let got = cache.sample(&folder, 1, 128, true).unwrap();
    assert!(got == load_sample(&folder.files[1], 128, true).unwrap());
    assert_eq!(cache.used_bytes(), 0);
}

#[test]
fn loader_flips_before_making_the_guide() {
    use srsde_fast::train::data::flip_at;
    // A seed whose first three samples include flipped and unflipped ones.
    let seed = (0..100u64)
        .find(|&sd| {
            let f: Vec<bool> = (0..3).map(|i| flip_at(sd, i)).collect();
            f.contains(&true) && f.contains(&false)
        })
        .unwrap();
    let dir = face_subset("flip", 1);
    let folder = FaceFolder::open(&dir).unwrap();
    let mut plain = Loader::start(folder.clone(), loader_opts(seed, false), 0).unwrap();
    let mut flipped = Loader::start(folder, loader_opts(seed, true), 0).unwrap();
    let (a, b) = (plain.next_batch().unwrap(), flipped.next_batch().unwrap());
    let (s, plane) = (32, 3 * 32 * 32);
    let mirror = |v: &[f32]| -> Vec<f32> { v.chunks(s).flat_map(|r| r.iter().rev().copied()).collect() };
    for i in 0..3 {
        let r = i * plane..(i + 1) * plane;
        let (ha, hb, ga, gb) = (
            &a.hr[r.clone()],
            &b.hr[r.clone()],
            &a.guide[r.clone()],
            &b.guide[r],
        );
        if flip_at(seed, i as u64) {
            assert_ne!(ha, hb);
            assert_eq!(mirror(ha), hb, "HR mirrored");
            // The guide of the mirrored face is the mirrored guide (the filters are symmetric).
            assert!(rel_err(&mirror(ga), gb) < 1e-5, "guide built after the flip");
        } else {
            assert_eq!((ha, ga), (hb, gb));
        }
    }
}

#[test]
fn loader_skips_bad_files_and_rejects_useless_folders() {
    let empty = scratch("empty");
    let e = FaceFolder::open(&empty).unwrap_err().to_string();
    assert!(e.contains("no images"), "{e}");

    let bad = scratch("allbad");
    for i in 0..3 {
        std::fs::write(bad.join(format!("broken{i}.png")), b"not a png").unwrap();
    }
    let mut l = Loader::start(FaceFolder::open(&bad).unwrap(), loader_opts(0, false), 0).unwrap();
    let e = l.next_batch().unwrap_err().to_string();
    assert!(
        e.contains("no readable face image") && e.contains("all 3 files"),
        "{e}"
    );

    let mixed = face_subset("mixed", 2);
    std::fs::write(mixed.join("zz_broken.jpg"), b"garbage").unwrap();
    let small = image::RgbImage::new(16, 16);
    small.save(mixed.join("zz_small.png")).unwrap();
    let mut l = Loader::start(FaceFolder::open(&mixed).unwrap(), loader_opts(0, false), 0).unwrap();
    for _ in 0..4 {
        let b = l.next_batch().unwrap();
        assert_eq!(b.len, 3);
        assert!(b.files.iter().all(|&f| f < 2), "only the two good files are used");
    }
    assert_eq!(
        l.skipped().len(),
        2,
        "each bad file counted once: {:?}",
        l.skipped()
    );

    // Mostly bad files: runs of failures across epoch boundaries longer than the folder are fine
    // while one file is readable.
    let sparse = face_subset("sparse", 1);
    for i in 0..5 {
        std::fs::write(sparse.join(format!("broken{i}.png")), b"not a png").unwrap();
    }
    let opts = LoaderOptions {
        batch: 1,
        ..loader_opts(3, false)
    };
    let mut l = Loader::start(FaceFolder::open(&sparse).unwrap(), opts, 0).unwrap();
    for _ in 0..20 {
        assert_eq!(l.next_batch().unwrap().len, 1);
    }
    assert_eq!(l.skipped().len(), 5);
}

// ---- whole runs -----------------------------------------------------------------------------

#[test]
fn tiny_cpu_run_lowers_the_loss() {
    let data = face_subset("learn", 8);
    let out = scratch("learn_run");
    let t0 = std::time::Instant::now();
    let s = train(
        &CpuF32::new(),
        &tiny_options(&data, &out, 60),
        &AtomicBool::new(false),
    )
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(s.stopped, StopReason::Finished);
    assert_eq!((s.start_step, s.end_step, s.losses.len()), (0, 60, 60));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&s.losses[..10]), mean(&s.losses[50..]));
    println!(
        "{} params, {secs:.1} s; loss first 10 {first:.1}, last 10 {last:.1}",
        s.num_params
    );
    assert!(last < 0.5 * first, "loss did not fall clearly: {first} -> {last}");
    // One JSONL line per step with the logged fields.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 60);
    assert_eq!(lines[0]["lr"], 0.0, "first step has lr 0 (warm-up off-by-one)");
    for k in ["step", "loss", "lr", "grad_norm", "images_per_s"] {
        assert!(lines[59][k].is_number(), "{k}");
    }
    assert!(out.join(CHECKPOINT_FILE).is_file());
}

/// The (step, `field`) pairs of a run's log.
fn logged(run: &Path, field: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v[field].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_continues_exactly() {
    let data = face_subset("resume", 6);
    let (a, b) = (scratch("resume_a"), scratch("resume_b"));
    let stop = AtomicBool::new(false);
    let be = CpuF32::new();
    let mut whole = tiny_options(&data, &a, 6);
    whole.ckpt_every = 2;
    let full = train(&be, &whole, &stop).unwrap();

    let first = train(&be, &tiny_options(&data, &b, 3), &stop).unwrap();
    // Pretend steps after the checkpoint were logged before a crash: the resume drops them.
    let log = b.join("train_log.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"step\":4,\"loss\":-1.0}\n");
    std::fs::write(&log, text).unwrap();
    let mut cont = tiny_options(&data, &b, 6);
    cont.resume = true;
    let second = train(&be, &cont, &stop).unwrap();
    assert_eq!((second.start_step, second.end_step), (3, 6));
    let joined: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(joined, full.losses, "losses of the resumed run differ");
    let logged = logged(&b, "loss");
    // (serde_json's float parsing is not exactly round-trip; compare to 1e-12.)
    assert_eq!(
        logged.iter().map(|l| l.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<u64>>(),
        "log: each step once"
    );
    for ((_, got), want) in logged.iter().zip(&joined) {
        assert!(
            (got - want).abs() <= 1e-12 * want.abs(),
            "logged loss {got} vs {want}"
        );
    }

    let (ca, cb) = (Checkpoint::load(&a).unwrap(), Checkpoint::load(&b).unwrap());
    assert_eq!(ca.state, cb.state);
    assert_eq!(ca.params, cb.params, "weights");
    assert_eq!(ca.ema, cb.ema, "EMA");
    assert_eq!(ca.adam, cb.adam, "Adam moments");

    // A resume with a conflicting setting is refused; a fresh run over a checkpoint too.
    let mut clash = tiny_options(&data, &b, 8);
    clash.resume = true;
    clash.lr = Some(1.0);
    let e = train(&be, &clash, &stop).unwrap_err().to_string();
    assert!(e.contains("--lr"), "{e}");
    let e = train(&be, &tiny_options(&data, &b, 8), &stop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn lr_decay_set_on_resume_anneals_and_resumes_exactly() {
    let data = face_subset("decay", 6);
    let (a, b) = (scratch("decay_a"), scratch("decay_b"));
    let stop = AtomicBool::new(false);
    let be = CpuF32::new();
    let with_decay = |out: &Path, steps: u64| {
        let mut o = tiny_options(&data, out, steps);
        o.resume = true;
        o.lr_decay = Some(4);
        o.lr_final = Some(1e-4);
        o
    };
    // Run a: 3 steps at the constant (warm-up) schedule, then resumed with a decay to step 8.
    train(&be, &tiny_options(&data, &a, 3), &stop).unwrap();
    train(&be, &with_decay(&a, 8), &stop).unwrap();
    let ck = Checkpoint::load(&a).unwrap();
    let want = LrDecay {
        start: 3,
        steps: 4,
        from: 2e-3 * 3.0 / 5.0, // where the warm-up (5 steps) had got to after 3
        to: 1e-4,
    };
    let d = ck.hyper.lr_decay.expect("the checkpoint keeps the decay");
    assert_eq!((d.start, d.steps, d.to), (want.start, want.steps, want.to));
    assert!((d.from - want.from).abs() < 1e-15, "{d:?}");
    let lrs = logged(&a, "lr");
    assert_eq!(lrs.len(), 8);
    for &(step, lr) in &lrs[3..] {
        // Log line `step` is the update after step − 1 completed ones.
        let expect = want.lr(step - 1);
        assert!(
            (lr - expect).abs() <= 1e-12 * expect,
            "step {step}: lr {lr} vs {expect}"
        );
    }
    assert!(lrs[3].1 > lrs[4].1 && lrs[4].1 > lrs[5].1, "annealing: {lrs:?}");
    assert!((lrs[7].1 - 1e-4).abs() < 1e-15, "after the decay: the final lr");

    // Run b: the same, but stopped at 5 and resumed with the same flags: the decay under way is
    // kept, and the run ends bit for bit where run a did.
    train(&be, &tiny_options(&data, &b, 3), &stop).unwrap();
    train(&be, &with_decay(&b, 5), &stop).unwrap();
    train(&be, &with_decay(&b, 8), &stop).unwrap();
    let cb = Checkpoint::load(&b).unwrap();
    assert_eq!(cb.hyper.lr_decay, ck.hyper.lr_decay);
    assert_eq!(cb.params, ck.params, "weights");
    assert_eq!(cb.ema, ck.ema, "EMA");
    assert_eq!(logged(&b, "lr"), lrs);

    // A new run with --lr-decay decays from the end of its warm-up, to a tenth of its lr.
    let c = scratch("decay_c");
    let mut fresh = tiny_options(&data, &c, 2);
    fresh.lr_decay = Some(4);
    train(&be, &fresh, &stop).unwrap();
    let d = Checkpoint::load(&c).unwrap().hyper.lr_decay;
    assert_eq!(
        d,
        Some(LrDecay {
            start: 5,
            steps: 4,
            from: 2e-3,
            to: 2e-4,
        })
    );
}

#[test]
fn stop_flag_and_time_limit_end_with_a_checkpoint() {
    let data = face_subset("stop", 3);
    let out = scratch("stop_run");
    let s = train(
        &CpuF32::new(),
        &tiny_options(&data, &out, 50),
        &AtomicBool::new(true),
    )
    .unwrap();
    assert_eq!(s.stopped, StopReason::Interrupted);
    assert_eq!(s.end_step, 0);
    assert_eq!(Checkpoint::load(&out).unwrap().state.step, 0);

    let out = scratch("time_run");
    let mut o = tiny_options(&data, &out, 50);
    o.max_minutes = Some(0.0);
    let s = train(&CpuF32::new(), &o, &AtomicBool::new(false)).unwrap();
    assert_eq!((s.stopped, s.end_step), (StopReason::TimeLimit, 0));
    assert!(out.join(CHECKPOINT_FILE).is_file());
}

/// At initialisation the output layer is ≈ 0, so the first loss is what a zero score gives:
/// VE 0.5·Σz² ≈ 0.5·3·H·W, VP mean(z²) ≈ 1. This checks the reduction, the [−1,1] data scaling
/// of VP and dropout in training mode.
#[test]
fn first_step_losses_match_a_zero_score() {
    let data = face_subset("first", 4);
    let be = CpuF32::new();
    for preset in ["ve-tiny", "vp-tiny"] {
        let mut cfg = NetConfig::preset(preset).unwrap();
        cfg.data.image_size = 32;
        cfg.model.ch_mult = vec![1, 2, 2];
        cfg.model.dropout = 0.1;
        let mut hyper = srsde_fast::train::Hyper::paper(preset, &cfg);
        hyper.batch = 4;
        let mut tr = Trainer::new(&be, cfg.clone(), hyper.clone()).unwrap();
        let opts = LoaderOptions {
            image_size: 32,
            batch: 4,
            flip: hyper.flip,
            seed: 1,
            workers: 1,
            prefetch: 4,
            cache_bytes: 0,
        };
        let mut loader = Loader::start(FaceFolder::open(&data).unwrap(), opts, 0).unwrap();
        let batch = loader.next_batch().unwrap();
        let (x0, y) = tr.batch_tensors(&batch).unwrap();
        let lo = be.to_f32(&x0).unwrap().iter().fold(f32::MAX, |a, &b| a.min(b));
        assert_eq!(lo < -0.5, cfg.data.centered, "{preset}: data range");
        assert!(be.to_f32(&y).unwrap().iter().all(|v| v.is_finite()));
        let rep = tr.train_step(&batch).unwrap();
        let want = if preset == "ve-tiny" {
            0.5 * 3.0 * 32.0 * 32.0
        } else {
            1.0
        };
        println!("{preset}: first loss {} (zero score: {want})", rep.loss);
        assert!(
            (rep.loss / want - 1.0).abs() < 0.1,
            "{preset}: first loss {} vs {want}",
            rep.loss
        );
        assert_eq!(rep.lr, 0.0);
        assert!(rep.grad_norm > 0.0 && rep.clip_scale <= 1.0);
        // lr 0 on the first step: the weights did not move, the EMA saw one update.
        assert_eq!(tr.params().unwrap(), paper_init(&cfg, hyper.seed));
        assert_eq!((tr.adam.steps, tr.ema.updates, tr.step), (1, 1, 1));
    }
}

#[test]
fn interrupted_checkpoint_write_keeps_the_previous_one() {
    let mut cfg = NetConfig::preset("ve-tiny").unwrap();
    cfg.data.image_size = 32;
    cfg.model.ch_mult = vec![1, 2];
    let hyper = srsde_fast::train::Hyper::paper("ve-tiny", &cfg);
    let be = CpuF32::new();
    let mut tr = Trainer::new(&be, cfg, hyper).unwrap();
    let dir = scratch("atomic");
    let dest = dir.join(CHECKPOINT_FILE);
    tr.checkpoint(10).unwrap().save(&dest).unwrap();
    let good = std::fs::read(&dest).unwrap();

    // Simulate a kill between writing the temporary file and the rename: the temp file is left
    // behind (forget skips its cleanup), the checkpoint in place is the old one.
    tr.step = 5;
    let pending = tr.checkpoint(20).unwrap().prepare(&dest).unwrap();
    let temp = pending.temp_path().to_path_buf();
    std::mem::forget(pending);
    assert!(temp.is_file());
    // And a half-written temp file from another crashed process.
    std::fs::write(
        dir.join(format!(".{CHECKPOINT_FILE}.tmp999999")),
        &good[..good.len() / 2],
    )
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), good);
    let ck = Checkpoint::load(&dir).unwrap();
    assert_eq!((ck.state.step, ck.state.next_sample), (0, 10));

    // A dropped (uncommitted) write removes its temp file; a committed one replaces the checkpoint.
    let p = tr.checkpoint(30).unwrap().prepare(&dest).unwrap();
    let t2 = p.temp_path().to_path_buf();
    drop(p);
    assert!(!t2.exists());
    tr.checkpoint(40).unwrap().save(&dest).unwrap();
    assert_eq!(
        Checkpoint::load(&dest).unwrap().state,
        checkpoint::TrainState {
            step: 5,
            next_sample: 40
        }
    );

    // A truncated checkpoint is a clear error, not a panic.
    std::fs::write(&dest, &good[..good.len() - 100]).unwrap();
    assert!(Checkpoint::load(&dest).is_err());
}

#[test]
fn export_writes_ema_weights_loadable_for_inference() {
    let mut cfg = NetConfig::preset("ve-tiny").unwrap();
    cfg.data.image_size = 32;
    cfg.model.ch_mult = vec![1, 2];
    let hyper = srsde_fast::train::Hyper::paper("ve-tiny", &cfg);
    let be = CpuF32::new();
    let tr = Trainer::new(&be, cfg.clone(), hyper).unwrap();
    // Make the EMA differ from the weights so the export must pick the right one.
    let mut ck = tr.checkpoint(0).unwrap();
    for s in ck.ema.shadow.values_mut() {
        s.iter_mut().for_each(|v| *v += 0.25);
    }
    let dir = scratch("export");
    ck.save(&dir.join(CHECKPOINT_FILE)).unwrap();
    let ck = Checkpoint::load(&dir).unwrap();
    for (storage, tol) in [(StorageType::F32, 0.0), (StorageType::F16, 1e-3)] {
        let out = dir.join(format!("model_{storage:?}.safetensors"));
        checkpoint::export(&dir, &out, storage).unwrap();
        let lw = load_weights(&out, None).unwrap();
        assert_eq!(lw.config, cfg);
        for (name, t) in &lw.weights {
            let want = match ck.ema.shadow.get(name) {
                Some(s) => s.clone(),
                None => ck.params[name].data.clone(), // frozen Fourier W
            };
            assert!(rel_err(&t.data, &want) <= tol, "{name}");
        }
        assert_eq!(lw.weights.len(), ck.params.len());
        Ncsnpp::from_weights(&be, lw.config, &lw.weights, "export").unwrap();
    }
}

#[test]
fn validation_faces_are_held_out_by_name() {
    let data = face_subset("split", 8);
    let all = FaceFolder::open(&data).unwrap();
    let (train_a, val_a) = all.clone().split_validation(0.25).unwrap();
    let (train_b, val_b) = all.clone().split_validation(0.25).unwrap();
    assert_eq!((val_a.len(), train_a.files.len()), (2, 6));
    assert_eq!(
        (&val_a, &train_a.files),
        (&val_b, &train_b.files),
        "split is deterministic"
    );
    for f in &all.files {
        assert!(
            val_a.contains(f) != train_a.files.contains(f),
            "{f:?} in exactly one part"
        );
    }
    // Three epochs of the training stream (two seeds) never draw a held-out face.
    for seed in [1, 2] {
        let mut loader = Loader::start(train_a.clone(), loader_opts(seed, false), 0).unwrap();
        for _ in 0..(3 * 6 / 2) {
            for &i in &loader.next_batch().unwrap().files {
                assert!(!val_a.contains(&loader.folder().files[i]));
            }
        }
    }
    // 5% of 8 rounds up to one face; 0 holds none out; a bad fraction is refused.
    assert_eq!(all.clone().split_validation(0.05).unwrap().1.len(), 1);
    assert!(all.clone().split_validation(0.0).unwrap().1.is_empty());
    assert!(all.split_validation(1.0).is_err());
}

#[test]
fn validation_loss_and_sample_grids_are_written() {
    let data = face_subset("val", 8);
    let out = scratch("val_run");
    let mut o = tiny_options(&data, &out, 4);
    o.val_fraction = Some(0.25);
    o.val_every = 2;
    o.grid_every = Some(4);
    o.grid_steps = 3;
    train(&CpuF32::new(), &o, &AtomicBool::new(false)).unwrap();
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let val: Vec<(u64, f64)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| !v["val_loss"].is_null())
        .map(|v| (v["step"].as_u64().unwrap(), v["val_loss"].as_f64().unwrap()))
        .collect();
    println!("val_loss: {val:?}");
    assert_eq!(val.iter().map(|v| v.0).collect::<Vec<_>>(), vec![2, 4]);
    assert!(val.iter().all(|v| v.1.is_finite() && v.1 > 0.0));
    // Grid: 2 held-out faces → 2 rows of LR | SR | HR at 32×32; only at step 4.
    let grid = out.join("samples/step_0000004.png");
    assert_eq!(image::image_dimensions(&grid).unwrap(), (3 * 32, 2 * 32));
    assert!(!out.join("samples/step_0000002.png").exists());
}

#[test]
fn bench_times_a_full_training_step() {
    let t = srsde_fast::bench::time_train_step(&CpuF32::new(), "ve-tiny", 128, 1, 1).unwrap();
    assert_eq!(t.runs, 1);
    assert!(t.median_ms > 0.0 && t.median_ms.is_finite());
    assert!(srsde_fast::bench::time_train_step(&CpuF32::new(), "ve-tiny", 20, 1, 1).is_err());
}

/// The held-out share decides which files are trained on, so a resumed run keeps the checkpoint's:
/// a different explicit --val-fraction is refused, and leaving it out continues exactly.
#[test]
fn resume_keeps_the_validation_split() {
    let data = face_subset("resume_split", 8);
    let (a, b) = (scratch("split_a"), scratch("split_b"));
    let stop = AtomicBool::new(false);
    let be = CpuF32::new();
    let mut whole = tiny_options(&data, &a, 4);
    whole.val_fraction = Some(0.25);
    let full = train(&be, &whole, &stop).unwrap();

    let mut first = tiny_options(&data, &b, 2);
    first.val_fraction = Some(0.25);
    let first = train(&be, &first, &stop).unwrap();
    let mut wrong = tiny_options(&data, &b, 4);
    wrong.resume = true;
    wrong.val_fraction = Some(0.5);
    let err = train(&be, &wrong, &stop).unwrap_err().to_string();
    assert!(err.contains("--val-fraction"), "{err}");
    let mut cont = tiny_options(&data, &b, 4);
    cont.resume = true; // no --val-fraction: the checkpoint's 0.25
    let second = train(&be, &cont, &stop).unwrap();
    let joined: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(joined, full.losses, "resumed losses differ");
}
