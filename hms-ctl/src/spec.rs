//! The service spec: what `hms-ctl deploy FILE` takes, and its validation. Owns parsing and
//! every rule a spec must satisfy; the agent calls [`parse`] on what it receives, so a rule
//! lives in exactly one place. Never touches the registry: a rejected spec changes nothing.
//!
//! ```yaml
//! name: eligibility-svc      # DNS label; callers use eligibility-svc.svc
//! port: 7000                 # where instances listen; callers may use :80 or :7000
//! replicas: [7001, 7002]     # optional: more instances on this host
//! policy: allow_from_any     # or deny_all, or {allow_from: [payments-svc]}
//! limit: 50rps               # optional (also 3000rpm)
//! routes:                    # optional per-route settings
//!   - path: /check
//!     timeout: 2s            # overall, retries included
//!     per_try_timeout: 1s    # optional: one attempt
//!     retries: 1
//! ```
//!
//! An external service (`external: https://api.example:443`, see [`external`]) has no
//! `port`, `replicas`, `cgroup` or `health`: its one endpoint is the outside system.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod external;
pub use external::{ExternalScheme, ExternalSpec, ExternalTls, TlsMinVersion};

/// A validated service spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub port: u16,
    /// Ports of further instances on this host (replicas); `port` is always an instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<u16>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub limit: Option<RateLimit>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// cgroup v2 directory (relative to the v2 root, or absolute) or systemd unit its
    /// instances run in; callers running there are this service.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Optional active health check: an HTTP path (`/healthz`) or `tcp`.
    #[serde(default)]
    pub health: Option<String>,
    /// Informational (the seed's specs carry one); HMS does not run containers.
    #[serde(default)]
    pub image: Option<String>,
    /// An outside system this service names (egress); then `port` is the outside port and
    /// the service has no instances. Boxed: few services are external, and inline it made
    /// every service's spec 128 bytes larger in every agent's registry view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<Box<ExternalSpec>>,
}

impl ServiceSpec {
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    AllowFromAny,
    DenyAll,
    AllowFrom(Vec<String>),
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::AllowFromAny => f.write_str("allow_from_any"),
            Policy::DenyAll => f.write_str("deny_all"),
            Policy::AllowFrom(names) => write!(f, "allow_from: [{}]", names.join(", ")),
        }
    }
}

/// Requests allowed per period, e.g. `50rps` or `3000rpm`, with how many may arrive at once
/// (`burst`, default one second's worth) and how many excess requests wait for a slot
/// (`queue`, default 0: excess is answered 429 at once).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per_seconds: u32,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub queue: Option<u32>,
}

