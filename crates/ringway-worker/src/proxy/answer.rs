//! The answers the proxy writes itself, in one catalogue: error pages, redirects, ACME tokens,
//! 421, 429, challenge pages and passes. Phases build an [`Answer`]; the exit of the exchange
//! writes it once, with the close decision made there (so an answer on a connection's last
//! allowed request says `Connection: close` like every other).

use crate::error::reason_phrase;
use ringway_proto::HeadWriter;

/// Retry-After of a 503 for a route with no usable endpoint: about one ejection's length.
const UNAVAILABLE_RETRY_AFTER_S: u32 = 5;

/// What follows the head of an answer.
#[derive(Debug)]
pub(crate) enum Body {
    /// The shared error page: HTML, or JSON when the client asked for it; both carry the
    /// request id so a user can quote it.
    ErrorPage,
    /// A body of this type (an ACME token, the 429 text, a challenge page).
    Bytes {
        content_type: &'static [u8],
        bytes: Vec<u8>,
    },
    /// A redirect to `location` (no body), setting a cookie if asked.
    Redirect {
        location: Vec<u8>,
        set_cookie: Option<Vec<u8>>,
    },
}

/// A response the proxy writes itself.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    /// For the log (`ip_denied`, `https_redirect`, `bad_framing`...).
    pub reason: &'static str,
    pub body: Body,
    pub retry_after_s: Option<u32>,
    /// The answer may be cached (a redirect to HTTPS); others say `Cache-Control: no-store`.
    pub cacheable: bool,
    /// The connection must close after it: the request's body is unread, or its framing
    /// cannot be trusted.
    pub must_close: bool,
    /// When closing, drain what the client still sends for a moment first (so the answer is
    /// not destroyed by a reset). Not for clients too slow to finish a head.
    pub drain: bool,
}

impl Answer {
    /// The error page for `status`.
    pub fn error(status: u16, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            body: Body::ErrorPage,
            retry_after_s: None,
            cacheable: false,
            must_close: false,
            drain: true,
        }
    }

    /// 503 because no endpoint of the route can take the request (`reason` says why): the
    /// client may try again soon, when an ejection ends or a check passes.
    pub fn unavailable(reason: &'static str) -> Self {
        Self {
            retry_after_s: Some(UNAVAILABLE_RETRY_AFTER_S),
            ..Self::error(503, reason)
        }
    }

    /// A body of `content_type`.
    pub fn bytes(
        status: u16,
        reason: &'static str,
        content_type: &'static [u8],
        bytes: Vec<u8>,
    ) -> Self {
        Self {
            body: Body::Bytes {
                content_type,
                bytes,
            },
            ..Self::error(status, reason)
        }
    }

    /// A redirect to `location`.
    pub fn redirect(status: u16, reason: &'static str, location: Vec<u8>) -> Self {
        Self {
            body: Body::Redirect {
                location,
                set_cookie: None,
            },
            ..Self::error(status, reason)
        }
    }

    /// The connection closes after this answer (unread body, untrusted framing).
    pub fn closing(mut self) -> Self {
        self.must_close = true;
        self
    }

    /// Closes only if `yes`.
    pub fn closing_if(mut self, yes: bool) -> Self {
        self.must_close |= yes;
        self
    }

    /// Writes the whole answer into `out`: the head, and the body unless the request was HEAD
    /// (the head then says what the body would be).
    pub fn write(
        &self,
        out: &mut Vec<u8>,
        request_id: &[u8],
        json: bool,
        head_only: bool,
        close: bool,
    ) {
        let mut page = Vec::new();
        let (mut location, mut set_cookie) = (None, None);
        let (content_type, body): (Option<&[u8]>, &[u8]) = match &self.body {
            Body::ErrorPage => {
                error_page(&mut page, self.status, request_id, json);
                let t: &[u8] = if json {
                    b"application/json"
                } else {
                    b"text/html; charset=utf-8"
                };
                (Some(t), &page)
            }
            Body::Bytes {
                content_type,
                bytes,
            } => (Some(content_type), bytes),
            Body::Redirect {
                location: l,
                set_cookie: c,
            } => {
                (location, set_cookie) = (Some(l), c.as_ref());
                (None, b"")
            }
        };
        let mut w = HeadWriter::new(out);
        w.status_line(self.status, reason_phrase(self.status).as_bytes());
        if let Some(l) = location {
            w.header(b"Location", l);
        }
        if let Some(c) = set_cookie {
            w.header(b"Set-Cookie", c);
        }
        if let Some(s) = self.retry_after_s {
            w.header_u64(b"Retry-After", u64::from(s));
        }
        if let Some(t) = content_type {
            w.header(b"Content-Type", t);
        }
        w.header_u64(b"Content-Length", body.len() as u64);
        w.header(b"X-Request-ID", request_id);
        if !self.cacheable {
            w.header(b"Cache-Control", b"no-store");
        }
        if close {
            w.header(b"Connection", b"close");
        }
        w.finish();
        if !head_only {
            out.extend_from_slice(body);
        }
    }
}

