//! The load balancer against real upstreams (`Backend`s that can be stopped, slowed, hung
//! or failed), with 2 workers and steady load where the issue asks for it: failover,
//! ejection, active checks, slow start, strategies, hashing, sticky cookies, draining,
//! unavailability and panic mode, the retry budget, and DNS names.

use crate::support::backend::{Backend, Mode};
use crate::support::client::Conn;
use crate::support::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests that measure shares of traffic run one at a time: on 2 cores, other load tests
/// beside them make every upstream slow and blur the shares.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A route `app` for app.test over `backends`, with extra TOML (`[route.balancer]` and
/// friends) after it.
fn routes(backends: &[&Backend], extra: &str) -> String {
    let ups: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!(
        "[[route]]\nname = \"app\"\nhosts = [\"app.test\"]\nupstreams = [{}]\n{extra}",
        ups.join(", ")
    )
}

/// A pause between one thread's requests: steady load (up to about 1,000 requests/s per
/// thread) that does not starve the tests running beside it of the 2 cores.
const LOAD_PAUSE: Duration = Duration::from_millis(1);

/// Steady keep-alive GET traffic from a few threads until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    by_backend: Arc<Mutex<HashMap<String, usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize, headers: &'static str) -> Load {
        let l = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            failed: Arc::default(),
            by_backend: Arc::default(),
            threads: Vec::new(),
        };
        let mut l = l;
        for _ in 0..threads {
            let (stop, ok, failed, by) = (
                l.stop.clone(),
                l.ok.clone(),
                l.failed.clone(),
                l.by_backend.clone(),
            );
            l.threads.push(std::thread::spawn(move || {
                let Ok(mut c) = std::panic::catch_unwind(|| Conn::connect(addr)) else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(LOAD_PAUSE);
                    let req = format!("GET / HTTP/1.1\r\nHost: app.test\r\n{headers}\r\n");
                    let r = c
                        .try_send(req.as_bytes())
                        .ok()
                        .and_then(|_| c.read_response(false).ok());
                    match r {
                        Some(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let b = r.header("x-backend").unwrap_or("?").to_string();
                            *by.lock().unwrap().entry(b).or_default() += 1;
                        }
                        Some(r) => {
                            failed
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.text()));
                            c = Conn::connect(addr);
                        }
                        None => {
                            failed.lock().unwrap().push("connection error".into());
                            c = Conn::connect(addr);
                        }
                    }
                }
            }));
        }
        l
    }

    fn counts(&self) -> HashMap<String, usize> {
        self.by_backend.lock().unwrap().clone()
    }

    fn finish(mut self) -> (usize, Vec<String>, HashMap<String, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed, self.counts())
    }
}

/// The value of `name{endpoint="addr"}`.
fn endpoint_metric(p: &TestProxy, name: &str, addr: SocketAddr) -> f64 {
    let want = format!("{name}{{endpoint=\"{addr}\"}} ");
    p.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str())?.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn a_killed_upstream_fails_over_with_no_failed_request_and_is_readmitted() {
    let _serial = serial();
    let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let extra = "[route.outlier]\nejection_ms = 1000\n";
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), extra));
    let load = Load::start(p.addr, 4, "");
    std::thread::sleep(Duration::from_millis(500));
    bs[2].stop();
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || endpoint_metric(
            &p,
            "ringway_upstream_healthy",
            bs[2].addr
        ) == 0.0),
        "ejected within 1 s"
    );
    let ejected_after = killed.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let before_restart = load.counts().get("c").copied().unwrap_or(0);
    bs[2].restart();
    // Readmitted when the ejection ends (1 s), then serving again.
    assert!(eventually(Duration::from_secs(3), || load
        .counts()
        .get("c")
        .copied()
        .unwrap_or(0)
        > before_restart + 20));
    let (ok, failed, _) = load.finish();
    let why: Vec<String> = p
        .access_log()
        .iter()
        .filter(|l| l["status"] != 200)
        .map(|l| format!("{} {} {}", l["status"], l["reason"], l["upstream"]))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed of {} ({why:?}): {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "{ok}");
    assert!(p.metric_sum("ringway_upstream_ejections_total") >= 1.0);
    eprintln!("ejected after {ejected_after:?}, {ok} requests");
}

