//! Routing phase: the request's host to a route, and the route's choice of endpoint.
//!
//! The route is read under a papaya pin and the few values the exchange needs are copied out,
//! so no reference count is touched (an `Arc` clone per request would bounce a cache line
//! between cores) and no pin is held across I/O. A retry looks the route up again
//! ([`choose_again`]): it may have changed in between, and only failures pay for it.

use ringway_core::RouteTable;
use ringway_core::balance::hash::{mix, stable_hash};
use ringway_core::balance::spec::HashKey;
use ringway_core::balance::stats::RouteStats;
use ringway_core::balance::{Ask, Chosen, EndpointRef, FailKind, Registry, Unavailable};
use ringway_core::record::RouteIds;
use ringway_core::route::{HOST_BYTES_MAX, Hsts, Route, normalize_host};
use ringway_proto::Request;
use std::net::{IpAddr, SocketAddr};

/// Cookie headers of one request looked at for the hash key and the sticky cookie.
const COOKIE_HEADERS_MAX: usize = 8;

/// What the exchange needs from the matched route.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub ids: RouteIds,
    /// The endpoint of the current attempt, or why there is none (503).
    pub pick: Result<Chosen, Unavailable>,
    pub body_bytes_max: u64,
    pub redirect_https: bool,
    pub hsts: Option<Hsts>,
    /// The request's hash key (for the choice of a retry).
    pub key: u64,
    pub retries_max: u8,
    /// Bound on one attempt's wait for the response head, in milliseconds (0: the default).
    pub per_try_ms: u32,
    /// Requests one worker may hold waiting for an endpoint at its connection limit.
    pub pending_max: u32,
    /// The route's statistics slot.
    pub stats: u32,
    /// Which cluster chose (its address): a later lookup by host that finds another route
    /// (the host was removed or moved, and a wildcard or the default now matches) must not
    /// send a retry to that route's endpoints.
    pub cluster: usize,
}

impl Target {
    /// The endpoint of the current attempt (None: no endpoint could be chosen).
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.pick.ok().map(|c| c.addr)
    }

    pub fn endpoint(&self) -> EndpointRef {
        self.pick.map_or(EndpointRef::UNTRACKED, |c| c.endpoint)
    }
}

/// An endpoint as a pool tag (see `Pool::sweep`).
pub fn endpoint_tag(e: EndpointRef) -> u64 {
    (u64::from(e.index) << 32) | u64::from(e.generation)
}

pub fn endpoint_of_tag(tag: u64) -> EndpointRef {
    EndpointRef {
        index: (tag >> 32) as u32,
        generation: tag as u32,
    }
}

/// What a choice needs from the worker and the request.
#[derive(Debug, Clone, Copy)]
pub struct Chooser<'a> {
    pub registry: &'a Registry,
    pub worker: usize,
    pub rand: u64,
    pub seq: u64,
    /// The registry's clock at the instant the choice is for (no clock read of its own).
    pub now_ms: u64,
}

impl Chooser<'_> {
    /// The question for a cluster: this worker's random bits and clock, the request's key.
    fn ask<'t>(&self, key: u64, sticky: Option<u64>, tried: &'t [u64]) -> Ask<'t> {
        Ask {
            worker: self.worker,
            now_ms: self.now_ms,
            rand: self.rand,
            seq: self.seq,
            key,
            sticky,
            tried,
        }
    }
}

/// How an attempt's response head came back, for [`report_response`].
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub status: u16,
    pub latency_us: u64,
    /// When it came, on the registry's clock.
    pub now_ms: u64,
}

/// A normalised host kept on the stack for routing and logging.
#[derive(Debug, Clone, Copy)]
pub struct HostName {
    buf: [u8; HOST_BYTES_MAX],
    len: usize,
}

impl HostName {
    pub fn empty() -> Self {
        Self {
            buf: [0; HOST_BYTES_MAX],
            len: 0,
        }
    }

