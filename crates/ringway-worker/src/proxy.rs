//! One exchange: a request from the client and the response to it, phase by phase.
//!
//! 1. **head**: read until the end of the request head (header timeout, size limits).
//! 2. **prepare**: parse strictly, identify the client and request id, route by host, check
//!    the body limit, and write the upstream head. Nothing here waits.
//! 3. **continue**: answer `Expect: 100-continue` once the request is known to be acceptable.
//! 4. **forward**: take a pooled upstream connection (or connect), send the head and stream
//!    the body. A failure on a reused connection before any response byte retries an
//!    idempotent, bodyless request once on a fresh connection.
//! 5. **response head**: read and validate it; relay interim 1xx; choose the client framing.
//! 6. **respond**: write the rewritten head and stream the body (or switch to a tunnel on 101).
//! 7. **finish**: return the upstream connection to the pool if it is clean, count, log.
//!
//! Any answer the proxy writes itself (an error) either follows a fully read request body or
//! closes the connection, so the next bytes on the connection are never a body misread as a
//! request.

use crate::access::{self, REQUEST_ID_BYTES_MAX};
use crate::client::ClientIo;
use crate::error::{ErrorKind, IoFail, ProxyError, Side, write_error_page};
use crate::headers::{self, ClientFraming, Forwarding, ResponseEdit};
use crate::io::{RecvBuf, Timed};
use crate::pace::Pace;
use crate::route::{self, HostName, Target};
use crate::stream::{self, Decode, Encode, End};
use crate::worker::Worker;
use monoio::net::TcpStream;
use ringway_core::LogEntry;
use ringway_core::route::Hsts;
use ringway_proto::head::HeadScanner;
use ringway_proto::{
    BodyFraming, ChunkedDecoder, HEADER_SLOTS, HeadError, Method, RequestMeta, ResponseFraming,
    Version, parse_request, parse_response,
};
use std::net::{IpAddr, SocketAddr};
use std::time::{Instant, SystemTime};

/// A client connection as the exchange sees it.
#[derive(Debug)]
pub struct Client<S> {
    pub io: Timed<S>,
    pub peer: SocketAddr,
    /// The peer is a trusted proxy (its forwarding headers are believed).
    pub trusted: bool,
    /// The key this connection counts under in the per-client connection limit.
    pub counted: Option<crate::worker::ClientKey>,
    /// Bytes received and not yet consumed; the current head stays at the front until the
    /// exchange ends (the log record points into it).
    pub rb: RecvBuf,
}

/// What the connection does after an exchange.
#[derive(Debug)]
pub enum Next {
    KeepAlive,
    Close,
    /// Close after an error answer, draining what the client still sends first: closing a
    /// socket with unread bytes sends a reset, which can destroy the answer before the client
    /// reads it (an upload refused with 413, say).
    Linger,
    /// The upstream switched protocols: relay bytes both ways.
    Upgrade(Box<Upgraded>),
}

/// State handed to the connection for a tunnel, logged when the tunnel ends.
#[derive(Debug)]
pub struct Upgraded {
    pub upstream: TcpStream,
    pub ex: Exchange,
}

type Span = (usize, usize);

/// The span of a path that is not in the head: `/` for an absolute-form target without one.
const SLASH_PATH: Span = (usize::MAX, 0);

/// What the log record and error pages need, gathered as the exchange proceeds. Strings point
/// into the client receive buffer (the request head) instead of being copied.
#[derive(Debug)]
pub struct Exchange {
    start: Instant,
    start_unix_us: u64,
    rid: [u8; REQUEST_ID_BYTES_MAX],
    rid_len: usize,
    method: Span,
    path: Span,
    user_agent: Span,
    host: HostName,
    client_ip: IpAddr,
    json: bool,
    head_request: bool,
    target: Option<Target>,
    /// An upstream was contacted (the log names it only then: a redirect or a refused body
    /// has a route but no upstream).
    contacted: bool,
    /// Visitor and session ids, and the cookies that keep them (policy phase).
    pub ids: crate::policy::Ids,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reason: &'static str,
}

fn span_of(base: &[u8], part: &[u8]) -> Span {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    if start <= base.len() && start + part.len() <= base.len() {
        (start, part.len())
    } else {
        (0, 0)
    }
}

fn slice(buf: &[u8], s: Span) -> &[u8] {
    buf.get(s.0..s.0 + s.1).unwrap_or(b"")
}

