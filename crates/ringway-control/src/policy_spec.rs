//! Edge policies as stores write them (TOML tables in the routes file, JSON or rows in
//! PostgreSQL), checked and built into the `Policy` the workers evaluate.
//!
//! ```toml
//! [[policy]]
//! project_id = 11                 # or: host = "shop.example.com" (that host's own policy)
//! ip_mode = "deny_list"           # or "allow_list": only `allow` passes
//! allow = ["10.0.0.0/8"]
//! deny = ["203.0.113.0/24", "2001:db8::/32"]
//! block_user_agents = ["badbot"]  # case-insensitive substrings
//! block_paths = ["/wp-admin"]     # prefixes
//! visitor_cookies = true          # rw_vid / rw_sid cookies, X-Visitor-ID / X-Session-ID
//!
//! [[policy.rate_limit]]
//! rps = 10
//! burst = 20
//! path_prefix = "/api/"           # optional: only these requests count
//! per_path = false                # a budget per request path (else one for the prefix)
//!
//! [policy.challenge]
//! when = "always"                 # or "on_match" with the three below
//! user_agents = ["curl"]
//! path_prefixes = ["/login"]
//! rate_above_rps = 50
//! exempt_paths = ["/api/"]
//! difficulty_bits = 16
//! pass_ttl_s = 3600
//! binding = "network"             # or "address"
//! ```

