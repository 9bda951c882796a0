//! Weight files: the original sr-sde `.pth` checkpoint (restricted pickle reader, EMA mapping) and
//! safetensors load/save/check. Golden data: ../shared/golden (see its README).
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::{golden_path, Golden};
use srsde_fast::error::Error;
use srsde_fast::model::pickle;
use srsde_fast::model::pth::{is_trainable_default, load_checkpoint, Checkpoint};
use srsde_fast::model::weights::{
    check_against, load_safetensors, save_safetensors, StorageType, WeightFile,
};
use srsde_fast::tensor::HostTensor;

const PTH: &str = "srsde_checkpoint_ve_nf16.pth";

/// A scratch directory unique to this test process and test name.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("srsde-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn load_golden_checkpoint() -> Checkpoint {
    load_checkpoint(golden_path(PTH)).expect("golden checkpoint loads")
}

/// Deterministic pseudo-random numbers for the fuzz loops (no RNG crate needed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The `model` entry against `param.*` of ncsnpp_ve_nf16.
///
/// The golden README says they are equal, but the file's trainable tensors are `param.*` after one
/// Adam step (its optimizer state has step 1, lr 2e-4; p − lr·m̂/(√v̂+ε) reproduces them to 7e-9),
/// so only the untrained tensors (the `sigmas` buffer, the frozen Fourier `W`) are bitwise equal and
/// every trainable element moved by at most lr (Adam's first step is ≈ lr·sign(g)). Bitwise
/// exactness of the tensor reading itself is checked through the EMA test below (same code path).
#[test]
fn pth_model_entry_matches_golden_params() {
    const LR: f32 = 2e-4;
    let ck = load_golden_checkpoint();
    let golden = Golden::load("ncsnpp_ve_nf16.safetensors");
    let names = golden.names_with_prefix("param.");
    assert_eq!(ck.model.len(), names.len(), "state-dict size");
    // file order is the original state dict's: the buffer, the Fourier W, then the layers
    assert_eq!(ck.model[0].0, "sigmas");
    assert_eq!(ck.model[1].0, "all_modules.0.W");
    assert_eq!(ck.model[2].0, "all_modules.1.weight");
    let model: BTreeMap<_, _> = ck.model.iter().cloned().collect();
    let mut moved = 0;
    for gname in &names {
        let name = &gname["param.".len()..];
        let t = model
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` missing from the checkpoint"));
        let g = golden.host(gname);
        assert_eq!(t.shape, g.shape, "{name}");
        if !is_trainable_default(name) {
            assert_eq!(bits(&t.data), bits(&g.data), "{name} differs");
            continue;
        }
        let max_step = t
            .data
            .iter()
            .zip(&g.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_step <= LR * 1.001,
            "{name}: moved by {max_step}, more than one Adam step"
        );
        moved += (max_step > LR * 0.5) as usize;
    }
    assert_eq!(
        moved,
        names.len() - 2,
        "every trainable tensor took the Adam step"
    );
    // raw_weights is the same minus the sigmas buffer
    let raw = ck.raw_weights();
    assert_eq!(raw.len(), names.len() - 1);
    assert!(!raw.contains_key("sigmas"));
    assert_eq!(raw["all_modules.0.W"], model["all_modules.0.W"]);
}

#[test]
fn pth_ema_mapping_equals_expected_bitwise() {
    let ck = load_golden_checkpoint();
    let expected = Golden::load("srsde_checkpoint_ve_nf16_ema_expected.safetensors");
    let ema = ck.ema_weights(is_trainable_default).unwrap();
    let enames = expected.names_with_prefix("ema.");
    assert_eq!(ck.ema_shadow.len(), enames.len());
    // all trainable tensors plus the frozen Fourier W, no sigmas
    assert_eq!(ema.len(), enames.len() + 1);
    assert!(!ema.contains_key("sigmas"));
    for ename in &enames {
        let name = &ename["ema.".len()..];
        let t = ema
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` missing from the EMA weights"));
        let g = expected.host(ename);
        assert_eq!(t.shape, g.shape, "{name}");
        assert_eq!(bits(&t.data), bits(&g.data), "{name} differs");
    }
    let params = Golden::load("ncsnpp_ve_nf16.safetensors");
    assert_eq!(
        bits(&ema["all_modules.0.W"].data),
        bits(&params.host("param.all_modules.0.W").data)
    );
    // the EMA really differs from the raw weights (so the mapping is not a no-op copy of `model`)
    let raw = ck.raw_weights();
    assert_ne!(ema["all_modules.1.weight"], raw["all_modules.1.weight"]);
}

