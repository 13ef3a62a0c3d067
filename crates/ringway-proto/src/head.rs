//! Request and response heads: finding their end, parsing, and the framing rules of RFC 9112.
//!
//! Parsing is two steps. [`HeadScanner`] looks at bytes as they arrive and finds the end of the
//! head, rejecting bare CR, bare LF and NUL on the way (`httparse` accepts bare LF, and a proxy
//! that accepts what its upstream refuses can be used for smuggling). It resumes where it left
//! off, so a client that dribbles a head one byte at a time costs linear work. Once the head is
//! complete, [`parse_request`] or [`parse_response`] runs `httparse` over it and validates the
//! fields that decide framing and routing.

use crate::token::{eq_ic, is_token, list_items, parse_content_length, split_host_port};
use httparse::Header;

/// Size limits applied while a head is read. Values come from the proxy config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest accepted request line (or status line), CRLF included. Over it: 414.
    pub request_line_bytes_max: usize,
    /// Largest accepted head, request line and final CRLF included. Over it: 431.
    pub header_bytes_max: usize,
    /// Most header fields accepted. Over it: 431. At most [`crate::HEADER_SLOTS`].
    pub headers_count_max: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            request_line_bytes_max: 8 * 1024,
            header_bytes_max: 32 * 1024,
            headers_count_max: 100,
        }
    }
}

/// Why a head was refused. [`HeadError::status`] is the answer the proxy sends (for a request)
/// or the reason it answers 502 (for an upstream response).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request line longer than the limit")]
    RequestLineTooLong,
    #[error("header block larger than the limit")]
    HeadTooLarge,
    #[error("more header fields than the limit")]
    TooManyHeaders,
    #[error("bare CR or LF in the head")]
    BareLineBreak,
    #[error("NUL byte in the head")]
    Nul,
    #[error("malformed {0}")]
    Syntax(&'static str),
    #[error("unsupported HTTP version")]
    Version,
    #[error("missing Host header")]
    MissingHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("invalid Host header")]
    InvalidHost,
    #[error("invalid Content-Length")]
    InvalidContentLength,
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    #[error("Content-Length together with Transfer-Encoding")]
    LengthWithTransferEncoding,
    #[error("Transfer-Encoding whose last coding is not chunked")]
    ChunkedNotLast,
    #[error("transfer coding other than chunked")]
    UnsupportedCoding,
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    TransferEncodingInHttp10,
    #[error("unsupported Expect value")]
    Expectation,
    #[error("invalid Connection header")]
    InvalidConnection,
    #[error("invalid request target")]
    InvalidTarget,
    #[error("CONNECT is not supported")]
    Connect,
    #[error("invalid status code")]
    Status,
}

impl HeadError {
    /// The status a proxy answers a request refused for this reason with.
    pub fn status(self) -> u16 {
        match self {
            HeadError::RequestLineTooLong => 414,
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Version => 505,
            HeadError::UnsupportedCoding => 501,
            HeadError::Expectation => 417,
            HeadError::Connect => 405,
            _ => 400,
        }
    }
}

/// Finds the end of a head in a growing buffer, resuming where the last call stopped.
///
/// The caller keeps one scanner per head and calls [`HeadScanner::scan`] after each read with the
/// whole buffer so far (the head starts at offset 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadScanner {
    /// Bytes already checked.
    pos: usize,
    /// Start of the line being read.
    line_start: usize,
    /// Whether the start line (request or status line) has ended.
    start_line_done: bool,
}

