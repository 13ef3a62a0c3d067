//! Edge policies from the routes file: IP allow and deny lists (with forwarded addresses from
//! trusted and untrusted peers), block rules, rate limits holding across workers, the
//! proof-of-work challenge solved by a real client (and by the page's own script in node),
//! forged, expired and wrong-network passes, visitor and session cookies.

use crate::support::*;
use ringway_core::policy::CookieBinding;
use ringway_worker::challenge::{Keys, issue_pass};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KEY: &str = "test-challenge-key-0123456789abcdef";

/// Routes for app.test (project 11) with `policy` appended.
fn with_policy(origin: std::net::SocketAddr, policy: &str) -> String {
    format!("{}\n{policy}\n", routes_to(origin))
}

fn trusting_loopback(c: &mut ringway_core::config::Config) {
    c.headers.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    c.policy.challenge_keys = vec![KEY.into()];
}

fn get_with(p: &TestProxy, headers: &str, path: &str) -> client::Response {
    let mut c = Conn::connect(p.addr);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n{headers}\r\n").as_bytes());
    c.read_response(false).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn deny_list_with_v4_v6_and_forwarded_addresses() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\ndeny = [\"10.9.0.0/16\", \"2001:db8::/32\", \"192.0.2.7\"]\n",
    );
    // Untrusted peer: its X-Forwarded-For is ignored, the socket address decides.
    let p = TestProxy::start(&routes);
    assert_eq!(
        get_with(&p, "X-Forwarded-For: 10.9.1.1\r\n", "/spoof").status,
        200
    );
    drop(p);
    // Trusted peer: the forwarded address decides.
    let p = TestProxy::start_with(&routes, trusting_loopback);
    for (xff, status) in [
        ("10.9.1.1", 403),
        ("10.8.0.1", 200),
        ("2001:db8::5", 403),
        ("2001:db9::5", 200),
        ("192.0.2.7", 403),
        ("192.0.2.8", 200),
    ] {
        let r = get_with(
            &p,
            &format!("X-Forwarded-For: {xff}\r\n"),
            &format!("/from/{xff}"),
        );
        assert_eq!(r.status, status, "{xff}");
        if status == 403 {
            assert!(r.header("x-request-id").is_some());
            assert!(
                r.text().contains(r.header("x-request-id").unwrap()),
                "the page names the request id"
            );
        }
    }
    assert!(
        !origin.paths().iter().any(|p| p.contains("10.9.1.1")),
        "a denied request reached the upstream"
    );
    assert!(eventually(Duration::from_secs(5), || p
        .metric_sum("ringway_policy_ip_denied_total")
        == 3.0));
    let mut p = p;
    let log = p.stop();
    let denied: Vec<_> = log.iter().filter(|l| l["status"] == 403).collect();
    assert_eq!(denied.len(), 3);
    assert!(
        denied
            .iter()
            .all(|l| l["reason"] == "ip_denied" && l["project_id"] == 11)
    );
    // Records come from two workers' rings: compare as a set, not in order.
    let mut ips: Vec<_> = denied
        .iter()
        .map(|l| l["client_ip"].as_str().unwrap_or_default().to_string())
        .collect();
    ips.sort();
    assert_eq!(ips, ["10.9.1.1", "192.0.2.7", "2001:db8::5"]);
}

#[test]
fn allow_list_lets_only_listed_networks_in() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\nip_mode = \"allow_list\"\nallow = [\"127.0.0.1\", \"10.0.0.0/8\", \"fd00::/8\"]\ndeny = [\"10.6.6.6\"]\n",
    );
    let p = TestProxy::start_with(&routes, trusting_loopback);
    assert_eq!(get_with(&p, "", "/direct").status, 200);
    for (xff, status) in [
        ("10.1.2.3", 200),
        ("fd00::1", 200),
        ("192.0.2.1", 403),
        ("2001:db8::1", 403),
        ("10.6.6.6", 403),
    ] {
        assert_eq!(
            get_with(&p, &format!("X-Forwarded-For: {xff}\r\n"), "/x").status,
            status,
            "{xff}"
        );
    }
}

