//! The file store: routes, certificates and ACME tokens from a TOML file, reloaded when the
//! file (or a certificate file, or the ACME directory) changes.
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
//! redirect_https = true           # optional: plain HTTP gets 301/308 to HTTPS
//! hsts_max_age_s = 31536000       # optional: Strict-Transport-Security on HTTPS
//! hsts_include_subdomains = true
//! hsts_preload = false
//!
//! [[certificate]]
//! name = "shop"
//! cert = "tls/shop.crt"           # PEM chain, leaf first (relative to this file)
//! key = "tls/shop.key"
//! hosts = ["shop.example.com"]    # optional: names it must cover (default: its own names)
//! self_signed_if_missing = false  # development: generate one for `hosts` if the files are absent
//!
//! [tls]
//! default_certificate = "shop"    # optional: for ClientHellos without a known name
//!
//! [acme]
//! challenge_dir = "acme"          # optional: files named by token, holding the key authorization
//! ```
//!
//! Everything is checked every `routes.poll_interval_ms` (size, modification time, inode, then
//! content). A routes file that does not parse or validate is reported once per change and
//! ignored: what is in force stays. A certificate that is refused (key mismatch, expired, not
//! covering its names) is reported and its previous version, if any, stays in service.

use crate::certs;
use crate::store::{RouteStore, StoreError, StoreEvent};
use ringway_core::RouteSet;
use ringway_core::balance::Cluster;
use ringway_core::route::{Hsts, Route, normalize_pattern};
use ringway_core::snapshot::Snapshot;
use ringway_core::tls::{CertEntry, CertSet};
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most routes one file may hold.
pub const ROUTES_MAX: usize = 2_000_000;
/// Most certificates one file may name.
pub const CERTIFICATES_MAX: usize = 100_000;
/// Most ACME tokens read from the challenge directory, and the largest answer.
pub const ACME_TOKENS_MAX: usize = 10_000;
pub const ACME_ANSWER_BYTES_MAX: u64 = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    default: Option<String>,
    #[serde(default, rename = "route")]
    routes: Vec<RouteEntry>,
    #[serde(default, rename = "certificate")]
    certificates: Vec<CertSpec>,
    #[serde(default)]
    tls: TlsSection,
    #[serde(default)]
    acme: AcmeSection,
    #[serde(default, rename = "policy")]
    policies: Vec<crate::policy_spec::PolicySpec>,
}

/// A certificate the file names.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub self_signed_if_missing: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    #[serde(default)]
    default_certificate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcmeSection {
    #[serde(default)]
    challenge_dir: Option<PathBuf>,
}

/// The parts of a routes file that need the file system to become a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileExtras {
    pub policies: ringway_core::policy::PolicySet,
    pub certificates: Vec<CertSpec>,
    pub default_certificate: Option<String>,
    pub acme_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    upstreams: Vec<crate::balance_spec::UpstreamEntry>,
    #[serde(default)]
    balancer: Option<crate::balance_spec::BalancerSection>,
    #[serde(default)]
    health_check: Option<crate::balance_spec::HealthSection>,
    #[serde(default)]
    outlier: Option<crate::balance_spec::OutlierSection>,
    #[serde(default)]
    project_id: i64,
    #[serde(default)]
    environment_id: i64,
    #[serde(default)]
    deployment_id: i64,
    #[serde(default)]
    body_bytes_max: Option<u64>,
    #[serde(default)]
    redirect_https: bool,
    #[serde(default)]
    hsts_max_age_s: Option<u32>,
    #[serde(default)]
    hsts_include_subdomains: bool,
    #[serde(default)]
    hsts_preload: bool,
}

/// Parses and validates the routes of a routes file.
pub fn parse_routes(text: &str) -> Result<RouteSet, String> {
    parse_file(text).map(|(set, _)| set)
}

