//! The gateway spec: what `hms-ctl gateway apply FILE` takes (listeners, routes, the
//! authenticators routes name), kept in the registry so every gateway host serves the same
//! routes. Owns parsing and validation; never touches the registry or a socket.
//!
//! Shaped on Gateway API's `Gateway` + `HTTPRoute`. What a route asks of callers at the door
//! (authentication, per-client rate limits, CORS, body size) is [`door`]'s.
//!
//! ```yaml
//! name: public                       # DNS label; `hms-ctl gateway describe public`
//! listeners:
//!   - name: web
//!     port: 8443                     # address: 0.0.0.0 unless given
//!     protocol: https
//!     certificates:                  # chosen by SNI (the certificate's DNS names)
//!       - cert: /etc/hms/gw/shop.pem
//!         key: /etc/hms/gw/shop.key
//!   - name: plain
//!     port: 8080
//!     protocol: http
//!     redirect_https: true           # 308 to the first https listener
//! routes:
//!   - name: pay
//!     listeners: [web]               # default: every listener
//!     hostnames: [shop.example]      # default: any; `*.example` matches one label
//!     matches:                       # any of them; default: every request
//!       - path: {prefix: /pay}       # or {exact: /pay}
//!         method: POST
//!         headers: {x-canary: "1"}
//!         query: {debug: "1"}
//!     filters:
//!       request_headers: {set: {x-from: gw}, remove: [cookie]}
//!       response_headers: {set: {x-served-by: gw}, remove: [server]}
//!       prefix_rewrite: /            # the matched prefix is replaced
//!     backends:
//!       - {service: payments-svc, weight: 90}
//!       - {service: payments-canary, weight: 10}
//!     timeout: 5s
//!     retries: 2
//! ```
//!
//! Validation happens in two steps: serde-saphyr checks the shape (unknown fields, wrong
//! types: its errors carry the line), then [`parse`] checks the values and references
//! (a route naming a listener that does not exist, weights, paths), finding the line of
//! each list entry through a second, span-only reading of the same text.

pub mod door;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::spec::{SpecError, validate_dns_label};

/// Registry blob keys of gateway specs: `gateways/<name>` holds the YAML as applied.
pub const BLOB_PREFIX: &str = "gateways/";

/// A validated gateway spec.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub name: String,
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    /// Named authenticators; a route picks one with `auth: NAME`.
    #[serde(default)]
    pub authenticators: BTreeMap<String, door::AuthenticatorSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http,
    Https,
}

/// Where the gateway accepts connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    /// The address to bind; default every IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    /// Only requests for this host name (SNI and `Host`) are served here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// https: certificate chains and keys (PEM files on each gateway host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateFiles>,
    /// http: answer every request with a redirect to the first https listener.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect_https: bool,
    /// https: a certificate for `hostname` from an ACME CA (HTTP-01: the CA fetches its
    /// challenge from this gateway's http listener on port 80 of the host name, or the
    /// port the CA validates on), renewed before it expires; `certificates` are optional then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSpec>,
}

/// Where a listener's ACME certificate comes from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AcmeSpec {
    /// The CA's directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contacts for the account, e.g. `mailto:ops@example.com`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// A PEM root for the directory's own TLS (a private or test CA); default: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_ca: Option<String>,
}