#[test]
fn host_policy_replaces_the_projects() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\nblock_paths = [\"/admin\"]\n[[policy]]\nhost = \"open.app.test\"\n",
    );
    let p = TestProxy::start(&routes);
    assert_eq!(get(p.addr, "app.test", "/admin").status, 403);
    assert_eq!(get(p.addr, "open.app.test", "/admin").status, 200);
}

#[test]
fn user_agent_and_path_block_rules() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\nblock_user_agents = [\"BadBot\", \"sqlmap\"]\nblock_paths = [\"/wp-admin\", \"/.env\"]\n",
    );
    let mut p = TestProxy::start(&routes);
    assert_eq!(
        get_with(
            &p,
            "User-Agent: Mozilla/5.0 (compatible; badbot/2.1)\r\n",
            "/"
        )
        .status,
        403
    );
    assert_eq!(get_with(&p, "User-Agent: sqlmap/1.7\r\n", "/").status, 403);
    assert_eq!(
        get_with(&p, "User-Agent: Mozilla/5.0\r\n", "/wp-admin/setup.php").status,
        403
    );
    assert_eq!(get_with(&p, "", "/.env").status, 403);
    assert_eq!(
        get_with(&p, "User-Agent: Mozilla/5.0\r\n", "/blog").status,
        200
    );
    let log = p.stop();
    let reasons: Vec<_> = log.iter().filter_map(|l| l["reason"].as_str()).collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "blocked_user_agent")
            .count(),
        2
    );
    assert_eq!(reasons.iter().filter(|r| **r == "blocked_path").count(), 2);
}

#[test]
fn rate_limit_holds_across_workers_within_ten_percent() {
    let origin = Origin::start_unrecorded();
    let (rps, burst) = (100u64, 10u64);
    let routes = with_policy(
        origin.addr,
        &format!(
            "[[policy]]\nproject_id = 11\n[[policy.rate_limit]]\nrps = {rps}\nburst = {burst}\n"
        ),
    );
    let p = TestProxy::start(&routes);
    let addr = p.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    // New connections land on either worker (SO_REUSEPORT hashes the client port).
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, limited) = (stop.clone(), ok.clone(), limited.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut c = Conn::connect(addr);
                    for _ in 0..5 {
                        let Some(r) = c.try_get("app.test", "/r") else {
                            break;
                        };
                        match r.status {
                            200 => ok.fetch_add(1, Ordering::Relaxed),
                            429 => {
                                assert!(
                                    r.header("retry-after")
                                        .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1))
                                );
                                limited.fetch_add(1, Ordering::Relaxed)
                            }
                            s => panic!("status {s}"),
                        };
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = burst as f64 + 1.0 + rps as f64 * elapsed;
    let got = ok.load(Ordering::Relaxed) as f64;
    assert!(
        limited.load(Ordering::Relaxed) > 0,
        "the clients went over the limit"
    );
    assert!(
        (got - expected).abs() <= expected * 0.10,
        "{got} requests passed, expected {expected:.0} ±10%"
    );
    // Both workers enforced it.
    let m = p.metrics();
    for w in 0..2 {
        let line = format!("ringway_policy_rate_limited_total{{worker=\"{w}\"}}");
        let n: f64 = m
            .lines()
            .find(|l| l.starts_with(&line))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        assert!(n > 0.0, "worker {w} limited nothing:\n{m}");
    }
}

