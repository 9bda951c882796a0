//! Image-quality metrics of the paper's evaluation: PSNR, SSIM and LR consistency.
//!
//! PSNR and SSIM are computed the way the paper's numbers were, with scikit-image on 8-bit RGB
//! images over the whole frame:
//! - `peak_signal_noise_ratio(hr, sr, data_range=255)`: one MSE over every value of every channel;
//! - `structural_similarity(hr, sr, channel_axis=-1, data_range=255, gaussian_weights=True,
//!   sigma=1.5, use_sample_covariance=False)`: per channel, Gaussian-weighted local statistics
//!   (scipy's `gaussian_filter`, truncate 3.5 → radius ⌊3.5·1.5 + 0.5⌋ = 5, an 11-tap window),
//!   the SSIM map cropped by the window radius on every side, its mean, then the mean over channels.
//!   Because the crop equals the filter radius, the kept pixels never read the padded border, so
//!   the result does not depend on the filter's boundary mode and only the "valid" part of each
//!   filtered map is computed here.
//!
//! Consistency is the paper's LR-consistency: the SR image resized to the LR size with the same
//! antialiased triangle filter that made the LR input, compared with that input by MSE on the
//! 0–255 scale.
use crate::error::{Error, Result};
use crate::io::degrade::{resize_antialias, resize_antialias_chw, ResizeKernel};
use crate::io::image::quantize_u8;

/// An 8-bit image stored HWC (interleaved), the layout image decoders give and scikit-image assumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageU8 {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl ImageU8 {
    /// Wrap HWC bytes; `data.len()` must be `height·width·channels` (all non-zero).
    pub fn new(height: usize, width: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        check_dims("ImageU8::new", height, width, channels, data.len())?;
        Ok(ImageU8 {
            height,
            width,
            channels,
            data,
        })
    }

    /// Quantise an HWC float image in [0,1] the way saved PNGs are (clamp, ×255, round half up).
    pub fn from_hwc_f32(height: usize, width: usize, channels: usize, hwc: &[f32]) -> Result<Self> {
        check_dims("ImageU8::from_hwc_f32", height, width, channels, hwc.len())?;
        Self::new(
            height,
            width,
            channels,
            hwc.iter().map(|&v| quantize_u8(v)).collect(),
        )
    }

    /// Quantise a CHW float image in [0,1] (the engine's layout) into an HWC 8-bit image.
    pub fn from_chw_f32(channels: usize, height: usize, width: usize, chw: &[f32]) -> Result<Self> {
        check_dims("ImageU8::from_chw_f32", height, width, channels, chw.len())?;
        let plane = height * width;
        let mut data = vec![0u8; chw.len()];
        for (p, px) in data.chunks_exact_mut(channels).enumerate() {
            for (k, v) in px.iter_mut().enumerate() {
                *v = quantize_u8(chw[k * plane + p]);
            }
        }
        Self::new(height, width, channels, data)
    }

    fn same_dims(&self, other: &ImageU8, op: &'static str) -> Result<()> {
        if (self.height, self.width, self.channels) != (other.height, other.width, other.channels) {
            return Err(Error::shape(
                op,
                format!(
                    "{}×{}×{} vs {}×{}×{}",
                    self.height, self.width, self.channels, other.height, other.width, other.channels
                ),
            ));
        }
        Ok(())
    }

    /// Channel `k` as a row-major f64 plane.
    fn plane(&self, k: usize) -> Vec<f64> {
        self.data
            .iter()
            .skip(k)
            .step_by(self.channels)
            .map(|&v| v as f64)
            .collect()
    }
}

fn check_dims(op: &'static str, h: usize, w: usize, c: usize, len: usize) -> Result<()> {
    if h == 0 || w == 0 || c == 0 || h.checked_mul(w).and_then(|p| p.checked_mul(c)) != Some(len) {
        return Err(Error::shape(op, format!("{len} values for a {h}×{w}×{c} image")));
    }
    Ok(())
}

/// Mean squared error between two images of the same size, over every value (0–255 scale).
pub fn mse_u8(a: &ImageU8, b: &ImageU8) -> Result<f64> {
    a.same_dims(b, "mse")?;
    let sum: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum();
    Ok(sum / a.data.len() as f64)
}

/// PSNR in dB with peak 255: 10·log10(255² / MSE). Identical images give `f64::INFINITY` (as
/// scikit-image does); callers averaging over a data set should report such images separately.
pub fn psnr(a: &ImageU8, b: &ImageU8) -> Result<f64> {
    let mse = mse_u8(a, b)?;
    if mse == 0.0 {
        return Ok(f64::INFINITY);
    }
    Ok(10.0 * (255.0f64 * 255.0 / mse).log10())
}

