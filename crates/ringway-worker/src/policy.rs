//! The policy phase: after routing, before anything reaches the upstream. In order: IP rules
//! (403), block rules on user agent and path (403), rate limits (429 with Retry-After), the
//! challenge (a page, or the pass cookie that skips it), then visitor and session ids.
//!
//! Everything is read from the lock-free policy table under one epoch pin; rate limits update
//! one atomic word per (client, rule) shared by the workers. No lock. A request that passes
//! allocates nothing (cookies go into a fixed buffer in `Ids`); the challenge's own answers
//! (page, pass cookie) build small buffers, which only challenged requests pay for.

use crate::challenge::{self, Keys};
use ringway_core::policy::{ChallengeWhen, Policy, RateDecision, rate_key, starts_with_ci};
use std::net::IpAddr;

pub const VISITOR_COOKIE: &[u8] = b"rw_vid";
pub const SESSION_COOKIE: &[u8] = b"rw_sid";
/// Room for the Set-Cookie lines one response may carry (visitor, session, pass).
pub const SET_COOKIE_BYTES_MAX: usize = 512;
const ID_HEX: usize = 32;

/// Visitor and session ids of an exchange and the cookies to set.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub visitor: [u8; ID_HEX],
    pub session: [u8; ID_HEX],
    pub active: bool,
    set_cookie: [u8; SET_COOKIE_BYTES_MAX],
    set_cookie_len: usize,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            visitor: [0; ID_HEX],
            session: [0; ID_HEX],
            active: false,
            set_cookie: [0; SET_COOKIE_BYTES_MAX],
            set_cookie_len: 0,
        }
    }
}

impl Ids {
    /// `Set-Cookie: ...\r\n` lines to add to the response.
    pub fn set_cookie_lines(&self) -> &[u8] {
        &self.set_cookie[..self.set_cookie_len]
    }

    pub fn visitor(&self) -> &[u8] {
        if self.active { &self.visitor } else { &[] }
    }

    pub fn session(&self) -> &[u8] {
        if self.active { &self.session } else { &[] }
    }

    /// Adds a `Set-Cookie` of the proxy's own (the sticky endpoint cookie); dropped if the
    /// lines are full.
    pub fn push_set_cookie(&mut self, value: &[u8]) {
        self.push_line(&[value]);
    }

    fn push_line(&mut self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 14;
        if self.set_cookie_len + len > SET_COOKIE_BYTES_MAX {
            return;
        }
        let mut at = self.set_cookie_len;
        for p in std::iter::once(&b"Set-Cookie: "[..])
            .chain(parts.iter().copied())
            .chain(std::iter::once(&b"\r\n"[..]))
        {
            self.set_cookie[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        self.set_cookie_len = at;
    }
}

/// What the policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// 403: the IP rules refuse the client.
    IpDenied,
    /// 403: a block rule matched; the reason for the log (`blocked_user_agent`, `blocked_path`).
    Blocked(&'static str),
    /// The path cannot be matched against the rules: too long to normalise (414, see
    /// `ringway_core::policy::POLICY_PATH_BYTES_MAX`), or ambiguous (400).
    BadPath(ringway_core::policy::PathError),
    /// 429: retry after this many seconds.
    Limit(u64),
    /// The challenge page is due.
    Challenge,
    /// The request is for the verification path: the caller checks the solution.
    Verify,
}

/// The request facts the phase looks at.
#[derive(Debug)]
pub struct Facts<'a> {
    pub host: &'a [u8],
    pub project: i64,
    pub ip: IpAddr,
    pub user_agent: &'a [u8],
    pub path: &'a [u8],
    /// Values of every Cookie header.
    pub cookies: &'a [&'a [u8]],
    pub now_unix: u64,
    pub now_us: u64,
}

/// A random seed for a worker's id generator.
pub fn seed() -> u64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        // Still distinct per process and worker start; ids stay unique enough.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed)
            ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// Finds a cookie's value in the Cookie headers.