impl HeadScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns `Ok(Some(len))` once `buf[..len]` holds a complete head (ending in CRLF CRLF),
    /// `Ok(None)` if more bytes are needed, and an error as soon as the bytes cannot be a valid
    /// head or break a limit. Empty lines before a request line are skipped as RFC 9112 §2.2
    /// allows (a client may send CRLF after a body).
    pub fn scan(&mut self, buf: &[u8], limits: &HeadLimits) -> Result<Option<usize>, HeadError> {
        let scan_end = buf.len().min(limits.header_bytes_max);
        let mut i = self.pos;
        loop {
            // Bytes past a limit are never looked at, so the first error by position wins
            // however the head was split into reads (the fuzzer found a NUL past the request
            // line limit answered 400 in one read and 414 in two).
            let end = if self.start_line_done {
                scan_end
            } else {
                scan_end.min(self.line_start + limits.request_line_bytes_max)
            };
            if i >= end {
                break;
            }
            // Jump to the next interesting byte: CR, LF or NUL.
            let Some(off) = memchr::memchr3(b'\r', b'\n', 0, &buf[i..end]) else {
                i = end;
                break;
            };
            i += off;
            match buf[i] {
                0 => return Err(HeadError::Nul),
                b'\r' => {
                    if i + 1 >= end {
                        // The LF may come with the next read, or lies past a limit (then the
                        // limit's error below, whatever that byte is).
                        break;
                    }
                    if buf[i + 1] != b'\n' {
                        return Err(HeadError::BareLineBreak);
                    }
                    i += 1;
                    // The LF is handled on the next turn.
                }
                _ => {
                    // LF: must follow CR.
                    if i == 0 || buf[i - 1] != b'\r' {
                        return Err(HeadError::BareLineBreak);
                    }
                    let line_len = i + 1 - self.line_start;
                    if line_len == 2 {
                        // Empty line.
                        if self.start_line_done {
                            self.pos = i + 1;
                            return Ok(Some(i + 1));
                        }
                        // Leading empty line before the start line: skip it.
                    } else if !self.start_line_done {
                        if line_len > limits.request_line_bytes_max {
                            return Err(HeadError::RequestLineTooLong);
                        }
                        self.start_line_done = true;
                    }
                    self.line_start = i + 1;
                    i += 1;
                }
            }
        }
        self.pos = i;
        if !self.start_line_done && buf.len() - self.line_start > limits.request_line_bytes_max {
            return Err(HeadError::RequestLineTooLong);
        }
        debug_assert!(self.pos <= buf.len());
        if buf.len() >= limits.header_bytes_max {
            return Err(HeadError::HeadTooLarge);
        }
        Ok(None)
    }
}

/// Convenience for a head that is already complete in `buf`: scans from the start.
pub fn scan_head(buf: &[u8], limits: &HeadLimits) -> Result<Option<usize>, HeadError> {
    HeadScanner::new().scan(buf, limits)
}

/// Request methods the proxy treats specially; everything else is carried as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Trace,
    Patch,
    Connect,
    Other,
}

impl Method {
    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"TRACE" => Method::Trace,
            b"PATCH" => Method::Patch,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// RFC 9110 §9.2.2: a request with such a method may be sent again after a failure.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Options
                | Method::Trace
                | Method::Put
                | Method::Delete
        )
    }
}

/// HTTP/1.0 or HTTP/1.1: the only versions this codec accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    Http10,
    Http11,
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes (never 0: a zero length is `None`).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// How the body of a response is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD, 1xx, 204, 304, or a zero length).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// What the proxy needs to know about a request beyond its raw fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestMeta {
    pub framing: BodyFraming,
    /// Whether the client allows the connection to stay open after this exchange.
    pub keep_alive: bool,
    /// Index of the Host header, if any.
    pub host: Option<usize>,
    /// Authority from an absolute-form target (`http://host/path`): it overrides Host for
    /// routing (RFC 9112 §3.2.2). Byte range into the target.
    pub target_authority: Option<(usize, usize)>,
    /// Start of the origin-form part of the target (0 unless the target is absolute-form).
    pub path_start: usize,
    /// `Expect: 100-continue` was sent (and the request is HTTP/1.1).
    pub expect_continue: bool,
    /// The client asks to switch protocols (Connection: upgrade and an Upgrade header).
    pub upgrade: bool,
    /// The Connection header lists options other than close/keep-alive/upgrade, so headers named
    /// by them must be dropped too (see [`Request::is_connection_option`]).
    pub extra_connection_options: bool,
}

