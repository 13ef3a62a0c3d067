//! Upstreams that are down, slow, rude or gone, and clients that leave halfway.

use crate::support::*;
use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[test]
fn upstream_down_gets_502() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let p = TestProxy::start(&routes_to(addr));
    let r = get(p.addr, "app.test", "/");
    assert_eq!(r.status, 502);
    assert!(r.text().contains(r.header("x-request-id").unwrap()));
    assert_eq!(p.metric_sum("ringway_upstream_connect_errors_total"), 1.0);
}

#[test]
fn upstream_connect_timeout_gets_504() {
    // A listener whose accept queue is full drops SYNs: connects hang.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let p = TestProxy::start_with(&routes_to(addr), |c| c.timeouts.upstream_connect_ms = 300);
    let t = Instant::now();
    let r = get(p.addr, "app.test", "/");
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn upstream_that_hangs_gets_504() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.timeouts.upstream_read_ms = 300
    });
    let t = Instant::now();
    let r = get(p.addr, "app.test", "/hang");
    assert_eq!(r.status, 504);
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(3));
    // The proxy is fine afterwards.
    assert_eq!(get(p.addr, "app.test", "/ok").status, 200);
}

#[test]
fn upstream_reset_mid_body_aborts_the_client_and_does_not_poison_the_pool() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /reset/100000 HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let r = c.read_response(false);
    assert!(
        r.is_err(),
        "the client must see the body cut short, not a complete response"
    );
    assert!(c.is_closed());
    // New requests work, on a new upstream connection.
    let before = origin.connections();
    let mut c = Conn::connect(p.addr);
    for _ in 0..3 {
        assert_eq!(c.get("app.test", "/after-reset").status, 200);
    }
    assert_eq!(origin.connections(), before + 1);
}

#[test]
fn client_leaving_mid_upload_discards_the_upstream_connection() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    {
        let mut c = Conn::connect(p.addr);
        c.send(b"POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000000\r\n\r\n");
        // More than `limits.request_buffer_bytes`, so the upstream is connected.
        c.stream.write_all(&[b'x'; 100_000]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    } // dropped: the client is gone with 900,000 bytes unsent
    assert!(
        eventually(Duration::from_secs(5), || origin.closed_early() == 1),
        "the upstream saw its request body end early (connection closed, not reused)"
    );
    let before = origin.connections();
    assert_eq!(get(p.addr, "app.test", "/next").status, 200);
    assert_eq!(
        origin.connections(),
        before + 1,
        "a fresh upstream connection serves the next request"
    );
    let r = get(p.addr, "app.test", "/next2");
    assert_eq!(r.status, 200);
}

#[test]
fn client_leaving_mid_download_discards_the_upstream_connection() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    {
        let mut c = Conn::connect(p.addr);
        c.send(b"GET /source/50000000 HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let mut buf = [0u8; 1000];
        std::io::Read::read_exact(&mut c.stream, &mut buf).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = origin.connections();
    assert_eq!(get(p.addr, "app.test", "/next").status, 200);
    assert_eq!(origin.connections(), before + 1);
}

#[test]
fn stale_pooled_connections_are_detected_or_retried() {
    let origin = Origin::start();
    // Every reuse peeks first: a connection the upstream closed while idle is discarded.
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    assert_eq!(c.get("app.test", "/idle-close").status, 200);
    std::thread::sleep(Duration::from_millis(400)); // the upstream closes its side meanwhile
    assert_eq!(c.get("app.test", "/again").status, 200);
    assert_eq!(p.metric_sum("ringway_upstream_stale_total"), 1.0);
    drop(p);

    // A close that races the request (the upstream reads it and closes without answering)
    // fails the reused connection before any response byte: the idempotent request is
    // retried once on a new connection.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                for n in 0.. {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if n == 1 {
                        return; // the second request on a connection: closed unanswered
                    }
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
    });
    let p = TestProxy::start_with(&routes_to(addr), |c| c.workers.count = 1);
    let mut c = Conn::connect(p.addr);
    assert_eq!(c.get("app.test", "/first").status, 200);
    assert_eq!(c.get("app.test", "/second").status, 200);
    assert_eq!(p.metric_sum("ringway_upstream_retries_total"), 1.0);
}

#[test]
fn several_upstreams_share_the_load() {
    let a = Origin::start();
    let b = Origin::start();
    let routes = format!(
        "[[route]]\nname = \"ab\"\nhosts = [\"app.test\"]\nupstreams = [\"{}\", \"{}\"]\n",
        a.addr, b.addr
    );
    let p = TestProxy::start_with(&routes, |c| c.workers.count = 1);
    for i in 0..20 {
        assert_eq!(get(p.addr, "app.test", &format!("/{i}")).status, 200);
    }
    assert_eq!(a.requests().len(), 10);
    assert_eq!(b.requests().len(), 10);
}
