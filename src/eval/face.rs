//! The identity descriptor behind the CS metric: dlib's ResNet face descriptor
//! (`dlib_face_recognition_resnet_model_v1`, Davis King; 29 convolutions, 128-d output), run on our
//! engine from the uint8-quantised TF.js copy of its weights shipped by face-api.
//!
//! The full specification is `assets/face_recognition/SPEC.md`; in short:
//! - a face *chip* is a 150×150 RGB crop; for the engine's aligned 128×128 frames it is cut from a
//!   fixed box (no detector), see [`face_chip`];
//! - the input is `(pixel − mean_rgb) / 255`;
//! - the network is a 7×7/2 stem + 3×3/2 max-pool, then residual blocks (see [`BLOCKS`]), a global
//!   mean and a 256→128 matrix; the output is *not* normalised (norms ≈ 1.4);
//! - CS is the cosine of two descriptors; dlib's own same-person rule is an L2 distance below 0.6.
//!
//! Weights: the manifest + `.bin` in `assets/face_recognition/` (6.4 MB) are embedded in the
//! library with `include_bytes!` ([`FaceWeights::embedded`]), so the binary needs no data files;
//! [`FaceWeights::load_dir`] reads another copy from disk.
//!
//! Engine mapping: convolutions, residual adds, the shortcut's 2×2 average pool and zero padding
//! (both as `upfirdn2d`), channel padding (`concat_channels` with zeros), the spatial sum and the
//! final matrix run as [`Backend`] ops. The per-channel "scale" layers are folded into the
//! preceding convolution at load time (w·s, b·s + t), so they cost nothing. ReLU and the stem's
//! 3×3 max-pool have no `Backend` op yet and run on the host (a download and an upload each,
//! negligible for a network this small).
use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::metrics::ImageU8;
use crate::backend::{Backend, Fir, UpFirDn};
use crate::error::{Error, Result};
use crate::tensor::{HostTensor, Tensor};

/// Side of a face chip, the network's only input size.
pub const CHIP_SIZE: usize = 150;
/// Length of a descriptor.
pub const DESCRIPTOR_LEN: usize = 128;
/// A face descriptor (raw network output, not normalised).
pub type Descriptor = [f32; DESCRIPTOR_LEN];

/// Per-channel means subtracted from the 0–255 RGB input (dlib's and face-api's values).
const MEAN_RGB: [f32; 3] = [122.782, 117.001, 104.298];
/// face-api divides by 255 (dlib by 256; the descriptors agree to ~1e-5 in cosine either way).
const INPUT_DIVISOR: f32 = 255.0;
/// Chips per forward pass in [`FaceNet::descriptors`] (bounds the activation memory).
const BATCH: usize = 16;

const MANIFEST_FILE: &str = "face_recognition_model-weights_manifest.json";
const BIN_FILE: &str = "face_recognition_model.bin";
static EMBEDDED_MANIFEST: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/face_recognition/face_recognition_model-weights_manifest.json"
));
static EMBEDDED_BIN: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/face_recognition/face_recognition_model.bin"
));

// ---- face chips -------------------------------------------------------------------------------

/// A square crop in pixel-centre coordinates (pixel column x has its centre at x).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChipBox {
    pub left: f64,
    pub top: f64,
    pub right: f64,
    pub bottom: f64,
}

/// The box dlib's 5-point alignment (padding 0.25) gives on average for FFHQ / CelebA-HQ aligned
/// 128×128 frames (SPEC.md §5.2–5.3): (L, T, R, B) = (20, 33, 108, 121).
pub const FIXED_BOX_128: ChipBox = ChipBox {
    left: 20.0,
    top: 33.0,
    right: 108.0,
    bottom: 121.0,
};