impl Exchange {
    fn new(w: &Worker, peer: IpAddr) -> Self {
        let start_unix_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut rid = [0u8; REQUEST_ID_BYTES_MAX];
        let gen_id = w.ids.borrow_mut().next_id();
        rid[..gen_id.len()].copy_from_slice(&gen_id);
        Self {
            start: Instant::now(),
            start_unix_us,
            rid,
            rid_len: gen_id.len(),
            method: (0, 0),
            path: (0, 0),
            user_agent: (0, 0),
            host: HostName::empty(),
            client_ip: ringway_core::cidr::canonical(peer),
            json: false,
            head_request: false,
            target: None,
            contacted: false,
            ids: crate::policy::Ids::default(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            reason: "",
        }
    }

    pub fn request_id(&self) -> &[u8] {
        &self.rid[..self.rid_len]
    }

    /// Counts the exchange and pushes its log record. `head` is the client receive buffer.
    pub fn finish(&self, w: &Worker, head: &[u8]) {
        let duration_us = self.start.elapsed().as_micros() as u64;
        w.stats.record_request(self.status, duration_us);
        w.stats.bytes_in.add(self.bytes_in);
        w.stats.bytes_out.add(self.bytes_out);
        w.log(&LogEntry {
            time_unix_us: self.start_unix_us,
            duration_us,
            request_id: self.request_id(),
            host: self.host.as_bytes(),
            method: slice(head, self.method),
            path: if self.path == SLASH_PATH {
                b"/"
            } else {
                slice(head, self.path)
            },
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            upstream: self.target.filter(|_| self.contacted).map(|t| t.upstream),
            client_ip: self.client_ip,
            user_agent: slice(head, self.user_agent),
            route: self.target.map(|t| t.ids),
            worker: w.id as u16,
            reason: self.reason.as_bytes(),
            visitor_id: self.ids.visitor(),
            session_id: self.ids.session(),
        });
    }
}

/// Request facts that outlive the parse (plain values, no borrows).
#[derive(Debug, Clone, Copy)]
struct Req {
    method: Method,
    version: Version,
    meta: RequestMeta,
}

/// Why `prepare` did not produce an upstream request.
#[derive(Debug, Clone, Copy)]
enum Early {
    /// An error page.
    Reject(Reject, Option<Req>),
    /// `out` holds a complete answer the proxy wrote (a redirect, an ACME challenge).
    Answer {
        status: u16,
        reason: &'static str,
        close: bool,
    },
}

/// ACME HTTP-01 challenge paths (RFC 8555 §8.3).
const ACME_PREFIX: &[u8] = b"/.well-known/acme-challenge/";

/// A request the proxy answers itself.
#[derive(Debug, Clone, Copy)]
struct Reject {
    status: u16,
    reason: &'static str,
    /// The connection must close after the answer (the request body, if any, is unread or the
    /// framing is not trustworthy).
    close: bool,
}

/// Runs one exchange on `c`. `head_deadline` bounds the wait for the complete request head.
/// `last` marks the connection's final request (the response says Connection: close).
pub async fn exchange<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    head_deadline: Instant,
    last: bool,
) -> Next {
    let mut ex = Exchange::new(w, c.peer.ip());
    if c.rb.buf.capacity() == 0 {
        c.rb = RecvBuf::new(w.bufs.take());
    }

    // Phase 1: head.
    let head_len = match read_head(w, c, head_deadline, &mut ex).await {
        Ok(Some(n)) => n,
        Ok(None) => return Next::Close,
        Err(rej) => {
            w.stats.client_errors.inc();
            let next = reject(w, c, &mut ex, w.bufs.take(), rej, false).await;
            // A client too slow to finish its head has nothing unread worth draining for
            // (slowloris clients come by the thousand, and each linger holds a buffer).
            return if rej.reason == "header_timeout" {
                Next::Close
            } else {
                next
            };
        }
    };
    ex.bytes_in = head_len as u64;

    // Phase 2: prepare.
    let mut out = w.bufs.take();
    let prepared = prepare(w, c, head_len, &mut ex, &mut out);
    let (req, target) = match prepared {
        Ok(x) => x,
        Err(Early::Reject(rej, req)) => {
            w.stats.client_errors.inc();
            let head_only = req.is_some_and(|r| r.method == Method::Head);
            let body = req.is_some_and(|r| r.meta.framing != BodyFraming::None);
            let close = rej.close || body || last || req.is_none_or(|r| !r.meta.keep_alive);
            c.rb.consume(head_len);
            return reject(w, c, &mut ex, out, Reject { close, ..rej }, head_only).await;
        }
        Err(Early::Answer {
            status,
            reason,
            close,
        }) => {
            // `out` holds the whole answer; a close is already announced in it.
            let close = close || last;
            ex.status = status;
            ex.reason = reason;
            c.rb.consume(head_len);
            let (r, b) = c.io.write_all(out, w.settings.client_write).await;
            if r.is_ok() {
                ex.bytes_out += b.len() as u64;
            }
            w.bufs.put(b);
            ex.finish(w, &c.rb.buf);
            c.rb.compact();
            return if close || r.is_err() {
                Next::Linger
            } else {
                Next::KeepAlive
            };
        }
    };
    ex.target = Some(target);
    c.rb.consume(head_len);
    c.rb.window = head_len;
    let has_body = req.meta.framing != BodyFraming::None;

    // Phase 3: continue.
    if req.meta.expect_continue && has_body && !c.rb.has_unread() {
        let mut cont = w.bufs.take();
        cont.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        let (r, b) = c.io.write_all(cont, w.settings.client_write).await;
        w.bufs.put(b);
        if r.is_err() {
            return abort(w, c, &mut ex, out, "client_closed", 499);
        }
    }

    // Phase 3b: a small body is read whole (a large one: its first part) before an upstream
    // connection is taken, so a client that sends slowly holds only its own connection. The
    // body's reads are held to the client's rate floor and total deadline from here on.
    let mut body_pace = Pace::new(
        w.settings.body_pace,
        Some(Instant::now() + w.settings.body_total),
    );
    let buffered = if has_body {
        buffer_body(
            w,
            c,
            req.meta.framing,
            target.body_bytes_max,
            &mut body_pace,
        )
        .await
    } else {
        Ok(())
    };
    // The pump counts the body bytes it moves; when it never ran, what was buffered is
    // counted where the exchange ends.
    let mut pumped = false;

    // Phase 4 and 5: forward, then read the response head.
    let retryable = w.settings.retry_idempotent && req.method.is_idempotent() && !has_body;
    let mut ubuf = RecvBuf::new(w.bufs.take());
    let mut fresh_only = false;
    let mut body_sent = !has_body;
    let outcome = loop {
        if let Err(e) = buffered {
            break Err(e);
        }
        ex.contacted = true;
        let (mut up, reused) = match upstream_conn(w, target.upstream, fresh_only).await {
            Ok(x) => x,
            Err(e) => break Err(e),
        };
        let sent = if has_body {
            let unread_before = c.rb.unread().len() as u64;
            let decode = match req.meta.framing {
                BodyFraming::Length(n) => Decode::Length(n),
                _ => Decode::Chunked(ChunkedDecoder::new()),
            };
            let encode = match req.meta.framing {
                BodyFraming::Chunked => Encode::Chunked,
                _ => Encode::Raw,
            };
            pumped = true;
            let (r, n) = stream::pump(
                End::new(&mut c.io, Side::Client, w.settings.body_read).paced(&mut body_pace),
                &mut c.rb,
                End::new(&mut up, Side::Upstream, w.settings.upstream_write),
                &mut out,
                decode,
                encode,
                Some(target.body_bytes_max),
                &w.bufs,
            )
            .await;
            // Raw bytes of this request's body: what was buffered, plus what was read, minus
            // what is left over for the next request.
            ex.bytes_in += (unread_before + n.read).saturating_sub(c.rb.unread().len() as u64);
            body_sent = r.is_ok();
            r
        } else {
            // Keep the head in `out`: a retry sends it again.
            let len = out.len();
            let (r, b) = up
                .write_range(std::mem::take(&mut out), 0, len, w.settings.upstream_write)
                .await;
            out = b;
            r.map_err(|e| e.on(Side::Upstream))
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.side == Side::Upstream && reused && retryable && !fresh_only => {
                w.stats.upstream_retries.inc();
                fresh_only = true;
                continue;
            }
            Err(e) if e.side == Side::Upstream && has_body && e.kind != ErrorKind::BodyTooLarge => {
                // The upstream stopped reading the body. It may have answered early (413, 401):
                // relay that answer if it is already there.
                match read_response_head(w, &mut up, &mut ubuf, None).await {
                    Ok(()) => break Ok(up),
                    Err(_) => break Err(e),
                }
            }
            Err(e) => break Err(e),
        }
        match read_response_head(w, &mut up, &mut ubuf, None).await {
            Ok(()) => break Ok(up),
            Err(e) if e.retry_safe && reused && retryable && !fresh_only => {
                w.stats.upstream_retries.inc();
                fresh_only = true;
                ubuf.buf.clear();
                ubuf.pos = 0;
                continue;
            }
            Err(e) => break Err(e),
        }
    };
    let mut up = match outcome {
        Ok(up) => up,
        Err(e) => {
            w.bufs.put(ubuf.buf);
            ex.reason = e.reason();
            if has_body && !pumped {
                ex.bytes_in += c.rb.unread().len() as u64;
            }
            if e.side == Side::Client && matches!(e.kind, ErrorKind::Closed | ErrorKind::Io) {
                // Nobody left to answer.
                return abort(w, c, &mut ex, out, e.reason(), 499);
            }
            if e.side == Side::Client && e.kind == ErrorKind::TooSlow {
                w.stats.slow_request_bodies.inc();
            }
            let rej = Reject {
                status: e.status(),
                reason: e.reason(),
                close: !body_sent || last || !req.meta.keep_alive,
            };
            return reject(w, c, &mut ex, out, rej, req.method == Method::Head).await;
        }
    };
    out.clear();

    // Phase 5 (cont.): interim responses, then the final head. Interim responses are capped
    // in number, and never extend the wait for the final head past one `upstream_read` from
    // the first of them: an upstream sending 103 forever must not hold the exchange.
    let mut interims = 0usize;
    let mut interim_until = None;
    let plan = loop {
        let hsts = if S::TLS { target.hsts } else { None };
        let plan = match plan_response(w, &req, &ex, &ubuf, &mut out, last || !body_sent, hsts) {
            Ok(p) => p,
            Err(e) => {
                w.bufs.put(ubuf.buf);
                ex.reason = e.reason();
                let rej = Reject {
                    status: 502,
                    reason: e.reason(),
                    close: last || !req.meta.keep_alive || !body_sent,
                };
                return reject(w, c, &mut ex, out, rej, req.method == Method::Head).await;
            }
        };
        if !plan.interim {
            break plan;
        }
        interims += 1;
        let until = *interim_until.get_or_insert_with(|| Instant::now() + w.settings.upstream_read);
        if interims > w.settings.interim_responses_max {
            w.bufs.put(ubuf.buf);
            return interim_exceeded(w, c, &mut ex, out, &req, last || !body_sent).await;
        }
        ubuf.consume(plan.head_len);
        ubuf.compact();
        if !out.is_empty() {
            let (r, b) =
                c.io.write_all(std::mem::take(&mut out), w.settings.client_write)
                    .await;
            out = b;
            ex.bytes_out += out.len() as u64;
            out.clear();
            if r.is_err() {
                w.bufs.put(ubuf.buf);
                return abort(w, c, &mut ex, out, "client_closed", 499);
            }
        }
        if let Err(e) = read_response_head(w, &mut up, &mut ubuf, Some(until)).await {
            w.bufs.put(ubuf.buf);
            if e.kind == ErrorKind::InterimLimit {
                return interim_exceeded(w, c, &mut ex, out, &req, last || !body_sent).await;
            }
            // An interim response is not an answer: the client still gets one.
            ex.reason = e.reason();
            let rej = Reject {
                status: e.status(),
                reason: e.reason(),
                close: last || !req.meta.keep_alive || !body_sent,
            };
            return reject(w, c, &mut ex, out, rej, req.method == Method::Head).await;
        }
    };
    ex.status = plan.status;
    ubuf.consume(plan.head_len);

    // Phase 6: respond.
    if plan.upgrade {
        // Bytes that arrived after the 101 head belong to the new protocol.
        out.extend_from_slice(ubuf.unread());
        ubuf.consume(ubuf.unread().len());
        let (r, b) =
            c.io.write_all(std::mem::take(&mut out), w.settings.client_write)
                .await;
        ex.bytes_out += b.len() as u64;
        w.bufs.put(b);
        w.bufs.put(ubuf.buf);
        if r.is_err() {
            ex.reason = "client_closed";
            ex.finish(w, &c.rb.buf);
            return Next::Close;
        }
        // And bytes the client sent after its request head go to the upstream.
        if c.rb.has_unread() {
            let start = c.rb.pos;
            let end = c.rb.buf.len();
            let (r, b) = up
                .write_range(
                    std::mem::take(&mut c.rb.buf),
                    start,
                    end,
                    w.settings.upstream_write,
                )
                .await;
            c.rb.buf = b;
            c.rb.consume(end - start);
            if r.is_err() {
                ex.reason = "upstream_closed";
                ex.finish(w, &c.rb.buf);
                return Next::Close;
            }
        }
        w.stats.tunnels.inc();
        return Next::Upgrade(Box::new(Upgraded {
            upstream: up.io,
            ex,
        }));
    }

    let mut upstream_clean = plan.upstream_reusable && body_sent;
    let mut client_open = !plan.client_close;
    match plan.body {
        None => {
            let (r, b) =
                c.io.write_all(std::mem::take(&mut out), w.settings.client_write)
                    .await;
            ex.bytes_out += b.len() as u64;
            out = b;
            if r.is_err() {
                ex.reason = "client_closed";
                client_open = false;
            }
        }
        Some((decode, encode)) => {
            // A client taking the body slower than its floor lets the upstream go.
            let mut pace = Pace::new(w.settings.response_pace, None);
            let (r, n) = stream::pump(
                End::new(&mut up, Side::Upstream, w.settings.upstream_read),
                &mut ubuf,
                End::new(&mut c.io, Side::Client, w.settings.client_write).paced(&mut pace),
                &mut out,
                decode,
                encode,
                None,
                &w.bufs,
            )
            .await;
            ex.bytes_out += n.written;
            if let Err(e) = r {
                // Part of the response may be out: the client learns of the failure by the
                // connection closing before the framing says the body ends.
                if e.side == Side::Client && e.kind == ErrorKind::TooSlow {
                    w.stats.slow_responses.inc();
                }
                ex.reason = e.reason();
                upstream_clean = false;
                client_open = false;
            }
        }
    }

    // Phase 7: finish.
    if upstream_clean && ubuf.has_unread() {
        // Bytes after the end of the response, already here: never pooled.
        w.stats.upstream_stray_bytes.inc();
    } else if upstream_clean {
        w.pool
            .borrow_mut()
            .checkin(target.upstream, up, Instant::now());
    }
    w.bufs.put(ubuf.buf);
    w.bufs.put(out);
    ex.finish(w, &c.rb.buf);
    c.rb.compact();
    if client_open {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Ends an exchange without an answer (the client is gone or the response is cut off).
fn abort(
    w: &Worker,
    c: &mut Client<impl ClientIo>,
    ex: &mut Exchange,
    out: Vec<u8>,
    reason: &'static str,
    status: u16,
) -> Next {
    w.bufs.put(out);
    if ex.status == 0 {
        ex.status = status;
    }
    ex.reason = reason;
    ex.finish(w, &c.rb.buf);
    Next::Close
}

/// The upstream sent more interim responses than allowed, or kept sending them past the wait
/// for a final head: 502, and the upstream connection (already given up by the caller) is
/// closed.
async fn interim_exceeded(
    w: &Worker,
    c: &mut Client<impl ClientIo>,
    ex: &mut Exchange,
    out: Vec<u8>,
    req: &Req,
    force_close: bool,
) -> Next {
    w.stats.upstream_interim_exceeded.inc();
    let e = ProxyError::upstream(ErrorKind::InterimLimit);
    ex.reason = e.reason();
    let rej = Reject {
        status: e.status(),
        reason: e.reason(),
        close: force_close || !req.meta.keep_alive,
    };
    reject(w, c, ex, out, rej, req.method == Method::Head).await
}

/// Phase 1. `Ok(None)`: the client closed (or went quiet) before sending a request.
async fn read_head(
    w: &Worker,
    c: &mut Client<impl ClientIo>,
    deadline: Instant,
    ex: &mut Exchange,
) -> Result<Option<usize>, Reject> {
    let mut scanner = HeadScanner::new();
    // The head stalled once: from then on the connection waits for readability without a
    // buffer before every read (which then completes at once), never in a hot read.
    let mut stalled = false;
    loop {
        match scanner.scan(&c.rb.buf, &w.settings.head) {
            Ok(Some(n)) => return Ok(Some(n)),
            Ok(None) => {}
            Err(e) => {
                return Err(Reject {
                    status: e.status(),
                    reason: head_reason(e),
                    close: true,
                });
            }
        }
        let now = Instant::now();
        let Some(left) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return if c.rb.buf.is_empty() {
                Ok(None)
            } else {
                Err(Reject {
                    status: 408,
                    reason: "header_timeout",
                    close: true,
                })
            };
        };
        let min_free = 1024.min(w.settings.head.header_bytes_max);
        if stalled && !stalled_wait(w, c, deadline).await {
            return Err(Reject {
                status: 408,
                reason: "header_timeout",
                close: true,
            });
        }
        // A head that stalls for a hot read waits for the rest without a posted buffer.
        let hot = w.settings.hot_read;
        let may_stall = !stalled && !hot.is_zero() && hot < left && !c.rb.buf.is_empty();
        match c
            .io
            .fill(&mut c.rb, min_free, if may_stall { hot } else { left })
            .await
        {
            Ok(_) => {}
            Err(IoFail::Timeout) if may_stall => stalled = true,
            Err(IoFail::Timeout) if !c.rb.buf.is_empty() => {
                return Err(Reject {
                    status: 408,
                    reason: "header_timeout",
                    close: true,
                });
            }
            Err(_) => {
                if !c.rb.buf.is_empty() {
                    // A partial head and then EOF: nothing to answer, but it was a request.
                    ex.status = 400;
                    ex.reason = "client_closed";
                    ex.bytes_in = c.rb.buf.len() as u64;
                    ex.finish(w, &c.rb.buf);
                }
                return Ok(None);
            }
        }
    }
}

/// Waits for more of a head that stalled (a slowloris client sends a line every few seconds)
/// without holding a read buffer, as an idle connection does: the bytes so far move into a
/// buffer of their own size, the pooled one goes back, and the socket is polled for
/// readability. A stalled head then costs its bytes and its task, not `limits.buffer_bytes`.
/// False: the deadline passed, the client closed, or shutdown.
async fn stalled_wait(w: &Worker, c: &mut Client<impl ClientIo>, deadline: Instant) -> bool {
    debug_assert_eq!(c.rb.pos, 0, "a head being read is still at the front");
    if c.io.io.has_buffered() {
        // TLS bytes above the socket: a readability poll would not see them.
        return true;
    }
    if c.rb.buf.capacity() > c.rb.buf.len() {
        let kept = c.rb.buf.to_vec();
        w.bufs.put(std::mem::replace(&mut c.rb.buf, kept));
    }
    c.io.release();
    let left = deadline.saturating_duration_since(Instant::now());
    crate::conn::idle_wait(w, c.io.io.socket(), left).await
}

fn head_reason(e: HeadError) -> &'static str {
    match e {
        HeadError::RequestLineTooLong => "request_line_too_long",
        HeadError::HeadTooLarge | HeadError::TooManyHeaders => "header_too_large",
        HeadError::BareLineBreak | HeadError::Nul => "bad_line_break",
        HeadError::Version => "bad_version",
        HeadError::MissingHost | HeadError::DuplicateHost | HeadError::InvalidHost => "bad_host",
        HeadError::InvalidContentLength
        | HeadError::DuplicateContentLength
        | HeadError::LengthWithTransferEncoding
        | HeadError::ChunkedNotLast
        | HeadError::UnsupportedCoding
        | HeadError::TransferEncodingInHttp10 => "bad_framing",
        _ => "bad_request",
    }
}

