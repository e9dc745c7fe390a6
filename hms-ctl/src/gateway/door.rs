//! What a gateway route asks of a caller at the door: authentication (API key, JWT, client
//! certificate), per-client rate limits, CORS and a maximum body size. Owns the YAML shape of
//! those fields and their validation; the agent's `gateway::door` enforces them. Never reads
//! the files it names (JWKS, CA) nor fetches URLs: the agent does, where they are used.
//!
//! Values with a unit (`30s`, `10rps`, `1MiB`, `sha256:…`) are parsed while deserializing,
//! so a bad one is reported by the YAML parser with its line; rules that span fields (a
//! route's `auth` names a declared authenticator, `by: key` needs an API key) are
//! [`validate_authenticators`] and [`RouteDoorSpec::validate`], which name the field.
//!
//! ```yaml
//! authenticators:
//!   partners:
//!     api_key:
//!       keys:
//!         acme: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//!   users:
//!     jwt:
//!       issuer: https://id.example.com
//!       audiences: [shop]
//!       jwks_url: https://id.example.com/.well-known/jwks.json
//!       forward_claims: { sub: x-user, email: x-user-email }
//!   staff:
//!     client_cert:
//!       ca: /etc/hms/gateway/staff-ca.pem
//! routes:
//!   - name: orders
//!     auth: users
//!     rate_limit: { rate: 10rps, burst: 20, by: subject }
//!     cors: { allow_origins: ["https://shop.example.com"], allow_credentials: true }
//!     max_body: 1MiB
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::spec::{RateLimit, parse_duration};

/// The header an API key comes in unless the authenticator names another.
pub const DEFAULT_KEY_HEADER: &str = "x-api-key";
/// How far a token's `exp`/`nbf` may be off unless the authenticator says otherwise (clock skew).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// How long a fetched JWKS is used before it is fetched again.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// How many clients a route's rate limit remembers unless it says otherwise.
pub const DEFAULT_MAX_CLIENTS: u32 = 10_000;

/// One named authenticator; a route picks one with `auth: NAME`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthenticatorSpec {
    /// Keys sent in a header (`x-api-key: KEY`, or `Authorization: ApiKey KEY`). Only each
    /// key's SHA-256 is stored (`hms-ctl gateway key hash`); the key's name is the subject.
    ApiKey {
        #[serde(default = "default_key_header")]
        header: String,
        keys: BTreeMap<String, KeyHash>,
    },
    /// Bearer tokens signed by the issuer's keys (RS256/384/512, PS256/384/512, ES256/384,
    /// EdDSA; never `none` or HMAC). The token's `sub` is the subject.
    Jwt {
        issuer: String,
        /// The token's `aud` must contain one of these; empty: `aud` is not checked.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        audiences: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwks_file: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwks_url: Option<String>,
        /// CA bundle (PEM) for an `https` `jwks_url`; default: the system's roots.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwks_ca: Option<PathBuf>,
        #[serde(default = "default_leeway", with = "duration")]
        leeway: Duration,
        /// How long a loaded JWKS is used before it is loaded again.
        #[serde(default = "default_refresh", with = "duration")]
        refresh: Duration,
        /// Claim name → request header sent to the backend (`sub: x-user`). A caller's own
        /// copy of such a header is removed first, so it cannot be forged.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        forward_claims: BTreeMap<String, String>,
    },
    /// A TLS client certificate whose chain leads to this CA (PEM file). The certificate's
    /// subject CN (else its first DNS or URI SAN) is the subject.
    ClientCert { ca: PathBuf },
}

impl AuthenticatorSpec {
    /// `api-key`, `jwt` or `client-cert`: how taps and metrics name the method.
    pub fn method(&self) -> &'static str {
        match self {
            AuthenticatorSpec::ApiKey { .. } => "api-key",
            AuthenticatorSpec::Jwt { .. } => "jwt",
            AuthenticatorSpec::ClientCert { .. } => "client-cert",
        }
    }
}

