//! The HTTP layer of the outbound proxy: one hyper server per detected HTTP/1.1 or HTTP/2
//! connection, every request taken through the mesh's decisions in this order:
//!
//! 1. trace id: `x-hms-trace-id` added when absent, kept when present;
//! 2. access policy: the caller (the service whose cgroup it runs in, else the host) must be
//!    allowed by the callee's policy, else 403;
//! 3. rate limit: the service's limiter allows, queues (bounded wait) or answers 429;
//! 4. route: the longest matching path prefix gives the timeout and retry count (default:
//!    no timeout, one retry);
//! 5. per attempt: pick an instance (power of two choices over peak-EWMA latency, skipping
//!    instances whose circuit is open), take a pooled connection, send;
//! 6. a failed attempt (connect failure, reset, 502/503/504, gRPC UNAVAILABLE) counts against
//!    the instance's breaker and is retried when the method and body allow it and the retry
//!    budget has room, after a jittered exponential backoff;
//! 7. the whole exchange up to the response headers is bounded by the route timeout (504);
//! 8. an attempt the instance did not process (connection rotation: see `upstream`) is
//!    neither a failure nor a retry: it is sent again at once on a fresh connection, for
//!    any method, up to [`MAX_UNPROCESSED_REPLAYS`] times.
//!
//! Errors the mesh produces carry `x-hms-error` (see `errors`). This module never dials a VIP.
//!
//! When the agent drains (stop, upgrade hand-over) its callers see no error: an HTTP/1.1
//! connection is never closed under a request that may be on its way; instead each
//! response from then on says `Connection: close`, so the caller opens its next connection
//! (to the successor) after reading it. An HTTP/2 connection gets hyper's graceful
//! shutdown: GOAWAY, then a GOAWAY naming the last stream it will serve, which it serves.

pub mod body;
pub mod errors;
pub mod health;
mod reads_past_reset;
pub mod state;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use hms_ctl::api::ServiceInfo;
use hms_ctl::spec::{RouteSpec, ServiceSpec};

use crate::drain::Drain;
use crate::registry::{Snapshot, Store};
use crate::resilience::policy::{self, Caller};
use crate::resilience::rate_limit::Decision;
use crate::resilience::retry::{self, AttemptOutcome, RetryBackoff, RetryRequest, RetryVerdict};
use crate::resilience::trace;
use body::{ObservedBody, ProxyBody, tee};
use smallvec::SmallVec;

use crate::metrics::{DestinationLabels, EdgeLabels, EdgeSeries, Metrics};
use crate::tap::{HttpTap, TapHeaders, TapHub};
use errors::MeshError;
use state::ServiceStates;
use upstream::{UpstreamPool, Version};

/// Extra time the outer route-timeout guard allows beyond the deadline each attempt already
/// honours, so the attempt (not the guard) reports the timeout and charges the instance.
const OUTER_TIMEOUT_SLACK: Duration = Duration::from_millis(50);

/// How often one request is sent again because the instance did not process it (GOAWAY,
/// REFUSED_STREAM, an HTTP/1.1 connection found closed): rotation needs one, a race between
/// rotating connections two; more means the instance refuses everything, which counts
/// against it.
const MAX_UNPROCESSED_REPLAYS: u32 = 3;
/// How long a refused attempt may take to give the request body back (hyper drops it on
/// its connection task, right after reporting the refusal).
const BODY_RETURN_WAIT: Duration = Duration::from_secs(1);

/// Retries a route gets when it does not say.
pub const DEFAULT_RETRIES: u32 = 1;
/// A client must send its request headers within this time (slow-loris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The HTTP/1 server settings of every listener the agent serves HTTP on (the node proxy,
/// the gateway): a deadline for the request head and a limit on its size.
pub fn http1_server() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        // max_buf_size alone is no head limit: one read may fill more than it and a head
        // that parses complete is accepted (a 100 KiB header went through); this checks the
        // parsed head's length.
        .max_header_size(MAX_HEADER_BYTES);
    b
}

