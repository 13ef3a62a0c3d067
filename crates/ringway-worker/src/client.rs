//! What a client connection is made of, plain or TLS: the exchange code is written once over
//! [`ClientIo`] and compiled for both.

use crate::io::{ReadIo, WriteIo};
use crate::parking::{self, ParkedTls};
use crate::tls::{TlsConn, TlsInfo};
use crate::worker::Worker;
use monoio::net::TcpStream;
use std::future::Future;

/// A client connection's transport.
pub trait ClientIo: ReadIo + WriteIo + crate::io::Wire + Sized + 'static {
    /// Requests arrive over TLS (X-Forwarded-Proto, redirects, HSTS, SNI checks).
    const TLS: bool;

    /// The TCP socket underneath (readiness polls).
    fn socket(&self) -> &TcpStream;

    /// The handshake's outcome, for TLS connections.
    fn tls(&self) -> Option<&TlsInfo>;

    /// Bytes are buffered above the socket: a readiness poll would not see them.
    fn has_buffered(&self) -> bool;

    /// Nothing buffered and nothing to send: the connection can be parked.
    fn can_park(&self) -> bool;

    /// Takes the connection apart for the parking lot (no operation may be in flight).
    fn into_parked(self) -> (std::net::TcpStream, Option<Box<ParkedTls>>);

    /// Half-closes the connection (no more bytes from us).
    fn shutdown_write(&mut self);

    /// Relays bytes both ways with `upstream` after a 101; returns (client→upstream,
    /// upstream→client) byte counts.
    fn tunnel(self, upstream: TcpStream, w: &Worker) -> impl Future<Output = (u64, u64)>;
}

impl ClientIo for TcpStream {
    const TLS: bool = false;

    fn socket(&self) -> &TcpStream {
        self
    }

    fn tls(&self) -> Option<&TlsInfo> {
        None
    }

    fn has_buffered(&self) -> bool {
        false
    }

    fn can_park(&self) -> bool {
        true
    }

    fn into_parked(self) -> (std::net::TcpStream, Option<Box<ParkedTls>>) {
        (parking::into_std(self), None)
    }

    fn shutdown_write(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on the socket this stream owns; it touches no memory.
        unsafe {
            libc::shutdown(self.as_raw_fd(), libc::SHUT_WR);
        }
    }

    async fn tunnel(self, upstream: TcpStream, w: &Worker) -> (u64, u64) {
        let bufs = (w.bufs.take(), w.bufs.take());
        let (t, (a, b)) = crate::stream::tunnel(
            &w.deadlines,
            self,
            upstream,
            bufs,
            w.settings.tunnel_idle,
            w.settings.client_write,
        )
        .await;
        w.bufs.put(a);
        w.bufs.put(b);
        (t.client_to_upstream, t.upstream_to_client)
    }
}

impl ClientIo for TlsConn {
    const TLS: bool = true;

    fn socket(&self) -> &TcpStream {
        self.tcp()
    }

    fn tls(&self) -> Option<&TlsInfo> {
        Some(&self.info)
    }

    fn has_buffered(&self) -> bool {
        TlsConn::has_buffered(self)
    }

    fn can_park(&self) -> bool {
        self.is_quiet()
    }

    fn into_parked(self) -> (std::net::TcpStream, Option<Box<ParkedTls>>) {
        let (tcp, session, info) = self.into_parts();
        (
            parking::into_std(tcp),
            Some(Box::new(ParkedTls { session, info })),
        )
    }

    fn shutdown_write(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on the socket this connection owns; it touches no memory.
        unsafe {
            libc::shutdown(self.tcp().as_raw_fd(), libc::SHUT_WR);
        }
    }

    async fn tunnel(self, upstream: TcpStream, w: &Worker) -> (u64, u64) {
        crate::tls::tunnel(
            self,
            upstream,
            &w.deadlines,
            w.settings.tunnel_idle,
            w.settings.client_write,
        )
        .await
    }
}
