//! The original sr-sde training checkpoint: a `torch.save` zip archive holding
//! `<top>/data.pkl` (a pickle of `{optimizer, model, ema, step}`) and `<top>/data/<key>`, the raw
//! little-endian storages the pickle refers to by persistent id.
//!
//! `model` is the DataParallel state dict (`module.` prefixes, including the `sigmas` buffer and the
//! frozen Fourier `all_modules.0.W`); `ema.shadow_params` is a bare list of the trainable parameters
//! in `model.parameters()` order, so EMA weights get their names by position. Inference uses them.
//! The pickle is read by the restricted, non-executing reader in [`super::pickle`].
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::pickle::{self, StorageDType, TensorRef, Value};
use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// Name of the registered noise-level buffer; it is derived from the config, so it is not a weight.
pub const SIGMAS_BUFFER: &str = "sigmas";

/// The default notion of "trainable" for the NCSN++ state dict: everything except the `sigmas`
/// buffer and the frozen random Fourier features `all_modules.0.W`.
pub fn is_trainable_default(name: &str) -> bool {
    !(name == SIGMAS_BUFFER || name.ends_with("all_modules.0.W"))
}

/// What a checkpoint holds, tensors materialised as contiguous f32.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The file it came from (for error messages).
    pub source: String,
    /// The `model` state dict in file order, `module.` stripped, buffers included.
    pub model: Vec<(String, HostTensor)>,
    /// `ema.shadow_params` in file order (empty when the checkpoint has no EMA).
    pub ema_shadow: Vec<HostTensor>,
    pub ema_decay: Option<f64>,
    pub ema_num_updates: Option<i64>,
    pub step: Option<i64>,
    pub has_optimizer: bool,
}

