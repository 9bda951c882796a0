//! srsde-fast: score-based SDE face super-resolution (dos Santos et al., 2022) with its own engine.
//!
//! Layers, each depending only on those above it: [`tensor`] ← [`backend`] ← [`autograd`] ← [`nn`]
//! ← [`model`] ← [`sde`]/[`sample`]/[`train`]/[`eval`]; [`io`] handles files and the LR synthesis.
pub mod autograd;
pub mod backend;
pub mod bench;
pub mod check;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod nn;
pub mod provenance;
pub mod rng;
pub mod sample;
pub mod sde;
pub mod tensor;
pub mod train;
pub mod uncertainty;
pub mod upscale;

pub use error::{Error, Result};
