//! CUDA backend (see issue: CUDA backend for inference). Not built yet.
