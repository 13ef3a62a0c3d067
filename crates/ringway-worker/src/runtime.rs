//! Worker threads: core pinning, the monoio runtime and its driver, and the worker's life from
//! start to drained shutdown.
//!
//! io_uring is set up with COOP_TASKRUN (no inter-processor interrupt to run completion work)
//! and, where the kernel has them, SINGLE_ISSUER and DEFER_TASKRUN (completion work runs in
//! batches when the worker waits). Measured on the development kernel, plain io_uring set-up
//! was 35% slower than epoll for forwarding; with these flags it is level or faster. If the
//! kernel refuses the flags they are dropped; if it refuses io_uring altogether the worker runs
//! on monoio's epoll driver and says so in the log and in `/metrics`.

use crate::accept;
use crate::settings::Settings;
use crate::worker::Worker;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use ringway_core::config::{DriverChoice, WorkersConfig};
use ringway_core::tls::{AcmeTable, CertTable};
use ringway_core::{Driver, LogProducer, RouteTable, Shutdown, WorkerStats};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often a worker sweeps expired idle upstream connections and trims its buffer pool.
const POOL_SWEEP: Duration = Duration::from_millis(1000);

/// A worker that could not start.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {worker}: io_uring runtime: {source}")]
    IoUring {
        worker: usize,
        source: std::io::Error,
    },
    #[error("worker {worker}: epoll runtime: {source}")]
    Legacy {
        worker: usize,
        source: std::io::Error,
    },
    #[error("worker {worker}: listener: {source}")]
    Listener {
        worker: usize,
        source: std::io::Error,
    },
    #[error("worker {worker}: thread: {source}")]
    Thread {
        worker: usize,
        source: std::io::Error,
    },
    #[error("worker {0} stopped before reporting")]
    Vanished(usize),
}

/// Everything one worker thread needs.
#[derive(Debug)]
pub struct WorkerSpec {
    pub id: usize,
    pub core: Option<usize>,
    /// Plain HTTP listener (None: HTTPS only).
    pub listener: Option<std::net::TcpListener>,
    /// HTTPS listener and the TLS set-up it needs.
    pub https: Option<(std::net::TcpListener, TlsSetup)>,
    pub certs: Arc<CertTable>,
    pub acme: Arc<AcmeTable>,
    pub settings: Settings,
    pub routes: Arc<RouteTable>,
    pub policies: Arc<ringway_core::policy::PolicyTable>,
    pub limiter: Arc<ringway_core::policy::RateLimiter>,
    pub registry: Arc<ringway_core::balance::Registry>,
    pub route_stats: Arc<ringway_core::balance::stats::RouteStats>,
    pub stats: Arc<WorkerStats>,
    pub log: Option<LogProducer>,
    pub shutdown: Arc<Shutdown>,
    pub shutdown_grace: Duration,
    pub driver: DriverChoice,
    pub uring_entries: u32,
    pub uring_coop_taskrun: bool,
    pub uring_defer_taskrun: bool,
    /// Called once a second on each worker thread when it trims its pools: lets the binary ask
    /// its allocator to return memory a burst left behind (None: nothing to do).
    pub allocator_trim: Option<fn()>,
}

/// What every worker's TLS configuration shares.
#[derive(Clone)]
pub struct TlsSetup {
    /// Session ticket keys, shared by all workers so a ticket resumes on any of them (None:
    /// no tickets).
    pub ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// Sessions each worker remembers for resumption by id.
    pub session_cache_entries: usize,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("tickets", &self.ticketer.is_some())
            .field("session_cache_entries", &self.session_cache_entries)
            .finish()
    }
}

/// Builds one worker's rustls configuration: TLS 1.2 and 1.3 with the aws-lc-rs provider,
/// certificates by SNI from the shared table (lookups counted in this worker's stats), ALPN
/// http/1.1, shared tickets and a per-worker session cache.
pub fn server_config(
    setup: &TlsSetup,
    certs: Arc<CertTable>,
    stats: Arc<WorkerStats>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(crate::tls::CertResolver { certs, stats }));
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.session_storage = if setup.session_cache_entries > 0 {
        rustls::server::ServerSessionMemoryCache::new(setup.session_cache_entries)
    } else {
        Arc::new(rustls::server::NoServerSessionStorage {})
    };
    match &setup.ticketer {
        Some(t) => c.ticketer = t.clone(),
        // Without tickets, TLS 1.3 resumption uses the session cache (stateful tickets).
        None => {
            c.send_tls13_tickets = if setup.session_cache_entries > 0 {
                2
            } else {
                0
            }
        }
    }
    c.max_early_data_size = 0;
    Ok(Arc::new(c))
}