pub fn cookie<'a>(headers: &[&'a [u8]], name: &[u8]) -> Option<&'a [u8]> {
    headers.iter().find_map(|h| {
        h.split(|&b| b == b';').find_map(|kv| {
            let kv = kv.trim_ascii();
            let eq = kv.iter().position(|&b| b == b'=')?;
            (kv[..eq].trim_ascii() == name).then(|| kv[eq + 1..].trim_ascii())
        })
    })
}

/// Evaluates `p` for a request. `limiter` is shared by the workers.
pub fn evaluate(
    p: &Policy,
    f: &Facts<'_>,
    limiter: &ringway_core::policy::RateLimiter,
    keys: &Keys,
) -> Verdict {
    if !p.ip_allowed(f.ip) {
        return Verdict::IpDenied;
    }
    if let Some(why) = p.blocked(f.user_agent, f.path) {
        return Verdict::Blocked(why);
    }
    for rule in p.rate_limits.iter() {
        let prefix = rule.path_prefix.as_deref();
        if prefix.is_some_and(|pre| !starts_with_ci(f.path, pre)) {
            continue;
        }
        let key = rate_key(
            rule.id,
            f.project,
            f.ip,
            if rule.per_path { Some(f.path) } else { None },
        );
        if let RateDecision::Limit { retry_after_us } =
            limiter.check(key, rule.rps, rule.burst, f.now_us)
        {
            return Verdict::Limit(retry_after_us.div_ceil(1_000_000).max(1));
        }
    }
    let Some(ch) = &p.challenge else {
        return Verdict::Pass;
    };
    if f.path.starts_with(challenge::VERIFY_PATH) {
        return Verdict::Verify;
    }
    // Exemptions compare exactly: a miss only means a challenge (fails closed), while the
    // enforcing prefixes above ignore case (an upstream may).
    if ch.exempt_paths.iter().any(|e| f.path.starts_with(e)) {
        return Verdict::Pass;
    }
    let required = match &ch.when {
        ChallengeWhen::Always => true,
        ChallengeWhen::OnMatch {
            user_agents,
            path_prefixes,
            rate_above_rps,
        } => {
            user_agents
                .iter()
                .any(|u| ringway_core::policy::contains_ci(f.user_agent, u))
                || path_prefixes.iter().any(|pre| starts_with_ci(f.path, pre))
                || rate_above_rps.is_some_and(|rps| {
                    let key = rate_key(u32::MAX, f.project, f.ip, None);
                    matches!(
                        limiter.check(key, rps, rps, f.now_us),
                        RateDecision::Limit { .. }
                    )
                })
        }
    };
    if !required {
        return Verdict::Pass;
    }
    match cookie(f.cookies, challenge::PASS_COOKIE) {
        Some(v) if challenge::pass_valid(v, keys, f.host, f.ip, ch.binding, f.now_unix) => {
            Verdict::Pass
        }
        _ => Verdict::Challenge,
    }
}

fn is_hex_id(v: &[u8]) -> bool {
    v.len() == ID_HEX && v.iter().all(|c| c.is_ascii_hexdigit())
}

fn hex_id(rand: &mut impl FnMut() -> u64) -> [u8; ID_HEX] {
    let mut out = [0u8; ID_HEX];
    let (a, b) = (rand(), rand());
    ringway_proto::write::hex_into(&a.to_be_bytes(), &mut out[..ID_HEX / 2]);
    ringway_proto::write::hex_into(&b.to_be_bytes(), &mut out[ID_HEX / 2..]);
    out
}

