//! Upstream name resolution on the control thread.
//!
//! By default the system resolver (`getaddrinfo` on tokio's blocking pool, so /etc/hosts and
//! nsswitch apply). With `[dns] servers` set, a small stub asks those servers directly over
//! UDP for A and AAAA records, in order until one answers: an edge node can then resolve
//! upstream names from the platform's own DNS without touching the host's configuration.
//! Either way a name is resolved here, never in a worker.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Largest DNS message read (no EDNS: 512 bytes is the classic UDP limit; more is truncated).
const MESSAGE_BYTES_MAX: usize = 1_232;
/// Answer records read from one message at most.
const ANSWERS_MAX: usize = 256;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// How names are resolved.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// Empty: the system resolver.
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

impl Default for Resolver {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }
}

impl Resolver {
    /// Every address of `host` (with `port`); None: the resolution failed.
    pub async fn resolve(&self, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        if self.servers.is_empty() {
            let got =
                tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port))).await;
            return got.ok()?.ok().map(|i| i.collect());
        }
        for &server in &self.servers {
            if let Some(ips) = self.ask(server, host).await {
                return Some(
                    ips.into_iter()
                        .map(|ip| SocketAddr::new(ip, port))
                        .collect(),
                );
            }
        }
        None
    }

    /// A and AAAA from one server; None: no usable answer to either question.
    async fn ask(&self, server: SocketAddr, host: &str) -> Option<Vec<IpAddr>> {
        let bind: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
        sock.connect(server).await.ok()?;
        let base = (std::process::id() as u16) ^ (host.len() as u16).rotate_left(8) ^ random_u16();
        let ids = [base, base.wrapping_add(1)];
        for (id, qtype) in ids.iter().zip([TYPE_A, TYPE_AAAA]) {
            sock.send(&query(*id, host, qtype)?).await.ok()?;
        }
        let mut out = Vec::new();
        let mut answered = [false; 2];
        let mut buf = vec![0u8; MESSAGE_BYTES_MAX];
        let deadline = tokio::time::Instant::now() + self.timeout;
        while !(answered[0] && answered[1]) {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => break,
            };
            let Some((id, ips)) = parse_response(&buf[..n]) else {
                continue;
            };
            if let Some(k) = ids.iter().position(|&i| i == id)
                && !answered[k]
            {
                answered[k] = true;
                out.extend(ips);
            }
        }
        (answered[0] || answered[1]).then_some(out)
    }
}

fn random_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as u16
}

/// A recursive query for `host`'s `qtype` records. None: not a DNS name.
pub fn query(id: u16, host: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + host.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in host.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Some(q)
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// Skips a (possibly compressed) name at `i`; the offset after it.
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *b.get(i)?;
        match len {
            0 => return Some(i + 1),
            l if l & 0xC0 == 0xC0 => return Some(i + 2),
            l if l < 64 => i += 1 + usize::from(l),
            _ => return None,
        }
    }
}

/// The id of a response and the addresses in its answers. None: not a usable response
/// (malformed, not a response, or an error other than "no such name").
pub fn parse_response(b: &[u8]) -> Option<(u16, Vec<IpAddr>)> {
    let id = u16_at(b, 0)?;
    let flags = u16_at(b, 2)?;
    let rcode = flags & 0x000F;
    if flags & 0x8000 == 0 || !(rcode == 0 || rcode == 3) {
        return None;
    }
    let (qd, an) = (u16_at(b, 4)?, u16_at(b, 6)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i)? + 4;
    }
    let mut ips = Vec::new();
    for _ in 0..usize::from(an).min(ANSWERS_MAX) {
        i = skip_name(b, i)?;
        let (ty, len) = (u16_at(b, i)?, usize::from(u16_at(b, i + 8)?));
        let data = b.get(i + 10..i + 10 + len)?;
        match (ty, len) {
            (TYPE_A, 4) => ips.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (TYPE_AAAA, 16) => ips.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        i += 10 + len;
    }
    Some((id, ips))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `q` with one record of `ip` (name compressed to the question).
    fn answer(q: &[u8], ip: IpAddr) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xC0, 12]);
        let (ty, data): (u16, Vec<u8>) = match ip {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
        r
    }

    #[test]
    fn queries_and_answers_round_trip() {
        let q = query(7, "app.internal", TYPE_A).unwrap();
        assert_eq!(&q[12..17], b"\x03app\x08");
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(parse_response(&answer(&q, ip)), Some((7, vec![ip])));
        let q6 = query(8, "app.internal.", TYPE_AAAA).unwrap();
        let ip6: IpAddr = "::1".parse().unwrap();
        assert_eq!(parse_response(&answer(&q6, ip6)), Some((8, vec![ip6])));
    }

    #[test]
    fn bad_messages_are_refused_not_trusted() {
        let q = query(7, "a.b", TYPE_A).unwrap();
        assert_eq!(parse_response(&q), None, "a query is not a response");
        let mut r = answer(&q, "10.0.0.1".parse().unwrap());
        r.truncate(r.len() - 2);
        assert_eq!(parse_response(&r), None, "truncated record");
        let mut servfail = answer(&q, "10.0.0.1".parse().unwrap());
        servfail[3] = 0x82;
        assert_eq!(parse_response(&servfail), None);
        assert!(query(1, "a..b", TYPE_A).is_none());
        for n in 0..q.len() {
            let _ = parse_response(&q[..n]);
        }
    }

    #[tokio::test]
    async fn asks_a_server_for_both_families() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                let (n, from) = server.recv_from(&mut buf).unwrap();
                let q = &buf[..n];
                let ip: IpAddr = if u16_at(q, n - 4) == Some(TYPE_A) {
                    "127.0.0.1".parse().unwrap()
                } else {
                    "::1".parse().unwrap()
                };
                server.send_to(&answer(q, ip), from).unwrap();
            }
        });
        let r = Resolver {
            servers: vec![addr],
            timeout: Duration::from_secs(2),
        };
        let mut got = r.resolve("app.test", 3000).await.unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![
                "127.0.0.1:3000".parse().unwrap(),
                "[::1]:3000".parse().unwrap()
            ]
        );
        t.join().unwrap();
    }
}
