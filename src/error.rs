//! The library's typed error. The CLI wraps it with anyhow context; the library never panics on bad
//! input, missing files or a missing GPU.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Two tensors (or a tensor and an op) disagree about shapes.
    #[error("shape mismatch in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A weights file lacks a tensor, holds one of the wrong shape, or disagrees with the config.
    #[error("weights {file}: tensor `{tensor}`: {msg}")]
    Weights {
        file: String,
        tensor: String,
        msg: String,
    },
    /// A file could not be parsed (checkpoint, safetensors, image, config).
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The requested device/backend cannot run (no GPU, no driver, built without kernels).
    #[error("backend: {0}")]
    Backend(String),
    /// A configuration value is invalid or unsupported.
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    pub fn format(file: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format {
            file: file.into(),
            msg: msg.into(),
        }
    }
}
