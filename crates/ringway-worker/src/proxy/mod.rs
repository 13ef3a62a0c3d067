//! One exchange: a request from the client and the response to it, phase by phase. The
//! driver, [`exchange`], calls the phases in request order; each hands the next what it needs
//! or ends the exchange with an [`End`]; every exchange leaves through [`finish`], which writes
//! the proxy's own answer if there is one, counts and logs the exchange, returns the buffers,
//! and decides in one place whether the client and the upstream connections are used again.
//!
//! 1. **head** (`head.rs`): read until the end of the request head (header timeout, limits).
//! 2. **prepare** (`prepare.rs`): parse strictly; access (client address, request id); route
//!    (host, ACME, 421, 404); **policy** (`policy.rs`); the redirect to HTTPS; the body limit;
//!    the upstream head. Nothing here waits.
//! 3. **body** (`body.rs`): answer `Expect: 100-continue`; read a small body before an
//!    upstream is taken.
//! 4. **forward** (`forward.rs`): the load balancer's attempts: pool or connect to the chosen
//!    endpoint, send head and body, read the response head; failures reported to the
//!    endpoint's health and retried on another endpoint where the request can be sent again.
//! 5. **respond** (`respond.rs`): interim responses, the client head, the body or a tunnel.
//! 6. **finish** (here).
//!
//! The answers the proxy writes itself are one type, [`answer::Answer`], written only by
//! `finish`. An answer either follows a fully read request body or closes the connection, so
//! the next bytes on the connection are never a body misread as a request.
//!
//! The client side is a seam. After the head phase the phases see the request as a head in
//! HTTP/1.1 syntax at the front of `Client::rb` with its parsed facts ([`Req`]), take the
//! body from the client transport (`ClientIo` reads, through `Client::rb`), and write the
//! response to it as HTTP/1.1 bytes (`ClientIo` writes). A transport that is not a byte
//! stream (an HTTP/2 stream) takes its place by presenting its request head in that syntax
//! and turning the response bytes back into its frames.

mod answer;
mod body;
mod forward;
mod head;
mod policy;
mod prepare;
mod record;
mod respond;

pub use record::Exchange;

use crate::client::ClientIo;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::io::{RecvBuf, Timed};
use crate::pace::Pace;
use crate::route::Target;
use crate::worker::Worker;
use answer::{Answer, Body};
use monoio::net::TcpStream;
use respond::Respond;
use ringway_proto::{BodyFraming, Method, RequestMeta, Version};
use std::net::SocketAddr;
use std::time::Instant;

/// A client connection as the exchange sees it.
#[derive(Debug)]
pub struct Client<S> {
    pub io: Timed<S>,
    pub peer: SocketAddr,
    /// The peer is a trusted proxy (its forwarding headers are believed).
    pub trusted: bool,
    /// The key this connection counts under in the per-client connection limit.
    pub counted: Option<crate::clients::ClientKey>,
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

/// Request facts that outlive the parse (plain values, no borrows).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Req {
    pub method: Method,
    pub version: Version,
    /// `upgrade` is what is forwarded (an allowed protocol, no body), not what was asked.
    pub meta: RequestMeta,
}

/// How far the request body got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyState {
    /// The request has none.
    None,
    /// Buffered, or not even that: never sent on (its bytes are counted at the end).
    Unsent,
    /// The pump started and failed: part of it is unread or unsent.
    Partial,
    /// Read from the client and sent upstream whole.
    Complete,
}

impl BodyState {
    /// The client's request was read to its end (nothing of it is left on the connection).
    fn read_whole(self) -> bool {
        matches!(self, BodyState::None | BodyState::Complete)
    }
}

/// How an exchange ended, for [`finish`].
enum End {
    /// The client left, or went quiet, before a request: nothing to log or answer.
    Gone,
    /// The proxy answers itself. `refusal`: a request refused before any upstream (a client
    /// error in the metrics).
    Answer {
        answer: Answer,
        refusal: bool,
    },
    /// Nobody is left to answer (the client went away mid-exchange): logged with `status`.
    Abort {
        status: u16,
        reason: &'static str,
    },
    /// A response was relayed (or cut off: then `client_open` is false).
    Relayed {
        client_open: bool,
        upstream: Option<Timed<TcpStream>>,
    },
    Upgrade(TcpStream),
}

/// The buffers one exchange holds, returned to the pool by `finish`.
struct Bufs {
    /// Heads and small bodies going out (the upstream head, then the client head).
    out: Vec<u8>,
    /// The upstream's response.
    ubuf: RecvBuf,
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
    // Taken as they are needed: a head that never completes holds neither.
    let mut bufs = Bufs {
        out: Vec::new(),
        ubuf: RecvBuf::default(),
    };
    let mut target = None;
    let (end, body) = run(w, c, &mut ex, &mut bufs, head_deadline, last, &mut target).await;
    finish(w, c, ex, bufs, end, body, last, target).await
}

