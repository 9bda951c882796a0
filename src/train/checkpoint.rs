//! Training checkpoints and export of inference weights.
//!
//! A checkpoint is one safetensors file holding `param.<name>` (every weight, the frozen Fourier W
//! included), `ema.<name>`, `adam_m.<name>` and `adam_v.<name>` (trainable weights only), all f32,
//! and in its metadata the model config (`config`, `data`: the same JSON as a weights file), the
//! run's hyper-parameters (`hyper`) and counters (`state`: step, Adam steps, EMA updates and the
//! data stream position). Since all randomness of a run is counter-based (see [`crate::train`]),
//! these counters are the complete RNG and data-order state: a resumed run is exact.
//!
//! A run keeps its latest checkpoint as `RUN/checkpoint.safetensors`. Writing is two-phase:
//! [`Checkpoint::prepare`] streams the file to a hidden temporary name next to it and fsyncs it,
//! [`PendingCheckpoint::commit`] renames it over the old one (and syncs the folder). Until the
//! rename the previous checkpoint is untouched; a crash leaves at most a stale temporary file,
//! which nothing ever reads (loading opens only the final name) and the next write replaces.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::load::{check_weights, DATA_KEY};
use crate::model::ncsnpp::param_specs;
use crate::model::sharded::{save_sharded, ShardIndex};
use crate::model::weights::{load_safetensors, save_safetensors, StorageType, WeightFile, CONFIG_KEY};
use crate::model::NetConfig;
use crate::tensor::HostTensor;
use crate::train::optim::{Adam, AdamConfig, Ema};
use crate::train::Hyper;

/// File name of a run's latest checkpoint inside the run folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Value of the `format` metadata key.
pub const FORMAT: &str = "srsde-fast/train-checkpoint/1";

/// Counters of a run: with the seed (in [`Hyper`]) they fix every future random draw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Training steps completed.
    pub step: u64,
    /// Stream index of the next training sample (see [`crate::train::data`]).
    pub next_sample: u64,
}

/// Everything needed to continue a run or to export its EMA weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: NetConfig,
    pub hyper: Hyper,
    pub state: TrainState,
    /// All current weights (trainable and frozen).
    pub params: BTreeMap<String, HostTensor>,
    pub adam: Adam,
    pub ema: Ema,
}

/// The optimiser settings of a run's hyper-parameters.
pub fn adam_config(h: &Hyper) -> AdamConfig {
    AdamConfig {
        lr: h.lr,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.adam_eps,
        warmup: h.warmup,
        grad_clip: h.grad_clip,
        decay: h.lr_decay,
    }
}

/// The latest checkpoint of a run: `path` itself if it is a file, else `path/checkpoint.safetensors`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let file = if path.is_dir() {
        path.join(CHECKPOINT_FILE)
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        return Err(Error::Config(format!(
            "no training checkpoint at {}",
            file.display()
        )));
    }
    Ok(file)
}

