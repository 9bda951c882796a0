//! The paper's LR synthesis: a float32 re-implementation of TensorFlow's
//! `tf.image.resize(..., antialias=True)`, which runs the `ScaleAndTranslate` op with zero translation.
//!
//! How TF resizes (and so how this module does, step for step, in f32):
//! - scale = out / in (f32); each output sample `x` sits at `(x + 0.5) / scale` in input coordinates
//!   (half-pixel centres);
//! - when shrinking, the kernel is widened by 1 / scale (that is the antialiasing); when enlarging it is not;
//! - the input samples a kernel covers form a "span"; their weights are divided by their sum, so samples
//!   near a border, where part of the kernel falls outside the image, still sum to one. Nothing is clamped,
//!   so the bicubic kernel can overshoot [0, 1];
//! - the image is resized along rows (height) first into an intermediate image, then along columns.
//!
//! Bilinear is TF's triangle kernel, bicubic is Keys' cubic with a = −0.5.

/// The sampling kernels the LR synthesis uses (names as in TF's `sampling_kernels.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeKernel {
    /// Tent function of radius 1: `tf.image.resize(method="bilinear")`.
    Triangle,
    /// Keys cubic convolution, a = −0.5, radius 2: `tf.image.resize(method="bicubic")`.
    KeysCubic,
}

impl ResizeKernel {
    fn radius(self) -> f32 {
        match self {
            ResizeKernel::Triangle => 1.0,
            ResizeKernel::KeysCubic => 2.0,
        }
    }

    /// Kernel value at distance `x` (already divided by the kernel's widening), written with the same
    /// f32 operation order as TF so the weights agree bit for bit.
    fn eval(self, x: f32) -> f32 {
        let x = x.abs();
        match self {
            ResizeKernel::Triangle => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            ResizeKernel::KeysCubic => {
                if x >= 2.0 {
                    0.0
                } else if x >= 1.0 {
                    ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
                } else {
                    ((1.5 * x - 2.5) * x) * x + 1.0
                }
            }
        }
    }
}

/// For one axis: which input samples each output sample reads, and with which weights.
/// Output `i` reads inputs `starts[i] ..` with `weights[i * span_size ..][..span_size]`; unused trailing
/// weights are zero (as in TF, where a span near the border may be shorter than `span_size`).
struct Spans {
    span_size: usize,
    starts: Vec<usize>,
    weights: Vec<f32>,
}

impl Spans {
    fn new(kernel: ResizeKernel, out_size: usize, in_size: usize) -> Spans {
        // tf.image.resize computes the scale in f32; the op inverts it in double and stores f32.
        let scale = out_size as f32 / in_size as f32;
        let inv_scale = (1.0f64 / scale as f64) as f32;
        // Zero translation: -inv_scale * 0.
        let inv_translate = -inv_scale * 0.0;
        // Widen the kernel only when shrinking (antialias = true).
        let kernel_scale = inv_scale.max(1.0);
        let radius = kernel.radius() * kernel_scale;
        let span_size = (2 * radius.ceil() as usize + 1).min(in_size);
        let one_over_kernel_scale = 1.0f32 / kernel_scale;

        let mut starts = vec![0usize; out_size];
        let mut weights = vec![0.0f32; span_size * out_size];
        let mut temp = Vec::with_capacity(span_size);
        for (x, start) in starts.iter_mut().enumerate() {
            let sample_f = (x as f32 + 0.5) * inv_scale + inv_translate;
            // Outside the source image: an empty span (all weights zero). Cannot happen without translation,
            // but kept so the arithmetic mirrors TF.
            if sample_f < 0.0 || sample_f > in_size as f32 {
                continue;
            }
            let last = in_size as i64 - 1;
            let span_start = ((sample_f - radius - 0.5).ceil() as i64).clamp(0, last);
            let span_end = ((sample_f + radius - 0.5).floor() as i64).clamp(0, last) + 1;
            temp.clear();
            let mut total = 0.0f32;
            for source in span_start..span_end {
                let pos = source as f32 + 0.5 - sample_f;
                let w = kernel.eval((pos * one_over_kernel_scale).abs());
                total += w;
                temp.push(w);
            }
            // TF leaves the span at zero when the weights (nearly) cancel.
            if total.abs() >= 1000.0 * f32::MIN_POSITIVE {
                let inv_total = 1.0f32 / total;
                let row = &mut weights[x * span_size..][..temp.len()];
                for (dst, &w) in row.iter_mut().zip(&temp) {
                    *dst = w * inv_total;
                }
            }
            *start = span_start as usize;
        }
        Spans {
            span_size,
            starts,
            weights,
        }
    }

