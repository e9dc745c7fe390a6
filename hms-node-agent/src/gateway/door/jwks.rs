//! An issuer's signing keys (a JWKS, RFC 7517) for one JWT authenticator, from a file or a
//! URL, cached. Owns loading, the cache and its refresh rules; never checks a token.
//!
//! - The set is loaded on first use, again once it is older than the authenticator's
//!   `refresh`, and when a token names a `kid` the set does not have (the issuer rotated
//!   its keys) — but never more often than once per `min_reload`, so a flood of tokens with
//!   made-up `kid`s cannot turn into a flood of fetches.
//! - A load that fails (unreadable, not JSON, no usable key, an HTTP error) keeps the last
//!   good set, logs a warning and counts `hms_gateway_jwks_loads{result="failed"}`.
//! - Only asymmetric signing keys are kept (RSA, EC P-256/P-384, Ed25519); each key may be
//!   used with the algorithms of its kind only, or with its own `alg` if it names one. A
//!   symmetric (`oct`) key or one marked `use: enc` is skipped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::metrics::DoorMetrics;

/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where a key set comes from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        /// PEM roots for https; `None`: the system's bundle.
        ca: Option<PathBuf>,
    },
}

/// One usable key.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

#[derive(Debug, Default)]
struct State {
    keys: Arc<Vec<VerifyKey>>,
    loaded_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug)]
pub struct Jwks {
    authenticator: String,
    source: JwksSource,
    refresh: Duration,
    min_reload: Duration,
    timeout: Duration,
    state: Mutex<State>,
    /// One load at a time; requests that find a load under way wait for it.
    loading: tokio::sync::Mutex<()>,
    metrics: Arc<DoorMetrics>,
}

/// Why no key could check a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// The set (loaded) has no key with that `kid` (or, without a `kid`, for that algorithm).
    Unknown,
    /// No set was ever loaded: the last error.
    NeverLoaded(String),
}

