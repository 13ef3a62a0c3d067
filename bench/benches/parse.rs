//! Request head parse and rewrite, the per-request CPU cost before any I/O.
//!
//! - `scan+parse request`: finding the end of a ~600-byte browser head (bare CR/LF and NUL
//!   checks included) and parsing it with the RFC 9112 rules. Good: well under 1 µs.
//! - `rewrite upstream head`: building the upstream head from it (hop-by-hop removal,
//!   forwarding headers, request id). Good: under 0.5 µs; it copies runs of lines, not fields.
//! - `parse+rewrite response`: the response head to the client with security headers.
//!   Good: under 1 µs.
//!
//! On this machine a whole proxied request costs 12-16 µs of CPU, most of it in the kernel, so
//! these together should stay under a tenth of that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use ringway_bench::{APP_RESPONSE, BROWSER_REQUEST};
use ringway_proto::{HEADER_SLOTS, HeadLimits, Method, parse_request, parse_response, scan_head};
use ringway_worker::headers::{
    ClientFraming, Forwarding, ResponseEdit, write_client_response, write_upstream_request,
};
use ringway_worker::settings::AddedHeader;

fn bench(c: &mut Criterion) {
    let limits = HeadLimits::default();
    let mut g = c.benchmark_group("head");
    g.throughput(Throughput::Bytes(BROWSER_REQUEST.len() as u64));
    g.bench_function("scan+parse request", |b| {
        b.iter(|| {
            let end = scan_head(black_box(BROWSER_REQUEST), &limits)
                .unwrap()
                .unwrap();
            let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
            let r = parse_request(&BROWSER_REQUEST[..end], &limits, &mut slots).unwrap();
            black_box(r.meta);
        })
    });
    let untrusted_strip =
        ringway_worker::headers::NameSet::new(ringway_core::config::UNTRUSTED_STRIP_DEFAULT);
    let upgrade_protocols = [Box::from(&b"websocket"[..])];
    let fwd = Forwarding {
        peer_ip: "203.0.113.9".parse().unwrap(),
        trusted: false,
        proto: b"http",
        request_id: b"0123456789abcdef0123456789abcdef",
        upgrade: false,
        upgrade_protocols: &upgrade_protocols,
        untrusted_strip: &untrusted_strip,
        host_fallback: b"",
        strip_expect: true,
        upstream: "10.0.0.5:3000".parse().unwrap(),
        // The common case with cookies on: both ids present.
        visitor_id: b"v2f3a9c01d4e5b6a7",
        session_id: b"s8e7d6c5b4a39281",
    };
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let req = parse_request(BROWSER_REQUEST, &limits, &mut slots).unwrap();
    let mut out = Vec::with_capacity(16 * 1024);
    g.bench_function("rewrite upstream head", |b| {
        b.iter(|| {
            out.clear();
            write_upstream_request(&mut out, black_box(BROWSER_REQUEST), &req, &fwd);
            black_box(out.len());
        })
    });
    let security: Vec<AddedHeader> = [
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "SAMEORIGIN"),
        ("Referrer-Policy", "strict-origin-when-cross-origin"),
    ]
    .iter()
    .map(|(n, v)| AddedHeader {
        name: n.as_bytes().into(),
        value: v.as_bytes().into(),
        override_app: false,
    })
    .collect();
    g.bench_function("parse+rewrite response", |b| {
        b.iter(|| {
            let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
            let r =
                parse_response(black_box(APP_RESPONSE), Method::Get, &limits, &mut slots).unwrap();
            out.clear();
            write_client_response(
                &mut out,
                APP_RESPONSE,
                &r,
                &ResponseEdit {
                    framing: ClientFraming::Length(48213),
                    close: false,
                    keep_alive_10: false,
                    upgrade: false,
                    request_id: Some(b"0123456789abcdef0123456789abcdef"),
                    security: &security,
                    hsts: None,
                    set_cookies: b"",
                },
            );
            black_box(out.len());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
