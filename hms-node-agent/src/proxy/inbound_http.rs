//! HTTP inside an inbound tunnel stream: the destination host serves the stream a peer's
//! agent declared HTTP (`x-hms-protocol`) with hyper, so that it sees every request the
//! caller's pooled connection carries and applies the service's rate limit per request,
//! answering each excess request 429 + `Retry-After` + `x-hms-error` exactly as the proxy
//! does on one host. Admitted requests go, in order, over one connection to the local
//! instance the tunnel already dialled (same HTTP version, so the caller's pooling
//! semantics hold end to end); when the instance closes that connection (its keep-alive
//! rotation) a request not yet written goes on a new one, as the proxy's pool does on one
//! host. `Upgrade` exchanges (WebSocket) are spliced after the 101.
//!
//! Owns only the per-request rate limit and the relay; the caller and policy were decided
//! once for the stream (`proxy::inbound`). Never dials anything but the stream's own
//! loopback instance.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::http::body::{self, ProxyBody};
use super::http::errors::MeshError;
use super::http::{HttpProxy, MAX_HEADER_BYTES};
use crate::metrics::DestinationLabels;
use crate::registry::Store;
use crate::resilience::rate_limit::Decision;
use crate::resilience::retry;
use crate::tunnel::{H2Stream, InboundRequest, LOCAL_CONNECT_TIMEOUT, StreamProtocol};

/// Serves `downstream` (the tunnel stream) as HTTP of `request.protocol`, relaying admitted
/// requests over `upstream` (and, when the instance closes that connection, over a new
/// one). Returns the bytes sent to and received from the instance and the error that ended
/// the stream, if any.
pub async fn relay(
    http: Arc<HttpProxy>,
    store: Arc<dyn Store>,
    request: &InboundRequest,
    downstream: H2Stream,
    upstream: TcpStream,
) -> (u64, u64, Option<String>) {
    let service: Arc<str> = request.target.service.as_str().into();
    let instance = Arc::new(Instance {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, request.target.port)),
        http2: request.protocol == StreamProtocol::Http2,
        counts: Arc::new(Counts::default()),
        service: service.clone(),
        sender: tokio::sync::Mutex::new(None),
    });
    let error = match instance.handshake(upstream).await {
        Err(e) => Some(e),
        Ok(sender) => {
            *instance.sender.lock().await = Some(sender);
            let gate = Arc::new(Gate {
                http,
                store,
                service,
            });
            if instance.http2 {
                serve_h2(gate, instance.clone(), downstream).await
            } else {
                serve_h1(gate, instance.clone(), downstream).await
            }
        }
    };
    (
        instance.counts.sent.load(Ordering::Relaxed),
        instance.counts.received.load(Ordering::Relaxed),
        error,
    )
}

/// How often one request is sent again because the instance closed its connection before
/// the request was written (its connection rotation, not a failure).
const MAX_UNSENT_RETRIES: usize = 3;

/// The local instance's side of the relay: one connection at a time, replaced when the
/// instance closes it (keep-alive timeout, GOAWAY), as the proxy's own pool does.
struct Instance {
    addr: SocketAddr,
    http2: bool,
    counts: Arc<Counts>,
    service: Arc<str>,
    sender: tokio::sync::Mutex<Option<Sender>>,
}

enum Sender {
    H1(client1::SendRequest<Incoming>),
    H2(client2::SendRequest<Incoming>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl Instance {
    async fn handshake(&self, tcp: TcpStream) -> Result<Sender, String> {
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(Counted {
            inner: tcp,
            counts: self.counts.clone(),
        });
        let service = self.service.clone();
        if self.http2 {
            let (sender, conn) = client2::handshake::<_, _, Incoming>(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("HTTP/2 handshake with the instance: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%service, "inbound HTTP/2 instance connection ended: {e}");
                }
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = client1::handshake::<_, Incoming>(io)
                .await
                .map_err(|e| format!("HTTP/1.1 handshake with the instance: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%service, "inbound HTTP/1 instance connection ended: {e}");
                }
            });
            Ok(Sender::H1(sender))
        }
    }

    async fn dial(&self) -> Result<Sender, String> {
        let tcp =
            tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, crate::own_socket::connect(self.addr))
                .await
                .map_err(|_| {
                    format!(
                        "{} did not accept within {LOCAL_CONNECT_TIMEOUT:?}",
                        self.addr
                    )
                })?
                .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
        self.handshake(tcp).await
    }

    /// Sends `req`, again on a new connection when the instance closed the current one
    /// before the request was written.
    async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        for _ in 0..MAX_UNSENT_RETRIES {
            // HTTP/1.1: the server hands us one request at a time, so holding the lock
            // for the exchange never makes another request wait.
            let mut guard = self.sender.lock().await;
            if guard.as_ref().is_none_or(Sender::is_closed) {
                *guard = Some(self.dial().await?);
            }
            let sent = match guard.as_mut().expect("just set") {
                Sender::H1(s) => {
                    if s.ready().await.is_err() {
                        *guard = None;
                        continue;
                    }
                    s.try_send_request(req).await
                }
                Sender::H2(s) => {
                    let mut s = s.clone();
                    drop(guard);
                    let sent = s.try_send_request(req).await;
                    guard = self.sender.lock().await;
                    sent
                }
            };
            match sent {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    if guard.as_ref().is_some_and(Sender::is_closed) {
                        *guard = None;
                    }
                    match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err(e.into_error().to_string()),
                    }
                }
            }
        }
        Err(format!(
            "{} closed {MAX_UNSENT_RETRIES} connections before the request could be sent",
            self.addr
        ))
    }
}