impl ChipBox {
    /// The same box in a `height × width` frame (the 128 box scaled about pixel edges:
    /// x_S = (x₁₂₈ + 0.5)·S/128 − 0.5).
    pub fn for_frame(&self, height: usize, width: usize) -> ChipBox {
        let sx = |v: f64| (v + 0.5) * width as f64 / 128.0 - 0.5;
        let sy = |v: f64| (v + 0.5) * height as f64 / 128.0 - 0.5;
        ChipBox {
            left: sx(self.left),
            top: sy(self.top),
            right: sx(self.right),
            bottom: sy(self.bottom),
        }
    }
}

/// The 150×150 RGB chip of `frame` inside `b`, exactly as dlib's `extract_image_chip` with an
/// unrotated `chip_details(rect, chip_dims(150, 150))`: chip pixel (i, j) is the bilinear sample at
/// x = L + j·(R−L)/149, y = T + i·(B−T)/149 (corners on the box corners), truncated to u8; a
/// sample whose 2×2 neighbourhood leaves the frame is black. Gray frames are replicated to RGB.
pub fn extract_chip(frame: &ImageU8, b: ChipBox) -> Result<ImageU8> {
    let (h, w, c) = (frame.height, frame.width, frame.channels);
    if c != 1 && c != 3 {
        return Err(Error::shape(
            "face chip",
            format!("{c} channels; expected 1 or 3"),
        ));
    }
    if ![b.left, b.top, b.right, b.bottom].iter().all(|v| v.is_finite()) {
        return Err(Error::Config(format!("face chip box {b:?} is not finite")));
    }
    let step_x = (b.right - b.left) / (CHIP_SIZE - 1) as f64;
    let step_y = (b.bottom - b.top) / (CHIP_SIZE - 1) as f64;
    let px = |y: usize, x: usize, k: usize| frame.data[(y * w + x) * c + if c == 1 { 0 } else { k }] as f64;
    let mut out = vec![0u8; CHIP_SIZE * CHIP_SIZE * 3];
    for (i, row) in out.chunks_exact_mut(CHIP_SIZE * 3).enumerate() {
        let y = b.top + i as f64 * step_y;
        let y0 = y.floor();
        for (j, pixel) in row.chunks_exact_mut(3).enumerate() {
            let x = b.left + j as f64 * step_x;
            let x0 = x.floor();
            if x0 < 0.0 || y0 < 0.0 || x0 + 1.0 >= w as f64 || y0 + 1.0 >= h as f64 {
                continue; // outside: left black, as dlib does
            }
            let (fx, fy) = (x - x0, y - y0);
            let (xi, yi) = (x0 as usize, y0 as usize);
            for (k, v) in pixel.iter_mut().enumerate() {
                let top = (1.0 - fx) * px(yi, xi, k) + fx * px(yi, xi + 1, k);
                let bottom = (1.0 - fx) * px(yi + 1, xi, k) + fx * px(yi + 1, xi + 1, k);
                // dlib assigns the double to u8 by truncation.
                *v = ((1.0 - fy) * top + fy * bottom).clamp(0.0, 255.0) as u8;
            }
        }
    }
    ImageU8::new(CHIP_SIZE, CHIP_SIZE, 3, out)
}

/// The chip of an aligned face frame (FFHQ / CelebA-HQ alignment, any size): [`FIXED_BOX_128`]
/// scaled to the frame. Use the same call for the SR output and its ground truth.
pub fn face_chip(frame: &ImageU8) -> Result<ImageU8> {
    extract_chip(frame, FIXED_BOX_128.for_frame(frame.height, frame.width))
}

// ---- weights ----------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ManifestGroup {
    paths: Vec<String>,
    weights: Vec<ManifestEntry>,
}

#[derive(Deserialize)]
struct ManifestEntry {
    name: String,
    shape: Vec<usize>,
    dtype: String,
    quantization: Option<Quantization>,
}

#[derive(Deserialize)]
struct Quantization {
    dtype: String,
    scale: f64,
    min: f64,
}

/// The 117 dequantised tensors of the TF.js weight files, in manifest order, shapes as stored
/// (conv filters HWIO, `fc` [256, 128] input-major).
pub struct FaceWeights {
    tensors: Vec<(String, HostTensor)>,
    index: HashMap<String, usize>,
}

