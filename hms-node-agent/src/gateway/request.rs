//! The gateway's request path, in this order:
//!
//! 1. trace id (`x-hms-trace-id`, kept when the client sent one);
//! 2. an http listener answers ACME HTTP-01 challenges it holds, then, with
//!    `redirect_https`, answers 308 to the https listener;
//! 3. the listener's hostname and the routes (`routes`): none matches -> 404 `no-route`;
//! 4. the door (`door::RouteDoor::admit`): 401/403/413/429 are its answers;
//! 5. the route's filters: a redirect answers here; request headers set/remove, the door's
//!    forwarded headers, `x-forwarded-for`/`-proto`, the prefix rewrite;
//! 6. the weighted backend pick, then the mesh's own HTTP path as caller `gateway`, always
//!    HTTP/1.1 to the backend whatever the client negotiated
//!    (`HttpProxy::serve_gateway_request`: policy, rate limit, timeouts, retries, breakers,
//!    balancing; 502/503/504 and 403 `denied` in the `x-hms-error` style; the tap event with
//!    the client and subject);
//! 7. response headers set/remove, the door's `finish`; counted in `hms_gateway_requests`.
//!
//! Answers made here (404, redirects, the door's) get their own tap event.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use hms_ctl::api::{TapEvent, TapKind};
use hms_ctl::gateway::Protocol;

use super::door::ConnInfo;
use super::listener::ListenerRuntime;
use super::metrics::RequestLabels;
use super::{CALLER, GatewayHost, door, filters, routes};
use crate::drain::Drain;
use crate::proxy::http::body::{ProxyBody, full};
use crate::proxy::http::errors::X_HMS_ERROR;
use crate::proxy::http::{GatewayCall, unix_ms};
use crate::resilience::trace;

/// The largest request body read (and dropped) before the gateway answers a request itself.
const SETTLE_MAX: u64 = 64 * 1024;
/// How long the gateway waits for such a body.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads a small request body the gateway answers without forwarding (a 401, a 404, a
/// redirect) before the answer goes out. An HTTP/2 stream whose request body is left unread
/// is reset under the answer, and clients (curl) then report a stream error instead of the
/// 401; HTTP/1.1 keep-alive needs the body off the connection too. Large or slow bodies are
/// left: the connection's own handling (reset, close) applies to them.
async fn settle(body: Incoming) {
    use hyper::body::Body as _;
    if body.is_end_stream() || body.size_hint().upper().is_none_or(|n| n > SETTLE_MAX) {
        return;
    }
    let _ = tokio::time::timeout(SETTLE_WAIT, body.collect()).await;
}

