//! Shared test harness: an in-process proxy with its own temp directory, test upstreams and a
//! raw HTTP client.
#![allow(dead_code)]

pub mod backend;
pub mod client;
pub mod origin;
pub mod pg;
pub mod pki;

use ringway_core::config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use client::{Conn, get};
pub use origin::Origin;

/// A proxy running inside the test process.
#[derive(Debug)]
pub struct TestProxy {
    pub running: Option<ringway::Running>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// The HTTPS listener, when the test config turns it on.
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub config: Config,
}

/// Routes sending `hosts` (and, as default, everything else) to `upstream`.
pub fn routes_to(upstream: SocketAddr) -> String {
    format!(
        "default = \"app\"\n[[route]]\nname = \"app\"\nhosts = [\"app.test\", \"*.app.test\"]\nupstreams = [\"{upstream}\"]\nproject_id = 11\nenvironment_id = 22\ndeployment_id = 33\n"
    )
}

/// A config for tests: 2 workers, no pinning, ephemeral ports, access log on, fast reloads.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.workers.count = 2;
    c.workers.pin = false;
    c.listen.http = Some("127.0.0.1:0".parse().unwrap());
    c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    c.routes.poll_interval_ms = 20;
    c.access_log.enabled = true;
    c.access_log.path = "access.log".into();
    c.access_log.drain_interval_ms = 10;
    c.timeouts.shutdown_grace_ms = 3000;
    c
}

impl TestProxy {
    pub fn start(routes: &str) -> TestProxy {
        Self::start_with(routes, |_| {})
    }

    pub fn start_with(routes: &str, tweak: impl FnOnce(&mut Config)) -> TestProxy {
        Self::start_with_files(&[], routes, tweak)
    }

    /// Writes `files` (path relative to the proxy's directory, content) before starting: the
    /// certificates a routes file names, say.
    pub fn start_with_files(
        files: &[(&str, &str)],
        routes: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> TestProxy {
        if std::env::var_os("RINGWAY_TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_env("RINGWAY_TEST_LOG"))
                .with_thread_names(true)
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        std::fs::write(dir.path().join("routes.toml"), routes).unwrap();
        let mut config = test_config();
        tweak(&mut config);
        let running = ringway::start(
            config.clone(),
            dir.path(),
            ringway::Options {
                handle_signals: false,
                allocator_trim: None,
            },
        )
        .unwrap();
        let addr = running.http_addr.unwrap();
        let admin = running.admin_addr.unwrap();
        let https = running.https_addr;
        TestProxy {
            running: Some(running),
            dir,
            addr,
            https,
            admin,
            config,
        }
    }

    /// Stops the proxy and starts it again in the same directory with the same config
    /// (listeners get new ports).
    pub fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
        let running = ringway::start(
            self.config.clone(),
            self.dir.path(),
            ringway::Options {
                handle_signals: false,
                allocator_trim: None,
            },
        )
        .unwrap();
        self.addr = running.http_addr.unwrap();
        self.admin = running.admin_addr.unwrap();
        self.https = running.https_addr;
        self.running = Some(running);
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    /// Replaces the routes file atomically (write then rename), as an operator's tool would.
    pub fn write_routes(&self, text: &str) {
        let tmp = self.dir.path().join("routes.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.routes_path()).unwrap();
    }

    /// Writes a file in the proxy's directory atomically (write, then rename).
    pub fn write_file(&self, name: &str, content: &str) {
        let path = self.dir.path().join(name);
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    pub fn metrics(&self) -> String {
        get(self.admin, "admin", "/metrics").text()
    }

    /// Sum of a per-worker metric over workers (lines `name{worker="N"...} value`).
    pub fn metric_sum(&self, name: &str) -> f64 {
        metric_sum(&self.metrics(), name)
    }

    pub fn running(&self) -> &ringway::Running {
        self.running.as_ref().unwrap()
    }

    /// Stops the proxy (flushing logs) and returns the access log lines.
    pub fn stop(&mut self) -> Vec<serde_json::Value> {
        if let Some(r) = self.running.take() {
            r.stop();
        }
        self.access_log()
    }

    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` until it returns true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether this kernel lets processes use io_uring (then the proxy must be on it).
pub fn kernel_allows_io_uring() -> bool {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) => v.trim() == "0",
        // Older kernels have no such switch: io_uring is available if the syscall exists,
        // which the proxy's own detection decides; don't assert.
        Err(_) => false,
    }
}
