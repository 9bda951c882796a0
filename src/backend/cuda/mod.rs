//! CUDA backend: hand-written kernels (kernels/*.cu, compiled by NVRTC at build time into an sm_90
//! CUBIN plus PTX and embedded in the binary) driven through cudarc's driver API.
//!
//! Structure:
//! - one context (the device's primary context) and one non-blocking stream; every copy and
//!   launch goes to that stream, so the caching allocator ([`memory`]) may hand a freed buffer to
//!   the next op at once;
//! - the modules are loaded once from the embedded CUBIN (PTX as the fallback) and every kernel is
//!   looked up by name at launch;
//! - [`Precision`] selects the GEMM path of `conv2d`, `nin` and their backward: exact SIMT f32
//!   (default), TF32 (WMMA) or bf16 tensor cores, f32 accumulate. `linear` (tiny: the
//!   time-embedding MLP) and attention always run in f32.
//!
//! The bf16 GEMMs (forward conv/NIN with at least 16 input channels, and the weight gradient) use
//! pipelined kernels: cp.async into 4 shared-memory stages, mma.sync m16n8k16, K walked per filter
//! tap over 32-channel tiles so the im2col gather is one load per element; forward weights are
//! repacked to bf16 once per weight tensor (cached by buffer identity). The other precisions and
//! the 6-channel input conv use the WMMA/SIMT kernels with register-staged double buffering.
//!
//! What is fused: bias into the conv/NIN/linear epilogue, and at inference a residual block's
//! time-embedding bias and skip connection too (`conv2d_fused`); SiLU into GroupNorm; QKᵀ,
//! softmax and ·V into one attention kernel; zero-insertion, padding, FIR and decimation into one
//! upfirdn2d kernel; the sampler's predictor and Langevin updates ([`graph`]). GroupNorm is two
//! kernels (f64 partial statistics over ~2 blocks per multiprocessor, then a float4 apply). Small
//! GEMMs pay a second launch for the split-K reduction. Training ops: every backward in
//! `backward.rs` (dx of conv as a forward conv of the dilated dy with flipped weights).
//!
//! Checking: [`selftest`] runs every op against the CPU backend on fresh random inputs with
//! NaN-poisoned outputs (wired into `srsde-fast selftest` and tests/cuda_ops.rs); [`bench`]
//! times the heaviest layer shapes per precision; scripts/kernel_emu runs the kernels' C++ on the
//! CPU (threads and barriers emulated) to check indexing and tiling where there is no GPU.
mod backward;
pub mod bench;
pub mod graph;
mod kernels;
pub mod memory;
pub mod optim;
pub mod selftest;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{result, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

pub use self::memory::CudaBuf;
use self::memory::{Pool, PoolStats};
use super::shapes::{self, expect_shape};
use super::{AdamStep, Backend, ConvEpilogue, Fir, Grads3, UpFirDn};
use crate::error::{Error, Result};
use crate::tensor::{same_shape, Tensor};

/// Arithmetic of the matrix products in `conv2d` and `nin`. Storage is always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Plain f32 FMA (SIMT): matches the CPU backend to ~1e-6.
    #[default]
    F32,
    /// TF32 tensor cores (10-bit mantissa operands), f32 accumulate: ~1e-3 relative.
    Tf32,
    /// bf16 tensor cores (8-bit mantissa operands), f32 accumulate: ~1e-2 relative.
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];
    pub fn as_str(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
    fn conv_kernel(&self) -> &'static str {
        match self {
            Precision::F32 => "conv_f32",
            Precision::Tf32 => "conv_tf32",
            Precision::Bf16 => "conv_bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::Config(format!(
                "unknown precision `{s}` (expected f32, tf32 or bf16)"
            ))),
        }
    }
}

/// The CUDA backend. Cheap to clone (the context, stream, allocator and kernels are shared);
/// `precision` and `poison` are per handle.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
    precision: Precision,
    poison: bool,
    /// bf16 GEMMs with at least this many output pixels read their input as bf16 NHWC
    /// (`conv_to_nhwc_bf16` + `conv_bf16_nhwc*`); smaller ones read the f32 NCHW tensor directly.
    nhwc_min_pixels: usize,
    /// Whether NHWC copies are shared between the GEMMs of one backward op (dy feeds both the
    /// input-gradient conv and the weight gradient): see [`Cuda::nhwc_input`].
    share_nhwc: bool,
    /// NHWC GEMMs on the 64-channel-K-tile kernels (`SRSDE_CONV_NHWC_K64`, default [`NHWC_K64`]).
    nhwc_k64: bool,
    /// NHWC copies of planes with a multiple of 4 pixels by `conv_to_nhwc_bf16_wide` (float4
    /// loads, 16-byte stores; `SRSDE_NHWC_WIDE=0` for the 32-pixel-tile kernel).
    nhwc_wide: bool,
}

/// Default [`Cuda::with_nhwc_min_pixels`]: the layout pass costs one launch and one read and
/// write of the input, which pays off once the GEMM is large (overridable for measurements with
/// `SRSDE_CONV_NHWC_MIN_PIXELS`).
pub const NHWC_MIN_PIXELS: usize = 4096;

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: Arc<Pool>,
    kernels: HashMap<&'static str, CudaFunction>,
    device_name: String,
    /// Streaming multiprocessors: sizes the split-K of small GEMMs.
    sm_count: usize,
    /// How the modules were loaded, e.g. "cubin sm_90 (8 modules)".
    loaded_from: String,
    /// Per-kernel GPU time when SRSDE_CUDA_PROFILE=1 (see [`Cuda::kernel_profile`]).
    profile: Option<Mutex<LaunchTimes>>,
    /// Weights repacked for the pipelined bf16 conv ([`Cuda::packed_weights`]).
    packed: Mutex<HashMap<PackKey, PackedWeights>>,
    /// The most recent NHWC copies made by handles with `share_nhwc` ([`Cuda::nhwc_input`]).
    nhwc_recent: Mutex<Vec<NhwcCopy>>,
}

/// A bf16 NHWC copy of a live tensor's buffer (valid while the `Weak` upgrades: tensors are
/// immutable), for the layout `[n][hw][c padded]`.
struct NhwcCopy {
    source: Weak<CudaBuf>,
    dims: (usize, usize, usize),
    copy: Arc<CudaBuf>,
    /// The layout pass's per-(sample, 128-pixel tile) channel sums, when it made them
    /// ([`Cuda::nhwc_channel_sums`]).
    sums: Option<Arc<CudaBuf>>,
}

impl NhwcCopy {
    /// Whether this is the copy of x's live buffer with these dims.
    fn is_copy_of(&self, x: &Tensor<Cuda>, dims: (usize, usize, usize)) -> bool {
        self.dims == dims
            && self
                .source
                .upgrade()
                .is_some_and(|live| Arc::ptr_eq(&live, x.buf()))
    }
}

/// Pixels per block of `conv_to_nhwc_bf16_wide`, and so per row of its channel sums.
const NHWC_WIDE_TILE: usize = 128;

/// How many NHWC copies a sharing handle keeps: dy and x of the current backward op.
const NHWC_RECENT: usize = 2;

/// A weight tensor's identity (its buffer, alive while the `Weak` in the entry upgrades) plus
/// the GEMM layout it was packed for. Tensors are immutable, so a live buffer's packing stays
/// valid; entries of dropped weights are swept on the next miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PackKey {
    buf: usize,
    m: i32,
    c: i32,
    /// Channels padded to this multiple (the kernel's K tile).
    cpad: usize,
    khw: i32,
    a_sm: i64,
    a_sk: i64,
}

struct PackedWeights {
    source: Weak<CudaBuf>,
    packed: Arc<CudaBuf>,
}

/// Whether a CUDA driver and at least one device are present (whatever the kernels).
/// What a recorded convolution keeps of its input for the backward
/// ([`Backend::conv2d_fused_saving`]).
#[derive(Clone)]
pub enum ConvInput {
    /// The f32 input itself.
    Tensor(Tensor<Cuda>),
    /// The bf16 NHWC copy (channels padded to [`NHWC_CPAD`]) the forward GEMM read, which the
    /// weight gradient reads as well; `shape` is the input's NCHW shape.
    Nhwc { copy: Arc<CudaBuf>, shape: Vec<usize> },
}

impl ConvInput {
    pub fn shape(&self) -> &[usize] {
        match self {
            ConvInput::Tensor(t) => t.shape(),
            ConvInput::Nhwc { shape, .. } => shape,
        }
    }
}

/// The (Σx, Σx²) partials of a split `group_norm` forward, f64 [N·groups][chunks][2], kept for
/// its backward ([`Backend::group_norm_saving`]).
#[derive(Clone)]
pub struct GnStats {
    part: Arc<CudaBuf>,
    chunks: usize,
}

pub fn cuda_available() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n > 0).unwrap_or(false)).unwrap_or(false)
}

/// Name of device `ordinal`, e.g. "NVIDIA H200".
pub fn device_name(ordinal: usize) -> Result<String> {
    if !cuda_available() {
        return Err(Error::Backend("no CUDA driver or device".into()));
    }
    std::panic::catch_unwind(|| {
        result::init()?;
        let dev = result::device::get(ordinal as i32)?;
        result::device::get_name(dev)
    })
    .map_err(|_| Error::Backend("the CUDA driver library lacks a required function".into()))?
    .map_err(|e| Error::Backend(format!("device {ordinal}: {e}")))
}

/// Why this binary has no kernels, if it has none.
pub fn built_without_kernels() -> Option<&'static str> {
    kernels::BUILT_WITHOUT_KERNELS
}

/// The NVRTC version the kernels were compiled with ((0, 0) without kernels).
pub fn nvrtc_version() -> (i32, i32) {
    kernels::NVRTC_VERSION
}

