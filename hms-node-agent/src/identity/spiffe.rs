//! SPIFFE IDs: `spiffe://<trust-domain>/<path>`, parsed and validated by the rules of the
//! SPIFFE ID specification (lowercase trust domain of `[a-z0-9._-]`, path segments of
//! `[A-Za-z0-9._-]`, no empty, `.` or `..` segment, no query, fragment, port or user info).
//! A node's identity is `spiffe://<trust-domain>/node/<name>`.
//!
//! Hand-rolled: the only Rust crate that parses SPIFFE IDs (`spiffe`) brings the whole
//! workload-API client with it; the grammar is small enough to own here.
//!
//! This module only parses and formats; it never decides who is trusted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// The spec's limits: trust domain 255 bytes, the whole ID 2048 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;
/// Node names become one path segment; a hostname is at most 253 bytes.
const MAX_NODE_NAME_LEN: usize = 253;
/// The first path segment of every node identity.
const NODE_SEGMENT: &str = "node";

/// What is wrong with a SPIFFE ID, trust domain or node name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("trust domain {0:?} is invalid: use 1-255 characters of a-z, 0-9, '.', '-', '_'")]
    TrustDomain(String),
    #[error(
        "SPIFFE ID path {0:?} is invalid: it must start with '/', and each segment must be \
         non-empty, not '.' or '..', and use only A-Z, a-z, 0-9, '.', '-', '_'"
    )]
    Path(String),
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error(
        "node name {0:?} is invalid: use 1-253 characters of A-Z, a-z, 0-9, '.', '-', '_', \
         not '.' or '..'"
    )]
    NodeName(String),
    #[error("SPIFFE ID {0} is not a node identity (expected spiffe://<trust-domain>/node/<name>)")]
    NotANode(String),
}

/// A validated SPIFFE ID. Serialised as its URI string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    /// Begins with '/', never ends with '/'. May be empty (the trust domain's own ID).
    path: String,
}

impl SpiffeId {
    /// Builds an ID from a trust domain and a path (`/a/b`, or empty).
    pub fn new(trust_domain: &str, path: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        if SCHEME.len() + trust_domain.len() + path.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            path: path.to_owned(),
        })
    }

    /// `spiffe://<trust_domain>/node/<node_name>`.
    pub fn node(trust_domain: &str, node_name: &str) -> Result<Self, SpiffeIdError> {
        validate_node_name(node_name)?;
        Self::new(trust_domain, &format!("/{NODE_SEGMENT}/{node_name}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with '/' (or empty).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The node name if this is `spiffe://<td>/node/<name>`, else `None`.
    pub fn node_name(&self) -> Option<&str> {
        let rest = self.path.strip_prefix('/')?.strip_prefix(NODE_SEGMENT)?;
        let name = rest.strip_prefix('/')?;
        (!name.contains('/')).then_some(name)
    }

    /// The node name, or an error saying this is not a node identity.
    pub fn require_node(&self) -> Result<&str, SpiffeIdError> {
        self.node_name()
            .ok_or_else(|| SpiffeIdError::NotANode(self.to_string()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        // The scheme is case-insensitive in URIs, but the SPIFFE spec requires lowercase.
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Self::new(trust_domain, path)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

/// A trust domain: lowercase letters, digits, '.', '-', '_' (no port, no user info).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    let ok = !trust_domain.is_empty()
        && trust_domain.len() <= MAX_TRUST_DOMAIN_LEN
        && trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(trust_domain.to_owned()))
    }
}

/// A node name: one valid path segment of at most 253 bytes.
pub fn validate_node_name(node_name: &str) -> Result<(), SpiffeIdError> {
    if node_name.len() <= MAX_NODE_NAME_LEN && is_valid_segment(node_name) {
        Ok(())
    } else {
        Err(SpiffeIdError::NodeName(node_name.to_owned()))
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let ok = path
        .strip_prefix('/')
        .is_some_and(|rest| rest.split('/').all(is_valid_segment));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Path(path.to_owned()))
    }
}

fn is_valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_through_their_uri() {
        let id = SpiffeId::node("mesh.example", "host-1").unwrap();
        assert_eq!(id.to_string(), "spiffe://mesh.example/node/host-1");
        let parsed: SpiffeId = "spiffe://mesh.example/node/host-1".parse().unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.trust_domain(), "mesh.example");
        assert_eq!(parsed.path(), "/node/host-1");
        assert_eq!(parsed.node_name(), Some("host-1"));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://mesh.example/node/host-1\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn non_node_paths_are_not_node_identities() {
        for s in [
            "spiffe://mesh.example",
            "spiffe://mesh.example/node",
            "spiffe://mesh.example/svc/payments",
            "spiffe://mesh.example/node/a/b",
            "spiffe://mesh.example/nodes/a",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.node_name(), None, "{s}");
            assert!(matches!(id.require_node(), Err(SpiffeIdError::NotANode(_))));
        }
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        let cases = [
            ("http://mesh.example/node/a", "Scheme"),
            ("SPIFFE://mesh.example/node/a", "Scheme"),
            ("spiffe://", "TrustDomain"),
            ("spiffe://Mesh.example/node/a", "TrustDomain"),
            ("spiffe://mesh.example:443/node/a", "TrustDomain"),
            ("spiffe://user@mesh.example/node/a", "TrustDomain"),
            ("spiffe://mesh.example/", "Path"),
            ("spiffe://mesh.example/node//a", "Path"),
            ("spiffe://mesh.example/node/../a", "Path"),
            ("spiffe://mesh.example/node/a?x=1", "Path"),
            ("spiffe://mesh.example/node/a#f", "Path"),
            ("spiffe://mesh.example/node/a%20b", "Path"),
        ];
        for (s, want) in cases {
            let err = s.parse::<SpiffeId>().unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{s}: {err:?}");
        }
        let long = format!("spiffe://a/{}", "x".repeat(MAX_ID_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }

    #[test]
    fn node_names_must_be_one_valid_segment() {
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"x".repeat(254)] {
            assert!(SpiffeId::node("mesh.example", bad).is_err(), "{bad:?}");
        }
        assert!(SpiffeId::node("mesh.example", "Host_1.lan").is_ok());
    }
}
