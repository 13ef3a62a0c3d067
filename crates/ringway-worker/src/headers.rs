//! Head rewriting in both directions.
//!
//! Upstream-bound: hop-by-hop headers and the client's framing headers are dropped (the proxy
//! frames the body itself), forwarding headers are set from what the proxy knows, and unchanged
//! lines are copied as runs. Client-bound: the same removals, the security headers the app did
//! not set, the request id, and the framing the proxy chose for the client.

use crate::settings::AddedHeader;
use ringway_core::route::Hsts;
use ringway_proto::token::{eq_ic, is_hop_by_hop};
use ringway_proto::{BodyFraming, HeadWriter, Request, Response};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

/// What the proxy adds to a request bound upstream.
#[derive(Debug)]
pub struct Forwarding<'a> {
    pub peer_ip: IpAddr,
    /// The peer is a trusted proxy: its X-Forwarded-* values are kept (and appended to).
    pub trusted: bool,
    /// `http` or `https`.
    pub proto: &'static [u8],
    pub request_id: &'a [u8],
    /// Forward the upgrade request (Connection: upgrade, and Upgrade naming only the
    /// protocols in `upgrade_protocols`).
    pub upgrade: bool,
    pub upgrade_protocols: &'a [Box<[u8]>],
    /// Removed from requests of untrusted peers (`headers.untrusted_strip`).
    pub untrusted_strip: &'a NameSet,
    /// Host to send when the request had none (HTTP/1.0): the name it was routed by (the
    /// TLS server name), else the upstream address.
    pub host_fallback: &'a [u8],
    /// The proxy answered `Expect: 100-continue` itself; the upstream must not see it.
    pub strip_expect: bool,
    /// Used as Host for an HTTP/1.0 request that had none (and no TLS server name).
    pub upstream: SocketAddr,
    /// X-Visitor-ID and X-Session-ID to send (empty: none).
    pub visitor_id: &'a [u8],
    pub session_id: &'a [u8],
}

fn is_named(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && eq_ic(name, lower)
}

/// Whether `name` is `lower` ignoring case, with `_` taken for `-`: CGI-style servers (PHP,
/// WSGI, Rack) map `X_Forwarded_For` and `X-Forwarded-For` to the same variable, so a spoofed
/// underscore spelling must go wherever the real name goes.
#[inline]
fn is_named_folded(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name.iter().zip(lower).all(|(&a, &b)| {
            let a = if a == b'_' {
                b'-'
            } else {
                a.to_ascii_lowercase()
            };
            a == b
        })
}

/// Headers the proxy sets itself on upstream requests, so any incoming copy is dropped.
fn is_forwarding(name: &[u8]) -> bool {
    match name.len() {
        // Visitor and session ids come from the proxy's cookies, never from the client.
        12 => {
            is_named_folded(name, b"x-request-id")
                || is_named_folded(name, b"x-visitor-id")
                || is_named_folded(name, b"x-session-id")
        }
        15 => is_named_folded(name, b"x-forwarded-for"),
        16 => is_named_folded(name, b"x-forwarded-host"),
        17 => is_named_folded(name, b"x-forwarded-proto"),
        _ => false,
    }
}

/// Longest header name a [`NameSet`] holds (longer names are refused by the config check).
pub const NAME_SET_NAME_BYTES_MAX: usize = 63;

/// A set of header names, matched ignoring case and with `_` taken for `-`. The lengths of
/// the names are kept as a bit mask, so most headers of a request are passed over after one
/// test: this runs for every header of every request from an untrusted peer.
#[derive(Debug, Clone, Default)]
pub struct NameSet {
    /// Lower case, `-` for `_`.
    names: Box<[Box<[u8]>]>,
    /// Bit `n` is set when some name is `n` bytes long.
    lengths: u64,
}

impl NameSet {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<[u8]>>(names: I) -> Self {
        let mut lengths = 0u64;
        let names: Vec<Box<[u8]>> = names
            .into_iter()
            .map(|n| {
                let n: Box<[u8]> = n
                    .as_ref()
                    .iter()
                    .map(|&b| {
                        if b == b'_' {
                            b'-'
                        } else {
                            b.to_ascii_lowercase()
                        }
                    })
                    .collect();
                if (1..=NAME_SET_NAME_BYTES_MAX).contains(&n.len()) {
                    lengths |= 1 << n.len();
                }
                n
            })
            .filter(|n| (1..=NAME_SET_NAME_BYTES_MAX).contains(&n.len()))
            .collect();
        Self {
            names: names.into(),
            lengths,
        }
    }

