//! This host's identity: its private key, its certificate, the trust bundle it got with it.
//!
//! Owns `<state-dir>/identity/`. The key is made here and never leaves: only CSRs go out.
//! Every CSR after the first uses a fresh key (held in memory until its certificate comes
//! back), so a renewal also rotates the key.
//!
//! | file | mode | what |
//! | --- | --- | --- |
//! | `node.key` | 0600 | the private key of the installed certificate (PKCS#8 PEM) |
//! | `node.key.new` | 0600 | only between the two writes of an install; adopted at load |
//! | `node.pem` | 0644 | the certificate chain, leaf first |
//! | `bundle.json` | 0644 | the [`TrustBundle`] (trust domain + roots) |

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::ca::{IssuedCertificate, TrustBundle, renewal_message};
use super::files::{self, PUBLIC_MODE, SECRET_MODE, io_err};
use super::x509::{self, CertInfo};
use super::{IdentityError, Result, SpiffeId};

/// The node's directory under the state dir.
pub const IDENTITY_DIR: &str = "identity";
const KEY_FILE: &str = "node.key";
const NEW_KEY_FILE: &str = "node.key.new";
const CERT_FILE: &str = "node.pem";
const BUNDLE_FILE: &str = "bundle.json";
/// Domain separation for the renewal proof-of-possession signature.
pub(crate) const RENEWAL_SIGNATURE_CONTEXT: &[u8] = b"hms node renewal v1\0";

/// What a node sends to renew: a CSR for a fresh key, its current certificate, and proof
/// that it holds the current certificate's key (ECDSA P-256 over the CSR). Serialisable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalRequest {
    pub node_name: String,
    pub csr_pem: String,
    pub current_chain_pem: String,
    pub proof_of_possession: Vec<u8>,
}

/// For `hms-ctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub spiffe_id: SpiffeId,
    /// `None` until the node has joined.
    pub certificate: Option<CertificateStatus>,
    pub trust_bundle_fingerprint: Option<String>,
    pub trust_bundle_roots: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Half-life: when the agent asks for a new one.
    pub renew_at: SystemTime,
}

struct Installed {
    chain_pem: String,
    leaf: CertInfo,
}