/// Phase 2: everything about the request that needs no waiting. On success `out` holds the
/// upstream head.
fn prepare<S: ClientIo>(
    w: &Worker,
    c: &Client<S>,
    head_len: usize,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
) -> Result<(Req, Target), Early> {
    let s = &w.settings;
    let buf = &c.rb.buf[..head_len];
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let r = parse_request(buf, &s.head, &mut slots).map_err(|e| {
        Early::Reject(
            Reject {
                status: e.status(),
                reason: head_reason(e),
                close: true,
            },
            None,
        )
    })?;
    let req = Req {
        method: r.method,
        version: r.version,
        meta: r.meta,
    };
    ex.method = span_of(buf, r.method_raw);
    ex.path = match span_of(buf, r.path()) {
        (0, 0) => SLASH_PATH,
        span => span,
    };
    ex.head_request = r.method == Method::Head;
    if let Some(ua) = r.header("user-agent") {
        ex.user_agent = span_of(buf, ua);
    }
    ex.json = r
        .header("accept")
        .is_some_and(|a| memchr::memmem::find(a, b"application/json").is_some());

    // Access phase: who is asking, under which request id.
    let xff = r
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|h| h.value);
    ex.client_ip = access::client_ip(c.peer.ip(), c.trusted, &s.trusted_proxies, xff);
    if c.trusted
        && let Some(id) = r.header("x-request-id")
        && access::valid_request_id(id)
    {
        ex.rid[..id.len()].copy_from_slice(id);
        ex.rid_len = id.len();
    }

    // Route phase.
    let bad_host = Early::Reject(
        Reject {
            status: 400,
            reason: "bad_host",
            close: true,
        },
        Some(req),
    );
    let host = match (r.authority(), c.io.io.tls()) {
        (Some(a), _) => HostName::parse(a).ok_or(bad_host)?,
        // HTTP/1.0 without Host: over TLS the server name stands for it (as nginx picks the
        // server by SNI), so the request is held to what the connection's certificate covers
        // and never falls through to the default route. No server name either: refused.
        (None, Some(tls)) => tls
            .sni
            .as_deref()
            .and_then(|n| HostName::parse(n.as_bytes()))
            .ok_or(bad_host)?,
        (None, None) => HostName::empty(),
    };
    ex.host = host;
    let has_body = req.meta.framing != BodyFraming::None;

    // ACME HTTP-01 challenges are answered from the store before any redirect or route, so
    // certificates can be issued for hosts that redirect everything to HTTPS.
    if !S::TLS
        && let Some(token) = r.path().strip_prefix(ACME_PREFIX)
        && let Ok(token) = std::str::from_utf8(token)
    {
        let mut answer = Vec::new();
        if w.acme.answer(token, &mut answer) {
            w.stats.acme_answers.inc();
            let mut hw = ringway_proto::HeadWriter::new(out);
            hw.status_line(200, b"OK");
            hw.header(b"Content-Type", b"text/plain");
            hw.header_u64(b"Content-Length", answer.len() as u64);
            hw.header(b"Cache-Control", b"no-store");
            hw.header(b"X-Request-ID", ex.request_id());
            if has_body || !req.meta.keep_alive {
                hw.header(b"Connection", b"close");
            }
            hw.finish();
            out.extend_from_slice(&answer);
            return Err(Early::Answer {
                status: 200,
                reason: "acme_challenge",
                close: has_body || !req.meta.keep_alive,
            });
        }
    }

    // TLS: the Host must be one this connection's certificate was chosen for (RFC 9110
    // §15.5.20): a browser reusing a connection for another name gets 421 and retries.
    if let Some(tls) = c.io.io.tls()
        && !tls.allows_host(host.as_str())
    {
        w.stats.misdirected.inc();
        return Err(Early::Reject(
            Reject {
                status: 421,
                reason: "misdirected",
                close: has_body,
            },
            Some(req),
        ));
    }

    let Some(target) = route::resolve(&w.routes, &host, w.next_pick(), s.body_bytes_max) else {
        return Err(Early::Reject(
            Reject {
                status: 404,
                reason: "no_route",
                close: false,
            },
            Some(req),
        ));
    };
    ex.target = Some(target);

    // Policy phase: IP rules, block rules, rate limits, challenge, visitor ids.
    policy_phase::<S>(w, &r, &host, target, ex, out, has_body, req.meta.keep_alive).map_err(
        |e| match e {
            PolicyStop::Reject(rej) => Early::Reject(rej, Some(req)),
            PolicyStop::Answer {
                status,
                reason,
                close,
            } => Early::Answer {
                status,
                reason,
                close,
            },
        },
    )?;

    if !S::TLS && target.redirect_https {
        // Without a host (HTTP/1.0) there is no authority to redirect to: `https://` followed
        // by a path `//evil.example/` would send the client to evil.example.
        if host.as_bytes().is_empty() {
            return Err(bad_host);
        }
        // 301 keeps GET and HEAD; 308 keeps every other method and its body.
        let status = if matches!(req.method, Method::Get | Method::Head) {
            301
        } else {
            308
        };
        w.stats.https_redirects.inc();
        let mut hw = ringway_proto::HeadWriter::new(out);
        hw.status_line(status, crate::error::reason_phrase(status).as_bytes());
        hw.header_with(b"Location", |o| {
            o.extend_from_slice(b"https://");
            o.extend_from_slice(host.as_bytes());
            if let Some(port) = s.https_redirect_port {
                o.push(b':');
                ringway_proto::write::push_u64(o, u64::from(port));
            }
            // `OPTIONS *` asks about the server, not a resource: the same question there.
            match r.target {
                b"*" => o.push(b'/'),
                _ => r.origin_target().write_to(o),
            }
        });
        hw.header(b"Content-Length", b"0");
        hw.header(b"X-Request-ID", ex.request_id());
        if has_body || !req.meta.keep_alive {
            hw.header(b"Connection", b"close");
        }
        hw.finish();
        return Err(Early::Answer {
            status,
            reason: "https_redirect",
            close: has_body || !req.meta.keep_alive,
        });
    }

    if let BodyFraming::Length(n) = req.meta.framing
        && n > target.body_bytes_max
    {
        return Err(Early::Reject(
            Reject {
                status: 413,
                reason: "body_too_large",
                close: true,
            },
            Some(req),
        ));
    }
    // Upgrades carry no body; one that claims one is forwarded as a plain request. Only the
    // configured protocols open a tunnel (never h2c: its streams would skip routing and
    // policy); for any other the Upgrade is removed and the request goes up as it is.
    let mut upgrade = req.meta.upgrade && req.meta.framing == BodyFraming::None;
    if upgrade
        && !r
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("upgrade"))
            .any(|h| headers::upgrade_allowed(h.value, &s.upgrade_protocols))
    {
        w.stats.upgrades_refused.inc();
        upgrade = false;
    }
    headers::write_upstream_request(
        out,
        buf,
        &r,
        &Forwarding {
            peer_ip: c.peer.ip(),
            trusted: c.trusted,
            proto: if S::TLS { b"https" } else { b"http" },
            request_id: ex.request_id(),
            upgrade,
            upgrade_protocols: &s.upgrade_protocols,
            untrusted_strip: &s.untrusted_strip,
            host_fallback: host.as_bytes(),
            strip_expect: true,
            upstream: target.upstream,
            visitor_id: ex.ids.visitor(),
            session_id: ex.ids.session(),
        },
    );
    let mut req = req;
    req.meta.upgrade = upgrade;
    Ok((req, target))
}

