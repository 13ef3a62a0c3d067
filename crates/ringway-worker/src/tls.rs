//! TLS termination: rustls driven over the same cancelable io_uring operations as plain TCP.
//!
//! A [`TlsConn`] owns the TCP socket and the rustls `ServerConnection`, and implements the
//! worker's [`ReadIo`]/[`WriteIo`], so everything above it (exchanges, body pumps, timeouts)
//! is the same code for HTTP and HTTPS. Ringway drives rustls itself rather than through
//! monoio-rustls: that wrapper hides the session after the handshake (no SNI, version or
//! resumption to check or count), allocates 32 KiB of zeroed buffers per connection, and its
//! reads cannot be cancelled, which a timeout on io_uring needs.
//!
//! Certificates are chosen per handshake by [`CertResolver`] from the shared
//! [`CertTable`]: exact SNI, then a wildcard for the parent name, then the default; none
//! fails the handshake with an alert, and every outcome is counted.

use crate::error::IoFail;
use crate::io::{ReadIo, Timed, WriteIo};
use monoio::buf::{Slice, SliceMut};
use monoio::io::{CancelHandle, Canceller, Splitable};
use monoio::net::TcpStream;
use ringway_core::WorkerStats;
use ringway_core::route::{HOST_BYTES_MAX, normalize_host};
use ringway_core::stats::Counter;
use ringway_core::tls::{CertEntry, CertTable, Lookup};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, ProtocolVersion, ServerConfig, ServerConnection};
use std::cell::RefCell;
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Ciphertext read from the socket per operation (a TLS record is at most 16 KiB + 256).
pub const TLS_READ_BYTES: usize = 17 * 1024;

/// Chooses the certificate for a ClientHello; counts the outcome in the worker's stats.
#[derive(Debug)]
pub struct CertResolver {
    pub certs: Arc<CertTable>,
    pub stats: Arc<WorkerStats>,
}

/// Lower-cases and strips a trailing dot from an SNI value, on the stack.
fn sni_key<'a>(sni: &str, buf: &'a mut [u8; HOST_BYTES_MAX]) -> Option<&'a str> {
    normalize_host(sni.as_bytes(), buf)
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut buf = [0u8; HOST_BYTES_MAX];
        let sni = hello.server_name().and_then(|s| sni_key(s, &mut buf));
        let (entry, how) = self.certs.lookup(sni);
        lookup_counter(&self.stats, how).inc();
        entry.map(|e| e.key.clone())
    }
}

fn lookup_counter(s: &WorkerStats, how: Lookup) -> &Counter {
    match how {
        Lookup::Exact => &s.tls_cert_exact,
        Lookup::Wildcard => &s.tls_cert_wildcard,
        Lookup::Default => &s.tls_cert_default,
        Lookup::Miss => &s.tls_cert_miss,
    }
}

/// What the proxy keeps from a handshake.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The server name the client asked for (normalised), if it sent one.
    pub sni: Option<Box<str>>,
    /// The certificate served, for checking that requests stay within the names it covers.
    pub cert: Option<Arc<CertEntry>>,
    pub version: Option<ProtocolVersion>,
    pub resumed: bool,
}

impl TlsInfo {
    /// Whether a request for `host` may be served on this connection (RFC 9110 §15.5.20):
    /// the host is the SNI itself or a name the certificate covers. Connections without SNI
    /// are not checked.
    pub fn allows_host(&self, host: &str) -> bool {
        let Some(sni) = &self.sni else { return true };
        if &**sni == host {
            return true;
        }
        self.cert.as_ref().is_some_and(|c| c.covers(host))
    }
}

/// A TLS connection to a client.
#[derive(Debug)]
pub struct TlsConn {
    tcp: TcpStream,
    session: Box<ServerConnection>,
    /// Ciphertext read but not yet taken by rustls: `rin[rin_pos..]`.
    rin: Vec<u8>,
    rin_pos: usize,
    /// Ciphertext produced by rustls, being written.
    rout: Vec<u8>,
    /// Decrypted bytes rustls holds that the application has not read.
    plaintext_pending: usize,
    pub info: TlsInfo,
}

