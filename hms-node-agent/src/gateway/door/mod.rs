//! The checks at the gateway's door, per route: who the caller is (API key, JWT, client
//! certificate), whether it is over its rate limit, CORS, the body size. The gateway's request
//! path calls [`RouteDoor::admit`] before it picks a backend and [`RouteDoor::finish`] on the
//! response; nothing here opens a listener or talks to a backend.
//!
//! Order in [`RouteDoor::admit`]: a CORS preflight is answered first (browsers send no
//! credentials on it); then a declared body over `max_body` (413); a per-address rate limit
//! before authentication (so guessing keys is limited too); authentication (401/403/503); a
//! per-key or per-subject rate limit (429). The gateway enforces `max_body` on bodies that
//! do not declare their length with [`LimitedBody`].
//!
//! Authenticators are compiled once per spec ([`Authenticators::compile`]) and shared by the
//! routes that name them, so a JWT authenticator's key cache is one per spec, not per route.

pub mod api_key;
mod body;
pub mod client_cert;
mod client_limits;
mod cors;
mod fetch;
pub mod jwks;
pub mod jwt;
mod jwt_ring;
pub mod metrics;
mod reject;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper::Response;
use hyper::header::{CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::CertificateDer;

use hms_ctl::gateway::door::{AuthenticatorSpec, ClientKey, RouteDoorSpec};

use crate::proxy::http::body::ProxyBody;

pub use body::{BodyTooLarge, LimitedBody, is_body_too_large};
pub use client_limits::ClientLimits;
pub use cors::Cors;
pub use metrics::{DoorCollector, DoorMetrics};
pub use reject::Rejection;

/// What the gateway knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub client: SocketAddr,
    pub tls: bool,
    pub sni: Option<String>,
    /// The client's certificate chain, leaf first, when it presented one.
    pub client_chain: Vec<CertificateDer<'static>>,
}

/// Who the door found the caller to be: shown in taps, metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// `api-key`, `jwt` or `client-cert`.
    pub method: &'static str,
    /// The key's name, the token's `sub`, or the certificate's subject.
    pub name: String,
}

/// Knobs that are not the spec's: how the agent runs the door.
#[derive(Debug, Clone)]
pub struct DoorOptions {
    /// The shortest time between two loads of one JWKS (unknown `kid`s cannot force more).
    pub jwks_min_reload: Duration,
    /// How long one JWKS load may take.
    pub jwks_timeout: Duration,
}

impl Default for DoorOptions {
    fn default() -> Self {
        DoorOptions {
            jwks_min_reload: Duration::from_secs(10),
            jwks_timeout: Duration::from_secs(5),
        }
    }
}

/// One compiled authenticator.
#[derive(Debug)]
pub enum Authenticator {
    ApiKey(api_key::ApiKeyAuth),
    /// Boxed: its key cache makes it several times the others' size.
    Jwt(Box<jwt::JwtAuth>),
    ClientCert(client_cert::ClientCertAuth),
}

impl Authenticator {
    pub fn method(&self) -> &'static str {
        match self {
            Authenticator::ApiKey(_) => "api-key",
            Authenticator::Jwt(_) => "jwt",
            Authenticator::ClientCert(_) => "client-cert",
        }
    }

    fn credential_headers(&self) -> Vec<HeaderName> {
        match self {
            Authenticator::ApiKey(a) => a.credential_headers(),
            Authenticator::Jwt(j) => j.credential_headers(),
            Authenticator::ClientCert(_) => Vec::new(),
        }
    }
}

/// A spec's authenticators, compiled: CA files read, keys decoded; JWKS load on first use.
#[derive(Debug, Default)]
pub struct Authenticators {
    by_name: BTreeMap<String, Arc<Authenticator>>,
    metrics: Arc<DoorMetrics>,
    /// Each route's client table, by route name: a route served on two listeners compiles
    /// a door per listener, and both must count into one table (else a client doubles its
    /// rate by using both).
    limits: std::sync::Mutex<BTreeMap<String, Arc<ClientLimits>>>,
}