async fn serve_h1(
    gate: Arc<Gate>,
    instance: Arc<Instance>,
    downstream: H2Stream,
) -> Option<String> {
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let gate = gate.clone();
        let instance = instance.clone();
        async move {
            if let Some(refusal) = gate.admit(&req).await {
                return Ok::<_, Infallible>(refusal);
            }
            let downstream_upgrade =
                super::http::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
            Ok(match instance.send(req).await {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(down) = downstream_upgrade
                    {
                        let up = hyper::upgrade::on(&mut resp);
                        let service = gate.service.clone();
                        tokio::spawn(async move {
                            match tokio::try_join!(down, up) {
                                Ok((down, up)) => {
                                    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                                    if let Err(e) =
                                        tokio::io::copy_bidirectional(&mut down, &mut up).await
                                    {
                                        tracing::debug!(%service, "upgraded inbound connection ended: {e}");
                                    }
                                }
                                Err(e) => tracing::debug!(%service, "inbound upgrade failed: {e}"),
                            }
                        });
                        let (parts, _) = resp.into_parts();
                        Response::from_parts(parts, body::empty())
                    } else {
                        resp.map(|b| b.map_err(Into::into).boxed())
                    }
                }
                Err(e) => gate.upstream_failed(&e),
            })
        }
    });
    server1::Builder::new()
        .timer(TokioTimer::new())
        // A caller that half-closes after its last request still gets the answer.
        .half_close(true)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(downstream), svc)
        .with_upgrades()
        .await
        .err()
        .map(|e| format!("HTTP/1.1 on the tunnel stream: {e}"))
}

async fn serve_h2(
    gate: Arc<Gate>,
    instance: Arc<Instance>,
    downstream: H2Stream,
) -> Option<String> {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let gate = gate.clone();
        let instance = instance.clone();
        async move {
            if let Some(refusal) = gate.admit(&req).await {
                return Ok::<_, Infallible>(refusal);
            }
            Ok(match instance.send(req).await {
                Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
                Err(e) => gate.upstream_failed(&e),
            })
        }
    });
    server2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(downstream), svc)
        .await
        .err()
        .map(|e| format!("HTTP/2 on the tunnel stream: {e}"))
}

/// The per-request decision: the service's limiter, as the proxy applies it on one host.
struct Gate {
    http: Arc<HttpProxy>,
    store: Arc<dyn Store>,
    service: Arc<str>,
}

impl Gate {
    /// None to relay the request, or the mesh's answer to send instead.
    async fn admit(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        let snapshot = self.store.snapshot();
        // The service may have been removed since the stream was authorized.
        let Some(svc) = snapshot.service(&self.service) else {
            return Some(self.mesh_error(req, MeshError::NoEndpoint));
        };
        let state = self.http.states.get(svc, &snapshot);
        let limiter = state.limiter.as_ref()?;
        match limiter.check(Instant::now()) {
            Decision::Allow => None,
            Decision::Wait(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Decision::Reject { retry_after } => {
                let http = &self.http;
                http.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                http.metrics
                    .rate_limited
                    .get_or_create(&DestinationLabels {
                        destination: self.service.to_string(),
                    })
                    .inc();
                Some(self.mesh_error(req, MeshError::RateLimited { retry_after }))
            }
        }
    }

    fn mesh_error(&self, req: &Request<Incoming>, e: MeshError) -> Response<ProxyBody> {
        tracing::debug!(service = %self.service, method = %req.method(), path = %req.uri().path(),
            "inbound tunnel request answered {}: {}", e.status().as_u16(), e.reason());
        e.response(&self.service, retry::is_grpc(req.headers()))
    }

    fn upstream_failed(&self, e: &str) -> Response<ProxyBody> {
        tracing::debug!(service = %self.service, "inbound tunnel request to the instance failed: {e}");
        // 502 with `x-hms-error: upstream-failed`: the caller's agent treats it like any
        // failed attempt (breaker, retry).
        MeshError::UpstreamFailed.response(&self.service, false)
    }
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    received: AtomicU64,
}

/// The instance connection, counting the bytes each way for the flow record.
struct Counted {
    inner: TcpStream,
    counts: Arc<Counts>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.received.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    // hyper asks `is_write_vectored` to choose between queueing a request's head and body
    // as separate buffers (one `writev`) and flattening them into one copy first: without
    // these two, every relayed request was copied once more before its `sendto`.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