/// What a request body must be for the HTTP path: hyper's own (`Incoming`) or the
/// gateway's (limited to a route's `max_body`).
pub trait RequestBody:
    hyper::body::Body<Data = bytes::Bytes, Error: Into<body::BoxError>> + Send + Sync + Unpin + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = bytes::Bytes, Error: Into<body::BoxError>>
        + Send
        + Sync
        + Unpin
        + 'static
{
}

/// One request from the gateway (`crate::gateway::request`): it goes through the same
/// decisions as a meshed caller's, as the caller `gateway`.
#[derive(Debug, Clone)]
pub struct GatewayCall {
    /// The backend the gateway picked.
    pub service: String,
    /// The outside client, for taps and logs.
    pub client: std::net::SocketAddr,
    /// `<gateway>/<route>`: shown where a meshed caller's process is.
    pub route: String,
    /// Who the door found the client to be (`api-key:ops`).
    pub subject: Option<Arc<str>>,
    /// The gateway route's timeout, per-try timeout and retries, where it sets them; the
    /// service's own route settings fill the rest.
    pub timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retries: Option<u32>,
}

/// Who is calling and whom, fixed for the whole downstream connection.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub service: String,
    pub caller: Caller,
    /// `comm[pid]` of the calling process, for logs.
    pub caller_process: String,
    pub peer: std::net::SocketAddr,
}

#[derive(Debug, Default)]
pub struct HttpStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub denied: AtomicU64,
    pub rate_limited: AtomicU64,
    pub timeouts: AtomicU64,
    pub mesh_errors: AtomicU64,
    /// Downstream connections ended by a malformed or oversized request head, or a client
    /// too slow to send one.
    pub bad_requests: AtomicU64,
    /// Attempts the instance did not process (connection rotation), sent again.
    pub unprocessed: AtomicU64,
    /// Tunnel streams from other hosts claiming a caller not placed on the sending host.
    pub inbound_caller_not_placed: AtomicU64,
    /// Tunnel streams from other hosts to a port that is not one of this host's instances.
    pub inbound_not_own_instance: AtomicU64,
}

impl HttpStats {
    pub fn counters(&self) -> hms_ctl::api::HttpCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        hms_ctl::api::HttpCounters {
            requests: g(&self.requests),
            retries: g(&self.retries),
            denied: g(&self.denied),
            rate_limited: g(&self.rate_limited),
            timeouts: g(&self.timeouts),
            mesh_errors: g(&self.mesh_errors),
            bad_requests: g(&self.bad_requests),
            unprocessed: g(&self.unprocessed),
            inbound_caller_not_placed: g(&self.inbound_caller_not_placed),
            inbound_not_own_instance: g(&self.inbound_not_own_instance),
        }
    }
}

pub struct HttpProxy {
    pub store: Arc<dyn Store>,
    pub tap: Arc<TapHub>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<UpstreamPool>,
    pub states: ServiceStates,
    pub stats: HttpStats,
    backoff: RetryBackoff,
}

impl HttpProxy {
    pub fn new(
        store: Arc<dyn Store>,
        cgroups: crate::cgroup::ServiceCgroups,
        local_node: String,
        tap: Arc<TapHub>,
        metrics: Arc<Metrics>,
    ) -> HttpProxy {
        HttpProxy {
            store,
            tap,
            metrics,
            pool: Arc::new(UpstreamPool::default()),
            states: ServiceStates::new(cgroups, local_node),
            stats: HttpStats::default(),
            backoff: RetryBackoff::default(),
        }
    }

