//! ringway-origin: the upstream of the load tests (and a demo app for the README).
//!
//! Keep-alive HTTP/1.1 on monoio, one thread per requested core, SO_REUSEPORT. Endpoints:
//! - `GET /` (or any other path): a 13-byte body;
//! - `GET /bytes/N`: N bytes of body (e.g. `/bytes/1048576` for the 1 MiB scenario);
//! - `POST`/`PUT` anything: reads the body (Content-Length or chunked, not validated beyond
//!   what is needed to find its end) and answers with its size;
//! - `GET /__stats`: connections accepted and requests answered so far, not counting `/__*`
//!   requests (the load test derives upstream connections per 1,000 requests from it; the
//!   failover test tells proxied requests from health checks of `/__health` by it).
//!
//! It is built to never be the bottleneck of a proxy benchmark, not to be a correct server.

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Connections accepted and requests answered, over all threads (`GET /__stats`).
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SMALL: &[u8] = b"Hello, world\n";
const BUF_BYTES: usize = 64 * 1024;

fn usage() -> ! {
    eprintln!("usage: ringway-origin [--listen ADDR] [--threads N] [--cores 1,2]");
    std::process::exit(2);
}

fn main() {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 3000));
    let mut threads = 1usize;
    let mut cores: Vec<usize> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--cores" => {
                cores = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .filter_map(|c| c.parse().ok())
                    .collect()
            }
            _ => usage(),
        }
    }
    let mut handles = Vec::new();
    for i in 0..threads.max(1) {
        let core = cores.get(i % cores.len().max(1)).copied();
        handles.push(std::thread::spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(core_affinity::CoreId { id: c });
            }
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(listen),
                socket2::Type::STREAM,
                None,
            )
            .unwrap_or_else(|e| {
                eprintln!("socket: {e}");
                std::process::exit(1)
            });
            let _ = sock.set_reuse_port(true);
            let _ = sock.set_reuse_address(true);
            let _ = sock.set_nonblocking(true);
            if let Err(e) = sock.bind(&listen.into()).and_then(|_| sock.listen(4096)) {
                eprintln!("bind {listen}: {e}");
                std::process::exit(1);
            }
            let std_listener: std::net::TcpListener = sock.into();
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .unwrap_or_else(|e| {
                    eprintln!("runtime: {e}");
                    std::process::exit(1)
                });
            rt.block_on(async move {
                let Ok(l) = TcpListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                        let _ = s.set_nodelay(true);
                        monoio::spawn(serve(s));
                    }
                }
            });
        }));
    }
    eprintln!("ringway-origin listening on {listen} with {threads} thread(s)");
    for h in handles {
        let _ = h.join();
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

async fn serve(mut s: TcpStream) {
    let mut buf: Vec<u8> = Vec::with_capacity(BUF_BYTES);
    let big = vec![b'x'; BUF_BYTES];
    let mut big = Some(big);
    loop {
        // Read a head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() == buf.capacity() {
                buf.reserve(BUF_BYTES);
            }
            let len = buf.len();
            let cap = buf.capacity();
            let (r, b) = s.read(monoio::buf::SliceMut::new(buf, len, cap)).await;
            buf = b.into_inner();
            match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if req.parse(&buf[..head_end]).is_err() {
            return;
        }
        let path = req.path.unwrap_or("/").to_string();
        let mut content_length = 0u64;
        let mut chunked = false;
        let mut close = req.version == Some(0);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            }
        }
        buf.drain(..head_end);
        // Consume the body.
        let mut body = 0u64;
        if chunked {
            loop {
                if let Some(i) = find(&buf, b"0\r\n\r\n") {
                    body += i as u64;
                    buf.drain(..i + 5);
                    break;
                }
                let keep = buf.len().saturating_sub(4);
                body += keep as u64;
                buf.drain(..keep);
                let len = buf.len();
                let cap = buf.capacity();
                let (r, b) = s.read(monoio::buf::SliceMut::new(buf, len, cap)).await;
                buf = b.into_inner();
                if !matches!(r, Ok(n) if n > 0) {
                    return;
                }
            }
        } else {
            let mut left = content_length;
            while left > 0 {
                if buf.is_empty() {
                    let cap = buf.capacity();
                    let (r, b) = s.read(monoio::buf::SliceMut::new(buf, 0, cap)).await;
                    buf = b.into_inner();
                    if !matches!(r, Ok(n) if n > 0) {
                        return;
                    }
                }
                let take = (buf.len() as u64).min(left) as usize;
                buf.drain(..take);
                left -= take as u64;
                body += take as u64;
            }
        }
        // Respond.
        let size: usize = if content_length > 0 || chunked {
            0
        } else {
            path.strip_prefix("/bytes/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(SMALL.len())
        };
        let mut head = Vec::with_capacity(256);
        // Its own stats and health checks (`/__*`) are not counted: the failover test tells
        // proxied traffic from probes by this.
        if !path.starts_with("/__") {
            REQUESTS.fetch_add(1, Ordering::Relaxed);
        }
        let body_small: Vec<u8> = if path == "/__stats" {
            format!(
                "connections={} requests={}\n",
                CONNECTIONS.load(Ordering::Relaxed),
                REQUESTS.load(Ordering::Relaxed)
            )
            .into_bytes()
        } else if content_length > 0 || chunked {
            format!("received {body}\n").into_bytes()
        } else if size == SMALL.len() && !path.starts_with("/bytes/") {
            SMALL.to_vec()
        } else {
            Vec::new()
        };
        let len = if body_small.is_empty() {
            size
        } else {
            body_small.len()
        };
        head.extend_from_slice(b"HTTP/1.1 200 OK\r\nServer: ringway-origin\r\nContent-Type: text/plain\r\nContent-Length: ");
        head.extend_from_slice(len.to_string().as_bytes());
        head.extend_from_slice(if close {
            b"\r\nConnection: close\r\n\r\n"
        } else {
            b"\r\n\r\n"
        });
        head.extend_from_slice(&body_small);
        let (r, _) = s.write_all(head).await;
        if r.is_err() {
            return;
        }
        if body_small.is_empty() {
            let mut left = size;
            while left > 0 {
                let Some(b) = big.take() else { return };
                let n = left.min(b.len());
                let (r, b) = s.write_all(monoio::buf::Slice::new(b, 0, n)).await;
                big = Some(b.into_inner());
                if r.is_err() {
                    return;
                }
                left -= n;
            }
        }
        if close {
            return;
        }
    }
}
