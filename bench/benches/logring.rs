//! Log ring push (the worker's per-request cost) and drain (the control plane's).
//!
//! - `push`: encode a typical record (~250 bytes) and copy it into the SPSC ring; no allocation
//!   (the encode buffer is reused), no lock, one release store. Good: under 100 ns.
//! - `push+drain`: the same with the consumer draining in batches of 4096, as the control
//!   thread does. Good: under 150 ns per record, so one control thread keeps up with many
//!   workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use ringway_core::record::RouteIds;
use ringway_core::{LogEntry, log_ring};

fn entry() -> LogEntry<'static> {
    LogEntry {
        time_unix_us: 1_795_600_000_000_000,
        duration_us: 1234,
        request_id: b"0123456789abcdef0123456789abcdef",
        host: b"shop.example.com",
        method: b"GET",
        path: b"/static/app.3f9a1c.js",
        status: 200,
        bytes_in: 612,
        bytes_out: 48_600,
        upstream: Some("10.0.0.5:3000".parse().unwrap()),
        client_ip: "203.0.113.9".parse().unwrap(),
        user_agent:
            b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0",
        route: Some(RouteIds {
            project_id: 1,
            environment_id: 2,
            deployment_id: 3,
        }),
        worker: 0,
        reason: b"",
        visitor_id: b"",
        session_id: b"",
    }
}

fn bench(c: &mut Criterion) {
    let e = entry();
    let mut g = c.benchmark_group("log ring");
    g.throughput(Throughput::Elements(1));
    let (mut p, mut cons) = log_ring(4 << 20);
    let mut n = 0u64;
    g.bench_function("push", |b| {
        b.iter(|| {
            if !p.push(black_box(&e)) {
                // Keep the ring from filling up; draining is not what this measures.
                cons.drain(usize::MAX, |_| {});
                p.push(&e);
            }
            n += 1;
        })
    });
    let (mut p, mut cons) = log_ring(4 << 20);
    let mut i = 0u32;
    g.bench_function("push+drain", |b| {
        b.iter(|| {
            p.push(black_box(&e));
            i += 1;
            if i == 4096 {
                i = 0;
                cons.drain(usize::MAX, |r| {
                    black_box(r.len());
                });
            }
        })
    });
    g.finish();
    black_box(n);
}

criterion_group!(benches, bench);
criterion_main!(benches);
