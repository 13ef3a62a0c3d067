//! Open connections per client, for `limits.connections_per_client_max`: how a client
//! address is counted ([`ClientKey`]) and the per-worker counts ([`ClientCounts`]).

use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::net::IpAddr;

/// A client address as the per-client connection limit counts it: IPv4 addresses one by one
/// (IPv4-mapped IPv6 as IPv4), IPv6 by /64, one subscriber's allocation, as the rate limits
/// key them (a client holding a /64 has 2^64 addresses to spread over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ringway_core::cidr::canonical(ip) {
            IpAddr::V4(v4) => ClientKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => ClientKey((u128::from(v6) & !u128::from(u64::MAX)) | 1),
        }
    }
}

/// Open connections per client key, for `limits.connections_per_client_max`. Only keys with an
/// open connection have an entry, so the map holds at most as many entries as the worker has
/// connections (`limits.connections_per_worker_max`).
#[derive(Debug, Default)]
pub struct ClientCounts {
    open: HashMap<ClientKey, u32, RandomState>,
}

impl ClientCounts {
    /// Counts a new connection of `key`, unless it already has `max` open.
    pub fn admit(&mut self, key: ClientKey, max: usize) -> bool {
        let n = self.open.entry(key).or_insert(0);
        if *n as usize >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection of `key` closed.
    pub fn release(&mut self, key: ClientKey) {
        if let Some(n) = self.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&key);
            }
        } else {
            debug_assert!(false, "released a client key that was never admitted");
        }
    }

    /// Client keys with a connection open.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.open.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_counts_admit_up_to_the_limit_and_forget_closed_clients() {
        let mut c = ClientCounts::default();
        let a = ClientKey::of("192.0.2.1".parse().unwrap());
        let mapped = ClientKey::of("::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(a, mapped, "IPv4-mapped IPv6 is the IPv4 address");
        assert!(c.admit(a, 2) && c.admit(mapped, 2));
        assert!(!c.admit(a, 2), "third connection refused");
        c.release(a);
        assert!(c.admit(a, 2));
        c.release(a);
        c.release(a);
        assert!(
            c.is_empty(),
            "no entry is kept for a client without connections"
        );
        // One /64 is one client.
        let v6a = ClientKey::of("2001:db8:1:2::1".parse().unwrap());
        let v6b = ClientKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let other = ClientKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(v6a, v6b);
        assert_ne!(v6a, other);
        assert!(c.admit(v6a, 1) && !c.admit(v6b, 1) && c.admit(other, 1));
        assert_eq!(c.len(), 2);
    }
}
