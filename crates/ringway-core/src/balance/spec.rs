//! What a store says about a route's upstreams: the endpoints, how one is chosen, how their
//! health is judged, how failures are retried. Plain values with their defaults and limits;
//! [`ClusterSpec::validate`] is the one check both stores run, so a routes file and a database
//! row are refused for the same reasons with the same words.

use std::net::SocketAddr;

/// Most upstream entries one route may list (a name counts once, whatever it resolves to).
pub const UPSTREAMS_PER_ROUTE_MAX: usize = 256;
/// Most endpoints one route may have after names are resolved (indices fit in a `u8`).
pub const MEMBERS_MAX: usize = 256;
/// Largest weight of one upstream.
pub const WEIGHT_MAX: u32 = 1_000;
/// Most retries of one request.
pub const RETRIES_MAX: u8 = 5;
/// Longest cookie or header name a strategy may name.
pub const KEY_NAME_BYTES_MAX: usize = 64;
/// Longest health check path.
pub const CHECK_PATH_BYTES_MAX: usize = 1_024;
/// Shortest health check interval.
pub const CHECK_INTERVAL_MIN_MS: u32 = 100;
/// Longest ejection.
pub const EJECTION_MAX_MS: u32 = 3_600_000;

/// An upstream as configured: an address, or a DNS name with a port resolved on the control
/// thread (every address it resolves to becomes an endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpstreamAddr {
    Socket(SocketAddr),
    Name { host: Box<str>, port: u16 },
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Socket(a) => write!(f, "{a}"),
            UpstreamAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Whether an upstream takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdminState {
    /// Takes new requests.
    #[default]
    Active,
    /// Takes no new requests; requests in flight finish; pooled connections are closed.
    Draining,
    /// Out of the route, as if not listed (kept in the store for the operator).
    Disabled,
}

impl AdminState {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "draining" => Some(Self::Draining),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Disabled => "disabled",
        }
    }
}

/// One upstream entry of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamSpec {
    pub addr: UpstreamAddr,
    /// 1..=`WEIGHT_MAX`; a name's weight applies to each of its addresses.
    pub weight: u32,
    pub state: AdminState,
}

impl UpstreamSpec {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr: UpstreamAddr::Socket(addr),
            weight: 1,
            state: AdminState::Active,
        }
    }
}

/// What a consistent hash is computed over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// The client address as the access step decided it (trusted forwarding headers applied).
    ClientIp,
    /// A request header's value (first occurrence; absent: the client address).
    Header(Box<str>),
    /// A cookie's value (absent: the client address).
    Cookie(Box<str>),
    /// The request path, without the query.
    Path,
}

/// How an endpoint is chosen for a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Smooth weighted round robin (as nginx): weights honoured without bursts. The default,
    /// as in nginx, HAProxy and Envoy.
    #[default]
    RoundRobin,
    /// The fewest requests in flight (all workers), per unit of weight.
    LeastConnections,
    /// Two random endpoints, the one with fewer requests in flight times latency (EWMA).
    PowerOfTwo,
    /// Weighted random.
    Random,
    /// Maglev consistent hashing over a key.
    Hash(HashKey),
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::PowerOfTwo => "p2c",
            Strategy::Random => "random",
            Strategy::Hash(_) => "hash",
        }
    }
}

/// A cookie that pins a client to the endpoint that served it while that endpoint is usable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sticky {
    pub cookie: Box<str>,
    /// Max-Age of the cookie; None: a session cookie.
    pub max_age_s: Option<u32>,
}

/// How an active check probes an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 request; healthy if the status is in `statuses`.
    Http {
        method: Box<str>,
        path: Box<str>,
        /// Host header; None: the endpoint address.
        host: Option<Box<str>>,
        statuses: StatusRanges,
    },
}

/// Inclusive status ranges (`200-399`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusRanges(pub Box<[(u16, u16)]>);

impl StatusRanges {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }

    /// Parses `200`, `200-399`, or several of them separated by commas.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
                None => {
                    let v: u16 = part.parse().ok()?;
                    (v, v)
                }
            };
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return None;
            }
            out.push((lo, hi));
        }
        (!out.is_empty()).then(|| Self(out.into()))
    }
}

impl Default for StatusRanges {
    fn default() -> Self {
        Self(Box::new([(200, 399)]))
    }
}

/// An active health check, run on the control thread once per endpoint per node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive passes that mark a down endpoint up.
    pub rise: u8,
    /// Consecutive failures that mark an up endpoint down.
    pub fall: u8,
}

impl HealthCheck {
    pub fn http(path: &str) -> Self {
        Self {
            kind: CheckKind::Http {
                method: "GET".into(),
                path: path.into(),
                host: None,
                statuses: StatusRanges::default(),
            },
            interval_ms: 2_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
        }
    }
}

/// A set of 5xx statuses (bit `s - 500`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Statuses5xx(pub u128);

impl Statuses5xx {
    pub const GATEWAY: Self = Self((1 << 2) | (1 << 3) | (1 << 4));

