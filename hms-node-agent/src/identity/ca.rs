//! The mesh's certificate authority: its roots, the trust bundle, and node certificates.
//!
//! Owns `<state-dir>/ca/`. It must never put a private key anywhere but this directory, and
//! never copy a name from a CSR into a certificate: the only thing taken from a request is
//! its public key (after checking the request's self-signature); the SAN is always the
//! SPIFFE ID of the node the CA decided on.
//!
//! Several roots can be active at once (rotation): the newest is *current* and signs all new
//! certificates; every active root is in the [`TrustBundle`]. Node certificates are signed
//! directly by a root (path length 0), so a chain is just the leaf.
//!
//! On disk (written atomically):
//!
//! | file | mode | what |
//! | --- | --- | --- |
//! | `ca.json` | 0644 | trust domain, active root ids, the current one |
//! | `root-<id>.key` | 0600 | a root's private key (PKCS#8 PEM) |
//! | `root-<id>.pem` | 0644 | a root's certificate |
//! | `root-<id>.cross.pem` | 0644 | for a root made by rotation: its cross-certificate, signed by the root current before it (see `trust.rs`) |
//! | `bundle.pem` | 0644 | all active roots, for operators and `openssl verify` |
//! | `join-tokens.json` | 0600 | hashed join tokens (see `token.rs`) |

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::files::{self, PUBLIC_MODE, SECRET_MODE, io_err};
use super::node::{RENEWAL_SIGNATURE_CONTEXT, RenewalRequest};
use super::x509::{self, CertInfo};
use super::{
    DEFAULT_ROOT_TTL, IdentityError, JoinToken, JoinTokens, Result, SpiffeId, validate_trust_domain,
};

/// The CA's directory under the state dir.
pub const CA_DIR: &str = "ca";
const STATE_FILE: &str = "ca.json";
const BUNDLE_FILE: &str = "bundle.pem";
const TOKENS_FILE: &str = "join-tokens.json";
/// Certificates start this long before they are made, so a peer whose clock is a little
/// behind does not see them as not yet valid.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const SERIAL_BYTES: usize = 16;

/// The roots a node trusts. Serialisable, so it can travel through the registry; compare
/// [`fingerprint`](Self::fingerprint)s to see whether a node has the latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    pub(super) trust_domain: String,
    /// One PEM `CERTIFICATE` per active root, oldest first.
    pub(super) roots_pem: Vec<String>,
    /// Cross-certificates (PEM): for a root added by a rotation, its subject and key issued
    /// and signed by the root that was current before it. They are never trust anchors and
    /// never in a TLS chain; they only let a host that trusts the old root accept the new one
    /// ([`TrustBundle::admits`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) cross_signed_pem: Vec<String>,
}

impl TrustBundle {
    /// Builds a bundle, checking every root is a CA certificate.
    pub fn new(trust_domain: &str, roots_pem: Vec<String>) -> Result<Self> {
        validate_trust_domain(trust_domain)?;
        let bundle = Self {
            trust_domain: trust_domain.to_owned(),
            roots_pem,
            cross_signed_pem: Vec::new(),
        };
        bundle.validate()?;
        Ok(bundle)
    }

    /// The same bundle carrying these cross-certificates (PEM), each checked to be a CA
    /// certificate. Whether they endorse anything is decided by [`admits`](Self::admits).
    pub fn with_cross_signed(mut self, cross_signed_pem: Vec<String>) -> Result<Self> {
        self.cross_signed_pem = cross_signed_pem;
        self.validate()?;
        Ok(self)
    }

