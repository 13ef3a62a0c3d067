//! A route's endpoints as the workers choose among them.
//!
//! A [`Cluster`] is built on the control thread from a [`ClusterSpec`] and the addresses its
//! names resolved to, and published inside the route; it is immutable but for per-worker
//! cursors and retry budgets (one cache line per worker, one writer each). A choice reads the
//! shared health of the endpoints it looks at and this worker's load; it takes no lock and
//! allocates nothing.

use super::hash::{MAGLEV_SIZE, maglev, mix, smooth_schedule, stable_hash};
use super::registry::{EndpointRef, Registry};
use super::spec::{AdminState, ClusterSpec, Strategy};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Maglev entries a hash choice probes past unusable endpoints before scanning the members.
const MAGLEV_PROBES_MAX: usize = 64;

/// Draws from the static weights before a weighted choice scans every member.
const PICK_DRAWS_MAX: usize = 4;

/// Decorrelates the second draw of power of two choices from the first.
const SECOND_DRAW_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

/// One endpoint of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addr: SocketAddr,
    pub endpoint: EndpointRef,
    pub weight: u32,
    pub state: AdminState,
    /// What the sticky cookie names this member by (a hash of its address: stable across
    /// nodes and restarts, and not the address itself).
    pub sticky_id: u64,
}

impl Member {
    pub fn new(addr: SocketAddr, endpoint: EndpointRef, weight: u32, state: AdminState) -> Self {
        Self {
            addr,
            endpoint,
            weight,
            state,
            sticky_id: stable_hash(addr.to_string().as_bytes()),
        }
    }
}

/// One worker's mutable view of a cluster, on its own cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
struct WorkerSlot {
    cursor: AtomicU32,
    window: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
    prev_requests: AtomicU32,
    prev_retries: AtomicU32,
}

/// What a choice is asked with.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub worker: usize,
    pub now_ms: u64,
    /// Fresh random bits.
    pub rand: u64,
    /// A sequence number of the worker (round robin when the cluster has no worker slots).
    pub seq: u64,
    /// The hash of the request's key (hash strategy).
    pub key: u64,
    /// The endpoint the sticky cookie names.
    pub sticky: Option<u64>,
    /// Endpoints this request already failed on, by [`Member::sticky_id`] (8 bytes each
    /// rather than an address's 32: the exchange keeps them across its attempts).
    pub tried: &'a [u64],
}

/// Why no endpoint was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No endpoint takes requests: all draining or disabled, or names unresolved.
    NoEndpoints,
    /// Every endpoint is ejected or checked down (and the panic threshold is 0).
    AllDown,
    /// The request already tried every endpoint it could.
    AllTried,
}

impl Unavailable {
    pub fn reason(self) -> &'static str {
        match self {
            Unavailable::NoEndpoints => "no_endpoint",
            Unavailable::AllDown => "no_healthy_endpoint",
            Unavailable::AllTried => "all_endpoints_tried",
        }
    }
}

/// An endpoint chosen for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen {
    pub addr: SocketAddr,
    pub endpoint: EndpointRef,
    /// The response should set the sticky cookie to this (the client's cookie named none, or
    /// an endpoint that no longer takes requests).
    pub set_sticky: bool,
    /// The member's [`Member::sticky_id`] (what the cookie names; what `Ask::tried` lists).
    pub id: u64,
    /// Chosen with health ignored (too few healthy endpoints).
    pub panic: bool,
    /// Every usable endpoint is at its connection limit: this one is the least queued.
    pub saturated: bool,
}

/// A route's endpoints, strategy and per-worker state.
#[derive(Debug)]
pub struct Cluster {
    pub spec: Arc<ClusterSpec>,
    members: Box<[Member]>,
    /// Smooth weighted round-robin order over the active members.
    schedule: Box<[u8]>,
    /// Maglev table over the active members (hash strategy only).
    table: Box<[u8]>,
    /// Running sums of the members' weights (0 for members not active): weighted draws.
    cumulative: Box<[u32]>,
    slots: Box<[WorkerSlot]>,
    /// The route's statistics slot.
    pub stats: u32,
    /// Upstream names that resolved to nothing (yet).
    pub unresolved: u16,
}

