//! Certificates and ACME challenge tokens, shared like routes: the control plane parses and
//! validates them once and publishes ready-to-use keys; workers look them up per handshake
//! (by SNI) and per request (ACME HTTP-01 paths) with no lock.

use foldhash::fast::RandomState;
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A validated certificate, ready for handshakes.
#[derive(Debug)]
pub struct CertEntry {
    /// Name in the store (for logs and metrics).
    pub name: Box<str>,
    pub key: Arc<CertifiedKey>,
    /// DNS names the certificate covers (from its subjectAltName), lower case; wildcards as
    /// `*.example.com`.
    pub names: Box<[Box<str>]>,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Content hash of the PEM it was parsed from (to tell a replaced certificate).
    pub fingerprint: u64,
}

impl CertEntry {
    /// Whether the certificate covers `host` (normalised): an exact name, or a wildcard for
    /// exactly one more label (RFC 6125: `*.example.com` covers `a.example.com`, not
    /// `a.b.example.com` nor `example.com`).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|n| name_covers(n, host))
    }
}

/// Whether certificate name `pattern` covers `host`.
pub fn name_covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => match host.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest == suffix,
            None => false,
        },
        None => pattern == host,
    }
}

/// The complete certificate set from a store: entries by store name, the names each is
/// served for, and the default for ClientHellos without a known name.
#[derive(Debug, Clone, Default)]
pub struct CertSet {
    /// Server names (`example.com`, `*.example.com`) to the entry serving them.
    pub by_name: HashMap<String, Arc<CertEntry>>,
    /// Every entry, by store name.
    pub entries: HashMap<String, Arc<CertEntry>>,
    pub default: Option<Arc<CertEntry>>,
    /// Certificates the store refused in this load (store name, reason slug); a refused one
    /// keeps its previous version in `entries` when there was one. Not part of equality:
    /// it describes the load, not what is served.
    pub refused: Vec<(String, &'static str)>,
}

impl PartialEq for CertSet {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &HashMap<String, Arc<CertEntry>>, b: &HashMap<String, Arc<CertEntry>>| {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| Arc::ptr_eq(v, w)))
        };
        same(&self.by_name, &other.by_name)
            && same(&self.entries, &other.entries)
            && match (&self.default, &other.default) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// How a certificate was found for a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Exact,
    Wildcard,
    Default,
    Miss,
}

impl Lookup {
    pub fn name(self) -> &'static str {
        match self {
            Lookup::Exact => "exact",
            Lookup::Wildcard => "wildcard",
            Lookup::Default => "default",
            Lookup::Miss => "miss",
        }
    }
}

type Map = papaya::HashMap<Box<str>, Arc<CertEntry>, RandomState>;

/// The certificate table the workers read during handshakes.
#[derive(Debug)]
pub struct CertTable {
    /// Server names (exact and `*.suffix`) to entries; the default under the empty key.
    names: Map,
    version: AtomicU64,
}

impl Default for CertTable {
    fn default() -> Self {
        Self::new()
    }
}

const DEFAULT_KEY: &str = "";

impl CertTable {
    pub fn new() -> Self {
        Self {
            names: Map::with_hasher(RandomState::default()),
            version: AtomicU64::new(0),
        }
    }

    /// The certificate for a ClientHello's server name (normalised, or None without SNI):
    /// exact name, then a wildcard for the parent name, then the default.
    pub fn lookup(&self, sni: Option<&str>) -> (Option<Arc<CertEntry>>, Lookup) {
        let m = self.names.pin();
        if let Some(name) = sni
            && !name.is_empty()
        {
            if let Some(e) = m.get(name) {
                return (Some(e.clone()), Lookup::Exact);
            }
            if let Some((_, parent)) = name.split_once('.') {
                // "*." + parent without allocating: keys are stored as "*.suffix".
                let mut buf = [0u8; 256];
                if parent.len() + 2 <= buf.len() {
                    buf[..2].copy_from_slice(b"*.");
                    buf[2..2 + parent.len()].copy_from_slice(parent.as_bytes());
                    if let Ok(key) = std::str::from_utf8(&buf[..2 + parent.len()])
                        && let Some(e) = m.get(key)
                    {
                        return (Some(e.clone()), Lookup::Wildcard);
                    }
                }
            }
        }
        match m.get(DEFAULT_KEY) {
            Some(e) => (Some(e.clone()), Lookup::Default),
            None => (None, Lookup::Miss),
        }
    }

    /// Makes the table serve exactly `set`.
    pub fn apply(&self, set: &CertSet) {
        let m = self.names.pin();
        for (name, e) in &set.by_name {
            if m.get(name.as_str()).is_none_or(|old| !Arc::ptr_eq(old, e)) {
                m.insert(name.as_str().into(), e.clone());
            }
        }
        match &set.default {
            Some(d) => {
                if m.get(DEFAULT_KEY).is_none_or(|old| !Arc::ptr_eq(old, d)) {
                    m.insert(DEFAULT_KEY.into(), d.clone());
                }
            }
            None => {
                m.remove(DEFAULT_KEY);
            }
        }
        let stale: Vec<Box<str>> = m
            .keys()
            .filter(|k| !k.is_empty() && !set.by_name.contains_key(k.as_ref()))
            .cloned()
            .collect();
        for k in stale {
            m.remove(&k);
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Inserts or replaces one certificate for its names (incremental stores).
    pub fn upsert(&self, names: &[&str], entry: Arc<CertEntry>) {
        let m = self.names.pin();
        for n in names {
            m.insert((*n).into(), entry.clone());
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Removes names.
    pub fn remove(&self, names: &[&str]) {
        let m = self.names.pin();
        for n in names {
            m.remove(*n);
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Distinct certificates in service, with their expiry.
    pub fn expiries(&self) -> Vec<(Box<str>, i64)> {
        let m = self.names.pin();
        let mut seen: Vec<(Box<str>, i64)> = Vec::new();
        for e in m.values() {
            if !seen.iter().any(|(n, _)| n == &e.name) {
                seen.push((e.name.clone(), e.not_after_unix));
            }
        }
        seen
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// ACME HTTP-01 challenge responses: token to key authorization.
#[derive(Debug, Default)]
pub struct AcmeTable {
    tokens: papaya::HashMap<Box<str>, Box<str>, RandomState>,
}

impl AcmeTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The key authorization for `token`, copied into `out` (so no pin outlives the call).
    pub fn answer(&self, token: &str, out: &mut Vec<u8>) -> bool {
        if self.tokens.is_empty() {
            return false;
        }
        match self.tokens.pin().get(token) {
            Some(v) => {
                out.extend_from_slice(v.as_bytes());
                true
            }
            None => false,
        }
    }

    /// Makes the table hold exactly `set`.
    pub fn apply(&self, set: &HashMap<String, Box<str>>) {
        let m = self.tokens.pin();
        for (k, v) in set {
            if m.get(k.as_str()).is_none_or(|old| old != v) {
                m.insert(k.as_str().into(), v.clone());
            }
        }
        let stale: Vec<Box<str>> = m
            .keys()
            .filter(|k| !set.contains_key(k.as_ref()))
            .cloned()
            .collect();
        for k in stale {
            m.remove(&k);
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_names_cover_one_label() {
        assert!(name_covers("*.example.com", "a.example.com"));
        assert!(!name_covers("*.example.com", "a.b.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(!name_covers("*.example.com", ".example.com"));
        assert!(name_covers("example.com", "example.com"));
        assert!(!name_covers("example.com", "www.example.com"));
    }
}
