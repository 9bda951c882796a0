//! Reading faces and writing results: every rule of `srsde_fast::io::image` on small images made here.
mod common;

use image::{DynamicImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use srsde_fast::io::degrade::{resize_antialias_chw, ResizeKernel};
use srsde_fast::io::image::quantize_u8;
use srsde_fast::io::{
    collect_images, encode_png, encode_png_with_text, load_hr_face, load_lr_face, load_lr_face_with,
    read_png_text, save_png, write_file, write_gif, CropMode, Partial,
};
use srsde_fast::Error;

use common::TempDir;

/// A deterministic RGB test pattern.
fn rgb_pattern(w: u32, h: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 13 + y * 7) as u8,
            (x * 3 + 400 - y) as u8,
            ((x ^ y) * 9) as u8,
        ])
    })
}

/// CHW f32 planes of an RGB image, v/255.
fn chw_of(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0.0; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for k in 0..3 {
            out[k * w * h + y as usize * w + x as usize] = p[k] as f32 / 255.0;
        }
    }
    out
}

fn err_text(e: &Error) -> String {
    e.to_string()
}

#[test]
fn a_16x16_rgb_image_is_the_lr_itself() {
    let dir = TempDir::new("lr16");
    let path = dir.path("face.png");
    let img = rgb_pattern(16, 16);
    img.save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    assert_eq!(face.size, 16);
    assert!(!face.gray);
    assert!(face.notes.is_empty(), "{:?}", face.notes);
    assert_eq!(face.pixels, chw_of(&img));
}

#[test]
fn another_square_size_is_resized_with_the_antialiased_filter_and_a_note() {
    let dir = TempDir::new("lr64");
    let path = dir.path("big.png");
    let img = rgb_pattern(64, 64);
    img.save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    assert_eq!(face.size, 16);
    assert_eq!(face.pixels.len(), 3 * 16 * 16);
    let want = resize_antialias_chw(&chw_of(&img), 3, 64, 64, 16, 16, ResizeKernel::Triangle);
    assert_eq!(face.pixels, want);
    assert!(
        face.notes
            .iter()
            .any(|n| n.contains("64×64") && n.contains("16×16")),
        "{:?}",
        face.notes
    );
}

#[test]
fn grayscale_becomes_three_equal_channels() {
    let dir = TempDir::new("gray");
    let path = dir.path("gray.png");
    let img: GrayImage = ImageBuffer::from_fn(16, 16, |x, y| Luma([(x * 16 + y) as u8]));
    img.save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    assert!(face.gray);
    let n = 256;
    for p in 0..n {
        let v = img.as_raw()[p] as f32 / 255.0;
        assert_eq!(
            [face.pixels[p], face.pixels[n + p], face.pixels[2 * n + p]],
            [v, v, v]
        );
    }
}

#[test]
fn alpha_is_dropped_with_a_note() {
    let dir = TempDir::new("rgba");
    let path = dir.path("alpha.png");
    let rgb = rgb_pattern(16, 16);
    let rgba: RgbaImage = ImageBuffer::from_fn(16, 16, |x, y| {
        let p = rgb.get_pixel(x, y);
        Rgba([p[0], p[1], p[2], (x * 10) as u8])
    });
    rgba.save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    assert_eq!(face.pixels, chw_of(&rgb));
    assert!(face.notes.iter().any(|n| n.contains("alpha")), "{:?}", face.notes);
}

#[test]
fn sixteen_bit_pngs_keep_full_precision() {
    let dir = TempDir::new("png16");
    let path = dir.path("deep.png");
    // Values that 8 bits cannot hold, including the extremes.
    let val = |x: u32, y: u32, k: u32| -> u16 { ((x * 4099 + y * 257 + k * 1013) % 65536) as u16 };
    let img: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(16, 16, |x, y| {
        Rgb([val(x, y, 0), val(x, y, 1), if x == 0 { 65535 } else { 1 }])
    });
    DynamicImage::ImageRgb16(img.clone()).save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    assert!(!face.gray);
    for (x, y, p) in img.enumerate_pixels() {
        for k in 0..3 {
            let got = face.pixels[k * 256 + y as usize * 16 + x as usize];
            assert_eq!(got, p[k] as f32 / 65535.0, "pixel ({x},{y}) channel {k}");
        }
    }

    // 16-bit grayscale too.
    let path = dir.path("deep-gray.png");
    let g: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(16, 16, |x, y| Luma([val(x, y, 2)]));
    DynamicImage::ImageLuma16(g.clone()).save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    assert!(face.gray);
    assert_eq!(face.pixels[2 * 256 + 17], g.as_raw()[17] as f32 / 65535.0);
    assert_eq!(face.pixels[17], face.pixels[256 + 17]);
}

