//! Which roots a host trusts, and when it may trust a new one. Owns the rule that a trust
//! bundle from the registry is never believed on its own: a host moves from the bundle it
//! trusts to another one only if every root of the other one is already trusted, or is
//! endorsed by an X.509 cross-certificate (the new root's subject and public key, issued and
//! signed by a trusted root) in that bundle. Retirement (a bundle with fewer roots) passes
//! because every remaining root is trusted. Also the pure helpers the join flow uses to pin
//! the CA: [`root_fingerprint`], [`TrustBundle::contains_root`],
//! [`IssuedCertificate::chains_to_root`], [`IssuedCertificate::pinned_trust_bundle`].
//!
//! It must never widen trust by anything but a signature made by a key the host already
//! trusts, and never hand-roll signature checks: parsing and signature verification are
//! x509-parser's (`verify`, ring underneath), chain checks webpki's.

use std::fmt;
use std::time::SystemTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::time::ASN1Time;

use super::ca::{IssuedCertificate, TrustBundle};
use super::{IdentityError, Result, x509};

/// `sha256:<lowercase hex>` of a root certificate's DER: how a join token names the CA it
/// pins (as kubeadm's discovery hash does, but over the whole certificate).
pub fn root_fingerprint(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        super::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
    )
}

/// Why a host did not move to a trust bundle: the first root it could not accept and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRefused {
    /// [`root_fingerprint`] of the refused root (of the bundle's first root when the whole
    /// bundle is refused, e.g. for its trust domain).
    pub root_fingerprint: String,
    pub reason: String,
}

impl fmt::Display for BundleRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "root {}: {}", self.root_fingerprint, self.reason)
    }
}

impl std::error::Error for BundleRefused {}

impl TrustBundle {
    /// The [`root_fingerprint`] of every root, in bundle order.
    pub fn root_fingerprints(&self) -> Vec<String> {
        self.roots_der()
            .iter()
            .map(|d| root_fingerprint(d))
            .collect()
    }

    /// Whether one of the roots has this [`root_fingerprint`] (`sha256:<hex>`; the hex is
    /// compared case-insensitively).
    pub fn contains_root(&self, fingerprint: &str) -> bool {
        self.root_fingerprints()
            .iter()
            .any(|f| f.eq_ignore_ascii_case(fingerprint.trim()))
    }

    /// Whether a host that trusts `self` may install `next` in its place, at `now`. `Ok`
    /// when both are for the same trust domain and every root of `next` is one of `self`'s,
    /// or is endorsed by a cross-certificate in `next` that is valid now, a CA certificate,
    /// carries exactly the endorsed root's subject and public key, and is signed by a root
    /// already accepted (one of `self`'s, or one endorsed that way: successive rotations
    /// chain). A bundle that only drops roots is accepted.
    pub fn admits(&self, next: &TrustBundle, now: SystemTime) -> Result<(), BundleRefused> {
        match self.sort_roots(next, now)?.1 {
            None => Ok(()),
            Some(refused) => Err(refused),
        }
    }

    /// The part of `next` that `self` vouches for (as in [`admits`](Self::admits)): its
    /// roots that `self` trusts or endorses, in `next`'s order, with `next`'s
    /// cross-certificates. For a host that must take some bundle now, e.g. a joining host
    /// whose token pinned one root while a rotation is under way. Errors when nothing of it
    /// is vouched for, or it is for another trust domain.
    pub fn vouched_part_of(
        &self,
        next: &TrustBundle,
        now: SystemTime,
    ) -> Result<TrustBundle, BundleRefused> {
        let (accepted, refused) = self.sort_roots(next, now)?;
        let roots_pem: Vec<String> = next
            .roots_der()
            .iter()
            .filter(|d| accepted.iter().any(|a| a.as_slice() == d.as_ref()))
            .map(|d| x509::cert_to_pem(d))
            .collect();
        if roots_pem.is_empty() {
            return Err(refused.unwrap_or(BundleRefused {
                root_fingerprint: String::new(),
                reason: "no root of it is vouched for".into(),
            }));
        }
        Ok(TrustBundle {
            trust_domain: next.trust_domain.clone(),
            roots_pem,
            cross_signed_pem: next.cross_signed_pem.clone(),
        })
    }

