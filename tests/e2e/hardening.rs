//! Hardening: no response reaches a request it does not belong to, the client cannot strip or
//! spoof what the proxy owns, path rules see what the upstream will see, and slow clients
//! cannot hold upstream connections.

use crate::support::pki::{Ca, TlsClient, client_accepting_any};
use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request as a [`RawOrigin`] received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// The whole head, as it came.
    head: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// An upstream that answers with whatever its handler writes, to misbehave exactly as a test
/// needs. The handler gets the connection, the request and its index on the connection, and
/// returns whether to read another request.
struct RawOrigin {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Handler = dyn Fn(&mut TcpStream, &Seen, usize) -> bool + Send + Sync;

fn raw_origin(
    handler: impl Fn(&mut TcpStream, &Seen, usize) -> bool + Send + Sync + 'static,
) -> RawOrigin {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler: Arc<Handler> = Arc::new(handler);
    let (c, s) = (connections.clone(), seen.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_nodelay(true);
            c.fetch_add(1, Ordering::SeqCst);
            let (s, h) = (s.clone(), handler.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                for n in 0.. {
                    let Some(req) = read_request(&mut r) else {
                        return;
                    };
                    s.lock().unwrap().push(req.clone());
                    if !h(&mut conn, &req, n) {
                        return;
                    }
                }
            });
        }
    });
    RawOrigin {
        addr,
        connections,
        seen,
    }
}

impl RawOrigin {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one request head (and a Content-Length body, discarded).
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut words = head.split(' ');
    let seen = Seen {
        method: words.next()?.to_string(),
        path: words.next()?.to_string(),
        head: head.clone(),
    };
    if let Some(n) = seen.header("content-length") {
        let mut body = vec![0u8; n.parse().ok()?];
        r.read_exact(&mut body).ok()?;
    }
    Some(seen)
}

/// Writes a whole response in one write (so it leaves in one segment).
fn respond(s: &mut TcpStream, status: &str, body: &str) {
    let r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(r.as_bytes());
}

const EVIL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Evil: 1\r\n\r\nEVIL";

/// Two routes on one upstream: a response left on a pooled connection could reach a request
/// of either.
fn two_routes(upstream: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"a\"\nhosts = [\"app.test\"]\nupstreams = [\"{upstream}\"]\n\
         [[route]]\nname = \"b\"\nhosts = [\"other.test\"]\nupstreams = [\"{upstream}\"]\n"
    )
}