    /// Normalises `raw` (Host value or authority). `None`: not a valid host.
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let mut h = Self::empty();
        let len = normalize_host(raw, &mut h.buf)?.len();
        h.len = len;
        Some(h)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written (normalize_host checks), so this cannot fail.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Looks up `host` and chooses an endpoint for the request `r` from `client_ip`.
pub fn resolve(
    table: &RouteTable,
    host: &HostName,
    r: &Request<'_, '_>,
    client_ip: IpAddr,
    ch: &Chooser<'_>,
    default_body_max: u64,
) -> Option<Target> {
    table.with_route(host.as_str(), |route| {
        let c = &route.cluster;
        let spec = &c.spec;
        let mut cookies: [&[u8]; COOKIE_HEADERS_MAX] = [b""; COOKIE_HEADERS_MAX];
        let mut n = 0;
        // Only a sticky cookie or a cookie hash key needs them: most routes skip the scan.
        let wants_cookies = spec.sticky.is_some()
            || matches!(
                spec.strategy,
                ringway_core::balance::Strategy::Hash(HashKey::Cookie(_))
            );
        for h in r
            .headers
            .iter()
            .filter(|h| wants_cookies && h.name.eq_ignore_ascii_case("cookie"))
        {
            if n < COOKIE_HEADERS_MAX {
                cookies[n] = h.value;
                n += 1;
            }
        }
        let cookies = &cookies[..n];
        let key = match &spec.strategy {
            ringway_core::balance::Strategy::Hash(k) => hash_key(k, r, cookies, client_ip),
            _ => 0,
        };
        let sticky = spec.sticky.as_ref().and_then(|s| {
            let v = crate::policy::cookie(cookies, s.cookie.as_bytes())?;
            parse_hex_u64(v)
        });
        let now_ms = ch.now_ms;
        c.note_request(ch.worker, now_ms);
        let ask = ch.ask(key, sticky, &[]);
        Target {
            ids: RouteIds {
                project_id: route.project_id,
                environment_id: route.environment_id,
                deployment_id: route.deployment_id,
            },
            pick: c.choose(ch.registry, &ask),
            body_bytes_max: route.body_bytes_max.unwrap_or(default_body_max),
            redirect_https: route.redirect_https,
            hsts: route.hsts,
            key,
            retries_max: spec.retry.retries_max,
            per_try_ms: spec.retry.per_try_timeout_ms.unwrap_or(0),
            pending_max: spec.limits.pending_max,
            stats: c.stats,
            cluster: cluster_id(route),
        }
    })
}

fn cluster_id(route: &Route) -> usize {
    std::sync::Arc::as_ptr(&route.cluster) as usize
}

/// `f` on the route `t` was chosen from, if the host still leads to it.
fn same_route<R>(
    table: &RouteTable,
    host: &HostName,
    t: &Target,
    f: impl FnOnce(&Route) -> R,
) -> Option<R> {
    table
        .with_route(host.as_str(), |route| {
            (cluster_id(route) == t.cluster).then(|| f(route))
        })
        .flatten()
}

/// The request's hash key; an absent header or cookie falls back to the client address.
fn hash_key(k: &HashKey, r: &Request<'_, '_>, cookies: &[&[u8]], ip: IpAddr) -> u64 {
    let ip_hash = || match ip {
        IpAddr::V4(a) => mix(u64::from(u32::from(a))),
        IpAddr::V6(a) => mix((u128::from(a) as u64) ^ ((u128::from(a) >> 64) as u64)),
    };
    match k {
        HashKey::ClientIp => ip_hash(),
        HashKey::Path => stable_hash(r.path()),
        HashKey::Header(name) => r.header(name).map_or_else(ip_hash, stable_hash),
        HashKey::Cookie(name) => {
            crate::policy::cookie(cookies, name.as_bytes()).map_or_else(ip_hash, stable_hash)
        }
    }
}

/// The sticky cookie's value: 16 hex digits.
pub fn parse_hex_u64(v: &[u8]) -> Option<u64> {
    if v.len() != 16 {
        return None;
    }
    let s = std::str::from_utf8(v).ok()?;
    u64::from_str_radix(s, 16).ok()
}

/// What a failed attempt reports, and whether another endpoint is wanted.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    pub kind: Option<FailKind>,
    /// Another endpoint may be tried (the request can be sent again).
    pub retry: bool,
    pub tried: &'a [u64],
}

/// What [`choose_again`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// Retry on this endpoint.
    Retry(Chosen),
    /// No retry: not wanted, the budget refused it, or no endpoint is left.
    Stop { refused: bool },
}

