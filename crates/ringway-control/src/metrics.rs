//! `/metrics` in the Prometheus text format, assembled from every worker's counters and the
//! control plane's own.

use ringway_core::stats::LATENCY_BUCKETS_US;
use ringway_core::tls::CertTable;
use ringway_core::{RouteTable, StatsSnapshot, WorkerStats};
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the control plane itself.
#[derive(Debug, Default)]
pub struct ControlStats {
    pub route_loads_ok: AtomicU64,
    pub route_loads_failed: AtomicU64,
    pub route_last_load_unix: AtomicU64,
    pub access_log_lines: AtomicU64,
    pub access_log_errors: AtomicU64,
    /// Certificates refused by store loads (each load that refuses one counts it).
    pub cert_refusals: AtomicU64,
    /// Certificates the latest load refused: (store name, reason). Control plane only.
    pub certs_refused_now: std::sync::Mutex<Vec<(String, &'static str)>>,
    // The database route store.
    /// 1 while the route store holds a database connection.
    pub db_connected: AtomicU64,
    /// Connection failures, lost connections and failed queries (store and log sink).
    pub db_errors: AtomicU64,
    pub full_loads: AtomicU64,
    pub incremental_loads: AtomicU64,
    /// Full reloads beyond the first: periodic, after lost notifications or TRUNCATE.
    pub resyncs: AtomicU64,
    pub full_load_ms: AtomicU64,
    pub snapshot_writes: AtomicU64,
    pub snapshot_write_errors: AtomicU64,
    pub snapshot_written_unix: AtomicU64,
    /// 1 when the routes in service came from the snapshot file and the database has not
    /// been reached since start.
    pub serving_from_snapshot: AtomicU64,
    /// From a change in the database to the tables workers read.
    pub change_visible: Histogram,
    // The database log sink.
    pub log_rows_written: AtomicU64,
    pub log_rows_spooled: AtomicU64,
    pub log_rows_replayed: AtomicU64,
    /// Log rows dropped, by reason.
    pub log_rows_dropped: RowsDropped,
    pub log_batches_written: AtomicU64,
    pub log_batches_failed: AtomicU64,
    pub log_batches_duplicate: AtomicU64,
    pub log_spool_bytes: AtomicU64,
    /// Spool frames that could not be read back (torn by a crash, or corrupt).
    pub log_spool_corrupt_frames: AtomicU64,
    /// Batches the database refused (SQL error, not a connection failure) again and again,
    /// dropped so the spool behind them can move; their rows count as dropped.
    pub log_batches_refused: AtomicU64,
    pub log_batch_write: Histogram,
    // Edge policy.
    /// Policies in service (projects and hosts).
    pub policies: AtomicU64,
    /// Rate-limit keys remembered (after the last sweep).
    pub rate_limit_keys: AtomicU64,
    /// Requests not limited because the key table was full.
    pub rate_limit_overflows: AtomicU64,
    /// Policy rows the database store refused (each load that refuses one counts it).
    pub policy_refusals: AtomicU64,
}

/// Why log rows were dropped: the `reason` label of `ringway_log_rows_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The database could not take them and the spool quota was reached.
    SpoolFull,
    /// The database could not take them and the spool append failed (disk full, I/O error).
    SpoolWriteFailed,
    /// The database refused their batch `REFUSALS_MAX` times in a row.
    Refused,
    /// Spooled, then lost to damage on disk (torn or corrupt frames, cut segments).
    SpoolCorrupt,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::SpoolFull,
        DropReason::SpoolWriteFailed,
        DropReason::Refused,
        DropReason::SpoolCorrupt,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolWriteFailed => "spool_write_failed",
            DropReason::Refused => "refused",
            DropReason::SpoolCorrupt => "spool_corrupt",
        }
    }
}

/// Log rows dropped, one counter per `DropReason`.
#[derive(Debug, Default)]
pub struct RowsDropped([AtomicU64; DropReason::ALL.len()]);

impl RowsDropped {
    pub fn add(&self, reason: DropReason, rows: u64) {
        self.0[reason as usize].fetch_add(rows, Ordering::Relaxed);
    }

