//! Rate floors for slow clients.
//!
//! A per-operation timeout does not stop a client that sends a request body at 2 bytes a
//! second, or takes a response at 1 byte a second: every operation makes progress. Such a
//! client holds an upstream connection for hours. A [`Pace`] follows one direction of one
//! exchange as a credit of waiting time, in the manner of a token bucket: it starts at the
//! grace period, every wait *on the client* spends from it, and every byte the client moves
//! earns `1 / rate` seconds back, never above the grace period. The next wait ends when the
//! credit runs out (or at the per-operation timeout, or at the total deadline, whichever is
//! first).
//!
//! When the credit runs out, the client is not cut at once: an operation's own result can
//! hide progress (the kernel wakes a blocked writer only once a third of its send buffer
//! drained; a TLS read returns nothing until a whole record is in). The socket's counters
//! (`io::wire_bytes`, `TCP_INFO`: bytes acknowledged or received) are read, and the client is
//! watched for one more grace period (a *probe*); what the socket moved in it is credited. A
//! client that did not move at the floor rate over the probe is too slow. The counters are
//! read only when a credit runs out, never on the request path.
//!
//! So a client may fall behind the floor by at most the grace period, however fast it started
//! (a lifetime average would let a client that took 4 MiB into kernel buffers at once then
//! stall for over an hour), and a stalled one is cut after at most twice the grace. Time
//! spent waiting on the upstream is not counted: a server-sent event stream that pauses for
//! a minute never trips it.

use std::time::{Duration, Instant};

/// A minimum rate and the waiting a client may bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor {
    min_bytes_per_s: u64,
    grace: Duration,
}

impl Floor {
    /// `None` when `min_bytes_per_s` is 0 (no floor).
    pub fn new(min_bytes_per_s: u64, grace: Duration) -> Option<Self> {
        (min_bytes_per_s > 0).then_some(Self {
            min_bytes_per_s,
            grace,
        })
    }

    fn earned_ns(&self, bytes: u64) -> i64 {
        (u128::from(bytes) * 1_000_000_000 / u128::from(self.min_bytes_per_s)).min(i64::MAX as u128)
            as i64
    }
}

/// What bounds the next wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The per-operation timeout: a plain timeout.
    Operation,
    /// The rate floor's credit, or the end of a probe: see [`Pace::ran_out`].
    Floor,
    /// The total deadline: too slow, whatever the socket says.
    Total,
}

/// A probe under way: the socket counter when it began, and when it ends.
#[derive(Debug, Clone, Copy)]
struct Probe {
    baseline: u64,
    end: Instant,
}

/// Progress of one direction against a floor and an optional total deadline.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    floor: Option<Floor>,
    until: Option<Instant>,
    /// Waiting the client may still cause, in nanoseconds (negative: overdrawn).
    credit_ns: i64,
    probe: Option<Probe>,
}

impl Pace {
    pub fn new(floor: Option<Floor>, until: Option<Instant>) -> Self {
        Self {
            floor,
            until,
            credit_ns: floor.map_or(0, |f| duration_ns(f.grace)),
            probe: None,
        }
    }

    /// No floor and no deadline: waits are bounded by their operation timeout alone.
    #[cfg(test)]
    pub fn unbounded() -> Self {
        Self::new(None, None)
    }

    /// When the next wait, starting `now`, must end, and what sets that instant.
    pub fn deadline(&self, now: Instant, per_op: Duration) -> (Instant, Bound) {
        let mut end = now + per_op;
        let mut bound = Bound::Operation;
        let floor_end = match self.probe {
            Some(p) => Some(p.end.max(now)),
            None if self.floor.is_some() => {
                Some(now + Duration::from_nanos(self.credit_ns.max(0).unsigned_abs()))
            }
            None => None,
        };
        if let Some(f) = floor_end
            && f < end
        {
            end = f;
            bound = Bound::Floor;
        }
        if let Some(u) = self.until
            && u < end
        {
            end = u.max(now);
            bound = Bound::Total;
        }
        (end, bound)
    }

    /// Whether the client has waiting time left (always, without a floor).
    pub fn has_credit(&self) -> bool {
        self.floor.is_none() || self.credit_ns > 0
    }

    /// Accounts one wait on the client and the bytes its operation moved. During a probe the
    /// bytes are left out: the probe credits what the socket moved, these included.
    pub fn record(&mut self, waited: Duration, bytes: usize) {
        let Some(f) = self.floor else { return };
        let earned = if self.probe.is_some() {
            0
        } else {
            f.earned_ns(bytes as u64)
        };
        self.credit_ns = self
            .credit_ns
            .saturating_sub(duration_ns(waited))
            .saturating_add(earned)
            .min(duration_ns(f.grace));
    }

