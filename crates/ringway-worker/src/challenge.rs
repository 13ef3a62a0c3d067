//! The proof-of-work challenge and its pass cookie, with no state on the node.
//!
//! A challenged client gets a small HTML page holding a nonce: `<time>.<mac>`, the MAC an
//! HMAC-SHA256 over (host, client network, time) under the first challenge key. Its script
//! finds a number `s` such that SHA-256(`nonce:s`) starts with `difficulty` zero bits, then
//! loads `/.ringway/challenge?n=<nonce>&s=<s>&r=<where it was going>`. The worker checks the
//! MAC (any configured key), the nonce's age, and the work, then answers 302 back with a pass
//! cookie: `<expiry>.<key id>.<mac>`, the MAC over (host, client network, expiry). A pass
//! is checked the same way on every request: forged, expired, or presented from another
//! network or host, it fails and the page comes back.

use aws_lc_rs::{digest, hmac};
use ringway_core::policy::CookieBinding;
use std::net::IpAddr;

/// The pass cookie's name.
pub const PASS_COOKIE: &[u8] = b"__ringway_pass";
/// Where the page sends the solution.
pub const VERIFY_PATH: &[u8] = b"/.ringway/challenge";
/// A nonce older than this is refused (the page must be solved in time).
pub const NONCE_TTL_S: u64 = 300;
/// Bytes of each MAC kept in cookies and nonces (128 bits).
const MAC_BYTES: usize = 16;

/// One challenge key and its id: the first 8 hex digits of a MAC of a fixed label, so a pass
/// names the key that signed it without revealing anything about it.
pub struct Key {
    hmac: hmac::Key,
    id: [u8; 8],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "Key({})", String::from_utf8_lossy(&self.id))
    }
}

impl Key {
    fn new(secret: &[u8]) -> Key {
        let hmac = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&hmac, b"ringway challenge key id");
        let mut id = [0u8; 8];
        ringway_proto::write::hex_into(&tag.as_ref()[..4], &mut id);
        Key { hmac, id }
    }
}

/// The challenge keys: the first signs, all verify. Passes carry the signing key's id, so
/// putting a new key first (rotation) keeps every pass signed by a key still listed valid.
#[derive(Clone)]
pub struct Keys(pub std::sync::Arc<[Key]>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({})", self.0.len())
    }
}

impl Keys {
    /// Keys from configured secrets; with none, one random key (per process).
    pub fn new(secrets: &[String]) -> Keys {
        let keys: Vec<Key> = if secrets.is_empty() {
            let mut k = [0u8; 32];
            // A failure here leaves a zero key: still a key, but say so.
            if aws_lc_rs::rand::fill(&mut k).is_err() {
                tracing::error!("no randomness for the challenge key");
            }
            vec![Key::new(&k)]
        } else {
            secrets.iter().map(|s| Key::new(s.as_bytes())).collect()
        };
        Keys(keys.into())
    }
}

/// The part of the address a pass is bound to, as bytes.
fn network(ip: IpAddr, binding: CookieBinding) -> [u8; 17] {
    let network = binding == CookieBinding::Network;
    // Family, then the bytes kept: the /24 or /64 for a network binding, else all of them.
    let (family, octets, kept) = match ringway_core::cidr::canonical(ip) {
        IpAddr::V4(a) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&a.octets());
            (4, o, if network { 3 } else { 4 })
        }
        IpAddr::V6(a) => (6, a.octets(), if network { 8 } else { 16 }),
    };
    let mut out = [0u8; 17];
    out[0] = family;
    out[1..1 + kept].copy_from_slice(&octets[..kept]);
    out
}

fn mac(key: &hmac::Key, kind: &[u8], host: &[u8], net: &[u8; 17], time: u64) -> [u8; MAC_BYTES] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(kind);
    ctx.update(&(host.len() as u32).to_be_bytes());
    ctx.update(host);
    ctx.update(net);
    ctx.update(&time.to_be_bytes());
    let tag = ctx.sign();
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&tag.as_ref()[..MAC_BYTES]);
    out
}