/// (module, CUBIN bytes, PTX bytes, kernels) of the embedded code.
pub fn embedded_kernels() -> Vec<(&'static str, usize, usize, usize)> {
    kernels::embedded_sizes()
}

fn drv<T>(what: &str, r: std::result::Result<T, result::DriverError>) -> Result<T> {
    r.map_err(|e| Error::Backend(format!("{what}: {e}")))
}

/// One kernel parameter; `Raw` carries a by-value struct (its bytes, laid out as `#[repr(C)]`).
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Raw(Vec<u8>),
}

fn ptr(t: &Tensor<Cuda>) -> Arg {
    Arg::Ptr(t.buf().device_ptr())
}

/// The bytes of a plain-old-data value.
fn raw<T: Copy>(v: &T) -> Arg {
    // SAFETY: T is Copy plain data defined in this module with #[repr(C)] and no padding reads
    // that matter (the kernel reads only the fields).
    let bytes = unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) };
    Arg::Raw(bytes.to_vec())
}

const BLOCK: u32 = 256;

/// Blocks for a grid-stride loop over n elements.
fn grid_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32
}

/// Convolution geometry as the kernels see it (kernels/conv.cu `ConvGeom`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvGeom {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    o: i32,
    oh: i32,
    ow: i32,
    kh: i32,
    kw: i32,
    stride: i32,
    pad: i32,
    /// K range per split-K part (`blockIdx.z`); a multiple of every kernel's K tile.
    k_chunk: i32,
    a_sm: i64,
    a_sk: i64,
}

/// A launch's grid (x, y, z blocks).
pub type Grid = (u32, u32, u32);
/// (kernel, grid) → (launches, milliseconds).
type LaunchTimes = HashMap<(&'static str, Grid), (u64, f64)>;

/// [`Cuda::kernel_profile`]: (kernel, launches, ms) and (kernel, grid, launches, ms).
pub struct KernelProfile {
    pub by_kernel: Vec<(&'static str, u64, f64)>,
    pub by_launch: Vec<(&'static str, Grid, u64, f64)>,
}

/// kernels/conv.cu `ConvEpi`: the fused residual-block epilogue (null pointers: none).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvEpiC {
    cb: u64,
    res: u64,
    alpha: f32,
    beta: f32,
}

impl ConvEpiC {
    const NONE: ConvEpiC = ConvEpiC {
        cb: 0,
        res: 0,
        alpha: 1.0,
        beta: 0.0,
    };
}

/// kernels/fir.cu `FirGeom`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FirGeomC {
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    up: i32,
    down: i32,
    pad0: i32,
    pad1: i32,
}

/// kernels/fir.cu `FirTaps`.
const FIR_MAX_TAPS: usize = 64;
#[repr(C)]
#[derive(Clone, Copy)]
struct FirTaps {
    taps: [f32; FIR_MAX_TAPS],
    kh: i32,
    kw: i32,
}

/// Largest L = H·W the fused attention kernel takes: its 16 score rows (dynamic) plus the 4 KB
/// query chunk (static) must fit the default 48 KB of shared memory: 64·(L+1) + 4096 ≤ 49152.
pub const ATTENTION_MAX_L: usize = 703;
const ATTN_TQ: usize = 16;

fn to_i32(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("size {v} exceeds the kernels' 32-bit range")))
}

/// Pixels per block of `gn_apply` (kernels/norm.cu `GN_APPLY_SPAN`).
const GN_APPLY_SPAN: usize = 4096;

/// Threads of every conv kernel (kernels/conv.cu `CONV_THREADS`).
const CONV_THREADS: u32 = 256;
/// Output channels per block of every conv kernel.
const CONV_TILE_M: usize = 128;
/// The split-K chunk is a multiple of this (every kernel's K tile divides it).
const CONV_K_ALIGN: usize = 32;
/// Smallest K range worth a split of its own.
const CONV_MIN_SPLIT_K: usize = 128;
const CONV_MAX_SPLITS: usize = 64;

/// The pipelined bf16 conv kernels and their dynamic shared memory (kernels/conv.cu
/// `MmaTile<BN>::SMEM_BYTES`: 4 stages of a 128×32 bf16 A tile and a 32×BN f32 B tile).
const MMA_KERNELS: [(&str, usize); 2] = [("conv_bf16_mma", 108_544), ("conv_bf16_mma_n64", 75_776)];
/// The same GEMM reading bf16 NHWC input (`MmaTile<BN, true>::SMEM_BYTES`).
const NHWC_KERNELS: [(&str, usize); 2] = [("conv_bf16_nhwc", 81_920), ("conv_bf16_nhwc_n64", 61_440)];
/// The NHWC GEMM with 64-channel K tiles in three stages (`MmaTile<BN, true, 64, 3>`).
const NHWC_K64_KERNELS: [(&str, usize); 2] = [
    ("conv_bf16_nhwc_k64", 110_592),
    ("conv_bf16_nhwc_k64_n64", 82_944),
];
/// Default K tile of the NHWC GEMMs: 64 channels (three stages) when true, else 32 (four). On
/// the H200 the 64-channel tiles give a PC step at batch 1 of 8.7 ms vs 9.2 and the same
/// batch-64 throughput (docs/benchmarks.md).
pub const NHWC_K64: bool = true;
/// Channels every NHWC copy is padded to (kernels/conv.cu `NHWC_CPAD`).
const NHWC_CPAD: usize = 64;
/// The weight gradient reading bf16 NHWC x and dy (`DwNhwcTile<BN>::SMEM_BYTES`).
const DW_NHWC_KERNELS: [(&str, usize); 2] = [("conv_dw_nhwc", 69_632), ("conv_dw_nhwc_n64", 53_248)];
/// The pipelined bf16 weight-gradient kernels and their dynamic shared memory (kernels/conv.cu
/// `DwMmaTile<BN>::SMEM_BYTES`; BN = 128, 64 channels per block).
const DW_MMA_KERNELS: [(&str, usize); 2] = [("conv_dw_bf16_mma", 163_840), ("conv_dw_bf16_mma_n64", 122_880)];
/// Channels per K tile of the pipelined kernels (kernels/conv.cu `MMA_BK`).
const MMA_BK: usize = 32;
/// Below this many input channels (the 6-channel input conv) most of a 32-channel K tile would
/// be padding; the WMMA kernel walks K = C·KH·KW densely instead.
const MMA_MIN_CHANNELS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MmaPlan {
    kernel: &'static str,
    tile_n: usize,
    smem_bytes: usize,
    splits: usize,
    tiles_per_split: usize,
}

