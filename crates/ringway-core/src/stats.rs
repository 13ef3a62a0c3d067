//! Per-worker counters, written by their worker only and read by `/metrics`.
//!
//! One writer per counter means an increment need not be an atomic read-modify-write: a relaxed
//! load and store (plain `mov`s on x86) is enough, and no cache line is shared between workers.
//! Readers may see a slightly old value, never a torn one.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Request latency histogram bucket upper bounds, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Status codes are counted one by one up to this (exclusive); others go to `status_other`.
pub const STATUS_CODES: usize = 600;

/// Which I/O driver a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Driver {
    Unknown = 0,
    IoUring = 1,
    Legacy = 2,
}

impl Driver {
    pub fn name(self) -> &'static str {
        match self {
            Driver::Unknown => "unknown",
            Driver::IoUring => "io_uring",
            Driver::Legacy => "legacy",
        }
    }
}

/// A counter with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_sub(n), Ordering::Relaxed);
    }
    /// For gauges the owning worker recomputes.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything one worker counts. Aligned so two workers' stats never share a cache line.
#[repr(align(128))]
#[derive(Debug)]
pub struct WorkerStats {
    pub driver: AtomicU8,
    pub connections_accepted: Counter,
    pub connections_active: Counter,
    /// Idle connections waiting in the parking lot (part of `connections_active`).
    pub connections_parked: Counter,
    /// Times the accept loop paused at `connections_per_worker_max`.
    pub accept_paused: Counter,
    pub requests: Counter,
    pub status: Box<[Counter]>,
    pub status_other: Counter,
    pub latency_buckets: [Counter; LATENCY_BUCKETS_US.len() + 1],
    pub latency_sum_us: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub upstream_connects: Counter,
    pub upstream_reuses: Counter,
    pub upstream_connect_errors: Counter,
    pub upstream_retries: Counter,
    /// Pooled connections found closed by the upstream before reuse.
    pub upstream_stale: Counter,
    pub upstream_idle: Counter,
    /// Pooled connections discarded because the upstream sent bytes on them while idle.
    pub upstream_stray_bytes: Counter,
    /// Responses refused (502) for too many or too long interim (1xx) responses.
    pub upstream_interim_exceeded: Counter,
    /// Connections closed at accept: their address had `limits.connections_per_client_max` open.
    pub connections_refused_per_client: Counter,
    /// Request bodies cut off below the rate floor or past `timeouts.body_total_ms` (408).
    pub slow_request_bodies: Counter,
    /// Responses cut off because the client took them slower than the rate floor.
    pub slow_responses: Counter,
    /// Requests refused (400) under a path policy because their path is ambiguous.
    pub ambiguous_paths: Counter,
    /// Requests whose Upgrade named no allowed protocol (the Upgrade was removed).
    pub upgrades_refused: Counter,
    /// Requests refused before reaching an upstream (malformed, too large, timed out).
    pub client_errors: Counter,
    pub tunnels: Counter,
    pub log_records: Counter,
    pub log_drops: Counter,
    /// Completed TLS 1.2 handshakes.
    pub tls_handshakes_12: Counter,
    /// Completed TLS 1.3 handshakes.
    pub tls_handshakes_13: Counter,
    /// Handshakes that resumed a session (ticket or cache).
    pub tls_resumptions: Counter,
    /// Handshakes cut off at the handshake timeout.
    pub tls_handshake_timeouts: Counter,
    /// Handshakes the client abandoned (EOF, reset).
    pub tls_handshake_closed: Counter,
    /// Handshakes failed on a TLS error (alert sent).
    pub tls_handshake_errors: Counter,
    /// Certificate lookups answered by the exact server name.
    pub tls_cert_exact: Counter,
    /// Certificate lookups answered by a wildcard certificate.
    pub tls_cert_wildcard: Counter,
    /// Certificate lookups answered by the default certificate.
    pub tls_cert_default: Counter,
    /// Certificate lookups with no certificate (handshake refused).
    pub tls_cert_miss: Counter,
    /// Plain HTTP requests redirected to HTTPS.
    pub https_redirects: Counter,
    /// ACME HTTP-01 challenges answered.
    pub acme_answers: Counter,
    /// Requests answered 421 (Host not covered by the connection's certificate).
    pub misdirected: Counter,
    pub proxy_protocol_errors: Counter,
    pub ip_denied: Counter,
    pub blocked: Counter,
    pub rate_limited: Counter,
    pub challenges_issued: Counter,
    pub challenges_passed: Counter,
    pub challenges_failed: Counter,
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerStats {
    pub fn new() -> Self {
        Self {
            driver: AtomicU8::new(Driver::Unknown as u8),
            connections_accepted: Counter::default(),
            connections_active: Counter::default(),
            connections_parked: Counter::default(),
            accept_paused: Counter::default(),
            requests: Counter::default(),
            status: (0..STATUS_CODES).map(|_| Counter::default()).collect(),
            status_other: Counter::default(),
            latency_buckets: Default::default(),
            latency_sum_us: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            upstream_connects: Counter::default(),
            upstream_reuses: Counter::default(),
            upstream_connect_errors: Counter::default(),
            upstream_retries: Counter::default(),
            upstream_stale: Counter::default(),
            upstream_idle: Counter::default(),
            upstream_stray_bytes: Counter::default(),
            upstream_interim_exceeded: Counter::default(),
            connections_refused_per_client: Counter::default(),
            slow_request_bodies: Counter::default(),
            slow_responses: Counter::default(),
            ambiguous_paths: Counter::default(),
            upgrades_refused: Counter::default(),
            client_errors: Counter::default(),
            tunnels: Counter::default(),
            log_records: Counter::default(),
            log_drops: Counter::default(),
            tls_handshakes_12: Counter::default(),
            tls_handshakes_13: Counter::default(),
            tls_resumptions: Counter::default(),
            tls_handshake_timeouts: Counter::default(),
            tls_handshake_closed: Counter::default(),
            tls_handshake_errors: Counter::default(),
            tls_cert_exact: Counter::default(),
            tls_cert_wildcard: Counter::default(),
            tls_cert_default: Counter::default(),
            tls_cert_miss: Counter::default(),
            https_redirects: Counter::default(),
            acme_answers: Counter::default(),
            misdirected: Counter::default(),
            proxy_protocol_errors: Counter::default(),
            ip_denied: Counter::default(),
            blocked: Counter::default(),
            rate_limited: Counter::default(),
            challenges_issued: Counter::default(),
            challenges_passed: Counter::default(),
            challenges_failed: Counter::default(),
        }
    }

    pub fn set_driver(&self, d: Driver) {
        self.driver.store(d as u8, Ordering::Relaxed);
    }

    pub fn driver(&self) -> Driver {
        match self.driver.load(Ordering::Relaxed) {
            1 => Driver::IoUring,
            2 => Driver::Legacy,
            _ => Driver::Unknown,
        }
    }

    /// Counts a finished request.
    #[inline]
    pub fn record_request(&self, status: u16, duration_us: u64) {
        self.requests.inc();
        match self.status.get(status as usize) {
            Some(c) => c.inc(),
            None => self.status_other.inc(),
        }
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| duration_us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency_buckets[bucket].inc();
        self.latency_sum_us.add(duration_us);
    }

    /// A copy for rendering.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            driver: self.driver(),
            connections_accepted: self.connections_accepted.get(),
            connections_active: self.connections_active.get(),
            connections_parked: self.connections_parked.get(),
            accept_paused: self.accept_paused.get(),
            requests: self.requests.get(),
            status: self
                .status
                .iter()
                .enumerate()
                .filter_map(|(code, c)| {
                    let v = c.get();
                    (v > 0).then_some((code as u16, v))
                })
                .collect(),
            status_other: self.status_other.get(),
            latency_buckets: self.latency_buckets.iter().map(Counter::get).collect(),
            latency_sum_us: self.latency_sum_us.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            upstream_connects: self.upstream_connects.get(),
            upstream_reuses: self.upstream_reuses.get(),
            upstream_connect_errors: self.upstream_connect_errors.get(),
            upstream_retries: self.upstream_retries.get(),
            upstream_stale: self.upstream_stale.get(),
            upstream_idle: self.upstream_idle.get(),
            upstream_stray_bytes: self.upstream_stray_bytes.get(),
            upstream_interim_exceeded: self.upstream_interim_exceeded.get(),
            connections_refused_per_client: self.connections_refused_per_client.get(),
            slow_request_bodies: self.slow_request_bodies.get(),
            slow_responses: self.slow_responses.get(),
            ambiguous_paths: self.ambiguous_paths.get(),
            upgrades_refused: self.upgrades_refused.get(),
            client_errors: self.client_errors.get(),
            tunnels: self.tunnels.get(),
            log_records: self.log_records.get(),
            log_drops: self.log_drops.get(),
            tls_handshakes_12: self.tls_handshakes_12.get(),
            tls_handshakes_13: self.tls_handshakes_13.get(),
            tls_resumptions: self.tls_resumptions.get(),
            tls_handshake_timeouts: self.tls_handshake_timeouts.get(),
            tls_handshake_closed: self.tls_handshake_closed.get(),
            tls_handshake_errors: self.tls_handshake_errors.get(),
            tls_cert_exact: self.tls_cert_exact.get(),
            tls_cert_wildcard: self.tls_cert_wildcard.get(),
            tls_cert_default: self.tls_cert_default.get(),
            tls_cert_miss: self.tls_cert_miss.get(),
            https_redirects: self.https_redirects.get(),
            acme_answers: self.acme_answers.get(),
            misdirected: self.misdirected.get(),
            proxy_protocol_errors: self.proxy_protocol_errors.get(),
            ip_denied: self.ip_denied.get(),
            blocked: self.blocked.get(),
            rate_limited: self.rate_limited.get(),
            challenges_issued: self.challenges_issued.get(),
            challenges_passed: self.challenges_passed.get(),
            challenges_failed: self.challenges_failed.get(),
        }
    }
}