/// SSIM parameters; the default is the paper's (Wang et al. 2004): Gaussian σ 1.5 truncated at
/// 3.5σ, K1 0.01, K2 0.03, data range 255, population covariance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SsimParams {
    pub sigma: f64,
    pub truncate: f64,
    pub k1: f64,
    pub k2: f64,
    pub data_range: f64,
}

impl Default for SsimParams {
    fn default() -> Self {
        SsimParams {
            sigma: 1.5,
            truncate: 3.5,
            k1: 0.01,
            k2: 0.03,
            data_range: 255.0,
        }
    }
}

impl SsimParams {
    /// Radius of the window as scipy.ndimage computes it: int(truncate·σ + 0.5).
    pub fn radius(&self) -> usize {
        (self.truncate * self.sigma + 0.5) as usize
    }

    /// scipy's 1-d Gaussian: exp(−x²/(2σ²)) for x in −r..=r, normalised to sum 1.
    fn kernel(&self) -> Vec<f64> {
        let r = self.radius() as i64;
        let s2 = self.sigma * self.sigma;
        let mut k: Vec<f64> = (-r..=r).map(|x| (-0.5 / s2 * (x * x) as f64).exp()).collect();
        let sum: f64 = k.iter().sum();
        k.iter_mut().for_each(|v| *v /= sum);
        k
    }
}

/// Mean SSIM over channels with the paper's parameters (see the module docs).
pub fn ssim(a: &ImageU8, b: &ImageU8) -> Result<f64> {
    ssim_with(a, b, &SsimParams::default())
}

/// Mean SSIM over channels with explicit parameters.
pub fn ssim_with(a: &ImageU8, b: &ImageU8, p: &SsimParams) -> Result<f64> {
    a.same_dims(b, "ssim")?;
    if !(p.sigma > 0.0 && p.truncate >= 0.0 && p.k1 >= 0.0 && p.k2 >= 0.0 && p.data_range > 0.0) {
        return Err(Error::Config(format!("invalid SSIM parameters {p:?}")));
    }
    let win = 2 * p.radius() + 1;
    if a.height < win || a.width < win {
        return Err(Error::shape(
            "ssim",
            format!(
                "{}×{} image is smaller than the {win}×{win} window",
                a.height, a.width
            ),
        ));
    }
    let total: f64 = (0..a.channels)
        .map(|k| ssim_plane(&a.plane(k), &b.plane(k), a.height, a.width, p))
        .sum();
    Ok(total / a.channels as f64)
}

/// SSIM of one channel: the mean of the SSIM map over the pixels at least `radius` from the border.
fn ssim_plane(x: &[f64], y: &[f64], h: usize, w: usize, p: &SsimParams) -> f64 {
    let k = p.kernel();
    let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
    let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
    let xy: Vec<f64> = x.iter().zip(y).map(|(a, b)| a * b).collect();
    let ux = filter_valid(x, h, w, &k);
    let uy = filter_valid(y, h, w, &k);
    let uxx = filter_valid(&xx, h, w, &k);
    let uyy = filter_valid(&yy, h, w, &k);
    let uxy = filter_valid(&xy, h, w, &k);
    let c1 = (p.k1 * p.data_range).powi(2);
    let c2 = (p.k2 * p.data_range).powi(2);
    let mut sum = 0.0;
    for i in 0..ux.len() {
        let (mx, my) = (ux[i], uy[i]);
        let vx = uxx[i] - mx * mx;
        let vy = uyy[i] - my * my;
        let vxy = uxy[i] - mx * my;
        let a1 = 2.0 * mx * my + c1;
        let a2 = 2.0 * vxy + c2;
        let b1 = mx * mx + my * my + c1;
        let b2 = vx + vy + c2;
        sum += a1 * a2 / (b1 * b2);
    }
    sum / ux.len() as f64
}

/// Separable correlation with the symmetric kernel `k`, rows (axis 0) first as scipy does, keeping
/// only outputs whose window lies inside the image: (h−2r)×(w−2r).
fn filter_valid(img: &[f64], h: usize, w: usize, k: &[f64]) -> Vec<f64> {
    let n = k.len();
    let (oh, ow) = (h + 1 - n, w + 1 - n);
    let mut vert = vec![0.0; oh * w];
    for (i, row) in vert.chunks_exact_mut(w).enumerate() {
        for (t, &kt) in k.iter().enumerate() {
            let src = &img[(i + t) * w..][..w];
            for (o, &v) in row.iter_mut().zip(src) {
                *o += kt * v;
            }
        }
    }
    let mut out = vec![0.0; oh * ow];
    for (src, row) in vert.chunks_exact(w).zip(out.chunks_exact_mut(ow)) {
        for (j, o) in row.iter_mut().enumerate() {
            *o = k.iter().zip(&src[j..j + n]).map(|(a, b)| a * b).sum();
        }
    }
    out
}

