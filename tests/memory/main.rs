//! What an idle keep-alive connection costs in heap memory, counted exactly.
//!
//! RSS comparisons (loadtest scenario 5) depend on the allocator's retention; this test counts
//! the live heap bytes of an in-process proxy with a counting allocator, so a regression in the
//! per-connection footprint (a bigger task, a buffer held while idle) fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../e2e/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;
use support::{Conn, Origin, TestProxy, routes_to};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn an_idle_keep_alive_connection_costs_at_most_256_bytes_of_heap() {
    const N: usize = 4000;
    let origin = Origin::start_unrecorded();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.access_log.enabled = false;
    });
    // Warm up: pools, buffers, the upstream connection.
    let mut warm = Conn::connect(p.addr);
    for _ in 0..50 {
        warm.get("app.test", "/warm");
    }
    drop(warm);
    let mut conns = Vec::with_capacity(N);
    std::thread::sleep(Duration::from_millis(1500)); // buffer pool trimmed, hot reads over
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        let mut c = Conn::connect(p.addr);
        assert_eq!(c.get("app.test", "/").status, 200);
        conns.push(c);
    }
    // Let every connection leave its hot read (50 ms) and the pool trim what the burst left
    // (once a second): wait until the live heap stops shrinking.
    let mut after = LIVE.load(Ordering::Relaxed);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1100));
        let now = LIVE.load(Ordering::Relaxed);
        if now >= after {
            break;
        }
        after = now;
    }
    // The test's own client side: BufReader buffers of 64 KiB and the stream clones.
    let client_side = N as isize * (64 * 1024);
    let per_conn = (after - before - client_side) as f64 / N as f64;
    eprintln!("proxy heap per idle keep-alive connection: {per_conn:.0} bytes");
    // A parked connection is a slab entry in the worker's parking lot (socket, client address,
    // counters) and a deadline entry; its task is gone. Unparked it would be ~1 KiB.
    assert!(
        per_conn <= 256.0,
        "an idle connection costs {per_conn:.0} bytes of heap"
    );
    assert_eq!(
        support::metric_sum(&p.metrics(), "ringway_connections_parked"),
        N as f64,
        "every idle connection is parked"
    );
    // Parked connections still work.
    for c in conns.iter_mut().step_by(97) {
        assert_eq!(c.get("app.test", "/again").status, 200);
    }
    drop(conns);
}
