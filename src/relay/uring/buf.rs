//! Memory the kernel reads or writes while an operation is in flight.
//!
//! Two things live here:
//! - [`IoBuf`] / [`IoBufMut`]: the promise, made by a type and not by a comment, that a buffer's
//!   bytes stay where they are while the value that owns them is moved (into an operation, into
//!   its slot when the future is dropped, back to the caller). Operations take such buffers by
//!   value and hand them back with the result.
//! - [`Pool`]: the provided buffers of one ring. The kernel picks one when bytes arrive, so a
//!   receive that waits for a quiet client holds none; the completion names it and it comes back
//!   as a [`PoolBuf`], which returns it to the ring when dropped.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use io_uring::types;

use crate::proto::HEADROOM;

/// A buffer whose bytes do not move when the value does.
///
/// # Safety
/// `stable_ptr()` must point at `bytes_init()` readable bytes that stay valid and in place for
/// as long as the value lives unchanged, wherever the value is moved to.
pub unsafe trait IoBuf: Send + 'static {
    fn stable_ptr(&self) -> *const u8;
    fn bytes_init(&self) -> usize;
}

/// A buffer the kernel may write into after its initialised bytes.
///
/// # Safety
/// As [`IoBuf`], and `spare_ptr()` must point at `spare()` writable bytes right after the
/// initialised ones, in place while the value is moved.
pub unsafe trait IoBufMut: IoBuf {
    fn spare_ptr(&mut self) -> *mut u8;
    fn spare(&self) -> usize;
    /// Mark `n` more bytes initialised.
    ///
    /// # Safety
    /// The first `n` spare bytes must have been written.
    unsafe fn advance_init(&mut self, n: usize);
}

// Safety: a Bytes' bytes are on the heap (or static) and never move or change while it lives.
unsafe impl IoBuf for Bytes {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// Safety: a BytesMut's bytes are on the heap; moving the handle does not move them, and they
// are reallocated only by methods that take `&mut self` (which an operation never calls).
unsafe impl IoBuf for BytesMut {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// Safety: as above; the spare capacity follows the initialised bytes in the same allocation.
unsafe impl IoBufMut for BytesMut {
    fn spare_ptr(&mut self) -> *mut u8 {
        self.spare_capacity_mut().as_mut_ptr().cast()
    }
    fn spare(&self) -> usize {
        self.capacity() - self.len()
    }
    unsafe fn advance_init(&mut self, n: usize) {
        // Safety: the caller says the first `n` spare bytes were written.
        unsafe { self.set_len(self.len() + n) }
    }
}

/// Provided buffers per ring (a power of two) and the payload room of each. A receive that
/// waits for a quiet client holds none of them: the kernel takes one when bytes arrive. Small,
/// because they serve the interactive case: a receive that fills one marks the client as
/// sending in bulk, and bulk receives use a buffer of their own as large as a frame. 64 x 16
/// KiB is 1 MiB per worker, touched only as far as it is used.
pub const POOL_BUFS: u16 = 64;
pub const POOL_BUF_LEN: usize = 16 * 1024;
/// The buffer group id of a ring's pool.
pub const POOL_GROUP: u16 = 0;

/// The provided buffers of one ring, [`HEADROOM`] + [`POOL_BUF_LEN`] bytes each, lent out one
/// at a time as [`PoolBuf`]s. Every buffer keeps [`HEADROOM`] free in front of where the kernel
/// writes, so that the frame header goes in front of the payload in place.
pub struct Pool {
    /// The ring of buffer descriptors the kernel reads (page aligned, shared with it).
    entries: *mut types::BufRingEntry,
    entries_layout: std::alloc::Layout,
    /// The buffers themselves, `stride` bytes apart.
    mem: *mut u8,
    mem_layout: std::alloc::Layout,
    stride: usize,
    /// Our copy of the ring's tail; the lock orders givers on different threads (a buffer is
    /// given back where its last `Bytes` is dropped).
    tail: Mutex<u16>,
    /// Buffers in the ring (for tests and the buffer-leak check).
    available: AtomicUsize,
}

// Safety: the raw pointers are to allocations this value owns; the descriptor ring is only
// written under the `tail` lock, and a buffer's bytes only by whoever holds its id (the kernel
// until the completion, then one PoolBuf).
unsafe impl Send for Pool {}
// Safety: as above.
unsafe impl Sync for Pool {}

impl Pool {
    /// [`POOL_BUFS`] buffers and their descriptor ring, every buffer in the ring. Register the
    /// ring with the kernel with [`Pool::register`].
    pub fn new() -> std::io::Result<Pool> {
        let stride = HEADROOM + POOL_BUF_LEN;
        let entries_layout = std::alloc::Layout::from_size_align(
            POOL_BUFS as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(std::io::Error::other)?;
        let mem_layout = std::alloc::Layout::from_size_align(POOL_BUFS as usize * stride, 4096)
            .map_err(std::io::Error::other)?;
        // Safety: both layouts have a non-zero size; null results are checked below (and a
        // Pool holding a null is dropped only through the checks in Drop).
        let (entries, mem) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout).cast::<types::BufRingEntry>(),
                std::alloc::alloc(mem_layout),
            )
        };
        let pool = Pool {
            entries,
            entries_layout,
            mem,
            mem_layout,
            stride,
            tail: Mutex::new(0),
            available: AtomicUsize::new(0),
        };
        if entries.is_null() || mem.is_null() {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        for bid in 0..POOL_BUFS {
            pool.give_back(bid);
        }
        Ok(pool)
    }

