//! Route lookup in tables of 1,000 / 100,000 / 1,000,000 hosts.
//!
//! Each lookup normalises the Host value on the stack (port, case, trailing dot) and probes the
//! papaya map under an epoch pin, as a worker does per request: exact hit, wildcard hit
//! (`*.suffix`, one exact miss then suffix probes), and a miss that falls back to the default
//! route. Good: flat across table sizes (a hash lookup, not a scan) and well under 200 ns;
//! growth from 1k to 1M should come only from cache misses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use ringway_bench::hosts;
use ringway_core::balance::{Cluster, ClusterSpec};
use ringway_core::route::{HOST_BYTES_MAX, Route, RouteSet, RouteTable, normalize_host};
use std::sync::Arc;

fn cluster(addr: &str) -> Arc<Cluster> {
    Arc::new(Cluster::unbound(ClusterSpec::of_addrs(&[addr
        .parse()
        .unwrap()])))
}

fn table(n: usize) -> RouteTable {
    let t = RouteTable::new();
    let mut set = RouteSet::default();
    for (i, h) in hosts(n).into_iter().enumerate() {
        set.hosts.insert(
            h,
            Arc::new(Route {
                name: format!("r{i}").into(),
                project_id: i as i64,
                environment_id: 1,
                deployment_id: 1,
                cluster: cluster("10.0.0.1:3000"),
                body_bytes_max: None,
                redirect_https: false,
                hsts: None,
            }),
        );
    }
    set.hosts.insert(
        "*.tenants.example.test".into(),
        Arc::new(Route {
            name: "wild".into(),
            project_id: 0,
            environment_id: 0,
            deployment_id: 0,
            cluster: cluster("10.0.0.2:3000"),
            body_bytes_max: None,
            redirect_https: false,
            hsts: None,
        }),
    );
    set.default = set.hosts.values().next().cloned();
    t.apply(&set);
    t
}

fn lookup(t: &RouteTable, raw: &[u8]) -> i64 {
    let mut buf = [0u8; HOST_BYTES_MAX];
    let host = normalize_host(raw, &mut buf).unwrap();
    t.with_route(host, |r| r.project_id).unwrap_or(-1)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("route lookup");
    for n in [1_000usize, 100_000, 1_000_000] {
        let t = table(n);
        let hit = format!("H{}.Example.test:443", n / 2);
        g.bench_with_input(BenchmarkId::new("exact", n), &hit, |b, h| {
            b.iter(|| black_box(lookup(&t, black_box(h.as_bytes()))))
        });
        g.bench_with_input(
            BenchmarkId::new("wildcard", n),
            &"acme.tenants.example.test",
            |b, h| b.iter(|| black_box(lookup(&t, black_box(h.as_bytes())))),
        );
        g.bench_with_input(
            BenchmarkId::new("default", n),
            &"unknown.example.org",
            |b, h| b.iter(|| black_box(lookup(&t, black_box(h.as_bytes())))),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = bench
}
criterion_main!(benches);