#[test]
fn bytes_sent_after_a_complete_response_never_reach_the_next_request() {
    // The origin says when its stray bytes are out, so the next request goes only after they
    // reached the idle pooled connection, however slow the machine is.
    let strays = Arc::new(AtomicUsize::new(0));
    let written = strays.clone();
    let o = raw_origin(move |s, req, _| {
        let mut stray = true;
        match req.path.as_str() {
            // A body after a HEAD answer, arriving as a response of its own.
            "/head-then-response" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n");
                std::thread::sleep(Duration::from_millis(30));
                let _ = s.write_all(EVIL);
            }
            "/204-then-response" => {
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
                std::thread::sleep(Duration::from_millis(30));
                let _ = s.write_all(EVIL);
            }
            "/second-response" => {
                respond(s, "200 OK", "ok");
                std::thread::sleep(Duration::from_millis(30));
                let _ = s.write_all(EVIL);
            }
            "/stray-bytes" => {
                respond(s, "200 OK", "ok");
                std::thread::sleep(Duration::from_millis(50));
                let _ = s.write_all(b"garbage\r\n");
            }
            p => {
                stray = false;
                respond(s, "200 OK", p);
            }
        }
        if stray {
            written.fetch_add(1, Ordering::SeqCst);
        }
        true
    });
    let p = TestProxy::start_with(&two_routes(o.addr), |c| c.workers.count = 1);
    let cases = [
        ("HEAD", "/head-then-response"),
        ("GET", "/204-then-response"),
        ("GET", "/second-response"),
        ("GET", "/stray-bytes"),
    ];
    for (case, (method, path)) in cases.into_iter().enumerate() {
        let mut a = Conn::connect(p.addr);
        a.send(format!("{method} {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes());
        let r = a.read_response(method == "HEAD").unwrap();
        assert!(r.status == 200 || r.status == 204, "{path}: {}", r.status);
        // The bytes arrive while the upstream connection waits in the pool, returned a
        // moment ago (well within the 100 ms "recently used" window of earlier versions) ...
        assert!(eventually(Duration::from_secs(5), || strays
            .load(Ordering::SeqCst)
            == case + 1));
        std::thread::sleep(Duration::from_millis(10));
        // ... and the next requests, from other clients on another route, get their own.
        for i in 0..3 {
            let r = get(p.addr, "other.test", &format!("/mine/{i}"));
            assert_eq!(
                (r.status, r.text()),
                (200, format!("/mine/{i}")),
                "after {path}"
            );
            assert!(r.header("x-evil").is_none());
        }
    }
    assert_eq!(p.metric_sum("ringway_upstream_stray_bytes_total"), 4.0);
    assert_eq!(o.seen()[0].method, "HEAD");
}

#[test]
fn a_204_that_announces_a_body_is_not_trusted_with_another_request() {
    let o = raw_origin(|s, req, _| {
        if req.path == "/204-with-length" {
            // No stray bytes at all: the announced length alone keeps it out of the pool.
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n");
        } else {
            respond(s, "200 OK", &req.path);
        }
        true
    });
    let p = TestProxy::start_with(&routes_to(o.addr), |c| c.workers.count = 1);
    let mut c = Conn::connect(p.addr);
    assert_eq!(c.get("app.test", "/204-with-length").status, 204);
    let r = c.get("app.test", "/next");
    assert_eq!(r.text(), "/next");
    assert_eq!(o.connections(), 2);
    // An ordinary 204 keeps its connection.
    let r = c.get("app.test", "/again");
    assert_eq!(r.text(), "/again");
    assert_eq!(o.connections(), 2);
}

/// Reads responses until a final (non-1xx) one; returns the interim statuses and the final.
fn read_final(c: &mut Conn) -> (Vec<u16>, std::io::Result<crate::support::client::Response>) {
    let mut interim = Vec::new();
    loop {
        match c.read_response(false) {
            Ok(r) if r.status < 200 => interim.push(r.status),
            other => return (interim, other),
        }
    }
}

#[test]
fn interim_responses_are_capped_in_number_and_time() {
    let o = raw_origin(|s, req, _| {
        let hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n";
        match req.path.as_str() {
            "/few" => {
                for _ in 0..3 {
                    let _ = s.write_all(hint);
                }
                respond(s, "200 OK", "done");
            }
            "/many" => {
                for _ in 0..20 {
                    let _ = s.write_all(hint);
                }
                respond(s, "200 OK", "done");
            }
            "/forever" => {
                while s.write_all(hint).is_ok() {
                    std::thread::sleep(Duration::from_millis(300));
                }
                return false;
            }
            "/then-close" => {
                let _ = s.write_all(hint);
                return false;
            }
            p => respond(s, "200 OK", p),
        }
        true
    });
    let p = TestProxy::start_with(&routes_to(o.addr), |c| c.timeouts.upstream_read_ms = 1000);
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /few HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let (interim, r) = read_final(&mut c);
    assert_eq!(
        (interim, r.unwrap().text()),
        (vec![103; 3], "done".to_string())
    );

    let mut c = Conn::connect(p.addr);
    c.send(b"GET /many HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let (interim, r) = read_final(&mut c);
    assert_eq!(
        (interim.len(), r.unwrap().status),
        (8, 502),
        "8 relayed, then 502"
    );

    // 103 every 300 ms, each well within the read timeout: the final head is still due 1 s
    // after the first, so the time cap ends it after about 4 (not the count cap of 8).
    let t = Instant::now();
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /forever HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let (interim, r) = read_final(&mut c);
    assert_eq!(r.unwrap().status, 502);
    assert!(
        !interim.is_empty()
            && interim.len() < 8
            && t.elapsed() >= Duration::from_millis(900)
            && t.elapsed() < Duration::from_secs(4),
        "{interim:?} in {:?}",
        t.elapsed()
    );

    // An upstream that closes after an interim response: the client still gets an answer.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /then-close HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let (_, r) = read_final(&mut c);
    assert_eq!(r.unwrap().status, 502);
    assert_eq!(p.metric_sum("ringway_upstream_interim_exceeded_total"), 2.0);
    // The upstream connections that misbehaved were not pooled: the next request is clean.
    assert_eq!(get(p.addr, "app.test", "/after").text(), "/after");
}

#[test]
fn connection_options_cannot_remove_what_the_proxy_owns() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(
        b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: host, x-forwarded-for, \
          x-forwarded-proto, x-forwarded-host, x-request-id, x-real-ip, keep-alive, x-gone\r\n\
          X-Gone: 1\r\nX-Kept: 1\r\n\r\n",
    );
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(rec.header("host"), Some("app.test"));
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    assert_eq!(rec.header("x-forwarded-host"), Some("app.test"));
    assert_eq!(rec.header("x-request-id").map(str::len), Some(32));
    assert_eq!(
        rec.header("x-gone"),
        None,
        "an ordinary option is still hop-by-hop"
    );
    assert_eq!(rec.header("x-kept"), Some("1"));

    // The same from the upstream's side: its Connection options cannot take away the
    // headers the proxy adds.
    let o = raw_origin(|s, _, _| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nConnection: x-frame-options, x-request-id\r\n\
              X-Frame-Options: ALLOWALL\r\nX-Request-ID: app\r\nContent-Length: 2\r\n\r\nok",
        );
        true
    });
    let p = TestProxy::start(&routes_to(o.addr));
    let r = get(p.addr, "app.test", "/");
    assert_eq!(r.headers_named("x-frame-options"), vec!["SAMEORIGIN"]);
    let id = r.header("x-request-id").unwrap();
    assert_eq!(id.len(), 32, "{id}");
}