/// Tiling of the pipelined kernel for M output channels, P output pixels and `tiles` K tiles:
/// 128-pixel tiles when they alone fill the device, else 64; split-K (at least 4 K tiles a
/// part) when the blocks still number fewer than the multiprocessors.
/// `kernels`: the 128- and 64-pixel variants ([`MMA_KERNELS`] or [`NHWC_KERNELS`]).
fn mma_plan(kernels: &[(&'static str, usize); 2], m: usize, p: usize, tiles: usize, sms: usize) -> MmaPlan {
    let blocks_for = |tile_n: usize| m.div_ceil(CONV_TILE_M) * p.div_ceil(tile_n);
    let wide = blocks_for(128) >= sms;
    let (kernel, smem_bytes) = if wide { kernels[0] } else { kernels[1] };
    let tile_n = if wide { 128 } else { 64 };
    let blocks = blocks_for(tile_n).max(1);
    let mut splits = 1;
    if blocks < sms {
        splits = (2 * sms)
            .div_ceil(blocks)
            .min(tiles / 4)
            .clamp(1, CONV_MAX_SPLITS);
    }
    let tiles_per_split = tiles.div_ceil(splits).max(1);
    MmaPlan {
        kernel,
        tile_n,
        smem_bytes,
        splits: tiles.div_ceil(tiles_per_split).max(1),
        tiles_per_split,
    }
}

/// How one implicit-GEMM launch is tiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConvPlan {
    kernel: &'static str,
    /// Output pixels per block (the GEMM's N tile).
    tile_n: usize,
    /// Split-K parts (`gridDim.z`); 1 = no workspace.
    splits: usize,
    /// K range per part (covers K with `splits` non-empty parts).
    k_chunk: usize,
}

/// The kernel, tile width and split-K for an M×P×K product (M output channels, P output pixels
/// over the batch, K = C·KH·KW) on a device with `sms` multiprocessors. Wide tiles when they
/// alone fill the device; otherwise 64-pixel tensor-core tiles, and when the blocks still number
/// fewer than the multiprocessors, K is split so that about two blocks per multiprocessor run
/// (the batch-1 low-resolution layers: P = 4..1024 with K up to 4608).
fn conv_plan(precision: Precision, m: usize, p: usize, k: usize, sms: usize) -> ConvPlan {
    let blocks_for = |tile_n: usize| m.div_ceil(CONV_TILE_M) * p.div_ceil(tile_n);
    let (kernel, tile_n) = match precision {
        Precision::F32 => ("conv_f32", 128),
        Precision::Tf32 if blocks_for(128) >= sms => ("conv_tf32", 128),
        Precision::Tf32 => ("conv_tf32_n64", 64),
        Precision::Bf16 if blocks_for(128) >= sms => ("conv_bf16", 128),
        Precision::Bf16 => ("conv_bf16_n64", 64),
    };
    let blocks = blocks_for(tile_n).max(1);
    let mut splits = 1;
    if blocks < sms {
        let want = (2 * sms).div_ceil(blocks);
        splits = want.min(k / CONV_MIN_SPLIT_K).clamp(1, CONV_MAX_SPLITS);
    }
    if splits == 1 {
        return ConvPlan {
            kernel,
            tile_n,
            splits,
            k_chunk: k.max(1),
        };
    }
    let k_chunk = k.div_ceil(splits).div_ceil(CONV_K_ALIGN) * CONV_K_ALIGN;
    ConvPlan {
        kernel,
        tile_n,
        splits: k.div_ceil(k_chunk),
        k_chunk,
    }
}

impl Cuda {
    /// Open device `ordinal`: context, stream, allocator, embedded kernels. Fails with
    /// `Error::Backend` (never a panic) without a driver, a device or kernels.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if let Some(why) = kernels::BUILT_WITHOUT_KERNELS {
            return Err(Error::Backend(format!(
                "this binary was built without CUDA kernels: {why}"
            )));
        }
        // SAFETY: only tries to dlopen libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Backend("no CUDA driver (libcuda.so not found)".into()));
        }
        match std::panic::catch_unwind(|| Self::open(ordinal)) {
            Ok(r) => r,
            Err(_) => Err(Error::Backend(
                "the CUDA driver library is too old or incomplete (a required function is missing)".into(),
            )),
        }
    }

    fn open(ordinal: usize) -> Result<Cuda> {
        let count = drv("cuInit / cuDeviceGetCount", CudaContext::device_count())?;
        if count <= 0 {
            return Err(Error::Backend("no CUDA device".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Backend(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let ctx = drv("creating the CUDA context", CudaContext::new(ordinal))?;
        // We order all work on one stream ourselves; cudarc's per-buffer events are not used.
        // SAFETY: no cudarc CudaSlice is shared across streams in this backend.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("creating a CUDA stream", ctx.new_stream())?;
        let device_name = drv("cuDeviceGetName", ctx.name())?;
        let (major, minor) = drv("compute capability", ctx.compute_capability())?;
        let sm_count = drv(
            "multiprocessor count",
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )?
        .max(1) as usize;

        let mut kernels = HashMap::new();
        let (mut from_cubin, mut from_ptx) = (0, 0);
        for m in kernels::MODULES {
            let module: Arc<CudaModule> = match ctx.load_module(Ptx::from_binary(m.cubin.to_vec())) {
                Ok(module) => {
                    from_cubin += 1;
                    module
                }
                Err(cubin_err) => match ctx.load_module(Ptx::from_src(m.ptx)) {
                    Ok(module) => {
                        from_ptx += 1;
                        module
                    }
                    Err(ptx_err) => {
                        return Err(Error::Backend(format!(
                            "loading kernels/{}.cu on {device_name} (sm_{major}{minor}): CUBIN: {cubin_err}; \
                             PTX: {ptx_err}",
                            m.name
                        )))
                    }
                },
            };
            for &name in m.kernels {
                // A kernel compiled out (e.g. the tensor-core ones without the WMMA headers) is
                // reported when it is first needed.
                if let Ok(f) = module.load_function(name) {
                    kernels.insert(name, f);
                }
            }
        }
        // The pipelined conv kernels keep 4 stages of operands in dynamic shared memory (above
        // the default 48 KB limit).
        for (name, bytes) in MMA_KERNELS
            .iter()
            .chain(&NHWC_KERNELS)
            .chain(&NHWC_K64_KERNELS)
            .chain(&DW_MMA_KERNELS)
            .chain(&DW_NHWC_KERNELS)
        {
            if let Some(f) = kernels.get(name) {
                drv(
                    "raising the shared-memory limit of the conv kernels",
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        *bytes as i32,
                    ),
                )?;
            }
        }
        let loaded_from = format!("{from_cubin} modules from sm_90 CUBIN, {from_ptx} from PTX");
        let pool = Pool::new(ctx.clone());
        Ok(Cuda {
            inner: Arc::new(Inner {
                ctx,
                stream,
                pool,
                kernels,
                device_name,
                sm_count,
                loaded_from,
                packed: Mutex::new(HashMap::new()),
                nhwc_recent: Mutex::new(Vec::new()),
                profile: std::env::var_os("SRSDE_CUDA_PROFILE")
                    .is_some_and(|v| v == "1")
                    .then(|| Mutex::new(HashMap::new())),
            }),
            precision: Precision::default(),
            poison: false,
            nhwc_min_pixels: std::env::var("SRSDE_CONV_NHWC_MIN_PIXELS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(NHWC_MIN_PIXELS),
            share_nhwc: false,
            nhwc_k64: std::env::var("SRSDE_CONV_NHWC_K64").map_or(NHWC_K64, |v| v == "1"),
            nhwc_wide: std::env::var("SRSDE_NHWC_WIDE").map_or(true, |v| v == "1"),
        })
    }

    /// The same device with another GEMM precision.
    pub fn with_precision(&self, precision: Precision) -> Cuda {
        Cuda {
            precision,
            ..self.clone()
        }
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// Whether the tensor-core kernels for `p` are in this build.
    pub fn supports(&self, p: Precision) -> bool {
        self.inner.kernels.contains_key(p.conv_kernel())
    }
    /// This handle with bf16 GEMMs of at least `min_pixels` output pixels on the NHWC-input
    /// kernels (0: all of them; `usize::MAX`: none). The selftest forces both paths.
    pub fn with_nhwc_min_pixels(&self, min_pixels: usize) -> Cuda {
        Cuda {
            nhwc_min_pixels: min_pixels,
            ..self.clone()
        }
    }

    /// This handle with its NHWC GEMMs on 64-channel (`true`) or 32-channel K tiles.
    pub fn with_nhwc_k64(&self, k64: bool) -> Cuda {
        Cuda {
            nhwc_k64: k64,
            ..self.clone()
        }
    }

    /// This handle making NHWC copies with the wide (`true`) or the 32-pixel-tile layout pass.
    pub fn with_nhwc_wide(&self, wide: bool) -> Cuda {
        Cuda {
            nhwc_wide: wide,
            ..self.clone()
        }
    }

    /// This handle sharing NHWC copies between consecutive GEMMs on the same input (for the
    /// backward ops only: a copy kept across a CUDA-graph capture boundary would not be owned by
    /// the graph).
    pub(crate) fn with_shared_nhwc(&self) -> Cuda {
        Cuda {
            share_nhwc: true,
            ..self.clone()
        }
    }

    /// A handle that fills every new output buffer with NaN before the op writes it, so that an
    /// element a kernel forgets to write shows up (used by the selftest).
    pub fn with_poison(&self, poison: bool) -> Cuda {
        Cuda {
            poison,
            ..self.clone()
        }
    }
    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }
    /// E.g. "8 modules from sm_90 CUBIN, 0 from PTX".
    pub fn loaded_from(&self) -> &str {
        &self.inner.loaded_from
    }
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }
    /// Restart the pool's peak-memory counters from the current usage.
    pub fn reset_pool_peak(&self) {
        self.inner.pool.reset_peak()
    }
    /// The launches since the last call, when the backend was opened with SRSDE_CUDA_PROFILE=1
    /// (each launch then waits for the GPU, so the times are exact per kernel but the run is
    /// slower); None otherwise. Heaviest first, per kernel and per (kernel, grid) — the grid
    /// tells the layers apart.
    pub fn kernel_profile(&self) -> Option<KernelProfile> {
        let prof = self.inner.profile.as_ref()?;
        let mut p = prof.lock().ok()?;
        let mut by_launch: Vec<_> = p.drain().map(|((k, grid), (n, ms))| (k, grid, n, ms)).collect();
        by_launch.sort_by(|a, b| b.3.total_cmp(&a.3));
        let mut per_kernel: HashMap<&'static str, (u64, f64)> = HashMap::new();
        for &(k, _, n, ms) in &by_launch {
            let e = per_kernel.entry(k).or_insert((0, 0.0));
            e.0 += n;
            e.1 += ms;
        }
        let mut by_kernel: Vec<_> = per_kernel.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
        by_kernel.sort_by(|a, b| b.2.total_cmp(&a.2));
        Some(KernelProfile { by_kernel, by_launch })
    }
    /// Give cached device memory back to the driver.
    pub fn trim_pool(&self) -> Result<()> {
        self.inner.pool.trim()
    }
    /// The stream all work is queued on (for events and graph capture by callers).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// Median wall time in ms of `f` on the device, measured with CUDA events around each of
    /// `reps` runs after `warmup` untimed ones (`f` only queues work on this backend's stream).
    pub fn time_ms(&self, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags;
        for _ in 0..warmup {
            f()?;
        }
        self.synchronize()?;
        let ctx = &self.inner.ctx;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = drv(
                "cuEventCreate",
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
            )?;
            let end = drv(
                "cuEventCreate",
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
            )?;
            drv("cuEventRecord", start.record(&self.inner.stream))?;
            f()?;
            drv("cuEventRecord", end.record(&self.inner.stream))?;
            times.push(drv("cuEventElapsedTime", start.elapsed_ms(&end))? as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }

    // ---- plumbing -----------------------------------------------------------------------------

    /// Make the context current on this thread (driver calls without a current context fail).
    fn bind(&self) -> Result<()> {
        drv("binding the CUDA context", self.inner.ctx.bind_to_thread())
    }

    fn alloc(&self, len: usize) -> Result<Arc<CudaBuf>> {
        let buf = self.inner.pool.alloc(len * 4, len)?;
        if self.poison && len > 0 {
            self.bind()?;
            // 0xFFFFFFFF is a NaN.
            drv("poisoning a buffer", unsafe {
                result::memset_d8_async(buf.device_ptr(), 0xFF, len * 4, self.inner.stream.cu_stream())
            })?;
        }
        Ok(Arc::new(buf))
    }

    fn out(&self, shape: &[usize]) -> Result<Tensor<Cuda>> {
        let n = shape.iter().product();
        Ok(Tensor::from_buf(shape.to_vec(), self.alloc(n)?))
    }

    fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: Vec<Arg>,
    ) -> Result<()> {
        let f = self.inner.kernels.get(name).ok_or_else(|| {
            Error::Backend(format!(
                "kernel {name} is not in this build (see the build warnings)"
            ))
        })?;
        let mut args = args;
        let mut params: Vec<*mut c_void> = args
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::I64(v) => v as *mut i64 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
                Arg::F64(v) => v as *mut f64 as *mut c_void,
                Arg::Raw(v) => v.as_mut_ptr() as *mut c_void,
            })
            .collect();
        self.bind()?;
        // SAFETY: the argument list matches the kernel's signature (each call site mirrors the
        // .cu declaration) and every pointer refers to a live buffer of the right size; `args`
        // outlives the call, which copies the parameters.
        // Profiling (SRSDE_CUDA_PROFILE=1): drain the stream, launch, wait, and charge the
        // wall time to the kernel — serialises everything, for finding where time goes only.
        let t0 = match &self.inner.profile {
            Some(_) => {
                drv("profiling sync", self.inner.stream.synchronize())?;
                Some(std::time::Instant::now())
            }
            None => None,
        };
        let r = unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                self.inner.stream.cu_stream(),
                &mut params,
            )
        };
        drv(name, r)?;
        if let (Some(t0), Some(prof)) = (t0, &self.inner.profile) {
            drv("profiling sync", self.inner.stream.synchronize())?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if let Ok(mut p) = prof.lock() {
                let e = p.entry((name, grid)).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += ms;
            }
        }
        Ok(())
    }

    /// Launch an elementwise kernel over n elements (skipped when n = 0).
    fn launch_n(&self, name: &'static str, n: usize, args: Vec<Arg>) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(name, (grid_for(n), 1, 1), BLOCK, 0, args)
    }

    fn binary(
        &self,
        op: &'static str,
        kernel: &'static str,
        a: &Tensor<Cuda>,
        b: &Tensor<Cuda>,
    ) -> Result<Tensor<Cuda>> {
        same_shape(op, a.shape(), b.shape())?;
        let out = self.out(a.shape())?;
        let n = a.numel();
        self.launch_n(kernel, n, vec![ptr(a), ptr(b), ptr(&out), Arg::I64(n as i64)])?;
        Ok(out)
    }

    /// Copy `rows` rows of `row_len` elements between strided row layouts.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        src: &Tensor<Cuda>,
        dst: &Tensor<Cuda>,
        rows: usize,
        row_len: usize,
        src_stride: usize,
        src_off: usize,
        dst_stride: usize,
        dst_off: usize,
    ) -> Result<()> {
        self.launch_n(
            "ew_copy_rows",
            rows * row_len,
            vec![
                ptr(src),
                ptr(dst),
                Arg::I64(rows as i64),
                Arg::I64(row_len as i64),
                Arg::I64(src_stride as i64),
                Arg::I64(src_off as i64),
                Arg::I64(dst_stride as i64),
                Arg::I64(dst_off as i64),
            ],
        )
    }

    /// The implicit-GEMM kernel for conv2d / nin / linear (tiling chosen by [`conv_plan`]; with
    /// split-K the partial sums go to a workspace that [`Cuda::splitk_reduce`] adds up with the bias).
    fn gemm_conv(
        &self,
        precision: Precision,
        x: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        b: Option<&Tensor<Cuda>>,
        mut g: ConvGeom,
        out_shape: &[usize],
    ) -> Result<Tensor<Cuda>> {
        let out = self.out(out_shape)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let m = g.o as usize;
        let p = g.n as usize * g.oh as usize * g.ow as usize;
        let k = g.c as usize * g.kh as usize * g.kw as usize;
        check_gemm_offsets("conv2d", g.c as usize * g.h as usize * g.w as usize, m * k)?;
        if self.mma_applies(precision, &g) {
            return Ok(self.gemm_conv_mma(x, w, b, g, out, ConvEpiC::NONE)?.0);
        }
        let plan = conv_plan(precision, m, p, k, self.inner.sm_count);
        let grid_x = u32::try_from(p.div_ceil(plan.tile_n))
            .map_err(|_| Error::shape("conv2d", format!("{p} output pixels are too many")))?;
        let grid_y = m.div_ceil(CONV_TILE_M) as u32;
        if grid_y > 65535 {
            return Err(Error::shape(
                "conv2d",
                format!("{} output channels are too many", g.o),
            ));
        }
        g.k_chunk = to_i32("conv2d", plan.k_chunk)?;
        let grid = (grid_x, grid_y, plan.splits as u32);
        if plan.splits == 1 {
            self.launch(
                plan.kernel,
                grid,
                CONV_THREADS,
                0,
                vec![ptr(x), ptr(w), b.map_or(Arg::Ptr(0), ptr), ptr(&out), raw(&g)],
            )?;
            return Ok(out);
        }
        // The workspace is written in full by the GEMM, so it is never poisoned; it returns to
        // the pool when dropped, safely since all later users queue on the same stream.
        let numel = out.numel();
        let ws_len = numel * plan.splits;
        let ws = self.inner.pool.alloc(ws_len * 4, ws_len)?;
        self.launch(
            plan.kernel,
            grid,
            CONV_THREADS,
            0,
            vec![ptr(x), ptr(w), Arg::Ptr(0), Arg::Ptr(ws.device_ptr()), raw(&g)],
        )?;
        self.splitk_reduce(&ws, b, &out, plan.splits, &g, ConvEpiC::NONE)?;
        Ok(out)
    }

    /// `conv_splitk_reduce_epi`: out = epi(Σ of the `splits` partial sums in `ws` + bias), the
    /// second launch of every split-K GEMM.
    fn splitk_reduce(
        &self,
        ws: &CudaBuf,
        b: Option<&Tensor<Cuda>>,
        out: &Tensor<Cuda>,
        splits: usize,
        g: &ConvGeom,
        epi: ConvEpiC,
    ) -> Result<()> {
        let numel = out.numel();
        self.launch_n(
            "conv_splitk_reduce_epi",
            numel,
            vec![
                Arg::Ptr(ws.device_ptr()),
                b.map_or(Arg::Ptr(0), ptr),
                ptr(out),
                Arg::I64(numel as i64),
                Arg::I32(splits as i32),
                Arg::I32(g.o),
                Arg::I64(g.oh as i64 * g.ow as i64),
                raw(&epi),
            ],
        )
    }

    /// Whether both tile variants of a kernel family (e.g. [`MMA_KERNELS`]) are in this build.
    fn has_kernels(&self, family: &[(&str, usize); 2]) -> bool {
        family.iter().all(|(n, _)| self.inner.kernels.contains_key(n))
    }

    /// Whether a GEMM of this precision and geometry runs on the pipelined bf16 kernel (and
    /// that kernel is in this build). The caller has checked the 32-bit offsets
    /// ([`check_gemm_offsets`]).
    fn mma_applies(&self, precision: Precision, g: &ConvGeom) -> bool {
        precision == Precision::Bf16 && g.c as usize >= MMA_MIN_CHANNELS && self.has_kernels(&MMA_KERNELS)
    }

    /// The pipelined bf16 implicit GEMM (kernels/conv.cu `conv_bf16_mma*`): weights repacked
    /// (cached), K tiles of 32 channels at one filter tap, split-K over K tiles when the output
    /// alone does not fill the device; `epi` is applied as the output is written.
    fn gemm_conv_mma(
        &self,
        x: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        b: Option<&Tensor<Cuda>>,
        g: ConvGeom,
        out: Tensor<Cuda>,
        epi: ConvEpiC,
    ) -> Result<(Tensor<Cuda>, Option<Arc<CudaBuf>>)> {
        let (m, c, khw) = (g.o as usize, g.c as usize, (g.kh * g.kw) as usize);
        let p = g.n as usize * g.oh as usize * g.ow as usize;
        let nhwc = p >= self.nhwc_min_pixels && self.has_kernels(&NHWC_KERNELS);
        let (kernels, bk) = if nhwc && self.nhwc_k64 && self.has_kernels(&NHWC_K64_KERNELS) {
            (&NHWC_K64_KERNELS, 64)
        } else if nhwc {
            (&NHWC_KERNELS, MMA_BK)
        } else {
            (&MMA_KERNELS, MMA_BK)
        };
        let wp = self.packed_weights(w, &g, bk)?;
        let tiles = khw * c.div_ceil(bk);
        let plan = mma_plan(kernels, m, p, tiles, self.inner.sm_count);
        // The NHWC kernels read a bf16 copy of x; it returns to the pool when dropped, safely
        // since every later user queues on the same stream.
        let xh = if nhwc {
            Some(self.nhwc_input(x, g.n as usize, c, g.h as usize * g.w as usize)?)
        } else {
            None
        };
        let input = match &xh {
            Some(xh) => Arg::Ptr(xh.device_ptr()),
            None => ptr(x),
        };
        let grid = (
            u32::try_from(p.div_ceil(plan.tile_n))
                .map_err(|_| Error::shape("conv2d", format!("{p} output pixels are too many")))?,
            m.div_ceil(CONV_TILE_M) as u32,
            plan.splits as u32,
        );
        let smem = plan.smem_bytes as u32;
        let per = Arg::I32(plan.tiles_per_split as i32);
        if plan.splits == 1 {
            self.launch(
                plan.kernel,
                grid,
                CONV_THREADS,
                smem,
                vec![
                    input,
                    Arg::Ptr(wp.device_ptr()),
                    b.map_or(Arg::Ptr(0), ptr),
                    ptr(&out),
                    raw(&g),
                    per,
                    raw(&epi),
                ],
            )?;
            return Ok((out, xh));
        }
        let numel = out.numel();
        let ws_len = numel * plan.splits;
        let ws = self.inner.pool.alloc(ws_len * 4, ws_len)?;
        self.launch(
            plan.kernel,
            grid,
            CONV_THREADS,
            smem,
            vec![
                input,
                Arg::Ptr(wp.device_ptr()),
                Arg::Ptr(0),
                Arg::Ptr(ws.device_ptr()),
                raw(&g),
                per,
                raw(&ConvEpiC::NONE),
            ],
        )?;
        self.splitk_reduce(&ws, b, &out, plan.splits, &g, epi)?;
        Ok((out, xh))
    }

    /// `conv2d_fused`, with the bf16 NHWC copy of x its GEMM read (None on the other paths).
    fn conv_fused(
        &self,
        x: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        b: Option<&Tensor<Cuda>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Cuda>,
    ) -> Result<(Tensor<Cuda>, Option<Arc<CudaBuf>>)> {
        let (g, out_shape) = conv_geom(x, w, b, stride, pad)?;
        check_gemm_offsets("conv2d", g.c as usize * g.h as usize * g.w as usize, w.numel())?;
        if !self.mma_applies(self.precision, &g) {
            return Ok((
                super::conv2d_fused_composed(self, x, w, b, stride, pad, epi)?,
                None,
            ));
        }
        let op = "conv2d_fused";
        let mut e = ConvEpiC {
            cb: 0,
            res: 0,
            alpha: 1.0,
            beta: 0.0,
        };
        if let Some(cb) = epi.channel_bias {
            expect_shape(op, "channel bias", cb.shape(), &out_shape[..2])?;
            e.cb = cb.buf().device_ptr();
        }
        if let Some((r, alpha, beta)) = epi.residual {
            expect_shape(op, "residual", r.shape(), &out_shape)?;
            e.res = r.buf().device_ptr();
            e.alpha = alpha as f32;
            e.beta = beta as f32;
        }
        let out = self.out(&out_shape)?;
        if out.numel() == 0 {
            return Ok((out, None));
        }
        self.gemm_conv_mma(x, w, b, g, out, e)
    }

    /// `group_norm`, with the statistics partials of the split path (None on the single-block one).
    #[allow(clippy::too_many_arguments)]
    fn gn_forward(
        &self,
        x: &Tensor<Cuda>,
        gamma: &Tensor<Cuda>,
        beta: &Tensor<Cuda>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor<Cuda>, Option<GnStats>)> {
        let op = "group_norm";
        let (n, c, h, w) = shapes::group_norm(op, x.shape(), gamma.shape(), beta.shape(), groups)?;
        let out = self.out(x.shape())?;
        let blocks = n * groups;
        if out.numel() == 0 {
            return Ok((out, None));
        }
        // Statistics split so that about two blocks per multiprocessor work on them (a batch-1
        // 128×128 layer has only 32 groups), each slice ≥ 2048 elements; partials in f64.
        let group_len = c / groups * h * w;
        let chunks = (2 * self.inner.sm_count)
            .div_ceil(blocks)
            .min(32)
            .min(group_len / 2048)
            .max(1);
        if chunks == 1 && out.numel() <= 1 << 20 {
            // A small tensor: one block per group in a single launch — at batch 1 latency, not
            // bandwidth, decides (large tensors take the two-kernel path: fewer passes).
            let block = if group_len >= 4096 { 512 } else { 256 };
            self.launch(
                "gn_forward",
                (to_i32(op, blocks)? as u32, 1, 1),
                block,
                0,
                vec![
                    ptr(x),
                    ptr(gamma),
                    ptr(beta),
                    ptr(&out),
                    Arg::I32(to_i32(op, c)?),
                    Arg::I32(to_i32(op, groups)?),
                    Arg::I64((h * w) as i64),
                    Arg::F64(eps),
                    Arg::I32(silu as i32),
                ],
            )?;
            return Ok((out, None));
        }
        let parts = blocks * chunks * 2; // (Σx, Σx²) per slice, f64
        let part = Arc::new(self.inner.pool.alloc(parts * 8, parts * 2)?);
        self.launch(
            "gn_stats",
            (to_i32(op, blocks)? as u32, chunks as u32, 1),
            256,
            0,
            vec![
                ptr(x),
                Arg::Ptr(part.device_ptr()),
                Arg::I64(group_len as i64),
                Arg::I32(chunks as i32),
            ],
        )?;
        let hw = h * w;
        self.launch(
            "gn_apply",
            (to_i32(op, n * c)? as u32, hw.div_ceil(GN_APPLY_SPAN) as u32, 1),
            256,
            0,
            vec![
                ptr(x),
                Arg::Ptr(part.device_ptr()),
                ptr(gamma),
                ptr(beta),
                ptr(&out),
                Arg::I32(to_i32(op, c)?),
                Arg::I32(to_i32(op, groups)?),
                Arg::I64(hw as i64),
                Arg::I32(chunks as i32),
                Arg::F64(eps),
                Arg::I32(silu as i32),
            ],
        )?;
        Ok((out, Some(GnStats { part, chunks })))
    }

    /// x as the NHWC kernels' bf16 input ([`Cuda::to_nhwc_bf16`]); a sharing handle reuses the
    /// copy of the same live buffer made by one of its last [`NHWC_RECENT`] calls.
    fn nhwc_input(&self, x: &Tensor<Cuda>, n: usize, c: usize, hw: usize) -> Result<Arc<CudaBuf>> {
        if !self.share_nhwc {
            return Ok(Arc::new(self.to_nhwc_bf16(x, n, c, hw, false)?.0));
        }
        let mut recent = self
            .inner
            .nhwc_recent
            .lock()
            .map_err(|_| Error::Backend("the NHWC copy cache was poisoned by a panic".into()))?;
        if let Some(e) = recent.iter().find(|e| e.is_copy_of(x, (n, c, hw))) {
            return Ok(e.copy.clone());
        }
        // In the backward the copy's channel sums give dy's bias gradient (a few MB more).
        let (copy, sums) = self.to_nhwc_bf16(x, n, c, hw, true)?;
        let copy = Arc::new(copy);
        recent.retain(|e| e.source.strong_count() > 0);
        recent.push(NhwcCopy {
            source: Arc::downgrade(x.buf()),
            dims: (n, c, hw),
            copy: copy.clone(),
            sums: sums.map(Arc::new),
        });
        if recent.len() > NHWC_RECENT {
            recent.remove(0);
        }
        Ok(copy)
    }

    /// The channel sums of a live NHWC copy of x that a sharing handle made, as f32
    /// [rows][cp] with rows = n·⌈hw/[`NHWC_WIDE_TILE`]⌉ (kernels/conv.cu `conv_to_nhwc_bf16_wide`).
    fn nhwc_channel_sums(&self, x: &Tensor<Cuda>, n: usize, c: usize, hw: usize) -> Option<Arc<CudaBuf>> {
        let recent = self.inner.nhwc_recent.lock().ok()?;
        recent
            .iter()
            .find(|e| e.is_copy_of(x, (n, c, hw)))
            .and_then(|e| e.sums.clone())
    }

    /// `conv_to_nhwc_bf16`: x (f32 [n, c, hw]) as bf16 [n][hw][cp], channels zero-padded to
    /// [`NHWC_CPAD`] (a multiple of every K tile); with `sums`, also the channel sums per
    /// 128-pixel tile when the wide pass runs.
    fn to_nhwc_bf16(
        &self,
        x: &Tensor<Cuda>,
        n: usize,
        c: usize,
        hw: usize,
        sums: bool,
    ) -> Result<(CudaBuf, Option<CudaBuf>)> {
        let cp = c.div_ceil(NHWC_CPAD) * NHWC_CPAD;
        let words = n * hw * cp / 2;
        let xh = self.inner.pool.alloc(words * 4, words)?;
        // The wide pass reads float4s along the plane (buffers start 256-byte aligned).
        let wide = self.nhwc_wide
            && hw.is_multiple_of(4)
            && self.inner.kernels.contains_key("conv_to_nhwc_bf16_wide");
        let (kernel, tile) = if wide {
            ("conv_to_nhwc_bf16_wide", NHWC_WIDE_TILE)
        } else {
            ("conv_to_nhwc_bf16", 32)
        };
        let blocks = hw.div_ceil(tile) * cp.div_ceil(64);
        let grid = (
            u32::try_from(blocks)
                .map_err(|_| Error::shape("conv2d", format!("{hw} pixels per sample are too many")))?,
            u32::try_from(n)
                .ok()
                .filter(|&n| n <= 65535)
                .ok_or_else(|| Error::shape("conv2d", format!("batch {n} is too large for the NHWC pass")))?,
            1,
        );
        let mut args = vec![
            ptr(x),
            Arg::Ptr(xh.device_ptr()),
            Arg::I32(to_i32("conv2d", c)?),
            Arg::I32(to_i32("conv2d", cp)?),
            Arg::I64(hw as i64),
        ];
        let csum = if wide && sums {
            let len = n * hw.div_ceil(tile) * cp;
            Some(self.inner.pool.alloc(len * 4, len)?)
        } else {
            None
        };
        if wide {
            args.push(Arg::Ptr(csum.as_ref().map_or(0, |b| b.device_ptr())));
        }
        self.launch(kernel, grid, 256, 0, args)?;
        Ok((xh, csum))
    }

    /// `w` as the pipelined kernel's bf16 A operand wp[m][tap][c] (m padded to the 128-row tile,
    /// c to a multiple of `cpad`, the kernel's K tile), packed once per weight tensor and padding
    /// and cached while it lives.
    fn packed_weights(&self, w: &Tensor<Cuda>, g: &ConvGeom, cpad: usize) -> Result<Arc<CudaBuf>> {
        let key = PackKey {
            buf: Arc::as_ptr(w.buf()) as usize,
            m: g.o,
            c: g.c,
            cpad,
            khw: g.kh * g.kw,
            a_sm: g.a_sm,
            a_sk: g.a_sk,
        };
        let mut cache = self
            .inner
            .packed
            .lock()
            .map_err(|_| Error::Backend("the packed-weight cache was poisoned by a panic".into()))?;
        if let Some(e) = cache.get(&key) {
            if e.source.upgrade().is_some_and(|live| Arc::ptr_eq(&live, w.buf())) {
                return Ok(e.packed.clone());
            }
        }
        cache.retain(|_, e| e.source.strong_count() > 0);
        let (m, c, khw) = (g.o as usize, g.c as usize, (g.kh * g.kw) as usize);
        let (mp, cp) = (m.div_ceil(CONV_TILE_M) * CONV_TILE_M, c.div_ceil(cpad) * cpad);
        let pairs = mp * khw * cp / 2;
        let packed = Arc::new(self.inner.pool.alloc(pairs * 4, pairs)?);
        self.launch_n(
            "conv_pack_bf16",
            pairs,
            vec![
                ptr(w),
                Arg::Ptr(packed.device_ptr()),
                Arg::I32(g.o),
                Arg::I32(to_i32("conv2d", mp)?),
                Arg::I32(to_i32("conv2d", khw)?),
                Arg::I32(g.c),
                Arg::I32(to_i32("conv2d", cp)?),
                Arg::I64(g.a_sm),
                Arg::I64(g.a_sk),
            ],
        )?;
        cache.insert(
            key,
            PackedWeights {
                source: Arc::downgrade(w.buf()),
                packed: packed.clone(),
            },
        );
        Ok(packed)
    }
}

