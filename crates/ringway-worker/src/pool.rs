//! Per-worker upstream connection pools, keyed by upstream address.
//!
//! Each worker keeps its own idle keep-alive connections: checkout and checkin touch no lock
//! and no other core's memory. The most recently returned connection is reused first (it is
//! the least likely to have been closed by the upstream), an idle cap bounds each address, and
//! a sweep closes connections idle longer than the timeout.
//!
//! A pooled connection may have been closed by the upstream while idle, or received bytes
//! nobody asked for: a body after a HEAD or 204 answer, a second response, stray bytes tens of
//! milliseconds after the response ended. Such bytes must never be read as the answer to the
//! next request on that connection, which may come from another client on another route. So
//! every checkout, however recent the checkin, first asks the socket with a non-blocking
//! `MSG_PEEK`: EOF, an error or any readable byte discards the connection. This is a syscall
//! per reuse (measured in docs/performance.md); a readiness watch per pooled connection would
//! cost a submission and a cancellation per reuse on io_uring, which is no cheaper, and could
//! not close the window any further.
//!
//! What no check can close: bytes that arrive after the next request was sent are
//! indistinguishable from its response (HTTP/1.1 has no request ids); nginx and HAProxy have
//! the same limit. The window is the few microseconds between the peek and the send. A close
//! in flight during that window is covered by the retry of idempotent requests.

use foldhash::fast::RandomState;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Idle<C> {
    stream: C,
    since: Instant,
}

/// Idle upstream connections of one worker. `C` is the pooled connection (the worker pools
/// its timed sockets, so their cancellation state is reused too).
#[derive(Debug)]
pub struct Pool<C> {
    idle: HashMap<SocketAddr, VecDeque<Idle<C>>, RandomState>,
    /// What the caller said each address belongs to at its last checkin (the load
    /// balancer's endpoint): `sweep` drops the connections of tags it no longer keeps.
    tags: HashMap<SocketAddr, u64, RandomState>,
    per_upstream_max: usize,
    idle_timeout: Duration,
    idle_total: usize,
}

/// What a checkout found.
#[derive(Debug)]
pub struct Checkout<C> {
    pub stream: Option<C>,
    /// Pooled connections discarded because the upstream had closed them (or they failed).
    pub stale: u64,
    /// Pooled connections discarded because the upstream had sent bytes on them while idle.
    pub dirty: u64,
}

/// What a peek at an idle connection saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idleness {
    /// Nothing to read: the connection can carry a request.
    Quiet,
    /// EOF or a socket error.
    Closed,
    /// Bytes nobody asked for.
    Dirty,
}

impl<C: AsRawFd> Pool<C> {
    pub fn new(per_upstream_max: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: HashMap::with_hasher(RandomState::default()),
            tags: HashMap::with_hasher(RandomState::default()),
            per_upstream_max,
            idle_timeout,
            idle_total: 0,
        }
    }

    /// Takes a quiet idle connection to `addr`, if there is one; every one looked at is
    /// peeked first, and closed or dirty ones are dropped.
    pub fn checkout(&mut self, addr: SocketAddr, now: Instant) -> Checkout<C> {
        let mut out = Checkout {
            stream: None,
            stale: 0,
            dirty: 0,
        };
        let Some(q) = self.idle.get_mut(&addr) else {
            return out;
        };
        while let Some(c) = q.pop_back() {
            self.idle_total -= 1;
            if now.duration_since(c.since) >= self.idle_timeout {
                continue;
            }
            match idleness(&c.stream) {
                Idleness::Quiet => {
                    out.stream = Some(c.stream);
                    return out;
                }
                Idleness::Closed => out.stale += 1,
                Idleness::Dirty => out.dirty += 1,
            }
        }
        out
    }

    /// Returns a connection that finished an exchange cleanly. Past the idle cap the oldest
    /// idle connection to that address is closed.
    pub fn checkin(&mut self, addr: SocketAddr, stream: C, now: Instant) {
        self.checkin_tagged(addr, u64::MAX, stream, now);
    }

    /// `checkin`, naming what `addr` belongs to (see `sweep`).
    pub fn checkin_tagged(&mut self, addr: SocketAddr, tag: u64, stream: C, now: Instant) {
        if self.per_upstream_max == 0 {
            return;
        }
        if self.tags.get(&addr) != Some(&tag) {
            self.tags.insert(addr, tag);
        }
        let q = self.idle.entry(addr).or_default();
        if q.len() >= self.per_upstream_max {
            q.pop_front();
            self.idle_total -= 1;
        }
        q.push_back(Idle { stream, since: now });
        self.idle_total += 1;
    }

    /// Closes connections idle for longer than the timeout, and every connection of an
    /// address whose tag `keep` refuses (a draining endpoint); forgets empty addresses.
    pub fn sweep(&mut self, now: Instant, keep: impl Fn(u64) -> bool) {
        let timeout = self.idle_timeout;
        let mut closed = 0;
        let tags = &mut self.tags;
        self.idle.retain(|addr, q| {
            if tags.get(addr).is_some_and(|&t| !keep(t)) {
                closed += q.len();
                q.clear();
            }
            // Oldest first: stop at the first one still fresh.
            while q
                .front()
                .is_some_and(|c| now.duration_since(c.since) >= timeout)
            {
                q.pop_front();
                closed += 1;
            }
            if q.is_empty() {
                tags.remove(addr);
            }
            !q.is_empty()
        });
        self.idle_total -= closed;
    }

    /// Idle connections held.
    pub fn idle_count(&self) -> usize {
        self.idle_total
    }

    /// Closes everything (shutdown).
    pub fn clear(&mut self) {
        self.idle.clear();
        self.tags.clear();
        self.idle_total = 0;
    }
}

