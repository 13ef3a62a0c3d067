//! The proxy configuration. Every key is documented in `docs/configuration.md`; defaults here
//! are what an edge node should run with when a key is left out.
//!
//! Sizes end in `_bytes_max`/`_bytes`, durations in `_ms`, counts in `_max`: the unit is always
//! the last word of the name.

use crate::cidr::Cidr;
use ringway_proto::{HEADER_SLOTS, HeadLimits};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// An optional listen address: `"off"` (or `""`) turns the listener off, since TOML has no null.
mod opt_addr {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::SocketAddr;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim() {
            "" | "off" => Ok(None),
            a => a.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }
}

/// Whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub workers: WorkersConfig,
    pub listen: ListenConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub upstream: UpstreamConfig,
    pub headers: HeadersConfig,
    pub routes: RoutesConfig,
    pub access_log: AccessLogConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
    pub postgres: PostgresConfig,
    pub policy: PolicyConfig,
    pub balancer: BalancerConfig,
    pub dns: DnsConfig,
}

/// Sizes of the load balancer's shared tables (per-route settings are in the route store).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerConfig {
    /// Distinct upstream endpoints (addresses) tracked for health and load; past it new
    /// endpoints are served untracked (no ejection, no health checks) and counted.
    pub endpoints_max: usize,
    /// Routes with their own series in /metrics; the rest count as route="_other".
    pub route_series_max: usize,
    /// Upstream names are resolved again this often.
    pub dns_refresh_ms: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            endpoints_max: crate::balance::registry::ENDPOINTS_DEFAULT,
            route_series_max: crate::balance::stats::ROUTE_SERIES_DEFAULT,
            dns_refresh_ms: 30_000,
        }
    }
}

/// How upstream names are resolved.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// DNS servers asked directly (UDP, A and AAAA) in order; empty: the system resolver.
    pub servers: Vec<SocketAddr>,
    pub timeout_ms: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout_ms: 2_000,
        }
    }
}

