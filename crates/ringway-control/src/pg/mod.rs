//! PostgreSQL, on the control thread only: schema migrations (`migrate`), the route store
//! that follows the database (`store`), the last-known-good snapshot on local disk
//! (`snapshot_file`), and the request log sink (`copy` encodes rows, `spool` keeps what cannot
//! be written yet, `logs` writes batches and replays the spool).
//!
//! The workers never wait for any of it: they read the lock-free tables and push into their
//! rings whatever the database is doing.

pub mod copy;
pub mod logs;
pub mod migrate;
pub mod snapshot_file;
pub mod spool;
pub mod store;

use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::{AsyncMessage, Client, Notification};

/// Notifications buffered between the connection task and the store; past it the store
/// resyncs instead of following one by one.
pub const NOTIFY_QUEUE_MAX: usize = 4096;

/// What went wrong talking to PostgreSQL.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("bad connection string: {0}")]
    Config(tokio_postgres::Error),
    #[error("connecting: {0}")]
    Connect(tokio_postgres::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("migration {version} ({name}): {source}")]
    Migration {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("the database has schema version {found}, newer than this binary knows ({known})")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("the connection closed")]
    Closed,
}

impl PgError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        move |source| PgError::Query { what, source }
    }
}

/// A live connection: the client, and (when asked for) the notifications it receives.
pub struct Conn {
    pub client: Client,
    pub notifications: Option<tokio::sync::mpsc::Receiver<Notification>>,
    /// Set when the queue overflowed: some notifications were lost, resync.
    pub overflowed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    /// Whether the connection has ended (the server went away, or an I/O error).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || self.task.is_finished()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects within `timeout`. With `listen`, notifications are forwarded to
/// `Conn::notifications` (bounded; overflow sets `Conn::overflowed`).
pub async fn connect(url: &str, timeout: Duration, listen: bool) -> Result<Conn, PgError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(PgError::Config)?;
    config.connect_timeout(timeout);
    config.application_name("ringway");
    // A silent network partition would otherwise leave a LISTEN connection waiting for
    // hours: probe after 10 s idle, every 5 s, give up after 3 misses.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    let (client, mut connection) =
        tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| PgError::Timeout(timeout))?
            .map_err(PgError::Connect)?;
    let overflowed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = if listen {
        let (tx, rx) = tokio::sync::mpsc::channel(NOTIFY_QUEUE_MAX);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let over = overflowed.clone();
    // The connection must be polled for anything to happen; this task does it and hands
    // notifications over. It ends when the connection does.
    let task = tokio::spawn(async move {
        loop {
            let msg = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
            match msg {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(tx) = &tx
                        && tx.try_send(n).is_err()
                    {
                        over.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Some(Ok(AsyncMessage::Notice(n))) => {
                    tracing::debug!(notice = %n, "postgres notice")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "postgres connection ended");
                    break;
                }
                None => break,
            }
        }
    });
    Ok(Conn {
        client,
        notifications: rx,
        overflowed,
        task,
    })
}

/// Runs `f` to completion on a throwaway current-thread runtime: for the few database calls
/// made outside the control thread (`ringway migrate`, migrations at start).
pub fn block_on<F: std::future::Future>(f: F) -> std::io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// Capped exponential backoff for reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);

    pub fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST,
            max: max.max(Self::FIRST),
        }
    }

    /// The delay before the next attempt (then doubled, up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// This machine's host name, for `proxy_logs.node`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ringway".into())
}

/// The connection string without its password, for logs.
pub fn redact(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "host={} port={:?} user={} dbname={}",
                hosts.join(","),
                c.get_ports(),
                c.get_user().unwrap_or(""),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "(unparsable)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let d: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn redacts_the_password() {
        let r = redact("postgres://app:secret@db.internal:5433/platform");
        assert!(!r.contains("secret"), "{r}");
        assert!(r.contains("db.internal") && r.contains("platform"), "{r}");
    }
}