#[test]
fn rate_limits_by_prefix_path_and_ipv6_network() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\n[[policy.rate_limit]]\nrps = 1\npath_prefix = \"/api/\"\nper_path = true\n",
    );
    let p = TestProxy::start_with(&routes, trusting_loopback);
    let from =
        |ip: &str, path: &str| get_with(&p, &format!("X-Forwarded-For: {ip}\r\n"), path).status;
    assert_eq!(from("2001:db8:1:2::1", "/api/a"), 200);
    let r = get_with(&p, "X-Forwarded-For: 2001:db8:1:2::1\r\n", "/api/a");
    assert_eq!(r.status, 429);
    assert!(
        r.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1)
    );
    // The same path in other case or spelling is the same path.
    assert_eq!(from("2001:db8:1:2::1", "/API/a"), 429);
    assert_eq!(from("2001:db8:1:2::1", "//api/./a"), 429);
    // Another path under the prefix has its own budget (per_path).
    assert_eq!(from("2001:db8:1:2::1", "/api/b"), 200);
    // Another address in the same /64 is the same client; another /64 is not.
    assert_eq!(from("2001:db8:1:2:ffff::7", "/api/a"), 429);
    assert_eq!(from("2001:db8:1:3::1", "/api/a"), 200);
    // Paths outside the prefix are neither counted nor limited.
    for _ in 0..5 {
        assert_eq!(from("2001:db8:1:2::1", "/other"), 200);
    }
}

#[test]
fn a_full_rate_key_table_is_swept_at_once_and_limits_again() {
    let origin = Origin::start();
    // /fill/ makes a key per path that expires a millisecond later; /limited/ is one request
    // per second per client.
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\n\
         [[policy.rate_limit]]\nrps = 1000\npath_prefix = \"/fill/\"\nper_path = true\n\
         [[policy.rate_limit]]\nrps = 1\npath_prefix = \"/limited/\"\n",
    );
    let p = TestProxy::start_with(&routes, |c| c.policy.rate_limit_keys_max = 1000);
    let mut c = Conn::connect(p.addr);
    for i in 0..1500 {
        assert_eq!(c.get("app.test", &format!("/fill/{i}")).status, 200);
    }
    // Past 1,000 keys the table was full: counted, and new keys went unlimited. (How many
    // overflowed depends on how fast the fill ran against the sweeps that free expired keys.)
    assert!(eventually(Duration::from_secs(2), || p
        .metric_sum("ringway_rate_limit_overflows_total")
        >= 1.0));
    // The overflow makes the control thread sweep at once, not at the next 5 s sweep: within
    // well under 5 s a new client is limited again.
    let started = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || {
            let path = format!("/limited/{}", started.elapsed().as_micros());
            c.get("app.test", &path).status == 200 && c.get("app.test", &path).status == 429
        }),
        "limiting did not come back"
    );
    assert!(p.metric_sum("ringway_rate_limit_keys") < 1000.0);
}

#[test]
fn paths_too_long_to_normalise_are_refused_where_a_policy_applies() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\nblock_paths = [\"/wp-admin\"]\n",
    );
    let p = TestProxy::start_with(&routes, |c| c.limits.request_line_bytes_max = 32 * 1024);
    let pad = "a".repeat(9000);
    // Long, but nothing to normalise: served.
    assert_eq!(get_with(&p, "", &format!("/ok/{pad}")).status, 200);
    // Long, and would need normalising to be seen as /wp-admin: refused, not let past.
    let r = get_with(&p, "", &format!("//wp-admin/{pad}"));
    assert_eq!(r.status, 414);
    assert_eq!(get_with(&p, "", "//wp-admin/x").status, 403);
    assert!(!origin.paths().iter().any(|p| p.contains("wp-admin")));
}

/// The nonce in a challenge page.
fn nonce_of(page: &str) -> String {
    let start = page.find("const n=\"").expect("a nonce") + 9;
    page[start..start + page[start..].find('"').unwrap()].to_string()
}

fn solve(nonce: &str, bits: u32) -> u64 {
    (0u64..)
        .find(|s| {
            let d = aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                format!("{nonce}:{s}").as_bytes(),
            );
            let mut z = 0;
            for b in d.as_ref() {
                if *b == 0 {
                    z += 8;
                } else {
                    z += b.leading_zeros();
                    break;
                }
            }
            z >= bits
        })
        .unwrap()
}

fn pass_cookie(resp: &client::Response) -> String {
    let c = resp.header("set-cookie").expect("a pass cookie");
    c.split(';').next().unwrap().to_string()
}

