//! Property tests for what a byte fuzzer reaches slowly: structured inputs built from the
//! pieces that matter (path tokens, header lines, chunk sizes), run through the same targets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;

/// Path pieces servers resolve differently.
fn path_token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        ";",
        ";x=1",
        "a",
        "wp-admin",
        "%77",
        "%25",
        "%252e",
        "%zz",
        "%00",
        "%c0%af",
        "%e0%80%ae",
        "%3B",
        "%C3%A9",
        "?",
        "A",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn paths_agree_with_the_reference(tokens in prop::collection::vec(path_token(), 0..24)) {
        let path = format!("/{}", tokens.concat());
        ringway_fuzz::path(path.as_bytes());
    }

    #[test]
    fn chunked_bodies_round_trip(
        body in prop::collection::vec(any::<u8>(), 0..2000),
        sizes in prop::collection::vec(1usize..300, 1..20),
        seed in any::<u8>(),
    ) {
        let mut enc = Vec::new();
        let mut rest = &body[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            ringway_proto::chunked::write_chunk_size(n, &mut enc);
            enc.extend_from_slice(&rest[..n]);
            enc.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        enc.extend_from_slice(b"0\r\n\r\n");
        let mut input = vec![seed];
        input.extend_from_slice(&enc);
        ringway_fuzz::chunked(&input);
    }

    #[test]
    fn request_heads_rewrite_to_the_same_request(
        method in prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "OPTIONS", "DELETE"]),
        target in prop::sample::select(vec!["/", "/a?b=c", "http://h.test", "http://h.test?q", "http://h.test/p", "*"]),
        fields in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "Host", "Connection", "Content-Length", "Transfer-Encoding", "Expect", "Upgrade",
                    "X-Forwarded-For", "X_Forwarded_For", "Forwarded", "X-Real-IP", "Cookie",
                    "TE", "Keep-Alive", "X-App", "HTTP2-Settings", "True-Client-IP",
                ]),
                prop::sample::select(vec![
                    "h.test", "close", "keep-alive", "upgrade, x-app", "host", "5", "0", "chunked",
                    "100-continue", "websocket", "h2c", "1.2.3.4", "a=b", "trailers", "",
                ]),
            ),
            0..10,
        ),
        version in prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        seed in any::<u8>(),
    ) {
        let mut head = format!("{method} {target} {version}\r\n");
        for (n, v) in &fields {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut input = vec![seed];
        input.extend_from_slice(head.as_bytes());
        ringway_fuzz::request_head(&input);
    }
}
