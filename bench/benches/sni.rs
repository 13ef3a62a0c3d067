//! SNI certificate lookup in tables of 1,000 / 100,000 names, as a handshake does it.
//!
//! The control plane publishes one `CertEntry` per certificate under each name it serves; a
//! worker's resolver looks up the ClientHello's server name under an epoch pin: exact name,
//! then `*.parent`, then the default (and counts which). Good: flat across table sizes and well
//! under 200 ns, which is noise next to the handshake itself (tens of microseconds of
//! signature and key exchange).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use ringway_core::tls::{CertSet, CertTable};

fn table(n: usize) -> CertTable {
    // One real certificate, served under n names: the lookup cost does not depend on which
    // key sits behind a name.
    let (cert, key) =
        ringway_control::certs::self_signed(&["bench.example.test".to_string()]).unwrap();
    let entry = std::sync::Arc::new(
        ringway_control::certs::load(
            "bench",
            cert.as_bytes(),
            key.as_bytes(),
            None,
            ringway_control::certs::unix_now(),
        )
        .unwrap(),
    );
    let mut set = CertSet::default();
    for h in ringway_bench::hosts(n) {
        set.by_name.insert(h, entry.clone());
    }
    set.by_name
        .insert("*.tenants.example.test".into(), entry.clone());
    set.entries.insert("bench".into(), entry.clone());
    set.default = Some(entry);
    let t = CertTable::new();
    t.apply(&set);
    t
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sni lookup");
    for n in [1_000usize, 100_000] {
        let t = table(n);
        let hit = format!("h{}.example.test", n / 2);
        g.bench_with_input(BenchmarkId::new("exact", n), &hit, |b, h| {
            b.iter(|| black_box(t.lookup(Some(black_box(h.as_str()))).1))
        });
        g.bench_with_input(
            BenchmarkId::new("wildcard", n),
            &"acme.tenants.example.test",
            |b, h| b.iter(|| black_box(t.lookup(Some(black_box(h))).1)),
        );
        g.bench_with_input(
            BenchmarkId::new("default", n),
            &"unknown.example.org",
            |b, h| b.iter(|| black_box(t.lookup(Some(black_box(h))).1)),
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