impl FaceWeights {
    /// Parse a TF.js weights manifest (one group, one shard) and its shard. Quantised tensors are
    /// dequantised as TF.js does: `(q·scale + min)` in f64, rounded once to f32.
    pub fn parse(manifest_json: &str, bin: &[u8], origin: &str) -> Result<FaceWeights> {
        let groups: Vec<ManifestGroup> = serde_json::from_str(manifest_json)
            .map_err(|e| Error::format(origin, format!("weights manifest: {e}")))?;
        let [group] = &groups[..] else {
            return Err(Error::format(
                origin,
                format!("{} weight groups; expected 1", groups.len()),
            ));
        };
        if group.paths.len() != 1 {
            return Err(Error::format(
                origin,
                format!("{} shards; expected 1", group.paths.len()),
            ));
        }
        let mut offset = 0usize;
        let mut tensors = Vec::with_capacity(group.weights.len());
        let mut index = HashMap::new();
        for e in &group.weights {
            let err = |msg: String| Error::Weights {
                file: origin.to_string(),
                tensor: e.name.clone(),
                msg,
            };
            if e.dtype != "float32" {
                return Err(err(format!("dtype {}; expected float32", e.dtype)));
            }
            let n: usize = e.shape.iter().product();
            let width = match &e.quantization {
                None => 4,
                Some(q) if q.dtype == "uint8" => 1,
                Some(q) => return Err(err(format!("quantisation {}; expected uint8", q.dtype))),
            };
            let bytes = bin.get(offset..offset + n * width).ok_or_else(|| {
                err(format!(
                    "needs bytes {offset}..{} of {}",
                    offset + n * width,
                    bin.len()
                ))
            })?;
            offset += n * width;
            let data: Vec<f32> = match &e.quantization {
                Some(q) => bytes
                    .iter()
                    .map(|&v| (v as f64 * q.scale + q.min) as f32)
                    .collect(),
                None => bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            };
            if index.insert(e.name.clone(), tensors.len()).is_some() {
                return Err(err("appears twice".into()));
            }
            tensors.push((e.name.clone(), HostTensor::new(e.shape.clone(), data)));
        }
        if offset != bin.len() {
            return Err(Error::format(
                origin,
                format!(
                    "the manifest describes {offset} bytes, the shard holds {}",
                    bin.len()
                ),
            ));
        }
        Ok(FaceWeights { tensors, index })
    }

    /// The weights compiled into the library (`assets/face_recognition/`).
    pub fn embedded() -> Result<FaceWeights> {
        Self::parse(
            EMBEDDED_MANIFEST,
            EMBEDDED_BIN,
            "embedded face_recognition weights",
        )
    }

    /// Read `face_recognition_model-weights_manifest.json` and `face_recognition_model.bin` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<FaceWeights> {
        let mpath = dir.join(MANIFEST_FILE);
        let manifest = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let bpath = dir.join(BIN_FILE);
        let bin = std::fs::read(&bpath).map_err(|e| Error::io(&bpath, e))?;
        Self::parse(&manifest, &bin, &bpath.display().to_string())
    }

    /// Tensors in manifest (= file) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    fn require(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let t = self.get(name).ok_or_else(|| Error::Weights {
            file: "face_recognition".into(),
            tensor: name.into(),
            msg: "missing".into(),
        })?;
        if t.shape != shape {
            return Err(Error::Weights {
                file: "face_recognition".into(),
                tensor: name.into(),
                msg: format!("shape {:?}; expected {shape:?}", t.shape),
            });
        }
        Ok(t)
    }
}

// ---- network ----------------------------------------------------------------------------------

/// Residual block kinds of the network (SPEC.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// conv3×3 → ReLU → conv3×3, plus the input, ReLU.
    Residual,
    /// conv3×3/2 (valid) → ReLU → conv3×3, plus the 2×2 average-pooled input zero-padded to the
    /// larger shape (dlib's `add_prev`), ReLU.
    Down,
}

