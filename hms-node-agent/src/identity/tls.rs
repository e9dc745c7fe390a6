//! rustls configurations for cross-host traffic: the inbound listener (:15008) and dials to
//! peer agents. TLS 1.3 only, ALPN `h2`, mutual authentication by SPIFFE ID.
//!
//! A [`TlsIdentity`] is the one live source of "who am I" (certificate + key) and "whom do
//! I trust" (the bundle). The configs it makes hold it by reference, so:
//! - [`TlsIdentity::set_certificate`] (renewal) makes every *new* handshake present the new
//!   certificate; established connections keep their session and are not touched.
//! - [`TlsIdentity::set_trust_bundle`] (rotation) makes every *new* handshake verify against
//!   the new roots. Configs need not be rebuilt.
//!
//! Verification (both sides): the peer's chain must lead to a root of the *current* bundle
//! and be valid now (webpki), and its single URI SAN must be a node ID of our trust domain.
//! The inbound side accepts any node; a dialer accepts only the node it meant to reach.
//! DNS names play no part: the `ServerName` given to `connect` is ignored and no SNI is sent.
//! Session resumption is off both ways, so every connection is verified against the bundle
//! in force when it was made (after a root is retired, nothing resumes a session it signed).
//!
//! Must never accept a peer without a certificate, nor fall back to TLS 1.2: rustls is built
//! with TLS 1.2 for egress (`proxy/external.rs`), so every config here names TLS 1.3 and a
//! provider with only its suites (`provider`); a test checks a 1.2-only peer is refused.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ProtocolVersion, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::node::NodeIdentity;
use super::{IdentityError, Result, SpiffeId, TrustBundle, x509};

/// The only application protocol spoken between agents.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider of every mesh TLS connection: ring, TLS 1.3 suites only.
pub(crate) fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    provider
}

fn signature_algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Why a peer's identity was refused (carried inside `rustls::Error`).
#[derive(Debug, thiserror::Error)]
#[error("peer identity refused: {0}")]
pub struct PeerIdentityRefused(pub String);

fn refuse(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        PeerIdentityRefused(reason),
    ))))
}

/// The roots in force and the webpki client verifier built from them.
struct Trust {
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    fn new(bundle: &TrustBundle) -> Result<Self> {
        let roots = Arc::new(bundle.root_store()?);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), Arc::new(provider()))
                .build()
                .map_err(|e| IdentityError::BadBundle(e.to_string()))?;
        Ok(Self {
            roots,
            client_verifier,
        })
    }
}

struct Shared {
    id: SpiffeId,
    cert: RwLock<Arc<CertifiedKey>>,
    trust: RwLock<Arc<Trust>>,
}

