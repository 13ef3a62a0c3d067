//! Routes and the lock-free table the workers read them from.
//!
//! The control plane owns the truth (a [`RouteSet`] built by a store) and applies it to the
//! [`RouteTable`], a pair of `papaya` maps. Workers look up a host with no lock: a papaya read
//! is an epoch pin and a hash probe. Replaced routes are reclaimed once no worker can still see
//! them. Each key is swapped atomically; a reload that changes many keys becomes visible key
//! by key, never as a torn route.

use crate::balance::Cluster;
use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Longest host name accepted for routing (RFC 1035 limit, and room for an IPv6 literal).
pub const HOST_BYTES_MAX: usize = 253;

/// Where requests for a set of host names go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Name in the store, for logs and errors.
    pub name: Box<str>,
    pub project_id: i64,
    pub environment_id: i64,
    pub deployment_id: i64,
    /// The upstreams, their endpoints and how one is chosen (bound to endpoint slots by the
    /// control thread before the workers see the route).
    pub cluster: Arc<Cluster>,
    /// Largest request body for this route; None: `limits.body_bytes_max`.
    pub body_bytes_max: Option<u64>,
    /// Answer plain HTTP requests with a redirect to HTTPS (308 for methods other than GET
    /// and HEAD, 301 for those).
    pub redirect_https: bool,
    /// Strict-Transport-Security on HTTPS responses (unless the app sets it).
    pub hsts: Option<Hsts>,
}

/// A Strict-Transport-Security policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hsts {
    pub max_age_s: u32,
    pub include_subdomains: bool,
    pub preload: bool,
}

/// A complete set of routes as a store produces it: host patterns (`example.com` or
/// `*.example.com`, already normalised) to routes, and an optional default route for hosts
/// nothing matches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteSet {
    pub hosts: HashMap<String, Arc<Route>>,
    pub default: Option<Arc<Route>>,
}

/// A host pattern that cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host pattern {0:?}: expected a host name or *.suffix")]
pub struct PatternError(pub String);

/// Normalises a host pattern from a store: lower case, no trailing dot, no port; `*.` only as
/// the first label.
pub fn normalize_pattern(pattern: &str) -> Result<String, PatternError> {
    let err = || PatternError(pattern.to_string());
    let (wild, rest) = match pattern.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    // Patterns name hosts, never ports: `example.com:8080` and `[::1]:80` are refused rather
    // than silently matched on every port.
    let port = match rest.rfind(']') {
        Some(close) => rest[close..].contains(':'),
        None => rest.contains(':'),
    };
    if rest.contains('*') || port {
        return Err(err());
    }
    let mut buf = [0u8; HOST_BYTES_MAX];
    let host = normalize_host(rest.as_bytes(), &mut buf).ok_or_else(err)?;
    if host.is_empty() || (wild && host.starts_with('[')) {
        return Err(err());
    }
    Ok(if wild {
        format!("*.{host}")
    } else {
        host.to_string()
    })
}

/// Normalises a Host header value (or absolute-form authority) for lookup: port stripped,
/// ASCII lower-cased, one trailing dot removed. Writes into `out` so the hot path allocates
/// nothing. `None` if the value is not a usable host name: empty (``, `.`, `:80`), starting
/// with a dot or holding an empty label (`..`), as nginx refuses them: such a value could only
/// ever reach the default route, and names nothing a certificate or a route can cover.
pub fn normalize_host<'o>(raw: &[u8], out: &'o mut [u8; HOST_BYTES_MAX]) -> Option<&'o str> {
    let (host, _port) = ringway_proto::token::split_host_port(raw)?;
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.len() > HOST_BYTES_MAX
        || host.is_empty()
        || host[0] == b'.'
        || host[host.len() - 1] == b'.'
        || host.windows(2).any(|w| w == b"..")
    {
        return None;
    }
    let out = &mut out[..host.len()];
    for (o, &b) in out.iter_mut().zip(host) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

type Map = papaya::HashMap<Box<str>, Arc<Route>, RandomState>;

/// The route snapshot shared by all workers.
#[derive(Debug)]
pub struct RouteTable {
    /// Exact host names; the default route is stored under the empty key.
    exact: Map,
    /// Wildcards keyed by their suffix with its leading dot (`*.example.com` as `.example.com`),
    /// so a lookup probes slices of the host itself and builds no key.
    wildcard: Map,
    version: AtomicU64,
    loaded: AtomicBool,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

const DEFAULT_KEY: &str = "";

impl RouteTable {
    pub fn new() -> Self {
        Self {
            exact: Map::with_hasher(RandomState::default()),
            wildcard: Map::with_hasher(RandomState::default()),
            version: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
        }
    }

