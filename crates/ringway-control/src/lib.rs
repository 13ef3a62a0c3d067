//! Ringway's control plane.
//!
//! One thread per process runs a tokio current-thread runtime that:
//! - follows the route store (a TOML file, or PostgreSQL) and applies its snapshots and
//!   changes to the shared tables;
//! - drains the workers' log rings into the access log and/or PostgreSQL (`pg::logs`);
//! - serves the admin endpoints;
//! - turns SIGTERM/SIGINT into the shutdown flag the workers poll.
//!
//! The data plane never waits for anything here: workers read the route table without locks and
//! push log records into rings that drop (and count) when full.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod balance_spec;
pub mod certs;
pub mod dns;
pub mod file_store;
pub mod logsink;
pub mod metrics;
pub mod pg;
pub mod policy_spec;
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

/// How often idle rate-limit keys are forgotten.
const RATE_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often the rate-limit key table is checked for overflows (then swept at once).
const RATE_OVERFLOW_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Where routes come from.
#[derive(Debug)]
pub enum StoreChoice {
    File {
        path: PathBuf,
        poll: Duration,
        /// The snapshot already applied at start, and the hash of the routes file it came
        /// from.
        initial: Option<(Snapshot, u64)>,
    },
    Postgres {
        config: pg::store::PgStoreConfig,
        /// What the snapshot file held, when the tables were filled from it at start.
        seed: Option<pg::snapshot_file::Loaded>,
    },
}