impl Jwks {
    pub fn new(
        authenticator: &str,
        source: JwksSource,
        refresh: Duration,
        min_reload: Duration,
        timeout: Duration,
        metrics: Arc<DoorMetrics>,
    ) -> Jwks {
        Jwks {
            authenticator: authenticator.into(),
            source,
            refresh,
            min_reload,
            timeout,
            state: Mutex::new(State::default()),
            loading: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keys that may check a token with this `kid` and `alg`, loading or reloading the
    /// set as the rules above say.
    pub async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<VerifyKey>, NoKey> {
        let now = Instant::now();
        let (keys, stale) = {
            let s = self.state();
            let stale = s
                .loaded_at
                .is_none_or(|t| now.duration_since(t) >= self.refresh);
            (s.keys.clone(), stale)
        };
        let mut found = matching(&keys, kid, alg);
        if (stale || found.is_empty())
            && let Some(fresh) = self.reload_if_allowed().await
        {
            found = matching(&fresh, kid, alg);
        }
        if !found.is_empty() {
            return Ok(found);
        }
        let s = self.state();
        match (&s.loaded_at, &s.last_error) {
            (None, Some(e)) => Err(NoKey::NeverLoaded(e.clone())),
            (None, None) => Err(NoKey::NeverLoaded("not loaded yet".into())),
            _ => Err(NoKey::Unknown),
        }
    }

    /// Loads the set unless a load was tried within `min_reload`; the set in force after.
    async fn reload_if_allowed(&self) -> Option<Arc<Vec<VerifyKey>>> {
        let _one = self.loading.lock().await;
        {
            let mut s = self.state();
            let now = Instant::now();
            if s.last_attempt
                .is_some_and(|t| now.duration_since(t) < self.min_reload)
            {
                // Tried just now (maybe by the request we waited for): use its result.
                return Some(s.keys.clone());
            }
            s.last_attempt = Some(now);
        }
        let result = tokio::time::timeout(self.timeout, load(&self.source))
            .await
            .unwrap_or_else(|_| bail!("no answer within {:?}", self.timeout));
        let mut s = self.state();
        match result {
            Ok(keys) => {
                tracing::info!(
                    authenticator = %self.authenticator,
                    keys = keys.len(),
                    "gateway: loaded the JWT authenticator's key set"
                );
                self.metrics.jwks_load(&self.authenticator, true);
                s.keys = Arc::new(keys);
                s.loaded_at = Some(Instant::now());
                s.last_error = None;
            }
            Err(e) => {
                let e = format!("{e:#}");
                tracing::warn!(
                    authenticator = %self.authenticator,
                    source = %self.source.describe(),
                    error = %e,
                    kept_keys = s.keys.len(),
                    "gateway: could not load the JWT authenticator's key set; keeping the last good one"
                );
                self.metrics.jwks_load(&self.authenticator, false);
                s.last_error = Some(e);
            }
        }
        Some(s.keys.clone())
    }

    /// The last load's error, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }
}

fn matching(keys: &[VerifyKey], kid: Option<&str>, alg: Algorithm) -> Vec<VerifyKey> {
    keys.iter()
        .filter(|k| match kid {
            Some(kid) => k.kid.as_deref() == Some(kid),
            None => true,
        })
        .filter(|k| k.algorithms.contains(&alg) || kid.is_some())
        .cloned()
        .collect()
}

impl JwksSource {
    fn describe(&self) -> String {
        match self {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url { url, .. } => url.clone(),
        }
    }
}

async fn load(source: &JwksSource) -> anyhow::Result<Vec<VerifyKey>> {
    let bytes = match source {
        JwksSource::File(path) => {
            let b = tokio::fs::read(path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            if b.len() > MAX_JWKS_BYTES {
                bail!("{} is over {MAX_JWKS_BYTES} bytes", path.display());
            }
            b
        }
        JwksSource::Url { url, ca } => super::fetch::get(url, ca.as_deref(), MAX_JWKS_BYTES)
            .await
            .with_context(|| format!("GET {url}"))?,
    };
    parse(&bytes)
}

/// The usable keys of a JWKS document; an error if it is not one or has none.
pub fn parse(bytes: &[u8]) -> anyhow::Result<Vec<VerifyKey>> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc =
        serde_json::from_slice(bytes).context("not a JWKS document (JSON with a `keys` list)")?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in doc.keys.into_iter().enumerate() {
        match usable(raw) {
            Ok(k) => out.push(k),
            Err(why) => skipped.push(format!("key {i}: {why}")),
        }
    }
    if !skipped.is_empty() {
        tracing::debug!(skipped = ?skipped, "gateway: JWKS keys skipped");
    }
    if out.is_empty() {
        bail!("no usable signing key ({})", skipped.join("; "));
    }
    Ok(out)
}

fn usable(raw: serde_json::Value) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a JWK: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (`use: enc`)".into());
    }
    let kind: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("an EC key on a curve other than P-256 or P-384".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err("an OKP key other than Ed25519".into()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (`oct`) key: HMAC tokens are never accepted".into());
        }
        _ => return Err("an unsupported key type".into()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => kind,
        Some(named) => match Algorithm::try_from(named) {
            Ok(a) if kind.contains(&a) => vec![a],
            _ => return Err(format!("`alg: {named}` does not fit the key")),
        },
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        key,
        algorithms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_encryption_and_garbage_keys_are_skipped_and_an_empty_set_is_an_error() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
            {"kty": "RSA", "use": "enc", "n": "sXch", "e": "AQAB", "kid": "enc"},
            {"kty": "RSA", "n": "sXch", "e": "AQAB", "kid": "r1"},
            {"kty": "RSA", "alg": "ES256", "n": "sXch", "e": "AQAB", "kid": "confused"},
            {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0", "kid": "e1"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "d1"},
            "garbage"
        ]});
        let keys = parse(doc.to_string().as_bytes()).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(kids, ["r1", "e1", "d1"]);
        assert_eq!(keys[1].algorithms, [Algorithm::ES256]);
        assert_eq!(keys[2].algorithms, [Algorithm::EdDSA]);
        assert!(
            keys[0]
                .algorithms
                .iter()
                .all(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        );
        assert!(parse(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
        assert!(parse(b"<html>").is_err());
        assert!(parse(br#"{"keys": []}"#).is_err());
    }
}
