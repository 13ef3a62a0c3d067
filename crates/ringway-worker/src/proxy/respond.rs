//! Phase 5, respond: the response head is validated by the same rules as requests (a
//! violation: 502, the upstream connection discarded) and rewritten for the client
//! (`headers.rs`: hop-by-hop headers dropped, security headers, HSTS, the request id, the
//! client framing); interim responses are relayed, at most `limits.interim_responses_max` and
//! the final head due one `upstream_read` after the first; then the body is streamed under the
//! client's rate floor, or the connection becomes a tunnel after a 101.

use super::answer::Answer;
use super::record::Exchange;
use super::{Client, Req};
use crate::client::ClientIo;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::{self, ClientFraming, ResponseEdit};
use crate::io::{RecvBuf, Timed};
use crate::pace::Pace;
use crate::route::Target;
use crate::stream::{self, Decode, Encode, End};
use crate::worker::Worker;
use monoio::net::TcpStream;
use ringway_core::route::Hsts;
use ringway_proto::head::HeadScanner;
use ringway_proto::{
    ChunkedDecoder, HEADER_SLOTS, Method, ResponseFraming, Version, parse_response,
};
use std::time::Instant;

/// How the respond phase ended.
pub(super) enum Respond {
    /// A response was relayed to its end (or cut off: then `client_open` is false).
    Relayed {
        client_open: bool,
        /// The upstream connection, when it may carry another request.
        upstream: Option<Timed<TcpStream>>,
    },
    /// A 101 was relayed: the connection becomes a tunnel.
    Upgrade(TcpStream),
    /// Nothing final reached the client: the proxy answers (502, 504).
    Answer(Answer),
    /// The client went away while interim responses were relayed.
    Gone,
}

/// Relays the response whose head is at the front of `ubuf`. `close`: the client connection
/// closes after it (said in the head).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    target: &Target,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
    ubuf: &mut RecvBuf,
    mut up: Timed<TcpStream>,
    close: bool,
) -> Respond {
    let hsts = if S::TLS { target.hsts } else { None };
    let plan = match final_head(w, c, req, ex, out, ubuf, &mut up, close, hsts).await {
        Ok(p) => p,
        Err(end) => return end,
    };
    ex.status = plan.status;
    ubuf.consume(plan.head_len);
    if plan.upgrade {
        return upgrade(w, c, ex, out, ubuf, up).await;
    }
    let mut upstream_clean = plan.upstream_reusable;
    let mut client_open = !plan.client_close;
    match plan.body {
        None => {
            let (r, b) =
                c.io.write_all(std::mem::take(out), w.settings.client_write)
                    .await;
            ex.bytes_out += b.len() as u64;
            *out = b;
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
                ubuf,
                End::new(&mut c.io, Side::Client, w.settings.client_write).paced(&mut pace),
                out,
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
    if upstream_clean && ubuf.has_unread() {
        // Bytes after the end of the response, already here: never pooled.
        w.stats.upstream_stray_bytes.inc();
        upstream_clean = false;
    }
    Respond::Relayed {
        client_open,
        upstream: upstream_clean.then_some(up),
    }
}

/// Reads past interim responses (relaying 102 and 103) to the final head, and plans it.
/// Interim responses are capped in number, and never extend the wait for the final head past
/// one `upstream_read` from the first of them: an upstream sending 103 forever must not hold
/// the exchange.
#[allow(clippy::too_many_arguments)]
async fn final_head<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    req: &Req,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
    ubuf: &mut RecvBuf,
    up: &mut Timed<TcpStream>,
    close: bool,
    hsts: Option<Hsts>,
) -> Result<Plan, Respond> {
    let mut interims = 0usize;
    let mut interim_until = None;
    loop {
        let plan = plan(w, req, ex, ubuf, out, close, hsts)
            .map_err(|e| Respond::Answer(Answer::error(502, e.reason())))?;
        if !plan.interim {
            return Ok(plan);
        }
        interims += 1;
        let until = *interim_until.get_or_insert_with(|| Instant::now() + w.settings.upstream_read);
        if interims > w.settings.interim_responses_max {
            return Err(interim_exceeded(w));
        }
        ubuf.consume(plan.head_len);
        ubuf.compact();
        if !out.is_empty() {
            let (r, b) =
                c.io.write_all(std::mem::take(out), w.settings.client_write)
                    .await;
            *out = b;
            ex.bytes_out += out.len() as u64;
            out.clear();
            if r.is_err() {
                return Err(Respond::Gone);
            }
        }
        if let Err(e) =
            super::forward::read_response_head(w, up, ubuf, Some(until), w.settings.upstream_read)
                .await
        {
            if e.kind == ErrorKind::InterimLimit {
                return Err(interim_exceeded(w));
            }
            // An interim response is not an answer: the client still gets one.
            return Err(Respond::Answer(Answer::error(e.status(), e.reason())));
        }
    }
}

/// The upstream sent more interim responses than allowed, or kept sending them past the wait
/// for a final head: 502, and its connection (given up by the caller) is closed.
fn interim_exceeded(w: &Worker) -> Respond {
    w.stats.upstream_interim_exceeded.inc();
    let e = ProxyError::upstream(ErrorKind::InterimLimit);
    Respond::Answer(Answer::error(e.status(), e.reason()))
}

/// Relays a 101 (its head is in `out`) and what both sides already sent past their heads;
/// the connection then becomes a tunnel.
async fn upgrade<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
    ubuf: &mut RecvBuf,
    mut up: Timed<TcpStream>,
) -> Respond {
    // Bytes that arrived after the 101 head belong to the new protocol.
    out.extend_from_slice(ubuf.unread());
    ubuf.consume(ubuf.unread().len());
    let (r, b) =
        c.io.write_all(std::mem::take(out), w.settings.client_write)
            .await;
    ex.bytes_out += b.len() as u64;
    *out = b;
    if r.is_err() {
        ex.reason = "client_closed";
        return Respond::Relayed {
            client_open: false,
            upstream: None,
        };
    }
    // And bytes the client sent after its request head go to the upstream.
    if c.rb.has_unread() {
        let (start, end) = (c.rb.pos, c.rb.buf.len());
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
            return Respond::Relayed {
                client_open: false,
                upstream: None,
            };
        }
    }
    w.stats.tunnels.inc();
    Respond::Upgrade(up.io)
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

