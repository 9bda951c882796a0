//! Reading face images into the network's layout (CHW f32 in [0,1], 3 channels) and writing results
//! (PNG, animated GIF) without ever overwriting a file silently.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Cursor, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{
    Delay, DynamicImage, ExtendedColorType, Frame, ImageEncoder, ImageFormat, ImageReader, RgbaImage,
};

use super::degrade::{resize_antialias_chw, ResizeKernel};
use crate::error::{Error, Result};

/// Side of the low-resolution faces the models take (the paper's 16×16).
pub const LR_SIZE: usize = 16;

/// File extensions (lower case) that [`collect_images`] picks up inside folders.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// What to do with an image that is not square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CropMode {
    /// Refuse it: the caller must decide what part of the picture is the face.
    #[default]
    Reject,
    /// Keep the largest centred square.
    Center,
}

/// A face read from disk, ready for the network.
#[derive(Debug, Clone)]
pub struct LoadedFace {
    /// CHW f32 in [0,1]: 3 × `size` × `size` (a grayscale file gives three equal channels).
    pub pixels: Vec<f32>,
    /// Side of the square image in `pixels`.
    pub size: usize,
    /// The file was grayscale; results can be written back as grayscale.
    pub gray: bool,
    /// What was done to the file's pixels on the way (crop, resize, alpha dropped), for the user.
    pub notes: Vec<String>,
    /// Set when the file decodes only in part (a truncated or corrupt JPEG or PNG) and the caller
    /// accepted that ([`Partial::Accept`]): what is wrong with it. The missing part is grey.
    pub partial: Option<String>,
}

/// What to do with an image file that decodes only in part: a truncated or corrupt JPEG (the
/// decoder fills what it cannot read with grey) or a truncated PNG (rows missing at the bottom).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partial {
    /// Refuse it: an error naming the file and the problem.
    #[default]
    Reject,
    /// Use what decodes, the rest grey; [`LoadedFace::partial`] says what was wrong.
    Accept,
}

/// Reads the 16×16 low-resolution face for `srsde-fast upscale`.
///
/// A 16×16 image is the LR itself. Another square size is resized to 16×16 with the paper's antialiased
/// bilinear filter (a note says so). A non-square image is an error unless `crop` is
/// [`CropMode::Center`]. Grayscale becomes three equal channels, alpha is dropped. A file that
/// decodes only in part (truncated, corrupt) is an error; see [`load_lr_face_with`].
pub fn load_lr_face(path: &Path, crop: CropMode) -> Result<LoadedFace> {
    load_lr_face_with(path, crop, Partial::Reject)
}

/// [`load_lr_face`], with the choice of what to do with a file that decodes only in part.
pub fn load_lr_face_with(path: &Path, crop: CropMode, partial: Partial) -> Result<LoadedFace> {
    let (img, notes) = read_square(path, crop, partial)?;
    let mut face = img.into_face(notes);
    if face.size != LR_SIZE {
        let s = face.size;
        face.pixels = resize_antialias_chw(&face.pixels, 3, s, s, LR_SIZE, LR_SIZE, ResizeKernel::Triangle);
        face.size = LR_SIZE;
        let how = if s > LR_SIZE {
            "antialiased bilinear, as the paper makes its LR"
        } else {
            "bilinear upscale"
        };
        face.notes
            .push(format!("resized {s}×{s} to {LR_SIZE}×{LR_SIZE} ({how})"));
    }
    Ok(face)
}

/// Reads a high-resolution face (evaluation, training data): any square size ≥ `size` (or any size with
/// [`CropMode::Center`]), resized to `size × size` with the antialiased bilinear filter when larger.
/// A file that decodes only in part (truncated, corrupt) is an error.
pub fn load_hr_face(path: &Path, size: usize, crop: CropMode) -> Result<LoadedFace> {
    let (img, notes) = read_square(path, crop, Partial::Reject)?;
    let mut face = img.into_face(notes);
    let s = face.size;
    if s < size {
        return Err(Error::format(
            path.display().to_string(),
            format!("image is {s}×{s}, smaller than the {size}×{size} high-resolution size"),
        ));
    }
    if s > size {
        face.pixels = resize_antialias_chw(&face.pixels, 3, s, s, size, size, ResizeKernel::Triangle);
        face.size = size;
        face.notes
            .push(format!("resized {s}×{s} to {size}×{size} (antialiased bilinear)"));
    }
    Ok(face)
}

