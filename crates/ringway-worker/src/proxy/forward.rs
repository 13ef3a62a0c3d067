//! Phase 4, forward: the load balancer's attempts. Each attempt takes an upstream connection
//! to the chosen endpoint from the worker's pool (peeked: see `pool.rs`) or a new one, sends
//! the head and the body (`stream::pump`), and reads the response head. A failure on a pooled
//! connection before any response byte sends an idempotent, bodyless request once more on a
//! fresh connection to the same endpoint (`upstream.retry_idempotent`: the keep-alive race,
//! not the endpoint's fault). A failure of the endpoint is reported (passive outlier
//! detection) and, when the request can be sent again (the connect failed, so nothing was
//! sent; or an idempotent bodyless request got no response byte), retried on another
//! endpoint, within the route's `retries_max` and retry budget. Nothing is retried once a
//! response byte has arrived. If the upstream stopped reading an upload because it answered
//! early (413, 401), that answer is relayed.

use super::record::Exchange;
use super::{BodyState, Client, Req};
use crate::client::ClientIo;
use crate::error::{ErrorKind, IoFail, ProxyError, Side};
use crate::io::{RecvBuf, Timed};
use crate::pace::Pace;
use crate::route::{self, Again, Failed, Target};
use crate::stream::{self, Decode, Encode, End};
use crate::worker::Worker;
use monoio::net::TcpStream;
use ringway_core::balance::FailKind;
use ringway_core::balance::spec::RETRIES_MAX;
use ringway_core::balance::stats::RouteEvent;
use ringway_proto::head::HeadScanner;
use ringway_proto::{BodyFraming, ChunkedDecoder};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which connection an attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// A pooled one if there is one (the first attempt).
    Pooled,
    /// A new one (the retry after a pooled one failed).
    Fresh,
}

/// What the upstream attempt moved, for the caller's reuse and log decisions.
pub(super) struct Sent<'a> {
    pub body: &'a mut BodyState,
    pub pace: &'a mut Pace,
}

/// How often a request waiting at a connection limit looks for room.
const SATURATED_RECHECK: Duration = Duration::from_millis(1);

/// Endpoints one request was sent to, in order (the first attempt and its retries), by
/// their member ids.
struct Tried {
    addrs: [u64; RETRIES_MAX as usize + 1],
    len: usize,
}

impl Tried {
    fn new(first: u64) -> Self {
        Self {
            addrs: [first; RETRIES_MAX as usize + 1],
            len: 1,
        }
    }