/// Visitor and session ids from the cookies, new ones where missing or expired, and the
/// Set-Cookie lines that keep them. The session cookie is `<id>.<issued unix s>`: it is
/// refreshed (a new issue time, same id) once a quarter of the idle window has passed, so
/// most responses carry no Set-Cookie.
pub fn visitor_ids(
    cookies: &[&[u8]],
    now: u64,
    session_idle_s: u64,
    visitor_ttl_s: u64,
    secure: bool,
    mut rand: impl FnMut() -> u64,
) -> Ids {
    let mut ids = Ids {
        active: true,
        ..Ids::default()
    };
    let secure_attr: &[u8] = if secure { b"; Secure" } else { b"" };
    let (mut age_buf, mut t_buf) = ([0u8; 20], [0u8; 20]);
    match cookie(cookies, VISITOR_COOKIE).filter(|v| is_hex_id(v)) {
        Some(v) => ids.visitor.copy_from_slice(v),
        None => {
            ids.visitor = hex_id(&mut rand);
            let v = ids.visitor;
            ids.push_line(&[
                VISITOR_COOKIE,
                b"=",
                &v,
                b"; Path=/; Max-Age=",
                ringway_proto::write::decimal(visitor_ttl_s, &mut age_buf),
                b"; HttpOnly; SameSite=Lax",
                secure_attr,
            ]);
        }
    }
    let existing = cookie(cookies, SESSION_COOKIE).and_then(|v| {
        let (id, issued) = v.split_at_checked(ID_HEX)?;
        let issued = issued.strip_prefix(b".")?;
        let issued: u64 = std::str::from_utf8(issued).ok()?.parse().ok()?;
        (is_hex_id(id) && issued <= now && now - issued < session_idle_s).then_some((id, issued))
    });
    let refresh = match existing {
        Some((id, issued)) => {
            ids.session.copy_from_slice(id);
            now - issued >= session_idle_s / 4
        }
        None => {
            ids.session = hex_id(&mut rand);
            true
        }
    };
    if refresh {
        let s = ids.session;
        ids.push_line(&[
            SESSION_COOKIE,
            b"=",
            &s,
            b".",
            ringway_proto::write::decimal(now, &mut t_buf),
            b"; Path=/; Max-Age=",
            ringway_proto::write::decimal(session_idle_s, &mut age_buf),
            b"; HttpOnly; SameSite=Lax",
            secure_attr,
        ]);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_several_headers() {
        let h: [&[u8]; 2] = [b"a=1; rw_vid=abc", b" x = y ;__ringway_pass=1.0.ff"];
        assert_eq!(cookie(&h, b"rw_vid"), Some(&b"abc"[..]));
        assert_eq!(cookie(&h, b"x"), Some(&b"y"[..]));
        assert_eq!(cookie(&h, b"__ringway_pass"), Some(&b"1.0.ff"[..]));
        assert_eq!(cookie(&h, b"rw"), None);
    }

    #[test]
    fn ids_are_kept_made_and_refreshed() {
        let mut n = 0u64;
        let rand = || {
            n += 1;
            n
        };
        let fresh = visitor_ids(&[], 1000, 1800, 86400, true, rand);
        let lines = String::from_utf8(fresh.set_cookie_lines().to_vec()).unwrap();
        assert_eq!(lines.matches("Set-Cookie: ").count(), 2, "{lines}");
        assert!(
            lines.contains("rw_vid=")
                && lines.contains("Max-Age=86400; HttpOnly; SameSite=Lax; Secure")
        );
        assert!(lines.contains(&format!(
            "rw_sid={}.1000",
            std::str::from_utf8(&fresh.session).unwrap()
        )));

        let vid = std::str::from_utf8(&fresh.visitor).unwrap().to_string();
        let sid = std::str::from_utf8(&fresh.session).unwrap().to_string();
        let cookie = format!("rw_vid={vid}; rw_sid={sid}.1000");
        let h: [&[u8]; 1] = [cookie.as_bytes()];
        // Soon after: same ids, nothing to set.
        let again = visitor_ids(&h, 1100, 1800, 86400, false, || 7);
        assert_eq!(again.visitor, fresh.visitor);
        assert_eq!(again.session, fresh.session);
        assert!(again.set_cookie_lines().is_empty());
        // A quarter of the idle window later: same session, refreshed.
        let later = visitor_ids(&h, 1000 + 450, 1800, 86400, false, || 7);
        assert_eq!(later.session, fresh.session);
        assert!(
            String::from_utf8_lossy(later.set_cookie_lines())
                .contains(&format!("rw_sid={sid}.1450"))
        );
        // Idle past the window: a new session, the same visitor.
        let expired = visitor_ids(&h, 1000 + 1800, 1800, 86400, false, || 99);
        assert_eq!(expired.visitor, fresh.visitor);
        assert_ne!(expired.session, fresh.session);
    }
}