/// Which monoio driver the workers run on.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring, falling back to epoll (with a warning) where the kernel refuses io_uring.
    #[default]
    Auto,
    /// io_uring or fail at start.
    IoUring,
    /// epoll (monoio's legacy driver), for comparison and old kernels.
    Legacy,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Worker threads; 0 means one per core the process may run on.
    pub count: usize,
    /// Pin each worker to one core.
    pub pin: bool,
    /// Cores to pin workers to, in order (worker i gets `cores[i % len]`). Empty: all cores.
    pub cores: Vec<usize>,
    pub driver: DriverChoice,
    /// io_uring submission queue entries per worker.
    pub uring_entries: u32,
    /// IORING_SETUP_COOP_TASKRUN: no interrupt to run completion work; much cheaper per op.
    pub uring_coop_taskrun: bool,
    /// IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN: completion work runs only when
    /// the worker waits, batched.
    pub uring_defer_taskrun: bool,
    /// Idle keep-alive connections give up their task and wait in a per-worker epoll set
    /// (about 100 bytes each instead of about 1 KiB). Off: each waits in its own task.
    pub park_idle: bool,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            count: 0,
            pin: true,
            cores: Vec::new(),
            driver: DriverChoice::Auto,
            uring_entries: 4096,
            uring_coop_taskrun: true,
            uring_defer_taskrun: true,
            park_idle: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Plain HTTP listener (each worker binds its own with SO_REUSEPORT); `"off"`: none (one of
    /// `http` and `https` must be on).
    #[serde(with = "opt_addr")]
    pub http: Option<SocketAddr>,
    /// HTTPS listener (SO_REUSEPORT per worker, like `http`); `"off"`: none. Certificates come
    /// from the route store.
    #[serde(with = "opt_addr")]
    pub https: Option<SocketAddr>,
    /// listen(2) backlog of each worker's socket (capped by net.core.somaxconn).
    pub backlog: u32,
    /// Read a PROXY protocol header (v1 or v2) on connections, on both listeners, from the
    /// peers in `proxy_protocol_from` (a load balancer in front); the client address it names
    /// replaces the peer's. Other peers are served without one.
    pub proxy_protocol: bool,
    pub proxy_protocol_from: Vec<Cidr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            http: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            https: None,
            backlog: 4096,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest request line; over it the answer is 414.
    pub request_line_bytes_max: usize,
    /// Largest request head (and upstream response head); over it 431 (502 for a response).
    pub header_bytes_max: usize,
    /// Most header fields in a head; over it 431.
    pub headers_count_max: usize,
    /// Largest request body unless the route sets its own; over it 413.
    pub body_bytes_max: u64,
    /// Open client connections per worker; at the limit the worker stops accepting until one
    /// closes (the kernel backlog holds the rest).
    pub connections_per_worker_max: usize,
    /// Requests served on one client connection before it is closed (0: no limit).
    pub requests_per_connection_max: u64,
    /// Size of each I/O buffer taken from a worker's buffer pool (heads, small bodies).
    pub buffer_bytes: usize,
    /// Size of the buffers large bodies are streamed through (fewer, larger reads and writes).
    pub body_buffer_bytes: usize,
    /// Buffers a worker keeps for reuse; more are freed when returned.
    pub buffer_pool_max: usize,
    /// A request body up to this size is read completely before an upstream connection is
    /// taken (a slow client then holds only its own connection); a larger one is streamed once
    /// this much has arrived. 0: stream from the first byte.
    pub request_buffer_bytes: usize,
    /// Slowest average rate a client may send a request body at, counted over the time the
    /// proxy waits for it (after `timeouts.min_rate_grace_ms`); slower: 408 and close.
    /// 0: no floor.
    pub request_body_rate_min_bytes_per_s: u64,
    /// Slowest average rate a client may take a response at, counted over the time the proxy
    /// waits for it to take bytes (after `timeouts.min_rate_grace_ms`); slower: the connection
    /// closes and the upstream connection is let go. 0: no floor.
    pub response_rate_min_bytes_per_s: u64,
    /// Open connections from one client address per worker; past it new ones are closed at
    /// once (counted). Peers in `headers.trusted_proxies` are not limited. 0: no limit.
    pub connections_per_client_max: usize,
    /// Interim (1xx) responses relayed for one request; one more from the upstream: 502 and
    /// the upstream connection is discarded.
    pub interim_responses_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            request_line_bytes_max: 8 * 1024,
            header_bytes_max: 32 * 1024,
            headers_count_max: 100,
            body_bytes_max: 100 * 1024 * 1024,
            connections_per_worker_max: 65_536,
            requests_per_connection_max: 0,
            buffer_bytes: 16 * 1024,
            body_buffer_bytes: 64 * 1024,
            buffer_pool_max: 1024,
            request_buffer_bytes: 64 * 1024,
            request_body_rate_min_bytes_per_s: 1024,
            response_rate_min_bytes_per_s: 1024,
            connections_per_client_max: 0,
            interim_responses_max: 8,
        }
    }
}

impl LimitsConfig {
    pub fn head_limits(&self) -> HeadLimits {
        HeadLimits {
            request_line_bytes_max: self.request_line_bytes_max,
            header_bytes_max: self.header_bytes_max,
            headers_count_max: self.headers_count_max,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Time to receive a whole request head: counted from accept for the first request; for
    /// later ones from the end of the previous response (if the request comes during the hot
    /// read or was pipelined) or from when bytes arrive after an idle wait. Over it: 408 and
    /// close if part of a head arrived; a new connection that sent nothing is closed silently.
    pub header_read_ms: u64,
    /// How long a keep-alive client connection may wait for its next request (hot read
    /// included) before it is closed.
    pub keepalive_idle_ms: u64,
    /// After a response (or accept), wait this long for the next request with a read buffer
    /// already posted (one operation per request on busy connections); after that the
    /// connection gives its buffer back and waits for readability with no memory held.
    /// 0: always wait without a buffer.
    pub hot_read_ms: u64,
    /// Longest wait for the next piece of a request body; over it the client gets 408 (when
    /// nothing of the response was sent yet) and the connection is closed.
    pub body_read_ms: u64,
    /// Longest wait for the client to take more response bytes; over it the connection closes.
    pub client_write_ms: u64,
    /// Upstream TCP connect; over it 504 (refused or unreachable: 502).
    pub upstream_connect_ms: u64,
    /// Longest wait for the next bytes from the upstream (head or body); over it 504 or abort.
    pub upstream_read_ms: u64,
    /// Longest wait for the upstream to take more request bytes; over it 504.
    pub upstream_write_ms: u64,
    /// An upgraded (WebSocket) tunnel with no traffic either way for this long is closed.
    pub tunnel_idle_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the process exits.
    pub shutdown_grace_ms: u64,
    /// Longest time to receive a whole request body (from the end of its head); over it 408
    /// and close. Bounds a client that keeps just above the rate floor.
    pub body_total_ms: u64,
    /// The rate floors (`limits.request_body_rate_min_bytes_per_s`,
    /// `limits.response_rate_min_bytes_per_s`) apply once a client has made the proxy wait
    /// this long: short stalls of a real client never trip them.
    pub min_rate_grace_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            header_read_ms: 10_000,
            keepalive_idle_ms: 60_000,
            hot_read_ms: 50,
            body_read_ms: 30_000,
            client_write_ms: 30_000,
            upstream_connect_ms: 3_000,
            upstream_read_ms: 60_000,
            upstream_write_ms: 30_000,
            tunnel_idle_ms: 300_000,
            shutdown_grace_ms: 10_000,
            body_total_ms: 600_000,
            min_rate_grace_ms: 10_000,
        }
    }
}

