//! Log records as rows of PostgreSQL's binary COPY format, encoded straight from the ring
//! (borrowed `LogEntry`, no per-record allocation).
//!
//! A batch is the rows only; `HEADER` and `TRAILER` wrap it when it is sent. The same bytes go
//! to the spool when the database cannot take them, so a replay sends exactly what would have
//! been sent.

use ringway_core::LogEntry;
use std::net::IpAddr;

/// Columns, in the order rows are encoded.
pub const COLUMNS: &str = "ts, request_id, project_id, environment_id, deployment_id, host, method, path, status, \
     duration_us, bytes_in, bytes_out, upstream, client_ip, user_agent, reason, worker, node, visitor_id, session_id";
const FIELDS: i16 = 20;

/// `PGCOPY\n\377\r\n\0`, flags, header extension length.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Field count -1: end of data.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

fn put_i16(out: &mut Vec<u8>, v: i16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn field_i64(out: &mut Vec<u8>, v: i64) {
    put_i32(out, 8);
    out.extend_from_slice(&v.to_be_bytes());
}

fn field_i16(out: &mut Vec<u8>, v: i16) {
    put_i32(out, 2);
    out.extend_from_slice(&v.to_be_bytes());
}

fn field_null(out: &mut Vec<u8>) {
    put_i32(out, -1);
}

/// Text as PostgreSQL accepts it: UTF-8 with no NUL. Request bytes may be neither (obs-text
/// in a User-Agent, say); those are replaced rather than failing the whole batch.
fn field_text(out: &mut Vec<u8>, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) if !b.contains(&0) => {
            put_i32(out, s.len() as i32);
            out.extend_from_slice(b);
        }
        _ => {
            let clean = String::from_utf8_lossy(b).replace('\0', "\u{fffd}");
            put_i32(out, clean.len() as i32);
            out.extend_from_slice(clean.as_bytes());
        }
    }
}

/// `inet` wire form: family (2: v4, 3: v6), prefix bits, is_cidr, length, address.
fn field_inet(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            put_i32(out, 8);
            out.extend_from_slice(&[2, 32, 0, 4]);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            put_i32(out, 20);
            out.extend_from_slice(&[3, 128, 0, 16]);
            out.extend_from_slice(&a.octets());
        }
    }
}

/// Appends one row for `e`; `node` is this node's name.
pub fn encode_row(e: &LogEntry<'_>, node: &[u8], out: &mut Vec<u8>) {
    put_i16(out, FIELDS);
    let ts = i64::try_from(e.time_unix_us)
        .unwrap_or(i64::MAX)
        .saturating_sub(PG_EPOCH_UNIX_US);
    field_i64(out, ts);
    field_text(out, e.request_id);
    match e.route {
        Some(r) => {
            field_i64(out, r.project_id);
            field_i64(out, r.environment_id);
            field_i64(out, r.deployment_id);
        }
        None => {
            field_null(out);
            field_null(out);
            field_null(out);
        }
    }
    field_text(out, e.host);
    field_text(out, e.method);
    field_text(out, e.path);
    field_i16(out, i16::try_from(e.status).unwrap_or(i16::MAX));
    field_i64(out, i64::try_from(e.duration_us).unwrap_or(i64::MAX));
    field_i64(out, i64::try_from(e.bytes_in).unwrap_or(i64::MAX));
    field_i64(out, i64::try_from(e.bytes_out).unwrap_or(i64::MAX));
    match e.upstream {
        Some(a) => {
            let mut buf = [0u8; 64];
            let n = {
                use std::io::Write;
                let mut w = &mut buf[..];
                let _ = write!(w, "{a}");
                64 - w.len()
            };
            field_text(out, &buf[..n]);
        }
        None => field_null(out),
    }
    field_inet(out, e.client_ip);
    field_text(out, e.user_agent);
    field_text(out, e.reason);
    field_i16(out, i16::try_from(e.worker).unwrap_or(i16::MAX));
    field_text(out, node);
    for id in [e.visitor_id, e.session_id] {
        if id.is_empty() {
            field_null(out);
        } else {
            field_text(out, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringway_core::record::RouteIds;

    fn entry() -> LogEntry<'static> {
        LogEntry {
            time_unix_us: 946_684_800_000_001,
            duration_us: 5,
            request_id: b"rid",
            host: b"a.test",
            method: b"GET",
            path: b"/\0x",
            status: 200,
            bytes_in: 1,
            bytes_out: 2,
            upstream: Some("127.0.0.1:3000".parse().unwrap()),
            client_ip: "::1".parse().unwrap(),
            user_agent: b"\xffua",
            route: Some(RouteIds {
                project_id: 1,
                environment_id: 2,
                deployment_id: 3,
            }),
            worker: 1,
            reason: b"",
            visitor_id: b"",
            session_id: b"",
        }
    }

    #[test]
    fn row_has_every_field_and_clean_text() {
        let mut out = Vec::new();
        encode_row(&entry(), b"node-1", &mut out);
        assert_eq!(&out[..2], &20i16.to_be_bytes());
        // ts: one microsecond after the PostgreSQL epoch.
        assert_eq!(&out[2..6], &8i32.to_be_bytes());
        assert_eq!(&out[6..14], &1i64.to_be_bytes());
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("127.0.0.1:3000") && s.contains("node-1"));
        // NUL and invalid UTF-8 are replaced, never sent.
        assert!(!out.windows(3).any(|w| w == b"/\0x"));
        assert!(s.contains("/\u{fffd}x"));
    }
}
