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
//! When a wait runs out, the caller asks the socket what moved meanwhile (`io::wire_bytes`,
//! `TCP_INFO`) and credits that before giving up: an operation's own result hides progress
//! (the kernel wakes a blocked writer only once a third of its send buffer drained; a TLS read
//! returns nothing until a whole record is in).
//!
//! So a client may fall behind the floor by at most the grace period, however fast it started
//! (a lifetime average would let a client that took 4 MiB into kernel buffers at once then
//! stall for over an hour). Time spent waiting on the upstream is not counted: a server-sent
//! event stream that pauses for a minute never trips it. On real networks the receiver opens
//! its window one segment at a time, so a client above the floor takes at least a segment per
//! wait long before its credit runs out.

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
}

/// What bounds the next wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The per-operation timeout: a plain timeout.
    Operation,
    /// The rate floor or the total deadline: the client is too slow.
    Floor,
}

/// Progress of one direction against a floor and an optional total deadline.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    floor: Option<Floor>,
    until: Option<Instant>,
    /// Waiting the client may still cause, in nanoseconds (negative: overdrawn).
    credit_ns: i64,
}

impl Pace {
    pub fn new(floor: Option<Floor>, until: Option<Instant>) -> Self {
        Self {
            floor,
            until,
            credit_ns: floor.map_or(0, |f| duration_ns(f.grace)),
        }
    }

    /// No floor and no deadline: waits are bounded by their operation timeout alone.
    pub fn unbounded() -> Self {
        Self::new(None, None)
    }

    /// When the next wait, starting `now`, must end, and what sets that instant.
    pub fn deadline(&self, now: Instant, per_op: Duration) -> (Instant, Bound) {
        let mut end = now + per_op;
        let mut bound = Bound::Operation;
        if self.floor.is_some() {
            let left = Duration::from_nanos(self.credit_ns.max(0).unsigned_abs());
            if left < per_op {
                end = now + left;
                bound = Bound::Floor;
            }
        }
        if let Some(u) = self.until
            && u < end
        {
            end = u.max(now);
            bound = Bound::Floor;
        }
        (end, bound)
    }

    /// Whether the client has waiting time left (always, without a floor).
    pub fn has_credit(&self) -> bool {
        self.floor.is_none() || self.credit_ns > 0
    }

    /// Accounts one wait on the client and the bytes it moved.
    pub fn record(&mut self, waited: Duration, bytes: usize) {
        let Some(f) = self.floor else { return };
        let earned = (bytes as u128 * 1_000_000_000 / u128::from(f.min_bytes_per_s))
            .min(i64::MAX as u128) as i64;
        let cap = duration_ns(f.grace);
        self.credit_ns = self
            .credit_ns
            .saturating_sub(duration_ns(waited))
            .saturating_add(earned)
            .min(cap);
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
        assert_eq!(p.deadline(now, 30 * S), (now + 2 * S, Bound::Floor));
        // Already past: the wait ends at once.
        let later = now + 5 * S;
        assert_eq!(p.deadline(later, 30 * S), (later, Bound::Floor));
    }
}