impl TimeoutsConfig {
    pub fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Idle keep-alive connections kept per upstream address, per worker.
    pub idle_per_upstream_max: usize,
    /// An idle upstream connection older than this is closed instead of reused. Keep it below
    /// the apps' own keep-alive timeout (Node.js: 5 s) so the proxy, not the app, closes first.
    /// (Every reuse is preceded by a non-blocking peek: a connection the upstream closed or
    /// sent unrequested bytes on while idle is discarded.)
    pub idle_timeout_ms: u64,
    /// Retry an idempotent request without a body once, on a new connection, when a reused
    /// connection fails before any response byte.
    pub retry_idempotent: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            idle_per_upstream_max: 128,
            idle_timeout_ms: 4_000,
            retry_idempotent: true,
        }
    }
}

/// A response header the proxy adds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecurityHeader {
    pub name: String,
    pub value: String,
    /// Replace the header if the upstream set it (default: keep the app's value).
    #[serde(default, rename = "override")]
    pub override_app: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// Peers whose X-Forwarded-* and X-Request-ID headers are believed. Everyone else's are
    /// replaced.
    pub trusted_proxies: Vec<Cidr>,
    /// Add the request id to responses too (same header name).
    pub request_id_in_response: bool,
    /// Response headers added when the app did not set them (or always, with `override`).
    pub security: Vec<SecurityHeader>,
    /// Request headers removed when the peer is not a trusted proxy: forwarding-style headers
    /// an app may believe (client address, scheme, port, prefix, rewritten URL). Matched
    /// ignoring case, `_` taken for `-`. X-Forwarded-For, -Proto, -Host and X-Request-ID are
    /// always replaced by the proxy's own.
    pub untrusted_strip: Vec<String>,
    /// Protocols a request may upgrade to (`Upgrade` tokens, version ignored). Any other token
    /// (h2c above all) is removed, so no tunnel opens that skips per-request routing and
    /// policy.
    pub upgrade_protocols: Vec<String>,
}

/// The default `headers.untrusted_strip`.
pub const UNTRUSTED_STRIP_DEFAULT: &[&str] = &[
    "Forwarded",
    "X-Real-IP",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Ssl",
    "X-Forwarded-Scheme",
    "X-Forwarded-Server",
    "X-Host",
    "True-Client-IP",
    "X-Client-IP",
    "Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "X-Original-URL",
    "X-Rewrite-URL",
];

impl Default for HeadersConfig {
    fn default() -> Self {
        let h = |n: &str, v: &str| SecurityHeader {
            name: n.to_string(),
            value: v.to_string(),
            override_app: false,
        };
        Self {
            trusted_proxies: Vec::new(),
            request_id_in_response: true,
            security: vec![
                h("X-Content-Type-Options", "nosniff"),
                h("X-Frame-Options", "SAMEORIGIN"),
                h("Referrer-Policy", "strict-origin-when-cross-origin"),
            ],
            untrusted_strip: UNTRUSTED_STRIP_DEFAULT
                .iter()
                .map(|s| s.to_string())
                .collect(),
            upgrade_protocols: vec!["websocket".into()],
        }
    }
}

