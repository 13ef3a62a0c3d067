//! A route's upstreams and balancing settings as stores write them (TOML in the routes file,
//! JSON in PostgreSQL and the snapshot file), checked and built into the core's
//! [`ClusterSpec`]. docs/load-balancing.md describes every key.
//!
//! ```toml
//! [[route]]
//! upstreams = ["10.0.0.5:3000", { address = "app.internal:3000", weight = 3, state = "draining" }]
//!
//! [route.balancer]
//! strategy = "p2c"                # round_robin, least_connections, random, hash
//! hash_key = "client_ip"          # hash: client_ip, path, header:NAME, cookie:NAME
//! sticky_cookie = "rw_ep"         # opt-in: pins a client to a healthy endpoint
//! retries_max = 2
//!
//! [route.health_check]            # opt-in
//! type = "http"                   # or "tcp"
//! path = "/healthz"
//!
//! [route.outlier]
//! consecutive_failures = 5
//! ```

use ringway_core::balance::spec::{
    AdminState, CheckKind, ClusterSpec, EndpointLimits, HashKey, HealthCheck, Outlier,
    StatusRanges, Statuses5xx, Sticky, Strategy, UpstreamSpec, parse_upstream_addr,
};
use serde::{Deserialize, Serialize};

/// One upstream: `"IP:port"` / `"name:port"`, or a table with a weight and a state.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum UpstreamEntry {
    Address(String),
    Full(UpstreamTable),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTable {
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "active")]
    pub state: String,
}

fn one() -> u32 {
    1
}

fn active() -> String {
    "active".into()
}

/// `[route.balancer]`: every key optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalancerSection {
    pub strategy: Option<String>,
    pub hash_key: Option<String>,
    pub sticky_cookie: Option<String>,
    pub sticky_max_age_s: Option<u32>,
    pub retries_max: Option<u8>,
    pub per_try_timeout_ms: Option<u32>,
    pub retry_budget_pct: Option<u8>,
    pub retry_budget_min: Option<u32>,
    pub retry_budget_window_ms: Option<u32>,
    pub slow_start_ms: Option<u32>,
    pub panic_threshold_pct: Option<u8>,
    pub connections_max: Option<u32>,
    pub pending_max: Option<u32>,
}

/// `[route.health_check]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub statuses: Option<String>,
    pub interval_ms: Option<u32>,
    pub timeout_ms: Option<u32>,
    pub rise: Option<u8>,
    pub fall: Option<u8>,
}

/// `[route.outlier]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    pub consecutive_failures: Option<u32>,
    pub ejection_ms: Option<u32>,
    pub ejection_max_ms: Option<u32>,
    pub max_ejected_pct: Option<u8>,
    pub failure_statuses: Option<Vec<u16>>,
}

/// Everything a store says about one route's upstreams.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalanceSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<BalancerSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierSection>,
}

/// Builds and validates a cluster spec; the error names the key at fault.
pub fn build(upstreams: &[UpstreamEntry], s: &BalanceSettings) -> Result<ClusterSpec, String> {
    let mut ups = Vec::with_capacity(upstreams.len());
    for u in upstreams {
        ups.push(upstream(u)?);
    }
    let mut spec = ClusterSpec::with_upstreams(ups);
    if let Some(b) = &s.balancer {
        balancer(&mut spec, b)?;
    }
    if let Some(h) = &s.health_check {
        spec.health_check = Some(health(h)?);
    }
    if let Some(o) = &s.outlier {
        spec.outlier = outlier(o)?;
    }
    spec.validate().map_err(|e| e.to_string())?;
    Ok(spec)
}

fn upstream(u: &UpstreamEntry) -> Result<UpstreamSpec, String> {
    let (addr, weight, state) = match u {
        UpstreamEntry::Address(a) => (a.as_str(), 1, AdminState::Active),
        UpstreamEntry::Full(t) => {
            let state = AdminState::parse(&t.state).ok_or_else(|| {
                format!(
                    "upstream {:?}: state {:?} is not active, draining or disabled",
                    t.address, t.state
                )
            })?;
            (t.address.as_str(), t.weight, state)
        }
    };
    Ok(UpstreamSpec {
        addr: parse_address(addr)?,
        weight,
        state,
    })
}

