//! One client connection: waiting for requests, running exchanges one after the other
//! (pipelined requests are answered in order because the next is only read after the previous
//! response is written), and handing off to a tunnel after an upgrade.
//!
//! A connection alternates between two states:
//! - **busy** (`busy`): exchanges, and between them a read posted with a pooled buffer for up
//!   to `timeouts.hot_read_ms`, so a loaded keep-alive connection costs one io_uring operation
//!   per request. This state lives in one heap allocation per busy period, freed when the
//!   connection goes quiet.
//! - **idle** (`idle_wait`): no buffer, no timer of its own; a readability poll, the worker's
//!   shutdown event and a coarse deadline. An idle keep-alive connection costs its small task
//!   and its socket, not a 16 KiB read buffer (see the size test below).

use crate::access;
use crate::client::ClientIo;
use crate::clients::ClientKey;
use crate::io::{RecvBuf, Timed};
use crate::parking::Parked;
use crate::parking::ParkedTls;
use crate::proxy::{self, Client, Next, Upgraded};
use crate::tls::TlsConn;
use crate::worker::Worker;
use monoio::net::TcpStream;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Whether bytes are known to be waiting when a busy period starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// A new connection, or one just served: its next request is read with a hot read.
    Expected,
    /// The idle wait saw bytes arrive (or TLS holds some): the exchange reads them at once.
    Waiting,
}

/// Whether a connection's socket is already in the parking lot's epoll set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// Never parked: added when it parks.
    New,
    /// Parked before: re-armed.
    Registered,
}

/// How a busy period ended.
enum Busy {
    /// No request within the hot-read time: wait without a buffer.
    Quiet,
    Close,
    Upgrade(Box<Upgraded>),
}

fn client<S: ClientIo>(
    w: &Worker,
    io: S,
    peer: SocketAddr,
    trusted: bool,
    counted: Option<ClientKey>,
) -> Client<S> {
    Client {
        io: Timed::new(io, w.deadlines.clone()),
        peer,
        trusted,
        counted,
        rb: RecvBuf::default(),
    }
}

/// Serves a freshly accepted plain connection until it closes.
pub fn serve(
    w: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    counted: Option<ClientKey>,
) -> impl Future<Output = ()> {
    // Not async itself: an async fn would keep its arguments beside the `Client` built from
    // them, and this future is what every waiting connection costs.
    let _ = stream.set_nodelay(true);
    let trusted = access::is_trusted(peer.ip(), &w.settings.trusted_proxies);
    let c = client(&w, stream, peer, trusted, counted);
    // A new connection starts busy: its first request is usually already on the way.
    run(w, c, accepted, 0, Arrival::Expected, Registration::New)
}

