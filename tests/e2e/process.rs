//! Tests through the `ringway` binary: signals, memory, the CLI.

use crate::support::origin::{checksum, pattern};
use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ringway");

struct Proc {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

fn spawn(routes: &str) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes).unwrap();
    let config = dir.path().join("ringway.toml");
    std::fs::write(
        &config,
        "[workers]\ncount = 2\npin = false\n[listen]\nhttp = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[timeouts]\nshutdown_grace_ms = 5000\n[limits]\nbody_bytes_max = 4294967296\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = field(&line, "http_addr=") {
                let _ = tx.send(a);
            }
            l2.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("proxy did not start: {:?}", log.lock().unwrap()));
    Proc {
        child,
        addr,
        _dir: dir,
        log,
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let origin = Origin::start();
    let mut p = spawn(&routes_to(origin.addr));
    let addr = p.addr;
    assert_eq!(get(addr, "app.test", "/warm").status, 200);
    let mut idle = Conn::connect(addr);
    assert_eq!(idle.get("app.test", "/idle").status, 200);
    let slow = std::thread::spawn(move || {
        let mut c = Conn::connect(addr);
        c.get("app.test", "/slow/1500")
    });
    std::thread::sleep(Duration::from_millis(300));
    // SIGHUP is not a reason to stop.
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(get(addr, "app.test", "/after-hup").status, 200);
    // SAFETY: as above.
    let rc = unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let t = Instant::now();
    assert!(
        idle.is_closed(),
        "idle keep-alive connections are closed at shutdown"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "no new connections after shutdown starts"
    );
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "the in-flight request completes");
    assert_eq!(r.text(), "slow");
    assert_eq!(r.header("connection"), Some("close"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit status {status:?}; log: {:?}",
        p.log.lock().unwrap()
    );
}

#[test]
fn streaming_1gib_both_ways_keeps_memory_flat() {
    const N: u64 = 1 << 30;
    let origin = Origin::start();
    let p = spawn(&routes_to(origin.addr));
    let pid = p.child.id();
    // Warm up buffers and pools, then take the baseline.
    for _ in 0..10 {
        get(p.addr, "app.test", "/source/100000");
    }
    let baseline = rss_kib(pid);
    let peak = Arc::new(Mutex::new(baseline));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = rss_kib(pid);
                let mut pk = peak.lock().unwrap();
                *pk = (*pk).max(r);
                drop(pk);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Upload.
    let mut c = Conn::connect(p.addr);
    c.send(
        format!("POST /sink HTTP/1.1\r\nHost: app.test\r\nContent-Length: {N}\r\n\r\n").as_bytes(),
    );
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = 0u64;
    let mut off = 0u64;
    while off < N {
        let k = ((N - off) as usize).min(buf.len());
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        sum = checksum(sum, &buf[..k], off);
        c.stream.write_all(&buf[..k]).unwrap();
        off += k as u64;
    }
    let r = c.read_response(false).unwrap();
    assert_eq!(r.text(), format!("len={N} sum={sum}"));

    // Download, read in pieces (never whole).
    c.send(format!("GET /source/{N} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes());
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.contains(&format!("Content-Length: {N}")), "{head}");
    let mut got = 0u64;
    let mut sum_down = 0u64;
    while got < N {
        let want = ((N - got) as usize).min(buf.len());
        let n = c.stream.read(&mut buf[..want]).unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        for (j, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(got + j as u64), "byte {}", got + j as u64);
        }
        sum_down = checksum(sum_down, &buf[..n], got);
        got += n as u64;
    }
    assert_ne!(sum_down, 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = *peak.lock().unwrap();
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "proxy RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB over 2 GiB streamed"
    );
    assert!(
        growth < 16 * 1024,
        "RSS grew by {growth} KiB while streaming 1 GiB each way"
    );
}

#[test]
fn check_config_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[routes]\nfile = \"r.toml\"\n").unwrap();
    std::fs::write(
        dir.path().join("r.toml"),
        "[[route]]\nname = \"a\"\nhosts = [\"a.test\"]\nupstreams = [\"127.0.0.1:1\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 host patterns"));

    std::fs::write(
        dir.path().join("r.toml"),
        "[[route]]\nname = \"a\"\nupstreams = []\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("r.toml") && err.contains("no upstreams"),
        "{err}"
    );

    std::fs::write(&config, "[limits]\nheader_bytes_max = 10\n").unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.header_bytes_max"));

    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("serve") && help.contains("check-config"),
        "{help}"
    );
}
