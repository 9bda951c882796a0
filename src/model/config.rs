//! Model configuration: the fields of score_sde's `config.model` / `config.data` that shape the
//! network, plus which SDE it was trained for. Stored as JSON in a weights file's metadata
//! (`config` = model fields as the original names them, `data` = data fields).
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which SDE the network was trained with; decides the time conditioning and score scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdeKind {
    #[serde(alias = "vesde")]
    Ve,
    #[serde(alias = "vpsde")]
    Vp,
    #[serde(alias = "subvpsde")]
    Subvp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingType {
    Fourier,
    Positional,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressiveInput {
    None,
    InputSkip,
    Residual,
}

/// How the network's output becomes the score.
///
/// - `paper`: as the original (VE: the network outputs σ·score and `scale_by_sigma` divides it by
///   σ; VP/subVP: it predicts the noise).
/// - `guide_residual`: a preconditioned denoiser of the residual from the guide (Karras et al. 2022,
///   "EDM", applied to x − y as SRDiff/ResShift do for SR). With σ the VE noise level and σ_d the RMS
///   of x₀ − y over the training faces,
///   D(x; σ, y) = y + c_skip·(x − y) + c_out·F(c_in·(x − y), 2y − 1; σ),
///   c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), score = (D − x)/σ².
///   F is the NCSN++ body without `scale_by_sigma`; the sampler's prior is centred on the guide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Parameterization {
    #[default]
    Paper,
    GuideResidual {
        /// RMS of x₀ − y (data space [0,1]) over the training faces, measured once.
        sigma_data: f64,
    },
}

impl Parameterization {
    /// σ_d of the guide-residual form; None for the paper's.
    pub fn sigma_data(&self) -> Option<f64> {
        match self {
            Parameterization::Paper => None,
            Parameterization::GuideResidual { sigma_data } => Some(*sigma_data),
        }
    }
    fn is_paper(&self) -> bool {
        *self == Parameterization::Paper
    }
}

/// The EDM coefficients of the guide-residual form at noise level σ (see [`Parameterization`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrecondCoefs {
    pub c_skip: f64,
    pub c_out: f64,
    pub c_in: f64,
}

impl PrecondCoefs {
    pub fn new(sigma: f64, sigma_data: f64) -> PrecondCoefs {
        let (s2, d2) = (sigma * sigma, sigma_data * sigma_data);
        let r = (s2 + d2).sqrt();
        PrecondCoefs {
            c_skip: d2 / (s2 + d2),
            c_out: sigma * sigma_data / r,
            c_in: 1.0 / r,
        }
    }
}

/// The network and SDE configuration (field names as in score_sde's `config.model`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// SDE the weights belong to. Absent in the original configs: inferred from the embedding
    /// (Fourier ⇒ VE, positional ⇒ VP) when missing.
    #[serde(default)]
    pub sde: Option<SdeKind>,
    pub nf: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub dropout: f64,
    pub embedding_type: EmbeddingType,
    #[serde(default = "default_fourier_scale")]
    pub fourier_scale: f64,
    pub scale_by_sigma: bool,
    #[serde(default = "default_true")]
    pub skip_rescale: bool,
    #[serde(default = "default_fir_kernel")]
    pub fir_kernel: Vec<f32>,
    pub progressive_input: ProgressiveInput,
    #[serde(default = "default_ema")]
    pub ema_rate: f64,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub num_scales: usize,
    pub beta_min: f64,
    pub beta_max: f64,
    // Fields of the original config that this port supports only with one value; kept so a
    // config round-trips and so an unsupported value is rejected, not silently ignored.
    #[serde(default = "default_ncsnpp")]
    pub name: String,
    #[serde(default = "default_biggan")]
    pub resblock_type: String,
    #[serde(default = "default_none")]
    pub progressive: String,
    #[serde(default = "default_sum")]
    pub progressive_combine: String,
    #[serde(default = "default_true")]
    pub fir: bool,
    #[serde(default = "default_true")]
    pub conditional: bool,
    #[serde(default = "default_gn")]
    pub normalization: String,
    #[serde(default = "default_swish")]
    pub nonlinearity: String,
    #[serde(default = "default_ddpm")]
    pub attention_type: String,
    #[serde(default = "default_conv_size")]
    pub conv_size: usize,
    /// How the output becomes the score (absent in the original configs: the paper's).
    #[serde(default, skip_serializing_if = "Parameterization::is_paper")]
    pub parameterization: Parameterization,
}

