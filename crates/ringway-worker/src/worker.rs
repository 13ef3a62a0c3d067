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
use monoio::net::TcpStream;
use ringway_core::policy::{PolicyTable, RateLimiter};
use ringway_core::snapshot::Tables;
use ringway_core::tls::{AcmeTable, CertTable};
use ringway_core::{LogEntry, LogProducer, RouteTable, WorkerStats};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

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
    /// Requests routed by this worker (round robin when a cluster has no worker slots).
    pub seq: Cell<u64>,
    /// Endpoint health and load, shared by every worker.
    pub registry: Arc<ringway_core::balance::Registry>,
    /// Per-route counters.
    pub route_stats: Arc<ringway_core::balance::stats::RouteStats>,
    /// Fired once when the process shuts down.
    pub shutdown: LocalEvent,
    /// Signalled when a connection closes, for an accept loop paused at the connection cap.
    pub slot_freed: LocalSignal,
    pub active: Cell<usize>,
    /// Open connections per client (only counted with `limits.connections_per_client_max`).
    pub clients: RefCell<crate::clients::ClientCounts>,
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
            registry,
            route_stats,
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
            seq: Cell::new(0),
            registry,
            route_stats,
            shutdown: LocalEvent::default(),
            slot_freed: LocalSignal::default(),
            active: Cell::new(0),
            clients: RefCell::new(crate::clients::ClientCounts::default()),
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

    /// What a choice of endpoint at `at` needs from this worker (fresh random bits each
    /// time).
    pub fn chooser(&self, at: std::time::Instant) -> crate::route::Chooser<'_> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        crate::route::Chooser {
            registry: &self.registry,
            worker: self.id,
            rand: self.random_u64(),
            seq,
            now_ms: self.registry.ms_at(at),
        }
    }

    /// Records a route event in this worker's row.
    pub fn route_event(&self, slot: u32, ev: ringway_core::balance::stats::RouteEvent) {
        self.route_stats.record(self.id, slot, ev);
    }
}
