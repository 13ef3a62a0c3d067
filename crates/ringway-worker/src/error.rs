//! Errors of one exchange: which side failed, how, and whether the request may be retried; and
//! the reason phrases of the statuses the proxy answers with (the pages: `proxy::answer`).

use std::fmt;
use std::io;

/// Which side of the proxy an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// What went wrong.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No bytes within the configured time.
    Timeout,
    /// The peer closed the connection (EOF) where more was expected.
    Closed,
    /// The peer reset the connection or another socket error happened.
    Io,
    /// The peer broke HTTP framing.
    Protocol,
    /// TCP connect refused or unreachable.
    ConnectRefused,
    /// TCP connect did not finish in time.
    ConnectTimeout,
    /// The request body is larger than the route allows.
    BodyTooLarge,
    /// The peer moved bytes slower than its rate floor, or past its total deadline.
    TooSlow,
    /// The upstream sent more interim (1xx) responses, or for longer, than allowed.
    InterimLimit,
    /// Every usable endpoint is at its connection limit and its queue is full (or the wait
    /// for room ended).
    Saturated,
}

/// An exchange failure. Like pingora's errors, it says which side failed and whether sending
/// the request again is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyError {
    pub side: Side,
    pub kind: ErrorKind,
    /// Nothing of the request could have been processed by the upstream (it failed on a reused
    /// connection before any response byte), so an idempotent request may be sent again.
    pub retry_safe: bool,
}

impl ProxyError {
    pub fn new(side: Side, kind: ErrorKind) -> Self {
        Self {
            side,
            kind,
            retry_safe: false,
        }
    }

    pub fn client(kind: ErrorKind) -> Self {
        Self::new(Side::Client, kind)
    }

    pub fn upstream(kind: ErrorKind) -> Self {
        Self::new(Side::Upstream, kind)
    }

    pub fn retry_safe(mut self, yes: bool) -> Self {
        self.retry_safe = yes;
        self
    }

    /// Status for the client when nothing of the response has been sent yet.
    pub fn status(&self) -> u16 {
        match (self.side, self.kind) {
            (_, ErrorKind::BodyTooLarge) => 413,
            (Side::Client, ErrorKind::Timeout | ErrorKind::TooSlow) => 408,
            (Side::Client, _) => 400,
            (Side::Upstream, ErrorKind::Timeout | ErrorKind::ConnectTimeout) => 504,
            (_, ErrorKind::Saturated) => 503,
            (Side::Upstream, _) => 502,
        }
    }

    /// Short machine-readable reason for logs.
    pub fn reason(&self) -> &'static str {
        match (self.side, self.kind) {
            (Side::Client, ErrorKind::Timeout) => "client_timeout",
            (Side::Client, ErrorKind::TooSlow) => "client_too_slow",
            (Side::Client, ErrorKind::Closed) => "client_closed",
            (Side::Client, ErrorKind::Io) => "client_io",
            (Side::Client, ErrorKind::Protocol) => "client_bad_framing",
            (_, ErrorKind::BodyTooLarge) => "body_too_large",
            (Side::Upstream, ErrorKind::Timeout) => "upstream_timeout",
            (Side::Upstream, ErrorKind::Closed) => "upstream_closed",
            (Side::Upstream, ErrorKind::Io) => "upstream_io",
            (Side::Upstream, ErrorKind::Protocol) => "upstream_bad_response",
            (Side::Upstream, ErrorKind::ConnectRefused) => "upstream_connect_failed",
            (Side::Upstream, ErrorKind::ConnectTimeout) => "upstream_connect_timeout",
            (Side::Upstream, ErrorKind::InterimLimit) => "upstream_interim_limit",
            (_, ErrorKind::Saturated) => "endpoint_limit",
            _ => "proxy_error",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ProxyError {}

/// How an I/O step failed.
#[derive(Debug)]
pub enum IoFail {
    Timeout,
    /// Below the peer's rate floor (see `crate::pace`).
    TooSlow,
    /// EOF where bytes were expected.
    Closed,
    /// The socket error, for `Debug` in traces.
    Io(#[allow(dead_code)] io::Error),
}

impl IoFail {
    pub fn on(self, side: Side) -> ProxyError {
        let kind = match self {
            IoFail::Timeout => ErrorKind::Timeout,
            IoFail::TooSlow => ErrorKind::TooSlow,
            IoFail::Closed => ErrorKind::Closed,
            IoFail::Io(_) => ErrorKind::Io,
        };
        ProxyError::new(side, kind)
    }
}

impl From<io::Error> for IoFail {
    fn from(e: io::Error) -> Self {
        IoFail::Io(e)
    }
}

/// Reason phrase for the statuses the proxy itself sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        301 => "Moved Permanently",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(
            ProxyError::upstream(ErrorKind::ConnectTimeout).status(),
            504
        );
        assert_eq!(
            ProxyError::upstream(ErrorKind::ConnectRefused).status(),
            502
        );
        assert_eq!(ProxyError::upstream(ErrorKind::Timeout).status(), 504);
        assert_eq!(ProxyError::client(ErrorKind::Timeout).status(), 408);
        assert_eq!(ProxyError::client(ErrorKind::BodyTooLarge).status(), 413);
    }
}
