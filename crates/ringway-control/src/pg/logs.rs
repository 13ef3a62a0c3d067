//! Request log rows into `proxy_logs`: batches built from the ring drains, written with
//! binary COPY by one task, spooled to disk when the database cannot take them, replayed in
//! order when it can.
//!
//! ```text
//! rings ──drain (every drain interval)──► BatchBuilder ──(full or flush interval)──► queue
//!   queue (LOG_BATCHES_QUEUED_MAX) ──► writer: spool empty and connected? COPY : spool
//!   queue full ──► spool directly (the drain never waits for the database)
//!   writer, when connected: spool oldest first, then the queue
//! ```
//!
//! The writer takes everything queued at once (one transaction), and what is queued rides
//! along with each replay transaction: the queue then has room for the rows arriving during
//! a write, so that a replay under steady traffic ends, instead of everything that arrives
//! while it writes going to the spool behind it, for ever. A replay transaction that fails
//! (a timeout, say) is retried with half as many batches, so that one too big to be written
//! within `write_timeout` is not retried as it is for ever.
//!
//! Exactly once: a batch carries an id, and the transaction that copies its rows first
//! inserts the id into `ringway_log_batches`; a batch whose commit outcome was unknown (the
//! connection broke) is retried from the spool and skipped if the id is already there.
//! Records are dropped only when a ring is full (counted by the worker), or here, by reason
//! (`DropReason`): the spool is full or its write fails, the database refuses a batch again
//! and again, or damage on disk destroys spooled rows.

use super::copy::{self, COLUMNS, HEADER, TRAILER};
use super::spool::{Batch, Spool, SpoolError};
use super::{Backoff, Conn, PgError, connect};
use crate::metrics::{ControlStats, DropReason};
use futures_util::SinkExt;
use ringway_core::LogEntry;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Batches waiting for the writer; past it the drain spools them itself.
pub const LOG_BATCHES_QUEUED_MAX: usize = 8;
/// Spooled batches replayed in one transaction, and their bytes: replay must outrun the
/// rows still arriving after an outage.
pub const REPLAY_BATCHES_MAX: usize = 64;
pub const REPLAY_BYTES_MAX: usize = 32 << 20;
/// A spooled batch the database refuses (an SQL error, not a lost connection) this many
/// times in a row, alone in its transaction, is dropped and counted: one bad batch must not
/// hold up everything behind it until the quota fills.
pub const REFUSALS_MAX: u32 = 3;
/// Written batch ids are kept this long (a spooled batch older than that could be written
/// twice if its first write's outcome was unknown).
const BATCH_IDS_KEPT: &str = "7 days";
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Settings of the log sink.
#[derive(Debug, Clone)]
pub struct LogSinkConfig {
    pub url: String,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub batch_rows_max: usize,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_bytes_max: u64,
    pub shutdown_flush: Duration,
    pub backoff_max: Duration,
    pub node: String,
}

/// Builds batches from drained records (on the control thread, no await).
#[derive(Debug)]
pub struct BatchBuilder {
    node: Vec<u8>,
    prefix: String,
    seq: u64,
    rows_max: usize,
    flush_interval: Duration,
    current: Option<(Batch, Instant)>,
}

impl BatchBuilder {
    pub fn new(cfg: &LogSinkConfig) -> Self {
        // Unique across nodes and restarts: node name, start time, sequence.
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        Self {
            node: cfg.node.as_bytes().to_vec(),
            prefix: format!("{}-{start_us}-{}", cfg.node, std::process::id()),
            seq: 0,
            rows_max: cfg.batch_rows_max,
            flush_interval: cfg.flush_interval,
            current: None,
        }
    }

