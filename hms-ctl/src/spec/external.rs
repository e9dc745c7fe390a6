//! An external service: a mesh name for a system outside the mesh (egress). Owns the shape
//! of `external:` and `tls:` in a spec and their validation; the agent's egress path
//! (`proxy/external.rs`) takes these values as they are. Never resolves names or reads the
//! files it names: a spec is validated on the operator's machine, the files live on the host.
//!
//! ```yaml
//! name: treasury-api
//! external: https://api.treasury.example:443   # or tcp://host:port, http://host:port
//! tls:                                         # optional, https only
//!   ca_file: /etc/hms/treasury-ca.pem          # default: the system's roots
//!   sni: api.treasury.example                  # default: the URL's host
//!   client_cert: /etc/hms/treasury-client.pem  # optional, with client_key
//!   client_key: /etc/hms/treasury-client.key
//!   min_version: "1.2"                         # "1.2" (default) or "1.3"
//! ```

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How the mesh talks to the outside system.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ExternalScheme {
    /// The mesh originates TLS; apps speak plain HTTP to `name.svc`.
    Https,
    /// Plain HTTP to the outside (no TLS); requests still get the mesh's HTTP handling.
    Http,
    /// Bytes as they come (the app's own protocol, its own TLS if any).
    Tcp,
}

impl ExternalScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            ExternalScheme::Https => "https",
            ExternalScheme::Http => "http",
            ExternalScheme::Tcp => "tcp",
        }
    }

    fn default_port(self) -> Option<u16> {
        match self {
            ExternalScheme::Https => Some(443),
            ExternalScheme::Http => Some(80),
            ExternalScheme::Tcp => None,
        }
    }
}

/// The lowest TLS version the mesh accepts from an outside system.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum TlsMinVersion {
    /// TLS 1.2 or 1.3: outside systems often still need 1.2.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// TLS options of an `https://` external service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct ExternalTls {
    /// PEM file of the roots to trust; none: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Server name sent and verified; none: the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM certificate chain presented to the outside system (with `client_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    #[serde(default)]
    pub min_version: TlsMinVersion,
}

/// Where an external service is and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct ExternalSpec {
    pub scheme: ExternalScheme,
    /// A DNS name (resolved by the agent) or a literal IP address.
    pub host: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ExternalTls>,
}

impl ExternalSpec {
    /// The name TLS verifies: `tls.sni`, else the URL's host.
    pub fn server_name(&self) -> &str {
        self.tls
            .as_ref()
            .and_then(|t| t.sni.as_deref())
            .unwrap_or(&self.host)
    }

    /// What goes into `Host` (and `:authority`) towards the outside system: its host, with
    /// the port when it is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{}]", self.host),
            _ => self.host.clone(),
        };
        if self.scheme.default_port() == Some(self.port) {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Whether the host is a literal address (no name to resolve).
    pub fn literal_ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for ExternalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{}]", self.host),
            _ => self.host.clone(),
        };
        write!(f, "{}://{host}:{}", self.scheme.as_str(), self.port)
    }
}

/// The keys `tls:` may have.
pub const TLS_KEYS: &[&str] = &["ca_file", "sni", "client_cert", "client_key", "min_version"];

/// `https://host:port`, `http://host:port` or `tcp://host:port` (no path, no user info).
pub fn parse_url(text: &str) -> Result<ExternalSpec, String> {
    const SHAPE: &str = "write it like `https://api.treasury.example:443`, `http://host:8080` or `tcp://db.example:5432`";
    let t = text.trim();
    let (scheme, rest) = t
        .split_once("://")
        .ok_or_else(|| format!("`{text}` is not a URL; {SHAPE}"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => ExternalScheme::Https,
        "http" => ExternalScheme::Http,
        "tcp" => ExternalScheme::Tcp,
        other => {
            return Err(format!(
                "`{other}://` is not supported; use `https://` (the mesh originates TLS), `http://` or `tcp://`"
            ));
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(format!(
            "`{text}` has a path; an external service is a host and port only (routes apply to the paths callers use); {SHAPE}"
        ));
    }
    if rest.contains('@') {
        return Err(format!(
            "`{text}` carries user info; put credentials in headers or `tls.client_cert`, not in the URL"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: an IPv6 address needs its closing `]`"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("`{p}` is not a TCP port; use 1 to 65535")),
        },
        None => scheme.default_port().ok_or_else(|| {
            format!("`{text}` needs a port: `tcp://` has no default one; {SHAPE}")
        })?,
    };
    let host = host.to_ascii_lowercase();
    validate_host(&host).map_err(|m| format!("host `{host}` {m}"))?;
    Ok(ExternalSpec {
        scheme,
        host,
        port,
        tls: None,
    })
}

/// A DNS name of labels (letters, digits, `-`, `_`) or a literal IP address.
fn validate_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.is_empty() || host.len() > 253 {
        return Err("must be a DNS name of 1 to 253 characters or an IP address".into());
    }
    if host.ends_with(".svc") {
        return Err("is a mesh name; an external service names a system outside the mesh".into());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "has the label `{label}`; DNS labels are 1-63 letters, digits or `-`"
            ));
        }
    }
    Ok(())
}

