//! Malformed requests: each is answered with its status and the connection closed, and a
//! request hidden behind it (`/smuggled`) never reaches the upstream. A sentinel request on a
//! new connection proves the proxy still serves.

use crate::support::*;

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";

fn case(head: &str, body: &str) -> String {
    format!("{head}\r\n\r\n{body}{SMUGGLED}")
}

#[test]
fn malformed_requests_are_refused_and_nothing_is_smuggled() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let post = "POST /target HTTP/1.1\r\nHost: app.test";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "CL and TE",
            case(
                &format!("{post}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked"),
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "TE and CL",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked\r\nContent-Length: 6"),
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "two CLs",
            case(
                &format!("{post}\r\nContent-Length: 0\r\nContent-Length: 44"),
                "",
            ),
            400,
        ),
        (
            "same CL twice",
            case(
                &format!("{post}\r\nContent-Length: 0\r\nContent-Length: 0"),
                "",
            ),
            400,
        ),
        (
            "CL +",
            case(&format!("{post}\r\nContent-Length: +0"), ""),
            400,
        ),
        (
            "CL list",
            case(&format!("{post}\r\nContent-Length: 0, 44"), ""),
            400,
        ),
        (
            "CL empty",
            case(&format!("{post}\r\nContent-Length: "), ""),
            400,
        ),
        (
            "CL negative",
            case(&format!("{post}\r\nContent-Length: -1"), ""),
            400,
        ),
        (
            "CL overflow",
            case(
                &format!("{post}\r\nContent-Length: 18446744073709551616"),
                "",
            ),
            400,
        ),
        (
            "CL hex",
            case(&format!("{post}\r\nContent-Length: 0x0"), ""),
            400,
        ),
        (
            "TE not last",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked, identity"),
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "TE identity",
            case(&format!("{post}\r\nTransfer-Encoding: identity"), ""),
            400,
        ),
        (
            "TE xchunked",
            case(
                &format!("{post}\r\nTransfer-Encoding: xchunked"),
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "TE twice",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
                "0\r\n\r\n",
            ),
            501,
        ),
        (
            "TE gzip",
            case(
                &format!("{post}\r\nTransfer-Encoding: gzip, chunked"),
                "0\r\n\r\n",
            ),
            501,
        ),
        (
            "TE in 1.0",
            case(
                "POST /target HTTP/1.0\r\nHost: app.test\r\nTransfer-Encoding: chunked",
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "obs-fold",
            case(
                &format!("{post}\r\nTransfer-Encoding:\r\n chunked"),
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "space before colon",
            case(
                &format!("{post}\r\nTransfer-Encoding : chunked"),
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "tab before colon",
            case(&format!("{post}\r\nContent-Length\t: 0"), ""),
            400,
        ),
        (
            "bad name byte",
            case(&format!("{post}\r\nX\"Y: z"), ""),
            400,
        ),
        (
            "control byte in value",
            case(&format!("{post}\r\nX-Y: a\u{1}b"), ""),
            400,
        ),
        (
            "DEL in value",
            case(&format!("{post}\r\nX-Y: a\u{7f}b"), ""),
            400,
        ),
        (
            "NUL in value",
            case(&format!("{post}\r\nX-Y: a\0b"), ""),
            400,
        ),
        (
            "bare LF",
            format!("POST /target HTTP/1.1\nHost: app.test\nContent-Length: 0\n\n{SMUGGLED}"),
            400,
        ),
        (
            "bare LF mid-head",
            case(&format!("{post}\nContent-Length: 0"), ""),
            400,
        ),
        (
            "bare CR",
            case(&format!("{post}\rContent-Length: 0"), ""),
            400,
        ),
        ("no Host", case("GET /target HTTP/1.1\r\nX: y", ""), 400),
        (
            "two Hosts",
            case(
                "GET /target HTTP/1.1\r\nHost: app.test\r\nHost: other.test",
                "",
            ),
            400,
        ),
        (
            "bad Host",
            case("GET /target HTTP/1.1\r\nHost: app.test/x", ""),
            400,
        ),
        (
            "space in target",
            case("GET /a b HTTP/1.1\r\nHost: app.test", ""),
            400,
        ),
        (
            "bad version",
            case("GET /target HTTP/1.2\r\nHost: app.test", ""),
            505,
        ),
        (
            "chunk size junk",
            case(&format!("{post}\r\nTransfer-Encoding: chunked"), "zz\r\n"),
            400,
        ),
        (
            "chunk size 0x",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked"),
                "0x2\r\nab\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "chunk size signed",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked"),
                "+2\r\nab\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "chunk overflow",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked"),
                "fffffffffffffffff\r\n",
            ),
            400,
        ),
        (
            "chunk no CRLF after data",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked"),
                "2\r\nabXY0\r\n\r\n",
            ),
            400,
        ),
        (
            "chunk bare LF",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked"),
                "2\nab\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "chunk bad ext",
            case(
                &format!("{post}\r\nTransfer-Encoding: chunked"),
                "2;a\u{1}\r\nab\r\n0\r\n\r\n",
            ),
            400,
        ),
    ];
    for (name, bytes, want) in &cases {
        let mut c = Conn::connect(p.addr);
        let _ = c.try_send(bytes.as_bytes());
        let r = c
            .read_response(false)
            .unwrap_or_else(|e| panic!("{name}: no response: {e}"));
        assert_eq!(r.status, *want, "{name}");
        assert!(
            r.header("x-request-id").is_some(),
            "{name}: error page without request id"
        );
        assert!(
            c.is_closed(),
            "{name}: connection left open after a framing error"
        );
        // Sentinel on a new connection.
        let s = get(p.addr, "app.test", "/sentinel");
        assert_eq!(s.status, 200, "{name}: sentinel");
    }
    let paths = origin.paths();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "smuggled request reached the upstream: {paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| *p == "/sentinel").count(),
        cases.len()
    );
}

#[test]
fn a_bad_upstream_response_gets_502_and_the_connection_is_discarded() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    let r = c.get("app.test", "/bad-framing");
    assert_eq!(r.status, 502);
    // The client connection stays usable (the request had no body) and the next request opens
    // a new upstream connection.
    assert_eq!(c.get("app.test", "/next").text(), "ok /next");
    assert_eq!(origin.connections(), 2);
}

#[test]
fn a_valid_chunked_request_with_extensions_and_trailers_is_normalised() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5;name=\"v a\"\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello!");
    let r = c.get("app.test", "/trailer-chunked");
    assert_eq!(
        r.text(),
        "hello world",
        "extensions and trailers are not passed on"
    );
}
