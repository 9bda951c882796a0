//! CUDA graphs: record the work a closure queues on the backend's stream once, replay it many
//! times with one `cuGraphLaunch` each — and the fused sampler-step kernels (kernels/sampler.cu)
//! that make a whole predictor–corrector step replayable.
//!
//! Capture ([`Cuda::capture`]):
//! - the stream is captured in relaxed mode (so the caching allocator may still call `cuMemAlloc`
//!   if its free lists run dry); anything that synchronizes or copies to or from the host inside
//!   the closure fails the capture, which is then ended and reported as an error;
//! - the allocator ([`super::memory::Pool`]) is switched to capture mode: blocks freed during the
//!   capture stay with the graph ([`GraphMemory`]) because its kernels keep their addresses;
//!   buffers allocated before the capture that the graph uses must be kept alive by the caller
//!   for as long as the [`CapturedGraph`] lives (it cannot know them);
//! - warm up eagerly first: the first launch of a kernel (lazy module loading) and the pool's
//!   growth then happen outside the capture.
//!
//! Replaying a sampler step needs everything that changes per step in device memory: a step
//! counter ([`StepCounter`]), a table of per-step scalars ([`StepRow`]: network time label,
//! score scales, predictor coefficients, Langevin α) and noise whose Philox offset the kernels
//! derive from the counter ([`NoiseLayout`]). The update kernels reproduce the eager sampler's
//! arithmetic exactly (kernels/sampler.cu), so graph and eager sampling give the same bits.
//! Only one thread may queue work on a device handle while it captures.
use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::memory::{CudaBuf, GraphMemory};
use super::{drv, grid_for, ptr, raw, Arg, Cuda, BLOCK};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An instantiated CUDA graph and the device memory its nodes own.
pub struct CapturedGraph {
    exec: Exec,
    memory: GraphMemory,
    cuda: Cuda,
    nodes: usize,
}

/// The raw graph handles (destroyed in Drop, errors ignored: nothing can be done about them).
struct Exec {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: both handles came from cuStreamEndCapture / cuGraphInstantiate and are
        // destroyed exactly once; replays queued earlier complete before the executable is freed.
        unsafe {
            if !self.exec.is_null() {
                let _ = result::graph::exec_destroy(self.exec);
            }
            if !self.graph.is_null() {
                let _ = result::graph::destroy(self.graph);
            }
        }
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        // The graph's handles are destroyed with the context current; `exec` drops right after
        // this, then `memory` returns the graph's blocks to the pool.
        let _ = self.cuda.bind();
    }
}

impl CapturedGraph {
    /// Queue one replay on the backend's stream.
    pub fn launch(&self) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: `exec` is a live executable graph of this context; the stream is the backend's.
        drv("cuGraphLaunch", unsafe {
            result::graph::launch(self.exec.exec, self.cuda.inner.stream.cu_stream())
        })
    }

    /// Nodes in the graph (kernels, memsets, copies): the launches one replay saves the host.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Bytes of intermediate buffers the graph keeps for itself.
    pub fn memory_bytes(&self) -> usize {
        self.memory.bytes()
    }
}