    /// Looks up a normalised host: exact name, then the longest matching `*.suffix`, then the
    /// default route. `f` runs while the route is pinned; copy out what must outlive it.
    #[inline]
    pub fn with_route<R>(&self, host: &str, f: impl FnOnce(&Route) -> R) -> Option<R> {
        let exact = self.exact.pin();
        if !host.is_empty()
            && let Some(r) = exact.get(host)
        {
            return Some(f(r));
        }
        if !self.wildcard.is_empty() {
            let wild = self.wildcard.pin();
            // ".b.example.com", then ".example.com", then ".com": longest suffix first.
            let bytes = host.as_bytes();
            let mut i = 0;
            while let Some(off) = bytes[i..].iter().position(|&b| b == b'.') {
                let dot = i + off;
                if dot > 0
                    && let Some(r) = wild.get(&host[dot..])
                {
                    return Some(f(r));
                }
                i = dot + 1;
            }
        }
        exact.get(DEFAULT_KEY).map(|r| f(r))
    }

    /// Makes the table hold exactly `set`: changed and new patterns are inserted, missing ones
    /// removed. Unchanged routes are left alone so workers keep reading the same objects.
    pub fn apply(&self, set: &RouteSet) {
        let exact = self.exact.pin();
        let wild = self.wildcard.pin();
        for (pattern, route) in &set.hosts {
            let (map, key) = match pattern.strip_prefix('*') {
                Some(suffix) => (&wild, suffix),
                None => (&exact, pattern.as_str()),
            };
            if map.get(key).is_none_or(|old| old != route) {
                map.insert(key.into(), route.clone());
            }
        }
        match &set.default {
            Some(d) => {
                if exact.get(DEFAULT_KEY).is_none_or(|old| old != d) {
                    exact.insert(DEFAULT_KEY.into(), d.clone());
                }
            }
            None => {
                exact.remove(DEFAULT_KEY);
            }
        }
        let stale_exact: Vec<Box<str>> = exact
            .keys()
            .filter(|k| !k.is_empty() && !set.hosts.contains_key(k.as_ref()))
            .cloned()
            .collect();
        for k in stale_exact {
            exact.remove(&k);
        }
        let stale_wild: Vec<Box<str>> = wild
            .keys()
            .filter(|k| !set.hosts.contains_key(&format!("*{k}")))
            .cloned()
            .collect();
        for k in stale_wild {
            wild.remove(&k);
        }
        self.version.fetch_add(1, Ordering::Release);
        self.loaded.store(true, Ordering::Release);
    }

