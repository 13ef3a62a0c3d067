//! Certificate validation: PEM in, a ready-to-use `CertEntry` out, or a clear reason.
//!
//! Runs on the control thread only: parsing, key loading and the checks happen once per
//! certificate version, never during a handshake. A certificate is refused when its key does
//! not match, when it is not yet valid or has expired, or when it does not cover the names it
//! is declared for.

use ringway_core::tls::{CertEntry, name_covers};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Why a certificate was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("no certificate in the PEM chain")]
    NoCertificate,
    #[error("cannot parse the PEM chain: {0}")]
    Chain(String),
    #[error("cannot parse the private key: {0}")]
    Key(String),
    #[error("unsupported private key: {0}")]
    UnsupportedKey(String),
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    #[error("cannot parse the leaf certificate: {0}")]
    Leaf(String),
    #[error("the certificate expired at {0} (Unix time)")]
    Expired(i64),
    #[error("the certificate is not valid before {0} (Unix time)")]
    NotYetValid(i64),
    #[error("the certificate names no DNS name (subjectAltName)")]
    NoNames,
    #[error("the certificate does not cover {0:?} (it covers {1:?})")]
    NotCovered(String, Vec<String>),
}

impl CertError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::NoCertificate => "no_certificate",
            CertError::Chain(_) => "bad_chain",
            CertError::Key(_) => "bad_key",
            CertError::UnsupportedKey(_) => "unsupported_key",
            CertError::KeyMismatch => "key_mismatch",
            CertError::Leaf(_) => "bad_leaf",
            CertError::Expired(_) => "expired",
            CertError::NotYetValid(_) => "not_yet_valid",
            CertError::NoNames => "no_names",
            CertError::NotCovered(..) => "not_covered",
        }
    }
}

/// Hash of the PEM inputs: tells whether a certificate changed.
pub fn fingerprint(chain_pem: &[u8], key_pem: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    chain_pem.hash(&mut h);
    key_pem.hash(&mut h);
    h.finish()
}

/// Parses and checks a certificate. `hosts`: names it must cover (None: the names it has).
pub fn load(
    name: &str,
    chain_pem: &[u8],
    key_pem: &[u8],
    hosts: Option<&[String]>,
    now_unix: i64,
) -> Result<CertEntry, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Chain(e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate);
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::UnsupportedKey(e.to_string()))?;

    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| CertError::Leaf(e.to_string()))?;
    let not_before = parsed.validity().not_before.timestamp();
    let not_after = parsed.validity().not_after.timestamp();
    if now_unix < not_before {
        return Err(CertError::NotYetValid(not_before));
    }
    if now_unix > not_after {
        return Err(CertError::Expired(not_after));
    }
    let mut names: Vec<Box<str>> = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for gn in &san.value.general_names {
            match gn {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.push(d.trim_end_matches('.').to_ascii_lowercase().into());
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| format!("[{}]", std::net::Ipv6Addr::from(a))),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.push(ip.into());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        return Err(CertError::NoNames);
    }
    if let Some(hosts) = hosts {
        for h in hosts {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            let covered = names.iter().any(|n| {
                // A wildcard host entry must be matched by the same wildcard name.
                if h.starts_with("*.") {
                    **n == *h
                } else {
                    name_covers(n, &h)
                }
            });
            if !covered {
                return Err(CertError::NotCovered(
                    h,
                    names.iter().map(|n| n.to_string()).collect(),
                ));
            }
        }
    }

    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| CertError::KeyMismatch)?;
    Ok(CertEntry {
        name: name.into(),
        key: Arc::new(certified),
        names: names.into(),
        not_after_unix: not_after,
        fingerprint: fingerprint(chain_pem, key_pem),
    })
}

/// A self-signed certificate and key (PEM) for development, ECDSA P-256.
pub fn self_signed(names: &[String]) -> Result<(String, String), CertError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| CertError::Leaf(e.to_string()))?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(names: &[&str]) -> (String, String) {
        self_signed(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn accepts_a_good_certificate() {
        let (c, k) = leaf(&["example.com", "*.example.com"]);
        let e = load(
            "ex",
            c.as_bytes(),
            k.as_bytes(),
            Some(&["example.com".into(), "a.example.com".into()]),
            unix_now(),
        )
        .unwrap();
        assert_eq!(
            &*e.names,
            &["example.com".into(), "*.example.com".into()] as &[Box<str>]
        );
        assert!(e.covers("b.example.com"));
        assert!(!e.covers("b.c.example.com"));
        assert!(e.not_after_unix > unix_now());
    }

    #[test]
    fn refuses_mismatched_key_expired_and_uncovered() {
        let (c, _) = leaf(&["a.test"]);
        let (_, other_key) = leaf(&["a.test"]);
        assert_eq!(
            load("a", c.as_bytes(), other_key.as_bytes(), None, unix_now()).unwrap_err(),
            CertError::KeyMismatch
        );
        let (c, k) = leaf(&["a.test"]);
        // rcgen certificates are valid until the year 4096.
        let far_future = 100_000_000_000;
        assert!(matches!(
            load("a", c.as_bytes(), k.as_bytes(), None, far_future),
            Err(CertError::Expired(_))
        ));
        assert!(matches!(
            load(
                "a",
                c.as_bytes(),
                k.as_bytes(),
                Some(&["b.test".into()]),
                unix_now()
            ),
            Err(CertError::NotCovered(..))
        ));
        assert!(matches!(
            load("a", b"not pem", k.as_bytes(), None, unix_now()),
            Err(CertError::NoCertificate | CertError::Chain(_))
        ));
        assert!(matches!(
            load("a", c.as_bytes(), b"junk", None, unix_now()),
            Err(CertError::Key(_))
        ));
    }
}