use ringway_core::Cidr;
use ringway_core::policy::{
    BLOCK_RULES_MAX, Challenge, ChallengeWhen, CookieBinding, IP_RULES_MAX, IpMode, IpSet, Policy,
    PolicySet, RATE_RULES_MAX, RateRule,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most policies one store may hold.
pub const POLICIES_MAX: usize = 1_000_000;
/// Highest rate a limit may name: the limiter keeps time in microseconds, so one request
/// per microsecond is the finest interval it can express.
pub const RATE_RPS_MAX: u32 = 1_000_000;
/// Hardest challenge accepted (2^24 hashes is seconds of a phone's time).
pub const DIFFICULTY_BITS_MAX: u8 = 24;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IpModeSpec {
    #[default]
    DenyList,
    AllowList,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    pub rps: u32,
    #[serde(default)]
    pub burst: u32,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub per_path: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenSpec {
    #[default]
    Always,
    OnMatch,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BindingSpec {
    #[default]
    Network,
    Address,
}

fn default_difficulty() -> u8 {
    16
}

fn default_pass_ttl() -> u32 {
    3600
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChallengeSpec {
    #[serde(default)]
    pub when: WhenSpec,
    #[serde(default)]
    pub user_agents: Vec<String>,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    #[serde(default)]
    pub rate_above_rps: Option<u32>,
    #[serde(default)]
    pub exempt_paths: Vec<String>,
    #[serde(default = "default_difficulty")]
    pub difficulty_bits: u8,
    #[serde(default = "default_pass_ttl")]
    pub pass_ttl_s: u32,
    #[serde(default)]
    pub binding: BindingSpec,
}

/// One policy as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub project_id: Option<i64>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub ip_mode: IpModeSpec,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub block_user_agents: Vec<String>,
    #[serde(default)]
    pub block_paths: Vec<String>,
    #[serde(default, rename = "rate_limit")]
    pub rate_limits: Vec<RateSpec>,
    #[serde(default)]
    pub challenge: Option<ChallengeSpec>,
    #[serde(default)]
    pub visitor_cookies: bool,
}

fn bytes_list(v: &[String], lower: bool) -> Box<[Box<[u8]>]> {
    v.iter()
        .map(|s| {
            let s = if lower {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            };
            s.into_bytes().into_boxed_slice()
        })
        .collect()
}

fn cidrs(v: &[String], what: &str) -> Result<IpSet, String> {
    let list = v
        .iter()
        .map(|s| s.parse::<Cidr>().map_err(|e| format!("{what}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IpSet::from_cidrs(&list))
}

/// A short stable number for a host, so a host policy's rate buckets differ from its
/// project's.
fn host_tag(host: &str) -> u32 {
    host.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl PolicySpec {
    /// Checks and builds the policy. `name` names it in errors and logs.
    pub fn build(&self, name: &str) -> Result<Policy, String> {
        let at = |m: String| format!("policy {name}: {m}");
        if self.allow.len() + self.deny.len() > IP_RULES_MAX {
            return Err(at(format!("more than {IP_RULES_MAX} IP rules")));
        }
        if self.block_user_agents.len() + self.block_paths.len() > BLOCK_RULES_MAX {
            return Err(at(format!("more than {BLOCK_RULES_MAX} block rules")));
        }
        if self.rate_limits.len() > RATE_RULES_MAX {
            return Err(at(format!("more than {RATE_RULES_MAX} rate limits")));
        }
        if self.ip_mode == IpModeSpec::AllowList && self.allow.is_empty() {
            return Err(at(
                "allow_list with an empty allow list would refuse everyone".into(),
            ));
        }
        for p in self.block_paths.iter().chain(
            self.rate_limits
                .iter()
                .filter_map(|r| r.path_prefix.as_ref()),
        ) {
            if !p.starts_with('/') {
                return Err(at(format!("path {p:?} must start with /")));
            }
        }
        if self.block_user_agents.iter().any(|u| u.is_empty()) {
            return Err(at("an empty user-agent pattern would block everyone".into()));
        }
        let tag = self
            .host
            .as_deref()
            .map_or(0, |h| (host_tag(h) & 0x7fff_ff00) | 0x8000_0000);
        let rate_limits = self
            .rate_limits
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if r.rps == 0 || r.rps > RATE_RPS_MAX {
                    return Err(at(format!(
                        "rate_limit #{}: rps must be between 1 and {RATE_RPS_MAX}",
                        i + 1
                    )));
                }
                if r.burst > RATE_RPS_MAX {
                    return Err(at(format!(
                        "rate_limit #{}: burst must be at most {RATE_RPS_MAX}",
                        i + 1
                    )));
                }
                Ok(RateRule {
                    id: tag | i as u32,
                    rps: r.rps,
                    burst: r.burst,
                    path_prefix: r
                        .path_prefix
                        .as_ref()
                        .map(|p| p.to_ascii_lowercase().into_bytes().into_boxed_slice()),
                    per_path: r.per_path,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let challenge = match &self.challenge {
            None => None,
            Some(c) => {
                if c.difficulty_bits == 0 || c.difficulty_bits > DIFFICULTY_BITS_MAX {
                    return Err(at(format!(
                        "challenge difficulty_bits must be 1 to {DIFFICULTY_BITS_MAX}"
                    )));
                }
                if c.pass_ttl_s < 60 {
                    return Err(at("challenge pass_ttl_s must be at least 60".into()));
                }
                // The same rules as block patterns: an empty user agent would match every
                // request, an empty or relative path prefix every path.
                if c.user_agents.len() + c.path_prefixes.len() + c.exempt_paths.len()
                    > BLOCK_RULES_MAX
                {
                    return Err(at(format!(
                        "challenge: at most {BLOCK_RULES_MAX} user agents and paths together"
                    )));
                }
                if c.user_agents.iter().any(|u| u.is_empty()) {
                    return Err(at("challenge user_agents: an empty pattern".into()));
                }
                if let Some(bad) = c
                    .path_prefixes
                    .iter()
                    .chain(&c.exempt_paths)
                    .find(|p| !p.starts_with('/'))
                {
                    return Err(at(format!(
                        "challenge paths must start with /, not {bad:?}"
                    )));
                }
                if c.rate_above_rps.is_some_and(|r| r == 0 || r > RATE_RPS_MAX) {
                    return Err(at(format!(
                        "challenge rate_above_rps must be between 1 and {RATE_RPS_MAX}"
                    )));
                }
                let when = match c.when {
                    WhenSpec::Always => ChallengeWhen::Always,
                    WhenSpec::OnMatch => {
                        if c.user_agents.is_empty()
                            && c.path_prefixes.is_empty()
                            && c.rate_above_rps.is_none()
                        {
                            return Err(at("challenge when = \"on_match\" needs user_agents, path_prefixes or rate_above_rps".into()));
                        }
                        ChallengeWhen::OnMatch {
                            user_agents: bytes_list(&c.user_agents, true),
                            path_prefixes: bytes_list(&c.path_prefixes, true),
                            rate_above_rps: c.rate_above_rps,
                        }
                    }
                };
                Some(Challenge {
                    when,
                    exempt_paths: bytes_list(&c.exempt_paths, false),
                    difficulty_bits: c.difficulty_bits,
                    pass_ttl_s: c.pass_ttl_s,
                    binding: match c.binding {
                        BindingSpec::Network => CookieBinding::Network,
                        BindingSpec::Address => CookieBinding::Address,
                    },
                })
            }
        };
        Ok(Policy {
            name: name.into(),
            ip_mode: match self.ip_mode {
                IpModeSpec::DenyList => IpMode::DenyList,
                IpModeSpec::AllowList => IpMode::AllowList,
            },
            allow: cidrs(&self.allow, &format!("policy {name}: allow"))?,
            deny: cidrs(&self.deny, &format!("policy {name}: deny"))?,
            block_user_agents: bytes_list(&self.block_user_agents, true),
            block_paths: bytes_list(&self.block_paths, true),
            rate_limits: rate_limits.into(),
            challenge,
            visitor_cookies: self.visitor_cookies,
        })
    }
}

/// Builds a policy set from specs: each names a project or a host, never both, once.
pub fn build_set(specs: &[PolicySpec]) -> Result<PolicySet, String> {
    if specs.len() > POLICIES_MAX {
        return Err(format!("{} policies; at most {POLICIES_MAX}", specs.len()));
    }
    let mut set = PolicySet::default();
    for (i, s) in specs.iter().enumerate() {
        match (s.project_id, &s.host) {
            (Some(p), None) => {
                let built = s.build(&format!("project {p}"))?;
                if set.by_project.insert(p, Arc::new(built)).is_some() {
                    return Err(format!("policy #{}: project {p} has two policies", i + 1));
                }
            }
            (None, Some(h)) => {
                let host = ringway_core::route::normalize_pattern(h)
                    .map_err(|e| format!("policy #{}: {e}", i + 1))?;
                if host.starts_with('*') {
                    return Err(format!(
                        "policy #{}: host policies name one host, not {h:?}",
                        i + 1
                    ));
                }
                let built = s.build(&format!("host {host}"))?;
                if set.by_host.insert(host.clone(), Arc::new(built)).is_some() {
                    return Err(format!("policy #{}: host {host} has two policies", i + 1));
                }
            }
            _ => {
                return Err(format!(
                    "policy #{}: name project_id or host (one of them)",
                    i + 1
                ));
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_refuses() {
        let s: PolicySpec = toml::from_str(
            r#"
            project_id = 1
            deny = ["10.0.0.0/8", "::1"]
            block_user_agents = ["BadBot"]
            [[rate_limit]]
            rps = 5
            burst = 2
            [challenge]
            when = "on_match"
            path_prefixes = ["/login"]
            "#,
        )
        .unwrap();
        let p = s.build("t").unwrap();
        assert!(!p.ip_allowed("10.1.2.3".parse().unwrap()));
        assert_eq!(p.blocked(b"a badbot", b"/"), Some("blocked_user_agent"));
        assert_eq!(p.rate_limits[0].rps, 5);
        let set = build_set(std::slice::from_ref(&s)).unwrap();
        assert!(set.by_project.contains_key(&1));
        assert!(
            build_set(&[s.clone(), s.clone()]).is_err(),
            "two policies for one project"
        );
        for bad in [
            "project_id = 1\ndeny = [\"10.0.0.0/33\"]",
            "project_id = 1\nip_mode = \"allow_list\"",
            "project_id = 1\nblock_paths = [\"wp-admin\"]",
            "project_id = 1\n[[rate_limit]]\nrps = 0",
            "project_id = 1\n[[rate_limit]]\nrps = 1000001",
            "project_id = 1\n[challenge]\nwhen = \"on_match\"\nrate_above_rps = 0",
            "project_id = 1\n[challenge]\nexempt_paths = [\"\"]",
            "project_id = 1\n[challenge]\nwhen = \"on_match\"\npath_prefixes = [\"login\"]",
            "project_id = 1\n[challenge]\nwhen = \"on_match\"\nuser_agents = [\"\"]",
            "project_id = 1\n[[rate_limit]]\nrps = 10\nburst = 1000001",
            "project_id = 1\n[challenge]\ndifficulty_bits = 40",
            "project_id = 1\n[challenge]\nwhen = \"on_match\"",
        ] {
            let s: PolicySpec = toml::from_str(bad).unwrap();
            assert!(build_set(&[s]).is_err(), "{bad}");
        }
        assert!(
            build_set(&[PolicySpec::default()]).is_err(),
            "neither project nor host"
        );
    }
}
