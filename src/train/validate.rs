//! Validation during training: a fixed held-out batch whose DSM loss is logged as `val_loss`, and
//! a sample grid (LR | SR | HR per row) drawn with the EMA weights.
//!
//! Everything random here is fixed for the whole run and independent of the run seed (times, noise,
//! sampler streams), so successive `val_loss` values and grids differ only through the weights.
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::ScoreModel;
use crate::sample::{pc_sample_with_noise, NoiseStream, SamplerConfig};
use crate::train::data::load_sample;

/// Most held-out faces in the validation loss batch.
pub const VAL_BATCH: usize = 8;
/// Most faces (rows) of a sample grid.
pub const GRID_FACES: usize = 4;
/// Seed of the validation noise z and of the grid sampler's per-image streams.
const VAL_SEED: u64 = 0x5eed_7a11_da7a;

/// The fixed validation faces, decoded once: HR and guide CHW in [0,1], no flips.
pub struct ValSet {
    pub files: Vec<PathBuf>,
    pub size: usize,
    pub hr: Vec<Vec<f32>>,
    pub guide: Vec<Vec<f32>>,
}

fn to_model_space(v: &[f32], centered: bool) -> Vec<f32> {
    v.iter()
        .map(|&x| if centered { 2.0 * x - 1.0 } else { x })
        .collect()
}

impl ValSet {
    /// Decode the first [`VAL_BATCH`] readable files of `files` at `size`; None when none is readable.
    pub fn load(files: &[PathBuf], size: usize) -> Option<ValSet> {
        let mut set = ValSet {
            files: Vec::new(),
            size,
            hr: Vec::new(),
            guide: Vec::new(),
        };
        for f in files {
            if set.files.len() == VAL_BATCH {
                break;
            }
            if let Ok(s) = load_sample(f, size, false) {
                set.files.push(f.clone());
                set.hr.push(s.hr);
                set.guide.push(s.guide);
            }
        }
        (!set.files.is_empty()).then_some(set)
    }

    /// The first `n` faces as one [n,3,s,s] tensor in the model's data space.
    fn tensor<B: Backend>(
        &self,
        be: &B,
        imgs: &[Vec<f32>],
        n: usize,
        centered: bool,
    ) -> Result<crate::tensor::Tensor<B>> {
        let flat: Vec<f32> = imgs[..n].iter().flatten().copied().collect();
        be.from_f32(&[n, 3, self.size, self.size], &to_model_space(&flat, centered))
    }

    /// The DSM loss of the whole set in eval mode (no dropout) at fixed, evenly spread times
    /// t_i ∈ (eps, 1] and fixed noise.
    pub fn loss<B: Backend>(&self, model: &ScoreModel<B>, t_eps: f64) -> Result<f64> {
        let be = model.net.backend();
        let n = self.files.len();
        let centered = model.net.config.data.centered;
        let x0 = self.tensor(be, &self.hr, n, centered)?;
        let y = self.tensor(be, &self.guide, n, centered)?;
        let t: Vec<f64> = (0..n)
            .map(|i| t_eps + (1.0 - t_eps) * (i as f64 + 0.5) / n as f64)
            .collect();
        let z = be.randn(x0.shape(), VAL_SEED, 0)?;
        Ok(crate::train::loss::dsm_loss(model, &x0, &y, &t, &z, 0, false)?.loss)
    }

    /// A grid image (CHW, height rows·size, width 3·size): per row the LR face (nearest-upscaled),
    /// the sample drawn with the model's default sampler shortened to `steps`, and the HR face.
    pub fn grid<B: Backend>(&self, model: &ScoreModel<B>, steps: usize) -> Result<(Vec<f32>, usize, usize)> {
        let be = model.net.backend();
        let n = self.files.len().min(GRID_FACES);
        let s = self.size;
        let centered = model.net.config.data.centered;
        let y = self.tensor(be, &self.guide, n, centered)?;
        let mut cfg = SamplerConfig::default_for(&model.sde);
        cfg.steps = steps;
        let seeds = (0..n as u64).map(|i| VAL_SEED.wrapping_add(i + 1)).collect();
        let x = pc_sample_with_noise(
            be,
            model,
            &model.sde,
            &y,
            &cfg,
            NoiseStream::per_image(seeds),
            &mut |_| Ok(()),
        )?;
        let sr: Vec<f32> = be
            .to_f32(&x)?
            .iter()
            .map(|&v| (if centered { (v + 1.0) / 2.0 } else { v }).clamp(0.0, 1.0))
            .collect();
        let (h, w) = (n * s, 3 * s);
        let mut out = vec![0f32; 3 * h * w];
        let f = crate::io::degrade::SR_FACTOR;
        for r in 0..n {
            let (lr, _) = crate::io::make_lr_chw(&self.hr[r], s, s);
            let ls = s / f;
            let plane = 3 * s * s;
            let panels: [&dyn Fn(usize, usize, usize) -> f32; 3] = [
                &|c, yy, xx| lr[(c * ls + yy / f) * ls + xx / f],
                &|c, yy, xx| sr[r * plane + (c * s + yy) * s + xx],
                &|c, yy, xx| self.hr[r][(c * s + yy) * s + xx],
            ];
            for (p, px) in panels.iter().enumerate() {
                for c in 0..3 {
                    for yy in 0..s {
                        for xx in 0..s {
                            out[(c * h + r * s + yy) * w + p * s + xx] = px(c, yy, xx);
                        }
                    }
                }
            }
        }
        Ok((out, h, w))
    }
}

/// Write a grid as `dir/step_{step:07}.png` atomically. The step makes names unique; should the
/// file exist anyway (steps redone after a resume), the grid goes to `step_{step:07}_{k}.png`
/// instead of replacing it. Returns the path written.
pub fn write_grid(dir: &Path, step: u64, chw: &[f32], h: usize, w: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let bytes = crate::io::encode_png(chw, 3, h, w, false)?;
    let mut path = dir.join(format!("step_{step:07}.png"));
    let mut k = 1;
    while path.symlink_metadata().is_ok() {
        path = dir.join(format!("step_{step:07}_{k}.png"));
        k += 1;
    }
    crate::io::write_file(&path, &bytes, false)?;
    Ok(path)
}