#[test]
fn absolute_form_without_a_path_is_the_path_slash() {
    let origin = Origin::start();
    let routes = format!(
        "{}[[route]]\nname = \"b\"\nhosts = [\"blocked.test\"]\nupstreams = [\"{}\"]\nproject_id = 12\n\
         [[policy]]\nproject_id = 12\nblock_paths = [\"/\"]\n",
        routes_to(origin.addr),
        origin.addr
    );
    let mut p = TestProxy::start(&routes);
    let mut c = Conn::connect(p.addr);
    c.send(b"GET http://app.test?x=1 HTTP/1.1\r\nHost: app.test\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert_eq!(origin.paths(), vec!["/?x=1"]);
    // The policy sees the path "/" too: a block on "/" catches it.
    c.send(b"GET http://blocked.test?x=1 HTTP/1.1\r\nHost: blocked.test\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 403);
    let log = p.stop();
    assert_eq!(log[0]["path"], "/");
}

#[test]
fn unusable_hosts_are_refused_and_never_reach_the_default_route() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    for host in [
        "",
        ".",
        ":80",
        "..",
        ".app.test",
        "app..test",
        "app.test..",
        "[]",
    ] {
        let mut c = Conn::connect(p.addr);
        c.send(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        assert_eq!(
            c.read_response(false).unwrap().status,
            400,
            "Host: {host:?}"
        );
        let mut c = Conn::connect(p.addr);
        c.send(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes());
        assert_eq!(
            c.read_response(false).unwrap().status,
            400,
            "HTTP/1.0 Host: {host:?}"
        );
    }
    assert!(origin.requests().is_empty(), "{:?}", origin.paths());
    // HTTP/1.0 without any Host still reaches the default route on plain HTTP.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
}

#[test]
fn redirects_never_take_their_authority_from_the_path() {
    let origin = Origin::start();
    let routes = format!(
        "default = \"app\"\n[[route]]\nname = \"app\"\nhosts = [\"app.test\"]\nupstreams = [\"{}\"]\nredirect_https = true\n",
        origin.addr
    );
    let p = TestProxy::start(&routes);
    // No Host (HTTP/1.0): there is no authority to redirect to. `https://` + `//evil.example/`
    // would send the browser to evil.example.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET //evil.example/x HTTP/1.0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("location"), None);
    // With a Host the authority is the host, and the path stays a path.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET //evil.example/x HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://app.test//evil.example/x")
    );
    let mut c = Conn::connect(p.addr);
    c.send(b"GET http://app.test?q=1 HTTP/1.1\r\nHost: app.test\r\n\r\n");
    assert_eq!(
        c.read_response(false).unwrap().header("location"),
        Some("https://app.test/?q=1")
    );
}

#[test]
fn http10_without_host_over_tls_is_routed_by_the_server_name() {
    let a = Origin::start();
    let fallback = Origin::start();
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"]);
    let routes = format!(
        "default = \"fallback\"\n[tls]\ndefault_certificate = \"a\"\n[[route]]\nname = \"a\"\nhosts = [\"a.test\"]\nupstreams = [\"{}\"]\n\
         [[route]]\nname = \"fallback\"\nhosts = [\"fallback.test\"]\nupstreams = [\"{}\"]\n\
         [[certificate]]\nname = \"a\"\ncert = \"tls/a.crt\"\nkey = \"tls/a.key\"\n",
        a.addr, fallback.addr
    );
    let p = TestProxy::start_with_files(
        &[("tls/a.crt", &leaf.cert_pem), ("tls/a.key", &leaf.key_pem)],
        &routes,
        |c| c.listen.https = Some("127.0.0.1:0".parse().unwrap()),
    );
    let https = p.https.unwrap();
    let mut t = TlsClient::connect(https, &ca.client(), "a.test").unwrap();
    let r = t.request(b"GET /by-sni HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(a.paths(), vec!["/by-sni"]);
    assert_eq!(a.requests()[0].header("host"), Some("a.test"));
    // No server name and no Host: nothing to route by but the default, which it must not
    // reach past the certificate check.
    let mut config = (*client_accepting_any()).clone();
    config.enable_sni = false;
    let mut t = TlsClient::connect(https, &Arc::new(config), "a.test").unwrap();
    let r = t.request(b"GET /nameless HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(r.status, 400);
    assert!(fallback.requests().is_empty());
}

#[test]
fn forwarding_headers_from_untrusted_peers_are_removed() {
    let spoofed: Vec<String> = ringway_core::config::UNTRUSTED_STRIP_DEFAULT
        .iter()
        .map(|h| h.to_string())
        .chain(
            [
                "X_Forwarded_For",
                "X_Real_IP",
                "x-forwarded-port",
                "X_REQUEST_ID",
            ]
            .map(String::from),
        )
        .collect();
    let head = |path: &str| {
        let mut h = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n");
        for name in &spoofed {
            h.push_str(&format!("{name}: 6.6.6.6\r\n"));
        }
        h.push_str("X-App: kept\r\n\r\n");
        h
    };
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(head("/headers").as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let rec = origin.requests().pop().unwrap();
    for name in &spoofed {
        let got = rec
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        assert!(
            got.is_none_or(|(_, v)| v != "6.6.6.6"),
            "{name} reached the upstream"
        );
    }
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-app"), Some("kept"));
    drop(p);

    // A trusted proxy's are believed (the list is only for untrusted peers).
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.headers.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]
    });
    let mut c = Conn::connect(p.addr);
    c.send(head("/headers").as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(rec.header("true-client-ip"), Some("6.6.6.6"));
    assert_eq!(rec.header("x-forwarded-port"), Some("6.6.6.6"));
    // Underscore spellings of the names the proxy sets are never believed.
    assert!(!rec.headers.iter().any(|(n, _)| n == "X_Forwarded_For"));
}

#[test]
fn only_allowed_protocols_can_upgrade() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(
        b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(rec.header("upgrade"), None);
    assert_eq!(rec.header("http2-settings"), None);
    assert_eq!(rec.header("connection"), None);
    // The connection is still plain HTTP/1.1.
    assert_eq!(c.get("app.test", "/plain").text(), "ok /plain");
    assert_eq!(p.metric_sum("ringway_upgrades_refused_total"), 1.0);

    // A list with an allowed protocol goes up with that one only.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: h2c, WebSocket/13\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(rec.header("upgrade"), Some("WebSocket/13"));

    // An upstream that switches to a protocol nobody was allowed to ask for: 502.
    let o = raw_origin(|s, _, _| {
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
        );
        false
    });
    let p = TestProxy::start(&routes_to(o.addr));
    let mut c = Conn::connect(p.addr);
    c.send(
        b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert_eq!(c.read_response(false).unwrap().status, 502);
}

/// Every spelling of `/wp-admin` a mainstream server routes to `/wp-admin` is blocked; the
/// spellings servers disagree on are refused; none reaches the upstream.
#[test]
fn path_rules_see_what_the_upstream_will_see() {
    let origin = Origin::start();
    let routes = format!(
        "{}[[policy]]\nproject_id = 11\nblock_paths = [\"/wp-admin\"]\n",
        routes_to(origin.addr)
    );
    let p = TestProxy::start(&routes);
    let status = |path: &str| {
        let mut c = Conn::connect(p.addr);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes());
        c.read_response(false).unwrap().status
    };
    for path in [
        "/wp-admin",
        "/WP-Admin/",
        "//wp-admin",
        "/./wp-admin",
        "/x/../wp-admin",
        "/%77p-admin",
        "/%2e%2e/wp-admin",
        "/x%2F..%2Fwp-admin",
        "/x%2f%2e%2e%2fwp-admin",
        "/x\\..\\wp-admin",
        "/x%5C..%5Cwp-admin",
        "/wp-admin;jsessionid=1",
        "/;x=1/wp-admin",
        "/a;b/../wp-admin/",
    ] {
        assert_eq!(status(path), 403, "{path}");
    }
    for path in [
        "/%zz/wp-admin",
        "/x/%252e%252e/wp-admin",
        "/x%c0%af..%c0%afwp-admin",
        "/public/..;/wp-admin",
        "/wp-admin%00.png",
    ] {
        assert_eq!(status(path), 400, "{path}");
    }
    assert_eq!(status("/wp-login"), 200);
    assert_eq!(status("/files/a%2Fb"), 200);
    assert!(
        !origin
            .paths()
            .iter()
            .any(|p| p.to_ascii_lowercase().contains("wp-admin")),
        "{:?}",
        origin.paths()
    );
    assert_eq!(p.metric_sum("ringway_ambiguous_paths_total"), 5.0);

    // A policy that reads no path refuses nothing for its spelling.
    let routes = format!(
        "{}[[policy]]\nproject_id = 11\ndeny = [\"192.0.2.1\"]\n",
        routes_to(origin.addr)
    );
    let p = TestProxy::start(&routes);
    assert_eq!(get(p.addr, "app.test", "/%zz").status, 200);
}

#[test]
fn clients_dripping_a_body_hold_no_upstream_connection_and_are_cut_off() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.timeouts.min_rate_grace_ms = 1000;
        c.limits.request_body_rate_min_bytes_per_s = 1024;
    });
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = p.addr;
            std::thread::spawn(move || {
                let mut c = Conn::connect(addr);
                c.send(b"POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\n\r\n");
                let t = Instant::now();
                // 2 bytes every 250 ms until the proxy answers (looked at without blocking).
                c.stream.set_nonblocking(true).unwrap();
                let mut sent = 0;
                while t.elapsed() < Duration::from_secs(10) {
                    if c.stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
                        break;
                    }
                    if c.try_send(b"xx").is_err() {
                        break;
                    }
                    sent += 2;
                    std::thread::sleep(Duration::from_millis(250));
                }
                let cut = t.elapsed();
                c.stream.set_nonblocking(false).unwrap();
                let status = c.read_response(false).map(|r| r.status).unwrap_or(0);
                (status, cut, sent)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        origin.connections(),
        0,
        "no upstream connection while the bodies drip"
    );
    for c in clients {
        let (status, cut, sent) = c.join().unwrap();
        assert_eq!(status, 408);
        // A second of credit, spent at 250 ms a wait and earned back at 2 bytes (2 ms) a
        // wait: cut after about 1 s of dripping, at the next 25 ms tick.
        assert!(
            cut >= Duration::from_millis(900) && cut < Duration::from_secs(4),
            "cut after {cut:?}"
        );
        assert!(sent >= 6, "{sent} bytes dripped");
    }
    assert_eq!(origin.connections(), 0);
    let slow = |p: &TestProxy| {
        metric_sum(
            &p.metrics(),
            "ringway_slow_clients_total{worker=\"0\",direction=\"request_body\"}",
        ) + metric_sum(
            &p.metrics(),
            "ringway_slow_clients_total{worker=\"1\",direction=\"request_body\"}",
        )
    };
    assert!(eventually(Duration::from_secs(2), || slow(&p) == 20.0));
    // A small body sent at once goes up whole, on one upstream connection.
    let mut c = Conn::connect(p.addr);
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(c.read_response(false).unwrap().text(), "hello");
}