/// Why a handshake failed (for the handshake metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    Timeout,
    /// The client closed or reset the connection.
    Closed,
    /// Protocol error (garbage, unsupported versions, no certificate for the name, ...).
    Tls,
}

impl TlsConn {
    /// Bytes already read from the socket (after a PROXY protocol header) that belong to the
    /// TLS stream: rustls reads them first.
    pub fn prime(&mut self, bytes: &[u8]) {
        self.rin.extend_from_slice(bytes);
    }

    /// Wraps an accepted socket; the handshake has not started.
    pub fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self::from_parts(
            tcp,
            Box::new(ServerConnection::new(config)?),
            None,
        ))
    }

    /// Rebuilds a connection from a parked socket and session.
    pub fn from_parts(
        tcp: TcpStream,
        session: Box<ServerConnection>,
        info: Option<TlsInfo>,
    ) -> Self {
        Self {
            tcp,
            session,
            rin: Vec::new(),
            rin_pos: 0,
            rout: Vec::new(),
            plaintext_pending: 0,
            info: info.unwrap_or(TlsInfo {
                sni: None,
                cert: None,
                version: None,
                resumed: false,
            }),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether bytes are waiting that a socket poll would not report: ciphertext not yet
    /// given to rustls, or plaintext not yet read.
    pub fn has_buffered(&self) -> bool {
        self.rin_pos < self.rin.len() || self.plaintext_pending > 0
    }

    /// Whether the connection can be parked: nothing buffered, nothing to send.
    pub fn is_quiet(&self) -> bool {
        !self.has_buffered() && !self.session.wants_write()
    }

    /// Splits into socket, session and info; buffers are dropped (call when quiet).
    pub fn into_parts(self) -> (TcpStream, Box<ServerConnection>, TlsInfo) {
        (self.tcp, self.session, self.info)
    }

    /// Writes out everything rustls wants to send.
    async fn flush(&mut self, c: &CancelHandle) -> std::io::Result<()> {
        while self.session.wants_write() {
            self.rout.clear();
            self.session.write_tls(&mut self.rout)?;
            let mut pos = 0;
            let end = self.rout.len();
            while pos < end {
                let buf = std::mem::take(&mut self.rout);
                let (r, slice) = self
                    .tcp
                    .write_from(Slice::new(buf, pos, end), c.clone())
                    .await;
                self.rout = slice.into_inner();
                match r {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => pos += n,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Reads ciphertext from the socket and feeds it to rustls. `Ok(false)` on end of stream.
    async fn read_tls(&mut self, c: &CancelHandle) -> std::io::Result<bool> {
        if self.rin_pos >= self.rin.len() {
            self.rin.clear();
            self.rin_pos = 0;
            if self.rin.capacity() < TLS_READ_BYTES {
                self.rin.reserve(TLS_READ_BYTES);
            }
            let buf = std::mem::take(&mut self.rin);
            let cap = buf.capacity();
            let (r, slice) = self
                .tcp
                .read_into(SliceMut::new(buf, 0, cap), c.clone())
                .await;
            self.rin = slice.into_inner();
            if r? == 0 {
                return Ok(false);
            }
        }
        let mut input = &self.rin[self.rin_pos..];
        let before = input.len();
        self.session.read_tls(&mut input)?;
        self.rin_pos += before - input.len();
        match self.session.process_new_packets() {
            Ok(state) => {
                self.plaintext_pending = state.plaintext_bytes_to_read();
                if state.peer_has_closed()
                    && self.plaintext_pending == 0
                    && !self.session.is_handshaking()
                {
                    return Ok(false);
                }
            }
            Err(e) => {
                // Tell the client why (an alert), then fail.
                let _ = self.flush(c).await;
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
        }
        // Post-handshake messages (tickets, key updates) may want an answer.
        if self.session.wants_write() && !self.session.is_handshaking() {
            self.flush(c).await?;
        }
        Ok(true)
    }

    /// Runs the handshake to completion (no timeout of its own: see [`handshake`]).
    async fn drive_handshake(&mut self, c: CancelHandle) -> Result<(), HandshakeError> {
        loop {
            if self.session.wants_write() {
                self.flush(&c).await.map_err(|_| HandshakeError::Closed)?;
            }
            if !self.session.is_handshaking() {
                return Ok(());
            }
            match self.read_tls(&c).await {
                Ok(true) => {}
                Ok(false) => return Err(HandshakeError::Closed),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(HandshakeError::Tls);
                }
                Err(_) => return Err(HandshakeError::Closed),
            }
        }
    }

    fn record_info(&mut self, certs: &CertTable) {
        let mut buf = [0u8; HOST_BYTES_MAX];
        let sni = self
            .session
            .server_name()
            .and_then(|s| sni_key(s, &mut buf).map(Box::<str>::from));
        let cert = certs.lookup(sni.as_deref()).0;
        self.info = TlsInfo {
            sni,
            cert,
            version: self.session.protocol_version(),
            resumed: self.session.handshake_kind() == Some(HandshakeKind::Resumed),
        };
    }
}

/// Performs the handshake on `conn` within `timeout`, counting the result in `stats`.
pub async fn handshake(
    conn: &mut Timed<TlsConn>,
    certs: &CertTable,
    stats: &WorkerStats,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let deadlines = conn.deadlines().clone();
    let mut canceller = Canceller::new();
    let handle = canceller.handle();
    let (r, timed_out) = crate::io::timed(
        conn.io.drive_handshake(handle),
        &mut canceller,
        deadlines.after(timeout),
    )
    .await;
    let r = if timed_out && r.is_err() {
        Err(HandshakeError::Timeout)
    } else {
        r
    };
    match r {
        Ok(()) => {
            conn.io.record_info(certs);
            match conn.io.info.version {
                Some(ProtocolVersion::TLSv1_3) => stats.tls_handshakes_13.inc(),
                _ => stats.tls_handshakes_12.inc(),
            }
            if conn.io.info.resumed {
                stats.tls_resumptions.inc();
            }
        }
        Err(HandshakeError::Timeout) => stats.tls_handshake_timeouts.inc(),
        Err(HandshakeError::Closed) => stats.tls_handshake_closed.inc(),
        Err(HandshakeError::Tls) => stats.tls_handshake_errors.inc(),
    }
    r
}

impl crate::io::Wire for TlsConn {
    fn wire(&self) -> Option<crate::io::WireBytes> {
        self.tcp.wire()
    }
}

impl ReadIo for TlsConn {
    async fn read_into(
        &mut self,
        buf: SliceMut<Vec<u8>>,
        c: CancelHandle,
    ) -> monoio::BufResult<usize, SliceMut<Vec<u8>>> {
        {
            let (begin, end) = (buf.begin(), buf.end());
            let mut v = buf.into_inner();
            debug_assert_eq!(v.len(), begin);
            loop {
                // Plaintext rustls already holds comes first; never more than the room given.
                let room = (end - begin) as u64;
                let got = (&mut self.session.reader()).take(room).read_to_end(&mut v);
                let n = v.len() - begin;
                self.plaintext_pending = self.plaintext_pending.saturating_sub(n);
                match got {
                    Ok(_) if n > 0 => return (Ok(n), SliceMut::new(v, begin, end)),
                    // Clean close (close_notify) with nothing left.
                    Ok(_) => return (Ok(0), SliceMut::new(v, begin, end)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if n > 0 {
                            return (Ok(n), SliceMut::new(v, begin, end));
                        }
                    }
                    // A TCP close without close_notify: treat as end of stream.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return (Ok(n), SliceMut::new(v, begin, end));
                    }
                    Err(e) => return (Err(e), SliceMut::new(v, begin, end)),
                }
                match self.read_tls(&c).await {
                    Ok(true) => {}
                    Ok(false) => return (Ok(0), SliceMut::new(v, begin, end)),
                    Err(e) => return (Err(e), SliceMut::new(v, begin, end)),
                }
            }
        }
    }
}

impl WriteIo for TlsConn {
    async fn write_from(
        &mut self,
        buf: Slice<Vec<u8>>,
        c: CancelHandle,
    ) -> monoio::BufResult<usize, Slice<Vec<u8>>> {
        {
            let (begin, end) = (buf.begin(), buf.end());
            let v = buf.into_inner();
            let n = match self.session.writer().write(&v[begin..end]) {
                Ok(n) => n,
                Err(e) => return (Err(e), Slice::new(v, begin, end)),
            };
            let r = self.flush(&c).await.map(|_| n);
            (r, Slice::new(v, begin, end))
        }
    }
}

/// Relays an upgraded TLS connection (WebSocket over HTTPS) and `upstream` both ways until
/// both have ended or nothing moved for `idle`. The two directions share the session through
/// a `RefCell`, borrowed only between socket operations.
pub async fn tunnel(
    conn: TlsConn,
    upstream: TcpStream,
    deadlines: &Rc<crate::deadline::Deadlines>,
    idle: Duration,
    write_timeout: Duration,
) -> (u64, u64) {
    let TlsConn {
        tcp,
        session,
        rin,
        rin_pos,
        ..
    } = conn;
    let session = Rc::new(RefCell::new(session));
    let last = std::cell::Cell::new(std::time::Instant::now());
    let (cr, cw) = tcp.into_split();
    let (ur, uw) = upstream.into_split();
    let mut cr = Timed::new(cr, deadlines.clone());
    let mut cw = Timed::new(cw, deadlines.clone());
    let mut ur = Timed::new(ur, deadlines.clone());
    let mut uw = Timed::new(uw, deadlines.clone());

    // Client to upstream: ciphertext in, plaintext out.
    let up = async {
        let mut total = 0u64;
        let mut raw = rin;
        let mut pos = rin_pos;
        let mut plain = Vec::with_capacity(TLS_READ_BYTES);
        'outer: loop {
            // Feed what we have, then forward all plaintext.
            let closed;
            {
                let mut s = session.borrow_mut();
                let mut input = &raw[pos.min(raw.len())..];
                let before = input.len();
                if s.read_tls(&mut input).is_err() {
                    break;
                }
                pos += before - input.len();
                match s.process_new_packets() {
                    Ok(st) => closed = st.peer_has_closed(),
                    Err(_) => break,
                }
                plain.clear();
                let _ = s.reader().read_to_end(&mut plain);
            }
            if !plain.is_empty() {
                last.set(std::time::Instant::now());
                let (r, b) = uw
                    .write_all(std::mem::take(&mut plain), write_timeout)
                    .await;
                plain = b;
                if r.is_err() {
                    break;
                }
                total += plain.len() as u64;
            }
            if closed {
                break;
            }
            if pos >= raw.len() {
                raw.clear();
                pos = 0;
                loop {
                    let (r, b) = cr.read_append(std::mem::take(&mut raw), idle).await;
                    raw = b;
                    match r {
                        Ok(0) => break 'outer,
                        Ok(_) => break,
                        Err(IoFail::Timeout) if last.get().elapsed() < idle => continue,
                        Err(_) => break 'outer,
                    }
                }
            }
        }
        drop(uw); // shuts down the upstream's write side
        total
    };

    // Upstream to client: plaintext in, ciphertext out.
    let down = async {
        let mut total = 0u64;
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut out = Vec::with_capacity(TLS_READ_BYTES);
        loop {
            buf.clear();
            let (r, b) = ur.read_append(std::mem::take(&mut buf), idle).await;
            buf = b;
            let done = match r {
                Ok(0) => true,
                Ok(_) => false,
                Err(IoFail::Timeout) if last.get().elapsed() < idle => continue,
                Err(_) => true,
            };
            out.clear();
            {
                let mut s = session.borrow_mut();
                if !done {
                    last.set(std::time::Instant::now());
                    if s.writer().write_all(&buf).is_err() {
                        break;
                    }
                    total += buf.len() as u64;
                } else {
                    s.send_close_notify();
                }
                while s.wants_write() {
                    if s.write_tls(&mut out).is_err() {
                        break;
                    }
                }
            }
            if !out.is_empty() {
                let (r, b) = cw.write_all(std::mem::take(&mut out), write_timeout).await;
                out = b;
                if r.is_err() {
                    break;
                }
            }
            if done {
                break;
            }
        }
        drop(cw);
        total
    };
    monoio::join!(up, down)
}