/// The GEMM kernels index one sample's input and one layer's weights with 32-bit offsets.
fn check_gemm_offsets(op: &'static str, per_sample: usize, weights: usize) -> Result<()> {
    if per_sample > i32::MAX as usize || weights > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{per_sample} inputs per sample or {weights} weights exceed the kernels' 32-bit offsets"),
        ));
    }
    Ok(())
}

/// Validated conv2d geometry as the kernels see it, and the output shape.
fn conv_geom(
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    b: Option<&Tensor<Cuda>>,
    stride: usize,
    pad: usize,
) -> Result<(ConvGeom, Vec<usize>)> {
    let op = "conv2d";
    let shapes::Conv2d {
        n,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        oh,
        ow,
        ..
    } = shapes::conv2d(op, x.shape(), w.shape(), stride, pad)?;
    if let Some(b) = b {
        expect_shape(op, "bias", b.shape(), &[o])?;
    }
    to_i32(op, c * kh * kw)?;
    let g = ConvGeom {
        n: to_i32(op, n)?,
        c: to_i32(op, c)?,
        h: to_i32(op, h)?,
        w: to_i32(op, wd)?,
        o: to_i32(op, o)?,
        oh: to_i32(op, oh)?,
        ow: to_i32(op, ow)?,
        kh: to_i32(op, kh)?,
        kw: to_i32(op, kw)?,
        stride: to_i32(op, stride)?,
        pad: to_i32(op, pad)?,
        k_chunk: 0, // set by gemm_conv
        a_sm: (c * kh * kw) as i64,
        a_sk: 1,
    };
    Ok((g, vec![n, o, oh, ow]))
}