/// The phases in order; what they end with.
#[allow(clippy::too_many_arguments)]
async fn run<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    ex: &mut Exchange,
    bufs: &mut Bufs,
    head_deadline: Instant,
    last: bool,
    target_out: &mut Option<Target>,
) -> (End, BodyState) {
    let head_len = match head::read(w, c, head_deadline, ex).await {
        head::Head::Complete(n) => n,
        head::Head::Gone => return (End::Gone, BodyState::None),
        head::Head::Refused(answer) => {
            let refusal = true;
            return (End::Answer { answer, refusal }, BodyState::None);
        }
    };
    ex.bytes_in = head_len as u64;
    bufs.out = w.bufs.take();
    let prepared = prepare::run(w, c, head_len, ex, &mut bufs.out);
    c.rb.consume(head_len);
    let (req, mut target) = match prepared {
        Ok(x) => x,
        Err(answer) => {
            let refusal = matches!(answer.body, Body::ErrorPage);
            return (End::Answer { answer, refusal }, BodyState::None);
        }
    };
    *target_out = Some(target);
    c.rb.window = head_len;
    let mut body = if req.meta.framing == BodyFraming::None {
        BodyState::None
    } else {
        BodyState::Unsent
    };
    let mut body_pace = Pace::new(
        w.settings.body_pace,
        Some(Instant::now() + w.settings.body_total),
    );
    let sent = async {
        body::run(w, c, &req, target.body_bytes_max, &mut body_pace).await?;
        bufs.ubuf = RecvBuf::new(w.bufs.take());
        let sent = forward::Sent {
            body: &mut body,
            pace: &mut body_pace,
        };
        forward::run(w, c, &req, &mut target, ex, bufs, sent).await
    }
    .await;
    // The endpoint of the last attempt is the one logged, pooled and released.
    *target_out = Some(target);
    ex.target = Some(target);
    let up = match sent {
        Ok(up) => up,
        Err(e) => return (failed(w, ex, e), body),
    };
    bufs.out.clear();
    let close = closes(w, ex, last, body);
    let r = respond::run(
        w,
        c,
        &req,
        &target,
        ex,
        &mut bufs.out,
        &mut bufs.ubuf,
        up,
        close,
    )
    .await;
    let end = match r {
        Respond::Relayed {
            client_open,
            upstream,
        } => End::Relayed {
            client_open,
            upstream,
        },
        Respond::Upgrade(up) => End::Upgrade(up),
        Respond::Answer(answer) => End::Answer {
            answer,
            refusal: false,
        },
        Respond::Gone => End::Abort {
            status: 499,
            reason: "client_closed",
        },
    };
    (end, body)
}

/// The end of an exchange whose request could not be sent or answered by the upstream.
fn failed(w: &Worker, ex: &mut Exchange, e: ProxyError) -> End {
    ex.reason = e.reason();
    if e.side == Side::Client && matches!(e.kind, ErrorKind::Closed | ErrorKind::Io) {
        // Nobody left to answer.
        return End::Abort {
            status: 499,
            reason: e.reason(),
        };
    }
    if e.side == Side::Client && e.kind == ErrorKind::TooSlow {
        w.stats.slow_request_bodies.inc();
    }
    let answer = if e.kind == ErrorKind::Saturated {
        Answer::unavailable(e.reason())
    } else {
        Answer::error(e.status(), e.reason())
    };
    End::Answer {
        answer,
        refusal: false,
    }
}

/// Whether the client connection closes after this exchange's response: its last allowed
/// request, a client that does not keep alive, a request not read to its end, or shutdown.
fn closes(w: &Worker, ex: &Exchange, last: bool, body: BodyState) -> bool {
    last || !ex.keep_alive || !body.read_whole() || w.shutdown.is_fired()
}

/// The one exit of an exchange: the proxy's answer written (its close decided here), the
/// exchange counted and logged, the buffers returned, and the reuse of both connections
/// decided.
#[allow(clippy::too_many_arguments)]
async fn finish<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    mut ex: Exchange,
    bufs: Bufs,
    end: End,
    body: BodyState,
    last: bool,
    target: Option<Target>,
) -> Next {
    let Bufs { mut out, ubuf } = bufs;
    put(w, ubuf.buf);
    if let Some(t) = &target {
        forward::end_lease(w, &mut ex, t);
    }
    if body == BodyState::Unsent {
        // Buffered and never pumped: counted here (the pump counts what it moves).
        ex.bytes_in += c.rb.unread().len() as u64;
    }
    let next = match end {
        End::Gone => {
            put(w, out);
            return Next::Close;
        }
        End::Answer { answer, refusal } => {
            if refusal {
                w.stats.client_errors.inc();
            }
            ex.end_with(answer.status, answer.reason);
            let close = answer.must_close || closes(w, &ex, last, body);
            if out.capacity() == 0 {
                out = w.bufs.take();
            }
            out.clear();
            answer.write(&mut out, ex.request_id(), ex.json, ex.head_request, close);
            let (r, b) = c.io.write_all(out, w.settings.client_write).await;
            if r.is_ok() {
                ex.bytes_out += b.len() as u64;
            }
            out = b;
            match (close, r.is_ok(), answer.drain) {
                (false, true, _) => Next::KeepAlive,
                (true, true, true) => Next::Linger,
                _ => Next::Close,
            }
        }
        End::Abort { status, reason } => {
            ex.end_with(status, reason);
            Next::Close
        }
        End::Relayed {
            client_open,
            upstream,
        } => {
            // A draining endpoint's connections are not kept.
            if let (Some(up), Some(t)) = (upstream, target)
                && let Some(addr) = t.upstream()
                && w.registry.pooling(t.endpoint())
            {
                let tag = crate::route::endpoint_tag(t.endpoint());
                w.pool
                    .borrow_mut()
                    .checkin_tagged(addr, tag, up, Instant::now());
            }
            if client_open {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        End::Upgrade(upstream) => {
            put(w, out);
            return Next::Upgrade(Box::new(Upgraded { upstream, ex }));
        }
    };
    put(w, out);
    ex.finish(w, &c.rb.buf);
    c.rb.compact();
    next
}

/// Returns a buffer to the worker's pool, if one was taken.
fn put(w: &Worker, b: Vec<u8>) {
    if b.capacity() > 0 {
        w.bufs.put(b);
    }
}
