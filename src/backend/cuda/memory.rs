//! Device memory: a caching allocator with free lists per size class, so that steady-state work
//! (the sampling loop) never calls `cuMemAlloc`/`cuMemFree`.
//!
//! Every buffer belongs to one stream (the backend's). A buffer dropped while kernels that use it
//! are still queued goes back to its free list at once; that is safe because the next user of the
//! memory is enqueued on the same stream, after those kernels.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, CudaContext};

use crate::error::{Error, Result};

/// Round a request up to its size class: powers of two up to 1 MiB, above that steps of an
/// eighth of the power of two below the request (at most 12.5% waste, few distinct classes).
pub(crate) fn size_class(bytes: usize) -> usize {
    const SMALL: usize = 1 << 20;
    if bytes <= 512 {
        return 512;
    }
    if bytes <= SMALL {
        return bytes.next_power_of_two();
    }
    let floor_pow2 = 1usize << (usize::BITS - 1 - bytes.leading_zeros());
    let step = floor_pow2 / 8;
    bytes.div_ceil(step) * step
}

/// Counters of the allocator (for tests and the bench report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls to cuMemAlloc so far.
    pub device_allocs: u64,
    /// Requests served from a free list.
    pub reuses: u64,
    /// Bytes currently allocated from the device (in use + cached).
    pub bytes_reserved: usize,
    /// Bytes sitting in free lists.
    pub bytes_cached: usize,
    /// High-water mark of `bytes_reserved` (since the pool began or the last `reset_peak`).
    pub peak_bytes_reserved: usize,
    /// High-water mark of the bytes handed out to live buffers (reserved − cached).
    pub peak_bytes_in_use: usize,
}

impl PoolStats {
    fn note_peak(&mut self) {
        self.peak_bytes_reserved = self.peak_bytes_reserved.max(self.bytes_reserved);
        self.peak_bytes_in_use = self
            .peak_bytes_in_use
            .max(self.bytes_reserved - self.bytes_cached);
    }
}

pub(crate) struct Pool {
    ctx: Arc<CudaContext>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<u64>>,
    stats: PoolStats,
    /// While a CUDA graph is captured (see [`Pool::begin_capture`]): the blocks freed during the
    /// capture. The graph bakes their addresses in, so they are reused only by later allocations
    /// of the same capture and then belong to the graph ([`GraphMemory`]), never to other work.
    capture: Option<HashMap<usize, Vec<u64>>>,
}

fn lock(m: &Mutex<PoolState>) -> std::sync::MutexGuard<'_, PoolState> {
    // A panic while holding the lock leaves only counters and lists behind: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Arc<Pool> {
        Arc::new(Pool {
            ctx,
            state: Mutex::new(PoolState::default()),
        })
    }

    pub(crate) fn stats(&self) -> PoolStats {
        lock(&self.state).stats
    }

    /// Restart the high-water marks from the current usage (to measure one phase of work).
    pub(crate) fn reset_peak(&self) {
        let st = &mut lock(&self.state).stats;
        st.peak_bytes_reserved = st.bytes_reserved;
        st.peak_bytes_in_use = st.bytes_reserved - st.bytes_cached;
    }

    /// A buffer of at least `bytes` bytes (uninitialised).
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize, len: usize) -> Result<CudaBuf> {
        if bytes == 0 {
            return Ok(CudaBuf {
                ptr: 0,
                len,
                class: 0,
                pool: self.clone(),
            });
        }
        let class = size_class(bytes);
        {
            let mut st = lock(&self.state);
            // During a capture, blocks the capture itself freed come first (reuse within one
            // captured stream is ordered exactly as in eager execution).
            let captured = st
                .capture
                .as_mut()
                .and_then(|c| c.get_mut(&class))
                .and_then(|v| v.pop());
            if let Some(ptr) = captured {
                st.stats.reuses += 1;
                return Ok(CudaBuf {
                    ptr,
                    len,
                    class,
                    pool: self.clone(),
                });
            }
            if let Some(ptr) = st.free.get_mut(&class).and_then(|v| v.pop()) {
                st.stats.reuses += 1;
                st.stats.bytes_cached -= class;
                st.stats.note_peak();
                return Ok(CudaBuf {
                    ptr,
                    len,
                    class,
                    pool: self.clone(),
                });
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Backend(format!("binding the CUDA context: {e}")))?;
        // SAFETY: plain device allocation in the bound context.
        let ptr = match unsafe { result::malloc_sync(class) } {
            Ok(p) => p,
            Err(e) if lock(&self.state).capture.is_some() => {
                // No trim while capturing: it synchronizes, which a capture forbids.
                return Err(Error::Backend(format!(
                    "cuMemAlloc of {class} bytes during CUDA graph capture failed: {e}"
                )));
            }
            Err(_) => {
                // Out of memory with cached blocks of other sizes: release them and retry once.
                self.trim()?;
                unsafe { result::malloc_sync(class) }
                    .map_err(|e| Error::Backend(format!("cuMemAlloc of {class} bytes failed: {e}")))?
            }
        };
        let mut st = lock(&self.state);
        st.stats.device_allocs += 1;
        st.stats.bytes_reserved += class;
        st.stats.note_peak();
        Ok(CudaBuf {
            ptr,
            len,
            class,
            pool: self.clone(),
        })
    }

    /// Return every cached block to the device (waits for queued work first).
    pub(crate) fn trim(&self) -> Result<()> {
        let blocks: Vec<(usize, Vec<u64>)> = lock(&self.state).free.drain().collect();
        if blocks.is_empty() {
            return Ok(());
        }
        self.ctx
            .synchronize()
            .map_err(|e| Error::Backend(format!("synchronize before trim: {e}")))?;
        let mut st = lock(&self.state);
        for (class, ptrs) in blocks {
            for p in ptrs {
                // SAFETY: the block came from cuMemAlloc and no buffer refers to it any more.
                unsafe { result::free_sync(p) }.map_err(|e| Error::Backend(format!("cuMemFree: {e}")))?;
                st.stats.bytes_reserved -= class;
                st.stats.bytes_cached -= class;
            }
        }
        Ok(())
    }

    fn give_back(&self, class: usize, ptr: u64) {
        let mut st = lock(&self.state);
        if let Some(captured) = st.capture.as_mut() {
            captured.entry(class).or_default().push(ptr);
            return;
        }
        st.stats.bytes_cached += class;
        st.free.entry(class).or_default().push(ptr);
    }
}

