//! The chunked decoder, the PROXY protocol parser, the challenge cookies and the log spool's
//! frame reader.

use crate::{Rng, seeded};
use ringway_core::policy::CookieBinding;
use ringway_proto::ChunkedDecoder;
use ringway_proto::chunked::{CHUNK_DATA_END, ChunkError, LAST_CHUNK, write_chunk_size};
use ringway_worker::challenge::{self, Keys, PASS_COOKIE};
use ringway_worker::proxy_protocol;
use std::net::IpAddr;

/// How a decode ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The body ended after this many input bytes.
    Done(usize),
    Error(ChunkError),
    /// The input ended first.
    NeedMore,
}

/// Decodes `input` delivered in pieces of the sizes `piece` picks: the data, and how it ended.
fn decode_pieces(input: &[u8], mut piece: impl FnMut() -> usize) -> (Vec<u8>, End) {
    let mut dec = ChunkedDecoder::new();
    let mut data = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + piece()).min(input.len());
        // Within a piece, call again until it is used up, as the pump does.
        while pos < end {
            match dec.decode(&input[pos..end]) {
                Err(e) => return (data, End::Error(e)),
                Ok(d) => {
                    if let Some((s, l)) = d.data {
                        data.extend_from_slice(&input[pos + s..pos + s + l]);
                    }
                    pos += d.consumed;
                    if d.done {
                        assert!(dec.is_done());
                        return (data, End::Done(pos));
                    }
                    if d.consumed == 0 {
                        break;
                    }
                }
            }
        }
        pos = pos.max(end);
    }
    (data, End::NeedMore)
}

/// The chunked decoder: the same data, end and errors however the input is split; a body it
/// decodes, re-encoded in other chunk sizes, decodes to the same data.
pub fn chunked(data: &[u8]) {
    let (seed, input) = seeded(data);
    let whole = decode_pieces(input, || usize::MAX);
    let mut rng = Rng::new(&[seed]);
    let split = decode_pieces(input, || rng.size(16));
    let bytewise = decode_pieces(input, || 1);
    assert_eq!(whole, split, "split decode disagrees");
    assert_eq!(whole, bytewise, "byte-by-byte decode disagrees");
    let (body, End::Done(_)) = whole else { return };
    let mut enc = Vec::new();
    let mut rest = &body[..];
    let mut rng = Rng::new(&[seed, 1]);
    while !rest.is_empty() {
        let n = rng.size(rest.len()).min(rest.len());
        write_chunk_size(n, &mut enc);
        enc.extend_from_slice(&rest[..n]);
        enc.extend_from_slice(CHUNK_DATA_END);
        rest = &rest[n..];
    }
    enc.extend_from_slice(LAST_CHUNK);
    assert_eq!(
        decode_pieces(&enc, || usize::MAX),
        (body, End::Done(enc.len()))
    );
}

/// The PROXY protocol parser: a header it accepts is accepted alone and its every prefix is
/// "need more"; what it refuses stays refused whatever follows.
pub fn proxy_protocol(data: &[u8]) {
    match proxy_protocol::parse(data) {
        Ok(Some((src, n))) => {
            assert!(n > 0 && n <= data.len());
            assert_eq!(proxy_protocol::parse(&data[..n]), Ok(Some((src, n))));
            for k in [0, n / 2, n.saturating_sub(1)] {
                if k < n {
                    assert_eq!(
                        proxy_protocol::parse(&data[..k]),
                        Ok(None),
                        "prefix {k} of {n}"
                    );
                }
            }
        }
        Ok(None) => {
            assert!(
                data.len() < proxy_protocol::V2_BYTES_MAX + 16,
                "needs more past the limit"
            );
        }
        Err(_) => {
            let mut more = data.to_vec();
            more.extend_from_slice(b" TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
            assert!(
                proxy_protocol::parse(&more).is_err(),
                "refused bytes became valid"
            );
        }
    }
}

/// Challenge cookies: the Cookie parser on any header, pass cookies that nobody without the
/// key can make, and a real pass that any one-byte change breaks.
pub fn challenge_cookie(data: &[u8]) {
    let keys = Keys::new(&["fuzz-key-fuzz-key-fuzz-key-fuzz-key".to_string()]);
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let now = 1_800_000_000;
    let headers = [data];
    if let Some(v) = ringway_worker::policy::cookie(&headers, PASS_COOKIE) {
        assert!(v.len() <= data.len());
        assert!(!challenge::pass_valid(
            v,
            &keys,
            b"a.test",
            ip,
            CookieBinding::Network,
            now
        ));
    }
    for binding in [CookieBinding::Address, CookieBinding::Network] {
        assert!(!challenge::pass_valid(
            data, &keys, b"a.test", ip, binding, now
        ));
    }
    let mut pass = Vec::new();
    challenge::issue_pass(
        &mut pass,
        &keys,
        b"a.test",
        ip,
        CookieBinding::Address,
        now,
        600,
    );
    assert!(challenge::pass_valid(
        &pass,
        &keys,
        b"a.test",
        ip,
        CookieBinding::Address,
        now
    ));
    let header = [format!(
        "a=1; {}={}; b",
        String::from_utf8_lossy(PASS_COOKIE),
        String::from_utf8_lossy(&pass)
    )];
    let found = ringway_worker::policy::cookie(&[header[0].as_bytes()], PASS_COOKIE);
    assert_eq!(found, Some(&pass[..]));
    if let (Some(&at), Some(&flip)) = (data.first(), data.get(1)) {
        let i = usize::from(at) % pass.len();
        let mut bad = pass.clone();
        // Never bit 0x20 alone: hex digits may be read in either case.
        bad[i] ^= (flip | 1) & 0xdf;
        assert!(!challenge::pass_valid(
            &bad,
            &keys,
            b"a.test",
            ip,
            CookieBinding::Address,
            now
        ));
    }
}

/// The log spool's frame reader: see `spool_frames` in the spool module.
pub fn spool_frames(data: &[u8]) {
    crate::spool::frames(data);
}