    /// The floor's wait ran out at `now` (the wait already recorded); `moved`: the socket's
    /// counter of bytes moved by the client (acknowledged, or received), None where the kernel
    /// does not say. Starts a probe, or ends one by crediting what moved in it. False: too
    /// slow.
    pub fn ran_out(&mut self, now: Instant, moved: Option<u64>) -> bool {
        let (Some(f), Some(counter)) = (self.floor, moved) else {
            return false;
        };
        match self.probe.take() {
            None => {
                self.probe = Some(Probe {
                    baseline: counter,
                    end: now + f.grace,
                });
                true
            }
            Some(p) => {
                let bytes = counter.saturating_sub(p.baseline);
                self.credit_ns = self
                    .credit_ns
                    .saturating_add(f.earned_ns(bytes))
                    .min(duration_ns(f.grace));
                bytes > 0 && self.has_credit()
            }
        }
    }
}

fn duration_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Waits of one second, each moving `bytes`: at which wait the floor cuts in.
    fn cut_after(p: &mut Pace, bytes: usize, waits: usize) -> Option<usize> {
        let mut t = Instant::now();
        for i in 0..waits {
            let (end, bound) = p.deadline(t, 30 * S);
            if end < t + S {
                assert_eq!(bound, Bound::Floor);
                return Some(i);
            }
            p.record(S, bytes);
            t += S;
        }
        None
    }

    #[test]
    fn a_dripping_client_runs_out_after_the_grace() {
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        // 2 bytes a second: each wait costs a second and earns 2 ms.
        assert_eq!(cut_after(&mut p, 2, 30), Some(10));
    }

    #[test]
    fn a_fast_start_banks_no_more_than_the_grace() {
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        // 4 MiB taken at once (into kernel buffers, say), then nothing.
        p.record(Duration::from_millis(1), 4 << 20);
        assert_eq!(cut_after(&mut p, 0, 60), Some(10));
    }

    #[test]
    fn a_client_above_the_floor_is_never_cut() {
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        assert_eq!(cut_after(&mut p, 1500, 1000), None);
        // At the floor exactly: credit stays where it is.
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        assert_eq!(cut_after(&mut p, 1000, 1000), None);
        // Fast clients are bounded by the operation timeout alone.
        let now = Instant::now();
        assert_eq!(p.deadline(now, 3 * S), (now + 3 * S, Bound::Operation));
        let p = Pace::unbounded();
        assert_eq!(p.deadline(now, S), (now + S, Bound::Operation));
        assert!(Floor::new(0, S).is_none());
    }

    #[test]
    fn the_total_deadline_wins_when_earlier() {
        let now = Instant::now();
        let p = Pace::new(None, Some(now + 2 * S));
        assert_eq!(p.deadline(now, 30 * S), (now + 2 * S, Bound::Total));
        // Already past: the wait ends at once.
        let later = now + 5 * S;
        assert_eq!(p.deadline(later, 30 * S), (later, Bound::Total));
    }

    #[test]
    fn a_probe_credits_what_the_socket_moved() {
        let t0 = Instant::now();
        // Credit spent: the first run-out starts a probe of one grace period.
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        p.record(10 * S, 0);
        assert!(!p.has_credit());
        assert!(p.ran_out(t0, Some(5000)));
        assert_eq!(p.deadline(t0, 30 * S), (t0 + 10 * S, Bound::Floor));
        // Operations during the probe spend time, their bytes wait for the probe's end.
        p.record(4 * S, 3000);
        // 15 KB acknowledged over the probe: 15 s earned, more than it cost.
        p.record(6 * S, 0);
        assert!(p.ran_out(t0 + 10 * S, Some(20_000)));
        assert!(p.has_credit());
        assert_eq!(p.deadline(t0, 30 * S).1, Bound::Floor);
        // A stalled client: nothing moved over the probe.
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        p.record(10 * S, 0);
        assert!(p.ran_out(t0, Some(7)));
        p.record(10 * S, 0);
        assert!(!p.ran_out(t0 + 10 * S, Some(7)));
        // A dripping one: a few bytes, far below the floor over the probe.
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        p.record(10 * S, 0);
        assert!(p.ran_out(t0, Some(0)));
        p.record(10 * S, 20);
        assert!(!p.ran_out(t0 + 10 * S, Some(20)));
        // No counters from the kernel: judged by the operations alone.
        let mut p = Pace::new(Floor::new(1000, 10 * S), None);
        assert!(!p.ran_out(t0, None));
    }
}
