//! `handshakes`: a full TLS handshake per request, never resumed.
//!
//! wrk and h2load both resume TLS sessions (tickets), so a `Connection: close` run with them
//! measures resumptions, not full handshakes. Here every connection is new: `C` threads each
//! connect, handshake with resumption disabled, send one `Connection: close` request, read to
//! the end, and start over until the time is up. The server's certificate is not verified
//! (like wrk), but its handshake signature is: the client does a real client's work.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a single connection may take before it counts as an error.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Most response bytes read per connection (the test responses are tiny).
const RESPONSE_BYTES_MAX: usize = 1 << 20;

#[derive(Debug)]
struct NoCertCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoCertCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| panic!("rustls: {e}"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoCertCheck(provider)))
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// One connection: handshake, request, response to EOF. Returns whether the status was 2xx.
fn one(
    addr: SocketAddr,
    name: &ServerName<'static>,
    config: &Arc<ClientConfig>,
    req: &[u8],
) -> std::io::Result<bool> {
    let tcp = TcpStream::connect_timeout(&addr, CONNECTION_TIMEOUT)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
    let conn =
        ClientConnection::new(config.clone(), name.clone()).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(req)?;
    let mut resp = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() > RESPONSE_BYTES_MAX {
                    break;
                }
            }
            // A peer that closes without close_notify still sent the whole response.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(resp.starts_with(b"HTTP/1.1 2"))
}

/// Runs the load; prints one JSON line.
pub fn run(addr: SocketAddr, host: &str, path: &str, connections: usize, seconds: f64) {
    let config = config();
    let name = ServerName::try_from(host.to_string()).unwrap_or_else(|_| {
        eprintln!("bad server name {host:?}");
        std::process::exit(2)
    });
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (config, name, req) = (config.clone(), name.clone(), req.clone());
            std::thread::spawn(move || {
                let (mut lat_us, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < end {
                    let t = Instant::now();
                    match one(addr, &name, &config, &req) {
                        Ok(true) => {
                            lat_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
                        }
                        _ => errors += 1,
                    }
                }
                (lat_us, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    for t in threads {
        if let Ok((l, e)) = t.join() {
            lat.extend(l);
            errors += e;
        }
    }
    lat.sort_unstable();
    println!(
        "{{\"mode\":\"handshakes\",\"completed\":{},\"achieved_rps\":{:.1},\"errors\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        lat.len(),
        lat.len() as f64 / seconds,
        errors,
        crate::pct(&lat, 0.50),
        crate::pct(&lat, 0.99),
        crate::pct(&lat, 1.0)
    );
}
