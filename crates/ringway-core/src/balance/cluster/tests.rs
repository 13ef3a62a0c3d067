use super::*;
use crate::balance::registry::{FailKind, Slots, assign_endpoint};
use crate::balance::spec::{HashKey, Outlier, Sticky, UpstreamSpec};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8], 80))
}

struct Fixture {
    reg: Registry,
    slots: Slots<SocketAddr>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            reg: Registry::new(64, 2),
            slots: Slots::new(64),
        }
    }

    fn cluster(&mut self, weights: &[u32], f: impl FnOnce(&mut ClusterSpec)) -> Cluster {
        let ups = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| UpstreamSpec {
                weight: w,
                ..UpstreamSpec::new(addr(i))
            })
            .collect();
        let mut spec = ClusterSpec::with_upstreams(ups);
        f(&mut spec);
        let members = spec
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let e = assign_endpoint(&mut self.slots, &self.reg, &addr(i));
                Member::new(addr(i), e, u.weight, u.state)
            })
            .collect();
        Cluster::build(Arc::new(spec), members, 2, 1, 0)
    }
}

fn ask(rand: u64) -> Ask<'static> {
    Ask {
        worker: 0,
        now_ms: 1,
        rand,
        seq: 0,
        key: 0,
        sticky: None,
        tried: &[],
    }
}

fn rng(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    crate::balance::hash::mix(*state)
}