/// A decoded image as 3 CHW planes in [0,1].
struct Decoded {
    rgb: Vec<f32>,
    h: usize,
    w: usize,
    gray: bool,
    alpha: bool,
    /// Decoded only in part (accepted by the caller): what is wrong.
    partial: Option<String>,
}

impl Decoded {
    fn into_face(self, mut notes: Vec<String>) -> LoadedFace {
        if let Some(why) = &self.partial {
            notes.push(format!(
                "accepted although it decodes only in part: {why}; the missing part is grey"
            ));
        }
        if self.alpha {
            notes.push("alpha channel dropped (colour values used as they are)".to_string());
        }
        LoadedFace {
            pixels: self.rgb,
            size: self.h,
            gray: self.gray,
            notes,
            partial: self.partial,
        }
    }
}

/// Decodes `path` and makes it square (or refuses), returning the image and the notes so far.
fn read_square(path: &Path, crop: CropMode, partial: Partial) -> Result<(Decoded, Vec<String>)> {
    let img = decode(path, partial)?;
    let mut notes = Vec::new();
    if img.h == img.w {
        return Ok((img, notes));
    }
    match crop {
        CropMode::Reject => Err(Error::format(
            path.display().to_string(),
            format!(
                "image is {}×{} (width×height), not square; crop it to the face or ask for a centre crop \
                 (--crop center)",
                img.w, img.h
            ),
        )),
        CropMode::Center => {
            let s = img.h.min(img.w);
            let (top, left) = ((img.h - s) / 2, (img.w - s) / 2);
            let mut rgb = Vec::with_capacity(3 * s * s);
            for plane in img.rgb.chunks_exact(img.h * img.w) {
                for y in top..top + s {
                    rgb.extend_from_slice(&plane[y * img.w + left..][..s]);
                }
            }
            notes.push(format!("centre-cropped {}×{} to {s}×{s}", img.w, img.h));
            Ok((
                Decoded {
                    rgb,
                    h: s,
                    w: s,
                    ..img
                },
                notes,
            ))
        }
    }
}

/// Reads and decodes an image file (format from its content, not its name). A JPEG that the
/// (lenient) decoder renders but a strict decode refuses — truncated, or corrupt in its entropy-coded
/// data, the rest filled with grey — and a PNG of which only the first rows decode are errors
/// naming the file and the problem, unless `partial` accepts them.
fn decode(path: &Path, partial: Partial) -> Result<Decoded> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let reader = ImageReader::new(Cursor::new(bytes.as_slice()))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let Some(format) = reader.format() else {
        return Err(Error::format(
            file,
            "cannot decode: not a PNG, JPEG, WebP, BMP or GIF image",
        ));
    };
    let refuse = |why: String| {
        Error::format(
            &file,
            format!(
                "{why}: the image decodes only in part (the rest would be grey); refused — pass \
                 --accept-truncated to use what decodes"
            ),
        )
    };
    let img = match reader.decode() {
        Ok(img) => img,
        Err(e) if format == ImageFormat::Png => {
            // A truncated PNG: its first rows may still decode.
            return match (partial_png(&bytes), partial) {
                (Some(d), Partial::Accept) => Ok(d),
                (Some(d), Partial::Reject) => Err(refuse(d.partial.unwrap_or_default())),
                (None, _) => Err(Error::format(&file, format!("cannot decode: {e}"))),
            };
        }
        Err(e) => return Err(Error::format(&file, format!("cannot decode: {e}"))),
    };
    let problem = match format {
        ImageFormat::Jpeg => jpeg_problem(&bytes).map(|why| format!("truncated or corrupt JPEG ({why})")),
        _ => None,
    };
    if let (Some(why), Partial::Reject) = (&problem, partial) {
        return Err(refuse(why.clone()));
    }
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::format(file, "cannot decode: the image is empty"));
    }
    let u8f = |v: u8| v as f32 / 255.0;
    let u16f = |v: u16| v as f32 / 65535.0;
    // Convert from the file's own sample type so 16-bit images keep their full precision.
    let (rgb, gray, alpha) = match &img {
        DynamicImage::ImageLuma8(b) => (planes(b.as_raw(), h * w, 1, 1, u8f), true, false),
        DynamicImage::ImageLumaA8(b) => (planes(b.as_raw(), h * w, 2, 1, u8f), true, true),
        DynamicImage::ImageRgb8(b) => (planes(b.as_raw(), h * w, 3, 3, u8f), false, false),
        DynamicImage::ImageRgba8(b) => (planes(b.as_raw(), h * w, 4, 3, u8f), false, true),
        DynamicImage::ImageLuma16(b) => (planes(b.as_raw(), h * w, 1, 1, u16f), true, false),
        DynamicImage::ImageLumaA16(b) => (planes(b.as_raw(), h * w, 2, 1, u16f), true, true),
        DynamicImage::ImageRgb16(b) => (planes(b.as_raw(), h * w, 3, 3, u16f), false, false),
        DynamicImage::ImageRgba16(b) => (planes(b.as_raw(), h * w, 4, 3, u16f), false, true),
        other => {
            let alpha = other.color().has_alpha();
            let f = other.to_rgb32f();
            (planes(f.as_raw(), h * w, 3, 3, |v: f32| v), false, alpha)
        }
    };
    Ok(Decoded {
        rgb,
        h,
        w,
        gray,
        alpha,
        partial: problem,
    })
}

