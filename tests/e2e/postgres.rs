//! PostgreSQL as the route store and the request log sink, against the real server: each test
//! creates its own database (see `support::pg`), and outages go through a relay the test cuts,
//! never the shared server.

use crate::support::pg::{Relay, TestDb};
use crate::support::pki::{Ca, TlsClient};
use crate::support::*;
use ringway_core::config::{Config, StoreKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const SECS: Duration = Duration::from_secs(10);

/// A proxy whose routes come from `url`.
fn pg_proxy(url: String, tweak: impl FnOnce(&mut Config)) -> TestProxy {
    TestProxy::start_with("", |c| {
        c.routes.store = StoreKind::Postgres;
        c.postgres.url = url;
        c.postgres.startup_wait_ms = 5000;
        c.postgres.connect_timeout_ms = 1000;
        c.postgres.reconnect_backoff_max_ms = 300;
        tweak(c)
    })
}

/// One project and environment, and a deployment per upstream (ids 1, 2, ...).
fn seed(db: &TestDb, upstreams: &[SocketAddr]) {
    db.exec("INSERT INTO projects (id, slug) VALUES (1, 'p1'); INSERT INTO environments (id, project_id, name) VALUES (1, 1, 'prod')");
    for (i, u) in upstreams.iter().enumerate() {
        db.exec(&format!("INSERT INTO deployments (id, project_id, environment_id, upstreams) VALUES ({}, 1, 1, '{{{u}}}')", i + 1));
    }
}

fn status(p: &TestProxy, host: &str, path: &str) -> u16 {
    get(p.addr, host, path).status
}

/// Sum of the histogram buckets with `le` equal to `le`.
fn bucket(m: &str, name: &str, le: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{le=\"{le}\"}}")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn migrations_apply_on_an_empty_database_and_are_idempotent() {
    let db = TestDb::create();
    let mut c = Config::default();
    c.postgres.url = db.url();
    assert_eq!(ringway::migrate(&c).unwrap(), vec![1, 2, 3]);
    assert_eq!(ringway::migrate(&c).unwrap(), Vec::<i32>::new());
    assert_eq!(db.i64("SELECT count(*) FROM ringway_schema_migrations"), 3);
    for t in [
        "projects",
        "environments",
        "deployments",
        "domains",
        "certificates",
        "acme_challenges",
        "proxy_logs",
        "ringway_log_batches",
        "upstreams",
    ] {
        assert_eq!(db.i64(&format!("SELECT count(*) FROM {t}")), 0, "{t}");
    }
    // The binary does the same.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ringway.toml");
    std::fs::write(&cfg, format!("[postgres]\nurl = \"{}\"\n", db.url())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["migrate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "schema up to date"
    );
    // A schema from a newer Ringway: this binary refuses to migrate it.
    db.exec("INSERT INTO ringway_schema_migrations (version, name) VALUES (99, 'future')");
    let err = format!("{:#}", ringway::migrate(&c).unwrap_err());
    assert!(err.contains("newer"), "{err}");
}

#[test]
fn domain_changes_are_served_as_the_database_says() {
    let (o1, o2) = (Origin::start(), Origin::start());
    let db = TestDb::migrated();
    seed(&db, &[o1.addr, o2.addr]);
    let p = pg_proxy(db.url(), |_| {});
    assert!(
        p.running().routes.is_loaded(),
        "an empty database is a loaded (empty) route set"
    );
    assert_eq!(status(&p, "a.test", "/0"), 404);

    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    assert!(eventually(SECS, || status(&p, "a.test", "/1") == 200));
    assert!(o1.paths().contains(&"/1".to_string()));

    db.exec("UPDATE domains SET redirect_https = true WHERE hostname = 'a.test'");
    assert!(eventually(SECS, || status(&p, "a.test", "/2") == 301));

    // Pointed to another deployment.
    db.exec(
        "UPDATE domains SET redirect_https = false, deployment_id = 2 WHERE hostname = 'a.test'",
    );
    assert!(eventually(SECS, || status(&p, "a.test", "/3") == 200
        && o2.paths().contains(&"/3".to_string())));

    // Renamed: the old name goes, the new one comes.
    db.exec("UPDATE domains SET hostname = 'b.test' WHERE hostname = 'a.test'");
    assert!(eventually(SECS, || status(&p, "b.test", "/4") == 200
        && status(&p, "a.test", "/5") == 404));

    // The deployment's upstreams change: its domains follow.
    db.exec(&format!(
        "UPDATE deployments SET upstreams = '{{{}}}' WHERE id = 2",
        o1.addr
    ));
    assert!(eventually(SECS, || status(&p, "b.test", "/6") == 200
        && o1.paths().contains(&"/6".to_string())));

    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('*.w.test', 1)");
    assert!(eventually(SECS, || status(&p, "x.w.test", "/7") == 200));

    db.exec("DELETE FROM domains WHERE hostname = 'b.test'");
    assert!(eventually(SECS, || status(&p, "b.test", "/8") == 404));

    // A deployment deleted takes its domains along (ON DELETE CASCADE, then their triggers).
    db.exec("DELETE FROM deployments WHERE id = 1");
    assert!(eventually(SECS, || status(&p, "x.w.test", "/9") == 404));

    // Every change was visible within 100 ms, by the proxy's own clock (trigger time to
    // table applied).
    let m = p.metrics();
    let count = metric_sum(&m, "ringway_db_change_visible_seconds_count");
    assert!(count >= 8.0, "{m}");
    assert_eq!(
        bucket(&m, "ringway_db_change_visible_seconds", "0.1"),
        count,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "ringway_db_full_loads_total"), 1.0);
}

#[test]
fn certificate_rows_are_validated_served_and_replaced() {
    let origin = Origin::start();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1), ('b.test', 1)");
    let ca = Ca::new();
    let (v1, v2, other, fallback) = (
        ca.leaf(&["a.test"]),
        ca.leaf(&["a.test"]),
        ca.leaf(&["a.test"]),
        ca.leaf(&["fallback.test"]),
    );
    db.exec_params(
        "INSERT INTO certificates (domain, cert_pem, key_pem) VALUES ('a.test', $1, $2)",
        &[&v1.cert_pem, &v1.key_pem],
    );
    let p = pg_proxy(db.url(), |c| {
        c.listen.https = Some("127.0.0.1:0".parse().unwrap())
    });
    let https = p.https.unwrap();
    let client = ca.client_no_resumption();
    let presented = |sni: &str| {
        TlsClient::connect(https, &client, sni)
            .ok()
            .map(|c| c.peer_cert())
    };
    assert_eq!(presented("a.test"), Some(v1.der.clone()));
    let mut c = TlsClient::connect(https, &client, "a.test").unwrap();
    assert_eq!(c.get("a.test", "/tls").unwrap().status, 200);

    // Replaced: the next handshake gets the new one.
    db.exec_params(
        "UPDATE certificates SET cert_pem = $1, key_pem = $2 WHERE domain = 'a.test'",
        &[&v2.cert_pem, &v2.key_pem],
    );
    assert!(eventually(SECS, || presented("a.test") == Some(v2.der.clone())));

    // A malformed row is skipped and reported; nothing is served for it.
    db.exec("INSERT INTO certificates (domain, cert_pem, key_pem) VALUES ('b.test', 'not a certificate', 'not a key')");
    let refused = |domain: &str| {
        let m = p.metrics();
        m.lines().any(|l| {
            l.starts_with(&format!(
                "ringway_tls_certificate_refused{{certificate=\"{domain}\""
            ))
        })
    };
    assert!(eventually(SECS, || refused("b.test")), "{}", p.metrics());
    assert_eq!(presented("b.test"), None);
    // A replacement whose key does not match: refused, the version in service stays.
    db.exec_params(
        "UPDATE certificates SET key_pem = $1 WHERE domain = 'a.test'",
        &[&other.key_pem],
    );
    assert!(eventually(SECS, || refused("a.test")));
    assert_eq!(presented("a.test"), Some(v2.der.clone()));
    // The default certificate.
    db.exec_params("INSERT INTO certificates (domain, cert_pem, key_pem, is_default) VALUES ('fallback.test', $1, $2, true)", &[&fallback.cert_pem, &fallback.key_pem]);
    let any = crate::support::pki::client_accepting_any();
    assert!(eventually(SECS, || TlsClient::connect(
        https,
        &any,
        "unknown.test"
    )
    .is_ok_and(|c| c.peer_cert() == fallback.der)));
    db.exec("UPDATE certificates SET is_default = false WHERE domain = 'fallback.test'");
    assert!(eventually(SECS, || TlsClient::connect(
        https,
        &any,
        "unknown.test"
    )
    .is_err()));
    // Deleted: no longer served.
    db.exec("DELETE FROM certificates WHERE domain IN ('a.test', 'b.test')");
    assert!(eventually(SECS, || presented("a.test").is_none() && !refused("b.test")));
}

#[test]
fn acme_challenges_come_from_the_database() {
    let origin = Origin::start();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec(
        "INSERT INTO domains (hostname, deployment_id, redirect_https) VALUES ('a.test', 1, true)",
    );
    let p = pg_proxy(db.url(), |_| {});
    db.exec(
        "INSERT INTO acme_challenges (token, key_authorization) VALUES ('tok_1', 'tok_1.thumb')",
    );
    assert!(eventually(SECS, || get(
        p.addr,
        "a.test",
        "/.well-known/acme-challenge/tok_1"
    )
    .text()
        == "tok_1.thumb"));
    db.exec("DELETE FROM acme_challenges");
    assert!(eventually(SECS, || status(
        &p,
        "a.test",
        "/.well-known/acme-challenge/tok_1"
    ) == 301));
}

/// Sends requests on keep-alive connections until told to stop; counts them and failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr, host: &'static str, threads: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = (0..threads)
            .map(|t| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut c = Conn::connect(addr);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let r = c.try_get(host, &format!("/t{t}/{i}"));
                        sent.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Some(r) if r.status == 200 => {}
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                c = Conn::connect(addr);
                            }
                        }
                        if i.is_multiple_of(100) {
                            // Now and then a new connection, as browsers do.
                            c = Conn::connect(addr);
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            sent,
            failed,
            threads,
        }
    }

    /// Stops; returns (sent, failed).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn database_outage_keeps_serving_spools_logs_and_replays_them_once() {
    let origin = Origin::start_unrecorded();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let relay = Relay::start(db.server_addr());
    let mut p = pg_proxy(db.url_via(&relay), |c| {
        c.access_log.enabled = false;
        c.postgres.logs.enabled = true;
        c.postgres.logs.flush_interval_ms = 50;
        c.postgres.logs.batch_rows_max = 500;
        c.postgres.logs.write_timeout_ms = 1000;
    });
    let traffic = Traffic::start(p.addr, "a.test", 2);
    assert!(eventually(SECS, || p
        .metric_sum("ringway_log_rows_written_total")
        > 200.0));
    relay.cut();
    // Requests go on; their rows pile up in the spool.
    assert!(
        eventually(SECS, || p.metric_sum("ringway_log_rows_spooled_total")
            > 500.0),
        "{}",
        p.metrics()
    );
    assert!(p.metric_sum("ringway_db_errors_total") >= 1.0);
    relay.restore();
    assert!(
        eventually(SECS, || p.metric_sum("ringway_log_rows_replayed_total")
            > 0.0
            && p.metric_sum("ringway_log_spool_bytes") == 0.0),
        "{}",
        p.metrics()
    );
    let (sent, failed) = traffic.finish();
    assert_eq!(failed, 0, "requests failed during the outage");
    // Stopping flushes the rings and what is queued.
    p.stop();
    let rows = db.i64("SELECT count(*) FROM proxy_logs");
    let distinct = db.i64("SELECT count(DISTINCT request_id) FROM proxy_logs");
    assert_eq!(rows as u64, sent, "every request has its row");
    assert_eq!(distinct, rows, "no row written twice");
}