/// Validates `tls:` (a mapping of [`TLS_KEYS`]); errors are `(field, message)`.
pub fn parse_tls(v: Value) -> Result<ExternalTls, (String, String)> {
    let mut m: Map<String, Value> = match v {
        Value::Object(m) => m,
        _ => {
            return Err((
                "tls".into(),
                "must be a mapping like `{ca_file: /etc/hms/ca.pem, sni: api.example}`".into(),
            ));
        }
    };
    let mut text = |key: &str| -> Result<Option<String>, (String, String)> {
        match m.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s)),
            Some(_) => Err((format!("tls.{key}"), "must be non-empty text".into())),
        }
    };
    let ca_file = text("ca_file")?;
    let sni = text("sni")?;
    let client_cert = text("client_cert")?;
    let client_key = text("client_key")?;
    let min_version = match text("min_version")?.as_deref() {
        None | Some("1.2") => TlsMinVersion::Tls12,
        Some("1.3") => TlsMinVersion::Tls13,
        Some(other) => {
            return Err((
                "tls.min_version".into(),
                format!(
                    "`{other}` is not a version the mesh speaks; use \"1.2\" or \"1.3\" (quoted)"
                ),
            ));
        }
    };
    for (key, path) in [
        ("ca_file", &ca_file),
        ("client_cert", &client_cert),
        ("client_key", &client_key),
    ] {
        if let Some(p) = path
            && !p.starts_with('/')
        {
            return Err((
                format!("tls.{key}"),
                format!(
                    "`{p}` must be an absolute path (the agent reads it on its host, not where hms-ctl runs)"
                ),
            ));
        }
    }
    if client_cert.is_some() != client_key.is_some() {
        return Err((
            "tls.client_cert".into(),
            "a client certificate needs both `client_cert` and `client_key`".into(),
        ));
    }
    if let Some(s) = &sni {
        validate_host(s).map_err(|m| ("tls.sni".to_string(), format!("`{s}` {m}")))?;
        if s.parse::<IpAddr>().is_ok() {
            return Err((
                "tls.sni".into(),
                format!("`{s}` is an address; SNI carries a DNS name"),
            ));
        }
    }
    Ok(ExternalTls {
        ca_file,
        sni,
        client_cert,
        client_key,
        min_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        let e = parse_url("https://api.treasury.example").unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (ExternalScheme::Https, "api.treasury.example", 443)
        );
        assert_eq!(e.authority(), "api.treasury.example");
        let e = parse_url("https://api.treasury.example:8443/").unwrap();
        assert_eq!(e.port, 8443);
        assert_eq!(e.authority(), "api.treasury.example:8443");
        let e = parse_url("tcp://10.1.2.3:5432").unwrap();
        assert_eq!(e.literal_ip(), Some("10.1.2.3".parse().unwrap()));
        let e = parse_url("http://[fd00::1]:8080").unwrap();
        assert_eq!(e.host, "fd00::1");
        assert_eq!(e.authority(), "[fd00::1]:8080");
        assert_eq!(e.to_string(), "http://[fd00::1]:8080");
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        for (url, want) in [
            ("api.example:443", "not a URL"),
            ("ftp://a.example", "not supported"),
            ("https://a.example/pay", "has a path"),
            ("https://u:p@a.example", "user info"),
            ("tcp://db.example", "needs a port"),
            ("https://a.example:0", "not a TCP port"),
            ("https://a.example:99999", "not a TCP port"),
            ("https://bad..name", "label"),
            ("https://payments-svc.svc", "mesh name"),
            ("https://[fd00::1", "closing"),
        ] {
            let e = parse_url(url).expect_err(url);
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn tls_options_are_checked() {
        let v: Value = serde_json::json!({"ca_file": "/etc/ca.pem", "sni": "api.example", "min_version": "1.3"});
        let t = parse_tls(v).unwrap();
        assert_eq!(t.min_version, TlsMinVersion::Tls13);
        for (v, field) in [
            (serde_json::json!({"ca_file": "ca.pem"}), "tls.ca_file"),
            (
                serde_json::json!({"client_cert": "/c.pem"}),
                "tls.client_cert",
            ),
            (serde_json::json!({"min_version": "1.0"}), "tls.min_version"),
            (serde_json::json!({"sni": "10.0.0.1"}), "tls.sni"),
            (serde_json::json!("yes"), "tls"),
        ] {
            let (f, m) = parse_tls(v).expect_err(field);
            assert_eq!(f, field, "{m}");
        }
    }
}