/// A request target in origin-form: `rest` with a `/` in front when `slash` is set (the
/// absolute-form target had no path). Borrowed, so the request line can be written without
/// building the target first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginTarget<'b> {
    pub slash: bool,
    pub rest: &'b [u8],
}

impl OriginTarget<'_> {
    /// Appends the target to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        if self.slash {
            out.push(b'/');
        }
        out.extend_from_slice(self.rest);
    }

    /// The target as one owned byte string.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.rest.len() + 1);
        self.write_to(&mut v);
        v
    }
}

/// A parsed request head borrowing the receive buffer.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    pub method: Method,
    pub method_raw: &'b [u8],
    pub target: &'b [u8],
    pub version: Version,
    pub headers: &'h [Header<'b>],
    /// Length of the head in bytes, final CRLF included (leading empty lines included too).
    pub head_len: usize,
    pub meta: RequestMeta,
}

fn map_httparse(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::HeaderName => HeadError::Syntax("header name"),
        httparse::Error::HeaderValue => HeadError::Syntax("header value"),
        // The scanner refuses bare CR and LF before any parse: here it means something other
        // than CRLF where a line must end ("GET / HTTP/1.1: x").
        httparse::Error::NewLine => HeadError::Syntax("line end"),
        httparse::Error::Status => HeadError::Status,
        httparse::Error::Token => HeadError::Syntax("request line"),
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::Version => HeadError::Version,
    }
}

/// Collected while walking the header list once.
#[derive(Default)]
struct FieldScan {
    content_length: Option<u64>,
    /// Saw Transfer-Encoding at all.
    te_seen: bool,
    /// The last coding of the last Transfer-Encoding field.
    te_last_chunked: bool,
    /// Some coding other than a final "chunked" appeared.
    te_other: bool,
    host: Option<usize>,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    conn_other: bool,
    upgrade_header: bool,
    expect_continue: bool,
}