impl Cuda {
    /// Whether `other` shares this handle's context, stream and allocator (only work on this
    /// handle's stream is captured).
    pub fn same_stream(&self, other: &Cuda) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Capture the work `record` queues on this handle's stream (through any handle with
    /// [`Cuda::same_stream`]) into an instantiated graph; also returns what `record` returned.
    /// Nothing runs during the capture. On any failure — `record` errs, or queues something a
    /// capture cannot hold (a host copy, a synchronisation) — the capture is ended, its memory
    /// released, and the error returned; the stream is usable again.
    pub fn capture<T>(&self, record: impl FnOnce() -> Result<T>) -> Result<(CapturedGraph, T)> {
        self.bind()?;
        self.inner.pool.begin_capture()?;
        let mut capturing = Capturing {
            cuda: self,
            stream: false,
            ended: false,
        };
        // SAFETY: the backend's live stream; relaxed mode lets the allocator call cuMemAlloc.
        drv("cuStreamBeginCapture", unsafe {
            result::stream::begin_capture(
                self.inner.stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        })?;
        capturing.stream = true;
        let recorded = record();
        let (ended, memory) = capturing.end();
        // An error cudarc recorded in a Drop during the capture must not surface later in an
        // unrelated call; the capture's own result says what went wrong.
        let _ = self.inner.ctx.check_err();
        let mut exec = Exec {
            graph: std::ptr::null_mut(),
            exec: std::ptr::null_mut(),
        };
        match ended {
            Ok(g) => exec.graph = g,
            Err(e) => {
                return Err(match recorded {
                    Err(inner) => inner,
                    Ok(_) => Error::Backend(format!(
                        "CUDA graph capture failed (cuStreamEndCapture: {e}): the captured work \
                         synchronized or copied to or from the host"
                    )),
                })
            }
        }
        let value = recorded?;
        if exec.graph.is_null() {
            return Err(Error::Backend("CUDA graph capture returned no graph".into()));
        }
        let mut nodes = 0usize;
        // SAFETY: a valid graph; a null node array asks only for the count.
        drv("cuGraphGetNodes", unsafe {
            sys::cuGraphGetNodes(exec.graph, std::ptr::null_mut(), &mut nodes).result()
        })?;
        // SAFETY: a valid graph; flags 0 = default instantiation.
        exec.exec = drv("cuGraphInstantiate", unsafe {
            result::graph::instantiate(exec.graph, sys::CUgraphInstantiate_flags(0))
        })?;
        // Upload now so that the first replay does not pay for it.
        // SAFETY: a valid executable graph and the backend's stream.
        drv("cuGraphUpload", unsafe {
            result::graph::upload(exec.exec, self.inner.stream.cu_stream())
        })?;
        Ok((
            CapturedGraph {
                exec,
                memory,
                cuda: self.clone(),
                nodes,
            },
            value,
        ))
    }
}

/// A running capture: the stream (once begun) and the allocator's capture mode. Ended by
/// [`Capturing::end`], or on drop if `record` returned early or panicked, so that neither the
/// stream nor the allocator is left capturing.
struct Capturing<'a> {
    cuda: &'a Cuda,
    /// The stream capture has begun and not ended.
    stream: bool,
    /// `end` ran.
    ended: bool,
}

impl Capturing<'_> {
    fn end(
        &mut self,
    ) -> (
        std::result::Result<sys::CUgraph, result::DriverError>,
        GraphMemory,
    ) {
        self.ended = true;
        let graph = if std::mem::take(&mut self.stream) {
            // SAFETY: the stream is capturing (begun in `capture`, on this thread).
            unsafe { result::stream::end_capture(self.cuda.inner.stream.cu_stream()) }
        } else {
            Ok(std::ptr::null_mut())
        };
        (graph, self.cuda.inner.pool.end_capture())
    }
}

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (graph, _memory) = self.end();
        if let Ok(g) = graph {
            if !g.is_null() {
                // SAFETY: a graph nobody else holds.
                let _ = unsafe { result::graph::destroy(g) };
            }
        }
    }
}

// ---- the sampler step's device state and kernels (kernels/sampler.cu) -------------------------

/// Per-step scalars of a sampler run, row i for time step t_i (kernels/sampler.cu `StepRow`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepRow {
    /// The network's time input: σ(t) for VE, 999·t for VP/subVP (f32, as the eager sampler sends it).
    pub label: f32,
    /// Factor applied to the network output first: 1/label when the graph does the network's
    /// `scale_by_sigma` itself, else 1.
    pub score_scale1: f32,
    /// Factor applied second: −1/std(t) for noise-predicting networks, else 1.
    pub score_scale2: f32,
    /// Predictor x̄ = a·x + b·s, x = x̄ + σ·z.
    pub pred_a: f32,
    pub pred_b: f32,
    pub pred_sigma: f32,
    /// α of the Langevin step size 2α(r‖z‖/‖s‖)².
    pub langevin_alpha: f64,
}

/// Where the noise of a sampler run comes from, laid out as `NoiseStream::next` draws it: every
/// step makes `draws_per_step` draws of `draw_size` elements, the first at offset `base`.
/// Element j of image n in draw d of step i is `rng::normal(seed, index)` with
/// `(seed slot, index)` = [`NoiseLayout::element`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseLayout {
    pub base: u64,
    pub draws_per_step: u64,
    /// Offset advance per draw: elements per image with per-image seeds, else the whole batch.
    pub draw_size: u64,
    /// One seed per image (`NoiseStream::per_image`) or one for the batch.
    pub per_image: bool,
}

impl NoiseLayout {
    /// (index into the seeds, Philox element index) of element j of image n (`per` elements per
    /// image) in draw `draw` of step `step` — the formula the kernels use.
    pub fn element(&self, step: u64, draw: u64, n: u64, j: u64, per: u64) -> (usize, u64) {
        let off = self.base + (step * self.draws_per_step + draw) * self.draw_size;
        if self.per_image {
            (n as usize, off + j)
        } else {
            (0, off + n * per + j)
        }
    }
}