/// The blocks after the stem: (weights prefix, kind, input channels, output channels).
pub const BLOCKS: [(&str, BlockKind, usize, usize); 14] = [
    ("conv32_1", BlockKind::Residual, 32, 32),
    ("conv32_2", BlockKind::Residual, 32, 32),
    ("conv32_3", BlockKind::Residual, 32, 32),
    ("conv64_down", BlockKind::Down, 32, 64),
    ("conv64_1", BlockKind::Residual, 64, 64),
    ("conv64_2", BlockKind::Residual, 64, 64),
    ("conv64_3", BlockKind::Residual, 64, 64),
    ("conv128_down", BlockKind::Down, 64, 128),
    ("conv128_1", BlockKind::Residual, 128, 128),
    ("conv128_2", BlockKind::Residual, 128, 128),
    ("conv256_down", BlockKind::Down, 128, 256),
    ("conv256_1", BlockKind::Residual, 256, 256),
    ("conv256_2", BlockKind::Residual, 256, 256),
    ("conv256_down_out", BlockKind::Down, 256, 256),
];

/// conv + bias with the following per-channel scale folded in: OIHW weights, bias [O].
struct ConvUnit<B: Backend> {
    w: Tensor<B>,
    b: Tensor<B>,
    stride: usize,
    pad: usize,
}

