//! The dlib ResNet face descriptor port against ../shared/golden/face_embed.safetensors
//! (real dlib descriptors, an independent numpy port of the same weights, dlib's own chips).
mod common;

use std::sync::OnceLock;

use common::Golden;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::check::rel_err;
use srsde_fast::eval::face::{cosine, face_chip, l2, Descriptor, FaceNet, FaceWeights, CHIP_SIZE};
use srsde_fast::eval::metrics::ImageU8;
use srsde_fast::io::degrade::make_lr;

const CHIPS: usize = 12;

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| Golden::load("face_embed.safetensors"))
}

fn net() -> &'static FaceNet<CpuF32> {
    static NET: OnceLock<FaceNet<CpuF32>> = OnceLock::new();
    NET.get_or_init(|| FaceNet::embedded(&CpuF32::new()).expect("face net"))
}

/// Our descriptors of the 12 golden chips (computed once).
fn ours() -> &'static Vec<Descriptor> {
    static D: OnceLock<Vec<Descriptor>> = OnceLock::new();
    D.get_or_init(|| {
        net()
            .descriptors(&(0..CHIPS).map(chip).collect::<Vec<_>>())
            .unwrap()
    })
}

fn u8_slice(name: &str, i: usize, h: usize, w: usize) -> ImageU8 {
    let (shape, v) = golden().get(name);
    assert_eq!(&shape[1..], &[h, w, 3], "{name}");
    let per = h * w * 3;
    ImageU8::new(h, w, 3, v[i * per..][..per].iter().map(|&x| x as u8).collect()).unwrap()
}

fn chip(i: usize) -> ImageU8 {
    u8_slice("chips", i, CHIP_SIZE, CHIP_SIZE)
}

fn frame(i: usize) -> ImageU8 {
    u8_slice("frames128", i, 128, 128)
}

fn descriptor_rows(name: &str) -> Vec<Descriptor> {
    let (shape, v) = golden().get(name);
    assert_eq!(shape, &[CHIPS, 128]);
    v.chunks_exact(128)
        .map(|r| {
            let mut d = [0.0f32; 128];
            d.iter_mut().zip(r).for_each(|(a, &b)| *a = b as f32);
            d
        })
        .collect()
}

fn ints(name: &str) -> Vec<i64> {
    golden().get(name).1.iter().map(|&v| v as i64).collect()
}

#[test]
fn weights_load_exactly() {
    let g = golden();
    let w = FaceWeights::embedded().unwrap();
    let names: Vec<String> = serde_json::from_str(&g.metadata["weight_names"]).unwrap();
    let (first4, sums) = (&g.get("weight_first4").1, &g.get("weight_sums").1);
    assert_eq!(w.len(), names.len());
    let mut worst_sum = 0.0f64;
    for (k, ((name, t), want)) in w.iter().zip(&names).enumerate() {
        assert_eq!(name, want, "tensor {k} out of manifest order");
        // TF.js rounds q·scale + min once to f32; values that cancel to ~0 may differ by 1e-16.
        for (j, &v) in t.data.iter().take(4).enumerate() {
            let want = first4[k * 4 + j];
            assert!(
                (v as f64 - want).abs() <= 1e-7 * want.abs() + 1e-12,
                "{name}[{j}]: {v} vs {want}"
            );
        }
        let s: f64 = t.data.iter().map(|&v| v as f64).sum();
        let rel = (s - sums[k]).abs() / sums[k].abs().max(1e-30);
        worst_sum = worst_sum.max(rel);
        assert!(rel < 1e-9, "{name}: sum {s} vs {}", sums[k]);
    }
    // The copy in the repository is the one the golden file was made from.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/face_recognition");
    let from_disk = FaceWeights::load_dir(&dir).unwrap();
    assert!(from_disk.iter().zip(w.iter()).all(|(a, b)| a == b));
    eprintln!("weights: first-4 values match, worst relative sum error {worst_sum:.1e}");
}

#[test]
fn activations_of_chip0_match_the_numpy_trace() {
    let g = golden();
    let (d, trace) = net().trace(&chip(0)).unwrap();
    assert_eq!(trace.len(), 17);
    for (name, t) in &trace {
        let want = g.host(&format!("trace_chip0/{name}"));
        // ours NCHW [1,C,H,W] (or [1,C] for avgpool); golden HWC
        let ours_hwc: Vec<f32> = if t.shape.len() == 4 {
            let (c, h, w) = (t.shape[1], t.shape[2], t.shape[3]);
            assert_eq!(want.shape, vec![h, w, c], "{name}");
            (0..h * w * c).map(|i| t.data[(i % c) * h * w + i / c]).collect()
        } else {
            assert_eq!(want.shape, vec![t.shape[1]], "{name}");
            t.data.clone()
        };
        let e = rel_err(&ours_hwc, &want.data);
        eprintln!("{name:>17}: rel err {e:.2e}");
        assert!(e < 1e-4, "{name}: rel err {e}");
    }
    // Batch size changes only the summation order.
    let batched = &ours()[0];
    let diff = d
        .iter()
        .zip(batched)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "trace and batched forward differ by {diff}");
}