    /// Builds a bundle from one PEM text holding all roots (as in `bundle.pem`).
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self> {
        let ders = x509::certs_from_pem(pem).map_err(IdentityError::BadBundle)?;
        Self::new(
            trust_domain,
            ders.iter().map(|d| x509::cert_to_pem(d)).collect(),
        )
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.roots_pem.is_empty() {
            return Err(IdentityError::BadBundle(
                "it has no root certificate".into(),
            ));
        }
        for pem in self.roots_pem.iter().chain(&self.cross_signed_pem) {
            let ders = x509::certs_from_pem(pem).map_err(IdentityError::BadBundle)?;
            for der in ders {
                let info = x509::parse(&der).map_err(IdentityError::BadBundle)?;
                if !info.is_ca {
                    return Err(IdentityError::BadBundle(format!(
                        "certificate {} is not a CA certificate",
                        info.serial_hex
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// All roots as one PEM text.
    pub fn to_pem(&self) -> String {
        self.roots_pem.concat()
    }

    /// How many roots it holds.
    pub fn len(&self) -> usize {
        self.roots_pem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots_pem.is_empty()
    }

    /// The roots as DER.
    pub fn roots_der(&self) -> Vec<CertificateDer<'static>> {
        self.roots_pem
            .iter()
            .filter_map(|p| x509::certs_from_pem(p).ok())
            .flatten()
            .collect()
    }

    /// The roots as a rustls root store.
    pub fn root_store(&self) -> Result<rustls::RootCertStore> {
        let mut store = rustls::RootCertStore::empty();
        for der in self.roots_der() {
            store
                .add(der)
                .map_err(|e| IdentityError::BadBundle(format!("root rejected: {e}")))?;
        }
        Ok(store)
    }

    /// SHA-256 over the roots' DER, hex: equal bundles have equal fingerprints.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for der in self.roots_der() {
            ctx.update(&(der.len() as u64).to_be_bytes());
            ctx.update(&der);
        }
        super::hex(ctx.finish().as_ref())
    }
}

/// A certificate the CA issued, ready to send to the node (serialisable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub spiffe_id: SpiffeId,
    /// Leaf first; the root is not included (it is in the bundle).
    pub chain_pem: String,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The bundle at issuance, for the node to install with the certificate.
    pub trust_bundle: TrustBundle,
}

/// One active root, for `hms-ctl ca status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSummary {
    pub id: u32,
    pub current: bool,
    pub serial: String,
    pub not_after: SystemTime,
}

#[derive(Debug, Serialize, Deserialize)]
struct CaStateFile {
    trust_domain: String,
    /// Active roots, oldest first.
    active_roots: Vec<u32>,
    current_root: u32,
    next_root: u32,
}

struct Root {
    id: u32,
    cert_pem: String,
    /// Its cross-certificate by the root current before it (roots made by rotation).
    cross_pem: Option<String>,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

/// The CA, loaded from its directory. Not `Clone`: one owner writes its files.
pub struct CertificateAuthority {
    dir: PathBuf,
    trust_domain: String,
    /// Oldest first; the one with `current` signs.
    roots: Vec<Root>,
    current: u32,
    next_root: u32,
    tokens: JoinTokens,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field(
                "roots",
                &self.roots.iter().map(|r| r.id).collect::<Vec<_>>(),
            )
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// `hms-ctl ca init`: creates `<state_dir>/ca/` with one root. Refuses if a CA exists.
    pub fn init(state_dir: &Path, trust_domain: &str) -> Result<Self> {
        validate_trust_domain(trust_domain)?;
        let dir = state_dir.join(CA_DIR);
        if dir.join(STATE_FILE).exists() {
            return Err(IdentityError::CaExists(dir));
        }
        files::ensure_dir(&dir)?;
        let mut ca = Self {
            dir,
            trust_domain: trust_domain.to_owned(),
            roots: Vec::new(),
            current: 1,
            next_root: 1,
            tokens: JoinTokens::default(),
        };
        ca.add_root(SystemTime::now())?;
        ca.save_state()?;
        Ok(ca)
    }

    /// Loads the CA in `<state_dir>/ca/`.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join(CA_DIR);
        let state_path = dir.join(STATE_FILE);
        if !state_path.exists() {
            return Err(IdentityError::CaMissing(dir));
        }
        let bad = |reason: String| IdentityError::CaState {
            path: state_path.clone(),
            reason,
        };
        let state: CaStateFile = serde_json::from_str(&files::read_to_string(&state_path)?)
            .map_err(|e| bad(e.to_string()))?;
        validate_trust_domain(&state.trust_domain)?;
        if !state.active_roots.contains(&state.current_root) {
            return Err(bad(format!(
                "current root {} is not active",
                state.current_root
            )));
        }
        let mut roots = Vec::new();
        for &id in &state.active_roots {
            let key_path = dir.join(format!("root-{id}.key"));
            let cert_path = dir.join(format!("root-{id}.pem"));
            let key_pem = files::read_to_string(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::BadKey {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
            let cert_pem = files::read_to_string(&cert_path)?;
            let der = x509::certs_from_pem(&cert_pem)
                .map_err(|e| bad(format!("{}: {e}", cert_path.display())))?;
            let info =
                x509::parse(&der[0]).map_err(|e| bad(format!("{}: {e}", cert_path.display())))?;
            if info.spki != key.subject_public_key_info() {
                return Err(bad(format!("root {id}: key and certificate do not match")));
            }
            let issuer = Issuer::from_ca_cert_der(&der[0], key)?;
            let cross_path = dir.join(cross_file(id));
            let cross_pem = if cross_path.exists() {
                Some(files::read_to_string(&cross_path)?)
            } else {
                None
            };
            roots.push(Root {
                id,
                cert_pem,
                cross_pem,
                info,
                issuer,
            });
        }
        let tokens = JoinTokens::load(&dir.join(TOKENS_FILE))?;
        Ok(Self {
            dir,
            trust_domain: state.trust_domain,
            roots,
            current: state.current_root,
            next_root: state.next_root,
            tokens,
        })
    }

    /// Loads the CA, or creates it (single host: the agent is its own CA).
    pub fn load_or_init(state_dir: &Path, trust_domain: &str) -> Result<Self> {
        if state_dir.join(CA_DIR).join(STATE_FILE).exists() {
            Self::load(state_dir)
        } else {
            Self::init(state_dir, trust_domain)
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every active root, oldest first, with the cross-certificates of those made by
    /// rotation.
    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            roots_pem: self.roots.iter().map(|r| r.cert_pem.clone()).collect(),
            cross_signed_pem: self
                .roots
                .iter()
                .filter_map(|r| r.cross_pem.clone())
                .collect(),
        }
    }

    pub fn roots(&self) -> Vec<RootSummary> {
        self.roots
            .iter()
            .map(|r| RootSummary {
                id: r.id,
                current: r.id == self.current,
                serial: r.info.serial_hex.clone(),
                not_after: r.info.not_after,
            })
            .collect()
    }

    /// `hms-ctl node token create`: a single-use token, persisted (as a hash) before it is
    /// returned.
    pub fn create_join_token(
        &mut self,
        node_name: Option<&str>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JoinToken> {
        let token = self.tokens.create(node_name, ttl, now)?;
        self.tokens.save(&self.dir.join(TOKENS_FILE))?;
        Ok(token)
    }

    /// Join: checks the CSR, spends the token (persisted first), then signs. A bad CSR does
    /// not spend the token; a spent token cannot be reused even if signing then fails.
    pub fn redeem_and_sign(
        &mut self,
        token: &str,
        csr_pem: &str,
        node_name: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate> {
        let id = SpiffeId::node(&self.trust_domain, node_name)?;
        let public_key = parse_csr(csr_pem)?;
        let mut tokens = self.tokens.clone();
        tokens.redeem(token, node_name, now)?;
        tokens.save(&self.dir.join(TOKENS_FILE))?;
        self.tokens = tokens;
        self.issue(public_key, &id, now, ttl)
    }

    /// Renewal: the request must carry the node's current, still valid certificate (chained
    /// to an active root) and a signature over the new CSR by that certificate's key. The new
    /// certificate is for the same node.
    pub fn renew(
        &self,
        request: &RenewalRequest,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate> {
        let chain = x509::certs_from_pem(&request.current_chain_pem)
            .map_err(IdentityError::BadCertificate)?;
        let roots = self.trust_bundle().root_store()?;
        let id = super::tls::verify_node_chain(&chain, &roots, &self.trust_domain, now)
            .map_err(|e| IdentityError::BadCertificate(format!("current certificate: {e}")))?;
        let info = x509::parse(&chain[0]).map_err(IdentityError::BadCertificate)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &info.public_key)
            .verify(
                &renewal_message(&request.csr_pem),
                &request.proof_of_possession,
            )
            .map_err(|_| {
                IdentityError::BadCsr(
                    "renewal is not signed by the key of the presented certificate".into(),
                )
            })?;
        let public_key = parse_csr(&request.csr_pem)?;
        self.issue(public_key, &id, now, ttl)
    }

    /// Signs a node's CSR for `node_name`, valid from now for `ttl`. For callers that have
    /// authenticated the request themselves (the single-host bootstrap); joins go through
    /// [`redeem_and_sign`](Self::redeem_and_sign) and renewals through [`renew`](Self::renew).
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_name: &str,
        ttl: Duration,
    ) -> Result<IssuedCertificate> {
        self.sign_node_csr_at(csr_pem, node_name, ttl, SystemTime::now())
    }

    /// [`sign_node_csr`](Self::sign_node_csr) as if the time were `now`.
    pub fn sign_node_csr_at(
        &self,
        csr_pem: &str,
        node_name: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate> {
        let id = SpiffeId::node(&self.trust_domain, node_name)?;
        let public_key = parse_csr(csr_pem)?;
        self.issue(public_key, &id, now, ttl)
    }

    /// `hms-ctl ca rotate`, step 1: adds a new root, which signs from now on, and a
    /// cross-certificate for it signed by the root current until now (what lets every host
    /// accept it, see `trust.rs`); the old roots stay in the bundle. Publish the new bundle
    /// to every node before re-issuing.
    pub fn rotate(&mut self) -> Result<RootSummary> {
        self.add_root(SystemTime::now())?;
        self.save_state()?;
        Ok(self
            .roots()
            .into_iter()
            .find(|r| r.current)
            .expect("the current root is active"))
    }

    /// `hms-ctl ca rotate`, last step: drops every root but the current one from the bundle
    /// and deletes their keys. Certificates they signed stop being accepted once nodes have
    /// the new bundle. Returns the retired roots.
    pub fn retire_old(&mut self) -> Result<Vec<RootSummary>> {
        let retired: Vec<RootSummary> = self.roots().into_iter().filter(|r| !r.current).collect();
        if retired.is_empty() {
            return Ok(retired);
        }
        let current = self.current;
        self.roots.retain(|r| r.id == current);
        self.save_state()?;
        for r in &retired {
            for file in [format!("root-{}.key", r.id), format!("root-{}.pem", r.id)] {
                let path = self.dir.join(file);
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
            let cross = self.dir.join(cross_file(r.id));
            if cross.exists() {
                fs::remove_file(&cross).map_err(io_err("remove", &cross))?;
            }
        }
        Ok(retired)
    }

    fn current_root(&self) -> &Root {
        self.roots
            .iter()
            .find(|r| r.id == self.current)
            .expect("the current root is active")
    }

    fn add_root(&mut self, now: SystemTime) -> Result<()> {
        let id = self.next_root;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::OrganizationName,
            format!("HMS mesh {}", self.trust_domain),
        );
        dn.push(DnType::CommonName, format!("HMS root {id}"));
        params.distinguished_name = dn;
        // Path length 0: a root signs node certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + DEFAULT_ROOT_TTL).into();
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let info = x509::parse(cert.der()).map_err(IdentityError::BadCertificate)?;
        // A rotation: the root current until now vouches for the new one with an ordinary
        // X.509 cross-certificate (same subject and key, issued by the old root).
        let cross_pem = match self.roots.iter().find(|r| r.id == self.current) {
            Some(old) => {
                let mut cross = params.clone();
                cross.serial_number = Some(random_serial()?);
                cross.not_after = info.not_after.min(old.info.not_after).into();
                cross.use_authority_key_identifier_extension = true;
                Some(cross.signed_by(&key, &old.issuer)?.pem())
            }
            None => None,
        };
        files::write_atomic(
            &self.dir.join(format!("root-{id}.key")),
            key.serialize_pem().as_bytes(),
            SECRET_MODE,
        )?;
        files::write_atomic(
            &self.dir.join(format!("root-{id}.pem")),
            cert_pem.as_bytes(),
            PUBLIC_MODE,
        )?;
        if let Some(cross) = &cross_pem {
            files::write_atomic(
                &self.dir.join(cross_file(id)),
                cross.as_bytes(),
                PUBLIC_MODE,
            )?;
        }
        self.roots.push(Root {
            id,
            cert_pem,
            cross_pem,
            info,
            issuer: Issuer::new(params, key),
        });
        self.current = id;
        self.next_root = id + 1;
        Ok(())
    }

    fn save_state(&self) -> Result<()> {
        let state = CaStateFile {
            trust_domain: self.trust_domain.clone(),
            active_roots: self.roots.iter().map(|r| r.id).collect(),
            current_root: self.current,
            next_root: self.next_root,
        };
        let json = serde_json::to_vec_pretty(&state).expect("CA state serialises");
        files::write_atomic(&self.dir.join(STATE_FILE), &json, PUBLIC_MODE)?;
        files::write_atomic(
            &self.dir.join(BUNDLE_FILE),
            self.trust_bundle().to_pem().as_bytes(),
            PUBLIC_MODE,
        )
    }

    /// The one place certificates are made. `id` is decided by the caller, never read from
    /// a request.
    pub(crate) fn issue(
        &self,
        public_key: rcgen::PublicKey,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCertificate> {
        if ttl < Duration::from_secs(60) {
            return Err(IdentityError::BadCsr(
                "certificate lifetime must be at least 60 s".into(),
            ));
        }
        let root = self.current_root();
        let not_before = now - CLOCK_SKEW;
        // A certificate never outlives the root that signed it.
        let not_after = (now + ttl).min(root.info.not_after);
        let mut params = CertificateParams::default();
        // Empty subject: the identity is the URI SAN alone (rcgen then marks the SAN
        // critical, as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial()?);
        let request = CertificateSigningRequestParams { params, public_key };
        let cert = request.signed_by(&root.issuer)?;
        let info = x509::parse(cert.der()).map_err(IdentityError::BadCertificate)?;
        Ok(IssuedCertificate {
            spiffe_id: id.clone(),
            chain_pem: cert.pem(),
            serial: info.serial_hex,
            not_before: info.not_before,
            not_after: info.not_after,
            trust_bundle: self.trust_bundle(),
        })
    }
}

fn cross_file(root_id: u32) -> String {
    format!("root-{root_id}.cross.pem")
}

/// The public key of a CSR whose self-signature verifies. Everything else in it is ignored.
pub(crate) fn parse_csr(csr_pem: &str) -> Result<rcgen::PublicKey> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| IdentityError::BadCsr(format!("not a valid signed CSR: {e}")))?;
    Ok(csr.public_key)
}

pub(crate) fn renewal_message(csr_pem: &str) -> Vec<u8> {
    let mut msg = RENEWAL_SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(csr_pem.as_bytes());
    msg
}

/// 128 random bits, positive (top bit clear) as RFC 5280 asks.
pub(crate) fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; SERIAL_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Token(super::TokenError::Random))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6; // never a leading zero byte, so the encoding is always 16 bytes
    Ok(SerialNumber::from_slice(&bytes))
}
