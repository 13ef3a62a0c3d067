//! The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer in front of Ringway
//! prepends the client's address to the connection. Only peers in
//! `listen.proxy_protocol_from` may send it (and must); anyone else's connection is served
//! as it is, where a PROXY line is just a malformed request.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// v1 lines are at most 107 bytes (the spec's bound).
pub const V1_BYTES_MAX: usize = 107;
/// Largest v2 header accepted (addresses and TLVs); bigger is refused.
pub const V2_BYTES_MAX: usize = 1024;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's address.
    Proxied(SocketAddr),
    /// A connection of the balancer's own (health checks: v2 LOCAL, v1 UNKNOWN): keep the
    /// peer address.
    Local,
}

/// A header that cannot be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid PROXY protocol header")]
pub struct Invalid;

/// Parses the header at the start of `b`: Ok(None) if more bytes are needed, else the source
/// and the header's length.
pub fn parse(b: &[u8]) -> Result<Option<(Source, usize)>, Invalid> {
    if b.len() < 6 {
        // Enough to tell the versions apart (and a prefix of either signature so far).
        let v1 = b"PROXY ".starts_with(b);
        let v2 = V2_SIGNATURE.starts_with(b);
        return if v1 || v2 { Ok(None) } else { Err(Invalid) };
    }
    if b.starts_with(b"PROXY ") {
        return parse_v1(b);
    }
    if b.len() < 16 {
        return if V2_SIGNATURE.starts_with(&b[..b.len().min(12)]) {
            Ok(None)
        } else {
            Err(Invalid)
        };
    }
    if &b[..12] != V2_SIGNATURE {
        return Err(Invalid);
    }
    parse_v2(b)
}

fn parse_v1(b: &[u8]) -> Result<Option<(Source, usize)>, Invalid> {
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= V1_BYTES_MAX {
            Err(Invalid)
        } else {
            Ok(None)
        };
    };
    let len = end + 2;
    if len > V1_BYTES_MAX {
        return Err(Invalid);
    }
    let line = std::str::from_utf8(&b[6..end]).map_err(|_| Invalid)?;
    let mut parts = line.split(' ');
    let proto = parts.next().ok_or(Invalid)?;
    if proto == "UNKNOWN" {
        return Ok(Some((Source::Local, len)));
    }
    let (src, _dst, sport, _dport) = (
        parts.next().ok_or(Invalid)?,
        parts.next().ok_or(Invalid)?,
        parts.next().ok_or(Invalid)?,
        parts.next().ok_or(Invalid)?,
    );
    if parts.next().is_some() {
        return Err(Invalid);
    }
    let ip: IpAddr = match proto {
        "TCP4" => IpAddr::V4(src.parse::<Ipv4Addr>().map_err(|_| Invalid)?),
        "TCP6" => IpAddr::V6(src.parse::<Ipv6Addr>().map_err(|_| Invalid)?),
        _ => return Err(Invalid),
    };
    let port: u16 = sport.parse().map_err(|_| Invalid)?;
    Ok(Some((Source::Proxied(SocketAddr::new(ip, port)), len)))
}

fn parse_v2(b: &[u8]) -> Result<Option<(Source, usize)>, Invalid> {
    let ver_cmd = b[12];
    if ver_cmd >> 4 != 2 {
        return Err(Invalid);
    }
    let fam = b[13];
    let addr_len = usize::from(u16::from_be_bytes([b[14], b[15]]));
    let len = 16 + addr_len;
    if len > V2_BYTES_MAX {
        return Err(Invalid);
    }
    if b.len() < len {
        return Ok(None);
    }
    let a = &b[16..len];
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection; addresses (if any) are ignored.
        0 => Ok(Some((Source::Local, len))),
        1 => {
            let src = match fam {
                // TCP over IPv4.
                0x11 if a.len() >= 12 => SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
                    u16::from_be_bytes([a[8], a[9]]),
                ),
                0x21 if a.len() >= 36 => {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&a[..16]);
                    SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::from(ip)),
                        u16::from_be_bytes([a[32], a[33]]),
                    )
                }
                // UNSPEC: no address to believe.
                0x00 => return Ok(Some((Source::Local, len))),
                // Valid families this proxy has no use for (UDP, UNIX sockets): the spec
                // says to fall back to the real connection's address, as for UNSPEC.
                0x12 if a.len() >= 12 => return Ok(Some((Source::Local, len))),
                0x22 if a.len() >= 36 => return Ok(Some((Source::Local, len))),
                0x31 | 0x32 if a.len() >= 216 => return Ok(Some((Source::Local, len))),
                _ => return Err(Invalid),
            };
            Ok(Some((Source::Proxied(src), len)))
        }
        _ => Err(Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((
                Source::Proxied("192.0.2.1:56324".parse().unwrap()),
                45
            )))
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n";
        assert_eq!(
            parse(h6).unwrap().unwrap().0,
            Source::Proxied("[2001:db8::1]:1234".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((Source::Local, 15))));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.1 1"), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        for bad in [
            &b"PROXY TCP4 999.0.2.1 198.51.100.1 1 2\r\n"[..],
            b"PROXY TCP5 a b 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
        ] {
            assert_eq!(parse(bad), Err(Invalid), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 200]), Err(Invalid));
    }

    #[test]
    fn v2_headers() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 203, 0, 113, 9, 10, 0, 0, 1, 0x1f, 0x90, 0, 80,
        ]);
        h.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&h),
            Ok(Some((
                Source::Proxied("203.0.113.9:8080".parse().unwrap()),
                28
            )))
        );
        assert_eq!(parse(&h[..20]), Ok(None));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Some((Source::Local, 16))));
        let mut v6 = V2_SIGNATURE.to_vec();
        v6.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let mut src = [0u8; 16];
        src[0] = 0x20;
        src[1] = 0x01;
        src[15] = 7;
        v6.extend_from_slice(&src);
        v6.extend_from_slice(&[0u8; 16]);
        v6.extend_from_slice(&[0, 99, 0, 80]);
        assert_eq!(
            parse(&v6).unwrap().unwrap().0,
            Source::Proxied("[2001::7]:99".parse().unwrap())
        );
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert_eq!(parse(&bad), Err(Invalid));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(Invalid));
        // A UNIX-socket frontend: valid, no address to use, the peer's stays.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        assert_eq!(parse(&unix), Ok(Some((Source::Local, 232))));
        // ...but its addresses must be there.
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x31, 0, 12]);
        short.extend_from_slice(&[0u8; 12]);
        assert_eq!(parse(&short), Err(Invalid));
    }
}