    /// Serves one downstream connection until the client closes it.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        version: Version,
        downstream: Downstream,
        drain: Drain,
        idle: crate::limits::IdleFlag,
    ) {
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let conn = Arc::new(Conn::new(downstream, drain.clone(), idle));
        let this = self.clone();
        let conn2 = conn.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let conn = conn2.clone();
            async move { Ok::<_, Infallible>(this.handle(req, conn).await) }
        });
        let ds = &conn.ds;
        let result = match version {
            Version::Http1 => {
                http1_server()
                    .serve_connection(io, service)
                    .with_upgrades()
                    // Not hyper's graceful_shutdown on drain: it closes an idle connection
                    // at once, which races a request the caller is sending. Responses say
                    // `Connection: close` instead (see `handle`).
                    .await
            }
            Version::Http2 => {
                let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(io, service);
                tokio::pin!(served);
                tokio::select! {
                    r = served.as_mut() => r,
                    _ = drain.signaled() => {
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                }
            }
        };
        if let Err(e) = result {
            // Malformed requests, oversized headers and slow clients end here after hyper
            // answered them (400/431) or closed the connection.
            if e.is_parse() || e.is_parse_too_large() || e.is_timeout() {
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %ds.peer, service = %ds.service, caller = %ds.caller, process = %ds.caller_process, "bad request from caller: {e}");
            } else {
                tracing::debug!(peer = %ds.peer, service = %ds.service, "downstream connection ended: {e}");
            }
        }
    }

    /// One gateway request through the mesh's HTTP path (policy with caller `gateway`, rate
    /// limit, retries, timeouts, breakers, balancing, taps and metrics), as a request on a
    /// connection of its own: the gateway's connections carry requests for many services.
    pub async fn serve_gateway_request(
        &self,
        req: Request<ProxyBody>,
        call: GatewayCall,
        drain: Drain,
    ) -> Response<ProxyBody> {
        let ds = Downstream {
            service: call.service.clone(),
            caller: Caller::service(crate::gateway::CALLER),
            caller_process: call.route.clone(),
            peer: call.client,
        };
        let mut conn = Conn::new(ds, drain, crate::limits::IdleFlag::detached());
        conn.gateway = Some(call);
        self.handle(req, Arc::new(conn)).await
    }

    async fn handle<B: RequestBody>(
        &self,
        mut req: Request<B>,
        conn: Arc<Conn>,
    ) -> Response<ProxyBody> {
        conn.request_started();
        let ds = &conn.ds;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let grpc = retry::is_grpc(req.headers());
        let trace_id = trace::ensure_trace_id(req.headers_mut());
        let method = req.method().clone();
        let downstream_http1 = req.version() < hyper::Version::HTTP_2;
        // Copied, not kept: the request's own strings share hyper's read buffer, which a
        // tap ring would then hold on to.
        let path: Box<str> = req.uri().path().into();
        let authority: Option<Box<str>> = match req.uri().authority() {
            Some(a) => Some(a.as_str().into()),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(Into::into),
        };
        let headers = TapHeaders::capture(req.headers());
        let mut exchange = Exchange {
            grpc,
            ..Default::default()
        };
        let snapshot = self.store.snapshot();
        let result = match snapshot.service(&ds.service) {
            None => Err(MeshError::NoEndpoint),
            Some(svc) => {
                let trace_id = trace_id.as_str();
                self.decide_and_forward(req, svc, &snapshot, &conn, trace_id, &mut exchange)
                    .await
            }
        };
        let (mut resp, mesh_error) = match result {
            Ok(resp) => (resp, None),
            Err(e) => {
                self.stats.mesh_errors.fetch_add(1, Ordering::Relaxed);
                let dest = || DestinationLabels {
                    destination: ds.service.clone(),
                };
                match e {
                    MeshError::Denied | MeshError::CallerNotPlaced => {
                        self.stats.denied.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .denied
                            .get_or_create(&EdgeLabels {
                                source: conn.caller.to_string(),
                                destination: ds.service.clone(),
                            })
                            .inc();
                    }
                    MeshError::RateLimited { .. } => {
                        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                        self.metrics.rate_limited.get_or_create(&dest()).inc();
                    }
                    MeshError::Timeout => {
                        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        self.metrics.timeouts.get_or_create(&dest()).inc();
                    }
                    _ => {}
                };
                tracing::warn!(
                    trace_id = %trace_id, service = %ds.service, caller = %ds.caller,
                    process = %ds.caller_process, %method, %path,
                    "mesh answered {}: {}", e.status().as_u16(), e.reason()
                );
                (e.response(&ds.service, grpc), Some(e.reason()))
            }
        };
        if exchange.retries > 0 {
            self.metrics
                .retries
                .get_or_create(&DestinationLabels {
                    destination: ds.service.clone(),
                })
                .inc_by(u64::from(exchange.retries));
        }
        resp.headers_mut()
            .insert(trace::TRACE_ID_HEADER, trace_id.as_header_value().clone());
        if conn.drain.is_signaled() && downstream_http1 && status_of(&resp) != 101 {
            // Draining: this is the connection's last response; the caller reconnects.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = resp.status().as_u16();
        tracing::debug!(
            trace_id = %trace_id, service = %ds.service, caller = %ds.caller, %method, %path,
            status, retries = exchange.retries, elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        // The event is completed and published when the response body has been sent.
        let mut event = HttpTap {
            time_unix_ms: 0,
            caller: conn.caller.clone(),
            caller_process: conn.caller_process.clone(),
            callee: conn.callee.clone(),
            method,
            authority,
            path,
            status,
            latency_ms: 0.0,
            request_bytes: 0,
            response_bytes: 0,
            retries: exchange.retries,
            upstream: exchange.upstream,
            external: exchange.external.take(),
            trace_id: trace_id.as_str().into(),
            mesh_error,
            headers,
            client: conn.gateway.as_ref().map(|g| g.client),
            subject: conn.gateway.as_ref().and_then(|g| g.subject.clone()),
        };
        let tap = self.tap.clone();
        let metrics = self.metrics.clone();
        let replay = exchange.replay.take();
        let (parts, body) = resp.into_parts();
        let body = ObservedBody::new(body, move |response_bytes| {
            event.time_unix_ms = unix_ms();
            event.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            event.response_bytes = response_bytes;
            event.request_bytes = replay.map_or(0, |r| r.bytes_seen());
            conn.series.record(&metrics, status, started);
            conn.request_ended();
            tap.publish_http(event);
        });
        Response::from_parts(parts, body.boxed())
    }

    async fn decide_and_forward<B: RequestBody>(
        &self,
        req: Request<B>,
        svc: &ServiceInfo,
        snapshot: &Snapshot,
        conn: &Conn,
        trace_id: &str,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, MeshError> {
        let ds = &conn.ds;
        let state = self.states.get(svc, snapshot);
        // Access policy and rate limits belong to the host where the service lives: with no
        // instance here, the destination's agent decides (and we pass on its answer).
        let here = state.endpoints.has_local();
        if here && !policy::allows(&svc.spec.policy, &ds.caller) {
            return Err(MeshError::Denied);
        }
        if let Some(limiter) = state.limiter.as_ref().filter(|_| here) {
            match limiter.check(Instant::now()) {
                Decision::Allow => {}
                Decision::Wait(d) => {
                    tracing::debug!(trace_id, service = %svc.spec.name, wait_ms = d.as_millis() as u64, "rate limit: queued");
                    tokio::time::sleep(d).await;
                }
                Decision::Reject { retry_after } => {
                    return Err(MeshError::RateLimited { retry_after });
                }
            }
        }
        let mut route = RouteSettings::for_path(&svc.spec, req.uri().path());
        if let Some(g) = &conn.gateway {
            route.retries = g.retries.unwrap_or(route.retries);
            route.timeout = g.timeout.or(route.timeout);
            route.per_try = g.per_try_timeout.or(route.per_try);
        }
        let deadline = route.timeout.map(|t| tokio::time::Instant::now() + t);
        exchange.deadline = deadline;
        let work = self.forward(req, svc, &state, route, conn, trace_id, exchange);
        match deadline {
            None => work.await,
            // `forward` stops each attempt at the deadline itself (so the instance is charged
            // for it); this outer bound only catches time spent outside an attempt.
            Some(d) => tokio::time::timeout_at(d + OUTER_TIMEOUT_SLACK, work)
                .await
                .unwrap_or(Err(MeshError::Timeout)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward<B: RequestBody>(
        &self,
        req: Request<B>,
        svc: &ServiceInfo,
        state: &state::ServiceState,
        route: RouteSettings,
        conn: &Conn,
        trace_id: &str,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, MeshError> {
        let RouteSettings {
            retries, per_try, ..
        } = route;
        let deadline = exchange.deadline;
        let grpc = exchange.grpc;
        let version = match req.version() {
            hyper::Version::HTTP_2 => Version::Http2,
            _ => Version::Http1,
        };
        if version == Version::Http1 && is_upgrade(req.headers()) {
            return self.forward_upgrade(req, svc, state, conn).await;
        }
        let (parts, incoming) = req.into_parts();
        let (tee_body, replay) = tee(incoming);
        exchange.replay = Some(replay.clone());
        let mut first_body: Option<ProxyBody> = Some(tee_body.boxed());
        let endpoints = &state.endpoints;
        state.budget.deposit(Instant::now());
        let mut attempt: u32 = 0;
        // Sends again of requests the instance did not process; not retries.
        let mut replays: u32 = 0;
        let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
        let mut last_error = MeshError::NoEndpoint;
        loop {
            let now = Instant::now();
            if endpoints.addrs.is_empty() {
                return Err(MeshError::NoEndpoint);
            }
            // A retry goes elsewhere when it can: an instance that just failed this request
            // is skipped while any other candidate remains.
            let candidates = endpoints.candidates(now);
            let untried = |i: usize| candidates(i) && !tried.contains(&i);
            let any_untried = (0..endpoints.addrs.len()).any(untried);
            let pick = if any_untried {
                endpoints.balancer.pick(untried)
            } else {
                endpoints.balancer.pick(&candidates)
            };
            let Some(idx) = pick else {
                return Err(MeshError::CircuitOpen);
            };
            let Some(permit) = endpoints.breakers[idx].try_acquire(now) else {
                // Another request took the single probe of this instance just now.
                return Err(MeshError::CircuitOpen);
            };
            let addr = endpoints.addrs[idx];
            let via = &endpoints.vias[idx];
            exchange.upstream = Some(addr);
            exchange.external = external_name(via);
            tried.push(idx);
            let in_flight = endpoints.balancer.start(idx, now);
            // Connect before giving the body away: a failed connect sent nothing, so the
            // untouched body is still there for the next instance.
            let checkout = self
                .pool
                .checkout(addr, via, &svc.spec.name, &conn.caller, version, true)
                .await;
            let outcome = match checkout {
                Err(upstream::ConnectError::Refused {
                    node,
                    status,
                    reason,
                    retry_after,
                }) => {
                    // The destination host decided (policy, rate limit): its answer is ours,
                    // and the instance is not at fault.
                    drop(permit);
                    tracing::info!(trace_id, service = %svc.spec.name, %node, status, %reason, "destination host refused");
                    return Err(MeshError::from_refusal(status, &reason, retry_after));
                }
                Err(e) => {
                    tracing::debug!(trace_id, service = %svc.spec.name, "{e}");
                    permit.failure(Instant::now());
                    last_error = MeshError::ConnectFailed;
                    AttemptOutcome::ConnectFailed
                }
                Ok(conn) => {
                    let body = match first_body.take() {
                        Some(b) => b,
                        None => match replay.body() {
                            Some(b) => b,
                            None => return Err(last_error),
                        },
                    };
                    let upstream_req =
                        upstream_request(&parts, body, addr, version, external_rewrite(via));
                    let sent = conn.send(&self.pool, upstream_req);
                    // The attempt ends at the per-try timeout or the route deadline, whichever
                    // comes first. Err(None): it timed out; Err(Some(e)): the exchange broke.
                    let attempt_deadline =
                        [per_try.map(|t| tokio::time::Instant::now() + t), deadline]
                            .into_iter()
                            .flatten()
                            .min();
                    let answered = match attempt_deadline {
                        None => sent.await.map_err(Some),
                        Some(d) => match tokio::time::timeout_at(d, sent).await {
                            Ok(r) => r.map_err(Some),
                            Err(_) => Err(None),
                        },
                    };
                    match answered {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let grpc_status = retry::grpc_status(resp.headers());
                            let failed = matches!(status, 502..=504)
                                || grpc_status == Some(retry::GRPC_STATUS_UNAVAILABLE);
                            let done = Instant::now();
                            if failed {
                                // No latency sample: a fast failure must not make the
                                // instance look fast (the breaker deals with failures).
                                permit.failure(done);
                                drop(in_flight);
                            } else {
                                permit.success(done);
                                in_flight.finish(done);
                            }
                            let outcome = AttemptOutcome::Response {
                                status,
                                grpc_status,
                            };
                            if !failed
                                || !self.may_retry(
                                    &parts.method,
                                    grpc,
                                    &replay,
                                    outcome,
                                    attempt,
                                    retries,
                                    state,
                                )
                            {
                                return Ok(downstream_response(resp));
                            }
                            outcome
                        }
                        Err(Some(upstream::SendError::Unprocessed { request, error })) => {
                            // The instance rotated its connection (GOAWAY, REFUSED_STREAM,
                            // or a pooled HTTP/1.1 connection closed before the request
                            // was written): not its failure, and safe for any method.
                            drop(in_flight);
                            replays += 1;
                            self.stats.unprocessed.fetch_add(1, Ordering::Relaxed);
                            if replays > MAX_UNPROCESSED_REPLAYS {
                                // An instance that refuses everything is failing.
                                permit.failure(Instant::now());
                                tracing::info!(trace_id, service = %svc.spec.name, %addr, "instance refused the request {replays} times: {error}");
                                return Err(MeshError::UpstreamFailed);
                            }
                            drop(permit);
                            tracing::debug!(trace_id, service = %svc.spec.name, %addr, "not processed ({error}); sending again on a fresh connection");
                            first_body = match request {
                                Some(r) => Some(r.into_body()),
                                None => match replay.body_when_returned(BODY_RETURN_WAIT).await {
                                    Some(b) => Some(b),
                                    // Streamed past the replay limit: it cannot be sent again.
                                    None => {
                                        tracing::info!(trace_id, service = %svc.spec.name, %addr, "instance refused a request whose body cannot be sent again (over the replay limit)");
                                        return Err(MeshError::UpstreamFailed);
                                    }
                                },
                            };
                            tried.pop();
                            continue;
                        }
                        Err(e) => {
                            let now = Instant::now();
                            last_error = match e {
                                None => {
                                    permit.failure(now);
                                    // A slow instance is slow: record how long it kept us
                                    // waiting so the balancer stops preferring it.
                                    in_flight.finish(now);
                                    tracing::debug!(trace_id, service = %svc.spec.name, %addr, "attempt timed out");
                                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                                        return Err(MeshError::Timeout);
                                    }
                                    MeshError::Timeout
                                }
                                Some(e) => {
                                    match &e {
                                        // Another request on the same broken connection
                                        // already counted it.
                                        upstream::SendError::Broken { charge: false, .. } => {
                                            drop(permit)
                                        }
                                        _ => permit.failure(now),
                                    }
                                    tracing::debug!(trace_id, service = %svc.spec.name, %addr, "upstream failed: {e}");
                                    MeshError::UpstreamFailed
                                }
                            };
                            AttemptOutcome::ConnectionReset
                        }
                    }
                }
            };
            if matches!(
                outcome,
                AttemptOutcome::ConnectFailed | AttemptOutcome::ConnectionReset
            ) && !self.may_retry(
                &parts.method,
                grpc,
                &replay,
                outcome,
                attempt,
                retries,
                state,
            ) {
                return Err(last_error);
            }
            attempt += 1;
            exchange.retries = attempt;
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let delay = self.backoff.delay(attempt, &mut rand::rng());
            tracing::info!(
                trace_id, service = %svc.spec.name, %addr, attempt, ?outcome,
                backoff_ms = delay.as_millis() as u64, "retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn may_retry(
        &self,
        method: &hyper::Method,
        grpc: bool,
        replay: &body::Replay,
        outcome: AttemptOutcome,
        attempt: u32,
        retries: u32,
        state: &state::ServiceState,
    ) -> bool {
        if attempt >= retries {
            return false;
        }
        let request = RetryRequest {
            method,
            is_grpc: grpc,
            body_replayable: outcome == AttemptOutcome::ConnectFailed || replay.is_replayable(),
        };
        match retry::retry_verdict(&request, outcome) {
            RetryVerdict::Retry => state.budget.try_withdraw(Instant::now()),
            RetryVerdict::DontRetry(_) => false,
        }
    }

    /// WebSocket and other `Upgrade` requests: one attempt on a connection of their own,
    /// then the two upgraded streams are spliced.
    async fn forward_upgrade<B: RequestBody>(
        &self,
        mut req: Request<B>,
        svc: &ServiceInfo,
        state: &state::ServiceState,
        conn: &Conn,
    ) -> Result<Response<ProxyBody>, MeshError> {
        let endpoints = &state.endpoints;
        let now = Instant::now();
        let idx = endpoints.balancer.pick(endpoints.candidates(now)).ok_or(
            if endpoints.addrs.is_empty() {
                MeshError::NoEndpoint
            } else {
                MeshError::CircuitOpen
            },
        )?;
        let addr = endpoints.addrs[idx];
        let conn = self
            .pool
            .checkout(
                addr,
                &endpoints.vias[idx],
                &svc.spec.name,
                &conn.caller,
                Version::Http1,
                false,
            )
            .await
            .map_err(|e| match e {
                upstream::ConnectError::Refused {
                    status,
                    reason,
                    retry_after,
                    ..
                } => MeshError::from_refusal(status, &reason, retry_after),
                _ => MeshError::ConnectFailed,
            })?;
        let downstream_upgrade = hyper::upgrade::on(&mut req);
        let (parts, incoming) = req.into_parts();
        let upstream_req = upstream_request(
            &parts,
            incoming.map_err(Into::into).boxed(),
            addr,
            Version::Http1,
            external_rewrite(&endpoints.vias[idx]),
        );
        let mut resp = conn
            .send(&self.pool, upstream_req)
            .await
            .map_err(|_| MeshError::UpstreamFailed)?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let service = svc.spec.name.clone();
            tokio::spawn(async move {
                match tokio::try_join!(downstream_upgrade, upstream_upgrade) {
                    Ok((down, up)) => {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                            tracing::debug!(%service, "upgraded connection ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!(%service, "upgrade failed: {e}"),
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, body::empty()));
        }
        Ok(downstream_response(resp))
    }
}

/// One downstream connection as its requests see it: the names and metric series every
/// request needs, prepared once instead of per request.
struct Conn {
    ds: Downstream,
    drain: Drain,
    /// Requests whose response body has not ended; none means idle for the cap.
    in_flight: crate::limits::InFlight,
    caller: Arc<str>,
    caller_process: Arc<str>,
    callee: Arc<str>,
    series: EdgeSeries,
    /// Set when the gateway made this request.
    gateway: Option<GatewayCall>,
}

impl Conn {
    fn request_started(&self) {
        self.in_flight.started();
    }

    fn request_ended(&self) {
        self.in_flight.ended();
    }

    fn new(ds: Downstream, drain: Drain, idle: crate::limits::IdleFlag) -> Conn {
        let caller = ds.caller.to_string();
        Conn {
            drain,
            in_flight: crate::limits::InFlight::new(idle),
            series: EdgeSeries::new(&caller, &ds.service),
            caller: caller.into(),
            caller_process: ds.caller_process.as_str().into(),
            callee: ds.service.as_str().into(),
            ds,
            gateway: None,
        }
    }
}

/// What happened while forwarding one request, for taps and metrics.
#[derive(Default)]
pub struct Exchange {
    /// When the route timeout fires, if the route has one.
    pub deadline: Option<tokio::time::Instant>,
    pub grpc: bool,
    pub retries: u32,
    pub upstream: Option<SocketAddrV4>,
    /// The outside system of an external service's call.
    pub external: Option<Arc<str>>,
    replay: Option<body::Replay>,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the matching route says, with defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSettings {
    pub retries: u32,
    pub timeout: Option<Duration>,
    pub per_try: Option<Duration>,
}

impl RouteSettings {
    pub fn for_path(spec: &ServiceSpec, path: &str) -> RouteSettings {
        let route = route_for(spec, path);
        RouteSettings {
            retries: route.and_then(|r| r.retries).unwrap_or(DEFAULT_RETRIES),
            timeout: route.and_then(|r| r.timeout),
            per_try: route.and_then(|r| r.per_try_timeout),
        }
    }
}

/// The route whose path prefix is the longest match.
pub fn route_for<'a>(spec: &'a ServiceSpec, path: &str) -> Option<&'a RouteSpec> {
    spec.routes
        .iter()
        .filter(|r| path.starts_with(&r.path))
        .max_by_key(|r| r.path.len())
}

/// A request that asks to switch protocols and must be spliced after a 101. An offer to
/// switch to h2c alone (`Upgrade: h2c`, what Java's HttpClient sends on its first plain-HTTP
/// request) is not: the mesh declines it by dropping the hop-by-hop headers, so the request
/// stays ordinary HTTP/1.1 with routes, retries and taps, and the client simply keeps
/// HTTP/1.1 (RFC 9113 dropped that upgrade; Envoy declines it the same way).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    let only_h2c = headers.get_all(header::UPGRADE).iter().all(|v| {
        v.to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("h2c"))
    });
    headers.contains_key(header::UPGRADE)
        && !only_h2c
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("upgrade"))
        })
}

