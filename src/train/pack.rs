//! Packing a training folder small enough to carry to a GPU machine (`srsde-fast pack-faces`, used
//! by `scripts/pack_train_data.sh`): the training faces are re-encoded as JPEG at the highest
//! quality that keeps the whole folder within a byte budget, while the held-out validation faces
//! are copied byte for byte, so validation and evaluation see the original pictures.
//!
//! The validation split is the trainer's own ([`FaceFolder::split_validation`]: a hash of the
//! relative file name), so the packed folder must keep every name: the packer checks after writing
//! that the split of the packed folder holds out exactly the faces it copied verbatim.
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::train::data::FaceFolder;

/// What [`pack_faces`] did.
#[derive(Clone, Debug)]
pub struct PackReport {
    /// JPEG quality of the re-encoded training faces.
    pub quality: u8,
    pub train_files: usize,
    /// Held-out faces, relative to the folder, copied verbatim (sorted).
    pub heldout: Vec<String>,
    /// Bytes of the packed folder's images.
    pub bytes: u64,
    /// Bytes of the same images in the source folder.
    pub source_bytes: u64,
    /// Mean PSNR (dB, 8-bit) of the re-encoded training faces against their decoded sources.
    pub psnr_db: f64,
    /// Qualities tried while searching for the budget, with the bytes each gave.
    pub tried: Vec<(u8, u64)>,
}

/// A decoded training face and where it goes.
struct TrainFace {
    dest: PathBuf,
    img: image::RgbImage,
}

/// Encode `img` as a baseline JPEG (4:4:4) at `quality`.
fn encode_jpeg(img: &image::RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .map_err(|e| Error::Other(format!("JPEG encoding: {e}")))?;
    Ok(buf)
}