impl RateLimit {
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let t = text.trim().to_ascii_lowercase();
        let (num, per_seconds) = if let Some(n) = t.strip_suffix("rps") {
            (n, 1)
        } else if let Some(n) = t.strip_suffix("rpm") {
            (n, 60)
        } else {
            return Err(format!(
                "`{text}` is not a rate; write it like `50rps` or `3000rpm`"
            ));
        };
        match num.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(RateLimit {
                requests: n,
                per_seconds,
                burst: None,
                queue: None,
            }),
            _ => Err(format!(
                "`{text}` is not a rate; the number must be a whole number above 0, like `50rps`"
            )),
        }
    }

    pub fn per_second(&self) -> f64 {
        f64::from(self.requests) / f64::from(self.per_seconds)
    }

    /// Requests that may pass at once: `burst`, else one second's worth (at least 1).
    pub fn burst_or_default(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.per_second().ceil().max(1.0) as u32)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per_seconds {
            1 => write!(f, "{}rps", self.requests)?,
            _ => write!(f, "{}rpm", self.requests)?,
        }
        if let Some(b) = self.burst {
            write!(f, " burst {b}")?;
        }
        if let Some(q) = self.queue {
            write!(f, " queue {q}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteSpec {
    /// Path prefix this route applies to.
    pub path: String,
    /// Overall time, retries included, until the response headers arrive.
    #[serde(default, with = "opt_millis")]
    pub timeout: Option<Duration>,
    /// Time one attempt may take before it is abandoned (and retried if allowed).
    #[serde(default, with = "opt_millis", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<u32>,
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Why a spec was rejected: the field, the line (when known) and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for SpecError {}

/// The keys a spec may have, in the order the README documents them.
const SPEC_KEYS: &[&str] = &[
    "name", "port", "replicas", "policy", "limit", "routes", "cgroup", "health", "image",
    "external", "tls",
];
/// The keys one entry of `routes:` may have.
const ROUTE_KEYS: &[&str] = &["path", "timeout", "per_try_timeout", "retries"];

/// Parses and validates a spec. `file` names the source in error messages.
///
/// The YAML crate only turns text into a tree (its errors are syntax errors, with their
/// line); every shape and value rule is checked here on that tree, so each message names the
/// field, its line and what to write instead, whatever the YAML crate's own wording is.
pub fn parse(yaml: &str, file: &str) -> Result<ServiceSpec, SpecError> {
    let err = |field: Option<&str>, line: Option<usize>, message: String| SpecError {
        file: file.to_string(),
        line,
        field: field.map(str::to_string),
        message,
    };
    let doc: Value = serde_saphyr::from_str(yaml).map_err(|e| {
        let (line, message) = syntax_error(&e);
        err(None, line, message)
    })?;
    let mut top = match doc {
        Value::Object(map) => map,
        // An empty file: every required field is reported missing below.
        Value::Null => Map::new(),
        other => {
            return Err(err(
                None,
                Some(1),
                format!(
                    "a spec is a mapping of fields such as `name: payments-svc` and `port: 7000`, got {}",
                    describe(&other)
                ),
            ));
        }
    };
    if let Some((line, key)) = first_unknown_key(yaml, &top, SPEC_KEYS, 0) {
        return Err(err(
            None,
            line,
            unknown_key_message(&key, SPEC_KEYS, "a spec's", top_level_hint(&key)),
        ));
    }
    let raw = RawSpec {
        name: top.remove("name"),
        port: top.remove("port"),
        replicas: top.remove("replicas"),
        policy: top.remove("policy"),
        limit: top.remove("limit"),
        routes: top.remove("routes"),
        cgroup: top.remove("cgroup"),
        health: top.remove("health"),
        image: top.remove("image"),
        external: top.remove("external"),
        tls: top.remove("tls"),
    };
    let line_of = |key: &str| key_line(yaml, key, 0);

    let name = match raw.name {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(err(
                Some("name"),
                line_of("name"),
                format!("must be a text DNS label, got {}", describe(&other)),
            ));
        }
        None => {
            return Err(err(
                Some("name"),
                None,
                "is missing; every spec needs `name: <dns-label>`".into(),
            ));
        }
    };
    validate_dns_label(&name)
        .map_err(|m| err(Some("name"), line_of("name"), format!("`{name}` {m}")))?;
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(err(
            Some("name"),
            line_of("name"),
            format!(
                "`{name}` is reserved: the mesh uses it for callers that are no service (`host`) and for its door (`gateway`); pick another name"
            ),
        ));
    }

    let external = match raw.external {
        None => None,
        Some(Value::String(url)) => Some(
            external::parse_url(&url).map_err(|m| err(Some("external"), line_of("external"), m))?,
        ),
        Some(other) => {
            return Err(err(
                Some("external"),
                line_of("external"),
                format!(
                    "must be a URL like `https://api.treasury.example:443`, got {}",
                    describe(&other)
                ),
            ));
        }
    };
    let mut external = external;
    if let Some(tls) = raw.tls {
        let Some(ext) = external
            .as_mut()
            .filter(|e| e.scheme == ExternalScheme::Https)
        else {
            return Err(err(
                Some("tls"),
                line_of("tls"),
                "only an external `https://` service has TLS options; remove `tls:` or write `external: https://HOST:PORT`".into(),
            ));
        };
        if let Value::Object(map) = &tls
            && let Some((line, key)) = first_unknown_key(yaml, map, external::TLS_KEYS, 2)
        {
            return Err(err(
                Some("tls"),
                line.or_else(|| line_of("tls")),
                unknown_key_message(&key, external::TLS_KEYS, "`tls:`'s", None),
            ));
        }
        ext.tls = Some(external::parse_tls(tls).map_err(|(field, m)| {
            let line = key_line_anywhere_after(yaml, &field, "tls").or_else(|| line_of("tls"));
            err(Some(&field), line, m)
        })?);
    }
    if let Some(ext) = &external {
        // The outside system is the one endpoint: nothing of this host's instances applies.
        for (key, present) in [
            ("port", raw.port.is_some()),
            ("replicas", raw.replicas.is_some()),
            ("cgroup", raw.cgroup.is_some()),
            ("health", raw.health.is_some()),
        ] {
            if present {
                return Err(err(
                    Some(key),
                    line_of(key),
                    format!(
                        "an external service has no instances on this host, so no `{key}`; its endpoint is `{ext}`"
                    ),
                ));
            }
        }
    }

    let port = match raw.port {
        _ if external.is_some() => external.as_ref().map_or(0, |e| e.port),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            _ => {
                return Err(err(
                    Some("port"),
                    line_of("port"),
                    format!("{n} is not a TCP port; use a number from 1 to 65535"),
                ));
            }
        },
        Some(other) => {
            return Err(err(
                Some("port"),
                line_of("port"),
                format!("must be a number from 1 to 65535, got {}", describe(&other)),
            ));
        }
        None => {
            return Err(err(
                Some("port"),
                None,
                "is missing; say where the instances listen, e.g. `port: 7000`".into(),
            ));
        }
    };

    // `replicas:` and `routes:` are lists; anything else is named with what to write.
    let list_field = |name: &str, v: Option<Value>, shape: &str| match v {
        None => Ok(Vec::new()),
        Some(Value::Array(list)) => Ok(list),
        Some(other) => Err(err(
            Some(name),
            line_of(name),
            format!("must be {shape}, got {}", describe(&other)),
        )),
    };
    let mut replicas = Vec::new();
    let replica_list = list_field(
        "replicas",
        raw.replicas,
        "a list of ports like `[7001, 7002]`",
    )?;
    for v in replica_list {
        match v.as_i64() {
            Some(p) if (1..=65535).contains(&p) && p as u16 != port => {
                if !replicas.contains(&(p as u16)) {
                    replicas.push(p as u16);
                }
            }
            _ => {
                return Err(err(
                    Some("replicas"),
                    line_of("replicas"),
                    format!(
                        "{} is not a further instance port; list TCP ports (1-65535) other than `port`",
                        describe(&v)
                    ),
                ));
            }
        }
    }

    let policy = match raw.policy {
        None => Policy::AllowFromAny,
        Some(v) => parse_policy(&v).map_err(|m| err(Some("policy"), line_of("policy"), m))?,
    };

    let limit = match raw.limit {
        None => None,
        Some(Value::String(s)) => {
            Some(RateLimit::parse(&s).map_err(|m| err(Some("limit"), line_of("limit"), m))?)
        }
        Some(other) => {
            return Err(err(
                Some("limit"),
                line_of("limit"),
                format!(
                    "must look like `50rps` or `3000rpm`, got {}",
                    describe(&other)
                ),
            ));
        }
    };

    let mut routes = Vec::new();
    let route_list = list_field(
        "routes",
        raw.routes,
        "a list of routes like `- path: /check` (with `timeout:`, `retries:` below it)",
    )?;
    for (i, entry) in route_list.into_iter().enumerate() {
        let line = nth_key_line(yaml, "path", i).or_else(|| line_of("routes"));
        let field = |f: &str| format!("routes[{i}].{f}");
        let mut r = match entry {
            Value::Object(map) => map,
            other => {
                return Err(err(
                    Some(&format!("routes[{i}]")),
                    line_of("routes"),
                    format!(
                        "must be a mapping like `- path: /check`, got {}",
                        describe(&other)
                    ),
                ));
            }
        };
        if let Some((key_line, key)) = first_unknown_key(yaml, &r, ROUTE_KEYS, 2) {
            return Err(err(
                Some(&format!("routes[{i}]")),
                key_line.or(line),
                unknown_key_message(&key, ROUTE_KEYS, "a route's", route_hint(&key)),
            ));
        }
        let path = match r.remove("path") {
            Some(Value::String(p)) => p,
            Some(other) => {
                return Err(err(
                    Some(&field("path")),
                    line,
                    format!(
                        "must be a path prefix like `/check`, got {}",
                        describe(&other)
                    ),
                ));
            }
            None => {
                return Err(err(
                    Some(&field("path")),
                    line_of("routes"),
                    "is missing; each route needs `path: /prefix`".into(),
                ));
            }
        };
        if !path.starts_with('/') {
            return Err(err(
                Some(&field("path")),
                line,
                format!("`{path}` must start with `/`"),
            ));
        }
        let duration_field = |name: &str, v: Option<Value>| match v {
            None => Ok(None),
            Some(Value::String(s)) => parse_duration(&s)
                .map(Some)
                .map_err(|m| err(Some(&field(name)), line, m)),
            Some(other) => Err(err(
                Some(&field(name)),
                line,
                format!(
                    "must be a duration like `2s` or `500ms`, got {}",
                    describe(&other)
                ),
            )),
        };
        let timeout = duration_field("timeout", r.remove("timeout"))?;
        let per_try_timeout = duration_field("per_try_timeout", r.remove("per_try_timeout"))?;
        let retries = match r.remove("retries") {
            None => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= 10 => Some(v as u32),
                _ => {
                    return Err(err(
                        Some(&field("retries")),
                        line,
                        format!("{n} is out of range; use 0 to 10"),
                    ));
                }
            },
            Some(other) => {
                return Err(err(
                    Some(&field("retries")),
                    line,
                    format!("must be a number from 0 to 10, got {}", describe(&other)),
                ));
            }
        };
        routes.push(RouteSpec {
            path,
            timeout,
            per_try_timeout,
            retries,
        });
    }

    let text_field = |name: &str, v: Option<Value>, example: &str| match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(err(
            Some(name),
            line_of(name),
            format!("must be text like `{example}`, got {}", describe(&other)),
        )),
    };
    let cgroup = text_field("cgroup", raw.cgroup, "payments.service")?;
    if let Some(c) = &cgroup {
        validate_cgroup(c).map_err(|m| err(Some("cgroup"), line_of("cgroup"), m))?;
    }
    let health = text_field("health", raw.health, "/healthz")?;
    let image = text_field("image", raw.image, "hms/eligibility:latest")?;
    if let Some(h) = &health
        && h != "tcp"
        && !h.starts_with('/')
    {
        return Err(err(
            Some("health"),
            line_of("health"),
            format!("`{h}` must be an HTTP path like `/healthz` or the word `tcp`"),
        ));
    }

    Ok(ServiceSpec {
        name,
        port,
        replicas,
        policy,
        limit,
        routes,
        cgroup,
        health,
        image,
        external: external.map(Box::new),
    })
}

