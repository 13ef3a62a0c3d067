//! The request log record: what every request leaves behind, and its compact binary form in a
//! worker's log ring.
//!
//! The worker fills a borrowed [`LogEntry`] from the bytes it already holds (no allocation) and
//! encodes it into the ring; the control plane decodes owned [`LogRecord`]s from the ring and
//! writes them to the access log (or, later, the database). Long strings are cut to the limits
//! below so one record stays small.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const LOG_REQUEST_ID_BYTES_MAX: usize = 128;
pub const LOG_HOST_BYTES_MAX: usize = 255;
pub const LOG_METHOD_BYTES_MAX: usize = 32;
pub const LOG_PATH_BYTES_MAX: usize = 2048;
pub const LOG_USER_AGENT_BYTES_MAX: usize = 512;
pub const LOG_REASON_BYTES_MAX: usize = 64;
pub const LOG_ID_BYTES_MAX: usize = 64;

/// Upper bound of one encoded record.
pub const RECORD_BYTES_MAX: usize = FIXED_BYTES
    + 8 * 2
    + 2 * LOG_ID_BYTES_MAX
    + LOG_REQUEST_ID_BYTES_MAX
    + LOG_HOST_BYTES_MAX
    + LOG_METHOD_BYTES_MAX
    + LOG_PATH_BYTES_MAX
    + LOG_USER_AGENT_BYTES_MAX
    + LOG_REASON_BYTES_MAX;

/// Route identifiers copied into the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteIds {
    pub project_id: i64,
    pub environment_id: i64,
    pub deployment_id: i64,
}

/// A record as the worker sees it: borrowed bytes, nothing allocated.
#[derive(Debug, Clone, Copy)]
pub struct LogEntry<'a> {
    /// Request start, microseconds since the Unix epoch.
    pub time_unix_us: u64,
    pub duration_us: u64,
    pub request_id: &'a [u8],
    pub host: &'a [u8],
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub status: u16,
    /// Bytes read from the client for this request (head and body).
    pub bytes_in: u64,
    /// Bytes written to the client for this request (head and body).
    pub bytes_out: u64,
    pub upstream: Option<SocketAddr>,
    pub client_ip: IpAddr,
    pub user_agent: &'a [u8],
    pub route: Option<RouteIds>,
    pub worker: u16,
    /// Why the proxy answered itself or the exchange failed (empty when the upstream answered).
    pub reason: &'a [u8],
    /// Visitor and session ids (empty when the project sets no cookies).
    pub visitor_id: &'a [u8],
    pub session_id: &'a [u8],
}

/// A decoded record, owned, for the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub time_unix_us: u64,
    pub duration_us: u64,
    pub request_id: String,
    pub host: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream: Option<SocketAddr>,
    pub client_ip: IpAddr,
    pub user_agent: String,
    pub route: Option<RouteIds>,
    pub worker: u16,
    pub reason: String,
    pub visitor_id: String,
    pub session_id: String,
}

const FLAG_ROUTE: u8 = 1;
const FLAG_UPSTREAM: u8 = 2;
const FLAG_CLIENT_V6: u8 = 4;
const FLAG_UPSTREAM_V6: u8 = 8;

/// time, duration, bytes in, bytes out, 3 ids (8 each), status, worker (2 each), flags (1),
/// client ip (16), upstream ip (16), upstream port (2).
const FIXED_BYTES: usize = 8 * 7 + 2 + 2 + 1 + 16 + 16 + 2;

fn ip_bytes(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (b, false)
        }
        IpAddr::V6(v6) => (v6.octets(), true),
    }
}

fn ip_from(b: &[u8; 16], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(*b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

fn cut(s: &[u8], max: usize) -> &[u8] {
    &s[..s.len().min(max)]
}

impl LogEntry<'_> {
    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut flags = 0u8;
        let ids = self.route.unwrap_or_default();
        if self.route.is_some() {
            flags |= FLAG_ROUTE;
        }
        let (client, client_v6) = ip_bytes(self.client_ip);
        if client_v6 {
            flags |= FLAG_CLIENT_V6;
        }
        let (up_ip, up_port) = match self.upstream {
            Some(a) => {
                flags |= FLAG_UPSTREAM;
                let (b, v6) = ip_bytes(a.ip());
                if v6 {
                    flags |= FLAG_UPSTREAM_V6;
                }
                (b, a.port())
            }
            None => ([0u8; 16], 0),
        };
        for v in [
            self.time_unix_us,
            self.duration_us,
            self.bytes_in,
            self.bytes_out,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [ids.project_id, ids.environment_id, ids.deployment_id] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.worker.to_le_bytes());
        out.push(flags);
        out.extend_from_slice(&client);
        out.extend_from_slice(&up_ip);
        out.extend_from_slice(&up_port.to_le_bytes());
        for (s, max) in [
            (self.request_id, LOG_REQUEST_ID_BYTES_MAX),
            (self.host, LOG_HOST_BYTES_MAX),
            (self.method, LOG_METHOD_BYTES_MAX),
            (self.path, LOG_PATH_BYTES_MAX),
            (self.user_agent, LOG_USER_AGENT_BYTES_MAX),
            (self.reason, LOG_REASON_BYTES_MAX),
            (self.visitor_id, LOG_ID_BYTES_MAX),
            (self.session_id, LOG_ID_BYTES_MAX),
        ] {
            let s = cut(s, max);
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s);
        }
    }
}