/// Why the policy phase ended the exchange.
enum PolicyStop {
    Reject(Reject),
    /// `out` holds the answer (429, a challenge page, the redirect after a solution).
    Answer {
        status: u16,
        reason: &'static str,
        close: bool,
    },
}

/// Most Cookie headers the policy phase looks at.
const COOKIE_HEADERS_MAX: usize = 8;

/// What the policy decided, copied out of the epoch-pinned policy.
struct Decided {
    verdict: crate::policy::Verdict,
    /// Difficulty, binding and pass lifetime of the challenge, if any.
    challenge: Option<(u8, ringway_core::policy::CookieBinding, u32)>,
    visitor_cookies: bool,
}

/// Phase 3b (after routing): the edge policy of the host or project. See `policy`.
#[allow(clippy::too_many_arguments)]
fn policy_phase<S: ClientIo>(
    w: &Worker,
    r: &ringway_proto::Request<'_, '_>,
    host: &HostName,
    target: Target,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
    has_body: bool,
    keep_alive: bool,
) -> Result<(), PolicyStop> {
    use crate::challenge;
    use crate::policy::Verdict;
    if w.policies.is_empty() {
        return Ok(());
    }
    let s = &w.settings;
    let mut cookie_vals: [&[u8]; COOKIE_HEADERS_MAX] = [&[]; COOKIE_HEADERS_MAX];
    let mut n = 0;
    let mut now_unix = 0;
    // The facts are gathered only once a policy applies: hosts without one pay a lookup.
    let Some(d) = w
        .policies
        .with_policy(host.as_str(), target.ids.project_id, |p| {
            // One walk over the fields for everything the rules read.
            let mut user_agent: Option<&[u8]> = None;
            for h in r.headers.iter() {
                if h.name.eq_ignore_ascii_case("cookie") {
                    if n < COOKIE_HEADERS_MAX {
                        cookie_vals[n] = h.value;
                        n += 1;
                    }
                } else if user_agent.is_none() && h.name.eq_ignore_ascii_case("user-agent") {
                    user_agent = Some(h.value);
                }
            }
            now_unix = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // Prefix rules see the path as the upstream will resolve it (`/%77p-admin`,
            // `//wp-admin`, `/x%2F..%2Fwp-admin`, `/;x/wp-admin` are all `/wp-admin`), and a
            // path servers disagree on is refused. Most paths need nothing and skip the
            // buffer; so do policies without path rules.
            let mut path_buf;
            let mut bad_path = None;
            let path = if p.reads_path() && ringway_core::policy::path_needs_normalizing(r.path()) {
                path_buf = [0u8; ringway_core::policy::POLICY_PATH_BYTES_MAX];
                match ringway_core::policy::normalize_path(r.path(), &mut path_buf) {
                    Ok(p) => p,
                    Err(e) => {
                        bad_path = Some(e);
                        r.path()
                    }
                }
            } else {
                r.path()
            };
            let facts = crate::policy::Facts {
                host: host.as_bytes(),
                project: target.ids.project_id,
                ip: ex.client_ip,
                user_agent: user_agent.unwrap_or(b""),
                path,
                cookies: &cookie_vals[..n],
                now_unix,
                now_us: w.limiter.now_us(),
            };
            Decided {
                verdict: match bad_path {
                    Some(e) => Verdict::BadPath(e),
                    None => crate::policy::evaluate(p, &facts, &w.limiter, &s.challenge_keys),
                },
                challenge: p
                    .challenge
                    .as_ref()
                    .map(|c| (c.difficulty_bits, c.binding, c.pass_ttl_s)),
                visitor_cookies: p.visitor_cookies,
            }
        })
    else {
        return Ok(());
    };
    let cookies = &cookie_vals[..n];
    let close = has_body || !keep_alive;
    let finish_head = |hw: &mut ringway_proto::HeadWriter<'_>, ex: &Exchange| {
        hw.header(b"Cache-Control", b"no-store");
        hw.header(b"X-Request-ID", ex.request_id());
        if close {
            hw.header(b"Connection", b"close");
        }
    };
    // A refusal with the shared error page (its body, if any, is drained or the connection
    // closed by the caller).
    let refuse = |status, reason| {
        PolicyStop::Reject(Reject {
            status,
            reason,
            close: has_body,
        })
    };
    match d.verdict {
        Verdict::Pass => {}
        Verdict::IpDenied => {
            w.stats.ip_denied.inc();
            return Err(refuse(403, "ip_denied"));
        }
        Verdict::Blocked(reason) => {
            w.stats.blocked.inc();
            return Err(refuse(403, reason));
        }
        Verdict::BadPath(ringway_core::policy::PathError::TooLong) => {
            w.stats.blocked.inc();
            return Err(refuse(414, "path_too_long"));
        }
        Verdict::BadPath(e) => {
            w.stats.ambiguous_paths.inc();
            return Err(refuse(400, e.reason()));
        }
        Verdict::Limit(retry_after_s) => {
            w.stats.rate_limited.inc();
            let body = b"Too Many Requests\n";
            let mut hw = ringway_proto::HeadWriter::new(out);
            hw.status_line(429, b"Too Many Requests");
            hw.header(b"Content-Type", b"text/plain; charset=utf-8");
            hw.header_u64(b"Retry-After", retry_after_s);
            hw.header_u64(b"Content-Length", body.len() as u64);
            finish_head(&mut hw, ex);
            hw.finish();
            // HEAD: the head says what a GET would get, and no body follows.
            if !ex.head_request {
                out.extend_from_slice(body);
            }
            return Err(PolicyStop::Answer {
                status: 429,
                reason: "rate_limited",
                close,
            });
        }
        Verdict::Challenge | Verdict::Verify => {
            let Some((bits, binding, ttl)) = d.challenge else {
                return Ok(());
            };
            let mut page = w.bufs.take();
            page.clear();
            let mut solved = false;
            let mut ret_ok = false;
            if d.verdict == Verdict::Verify {
                let query = r.query();
                let (nonce, sol, ret) = (
                    challenge::query_param(query, b"n"),
                    challenge::query_param(query, b"s"),
                    challenge::query_param(query, b"r"),
                );
                let mut n_dec = Vec::new();
                let ok = match (nonce, sol) {
                    (Some(nv), Some(sv)) => {
                        challenge::percent_decode(nv, &mut n_dec).is_some()
                            && challenge::verify_solution(
                                &n_dec,
                                sv,
                                &s.challenge_keys,
                                host.as_bytes(),
                                ex.client_ip,
                                binding,
                                bits,
                                now_unix,
                            )
                            .is_ok()
                    }
                    _ => false,
                };
                // `page` holds the decoded return path.
                if let Some(rv) = ret {
                    ret_ok = challenge::percent_decode(rv, &mut page).is_some()
                        && challenge::safe_return(&page);
                }
                solved = ok;
            }
            if solved {
                w.stats.challenges_passed.inc();
                let mut cookie = Vec::with_capacity(96);
                cookie.extend_from_slice(challenge::PASS_COOKIE);
                cookie.push(b'=');
                challenge::issue_pass(
                    &mut cookie,
                    &s.challenge_keys,
                    host.as_bytes(),
                    ex.client_ip,
                    binding,
                    now_unix,
                    ttl,
                );
                cookie.extend_from_slice(b"; Path=/; Max-Age=");
                ringway_proto::write::push_u64(&mut cookie, u64::from(ttl));
                cookie.extend_from_slice(b"; HttpOnly; SameSite=Lax");
                if S::TLS {
                    cookie.extend_from_slice(b"; Secure");
                }
                let mut hw = ringway_proto::HeadWriter::new(out);
                hw.status_line(302, b"Found");
                hw.header(b"Location", if ret_ok { &page } else { b"/" });
                hw.header(b"Set-Cookie", &cookie);
                hw.header(b"Content-Length", b"0");
                finish_head(&mut hw, ex);
                hw.finish();
                w.bufs.put(page);
                return Err(PolicyStop::Answer {
                    status: 302,
                    reason: "challenge_passed",
                    close,
                });
            }
            let reason = if d.verdict == Verdict::Verify {
                w.stats.challenges_failed.inc();
                "challenge_failed"
            } else {
                w.stats.challenges_issued.inc();
                "challenge"
            };
            // The page sends the client back where it was going (or, after a failed
            // solution, where that solution said).
            let ret: Vec<u8> = if d.verdict != Verdict::Verify {
                r.origin_target().to_vec()
            } else if ret_ok {
                page.clone()
            } else {
                // Never back to the failed verification URL itself: its nonce stays stale,
                // and a solved page would land on it again and again.
                b"/".to_vec()
            };
            page.clear();
            let mut nonce = Vec::with_capacity(64);
            challenge::nonce(
                &mut nonce,
                &s.challenge_keys,
                host.as_bytes(),
                ex.client_ip,
                binding,
                now_unix,
            );
            challenge::page(&mut page, &nonce, bits, &ret);
            let mut hw = ringway_proto::HeadWriter::new(out);
            hw.status_line(403, b"Forbidden");
            hw.header(b"Content-Type", b"text/html; charset=utf-8");
            hw.header_u64(b"Content-Length", page.len() as u64);
            finish_head(&mut hw, ex);
            hw.finish();
            if !ex.head_request {
                out.extend_from_slice(&page);
            }
            w.bufs.put(page);
            return Err(PolicyStop::Answer {
                status: 403,
                reason,
                close,
            });
        }
    }
    if d.visitor_cookies {
        ex.ids = crate::policy::visitor_ids(
            cookies,
            now_unix,
            s.session_idle_s,
            s.visitor_ttl_s,
            S::TLS,
            || w.random_u64(),
        );
    }
    Ok(())
}

