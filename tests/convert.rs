//! `srsde-fast convert` and model loading: the original checkpoint becomes a safetensors file with
//! the EMA weights and an inferred config; mismatches are clear errors naming the tensor.
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{golden_path, Golden};
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::model::load::{check_weights, load_network, load_weights};
use srsde_fast::model::{NetConfig, SdeKind};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("srsde-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn convert_pth_to_safetensors_keeps_the_ema_weights() {
    let dir = tmp("ok");
    let out = dir.join("model.safetensors");
    let bin = env!("CARGO_BIN_EXE_srsde-fast");
    let pth = golden_path("srsde_checkpoint_ve_nf16.pth");
    let run = Command::new(bin)
        .args(["convert"])
        .arg(&pth)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("EMA"), "{stdout}");

    let lw = load_weights(&out, None).expect("converted file loads");
    assert_eq!(lw.config.sde(), SdeKind::Ve);
    assert_eq!(lw.config.model.nf, 16);
    let want = Golden::load("srsde_checkpoint_ve_nf16_ema_expected.safetensors");
    let mut n = 0;
    for name in want.names_with_prefix("ema.") {
        let key = name.trim_start_matches("ema.");
        assert_eq!(
            lw.weights[key].data,
            want.host(&name).data,
            "{key} differs after conversion"
        );
        n += 1;
    }
    assert_eq!(n + 1, lw.weights.len(), "EMA weights plus the frozen Fourier W");

    // Refuses to overwrite without --force, works with it.
    let again = Command::new(bin)
        .args(["convert"])
        .arg(&pth)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = Command::new(bin)
        .args(["convert", "--force"])
        .arg(&pth)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(forced.status.success());

    // `info` prints the config.
    let info = Command::new(bin).arg("info").arg(&out).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"nf\":16"));
}

#[test]
fn pth_loads_directly_as_a_network() {
    let be = CpuF32::new();
    let (net, notes) = load_network(&be, &golden_path("srsde_checkpoint_ve_nf16.pth"), None).unwrap();
    assert_eq!(net.config.model.nf, 16);
    assert!(notes.iter().any(|n| n.contains("inferred")), "{notes:?}");
}

#[test]
fn config_mismatch_names_the_tensor() {
    // ve-small (nf 64) config against nf-16 weights: the first tensor differs in shape.
    let err = load_weights(
        &golden_path("srsde_checkpoint_ve_nf16.pth"),
        Some(NetConfig::preset("ve-small").unwrap()),
    )
    .err()
    .expect("mismatch must fail");
    let msg = err.to_string();
    assert!(msg.contains("all_modules.") && msg.contains("shape"), "{msg}");

    // A VP config against VE weights: names a tensor too.
    let lw = load_weights(&golden_path("srsde_checkpoint_ve_nf16.pth"), None).unwrap();
    let mut vp = NetConfig::preset("vp-tiny").unwrap();
    vp.model.nf = 16;
    let msg = check_weights("x.safetensors", &vp, &lw.weights)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("x.safetensors") && msg.contains("all_modules."),
        "{msg}"
    );

    // A missing tensor is named.
    let mut w = lw.weights.clone();
    w.remove("all_modules.17.NIN_2.W");
    let msg = check_weights("y.safetensors", &lw.config, &w)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("all_modules.17.NIN_2.W") && msg.contains("missing"),
        "{msg}"
    );

    // An unknown preset is a config error listing the valid ones.
    let msg = NetConfig::preset("ve-huge").unwrap_err().to_string();
    assert!(msg.contains("ve-paper"), "{msg}");
}

#[test]
fn presets_have_the_papers_parameter_counts() {
    use srsde_fast::model::ncsnpp::param_specs;
    let count = |p: &str| -> usize {
        param_specs(&NetConfig::preset(p).unwrap())
            .iter()
            .filter(|s| s.2)
            .map(|s| s.1.iter().product::<usize>())
            .sum()
    };
    // Spec §7 (analytic walk confirmed with torch): VE 65,540,867 trainable; VP/subVP 107,528,323.
    assert_eq!(count("ve-paper"), 65_540_867);
    assert_eq!(count("vp-paper"), 107_528_323);
    assert_eq!(count("subvp-paper"), 107_528_323);
    // anchors.md: ve-small has 16,415,171 parameters (incl. the 64 frozen Fourier weights).
    assert_eq!(count("ve-small") + 64, 16_415_171);
}