#[test]
fn non_square_is_an_error_naming_file_and_size_unless_centre_cropped() {
    let dir = TempDir::new("nonsq");
    let path = dir.path("wide-face.png");
    let img = rgb_pattern(20, 16);
    img.save(&path).unwrap();
    let e = load_lr_face(&path, CropMode::Reject).unwrap_err();
    let msg = err_text(&e);
    assert!(matches!(e, Error::Format { .. }));
    assert!(msg.contains("wide-face.png") && msg.contains("20×16"), "{msg}");

    let face = load_lr_face(&path, CropMode::Center).unwrap();
    assert_eq!(face.size, 16);
    // Columns 2..18 of the 20 are kept.
    let cropped = image::imageops::crop_imm(&img, 2, 0, 16, 16).to_image();
    assert_eq!(face.pixels, chw_of(&cropped));
    assert!(
        face.notes.iter().any(|n| n.contains("centre-cropped")),
        "{:?}",
        face.notes
    );

    // A tall image crops rows, then is resized like any other square.
    let path = dir.path("tall.png");
    rgb_pattern(32, 48).save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Center).unwrap();
    assert_eq!((face.size, face.notes.len()), (16, 2), "{:?}", face.notes);
}

#[test]
fn undecodable_files_are_format_errors_naming_the_file() {
    let dir = TempDir::new("corrupt");
    let path = dir.path("broken.png");
    std::fs::write(&path, b"this is not an image at all").unwrap();
    let e = load_lr_face(&path, CropMode::Reject).unwrap_err();
    let msg = err_text(&e);
    assert!(matches!(e, Error::Format { .. }));
    assert!(
        msg.contains("broken.png") && msg.contains("cannot decode"),
        "{msg}"
    );

    // A PNG cut in half: right signature, broken data.
    let good = encode_png(&vec![0.5; 3 * 16 * 16], 3, 16, 16, false).unwrap();
    let path = dir.path("truncated.png");
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let msg = err_text(&load_lr_face(&path, CropMode::Reject).unwrap_err());
    assert!(
        msg.contains("truncated.png") && msg.contains("cannot decode"),
        "{msg}"
    );

    // A missing file is an I/O error naming it.
    let e = load_lr_face(&dir.path("nope.png"), CropMode::Reject).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && err_text(&e).contains("nope.png"));
}

#[test]
fn the_format_comes_from_the_content_not_the_name() {
    let dir = TempDir::new("content");
    let path = dir.path("really-a-png.jpg");
    let img = rgb_pattern(16, 16);
    img.save_with_format(&path, image::ImageFormat::Png).unwrap();
    assert_eq!(
        load_lr_face(&path, CropMode::Reject).unwrap().pixels,
        chw_of(&img)
    );

    // A real JPEG loads (lossy, so only roughly equal).
    let path = dir.path("face.jpeg");
    img.save(&path).unwrap();
    let face = load_lr_face(&path, CropMode::Reject).unwrap();
    let err = srsde_fast::check::rel_err(&face.pixels, &chw_of(&img));
    assert!(err < 0.2, "jpeg rel err {err}");
}

#[test]
fn hr_faces_are_resized_down_and_never_up() {
    let dir = TempDir::new("hr");
    let path = dir.path("hr.png");
    let img = rgb_pattern(256, 256);
    img.save(&path).unwrap();
    let face = load_hr_face(&path, 128, CropMode::Reject).unwrap();
    assert_eq!(face.size, 128);
    assert_eq!(
        face.pixels,
        resize_antialias_chw(&chw_of(&img), 3, 256, 256, 128, 128, ResizeKernel::Triangle)
    );

    let same = load_hr_face(&path, 256, CropMode::Reject).unwrap();
    assert!(same.notes.is_empty());
    assert_eq!(same.pixels, chw_of(&img));

    let msg = err_text(&load_hr_face(&path, 512, CropMode::Reject).unwrap_err());
    assert!(msg.contains("hr.png") && msg.contains("smaller"), "{msg}");
}