#[test]
fn an_upstream_that_never_answers_costs_bounded_failures_then_none() {
    let _serial = serial();
    let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    bs[1].set_mode(Mode::Hang);
    let p = TestProxy::start_with(&routes(&bs.iter().collect::<Vec<_>>(), ""), |c| {
        c.timeouts.upstream_read_ms = 300;
    });
    let load = Load::start(p.addr, 4, "");
    std::thread::sleep(Duration::from_millis(2_500));
    let swallowed_early = bs[1].requests();
    std::thread::sleep(Duration::from_millis(1_500));
    let swallowed_late = bs[1].requests() - swallowed_early;
    let (ok, failed, _) = load.finish();
    // Timed-out GETs went to another endpoint; the hung one was ejected after 5 timeouts
    // (and stays out for the 5 s ejection).
    assert!(failed.is_empty(), "{failed:?}");
    assert!(swallowed_early <= 10, "{swallowed_early}");
    assert_eq!(swallowed_late, 0);
    assert!(ok > 200, "{ok}");
    assert!(p.metric_sum("ringway_route_retries_total") >= 5.0);
}

#[test]
fn active_checks_mark_down_and_up_within_their_thresholds() {
    let _serial = serial();
    let bs: Vec<Backend> = ["a", "b"].iter().map(|n| Backend::start(n)).collect();
    let extra = "[route.health_check]\npath = \"/healthz\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 2\nfall = 3\n";
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), extra));
    assert!(eventually(Duration::from_secs(2), || bs[1].health_checks() >= 2));
    let load = Load::start(p.addr, 2, "");
    bs[1].set_unhealthy(true);
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(2), || endpoint_metric(
        &p,
        "ringway_upstream_checked_down",
        bs[1].addr
    ) == 1.0));
    let down_after = t.elapsed();
    // interval x fall, plus one interval of phase and the scrape.
    assert!(
        down_after <= Duration::from_millis(100 * 3 + 250),
        "{down_after:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let during = bs[1].requests();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(bs[1].requests(), during, "no requests while checked down");
    bs[1].set_unhealthy(false);
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(2), || endpoint_metric(
        &p,
        "ringway_upstream_checked_down",
        bs[1].addr
    ) == 0.0));
    let up_after = t.elapsed();
    assert!(
        up_after <= Duration::from_millis(100 * 2 + 250),
        "{up_after:?}"
    );
    assert!(eventually(Duration::from_secs(2), || bs[1].requests() > during + 10));
    let (_, failed, _) = load.finish();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn a_recovered_endpoint_ramps_up_slowly() {
    let _serial = serial();
    let bs: Vec<Backend> = ["a", "b"].iter().map(|n| Backend::start(n)).collect();
    let extra = "[route.balancer]\nslow_start_ms = 3000\n[route.health_check]\npath = \"/healthz\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 1\n";
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), extra));
    bs[1].set_unhealthy(true);
    assert!(eventually(Duration::from_secs(2), || endpoint_metric(
        &p,
        "ringway_upstream_checked_down",
        bs[1].addr
    ) == 1.0));
    let load = Load::start(p.addr, 2, "");
    bs[1].set_unhealthy(false);
    assert!(eventually(Duration::from_secs(2), || endpoint_metric(
        &p,
        "ringway_upstream_checked_down",
        bs[1].addr
    ) == 0.0));
    let share = |ms: u64| {
        let (a0, b0) = (bs[0].requests(), bs[1].requests());
        std::thread::sleep(Duration::from_millis(ms));
        let (a, b) = (bs[0].requests() - a0, bs[1].requests() - b0);
        b as f64 / (a + b).max(1) as f64
    };
    let early = share(600);
    std::thread::sleep(Duration::from_millis(2_000));
    let late = share(600);
    let (_, failed, _) = load.finish();
    assert!(failed.is_empty());
    assert!(early < 0.3, "early share {early}");
    assert!(late > 0.4, "late share {late}");
}

#[test]
fn weighted_round_robin_is_within_5_percent_over_10000_requests() {
    let _serial = serial();
    let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let text = format!(
        "[[route]]\nname = \"app\"\nhosts = [\"app.test\"]\nupstreams = [{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 2 }}, {{ address = \"{}\", weight = 5 }}]\n",
        bs[0].addr, bs[1].addr, bs[2].addr
    );
    let p = TestProxy::start(&text);
    let load = Load::start(p.addr, 4, "");
    assert!(eventually(Duration::from_secs(30), || load
        .ok
        .load(Ordering::Relaxed)
        >= 10_000));
    let (ok, failed, by) = load.finish();
    assert!(failed.is_empty());
    for (name, w) in [("a", 1.0), ("b", 2.0), ("c", 5.0)] {
        let share = by[name] as f64 / ok as f64;
        let want = w / 8.0;
        assert!(
            (share - want).abs() <= 0.05 * want,
            "{name}: {share} vs {want} ({by:?})"
        );
    }
}