/// Graph-capture mode (used by [`super::graph`]): every block freed between `begin_capture` and
/// `end_capture` is kept for the graph being captured, whose kernels keep using those addresses
/// on every replay.
impl Pool {
    /// Start keeping freed blocks for a graph; fails if a capture is already running.
    pub(crate) fn begin_capture(&self) -> Result<()> {
        let mut st = lock(&self.state);
        if st.capture.is_some() {
            return Err(Error::Backend(
                "a CUDA graph capture is already running on this device handle".into(),
            ));
        }
        st.capture = Some(HashMap::new());
        Ok(())
    }

    /// Stop capturing: the blocks freed during the capture, now owned by the returned
    /// [`GraphMemory`] (back to the free lists when it drops).
    pub(crate) fn end_capture(self: &Arc<Self>) -> GraphMemory {
        let captured = lock(&self.state).capture.take().unwrap_or_default();
        GraphMemory {
            pool: self.clone(),
            blocks: captured
                .into_iter()
                .flat_map(|(class, ptrs)| ptrs.into_iter().map(move |p| (class, p)))
                .collect(),
        }
    }
}

/// Device blocks a captured CUDA graph uses for its intermediate tensors. Drop it only after the
/// graph itself is destroyed; the blocks then return to the pool's free lists (safe at once:
/// later users queue on the same stream, after the graph's last replay).
pub struct GraphMemory {
    pool: Arc<Pool>,
    blocks: Vec<(usize, u64)>,
}

impl GraphMemory {
    /// Bytes held for the graph.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.0).sum()
    }
}

impl Drop for GraphMemory {
    fn drop(&mut self) {
        for (class, ptr) in self.blocks.drain(..) {
            self.pool.give_back(class, ptr);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The last buffer is gone; errors here (e.g. a lost device) cannot be reported.
        if self.ctx.bind_to_thread().is_ok() && self.ctx.synchronize().is_ok() {
            let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
            for (_, ptrs) in st.free.drain() {
                for p in ptrs {
                    // SAFETY: as in `trim`.
                    let _ = unsafe { result::free_sync(p) };
                }
            }
        }
    }
}

/// A device buffer of `len` f32 elements; returns its memory to the pool on drop.
pub struct CudaBuf {
    ptr: u64,
    len: usize,
    class: usize,
    pool: Arc<Pool>,
}

impl CudaBuf {
    /// The device address (0 for an empty buffer).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// Number of f32 elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({:#x}, {} elements)", self.ptr, self.len)
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if self.class > 0 {
            self.pool.give_back(self.class, self.ptr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_and_bound_waste() {
        for bytes in [
            1usize,
            511,
            512,
            513,
            4096,
            1 << 20,
            (1 << 20) + 1,
            3 << 20,
            123_456_789,
        ] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c <= 512 || c as f64 <= bytes as f64 * 2.0, "{bytes} -> {c}");
            if bytes > 1 << 20 {
                assert!(c as f64 <= bytes as f64 * 1.125 + 1.0, "{bytes} -> {c}");
            }
        }
        assert_eq!(size_class(3 << 20), 3 << 20);
    }
}