impl FieldScan {
    fn walk(headers: &[Header<'_>], is_request: bool) -> Result<FieldScan, HeadError> {
        let mut s = FieldScan::default();
        for (i, h) in headers.iter().enumerate() {
            let name = h.name.as_bytes();
            match name.len() {
                4 if is_request && eq_ic(name, b"host") => {
                    if s.host.is_some() {
                        return Err(HeadError::DuplicateHost);
                    }
                    if split_host_port(h.value).is_none() {
                        return Err(HeadError::InvalidHost);
                    }
                    s.host = Some(i);
                }
                6 if is_request && eq_ic(name, b"expect") => {
                    if eq_ic(h.value, b"100-continue") {
                        s.expect_continue = true;
                    } else {
                        return Err(HeadError::Expectation);
                    }
                }
                7 if eq_ic(name, b"upgrade") => s.upgrade_header = true,
                10 if eq_ic(name, b"connection") => {
                    for opt in list_items(h.value) {
                        if !is_token(opt) {
                            return Err(HeadError::InvalidConnection);
                        }
                        if eq_ic(opt, b"close") {
                            s.conn_close = true;
                        } else if eq_ic(opt, b"keep-alive") {
                            s.conn_keep_alive = true;
                        } else if eq_ic(opt, b"upgrade") {
                            s.conn_upgrade = true;
                        } else {
                            s.conn_other = true;
                        }
                    }
                }
                14 if eq_ic(name, b"content-length") => {
                    if s.content_length.is_some() {
                        return Err(HeadError::DuplicateContentLength);
                    }
                    s.content_length =
                        Some(parse_content_length(h.value).ok_or(HeadError::InvalidContentLength)?);
                }
                17 if eq_ic(name, b"transfer-encoding") => {
                    let mut any = false;
                    for coding in list_items(h.value) {
                        any = true;
                        if s.te_last_chunked {
                            // Something follows "chunked": chunked applied twice or not last.
                            s.te_other = true;
                        }
                        s.te_last_chunked = eq_ic(coding, b"chunked");
                        if !s.te_last_chunked {
                            s.te_other = true;
                        }
                    }
                    if !any {
                        return Err(HeadError::ChunkedNotLast);
                    }
                    s.te_seen = true;
                }
                _ => {}
            }
        }
        Ok(s)
    }
}

/// Parses a complete request head (`buf` ends with the CRLF CRLF found by [`HeadScanner`]).
///
/// `slots` must hold at least `limits.headers_count_max` entries; only that many are used.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    limits: &HeadLimits,
    slots: &'h mut [Header<'b>],
) -> Result<Request<'h, 'b>, HeadError> {
    let count_max = limits.headers_count_max.min(slots.len());
    let mut req = httparse::Request::new(&mut slots[..count_max]);
    let parsed = req.parse(buf).map_err(|e| match e {
        // httparse reads "GET /a b HTTP/1.1" as version "b HTTP/1.1": that is a malformed
        // request line (400), not a version we do not speak (505).
        httparse::Error::Version if !ends_in_http_version(buf) => HeadError::Syntax("request line"),
        e => map_httparse(e),
    })?;
    let head_len = match parsed {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err(HeadError::Syntax("incomplete head")),
    };
    let (Some(method_raw), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Syntax("request line"));
    };
    let headers: &'h [Header<'b>] = req.headers;
    let version = if minor == 1 {
        Version::Http11
    } else {
        Version::Http10
    };
    let method = Method::from_bytes(method_raw.as_bytes());
    if method == Method::Connect {
        return Err(HeadError::Connect);
    }
    let target = target.as_bytes();

    // Request target forms (RFC 9112 §3.2): origin-form, absolute-form, asterisk-form.
    let mut target_authority = None;
    let mut path_start = 0;
    if target.first() == Some(&b'/') {
        // origin-form
    } else if target == b"*" {
        if method != Method::Options {
            return Err(HeadError::InvalidTarget);
        }
    } else {
        let rest = strip_prefix_ic(target, b"http://")
            .or_else(|| strip_prefix_ic(target, b"https://"))
            .ok_or(HeadError::InvalidTarget)?;
        let auth_start = target.len() - rest.len();
        let auth_len = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        let authority = &rest[..auth_len];
        if authority.is_empty() || split_host_port(authority).is_none() {
            return Err(HeadError::InvalidTarget);
        }
        target_authority = Some((auth_start, auth_len));
        path_start = auth_start + auth_len;
    }

    let f = FieldScan::walk(headers, true)?;
    if version == Version::Http11 && f.host.is_none() {
        return Err(HeadError::MissingHost);
    }
    let framing = if f.te_seen {
        if version == Version::Http10 {
            return Err(HeadError::TransferEncodingInHttp10);
        }
        if f.content_length.is_some() {
            return Err(HeadError::LengthWithTransferEncoding);
        }
        if !f.te_last_chunked {
            return Err(HeadError::ChunkedNotLast);
        }
        if f.te_other {
            return Err(HeadError::UnsupportedCoding);
        }
        BodyFraming::Chunked
    } else {
        match f.content_length {
            None | Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    };
    let keep_alive = match version {
        Version::Http11 => !f.conn_close,
        Version::Http10 => f.conn_keep_alive && !f.conn_close,
    };
    Ok(Request {
        method,
        method_raw: method_raw.as_bytes(),
        target,
        version,
        headers,
        head_len,
        meta: RequestMeta {
            framing,
            keep_alive,
            host: f.host,
            target_authority,
            path_start,
            expect_continue: f.expect_continue && version == Version::Http11,
            upgrade: f.conn_upgrade && f.upgrade_header,
            extra_connection_options: f.conn_other,
        },
    })
}

