//! Edge policy: what a project (or one of its domains) lets through before a request costs
//! its upstream anything. Built by the control plane from a store, published in a lock-free
//! table, evaluated by the workers per request with no lock and no allocation.
//!
//! Order of the checks (see docs/policy.md): IP rules, then block rules (user agent, path),
//! then rate limits, then the challenge; visitor and session cookies are set on what passes.

use crate::cidr::{Cidr, canonical};
use foldhash::fast::RandomState;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most IP rules one policy may hold.
pub const IP_RULES_MAX: usize = 1_000_000;
/// Most block patterns (user agent and path together) one policy may hold.
pub const BLOCK_RULES_MAX: usize = 10_000;
/// Most rate limit rules one policy may hold.
pub const RATE_RULES_MAX: usize = 64;

/// A set of addresses as sorted, disjoint, inclusive ranges: membership is a binary search,
/// whatever the number of rules (a CIDR list is merged at build time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Box<[(u32, u32)]>,
    v6: Box<[(u128, u128)]>,
}

fn merge<T: Ord + Copy>(mut r: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Box<[(T, T)]> {
    r.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(r.len());
    for (lo, hi) in r {
        if let Some(last) = out.last_mut() {
            // Overlapping or adjacent: extend.
            if lo <= last.1 || next(last.1) == Some(lo) {
                if hi > last.1 {
                    last.1 = hi;
                }
                continue;
            }
        }
        out.push((lo, hi));
    }
    out.into_boxed_slice()
}

fn find<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // The last range starting at or before x.
    let i = ranges.partition_point(|(lo, _)| *lo <= x);
    i > 0 && x <= ranges[i - 1].1
}

impl IpSet {
    pub fn from_cidrs(cidrs: &[Cidr]) -> IpSet {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for c in cidrs {
            match c.addr() {
                IpAddr::V4(a) => {
                    let bits = 32 - u32::from(c.prefix_len());
                    let mask = u32::MAX.checked_shl(bits).unwrap_or(0);
                    let lo = u32::from(a) & mask;
                    v4.push((lo, lo | !mask));
                }
                IpAddr::V6(a) => {
                    let bits = 128 - u32::from(c.prefix_len());
                    let mask = u128::MAX.checked_shl(bits).unwrap_or(0);
                    let lo = u128::from(a) & mask;
                    v6.push((lo, lo | !mask));
                }
            }
        }
        IpSet {
            v4: merge(v4, |x: u32| x.checked_add(1)),
            v6: merge(v6, |x: u128| x.checked_add(1)),
        }
    }

    /// Whether `ip` is in the set (IPv4-mapped IPv6 addresses count as IPv4).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        }
    }

    /// Disjoint ranges after merging.
    pub fn ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges() == 0
    }
}

/// How the IP rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpMode {
    /// Everything passes except `deny`.
    #[default]
    DenyList,
    /// Only `allow` passes (`deny` still wins inside it).
    AllowList,
}

/// Which part of the client address a challenge cookie is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CookieBinding {
    /// The exact address.
    Address,
    /// The IPv4 /24 or IPv6 /64 (clients behind NAT pools or privacy addresses).
    #[default]
    Network,
}

/// When a challenge is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChallengeWhen {
    Always,
    /// When any of these match (lower-case user agent substrings, path prefixes, or the
    /// client's request rate above `rate_above_rps` over one second).
    OnMatch {
        user_agents: Box<[Box<[u8]>]>,
        path_prefixes: Box<[Box<[u8]>]>,
        rate_above_rps: Option<u32>,
    },
}

/// A proof-of-work challenge and the cookie that proves it was solved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub when: ChallengeWhen,
    /// Paths that never see it (APIs, webhooks): prefixes.
    pub exempt_paths: Box<[Box<[u8]>]>,
    /// Leading zero bits the SHA-256 of the solution must have.
    pub difficulty_bits: u8,
    /// Lifetime of the pass cookie.
    pub pass_ttl_s: u32,
    pub binding: CookieBinding,
}

