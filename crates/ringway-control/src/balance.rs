//! The control thread's side of load balancing.
//!
//! Stores hand over routes whose clusters are *unbound* (literal addresses, untracked). The
//! [`Binder`] turns each into the cluster the workers choose from: upstream names resolved
//! (and re-resolved every `balancer.dns_refresh_ms`; a failed resolution keeps the last
//! addresses and is counted), every address given an endpoint slot in the shared
//! [`Registry`], the route given a statistics slot (up to `balancer.route_series_max`, then
//! the overflow series). Its maintenance step, run every [`MAINTENANCE_INTERVAL`] by the
//! store task, re-binds routes whose names changed, and after route changes walks the table
//! once: active health checks started and stopped (one per endpoint per node), draining
//! endpoints marked so the workers stop pooling them, unused slots freed after a quarantine,
//! ejections logged.

use crate::dns::Resolver;
use crate::metrics::{ControlStats, family};
use ringway_core::RouteTable;
use ringway_core::balance::registry::{SLOT_QUARANTINE_MS, assign_endpoint};
use ringway_core::balance::spec::{AdminState, CheckKind, HealthCheck, UpstreamAddr};
use ringway_core::balance::stats::RouteStats;
use ringway_core::balance::{Checked, Cluster, ClusterSpec, Member, Registry, Slots};
use ringway_core::route::{Route, RouteSet};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How often the store task runs [`Binder::maintain`].
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);
/// Route changes are reconciled (checks, draining, slot sweep) at most this often.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// A failed resolution is tried again after this long (or the refresh, if shorter).
const DNS_RETRY: Duration = Duration::from_secs(5);
/// Longest a health check response head may be.
const CHECK_HEAD_BYTES_MAX: usize = 4_096;
/// Names resolved in one maintenance step at most (the rest wait for the next).
const RESOLUTIONS_PER_STEP_MAX: usize = 64;

/// What `/metrics` reads of the balancer (control thread only: the locks are never taken by
/// a worker).
#[derive(Debug, Default)]
pub struct BalanceView {
    /// Endpoint slots in use and their addresses.
    pub endpoints: Mutex<Vec<(u32, SocketAddr)>>,
    /// Route statistics slots and the route names they count.
    pub routes: Mutex<Vec<(u32, Box<str>)>>,
    pub dns_failures: AtomicU64,
    pub dns_resolutions: AtomicU64,
    pub health_checks: AtomicU64,
}

/// Sizes of the balancer's shared tables.
#[derive(Debug, Clone, Copy)]
pub struct BalanceLimits {
    pub endpoints_max: usize,
    pub route_series_max: usize,
    pub dns_refresh: Duration,
}

struct Resolution {
    addrs: Vec<SocketAddr>,
    next_at: Instant,
}

struct Checker {
    addr: SocketAddr,
    spec: HealthCheck,
    task: tokio::task::JoinHandle<()>,
}

/// Binds routes to endpoints; owns the endpoint and route slots.
pub struct Binder {
    pub registry: Arc<Registry>,
    pub route_stats: Arc<RouteStats>,
    pub view: Arc<BalanceView>,
    workers: usize,
    refresh: Duration,
    endpoints: Slots<SocketAddr>,
    series: Slots<Box<str>>,
    names: HashMap<(Box<str>, u16), Resolution>,
    /// Unbound routes that name upstreams by DNS name, by pattern (re-bound when a name's
    /// addresses change).
    named: HashMap<String, Arc<Route>>,
    checkers: HashMap<u32, Checker>,
    /// Built clusters by settings and statistics slot (reused while nothing changes), and
    /// those of the previous full set while a new one is bound.
    clusters: HashMap<(Arc<ClusterSpec>, u32), Arc<Cluster>>,
    previous: HashMap<(Arc<ClusterSpec>, u32), Arc<Cluster>>,
    /// Ejections seen per endpoint slot (to log new ones).
    ejections: Vec<u64>,
    dirty: bool,
    reconciled_at: Option<Instant>,
    resolver: Resolver,
}

impl std::fmt::Debug for Binder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binder")
            .field("endpoints", &self.endpoints.len())
            .field("names", &self.names.len())
            .field("checkers", &self.checkers.len())
            .finish()
    }
}