fn push_hex(out: &mut Vec<u8>, b: &[u8]) {
    let at = out.len();
    out.resize(at + 2 * b.len(), 0);
    ringway_proto::write::hex_into(b, &mut out[at..]);
}

fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        out[i] = d(pair[0])? << 4 | d(pair[1])?;
    }
    Some(out)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
    })
}

/// Constant-time comparison of MACs.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a pass cookie value is valid for this host and client now.
pub fn pass_valid(
    value: &[u8],
    keys: &Keys,
    host: &[u8],
    ip: IpAddr,
    binding: CookieBinding,
    now: u64,
) -> bool {
    let mut parts = value.split(|&b| b == b'.');
    let (Some(exp), Some(idx), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Some(exp), Some(tag)) = (parse_u64(exp), parse_hex::<MAC_BYTES>(tag)) else {
        return false;
    };
    if exp <= now {
        return false;
    }
    // A key no longer listed (rotated out) makes its passes invalid.
    let Some(key) = keys.0.iter().find(|k| k.id[..] == *idx) else {
        return false;
    };
    same(
        &mac(&key.hmac, b"pass", host, &network(ip, binding), exp),
        &tag,
    )
}

/// Appends a pass cookie value valid for `ttl_s`.
pub fn issue_pass(
    out: &mut Vec<u8>,
    keys: &Keys,
    host: &[u8],
    ip: IpAddr,
    binding: CookieBinding,
    now: u64,
    ttl_s: u32,
) {
    let exp = now + u64::from(ttl_s);
    let key = &keys.0[0];
    ringway_proto::write::push_u64(out, exp);
    out.push(b'.');
    out.extend_from_slice(&key.id);
    out.push(b'.');
    push_hex(
        out,
        &mac(&key.hmac, b"pass", host, &network(ip, binding), exp),
    );
}

/// Appends a nonce for this host and client.
pub fn nonce(
    out: &mut Vec<u8>,
    keys: &Keys,
    host: &[u8],
    ip: IpAddr,
    binding: CookieBinding,
    now: u64,
) {
    ringway_proto::write::push_u64(out, now);
    out.push(b'.');
    push_hex(
        out,
        &mac(&keys.0[0].hmac, b"nonce", host, &network(ip, binding), now),
    );
}