impl Authenticators {
    /// A re-applied spec: its routes start from `previous`'s client tables, so re-applying
    /// (to change anything else) does not hand every client a fresh burst. A route whose
    /// limit changed gets a new table when its door is compiled.
    pub fn keep_tables_of<'a>(
        &self,
        previous: &Authenticators,
        limited_routes: impl IntoIterator<Item = &'a str>,
    ) {
        let old = previous.limits.lock().unwrap_or_else(|p| p.into_inner());
        let mut new = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        for route in limited_routes {
            if let Some(table) = old.get(route) {
                new.entry(route.to_string())
                    .or_insert_with(|| table.clone());
            }
        }
    }

    pub fn compile(
        specs: &BTreeMap<String, AuthenticatorSpec>,
        metrics: Arc<DoorMetrics>,
        options: &DoorOptions,
    ) -> anyhow::Result<Authenticators> {
        let mut by_name = BTreeMap::new();
        for (name, spec) in specs {
            let compiled = match spec {
                AuthenticatorSpec::ApiKey { header, keys } => {
                    Authenticator::ApiKey(api_key::ApiKeyAuth::compile(name, header, keys)?)
                }
                AuthenticatorSpec::Jwt {
                    issuer,
                    audiences,
                    jwks_file,
                    jwks_url,
                    jwks_ca,
                    leeway,
                    refresh,
                    forward_claims,
                } => {
                    let source = match (jwks_file, jwks_url) {
                        (Some(f), _) => jwks::JwksSource::File(f.clone()),
                        (None, Some(u)) => jwks::JwksSource::Url {
                            url: u.clone(),
                            ca: jwks_ca.clone(),
                        },
                        (None, None) => {
                            anyhow::bail!("authenticator {name}: needs `jwks_file` or `jwks_url`")
                        }
                    };
                    let cache = jwks::Jwks::new(
                        name,
                        source,
                        *refresh,
                        options.jwks_min_reload,
                        options.jwks_timeout,
                        metrics.clone(),
                    );
                    Authenticator::Jwt(Box::new(jwt::JwtAuth::compile(
                        name,
                        issuer,
                        audiences,
                        *leeway,
                        forward_claims,
                        cache,
                    )?))
                }
                AuthenticatorSpec::ClientCert { ca } => {
                    Authenticator::ClientCert(client_cert::ClientCertAuth::compile(name, ca)?)
                }
            };
            by_name.insert(name.clone(), Arc::new(compiled));
        }
        Ok(Authenticators {
            by_name,
            metrics,
            limits: Default::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Authenticator>> {
        self.by_name.get(name)
    }

    /// The client-certificate verifier for a listener serving routes that name these
    /// authenticators (see [`client_verifier`]).
    pub fn client_verifier<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<Arc<dyn ClientCertVerifier>> {
        let auths: Vec<&Authenticator> = names
            .into_iter()
            .filter_map(|n| self.by_name.get(n).map(|a| a.as_ref()))
            .collect();
        client_verifier(&auths)
    }
}

/// What a listener asks of clients' certificates: the verifier for its TLS config, and the
/// CA files behind it (equal lists mean the same verifier, so the gateway can tell when a
/// re-applied spec needs the listener's TLS config rebuilt).
#[derive(Debug, Default)]
pub struct ListenerClientAuth {
    pub verifier: Option<Arc<dyn ClientCertVerifier>>,
    pub ca_files: Vec<std::path::PathBuf>,
}

impl Authenticators {
    /// The client-certificate side of listener `listener` of `spec`: the `client_cert`
    /// authenticators named by the routes attached to it (a route with no `listeners`
    /// attaches to all).
    pub fn for_listener(
        &self,
        spec: &hms_ctl::gateway::GatewaySpec,
        listener: &str,
    ) -> ListenerClientAuth {
        let mut names: Vec<&str> = spec
            .routes
            .iter()
            .filter(|r| r.listeners.is_empty() || r.listeners.iter().any(|l| l == listener))
            .filter_map(|r| r.door.auth.as_deref())
            .collect();
        names.sort_unstable();
        names.dedup();
        let ca_files = names
            .iter()
            .filter_map(|n| match spec.authenticators.get(*n) {
                Some(AuthenticatorSpec::ClientCert { ca }) => Some(ca.clone()),
                _ => None,
            })
            .collect();
        ListenerClientAuth {
            verifier: self.client_verifier(names),
            ca_files,
        }
    }
}

/// A listener's client-certificate verifier: asks for (never requires) a certificate from
/// the CA of any `client_cert` authenticator among those used on the listener. `None` when
/// none is (the listener asks for no certificate).
pub fn client_verifier(used_on_listener: &[&Authenticator]) -> Option<Arc<dyn ClientCertVerifier>> {
    client_cert::listener_verifier(used_on_listener.iter().filter_map(|a| match a {
        Authenticator::ClientCert(c) => Some(c),
        _ => None,
    }))
}

/// The door's checks for one route.
#[derive(Debug, Default)]
pub struct RouteDoor {
    route: String,
    auth: Option<Arc<Authenticator>>,
    limits: Option<Arc<ClientLimits>>,
    cors: Option<Cors>,
    max_body: Option<u64>,
    /// Headers no caller may send on to the backend: credentials, forwarded-claim headers.
    strip: Vec<HeaderName>,
    metrics: Arc<DoorMetrics>,
}

/// A request the door let in.
#[derive(Debug, Default)]
pub struct Admitted {
    pub subject: Option<Subject>,
    /// Headers to add to the request sent to the backend (forwarded claims).
    pub add_headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    /// Headers to remove from the request first: the credentials, and every header a claim
    /// is forwarded in (so a caller cannot forge one). [`Admitted::apply`] does both.
    pub remove_headers: Vec<HeaderName>,
    /// The request's `Origin` when the route's CORS allows it ([`RouteDoor::finish`] marks
    /// the response for it).
    pub cors_origin: Option<HeaderValue>,
}

impl Admitted {
    /// Removes what the door strips and adds the forwarded claims.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for h in &self.remove_headers {
            headers.remove(h);
        }
        for (k, v) in &self.add_headers {
            headers.insert(k.clone(), v.clone());
        }
    }
}

