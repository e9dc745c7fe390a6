//! JWT bearer tokens at the door (RFC 7519, RFC 6750): the token's signature is checked with
//! the issuer's keys ([`super::jwks`]), then `iss`, `aud`, `exp` and `nbf` (with a small
//! leeway); `sub` is the subject and chosen claims become request headers. Owns the token
//! checks and the `Bearer` challenge; never loads keys itself and never logs a token.
//!
//! Refused before any key is tried: `alg: none` (unsigned) and `HS*` (HMAC): an HMAC "signed"
//! with the issuer's *public* key would otherwise verify for anyone who has that key. Each
//! key allows only the algorithms of its own kind (RSA: RS*/PS*, P-256: ES256, P-384:
//! ES384, Ed25519: EdDSA), and the ring provider has no HMAC at all.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};

use super::jwks::{Jwks, NoKey};
use super::reject::{Rejection, quoted};

#[derive(Debug)]
pub struct JwtAuth {
    name: String,
    issuer: String,
    audiences: Vec<String>,
    leeway: Duration,
    /// (claim, header) in the spec's order.
    forward: Vec<(String, HeaderName)>,
    pub jwks: Jwks,
}

/// A token that passed: its subject and the headers its claims become.
#[derive(Debug)]
pub struct Passed {
    pub subject: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl JwtAuth {
    pub fn compile(
        name: &str,
        issuer: &str,
        audiences: &[String],
        leeway: Duration,
        forward_claims: &std::collections::BTreeMap<String, String>,
        jwks: Jwks,
    ) -> anyhow::Result<JwtAuth> {
        super::jwt_ring::install();
        let forward = forward_claims
            .iter()
            .map(|(claim, header)| {
                HeaderName::from_bytes(header.as_bytes())
                    .map(|h| (claim.clone(), h))
                    .map_err(|_| {
                        anyhow::anyhow!("authenticator {name}: `{header}` is not a header name")
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(JwtAuth {
            name: name.into(),
            issuer: issuer.into(),
            audiences: audiences.to_vec(),
            leeway,
            forward,
            jwks,
        })
    }

    /// The headers claims are forwarded in: removed from every request first, so a caller
    /// cannot send its own `x-user`; and `Authorization`, so the token stays at the door.
    pub fn credential_headers(&self) -> Vec<HeaderName> {
        let mut v: Vec<HeaderName> = self.forward.iter().map(|(_, h)| h.clone()).collect();
        v.push(AUTHORIZATION);
        v
    }

    fn invalid(&self, description: &str) -> Rejection {
        Rejection::Unauthorized {
            reason: "invalid-token",
            challenge: format!(
                "Bearer realm={}, error=\"invalid_token\", error_description={}",
                quoted(&self.name),
                quoted(description)
            ),
            message: format!("hms: the bearer token was refused: {description}"),
        }
    }

    fn bad_request(&self, description: &str) -> Rejection {
        Rejection::Unauthorized {
            reason: "invalid-token",
            challenge: format!(
                "Bearer realm={}, error=\"invalid_request\", error_description={}",
                quoted(&self.name),
                quoted(description)
            ),
            message: format!("hms: {description}"),
        }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Passed, Rejection> {
        let mut all = headers.get_all(AUTHORIZATION).iter();
        let (first, second) = (all.next(), all.next());
        if second.is_some() {
            return Err(self.bad_request("more than one Authorization header"));
        }
        let token = first
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let Some(token) = token else {
            return Err(Rejection::Unauthorized {
                reason: "unauthenticated",
                challenge: format!("Bearer realm={}", quoted(&self.name)),
                message: format!(
                    "hms: this route needs a bearer token from {}: send `Authorization: Bearer TOKEN`",
                    self.issuer
                ),
            });
        };
        let (alg, kid) = self.header(token)?;
        let keys = match self.jwks.keys_for(kid.as_deref(), alg).await {
            Ok(keys) => keys,
            Err(NoKey::Unknown) => {
                return Err(self.invalid(match kid {
                    Some(_) => "the token's key (kid) is not one of the issuer's keys",
                    None => "no issuer key fits the token's algorithm",
                }));
            }
            Err(NoKey::NeverLoaded(e)) => {
                return Err(Rejection::Unavailable {
                    reason: "auth-unavailable",
                    message: format!(
                        "hms: the gateway cannot check tokens now: it could not load the issuer's keys ({e}); retry later"
                    ),
                });
            }
        };
        let mut refusal = None;
        for key in &keys {
            if !key.algorithms.contains(&alg) {
                refusal = Some(self.invalid("the token's algorithm does not fit its key"));
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &self.validation(alg),
            ) {
                Ok(data) => return self.passed(data.claims),
                Err(e) => refusal = Some(self.invalid(&describe(e.kind()))),
            }
        }
        Err(refusal.unwrap_or_else(|| self.invalid("no issuer key checks this token")))
    }

    /// The token's `alg` and `kid`, refusing `none` and HMAC by name (jsonwebtoken would
    /// refuse them too, with a vaguer error).
    fn header(&self, token: &str) -> Result<(Algorithm, Option<String>), Rejection> {
        let malformed = || self.invalid("not a JWT (three base64url parts separated by `.`)");
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let bytes = URL_SAFE_NO_PAD.decode(h).map_err(|_| malformed())?;
        let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
        let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
        if alg.eq_ignore_ascii_case("none") {
            return Err(self.invalid("unsigned tokens (alg none) are never accepted"));
        }
        if alg.starts_with("HS") {
            return Err(self.invalid(
                "HMAC-signed tokens are never accepted: the issuer signs with a private key",
            ));
        }
        let alg: Algorithm = alg
            .parse()
            .map_err(|_| self.invalid("the token's algorithm is not one the gateway accepts"))?;
        let kid = header
            .get("kid")
            .and_then(|k| k.as_str())
            .map(str::to_owned);
        Ok((alg, kid))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = self.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        let mut required: HashSet<String> = ["exp", "iss", "sub"].map(String::from).into();
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
            required.insert("aud".into());
        }
        v.required_spec_claims = required;
        v
    }

    fn passed(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Passed, Rejection> {
        let Some(subject) = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
        else {
            return Err(self.invalid("the token's `sub` is not a string"));
        };
        let mut headers = Vec::new();
        for (claim, header) in &self.forward {
            let Some(value) = claims.get(claim) else {
                continue;
            };
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) if items.iter().all(|i| i.is_string()) => items
                    .iter()
                    .filter_map(|i| i.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            match HeaderValue::from_str(&text) {
                Ok(v) => headers.push((header.clone(), v)),
                Err(_) => {
                    return Err(self.invalid(&format!(
                        "the token's `{claim}` claim cannot be a header value"
                    )));
                }
            }
        }
        Ok(Passed {
            subject: subject.to_string(),
            headers,
        })
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "the token is not for this audience (aud)".into(),
        ErrorKind::InvalidIssuer => "the token is from another issuer (iss)".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not fit its key".into(),
        ErrorKind::InvalidClaimFormat(c) => format!("the token's `{c}` claim has the wrong type"),
        _ => "the token is malformed".into(),
    }
}