fn default_key_header() -> String {
    DEFAULT_KEY_HEADER.into()
}
fn default_leeway() -> Duration {
    DEFAULT_LEEWAY
}
fn default_refresh() -> Duration {
    DEFAULT_JWKS_REFRESH
}

/// The door's fields of a route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteDoorSpec {
    /// The name of an authenticator in the spec's `authenticators`; none: anyone may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<ClientRateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSpec>,
    /// The largest request body the route accepts (`1MiB`, `512KiB`, `10MB`, or bytes).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_byte_size"
    )]
    pub max_body: Option<u64>,
}

/// A rate limit per client: each key, subject or address gets its own token bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientRateLimit {
    /// `10rps`, `600rpm`.
    #[serde(with = "rate")]
    pub rate: RateLimit,
    /// Requests a client may send at once from idle; default one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Who is a client; default `subject` on a route with `auth`, else `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<ClientKey>,
    /// How many clients are remembered at most (bounded memory); default 10000. When full,
    /// idle clients are forgotten first, then those seen longest ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<u32>,
}

impl ClientRateLimit {
    /// Who is a client on a route with (`authenticated`) or without authentication.
    pub fn by_or_default(&self, authenticated: bool) -> ClientKey {
        self.by.unwrap_or(if authenticated {
            ClientKey::Subject
        } else {
            ClientKey::Address
        })
    }

    pub fn burst_or_default(&self) -> u32 {
        self.burst.unwrap_or_else(|| self.rate.burst_or_default())
    }

    pub fn max_clients_or_default(&self) -> u32 {
        self.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS)
    }
}

/// What tells clients apart for a rate limit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientKey {
    /// The API key's name (the route's `auth` must be an `api_key` authenticator).
    Key,
    /// The authenticated subject (the route must have `auth`).
    Subject,
    /// The client's IP address (IPv6: its /64, since one host holds a whole /64).
    Address,
}

/// Cross-origin requests from browsers (the Fetch standard's CORS protocol).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    /// Exact origins (`https://shop.example.com`, `http://localhost:8080`) or `*`.
    pub allow_origins: Vec<String>,
    #[serde(default = "default_cors_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a page may send (beyond the CORS-safelisted ones); `*` for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Response headers a page may read (beyond the safelisted ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Whether pages may send cookies or credentials; needs exact origins, not `*`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub max_age: Option<Duration>,
}

fn default_cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}

/// A key's SHA-256, written `sha256:` and 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl KeyHash {
    /// The hash of `key` as the spec stores it.
    pub fn of(key: &str) -> KeyHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        KeyHash(out)
    }

    pub fn parse(text: &str) -> Result<KeyHash, String> {
        let bad = || {
            format!(
                "`{}` is not a key hash; write `sha256:` and 64 hex digits (make one with `hms-ctl gateway key new NAME`); never the key itself",
                shorten(text)
            )
        };
        let hex = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(KeyHash(out))
    }
}

/// A new random API key (32 bytes, hex) and its hash: what `hms-ctl gateway key new` prints.
pub fn new_api_key() -> (String, KeyHash) {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let hash = KeyHash::of(&key);
    (key, hash)
}

/// A secret pasted where a hash belongs must not be echoed whole into logs.
fn shorten(text: &str) -> String {
    if text.chars().count() > 12 {
        format!("{}…", text.chars().take(8).collect::<String>())
    } else {
        text.to_string()
    }
}

impl Serialize for KeyHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        KeyHash::parse(&text).map_err(de::Error::custom)
    }
}

/// `1MiB`, `512KiB`, `10MB`, `100kB`, `4096` (bytes).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "`{text}` is not a size; write it like `1MiB`, `512KiB`, `10MB` or a number of bytes"
        )
    };
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!(
            "`{text}` must be above 0 (leave `max_body` out for no limit)"
        )),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}

mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(de::Error::custom)
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&format_args!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| super::parse_duration(&t).map_err(de::Error::custom))
            .transpose()
    }
}