/// Headers that describe one hop's connection and must not be forwarded (RFC 9110 7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `te` may only say "trailers" past the first hop (gRPC relies on it).
    if let Some(te) = headers.get(header::TE)
        && te.to_str().map(|s| s.trim() != "trailers").unwrap_or(true)
    {
        headers.remove(header::TE);
    }
}

/// For an external service's endpoint: the scheme and `Host` the outside system expects.
fn external_rewrite(via: &upstream::Via) -> Option<(&'static str, String)> {
    match via {
        upstream::Via::External(t) => t.rewrite(),
        _ => None,
    }
}

/// For taps: the outside system an external call went to (`https://host:port`).
fn external_name(via: &upstream::Via) -> Option<Arc<str>> {
    match via {
        upstream::Via::External(t) => Some(t.spec.to_string().into()),
        _ => None,
    }
}

/// The request as sent upstream. `rewrite` (external services): the scheme and authority of
/// the outside system, which replace the `name.svc` the caller used (a server behind TLS
/// routes by its own name).
fn upstream_request(
    parts: &hyper::http::request::Parts,
    body: ProxyBody,
    addr: SocketAddrV4,
    version: Version,
    rewrite: Option<(&'static str, String)>,
) -> Request<ProxyBody> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = match version {
        // Already origin-form (what HTTP/1.1 clients send): the same URI, shared not parsed.
        Version::Http1
            if parts.uri.scheme().is_none()
                && parts.uri.authority().is_none()
                && parts.uri.path_and_query().is_some() =>
        {
            Ok(parts.uri.clone())
        }
        // HTTP/1.1 to an origin server: origin-form request target.
        Version::Http1 => path.parse::<Uri>(),
        // HTTP/2 needs scheme and authority pseudo-headers; keep the name the caller used.
        Version::Http2 => {
            let (scheme, authority) = match &rewrite {
                Some((scheme, authority)) => (*scheme, authority.clone()),
                None => (
                    "http",
                    parts
                        .uri
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| addr.to_string()),
                ),
            };
            format!("{scheme}://{authority}{path}").parse::<Uri>()
        }
    }
    .unwrap_or_else(|_| Uri::from_static("/"));
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = match version {
        Version::Http1 => hyper::Version::HTTP_11,
        Version::Http2 => hyper::Version::HTTP_2,
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers, is_upgrade(&parts.headers));
    if let Some((_, authority)) = &rewrite {
        headers.remove(header::HOST);
        if version == Version::Http1
            && let Ok(v) = HeaderValue::from_str(authority)
        {
            headers.insert(header::HOST, v);
        }
    } else if version == Version::Http1
        && !headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    *req.headers_mut() = headers;
    req
}

fn status_of<B>(resp: &Response<B>) -> u16 {
    resp.status().as_u16()
}

fn downstream_response(resp: Response<upstream::PooledBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_matching_prefix_wins() {
        let spec = hms_ctl::spec::parse(
            "name: a\nport: 1\nroutes:\n  - path: /\n    retries: 0\n  - path: /check\n    timeout: 2s\n",
            "t",
        )
        .unwrap();
        assert_eq!(route_for(&spec, "/check/x").unwrap().path, "/check");
        assert_eq!(route_for(&spec, "/pay").unwrap().path, "/");
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-hms-trace-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-secret") && !h.contains_key("connection"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-hms-trace-id"], "abc");
    }

    #[test]
    fn an_h2c_upgrade_offer_is_declined_but_websocket_is_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA"),
        );
        assert!(!is_upgrade(&h));
        let keep = is_upgrade(&h);
        strip_hop_by_hop(&mut h, keep);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
    }
}
