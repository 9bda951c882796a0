//! The stride-1 convolutions on AMX tiles (Intel Sapphire Rapids and later): bf16 operands, f32
//! accumulation — the precision the CUDA backend's bf16 GEMMs train with. Opt-in per backend
//! (`Cpu::with_bf16_tiles`, `--precision bf16 --device cpu`); every other product keeps the f32
//! kernels, and the f32 route stays the default and the one the golden tests pin.
//!
//! One task of [`super::conv`]'s direct convolution (an image, a band of output rows, a block of
//! output channels) converts the input rows its band reads to bf16 once, channel pairs
//! interleaved and zero-padded: `slab[pair][row][column][2]`. For tap (ky, kx) the 16 channel pairs
//! × 16 output columns a B tile needs are then 16 rows of 64 contiguous bytes, one channel-pair
//! plane apart: a single strided tile load, no im2col. A tiles are the weights of one tap and 16
//! output channels ([`ConvWeights`], converted once per call); C tiles are 16 output channels ×
//! 16 columns, loaded from the output rows (prefilled with the epilogue) and stored back into them.
//!
//! The tile instructions are written as inline assembly (stable Rust has no AMX intrinsics); the
//! tile registers are invisible to the compiler, so nothing else touches them between the
//! `asm!` blocks of one task, which configures the tiles at its start and releases them at its end.
use std::arch::asm;
use std::sync::OnceLock;

use super::conv::{padded_row, ConvGeom};
use super::simd::{block_sum, vectorized};

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tiles (asked once).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && request_tile_permission())
}

fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // cpuid is on every x86_64 CPU; leaf 7 exists when leaf 0 says so.
        let max_leaf = std::arch::x86_64::__cpuid(0).eax;
        if max_leaf < 7 {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let (amx_bf16, amx_tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Linux gives a process the (8 KiB) tile state only when asked: arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA). Elsewhere: no tiles.
fn request_tile_permission() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it only changes which register
        // state the kernel saves for this process.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64")))]
    false
}