/// An f32 tensor handed to the safetensors writer, converted to bytes only when written (so a
/// large checkpoint is never held twice in memory).
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// A checkpoint written and synced under a temporary name, not yet in place. Dropping it without
/// [`commit`](Self::commit) deletes the temporary file; the previous checkpoint stays valid.
#[derive(Debug)]
pub struct PendingCheckpoint {
    temp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl PendingCheckpoint {
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Atomically replace the destination with the written file.
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.temp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.done = true;
        // Make the rename durable; not every platform can open a folder, so best effort.
        if let Some(dir) = self.dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for PendingCheckpoint {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// A checkpoint's contents borrowed from wherever they live (a training run saves without
/// copying its weights and optimiser state).
pub struct CheckpointRef<'a> {
    pub config: &'a NetConfig,
    pub hyper: &'a Hyper,
    pub state: TrainState,
    pub params: &'a BTreeMap<String, HostTensor>,
    pub adam: &'a Adam,
    pub ema: &'a Ema,
}

impl Checkpoint {
    pub fn as_ref(&self) -> CheckpointRef<'_> {
        CheckpointRef {
            config: &self.config,
            hyper: &self.hyper,
            state: self.state,
            params: &self.params,
            adam: &self.adam,
            ema: &self.ema,
        }
    }

    /// Phase one of a save: write the whole checkpoint to a temporary file next to `dest` and
    /// fsync it.
    pub fn prepare(&self, dest: &Path) -> Result<PendingCheckpoint> {
        self.as_ref().prepare(dest)
    }

    /// Write atomically to `dest` (prepare + commit).
    pub fn save(&self, dest: &Path) -> Result<()> {
        self.prepare(dest)?.commit()
    }
}

impl CheckpointRef<'_> {
    /// Phase one of a save: write the whole checkpoint to a temporary file next to `dest` and
    /// fsync it.
    pub fn prepare(&self, dest: &Path) -> Result<PendingCheckpoint> {
        let file = dest.display().to_string();
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = dest
            .file_name()
            .ok_or_else(|| Error::format(&file, "not a file path"))?
            .to_string_lossy()
            .to_string();
        let temp = dir.join(format!(".{base}.tmp{}", std::process::id()));
        let pending = PendingCheckpoint {
            temp,
            dest: dest.to_path_buf(),
            done: false,
        };

        let mut views: Vec<(String, F32View<'_>)> = Vec::new();
        for (name, t) in self.params {
            views.push((
                format!("param.{name}"),
                F32View {
                    shape: &t.shape,
                    data: &t.data,
                },
            ));
        }
        for (prefix, map) in [
            ("ema", &self.ema.shadow),
            ("adam_m", &self.adam.m),
            ("adam_v", &self.adam.v),
        ] {
            for (name, data) in map {
                let p = self.params.get(name).ok_or_else(|| {
                    Error::Other(format!(
                        "checkpoint: {prefix} state for unknown parameter `{name}`"
                    ))
                })?;
                if p.data.len() != data.len() {
                    return Err(Error::shape(
                        "checkpoint",
                        format!("{prefix}.{name}: size differs"),
                    ));
                }
                views.push((
                    format!("{prefix}.{name}"),
                    F32View {
                        shape: &p.shape,
                        data,
                    },
                ));
            }
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(CONFIG_KEY.to_string(), self.config.model_json());
        meta.insert(DATA_KEY.to_string(), self.config.data_json());
        meta.insert("hyper".to_string(), json(&self.hyper));
        meta.insert("state".to_string(), json(&self.state));
        meta.insert("adam_steps".to_string(), self.adam.steps.to_string());
        meta.insert("ema_updates".to_string(), self.ema.updates.to_string());
        safetensors::serialize_to_file(views, Some(meta), &pending.temp)
            .map_err(|e| Error::format(&file, format!("cannot write checkpoint: {e}")))?;
        std::fs::File::open(&pending.temp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&pending.temp, e))?;
        Ok(pending)
    }

    /// Write atomically to `dest` (prepare + commit).
    pub fn save(&self, dest: &Path) -> Result<()> {
        self.prepare(dest)?.commit()
    }
}

impl Checkpoint {
    /// Read a checkpoint file (or a run folder's latest checkpoint), checking every tensor against
    /// the stored config.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let path = resolve(path)?;
        let file = path.display().to_string();
        let wf = load_safetensors(&path)?;
        let meta = |key: &str| {
            wf.metadata.get(key).ok_or_else(|| {
                Error::format(&file, format!("not a training checkpoint (no `{key}` metadata)"))
            })
        };
        if meta("format")? != FORMAT {
            return Err(Error::format(
                &file,
                format!("unknown checkpoint format `{}`", meta("format")?),
            ));
        }
        let config = NetConfig::from_json(meta(CONFIG_KEY)?, Some(meta(DATA_KEY)?))?;
        let hyper: Hyper = serde_json::from_str(meta("hyper")?)
            .map_err(|e| Error::format(&file, format!("metadata `hyper`: {e}")))?;
        let state: TrainState = serde_json::from_str(meta("state")?)
            .map_err(|e| Error::format(&file, format!("metadata `state`: {e}")))?;
        let count = |key: &str| -> Result<u64> {
            meta(key)?
                .parse()
                .map_err(|e| Error::format(&file, format!("metadata `{key}`: {e}")))
        };
        let (adam_steps, ema_updates) = (count("adam_steps")?, count("ema_updates")?);