/// The FIR kernels' grid: x over the pixels of one plane, y over the planes (both capped; the
/// kernels loop over the rest). The fixed-factor kernels with 4×4 or 2×2 taps compute a run of
/// `FIR_RUN` pixels per thread (kernels/fir.cu `fir_tiled`).
fn fir_grid(kernel: &str, taps: &FirTaps, planes: usize, pixels: usize) -> (u32, u32, u32) {
    const FIR_RUN: usize = 4;
    let tiled =
        !matches!(kernel, "fir_forward" | "fir_backward") && matches!((taps.kh, taps.kw), (4, 4) | (2, 2));
    let threads = if tiled { pixels.div_ceil(FIR_RUN) } else { pixels };
    (
        threads.div_ceil(BLOCK as usize).clamp(1, 65535) as u32,
        planes.clamp(1, 65535) as u32,
        1,
    )
}

/// Validated FIR geometry (the shared checks plus the kernel's tap limit) and the output size.
fn fir_setup(
    op: &'static str,
    x_shape: &[usize],
    fir: &Fir,
    geom: UpFirDn,
) -> Result<(FirGeomC, FirTaps, usize, usize)> {
    let shapes::UpFirDn2d { h, w, oh, ow, .. } = shapes::upfirdn2d(op, x_shape, fir, geom)?;
    if fir.taps.len() > FIR_MAX_TAPS {
        return Err(Error::shape(
            op,
            format!(
                "FIR {}x{} exceeds the CUDA limit of {FIR_MAX_TAPS} taps",
                fir.kh, fir.kw
            ),
        ));
    }
    let g = FirGeomC {
        h: to_i32(op, h)?,
        w: to_i32(op, w)?,
        oh: to_i32(op, oh)?,
        ow: to_i32(op, ow)?,
        up: to_i32(op, geom.up)?,
        down: to_i32(op, geom.down)?,
        pad0: i32::try_from(geom.pad0).map_err(|_| Error::shape(op, "pad out of range"))?,
        pad1: i32::try_from(geom.pad1).map_err(|_| Error::shape(op, "pad out of range"))?,
    };
    let mut taps = FirTaps {
        taps: [0.0; FIR_MAX_TAPS],
        kh: fir.kh as i32,
        kw: fir.kw as i32,
    };
    taps.taps[..fir.taps.len()].copy_from_slice(&fir.taps);
    Ok((g, taps, oh, ow))
}