/// Where routes come from.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A TOML file, watched for changes (the embedded default).
    #[default]
    File,
    /// PostgreSQL (`[postgres]`): a full load, then changes through LISTEN/NOTIFY, a periodic
    /// resync, and a last-known-good snapshot on local disk.
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    pub store: StoreKind,
    /// Route file for the file store; relative paths are relative to the config file.
    pub file: PathBuf,
    /// How often the file store checks the file for changes.
    pub poll_interval_ms: u64,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::File,
            file: PathBuf::from("routes.toml"),
            poll_interval_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Write every request as a JSON line to `path`.
    pub enabled: bool,
    /// Relative paths are relative to the config file.
    pub path: PathBuf,
    /// Size of each worker's log ring. When a ring is full, records are dropped and counted.
    pub ring_bytes: usize,
    /// How often the control plane drains the rings.
    pub drain_interval_ms: u64,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: PathBuf::from("access.log"),
            ring_bytes: 4 * 1024 * 1024,
            drain_interval_ms: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listener for /metrics, /healthz and /readyz; `"off"`: none.
    #[serde(with = "opt_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
        }
    }
}

/// TLS termination settings (the certificates themselves come from the route store).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A client that has not finished its handshake within this time is disconnected.
    pub handshake_timeout_ms: u64,
    /// Sessions each worker remembers for resumption by session id (TLS 1.2) or stateful
    /// ticket; bounded, least recently used out.
    pub session_cache_entries: usize,
    /// Stateless session tickets (keys generated at start, rotated every 6 hours, shared by
    /// all workers so a ticket from one worker resumes on any other).
    pub tickets: bool,
    /// Port put in `Location` when redirecting plain HTTP to HTTPS; default: the port of
    /// `listen.https` (omitted when it is 443).
    pub redirect_port: Option<u16>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            session_cache_entries: 4096,
            tickets: true,
            redirect_port: None,
        }
    }
}

/// PostgreSQL as route store (`routes.store = "postgres"`) and/or request log sink
/// (`postgres.logs.enabled`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection string: `postgres://user@host:port/db` or libpq `key=value` pairs.
    pub url: String,
    /// Longest wait for a connection (and for its first query) before counting a failure.
    pub connect_timeout_ms: u64,
    /// Apply pending schema migrations at start (else `ringway migrate` does it).
    pub migrate_on_start: bool,
    /// A full reload this often repairs anything a missed notification left behind.
    pub resync_interval_ms: u64,
    /// Reconnect delays double from 100 ms up to this.
    pub reconnect_backoff_max_ms: u64,
    /// At start, how long to wait for the first load from the database before serving from
    /// the snapshot file (or not at all, when there is none: `/readyz` says so).
    pub startup_wait_ms: u64,
    /// Last-known-good snapshot (routes, certificates, ACME tokens), rewritten after every
    /// successful load; read at start. Holds private keys: written with mode 0600.
    pub snapshot_path: PathBuf,
    /// This node's name in `proxy_logs.node`; empty: the host name.
    pub node_name: String,
    pub logs: PostgresLogsConfig,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "host=127.0.0.1 port=5432 user=postgres dbname=ringway".into(),
            connect_timeout_ms: 3000,
            migrate_on_start: false,
            resync_interval_ms: 60_000,
            reconnect_backoff_max_ms: 5000,
            startup_wait_ms: 5000,
            snapshot_path: PathBuf::from("ringway-data/snapshot.json"),
            node_name: String::new(),
            logs: PostgresLogsConfig::default(),
        }
    }
}

/// Request log rows into `proxy_logs` with binary COPY.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresLogsConfig {
    pub enabled: bool,
    /// A batch is written when it holds this many rows ...
    pub batch_rows_max: usize,
    /// ... or when its first row is this old.
    pub flush_interval_ms: u64,
    /// A batch write (one transaction) that takes longer counts as failed: the batch is
    /// spooled and the connection replaced.
    pub write_timeout_ms: u64,
    /// Batches that cannot be written go to append-only segment files here, replayed in order
    /// when the database is back.
    pub spool_dir: PathBuf,
    /// Disk quota of the spool; past it, batches are dropped (and counted).
    pub spool_bytes_max: u64,
    /// At shutdown, how long to keep trying to write what is buffered before leaving it in
    /// the spool for the next start.
    pub shutdown_flush_ms: u64,
}

