//! Route file hot reload: under load, with broken files in between, without failed requests.

use crate::support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

fn route_file(upstream: std::net::SocketAddr, extra_host: Option<&str>) -> String {
    let mut hosts = vec!["\"app.test\"".to_string()];
    if let Some(h) = extra_host {
        hosts.push(format!("\"{h}\""));
    }
    format!(
        "[[route]]\nname = \"app\"\nhosts = [{}]\nupstreams = [\"{upstream}\"]\n",
        hosts.join(", ")
    )
}

#[test]
fn hot_reload_under_load_fails_no_request() {
    let a = Origin::start();
    let b = Origin::start();
    let p = TestProxy::start(&route_file(a.addr, None));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for t in 0..4 {
        let (stop, failures, done, addr) = (stop.clone(), failures.clone(), done.clone(), p.addr);
        clients.push(std::thread::spawn(move || {
            let mut c = Conn::connect(addr);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Alternate keep-alive requests with fresh connections.
                let r = if i.is_multiple_of(10) {
                    get(addr, "app.test", &format!("/t{t}/{i}"))
                } else {
                    c.get("app.test", &format!("/t{t}/{i}"))
                };
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for round in 0..6 {
        let (to, other) = if round % 2 == 0 { (&b, &a) } else { (&a, &b) };
        if round == 3 {
            // A broken file in between: refused, routes unchanged.
            p.write_routes("[[route]]\nname = \"broken\"\nhosts = [");
            std::thread::sleep(Duration::from_millis(150));
        }
        p.write_routes(&route_file(to.addr, None));
        let before = to.requests().len();
        assert!(
            eventually(Duration::from_secs(5), || to.requests().len() > before + 20),
            "round {round}: traffic did not move to the new upstream"
        );
        let _ = other;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 100);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed during reloads"
    );
    assert!(
        p.metric_sum("ringway_route_loads_total{result=\"error\"}") >= 1.0
            || p.metrics()
                .contains("ringway_route_loads_total{result=\"error\"} 1")
    );
}

#[test]
fn broken_route_file_keeps_the_last_good_routes() {
    let a = Origin::start();
    let p = TestProxy::start(&route_file(a.addr, Some("extra.test")));
    assert_eq!(get(p.addr, "extra.test", "/").status, 200);
    p.write_routes(
        "[[route]]\nname = \"x\"\nhosts = [\"extra.test\"]\nupstreams = [\"not-an-address\"]\n",
    );
    assert!(eventually(Duration::from_secs(5), || p
        .metrics()
        .contains("ringway_route_loads_total{result=\"error\"} 1")));
    assert_eq!(
        get(p.addr, "extra.test", "/").status,
        200,
        "last good routes stay"
    );
    // Removing a host takes effect; adding one too.
    p.write_routes(&route_file(a.addr, None));
    assert!(eventually(Duration::from_secs(5), || get(
        p.addr,
        "extra.test",
        "/"
    )
    .status
        == 404));
    p.write_routes(&route_file(a.addr, Some("new.test")));
    assert!(eventually(Duration::from_secs(5), || get(
        p.addr, "new.test", "/"
    )
    .status
        == 200));
}