impl RouteDoor {
    /// `route` names the route in metrics and logs.
    pub fn compile(
        route: &str,
        spec: &RouteDoorSpec,
        authenticators: &Authenticators,
    ) -> anyhow::Result<RouteDoor> {
        let auth = spec
            .auth
            .as_deref()
            .map(|name| {
                authenticators.get(name).cloned().with_context(|| {
                    format!("route {route}: `auth: {name}` names no authenticator of the spec")
                })
            })
            .transpose()?;
        let limits = spec.rate_limit.as_ref().map(|l| {
            let mut shared = authenticators
                .limits
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let authenticated = auth.is_some();
            // Kept from the previous apply (see `keep_tables_of`) only if unchanged.
            if shared
                .get(route)
                .is_some_and(|t| !t.same_settings(l, authenticated))
            {
                shared.remove(route);
            }
            shared
                .entry(route.to_string())
                .or_insert_with(|| Arc::new(ClientLimits::new(l, authenticated)))
                .clone()
        });
        if let Some(l) = &limits {
            match (l.by, auth.as_deref()) {
                (ClientKey::Key, Some(Authenticator::ApiKey(_))) | (ClientKey::Address, _) => {}
                (ClientKey::Subject, Some(_)) => {}
                (by, _) => anyhow::bail!(
                    "route {route}: `rate_limit.by: {by:?}` does not fit the route's `auth`"
                ),
            }
        }
        let cors = spec
            .cors
            .as_ref()
            .map(Cors::compile)
            .transpose()
            .with_context(|| format!("route {route}: cors"))?;
        let strip = auth
            .as_deref()
            .map(Authenticator::credential_headers)
            .unwrap_or_default();
        Ok(RouteDoor {
            route: route.into(),
            auth,
            limits,
            cors,
            max_body: spec.max_body,
            strip,
            metrics: authenticators.metrics.clone(),
        })
    }

    pub fn max_body(&self) -> Option<u64> {
        self.max_body
    }