/// How a rate limit counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateRule {
    /// Distinguishes the rule's buckets from other rules'.
    pub id: u32,
    /// Sustained requests per second per key.
    pub rps: u32,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
    /// Only requests under this path prefix count (and are limited); None: all.
    pub path_prefix: Option<Box<[u8]>>,
    /// Key by client and the request's path (each path under the prefix has its own budget);
    /// else by client alone (all paths under the prefix share one).
    pub per_path: bool,
}

/// Everything one project (or domain) enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// For logs and metrics.
    pub name: Box<str>,
    pub ip_mode: IpMode,
    pub allow: IpSet,
    pub deny: IpSet,
    /// Lower-case substrings of User-Agent that are refused.
    pub block_user_agents: Box<[Box<[u8]>]>,
    /// Lower-case path prefixes that are refused (matched ignoring case, against the
    /// normalised path).
    pub block_paths: Box<[Box<[u8]>]>,
    pub rate_limits: Box<[RateRule]>,
    pub challenge: Option<Challenge>,
    /// Set visitor and session cookies (off: cookie consent not given for this project).
    pub visitor_cookies: bool,
}

/// Case-insensitive substring search; `needle` is lower case.
pub fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    if needle.len() > hay.len() {
        return false;
    }
    hay.windows(needle.len()).any(|w| {
        w.iter()
            .zip(needle)
            .all(|(a, b)| a.to_ascii_lowercase() == *b)
    })
}

impl Policy {
    /// Whether the IP rules let `ip` through.
    #[inline]
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        if self.deny.contains(ip) {
            return false;
        }
        match self.ip_mode {
            IpMode::DenyList => true,
            IpMode::AllowList => self.allow.contains(ip),
        }
    }

    /// The block rule a request hits, if any: `"blocked_user_agent"` or `"blocked_path"`.
    /// `path` is the normalised path (`normalize_path`).
    pub fn blocked(&self, user_agent: &[u8], path: &[u8]) -> Option<&'static str> {
        if self
            .block_user_agents
            .iter()
            .any(|p| contains_ci(user_agent, p))
        {
            return Some("blocked_user_agent");
        }
        if self.block_paths.iter().any(|p| starts_with_ci(path, p)) {
            return Some("blocked_path");
        }
        None
    }

    /// Whether any rule looks at the request path: only then is the path normalised (and
    /// refused when servers would disagree on it).
    pub fn reads_path(&self) -> bool {
        !self.block_paths.is_empty()
            || self
                .rate_limits
                .iter()
                .any(|r| r.path_prefix.is_some() || r.per_path)
            || self.challenge.is_some()
    }

    /// Whether nothing is enforced: such a policy still replaces its project's for a host
    /// (an exemption), so stores keep it; tests and tools use this to say so.
    pub fn is_noop(&self) -> bool {
        self.ip_mode == IpMode::DenyList
            && self.deny.is_empty()
            && self.block_user_agents.is_empty()
            && self.block_paths.is_empty()
            && self.rate_limits.is_empty()
            && self.challenge.is_none()
            && !self.visitor_cookies
    }
}

/// Longest path the policy phase normalises (the request line limit, 8 KiB, bounds real
/// ones); a longer one that needs normalising is refused (414).
pub const POLICY_PATH_BYTES_MAX: usize = 8192;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte `%XY` at `path[i..]` encodes, if it is a well-formed escape.
fn escape_at(path: &[u8], i: usize) -> Option<u8> {
    if path.get(i) != Some(&b'%') {
        return None;
    }
    let h = hex_val(*path.get(i + 1)?)?;
    let l = hex_val(*path.get(i + 2)?)?;
    Some(h << 4 | l)
}