impl Backend for Cuda {
    type Buf = Arc<CudaBuf>;

    fn name(&self) -> String {
        format!("cuda: {} ({})", self.inner.device_name, self.precision)
    }

    fn precision_name(&self) -> &'static str {
        self.precision.as_str()
    }

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        let buf = self.inner.pool.alloc(n * 4, n)?;
        if n > 0 {
            self.bind()?;
            drv("cuMemsetD8Async", unsafe {
                result::memset_d8_async(buf.device_ptr(), 0, n * 4, self.inner.stream.cu_stream())
            })?;
        }
        Ok(Tensor::from_buf(shape.to_vec(), Arc::new(buf)))
    }
    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "from_f32",
                format!("{} values for shape {shape:?}", data.len()),
            ));
        }
        let buf = self.inner.pool.alloc(n * 4, n)?;
        if n > 0 {
            self.bind()?;
            // SAFETY: the buffer holds n f32; a copy from pageable memory returns only after the
            // source has been staged, so `data` may be dropped afterwards.
            drv("cuMemcpyHtoDAsync", unsafe {
                result::memcpy_htod_async(buf.device_ptr(), data, self.inner.stream.cu_stream())
            })?;
        }
        Ok(Tensor::from_buf(shape.to_vec(), Arc::new(buf)))
    }
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<Tensor<Self>> {
        let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
        self.from_f32(shape, &v)
    }
    fn to_f32(&self, x: &Tensor<Self>) -> Result<Vec<f32>> {
        let n = x.numel();
        if x.buf().len() != n {
            return Err(Error::shape(
                "to_f32",
                format!("buffer of {} for shape {:?}", x.buf().len(), x.shape()),
            ));
        }
        let mut out = vec![0.0f32; n];
        if n > 0 {
            self.bind()?;
            // SAFETY: `out` has n elements and stays alive until the stream synchronises below.
            drv("cuMemcpyDtoHAsync", unsafe {
                result::memcpy_dtoh_async(&mut out, x.buf().device_ptr(), self.inner.stream.cu_stream())
            })?;
        }
        self.synchronize()?;
        Ok(out)
    }
    fn to_f64(&self, x: &Tensor<Self>) -> Result<Vec<f64>> {
        Ok(self.to_f32(x)?.into_iter().map(f64::from).collect())
    }
    fn synchronize(&self) -> Result<()> {
        drv(
            "synchronizing the CUDA stream (an earlier kernel may have failed)",
            self.inner.stream.synchronize(),
        )
    }

    // ---- elementwise --------------------------------------------------------------------------
    fn add(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.binary("add", "ew_add", a, b)
    }
    fn axpby(&self, alpha: f64, a: &Tensor<Self>, beta: f64, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        same_shape("axpby", a.shape(), b.shape())?;
        let out = self.out(a.shape())?;
        let n = a.numel();
        self.launch_n(
            "ew_axpby",
            n,
            vec![
                Arg::F32(alpha as f32),
                ptr(a),
                Arg::F32(beta as f32),
                ptr(b),
                ptr(&out),
                Arg::I64(n as i64),
            ],
        )?;
        Ok(out)
    }
    fn mul(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.binary("mul", "ew_mul", a, b)
    }
    fn affine(&self, x: &Tensor<Self>, scale: f64, shift: f64) -> Result<Tensor<Self>> {
        let out = self.out(x.shape())?;
        let n = x.numel();
        self.launch_n(
            "ew_affine",
            n,
            vec![
                ptr(x),
                Arg::F32(scale as f32),
                Arg::F32(shift as f32),
                ptr(&out),
                Arg::I64(n as i64),
            ],
        )?;
        Ok(out)
    }
    fn scale_per_sample(&self, x: &Tensor<Self>, s: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "scale_per_sample";
        let n = shapes::scale_per_sample(op, x.shape(), s.shape())?;
        let out = self.out(x.shape())?;
        let total = x.numel();
        let per = total.checked_div(n).unwrap_or(0);
        self.launch_n(
            "ew_scale_per_sample",
            total,
            vec![
                ptr(x),
                ptr(s),
                ptr(&out),
                Arg::I64(total as i64),
                Arg::I64(per as i64),
            ],
        )?;
        Ok(out)
    }
    fn silu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let out = self.out(x.shape())?;
        let n = x.numel();
        self.launch_n("ew_silu", n, vec![ptr(x), ptr(&out), Arg::I64(n as i64)])?;
        Ok(out)
    }
    fn silu_backward(&self, x: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.binary("silu_backward", "ew_silu_backward", x, dy)
    }
    fn add_channel_bias(&self, x: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "add_channel_bias";
        let (_, _, h, w) = shapes::channel_bias(op, x.shape(), b.shape())?;
        let out = self.out(x.shape())?;
        let total = x.numel();
        self.launch_n(
            "ew_add_channel_bias",
            total,
            vec![
                ptr(x),
                ptr(b),
                ptr(&out),
                Arg::I64(total as i64),
                Arg::I64((h * w) as i64),
            ],
        )?;
        Ok(out)
    }
    fn sum_spatial(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let (n, c, h, w) = x.dims4("sum_spatial")?;
        let out = self.out(&[n, c])?;
        let rows = n * c;
        if rows > 0 {
            let rows32 = u32::try_from(rows).map_err(|_| Error::shape("sum_spatial", "too many rows"))?;
            self.launch(
                "reduce_row_sum",
                (rows32, 1, 1),
                BLOCK,
                0,
                vec![ptr(x), ptr(&out), Arg::I64((h * w) as i64)],
            )?;
        }
        Ok(out)
    }
    fn sum_squares_per_sample(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "sum_squares_per_sample";
        let n = shapes::batch(op, x.shape())?;
        let out = self.out(&[n])?;
        if n == 0 {
            return Ok(out);
        }
        let per = x.numel() / n;
        // Enough blocks per sample to fill the chip, then one block per sample sums the partials.
        let parts = per.div_ceil(BLOCK as usize * 16).clamp(1, 256);
        let partial = self.alloc(n * parts * 2)?; // n·parts doubles
        let n32 = u32::try_from(n).map_err(|_| Error::shape(op, "batch too large"))?;
        self.launch(
            "reduce_sumsq_partial",
            (parts as u32, n32, 1),
            BLOCK,
            0,
            vec![ptr(x), Arg::Ptr(partial.device_ptr()), Arg::I64(per as i64)],
        )?;
        self.launch(
            "reduce_row_sum_d",
            (n32, 1, 1),
            BLOCK,
            0,
            vec![Arg::Ptr(partial.device_ptr()), ptr(&out), Arg::I64(parts as i64)],
        )?;
        Ok(out)
    }

    // ---- layout -------------------------------------------------------------------------------
    fn concat_channels(&self, xs: &[&Tensor<Self>]) -> Result<Tensor<Self>> {
        let op = "concat_channels";
        let (n, ctot, h, w) = shapes::concat_channels(op, xs.iter().map(|x| x.shape()))?;
        let out = self.out(&[n, ctot, h, w])?;
        let hw = h * w;
        let mut c0 = 0;
        for x in xs {
            let cx = x.shape()[1];
            self.copy_rows(x, &out, n, cx * hw, cx * hw, 0, ctot * hw, c0 * hw)?;
            c0 += cx;
        }
        Ok(out)
    }
    fn slice_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        let op = "slice_channels";
        let (n, c, h, w) = shapes::slice_channels(op, x.shape(), start, len)?;
        let out = self.out(&[n, len, h, w])?;
        let hw = h * w;
        self.copy_rows(x, &out, n, len * hw, c * hw, start * hw, len * hw, 0)?;
        Ok(out)
    }
    fn interleave_channels(&self, x: &Tensor<Self>, y: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "interleave_channels";
        let (n, c, h, w) = x.dims4(op)?;
        same_shape(op, x.shape(), y.shape())?;
        let out = self.out(&[n, 2 * c, h, w])?;
        let total = out.numel();
        self.launch_n(
            "ew_interleave",
            total,
            vec![
                ptr(x),
                ptr(y),
                ptr(&out),
                Arg::I64(total as i64),
                Arg::I64(c as i64),
                Arg::I64((h * w) as i64),
            ],
        )?;
        Ok(out)
    }

    // ---- dense layers -------------------------------------------------------------------------
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, b: Option<&Tensor<Self>>) -> Result<Tensor<Self>> {
        let op = "linear";
        let (n, i, o) = shapes::linear(op, x.shape(), w.shape(), b.map(|b| b.shape()))?;
        // One warp per output, always f32 (these layers are tiny: kernels/conv.cu linear_warp).
        let out = self.out(&[n, o])?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let threads = (n * o).saturating_mul(32);
        self.launch(
            "linear_warp",
            (grid_for(threads), 1, 1),
            BLOCK,
            0,
            vec![
                ptr(x),
                ptr(w),
                b.map_or(Arg::Ptr(0), ptr),
                ptr(&out),
                Arg::I32(to_i32(op, n)?),
                Arg::I32(to_i32(op, i)?),
                Arg::I32(to_i32(op, o)?),
            ],
        )?;
        Ok(out)
    }
    fn linear_backward(&self, x: &Tensor<Self>, w: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Grads3<Self>> {
        backward::linear_backward(self, x, w, dy)
    }
    fn nin(&self, x: &Tensor<Self>, w: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "nin";
        let (n, c, h, wd, o) = shapes::nin(op, x.shape(), w.shape(), Some(b.shape()))?;
        // A 1×1 convolution whose weight is stored (in, out): A[m, k] = w[k·O + m].
        let g = ConvGeom {
            n: to_i32(op, n)?,
            c: to_i32(op, c)?,
            h: to_i32(op, h)?,
            w: to_i32(op, wd)?,
            o: to_i32(op, o)?,
            oh: to_i32(op, h)?,
            ow: to_i32(op, wd)?,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
            k_chunk: 0, // set by gemm_conv
            a_sm: 1,
            a_sk: o as i64,
        };
        self.gemm_conv(self.precision, x, w, Some(b), g, &[n, o, h, wd])
    }
    fn nin_backward(&self, x: &Tensor<Self>, w: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Grads3<Self>> {
        backward::nin_backward(self, x, w, dy)
    }
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor<Self>> {
        let (g, out_shape) = conv_geom(x, w, b, stride, pad)?;
        self.gemm_conv(self.precision, x, w, b, g, &out_shape)
    }
    fn conv2d_fused(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Self>,
    ) -> Result<Tensor<Self>> {
        Ok(self.conv_fused(x, w, b, stride, pad, epi)?.0)
    }
    type ConvSaved = ConvInput;
    fn conv2d_fused_saving(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Self>,
    ) -> Result<(Tensor<Self>, ConvInput)> {
        let (y, xh) = self.conv_fused(x, w, b, stride, pad, epi)?;
        let (n, c, _, _) = x.dims4("conv2d")?;
        let p = n * y.shape()[2] * y.shape()[3];
        let saved = match xh {
            Some(copy) if backward::dw_reads_nhwc(self, self.precision, c, p) => ConvInput::Nhwc {
                copy,
                shape: x.shape().to_vec(),
            },
            _ => ConvInput::Tensor(x.clone()),
        };
        Ok((y, saved))
    }
    fn conv2d_backward_saved(
        &self,
        x: &ConvInput,
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
        stride: usize,
        pad: usize,
    ) -> Result<Grads3<Self>> {
        backward::conv2d_backward_from(self, x, w, dy, stride, pad)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
        stride: usize,
        pad: usize,
    ) -> Result<Grads3<Self>> {
        backward::conv2d_backward_from(self, &ConvInput::Tensor(x.clone()), w, dy, stride, pad)
    }

    // ---- normalisation ------------------------------------------------------------------------
    fn group_norm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor<Self>> {
        Ok(self.gn_forward(x, gamma, beta, groups, eps, silu)?.0)
    }
    type NormSaved = Option<GnStats>;
    fn group_norm_saving(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor<Self>, Option<GnStats>)> {
        self.gn_forward(x, gamma, beta, groups, eps, silu)
    }
    fn group_norm_backward_saved(
        &self,
        x: &Tensor<Self>,
        saved: &Option<GnStats>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Grads3<Self>> {
        backward::group_norm_backward(self, x, saved.as_ref(), gamma, beta, dy, groups, eps, silu)
    }
    fn group_norm_backward(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Grads3<Self>> {
        backward::group_norm_backward(self, x, None, gamma, beta, dy, groups, eps, silu)
    }

    // ---- attention ----------------------------------------------------------------------------
    fn attention(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "attention";
        let (n, c, h, w) = shapes::attention(op, q.shape(), &[k.shape(), v.shape()])?;
        let l = h * w;
        if l > ATTENTION_MAX_L {
            return Err(Error::Backend(format!(
                "attention over L = {l} positions exceeds the fused CUDA kernel's limit of {ATTENTION_MAX_L}"
            )));
        }
        let out = self.out(q.shape())?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let scale = (1.0 / (c as f64).sqrt()) as f32;
        // Fewer queries per block when 16-query blocks would not fill the device (small batches):
        // the widest of 16, 4, 2 that gives a block per multiprocessor.
        let sms = self.inner.sm_count;
        let (tq, kernel) = [(ATTN_TQ, "attn_forward"), (4, "attn_forward_q4")]
            .into_iter()
            .find(|&(tq, _)| n * l.div_ceil(tq) >= sms)
            .unwrap_or((2, "attn_forward_q2"));
        let smem = (tq * (l + 1) * 4) as u32;
        self.launch(
            kernel,
            (l.div_ceil(tq) as u32, to_i32(op, n)? as u32, 1),
            256,
            smem,
            vec![
                ptr(q),
                ptr(k),
                ptr(v),
                ptr(&out),
                Arg::I32(to_i32(op, c)?),
                Arg::I32(l as i32),
                Arg::F32(scale),
            ],
        )?;
        Ok(out)
    }
    fn attention_backward(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        backward::attention_backward(self, q, k, v, dy)
    }

    // ---- FIR resampling -----------------------------------------------------------------------
    fn upfirdn2d(&self, x: &Tensor<Self>, fir: &Fir, geom: UpFirDn) -> Result<Tensor<Self>> {
        let (g, taps, oh, ow) = fir_setup("upfirdn2d", x.shape(), fir, geom)?;
        let (n, c) = (x.shape()[0], x.shape()[1]);
        let out = self.out(&[n, c, oh, ow])?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let kernel = match (geom.up, geom.down) {
            (2, 1) => "fir_forward_up2",
            (1, 2) => "fir_forward_down2",
            (1, 1) => "fir_forward_same",
            _ => "fir_forward",
        };
        self.launch(
            kernel,
            fir_grid(kernel, &taps, n * c, oh * ow),
            BLOCK,
            0,
            vec![ptr(x), ptr(&out), Arg::I64((n * c) as i64), raw(&g), raw(&taps)],
        )?;
        Ok(out)
    }
    fn upfirdn2d_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: &[usize],
        fir: &Fir,
        geom: UpFirDn,
    ) -> Result<Tensor<Self>> {
        let op = "upfirdn2d_backward";
        let (g, taps, oh, ow) = fir_setup(op, x_shape, fir, geom)?;
        expect_shape(op, "dy", dy.shape(), &[x_shape[0], x_shape[1], oh, ow])?;
        let dx = self.out(x_shape)?;
        if dx.numel() == 0 {
            return Ok(dx);
        }
        let kernel = match (geom.up, geom.down) {
            (2, 1) => "fir_backward_up2",
            (1, 2) => "fir_backward_down2",
            (1, 1) => "fir_backward_same",
            _ => "fir_backward",
        };
        let planes = x_shape[0] * x_shape[1];
        self.launch(
            kernel,
            fir_grid(kernel, &taps, planes, x_shape[2] * x_shape[3]),
            BLOCK,
            0,
            vec![ptr(dy), ptr(&dx), Arg::I64(planes as i64), raw(&g), raw(&taps)],
        )?;
        Ok(dx)
    }

    // ---- embeddings ---------------------------------------------------------------------------
    fn fourier_embedding(&self, sigma: &Tensor<Self>, w: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = "fourier_embedding";
        let (n, m) = shapes::fourier_embedding(op, sigma.shape(), w.shape())?;
        let out = self.out(&[n, 2 * m])?;
        self.launch_n(
            "embed_fourier",
            n * m,
            vec![
                ptr(sigma),
                ptr(w),
                ptr(&out),
                Arg::I32(to_i32(op, n)?),
                Arg::I32(to_i32(op, m)?),
            ],
        )?;
        Ok(out)
    }
    fn sinusoidal_embedding(&self, t: &Tensor<Self>, dim: usize, max_positions: f64) -> Result<Tensor<Self>> {
        let op = "sinusoidal_embedding";
        let n = shapes::sinusoidal_embedding(op, t.shape(), dim)?;
        let half = dim / 2;
        // Rounded to f32 exactly as the CPU twin does.
        let step = (-(max_positions.ln() / (half - 1) as f64)) as f32;
        let out = self.out(&[n, dim])?;
        self.launch_n(
            "embed_sinusoidal",
            n * half,
            vec![
                ptr(t),
                ptr(&out),
                Arg::I32(to_i32(op, n)?),
                Arg::I32(to_i32(op, half)?),
                Arg::F32(step),
            ],
        )?;
        Ok(out)
    }

    // ---- randomness ---------------------------------------------------------------------------
    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor<Self>> {
        let out = self.out(shape)?;
        let n = out.numel();
        self.launch_n(
            "rng_normal",
            n,
            vec![ptr(&out), Arg::I64(n as i64), Arg::U64(seed), Arg::U64(offset)],
        )?;
        Ok(out)
    }
    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor<Self>> {
        let out = self.out(shape)?;
        let n = out.numel();
        self.launch_n(
            "rng_uniform",
            n,
            vec![ptr(&out), Arg::I64(n as i64), Arg::U64(seed), Arg::U64(offset)],
        )?;
        Ok(out)
    }
    fn dropout_mask(&self, shape: &[usize], p: f64, seed: u64, offset: u64) -> Result<Tensor<Self>> {
        shapes::dropout_probability(p)?;
        let keep = (1.0 / (1.0 - p)) as f32;
        let out = self.out(shape)?;
        let n = out.numel();
        self.launch_n(
            "rng_dropout_mask",
            n,
            vec![
                ptr(&out),
                Arg::I64(n as i64),
                Arg::F64(p),
                Arg::F32(keep),
                Arg::U64(seed),
                Arg::U64(offset),
            ],
        )?;
        Ok(out)
    }

    // ---- optimiser (src/backend/cuda/optim.rs) ----------------------------------------------
    fn adam_update(
        &self,
        p: &Tensor<Self>,
        g: &Tensor<Self>,
        m: &Tensor<Self>,
        v: &Tensor<Self>,
        hp: &AdamStep,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        optim::adam_update(self, p, g, m, v, hp)
    }
    fn ema_update(&self, shadow: &Tensor<Self>, p: &Tensor<Self>, decay: f64) -> Result<Tensor<Self>> {
        optim::ema_update(self, shadow, p, decay)
    }
    fn adam_update_many(
        &self,
        params: &[&Tensor<Self>],
        grads: &[&Tensor<Self>],
        m: &[&Tensor<Self>],
        v: &[&Tensor<Self>],
        hp: &AdamStep,
    ) -> Result<Vec<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>> {
        optim::adam_update_many(self, params, grads, m, v, hp)
    }
    fn ema_update_many(
        &self,
        shadows: &[&Tensor<Self>],
        params: &[&Tensor<Self>],
        decay: f64,
    ) -> Result<Vec<Tensor<Self>>> {
        optim::ema_update_many(self, shadows, params, decay)
    }
    fn squared_norms(&self, xs: &[&Tensor<Self>]) -> Result<Vec<f64>> {
        optim::squared_norms(self, xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_plan_covers_k_with_nonempty_aligned_parts() {
        for precision in Precision::ALL {
            for &m in &[3, 128, 256, 1000] {
                for &p in &[1, 4, 64, 256, 1024, 16384, 1 << 20] {
                    for &k in &[1, 27, 128, 1152, 2304, 4608, 9999] {
                        let plan = conv_plan(precision, m, p, k, 132);
                        let what = format!("{precision} m{m} p{p} k{k}: {plan:?}");
                        assert!(plan.splits >= 1 && plan.splits <= CONV_MAX_SPLITS, "{what}");
                        assert!(plan.splits * plan.k_chunk >= k, "{what}");
                        assert!(
                            (plan.splits - 1) * plan.k_chunk < k.max(1),
                            "{what}: an empty part"
                        );
                        if plan.splits > 1 {
                            assert_eq!(plan.k_chunk % CONV_K_ALIGN, 0, "{what}");
                            assert!(plan.k_chunk >= CONV_MIN_SPLIT_K / 2, "{what}");
                        }
                        assert!(plan.tile_n == 64 || plan.tile_n == 128, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn mma_plan_covers_the_k_tiles_with_nonempty_parts() {
        for &m in &[3, 64, 128, 256, 1000] {
            for &p in &[1, 4, 64, 256, 1024, 16384, 1 << 20] {
                for &tiles in &[1, 2, 9, 36, 72, 144, 1000] {
                    let plan = mma_plan(&MMA_KERNELS, m, p, tiles, 132);
                    let what = format!("m{m} p{p} tiles{tiles}: {plan:?}");
                    assert!(plan.splits >= 1 && plan.splits <= CONV_MAX_SPLITS, "{what}");
                    assert!(plan.splits * plan.tiles_per_split >= tiles, "{what}");
                    assert!(
                        (plan.splits - 1) * plan.tiles_per_split < tiles,
                        "{what}: an empty part"
                    );
                    if plan.splits > 1 {
                        assert!(plan.tiles_per_split >= 4, "{what}");
                    }
                    let expect_smem = if plan.tile_n == 128 { 108_544 } else { 75_776 };
                    assert_eq!(plan.smem_bytes, expect_smem, "{what}");
                    let wide = m.div_ceil(CONV_TILE_M) * p.div_ceil(128) >= 132;
                    assert_eq!(plan.tile_n == 128, wide, "{what}");
                }
            }
        }
    }

    #[test]
    fn conv_plan_splits_small_gemms_only() {
        // Batch 64 at 128×128: plenty of blocks, wide tiles, no workspace.
        let big = conv_plan(Precision::Bf16, 128, 64 * 128 * 128, 1152, 132);
        assert_eq!((big.kernel, big.tile_n, big.splits), ("conv_bf16", 128, 1));
        // Batch 1 at 16×16 with 256 channels: 8 narrow blocks, so K is split.
        let small = conv_plan(Precision::Tf32, 256, 256, 2304, 132);
        assert_eq!((small.kernel, small.tile_n), ("conv_tf32_n64", 64));
        assert!(small.splits >= 8, "{small:?}");
        let f32_small = conv_plan(Precision::F32, 256, 64, 2304, 132);
        assert!(f32_small.splits > 1, "{f32_small:?}");
    }
}
