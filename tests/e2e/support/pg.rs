//! PostgreSQL for tests: a database of its own per test (created, migrated, dropped), and a
//! TCP relay between the proxy and the server that a test can cut to simulate an outage
//! without touching the shared server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The server the tests use (tests/run.sh sets it; it falls back to a throwaway cluster).
pub fn server() -> String {
    std::env::var("RINGWAY_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
}

fn param(conn: &str, key: &str) -> Option<String> {
    conn.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// A database created for one test and dropped after it.
pub struct TestDb {
    pub name: String,
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    admin: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl TestDb {
    /// Creates a uniquely named empty database.
    pub fn create() -> TestDb {
        let admin = server();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "ringway_t_{}_{}_{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = rt.block_on(connect(&format!("{admin} dbname=postgres")));
        rt.block_on(a.batch_execute(&format!("CREATE DATABASE {name}")))
            .unwrap_or_else(|e| panic!("creating a test database on {admin}: {e} (is PostgreSQL running? tests/run.sh starts one)"));
        drop(a);
        let client = rt.block_on(connect(&format!("{admin} dbname={name}")));
        TestDb {
            name,
            rt,
            client,
            admin,
        }
    }

    /// Creates a database and applies Ringway's migrations to it.
    pub fn migrated() -> TestDb {
        let db = TestDb::create();
        let mut c = ringway_core::Config::default();
        c.postgres.url = db.url();
        ringway::migrate(&c).unwrap();
        db
    }

    /// Connection string of this database.
    pub fn url(&self) -> String {
        format!("{} dbname={}", self.admin, self.name)
    }

    /// The same, through `relay`.
    pub fn url_via(&self, relay: &Relay) -> String {
        let user = param(&self.admin, "user").unwrap_or_else(|| "postgres".into());
        format!(
            "host=127.0.0.1 port={} user={user} dbname={}",
            relay.addr.port(),
            self.name
        )
    }

    /// The server's address (for a relay).
    pub fn server_addr(&self) -> SocketAddr {
        let host = param(&self.admin, "host").unwrap_or_else(|| "127.0.0.1".into());
        let port = param(&self.admin, "port").unwrap_or_else(|| "5432".into());
        format!("{host}:{port}").parse().unwrap()
    }

    pub fn exec(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs `sql` with text parameters.
    pub fn exec_params(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> u64 {
        self.rt
            .block_on(self.client.execute(sql, params))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn i64(&self, sql: &str) -> i64 {
        let row = self
            .rt
            .block_on(self.client.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = format!("{} dbname=postgres", self.admin);
        let name = self.name.clone();
        let _ = self.rt.block_on(async move {
            let a = connect(&admin).await;
            a.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
        });
    }
}

async fn connect(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("connecting to {conn}: {e} (is PostgreSQL running? tests/run.sh starts one)")
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A TCP relay to a server that can be cut (open connections reset, new ones refused by
/// closing them at once) and restored.
pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, stop2, conns2) = (up.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if !up2.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = conns2.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Relay {
            addr,
            up,
            stop,
            conns,
        }
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