#[test]
fn a_body_past_its_total_deadline_is_cut_off() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.timeouts.body_total_ms = 1500;
        c.limits.request_body_rate_min_bytes_per_s = 100;
    });
    let mut c = Conn::connect(p.addr);
    c.send(b"POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000000\r\n\r\n");
    // 100 KiB at once (past the buffer: the upstream is connected), then 1 KiB every 100 ms:
    // above the floor, but the whole body would take minutes.
    c.send(&[b'x'; 100 * 1024]);
    let t = Instant::now();
    c.stream.set_nonblocking(true).unwrap();
    while t.elapsed() < Duration::from_secs(5) {
        if c.stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
            break;
        }
        if c.try_send(&[b'y'; 1024]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut = t.elapsed();
    c.stream.set_nonblocking(false).unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 408);
    assert!(
        cut >= Duration::from_millis(1300) && cut < Duration::from_secs(3),
        "{cut:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || origin.closed_early() == 1),
        "the upstream saw its request end, not reused"
    );
}

/// An origin that streams an endless response and says when its connection was let go.
fn endless_origin() -> (RawOrigin, Arc<AtomicUsize>) {
    let released = Arc::new(AtomicUsize::new(0));
    let r = released.clone();
    let o = raw_origin(move |s, _, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n");
        let chunk = vec![b'z'; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
        r.fetch_add(1, Ordering::SeqCst);
        false
    });
    (o, released)
}