    /// Sets a counter kept elsewhere (the spool counts its own damage).
    pub fn store(&self, reason: DropReason, rows: u64) {
        self.0[reason as usize].store(rows, Ordering::Relaxed);
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Bucket upper bounds of the latency histograms, in microseconds.
pub const DB_LATENCY_BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 20_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
];

/// A fixed-bucket latency histogram (Prometheus style: cumulative when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; DB_LATENCY_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        if let Some(i) = DB_LATENCY_BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The smallest bucket bound that holds fraction `q` of the observations (an upper
    /// estimate of the quantile), in microseconds.
    pub fn quantile_upper_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return Some(DB_LATENCY_BUCKETS_US[i]);
            }
        }
        None
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cum = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            let le = DB_LATENCY_BUCKETS_US[i] as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

impl ControlStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Records what a store load refused.
    pub fn note_refusals(&self, refused: &[(String, &'static str)]) {
        self.cert_refusals
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        if let Ok(mut now) = self.certs_refused_now.lock() {
            now.clear();
            now.extend_from_slice(refused);
        }
    }
}

/// A metric family's HELP and TYPE lines.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn per_worker(
    out: &mut String,
    snaps: &[StatsSnapshot],
    name: &str,
    kind: &str,
    help: &str,
    f: impl Fn(&StatsSnapshot) -> u64,
) {
    family(out, name, kind, help);
    for (i, s) in snaps.iter().enumerate() {
        let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", f(s));
    }
}

