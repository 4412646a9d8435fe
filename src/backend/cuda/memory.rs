//! Device memory: owned allocations, a bump arena, and typed slices (`DevSlice<T>`).
//!
//! Buffers are allocated once (graph buffers, weights, KV cache) and handed out as typed
//! `DevSlice`s: a shared handle to the allocation plus a byte offset and an element count.
//! Kernels receive raw device pointers; every launcher checks that each slice holds at least the
//! elements the grid touches, so kernels never access memory outside an allocation.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext};
use half::f16;

use super::error::{GpuError, GpuResult};

/// Element types a `DevSlice` can hold (plain old data, no padding).
pub trait DeviceScalar: Copy + Default + Send + Sync + 'static + private::Sealed {
    /// Name used in error messages.
    const NAME: &'static str;
}
mod private {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
    impl Sealed for u8 {}
}
impl DeviceScalar for f16 {
    const NAME: &'static str = "f16";
}
impl DeviceScalar for f32 {
    const NAME: &'static str = "f32";
}
impl DeviceScalar for i32 {
    const NAME: &'static str = "i32";
}
impl DeviceScalar for u8 {
    const NAME: &'static str = "u8";
}

/// Keeps CUDA graph recording on one thread apart from allocations, frees and context-wide
/// synchronisation on others (executors of one GPU each have their own stream and may run on
/// different threads): a `cuCtxSynchronize` or `cuMemFree` while another stream is capturing
/// can invalidate that capture. Recording holds the lock; `quiesced` calls wait for it.
/// On the recording thread itself `quiesced` does not wait (it would deadlock): such a call
/// inside a capture makes the capture fail, and the executor then runs the phase directly.
#[derive(Default)]
pub struct CaptureLock {
    lock: Mutex<()>,
}

thread_local! {
    /// Address of the `CaptureLock` this thread is recording under (0: none).
    static RECORDING_UNDER: Cell<usize> = const { Cell::new(0) };
}

impl CaptureLock {
    fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// Runs `record` holding the lock.
    pub(crate) fn capture<R>(&self, record: impl FnOnce() -> R) -> R {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        RECORDING_UNDER.with(|r| r.set(self.id()));
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                RECORDING_UNDER.with(|r| r.set(0));
            }
        }
        let _reset = Reset;
        record()
    }

    /// Runs `f` while no other thread records a graph on this GPU.
    pub(crate) fn quiesced<R>(&self, f: impl FnOnce() -> R) -> R {
        if RECORDING_UNDER.with(|r| r.get()) == self.id() {
            return f();
        }
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }
}

/// One `cuMemAlloc` allocation, freed when the last handle drops.
///
/// The free first synchronises the whole context, since any executor's stream may still use
/// the memory. That stalls other executors of the same GPU for the duration of their queued
/// work: cheap for one model per process (buffers are dropped with their executor or model,
/// not per request); a server that creates executors per request should keep them instead.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
    capture: Arc<CaptureLock>,
}

