//! Shared helpers for integration tests: reading ../shared/golden, a self-removing temp folder and
//! the golden nf16 model as a weights file.
#![allow(dead_code)]
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use srsde_fast::model::load::save_weights;
use srsde_fast::model::weights::StorageType;
use srsde_fast::model::NetConfig;
use srsde_fast::tensor::HostTensor;

/// Path of a file in ../shared/golden (next to the checkout).
pub fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/golden")
        .join(name)
}

/// A golden safetensors file, every tensor converted to f64 (from f64/f32/f16/bf16/ints/u8).
pub struct Golden {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub metadata: HashMap<String, String>,
}

impl Golden {
    pub fn load(name: &str) -> Golden {
        let path = golden_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let vals: Vec<f64> = match view.dtype() {
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I32 => d
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::U8 => d.iter().map(|&v| v as f64).collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                other => panic!("{name}: unsupported golden dtype {other:?}"),
            };
            tensors.insert(name.to_string(), (view.shape().to_vec(), vals));
        }
        Golden { tensors, metadata }
    }

    pub fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor `{name}` missing"))
    }

    /// A tensor as f32 host data.
    pub fn host(&self, name: &str) -> HostTensor {
        let (s, v) = self.get(name);
        HostTensor::new(s.clone(), v.iter().map(|&x| x as f32).collect())
    }

    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// A fresh, empty folder for one test, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("srsde-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// The names in the folder, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A golden network as a weights file: its `param.*` tensors minus the derived `sigmas`, with the
/// config and data from the metadata.
pub fn write_golden_model(golden: &str, path: &Path) {
    let g = Golden::load(golden);
    let cfg =
        NetConfig::from_json(&g.metadata["config"], g.metadata.get("data").map(|s| s.as_str())).unwrap();
    let weights: BTreeMap<String, HostTensor> = g
        .names_with_prefix("param.")
        .into_iter()
        .filter(|n| n != "param.sigmas")
        .map(|n| (n["param.".len()..].to_string(), g.host(&n)))
        .collect();
    save_weights(path, &cfg, &weights, StorageType::F32).unwrap();
}