/// Parses and validates a routes file: the routes, and what it says about certificates and
/// ACME tokens.
pub fn parse_file(text: &str) -> Result<(RouteSet, FileExtras), String> {
    let file: RoutesFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.certificates.len() > CERTIFICATES_MAX {
        return Err(format!(
            "{} certificates; at most {CERTIFICATES_MAX}",
            file.certificates.len()
        ));
    }
    let mut cert_names = std::collections::HashSet::new();
    for c in &file.certificates {
        if c.name.is_empty() || !cert_names.insert(c.name.as_str()) {
            return Err(format!("certificate {:?}: empty or duplicate name", c.name));
        }
        if c.self_signed_if_missing && c.hosts.as_ref().is_none_or(|h| h.is_empty()) {
            return Err(format!(
                "certificate {:?}: self_signed_if_missing needs hosts",
                c.name
            ));
        }
    }
    if let Some(d) = &file.tls.default_certificate
        && !cert_names.contains(d.as_str())
    {
        return Err(format!("default certificate {d:?} is not defined"));
    }
    let extras = FileExtras {
        policies: crate::policy_spec::build_set(&file.policies)?,
        certificates: file.certificates.clone(),
        default_certificate: file.tls.default_certificate.clone(),
        acme_dir: file.acme.challenge_dir.clone(),
    };
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
        let settings = crate::balance_spec::BalanceSettings {
            balancer: e.balancer.clone(),
            health_check: e.health_check.clone(),
            outlier: e.outlier.clone(),
        };
        let spec = crate::balance_spec::build(&e.upstreams, &settings)
            .map_err(|err| format!("{}: {err}", at()))?;
        let route = Arc::new(Route {
            name: e.name.as_str().into(),
            project_id: e.project_id,
            environment_id: e.environment_id,
            deployment_id: e.deployment_id,
            cluster: Arc::new(Cluster::unbound(spec)),
            body_bytes_max: e.body_bytes_max,
            redirect_https: e.redirect_https,
            hsts: e.hsts_max_age_s.map(|max_age_s| Hsts {
                max_age_s,
                include_subdomains: e.hsts_include_subdomains,
                preload: e.hsts_preload,
            }),
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
    Ok((set, extras))
}

/// Builds a complete snapshot from a routes file's text: routes, then the certificates it
/// names (read relative to `base`; refused ones keep their `previous` version, if any), then
/// the ACME tokens. Refusals that do not invalidate the file are returned as warnings.
pub fn build_snapshot(
    text: &str,
    base: &Path,
    previous: &HashMap<String, Arc<CertEntry>>,
) -> Result<(Snapshot, Vec<String>), String> {
    let (routes, extras) = parse_file(text)?;
    let mut warnings = Vec::new();
    let mut certs = CertSet::default();
    let now = certs::unix_now();
    for spec in &extras.certificates {
        match load_cert(spec, base, previous.get(&spec.name), now) {
            Ok(entry) => {
                certs.entries.insert(spec.name.clone(), entry);
            }
            Err((reason, why)) => {
                certs.refused.push((spec.name.clone(), reason));
                let kept = previous.get(&spec.name).cloned();
                warnings.push(format!(
                    "certificate {:?} refused: {why}{}",
                    spec.name,
                    if kept.is_some() {
                        "; the previous version stays in service"
                    } else {
                        ""
                    }
                ));
                if let Some(k) = kept {
                    certs.entries.insert(spec.name.clone(), k);
                }
            }
        }
    }
    for spec in &extras.certificates {
        let Some(entry) = certs.entries.get(&spec.name) else {
            continue;
        };
        let names: Vec<String> = match &spec.hosts {
            Some(h) => h
                .iter()
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            None => entry.names.iter().map(|n| n.to_string()).collect(),
        };
        for n in names {
            if let Some(other) = certs.by_name.insert(n.clone(), entry.clone())
                && !Arc::ptr_eq(&other, entry)
            {
                warnings.push(format!(
                    "{n:?} is named by certificates {:?} and {:?}; {:?} serves it",
                    other.name, entry.name, entry.name
                ));
            }
        }
    }
    if let Some(d) = &extras.default_certificate {
        certs.default = certs.entries.get(d).cloned();
    }
    let acme = match &extras.acme_dir {
        Some(dir) => read_acme_dir(&resolve(base, dir), &mut warnings),
        None => HashMap::new(),
    };
    Ok((
        Snapshot {
            routes,
            certs,
            acme,
            policies: extras.policies.clone(),
        },
        warnings,
    ))
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Reads and validates one certificate; reuses `previous` when the files did not change.
/// Errors are (reason label, message).
fn load_cert(
    spec: &CertSpec,
    base: &Path,
    previous: Option<&Arc<CertEntry>>,
    now: i64,
) -> Result<Arc<CertEntry>, (&'static str, String)> {
    let cert_path = resolve(base, &spec.cert);
    let key_path = resolve(base, &spec.key);
    if spec.self_signed_if_missing && !cert_path.exists() && !key_path.exists() {
        let hosts = spec.hosts.clone().unwrap_or_default();
        let (c, k) = certs::self_signed(&hosts).map_err(|e| ("generate", e.to_string()))?;
        for (path, text) in [(&cert_path, c), (&key_path, k)] {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| ("generate", format!("creating {}: {e}", dir.display())))?;
            }
            std::fs::write(path, text)
                .map_err(|e| ("generate", format!("writing {}: {e}", path.display())))?;
        }
        tracing::warn!(certificate = %spec.name, cert = %cert_path.display(), "generated a self-signed certificate (development only)");
    }
    let chain = std::fs::read(&cert_path).map_err(|e| {
        (
            "unreadable",
            format!("reading {}: {e}", cert_path.display()),
        )
    })?;
    let key = std::fs::read(&key_path)
        .map_err(|e| ("unreadable", format!("reading {}: {e}", key_path.display())))?;
    if let Some(p) = previous
        && p.fingerprint == certs::fingerprint(&chain, &key)
        && p.not_after_unix >= now
    {
        return Ok(p.clone());
    }
    certs::load(&spec.name, &chain, &key, spec.hosts.as_deref(), now)
        .map(Arc::new)
        .map_err(|e| (e.reason(), e.to_string()))
}

/// Token files of an ACME HTTP-01 challenge directory (as certbot's webroot writes them).
fn read_acme_dir(dir: &Path, warnings: &mut Vec<String>) -> HashMap<String, Box<str>> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        // Absent until the ACME client creates it: not an error.
        return out;
    };
    for entry in rd.flatten() {
        if out.len() >= ACME_TOKENS_MAX {
            warnings.push(format!(
                "{}: more than {ACME_TOKENS_MAX} tokens; the rest are ignored",
                dir.display()
            ));
            break;
        }
        let name = entry.file_name();
        let Some(token) = name.to_str() else { continue };
        // RFC 8555 §8.3: tokens are base64url.
        if token.is_empty()
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() || meta.len() > ACME_ANSWER_BYTES_MAX {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            out.insert(token.to_string(), text.trim().into());
        }
    }
    out
}