impl Binder {
    pub fn new(limits: BalanceLimits, workers: usize, resolver: Resolver) -> Self {
        let mut series = Slots::new(limits.route_series_max + 1);
        // Slot 0 is the overflow series: taken by a key no route can have.
        let _ = series.assign(&Box::<str>::from("\0overflow"));
        Self {
            registry: Arc::new(Registry::new(limits.endpoints_max, workers)),
            route_stats: Arc::new(RouteStats::new(limits.route_series_max, workers)),
            view: Arc::default(),
            workers,
            refresh: limits.dns_refresh,
            endpoints: Slots::new(limits.endpoints_max),
            series,
            names: HashMap::new(),
            named: HashMap::new(),
            checkers: HashMap::new(),
            clusters: HashMap::new(),
            previous: HashMap::new(),
            ejections: vec![0; limits.endpoints_max],
            dirty: true,
            reconciled_at: None,
            resolver,
        }
    }

    /// Binds every route of `set` (routes shared by several patterns stay shared).
    pub fn bind_set(&mut self, set: &RouteSet) -> RouteSet {
        self.named.clear();
        // Clusters of the last set may be reused; those this set does not use are dropped.
        self.previous = std::mem::take(&mut self.clusters);
        let mut memo: HashMap<*const Route, Arc<Route>> = HashMap::new();
        let mut out = RouteSet::default();
        for (pattern, r) in &set.hosts {
            let bound = self.bind_memo(&mut memo, r);
            self.note_named(pattern, r);
            out.hosts.insert(pattern.clone(), bound);
        }
        if let Some(d) = &set.default {
            out.default = Some(self.bind_memo(&mut memo, d));
            self.note_named("", d);
        }
        self.previous.clear();
        self.dirty = true;
        out
    }

    fn bind_memo(
        &mut self,
        memo: &mut HashMap<*const Route, Arc<Route>>,
        r: &Arc<Route>,
    ) -> Arc<Route> {
        if let Some(b) = memo.get(&Arc::as_ptr(r)) {
            return b.clone();
        }
        let b = self.bind(r);
        memo.insert(Arc::as_ptr(r), b.clone());
        b
    }

    /// Binds one route for `pattern` (an incremental upsert).
    pub fn bind_one(&mut self, pattern: &str, r: &Arc<Route>) -> Arc<Route> {
        self.named.remove(pattern);
        self.note_named(pattern, r);
        self.dirty = true;
        self.bind(r)
    }

    /// `pattern` left the table.
    pub fn removed(&mut self, pattern: &str) {
        self.named.remove(pattern);
        self.dirty = true;
    }

    fn note_named(&mut self, pattern: &str, r: &Arc<Route>) {
        if names_of(r).next().is_some() {
            self.named.insert(pattern.to_string(), r.clone());
        }
    }

    /// The route with its cluster bound to endpoint slots.
    pub fn bind(&mut self, r: &Arc<Route>) -> Arc<Route> {
        let spec = r.cluster.spec.clone();
        let mut members: Vec<Member> = Vec::with_capacity(spec.upstreams.len());
        let mut unresolved = 0u16;
        for u in spec.upstreams.iter() {
            let addrs: Vec<SocketAddr> = match &u.addr {
                UpstreamAddr::Socket(a) => vec![*a],
                UpstreamAddr::Name { host, port } => {
                    let key = (host.clone(), *port);
                    match self.names.get(&key) {
                        Some(res) => res.addrs.clone(),
                        None => {
                            self.names.insert(
                                key,
                                Resolution {
                                    addrs: Vec::new(),
                                    next_at: Instant::now(),
                                },
                            );
                            Vec::new()
                        }
                    }
                }
            };
            if addrs.is_empty() {
                unresolved = unresolved.saturating_add(1);
            }
            for a in addrs {
                if members.iter().any(|m| m.addr == a) {
                    continue;
                }
                let ep = assign_endpoint(&mut self.endpoints, &self.registry, &a);
                members.push(Member::new(a, ep, u.weight, u.state));
            }
        }
        let slot = self.series.assign(&r.name).map_or(
            ringway_core::balance::cluster::STATS_OVERFLOW,
            |(s, fresh)| {
                if fresh {
                    self.route_stats.clear(s.index);
                }
                s.index
            },
        );
        Arc::new(Route {
            cluster: self.cluster(spec, members, slot, unresolved),
            ..(**r).clone()
        })
    }