/// The error page's body.
fn error_page(body: &mut Vec<u8>, status: u16, request_id: &[u8], json: bool) {
    let reason = reason_phrase(status);
    let code = |b: &mut Vec<u8>| ringway_proto::write::push_u64(b, u64::from(status));
    if json {
        body.extend_from_slice(b"{\"status\":");
        code(body);
        body.extend_from_slice(b",\"error\":\"");
        body.extend_from_slice(reason.as_bytes());
        body.extend_from_slice(b"\",\"request_id\":\"");
        body.extend_from_slice(request_id);
        body.extend_from_slice(b"\"}\n");
    } else {
        body.extend_from_slice(b"<!doctype html><html><head><title>");
        code(body);
        body.push(b' ');
        body.extend_from_slice(reason.as_bytes());
        body.extend_from_slice(b"</title></head><body><h1>");
        code(body);
        body.push(b' ');
        body.extend_from_slice(reason.as_bytes());
        body.extend_from_slice(b"</h1><p>Request ID: <code>");
        body.extend_from_slice(request_id);
        body.extend_from_slice(b"</code></p></body></html>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(a: &Answer, json: bool, head_only: bool, close: bool) -> String {
        let mut out = Vec::new();
        a.write(&mut out, b"rid-1", json, head_only, close);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pages_carry_request_id_and_say_when_they_close() {
        let s = text(&Answer::error(502, "upstream_io"), true, false, true);
        assert!(s.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(s.contains("Connection: close\r\n") && s.contains("Cache-Control: no-store\r\n"));
        assert!(
            s.ends_with("{\"status\":502,\"error\":\"Bad Gateway\",\"request_id\":\"rid-1\"}\n")
        );
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let s = text(&Answer::error(404, "no_route"), false, false, false);
        assert!(s.contains("<code>rid-1</code>") && !s.contains("Connection: close"));
    }

    #[test]
    fn head_requests_get_the_head_alone() {
        let a = Answer::bytes(
            429,
            "rate_limited",
            b"text/plain; charset=utf-8",
            b"Too Many\n".to_vec(),
        );
        let s = text(&a, false, true, false);
        assert!(
            s.ends_with("\r\n\r\n") && s.contains("Content-Length: 9\r\n"),
            "{s}"
        );
    }

    #[test]
    fn redirects_may_be_cached() {
        let s = text(
            &Answer::redirect(301, "https_redirect", b"https://a.test/".to_vec()),
            false,
            false,
            false,
        );
        assert!(s.contains("Location: https://a.test/\r\n") && s.contains("Content-Length: 0\r\n"));
        let a = Answer {
            cacheable: true,
            ..Answer::redirect(301, "https_redirect", b"https://a.test/".to_vec())
        };
        assert!(!text(&a, false, false, false).contains("Cache-Control"));
    }
}

#[cfg(test)]
mod size {
    #[test]
    fn an_answer_stays_small() {
        // Phases return it by value in their `Err`.
        assert!(std::mem::size_of::<super::Answer>() <= 96);
    }
}