#[test]
fn descriptors_match_the_numpy_port() {
    let want = descriptor_rows("descriptors_faceapi_numpy");
    let (mut worst_abs, mut worst_cos) = (0.0f64, 1.0f64);
    for (i, (a, b)) in ours().iter().zip(&want).enumerate() {
        let dmax = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        let c = cosine(a, b);
        worst_abs = worst_abs.max(dmax);
        worst_cos = worst_cos.min(c);
        assert!(dmax <= 1e-4, "chip {i}: max |Δ| {dmax}");
        assert!(c >= 0.99999, "chip {i}: cosine {c}");
    }
    eprintln!("vs numpy: worst max|Δ| {worst_abs:.2e}, worst cosine {worst_cos:.8}");
}

#[test]
fn descriptors_match_real_dlib() {
    let want = descriptor_rows("descriptors_dlib");
    let ref_cos = &golden().get("cos_dlib_vs_numpy").1;
    for (i, (a, b)) in ours().iter().zip(&want).enumerate() {
        let (c, d) = (cosine(a, b), l2(a, b));
        eprintln!(
            "chip {i:>2}: cos vs dlib {c:.5} (numpy port {:.5}), L2 {d:.4}",
            ref_cos[i]
        );
        assert!(c >= 0.999, "chip {i}: cosine vs dlib {c}");
        assert!(d <= 0.06, "chip {i}: L2 vs dlib {d}");
    }
}

#[test]
fn a_channel_swap_would_be_caught() {
    // The 0.999 bound is meaningful: feeding BGR instead of RGB falls below it on some chip.
    let want = descriptor_rows("descriptors_dlib");
    let bgr: Vec<ImageU8> = (0..CHIPS)
        .map(|i| {
            let mut c = chip(i);
            c.data.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
            c
        })
        .collect();
    let d = net().descriptors(&bgr).unwrap();
    let worst = d.iter().zip(&want).map(|(a, b)| cosine(a, b)).fold(1.0, f64::min);
    eprintln!("BGR input: worst cosine vs dlib {worst:.4}");
    assert!(worst < 0.999, "a BGR input still scores {worst}");
}

#[test]
fn fixed_box_chips_reproduce_dlib_extract_image_chip() {
    let frame_index = ints("frame_index");
    let (mut exact, mut total) = (0usize, 0usize);
    for i in [1, 3, 6, 8, 10] {
        let ours = face_chip(&frame(frame_index[i] as usize)).unwrap();
        let want = chip(i);
        for (&a, &b) in ours.data.iter().zip(&want.data) {
            assert!((a as i32 - b as i32).abs() <= 1, "chip {i}: {a} vs {b}");
            exact += (a == b) as usize;
            total += 1;
        }
    }
    let frac = exact as f64 / total as f64;
    eprintln!("crop: {:.3}% of values exact", 100.0 * frac);
    // Truncation gives ≥ 99.8 % exact; rounding would leave about half off by one.
    assert!(frac >= 0.995, "only {frac} exact");
}

#[test]
fn degraded_chips_follow_the_papers_lr_pipeline() {
    // Variant 1: frame → 16×16 antialiased bilinear → 128 bicubic (float) → u8 → fixed box.
    let frame_index = ints("frame_index");
    let (mut exact, mut total) = (0usize, 0usize);
    for i in [2, 4, 7, 9, 11] {
        let f = frame(frame_index[i] as usize);
        let hwc: Vec<f32> = f.data.iter().map(|&v| v as f32 / 255.0).collect();
        let (_, up) = make_lr(&hwc, 128, 128);
        let degraded = ImageU8::from_hwc_f32(128, 128, 3, &up).unwrap();
        let ours = face_chip(&degraded).unwrap();
        for (&a, &b) in ours.data.iter().zip(&chip(i).data) {
            assert!((a as i32 - b as i32).abs() <= 1, "chip {i}: {a} vs {b}");
            exact += (a == b) as usize;
            total += 1;
        }
    }
    eprintln!(
        "degraded crop: {:.3}% of values exact",
        100.0 * exact as f64 / total as f64
    );
    assert!(exact as f64 >= 0.99 * total as f64);
}

