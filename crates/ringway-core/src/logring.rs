//! A bounded single-producer single-consumer byte ring for request log records.
//!
//! Each worker owns the [`LogProducer`] of its ring; the control plane owns the
//! [`LogConsumer`]. A push never blocks and never allocates: when the ring lacks room the record
//! is dropped and counted. Records are variable-length (`u32` length, then bytes, padded to 8
//! bytes) so a ring of a few MiB holds tens of thousands of requests.
//!
//! Positions are monotonic `usize` counters; `pos & mask` is the offset. The producer only
//! writes bytes in `[tail, head + capacity)`, the consumer only reads `[head, tail)`, and each
//! side publishes its counter with Release after touching the bytes, and reads the other's with
//! Acquire before. A record never wraps: if it does not fit before the end of the buffer, the
//! producer writes a padding marker and starts the record at offset 0.
#![allow(unsafe_code)]

use crate::record::{LogEntry, RECORD_BYTES_MAX};
use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const ALIGN: usize = 8;
const LEN_BYTES: usize = 4;
const PADDING: u32 = u32::MAX;

/// Keeps the two counters on separate cache lines: each is written by a different thread.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicUsize);

#[derive(Debug)]
struct Ring {
    buf: Box<[UnsafeCell<u8>]>,
    mask: usize,
    /// Consumer position: bytes before it may be overwritten.
    head: Padded,
    /// Producer position: bytes before it are published.
    tail: Padded,
    pushed: AtomicU64,
    dropped: AtomicU64,
}

// SAFETY: the ring's bytes are only touched through one LogProducer and one LogConsumer (neither
// is Clone), which access disjoint ranges as described in the module doc; the counters are
// atomics.
unsafe impl Sync for Ring {}
// SAFETY: as above; the buffer is plain bytes.
unsafe impl Send for Ring {}

impl Ring {
    fn cap(&self) -> usize {
        self.buf.len()
    }

    fn base(&self) -> *mut u8 {
        // UnsafeCell<u8> has the layout of u8, so the slice is a plain byte array.
        UnsafeCell::raw_get(self.buf.as_ptr())
    }
}

/// Creates a ring of at least `bytes` bytes (rounded up to a power of two).
pub fn log_ring(bytes: usize) -> (LogProducer, LogConsumer) {
    let cap = bytes.max(4 * RECORD_BYTES_MAX).next_power_of_two();
    let buf: Box<[UnsafeCell<u8>]> = (0..cap).map(|_| UnsafeCell::new(0)).collect();
    let ring = Arc::new(Ring {
        buf,
        mask: cap - 1,
        head: Padded::default(),
        tail: Padded::default(),
        pushed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    (
        LogProducer {
            ring: ring.clone(),
            scratch: Vec::with_capacity(RECORD_BYTES_MAX),
        },
        LogConsumer { ring },
    )
}

fn padded_len(payload: usize) -> usize {
    (LEN_BYTES + payload).next_multiple_of(ALIGN)
}

/// The writing end, owned by one worker.
#[derive(Debug)]
pub struct LogProducer {
    ring: Arc<Ring>,
    /// Reused encoding buffer: a push allocates nothing once it has grown.
    scratch: Vec<u8>,
}

impl LogProducer {
    /// Encodes and pushes a record. Returns false (and counts a drop) when the ring is full.
    pub fn push(&mut self, entry: &LogEntry<'_>) -> bool {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        entry.encode(&mut scratch);
        let ok = self.push_bytes(&scratch);
        self.scratch = scratch;
        ok
    }

    /// Pushes one record's bytes. Returns false (and counts a drop) when the ring is full.
    pub fn push_bytes(&mut self, record: &[u8]) -> bool {
        let r = &*self.ring;
        let cap = r.cap();
        let need = padded_len(record.len());
        assert!(need <= cap / 2, "log record larger than half the ring");
        let tail = r.tail.0.load(Ordering::Relaxed);
        let head = r.head.0.load(Ordering::Acquire);
        let used = tail.wrapping_sub(head);
        debug_assert!(used <= cap);
        let offset = tail & r.mask;
        let to_end = cap - offset;
        let pad = if need > to_end { to_end } else { 0 };
        if pad + need > cap - used {
            r.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let base = r.base();
        let mut pos = offset;
        if pad > 0 {
            // to_end >= ALIGN >= LEN_BYTES because every record is padded to ALIGN.
            // SAFETY: [offset, offset + 4) lies inside the free range the producer owns.
            unsafe { write_len(base.add(pos), PADDING) };
            pos = 0;
        }
        // SAFETY: [pos, pos + need) lies inside the free range (checked above) and inside the
        // buffer (the record does not wrap); the consumer does not read it until `tail` is
        // published below.
        unsafe {
            write_len(base.add(pos), record.len() as u32);
            std::ptr::copy_nonoverlapping(record.as_ptr(), base.add(pos + LEN_BYTES), record.len());
        }
        r.tail
            .0
            .store(tail.wrapping_add(pad + need), Ordering::Release);
        r.pushed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Records pushed so far.
    pub fn pushed(&self) -> u64 {
        self.ring.pushed.load(Ordering::Relaxed)
    }

    /// Records dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.ring.dropped.load(Ordering::Relaxed)
    }
}

/// # Safety
/// `p` must be valid for writing 4 bytes.
unsafe fn write_len(p: *mut u8, len: u32) {
    let b = len.to_le_bytes();
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, LEN_BYTES) };
}

/// # Safety
/// `p` must be valid for reading 4 bytes.
unsafe fn read_len(p: *const u8) -> u32 {
    let mut b = [0u8; LEN_BYTES];
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), LEN_BYTES) };
    u32::from_le_bytes(b)
}