/// Phase 3b: reads the request body into `c.rb` until it is complete or
/// `limits.request_buffer_bytes` of it arrived, whichever is first, so the upstream connection
/// is only taken once the body is known to come at a useful rate (nginx buffers request bodies
/// by default for the same reason). The bytes stay unread for the pump; reads are held to
/// `pace` (rate floor and total deadline: too slow is 408 and close).
async fn buffer_body<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    framing: BodyFraming,
    body_max: u64,
    pace: &mut Pace,
) -> Result<(), ProxyError> {
    let limit = w.settings.request_buffer_bytes;
    // Chunked: how far the decoder has read the unread bytes (so a dripping client costs
    // one decoder pass over its bytes, not one per read), and the body bytes it found.
    let mut dec = ChunkedDecoder::new();
    let mut scanned = 0usize;
    let mut decoded = 0u64;
    loop {
        let unread = c.rb.unread();
        let enough = match framing {
            BodyFraming::None => true,
            BodyFraming::Length(n) => unread.len() as u64 >= n.min(limit as u64),
            BodyFraming::Chunked => loop {
                let d = dec
                    .decode(&unread[scanned..])
                    .map_err(|_| ProxyError::client(ErrorKind::Protocol))?;
                scanned += d.consumed;
                decoded += d.data.map_or(0, |(_, len)| len as u64);
                if decoded > body_max {
                    // Refused before any upstream connection is taken.
                    return Err(ProxyError::client(ErrorKind::BodyTooLarge));
                }
                if d.done || unread.len() >= limit {
                    break true;
                }
                if d.consumed == 0 || scanned == unread.len() {
                    break false;
                }
            },
        };
        if enough {
            return Ok(());
        }
        // Room for the rest, up to the limit, grown a step at a time as bytes come (a head
        // announcing 64 KiB reserves nothing it has not been sent).
        let want = match framing {
            BodyFraming::Length(n) => (n.min(limit as u64) as usize).saturating_sub(unread.len()),
            _ => limit - unread.len(),
        };
        let step = want.clamp(4096, BUFFER_READ_BYTES_MAX);
        c.io.fill_paced(&mut c.rb, step, w.settings.body_read, pace)
            .await
            .map_err(|e| e.on(Side::Client))?;
    }
}