/// Where ACME's HTTP-01 validation asks (RFC 8555 8.3).
pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// An answer of the gateway itself, in the mesh's error style.
pub fn gateway_error(
    status: StatusCode,
    reason: &'static str,
    message: &str,
) -> Response<ProxyBody> {
    let mut r = Response::new(full(format!("hms gateway: {message}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(X_HMS_ERROR, HeaderValue::from_static(reason));
    r
}

impl GatewayHost {
    pub(super) async fn handle(
        &self,
        mut req: Request<Incoming>,
        rt: &ListenerRuntime,
        conn: &ConnInfo,
        drain: Drain,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let config = rt.config();
        let trace_id = trace::ensure_trace_id(req.headers_mut());
        let host_header: Option<String> = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let host_only = host_header.as_deref().map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(h, _)| h)
                .to_ascii_lowercase()
        });
        let scheme = match config.spec.protocol {
            Protocol::Http => "http",
            Protocol::Https => "https",
        };
        // ACME HTTP-01 (the seam for gateway::acme): plain-HTTP listeners answer challenges
        // before anything else, redirects included.
        if config.spec.protocol == Protocol::Http
            && let Some(token) = req.uri().path().strip_prefix(ACME_CHALLENGE_PATH)
            && let Some(answer) = self.acme_challenges.get(token)
        {
            let mut resp = Response::new(full(answer));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let parts = head_of(req.method().clone(), req.uri().clone());
            return self.local_answer(
                resp,
                &config.gateway,
                &config.spec.name,
                "acme",
                conn,
                &parts.method,
                parts.uri.path(),
                host_header.as_deref(),
                &trace_id,
                None,
                started,
            );
        }

        // Step 2.
        if config.spec.redirect_https
            && let Some(port) = config.https_port
        {
            let parts = head_of(req.method().clone(), req.uri().clone());
            let spec = hms_ctl::gateway::RedirectSpec {
                scheme: Some("https".into()),
                port: Some(port),
                status: Some(308),
                ..Default::default()
            };
            let host = host_only
                .clone()
                .unwrap_or_else(|| rt.addr.ip().to_string());
            let resp = filters::redirect(&spec, &parts, "https", &host, port);
            return self.local_answer(
                resp,
                &config.gateway,
                &config.spec.name,
                "-",
                conn,
                &parts.method,
                parts.uri.path(),
                host_header.as_deref(),
                &trace_id,
                None,
                started,
            );
        }

        // Step 3.
        let listener_host_ok = match (&config.spec.hostname, &host_only) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        let (mut parts, body) = req.into_parts();
        let found = listener_host_ok
            .then(|| config.routes.find(&parts, host_header.as_deref()))
            .flatten();
        let Some((route, prefix)) = found else {
            let resp = gateway_error(
                StatusCode::NOT_FOUND,
                "no-route",
                &format!(
                    "no route of gateway {} matches {} {}{}; see `hms-ctl gateway describe {}`",
                    config.gateway,
                    parts.method,
                    host_header.as_deref().unwrap_or(""),
                    parts.uri.path(),
                    config.gateway
                ),
            );
            settle(body).await;
            let req = Request::from_parts(parts, ());
            return self.local_answer(
                resp,
                &config.gateway,
                &config.spec.name,
                "-",
                conn,
                req.method(),
                req.uri().path(),
                host_header.as_deref(),
                &trace_id,
                Some("no-route"),
                started,
            );
        };
        let spec = &route.spec;
        let route_name = spec.name.clone();
        let answer_local = |resp: Response<ProxyBody>,
                            parts: &hyper::http::request::Parts,
                            reason: Option<&'static str>| {
            self.local_answer(
                resp,
                &config.gateway,
                &config.spec.name,
                &route_name,
                conn,
                &parts.method,
                parts.uri.path(),
                host_header.as_deref(),
                &trace_id,
                reason,
                started,
            )
        };

        // Step 4.
        let door = config.doors.get(&spec.name);
        let admitted = match door {
            Some(d) => match d.admit(&parts, conn).await {
                Ok(a) => a,
                Err(resp) => {
                    let reason = resp
                        .headers()
                        .get(X_HMS_ERROR)
                        .and_then(|v| v.to_str().ok())
                        .map(|_| "door");
                    // Not for a declared body over max_body (413): that one is not read.
                    if resp.status() != StatusCode::PAYLOAD_TOO_LARGE {
                        settle(body).await;
                    }
                    return answer_local(resp, &parts, reason);
                }
            },
            None => Default::default(),
        };
        let subject: Option<Arc<str>> = admitted
            .subject
            .as_ref()
            .map(|s| Arc::from(format!("{}:{}", s.method, s.name)));

        // Step 5.
        if let Some(rd) = &spec.filters.redirect {
            let port = rt.addr.port();
            let host = host_only
                .clone()
                .unwrap_or_else(|| rt.addr.ip().to_string());
            let resp = filters::redirect(rd, &parts, scheme, &host, port);
            settle(body).await;
            return answer_local(resp, &parts, None);
        }
        filters::apply_headers(&spec.filters.request_headers, &mut parts.headers);
        // The door's changes: its credentials and any caller copy of a forwarded-claim
        // header removed, the claims added.
        admitted.apply(&mut parts.headers);
        let client_ip = conn.client.ip().to_string();
        let xff = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {client_ip}"),
            None => client_ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static(scheme));
        if let (Some(with), Some(prefix)) = (&spec.filters.prefix_rewrite, prefix) {
            filters::rewrite_prefix(&mut parts, prefix, with);
        }

        // Step 6.
        let Some(backend) = routes::pick_backend(&spec.backends, &mut rand::rng()) else {
            let resp = gateway_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoint",
                "the route has no backend with a weight above 0",
            );
            return answer_local(resp, &parts, Some("no-endpoint"));
        };
        let call = GatewayCall {
            service: backend.service.clone(),
            client: conn.client,
            route: route.label.clone(),
            subject: subject.clone(),
            timeout: spec.timeout,
            per_try_timeout: spec.per_try_timeout,
            retries: spec.retries,
        };
        // The client's ALPN says nothing about what the backend speaks: backends get
        // HTTP/1.1 (the mesh's HTTP path then sends origin-form with `Host`), except gRPC,
        // which exists only over HTTP/2 (its trailers carry the status): a gRPC call that
        // came over HTTP/2 goes on as HTTP/2 (h2c to the instance, inside the mTLS tunnel
        // to another host), as a meshed gRPC caller's would.
        let grpc_over_h2 = parts.version == hyper::Version::HTTP_2
            && crate::resilience::retry::is_grpc(&parts.headers);
        if !grpc_over_h2 {
            parts.version = hyper::Version::HTTP_11;
        }
        // A body without Content-Length (or longer than it said) stops at the route's
        // max_body; the answer is then 413, whatever the backend made of the cut body.
        let too_large = Arc::new(AtomicBool::new(false));
        let limit = door.and_then(|d| d.max_body());
        let body: ProxyBody = match limit {
            Some(limit) => {
                let hit = too_large.clone();
                door::LimitedBody::new(body, limit)
                    .map_err(move |e| {
                        if door::is_body_too_large(&*e).is_some() {
                            hit.store(true, Ordering::Relaxed);
                        }
                        e
                    })
                    .boxed()
            }
            None => body.map_err(Into::into).boxed(),
        };
        let asked = (parts.method.clone(), parts.uri.clone());
        let req = Request::from_parts(parts, body);
        let resp = self.http.serve_gateway_request(req, call, drain).await;
        if let Some(limit) = limit
            && too_large.load(Ordering::Relaxed)
        {
            let resp = door::Rejection::TooLarge { limit }.response();
            let (method, uri) = asked;
            return answer_local(resp, &head_of(method, uri), Some("body-too-large"));
        }

        // Step 7.
        let (mut rparts, rbody) = resp.into_parts();
        filters::apply_headers(&spec.filters.response_headers, &mut rparts.headers);
        if let Some(d) = door {
            d.finish(&admitted, &mut rparts);
        }
        self.count(
            &config.gateway,
            &config.spec.name,
            &route_name,
            rparts.status,
            subject.as_deref(),
        );
        Response::from_parts(rparts, rbody)
    }

    fn count(
        &self,
        gateway: &str,
        listener: &str,
        route: &str,
        status: StatusCode,
        subject: Option<&str>,
    ) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                gateway: gateway.into(),
                listener: listener.into(),
                route: route.into(),
                status_class: format!("{}xx", status.as_u16() / 100),
                auth: subject
                    .and_then(|s| s.split(':').next())
                    .unwrap_or("none")
                    .into(),
            })
            .inc();
    }

    /// An answer the gateway made itself: trace id, metrics, a tap event.
    #[allow(clippy::too_many_arguments)]
    fn local_answer(
        &self,
        mut resp: Response<ProxyBody>,
        gateway: &str,
        listener: &str,
        route: &str,
        conn: &ConnInfo,
        method: &hyper::Method,
        path: &str,
        authority: Option<&str>,
        trace_id: &trace::TraceId,
        mesh_error: Option<&'static str>,
        started: Instant,
    ) -> Response<ProxyBody> {
        resp.headers_mut()
            .insert(trace::TRACE_ID_HEADER, trace_id.as_header_value().clone());
        let status = resp.status();
        self.count(gateway, listener, route, status, None);
        tracing::debug!(trace_id = trace_id.as_str(), %gateway, %route, client = %conn.client, %method, path, status = status.as_u16(), "gateway answered");
        self.tap.publish(TapEvent {
            time_unix_ms: unix_ms(),
            kind: TapKind::Http,
            caller: CALLER.into(),
            caller_process: format!("{gateway}/{route}"),
            callee: format!("gateway:{gateway}"),
            method: Some(method.as_str().to_owned()),
            authority: authority.map(str::to_owned),
            path: Some(path.to_owned()),
            status: Some(status.as_u16()),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            request_bytes: 0,
            response_bytes: 0,
            retries: 0,
            upstream: None,
            trace_id: Some(trace_id.as_str().to_owned()),
            mesh_error: mesh_error.map(str::to_owned),
            headers: Vec::new(),
            rtt_us: None,
            retransmits: None,
            connect_ms: None,
            client: Some(conn.client.to_string()),
            subject: None,
        });
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, body.boxed())
    }
}

/// A request head with only `method` and `uri`, for answers the gateway makes itself once
/// the request was taken apart (or is still being read).
fn head_of(method: hyper::Method, uri: hyper::Uri) -> hyper::http::request::Parts {
    let (mut parts, _) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts
}
