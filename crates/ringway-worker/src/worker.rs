//! The state one worker shares among its connections: settings, pools, counters, the log ring
//! producer. It lives in an `Rc` on the worker's thread; nothing here is touched by another
//! thread except through the atomics in `stats` and the route table.

use crate::access::RequestIdGen;
use crate::deadline::Deadlines;
use crate::event::{LocalEvent, LocalSignal};
use crate::io::{BufPool, Timed};
use crate::parking::ParkingLot;
use crate::pool::Pool;
use crate::settings::Settings;
use foldhash::fast::RandomState;
use monoio::net::TcpStream;
use ringway_core::policy::{PolicyTable, RateLimiter};
use ringway_core::snapshot::Tables;
use ringway_core::tls::{AcmeTable, CertTable};
use ringway_core::{LogEntry, LogProducer, RouteTable, WorkerStats};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

/// A client address as the per-client connection limit counts it: IPv4 addresses one by one
/// (IPv4-mapped IPv6 as IPv4), IPv6 by /64, one subscriber's allocation, as the rate limits
/// key them (a client holding a /64 has 2^64 addresses to spread over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ringway_core::cidr::canonical(ip) {
            IpAddr::V4(v4) => ClientKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => ClientKey((u128::from(v6) & !u128::from(u64::MAX)) | 1),
        }
    }
}

/// Open connections per client key, for `limits.connections_per_client_max`. Only keys with an
/// open connection have an entry, so the map holds at most as many entries as the worker has
/// connections (`limits.connections_per_worker_max`).
#[derive(Debug, Default)]
pub struct ClientCounts {
    open: HashMap<ClientKey, u32, RandomState>,
}

impl ClientCounts {
    /// Counts a new connection of `key`, unless it already has `max` open.
    pub fn admit(&mut self, key: ClientKey, max: usize) -> bool {
        let n = self.open.entry(key).or_insert(0);
        if *n as usize >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection of `key` closed.
    pub fn release(&mut self, key: ClientKey) {
        if let Some(n) = self.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&key);
            }
        } else {
            debug_assert!(false, "released a client key that was never admitted");
        }
    }

    /// Client keys with a connection open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[derive(Debug)]
pub struct Worker {
    pub id: usize,
    pub settings: Settings,
    pub routes: Arc<RouteTable>,
    pub stats: Arc<WorkerStats>,
    pub log: RefCell<Option<LogProducer>>,
    pub pool: RefCell<Pool<Timed<TcpStream>>>,
    pub bufs: BufPool,
    pub ids: RefCell<RequestIdGen>,
    /// Round-robin position for routes with several upstreams.
    pub rr: Cell<u64>,
    /// Fired once when the process shuts down.
    pub shutdown: LocalEvent,
    /// Signalled when a connection closes, for an accept loop paused at the connection cap.
    pub slot_freed: LocalSignal,
    pub active: Cell<usize>,
    /// Open connections per client (only counted with `limits.connections_per_client_max`).
    pub clients: RefCell<ClientCounts>,
    /// Coarse deadlines of connections waiting for their next request.
    pub deadlines: Rc<Deadlines>,
    /// Connections currently reading with a posted buffer (see `conn::HOT_READERS_MAX`).
    pub hot_readers: Cell<usize>,
    /// Idle connections parked without a task.
    pub parking: ParkingLot,
    /// TLS configuration of this worker's HTTPS listener (its certificate resolver counts
    /// into this worker's stats).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub certs: Arc<CertTable>,
    pub acme: Arc<AcmeTable>,
    pub policies: Arc<PolicyTable>,
    pub limiter: Arc<RateLimiter>,
    /// Random state for visitor and session ids.
    pub rng: Cell<u64>,
}

impl Worker {
    pub fn new(
        id: usize,
        settings: Settings,
        tables: Tables,
        stats: Arc<WorkerStats>,
        log: Option<LogProducer>,
        parking: ParkingLot,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let Tables {
            routes,
            certs,
            acme,
            policies,
            limiter,
        } = tables;
        let pool = Pool::new(
            settings.idle_per_upstream_max,
            settings.upstream_idle_timeout,
        );
        let bufs = BufPool::with_body_buffers(
            settings.buffer_bytes,
            settings.body_buffer_bytes,
            settings.buffer_pool_max,
        );
        Self {
            id,
            settings,
            routes,
            stats,
            log: RefCell::new(log),
            pool: RefCell::new(pool),
            bufs,
            ids: RefCell::new(RequestIdGen::new(id)),
            rr: Cell::new(id as u64),
            shutdown: LocalEvent::default(),
            slot_freed: LocalSignal::default(),
            active: Cell::new(0),
            clients: RefCell::new(ClientCounts::default()),
            deadlines: Rc::new(Deadlines::default()),
            hot_readers: Cell::new(0),
            parking,
            tls,
            certs,
            acme,
            policies,
            limiter,
            rng: Cell::new(crate::policy::seed()),
        }
    }

    /// Pushes a request record into this worker's ring (if logging is on); never blocks.
    pub fn log(&self, entry: &LogEntry<'_>) {
        if let Some(p) = self.log.borrow_mut().as_mut() {
            if p.push(entry) {
                self.stats.log_records.inc();
            } else {
                self.stats.log_drops.inc();
            }
        }
    }

    /// 64 random bits (wyrand: ids must be unguessable enough to not collide, not secret).
    pub fn random_u64(&self) -> u64 {
        let s = self.rng.get().wrapping_add(0xa076_1d64_78bd_642f);
        self.rng.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    pub fn next_pick(&self) -> u64 {
        let v = self.rr.get().wrapping_add(1);
        self.rr.set(v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_counts_admit_up_to_the_limit_and_forget_closed_clients() {
        let mut c = ClientCounts::default();
        let a = ClientKey::of("192.0.2.1".parse().unwrap());
        let mapped = ClientKey::of("::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(a, mapped, "IPv4-mapped IPv6 is the IPv4 address");
        assert!(c.admit(a, 2) && c.admit(mapped, 2));
        assert!(!c.admit(a, 2), "third connection refused");
        c.release(a);
        assert!(c.admit(a, 2));
        c.release(a);
        c.release(a);
        assert!(
            c.is_empty(),
            "no entry is kept for a client without connections"
        );
        // One /64 is one client.
        let v6a = ClientKey::of("2001:db8:1:2::1".parse().unwrap());
        let v6b = ClientKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let other = ClientKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(v6a, v6b);
        assert_ne!(v6a, other);
        assert!(c.admit(v6a, 1) && !c.admit(v6b, 1) && c.admit(other, 1));
        assert_eq!(c.len(), 2);
    }
}