#[test]
fn challenge_solved_by_a_client_and_passes_checked() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\n[policy.challenge]\nwhen = \"always\"\nexempt_paths = [\"/api/\"]\ndifficulty_bits = 10\npass_ttl_s = 600\n",
    );
    let p = TestProxy::start_with(&routes, |c| c.policy.challenge_keys = vec![KEY.into()]);
    // The page first, not the upstream.
    let r = get_with(&p, "", "/shop?item=1");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let page = r.text();
    assert!(page.contains("r=\"/shop?item=1\""), "{page}");
    assert!(origin.requests().is_empty());
    // APIs are exempt.
    assert_eq!(get_with(&p, "", "/api/orders").status, 200);
    // HEAD gets the head alone, and the connection stays usable.
    let mut c = Conn::connect(p.addr);
    c.send(b"HEAD /shop HTTP/1.1\r\nHost: app.test\r\n\r\nGET /api/x HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let h = c.read_response(true).unwrap();
    assert_eq!(h.status, 403);
    assert!(h.body.is_empty());
    assert_eq!(
        c.read_response(false).unwrap().status,
        200,
        "framing intact after HEAD"
    );

    // Solve it as the page would and come back.
    let n = nonce_of(&page);
    let s = solve(&n, 10);
    let verify = format!("/.ringway/challenge?n={n}&s={s}&r=%2Fshop%3Fitem%3D1");
    let r = get_with(&p, "", &verify);
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(r.header("location"), Some("/shop?item=1"));
    let cookie = pass_cookie(&r);
    assert!(r.header("set-cookie").unwrap().contains("HttpOnly"));
    let r = get_with(
        &p,
        &format!("Cookie: other=1; {cookie}\r\n"),
        "/shop?item=1",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok /shop?item=1");

    // A wrong solution, a nonce for another host, an open redirect: refused.
    assert_eq!(
        get_with(&p, "", &format!("/.ringway/challenge?n={n}&s=0&r=%2F")).status,
        if s == 0 { 302 } else { 403 }
    );
    let r = get_with(
        &p,
        "",
        &format!("/.ringway/challenge?n={n}&s={s}&r=https%3A%2F%2Fevil.test%2F"),
    );
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/"), "never leaves the site");
    // A failed verification without a return target (a stale bookmark) sends the next
    // page to /, never back to itself.
    let r = get_with(&p, "", "/.ringway/challenge?n=1.00&s=1");
    assert_eq!(r.status, 403);
    assert!(r.text().contains("r=\"/\""), "{}", r.text());

    // Forged, expired, issued for another network or another host: the page again.
    let keys = Keys::new(&[KEY.to_string()]);
    let ip = "127.0.0.1".parse().unwrap();
    let make = |host: &[u8], ip, now, ttl| {
        let mut v = b"__ringway_pass=".to_vec();
        issue_pass(&mut v, &keys, host, ip, CookieBinding::Network, now, ttl);
        String::from_utf8(v).unwrap()
    };
    let good = make(b"app.test", ip, now(), 600);
    assert_eq!(
        get_with(&p, &format!("Cookie: {good}\r\n"), "/crafted").status,
        200,
        "a pass made with the same key works"
    );
    // One bit of the MAC changed.
    let forged = {
        let mut b = good.clone().into_bytes();
        let last = b.len() - 1;
        b[last] = if b[last] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    let expired = make(b"app.test", ip, now() - 7200, 600);
    let elsewhere = make(b"app.test", "198.51.100.1".parse().unwrap(), now(), 600);
    let other_host = make(b"other.test", ip, now(), 600);
    for (what, c) in [
        ("forged", forged),
        ("expired", expired),
        ("other network", elsewhere),
        ("other host", other_host),
    ] {
        let r = get_with(&p, &format!("Cookie: {c}\r\n"), "/again");
        assert_eq!(r.status, 403, "{what}");
        assert!(
            r.text().contains("const n=\""),
            "{what}: the challenge page"
        );
    }
    assert!(eventually(Duration::from_secs(5), || p
        .metric_sum("ringway_policy_challenges_passed_total")
        >= 2.0));
}

#[test]
fn challenge_page_script_solves_itself_in_node() {
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("challenge_page_script_solves_itself_in_node: node not installed; skipped");
        return;
    }
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\n[policy.challenge]\ndifficulty_bits = 8\n",
    );
    let p = TestProxy::start(&routes);
    let page = get_with(&p, "", "/landing").text();
    let script = &page[page.find("<script>").unwrap() + 8..page.find("</script>").unwrap()];
    // Just enough of a browser for the page: where it navigates is printed.
    // (Node 18 has WebCrypto only as a module; 19 and later as browsers do.)
    let shim = "if (!globalThis.crypto) globalThis.crypto = require('node:crypto').webcrypto; globalThis.self = globalThis; globalThis.document = { body: {} }; globalThis.location = { replace(u) { console.log(u); } };\n";
    let out = std::process::Command::new("node")
        .arg("-e")
        .arg(format!("{shim}{script}"))
        .output()
        .unwrap();
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        url.starts_with("/.ringway/challenge?n="),
        "{url} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = get_with(&p, "", &url);
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/landing"));
    let cookie = pass_cookie(&r);
    assert_eq!(
        get_with(&p, &format!("Cookie: {cookie}\r\n"), "/landing").status,
        200
    );
}