/// Parses the response head at the front of `ubuf` and writes the client head into `out`.
fn plan(
    w: &Worker,
    req: &Req,
    ex: &Exchange,
    ubuf: &RecvBuf,
    out: &mut Vec<u8>,
    close: bool,
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
    let edit = |framing: ClientFraming, close: bool, upgrade: bool| ResponseEdit {
        framing,
        close,
        keep_alive_10: client_10 && !close && !upgrade,
        upgrade,
        request_id: s.request_id_in_response.then(|| ex.request_id()),
        security: if upgrade { &[] } else { &s.security_headers },
        hsts: if upgrade { None } else { hsts },
        set_cookies: ex.ids.set_cookie_lines(),
    };
    let mut plan = Plan {
        status: m.status,
        head_len: head_end,
        interim: false,
        upgrade: false,
        body: None,
        client_close: close,
        upstream_reusable: false,
    };
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
        plan.interim = true;
        plan.client_close = false;
        return Ok(plan);
    }
    if m.status == 101 {
        // Only to a protocol the request was allowed to offer (the proxy removed the others).
        let allowed = resp
            .header("upgrade")
            .is_some_and(|u| headers::upgrade_allowed(u, &s.upgrade_protocols));
        if !(req.meta.upgrade && m.upgrade && allowed) {
            return Err(ProxyError::upstream(ErrorKind::Protocol));
        }
        let none = ClientFraming::None {
            keep_length: false,
            zero_length: false,
        };
        headers::write_client_response(out, head, &resp, &edit(none, false, true));
        plan.upgrade = true;
        plan.client_close = true;
        return Ok(plan);
    }
    let (framing, body) = client_framing(req, m, client_10, &mut plan.client_close);
    headers::write_client_response(out, head, &resp, &edit(framing, plan.client_close, false));
    plan.body = body;
    // A 204 that announces a body (RFC 9110 §8.6 forbids it) may well send one: the
    // connection is not trusted with another request.
    plan.upstream_reusable = m.keep_alive && !(m.status == 204 && m.declares_body);
    Ok(plan)
}

/// The client framing for a final response, and the body's decoding and encoding: the
/// upstream's length; chunked for chunked or close-delimited bodies to HTTP/1.1 clients;
/// close-delimited for HTTP/1.0 clients (then the connection closes).
fn client_framing(
    req: &Req,
    m: ringway_proto::ResponseMeta,
    client_10: bool,
    close: &mut bool,
) -> (ClientFraming, Option<(Decode, Encode)>) {
    match m.framing {
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
                *close = true;
                (ClientFraming::Close, Some((decode, Encode::Raw)))
            } else {
                (ClientFraming::Chunked, Some((decode, Encode::Chunked)))
            }
        }
    }
}
