//! The last-known-good snapshot on local disk: everything the database store served, so a
//! node that restarts while the database is down still serves (boot from the snapshot, then
//! catch up).
//!
//! JSON, written to a temporary file (mode 0600: it holds private keys), synced, then renamed
//! over the old one, so a crash leaves either the old or the new snapshot, never half of one.
//! Routes are grouped by the route they share, so a million domains of a few thousand
//! deployments do not repeat their upstreams a million times.

use crate::certs;
use ringway_core::route::{Hsts, Route, RouteSet};
use ringway_core::snapshot::Snapshot;
use ringway_core::tls::CertSet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

const FORMAT: u32 = 1;

/// A certificate as served: its PEM inputs, and the names it is served for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertSource {
    pub name: String,
    pub hosts: Vec<String>,
    pub is_default: bool,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RouteGroup {
    hosts: Vec<String>,
    name: String,
    project_id: i64,
    environment_id: i64,
    deployment_id: i64,
    /// Strings in snapshots of earlier versions (plain addresses), tables now.
    upstreams: Vec<crate::balance_spec::UpstreamEntry>,
    #[serde(default)]
    balance: crate::balance_spec::BalanceSettings,
    body_bytes_max: Option<u64>,
    redirect_https: bool,
    hsts: Option<(u32, bool, bool)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    format: u32,
    written_unix: i64,
    routes: Vec<RouteGroup>,
    certificates: Vec<CertSource>,
    acme: BTreeMap<String, String>,
    /// Edge policies as specs (built again when read).
    #[serde(default)]
    policies: Vec<crate::policy_spec::PolicySpec>,
}

/// Why a snapshot could not be read or written.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a snapshot: {message}")]
    Invalid { path: String, message: String },
}