    /// The cluster for these settings and endpoints: the one already built if nothing
    /// changed (a reload of a million routes does not rebuild their round-robin orders and
    /// Maglev tables, and routes keep their cursors and budgets), else a new one.
    fn cluster(
        &mut self,
        spec: Arc<ClusterSpec>,
        members: Vec<Member>,
        slot: u32,
        unresolved: u16,
    ) -> Arc<Cluster> {
        let key = (spec, slot);
        let kept = || {
            members
                .iter()
                .filter(|m| m.state != AdminState::Disabled)
                .take(ringway_core::balance::spec::MEMBERS_MAX)
        };
        let same = |c: &Arc<Cluster>| c.unresolved == unresolved && c.members().iter().eq(kept());
        if let Some(c) = self.clusters.get(&key).filter(|c| same(c)) {
            return c.clone();
        }
        if let Some(c) = self.previous.get(&key).filter(|c| same(c)) {
            let c = c.clone();
            self.clusters.insert(key, c.clone());
            return c;
        }
        let c = Arc::new(Cluster::build(
            key.0.clone(),
            members,
            self.workers,
            slot,
            unresolved,
        ));
        self.clusters.insert(key, c.clone());
        c
    }

    /// Resolves names at once, blocking (start-up, before the workers serve), and re-binds
    /// `set`'s routes that use them.
    pub fn resolve_now_blocking(&mut self, set: &RouteSet) -> RouteSet {
        let keys: Vec<(Box<str>, u16)> = self.names.keys().cloned().collect();
        for (host, port) in keys {
            let got = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_ref(), port));
            self.store_resolution(&host, port, got.map(|i| i.collect()).ok());
        }
        self.bind_set(set)
    }

    fn store_resolution(&mut self, host: &str, port: u16, got: Option<Vec<SocketAddr>>) -> bool {
        let key = (Box::<str>::from(host), port);
        let refresh = self.refresh;
        let Some(res) = self.names.get_mut(&key) else {
            return false;
        };
        ControlStats::inc(&self.view.dns_resolutions);
        match got {
            Some(mut addrs) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                addrs.truncate(ringway_core::balance::spec::MEMBERS_MAX);
                res.next_at = Instant::now() + refresh;
                if addrs != res.addrs {
                    tracing::info!(name = host, port, addresses = ?addrs, "upstream name resolved");
                    res.addrs = addrs;
                    return true;
                }
                false
            }
            _ => {
                ControlStats::inc(&self.view.dns_failures);
                res.next_at = Instant::now() + refresh.min(DNS_RETRY);
                tracing::warn!(
                    name = host,
                    port,
                    kept = res.addrs.len(),
                    "upstream name did not resolve; keeping its last addresses"
                );
                false
            }
        }
    }

    /// One maintenance step: due names resolved (routes whose names changed re-bound into
    /// `table`), then, after route changes, the table reconciled.
    pub async fn maintain(&mut self, table: &RouteTable) {
        let now = Instant::now();
        let due: Vec<(Box<str>, u16)> = self
            .names
            .iter()
            .filter(|(_, r)| r.next_at <= now)
            .map(|(k, _)| k.clone())
            .take(RESOLUTIONS_PER_STEP_MAX)
            .collect();
        // All at once: one name that does not answer costs one timeout, not one per name.
        let results = futures_util::future::join_all(
            due.iter()
                .map(|(host, port)| self.resolver.resolve(host, *port)),
        )
        .await;
        let mut changed = HashSet::new();
        for ((host, port), got) in due.into_iter().zip(results) {
            if self.store_resolution(&host, port, got) {
                changed.insert((host, port));
            }
        }
        if !changed.is_empty() {
            let redo: Vec<(String, Arc<Route>)> = self
                .named
                .iter()
                .filter(|(_, r)| names_of(r).any(|k| changed.contains(&k)))
                .map(|(p, r)| (p.clone(), r.clone()))
                .collect();
            for (pattern, r) in redo {
                let b = self.bind(&r);
                table.upsert(&pattern, b);
            }
            self.dirty = true;
        }
        self.log_ejections();
        if self.dirty
            && self
                .reconciled_at
                .is_none_or(|t| t.elapsed() >= RECONCILE_INTERVAL)
        {
            self.reconcile(table);
        }
    }

    /// Walks the table: checks started and stopped, draining marked, slots swept.
    fn reconcile(&mut self, table: &RouteTable) {
        self.dirty = false;
        // Names no route uses any more stop being resolved.
        let used_names: HashSet<(Box<str>, u16)> =
            self.named.values().flat_map(|r| names_of(r)).collect();
        self.names.retain(|k, _| used_names.contains(k));
        self.reconciled_at = Some(Instant::now());
        let mut used = vec![false; self.registry.capacity()];
        let mut active = vec![false; self.registry.capacity()];
        let mut routes_used = HashSet::new();
        let mut want: HashMap<u32, (Box<str>, SocketAddr, HealthCheck)> = HashMap::new();
        table.for_each(|_, r| {
            routes_used.insert(r.cluster.stats);
            for m in r.cluster.members() {
                let Some(i) = m.endpoint.tracked().then_some(m.endpoint.index as usize) else {
                    continue;
                };
                used[i] = true;
                active[i] |= m.state == AdminState::Active;
                // Routes sharing an endpoint with different checks: the check of the route
                // with the first name, whatever order the walk takes (so it never flips).
                if let Some(h) = &r.cluster.spec.health_check {
                    let e = want
                        .entry(m.endpoint.index)
                        .or_insert_with(|| (r.name.clone(), m.addr, h.clone()));
                    if r.name < e.0 {
                        *e = (r.name.clone(), m.addr, h.clone());
                    }
                }
            }
        });
        for (i, &u) in used.iter().enumerate() {
            if u {
                self.registry.set_no_pool(i as u32, !active[i]);
            }
        }
        let reg = self.registry.clone();
        self.checkers.retain(|i, c| {
            let keep = want
                .get(i)
                .is_some_and(|(_, a, h)| *a == c.addr && *h == c.spec);
            if !keep {
                c.task.abort();
                // No check any more: its last verdict must not keep the endpoint down.
                reg.set_checked(*i, Checked::Unknown, reg.now_ms());
            }
            keep
        });
        for (i, (_, addr, spec)) in want {
            if self.checkers.contains_key(&i) {
                continue;
            }
            self.registry
                .set_checked(i, Checked::Unknown, self.registry.now_ms());
            let task = tokio::spawn(check_loop(
                self.registry.clone(),
                self.view.clone(),
                i,
                addr,
                spec.clone(),
            ));
            self.checkers.insert(i, Checker { addr, spec, task });
        }
        let now_ms = self.registry.now_ms();
        self.endpoints.sweep(
            |i| used.get(i as usize).copied().unwrap_or(false),
            now_ms,
            SLOT_QUARANTINE_MS,
        );
        self.series.sweep(
            |i| i == 0 || routes_used.contains(&i),
            now_ms,
            SLOT_QUARANTINE_MS,
        );
        if let Ok(mut v) = self.view.endpoints.lock() {
            *v = self.endpoints.iter().map(|(i, a)| (i, *a)).collect();
        }
        if let Ok(mut v) = self.view.routes.lock() {
            *v = self
                .series
                .iter()
                .filter(|(i, _)| *i != 0)
                .map(|(i, n)| (i, n.clone()))
                .collect();
        }
    }

    fn log_ejections(&mut self) {
        for (i, addr) in self.endpoints.iter() {
            let n = self.registry.ejections_total(i);
            let seen = &mut self.ejections[i as usize];
            if n > *seen {
                tracing::warn!(endpoint = %addr, ejections = n, "endpoint ejected after consecutive failures");
                *seen = n;
            }
        }
    }
}

