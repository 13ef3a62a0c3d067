//! Upstream servers for the tests: plain std threads and sockets, one thread per connection,
//! with endpoints that misbehave on purpose.
//!
//! Endpoints (by path):
//! - `/headers`: answers with the request head it received (to inspect forwarded headers).
//! - `/echo`: answers with the request body (Content-Length), or chunked when the request was.
//! - `/sink`: consumes the body streaming; answers `len=N sum=S`.
//! - `/source/N`, `/source-chunked/N`, `/source-close/N`: N pattern bytes framed by length,
//!   chunked, or by closing the connection.
//! - `/status/N`: status N with no body for 1xx/204/304, else a short body.
//! - `/hang`: never answers. `/slow/MS`: answers after MS milliseconds.
//! - `/reset/N`: announces 1 MiB, sends N bytes, then resets the connection.
//! - `/close`: answers with Connection: close and closes.
//! - `/early/STATUS`: answers STATUS without reading the body, then closes.
//! - `/trailer-chunked`: a chunked response with trailers and chunk extensions.
//! - `/interim`: a 103 Early Hints, then 200.
//! - anything else: 200 with body `ok <path>`.
//!
//! Every request is recorded (method, path, headers, body length) so tests can check what
//! reached the upstream, and connections are counted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The byte at position `i` of every generated body: easy to verify anywhere in a stream.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(i >> 13) % 251) as u8
}

/// Running sum used to compare large bodies without storing them.
pub fn checksum(sum: u64, data: &[u8], offset: u64) -> u64 {
    let mut s = sum;
    for (k, &b) in data.iter().enumerate() {
        s = s.wrapping_add(u64::from(b).wrapping_mul(offset + k as u64 + 1));
    }
    s
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub connection: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    closed_early: AtomicUsize,
    stop: AtomicBool,
    /// Do not keep request records (tests that count heap bytes).
    unrecorded: AtomicBool,
}

/// A test upstream.
#[derive(Debug, Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Origin {
    /// An origin that keeps no record of requests.
    pub fn start_unrecorded() -> Origin {
        let o = Self::start();
        o.shared.unrecorded.store(true, Ordering::Relaxed);
        o
    }

    pub fn start() -> Origin {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let id = s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || serve(conn, id, &s));
            }
        });
        Origin { addr, shared }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.path).collect()
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections whose client went away in the middle of a request body.
    pub fn closed_early(&self) -> usize {
        self.shared.closed_early.load(Ordering::SeqCst)
    }
}

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
}

fn read_head(r: &mut BufReader<TcpStream>) -> Option<Head> {
    let mut raw = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&line);
        if line == b"\r\n" && raw.len() > 2 {
            break;
        }
        if raw.len() > 1 << 20 {
            return None;
        }
    }
    let mut hs = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut hs);
    req.parse(&raw).ok()?;
    Some(Head {
        method: req.method?.to_string(),
        path: req.path?.to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        raw,
    })
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a body (Content-Length or chunked), feeding it to `sink`. None on early EOF.
fn read_body(
    r: &mut BufReader<TcpStream>,
    head: &Head,
    mut sink: impl FnMut(&[u8]),
) -> Option<u64> {
    let mut total = 0u64;
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let size = u64::from_str_radix(line.trim_end().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t).ok()? == 0 {
                        return None;
                    }
                    if t == "\r\n" {
                        return Some(total);
                    }
                }
            }
            let mut left = size;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = (left as usize).min(buf.len());
                r.read_exact(&mut buf[..n]).ok()?;
                sink(&buf[..n]);
                left -= n as u64;
                total += n as u64;
            }
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).ok()?;
        }
    }
    let len: u64 = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut left = len;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        let got = r.read(&mut buf[..n]).ok()?;
        if got == 0 {
            return None;
        }
        sink(&buf[..got]);
        left -= got as u64;
        total += got as u64;
    }
    Some(total)
}

fn write_pattern(w: &mut TcpStream, n: u64, chunked: bool) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = ((n - off) as usize).min(buf.len());
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        if chunked {
            write!(w, "{k:x}\r\n")?;
            w.write_all(&buf[..k])?;
            w.write_all(b"\r\n")?;
        } else {
            w.write_all(&buf[..k])?;
        }
        off += k as u64;
    }
    if chunked {
        w.write_all(b"0\r\n\r\n")?;
    }
    Ok(())
}