/// Why a JPEG that the lenient decoder renders is not whole: a strict decode's error (a premature
/// end of the data, a corrupt entropy-coded segment, a marker out of place), or None when it is
/// whole.
fn jpeg_problem(bytes: &[u8]) -> Option<String> {
    use zune_jpeg::zune_core::{bytestream::ZCursor, options::DecoderOptions};
    let options = DecoderOptions::default().set_strict_mode(true);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode()
        .err()
        .map(|e| e.to_string().trim_matches('"').to_string())
}

/// The first rows of a truncated, non-interlaced PNG, the missing ones grey; None when no row (or
/// every row) decodes, or when the file is interlaced (its rows arrive in passes).
fn partial_png(bytes: &[u8]) -> Option<Decoded> {
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().ok()?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if reader.info().interlaced || w == 0 || h == 0 {
        return None;
    }
    let (color, _) = reader.output_color_type();
    let (stride, colour, gray, alpha) = match color {
        png::ColorType::Grayscale => (1, 1, true, false),
        png::ColorType::GrayscaleAlpha => (2, 1, true, true),
        png::ColorType::Rgb => (3, 3, false, false),
        png::ColorType::Rgba => (4, 3, false, true),
        png::ColorType::Indexed => return None, // expanded to RGB(A) by the transformation
    };
    let mut raw = Vec::with_capacity(w * h * stride);
    let mut rows = 0;
    let why = loop {
        match reader.next_row() {
            Ok(Some(row)) if row.data().len() >= w * stride => {
                raw.extend_from_slice(&row.data()[..w * stride]);
                rows += 1;
            }
            Ok(Some(_)) => break "a row is short".to_string(),
            Ok(None) => return None,
            Err(e) => break e.to_string(),
        }
    };
    if rows == 0 || rows >= h {
        return None;
    }
    let grey = [128u8; 4];
    while raw.len() < w * h * stride {
        raw.extend_from_slice(&grey[..stride]);
    }
    Some(Decoded {
        rgb: planes(&raw, h * w, stride, colour, |v: u8| v as f32 / 255.0),
        h,
        w,
        gray,
        alpha,
        partial: Some(format!(
            "truncated or corrupt PNG: only {rows} of its {h} rows decode ({why})"
        )),
    })
}

/// Interleaved samples (`stride` per pixel, the first `colour` of them colour) → 3 CHW planes;
/// one colour channel is repeated into all three.
fn planes<T: Copy>(
    raw: &[T],
    pixels: usize,
    stride: usize,
    colour: usize,
    to_f32: impl Fn(T) -> f32,
) -> Vec<f32> {
    let mut out = vec![0.0f32; 3 * pixels];
    for (p, px) in raw.chunks_exact(stride).take(pixels).enumerate() {
        for k in 0..3 {
            out[k * pixels + p] = to_f32(px[if colour == 1 { 0 } else { k }]);
        }
    }
    out
}

/// f32 → u8 as torchvision's `save_image`: clamp to [0,1], ×255, +0.5, truncate (NaN → 0).
pub fn quantize_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Interleaved u8 pixels of a CHW image (`c` = 1 or 3): RGB, or one gray channel when `gray`
/// (the mean of the channels; exact for an image whose channels are equal) — the pixels
/// [`encode_png`] writes.
pub fn to_u8_pixels(chw: &[f32], c: usize, h: usize, w: usize, gray: bool) -> Result<Vec<u8>> {
    if c != 1 && c != 3 {
        return Err(Error::shape(
            "image encode",
            format!("{c} channels; expected 1 or 3"),
        ));
    }
    if h == 0 || w == 0 || chw.len() != c * h * w {
        return Err(Error::shape(
            "image encode",
            format!("{} values for a {c}×{h}×{w} image", chw.len()),
        ));
    }
    let n = h * w;
    let at = |k: usize, p: usize| chw[if c == 1 { p } else { k * n + p }];
    let mut out = Vec::with_capacity(if gray { n } else { 3 * n });
    for p in 0..n {
        if gray {
            let (r, g, b) = (at(0, p), at(1, p), at(2, p));
            let v = if r == g && g == b { r } else { (r + g + b) / 3.0 };
            out.push(quantize_u8(v));
        } else {
            out.extend((0..3).map(|k| quantize_u8(at(k, p))));
        }
    }
    Ok(out)
}

