//! `slow`: holds N connections of slow clients for S seconds, reopening each one the server
//! closes, so the pressure stays the same whatever the server's timeouts:
//! - `--kind headers` (slowloris): a request line and Host, then one more header line every
//!   `--interval-ms` (10,000), never the end of the head;
//! - `--kind body` (R-U-Dead-Yet): a whole head announcing a 1 MB body, then 2 bytes every
//!   `--interval-ms` (1,000).
//!
//! Prints `ready` once N connections were opened, then one JSON line at the end: connections
//! opened, closed by the server, and open at the end.

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Counts {
    opened: Cell<u64>,
    closed_by_server: Cell<u64>,
    connect_errors: Cell<u64>,
    open: Cell<u64>,
}

/// One slow client, reopened until `end`.
async fn client(
    addr: SocketAddr,
    host: Rc<str>,
    path: Rc<str>,
    body: bool,
    interval: Duration,
    end: Instant,
    c: Rc<Counts>,
) {
    while Instant::now() < end {
        let Ok(mut s) = TcpStream::connect_addr(addr).await else {
            c.connect_errors.set(c.connect_errors.get() + 1);
            monoio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        c.opened.set(c.opened.get() + 1);
        c.open.set(c.open.get() + 1);
        let head = if body {
            format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n\r\n")
        } else {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slow\r\n")
        };
        let mut ok = s.write_all(head.into_bytes()).await.0.is_ok();
        let mut n = 0u64;
        while ok && Instant::now() < end {
            // Wait for the interval, or for the server to answer or close.
            let buf = Vec::with_capacity(256);
            let read = s.read(buf);
            let sleep = monoio::time::sleep(interval);
            monoio::select! {
                (r, _) = read => {
                    // Any answer (408, 400) or EOF ends this client.
                    let _ = r;
                    ok = false;
                }
                _ = sleep => {}
            }
            if !ok {
                break;
            }
            n += 1;
            let piece = if body {
                b"xx".to_vec()
            } else {
                format!("X-Slow-{n}: {n}\r\n").into_bytes()
            };
            ok = s.write_all(piece).await.0.is_ok();
        }
        c.open.set(c.open.get() - 1);
        if Instant::now() < end {
            c.closed_by_server.set(c.closed_by_server.get() + 1);
        }
    }
}

pub fn run(
    addr: SocketAddr,
    host: &str,
    path: &str,
    connections: usize,
    seconds: f64,
    kind: &str,
    interval_ms: u64,
) {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(8192)
        .enable_timer()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("runtime: {e}");
            std::process::exit(1)
        });
    let body = kind == "body";
    let interval = Duration::from_millis(interval_ms);
    rt.block_on(async move {
        let c = Rc::new(Counts::default());
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        let (host, path): (Rc<str>, Rc<str>) = (host.into(), path.into());
        let mut tasks = Vec::with_capacity(connections);
        for i in 0..connections {
            tasks.push(monoio::spawn(client(addr, host.clone(), path.clone(), body, interval, end, c.clone())));
            if i % 256 == 255 {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        println!("ready");
        for t in tasks {
            t.await;
        }
        println!(
            "{{\"mode\":\"slow\",\"kind\":\"{kind}\",\"connections\":{connections},\"opened\":{},\"closed_by_server\":{},\"connect_errors\":{},\"open_at_end\":{}}}",
            c.opened.get(),
            c.closed_by_server.get(),
            c.connect_errors.get(),
            c.open.get()
        );
    });
}