/// Whether an idle connection can be reused: no EOF, no error and no unexpected bytes from the
/// upstream.
pub fn idleness(stream: &impl AsRawFd) -> Idleness {
    let fd = stream.as_raw_fd();
    let mut byte = 0u8;
    // SAFETY: `fd` is an open socket owned by `stream` for the duration of the call, and the
    // buffer is one valid, writable byte on the stack. MSG_DONTWAIT makes the call non-blocking
    // whatever the socket's mode, and MSG_PEEK leaves any data in the socket.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast::<libc::c_void>(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n < 0 => {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                Idleness::Quiet
            } else {
                Idleness::Closed
            }
        }
        0 => Idleness::Closed,
        // The upstream sent bytes nobody asked for: the connection is out of sync.
        _ => Idleness::Dirty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::net::TcpStream;
    use std::io::Write;

    fn rt() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn detects_closed_and_dirty_connections() {
        rt().block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let mut pool: Pool<TcpStream> = Pool::new(4, Duration::from_secs(60));
            let now = Instant::now();

            let a = TcpStream::connect_addr(addr).await.unwrap();
            let (a_srv, _) = listener.accept().unwrap();
            let b = TcpStream::connect_addr(addr).await.unwrap();
            let (mut b_srv, _) = listener.accept().unwrap();
            let c = TcpStream::connect_addr(addr).await.unwrap();
            let (_c_srv, _) = listener.accept().unwrap();

            pool.checkin(addr, c, now);
            pool.checkin(addr, b, now);
            pool.checkin(addr, a, now);
            assert_eq!(pool.idle_count(), 3);
            drop(a_srv); // EOF on a
            b_srv.write_all(b"junk").unwrap(); // stray bytes on b
            monoio::time::sleep(Duration::from_millis(50)).await;

            let got = pool.checkout(addr, Instant::now());
            assert_eq!(
                (got.stale, got.dirty),
                (1, 1),
                "a (closed) and b (dirty) are discarded"
            );
            assert!(got.stream.is_some(), "c is alive");
            assert_eq!(pool.idle_count(), 0);
            assert!(pool.checkout(addr, Instant::now()).stream.is_none());
        });
    }

    #[test]
    fn caps_and_sweeps() {
        rt().block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let mut pool: Pool<TcpStream> = Pool::new(2, Duration::from_millis(100));
            let t0 = Instant::now();
            let mut keep = Vec::new();
            for _ in 0..3 {
                let s = TcpStream::connect_addr(addr).await.unwrap();
                keep.push(listener.accept().unwrap());
                pool.checkin(addr, s, t0);
            }
            assert_eq!(pool.idle_count(), 2, "capped per upstream");
            pool.sweep(t0 + Duration::from_millis(50), |_| true);
            assert_eq!(pool.idle_count(), 2);
            pool.sweep(t0 + Duration::from_millis(150), |_| true);
            assert_eq!(pool.idle_count(), 0);
            // A tag the sweep no longer keeps (a draining endpoint): closed at once.
            let s = TcpStream::connect_addr(addr).await.unwrap();
            keep.push(listener.accept().unwrap());
            pool.checkin_tagged(addr, 7, s, t0);
            pool.sweep(t0, |tag| tag != 7);
            assert_eq!(pool.idle_count(), 0);
            // Expired at checkout time too.
            let s = TcpStream::connect_addr(addr).await.unwrap();
            keep.push(listener.accept().unwrap());
            pool.checkin(addr, s, t0);
            assert!(
                pool.checkout(addr, t0 + Duration::from_millis(200))
                    .stream
                    .is_none()
            );
        });
    }
}