/// Reads a routes file and builds its snapshot (for `check-config` and the first load).
/// Certificate refusals are errors here: at start there is no previous version to keep.
pub fn load_routes_file(path: &Path) -> Result<Snapshot, StoreError> {
    load_routes_file_hashed(path).map(|(s, _)| s)
}

/// Like [`load_routes_file`], also returning the content hash to hand to [`FileStore::new`].
pub fn load_routes_file_hashed(path: &Path) -> Result<(Snapshot, u64), StoreError> {
    let invalid = |message: String| StoreError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| StoreError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let hash = content_hash(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8".into()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let (snap, warnings) = build_snapshot(&text, base, &HashMap::new()).map_err(invalid)?;
    if let Some(w) = warnings.into_iter().next() {
        return Err(invalid(w));
    }
    Ok((snap, hash))
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

/// Watches a routes file and the files it names.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    interval: Duration,
    /// Stamps of the routes file, then of every certificate and key file and the ACME
    /// directory it named at the last load.
    stamps: Vec<Option<Stamp>>,
    watched: Vec<PathBuf>,
    hash: Option<u64>,
    started: bool,
    /// Last good version of every certificate, by name.
    certs: HashMap<String, Arc<CertEntry>>,
}

impl FileStore {
    /// `loaded`: the snapshot already applied and its routes file hash (from
    /// [`load_routes_file_hashed`]); the store then emits nothing until something changes.
    pub fn new(path: PathBuf, interval: Duration, loaded: Option<(&Snapshot, u64)>) -> Self {
        let mut s = Self {
            path,
            interval,
            stamps: Vec::new(),
            watched: Vec::new(),
            hash: loaded.map(|(_, h)| h),
            started: false,
            certs: loaded
                .map(|(snap, _)| snap.certs.entries.clone())
                .unwrap_or_default(),
        };
        s.watch_list();
        s
    }

    fn base(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Recomputes the files to watch from the routes file as it is now.
    fn watch_list(&mut self) {
        let mut watched = vec![self.path.clone()];
        if let Ok(text) = std::fs::read_to_string(&self.path)
            && let Ok((_, extras)) = parse_file(&text)
        {
            let base = self.base();
            for c in &extras.certificates {
                watched.push(resolve(&base, &c.cert));
                watched.push(resolve(&base, &c.key));
            }
            if let Some(d) = &extras.acme_dir {
                watched.push(resolve(&base, d));
            }
        }
        self.stamps = watched.iter().map(|p| stamp(p)).collect();
        self.watched = watched;
    }

    fn read(&mut self, force: bool) -> Result<Option<StoreEvent>, StoreError> {
        let path = self.path.display().to_string();
        let bytes = std::fs::read(&self.path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let h = content_hash(&bytes);
        if self.hash == Some(h) && !force {
            return Ok(None);
        }
        self.hash = Some(h);
        let text = String::from_utf8(bytes).map_err(|_| StoreError::Invalid {
            path: path.clone(),
            message: "not UTF-8".into(),
        })?;
        let (snap, warnings) = build_snapshot(&text, &self.base(), &self.certs)
            .map_err(|message| StoreError::Invalid { path, message })?;
        for w in &warnings {
            tracing::error!(file = %self.path.display(), "{w}");
        }
        self.certs = snap.certs.entries.clone();
        Ok(Some(StoreEvent::Full(snap)))
    }
}

impl RouteStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn next(&mut self) -> Result<StoreEvent, StoreError> {
        if !self.started {
            self.started = true;
            if let Some(ev) = self.read(false)? {
                return Ok(ev);
            }
        }
        loop {
            tokio::time::sleep(self.interval).await;
            let now: Vec<Option<Stamp>> = self.watched.iter().map(|p| stamp(p)).collect();
            if now == self.stamps || now.first().is_some_and(|s| s.is_none()) {
                // Unchanged, or the routes file is missing (mid-rename): keep what is in force.
                continue;
            }
            let routes_changed = now.first() != self.stamps.first();
            self.watch_list();
            // A certificate or ACME change re-reads everything, even if the routes file
            // content is the same.
            if let Some(ev) = self.read(!routes_changed)? {
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
        assert_eq!(app.cluster.members().len(), 3);
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
                "[[route]]\nname = \"a\"\nhosts = [\"a.com\"]\nupstreams = [\"example.org\"]\n",
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
        assert!(matches!(store.next().await, Ok(StoreEvent::Full(s)) if s.routes.hosts.len() == 2));

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
        assert!(matches!(r, Ok(StoreEvent::Full(s)) if s.routes.hosts.contains_key("b.com")));
    }
}