#[test]
fn identity_sensitivity() {
    let d = ours();
    let cos = |a: usize, b: usize| cosine(&d[a], &d[b]);

    // CS of a face with itself is 1, through the whole frame → chip → descriptor path.
    let same = net().compare_frames(&frame(1), &frame(1)).unwrap();
    assert!((same.cosine - 1.0).abs() < 1e-6 && same.l2 == 0.0, "{same:?}");

    // (HR chip, degraded chip) per identity, and the dlib-aligned chip where there is one.
    let hr_lr = [(1, 2), (3, 4), (6, 7), (8, 9), (10, 11)];
    let dlib_vs_box = [(0, 1), (5, 3)];
    for (id, &(hr, lr)) in hr_lr.iter().enumerate() {
        let c = cos(hr, lr);
        eprintln!(
            "identity {id}: cos(HR, degraded) {c:.4}, L2 {:.3}",
            l2(&d[hr], &d[lr])
        );
        assert!(c < 0.95, "identity {id}: degraded face still scores {c}");
        let nearest_other = (0..hr_lr.len())
            .filter(|&o| o != id)
            .map(|o| cos(hr, hr_lr[o].0))
            .fold(-1.0, f64::max);
        eprintln!("             closest other HR face {nearest_other:.4}");
        // Every other person's HR face scores lower than this person's degraded face (real dlib:
        // different faces 0.74–0.89, same face degraded 0.89–0.92).
        for (other, &(hr2, _)) in hr_lr.iter().enumerate() {
            if other != id {
                let c2 = cos(hr, hr2);
                assert!(
                    c2 < c,
                    "identity {id} vs {other}: different face {c2} ≥ same degraded {c}"
                );
            }
        }
    }
    for (id, &(aligned, boxed)) in dlib_vs_box.iter().enumerate() {
        let c = cos(aligned, boxed);
        let (hr, lr) = hr_lr[id];
        eprintln!("identity {id}: cos(dlib chip, fixed box) {c:.4}");
        assert!(
            c >= 0.99 && c > cos(hr, lr),
            "identity {id}: {c} vs {}",
            cos(hr, lr)
        );
    }
}

/// Deterministic synthetic chips (smooth gradients plus hashed noise): enough to compare backends
/// without the golden file, so this check also runs on a GPU host without ../shared.
fn synthetic_chips(n: usize) -> Vec<ImageU8> {
    (0..n)
        .map(|k| {
            let data = (0..CHIP_SIZE * CHIP_SIZE * 3)
                .map(|i| {
                    let (p, c) = (i / 3, i % 3);
                    let (y, x) = (p / CHIP_SIZE, p % CHIP_SIZE);
                    let h = (i as u32 ^ (k as u32).wrapping_mul(0x9E37_79B9)).wrapping_mul(0x85EB_CA6B) >> 27;
                    ((x * (k + 1) + y * (c + 2) + 40 * c) % 200 + h as usize) as u8
                })
                .collect();
            ImageU8::new(CHIP_SIZE, CHIP_SIZE, 3, data).unwrap()
        })
        .collect()
}

#[test]
fn cuda_descriptors_match_cpu() {
    use srsde_fast::backend::cuda::{self, Cuda, Precision};
    if !cuda::cuda_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let chips = synthetic_chips(20); // more than one batch of 16
    let cpu = net().descriptors(&chips).unwrap();
    let dev = Cuda::new(0).expect("CUDA device present");
    for (precision, min_cos, max_abs) in [(Precision::F32, 0.99999, 1e-4), (Precision::Tf32, 0.9999, 2e-3)] {
        let gpu_net = FaceNet::embedded(&dev.with_precision(precision)).unwrap();
        let t0 = std::time::Instant::now();
        let gpu = gpu_net.descriptors(&chips).unwrap();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let worst_cos = cpu
            .iter()
            .zip(&gpu)
            .map(|(a, b)| cosine(a, b))
            .fold(1.0, f64::min);
        let worst_abs = cpu
            .iter()
            .zip(&gpu)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
            .fold(0.0, f64::max);
        println!(
            "{precision:?}: {} chips in {ms:.1} ms, worst cosine {worst_cos:.7}, max |Δ| {worst_abs:.2e}",
            chips.len()
        );
        assert!(
            worst_cos >= min_cos && worst_abs <= max_abs,
            "{precision:?}: {worst_cos} / {worst_abs}"
        );
    }
}
