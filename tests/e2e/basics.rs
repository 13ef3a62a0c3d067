//! Routing, keep-alive, pipelining, headers, limits, logs and metrics.

use crate::support::*;
use ringway_core::Driver;
use std::time::Duration;

#[test]
fn proxies_a_request_on_io_uring() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let r = get(p.addr, "app.test", "/hello");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok /hello");
    assert_eq!(r.header("x-origin"), Some("yes"));
    if kernel_allows_io_uring() {
        assert!(
            p.running().drivers.iter().all(|d| *d == Driver::IoUring),
            "io_uring is allowed here, so every worker must use it: {:?}",
            p.running().drivers
        );
        let m = p.metrics();
        assert!(
            m.contains("ringway_worker_driver{worker=\"0\",driver=\"io_uring\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("ringway_worker_driver{worker=\"1\",driver=\"io_uring\"} 1"),
            "{m}"
        );
    }
}

#[test]
fn keep_alive_reuses_one_upstream_connection() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    for i in 0..1000 {
        let r = c.get("app.test", &format!("/k{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("ok /k{i}"));
    }
    assert_eq!(
        origin.connections(),
        1,
        "1,000 keep-alive requests over one upstream connection"
    );
    assert_eq!(p.metric_sum("ringway_upstream_connects_total"), 1.0);
    assert_eq!(p.metric_sum("ringway_upstream_reuses_total"), 999.0);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    let mut batch = Vec::new();
    for i in 0..5 {
        if i == 2 {
            batch.extend_from_slice(
                b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello",
            );
        } else if i == 3 {
            batch.extend_from_slice(
                b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            );
        } else {
            batch.extend_from_slice(
                format!("GET /p{i} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes(),
            );
        }
    }
    c.send(&batch);
    let texts: Vec<String> = (0..5)
        .map(|_| c.read_response(false).unwrap().text())
        .collect();
    assert_eq!(texts, ["ok /p0", "ok /p1", "hello", "abc", "ok /p4"]);
}

#[test]
fn unknown_host_gets_404_with_request_id_and_default_route_catches_all() {
    let origin = Origin::start();
    let routes = format!(
        "[[route]]\nname = \"a\"\nhosts = [\"app.test\"]\nupstreams = [\"{}\"]\n",
        origin.addr
    );
    let p = TestProxy::start(&routes);
    let r = get(p.addr, "nowhere.test", "/");
    assert_eq!(r.status, 404);
    let rid = r.header("x-request-id").unwrap().to_string();
    assert_eq!(rid.len(), 32);
    assert!(r.text().contains(&rid), "HTML page carries the request id");
    let mut c = Conn::connect(p.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nAccept: application/json\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 404);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["status"], 404);
    assert_eq!(v["request_id"], r.header("x-request-id").unwrap());
    // A 404 for a bodyless request keeps the connection.
    assert_eq!(c.get("app.test", "/still").status, 200);

    // Host normalisation: case, port and trailing dot.
    assert_eq!(get(p.addr, "APP.test.:8080", "/n").status, 200);

    p.write_routes(&routes_to(origin.addr));
    assert!(eventually(Duration::from_secs(5), || get(
        p.addr,
        "nowhere.test",
        "/d"
    )
    .status
        == 200));
}

#[test]
fn hop_by_hop_headers_are_removed_and_forwarding_headers_set() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Request-ID: spoofed\r\nUser-Agent: e2e\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    let rec = origin.requests().pop().unwrap();
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "te",
        "proxy-connection",
    ] {
        assert!(rec.header(gone).is_none(), "{gone} reached the upstream");
    }
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    assert_eq!(rec.header("x-forwarded-host"), Some("app.test"));
    assert_eq!(rec.header("user-agent"), Some("e2e"));
    let rid = rec.header("x-request-id").unwrap();
    assert_ne!(rid, "spoofed");
    assert_eq!(r.header("x-request-id"), Some(rid), "same id both ways");
}

#[test]
fn trusted_proxies_forwarding_headers_are_kept() {
    let origin = Origin::start();
    let mut p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.headers.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /headers HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX-Request-ID: lb-123\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(
        rec.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    assert_eq!(rec.header("x-request-id"), Some("lb-123"));
    let log = p.stop();
    assert_eq!(log[0]["client_ip"], "203.0.113.7");
    assert_eq!(log[0]["request_id"], "lb-123");
}

#[test]
fn security_headers_do_not_override_the_app() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.headers
            .security
            .push(ringway_core::config::SecurityHeader {
                name: "Server".into(),
                value: "ringway".into(),
                override_app: true,
            });
    });
    let r = get(p.addr, "app.test", "/plain");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("x-frame-options"), Some("SAMEORIGIN"));
    assert_eq!(
        r.header("referrer-policy"),
        Some("strict-origin-when-cross-origin")
    );
    assert_eq!(r.headers_named("server"), vec!["ringway"]);
    let r = get(p.addr, "app.test", "/app-headers");
    assert_eq!(
        r.headers_named("x-frame-options"),
        vec!["DENY"],
        "the app's value wins"
    );
}

