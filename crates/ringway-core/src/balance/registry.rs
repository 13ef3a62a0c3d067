//! Endpoints and what every worker knows about them.
//!
//! An endpoint (one upstream address) has a fixed slot, allocated by the control thread and
//! referred to by index and generation. Its health is a handful of atomics in [`Health`],
//! written by the control thread (active checks) and by any worker (passive failures: rare,
//! the success path writes only when a failure streak was running). Its load is per worker
//! ([`EndpointLoad`], one writer each: a load and a store, never a shared read-modify-write);
//! readers sum across workers. Slots of endpoints no route names any more are reused only
//! after a quarantine longer than any request, so a late report lands on the right endpoint
//! or, after reuse, is discarded by its generation.

use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use super::spec::Outlier;
use crate::stats::Counter;

/// Endpoint slots when the configuration does not say (`balancer.endpoints_max`).
pub const ENDPOINTS_DEFAULT: usize = 16_384;
/// An endpoint past the registry's capacity: routed, but neither tracked nor ejected.
pub const UNTRACKED: u32 = u32::MAX;
/// A slot no route names is reused after this long (longer than any request or tunnel that
/// could still report on it is likely to live; a later report is dropped by generation).
pub const SLOT_QUARANTINE_MS: u64 = 10 * 60 * 1_000;
/// Latency samples older than this no longer describe an endpoint (P2C forgets them, so an
/// endpoint that was slow once is probed again).
pub const EWMA_STALE_S: u32 = 10;
/// Weight of a new latency sample in the EWMA, as a shift (1/8).
const EWMA_SHIFT: u32 = 3;

/// Where an endpoint's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointRef {
    pub index: u32,
    pub generation: u32,
}

impl EndpointRef {
    pub const UNTRACKED: Self = Self {
        index: UNTRACKED,
        generation: 0,
    };

    pub fn tracked(self) -> bool {
        self.index != UNTRACKED
    }
}

/// An active check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Checked {
    /// No check runs, or none has concluded yet: usable.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// Shared health of one endpoint. Aligned so two endpoints never share a cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Health {
    generation: AtomicU32,
    checked: AtomicU8,
    /// A route drains or disables this address: pooled connections are closed.
    no_pool: AtomicBool,
    /// Consecutive failures seen by any worker.
    failures: AtomicU32,
    /// Ejections in a row (each close after the last ends): the multiplier of the next.
    streak: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Length of the last ejection; the same time after it ends is its probation.
    last_ejection_ms: AtomicU64,
    /// When an active check last marked it up (the start of its slow start).
    up_since_ms: AtomicU64,
    ejections_total: AtomicU64,
}

/// Why a response or a failure is counted against an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FailKind {
    ConnectRefused = 0,
    ConnectTimeout = 1,
    Timeout = 2,
    Reset = 3,
    Protocol = 4,
    Status = 5,
}

pub const FAIL_KINDS: usize = 6;

impl FailKind {
    pub const ALL: [FailKind; FAIL_KINDS] = [
        FailKind::ConnectRefused,
        FailKind::ConnectTimeout,
        FailKind::Timeout,
        FailKind::Reset,
        FailKind::Protocol,
        FailKind::Status,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailKind::ConnectRefused => "connect_refused",
            FailKind::ConnectTimeout => "connect_timeout",
            FailKind::Timeout => "timeout",
            FailKind::Reset => "reset",
            FailKind::Protocol => "protocol",
            FailKind::Status => "status",
        }
    }
}

/// One worker's load on one endpoint; written by that worker only.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    inflight: AtomicU32,
    pending: AtomicU32,
    ewma_us: AtomicU32,
    ewma_at_s: AtomicU32,
    /// Responses by class (1xx..5xx).
    responses: [Counter; 5],
    failures: [Counter; FAIL_KINDS],
}