impl<B: Backend> ConvUnit<B> {
    /// Load `<prefix>/conv/{filters,bias}` and `<prefix>/scale/{weights,biases}` and fold
    /// y = (conv(x, W) + b)·s + t into conv(x, W·s) + (b·s + t), in f64, rounded once.
    fn load(
        backend: &B,
        wt: &FaceWeights,
        prefix: &str,
        (k, cin, cout): (usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let filters = wt.require(&format!("{prefix}/conv/filters"), &[k, k, cin, cout])?;
        let bias = wt.require(&format!("{prefix}/conv/bias"), &[cout])?;
        let scale = wt.require(&format!("{prefix}/scale/weights"), &[cout])?;
        let shift = wt.require(&format!("{prefix}/scale/biases"), &[cout])?;
        let mut w = vec![0.0f32; cout * cin * k * k];
        // HWIO [ky][kx][ci][co] → OIHW [co][ci][ky][kx]
        for ky in 0..k {
            for kx in 0..k {
                for ci in 0..cin {
                    for co in 0..cout {
                        let v = filters.data[((ky * k + kx) * cin + ci) * cout + co] as f64;
                        w[((co * cin + ci) * k + ky) * k + kx] = (v * scale.data[co] as f64) as f32;
                    }
                }
            }
        }
        let b: Vec<f32> = (0..cout)
            .map(|o| (bias.data[o] as f64 * scale.data[o] as f64 + shift.data[o] as f64) as f32)
            .collect();
        Ok(ConvUnit {
            w: backend.from_f32(&[cout, cin, k, k], &w)?,
            b: backend.from_f32(&[cout], &b)?,
            stride,
            pad,
        })
    }

    fn forward(&self, backend: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        backend.conv2d(x, &self.w, Some(&self.b), self.stride, self.pad)
    }
}

struct Block<B: Backend> {
    name: &'static str,
    kind: BlockKind,
    conv1: ConvUnit<B>,
    conv2: ConvUnit<B>,
    /// Zero channels appended to the pooled shortcut of a widening down block.
    extra_channels: usize,
}

/// The dlib ResNet descriptor network on a backend.
pub struct FaceNet<B: Backend> {
    backend: B,
    stem: ConvUnit<B>,
    blocks: Vec<Block<B>>,
    /// `fc` transposed to the `linear` layout [128, 256].
    fc: Tensor<B>,
}

/// Named intermediate activations of one forward pass (NCHW host tensors): `conv32_down`,
/// `maxpool`, every block name of [`BLOCKS`], and `avgpool` ([N, 256]).
pub type Trace = Vec<(&'static str, HostTensor)>;

impl<B: Backend> FaceNet<B> {
    /// Build the network from dequantised weights (shapes are checked).
    pub fn new(backend: &B, weights: &FaceWeights) -> Result<Self> {
        let stem = ConvUnit::load(backend, weights, "conv32_down", (7, 3, 32), 2, 0)?;
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        for &(name, kind, cin, cout) in &BLOCKS {
            let (stride, pad) = match kind {
                BlockKind::Residual => (1, 1),
                BlockKind::Down => (2, 0),
            };
            blocks.push(Block {
                name,
                kind,
                conv1: ConvUnit::load(
                    backend,
                    weights,
                    &format!("{name}/conv1"),
                    (3, cin, cout),
                    stride,
                    pad,
                )?,
                conv2: ConvUnit::load(backend, weights, &format!("{name}/conv2"), (3, cout, cout), 1, 1)?,
                extra_channels: cout - cin,
            });
        }
        let fc = weights.require("fc", &[256, DESCRIPTOR_LEN])?;
        let mut fc_t = vec![0.0f32; fc.data.len()];
        for i in 0..256 {
            for j in 0..DESCRIPTOR_LEN {
                fc_t[j * 256 + i] = fc.data[i * DESCRIPTOR_LEN + j];
            }
        }
        Ok(FaceNet {
            backend: backend.clone(),
            stem,
            blocks,
            fc: backend.from_f32(&[DESCRIPTOR_LEN, 256], &fc_t)?,
        })
    }

    /// The network with the embedded weights.
    pub fn embedded(backend: &B) -> Result<Self> {
        Self::new(backend, &FaceWeights::embedded()?)
    }

    /// Descriptor of one 150×150 RGB chip.
    pub fn descriptor(&self, chip: &ImageU8) -> Result<Descriptor> {
        Ok(self.descriptors(std::slice::from_ref(chip))?[0])
    }

    /// Descriptors of several chips (run in batches).
    pub fn descriptors(&self, chips: &[ImageU8]) -> Result<Vec<Descriptor>> {
        let mut out = Vec::with_capacity(chips.len());
        for batch in chips.chunks(BATCH) {
            let y = self.forward(&self.input(batch)?, None)?;
            let v = self.backend.to_f32(&y)?;
            out.extend(v.chunks_exact(DESCRIPTOR_LEN).map(|d| {
                let mut a = [0.0f32; DESCRIPTOR_LEN];
                a.copy_from_slice(d);
                a
            }));
        }
        Ok(out)
    }

    /// Descriptor of one chip plus every block's output, for layer-by-layer debugging.
    pub fn trace(&self, chip: &ImageU8) -> Result<(Descriptor, Trace)> {
        let mut trace = Vec::new();
        let y = self.forward(&self.input(std::slice::from_ref(chip))?, Some(&mut trace))?;
        let mut d = [0.0f32; DESCRIPTOR_LEN];
        d.copy_from_slice(&self.backend.to_f32(&y)?);
        Ok((d, trace))
    }

    /// CS and L2 between the identities of two aligned face frames (e.g. SR output and ground
    /// truth), both cut with [`face_chip`].
    pub fn compare_frames(&self, a: &ImageU8, b: &ImageU8) -> Result<FaceComparison> {
        let d = self.descriptors(&[face_chip(a)?, face_chip(b)?])?;
        Ok(FaceComparison {
            cosine: cosine(&d[0], &d[1]),
            l2: l2(&d[0], &d[1]),
        })
    }

    /// Normalised NCHW input: (pixel − mean) / 255 per channel.
    fn input(&self, chips: &[ImageU8]) -> Result<Tensor<B>> {
        let plane = CHIP_SIZE * CHIP_SIZE;
        let mut x = vec![0.0f32; chips.len() * 3 * plane];
        for (chip, dst) in chips.iter().zip(x.chunks_exact_mut(3 * plane)) {
            if (chip.height, chip.width, chip.channels) != (CHIP_SIZE, CHIP_SIZE, 3) {
                return Err(Error::shape(
                    "face descriptor",
                    format!(
                        "chip is {}×{}×{}; expected {CHIP_SIZE}×{CHIP_SIZE}×3 (see face_chip)",
                        chip.height, chip.width, chip.channels
                    ),
                ));
            }
            for (p, px) in chip.data.chunks_exact(3).enumerate() {
                for k in 0..3 {
                    dst[k * plane + p] = (px[k] as f32 - MEAN_RGB[k]) / INPUT_DIVISOR;
                }
            }
        }
        self.backend.from_f32(&[chips.len(), 3, CHIP_SIZE, CHIP_SIZE], &x)
    }

    fn forward(&self, x: &Tensor<B>, mut trace: Option<&mut Trace>) -> Result<Tensor<B>> {
        let be = &self.backend;
        let mut record = |name: &'static str, t: &Tensor<B>| -> Result<()> {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((name, HostTensor::from_device(be, t)?));
            }
            Ok(())
        };
        let x = self.relu(&self.stem.forward(be, x)?)?;
        record("conv32_down", &x)?;
        let mut x = self.max_pool_3x3_s2(&x)?;
        record("maxpool", &x)?;
        for blk in &self.blocks {
            let a = self.relu(&blk.conv1.forward(be, &x)?)?;
            let b = blk.conv2.forward(be, &a)?;
            let sum = match blk.kind {
                BlockKind::Residual => be.add(&b, &x)?,
                BlockKind::Down => {
                    let mut p = avg_pool_2x2(be, &x)?;
                    if blk.extra_channels > 0 {
                        let (n, _, h, w) = p.dims4("face down block")?;
                        let z = be.zeros(&[n, blk.extra_channels, h, w])?;
                        p = be.concat_channels(&[&p, &z])?;
                    }
                    be.add(&p, &pad_bottom_right(be, &b, p.shape())?)?
                }
            };
            x = self.relu(&sum)?;
            record(blk.name, &x)?;
        }
        let (_, _, h, w) = x.dims4("face avgpool")?;
        let g = be.affine(&be.sum_spatial(&x)?, 1.0 / (h * w) as f64, 0.0)?;
        record("avgpool", &g)?;
        be.linear(&g, &self.fc, None)
    }

