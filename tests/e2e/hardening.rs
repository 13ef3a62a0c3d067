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
    let o = raw_origin(|s, req, _| {
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
            p => respond(s, "200 OK", p),
        }
        true
    });
    let p = TestProxy::start_with(&two_routes(o.addr), |c| c.workers.count = 1);
    for (method, path) in [
        ("HEAD", "/head-then-response"),
        ("GET", "/204-then-response"),
        ("GET", "/second-response"),
        ("GET", "/stray-bytes"),
    ] {
        let mut a = Conn::connect(p.addr);
        a.send(format!("{method} {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes());
        let r = a.read_response(method == "HEAD").unwrap();
        assert!(r.status == 200 || r.status == 204, "{path}: {}", r.status);
        // The bytes arrive while the upstream connection waits in the pool, reused a moment
        // ago (well within any "recently used" window) ...
        std::thread::sleep(Duration::from_millis(80));
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
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n");
            std::thread::sleep(Duration::from_millis(5));
            let _ = s.write_all(EVIL);
        } else {
            respond(s, "200 OK", &req.path);
        }
        true
    });
    let p = TestProxy::start_with(&routes_to(o.addr), |c| c.workers.count = 1);
    let mut c = Conn::connect(p.addr);
    assert_eq!(c.get("app.test", "/204-with-length").status, 204);
    // At once, before the stray bytes arrive: a fresh connection all the same.
    let r = c.get("app.test", "/next");
    assert_eq!(r.text(), "/next");
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
                    std::thread::sleep(Duration::from_millis(100));
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
    let p = TestProxy::start_with(&routes_to(o.addr), |c| c.timeouts.upstream_read_ms = 600);
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

    // 103 every 100 ms, each within the read timeout: the final head is still due 600 ms
    // after the first.
    let t = Instant::now();
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /forever HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let (interim, r) = read_final(&mut c);
    assert_eq!(r.unwrap().status, 502);
    assert!(
        interim.len() >= 4 && t.elapsed() < Duration::from_secs(3),
        "{interim:?}"
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
    let t = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = p.addr;
            std::thread::spawn(move || {
                let mut c = Conn::connect(addr);
                c.send(b"POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\n\r\n");
                // 2 bytes every 250 ms until the proxy gives up.
                for _ in 0..40 {
                    if c.try_send(b"xx").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                    if c.stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
                        break;
                    }
                }
                c.read_response(false).map(|r| r.status).unwrap_or(0)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        origin.connections(),
        0,
        "no upstream connection while the bodies drip"
    );
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(statuses.iter().all(|&s| s == 408), "{statuses:?}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(origin.connections(), 0);
    assert!(eventually(Duration::from_secs(2), || metric_sum(
        &p.metrics(),
        "ringway_slow_clients_total{worker=\"0\",direction=\"request_body\"}"
    ) + metric_sum(
        &p.metrics(),
        "ringway_slow_clients_total{worker=\"1\",direction=\"request_body\"}"
    ) == 20.0));
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
    while c.try_send(&[b'y'; 1024]).is_ok() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        if c.stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
            break;
        }
    }
    assert_eq!(c.read_response(false).unwrap().status, 408);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        eventually(Duration::from_secs(3), || origin.closed_early() == 1),
        "the upstream saw its request end, not reused"
    );
}

#[test]
fn a_client_reading_too_slowly_lets_the_upstream_go() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.timeouts.min_rate_grace_ms = 1000;
        c.limits.response_rate_min_bytes_per_s = 1024;
    });
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&p.addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.write_all(b"GET /source/200000000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .unwrap();
    // Take one byte a second: far below the floor.
    let t = Instant::now();
    let mut got = 0usize;
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        match s.read(&mut [0u8; 1]) {
            Ok(0) | Err(_) if got > 0 => {
                closed = true;
                break;
            }
            Ok(n) => got += n,
            Err(_) => {}
        }
        if metric_sum(&p.metrics(), "ringway_slow_clients_total") >= 1.0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the proxy gave up on the slow reader");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // The upstream connection is let go, not held for the client.
    let before = origin.connections();
    assert_eq!(get(p.addr, "app.test", "/next").status, 200);
    assert_eq!(origin.connections(), before + 1);
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
