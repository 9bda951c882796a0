//! The evaluation's figures, drawn directly into RGB buffers with the `image` crate: line and
//! scatter panels with axes, ticks and labels in a built-in 3×5 bitmap font (no font files or
//! system libraries), and the LR | SR | HR contact sheet.
//!
//! A plotting crate was not used: none is vendored here, and the text renderers of the usual ones
//! need a font system; the figures need only axes, polylines, dots and short labels.
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::error::{Error, Result};

pub type Rgb = [u8; 3];

pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [200, 200, 200];
pub const BLUE: Rgb = [31, 119, 180];
pub const ORANGE: Rgb = [255, 127, 14];

/// Pixel scale of the 3×5 font (each font dot is `FONT_SCALE`² pixels).
const FONT_SCALE: usize = 2;

/// An RGB picture being drawn.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            rgb: vec![255; width * height * 3],
        }
    }

    /// Sets one pixel; coordinates outside the canvas are ignored.
    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn fill_rect(&mut self, x0: i64, y0: i64, w: i64, h: i64, c: Rgb) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.set(x, y, c);
            }
        }
    }

    /// A line `thick` pixels wide (Bresenham, each point stamped as a square).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.fill_rect(x - thick / 2, y - thick / 2, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A filled disc of radius `r`.
    pub fn dot(&mut self, cx: i64, cy: i64, r: i64, c: Rgb) {
        for y in -r..=r {
            for x in -r..=r {
                if x * x + y * y <= r * r {
                    self.set(cx + x, cy + y, c);
                }
            }
        }
    }

    /// Text in the built-in font with its top-left corner at (x, y); lower case is drawn as upper
    /// case and characters without a glyph as blanks.
    pub fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        let k = FONT_SCALE as i64;
        for (i, ch) in s.chars().enumerate() {
            let gx = x + i as i64 * GLYPH_ADVANCE as i64 * k;
            for (r, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        self.fill_rect(gx + col * k, y + r as i64 * k, k, k, c);
                    }
                }
            }
        }
    }

    /// Copies an RGB picture (HWC bytes, `w × h`) with its top-left corner at (x, y).
    pub fn blit(&mut self, x: usize, y: usize, w: usize, h: usize, hwc: &[u8]) {
        for r in 0..h.min(self.height.saturating_sub(y)) {
            let n = w.min(self.width.saturating_sub(x)) * 3;
            let dst = ((y + r) * self.width + x) * 3;
            self.rgb[dst..dst + n].copy_from_slice(&hwc[r * w * 3..r * w * 3 + n]);
        }
    }

    /// The canvas as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(
                &self.rgb,
                self.width as u32,
                self.height as u32,
                ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Other(format!("PNG encoding of a plot failed: {e}")))?;
        Ok(out)
    }
}

/// Width of a glyph cell in font dots (3 dots and a gap).
const GLYPH_ADVANCE: usize = 4;

/// Pixel width of `s` in the built-in font.
pub fn text_width(s: &str) -> i64 {
    (s.chars().count() * GLYPH_ADVANCE * FONT_SCALE) as i64
}

/// Pixel height of the built-in font.
pub const TEXT_HEIGHT: i64 = 5 * FONT_SCALE as i64;

/// The 3×5 glyph of `c`: five rows, bit 4 = left dot, 1 = right dot.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        ':' => [0, 2, 0, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        _ => [0; 5],
    }
}

/// Round tick positions covering [lo, hi] (steps of 1, 2 or 5 × 10^k) and the decimals they need.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|i| i as f64 * step).collect(), decimals)
}

/// Data range with a margin; a single value gets a small window around it.
fn padded_range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.08
    } else {
        lo.abs().max(1.0) * 0.05
    };
    (lo - pad, hi + pad)
}

/// One data series of a panel.
pub struct Series<'a> {
    pub points: &'a [(f64, f64)],
    pub color: Rgb,
    /// Join the points with a polyline (in the given order).
    pub line: bool,
}