#[test]
fn save_png_quantises_like_torchvision_and_roundtrips() {
    assert_eq!(quantize_u8(0.5), 128); // 127.5 + 0.5
    assert_eq!(quantize_u8(-0.3), 0);
    assert_eq!(quantize_u8(1.7), 255);
    assert_eq!(quantize_u8(f32::NAN), 0);
    assert_eq!(quantize_u8(0.2 / 255.0), 0);
    assert_eq!(quantize_u8(0.6 / 255.0), 1);

    let dir = TempDir::new("save");
    let path = dir.path("out.png");
    let chw: Vec<f32> = (0..3 * 16 * 16)
        .map(|i| ((i * 31 % 300) as f32 / 270.0) - 0.05)
        .collect();
    save_png(&path, &chw, 3, 16, 16, false).unwrap();
    let back = load_lr_face(&path, CropMode::Reject).unwrap();
    let want: Vec<f32> = chw.iter().map(|&v| quantize_u8(v) as f32 / 255.0).collect();
    assert_eq!(back.pixels, want);
    assert!(!back.gray);

    // gray ⇒ one channel holding the mean.
    let path = dir.path("gray.png");
    save_png(&path, &chw, 3, 16, 16, true).unwrap();
    let decoded = image::open(&path).unwrap();
    assert_eq!(decoded.color(), image::ColorType::L8);
    let n = 256;
    let mean = (chw[5] + chw[n + 5] + chw[2 * n + 5]) / 3.0;
    assert_eq!(decoded.to_luma8().as_raw()[5], quantize_u8(mean));
    assert!(load_lr_face(&path, CropMode::Reject).unwrap().gray);

    // Shape mistakes are errors, not panics.
    assert!(save_png(&dir.path("bad.png"), &chw, 3, 16, 15, false).is_err());
}

#[test]
fn nothing_is_overwritten_without_force() {
    let dir = TempDir::new("overwrite");
    let path = dir.path("result.png");
    let first = vec![0.0f32; 3 * 4 * 4];
    let second = vec![1.0f32; 3 * 4 * 4];
    save_png(&path, &first, 3, 4, 4, false).unwrap();
    let before = std::fs::read(&path).unwrap();

    let e = save_png(&path, &second, 3, 4, 4, false).unwrap_err();
    let msg = err_text(&e);
    assert!(msg.contains("result.png") && msg.contains("--force"), "{msg}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "file changed despite the refusal"
    );

    // With force it is replaced, atomically; no temporary file is left behind either way.
    write_file(&path, &encode_png(&second, 3, 4, 4, false).unwrap(), true).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dir.files(), vec!["result.png".to_string()]);

    // A missing folder is an error naming the path, not a panic.
    let e = save_png(&dir.path("no/such/dir.png"), &first, 3, 4, 4, false).unwrap_err();
    assert!(err_text(&e).contains("dir.png"));
}

#[test]
fn collect_images_recurses_sorts_and_filters_folders() {
    let dir = TempDir::new("collect");
    let root = dir.path("faces");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    for f in [
        "b.png",
        "a.JPG",
        "notes.txt",
        "sub/c.webp",
        "sub/deeper/d.Bmp",
        "sub/e.jpeg",
        "z.png",
    ] {
        std::fs::write(root.join(f), b"x").unwrap();
    }
    let single = dir.path("single.dat");
    std::fs::write(&single, b"x").unwrap();

    let got = collect_images(&[single.clone(), root.clone()]).unwrap();
    let rel: Vec<String> = got
        .iter()
        .map(|p| {
            p.strip_prefix(&dir.0)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert_eq!(
        rel,
        [
            "single.dat", // named file: taken whatever its extension, first as given
            "faces/a.JPG",
            "faces/b.png",
            "faces/sub/c.webp",
            "faces/sub/deeper/d.Bmp",
            "faces/sub/e.jpeg",
            "faces/z.png",
        ]
    );

    let missing = dir.path("not-here");
    let e = collect_images(&[root, missing]).unwrap_err();
    assert!(err_text(&e).contains("not-here"), "{e}");
}

#[test]
fn write_gif_makes_a_looping_animation() {
    use image::AnimationDecoder;
    let dir = TempDir::new("gif");
    let path = dir.path("trajectory.gif");
    let (h, w) = (8, 12);
    // Frames fade from black to a colour; the last one is red-ish.
    let frames: Vec<(Vec<f32>, usize, usize)> = (0..5)
        .map(|t| {
            let a = t as f32 / 4.0;
            let mut chw = vec![0.0; 3 * h * w];
            chw[..h * w].fill(a);
            chw[h * w..2 * h * w].fill(0.2 * a);
            (chw, h, w)
        })
        .collect();
    write_gif(&path, &frames, 120).unwrap();
    let dec =
        image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()))
            .unwrap();
    let decoded: Vec<image::Frame> = dec.into_frames().collect::<Result<_, _>>().unwrap();
    assert_eq!(decoded.len(), 5);
    assert_eq!(decoded[0].delay().numer_denom_ms(), (120, 1));
    let last = decoded[4].buffer();
    assert_eq!((last.width(), last.height()), (w as u32, h as u32));
    let p = last.get_pixel(3, 3);
    assert!(p[0] >= 250 && (45..=56).contains(&p[1]) && p[2] <= 4, "{p:?}");

    assert!(
        write_gif(&path, &frames, 120).is_err(),
        "overwrote an existing gif"
    );
    let mixed = vec![frames[0].clone(), (vec![0.0; 3 * 4 * 4], 4, 4)];
    assert!(write_gif(&dir.path("mixed.gif"), &mixed, 100).is_err());
    assert!(write_gif(&dir.path("empty.gif"), &[], 100).is_err());
}