/// A point-in-time copy of one worker's stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub driver: Driver,
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub connections_parked: u64,
    pub accept_paused: u64,
    pub requests: u64,
    /// (status code, count) for codes seen.
    pub status: Vec<(u16, u64)>,
    pub status_other: u64,
    /// Count per bucket of [`LATENCY_BUCKETS_US`], plus one for larger (not cumulative).
    pub latency_buckets: Vec<u64>,
    pub latency_sum_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream_connects: u64,
    pub upstream_reuses: u64,
    pub upstream_connect_errors: u64,
    pub upstream_retries: u64,
    pub upstream_stale: u64,
    pub upstream_idle: u64,
    pub upstream_stray_bytes: u64,
    pub upstream_interim_exceeded: u64,
    pub connections_refused_per_client: u64,
    pub slow_request_bodies: u64,
    pub slow_responses: u64,
    pub ambiguous_paths: u64,
    pub upgrades_refused: u64,
    pub client_errors: u64,
    pub tunnels: u64,
    pub log_records: u64,
    pub log_drops: u64,
    pub tls_handshakes_12: u64,
    pub tls_handshakes_13: u64,
    pub tls_resumptions: u64,
    pub tls_handshake_timeouts: u64,
    pub tls_handshake_closed: u64,
    pub tls_handshake_errors: u64,
    pub tls_cert_exact: u64,
    pub tls_cert_wildcard: u64,
    pub tls_cert_default: u64,
    pub tls_cert_miss: u64,
    pub https_redirects: u64,
    pub acme_answers: u64,
    pub misdirected: u64,
    pub proxy_protocol_errors: u64,
    pub ip_denied: u64,
    pub blocked: u64,
    pub rate_limited: u64,
    pub challenges_issued: u64,
    pub challenges_passed: u64,
    pub challenges_failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests() {
        let s = WorkerStats::new();
        s.record_request(200, 300);
        s.record_request(200, 700);
        s.record_request(502, 20_000_000);
        s.record_request(999, 1);
        let snap = s.snapshot();
        assert_eq!(snap.requests, 4);
        assert_eq!(snap.status, vec![(200, 2), (502, 1)]);
        assert_eq!(snap.status_other, 1);
        assert_eq!(snap.latency_buckets[0], 2);
        assert_eq!(snap.latency_buckets[1], 1);
        assert_eq!(snap.latency_buckets[LATENCY_BUCKETS_US.len()], 1);
        assert_eq!(snap.latency_sum_us, 20_001_001);
        s.set_driver(Driver::IoUring);
        assert_eq!(s.snapshot().driver, Driver::IoUring);
    }
}