impl PartialEq for Cluster {
    /// Same endpoints and settings (the per-worker state does not count): a reload that
    /// changes nothing leaves the published route, and its cursors and budgets, alone.
    fn eq(&self, o: &Self) -> bool {
        self.spec == o.spec
            && self.members == o.members
            && self.stats == o.stats
            && self.unresolved == o.unresolved
    }
}
impl Eq for Cluster {}

/// The route statistics slot of routes past the series cap (and of unbound clusters).
pub const STATS_OVERFLOW: u32 = 0;

impl Cluster {
    /// A cluster over `members` (at most `MEMBERS_MAX`) with state for `workers` workers.
    pub fn build(
        spec: Arc<ClusterSpec>,
        mut members: Vec<Member>,
        workers: usize,
        stats: u32,
        unresolved: u16,
    ) -> Self {
        members.retain(|m| m.state != AdminState::Disabled);
        members.truncate(super::spec::MEMBERS_MAX);
        let active: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].state == AdminState::Active)
            .collect();
        let weights: Vec<u32> = active.iter().map(|&i| members[i].weight).collect();
        let schedule = smooth_schedule(&weights)
            .iter()
            .map(|&k| active[k as usize] as u8)
            .collect();
        let table: Box<[u8]> = if matches!(spec.strategy, Strategy::Hash(_)) && !active.is_empty() {
            let names: Vec<String> = active
                .iter()
                .map(|&i| members[i].addr.to_string())
                .collect();
            let refs: Vec<&[u8]> = names.iter().map(|s| s.as_bytes()).collect();
            maglev(&refs, &weights)
                .iter()
                .map(|&k| active[k as usize] as u8)
                .collect()
        } else {
            Box::new([])
        };
        let slots: Box<[WorkerSlot]> = if members.len() > 1 {
            (0..workers).map(|_| WorkerSlot::default()).collect()
        } else {
            Box::new([])
        };
        let mut sum = 0u32;
        let cumulative = members
            .iter()
            .map(|m| {
                if m.state == AdminState::Active {
                    sum = sum.saturating_add(m.weight);
                }
                sum
            })
            .collect();
        Self {
            spec,
            members: members.into(),
            schedule,
            table,
            cumulative,
            slots,
            stats,
            unresolved,
        }
    }

    /// The literal addresses of `spec`, untracked (what a store hands the control thread,
    /// which binds names and endpoint slots before the workers see it).
    pub fn unbound(spec: ClusterSpec) -> Self {
        let members = spec
            .upstreams
            .iter()
            .filter_map(|u| match u.addr {
                super::spec::UpstreamAddr::Socket(a) => {
                    Some(Member::new(a, EndpointRef::UNTRACKED, u.weight, u.state))
                }
                super::spec::UpstreamAddr::Name { .. } => None,
            })
            .collect();
        Self::build(Arc::new(spec), members, 0, STATS_OVERFLOW, 0)
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member serving `addr`.
    pub fn member(&self, addr: SocketAddr) -> Option<&Member> {
        self.members.iter().find(|m| m.addr == addr)
    }

    /// Chooses an endpoint for a request.
    pub fn choose(&self, reg: &Registry, ask: &Ask<'_>) -> Result<Chosen, Unavailable> {
        let judge = Judge {
            c: self,
            reg,
            ask,
            panic: Cell::new(None),
            saturated: Cell::new(None),
        };
        if let Some(id) = ask.sticky
            && let Some(i) = self.members.iter().position(|m| m.sticky_id == id)
            && judge.accept(i)
        {
            return Ok(judge.chosen(i, false));
        }
        let picked = match &self.spec.strategy {
            Strategy::RoundRobin => self.round_robin(&judge),
            Strategy::LeastConnections => self.least_loaded(&judge, false),
            Strategy::PowerOfTwo => self.two_choices(&judge),
            Strategy::Random => self.weighted_random(&judge),
            Strategy::Hash(_) => self.hashed(&judge),
        };
        let picked = picked.or_else(|| judge.scan(ask.rand as usize));
        let sticky = self.spec.sticky.is_some();
        match picked {
            Some(i) => Ok(judge.chosen(i, sticky)),
            None => match judge.saturated.get() {
                Some(i) => Ok(Chosen {
                    saturated: true,
                    ..judge.chosen(i, sticky)
                }),
                None => Err(judge.why()),
            },
        }
    }

    fn slot(&self, worker: usize) -> Option<&WorkerSlot> {
        self.slots.get(worker)
    }

    fn round_robin(&self, j: &Judge<'_>) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = match self.slot(j.ask.worker) {
            Some(s) => s.cursor.load(Relaxed) as usize,
            None => j.ask.seq as usize,
        };
        let mut bits = j.ask.rand;
        for k in 0..len {
            let i = self.schedule[(start + k) % len] as usize;
            bits = bits.rotate_left(10);
            if j.accept(i) && (bits % 1000) < u64::from(j.ramp(i)) {
                if let Some(s) = self.slot(j.ask.worker) {
                    s.cursor.store(((start + k + 1) % len) as u32, Relaxed);
                }
                return Some(i);
            }
        }
        None
    }

    /// The member with the least `(in flight + 1) × cost / weight`; `ewma`: cost is the
    /// latency EWMA, else 1. Ties go to the first from a random start.
    fn least_loaded(&self, j: &Judge<'_>, ewma: bool) -> Option<usize> {
        let n = self.members.len();
        let start = j.ask.rand as usize;
        let mut best: Option<(u128, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !j.accept(i) {
                continue;
            }
            let s = j.score(i, ewma);
            if best.is_none_or(|(b, _)| s < b) {
                best = Some((s, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Two distinct candidates drawn by weight; the less loaded (in-flight times latency)
    /// wins.
    fn two_choices(&self, j: &Judge<'_>) -> Option<usize> {
        let a = self.weighted_pick(j, j.ask.rand, None)?;
        let Some(b) = self.weighted_pick(j, j.ask.rand.rotate_left(29) ^ SECOND_DRAW_SALT, Some(a))
        else {
            return Some(a);
        };
        // The second must be clearly better (by a quarter): latencies that differ by noise
        // tie, so an idle route follows the weights of the first draw.
        Some(if j.score(b, true) * 5 < j.score(a, true) * 4 {
            b
        } else {
            a
        })
    }

    fn weighted_random(&self, j: &Judge<'_>) -> Option<usize> {
        self.weighted_pick(j, j.ask.rand, None)
    }

    /// An acceptable member other than `skip`, drawn with `rand` in proportion to weight
    /// (scaled by slow start). A few draws from the static weights first, rejecting what is
    /// not acceptable (O(log n) when the route is healthy); then an exact scan.
    fn weighted_pick(&self, j: &Judge<'_>, rand: u64, skip: Option<usize>) -> Option<usize> {
        let total = u64::from(self.cumulative.last().copied().unwrap_or(0));
        if total > 0 {
            let mut bits = rand;
            for _ in 0..PICK_DRAWS_MAX {
                let r = (bits % total) as u32;
                bits = mix(bits);
                let i = self.cumulative.partition_point(|&c| c <= r);
                if Some(i) == skip || !j.accept(i) || (bits % 1000) as u32 >= j.ramp(i) {
                    continue;
                }
                return Some(i);
            }
        }
        self.weighted_scan(j, rand, skip)
    }

    fn weighted_scan(&self, j: &Judge<'_>, rand: u64, skip: Option<usize>) -> Option<usize> {
        let eligible = |i: &usize| Some(*i) != skip && j.accept(*i);
        let total: u64 = (0..self.members.len())
            .filter(eligible)
            .map(|i| j.weight(i))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = rand % total;
        for i in (0..self.members.len()).filter(eligible) {
            let w = j.weight(i);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    fn hashed(&self, j: &Judge<'_>) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let at = (j.ask.key % MAGLEV_SIZE as u64) as usize;
        (0..MAGLEV_PROBES_MAX)
            .map(|k| self.table[(at + k) % MAGLEV_SIZE] as usize)
            .find(|&i| j.accept(i))
    }

    /// Counts a request against the retry budget's window.
    pub fn note_request(&self, worker: usize, now_ms: u64) {
        if let Some(s) = self.slot(worker) {
            self.roll(s, now_ms);
            s.requests
                .store(s.requests.load(Relaxed).saturating_add(1), Relaxed);
        }
    }

    /// Whether the budget allows one more retry now (counted if so).
    pub fn allow_retry(&self, worker: usize, now_ms: u64) -> bool {
        let Some(s) = self.slot(worker) else {
            return false;
        };
        let r = &self.spec.retry;
        let frac = self.roll(s, now_ms);
        let keep = |prev: u32| u64::from(prev) * u64::from(1000 - frac) / 1000;
        let requests = u64::from(s.requests.load(Relaxed)) + keep(s.prev_requests.load(Relaxed));
        let retries = u64::from(s.retries.load(Relaxed)) + keep(s.prev_retries.load(Relaxed));
        let allowed = u64::from(r.budget_min) + requests * u64::from(r.budget_pct) / 100;
        if retries >= allowed {
            return false;
        }
        s.retries
            .store(s.retries.load(Relaxed).saturating_add(1), Relaxed);
        true
    }

    /// Moves the budget to the window of `now_ms`; how far into it we are, per mille.
    fn roll(&self, s: &WorkerSlot, now_ms: u64) -> u32 {
        let len = u64::from(self.spec.retry.budget_window_ms.max(1));
        let win = now_ms / len;
        let at = s.window.load(Relaxed);
        if win != at {
            let (pr, pt) = if win == at + 1 {
                (s.requests.load(Relaxed), s.retries.load(Relaxed))
            } else {
                (0, 0)
            };
            s.prev_requests.store(pr, Relaxed);
            s.prev_retries.store(pt, Relaxed);
            s.requests.store(0, Relaxed);
            s.retries.store(0, Relaxed);
            s.window.store(win, Relaxed);
        }
        ((now_ms % len) * 1000 / len) as u32
    }

    /// Ejects `e` if that keeps the route within its maximum ejected share. Workers decide
    /// this at the same time: after its own ejection each looks again, and takes it back if
    /// others' made the share too large (both may take theirs back; the next failures
    /// eject again, one at a time).
    pub fn eject(&self, reg: &Registry, e: EndpointRef, now_ms: u64) -> bool {
        let o = &self.spec.outlier;
        if !self.may_eject(reg, e, now_ms) || !reg.eject(e, o, now_ms) {
            return false;
        }
        if self.may_eject(reg, e, now_ms) {
            return true;
        }
        reg.uneject(e, now_ms);
        false
    }

    /// Whether ejecting `e` keeps the route within its maximum ejected share (one endpoint
    /// may always be ejected).
    pub fn may_eject(&self, reg: &Registry, e: EndpointRef, now_ms: u64) -> bool {
        let counted = self
            .members
            .iter()
            .filter(|m| m.state == AdminState::Active);
        let (mut n, mut ejected) = (0u64, 0u64);
        for m in counted {
            n += 1;
            if m.endpoint != e && reg.ejected(m.endpoint, now_ms) {
                ejected += 1;
            }
        }
        ejected == 0 || (ejected + 1) * 100 <= u64::from(self.spec.outlier.max_ejected_pct) * n
    }
}

/// One choice's view: which members may take the request.
struct Judge<'a> {
    c: &'a Cluster,
    reg: &'a Registry,
    ask: &'a Ask<'a>,
    /// Too few healthy endpoints: health ignored. Decided the first time an unhealthy
    /// endpoint is met, so a choice that meets none never counts.
    panic: Cell<Option<bool>>,
    /// A usable endpoint at its connection limit (the least queued).
    saturated: Cell<Option<usize>>,
}

impl Judge<'_> {
    fn member(&self, i: usize) -> &Member {
        &self.c.members[i]
    }

    fn open(&self, i: usize) -> bool {
        let m = self.member(i);
        m.state == AdminState::Active && !self.ask.tried.contains(&m.sticky_id)
    }

    fn accept(&self, i: usize) -> bool {
        if !self.open(i) {
            return false;
        }
        let m = self.member(i);
        if !self.reg.healthy(m.endpoint, self.ask.now_ms) && !self.panicking() {
            return false;
        }
        let limit = self.c.spec.limits.connections_max;
        if limit > 0
            && let Some(l) = self.reg.load(self.ask.worker, m.endpoint)
            && l.inflight() >= limit
        {
            let queued = |k: usize| {
                self.reg
                    .load(self.ask.worker, self.member(k).endpoint)
                    .map_or(0, |l| l.pending())
            };
            if self.saturated.get().is_none_or(|s| queued(i) < queued(s)) {
                self.saturated.set(Some(i));
            }
            return false;
        }
        true
    }

    fn panicking(&self) -> bool {
        if let Some(p) = self.panic.get() {
            return p;
        }
        let pct = u64::from(self.c.spec.panic_threshold_pct);
        let (mut active, mut healthy) = (0u64, 0u64);
        for m in self
            .c
            .members
            .iter()
            .filter(|m| m.state == AdminState::Active)
        {
            active += 1;
            healthy += u64::from(self.reg.healthy(m.endpoint, self.ask.now_ms));
        }
        let p = pct > 0 && healthy * 100 < pct * active;
        self.panic.set(Some(p));
        p
    }

    fn ramp(&self, i: usize) -> u32 {
        self.reg.ramp_permille(
            self.member(i).endpoint,
            self.ask.now_ms,
            self.c.spec.slow_start_ms,
        )
    }

    /// Weight scaled by slow start (per mille of the configured weight).
    fn weight(&self, i: usize) -> u64 {
        u64::from(self.member(i).weight) * u64::from(self.ramp(i))
    }

    /// Lower is better. Least connections: in-flight requests per unit of weight. Power of
    /// two choices (`ewma`): in-flight requests times latency, as the draw already weighed.
    fn score(&self, i: usize, ewma: bool) -> u128 {
        let e = self.member(i).endpoint;
        let load = u128::from(self.reg.inflight(e)) + 1;
        if ewma {
            let now_s = (self.ask.now_ms / 1000) as u32;
            let l = self
                .reg
                .load(self.ask.worker, e)
                .map_or(0, |l| l.ewma_us(now_s));
            load * u128::from(l.max(1))
        } else {
            load * 1_000_000 / u128::from(self.weight(i).max(1))
        }
    }

    /// Any acceptable member, from `start`.
    fn scan(&self, start: usize) -> Option<usize> {
        let n = self.c.members.len();
        (0..n).map(|k| (start + k) % n).find(|&i| self.accept(i))
    }

    fn chosen(&self, i: usize, sticky: bool) -> Chosen {
        let m = self.member(i);
        let healthy = self.reg.healthy(m.endpoint, self.ask.now_ms);
        Chosen {
            addr: m.addr,
            endpoint: m.endpoint,
            set_sticky: sticky && self.ask.sticky != Some(m.sticky_id),
            id: m.sticky_id,
            panic: !healthy,
            saturated: false,
        }
    }

    fn why(&self) -> Unavailable {
        let n = self.c.members.len();
        if !(0..n).any(|i| self.member(i).state == AdminState::Active) {
            Unavailable::NoEndpoints
        } else if !(0..n).any(|i| self.open(i)) {
            Unavailable::AllTried
        } else {
            Unavailable::AllDown
        }
    }
}

#[cfg(test)]
mod tests;
