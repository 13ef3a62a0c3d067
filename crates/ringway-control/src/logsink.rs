//! Draining the workers' log rings into the access log (JSON lines).
//!
//! The control plane empties every ring on a short interval, in batches, so a worker's push
//! always finds room unless the sink falls behind by a whole ring. Each record is read in
//! place from the ring and written as one JSON object per line into a reused buffer: no
//! allocation per record.
//!
//! A line: `{"time":"2026-11-25T19:16:25.914340Z","request_id":"…","host":"…","method":"GET",
//! "path":"/","status":200,"duration_ms":4.645,"bytes_in":88,"bytes_out":350,
//! "upstream":"127.0.0.1:3000","client_ip":"127.0.0.1","user_agent":"…","project_id":1,
//! "environment_id":1,"deployment_id":1,"worker":1}` plus `"visitor_id"` and `"session_id"`
//! when the project sets visitor cookies, and `"reason"` when the proxy answered
//! itself or the exchange failed. Absent values are `null`.

use ringway_core::{LogConsumer, LogEntry};
use std::io::Write;

/// Records taken from one ring per drain pass, so one busy worker cannot starve the others.
pub const DRAIN_BATCH_RECORDS_MAX: usize = 4096;

fn push_str(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'"');
    match std::str::from_utf8(b) {
        Ok(s) => escape_into(out, s),
        // Header values may carry obs-text; JSON must be UTF-8.
        Err(_) => escape_into(out, &String::from_utf8_lossy(b)),
    }
    out.push(b'"');
}

fn escape_into(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    let bytes = s.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    let _ = write!(out, "{n}");
}

/// Appends one JSON line for `e`.
pub fn write_json_line(e: &LogEntry<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"time\":\"");
    write_rfc3339_us(out, e.time_unix_us);
    out.extend_from_slice(b"\",\"request_id\":");
    push_str(out, e.request_id);
    out.extend_from_slice(b",\"host\":");
    push_str(out, e.host);
    out.extend_from_slice(b",\"method\":");
    push_str(out, e.method);
    out.extend_from_slice(b",\"path\":");
    push_str(out, e.path);
    out.extend_from_slice(b",\"status\":");
    push_u64(out, u64::from(e.status));
    let _ = write!(
        out,
        ",\"duration_ms\":{}.{:03}",
        e.duration_us / 1000,
        e.duration_us % 1000
    );
    out.extend_from_slice(b",\"bytes_in\":");
    push_u64(out, e.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_u64(out, e.bytes_out);
    match e.upstream {
        Some(a) => {
            let _ = write!(out, ",\"upstream\":\"{a}\"");
        }
        None => out.extend_from_slice(b",\"upstream\":null"),
    }
    let _ = write!(out, ",\"client_ip\":\"{}\"", e.client_ip);
    out.extend_from_slice(b",\"user_agent\":");
    push_str(out, e.user_agent);
    match e.route {
        Some(r) => {
            let _ = write!(
                out,
                ",\"project_id\":{},\"environment_id\":{},\"deployment_id\":{}",
                r.project_id, r.environment_id, r.deployment_id
            );
        }
        None => out.extend_from_slice(
            b",\"project_id\":null,\"environment_id\":null,\"deployment_id\":null",
        ),
    }
    out.extend_from_slice(b",\"worker\":");
    push_u64(out, u64::from(e.worker));
    if !e.visitor_id.is_empty() {
        out.extend_from_slice(b",\"visitor_id\":");
        push_str(out, e.visitor_id);
    }
    if !e.session_id.is_empty() {
        out.extend_from_slice(b",\"session_id\":");
        push_str(out, e.session_id);
    }
    if !e.reason.is_empty() {
        out.extend_from_slice(b",\"reason\":");
        push_str(out, e.reason);
    }
    out.extend_from_slice(b"}\n");
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` from microseconds since the epoch.
pub fn rfc3339_us(unix_us: u64) -> String {
    let mut v = Vec::with_capacity(27);
    write_rfc3339_us(&mut v, unix_us);
    String::from_utf8(v).unwrap_or_default()
}

fn write_rfc3339_us(out: &mut Vec<u8>, unix_us: u64) {
    let secs = unix_us / 1_000_000;
    let micros = unix_us % 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Drains up to a batch from each ring into `out` as JSON lines. Returns records written.
pub fn drain_to<W: Write>(rings: &mut [LogConsumer], out: &mut W) -> std::io::Result<u64> {
    let mut n = 0u64;
    let mut lines = Vec::with_capacity(64 * 1024);
    let mut err = None;
    for ring in rings.iter_mut() {
        lines.clear();
        ring.drain(DRAIN_BATCH_RECORDS_MAX, |bytes| {
            match LogEntry::decode(bytes) {
                Ok(e) => {
                    write_json_line(&e, &mut lines);
                    n += 1;
                }
                Err(_) => tracing::error!("corrupt log record skipped"),
            }
        });
        if err.is_none()
            && let Err(e) = out.write_all(&lines)
        {
            err = Some(e);
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringway_core::{LogEntry, log_ring};

    #[test]
    fn dates() {
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_us(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(
            rfc3339_us(1_795_564_800_000_000),
            "2026-11-25T00:00:00.000000Z"
        );
    }

    #[test]
    fn lines_are_valid_json_whatever_the_bytes() {
        let e = LogEntry {
            time_unix_us: 0,
            duration_us: 1,
            request_id: b"id",
            host: b"h",
            method: b"GET",
            path: b"/\xff\xfe\"</script>",
            status: 200,
            bytes_in: 0,
            bytes_out: 0,
            upstream: Some("[::1]:80".parse().unwrap()),
            client_ip: "::1".parse().unwrap(),
            user_agent: b"ua\x7f\ttab",
            route: None,
            worker: 3,
            reason: b"upstream_timeout",
            visitor_id: b"",
            session_id: b"",
        };
        let mut out = Vec::new();
        write_json_line(&e, &mut out);
        assert!(out.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/\u{fffd}\u{fffd}\"</script>");
        assert_eq!(v["user_agent"], "ua\u{7f}\ttab");
        assert_eq!(v["upstream"], "[::1]:80");
        assert_eq!(v["duration_ms"], 0.001);
        assert_eq!(v["reason"], "upstream_timeout");
    }

    #[test]
    fn drains_json_lines() {
        let (mut p, c) = log_ring(1 << 16);
        for i in 0..3u16 {
            p.push(&LogEntry {
                time_unix_us: 1_795_564_800_000_000,
                duration_us: 1500,
                request_id: b"r\"1\\\x01",
                host: b"a.com",
                method: b"GET",
                path: b"/x",
                status: 200 + i,
                bytes_in: 1,
                bytes_out: 2,
                upstream: None,
                client_ip: "1.2.3.4".parse().unwrap(),
                user_agent: b"ua",
                route: None,
                worker: 0,
                reason: b"",
                visitor_id: b"",
                session_id: b"",
            });
        }
        let mut rings = vec![c];
        let mut out = Vec::new();
        assert_eq!(drain_to(&mut rings, &mut out).unwrap(), 3);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let v: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(v["status"], 202);
        assert_eq!(v["request_id"], "r\"1\\\u{1}");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["upstream"], serde_json::Value::Null);
        assert_eq!(v["project_id"], serde_json::Value::Null);
        assert!(v.get("reason").is_none());
        assert_eq!(v["time"], "2026-11-25T00:00:00.000000Z");
    }
}
