//! One client connection: waiting for requests, running exchanges one after the other
//! (pipelined requests are answered in order because the next is only read after the previous
//! response is written), and handing off to a tunnel after an upgrade.
//!
//! While idle a connection holds no buffer: it waits for readability (a poll, which owns no
//! memory) and takes a buffer from the worker's pool only when bytes arrive. An idle keep-alive
//! connection therefore costs its task and socket, not a 16 KiB read buffer.

use crate::access;
use crate::io::{RecvBuf, Timed};
use crate::proxy::{self, Client, Next, Upgraded};
use crate::stream;
use crate::worker::Worker;
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Serves a freshly accepted connection until it closes.
pub async fn serve(w: Rc<Worker>, stream: TcpStream, peer: SocketAddr, accepted: Instant) {
    let _ = stream.set_nodelay(true);
    let trusted = access::is_trusted(peer.ip(), &w.settings.trusted_proxies);
    let mut c = Client {
        io: Timed::new(stream),
        peer,
        trusted,
        rb: RecvBuf::default(),
    };
    let max = w.settings.requests_per_connection_max;
    let mut served = 0u64;
    // The first request's head must arrive within the header timeout of the accept.
    let mut deadline = accepted + w.settings.header_read;
    let upgraded = loop {
        if !c.rb.has_unread() {
            let wait = if served == 0 {
                deadline.saturating_duration_since(Instant::now())
            } else {
                w.settings.keepalive_idle
            };
            if let Wait::Done = wait_for_request(&w, &mut c, wait).await {
                break None;
            }
        }
        if served > 0 {
            deadline = Instant::now() + w.settings.header_read;
        }
        served += 1;
        let last = max != 0 && served >= max;
        match Box::pin(proxy::exchange(&w, &mut c, deadline, last)).await {
            Next::KeepAlive if !last && !w.shutdown.is_fired() => {}
            Next::Upgrade(u) => break Some(u),
            Next::Linger => {
                Box::pin(linger(&w, &mut c)).await;
                break None;
            }
            _ => break None,
        }
    };
    tracing::debug!(worker = w.id, %peer, served, "closing connection");
    let Client { io, rb, .. } = c;
    if let Some(u) = upgraded {
        let Upgraded { upstream, mut ex } = *u;
        let bufs = (w.bufs.take(), w.bufs.take());
        let (t, (a, b)) = Box::pin(stream::tunnel(
            io.io,
            upstream,
            bufs,
            w.settings.tunnel_idle,
            w.settings.client_write,
        ))
        .await;
        w.bufs.put(a);
        w.bufs.put(b);
        ex.bytes_in += t.client_to_upstream;
        ex.bytes_out += t.upstream_to_client;
        ex.finish(&w, &rb.buf);
    }
    if rb.buf.capacity() > 0 {
        w.bufs.put(rb.buf);
    }
}

/// Longest a closing connection is drained after an error answer.
const LINGER_TOTAL: Duration = Duration::from_secs(2);
/// Longest wait for more bytes while draining.
const LINGER_READ: Duration = Duration::from_millis(500);

/// Half-closes the connection (the client sees the end of the answer) and reads and discards
/// what the client still sends, for a bounded time, before the socket is closed.
async fn linger(w: &Worker, c: &mut Client) {
    use monoio::io::AsyncWriteRent;
    let _ = c.io.io.shutdown().await;
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

enum Wait {
    /// Bytes are in the receive buffer.
    Data,
    /// The socket is readable; nothing read yet.
    Readable,
    /// Timeout, shutdown, EOF or error: close the connection.
    Done,
}

/// Waits for the next request. A connection that was just busy reads with a posted buffer for
/// up to `hot_read` (one operation per request under load); then it returns the buffer to the
/// pool and waits for readability, holding no memory while idle.
async fn wait_for_request(w: &Worker, c: &mut Client, wait: Duration) -> Wait {
    let hot = w.settings.hot_read.min(wait);
    if !hot.is_zero() && !w.shutdown.is_fired() {
        if c.rb.buf.capacity() == 0 {
            c.rb = RecvBuf::new(w.bufs.take());
        }
        match c.io.fill(&mut c.rb, 1024, hot).await {
            Ok(_) => return Wait::Data,
            Err(crate::error::IoFail::Timeout) => {}
            Err(_) => return Wait::Done,
        }
    }
    if c.rb.buf.capacity() > 0 {
        w.bufs.put(std::mem::take(&mut c.rb.buf));
        c.rb = RecvBuf::default();
    }
    tracing::debug!(worker = w.id, peer = %c.peer, ?wait, "idle wait");
    if idle_wait(w, &c.io.io, wait.saturating_sub(hot)).await {
        Wait::Readable
    } else {
        Wait::Done
    }
}

/// Waits until the client sends something. False on timeout, shutdown or a socket error.
async fn idle_wait(w: &Worker, s: &TcpStream, dur: Duration) -> bool {
    if w.shutdown.is_fired() || dur.is_zero() {
        return false;
    }
    monoio::select! {
        biased;
        r = s.readable(false) => r.is_ok(),
        _ = w.shutdown.wait() => false,
        _ = monoio::time::sleep(dur) => false,
    }
}
