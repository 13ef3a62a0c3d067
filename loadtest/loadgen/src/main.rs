//! ringway-loadgen: the two load shapes wrk cannot produce.
//!
//! `rate`: a fixed offered rate over keep-alive connections. Each request has an intended send
//! time on a fixed schedule; its latency is measured from that time, not from when it could
//! actually be sent, so a stall shows up in the percentiles instead of hiding behind fewer
//! requests (no coordinated omission). Prints one JSON line.
//!
//! `idle`: opens N keep-alive connections, sends one request on each, then holds them all
//! open. Prints `ready` when every connection is established and answered, then JSON after
//! the hold time. The load test reads the proxy's RSS while they are held.
//!
//! `handshakes`: a full TLS 1.3 handshake per request, never resumed (see `handshakes.rs`).
//!
//! `slow`: N slow clients (slow headers or a slow body) held for S seconds, each reopened when
//! the server closes it (see `slow.rs`).

mod handshakes;
mod slow;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage:\n  ringway-loadgen rate ADDR HOST PATH --rate R --connections C --seconds S\n  ringway-loadgen timeline ADDR HOST PATH --rate R --connections C --seconds S\n  ringway-loadgen idle ADDR HOST PATH --connections N --hold-seconds S\n  ringway-loadgen handshakes ADDR SNI PATH --connections C --seconds S\n  ringway-loadgen slow ADDR HOST PATH --connections N --seconds S --kind headers|body [--interval-ms MS]"
    );
    std::process::exit(2)
}

struct Args {
    mode: String,
    addr: SocketAddr,
    host: String,
    path: String,
    rate: f64,
    connections: usize,
    seconds: f64,
    kind: String,
    interval_ms: Option<u64>,
}