/// f32 → bf16 bits, rounded to nearest even (NaN stays a quiet NaN): `half`'s conversion.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The value of bf16 bits.
#[cfg(test)]
pub(crate) fn bf16_value(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

/// Output channels per A and C tile, and output columns per C and B tile.
const TILE: usize = 16;

/// Whether a conv fits the tiles: stride 1, input and output channels in multiples of 16 and
/// output rows in multiples of 16 columns (every ve-res conv but the RGB input and output ones).
pub(crate) fn applies(g: &ConvGeom) -> bool {
    g.stride == 1
        && g.c.is_multiple_of(TILE)
        && g.c > 0
        && g.o.is_multiple_of(TILE)
        && g.o > 0
        && g.ow.is_multiple_of(TILE)
        && g.ow > 0
        // The B tiles of the last column block read up to column ow + kw − 2 of the padded row.
        && g.ow + g.kw - 1 <= g.w + 2 * g.pad
}

/// Input channels per tile product: 32 (a full tile's K) when they divide the input's, else 16.
fn k_block(c: usize) -> usize {
    if c.is_multiple_of(32) {
        32
    } else {
        16
    }
}

/// A conv's weights as A tiles: for each tap, each block of `kb` input channels, every output
/// channel's `kb` weights (times alpha), bf16: `a[((tap·nkb + kblock)·O + o)·kb + j]`.
pub(crate) struct ConvWeights {
    a: Vec<u16>,
    kb: usize,
    nkb: usize,
    o: usize,
}

impl ConvWeights {
    /// `w`: [O, C, kh, kw] f32; `alpha` scales every weight before rounding (the epilogue's
    /// factor on the product).
    pub(crate) fn new(g: &ConvGeom, w: &[f32], alpha: f32) -> Self {
        let (kb, taps) = (k_block(g.c), g.kh * g.kw);
        let nkb = g.c / kb;
        let mut a = vec![0u16; taps * g.c * g.o];
        for (t, per_tap) in a.chunks_exact_mut(nkb * g.o * kb).enumerate() {
            for (blk, per_block) in per_tap.chunks_exact_mut(g.o * kb).enumerate() {
                for (o, row) in per_block.chunks_exact_mut(kb).enumerate() {
                    for (j, d) in row.iter_mut().enumerate() {
                        let c = blk * kb + j;
                        *d = bf16_bits(alpha * w[(o * g.c + c) * taps + t]);
                    }
                }
            }
        }
        ConvWeights { a, kb, nkb, o: g.o }
    }

    fn tile(&self, tap: usize, kblock: usize, o0: usize) -> *const u16 {
        self.a[((tap * self.nkb + kblock) * self.o + o0) * self.kb..].as_ptr()
    }
}

/// The bf16 slab of one band: input rows oy0 − pad .. oy0 + rows − 1 − pad + kh − 1 (zeros outside
/// the image), each w + 2·pad wide, channel pairs interleaved; returns the distance between
/// channel-pair planes in elements. Every element is written (the buffer is reused uncleared).
pub(crate) fn fill_pair_slab(
    g: &ConvGeom,
    x_img: &[f32],
    oy0: usize,
    rows: usize,
    slab: &mut Vec<u16>,
) -> usize {
    let wp = g.w + 2 * g.pad;
    let slab_rows = rows + g.kh - 1;
    let pair_plane = slab_rows * wp * 2;
    slab.resize(g.c / 2 * pair_plane, 0);
    vectorized(
        #[inline(always)]
        || {
            for (pair, plane) in slab.chunks_exact_mut(pair_plane).enumerate() {
                for (sr, row) in plane.chunks_exact_mut(wp * 2).enumerate() {
                    let iy = (oy0 + sr) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        row.fill(0);
                        continue;
                    }
                    let at = |c: usize| &x_img[(c * g.h + iy as usize) * g.w..][..g.w];
                    let (even, odd) = (at(2 * pair), at(2 * pair + 1));
                    let (left, rest) = row.split_at_mut(2 * g.pad);
                    let (mid, right) = rest.split_at_mut(2 * g.w);
                    left.fill(0);
                    for ((d, &e), &o) in mid.chunks_exact_mut(2).zip(even).zip(odd) {
                        d[0] = bf16_bits(e);
                        d[1] = bf16_bits(o);
                    }
                    right.fill(0);
                }
            }
        },
    );
    pair_plane
}

/// The 64-byte tile configuration (palette 1): (rows, bytes per row) of tiles 0–7.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(shapes: [(usize, usize); 8]) -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for (tile, (rows, bytes_per_row)) in shapes.into_iter().enumerate() {
            cfg[16 + 2 * tile..][..2].copy_from_slice(&(bytes_per_row as u16).to_le_bytes());
            cfg[48 + tile] = rows as u8;
        }
        TileConfig(cfg)
    }

    /// The forward's: tiles 0–3 are C (16 rows of 16 f32), 4 is A (16 rows of kb bf16), 5 is B
    /// (kb/2 rows of 16 bf16 pairs).
    fn forward(kb: usize) -> Self {
        let c = (TILE, TILE * 4);
        Self::new([c, c, c, c, (TILE, kb * 2), (kb / 2, TILE * 4), (0, 0), (0, 0)])
    }

    /// The weight gradient's: every tile 16 rows of 64 bytes (C: 16 f32; A: 32 bf16; B: 16 pairs).
    fn weight_grad() -> Self {
        Self::new([(TILE, 64); 8])
    }

    /// Loads this configuration into the calling thread's tile unit.
    ///
    /// # Safety
    /// The CPU has AMX and the process the permission ([`available`]).
    unsafe fn load(&self) {
        asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly));
    }
}

macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}
macro_rules! tile_load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{b} + {s}*1]"), b = in(reg) $ptr, s = in(reg) $stride,
             options(nostack, readonly))
    };
}
macro_rules! tile_store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{b} + {s}*1], tmm", $t), b = in(reg) $ptr, s = in(reg) $stride,
             options(nostack))
    };
}
/// C tile c += A tile a · B tile b.
macro_rules! tile_dot_ab {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem)
        )
    };
}

/// C tile `s` (0..4) = zeros, or the 16×16 f32 block at `p` (rows `stride` bytes apart).
#[inline(always)]
unsafe fn c_init(s: usize, p: *const f32, stride: usize, load: bool) {
    match (s, load) {
        (0, true) => tile_load!(0, p, stride),
        (1, true) => tile_load!(1, p, stride),
        (2, true) => tile_load!(2, p, stride),
        (3, true) => tile_load!(3, p, stride),
        (0, false) => tile_zero!(0),
        (1, false) => tile_zero!(1),
        (2, false) => tile_zero!(2),
        _ => tile_zero!(3),
    }
}

/// C tile `s` += A (tile 4) · B (tile 5).
#[inline(always)]
unsafe fn c_dot(s: usize) {
    match s {
        0 => tile_dot_ab!(0, 4, 5),
        1 => tile_dot_ab!(1, 4, 5),
        2 => tile_dot_ab!(2, 4, 5),
        _ => tile_dot_ab!(3, 4, 5),
    }
}

#[inline(always)]
unsafe fn c_store(s: usize, p: *mut f32, stride: usize) {
    match s {
        0 => tile_store!(0, p, stride),
        1 => tile_store!(1, p, stride),
        2 => tile_store!(2, p, stride),
        _ => tile_store!(3, p, stride),
    }
}