fn counts(
    c: &Cluster,
    reg: &Registry,
    n: usize,
    mut f: impl FnMut(&mut Ask<'static>),
) -> Vec<usize> {
    let mut out = vec![0; c.members().len()];
    let mut s = 7;
    for _ in 0..n {
        let mut a = ask(rng(&mut s));
        f(&mut a);
        let ch = c.choose(reg, &a).unwrap();
        out[c.members().iter().position(|m| m.addr == ch.addr).unwrap()] += 1;
    }
    out
}

fn within(counts: &[usize], weights: &[u32], tolerance: f64) {
    let total: usize = counts.iter().sum();
    let wsum: u32 = weights.iter().sum();
    for (c, w) in counts.iter().zip(weights) {
        let share = *c as f64 / total as f64;
        let want = f64::from(*w) / f64::from(wsum);
        assert!(
            (share - want).abs() <= tolerance * want,
            "{counts:?} vs {weights:?}"
        );
    }
}

#[test]
fn weighted_round_robin_and_random_follow_weights() {
    let mut fx = Fixture::new();
    let w = [1, 2, 3];
    let rr = fx.cluster(&w, |s| s.strategy = Strategy::RoundRobin);
    within(&counts(&rr, &fx.reg, 10_000, |_| {}), &w, 0.05);
    let random = fx.cluster(&w, |s| s.strategy = Strategy::Random);
    within(&counts(&random, &fx.reg, 10_000, |_| {}), &w, 0.05);
    let p2c = fx.cluster(&w, |s| s.strategy = Strategy::PowerOfTwo);
    within(&counts(&p2c, &fx.reg, 10_000, |_| {}), &w, 0.10);
    // Latencies that differ by noise (1.00, 1.10, 1.05 ms) still leave it to the weights.
    for (m, us) in p2c.members().iter().zip([1_000, 1_100, 1_050]) {
        fx.reg.success(0, m.endpoint, 2, us, 1);
    }
    within(&counts(&p2c, &fx.reg, 10_000, |_| {}), &w, 0.10);
}

#[test]
fn least_loaded_strategies_avoid_busy_and_slow_endpoints() {
    let mut fx = Fixture::new();
    let lc = fx.cluster(&[1, 1, 1], |s| s.strategy = Strategy::LeastConnections);
    let busy = lc.members()[0].endpoint;
    for _ in 0..5 {
        fx.reg.begin(1, busy);
    }
    let c = counts(&lc, &fx.reg, 3_000, |_| {});
    assert_eq!(c[0], 0, "{c:?}");
    let p2c = fx.cluster(&[1, 1, 1], |s| s.strategy = Strategy::PowerOfTwo);
    let slow = p2c.members()[1].endpoint;
    for m in p2c.members() {
        let lat = if m.endpoint == slow { 21_000 } else { 1_000 };
        fx.reg.success(0, m.endpoint, 2, lat, 1);
    }
    let c = counts(&p2c, &fx.reg, 10_000, |_| {});
    assert!(c[1] < 2_000, "{c:?}");
}

#[test]
fn hashing_is_consistent_and_moves_few_keys() {
    let mut fx = Fixture::new();
    let strat = |s: &mut ClusterSpec| s.strategy = Strategy::Hash(HashKey::ClientIp);
    let three = fx.cluster(&[1, 1, 1], strat);
    let four = fx.cluster(&[1, 1, 1, 1], strat);
    let mut moved = 0;
    for k in 0..10_000u64 {
        let key = crate::balance::hash::stable_hash(&k.to_le_bytes());
        let pick = |c: &Cluster, worker| {
            let a = Ask {
                key,
                worker,
                ..ask(k)
            };
            c.choose(&fx.reg, &a).unwrap().addr
        };
        assert_eq!(pick(&three, 0), pick(&three, 1));
        moved += usize::from(pick(&three, 0) != pick(&four, 0));
    }
    assert!(moved <= 3_000, "{moved}");
    // An ejected endpoint's keys go elsewhere; the others stay.
    let e0 = three.members()[0].endpoint;
    let o = Outlier {
        consecutive_failures: 1,
        ..Outlier::default()
    };
    fx.reg.failure(0, e0, FailKind::Reset, &o, 1);
    fx.reg.eject(e0, &o, 1);
    for k in 0..1_000u64 {
        let key = crate::balance::hash::stable_hash(&k.to_le_bytes());
        let a = Ask { key, ..ask(k) };
        let before = three.table[(key % MAGLEV_SIZE as u64) as usize] as usize;
        let now = three.choose(&fx.reg, &a).unwrap().addr;
        assert_ne!(now, addr(0));
        if before != 0 {
            assert_eq!(now, addr(before));
        }
    }
}

#[test]
fn sticky_cookie_pins_while_usable() {
    let mut fx = Fixture::new();
    let c = fx.cluster(&[1, 1, 1], |s| {
        s.sticky = Some(Sticky {
            cookie: "rw".into(),
            max_age_s: None,
        });
    });
    let first = c.choose(&fx.reg, &ask(1)).unwrap();
    assert!(first.set_sticky, "a first visit sets the cookie");
    let id = first.id;
    for r in 0..100 {
        let a = Ask {
            sticky: Some(id),
            ..ask(r)
        };
        let again = c.choose(&fx.reg, &a).unwrap();
        assert_eq!(again.addr, first.addr);
        assert!(!again.set_sticky);
    }
    let o = Outlier {
        consecutive_failures: 1,
        ..Outlier::default()
    };
    fx.reg.failure(0, first.endpoint, FailKind::Reset, &o, 1);
    fx.reg.eject(first.endpoint, &o, 1);
    let a = Ask {
        sticky: Some(id),
        ..ask(5)
    };
    let moved = c.choose(&fx.reg, &a).unwrap();
    assert_ne!(moved.addr, first.addr);
    assert!(moved.set_sticky);
}

#[test]
fn health_panic_and_reasons() {
    let mut fx = Fixture::new();
    let c = fx.cluster(&[1, 1, 1], |s| s.panic_threshold_pct = 50);
    let o = Outlier {
        consecutive_failures: 1,
        max_ejected_pct: 100,
        ..Outlier::default()
    };
    let eject = |i: usize| {
        let e = c.members()[i].endpoint;
        fx.reg.failure(0, e, FailKind::ConnectRefused, &o, 1);
        assert!(fx.reg.eject(e, &o, 1));
    };
    eject(0);
    let cnt = counts(&c, &fx.reg, 1_000, |_| {});
    assert_eq!(cnt[0], 0);
    eject(1);
    // One of three healthy is under 50%: health is ignored, traffic spreads.
    let cnt = counts(&c, &fx.reg, 3_000, |_| {});
    assert!(cnt.iter().all(|&n| n > 500), "{cnt:?}");
    let tried: Vec<u64> = [2, 0, 1]
        .iter()
        .map(|&i| c.members()[i].sticky_id)
        .collect();
    let a = Ask {
        tried: &tried,
        ..ask(1)
    };
    assert_eq!(c.choose(&fx.reg, &a), Err(Unavailable::AllTried));
    let strict = fx.cluster(&[1, 1, 1], |s| s.panic_threshold_pct = 0);
    let e2 = strict.members()[2].endpoint;
    fx.reg.failure(0, e2, FailKind::Reset, &o, 1);
    fx.reg.eject(e2, &o, 1);
    assert_eq!(strict.choose(&fx.reg, &ask(1)), Err(Unavailable::AllDown));
    let drained = fx.cluster(&[1, 1], |s| {
        s.upstreams
            .iter_mut()
            .for_each(|u| u.state = AdminState::Draining);
    });
    assert_eq!(
        drained.choose(&fx.reg, &ask(1)),
        Err(Unavailable::NoEndpoints)
    );
}

#[test]
fn ejected_share_is_capped() {
    let mut fx = Fixture::new();
    let c = fx.cluster(&[1, 1, 1, 1], |s| s.outlier.max_ejected_pct = 50);
    let o = c.spec.outlier.clone();
    let mut ejected = 0;
    for m in c.members() {
        if c.may_eject(&fx.reg, m.endpoint, 1) {
            fx.reg.failure(
                0,
                m.endpoint,
                FailKind::Reset,
                &Outlier {
                    consecutive_failures: 1,
                    ..o.clone()
                },
                1,
            );
            assert!(fx.reg.eject(m.endpoint, &o, 1));
            ejected += 1;
        }
    }
    assert_eq!(ejected, 2);
    // The same as one call, `Cluster::eject`: of three, one may be ejected, a second not.
    let c = fx.cluster(&[1, 1, 1], |s| s.outlier.max_ejected_pct = 50);
    let (a, b) = (c.members()[0].endpoint, c.members()[1].endpoint);
    assert!(c.eject(&fx.reg, a, 100_000));
    assert!(!c.eject(&fx.reg, b, 100_000));
    assert!(!fx.reg.healthy(a, 100_000) && fx.reg.healthy(b, 100_000));
    // What a worker does when a racing ejection made the share too large: take its own back.
    fx.reg.uneject(a, 100_001);
    assert!(fx.reg.healthy(a, 100_001));
}

#[test]
fn retry_budget_is_a_share_plus_a_floor() {
    let mut fx = Fixture::new();
    let c = fx.cluster(&[1, 1], |s| {
        s.retry.budget_pct = 20;
        s.retry.budget_min = 3;
        s.retry.budget_window_ms = 10_000;
    });
    for _ in 0..100 {
        c.note_request(0, 1);
    }
    let allowed = (0..100).filter(|_| c.allow_retry(0, 1)).count();
    assert_eq!(allowed, 23);
    assert!(c.allow_retry(1, 1), "budgets are per worker");
    // Half a window later half of the last window still counts.
    let allowed = (0..100).filter(|_| c.allow_retry(0, 15_000)).count();
    // 100 requests and 23 retries of the last window weigh 50 and 11: 13 allowed, 11 used.
    assert_eq!(allowed, 2);
    let allowed = (0..100).filter(|_| c.allow_retry(0, 40_000)).count();
    assert_eq!(allowed, 3, "an idle route keeps its floor");
}

#[test]
fn connection_limits_skip_full_endpoints() {
    let mut fx = Fixture::new();
    let c = fx.cluster(&[1, 1], |s| s.limits.connections_max = 1);
    fx.reg.begin(0, c.members()[0].endpoint);
    for r in 0..50 {
        assert_eq!(c.choose(&fx.reg, &ask(r)).unwrap().addr, addr(1));
    }
    fx.reg.begin(0, c.members()[1].endpoint);
    let ch = c.choose(&fx.reg, &ask(1)).unwrap();
    assert!(ch.saturated);
    // Another worker's load does not count against this worker's limit.
    let other = Ask {
        worker: 1,
        ..ask(1)
    };
    assert!(!c.choose(&fx.reg, &other).unwrap().saturated);
}

#[test]
fn slow_start_ramps_a_recovered_endpoint() {
    let mut fx = Fixture::new();
    let c = fx.cluster(&[1, 1], |s| {
        s.strategy = Strategy::RoundRobin;
        s.slow_start_ms = 10_000;
    });
    let e = c.members()[0].endpoint;
    fx.reg
        .set_checked(e.index, crate::balance::registry::Checked::Down, 0);
    fx.reg
        .set_checked(e.index, crate::balance::registry::Checked::Up, 1);
    let share = |now_ms| {
        let cnt = counts(&c, &fx.reg, 4_000, |a| a.now_ms = now_ms);
        cnt[0] as f64 / 4_000.0
    };
    let (early, mid, late) = (share(1), share(5_001), share(20_000));
    assert!(early < 0.15, "{early}");
    assert!(mid > early + 0.1 && mid < late, "{mid}");
    assert!((late - 0.5).abs() < 0.03, "{late}");
}