/// The line of `field`'s last segment (`tls.ca_file` -> `ca_file:`) below `parent:`.
fn key_line_anywhere_after(yaml: &str, field: &str, parent: &str) -> Option<usize> {
    let key = field.rsplit('.').next()?;
    let start = key_line(yaml, parent, 0)?;
    yaml.lines()
        .enumerate()
        .skip(start)
        .take_while(|(_, l)| l.starts_with(' ') || l.trim().is_empty())
        .find(|(_, l)| {
            let t = l.trim_start();
            t.starts_with(key) && t[key.len()..].trim_start().starts_with(':')
        })
        .map(|(i, _)| i + 1)
}

fn parse_policy(v: &Value) -> Result<Policy, String> {
    const HINT: &str = "use `allow_from_any`, `deny_all`, or `{allow_from: [service, ...]}`";
    match v {
        Value::String(s) => match s.as_str() {
            "allow_from_any" => Ok(Policy::AllowFromAny),
            "deny_all" => Ok(Policy::DenyAll),
            other => Err(format!("`{other}` is not a policy; {HINT}")),
        },
        Value::Object(m) => {
            if m.len() != 1 {
                return Err(format!("has {} keys; {HINT}", m.len()));
            }
            let list = m
                .get("allow_from")
                .ok_or_else(|| format!("only `allow_from` may appear here; {HINT}"))?;
            let seq = list
                .as_array()
                .ok_or_else(|| format!("`allow_from` must be a list of service names; {HINT}"))?;
            let mut names = Vec::new();
            for item in seq {
                let name = item.as_str().ok_or_else(|| {
                    format!(
                        "`allow_from` entries must be service names, got {}",
                        describe(item)
                    )
                })?;
                validate_dns_label(name).map_err(|m| format!("allow_from entry `{name}` {m}"))?;
                names.push(name.to_string());
            }
            Ok(Policy::AllowFrom(names))
        }
        other => Err(format!("got {}; {HINT}", describe(other))),
    }
}