#[test]
fn challenge_on_match_only_for_matching_requests() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\n[policy.challenge]\nwhen = \"on_match\"\nuser_agents = [\"python-requests\"]\npath_prefixes = [\"/login\"]\n",
    );
    let p = TestProxy::start(&routes);
    assert_eq!(get_with(&p, "User-Agent: Mozilla/5.0\r\n", "/").status, 200);
    assert_eq!(
        get_with(&p, "User-Agent: Mozilla/5.0\r\n", "/login").status,
        403
    );
    assert_eq!(
        get_with(&p, "User-Agent: python-requests/2.31\r\n", "/").status,
        403
    );
}

#[test]
fn visitor_and_session_cookies_are_set_kept_and_expired() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\nvisitor_cookies = true\n",
    );
    let mut p = TestProxy::start(&routes);
    // First visit: both cookies set; the upstream sees the ids, not what the client claimed.
    let r = get_with(&p, "X-Visitor-ID: spoofed\r\n", "/headers");
    let set: Vec<&str> = r.headers_named("set-cookie");
    assert_eq!(set.len(), 2, "{set:?}");
    let value = |name: &str| -> String {
        let c = set
            .iter()
            .find(|c| c.starts_with(&format!("{name}=")))
            .unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax"), "{c}");
        c.split(';').next().unwrap()[name.len() + 1..].to_string()
    };
    let (vid, sid_cookie) = (value("rw_vid"), value("rw_sid"));
    let sid = sid_cookie.split('.').next().unwrap().to_string();
    assert_eq!(vid.len(), 32);
    let seen = r.text();
    assert!(seen.contains(&format!("X-Visitor-ID: {vid}")), "{seen}");
    assert!(seen.contains(&format!("X-Session-ID: {sid}")), "{seen}");
    assert!(!seen.contains("spoofed"));

    // Back with the cookies: same ids, nothing set again.
    let cookies = format!("Cookie: rw_vid={vid}; rw_sid={sid_cookie}\r\n");
    let r = get_with(&p, &cookies, "/headers");
    assert!(r.headers_named("set-cookie").is_empty());
    assert!(r.text().contains(&format!("X-Session-ID: {sid}")));

    // A session idle past its window: a new session, the same visitor.
    let stale = format!("Cookie: rw_vid={vid}; rw_sid={sid}.{}\r\n", now() - 4000);
    let r = get_with(&p, &stale, "/headers");
    let set = r.headers_named("set-cookie");
    assert_eq!(set.len(), 1);
    assert!(set[0].starts_with("rw_sid=") && !set[0].contains(&sid));
    assert!(r.text().contains(&format!("X-Visitor-ID: {vid}")));

    let log = p.stop();
    let with_ids = log
        .iter()
        .filter(|l| l["visitor_id"] == vid.as_str())
        .count();
    assert_eq!(with_ids, 3, "every request logged with its visitor id");
}

