//! Client certificates at the door. A listener whose routes name `client_cert`
//! authenticators asks every client for a certificate without requiring one
//! ([`listener_verifier`]): the handshake checks that a presented chain leads to one of
//! those CAs and that the client holds the key, and routes without client-cert auth keep
//! working on the same listener. Each route then checks that the chain leads to *its*
//! authenticator's CA ([`ClientCertAuth::authenticate`]). Owns the CA files' roots and the
//! subject a certificate names; never reads a certificate's private key.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::reject::{Rejection, quoted};

#[derive(Debug)]
pub struct ClientCertAuth {
    name: String,
    roots: Vec<CertificateDer<'static>>,
    /// Verifies against this authenticator's CA alone.
    verifier: Arc<dyn ClientCertVerifier>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn store(roots: &[CertificateDer<'static>]) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .context("a certificate in the CA file is not a usable CA certificate")?;
    }
    Ok(store)
}

impl ClientCertAuth {
    pub fn compile(name: &str, ca: &Path) -> anyhow::Result<ClientCertAuth> {
        let pem = std::fs::read(ca).with_context(|| {
            format!(
                "authenticator {name}: cannot read its CA file {}",
                ca.display()
            )
        })?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .with_context(|| format!("authenticator {name}: {} is not PEM", ca.display()))?;
        if roots.is_empty() {
            anyhow::bail!(
                "authenticator {name}: {} holds no certificate (expected the CA's PEM `BEGIN CERTIFICATE`)",
                ca.display()
            );
        }
        let store =
            store(&roots).with_context(|| format!("authenticator {name}: {}", ca.display()))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .with_context(|| format!("authenticator {name}: {}", ca.display()))?;
        Ok(ClientCertAuth {
            name: name.into(),
            roots,
            verifier,
        })
    }

    /// The certificate's subject, or the 401/403 to answer.
    pub fn authenticate(&self, chain: &[CertificateDer<'static>]) -> Result<String, Rejection> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Rejection::Unauthorized {
                reason: "client-cert-required",
                challenge: format!("ClientCertificate realm={}", quoted(&self.name)),
                message: format!(
                    "hms: this route needs a TLS client certificate issued by the `{}` CA; connect over HTTPS with one (curl --cert FILE --key FILE)",
                    self.name
                ),
            });
        };
        if let Err(e) = self
            .verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
        {
            return Err(Rejection::Forbidden {
                reason: "client-cert-untrusted",
                message: format!(
                    "hms: the client certificate is not one the `{}` CA issued for this route ({e})",
                    self.name
                ),
            });
        }
        subject(leaf).ok_or_else(|| Rejection::Forbidden {
            reason: "client-cert-untrusted",
            message: "hms: the client certificate names no subject (no CN, DNS or URI name)".into(),
        })
    }
}

/// The certificate's subject CN, else its first DNS or URI SAN.
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some(d.to_string()),
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    })
}

/// The verifier for a listener whose routes use these client-cert authenticators: asks for a
/// certificate from any of their CAs, requires none. `None` when there are none (the
/// listener then asks for no certificate at all).
pub fn listener_verifier<'a>(
    authenticators: impl IntoIterator<Item = &'a ClientCertAuth>,
) -> Option<Arc<dyn ClientCertVerifier>> {
    let mut roots = Vec::new();
    for a in authenticators {
        roots.extend(a.roots.iter().cloned());
    }
    if roots.is_empty() {
        return None;
    }
    // Each root was accepted by `store` when its authenticator compiled.
    let store = store(&roots).ok()?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
        params: CertificateParams,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.clone().self_signed(&key).unwrap();
        Ca { cert, key, params }
    }

    fn leaf(ca: &Ca, cn: Option<&str>, dns: &str) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec![dns.to_string()]).unwrap();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        } else {
            params.distinguished_name = rcgen::DistinguishedName::new();
        }
        params.subject_alt_names = vec![SanType::DnsName(dns.try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        params.signed_by(&key, &issuer).unwrap().der().clone()
    }

    fn compiled(name: &str, ca: &Ca) -> (tempfile::TempDir, ClientCertAuth) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let auth = ClientCertAuth::compile(name, &path).unwrap();
        (dir, auth)
    }

    #[test]
    fn a_certificate_from_the_named_ca_names_its_subject_and_one_from_another_is_403() {
        let staff = ca("staff CA");
        let partners = ca("partners CA");
        let (_d1, staff_auth) = compiled("staff", &staff);
        let (_d2, partner_auth) = compiled("partners", &partners);
        let alice = leaf(&staff, Some("alice"), "alice.staff.example");
        assert_eq!(
            staff_auth
                .authenticate(std::slice::from_ref(&alice))
                .unwrap(),
            "alice"
        );
        let no_cn = leaf(&staff, None, "bob.staff.example");
        assert_eq!(
            staff_auth.authenticate(&[no_cn]).unwrap(),
            "bob.staff.example"
        );
        let r = partner_auth.authenticate(&[alice]).unwrap_err();
        assert_eq!(
            (r.status().as_u16(), r.reason()),
            (403, "client-cert-untrusted")
        );
        let r = staff_auth.authenticate(&[]).unwrap_err();
        assert_eq!(
            (r.status().as_u16(), r.reason()),
            (401, "client-cert-required")
        );
        // Garbage where a certificate belongs is refused, not a panic.
        let r = staff_auth
            .authenticate(&[CertificateDer::from(b"not a certificate".to_vec())])
            .unwrap_err();
        assert_eq!(r.status(), 403);
        assert!(listener_verifier([&staff_auth, &partner_auth]).is_some());
        assert!(listener_verifier(std::iter::empty()).is_none());
        assert!(
            !listener_verifier([&staff_auth])
                .unwrap()
                .client_auth_mandatory()
        );
    }

    #[test]
    fn a_missing_or_garbage_ca_file_is_a_clear_compile_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = ClientCertAuth::compile("staff", &dir.path().join("none.pem")).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read its CA file"),
            "{e:#}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello").unwrap();
        let e = ClientCertAuth::compile("staff", &garbage).unwrap_err();
        assert!(format!("{e:#}").contains("holds no certificate"), "{e:#}");
    }
}