/// The top-level fields of a spec, taken out of the YAML tree for validation.
struct RawSpec {
    name: Option<Value>,
    port: Option<Value>,
    replicas: Option<Value>,
    policy: Option<Value>,
    limit: Option<Value>,
    routes: Option<Value>,
    cgroup: Option<Value>,
    health: Option<Value>,
    image: Option<Value>,
    external: Option<Value>,
    tls: Option<Value>,
}

/// Names a spec may not take: `host` is how taps, policies and logs name a caller in no
/// service's cgroup, and `gateway` is the mesh's door; a service with either name would be
/// indistinguishable from them.
pub const RESERVED_NAMES: &[&str] = &["host", "gateway"];

/// The line and message of a YAML syntax error, without the crate's own "line X column Y"
/// prefix and source snippet (we print `file:line:` ourselves).
fn syntax_error(e: &serde_saphyr::Error) -> (Option<usize>, String) {
    let line = e.location().map(|l| l.line() as usize).filter(|&l| l > 0);
    let text = e.without_snippet().to_string();
    let mut message = text.lines().next().unwrap_or_default().trim();
    message = message
        .strip_prefix("error:")
        .unwrap_or(message)
        .trim_start();
    if let Some(rest) = message.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
    {
        message = after;
    }
    (line, format!("not valid YAML: {message}"))
}

/// The unknown key that comes first in the file (with its line), if any.
fn first_unknown_key(
    yaml: &str,
    map: &Map<String, Value>,
    known: &[&str],
    indent: usize,
) -> Option<(Option<usize>, String)> {
    map.keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| (line_of_key_anywhere(yaml, k, indent), k.clone()))
        .min_by_key(|(line, _)| line.unwrap_or(usize::MAX))
}

/// 1-based line of `key:` at `indent` or deeper (route keys sit under `- `).
fn line_of_key_anywhere(yaml: &str, key: &str, indent: usize) -> Option<usize> {
    yaml.lines()
        .position(|l| {
            let lead = l.len() - l.trim_start().len();
            let t = l.trim_start().trim_start_matches("- ");
            lead >= indent && t.starts_with(key) && t[key.len()..].trim_start().starts_with(':')
        })
        .map(|i| i + 1)
}

/// "unknown field `x`" with the likeliest intended field, else the list of known ones.
/// `whose` names the owner of the fields in the message ("a spec's", "a route's").
fn unknown_key_message(key: &str, known: &[&str], whose: &str, hint: Option<String>) -> String {
    let advice = hint
        .or_else(|| closest(key, known).map(|k| format!("did you mean `{k}`?")))
        .unwrap_or_else(|| "remove it or fix its spelling".to_string());
    let list = known
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("unknown field `{key}` ({advice}); {whose} fields are {list}")
}

/// Mistakes people make at the top level, with what they meant.
fn top_level_hint(key: &str) -> Option<String> {
    let hint = match key {
        "allow_from" => "did you mean `policy: {allow_from: [...]}`?",
        "allow_from_any" | "deny_all" => "a policy goes under `policy:`, e.g. `policy: deny_all`",
        "timeout" | "per_try_timeout" | "retries" | "path" => {
            "that belongs to a route: `routes: [{path: /, timeout: 2s, retries: 1}]`"
        }
        "rate" | "rate_limit" | "ratelimit" | "rps" => "did you mean `limit: 50rps`?",
        "healthcheck" | "health_check" | "healthz" => "did you mean `health: /healthz`?",
        "ports" | "instances" => {
            "did you mean `port: 7000` and, for more instances, `replicas: [7001, 7002]`?"
        }
        "service" | "svc" | "service_name" => "did you mean `name: payments-svc`?",
        "route" => "did you mean `routes:` (a list)?",
        "replica" => "did you mean `replicas: [7001, 7002]`?",
        "container" | "images" => "did you mean `image:` (informational only)?",
        _ => return None,
    };
    Some(hint.to_string())
}