impl Default for PostgresLogsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            batch_rows_max: 5000,
            flush_interval_ms: 200,
            write_timeout_ms: 10_000,
            spool_dir: PathBuf::from("ringway-data/spool"),
            spool_bytes_max: 1 << 30,
            shutdown_flush_ms: 5000,
        }
    }
}

/// Settings of the edge policies (the policies themselves come from the route store).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Secrets (at least 32 characters each) for challenge pass cookies, HMAC-SHA256: the
    /// first signs, every one verifies (rotation: put the new key first, drop the old one a
    /// pass lifetime later). Empty: a random key per process (passes do not survive a restart
    /// and are not shared between nodes).
    pub challenge_keys: Vec<String>,
    /// Rate-limit keys (client, rule) remembered at most; past it new keys are not limited
    /// (counted).
    pub rate_limit_keys_max: usize,
    /// A session cookie expires after this long without a request.
    pub session_idle_s: u64,
    /// Lifetime of the visitor cookie.
    pub visitor_ttl_s: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            challenge_keys: Vec::new(),
            rate_limit_keys_max: crate::policy::RATE_KEYS_MAX,
            session_idle_s: 1800,
            visitor_ttl_s: 365 * 86_400,
        }
    }
}

/// A configuration that parses but cannot be run.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{key} = {value} is out of range: {why}")]
    OutOfRange {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("no listener configured: set listen.http or listen.https")]
    NoListener,
    #[error("security header {0:?} is not a valid header")]
    BadHeader(String),
    #[error("{key}: {name:?} is not a header name or token of at most 63 bytes")]
    BadName { key: &'static str, name: String },
    #[error(
        "postgres.url is empty but routes.store = \"postgres\" or postgres.logs.enabled needs it"
    )]
    NoDatabaseUrl,
    #[error(
        "listen.proxy_protocol needs listen.proxy_protocol_from (the balancers allowed to send it)"
    )]
    ProxyProtocolSources,
    #[error("policy.challenge_keys: every key needs at least 32 characters")]
    ShortChallengeKey,
}

fn range<T: PartialOrd + ToString>(
    key: &'static str,
    v: T,
    lo: T,
    hi: T,
    why: &'static str,
) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::OutOfRange {
            key,
            value: v.to_string(),
            why,
        });
    }
    Ok(())
}

