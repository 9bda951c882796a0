//! Sharded weights: one model's tensors split over several safetensors files of bounded size plus
//! a small JSON index, so large weights can live in a repository whose files must stay small (and
//! be embedded in the binary, see [`crate::model::default`]).
//!
//! A sharded export is a folder:
//! ```text
//! model.index.json                      format, storage dtype, model config, training notes,
//!                                       and per shard: file name, byte size, sha256, tensor names
//! model-00001-of-00003.safetensors      each at most the requested size
//! model-00002-of-00003.safetensors
//! model-00003-of-00003.safetensors
//! ```
//! Loading reads the index, then every shard it lists: a missing shard, a size or sha256 mismatch
//! or a shard whose tensors differ from the index is an error naming that shard. Tensors stored as
//! f16 (or bf16) are converted to f32 on load.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::sha256::sha256_hex;
use crate::model::weights::{encode_safetensors, parse_safetensors, write_atomic, StorageType, WeightFile};
use crate::model::NetConfig;
use crate::tensor::HostTensor;

/// File name of the index inside a sharded export folder.
pub const INDEX_FILE: &str = "model.index.json";
/// Value of the index's `format` field.
pub const FORMAT: &str = "srsde-fast/sharded-weights/1";

/// The index of a sharded export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    /// Storage type of the shards: "f16" or "f32".
    pub dtype: String,
    /// The model config (the `config` metadata JSON of a single weights file, as an object).
    pub config: serde_json::Value,
    /// The data config (`data` metadata JSON).
    pub data: serde_json::Value,
    /// Number of stored values over all tensors.
    pub parameters: u64,
    /// Free-form provenance written by the exporter (e.g. training steps, images seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
    pub shards: Vec<ShardEntry>,
}

/// One shard as the index lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    /// Names of the tensors stored in this shard.
    pub tensors: Vec<String>,
}