/// A record that does not decode: the ring is corrupt (a bug, never input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("corrupt log record")]
pub struct CorruptRecord;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CorruptRecord> {
        if self.b.len() < n {
            return Err(CorruptRecord);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], CorruptRecord> {
        self.take(N)?.try_into().map_err(|_| CorruptRecord)
    }
    fn u64(&mut self) -> Result<u64, CorruptRecord> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Result<i64, CorruptRecord> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    fn u16(&mut self) -> Result<u16, CorruptRecord> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], CorruptRecord> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

impl<'a> LogEntry<'a> {
    /// Reads a record from its encoded form, borrowing its strings: the control plane turns
    /// records into log lines or database rows without allocating per record.
    pub fn decode(b: &'a [u8]) -> Result<LogEntry<'a>, CorruptRecord> {
        let mut r = Reader { b };
        let time_unix_us = r.u64()?;
        let duration_us = r.u64()?;
        let bytes_in = r.u64()?;
        let bytes_out = r.u64()?;
        let ids = RouteIds {
            project_id: r.i64()?,
            environment_id: r.i64()?,
            deployment_id: r.i64()?,
        };
        let status = r.u16()?;
        let worker = r.u16()?;
        let flags = r.arr::<1>()?[0];
        let client = r.arr::<16>()?;
        let up_ip = r.arr::<16>()?;
        let up_port = r.u16()?;
        Ok(LogEntry {
            time_unix_us,
            duration_us,
            bytes_in,
            bytes_out,
            route: (flags & FLAG_ROUTE != 0).then_some(ids),
            status,
            worker,
            client_ip: ip_from(&client, flags & FLAG_CLIENT_V6 != 0),
            upstream: (flags & FLAG_UPSTREAM != 0)
                .then(|| SocketAddr::new(ip_from(&up_ip, flags & FLAG_UPSTREAM_V6 != 0), up_port)),
            request_id: r.bytes()?,
            host: r.bytes()?,
            method: r.bytes()?,
            path: r.bytes()?,
            user_agent: r.bytes()?,
            reason: r.bytes()?,
            visitor_id: r.bytes()?,
            session_id: r.bytes()?,
        })
    }

    /// An owned copy (strings decoded lossily as UTF-8).
    pub fn to_record(&self) -> LogRecord {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        LogRecord {
            time_unix_us: self.time_unix_us,
            duration_us: self.duration_us,
            request_id: s(self.request_id),
            host: s(self.host),
            method: s(self.method),
            path: s(self.path),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            upstream: self.upstream,
            client_ip: self.client_ip,
            user_agent: s(self.user_agent),
            route: self.route,
            worker: self.worker,
            reason: s(self.reason),
            visitor_id: s(self.visitor_id),
            session_id: s(self.session_id),
        }
    }
}

impl LogRecord {
    pub fn decode(b: &[u8]) -> Result<LogRecord, CorruptRecord> {
        LogEntry::decode(b).map(|e| e.to_record())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncation() {
        let long_path = vec![b'p'; 5000];
        let e = LogEntry {
            time_unix_us: 1_700_000_000_000_000,
            duration_us: 1234,
            request_id: b"abc",
            host: b"example.com",
            method: b"GET",
            path: &long_path,
            status: 200,
            bytes_in: 10,
            bytes_out: 20,
            upstream: Some("[::1]:8080".parse().unwrap()),
            client_ip: "10.0.0.1".parse().unwrap(),
            user_agent: b"curl/8",
            route: Some(RouteIds {
                project_id: 1,
                environment_id: -2,
                deployment_id: 3,
            }),
            worker: 1,
            reason: b"",
            visitor_id: b"v1",
            session_id: b"",
        };
        let mut out = Vec::new();
        e.encode(&mut out);
        assert!(out.len() <= RECORD_BYTES_MAX);
        let r = LogRecord::decode(&out).unwrap();
        assert_eq!(r.path.len(), LOG_PATH_BYTES_MAX);
        assert_eq!(r.host, "example.com");
        assert_eq!(r.upstream, e.upstream);
        assert_eq!(r.client_ip, e.client_ip);
        assert_eq!(r.route, e.route);
        assert_eq!(r.status, 200);
        assert_eq!(r.duration_us, 1234);
        assert_eq!(r.visitor_id, "v1");
        assert!(LogRecord::decode(&out[..out.len() - 1]).is_err());
    }
}