#[test]
fn least_connections_and_p2c_keep_a_slow_upstream_under_20_percent() {
    let _serial = serial();
    for strategy in ["least_connections", "p2c"] {
        let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
        bs[2].set_delay(20);
        let extra = format!("[route.balancer]\nstrategy = \"{strategy}\"\n");
        let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), &extra));
        let load = Load::start(p.addr, 8, "");
        std::thread::sleep(Duration::from_millis(2_000));
        let (ok, failed, by) = load.finish();
        assert!(failed.is_empty());
        let slow = by.get("c").copied().unwrap_or(0) as f64 / ok as f64;
        assert!(slow < 0.20, "{strategy}: slow share {slow} ({by:?})");
        assert!(
            by.contains_key("a") && by.contains_key("b"),
            "{strategy}: {by:?}"
        );
    }
}

/// Which backend each of `keys` lands on, over 8 connections (both workers).
fn placements(addr: SocketAddr, keys: std::ops::Range<u32>) -> HashMap<u32, String> {
    let keys: Vec<u32> = keys.collect();
    let chunks: Vec<Vec<u32>> = keys
        .chunks(keys.len().div_ceil(8))
        .map(<[u32]>::to_vec)
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            std::thread::spawn(move || {
                let mut c = Conn::connect(addr);
                let mut out = Vec::new();
                for k in chunk {
                    // Each key twice, once on this connection and once on the next thread's
                    // (another worker, most of the time).
                    for round in 0..2 {
                        let mut conn = if round == 0 {
                            None
                        } else {
                            Some(Conn::connect(addr))
                        };
                        let c = conn.as_mut().unwrap_or(&mut c);
                        c.send(
                            format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-User: user-{k}\r\n\r\n")
                                .as_bytes(),
                        );
                        let r = c.read_response(false).unwrap();
                        out.push((k, r.header("x-backend").unwrap().to_string()));
                    }
                }
                out
            })
        })
        .collect();
    let mut m: HashMap<u32, String> = HashMap::new();
    for h in handles {
        for (k, b) in h.join().unwrap() {
            if let Some(prev) = m.insert(k, b.clone()) {
                assert_eq!(prev, b, "key {k} moved between requests");
            }
        }
    }
    m
}

fn backend_for(addr: SocketAddr, key: u32) -> String {
    let mut c = Conn::connect(addr);
    c.send(format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-User: user-{key}\r\n\r\n").as_bytes());
    let r = c.read_response(false).unwrap();
    r.header("x-backend").unwrap_or("?").to_string()
}

#[test]
fn consistent_hashing_keeps_keys_and_moves_few_when_an_endpoint_joins() {
    let _serial = serial();
    let bs: Vec<Backend> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| Backend::start(n))
        .collect();
    let extra = "[route.balancer]\nstrategy = \"hash\"\nhash_key = \"header:X-User\"\n";
    let p = TestProxy::start(&routes(&bs[..3].iter().collect::<Vec<_>>(), extra));
    let before = placements(p.addr, 0..2_000);
    let workers_used = p
        .metrics()
        .lines()
        .filter(|l| l.starts_with("ringway_requests_total{") && !l.ends_with(" 0"))
        .count();
    assert!(workers_used >= 2, "both workers served");
    p.write_routes(&routes(&bs.iter().collect::<Vec<_>>(), extra));
    // The reload is in force once some key lands on the new endpoint.
    assert!(eventually(Duration::from_secs(5), || (0..50)
        .any(|k| backend_for(p.addr, k) == "d")));
    let after = placements(p.addr, 0..2_000);
    let moved = before.iter().filter(|(k, b)| after[k] != **b).count();
    assert!(moved <= 2_000 * 30 / 100, "moved {moved} of 2000");
    assert!(
        moved >= 2_000 * 10 / 100,
        "a quarter should move to the new endpoint: {moved}"
    );
    let to_new = after.values().filter(|b| *b == "d").count();
    // Maglev moves keys almost only to the new endpoint (a few shift among the others).
    assert!(
        to_new * 100 >= moved * 95,
        "{to_new} of {moved} moved to the new endpoint"
    );
}