    /// Inserts or replaces one pattern (incremental updates from a store that follows changes).
    pub fn upsert(&self, pattern: &str, route: Arc<Route>) {
        match pattern.strip_prefix('*') {
            Some(suffix) => self.wildcard.pin().insert(suffix.into(), route),
            None => self.exact.pin().insert(pattern.into(), route),
        };
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Removes one pattern.
    pub fn remove(&self, pattern: &str) {
        match pattern.strip_prefix('*') {
            Some(suffix) => self.wildcard.pin().remove(suffix),
            None => self.exact.pin().remove(pattern),
        };
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Calls `f` with every pattern (the default route as `""`) and its route. Control
    /// thread only: it pins both maps for the whole walk.
    pub fn for_each(&self, mut f: impl FnMut(&str, &Arc<Route>)) {
        for (k, r) in self.exact.pin().iter() {
            f(k, r);
        }
        let mut key = String::new();
        for (k, r) in self.wildcard.pin().iter() {
            key.clear();
            key.push('*');
            key.push_str(k);
            f(&key, r);
        }
    }

    /// Number of host patterns (default route included).
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Increases with every change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Whether a complete set has been applied at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> Arc<Route> {
        Arc::new(Route {
            name: name.into(),
            project_id: 1,
            environment_id: 2,
            deployment_id: 3,
            cluster: Arc::new(Cluster::unbound(crate::balance::ClusterSpec::of_addrs(&[
                "127.0.0.1:1".parse().unwrap(),
            ]))),
            body_bytes_max: None,
            redirect_https: false,
            hsts: None,
        })
    }

    fn name(t: &RouteTable, host: &str) -> Option<String> {
        let mut buf = [0u8; HOST_BYTES_MAX];
        let h = normalize_host(host.as_bytes(), &mut buf)?;
        t.with_route(h, |r| r.name.to_string())
    }

    #[test]
    fn normalises_hosts() {
        let mut buf = [0u8; HOST_BYTES_MAX];
        assert_eq!(
            normalize_host(b"Example.COM.:8080", &mut buf),
            Some("example.com")
        );
        assert_eq!(normalize_host(b"[::1]:80", &mut buf), Some("[::1]"));
        assert_eq!(normalize_host(b"a b", &mut buf), None);
        for unusable in [
            &b""[..],
            b".",
            b":80",
            b"..",
            b".a.com",
            b"a..com",
            b"a.com..",
            b"[]",
        ] {
            assert_eq!(normalize_host(unusable, &mut buf), None, "{unusable:?}");
        }
        let long = "a".repeat(300);
        assert_eq!(normalize_host(long.as_bytes(), &mut buf), None);
        assert_eq!(
            normalize_pattern("*.Example.com.").unwrap(),
            "*.example.com"
        );
        assert!(normalize_pattern("a.*.com").is_err());
        assert!(normalize_pattern("*").is_err());
        assert!(normalize_pattern("").is_err());
        assert!(normalize_pattern("a.com:8080").is_err());
        assert!(normalize_pattern("[::1]:80").is_err());
        assert_eq!(normalize_pattern("[::1]").unwrap(), "[::1]");
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let t = RouteTable::new();
        let mut set = RouteSet::default();
        set.hosts.insert("example.com".into(), route("apex"));
        set.hosts.insert("*.example.com".into(), route("wild"));
        set.hosts.insert("*.b.example.com".into(), route("deeper"));
        set.hosts.insert("api.example.com".into(), route("api"));
        t.apply(&set);
        assert_eq!(name(&t, "EXAMPLE.com:443").as_deref(), Some("apex"));
        assert_eq!(name(&t, "api.example.com").as_deref(), Some("api"));
        assert_eq!(name(&t, "x.example.com").as_deref(), Some("wild"));
        assert_eq!(name(&t, "x.y.example.com").as_deref(), Some("wild"));
        assert_eq!(name(&t, "x.b.example.com").as_deref(), Some("deeper"));
        assert_eq!(name(&t, "b.example.com").as_deref(), Some("wild"));
        assert_eq!(name(&t, "other.org"), None);
        assert_eq!(name(&t, "xexample.com"), None);

        set.default = Some(route("fallback"));
        t.apply(&set);
        assert_eq!(name(&t, "other.org").as_deref(), Some("fallback"));
        assert_eq!(
            t.with_route("", |r| r.name.to_string()).as_deref(),
            Some("fallback")
        );
    }

    #[test]
    fn apply_removes_and_replaces() {
        let t = RouteTable::new();
        let mut set = RouteSet::default();
        set.hosts.insert("a.com".into(), route("a"));
        set.hosts.insert("*.w.com".into(), route("w"));
        set.default = Some(route("d"));
        t.apply(&set);
        assert_eq!(t.len(), 3);
        let v1 = t.version();
        let mut set2 = RouteSet::default();
        set2.hosts.insert("b.com".into(), route("b"));
        set2.hosts.insert("a.com".into(), route("a2"));
        t.apply(&set2);
        assert!(t.version() > v1);
        assert_eq!(name(&t, "a.com").as_deref(), Some("a2"));
        assert_eq!(name(&t, "b.com").as_deref(), Some("b"));
        assert_eq!(name(&t, "x.w.com"), None);
        assert_eq!(name(&t, "zzz.com"), None);
        assert_eq!(t.len(), 2);
        t.remove("a.com");
        t.upsert("*.w.com", route("w2"));
        assert_eq!(name(&t, "a.com"), None);
        assert_eq!(name(&t, "q.w.com").as_deref(), Some("w2"));
    }

    #[test]
    fn concurrent_readers_see_whole_routes() {
        let t = Arc::new(RouteTable::new());
        let mut set = RouteSet::default();
        set.hosts.insert("a.com".into(), route("v0"));
        t.apply(&set);
        let reader = {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut seen = 0u64;
                for _ in 0..200_000 {
                    let n = t.with_route("a.com", |r| {
                        assert_eq!(r.cluster.members().len(), 1);
                        r.name.len()
                    });
                    seen += n.unwrap_or(0) as u64;
                }
                seen
            })
        };
        for i in 0..2_000 {
            let mut s = RouteSet::default();
            s.hosts.insert("a.com".into(), route(&format!("v{i}")));
            t.apply(&s);
        }
        assert!(reader.join().unwrap() > 0);
    }
}