        let mut groups: BTreeMap<&str, BTreeMap<String, HostTensor>> = BTreeMap::new();
        for (name, t) in wf.tensors {
            let (prefix, rest) = name
                .split_once('.')
                .ok_or_else(|| Error::format(&file, format!("unexpected tensor `{name}`")))?;
            let prefix = match prefix {
                "param" => "param",
                "ema" => "ema",
                "adam_m" => "adam_m",
                "adam_v" => "adam_v",
                _ => return Err(Error::format(&file, format!("unexpected tensor `{name}`"))),
            };
            groups.entry(prefix).or_default().insert(rest.to_string(), t);
        }
        let mut take = |p: &str| groups.remove(p).unwrap_or_default();
        let params = take("param");
        check_weights(&file, &config, &params)?;
        let trainable: Vec<(String, Vec<usize>)> = param_specs(&config)
            .into_iter()
            .filter(|s| s.2)
            .map(|s| (s.0, s.1))
            .collect();
        let mut state_of = |prefix: &str| -> Result<BTreeMap<String, Vec<f32>>> {
            let mut g = take(prefix);
            let mut out = BTreeMap::new();
            for (name, shape) in &trainable {
                let t = g.remove(name).ok_or_else(|| Error::Weights {
                    file: file.clone(),
                    tensor: format!("{prefix}.{name}"),
                    msg: "missing".into(),
                })?;
                if &t.shape != shape {
                    return Err(Error::Weights {
                        file: file.clone(),
                        tensor: format!("{prefix}.{name}"),
                        msg: format!("shape {:?}, expected {:?}", t.shape, shape),
                    });
                }
                out.insert(name.clone(), t.data);
            }
            if let Some(extra) = g.keys().next() {
                return Err(Error::format(
                    &file,
                    format!("unexpected tensor `{prefix}.{extra}`"),
                ));
            }
            Ok(out)
        };
        let shadow = state_of("ema")?;
        let (m, v) = (state_of("adam_m")?, state_of("adam_v")?);
        hyper.validate()?;
        Ok(Checkpoint {
            adam: Adam {
                config: adam_config(&hyper),
                steps: adam_steps,
                m,
                v,
            },
            ema: Ema {
                rate: hyper.ema_rate,
                updates: ema_updates,
                shadow,
            },
            config,
            hyper,
            state,
            params,
        })
    }

    /// Inference weights: the EMA of every trainable weight plus the frozen ones as they are.
    pub fn ema_weights(&self) -> BTreeMap<String, HostTensor> {
        self.params
            .iter()
            .map(|(name, p)| {
                let data = self
                    .ema
                    .shadow
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| p.data.clone());
                (name.clone(), HostTensor::new(p.shape.clone(), data))
            })
            .collect()
    }
}

/// Write a checkpoint's EMA weights as an inference weights file (config in the metadata), loadable
/// with `upscale --model`. `ckpt` is a checkpoint file or a run folder. Returns the step exported.
/// The metadata also holds the [`training_record`] under [`TRAINING_KEY`].
pub fn export(ckpt: &Path, out: &Path, storage: StorageType) -> Result<u64> {
    let ck = Checkpoint::load(ckpt)?;
    let mut metadata = BTreeMap::new();
    metadata.insert(CONFIG_KEY.to_string(), ck.config.model_json());
    metadata.insert(DATA_KEY.to_string(), ck.config.data_json());
    metadata.insert(TRAINING_KEY.to_string(), training_record(&ck).to_string());
    let wf = WeightFile {
        tensors: ck.ema_weights(),
        metadata,
    };
    save_safetensors(out, &wf, storage)?;
    Ok(ck.state.step)
}

/// Write a checkpoint's EMA weights as a sharded export in the folder `dir` (see
/// [`crate::model::sharded`]): shards of at most `max_shard_bytes`, the index holding the config
/// and the [`training_record`]. Returns the index.
pub fn export_sharded(
    ckpt: &Path,
    dir: &Path,
    storage: StorageType,
    max_shard_bytes: usize,
) -> Result<ShardIndex> {
    let ck = Checkpoint::load(ckpt)?;
    save_sharded(
        dir,
        &ck.config,
        &ck.ema_weights(),
        storage,
        max_shard_bytes,
        Some(training_record(&ck)),
    )
}

/// Metadata key of the training record in a single-file export.
pub const TRAINING_KEY: &str = "training";

/// How much training the EMA weights of a checkpoint have had: totals over every run behind them
/// (`steps`, `images_seen`, `runs`, carried over from `--init-from` sources) and this run's own
/// numbers and settings (`last_run`).
pub fn training_record(ck: &Checkpoint) -> serde_json::Value {
    let h = &ck.hyper;
    let images = ck.state.step * h.batch as u64;
    let (steps0, images0, runs0) = h.init.as_ref().map_or((0, 0, 0), |i| (i.steps, i.images, i.runs));
    serde_json::json!({
        "steps": steps0 + ck.state.step,
        "images_seen": images0 + images,
        "runs": runs0 + 1,
        "last_run": {
            "steps": ck.state.step,
            "images_seen": images,
            "batch": h.batch,
            "lr": h.lr,
            "warmup": h.warmup,
            "lr_decay": h.lr_decay,
            "ema_rate": h.ema_rate,
            "seed": h.seed,
            "val_fraction": h.val_fraction,
            "init_from": h.init.as_ref().map(|i| i.source.clone()),
        }
    })
}

/// The totals (steps, images seen, runs) of a [`training_record`], if `v` is one.
pub fn record_totals(v: &serde_json::Value) -> Option<(u64, u64, u64)> {
    Some((
        v.get("steps")?.as_u64()?,
        v.get("images_seen")?.as_u64()?,
        v.get("runs")?.as_u64()?,
    ))
}
