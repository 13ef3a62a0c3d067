//! The parking lot: idle keep-alive connections without a task.
//!
//! A connection waiting for its next request needs little: its socket, the client address,
//! how many requests it served, and when to give up. A task waiting on a poll costs more than
//! nginx's whole idle connection (about 0.75 KiB here), so a connection that stays quiet past
//! its hot read is *parked*: its socket leaves the io_uring runtime and is registered, one-shot,
//! in a per-worker epoll set; its state shrinks to a slab entry; its task ends. One lot task per
//! worker waits for the epoll set to become readable (a single poll operation for all parked
//! connections), takes the ready ones with `epoll_wait`, and starts a fresh task for each.
//! Expired connections are closed by the worker's housekeeping tick.
//!
//! Costs: one `epoll_ctl` when a connection parks, one `epoll_wait` per batch of wakeups, a task
//! allocation when it comes back. Under load connections never park (they are caught by the
//! hot read), so the request path is unaffected.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// Connections taken from the epoll set per `epoll_wait`.
pub const WAKE_BATCH_MAX: usize = 256;
/// Deadline entries of connections that left before their deadline (woken by data) that the
/// due queues may hold beyond twice the parked connections, before they are compacted. Without
/// it a client that sends a request every hot-read period would add one entry per request,
/// each kept until its keep-alive deadline.
pub const DUE_QUEUE_SLACK: usize = 64;

/// TLS state kept while a connection is parked.
#[derive(Debug)]
pub struct ParkedTls {
    pub session: Box<rustls::ServerConnection>,
    pub info: crate::tls::TlsInfo,
}

/// What a parked connection keeps.
#[derive(Debug)]
pub struct Parked {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub trusted: bool,
    pub counted: Option<crate::clients::ClientKey>,
    pub served: u64,
    pub accepted: Instant,
    /// The socket is already in the epoll set (disarmed): re-arm with MOD, not ADD.
    pub registered: bool,
    /// The TLS session of an HTTPS connection.
    pub tls: Option<Box<ParkedTls>>,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Parked>,
}

/// One worker's parked connections.
#[derive(Debug)]
pub struct ParkingLot {
    epoll: OwnedFd,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Deadlines of connections that have not sent a first request, and of keep-alive
    /// connections. Within a queue every connection waits the same time, so deadlines grow
    /// with parking order and expiry pops from the front (one parked out of order would only
    /// close late, never early).
    first: RefCell<VecDeque<(Instant, u32, u32)>>,
    keepalive: RefCell<VecDeque<(Instant, u32, u32)>>,
    parked: Cell<usize>,
}

fn token(key: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(key)
}