/// kernels/sampler.cu `NoiseDraw` (48 bytes, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct NoiseDrawC {
    seeds: u64,
    base: u64,
    draws_per_step: u64,
    draw: u64,
    draw_size: u64,
    per_image: i32,
    pad: i32,
}

/// The constant device inputs of a sampler run: the step table, the seeds, the network's time
/// input (filled per step by `sampler_begin_step`) and the batch geometry.
pub struct SamplerTables {
    rows: Arc<CudaBuf>,
    n_rows: usize,
    seeds: Arc<CudaBuf>,
    layout: NoiseLayout,
    /// The network's time input [batch], written at the start of every step.
    pub labels: Tensor<Cuda>,
    batch: usize,
    per: usize,
}

/// The mutable device state of a sampler run: the step counter and the status words the
/// kernels set (a non-finite Langevin step size, a step past the end of the table).
pub struct StepCounter {
    counter: Arc<CudaBuf>,
    status: Arc<CudaBuf>,
}

/// What the sampler kernels reported ([`StepCounter::read`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplerStatus {
    /// Steps started so far (the device counter).
    pub steps: u64,
    /// The first step whose Langevin step size was not finite (zero or non-finite score norm).
    pub bad_langevin_step: Option<u64>,
    /// A step ran past the end of the table.
    pub overrun: bool,
}

/// Bytes of the device status words (kernels/sampler.cu SAMPLER_STATUS_*: int[4]).
const STATUS_WORDS: usize = 4;

impl Cuda {
    /// A device buffer holding the bytes of `data` (u32-sized elements, rounded up).
    fn upload_pod<T: Copy>(&self, data: &[T]) -> Result<Arc<CudaBuf>> {
        let bytes = std::mem::size_of_val(data);
        let buf = Arc::new(self.inner.pool.alloc(bytes.max(4), bytes.div_ceil(4).max(1))?);
        if bytes > 0 {
            self.bind()?;
            // SAFETY: the buffer holds at least `bytes` bytes; the copy from pageable memory has
            // staged `data` by the time it returns.
            drv("cuMemcpyHtoDAsync", unsafe {
                result::memcpy_htod_async(buf.device_ptr(), data, self.inner.stream.cu_stream())
            })?;
        }
        Ok(buf)
    }

    fn zero_bytes(&self, buf: &CudaBuf, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the buffer holds at least `bytes` bytes.
        drv("cuMemsetD8Async", unsafe {
            result::memset_d8_async(buf.device_ptr(), 0, bytes, self.inner.stream.cu_stream())
        })
    }

    /// Upload the tables of a sampler run over `[batch, per]` images: one row per step, one seed
    /// per image (or one), the noise layout.
    pub fn sampler_tables(
        &self,
        rows: &[StepRow],
        seeds: &[u64],
        layout: NoiseLayout,
        batch: usize,
        per: usize,
    ) -> Result<SamplerTables> {
        let op = "sampler_tables";
        if rows.is_empty() || batch == 0 || per == 0 {
            return Err(Error::shape(
                op,
                format!("{} steps, batch {batch}, {per} elements per image", rows.len()),
            ));
        }
        let want = if layout.per_image { batch } else { 1 };
        if seeds.len() != want {
            return Err(Error::shape(
                op,
                format!(
                    "{} seeds for batch {batch} (per-image: {})",
                    seeds.len(),
                    layout.per_image
                ),
            ));
        }
        if batch > 65535 {
            return Err(Error::shape(
                op,
                format!("batch {batch} exceeds the grid's y limit"),
            ));
        }
        Ok(SamplerTables {
            rows: self.upload_pod(rows)?,
            n_rows: rows.len(),
            seeds: self.upload_pod(seeds)?,
            layout,
            labels: self.zeros(&[batch])?,
            batch,
            per,
        })
    }

    /// A step counter at step 0 with clean status words.
    pub fn step_counter(&self) -> Result<StepCounter> {
        let counter = Arc::new(self.inner.pool.alloc(8, 2)?);
        let status = Arc::new(self.inner.pool.alloc(4 * STATUS_WORDS, STATUS_WORDS)?);
        self.zero_bytes(&counter, 8)?;
        self.zero_bytes(&status, 4 * STATUS_WORDS)?;
        Ok(StepCounter { counter, status })
    }