#[test]
fn restart_with_the_database_down_serves_from_the_snapshot() {
    let origin = Origin::start();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"]);
    db.exec_params(
        "INSERT INTO certificates (domain, cert_pem, key_pem) VALUES ('a.test', $1, $2)",
        &[&leaf.cert_pem, &leaf.key_pem],
    );
    let relay = Relay::start(db.server_addr());
    let mut p = pg_proxy(db.url_via(&relay), |c| {
        c.listen.https = Some("127.0.0.1:0".parse().unwrap());
        c.postgres.startup_wait_ms = 500;
    });
    assert_eq!(status(&p, "a.test", "/before"), 200);
    assert!(eventually(SECS, || p
        .metric_sum("ringway_snapshot_file_writes_total")
        >= 1.0));

    relay.cut();
    p.restart();
    assert_eq!(status(&p, "a.test", "/from-snapshot"), 200);
    assert_eq!(get(p.admin, "admin", "/readyz").status, 200);
    let client = ca.client_no_resumption();
    assert_eq!(
        TlsClient::connect(p.https.unwrap(), &client, "a.test")
            .unwrap()
            .peer_cert(),
        leaf.der
    );
    let m = p.metrics();
    assert_eq!(
        metric_sum(&m, "ringway_serving_from_snapshot_file"),
        1.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "ringway_db_connected"), 0.0);

    // What changed while the node was cut off arrives when the database is back.
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('c.test', 1)");
    relay.restore();
    assert!(eventually(SECS, || status(&p, "c.test", "/caught-up") == 200));
    assert!(eventually(SECS, || p
        .metric_sum("ringway_serving_from_snapshot_file")
        == 0.0));
}