#[test]
fn head_204_and_304_carry_no_body() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"HEAD /source/100 HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let r = c.read_response(true).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some("100"),
        "HEAD keeps the length of the GET"
    );
    for path in ["/status/204", "/status/304"] {
        let r = c.get("app.test", path);
        assert!(r.body.is_empty());
        assert!(r.header("content-length").is_none() && r.header("transfer-encoding").is_none());
    }
    // The connection is still in sync.
    assert_eq!(c.get("app.test", "/after").text(), "ok /after");
}

#[test]
fn http10_clients() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    // No Host, no keep-alive: answered, then closed.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /ten HTTP/1.0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.text(), "ok /ten");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
    // A chunked upstream response reaches a 1.0 client close-delimited.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /source-chunked/5000 HTTP/1.0\r\nHost: app.test\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert!(!r.chunked && r.header("content-length").is_none());
    assert_eq!(r.body.len(), 5000);
    // Keep-alive on request.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /a HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.header("connection"), Some("keep-alive"));
    c.send(b"GET /b HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().text(), "ok /b");
}

#[test]
fn connection_close_is_honoured() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /bye HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
}

#[test]
fn expect_100_continue_is_answered_by_the_proxy() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"PUT /echo HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let interim = c.read_response(false).unwrap();
    assert_eq!(interim.status, 100);
    c.send(b"hello");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    assert!(origin.requests().pop().unwrap().header("expect").is_none());
    // Unknown expectations are refused.
    c.send(
        b"PUT /echo HTTP/1.1\r\nHost: app.test\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx",
    );
    assert_eq!(c.read_response(false).unwrap().status, 417);
}

#[test]
fn interim_responses_are_relayed() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /interim HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let early = c.read_response(false).unwrap();
    assert_eq!(early.status, 103);
    assert!(early.header("link").is_some());
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "final"));
}

#[test]
fn limits_answer_413_414_431() {
    let origin = Origin::start();
    let routes = format!(
        "[[route]]\nname = \"a\"\nhosts = [\"app.test\"]\nupstreams = [\"{}\"]\nbody_bytes_max = 10\n",
        origin.addr
    );
    let p = TestProxy::start(&routes);
    let mut c = Conn::connect(p.addr);
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 11\r\n\r\n01234567890");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 413);
    assert!(
        c.is_closed(),
        "the unread body must not be parsed as a request"
    );
    let mut c = Conn::connect(p.addr);
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n01234567\r\n0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 413);
    assert!(c.is_closed());

    let mut c = Conn::connect(p.addr);
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "a".repeat(9000)
    );
    let _ = c.try_send(long.as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 414);

    let mut c = Conn::connect(p.addr);
    let mut big = String::from("GET / HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..101 {
        big.push_str(&format!("X-H{i}: v\r\n"));
    }
    big.push_str("\r\n");
    c.send(big.as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 431);

    let mut c = Conn::connect(p.addr);
    let mut huge = String::from("GET / HTTP/1.1\r\nHost: app.test\r\n");
    while huge.len() < 40_000 {
        huge.push_str(&format!("X-Big: {}\r\n", "b".repeat(900)));
    }
    huge.push_str("\r\n");
    let _ = c.try_send(huge.as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 431);
    assert!(
        origin.requests().is_empty(),
        "nothing over a limit reached the upstream"
    );
}

#[test]
fn slow_heads_get_408_and_silent_connections_close() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.timeouts.header_read_ms = 300;
        c.timeouts.keepalive_idle_ms = 300;
    });
    let mut c = Conn::connect(p.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: app");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(c.is_closed());
    // A connection that never sends anything is closed without a response.
    let mut c = Conn::connect(p.addr);
    assert!(c.read_rest().is_empty());
    // An idle keep-alive connection is closed after keepalive_idle_ms.
    let mut c = Conn::connect(p.addr);
    assert_eq!(c.get("app.test", "/").status, 200);
    let t = std::time::Instant::now();
    let closed = c.is_closed();
    let t1 = t.elapsed();
    let closed2 = c.is_closed();
    let accepted = p.metric_sum("ringway_connections_accepted_total");
    let active = p.metric_sum("ringway_connections_active");
    assert!(
        closed,
        "not closed after {t1:?}; later: {closed2} after {:?}; accepted {accepted} active {active}; {:?}",
        t.elapsed(),
        c.stream.local_addr()
    );
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "closed after {:?}",
        t.elapsed()
    );
}