#[test]
fn a_sticky_cookie_pins_a_client_while_its_endpoint_is_usable() {
    let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let extra = "[route.balancer]\nsticky_cookie = \"rw_ep\"\nsticky_max_age_s = 600\n";
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), extra));
    let mut c = Conn::connect(p.addr);
    let first = c.get("app.test", "/");
    let cookie = first
        .header("set-cookie")
        .expect("a sticky cookie")
        .to_string();
    assert!(
        cookie.starts_with("rw_ep=")
            && cookie.contains("HttpOnly")
            && cookie.contains("Max-Age=600"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let pinned = first.header("x-backend").unwrap().to_string();
    for _ in 0..30 {
        let conn = &mut Conn::connect(p.addr);
        conn.send(
            format!("GET / HTTP/1.1\r\nHost: app.test\r\nCookie: a=1; {pair}\r\n\r\n").as_bytes(),
        );
        let r = conn.read_response(false).unwrap();
        assert_eq!(r.header("x-backend").unwrap(), pinned);
        assert!(
            r.header("set-cookie").is_none(),
            "no new cookie while pinned"
        );
    }
    let b = bs.iter().find(|b| b.name == pinned).unwrap();
    b.stop();
    let conn = &mut Conn::connect(p.addr);
    conn.send(format!("GET / HTTP/1.1\r\nHost: app.test\r\nCookie: {pair}\r\n\r\n").as_bytes());
    let r = conn.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_ne!(r.header("x-backend").unwrap(), pinned);
    assert!(
        r.header("set-cookie").unwrap().starts_with("rw_ep="),
        "re-pinned"
    );
}

#[test]
fn a_draining_upstream_gets_no_new_requests_and_finishes_its_own() {
    let bs: Vec<Backend> = ["a", "b"].iter().map(|n| Backend::start(n)).collect();
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), ""));
    bs[0].set_delay(800);
    // Requests in flight to a when it starts draining.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let addr = p.addr;
            std::thread::spawn(move || Conn::connect(addr).get("app.test", "/"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(bs[0].requests() >= 1);
    let text = format!(
        "[[route]]\nname = \"app\"\nhosts = [\"app.test\"]\nupstreams = [{{ address = \"{}\", state = \"draining\" }}, \"{}\"]\n",
        bs[0].addr, bs[1].addr
    );
    p.write_routes(&text);
    std::thread::sleep(Duration::from_millis(200));
    let at_drain = bs[0].requests();
    for r in slow {
        assert_eq!(r.join().unwrap().status, 200, "in-flight requests finish");
    }
    for _ in 0..40 {
        assert_eq!(
            Conn::connect(p.addr)
                .get("app.test", "/")
                .header("x-backend"),
            Some("b")
        );
    }
    assert_eq!(
        bs[0].requests(),
        at_drain,
        "no new requests to a draining upstream"
    );
    // Its connections are not kept: the pool closes them within a sweep (1 s).
    assert!(
        eventually(Duration::from_secs(3), || bs[0].open_connections() == 0),
        "{} connections still open to the draining upstream",
        bs[0].open_connections()
    );
}

#[test]
fn no_usable_endpoint_is_503_with_retry_after_and_panic_mode_spreads() {
    let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let check = "[route.health_check]\npath = \"/healthz\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 1\n";
    let strict = format!("[route.balancer]\npanic_threshold_pct = 0\n{check}");
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), &strict));
    for b in &bs {
        b.set_unhealthy(true);
    }
    assert!(eventually(Duration::from_secs(2), || p
        .metric_sum("ringway_upstream_checked_down")
        == 3.0));
    let r = Conn::connect(p.addr).get("app.test", "/");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert!(
        r.header("x-request-id").is_some() || r.text().contains("req"),
        "{:?}",
        r.headers
    );
    assert!(p.metric_sum("ringway_route_unavailable_total") >= 1.0);
    let log = p.access_log();
    assert!(
        eventually(Duration::from_secs(2), || {
            p.access_log()
                .iter()
                .any(|l| l["status"] == 503 && l["reason"] == "no_healthy_endpoint")
        }),
        "{log:?}"
    );

    // The default panic threshold (50%): with two of three checked down, health is ignored
    // and the traffic spreads over all three rather than crushing the last one.
    let p = TestProxy::start(&routes(&bs.iter().collect::<Vec<_>>(), check));
    for b in &bs {
        b.set_unhealthy(false);
    }
    bs[0].set_unhealthy(true);
    bs[1].set_unhealthy(true);
    assert!(eventually(Duration::from_secs(2), || p
        .metric_sum("ringway_upstream_checked_down")
        == 2.0));
    let before: Vec<usize> = bs.iter().map(Backend::requests).collect();
    for _ in 0..60 {
        assert_eq!(Conn::connect(p.addr).get("app.test", "/").status, 200);
    }
    for (b, n) in bs.iter().zip(before) {
        assert!(
            b.requests() >= n + 10,
            "{} got {}",
            b.name,
            b.requests() - n
        );
    }
}

