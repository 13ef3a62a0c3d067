//! Routing phase: the request's host to an upstream address.
//!
//! The route is read under a papaya pin and the few values the exchange needs are copied out,
//! so no reference count is touched (an `Arc` clone per request would bounce a cache line
//! between cores) and no pin is held across I/O.

use ringway_core::RouteTable;
use ringway_core::record::RouteIds;
use ringway_core::route::{HOST_BYTES_MAX, Hsts, normalize_host};
use std::net::SocketAddr;

/// What the exchange needs from the matched route.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub ids: RouteIds,
    pub upstream: SocketAddr,
    pub body_bytes_max: u64,
    pub redirect_https: bool,
    pub hsts: Option<Hsts>,
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

/// Looks up `host`; `pick` chooses among several upstreams (round robin per worker).
pub fn resolve(
    table: &RouteTable,
    host: &HostName,
    pick: u64,
    default_body_max: u64,
) -> Option<Target> {
    table.with_route(host.as_str(), |r| {
        debug_assert!(
            !r.upstreams.is_empty(),
            "stores never publish a route without upstreams"
        );
        let n = r.upstreams.len().max(1) as u64;
        let upstream = r.upstreams.get((pick % n) as usize).copied()?;
        Some(Target {
            ids: RouteIds {
                project_id: r.project_id,
                environment_id: r.environment_id,
                deployment_id: r.deployment_id,
            },
            upstream,
            body_bytes_max: r.body_bytes_max.unwrap_or(default_body_max),
            redirect_https: r.redirect_https,
            hsts: r.hsts,
        })
    })?
}