    /// max(x, 0) on the host (no `Backend` op).
    fn relu(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let mut v = self.backend.to_f32(x)?;
        v.iter_mut().for_each(|a| *a = a.max(0.0));
        self.backend.from_f32(x.shape(), &v)
    }

    /// 3×3 max-pool, stride 2, no padding, on the host (no `Backend` op).
    fn max_pool_3x3_s2(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let (n, c, h, w) = x.dims4("face maxpool")?;
        if h < 3 || w < 3 {
            return Err(Error::shape("face maxpool", format!("{h}×{w} input")));
        }
        let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
        let v = self.backend.to_f32(x)?;
        let mut out = vec![0.0f32; n * c * oh * ow];
        for (src, dst) in v.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
            for i in 0..oh {
                for j in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for dy in 0..3 {
                        for dx in 0..3 {
                            m = m.max(src[(2 * i + dy) * w + 2 * j + dx]);
                        }
                    }
                    dst[i * ow + j] = m;
                }
            }
        }
        self.backend.from_f32(&[n, c, oh, ow], &out)
    }
}

/// 2×2 mean, stride 2, no padding: `upfirdn2d` with a 2×2 box of ¼ and down 2.
fn avg_pool_2x2<B: Backend>(be: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
    let fir = Fir {
        taps: vec![0.25; 4],
        kh: 2,
        kw: 2,
    };
    be.upfirdn2d(
        x,
        &fir,
        UpFirDn {
            up: 1,
            down: 2,
            pad0: 0,
            pad1: 0,
        },
    )
}

