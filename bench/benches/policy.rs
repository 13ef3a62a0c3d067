//! Edge policy on the request path: IP rule matching in sets of 1,000 / 100,000 / 1,000,000
//! rules, and one rate-limit check.
//!
//! The rules are random IPv4 /32 and /24 ranges and IPv6 /48 ranges (deterministic seed), merged
//! at build time into sorted disjoint ranges as the control plane does; each iteration looks up
//! the next of 4,096 prepared addresses, so neither the branch predictor nor one hot cache line
//! flatters the result. `v4 hit`/`v4 miss`/`v6 miss` are what a deny list costs a listed and an
//! unlisted client. Good: a binary search, so ~log2(rules) steps: under 100 ns at 100,000
//! rules on this machine, and growth from 1k to 1M from cache misses only, never linear.
//! `rate check` is one GCRA step on a shared atomic (the never-hit limit of the load test):
//! good is under 50 ns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use ringway_core::cidr::Cidr;
use ringway_core::policy::{IpSet, RateLimiter, rate_key};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const PROBES: usize = 4096;

/// splitmix64: a fixed, dependency-free sequence.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` rules: 60% IPv4 /32, 30% IPv4 /24, 10% IPv6 /48. IPv4 rules stay out of 10.0.0.0/8 so
/// that addresses from it always miss.
fn rules(n: usize) -> (Vec<Cidr>, Vec<IpAddr>) {
    let mut r = Rng(0x5eed);
    let mut cidrs = Vec::with_capacity(n);
    let mut listed = Vec::new();
    for i in 0..n {
        let x = r.next();
        let v4 = Ipv4Addr::from(((x as u32) % 0xf500_0000) + 0x0b00_0000);
        let (addr, len) = match i % 10 {
            0..=5 => (IpAddr::V4(v4), 32),
            6..=8 => (IpAddr::V4(v4), 24),
            _ => {
                let hi =
                    0x2001_0db8_0000_0000_0000_0000_0000_0000u128 | (u128::from(x as u16) << 80);
                (IpAddr::V6(Ipv6Addr::from(hi)), 48)
            }
        };
        if listed.len() < PROBES && len != 48 {
            listed.push(addr);
        }
        cidrs.push(Cidr::new(addr, len).unwrap());
    }
    (cidrs, listed)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ip rules");
    let mut r = Rng(7);
    let miss4: Vec<IpAddr> = (0..PROBES)
        .map(|_| {
            IpAddr::V4(Ipv4Addr::from(
                0x0a00_0000 | (r.next() as u32 & 0x00ff_ffff),
            ))
        })
        .collect();
    let miss6: Vec<IpAddr> = (0..PROBES)
        .map(|_| IpAddr::V6(Ipv6Addr::from(0xfd00u128 << 112 | u128::from(r.next()))))
        .collect();
    for n in [1_000usize, 100_000, 1_000_000] {
        let (cidrs, hits) = rules(n);
        let set = IpSet::from_cidrs(&cidrs);
        assert!(hits.iter().all(|ip| set.contains(*ip)));
        assert!(!miss4.iter().any(|ip| set.contains(*ip)));
        assert!(!miss6.iter().any(|ip| set.contains(*ip)));
        for (name, probes) in [("v4 hit", &hits), ("v4 miss", &miss4), ("v6 miss", &miss6)] {
            let mut i = 0usize;
            g.bench_with_input(BenchmarkId::new(name, n), &set, |b, set| {
                b.iter(|| {
                    i = (i + 1) % probes.len();
                    black_box(set.contains(black_box(probes[i])))
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("rate");
    let limiter = RateLimiter::new(1_000_000);
    let clients: Vec<u64> = miss4
        .iter()
        .take(1024)
        .map(|ip| rate_key(0, 1, *ip, None))
        .collect();
    let mut i = 0usize;
    g.bench_function("rate check (never hit)", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            let now = limiter.now_us();
            black_box(limiter.check(black_box(clients[i]), 10_000_000, 1_000_000, now))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
