//! Upstream pool checkout and checkin, per request on a keep-alive upstream.
//!
//! - `checkout+checkin (fresh)`: a connection returned moments ago: no system call, a hash
//!   lookup and a deque push/pop. Good: under 100 ns.
//! - `checkout+checkin (stale check)`: with `stale_check_idle` at zero every checkout peeks the
//!   socket (`recv(MSG_PEEK|MSG_DONTWAIT)`), which is what the default skips for connections
//!   idle under 100 ms. The difference between the two is the system call a busy pool saves
//!   per request (about 1 µs on this machine's kernel).

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
    for (name, stale_check) in [
        ("checkout+checkin (fresh)", Duration::from_secs(60)),
        ("checkout+checkin (stale check)", Duration::ZERO),
    ] {
        let (mut pool, _server) = rt.block_on(async {
            let mut pool: Pool<monoio::net::TcpStream> =
                Pool::new(128, Duration::from_secs(60), stale_check);
            let s = monoio::net::TcpStream::connect_addr(addr).await.unwrap();
            let server = listener.accept().unwrap();
            pool.checkin(addr, s, Instant::now());
            (pool, server)
        });
        g.bench_function(name, |b| {
            b.iter(|| {
                let now = Instant::now();
                let s = pool.checkout(black_box(addr), now).stream.unwrap();
                pool.checkin(addr, s, now);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
