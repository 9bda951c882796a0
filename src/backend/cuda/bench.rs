//! Per-kernel timings on the device: the model's heaviest layer shapes, each precision, median of
//! CUDA-event timings after a warm-up, with the achieved arithmetic rate (GEMM-like ops) or
//! memory bandwidth (memory-bound ops) so each can be set against the card's ceilings.
use super::{Cuda, Precision};
use crate::backend::{Backend, Fir, UpFirDn};
use crate::error::Result;
use crate::tensor::Tensor;

/// One timed op.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub op: String,
    pub shape: String,
    pub precision: Precision,
    /// Median milliseconds per call.
    pub ms: f64,
    /// TFLOP/s for GEMM-like ops, GB/s (bytes read once + written once) for memory-bound ones.
    pub rate: f64,
    pub unit: &'static str,
}

impl std::fmt::Display for BenchRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<14} {:<34} {:<5} {:>9.4} ms {:>9.2} {}",
            self.op,
            self.shape,
            self.precision.as_str(),
            self.ms,
            self.rate,
            self.unit
        )
    }
}

const WARMUP: usize = 3;
const REPS: usize = 20;

fn noise(dev: &Cuda, shape: &[usize], seed: u64) -> Result<Tensor<Cuda>> {
    // Never time on zeros: random data, as in use.
    dev.randn(shape, seed, 0)
}

/// Time the kernels at batch `n` (1 = one image per network evaluation).
pub fn op_bench(cuda: &Cuda, n: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    // (C_in, C_out, H, k, stride, pad): the 128² 3×3 convs dominate the NCSN++ FLOPs.
    let convs = [
        (128, 128, 128, 3, 1, 1),
        (256, 256, 16, 3, 1, 1),
        (6, 128, 128, 3, 1, 1),
        (512, 256, 32, 1, 1, 0),
    ];
    for p in Precision::ALL {
        if !cuda.supports(p) {
            continue;
        }
        let dev = cuda.with_precision(p);
        for &(c, o, h, k, s, pad) in &convs {
            let x = noise(&dev, &[n, c, h, h], 1)?;
            let w = dev.affine(&noise(&dev, &[o, c, k, k], 2)?, 0.05, 0.0)?;
            let b = noise(&dev, &[o], 3)?;
            let ms = dev.time_ms(WARMUP, REPS, || dev.conv2d(&x, &w, Some(&b), s, pad).map(drop))?;
            let oh = (h + 2 * pad - k) / s + 1;
            let flop = 2.0 * (n * o * oh * oh * c * k * k) as f64;
            rows.push(BenchRow {
                op: "conv2d".into(),
                shape: format!("{c}->{o} {h}x{h} k{k}"),
                precision: p,
                ms,
                rate: flop / ms / 1e9,
                unit: "TFLOP/s",
            });
        }
        let x = noise(&dev, &[n, 256, 16, 16], 4)?;
        let w = dev.affine(&noise(&dev, &[256, 256], 5)?, 0.06, 0.0)?;
        let b = noise(&dev, &[256], 6)?;
        let ms = dev.time_ms(WARMUP, REPS, || dev.nin(&x, &w, &b).map(drop))?;
        let flop = 2.0 * (n * 256 * 256 * 256) as f64;
        rows.push(BenchRow {
            op: "nin".into(),
            shape: "256->256 16x16".into(),
            precision: p,
            ms,
            rate: flop / ms / 1e9,
            unit: "TFLOP/s",
        });
    }

    let dev = cuda.with_precision(Precision::F32);
    let gb = |elems: usize, ms: f64| (elems * 4) as f64 / ms / 1e6;
    let mut mem_row = |op: &str, shape: String, ms: f64, bytes_elems: usize| {
        rows.push(BenchRow {
            op: op.into(),
            shape,
            precision: Precision::F32,
            ms,
            rate: gb(bytes_elems, ms),
            unit: "GB/s",
        })
    };
    let x = noise(&dev, &[n, 128, 128, 128], 7)?;
    let y = noise(&dev, &[n, 128, 128, 128], 8)?;
    let numel = x.numel();
    let ms = dev.time_ms(WARMUP, REPS, || dev.add(&x, &y).map(drop))?;
    mem_row("add", "128x128x128".into(), ms, 3 * numel);
    let gamma = noise(&dev, &[128], 9)?;
    let beta = noise(&dev, &[128], 10)?;
    let ms = dev.time_ms(WARMUP, REPS, || {
        dev.group_norm(&x, &gamma, &beta, 32, 1e-6, true).map(drop)
    })?;
    mem_row("group_norm", "128x128x128 g32 +silu".into(), ms, 2 * numel);
    let fir = Fir::separable(&[1.0, 3.0, 3.0, 1.0], 1.0);
    let g = UpFirDn {
        up: 1,
        down: 2,
        pad0: 1,
        pad1: 1,
    };
    let ms = dev.time_ms(WARMUP, REPS, || dev.upfirdn2d(&x, &fir, g).map(drop))?;
    mem_row("upfirdn2d", "128x128x128 down2".into(), ms, numel + numel / 4);
    let ms = dev.time_ms(WARMUP, REPS, || dev.sum_squares_per_sample(&x).map(drop))?;
    mem_row("sum_squares", "128x128x128".into(), ms, numel);

    let q = noise(&dev, &[n, 256, 16, 16], 11)?;
    let k = noise(&dev, &[n, 256, 16, 16], 12)?;
    let v = noise(&dev, &[n, 256, 16, 16], 13)?;
    let ms = dev.time_ms(WARMUP, REPS, || dev.attention(&q, &k, &v).map(drop))?;
    rows.push(BenchRow {
        op: "attention".into(),
        shape: "C256 L256".into(),
        precision: Precision::F32,
        ms,
        rate: 4.0 * (n * 256 * 256 * 256) as f64 / ms / 1e9,
        unit: "TFLOP/s",
    });
    Ok(rows)
}

/// Header line matching `BenchRow`'s Display.
pub fn header() -> String {
    format!(
        "{:<14} {:<34} {:<5} {:>12} {:>9}",
        "op", "shape", "prec", "median", "rate"
    )
}
