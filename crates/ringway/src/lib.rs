//! Wiring: config, routes, listeners, the control plane and the workers, started in that order
//! and stopped in reverse. The binary (`main.rs`) is a thin CLI over [`start`]; the end-to-end
//! tests use [`start`] directly to run a proxy inside the test process.
#![forbid(unsafe_code)]

use anyhow::{Context, bail};
use ringway_control::pg::logs::LogSinkConfig;
use ringway_control::pg::store::PgStoreConfig;
use ringway_control::{ControlHandle, ControlParams, StoreChoice};
use ringway_core::config::Config;
use ringway_core::config::StoreKind;
use ringway_core::snapshot::Snapshot;
use ringway_core::tls::{AcmeTable, CertTable};
use ringway_core::{Driver, RouteTable, Shutdown, WorkerStats, log_ring};
use ringway_worker::{Settings, TlsSetup, WorkerSpec, Workers};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Reads and validates a config file. Relative paths inside it are relative to its folder.
pub fn load_config(path: &Path) -> anyhow::Result<(Config, PathBuf)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let config: Config =
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
    config
        .validate()
        .with_context(|| format!("validating config {}", path.display()))?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((config, base))
}

/// `p` if absolute, else `base/p`.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Applies pending schema migrations before serving (`postgres.migrate_on_start`). An
/// unreachable database is not fatal (the node serves from its snapshot and the store keeps
/// trying); a migration that fails is.
fn migrate_at_start(pg: &ringway_core::config::PostgresConfig) -> anyhow::Result<()> {
    ringway_control::pg::block_on(async {
        let timeout = Duration::from_millis(pg.connect_timeout_ms);
        let mut conn = match ringway_control::pg::connect(&pg.url, timeout, false).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "migrations skipped: database unreachable");
                return Ok(());
            }
        };
        let applied = ringway_control::pg::migrate::migrate(&mut conn.client).await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "schema migrations applied");
        }
        Ok(())
    })?
}

/// Runs the migrations (`ringway migrate`): returns the versions applied.
pub fn migrate(config: &Config) -> anyhow::Result<Vec<i32>> {
    ringway_control::pg::block_on(async {
        let pg = &config.postgres;
        let mut conn = ringway_control::pg::connect(
            &pg.url,
            Duration::from_millis(pg.connect_timeout_ms),
            false,
        )
        .await
        .with_context(|| format!("connecting to {}", ringway_control::pg::redact(&pg.url)))?;
        Ok(ringway_control::pg::migrate::migrate(&mut conn.client).await?)
    })?
}

/// Start-up choices that are not config.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Install the SIGTERM/SIGINT (drain) and SIGHUP (ignore) handlers; the binary does,
    /// in-process tests do not.
    pub handle_signals: bool,
    /// Run on each worker thread once a second: returns memory freed after a burst to the
    /// system (the binary passes mimalloc's collector).
    pub allocator_trim: Option<fn()>,
}

/// A running proxy.
#[derive(Debug)]
pub struct Running {
    /// Address of the plain HTTP listener (None: off).
    pub http_addr: Option<SocketAddr>,
    /// Address of the HTTPS listener (None: off).
    pub https_addr: Option<SocketAddr>,
    pub certs: Arc<CertTable>,
    pub admin_addr: Option<SocketAddr>,
    pub routes: Arc<RouteTable>,
    pub worker_stats: Vec<Arc<WorkerStats>>,
    pub drivers: Vec<Driver>,
    pub shutdown: Arc<Shutdown>,
    workers: Option<Workers>,
    control: Option<ControlHandle>,
}

impl Running {
    /// Asks every worker to stop accepting and finish in-flight requests.
    pub fn request_shutdown(&self) {
        self.shutdown.request();
    }

    /// Waits for the workers to finish (after a shutdown request), then flushes the logs.
    pub fn wait(mut self) {
        if let Some(w) = self.workers.take() {
            w.join();
        }
        if let Some(c) = self.control.take() {
            c.stop();
        }
    }

    /// Requests shutdown and waits for it.
    pub fn stop(self) {
        self.request_shutdown();
        self.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.workers.is_some() || self.control.is_some() {
            self.shutdown.request();
            if let Some(w) = self.workers.take() {
                w.join();
            }
            if let Some(c) = self.control.take() {
                c.stop();
            }
        }
    }
}