/// A per-worker counter split by one label: `f` gives (label value, count) pairs.
fn per_worker_by<const N: usize>(
    out: &mut String,
    snaps: &[StatsSnapshot],
    name: &str,
    help: &str,
    label: &str,
    f: impl Fn(&StatsSnapshot) -> [(&'static str, u64); N],
) {
    family(out, name, "counter", help);
    for (i, s) in snaps.iter().enumerate() {
        for (value, n) in f(s) {
            let _ = writeln!(out, "{name}{{worker=\"{i}\",{label}=\"{value}\"}} {n}");
        }
    }
}

/// Renders all metrics.
/// Certificates expiring within this many seconds are counted in
/// `ringway_tls_certificates_expiring`.
pub const CERT_EXPIRY_WARNING_S: i64 = 14 * 86_400;

pub fn render(
    workers: &[Arc<WorkerStats>],
    routes: &RouteTable,
    certs: &CertTable,
    control: &ControlStats,
) -> String {
    let snaps: Vec<StatsSnapshot> = workers.iter().map(|w| w.snapshot()).collect();
    let mut out = String::with_capacity(8192);

    family(
        &mut out,
        "ringway_worker_driver",
        "gauge",
        "I/O driver each worker runs on (1 for the driver in use).",
    );
    for (i, s) in snaps.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringway_worker_driver{{worker=\"{i}\",driver=\"{}\"}} 1",
            s.driver.name()
        );
    }

    family(
        &mut out,
        "ringway_requests_total",
        "counter",
        "Requests answered, by status code.",
    );
    for (i, s) in snaps.iter().enumerate() {
        for (code, n) in &s.status {
            let _ = writeln!(
                out,
                "ringway_requests_total{{worker=\"{i}\",status=\"{code}\"}} {n}"
            );
        }
        if s.status_other > 0 {
            let _ = writeln!(
                out,
                "ringway_requests_total{{worker=\"{i}\",status=\"other\"}} {}",
                s.status_other
            );
        }
    }

    let name = "ringway_request_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Time from the first byte of a request to the end of its response.",
    );
    for (i, s) in snaps.iter().enumerate() {
        let mut cum = 0u64;
        for (b, le) in LATENCY_BUCKETS_US.iter().enumerate() {
            cum += s.latency_buckets.get(b).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}_bucket{{worker=\"{i}\",le=\"{}\"}} {cum}",
                *le as f64 / 1e6
            );
        }
        cum += s.latency_buckets.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{worker=\"{i}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum{{worker=\"{i}\"}} {}",
            s.latency_sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{worker=\"{i}\"}} {}", s.requests);
    }

    per_worker(
        &mut out,
        &snaps,
        "ringway_connections_active",
        "gauge",
        "Open client connections.",
        |s| s.connections_active,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_connections_parked",
        "gauge",
        "Idle keep-alive connections parked without a task (included in ringway_connections_active).",
        |s| s.connections_parked,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        |s| s.connections_accepted,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_accept_paused_total",
        "counter",
        "Times a worker stopped accepting at its connection limit.",
        |s| s.accept_paused,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_client_errors_total",
        "counter",
        "Requests refused before reaching an upstream (malformed, too large, timed out, no route).",
        |s| s.client_errors,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_received_bytes_total",
        "counter",
        "Bytes received from clients.",
        |s| s.bytes_in,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_sent_bytes_total",
        "counter",
        "Bytes sent to clients.",
        |s| s.bytes_out,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_connects_total",
        "counter",
        "New upstream connections opened.",
        |s| s.upstream_connects,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_reuses_total",
        "counter",
        "Requests sent on a pooled upstream connection.",
        |s| s.upstream_reuses,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_connect_errors_total",
        "counter",
        "Upstream connects refused or timed out.",
        |s| s.upstream_connect_errors,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_retries_total",
        "counter",
        "Idempotent requests retried on a fresh connection.",
        |s| s.upstream_retries,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_stale_total",
        "counter",
        "Pooled connections found closed by the upstream before reuse.",
        |s| s.upstream_stale,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_stray_bytes_total",
        "counter",
        "Pooled connections discarded because the upstream sent bytes on them while idle.",
        |s| s.upstream_stray_bytes,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_interim_exceeded_total",
        "counter",
        "Responses refused with 502 for too many or too long interim (1xx) responses.",
        |s| s.upstream_interim_exceeded,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_connections_refused_per_client_total",
        "counter",
        "Connections closed at accept because their client address had limits.connections_per_client_max open.",
        |s| s.connections_refused_per_client,
    );
    per_worker_by(
        &mut out,
        &snaps,
        "ringway_slow_clients_total",
        "Exchanges cut off because the client moved bytes below its rate floor or past its deadline.",
        "direction",
        |s| {
            [
                ("request_body", s.slow_request_bodies),
                ("response", s.slow_responses),
            ]
        },
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_ambiguous_paths_total",
        "counter",
        "Requests refused with 400 under a path policy because servers disagree on what their path is.",
        |s| s.ambiguous_paths,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upgrades_refused_total",
        "counter",
        "Requests whose Upgrade named no protocol in headers.upgrade_protocols (the Upgrade was removed).",
        |s| s.upgrades_refused,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_upstream_idle_connections",
        "gauge",
        "Idle pooled upstream connections.",
        |s| s.upstream_idle,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_tunnels_total",
        "counter",
        "Upgraded (WebSocket) tunnels opened.",
        |s| s.tunnels,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_log_records_total",
        "counter",
        "Request log records pushed into the log ring.",
        |s| s.log_records,
    );
    per_worker(
        &mut out,
        &snaps,
        "ringway_log_dropped_total",
        "counter",
        "Request log records dropped because the ring was full.",
        |s| s.log_drops,
    );

    render_tls(&mut out, &snaps, certs, control);
    render_db(&mut out, control);
    family(
        &mut out,
        "ringway_routes",
        "gauge",
        "Host patterns in the route table.",
    );
    let _ = writeln!(out, "ringway_routes {}", routes.len());
    family(
        &mut out,
        "ringway_routes_version",
        "counter",
        "Changes applied to the route table.",
    );
    let _ = writeln!(out, "ringway_routes_version {}", routes.version());
    family(
        &mut out,
        "ringway_route_loads_total",
        "counter",
        "Route store loads, by result.",
    );
    let _ = writeln!(
        out,
        "ringway_route_loads_total{{result=\"ok\"}} {}",
        control.route_loads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "ringway_route_loads_total{{result=\"error\"}} {}",
        control.route_loads_failed.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "ringway_route_last_load_timestamp_seconds",
        "gauge",
        "When routes were last loaded successfully.",
    );
    let _ = writeln!(
        out,
        "ringway_route_last_load_timestamp_seconds {}",
        control.route_last_load_unix.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "ringway_access_log_lines_total",
        "counter",
        "Lines written to the access log.",
    );
    let _ = writeln!(
        out,
        "ringway_access_log_lines_total {}",
        control.access_log_lines.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "ringway_access_log_errors_total",
        "counter",
        "Access log write errors.",
    );
    let _ = writeln!(
        out,
        "ringway_access_log_errors_total {}",
        control.access_log_errors.load(Ordering::Relaxed)
    );
    out
}

fn render_db(out: &mut String, c: &ControlStats) {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "ringway_policies",
            "gauge",
            "Edge policies in service (projects and hosts).",
            g(&c.policies),
        ),
        (
            "ringway_rate_limit_keys",
            "gauge",
            "Rate-limit keys (client, rule) remembered after the last sweep.",
            g(&c.rate_limit_keys),
        ),
        (
            "ringway_rate_limit_overflows_total",
            "counter",
            "Requests not rate limited because the key table was full (policy.rate_limit_keys_max).",
            g(&c.rate_limit_overflows),
        ),
        (
            "ringway_policy_refusals_total",
            "counter",
            "Policy rows refused by database loads (bad JSON, bad rule, bad hostname); the version in force, if any, stays.",
            g(&c.policy_refusals),
        ),
    ] {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    family(
        out,
        "ringway_snapshot_age_seconds",
        "gauge",
        "Seconds since the routes in service were last loaded or changed.",
    );
    let last = g(&c.route_last_load_unix);
    let _ = writeln!(
        out,
        "ringway_snapshot_age_seconds {}",
        if last == 0 {
            0
        } else {
            now.saturating_sub(last)
        }
    );
    for (name, kind, help, v) in [
        (
            "ringway_db_connected",
            "gauge",
            "1 while the route store holds a database connection.",
            g(&c.db_connected),
        ),
        (
            "ringway_db_errors_total",
            "counter",
            "Database connection failures, lost connections and failed queries.",
            g(&c.db_errors),
        ),
        (
            "ringway_db_full_loads_total",
            "counter",
            "Full loads from the database.",
            g(&c.full_loads),
        ),
        (
            "ringway_db_incremental_loads_total",
            "counter",
            "Change sets read after notifications.",
            g(&c.incremental_loads),
        ),
        (
            "ringway_db_resyncs_total",
            "counter",
            "Full reloads beyond the first (periodic, lost notifications, TRUNCATE).",
            g(&c.resyncs),
        ),
        (
            "ringway_db_full_load_milliseconds",
            "gauge",
            "Duration of the last full load.",
            g(&c.full_load_ms),
        ),
        (
            "ringway_snapshot_file_writes_total",
            "counter",
            "Last-known-good snapshot files written.",
            g(&c.snapshot_writes),
        ),
        (
            "ringway_snapshot_file_write_errors_total",
            "counter",
            "Snapshot file writes that failed.",
            g(&c.snapshot_write_errors),
        ),
        (
            "ringway_snapshot_file_written_timestamp_seconds",
            "gauge",
            "When the snapshot file was last written.",
            g(&c.snapshot_written_unix),
        ),
        (
            "ringway_serving_from_snapshot_file",
            "gauge",
            "1 while the routes in service came from the snapshot file (database not reached since start).",
            g(&c.serving_from_snapshot),
        ),
        (
            "ringway_log_rows_written_total",
            "counter",
            "Log rows written to proxy_logs (replayed ones included).",
            g(&c.log_rows_written),
        ),
        (
            "ringway_log_rows_spooled_total",
            "counter",
            "Log rows written to the disk spool because the database could not take them.",
            g(&c.log_rows_spooled),
        ),
        (
            "ringway_log_rows_replayed_total",
            "counter",
            "Log rows written to proxy_logs from the spool.",
            g(&c.log_rows_replayed),
        ),
        (
            "ringway_log_batches_written_total",
            "counter",
            "Log batches written to proxy_logs.",
            g(&c.log_batches_written),
        ),
        (
            "ringway_log_batches_failed_total",
            "counter",
            "Log batch writes that failed (then spooled).",
            g(&c.log_batches_failed),
        ),
        (
            "ringway_log_batches_duplicate_total",
            "counter",
            "Replayed log batches the database already had (skipped).",
            g(&c.log_batches_duplicate),
        ),
        (
            "ringway_log_spool_bytes",
            "gauge",
            "Bytes in the log spool waiting for the database.",
            g(&c.log_spool_bytes),
        ),
        (
            "ringway_log_spool_corrupt_frames_total",
            "counter",
            "Damaged stretches found in the log spool (torn or corrupt frames, bytes it did not write), skipped up to the next whole frame; the rows lost count in ringway_log_rows_dropped_total{reason=\"spool_corrupt\"}.",
            g(&c.log_spool_corrupt_frames),
        ),
        (
            "ringway_log_batches_refused_total",
            "counter",
            "Log batches the database refused repeatedly (SQL errors), dropped so the spool can move on; their rows count in ringway_log_rows_dropped_total.",
            g(&c.log_batches_refused),
        ),
    ] {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        out,
        "ringway_log_rows_dropped_total",
        "counter",
        "Log rows dropped, by reason: spool_full (quota), spool_write_failed, refused (by the database, 3 times), spool_corrupt (lost to damage in the spool). Rows dropped by full rings: ringway_log_dropped_total.",
    );
    for r in DropReason::ALL {
        let _ = writeln!(
            out,
            "ringway_log_rows_dropped_total{{reason=\"{}\"}} {}",
            r.label(),
            c.log_rows_dropped.get(r)
        );
    }
    family(
        out,
        "ringway_db_change_visible_seconds",
        "histogram",
        "From a change committed in the database (trigger time) to the tables workers read.",
    );
    c.change_visible
        .render(out, "ringway_db_change_visible_seconds");
    family(
        out,
        "ringway_log_batch_write_seconds",
        "histogram",
        "Duration of one log batch write (transaction with COPY).",
    );
    c.log_batch_write
        .render(out, "ringway_log_batch_write_seconds");
}

fn render_tls(
    out: &mut String,
    snaps: &[StatsSnapshot],
    certs: &CertTable,
    control: &ControlStats,
) {
    per_worker_by(
        out,
        snaps,
        "ringway_tls_handshakes_total",
        "Completed TLS handshakes, by protocol version.",
        "version",
        |s| [("1.2", s.tls_handshakes_12), ("1.3", s.tls_handshakes_13)],
    );
    per_worker_by(
        out,
        snaps,
        "ringway_tls_handshake_failures_total",
        "TLS handshakes that did not complete, by reason.",
        "reason",
        |s| {
            [
                ("timeout", s.tls_handshake_timeouts),
                ("closed", s.tls_handshake_closed),
                ("error", s.tls_handshake_errors),
            ]
        },
    );
    per_worker(
        out,
        snaps,
        "ringway_tls_resumptions_total",
        "counter",
        "TLS handshakes that resumed a session (ticket or cache).",
        |s| s.tls_resumptions,
    );
    per_worker_by(
        out,
        snaps,
        "ringway_tls_certificate_lookups_total",
        "Certificate lookups during handshakes, by outcome (miss: handshake refused).",
        "outcome",
        |s| {
            [
                ("exact", s.tls_cert_exact),
                ("wildcard", s.tls_cert_wildcard),
                ("default", s.tls_cert_default),
                ("miss", s.tls_cert_miss),
            ]
        },
    );
    per_worker(
        out,
        snaps,
        "ringway_https_redirects_total",
        "counter",
        "Plain HTTP requests redirected to HTTPS.",
        |s| s.https_redirects,
    );
    per_worker(
        out,
        snaps,
        "ringway_acme_answers_total",
        "counter",
        "ACME HTTP-01 challenges answered.",
        |s| s.acme_answers,
    );
    per_worker(
        out,
        snaps,
        "ringway_proxy_protocol_errors_total",
        "counter",
        "Connections from PROXY protocol sources closed for a missing, malformed or late header.",
        |s| s.proxy_protocol_errors,
    );
    per_worker(
        out,
        snaps,
        "ringway_policy_ip_denied_total",
        "counter",
        "Requests refused by IP rules (403).",
        |s| s.ip_denied,
    );
    per_worker(
        out,
        snaps,
        "ringway_policy_blocked_total",
        "counter",
        "Requests refused by user-agent or path block rules (403).",
        |s| s.blocked,
    );
    per_worker(
        out,
        snaps,
        "ringway_policy_rate_limited_total",
        "counter",
        "Requests refused by a rate limit (429).",
        |s| s.rate_limited,
    );
    per_worker(
        out,
        snaps,
        "ringway_policy_challenges_issued_total",
        "counter",
        "Challenge pages served.",
        |s| s.challenges_issued,
    );
    per_worker(
        out,
        snaps,
        "ringway_policy_challenges_passed_total",
        "counter",
        "Challenge solutions accepted (pass cookie set).",
        |s| s.challenges_passed,
    );
    per_worker(
        out,
        snaps,
        "ringway_policy_challenges_failed_total",
        "counter",
        "Challenge solutions refused (forged, expired, unsolved).",
        |s| s.challenges_failed,
    );
    per_worker(
        out,
        snaps,
        "ringway_misdirected_requests_total",
        "counter",
        "Requests answered 421: the Host is not covered by the connection's certificate.",
        |s| s.misdirected,
    );
    let expiries = certs.expiries();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    family(
        out,
        "ringway_tls_certificates_expiring",
        "gauge",
        "Certificates in service that expire within 14 days.",
    );
    let _ = writeln!(
        out,
        "ringway_tls_certificates_expiring{{within=\"14d\"}} {}",
        expiries
            .iter()
            .filter(|(_, t)| *t - now < CERT_EXPIRY_WARNING_S)
            .count()
    );
    family(
        out,
        "ringway_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "Expiry of each certificate in service.",
    );
    for (name, t) in &expiries {
        let _ = writeln!(
            out,
            "ringway_tls_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}} {t}",
            name.replace(['"', '\\', '\n'], "_")
        );
    }
    family(
        out,
        "ringway_tls_certificate_refusals_total",
        "counter",
        "Certificates refused by store loads (key mismatch, expired, not covering its names...).",
    );
    let _ = writeln!(
        out,
        "ringway_tls_certificate_refusals_total {}",
        control.cert_refusals.load(Ordering::Relaxed)
    );
    family(
        out,
        "ringway_tls_certificate_refused",
        "gauge",
        "Certificates the latest store load refused, by reason (the previous version, if any, stays in service).",
    );
    if let Ok(refused) = control.certs_refused_now.lock() {
        for (name, reason) in refused.iter() {
            let _ = writeln!(
                out,
                "ringway_tls_certificate_refused{{certificate=\"{}\",reason=\"{reason}\"}} 1",
                name.replace(['"', '\\', '\n'], "_")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histogram_and_driver() {
        let w = Arc::new(WorkerStats::new());
        w.set_driver(ringway_core::Driver::IoUring);
        w.record_request(200, 100);
        w.record_request(200, 20_000_000);
        let text = render(
            &[w],
            &RouteTable::new(),
            &CertTable::new(),
            &ControlStats::default(),
        );
        assert!(text.contains("ringway_worker_driver{worker=\"0\",driver=\"io_uring\"} 1"));
        assert!(text.contains("ringway_requests_total{worker=\"0\",status=\"200\"} 2"));
        assert!(
            text.contains("ringway_request_duration_seconds_bucket{worker=\"0\",le=\"0.0005\"} 1")
        );
        assert!(
            text.contains("ringway_request_duration_seconds_bucket{worker=\"0\",le=\"+Inf\"} 2")
        );
        assert!(text.contains("ringway_request_duration_seconds_count{worker=\"0\"} 2"));
    }

    #[test]
    fn rows_dropped_render_by_reason() {
        let c = ControlStats::default();
        c.log_rows_dropped.add(DropReason::SpoolFull, 3);
        c.log_rows_dropped.store(DropReason::SpoolCorrupt, 7);
        assert_eq!(c.log_rows_dropped.total(), 10);
        let text = render(&[], &RouteTable::new(), &CertTable::new(), &c);
        for (reason, n) in [
            ("spool_full", 3),
            ("spool_write_failed", 0),
            ("refused", 0),
            ("spool_corrupt", 7),
        ] {
            let line = format!("ringway_log_rows_dropped_total{{reason=\"{reason}\"}} {n}\n");
            assert!(text.contains(&line), "{line}");
        }
        assert!(!text.contains("ringway_log_rows_dropped_total 0"));
    }
}
