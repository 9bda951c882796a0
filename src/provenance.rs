//! What every PNG that `srsde-fast upscale` writes says about itself: a super-resolved face is a
//! hypothesis, not evidence, so each output carries how it was made (input and its SHA-256, the
//! model's identity, sampler, seeds, backend and precision, crate version), how sure it is (its LR
//! consistency and, with `--samples`, the spread of the hypotheses) and the command line that
//! reproduces it.
//!
//! The record is JSON, stored in an uncompressed iTXt chunk with the keyword [`PNG_KEY`] inside
//! the PNG, and written beside it as the face's sidecar `{stem}_sr.json`. `srsde-fast info
//! out_sr.png` prints it ([`describe`]).
//!
//! Reproducibility: the record holds nothing that changes from run to run — no clock time, no
//! durations, no output folder — and the PNG encoding is fixed, so running the recorded
//! [`Provenance::reproduce`] command again on the same backend writes a byte-identical file.
//! Timings go to the `--json` lines and the log only.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Keyword of the PNG text chunk holding the record.
pub const PNG_KEY: &str = "srsde-fast";
/// Value of the record's `format` field.
pub const FORMAT: &str = "srsde-fast/provenance/1";
/// Placeholder for the output folder in the reproduction command.
pub const OUTDIR: &str = "OUTDIR";
/// The caution every record carries.
pub const CAUTION: &str = "A super-resolved face is a hypothesis consistent with the 16x16 input, \
                           not evidence of the person's appearance: details beyond the input are \
                           invented by the model.";

/// The provenance record of one output file (or, as the sidecar, of one face).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// [`FORMAT`].
    pub format: String,
    /// "srsde-fast 0.1.0": the crate and its version.
    pub software: String,
    /// [`CAUTION`].
    pub caution: String,
    /// What this file is.
    pub output: OutputInfo,
    pub input: InputInfo,
    pub model: ModelInfo,
    pub sampler: SamplerInfo,
    pub noise: NoiseInfo,
    pub device: DeviceInfo,
    /// Every hypothesis of the face: its noise seed and LR consistency.
    pub hypotheses: Vec<HypothesisInfo>,
    /// The spread of the hypotheses (with `--samples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<UncertaintyInfo>,
    /// The command line that writes this file again ([`OUTDIR`] stands for any output folder).
    pub reproduce: String,
    /// The sidecar only: the files written for the face.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// What the file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputInfo {
    /// "sr" (one hypothesis), "mean", "std" (heat map), "strip", "lr" (the bicubic guide) or, in
    /// the sidecar, "face".
    pub role: String,
    /// The hypothesis (role "sr").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypothesis: Option<usize>,
    /// LR consistency of this picture (roles "sr" and "mean"): MSE on the 0–255 scale between it
    /// shrunk to 16×16 with the paper's degradation (antialiased bilinear) and the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<f64>,
}

/// The input face.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputInfo {
    /// The file as an absolute path.
    pub file: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// Set when the file decodes only in part and `--accept-truncated` took it: what is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<String>,
    /// What was done to it on the way in (resize, crop, alpha dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The model's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// An absolute path (`--model`, `$SRSDE_MODEL`, the user folder), or "embedded".
    pub source: String,
    /// SHA-256 of [`Self::hashed`].
    pub sha256: String,
    /// What was hashed: "file" (safetensors, .pth), "index" (a sharded export's index, which holds
    /// every shard's SHA-256, checked on load) or "embedded index".
    pub hashed: String,
    /// SDE, form, width, depth and parameter count.
    pub summary: String,
}

/// The sampler, with every value that decides its result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplerInfo {
    pub name: String,
    /// One line of what it does.
    pub description: String,
    /// PC samplers: time steps; fast samplers: network evaluations.
    pub steps: usize,
    /// Network evaluations per hypothesis.
    pub nfe: usize,
    /// The Langevin corrector's snr and norm (samplers with a corrector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub langevin_norm: Option<String>,
    /// Fast samplers: churn and Karras ρ (a string, as `inf` is not a JSON number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<String>,
}

/// Where the noise came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseInfo {
    /// The run's `--seed`.
    pub seed: u64,
    /// The face's position in the noise numbering (`--first-index` + its place in the inputs).
    pub index: usize,
    /// Hypotheses per face (K).
    pub samples: usize,
    /// Whether `--samples` was given (the mean, std and strip files are written).
    pub uncertainty_maps: bool,
    /// `--batch`, recorded only when the result depends on it (`--langevin-norm batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
}

/// The backend and the options that shape the files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub backend: String,
    /// The device's own name ("cpu (2 threads)", "cuda: NVIDIA H100 (f32)").
    pub name: String,
    /// Arithmetic of the matrix products: f32, tf32 or bf16.
    pub precision: String,
    /// CUDA only: whether PC sampling replayed CUDA graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graph: Option<bool>,
    /// `--crop` ("none" or "center").
    pub crop: String,
    /// `--accept-truncated`.
    pub accept_truncated: bool,
    /// `--std-scale`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std_scale: Option<f64>,
    /// `--save-lr` (the face's files then include the guide).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub save_lr: bool,
}