    fn noise_arg(&self, t: &SamplerTables, draw: u64) -> Arg {
        raw(&NoiseDrawC {
            seeds: t.seeds.device_ptr(),
            base: t.layout.base,
            draws_per_step: t.layout.draws_per_step,
            draw,
            draw_size: t.layout.draw_size,
            per_image: i32::from(t.layout.per_image),
            pad: 0,
        })
    }

    fn check_state(&self, op: &'static str, t: &SamplerTables, xs: &[&Tensor<Cuda>]) -> Result<()> {
        for x in xs {
            if x.numel() != t.batch * t.per || x.buf().len() < x.numel() {
                return Err(Error::shape(
                    op,
                    format!("{:?} for a batch of {} × {} elements", x.shape(), t.batch, t.per),
                ));
            }
        }
        Ok(())
    }

    /// Start of a step: `t.labels` = the step's network time input.
    pub fn sampler_begin_step(&self, t: &SamplerTables, c: &StepCounter) -> Result<()> {
        self.launch(
            "sampler_begin_step",
            (grid_for(t.batch), 1, 1),
            BLOCK,
            0,
            vec![
                Arg::Ptr(c.counter.device_ptr()),
                Arg::Ptr(t.rows.device_ptr()),
                Arg::I64(t.n_rows as i64),
                ptr(&t.labels),
                Arg::I64(t.batch as i64),
                Arg::Ptr(c.status.device_ptr()),
            ],
        )
    }

    /// End of a step: the counter moves to the next row.
    pub fn sampler_end_step(&self, c: &StepCounter) -> Result<()> {
        self.launch(
            "sampler_end_step",
            (1, 1, 1),
            32,
            0,
            vec![Arg::Ptr(c.counter.device_ptr())],
        )
    }

    /// One Langevin corrector update of `x` in place (draw `draw` of the step), given the raw
    /// network output `h` at x: per-image score and noise norms, the step size and the update,
    /// in two kernels and without the host.
    #[allow(clippy::too_many_arguments)]
    pub fn langevin_update(
        &self,
        t: &SamplerTables,
        c: &StepCounter,
        x: &Tensor<Cuda>,
        h: &Tensor<Cuda>,
        draw: u64,
        snr: f64,
        batch_norm: bool,
    ) -> Result<()> {
        self.check_state("langevin_update", t, &[x, h])?;
        // The split of the eager sum_squares_per_sample, so the norms are the same numbers.
        let parts = t.per.div_ceil(BLOCK as usize * 16).clamp(1, 256);
        let partial = self
            .inner
            .pool
            .alloc(2 * t.batch * parts * 8, 4 * t.batch * parts)?;
        let batch = t.batch as u32;
        self.launch(
            "langevin_partials",
            (parts as u32, batch, 1),
            BLOCK,
            0,
            vec![
                ptr(h),
                Arg::Ptr(t.rows.device_ptr()),
                Arg::I64(t.n_rows as i64),
                Arg::Ptr(c.counter.device_ptr()),
                self.noise_arg(t, draw),
                Arg::I64(t.per as i64),
                Arg::Ptr(partial.device_ptr()),
            ],
        )?;
        // 256 threads: the step-size reduction inside must match reduce_row_sum_d's block.
        let blocks = t.per.div_ceil(BLOCK as usize).clamp(1, 1024) as u32;
        self.launch(
            "langevin_update",
            (blocks, batch, 1),
            BLOCK,
            0,
            vec![
                ptr(x),
                ptr(h),
                Arg::Ptr(t.rows.device_ptr()),
                Arg::I64(t.n_rows as i64),
                Arg::Ptr(c.counter.device_ptr()),
                self.noise_arg(t, draw),
                Arg::I64(t.per as i64),
                Arg::Ptr(partial.device_ptr()),
                Arg::I64(parts as i64),
                Arg::F64(snr),
                Arg::I32(i32::from(batch_norm)),
                Arg::Ptr(c.status.device_ptr()),
            ],
        )
    }

    /// One predictor update (draw `draw` of the step): x̄ → `x_mean`, x → `x` in place.
    pub fn predictor_update(
        &self,
        t: &SamplerTables,
        c: &StepCounter,
        x: &Tensor<Cuda>,
        x_mean: &Tensor<Cuda>,
        h: &Tensor<Cuda>,
        draw: u64,
    ) -> Result<()> {
        self.check_state("predictor_update", t, &[x, x_mean, h])?;
        let total = t.batch * t.per;
        self.launch(
            "predictor_update",
            (grid_for(total), 1, 1),
            BLOCK,
            0,
            vec![
                ptr(x),
                ptr(x_mean),
                ptr(h),
                Arg::Ptr(t.rows.device_ptr()),
                Arg::I64(t.n_rows as i64),
                Arg::Ptr(c.counter.device_ptr()),
                self.noise_arg(t, draw),
                Arg::I64(t.per as i64),
                Arg::I64(total as i64),
            ],
        )
    }
}