/// Leading zero bits of a digest.
fn leading_zero_bits(d: &[u8]) -> u32 {
    let mut n = 0;
    for &b in d {
        if b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

/// Why a solution was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    /// Not made by a key of ours for this host and network.
    Forged,
    Expired,
    /// The hash does not have enough zero bits.
    NotSolved,
}

/// Checks a solution: the nonce (ours, for this host and network, recent) and the work.
#[allow(clippy::too_many_arguments)]
pub fn verify_solution(
    nonce: &[u8],
    solution: &[u8],
    keys: &Keys,
    host: &[u8],
    ip: IpAddr,
    binding: CookieBinding,
    difficulty_bits: u8,
    now: u64,
) -> Result<(), Refused> {
    let (t, tag) = match nonce.iter().position(|&b| b == b'.') {
        Some(i) => (&nonce[..i], &nonce[i + 1..]),
        None => return Err(Refused::Malformed),
    };
    let (Some(t), Some(tag)) = (parse_u64(t), parse_hex::<MAC_BYTES>(tag)) else {
        return Err(Refused::Malformed);
    };
    if parse_u64(solution).is_none() {
        return Err(Refused::Malformed);
    }
    let net = network(ip, binding);
    if !keys
        .0
        .iter()
        .any(|k| same(&mac(&k.hmac, b"nonce", host, &net, t), &tag))
    {
        return Err(Refused::Forged);
    }
    if t + NONCE_TTL_S < now || t > now + 60 {
        return Err(Refused::Expired);
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(nonce);
    ctx.update(b":");
    ctx.update(solution);
    if leading_zero_bits(ctx.finish().as_ref()) < u32::from(difficulty_bits) {
        return Err(Refused::NotSolved);
    }
    Ok(())
}

/// The challenge page: it solves the work in the browser and comes back. `ret` is where the
/// client was going (path and query).
pub fn page(out: &mut Vec<u8>, nonce: &[u8], difficulty_bits: u8, ret: &[u8]) {
    out.extend_from_slice(
        b"<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"robots\" content=\"noindex\">\
<title>Checking your browser</title></head><body style=\"font-family:sans-serif;text-align:center;margin-top:20vh\">\
<p>Checking your browser before you reach the site&hellip;</p>\
<noscript><p>This check needs JavaScript.</p></noscript><script>\n(async function(){const n=\"",
    );
    out.extend_from_slice(nonce);
    out.extend_from_slice(b"\",d=");
    ringway_proto::write::push_u64(out, u64::from(difficulty_bits));
    out.extend_from_slice(b",r=\"");
    // The return path goes into a JS string: keep only URL-safe bytes, escape the rest.
    for &c in ret {
        if c.is_ascii_alphanumeric() || b"/-._~?&=%+,;:@!$*()".contains(&c) {
            out.push(c);
        } else {
            out.extend_from_slice(b"%");
            push_hex(out, &[c]);
        }
    }
    out.extend_from_slice(
        b"\";\nif(!(self.crypto&&crypto.subtle)){document.body.innerHTML='<p>This check needs a secure connection (HTTPS).</p>';return}\
const e=new TextEncoder();\
function z(h){let k=0;for(const b of h){if(b===0){k+=8;continue}return k+Math.clz32(b)-24}return k}\
for(let s=0;;s++){const h=new Uint8Array(await crypto.subtle.digest(\"SHA-256\",e.encode(n+\":\"+s)));\
if(z(h)>=d){location.replace(\"/.ringway/challenge?n=\"+encodeURIComponent(n)+\"&s=\"+s+\"&r=\"+encodeURIComponent(r));return}}\
})();\n</script></body></html>\n",
    );
}

/// A query parameter's raw value.
pub fn query_param<'a>(query: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    query.split(|&b| b == b'&').find_map(|kv| {
        let (k, v) = match kv.iter().position(|&b| b == b'=') {
            Some(i) => (&kv[..i], &kv[i + 1..]),
            None => (kv, &kv[kv.len()..]),
        };
        (k == name).then_some(v)
    })
}

/// Percent-decodes into `out`; None on bad escapes.
pub fn percent_decode(s: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let h: [u8; 1] = parse_hex(s.get(i + 1..i + 3)?)?;
                out.push(h[0]);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(())
}