/// The DNS names a route's upstreams use.
fn names_of(r: &Route) -> impl Iterator<Item = (Box<str>, u16)> + '_ {
    r.cluster
        .spec
        .upstreams
        .iter()
        .filter_map(|u| match &u.addr {
            UpstreamAddr::Name { host, port } => Some((host.clone(), *port)),
            UpstreamAddr::Socket(_) => None,
        })
}

/// One endpoint's active check, until aborted: a probe per interval, `rise` passes in a row
/// mark it up, `fall` failures down.
async fn check_loop(
    reg: Arc<Registry>,
    view: Arc<BalanceView>,
    index: u32,
    addr: SocketAddr,
    spec: HealthCheck,
) {
    let mut t = tokio::time::interval(Duration::from_millis(u64::from(spec.interval_ms)));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passes, mut fails) = (0u8, 0u8);
    let mut state = Checked::Unknown;
    loop {
        t.tick().await;
        let timeout = Duration::from_millis(u64::from(spec.timeout_ms));
        let ok = matches!(
            tokio::time::timeout(timeout, probe(addr, &spec)).await,
            Ok(Ok(true))
        );
        ControlStats::inc(&view.health_checks);
        if ok {
            passes = passes.saturating_add(1);
            fails = 0;
        } else {
            fails = fails.saturating_add(1);
            passes = 0;
        }
        let verdict = if passes >= spec.rise && state != Checked::Up {
            Checked::Up
        } else if fails >= spec.fall && state != Checked::Down {
            Checked::Down
        } else {
            continue;
        };
        if verdict == Checked::Down || state == Checked::Down {
            tracing::warn!(endpoint = %addr, state = if verdict == Checked::Up { "up" } else { "down" }, "health check verdict");
        }
        state = verdict;
        reg.set_checked(index, verdict, reg.now_ms());
    }
}