    #[inline]
    pub fn contains(&self, name: &[u8]) -> bool {
        name.len() <= NAME_SET_NAME_BYTES_MAX
            && self.lengths & (1 << name.len()) != 0
            && self.names.iter().any(|n| is_named_folded(name, n))
    }
}

/// Header names the proxy itself sets or relies on in an upstream request: a client's
/// `Connection` options can never remove them (`Connection: host` would otherwise send the
/// request without its Host).
fn is_proxy_owned(name: &[u8]) -> bool {
    is_named(name, b"host") || is_forwarding(name)
}

/// Whether an `Upgrade` value names a protocol in `allowed` (lower case names; a version
/// after `/` is ignored: `websocket/13` is `websocket`).
pub fn upgrade_allowed(value: &[u8], allowed: &[Box<[u8]>]) -> bool {
    ringway_proto::token::list_items(value).any(|p| protocol_allowed(p, allowed))
}

fn protocol_allowed(protocol: &[u8], allowed: &[Box<[u8]>]) -> bool {
    let name = protocol.split(|&b| b == b'/').next().unwrap_or(protocol);
    allowed.iter().any(|a| is_named(name, a))
}

/// Appends the upstream request head for `req` (parsed from `head`) to `out`.
pub fn write_upstream_request(
    out: &mut Vec<u8>,
    head: &[u8],
    req: &Request<'_, '_>,
    f: &Forwarding<'_>,
) {
    let absolute = req.meta.target_authority.is_some();
    let mut w = HeadWriter::new(out);
    w.request_line(req.method_raw, req.origin_target());
    w.copy_headers(head, req.headers, |h| {
        let n = h.name.as_bytes();
        !(is_hop_by_hop(n)
            || is_forwarding(n)
            // Only meaningful with an h2c upgrade, which is never forwarded.
            || is_named(n, b"http2-settings")
            || (f.strip_expect && is_named(n, b"expect"))
            || (absolute && is_named(n, b"host"))
            || (!f.trusted && f.untrusted_strip.contains(n))
            || (req.is_connection_option(n) && !is_proxy_owned(n)))
    });
    match req.authority() {
        Some(auth) if absolute => {
            w.header(b"Host", auth);
        }
        Some(_) => {}
        None if !f.host_fallback.is_empty() => {
            w.header(b"Host", f.host_fallback);
        }
        None => {
            w.header_with(b"Host", |o| {
                let _ = write!(o, "{}", f.upstream);
            });
        }
    }

    // X-Forwarded-For: a trusted proxy's chain is extended, anyone else's replaced.
    w.header_with(b"X-Forwarded-For", |o| {
        if f.trusted {
            for h in req
                .headers
                .iter()
                .filter(|h| is_named(h.name.as_bytes(), b"x-forwarded-for"))
            {
                o.extend_from_slice(h.value);
                o.extend_from_slice(b", ");
            }
        }
        ringway_proto::write::push_ip(o, ringway_core::cidr::canonical(f.peer_ip));
    });
    let kept = |name: &str| -> Option<&[u8]> { if f.trusted { req.header(name) } else { None } };
    w.header(
        b"X-Forwarded-Proto",
        kept("x-forwarded-proto").unwrap_or(f.proto),
    );
    if let Some(host) = kept("x-forwarded-host").or(req.authority()) {
        w.header(b"X-Forwarded-Host", host);
    }
    w.header(b"X-Request-ID", f.request_id);
    if !f.visitor_id.is_empty() {
        w.header(b"X-Visitor-ID", f.visitor_id);
    }
    if !f.session_id.is_empty() {
        w.header(b"X-Session-ID", f.session_id);
    }
    if f.upgrade {
        w.header(b"Connection", b"upgrade");
        // Only the allowed protocols: `Upgrade: h2c, websocket` goes up as `websocket`.
        w.header_with(b"Upgrade", |o| {
            let offered = req
                .headers
                .iter()
                .filter(|h| is_named(h.name.as_bytes(), b"upgrade"))
                .flat_map(|h| ringway_proto::token::list_items(h.value));
            let mut first = true;
            for p in offered.filter(|p| protocol_allowed(p, f.upgrade_protocols)) {
                if !std::mem::take(&mut first) {
                    o.extend_from_slice(b", ");
                }
                o.extend_from_slice(p);
            }
        });
    }
    match req.meta.framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            w.header_u64(b"Content-Length", n);
        }
        BodyFraming::Chunked => {
            w.header(b"Transfer-Encoding", b"chunked");
        }
    }
    w.finish();
}