    /// The door's decision on one request: let it in (with what to change on it), or the
    /// complete answer to send instead (a refusal, or the answer to a CORS preflight).
    pub async fn admit(
        &self,
        parts: &hyper::http::request::Parts,
        conn: &ConnInfo,
    ) -> Result<Admitted, Response<ProxyBody>> {
        if let Some(cors) = &self.cors
            && Cors::is_preflight(&parts.method, &parts.headers)
        {
            return Err(match cors.preflight(&parts.headers) {
                Ok(answer) => answer,
                Err(refusal) => self.refuse(refusal, None),
            });
        }
        let origin = self
            .cors
            .as_ref()
            .and_then(|c| c.allowed_origin(&parts.headers));
        match self.check(parts, conn).await {
            Ok(mut admitted) => {
                admitted.cors_origin = origin;
                let method = admitted.subject.as_ref().map_or("none", |s| s.method);
                self.metrics.admitted(&self.route, method);
                Ok(admitted)
            }
            Err(refusal) => Err(self.refuse(refusal, origin)),
        }
    }

    async fn check(
        &self,
        parts: &hyper::http::request::Parts,
        conn: &ConnInfo,
    ) -> Result<Admitted, Rejection> {
        if let Some(limit) = self.max_body {
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(Rejection::TooLarge { limit });
            }
        }
        let now = Instant::now();
        if let Some(l) = &self.limits
            && l.by == ClientKey::Address
        {
            l.check(&ClientLimits::address_key(conn.client.ip()), now)
                .map_err(|retry_after| Rejection::RateLimited { retry_after })?;
        }
        let subject = match self.auth.as_deref() {
            None => None,
            Some(auth) => Some(self.authenticate(auth, parts, conn).await?),
        };
        let (subject, add_headers) = match subject {
            Some((s, h)) => (Some(s), h),
            None => (None, Vec::new()),
        };
        if let (Some(l), Some(s)) = (&self.limits, &subject)
            && l.by != ClientKey::Address
        {
            // The method is part of the name: a key called `alice` and a token for
            // `alice` are different clients.
            l.check(&format!("{}:{}", s.method, s.name), now)
                .map_err(|retry_after| Rejection::RateLimited { retry_after })?;
        }
        let mut remove_headers = self.strip.clone();
        // A key sent as `Authorization: ApiKey KEY` is a credential too; another
        // Authorization (the backend's own scheme) is left alone.
        if let Some(Authenticator::ApiKey(_)) = self.auth.as_deref()
            && api_key::in_authorization(&parts.headers)
        {
            remove_headers.push(hyper::header::AUTHORIZATION);
        }
        Ok(Admitted {
            subject,
            add_headers,
            remove_headers,
            cors_origin: None,
        })
    }

    async fn authenticate(
        &self,
        auth: &Authenticator,
        parts: &hyper::http::request::Parts,
        conn: &ConnInfo,
    ) -> Result<(Subject, Vec<(HeaderName, HeaderValue)>), Rejection> {
        let method = auth.method();
        let subject = |name| Subject { method, name };
        match auth {
            Authenticator::ApiKey(a) => Ok((subject(a.authenticate(&parts.headers)?), Vec::new())),
            Authenticator::Jwt(j) => {
                let passed = j.authenticate(&parts.headers).await?;
                Ok((subject(passed.subject), passed.headers))
            }
            Authenticator::ClientCert(c) => {
                Ok((subject(c.authenticate(&conn.client_chain)?), Vec::new()))
            }
        }
    }

    fn refuse(&self, refusal: Rejection, origin: Option<HeaderValue>) -> Response<ProxyBody> {
        self.metrics.refused(&self.route, refusal.reason());
        tracing::debug!(route = %self.route, reason = refusal.reason(), "gateway: door refused a request");
        let mut resp = refusal.response();
        // A page may read why it was refused (otherwise the browser shows only a CORS error).
        if let (Some(cors), Some(origin)) = (&self.cors, origin) {
            cors.mark(resp.headers_mut(), origin);
        }
        resp
    }

    /// Marks the backend's response for an allowed CORS origin.
    pub fn finish(&self, admitted: &Admitted, resp: &mut hyper::http::response::Parts) {
        if let (Some(cors), Some(origin)) = (&self.cors, &admitted.cors_origin) {
            cors.mark(&mut resp.headers, origin.clone());
        }
    }
}

#[cfg(test)]
mod tests;