/// Mistakes people make inside a route.
fn route_hint(key: &str) -> Option<String> {
    let hint = match key {
        "prefix" | "path_prefix" | "match" => "did you mean `path: /prefix`?",
        "timeout_ms" | "timeout_seconds" => {
            "did you mean `timeout: 2s` (a duration with its unit)?"
        }
        "retry" | "max_retries" | "attempts" => "did you mean `retries: 1`?",
        "per_try" | "try_timeout" => "did you mean `per_try_timeout: 1s`?",
        _ => return None,
    };
    Some(hint.to_string())
}

/// The known key within two edits of `key`, if exactly one is closest.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        let d = edit_distance(key, k);
        if d <= 2 && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

/// Levenshtein distance; spec keys are short, so the quadratic table is fine. (No crate: a
/// dozen lines, and the one use is this hint.)
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The rules a route must satisfy, for routes set with `hms-ctl route set` (spec files go
/// through [`parse`], which applies the same limits).
/// Top-level cgroups systemd (and the kernel) put many processes under: never one
/// service's own.
const SHARED_CGROUPS: &[&str] = &[
    "system.slice",
    "user.slice",
    "machine.slice",
    "-.slice",
    "init.scope",
];
/// Where cgroup v2 is mounted: an absolute `cgroup:` equal to one of these is the whole tree.
const CGROUP_MOUNTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// A spec's `cgroup:` must be the service's own leaf (callers running there ARE the
/// service): a unit like `payments.service`, or a directory of its own such as
/// `hms/payments` or `/sys/fs/cgroup/hms/payments`. Never the root (`/`, empty), a path with
/// empty, `.` or `..` segments, or a cgroup shared by many processes (`system.slice`,
/// `user.slice`, `user-1000.slice`, `user@1000.service`, `machine.slice`, `init.scope`).
pub fn validate_cgroup(cgroup: &str) -> Result<(), String> {
    const INSTEAD: &str = "name the service's own unit (`payments.service`) or a directory of its own (`hms/payments`)";
    let c = cgroup.trim();
    let absolute = c.starts_with('/');
    let rel = c.trim_start_matches('/');
    if rel.is_empty() {
        return Err(format!(
            "`{cgroup}` is the root of the cgroup tree: every process on the host would be this service; {INSTEAD}"
        ));
    }
    let segments: Vec<&str> = rel.split('/').collect();
    if let Some(bad) = segments
        .iter()
        .find(|s| s.is_empty() || **s == "." || **s == "..")
    {
        let what = if bad.is_empty() {
            "an empty segment (`//` or a trailing `/`)".to_string()
        } else {
            format!("a `{bad}` segment")
        };
        return Err(format!(
            "`{cgroup}` has {what}; write the path plainly, e.g. `hms/payments`"
        ));
    }
    let normalized = format!("/{rel}");
    if absolute && CGROUP_MOUNTS.iter().any(|m| normalized == *m) {
        return Err(format!(
            "`{cgroup}` is where the cgroup tree is mounted: every process on the host would be this service; {INSTEAD}"
        ));
    }
    // The part below the mount, for absolute paths under it.
    let below: Vec<&str> = match CGROUP_MOUNTS
        .iter()
        .rev()
        .find_map(|m| normalized.strip_prefix(&format!("{m}/")))
    {
        Some(rest) if absolute => rest.split('/').collect(),
        _ => segments.clone(),
    };
    let last = below.last().copied().unwrap_or_default();
    let shared_top = below.len() == 1 && SHARED_CGROUPS.contains(&last);
    let user_slice = |s: &str| {
        s.strip_prefix("user-")
            .and_then(|r| r.strip_suffix(".slice"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let user_manager = |s: &str| {
        s.strip_prefix("user@")
            .and_then(|r| r.strip_suffix(".service"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    if shared_top || user_slice(last) || user_manager(last) {
        return Err(format!(
            "`{cgroup}` holds many other processes (an ancestor, not a service's own cgroup): they would all be this service; {INSTEAD}"
        ));
    }
    Ok(())
}

pub fn validate_route(route: &RouteSpec) -> Result<(), String> {
    if !route.path.starts_with('/') {
        return Err(format!("path `{}` must start with `/`", route.path));
    }
    if let Some(r) = route.retries
        && r > 10
    {
        return Err(format!("retries {r} is out of range; use 0 to 10"));
    }
    for t in [route.timeout, route.per_try_timeout].into_iter().flatten() {
        if t.is_zero() || t > Duration::from_secs(3600) {
            return Err("timeouts must be above 0 and at most 1h".into());
        }
    }
    Ok(())
}

/// RFC 1123 label: 1-63 of `a-z0-9-`, not starting or ending with `-`. Upper case is rejected
/// rather than folded so the name in the spec is the name callers use.
pub fn validate_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters long".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(
            "may only contain lower-case letters, digits and `-` (it becomes `<name>.svc`)".into(),
        );
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not start or end with `-`".into());
    }
    Ok(())
}

/// `2s`, `500ms`, `1m`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("`{text}` is not a duration; write it like `2s`, `500ms` or `1m`");
    let (num, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * unit_ms > 3_600_000.0 {
        return Err(format!("`{text}` must be above 0 and at most 1h"));
    }
    Ok(Duration::from_millis((v * unit_ms).round() as u64))
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("`{s}`"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// 1-based line of the first `key:` at the given indentation.
fn key_line(yaml: &str, key: &str, indent: usize) -> Option<usize> {
    yaml.lines()
        .position(|l| {
            l.len() > indent
                && l[..indent].trim().is_empty()
                && l[indent..].starts_with(key)
                && l[indent + key.len()..].trim_start().starts_with(':')
        })
        .map(|i| i + 1)
}

/// 1-based line of the n-th `key:` anywhere (list items included), for per-route errors.
fn nth_key_line(yaml: &str, key: &str, n: usize) -> Option<usize> {
    yaml.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(key) && t[key.len()..].trim_start().starts_with(':')
        })
        .nth(n)
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(yaml: &str) -> SpecError {
        parse(yaml, "svc.yaml").expect_err("spec should be rejected")
    }

    #[test]
    fn the_design_example_parses() {
        let spec = parse(
            "name: eligibility-svc\nport: 7000\npolicy: allow_from_any\nlimit: 50rps\nroutes:\n  - path: /check\n    timeout: 2s\n    retries: 1\n",
            "svc.yaml",
        )
        .unwrap();
        assert_eq!(spec.name, "eligibility-svc");
        assert_eq!(spec.port, 7000);
        assert_eq!(spec.policy, Policy::AllowFromAny);
        assert_eq!(
            spec.limit,
            Some(RateLimit {
                requests: 50,
                per_seconds: 1,
                burst: None,
                queue: None
            })
        );
        assert_eq!(spec.routes[0].timeout, Some(Duration::from_secs(2)));
        assert_eq!(spec.routes[0].retries, Some(1));
    }

    #[test]
    fn the_seed_six_line_spec_with_image_parses() {
        let spec = parse(
            "name: eligibility-svc\nport: 7000\nimage: hms/eligibility:latest\npolicy: allow_from_any   # mesh ACL\n",
            "svc.yaml",
        )
        .unwrap();
        assert_eq!(spec.image.as_deref(), Some("hms/eligibility:latest"));
    }

    #[test]
    fn the_seed_chapter_spec_deploys_as_printed() {
        // Section 5 of the seed chapter, byte for byte.
        let seed = "# services/eligibility-svc.yaml\nname: eligibility-svc\nport: 7000\nimage: hms/eligibility:latest\npolicy: allow_from_any   # mesh ACL; refine later\n";
        let spec = parse(seed, "services/eligibility-svc.yaml").unwrap();
        assert_eq!((spec.name.as_str(), spec.port), ("eligibility-svc", 7000));
        assert_eq!(spec.policy, Policy::AllowFromAny);
    }

    #[test]
    fn replicas_are_further_instance_ports() {
        let spec = parse("name: a\nport: 7000\nreplicas: [7001, 7002]\n", "f").unwrap();
        assert_eq!(spec.replicas, vec![7001, 7002]);
        assert_eq!(
            reject("name: a\nport: 7000\nreplicas: [7000]\n")
                .field
                .as_deref(),
            Some("replicas")
        );
    }

    #[test]
    fn allow_from_list_parses() {
        let spec = parse(
            "name: eligibility-svc\nport: 7000\npolicy:\n  allow_from: [payments-svc, identity-svc]\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            spec.policy,
            Policy::AllowFrom(vec!["payments-svc".into(), "identity-svc".into()])
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = reject("name: a\nport: 7000\nprot: 8\n");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("unknown field `prot`"), "{e}");
    }

    #[test]
    fn bad_name_names_field_and_line() {
        let e = reject("port: 7000\nname: Payments_Svc\n");
        assert_eq!(e.field.as_deref(), Some("name"));
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().starts_with("svc.yaml:2: field `name`"), "{e}");
    }

    #[test]
    fn bad_ports_are_rejected() {
        for p in ["0", "70000", "-1", "http"] {
            let e = reject(&format!("name: a\nport: {p}\n"));
            assert_eq!(e.field.as_deref(), Some("port"), "{p}: {e}");
            assert_eq!(e.line, Some(2));
        }
        assert_eq!(reject("name: a\n").field.as_deref(), Some("port"));
    }

    #[test]
    fn bad_policy_limit_and_route_values_are_rejected() {
        assert_eq!(
            reject("name: a\nport: 1\npolicy: allow_some\n")
                .field
                .as_deref(),
            Some("policy")
        );
        assert_eq!(
            reject("name: a\nport: 1\nlimit: fast\n").field.as_deref(),
            Some("limit")
        );
        let e =
            reject("name: a\nport: 1\nroutes:\n  - path: /a\n  - path: /b\n    timeout: soon\n");
        assert_eq!(e.field.as_deref(), Some("routes[1].timeout"));
        assert_eq!(e.line, Some(5));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for y in [
            "",
            ":::",
            "- a\n- b\n",
            "name: [\n",
            "\u{0}\u{1}",
            "name: a\nport: 1\nroutes: 5\n",
        ] {
            let _ = parse(y, "f");
        }
    }

    #[test]
    fn near_misses_get_a_hint_naming_what_was_meant() {
        let cases = [
            (
                "name: a\nport: 1\nallow_from: [payments-svc]\n",
                3,
                "did you mean `policy: {allow_from: [...]}`?",
            ),
            ("name: a\nport: 1\ndeny_all: true\n", 3, "under `policy:`"),
            ("name: a\nport: 1\ntimeout: 2s\n", 3, "belongs to a route"),
            ("name: a\nport: 1\nrate_limit: 5rps\n", 3, "`limit: 50rps`"),
            (
                "name: a\nport: 1\nreplica: [2]\n",
                3,
                "`replicas: [7001, 7002]`",
            ),
            ("name: a\nport: 1\nhelth: /h\n", 3, "did you mean `health`?"),
            (
                "name: a\nport: 1\nroutes:\n  - path: /a\n    timeout_ms: 200\n",
                5,
                "`timeout: 2s`",
            ),
            (
                "name: a\nport: 1\nroutes:\n  - path: /a\n    retires: 2\n",
                5,
                "did you mean `retries`?",
            ),
        ];
        for (yaml, line, hint) in cases {
            let e = reject(yaml);
            assert_eq!(e.line, Some(line), "{yaml:?}: {e}");
            assert!(e.message.contains(hint), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn a_cgroup_must_be_the_service_s_own_leaf() {
        for good in [
            "payments.service",
            "hms/payments",
            "system.slice/payments.service",
            "/sys/fs/cgroup/hms/payments",
            "/sys/fs/cgroup/system.slice/payments.service",
            "payments.slice",
            "user.slice/user-1000.slice/app.scope",
        ] {
            validate_cgroup(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "/",
            "",
            " ",
            "//",
            ".",
            "..",
            "hms/./payments",
            "hms//payments",
            "hms/payments/",
            "hms/../..",
            "system.slice",
            "/system.slice",
            "user.slice",
            "machine.slice",
            "init.scope",
            "-.slice",
            "user.slice/user-1000.slice",
            "user.slice/user-1000.slice/user@1000.service",
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/system.slice",
            "/sys/fs/cgroup/unified/user.slice",
        ] {
            let e = validate_cgroup(bad).expect_err(bad);
            assert!(e.contains('`'), "{bad}: {e}");
        }
        let e = reject("name: a\nport: 1\ncgroup: system.slice\n");
        assert_eq!(e.field.as_deref(), Some("cgroup"), "{e}");
        assert!(
            e.message.contains("payments.service"),
            "says what to use: {e}"
        );
    }

    #[test]
    fn wrong_shapes_say_what_shape_is_wanted() {
        let e = reject("name: a\nport: 1\nroutes: 5\n");
        assert_eq!(
            (e.field.as_deref(), e.line),
            (Some("routes"), Some(3)),
            "{e}"
        );
        assert!(e.message.contains("must be a list of routes"), "{e}");
        let e = reject("- a\n- b\n");
        assert!(e.message.contains("a spec is a mapping"), "{e}");
        let e = reject("name: a\nport: 1\ncgroup: [x]\n");
        assert_eq!(e.field.as_deref(), Some("cgroup"), "{e}");
        let e = reject("name: a\nport: 1\nreplicas: 7001\n");
        assert!(e.message.contains("list of ports"), "{e}");
    }

    #[test]
    fn yaml_syntax_errors_carry_their_line() {
        let e = reject("name: a\nport: 1\npolicy: [\n");
        assert!(e.line.is_some(), "{e}");
        assert!(e.message.starts_with("not valid YAML: "), "{e}");
        assert!(!e.message.contains('\n'), "one line, no snippet: {e}");
        let e = reject("name: a\nport: 1\nport: 2\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("duplicate"), "{e}");
    }

    #[test]
    fn an_external_service_names_an_outside_system() {
        let spec = parse(
            "name: treasury-api\nexternal: https://api.treasury.example:443\ntls:\n  ca_file: /etc/hms/treasury-ca.pem\n  min_version: \"1.3\"\npolicy: {allow_from: [payments-svc]}\nlimit: 5rps\nroutes:\n  - path: /\n    timeout: 2s\n",
            "treasury.yaml",
        )
        .unwrap();
        let ext = spec.external.as_ref().unwrap();
        assert_eq!(ext.server_name(), "api.treasury.example");
        assert_eq!(spec.port, 443, "the outside port");
        assert!(spec.replicas.is_empty());
        assert_eq!(ext.tls.as_ref().unwrap().min_version, TlsMinVersion::Tls13);
        // Round trip through the registry's JSON keeps every field.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ServiceSpec>(&json).unwrap(), spec);
        // A spec of before egress (no `external`) still reads.
        let old: ServiceSpec = serde_json::from_str(
            r#"{"name":"a","port":7000,"policy":"allow_from_any","limit":null,"routes":[],"cgroup":null,"health":null,"image":null}"#,
        )
        .unwrap();
        assert!(!old.is_external());
    }

    #[test]
    fn an_external_service_has_no_instances_and_tls_only_with_https() {
        let e = reject("name: t\nexternal: https://a.example\nport: 7000\n");
        assert_eq!((e.field.as_deref(), e.line), (Some("port"), Some(3)));
        assert!(e.message.contains("no instances"), "{e}");
        let e = reject("name: t\nexternal: tcp://a.example:5432\ntls:\n  sni: a.example\n");
        assert_eq!(e.field.as_deref(), Some("tls"));
        let e = reject("name: t\nexternal: https://a.example\ntls:\n  ca_fle: /x.pem\n");
        assert!(e.message.contains("did you mean `ca_file`"), "{e}");
        assert_eq!(e.line, Some(4));
        let e = reject(
            "name: t\nexternal: https://a.example\ntls:\n  sni: a.example\n  ca_file: rel.pem\n",
        );
        assert_eq!((e.field.as_deref(), e.line), (Some("tls.ca_file"), Some(5)));
        let e = reject("name: t\nexternal: https://a.example/pay\n");
        assert_eq!((e.field.as_deref(), e.line), (Some("external"), Some(2)));
        let e = reject("name: t\nexternal: 443\n");
        assert!(e.message.contains("must be a URL"), "{e}");
    }

    #[test]
    fn host_and_gateway_are_not_service_names() {
        for name in ["host", "gateway"] {
            let e = reject(&format!("name: {name}\nport: 7000\n"));
            assert_eq!(e.field.as_deref(), Some("name"));
            assert!(e.message.contains("reserved"), "{e}");
        }
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert_eq!(RateLimit::parse("3000rpm").unwrap().per_second(), 50.0);
        assert!(RateLimit::parse("0rps").is_err());
    }
}

/// Every rejection a user is likely to meet, with the whole message `hms-ctl deploy` prints.
/// Pinned before the move from serde_yaml to serde-saphyr so the switch could not make any of
/// them worse; a change here must keep the file, the line and the field.
#[cfg(test)]
mod pinned_messages {
    use super::parse;

    const CASES: &[(&str, &str)] = &[
        (
            "name: a\nport: 7000\nprot: 8\n",
            "svc.yaml:3: unknown field `prot` (did you mean `port`?); a spec's fields are `name`, `port`, `replicas`, `policy`, `limit`, `routes`, `cgroup`, `health`, `image`, `external`, `tls`",
        ),
        (
            "port: 7000\nname: Payments_Svc\n",
            "svc.yaml:2: field `name`: `Payments_Svc` may only contain lower-case letters, digits and `-` (it becomes `<name>.svc`)",
        ),
        (
            "name: a\nport: 70000\n",
            "svc.yaml:2: field `port`: 70000 is not a TCP port; use a number from 1 to 65535",
        ),
        (
            "name: a\nport: http\n",
            "svc.yaml:2: field `port`: must be a number from 1 to 65535, got `http`",
        ),
        (
            "name: a\n",
            "svc.yaml: field `port`: is missing; say where the instances listen, e.g. `port: 7000`",
        ),
        (
            "port: 1\n",
            "svc.yaml: field `name`: is missing; every spec needs `name: <dns-label>`",
        ),
        (
            "name: a\nport: 1\npolicy: allow_some\n",
            "svc.yaml:3: field `policy`: `allow_some` is not a policy; use `allow_from_any`, `deny_all`, or `{allow_from: [service, ...]}`",
        ),
        (
            "name: a\nport: 1\nlimit: fast\n",
            "svc.yaml:3: field `limit`: `fast` is not a rate; write it like `50rps` or `3000rpm`",
        ),
        (
            "name: a\nport: 1\nroutes:\n  - path: /a\n  - path: /b\n    timeout: soon\n",
            "svc.yaml:5: field `routes[1].timeout`: `soon` is not a duration; write it like `2s`, `500ms` or `1m`",
        ),
        (
            "name: a\nport: 1\nroutes:\n  - path: /a\n    retries: 11\n",
            "svc.yaml:4: field `routes[0].retries`: 11 is out of range; use 0 to 10",
        ),
        (
            "name: a\nport: 1\nhealth: healthz\n",
            "svc.yaml:3: field `health`: `healthz` must be an HTTP path like `/healthz` or the word `tcp`",
        ),
        (
            "name: a\nport: 1\ncgroup: /\n",
            "svc.yaml:3: field `cgroup`: `/` is the root of the cgroup tree: every process on the host would be this service; name the service's own unit (`payments.service`) or a directory of its own (`hms/payments`)",
        ),
        (
            "name: a\nport: 1\ncgroup: system.slice\n",
            "svc.yaml:3: field `cgroup`: `system.slice` holds many other processes (an ancestor, not a service's own cgroup): they would all be this service; name the service's own unit (`payments.service`) or a directory of its own (`hms/payments`)",
        ),
        (
            "name: a\nport: 1\ncgroup: hms/../payments\n",
            "svc.yaml:3: field `cgroup`: `hms/../payments` has a `..` segment; write the path plainly, e.g. `hms/payments`",
        ),
        (
            "name: a\nport: 7000\nreplicas: [7000]\n",
            "svc.yaml:3: field `replicas`: the number 7000 is not a further instance port; list TCP ports (1-65535) other than `port`",
        ),
    ];

    #[test]
    fn spec_errors_keep_their_file_line_field_and_advice() {
        let mut wrong = Vec::new();
        for (yaml, want) in CASES {
            let got = parse(yaml, "svc.yaml")
                .expect_err("spec should be rejected")
                .to_string();
            if got != *want {
                wrong.push(format!("{yaml:?}\n  want: {want}\n  got:  {got}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