/// One probe: a TCP connect, or an HTTP request whose status must be in the expected set.
async fn probe(addr: SocketAddr, spec: &HealthCheck) -> std::io::Result<bool> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let CheckKind::Http {
        method,
        path,
        host,
        statuses,
    } = &spec.kind
    else {
        return Ok(true);
    };
    let host = host
        .as_deref()
        .map_or_else(|| addr.to_string(), str::to_string);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringway-health-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > CHECK_HEAD_BYTES_MAX {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    // "HTTP/1.1 200 ..."
    let status = buf
        .get(9..12)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u16>().ok());
    Ok(buf.starts_with(b"HTTP/1.") && status.is_some_and(|s| statuses.contains(s)))
}

/// Endpoint series on /metrics at most; the rest are summed into `endpoint="_other"`.
pub const ENDPOINT_SERIES_MAX: usize = 1_000;
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What /metrics reads of the balancer.
#[derive(Debug, Clone)]
pub struct BalanceMetrics {
    pub registry: Arc<Registry>,
    pub route_stats: Arc<RouteStats>,
    pub view: Arc<BalanceView>,
}

/// One endpoint's figures, summed over the workers.
#[derive(Default)]
struct EndpointFigures {
    responses: [u64; 5],
    failures: [u64; ringway_core::balance::registry::FAIL_KINDS],
    inflight: u64,
    ejections: u64,
    healthy: u64,
    down: u64,
}

impl BalanceMetrics {
    pub fn render(&self, out: &mut String) {
        self.render_endpoints(out);
        self.render_routes(out);
        let v = &self.view;
        let counters = [
            (
                "ringway_upstream_dns_resolutions_total",
                "Upstream name resolutions.",
                &v.dns_resolutions,
            ),
            (
                "ringway_upstream_dns_failures_total",
                "Upstream name resolutions that failed (the last addresses are kept).",
                &v.dns_failures,
            ),
            (
                "ringway_upstream_health_checks_total",
                "Active health check probes run.",
                &v.health_checks,
            ),
        ];
        for (name, help, c) in counters {
            family(out, name, "counter", help);
            line(out, name, "", c.load(Relaxed));
        }
    }

    fn figures(&self, index: u32) -> EndpointFigures {
        use ringway_core::balance::registry::FailKind;
        let r = &self.registry;
        let mut f = EndpointFigures::default();
        for (c, o) in f.responses.iter_mut().enumerate() {
            *o = r.sum(index, |l| l.responses(c));
        }
        for (k, o) in FailKind::ALL.iter().zip(f.failures.iter_mut()) {
            *o = r.sum(index, |l| l.failures(*k));
        }
        f.inflight = r.sum(index, |l| u64::from(l.inflight()));
        f.ejections = r.ejections_total(index);
        let now = r.now_ms();
        let (healthy, down) = r.health_at(index, now);
        f.healthy = u64::from(healthy);
        f.down = u64::from(down);
        f
    }