    pub fn contains(self, status: u16) -> bool {
        (500..600).contains(&status) && self.0 & (1u128 << (status - 500)) != 0
    }

    pub fn insert(&mut self, status: u16) -> bool {
        if !(500..600).contains(&status) {
            return false;
        }
        self.0 |= 1u128 << (status - 500);
        true
    }
}

/// Passive outlier detection: what the workers see ejects an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Outlier {
    /// Consecutive failures (connect errors, timeouts, resets, `failure_statuses`) that eject
    /// an endpoint; 0: off. One failure is enough in the probation after an ejection.
    pub consecutive_failures: u32,
    /// The first ejection; each ejection that follows soon after the last doubles it.
    pub ejection_ms: u32,
    pub ejection_max_ms: u32,
    /// Most of a route's endpoints ejected at once, in percent (one may always be).
    pub max_ejected_pct: u8,
    /// Responses that count as failures.
    pub failure_statuses: Statuses5xx,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_ms: 5_000,
            ejection_max_ms: 300_000,
            max_ejected_pct: 50,
            failure_statuses: Statuses5xx::GATEWAY,
        }
    }
}

/// Retries on another endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Retry {
    /// Retries of one request (not counting the first attempt).
    pub retries_max: u8,
    /// Bound on waiting for the response head of one attempt; None: `timeouts.upstream_read_ms`.
    pub per_try_timeout_ms: Option<u32>,
    /// Retries per window at most this share of requests, in percent ...
    pub budget_pct: u8,
    /// ... plus this many per window, per worker.
    pub budget_min: u32,
    pub budget_window_ms: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            retries_max: 2,
            per_try_timeout_ms: None,
            budget_pct: 20,
            budget_min: 10,
            budget_window_ms: 10_000,
        }
    }
}

/// Per-endpoint limits, per worker; 0: none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointLimits {
    /// Requests in flight (each holds a connection).
    pub connections_max: u32,
    /// Requests waiting for one of those connections; past it: 503.
    pub pending_max: u32,
}

/// Everything a route says about its upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterSpec {
    pub upstreams: Box<[UpstreamSpec]>,
    pub strategy: Strategy,
    pub sticky: Option<Sticky>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Outlier,
    pub retry: Retry,
    /// Recovered endpoints ramp from 10% to their full weight over this long; 0: off.
    pub slow_start_ms: u32,
    /// Below this share of healthy endpoints (percent), health is ignored; 0: never.
    pub panic_threshold_pct: u8,
    pub limits: EndpointLimits,
}

impl ClusterSpec {
    /// The defaults around a list of upstreams.
    pub fn with_upstreams(upstreams: Vec<UpstreamSpec>) -> Self {
        Self {
            upstreams: upstreams.into(),
            strategy: Strategy::default(),
            sticky: None,
            health_check: None,
            outlier: Outlier::default(),
            retry: Retry::default(),
            slow_start_ms: 0,
            panic_threshold_pct: 50,
            limits: EndpointLimits::default(),
        }
    }

    /// The defaults around literal addresses.
    pub fn of_addrs(addrs: &[SocketAddr]) -> Self {
        Self::with_upstreams(addrs.iter().copied().map(UpstreamSpec::new).collect())
    }

    /// The one validation both stores run.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.upstreams.is_empty() {
            return Err(SpecError::NoUpstreams);
        }
        if self.upstreams.len() > UPSTREAMS_PER_ROUTE_MAX {
            return Err(SpecError::TooMany(self.upstreams.len()));
        }
        for u in self.upstreams.iter() {
            if !(1..=WEIGHT_MAX).contains(&u.weight) {
                return Err(SpecError::Weight(u.addr.to_string(), u.weight));
            }
        }
        if let Strategy::Hash(HashKey::Header(n) | HashKey::Cookie(n)) = &self.strategy {
            key_name(n)?;
        }
        if let Some(s) = &self.sticky {
            key_name(&s.cookie)?;
        }
        if let Some(h) = &self.health_check {
            validate_check(h)?;
        }
        let o = &self.outlier;
        if o.ejection_ms == 0
            || o.ejection_max_ms < o.ejection_ms
            || o.ejection_max_ms > EJECTION_MAX_MS
        {
            return Err(SpecError::Invalid(
                "outlier: need 0 < ejection_ms <= ejection_max_ms <= 3600000",
            ));
        }
        if o.max_ejected_pct > 100 || self.panic_threshold_pct > 100 || self.retry.budget_pct > 100
        {
            return Err(SpecError::Invalid("percentages are 0..=100"));
        }
        if self.retry.retries_max > RETRIES_MAX {
            return Err(SpecError::Invalid("retries_max is at most 5"));
        }
        if self.retry.budget_window_ms < 1_000 {
            return Err(SpecError::Invalid(
                "retry budget window is at least 1000 ms",
            ));
        }
        if self.retry.per_try_timeout_ms == Some(0) {
            return Err(SpecError::Invalid("per_try_timeout_ms must be positive"));
        }
        Ok(())
    }
}