#[test]
fn not_ready_without_database_or_snapshot_until_the_database_answers() {
    let origin = Origin::start();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let relay = Relay::start(db.server_addr());
    relay.cut();
    let p = pg_proxy(db.url_via(&relay), |c| c.postgres.startup_wait_ms = 200);
    assert_eq!(get(p.admin, "admin", "/readyz").status, 503);
    relay.restore();
    assert!(eventually(SECS, || get(p.admin, "admin", "/readyz").status == 200));
    assert!(eventually(SECS, || status(&p, "a.test", "/ready") == 200));
}

#[test]
fn sustained_load_writes_one_row_per_request() {
    let origin = Origin::start_unrecorded();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let mut p = pg_proxy(db.url(), |c| {
        c.access_log.enabled = false;
        c.postgres.logs.enabled = true;
    });
    let traffic = Traffic::start(p.addr, "a.test", 2);
    std::thread::sleep(Duration::from_secs(2));
    let (sent, failed) = traffic.finish();
    assert_eq!(failed, 0);
    // A request to an unknown host is logged too (no route ids).
    assert_eq!(status(&p, "nowhere.test", "/x"), 404);
    p.stop();
    assert_eq!(db.i64("SELECT count(*) FROM proxy_logs") as u64, sent + 1);
    assert_eq!(db.i64("SELECT count(*) FROM proxy_logs WHERE host = 'a.test' AND status = 200 AND project_id = 1 AND deployment_id = 1 AND client_ip = '127.0.0.1'") as u64, sent);
    assert_eq!(db.i64("SELECT count(*) FROM proxy_logs WHERE host = 'nowhere.test' AND status = 404 AND project_id IS NULL"), 1);
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM proxy_logs WHERE ts < now() - interval '1 minute' OR ts > now()"
        ),
        0,
        "timestamps are now"
    );
}