/// The node's key and certificate.
pub struct NodeIdentity {
    dir: PathBuf,
    id: SpiffeId,
    /// The key on disk: the installed certificate's key (or the first key, before joining).
    key: KeyPair,
    /// A fresh key whose CSR is out for signing.
    pending_key: Option<KeyPair>,
    cert: Option<Installed>,
    bundle: Option<TrustBundle>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("dir", &self.dir)
            .field("id", &self.id.to_string())
            .field("certified", &self.cert.is_some())
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads `<state_dir>/identity/`, making the directory and a key (0600) if missing.
    /// An installed certificate is kept only if it matches the key and this node's ID.
    pub fn load_or_create(state_dir: &Path, trust_domain: &str, node_name: &str) -> Result<Self> {
        let id = SpiffeId::node(trust_domain, node_name)?;
        let dir = state_dir.join(IDENTITY_DIR);
        files::ensure_dir(&dir)?;
        let key_path = dir.join(KEY_FILE);
        let new_key_path = dir.join(NEW_KEY_FILE);
        let cert_path = dir.join(CERT_FILE);

        let mut cert = None;
        if cert_path.exists() {
            let chain_pem = files::read_to_string(&cert_path)?;
            cert = read_installed(&chain_pem, &id).ok();
        }
        // An install stopped between its two writes: adopt the new key if it fits the cert.
        if new_key_path.exists() {
            let new_key = read_key(&new_key_path)?;
            if cert
                .as_ref()
                .is_some_and(|c| c.leaf.spki == new_key.subject_public_key_info())
            {
                fs::rename(&new_key_path, &key_path).map_err(io_err("rename", &new_key_path))?;
            } else {
                fs::remove_file(&new_key_path).map_err(io_err("remove", &new_key_path))?;
            }
        }
        let key = if key_path.exists() {
            read_key(&key_path)?
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            files::write_atomic(&key_path, key.serialize_pem().as_bytes(), SECRET_MODE)?;
            key
        };
        if cert
            .as_ref()
            .is_some_and(|c| c.leaf.spki != key.subject_public_key_info())
        {
            tracing::warn!(path = %cert_path.display(), "node certificate does not match node.key; ignoring it");
            cert = None;
        }
        let bundle_path = dir.join(BUNDLE_FILE);
        let bundle = if bundle_path.exists() {
            let text = files::read_to_string(&bundle_path)?;
            serde_json::from_str::<TrustBundle>(&text)
                .ok()
                .filter(|b| b.trust_domain() == trust_domain)
        } else {
            None
        };
        Ok(Self {
            dir,
            id,
            key,
            pending_key: None,
            cert,
            bundle,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn node_name(&self) -> &str {
        self.id
            .node_name()
            .expect("a NodeIdentity always has a node ID")
    }

    /// A PEM CSR for this node. Before joining it is for the key on disk; once certified,
    /// each call makes a fresh key (kept in memory until [`install`](Self::install)).
    /// The CSR names this node's SPIFFE ID, though the CA decides the name on its own.
    pub fn create_csr(&mut self) -> Result<String> {
        let key = if self.cert.is_some() {
            self.pending_key
                .insert(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
        } else {
            &self.key
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(self.id.to_string().try_into()?)];
        Ok(params.serialize_request(key)?.pem()?)
    }

    /// A renewal request: a CSR for a fresh key, signed over by the current key.
    pub fn create_renewal_request(&mut self) -> Result<RenewalRequest> {
        let current_chain_pem = self
            .cert
            .as_ref()
            .ok_or(IdentityError::NotCertified)?
            .chain_pem
            .clone();
        let csr_pem = self.create_csr()?;
        let proof_of_possession = rcgen::SigningKey::sign(&self.key, &renewal_message(&csr_pem))?;
        Ok(RenewalRequest {
            node_name: self.node_name().to_owned(),
            csr_pem,
            current_chain_pem,
            proof_of_possession,
        })
    }

    /// Installs a certificate chain (leaf first) and the bundle that came with it. Refuses a
    /// chain that is not for this node, fits neither key, or does not verify against the
    /// bundle now. Writes key (if new), certificate and bundle atomically.
    pub fn install(&mut self, chain_pem: &str, bundle: &TrustBundle) -> Result<()> {
        let installed =
            read_installed(chain_pem, &self.id).map_err(IdentityError::BadCertificate)?;
        if bundle.trust_domain() != self.id.trust_domain() {
            return Err(IdentityError::BadBundle(format!(
                "it is for trust domain {:?}, this node is in {:?}",
                bundle.trust_domain(),
                self.id.trust_domain()
            )));
        }
        let chain = x509::certs_from_pem(chain_pem).map_err(IdentityError::BadCertificate)?;
        super::tls::verify_node_chain(
            &chain,
            &bundle.root_store()?,
            self.id.trust_domain(),
            SystemTime::now(),
        )
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;

        let spki = &installed.leaf.spki;
        let new_key = match self.pending_key.take() {
            Some(k) if &k.subject_public_key_info() == spki => Some(k),
            other => {
                self.pending_key = other;
                if &self.key.subject_public_key_info() != spki {
                    return Err(IdentityError::BadCertificate(
                        "it is not for this node's key (was it issued for an older request?)"
                            .into(),
                    ));
                }
                None
            }
        };
        let key_path = self.dir.join(KEY_FILE);
        let new_key_path = self.dir.join(NEW_KEY_FILE);
        if let Some(k) = &new_key {
            files::write_atomic(&new_key_path, k.serialize_pem().as_bytes(), SECRET_MODE)?;
        }
        files::write_atomic(&self.dir.join(CERT_FILE), chain_pem.as_bytes(), PUBLIC_MODE)?;
        if let Some(k) = new_key {
            fs::rename(&new_key_path, &key_path).map_err(io_err("rename", &new_key_path))?;
            self.key = k;
        }
        self.cert = Some(installed);
        self.install_trust_bundle(bundle)
    }

    /// [`install`](Self::install) for what [`CertificateAuthority`](super::CertificateAuthority) returned.
    pub fn install_issued(&mut self, issued: &IssuedCertificate) -> Result<()> {
        self.install(&issued.chain_pem, &issued.trust_bundle)
    }

    /// Replaces the trust bundle (rotation), persisted.
    pub fn install_trust_bundle(&mut self, bundle: &TrustBundle) -> Result<()> {
        if bundle.trust_domain() != self.id.trust_domain() {
            return Err(IdentityError::BadBundle(format!(
                "it is for trust domain {:?}, this node is in {:?}",
                bundle.trust_domain(),
                self.id.trust_domain()
            )));
        }
        let json = serde_json::to_vec_pretty(bundle).expect("bundle serialises");
        files::write_atomic(&self.dir.join(BUNDLE_FILE), &json, PUBLIC_MODE)?;
        self.bundle = Some(bundle.clone());
        Ok(())
    }

    pub fn trust_bundle(&self) -> Option<&TrustBundle> {
        self.bundle.as_ref()
    }

    /// `Ok` when the installed certificate verifies against `bundle`'s roots at `now`: a
    /// bundle this fails for would leave the node unable to prove who it is.
    pub fn verify_certificate_against(&self, bundle: &TrustBundle, now: SystemTime) -> Result<()> {
        let cert = self.cert.as_ref().ok_or(IdentityError::NotCertified)?;
        let chain = x509::certs_from_pem(&cert.chain_pem).map_err(IdentityError::BadCertificate)?;
        super::tls::verify_node_chain(&chain, &bundle.root_store()?, self.id.trust_domain(), now)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Ok(())
    }

    /// True without a certificate, and from half-life on.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        self.renew_at().is_none_or(|at| now >= at)
    }

    /// Half-life of the installed certificate.
    pub fn renew_at(&self) -> Option<SystemTime> {
        let leaf = &self.cert.as_ref()?.leaf;
        let life = leaf
            .not_after
            .duration_since(leaf.not_before)
            .unwrap_or_default();
        Some(leaf.not_before + life / 2)
    }

    pub fn not_after(&self) -> Option<SystemTime> {
        Some(self.cert.as_ref()?.leaf.not_after)
    }

    pub fn status(&self) -> IdentityStatus {
        IdentityStatus {
            spiffe_id: self.id.clone(),
            certificate: self.cert.as_ref().map(|c| CertificateStatus {
                serial: c.leaf.serial_hex.clone(),
                not_before: c.leaf.not_before,
                not_after: c.leaf.not_after,
                renew_at: self.renew_at().unwrap_or(c.leaf.not_after),
            }),
            trust_bundle_fingerprint: self.bundle.as_ref().map(TrustBundle::fingerprint),
            trust_bundle_roots: self.bundle.as_ref().map_or(0, TrustBundle::len),
        }
    }

    /// The installed certificate and key, as rustls wants them (for
    /// [`TlsIdentity`](super::TlsIdentity)).
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>> {
        let cert = self.cert.as_ref().ok_or(IdentityError::NotCertified)?;
        certified_key_from_pem(&cert.chain_pem, &self.key.serialize_pem())
    }
}

/// A rustls `CertifiedKey` from a PEM chain (leaf first) and a PEM PKCS#8 key; checks they match.
pub(crate) fn certified_key_from_pem(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>> {
    let chain = x509::certs_from_pem(chain_pem).map_err(IdentityError::BadCertificate)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| IdentityError::BadKey {
            path: PathBuf::from("<memory>"),
            reason: e.to_string(),
        })?;
    let provider = super::tls::provider();
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider)?))
}

fn read_installed(chain_pem: &str, id: &SpiffeId) -> Result<Installed, String> {
    let chain = x509::certs_from_pem(chain_pem)?;
    let leaf = x509::parse(&chain[0])?;
    match &leaf.spiffe_id {
        Ok(got) if got == id => {}
        Ok(got) => return Err(format!("it is for {got}, this node is {id}")),
        Err(e) => return Err(format!("it has no SPIFFE ID: {e}")),
    }
    if leaf.is_ca {
        return Err("it is a CA certificate, not a node certificate".into());
    }
    Ok(Installed {
        chain_pem: chain_pem.to_owned(),
        leaf,
    })
}

fn read_key(path: &Path) -> Result<KeyPair> {
    let pem = files::read_to_string(path)?;
    KeyPair::from_pem(&pem).map_err(|e| IdentityError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