/// How the proxy frames the response body for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// No body follows. `keep_length` copies the upstream's Content-Length (HEAD, 304).
    None {
        keep_length: bool,
        zero_length: bool,
    },
    Length(u64),
    Chunked,
    /// Body until the proxy closes the connection (HTTP/1.0 clients).
    Close,
}

/// What the proxy adds to a response bound to the client.
#[derive(Debug)]
pub struct ResponseEdit<'a> {
    pub framing: ClientFraming,
    /// Send `Connection: close` (and close after the response).
    pub close: bool,
    /// The client is HTTP/1.0 and the connection stays open: say so.
    pub keep_alive_10: bool,
    /// Switching protocols: keep Connection: upgrade and Upgrade.
    pub upgrade: bool,
    pub request_id: Option<&'a [u8]>,
    pub security: &'a [AddedHeader],
    /// Strict-Transport-Security to add (HTTPS responses of routes that ask for it).
    pub hsts: Option<Hsts>,
    /// `Set-Cookie: ...\r\n` lines to add (visitor and session cookies).
    pub set_cookies: &'a [u8],
}

/// Whether the response carries `name` as an end-to-end header: one its `Connection` header
/// names is dropped, so the proxy's own value (a security header, the request id) still goes
/// in its place.
fn has_header(resp: &Response<'_, '_>, name: &[u8]) -> bool {
    resp.headers
        .iter()
        .any(|h| is_named(h.name.as_bytes(), name))
        && !resp.is_connection_option(name)
}