#[test]
fn a_batch_the_database_refuses_is_dropped_and_counted_not_retried_forever() {
    let origin = Origin::start_unrecorded();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec(
        "INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1), ('poison.test', 1)",
    );
    // A rule the platform added that Ringway's rows break (a constraint, a trigger, a
    // missing partition): retrying cannot help.
    db.exec("ALTER TABLE proxy_logs ADD CONSTRAINT no_poison CHECK (host <> 'poison.test')");
    let p = pg_proxy(db.url(), |c| {
        c.postgres.logs.enabled = true;
        c.postgres.logs.flush_interval_ms = 20;
    });
    for i in 0..5 {
        assert_eq!(status(&p, "a.test", &format!("/before{i}")), 200);
    }
    assert!(eventually(SECS, || db
        .i64("SELECT count(*) FROM proxy_logs")
        == 5));
    assert_eq!(status(&p, "poison.test", "/x"), 200);
    assert!(
        eventually(SECS, || p.metric_sum("ringway_log_batches_refused_total")
            == 1.0),
        "{}",
        p.metrics()
    );
    // Rows behind it flow again.
    for i in 0..5 {
        assert_eq!(status(&p, "a.test", &format!("/after{i}")), 200);
    }
    assert!(eventually(SECS, || db.i64(
        "SELECT count(*) FROM proxy_logs WHERE path LIKE '/after%'"
    ) == 5));
    let m = p.metrics();
    assert!(metric_sum(&m, r#"ringway_log_rows_dropped_total{reason="refused"}"#) >= 1.0);
    assert_eq!(
        metric_sum(&m, "ringway_log_rows_dropped_total"),
        metric_sum(&m, r#"ringway_log_rows_dropped_total{reason="refused"}"#),
        "{m}"
    );
    assert_eq!(metric_sum(&m, "ringway_log_spool_bytes"), 0.0);
}

#[test]
fn policies_and_100k_ip_rules_follow_the_database() {
    let origin = Origin::start_unrecorded();
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let p = pg_proxy(db.url(), |c| {
        c.headers.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]
    });
    let from = |ip: &str, path: &str| {
        let mut c = Conn::connect(p.addr);
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: {ip}\r\n\r\n")
                .as_bytes(),
        );
        c.read_response(false).unwrap().status
    };
    assert_eq!(from("10.9.1.1", "/"), 200);
    db.exec("INSERT INTO access_policies (id, project_id) VALUES (1, 1)");
    db.exec("INSERT INTO ip_rules (policy_id, cidr, action) VALUES (1, '10.9.0.0/16', 'deny'), (1, '2001:db8::/32', 'deny')");
    assert!(eventually(SECS, || from("10.9.1.1", "/") == 403));
    assert_eq!(from("2001:db8::7", "/"), 403);
    assert_eq!(from("10.8.1.1", "/"), 200);
    db.exec(r#"UPDATE access_policies SET policy = '{"block_paths": ["/admin"], "rate_limit": [{"rps": 1000, "burst": 1000}]}' WHERE id = 1"#);
    assert!(eventually(SECS, || from("10.8.1.1", "/admin") == 403));
    db.exec("DELETE FROM ip_rules WHERE cidr = '10.9.0.0/16'");
    assert!(eventually(SECS, || from("10.9.1.1", "/") == 200));
    // A policy the store refuses keeps the version in force.
    db.exec(r#"UPDATE access_policies SET policy = '{"block_paths": ["no-slash"]}' WHERE id = 1"#);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        from("10.8.1.1", "/admin"),
        403,
        "the refused version did not replace the good one"
    );
    // Replaced in one transaction (the old row deleted, a new one for the same project): the
    // new policy is in force afterwards, whatever order the notifications were applied in.
    db.exec(
        r#"BEGIN;
        DELETE FROM access_policies WHERE id = 1;
        INSERT INTO access_policies (id, project_id, policy) VALUES (3, 1, '{"block_paths": ["/other"]}');
        COMMIT;"#,
    );
    assert!(eventually(SECS, || from("10.8.1.1", "/admin") == 200));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        from("10.8.1.1", "/other"),
        403,
        "the replacement stays in force"
    );
    // A host policy is kept under the host's normal form; a wildcard one is refused, counted,
    // and breaks nothing else.
    db.exec(r#"INSERT INTO access_policies (id, hostname, policy) VALUES (4, 'a.test.', '{"block_paths": ["/host-only"]}'), (5, '*.wild.test', '{}')"#);
    assert!(eventually(SECS, || from("10.8.1.1", "/host-only") == 403));
    assert_eq!(
        from("10.8.1.1", "/other"),
        200,
        "the host policy replaces the project's"
    );
    assert!(p.metric_sum("ringway_policy_refusals_total") >= 1.0);
    db.exec("DELETE FROM access_policies WHERE id IN (3, 4, 5)");
    assert!(eventually(SECS, || from("10.8.1.1", "/host-only") == 200
        && from("10.8.1.1", "/other") == 200));

    // Every change so far was visible within 100 ms by the proxy's own measure.
    let m = p.metrics();
    let count = metric_sum(&m, "ringway_db_change_visible_seconds_count");
    assert!(count >= 6.0, "{m}");
    assert_eq!(
        bucket(&m, "ringway_db_change_visible_seconds", "0.1"),
        count,
        "{m}"
    );

    // 100,000 deny rules in one statement: one notification, one re-read. (Its change time is
    // the transaction's start, so that one measures the insert too.)
    db.exec("INSERT INTO access_policies (id, project_id) VALUES (2, 1)");
    db.exec(
        "INSERT INTO ip_rules (policy_id, cidr, action) \
         SELECT 2, ('11.' || (g / 65536) || '.' || ((g / 256) % 256) || '.' || (g % 256))::cidr, 'deny' \
         FROM generate_series(0, 99999) g",
    );
    assert!(
        eventually(SECS, || from("11.1.134.159", "/") == 403),
        "the last of the 100,000 rules"
    );
    assert_eq!(from("11.0.0.0", "/"), 403);
    assert_eq!(from("11.1.134.160", "/"), 200);
    assert_eq!(from("11.2.0.0", "/"), 200);

    // And a restart with 100,000 rules loads them in the full load.
    let mut p = p;
    p.restart();
    let mut c = Conn::connect(p.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 11.0.200.1\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 403);
}

/// A proxy logging to `db` through `relay`, in small and frequent batches.
fn spooling_proxy(db: &TestDb, relay: &Relay, tweak: impl FnOnce(&mut Config)) -> TestProxy {
    pg_proxy(db.url_via(relay), |c| {
        c.access_log.enabled = false;
        c.postgres.logs.enabled = true;
        c.postgres.logs.flush_interval_ms = 50;
        c.postgres.logs.batch_rows_max = 200;
        c.postgres.logs.write_timeout_ms = 1000;
        tweak(c)
    })
}

/// A served host, a proxy on it whose log sink has written (so a cut breaks a live
/// connection), and the relay to cut.
fn logging_setup(origin: &Origin, tweak: impl FnOnce(&mut Config)) -> (TestDb, Relay, TestProxy) {
    let db = TestDb::migrated();
    seed(&db, &[origin.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let relay = Relay::start(db.server_addr());
    let p = spooling_proxy(&db, &relay, tweak);
    assert_eq!(status(&p, "a.test", "/first"), 200);
    assert!(eventually(SECS, || p
        .metric_sum("ringway_log_rows_written_total")
        == 1.0));
    (db, relay, p)
}

fn spool_dir(p: &TestProxy) -> std::path::PathBuf {
    p.dir.path().join(&p.config.postgres.logs.spool_dir)
}

/// The spool's segment files, oldest first.
fn spool_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// One frame of a spool segment.
#[derive(Debug, Clone, Copy)]
struct SpoolFrame {
    offset: u64,
    len: u64,
    rows: u64,
}

/// The frames of a segment, read as docs/postgres.md describes them (RWL2: a 28-byte header
/// with the body length at 4 and the rows at 12); panics on anything but whole frames.
fn spool_frames(path: &std::path::Path) -> Vec<SpoolFrame> {
    const HEAD: usize = 28;
    let b = std::fs::read(path).unwrap();
    let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut off = 0;
    while off < b.len() {
        assert!(
            off + HEAD <= b.len(),
            "{}: torn header at {off}",
            path.display()
        );
        assert_eq!(word(off), 0x5257_4c32, "{}: magic at {off}", path.display());
        let len = HEAD + word(off + 4) as usize;
        assert!(
            off + len <= b.len(),
            "{}: torn frame at {off}",
            path.display()
        );
        out.push(SpoolFrame {
            offset: off as u64,
            len: len as u64,
            rows: u64::from(word(off + 12)),
        });
        off += len;
    }
    out
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[!b[0]], offset).unwrap();
}

const SPOOL_CORRUPT: &str = r#"ringway_log_rows_dropped_total{reason="spool_corrupt"}"#;

/// Cuts the database off and sends requests until more than `rows` rows are spooled.
fn cut_and_spool(p: &TestProxy, relay: &Relay, rows: f64) -> Traffic {
    relay.cut();
    let traffic = Traffic::start(p.addr, "a.test", 2);
    assert!(
        eventually(SECS, || p.metric_sum("ringway_log_rows_spooled_total")
            > rows),
        "{}",
        p.metrics()
    );
    traffic
}

/// Brings the database back, waits until the spool is replayed, checks the corrupt frames
/// counted, and returns the metrics then.
fn replay_all(p: &TestProxy, relay: &Relay, corrupt_frames: f64) -> String {
    relay.restore();
    assert!(
        eventually(SECS, || p.metric_sum("ringway_log_spool_bytes") == 0.0),
        "{}",
        p.metrics()
    );
    let m = p.metrics();
    assert_eq!(
        metric_sum(&m, "ringway_log_spool_corrupt_frames_total"),
        corrupt_frames,
        "{m}"
    );
    m
}

/// Damages a spool left on disk: one byte flipped in the body of a frame of the first
/// segment, one in the header of another, and the last frame of the spool torn (a crash
/// mid-append). Returns the damaged frames' rows.
fn damage_spool(dir: &std::path::Path) -> u64 {
    let segs = spool_segments(dir);
    let first = spool_frames(&segs[0]);
    assert!(first.len() >= 8, "{} frames", first.len());
    let (body_hit, head_hit) = (first[first.len() / 2], first[first.len() / 4]);
    flip_byte(&segs[0], body_hit.offset + body_hit.len / 2);
    flip_byte(&segs[0], head_hit.offset + 13);
    let last_seg = segs.last().unwrap();
    let last = *spool_frames(last_seg).last().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(last_seg)
        .unwrap();
    f.set_len(last.offset + last.len - 10).unwrap();
    body_hit.rows + head_hit.rows + last.rows
}

#[test]
fn garbage_appended_to_the_live_spool_segment_costs_no_rows() {
    let origin = Origin::start_unrecorded();
    let (db, relay, mut p) = logging_setup(&origin, |_| {});
    let traffic = cut_and_spool(&p, &relay, 1000.0);
    // Someone appends to the segment the proxy is appending to. More than a frame's worth, so
    // that some of it lies past whatever frame the proxy writes at the same moment.
    let live = spool_segments(&spool_dir(&p)).pop().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&live)
        .unwrap();
    std::io::Write::write_all(&mut f, &vec![0x5a; 200 << 10]).unwrap();
    // Noticed, and counted, while the database is still away.
    assert!(
        eventually(SECS, || p
            .metric_sum("ringway_log_spool_corrupt_frames_total")
            == 1.0),
        "{}",
        p.metrics()
    );
    let spooled = p.metric_sum("ringway_log_rows_spooled_total");
    assert!(eventually(SECS, || p
        .metric_sum("ringway_log_rows_spooled_total")
        > spooled + 1000.0));
    assert!(
        spool_segments(&spool_dir(&p)).len() >= 2,
        "appends after the garbage went to a new segment"
    );
    relay.restore();
    assert!(
        eventually(SECS, || p.metric_sum("ringway_log_rows_replayed_total")
            > 0.0
            && p.metric_sum("ringway_log_spool_bytes") == 0.0),
        "{}",
        p.metrics()
    );
    let (sent, failed) = traffic.finish();
    assert_eq!(failed, 0);
    let m = p.metrics();
    assert_eq!(
        metric_sum(&m, "ringway_log_spool_corrupt_frames_total"),
        1.0,
        "counted once: {m}"
    );
    assert_eq!(metric_sum(&m, "ringway_log_rows_dropped_total"), 0.0, "{m}");
    p.stop();
    let rows = db.i64("SELECT count(*) FROM proxy_logs");
    assert_eq!(
        rows as u64,
        sent + 1,
        "every row behind the garbage replayed"
    );
    assert_eq!(
        db.i64("SELECT count(DISTINCT request_id) FROM proxy_logs"),
        rows
    );
}

#[test]
fn damaged_spool_frames_cost_their_rows_only_and_are_counted_at_start() {
    let origin = Origin::start_unrecorded();
    let (db, relay, mut p) = logging_setup(&origin, |c| {
        c.postgres.startup_wait_ms = 300;
        c.postgres.logs.shutdown_flush_ms = 100;
    });
    let (sent, failed) = cut_and_spool(&p, &relay, 3000.0).finish();
    assert_eq!(failed, 0);
    // Stopping spools what was still in memory: the spool holds every row sent.
    p.stop();
    let dir = spool_dir(&p);
    let spooled: u64 = spool_segments(&dir)
        .iter()
        .flat_map(|s| spool_frames(s))
        .map(|f| f.rows)
        .sum();
    assert_eq!(spooled, sent);
    let lost = damage_spool(&dir);
    p.restart();
    // Found and counted when the spool is opened, before any replay.
    let m = p.metrics();
    assert_eq!(
        metric_sum(&m, "ringway_log_spool_corrupt_frames_total"),
        3.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, SPOOL_CORRUPT), lost as f64, "{m}");
    assert!(metric_sum(&m, "ringway_log_spool_bytes") > 0.0);
    let m = replay_all(&p, &relay, 3.0);
    assert_eq!(
        metric_sum(&m, "ringway_log_rows_dropped_total"),
        lost as f64,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "ringway_log_rows_replayed_total"),
        (sent - lost) as f64
    );
    p.stop();
    let rows = db.i64("SELECT count(*) FROM proxy_logs");
    assert_eq!(
        rows as u64,
        1 + sent - lost,
        "everything but the damaged frames"
    );
    assert_eq!(
        db.i64("SELECT count(DISTINCT request_id) FROM proxy_logs"),
        rows
    );
}