/// One stage of a fast sampler run (kernels/sampler.cu `FastRow`, built from
/// `sample::fast::plan::Stage`): what `fast_prepare` and `fast_update` do at that stage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FastRow {
    /// Noise draw (after the prior) of the Heun churn before the evaluation.
    pub pre_draw: u64,
    /// Noise draw of the DPM churn after the update.
    pub post_draw: u64,
    /// α: the network sees α·point (with [`FastRow::IN_AFFINE`]), else point itself.
    pub in_scale: f32,
    /// ew_affine's shift (0).
    pub in_shift: f32,
    /// σ̂²·α: D = point + d_coef·s.
    pub d_coef: f32,
    /// DPM: e^{−κh}; Euler: r; Heun: the factor of the Euler point.
    pub c0: f32,
    /// Euler: 1 − r; Heun: the factor of D.
    pub c1: f32,
    /// DPM weights of this stage's D and of the history, newest first.
    pub w: [f32; 3],
    pub pre_std: f32,
    pub post_std: f32,
    /// [`FastRow::FINAL`], [`FastRow::DPM`], [`FastRow::EULER`] or [`FastRow::HEUN`].
    pub kind: i32,
    pub flags: i32,
    /// The denoiser buffer this stage writes.
    pub d_slot: i32,
    /// DPM: number of terms (1..=3) and their buffers (slot[0] = d_slot).
    pub n_terms: i32,
    pub slot: [i32; 3],
    pub pad: i32,
}

impl FastRow {
    pub const FINAL: i32 = 0;
    pub const DPM: i32 = 1;
    pub const EULER: i32 = 2;
    pub const HEUN: i32 = 3;
    pub const IN_AFFINE: i32 = 1;
    pub const PRE_NOISE: i32 = 2;
    pub const POST_NOISE: i32 = 4;
    pub const COMMIT: i32 = 8;
}

/// The stage table of a fast sampler run on the device.
pub struct FastTable {
    rows: Arc<CudaBuf>,
    n_rows: usize,
}

impl Cuda {
    /// Upload the stage table of a fast sampler run (one row per row of `tables`).
    pub fn fast_table(&self, t: &SamplerTables, rows: &[FastRow]) -> Result<FastTable> {
        if rows.len() != t.n_rows {
            return Err(Error::shape(
                "fast_table",
                format!("{} stages for a table of {} steps", rows.len(), t.n_rows),
            ));
        }
        if rows.iter().any(|r| {
            !(0..3).contains(&r.d_slot) || r.n_terms > 3 || r.slot.iter().any(|s| !(0..3).contains(s))
        }) {
            return Err(Error::Config(
                "fast_table: a stage names a buffer slot outside 0..3".into(),
            ));
        }
        Ok(FastTable {
            rows: self.upload_pod(rows)?,
            n_rows: rows.len(),
        })
    }

    /// Before a fast sampler stage's evaluation: Heun churn on x̂ and point, then the network
    /// input `xnet` (α·point, or point).
    pub fn fast_prepare(
        &self,
        t: &SamplerTables,
        f: &FastTable,
        c: &StepCounter,
        xh: &Tensor<Cuda>,
        point: &Tensor<Cuda>,
        xnet: &Tensor<Cuda>,
    ) -> Result<()> {
        self.check_state("fast_prepare", t, &[xh, point, xnet])?;
        let total = t.batch * t.per;
        self.launch(
            "fast_prepare",
            (grid_for(total), 1, 1),
            BLOCK,
            0,
            vec![
                Arg::Ptr(c.counter.device_ptr()),
                Arg::Ptr(f.rows.device_ptr()),
                Arg::I64(f.n_rows as i64),
                ptr(xh),
                ptr(point),
                ptr(xnet),
                self.noise_arg(t, 0),
                Arg::I64(t.per as i64),
                Arg::I64(total as i64),
            ],
        )
    }