    /// The roots of `next` that `self` vouches for (DER), and the first one it does not,
    /// with why. Errors for a bundle that is wrong as a whole.
    fn sort_roots(
        &self,
        next: &TrustBundle,
        now: SystemTime,
    ) -> Result<(Vec<Vec<u8>>, Option<BundleRefused>), BundleRefused> {
        let next_roots = next.roots_der();
        let first_fp = || {
            next_roots
                .first()
                .map(|d| root_fingerprint(d))
                .unwrap_or_default()
        };
        if next.trust_domain != self.trust_domain {
            return Err(BundleRefused {
                root_fingerprint: first_fp(),
                reason: format!(
                    "the bundle is for trust domain {:?}, this host is in {:?}",
                    next.trust_domain, self.trust_domain
                ),
            });
        }
        // A bundle that came through serde skipped `TrustBundle::new`'s checks.
        if let Err(e) = next.validate() {
            return Err(BundleRefused {
                root_fingerprint: first_fp(),
                reason: e.to_string(),
            });
        }
        let mut accepted: Vec<Vec<u8>> = self.roots_der().iter().map(|d| d.to_vec()).collect();
        let mut pending: Vec<Vec<u8>> = next_roots
            .iter()
            .map(|d| d.to_vec())
            .filter(|d| !accepted.contains(d))
            .collect();
        let crosses: Vec<Vec<u8>> = next
            .cross_signed_pem
            .iter()
            .filter_map(|p| x509::certs_from_pem(p).ok())
            .flatten()
            .map(|d| d.to_vec())
            .collect();
        let asn1_now = ASN1Time::from_timestamp(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        )
        .map_err(|e| BundleRefused {
            root_fingerprint: first_fp(),
            reason: format!("the clock is unusable: {e}"),
        })?;
        // Until nothing changes: a root endorsed by a root accepted in this pass can itself
        // endorse the next one.
        loop {
            let before = pending.len();
            let mut still = Vec::new();
            for root in pending {
                match endorsement(&root, &crosses, &accepted, asn1_now) {
                    Ok(()) => accepted.push(root),
                    Err(_) => still.push(root),
                }
            }
            pending = still;
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        let refused = pending.first().map(|root| BundleRefused {
            root_fingerprint: root_fingerprint(root),
            reason: endorsement(root, &crosses, &accepted, asn1_now)
                .err()
                .unwrap_or_else(|| "it is not trusted".into()),
        });
        let in_next: Vec<Vec<u8>> = accepted
            .into_iter()
            .filter(|a| next_roots.iter().any(|d| d.as_ref() == a.as_slice()))
            .collect();
        Ok((in_next, refused))
    }
}

/// `Ok` when one of `crosses` endorses `root` with a signature by one of `accepted`; else
/// the most telling reason none does.
fn endorsement(
    root: &[u8],
    crosses: &[Vec<u8>],
    accepted: &[Vec<u8>],
    now: ASN1Time,
) -> Result<(), String> {
    let root = parse(root).map_err(|e| format!("it is not a certificate: {e}"))?;
    let trusted: Vec<X509Certificate<'_>> = accepted.iter().filter_map(|d| parse(d).ok()).collect();
    let mut reason = "this host does not trust it, and the bundle carries no cross-certificate \
                      for it (a root added by `hms-ctl ca rotate` always has one)"
        .to_string();
    for der in crosses {
        let Ok(cross) = parse(der) else { continue };
        if cross.subject().as_raw() != root.subject().as_raw()
            || cross.public_key().raw != root.public_key().raw
        {
            continue;
        }
        if !cross.is_ca() {
            reason = "its cross-certificate is not a CA certificate".into();
            continue;
        }
        if !cross.validity().is_valid_at(now) {
            reason = "its cross-certificate is expired or not yet valid".into();
            continue;
        }
        let signed_by_trusted = trusted.iter().any(|t| {
            t.subject().as_raw() == cross.issuer().as_raw()
                && cross.verify_signature(Some(t.public_key())).is_ok()
        });
        if signed_by_trusted {
            return Ok(());
        }
        reason = format!(
            "its cross-certificate (issuer {}) is not signed by any root this host trusts",
            cross.issuer()
        );
    }
    Err(reason)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(cert)
}

impl IssuedCertificate {
    /// `Ok` when this certificate's chain verifies (webpki, at `now`, as a node certificate
    /// of its trust domain) up to the root with this [`root_fingerprint`], and that root is
    /// in the bundle it came with. The join flow calls it with the fingerprint pinned by the
    /// token, before installing anything.
    pub fn chains_to_root(&self, fingerprint: &str, now: SystemTime) -> Result<()> {
        let root = self
            .trust_bundle
            .roots_der()
            .into_iter()
            .find(|d| root_fingerprint(d).eq_ignore_ascii_case(fingerprint.trim()))
            .ok_or_else(|| {
                IdentityError::BadBundle(format!(
                    "it has no root with fingerprint {fingerprint} (its roots: {}); the \
                     registry answered for another CA: check the token and the CA host",
                    self.trust_bundle.root_fingerprints().join(", ")
                ))
            })?;
        let mut store = rustls::RootCertStore::empty();
        store
            .add(root)
            .map_err(|e| IdentityError::BadBundle(format!("root rejected: {e}")))?;
        let chain = x509::certs_from_pem(&self.chain_pem).map_err(IdentityError::BadCertificate)?;
        super::tls::verify_node_chain(&chain, &store, self.trust_bundle.trust_domain(), now)
            .map_err(|e| {
                IdentityError::BadCertificate(format!(
                    "it does not chain to the root {fingerprint}: {e}"
                ))
            })?;
        Ok(())
    }