/// File name of shard `i` (0-based) of `n`: `model-00001-of-00003.safetensors`.
pub fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// True for names [`shard_name`] produces (any index and count).
pub fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model-") else {
        return false;
    };
    let Some(rest) = rest.strip_suffix(".safetensors") else {
        return false;
    };
    match rest.split_once("-of-") {
        Some((a, b)) => {
            a.len() == 5
                && b.len() == 5
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

/// True when `path` names a sharded export: a folder, or a `.json` index file.
pub fn is_sharded_path(path: &Path) -> bool {
    path.is_dir() || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The index file of a sharded export given as its folder or as the index itself.
pub fn index_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(INDEX_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Bytes a tensor adds to a shard: its data plus a generous allowance for its header entry
/// (name, dtype, shape, offsets) and the header's 8-byte alignment padding.
fn shard_cost(name: &str, t: &HostTensor, esize: usize) -> usize {
    t.data.len() * esize + name.len() + 16 * t.shape.len() + 96
}

/// Fixed bytes of a shard besides its tensors (length prefix, braces, shard metadata).
const SHARD_OVERHEAD: usize = 256;

/// Write `weights` with `config` as a sharded export into `dir` (created if needed): shards of at
/// most `max_shard_bytes` each, then the index (written last, so a folder with an index is
/// complete). Stale shards of an earlier export in `dir` are removed. Returns the index.
pub fn save_sharded(
    dir: &Path,
    config: &NetConfig,
    weights: &BTreeMap<String, HostTensor>,
    storage: StorageType,
    max_shard_bytes: usize,
    training: Option<serde_json::Value>,
) -> Result<ShardIndex> {
    let dir_name = dir.display().to_string();
    let esize = match storage {
        StorageType::F32 => 4,
        StorageType::F16 => 2,
    };
    if max_shard_bytes < 4096 {
        return Err(Error::Config(format!(
            "shard size limit {max_shard_bytes} bytes is too small (at least 4 KiB)"
        )));
    }
    // Greedy packing in name order: a tensor goes to the current shard while the estimate fits.
    let mut groups: Vec<Vec<&String>> = Vec::new();
    let mut used = SHARD_OVERHEAD;
    for (name, t) in weights {
        let cost = shard_cost(name, t, esize);
        if SHARD_OVERHEAD + cost > max_shard_bytes {
            return Err(Error::Config(format!(
                "tensor `{name}` ({} bytes) does not fit in a shard of {max_shard_bytes} bytes",
                t.data.len() * esize
            )));
        }
        if groups.is_empty() || used + cost > max_shard_bytes {
            groups.push(Vec::new());
            used = SHARD_OVERHEAD;
        }
        groups.last_mut().expect("a group was pushed").push(name);
        used += cost;
    }
    if groups.is_empty() {
        return Err(Error::Config("no tensors to export".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

    let n = groups.len();
    let mut entries = Vec::with_capacity(n);
    for (i, names) in groups.iter().enumerate() {
        let file = shard_name(i, n);
        let path = dir.join(&file);
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), format!("{FORMAT} shard"));
        metadata.insert("shard".to_string(), format!("{} of {n}", i + 1));
        let wf = WeightFile {
            tensors: names.iter().map(|&k| (k.clone(), weights[k].clone())).collect(),
            metadata,
        };
        let bytes = encode_safetensors(&wf, storage, &path.display().to_string())?;
        if bytes.len() > max_shard_bytes {
            // The estimate is deliberately generous; this guards the promise, not a likely case.
            return Err(Error::Other(format!(
                "{}: shard would be {} bytes, over the limit {max_shard_bytes}",
                path.display(),
                bytes.len()
            )));
        }
        write_atomic(&path, &bytes)?;
        entries.push(ShardEntry {
            file,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            tensors: names.iter().map(|s| s.to_string()).collect(),
        });
    }
    remove_stale_shards(dir, &entries)?;

    let json = |s: String| -> Result<serde_json::Value> {
        serde_json::from_str(&s).map_err(|e| Error::Other(format!("config JSON: {e}")))
    };
    let index = ShardIndex {
        format: FORMAT.to_string(),
        dtype: match storage {
            StorageType::F32 => "f32",
            StorageType::F16 => "f16",
        }
        .to_string(),
        config: json(config.model_json())?,
        data: json(config.data_json())?,
        parameters: weights.values().map(|t| t.data.len() as u64).sum(),
        training,
        shards: entries,
    };
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::format(&dir_name, e.to_string()))?;
    write_atomic(&dir.join(INDEX_FILE), format!("{text}\n").as_bytes())?;
    Ok(index)
}

/// Delete shard files in `dir` that the new index does not list (left by an earlier export with
/// a different shard count), so the folder holds exactly one model.
fn remove_stale_shards(dir: &Path, keep: &[ShardEntry]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_shard_name(&name) && !keep.iter().any(|k| k.file == name) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Parse and check an index's text (`origin` names it in errors).
pub fn parse_index(text: &str, origin: &str) -> Result<ShardIndex> {
    let index: ShardIndex = serde_json::from_str(text)
        .map_err(|e| Error::format(origin, format!("not a sharded-weights index: {e}")))?;
    if index.format != FORMAT {
        return Err(Error::format(
            origin,
            format!("unknown index format `{}` (expected `{FORMAT}`)", index.format),
        ));
    }
    if index.shards.is_empty() {
        return Err(Error::format(origin, "the index lists no shards"));
    }
    for s in &index.shards {
        if s.file.contains('/') || s.file.contains('\\') || s.file.starts_with('.') {
            return Err(Error::format(
                origin,
                format!("shard name `{}` must be a plain file name", s.file),
            ));
        }
    }
    Ok(index)
}

/// The model config stored in an index.
pub fn index_config(index: &ShardIndex, origin: &str) -> Result<NetConfig> {
    NetConfig::from_json(&index.config.to_string(), Some(&index.data.to_string()))
        .map_err(|e| Error::format(origin, format!("config: {e}")))
}

/// Load every shard an index lists through `read` (which gets a shard's file name and returns its
/// bytes), checking size, sha256 and tensor names. `describe` turns a shard name into how errors
/// name it (a path, or "embedded …").
pub fn load_shards<'a>(
    index: &ShardIndex,
    read: impl Fn(&str) -> Result<Cow<'a, [u8]>>,
    describe: impl Fn(&str) -> String,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut tensors = BTreeMap::new();
    for s in &index.shards {
        let name = describe(&s.file);
        let bytes = read(&s.file)?;
        if bytes.len() as u64 != s.bytes {
            return Err(Error::format(
                &name,
                format!(
                    "shard is {} bytes but the index says {} (truncated, corrupt or from another export)",
                    bytes.len(),
                    s.bytes
                ),
            ));
        }
        let digest = sha256_hex(&bytes);
        if digest != s.sha256 {
            return Err(Error::format(
                &name,
                format!(
                    "sha256 {digest} differs from the index's {} (corrupt or from another export)",
                    s.sha256
                ),
            ));
        }
        let wf = parse_safetensors(&bytes, &name)?;
        // A NaN or infinity is named with its shard (the merged set is checked again by name).
        crate::model::load::check_finite(&name, &wf.tensors)?;
        let mut listed: Vec<&str> = s.tensors.iter().map(|t| t.as_str()).collect();
        listed.sort_unstable();
        if !wf.tensors.keys().map(|k| k.as_str()).eq(listed.iter().copied()) {
            return Err(Error::format(
                &name,
                "the shard's tensors differ from those the index lists for it",
            ));
        }
        for (k, t) in wf.tensors {
            if tensors.insert(k.clone(), t).is_some() {
                return Err(Error::format(
                    &name,
                    format!("tensor `{k}` is stored in two shards"),
                ));
            }
        }
    }
    Ok(tensors)
}

/// Load a sharded export from disk: its folder or its index file. Returns the index, the stored
/// config and every tensor as f32.
pub fn load_sharded(path: &Path) -> Result<(ShardIndex, NetConfig, BTreeMap<String, HostTensor>)> {
    let index_file = index_path(path);
    let origin = index_file.display().to_string();
    let text = std::fs::read_to_string(&index_file).map_err(|e| {
        if path.is_dir() && e.kind() == std::io::ErrorKind::NotFound {
            Error::Config(format!(
                "{} is a folder without {INDEX_FILE}: not a sharded weights export",
                path.display()
            ))
        } else {
            Error::io(&index_file, e)
        }
    })?;
    let index = parse_index(&text, &origin)?;
    let config = index_config(&index, &origin)?;
    let dir = index_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let tensors = load_shards(
        &index,
        |f| {
            let p = dir.join(f);
            std::fs::read(&p).map(Cow::Owned).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::format(
                        p.display().to_string(),
                        format!("shard listed in {origin} is missing"),
                    )
                } else {
                    Error::io(&p, e)
                }
            })
        },
        |f| dir.join(f).display().to_string(),
    )?;
    Ok((index, config, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert_eq!(shard_name(0, 3), "model-00001-of-00003.safetensors");
        assert!(is_shard_name("model-00002-of-00003.safetensors"));
        for bad in [
            "model.safetensors",
            "model-1-of-3.safetensors",
            "model-00001-of-00003.json",
            "xmodel-00001-of-00003.safetensors",
        ] {
            assert!(!is_shard_name(bad), "{bad}");
        }
    }
}
