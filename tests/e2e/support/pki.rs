//! A test certificate authority and a TLS client, so handshakes are real and verified.

use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A CA that issues leaf certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem: String,
}

/// A leaf certificate and key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Ringway Test CA");
        let cert = p.self_signed(&key).unwrap();
        let pem = cert.pem();
        Ca { cert, key, pem }
    }

    /// An ECDSA P-256 leaf for `names`.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, rcgen::KeyPair::generate().unwrap(), None)
    }

    /// An RSA 2048 leaf.
    pub fn rsa_leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        self.leaf_with(names, key, None)
    }

    /// A leaf that expired yesterday.
    pub fn expired_leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        self.leaf_with(names, key, Some((2020, 2021)))
    }

    fn leaf_with(&self, names: &[&str], key: rcgen::KeyPair, validity: Option<(i32, i32)>) -> Leaf {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some((nb, na)) = validity {
            p.not_before = rcgen::date_time_ymd(nb, 1, 1);
            p.not_after = rcgen::date_time_ymd(na, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A client configuration trusting this CA (TLS 1.2 and 1.3, ALPN http/1.1, a session
    /// cache so later connections resume).
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        self.client_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    /// A client that never resumes: every handshake shows the certificate served now.
    pub fn client_no_resumption(&self) -> Arc<rustls::ClientConfig> {
        let mut c = (*self.client()).clone();
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }

    pub fn client_versions(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.cert.der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }
}

/// A TLS client connection.
pub struct TlsClient {
    pub stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

/// Responses over TLS are read like plain ones.
pub type TlsResponse = super::client::Response;

impl TlsClient {
    /// Connects and completes the handshake with `sni` (or an error: refused, bad cert...).
    pub fn connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        sni: &str,
    ) -> Result<TlsClient, rustls::Error> {
        Self::connect_after(addr, config, sni, b"")
    }

    /// Sends `preamble` (a PROXY protocol header, say) on the socket, then handshakes.
    pub fn connect_after(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        sni: &str,
        preamble: &[u8],
    ) -> Result<TlsClient, rustls::Error> {
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.write_all(preamble).unwrap();
        Self::handshake_over(tcp, config, sni)
    }

    /// Handshakes over a socket the test connected itself (with a small receive buffer, say).
    pub fn handshake_over(
        tcp: TcpStream,
        config: &Arc<rustls::ClientConfig>,
        sni: &str,
    ) -> Result<TlsClient, rustls::Error> {
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
                return Err(
                    match e
                        .into_inner()
                        .and_then(|i| i.downcast::<rustls::Error>().ok())
                    {
                        Some(e) => *e,
                        None => rustls::Error::General("handshake failed".into()),
                    },
                );
            }
        }
        Ok(TlsClient { stream })
    }

    /// DER of the certificate the server presented.
    pub fn peer_cert(&self) -> Vec<u8> {
        self.stream.conn.peer_certificates().unwrap()[0].to_vec()
    }

    pub fn resumed(&self) -> bool {
        self.stream.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.conn.protocol_version()
    }

    pub fn request(&mut self, raw: &[u8]) -> std::io::Result<TlsResponse> {
        self.stream.write_all(raw)?;
        self.stream.flush()?;
        self.read_response()
    }

    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<TlsResponse> {
        self.request(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
    }

    fn read_response(&mut self) -> std::io::Result<TlsResponse> {
        super::client::read_response_from(&mut BufReader::new(&mut self.stream), false)
    }
}

/// Accepts any server certificate: for the tests that look at which certificate a server
/// presents for a name it does not cover (the default certificate), or with no SNI at all.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that accepts any certificate (see `AcceptAny`).
pub fn client_accepting_any() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// The bytes of a ClientHello for `sni`, as a client would first send them.
pub fn client_hello_bytes(config: &Arc<rustls::ClientConfig>, sni: &str) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}