mod rate {
    use serde::{Deserialize, Deserializer, Serializer, de};

    use crate::spec::RateLimit;

    pub fn serialize<S: Serializer>(r: &RateLimit, s: S) -> Result<S::Ok, S::Error> {
        match r.per_seconds {
            1 => s.collect_str(&format_args!("{}rps", r.requests)),
            _ => s.collect_str(&format_args!("{}rpm", r.requests)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RateLimit, D::Error> {
        let text = String::deserialize(d)?;
        RateLimit::parse(&text).map_err(de::Error::custom)
    }
}

mod opt_byte_size {
    use std::fmt;

    use serde::Serializer;
    use serde::de::{self, Deserializer, Visitor};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_u64(*v),
            None => s.serialize_none(),
        }
    }

    struct Size;

    impl<'de> Visitor<'de> for Size {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a size like `1MiB` or a number of bytes")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            if v == 0 {
                return Err(E::custom(
                    "must be above 0 (leave `max_body` out for no limit)",
                ));
            }
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map_err(|_| E::custom("a size must be above 0"))
                .and_then(|v| self.visit_u64(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            super::parse_byte_size(v).map(Some).map_err(E::custom)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(Size)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(Size)
    }
}

/// A rule a spec breaks: the field (dotted, from the spec's top or the route's) and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for DoorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for DoorError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> DoorError {
    DoorError {
        field: field.into(),
        message: message.into(),
    }
}

/// Names of authenticators, keys: lower-case letters, digits, `-`, `_`, `.`, at most 63.
fn check_name(field: &str, name: &str) -> Result<(), DoorError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "`{name}` is not a name: use 1 to 63 lower-case letters, digits, `-`, `_` or `.`"
            ),
        ))
    }
}

/// An HTTP header name (RFC 9110 token), lower-case.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// Headers a forwarded claim may not overwrite: the ones that steer HTTP or the mesh.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "authorization",
    "cookie",
];