impl EndpointLoad {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Relaxed)
    }
    pub fn pending(&self) -> u32 {
        self.pending.load(Relaxed)
    }
    pub fn responses(&self, class: usize) -> u64 {
        self.responses.get(class).map_or(0, Counter::get)
    }
    pub fn failures(&self, kind: FailKind) -> u64 {
        self.failures[kind as usize].get()
    }
    /// Latency EWMA in microseconds, 0 if unknown or stale.
    pub fn ewma_us(&self, now_s: u32) -> u32 {
        let at = self.ewma_at_s.load(Relaxed);
        if now_s.saturating_sub(at) > EWMA_STALE_S {
            return 0;
        }
        self.ewma_us.load(Relaxed)
    }
    fn add_pending(&self, d: i32) {
        let v = self.pending.load(Relaxed).saturating_add_signed(d);
        self.pending.store(v, Relaxed);
    }
}

/// Every endpoint's health and load.
#[derive(Debug)]
pub struct Registry {
    epoch: Instant,
    health: Box<[Health]>,
    /// `[worker][endpoint]`: each worker writes one contiguous row.
    loads: Box<[Box<[EndpointLoad]>]>,
}

impl Default for Registry {
    /// A small registry for tests; the proxy sizes its own from the configuration.
    fn default() -> Self {
        Self::new(256, 16)
    }
}

impl Registry {
    pub fn new(capacity: usize, workers: usize) -> Self {
        let row = || (0..capacity).map(|_| EndpointLoad::default()).collect();
        Self {
            epoch: Instant::now(),
            health: (0..capacity).map(|_| Health::default()).collect(),
            loads: (0..workers.max(1)).map(|_| row()).collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.health.len()
    }

    /// Milliseconds since the registry was made (the clock every deadline here uses).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn ms_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn health_of(&self, e: EndpointRef) -> Option<&Health> {
        let h = self.health.get(e.index as usize)?;
        (h.generation.load(Relaxed) == e.generation).then_some(h)
    }

    /// This worker's load on `e` (None: untracked).
    pub fn load(&self, worker: usize, e: EndpointRef) -> Option<&EndpointLoad> {
        self.loads.get(worker)?.get(e.index as usize)
    }

    /// Requests in flight to `e` from all workers.
    pub fn inflight(&self, e: EndpointRef) -> u32 {
        let i = e.index as usize;
        self.loads
            .iter()
            .filter_map(|row| row.get(i))
            .map(EndpointLoad::inflight)
            .sum()
    }

    /// Sums one counter of endpoint `index` over the workers.
    pub fn sum(&self, index: u32, f: impl Fn(&EndpointLoad) -> u64) -> u64 {
        self.loads
            .iter()
            .filter_map(|row| row.get(index as usize))
            .map(f)
            .sum()
    }

    /// Whether `e` takes requests now (not ejected, not checked down). Untracked: always.
    #[inline]
    pub fn healthy(&self, e: EndpointRef, now_ms: u64) -> bool {
        match self.health_of(e) {
            Some(h) => {
                h.checked.load(Relaxed) != Checked::Down as u8
                    && h.ejected_until_ms.load(Relaxed) <= now_ms
            }
            None => true,
        }
    }

    pub fn ejected(&self, e: EndpointRef, now_ms: u64) -> bool {
        self.health_of(e)
            .is_some_and(|h| h.ejected_until_ms.load(Relaxed) > now_ms)
    }

    /// Slot `index` as /metrics shows it: (takes requests, checked down).
    pub fn health_at(&self, index: u32, now_ms: u64) -> (bool, bool) {
        match self.health.get(index as usize) {
            Some(h) => {
                let down = h.checked.load(Relaxed) == Checked::Down as u8;
                (!down && h.ejected_until_ms.load(Relaxed) <= now_ms, down)
            }
            None => (false, false),
        }
    }

    pub fn ejections_total(&self, index: u32) -> u64 {
        self.health
            .get(index as usize)
            .map_or(0, |h| h.ejections_total.load(Relaxed))
    }