/// Encodes a CHW f32 image (`c` = 1 or 3, values in [0,1], clamped) as PNG bytes; `gray` writes a
/// single-channel PNG holding the mean of the channels.
pub fn encode_png(chw: &[f32], c: usize, h: usize, w: usize, gray: bool) -> Result<Vec<u8>> {
    let px = to_u8_pixels(chw, c, h, w, gray)?;
    let color = if gray {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    let mut buf = Vec::new();
    PngEncoder::new(&mut buf)
        .write_image(&px, w as u32, h as u32, color)
        .map_err(|e| Error::Other(format!("PNG encoding failed: {e}")))?;
    Ok(buf)
}

/// Encodes a CHW f32 image as [`encode_png`] does, with text chunks: each `(keyword, text)` becomes
/// an uncompressed iTXt chunk (UTF-8) before the image data. The bytes depend only on the pixels
/// and the texts (fixed compression and filter settings), so equal inputs give equal files.
pub fn encode_png_with_text(
    chw: &[f32],
    c: usize,
    h: usize,
    w: usize,
    gray: bool,
    text: &[(&str, &str)],
) -> Result<Vec<u8>> {
    let px = to_u8_pixels(chw, c, h, w, gray)?;
    encode_png_u8(&px, w, h, gray, text)
}

/// Encodes 8-bit pixels (interleaved RGB, or one gray channel when `gray`) as PNG with iTXt text
/// chunks; see [`encode_png_with_text`].
pub fn encode_png_u8(px: &[u8], w: usize, h: usize, gray: bool, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let channels = if gray { 1 } else { 3 };
    if w == 0 || h == 0 || px.len() != w * h * channels {
        return Err(Error::shape(
            "image encode",
            format!("{} bytes for a {w}×{h}×{channels} image", px.len()),
        ));
    }
    let err = |e: png::EncodingError| Error::Other(format!("PNG encoding failed: {e}"));
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w as u32, h as u32);
        enc.set_color(if gray {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Balanced);
        for (key, value) in text {
            enc.add_itxt_chunk(key.to_string(), value.to_string())
                .map_err(err)?;
        }
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(px).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(buf)
}

/// The text of the first text chunk (iTXt, tEXt or zTXt) named `keyword` in PNG bytes; None when
/// the PNG has no such chunk. `file` names the bytes in errors.
pub fn read_png_text(bytes: &[u8], keyword: &str, file: &str) -> Result<Option<String>> {
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    dec.set_ignore_text_chunk(false);
    let reader = dec
        .read_info()
        .map_err(|e| Error::format(file, format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let bad = |e: png::DecodingError| Error::format(file, format!("text chunk `{keyword}`: {e}"));
    for chunk in &info.utf8_text {
        if chunk.keyword == keyword {
            let mut chunk = chunk.clone();
            chunk.decompress_text().map_err(bad)?;
            return chunk.get_text().map(Some).map_err(bad);
        }
    }
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == keyword)
    {
        return Ok(Some(t.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        if chunk.keyword == keyword {
            let mut chunk = chunk.clone();
            chunk.decompress_text().map_err(bad)?;
            return chunk.get_text().map(Some).map_err(bad);
        }
    }
    Ok(None)
}

/// Writes a CHW f32 image as PNG (see [`encode_png`]). Refuses to replace an existing file; to replace
/// one on purpose (`--force`), use `write_file(path, &encode_png(..)?, true)`.
pub fn save_png(path: &Path, chw: &[f32], c: usize, h: usize, w: usize, gray: bool) -> Result<()> {
    write_file(path, &encode_png(chw, c, h, w, gray)?, false)
}

/// Encodes frames (CHW f32, 1 or 3 channels, all the same size) as a looping animated GIF, `delay_ms`
/// per frame (GIF stores hundredths of a second). Colours are quantised per frame.
pub fn encode_gif(frames: &[(Vec<f32>, usize, usize)], delay_ms: u32) -> Result<Vec<u8>> {
    let Some((_, h0, w0)) = frames.first() else {
        return Err(Error::Other("GIF encoding: no frames".to_string()));
    };
    if *h0 > u16::MAX as usize || *w0 > u16::MAX as usize {
        return Err(Error::shape(
            "gif",
            format!("{w0}×{h0} is larger than GIF allows"),
        ));
    }
    let mut buf = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut buf, 10);
        let gif_err = |e: image::ImageError| Error::Other(format!("GIF encoding failed: {e}"));
        enc.set_repeat(Repeat::Infinite).map_err(gif_err)?;
        for (i, (chw, h, w)) in frames.iter().enumerate() {
            if (h, w) != (h0, w0) {
                return Err(Error::shape(
                    "gif",
                    format!("frame {i} is {w}×{h}, frame 0 is {w0}×{h0}"),
                ));
            }
            let c = chw.len().checked_div(h * w).unwrap_or(0);
            let rgb = to_u8_pixels(chw, c, *h, *w, false)?;
            let rgba: Vec<u8> = rgb
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect();
            let img = RgbaImage::from_raw(*w as u32, *h as u32, rgba)
                .ok_or_else(|| Error::shape("gif", "frame buffer size"))?;
            let frame = Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(delay_ms, 1));
            enc.encode_frame(frame).map_err(gif_err)?;
        }
    }
    Ok(buf)
}

/// Writes an animated GIF of `frames` (see [`encode_gif`]), e.g. the denoising trajectory. Refuses to
/// replace an existing file; use `write_file(path, &encode_gif(..)?, true)` for `--force`.
pub fn write_gif(path: &Path, frames: &[(Vec<f32>, usize, usize)], delay_ms: u32) -> Result<()> {
    write_file(path, &encode_gif(frames, delay_ms)?, false)
}

/// Fails when `path` exists and `force` is false: lets a command check all its outputs before long work.
pub fn check_new(path: &Path, force: bool) -> Result<()> {
    if !force && path.symlink_metadata().is_ok() {
        return Err(exists_error(path));
    }
    Ok(())
}

fn exists_error(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            ErrorKind::AlreadyExists,
            "file exists; pass --force to overwrite it",
        ),
    )
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees half a file.
/// Without `force`, an existing file is never replaced.
pub fn write_file(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let mut f = create_new(path, force)?;
    f.write_all(bytes).map_err(|e| Error::io(f.temp_path(), e))?;
    f.commit()
}

