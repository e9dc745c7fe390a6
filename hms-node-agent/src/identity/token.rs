//! Join tokens: how a new host proves the operator let it in.
//!
//! 1. `hms-ctl node token create [--node NAME] [--ttl 1h]` makes 256 random bits, printed
//!    once as `hms1.<64 hex digits>`. Only its SHA-256 is kept, with its expiry and, if
//!    given, the node name it is bound to.
//! 2. The joining node sends the token with its CSR. [`JoinTokens::redeem`] finds the hash,
//!    refuses it when unknown, expired, already used or bound to another node, and marks it
//!    used. A used token stays on record (to say "already used", not "unknown") until a day
//!    after it expires.
//!
//! Stored by the CA as `<state-dir>/ca/join-tokens.json` (0600, atomic writes) through
//! [`CertificateAuthority`](super::CertificateAuthority); the struct is also serialisable
//! should the tokens move into the registry. A stolen copy of the file yields no usable
//! token: only hashes are in it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::files::{self, SECRET_MODE};
use super::{IdentityError, validate_node_name};

const TOKEN_PREFIX: &str = "hms1.";
const TOKEN_SECRET_BYTES: usize = 32;
/// How long a spent or expired token stays on record after its expiry.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a join token was refused. The messages go to the operator of the joining host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "join token is malformed: expected \"hms1.\" followed by 64 hex digits, as printed by `hms-ctl node token create`"
    )]
    Malformed,
    #[error("join token is unknown to this mesh's CA; create one with `hms-ctl node token create`")]
    Unknown,
    #[error(
        "join token expired {ago_secs} s ago; create a new one with `hms-ctl node token create`"
    )]
    Expired { ago_secs: u64 },
    #[error(
        "join token was already used by node {used_by:?}; tokens are single-use, create a new one"
    )]
    AlreadyUsed { used_by: String },
    #[error("join token is bound to node {bound_to:?}, not {requested:?}")]
    WrongNode { bound_to: String, requested: String },
    #[error("join token lifetime must be between 1 s and 30 days")]
    BadTtl,
    #[error("no secure random numbers available")]
    Random,
}

/// A freshly created token: the only time the secret exists outside the joining host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// What the operator passes to the joining host.
    pub secret: String,
    /// A short non-secret name for it (first 12 hex digits of its hash), for listings.
    pub id: String,
    pub node_name: Option<String>,
    pub expires_at: SystemTime,
}

/// The CA's record of issued tokens (hashes only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokens {
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TokenRecord {
    /// Lowercase hex SHA-256 of the whole token string.
    sha256: String,
    node_name: Option<String>,
    created_unix: u64,
    expires_unix: u64,
    used_by: Option<String>,
    used_unix: Option<u64>,
}

impl JoinTokens {
    /// Reads the token file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = files::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| IdentityError::CaState {
            path: path.to_owned(),
            reason: format!("join tokens: {e}"),
        })
    }

    /// Writes the token file atomically, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let json = serde_json::to_vec_pretty(self).expect("token records serialise");
        files::write_atomic(path, &json, SECRET_MODE)
    }

    /// Makes a new token valid for `ttl` from `now`, optionally only for `node_name`.
    pub fn create(
        &mut self,
        node_name: Option<&str>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JoinToken, IdentityError> {
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 60 * 60) {
            return Err(TokenError::BadTtl.into());
        }
        if let Some(name) = node_name {
            validate_node_name(name)?;
        }
        let mut secret = [0u8; TOKEN_SECRET_BYTES];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| TokenError::Random)?;
        let secret = format!("{TOKEN_PREFIX}{}", super::hex(&secret));
        let sha256 = hash(&secret);
        let expires_at = now + ttl;
        self.prune(now);
        self.tokens.push(TokenRecord {
            sha256: sha256.clone(),
            node_name: node_name.map(str::to_owned),
            created_unix: unix(now),
            expires_unix: unix(expires_at),
            used_by: None,
            used_unix: None,
        });
        Ok(JoinToken {
            secret,
            id: sha256[..12].to_owned(),
            node_name: node_name.map(str::to_owned),
            expires_at,
        })
    }

    /// Checks `token` for `node_name` at `now` and spends it. The caller must persist the
    /// set (see [`save`](Self::save)) before acting on success, so a crash cannot make a
    /// token usable twice.
    pub fn redeem(
        &mut self,
        token: &str,
        node_name: &str,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let token = token.trim();
        let well_formed = token.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
            hex.len() == 2 * TOKEN_SECRET_BYTES
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !well_formed {
            return Err(TokenError::Malformed);
        }
        let sha256 = hash(token);
        let record = self
            .tokens
            .iter_mut()
            .find(|r| r.sha256 == sha256)
            .ok_or(TokenError::Unknown)?;
        if let Some(used_by) = &record.used_by {
            return Err(TokenError::AlreadyUsed {
                used_by: used_by.clone(),
            });
        }
        let now_unix = unix(now);
        if now_unix >= record.expires_unix {
            return Err(TokenError::Expired {
                ago_secs: now_unix - record.expires_unix,
            });
        }
        if let Some(bound_to) = &record.node_name
            && bound_to != node_name
        {
            return Err(TokenError::WrongNode {
                bound_to: bound_to.clone(),
                requested: node_name.to_owned(),
            });
        }
        record.used_by = Some(node_name.to_owned());
        record.used_unix = Some(now_unix);
        Ok(())
    }

    /// Tokens that can still be redeemed at `now`.
    pub fn outstanding(&self, now: SystemTime) -> usize {
        let now = unix(now);
        self.tokens
            .iter()
            .filter(|r| r.used_by.is_none() && now < r.expires_unix)
            .count()
    }

    /// Forgets records a day past their expiry.
    pub fn prune(&mut self, now: SystemTime) {
        let now = unix(now);
        let keep = KEEP_AFTER_EXPIRY.as_secs();
        self.tokens
            .retain(|r| r.expires_unix.saturating_add(keep) > now);
    }
}