impl DeviceBuffer {
    pub(crate) fn new(ctx: &Arc<CudaContext>, capture: &Arc<CaptureLock>, bytes: usize) -> GpuResult<Arc<Self>> {
        let bytes_alloc = bytes.max(1);
        ctx.bind_to_thread()?;
        // SAFETY: the context is current on this thread (bound above); cuMemAlloc has no other
        // precondition. The pointer is owned by the returned buffer and freed exactly once in Drop.
        let ptr =
            capture.quiesced(|| unsafe { result::malloc_sync(bytes_alloc) }).map_err(|e| match GpuError::from(e) {
                GpuError::OutOfMemory { .. } => GpuError::OutOfMemory { requested: bytes },
                other => other,
            })?;
        Ok(Arc::new(Self { ptr, bytes, ctx: ctx.clone(), capture: capture.clone() }))
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.capture.quiesced(|| {
            // Work queued on any stream may still use the memory: wait for it, then free.
            let _ = self.ctx.synchronize();
            // SAFETY: `ptr` came from cuMemAlloc in `new` and is freed only here, once; all
            // handles (DevSlice) hold an Arc to this buffer, so none outlives it.
            unsafe {
                let _ = result::free_sync(self.ptr);
            }
        });
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// A typed window `[offset, offset + len)` into a device allocation.
///
/// Cloning is cheap (an `Arc`) and yields an aliasing handle; launchers check that outputs do
/// not overlap inputs except where a kernel documents in-place use.
pub struct DevSlice<T: DeviceScalar> {
    buf: Arc<DeviceBuffer>,
    offset: usize, // bytes
    len: usize,    // elements
    _t: PhantomData<T>,
}

impl<T: DeviceScalar> Clone for DevSlice<T> {
    fn clone(&self) -> Self {
        Self { buf: self.buf.clone(), offset: self.offset, len: self.len, _t: PhantomData }
    }
}

impl<T: DeviceScalar> std::fmt::Debug for DevSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevSlice<{}>({:#x}, len {})", T::NAME, self.ptr(), self.len)
    }
}

impl<T: DeviceScalar> DevSlice<T> {
    pub(crate) fn from_buffer(buf: Arc<DeviceBuffer>, offset: usize, len: usize) -> Self {
        debug_assert!(offset + len * std::mem::size_of::<T>() <= buf.bytes);
        Self { buf, offset, len, _t: PhantomData }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    /// Raw device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr + self.offset as u64
    }
    /// Device address of element `i` (no bounds check; used for views validated by the caller).
    pub(crate) fn ptr_at(&self, i: usize) -> u64 {
        self.ptr() + (i * std::mem::size_of::<T>()) as u64
    }
    /// Sub-slice of `len` elements starting at element `start`; `None` when out of range.
    pub fn slice(&self, start: usize, len: usize) -> Option<DevSlice<T>> {
        let end = start.checked_add(len)?;
        (end <= self.len).then(|| DevSlice {
            buf: self.buf.clone(),
            offset: self.offset + start * std::mem::size_of::<T>(),
            len,
            _t: PhantomData,
        })
    }
    /// The same bytes as elements of `U` (`None` unless the byte length is a whole number of
    /// `U`s): an fp32 graph buffer is allocated as twice as many fp16 slots.
    pub fn reinterpret<U: DeviceScalar>(&self) -> Option<DevSlice<U>> {
        let bytes = self.num_bytes();
        (bytes % std::mem::size_of::<U>() == 0).then(|| DevSlice {
            buf: self.buf.clone(),
            offset: self.offset,
            len: bytes / std::mem::size_of::<U>(),
            _t: PhantomData,
        })
    }
    /// Byte range `[start, end)` in device address space.
    pub(crate) fn range(&self) -> (u64, u64) {
        (self.ptr(), self.ptr() + self.num_bytes() as u64)
    }
    /// True when the pointer of element 0 is a multiple of `align` bytes.
    pub fn is_aligned(&self, align: u64) -> bool {
        self.ptr() % align == 0
    }
}

/// Do two slices share any byte?
pub(crate) fn overlaps<A: DeviceScalar, B: DeviceScalar>(a: &DevSlice<A>, b: &DevSlice<B>) -> bool {
    let (a0, a1) = a.range();
    let (b0, b1) = b.range();
    a0 < b1 && b0 < a1
}

/// Same start and same byte length (an exact alias, the only overlap in-place kernels accept).
pub(crate) fn same<A: DeviceScalar, B: DeviceScalar>(a: &DevSlice<A>, b: &DevSlice<B>) -> bool {
    a.range() == b.range()
}

/// Bump allocator over one device allocation: everything a graph needs is carved out once.
/// Allocations are 256-byte aligned (satisfies every kernel's 16-byte vector loads).
pub struct Arena {
    buf: Arc<DeviceBuffer>,
    used: AtomicUsize,
}

pub const ARENA_ALIGN: usize = 256;

impl Arena {
    pub(crate) fn new(ctx: &Arc<CudaContext>, capture: &Arc<CaptureLock>, bytes: usize) -> GpuResult<Self> {
        Ok(Self { buf: DeviceBuffer::new(ctx, capture, bytes)?, used: AtomicUsize::new(0) })
    }

    /// Carves `len` elements of `T`; `OutOfMemory` when the arena is exhausted.
    pub fn alloc<T: DeviceScalar>(&self, len: usize) -> GpuResult<DevSlice<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or(GpuError::OutOfMemory { requested: usize::MAX })?;
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let start = cur.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
            let end = start.checked_add(bytes).filter(|&e| e <= self.buf.bytes);
            let Some(end) = end else {
                return Err(GpuError::OutOfMemory { requested: bytes });
            };
            match self.used.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(DevSlice::from_buffer(self.buf.clone(), start, len)),
                Err(now) => cur = now,
            }
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    pub fn capacity_bytes(&self) -> usize {
        self.buf.bytes
    }
}
