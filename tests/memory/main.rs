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
static ALLOCS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
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
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The counters are process-wide: tests here run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A one-worker proxy in front of an unrecorded origin, warmed up (pools, buffers, the
/// upstream connection) and left quiet until its buffer pool is trimmed and hot reads are over.
fn warm_proxy() -> (Origin, TestProxy) {
    let origin = Origin::start_unrecorded();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.access_log.enabled = false;
    });
    let mut warm = Conn::connect(p.addr);
    for _ in 0..50 {
        warm.get("app.test", "/warm");
    }
    drop(warm);
    std::thread::sleep(Duration::from_millis(1500));
    (origin, p)
}

#[test]
fn an_idle_keep_alive_connection_costs_at_most_256_bytes_of_heap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 4000;
    let (_origin, p) = warm_proxy();
    let mut conns = Vec::with_capacity(N);
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

#[test]
fn a_stalled_request_head_holds_no_read_buffer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 2000;
    let (_origin, p) = warm_proxy();
    let before = LIVE.load(Ordering::Relaxed);
    // Slowloris: a request line and one header, then nothing (the head never ends).
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: 1\r\n")
            .unwrap();
        conns.push(s);
    }
    // Past the hot read, and the buffer pool trimmed of what the burst took (a buffer is
    // freed once it stayed unused for a whole one-second period): until two samples in a row
    // no longer shrink.
    let mut after = LIVE.load(Ordering::Relaxed);
    let mut steady = 0;
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(1100));
        let now = LIVE.load(Ordering::Relaxed);
        steady = if now >= after { steady + 1 } else { 0 };
        after = after.min(now);
        if steady == 2 {
            break;
        }
    }
    let per_conn = (after - before) as f64 / N as f64;
    eprintln!("proxy heap per stalled request head: {per_conn:.0} bytes");
    // Its task (the exchange in progress: 8 KiB measured) and the head's bytes, not a
    // 16 KiB read buffer on top.
    assert!(
        per_conn <= 9000.0,
        "a stalled head costs {per_conn:.0} bytes of heap"
    );
    drop(conns);
}

/// An upstream that answers every request on a connection with the same bytes, allocating
/// nothing per request, so the allocation count below is the proxy's.
fn quiet_origin() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn keep_alive_requests_allocate_nothing_on_the_request_path() {
    use std::io::{Read, Write};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let origin = quiet_origin();
    let p = TestProxy::start_with(&routes_to(origin), |c| {
        c.workers.count = 1;
        // The worker only pushes records into its ring; decoding them into log lines is the
        // control plane's work and allocates there, off the request path.
        c.access_log.enabled = false;
    });
    let mut s = std::net::TcpStream::connect(p.addr).unwrap();
    s.set_nodelay(true).unwrap();
    let req = b"GET /x HTTP/1.1\r\nHost: app.test\r\nUser-Agent: alloc-test\r\n\r\n";
    let mut buf = [0u8; 4096];
    let mut round = |n: usize| {
        for _ in 0..n {
            s.write_all(req).unwrap();
            let mut got = 0;
            // The response ends with the 2-byte body "ok".
            while !buf[..got].ends_with(b"\r\n\r\nok") {
                got += s.read(&mut buf[got..]).unwrap();
            }
        }
    };
    round(2000); // warm up: pools, buffers, the upstream connection, the log path
    const N: usize = 20_000;
    let before = ALLOCS.load(Ordering::Relaxed);
    round(N);
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    let per_request = allocs as f64 / N as f64;
    eprintln!("{allocs} allocations over {N} keep-alive requests ({per_request:.4} per request)");
    // Housekeeping (once a second, the log drain) may allocate a little; a request must not.
    assert!(
        per_request < 0.05,
        "{per_request:.4} allocations per request"
    );
}
