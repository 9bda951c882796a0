//! Loading a network from a file: our safetensors (config in the metadata; single file or a sharded
//! export's folder / index, see [`crate::model::sharded`]) or the original sr-sde
//! `checkpoint.pth` (EMA weights; the config is not stored there, so it is inferred from the
//! tensor shapes and checked against every tensor).
use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::config::{EmbeddingType, NetConfig};
use crate::model::ncsnpp::{param_specs, Ncsnpp};
use crate::model::pth::{is_trainable_default, load_checkpoint};
use crate::model::sharded;
use crate::model::weights::{load_safetensors, save_safetensors, StorageType, WeightFile, CONFIG_KEY};
use crate::tensor::HostTensor;

/// Metadata key holding the `config.data` JSON.
pub const DATA_KEY: &str = "data";

/// Inference weights and their config, on the host.
pub struct LoadedWeights {
    pub config: NetConfig,
    pub weights: BTreeMap<String, HostTensor>,
    /// Human-readable notes on how the file was interpreted (e.g. an inferred config).
    pub notes: Vec<String>,
}

/// Read inference weights from `.safetensors` or an original `.pth` checkpoint (EMA weights).
/// `config_override` replaces the stored/inferred config (a preset name's config, say).
pub fn load_weights(path: &Path, config_override: Option<NetConfig>) -> Result<LoadedWeights> {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut notes = Vec::new();
    let (weights, stored_config) = match ext.as_str() {
        // A sharded export (its folder or its index); see [`crate::model::sharded`].
        _ if sharded::is_sharded_path(path) => {
            let (_, config, weights) = sharded::load_sharded(path)?;
            (weights, Some(config))
        }
        "pth" | "pt" | "ckpt" => {
            let ck = load_checkpoint(path)?;
            notes.push(format!(
                "{name}: original sr-sde checkpoint (step {}), using its EMA weights",
                ck.step.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
            ));
            (ck.ema_weights(is_trainable_default)?, None)
        }
        _ => {
            let wf = load_safetensors(path)?;
            let cfg = match wf.metadata.get(CONFIG_KEY) {
                Some(c) => Some(
                    NetConfig::from_json(c, wf.metadata.get(DATA_KEY).map(|s| s.as_str()))
                        .map_err(|e| Error::format(&name, format!("metadata `config`: {e}")))?,
                ),
                None => None,
            };
            let mut w = wf.tensors;
            w.remove("sigmas"); // derived buffer, if a converter kept it
            (w, cfg)
        }
    };
    let config = match (config_override, stored_config) {
        (Some(c), _) => c,
        (None, Some(c)) => c,
        (None, None) => {
            let c = infer_config(&weights).map_err(|e| Error::format(&name, e))?;
            notes.push(format!(
                "{name}: no stored config; inferred `{}` layout from the tensor shapes",
                describe(&c)
            ));
            c
        }
    };
    check_weights(&name, &config, &weights)?;
    Ok(LoadedWeights {
        config,
        weights,
        notes,
    })
}

fn describe(c: &NetConfig) -> String {
    format!(
        "{:?} nf={} ch_mult={:?} res_blocks={}",
        c.sde(),
        c.model.nf,
        c.model.ch_mult,
        c.model.num_res_blocks
    )
}

/// Every tensor the config needs, with the right shape, and nothing else.
pub fn check_weights(file: &str, config: &NetConfig, weights: &BTreeMap<String, HostTensor>) -> Result<()> {
    let specs = param_specs(config);
    for (name, shape, _) in &specs {
        match weights.get(name) {
            None => {
                return Err(Error::Weights {
                    file: file.into(),
                    tensor: name.clone(),
                    msg: "missing".into(),
                })
            }
            Some(t) if &t.shape != shape => {
                return Err(Error::Weights {
                    file: file.into(),
                    tensor: name.clone(),
                    msg: format!("shape {:?} in file, model config expects {:?}", t.shape, shape),
                })
            }
            _ => {}
        }
    }
    if let Some(extra) = weights.keys().find(|k| !specs.iter().any(|s| &s.0 == *k)) {
        return Err(Error::Weights {
            file: file.into(),
            tensor: extra.clone(),
            msg: "not part of the model described by the config (wrong config or wrong file?)".into(),
        });
    }
    check_finite(file, weights)
}