#[test]
fn pth_scalars_are_read() {
    let ck = load_golden_checkpoint();
    assert_eq!(ck.step, Some(1234));
    assert_eq!(ck.ema_decay, Some(0.999));
    assert_eq!(ck.ema_num_updates, Some(1234));
    assert!(ck.has_optimizer);
}

#[test]
fn ema_mapping_checks_count_and_shapes() {
    let mut ck = load_golden_checkpoint();
    // a predicate that calls W trainable shifts every shadow param by one: count mismatch
    let e = ck.ema_weights(|n| n != "sigmas").unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(
        e.to_string().contains("ema.shadow_params") && e.to_string().contains(PTH),
        "{e}"
    );
    // a shadow tensor of the wrong shape is reported under its mapped name
    ck.ema_shadow[0] = HostTensor::new(vec![3], vec![0.0; 3]);
    let e = ck.ema_weights(is_trainable_default).unwrap_err().to_string();
    assert!(e.contains("all_modules.1.weight") && e.contains("[3]"), "{e}");
    ck.ema_shadow.clear();
    assert!(ck.ema_weights(is_trainable_default).is_err());
}

/// Assert a load error is a format error whose message names the file.
fn assert_format_error(r: srsde_fast::Result<impl std::fmt::Debug>, path: &Path) -> String {
    let e = r.expect_err("must fail");
    let s = e.to_string();
    assert!(matches!(e, Error::Format { .. }), "not a format error: {s}");
    assert!(
        s.contains(&path.display().to_string()),
        "error does not name the file: {s}"
    );
    s
}

