//! The checks at the gateway's door, per route: who the caller is (API key, JWT, client
//! certificate), whether it is over its rate limit, CORS, the body size. The gateway's request
//! path calls [`RouteDoor::admit`] before it picks a backend and [`RouteDoor::finish`] on the
//! response; nothing here opens a listener or talks to a backend.

use std::net::SocketAddr;

use rustls_pki_types::CertificateDer;

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

/// The door's checks for one route (skeleton: the door engineer fills in).
#[derive(Debug, Default)]
pub struct RouteDoor {}

/// A request the door let in.
#[derive(Debug, Default)]
pub struct Admitted {
    pub subject: Option<Subject>,
    /// Headers to add to the request sent to the backend (forwarded claims).
    pub add_headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

// PLACEHOLDER (gateway branch only, for the lead's merge): the door engineer's branch
// replaces these three with the real checks; the gateway's request path calls them as the
// brief fixes them (compile per route, admit after the match and before the backend pick,
// finish on the response).
impl RouteDoor {
    /// The door of one route of `spec`.
    pub fn compile(
        spec: &hms_ctl::gateway::GatewaySpec,
        route: &hms_ctl::gateway::RouteSpec,
    ) -> anyhow::Result<RouteDoor> {
        let _ = (spec, route);
        Ok(RouteDoor {})
    }

    /// Lets the request in (with who the caller is), or answers it (401, 403, 413, 429).
    pub async fn admit(
        &self,
        parts: &hyper::http::request::Parts,
        conn: &ConnInfo,
    ) -> Result<Admitted, hyper::Response<crate::proxy::http::body::ProxyBody>> {
        let _ = (parts, conn);
        Ok(Admitted::default())
    }

    /// What the door adds to the response (CORS headers).
    pub fn finish(&self, admitted: &Admitted, parts: &mut hyper::http::response::Parts) {
        let _ = (admitted, parts);
    }
}