/// Every value of every tensor finite: a NaN or an infinity in the weights would turn every
/// output into garbage (an all-black picture), so it is an error naming the file and the tensor.
pub fn check_finite(file: &str, weights: &BTreeMap<String, HostTensor>) -> Result<()> {
    for (name, t) in weights {
        let mut bad = t.data.iter().enumerate().filter(|(_, v)| !v.is_finite());
        if let Some((i, v)) = bad.next() {
            let more = bad.count();
            return Err(Error::Weights {
                file: file.into(),
                tensor: name.clone(),
                msg: format!(
                    "holds {} non-finite value(s) (the first, {v}, at flat index {i}); the weights are \
                     corrupt or come from a diverged training run",
                    more + 1
                ),
            });
        }
    }
    Ok(())
}

/// Guess the paper's config family from the tensors of a checkpoint without config: a Fourier W
/// means the VE NCSN++ (7 levels), otherwise the VP DDPM++ layout (4 levels); nf from the first
/// conv, the number of res-blocks from the module count. The guess is then checked tensor by
/// tensor by the caller.
pub fn infer_config(w: &BTreeMap<String, HostTensor>) -> std::result::Result<NetConfig, String> {
    let fourier = w.contains_key("all_modules.0.W");
    let conv_in = if fourier {
        "all_modules.3.weight"
    } else {
        "all_modules.2.weight"
    };
    let nf = w
        .get(conv_in)
        .map(|t| t.shape[0])
        .ok_or_else(|| format!("cannot infer the network layout: `{conv_in}` not found"))?;
    let modules = module_count(w.keys());
    let base = if fourier { "ve-paper" } else { "vp-paper" };
    let mut cfg = NetConfig::preset(base).map_err(|e| e.to_string())?;
    cfg.model.nf = nf;
    for blocks in 1..=16 {
        cfg.model.num_res_blocks = blocks;
        if module_count(param_specs(&cfg).iter().map(|s| &s.0)) == modules {
            if cfg.model.embedding_type == EmbeddingType::Positional {
                cfg.model.dropout = 0.0; // inference
            }
            return Ok(cfg);
        }
    }
    Err(format!(
        "cannot infer the network layout from {modules} modules (nf {nf})"
    ))
}

/// Number of `all_modules` entries named by a set of parameter names (highest index + 1).
fn module_count<'a>(names: impl Iterator<Item = &'a String>) -> usize {
    names
        .filter_map(|k| {
            k.strip_prefix("all_modules.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// Load a network onto a backend.
pub fn load_network<B: Backend>(
    backend: &B,
    path: &Path,
    config_override: Option<NetConfig>,
) -> Result<(Ncsnpp<B>, Vec<String>)> {
    let lw = load_weights(path, config_override)?;
    let net = Ncsnpp::from_weights(backend, lw.config, &lw.weights, &path.display().to_string())?;
    Ok((net, lw.notes))
}

/// Write inference weights with their config in the metadata (atomic write).
pub fn save_weights(
    path: &Path,
    config: &NetConfig,
    weights: &BTreeMap<String, HostTensor>,
    storage: StorageType,
) -> Result<()> {
    let mut metadata = BTreeMap::new();
    metadata.insert(CONFIG_KEY.to_string(), config.model_json());
    metadata.insert(DATA_KEY.to_string(), config.data_json());
    let wf = WeightFile {
        tensors: weights.clone(),
        metadata,
    };
    save_safetensors(path, &wf, storage)
}