/// The rules each authenticator's fields must keep.
pub fn validate_authenticators(
    authenticators: &BTreeMap<String, AuthenticatorSpec>,
) -> Result<(), DoorError> {
    for (name, auth) in authenticators {
        let at = format!("authenticators.{name}");
        check_name(&at, name)?;
        match auth {
            AuthenticatorSpec::ApiKey { header, keys } => {
                if !is_header_name(header) {
                    return Err(err(
                        format!("{at}.api_key.header"),
                        format!("`{header}` is not a lower-case HTTP header name"),
                    ));
                }
                if RESERVED_HEADERS.contains(&header.as_str()) && header != "authorization" {
                    return Err(err(
                        format!("{at}.api_key.header"),
                        format!(
                            "`{header}` steers HTTP itself; use a header of its own like `x-api-key`"
                        ),
                    ));
                }
                if keys.is_empty() {
                    return Err(err(
                        format!("{at}.api_key.keys"),
                        "needs at least one `NAME: sha256:…` (make one with `hms-ctl gateway key new NAME`)",
                    ));
                }
                let mut seen = BTreeMap::new();
                for (key_name, hash) in keys {
                    check_name(&format!("{at}.api_key.keys"), key_name)?;
                    if let Some(other) = seen.insert(hash.0, key_name) {
                        return Err(err(
                            format!("{at}.api_key.keys.{key_name}"),
                            format!("has the same hash as `{other}`: one key would have two names"),
                        ));
                    }
                }
            }
            AuthenticatorSpec::Jwt {
                issuer,
                jwks_file,
                jwks_url,
                jwks_ca,
                leeway,
                forward_claims,
                audiences,
                ..
            } => {
                if issuer.trim().is_empty() {
                    return Err(err(
                        format!("{at}.jwt.issuer"),
                        "must name the tokens' `iss`",
                    ));
                }
                match (jwks_file, jwks_url) {
                    (None, None) | (Some(_), Some(_)) => {
                        return Err(err(
                            format!("{at}.jwt"),
                            "needs exactly one of `jwks_file` (a JWKS JSON file) and `jwks_url`",
                        ));
                    }
                    (Some(f), None) if !f.is_absolute() => {
                        return Err(err(
                            format!("{at}.jwt.jwks_file"),
                            format!(
                                "`{}` must be an absolute path: the agent reads it, from its own directory",
                                f.display()
                            ),
                        ));
                    }
                    (None, Some(url))
                        if !(url.starts_with("https://") || url.starts_with("http://")) =>
                    {
                        return Err(err(
                            format!("{at}.jwt.jwks_url"),
                            format!("`{url}` must be an http:// or https:// URL"),
                        ));
                    }
                    _ => {}
                }
                if jwks_ca.is_some()
                    && !jwks_url
                        .as_deref()
                        .is_some_and(|u| u.starts_with("https://"))
                {
                    return Err(err(
                        format!("{at}.jwt.jwks_ca"),
                        "is only for an https:// `jwks_url`",
                    ));
                }
                if *leeway > Duration::from_secs(300) {
                    return Err(err(
                        format!("{at}.jwt.leeway"),
                        "at most 5m: a larger one lets expired tokens in",
                    ));
                }
                if audiences.iter().any(|a| a.trim().is_empty()) {
                    return Err(err(format!("{at}.jwt.audiences"), "an audience is empty"));
                }
                for (claim, header) in forward_claims {
                    let field = format!("{at}.jwt.forward_claims.{claim}");
                    if !is_header_name(header) {
                        return Err(err(
                            field,
                            format!("`{header}` is not a lower-case HTTP header name"),
                        ));
                    }
                    if RESERVED_HEADERS.contains(&header.as_str()) || header.starts_with("x-hms-") {
                        return Err(err(
                            field,
                            format!(
                                "`{header}` is HTTP's or the mesh's own; pick a header of its own like `x-user`"
                            ),
                        ));
                    }
                }
            }
            AuthenticatorSpec::ClientCert { ca } => {
                if !ca.is_absolute() {
                    return Err(err(
                        format!("{at}.client_cert.ca"),
                        format!("`{}` must be an absolute path to a PEM file", ca.display()),
                    ));
                }
            }
        }
    }
    Ok(())
}

impl RouteDoorSpec {
    /// The rules of a route's door fields; `field`s are relative to the route.
    pub fn validate(
        &self,
        authenticators: &BTreeMap<String, AuthenticatorSpec>,
    ) -> Result<(), DoorError> {
        let auth = match &self.auth {
            Some(name) => match authenticators.get(name) {
                Some(a) => Some(a),
                None => {
                    let known: Vec<&str> = authenticators.keys().map(String::as_str).collect();
                    return Err(err(
                        "auth",
                        if known.is_empty() {
                            format!("`{name}` is not declared: add it under `authenticators:`")
                        } else {
                            format!(
                                "`{name}` is not declared; the spec's authenticators are {}",
                                known.join(", ")
                            )
                        },
                    ));
                }
            },
            None => None,
        };
        if let Some(limit) = &self.rate_limit {
            match (limit.by, auth) {
                (Some(ClientKey::Key), Some(AuthenticatorSpec::ApiKey { .. })) => {}
                (Some(ClientKey::Key), _) => {
                    return Err(err(
                        "rate_limit.by",
                        "`key` needs `auth:` to name an `api_key` authenticator; use `subject` or `address`",
                    ));
                }
                (Some(ClientKey::Subject), None) => {
                    return Err(err(
                        "rate_limit.by",
                        "`subject` needs `auth:` on the route (without it callers have no subject); use `address`",
                    ));
                }
                _ => {}
            }
            if limit.burst == Some(0) {
                return Err(err("rate_limit.burst", "must be at least 1"));
            }
            if !(1..=1_000_000).contains(&limit.max_clients_or_default()) {
                return Err(err("rate_limit.max_clients", "must be from 1 to 1000000"));
            }
        }
        if let Some(cors) = &self.cors {
            validate_cors(cors)?;
        }
        Ok(())
    }
}

