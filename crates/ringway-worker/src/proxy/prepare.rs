//! Phase 2, prepare: everything about the request that needs no waiting. The head is parsed
//! strictly (RFC 9112); the access step decides the client address and request id; the route
//! step normalises the host, answers ACME tokens (plain HTTP), refuses hosts the TLS
//! certificate does not cover (421) and finds the route (404); the policy step runs; a route
//! that redirects to HTTPS answers here; a body over the route's limit is 413. What passes has
//! its upstream head written into `out`.

use super::answer::Answer;
use super::record::{Exchange, Text, span_of};
use super::{Client, Req, head};
use crate::access;
use crate::client::ClientIo;
use crate::headers::{self, Forwarding};
use crate::route::{self, HostName, Target};
use crate::worker::Worker;
use ringway_core::balance::stats::RouteEvent;
use ringway_proto::{BodyFraming, HEADER_SLOTS, Method, Request, parse_request};

/// ACME HTTP-01 challenge paths (RFC 8555 §8.3).
const ACME_PREFIX: &[u8] = b"/.well-known/acme-challenge/";

/// Parses and checks the head `c.rb.buf[..head_len]`; `Ok`: the request and its route, with
/// the upstream head in `out`. `Err`: the proxy's own answer.
pub(super) fn run<S: ClientIo>(
    w: &Worker,
    c: &Client<S>,
    head_len: usize,
    ex: &mut Exchange,
    out: &mut Vec<u8>,
) -> Result<(Req, Target), Answer> {
    let s = &w.settings;
    let buf = &c.rb.buf[..head_len];
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let r = parse_request(buf, &s.head, &mut slots)
        .map_err(|e| Answer::error(e.status(), head::reason(e)).closing())?;
    let mut req = Req {
        method: r.method,
        version: r.version,
        meta: r.meta,
    };
    note_request(ex, buf, &r);
    access(w, c, ex, &r);
    let host = route_host(c, &r)?;
    ex.host = host;
    let has_body = req.meta.framing != BodyFraming::None;
    if let Some(a) = acme::<S>(w, &r, has_body) {
        return Err(a);
    }
    // TLS: the Host must be one this connection's certificate was chosen for (RFC 9110
    // §15.5.20): a browser reusing a connection for another name gets 421 and retries.
    if let Some(tls) = c.io.io.tls()
        && !tls.allows_host(host.as_str())
    {
        w.stats.misdirected.inc();
        return Err(Answer::error(421, "misdirected").closing_if(has_body));
    }
    // The choice is for the moment the request began: no clock read of its own.
    let chooser = w.chooser(ex.started());
    let resolved = route::resolve(
        &w.routes,
        &host,
        &r,
        ex.client_ip,
        &chooser,
        s.body_bytes_max,
    );
    let Some(target) = resolved else {
        return Err(Answer::error(404, "no_route").closing_if(has_body));
    };
    ex.target = Some(target);
    super::policy::run::<S>(w, &r, &host, target, ex, has_body)?;
    if !S::TLS && target.redirect_https {
        return Err(redirect(w, &r, &host, req.method)?.closing_if(has_body));
    }
    if let BodyFraming::Length(n) = req.meta.framing
        && n > target.body_bytes_max
    {
        return Err(Answer::error(413, "body_too_large").closing());
    }
    let upstream = match target.pick {
        Ok(c) => c.addr,
        Err(u) => {
            // Policy and redirects had their say: only requests that would go upstream
            // learn that nothing can take them.
            w.route_event(target.stats, RouteEvent::Unavailable);
            return Err(Answer::unavailable(u.reason()).closing_if(has_body));
        }
    };
    req.meta.upgrade = upgrade_allowed(w, &r, &req);
    headers::write_upstream_request(
        out,
        buf,
        &r,
        &Forwarding {
            peer_ip: c.peer.ip(),
            trusted: c.trusted,
            proto: if S::TLS { b"https" } else { b"http" },
            request_id: ex.request_id(),
            upgrade: req.meta.upgrade,
            upgrade_protocols: &s.upgrade_protocols,
            untrusted_strip: &s.untrusted_strip,
            host_fallback: host.as_bytes(),
            strip_expect: true,
            upstream,
            visitor_id: ex.ids.visitor(),
            session_id: ex.ids.session(),
        },
    );
    Ok((req, target))
}

