//! Request and response heads: scanner, parser and the head the proxy writes on.

use crate::{Rng, seeded};
use ringway_proto::head::HeadScanner;
use ringway_proto::{
    HEADER_SLOTS, HeadError, HeadLimits, Method, ResponseFraming, parse_request, parse_response,
    scan_head,
};
use ringway_worker::headers::{
    ClientFraming, Forwarding, NameSet, ResponseEdit, write_client_response, write_upstream_request,
};

/// The default limits, or tight ones (so the fuzzer reaches every limit quickly).
fn limits(seed: u8) -> HeadLimits {
    if seed & 1 == 0 {
        HeadLimits::default()
    } else {
        HeadLimits {
            request_line_bytes_max: 64 + usize::from(seed >> 1),
            header_bytes_max: 256 + 4 * usize::from(seed),
            headers_count_max: 1 + usize::from(seed >> 4),
        }
    }
}

/// Limits wide enough for any head the proxy writes from one that passed `limits`.
fn wide() -> HeadLimits {
    HeadLimits {
        request_line_bytes_max: 1 << 20,
        header_bytes_max: 1 << 20,
        headers_count_max: HEADER_SLOTS,
    }
}

/// Scans `input` fed in random pieces, as reads deliver it.
fn scan_in_pieces(input: &[u8], l: &HeadLimits, rng: &mut Rng) -> Result<Option<usize>, HeadError> {
    let mut scanner = HeadScanner::new();
    let mut end = 0;
    loop {
        end = (end + rng.size(64)).min(input.len());
        match scanner.scan(&input[..end], l) {
            Ok(None) if end < input.len() => {}
            other => return other,
        }
    }
}

/// Scanning in pieces agrees with one pass; returns the head length if complete.
fn scan_agrees(input: &[u8], l: &HeadLimits, seed: u8) -> Option<usize> {
    let whole = scan_head(input, l);
    let pieces = scan_in_pieces(input, l, &mut Rng::new(&[seed]));
    assert_eq!(whole, pieces, "incremental scan disagrees with one pass");
    whole.ok().flatten()
}

/// What the scanner is responsible for: a head it accepted never fails these in the parser.
fn scanner_owned(e: HeadError) -> bool {
    matches!(
        e,
        HeadError::RequestLineTooLong
            | HeadError::HeadTooLarge
            | HeadError::BareLineBreak
            | HeadError::Nul
    )
}

/// Request heads: scan, parse, rewrite for the upstream, parse the rewrite.
pub fn request_head(data: &[u8]) {
    let (seed, input) = seeded(data);
    let l = limits(seed);
    let Some(n) = scan_agrees(input, &l, seed) else {
        return;
    };
    let head = &input[..n];
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let r = match parse_request(head, &l, &mut slots) {
        Ok(r) => r,
        Err(e) => {
            assert!(
                !scanner_owned(e),
                "the scanner accepted a head the parser calls {e:?}"
            );
            assert!(
                (400..600).contains(&e.status()),
                "{e:?} has no error status"
            );
            return;
        }
    };
    assert!(r.head_len <= n);
    let strip = NameSet::new(ringway_core::config::UNTRUSTED_STRIP_DEFAULT);
    let upgrade_protocols = [Box::from(&b"websocket"[..])];
    let mut out = Vec::new();
    write_upstream_request(
        &mut out,
        head,
        &r,
        &Forwarding {
            peer_ip: "192.0.2.1".parse().unwrap(),
            trusted: seed & 2 != 0,
            proto: b"https",
            request_id: b"0123456789abcdef0123456789abcdef",
            upgrade: r.meta.upgrade && seed & 4 != 0,
            upgrade_protocols: &upgrade_protocols,
            untrusted_strip: &strip,
            host_fallback: b"",
            strip_expect: true,
            upstream: "127.0.0.1:3000".parse().unwrap(),
            visitor_id: b"",
            session_id: b"",
        },
    );
    // What goes upstream is one well-formed request with the same meaning: nothing smuggled.
    let mut slots2 = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    assert_eq!(
        scan_head(&out, &wide()),
        Ok(Some(out.len())),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let up = parse_request(&out, &wide(), &mut slots2).unwrap_or_else(|e| {
        panic!(
            "rewrite does not parse ({e:?}): {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(up.method_raw, r.method_raw);
    assert_eq!(up.target, &r.origin_target().to_vec()[..]);
    assert_eq!(up.meta.framing, r.meta.framing);
    assert!(up.meta.host.is_some(), "no Host upstream");
    assert!(!up.meta.expect_continue);
    assert_eq!(up.path(), r.path());
}

/// Response heads: scan, parse, rewrite for the client, parse the rewrite.
pub fn response_head(data: &[u8]) {
    let (seed, input) = seeded(data);
    let l = limits(seed);
    let method = [Method::Get, Method::Head, Method::Post, Method::Options][usize::from(seed >> 6)];
    let Some(n) = scan_agrees(input, &l, seed) else {
        return;
    };
    let head = &input[..n];
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let resp = match parse_response(head, method, &l, &mut slots) {
        Ok(r) => r,
        Err(e) => {
            assert!(
                !scanner_owned(e),
                "the scanner accepted a head the parser calls {e:?}"
            );
            return;
        }
    };
    let m = resp.meta;
    if m.status == 101 {
        return;
    }
    // The framing the proxy would choose for an HTTP/1.1 client.
    let (framing, want) = match m.framing {
        ResponseFraming::None => {
            let keep = method == Method::Head || m.status == 304;
            let zero = !keep && m.status != 204 && m.status >= 200;
            (
                ClientFraming::None {
                    keep_length: keep,
                    zero_length: zero,
                },
                ResponseFraming::None,
            )
        }
        ResponseFraming::Length(n) => (ClientFraming::Length(n), ResponseFraming::Length(n)),
        ResponseFraming::Chunked | ResponseFraming::Close => {
            (ClientFraming::Chunked, ResponseFraming::Chunked)
        }
    };
    let mut out = Vec::new();
    write_client_response(
        &mut out,
        head,
        &resp,
        &ResponseEdit {
            framing,
            close: seed & 2 != 0,
            keep_alive_10: false,
            upgrade: false,
            request_id: Some(b"rid"),
            security: &[],
            hsts: None,
            set_cookies: b"",
        },
    );
    let mut slots2 = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let back = parse_response(&out, method, &wide(), &mut slots2).unwrap_or_else(|e| {
        panic!(
            "rewrite does not parse ({e:?}): {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(back.status, m.status);
    // Interim responses are relayed with their own rules; their framing is always none.
    if m.status >= 200 {
        assert_eq!(
            back.meta.framing,
            want,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
}
