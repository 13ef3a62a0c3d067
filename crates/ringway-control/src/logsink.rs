//! Draining the workers' log rings into the access log (JSON lines).
//!
//! The control plane empties every ring on a short interval, in batches, so a worker's push
//! always finds room unless the sink falls behind by a whole ring. Records are decoded from the
//! ring's compact form and written as one JSON object per line.

use ringway_core::{LogConsumer, LogRecord};
use serde::Serialize;
use std::io::Write;

/// Records taken from one ring per drain pass, so one busy worker cannot starve the others.
pub const DRAIN_BATCH_RECORDS_MAX: usize = 4096;

/// One access log line.
#[derive(Debug, Serialize)]
pub struct AccessLine<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream: Option<String>,
    pub client_ip: String,
    pub user_agent: &'a str,
    pub project_id: Option<i64>,
    pub environment_id: Option<i64>,
    pub deployment_id: Option<i64>,
    pub worker: u16,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: &'a str,
}

impl<'a> AccessLine<'a> {
    pub fn from_record(r: &'a LogRecord) -> Self {
        Self {
            time: rfc3339_us(r.time_unix_us),
            request_id: &r.request_id,
            host: &r.host,
            method: &r.method,
            path: &r.path,
            status: r.status,
            duration_ms: r.duration_us as f64 / 1000.0,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            upstream: r.upstream.map(|a| a.to_string()),
            client_ip: r.client_ip.to_string(),
            user_agent: &r.user_agent,
            project_id: r.route.map(|x| x.project_id),
            environment_id: r.route.map(|x| x.environment_id),
            deployment_id: r.route.map(|x| x.deployment_id),
            worker: r.worker,
            reason: &r.reason,
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` from microseconds since the epoch.
pub fn rfc3339_us(unix_us: u64) -> String {
    let secs = unix_us / 1_000_000;
    let micros = unix_us % 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
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
    let mut err = None;
    let mut line = Vec::with_capacity(512);
    for ring in rings.iter_mut() {
        ring.drain(DRAIN_BATCH_RECORDS_MAX, |bytes| {
            let Ok(rec) = LogRecord::decode(bytes) else {
                tracing::error!("corrupt log record skipped");
                return;
            };
            line.clear();
            if serde_json::to_writer(&mut line, &AccessLine::from_record(&rec)).is_ok() {
                line.push(b'\n');
                if err.is_none()
                    && let Err(e) = out.write_all(&line)
                {
                    err = Some(e);
                }
                n += 1;
            }
        });
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
    fn drains_json_lines() {
        let (mut p, c) = log_ring(1 << 16);
        for i in 0..3u16 {
            p.push(&LogEntry {
                time_unix_us: 1_795_564_800_000_000,
                duration_us: 1500,
                request_id: b"r\"1",
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
        assert_eq!(v["request_id"], "r\"1");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["time"], "2026-11-25T00:00:00.000000Z");
    }
}