fn key_name(n: &str) -> Result<(), SpecError> {
    let ok = !n.is_empty()
        && n.len() <= KEY_NAME_BYTES_MAX
        && n.bytes().all(ringway_proto::token::is_tchar);
    if ok {
        Ok(())
    } else {
        Err(SpecError::KeyName(n.to_string()))
    }
}

fn validate_check(h: &HealthCheck) -> Result<(), SpecError> {
    if h.interval_ms < CHECK_INTERVAL_MIN_MS || h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
        return Err(SpecError::Invalid(
            "health check: need interval_ms >= 100 and 0 < timeout_ms <= interval_ms",
        ));
    }
    if h.rise == 0 || h.fall == 0 {
        return Err(SpecError::Invalid(
            "health check: rise and fall are at least 1",
        ));
    }
    if let CheckKind::Http {
        method, path, host, ..
    } = &h.kind
    {
        if method.is_empty() || !method.bytes().all(ringway_proto::token::is_tchar) {
            return Err(SpecError::Invalid("health check: method is not a token"));
        }
        let path_ok = path.starts_with('/')
            && path.len() <= CHECK_PATH_BYTES_MAX
            && path.bytes().all(|b| b.is_ascii_graphic());
        if !path_ok {
            return Err(SpecError::Invalid(
                "health check: path must be /… of visible ASCII",
            ));
        }
        if let Some(host) = host {
            let mut buf = [0u8; crate::route::HOST_BYTES_MAX];
            if crate::route::normalize_host(host.as_bytes(), &mut buf).is_none() {
                return Err(SpecError::Invalid("health check: host is not a host name"));
            }
        }
    }
    Ok(())
}

/// Parses an upstream: `IP:port`, `[v6]:port`, or `name:port` (resolved later).
pub fn parse_upstream_addr(s: &str) -> Result<UpstreamAddr, SpecError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(UpstreamAddr::Socket(a));
    }
    let bad = || SpecError::Address(s.to_string());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut buf = [0u8; crate::route::HOST_BYTES_MAX];
    let name = crate::route::normalize_host(host.as_bytes(), &mut buf).ok_or_else(bad)?;
    let dns_name = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if port == 0 || !dns_name {
        return Err(bad());
    }
    Ok(UpstreamAddr::Name {
        host: name.into(),
        port,
    })
}

/// Why a route's upstream settings are refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("no upstreams")]
    NoUpstreams,
    #[error("{0} upstreams; at most 256")]
    TooMany(usize),
    #[error("upstream {0:?} is not IP:port, [IPv6]:port or name:port")]
    Address(String),
    #[error("upstream {0}: weight {1} is not 1..=1000")]
    Weight(String, u32),
    #[error("{0:?} is not a header or cookie name (a token of at most 64 bytes)")]
    KeyName(String),
    #[error("unknown {what} {value:?}")]
    Unknown { what: &'static str, value: String },
    #[error("{0}")]
    Invalid(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_names() {
        assert_eq!(
            parse_upstream_addr("10.0.0.1:80").unwrap(),
            UpstreamAddr::Socket("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_upstream_addr("App.Internal:3000").unwrap(),
            UpstreamAddr::Name {
                host: "app.internal".into(),
                port: 3000
            }
        );
        for bad in [
            "app", "app:0", "app:x", ":80", "a b:80", "a/b:80", "[::1]", "a..b:1",
        ] {
            assert!(parse_upstream_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses() {
        let r = StatusRanges::parse("200-299, 301").unwrap();
        assert!(r.contains(204) && r.contains(301) && !r.contains(302));
        for bad in ["", "99", "300-200", "600", "x"] {
            assert!(StatusRanges::parse(bad).is_none(), "{bad}");
        }
        let mut s = Statuses5xx::default();
        assert!(s.insert(500) && !s.insert(404));
        assert!(s.contains(500) && !s.contains(502));
        assert!(Statuses5xx::GATEWAY.contains(503) && !Statuses5xx::GATEWAY.contains(500));
    }

    #[test]
    fn validation() {
        let ok = ClusterSpec::of_addrs(&["127.0.0.1:1".parse().unwrap()]);
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.upstreams = Box::new([]);
        assert_eq!(s.validate(), Err(SpecError::NoUpstreams));
        let mut s = ok.clone();
        s.upstreams[0].weight = 0;
        assert!(matches!(s.validate(), Err(SpecError::Weight(..))));
        let mut s = ok.clone();
        s.strategy = Strategy::Hash(HashKey::Cookie("a b".into()));
        assert!(matches!(s.validate(), Err(SpecError::KeyName(_))));
        let mut s = ok.clone();
        let mut h = HealthCheck::http("/healthz");
        h.timeout_ms = h.interval_ms + 1;
        s.health_check = Some(h);
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.health_check = Some(HealthCheck::http("healthz"));
        assert!(s.validate().is_err());
        let mut s = ok;
        s.retry.retries_max = 9;
        assert!(s.validate().is_err());
    }
}
