//! Bodies both ways: lengths, chunked, close-delimited, large.

use crate::support::origin::{checksum, pattern};
use crate::support::*;
use std::io::Write;

#[test]
fn chunked_request_and_chunked_response() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    let mut req =
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut expect = Vec::new();
    for i in 0..200u32 {
        let piece = format!("piece-{i};");
        req.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
        expect.extend_from_slice(piece.as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.send(&req);
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.chunked,
        "a chunked upstream response stays chunked for an HTTP/1.1 client"
    );
    assert_eq!(r.body, expect);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(rec.header("transfer-encoding"), Some("chunked"));
    assert_eq!(rec.body_len, expect.len() as u64);

    let r = c.get("app.test", "/source-chunked/300000");
    assert!(r.chunked);
    assert_eq!(r.body.len(), 300_000);
    assert!(
        r.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i as u64))
    );
}

#[test]
fn close_delimited_response_becomes_chunked_for_http11() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    let r = c.get("app.test", "/source-close/100000");
    assert!(r.chunked);
    assert_eq!(r.body.len(), 100_000);
    assert!(
        r.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i as u64))
    );
    // The client connection survives; the upstream one did not.
    assert_eq!(c.get("app.test", "/x").text(), "ok /x");
}

#[test]
fn large_bodies_both_ways_in_small_writes() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    const N: u64 = 8 * 1024 * 1024;
    c.send(
        format!("POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: {N}\r\n\r\n").as_bytes(),
    );
    let mut sum = 0u64;
    let mut off = 0u64;
    let mut buf = vec![0u8; 7777];
    while off < N {
        let k = ((N - off) as usize).min(buf.len());
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        c.stream.write_all(&buf[..k]).unwrap();
        sum = checksum(sum, &buf[..k], off);
        off += k as u64;
    }
    let r = c.read_response(false).unwrap();
    assert_eq!(r.text(), format!("len={N} sum={sum}"));
    let r = c.get("app.test", &format!("/source/{N}"));
    assert_eq!(r.body.len() as u64, N);
    assert_eq!(checksum(0, &r.body, 0), {
        let v: Vec<u8> = (0..N).map(pattern).collect();
        checksum(0, &v, 0)
    });
}

#[test]
fn early_upstream_answer_to_an_upload_is_relayed() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    const N: usize = 32 * 1024 * 1024;
    c.send(
        format!("POST /early/413 HTTP/1.1\r\nHost: app.test\r\nContent-Length: {N}\r\n\r\n")
            .as_bytes(),
    );
    // Keep sending until the proxy stops taking bytes.
    let chunk = vec![b'u'; 64 * 1024];
    let mut sent = 0;
    while sent < N {
        if c.try_send(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.text(), "early");
}