/// Whether the request line is `method SP target SP HTTP/d.d`.
fn ends_in_http_version(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line = &buf[start..];
    let end = memchr::memchr(b'\r', line).unwrap_or(line.len());
    let line = &line[..end];
    if line.iter().filter(|&&b| b == b' ').count() != 2 {
        return false;
    }
    match line.rsplit(|&b| b == b' ').next() {
        Some(v) => {
            v.len() == 8
                && v.starts_with(b"HTTP/")
                && v[5].is_ascii_digit()
                && v[6] == b'.'
                && v[7].is_ascii_digit()
        }
        None => false,
    }
}

fn strip_prefix_ic<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && eq_ic(&s[..prefix.len()], prefix)).then(|| &s[prefix.len()..])
}

impl<'b> Request<'_, 'b> {
    /// The host the request is for: the absolute-form authority if any, else the Host header.
    pub fn authority(&self) -> Option<&'b [u8]> {
        if let Some((start, len)) = self.meta.target_authority {
            return Some(&self.target[start..start + len]);
        }
        self.meta.host.map(|i| self.headers[i].value)
    }

    /// The target in origin-form (path and query), as sent to the upstream. An absolute-form
    /// target with an empty path (`http://a.example?x=1`) is `/?x=1` (RFC 9112 §3.2.1: the
    /// path of an origin-form target is never empty).
    pub fn origin_target(&self) -> OriginTarget<'b> {
        let rest = &self.target[self.meta.path_start..];
        // `OPTIONS http://a.example` asks about the server: forwarded as `OPTIONS *`
        // (RFC 9112 §3.2.4).
        if self.method == Method::Options && self.meta.target_authority.is_some() && rest.is_empty()
        {
            return OriginTarget {
                slash: false,
                rest: b"*",
            };
        }
        OriginTarget {
            // Only an absolute-form target can lack its slash (`OPTIONS *` is sent as it is).
            slash: self.meta.target_authority.is_some() && rest.first() != Some(&b'/'),
            rest,
        }
    }

    /// Path without the query string (`/` when the target has none), for logs and policies.
    pub fn path(&self) -> &'b [u8] {
        let t = &self.target[self.meta.path_start..];
        if t.is_empty() && self.method == Method::Options && self.meta.target_authority.is_some() {
            return b"*";
        }
        let p = match memchr::memchr(b'?', t) {
            Some(i) => &t[..i],
            None => t,
        };
        if p.is_empty() { b"/" } else { p }
    }

    /// The query string without its `?` (empty when there is none).
    pub fn query(&self) -> &'b [u8] {
        let t = &self.target[self.meta.path_start..];
        match memchr::memchr(b'?', t) {
            Some(i) => &t[i + 1..],
            None => &[],
        }
    }

    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        find_header(self.headers, name)
    }

    /// Whether the Connection header names `name` as a connection option (so it is hop-by-hop).
    pub fn is_connection_option(&self, name: &[u8]) -> bool {
        self.meta.extra_connection_options && is_connection_option(self.headers, name)
    }
}

fn find_header<'b>(headers: &[Header<'b>], name: &str) -> Option<&'b [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn is_connection_option(headers: &[Header<'_>], name: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| list_items(h.value).any(|opt| eq_ic(opt, name)))
}

/// What the proxy needs to know about an upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseMeta {
    pub status: u16,
    pub version: Version,
    pub framing: ResponseFraming,
    /// Whether the upstream allows reusing the connection after this response.
    pub keep_alive: bool,
    /// 101 with Connection: upgrade and an Upgrade header.
    pub upgrade: bool,
    pub extra_connection_options: bool,
    /// A Content-Length above 0 or a Transfer-Encoding was sent, whether or not the status
    /// allows a body (a 204 that says so may send one anyway).
    pub declares_body: bool,
}