impl Shared {
    fn cert(&self) -> Arc<CertifiedKey> {
        self.cert.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn trust(&self) -> Arc<Trust> {
        self.trust.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// This node's live TLS identity. Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct TlsIdentity {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("id", &self.shared.id.to_string())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// `id` must be a node ID, `cert`'s leaf must carry it, and `bundle` must be of its
    /// trust domain.
    pub fn new(id: SpiffeId, cert: Arc<CertifiedKey>, bundle: &TrustBundle) -> Result<Self> {
        id.require_node()?;
        check_own_certificate(&id, &cert)?;
        check_bundle_domain(&id, bundle)?;
        Ok(Self {
            shared: Arc::new(Shared {
                cert: RwLock::new(cert),
                trust: RwLock::new(Arc::new(Trust::new(bundle)?)),
                id,
            }),
        })
    }

    /// From an installed node identity.
    pub fn from_node(node: &NodeIdentity) -> Result<Self> {
        let bundle = node.trust_bundle().ok_or(IdentityError::NotCertified)?;
        Self::new(node.spiffe_id().clone(), node.certified_key()?, bundle)
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.shared.id
    }

    /// Renewal: new handshakes present `cert`; established connections are untouched.
    pub fn set_certificate(&self, cert: Arc<CertifiedKey>) -> Result<()> {
        check_own_certificate(&self.shared.id, &cert)?;
        *self.shared.cert.write().unwrap_or_else(|e| e.into_inner()) = cert;
        Ok(())
    }

    /// Rotation: new handshakes verify peers against `bundle`.
    pub fn set_trust_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        check_bundle_domain(&self.shared.id, bundle)?;
        let trust = Arc::new(Trust::new(bundle)?);
        *self.shared.trust.write().unwrap_or_else(|e| e.into_inner()) = trust;
        Ok(())
    }

    /// Takes both certificate and bundle from `node` (after an install).
    pub fn update_from(&self, node: &NodeIdentity) -> Result<()> {
        let bundle = node.trust_bundle().ok_or(IdentityError::NotCertified)?;
        self.set_trust_bundle(bundle)?;
        self.set_certificate(node.certified_key()?)
    }

    /// The inbound listener's config: requires a client certificate of a node in our trust
    /// domain. Build once; it follows renewals and bundle changes.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(NodeClientVerifier {
                shared: self.shared.clone(),
            }))
            .with_cert_resolver(Arc::new(CurrentCert {
                shared: self.shared.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// A dialer's config for reaching the node `peer` (cache it per peer if you like; it
    /// follows renewals and bundle changes). Any `ServerName` may be passed to `connect`.
    pub fn client_config(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>> {
        peer.require_node()?;
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous() // a custom verifier: SPIFFE IDs instead of DNS names
            .with_custom_certificate_verifier(Arc::new(NodeServerVerifier {
                shared: self.shared.clone(),
                expected: peer.clone(),
            }))
            .with_client_cert_resolver(Arc::new(CurrentCert {
                shared: self.shared.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }
}

fn check_own_certificate(id: &SpiffeId, cert: &CertifiedKey) -> Result<()> {
    let leaf = cert
        .cert
        .first()
        .ok_or_else(|| IdentityError::BadCertificate("empty chain".into()))?;
    let info = x509::parse(leaf).map_err(IdentityError::BadCertificate)?;
    match info.spiffe_id {
        Ok(got) if &got == id => Ok(()),
        Ok(got) => Err(IdentityError::BadCertificate(format!(
            "it is for {got}, this node is {id}"
        ))),
        Err(e) => Err(IdentityError::BadCertificate(e)),
    }
}

fn check_bundle_domain(id: &SpiffeId, bundle: &TrustBundle) -> Result<()> {
    if bundle.trust_domain() == id.trust_domain() {
        Ok(())
    } else {
        Err(IdentityError::BadBundle(format!(
            "it is for trust domain {:?}, this node is in {:?}",
            bundle.trust_domain(),
            id.trust_domain()
        )))
    }
}

/// The node ID in a peer's leaf certificate, if it is a node of `trust_domain`.
fn node_identity_of(
    leaf: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<SpiffeId, rustls::Error> {
    let info = x509::parse(leaf).map_err(refuse)?;
    let id = info.spiffe_id.map_err(refuse)?;
    if id.trust_domain() != trust_domain {
        return Err(refuse(format!(
            "{id} is not in trust domain {trust_domain:?}"
        )));
    }
    if id.node_name().is_none() {
        return Err(refuse(format!("{id} is not a node identity")));
    }
    Ok(id)
}

/// Verifies a node certificate chain (leaf first) against `roots` at `now` and returns the
/// node's ID. Used by the dialer, by the CA to authenticate renewals, and by installs.
pub(crate) fn verify_node_chain(
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
    trust_domain: &str,
    now: SystemTime,
) -> Result<SpiffeId, rustls::Error> {
    let leaf = chain
        .first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)?;
    let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &chain[1..],
        now,
        signature_algorithms().all,
    )?;
    node_identity_of(leaf, trust_domain)
}

/// Serves the current certificate on both sides.
#[derive(Debug)]
struct CurrentCert {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id.to_string())
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.cert())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.cert())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Inbound: a client certificate is required, chains to the current bundle, is valid now,
/// and names a node of our trust domain.
#[derive(Debug)]
struct NodeClientVerifier {
    shared: Arc<Shared>,
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients have exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.shared
            .trust()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        node_identity_of(end_entity, self.shared.id.trust_domain())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_algorithms().supported_schemes()
    }
}

/// Outbound: the server's chain leads to the current bundle, is valid now, and names
/// exactly the node we dialled.
#[derive(Debug)]
struct NodeServerVerifier {
    shared: Arc<Shared>,
    expected: SpiffeId,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.shared.trust().roots,
            intermediates,
            now,
            signature_algorithms().all,
        )?;
        let id = node_identity_of(end_entity, self.shared.id.trust_domain())?;
        if id != self.expected {
            return Err(refuse(format!(
                "expected {}, the peer is {id}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_algorithms().supported_schemes()
    }
}

/// The SPIFFE ID of the authenticated peer of an established connection. With
/// `tokio_rustls`: `peer_spiffe_id(stream.get_ref().1)` (server or client stream).
/// The certificate was verified during the handshake; this only reads it.
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| IdentityError::BadCertificate("the peer presented no certificate".into()))?;
    x509::parse(leaf)
        .and_then(|info| info.spiffe_id)
        .map_err(IdentityError::BadCertificate)
}

/// After the handshake: TLS 1.3, ALPN `h2` agreed, and the peer's SPIFFE ID. The inbound
/// listener should call this and close the connection on error (a client that offered no
/// ALPN completes the handshake without `h2`).
pub fn verify_established(conn: &CommonState) -> Result<SpiffeId> {
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(IdentityError::Connection(
            "the connection is not TLS 1.3".into(),
        ));
    }
    if conn.alpn_protocol() != Some(ALPN_H2) {
        return Err(IdentityError::Connection(
            "the peer did not agree to ALPN h2".into(),
        ));
    }
    peer_spiffe_id(conn)
}