/// Which cores workers are pinned to: `None` per worker when pinning is off.
pub fn plan_cores(c: &WorkersConfig) -> Vec<Option<usize>> {
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let count = match c.count {
        0 => available.len().max(1),
        n => n,
    };
    let cores = if c.cores.is_empty() {
        available
    } else {
        c.cores.clone()
    };
    (0..count)
        .map(|i| {
            if c.pin && !cores.is_empty() {
                Some(cores[i % cores.len()])
            } else {
                None
            }
        })
        .collect()
}

/// Running workers.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<std::thread::JoinHandle<()>>,
    pub drivers: Vec<Driver>,
}

impl Workers {
    /// Waits for every worker thread to finish (after shutdown).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Starts one thread per spec and waits until each has built its runtime (or failed to).
pub fn start(specs: Vec<WorkerSpec>) -> Result<Workers, WorkerError> {
    let (tx, rx) = mpsc::channel::<(usize, Result<Driver, WorkerError>)>();
    let mut handles = Vec::with_capacity(specs.len());
    let n = specs.len();
    for spec in specs {
        let id = spec.id;
        let tx = tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("ringway-w{id}"))
            .spawn(move || run(spec, tx))
            .map_err(|source| WorkerError::Thread { worker: id, source })?;
        handles.push(h);
    }
    drop(tx);
    let mut drivers = vec![Driver::Unknown; n];
    for _ in 0..n {
        let (id, r) = rx.recv().map_err(|_| WorkerError::Vanished(0))?;
        drivers[id] = r?;
    }
    Ok(Workers { handles, drivers })
}

type Report = mpsc::Sender<(usize, Result<Driver, WorkerError>)>;

fn uring_builder(coop: bool, defer: bool) -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    if coop {
        b.setup_coop_taskrun();
    }
    if defer {
        b.setup_single_issuer();
        b.setup_defer_taskrun();
    }
    b
}

fn run(spec: WorkerSpec, report: Report) {
    let id = spec.id;
    if let Some(core) = spec.core
        && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
    {
        tracing::warn!(worker = id, core, "could not pin worker to core");
    }
    let try_uring = matches!(spec.driver, DriverChoice::Auto | DriverChoice::IoUring)
        && (spec.driver == DriverChoice::IoUring || monoio::utils::detect_uring());
    if try_uring {
        // With the tuned flags first, then plain, before giving up on io_uring.
        let mut last_err = None;
        let attempts = [
            (spec.uring_coop_taskrun, spec.uring_defer_taskrun),
            (spec.uring_coop_taskrun, false),
            (false, false),
        ];
        for (coop, defer) in attempts {
            match RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(spec.uring_entries)
                .uring_builder(uring_builder(coop, defer))
                .enable_timer()
                .build()
            {
                Ok(mut rt) => {
                    if (coop, defer) != attempts[0] {
                        tracing::warn!(
                            worker = id,
                            coop,
                            defer,
                            "io_uring set-up flags refused by the kernel; using fewer"
                        );
                    }
                    spec.stats.set_driver(Driver::IoUring);
                    let _ = report.send((id, Ok(Driver::IoUring)));
                    rt.block_on(worker_main(spec));
                    return;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let err = last_err.unwrap_or_else(|| std::io::Error::other("io_uring unavailable"));
        if spec.driver == DriverChoice::IoUring {
            let _ = report.send((
                id,
                Err(WorkerError::IoUring {
                    worker: id,
                    source: err,
                }),
            ));
            return;
        }
        tracing::warn!(worker = id, error = %err, "io_uring unavailable; falling back to the epoll driver");
    } else if spec.driver == DriverChoice::Auto {
        tracing::warn!(
            worker = id,
            "io_uring not supported by this kernel; using the epoll driver"
        );
    }
    match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            spec.stats.set_driver(Driver::Legacy);
            let _ = report.send((id, Ok(Driver::Legacy)));
            rt.block_on(worker_main(spec));
        }
        Err(source) => {
            let _ = report.send((id, Err(WorkerError::Legacy { worker: id, source })));
        }
    }
}

/// Waits for parked connections to become readable and gives each a new task; closes them all
/// at shutdown.
async fn parking_lot(w: Rc<Worker>) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // A second descriptor of the epoll set, wrapped so the runtime can poll it: one poll
    // operation stands for every parked connection.
    let carrier = w.parking.dup_epoll().and_then(|fd| {
        // SAFETY: `fd` is an open descriptor we own; the wrapper is only polled for
        // readability and closed, never used as a socket.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd.into_raw_fd()) };
        monoio::net::TcpStream::from_std(std_stream)
    });
    let carrier = match carrier {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(worker = w.id, error = %e, "parking lot unusable; idle connections keep their tasks");
            return;
        }
    };
    let mut ready = Vec::with_capacity(crate::parking::WAKE_BATCH_MAX);
    loop {
        let mut readable = std::pin::pin!(carrier.readable(false));
        let mut shutdown = std::pin::pin!(w.shutdown.wait());
        let woke = std::future::poll_fn(|cx| {
            use std::future::Future;
            if shutdown.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(false);
            }
            readable.as_mut().poll(cx).map(|r| r.is_ok())
        })
        .await;
        if !woke {
            break;
        }
        ready.clear();
        if let Err(e) = w.parking.take_ready(&mut ready) {
            tracing::error!(worker = w.id, error = %e, "epoll_wait on the parking lot failed");
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        for p in ready.drain(..) {
            monoio::spawn(crate::conn::resume(w.clone(), p));
        }
    }
    // Shutdown: parked connections are idle by definition; close them now.
    ready.clear();
    w.parking.drain(&mut ready);
    for p in ready.drain(..) {
        let counted = p.counted;
        drop(p);
        crate::conn::closed(&w, counted);
    }
}