/// One hypothesis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HypothesisInfo {
    pub k: usize,
    /// Its noise stream's seed: `item_seed(seed, index, k)`.
    pub item_seed: u64,
    /// Its LR consistency (see [`OutputInfo::consistency`]).
    pub consistency: f64,
}

/// The spread of the K hypotheses of a face.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UncertaintyInfo {
    /// The std value (intensity levels, 0–255) at the top of the std heat map's colour scale.
    pub std_scale: f64,
    /// Mean and largest per-pixel std over the image (levels): per pixel, the root mean square over
    /// the colour channels of the population std over the K hypotheses.
    pub mean_std: f64,
    pub max_std: f64,
    /// The colour map of the std picture (0 at the bottom, `std_scale` at the top).
    pub colormap: String,
    /// Hypotheses shown in the strip (the first ones).
    pub strip_hypotheses: usize,
}

impl Provenance {
    /// The record as the compact JSON stored in the PNG.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Other(format!("provenance JSON: {e}")))
    }

    /// Reads the record of a PNG file: None when it carries none.
    pub fn from_png(bytes: &[u8], file: &str) -> Result<Option<Provenance>> {
        let Some(text) = crate::io::read_png_text(bytes, PNG_KEY, file)? else {
            return Ok(None);
        };
        let p: Provenance = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                file,
                format!("`{PNG_KEY}` text chunk is not a provenance record: {e}"),
            )
        })?;
        if p.format != FORMAT {
            return Err(Error::format(
                file,
                format!("provenance format `{}` is not `{FORMAT}`", p.format),
            ));
        }
        Ok(Some(p))
    }

    /// The `srsde-fast upscale` command line that writes this face's files again, into
    /// [`OUTDIR`]: every value that decides the result is explicit (sampler, steps, its
    /// parameters, seed, noise index, device and precision), so defaults that change between
    /// versions or backends do not matter.
    pub fn reproduce_command(&self) -> String {
        let mut a: Vec<String> = vec!["srsde-fast".into()];
        if self.device.cuda_graph == Some(false) {
            a.extend(["--cuda-graph".into(), "off".into()]);
        }
        a.extend([
            "upscale".into(),
            shell_quote(&self.input.file),
            "-o".into(),
            OUTDIR.into(),
            "--device".into(),
            self.device.backend.clone(),
        ]);
        // The CPU's default is f32; bf16 (AMX tiles) has to be asked for again.
        if self.device.backend == "cuda" || self.device.precision != "f32" {
            a.extend(["--precision".into(), self.device.precision.clone()]);
        }
        if self.model.source != "embedded" {
            a.extend(["--model".into(), shell_quote(&self.model.source)]);
        }
        let s = &self.sampler;
        a.extend([
            "--sampler".into(),
            s.name.clone(),
            "--steps".into(),
            s.steps.to_string(),
        ]);
        if let Some(snr) = s.snr {
            a.extend(["--snr".into(), snr.to_string()]);
        }
        if let Some(norm) = &s.langevin_norm {
            a.extend(["--langevin-norm".into(), norm.clone()]);
        }
        if let Some(churn) = s.churn {
            a.extend(["--churn".into(), churn.to_string()]);
        }
        if let Some(rho) = &s.rho {
            a.extend(["--rho".into(), rho.clone()]);
        }
        let n = &self.noise;
        a.extend(["--seed".into(), n.seed.to_string()]);
        if n.index != 0 {
            a.extend(["--first-index".into(), n.index.to_string()]);
        }
        if n.uncertainty_maps || n.samples != 1 {
            a.extend(["--samples".into(), n.samples.to_string()]);
        }
        if let Some(b) = n.batch {
            a.extend(["--batch".into(), b.to_string()]);
        }
        if let Some(scale) = self.device.std_scale {
            a.extend(["--std-scale".into(), scale.to_string()]);
        }
        if self.device.crop != "none" {
            a.extend(["--crop".into(), self.device.crop.clone()]);
        }
        if self.device.accept_truncated {
            a.push("--accept-truncated".into());
        }
        if self.device.save_lr {
            a.push("--save-lr".into());
        }
        a.join(" ")
    }
}

