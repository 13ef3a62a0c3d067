//! One endpoint choice per strategy, over 3 and 32 endpoints, as a worker makes it per
//! request: `Cluster::choose` reading the endpoints' shared health and this worker's load
//! (in-flight counts summed over 2 workers, latency EWMAs), plus the retry budget's request
//! count. Good: tens of nanoseconds, flat in the endpoint count for round robin, random
//! draws and hashing (a table probe), linear only for least connections (a scan); against
//! the 10-20 us of CPU an HTTP/1.1 exchange costs end to end (docs/performance.md), noise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use ringway_core::balance::registry::{Slots, assign_endpoint};
use ringway_core::balance::spec::{HashKey, Sticky, UpstreamSpec};
use ringway_core::balance::{Ask, Cluster, ClusterSpec, Member, Registry, Strategy};
use std::net::SocketAddr;
use std::sync::Arc;

fn cluster(
    reg: &Registry,
    slots: &mut Slots<SocketAddr>,
    n: usize,
    strategy: Strategy,
    sticky: bool,
) -> Cluster {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 3000)))
        .collect();
    let mut spec =
        ClusterSpec::with_upstreams(addrs.iter().copied().map(UpstreamSpec::new).collect());
    spec.strategy = strategy;
    if sticky {
        spec.sticky = Some(Sticky {
            cookie: "rw_ep".into(),
            max_age_s: None,
        });
    }
    let members: Vec<Member> = addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let e = assign_endpoint(slots, reg, &a);
            // Some load and latency, as a running route has.
            reg.begin(1, e);
            reg.success(0, e, 2, 200 + (i as u64 * 37) % 300, reg.now_ms());
            Member::new(a, e, 1, Default::default())
        })
        .collect();
    Cluster::build(Arc::new(spec), members, 2, 1, 0)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("balance choose");
    let strategies = [
        ("round_robin", Strategy::RoundRobin, false),
        ("least_connections", Strategy::LeastConnections, false),
        ("p2c", Strategy::PowerOfTwo, false),
        ("random", Strategy::Random, false),
        ("hash", Strategy::Hash(HashKey::ClientIp), false),
        ("round_robin+sticky", Strategy::RoundRobin, true),
    ];
    for n in [3usize, 32] {
        for (name, strategy, sticky) in strategies.iter().cloned() {
            let reg = Registry::new(1024, 2);
            let mut slots = Slots::new(1024);
            let cl = cluster(&reg, &mut slots, n, strategy, sticky);
            let pinned = cl.members()[n / 2].sticky_id;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let now_ms = reg.now_ms();
                    cl.note_request(0, now_ms);
                    let ask = Ask {
                        worker: 0,
                        now_ms,
                        rand: x,
                        seq: x,
                        key: x,
                        sticky: sticky.then_some(pinned),
                        tried: &[],
                    };
                    black_box(cl.choose(&reg, black_box(&ask)).unwrap().addr)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
