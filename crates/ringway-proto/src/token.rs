//! Header names and list values the proxy reasons about.

/// Case-insensitive ASCII comparison of a header name or token.
#[inline]
pub fn eq_ic(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Names that are hop-by-hop (RFC 9110 §7.6.1) or that the proxy re-frames itself, so they are
/// never copied from one side to the other.
#[inline]
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // Dispatch on length first: this runs for every header of every message.
    match name.len() {
        2 => eq_ic(name, b"te"),
        7 => eq_ic(name, b"upgrade") || eq_ic(name, b"trailer"),
        10 => eq_ic(name, b"connection") || eq_ic(name, b"keep-alive"),
        14 => eq_ic(name, b"content-length"),
        16 => eq_ic(name, b"proxy-connection"),
        17 => eq_ic(name, b"transfer-encoding"),
        _ => false,
    }
}

/// tchar (RFC 9110 §5.6.2).
#[inline]
pub fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`'
        | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// Whether `s` is a non-empty token.
#[inline]
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Iterates over the elements of a comma-separated list value, trimming optional whitespace and
/// skipping empty elements (RFC 9110 §5.6.1).
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').filter_map(|item| {
        let item = item.trim_ascii();
        (!item.is_empty()).then_some(item)
    })
}

/// Parses a Content-Length value: `1*DIGIT`, nothing else (no sign, no list, no space inside).
/// Values above `i64::MAX` are refused: no real body is that large, and downstream arithmetic
/// stays simple.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        // 19 digits hold i64::MAX; more is either overflow or leading zeros nobody sends.
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= i64::MAX as u64).then_some(n)
}

/// Validates a Host value: `uri-host [ ":" port ]` with a reg-name or an IP literal. Returns the
/// host part without the port, or `None` if the value cannot be an authority.
pub fn split_host_port(value: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    if value.is_empty() {
        return Some((value, None));
    }
    let (host, port) = if value[0] == b'[' {
        let close = memchr::memchr(b']', value)?;
        let literal = &value[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        match &value[close + 1..] {
            [] => (&value[..=close], None),
            [b':', port @ ..] => (&value[..=close], Some(port)),
            _ => return None,
        }
    } else {
        match memchr::memrchr(b':', value) {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        }
    };
    if let Some(port) = port {
        // An empty port is allowed by the grammar ("example.com:").
        if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return None;
        }
    }
    if host.first() != Some(&b'[') {
        // reg-name: unreserved / pct-encoded / sub-delims. We refuse '%' too: no real host name
        // uses it and it only helps confuse routing.
        let ok = host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        });
        if !ok {
            return None;
        }
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names() {
        for n in [
            "Connection",
            "keep-alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Connection",
            "content-length",
        ] {
            assert!(is_hop_by_hop(n.as_bytes()), "{n}");
        }
        for n in ["Host", "Content-Type", "X-Forwarded-For", "Tee", "Upgrades"] {
            assert!(!is_hop_by_hop(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"005"), Some(5));
        assert_eq!(
            parse_content_length(b"9223372036854775807"),
            Some(i64::MAX as u64)
        );
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b"5, 6",
            b"5,5",
            b" 5",
            b"5 ",
            b"0x10",
            b"9223372036854775808",
            b"99999999999999999999",
            b"1e3",
        ] {
            assert_eq!(
                parse_content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn list_items_trim_and_skip_empty() {
        let items: Vec<_> = list_items(b" gzip ,, chunked,").collect();
        assert_eq!(items, vec![&b"gzip"[..], b"chunked"]);
    }

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port(b"example.com:8080"),
            Some((&b"example.com"[..], Some(&b"8080"[..])))
        );
        assert_eq!(
            split_host_port(b"example.com"),
            Some((&b"example.com"[..], None))
        );
        assert_eq!(
            split_host_port(b"[::1]:80"),
            Some((&b"[::1]"[..], Some(&b"80"[..])))
        );
        assert_eq!(split_host_port(b"[::1]"), Some((&b"[::1]"[..], None)));
        assert_eq!(split_host_port(b"a/b"), None);
        assert_eq!(split_host_port(b"user@host"), None);
        assert_eq!(split_host_port(b"host:80x"), None);
        assert_eq!(split_host_port(b"[::1]x"), None);
        assert_eq!(split_host_port(b"a b"), None);
    }
}