/// A parsed response head borrowing the upstream receive buffer.
#[derive(Debug)]
pub struct Response<'h, 'b> {
    pub status: u16,
    pub reason: &'b [u8],
    pub headers: &'h [Header<'b>],
    pub head_len: usize,
    pub meta: ResponseMeta,
}

/// Parses a complete response head to a request made with `method`.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    method: Method,
    limits: &HeadLimits,
    slots: &'h mut [Header<'b>],
) -> Result<Response<'h, 'b>, HeadError> {
    let count_max = limits.headers_count_max.min(slots.len());
    let mut res = httparse::Response::new(&mut slots[..count_max]);
    let head_len = match res.parse(buf).map_err(map_httparse)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err(HeadError::Syntax("incomplete head")),
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else {
        return Err(HeadError::Status);
    };
    if !(100..=599).contains(&status) {
        return Err(HeadError::Status);
    }
    let reason = res.reason.unwrap_or("").as_bytes();
    let headers: &'h [Header<'b>] = res.headers;
    let version = if minor == 1 {
        Version::Http11
    } else {
        Version::Http10
    };
    let f = FieldScan::walk(headers, false)?;

    // RFC 9112 §6.3, in order.
    let bodyless =
        method == Method::Head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodyless {
        ResponseFraming::None
    } else if f.te_seen {
        if f.content_length.is_some() {
            // Allowed to win by the RFC, but a sender doing both is confused or hostile.
            return Err(HeadError::LengthWithTransferEncoding);
        }
        if version == Version::Http10 {
            return Err(HeadError::TransferEncodingInHttp10);
        }
        if !f.te_last_chunked {
            return Err(HeadError::ChunkedNotLast);
        }
        if f.te_other {
            return Err(HeadError::UnsupportedCoding);
        }
        ResponseFraming::Chunked
    } else {
        match f.content_length {
            Some(0) => ResponseFraming::None,
            Some(n) => ResponseFraming::Length(n),
            None => ResponseFraming::Close,
        }
    };
    let keep_alive = framing != ResponseFraming::Close
        && match version {
            Version::Http11 => !f.conn_close,
            Version::Http10 => f.conn_keep_alive && !f.conn_close,
        };
    Ok(Response {
        status,
        reason,
        headers,
        head_len,
        meta: ResponseMeta {
            status,
            version,
            framing,
            keep_alive,
            upgrade: status == 101 && f.conn_upgrade && f.upgrade_header,
            extra_connection_options: f.conn_other,
            declares_body: f.te_seen || f.content_length.is_some_and(|n| n > 0),
        },
    })
}

