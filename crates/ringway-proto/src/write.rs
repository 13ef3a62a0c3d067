//! Building the head sent to the other side.
//!
//! Most header lines cross the proxy unchanged, so [`HeadWriter::copy_headers`] copies runs of
//! consecutive kept lines straight from the receive buffer with one `extend_from_slice` each,
//! instead of re-serialising name and value one by one.

use httparse::Header;

/// Appends a head to a caller-owned buffer.
#[derive(Debug)]
pub struct HeadWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> HeadWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }

    /// `METHOD SP target SP HTTP/1.1 CRLF`. The proxy always speaks HTTP/1.1 to upstreams.
    pub fn request_line(&mut self, method: &[u8], target: crate::OriginTarget<'_>) -> &mut Self {
        self.out.extend_from_slice(method);
        self.out.push(b' ');
        target.write_to(self.out);
        self.out.extend_from_slice(b" HTTP/1.1\r\n");
        self
    }

    /// `HTTP/1.1 SP status SP reason CRLF`.
    pub fn status_line(&mut self, status: u16, reason: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b"HTTP/1.1 ");
        push_u64(self.out, u64::from(status));
        self.out.push(b' ');
        self.out.extend_from_slice(reason);
        self.out.extend_from_slice(b"\r\n");
        self
    }

    /// One header line.
    pub fn header(&mut self, name: &[u8], value: &[u8]) -> &mut Self {
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value);
        self.out.extend_from_slice(b"\r\n");
        self
    }

    /// One header line with a decimal value.
    pub fn header_u64(&mut self, name: &[u8], value: u64) -> &mut Self {
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b": ");
        push_u64(self.out, value);
        self.out.extend_from_slice(b"\r\n");
        self
    }

    /// A header line whose value is built by `f` (for values assembled from several pieces).
    pub fn header_with(&mut self, name: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b": ");
        f(self.out);
        self.out.extend_from_slice(b"\r\n");
        self
    }

    /// Copies the header lines for which `keep` returns true, as they were received.
    ///
    /// `head` is the buffer `headers` were parsed from (its lines end in CRLF, no obs-fold: the
    /// scanner and parser guarantee both). Consecutive kept lines are copied as one slice.
    pub fn copy_headers(
        &mut self,
        head: &[u8],
        headers: &[Header<'_>],
        mut keep: impl FnMut(&Header<'_>) -> bool,
    ) -> &mut Self {
        let mut run: Option<(usize, usize)> = None;
        for h in headers {
            if !keep(h) {
                if let Some((s, e)) = run.take() {
                    self.out.extend_from_slice(&head[s..e]);
                }
                continue;
            }
            match line_span(head, h) {
                Some((s, e)) => match run {
                    Some((rs, re)) if re == s => run = Some((rs, e)),
                    Some((rs, re)) => {
                        self.out.extend_from_slice(&head[rs..re]);
                        run = Some((s, e));
                    }
                    None => run = Some((s, e)),
                },
                None => {
                    // Not from `head`: write it out field by field.
                    if let Some((s, e)) = run.take() {
                        self.out.extend_from_slice(&head[s..e]);
                    }
                    self.header(h.name.as_bytes(), h.value);
                }
            }
        }
        if let Some((s, e)) = run {
            self.out.extend_from_slice(&head[s..e]);
        }
        self
    }

    /// Ends the head with the empty line.
    pub fn finish(&mut self) {
        self.out.extend_from_slice(b"\r\n");
    }
}

/// Where the line of header `h` starts and ends (after its CRLF) inside `head`, found from the
/// address of its name. `None` if `h` does not point into `head`.
fn line_span(head: &[u8], h: &Header<'_>) -> Option<(usize, usize)> {
    let base = head.as_ptr() as usize;
    let start = (h.name.as_ptr() as usize).checked_sub(base)?;
    let name_end = start.checked_add(h.name.len())?;
    if name_end > head.len() || head.get(name_end) != Some(&b':') {
        return None;
    }
    let lf = memchr::memchr(b'\n', &head[name_end..])?;
    Some((start, name_end + lf + 1))
}

/// Appends an IP address in its usual text form. IPv4 (the common case) is written by hand:
/// `fmt` costs several times more and this runs for every request (X-Forwarded-For).
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(*o));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Writes `bytes` as lower-case hex into `out[..2 * bytes.len()]` (no allocation).
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 15)];
    }
}

/// The decimal form of `n`, written at the end of `buf` (no allocation).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Appends the decimal form of `n`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(decimal(n, &mut digits));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HEADER_SLOTS, HeadLimits, parse_request};

    #[test]
    fn copies_runs_and_skips() {
        let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-A: 1\r\nX-B:\t2 \r\nTE: trailers\r\nX-C: 3\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
        let r = parse_request(raw, &HeadLimits::default(), &mut slots).unwrap();
        let mut out = Vec::new();
        let mut w = HeadWriter::new(&mut out);
        w.request_line(r.method_raw, r.origin_target());
        w.copy_headers(raw, r.headers, |h| {
            !crate::token::is_hop_by_hop(h.name.as_bytes())
        });
        w.header(b"X-Added", b"yes");
        w.finish();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-B:\t2 \r\nX-C: 3\r\nX-Added: yes\r\n\r\n"
        );
    }

    #[test]
    fn foreign_headers_are_serialised() {
        let raw = b"unrelated";
        let h = [Header {
            name: "X-Y",
            value: b"z",
        }];
        let mut out = Vec::new();
        HeadWriter::new(&mut out).copy_headers(raw, &h, |_| true);
        assert_eq!(out, b"X-Y: z\r\n");
    }

    #[test]
    fn ips() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.20.30.4",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip.as_bytes());
        }
    }

    #[test]
    fn numbers() {
        let mut out = Vec::new();
        push_u64(&mut out, 0);
        out.push(b' ');
        push_u64(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
        let mut out = Vec::new();
        HeadWriter::new(&mut out).status_line(204, b"No Content");
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\n");
    }
}