/// Why a path is refused instead of matched: servers disagree on what it is, so no single
/// spelling can be checked against the rules (`docs/policy.md` has the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Longer than [`POLICY_PATH_BYTES_MAX`] and in need of normalising.
    TooLong,
    /// A `%` not followed by two hex digits (nginx refuses these with 400; IIS once read
    /// `%uXXXX`).
    BadEscape,
    /// `%00`: C-based servers end the path there.
    Nul,
    /// `%25` followed by two hex digits, once decoded (`%252e`, `%2577`, `%252%65`): an app
    /// that decodes twice sees another path than every rule (`/%2577p-admin` is `/wp-admin`).
    DoubleEncoded,
    /// An overlong UTF-8 encoding (`%c0%af` for `/`): old IIS and some decoders take it for
    /// the ASCII character.
    Overlong,
    /// A `.` or `..` segment with `;` parameters (`/..;/`): Tomcat and Spring take it for a
    /// dot segment and climb, nginx takes it for a name.
    DotSegmentParams,
}

impl PathError {
    /// For logs.
    pub fn reason(self) -> &'static str {
        match self {
            PathError::TooLong => "path_too_long",
            PathError::BadEscape => "ambiguous_path_escape",
            PathError::Nul => "ambiguous_path_nul",
            PathError::DoubleEncoded => "ambiguous_path_double_encoding",
            PathError::Overlong => "ambiguous_path_overlong_utf8",
            PathError::DotSegmentParams => "ambiguous_path_dot_params",
        }
    }
}

/// Whether `normalize_path` would change (or refuse) anything: most paths hold none of these
/// bytes, and the caller skips the buffer.
#[inline]
pub fn path_needs_normalizing(path: &[u8]) -> bool {
    path.iter().any(|&b| matches!(b, b'%' | b'\\' | b';'))
        || path.windows(2).any(|w| w == b"//" || w == b"/.")
}

/// What one input position is, for the normaliser.
enum Token {
    /// A path byte (already decoded where decoding is safe).
    Byte(u8),
    /// An escape kept as it came (a reserved or non-ASCII byte): three bytes of output.
    Kept,
    /// A segment separator: `/`, and what servers take for one (`\`, `%2F`, `%5C`).
    Slash,
    /// `;`: path parameters follow, up to the next separator.
    Params,
}

/// Reads the token at `path[i..]`; returns it and its length in the input.
fn token_at(path: &[u8], i: usize) -> Result<(Token, usize), PathError> {
    match path[i] {
        b'/' | b'\\' => Ok((Token::Slash, 1)),
        b';' => Ok((Token::Params, 1)),
        b'%' => {
            let v = escape_at(path, i).ok_or(PathError::BadEscape)?;
            let next = escape_at(path, i + 3);
            match v {
                0 => Err(PathError::Nul),
                b'/' | b'\\' => Ok((Token::Slash, 3)),
                0xc0 | 0xc1 => Err(PathError::Overlong),
                0xe0 if next.is_some_and(|b| (0x80..0xa0).contains(&b)) => Err(PathError::Overlong),
                0xf0 if next.is_some_and(|b| (0x80..0x90).contains(&b)) => Err(PathError::Overlong),
                v if unreserved(v) => Ok((Token::Byte(v), 3)),
                _ => Ok((Token::Kept, 3)),
            }
        }
        b => Ok((Token::Byte(b), 1)),
    }
}

