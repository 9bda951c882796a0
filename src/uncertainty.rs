//! The spread of K hypotheses of one face (`upscale --samples K`, `eval --samples K`): the
//! per-pixel mean and standard deviation, the std as a heat map, and the contact strip
//! LR | hypotheses | mean | std that shows which features the input pins down (low std, the same in
//! every hypothesis) and which the model invents (high std).
//!
//! Everything is computed from the 8-bit pictures as they are written, so it can be checked
//! against the files: the mean and std of the K hypotheses' values (0–255), per pixel the root
//! mean square over the colour channels of the population std over the hypotheses (K = 1 gives 0).
use crate::eval::plot::{self, Canvas};

/// Name of the heat map's colour map.
pub const COLORMAP: &str = "viridis";

/// Viridis (matplotlib's perceptually uniform map) at 0, 1/8, …, 1; [`colormap_lut`] interpolates.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 45, 123],
    [59, 82, 139],
    [44, 114, 142],
    [33, 144, 140],
    [39, 173, 129],
    [93, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// Hypotheses shown in the strip, at most (all K go into the mean and std).
pub const STRIP_MAX_HYPOTHESES: usize = 8;

/// The heat map's 256 colours: entry i is the colour of std = i/255 of the scale (linear
/// interpolation of [`VIRIDIS`]; lightness grows with i).
pub fn colormap_lut() -> [[u8; 3]; 256] {
    let mut lut = [[0u8; 3]; 256];
    for (i, c) in lut.iter_mut().enumerate() {
        let t = i as f64 / 255.0 * (VIRIDIS.len() - 1) as f64;
        let j = (t.floor() as usize).min(VIRIDIS.len() - 2);
        let f = t - j as f64;
        for ch in 0..3 {
            let (a, b) = (VIRIDIS[j][ch] as f64, VIRIDIS[j + 1][ch] as f64);
            c[ch] = (a + (b - a) * f).round() as u8;
        }
    }
    lut
}

/// Mean and spread of K 8-bit pictures of the same face.
#[derive(Clone, Debug, PartialEq)]
pub struct Spread {
    pub height: usize,
    pub width: usize,
    /// Per-pixel mean, HWC RGB, in levels (0–255), not rounded.
    pub mean: Vec<f64>,
    /// Per-pixel std (levels): the RMS over channels of the population std over the hypotheses.
    pub std: Vec<f64>,
}

impl Spread {
    /// The spread of `hyps` (HWC RGB bytes, all `height × width`); panics on no pictures or on
    /// pictures of different sizes (callers pass what they sampled).
    pub fn of(hyps: &[&[u8]], height: usize, width: usize) -> Spread {
        let n = height * width;
        assert!(!hyps.is_empty() && hyps.iter().all(|h| h.len() == 3 * n));
        let k = hyps.len() as f64;
        let mut mean = vec![0.0f64; 3 * n];
        for h in hyps {
            for (m, &v) in mean.iter_mut().zip(h.iter()) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= k);
        let mut var = vec![0.0f64; 3 * n];
        for h in hyps {
            for ((s, &v), m) in var.iter_mut().zip(h.iter()).zip(&mean) {
                let d = v as f64 - m;
                *s += d * d;
            }
        }
        let std = var
            .chunks_exact(3)
            .map(|c| ((c[0] + c[1] + c[2]) / (3.0 * k)).sqrt())
            .collect();
        Spread {
            height,
            width,
            mean,
            std,
        }
    }

    /// The mean as a CHW picture in [0,1] (what [`crate::io::encode_png`] takes).
    pub fn mean_chw(&self) -> Vec<f32> {
        let n = self.height * self.width;
        let mut out = vec![0.0f32; 3 * n];
        for (p, px) in self.mean.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * n + p] = (px[c] / 255.0) as f32;
            }
        }
        out
    }

    /// Mean of the per-pixel std over the picture (levels).
    pub fn mean_std(&self) -> f64 {
        self.std.iter().sum::<f64>() / self.std.len() as f64
    }

    /// Largest per-pixel std (levels).
    pub fn max_std(&self) -> f64 {
        self.std.iter().copied().fold(0.0, f64::max)
    }

    /// The std as a heat map (HWC RGB): [`colormap_lut`] entry round(255 · std / scale), std
    /// above `scale` shown as the top colour.
    pub fn heat_map(&self, scale: f64) -> Vec<u8> {
        let lut = colormap_lut();
        self.std.iter().flat_map(|&s| lut[lut_index(s, scale)]).collect()
    }
}

/// The colour map entry of std `s` on a map whose top is `scale`.
pub fn lut_index(s: f64, scale: f64) -> usize {
    ((s / scale).clamp(0.0, 1.0) * 255.0).round() as usize
}

/// The heat map's default top for a picture whose largest std is `max`: `max` rounded up to 1,
/// 1.5, 2, 3, 4, 5, 6 or 8 × 10^k levels, at least 1 level (so K = 1, all zero, is one flat
/// colour).
pub fn nice_scale(max: f64) -> f64 {
    if max.is_nan() || max <= 1.0 {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= max * (1.0 - 1e-12))
        .unwrap_or(10.0 * mag)
}