fn validate_cors(cors: &CorsSpec) -> Result<(), DoorError> {
    if cors.allow_origins.is_empty() {
        return Err(err(
            "cors.allow_origins",
            "needs at least one origin (or `*`)",
        ));
    }
    for origin in &cors.allow_origins {
        if origin == "*" {
            if cors.allow_credentials {
                return Err(err(
                    "cors.allow_origins",
                    "`*` cannot go with `allow_credentials: true` (browsers refuse it); list the origins",
                ));
            }
            continue;
        }
        let ok = ["http://", "https://"].iter().any(|scheme| {
            origin.strip_prefix(scheme).is_some_and(|rest| {
                !rest.is_empty()
                    && rest.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'-' | b'.' | b':' | b'[' | b']')
                    })
            })
        });
        if !ok {
            return Err(err(
                "cors.allow_origins",
                format!(
                    "`{origin}` is not an origin: write scheme, host and port only, lower-case, like `https://shop.example.com` (no path, no trailing `/`)"
                ),
            ));
        }
    }
    for method in &cors.allow_methods {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(err(
                "cors.allow_methods",
                format!("`{method}` is not a method; write it upper-case, like `PUT`"),
            ));
        }
    }
    for (field, list) in [
        ("cors.allow_headers", &cors.allow_headers),
        ("cors.expose_headers", &cors.expose_headers),
    ] {
        for h in list {
            if !(is_header_name(h) || (h == "*" && field == "cors.allow_headers")) {
                return Err(err(
                    field,
                    format!("`{h}` is not a lower-case HTTP header name"),
                ));
            }
        }
    }
    if cors.allow_credentials && cors.allow_headers.iter().any(|h| h == "*") {
        return Err(err(
            "cors.allow_headers",
            "`*` cannot go with `allow_credentials: true` (browsers take it literally); list the headers",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        authenticators: BTreeMap<String, AuthenticatorSpec>,
        #[serde(default)]
        routes: Vec<Route>,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Route {
        name: String,
        #[serde(flatten)]
        door: RouteDoorSpec,
    }

    fn parse(yaml: &str) -> Result<Doc, String> {
        serde_saphyr::from_str::<Doc>(yaml).map_err(|e| e.without_snippet().to_string())
    }

    const FULL: &str = r#"
authenticators:
  partners:
    api_key:
      keys:
        acme: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
  users:
    jwt:
      issuer: https://id.example.com
      audiences: [shop]
      jwks_url: https://id.example.com/.well-known/jwks.json
      leeway: 10s
      forward_claims: { sub: x-user, email: x-user-email }
  staff:
    client_cert:
      ca: /etc/hms/gateway/staff-ca.pem
routes:
  - name: orders
    auth: users
    rate_limit: { rate: 10rps, burst: 20, by: subject }
    cors:
      allow_origins: ["https://shop.example.com"]
      allow_credentials: true
      max_age: 10m
    max_body: 1MiB
  - name: open
    max_body: 4096
"#;

    #[test]
    fn the_documented_example_parses_validates_and_round_trips() {
        let doc = parse(FULL).unwrap();
        validate_authenticators(&doc.authenticators).unwrap();
        for r in &doc.routes {
            r.door.validate(&doc.authenticators).unwrap();
        }
        let orders = &doc.routes[0].door;
        assert_eq!(orders.max_body, Some(1 << 20));
        assert_eq!(doc.routes[1].door.max_body, Some(4096));
        let limit = orders.rate_limit.as_ref().unwrap();
        assert_eq!((limit.rate.requests, limit.burst_or_default()), (10, 20));
        assert_eq!(limit.by_or_default(true), ClientKey::Subject);
        let AuthenticatorSpec::Jwt {
            leeway, refresh, ..
        } = &doc.authenticators["users"]
        else {
            panic!()
        };
        assert_eq!(
            (*leeway, *refresh),
            (Duration::from_secs(10), DEFAULT_JWKS_REFRESH)
        );
        let AuthenticatorSpec::ApiKey { header, keys } = &doc.authenticators["partners"] else {
            panic!()
        };
        assert_eq!(header, DEFAULT_KEY_HEADER);
        assert_eq!(keys["acme"], KeyHash::of("password"));
        // The registry keeps the spec as JSON: what is written reads back the same.
        let json = serde_json::to_string(&doc).unwrap();
        let back: Doc = serde_json::from_str(&json).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn a_bad_value_is_reported_with_its_line() {
        // A route's door fields are flattened into the route, so serde reads them from a
        // buffer: the line is the route's (`- name:`), still enough to find it.
        let e = parse("routes:\n  - name: a\n    max_body: 1 parsec\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("not a size"), "{e}");
        let e = parse(
            "authenticators:\n  k:\n    api_key:\n      keys:\n        acme: hunter2-the-real-key\n",
        )
        .unwrap_err();
        assert!(e.contains("line 5") && e.contains("not a key hash"), "{e}");
        assert!(
            !e.contains("hunter2-the-real-key"),
            "the secret is not echoed: {e}"
        );
        let e =
            parse("routes:\n  - name: a\n    rate_limit: { rate: 10 per second }\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("not a rate"), "{e}");
        let e =
            parse("authenticators:\n  u:\n    jwt: { issuer: x, jwks_file: /j, leeway: soon }\n")
                .unwrap_err();
        assert!(e.contains("line 3") && e.contains("not a duration"), "{e}");
        let e = parse("authenticators:\n  u:\n    saml: {}\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e = parse("authenticators:\n  u:\n    client_cert: { ca: /ca.pem, crl: /x }\n")
            .unwrap_err();
        assert!(e.contains("crl"), "{e}");
    }

    fn invalid(yaml: &str) -> DoorError {
        let doc = parse(yaml).unwrap();
        validate_authenticators(&doc.authenticators)
            .and_then(|_| {
                doc.routes
                    .iter()
                    .try_for_each(|r| r.door.validate(&doc.authenticators))
            })
            .unwrap_err()
    }

    #[test]
    fn rules_across_fields_name_the_field_and_what_to_do() {
        let e = invalid("routes:\n  - name: a\n    auth: nobody\n");
        assert_eq!(e.field, "auth");
        assert!(e.message.contains("authenticators:"), "{e}");
        let e = invalid("routes:\n  - name: a\n    rate_limit: { rate: 1rps, by: subject }\n");
        assert_eq!(e.field, "rate_limit.by");
        let e = invalid(
            "authenticators:\n  u: { client_cert: { ca: /ca.pem } }\nroutes:\n  - name: a\n    auth: u\n    rate_limit: { rate: 1rps, by: key }\n",
        );
        assert_eq!(e.field, "rate_limit.by");
        let e = invalid("authenticators:\n  u: { jwt: { issuer: i } }\n");
        assert_eq!(e.field, "authenticators.u.jwt");
        let e = invalid("authenticators:\n  u: { jwt: { issuer: i, jwks_file: j.json } }\n");
        assert_eq!(e.field, "authenticators.u.jwt.jwks_file");
        let e = invalid(
            "authenticators:\n  u: { jwt: { issuer: i, jwks_file: /j, forward_claims: { sub: authorization } } }\n",
        );
        assert_eq!(e.field, "authenticators.u.jwt.forward_claims.sub");
        let e =
            invalid("authenticators:\n  u: { jwt: { issuer: i, jwks_file: /j, leeway: 1h } }\n");
        assert_eq!(e.field, "authenticators.u.jwt.leeway");
        let e = invalid("authenticators:\n  U: { client_cert: { ca: /ca.pem } }\n");
        assert_eq!(e.field, "authenticators.U");
        let h = KeyHash::of("k");
        let e = invalid(&format!(
            "authenticators:\n  p: {{ api_key: {{ keys: {{ a: {h}, b: {h} }} }} }}\n"
        ));
        assert_eq!(e.field, "authenticators.p.api_key.keys.b");
        let e = invalid("authenticators:\n  p: { api_key: { keys: {} } }\n");
        assert_eq!(e.field, "authenticators.p.api_key.keys");
        let e = invalid(
            "routes:\n  - name: a\n    cors: { allow_origins: ['*'], allow_credentials: true }\n",
        );
        assert_eq!(e.field, "cors.allow_origins");
        let e =
            invalid("routes:\n  - name: a\n    cors: { allow_origins: ['https://a.example/'] }\n");
        assert_eq!(e.field, "cors.allow_origins");
        let e = invalid(
            "routes:\n  - name: a\n    cors: { allow_origins: ['https://a.example'], allow_methods: [get] }\n",
        );
        assert_eq!(e.field, "cors.allow_methods");
    }

    #[test]
    fn key_hashes_parse_print_and_new_keys_hash_to_themselves() {
        let h = KeyHash::of("password");
        assert_eq!(
            h.to_string(),
            "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
        assert_eq!(KeyHash::parse(&h.to_string()).unwrap(), h);
        assert!(KeyHash::parse("sha256:5e88").is_err());
        assert!(
            KeyHash::parse("md5:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8")
                .is_err()
        );
        let (key, hash) = new_api_key();
        assert_eq!(key.len(), 64);
        assert_eq!(KeyHash::of(&key), hash);
        assert_ne!(new_api_key().0, key);
    }

    #[test]
    fn the_gateway_spec_takes_the_door_fields_into_its_routes() {
        let yaml = "name: edge\nauthenticators:\n  p: { api_key: { keys: { a: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8 } } }\nroutes:\n  - name: r\n    auth: p\n    max_body: 10KiB\n";
        let spec: crate::gateway::GatewaySpec = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(spec.routes[0].door.auth.as_deref(), Some("p"));
        assert_eq!(spec.routes[0].door.max_body, Some(10 << 10));
    }

    #[test]
    fn the_readmes_door_example_parses_and_validates() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("## The gateway's door")
            .nth(1)
            .expect("the README's door section");
        let yaml = section
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("its example");
        let doc = parse(yaml).unwrap();
        validate_authenticators(&doc.authenticators).unwrap();
        for r in &doc.routes {
            r.door.validate(&doc.authenticators).unwrap();
        }
        assert_eq!(doc.authenticators.len(), 3);
        assert!(doc.routes[0].door.cors.is_some());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_byte_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_byte_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_byte_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_byte_size("100").unwrap(), 100);
        assert!(parse_byte_size("0").is_err());
        assert!(parse_byte_size("1.5MiB").is_err());
        assert!(parse_byte_size("99999999999999999999GiB").is_err());
        assert!(parse_byte_size("-1").is_err());
    }
}

#[cfg(test)]
mod through_the_gateway_parse {
    #[test]
    fn the_gateway_spec_parse_reports_door_rules_with_field_and_line() {
        let yaml = "name: edge\nlisteners:\n  - {name: web, port: 8080, protocol: http}\nauthenticators:\n  partners:\n    api_key:\n      keys: {}\nroutes:\n  - name: r\n    backends: [{service: a-svc}]\n";
        let e = crate::gateway::parse(yaml, "gw.yaml").unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("authenticators.partners.api_key.keys")
        );
        assert_eq!(e.line, Some(5), "{e}");
        let yaml = "name: edge\nlisteners:\n  - {name: web, port: 8080, protocol: http}\nroutes:\n  - name: r\n    backends: [{service: a-svc}]\n    auth: nobody\n";
        let e = crate::gateway::parse(yaml, "gw.yaml").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("routes[0].auth"));
        assert_eq!(e.line, Some(7), "{e}");
    }
}