/// `config.data` fields the network depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    pub image_size: usize,
    /// Input channels of the network (6: x and the LR guide interleaved).
    pub num_channels: usize,
    /// Data in [−1,1] (VP/subVP) rather than [0,1] (VE, which maps to [−1,1] inside the net).
    pub centered: bool,
}

fn default_fourier_scale() -> f64 {
    16.0
}
fn default_true() -> bool {
    true
}
fn default_fir_kernel() -> Vec<f32> {
    vec![1.0, 3.0, 3.0, 1.0]
}
fn default_ema() -> f64 {
    0.999
}
fn default_ncsnpp() -> String {
    "ncsnpp".into()
}
fn default_biggan() -> String {
    "biggan".into()
}
fn default_none() -> String {
    "none".into()
}
fn default_sum() -> String {
    "sum".into()
}
fn default_gn() -> String {
    "GroupNorm".into()
}
fn default_swish() -> String {
    "swish".into()
}
fn default_ddpm() -> String {
    "ddpm".into()
}
fn default_conv_size() -> usize {
    3
}

/// A full description of a network: model fields plus data fields.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
}

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &[
    "ve-paper",
    "vp-paper",
    "subvp-paper",
    "ve-small",
    "ve-tiny",
    "vp-tiny",
    "ve-res",
    "ve-res-tiny",
];

/// σ_d the guide-residual presets start with before a run measures it on its training faces
/// (the RMS of x₀ − y over the shared faces128 set is ≈ 0.09 in [0,1]).
pub const DEFAULT_SIGMA_DATA: f64 = 0.09;

impl NetConfig {
    /// The SDE, explicit or inferred from the embedding type.
    pub fn sde(&self) -> SdeKind {
        self.model.sde.unwrap_or(match self.model.embedding_type {
            EmbeddingType::Fourier => SdeKind::Ve,
            EmbeddingType::Positional => SdeKind::Vp,
        })
    }

    /// A built-in preset: the paper's three configs and reduced ones for CPU work and tests.
    pub fn preset(name: &str) -> Result<NetConfig> {
        let ve = |nf: usize| NetConfig {
            model: ModelConfig {
                sde: Some(SdeKind::Ve),
                nf,
                ch_mult: vec![1, 1, 2, 2, 2, 2, 2],
                num_res_blocks: 2,
                attn_resolutions: vec![16],
                dropout: 0.0,
                embedding_type: EmbeddingType::Fourier,
                fourier_scale: 16.0,
                scale_by_sigma: true,
                skip_rescale: true,
                fir_kernel: default_fir_kernel(),
                progressive_input: ProgressiveInput::InputSkip,
                ema_rate: 0.999,
                sigma_min: 0.01,
                sigma_max: 348.0,
                num_scales: 2000,
                beta_min: 0.1,
                beta_max: 20.0,
                name: default_ncsnpp(),
                resblock_type: default_biggan(),
                progressive: default_none(),
                progressive_combine: default_sum(),
                fir: true,
                conditional: true,
                normalization: default_gn(),
                nonlinearity: default_swish(),
                attention_type: default_ddpm(),
                conv_size: 3,
                parameterization: Parameterization::Paper,
            },
            data: DataConfig {
                image_size: 128,
                num_channels: 6,
                centered: false,
            },
        };
        let vp = |sde: SdeKind, nf: usize, blocks: usize, dropout: f64| {
            let mut c = ve(nf);
            c.model.sde = Some(sde);
            c.model.ch_mult = vec![1, 2, 2, 2];
            c.model.num_res_blocks = blocks;
            c.model.dropout = dropout;
            c.model.embedding_type = EmbeddingType::Positional;
            c.model.scale_by_sigma = false;
            c.model.progressive_input = ProgressiveInput::Residual;
            c.model.ema_rate = 0.9999;
            c.model.sigma_max = 50.0;
            c.data.centered = true;
            c
        };
        let residual = |mut c: NetConfig, ch_mult: &[usize], blocks: usize| {
            c.model.ch_mult = ch_mult.to_vec();
            c.model.num_res_blocks = blocks;
            c.model.scale_by_sigma = false;
            c.model.sigma_max = 10.0;
            c.model.parameterization = Parameterization::GuideResidual {
                sigma_data: DEFAULT_SIGMA_DATA,
            };
            c
        };
        Ok(match name {
            "ve-paper" => ve(128),
            "ve-small" => ve(64),
            "ve-tiny" => ve(16),
            "vp-paper" => vp(SdeKind::Vp, 128, 8, 0.1),
            "subvp-paper" => vp(SdeKind::Subvp, 128, 8, 0.1),
            "vp-tiny" => vp(SdeKind::Vp, 16, 2, 0.0),
            // The compact guide-residual family of the default model (docs/training.md says
            // how its size was chosen by CPU pilots): four levels down to 16×16 with attention
            // there, widths 16-32-64-64, and a σ range fitted to residuals of RMS σ_d ≈ 0.09
            // instead of whole images.
            "ve-res" => residual(ve(16), &[1, 2, 4, 4], 2),
            "ve-res-tiny" => residual(ve(8), &[1, 2, 2, 2], 1),
            _ => {
                return Err(Error::Config(format!(
                    "unknown model preset `{name}` (choose one of: {})",
                    PRESETS.join(", ")
                )))
            }
        })
    }