/// Starts the proxy. `base` resolves relative paths of the config (its folder).
pub fn start(config: Config, base: &Path, opts: Options) -> anyhow::Result<Running> {
    config.validate()?;
    let cores = ringway_worker::plan_cores(&config.workers);
    let n = cores.len();
    let mut binder = ringway_control::balance::Binder::new(
        ringway_control::balance::BalanceLimits {
            endpoints_max: config.balancer.endpoints_max,
            route_series_max: config.balancer.route_series_max,
            dns_refresh: Duration::from_millis(config.balancer.dns_refresh_ms),
        },
        n,
        ringway_control::dns::Resolver {
            servers: config.dns.servers.clone(),
            timeout: Duration::from_millis(config.dns.timeout_ms),
        },
    );
    let tables = ringway_control::Tables {
        routes: Arc::new(RouteTable::new()),
        certs: Arc::new(CertTable::new()),
        acme: Arc::new(AcmeTable::new()),
        policies: Arc::default(),
        limiter: Arc::new(ringway_core::policy::RateLimiter::new(
            config.policy.rate_limit_keys_max,
        )),
        registry: binder.registry.clone(),
        route_stats: binder.route_stats.clone(),
    };
    // The initial routes bound to endpoints before any worker sees them; names are resolved
    // at once (blocking: nothing serves yet) when the system resolver is used, else by the
    // control thread's first maintenance step.
    let mut bind_initial = |snap: &Snapshot| -> Snapshot {
        let mut bound = snap.clone();
        bound.routes = binder.bind_set(&snap.routes);
        if config.dns.servers.is_empty() {
            bound.routes = binder.resolve_now_blocking(&snap.routes);
        }
        bound
    };
    let store = match config.routes.store {
        StoreKind::File => {
            let routes_path = resolve(base, &config.routes.file);
            let (initial, routes_hash) =
                ringway_control::file_store::load_routes_file_hashed(&routes_path)
                    .with_context(|| "loading routes (the file store is the route source)")?;
            tables.apply(&bind_initial(&initial));
            StoreChoice::File {
                path: routes_path,
                poll: Duration::from_millis(config.routes.poll_interval_ms),
                initial: Some((initial, routes_hash)),
            }
        }
        StoreKind::Postgres => {
            let pg = &config.postgres;
            if pg.migrate_on_start {
                migrate_at_start(pg)?;
            }
            let snapshot_path = resolve(base, &pg.snapshot_path);
            // Serve the last-known-good state at once; the database catches up below.
            let seed = match ringway_control::pg::snapshot_file::read(&snapshot_path) {
                Ok(Some(l)) => {
                    tracing::info!(
                        path = %snapshot_path.display(),
                        hosts = l.snapshot.routes.hosts.len(),
                        certificates = l.snapshot.certs.entries.len(),
                        written_unix = l.written_unix,
                        "routes from the snapshot file"
                    );
                    tables.apply(&bind_initial(&l.snapshot));
                    Some(l)
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error = %e, "snapshot file unusable; waiting for the database");
                    None
                }
            };
            StoreChoice::Postgres {
                config: PgStoreConfig {
                    url: pg.url.clone(),
                    connect_timeout: Duration::from_millis(pg.connect_timeout_ms),
                    resync_interval: Duration::from_millis(pg.resync_interval_ms),
                    backoff_max: Duration::from_millis(pg.reconnect_backoff_max_ms),
                    snapshot_path,
                },
                seed,
            }
        }
    };
    let pg_logs = config.postgres.logs.enabled.then(|| {
        let pg = &config.postgres;
        LogSinkConfig {
            url: pg.url.clone(),
            connect_timeout: Duration::from_millis(pg.connect_timeout_ms),
            write_timeout: Duration::from_millis(pg.logs.write_timeout_ms),
            batch_rows_max: pg.logs.batch_rows_max,
            flush_interval: Duration::from_millis(pg.logs.flush_interval_ms),
            spool_dir: resolve(base, &pg.logs.spool_dir),
            spool_bytes_max: pg.logs.spool_bytes_max,
            shutdown_flush: Duration::from_millis(pg.logs.shutdown_flush_ms),
            backoff_max: Duration::from_millis(pg.reconnect_backoff_max_ms),
            node: if pg.node_name.is_empty() {
                ringway_control::pg::host_name()
            } else {
                pg.node_name.clone()
            },
        }
    });
    let routes = tables.routes.clone();
    if config.listen.http.is_none() && config.listen.https.is_none() {
        bail!("no listener configured: set listen.http or listen.https");
    }
    let bind = |addr: Option<SocketAddr>| -> anyhow::Result<Vec<Option<std::net::TcpListener>>> {
        match addr {
            Some(a) => Ok(ringway_worker::bind_listeners(a, n, config.listen.backlog)
                .with_context(|| format!("binding {a}"))?
                .into_iter()
                .map(Some)
                .collect()),
            None => Ok((0..n).map(|_| None).collect()),
        }
    };
    let listeners = bind(config.listen.http)?;
    let https_listeners = bind(config.listen.https)?;
    let http_addr = listeners[0].as_ref().map(|l| l.local_addr()).transpose()?;
    let https_addr = https_listeners[0]
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    if https_addr.is_some() && tables.certs.is_empty() {
        tracing::warn!(
            "listen.https is set but the route store holds no certificate (yet): handshakes are refused until one arrives"
        );
    }
    let tls_setup = TlsSetup {
        ticketer: if config.tls.tickets {
            Some(
                rustls::crypto::aws_lc_rs::Ticketer::new()
                    .context("creating the TLS ticket keys")?,
            )
        } else {
            None
        },
        session_cache_entries: config.tls.session_cache_entries,
    };
    let admin = match config.admin.listen {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .with_context(|| format!("binding admin listener {a}"))?,
        ),
        None => None,
    };
    let admin_addr = match &admin {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let worker_stats: Vec<Arc<WorkerStats>> =
        (0..n).map(|_| Arc::new(WorkerStats::new())).collect();
    let (producers, consumers): (Vec<_>, Vec<_>) =
        if config.access_log.enabled || config.postgres.logs.enabled {
            (0..n)
                .map(|_| {
                    let (p, c) = log_ring(config.access_log.ring_bytes);
                    (Some(p), c)
                })
                .unzip()
        } else {
            ((0..n).map(|_| None).collect(), Vec::new())
        };
    let shutdown = Arc::new(Shutdown::new());

    let control = ringway_control::start(ControlParams {
        store,
        pg_logs,
        certs: tables.certs.clone(),
        acme: tables.acme.clone(),
        policies: tables.policies.clone(),
        limiter: tables.limiter.clone(),
        binder,
        access_log: config
            .access_log
            .enabled
            .then(|| resolve(base, &config.access_log.path)),
        drain_interval: Duration::from_millis(config.access_log.drain_interval_ms),
        routes: routes.clone(),
        rings: consumers,
        worker_stats: worker_stats.clone(),
        shutdown: shutdown.clone(),
        admin,
        handle_signals: opts.handle_signals,
    })?;
    if config.routes.store == StoreKind::Postgres {
        // Give the database a moment to deliver the first full load, so a healthy start
        // serves current routes from its first request; past the wait, serve the snapshot
        // (or nothing, not ready) and let the store catch up.
        let end =
            std::time::Instant::now() + Duration::from_millis(config.postgres.startup_wait_ms);
        while control
            .stats
            .full_loads
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
            && std::time::Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if control
            .stats
            .full_loads
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            tracing::warn!(
                from_snapshot = routes.is_loaded(),
                "database not reached at start; serving the snapshot file's routes while retrying"
            );
        }
    }

    let mut settings = Settings::from_config(&config);
    if config.tls.redirect_port.is_none() {
        // Port 0 in the config means "any free port": redirect to the one bound.
        settings.https_redirect_port = https_addr.map(|a| a.port()).filter(|p| *p != 443);
    }
    let specs: Vec<WorkerSpec> = listeners
        .into_iter()
        .zip(https_listeners)
        .zip(producers)
        .enumerate()
        .map(|(id, ((listener, https), log))| WorkerSpec {
            id,
            core: cores[id],
            listener,
            https: https.map(|l| (l, tls_setup.clone())),
            certs: tables.certs.clone(),
            acme: tables.acme.clone(),
            policies: tables.policies.clone(),
            limiter: tables.limiter.clone(),
            registry: tables.registry.clone(),
            route_stats: tables.route_stats.clone(),
            settings: settings.clone(),
            routes: routes.clone(),
            stats: worker_stats[id].clone(),
            log,
            shutdown: shutdown.clone(),
            shutdown_grace: Duration::from_millis(config.timeouts.shutdown_grace_ms),
            driver: config.workers.driver,
            uring_entries: config.workers.uring_entries,
            uring_coop_taskrun: config.workers.uring_coop_taskrun,
            uring_defer_taskrun: config.workers.uring_defer_taskrun,
            allocator_trim: opts.allocator_trim,
        })
        .collect();
    let workers = match ringway_worker::start(specs) {
        Ok(w) => w,
        Err(e) => {
            shutdown.request();
            control.stop();
            return Err(e.into());
        }
    };
    let drivers = workers.drivers.clone();
    let uring = drivers.iter().filter(|d| **d == Driver::IoUring).count();
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    let (http_s, https_s) = (show(http_addr), show(https_addr));
    if uring == n {
        tracing::info!(http_addr = %http_s, https_addr = %https_s, workers = n, driver = "io_uring", "ringway listening");
    } else {
        tracing::warn!(http_addr = %http_s, https_addr = %https_s, workers = n, io_uring = uring, legacy = n - uring, "ringway listening; some workers run on the epoll driver");
    }
    if let Some(a) = admin_addr {
        tracing::info!(admin = %a, "admin listener: /metrics /healthz /readyz");
    }
    Ok(Running {
        http_addr,
        https_addr,
        certs: tables.certs.clone(),
        admin_addr,
        routes,
        worker_stats,
        drivers,
        shutdown,
        workers: Some(workers),
        control: Some(control),
    })
}
