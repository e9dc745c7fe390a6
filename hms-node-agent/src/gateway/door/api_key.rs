//! API keys at the door: the key comes in the authenticator's header (`x-api-key: KEY`) or
//! as `Authorization: ApiKey KEY`; its SHA-256 is compared with every stored hash in
//! constant time, so neither the spec nor the timing tells a key. Owns finding the key and
//! naming its holder; never stores or logs a key.

use std::collections::BTreeMap;

use hms_ctl::gateway::door::KeyHash;
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, HeaderName};
use subtle::ConstantTimeEq;

use super::reject::{Rejection, quoted};

#[derive(Debug)]
pub struct ApiKeyAuth {
    /// The authenticator's name: the challenge's realm.
    name: String,
    header: HeaderName,
    /// (hash, key name), in the spec's order.
    keys: Vec<([u8; 32], String)>,
}

impl ApiKeyAuth {
    pub fn compile(
        name: &str,
        header: &str,
        keys: &BTreeMap<String, KeyHash>,
    ) -> anyhow::Result<ApiKeyAuth> {
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            anyhow::anyhow!("authenticator {name}: `{header}` is not an HTTP header name")
        })?;
        Ok(ApiKeyAuth {
            name: name.into(),
            header,
            keys: keys.iter().map(|(n, h)| (h.0, n.clone())).collect(),
        })
    }

    /// The headers that carry the key: removed before the request goes on, so the backend
    /// never sees it.
    pub fn credential_headers(&self) -> Vec<HeaderName> {
        vec![self.header.clone()]
    }

    fn challenge(&self, error: Option<&str>) -> String {
        let mut c = format!(
            "ApiKey realm={}, header={}",
            quoted(&self.name),
            quoted(self.header.as_str())
        );
        if let Some(e) = error {
            c.push_str(&format!(", error={}", quoted(e)));
        }
        c
    }

    /// The presented key's name, or the 401 to answer.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<String, Rejection> {
        let mut presented = headers.get_all(&self.header).iter();
        let from_header = presented.next();
        if presented.next().is_some() {
            return Err(self.refuse("invalid_request", "more than one key was sent; send one"));
        }
        let key = match from_header {
            Some(v) => v.as_bytes(),
            None => {
                match headers
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("apikey"))
                {
                    Some((_, key)) => key.trim().as_bytes(),
                    None => {
                        return Err(Rejection::Unauthorized {
                            reason: "unauthenticated",
                            challenge: self.challenge(None),
                            message: format!(
                                "hms: this route needs an API key: send it in the `{}` header",
                                self.header
                            ),
                        });
                    }
                }
            }
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        // Every stored hash is compared, whatever matched, so the time taken does not say
        // which key (or how much of one) was right.
        let mut found: Option<&str> = None;
        for (hash, name) in &self.keys {
            if bool::from(hash.ct_eq(digest.as_ref())) {
                found = Some(name);
            }
        }
        found
            .map(str::to_owned)
            .ok_or_else(|| self.refuse("invalid_key", "the API key is not one this route knows"))
    }

    fn refuse(&self, error: &str, why: &str) -> Rejection {
        Rejection::Unauthorized {
            reason: "invalid-key",
            challenge: self.challenge(Some(error)),
            message: format!("hms: {why}; ask the gateway's operator for a key"),
        }
    }
}

/// Whether the request carries `Authorization: ApiKey ...`.
pub fn in_authorization(headers: &HeaderMap) -> bool {
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split_once(' ')
                .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("apikey"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn auth() -> ApiKeyAuth {
        let keys = [
            ("acme".to_string(), KeyHash::of("acme-secret")),
            ("globex".to_string(), KeyHash::of("globex-secret")),
        ]
        .into_iter()
        .collect();
        ApiKeyAuth::compile("partners", "x-api-key", &keys).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_known_key_names_its_holder_in_either_header() {
        let a = auth();
        assert_eq!(
            a.authenticate(&headers(&[("x-api-key", "globex-secret")]))
                .unwrap(),
            "globex"
        );
        assert_eq!(
            a.authenticate(&headers(&[("authorization", "ApiKey acme-secret")]))
                .unwrap(),
            "acme"
        );
    }

    #[test]
    fn a_missing_wrong_or_doubled_key_gets_401_with_an_apikey_challenge() {
        let a = auth();
        let Err(Rejection::Unauthorized {
            reason, challenge, ..
        }) = a.authenticate(&headers(&[]))
        else {
            panic!()
        };
        assert_eq!(reason, "unauthenticated");
        assert_eq!(challenge, "ApiKey realm=\"partners\", header=\"x-api-key\"");
        for bad in [
            headers(&[("x-api-key", "acme-secre")]),
            headers(&[("x-api-key", "")]),
            // The hash itself is not a key.
            headers(&[("x-api-key", &KeyHash::of("acme-secret").to_string())]),
            headers(&[("x-api-key", "acme-secret"), ("x-api-key", "globex-secret")]),
            headers(&[("authorization", "Bearer acme-secret")]),
        ] {
            let r = a.authenticate(&bad).unwrap_err();
            assert_eq!(r.status(), 401, "{bad:?}");
        }
        let Err(Rejection::Unauthorized {
            reason, challenge, ..
        }) = a.authenticate(&headers(&[("x-api-key", "nope")]))
        else {
            panic!()
        };
        assert_eq!(reason, "invalid-key");
        assert!(challenge.ends_with("error=\"invalid_key\""), "{challenge}");
    }
}
