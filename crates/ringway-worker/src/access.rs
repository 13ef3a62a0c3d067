//! Who the client is: whether the peer is a trusted proxy, which address the request really
//! comes from, and which request id it carries.
//!
//! Forwarding headers from an untrusted peer are ignored and replaced: anyone can send
//! `X-Forwarded-For: 10.0.0.1`. From a trusted proxy (configured CIDRs) they are believed, and
//! the client is the rightmost address in X-Forwarded-For that is not itself a trusted proxy.
//! The policy phase (`policy.rs`, after routing) checks its rules against the address decided
//! here.

use ringway_core::Cidr;
use ringway_core::cidr::{any_contains, canonical};
use std::net::IpAddr;

/// Longest incoming request id kept (from a trusted peer).
pub const REQUEST_ID_BYTES_MAX: usize = 128;

/// Whether the peer's forwarding headers are believed.
#[inline]
pub fn is_trusted(peer: IpAddr, trusted: &[Cidr]) -> bool {
    !trusted.is_empty() && any_contains(trusted, peer)
}

/// The client address: the peer, or for a trusted peer the rightmost X-Forwarded-For entry that
/// is not a trusted proxy. `xff` yields the values of every X-Forwarded-For header in order.
pub fn client_ip<'a>(
    peer: IpAddr,
    trusted_peer: bool,
    trusted: &[Cidr],
    xff: impl DoubleEndedIterator<Item = &'a [u8]>,
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted_peer {
        return peer;
    }
    for value in xff.rev() {
        for item in value.rsplit(|&b| b == b',') {
            let Some(ip) = parse_forwarded_ip(item.trim_ascii()) else {
                // Garbage in a trusted chain: stop believing it here.
                return peer;
            };
            if !any_contains(trusted, ip) {
                return ip;
            }
        }
    }
    peer
}

/// Parses an X-Forwarded-For element: an address, possibly `[v6]` or `v4:port`.
fn parse_forwarded_ip(s: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(s).ok()?;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        return rest[..end].parse::<IpAddr>().ok().map(canonical);
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Whether an incoming request id may be kept: short, visible ASCII, no quotes or backslashes
/// (it ends up in JSON logs and HTML error pages).
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= REQUEST_ID_BYTES_MAX
        && v.iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&'))
}

/// Generates request ids: 32 lowercase hex digits, a per-worker random prefix and a counter, so
/// ids are unique across workers and restarts without any coordination.
#[derive(Debug)]
pub struct RequestIdGen {
    prefix: u64,
    counter: u64,
}

impl RequestIdGen {
    pub fn new(worker: usize) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS; mixing in time and ids keeps prefixes distinct even
        // if two states happened to share keys.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(worker);
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        Self {
            prefix: h.finish(),
            counter: 0,
        }
    }

    pub fn next_id(&mut self) -> [u8; 32] {
        self.counter = self.counter.wrapping_add(1);
        let mut out = [0u8; 32];
        ringway_proto::write::hex_into(&self.prefix.to_be_bytes(), &mut out[..16]);
        ringway_proto::write::hex_into(&self.counter.to_be_bytes(), &mut out[16..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = [&b"1.2.3.4"[..]];
        assert_eq!(
            client_ip(ip("203.0.113.9"), false, &trusted, xff.into_iter()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_chain_yields_rightmost_untrusted() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = [&b"6.6.6.6, 1.2.3.4"[..], b"10.0.0.7"];
        assert_eq!(
            client_ip(ip("10.0.0.1"), true, &trusted, xff.into_iter()),
            ip("1.2.3.4")
        );
        let xff = [&b"[2001:db8::1]:443, 1.2.3.4:80"[..]];
        assert_eq!(
            client_ip(ip("10.0.0.1"), true, &trusted, xff.into_iter()),
            ip("1.2.3.4")
        );
        let xff = [&b"garbage"[..]];
        assert_eq!(
            client_ip(ip("10.0.0.1"), true, &trusted, xff.into_iter()),
            ip("10.0.0.1")
        );
        let none: [&[u8]; 0] = [];
        assert_eq!(
            client_ip(ip("10.0.0.1"), true, &trusted, none.into_iter()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn request_ids() {
        let mut g = RequestIdGen::new(0);
        let a = g.next_id();
        let b = g.next_id();
        assert_ne!(a, b);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(RequestIdGen::new(1).next_id()[..16], a[..16]);
        assert!(valid_request_id(b"abc-123_X.Y"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"<script>"));
        assert!(!valid_request_id(&[b'a'; 200]));
    }
}