/// Writes the snapshot of `routes`, `certs` and `acme` to `path` atomically.
pub fn write(
    path: &Path,
    routes: &HashMap<String, Arc<Route>>,
    certs: &[CertSource],
    acme: &HashMap<String, Box<str>>,
    policies: &[crate::policy_spec::PolicySpec],
) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut groups: HashMap<*const Route, RouteGroup> = HashMap::new();
    for (host, r) in routes {
        groups
            .entry(Arc::as_ptr(r))
            .or_insert_with(|| {
                let (upstreams, balance) = crate::balance_spec::settings_of(&r.cluster.spec);
                RouteGroup {
                    hosts: Vec::new(),
                    name: r.name.to_string(),
                    project_id: r.project_id,
                    environment_id: r.environment_id,
                    deployment_id: r.deployment_id,
                    upstreams,
                    balance,
                    body_bytes_max: r.body_bytes_max,
                    redirect_https: r.redirect_https,
                    hsts: r
                        .hsts
                        .map(|h| (h.max_age_s, h.include_subdomains, h.preload)),
                }
            })
            .hosts
            .push(host.clone());
    }
    let file = File {
        format: FORMAT,
        written_unix: certs::unix_now(),
        routes: groups.into_values().collect(),
        certificates: certs.to_vec(),
        acme: acme
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        policies: policies.to_vec(),
    };
    let text = serde_json::to_vec(&file).map_err(|e| SnapshotError::Invalid {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What a snapshot file held: the snapshot (certificates validated again; refused ones are
/// listed in `certs.refused`), the certificate sources, and when it was written.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub certs: Vec<CertSource>,
    pub written_unix: i64,
}

/// Reads a snapshot; Ok(None) when there is none.
pub fn read(path: &Path) -> Result<Option<Loaded>, SnapshotError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let invalid = |message: String| SnapshotError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let file: File = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if file.format != FORMAT {
        return Err(invalid(format!(
            "format {} (this binary reads {FORMAT})",
            file.format
        )));
    }
    let mut routes = RouteSet::default();
    for g in file.routes {
        let spec = crate::balance_spec::build(&g.upstreams, &g.balance)
            .map_err(|e| invalid(format!("route {:?}: {e}", g.name)))?;
        let r = Arc::new(Route {
            name: g.name.into(),
            project_id: g.project_id,
            environment_id: g.environment_id,
            deployment_id: g.deployment_id,
            cluster: Arc::new(ringway_core::balance::Cluster::unbound(spec)),
            body_bytes_max: g.body_bytes_max,
            redirect_https: g.redirect_https,
            hsts: g.hsts.map(|(max_age_s, include_subdomains, preload)| Hsts {
                max_age_s,
                include_subdomains,
                preload,
            }),
        });
        for h in g.hosts {
            routes.hosts.insert(h, r.clone());
        }
    }
    let now = certs::unix_now();
    let mut set = CertSet::default();
    let mut kept = Vec::new();
    for c in file.certificates {
        match certs::load(
            &c.name,
            c.cert_pem.as_bytes(),
            c.key_pem.as_bytes(),
            Some(&c.hosts),
            now,
        ) {
            Ok(e) => {
                let e = Arc::new(e);
                for h in &c.hosts {
                    set.by_name.insert(h.clone(), e.clone());
                }
                if c.is_default {
                    set.default = Some(e.clone());
                }
                set.entries.insert(c.name.clone(), e);
                kept.push(c);
            }
            Err(err) => {
                tracing::error!(certificate = %c.name, error = %err, "certificate in the snapshot refused");
                set.refused.push((c.name.clone(), err.reason()));
            }
        }
    }
    Ok(Some(Loaded {
        snapshot: Snapshot {
            routes,
            certs: set,
            acme: file
                .acme
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_str()))
                .collect(),
            policies: crate::policy_spec::build_set(&file.policies).map_err(invalid)?,
        },
        certs: kept,
        written_unix: file.written_unix,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_shares_routes_and_keeps_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/snapshot.json");
        let r = Arc::new(Route {
            name: "deployment-7".into(),
            project_id: 1,
            environment_id: 2,
            deployment_id: 7,
            cluster: Arc::new(ringway_core::balance::Cluster::unbound(
                ringway_core::balance::ClusterSpec::of_addrs(&["127.0.0.1:3000".parse().unwrap()]),
            )),
            body_bytes_max: Some(10),
            redirect_https: true,
            hsts: Some(Hsts {
                max_age_s: 60,
                include_subdomains: true,
                preload: false,
            }),
        });
        let mut routes = HashMap::new();
        routes.insert("a.test".to_string(), r.clone());
        routes.insert("*.a.test".to_string(), r);
        let (cert_pem, key_pem) = certs::self_signed(&["a.test".into()]).unwrap();
        let c = CertSource {
            name: "a.test".into(),
            hosts: vec!["a.test".into()],
            is_default: true,
            cert_pem,
            key_pem,
        };
        let mut acme = HashMap::new();
        acme.insert("tok".to_string(), "tok.key".into());
        let pol: crate::policy_spec::PolicySpec =
            toml::from_str("project_id = 1\ndeny = [\"10.0.0.0/8\"]").unwrap();
        write(
            &path,
            &routes,
            std::slice::from_ref(&c),
            &acme,
            std::slice::from_ref(&pol),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let l = read(&path).unwrap().unwrap();
        let hosts = &l.snapshot.routes.hosts;
        assert_eq!(hosts.len(), 2);
        assert!(Arc::ptr_eq(&hosts["a.test"], &hosts["*.a.test"]));
        assert_eq!(hosts["a.test"].hsts.unwrap().max_age_s, 60);
        assert!(l.snapshot.certs.default.is_some());
        assert_eq!(l.certs, vec![c]);
        assert_eq!(&*l.snapshot.acme["tok"], "tok.key");
        assert!(!l.snapshot.policies.by_project[&1].ip_allowed("10.1.1.1".parse().unwrap()));
        assert!(read(&dir.path().join("none.json")).unwrap().is_none());
        std::fs::write(&path, b"{").unwrap();
        assert!(read(&path).is_err());
    }
}
