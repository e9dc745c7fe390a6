//! The registry's own small PKI: the certificates etcd and its clients present to each
//! other. Owns `<state-dir>/ca/etcd-ca.{pem,key}` on the CA host and the certificates it
//! signs; never a mesh (SPIFFE) identity: nothing it signs is accepted on `:15008`, and no
//! mesh certificate is accepted by etcd.
//!
//! Why a CA of its own instead of the mesh roots: etcd reads its trusted CA file once at
//! start, while the mesh roots rotate (`hms-ctl ca rotate`) and node certificates live a day.
//! An etcd credential is revoked by deleting the etcd user its certificate names (its CN;
//! see `registry/etcd/access.rs`), so it can live long without staying valid after removal.
//!
//! | certificate | CN | made by |
//! | --- | --- | --- |
//! | etcd's server certificate | `hms-etcd` (SANs: its addresses) | `hms-node-agent init-mesh` |
//! | the operator's | `root` (etcd's administrator) | `init-mesh`, kept in the CA host's `etcd/` dir |
//! | a joining host's bootstrap | `hms-join-<node>` (may write only its join request) | `node token create`, carried in the token |
//! | a member host's | `<node>` (its own records, its placed services) | the CA, from the host's CSR at join |

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::files::{self, PUBLIC_MODE, SECRET_MODE};
use super::{IdentityError, Result};

const CERT_FILE: &str = "etcd-ca.pem";
const KEY_FILE: &str = "etcd-ca.key";
/// The etcd CA and the certificates it signs live this long: revocation is by etcd user.
const LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The CN (etcd user) of a joining host's bootstrap credential.
pub fn join_user(node: &str) -> String {
    format!("hms-join-{node}")
}

/// A PEM certificate with the PEM key it was made for.
#[derive(Debug, Clone)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where a host keeps its etcd client credential: `<state-dir>/etcd/{ca.pem,client.pem,client.key}`.
#[derive(Debug, Clone)]
pub struct CredentialFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CredentialFiles {
    pub const DIR: &'static str = "etcd";

    pub fn under(state_dir: &Path) -> CredentialFiles {
        let dir = state_dir.join(Self::DIR);
        CredentialFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("client.pem"),
            key: dir.join("client.key"),
        }
    }

    pub fn exist(&self) -> bool {
        self.ca.exists() && self.cert.exists() && self.key.exists()
    }

    /// Writes the three files (key 0600, in a 0700 directory).
    pub fn write(&self, ca_pem: &str, cred: &Credential) -> Result<()> {
        if let Some(dir) = self.key.parent() {
            files::ensure_dir(dir)?;
        }
        files::write_atomic(&self.ca, ca_pem.as_bytes(), PUBLIC_MODE)?;
        files::write_atomic(&self.key, cred.key_pem.as_bytes(), SECRET_MODE)?;
        files::write_atomic(&self.cert, cred.cert_pem.as_bytes(), PUBLIC_MODE)
    }
}

pub struct EtcdCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl EtcdCa {
    /// Loads the etcd CA from the CA dir, making it on first use.
    pub fn load_or_create(ca_dir: &Path, trust_domain: &str) -> Result<EtcdCa> {
        let (cert_path, key_path) = (ca_dir.join(CERT_FILE), ca_dir.join(KEY_FILE));
        if cert_path.exists() && key_path.exists() {
            let cert_pem = files::read_to_string(&cert_path)?;
            let key = KeyPair::from_pem(&files::read_to_string(&key_path)?)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
            return Ok(EtcdCa { cert_pem, issuer });
        }
        files::ensure_dir(ca_dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, format!("HMS mesh {trust_domain}"));
        dn.push(DnType::CommonName, "HMS registry CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + LIFETIME).into();
        params.serial_number = Some(super::ca::random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        files::write_atomic(&key_path, key.serialize_pem().as_bytes(), SECRET_MODE)?;
        files::write_atomic(&cert_path, cert_pem.as_bytes(), PUBLIC_MODE)?;
        let issuer = Issuer::new(params, key);
        Ok(EtcdCa { cert_pem, issuer })
    }

    /// What etcd's `--trusted-ca-file` and every client's CA file hold.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// etcd's server certificate for `addresses` (IPs or DNS names; `127.0.0.1`,
    /// `::1` and `localhost` are always included). Also a client certificate, as etcd uses
    /// it towards its own gateway.
    pub fn server(&self, addresses: &[String]) -> Result<Credential> {
        let mut sans: Vec<SanType> = vec![
            SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
            SanType::IpAddress(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into()?),
        ];
        for a in addresses {
            let san = match a.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(a.as_str().try_into().map_err(|_| {
                    IdentityError::BadCsr(format!("`{a}` is neither an IP address nor a DNS name"))
                })?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let key = KeyPair::generate()?;
        let mut params = self.leaf("hms-etcd");
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client credential for etcd user `user`, key made here (the operator's own, and a
    /// joining host's bootstrap, which travels inside the join token).
    pub fn client(&self, user: &str, ttl: Option<Duration>) -> Result<Credential> {
        let key = KeyPair::generate()?;
        let mut params = self.client_params(user);
        if let Some(ttl) = ttl {
            params.not_after = (SystemTime::now() + ttl).into();
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A member host's client certificate for the key of its CSR (the key never leaves the
    /// host).
    pub fn sign_client_csr(&self, csr_pem: &str, user: &str) -> Result<String> {
        let public_key = super::ca::parse_csr(csr_pem)?;
        let request = CertificateSigningRequestParams {
            params: self.client_params(user),
            public_key,
        };
        Ok(request.signed_by(&self.issuer)?.pem())
    }

    fn client_params(&self, user: &str) -> CertificateParams {
        let mut params = self.leaf(user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
    }

    fn leaf(&self, common_name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // etcd takes the user name from the CN of a verified client certificate.
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + LIFETIME).into();
        params.serial_number = super::ca::random_serial().ok();
        params
    }
}

/// A fresh key and a CSR for it (a joining host's etcd credential).
pub fn new_key_and_csr() -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_carry_the_etcd_user_as_cn() {
        let dir = tempfile::tempdir().unwrap();
        let ca = EtcdCa::load_or_create(dir.path(), "t.mesh").unwrap();
        let again = EtcdCa::load_or_create(dir.path(), "t.mesh").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let (key, csr) = new_key_and_csr().unwrap();
        let pem = ca.sign_client_csr(&csr, "host-b").unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, ["host-b"]);
        assert!(KeyPair::from_pem(&key).is_ok());
        let server = ca
            .server(&["10.0.0.1".into(), "etcd.example".into()])
            .unwrap();
        assert!(server.cert_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(join_user("host-c"), "hms-join-host-c");
    }
}