/// A tmpfs of `bytes` on a new directory, unmounted when dropped; None (with a note) where
/// mounting is not permitted (not root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn a_full_disk_under_the_spool_drops_and_counts_only_what_did_not_fit() {
    let Some(disk) = SmallDisk::mount(256 << 10) else {
        return;
    };
    let origin = Origin::start_unrecorded();
    let spool = disk.dir.path().to_path_buf();
    let (db, relay, mut p) = logging_setup(&origin, |c| c.postgres.logs.spool_dir = spool);
    relay.cut();
    let traffic = Traffic::start(p.addr, "a.test", 2);
    let write_failed = r#"ringway_log_rows_dropped_total{reason="spool_write_failed"}"#;
    assert!(
        eventually(SECS, || p.metric_sum(write_failed) > 1000.0),
        "{}",
        p.metrics()
    );
    let (sent, failed) = traffic.finish();
    assert_eq!(failed, 0);
    // Every row sent is spooled or dropped and counted.
    let spooled = || p.metric_sum("ringway_log_rows_spooled_total");
    assert!(eventually(SECS, || spooled() + p.metric_sum(write_failed)
        == sent as f64));
    // The failed appends were cut back: whole frames only, holding every row spooled.
    let on_disk: u64 = spool_segments(disk.dir.path())
        .iter()
        .flat_map(|s| spool_frames(s))
        .map(|f| f.rows)
        .sum();
    assert_eq!(on_disk as f64, spooled());
    let m = replay_all(&p, &relay, 0.0);
    assert_eq!(
        metric_sum(&m, "ringway_log_rows_dropped_total"),
        metric_sum(&m, write_failed),
        "{m}"
    );
    p.stop();
    assert_eq!(
        db.i64("SELECT count(*) FROM proxy_logs") as u64,
        1 + on_disk
    );
}