async fn worker_main(spec: WorkerSpec) {
    let WorkerSpec {
        id,
        listener,
        https,
        certs,
        acme,
        settings,
        routes,
        policies,
        limiter,
        registry,
        route_stats,
        stats,
        log,
        shutdown,
        shutdown_grace,
        allocator_trim,
        ..
    } = spec;
    let to_monoio = |l: std::net::TcpListener| match monoio::net::TcpListener::from_std(l) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(worker = id, error = %e, "listener unusable");
            None
        }
    };
    let listener = listener.and_then(to_monoio);
    let (https_listener, tls) = match https {
        Some((l, setup)) => match server_config(&setup, certs.clone(), stats.clone()) {
            Ok(cfg) => (to_monoio(l), Some(cfg)),
            Err(e) => {
                tracing::error!(worker = id, error = %e, "TLS configuration refused; HTTPS is off");
                (None, None)
            }
        },
        None => (None, None),
    };
    let parking = match crate::parking::ParkingLot::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot create the parking lot's epoll set");
            return;
        }
    };
    let tables = ringway_core::snapshot::Tables {
        routes,
        certs,
        acme,
        policies,
        limiter,
        registry,
        route_stats,
    };
    let w = Rc::new(Worker::new(id, settings, tables, stats, log, parking, tls));
    if w.settings.park_idle {
        monoio::spawn(parking_lot(w.clone()));
    }

    // Housekeeping, every deadline tick: advance connection deadlines, notice shutdown; once
    // a second: sweep the upstream pool, trim the buffer pool, publish the idle gauge.
    let hk = w.clone();
    monoio::spawn(async move {
        let mut last_sweep = Instant::now();
        let mut stopping = false;
        let mut expired = Vec::new();
        loop {
            monoio::time::sleep(crate::deadline::TICK).await;
            let now = Instant::now();
            hk.deadlines.advance(now);
            expired.clear();
            hk.parking.expire(now, &mut expired);
            for p in expired.drain(..) {
                let counted = p.counted;
                drop(p); // closes the socket
                crate::conn::closed(&hk, counted);
            }
            if !stopping && shutdown.is_requested() {
                stopping = true;
                hk.shutdown.fire();
            }
            if now.duration_since(last_sweep) >= POOL_SWEEP {
                let mut pool = hk.pool.borrow_mut();
                // Idle connections of draining endpoints close here, within a sweep.
                let reg = &hk.registry;
                pool.sweep(now, |tag| reg.pooling(crate::route::endpoint_of_tag(tag)));
                hk.stats.upstream_idle.set(pool.idle_count() as u64);
                hk.stats.connections_parked.set(hk.parking.parked() as u64);
                drop(pool);
                hk.bufs.trim();
                if let Some(trim) = allocator_trim {
                    trim();
                }
                last_sweep = now;
            }
        }
    });

    // Both accept loops run until shutdown; the worker then drains.
    let plain = listener.map(|l| accept::accept_loop(w.clone(), l, false));
    let secure = https_listener.map(|l| accept::accept_loop(w.clone(), l, true));
    match (plain, secure) {
        (Some(a), Some(b)) => {
            monoio::join!(a, b);
        }
        (Some(a), None) => a.await,
        (None, Some(b)) => b.await,
        (None, None) => {}
    }

    // Drain: the listener is closed; in-flight exchanges finish (each answers with
    // Connection: close) until none is left or the grace period ends.
    let deadline = Instant::now() + shutdown_grace;
    while w.active.get() > 0 {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            tracing::warn!(
                worker = id,
                open = w.active.get(),
                "shutdown grace period over; closing connections"
            );
            break;
        };
        let _ =
            monoio::time::timeout(left.min(Duration::from_millis(100)), w.slot_freed.wait()).await;
    }
    w.pool.borrow_mut().clear();
}