    /// Adds a record; returns a batch when this one filled it.
    pub fn push(&mut self, e: &LogEntry<'_>) -> Option<Batch> {
        let (b, _) = self.current.get_or_insert_with(|| {
            self.seq += 1;
            (
                Batch {
                    id: format!("{}-{}", self.prefix, self.seq),
                    rows: 0,
                    data: Vec::with_capacity(64 * 1024),
                },
                Instant::now(),
            )
        });
        copy::encode_row(e, &self.node, &mut b.data);
        b.rows += 1;
        if b.rows as usize >= self.rows_max {
            return self.take();
        }
        None
    }

    /// The batch in progress, if its first row is older than the flush interval.
    pub fn take_if_due(&mut self) -> Option<Batch> {
        match &self.current {
            Some((_, started)) if started.elapsed() >= self.flush_interval => self.take(),
            _ => None,
        }
    }

    /// The batch in progress, whatever its age.
    pub fn take(&mut self) -> Option<Batch> {
        self.current.take().map(|(b, _)| b)
    }
}

/// The sink's two ends: the drain side (sync) and the writer task.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: tokio::sync::mpsc::Sender<Batch>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<ControlStats>,
}

impl LogSink {
    /// Hands a batch to the writer, or spools it when the writer is behind.
    pub fn submit(&self, b: Batch) {
        match self.tx.try_send(b) {
            Ok(()) => {}
            Err(
                tokio::sync::mpsc::error::TrySendError::Full(b)
                | tokio::sync::mpsc::error::TrySendError::Closed(b),
            ) => {
                spool_batch(&self.spool, &b, &self.stats);
            }
        }
    }

    /// Hands over the last batch at shutdown, waiting for room.
    pub async fn submit_wait(&self, b: Batch) {
        if let Err(e) = self.tx.send(b).await {
            spool_batch(&self.spool, &e.0, &self.stats);
        }
    }
}

fn spool_batch(spool: &Mutex<Spool>, b: &Batch, stats: &ControlStats) {
    let Ok(mut s) = spool.lock() else { return };
    match s.append(b) {
        Ok(()) => {
            stats
                .log_rows_spooled
                .fetch_add(u64::from(b.rows), Ordering::Relaxed);
        }
        Err(e) => {
            let reason = match e {
                SpoolError::Full { .. } => {
                    tracing::error!(rows = b.rows, error = %e, "log rows dropped: database unavailable and spool full");
                    DropReason::SpoolFull
                }
                SpoolError::Io { .. } => {
                    tracing::error!(rows = b.rows, error = %e, "log rows dropped: spool write failed");
                    DropReason::SpoolWriteFailed
                }
            };
            stats.log_rows_dropped.add(reason, u64::from(b.rows));
        }
    }
    publish(&s, stats);
}

/// Publishes the spool's state: after every operation on it, so that its gauges and damage
/// counts are true at all times, not only after a replay.
fn publish(s: &Spool, stats: &ControlStats) {
    stats.log_spool_bytes.store(s.bytes(), Ordering::Relaxed);
    stats
        .log_spool_corrupt_frames
        .store(s.corrupt_frames(), Ordering::Relaxed);
    stats
        .log_rows_dropped
        .store(DropReason::SpoolCorrupt, s.rows_lost());
}

/// Opens the spool and starts the writer task; returns the drain side and the task.
/// Starts the writer task over a spool the caller opened (at start-up, so an unusable spool
/// directory stops Ringway instead of silently losing rows).
pub fn start(
    cfg: LogSinkConfig,
    spool: Spool,
    stats: Arc<ControlStats>,
) -> (LogSink, tokio::task::JoinHandle<()>) {
    if !spool.is_empty() {
        tracing::info!(bytes = spool.bytes(), dir = %cfg.spool_dir.display(), "log spool from an earlier run: replaying when the database is reachable");
    }
    // Damage found when the spool was opened shows from the start.
    publish(&spool, &stats);
    let spool = Arc::new(Mutex::new(spool));
    let (tx, rx) = tokio::sync::mpsc::channel(LOG_BATCHES_QUEUED_MAX);
    let writer = Writer {
        backoff: Backoff::new(cfg.backoff_max),
        cfg,
        conn: None,
        retry_at: Instant::now(),
        spool: spool.clone(),
        stats: stats.clone(),
        next_prune: Instant::now(),
        replay_width: REPLAY_BATCHES_MAX,
        refusals: 0,
    };
    let task = tokio::spawn(writer.run(rx));
    (LogSink { tx, spool, stats }, task)
}