/// Memory layout of a float image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Interleaved channels (height, width, channels).
    Hwc,
    /// Planar channels (channels, height, width), the engine's layout.
    Chw,
}

/// A borrowed float image in [0,1].
#[derive(Clone, Copy, Debug)]
pub struct FloatImage<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub layout: Layout,
}

impl FloatImage<'_> {
    fn check(&self, op: &'static str) -> Result<()> {
        check_dims(op, self.height, self.width, self.channels, self.data.len())
    }

    /// Resized to `oh × ow` with TF's antialiased filter `kernel`, in the same layout.
    pub fn resized(&self, oh: usize, ow: usize, kernel: ResizeKernel) -> Result<Vec<f32>> {
        self.check("resize")?;
        let (c, h, w) = (self.channels, self.height, self.width);
        Ok(match self.layout {
            Layout::Hwc => resize_antialias(self.data, h, w, c, oh, ow, kernel),
            Layout::Chw => resize_antialias_chw(self.data, c, h, w, oh, ow, kernel),
        })
    }
}

/// LR consistency: MSE on the 0–255 scale between the SR image shrunk to the LR size (antialiased
/// triangle filter, as the LR input was made) and the LR input. Both images share one layout.
pub fn consistency(sr: FloatImage<'_>, lr: FloatImage<'_>) -> Result<f64> {
    sr.check("consistency (sr)")?;
    lr.check("consistency (lr)")?;
    if sr.channels != lr.channels || sr.layout != lr.layout {
        return Err(Error::shape(
            "consistency",
            format!(
                "sr has {} channels ({:?}), lr {} ({:?})",
                sr.channels, sr.layout, lr.channels, lr.layout
            ),
        ));
    }
    let sr_small = sr.resized(lr.height, lr.width, ResizeKernel::Triangle)?;
    let sum: f64 = sr_small
        .iter()
        .zip(lr.data)
        .map(|(&a, &b)| {
            let d = (a as f64 - b as f64) * 255.0;
            d * d
        })
        .sum();
    Ok(sum / lr.data.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(h: usize, w: usize, c: usize, f: impl Fn(usize) -> u8) -> ImageU8 {
        ImageU8::new(h, w, c, (0..h * w * c).map(f).collect()).unwrap()
    }

    #[test]
    fn kernel_is_scipys_11_taps() {
        let p = SsimParams::default();
        assert_eq!(p.radius(), 5);
        let k = p.kernel();
        assert_eq!(k.len(), 11);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        // exp(-25/4.5) relative to the centre tap
        assert!((k[0] / k[5] - (-25.0f64 / 4.5).exp()).abs() < 1e-15);
    }

    #[test]
    fn identical_images() {
        let a = img(16, 20, 3, |i| (i * 37 % 251) as u8);
        assert_eq!(psnr(&a, &a).unwrap(), f64::INFINITY);
        assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_a_constant_offset() {
        let a = img(8, 8, 3, |i| (i % 200) as u8);
        let b = img(8, 8, 3, |i| (i % 200) as u8 + 5);
        let expect = 10.0 * (255.0f64 * 255.0 / 25.0).log10();
        assert!((psnr(&a, &b).unwrap() - expect).abs() < 1e-12);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let a = img(16, 16, 3, |_| 0);
        let b = img(16, 15, 3, |_| 0);
        assert!(psnr(&a, &b).is_err());
        assert!(ssim(&a, &b).is_err());
        let tiny = img(10, 10, 1, |_| 0);
        assert!(ssim(&tiny, &tiny).is_err());
        assert!(ImageU8::new(2, 2, 3, vec![0; 11]).is_err());
        assert!(ImageU8::new(0, 2, 3, vec![]).is_err());
    }

    #[test]
    fn chw_and_hwc_quantise_alike() {
        let (c, h, w) = (3, 4, 5);
        let chw: Vec<f32> = (0..c * h * w).map(|i| i as f32 / 59.0).collect();
        let mut hwc = vec![0.0; chw.len()];
        for k in 0..c {
            for p in 0..h * w {
                hwc[p * c + k] = chw[k * h * w + p];
            }
        }
        let a = ImageU8::from_chw_f32(c, h, w, &chw).unwrap();
        let b = ImageU8::from_hwc_f32(h, w, c, &hwc).unwrap();
        assert_eq!(a, b);
    }
}