fn serve(conn: TcpStream, id: usize, s: &Shared) {
    let _ = conn.set_nodelay(true);
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::with_capacity(64 * 1024, conn);
    loop {
        let Some(head) = read_head(&mut r) else {
            return;
        };
        let mut rec = Recorded {
            method: head.method.clone(),
            path: head.path.clone(),
            headers: head.headers.clone(),
            body_len: 0,
            connection: id,
        };
        let path = head.path.clone();
        if let Some(st) = path.strip_prefix("/early/") {
            s.requests.lock().unwrap().push(rec);
            let _ = write!(
                w,
                "HTTP/1.1 {st} Early\r\nContent-Length: 5\r\nConnection: close\r\n\r\nearly"
            );
            let _ = w.flush();
            std::thread::sleep(Duration::from_millis(50));
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
        let mut echo = Vec::new();
        let mut sum = 0u64;
        let keep_echo = path == "/echo";
        let body = read_body(&mut r, &head, |d| {
            if keep_echo {
                echo.extend_from_slice(d);
            }
            sum = checksum(sum, d, rec.body_len);
            rec.body_len += d.len() as u64;
        });
        let Some(body_len) = body else {
            s.closed_early.fetch_add(1, Ordering::SeqCst);
            s.requests.lock().unwrap().push(rec);
            return;
        };
        rec.body_len = body_len;
        if !s.unrecorded.load(Ordering::Relaxed) {
            s.requests.lock().unwrap().push(rec);
        }
        let head_req = head.method == "HEAD";
        let res = respond(&mut w, &head, &path, &echo, body_len, sum, head_req);
        match res {
            Ok(true) => {}
            _ => return,
        }
    }
}

/// Writes the response; Ok(false) closes the connection.
fn respond(
    w: &mut TcpStream,
    head: &Head,
    path: &str,
    echo: &[u8],
    body_len: u64,
    sum: u64,
    head_req: bool,
) -> std::io::Result<bool> {
    let simple = |w: &mut TcpStream, status: u16, body: &[u8]| -> std::io::Result<bool> {
        write!(
            w,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nX-Origin: yes\r\n\r\n",
            body.len()
        )?;
        if !head_req {
            w.write_all(body)?;
        }
        Ok(true)
    };
    if path == "/headers" {
        return simple(w, 200, &head.raw);
    }
    if path == "/echo" {
        if head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            write!(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            for piece in echo.chunks(1000) {
                write!(w, "{:x}\r\n", piece.len())?;
                w.write_all(piece)?;
                w.write_all(b"\r\n")?;
            }
            w.write_all(b"0\r\n\r\n")?;
            return Ok(true);
        }
        return simple(w, 200, echo);
    }
    if path == "/sink" {
        return simple(w, 200, format!("len={body_len} sum={sum}").as_bytes());
    }
    if let Some(n) = path.strip_prefix("/source/") {
        let n: u64 = n.parse().unwrap_or(0);
        write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n")?;
        if !head_req {
            write_pattern(w, n, false)?;
        }
        return Ok(true);
    }
    if let Some(n) = path.strip_prefix("/source-chunked/") {
        let n: u64 = n.parse().unwrap_or(0);
        write!(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        write_pattern(w, n, true)?;
        return Ok(true);
    }
    if let Some(n) = path.strip_prefix("/source-close/") {
        let n: u64 = n.parse().unwrap_or(0);
        write!(w, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
        write_pattern(w, n, false)?;
        let _ = w.shutdown(std::net::Shutdown::Write);
        return Ok(false);
    }
    if let Some(st) = path.strip_prefix("/status/") {
        let st: u16 = st.parse().unwrap_or(200);
        if st < 200 || st == 204 || st == 304 {
            write!(w, "HTTP/1.1 {st} X\r\nETag: \"e\"\r\n\r\n")?;
            return Ok(true);
        }
        return simple(w, st, b"status body");
    }
    if path == "/hang" {
        std::thread::sleep(Duration::from_secs(30));
        return Ok(false);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(100)));
        return simple(w, 200, b"slow");
    }
    if let Some(n) = path.strip_prefix("/reset/") {
        let n: usize = n.parse().unwrap_or(0);
        write!(w, "HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")?;
        w.write_all(&vec![b'r'; n])?;
        w.flush()?;
        std::thread::sleep(Duration::from_millis(50));
        // SO_LINGER 0: close sends RST.
        let sock = socket2::SockRef::from(&*w);
        let _ = sock.set_linger(Some(Duration::ZERO));
        return Ok(false);
    }
    if path == "/close" {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nclose"
        )?;
        return Ok(false);
    }
    if path == "/trailer-chunked" {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: v\r\n\r\n"
        )?;
        return Ok(true);
    }
    if path == "/interim" {
        write!(
            w,
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        )?;
        return simple(w, 200, b"final");
    }
    if path == "/app-headers" {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nX-Frame-Options: DENY\r\nContent-Length: 2\r\n\r\nok"
        )?;
        return Ok(true);
    }
    if path == "/idle-close" {
        // Keep-alive response, then close the connection if it stays idle for 150 ms, the way
        // an app with a short keep-alive timeout does.
        simple(w, 200, b"idle-close")?;
        let _ = w.set_read_timeout(Some(Duration::from_millis(150)));
        return Ok(true);
    }
    if path == "/bad-framing" {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        )?;
        return Ok(false);
    }
    simple(w, 200, format!("ok {path}").as_bytes())
}

/// A WebSocket echo upstream (tungstenite).
pub fn start_ws_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(conn) else {
                    return;
                };
                while let Ok(msg) = ws.read() {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
