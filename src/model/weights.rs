//! Weight files in safetensors format: loading (any float storage, converted to f32), atomic saving
//! (f32 or f16 storage, metadata kept — the model config JSON travels under the `config` key) and
//! checking a loaded set against the names and shapes a model expects.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// Metadata key holding the model config as JSON.
pub const CONFIG_KEY: &str = "config";

/// The contents of a weights file: named f32 tensors plus string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightFile {
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Element type written to disk by [`save_safetensors`]. Tensors are always f32 in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageType {
    F32,
    F16,
}

/// Load a safetensors file; F32, F16, BF16 and F64 tensors are converted to f32, anything else is
/// a format error naming the file and the tensor.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<WeightFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, &path.display().to_string())
}

/// Parse safetensors bytes (a file's contents, or weights embedded in the binary); `file` names
/// them in errors. Same conversions as [`load_safetensors`].
pub fn parse_safetensors(bytes: &[u8], file: &str) -> Result<WeightFile> {
    check_header_bounds(bytes).map_err(|msg| Error::format(file, msg))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();

    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(&view).map_err(|msg| Error::format(file, format!("tensor `{name}`: {msg}")))?;
        tensors.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(WeightFile { tensors, metadata })
}

/// The string metadata of a safetensors file, reading only its header (cheap on large files).
pub fn read_safetensors_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let path = path.as_ref();
    let file = path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::format(&file, "file is shorter than the 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(Error::format(
            &file,
            format!("header length {n} is not plausible"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(&file, format!("header is not valid JSON: {e}")))?;
    let meta = json.get("__metadata__").and_then(|m| m.as_object());
    Ok(meta
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Guard against headers whose offsets are absurd before handing the bytes to the `safetensors`
/// crate (whose own bounds arithmetic could overflow on such input).
fn check_header_bounds(bytes: &[u8]) -> std::result::Result<(), String> {
    let n = bytes
        .get(..8)
        .ok_or("file is shorter than the 8-byte header length")?;
    let n = u64::from_le_bytes(n.try_into().map_err(|_| "short header length")?);
    let body = (bytes.len() - 8) as u64;
    if n > body {
        return Err(format!(
            "header claims {n} bytes but only {body} follow (truncated file?)"
        ));
    }
    let header = &bytes[8..8 + n as usize];
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let obj = json.as_object().ok_or("header is not a JSON object")?;
    let data_len = body - n;
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        let end = offsets.and_then(|o| o.get(1)).and_then(|e| e.as_u64());
        match end {
            Some(end) if end <= data_len => {}
            Some(end) => {
                return Err(format!(
                    "tensor `{name}` ends at byte {end} of the data but the file holds {data_len} (truncated file?)"
                ))
            }
            None => return Err(format!("tensor `{name}` has no valid data_offsets")),
        }
    }
    Ok(())
}

fn to_f32(view: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let (esize, read): (usize, fn(&[u8]) -> f32) = match view.dtype() {
        Dtype::F32 => (4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        Dtype::F64 => (8, |c| {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
        }),
        Dtype::F16 => (2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        Dtype::BF16 => (2, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        other => {
            return Err(format!(
                "unsupported dtype {other:?} (expected F32, F16, BF16 or F64)"
            ))
        }
    };
    let d = view.data();
    let n = view
        .shape()
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or("size overflows")?;
    if n.checked_mul(esize) != Some(d.len()) {
        return Err(format!("{} bytes of data for shape {:?}", d.len(), view.shape()));
    }
    Ok(d.chunks_exact(esize).map(read).collect())
}

/// Save a weight file atomically: the bytes go to a temporary file in the same directory, which is
/// synced and then renamed over `path`, so a crash never leaves a half-written weights file.
/// With [`StorageType::F16`] a value that is finite in f32 but overflows f16 is an error.
pub fn save_safetensors(path: impl AsRef<Path>, wf: &WeightFile, storage: StorageType) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_safetensors(wf, storage, &path.display().to_string())?;
    write_atomic(path, &bytes)
}

/// The safetensors bytes of a weight file in the given storage type (`file` names it in errors).
/// With [`StorageType::F16`] a value that is finite in f32 but overflows f16 is an error.
pub fn encode_safetensors(wf: &WeightFile, storage: StorageType, file: &str) -> Result<Vec<u8>> {
    let mut encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(wf.tensors.len());
    for (name, t) in &wf.tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(Error::format(
                file,
                format!("tensor `{name}`: shape {:?} but {} values", t.shape, t.data.len()),
            ));
        }
        let (dtype, bytes) = match storage {
            StorageType::F32 => (Dtype::F32, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            StorageType::F16 => {
                let mut bytes = Vec::with_capacity(t.data.len() * 2);
                for &v in &t.data {
                    let h = half::f16::from_f32(v);
                    if v.is_finite() && !h.is_finite() {
                        return Err(Error::format(
                            file,
                            format!("tensor `{name}`: value {v} does not fit in f16"),
                        ));
                    }
                    bytes.extend(h.to_le_bytes());
                }
                (Dtype::F16, bytes)
            }
        };
        encoded.push((name.clone(), dtype, t.shape.clone(), bytes));
    }
    let mut views = Vec::with_capacity(encoded.len());
    for (name, dtype, shape, bytes) in &encoded {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| Error::format(file, format!("tensor `{name}`: {e}")))?;
        views.push((name.as_str(), view));
    }
    let metadata: HashMap<String, String> = wf.metadata.clone().into_iter().collect();
    let metadata = if metadata.is_empty() { None } else { Some(metadata) };
    safetensors::serialize(views, metadata).map_err(|e| Error::format(file, format!("cannot serialize: {e}")))
}

/// Write `bytes` to `path` through a synced temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let base = path
        .file_name()
        .ok_or_else(|| Error::format(path.display().to_string(), "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp{}", base.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform can open a directory, so best effort.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Check a loaded tensor set against what a model expects: every expected name present with
/// exactly that shape, and nothing else. The error names the file and the first offending tensor.
pub fn check_against(
    file_name: &str,
    tensors: &BTreeMap<String, HostTensor>,
    expected: &[(String, Vec<usize>)],
) -> Result<()> {
    let err = |tensor: &str, msg: String| Error::Weights {
        file: file_name.to_string(),
        tensor: tensor.to_string(),
        msg,
    };
    for (name, shape) in expected {
        match tensors.get(name) {
            None => return Err(err(name, "missing".into())),
            Some(t) if &t.shape != shape => {
                return Err(err(
                    name,
                    format!("shape {:?} in file, model expects {:?}", t.shape, shape),
                ))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let extra: Vec<&str> = tensors
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !known.contains(k))
        .collect();
    if let Some(first) = extra.first() {
        let more = if extra.len() > 1 {
            format!(" (and {} more)", extra.len() - 1)
        } else {
            String::new()
        };
        return Err(err(
            first,
            format!("unexpected tensor, the model has no such parameter{more}"),
        ));
    }
    Ok(())
}
