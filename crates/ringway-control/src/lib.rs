//! Ringway's control plane.
//!
//! One thread per process runs a tokio current-thread runtime that:
//! - follows the route store and applies its snapshots and changes to the shared route table;
//! - drains the workers' log rings into the access log;
//! - serves the admin endpoints;
//! - turns SIGTERM/SIGINT into the shutdown flag the workers poll.
//!
//! The data plane never waits for anything here: workers read the route table without locks and
//! push log records into rings that drop (and count) when full.
#![forbid(unsafe_code)]

pub mod admin;
pub mod certs;
pub mod file_store;
pub mod logsink;
pub mod metrics;
pub mod store;

use metrics::ControlStats;
use ringway_core::snapshot::Snapshot;
use ringway_core::tls::{AcmeTable, CertTable};
use ringway_core::{LogConsumer, RouteTable, Shutdown, WorkerStats};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use store::{RouteStore, StoreEvent};

/// Everything the control plane needs.
#[derive(Debug)]
pub struct ControlParams {
    pub routes_path: PathBuf,
    /// The snapshot already applied at start, and the hash of the routes file it came from.
    pub initial: Option<(Snapshot, u64)>,
    pub routes_poll: Duration,
    /// Where to write the access log; None: logging is off.
    pub access_log: Option<PathBuf>,
    pub drain_interval: Duration,
    pub routes: Arc<RouteTable>,
    pub certs: Arc<CertTable>,
    pub acme: Arc<AcmeTable>,
    pub rings: Vec<LogConsumer>,
    pub worker_stats: Vec<Arc<WorkerStats>>,
    pub shutdown: Arc<Shutdown>,
    pub admin: Option<std::net::TcpListener>,
    /// Install the SIGTERM/SIGINT (drain) and SIGHUP (ignore) handlers; off for in-process
    /// tests.
    pub handle_signals: bool,
}

/// The control plane could not start.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control runtime: {0}")]
    Runtime(std::io::Error),
    #[error("access log {path}: {source}")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
    #[error("control thread: {0}")]
    Thread(std::io::Error),
}

/// The running control plane.
#[derive(Debug)]
pub struct ControlHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<ControlStats>,
}

impl ControlHandle {
    /// Drains what is left in the log rings, flushes, and stops the thread. Call after the
    /// workers have exited so their last records are included.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Starts the control thread. The route table should already hold the initial routes (the
/// caller loads them first so that a broken file stops start-up); the store then follows the
/// file from there.
pub fn start(p: ControlParams) -> Result<ControlHandle, ControlError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ControlError::Runtime)?;
    let log_file = match &p.access_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ControlError::AccessLog {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    if let Some(l) = &p.admin {
        l.set_nonblocking(true).map_err(ControlError::Admin)?;
    }
    let stats = Arc::new(ControlStats::default());
    if let Some((snap, _)) = &p.initial {
        // The caller's initial load counts as the first successful load.
        stats.note_refusals(&snap.certs.refused);
        ControlStats::inc(&stats.route_loads_ok);
        stats
            .route_last_load_unix
            .store(unix_now(), Ordering::Relaxed);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let st = stats.clone();
    let thread = std::thread::Builder::new()
        .name("ringway-control".into())
        .spawn(move || rt.block_on(run(p, log_file, st, rx)))
        .map_err(ControlError::Thread)?;
    Ok(ControlHandle {
        stop: Some(tx),
        thread: Some(thread),
        stats,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub use ringway_core::snapshot::Tables;

/// Applies store events to the tables until the runtime stops.
async fn follow_store(mut store: impl RouteStore, tables: Tables, stats: Arc<ControlStats>) {
    let routes = tables.routes.clone();
    loop {
        match store.next().await {
            Ok(ev) => {
                match ev {
                    StoreEvent::Full(snap) => {
                        tables.apply(&snap);
                        stats.note_refusals(&snap.certs.refused);
                        tracing::info!(
                            store = store.kind(),
                            hosts = snap.routes.hosts.len(),
                            default = snap.routes.default.is_some(),
                            certificates = snap.certs.entries.len(),
                            acme_tokens = snap.acme.len(),
                            version = routes.version(),
                            "routes loaded"
                        );
                    }
                    StoreEvent::Upsert(pattern, route) => routes.upsert(&pattern, route),
                    StoreEvent::Remove(pattern) => routes.remove(&pattern),
                }
                ControlStats::inc(&stats.route_loads_ok);
                stats
                    .route_last_load_unix
                    .store(unix_now(), Ordering::Relaxed);
            }
            Err(e) => {
                ControlStats::inc(&stats.route_loads_failed);
                tracing::error!(store = store.kind(), error = %e, "routes rejected; the previous routes stay in force");
            }
        }
    }
}

async fn run(
    p: ControlParams,
    log_file: Option<std::fs::File>,
    stats: Arc<ControlStats>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let store = file_store::FileStore::new(
        p.routes_path.clone(),
        p.routes_poll,
        p.initial.as_ref().map(|(s, h)| (s, *h)),
    );
    let tables = Tables {
        routes: p.routes.clone(),
        certs: p.certs.clone(),
        acme: p.acme.clone(),
    };
    tokio::spawn(follow_store(store, tables, stats.clone()));

    if let Some(l) = p.admin {
        match tokio::net::TcpListener::from_std(l) {
            Ok(listener) => {
                tokio::spawn(admin::serve(
                    listener,
                    admin::AdminState {
                        workers: p.worker_stats.clone(),
                        routes: p.routes.clone(),
                        certs: p.certs.clone(),
                        control: stats.clone(),
                    },
                ));
            }
            Err(e) => tracing::error!(error = %e, "admin listener unusable"),
        }
    }

    if p.handle_signals {
        let shutdown = p.shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                    _ = hup.recv() => {
                        // Without a handler SIGHUP would kill the process without draining.
                        tracing::info!("SIGHUP ignored: routes are reloaded when their file changes");
                        continue;
                    }
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!("shutdown requested: draining connections");
                    shutdown.request();
                } else {
                    tracing::warn!("second signal: exiting now");
                    std::process::exit(1);
                }
            }
        });
    }

    let mut rings = p.rings;
    let mut sink = log_file.map(|f| std::io::BufWriter::with_capacity(256 * 1024, f));
    let mut tick = tokio::time::interval(p.drain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        drain_once(&mut rings, sink.as_mut(), &stats);
    }
    // Final drain: the workers are gone, so the rings only shrink.
    while drain_once(&mut rings, sink.as_mut(), &stats) > 0 {}
    if let Some(s) = sink.as_mut() {
        let _ = s.flush();
    }
}

fn drain_once<W: Write>(
    rings: &mut [LogConsumer],
    sink: Option<&mut W>,
    stats: &ControlStats,
) -> u64 {
    let Some(sink) = sink else {
        // Logging off: rings are not created, nothing to do.
        return 0;
    };
    let n = match logsink::drain_to(rings, sink) {
        Ok(n) => n,
        Err(e) => {
            ControlStats::inc(&stats.access_log_errors);
            tracing::error!(error = %e, "access log write failed");
            0
        }
    };
    if n > 0 {
        stats.access_log_lines.fetch_add(n, Ordering::Relaxed);
        if let Err(e) = sink.flush() {
            ControlStats::inc(&stats.access_log_errors);
            tracing::error!(error = %e, "access log flush failed");
        }
    }
    n
}
