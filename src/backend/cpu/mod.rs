//! CPU reference backend — placeholder being written.
