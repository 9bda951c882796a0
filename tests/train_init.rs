//! `train --init-from`: a new run starting from exported weights (a sharded f16 export, or a run's
//! checkpoint), with a fresh optimiser, the short fine-tuning warm-up and the config taken from the
//! weights; refused together with `--resume` or conflicting size flags. Tiny CPU runs (ve-tiny at
//! 32×32, 3 levels) on a few faces of ../shared/data/faces128.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use common::TempDir;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::check::rel_err;
use srsde_fast::model::load::load_weights;
use srsde_fast::model::weights::StorageType;
use srsde_fast::train::checkpoint::{export_sharded, Checkpoint, CHECKPOINT_FILE};
use srsde_fast::train::run::{train, TrainOptions, FINETUNE_WARMUP, LOG_FILE};

/// A folder with the first `n` faces of ../shared/data/faces128 (sorted by name).
fn face_subset(tmp: &TempDir, n: usize) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/faces128");
    let dir = tmp.path("faces");
    std::fs::create_dir_all(&dir).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(src)
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

/// ve-tiny at 32×32 with 3 levels: a few CPU steps take seconds.
fn tiny(data: &Path, out: &Path, steps: u64) -> TrainOptions {
    let mut o = TrainOptions::new(data, out, "ve-tiny", steps);
    o.image_size = Some(32);
    o.ch_mult = Some(vec![1, 2, 2]);
    o.batch = Some(2);
    o.lr = Some(2e-3);
    o.warmup = Some(2);
    o.ckpt_every = 0;
    o.val_every = 0;
    o.val_fraction = Some(0.0);
    o
}

/// A run `--init-from` `src`: no size flags (the config comes from the weights).
fn init_run(data: &Path, out: &Path, steps: u64, src: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(data, out, "ve-paper", steps); // preset ignored with init_from
    o.init_from = Some(src.to_path_buf());
    o.batch = Some(2);
    o.ckpt_every = 0;
    o.val_every = 0;
    o.val_fraction = Some(0.0);
    o.seed = Some(9);
    o
}

#[test]
fn init_from_a_sharded_f16_export_starts_a_fresh_optimiser() {
    let tmp = TempDir::new("init_from");
    let data = face_subset(&tmp, 6);
    let stop = AtomicBool::new(false);
    let be = CpuF32::new();

    // Run A: 6 steps from scratch, exported as f16 shards.
    let run_a = tmp.path("a");
    train(&be, &tiny(&data, &run_a, 6), &stop).unwrap();
    let export = tmp.path("export_a");
    export_sharded(&run_a, &export, StorageType::F16, 64 << 10).unwrap();
    let exported = load_weights(&export, None).unwrap();

    // Run B from the export: one step. The first step's lr is 0 (warm-up), so the weights after it
    // are exactly the exported ones; the config is the export's; Adam and the step count are new.
    let run_b = tmp.path("b");
    let s = train(&be, &init_run(&data, &run_b, 1, &export), &stop).unwrap();
    assert_eq!((s.start_step, s.end_step), (0, 1));
    let ck = Checkpoint::load(&run_b).unwrap();
    assert_eq!(ck.config, exported.config);
    assert_eq!(ck.hyper.warmup, FINETUNE_WARMUP);
    assert_eq!(ck.adam.steps, 1);
    for (name, t) in &exported.weights {
        assert_eq!(rel_err(&ck.params[name].data, &t.data), 0.0, "{name}");
    }
    let init = ck.hyper.init.as_ref().expect("init recorded");
    assert_eq!((init.steps, init.images, init.runs), (6, 12, 1));

    // Continue B for a few more steps with --resume (a full checkpoint), then export: the record
    // adds both runs up.
    let mut more = init_run(&data, &run_b, 4, &export);
    more.init_from = None;
    more.resume = true;
    let s = train(&be, &more, &stop).unwrap();
    assert_eq!((s.start_step, s.end_step), (1, 4));
    let log = std::fs::read_to_string(run_b.join(LOG_FILE)).unwrap();
    let lrs: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"]
                .as_f64()
                .unwrap()
        })
        .collect();
    // Linear warm-up over FINETUNE_WARMUP steps, starting at 0 (the original's off-by-one).
    assert_eq!(lrs.len(), 4);
    assert_eq!(lrs[0], 0.0);
    assert!(lrs.windows(2).all(|w| w[1] > w[0]), "{lrs:?}");
    assert!(lrs[3] < 2e-4 * 4.0 / FINETUNE_WARMUP as f64 + 1e-12, "{lrs:?}");

    let export_b = tmp.path("export_b");
    let index = export_sharded(&run_b, &export_b, StorageType::F16, 64 << 10).unwrap();
    let rec = index.training.unwrap();
    assert_eq!(rec["steps"], 10);
    assert_eq!(rec["images_seen"], 20);
    assert_eq!(rec["runs"], 2);
    assert_eq!(rec["last_run"]["init_from"], export.display().to_string());

    // A run folder (full checkpoint) works as a source too: its EMA weights.
    let run_c = tmp.path("c");
    train(&be, &init_run(&data, &run_c, 1, &run_a), &stop).unwrap();
    let a = Checkpoint::load(&run_a).unwrap();
    let c = Checkpoint::load(&run_c).unwrap();
    for (name, t) in a.ema_weights() {
        assert_eq!(rel_err(&c.params[&name].data, &t.data), 0.0, "{name}");
    }
}

#[test]
fn init_from_is_refused_with_resume_or_other_sizes() {
    let tmp = TempDir::new("init_refused");
    let data = face_subset(&tmp, 4);
    let stop = AtomicBool::new(false);
    let be = CpuF32::new();
    let run_a = tmp.path("a");
    train(&be, &tiny(&data, &run_a, 1), &stop).unwrap();

    let mut both = init_run(&data, &tmp.path("b"), 1, &run_a);
    both.resume = true;
    let e = train(&be, &both, &stop).unwrap_err().to_string();
    assert!(e.contains("--init-from") && e.contains("--resume"), "{e}");

    let mut other = init_run(&data, &tmp.path("c"), 1, &run_a);
    other.nf = Some(32);
    let e = train(&be, &other, &stop).unwrap_err().to_string();
    assert!(e.contains("--nf 32"), "{e}");
    assert!(!tmp.path("c").join(CHECKPOINT_FILE).exists());

    // The command line refuses the combinations before doing anything.
    for extra in [&["--resume"][..], &["--preset", "ve-small"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_srsde-fast"))
            .args(["train", "--data", data.to_str().unwrap(), "--out"])
            .arg(tmp.path("d"))
            .arg("--init-from")
            .arg(&run_a)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot be used with"), "{err}");
    }
    assert!(!tmp.path("d").exists());
}