    /// For the join flow, the bundle to install when the token pinned the root
    /// `fingerprint`: the part of the answer's bundle that root vouches for
    /// ([`TrustBundle::vouched_part_of`]: the pinned root and the roots it cross-signed,
    /// never a root someone else added beside it), `Ok` only when this certificate's chain
    /// verifies up to one of those. A token made before a rotation (pinning the old root)
    /// thus accepts a certificate of the new one; a root older than the pinned one, still in
    /// the bundle during a rotation, is left out (nothing the token names vouches for it).
    pub fn pinned_trust_bundle(&self, fingerprint: &str, now: SystemTime) -> Result<TrustBundle> {
        let root = self
            .trust_bundle
            .roots_der()
            .into_iter()
            .find(|d| root_fingerprint(d).eq_ignore_ascii_case(fingerprint.trim()))
            .ok_or_else(|| {
                IdentityError::BadBundle(format!(
                    "it has no root with fingerprint {fingerprint} (its roots: {}); the \
                     registry answered for another CA: check the token and the CA host",
                    self.trust_bundle.root_fingerprints().join(", ")
                ))
            })?;
        let pinned = TrustBundle::new(
            self.trust_bundle.trust_domain(),
            vec![x509::cert_to_pem(&root)],
        )?;
        let vouched = pinned
            .vouched_part_of(&self.trust_bundle, now)
            .map_err(|e| IdentityError::BadBundle(e.to_string()))?;
        let chain = x509::certs_from_pem(&self.chain_pem).map_err(IdentityError::BadCertificate)?;
        super::tls::verify_node_chain(&chain, &vouched.root_store()?, vouched.trust_domain(), now)
            .map_err(|e| {
                IdentityError::BadCertificate(format!(
                    "it does not chain to the root {fingerprint} or a root it cross-signed: {e}"
                ))
            })?;
        Ok(vouched)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };

    use super::*;
    use crate::identity::{CertificateAuthority, NodeIdentity};

    const DOMAIN: &str = "mesh.test";