    /// Weights output `i` applies, starting at input `starts[i]`; TF runs over the full span size as far
    /// as the input extends (trailing zero weights included).
    fn span(&self, i: usize, in_size: usize) -> (usize, &[f32]) {
        let start = self.starts[i];
        let len = (start + self.span_size).min(in_size) - start;
        (start, &self.weights[i * self.span_size..][..len])
    }
}

/// Resizes an HWC f32 image to `out_h × out_w` exactly like `tf.image.resize(img, (out_h, out_w),
/// method, antialias=True)` (bilinear → [`ResizeKernel::Triangle`], bicubic → [`ResizeKernel::KeysCubic`]).
///
/// `img.len()` must equal `h * w * c`; that is the caller's contract (images are validated where they are
/// read), so a mismatch panics.
pub fn resize_antialias(
    img: &[f32],
    h: usize,
    w: usize,
    c: usize,
    out_h: usize,
    out_w: usize,
    kernel: ResizeKernel,
) -> Vec<f32> {
    assert_eq!(
        img.len(),
        h * w * c,
        "resize_antialias: image holds {} values, not {h}×{w}×{c}",
        img.len()
    );
    if h == 0 || w == 0 || c == 0 {
        return vec![0.0; out_h * out_w * c];
    }
    let row_spans = Spans::new(kernel, out_h, h);
    let col_spans = Spans::new(kernel, out_w, w);

    // Rows first: each output row is a weighted sum of whole input rows.
    let row_len = w * c;
    let mut inter = vec![0.0f32; out_h * row_len];
    for (y, out_row) in inter.chunks_exact_mut(row_len).enumerate() {
        let (start, ws) = row_spans.span(y, h);
        for (k, &wt) in ws.iter().enumerate() {
            let in_row = &img[(start + k) * row_len..][..row_len];
            for (o, &v) in out_row.iter_mut().zip(in_row) {
                *o += wt * v;
            }
        }
    }

    // Then columns, within each intermediate row.
    let mut out = vec![0.0f32; out_h * out_w * c];
    for (in_row, out_row) in inter.chunks_exact(row_len).zip(out.chunks_exact_mut(out_w * c)) {
        for (x, out_pix) in out_row.chunks_exact_mut(c).enumerate() {
            let (start, ws) = col_spans.span(x, w);
            for (k, &wt) in ws.iter().enumerate() {
                let in_pix = &in_row[(start + k) * c..][..c];
                for (o, &v) in out_pix.iter_mut().zip(in_pix) {
                    *o += wt * v;
                }
            }
        }
    }
    out
}

/// [`resize_antialias`] for a CHW image. Channels are independent and every output value is summed in
/// the same order, so this equals the HWC version bit for bit.
pub fn resize_antialias_chw(
    img: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    kernel: ResizeKernel,
) -> Vec<f32> {
    assert_eq!(
        img.len(),
        c * h * w,
        "resize_antialias_chw: image holds {} values, not {c}×{h}×{w}",
        img.len()
    );
    if h == 0 || w == 0 {
        return vec![0.0; c * out_h * out_w];
    }
    img.chunks_exact(h * w)
        .flat_map(|plane| resize_antialias(plane, h, w, 1, out_h, out_w, kernel))
        .collect()
}

/// The super-resolution factor of the paper (128 → 16).
pub const SR_FACTOR: usize = 8;

/// The paper's LR synthesis for one HWC image of `h × w` pixels (channels = `len / (h·w)`):
/// `lr = resize(hr, h/8 × w/8, bilinear, antialias)` and the network's guide
/// `y = resize(lr, h × w, bicubic, antialias)`. Returns `(lr, guide)`, both HWC.
pub fn make_lr(hr_hwc: &[f32], h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let c = channels_of(hr_hwc.len(), h, w);
    let (lh, lw) = (h / SR_FACTOR, w / SR_FACTOR);
    let lr = resize_antialias(hr_hwc, h, w, c, lh, lw, ResizeKernel::Triangle);
    let guide = resize_antialias(&lr, lh, lw, c, h, w, ResizeKernel::KeysCubic);
    (lr, guide)
}

/// [`make_lr`] for a CHW image; returns `(lr, guide)`, both CHW.
pub fn make_lr_chw(hr_chw: &[f32], h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let c = channels_of(hr_chw.len(), h, w);
    let (lh, lw) = (h / SR_FACTOR, w / SR_FACTOR);
    let lr = resize_antialias_chw(hr_chw, c, h, w, lh, lw, ResizeKernel::Triangle);
    let guide = upsample_guide_chw(&lr, lh, lw, h, w);
    (lr, guide)
}