/// Draws a panel with its frame at (x, y) of size w × h: axes with labelled ticks, a title above it,
/// an x label below, then the series. Non-finite points are left out.
pub fn panel(
    cv: &mut Canvas,
    (x, y, w, h): (i64, i64, i64, i64),
    title: &str,
    x_label: &str,
    series: &[Series],
) {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let (x_lo, x_hi) = padded_range(
        series
            .iter()
            .flat_map(|s| s.points.iter().filter(finite).map(|p| p.0)),
    );
    let (y_lo, y_hi) = padded_range(
        series
            .iter()
            .flat_map(|s| s.points.iter().filter(finite).map(|p| p.1)),
    );
    let px = |v: f64| x + ((v - x_lo) / (x_hi - x_lo) * (w - 1) as f64).round() as i64;
    let py = |v: f64| y + h - 1 - ((v - y_lo) / (y_hi - y_lo) * (h - 1) as f64).round() as i64;

    let (xt, xd) = ticks(x_lo, x_hi);
    for t in xt {
        let tx = px(t);
        cv.line((tx, y), (tx, y + h - 1), 1, GREY);
        cv.line((tx, y + h), (tx, y + h + 4), 1, BLACK);
        let s = format!("{t:.xd$}");
        cv.text(tx - text_width(&s) / 2, y + h + 8, &s, BLACK);
    }
    let (yt, yd) = ticks(y_lo, y_hi);
    for t in yt {
        let ty = py(t);
        cv.line((x, ty), (x + w - 1, ty), 1, GREY);
        cv.line((x - 5, ty), (x - 1, ty), 1, BLACK);
        let s = format!("{t:.yd$}");
        cv.text(x - 8 - text_width(&s), ty - TEXT_HEIGHT / 2, &s, BLACK);
    }
    // Frame.
    cv.line((x, y), (x + w - 1, y), 1, BLACK);
    cv.line((x, y + h - 1), (x + w - 1, y + h - 1), 2, BLACK);
    cv.line((x, y), (x, y + h - 1), 2, BLACK);
    cv.line((x + w - 1, y), (x + w - 1, y + h - 1), 1, BLACK);
    cv.text(
        x + (w - text_width(title)) / 2,
        y - TEXT_HEIGHT - 10,
        title,
        BLACK,
    );
    cv.text(
        x + (w - text_width(x_label)) / 2,
        y + h + 16 + TEXT_HEIGHT,
        x_label,
        BLACK,
    );

    for s in series {
        let pts: Vec<(i64, i64)> = s
            .points
            .iter()
            .filter(finite)
            .map(|&(a, b)| (px(a), py(b)))
            .collect();
        if s.line {
            for seg in pts.windows(2) {
                cv.line(seg[0], seg[1], 2, s.color);
            }
        }
        for &(a, b) in &pts {
            cv.dot(a, b, 4, s.color);
        }
    }
}

/// Size of [`snr_figure`].
pub const FIG4_SIZE: (usize, usize) = (960, 420);
/// Size of [`cs_psnr_figure`].
pub const FIG5_SIZE: (usize, usize) = (520, 420);

/// The paper's Fig. 4: mean PSNR (left) and mean CS (right) against the Langevin snr.
pub fn snr_figure(snr: &[f64], psnr: &[f64], cs: &[f64]) -> Canvas {
    let (w, h) = FIG4_SIZE;
    let mut cv = Canvas::new(w, h);
    let a: Vec<(f64, f64)> = snr.iter().copied().zip(psnr.iter().copied()).collect();
    let b: Vec<(f64, f64)> = snr.iter().copied().zip(cs.iter().copied()).collect();
    let frame = |x0: i64| (x0, 50, w as i64 / 2 - 110, h as i64 - 120);
    let s = |p| Series {
        points: p,
        color: BLUE,
        line: true,
    };
    panel(&mut cv, frame(90), "PSNR (DB) VS SNR", "SNR", &[s(&a)]);
    let mut s2 = s(&b);
    s2.color = ORANGE;
    panel(&mut cv, frame(w as i64 / 2 + 90), "CS VS SNR", "SNR", &[s2]);
    cv
}

/// The paper's Fig. 5: CS against PSNR, one point per snr, titled with Pearson's r.
pub fn cs_psnr_figure(psnr: &[f64], cs: &[f64], r: Option<f64>) -> Canvas {
    let (w, h) = FIG5_SIZE;
    let mut cv = Canvas::new(w, h);
    let pts: Vec<(f64, f64)> = psnr.iter().copied().zip(cs.iter().copied()).collect();
    let title = match r {
        Some(r) => format!("CS VS PSNR  PEARSON R = {r:.3}"),
        None => "CS VS PSNR  PEARSON R = N/A".to_string(),
    };
    let series = [Series {
        points: &pts,
        color: BLUE,
        line: false,
    }];
    panel(
        &mut cv,
        (90, 50, w as i64 - 130, h as i64 - 120),
        &title,
        "PSNR (DB)",
        &series,
    );
    cv
}

/// A grid of equally sized RGB tiles (HWC bytes), `rows[r][c]`, with a 2-pixel white gutter.
pub fn contact_sheet(rows: &[Vec<Vec<u8>>], tile: usize) -> Canvas {
    const GAP: usize = 2;
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (w, h) = (cols * (tile + GAP) + GAP, rows.len() * (tile + GAP) + GAP);
    let mut cv = Canvas::new(w, h);
    for (r, row) in rows.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            cv.blit(GAP + c * (tile + GAP), GAP + r * (tile + GAP), tile, tile, t);
        }
    }
    cv
}

/// Contact sheet size for `rows × cols` tiles of side `tile`.
pub fn contact_sheet_size(rows: usize, cols: usize, tile: usize) -> (usize, usize) {
    (cols * (tile + 2) + 2, rows * (tile + 2) + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        let (t, d) = ticks(0.04, 0.31);
        assert_eq!(d, 1);
        assert!(t.iter().all(|v| (0.04..=0.31).contains(v)));
        assert!(t.len() >= 2);
        let (t, d) = ticks(20.3, 27.9);
        assert_eq!(d, 0);
        assert_eq!(t, [22.0, 24.0, 26.0]);
    }

    #[test]
    fn figures_have_their_size_and_ink() {
        let cv = snr_figure(&[0.05, 0.1], &[22.0, 23.5], &[0.5, 0.6]);
        assert_eq!((cv.width, cv.height), FIG4_SIZE);
        assert!(cv.rgb.iter().any(|&v| v < 100));
        let cv = cs_psnr_figure(&[22.0], &[f64::NAN], None);
        assert_eq!((cv.width, cv.height), FIG5_SIZE);
        let png = cv.png().unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