/// The path as the upstream servers in use would resolve it, for the policy's prefix rules
/// (block paths, rate-limit prefixes, challenge paths and exemptions), so that no spelling of
/// `/wp-admin` that a mainstream server routes to `/wp-admin` slips past a rule for it:
/// - percent-encoded unreserved characters decoded (RFC 3986 §6.2.2.2: `/%77p-admin`);
/// - `%2F`, `%5C` and `\` taken as `/` (nginx decodes `%2F` before resolving dot segments,
///   IIS takes `\` for `/`): `/a%2F..%2Fwp-admin` is `/wp-admin`;
/// - `;` path parameters dropped from each segment (Tomcat, Spring): `/wp-admin;x=1/`;
/// - `//` collapsed, `.` and `..` segments removed, never above the root (§5.2.4).
///
/// Other reserved or non-ASCII escapes stay encoded. Spellings on which servers disagree are
/// refused ([`PathError`]). Returns `path` itself when there is nothing to do. The forwarded
/// request keeps the path as the client sent it.
pub fn normalize_path<'a>(
    path: &'a [u8],
    buf: &'a mut [u8; POLICY_PATH_BYTES_MAX],
) -> Result<&'a [u8], PathError> {
    // Only origin-form paths are resolved; the one other target a request can have is
    // `OPTIONS *`.
    if path.first() != Some(&b'/') || !path_needs_normalizing(path) {
        return Ok(path);
    }
    if path.len() > buf.len() {
        return Err(PathError::TooLong);
    }
    // Output never outgrows the input: decoding shrinks, removals shrink, `\` stays 1 byte.
    let mut o = 0usize;
    // Start of the segment being written (just after its slash).
    let mut seg = 0usize;
    let mut i = 0usize;
    // Inside `;` parameters: input is skipped up to the next separator.
    let mut params = false;
    while i < path.len() {
        let (t, step) = token_at(path, i)?;
        match t {
            Token::Slash => {
                params = false;
                close_segment(buf, &mut o, seg);
                if o == 0 || buf[o - 1] != b'/' {
                    buf[o] = b'/';
                    o += 1;
                }
                seg = o;
            }
            _ if params => {}
            Token::Params => {
                if matches!(&buf[seg..o], b"." | b"..") {
                    return Err(PathError::DotSegmentParams);
                }
                params = true;
            }
            Token::Byte(b) => {
                buf[o] = b;
                o += 1;
            }
            Token::Kept => {
                buf[o..o + 3].copy_from_slice(&path[i..i + 3]);
                o += 3;
            }
        }
        i += step;
    }
    close_segment(buf, &mut o, seg);
    if o == 0 {
        buf[0] = b'/';
        o = 1;
    }
    debug_assert!(o <= path.len().max(1));
    let out = &buf[..o];
    // Checked on the result: `%25` stays encoded and hex digits are decoded, so every way of
    // spelling a second escape (`%252e`, `%252%65`) shows here as `%25` and two hex digits.
    if out
        .windows(5)
        .any(|w| w[..3] == *b"%25" && hex_val(w[3]).is_some() && hex_val(w[4]).is_some())
    {
        return Err(PathError::DoubleEncoded);
    }
    Ok(out)
}

/// Closes the segment `buf[seg..o]`: drops `.`, and `..` with the segment before it.
fn close_segment(buf: &[u8; POLICY_PATH_BYTES_MAX], o: &mut usize, seg: usize) {
    let s = &buf[seg..*o];
    if s == b"." {
        *o = seg;
    } else if s == b".." {
        *o = seg;
        if *o >= 2 {
            // Back over the slash ending the previous segment, then to its start.
            let prev = buf[..*o - 1]
                .iter()
                .rposition(|&b| b == b'/')
                .map_or(0, |p| p + 1);
            *o = prev.max(1);
        }
    }
}

/// Whether `hay` starts with `prefix` ignoring ASCII case; `prefix` is lower case.
#[inline]
pub fn starts_with_ci(hay: &[u8], prefix: &[u8]) -> bool {
    hay.len() >= prefix.len()
        && hay
            .iter()
            .zip(prefix)
            .all(|(a, b)| a.to_ascii_lowercase() == *b)
}

type Map<K> = papaya::HashMap<K, Arc<Policy>, RandomState>;

/// Policies the workers read: by exact host (a domain's own policy), then by project.
#[derive(Debug)]
pub struct PolicyTable {
    by_host: Map<Box<str>>,
    by_project: Map<i64>,
    version: AtomicU64,
}

impl Default for PolicyTable {
    fn default() -> Self {
        Self::new()
    }
}

/// A complete set of policies from a store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySet {
    pub by_host: std::collections::HashMap<String, Arc<Policy>>,
    pub by_project: std::collections::HashMap<i64, Arc<Policy>>,
}