    fn render_endpoints(&self, out: &mut String) {
        use ringway_core::balance::registry::FailKind;
        let eps = self
            .view
            .endpoints
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut rows: Vec<(String, EndpointFigures)> = Vec::new();
        let mut other = EndpointFigures::default();
        for (n, (i, a)) in eps.iter().enumerate() {
            let f = self.figures(*i);
            if n < ENDPOINT_SERIES_MAX {
                rows.push((a.to_string(), f));
            } else {
                add_figures(&mut other, &f);
            }
        }
        if eps.len() > ENDPOINT_SERIES_MAX {
            rows.push(("_other".into(), other));
        }
        let name = "ringway_upstream_responses_total";
        family(
            out,
            name,
            "counter",
            "Responses from each upstream endpoint, by status class.",
        );
        for (ep, f) in &rows {
            for (c, n) in CLASSES.iter().zip(f.responses) {
                line(out, name, &format!("endpoint=\"{ep}\",class=\"{c}\""), n);
            }
        }
        let name = "ringway_upstream_failures_total";
        family(
            out,
            name,
            "counter",
            "Failed attempts on each upstream endpoint, by kind.",
        );
        for (ep, f) in &rows {
            for (k, n) in FailKind::ALL.iter().zip(f.failures) {
                line(
                    out,
                    name,
                    &format!("endpoint=\"{ep}\",kind=\"{}\"", k.name()),
                    n,
                );
            }
        }
        let gauges: [(&str, &str, EndpointGetter); 3] = [
            (
                "ringway_upstream_in_flight",
                "Requests in flight to each endpoint (all workers).",
                |f| f.inflight,
            ),
            (
                "ringway_upstream_healthy",
                "1 if the endpoint takes requests (not ejected, not checked down).",
                |f| f.healthy,
            ),
            (
                "ringway_upstream_checked_down",
                "1 if the endpoint's active health check says down.",
                |f| f.down,
            ),
        ];
        for (name, help, get) in gauges {
            family(out, name, "gauge", help);
            for (ep, f) in &rows {
                line(out, name, &format!("endpoint=\"{ep}\""), get(f));
            }
        }
        let name = "ringway_upstream_ejections_total";
        family(
            out,
            name,
            "counter",
            "Passive outlier ejections of each endpoint.",
        );
        for (ep, f) in &rows {
            line(out, name, &format!("endpoint=\"{ep}\""), f.ejections);
        }
    }