    /// Share of full weight (per mille, 100..=1000) during slow start: linear from 10% since
    /// the endpoint last came back (ejection ended or check passed).
    pub fn ramp_permille(&self, e: EndpointRef, now_ms: u64, slow_start_ms: u32) -> u32 {
        if slow_start_ms == 0 {
            return 1000;
        }
        let Some(h) = self.health_of(e) else {
            return 1000;
        };
        let back = h
            .ejected_until_ms
            .load(Relaxed)
            .max(h.up_since_ms.load(Relaxed));
        if back == 0 {
            return 1000;
        }
        let since = now_ms.saturating_sub(back);
        let p = 100 + since.saturating_mul(900) / u64::from(slow_start_ms);
        p.min(1000) as u32
    }

    /// Whether pooled connections to `e` may be kept.
    pub fn pooling(&self, e: EndpointRef) -> bool {
        self.health_of(e).is_none_or(|h| !h.no_pool.load(Relaxed))
    }

    /// A request to `e` starts on `worker`.
    pub fn begin(&self, worker: usize, e: EndpointRef) {
        if let Some(l) = self.load(worker, e) {
            l.inflight
                .store(l.inflight.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }

    /// A request to `e` from `worker` ended (matches a [`Registry::begin`]).
    pub fn end(&self, worker: usize, e: EndpointRef) {
        if let Some(l) = self.load(worker, e) {
            l.inflight
                .store(l.inflight.load(Relaxed).saturating_sub(1), Relaxed);
        }
    }

    /// A request waits for (`+1`) or stops waiting for (`-1`) a connection to `e`.
    pub fn pending(&self, worker: usize, e: EndpointRef, d: i32) {
        if let Some(l) = self.load(worker, e) {
            l.add_pending(d);
        }
    }

    /// `e` answered (status class `class`, 1..=5) after `latency_us`: the failure streak ends.
    /// `now_ms`: when the response came (the caller has the instant: no clock read here).
    pub fn success(&self, worker: usize, e: EndpointRef, class: u8, latency_us: u64, now_ms: u64) {
        if let Some(l) = self.load(worker, e) {
            if let Some(a) = l.responses.get(usize::from(class).wrapping_sub(1)) {
                a.inc();
            }
            let sample = latency_us.min(u64::from(u32::MAX)) as u32;
            let now_s = (now_ms / 1000) as u32;
            let old = l.ewma_us(now_s);
            let new = if old == 0 {
                sample
            } else {
                let (o, s) = (i64::from(old), i64::from(sample));
                (o + ((s - o) >> EWMA_SHIFT)).max(1) as u32
            };
            l.ewma_us.store(new, Relaxed);
            l.ewma_at_s.store(now_s, Relaxed);
        }
        if let Some(h) = self.health_of(e)
            && h.failures.load(Relaxed) != 0
        {
            // Written only when a streak was running: the common path reads a shared line
            // and never makes another core's copy of it stale.
            h.failures.store(0, Relaxed);
        }
    }

    /// `e` failed. `true`: the failure streak reached the outlier threshold (the caller
    /// decides, with the route's view, whether to eject).
    pub fn failure(
        &self,
        worker: usize,
        e: EndpointRef,
        kind: FailKind,
        o: &Outlier,
        now_ms: u64,
    ) -> bool {
        if let Some(l) = self.load(worker, e) {
            l.failures[kind as usize].inc();
            if kind == FailKind::Status
                && let Some(a) = l.responses.get(4)
            {
                a.inc();
            }
        }
        if o.consecutive_failures == 0 {
            return false;
        }
        let Some(h) = self.health_of(e) else {
            return false;
        };
        let n = h.failures.fetch_add(1, Relaxed) + 1;
        let until = h.ejected_until_ms.load(Relaxed);
        let probation =
            until != 0 && now_ms < until.saturating_add(h.last_ejection_ms.load(Relaxed));
        n >= o.consecutive_failures || probation
    }

    /// Ejects `e` until `now + ejection`, the ejection growing with each one that follows
    /// soon after the last. `false`: it was already ejected (another worker won).
    pub fn eject(&self, e: EndpointRef, o: &Outlier, now_ms: u64) -> bool {
        let Some(h) = self.health_of(e) else {
            return false;
        };
        let until = h.ejected_until_ms.load(Relaxed);
        if until > now_ms {
            return false;
        }
        // Healthy for longer than the longest ejection since the last one: start over.
        let fresh = until == 0 || now_ms > until.saturating_add(u64::from(o.ejection_max_ms));
        let streak = if fresh {
            1
        } else {
            h.streak.load(Relaxed).saturating_add(1)
        };
        let len = u64::from(o.ejection_ms)
            .saturating_mul(1u64 << (streak - 1).min(20))
            .min(u64::from(o.ejection_max_ms));
        if h.ejected_until_ms
            .compare_exchange(until, now_ms + len, Relaxed, Relaxed)
            .is_err()
        {
            return false;
        }
        h.streak.store(streak, Relaxed);
        h.last_ejection_ms.store(len, Relaxed);
        h.failures.store(0, Relaxed);
        h.ejections_total.fetch_add(1, Relaxed);
        true
    }

    /// Takes back an ejection of `e` made at `now_ms` (the route's ejected share turned out
    /// too large).
    pub fn uneject(&self, e: EndpointRef, now_ms: u64) {
        if let Some(h) = self.health_of(e)
            && h.ejected_until_ms.load(Relaxed) > now_ms
        {
            h.ejected_until_ms.store(now_ms, Relaxed);
        }
    }

    /// The control thread's active check verdict on slot `index`.
    pub fn set_checked(&self, index: u32, verdict: Checked, now_ms: u64) {
        let Some(h) = self.health.get(index as usize) else {
            return;
        };
        let old = h.checked.swap(verdict as u8, Relaxed);
        if verdict == Checked::Up && old == Checked::Down as u8 {
            h.up_since_ms.store(now_ms, Relaxed);
            // The check saw it fail and recover: an ejection from the same outage ends now
            // (as Envoy's successful_active_health_check_uneject_host), its growth kept.
            if h.ejected_until_ms.load(Relaxed) > now_ms {
                h.ejected_until_ms.store(now_ms, Relaxed);
            }
        }
    }

    /// The control thread says whether a route drains this endpoint.
    pub fn set_no_pool(&self, index: u32, v: bool) {
        if let Some(h) = self.health.get(index as usize) {
            h.no_pool.store(v, Relaxed);
        }
    }

    /// Gives slot `index` to a new endpoint: fresh health, a new generation. Loads are left:
    /// in-flight counts of the old endpoint drain to zero by themselves.
    fn reset(&self, index: u32, generation: u32) {
        if let Some(h) = self.health.get(index as usize) {
            h.checked.store(Checked::Unknown as u8, Relaxed);
            h.no_pool.store(false, Relaxed);
            h.failures.store(0, Relaxed);
            h.streak.store(0, Relaxed);
            h.ejected_until_ms.store(0, Relaxed);
            h.last_ejection_ms.store(0, Relaxed);
            h.up_since_ms.store(0, Relaxed);
            h.ejections_total.store(0, Relaxed);
            h.generation.store(generation, Relaxed);
        }
    }
}

/// Fixed-capacity slots handed out by key, reused after a quarantine. The control thread owns
/// it; the data plane sees only the indices.
#[derive(Debug)]
pub struct Slots<K> {
    by_key: HashMap<K, u32, RandomState>,
    slots: Vec<Slot<K>>,
    free: Vec<u32>,
    capacity: usize,
}

#[derive(Debug)]
struct Slot<K> {
    key: Option<K>,
    generation: u32,
    /// When a sweep last found no one using it; None: in use.
    unused_since_ms: Option<u64>,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            by_key: HashMap::with_hasher(RandomState::default()),
            slots: Vec::new(),
            free: Vec::new(),
            capacity,
        }
    }