/// Pseudo-random bytes (they do not compress, so a cut file keeps a proportional part of its rows).
fn noise_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect()
}

#[test]
fn truncated_images_are_refused_by_name_unless_accepted() {
    let dir = TempDir::new("partial");

    // A JPEG cut short: the lenient decoder would render it with a grey lower part.
    let jpg = dir.path("face.jpg");
    rgb_pattern(64, 64).save(&jpg).unwrap();
    let whole = load_lr_face(&jpg, CropMode::Reject).unwrap();
    assert!(whole.partial.is_none());
    let bytes = std::fs::read(&jpg).unwrap();
    let cut = dir.path("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let e = load_lr_face(&cut, CropMode::Reject).unwrap_err();
    let msg = err_text(&e);
    assert!(matches!(e, Error::Format { .. }));
    assert!(
        msg.contains("cut.jpg")
            && msg.contains("truncated or corrupt JPEG")
            && msg.contains("--accept-truncated"),
        "{msg}"
    );
    assert!(
        load_hr_face(&cut, 64, CropMode::Reject).is_err(),
        "HR faces are never partial"
    );
    let face = load_lr_face_with(&cut, CropMode::Reject, Partial::Accept).unwrap();
    assert!(face.partial.as_deref().unwrap().contains("JPEG"));
    assert!(
        face.notes.iter().any(|n| n.contains("decodes only in part")),
        "{:?}",
        face.notes
    );

    // A PNG cut in its image data: the first rows decode, the rest is missing.
    let raw = noise_bytes(16 * 16 * 3, 7);
    let img = RgbImage::from_raw(16, 16, raw.clone()).unwrap();
    let png = dir.path("whole.png");
    img.save(&png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    let cut = dir.path("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let msg = err_text(&load_lr_face(&cut, CropMode::Reject).unwrap_err());
    assert!(
        msg.contains("cut.png") && msg.contains("truncated or corrupt PNG") && msg.contains("rows decode"),
        "{msg}"
    );
    let face = load_lr_face_with(&cut, CropMode::Reject, Partial::Accept).unwrap();
    assert!(face.partial.as_deref().unwrap().contains("of its 16 rows"));
    // The top row is the file's, the bottom row is grey.
    let plane = 16 * 16;
    for x in 0..16 {
        for k in 0..3 {
            assert_eq!(face.pixels[k * plane + x], raw[x * 3 + k] as f32 / 255.0);
            assert_eq!(face.pixels[k * plane + 15 * 16 + x], 128.0 / 255.0);
        }
    }
}

#[test]
fn png_text_chunks_round_trip_and_the_encoding_is_deterministic() {
    let chw: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 17) as f32 / 16.0).collect();
    let text = r#"{"note":"σ_max ≥ 1, ünïcode"}"#;
    let a = encode_png_with_text(&chw, 3, 8, 8, false, &[("srsde-fast", text)]).unwrap();
    let b = encode_png_with_text(&chw, 3, 8, 8, false, &[("srsde-fast", text)]).unwrap();
    assert_eq!(a, b, "same pixels and text, same bytes");
    assert_eq!(
        read_png_text(&a, "srsde-fast", "a.png").unwrap().as_deref(),
        Some(text)
    );
    assert_eq!(read_png_text(&a, "other", "a.png").unwrap(), None);
    // The pixels are those encode_png writes.
    let plain = image::load_from_memory(&encode_png(&chw, 3, 8, 8, false).unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&a).unwrap().to_rgb8(), plain.to_rgb8());
    // A different text, different bytes; gray stays one channel.
    let c = encode_png_with_text(&chw, 3, 8, 8, false, &[("srsde-fast", "{}")]).unwrap();
    assert_ne!(a, c);
    let g = encode_png_with_text(&vec![0.25; 64], 1, 8, 8, true, &[]).unwrap();
    assert_eq!(image::load_from_memory(&g).unwrap().color(), image::ColorType::L8);
}