impl PolicyTable {
    pub fn new() -> Self {
        Self {
            by_host: Map::with_hasher(RandomState::default()),
            by_project: Map::with_hasher(RandomState::default()),
            version: AtomicU64::new(0),
        }
    }

    /// The policy for a request to `host` routed to `project`: the host's own, else the
    /// project's. Calls `f` under the epoch pin (no clone of the Arc on the hot path).
    #[inline]
    pub fn with_policy<R>(
        &self,
        host: &str,
        project: i64,
        f: impl FnOnce(&Policy) -> R,
    ) -> Option<R> {
        if !self.by_host.is_empty()
            && let Some(p) = self.by_host.pin().get(host)
        {
            return Some(f(p));
        }
        if self.by_project.is_empty() {
            return None;
        }
        self.by_project.pin().get(&project).map(|p| f(p))
    }

    /// Makes the table hold exactly `set`.
    pub fn apply(&self, set: &PolicySet) {
        let h = self.by_host.pin();
        for (k, v) in &set.by_host {
            if h.get(k.as_str()).is_none_or(|old| !Arc::ptr_eq(old, v)) {
                h.insert(k.as_str().into(), v.clone());
            }
        }
        let stale: Vec<Box<str>> = h
            .keys()
            .filter(|k| !set.by_host.contains_key(k.as_ref()))
            .cloned()
            .collect();
        for k in stale {
            h.remove(&k);
        }
        let p = self.by_project.pin();
        for (k, v) in &set.by_project {
            if p.get(k).is_none_or(|old| !Arc::ptr_eq(old, v)) {
                p.insert(*k, v.clone());
            }
        }
        let stale: Vec<i64> = p
            .keys()
            .filter(|k| !set.by_project.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            p.remove(&k);
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn upsert_project(&self, project: i64, p: Option<Arc<Policy>>) {
        match p {
            Some(p) => self.by_project.pin().insert(project, p),
            None => self.by_project.pin().remove(&project),
        };
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn upsert_host(&self, host: &str, p: Option<Arc<Policy>>) {
        match p {
            Some(p) => self.by_host.pin().insert(host.into(), p),
            None => self.by_host.pin().remove(host),
        };
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.by_host.len() + self.by_project.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// Rate limits shared by every worker: one GCRA state (a single `AtomicU64`, the theoretical
/// arrival time in microseconds) per key, updated with compare-and-swap. No lock: two workers
/// limiting the same client contend only on that client's word, so the limit holds exactly
/// across cores.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: papaya::HashMap<u64, AtomicU64, RandomState>,
    keys_max: usize,
    epoch: std::time::Instant,
    /// Requests let through because the key table was full (fail open, counted).
    pub overflows: AtomicU64,
}

/// Outcome of a rate check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allow,
    /// Over the limit: retry after this many microseconds.
    Limit {
        retry_after_us: u64,
    },
}

/// Rate-limit keys kept at most by default (about 100 bytes each).
pub const RATE_KEYS_MAX: usize = 1_000_000;

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new(RATE_KEYS_MAX)
    }
}

impl RateLimiter {
    pub fn new(keys_max: usize) -> Self {
        Self {
            buckets: papaya::HashMap::with_hasher(RandomState::default()),
            keys_max,
            epoch: std::time::Instant::now(),
            overflows: AtomicU64::new(0),
        }
    }