/// After a failed attempt on `target`'s endpoint: the failure reported (an endpoint past the
/// outlier threshold ejected, if the route's ejected share allows), and, if a retry is
/// wanted and the retry budget allows it, another endpoint chosen.
pub fn choose_again(
    table: &RouteTable,
    stats: &RouteStats,
    host: &HostName,
    target: &Target,
    f: Failed<'_>,
    ch: &Chooser<'_>,
) -> Again {
    let r = same_route(table, host, target, |route| {
        again(route, stats, target, f, ch)
    });
    r.unwrap_or(Again::Stop { refused: false })
}

fn again(route: &Route, stats: &RouteStats, t: &Target, f: Failed<'_>, ch: &Chooser<'_>) -> Again {
    let c = &route.cluster;
    let reg = ch.registry;
    let now_ms = ch.now_ms;
    let e = t.endpoint();
    if let Some(kind) = f.kind {
        stats.record(
            ch.worker,
            t.stats,
            ringway_core::balance::stats::RouteEvent::Failure(kind),
        );
        if reg.failure(ch.worker, e, kind, &c.spec.outlier, now_ms) {
            c.eject(reg, e, now_ms);
        }
    }
    if !f.retry || f.tried.len() > usize::from(t.retries_max) {
        return Again::Stop { refused: false };
    }
    let ask = ch.ask(t.key, None, f.tried);
    // An endpoint at its connection limit is no place for a retry.
    let Ok(next) = c
        .choose(reg, &ask)
        .map_err(|_| ())
        .and_then(|n| if n.saturated { Err(()) } else { Ok(n) })
    else {
        return Again::Stop { refused: false };
    };
    if !c.allow_retry(ch.worker, now_ms) {
        return Again::Stop { refused: true };
    }
    Again::Retry(next)
}

/// A new choice for a request waiting for room at an endpoint's connection limit.
pub fn choose_fresh(
    table: &RouteTable,
    host: &HostName,
    t: &Target,
    ch: &Chooser<'_>,
) -> Option<Chosen> {
    same_route(table, host, t, |route| {
        route
            .cluster
            .choose(ch.registry, &ch.ask(t.key, None, &[]))
            .ok()
    })?
}

/// After a response head: the endpoint's success (or a failure status) reported.
pub fn report_response(
    table: &RouteTable,
    host: &HostName,
    target: &Target,
    o: Outcome,
    reg: &Registry,
    worker: usize,
) {
    let e = target.endpoint();
    let success = || reg.success(worker, e, (o.status / 100) as u8, o.latency_us, o.now_ms);
    if o.status < 500 {
        success();
        return;
    }
    // A 5xx: whether it counts as a failure is the route's to say (looked up again: only
    // these responses pay for it, and the Target stays small).
    let counted = same_route(table, host, target, |route| {
        let c = &route.cluster;
        if !c.spec.outlier.failure_statuses.contains(o.status) {
            return false;
        }
        if reg.failure(worker, e, FailKind::Status, &c.spec.outlier, o.now_ms) {
            c.eject(reg, e, o.now_ms);
        }
        true
    });
    if counted != Some(true) {
        success();
    }
}

/// The sticky cookie naming `id`, as a `Set-Cookie` value's parts, if the route has one.
pub fn sticky_cookie(
    table: &RouteTable,
    host: &HostName,
    t: &Target,
    id: u64,
    tls: bool,
    out: &mut Vec<u8>,
) -> bool {
    same_route(table, host, t, |route| {
        let Some(s) = &route.cluster.spec.sticky else {
            return false;
        };
        out.extend_from_slice(s.cookie.as_bytes());
        out.push(b'=');
        let mut hex = [0u8; 16];
        ringway_proto::write::hex_into(&id.to_be_bytes(), &mut hex);
        out.extend_from_slice(&hex);
        out.extend_from_slice(b"; Path=/; HttpOnly; SameSite=Lax");
        if let Some(age) = s.max_age_s {
            out.extend_from_slice(b"; Max-Age=");
            ringway_proto::write::push_u64(out, u64::from(age));
        }
        if tls {
            out.extend_from_slice(b"; Secure");
        }
        true
    })
    .unwrap_or(false)
}
