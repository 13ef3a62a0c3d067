//! Phase 2b, policy (after routing): the edge policy of the host or the route's project, read
//! from the lock-free policy table: IP rules (403), block rules (403), an unmatchable path
//! (400, 414), rate limits (429), the proof-of-work challenge (403 page, 302 with a pass
//! cookie), then visitor and session ids. See `crate::policy` and docs/policy.md.

use super::answer::Answer;
use super::record::Exchange;
use crate::challenge;
use crate::client::ClientIo;
use crate::policy::Verdict;
use crate::route::{HostName, Target};
use crate::worker::Worker;
use ringway_core::policy::{CookieBinding, PathError};
use std::time::SystemTime;

/// Most Cookie headers the policy phase looks at.
const COOKIE_HEADERS_MAX: usize = 8;

/// What the policy decided, copied out of the epoch-pinned policy.
struct Decided {
    verdict: Verdict,
    /// Difficulty, binding and pass lifetime of the challenge, if any.
    challenge: Option<(u8, CookieBinding, u32)>,
    visitor_cookies: bool,
}

/// Runs the policy of `host` (or the route's project) on `r`. `Err`: the answer that ends the
/// exchange. `has_body`: the request's body is unread (an answer then closes).
pub(super) fn run<S: ClientIo>(
    w: &Worker,
    r: &ringway_proto::Request<'_, '_>,
    host: &HostName,
    target: Target,
    ex: &mut Exchange,
    has_body: bool,
) -> Result<(), Answer> {
    if w.policies.is_empty() {
        return Ok(());
    }
    let mut cookie_vals: [&[u8]; COOKIE_HEADERS_MAX] = [&[]; COOKIE_HEADERS_MAX];
    let mut n = 0;
    let mut now_unix = 0;
    // The facts are gathered only once a policy applies: hosts without one pay a lookup.
    let Some(d) = w
        .policies
        .with_policy(host.as_str(), target.ids.project_id, |p| {
            // One walk over the fields for everything the rules read.
            let mut user_agent: Option<&[u8]> = None;
            for h in r.headers.iter() {
                if h.name.eq_ignore_ascii_case("cookie") {
                    if n < COOKIE_HEADERS_MAX {
                        cookie_vals[n] = h.value;
                        n += 1;
                    }
                } else if user_agent.is_none() && h.name.eq_ignore_ascii_case("user-agent") {
                    user_agent = Some(h.value);
                }
            }
            now_unix = unix_now();
            decide(
                w,
                p,
                r,
                host,
                target,
                ex,
                user_agent,
                &cookie_vals[..n],
                now_unix,
            )
        })
    else {
        return Ok(());
    };
    let cookies = &cookie_vals[..n];
    let refuse = |status, reason| Answer::error(status, reason).closing_if(has_body);
    let answer = match d.verdict {
        Verdict::Pass => None,
        Verdict::IpDenied => {
            w.stats.ip_denied.inc();
            Some(refuse(403, "ip_denied"))
        }
        Verdict::Blocked(reason) => {
            w.stats.blocked.inc();
            Some(refuse(403, reason))
        }
        Verdict::BadPath(PathError::TooLong) => {
            w.stats.blocked.inc();
            Some(refuse(414, "path_too_long"))
        }
        Verdict::BadPath(e) => {
            w.stats.ambiguous_paths.inc();
            Some(refuse(400, e.reason()))
        }
        Verdict::Limit(retry_after_s) => {
            w.stats.rate_limited.inc();
            let a = Answer::bytes(
                429,
                "rate_limited",
                b"text/plain; charset=utf-8",
                b"Too Many Requests\n".to_vec(),
            );
            Some(Answer {
                retry_after_s: Some(u32::try_from(retry_after_s).unwrap_or(u32::MAX)),
                ..a.closing_if(has_body)
            })
        }
        Verdict::Challenge | Verdict::Verify => d
            .challenge
            .map(|c| challenge_answer::<S>(w, r, host, ex, d.verdict, c, now_unix)),
    };
    if let Some(a) = answer {
        return Err(a.closing_if(has_body));
    }
    if d.visitor_cookies {
        let s = &w.settings;
        ex.ids = crate::policy::visitor_ids(
            cookies,
            now_unix,
            s.session_idle_s,
            s.visitor_ttl_s,
            S::TLS,
            || w.random_u64(),
        );
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Evaluates policy `p` under its epoch pin and copies out what the answer needs.
#[allow(clippy::too_many_arguments)]
fn decide(
    w: &Worker,
    p: &ringway_core::policy::Policy,
    r: &ringway_proto::Request<'_, '_>,
    host: &HostName,
    target: Target,
    ex: &Exchange,
    user_agent: Option<&[u8]>,
    cookies: &[&[u8]],
    now_unix: u64,
) -> Decided {
    // Prefix rules see the path as the upstream will resolve it (`/%77p-admin`, `//wp-admin`,
    // `/x%2F..%2Fwp-admin`, `/;x/wp-admin` are all `/wp-admin`), and a path servers disagree
    // on is refused. Most paths need nothing and skip the buffer; so do policies without path
    // rules.
    let mut path_buf;
    let mut bad_path = None;
    let path = if p.reads_path() && ringway_core::policy::path_needs_normalizing(r.path()) {
        path_buf = [0u8; ringway_core::policy::POLICY_PATH_BYTES_MAX];
        match ringway_core::policy::normalize_path(r.path(), &mut path_buf) {
            Ok(p) => p,
            Err(e) => {
                bad_path = Some(e);
                r.path()
            }
        }
    } else {
        r.path()
    };
    let facts = crate::policy::Facts {
        host: host.as_bytes(),
        project: target.ids.project_id,
        ip: ex.client_ip,
        user_agent: user_agent.unwrap_or(b""),
        path,
        cookies,
        now_unix,
        now_us: w.limiter.now_us(),
    };
    Decided {
        verdict: match bad_path {
            Some(e) => Verdict::BadPath(e),
            None => crate::policy::evaluate(p, &facts, &w.limiter, &w.settings.challenge_keys),
        },
        challenge: p
            .challenge
            .as_ref()
            .map(|c| (c.difficulty_bits, c.binding, c.pass_ttl_s)),
        visitor_cookies: p.visitor_cookies,
    }
}

/// The challenge's answers: the 302 with a pass cookie after a good solution, else the page.
fn challenge_answer<S: ClientIo>(
    w: &Worker,
    r: &ringway_proto::Request<'_, '_>,
    host: &HostName,
    ex: &Exchange,
    verdict: Verdict,
    (bits, binding, ttl): (u8, CookieBinding, u32),
    now_unix: u64,
) -> Answer {
    let keys = &w.settings.challenge_keys;
    let mut ret_path = Vec::new();
    let mut ret_ok = false;
    if verdict == Verdict::Verify {
        let query = r.query();
        let (nonce, sol, ret) = (
            challenge::query_param(query, b"n"),
            challenge::query_param(query, b"s"),
            challenge::query_param(query, b"r"),
        );
        let mut n_dec = Vec::new();
        let solved = match (nonce, sol) {
            (Some(nv), Some(sv)) => {
                challenge::percent_decode(nv, &mut n_dec).is_some()
                    && challenge::verify_solution(
                        &n_dec,
                        sv,
                        keys,
                        host.as_bytes(),
                        ex.client_ip,
                        binding,
                        bits,
                        now_unix,
                    )
                    .is_ok()
            }
            _ => false,
        };
        if let Some(rv) = ret {
            ret_ok = challenge::percent_decode(rv, &mut ret_path).is_some()
                && challenge::safe_return(&ret_path);
        }
        if solved {
            w.stats.challenges_passed.inc();
            let mut cookie = Vec::with_capacity(96);
            cookie.extend_from_slice(challenge::PASS_COOKIE);
            cookie.push(b'=');
            challenge::issue_pass(
                &mut cookie,
                keys,
                host.as_bytes(),
                ex.client_ip,
                binding,
                now_unix,
                ttl,
            );
            cookie.extend_from_slice(b"; Path=/; Max-Age=");
            ringway_proto::write::push_u64(&mut cookie, u64::from(ttl));
            cookie.extend_from_slice(b"; HttpOnly; SameSite=Lax");
            if S::TLS {
                cookie.extend_from_slice(b"; Secure");
            }
            let location = if ret_ok { ret_path } else { b"/".to_vec() };
            return Answer {
                body: super::answer::Body::Redirect {
                    location,
                    set_cookie: Some(cookie),
                },
                ..Answer::error(302, "challenge_passed")
            };
        }
    }
    let reason = if verdict == Verdict::Verify {
        w.stats.challenges_failed.inc();
        "challenge_failed"
    } else {
        w.stats.challenges_issued.inc();
        "challenge"
    };
    // The page sends the client back where it was going (or, after a failed solution, where
    // that solution said; never back to the failed verification URL itself: its nonce stays
    // stale, and a solved page would land on it again and again).
    let ret: Vec<u8> = if verdict != Verdict::Verify {
        r.origin_target().to_vec()
    } else if ret_ok {
        ret_path
    } else {
        b"/".to_vec()
    };
    let mut nonce = Vec::with_capacity(64);
    challenge::nonce(
        &mut nonce,
        keys,
        host.as_bytes(),
        ex.client_ip,
        binding,
        now_unix,
    );
    let mut page = Vec::new();
    challenge::page(&mut page, &nonce, bits, &ret);
    Answer::bytes(403, reason, b"text/html; charset=utf-8", page)
}