impl ListenerSpec {
    pub fn bind_ip(&self) -> IpAddr {
        self.address.unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM: the certificate chain, leaf first.
    pub cert: String,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// One route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    /// The listeners it attaches to; empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<String>,
    /// Host names it answers (`Host`/`:authority`); `*.example.com` matches one more label.
    /// Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Any one of them must match; empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchSpec>,
    #[serde(default, skip_serializing_if = "FiltersSpec::is_empty")]
    pub filters: FiltersSpec,
    /// `.svc` services and their weights; none only when the route redirects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,
    /// Overall time until the response headers arrive, retries included.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Retries after a failed attempt (default: the mesh's, one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// What the door asks of callers on this route: `auth`, `rate_limit`, `cors`, `max_body`.
    #[serde(flatten)]
    pub door: door::RouteDoorSpec,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request headers that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Query parameters that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole segments: `/pay` matches `/pay` and `/pay/x`, not `/payment`.
    Prefix(String),
}

impl PathMatch {
    pub fn text(&self) -> &str {
        match self {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FiltersSpec {
    #[serde(default, skip_serializing_if = "HeaderFilter::is_empty")]
    pub request_headers: HeaderFilter,
    #[serde(default, skip_serializing_if = "HeaderFilter::is_empty")]
    pub response_headers: HeaderFilter,
    /// Replaces the matched path prefix before the request goes to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Answers with a redirect instead of calling a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectSpec>,
}

impl FiltersSpec {
    pub fn is_empty(&self) -> bool {
        self == &FiltersSpec::default()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderFilter {
    /// Set (replace) these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderFilter {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// Each part left out keeps the request's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The whole new path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308 (default 302).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// A mesh service: requests go to `<service>.svc` through the mesh.
    pub service: String,
    /// Share of the route's requests (default 1); 0 takes the backend out.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `5s`, `500ms` in YAML; the same text in the stored form.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(t) => crate::spec::parse_duration(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Line of each list entry, read from the same text with spans only (see the module doc).
#[derive(Deserialize, Default)]
struct Lines {
    #[serde(default)]
    name: Option<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    listeners: Vec<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    routes: Vec<RouteLines>,
}

#[derive(Deserialize)]
struct RouteLines {
    #[serde(default)]
    name: Option<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    matches: Vec<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    backends: Vec<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    filters: Option<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    listeners: Option<Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    hostnames: Option<Spanned<serde::de::IgnoredAny>>,
}

fn line_of<T>(s: &Spanned<T>) -> Option<usize> {
    let l = s.referenced.line() as usize;
    (l > 0).then_some(l)
}

/// Parses and validates a gateway spec; `file` names the source in errors. Nothing about
/// the hosts it will run on is checked here (certificate files are read by the agents).
pub fn parse(yaml: &str, file: &str) -> Result<GatewaySpec, SpecError> {
    let err = |field: String, line: Option<usize>, message: String| SpecError {
        file: file.to_string(),
        line,
        field: (!field.is_empty()).then_some(field),
        message,
    };
    let spec: GatewaySpec = serde_saphyr::from_str(yaml).map_err(|e| {
        let mut line = e.location().map(|l| l.line() as usize).filter(|&l| l > 0);
        let text = e.without_snippet().to_string();
        let first = text.lines().next().unwrap_or_default().trim();
        let first = first.strip_prefix("error:").unwrap_or(first).trim_start();
        let first = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
            Some((_, after)) => after,
            None => first,
        };
        // "... at line 14, column 5": we print the line ourselves.
        let first = first.split(" at line ").next().unwrap_or(first);
        // A route's own fields sit beside the door's (flattened), so serde reports an
        // unknown one at the start of the route: point at the key itself.
        if let Some(key) = first
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            line = key_line_from(yaml, key, line.unwrap_or(1)).or(line);
        }
        err(
            String::new(),
            line,
            format!("{first} (see the example in the README's gateway section)"),
        )
    })?;
    let lines: Lines = serde_saphyr::from_str(yaml).unwrap_or_default();
    let route_line = |i: usize| {
        lines
            .routes
            .get(i)
            .and_then(|r| r.name.as_ref().and_then(line_of))
    };
    let route_part = |i: usize, pick: &dyn Fn(&RouteLines) -> Option<usize>| {
        lines.routes.get(i).and_then(pick).or_else(|| route_line(i))
    };

    validate_dns_label(&spec.name).map_err(|m| {
        err(
            "name".into(),
            lines.name.as_ref().and_then(line_of),
            format!("`{}` {m}", spec.name),
        )
    })?;
    if spec.listeners.is_empty() {
        return Err(err(
            "listeners".into(),
            None,
            "a gateway needs at least one listener, e.g. `- {name: web, port: 8443, protocol: https, certificates: [...]}`".into(),
        ));
    }
    let mut names = BTreeSet::new();
    let mut binds = BTreeSet::new();
    let first_https = spec
        .listeners
        .iter()
        .find(|l| l.protocol == Protocol::Https);
    for (i, l) in spec.listeners.iter().enumerate() {
        let line = lines.listeners.get(i).and_then(line_of);
        let f = |name: &str| format!("listeners[{i}].{name}");
        validate_dns_label(&l.name)
            .map_err(|m| err(f("name"), line, format!("`{}` {m}", l.name)))?;
        if !names.insert(l.name.as_str()) {
            return Err(err(
                f("name"),
                line,
                format!(
                    "a second listener is named `{}`; names must be unique",
                    l.name
                ),
            ));
        }
        if l.port == 0 {
            return Err(err(f("port"), line, "0 is not a port; use 1-65535".into()));
        }
        if !binds.insert((l.bind_ip(), l.port)) {
            return Err(err(
                f("port"),
                line,
                format!("another listener already takes {}:{}", l.bind_ip(), l.port),
            ));
        }
        if let Some(h) = &l.hostname {
            validate_hostname(h).map_err(|m| err(f("hostname"), line, m))?;
        }
        match l.protocol {
            Protocol::Https => {
                if l.certificates.is_empty() && l.acme.is_none() {
                    return Err(err(
                        f("certificates"),
                        line,
                        "an https listener needs `certificates: [{cert: FILE.pem, key: FILE.key}]` or `acme: {directory: URL}`"
                            .into(),
                    ));
                }
                if let Some(a) = &l.acme {
                    match &l.hostname {
                        None => {
                            return Err(err(
                                f("acme"),
                                line,
                                "needs the listener's `hostname`: the name the certificate is for"
                                    .into(),
                            ));
                        }
                        Some(h) if h.starts_with("*.") => {
                            return Err(err(
                                f("hostname"),
                                line,
                                "HTTP-01 cannot validate a wildcard name; name one host".into(),
                            ));
                        }
                        Some(_) => {}
                    }
                    if !a.directory.starts_with("https://") {
                        return Err(err(
                            f("acme.directory"),
                            line,
                            format!("`{}` is not an https URL of an ACME directory", a.directory),
                        ));
                    }
                }
                if l.redirect_https {
                    return Err(err(
                        f("redirect_https"),
                        line,
                        "is for http listeners (it sends them to https)".into(),
                    ));
                }
            }
            Protocol::Http => {
                if l.acme.is_some() {
                    return Err(err(
                        f("acme"),
                        line,
                        "is for https listeners (their certificate); use `protocol: https`".into(),
                    ));
                }
                if !l.certificates.is_empty() {
                    return Err(err(
                        f("certificates"),
                        line,
                        "an http listener has no certificates; use `protocol: https`".into(),
                    ));
                }
                if l.redirect_https && first_https.is_none() {
                    return Err(err(
                        f("redirect_https"),
                        line,
                        "needs an https listener to send requests to; add one".into(),
                    ));
                }
            }
        }
        for (j, c) in l.certificates.iter().enumerate() {
            for (what, path) in [("cert", &c.cert), ("key", &c.key)] {
                if !path.starts_with('/') {
                    return Err(err(
                        f(&format!("certificates[{j}].{what}")),
                        line,
                        format!(
                            "`{path}` must be an absolute path (the agent reads it on each gateway host)"
                        ),
                    ));
                }
            }
        }
    }
    // The door's rules (door.rs): an authenticator's line is its key's under
    // `authenticators:`; a route's door field is found from the route's line.
    door::validate_authenticators(&spec.authenticators).map_err(|e| {
        let name = e.field.split('.').nth(1).unwrap_or_default();
        let from = key_line_from(yaml, "authenticators", 1).unwrap_or(1);
        err(e.field.clone(), key_line_from(yaml, name, from), e.message)
    })?;
    let mut route_names = BTreeSet::new();
    for (i, r) in spec.routes.iter().enumerate() {
        let f = |name: &str| format!("routes[{i}].{name}");
        let line = route_line(i);
        r.door.validate(&spec.authenticators).map_err(|e| {
            let key = e.field.split('.').next().unwrap_or_default();
            let at = line.and_then(|l| key_line_from(yaml, key, l)).or(line);
            err(f(&e.field), at, e.message)
        })?;
        validate_dns_label(&r.name)
            .map_err(|m| err(f("name"), line, format!("`{}` {m}", r.name)))?;
        if !route_names.insert(r.name.as_str()) {
            return Err(err(
                f("name"),
                line,
                format!("a second route is named `{}`; names must be unique", r.name),
            ));
        }
        for l in &r.listeners {
            if !names.contains(l.as_str()) {
                return Err(err(
                    f("listeners"),
                    route_part(i, &|r| r.listeners.as_ref().and_then(line_of)),
                    format!(
                        "no listener is named `{l}`; the spec's listeners are {}",
                        names
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        for h in &r.hostnames {
            validate_hostname(h).map_err(|m| {
                err(
                    f("hostnames"),
                    route_part(i, &|r| r.hostnames.as_ref().and_then(line_of)),
                    m,
                )
            })?;
        }
        for (j, m) in r.matches.iter().enumerate() {
            let line = route_part(i, &|r| r.matches.get(j).and_then(line_of));
            let f = |name: &str| format!("routes[{i}].matches[{j}].{name}");
            if let Some(p) = &m.path {
                let t = p.text();
                if !t.starts_with('/')
                    || t.contains(['?', '#'])
                    || t.chars().any(|c| c.is_ascii_control() || c == ' ')
                {
                    return Err(err(
                        f("path"),
                        line,
                        format!(
                            "`{t}` is not a path; write it like `/pay` (starting with `/`, no query)"
                        ),
                    ));
                }
            }
            if let Some(method) = &m.method
                && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(err(
                    f("method"),
                    line,
                    format!("`{method}` is not an HTTP method; write it in capitals, like `POST`"),
                ));
            }
            for (k, v) in &m.headers {
                validate_header(k, v).map_err(|msg| err(f("headers"), line, msg))?;
            }
        }
        let filters = &r.filters;
        let fline = route_part(i, &|r| r.filters.as_ref().and_then(line_of));
        for (which, hf) in [
            ("request_headers", &filters.request_headers),
            ("response_headers", &filters.response_headers),
        ] {
            for (k, v) in &hf.set {
                validate_header(k, v)
                    .map_err(|m| err(f(&format!("filters.{which}.set")), fline, m))?;
            }
            for k in &hf.remove {
                validate_header(k, "")
                    .map_err(|m| err(f(&format!("filters.{which}.remove")), fline, m))?;
            }
        }
        if let Some(p) = &filters.prefix_rewrite {
            if !p.starts_with('/') {
                return Err(err(
                    f("filters.prefix_rewrite"),
                    fline,
                    format!("`{p}` must start with `/`"),
                ));
            }
            if r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| !matches!(m.path, Some(PathMatch::Prefix(_))))
            {
                return Err(err(f("filters.prefix_rewrite"), fline, "replaces the matched prefix, so every match of the route needs `path: {prefix: ...}`".into()));
            }
        }
        if let Some(rd) = &filters.redirect {
            if let Some(s) = &rd.scheme
                && s != "http"
                && s != "https"
            {
                return Err(err(
                    f("filters.redirect.scheme"),
                    fline,
                    format!("`{s}` must be `http` or `https`"),
                ));
            }
            if let Some(s) = rd.status
                && ![301, 302, 303, 307, 308].contains(&s)
            {
                return Err(err(
                    f("filters.redirect.status"),
                    fline,
                    format!("{s} is not a redirect; use 301, 302, 303, 307 or 308"),
                ));
            }
            if let Some(h) = &rd.hostname {
                validate_hostname(h).map_err(|m| err(f("filters.redirect.hostname"), fline, m))?;
            }
            if let Some(p) = &rd.path
                && !p.starts_with('/')
            {
                return Err(err(
                    f("filters.redirect.path"),
                    fline,
                    format!("`{p}` must start with `/`"),
                ));
            }
            if !r.backends.is_empty() {
                return Err(err(
                    f("backends"),
                    fline,
                    "a route that redirects calls no backend; drop `backends` or the redirect"
                        .into(),
                ));
            }
        } else {
            if r.backends.is_empty() {
                return Err(err(f("backends"), line, "a route needs at least one backend, e.g. `backends: [{service: payments-svc}]` (or a `filters.redirect`)".into()));
            }
            if r.backends.iter().all(|b| b.weight == 0) {
                return Err(err(f("backends"), route_part(i, &|r| r.backends.first().and_then(line_of)), "every weight is 0, so no request could be sent; give at least one backend a weight above 0".into()));
            }
        }
        for (j, b) in r.backends.iter().enumerate() {
            let line = route_part(i, &|r| r.backends.get(j).and_then(line_of));
            let service = b.service.strip_suffix(".svc").unwrap_or(&b.service);
            validate_dns_label(service).map_err(|m| {
                err(
                    f(&format!("backends[{j}].service")),
                    line,
                    format!("`{}` {m}", b.service),
                )
            })?;
        }
        if let Some(auth) = &r.door.auth
            && !spec.authenticators.contains_key(auth)
        {
            return Err(err(
                f("auth"),
                line,
                format!("no authenticator is named `{auth}`; declare it under `authenticators:`"),
            ));
        }
        if r.retries.is_some_and(|n| n > 10) {
            return Err(err(f("retries"), line, "at most 10 retries".into()));
        }
        r.door
            .validate(&spec.authenticators)
            .map_err(|e| err(f(&e.field), line, e.message))?;
    }
    door::validate_authenticators(&spec.authenticators).map_err(|e| {
        let name = e.field.split('.').nth(1).unwrap_or("authenticators");
        let line =
            key_line_from(yaml, name, 1).or_else(|| key_line_from(yaml, "authenticators", 1));
        err(e.field, line, e.message)
    })?;
    Ok(normalized(spec))
}

/// Backend names without the `.svc` the operator may have written.
fn normalized(mut spec: GatewaySpec) -> GatewaySpec {
    for r in &mut spec.routes {
        for b in &mut r.backends {
            if let Some(s) = b.service.strip_suffix(".svc") {
                b.service = s.to_string();
            }
        }
    }
    spec
}

/// 1-based line of the first `key:` at or after line `from`.
fn key_line_from(yaml: &str, key: &str, from: usize) -> Option<usize> {
    yaml.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| {
            let t = l
                .trim_start()
                .trim_start_matches("- ")
                .trim_start_matches('{');
            t.starts_with(key) && t[key.len()..].trim_start().starts_with(':')
        })
        .map(|(i, _)| i + 1)
}

/// A DNS name, or `*.` followed by one.
pub fn validate_hostname(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty()
        || name.len() > 253
        || name
            .split('.')
            .any(|l| validate_dns_label(&l.to_ascii_lowercase()).is_err())
    {
        return Err(format!(
            "`{h}` is not a host name; write it like `shop.example.com` or `*.example.com`"
        ));
    }
    Ok(())
}

fn validate_header(name: &str, value: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("`{name}` is not a header name"));
    }
    if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(format!("the value of `{name}` has control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
name: public
listeners:
  - name: web
    port: 8443
    protocol: https
    certificates:
      - cert: /etc/hms/gw/shop.pem
        key: /etc/hms/gw/shop.key
  - name: plain
    port: 8080
    protocol: http
    redirect_https: true
routes:
  - name: pay
    listeners: [web]
    hostnames: [shop.example]
    matches:
      - path: {prefix: /pay}
        method: POST
        headers: {x-canary: \"1\"}
        query: {debug: \"1\"}
    filters:
      request_headers: {set: {x-from: gw}, remove: [cookie]}
      response_headers: {set: {x-served-by: gw}, remove: [server]}
      prefix_rewrite: /
    backends:
      - {service: payments-svc, weight: 90}
      - {service: payments-canary.svc, weight: 10}
    timeout: 5s
    retries: 2
";

    fn reject(yaml: &str) -> SpecError {
        parse(yaml, "gw.yaml").expect_err("spec should be rejected")
    }

    #[test]
    fn the_module_example_parses() {
        let spec = parse(EXAMPLE, "gw.yaml").unwrap();
        assert_eq!(spec.listeners.len(), 2);
        assert_eq!(spec.listeners[0].protocol, Protocol::Https);
        let r = &spec.routes[0];
        assert_eq!(r.matches[0].path, Some(PathMatch::Prefix("/pay".into())));
        assert_eq!(r.backends[1].service, "payments-canary");
        assert_eq!(r.timeout, Some(Duration::from_secs(5)));
        assert_eq!(r.filters.prefix_rewrite.as_deref(), Some("/"));
        // The stored form reads back as the same spec.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<GatewaySpec>(&json).unwrap(), spec);
    }

    #[test]
    fn an_unknown_field_names_its_line() {
        let e = reject(&EXAMPLE.replace("    retries: 2", "    retires: 2"));
        assert_eq!(e.line, Some(30), "{e}");
        assert!(e.to_string().contains("retires"), "{e}");
    }

    #[test]
    fn a_route_naming_a_missing_listener_names_field_and_line() {
        let e = reject(&EXAMPLE.replace("listeners: [web]", "listeners: [webb]"));
        assert_eq!(e.field.as_deref(), Some("routes[0].listeners"), "{e}");
        assert_eq!(e.line, Some(15), "{e}");
        assert!(e.message.contains("`webb`"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_their_field() {
        for (from, to, field) in [
            ("weight: 10}", "weight: -1}", ""),
            (
                "method: POST",
                "method: post",
                "routes[0].matches[0].method",
            ),
            (
                "{prefix: /pay}",
                "{prefix: pay}",
                "routes[0].matches[0].path",
            ),
            ("protocol: http\n", "protocol: ftp\n", ""),
            ("timeout: 5s", "timeout: soon", ""),
            ("name: web\n", "name: plain\n", "listeners[1].name"),
        ] {
            let e = reject(&EXAMPLE.replace(from, to));
            assert_eq!(
                e.field.as_deref().unwrap_or(""),
                field,
                "{from} -> {to}: {e}"
            );
            assert!(e.line.is_some(), "{from} -> {to}: {e}");
        }
        let e = reject(
            &EXAMPLE
                .replace("weight: 90", "weight: 0")
                .replace("weight: 10", "weight: 0"),
        );
        assert_eq!(e.field.as_deref(), Some("routes[0].backends"));
        assert_eq!(e.line, Some(27), "{e}");
    }

    #[test]
    fn the_readme_example_is_a_valid_spec() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## The gateway: the mesh's door")
            .nth(1)
            .expect("README has the gateway section");
        let yaml = section
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("the section has a yaml block");
        let spec = parse(yaml, "README.md").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.listeners.len(), 2);
        assert_eq!(spec.routes.len(), 2);
    }

    #[test]
    fn a_redirect_route_needs_no_backend() {
        let yaml = "name: g\nlisteners: [{name: a, port: 80, protocol: http}]\nroutes:\n  - name: old\n    filters: {redirect: {path: /new, status: 301}}\n";
        let spec = parse(yaml, "g").unwrap();
        assert_eq!(
            spec.routes[0].filters.redirect.as_ref().unwrap().status,
            Some(301)
        );
        let e = reject(
            "name: g\nlisteners: [{name: a, port: 80, protocol: http}]\nroutes:\n  - name: old\n",
        );
        assert_eq!(e.field.as_deref(), Some("routes[0].backends"));
        assert_eq!(e.line, Some(4));
    }
}
