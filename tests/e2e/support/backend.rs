//! `Backend`: an upstream for the load-balancer tests that can be stopped (its port then
//! refuses connections, and its open connections are cut) and started again on the same
//! port, made slow, made to hang, or made to fail its health check. Every response names the
//! backend (`X-Backend`), so a test sees where each request went.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal = 0,
    /// Reads requests and never answers.
    Hang = 1,
    /// Closes the connection after reading a request, answering nothing.
    Reset = 2,
}

#[derive(Debug, Default)]
struct State {
    running: AtomicBool,
    generation: AtomicUsize,
    /// Requests answered or swallowed (not health checks).
    requests: AtomicUsize,
    health_checks: AtomicUsize,
    /// Connections open now (their threads still serving).
    open: AtomicUsize,
    delay_ms: AtomicU64,
    mode: AtomicUsize,
    unhealthy: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let l = TcpListener::bind(addr).unwrap();
        let b = Backend {
            name: name.into(),
            addr: l.local_addr().unwrap(),
            state: Arc::default(),
        };
        b.serve(l);
        b
    }

    fn serve(&self, l: TcpListener) {
        let st = self.state.clone();
        st.running.store(true, Ordering::SeqCst);
        let generation = st.generation.load(Ordering::SeqCst);
        l.set_nonblocking(true).unwrap();
        let name = self.name.clone();
        std::thread::spawn(move || {
            while st.generation.load(Ordering::SeqCst) == generation {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let _ = c.set_nodelay(true);
                        let _ = c.set_nodelay(true);
                        if let Ok(k) = c.try_clone() {
                            st.conns.lock().unwrap().push(k);
                        }
                        let (st, name) = (st.clone(), name.clone());
                        std::thread::spawn(move || conn(c, &st, &name, generation));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // The listener drops here: the port refuses connections.
        });
    }

    /// Stops listening and cuts every open connection.
    pub fn stop(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.running.store(false, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Let the accept loop notice and drop the listener.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Listens again on the same port.
    pub fn restart(&self) {
        let mut tries = 0;
        let l = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.serve(l);
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Connections the proxy holds open to this backend now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.mode.store(m as usize, Ordering::SeqCst);
    }

    /// `/healthz` answers 503 (other paths still 200).
    pub fn set_unhealthy(&self, v: bool) {
        self.state.unhealthy.store(v, Ordering::SeqCst);
    }
}

/// Shuts the connection down when its thread ends (a clone stays in `State::conns`).
struct Closer<'a>(TcpStream, &'a AtomicUsize);

impl Drop for Closer<'_> {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

fn conn(c: TcpStream, st: &State, name: &str, generation: usize) {
    let Ok(mut w) = c.try_clone() else { return };
    let Ok(k) = c.try_clone() else { return };
    st.open.fetch_add(1, Ordering::SeqCst);
    let _closer = Closer(k, &st.open);
    let mut r = BufReader::new(c);
    loop {
        let mut path = String::new();
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first {
                path = line.split(' ').nth(1).unwrap_or("/").to_string();
                first = false;
            } else if line == "\r\n" {
                break;
            }
        }
        if st.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if path == "/healthz" {
            st.health_checks.fetch_add(1, Ordering::SeqCst);
            let status = if st.unhealthy.load(Ordering::SeqCst) {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = write!(
                w,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        st.requests.fetch_add(1, Ordering::SeqCst);
        match st.mode.load(Ordering::SeqCst) {
            1 => {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            2 => return,
            _ => {}
        }
        let d = st.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        // One write: head and body in two would meet Nagle and delayed ACKs (40 ms).
        let resp = format!(
            "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n{name}",
            name.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