    /// After a fast sampler stage's evaluation, from the raw network output `h`: D into its slot
    /// of `d`, then the solver's update of x̂ and point. The noise layout of `t` must have one
    /// draw per step (draws are indexed by the table).
    #[allow(clippy::too_many_arguments)]
    pub fn fast_update(
        &self,
        t: &SamplerTables,
        f: &FastTable,
        c: &StepCounter,
        xh: &Tensor<Cuda>,
        point: &Tensor<Cuda>,
        h: &Tensor<Cuda>,
        d: [&Tensor<Cuda>; 3],
    ) -> Result<()> {
        self.check_state("fast_update", t, &[xh, point, h, d[0], d[1], d[2]])?;
        if t.layout.draws_per_step != 1 {
            return Err(Error::Config(
                "fast_update: the noise layout must count one draw per step".into(),
            ));
        }
        let total = t.batch * t.per;
        self.launch(
            "fast_update",
            (grid_for(total), 1, 1),
            BLOCK,
            0,
            vec![
                Arg::Ptr(c.counter.device_ptr()),
                Arg::Ptr(f.rows.device_ptr()),
                Arg::Ptr(t.rows.device_ptr()),
                Arg::I64(f.n_rows as i64),
                ptr(xh),
                ptr(point),
                ptr(h),
                ptr(d[0]),
                ptr(d[1]),
                ptr(d[2]),
                self.noise_arg(t, 0),
                Arg::I64(t.per as i64),
                Arg::I64(total as i64),
            ],
        )
    }
}

impl StepCounter {
    /// Back to step 0 with clean status words (queued on the stream).
    pub fn reset(&self, cuda: &Cuda) -> Result<()> {
        cuda.zero_bytes(&self.counter, 8)?;
        cuda.zero_bytes(&self.status, 4 * STATUS_WORDS)
    }

    /// Read the counter and status words (waits for the queued work).
    pub fn read(&self, cuda: &Cuda) -> Result<SamplerStatus> {
        let mut counter = [0u64; 1];
        let mut status = [0i32; STATUS_WORDS];
        cuda.bind()?;
        let stream = cuda.inner.stream.cu_stream();
        // SAFETY: both host arrays outlive the synchronisation below; the buffers are that large.
        unsafe {
            drv(
                "cuMemcpyDtoHAsync",
                result::memcpy_dtoh_async(&mut counter, self.counter.device_ptr(), stream),
            )?;
            drv(
                "cuMemcpyDtoHAsync",
                result::memcpy_dtoh_async(&mut status, self.status.device_ptr(), stream),
            )?;
        }
        cuda.synchronize()?;
        Ok(SamplerStatus {
            steps: counter[0],
            bad_langevin_step: (status[0] != 0).then_some(status[1].max(0) as u64),
            overrun: status[2] != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_row_and_noise_draw_match_the_kernel_layout() {
        // kernels/sampler.cu: StepRow is six floats then a double (32 bytes); NoiseDraw is five
        // 8-byte words and two ints (48 bytes).
        assert_eq!(std::mem::size_of::<StepRow>(), 32);
        assert_eq!(std::mem::align_of::<StepRow>(), 8);
        assert_eq!(std::mem::offset_of!(StepRow, langevin_alpha), 24);
        assert_eq!(std::mem::size_of::<NoiseDrawC>(), 48);
        assert_eq!(std::mem::offset_of!(NoiseDrawC, per_image), 40);
    }

    #[test]
    fn fast_row_matches_the_kernel_layout() {
        // kernels/sampler.cu FastRow: two u64, ten floats, eight ints (88 bytes).
        assert_eq!(std::mem::size_of::<FastRow>(), 88);
        assert_eq!(std::mem::align_of::<FastRow>(), 8);
        assert_eq!(std::mem::offset_of!(FastRow, in_scale), 16);
        assert_eq!(std::mem::offset_of!(FastRow, w), 36);
        assert_eq!(std::mem::offset_of!(FastRow, kind), 56);
        assert_eq!(std::mem::offset_of!(FastRow, slot), 72);
    }

    #[test]
    fn noise_layout_elements() {
        let per_image = NoiseLayout {
            base: 10,
            draws_per_step: 2,
            draw_size: 6,
            per_image: true,
        };
        // Step 3, draw 1: offset 10 + (3·2 + 1)·6 = 52; image 2 uses its own seed slot.
        assert_eq!(per_image.element(3, 1, 2, 4, 6), (2, 56));
        let one = NoiseLayout {
            per_image: false,
            draw_size: 18,
            ..per_image
        };
        assert_eq!(one.element(3, 1, 2, 4, 6), (0, 10 + 7 * 18 + 16));
    }
}