/// Read a `torch.save` checkpoint. Every problem — not a zip, truncated, a pickle that names a
/// global outside the allow-list, a storage too short for its tensor — is an [`Error::Format`]
/// naming the file (and the tensor where there is one).
pub fn load_checkpoint(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let fmt = |msg: String| Error::format(&file, msg);

    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = Archive::open(BufReader::new(f)).map_err(fmt)?;
    let root = pickle::parse(&archive.read_pickle().map_err(fmt)?).map_err(fmt)?;
    if !matches!(root, Value::Dict(_)) {
        return Err(fmt(format!(
            "checkpoint pickle holds a {}, expected a dict",
            root.type_name()
        )));
    }

    // A bare state dict (every value a tensor) is accepted as `model` alone.
    let model_dict = match root.get("model") {
        Some(m) => m,
        None if is_state_dict(&root) => &root,
        None => return Err(fmt("checkpoint has no `model` entry".into())),
    };
    let Value::Dict(items) = model_dict else {
        return Err(fmt(format!(
            "`model` is a {}, expected a state dict",
            model_dict.type_name()
        )));
    };
    let mut model = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in items {
        let Value::Str(key) = k else {
            return Err(fmt(format!(
                "`model` has a {} key, expected names",
                k.type_name()
            )));
        };
        let name = key.strip_prefix("module.").unwrap_or(key).to_string();
        let Value::Tensor(t) = v else {
            return Err(fmt(format!(
                "`model` entry `{key}` is a {}, expected a tensor",
                v.type_name()
            )));
        };
        if !seen.insert(name.clone()) {
            return Err(fmt(format!("tensor `{name}` appears twice in `model`")));
        }
        let host = archive
            .tensor(t)
            .map_err(|m| fmt(format!("tensor `{key}`: {m}")))?;
        model.push((name, host));
    }

    let mut ema_shadow = Vec::new();
    let (mut ema_decay, mut ema_num_updates) = (None, None);
    if let Some(ema) = root.get("ema") {
        ema_decay = match ema.get("decay") {
            Some(Value::Float(d)) => Some(*d),
            Some(Value::Int(d)) => Some(*d as f64),
            _ => None,
        };
        ema_num_updates = match ema.get("num_updates") {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        match ema.get("shadow_params") {
            Some(Value::List(list)) => {
                for (i, v) in list.iter().enumerate() {
                    let Value::Tensor(t) = v else {
                        return Err(fmt(format!("ema.shadow_params[{i}] is a {}", v.type_name())));
                    };
                    let host = archive
                        .tensor(t)
                        .map_err(|m| fmt(format!("tensor `ema.shadow_params[{i}]`: {m}")))?;
                    ema_shadow.push(host);
                }
            }
            Some(other) => return Err(fmt(format!("ema.shadow_params is a {}", other.type_name()))),
            None => return Err(fmt("`ema` has no shadow_params".into())),
        }
    }

    let step = match root.get("step") {
        None | Some(Value::None) => None,
        Some(Value::Int(s)) => Some(*s),
        Some(other) => return Err(fmt(format!("`step` is a {}, expected an int", other.type_name()))),
    };

    Ok(Checkpoint {
        source: file,
        model,
        ema_shadow,
        ema_decay,
        ema_num_updates,
        step,
        has_optimizer: root.get("optimizer").is_some(),
    })
}

fn is_state_dict(v: &Value) -> bool {
    matches!(v, Value::Dict(items) if !items.is_empty()
        && items.iter().all(|(k, v)| matches!((k, v), (Value::Str(_), Value::Tensor(_)))))
}

impl Checkpoint {
    /// The inference weight set: EMA shadow parameters mapped by position onto the trainable names
    /// of `model` (in state-dict order), plus the non-trainable entries (the frozen Fourier `W`)
    /// taken from `model`. The `sigmas` buffer is dropped (it is derived from the config).
    pub fn ema_weights(&self, is_trainable: impl Fn(&str) -> bool) -> Result<BTreeMap<String, HostTensor>> {
        let werr = |tensor: &str, msg: String| Error::Weights {
            file: self.source.clone(),
            tensor: tensor.to_string(),
            msg,
        };
        if self.ema_shadow.is_empty() {
            return Err(werr(
                "ema.shadow_params",
                "checkpoint has no EMA parameters".into(),
            ));
        }
        let trainable: Vec<&(String, HostTensor)> =
            self.model.iter().filter(|(n, _)| is_trainable(n)).collect();
        if trainable.len() != self.ema_shadow.len() {
            return Err(werr(
                "ema.shadow_params",
                format!(
                    "{} shadow parameters but the model has {} trainable tensors",
                    self.ema_shadow.len(),
                    trainable.len()
                ),
            ));
        }
        let mut out = BTreeMap::new();
        for ((name, model_t), shadow) in trainable.into_iter().zip(&self.ema_shadow) {
            if model_t.shape != shadow.shape {
                return Err(werr(
                    name,
                    format!(
                        "EMA shadow has shape {:?}, model tensor has {:?}",
                        shadow.shape, model_t.shape
                    ),
                ));
            }
            out.insert(name.clone(), shadow.clone());
        }
        for (name, t) in &self.model {
            if !is_trainable(name) && name != SIGMAS_BUFFER {
                out.insert(name.clone(), t.clone());
            }
        }
        Ok(out)
    }

    /// The raw (non-EMA) `model` weights, without the `sigmas` buffer.
    pub fn raw_weights(&self) -> BTreeMap<String, HostTensor> {
        self.model
            .iter()
            .filter(|(n, _)| n != SIGMAS_BUFFER)
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }
}

/// The zip container: the entry prefix (`<top>/`) and a cache of storages already read.
struct Archive<R: Read + std::io::Seek> {
    zip: zip::ZipArchive<R>,
    prefix: String,
    storages: HashMap<String, Vec<u8>>,
}

impl<R: Read + std::io::Seek> Archive<R> {
    fn open(reader: R) -> std::result::Result<Self, String> {
        let zip = zip::ZipArchive::new(reader)
            .map_err(|e| format!("not a torch.save zip archive (legacy or truncated file?): {e}"))?;
        let pkl: Vec<&str> = zip
            .file_names()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let prefix = match pkl[..] {
            [one] => one.trim_end_matches("data.pkl").to_string(),
            [] => return Err("archive has no data.pkl: not a torch.save checkpoint".into()),
            _ => return Err(format!("archive has {} data.pkl entries", pkl.len())),
        };
        let mut a = Archive {
            zip,
            prefix,
            storages: HashMap::new(),
        };
        if let Ok(order) = a.read_entry("byteorder", 16) {
            if order != b"little" {
                return Err(format!(
                    "storages are {:?}-endian; only little-endian is supported",
                    order
                ));
            }
        }
        Ok(a)
    }

    fn read_pickle(&mut self) -> std::result::Result<Vec<u8>, String> {
        // data.pkl of a 1 GB checkpoint is well under a megabyte; 1 GiB is a generous sanity cap.
        self.read_entry("data.pkl", 1 << 30)
    }

    /// Read `<prefix><name>`, refusing entries larger than `limit` bytes.
    fn read_entry(&mut self, name: &str, limit: u64) -> std::result::Result<Vec<u8>, String> {
        let full = format!("{}{name}", self.prefix);
        let entry = self
            .zip
            .by_name(&full)
            .map_err(|e| format!("archive entry {full}: {e}"))?;
        let size = entry.size();
        if size > limit {
            return Err(format!(
                "archive entry {full} is {size} bytes, more than expected"
            ));
        }
        let mut buf = Vec::with_capacity(size.min(1 << 26) as usize); // sizes can lie
        entry
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("archive entry {full}: {e}"))?;
        if buf.len() as u64 != size {
            return Err(format!(
                "archive entry {full}: read {} bytes, header says {size}",
                buf.len()
            ));
        }
        Ok(buf)
    }

    /// Materialise a strided tensor view as a contiguous f32 tensor.
    fn tensor(&mut self, t: &TensorRef) -> std::result::Result<HostTensor, String> {
        let s = &t.storage;
        let esize = s.dtype.size();
        let need = s.numel.checked_mul(esize).ok_or("storage size overflows")?;
        if !self.storages.contains_key(&s.key) {
            let bytes = self.read_entry(&format!("data/{}", s.key), need as u64)?;
            self.storages.insert(s.key.clone(), bytes);
        }
        let bytes = &self.storages[&s.key];
        if bytes.len() < need {
            return Err(format!(
                "storage {} holds {} bytes, needs {need}",
                s.key,
                bytes.len()
            ));
        }

        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or("tensor size overflows")?;
        if numel > 0 {
            // Highest element index the view touches must lie inside the storage.
            let mut last = t.offset;
            for (&d, &st) in t.shape.iter().zip(&t.stride) {
                last = (d - 1)
                    .checked_mul(st)
                    .and_then(|x| x.checked_add(last))
                    .ok_or("stride overflow")?;
            }
            if last >= s.numel {
                return Err(format!(
                    "view (offset {}, size {:?}, stride {:?}) reaches past the storage of {} elements",
                    t.offset, t.shape, t.stride, s.numel
                ));
            }
        }
        let read: fn(&[u8]) -> f32 = match s.dtype {
            StorageDType::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDType::F64 => {
                |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            StorageDType::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDType::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            other => {
                return Err(format!(
                    "unsupported tensor dtype {other:?} (expected a float type)"
                ))
            }
        };

        // Walk the view in row-major order with an index odometer.
        let mut data = Vec::with_capacity(numel);
        let rank = t.shape.len();
        let mut idx = vec![0usize; rank];
        let mut pos = t.offset;
        for _ in 0..numel {
            data.push(read(&bytes[pos * esize..(pos + 1) * esize]));
            for ax in (0..rank).rev() {
                idx[ax] += 1;
                // Wrapping arithmetic: intermediate positions may pass the end, visited ones never do.
                pos = pos.wrapping_add(t.stride[ax]);
                if idx[ax] < t.shape[ax] {
                    break;
                }
                pos = pos.wrapping_sub(t.stride[ax].wrapping_mul(t.shape[ax]));
                idx[ax] = 0;
            }
        }
        Ok(HostTensor::new(t.shape.clone(), data))
    }
}