/// `s` as one POSIX shell word: unchanged when it holds only safe characters, else single-quoted.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What `srsde-fast info` prints for a PNG carrying provenance: what the file is, how it was made,
/// how sure it is, whether the input still matches its recorded SHA-256, and the command that
/// reproduces it.
pub fn describe(file: &str, p: &Provenance) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("  {k:<13}{v}\n"));
    let what = match (p.output.role.as_str(), p.output.hypothesis) {
        ("sr", Some(k)) if p.noise.samples > 1 => {
            format!("super-resolved face, hypothesis {k} of {}", p.noise.samples)
        }
        ("sr", _) => "super-resolved face".to_string(),
        ("mean", _) => format!("per-pixel mean of {} hypotheses", p.noise.samples),
        ("std", _) => format!(
            "per-pixel standard deviation of {} hypotheses (heat map)",
            p.noise.samples
        ),
        ("strip", _) => "contact strip LR | hypotheses | mean | std".to_string(),
        ("lr", _) => "bicubic upsampling of the input (the network's guide)".to_string(),
        (r, _) => r.to_string(),
    };
    let mut out = format!("{file}: {what}, written by {}\n", p.software);
    out += &format!("  {}\n", p.caution);
    if let Some(c) = p.output.consistency {
        line(
            "consistency:",
            format!("{c:.3} (MSE, 0-255 scale, of this picture shrunk to 16x16 vs the input; 0 = fully consistent)"),
        );
    }
    line("input:", format!("{} (sha256 {})", p.input.file, p.input.sha256));
    line("", input_check(&p.input));
    if let Some(why) = &p.input.partial {
        line(
            "",
            format!("PARTIAL INPUT accepted with --accept-truncated: {why}"),
        );
    }
    for n in &p.input.notes {
        line("", format!("note: {n}"));
    }
    line(
        "model:",
        format!(
            "{} (sha256 of its {}: {})",
            p.model.source, p.model.hashed, p.model.sha256
        ),
    );
    line("", p.model.summary.clone());
    line("sampler:", p.sampler.description.clone());
    line(
        "noise:",
        format!(
            "seed {}, input index {}, {} hypothes{}",
            p.noise.seed,
            p.noise.index,
            p.noise.samples,
            if p.noise.samples == 1 { "is" } else { "es" }
        ),
    );
    for h in &p.hypotheses {
        line(
            "",
            format!(
                "hypothesis {}: item seed {}, consistency {:.3}",
                h.k, h.item_seed, h.consistency
            ),
        );
    }
    line(
        "device:",
        format!("{} ({} arithmetic)", p.device.name, p.device.precision),
    );
    if let Some(u) = &p.uncertainty {
        line(
            "uncertainty:",
            format!(
                "per-pixel std over the {} hypotheses: mean {:.2}, max {:.2} levels of 255; std map \
                 colour scale {} ({} at its top)",
                p.noise.samples, u.mean_std, u.max_std, u.colormap, u.std_scale
            ),
        );
    }
    out += &s;
    out += &format!(
        "reproduce (writes the same bytes into {OUTDIR} on the same backend{}):\n  {}\n",
        if p.noise.batch.is_some() {
            "; --langevin-norm batch also needs the same batch companions"
        } else {
            ""
        },
        p.reproduce
    );
    out
}

/// Whether the recorded input is still there with the same bytes.
fn input_check(input: &InputInfo) -> String {
    match std::fs::read(&input.file) {
        Ok(bytes) => {
            let now = crate::model::sha256::sha256_hex(&bytes);
            if now == input.sha256 {
                "the input file is present and its sha256 matches".to_string()
            } else {
                format!("WARNING: the input file has CHANGED since (sha256 now {now})")
            }
        }
        Err(e) => format!("WARNING: the input file cannot be read now ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Provenance {
        Provenance {
            format: FORMAT.into(),
            software: "srsde-fast 0.1.0".into(),
            caution: CAUTION.into(),
            output: OutputInfo {
                role: "sr".into(),
                hypothesis: Some(1),
                consistency: Some(2.5),
            },
            input: InputInfo {
                file: "/data/my faces/a.png".into(),
                sha256: "00".into(),
                partial: None,
                notes: vec![],
            },
            model: ModelInfo {
                source: "embedded".into(),
                sha256: "ab".into(),
                hashed: "embedded index".into(),
                summary: "ve".into(),
            },
            sampler: SamplerInfo {
                name: "dpm2".into(),
                description: "dpm2".into(),
                steps: 4,
                nfe: 4,
                snr: None,
                langevin_norm: None,
                churn: Some(0.5),
                rho: Some("inf".into()),
            },
            noise: NoiseInfo {
                seed: 7,
                index: 3,
                samples: 2,
                uncertainty_maps: true,
                batch: None,
            },
            device: DeviceInfo {
                backend: "cuda".into(),
                name: "cuda: X (bf16)".into(),
                precision: "bf16".into(),
                cuda_graph: Some(true),
                crop: "center".into(),
                accept_truncated: true,
                std_scale: None,
                save_lr: false,
            },
            hypotheses: vec![],
            uncertainty: None,
            reproduce: String::new(),
            files: vec![],
        }
    }

    #[test]
    fn the_command_names_every_value_that_decides_the_result() {
        let cmd = record().reproduce_command();
        assert_eq!(
            cmd,
            "srsde-fast upscale '/data/my faces/a.png' -o OUTDIR --device cuda --precision bf16 --sampler \
             dpm2 --steps 4 --churn 0.5 --rho inf --seed 7 --first-index 3 --samples 2 --crop center \
             --accept-truncated"
        );
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let mut p = record();
        p.reproduce = p.reproduce_command();
        let back: Provenance = serde_json::from_str(&p.to_json().unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a/b.png"), "a/b.png");
        assert_eq!(shell_quote("it's here"), r"'it'\''s here'");
        assert_eq!(shell_quote(""), "''");
    }
}