/// Which backend answers a GET for a.test (`X-Backend`).
fn backend_of(p: &TestProxy, path: &str) -> String {
    let r = get(p.addr, "a.test", path);
    r.header("x-backend").unwrap_or("?").to_string()
}

#[test]
fn upstream_rows_and_balancer_settings_follow_the_database_within_100_ms() {
    use crate::support::backend::Backend;
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let db = TestDb::migrated();
    seed(&db, &[a.addr]);
    db.exec("INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1)");
    let p = pg_proxy(db.url(), |_| {});
    assert_eq!(backend_of(&p, "/"), "a");

    // A row adds an endpoint: visible (some request reaches it) within 100 ms.
    let t = std::time::Instant::now();
    db.exec(&format!(
        "INSERT INTO upstreams (deployment_id, address) VALUES (1, '{}')",
        b.addr
    ));
    let mut seen = None;
    while t.elapsed() < Duration::from_secs(2) {
        if backend_of(&p, "/") == "b" {
            seen = Some(t.elapsed());
            break;
        }
    }
    let seen = seen.expect("the new upstream serves");
    eprintln!("upstream row visible after {seen:?}");
    assert!(seen <= Duration::from_millis(100), "visible after {seen:?}");

    // Upstreams as rows only: a with weight 3, b draining: every new request goes to a.
    db.exec(&format!(
        "UPDATE deployments SET upstreams = '{{}}' WHERE id = 1; \
         INSERT INTO upstreams (deployment_id, address, weight) VALUES (1, '{}', 3); \
         UPDATE upstreams SET state = 'draining' WHERE address = '{}'",
        a.addr, b.addr
    ));
    assert!(eventually(SECS, || (0..10).all(|_| backend_of(&p, "/") == "a")));
    let drained = b.requests();
    for _ in 0..20 {
        assert_eq!(backend_of(&p, "/"), "a");
    }
    assert_eq!(b.requests(), drained);

    // Settings: hashing on the path keeps each path on one endpoint.
    db.exec("UPDATE upstreams SET state = 'active'");
    db.exec(r#"UPDATE deployments SET balancer = '{"balancer": {"strategy": "hash", "hash_key": "path"}}' WHERE id = 1"#);
    assert!(eventually(SECS, || {
        (0..20).all(|i| {
            let path = format!("/p{i}");
            let first = backend_of(&p, &path);
            (0..3).all(|_| backend_of(&p, &path) == first)
        })
    }));
    let on_b = (0..40)
        .filter(|i| backend_of(&p, &format!("/p{i}")) == "b")
        .count();
    assert!(on_b > 0 && on_b < 40, "paths spread over both: {on_b}");

    // A setting the proxy does not know is refused with its reason, not half applied: the
    // domain is not served (as any domain that cannot be routed).
    db.exec(
        r#"UPDATE deployments SET balancer = '{"balancer": {"strategy": "fastest"}}' WHERE id = 1"#,
    );
    assert!(eventually(SECS, || status(&p, "a.test", "/") == 404));
    db.exec("UPDATE deployments SET balancer = '{}' WHERE id = 1");
    assert!(eventually(SECS, || status(&p, "a.test", "/") == 200));
}