#[test]
fn truncated_pth_is_a_format_error() {
    let dir = scratch("trunc-pth");
    let bytes = std::fs::read(golden_path(PTH)).unwrap();
    for cut in [
        0,
        1,
        100,
        4096,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 23,
        bytes.len() - 1,
    ] {
        let p = dir.join(format!("cut{cut}.pth"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_format_error(load_checkpoint(&p), &p);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A zip with `archive/data.pkl` = `pkl` plus extra entries.
fn write_zip(path: &Path, pkl: &[u8], extra: &[(&str, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    for (name, data) in extra {
        z.start_file(format!("archive/{name}"), opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn garbage_and_hostile_pickles_are_refused() {
    let dir = scratch("pickles");
    let p = dir.join("garbage.pth");
    write_zip(&p, b"this is not a pickle at all", &[]);
    assert_format_error(load_checkpoint(&p), &p);

    // The classic exploit: GLOBAL os.system, args ('echo pwned',), REDUCE. Never executed.
    let mut evil = b"\x80\x02cos\nsystem\nq\x00X".to_vec();
    evil.extend(10u32.to_le_bytes());
    evil.extend(b"echo pwned\x85q\x01Rq\x02.");
    let p = dir.join("evil.pth");
    write_zip(&p, &evil, &[]);
    let s = assert_format_error(load_checkpoint(&p), &p);
    assert!(s.contains("refusing unknown pickle global `os.system`"), "{s}");

    // The same hidden inside an otherwise plausible dict.
    let mut evil2 = b"\x80\x02}q\x00(X".to_vec();
    evil2.extend(5u32.to_le_bytes());
    evil2.extend(b"modelq\x01cbuiltins\neval\nq\x02u.");
    let p = dir.join("evil2.pth");
    write_zip(&p, &evil2, &[]);
    let s = assert_format_error(load_checkpoint(&p), &p);
    assert!(s.contains("`builtins.eval`"), "{s}");

    // A valid pickle whose tensor reaches past its storage: names the tensor.
    // {'model': {'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 4), 0, (2, 3), (3, 1), False, OrderedDict())}}
    let mut pk = b"\x80\x02}(X".to_vec();
    pk.extend(5u32.to_le_bytes());
    pk.extend(b"model}(X");
    pk.extend(1u32.to_le_bytes());
    pk.extend(b"wctorch._utils\n_rebuild_tensor_v2\n((X");
    pk.extend(7u32.to_le_bytes());
    pk.extend(b"storagectorch\nFloatStorage\nX");
    pk.extend(1u32.to_le_bytes());
    pk.extend(b"0X");
    pk.extend(3u32.to_le_bytes());
    pk.extend(b"cpuK\x04tQK\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtRuu.");
    let storage: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let p = dir.join("short-storage.pth");
    write_zip(&p, &pk, &[("data/0", &storage)]);
    let s = assert_format_error(load_checkpoint(&p), &p);
    assert!(s.contains("tensor `w`") && s.contains("past the storage"), "{s}");

    // The same with a storage big enough loads, as a bare `model` without ema/step/optimizer.
    let pk_ok = replace_bytes(&pk, b"K\x04tQ", b"K\x06tQ");
    let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let p = dir.join("small.pth");
    write_zip(&p, &pk_ok, &[("data/0", &storage)]);
    let ck = load_checkpoint(&p).unwrap();
    assert_eq!(
        ck.model,
        vec![(
            "w".to_string(),
            HostTensor::new(vec![2, 3], vec![0., 1., 2., 3., 4., 5.])
        )]
    );
    assert!(ck.ema_shadow.is_empty() && ck.step.is_none() && !ck.has_optimizer);

    // Transposed view (stride (1, 2) over a 3x2 storage) comes out contiguous.
    let pk_t = replace_bytes(&pk_ok, b"K\x03K\x01\x86", b"K\x01K\x02\x86");
    write_zip(&p, &pk_t, &[("data/0", &storage)]);
    let ck = load_checkpoint(&p).unwrap();
    assert_eq!(ck.model[0].1.data, vec![0., 2., 4., 1., 3., 5.]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `hay` with the single occurrence of `from` replaced by `to`.
fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let hits: Vec<usize> = (0..=hay.len() - from.len())
        .filter(|&i| &hay[i..i + from.len()] == from)
        .collect();
    assert_eq!(hits.len(), 1, "pattern must occur once");
    [&hay[..hits[0]], to, &hay[hits[0] + from.len()..]].concat()
}

/// Copy the golden archive, replacing data.pkl with `pkl`.
fn rewrite_pickle(src: &Path, dst: &Path, pkl: &[u8]) {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    for i in 0..zin.len() {
        let entry = zin.by_index_raw(i).unwrap();
        if entry.name().ends_with("/data.pkl") {
            let name = entry.name().to_string();
            drop(entry);
            let opts =
                zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zout.start_file(name, opts).unwrap();
            zout.write_all(pkl).unwrap();
        } else {
            zout.raw_copy_file(entry).unwrap();
        }
    }
    zout.finish().unwrap();
}

fn golden_pickle() -> Vec<u8> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(golden_path(PTH)).unwrap()).unwrap();
    let name = z
        .file_names()
        .find(|n| n.ends_with("/data.pkl"))
        .unwrap()
        .to_string();
    let mut buf = Vec::new();
    z.by_name(&name).unwrap().read_to_end(&mut buf).unwrap();
    buf
}

/// Truncations and bit flips of the real checkpoint never panic: each load either succeeds or
/// returns an error.
#[test]
fn fuzzed_checkpoints_never_panic() {
    let dir = scratch("fuzz");
    let src = golden_path(PTH);
    let bytes = std::fs::read(&src).unwrap();
    let mut rng = Lcg(0x5eed);
    let mut outcomes = (0, 0);
    let mut record = |r: std::thread::Result<bool>, what: &str| match r {
        Ok(true) => outcomes.0 += 1,
        Ok(false) => outcomes.1 += 1,
        Err(_) => panic!("panic on {what}"),
    };

    // Whole-file damage: truncations and bit flips anywhere (the zip layer and CRCs see most).
    let p = dir.join("damaged.pth");
    for i in 0..40 {
        let mut b = bytes.clone();
        if i % 2 == 0 {
            b.truncate(rng.below(bytes.len()));
        } else {
            for _ in 0..=rng.below(8) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
        }
        std::fs::write(&p, &b).unwrap();
        record(
            std::panic::catch_unwind(|| load_checkpoint(&p).is_ok()),
            &format!("file damage #{i}"),
        );
    }

    // Pickle damage behind a valid zip/CRC layer, so the VM and tensor views see it.
    let pkl = golden_pickle();
    for i in 0..300 {
        let mut b = pkl.clone();
        if i % 3 == 0 {
            b.truncate(rng.below(pkl.len()));
        } else {
            for _ in 0..=rng.below(4) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
        }
        record(
            std::panic::catch_unwind(|| pickle::parse(&b).is_ok()),
            &format!("pickle damage #{i}"),
        );
        if i % 10 == 0 {
            rewrite_pickle(&src, &p, &b);
            record(
                std::panic::catch_unwind(|| load_checkpoint(&p).is_ok()),
                &format!("archive damage #{i}"),
            );
        }
    }
    eprintln!("fuzz outcomes (loaded, refused): {outcomes:?}");
    // both outcomes occur: the loop really exercised error paths and survivable damage
    assert!(outcomes.0 > 0 && outcomes.1 > 0, "{outcomes:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn sample_file() -> WeightFile {
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "a.weight".to_string(),
        HostTensor::new(vec![2, 3], vec![1.0, -2.5, 3.25e-3, 65000.0, -0.0, 1.0e-7]),
    );
    tensors.insert(
        "b".to_string(),
        HostTensor::new(vec![4], vec![0.1, 0.2, 0.3, 0.4]),
    );
    tensors.insert("scalar".to_string(), HostTensor::new(vec![], vec![7.0]));
    let mut metadata = BTreeMap::new();
    metadata.insert("config".to_string(), r#"{"nf": 16, "sde": "ve"}"#.to_string());
    metadata.insert("note".to_string(), "roundtrip".to_string());
    WeightFile { tensors, metadata }
}

#[test]
fn safetensors_roundtrip_f32_and_f16() {
    let dir = scratch("roundtrip");
    let wf = sample_file();

    let p32 = dir.join("w32.safetensors");
    save_safetensors(&p32, &wf, StorageType::F32).unwrap();
    assert_eq!(load_safetensors(&p32).unwrap(), wf, "f32 roundtrip is exact");
    // overwriting an existing file works and leaves no temporary behind
    save_safetensors(&p32, &wf, StorageType::F32).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("w32.safetensors")]);

    let p16 = dir.join("w16.safetensors");
    save_safetensors(&p16, &wf, StorageType::F16).unwrap();
    let back = load_safetensors(&p16).unwrap();
    assert_eq!(back.metadata, wf.metadata);
    assert_eq!(
        back.tensors.keys().collect::<Vec<_>>(),
        wf.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &wf.tensors {
        let b = &back.tensors[name];
        assert_eq!(b.shape, t.shape);
        let want: Vec<f32> = t.data.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(bits(&b.data), bits(&want), "{name}");
        let err = srsde_fast::check::rel_err(&b.data, &t.data);
        assert!(err < 1e-3, "{name}: f16 rel err {err}");
    }
    assert!(std::fs::metadata(&p16).unwrap().len() < std::fs::metadata(&p32).unwrap().len());

    // a value f16 cannot hold is refused, naming the tensor
    let mut big = wf.clone();
    big.tensors.get_mut("b").unwrap().data[0] = 1.0e6;
    let e = save_safetensors(dir.join("big.safetensors"), &big, StorageType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`b`") && e.contains("f16"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn safetensors_other_float_storages_convert_and_ints_are_refused() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let dir = scratch("dtypes");
    let f64s: Vec<u8> = [1.5f64, -2.0, 1e-3]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = [1.5f32, -2.0, 0.25]
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let views = vec![
        ("d", TensorView::new(Dtype::F64, vec![3], &f64s).unwrap()),
        ("h", TensorView::new(Dtype::BF16, vec![1, 3], &bf16s).unwrap()),
    ];
    let p = dir.join("mixed.safetensors");
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
    let wf = load_safetensors(&p).unwrap();
    assert_eq!(wf.tensors["d"].data, vec![1.5, -2.0, 1e-3f64 as f32]);
    assert_eq!(
        wf.tensors["h"],
        HostTensor::new(vec![1, 3], vec![1.5, -2.0, 0.25])
    );
    assert!(wf.metadata.is_empty());

    let ints: Vec<u8> = [1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![("counts", TensorView::new(Dtype::I32, vec![2], &ints).unwrap())];
    let p = dir.join("ints.safetensors");
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
    let s = assert_format_error(load_safetensors(&p), &p);
    assert!(s.contains("`counts`") && s.contains("I32"), "{s}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn broken_safetensors_are_format_errors() {
    let dir = scratch("broken-st");
    let good = dir.join("good.safetensors");
    save_safetensors(&good, &sample_file(), StorageType::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.join("broken.safetensors");
    for cut in [0, 5, 8, 20, bytes.len() / 2, bytes.len() - 4, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_format_error(load_safetensors(&p), &p);
    }
    // header length pointing past the end, non-JSON header, absurd offsets
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_format_error(load_safetensors(&p), &p);
    let header = br#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header);
    b.extend([0u8; 4]);
    std::fs::write(&p, &b).unwrap();
    let s = assert_format_error(load_safetensors(&p), &p);
    assert!(s.contains("`x`"), "{s}");
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend(b"nope");
    std::fs::write(&p, &b).unwrap();
    assert_format_error(load_safetensors(&p), &p);
    // a missing file is an I/O error naming the path
    let missing = dir.join("missing.safetensors");
    let e = load_safetensors(&missing).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("missing.safetensors"),
        "{e}"
    );

    // bit flips never panic
    let mut rng = Lcg(7);
    for _ in 0..200 {
        let mut b = bytes.clone();
        let at = rng.below(b.len());
        b[at] ^= 1 << rng.below(8);
        std::fs::write(&p, &b).unwrap();
        assert!(
            std::panic::catch_unwind(|| load_safetensors(&p).map(|_| ())).is_ok(),
            "panic at byte {at}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_against_reports_missing_misshaped_and_extra_tensors() {
    let wf = sample_file();
    let expected = |v: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
        v.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
    };
    let all = expected(&[("a.weight", &[2, 3]), ("b", &[4]), ("scalar", &[])]);
    check_against("model.safetensors", &wf.tensors, &all).unwrap();

    let weights_err = |e: Error, tensor: &str, needle: &str| {
        let s = e.to_string();
        match &e {
            Error::Weights { file, tensor: t, .. } => {
                assert_eq!(file, "model.safetensors");
                assert_eq!(t, tensor);
            }
            _ => panic!("not a weights error: {s}"),
        }
        assert!(
            s.contains("model.safetensors") && s.contains(tensor) && s.contains(needle),
            "{s}"
        );
    };
    let mut missing = all.clone();
    missing.push(("c.bias".into(), vec![8]));
    weights_err(
        check_against("model.safetensors", &wf.tensors, &missing).unwrap_err(),
        "c.bias",
        "missing",
    );

    let misshaped = expected(&[("a.weight", &[3, 2]), ("b", &[4]), ("scalar", &[])]);
    weights_err(
        check_against("model.safetensors", &wf.tensors, &misshaped).unwrap_err(),
        "a.weight",
        "shape [2, 3] in file, model expects [3, 2]",
    );

    let fewer = expected(&[("a.weight", &[2, 3]), ("b", &[4])]);
    weights_err(
        check_against("model.safetensors", &wf.tensors, &fewer).unwrap_err(),
        "scalar",
        "unexpected",
    );
}

/// The golden network file loads through the same loader (F32 storage, config metadata) and agrees
/// bitwise with the test-side golden reader.
#[test]
fn golden_safetensors_loads_with_config() {
    let name = "ncsnpp_ve_nf16.safetensors";
    let wf = load_safetensors(golden_path(name)).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&wf.metadata["config"]).unwrap();
    assert!(cfg.is_object());
    let golden = Golden::load(name);
    assert_eq!(wf.tensors.len(), golden.tensors.len());
    for (k, t) in &wf.tensors {
        let g = golden.host(k);
        assert_eq!((&t.shape, bits(&t.data)), (&g.shape, bits(&g.data)), "{k}");
    }
}

/// Weights holding a NaN or an infinity are an error naming the file and the tensor — never a
/// network that turns every face black: in a safetensors file (f32 and f16 storage) and in the
/// original `.pth` checkpoint.
#[test]
fn non_finite_weights_are_errors_naming_file_and_tensor() {
    use srsde_fast::model::load::{load_weights, save_weights};
    let dir = scratch("non-finite");
    let expect_named =
        |r: srsde_fast::Result<srsde_fast::model::load::LoadedWeights>, p: &Path, name: &str| match r {
            Err(Error::Weights { file, tensor, msg }) => {
                assert_eq!(file, p.display().to_string());
                assert_eq!(tensor, name);
                assert!(msg.contains("non-finite"), "{msg}");
            }
            Err(e) => panic!("{}: expected a weights error, got {e}", p.display()),
            Ok(_) => panic!("{}: non-finite weights loaded", p.display()),
        };

    // safetensors, f32 and f16.
    let good = dir.join("good.safetensors");
    common::write_golden_model("ncsnpp_ve_nf16.safetensors", &good);
    let lw = load_weights(&good, None).unwrap();
    let name = lw.weights.keys().nth(10).unwrap().clone();
    for (bad, tag) in [
        (f32::NAN, "nan"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "neginf"),
    ] {
        for storage in [StorageType::F32, StorageType::F16] {
            let mut w = lw.weights.clone();
            w.get_mut(&name).unwrap().data[3] = bad;
            let p = dir.join(format!("{tag}-{storage:?}.safetensors"));
            save_weights(&p, &lw.config, &w, storage).unwrap();
            expect_named(load_weights(&p, None), &p, &name);
        }
    }

    // The .pth: find the storage holding one EMA tensor's values and poison one of them.
    let src = golden_path(PTH);
    let clean = load_weights(&src, None).unwrap().weights;
    let (target, t) = clean
        .iter()
        .find(|(k, t)| {
            *k != "all_modules.0.W" && t.data.len() >= 16 && t.data[..16].iter().all(|v| *v != 0.0)
        })
        .expect("a tensor with non-zero values");
    let needle: Vec<u8> = t.data[..16].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut zin = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let mut hits = Vec::new();
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        if !e.name().contains("/data/") {
            continue;
        }
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        if let Some(off) = bytes.windows(needle.len()).position(|w| w == needle.as_slice()) {
            hits.push((e.name().to_string(), off));
        }
    }
    assert_eq!(
        hits.len(),
        1,
        "the EMA values of `{target}` should be in one storage: {hits:?}"
    );
    let (entry, off) = &hits[0];
    for (bits, tag) in [(0x7fc0_0000u32, "nan"), (0x7f80_0000u32, "inf")] {
        let p = dir.join(format!("{tag}.pth"));
        let mut zin = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
        let mut zout = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        for i in 0..zin.len() {
            let mut e = zin.by_index(i).unwrap();
            if e.name() == entry {
                let mut bytes = Vec::new();
                e.read_to_end(&mut bytes).unwrap();
                bytes[*off + 4..*off + 8].copy_from_slice(&bits.to_le_bytes());
                let name = e.name().to_string();
                drop(e);
                let opts = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored);
                zout.start_file(name, opts).unwrap();
                zout.write_all(&bytes).unwrap();
            } else {
                drop(e);
                zout.raw_copy_file(zin.by_index_raw(i).unwrap()).unwrap();
            }
        }
        zout.finish().unwrap();
        expect_named(load_weights(&p, None), &p, target);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
