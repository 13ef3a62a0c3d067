//! Buffers and timed socket I/O.
//!
//! With io_uring a pending read owns its buffer, and dropping the future only asks the kernel
//! to cancel. So every timed operation here is issued with a [`CancelHandle`]; on timeout the
//! operation is cancelled explicitly and awaited until the kernel hands the buffer back. The
//! buffer then returns to the worker's pool instead of leaking into the driver, and a read that
//! completed in the same instant is not lost.

use crate::error::IoFail;
use monoio::buf::{Slice, SliceMut};
use monoio::io::{CancelableAsyncReadRent, CancelableAsyncWriteRent, Canceller};
use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

/// A worker's pool of I/O buffers, so that requests reuse memory instead of allocating it.
#[derive(Debug)]
pub struct BufPool {
    free: RefCell<Vec<Vec<u8>>>,
    buffer_bytes: usize,
    pool_max: usize,
}

impl BufPool {
    pub fn new(buffer_bytes: usize, pool_max: usize) -> Self {
        Self {
            free: RefCell::new(Vec::new()),
            buffer_bytes,
            pool_max,
        }
    }

    /// An empty buffer with at least `buffer_bytes` of capacity.
    pub fn take(&self) -> Vec<u8> {
        match self.free.borrow_mut().pop() {
            Some(b) => b,
            None => Vec::with_capacity(self.buffer_bytes),
        }
    }

    /// Returns a buffer. Buffers that grew (large heads) are freed rather than kept, so the
    /// pool's memory stays `pool_max * buffer_bytes` at most.
    pub fn put(&self, mut b: Vec<u8>) {
        if b.capacity() < self.buffer_bytes || b.capacity() > 2 * self.buffer_bytes {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < self.pool_max {
            b.clear();
            free.push(b);
        }
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }
}

/// A receive buffer: bytes in `[pos, len)` are unread. Bytes before `window` are kept (the
/// request head, still referenced by the log record); reads refill from `window` once all
/// unread bytes are consumed.
#[derive(Debug, Default)]
pub struct RecvBuf {
    pub buf: Vec<u8>,
    pub pos: usize,
    pub window: usize,
}

impl RecvBuf {
    pub fn new(buf: Vec<u8>) -> Self {
        Self {
            buf,
            pos: 0,
            window: 0,
        }
    }

    #[inline]
    pub fn unread(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    #[inline]
    pub fn has_unread(&self) -> bool {
        self.pos < self.buf.len()
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        debug_assert!(self.pos <= self.buf.len());
    }

    /// Prepares for a read: if everything after the window was consumed, the space is reused;
    /// makes sure at least `min_free` bytes of capacity are free.
    pub fn prepare_read(&mut self, min_free: usize) {
        if self.pos == self.buf.len() && self.pos > self.window {
            self.buf.truncate(self.window);
            self.pos = self.window;
        }
        if self.buf.capacity() - self.buf.len() < min_free {
            self.buf.reserve(min_free);
        }
    }

    /// Drops everything before `pos` (the finished exchange), keeping unread bytes (a pipelined
    /// request) at the front.
    pub fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
        }
        self.pos = 0;
        self.window = 0;
    }
}

/// Runs an I/O future with a timeout. On timeout the operation is cancelled through
/// `canceller` and awaited to completion, so the buffer comes back.
async fn timed<F, T>(
    fut: F,
    canceller: &mut Canceller,
    dur: Duration,
) -> (monoio::BufResult<usize, T>, bool)
where
    F: Future<Output = monoio::BufResult<usize, T>>,
{
    let mut fut = std::pin::pin!(fut);
    monoio::select! {
        biased;
        r = &mut fut => (r, false),
        _ = monoio::time::sleep(dur) => {
            *canceller = std::mem::take(canceller).cancel();
            (fut.await, true)
        }
    }
}

/// A socket with a reusable canceller for timed operations.
pub struct Timed<S> {
    pub io: S,
    canceller: Canceller,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Timed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl<S> Timed<S> {
    pub fn new(io: S) -> Self {
        Self {
            io,
            canceller: Canceller::new(),
        }
    }
}

impl<S: CancelableAsyncReadRent> Timed<S> {
    /// Appends what one read returns to `buf` (into its spare capacity, which must not be
    /// empty). `Ok(0)` is end of stream.
    pub async fn read_append(
        &mut self,
        buf: Vec<u8>,
        dur: Duration,
    ) -> (Result<usize, IoFail>, Vec<u8>) {
        let len = buf.len();
        let cap = buf.capacity();
        debug_assert!(cap > len, "read into a full buffer");
        let slice = SliceMut::new(buf, len, cap);
        let handle = self.canceller.handle();
        let ((res, slice), timed_out) = timed(
            self.io.cancelable_read(slice, handle),
            &mut self.canceller,
            dur,
        )
        .await;
        let buf = slice.into_inner();
        match res {
            Ok(n) => (Ok(n), buf),
            Err(_) if timed_out => (Err(IoFail::Timeout), buf),
            Err(e) => (Err(IoFail::Io(e)), buf),
        }
    }

    /// Reads into `rb` after `prepare_read`. Returns the byte count; EOF is `Err(Closed)`.
    pub async fn fill(
        &mut self,
        rb: &mut RecvBuf,
        min_free: usize,
        dur: Duration,
    ) -> Result<usize, IoFail> {
        rb.prepare_read(min_free);
        let (res, buf) = self.read_append(std::mem::take(&mut rb.buf), dur).await;
        rb.buf = buf;
        match res {
            Ok(0) => Err(IoFail::Closed),
            other => other,
        }
    }
}

impl<S: CancelableAsyncWriteRent> Timed<S> {
    /// Writes `buf[start..end]` completely, looping on short writes. Each write may wait `dur`
    /// for the peer to take bytes.
    pub async fn write_range(
        &mut self,
        mut buf: Vec<u8>,
        start: usize,
        end: usize,
        dur: Duration,
    ) -> (Result<(), IoFail>, Vec<u8>) {
        let mut pos = start;
        while pos < end {
            let slice = Slice::new(buf, pos, end);
            let handle = self.canceller.handle();
            let ((res, slice), timed_out) = timed(
                self.io.cancelable_write(slice, handle),
                &mut self.canceller,
                dur,
            )
            .await;
            buf = slice.into_inner();
            match res {
                Ok(0) => return (Err(IoFail::Closed), buf),
                Ok(n) => pos += n,
                Err(_) if timed_out => return (Err(IoFail::Timeout), buf),
                Err(e) => return (Err(IoFail::Io(e)), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Writes all of `buf`.
    pub async fn write_all(
        &mut self,
        buf: Vec<u8>,
        dur: Duration,
    ) -> (Result<(), IoFail>, Vec<u8>) {
        let end = buf.len();
        self.write_range(buf, 0, end, dur).await
    }
}