/// Reads `rate` bytes a second from `s` (0: none) until the proxy closes it or `limit`
/// passes; returns when it closed (None: it never did) and the bytes read.
/// Reads from `s` at `rate` bytes a second on average (0: nothing) until the proxy closes it
/// or `limit` passes; returns when it closed (None: it never did) and the bytes read. Reads
/// time out quickly (the caller sets the socket's read timeout), and a read that found
/// nothing is made up for by the next.
fn read_slowly(s: &mut impl Read, rate: usize, limit: Duration) -> (Option<Duration>, usize) {
    let t = Instant::now();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
        let due = (rate as f64 * t.elapsed().as_secs_f64()) as usize;
        let want = due.saturating_sub(got).min(buf.len());
        if want == 0 {
            continue;
        }
        match s.read(&mut buf[..want]) {
            Ok(0) => return (Some(t.elapsed()), got),
            Ok(n) => got += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (Some(t.elapsed()), got),
        }
    }
    (None, got)
}

#[test]
fn a_client_reading_too_slowly_lets_the_upstream_go() {
    let (o, released) = endless_origin();
    let p = TestProxy::start_with(&routes_to(o.addr), |c| {
        c.timeouts.min_rate_grace_ms = 1000;
        c.limits.response_rate_min_bytes_per_s = 1024;
    });
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&p.addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .unwrap();
    // Nothing taken at all once the kernel buffers are full: cut after the second of credit.
    let (closed, _) = read_slowly(&mut s, 0, Duration::from_secs(20));
    assert!(
        eventually(Duration::from_secs(15), || metric_sum(
            &p.metrics(),
            "ringway_slow_clients_total"
        ) >= 1.0),
        "the proxy gave up on the slow reader ({closed:?})"
    );
    // The upstream connection is let go with it, not held for the client.
    assert!(eventually(Duration::from_secs(5), || released
        .load(Ordering::SeqCst)
        == 1));
}