struct Writer {
    cfg: LogSinkConfig,
    conn: Option<Conn>,
    backoff: Backoff,
    /// No connection attempt before this (backoff).
    retry_at: Instant,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<ControlStats>,
    next_prune: Instant,
    /// Batches per replay transaction: halved by a failed one, doubled by a written one,
    /// 1 while isolating a batch the database refuses.
    replay_width: usize,
    /// Consecutive refusals of the batch at the head of the spool.
    refusals: u32,
}

/// How a write ended.
enum Outcome {
    Written,
    /// The connection failed or timed out: retry later.
    Failed,
    /// The database answered with an error: retrying the same rows may never work.
    Refused,
}

impl Writer {
    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Batch>) {
        loop {
            // The spool first, oldest first. (Rows land roughly in the order they were made:
            // when the queue is full the drain spools its newest batch ahead of the queued
            // ones. proxy_logs is read by `ts`, not by insertion order.)
            if self.replay_one(&mut rx).await {
                continue;
            }
            if let Ok(mut s) = self.spool.lock() {
                if let Err(e) = s.tick() {
                    tracing::error!(error = %e, "log spool sync failed");
                }
                publish(&s, &self.stats);
            }
            let wait = if self.spool_empty() {
                super::spool::SYNC_INTERVAL
            } else {
                self.retry_at
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(50), super::spool::SYNC_INTERVAL)
            };
            let b = tokio::select! {
                b = rx.recv() => b,
                _ = tokio::time::sleep(wait) => continue,
            };
            let Some(b) = b else { break };
            // Everything queued goes at once: one transaction keeps up with rows arriving
            // faster than one per transaction would.
            let mut batches = vec![b];
            take_queued(&mut rx, &mut batches, REPLAY_BATCHES_MAX);
            if self.spool_empty() && self.connected().await {
                if !matches!(self.write(&batches, 0).await, Outcome::Written) {
                    self.spool_all(&batches);
                }
            } else {
                self.spool_all(&batches);
            }
            self.prune().await;
        }
        // Shutdown: every queued batch is written or spooled; try the spool within the
        // budget, and leave the rest on disk for the next start.
        let end = Instant::now() + self.cfg.shutdown_flush;
        while !self.spool_empty() && Instant::now() < end {
            if !self.replay_one(&mut rx).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let left = self.spool.lock().map(|s| s.bytes()).unwrap_or(0);
        if left > 0 {
            tracing::warn!(bytes = left, dir = %self.cfg.spool_dir.display(), "log spool not empty at shutdown: replayed at the next start");
        }
    }

    fn spool_empty(&self) -> bool {
        self.spool.lock().map(|s| s.is_empty()).unwrap_or(true)
    }

    fn spool_all(&self, batches: &[Batch]) {
        for b in batches {
            spool_batch(&self.spool, b, &self.stats);
        }
    }

    /// Writes the oldest spooled batches if connected, with what is queued behind them;
    /// true if they were written (or dropped as refused).
    async fn replay_one(&mut self, rx: &mut tokio::sync::mpsc::Receiver<Batch>) -> bool {
        if self.spool_empty() || !self.connected().await {
            return false;
        }
        let next = match self.spool.lock() {
            Ok(mut s) => {
                let next = s.peek_many(self.replay_width, REPLAY_BYTES_MAX);
                // Reading may have found (and skipped) damage.
                publish(&s, &self.stats);
                next
            }
            Err(_) => return false,
        };
        let mut batches = match next {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => return false,
            Err(e) => {
                tracing::error!(error = %e, "reading the log spool failed");
                return false;
            }
        };
        let spooled = batches.len();
        if self.replay_width > 1 {
            // The queue rides along (not while isolating a refused batch): it has room again
            // for what arrives during this write, which then need not be spooled.
            take_queued(rx, &mut batches, self.replay_width);
        }
        let outcome = self.write(&batches, spooled).await;
        if !matches!(outcome, Outcome::Written) {
            // Taken from the queue, never spooled: behind the spool now.
            self.spool_all(&batches[spooled..]);
        }
        match outcome {
            Outcome::Written => {
                self.replay_width = (self.replay_width * 2).min(REPLAY_BATCHES_MAX);
                self.refusals = 0;
            }
            Outcome::Failed => {
                // Too much to write within write_timeout, maybe: the same batches as they
                // were could time out for ever.
                self.replay_width = (batches.len() / 2).max(1);
                return false;
            }
            Outcome::Refused if batches.len() > 1 => {
                // Find the batch at fault: one at a time from here.
                self.replay_width = 1;
                return false;
            }
            Outcome::Refused => {
                self.refusals += 1;
                if self.refusals < REFUSALS_MAX {
                    return false;
                }
                let rows: u64 = batches.iter().map(|b| u64::from(b.rows)).sum();
                tracing::error!(batch = %batches[0].id, rows, "log batch refused by the database {REFUSALS_MAX} times: dropped");
                ControlStats::inc(&self.stats.log_batches_refused);
                self.stats.log_rows_dropped.add(DropReason::Refused, rows);
                self.refusals = 0;
            }
        }
        if let Ok(mut s) = self.spool.lock() {
            if let Err(e) = s.consume() {
                tracing::error!(error = %e, "log spool: cannot remove a replayed segment");
            }
            publish(&s, &self.stats);
        }
        true
    }

    /// Whether a connection is up, connecting if the backoff allows.
    async fn connected(&mut self) -> bool {
        if self.conn.as_ref().is_some_and(|c| !c.is_closed()) {
            return true;
        }
        if self.conn.take().is_some() {
            ControlStats::inc(&self.stats.db_errors);
        }
        if Instant::now() < self.retry_at {
            return false;
        }
        match connect(&self.cfg.url, self.cfg.connect_timeout, false).await {
            Ok(c) => {
                self.conn = Some(c);
                self.backoff.reset();
                tracing::info!("log sink connected");
                true
            }
            Err(e) => {
                ControlStats::inc(&self.stats.db_errors);
                let d = self.backoff.next_delay();
                self.retry_at = Instant::now() + d;
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "log sink: database unreachable; spooling");
                false
            }
        }
    }

    /// Batches in one transaction, the first `spooled` of them replayed from the spool; on
    /// failure the connection is dropped.
    async fn write(&mut self, batches: &[Batch], spooled: usize) -> Outcome {
        let Some(conn) = self.conn.as_mut() else {
            return Outcome::Failed;
        };
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            self.cfg.write_timeout,
            write_batches(&mut conn.client, batches, spooled),
        )
        .await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(self.cfg.write_timeout)),
        };
        match r {
            Ok(w) => {
                self.stats
                    .log_batch_write
                    .observe_us(started.elapsed().as_micros() as u64);
                self.stats
                    .log_batches_written
                    .fetch_add(w.batches, Ordering::Relaxed);
                self.stats
                    .log_batches_duplicate
                    .fetch_add(w.duplicates, Ordering::Relaxed);
                self.stats
                    .log_rows_written
                    .fetch_add(w.rows, Ordering::Relaxed);
                self.stats
                    .log_rows_replayed
                    .fetch_add(w.replayed_rows, Ordering::Relaxed);
                Outcome::Written
            }
            Err(e) => {
                ControlStats::inc(&self.stats.log_batches_failed);
                ControlStats::inc(&self.stats.db_errors);
                let rows: u64 = batches.iter().map(|b| u64::from(b.rows)).sum();
                let refused =
                    matches!(&e, PgError::Query { source, .. } if source.code().is_some());
                tracing::warn!(error = %e, rows, refused, "log batch write failed; spooling");
                self.conn = None;
                self.retry_at = Instant::now() + self.backoff.next_delay();
                if refused {
                    Outcome::Refused
                } else {
                    Outcome::Failed
                }
            }
        }
    }

    async fn prune(&mut self) {
        if Instant::now() < self.next_prune {
            return;
        }
        self.next_prune = Instant::now() + PRUNE_EVERY;
        if let Some(c) = &self.conn {
            let sql = format!(
                "DELETE FROM ringway_log_batches WHERE written_at < now() - interval '{BATCH_IDS_KEPT}'"
            );
            if let Err(e) = c.client.execute(sql.as_str(), &[]).await {
                tracing::warn!(error = %e, "pruning ringway_log_batches failed");
            }
        }
    }
}

