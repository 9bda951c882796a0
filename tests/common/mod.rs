//! Shared helpers for integration tests: reading ../shared/golden.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
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