impl<'b> Response<'_, 'b> {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        find_header(self.headers, name)
    }

    /// Whether the Connection header names `name` as a connection option.
    pub fn is_connection_option(&self, name: &[u8]) -> bool {
        self.meta.extra_connection_options && is_connection_option(self.headers, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HEADER_SLOTS;

    fn limits() -> HeadLimits {
        HeadLimits::default()
    }

    /// Scans and parses `raw` as one complete request.
    fn req(raw: &[u8]) -> Result<RequestMeta, HeadError> {
        let end = scan_head(raw, &limits())?.ok_or(HeadError::Syntax("incomplete"))?;
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        parse_request(&raw[..end], &limits(), &mut slots).map(|r| r.meta)
    }

    fn status_of(raw: &[u8]) -> u16 {
        match req(raw) {
            Ok(_) => 200,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn simple_get() {
        let m = req(b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap();
        assert_eq!(m.framing, BodyFraming::None);
        assert!(m.keep_alive);
        assert_eq!(m.host, Some(0));
    }

    #[test]
    fn scanner_resumes_and_finds_end() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        let mut s = HeadScanner::new();
        for n in 1..raw.len() - 4 {
            assert_eq!(s.scan(&raw[..n], &limits()), Ok(None), "at {n}");
        }
        assert_eq!(s.scan(&raw[..], &limits()), Ok(Some(raw.len() - 4)));
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(scan_head(raw, &limits()), Ok(Some(raw.len())));
        assert!(req(raw).is_ok());
    }

    #[test]
    fn bare_lf_and_cr_and_nul_are_rejected() {
        assert_eq!(
            req(b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
            Err(HeadError::BareLineBreak)
        );
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\n\r\n"),
            Err(HeadError::BareLineBreak)
        );
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"),
            Err(HeadError::BareLineBreak)
        );
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nX: a\0b\r\nHost: a\r\n\r\n"),
            Err(HeadError::Nul)
        );
        // Rejected as soon as seen, without waiting for the end of the head.
        assert_eq!(
            scan_head(b"GET / HTTP/1.1\nHost", &limits()),
            Err(HeadError::BareLineBreak)
        );
        assert_eq!(scan_head(b"\n", &limits()), Err(HeadError::BareLineBreak));
    }

    #[test]
    fn obs_fold_and_space_before_colon_are_rejected() {
        assert_eq!(
            status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n"),
            400
        );
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"), 400);
        assert_eq!(
            status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX\t: b\r\n\r\n"),
            400
        );
    }

    #[test]
    fn invalid_bytes_in_names_and_values_are_rejected() {
        assert_eq!(
            status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX(y): b\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x7f\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n"),
            400
        );
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .framing,
            BodyFraming::Length(5)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .framing,
            BodyFraming::None
        );
        for bad in [
            &b"+5"[..],
            b"-1",
            b"5, 6",
            b"5,5",
            b"",
            b"99999999999999999999999",
            b"0x5",
            b"5 5",
        ] {
            let mut raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ".to_vec();
            raw.extend_from_slice(bad);
            raw.extend_from_slice(b"\r\n\r\n");
            assert_eq!(
                req(&raw),
                Err(HeadError::InvalidContentLength),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            Err(HeadError::DuplicateContentLength)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n"),
            Err(HeadError::DuplicateContentLength)
        );
    }

    #[test]
    fn transfer_encoding_rules() {
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .framing,
            BodyFraming::Chunked
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
                .unwrap()
                .framing,
            BodyFraming::Chunked
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Err(HeadError::LengthWithTransferEncoding)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::LengthWithTransferEncoding)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Err(HeadError::ChunkedNotLast)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Err(HeadError::ChunkedNotLast)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"),
            Err(HeadError::ChunkedNotLast)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HeadError::UnsupportedCoding)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"),
            Err(HeadError::UnsupportedCoding)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n"),
            Err(HeadError::ChunkedNotLast)
        );
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n"),
            Err(HeadError::ChunkedNotLast)
        );
        assert_eq!(
            req(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::TransferEncodingInHttp10)
        );
    }

    #[test]
    fn host_rules() {
        assert_eq!(req(b"GET / HTTP/1.1\r\n\r\n"), Err(HeadError::MissingHost));
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
            Err(HeadError::DuplicateHost)
        );
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
            Err(HeadError::InvalidHost)
        );
        // HTTP/1.0 may omit Host.
        let m = req(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(m.host, None);
        assert!(!m.keep_alive);
        assert!(
            req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn versions() {
        assert_eq!(status_of(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status_of(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status_of(b"GET / FOO/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
    }

    #[test]
    fn connection_and_upgrade() {
        let m = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!m.keep_alive);
        let m =
            req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap();
        assert!(m.upgrade);
        let m = req(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(!m.upgrade);
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a b\r\n\r\n"),
            Err(HeadError::InvalidConnection)
        );
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_request(raw, &limits(), &mut slots).unwrap();
        assert!(r.is_connection_option(b"X-Secret"));
        assert!(!r.is_connection_option(b"Host"));
    }

    #[test]
    fn expect() {
        assert!(
            req(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .unwrap()
                .expect_continue
        );
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n"),
            417
        );
    }

    #[test]
    fn targets() {
        let raw = b"GET http://Example.com:80/x?y HTTP/1.1\r\nHost: other\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_request(raw, &limits(), &mut slots).unwrap();
        assert_eq!(r.authority(), Some(&b"Example.com:80"[..]));
        assert_eq!(r.origin_target().to_vec(), b"/x?y");
        assert_eq!(r.path(), b"/x");
        assert_eq!(r.query(), b"y");
        // An absolute-form target without a path has the path "/" (RFC 9112 §3.2.1).
        for (raw, target, query) in [
            (
                &b"GET http://a.example?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
                &b"/?x=1"[..],
                &b"x=1"[..],
            ),
            (
                b"GET http://a.example HTTP/1.1\r\nHost: a\r\n\r\n",
                b"/",
                b"",
            ),
        ] {
            let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
            let r = parse_request(raw, &limits(), &mut slots).unwrap();
            assert_eq!(r.origin_target().to_vec(), target);
            assert_eq!(r.path(), b"/");
            assert_eq!(r.query(), query);
        }
        assert_eq!(status_of(b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET x HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status_of(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        let raw = b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_request(raw, &limits(), &mut slots).unwrap();
        assert_eq!(r.origin_target().to_vec(), b"*");
        let raw = b"OPTIONS http://a.example HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_request(raw, &limits(), &mut slots).unwrap();
        assert_eq!(r.origin_target().to_vec(), b"*");
        assert_eq!(status_of(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"), 405);
    }

    #[test]
    fn limits_are_enforced() {
        let l = limits();
        let mut long = b"GET /".to_vec();
        long.resize(l.request_line_bytes_max + 10, b'a');
        assert_eq!(scan_head(&long, &l), Err(HeadError::RequestLineTooLong));
        long.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(scan_head(&long, &l), Err(HeadError::RequestLineTooLong));

        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        while big.len() < l.header_bytes_max {
            big.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(scan_head(&big, &l), Err(HeadError::HeadTooLarge));
        assert_eq!(HeadError::HeadTooLarge.status(), 431);

        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..l.headers_count_max {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(req(&many), Err(HeadError::TooManyHeaders));
        assert_eq!(HeadError::TooManyHeaders.status(), 431);
    }

    fn resp(raw: &[u8], method: Method) -> Result<ResponseMeta, HeadError> {
        let end = scan_head(raw, &limits())?.ok_or(HeadError::Syntax("incomplete"))?;
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        parse_response(&raw[..end], method, &limits(), &mut slots).map(|r| r.meta)
    }

    #[test]
    fn response_framing() {
        let m = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Get).unwrap();
        assert_eq!(m.framing, ResponseFraming::Length(3));
        assert!(m.keep_alive);
        let m = resp(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            Method::Head,
        )
        .unwrap();
        assert_eq!(m.framing, ResponseFraming::None);
        for code in [100, 103, 204, 304] {
            let raw = format!("HTTP/1.1 {code} X\r\nContent-Length: 3\r\n\r\n");
            assert_eq!(
                resp(raw.as_bytes(), Method::Get).unwrap().framing,
                ResponseFraming::None
            );
        }
        let m = resp(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
        )
        .unwrap();
        assert_eq!(m.framing, ResponseFraming::Chunked);
        let m = resp(b"HTTP/1.1 200 OK\r\n\r\n", Method::Get).unwrap();
        assert_eq!(m.framing, ResponseFraming::Close);
        assert!(!m.keep_alive);
        let m = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::Get).unwrap();
        assert!(!m.keep_alive);
        let m = resp(
            b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            Method::Get,
        )
        .unwrap();
        assert!(m.upgrade);
    }

    #[test]
    fn bad_response_framing() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 99 Low\r\n\r\n",
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
        ] {
            assert!(
                resp(raw, Method::Get).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