#[test]
fn every_request_is_logged() {
    let origin = Origin::start();
    let mut p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    for i in 0..50 {
        c.send(
            format!("GET /log/{i}?q=1 HTTP/1.1\r\nHost: app.test\r\nUser-Agent: logger\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(c.read_response(false).unwrap().status, 200);
    }
    let _ = get(p.addr, "app.test", "/status/503");
    let mut bad = Conn::connect(p.addr);
    bad.send(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(bad.read_response(false).unwrap().status, 400);
    let log = p.stop();
    assert_eq!(log.len(), 52, "one record per request, errors included");
    let first = &log.iter().find(|l| l["path"] == "/log/0").unwrap();
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "app.test");
    assert_eq!(first["status"], 200);
    assert_eq!(first["user_agent"], "logger");
    assert_eq!(first["project_id"], 11);
    assert_eq!(first["environment_id"], 22);
    assert_eq!(first["deployment_id"], 33);
    assert_eq!(first["upstream"], origin.addr.to_string());
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(first["request_id"].as_str().unwrap().len(), 32);
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    assert!(log.iter().any(|l| l["status"] == 503));
    assert!(
        log.iter()
            .any(|l| l["status"] == 400 && l["reason"] == "bad_host")
    );
}

#[test]
fn admin_endpoints() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    for _ in 0..3 {
        get(p.addr, "app.test", "/m");
    }
    // Counters move just after the response is written: wait for them.
    assert!(eventually(std::time::Duration::from_secs(5), || p
        .metric_sum("ringway_requests_total")
        == 3.0));
    let m = p.metrics();
    assert_eq!(
        metric_sum(&m, "ringway_request_duration_seconds_count"),
        3.0
    );
    assert!(m.contains("ringway_request_duration_seconds_bucket{worker=\"0\",le=\"+Inf\"}"));
    assert_eq!(metric_sum(&m, "ringway_routes"), 3.0);
    assert_eq!(metric_sum(&m, "ringway_log_dropped_total"), 0.0);
    assert_eq!(get(p.admin, "admin", "/healthz").status, 200);
    assert_eq!(get(p.admin, "admin", "/readyz").status, 200);
    assert_eq!(get(p.admin, "admin", "/nope").status, 404);
}

#[test]
fn connection_cap_pauses_accepting_until_a_slot_frees() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.limits.connections_per_worker_max = 2;
    });
    let mut a = Conn::connect(p.addr);
    let mut b = Conn::connect(p.addr);
    assert_eq!(a.get("app.test", "/a").status, 200);
    assert_eq!(b.get("app.test", "/b").status, 200);
    // The third connection waits in the kernel backlog: no answer while two are open.
    let mut third = Conn::connect(p.addr);
    third.send(b"GET /c HTTP/1.1\r\nHost: app.test\r\n\r\n");
    third
        .stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = std::io::Read::read(&mut third.stream, &mut byte);
    assert!(
        early.is_err(),
        "served beyond the connection cap: {early:?}"
    );
    assert!(p.metric_sum("ringway_accept_paused_total") >= 1.0);
    drop(a);
    third
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = third.read_response(false).unwrap();
    assert_eq!(r.text(), "ok /c");
    assert_eq!(b.get("app.test", "/b2").status, 200);
}

#[test]
fn a_full_log_ring_drops_and_counts_instead_of_blocking() {
    let origin = Origin::start();
    let mut p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.access_log.ring_bytes = 64 * 1024;
        c.access_log.drain_interval_ms = 60_000;
    });
    let mut c = Conn::connect(p.addr);
    for i in 0..1000 {
        assert_eq!(c.get("app.test", &format!("/fill/{i}")).status, 200);
    }
    let dropped = p.metric_sum("ringway_log_dropped_total");
    let logged = p.metric_sum("ringway_log_records_total");
    assert!(dropped > 0.0, "a 64 KiB ring cannot hold 1,000 records");
    assert_eq!(
        dropped + logged,
        1000.0,
        "every record is either in the ring or counted"
    );
    let lines = p.stop();
    assert_eq!(
        lines.len() as f64,
        logged,
        "what was pushed reaches the log at shutdown"
    );
}

#[test]
fn idle_connections_park_and_come_back() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.workers.count = 1;
        c.timeouts.keepalive_idle_ms = 1500;
    });
    let mut conns: Vec<Conn> = (0..20).map(|_| Conn::connect(p.addr)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.get("app.test", &format!("/first/{i}")).status, 200);
    }
    // Past the hot read (50 ms) and the next gauge update (once a second), all are parked.
    assert!(eventually(Duration::from_secs(3), || p
        .metric_sum("ringway_connections_parked")
        == 20.0));
    // A parked connection answers its next request, pipelined ones included.
    conns[3].send(
        b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\nGET /b HTTP/1.1\r\nHost: app.test\r\n\r\n",
    );
    assert_eq!(conns[3].read_response(false).unwrap().text(), "ok /a");
    assert_eq!(conns[3].read_response(false).unwrap().text(), "ok /b");
    // A client that closes while parked frees its slot.
    drop(conns.pop());
    assert!(eventually(Duration::from_secs(3), || p
        .metric_sum("ringway_connections_active")
        == 19.0));
    // Parked connections expire after the keep-alive time.
    let mut quiet = conns.remove(0);
    assert!(
        quiet.is_closed(),
        "a parked connection is closed after keepalive_idle_ms"
    );
    assert!(eventually(Duration::from_secs(5), || p
        .metric_sum("ringway_connections_active")
        <= 1.0));
}