/// Serves a connection from a PROXY protocol source (`listen.proxy_protocol_from`): reads
/// the header within `timeouts.header_read_ms`, then serves the connection as coming from
/// the client it names. A missing or malformed header closes the connection.
pub async fn serve_proxied(
    w: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    tls: bool,
) {
    let _ = stream.set_nodelay(true);
    let mut io = Timed::new(stream, w.deadlines.clone());
    let mut rb = RecvBuf::default();
    let deadline = accepted + w.settings.header_read;
    let (source, n) = loop {
        match crate::proxy_protocol::parse(&rb.buf) {
            Ok(Some(x)) => break x,
            Ok(None) => {}
            Err(_) => {
                w.stats.proxy_protocol_errors.inc();
                closed(&w, None);
                return;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let r = if left.is_zero() {
            Err(crate::error::IoFail::Timeout)
        } else {
            io.fill(&mut rb, 256, left).await
        };
        if !matches!(r, Ok(n) if n > 0) {
            w.stats.proxy_protocol_errors.inc();
            closed(&w, None);
            return;
        }
    };
    let client_addr = match source {
        crate::proxy_protocol::Source::Proxied(a) => a,
        crate::proxy_protocol::Source::Local => peer,
    };
    let leftover = rb.buf.split_off(n);
    let stream = io.io;
    // Connections from a balancer are not held to the per-client limit (the balancer's own
    // limits apply before it).
    if tls {
        Box::pin(serve_tls_with(
            w,
            stream,
            client_addr,
            accepted,
            &leftover,
            None,
        ))
        .await;
    } else {
        let trusted = access::is_trusted(client_addr.ip(), &w.settings.trusted_proxies);
        let mut c = client(&w, stream, client_addr, trusted, None);
        c.rb.buf = leftover;
        Box::pin(run(w, c, accepted, 0, Arrival::Expected, Registration::New)).await;
    }
}

/// Serves a freshly accepted TLS connection: handshake (within its timeout), then requests.
pub async fn serve_tls(
    w: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    counted: Option<ClientKey>,
) {
    let _ = stream.set_nodelay(true);
    serve_tls_with(w, stream, peer, accepted, &[], counted).await
}

async fn serve_tls_with(
    w: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    read_ahead: &[u8],
    counted: Option<ClientKey>,
) {
    let Some(config) = w.tls.clone() else {
        closed(&w, counted);
        return;
    };
    let conn = match TlsConn::new(stream, config) {
        Ok(mut c) => {
            c.prime(read_ahead);
            c
        }
        Err(_) => {
            closed(&w, counted);
            return;
        }
    };
    let trusted = access::is_trusted(peer.ip(), &w.settings.trusted_proxies);
    let mut c = client(&w, conn, peer, trusted, counted);
    let r = Box::pin(crate::tls::handshake(
        &mut c.io,
        &w.certs,
        &w.stats,
        w.settings.tls_handshake,
    ))
    .await;
    if let Err(e) = r {
        tracing::debug!(worker = w.id, %peer, ?e, "TLS handshake failed");
        c.io.release();
        closed(&w, counted);
        return;
    }
    c.io.release();
    Box::pin(run(w, c, accepted, 0, Arrival::Expected, Registration::New)).await;
}

/// Continues a parked connection that became readable (or was closed by its client).
pub async fn resume(w: Rc<Worker>, p: Parked) {
    let Parked {
        stream,
        peer,
        trusted,
        counted,
        served,
        accepted,
        registered,
        tls,
    } = p;
    let Ok(stream) = TcpStream::from_std(stream) else {
        closed(&w, counted);
        return;
    };
    let registration = if registered {
        Registration::Registered
    } else {
        Registration::New
    };
    match tls {
        None => {
            let c = client(&w, stream, peer, trusted, counted);
            Box::pin(run(w, c, accepted, served, Arrival::Waiting, registration)).await;
        }
        Some(t) => {
            let ParkedTls { session, info } = *t;
            let c = client(
                &w,
                TlsConn::from_parts(stream, session, Some(info)),
                peer,
                trusted,
                counted,
            );
            Box::pin(run(w, c, accepted, served, Arrival::Waiting, registration)).await;
        }
    }
}

/// A connection ended: free its slot, and its client's (`counted`: the key it was counted
/// under by the per-client limit).
pub fn closed(w: &Worker, counted: Option<ClientKey>) {
    w.active.set(w.active.get() - 1);
    w.stats.connections_active.sub(1);
    if let Some(k) = counted {
        w.clients.borrow_mut().release(k);
    }
    w.slot_freed.notify();
}

async fn run<S: ClientIo>(
    w: Rc<Worker>,
    mut c: Client<S>,
    accepted: Instant,
    mut served: u64,
    mut arrival: Arrival,
    registration: Registration,
) {
    let upgraded = loop {
        match Box::pin(busy(&w, &mut c, &mut served, accepted, arrival)).await {
            Busy::Quiet => {}
            Busy::Close => break None,
            Busy::Upgrade(u) => break Some(u),
        }
        if c.rb.buf.capacity() > 0 {
            w.bufs.put(std::mem::take(&mut c.rb.buf));
            c.rb = RecvBuf::default();
        }
        c.io.release();
        if c.io.io.has_buffered() {
            // TLS bytes already decrypted or received: no poll would report them.
            arrival = Arrival::Waiting;
            continue;
        }
        // The first request's head is due within the header timeout of the accept; later ones
        // may come within the keep-alive time.
        let wait = if served == 0 {
            (accepted + w.settings.header_read).saturating_duration_since(Instant::now())
        } else {
            // The hot read already spent part of the keep-alive time.
            w.settings
                .keepalive_idle
                .saturating_sub(w.settings.hot_read)
        };
        if w.settings.park_idle && !w.shutdown.is_fired() && c.io.io.can_park() {
            // Hand the socket to the parking lot and end this task.
            let Client {
                io,
                peer,
                trusted,
                counted,
                ..
            } = c;
            let (stream, tls) = io.into_inner().into_parked();
            let p = Parked {
                stream,
                peer,
                trusted,
                counted,
                served,
                accepted,
                registered: registration == Registration::Registered,
                tls,
            };
            match w.parking.park(p, Instant::now() + wait, served == 0) {
                Ok(()) => return,
                Err(p) => {
                    // The epoll set refused it (descriptor limit): resume here instead.
                    Box::pin(resume_refused(w, p)).await;
                    return;
                }
            }
        }
        tracing::debug!(worker = w.id, peer = %c.peer, ?wait, "idle wait");
        if !idle_wait(&w, c.io.io.socket(), wait).await {
            break None;
        }
        arrival = Arrival::Waiting;
    };
    tracing::debug!(worker = w.id, peer = %c.peer, served, "closing connection");
    let Client {
        io, rb, counted, ..
    } = c;
    let rb = match upgraded {
        Some(u) => Box::pin(tunnel(&w, io.into_inner(), rb, u)).await,
        None => rb,
    };
    if rb.buf.capacity() > 0 {
        w.bufs.put(rb.buf);
    }
    closed(&w, counted);
}

/// A connection the parking lot could not take waits in a task of its own instead.
async fn resume_refused(w: Rc<Worker>, p: Parked) {
    let Parked {
        stream,
        peer,
        trusted,
        counted,
        served,
        accepted,
        tls,
        ..
    } = p;
    let Ok(stream) = TcpStream::from_std(stream) else {
        closed(&w, counted);
        return;
    };
    let wait = w.settings.keepalive_idle;
    match tls {
        None => {
            let c = client(&w, stream, peer, trusted, counted);
            if idle_wait(&w, c.io.io.socket(), wait).await {
                run(w, c, accepted, served, Arrival::Waiting, Registration::New).await;
            } else {
                closed(&w, counted);
            }
        }
        Some(t) => {
            let ParkedTls { session, info } = *t;
            let c = client(
                &w,
                TlsConn::from_parts(stream, session, Some(info)),
                peer,
                trusted,
                counted,
            );
            if idle_wait(&w, c.io.io.socket(), wait).await {
                run(w, c, accepted, served, Arrival::Waiting, Registration::New).await;
            } else {
                closed(&w, counted);
            }
        }
    }
}

/// Relays an upgraded connection, then logs the exchange that started it (its head is still
/// in `rb`). Returns `rb` for recycling.
async fn tunnel<S: ClientIo>(w: &Worker, io: S, rb: RecvBuf, u: Box<Upgraded>) -> RecvBuf {
    let Upgraded { upstream, mut ex } = *u;
    let (up, down) = io.tunnel(upstream, w).await;
    ex.bytes_in += up;
    ex.bytes_out += down;
    ex.finish(w, &rb.buf);
    rb
}

/// Connections of one worker that may wait with a posted read buffer at once; beyond it (a
/// burst of new or just-served connections) they go straight to the idle wait. Bounds the
/// memory a connection storm can pin to `HOT_READERS_MAX * limits.buffer_bytes` per worker.
pub const HOT_READERS_MAX: usize = 1024;

/// Exchanges until the connection closes, upgrades, or stays quiet for the hot-read time.
/// `arrival`: whether bytes are known to be waiting (then the first exchange reads them
/// directly).
async fn busy<S: ClientIo>(
    w: &Worker,
    c: &mut Client<S>,
    served: &mut u64,
    accepted: Instant,
    mut arrival: Arrival,
) -> Busy {
    let max = w.settings.requests_per_connection_max;
    loop {
        let deadline = if *served == 0 {
            accepted + w.settings.header_read
        } else {
            Instant::now() + w.settings.header_read
        };
        if !c.rb.has_unread()
            && std::mem::replace(&mut arrival, Arrival::Expected) == Arrival::Expected
        {
            match hot_read(w, c, deadline).await {
                Hot::Data => {}
                Hot::Quiet => return Busy::Quiet,
                Hot::Closed => return Busy::Close,
            }
        }
        *served += 1;
        let last = max != 0 && *served >= max;
        match proxy::exchange(w, c, deadline, last).await {
            Next::KeepAlive if !last && !w.shutdown.is_fired() => {}
            Next::Upgrade(u) => return Busy::Upgrade(u),
            Next::Linger => {
                linger(w, c).await;
                return Busy::Close;
            }
            _ => return Busy::Close,
        }
    }
}

enum Hot {
    Data,
    Quiet,
    Closed,
}

/// Reads with a posted buffer for up to `hot_read` (bounded by `deadline` for a first request).
async fn hot_read<S: ClientIo>(w: &Worker, c: &mut Client<S>, deadline: Instant) -> Hot {
    let hot = w.settings.hot_read;
    if hot.is_zero() || w.shutdown.is_fired() || w.hot_readers.get() >= HOT_READERS_MAX {
        return Hot::Quiet;
    }
    let until = deadline.min(Instant::now() + hot);
    if c.rb.buf.capacity() == 0 {
        c.rb = RecvBuf::new(w.bufs.take());
    }
    w.hot_readers.set(w.hot_readers.get() + 1);
    let r =
        c.io.fill_until(&mut c.rb, 1024, w.deadlines.at(until))
            .await;
    w.hot_readers.set(w.hot_readers.get() - 1);
    match r {
        Ok(_) => Hot::Data,
        Err(crate::error::IoFail::Timeout) => Hot::Quiet,
        Err(_) => Hot::Closed,
    }
}

/// Longest a closing connection is drained after an error answer.
const LINGER_TOTAL: Duration = Duration::from_secs(2);
/// Longest wait for more bytes while draining.
const LINGER_READ: Duration = Duration::from_millis(500);

/// Half-closes the connection (the client sees the end of the answer) and reads and discards
/// what the client still sends, for a bounded time, before the socket is closed.
async fn linger<S: ClientIo>(w: &Worker, c: &mut Client<S>) {
    c.io.io.shutdown_write();
    if c.rb.buf.capacity() == 0 {
        c.rb = RecvBuf::new(w.bufs.take());
    }
    let deadline = Instant::now() + LINGER_TOTAL;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        c.rb.buf.clear();
        c.rb.pos = 0;
        c.rb.window = 0;
        if c.io
            .fill(&mut c.rb, 1024, left.min(LINGER_READ))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Waits until the client sends something. False on timeout, shutdown or a socket error.
pub(crate) async fn idle_wait(w: &Worker, s: &TcpStream, dur: Duration) -> bool {
    if w.shutdown.is_fired() || dur.is_zero() {
        return false;
    }
    // Polled by hand rather than with select!, whose bookkeeping would double the size of
    // every idle connection's task.
    let mut readable = std::pin::pin!(s.readable(false));
    let mut shutdown = std::pin::pin!(w.shutdown.wait());
    let mut deadline = std::pin::pin!(w.deadlines.after(dur));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(r) = readable.as_mut().poll(cx) {
            return std::task::Poll::Ready(r.is_ok());
        }
        if shutdown.as_mut().poll(cx).is_ready() || deadline.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(false);
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;
    use ringway_core::WorkerStats;
    use std::sync::Arc;

    /// An idle keep-alive connection costs its task: the connection future must stay small
    /// (the per-request work is boxed separately and freed between requests).
    #[test]
    fn connection_future_is_small() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = Rc::new(Worker::new(
                0,
                Settings::from_config(&ringway_core::Config::default()),
                ringway_core::snapshot::Tables::default(),
                Arc::new(WorkerStats::new()),
                None,
                crate::parking::ParkingLot::new().unwrap(),
                None,
            ));
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let _c = std::net::TcpStream::connect(addr).unwrap();
            let (s, peer) = l.accept().await.unwrap();
            let fut = serve(w.clone(), s, peer, Instant::now(), None);
            let conn = std::mem::size_of_val(&fut);
            let mut c = Client {
                io: Timed::new(
                    monoio::net::TcpStream::connect_addr(addr).await.unwrap(),
                    w.deadlines.clone(),
                ),
                peer,
                trusted: false,
                counted: None,
                rb: RecvBuf::default(),
            };
            let ex = proxy::exchange(&w, &mut c, Instant::now(), false);
            let exchange = std::mem::size_of_val(&ex);
            drop(ex);
            eprintln!("connection future {conn} bytes, exchange future {exchange} bytes");
            assert!(conn <= 768, "connection future is {conn} bytes");
        });
    }
}