/// `IP:port`, `[v6]:port`, `name:port`; `localhost:port` stays 127.0.0.1 as it always was (a
/// resolver that also answers ::1 would add an endpoint nothing listens on).
pub fn parse_address(s: &str) -> Result<ringway_core::balance::UpstreamAddr, String> {
    if let Some(port) = s.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        let a = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        return Ok(ringway_core::balance::UpstreamAddr::Socket(a));
    }
    parse_upstream_addr(s).map_err(|e| e.to_string())
}

fn balancer(spec: &mut ClusterSpec, b: &BalancerSection) -> Result<(), String> {
    if let Some(name) = &b.strategy {
        spec.strategy = strategy(name, b.hash_key.as_deref())?;
    } else if b.hash_key.is_some() {
        return Err("balancer.hash_key needs strategy = \"hash\"".into());
    }
    if let Some(c) = &b.sticky_cookie {
        spec.sticky = Some(Sticky {
            cookie: c.as_str().into(),
            max_age_s: b.sticky_max_age_s,
        });
    }
    let r = &mut spec.retry;
    set(&mut r.retries_max, b.retries_max);
    r.per_try_timeout_ms = b.per_try_timeout_ms.or(r.per_try_timeout_ms);
    set(&mut r.budget_pct, b.retry_budget_pct);
    set(&mut r.budget_min, b.retry_budget_min);
    set(&mut r.budget_window_ms, b.retry_budget_window_ms);
    set(&mut spec.slow_start_ms, b.slow_start_ms);
    set(&mut spec.panic_threshold_pct, b.panic_threshold_pct);
    spec.limits = EndpointLimits {
        connections_max: b.connections_max.unwrap_or(0),
        pending_max: b.pending_max.unwrap_or(0),
    };
    Ok(())
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

fn strategy(name: &str, key: Option<&str>) -> Result<Strategy, String> {
    let s = match name {
        "round_robin" => Strategy::RoundRobin,
        "least_connections" => Strategy::LeastConnections,
        "p2c" | "power_of_two" => Strategy::PowerOfTwo,
        "random" => Strategy::Random,
        "hash" => Strategy::Hash(hash_key(key.unwrap_or("client_ip"))?),
        other => {
            return Err(format!(
                "balancer.strategy {other:?}: expected round_robin, least_connections, p2c, random or hash"
            ));
        }
    };
    if key.is_some() && !matches!(s, Strategy::Hash(_)) {
        return Err("balancer.hash_key needs strategy = \"hash\"".into());
    }
    Ok(s)
}

fn hash_key(k: &str) -> Result<HashKey, String> {
    Ok(match k {
        "client_ip" => HashKey::ClientIp,
        "path" => HashKey::Path,
        _ => match k.split_once(':') {
            Some(("header", n)) => HashKey::Header(n.to_ascii_lowercase().into()),
            Some(("cookie", n)) => HashKey::Cookie(n.into()),
            _ => {
                return Err(format!(
                    "balancer.hash_key {k:?}: expected client_ip, path, header:NAME or cookie:NAME"
                ));
            }
        },
    })
}

fn health(h: &HealthSection) -> Result<HealthCheck, String> {
    let mut c = HealthCheck::http(h.path.as_deref().unwrap_or("/"));
    match h.kind.as_deref().unwrap_or("http") {
        "http" => {
            if let CheckKind::Http {
                method,
                host,
                statuses,
                ..
            } = &mut c.kind
            {
                if let Some(m) = &h.method {
                    *method = m.as_str().into();
                }
                *host = h.host.as_deref().map(Into::into);
                if let Some(s) = &h.statuses {
                    *statuses = StatusRanges::parse(s).ok_or_else(|| {
                        format!("health_check.statuses {s:?}: expected 200-399 or 200,204")
                    })?;
                }
            }
        }
        "tcp" => {
            if h.method.is_some() || h.path.is_some() || h.host.is_some() || h.statuses.is_some() {
                return Err(
                    "health_check: method, path, host and statuses are for type = \"http\"".into(),
                );
            }
            c.kind = CheckKind::Tcp;
        }
        other => return Err(format!("health_check.type {other:?}: expected http or tcp")),
    }
    set(&mut c.interval_ms, h.interval_ms);
    set(&mut c.timeout_ms, h.timeout_ms);
    set(&mut c.rise, h.rise);
    set(&mut c.fall, h.fall);
    Ok(c)
}

fn outlier(o: &OutlierSection) -> Result<Outlier, String> {
    let mut out = Outlier::default();
    set(&mut out.consecutive_failures, o.consecutive_failures);
    set(&mut out.ejection_ms, o.ejection_ms);
    set(&mut out.ejection_max_ms, o.ejection_max_ms);
    set(&mut out.max_ejected_pct, o.max_ejected_pct);
    if let Some(list) = &o.failure_statuses {
        let mut s = Statuses5xx::default();
        for &st in list {
            if !s.insert(st) {
                return Err(format!("outlier.failure_statuses: {st} is not 500..=599"));
            }
        }
        out.failure_statuses = s;
    }
    Ok(out)
}

/// The settings that give back `spec` (for the snapshot file, which stores what the
/// database said).
pub fn settings_of(spec: &ClusterSpec) -> (Vec<UpstreamEntry>, BalanceSettings) {
    let ups = spec
        .upstreams
        .iter()
        .map(|u| {
            UpstreamEntry::Full(UpstreamTable {
                address: u.addr.to_string(),
                weight: u.weight,
                state: u.state.name().into(),
            })
        })
        .collect();
    let (strategy, hash_key) = match &spec.strategy {
        Strategy::RoundRobin => ("round_robin", None),
        Strategy::LeastConnections => ("least_connections", None),
        Strategy::PowerOfTwo => ("p2c", None),
        Strategy::Random => ("random", None),
        Strategy::Hash(k) => (
            "hash",
            Some(match k {
                HashKey::ClientIp => "client_ip".to_string(),
                HashKey::Path => "path".into(),
                HashKey::Header(n) => format!("header:{n}"),
                HashKey::Cookie(n) => format!("cookie:{n}"),
            }),
        ),
    };
    let r = &spec.retry;
    let balancer = BalancerSection {
        strategy: Some(strategy.into()),
        hash_key,
        sticky_cookie: spec.sticky.as_ref().map(|s| s.cookie.to_string()),
        sticky_max_age_s: spec.sticky.as_ref().and_then(|s| s.max_age_s),
        retries_max: Some(r.retries_max),
        per_try_timeout_ms: r.per_try_timeout_ms,
        retry_budget_pct: Some(r.budget_pct),
        retry_budget_min: Some(r.budget_min),
        retry_budget_window_ms: Some(r.budget_window_ms),
        slow_start_ms: Some(spec.slow_start_ms),
        panic_threshold_pct: Some(spec.panic_threshold_pct),
        connections_max: Some(spec.limits.connections_max),
        pending_max: Some(spec.limits.pending_max),
    };
    let health_check = spec.health_check.as_ref().map(|h| {
        let mut s = HealthSection {
            interval_ms: Some(h.interval_ms),
            timeout_ms: Some(h.timeout_ms),
            rise: Some(h.rise),
            fall: Some(h.fall),
            ..HealthSection::default()
        };
        match &h.kind {
            CheckKind::Tcp => s.kind = Some("tcp".into()),
            CheckKind::Http {
                method,
                path,
                host,
                statuses,
            } => {
                s.kind = Some("http".into());
                s.method = Some(method.to_string());
                s.path = Some(path.to_string());
                s.host = host.as_ref().map(|h| h.to_string());
                let ranges: Vec<String> =
                    statuses.0.iter().map(|(a, b)| format!("{a}-{b}")).collect();
                s.statuses = Some(ranges.join(","));
            }
        }
        s
    });
    let o = &spec.outlier;
    let outlier = OutlierSection {
        consecutive_failures: Some(o.consecutive_failures),
        ejection_ms: Some(o.ejection_ms),
        ejection_max_ms: Some(o.ejection_max_ms),
        max_ejected_pct: Some(o.max_ejected_pct),
        failure_statuses: Some(
            (500..600)
                .filter(|&s| o.failure_statuses.contains(s))
                .collect(),
        ),
    };
    let settings = BalanceSettings {
        balancer: Some(balancer),
        health_check,
        outlier: Some(outlier),
    };
    (ups, settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<ClusterSpec, String> {
        let mut t: toml::Table = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        let ups = t.remove("upstreams").ok_or("no upstreams key")?;
        let ups: Vec<UpstreamEntry> = ups.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        let s: BalanceSettings = t.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        build(&ups, &s)
    }

    #[test]
    fn builds_every_key_and_round_trips() {
        let spec = parse(
            r#"
            upstreams = ["10.0.0.1:80", { address = "app.internal:3000", weight = 3, state = "draining" }]
            [balancer]
            strategy = "hash"
            hash_key = "header:X-User"
            sticky_cookie = "rw_ep"
            retries_max = 3
            per_try_timeout_ms = 500
            slow_start_ms = 30000
            panic_threshold_pct = 0
            connections_max = 100
            [health_check]
            path = "/healthz"
            statuses = "200-299,304"
            fall = 2
            [outlier]
            consecutive_failures = 3
            failure_statuses = [500, 503]
            "#,
        )
        .unwrap();
        assert_eq!(spec.upstreams[1].weight, 3);
        assert_eq!(spec.upstreams[1].state, AdminState::Draining);
        assert_eq!(
            spec.strategy,
            Strategy::Hash(HashKey::Header("x-user".into()))
        );
        assert_eq!(spec.retry.retries_max, 3);
        assert!(spec.outlier.failure_statuses.contains(500));
        assert!(!spec.outlier.failure_statuses.contains(502));
        let h = spec.health_check.clone().unwrap();
        assert_eq!(h.fall, 2);
        let (ups, settings) = settings_of(&spec);
        assert_eq!(build(&ups, &settings).unwrap(), spec);
        let json = serde_json::to_string(&settings).unwrap();
        let back: BalanceSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(build(&ups, &back).unwrap(), spec);
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (text, want) in [
            (r#"upstreams = ["a:b"]"#, "not IP:port"),
            (
                r#"upstreams = [{ address = "10.0.0.1:80", weight = 0 }]"#,
                "weight 0",
            ),
            (
                r#"upstreams = [{ address = "10.0.0.1:80", state = "gone" }]"#,
                "state \"gone\"",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balancer]\nstrategy = \"fastest\"",
                "balancer.strategy",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balancer]\nhash_key = \"path\"",
                "needs strategy",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balancer]\nstrategy = \"hash\"\nhash_key = \"ip\"",
                "hash_key",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balancer]\nretries_max = 9",
                "retries_max",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[health_check]\ninterval_ms = 10",
                "interval_ms",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[health_check]\ntype = \"tcp\"\npath = \"/\"",
                "for type",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[outlier]\nfailure_statuses = [404]",
                "404",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balancer]\nsticky_cookie = \"a b\"",
                "cookie name",
            ),
            ("upstreams = []", "no upstreams"),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balancer]\nstratgy = \"p2c\"",
                "unknown field",
            ),
            (
                "upstreams = [\"10.0.0.1:80\"]\n[balncer]\n",
                "unknown field",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn localhost_stays_the_loopback_address() {
        let spec = parse(r#"upstreams = ["localhost:3000", "db.internal:5000"]"#).unwrap();
        assert_eq!(
            spec.upstreams[0].addr,
            ringway_core::balance::UpstreamAddr::Socket("127.0.0.1:3000".parse().unwrap())
        );
        assert!(matches!(
            spec.upstreams[1].addr,
            ringway_core::balance::UpstreamAddr::Name { .. }
        ));
    }
}