fn psnr_u8(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// Pack `src` into the new folder `dst` (absent or empty). `val_fraction` is the trainer's
/// `--val-fraction`; the faces it holds out are copied as they are. The training faces are
/// re-encoded at `quality`, or, when `quality` is None, at the highest quality in 50..=95 that keeps
/// all images within `max_bytes` (required then).
pub fn pack_faces(
    src: &Path,
    dst: &Path,
    val_fraction: f64,
    quality: Option<u8>,
    max_bytes: Option<u64>,
) -> Result<PackReport> {
    if dst.exists()
        && std::fs::read_dir(dst)
            .map_err(|e| Error::io(dst, e))?
            .next()
            .is_some()
    {
        return Err(Error::Config(format!(
            "{} is not empty; remove it or choose another folder",
            dst.display()
        )));
    }
    if quality.is_none() && max_bytes.is_none() {
        return Err(Error::Config("give a JPEG quality or a size budget".into()));
    }
    if let Some(q) = quality.filter(|q| !(1..=100).contains(q)) {
        return Err(Error::Config(format!("JPEG quality {q} must lie in 1..=100")));
    }
    let folder = FaceFolder::open(src)?;
    let root = folder.root.clone();
    let rel = |p: &Path| p.strip_prefix(&root).unwrap_or(p).to_path_buf();
    let (train, held) = folder.split_validation(val_fraction)?;
    let size_of = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| Error::io(p, e));
    let held_bytes: u64 = held.iter().map(|p| size_of(p)).sum::<Result<u64>>()?;
    let source_bytes = held_bytes + train.files.iter().map(|p| size_of(p)).sum::<Result<u64>>()?;

    // Decode every training face once; the quality search re-encodes from memory.
    let faces: Vec<TrainFace> = train
        .files
        .par_iter()
        .map(|p| {
            let img = image::open(p)
                .map_err(|e| Error::format(p.display().to_string(), format!("cannot decode: {e}")))?
                .to_rgb8();
            Ok(TrainFace {
                dest: dst.join(rel(p)).with_extension("jpg"),
                img,
            })
        })
        .collect::<Result<_>>()?;
    let encode_all =
        |q: u8| -> Result<Vec<Vec<u8>>> { faces.par_iter().map(|f| encode_jpeg(&f.img, q)).collect() };
    let total = |enc: &[Vec<u8>]| held_bytes + enc.iter().map(|b| b.len() as u64).sum::<u64>();

    let mut tried = Vec::new();
    let (quality, encoded) = match quality {
        Some(q) => {
            let enc = encode_all(q)?;
            tried.push((q, total(&enc)));
            (q, enc)
        }
        None => {
            // Size grows with quality: binary search for the highest quality within the budget.
            let budget = max_bytes.expect("checked above");
            let (mut lo, mut hi) = (50u8, 95u8);
            let mut best: Option<(u8, Vec<Vec<u8>>)> = None;
            while lo <= hi {
                let q = lo + (hi - lo) / 2;
                let enc = encode_all(q)?;
                let bytes = total(&enc);
                tried.push((q, bytes));
                if bytes <= budget {
                    best = Some((q, enc));
                    lo = q + 1;
                } else {
                    hi = q - 1;
                }
            }
            best.ok_or_else(|| {
                Error::Config(format!(
                    "even JPEG quality 50 needs more than {budget} bytes ({} tried)",
                    tried
                        .iter()
                        .map(|(q, b)| format!("q{q}: {b}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?
        }
    };

    // Write: re-encoded training faces, verbatim held-out faces.
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    let mut psnr_sum = 0.0;
    for (f, bytes) in faces.iter().zip(&encoded) {
        if let Some(parent) = f.dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&f.dest, bytes).map_err(|e| Error::io(&f.dest, e))?;
        let back = image::load_from_memory(bytes)
            .map_err(|e| Error::Other(format!("re-reading {}: {e}", f.dest.display())))?
            .to_rgb8();
        psnr_sum += psnr_u8(f.img.as_raw(), back.as_raw());
    }
    let mut heldout = Vec::new();
    for p in &held {
        let d = dst.join(rel(p));
        if let Some(parent) = d.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::copy(p, &d).map_err(|e| Error::io(&d, e))?;
        heldout.push(rel(p).display().to_string());
    }
    heldout.sort();

    // The trainer must hold out exactly these faces in the packed folder.
    let (_, packed_held) = FaceFolder::open(dst)?.split_validation(val_fraction)?;
    let mut packed: Vec<String> = packed_held
        .iter()
        .map(|p| p.strip_prefix(dst).unwrap_or(p).display().to_string())
        .collect();
    packed.sort();
    if packed != heldout {
        return Err(Error::Other(format!(
            "the packed folder's validation split differs from the source's (were files renamed, e.g. \
             .png → .jpg?); {} of {} held-out names differ",
            packed.iter().filter(|n| !heldout.contains(n)).count(),
            heldout.len()
        )));
    }
    Ok(PackReport {
        quality,
        train_files: faces.len(),
        bytes: total(&encoded),
        source_bytes,
        psnr_db: psnr_sum / faces.len().max(1) as f64,
        heldout,
        tried,
    })
}

/// Command-line arguments of the maintenance command `srsde-fast pack-faces`.
#[derive(clap::Args, Clone, Debug)]
pub struct PackArgs {
    /// Source folder of training faces (e.g. ../shared/data/faces128).
    pub src: PathBuf,
    /// New (or empty) output folder.
    #[arg(short, long)]
    pub output: PathBuf,
    /// The training run's --val-fraction: the faces it holds out are copied verbatim.
    #[arg(long, default_value_t = crate::train::data::VAL_FRACTION)]
    pub val_fraction: f64,
    /// JPEG quality of the re-encoded training faces [default: the highest within --max-mib].
    #[arg(long)]
    pub quality: Option<u8>,
    /// Size budget of the packed folder in MiB (used to pick the quality).
    #[arg(long)]
    pub max_mib: Option<f64>,
    /// Also write the held-out file names (one per line) to this file.
    #[arg(long)]
    pub heldout_list: Option<PathBuf>,
}

/// `srsde-fast pack-faces`: returns the summary to print.
pub fn pack_cli(args: &PackArgs) -> Result<String> {
    let max_bytes = args.max_mib.map(|m| (m * (1u64 << 20) as f64) as u64);
    let r = pack_faces(
        &args.src,
        &args.output,
        args.val_fraction,
        args.quality,
        max_bytes,
    )?;
    if let Some(list) = &args.heldout_list {
        let text: String = r.heldout.iter().map(|n| format!("{n}\n")).collect();
        std::fs::write(list, text).map_err(|e| Error::io(list, e))?;
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(format!(
        "packed {} training faces at JPEG quality {} (mean PSNR {:.1} dB vs the source) + {} held-out \
         faces verbatim: {:.1} MiB (source {:.1} MiB) in {}; qualities tried: {}",
        r.train_files,
        r.quality,
        r.psnr_db,
        r.heldout.len(),
        mib(r.bytes),
        mib(r.source_bytes),
        args.output.display(),
        r.tried
            .iter()
            .map(|(q, b)| format!("q{q} {:.1} MiB", mib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_within_budget_and_keeps_the_split() {
        let base = std::env::temp_dir().join(format!("srsde-pack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let src = base.join("src");
        std::fs::create_dir_all(&src).unwrap();
        // 40 noisy 32×32 "faces" (noise makes JPEG size depend strongly on quality).
        for i in 0..40u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let h = (x * 31 + y * 17 + i * 101).wrapping_mul(2654435761) >> 24;
                image::Rgb([h as u8, (h as u8).wrapping_add(x as u8 * 4), (y * 8) as u8])
            });
            img.save(src.join(format!("face_{i:03}.jpg"))).unwrap();
        }
        // Quality 95 and quality 50 bound the sizes; a budget between them needs a quality between.
        let big = pack_faces(&src, &base.join("q95"), 0.1, Some(95), None).unwrap();
        assert_eq!((big.train_files, big.heldout.len()), (36, 4));
        let small = pack_faces(&src, &base.join("q50"), 0.1, Some(50), None).unwrap();
        assert!(small.bytes < big.bytes);
        let budget = (big.bytes + small.bytes) / 2;
        let r = pack_faces(&src, &base.join("fit"), 0.1, None, Some(budget)).unwrap();
        assert!(r.bytes <= budget && r.quality > 50 && r.quality < 95, "{r:?}");
        // The next quality up was tried and did not fit (the search found the highest).
        assert!(
            r.tried.iter().any(|&(q, b)| q == r.quality + 1 && b > budget),
            "{r:?}"
        );
        let on_disk: u64 = std::fs::read_dir(base.join("fit"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, r.bytes);
        // Held-out faces are byte-identical copies.
        for n in &r.heldout {
            assert_eq!(
                std::fs::read(src.join(n)).unwrap(),
                std::fs::read(base.join("fit").join(n)).unwrap()
            );
        }
        assert!(r.psnr_db > 20.0, "{}", r.psnr_db);
        // A non-empty destination is refused.
        assert!(pack_faces(&src, &base.join("fit"), 0.1, Some(80), None).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