fn hash(token: &str) -> String {
    super::hex(digest::digest(&digest::SHA256, token.as_bytes()).as_ref())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_token_admits_one_node_once() {
        let now = SystemTime::now();
        let mut tokens = JoinTokens::default();
        let t = tokens.create(None, HOUR, now).unwrap();
        assert!(t.secret.starts_with("hms1.") && t.secret.len() == 5 + 64);
        assert_eq!(tokens.outstanding(now), 1);
        tokens.redeem(&t.secret, "host-a", now).unwrap();
        assert_eq!(tokens.outstanding(now), 0);
        assert_eq!(
            tokens.redeem(&t.secret, "host-b", now),
            Err(TokenError::AlreadyUsed {
                used_by: "host-a".into()
            })
        );
    }

    #[test]
    fn expired_unknown_malformed_and_misbound_tokens_are_refused() {
        let now = SystemTime::now();
        let mut tokens = JoinTokens::default();
        let t = tokens.create(None, HOUR, now).unwrap();
        assert_eq!(
            tokens.redeem(&t.secret, "a", now + HOUR + Duration::from_secs(5)),
            Err(TokenError::Expired { ago_secs: 5 })
        );
        // An expired attempt does not spend it: still refused as expired, not as used.
        assert!(matches!(
            tokens.redeem(&t.secret, "a", now + 2 * HOUR),
            Err(TokenError::Expired { .. })
        ));
        let other = format!("hms1.{}", "0".repeat(64));
        assert_eq!(tokens.redeem(&other, "a", now), Err(TokenError::Unknown));
        for bad in [
            "",
            "hms1.",
            "hms1.xyz",
            &t.secret.to_uppercase(),
            &t.secret[..20],
        ] {
            assert_eq!(
                tokens.redeem(bad, "a", now),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
        let bound = tokens.create(Some("host-a"), HOUR, now).unwrap();
        assert_eq!(
            tokens.redeem(&bound.secret, "host-b", now),
            Err(TokenError::WrongNode {
                bound_to: "host-a".into(),
                requested: "host-b".into()
            })
        );
        tokens.redeem(&bound.secret, "host-a", now).unwrap();
    }

    #[test]
    fn only_hashes_are_stored_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join-tokens.json");
        let now = SystemTime::now();
        let mut tokens = JoinTokens::default();
        let t = tokens.create(Some("host-a"), HOUR, now).unwrap();
        tokens.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&t.secret[5..]),
            "the secret must not be stored"
        );
        assert!(text.contains(&t.id));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut loaded = JoinTokens::load(&path).unwrap();
        assert_eq!(loaded, tokens);
        loaded.redeem(&t.secret, "host-a", now).unwrap();
    }

    #[test]
    fn records_are_forgotten_a_day_after_expiry() {
        let now = SystemTime::now();
        let mut tokens = JoinTokens::default();
        let t = tokens.create(None, HOUR, now).unwrap();
        tokens.prune(now + HOUR + KEEP_AFTER_EXPIRY + Duration::from_secs(1));
        assert_eq!(tokens.redeem(&t.secret, "a", now), Err(TokenError::Unknown));
    }

    #[test]
    fn lifetimes_are_bounded() {
        let mut tokens = JoinTokens::default();
        let now = SystemTime::now();
        assert!(tokens.create(None, Duration::ZERO, now).is_err());
        assert!(
            tokens
                .create(None, Duration::from_secs(31 * 86400), now)
                .is_err()
        );
        assert!(tokens.create(Some("bad name"), HOUR, now).is_err());
    }
}