/// Appends the client response head for `resp` (parsed from `head`) to `out`.
pub fn write_client_response(
    out: &mut Vec<u8>,
    head: &[u8],
    resp: &Response<'_, '_>,
    e: &ResponseEdit<'_>,
) {
    let keep_length = matches!(
        e.framing,
        ClientFraming::None {
            keep_length: true,
            ..
        }
    );
    let mut w = HeadWriter::new(out);
    let reason = if resp.reason.is_empty() {
        crate::error::reason_phrase(resp.status).as_bytes()
    } else {
        resp.reason
    };
    w.status_line(resp.status, reason);
    w.copy_headers(head, resp.headers, |h| {
        let n = h.name.as_bytes();
        if keep_length && is_named(n, b"content-length") {
            return true;
        }
        !(is_hop_by_hop(n)
            || resp.is_connection_option(n)
            || e.security
                .iter()
                .any(|s| s.override_app && is_named(n, &s.name)))
    });
    for s in e.security {
        if s.override_app || !has_header(resp, &s.name) {
            w.header(&s.name, &s.value);
        }
    }
    if let Some(h) = e.hsts
        && !has_header(resp, b"strict-transport-security")
    {
        w.header_with(b"Strict-Transport-Security", |o| {
            o.extend_from_slice(b"max-age=");
            ringway_proto::write::push_u64(o, u64::from(h.max_age_s));
            if h.include_subdomains {
                o.extend_from_slice(b"; includeSubDomains");
            }
            if h.preload {
                o.extend_from_slice(b"; preload");
            }
        });
    }
    for line in e.set_cookies.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"Set-Cookie: ") {
            w.header(b"Set-Cookie", v.strip_suffix(b"\r").unwrap_or(v));
        }
    }
    if let Some(id) = e.request_id
        && !has_header(resp, b"x-request-id")
    {
        w.header(b"X-Request-ID", id);
    }
    match e.framing {
        ClientFraming::None { zero_length, .. } => {
            if zero_length {
                w.header(b"Content-Length", b"0");
            }
        }
        ClientFraming::Length(n) => {
            w.header_u64(b"Content-Length", n);
        }
        ClientFraming::Chunked => {
            w.header(b"Transfer-Encoding", b"chunked");
        }
        ClientFraming::Close => {}
    }
    if e.upgrade {
        w.header(b"Connection", b"upgrade");
        if let Some(u) = resp.header("upgrade") {
            w.header(b"Upgrade", u);
        }
    } else if e.close {
        w.header(b"Connection", b"close");
    } else if e.keep_alive_10 {
        w.header(b"Connection", b"keep-alive");
    }
    w.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringway_proto::{HEADER_SLOTS, HeadLimits, Method, parse_request, parse_response};

    fn fwd(trusted: bool) -> Forwarding<'static> {
        Forwarding {
            peer_ip: "10.0.0.2".parse().unwrap(),
            trusted,
            proto: b"http",
            request_id: b"rid",
            upgrade: false,
            upgrade_protocols: Box::leak(Box::new([Box::from(&b"websocket"[..])])),
            untrusted_strip: Box::leak(Box::new(NameSet::new(
                ringway_core::config::UNTRUSTED_STRIP_DEFAULT,
            ))),
            host_fallback: b"",
            strip_expect: true,
            upstream: "127.0.0.1:9000".parse().unwrap(),
            visitor_id: b"",
            session_id: b"",
        }
    }

    fn rewrite(raw: &[u8], f: &Forwarding<'_>) -> String {
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_request(raw, &HeadLimits::default(), &mut slots).unwrap();
        let mut out = Vec::new();
        write_upstream_request(&mut out, raw, &r, f);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let s = rewrite(
            b"POST /p HTTP/1.1\r\nHost: a.com\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Request-ID: evil\r\nForwarded: for=1.1.1.1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nExpect: 100-continue\r\nContent-Length: 3\r\nX-App: ok\r\n\r\n",
            &fwd(false),
        );
        assert_eq!(
            s,
            "POST /p HTTP/1.1\r\nHost: a.com\r\nX-App: ok\r\nX-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a.com\r\nX-Request-ID: rid\r\nContent-Length: 3\r\n\r\n"
        );
    }

    #[test]
    fn trusted_forwarding_headers_are_extended() {
        let s = rewrite(
            b"GET / HTTP/1.1\r\nHost: a.com\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: b.com\r\n\r\n",
            &fwd(true),
        );
        assert!(s.contains("X-Forwarded-For: 1.2.3.4, 10.0.0.2\r\n"), "{s}");
        assert!(s.contains("X-Forwarded-Proto: https\r\n"));
        assert!(s.contains("X-Forwarded-Host: b.com\r\n"));
    }

    #[test]
    fn absolute_form_and_http10() {
        let s = rewrite(
            b"GET http://b.com/x HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n",
            &fwd(false),
        );
        assert!(s.starts_with("GET /x HTTP/1.1\r\n"));
        assert!(s.contains("Host: b.com\r\n") && !s.contains("Host: a.com"));
        assert!(s.contains("Transfer-Encoding: chunked\r\n"));
        let s = rewrite(b"GET / HTTP/1.0\r\n\r\n", &fwd(false));
        assert!(s.contains("Host: 127.0.0.1:9000\r\n"), "{s}");
    }

    #[test]
    fn response_edits() {
        let raw = b"HTTP/1.1 200 OK\r\nX-Frame-Options: DENY\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nServer: app\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_response(raw, Method::Get, &HeadLimits::default(), &mut slots).unwrap();
        let sec = vec![
            AddedHeader {
                name: (*b"X-Frame-Options").into(),
                value: (*b"SAMEORIGIN").into(),
                override_app: false,
            },
            AddedHeader {
                name: (*b"X-Content-Type-Options").into(),
                value: (*b"nosniff").into(),
                override_app: false,
            },
            AddedHeader {
                name: (*b"Server").into(),
                value: (*b"ringway").into(),
                override_app: true,
            },
        ];
        let mut out = Vec::new();
        write_client_response(
            &mut out,
            raw,
            &r,
            &ResponseEdit {
                framing: ClientFraming::Chunked,
                close: true,
                keep_alive_10: false,
                upgrade: false,
                request_id: Some(b"rid"),
                security: &sec,
                hsts: None,
                set_cookies: b"",
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nX-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\nServer: ringway\r\nX-Request-ID: rid\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }
}