/// Moves queued batches onto `batches`, up to `max` batches in all, or until they hold
/// `REPLAY_BYTES_MAX` bytes of rows.
fn take_queued(rx: &mut tokio::sync::mpsc::Receiver<Batch>, batches: &mut Vec<Batch>, max: usize) {
    let mut bytes: usize = batches.iter().map(|b| b.data.len()).sum();
    while batches.len() < max && bytes < REPLAY_BYTES_MAX {
        let Ok(b) = rx.try_recv() else { break };
        bytes += b.data.len();
        batches.push(b);
    }
}

/// What one transaction wrote.
struct Written {
    batches: u64,
    duplicates: u64,
    rows: u64,
    /// Rows of those batches that came from the spool.
    replayed_rows: u64,
}

/// The transaction: claim the batch ids, copy the rows of those that were new, commit.
/// Batches whose id was already there (an earlier attempt landed) are skipped. The first
/// `spooled` batches are replays.
async fn write_batches(
    client: &mut tokio_postgres::Client,
    batches: &[Batch],
    spooled: usize,
) -> Result<Written, PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(PgError::query("begin"))?;
    let ids: Vec<&str> = batches.iter().map(|b| b.id.as_str()).collect();
    let rows: Vec<i32> = batches.iter().map(|b| b.rows as i32).collect();
    let claimed = tx
        .query(
            "INSERT INTO ringway_log_batches (batch_id, rows) SELECT * FROM unnest($1::text[], $2::int4[]) \
             ON CONFLICT DO NOTHING RETURNING batch_id",
            &[&ids, &rows],
        )
        .await
        .map_err(PgError::query("claiming batch ids"))?;
    let claimed: std::collections::HashSet<String> = claimed.iter().map(|r| r.get(0)).collect();
    let is_new = |b: &&Batch| claimed.contains(&b.id);
    let new: Vec<&Batch> = batches.iter().filter(is_new).collect();
    let written = Written {
        batches: new.len() as u64,
        duplicates: (batches.len() - new.len()) as u64,
        rows: new.iter().map(|b| u64::from(b.rows)).sum(),
        replayed_rows: batches[..spooled]
            .iter()
            .filter(is_new)
            .map(|b| u64::from(b.rows))
            .sum(),
    };
    if new.is_empty() {
        tx.rollback().await.map_err(PgError::query("rollback"))?;
        return Ok(written);
    }
    let sink = tx
        .copy_in(&format!(
            "COPY proxy_logs ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(PgError::query("COPY"))?;
    futures_util::pin_mut!(sink);
    let len: usize = new.iter().map(|b| b.data.len()).sum();
    let mut data = bytes::BytesMut::with_capacity(HEADER.len() + len + TRAILER.len());
    data.extend_from_slice(HEADER);
    for b in &new {
        data.extend_from_slice(&b.data);
    }
    data.extend_from_slice(TRAILER);
    sink.send(data.freeze())
        .await
        .map_err(PgError::query("COPY data"))?;
    sink.finish().await.map_err(PgError::query("COPY end"))?;
    tx.commit().await.map_err(PgError::query("commit"))?;
    Ok(written)
}
