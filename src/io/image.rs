//! Reading face images into the network's layout (CHW f32 in [0,1], 3 channels) and writing results
//! (PNG, animated GIF) without ever overwriting a file silently.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Cursor, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{Delay, DynamicImage, ExtendedColorType, Frame, ImageEncoder, ImageReader, RgbaImage};

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
}

/// Reads the 16×16 low-resolution face for `srsde-fast upscale`.
///
/// A 16×16 image is the LR itself. Another square size is resized to 16×16 with the paper's antialiased
/// bilinear filter (a note says so). A non-square image is an error unless `crop` is
/// [`CropMode::Center`]. Grayscale becomes three equal channels, alpha is dropped.
pub fn load_lr_face(path: &Path, crop: CropMode) -> Result<LoadedFace> {
    let (img, notes) = read_square(path, crop)?;
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
pub fn load_hr_face(path: &Path, size: usize, crop: CropMode) -> Result<LoadedFace> {
    let (img, notes) = read_square(path, crop)?;
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
}

impl Decoded {
    fn into_face(self, mut notes: Vec<String>) -> LoadedFace {
        if self.alpha {
            notes.push("alpha channel dropped (colour values used as they are)".to_string());
        }
        LoadedFace {
            pixels: self.rgb,
            size: self.h,
            gray: self.gray,
            notes,
        }
    }
}

/// Decodes `path` and makes it square (or refuses), returning the image and the notes so far.
fn read_square(path: &Path, crop: CropMode) -> Result<(Decoded, Vec<String>)> {
    let img = decode(path)?;
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

/// Reads and decodes an image file (format from its content, not its name).
fn decode(path: &Path) -> Result<Decoded> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::format(
            file,
            "cannot decode: not a PNG, JPEG, WebP, BMP or GIF image",
        ));
    }
    let img = reader
        .decode()
        .map_err(|e| Error::format(&file, format!("cannot decode: {e}")))?;
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
/// (the mean of the channels; exact for an image whose channels are equal).
fn to_u8_interleaved(chw: &[f32], c: usize, h: usize, w: usize, gray: bool) -> Result<Vec<u8>> {
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
    let px = to_u8_interleaved(chw, c, h, w, gray)?;
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
            let rgb = to_u8_interleaved(chw, c, *h, *w, false)?;
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
