//! Buffers and timed socket I/O.
//!
//! With io_uring a pending read owns its buffer, and dropping the future only asks the kernel
//! to cancel. So every timed operation here is issued with a [`CancelHandle`]; on timeout the
//! operation is cancelled explicitly and awaited until the kernel hands the buffer back. The
//! buffer then returns to the worker's pool instead of leaking into the driver, and a read that
//! completed in the same instant is not lost.

use crate::deadline::Deadlines;
use crate::error::IoFail;
use crate::pace::{Bound, Pace};
use monoio::buf::{Slice, SliceMut};
use monoio::io::{CancelHandle, CancelableAsyncReadRent, CancelableAsyncWriteRent, Canceller};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Free buffers a pool keeps through a trim however quiet the worker is.
pub const BUF_POOL_FLOOR: usize = 16;

/// A worker's pool of I/O buffers, so that requests reuse memory instead of allocating it.
///
/// After a burst the pool would hold as many buffers as the burst needed; `trim` (called once
/// a second) frees those that stayed unused for the whole period, so memory follows the load
/// back down.
///
/// Two sizes: `buffer_bytes` for heads and small bodies, `body_buffer_bytes` for streaming
/// large bodies, where each read and write moves more bytes per operation (per-operation
/// overhead dominates at 16 KiB: a 1 MiB body moved in 64 KiB pieces costs about 40% of the
/// CPU it costs in 16 KiB ones).
#[derive(Debug)]
pub struct BufPool {
    small: Class,
    big: Class,
    pool_max: usize,
}

#[derive(Debug)]
struct Class {
    free: RefCell<Vec<Vec<u8>>>,
    /// Fewest free buffers seen since the last trim: that many were never needed.
    low_water: Cell<usize>,
    bytes: usize,
}

impl Class {
    fn new(bytes: usize) -> Self {
        Self {
            free: RefCell::new(Vec::new()),
            low_water: Cell::new(0),
            bytes,
        }
    }

    fn take(&self) -> Vec<u8> {
        let mut free = self.free.borrow_mut();
        let b = free.pop();
        if free.len() < self.low_water.get() {
            self.low_water.set(free.len());
        }
        match b {
            Some(b) => b,
            None => Vec::with_capacity(self.bytes),
        }
    }

    fn fits(&self, cap: usize) -> bool {
        cap >= self.bytes && cap <= 2 * self.bytes
    }

    fn put(&self, mut b: Vec<u8>, pool_max: usize) {
        let mut free = self.free.borrow_mut();
        if free.len() < pool_max {
            b.clear();
            free.push(b);
        }
    }

    fn trim(&self) {
        let mut free = self.free.borrow_mut();
        let unused = self.low_water.get().min(free.len());
        let keep = (free.len() - unused).max(BUF_POOL_FLOOR.min(free.len()));
        free.truncate(keep);
        free.shrink_to(BUF_POOL_FLOOR.max(keep));
        self.low_water.set(free.len());
    }
}

impl BufPool {
    #[cfg(test)]
    pub fn new(buffer_bytes: usize, pool_max: usize) -> Self {
        Self::with_body_buffers(buffer_bytes, buffer_bytes, pool_max)
    }

    pub fn with_body_buffers(
        buffer_bytes: usize,
        body_buffer_bytes: usize,
        pool_max: usize,
    ) -> Self {
        Self {
            small: Class::new(buffer_bytes),
            big: Class::new(body_buffer_bytes.max(buffer_bytes)),
            pool_max,
        }
    }

    /// An empty buffer of `body_buffer_bytes` for streaming a large body.
    pub fn take_big(&self) -> Vec<u8> {
        self.big.take()
    }

    pub fn big_bytes(&self) -> usize {
        self.big.bytes
    }

    /// An empty buffer with at least `buffer_bytes` of capacity.
    pub fn take(&self) -> Vec<u8> {
        self.small.take()
    }

    /// Frees the buffers that stayed unused since the last trim, keeping `BUF_POOL_FLOOR` of
    /// each size.
    pub fn trim(&self) {
        self.small.trim();
        self.big.trim();
    }

    /// Small buffers waiting in the pool.
    #[cfg(test)]
    pub fn free_count(&self) -> usize {
        self.small.free.borrow().len()
    }

    /// Returns a buffer to the pool of its size. Buffers that grew past twice their size
    /// (large heads) are freed rather than kept, so the pools hold at most
    /// `pool_max * 2 * (buffer_bytes + body_buffer_bytes)`.
    pub fn put(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if self.small.fits(cap) {
            self.small.put(b, self.pool_max);
        } else if self.big.fits(cap) {
            self.big.put(b, self.pool_max);
        }
    }