    /// The slot of `key`, assigned if new; None: full. `fresh`: the slot was just (re)assigned.
    pub fn assign(&mut self, key: &K) -> Option<(EndpointRef, bool)> {
        if let Some(&i) = self.by_key.get(key) {
            let s = &mut self.slots[i as usize];
            s.unused_since_ms = None;
            return Some((
                EndpointRef {
                    index: i,
                    generation: s.generation,
                },
                false,
            ));
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None if self.slots.len() < self.capacity => {
                self.slots.push(Slot {
                    key: None,
                    generation: 0,
                    unused_since_ms: None,
                });
                (self.slots.len() - 1) as u32
            }
            None => return None,
        };
        let s = &mut self.slots[i as usize];
        s.generation = s.generation.wrapping_add(1);
        s.key = Some(key.clone());
        s.unused_since_ms = None;
        self.by_key.insert(key.clone(), i);
        Some((
            EndpointRef {
                index: i,
                generation: s.generation,
            },
            true,
        ))
    }

    /// Slots in use, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &K)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i as u32, s.key.as_ref()?)))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Marks slots nobody in `used` names as unused, and frees those unused for longer than
    /// `quarantine_ms`. Returns the freed keys.
    pub fn sweep(&mut self, used: impl Fn(u32) -> bool, now_ms: u64, quarantine_ms: u64) -> Vec<K> {
        let mut freed = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(key) = &s.key else { continue };
            if used(i as u32) {
                s.unused_since_ms = None;
                continue;
            }
            let since = *s.unused_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= quarantine_ms {
                self.by_key.remove(key);
                freed.push(key.clone());
                s.key = None;
                s.unused_since_ms = None;
                self.free.push(i as u32);
            }
        }
        freed
    }
}

