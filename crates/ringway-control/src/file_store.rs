//! The file store: routes from a TOML file, reloaded when the file changes.
//!
//! ```toml
//! default = "fallback"            # optional: route for hosts nothing else matches
//!
//! [[route]]
//! name = "shop"
//! hosts = ["shop.example.com", "*.shop.example.com"]
//! upstreams = ["10.0.0.5:3000", "10.0.0.6:3000"]
//! project_id = 1                  # ids end up in every log record
//! environment_id = 1
//! deployment_id = 7
//! body_bytes_max = 10485760       # optional, else limits.body_bytes_max
//! ```
//!
//! The file is checked every `routes.poll_interval_ms` (size, modification time, inode, then
//! content). A file that does not parse or validate is reported once per change and ignored:
//! the routes in force stay until a valid file appears.

use crate::store::{RouteStore, StoreError, StoreEvent};
use ringway_core::RouteSet;
use ringway_core::route::{Route, normalize_pattern};
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most routes one file may hold.
pub const ROUTES_MAX: usize = 2_000_000;
/// Most upstreams one route may list.
pub const UPSTREAMS_PER_ROUTE_MAX: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    default: Option<String>,
    #[serde(default, rename = "route")]
    routes: Vec<RouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    upstreams: Vec<String>,
    #[serde(default)]
    project_id: i64,
    #[serde(default)]
    environment_id: i64,
    #[serde(default)]
    deployment_id: i64,
    #[serde(default)]
    body_bytes_max: Option<u64>,
}

/// Parses an upstream address: `IP:port`, `[v6]:port` or `localhost:port`. Names are not
/// resolved: the data path must never wait on DNS, and the platform knows its addresses.
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let port = s.strip_prefix("localhost:")?.parse::<u16>().ok()?;
    Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

/// Parses and validates a routes file.
pub fn parse_routes(text: &str) -> Result<RouteSet, String> {
    let file: RoutesFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.routes.len() > ROUTES_MAX {
        return Err(format!(
            "{} routes; at most {ROUTES_MAX}",
            file.routes.len()
        ));
    }
    let mut by_name: HashMap<String, Arc<Route>> = HashMap::with_capacity(file.routes.len());
    let mut set = RouteSet::default();
    for (i, e) in file.routes.into_iter().enumerate() {
        let at = || format!("route #{} ({:?})", i + 1, e.name);
        if e.name.is_empty() {
            return Err(format!("{}: empty name", at()));
        }
        if e.upstreams.is_empty() {
            return Err(format!("{}: no upstreams", at()));
        }
        if e.upstreams.len() > UPSTREAMS_PER_ROUTE_MAX {
            return Err(format!(
                "{}: more than {UPSTREAMS_PER_ROUTE_MAX} upstreams",
                at()
            ));
        }
        let mut ups = Vec::with_capacity(e.upstreams.len());
        for u in &e.upstreams {
            ups.push(parse_upstream(u).ok_or_else(|| {
                format!(
                    "{}: upstream {u:?} is not IP:port (names are not resolved)",
                    at()
                )
            })?);
        }
        let route = Arc::new(Route {
            name: e.name.as_str().into(),
            project_id: e.project_id,
            environment_id: e.environment_id,
            deployment_id: e.deployment_id,
            upstreams: ups.into(),
            body_bytes_max: e.body_bytes_max,
        });
        for h in &e.hosts {
            let pattern = normalize_pattern(h).map_err(|err| format!("{}: {err}", at()))?;
            if let Some(prev) = set.hosts.insert(pattern.clone(), route.clone()) {
                return Err(format!(
                    "{}: host {pattern:?} is already routed to {:?}",
                    at(),
                    prev.name
                ));
            }
        }
        if by_name.insert(e.name.clone(), route).is_some() {
            return Err(format!("{}: duplicate route name", at()));
        }
    }
    if let Some(d) = file.default {
        set.default = Some(
            by_name
                .get(&d)
                .cloned()
                .ok_or_else(|| format!("default route {d:?} is not defined"))?,
        );
    }
    Ok(set)
}

/// Reads and parses a routes file (for `check-config` and the first load).
pub fn load_routes_file(path: &Path) -> Result<RouteSet, StoreError> {
    load_routes_file_hashed(path).map(|(set, _)| set)
}

/// Like [`load_routes_file`], also returning the content hash to hand to [`FileStore::new`], so
/// the store does not apply the same file a second time.
pub fn load_routes_file_hashed(path: &Path) -> Result<(RouteSet, u64), StoreError> {
    let bytes = std::fs::read(path).map_err(|source| StoreError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let hash = content_hash(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| StoreError::Invalid {
        path: path.display().to_string(),
        message: "not UTF-8".into(),
    })?;
    let set = parse_routes(&text).map_err(|message| StoreError::Invalid {
        path: path.display().to_string(),
        message,
    })?;
    Ok((set, hash))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
    })
}