/// Most buffer space a body read in phase 3b adds at a time.
const BUFFER_READ_BYTES_MAX: usize = 16 * 1024;

/// Phase 4: a pooled connection to `addr`, or a new one. Returns whether it was reused.
async fn upstream_conn(
    w: &Worker,
    addr: SocketAddr,
    fresh_only: bool,
) -> Result<(Timed<TcpStream>, bool), ProxyError> {
    if !fresh_only {
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

/// Phase 5: reads until `ubuf` holds a complete response head (at its front). Failures before
/// any byte are marked retry-safe. `until`: after an interim response, when the final head
/// is due at the latest (past it: `InterimLimit`).
async fn read_response_head(
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

/// How to deliver the response.
#[derive(Debug)]
struct Plan {
    status: u16,
    head_len: usize,
    /// A 1xx other than 101: relay it (if `out` is not empty) and read the next head.
    interim: bool,
    upgrade: bool,
    /// Source decoding and client encoding of the body; None: no body.
    body: Option<(Decode, Encode)>,
    client_close: bool,
    upstream_reusable: bool,
}

/// Phase 5 (cont.): parses the response head at the front of `ubuf` and writes the client head
/// into `out`.
fn plan_response(
    w: &Worker,
    req: &Req,
    ex: &Exchange,
    ubuf: &RecvBuf,
    out: &mut Vec<u8>,
    force_close: bool,
    hsts: Option<Hsts>,
) -> Result<Plan, ProxyError> {
    let s = &w.settings;
    let head_end = HeadScanner::new()
        .scan(&ubuf.buf, &s.head)
        .ok()
        .flatten()
        .ok_or(ProxyError::upstream(ErrorKind::Protocol))?;
    let head = &ubuf.buf[..head_end];
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let resp = parse_response(head, req.method, &s.head, &mut slots)
        .map_err(|_| ProxyError::upstream(ErrorKind::Protocol))?;
    let m = resp.meta;
    let client_10 = req.version == Version::Http10;

    if (100..200).contains(&m.status) && m.status != 101 {
        // 100 is dropped: the proxy answered Expect itself. Others (102, 103) are relayed to
        // HTTP/1.1 clients.
        if m.status != 100 && !client_10 {
            let mut hw = ringway_proto::HeadWriter::new(out);
            hw.status_line(m.status, resp.reason);
            hw.copy_headers(head, resp.headers, |h| {
                !ringway_proto::token::is_hop_by_hop(h.name.as_bytes())
                    && !resp.is_connection_option(h.name.as_bytes())
            });
            hw.finish();
        }
        return Ok(Plan {
            status: m.status,
            head_len: head_end,
            interim: true,
            upgrade: false,
            body: None,
            client_close: false,
            upstream_reusable: false,
        });
    }

    let shutting_down = w.shutdown.is_fired();
    let mut close = force_close || !req.meta.keep_alive || shutting_down;
    if m.status == 101 {
        // Only to a protocol the request was allowed to offer (the proxy removed the others).
        let allowed = resp
            .header("upgrade")
            .is_some_and(|u| headers::upgrade_allowed(u, &s.upgrade_protocols));
        if !(req.meta.upgrade && m.upgrade && allowed) {
            return Err(ProxyError::upstream(ErrorKind::Protocol));
        }
        headers::write_client_response(
            out,
            head,
            &resp,
            &ResponseEdit {
                framing: ClientFraming::None {
                    keep_length: false,
                    zero_length: false,
                },
                close: false,
                keep_alive_10: false,
                upgrade: true,
                request_id: s.request_id_in_response.then(|| ex.request_id()),
                security: &[],
                hsts: None,
                set_cookies: ex.ids.set_cookie_lines(),
            },
        );
        return Ok(Plan {
            status: 101,
            head_len: head_end,
            interim: false,
            upgrade: true,
            body: None,
            client_close: true,
            upstream_reusable: false,
        });
    }

    let (framing, body) = match m.framing {
        ResponseFraming::None => {
            let passthrough = req.method == Method::Head || m.status == 304;
            let bodyless_status = m.status == 204 || m.status < 200;
            (
                ClientFraming::None {
                    keep_length: passthrough,
                    zero_length: !passthrough && !bodyless_status,
                },
                None,
            )
        }
        ResponseFraming::Length(n) => (
            ClientFraming::Length(n),
            Some((Decode::Length(n), Encode::Raw)),
        ),
        ResponseFraming::Chunked | ResponseFraming::Close => {
            let decode = if m.framing == ResponseFraming::Chunked {
                Decode::Chunked(ChunkedDecoder::new())
            } else {
                Decode::Close
            };
            if client_10 {
                close = true;
                (ClientFraming::Close, Some((decode, Encode::Raw)))
            } else {
                (ClientFraming::Chunked, Some((decode, Encode::Chunked)))
            }
        }
    };
    headers::write_client_response(
        out,
        head,
        &resp,
        &ResponseEdit {
            framing,
            close,
            keep_alive_10: client_10 && !close,
            upgrade: false,
            request_id: s.request_id_in_response.then(|| ex.request_id()),
            security: &s.security_headers,
            hsts,
            set_cookies: ex.ids.set_cookie_lines(),
        },
    );
    Ok(Plan {
        status: m.status,
        head_len: head_end,
        interim: false,
        upgrade: false,
        body,
        client_close: close,
        // A 204 that announces a body (RFC 9110 §8.6 forbids it) may well send one: the
        // connection is not trusted with another request.
        upstream_reusable: m.keep_alive && !(m.status == 204 && m.declares_body),
    })
}

/// Answers with an error page the proxy generates itself and ends the exchange: the page is
/// written, the exchange counted and logged, the consumed bytes dropped. Closing (`Linger`)
/// unless the request was fully read and the connection may stay open.
async fn reject(
    w: &Worker,
    c: &mut Client<impl ClientIo>,
    ex: &mut Exchange,
    mut out: Vec<u8>,
    rej: Reject,
    head_only: bool,
) -> Next {
    ex.status = rej.status;
    if ex.reason.is_empty() {
        ex.reason = rej.reason;
    }
    out.clear();
    write_error_page(
        &mut out,
        rej.status,
        ex.request_id(),
        ex.json,
        rej.close,
        head_only,
    );
    let (r, out) = c.io.write_all(out, w.settings.client_write).await;
    if r.is_ok() {
        ex.bytes_out += out.len() as u64;
    }
    w.bufs.put(out);
    ex.finish(w, &c.rb.buf);
    c.rb.compact();
    if rej.close {
        Next::Linger
    } else {
        Next::KeepAlive
    }
}