/// A tile-sized picture from a smaller one by pixel repetition (HWC RGB).
pub fn enlarge_nearest(hwc: &[u8], h: usize, w: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let i = ((y * h / size) * w + x * w / size) * 3;
            out.extend_from_slice(&hwc[i..i + 3]);
        }
    }
    out
}

/// Height of the label band above the strip's tiles and of the colour bar below them.
const BAND: usize = 16;
const GAP: usize = 2;

/// The contact strip: LR (enlarged) | the first hypotheses (at most [`STRIP_MAX_HYPOTHESES`]) |
/// mean | std heat map, each a `size × size` tile (HWC RGB), labelled above; under the std tile a
/// colour bar from 0 to `scale` levels.
pub fn strip(lr: &[u8], hyps: &[&[u8]], mean: &[u8], heat: &[u8], scale: f64, size: usize) -> Canvas {
    let shown = hyps.len().min(STRIP_MAX_HYPOTHESES);
    let mut tiles: Vec<(String, &[u8])> = vec![("LR 16X16".into(), lr)];
    for (k, h) in hyps.iter().take(shown).enumerate() {
        tiles.push((format!("SR {k}"), h));
    }
    tiles.push((format!("MEAN OF {}", hyps.len()), mean));
    tiles.push(("STD".into(), heat));
    let width = tiles.len() * (size + GAP) + GAP;
    let height = BAND + size + GAP + BAND;
    let mut cv = Canvas::new(width, height);
    for (i, (label, tile)) in tiles.iter().enumerate() {
        let x = GAP + i * (size + GAP);
        cv.text(x as i64 + 2, 3, label, plot::BLACK);
        cv.blit(x, BAND, size, size, tile);
    }
    // The colour bar under the std tile, with its two ends.
    let x0 = GAP + (tiles.len() - 1) * (size + GAP);
    let lut = colormap_lut();
    let y0 = BAND + size + GAP;
    for dx in 0..size {
        let c = lut[dx * 255 / (size - 1).max(1)];
        cv.fill_rect((x0 + dx) as i64, y0 as i64, 1, 4, c);
    }
    cv.text(x0 as i64, (y0 + 5) as i64, "0", plot::BLACK);
    let top = format_levels(scale);
    cv.text(
        (x0 + size) as i64 - plot::text_width(&top),
        (y0 + 5) as i64,
        &top,
        plot::BLACK,
    );
    cv
}

/// A scale in levels for a label: "12.5", "20", "0.5".
pub fn format_levels(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_identical_pictures_is_zero_and_of_two_is_half_the_gap() {
        let a = vec![10u8, 20, 30, 40, 50, 60];
        let s = Spread::of(&[&a, &a, &a], 1, 2);
        assert_eq!(s.std, [0.0, 0.0]);
        assert_eq!(s.mean, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        let b = vec![14u8, 24, 34, 40, 50, 60];
        let s = Spread::of(&[&a, &b], 1, 2);
        // Every channel of pixel 0 differs by 4: std 2; pixel 1 is equal.
        assert_eq!(s.std, [2.0, 0.0]);
        assert_eq!(s.mean[..3], [12.0, 22.0, 32.0]);
        assert_eq!(s.mean_std(), 1.0);
        assert_eq!(s.max_std(), 2.0);
    }

    #[test]
    fn the_colour_map_runs_dark_to_light_from_viridis_ends() {
        let lut = colormap_lut();
        assert_eq!(lut[0], VIRIDIS[0]);
        assert_eq!(lut[255], VIRIDIS[8]);
        let light = |c: [u8; 3]| 0.299 * c[0] as f64 + 0.587 * c[1] as f64 + 0.114 * c[2] as f64;
        assert!(lut.windows(8).all(|w| light(w[7]) > light(w[0])));
        assert_eq!(lut_index(0.0, 5.0), 0);
        assert_eq!(lut_index(5.0, 5.0), 255);
        assert_eq!(lut_index(50.0, 5.0), 255);
    }

    #[test]
    fn nice_scales() {
        assert_eq!(nice_scale(0.0), 1.0);
        assert_eq!(nice_scale(0.7), 1.0);
        assert_eq!(nice_scale(1.3), 1.5);
        assert_eq!(nice_scale(4.9), 5.0);
        assert_eq!(nice_scale(5.0), 5.0);
        assert_eq!(nice_scale(12.0), 15.0);
        assert_eq!(nice_scale(55.4), 60.0);
        assert_eq!(nice_scale(73.0), 80.0);
        assert_eq!(nice_scale(95.0), 100.0);
        assert_eq!(format_levels(12.5), "12.5");
        assert_eq!(format_levels(20.0), "20");
    }

    #[test]
    fn strip_layout() {
        let t = vec![0u8; 8 * 8 * 3];
        let cv = strip(&t, &[&t, &t, &t], &t, &t, 5.0, 8);
        // LR, 3 hypotheses, mean, std.
        assert_eq!(cv.width, 6 * (8 + GAP) + GAP);
        assert_eq!(cv.height, BAND + 8 + GAP + BAND);
    }
}