/// Whether a return target is a local path (never another site: no scheme, no `//`, no
/// backslash tricks, no control bytes).
pub fn safe_return(r: &[u8]) -> bool {
    r.first() == Some(&b'/')
        && r.get(1) != Some(&b'/')
        && r.get(1) != Some(&b'\\')
        && r.iter().all(|&c| (0x21..0x7f).contains(&c) && c != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&["k".repeat(32), "old-key-old-key-old-key-old-key-!".into()])
    }

    fn solve(nonce: &[u8], bits: u8) -> u64 {
        (0u64..)
            .find(|s| {
                let mut ctx = digest::Context::new(&digest::SHA256);
                ctx.update(nonce);
                ctx.update(b":");
                ctx.update(s.to_string().as_bytes());
                leading_zero_bits(ctx.finish().as_ref()) >= u32::from(bits)
            })
            .unwrap()
    }

    #[test]
    fn pass_cookies_bind_host_network_and_time() {
        let k = keys();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let mut v = Vec::new();
        issue_pass(&mut v, &k, b"a.test", ip, CookieBinding::Network, 1000, 60);
        assert!(pass_valid(
            &v,
            &k,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000
        ));
        // Same /24: fine; another network, host, or after expiry: not.
        assert!(pass_valid(
            &v,
            &k,
            b"a.test",
            "203.0.113.99".parse().unwrap(),
            CookieBinding::Network,
            1000
        ));
        assert!(!pass_valid(
            &v,
            &k,
            b"a.test",
            "198.51.100.7".parse().unwrap(),
            CookieBinding::Network,
            1000
        ));
        assert!(!pass_valid(
            &v,
            &k,
            b"b.test",
            ip,
            CookieBinding::Network,
            1000
        ));
        assert!(!pass_valid(
            &v,
            &k,
            b"a.test",
            ip,
            CookieBinding::Network,
            1060
        ));
        // Exact binding: the /24 no longer does.
        let mut e = Vec::new();
        issue_pass(&mut e, &k, b"a.test", ip, CookieBinding::Address, 1000, 60);
        assert!(!pass_valid(
            &e,
            &k,
            b"a.test",
            "203.0.113.99".parse().unwrap(),
            CookieBinding::Address,
            1000
        ));
        // Tampering with the expiry breaks the MAC.
        let forged = String::from_utf8(v.clone())
            .unwrap()
            .replacen("1060", "9999", 1);
        assert!(!pass_valid(
            forged.as_bytes(),
            &k,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000
        ));
        assert!(!pass_valid(
            b"garbage",
            &k,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000
        ));
        // Rotation: a new key put first signs new passes; the old one still verifies its own.
        let rotated = Keys::new(&["n".repeat(32), "k".repeat(32)]);
        assert!(pass_valid(
            &v,
            &rotated,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000
        ));
        let mut fresh = Vec::new();
        issue_pass(
            &mut fresh,
            &rotated,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000,
            60,
        );
        assert!(
            !pass_valid(&fresh, &k, b"a.test", ip, CookieBinding::Network, 1000),
            "signed by a key the old list does not hold"
        );
        // Rotated out: the old key's passes end.
        let retired = Keys::new(&["n".repeat(32)]);
        assert!(!pass_valid(
            &v,
            &retired,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000
        ));
        // Another node with other keys does not accept it.
        let other = Keys::new(&["z".repeat(32)]);
        assert!(!pass_valid(
            &v,
            &other,
            b"a.test",
            ip,
            CookieBinding::Network,
            1000
        ));
    }

    #[test]
    fn solutions_are_checked_for_origin_age_and_work() {
        let k = keys();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let mut n = Vec::new();
        nonce(&mut n, &k, b"a.test", ip, CookieBinding::Network, 5000);
        let s = solve(&n, 12).to_string();
        let ok = |n: &[u8], s: &str, now| {
            verify_solution(
                n,
                s.as_bytes(),
                &k,
                b"a.test",
                ip,
                CookieBinding::Network,
                12,
                now,
            )
        };
        assert_eq!(ok(&n, &s, 5010), Ok(()));
        assert_eq!(ok(&n, &s, 5000 + NONCE_TTL_S + 1), Err(Refused::Expired));
        assert!(ok(&n, "0", 5010).is_err());
        let mut bad = n.clone();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(ok(&bad, &s, 5010), Err(Refused::Forged));
        assert_eq!(ok(b"nonsense", &s, 5010), Err(Refused::Malformed));
    }

    #[test]
    fn return_targets_stay_on_the_site() {
        assert!(safe_return(b"/shop?x=1"));
        for bad in [
            &b"//evil.test/"[..],
            b"https://evil.test",
            b"/\\evil",
            b"",
            b"/a b",
        ] {
            assert!(!safe_return(bad), "{bad:?}");
        }
        let mut out = Vec::new();
        percent_decode(b"%2Fshop%3Fx%3D1", &mut out).unwrap();
        assert_eq!(out, b"/shop?x=1");
        assert_eq!(query_param(b"n=1.ab&s=42&r=%2F", b"s"), Some(&b"42"[..]));
    }
}