fn parse() -> Args {
    let mut a = std::env::args().skip(1);
    let mode = a.next().unwrap_or_else(|| usage());
    let addr = a
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| usage());
    let host = a.next().unwrap_or_else(|| usage());
    let path = a.next().unwrap_or_else(|| usage());
    let mut args = Args {
        mode,
        addr,
        host,
        path,
        rate: 1000.0,
        connections: 64,
        seconds: 10.0,
        kind: "headers".into(),
        interval_ms: None,
    };
    while let Some(k) = a.next() {
        let v = a.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--rate" => args.rate = v.parse().unwrap_or_else(|_| usage()),
            "--connections" => args.connections = v.parse().unwrap_or_else(|_| usage()),
            "--seconds" | "--hold-seconds" => args.seconds = v.parse().unwrap_or_else(|_| usage()),
            "--kind" => args.kind = v,
            "--interval-ms" => args.interval_ms = Some(v.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    args
}

/// Reads one response (Content-Length or chunked bodies of the origin). Returns false on error.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut filled = 0usize;
    buf.clear();
    loop {
        if let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
            let head_end = end + 4;
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            if r.parse(&buf[..head_end]).is_err() || r.code.is_none_or(|c| c >= 400) {
                return false;
            }
            let len: usize = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            let mut have = filled - head_end;
            while have < len {
                buf.clear();
                let cap = buf.capacity();
                let (res, b) = s
                    .read(monoio::buf::SliceMut::new(std::mem::take(buf), 0, cap))
                    .await;
                *buf = b.into_inner();
                match res {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => have += n,
                }
            }
            return true;
        }
        if buf.len() == buf.capacity() {
            buf.reserve(16 * 1024);
        }
        let cap = buf.capacity();
        let (res, b) = s
            .read(monoio::buf::SliceMut::new(std::mem::take(buf), filled, cap))
            .await;
        *buf = b.into_inner();
        match res {
            Ok(0) | Err(_) => return false,
            Ok(n) => filled += n,
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[derive(Default)]
struct Totals {
    lat_us: Vec<u32>,
    /// Timeline mode: (due ms since start, latency us, ok) of every request.
    events: Vec<(u32, u32, bool)>,
    errors: u64,
    connected: usize,
}

fn main() {
    let a = parse();
    if a.mode == "handshakes" {
        handshakes::run(a.addr, &a.host, &a.path, a.connections, a.seconds);
        return;
    }
    if a.mode == "slow" {
        let interval = a
            .interval_ms
            .unwrap_or(if a.kind == "body" { 1000 } else { 10_000 });
        slow::run(
            a.addr,
            &a.host,
            &a.path,
            a.connections,
            a.seconds,
            &a.kind,
            interval,
        );
        return;
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(4096)
        .enable_timer()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("runtime: {e}");
            std::process::exit(1)
        });
    rt.block_on(async move {
        let totals = Rc::new(RefCell::new(Totals::default()));
        let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", a.path, a.host).into_bytes();
        let start = Instant::now() + Duration::from_millis(200);
        let end = start + Duration::from_secs_f64(a.seconds);
        let mut tasks = Vec::new();
        for i in 0..a.connections {
            let (totals, req, mode) = (totals.clone(), req.clone(), a.mode.clone());
            let (addr, rate, conns) = (a.addr, a.rate, a.connections);
            tasks.push(monoio::spawn(async move {
                let Ok(mut s) = TcpStream::connect_addr(addr).await else {
                    totals.borrow_mut().errors += 1;
                    return;
                };
                let _ = s.set_nodelay(true);
                let mut buf = Vec::with_capacity(64 * 1024);
                if mode == "idle" {
                    let (r, _) = s.write_all(req.clone()).await;
                    if r.is_err() || !read_response(&mut s, &mut buf).await {
                        totals.borrow_mut().errors += 1;
                        return;
                    }
                    buf = Vec::new();
                    totals.borrow_mut().connected += 1;
                    monoio::time::sleep_until(monoio::time::Instant::from_std(end)).await;
                    drop(buf);
                    drop(s);
                    return;
                }
                // Requests of this connection are due every conns/rate seconds, staggered.
                let period = Duration::from_secs_f64(conns as f64 / rate);
                let mut due = start + period.mul_f64(i as f64 / conns as f64);
                let mut lat = Vec::new();
                let mut errors = 0u64;
                // Timeline mode: a failed request is counted and the connection opened again,
                // and every request is kept with its due time (a failover shows over time).
                let timeline = mode == "timeline";
                let mut events = Vec::new();
                while due < end {
                    let now = Instant::now();
                    if due > now {
                        monoio::time::sleep(due - now).await;
                    }
                    let (r, _) = s.write_all(req.clone()).await;
                    let ok = r.is_ok() && read_response(&mut s, &mut buf).await;
                    let us = due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    if timeline {
                        let at_ms = due.saturating_duration_since(start).as_millis() as u32;
                        events.push((at_ms, us, ok));
                    }
                    if !ok {
                        errors += 1;
                        if !timeline {
                            break;
                        }
                        match TcpStream::connect_addr(addr).await {
                            Ok(n) => {
                                s = n;
                                let _ = s.set_nodelay(true);
                            }
                            Err(_) => monoio::time::sleep(Duration::from_millis(1)).await,
                        }
                    } else {
                        lat.push(us);
                    }
                    due += period;
                }
                let mut t = totals.borrow_mut();
                t.lat_us.extend_from_slice(&lat);
                t.events.extend_from_slice(&events);
                t.errors += errors;
                t.connected += 1;
            }));
            if a.mode == "idle" && i % 256 == 255 {
                // Let the accept queues drain while opening thousands of connections.
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if a.mode == "idle" {
            // Wait until every connection is answered, then say so.
            loop {
                let settled = {
                    let t = totals.borrow();
                    t.connected + t.errors as usize >= a.connections
                };
                if settled {
                    break;
                }
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("ready");
        }
        for t in tasks {
            t.await;
        }
        let mut t = totals.borrow_mut();
        t.lat_us.sort_unstable();
        let done = t.lat_us.len();
        println!(
            "{{\"mode\":\"{}\",\"offered_rps\":{},\"completed\":{},\"achieved_rps\":{:.1},\"errors\":{},\"connected\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
            a.mode,
            a.rate,
            done,
            done as f64 / a.seconds,
            t.errors,
            t.connected,
            pct(&t.lat_us, 0.50),
            pct(&t.lat_us, 0.99),
            pct(&t.lat_us, 0.999),
            pct(&t.lat_us, 1.0)
        );
        if a.mode == "timeline" {
            t.events.sort_unstable();
            // LOADGEN_WINDOW_MS=A-B: one more line for requests due in [A, B) ms.
            if let Some((lo, hi)) = std::env::var("LOADGEN_WINDOW_MS")
                .ok()
                .and_then(|w| {
                    let (a, b) = w.split_once('-')?;
                    Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
                })
            {
                let win: Vec<&(u32, u32, bool)> =
                    t.events.iter().filter(|e| e.0 >= lo && e.0 < hi).collect();
                let mut lats: Vec<u32> = win.iter().map(|e| e.1).collect();
                lats.sort_unstable();
                println!(
                    "{{\"window_ms\":[{lo},{hi}],\"requests\":{},\"failed\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
                    win.len(),
                    win.iter().filter(|e| !e.2).count(),
                    pct(&lats, 0.5),
                    pct(&lats, 0.99),
                    pct(&lats, 1.0)
                );
            }
            // One line per 100 ms of due time: requests, failures, p99 latency.
            let mut i = 0;
            while i < t.events.len() {
                let bucket = t.events[i].0 / 100;
                let mut lats = Vec::new();
                let mut failed = 0;
                while i < t.events.len() && t.events[i].0 / 100 == bucket {
                    lats.push(t.events[i].1);
                    failed += u32::from(!t.events[i].2);
                    i += 1;
                }
                lats.sort_unstable();
                println!(
                    "{{\"t_ms\":{},\"requests\":{},\"failed\":{},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
                    bucket * 100,
                    lats.len(),
                    failed,
                    pct(&lats, 0.99),
                    pct(&lats, 1.0)
                );
            }
        }
    });
}