/// The log's view of the request: method, path, user agent; and how answers are written.
fn note_request(ex: &mut Exchange, buf: &[u8], r: &Request<'_, '_>) {
    ex.method = span_of(buf, r.method_raw).unwrap_or((0, 0));
    ex.path = Text::of(buf, r.path());
    ex.head_request = r.method == Method::Head;
    ex.keep_alive = r.meta.keep_alive;
    if let Some(ua) = r.header("user-agent") {
        ex.user_agent = span_of(buf, ua).unwrap_or((0, 0));
    }
    ex.json = r
        .header("accept")
        .is_some_and(|a| memchr::memmem::find(a, b"application/json").is_some());
}

/// Access: who is asking, under which request id.
fn access<S: ClientIo>(w: &Worker, c: &Client<S>, ex: &mut Exchange, r: &Request<'_, '_>) {
    let s = &w.settings;
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
        ex.set_request_id(id);
    }
}

/// The host the request is routed by: its Host (or absolute-form authority); for HTTP/1.0
/// without one, over TLS the server name (as nginx picks the server by SNI, so the request is
/// held to what the certificate covers and never falls through to the default route; none:
/// refused), on plain HTTP none (the default route).
fn route_host<S: ClientIo>(c: &Client<S>, r: &Request<'_, '_>) -> Result<HostName, Answer> {
    let bad_host = || Answer::error(400, "bad_host").closing();
    match (r.authority(), c.io.io.tls()) {
        (Some(a), _) => HostName::parse(a).ok_or_else(bad_host),
        (None, Some(tls)) => tls
            .sni
            .as_deref()
            .and_then(|n| HostName::parse(n.as_bytes()))
            .ok_or_else(bad_host),
        (None, None) => Ok(HostName::empty()),
    }
}

/// ACME HTTP-01 tokens are answered from the store before any redirect or route, so
/// certificates can be issued for hosts that redirect everything to HTTPS.
fn acme<S: ClientIo>(w: &Worker, r: &Request<'_, '_>, has_body: bool) -> Option<Answer> {
    if S::TLS {
        return None;
    }
    let token = std::str::from_utf8(r.path().strip_prefix(ACME_PREFIX)?).ok()?;
    let mut answer = Vec::new();
    if !w.acme.answer(token, &mut answer) {
        return None;
    }
    w.stats.acme_answers.inc();
    Some(Answer::bytes(200, "acme_challenge", b"text/plain", answer).closing_if(has_body))
}

/// The redirect of a plain-HTTP request to HTTPS: 301 keeps GET and HEAD, 308 every other
/// method and its body. Without a host (HTTP/1.0) there is no authority to redirect to:
/// `https://` followed by a path `//evil.example/` would send the client to evil.example.
fn redirect(
    w: &Worker,
    r: &Request<'_, '_>,
    host: &HostName,
    method: Method,
) -> Result<Answer, Answer> {
    if host.as_bytes().is_empty() {
        return Err(Answer::error(400, "bad_host").closing());
    }
    let status = if matches!(method, Method::Get | Method::Head) {
        301
    } else {
        308
    };
    w.stats.https_redirects.inc();
    let mut location = Vec::with_capacity(8 + host.as_bytes().len() + r.target.len());
    location.extend_from_slice(b"https://");
    location.extend_from_slice(host.as_bytes());
    if let Some(port) = w.settings.https_redirect_port {
        location.push(b':');
        ringway_proto::write::push_u64(&mut location, u64::from(port));
    }
    // `OPTIONS *` asks about the server, not a resource: the same question there.
    match r.target {
        b"*" => location.push(b'/'),
        _ => r.origin_target().write_to(&mut location),
    }
    Ok(Answer {
        cacheable: true,
        ..Answer::redirect(status, "https_redirect", location)
    })
}

/// Whether the request is forwarded as an upgrade. Upgrades carry no body; one that claims one
/// is forwarded as a plain request. Only the configured protocols open a tunnel (never h2c:
/// its streams would skip routing and policy); for any other the Upgrade is removed and the
/// request goes up as it is.
fn upgrade_allowed(w: &Worker, r: &Request<'_, '_>, req: &Req) -> bool {
    if !(req.meta.upgrade && req.meta.framing == BodyFraming::None) {
        return false;
    }
    let allowed = r
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("upgrade"))
        .any(|h| headers::upgrade_allowed(h.value, &w.settings.upgrade_protocols));
    if !allowed {
        w.stats.upgrades_refused.inc();
    }
    allowed
}
