//! Host and path normalisation.

use ringway_core::policy::{
    POLICY_PATH_BYTES_MAX, PathError, normalize_path, path_needs_normalizing,
};
use ringway_core::route::{HOST_BYTES_MAX, normalize_host};

/// Host values: what comes out is a usable, lower-case name that normalises to itself.
pub fn host(data: &[u8]) {
    let mut buf = [0u8; HOST_BYTES_MAX];
    let Some(h) = normalize_host(data, &mut buf) else {
        return;
    };
    let h = h.to_string();
    assert!(!h.is_empty() && h.len() <= HOST_BYTES_MAX);
    assert!(
        !h.starts_with('.') && !h.ends_with('.') && !h.contains(".."),
        "{h:?}"
    );
    assert_eq!(h, h.to_ascii_lowercase());
    assert!(
        !h.contains(':') || h.starts_with('['),
        "a port survived: {h:?}"
    );
    let mut again = [0u8; HOST_BYTES_MAX];
    assert_eq!(
        normalize_host(h.as_bytes(), &mut again),
        Some(h.as_str()),
        "not idempotent"
    );
}

/// Paths: the normaliser agrees with the reference below, its output has no segment any
/// server would resolve further, and normalising it again changes nothing.
pub fn path(data: &[u8]) {
    let mut buf = [0u8; POLICY_PATH_BYTES_MAX];
    let got = normalize_path(data, &mut buf).map(<[u8]>::to_vec);
    if data.first() == Some(&b'/') {
        assert_eq!(
            got,
            reference_normalize_path(data),
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
    let Ok(p) = got else { return };
    assert!(p.len() <= data.len().max(1));
    if data.first() != Some(&b'/') || !path_needs_normalizing(data) {
        assert_eq!(p, data, "left alone");
        return;
    }
    if data.first() == Some(&b'/') {
        assert_eq!(p.first(), Some(&b'/'));
        assert!(
            !p.windows(2).any(|w| w == b"//"),
            "{:?}",
            String::from_utf8_lossy(&p)
        );
        for seg in p.split(|&b| b == b'/') {
            assert!(
                seg != b"." && seg != b"..",
                "{:?}",
                String::from_utf8_lossy(&p)
            );
        }
        assert!(!p.iter().any(|&b| b == b'\\' || b == b';'));
    }
    let mut again = [0u8; POLICY_PATH_BYTES_MAX];
    assert_eq!(
        normalize_path(&p, &mut again).map(<[u8]>::to_vec),
        Ok(p.clone()),
        "not idempotent"
    );
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// What one `%XY` at `i` means, decided apart from the real normaliser.
enum Unit {
    Sep,
    Param,
    Char(u8),
    /// Kept as its three bytes.
    Escape,
}

fn unit(path: &[u8], i: usize) -> Result<(Unit, usize), PathError> {
    let b = path[i];
    if b == b'/' || b == b'\\' {
        return Ok((Unit::Sep, 1));
    }
    if b == b';' {
        return Ok((Unit::Param, 1));
    }
    if b != b'%' {
        return Ok((Unit::Char(b), 1));
    }
    let (Some(h), Some(l)) = (
        path.get(i + 1).copied().and_then(hex),
        path.get(i + 2).copied().and_then(hex),
    ) else {
        return Err(PathError::BadEscape);
    };
    let v = h * 16 + l;
    let following = || -> Option<u8> {
        if path.get(i + 3) != Some(&b'%') {
            return None;
        }
        Some(hex(*path.get(i + 4)?)? * 16 + hex(*path.get(i + 5)?)?)
    };
    match v {
        0 => Err(PathError::Nul),
        b'/' | b'\\' => Ok((Unit::Sep, 3)),
        0xc0 | 0xc1 => Err(PathError::Overlong),
        0xe0 if matches!(following(), Some(0x80..=0x9f)) => Err(PathError::Overlong),
        0xf0 if matches!(following(), Some(0x80..=0x8f)) => Err(PathError::Overlong),
        v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => Ok((Unit::Char(v), 3)),
        _ => Ok((Unit::Escape, 3)),
    }
}

/// The normalisation `docs/policy.md` describes, written as segments and a stack (the real one
/// works in place in one buffer): split at separators, drop `;params`, then resolve `.`, `..`
/// and empty segments.
pub fn reference_normalize_path(path: &[u8]) -> Result<Vec<u8>, PathError> {
    if !path_needs_normalizing(path) {
        return Ok(path.to_vec());
    }
    if path.len() > POLICY_PATH_BYTES_MAX {
        return Err(PathError::TooLong);
    }
    let mut segments: Vec<Vec<u8>> = vec![Vec::new()];
    let mut in_params = false;
    let mut i = 0;
    while i < path.len() {
        let (u, len) = unit(path, i)?;
        let cur = segments.last_mut().expect("never empty");
        match u {
            Unit::Sep => {
                segments.push(Vec::new());
                in_params = false;
            }
            _ if in_params => {}
            Unit::Param => {
                if cur == b"." || cur == b".." {
                    return Err(PathError::DotSegmentParams);
                }
                in_params = true;
            }
            Unit::Char(c) => cur.push(c),
            Unit::Escape => cur.extend_from_slice(&path[i..i + 3]),
        }
        i += len;
    }
    // segments[0] is what came before the first separator ("" for a path starting with /).
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let last = segments.len() - 1;
    let mut trailing = false;
    for (k, s) in segments.into_iter().enumerate().skip(1) {
        let end = k == last;
        match &s[..] {
            b"" | b"." => trailing = end,
            b".." => {
                stack.pop();
                trailing = end;
            }
            _ => {
                stack.push(s);
                trailing = false;
            }
        }
    }
    let mut out = Vec::new();
    for s in &stack {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    // A second escape, whichever way it was spelled: "%25" and two hex digits in the result.
    let is_hex = |b: u8| b.is_ascii_hexdigit();
    for k in 0..out.len().saturating_sub(4) {
        if &out[k..k + 3] == b"%25" && is_hex(out[k + 3]) && is_hex(out[k + 4]) {
            return Err(PathError::DoubleEncoded);
        }
    }
    Ok(out)
}