#[test]
fn the_retry_budget_caps_upstream_attempts() {
    let bs: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    for b in &bs {
        b.set_mode(Mode::Reset);
    }
    // Ejection off so every request keeps failing; 20% of requests plus 5 per worker.
    let extra = "[route.balancer]\nretry_budget_pct = 20\nretry_budget_min = 5\nretries_max = 2\n[route.outlier]\nconsecutive_failures = 0\n";
    let p = TestProxy::start_with(&routes(&bs.iter().collect::<Vec<_>>(), extra), |c| {
        c.upstream.retry_idempotent = false;
    });
    let n = 300;
    for _ in 0..n {
        assert_eq!(Conn::connect(p.addr).get("app.test", "/").status, 502);
    }
    let attempts: usize = bs.iter().map(Backend::requests).sum();
    // 2 workers: at most 20% of their requests plus their floors.
    assert!(
        attempts <= n + n / 5 + 2 * 5 + 2,
        "{attempts} attempts for {n} requests"
    );
    assert!(attempts > n, "some retries were allowed");
    assert!(p.metric_sum("ringway_route_retries_refused_total") >= 100.0);
}

#[test]
fn a_name_resolving_to_both_loopbacks_gives_two_endpoints() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let v4 = Backend::start("v4");
    let v6 = Backend::start_on(
        "v6",
        SocketAddr::new("::1".parse().unwrap(), v4.addr.port()),
    );
    let dns = dns_server();
    let text = format!(
        "[[route]]\nname = \"app\"\nhosts = [\"app.test\"]\nupstreams = [\"app.internal.test:{}\"]\n",
        v4.addr.port()
    );
    let p = TestProxy::start_with(&text, |c| c.dns.servers = vec![dns]);
    assert!(eventually(Duration::from_secs(3), || {
        let m = p.metrics();
        m.contains(&format!("endpoint=\"{}\"", v4.addr))
            && m.contains(&format!("endpoint=\"{}\"", v6.addr))
    }));
    for _ in 0..20 {
        assert_eq!(Conn::connect(p.addr).get("app.test", "/").status, 200);
    }
    assert!(
        v4.requests() >= 5 && v6.requests() >= 5,
        "{} {}",
        v4.requests(),
        v6.requests()
    );
}

/// A DNS server on loopback answering every A question with 127.0.0.1 and every AAAA with ::1.
fn dns_server() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 17 {
                continue;
            }
            let qtype = u16::from_be_bytes([q[n - 4], q[n - 3]]);
            let mut r = q.to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            r[7] = 1;
            r.extend_from_slice(&[0xC0, 12]);
            r.extend_from_slice(&qtype.to_be_bytes());
            r.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
            if qtype == 1 {
                r.extend_from_slice(&[0, 4, 127, 0, 0, 1]);
            } else {
                r.extend_from_slice(&[0, 16]);
                r.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            }
            let _ = s.send_to(&r, from);
        }
    });
    addr
}

#[test]
fn past_the_connection_and_pending_limits_requests_get_503() {
    let b = Backend::start("a");
    b.set_delay(400);
    let extra = "[route.balancer]\nconnections_max = 1\npending_max = 1\n";
    let p = TestProxy::start_with(&routes(&[&b], extra), |c| c.workers.count = 1);
    let addr = p.addr;
    let spawn = || std::thread::spawn(move || Conn::connect(addr).get("app.test", "/"));
    let first = spawn();
    std::thread::sleep(Duration::from_millis(100));
    let queued = spawn();
    std::thread::sleep(Duration::from_millis(100));
    let refused = Conn::connect(p.addr).get("app.test", "/");
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(
        queued.join().unwrap().status,
        200,
        "the queued request waited for room"
    );
    assert_eq!(b.requests(), 2);
    assert!(p.metric_sum("ringway_route_unavailable_total") >= 1.0);
}