/// Zero rows at the bottom and zero columns at the right up to `shape`'s H×W (dlib's `add_prev`
/// fill): `upfirdn2d` with a 1-tap identity filter and trailing padding.
fn pad_bottom_right<B: Backend>(be: &B, x: &Tensor<B>, shape: &[usize]) -> Result<Tensor<B>> {
    let (n, c, h, w) = x.dims4("face pad")?;
    let &[_, _, th, tw] = shape else {
        return Err(Error::shape("face pad", format!("target {shape:?}")));
    };
    if (h, w) == (th, tw) {
        return Ok(x.clone());
    }
    if th < h || th - h != tw.wrapping_sub(w) {
        return Err(Error::shape(
            "face pad",
            format!("cannot pad [{n},{c},{h},{w}] to {th}×{tw} evenly"),
        ));
    }
    let fir = Fir {
        taps: vec![1.0],
        kh: 1,
        kw: 1,
    };
    be.upfirdn2d(
        x,
        &fir,
        UpFirDn {
            up: 1,
            down: 1,
            pad0: 0,
            pad1: (th - h) as isize,
        },
    )
}

// ---- comparing descriptors --------------------------------------------------------------------

/// Identity agreement of two faces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceComparison {
    /// CS: cosine of the two descriptors (1 = same direction).
    pub cosine: f64,
    /// Euclidean distance of the raw descriptors (dlib: < 0.6 ⇒ same person).
    pub l2: f64,
}

/// Cosine similarity dot(a,b)/(|a|·|b|) in f64 (the CS metric); 0 when either vector is zero.
pub fn cosine(a: &Descriptor, b: &Descriptor) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Euclidean distance in f64.
pub fn l2(a: &Descriptor, b: &Descriptor) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;

    #[test]
    fn embedded_weights_parse_and_consume_every_byte() {
        let w = FaceWeights::embedded().unwrap();
        assert_eq!(w.len(), 117);
        assert_eq!(w.get("fc").unwrap().shape, vec![256, 128]);
        // A truncated shard or a manifest with trailing bytes is an error, not a silent misread.
        assert!(FaceWeights::parse(EMBEDDED_MANIFEST, &EMBEDDED_BIN[1..], "t").is_err());
        let mut long = EMBEDDED_BIN.to_vec();
        long.push(0);
        assert!(FaceWeights::parse(EMBEDDED_MANIFEST, &long, "t").is_err());
        assert!(FaceWeights::parse("{}", EMBEDDED_BIN, "t").is_err());
    }

    #[test]
    fn box_scaling_is_identity_at_128_and_edge_aligned() {
        assert_eq!(FIXED_BOX_128.for_frame(128, 128), FIXED_BOX_128);
        let b = FIXED_BOX_128.for_frame(256, 256);
        assert_eq!((b.left, b.right), (40.5, 216.5));
    }

    #[test]
    fn chip_of_a_constant_frame_is_constant_and_outside_is_black() {
        let frame = ImageU8::new(128, 128, 3, vec![77; 128 * 128 * 3]).unwrap();
        let chip = face_chip(&frame).unwrap();
        assert!(chip.data.iter().all(|&v| v == 77));
        let outside = ChipBox {
            left: 100.0,
            top: 100.0,
            right: 200.0,
            bottom: 200.0,
        };
        let chip = extract_chip(&frame, outside).unwrap();
        assert_eq!(chip.data[0], 77);
        assert_eq!(*chip.data.last().unwrap(), 0);
    }

    #[test]
    fn wrong_chip_size_is_an_error() {
        let net = FaceNet::embedded(&CpuF32::new()).unwrap();
        let frame = ImageU8::new(128, 128, 3, vec![0; 128 * 128 * 3]).unwrap();
        assert!(net.descriptor(&frame).is_err());
    }

    #[test]
    fn cosine_and_l2_basics() {
        let mut a = [0.0f32; DESCRIPTOR_LEN];
        let mut b = [0.0f32; DESCRIPTOR_LEN];
        a[0] = 3.0;
        b[1] = 4.0;
        assert_eq!(cosine(&a, &b), 0.0);
        assert!((l2(&a, &b) - 5.0).abs() < 1e-12);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&a, &[0.0; DESCRIPTOR_LEN]), 0.0);
    }
}