impl ParkingLot {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` was just returned by epoll_create1 and is owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            first: RefCell::new(VecDeque::new()),
            keepalive: RefCell::new(VecDeque::new()),
            parked: Cell::new(0),
        })
    }

    /// A second descriptor of the epoll set, for the lot task to poll for readability.
    pub fn dup_epoll(&self) -> io::Result<OwnedFd> {
        self.epoll.try_clone()
    }

    pub fn parked(&self) -> usize {
        self.parked.get()
    }

    /// Parks `conn` until it is readable or `due` passes. `first`: it has not sent a request
    /// yet (its deadline comes from the header timeout). On failure the connection is handed
    /// back.
    pub fn park(&self, mut conn: Parked, due: Instant, first: bool) -> Result<(), Parked> {
        let key = match self.free.borrow_mut().pop() {
            Some(k) => k,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (slots.len() - 1) as u32
            }
        };
        let generation = {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[key as usize];
            s.generation = s.generation.wrapping_add(1);
            s.generation
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token(key, generation),
        };
        let op = if conn.registered {
            libc::EPOLL_CTL_MOD
        } else {
            libc::EPOLL_CTL_ADD
        };
        let fd = conn.stream.as_raw_fd();
        // SAFETY: both descriptors are open and owned (the epoll set by `self`, the socket by
        // `conn`); `ev` is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc != 0 {
            self.free.borrow_mut().push(key);
            return Err(conn);
        }
        conn.registered = true;
        self.slots.borrow_mut()[key as usize].conn = Some(conn);
        let q = if first { &self.first } else { &self.keepalive };
        q.borrow_mut().push_back((due, key, generation));
        self.parked.set(self.parked.get() + 1);
        if self.queued() > 2 * self.parked.get() + DUE_QUEUE_SLACK {
            self.compact();
        }
        debug_assert!(self.queued() <= 2 * self.parked.get() + DUE_QUEUE_SLACK + 1);
        Ok(())
    }

    /// Deadline entries held, live and stale.
    pub fn queued(&self) -> usize {
        self.first.borrow().len() + self.keepalive.borrow().len()
    }

    /// Drops the deadline entries of connections no longer parked under them. Amortised O(1)
    /// per park: after a compaction at most `parked` entries are left, and the next one comes
    /// after `parked + DUE_QUEUE_SLACK` more parks.
    fn compact(&self) {
        let slots = self.slots.borrow();
        let live = |&(_, key, generation): &(Instant, u32, u32)| {
            slots
                .get(key as usize)
                .is_some_and(|s| s.generation == generation && s.conn.is_some())
        };
        self.first.borrow_mut().retain(live);
        self.keepalive.borrow_mut().retain(live);
    }

    fn take(&self, key: u32, generation: u32) -> Option<Parked> {
        let mut slots = self.slots.borrow_mut();
        let s = slots.get_mut(key as usize)?;
        if s.generation != generation {
            return None;
        }
        let c = s.conn.take()?;
        drop(slots);
        self.free.borrow_mut().push(key);
        self.parked.set(self.parked.get() - 1);
        Some(c)
    }

    /// Parked connections that became readable (data, EOF or error), up to `WAKE_BATCH_MAX`.
    pub fn take_ready(&self, out: &mut Vec<Parked>) -> io::Result<usize> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; WAKE_BATCH_MAX];
        // SAFETY: the epoll set is open; `events` has room for WAKE_BATCH_MAX entries and the
        // kernel writes at most that many; timeout 0 never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                WAKE_BATCH_MAX as i32,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let mut taken = 0;
        for ev in &events[..n as usize] {
            let t = ev.u64;
            if let Some(c) = self.take((t & 0xffff_ffff) as u32, (t >> 32) as u32) {
                out.push(c);
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Removes connections whose deadline passed; the caller closes them.
    pub fn expire(&self, now: Instant, out: &mut Vec<Parked>) {
        for q in [&self.first, &self.keepalive] {
            loop {
                let front = q.borrow().front().copied();
                match front {
                    Some((due, key, generation)) if due <= now => {
                        q.borrow_mut().pop_front();
                        if let Some(c) = self.take(key, generation) {
                            out.push(c);
                        }
                    }
                    _ => break,
                }
            }
        }
    }

    /// Removes every parked connection (shutdown); the caller closes them.
    pub fn drain(&self, out: &mut Vec<Parked>) {
        let keys: Vec<(u32, u32)> = self
            .slots
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(k, s)| (k as u32, s.generation))
            .collect();
        for (k, g) in keys {
            if let Some(c) = self.take(k, g) {
                out.push(c);
            }
        }
        self.first.borrow_mut().clear();
        self.keepalive.borrow_mut().clear();
    }
}

/// Turns a monoio socket with no operation in flight into a plain owned socket.
pub fn into_std(stream: monoio::net::TcpStream) -> std::net::TcpStream {
    let fd: RawFd = stream.into_raw_fd();
    // SAFETY: `into_raw_fd` handed us sole ownership of the open socket descriptor.
    unsafe { std::net::TcpStream::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn pair(l: &std::net::TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn parked(s: std::net::TcpStream, served: u64) -> Parked {
        Parked {
            peer: s.peer_addr().unwrap(),
            stream: s,
            trusted: false,
            counted: None,
            served,
            accepted: Instant::now(),
            registered: false,
            tls: None,
        }
    }

    #[test]
    fn wakes_readable_connections_and_expires_quiet_ones() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lot = ParkingLot::new().unwrap();
        let t0 = Instant::now();
        let (mut c1, s1) = pair(&l);
        let (_c2, s2) = pair(&l);
        let (c3, s3) = pair(&l);
        // Deadlines in each queue grow with time, as they do in the worker.
        lot.park(parked(s2, 2), t0 + Duration::from_millis(10), false)
            .unwrap();
        lot.park(parked(s1, 1), t0 + Duration::from_secs(60), false)
            .unwrap();
        lot.park(parked(s3, 3), t0 + Duration::from_secs(60), false)
            .unwrap();
        assert_eq!(lot.parked(), 3);

        let mut out = Vec::new();
        lot.take_ready(&mut out).unwrap();
        assert!(out.is_empty(), "nobody spoke yet");

        c1.write_all(b"GET /").unwrap();
        drop(c3); // EOF counts as readable too
        std::thread::sleep(Duration::from_millis(50));
        lot.take_ready(&mut out).unwrap();
        let mut served: Vec<u64> = out.iter().map(|p| p.served).collect();
        served.sort();
        assert_eq!(served, vec![1, 3]);
        assert_eq!(lot.parked(), 1);

        // Re-parking a woken connection re-arms its one-shot registration.
        let again = out.remove(0);
        let again_served = again.served;
        lot.park(again, t0 + Duration::from_secs(60), false)
            .unwrap();
        out.clear();
        lot.take_ready(&mut out).unwrap();
        if again_served == 1 {
            assert_eq!(out.len(), 1, "unread bytes keep the socket readable");
        }
        out.clear();

        lot.expire(t0 + Duration::from_millis(20), &mut out);
        assert_eq!(out.iter().map(|p| p.served).collect::<Vec<_>>(), vec![2]);
        out.clear();
        lot.drain(&mut out);
        assert_eq!(lot.parked(), 0);
    }

    #[test]
    fn due_queues_stay_bounded_when_connections_wake_before_their_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lot = ParkingLot::new().unwrap();
        let t0 = Instant::now();
        let (mut c, s) = pair(&l);
        c.write_all(b"x").unwrap(); // always readable: every park wakes at once
        std::thread::sleep(Duration::from_millis(20));
        let mut p = parked(s, 0);
        let mut out = Vec::new();
        for i in 0..10_000u32 {
            // A keep-alive deadline far away, as a connection served every hot read has.
            lot.park(
                p,
                t0 + Duration::from_secs(60) + Duration::from_micros(u64::from(i)),
                false,
            )
            .unwrap();
            assert!(lot.queued() <= 2 * lot.parked() + DUE_QUEUE_SLACK);
            out.clear();
            while out.is_empty() {
                lot.take_ready(&mut out).unwrap();
            }
            p = out.pop().unwrap();
        }
        assert!(
            lot.queued() <= 2 + DUE_QUEUE_SLACK,
            "{} entries",
            lot.queued()
        );
    }

    #[test]
    fn generations_protect_reused_slots() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lot = ParkingLot::new().unwrap();
        let t0 = Instant::now();
        let (_c1, s1) = pair(&l);
        lot.park(parked(s1, 1), t0, false).unwrap();
        let mut out = Vec::new();
        lot.expire(t0, &mut out);
        assert_eq!(out.len(), 1);
        // The slot is reused; the old deadline entry is gone, a stale one would not match.
        let (_c2, s2) = pair(&l);
        lot.park(parked(s2, 2), t0 + Duration::from_secs(60), false)
            .unwrap();
        out.clear();
        lot.expire(t0 + Duration::from_secs(1), &mut out);
        assert!(out.is_empty());
        assert_eq!(lot.parked(), 1);
    }
}