#[test]
fn without_consent_no_cookies() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\nvisitor_cookies = false\nblock_paths = [\"/x\"]\n",
    );
    let p = TestProxy::start(&routes);
    let r = get_with(&p, "", "/headers");
    assert!(r.headers_named("set-cookie").is_empty());
    assert!(!r.text().contains("X-Visitor-ID"));
}

fn proxy_v2(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

#[test]
fn proxy_protocol_from_an_allowed_balancer() {
    let origin = Origin::start();
    let routes = with_policy(
        origin.addr,
        "[[policy]]\nproject_id = 11\ndeny = [\"198.51.100.0/24\"]\n",
    );
    let ca = crate::support::pki::Ca::new();
    let leaf = ca.leaf(&["app.test"]);
    let routes = format!(
        "{routes}\n[[certificate]]\nname = \"app\"\ncert = \"tls/app.crt\"\nkey = \"tls/app.key\"\n"
    );
    let mut p = TestProxy::start_with_files(
        &[
            ("tls/app.crt", &leaf.cert_pem),
            ("tls/app.key", &leaf.key_pem),
        ],
        &routes,
        |c| {
            c.listen.https = Some("127.0.0.1:0".parse().unwrap());
            c.listen.proxy_protocol = true;
            c.listen.proxy_protocol_from = vec!["127.0.0.1".parse().unwrap()];
        },
    );
    // v1 then a request, in one write: the client is who the header says.
    let mut c = Conn::connect(p.addr);
    c.send(b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 80\r\nGET /headers HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("X-Forwarded-For: 203.0.113.9"),
        "{}",
        r.text()
    );
    // The connection goes on as that client.
    assert_eq!(c.get("app.test", "/second").status, 200);
    // v2, and its address meets the policy.
    let mut c = Conn::connect(p.addr);
    let mut req = proxy_v2([198, 51, 100, 4], 4000);
    req.extend_from_slice(b"GET /denied HTTP/1.1\r\nHost: app.test\r\n\r\n");
    c.send(&req);
    assert_eq!(c.read_response(false).unwrap().status, 403);
    // Over TLS: the header comes before the ClientHello.
    let mut t = crate::support::pki::TlsClient::connect_after(
        p.https.unwrap(),
        &ca.client(),
        "app.test",
        b"PROXY TCP6 2001:db8::9 2001:db8::1 7000 443\r\n",
    )
    .unwrap();
    let r = t.get("app.test", "/headers").unwrap();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("X-Forwarded-For: 2001:db8::9"));
    // From an allowed source the header is required: without one the connection is closed.
    let mut c = Conn::connect(p.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n");
    assert!(c.read_response(false).is_err());
    assert!(eventually(Duration::from_secs(5), || p
        .metric_sum("ringway_proxy_protocol_errors_total")
        >= 1.0));
    let log = p.stop();
    assert!(
        log.iter()
            .any(|l| l["client_ip"] == "203.0.113.9" && l["path"] == "/second")
    );
    assert!(
        log.iter()
            .any(|l| l["client_ip"] == "198.51.100.4" && l["reason"] == "ip_denied")
    );
}

#[test]
fn proxy_protocol_from_anyone_else_is_just_a_bad_request() {
    let origin = Origin::start();
    let p = TestProxy::start_with(&routes_to(origin.addr), |c| {
        c.listen.proxy_protocol = true;
        c.listen.proxy_protocol_from = vec!["10.0.0.0/8".parse().unwrap()];
    });
    let mut c = Conn::connect(p.addr);
    c.send(b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: app.test\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 400);
    // Plain requests from that peer are served as usual.
    assert_eq!(get(p.addr, "app.test", "/plain").status, 200);
    assert!(origin.paths().iter().all(|p| p == "/plain"));
}
