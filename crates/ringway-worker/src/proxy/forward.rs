//! Phase 4, forward: an upstream connection from the worker's pool (peeked: see `pool.rs`) or
//! a new one, the head and the body sent (`stream::pump`), and the response head read. A
//! failure on a pooled connection before any response byte sends an idempotent, bodyless
//! request once more on a fresh connection (`upstream.retry_idempotent`). If the upstream
//! stopped reading an upload because it answered early (413, 401), that answer is relayed.

use super::record::Exchange;
use super::{BodyState, Client, Req};
use crate::client::ClientIo;
use crate::error::{ErrorKind, IoFail, ProxyError, Side};
use crate::io::{RecvBuf, Timed};
use crate::pace::Pace;
use crate::route::Target;
use crate::stream::{self, Decode, Encode, End};
use crate::worker::Worker;
use monoio::net::TcpStream;
use ringway_proto::head::HeadScanner;
use ringway_proto::{BodyFraming, ChunkedDecoder};
use std::net::SocketAddr;
use std::time::Instant;

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

/// Sends the request (head in `out`, body from the client) and reads the response head into
/// `ubuf`. `Ok`: the connection the response is on.
pub(super) async fn run<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    target: &Target,
    ex: &mut Exchange,
    bufs: &mut super::Bufs,
    sent: Sent<'_>,
) -> Result<Timed<TcpStream>, ProxyError> {
    let super::Bufs { out, ubuf } = bufs;
    let has_body = req.meta.framing != BodyFraming::None;
    let retryable = w.settings.retry_idempotent && req.method.is_idempotent() && !has_body;
    let mut attempt = Attempt::Pooled;
    loop {
        ex.contacted = true;
        let (mut up, reused) = connect(w, target.upstream, attempt).await?;
        let r = if has_body {
            send_body(w, c, req, target, ex, out, &mut up, sent.pace, sent.body).await
        } else {
            // The head stays in `out`: a retry sends it again.
            let len = out.len();
            let (r, b) = up
                .write_range(std::mem::take(out), 0, len, w.settings.upstream_write)
                .await;
            *out = b;
            r.map_err(|e| e.on(Side::Upstream))
        };
        let may_retry = reused && retryable && attempt == Attempt::Pooled;
        match r {
            Ok(()) => {}
            Err(e) if e.side == Side::Upstream && may_retry => {
                w.stats.upstream_retries.inc();
                attempt = Attempt::Fresh;
                continue;
            }
            Err(e) if e.side == Side::Upstream && has_body && e.kind != ErrorKind::BodyTooLarge => {
                // The upstream stopped reading the body. It may have answered early (413,
                // 401): relay that answer if it is already there.
                return match read_response_head(w, &mut up, ubuf, None).await {
                    Ok(()) => Ok(up),
                    Err(_) => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        match read_response_head(w, &mut up, ubuf, None).await {
            Ok(()) => return Ok(up),
            Err(e) if e.retry_safe && may_retry => {
                w.stats.upstream_retries.inc();
                attempt = Attempt::Fresh;
                ubuf.buf.clear();
                ubuf.pos = 0;
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

/// Reads until `ubuf` holds a complete response head (at its front). Failures before any byte
/// are marked retry-safe. `until`: after an interim response, when the final head is due at
/// the latest (past it: `InterimLimit`).
pub(super) async fn read_response_head(
    w: &Worker,
    up: &mut Timed<TcpStream>,
    ubuf: &mut RecvBuf,
    until: Option<Instant>,
) -> Result<(), ProxyError> {
    let mut scanner = HeadScanner::new();
    loop {
        match scanner.scan(&ubuf.buf, &w.settings.head) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(_) => return Err(ProxyError::upstream(ErrorKind::Protocol)),
        }
        let nothing_yet = ubuf.buf.is_empty();
        let mut wait = w.settings.upstream_read;
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