    /// Register the descriptor ring as buffer group [`POOL_GROUP`] of `uring`.
    ///
    /// # Safety
    /// The pool must outlive the registration: keep it until `uring` is dropped (or leak it).
    pub unsafe fn register(&self, uring: &io_uring::IoUring) -> std::io::Result<()> {
        // Safety: `entries` is a page-aligned ring of POOL_BUFS descriptors that the caller
        // keeps alive as long as the ring.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.entries as u64,
                POOL_BUFS,
                POOL_GROUP,
                0,
            )
        }
    }

    /// Buffer `bid` goes back to the ring's tail.
    fn give_back(&self, bid: u16) {
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        // Safety: the index is masked into the ring; at most POOL_BUFS ids exist, so the slot
        // written is one the kernel has already consumed. The buffer address is inside `mem`.
        unsafe {
            let e = &mut *self.entries.add((*tail & (POOL_BUFS - 1)) as usize);
            e.set_addr(self.mem.add(bid as usize * self.stride + HEADROOM) as u64);
            e.set_len(POOL_BUF_LEN as u32);
            e.set_bid(bid);
            *tail = tail.wrapping_add(1);
            let shared = types::BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*shared).store(*tail, Ordering::Release);
        }
        self.available.fetch_add(1, Ordering::Relaxed);
    }

    /// A completion named buffer `bid` as holding `len` bytes: it is ours now.
    ///
    /// # Safety
    /// `bid` must come from a completion of this pool's group, taken once.
    pub unsafe fn take(self: &std::sync::Arc<Self>, bid: u16, len: u32) -> PoolBuf {
        self.available.fetch_sub(1, Ordering::Relaxed);
        PoolBuf {
            pool: self.clone(),
            bid,
            len,
        }
    }

    /// Buffers in the ring now.
    pub fn available(&self) -> usize {
        self.available.load(Ordering::Relaxed)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Safety: allocated in `new` with these layouts (a null one, from a failed allocation,
        // is skipped); the ring that could write into them is gone or leaked this pool.
        unsafe {
            if !self.entries.is_null() {
                std::alloc::dealloc(self.entries.cast(), self.entries_layout);
            }
            if !self.mem.is_null() {
                std::alloc::dealloc(self.mem, self.mem_layout);
            }
        }
    }
}

/// One provided buffer a receive filled: `len` bytes after [`HEADROOM`] free bytes. Goes
/// back to its ring when dropped (as `Bytes::from_owner`, when the last slice of it is).
pub struct PoolBuf {
    pool: std::sync::Arc<Pool>,
    bid: u16,
    len: u32,
}

impl PoolBuf {
    /// Bytes received.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Never true for a buffer a receive returns (an end of file is not a buffer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most a receive puts in one buffer.
    pub fn capacity(&self) -> usize {
        POOL_BUF_LEN
    }

    /// The headroom and the bytes received, to frame in place.
    pub fn framed_mut(&mut self) -> &mut [u8] {
        // Safety: this PoolBuf holds the buffer's id, so nothing else reads or writes it; the
        // range is inside the buffer.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.mem.add(self.bid as usize * self.pool.stride),
                HEADROOM + self.len as usize,
            )
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        // Safety: as in `framed_mut`.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.mem.add(self.bid as usize * self.pool.stride),
                HEADROOM + self.len as usize,
            )
        }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.give_back(self.bid);
    }
}