#[test]
fn tls_clients_are_judged_by_what_the_socket_moves() {
    let (o, released) = endless_origin();
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"]);
    let routes = format!(
        "[[route]]\nname = \"a\"\nhosts = [\"a.test\"]\nupstreams = [\"{}\"]\n\
         [[certificate]]\nname = \"a\"\ncert = \"tls/a.crt\"\nkey = \"tls/a.key\"\n",
        o.addr
    );
    let p = TestProxy::start_with_files(
        &[("tls/a.crt", &leaf.cert_pem), ("tls/a.key", &leaf.key_pem)],
        &routes,
        |c| {
            c.listen.https = Some("127.0.0.1:0".parse().unwrap());
            c.timeouts.min_rate_grace_ms = 3000;
            c.limits.response_rate_min_bytes_per_s = 4096;
        },
    );
    let https = p.https.unwrap();
    // A reader at 16 KB/s, four times the floor, with a small receive buffer so the proxy's
    // writes wait on it within a second. A 64 KiB write is flushed whole, which takes 4 s,
    // past the grace, and the kernel wakes the writer only in large steps: judged by its
    // writes, the client would be cut; judged by what it acknowledges, it is not.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&https.into()).unwrap();
    let mut t = TlsClient::handshake_over(sock.into(), &ca.client(), "a.test").unwrap();
    t.stream
        .sock
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    t.stream
        .write_all(b"GET /endless HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let (closed, got) = read_slowly(&mut t.stream, 16 * 1024, Duration::from_secs(10));
    assert_eq!(
        closed, None,
        "a reader above the floor was cut after {got} bytes"
    );
    assert_eq!(metric_sum(&p.metrics(), "ringway_slow_clients_total"), 0.0);
    drop(t);
    // One that takes nothing is cut once its grace is spent.
    let mut t = TlsClient::connect(https, &ca.client(), "a.test").unwrap();
    t.stream
        .write_all(b"GET /endless HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || metric_sum(
            &p.metrics(),
            "ringway_slow_clients_total"
        ) >= 1.0),
        "the silent TLS reader was never cut"
    );
    assert!(eventually(Duration::from_secs(5), || released
        .load(Ordering::SeqCst)
        >= 2));
}

#[test]
fn connections_per_client_are_capped_when_configured() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.limits.connections_per_client_max = 3;
    });
    let mut open: Vec<Conn> = (0..3).map(|_| Conn::connect(p.addr)).collect();
    for c in open.iter_mut() {
        assert_eq!(c.get("app.test", "/").status, 200);
    }
    let mut fourth = Conn::connect(p.addr);
    let _ = fourth.try_send(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n");
    assert!(
        fourth.is_closed(),
        "the fourth connection is closed at once"
    );
    assert_eq!(
        p.metric_sum("ringway_connections_refused_per_client_total"),
        1.0
    );
    // One closes: a new one is admitted.
    drop(open.pop());
    assert!(eventually(Duration::from_secs(2), || {
        Conn::connect(p.addr)
            .try_get("app.test", "/")
            .is_some_and(|r| r.status == 200)
    }));
    // Trusted proxies carry many clients and are not limited.
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.limits.connections_per_client_max = 1;
        c.headers.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    });
    let mut conns: Vec<Conn> = (0..5).map(|_| Conn::connect(p.addr)).collect();
    for c in conns.iter_mut() {
        assert_eq!(c.get("app.test", "/").status, 200);
    }
}