    /// Parse from weight-file metadata (`config` and `data` JSON strings).
    pub fn from_json(model_json: &str, data_json: Option<&str>) -> Result<NetConfig> {
        let model: ModelConfig =
            serde_json::from_str(model_json).map_err(|e| Error::Config(format!("model config JSON: {e}")))?;
        let data = match data_json {
            Some(d) => {
                serde_json::from_str(d).map_err(|e| Error::Config(format!("data config JSON: {e}")))?
            }
            None => DataConfig {
                image_size: 128,
                num_channels: 6,
                centered: model.embedding_type == EmbeddingType::Positional,
            },
        };
        let c = NetConfig { model, data };
        c.validate()?;
        Ok(c)
    }

    pub fn model_json(&self) -> String {
        serde_json::to_string(&self.model).expect("config serialises")
    }
    pub fn data_json(&self) -> String {
        serde_json::to_string(&self.data).expect("config serialises")
    }

    /// Reject configurations this port does not implement (rather than computing something else).
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let want = |field: &str, got: &str, ok: &str| -> Result<()> {
            if got != ok {
                return Err(Error::Config(format!(
                    "{field} = `{got}` is not supported (only `{ok}`)"
                )));
            }
            Ok(())
        };
        want("name", &m.name, "ncsnpp")?;
        want("resblock_type", &m.resblock_type, "biggan")?;
        want("progressive", &m.progressive, "none")?;
        want("progressive_combine", &m.progressive_combine, "sum")?;
        want("normalization", &m.normalization, "GroupNorm")?;
        want("nonlinearity", &m.nonlinearity, "swish")?;
        want("attention_type", &m.attention_type, "ddpm")?;
        if !m.fir || !m.conditional || m.conv_size != 3 {
            return Err(Error::Config(
                "only fir = true, conditional = true, conv_size = 3 are supported".into(),
            ));
        }
        if m.nf < 4 || m.ch_mult.is_empty() || m.num_res_blocks == 0 {
            return Err(Error::Config(
                "nf ≥ 4, a non-empty ch_mult and num_res_blocks ≥ 1 are required".into(),
            ));
        }
        if !self.data.num_channels.is_multiple_of(2) {
            return Err(Error::Config(
                "data.num_channels must be even (x and y interleaved)".into(),
            ));
        }
        if let Some(sd) = m.parameterization.sigma_data() {
            if self.sde() != SdeKind::Ve || m.scale_by_sigma || self.data.centered {
                return Err(Error::Config(
                    "the guide_residual parameterization needs a VE model with scale_by_sigma = false \
                     and data in [0,1] (centered = false)"
                        .into(),
                ));
            }
            if !(sd.is_finite() && sd > 0.0) {
                return Err(Error::Config(format!(
                    "guide_residual sigma_data must be finite and > 0, got {sd}"
                )));
            }
        }
        let levels = m.ch_mult.len() as u32;
        if !self.data.image_size.is_multiple_of(1 << (levels - 1)) {
            return Err(Error::Config(format!(
                "image_size {} is not divisible by 2^{} (ch_mult has {levels} levels)",
                self.data.image_size,
                levels - 1
            )));
        }
        Ok(())
    }
}