fn content_hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Watches a routes file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    interval: Duration,
    stamp: Option<Stamp>,
    hash: Option<u64>,
    started: bool,
}

impl FileStore {
    /// `loaded`: hash of the content already applied (from [`load_routes_file_hashed`]); the
    /// store then emits nothing until the file changes.
    pub fn new(path: PathBuf, interval: Duration, loaded: Option<u64>) -> Self {
        Self {
            path,
            interval,
            stamp: None,
            hash: loaded,
            started: false,
        }
    }

    fn read(&mut self) -> Result<Option<StoreEvent>, StoreError> {
        let path = self.path.display().to_string();
        let bytes = std::fs::read(&self.path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let h = content_hash(&bytes);
        if self.hash == Some(h) {
            return Ok(None);
        }
        self.hash = Some(h);
        let text = String::from_utf8(bytes).map_err(|_| StoreError::Invalid {
            path: path.clone(),
            message: "not UTF-8".into(),
        })?;
        let set = parse_routes(&text).map_err(|message| StoreError::Invalid { path, message })?;
        Ok(Some(StoreEvent::Full(set)))
    }
}

impl RouteStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn next(&mut self) -> Result<StoreEvent, StoreError> {
        if !self.started {
            self.started = true;
            self.stamp = stamp(&self.path);
            if let Some(ev) = self.read()? {
                return Ok(ev);
            }
        }
        loop {
            tokio::time::sleep(self.interval).await;
            let now = stamp(&self.path);
            if now.is_none() || now == self.stamp {
                // A missing file (mid-rename) is not a change: keep the routes.
                continue;
            }
            self.stamp = now;
            if let Some(ev) = self.read()? {
                return Ok(ev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        default = "fallback"
        [[route]]
        name = "app"
        hosts = ["App.example.com", "*.example.com"]
        upstreams = ["127.0.0.1:3000", "[::1]:3001", "localhost:3002"]
        project_id = 1
        environment_id = 2
        deployment_id = 3
        body_bytes_max = 1024
        [[route]]
        name = "fallback"
        upstreams = ["127.0.0.1:4000"]
    "#;

    #[test]
    fn parses_good_file() {
        let set = parse_routes(GOOD).unwrap();
        assert_eq!(set.hosts.len(), 2);
        let app = &set.hosts["app.example.com"];
        assert_eq!(app.upstreams.len(), 3);
        assert_eq!(app.body_bytes_max, Some(1024));
        assert!(set.hosts.contains_key("*.example.com"));
        assert_eq!(&*set.default.unwrap().name, "fallback");
    }

    #[test]
    fn rejects_bad_files_with_clear_messages() {
        let cases = [
            (
                "[[route]]\nname = \"a\"\nhosts = [\"a.com\"]\nupstreams = []\n",
                "no upstreams",
            ),
            (
                "[[route]]\nname = \"a\"\nhosts = [\"a.com\"]\nupstreams = [\"example.org:80\"]\n",
                "not IP:port",
            ),
            (
                "[[route]]\nname = \"a\"\nhosts = [\"a.com\"]\nupstreams = [\"1.1.1.1:1\"]\n[[route]]\nname = \"b\"\nhosts = [\"A.com\"]\nupstreams = [\"1.1.1.1:1\"]\n",
                "already routed",
            ),
            (
                "[[route]]\nname = \"a\"\nhosts = [\"a.*.com\"]\nupstreams = [\"1.1.1.1:1\"]\n",
                "invalid host pattern",
            ),
            ("default = \"x\"\n", "not defined"),
            (
                "[[route]]\nname = \"a\"\nupstream = [\"1.1.1.1:1\"]\n",
                "unknown field",
            ),
            ("this is not toml", "expected"),
        ];
        for (text, want) in cases {
            let err = parse_routes(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reloads_on_change_and_skips_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, GOOD).unwrap();
        let mut store = FileStore::new(path.clone(), Duration::from_millis(10), None);
        assert!(matches!(store.next().await, Ok(StoreEvent::Full(s)) if s.hosts.len() == 2));

        std::fs::write(&path, "broken [").unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), store.next())
            .await
            .unwrap();
        assert!(matches!(r, Err(StoreError::Invalid { .. })), "{r:?}");

        let tmp = dir.path().join("routes.toml.new");
        std::fs::write(
            &tmp,
            "[[route]]\nname = \"b\"\nhosts = [\"b.com\"]\nupstreams = [\"1.1.1.1:1\"]\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), store.next())
            .await
            .unwrap();
        assert!(matches!(r, Ok(StoreEvent::Full(s)) if s.hosts.contains_key("b.com")));
    }
}