/// Everything the control plane needs.
#[derive(Debug)]
pub struct ControlParams {
    pub store: StoreChoice,
    /// Request log rows into PostgreSQL; None: off.
    pub pg_logs: Option<pg::logs::LogSinkConfig>,
    /// Where to write the access log; None: logging is off.
    pub access_log: Option<PathBuf>,
    pub drain_interval: Duration,
    pub routes: Arc<RouteTable>,
    pub certs: Arc<CertTable>,
    pub acme: Arc<AcmeTable>,
    pub policies: Arc<ringway_core::policy::PolicyTable>,
    pub limiter: Arc<ringway_core::policy::RateLimiter>,
    /// Binds routes to endpoints (already used for the initial routes).
    pub binder: balance::Binder,
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
    #[error("log spool: {0}")]
    Spool(#[from] pg::spool::SpoolError),
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
    let initial = match &p.store {
        StoreChoice::File { initial, .. } => initial.as_ref().map(|(s, _)| s),
        StoreChoice::Postgres { seed, .. } => seed.as_ref().map(|l| &l.snapshot),
    };
    if let Some(snap) = initial {
        // The caller's initial load counts as the first successful load.
        stats.note_refusals(&snap.certs.refused);
        ControlStats::inc(&stats.route_loads_ok);
        stats
            .route_last_load_unix
            .store(unix_now(), Ordering::Relaxed);
    }
    if let StoreChoice::Postgres { seed: Some(l), .. } = &p.store {
        stats.serving_from_snapshot.store(1, Ordering::Relaxed);
        // The routes are as old as the snapshot file, not as the process.
        stats.route_last_load_unix.store(
            u64::try_from(l.written_unix).unwrap_or(0),
            Ordering::Relaxed,
        );
    }
    // Opened here so that an unusable spool directory stops start-up.
    let spool = match &p.pg_logs {
        Some(c) => Some(pg::spool::Spool::open(&c.spool_dir, c.spool_bytes_max)?),
        None => None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let st = stats.clone();
    let thread = std::thread::Builder::new()
        .name("ringway-control".into())
        .spawn(move || rt.block_on(run(p, log_file, st, rx, spool)))
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

/// Applies store events to the tables until `stop` fires, then lets the store finish.
async fn follow_store(
    mut store: impl RouteStore,
    tables: Tables,
    mut binder: balance::Binder,
    stats: Arc<ControlStats>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let routes = tables.routes.clone();
    let mut maintenance = tokio::time::interval(balance::MAINTENANCE_INTERVAL);
    maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The store's future lives across maintenance steps: a store's `next` is not
        // cancel-safe (a full database load would start over at every step).
        let next = {
            let fut = store.next();
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    n = &mut fut => break Some(n),
                    _ = maintenance.tick() => binder.maintain(&routes).await,
                    _ = &mut stop => break None,
                }
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok(ev) => {
                match ev {
                    StoreEvent::Full(mut snap) => {
                        snap.routes = binder.bind_set(&snap.routes);
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
                    StoreEvent::Upsert(pattern, route) => {
                        routes.upsert(&pattern, binder.bind_one(&pattern, &route));
                    }
                    StoreEvent::Remove(pattern) => {
                        binder.removed(&pattern);
                        routes.remove(&pattern);
                    }
                    StoreEvent::Changes(ch) => apply_changes(&tables, &mut binder, ch, &stats),
                }
                stats.serving_from_snapshot.store(0, Ordering::Relaxed);
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
    store.finish().await;
}

/// Applies an incremental change set: routes, then certificates, then ACME tokens.
fn apply_changes(
    tables: &Tables,
    binder: &mut balance::Binder,
    ch: store::ChangeSet,
    stats: &ControlStats,
) {
    for (pattern, route) in ch.route_upserts {
        tables
            .routes
            .upsert(&pattern, binder.bind_one(&pattern, &route));
    }
    for pattern in &ch.route_removes {
        binder.removed(pattern);
        tables.routes.remove(pattern);
    }
    for (names, entry) in ch.cert_upserts {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        tables.certs.upsert(&names, entry);
    }
    if !ch.cert_removes.is_empty() {
        let names: Vec<&str> = ch.cert_removes.iter().map(String::as_str).collect();
        tables.certs.remove(&names);
    }
    if let Some(acme) = &ch.acme {
        tables.acme.apply(acme);
    }
    for (key, policy) in ch.policy_changes {
        match key {
            store::PolicyKey::Project(id) => tables.policies.upsert_project(id, policy),
            store::PolicyKey::Host(h) => tables.policies.upsert_host(&h, policy),
        }
    }
    stats
        .cert_refusals
        .fetch_add(ch.refused_new.len() as u64, Ordering::Relaxed);
    if let Some(now) = ch.refused_now
        && let Ok(mut r) = stats.certs_refused_now.lock()
    {
        *r = now;
    }
    if let Some(at) = ch.changed_at_unix_us {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        // Clocks of the database and this node may differ: a negative gap counts as zero.
        stats
            .change_visible
            .observe_us(u64::try_from(now_us - at).unwrap_or(0));
    }
}

async fn run(
    p: ControlParams,
    log_file: Option<std::fs::File>,
    stats: Arc<ControlStats>,
    stop: tokio::sync::oneshot::Receiver<()>,
    spool: Option<pg::spool::Spool>,
) {
    let tables = Tables {
        routes: p.routes.clone(),
        certs: p.certs.clone(),
        acme: p.acme.clone(),
        policies: p.policies.clone(),
        limiter: p.limiter.clone(),
        registry: p.binder.registry.clone(),
        route_stats: p.binder.route_stats.clone(),
    };
    let balance_view = balance::BalanceMetrics {
        registry: p.binder.registry.clone(),
        route_stats: p.binder.route_stats.clone(),
        view: p.binder.view.clone(),
    };
    let binder = p.binder;
    let (store_stop, store_stop_rx) = tokio::sync::oneshot::channel();
    let store_task = match p.store {
        StoreChoice::File {
            path,
            poll,
            initial,
        } => {
            let store =
                file_store::FileStore::new(path, poll, initial.as_ref().map(|(s, h)| (s, *h)));
            tokio::spawn(follow_store(
                store,
                tables,
                binder,
                stats.clone(),
                store_stop_rx,
            ))
        }
        StoreChoice::Postgres { config, seed } => {
            let mut store = pg::store::PgStore::new(config, stats.clone());
            if let Some(l) = &seed {
                store.seed(l);
            }
            tokio::spawn(follow_store(
                store,
                tables,
                binder,
                stats.clone(),
                store_stop_rx,
            ))
        }
    };
    let mut db_logs = match (p.pg_logs, spool) {
        (Some(cfg), Some(spool)) => {
            let builder = pg::logs::BatchBuilder::new(&cfg);
            let (sink, task) = pg::logs::start(cfg, spool, stats.clone());
            Some((builder, sink, task))
        }
        _ => None,
    };

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
                        balance: balance_view,
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
                        tracing::info!("SIGHUP ignored: routes follow their store (file changes, database notifications) without a signal");
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

    // Forget rate-limit keys whose bucket is full again (their state equals a new key's),
    // and publish the policy gauges.
    {
        let (limiter, policies, st) = (p.limiter.clone(), p.policies.clone(), stats.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(RATE_OVERFLOW_CHECK_INTERVAL);
            let mut last_sweep: Option<tokio::time::Instant> = None;
            let mut overflows_seen = 0;
            loop {
                t.tick().await;
                // A full key table lets new clients through unlimited: while it overflows,
                // sweep at the check interval to free expired keys sooner.
                let overflows = limiter.overflows.load(Ordering::Relaxed);
                if overflows == overflows_seen
                    && last_sweep.is_some_and(|t| t.elapsed() < RATE_SWEEP_INTERVAL)
                {
                    continue;
                }
                overflows_seen = overflows;
                last_sweep = Some(tokio::time::Instant::now());
                let n = limiter.sweep(0);
                st.rate_limit_keys.store(n as u64, Ordering::Relaxed);
                st.rate_limit_overflows.store(overflows, Ordering::Relaxed);
                st.policies.store(policies.len() as u64, Ordering::Relaxed);
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
        drain_once(
            &mut rings,
            sink.as_mut(),
            db_logs.as_mut().map(|(b, s, _)| (b, &*s)),
            &stats,
        );
    }
    let _ = store_stop.send(());
    let _ = store_task.await;
    // Final drain: the workers are gone, so the rings only shrink.
    while drain_once(
        &mut rings,
        sink.as_mut(),
        db_logs.as_mut().map(|(b, s, _)| (b, &*s)),
        &stats,
    ) > 0
    {}
    if let Some(s) = sink.as_mut() {
        let _ = s.flush();
    }
    if let Some((mut builder, sink, task)) = db_logs {
        if let Some(b) = builder.take() {
            sink.submit_wait(b).await;
        }
        // Closing the queue tells the writer to finish: write or spool what is queued, then
        // try the spool within its shutdown budget.
        drop(sink);
        let _ = task.await;
    }
}

/// Empties every ring once into the access log file and/or the database batches; returns
/// the records taken.
fn drain_once<W: Write>(
    rings: &mut [LogConsumer],
    mut sink: Option<&mut W>,
    mut db: Option<(&mut pg::logs::BatchBuilder, &pg::logs::LogSink)>,
    stats: &ControlStats,
) -> u64 {
    if sink.is_none() && db.is_none() {
        // Logging off: rings are not created, nothing to do.
        return 0;
    }
    let mut n = 0u64;
    let mut lines = Vec::new();
    for ring in rings.iter_mut() {
        lines.clear();
        ring.drain(logsink::DRAIN_BATCH_RECORDS_MAX, |bytes| {
            let Ok(e) = ringway_core::LogEntry::decode(bytes) else {
                tracing::error!("corrupt log record skipped");
                return;
            };
            n += 1;
            if sink.is_some() {
                logsink::write_json_line(&e, &mut lines);
            }
            if let Some((builder, db)) = db.as_mut()
                && let Some(batch) = builder.push(&e)
            {
                db.submit(batch);
            }
        });
        if let Some(s) = sink.as_mut()
            && !lines.is_empty()
            && let Err(e) = s.write_all(&lines)
        {
            ControlStats::inc(&stats.access_log_errors);
            tracing::error!(error = %e, "access log write failed");
        }
    }
    if let Some((builder, db)) = db.as_mut()
        && let Some(batch) = builder.take_if_due()
    {
        db.submit(batch);
    }
    let Some(sink) = sink else { return n };
    if n > 0 {
        stats.access_log_lines.fetch_add(n, Ordering::Relaxed);
        if let Err(e) = sink.flush() {
            ControlStats::inc(&stats.access_log_errors);
            tracing::error!(error = %e, "access log flush failed");
        }
    }
    n
}
