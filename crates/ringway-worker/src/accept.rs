//! Listener sockets and the accept loop.
//!
//! Every worker has its own listening socket on the same address (SO_REUSEPORT): the kernel
//! spreads new connections over the workers, and no accept lock or shared queue exists in
//! user space. Sockets are bound on the main thread before the workers start, so a bind error
//! stops the process at once and port 0 resolves to one port shared by all workers.

use crate::conn;
use crate::worker::Worker;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Binds `count` SO_REUSEPORT listeners on `addr`. With port 0, the first socket picks the
/// port and the others join it.
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let l = bind_one(addr, backlog)?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(s.into())
}

/// Accepts until shutdown, one task per connection. At `connections_per_worker_max` the loop
/// pauses until a connection closes; the kernel backlog holds new arrivals meanwhile.
pub async fn accept_loop(w: Rc<Worker>, listener: monoio::net::TcpListener, tls: bool) {
    let mut last_error_log: Option<Instant> = None;
    loop {
        if w.shutdown.is_fired() {
            break;
        }
        if w.active.get() >= w.settings.connections_max {
            w.stats.accept_paused.inc();
            monoio::select! {
                _ = w.slot_freed.wait() => continue,
                _ = w.shutdown.wait() => break,
            }
        }
        let accepted = monoio::select! {
            biased;
            _ = w.shutdown.wait() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                set_cloexec(&stream);
                w.stats.connections_accepted.inc();
                let proxied = w.settings.proxy_protocol
                    && ringway_core::cidr::any_contains(&w.settings.proxy_protocol_from, peer.ip());
                let Ok(counted) = count_client(&w, peer, proxied) else {
                    // Closed at once, before anything is read or allocated for it.
                    w.stats.connections_refused_per_client.inc();
                    drop(stream);
                    continue;
                };
                w.active.set(w.active.get() + 1);
                w.stats.connections_active.inc();
                // The connection frees its slot when it closes (conn::closed), whether from
                // this task or, after parking, from the parking lot or a resumed task.
                if proxied {
                    monoio::spawn(conn::serve_proxied(
                        w.clone(),
                        stream,
                        peer,
                        Instant::now(),
                        tls,
                    ));
                } else if tls {
                    monoio::spawn(conn::serve_tls(
                        w.clone(),
                        stream,
                        peer,
                        Instant::now(),
                        counted,
                    ));
                } else {
                    monoio::spawn(conn::serve(
                        w.clone(),
                        stream,
                        peer,
                        Instant::now(),
                        counted,
                    ));
                }
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: back off instead of spinning on the same error, and
                // say so at most once a second.
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(worker = w.id, error = %e, "accept failed");
                    last_error_log = Some(Instant::now());
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Counts a new connection against `limits.connections_per_client_max`. `Ok(None)`: not
/// counted (no limit, or a trusted proxy or PROXY protocol balancer, which carries many
/// clients); `Err`: the client is at its limit.
fn count_client(
    w: &Worker,
    peer: SocketAddr,
    proxied: bool,
) -> Result<Option<crate::clients::ClientKey>, ()> {
    let max = w.settings.connections_per_client_max;
    if max == 0 || proxied || crate::access::is_trusted(peer.ip(), &w.settings.trusted_proxies) {
        return Ok(None);
    }
    let key = crate::clients::ClientKey::of(peer.ip());
    if w.clients.borrow_mut().admit(key, max) {
        Ok(Some(key))
    } else {
        Err(())
    }
}

/// monoio's io_uring accept passes no flags, so accepted sockets lack close-on-exec and would
/// stay open in any program this process starts (the client would not see the connection
/// close until that program exits).
fn set_cloexec(stream: &monoio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    // SAFETY: `fd` is the open socket owned by `stream`; F_SETFD takes an integer flag and
    // touches no memory.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    debug_assert!(rc == 0, "fcntl(F_SETFD) on an open socket");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_are_close_on_exec() {
        use std::os::fd::AsRawFd;
        if !monoio::utils::detect_uring() {
            return; // Only io_uring's accept lacks the flag.
        }
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().await.unwrap();
            set_cloexec(&s);
            // SAFETY: querying the flags of an open fd.
            let flags = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        });
    }

    #[test]
    fn port_zero_is_shared() {
        let ls = bind_listeners("127.0.0.1:0".parse().unwrap(), 3, 128).unwrap();
        let ports: Vec<u16> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
        assert_ne!(ports[0], 0);
        assert!(ports.iter().all(|&p| p == ports[0]));
    }
}