/// One direct-conv task on the tiles: output channels o0..o1 (multiples of 16) of the band's
/// `rows` output rows, out[o, r, col] (+)= Σ A·B, where `out` points at channel 0, row 0 of the
/// band in this image's output (channel planes `ldc` elements apart, rows `g.ow`) and `slab` is
/// the band's [`fill_pair_slab`]. `accumulate`: add onto what `out` holds (the prefilled
/// epilogue), else overwrite.
///
/// # Safety
/// The CPU has AMX-BF16 and this process has the tile permission ([`available`]); `out` is valid
/// for the rows and channels named, which no other thread writes meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn conv_band(
    g: &ConvGeom,
    wts: &ConvWeights,
    slab: &[u16],
    pair_plane: usize,
    rows: usize,
    (o0, o1): (usize, usize),
    out: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(o0.is_multiple_of(TILE) && o1.is_multiple_of(TILE) && applies(g));
    let wp = g.w + 2 * g.pad;
    let (kb, taps) = (wts.kb, g.kh * g.kw);
    TileConfig::forward(kb).load();
    let (a_stride, b_stride, c_stride) = (kb * 2, pair_plane * 2, ldc * 4);
    for r in 0..rows {
        for col0 in (0..g.ow).step_by(4 * TILE) {
            let strips = ((g.ow - col0) / TILE).min(4);
            for ob in (o0..o1).step_by(TILE) {
                let c_at = |s: usize| out.add(ob * ldc + r * g.ow + col0 + s * TILE);
                for s in 0..strips {
                    c_init(s, c_at(s), c_stride, accumulate);
                }
                for t in 0..taps {
                    let (ky, kx) = (t / g.kw, t % g.kw);
                    for blk in 0..wts.nkb {
                        tile_load!(4, wts.tile(t, blk, ob), a_stride);
                        // Pair plane blk·kb/2, slab row r + ky, column col0 + kx (+16 per strip).
                        let b0 = slab
                            .as_ptr()
                            .add(blk * kb / 2 * pair_plane + ((r + ky) * wp + col0 + kx) * 2);
                        for s in 0..strips {
                            tile_load!(5, b0.add(s * TILE * 2), b_stride);
                            c_dot(s);
                        }
                    }
                }
                for s in 0..strips {
                    c_store(s, c_at(s), c_stride);
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Bytes of bf16 operands a weight-gradient band converts (its input in two pair layouts and its
/// dY): the band stays in L2 while the tiles sweep it once per tap.
const WEIGHT_GRAD_BAND_BYTES: usize = 1 << 20;

/// The buffers of [`weight_grad_image`], reused from band to band.
#[derive(Default)]
pub(crate) struct WeightGradBuffers {
    // 32-bit words: the pair layouts are built by a 32-bit transpose, which wants them aligned.
    lines: Vec<u32>,
    lines_odd: Vec<u32>,
    even: Vec<u32>,
    odd: Vec<u32>,
    dy: Vec<u16>,
}

/// `v` resized to `words` 32-bit words, as 2·`words` bf16 slots.
fn bf16_slots(v: &mut Vec<u32>, words: usize) -> &mut [u16] {
    v.resize(words, 0);
    // SAFETY: u16 has no invalid values and a weaker alignment than u32; the view covers v's
    // words exactly and borrows v mutably.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u16, 2 * words) }
}

/// Adds one image's weight gradient of a stride-1 conv into `acc` ([tap][O][C] f32, C
/// contiguous) and its bias gradient into `db` (f64 per output channel), on the tiles:
/// C[o][c] += Σ_q dY[o][q]·x[c][q + shift(tap)] with the output positions q as the inner
/// dimension. In a band's padded coordinates (q = row·wp + column, the columns past the output's
/// zero in dY) every tap is one shift of the input, so A tiles are dY rows (32 positions of 16
/// channels) and B tiles 16 position pairs × 16 input channels of the input in pair layout —
/// `even[pair][c][2]` = x[c] at 2·pair and 2·pair + 1, `odd` the same one position on, for the odd
/// shifts. Each tile quadruple (2 × 16 output channels by 2 × 16 input channels) accumulates a
/// whole band in the tile registers.
///
/// # Safety
/// [`available`]; [`applies`]`(g)`; `acc` is taps·O·C long, `db` O long.
pub(crate) unsafe fn weight_grad_image(
    g: &ConvGeom,
    x_img: &[f32],
    dy_img: &[f32],
    acc: &mut [f32],
    db: &mut [f64],
    bufs: &mut WeightGradBuffers,
) {
    let (c, o, taps) = (g.c, g.o, g.kh * g.kw);
    debug_assert!(acc.len() == taps * o * c && db.len() == o && applies(g));
    let wp = g.w + 2 * g.pad;
    let max_shift = (g.kh - 1) * wp + g.kw - 1;
    let band = (WEIGHT_GRAD_BAND_BYTES / ((4 * c + 2 * o) * wp)).clamp(1, g.oh);
    TileConfig::weight_grad().load();
    for oy0 in (0..g.oh).step_by(band) {
        let rows = band.min(g.oh - oy0);
        let span = (rows * wp).next_multiple_of(32);
        // Positions the B tiles read: up to span − 1 + max_shift, + 1 in the odd layout.
        let pairs = (span + max_shift + 2).div_ceil(2);
        let npos = 2 * pairs + 2;
        // The band's input, channel-major and zero-padded: lines[ch][q], and lines_odd[ch][q] =
        // lines[ch][q + 1].
        let lines = bf16_slots(&mut bufs.lines, c * npos / 2);
        let lines_odd = bf16_slots(&mut bufs.lines_odd, c * npos / 2);
        vectorized(
            #[inline(always)]
            || {
                for (ch, (line, odd)) in lines
                    .chunks_exact_mut(npos)
                    .zip(lines_odd.chunks_exact_mut(npos))
                    .enumerate()
                {
                    for (sr, row) in line.chunks_mut(wp).enumerate() {
                        let iy = (oy0 + sr) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize || row.len() < wp {
                            row.fill(0);
                            continue;
                        }
                        padded_row(
                            row,
                            g.pad,
                            &x_img[(ch * g.h + iy as usize) * g.w..][..g.w],
                            bf16_bits,
                        );
                    }
                    odd[..npos - 1].copy_from_slice(&line[1..]);
                    odd[npos - 1] = 0;
                }
            },
        );
        // The two pair layouts: [pair][ch] of 32-bit words (a bf16 pair each), transposes of the
        // lines read as [ch][pair] words (a copy of bits).
        bufs.even.resize(pairs * c, 0);
        bufs.odd.resize(pairs * c, 0);
        for (from, to) in [(&bufs.lines, &mut bufs.even), (&bufs.lines_odd, &mut bufs.odd)] {
            // SAFETY: `from` holds c rows of npos/2 words, `to` pairs rows of c words
            // (pairs ≤ npos/2); the buffers are distinct. A transpose copies bits.
            unsafe {
                super::sgemm::transpose(
                    from.as_ptr() as *const f32,
                    npos / 2,
                    c,
                    pairs,
                    to.as_mut_ptr() as *mut f32,
                    c,
                )
            };
        }
        // dY in the band's coordinates (zeros past each output row and past the band), and the
        // bias gradient from the same rows.
        bufs.dy.resize(o * span, 0);
        vectorized(
            #[inline(always)]
            || {
                for (oc, row) in bufs.dy.chunks_exact_mut(span).enumerate() {
                    for (r, seg) in row.chunks_mut(wp).enumerate() {
                        if r >= rows {
                            seg.fill(0);
                            continue;
                        }
                        padded_row(seg, 0, &dy_img[(oc * g.oh + oy0 + r) * g.ow..][..g.ow], bf16_bits);
                    }
                    db[oc] += block_sum(&dy_img[(oc * g.oh + oy0) * g.ow..][..rows * g.ow], |v| v);
                }
            },
        );
        let (dy, a_stride, b_stride, c_stride) = (bufs.dy.as_ptr(), span * 2, c * 4, c * 4);
        let acc = acc.as_mut_ptr();
        for t in 0..taps {
            let shift = t / g.kw * wp + t % g.kw;
            let (xs, pair0) = if shift.is_multiple_of(2) {
                (bufs.even.as_ptr() as *const u16, shift / 2)
            } else {
                (bufs.odd.as_ptr() as *const u16, (shift - 1) / 2)
            };
            for ob in (0..o).step_by(2 * TILE) {
                let two_o = ob + TILE < o;
                for cb in (0..c).step_by(2 * TILE) {
                    let two_c = cb + TILE < c;
                    let c_at = |i: usize, j: usize| acc.add((t * o + ob + TILE * i) * c + cb + TILE * j);
                    tile_load!(0, c_at(0, 0), c_stride);
                    if two_c {
                        tile_load!(1, c_at(0, 1), c_stride);
                    }
                    if two_o {
                        tile_load!(2, c_at(1, 0), c_stride);
                    }
                    if two_o && two_c {
                        tile_load!(3, c_at(1, 1), c_stride);
                    }
                    for q0 in (0..span).step_by(32) {
                        tile_load!(4, dy.add(ob * span + q0), a_stride);
                        let b = xs.add(((pair0 + q0 / 2) * c + cb) * 2);
                        tile_load!(6, b, b_stride);
                        tile_dot_ab!(0, 4, 6);
                        if two_c {
                            tile_load!(7, b.add(TILE * 2), b_stride);
                            tile_dot_ab!(1, 4, 7);
                        }
                        if two_o {
                            tile_load!(5, dy.add((ob + TILE) * span + q0), a_stride);
                            tile_dot_ab!(2, 5, 6);
                            if two_c {
                                tile_dot_ab!(3, 5, 7);
                            }
                        }
                    }
                    tile_store!(0, c_at(0, 0), c_stride);
                    if two_c {
                        tile_store!(1, c_at(0, 1), c_stride);
                    }
                    if two_o {
                        tile_store!(2, c_at(1, 0), c_stride);
                    }
                    if two_o && two_c {
                        tile_store!(3, c_at(1, 1), c_stride);
                    }
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuF32;
    use crate::backend::{Backend, ConvEpilogue};
    use crate::rng;

    fn draw(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64).map(|i| rng::normal(seed, i)).collect()
    }

    /// Norm-wise relative error of `a` against `b` (NaN never passes).
    fn rel(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        let r = (num / den).sqrt();
        assert!(r.is_finite(), "non-finite error");
        r
    }

    /// An f32 backend and one with the tiles, or None (and a line saying the test skipped) on a
    /// CPU without them.
    fn f32_and_tiles() -> Option<(CpuF32, CpuF32)> {
        let Ok(on_tiles) = CpuF32::new().with_bf16_tiles(true) else {
            println!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return None;
        };
        Some((CpuF32::new(), on_tiles))
    }

    fn bf(x: f32) -> f64 {
        bf16_value(bf16_bits(x)) as f64
    }

    /// out = Σ wq·xq over the taps (f64) for weights and inputs mapped by `q`, 3×3, pad 1.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        (n, c, h, o): (usize, usize, usize, usize),
        q: impl Fn(f32) -> f64,
        wscale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0; n * o * h * h];
        for img in 0..n {
            for oc in 0..o {
                for y in 0..h {
                    for xx in 0..h {
                        let mut s = 0.0;
                        for ic in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (y as isize + ky - 1, xx as isize + kx - 1);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= h as isize {
                                        continue;
                                    }
                                    let xv = x[((img * c + ic) * h + iy as usize) * h + ix as usize];
                                    let wv = w[((oc * c + ic) * 3 + ky as usize) * 3 + kx as usize];
                                    s += q(wscale * wv) * q(xv);
                                }
                            }
                        }
                        out[((img * o + oc) * h + y) * h + xx] = s;
                    }
                }
            }
        }
        out
    }

    /// The tile route of conv2d / conv2d_fused against an f64 sum of the same bf16-rounded
    /// operands (the kernel's arithmetic: ≈ f32 accumulation error) and against the f32 operands
    /// (bf16's rounding, what a user of the route gets), with and without the residual epilogue,
    /// at widths of one, two and four column tiles (and more bands than one), input channels
    /// in blocks of 16 and of 32.
    #[test]
    fn convolutions_on_the_tiles_match_the_f32_convolutions_to_bf16_precision() {
        let Some((be, on_tiles)) = f32_and_tiles() else {
            return;
        };
        for &(n, c, h, o) in &[
            (2usize, 16usize, 16usize, 16usize),
            (1, 48, 32, 32),
            (2, 32, 64, 16),
            (1, 16, 128, 32),
        ] {
            let (xv, wv, bv) = (draw(n * c * h * h, 1), draw(o * c * 9, 2), draw(o, 3));
            let wv: Vec<f32> = wv.iter().map(|v| v * 0.1).collect();
            let x = be.from_f32(&[n, c, h, h], &xv).unwrap();
            let w = be.from_f32(&[o, c, 3, 3], &wv).unwrap();
            let b = be.from_f32(&[o], &bv).unwrap();
            let (cbv, rv) = (draw(n * o, 4), draw(n * o * h * h, 5));
            let cb = be.from_f32(&[n, o], &cbv).unwrap();
            let r = be.from_f32(&[n, o, h, h], &rv).unwrap();
            let s = std::f64::consts::FRAC_1_SQRT_2;
            for residual in [false, true] {
                let epi = ConvEpilogue {
                    channel_bias: residual.then_some(&cb),
                    residual: residual.then_some((&r, s, s)),
                };
                let tiles = on_tiles.conv2d_fused(&x, &w, Some(&b), 1, 1, &epi).unwrap();
                let tiles = be.to_f32(&tiles).unwrap();
                let f32_route = be
                    .to_f32(&be.conv2d_fused(&x, &w, Some(&b), 1, 1, &epi).unwrap())
                    .unwrap();
                let alpha = if residual { s as f32 } else { 1.0 };
                let mut exact = reference(&xv, &wv, (n, c, h, o), bf, alpha);
                let mut from_f32 = f32_route.iter().map(|&v| v as f64).collect::<Vec<_>>();
                for (i, (e, _)) in exact.iter_mut().zip(&mut from_f32).enumerate() {
                    let (img, oc) = (i / (o * h * h), i / (h * h) % o);
                    let mut bias = bv[oc] as f64;
                    if residual {
                        bias += cbv[img * o + oc] as f64;
                        *e += s * bias + s * rv[i] as f64;
                    } else {
                        *e += bias;
                    }
                }
                let (e_kernel, e_bf16) = (rel(&tiles, &exact), rel(&tiles, &from_f32));
                let shape = format!("[{n},{c},{h},{h}] -> {o}, residual {residual}");
                println!("{shape}: {e_kernel:.1e} against the exact sum, {e_bf16:.1e} against f32");
                assert!(
                    e_kernel < 2e-6,
                    "{shape}: {e_kernel:e} against the bf16 operands' exact sum"
                );
                assert!(e_bf16 < 1e-2, "{shape}: {e_bf16:e} against the f32 convolution");
                assert!(e_bf16 > 1e-5, "{shape}: the tile route did not run ({e_bf16:e})");
            }
        }
    }

    /// The input gradient goes through the same tiles (a conv of dY with the flipped weights):
    /// conv2d_backward's dx on the tile route against the f32 route, to bf16 precision; dW and db
    /// are unchanged (f32 kernels).
    #[test]
    fn the_input_gradient_on_the_tiles_matches_the_f32_one_to_bf16_precision() {
        let Some((be, on_tiles)) = f32_and_tiles() else {
            return;
        };
        let (n, c, h, o) = (2, 32, 32, 16);
        let x = be.from_f32(&[n, c, h, h], &draw(n * c * h * h, 6)).unwrap();
        let w = be.from_f32(&[o, c, 3, 3], &draw(o * c * 9, 7)).unwrap();
        let dy = be.from_f32(&[n, o, h, h], &draw(n * o * h * h, 8)).unwrap();
        let grads = on_tiles.conv2d_backward(&x, &w, &dy, 1, 1).unwrap();
        let plain = be.conv2d_backward(&x, &w, &dy, 1, 1).unwrap();
        let as64 = |t| {
            be.to_f32(t)
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<f64>>()
        };
        let e_dx = rel(&be.to_f32(&grads.dx).unwrap(), &as64(&plain.dx));
        assert!(e_dx < 1e-2 && e_dx > 1e-5, "dx: {e_dx:e}");
        let e_dw = rel(&be.to_f32(&grads.dw).unwrap(), &as64(&plain.dw));
        assert!(e_dw < 1e-2 && e_dw > 1e-5, "dw: {e_dw:e}");
    }

    /// dW on the tiles against an f64 sum of the same bf16-rounded operands, and db against the
    /// f32 route, for shapes that use one and two tiles of output and of input channels, one and
    /// several bands, and a batch of one and of three.
    #[test]
    fn the_weight_gradient_on_the_tiles_is_the_bf16_operands_exact_sum() {
        let Some((be, on_tiles)) = f32_and_tiles() else {
            return;
        };
        for &(n, c, h, o) in &[
            (3usize, 16usize, 16usize, 16usize),
            (1, 48, 32, 32),
            (2, 32, 128, 16),
            (1, 64, 64, 48),
        ] {
            let (xv, dyv) = (draw(n * c * h * h, 9), draw(n * o * h * h, 10));
            let x = be.from_f32(&[n, c, h, h], &xv).unwrap();
            let w = be.from_f32(&[o, c, 3, 3], &draw(o * c * 9, 11)).unwrap();
            let dy = be.from_f32(&[n, o, h, h], &dyv).unwrap();
            let grads = on_tiles.conv2d_backward(&x, &w, &dy, 1, 1).unwrap();
            let plain = be.conv2d_backward(&x, &w, &dy, 1, 1).unwrap();
            let mut exact = vec![0.0f64; o * c * 9];
            for img in 0..n {
                for oc in 0..o {
                    for ic in 0..c {
                        for t in 0..9 {
                            let (ky, kx) = (t / 3, t % 3);
                            let mut s = 0.0;
                            for y in 0..h {
                                for xx in 0..h {
                                    let (iy, ix) = (y + ky, xx + kx);
                                    if iy < 1 || ix < 1 || iy > h || ix > h {
                                        continue;
                                    }
                                    let xq = bf(xv[((img * c + ic) * h + iy - 1) * h + ix - 1]);
                                    s += bf(dyv[((img * o + oc) * h + y) * h + xx]) * xq;
                                }
                            }
                            exact[(oc * c + ic) * 9 + t] += s;
                        }
                    }
                }
            }
            let dw = be.to_f32(&grads.dw).unwrap();
            let e_kernel = rel(&dw, &exact);
            let f32_dw: Vec<f64> = be.to_f32(&plain.dw).unwrap().iter().map(|&v| v as f64).collect();
            let e_bf16 = rel(&dw, &f32_dw);
            let f32_db: Vec<f64> = be.to_f32(&plain.db).unwrap().iter().map(|&v| v as f64).collect();
            let e_db = rel(&be.to_f32(&grads.db).unwrap(), &f32_db);
            let shape = format!("[{n},{c},{h},{h}] -> {o}");
            println!(
                "{shape}: dW {e_kernel:.1e} against the exact sum, {e_bf16:.1e} against f32; db {e_db:.1e}"
            );
            assert!(
                e_kernel < 2e-6,
                "{shape}: dW {e_kernel:e} against the bf16 operands' exact sum"
            );
            assert!(
                e_bf16 < 1e-2 && e_bf16 > 1e-5,
                "{shape}: dW {e_bf16:e} against the f32 route"
            );
            assert!(e_db < 1e-6, "{shape}: db {e_db:e}");
        }
    }

    /// The backend takes the tiles where the CPU has them and says why not where it does not;
    /// the f64 backend never takes them.
    #[test]
    fn a_backend_takes_the_tiles_only_where_they_exist() {
        match CpuF32::new().with_bf16_tiles(true) {
            Ok(be) => {
                assert!(available());
                assert_eq!(be.precision_name(), "bf16");
                assert!(be.name().contains("AMX"), "{}", be.name());
            }
            Err(e) => {
                assert!(!available());
                assert!(e.to_string().contains("AMX"), "{e}");
                println!("this CPU has no AMX tiles: {e}");
            }
        }
        assert_eq!(CpuF32::new().precision_name(), "f32");
        assert!(crate::backend::cpu::Cpu::<f64>::new()
            .with_bf16_tiles(true)
            .is_err());
    }

    /// Whole networks on the tiles against the f32 CPU (random weights, batch 2): within the
    /// bound the CUDA self-test sets its bf16 tensor-core networks (2e-2).
    #[test]
    fn whole_networks_on_the_tiles_stay_within_the_bf16_bound() {
        let Some((_, on_tiles)) = f32_and_tiles() else {
            return;
        };
        for preset in ["ve-res", "ve-tiny"] {
            let e = crate::bench::network_parity(&on_tiles, preset, 2, 5).unwrap();
            println!("{preset}: output {e:.1e} from the f32 network's");
            assert!(e < 2e-2 && e.is_finite(), "{preset}: {e:e}");
            assert!(e > 1e-6, "{preset}: the tiles did not run ({e:e})");
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values (ties to the even 1.0); a bit more rounds up.
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(
            bf16_bits(1.0 + 3.0 * 2f32.powi(-8)),
            0x3f82,
            "tie to even upwards"
        );
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        for x in [0.1f32, -3.7, 1e-30, 6.5e4] {
            let r = bf16_value(bf16_bits(x));
            assert!(((r - x) / x).abs() <= 2f32.powi(-9), "{x} -> {r}");
        }
    }
}