/// A file being written: a temporary file next to its target, which [`NewFile::commit`] moves into
/// place. Dropped without commit, the temporary file is removed and the target left untouched.
pub struct NewFile {
    target: PathBuf,
    temp: PathBuf,
    force: bool,
    file: Option<BufWriter<File>>,
}

/// Starts writing `path`: fails at once (naming the file and `--force`) when it exists and `force` is
/// false, else opens a temporary file in the same folder.
pub fn create_new(path: &Path, force: bool) -> Result<NewFile> {
    check_new(path, force)?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(ErrorKind::InvalidInput, "not a file name"),
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = path.with_file_name(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| Error::io(path, e))?;
    Ok(NewFile {
        target: path.to_path_buf(),
        temp,
        force,
        file: Some(BufWriter::new(file)),
    })
}

impl NewFile {
    /// Where the bytes go until [`commit`](Self::commit).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Flushes to disk and moves the file into place. Without `force`, a file that appeared at the
    /// target meanwhile is not replaced (hard link, which fails when the target exists).
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("NewFile committed once");
        let file = file
            .into_inner()
            .map_err(|e| Error::io(&self.temp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        drop(file);
        let placed = if self.force {
            std::fs::rename(&self.temp, &self.target)
        } else {
            match std::fs::hard_link(&self.temp, &self.target) {
                Ok(()) => std::fs::remove_file(&self.temp),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(exists_error(&self.target)),
                // Filesystems without hard links: check, then rename.
                Err(_) => {
                    check_new(&self.target, false)?;
                    std::fs::rename(&self.temp, &self.target)
                }
            }
        };
        placed.map_err(|e| Error::io(&self.target, e))
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().map_or(Ok(0), |f| f.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        // Removes the temporary file if it was not moved into place (no-op after a rename).
        self.file.take();
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Expands the command line's inputs into image files: a named file is taken whatever its extension;
/// a folder contributes every file with an image extension (png, jpg, jpeg, webp, bmp; any case) below
/// it, recursively, sorted by path. Inputs keep their order. A missing path is an error naming it.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            found.sort();
            out.extend(found);
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, found)?;
        } else if has_image_extension(&path) && (kind.is_file() || path.is_file()) {
            // Symlinked files are followed; symlinked folders are not (no loops).
            found.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}
