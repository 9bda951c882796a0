//! The original initialisation of a fresh network (score_sde's `default_init`): every conv, dense
//! and NIN weight is uniform with variance scale/fan_avg (`variance_scaling(scale, 'fan_avg',
//! 'uniform')`, fans of axis 1 = in, axis 0 = out times the receptive field), biases are zero,
//! GroupNorm is (1, 0), the frozen Fourier W is 16·N(0,1).
//!
//! The scale is 1 except where the original passes another: the second conv of every res-block
//! (`Conv_1`), the attention output (`NIN_3`) and the output conv use `init_scale` = 0 (which
//! `default_init` turns into 1e-10, so every block starts close to the identity), and the attention
//! q/k/v NINs use 0.1. [`crate::model::Ncsnpp::random`] is something else: a test init with random
//! biases and no near-zero layers.
use std::collections::BTreeMap;

use crate::model::ncsnpp::param_specs;
use crate::model::NetConfig;
use crate::tensor::HostTensor;
use crate::train::{stream_seed, Stream};

/// `default_init`'s scale for a weight by its name (0 becomes 1e-10, as the original does).
fn init_scale(name: &str, output_conv: &str) -> f64 {
    let zero = 1e-10;
    if name == output_conv || name.ends_with(".Conv_1.weight") || name.ends_with(".NIN_3.W") {
        zero
    } else if name.ends_with(".NIN_0.W") || name.ends_with(".NIN_1.W") || name.ends_with(".NIN_2.W") {
        0.1
    } else {
        1.0
    }
}

/// (fan_in, fan_out) with the original's axes: axis 1 is "in", axis 0 is "out", times the
/// receptive field (product of the remaining dims).
fn fans(shape: &[usize]) -> (f64, f64) {
    let rf: usize = shape[2..].iter().product();
    ((shape[1] * rf) as f64, (shape[0] * rf) as f64)
}

/// Fresh weights for `config` as the original constructor makes them, deterministic in `seed`.
pub fn paper_init(config: &NetConfig, seed: u64) -> BTreeMap<String, HostTensor> {
    let specs = param_specs(config);
    // The output conv is the last module; its weight is the second-to-last parameter.
    let output_conv = specs
        .iter()
        .rev()
        .find(|(n, s, _)| s.len() == 4 && n.ends_with(".weight"))
        .map(|s| s.0.clone())
        .unwrap_or_default();
    let key = stream_seed(seed, Stream::Init, 0);
    let mut offset = 0u64;
    let mut out = BTreeMap::new();
    for (name, shape, trainable) in specs {
        let n: usize = shape.iter().product();
        let mut data = vec![0f32; n];
        if !trainable {
            // GaussianFourierProjection.W = randn(size) · scale.
            crate::rng::fill_normal(&mut data, key, offset);
            let s = config.model.fourier_scale as f32;
            data.iter_mut().for_each(|v| *v *= s);
        } else if shape.len() == 1 {
            // Biases 0; GroupNorm weights 1.
            if name.ends_with(".weight") {
                data.fill(1.0);
            }
        } else {
            let (fan_in, fan_out) = fans(&shape);
            let variance = init_scale(&name, &output_conv) / ((fan_in + fan_out) / 2.0);
            let limit = (3.0 * variance).sqrt();
            for (i, v) in data.iter_mut().enumerate() {
                let u = crate::rng::uniform(key, offset + i as u64) as f64;
                *v = ((2.0 * u - 1.0) * limit) as f32;
            }
        }
        offset += n as u64;
        out.insert(name, HostTensor::new(shape, data));
    }
    out
}