    pub fn buffer_bytes(&self) -> usize {
        self.small.bytes
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

    /// Free capacity after the buffered bytes.
    pub fn free(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    /// Moves the contents into `bigger` at the same offsets and returns the old buffer.
    pub fn upgrade(&mut self, mut bigger: Vec<u8>) -> Vec<u8> {
        bigger.clear();
        bigger.extend_from_slice(&self.buf);
        std::mem::replace(&mut self.buf, bigger)
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

/// A byte stream that reads into the spare capacity of a `Vec` and can be cancelled: TCP
/// sockets, their read halves, and TLS connections (`crate::tls`).
pub trait ReadIo {
    fn read_into(
        &mut self,
        buf: SliceMut<Vec<u8>>,
        c: CancelHandle,
    ) -> impl Future<Output = monoio::BufResult<usize, SliceMut<Vec<u8>>>>;
}

/// A byte stream that writes from a `Vec` range and can be cancelled.
pub trait WriteIo {
    fn write_from(
        &mut self,
        buf: Slice<Vec<u8>>,
        c: CancelHandle,
    ) -> impl Future<Output = monoio::BufResult<usize, Slice<Vec<u8>>>>;
}

// Sockets and their halves: monoio's cancelable reads and writes, as they are.
impl<T: CancelableAsyncReadRent> ReadIo for T {
    fn read_into(
        &mut self,
        buf: SliceMut<Vec<u8>>,
        c: CancelHandle,
    ) -> impl Future<Output = monoio::BufResult<usize, SliceMut<Vec<u8>>>> {
        self.cancelable_read(buf, c)
    }
}

impl<T: CancelableAsyncWriteRent> WriteIo for T {
    fn write_from(
        &mut self,
        buf: Slice<Vec<u8>>,
        c: CancelHandle,
    ) -> impl Future<Output = monoio::BufResult<usize, Slice<Vec<u8>>>> {
        self.cancelable_write(buf, c)
    }
}

/// Bytes a TCP connection moved at the socket level, from `TCP_INFO`: what the peer has
/// acknowledged of ours and what we received from it. The rate floors read it when a wait
/// runs out, since the operation's own result can hide progress: the kernel wakes a blocked
/// writer only once a third of its send buffer has drained, and a TLS read returns nothing
/// until a whole record is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireBytes {
    pub acked: u64,
    pub received: u64,
}

/// `struct tcp_info` offsets of `tcpi_bytes_acked` and `tcpi_bytes_received` (Linux 4.1+;
/// `include/uapi/linux/tcp.h`: 8 one-byte fields, 24 four-byte ones, then the pacing rates).
const TCPI_BYTES_ACKED_OFFSET: usize = 120;
const TCPI_BYTES_RECEIVED_OFFSET: usize = 128;

/// Reads [`WireBytes`] of a TCP socket; None on an older kernel or a socket error.
pub fn wire_bytes(fd: std::os::fd::RawFd) -> Option<WireBytes> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `fd` is an open socket for the duration of the call; `info` is a writable
    // buffer of `len` bytes and the kernel writes at most `len` of them, storing the length it
    // wrote back into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    let end = TCPI_BYTES_RECEIVED_OFFSET + 8;
    if rc != 0 || (len as usize) < end {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&info[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    Some(WireBytes {
        acked: word(TCPI_BYTES_ACKED_OFFSET),
        received: word(TCPI_BYTES_RECEIVED_OFFSET),
    })
}

/// A connection whose socket-level progress can be read (client connections, plain and TLS).
pub trait Wire {
    fn wire(&self) -> Option<WireBytes>;
}

impl Wire for monoio::net::TcpStream {
    fn wire(&self) -> Option<WireBytes> {
        use std::os::fd::AsRawFd;
        wire_bytes(self.as_raw_fd())
    }
}

/// Runs an I/O future until `timeout` resolves. On timeout the operation is cancelled through
/// `canceller` and awaited to completion, so the buffer comes back.
pub async fn timed<F, T, D>(fut: F, canceller: &mut Canceller, timeout: D) -> (T, bool)
where
    F: Future<Output = T>,
    D: Future<Output = ()>,
{
    let mut fut = std::pin::pin!(fut);
    monoio::select! {
        biased;
        r = &mut fut => (r, false),
        _ = timeout => {
            *canceller = std::mem::take(canceller).cancel();
            (fut.await, true)
        }
    }
}

/// A socket with a reusable canceller for timed operations. The canceller (two small heap
/// allocations) is created on first use and dropped by [`Timed::release`] when the connection
/// goes idle, so idle connections do not carry it.
///
/// Timeouts are the worker's coarse deadlines (25 ms resolution, 24 bytes each), not monoio
/// timers: a 640-byte `Sleep` per operation was copied around enough to show as 14% of the
/// proxy's own instructions in callgrind.
pub struct Timed<S> {
    pub io: S,
    canceller: Option<Canceller>,
    deadlines: Rc<Deadlines>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Timed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl<S: std::os::fd::AsRawFd> std::os::fd::AsRawFd for Timed<S> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.io.as_raw_fd()
    }
}

impl<S> Timed<S> {
    pub fn new(io: S, deadlines: Rc<Deadlines>) -> Self {
        Self {
            io,
            canceller: None,
            deadlines,
        }
    }

    /// The deadlines this socket's timeouts run on.
    pub fn deadlines(&self) -> &Rc<Deadlines> {
        &self.deadlines
    }

    /// Drops the canceller (no operation may be in flight): the connection is going idle.
    pub fn release(&mut self) {
        self.canceller = None;
    }

    /// Unwraps the socket (no operation may be in flight).
    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: ReadIo> Timed<S> {
    /// Appends what one read returns to `buf` (into its spare capacity, which must not be
    /// empty). `Ok(0)` is end of stream.
    pub async fn read_append(
        &mut self,
        buf: Vec<u8>,
        dur: Duration,
    ) -> (Result<usize, IoFail>, Vec<u8>) {
        let deadlines = self.deadlines.clone();
        self.read_append_until(buf, deadlines.after(dur)).await
    }

    /// [`Timed::read_append`] with any timeout future (a coarse [`crate::deadline`], say).
    pub async fn read_append_until<D: Future<Output = ()>>(
        &mut self,
        buf: Vec<u8>,
        timeout: D,
    ) -> (Result<usize, IoFail>, Vec<u8>) {
        let len = buf.len();
        let cap = buf.capacity();
        debug_assert!(cap > len, "read into a full buffer");
        let slice = SliceMut::new(buf, len, cap);
        let canceller = self.canceller.get_or_insert_with(Canceller::new);
        let handle = canceller.handle();
        let ((res, slice), timed_out) =
            timed(self.io.read_into(slice, handle), canceller, timeout).await;
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
        self.fill_until(rb, min_free, monoio::time::sleep(dur))
            .await
    }

    /// [`Timed::fill`] against a client's rate floor: the wait ends at `per_op` or where the
    /// client's credit runs out; the wait and the bytes are recorded in `pace`. When the
    /// credit runs out the client is watched for a probe, judged by what its socket received
    /// (a TLS record under way returns nothing yet): too slow, `Err(TooSlow)`.
    pub async fn fill_paced(
        &mut self,
        rb: &mut RecvBuf,
        min_free: usize,
        per_op: Duration,
        pace: &mut Pace,
    ) -> Result<usize, IoFail>
    where
        S: Wire,
    {
        let deadlines = self.deadlines.clone();
        loop {
            let now = Instant::now();
            let (end, bound) = pace.deadline(now, per_op);
            let r = self.fill_until(rb, min_free, deadlines.at(end)).await;
            pace.record(now.elapsed(), *r.as_ref().unwrap_or(&0));
            match r {
                Err(IoFail::Timeout) if bound == Bound::Floor => {
                    let received = self.io.wire().map(|w| w.received);
                    if !pace.ran_out(Instant::now(), received) {
                        return Err(IoFail::TooSlow);
                    }
                }
                Err(IoFail::Timeout) if bound == Bound::Total => return Err(IoFail::TooSlow),
                r => return r,
            }
        }
    }

    /// [`Timed::fill`] with any timeout future.
    pub async fn fill_until<D: Future<Output = ()>>(
        &mut self,
        rb: &mut RecvBuf,
        min_free: usize,
        timeout: D,
    ) -> Result<usize, IoFail> {
        rb.prepare_read(min_free);
        let (res, buf) = self
            .read_append_until(std::mem::take(&mut rb.buf), timeout)
            .await;
        rb.buf = buf;
        match res {
            Ok(0) => Err(IoFail::Closed),
            other => other,
        }
    }
}

impl<S: WriteIo> Timed<S> {
    /// Writes `buf[start..end]` completely, looping on short writes. Each write may wait `dur`
    /// for the peer to take bytes.
    pub async fn write_range(
        &mut self,
        buf: Vec<u8>,
        start: usize,
        end: usize,
        dur: Duration,
    ) -> (Result<(), IoFail>, Vec<u8>) {
        self.write_range_inner(buf, start, end, dur, None, |_| None)
            .await
    }

    /// [`Timed::write_range`], with each wait also bounded by the peer's rate floor when a
    /// `pace` is given. When the floor's wait runs out, what the peer acknowledged meanwhile
    /// earns its credit and the write is tried again (the kernel wakes a blocked writer only
    /// once a third of the send buffer drained, and a TLS write returns only once all its
    /// ciphertext is out); with nothing acknowledged, `Err(TooSlow)`.
    pub async fn write_range_paced(
        &mut self,
        buf: Vec<u8>,
        start: usize,
        end: usize,
        dur: Duration,
        pace: Option<&mut Pace>,
    ) -> (Result<(), IoFail>, Vec<u8>)
    where
        S: Wire,
    {
        self.write_range_inner(buf, start, end, dur, pace, |s| s.wire())
            .await
    }

    async fn write_range_inner(
        &mut self,
        mut buf: Vec<u8>,
        start: usize,
        end: usize,
        dur: Duration,
        mut pace: Option<&mut Pace>,
        wire: impl Fn(&S) -> Option<WireBytes>,
    ) -> (Result<(), IoFail>, Vec<u8>) {
        let mut pos = start;
        while pos < end {
            let slice = Slice::new(buf, pos, end);
            // Without a pace, one clock read per write, as before.
            let (began, until, bound) = match pace.as_deref() {
                Some(p) => {
                    let now = Instant::now();
                    let (until, bound) = p.deadline(now, dur);
                    (Some(now), until, bound)
                }
                None => (None, Instant::now() + dur, Bound::Operation),
            };
            let canceller = self.canceller.get_or_insert_with(Canceller::new);
            let handle = canceller.handle();
            let ((res, slice), timed_out) = timed(
                self.io.write_from(slice, handle),
                canceller,
                self.deadlines.at(until),
            )
            .await;
            buf = slice.into_inner();
            if let (Some(p), Some(t)) = (pace.as_deref_mut(), began) {
                p.record(t.elapsed(), *res.as_ref().unwrap_or(&0));
                if res.is_err() && timed_out {
                    match bound {
                        Bound::Floor => {
                            let acked = wire(&self.io).map(|w| w.acked);
                            if !p.ran_out(Instant::now(), acked) {
                                return (Err(IoFail::TooSlow), buf);
                            }
                            // Watched, or taking bytes: the same write waits on.
                            continue;
                        }
                        Bound::Total => return (Err(IoFail::TooSlow), buf),
                        Bound::Operation => {}
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_follow_a_real_socket() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let w0 = wire_bytes(a.as_raw_fd()).expect("TCP_INFO with byte counts (Linux 4.1+)");
        a.write_all(&[7u8; 1000]).unwrap();
        b.write_all(&[9u8; 300]).unwrap();
        let mut buf = [0u8; 1000];
        b.read_exact(&mut buf).unwrap();
        a.read_exact(&mut buf[..300]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let w1 = wire_bytes(a.as_raw_fd()).unwrap();
        assert_eq!(w1.acked - w0.acked, 1000);
        assert_eq!(w1.received - w0.received, 300);
        assert_eq!(wire_bytes(-1), None);
    }

    #[test]
    fn pool_trims_what_a_burst_left_behind() {
        let p = BufPool::new(4096, 1000);
        let burst: Vec<_> = (0..200).map(|_| p.take()).collect();
        for b in burst {
            p.put(b);
        }
        assert_eq!(p.free_count(), 200);
        p.trim(); // the burst happened in this period: all 200 were needed
        assert_eq!(p.free_count(), 200);
        // A quiet period with at most 5 buffers in use at once.
        for _ in 0..10 {
            let b: Vec<_> = (0..5).map(|_| p.take()).collect();
            for x in b {
                p.put(x);
            }
        }
        p.trim();
        assert_eq!(p.free_count(), BUF_POOL_FLOOR.max(5));
        // Grown buffers are not kept.
        let mut big = p.take();
        big.reserve(100_000);
        p.put(big);
        assert_eq!(p.free_count(), BUF_POOL_FLOOR.max(5) - 1);
    }
}
