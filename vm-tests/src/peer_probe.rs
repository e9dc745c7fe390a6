//! A TLS client for another host's `:15008` that offers whatever certificate it is given
//! and reports whether the server accepted it as a peer agent: what the refusal tests of
//! the inbound listener use (real certificates, forged ones, none).

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use hms_node_agent::identity::testing::AcceptAnyServer;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, SignatureScheme, StreamOwned};

/// Upper bound on each step of a probe.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn tls13_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    Arc::new(p)
}

/// Always offers the one certificate it holds.
#[derive(Debug)]
pub struct Offer(pub Arc<CertifiedKey>);

impl ResolvesClientCert for Offer {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS 1.3, ALPN h2, any server; offers `cert` (or no certificate at all).
pub fn hand_made_config(cert: Option<Arc<CertifiedKey>>) -> Arc<ClientConfig> {
    let provider = tls13_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match cert {
        Some(c) => builder.with_client_cert_resolver(Arc::new(Offer(c))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    Arc::new(config)
}

pub fn certified(chain_pem: &str, key_pem: &str) -> Arc<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
    Arc::new(CertifiedKey::new(chain, signer))
}

/// Connects to `addr` (from the calling thread's namespace), completes the TLS handshake,
/// sends the HTTP/2 preface and a SETTINGS frame, and reads the server's first frame.
/// `Ok` only if the server answered with its SETTINGS: it accepted us as a peer agent.
/// Every step is bounded by [`IO_TIMEOUT`].
pub fn try_peer_connection(
    addr: SocketAddrV4,
    config: Arc<ClientConfig>,
) -> Result<String, String> {
    let tcp = TcpStream::connect_timeout(&SocketAddr::V4(addr), IO_TIMEOUT)
        .map_err(|e| format!("TCP connect: {e}"))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("hms-peer.invalid").unwrap();
    let conn = ClientConnection::new(config, name).map_err(|e| format!("client setup: {e}"))?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
    // TLS 1.3: the client's handshake ends before the server has judged its certificate;
    // a refusal arrives as an alert on the first read.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    tls.write_all(preface)
        .and_then(|()| tls.flush())
        .map_err(|e| format!("after the handshake, writing: {e}"))?;
    let mut frame = [0u8; 9];
    tls.read_exact(&mut frame)
        .map_err(|e| format!("after the handshake, reading: {e}"))?;
    if frame[3] != 0x4 {
        return Err(format!("first frame is type {} not SETTINGS", frame[3]));
    }
    Ok(format!(
        "TLS 1.3 handshake done, ALPN {:?}, server SETTINGS received",
        alpn.map(|a| String::from_utf8_lossy(&a).into_owned())
    ))
}
