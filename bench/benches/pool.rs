//! Upstream pool checkout and checkin, per request on a keep-alive upstream.
//!
//! - `checkout+checkin`: every checkout peeks the socket (`recv(MSG_PEEK|MSG_DONTWAIT)`), so
//!   bytes an upstream sent while the connection was idle never reach the next request; then
//!   a hash lookup and a deque push/pop.
//! - `peek`: the system call alone, the part of the above that grows with the kernel's cost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use ringway_worker::pool::Pool;
use std::time::{Duration, Instant};

fn bench(c: &mut Criterion) {
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut g = c.benchmark_group("pool");
    let (mut pool, _server) = rt.block_on(async {
        let mut pool: Pool<monoio::net::TcpStream> = Pool::new(128, Duration::from_secs(60));
        let s = monoio::net::TcpStream::connect_addr(addr).await.unwrap();
        let server = listener.accept().unwrap();
        pool.checkin(addr, s, Instant::now());
        (pool, server)
    });
    g.bench_function("checkout+checkin", |b| {
        b.iter(|| {
            let now = Instant::now();
            let s = pool.checkout(black_box(addr), now).stream.unwrap();
            pool.checkin(addr, s, now);
        })
    });
    let s = pool.checkout(addr, Instant::now()).stream.unwrap();
    g.bench_function("peek", |b| {
        b.iter(|| black_box(ringway_worker::pool::idleness(black_box(&s))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