/// The guide the network sees for an LR image that is already given (CHW): bicubic antialiased resize to
/// `out_h × out_w`.
pub fn upsample_guide_chw(lr_chw: &[f32], lh: usize, lw: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let c = channels_of(lr_chw.len(), lh, lw);
    resize_antialias_chw(lr_chw, c, lh, lw, out_h, out_w, ResizeKernel::KeysCubic)
}

fn channels_of(len: usize, h: usize, w: usize) -> usize {
    assert!(
        h * w > 0 && len.is_multiple_of(h * w),
        "image of {len} values is not {h}×{w}×C"
    );
    len / (h * w)
}

/// What [`write_lr_faces`] did: the written paths, and each failed input with its error.
pub type LrFaces = (Vec<std::path::PathBuf>, Vec<(std::path::PathBuf, String)>);

/// `srsde-fast degrade`: writes the paper's 16×16 LR face of every HR face in `inputs` (files or
/// folders) as `{stem}_lr16.png` in `out_dir`. HR faces larger than 128×128 are first resized to
/// 128×128 (antialiased bilinear), exactly as `eval` prepares them. A file that cannot be read is
/// reported and skipped; the others are still written. Returns the written paths and the failures.
pub fn write_lr_faces(
    inputs: &[std::path::PathBuf],
    out_dir: &std::path::Path,
    force: bool,
) -> crate::error::Result<LrFaces> {
    use crate::io::image::{collect_images, encode_png, load_hr_face, write_file};
    let files = collect_images(inputs)?;
    if files.is_empty() {
        return Err(crate::error::Error::Config(
            "no images (png, jpg, jpeg, webp, bmp) found in the inputs".to_string(),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| crate::error::Error::io(out_dir, e))?;
    let (mut written, mut failed) = (Vec::new(), Vec::new());
    for path in files {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = out_dir.join(format!("{stem}_lr16.png"));
        let result = load_hr_face(&path, crate::io::LR_SIZE * SR_FACTOR, crate::io::CropMode::Reject)
            .and_then(|face| {
                let (lr, _) = make_lr_chw(&face.pixels, face.size, face.size);
                let (lh, lw) = (face.size / SR_FACTOR, face.size / SR_FACTOR);
                write_file(&target, &encode_png(&lr, 3, lh, lw, face.gray)?, force)
            });
        match result {
            Ok(()) => written.push(target),
            Err(e) => failed.push((path, e.to_string())),
        }
    }
    Ok((written, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalised_and_widened_when_shrinking() {
        let s = Spans::new(ResizeKernel::Triangle, 16, 128);
        // Triangle of radius 8 → 2·8+1 taps.
        assert_eq!(s.span_size, 17);
        for i in 0..16 {
            let (_, ws) = s.span(i, 128);
            let sum: f32 = ws.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "output {i}: weights sum to {sum}");
        }
        // Interior sample 8 sits at input 68.0 (centre between 67 and 68 in index terms).
        assert_eq!(s.starts[8], 60);
    }

    #[test]
    fn upsampling_interpolates_constants_exactly_and_cubic_overshoots() {
        let flat = vec![0.25f32; 4 * 4];
        let up = resize_antialias(&flat, 4, 4, 1, 32, 32, ResizeKernel::KeysCubic);
        assert!(up.iter().all(|&v| (v - 0.25).abs() < 1e-6));
        // A step edge overshoots with Keys cubic (no clamping).
        let step: Vec<f32> = (0..8).map(|i| if i < 4 { 0.0 } else { 1.0 }).collect();
        let up = resize_antialias(&step, 1, 8, 1, 1, 64, ResizeKernel::KeysCubic);
        assert!(up.iter().any(|&v| v > 1.0) && up.iter().any(|&v| v < 0.0));
    }

    #[test]
    fn chw_equals_hwc() {
        let (h, w, c) = (24, 20, 3);
        let hwc: Vec<f32> = (0..h * w * c).map(|i| ((i * 37 % 101) as f32) / 100.0).collect();
        let mut chw = vec![0.0; h * w * c];
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    chw[k * h * w + y * w + x] = hwc[(y * w + x) * c + k];
                }
            }
        }
        let a = resize_antialias(&hwc, h, w, c, 7, 9, ResizeKernel::Triangle);
        let b = resize_antialias_chw(&chw, c, h, w, 7, 9, ResizeKernel::Triangle);
        for y in 0..7 {
            for x in 0..9 {
                for k in 0..c {
                    assert_eq!(a[(y * 9 + x) * c + k].to_bits(), b[k * 63 + y * 9 + x].to_bits());
                }
            }
        }
    }
}