    fn push(&mut self, a: u64) {
        debug_assert!(
            self.len < self.addrs.len(),
            "retries_max is at most RETRIES_MAX"
        );
        if self.len < self.addrs.len() {
            self.addrs[self.len] = a;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[u64] {
        &self.addrs[..self.len]
    }
}

/// Sends the request (head in `out`, body from the client) to the endpoint `target` chose,
/// and to others while attempts fail and may be retried; `target` ends naming the endpoint of
/// the last attempt. `Ok`: the connection the response head (in `ubuf`) is on.
pub(super) async fn run<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    target: &mut Target,
    ex: &mut Exchange,
    bufs: &mut super::Bufs,
    mut sent: Sent<'_>,
) -> Result<Timed<TcpStream>, ProxyError> {
    // Plain values only across the wait below (the exchange future's size counts).
    let Ok((first_id, saturated)) = target.pick.map(|c| (c.id, c.saturated)) else {
        debug_assert!(
            false,
            "prepare answers 503 before forward without an endpoint"
        );
        return Err(ProxyError::upstream(ErrorKind::ConnectRefused));
    };
    if saturated {
        // On success it chose again: the first attempt goes where it says.
        wait_for_room(w, ex, target).await?;
    }
    let mut tried = Tried::new(target.pick.map_or(first_id, |c| c.id));
    let resendable = req.method.is_idempotent() && req.meta.framing == BodyFraming::None;
    loop {
        // Only the address is held across the attempt (the exchange future's size counts).
        let Some(addr) = target.upstream() else {
            return Err(ProxyError::upstream(ErrorKind::ConnectRefused));
        };
        begin_lease(w, ex, target);
        let started = Instant::now();
        let mut on_pooled = false;
        match attempt(w, c, req, target, ex, bufs, addr, &mut sent, &mut on_pooled).await {
            Ok(up) => {
                let done = Instant::now();
                let outcome = route::Outcome {
                    status: status_of(&bufs.ubuf.buf),
                    latency_us: done.duration_since(started).as_micros() as u64,
                    now_ms: w.registry.ms_at(done),
                };
                route::report_response(&w.routes, &ex.host, target, outcome, &w.registry, w.id);
                if let Ok(c) = target.pick
                    && c.set_sticky
                {
                    set_sticky(w, ex, target, c.id, S::TLS);
                }
                return Ok(up);
            }
            Err(e) => {
                end_lease(w, ex, target);
                if e.side != Side::Upstream {
                    return Err(e);
                }
                let connect_failed = matches!(
                    e.kind,
                    ErrorKind::ConnectRefused | ErrorKind::ConnectTimeout
                );
                // A pooled connection that failed before any response byte is the keep-alive
                // race (the upstream closed it as it was reused), not the endpoint's fault.
                let race = on_pooled && e.retry_safe && e.kind != ErrorKind::Timeout;
                let f = Failed {
                    kind: if race { None } else { fail_kind(e.kind) },
                    retry: connect_failed || (e.retry_safe && resendable),
                    tried: tried.as_slice(),
                };
                match route::choose_again(
                    &w.routes,
                    &w.route_stats,
                    &ex.host,
                    target,
                    f,
                    &w.chooser(Instant::now()),
                ) {
                    Again::Retry(next) => {
                        w.stats.upstream_retries.inc();
                        w.route_event(target.stats, RouteEvent::Retry);
                        tried.push(next.id);
                        target.pick = Ok(next);
                        bufs.ubuf.buf.clear();
                        bufs.ubuf.pos = 0;
                    }
                    Again::Stop { refused } => {
                        if refused {
                            w.route_event(target.stats, RouteEvent::RetryRefused);
                        }
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Every usable endpoint is at its connection limit: wait (as one of at most `pending_max`
/// per endpoint and worker) for one to have room, re-choosing every
/// [`SATURATED_RECHECK`], for at most `timeouts.upstream_connect_ms`.
async fn wait_for_room(w: &Worker, ex: &Exchange, target: &mut Target) -> Result<(), ProxyError> {
    let full = || ProxyError::upstream(ErrorKind::Saturated);
    let e = target.endpoint();
    let queued = w.registry.load(w.id, e).map_or(0, |l| l.pending());
    if queued >= target.pending_max {
        w.route_event(target.stats, RouteEvent::Unavailable);
        return Err(full());
    }
    w.registry.pending(w.id, e, 1);
    let deadline = Instant::now() + w.settings.upstream_connect;
    let got = loop {
        monoio::time::sleep(SATURATED_RECHECK).await;
        match route::choose_fresh(&w.routes, &ex.host, target, &w.chooser(Instant::now())) {
            Some(c) if !c.saturated => break Some(c),
            _ if Instant::now() >= deadline => break None,
            _ => {}
        }
    };
    w.registry.pending(w.id, e, -1);
    let Some(c) = got else {
        w.route_event(target.stats, RouteEvent::Unavailable);
        return Err(full());
    };
    target.pick = Ok(c);
    Ok(())
}

/// The request is in flight to `target`'s endpoint (counted until the exchange ends).
fn begin_lease(w: &Worker, ex: &mut Exchange, target: &Target) {
    debug_assert!(ex.lease.is_none(), "one attempt at a time");
    let e = target.endpoint();
    w.registry.begin(w.id, e);
    w.route_event(target.stats, RouteEvent::Begin);
    ex.lease = Some(e);
}

/// The attempt on the leased endpoint is over.
pub(super) fn end_lease(w: &Worker, ex: &mut Exchange, target: &Target) {
    if let Some(e) = ex.lease.take() {
        w.registry.end(w.id, e);
        w.route_event(target.stats, RouteEvent::End);
    }
}

/// What a failed attempt says about the endpoint; None: not its fault.
fn fail_kind(k: ErrorKind) -> Option<FailKind> {
    Some(match k {
        ErrorKind::ConnectRefused => FailKind::ConnectRefused,
        ErrorKind::ConnectTimeout => FailKind::ConnectTimeout,
        ErrorKind::Timeout => FailKind::Timeout,
        ErrorKind::Closed | ErrorKind::Io => FailKind::Reset,
        ErrorKind::Protocol | ErrorKind::InterimLimit => FailKind::Protocol,
        ErrorKind::BodyTooLarge | ErrorKind::TooSlow | ErrorKind::Saturated => return None,
    })
}

/// The status code of the response head at the front of `buf` (0 if unreadable: the respond
/// phase refuses such a head).
fn status_of(buf: &[u8]) -> u16 {
    buf.get(9..12)
        .filter(|d| d.iter().all(u8::is_ascii_digit))
        .map_or(0, |d| {
            d.iter().fold(0u16, |n, b| n * 10 + u16::from(b - b'0'))
        })
}

/// The response will set the route's sticky cookie to endpoint `id`.
fn set_sticky(w: &Worker, ex: &mut Exchange, target: &Target, id: u64, tls: bool) {
    let mut v = Vec::with_capacity(96);
    if route::sticky_cookie(&w.routes, &ex.host, target, id, tls, &mut v) {
        ex.ids.push_set_cookie(&v);
    }
}

/// One attempt on `addr`: pooled (or fresh) connection, head and body sent, response head
/// read.
#[allow(clippy::too_many_arguments)]
async fn attempt<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    target: &Target,
    ex: &mut Exchange,
    bufs: &mut super::Bufs,
    addr: SocketAddr,
    sent: &mut Sent<'_>,
    on_pooled: &mut bool,
) -> Result<Timed<TcpStream>, ProxyError> {
    let super::Bufs { out, ubuf } = bufs;
    let has_body = req.meta.framing != BodyFraming::None;
    let retryable = w.settings.retry_idempotent && req.method.is_idempotent() && !has_body;
    let wait = match target.per_try_ms {
        0 => w.settings.upstream_read,
        ms => w
            .settings
            .upstream_read
            .min(Duration::from_millis(u64::from(ms))),
    };
    let mut kind = Attempt::Pooled;
    loop {
        ex.contacted = true;
        let (mut up, reused) = connect(w, addr, kind).await?;
        *on_pooled = reused;
        let r = if has_body {
            send_body(w, c, req, target, ex, out, &mut up, sent.pace, sent.body).await
        } else {
            // The head stays in `out`: a retry sends it again.
            let len = out.len();
            let (r, b) = up
                .write_range(std::mem::take(out), 0, len, w.settings.upstream_write)
                .await;
            *out = b;
            // Nothing can have been answered yet: an idempotent request may go elsewhere (a
            // connection the upstream accepted and then reset as it died, say).
            r.map_err(|e| e.on(Side::Upstream).retry_safe(true))
        };
        let may_retry = reused && retryable && kind == Attempt::Pooled;
        match r {
            Ok(()) => {}
            Err(e) if e.side == Side::Upstream && may_retry => {
                w.stats.upstream_retries.inc();
                kind = Attempt::Fresh;
                continue;
            }
            Err(e) if e.side == Side::Upstream && has_body && e.kind != ErrorKind::BodyTooLarge => {
                // The upstream stopped reading the body. It may have answered early (413,
                // 401): relay that answer if it is already there.
                return match read_response_head(w, &mut up, ubuf, None, wait).await {
                    Ok(()) => Ok(up),
                    Err(_) => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        match read_response_head(w, &mut up, ubuf, None, wait).await {
            Ok(()) => return Ok(up),
            Err(e) if e.retry_safe && may_retry => {
                w.stats.upstream_retries.inc();
                kind = Attempt::Fresh;
                ubuf.buf.clear();
                ubuf.pos = 0;
            }
            // No response byte within the wait: an idempotent request may go to another
            // endpoint (never again to this one: that would double the wait).
            Err(e) if e.kind == ErrorKind::Timeout && ubuf.buf.is_empty() => {
                return Err(e.retry_safe(true));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Streams the head in `out` and the request body to `up`.
#[allow(clippy::too_many_arguments)]
async fn send_body<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    target: &Target,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
    up: &mut Timed<TcpStream>,
    pace: &mut Pace,
    body: &mut BodyState,
) -> Result<(), ProxyError> {
    let unread_before = c.rb.unread().len() as u64;
    let (decode, encode) = match req.meta.framing {
        BodyFraming::Length(n) => (Decode::Length(n), Encode::Raw),
        _ => (Decode::Chunked(ChunkedDecoder::new()), Encode::Chunked),
    };
    let (r, n) = stream::pump(
        End::new(&mut c.io, Side::Client, w.settings.body_read).paced(pace),
        &mut c.rb,
        End::new(up, Side::Upstream, w.settings.upstream_write),
        out,
        decode,
        encode,
        Some(target.body_bytes_max),
        &w.bufs,
    )
    .await;
    // Raw bytes of this request's body: what was buffered, plus what was read, minus what is
    // left over for the next request.
    ex.bytes_in += (unread_before + n.read).saturating_sub(c.rb.unread().len() as u64);
    *body = if r.is_ok() {
        BodyState::Complete
    } else {
        BodyState::Partial
    };
    r
}

/// A pooled connection to `addr` (for the first attempt) or a new one; whether it was pooled.
async fn connect(
    w: &Worker,
    addr: SocketAddr,
    attempt: Attempt,
) -> Result<(Timed<TcpStream>, bool), ProxyError> {
    if attempt == Attempt::Pooled {
        let got = w.pool.borrow_mut().checkout(addr, Instant::now());
        w.stats.upstream_stale.add(got.stale);
        w.stats.upstream_stray_bytes.add(got.dirty);
        if let Some(s) = got.stream {
            w.stats.upstream_reuses.inc();
            return Ok((s, true));
        }
    }
    w.stats.upstream_connects.inc();
    match monoio::time::timeout(w.settings.upstream_connect, TcpStream::connect_addr(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok((Timed::new(s, w.deadlines.clone()), false))
        }
        Ok(Err(_)) => {
            w.stats.upstream_connect_errors.inc();
            Err(ProxyError::upstream(ErrorKind::ConnectRefused))
        }
        Err(_) => {
            w.stats.upstream_connect_errors.inc();
            Err(ProxyError::upstream(ErrorKind::ConnectTimeout))
        }
    }
}

/// Reads until `ubuf` holds a complete response head (at its front), waiting at most `wait`
/// for each read. Failures before any byte are marked retry-safe. `until`: after an interim response, when the final head is due at
/// the latest (past it: `InterimLimit`).
pub(super) async fn read_response_head(
    w: &Worker,
    up: &mut Timed<TcpStream>,
    ubuf: &mut RecvBuf,
    until: Option<Instant>,
    wait: Duration,
) -> Result<(), ProxyError> {
    let mut scanner = HeadScanner::new();
    loop {
        match scanner.scan(&ubuf.buf, &w.settings.head) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(_) => return Err(ProxyError::upstream(ErrorKind::Protocol)),
        }
        let nothing_yet = ubuf.buf.is_empty();
        let mut wait = wait;
        let mut interim_bound = false;
        if let Some(u) = until {
            let left = u.saturating_duration_since(Instant::now());
            if left < wait {
                wait = left;
                interim_bound = true;
            }
        }
        match up.fill(ubuf, 1024, wait).await {
            Ok(_) => {}
            Err(IoFail::Timeout) if interim_bound => {
                return Err(ProxyError::upstream(ErrorKind::InterimLimit));
            }
            Err(IoFail::Timeout) => return Err(ProxyError::upstream(ErrorKind::Timeout)),
            Err(IoFail::Closed) if !nothing_yet => {
                return Err(ProxyError::upstream(ErrorKind::Protocol));
            }
            Err(e) => return Err(e.on(Side::Upstream).retry_safe(nothing_yet)),
        }
    }
}