    /// Microseconds since the limiter started.
    #[inline]
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// One request for `key` under `rps` with `burst`, at `now_us`.
    pub fn check(&self, key: u64, rps: u32, burst: u32, now_us: u64) -> RateDecision {
        if rps == 0 {
            return RateDecision::Limit {
                retry_after_us: 1_000_000,
            };
        }
        let interval = 1_000_000 / u64::from(rps).max(1);
        // Tolerance: `burst` requests beyond the sustained rate.
        let tolerance = interval * u64::from(burst);
        let m = self.buckets.pin();
        let cell = match m.get(&key) {
            Some(c) => c,
            None => {
                if m.len() >= self.keys_max {
                    self.overflows.fetch_add(1, Ordering::Relaxed);
                    return RateDecision::Allow;
                }
                m.get_or_insert_with(key, || AtomicU64::new(0))
            }
        };
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now_us);
            if start - now_us > tolerance {
                return RateDecision::Limit {
                    retry_after_us: start - now_us - tolerance,
                };
            }
            match cell.compare_exchange_weak(
                tat,
                start + interval,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return RateDecision::Allow,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Forgets keys idle long enough that their state no longer matters (the control plane
    /// calls this now and then); returns how many remain.
    pub fn sweep(&self, idle_us: u64) -> usize {
        let now = self.now_us();
        let m = self.buckets.pin();
        m.retain(|_, v| v.load(Ordering::Relaxed) + idle_us > now);
        m.len()
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes of the request path a per-path rate key covers: longer paths share the key of their
/// first `RATE_KEY_PATH_BYTES_MAX` bytes.
pub const RATE_KEY_PATH_BYTES_MAX: usize = 256;

/// The rate-limit key of a client under a rule (and, for per-path rules, the request path).
/// An IPv6 client is its /64: one subscriber usually holds a whole /64, and keying by the full
/// address would let it spread over 2^64 keys.
#[inline]
pub fn rate_key(rule: u32, project: i64, ip: IpAddr, path: Option<&[u8]>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A fixed seed: every worker must compute the same key.
    let mut h = foldhash::fast::FixedState::with_seed(0x7269_6e67).build_hasher();
    h.write_u32(rule);
    h.write_i64(project);
    match canonical(ip) {
        IpAddr::V4(a) => h.write_u32(u32::from(a)),
        IpAddr::V6(a) => h.write_u64((u128::from(a) >> 64) as u64),
    }
    if let Some(p) = path {
        // Case folded, as the prefixes match: `/API/a` and `/api/a` share a budget.
        let mut folded = [0u8; RATE_KEY_PATH_BYTES_MAX];
        let n = p.len().min(RATE_KEY_PATH_BYTES_MAX);
        for (d, s) in folded[..n].iter_mut().zip(p) {
            *d = s.to_ascii_lowercase();
        }
        h.write(&folded[..n]);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(c: &[&str]) -> IpSet {
        IpSet::from_cidrs(&c.iter().map(|s| s.parse().unwrap()).collect::<Vec<Cidr>>())
    }

    #[test]
    fn ip_sets_merge_and_match_v4_v6_and_mapped() {
        let s = set(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.168.1.7",
            "192.168.1.8/31",
            "2001:db8::/32",
            "::1",
        ]);
        // 10/8 swallows 10.1/16; .7 and .8/31 are adjacent: one range.
        assert_eq!(s.ranges(), 4);
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "192.168.1.7",
            "192.168.1.9",
            "2001:db8:ffff::1",
            "::1",
            "::ffff:10.2.3.4",
        ] {
            assert!(s.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.168.1.6",
            "192.168.1.10",
            "2001:db9::",
            "::2",
            "0.0.0.0",
        ] {
            assert!(!s.contains(no.parse().unwrap()), "{no}");
        }
        assert!(set(&["0.0.0.0/0"]).contains("255.255.255.255".parse().unwrap()));
        assert!(set(&["::/0"]).contains("ffff::".parse().unwrap()));
        assert!(!set(&[]).contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn allow_list_and_deny_list() {
        let mut p = Policy {
            deny: set(&["10.0.0.5"]),
            ..Policy::default()
        };
        assert!(p.ip_allowed("1.2.3.4".parse().unwrap()));
        assert!(!p.ip_allowed("10.0.0.5".parse().unwrap()));
        p.ip_mode = IpMode::AllowList;
        p.allow = set(&["10.0.0.0/24"]);
        assert!(!p.ip_allowed("1.2.3.4".parse().unwrap()));
        assert!(p.ip_allowed("10.0.0.6".parse().unwrap()));
        assert!(
            !p.ip_allowed("10.0.0.5".parse().unwrap()),
            "deny wins inside the allow list"
        );
    }

    #[test]
    fn block_rules_are_case_insensitive_substrings_and_prefixes() {
        let p = Policy {
            block_user_agents: vec![b"badbot".to_vec().into_boxed_slice()].into(),
            block_paths: vec![b"/wp-admin".to_vec().into_boxed_slice()].into(),
            ..Policy::default()
        };
        assert_eq!(
            p.blocked(b"Mozilla BadBot/2.0", b"/"),
            Some("blocked_user_agent")
        );
        assert_eq!(
            p.blocked(b"Mozilla", b"/wp-admin/x.php"),
            Some("blocked_path")
        );
        assert_eq!(p.blocked(b"Mozilla", b"/blog"), None);
    }

    #[test]
    fn gcra_allows_burst_then_the_rate() {
        let l = RateLimiter::new(100);
        let k = rate_key(1, 7, "1.2.3.4".parse().unwrap(), None);
        let mut t = 1_000_000u64;
        // 10 rps, burst 5: 6 at once (one for the rate, five for the burst), then refused.
        let allowed = (0..20)
            .filter(|_| l.check(k, 10, 5, t) == RateDecision::Allow)
            .count();
        assert_eq!(allowed, 6);
        match l.check(k, 10, 5, t) {
            RateDecision::Limit { retry_after_us } => {
                assert!(retry_after_us > 0 && retry_after_us <= 100_000)
            }
            RateDecision::Allow => panic!("over the limit"),
        }
        // Over ten seconds at 50 attempts/s, about 10/s pass.
        let mut passed = 0;
        for _ in 0..500 {
            t += 20_000;
            passed += usize::from(l.check(k, 10, 5, t) == RateDecision::Allow);
        }
        assert!((99..=106).contains(&passed), "{passed}");
        // Another client is not affected.
        let k2 = rate_key(1, 7, "1.2.3.5".parse().unwrap(), None);
        assert_eq!(l.check(k2, 10, 5, t), RateDecision::Allow);
        assert_ne!(k, rate_key(2, 7, "1.2.3.4".parse().unwrap(), None));
        // IPv6: one key per /64; per-path rules: one per path.
        let v6 = |s: &str| rate_key(1, 7, s.parse().unwrap(), None);
        assert_eq!(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff::9"));
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        let ip = "1.2.3.4".parse().unwrap();
        assert_ne!(
            rate_key(1, 7, ip, Some(b"/api/a")),
            rate_key(1, 7, ip, Some(b"/api/b"))
        );
        assert_eq!(
            rate_key(1, 7, ip, Some(b"/API/a")),
            rate_key(1, 7, ip, Some(b"/api/A"))
        );
        assert_eq!(
            rate_key(1, 7, ip, Some(&[b'a'; 300])),
            rate_key(1, 7, ip, Some(&[b'a'; 400])),
            "long paths share their first {RATE_KEY_PATH_BYTES_MAX} bytes"
        );
    }

    #[test]
    fn gcra_holds_across_threads() {
        let l = Arc::new(RateLimiter::new(100));
        let k = rate_key(1, 1, "1.2.3.4".parse().unwrap(), None);
        let t = 5_000_000;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| l.check(k, 100, 10, t) == RateDecision::Allow)
                        .count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(
            total, 11,
            "the same instant: exactly 1 + burst pass, whichever thread"
        );
    }

    #[test]
    fn full_key_table_fails_open_and_sweep_forgets_idle_keys() {
        let l = RateLimiter::new(2);
        for i in 0..2u64 {
            l.check(i, 1000, 0, l.now_us());
        }
        assert_eq!(l.check(99, 1000, 0, l.now_us()), RateDecision::Allow);
        assert_eq!(l.overflows.load(Ordering::Relaxed), 1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(l.sweep(0), 0);
    }

    #[test]
    fn paths_are_normalised_as_an_upstream_would() {
        let n = |p: &str| {
            let mut buf = [0u8; POLICY_PATH_BYTES_MAX];
            normalize_path(p.as_bytes(), &mut buf).map(|p| String::from_utf8(p.to_vec()).unwrap())
        };
        for (raw, want) in [
            ("/wp-admin/x", "/wp-admin/x"),
            ("//wp-admin", "/wp-admin"),
            ("/%77p-admin", "/wp-admin"),
            ("/%2e%2E/wp-admin", "/wp-admin"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../x", "/x"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/api/..//shop", "/shop"),
            ("/...", "/..."),
            ("/.well-known/x", "/.well-known/x"),
            // nginx: %2F decoded before dot segments and slash merging.
            ("/a%2Fb", "/a/b"),
            ("/a%2F..%2Fwp-admin", "/wp-admin"),
            ("/x%2f%2e%2e%2fwp-admin", "/wp-admin"),
            // IIS: backslash is a slash, encoded or not.
            ("/x\\..\\wp-admin", "/wp-admin"),
            ("/x%5C..%5Cwp-admin", "/wp-admin"),
            // Tomcat, Spring: ;parameters dropped from every segment.
            ("/wp-admin;jsessionid=1/x", "/wp-admin/x"),
            ("/;x/wp-admin", "/wp-admin"),
            ("/a;b/../wp-admin", "/wp-admin"),
            // Reserved and non-ASCII escapes stay encoded.
            ("/a%3Bb", "/a%3Bb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%25", "/%25"),
            ("/100%25off", "/100%25off"),
        ] {
            assert_eq!(n(raw), Ok(want.to_string()), "{raw}");
        }
        for (raw, why) in [
            ("/100%", PathError::BadEscape),
            ("/%zz", PathError::BadEscape),
            ("/%u0077p-admin", PathError::BadEscape),
            ("/wp-admin%00.png", PathError::Nul),
            ("/x/%252e%252e/wp-admin", PathError::DoubleEncoded),
            ("/x%252Fwp-admin", PathError::DoubleEncoded),
            ("/%2577p-admin", PathError::DoubleEncoded),
            ("/x/%252%65%252%65/wp-admin", PathError::DoubleEncoded),
            ("/100%2541", PathError::DoubleEncoded),
            ("/x/%c0%ae%c0%ae/wp-admin", PathError::Overlong),
            ("/x%c0%afwp-admin", PathError::Overlong),
            ("/x%e0%80%afwp-admin", PathError::Overlong),
            ("/public/..;/wp-admin", PathError::DotSegmentParams),
            ("/public/.;x/a", PathError::DotSegmentParams),
            ("/public/%2e%2e;/wp-admin", PathError::DotSegmentParams),
        ] {
            assert_eq!(n(raw), Err(why), "{raw}");
        }
        let long = format!("/{}%2e", "a".repeat(POLICY_PATH_BYTES_MAX));
        assert_eq!(n(&long), Err(PathError::TooLong));
        assert_eq!(
            n(&"a".repeat(POLICY_PATH_BYTES_MAX * 2)).map(|p| p.len()),
            Ok(POLICY_PATH_BYTES_MAX * 2)
        );
        let p = Policy {
            block_paths: vec![b"/wp-admin".to_vec().into_boxed_slice()].into(),
            ..Policy::default()
        };
        let mut buf = [0u8; POLICY_PATH_BYTES_MAX];
        for raw in [
            "/WP-Admin/",
            "//wp-admin",
            "/x/../%77p-admin",
            "/x%2F..%2Fwp-admin",
            "/x\\..\\WP-ADMIN",
            "/;a=b/wp-admin;c=d",
        ] {
            let path = normalize_path(raw.as_bytes(), &mut buf).unwrap();
            assert_eq!(p.blocked(b"", path), Some("blocked_path"), "{raw}");
        }
        assert_eq!(p.blocked(b"", b"/wp-login"), None);
    }
}