/// The reading end, owned by the control plane.
#[derive(Debug)]
pub struct LogConsumer {
    ring: Arc<Ring>,
}

impl LogConsumer {
    /// Hands up to `max` records to `f`, oldest first, then frees their space. Returns how many.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let r = &*self.ring;
        let cap = r.cap();
        let base = r.base();
        let mut head = r.head.0.load(Ordering::Relaxed);
        let tail = r.tail.0.load(Ordering::Acquire);
        let mut n = 0;
        while head != tail && n < max {
            let offset = head & r.mask;
            // SAFETY: [head, tail) was published by the producer; 4 bytes at offset are inside
            // it because every record and padding marker starts with a length.
            let len = unsafe { read_len(base.add(offset)) };
            if len == PADDING {
                head = head.wrapping_add(cap - offset);
                continue;
            }
            let len = len as usize;
            assert!(offset + LEN_BYTES + len <= cap, "corrupt log ring");
            // SAFETY: the record lies in the published range and the producer does not write
            // there until `head` moves past it, which happens after `f` returns.
            let rec = unsafe { std::slice::from_raw_parts(base.add(offset + LEN_BYTES), len) };
            f(rec);
            head = head.wrapping_add(padded_len(len));
            n += 1;
        }
        r.head.0.store(head, Ordering::Release);
        n
    }

    /// Whether records are waiting.
    pub fn is_empty(&self) -> bool {
        let r = &*self.ring;
        r.head.0.load(Ordering::Relaxed) == r.tail.0.load(Ordering::Acquire)
    }

    pub fn pushed(&self) -> u64 {
        self.ring.pushed.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.ring.dropped.load(Ordering::Relaxed)
    }

    /// Ring size in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.cap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_drain_and_wrap() {
        let (mut p, mut c) = log_ring(1 << 16);
        let cap = c.capacity();
        let mut expect = 0u32;
        let mut next = 0u32;
        // Many rounds around the ring with odd record sizes to hit the padding path.
        for round in 0..2000 {
            let len = 4 + (round * 37) % 3000;
            let mut rec = vec![(round % 251) as u8; len];
            rec[..4].copy_from_slice(&next.to_le_bytes());
            if p.push_bytes(&rec) {
                next += 1;
            }
            if round % 7 == 0 {
                c.drain(usize::MAX, |r| {
                    assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), expect);
                    expect += 1;
                });
            }
        }
        c.drain(usize::MAX, |_| expect += 1);
        assert_eq!(expect, next);
        assert!(c.is_empty());
        assert!(cap >= 1 << 16);
    }

    #[test]
    fn full_ring_drops_and_counts() {
        let (mut p, mut c) = log_ring(0);
        let rec = vec![7u8; 1000];
        let mut ok = 0;
        for _ in 0..10_000 {
            if p.push_bytes(&rec) {
                ok += 1;
            }
        }
        assert!(ok > 0 && ok < 10_000);
        assert_eq!(p.dropped(), 10_000 - ok);
        assert_eq!(
            c.drain(usize::MAX, |r| assert_eq!(r, &rec[..])),
            ok as usize
        );
        assert!(p.push_bytes(&rec), "space is reusable after a drain");
    }

    #[test]
    fn concurrent_producer_and_consumer() {
        let (mut p, mut c) = log_ring(1 << 16);
        const N: u64 = 300_000;
        let producer = std::thread::spawn(move || {
            let mut sent = Vec::new();
            for i in 0..N {
                let len = 8 + (i as usize * 13) % 400;
                let mut rec = vec![(i % 256) as u8; len];
                rec[..8].copy_from_slice(&i.to_le_bytes());
                if p.push_bytes(&rec) {
                    sent.push(i);
                }
            }
            (sent, p.dropped())
        });
        let mut got = Vec::new();
        loop {
            let n = c.drain(1024, |r| {
                let i = u64::from_le_bytes(r[..8].try_into().unwrap());
                assert!(
                    r[8..].iter().all(|&b| b == (i % 256) as u8),
                    "torn record {i}"
                );
                assert_eq!(r.len(), 8 + (i as usize * 13) % 400);
                got.push(i);
            });
            if n == 0 && producer.is_finished() && c.is_empty() {
                break;
            }
        }
        let (sent, dropped) = producer.join().unwrap();
        assert_eq!(got, sent, "every pushed record arrives once, in order");
        assert_eq!(sent.len() as u64 + dropped, N);
    }
}