/// Assigns endpoint slots in a registry: a new or reused slot gets fresh health.
pub fn assign_endpoint<K: Hash + Eq + Clone>(
    slots: &mut Slots<K>,
    reg: &Registry,
    key: &K,
) -> EndpointRef {
    match slots.assign(key) {
        Some((e, fresh)) if (e.index as usize) < reg.capacity() => {
            if fresh {
                reg.reset(e.index, e.generation);
            }
            e
        }
        _ => EndpointRef::UNTRACKED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg_with(n: usize) -> (Registry, Slots<u32>, Vec<EndpointRef>) {
        let reg = Registry::new(n, 2);
        let mut slots = Slots::new(n);
        let eps = (0..n as u32)
            .map(|k| assign_endpoint(&mut slots, &reg, &k))
            .collect();
        (reg, slots, eps)
    }

    #[test]
    fn failures_eject_and_ejections_grow() {
        let (reg, _, eps) = reg_with(2);
        let e = eps[0];
        let o = Outlier {
            consecutive_failures: 3,
            ejection_ms: 1000,
            ejection_max_ms: 10_000,
            ..Outlier::default()
        };
        assert!(!reg.failure(0, e, FailKind::Reset, &o, 0));
        assert!(!reg.failure(1, e, FailKind::Reset, &o, 0));
        // A success anywhere ends the streak.
        reg.success(0, e, 2, 100, 0);
        assert!(!reg.failure(0, e, FailKind::Reset, &o, 0));
        assert!(!reg.failure(0, e, FailKind::Reset, &o, 0));
        assert!(reg.failure(1, e, FailKind::ConnectRefused, &o, 10));
        assert!(reg.eject(e, &o, 10));
        assert!(!reg.eject(e, &o, 11), "one ejection per streak");
        assert!(!reg.healthy(e, 500) && reg.healthy(e, 1010));
        assert!(reg.healthy(eps[1], 500));
        // Probation: one failure right after it comes back ejects again, for twice as long.
        assert!(reg.failure(0, e, FailKind::Reset, &o, 1020));
        assert!(reg.eject(e, &o, 1020));
        assert!(!reg.healthy(e, 3000) && reg.healthy(e, 3021));
        assert_eq!(reg.ejections_total(e.index), 2);
        // Long healthy: the next ejection is short again.
        for _ in 0..3 {
            reg.failure(0, e, FailKind::Reset, &o, 50_000);
        }
        assert!(reg.eject(e, &o, 50_000));
        assert!(reg.healthy(e, 51_000));
        assert_eq!(reg.sum(e.index, |l| l.failures(FailKind::Reset)), 8);
    }

    #[test]
    fn loads_are_per_worker_and_summed() {
        let (reg, _, eps) = reg_with(1);
        reg.begin(0, eps[0]);
        reg.begin(1, eps[0]);
        reg.begin(1, eps[0]);
        assert_eq!(reg.inflight(eps[0]), 3);
        reg.end(1, eps[0]);
        assert_eq!(reg.inflight(eps[0]), 2);
        reg.success(0, eps[0], 2, 1000, 0);
        reg.success(0, eps[0], 2, 9000, 0);
        let l = reg.load(0, eps[0]).unwrap();
        assert_eq!(l.ewma_us(0), 1000 + (8000 >> 3));
        assert_eq!(l.responses(1), 2);
        assert_eq!(reg.load(1, eps[0]).unwrap().ewma_us(0), 0);
        assert_eq!(
            l.ewma_us(EWMA_STALE_S + 1),
            0,
            "stale samples are forgotten"
        );
    }

    #[test]
    fn checks_and_slow_start() {
        let (reg, _, eps) = reg_with(1);
        let e = eps[0];
        assert_eq!(
            reg.ramp_permille(e, 5, 1000),
            1000,
            "never down: full weight"
        );
        reg.set_checked(e.index, Checked::Down, 100);
        assert!(!reg.healthy(e, 100));
        reg.set_checked(e.index, Checked::Up, 200);
        assert!(reg.healthy(e, 200));
        assert_eq!(reg.ramp_permille(e, 200, 1000), 100);
        assert_eq!(reg.ramp_permille(e, 700, 1000), 550);
        assert_eq!(reg.ramp_permille(e, 1200, 1000), 1000);
        // Ejected and checked down in one outage: the check's recovery ends the ejection.
        let o = Outlier {
            consecutive_failures: 1,
            ..Outlier::default()
        };
        assert!(reg.failure(0, e, FailKind::ConnectRefused, &o, 2_000));
        assert!(reg.eject(e, &o, 2_000));
        reg.set_checked(e.index, Checked::Down, 2_100);
        reg.set_checked(e.index, Checked::Up, 2_500);
        assert!(reg.healthy(e, 2_500), "unejected by the check");
        // A check that never saw it down leaves a passive ejection alone.
        assert!(reg.failure(0, e, FailKind::ConnectRefused, &o, 3_000) && reg.eject(e, &o, 3_000));
        reg.set_checked(e.index, Checked::Up, 3_100);
        assert!(!reg.healthy(e, 3_100));
    }

    #[test]
    fn slots_are_quarantined_then_reused_with_a_new_generation() {
        let reg = Registry::new(2, 1);
        let mut s: Slots<&str> = Slots::new(2);
        let a = assign_endpoint(&mut s, &reg, &"a");
        let b = assign_endpoint(&mut s, &reg, &"b");
        assert_eq!(assign_endpoint(&mut s, &reg, &"c"), EndpointRef::UNTRACKED);
        assert_eq!(assign_endpoint(&mut s, &reg, &"a"), a);
        let o = Outlier {
            consecutive_failures: 1,
            ..Outlier::default()
        };
        assert!(reg.failure(0, a, FailKind::Reset, &o, 0) && reg.eject(a, &o, 0));
        assert!(s.sweep(|i| i == b.index, 0, 100).is_empty());
        assert_eq!(s.sweep(|i| i == b.index, 100, 100), vec!["a"]);
        let c = assign_endpoint(&mut s, &reg, &"c");
        assert_eq!(c.index, a.index);
        assert_ne!(c.generation, a.generation);
        assert!(reg.healthy(c, 1), "the new endpoint starts healthy");
        // A late report about the old endpoint changes nothing.
        assert!(!reg.failure(0, a, FailKind::Reset, &o, 1));
        assert!(!reg.eject(a, &o, 1));
        assert!(reg.healthy(c, 1));
    }
}
