//! Node identity and the TLS foundation for cross-host traffic.
//!
//! Owns: the mesh's certificate authority (roots, trust bundle, rotation), single-use join
//! tokens, each node's key and short-lived certificate, and the rustls configurations of the
//! inbound listener (:15008) and of outbound dials to peer agents. It must never send a
//! private key anywhere: keys are made where they are used, written 0600, and only
//! certificate signing requests and certificates travel.
//!
//! | file | owns |
//! | --- | --- |
//! | `spiffe.rs` | [`SpiffeId`]: parse, format, validate; node IDs `spiffe://DOMAIN/node/NAME` |
//! | `ca.rs` | [`CertificateAuthority`] on disk under `<state-dir>/ca/`, [`TrustBundle`], CSR signing, rotation (with a cross-certificate per new root) |
//! | `trust.rs` | when a host may move to another bundle ([`TrustBundle::admits`]: new roots only through a cross-certificate by a trusted root), [`root_fingerprint`] and the pinning checks of the join flow |
//! | `token.rs` | [`JoinTokens`]: hashed, expiring, single-use join tokens |
//! | `node.rs` | [`NodeIdentity`]: the node's key, CSR, installed certificate, renewal time |
//! | `tls.rs` | [`TlsIdentity`]: rustls server/client configs that follow renewals and bundle changes live |
//! | `files.rs` | atomic writes with the right mode |
//!
//! How the pieces meet (the lead wires the transport; this module does no I/O but files):
//!
//! 1. **CA host** (`hms-ctl ca init --trust-domain D`, or automatically on a single host):
//!    [`CertificateAuthority::init`] writes `<state-dir>/ca/`.
//! 2. **Join**: the CA host runs [`CertificateAuthority::create_join_token`] and prints the
//!    token. The joining node runs [`NodeIdentity::load_or_create`] (key made locally) and
//!    sends [`NodeIdentity::create_csr`] + token + node name through the registry. The CA host
//!    answers with [`CertificateAuthority::redeem_and_sign`] (token checked and spent first,
//!    then a certificate whose only SAN is the node's SPIFFE ID) and the [`TrustBundle`].
//!    The node calls [`NodeIdentity::install`], then [`TlsIdentity::set_certificate`].
//! 3. **Renewal**: when [`NodeIdentity::needs_renewal`] says so (half-life), the node makes a
//!    new CSR (fresh key) and the CA host signs it with [`CertificateAuthority::renew`],
//!    which checks the request was authenticated by the node's current certificate.
//!    Established connections keep their session; new handshakes use the new certificate.
//! 4. **Rotation** (`hms-ctl ca rotate`): [`CertificateAuthority::rotate`] adds a root (new
//!    issuance uses it, the bundle trusts both, and carries a cross-certificate of the new
//!    root signed by the old one: a node installs the new bundle only if
//!    [`TrustBundle::admits`] says its trusted roots vouch for every root in it), the new
//!    bundle is published to every node,
//!    every node re-issues, then [`CertificateAuthority::retire_old`] drops the old root and
//!    the smaller bundle is published. Both bundles trust every certificate in use at the
//!    time they are published, so no handshake fails during a rotation.

mod ca;
pub mod etcd_ca;
mod files;
pub mod join_ticket;
mod node;
mod spiffe;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
mod tls;
mod token;
mod trust;
mod x509;

use std::path::PathBuf;
use std::time::Duration;

pub use ca::{CA_DIR, CertificateAuthority, IssuedCertificate, RootSummary, TrustBundle};
pub use node::{CertificateStatus, IDENTITY_DIR, IdentityStatus, NodeIdentity, RenewalRequest};
pub use spiffe::{SpiffeId, SpiffeIdError, validate_node_name, validate_trust_domain};
pub use tls::{ALPN_H2, PeerIdentityRefused, TlsIdentity, peer_spiffe_id, verify_established};
pub use token::{JoinToken, JoinTokens, TokenError};
pub use trust::{BundleRefused, root_fingerprint};

/// How long a node certificate lives unless the caller says otherwise.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a root CA certificate lives: long, because replacing it is an operator action.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How long a join token is valid unless the caller says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);

/// Everything that can go wrong in this module, each saying what to do next.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "a certificate authority already exists in {0}; use it, or remove the directory to \
         start a new mesh (every node must then rejoin)"
    )]
    CaExists(PathBuf),
    #[error(
        "no certificate authority in {0}; create one with `hms-ctl ca init --trust-domain DOMAIN`"
    )]
    CaMissing(PathBuf),
    #[error("certificate authority state in {path} is unreadable: {reason}")]
    CaState { path: PathBuf, reason: String },
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error("certificate refused: {0}")]
    BadCertificate(String),
    #[error("trust bundle refused: {0}")]
    BadBundle(String),
    #[error(
        "private key in {path} is unusable: {reason}; remove it and let the node make a new one"
    )]
    BadKey { path: PathBuf, reason: String },
    #[error("this node has no certificate yet; join the mesh with `hms-ctl node join`")]
    NotCertified,
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("connection refused: {0}")]
    Connection(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

pub type Result<T, E = IdentityError> = std::result::Result<T, E>;

/// Single-host start: the agent with the embedded registry is its own CA. Loads (or creates)
/// `<state-dir>/ca/` and `<state-dir>/identity/`, and issues the node a certificate when it
/// has none or it is due for renewal. Returns both, ready for [`TlsIdentity::new`].
pub fn bootstrap_local(
    state_dir: &std::path::Path,
    trust_domain: &str,
    node_name: &str,
) -> Result<(CertificateAuthority, NodeIdentity)> {
    let ca = CertificateAuthority::load_or_init(state_dir, trust_domain)?;
    if ca.trust_domain() != trust_domain {
        return Err(IdentityError::CaState {
            path: ca.dir().to_owned(),
            reason: format!(
                "it serves trust domain {:?}, not {trust_domain:?}",
                ca.trust_domain()
            ),
        });
    }
    let mut node = NodeIdentity::load_or_create(state_dir, trust_domain, node_name)?;
    let now = std::time::SystemTime::now();
    if node.needs_renewal(now) {
        let csr = node.create_csr()?;
        let issued = ca.sign_node_csr(&csr, node_name, DEFAULT_CERT_TTL)?;
        node.install(&issued.chain_pem, &ca.trust_bundle())?;
    } else if node.trust_bundle().map(|b| b.fingerprint()) != Some(ca.trust_bundle().fingerprint())
    {
        node.install_trust_bundle(&ca.trust_bundle())?;
    }
    Ok((ca, node))
}

#[cfg(test)]
mod tests;

/// Lowercase hex, for hashes and fingerprints.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
