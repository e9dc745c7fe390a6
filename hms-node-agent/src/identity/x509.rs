//! Reading certificates: PEM to DER, and the few fields the mesh decides on (the SPIFFE ID
//! in the URI SAN, validity, CA flag, public key). Never decides trust: chain verification
//! is webpki's, in `tls.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use super::SpiffeId;

/// The fields of one certificate the mesh looks at.
#[derive(Debug, Clone)]
pub(crate) struct CertInfo {
    /// The single URI SAN parsed as a SPIFFE ID, or why there is none.
    pub spiffe_id: Result<SpiffeId, String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// The DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The raw subject public key bits (what signature verification takes).
    pub public_key: Vec<u8>,
    pub serial_hex: String,
}

/// Every `CERTIFICATE` block of a PEM text, in order. Errors when there is none.
pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the PEM text".into());
    }
    Ok(certs)
}

pub(crate) fn cert_to_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

pub(crate) fn parse(der: &[u8]) -> Result<CertInfo, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(CertInfo {
        spiffe_id: spiffe_id_of(&cert),
        not_before: to_system_time(cert.validity().not_before.timestamp()),
        not_after: to_system_time(cert.validity().not_after.timestamp()),
        is_ca: cert.is_ca(),
        spki: cert.public_key().raw.to_vec(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        serial_hex: cert.raw_serial_as_string(),
    })
}

/// An SVID carries exactly one URI SAN, and it is the SPIFFE ID.
fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let uri = uris.next().ok_or("no URI subjectAltName")?;
    if uris.next().is_some() {
        return Err("more than one URI subjectAltName".into());
    }
    uri.parse().map_err(|e| format!("{e}"))
}

fn to_system_time(unix_secs: i64) -> SystemTime {
    if unix_secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix_secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(certs_from_pem("hello").is_err());
        assert!(parse(b"\x30\x03\x02\x01\x01").is_err());
    }
}