    fn new_ca(domain: &str) -> (tempfile::TempDir, CertificateAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), domain).unwrap();
        (dir, ca)
    }

    /// A root made the way an attacker would: the CA's naming, its own key.
    fn root_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, format!("HMS mesh {DOMAIN}"));
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
    }

    fn forged_root(cn: &str) -> (CertificateParams, KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = root_params(cn);
        let pem = params.self_signed(&key).unwrap().pem();
        (params, key, pem)
    }

    fn der_of(pem: &str) -> Vec<u8> {
        x509::certs_from_pem(pem).unwrap()[0].to_vec()
    }

    fn with_root(bundle: &TrustBundle, extra_pem: &str, cross: Vec<String>) -> TrustBundle {
        let mut roots = bundle.roots_pem.clone();
        roots.push(extra_pem.to_string());
        let mut all_cross = bundle.cross_signed_pem.clone();
        all_cross.extend(cross);
        TrustBundle::new(bundle.trust_domain(), roots)
            .unwrap()
            .with_cross_signed(all_cross)
            .unwrap()
    }

    #[test]
    fn two_rotations_in_a_row_are_accepted_through_their_cross_signatures() {
        let (dir, mut ca) = new_ca(DOMAIN);
        let now = SystemTime::now();
        let b0 = ca.trust_bundle();
        assert!(b0.cross_signed_pem.is_empty(), "the first root needs none");

        ca.rotate().unwrap();
        let b1 = ca.trust_bundle();
        assert_eq!((b1.len(), b1.cross_signed_pem.len()), (2, 1));
        b0.admits(&b1, now)
            .expect("root 2 is cross-signed by root 1");
        // The cross-certificate survives a restart of the CA.
        assert_eq!(
            CertificateAuthority::load(dir.path())
                .unwrap()
                .trust_bundle(),
            b1
        );

        ca.retire_old().unwrap();
        let b2 = ca.trust_bundle();
        assert_eq!(b2.len(), 1);
        b1.admits(&b2, now).expect("retirement only drops a root");

        // The second rotation by a CA loaded from disk (its issuer is rebuilt from the
        // root's certificate, not the parameters it was made with).
        let mut ca = CertificateAuthority::load(dir.path()).unwrap();
        ca.rotate().unwrap();
        let b3 = ca.trust_bundle();
        b2.admits(&b3, now)
            .expect("root 3 is cross-signed by root 2");
        ca.retire_old().unwrap();
        let b4 = ca.trust_bundle();
        b3.admits(&b4, now).expect("second retirement");
        assert!(!dir.path().join("ca/root-2.cross.pem").exists());

        // A host that slept through both rotations trusts root 1 only: root 3 is endorsed
        // by root 2, which it never accepted, so it cannot follow (it must re-join).
        let missed = b0.admits(&b4, now).unwrap_err();
        assert_eq!(missed.root_fingerprint, b4.root_fingerprints()[0]);
        assert!(
            missed
                .reason
                .contains("not signed by any root this host trusts"),
            "{missed}"
        );
        // Both rotations' bundles at once, seen by a root-1 host: chained endorsements.
        let both = TrustBundle::new(
            DOMAIN,
            vec![
                b1.roots_pem[0].clone(),
                b1.roots_pem[1].clone(),
                b4.roots_pem[0].clone(),
            ],
        )
        .unwrap()
        .with_cross_signed(vec![
            b1.cross_signed_pem[0].clone(),
            b4.cross_signed_pem[0].clone(),
        ])
        .unwrap();
        b0.admits(&both, now).expect("root 1 -> root 2 -> root 3");
    }

    #[test]
    fn a_forged_root_without_a_cross_certificate_is_refused() {
        let (_dir, ca) = new_ca(DOMAIN);
        let trusted = ca.trust_bundle();
        let (_, _, forged) = forged_root("HMS root 2");
        let next = with_root(&trusted, &forged, vec![]);
        let refused = trusted.admits(&next, SystemTime::now()).unwrap_err();
        assert_eq!(refused.root_fingerprint, root_fingerprint(&der_of(&forged)));
        assert!(refused.reason.contains("no cross-certificate"), "{refused}");
        // Replacing the bundle outright with the forged root is refused too.
        let only = TrustBundle::new(DOMAIN, vec![forged]).unwrap();
        assert!(trusted.admits(&only, SystemTime::now()).is_err());
    }

    #[test]
    fn a_cross_certificate_signed_by_the_forged_root_itself_or_naming_a_real_issuer_is_refused() {
        let (_dir, ca) = new_ca(DOMAIN);
        let trusted = ca.trust_bundle();
        let now = SystemTime::now();
        let (params, key, forged) = forged_root("HMS root 2");

        // 1. Cross-signed by itself (a second self-signed copy in the cross list).
        let self_issuer = Issuer::new(
            params.clone(),
            KeyPair::from_pem(&key.serialize_pem()).unwrap(),
        );
        let self_cross = params.signed_by(&key, &self_issuer).unwrap().pem();
        let refused = trusted
            .admits(&with_root(&trusted, &forged, vec![self_cross]), now)
            .unwrap_err();
        assert_eq!(refused.root_fingerprint, root_fingerprint(&der_of(&forged)));
        assert!(
            refused.reason.contains("not signed by any root"),
            "{refused}"
        );

        // 2. Issuer name copied from the real root, signed by the attacker's key: the name
        // matches, the signature does not.
        let real_dn = root_params("HMS root 1");
        let attacker = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let fake_issuer = Issuer::new(real_dn, attacker);
        let named_cross = params.signed_by(&key, &fake_issuer).unwrap().pem();
        let cross_der = der_of(&named_cross);
        let (_, parsed) = x509_parser::parse_x509_certificate(&cross_der).unwrap();
        let real_der = trusted.roots_der()[0].to_vec();
        let (_, real) = x509_parser::parse_x509_certificate(&real_der).unwrap();
        assert_eq!(
            parsed.issuer().as_raw(),
            real.subject().as_raw(),
            "the test forges the name"
        );
        let refused = trusted
            .admits(&with_root(&trusted, &forged, vec![named_cross]), now)
            .unwrap_err();
        assert!(
            refused.reason.contains("not signed by any root"),
            "{refused}"
        );

        // 3. A real cross-certificate of another root does not endorse the forged one.
        let (_d2, mut other) = new_ca(DOMAIN);
        other.rotate().unwrap();
        let foreign_cross = other.trust_bundle().cross_signed_pem;
        let refused = trusted
            .admits(&with_root(&trusted, &forged, foreign_cross), now)
            .unwrap_err();
        assert!(refused.reason.contains("no cross-certificate"), "{refused}");
    }

    #[test]
    fn an_expired_cross_certificate_endorses_nothing() {
        let (_dir, mut ca) = new_ca(DOMAIN);
        let b0 = ca.trust_bundle();
        ca.rotate().unwrap();
        let later =
            SystemTime::now() + crate::identity::DEFAULT_ROOT_TTL + Duration::from_secs(86400);
        let refused = b0.admits(&ca.trust_bundle(), later).unwrap_err();
        assert!(refused.reason.contains("expired"), "{refused}");
    }

    #[test]
    fn a_bundle_of_another_trust_domain_is_refused() {
        let (_dir, ca) = new_ca(DOMAIN);
        let trusted = ca.trust_bundle();
        let (_d2, other) = new_ca("other.test");
        let refused = trusted
            .admits(&other.trust_bundle(), SystemTime::now())
            .unwrap_err();
        assert!(refused.reason.contains("other.test"), "{refused}");
        // The same roots relabelled for another domain: refused as well.
        let relabelled = TrustBundle::new("other.test", trusted.roots_pem.clone()).unwrap();
        assert!(trusted.admits(&relabelled, SystemTime::now()).is_err());
        // And the unchanged bundle is admitted (the refusals above are not blanket ones).
        trusted.admits(&trusted, SystemTime::now()).unwrap();
    }

    #[test]
    fn root_fingerprint_is_sha256_of_the_der_and_bundles_find_roots_by_it() {
        let (_dir, ca) = new_ca(DOMAIN);
        let bundle = ca.trust_bundle();
        let der = bundle.roots_der()[0].to_vec();
        let fp = root_fingerprint(&der);
        let hex = fp.strip_prefix("sha256:").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_eq!(
            hex,
            crate::identity::hex(ring::digest::digest(&ring::digest::SHA256, &der).as_ref())
        );
        assert!(bundle.contains_root(&fp));
        assert!(bundle.contains_root(&fp.to_uppercase().replace("SHA256:", "sha256:")));
        let (_d2, other) = new_ca(DOMAIN);
        assert!(!bundle.contains_root(&other.trust_bundle().root_fingerprints()[0]));
        assert!(!bundle.contains_root("sha256:"));
    }

    #[test]
    fn a_joining_host_keeps_only_what_its_pinned_root_vouches_for() {
        let (dir, mut ca) = new_ca(DOMAIN);
        let now = SystemTime::now();
        let r1 = ca.trust_bundle().root_fingerprints()[0].clone();
        let mut node = NodeIdentity::load_or_create(dir.path(), DOMAIN, "host-b").unwrap();
        // An answer carrying the real root and a forged one beside it.
        let mut issued = ca
            .sign_node_csr(
                &node.create_csr().unwrap(),
                "host-b",
                Duration::from_secs(3600),
            )
            .unwrap();
        let (_, _, forged) = forged_root("HMS root 2");
        issued.trust_bundle = with_root(&issued.trust_bundle, &forged, vec![]);
        let kept = issued.pinned_trust_bundle(&r1, now).unwrap();
        assert_eq!(kept.root_fingerprints(), vec![r1.clone()]);

        // Mid-rotation, a token made before it (pins root 1): both roots, root 2 through
        // its cross-certificate. A token made after it pins root 2, which vouches for
        // nothing older.
        ca.rotate().unwrap();
        let issued = ca
            .sign_node_csr(
                &node.create_csr().unwrap(),
                "host-b",
                Duration::from_secs(3600),
            )
            .unwrap();
        let both = ca.trust_bundle().root_fingerprints();
        let kept = issued.pinned_trust_bundle(&r1, now).unwrap();
        assert_eq!(kept.root_fingerprints(), both);
        let kept = issued.pinned_trust_bundle(&both[1], now).unwrap();
        assert_eq!(kept.root_fingerprints(), vec![both[1].clone()]);
        // A leaf of another CA beside the pinned root is refused.
        let (_d2, other) = new_ca(DOMAIN);
        let mut spoofed = other
            .sign_node_csr(
                &node.create_csr().unwrap(),
                "host-b",
                Duration::from_secs(3600),
            )
            .unwrap();
        spoofed.trust_bundle = with_root(
            &other.trust_bundle(),
            &ca.trust_bundle().roots_pem[0],
            vec![],
        );
        let e = spoofed.pinned_trust_bundle(&r1, now).unwrap_err();
        assert!(e.to_string().contains("does not chain"), "{e}");
        assert_eq!(
            TrustBundle::new(DOMAIN, vec![ca.trust_bundle().roots_pem[0].clone()])
                .unwrap()
                .vouched_part_of(&ca.trust_bundle(), now)
                .unwrap()
                .root_fingerprints(),
            both
        );
    }

    #[test]
    fn an_issued_certificate_chains_to_the_pinned_root_only() {
        let (dir, ca) = new_ca(DOMAIN);
        let (_d2, other) = new_ca(DOMAIN);
        let now = SystemTime::now();
        let mut node = NodeIdentity::load_or_create(dir.path(), DOMAIN, "host-b").unwrap();
        let issued = ca
            .sign_node_csr(
                &node.create_csr().unwrap(),
                "host-b",
                Duration::from_secs(3600),
            )
            .unwrap();
        let pinned = ca.trust_bundle().root_fingerprints()[0].clone();
        issued.chains_to_root(&pinned, now).unwrap();

        // Another CA's root: not in the bundle.
        let other_fp = other.trust_bundle().root_fingerprints()[0].clone();
        let e = issued.chains_to_root(&other_fp, now).unwrap_err();
        assert!(e.to_string().contains("no root with fingerprint"), "{e}");

        // A registry answer that carries the pinned root but a leaf of another CA.
        let mut spoofed = other
            .sign_node_csr(
                &node.create_csr().unwrap(),
                "host-b",
                Duration::from_secs(3600),
            )
            .unwrap();
        spoofed.trust_bundle = with_root(
            &other.trust_bundle(),
            &ca.trust_bundle().roots_pem[0],
            vec![],
        );
        let e = spoofed.chains_to_root(&pinned, now).unwrap_err();
        assert!(e.to_string().contains("does not chain"), "{e}");
    }
}