impl Config {
    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.balancer;
        range(
            "balancer.endpoints_max",
            b.endpoints_max,
            16,
            1 << 20,
            "16 to 1048576",
        )?;
        range(
            "balancer.route_series_max",
            b.route_series_max,
            0,
            100_000,
            "0 to 100000",
        )?;
        range(
            "balancer.dns_refresh_ms",
            b.dns_refresh_ms,
            1_000,
            86_400_000,
            "1 s to 1 day",
        )?;
        range(
            "dns.timeout_ms",
            self.dns.timeout_ms,
            10,
            60_000,
            "10 ms to 60 s",
        )?;
        let l = &self.limits;
        range(
            "limits.request_line_bytes_max",
            l.request_line_bytes_max,
            64,
            1 << 20,
            "64 B to 1 MiB",
        )?;
        range(
            "limits.header_bytes_max",
            l.header_bytes_max,
            l.request_line_bytes_max,
            1 << 20,
            "at least the request line limit, at most 1 MiB",
        )?;
        range(
            "limits.headers_count_max",
            l.headers_count_max,
            1,
            HEADER_SLOTS,
            "1 to 128 (HEADER_SLOTS)",
        )?;
        range(
            "limits.body_buffer_bytes",
            l.body_buffer_bytes,
            l.buffer_bytes,
            16 << 20,
            "buffer_bytes to 16 MiB",
        )?;
        range(
            "limits.buffer_bytes",
            l.buffer_bytes,
            4096,
            4 << 20,
            "4 KiB to 4 MiB",
        )?;
        range(
            "limits.connections_per_worker_max",
            l.connections_per_worker_max,
            1,
            10_000_000,
            "1 to 10,000,000",
        )?;
        range(
            "limits.buffer_pool_max",
            l.buffer_pool_max,
            0,
            1_000_000,
            "0 to 1,000,000",
        )?;
        range(
            "listen.backlog",
            self.listen.backlog,
            1,
            1 << 20,
            "1 to 1,048,576",
        )?;
        let u = &self.upstream;
        range(
            "upstream.idle_per_upstream_max",
            u.idle_per_upstream_max,
            0,
            100_000,
            "0 to 100,000",
        )?;
        range(
            "upstream.idle_timeout_ms",
            u.idle_timeout_ms,
            1,
            86_400_000,
            "1 ms to 1 day",
        )?;
        range(
            "routes.poll_interval_ms",
            self.routes.poll_interval_ms,
            10,
            3_600_000,
            "10 ms to 1 hour",
        )?;
        range(
            "access_log.drain_interval_ms",
            self.access_log.drain_interval_ms,
            1,
            60_000,
            "1 ms to 1 minute",
        )?;
        range(
            "workers.uring_entries",
            self.workers.uring_entries,
            256,
            32_768,
            "256 to 32768",
        )?;
        range(
            "access_log.ring_bytes",
            self.access_log.ring_bytes,
            64 * 1024,
            1 << 30,
            "64 KiB to 1 GiB",
        )?;
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.header_read_ms", t.header_read_ms),
            ("timeouts.keepalive_idle_ms", t.keepalive_idle_ms),
            ("timeouts.body_read_ms", t.body_read_ms),
            ("timeouts.client_write_ms", t.client_write_ms),
            ("timeouts.upstream_connect_ms", t.upstream_connect_ms),
            ("timeouts.upstream_read_ms", t.upstream_read_ms),
            ("timeouts.upstream_write_ms", t.upstream_write_ms),
            ("timeouts.tunnel_idle_ms", t.tunnel_idle_ms),
        ] {
            range(key, v, 1, 86_400_000, "1 ms to 1 day")?;
        }
        range(
            "timeouts.hot_read_ms",
            t.hot_read_ms,
            0,
            60_000,
            "0 to 1 minute",
        )?;
        range(
            "timeouts.shutdown_grace_ms",
            t.shutdown_grace_ms,
            0,
            3_600_000,
            "0 to 1 hour",
        )?;
        if self.listen.http.is_none() && self.listen.https.is_none() {
            return Err(ConfigError::NoListener);
        }
        range(
            "tls.handshake_timeout_ms",
            self.tls.handshake_timeout_ms,
            1,
            600_000,
            "1 ms to 10 minutes",
        )?;
        range(
            "tls.session_cache_entries",
            self.tls.session_cache_entries,
            0,
            10_000_000,
            "0 to 10,000,000",
        )?;
        let pg = &self.postgres;
        if (self.routes.store == StoreKind::Postgres || pg.logs.enabled) && pg.url.trim().is_empty()
        {
            return Err(ConfigError::NoDatabaseUrl);
        }
        range(
            "postgres.connect_timeout_ms",
            pg.connect_timeout_ms,
            10,
            600_000,
            "10 ms to 10 minutes",
        )?;
        range(
            "postgres.resync_interval_ms",
            pg.resync_interval_ms,
            100,
            86_400_000,
            "100 ms to 1 day",
        )?;
        range(
            "postgres.reconnect_backoff_max_ms",
            pg.reconnect_backoff_max_ms,
            100,
            600_000,
            "100 ms to 10 minutes",
        )?;
        range(
            "postgres.startup_wait_ms",
            pg.startup_wait_ms,
            0,
            600_000,
            "0 to 10 minutes",
        )?;
        range(
            "postgres.logs.batch_rows_max",
            pg.logs.batch_rows_max,
            1,
            1_000_000,
            "1 to 1,000,000",
        )?;
        range(
            "postgres.logs.flush_interval_ms",
            pg.logs.flush_interval_ms,
            1,
            600_000,
            "1 ms to 10 minutes",
        )?;
        range(
            "postgres.logs.write_timeout_ms",
            pg.logs.write_timeout_ms,
            10,
            600_000,
            "10 ms to 10 minutes",
        )?;
        range(
            "postgres.logs.spool_bytes_max",
            pg.logs.spool_bytes_max,
            0,
            1 << 44,
            "0 to 16 TiB",
        )?;
        range(
            "postgres.logs.shutdown_flush_ms",
            pg.logs.shutdown_flush_ms,
            0,
            600_000,
            "0 to 10 minutes",
        )?;
        if self.listen.proxy_protocol && self.listen.proxy_protocol_from.is_empty() {
            return Err(ConfigError::ProxyProtocolSources);
        }
        if self.policy.challenge_keys.iter().any(|k| k.len() < 32) {
            return Err(ConfigError::ShortChallengeKey);
        }
        range(
            "policy.rate_limit_keys_max",
            self.policy.rate_limit_keys_max,
            1000,
            100_000_000,
            "1,000 to 100,000,000",
        )?;
        range(
            "policy.session_idle_s",
            self.policy.session_idle_s,
            60,
            30 * 86_400,
            "1 minute to 30 days",
        )?;
        range(
            "policy.visitor_ttl_s",
            self.policy.visitor_ttl_s,
            3600,
            2 * 365 * 86_400,
            "1 hour to 2 years",
        )?;
        for (key, names) in [
            ("headers.untrusted_strip", &self.headers.untrusted_strip),
            ("headers.upgrade_protocols", &self.headers.upgrade_protocols),
        ] {
            if let Some(bad) = names
                .iter()
                .find(|n| n.len() > 63 || !ringway_proto::token::is_token(n.as_bytes()))
            {
                return Err(ConfigError::BadName {
                    key,
                    name: bad.clone(),
                });
            }
        }
        range(
            "limits.interim_responses_max",
            l.interim_responses_max,
            0,
            1000,
            "0 to 1,000",
        )?;
        range(
            "limits.request_buffer_bytes",
            l.request_buffer_bytes,
            0,
            64 << 20,
            "0 to 64 MiB",
        )?;
        range(
            "timeouts.body_total_ms",
            t.body_total_ms,
            1,
            7 * 86_400_000,
            "1 ms to 7 days",
        )?;
        // No grace would make every wait of a floor end at the next tick: floors are turned
        // off by their rates (0), not by the grace.
        range(
            "timeouts.min_rate_grace_ms",
            t.min_rate_grace_ms,
            1000,
            3_600_000,
            "1 s to 1 hour",
        )?;
        for h in &self.headers.security {
            let name_ok = ringway_proto::token::is_token(h.name.as_bytes());
            let value_ok = h
                .value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
            if !name_ok || !value_ok || ringway_proto::token::is_hop_by_hop(h.name.as_bytes()) {
                return Err(ConfigError::BadHeader(h.name.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn parses_partial_file_with_defaults() {
        let c: Config = toml::from_str(
            r#"
            [workers]
            count = 2
            [limits]
            body_bytes_max = 1024
            [headers]
            trusted_proxies = ["10.0.0.0/8", "::1"]
            "#,
        )
        .unwrap();
        assert_eq!(c.workers.count, 2);
        assert_eq!(c.limits.body_bytes_max, 1024);
        assert_eq!(c.limits.header_bytes_max, 32 * 1024);
        assert_eq!(c.headers.trusted_proxies.len(), 2);
        c.validate().unwrap();
    }

    #[test]
    fn listeners_can_be_turned_off() {
        let c: Config = toml::from_str("[admin]\nlisten = \"off\"\n").unwrap();
        assert_eq!(c.admin.listen, None);
        let c: Config = toml::from_str("[listen]\nhttp = \"off\"\n").unwrap();
        assert_eq!(c.validate(), Err(ConfigError::NoListener));
        assert!(toml::from_str::<Config>("[listen]\nhttp = \"nonsense\"\n").is_err());
        let mut c = Config::default();
        c.access_log.drain_interval_ms = 0;
        assert!(
            c.validate().is_err(),
            "a zero interval would panic the timer"
        );
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<Config>("[limits]\nheader_bytes = 1\n").is_err());
        assert!(toml::from_str::<Config>("[headers]\ntrusted_proxies = [\"x\"]\n").is_err());
        let mut c = Config::default();
        c.limits.headers_count_max = 1000;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::OutOfRange {
                key: "limits.headers_count_max",
                ..
            })
        ));
        let mut c = Config::default();
        c.headers.security.push(SecurityHeader {
            name: "Bad Name".into(),
            value: "x".into(),
            override_app: false,
        });
        assert!(c.validate().is_err());
    }
}