    fn render_routes(&self, out: &mut String) {
        use ringway_core::balance::registry::FailKind;
        use ringway_core::balance::stats::ROUTE_LATENCY_BUCKETS_MS;
        let mut routes = self
            .view
            .routes
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        routes.insert(0, (0, "_other".into()));
        let rows: Vec<_> = routes
            .iter()
            .map(|(i, n)| (escape(n), self.route_stats.totals(*i)))
            .collect();
        let name = "ringway_route_responses_total";
        family(
            out,
            name,
            "counter",
            "Responses of each route, by status class (routes past balancer.route_series_max count as _other).",
        );
        for (r, t) in &rows {
            for (c, n) in CLASSES.iter().zip(t.classes) {
                line(out, name, &format!("route=\"{r}\",class=\"{c}\""), n);
            }
        }
        let name = "ringway_route_failures_total";
        family(
            out,
            name,
            "counter",
            "Failed upstream attempts of each route, by kind.",
        );
        for (r, t) in &rows {
            for (k, n) in FailKind::ALL.iter().zip(t.failures) {
                line(
                    out,
                    name,
                    &format!("route=\"{r}\",kind=\"{}\"", k.name()),
                    n,
                );
            }
        }
        let singles: [(&str, &str, &str, RouteGetter); 4] = [
            (
                "ringway_route_unavailable_total",
                "counter",
                "Requests answered 503 because no endpoint could take them.",
                |t| t.unavailable,
            ),
            (
                "ringway_route_retries_total",
                "counter",
                "Attempts retried on another endpoint.",
                |t| t.retries,
            ),
            (
                "ringway_route_retries_refused_total",
                "counter",
                "Retries the retry budget refused.",
                |t| t.retries_refused,
            ),
            (
                "ringway_route_in_flight",
                "gauge",
                "Requests of each route in flight upstream.",
                |t| t.inflight,
            ),
        ];
        for (name, kind, help, get) in singles {
            family(out, name, kind, help);
            for (r, t) in &rows {
                line(out, name, &format!("route=\"{r}\""), get(t));
            }
        }
        let name = "ringway_route_response_seconds";
        family(
            out,
            name,
            "histogram",
            "Time to each route's upstream response head.",
        );
        for (r, t) in &rows {
            let mut cum = 0;
            for (b, le) in ROUTE_LATENCY_BUCKETS_MS.iter().enumerate() {
                cum += t.latency[b];
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{r}\",le=\"{}\"}} {cum}",
                    *le as f64 / 1e3
                );
            }
            cum += t.latency[ROUTE_LATENCY_BUCKETS_MS.len()];
            let _ = writeln!(out, "{name}_bucket{{route=\"{r}\",le=\"+Inf\"}} {cum}");
            let _ = writeln!(
                out,
                "{name}_sum{{route=\"{r}\"}} {}",
                t.latency_sum_us as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{{route=\"{r}\"}} {cum}");
        }
    }
}

type EndpointGetter = fn(&EndpointFigures) -> u64;
type RouteGetter = fn(&ringway_core::balance::stats::RouteTotals) -> u64;

fn add_figures(o: &mut EndpointFigures, f: &EndpointFigures) {
    for (a, b) in o.responses.iter_mut().zip(f.responses) {
        *a += b;
    }
    for (a, b) in o.failures.iter_mut().zip(f.failures) {
        *a += b;
    }
    o.inflight += f.inflight;
    o.ejections += f.ejections;
    o.healthy += f.healthy;
    o.down += f.down;
}

use std::fmt::Write as _;

fn line(out: &mut String, name: &str, labels: &str, v: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {v}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// A label value as the exposition format wants it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringway_core::balance::spec::UpstreamSpec;

    fn set(weight: u32) -> RouteSet {
        let mut spec = ClusterSpec::of_addrs(&["10.0.0.1:80".parse().unwrap()]);
        let mut ups: Vec<UpstreamSpec> = spec.upstreams.to_vec();
        ups.push(UpstreamSpec {
            weight,
            ..UpstreamSpec::new("10.0.0.2:80".parse().unwrap())
        });
        spec.upstreams = ups.into();
        let route = Arc::new(Route {
            name: "app".into(),
            project_id: 1,
            environment_id: 1,
            deployment_id: 1,
            cluster: Arc::new(Cluster::unbound(spec)),
            body_bytes_max: None,
            redirect_https: false,
            hsts: None,
        });
        let mut s = RouteSet::default();
        s.hosts.insert("a.test".into(), route.clone());
        s.hosts.insert("b.test".into(), route);
        s
    }

    #[test]
    fn unchanged_routes_keep_their_cluster_and_changed_ones_get_a_new_one() {
        let limits = BalanceLimits {
            endpoints_max: 64,
            route_series_max: 8,
            dns_refresh: Duration::from_secs(30),
        };
        let mut b = Binder::new(limits, 2, Resolver::default());
        let first = b.bind_set(&set(1));
        let again = b.bind_set(&set(1));
        let (c1, c2) = (
            &first.hosts["a.test"].cluster,
            &again.hosts["a.test"].cluster,
        );
        assert!(
            Arc::ptr_eq(c1, c2),
            "a reload that changes nothing rebuilds nothing"
        );
        assert!(
            Arc::ptr_eq(c1, &again.hosts["b.test"].cluster),
            "patterns share their route"
        );
        assert!(c1.members().iter().all(|m| m.endpoint.tracked()));
        let changed = b.bind_set(&set(3));
        let c3 = &changed.hosts["a.test"].cluster;
        assert!(!Arc::ptr_eq(c1, c3));
        assert_eq!(c3.members()[1].weight, 3);
        assert_eq!(
            c3.members()[0].endpoint,
            c1.members()[0].endpoint,
            "same address, same slot"
        );
    }
}
