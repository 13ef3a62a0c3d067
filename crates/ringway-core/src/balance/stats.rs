//! Per-route counters for `/metrics`, with a cap on series.
//!
//! Routes get a slot when the control thread binds them, up to `balancer.route_series_max`;
//! slot 0 ([`super::cluster::STATS_OVERFLOW`]) counts every route past the cap, so a million
//! domains make a bounded /metrics. Each worker writes its own row (one writer per counter:
//! a load and a store); the scrape sums rows.

use super::registry::{FAIL_KINDS, FailKind};
use crate::stats::Counter;

/// Named route series when the configuration does not say.
pub const ROUTE_SERIES_DEFAULT: usize = 1_000;
/// Upper bounds of the per-route latency histogram, in milliseconds (then +Inf).
pub const ROUTE_LATENCY_BUCKETS_MS: [u64; 12] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 10_000];

/// One worker's counters for one route.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct RouteCounters {
    classes: [Counter; 5],
    failures: [Counter; FAIL_KINDS],
    unavailable: Counter,
    retries: Counter,
    retries_refused: Counter,
    inflight: Counter,
    latency: [Counter; ROUTE_LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_us: Counter,
}

/// A summed view of one route's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTotals {
    pub classes: [u64; 5],
    pub failures: [u64; FAIL_KINDS],
    pub unavailable: u64,
    pub retries: u64,
    pub retries_refused: u64,
    pub inflight: u64,
    pub latency: [u64; ROUTE_LATENCY_BUCKETS_MS.len() + 1],
    pub latency_sum_us: u64,
}

/// What a route's counters record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteEvent {
    /// A response relayed or answered: status and time to the end of the response head.
    Response {
        status: u16,
        latency_us: u64,
    },
    Failure(FailKind),
    /// No endpoint could take the request (503).
    Unavailable,
    Retry,
    RetryRefused,
    Begin,
    End,
}

/// Every route's counters: `[worker][slot]`.
#[derive(Debug)]
pub struct RouteStats {
    rows: Box<[Box<[RouteCounters]>]>,
}

impl Default for RouteStats {
    /// A small table for tests; the proxy sizes its own from the configuration.
    fn default() -> Self {
        Self::new(16, 16)
    }
}

impl RouteStats {
    /// `series` named routes (plus the overflow slot) for `workers` workers.
    pub fn new(series: usize, workers: usize) -> Self {
        let row = || (0..=series).map(|_| RouteCounters::default()).collect();
        Self {
            rows: (0..workers.max(1)).map(|_| row()).collect(),
        }
    }

    #[inline]
    pub fn record(&self, worker: usize, slot: u32, ev: RouteEvent) {
        let Some(c) = self
            .rows
            .get(worker)
            .and_then(|r| r.get(slot as usize).or_else(|| r.first()))
        else {
            return;
        };
        match ev {
            RouteEvent::Response { status, latency_us } => {
                let class = usize::from(status / 100).clamp(1, 5) - 1;
                c.classes[class].inc();
                let ms = latency_us / 1000;
                let b = ROUTE_LATENCY_BUCKETS_MS
                    .iter()
                    .position(|&ub| ms < ub)
                    .unwrap_or(ROUTE_LATENCY_BUCKETS_MS.len());
                c.latency[b].inc();
                c.latency_sum_us.add(latency_us);
            }
            RouteEvent::Failure(k) => c.failures[k as usize].inc(),
            RouteEvent::Unavailable => c.unavailable.inc(),
            RouteEvent::Retry => c.retries.inc(),
            RouteEvent::RetryRefused => c.retries_refused.inc(),
            RouteEvent::Begin => c.inflight.inc(),
            // Never below zero (a slot cleared while a request was in flight).
            RouteEvent::End => c.inflight.set(c.inflight.get().saturating_sub(1)),
        }
    }

    /// Slot `slot` summed over the workers.
    pub fn totals(&self, slot: u32) -> RouteTotals {
        let mut t = RouteTotals::default();
        for row in self.rows.iter() {
            let Some(c) = row.get(slot as usize) else {
                continue;
            };
            let get = Counter::get;
            for (o, a) in t.classes.iter_mut().zip(&c.classes) {
                *o += get(a);
            }
            for (o, a) in t.failures.iter_mut().zip(&c.failures) {
                *o += get(a);
            }
            for (o, a) in t.latency.iter_mut().zip(&c.latency) {
                *o += get(a);
            }
            t.unavailable += get(&c.unavailable);
            t.retries += get(&c.retries);
            t.retries_refused += get(&c.retries_refused);
            t.inflight += get(&c.inflight);
            t.latency_sum_us += get(&c.latency_sum_us);
        }
        t
    }

    /// Zeroes slot `slot` (before it names another route).
    pub fn clear(&self, slot: u32) {
        for row in self.rows.iter() {
            let Some(c) = row.get(slot as usize) else {
                continue;
            };
            let singles = [
                &c.unavailable,
                &c.retries,
                &c.retries_refused,
                &c.inflight,
                &c.latency_sum_us,
            ];
            c.classes
                .iter()
                .chain(&c.failures)
                .chain(&c.latency)
                .chain(singles)
                .for_each(|a| a.set(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_route_and_overflows() {
        let s = RouteStats::new(2, 2);
        s.record(
            0,
            1,
            RouteEvent::Response {
                status: 200,
                latency_us: 1_500,
            },
        );
        s.record(
            1,
            1,
            RouteEvent::Response {
                status: 503,
                latency_us: 20_000_000,
            },
        );
        s.record(1, 1, RouteEvent::Failure(FailKind::Timeout));
        s.record(0, 99, RouteEvent::Retry);
        let t = s.totals(1);
        assert_eq!(t.classes, [0, 1, 0, 0, 1]);
        assert_eq!(t.latency[1], 1);
        assert_eq!(t.latency[ROUTE_LATENCY_BUCKETS_MS.len()], 1);
        assert_eq!(t.failures[FailKind::Timeout as usize], 1);
        assert_eq!(s.totals(0).retries, 1, "an unknown slot counts as overflow");
        s.clear(1);
        assert_eq!(s.totals(1), RouteTotals::default());
    }
}
