//! The signature checks `jsonwebtoken` asks for, done by `ring` (the crypto the agent's TLS
//! already uses), installed as that crate's process-wide `CryptoProvider`. Owns only the
//! mapping from a JWT algorithm and a public key to ring's verifier. Never signs (the
//! gateway only checks tokens) and never verifies HMAC: a shared secret has no place at the
//! door, and refusing HS* here closes the HMAC-with-the-public-key confusion a second time
//! (the allowed-algorithm list of each key closes it first).

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use jsonwebtoken::{AlgorithmFamily, jwk::ThumbprintHash};
use ring::signature::{self as sig, RsaPublicKeyComponents, UnparsedPublicKey};

/// Installs the provider once per process (another caller having installed one first is
/// fine only if it is ours; nothing else in the agent uses `jsonwebtoken`).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = PROVIDER.install_default();
    });
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: verifier,
    key_utils: KeyUtils {
        compute_digest,
        ..KeyUtils::new_unimplemented()
    },
};

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Err(ErrorKind::InvalidAlgorithm.into())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}

enum Params {
    Rsa(&'static sig::RsaParameters),
    Other(&'static dyn sig::VerificationAlgorithm),
}

struct RingVerifier {
    alg: Algorithm,
    params: Params,
    key: DecodingKey,
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    use Algorithm::*;
    let (family, params) = match alg {
        RS256 => (
            AlgorithmFamily::Rsa,
            Params::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        ),
        RS384 => (
            AlgorithmFamily::Rsa,
            Params::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        ),
        RS512 => (
            AlgorithmFamily::Rsa,
            Params::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        ),
        PS256 => (
            AlgorithmFamily::Rsa,
            Params::Rsa(&sig::RSA_PSS_2048_8192_SHA256),
        ),
        PS384 => (
            AlgorithmFamily::Rsa,
            Params::Rsa(&sig::RSA_PSS_2048_8192_SHA384),
        ),
        PS512 => (
            AlgorithmFamily::Rsa,
            Params::Rsa(&sig::RSA_PSS_2048_8192_SHA512),
        ),
        ES256 => (
            AlgorithmFamily::Ec,
            Params::Other(&sig::ECDSA_P256_SHA256_FIXED),
        ),
        ES384 => (
            AlgorithmFamily::Ec,
            Params::Other(&sig::ECDSA_P384_SHA384_FIXED),
        ),
        EdDSA => (AlgorithmFamily::Ed, Params::Other(&sig::ED25519)),
        // HMAC, and whatever a later release adds: never at the door.
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    if key.family() != family {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        params,
        key: key.clone(),
    }))
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let bad = |_| signature::Error::new();
        match (&self.params, self.key.kind()) {
            (Params::Rsa(p), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                RsaPublicKeyComponents { n, e }
                    .verify(p, msg, signature)
                    .map_err(bad)
            }
            (Params::Rsa(p), DecodingKeyKind::SecretOrDer(der)) => UnparsedPublicKey::new(*p, der)
                .verify(msg, signature)
                .map_err(bad),
            (Params::Other(p), DecodingKeyKind::SecretOrDer(raw)) => {
                UnparsedPublicKey::new(*p, raw)
                    .verify(msg, signature)
                    .map_err(bad)
            }
            (Params::Other(_), DecodingKeyKind::RsaModulusExponent { .. }) => {
                Err(signature::Error::new())
            }
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}
