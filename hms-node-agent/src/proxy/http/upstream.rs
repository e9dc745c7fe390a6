//! Connections to service instances, pooled per instance. HTTP/1.1 connections carry one
//! request at a time and go back to the idle list once their response has been read to the
//! end; HTTP/2 connections are shared by every request to that instance (multiplexed). A
//! connection that fails or closes is dropped, never reused. Only real instance addresses
//! are ever dialled: a local instance directly, an instance on another host through an
//! mTLS HTTP/2 CONNECT stream to that host's agent (`tunnel`), which the peer splices to
//! its local instance after its own policy check.
//!
//! Connection rotation is the instance's right, not its failure. [`Checkout::send`] tells
//! the proxy which failures left the request unprocessed ([`SendError::Unprocessed`]):
//! - HTTP/2 (RFC 9113 §8.7): a stream reset with `REFUSED_STREAM`, or refused by a
//!   `GOAWAY` (a stream above its last stream id, or one opened after it); the connection
//!   is retired from the pool at once so the next request dials a fresh one;
//! - HTTP/1.1: hyper handed the request back unwritten (the pooled connection turned out
//!   closed before the request reached it), body untouched.
//!
//! An HTTP/2 connection leaves the pool as soon as hyper's dispatcher for it stops taking
//! requests (a GOAWAY arrived, or it broke), and no request holds a handle to it while it
//! waits: a request that raced the connection's end into hyper's queue is then handed back
//! unsent ([`SendError::Unprocessed`]) instead of waiting forever. A request that still has
//! no answer [`H2_ORPHAN_GRACE`] after the connection's byte stream is gone fails
//! ([`SendError::Orphaned`], a 502 with `x-hms-error`): a safety net that should never fire.
//!
//! Every other failure is [`SendError::Broken`], and `charge` says whether it should count
//! against the instance: one broken connection counts once, however many streams it
//! carried (the first request to see the break charges it, the others do not). Through a
//! tunnel the tunnel connection decides first: broken, it counts once for every upstream
//! connection it carried; drained by the peer (GOAWAY), not at all.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::body::ProxyBody;
use super::reads_past_reset::ReadsPastReset;
use crate::identity::SpiffeId;
use crate::proxy::external::ExternalTarget;
use crate::tunnel::{
    LinkFate, PeerPool, StreamProtocol, TunnelError, TunnelLink, TunnelStream, TunnelTarget,
};

/// A byte stream to an instance.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<TunnelStream>),
    /// TLS the mesh originated to an external service's outside system.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Idle HTTP/1.1 connections kept per instance; more are closed after use.
const MAX_IDLE_PER_INSTANCE: usize = 32;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// How this host reaches an instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Via {
    Local,
    /// Through the agent of host `node`, listening on `inbound`.
    Peer {
        node: String,
        inbound: std::net::SocketAddr,
    },
    /// An external service's outside system (egress), dialled from this host.
    External(Arc<ExternalTarget>),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddrV4),
    #[error("connecting to {0} failed: {1}")]
    Io(SocketAddrV4, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddrV4, hyper::Error),
    #[error("no identity yet to reach host {0} (see `hms-ctl status`)")]
    NoIdentity(String),
    #[error("reaching external service {service} failed: {error}")]
    External { service: String, error: String },
    #[error("tunnel to host {node} failed: {error}")]
    Tunnel { node: String, error: String },
    /// The destination host's agent refused (its policy, its rate limit, no instance).
    #[error("host {node} refused: {status} {reason}")]
    Refused {
        node: String,
        status: u16,
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// Why an exchange failed, as the retry rules and the breaker need to know it.
#[derive(Debug)]
pub enum SendError {
    /// The instance did not process the request: safe to send again for any method.
    /// `request` is the request itself when hyper handed it back unwritten (its body
    /// untouched); otherwise the body must come from the replay buffer.
    Unprocessed {
        request: Option<Box<Request<ProxyBody>>>,
        error: hyper::Error,
    },
    /// The exchange broke after (part of) the request may have reached the instance.
    /// `charge`: count it against the instance (false when another request on the same
    /// broken connection already did).
    Broken { error: hyper::Error, charge: bool },
    /// The HTTP/2 connection ended and, [`H2_ORPHAN_GRACE`] later, the request had still
    /// heard nothing. A safety net: hyper and h2 answer every request of a closed
    /// connection; this firing means one was lost between them (logged at warn).
    Orphaned,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Unprocessed { error, .. } => write!(f, "not processed: {error}"),
            SendError::Broken { error, .. } => write!(f, "{error}"),
            SendError::Orphaned => write!(
                f,
                "the HTTP/2 connection ended without answering the request"
            ),
        }
    }
}

/// One upstream connection's breakage, shared by every request on it, so that a broken
/// connection counts once against the instance; through a tunnel, also the tunnel
/// connection it rides on, so that a broken tunnel counts once (whichever instance's
/// request saw it first) and a peer's drain against nothing.
#[derive(Debug, Default)]
struct ConnFault {
    charged: AtomicBool,
    link: Option<Arc<TunnelLink>>,
}

/// How long a failure on a tunnel stream waits to learn whether the tunnel connection
/// under it ended (the two are reported by different tasks).
const LINK_SETTLE: Duration = Duration::from_millis(200);

impl ConnFault {
    /// Whether this failure counts against the instance. `connection_level`: the whole
    /// connection failed (every request on it fails with it), so only the first counts.
    async fn charge(&self, connection_level: bool) -> bool {
        if let Some(link) = &self.link {
            match link.settle(LINK_SETTLE).await {
                LinkFate::Drained => return false,
                LinkFate::Broken => return link.charge(),
                LinkFate::Open => {}
            }
        }
        !connection_level || !self.charged.swap(true, Ordering::AcqRel)
    }
}

/// Numbers upstream HTTP/2 connections for the debug log (which connection a stream
/// was on, which GOAWAY it saw).
static NEXT_H2_CONN: AtomicU64 = AtomicU64::new(1);

/// Spawns hyper's tasks of one upstream HTTP/2 connection (the connection driver, each
/// stream's response and body pipe) inside that connection's span, so that h2's own debug
/// lines (frames sent and received, GOAWAY, resets) name the connection they belong to.
#[derive(Clone)]
struct SpannedExecutor(tracing::Span);

impl<F> hyper::rt::Executor<F> for SpannedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.instrument(self.0.clone()));
    }
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    /// With what says when the connection has ended.
    H2(http2::SendRequest<ProxyBody>, ConnEnded),
}

type Key = (Via, SocketAddrV4);

/// An idle pooled HTTP/1.1 connection and its breakage record.
type IdleH1 = (http1::SendRequest<ProxyBody>, Arc<ConnFault>);

/// The shared HTTP/2 connection to one instance.
struct SharedH2 {
    sender: http2::SendRequest<ProxyBody>,
    fault: Arc<ConnFault>,
    span: tracing::Span,
    ended: ConnEnded,
}

/// Tells whether an HTTP/2 connection's byte stream is gone: h2 owns it until the very
/// end of the connection (after its last stream), so its drop is the connection's end.
type ConnEnded = tokio::sync::watch::Receiver<()>;

/// An upstream HTTP/2 byte stream that says when it is dropped (see [`ConnEnded`]) and
/// lets h2 read the instance's last frames (its final GOAWAY) even when a write finds the
/// connection reset first (see [`ReadsPastReset`]).
struct TrackedIo {
    io: ReadsPastReset<UpstreamIo>,
    _alive: tokio::sync::watch::Sender<()>,
}

impl tokio::io::AsyncRead for TrackedIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TrackedIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[derive(Default)]
pub struct UpstreamPool {
    idle_h1: Mutex<HashMap<Key, Vec<IdleH1>>>,
    shared_h2: Mutex<HashMap<Key, SharedH2>>,
    /// One HTTP/2 dial per instance at a time: when a connection goes away, the requests it
    /// refused share the one new connection instead of each dialling its own.
    h2_dials: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// Tunnels to other hosts, once this host has a certificate.
    tunnels: std::sync::RwLock<Option<Arc<PeerPool>>>,
    trust_domain: std::sync::RwLock<Option<String>>,
}

/// A connection checked out for one request.
pub struct Checkout {
    key: Key,
    addr: SocketAddrV4,
    sender: Sender,
    fault: Arc<ConnFault>,
    /// The HTTP/2 connection's span (which connection a request went on), or none.
    span: tracing::Span,
    /// False for connections that must not be reused (upgrades).
    reusable: bool,
}

impl UpstreamPool {
    /// A ready connection to `addr`: an idle pooled one if there is, else a new one.
    /// An error here means the request was never sent, so retrying it is always safe.
    /// Lets the pool reach other hosts with this host's identity.
    pub fn set_tunnels(&self, tunnels: Arc<PeerPool>, trust_domain: String) {
        *self.tunnels.write().unwrap_or_else(|p| p.into_inner()) = Some(tunnels);
        *self.trust_domain.write().unwrap_or_else(|p| p.into_inner()) = Some(trust_domain);
    }

    pub fn tunnels(&self) -> Option<Arc<PeerPool>> {
        self.tunnels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `connected`, `idle` or the last error of the tunnel to host `node`, for `status`.
    pub fn tunnel_state(&self, node: &str) -> String {
        let Some(pool) = self.tunnels() else {
            return "no identity yet".into();
        };
        match pool
            .peer_status()
            .into_iter()
            .find(|p| p.node.node_name() == Some(node))
        {
            None => "idle".into(),
            Some(p) if p.connected => format!("connected ({} streams opened)", p.streams_opened),
            Some(p) => p.last_error.unwrap_or_else(|| "idle".into()),
        }
    }

    /// A raw byte stream to an instance (for opaque TCP): a TCP connection, or a tunnel
    /// stream through the instance's host.
    pub async fn connect(
        &self,
        addr: SocketAddrV4,
        via: &Via,
        service: &str,
        caller: &str,
    ) -> Result<UpstreamIo, ConnectError> {
        self.connect_as(addr, via, service, caller, StreamProtocol::Opaque)
            .await
    }

    /// [`UpstreamPool::connect`] for a connection that will carry `protocol`: a tunnel
    /// stream declares it, so the destination host sees each HTTP request in it.
    async fn connect_as(
        &self,
        addr: SocketAddrV4,
        via: &Via,
        service: &str,
        caller: &str,
        protocol: StreamProtocol,
    ) -> Result<UpstreamIo, ConnectError> {
        match via {
            Via::External(target) => {
                let version = match protocol {
                    StreamProtocol::Http1 => Some(Version::Http1),
                    StreamProtocol::Http2 => Some(Version::Http2),
                    StreamProtocol::Opaque => None,
                };
                target
                    .connect(version)
                    .await
                    .map_err(|error| ConnectError::External {
                        service: target.service.clone(),
                        error,
                    })
            }
            Via::Local => {
                match tokio::time::timeout(CONNECT_TIMEOUT, crate::own_socket::connect(addr)).await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        Ok(UpstreamIo::Tcp(s))
                    }
                    Ok(Err(e)) => Err(ConnectError::Io(addr, e)),
                    Err(_) => Err(ConnectError::Timeout(addr)),
                }
            }
            Via::Peer { node, inbound } => {
                let pool = self
                    .tunnels()
                    .ok_or_else(|| ConnectError::NoIdentity(node.clone()))?;
                let td = self
                    .trust_domain
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .ok_or_else(|| ConnectError::NoIdentity(node.clone()))?;
                let peer_id = SpiffeId::node(&td, node).map_err(|e| ConnectError::Tunnel {
                    node: node.clone(),
                    error: e.to_string(),
                })?;
                let target =
                    TunnelTarget::new(service, addr.port()).map_err(|e| ConnectError::Tunnel {
                        node: node.clone(),
                        error: e,
                    })?;
                match pool
                    .open_as(*inbound, &peer_id, &target, caller, protocol)
                    .await
                {
                    Ok(stream) => Ok(UpstreamIo::Tunnel(Box::new(stream))),
                    Err(TunnelError::Refused {
                        status,
                        reason,
                        retry_after,
                        ..
                    }) => Err(ConnectError::Refused {
                        node: node.clone(),
                        status,
                        reason,
                        retry_after,
                    }),
                    Err(e) => Err(ConnectError::Tunnel {
                        node: node.clone(),
                        error: e.to_string(),
                    }),
                }
            }
        }
    }

    pub async fn checkout(
        self: &Arc<Self>,
        addr: SocketAddrV4,
        via: &Via,
        service: &str,
        caller: &str,
        version: Version,
        reusable: bool,
    ) -> Result<Checkout, ConnectError> {
        // Pooled connections through a peer carry one caller's identity: key them by it.
        let key: Key = match via {
            Via::Local | Via::External(_) => (via.clone(), addr),
            Via::Peer { node, inbound } => (
                Via::Peer {
                    node: format!("{node}\u{0}{caller}"),
                    inbound: *inbound,
                },
                addr,
            ),
        };
        if reusable {
            match version {
                Version::Http1 => {
                    let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(list) = idle.get_mut(&key) {
                        while let Some((s, fault)) = list.pop() {
                            if s.is_ready() {
                                return Ok(Checkout {
                                    key,
                                    addr,
                                    sender: Sender::H1(s),
                                    fault,
                                    span: tracing::Span::none(),
                                    reusable,
                                });
                            }
                        }
                    }
                }
                Version::Http2 => {
                    if let Some(c) = self.shared_h2_checkout(&key, addr) {
                        return Ok(c);
                    }
                    let dial = self
                        .h2_dials
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(key.clone())
                        .or_default()
                        .clone();
                    let _dialling = dial.lock().await;
                    // Another request may have dialled while this one waited.
                    if let Some(c) = self.shared_h2_checkout(&key, addr) {
                        return Ok(c);
                    }
                    return self
                        .dial(key, addr, via, service, caller, version, reusable)
                        .await;
                }
            }
        }
        self.dial(key, addr, via, service, caller, version, reusable)
            .await
    }

    fn shared_h2_checkout(&self, key: &Key, addr: SocketAddrV4) -> Option<Checkout> {
        let shared = self.shared_h2.lock().unwrap_or_else(|p| p.into_inner());
        let s = shared.get(key).filter(|s| !s.sender.is_closed())?;
        Some(Checkout {
            key: key.clone(),
            addr,
            sender: Sender::H2(s.sender.clone(), s.ended.clone()),
            fault: s.fault.clone(),
            span: s.span.clone(),
            reusable: true,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn dial(
        self: &Arc<Self>,
        key: Key,
        addr: SocketAddrV4,
        via: &Via,
        service: &str,
        caller: &str,
        version: Version,
        reusable: bool,
    ) -> Result<Checkout, ConnectError> {
        let protocol = match version {
            Version::Http1 => StreamProtocol::Http1,
            Version::Http2 => StreamProtocol::Http2,
        };
        let io = self
            .connect_as(addr, via, service, caller, protocol)
            .await?;
        let fault = Arc::new(ConnFault {
            charged: AtomicBool::new(false),
            link: match &io {
                UpstreamIo::Tcp(_) | UpstreamIo::Tls(_) => None,
                UpstreamIo::Tunnel(t) => Some(t.link()),
            },
        });
        let (sender, span) = match version {
            Version::Http1 => {
                let (s, conn) = http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| ConnectError::Handshake(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(%addr, "upstream HTTP/1 connection ended: {e}");
                    }
                });
                (Sender::H1(s), tracing::Span::none())
            }
            Version::Http2 => {
                let id = NEXT_H2_CONN.fetch_add(1, Ordering::Relaxed);
                let span = tracing::debug_span!("upstream_h2", conn = id, %addr);
                let (alive, ended) = tokio::sync::watch::channel(());
                let io = TokioIo::new(TrackedIo {
                    io: ReadsPastReset::new(io),
                    _alive: alive,
                });
                let (s, conn) = http2::handshake(SpannedExecutor(span.clone()), io)
                    .instrument(span.clone())
                    .await
                    .map_err(|e| ConnectError::Handshake(addr, e))?;
                tracing::debug!(parent: &span, "upstream HTTP/2 connection opened");
                let conn_span = span.clone();
                let pool = Arc::downgrade(self);
                let (conn_key, conn_fault) = (key.clone(), fault.clone());
                tokio::spawn(
                    async move {
                        // This future is hyper's request dispatcher; it ends when the
                        // connection takes no more requests (GOAWAY received, or broken)
                        // while h2 goes on with the streams it already has.
                        match conn.await {
                            Ok(()) => {
                                tracing::debug!("upstream HTTP/2 connection takes no more requests")
                            }
                            Err(e) => tracing::debug!("upstream HTTP/2 connection ended: {e}"),
                        }
                        // Out of the pool at once, so that the pool's handle is not the
                        // last thing keeping hyper's request queue alive (see `send`).
                        if let Some(pool) = pool.upgrade() {
                            pool.retire_h2(&conn_key, &conn_fault);
                        }
                    }
                    .instrument(conn_span),
                );
                if reusable {
                    self.shared_h2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            key.clone(),
                            SharedH2 {
                                sender: s.clone(),
                                fault: fault.clone(),
                                span: span.clone(),
                                ended: ended.clone(),
                            },
                        );
                }
                (Sender::H2(s, ended), span)
            }
        };
        Ok(Checkout {
            key,
            addr,
            sender,
            fault,
            span,
            reusable,
        })
    }

    /// Takes a shared HTTP/2 connection out of the pool (it is going away or broke), if it
    /// is still the one there; requests already on it go on.
    fn retire_h2(&self, key: &Key, fault: &Arc<ConnFault>) {
        let mut shared = self.shared_h2.lock().unwrap_or_else(|p| p.into_inner());
        if shared
            .get(key)
            .is_some_and(|s| Arc::ptr_eq(&s.fault, fault))
        {
            shared.remove(key);
        }
    }

    fn checkin_h1(&self, key: Key, s: http1::SendRequest<ProxyBody>, fault: Arc<ConnFault>) {
        let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push((s, fault));
        }
    }
}

impl Checkout {
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Sends the request; an HTTP/1.1 connection returns to the pool by itself once the
    /// response body has been read.
    pub async fn send(
        self,
        pool: &Arc<UpstreamPool>,
        req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let span = self.span;
        match self.sender {
            Sender::H1(mut s) => match s.try_send_request(req).await {
                Ok(resp) => {
                    let checkin = self.reusable.then(|| Checkin {
                        pool: pool.clone(),
                        key: self.key,
                        sender: s,
                        fault: self.fault,
                    });
                    Ok(resp.map(|inner| PooledBody { inner, checkin }))
                }
                Err(mut e) => Err(match e.take_message() {
                    // Never written: the connection was closed (or closing) before it.
                    Some(request) => SendError::Unprocessed {
                        request: Some(Box::new(request)),
                        error: e.into_error(),
                    },
                    // One request per connection: its break is this request's.
                    None => SendError::Broken {
                        error: e.into_error(),
                        charge: self.fault.charge(true).await,
                    },
                }),
            },
            Sender::H2(mut s, ended) => {
                let sent = s.try_send_request(req);
                // hyper's request queue to the connection is dropped, with every request
                // still in it answered "not sent", only when its last handle goes; a
                // request that raced the connection's end into that queue (tokio's mpsc
                // can take a message while its receiver is being dropped) is answered
                // only then. Holding our handle while waiting would wait for ourselves.
                drop(s);
                let Some(result) = await_h2(&span, sent, ended).await else {
                    pool.retire_h2(&self.key, &self.fault);
                    return Err(SendError::Orphaned);
                };
                match result {
                    Ok(resp) => Ok(resp.map(|inner| PooledBody {
                        inner,
                        checkin: None,
                    })),
                    Err(mut e) => {
                        let request = e.take_message().map(Box::new);
                        let error = e.into_error();
                        let cause = h2_cause(&error);
                        let stream_only = cause.is_some_and(|c| c.is_reset());
                        tracing::debug!(parent: &span, returned = request.is_some(), ?cause, "request on upstream HTTP/2 connection failed: {error}");
                        if !stream_only {
                            // Going away or broken: no new request may pick it.
                            pool.retire_h2(&self.key, &self.fault);
                        }
                        if request.is_some() || cause.is_some_and(h2_unprocessed) {
                            Err(SendError::Unprocessed { request, error })
                        } else {
                            // RST_STREAM on this stream alone is this request's failure; any
                            // other breaks the connection, which counts once.
                            let charge = self.fault.charge(!stream_only).await;
                            Err(SendError::Broken { error, charge })
                        }
                    }
                }
            }
        }
    }
}

/// How often a request still waiting for its response headers says so in the debug log.
const H2_WAIT_REPORT: Duration = Duration::from_secs(5);

/// How long a request may still wait for its answer once its HTTP/2 connection has ended
/// (h2 fails every open stream when it drops the connection, hyper every queued request
/// when its queue goes): a safety net that should never fire.
pub const H2_ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// Awaits `sent`, the answer to a request on an HTTP/2 connection: `None` when the
/// connection ended and no answer came within [`H2_ORPHAN_GRACE`]. Says in the debug log
/// (in the connection's span) every [`H2_WAIT_REPORT`] that it is still waiting.
async fn await_h2<F: std::future::Future>(
    span: &tracing::Span,
    sent: F,
    mut ended: ConnEnded,
) -> Option<F::Output> {
    tokio::pin!(sent);
    let mut waited = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            r = &mut sent => return Some(r),
            // Only ever Err: nothing is sent on it, it closes when the connection ends.
            _ = ended.changed() => break,
            _ = tokio::time::sleep(H2_WAIT_REPORT) => {
                waited += H2_WAIT_REPORT;
                tracing::debug!(parent: span, ?waited, "request on upstream HTTP/2 connection still waiting for its response");
            }
        }
    }
    match tokio::time::timeout(H2_ORPHAN_GRACE, sent).await {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!(parent: span, "upstream HTTP/2 connection ended {H2_ORPHAN_GRACE:?} ago without answering a request; failing it (a request lost between hyper and h2)");
            None
        }
    }
}

/// The HTTP/2 error under a hyper error, if there is one.
fn h2_cause(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = s.source();
    }
    None
}

/// RFC 9113 §8.7: the server did not process a stream it reset with `REFUSED_STREAM`, nor
/// one its `GOAWAY` refused (h2 gives the GOAWAY's error to the streams above its last
/// stream id and to every stream opened after it; streams at or below it go on).
fn h2_unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// An HTTP/1.1 connection waiting to go back to the pool once its response has been read.
struct Checkin {
    pool: Arc<UpstreamPool>,
    key: Key,
    sender: http1::SendRequest<ProxyBody>,
    fault: Arc<ConnFault>,
}

impl Checkin {
    fn run(self) {
        // By the time its response body has ended the connection is almost always ready
        // again: return it now, without a task of its own per request.
        if self.sender.is_ready() {
            return self.pool.checkin_h1(self.key, self.sender, self.fault);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Checkin {
            pool,
            key,
            mut sender,
            fault,
        } = self;
        runtime.spawn(async move {
            // Resolves when the response has been read and the connection can take another
            // request; errors when it closed.
            if sender.ready().await.is_ok() {
                pool.checkin_h1(key, sender, fault);
            }
        });
    }
}

/// A response body from an instance. For a pooled HTTP/1.1 connection it hands the
/// connection back when the body ends or is dropped.
pub struct PooledBody {
    inner: hyper::body::Incoming,
    checkin: Option<Checkin>,
}

impl hyper::body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => {
                if let Some(c) = self.checkin.take() {
                    c.run();
                }
            }
            // A broken connection is never reused.
            std::task::Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.run();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_its_ended_connection_never_answered_fails_after_the_grace() {
        let (alive, ended) = tokio::sync::watch::channel(());
        drop(alive);
        let started = tokio::time::Instant::now();
        let got = await_h2(&tracing::Span::none(), std::future::pending::<()>(), ended).await;
        assert!(got.is_none(), "failed, not left waiting");
        assert!(started.elapsed() >= H2_ORPHAN_GRACE, "only after the grace");
    }

    #[tokio::test]
    async fn an_answer_coming_as_the_connection_ends_is_taken() {
        let (alive, ended) = tokio::sync::watch::channel(());
        let mut seen = ended.clone();
        // Answered only once the connection has ended (as h2 fails its streams then).
        let sent = async move {
            let _ = seen.changed().await;
            "answer"
        };
        drop(alive);
        let got = await_h2(&tracing::Span::none(), sent, ended).await;
        assert_eq!(got, Some("answer"));
    }

    type HeldFutures = Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>;

    /// Holds the futures hyper spawns for a connection until `release`, so that a test can
    /// decide when h2's connection task first runs.
    #[derive(Clone, Default)]
    struct HeldExecutor(Arc<Mutex<Option<HeldFutures>>>);

    impl HeldExecutor {
        fn new() -> Self {
            HeldExecutor(Arc::new(Mutex::new(Some(Vec::new()))))
        }

        fn release(&self) {
            for fut in self.0.lock().unwrap().take().unwrap_or_default() {
                tokio::spawn(fut);
            }
        }
    }

    impl<F> hyper::rt::Executor<F> for HeldExecutor
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        fn execute(&self, fut: F) {
            let fut = Box::pin(async move {
                fut.await;
            });
            match self.0.lock().unwrap().as_mut() {
                Some(held) => held.push(fut),
                None => drop(tokio::spawn(fut)),
            }
        }
    }

    /// linux/tcp_states.h (libc has no constant for it).
    const TCP_CLOSE: u8 = 7;

    /// The kernel's TCP state of `fd` (`TCP_CLOSE` once a reset has arrived).
    fn tcp_state(fd: std::os::fd::RawFd) -> u8 {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is a tcp_info of `len` bytes, as TCP_INFO writes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_state
    }

    /// What a hyper server does at the end of its graceful shutdown, byte for byte on a real
    /// loopback socket: its final GOAWAY refuses every stream (last stream id 0), then it
    /// closes with our frames unread, so its kernel resets the connection. All of it arrives
    /// while the runtime is busy (its reactor has not seen the data yet), and then h2's
    /// connection task runs with frames to write: its read finds nothing ready, its flush
    /// fails on the reset. The stream the GOAWAY refused must still be reported as refused
    /// (not processed), not as a broken connection (which could have processed it).
    #[test]
    fn a_goaway_followed_by_a_reset_still_refuses_its_streams() {
        use std::io::Write;
        use std::os::fd::AsRawFd;

        // The reactor looks for I/O events only when no task is ready (never "every 61
        // ticks"), so that what the test holds back stays unseen until the tasks wait.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .event_interval(u32::MAX)
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (closed, closed_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            go_rx.recv().unwrap();
            // The client's preface is in (and stays unread: the close resets).
            s.peek(&mut [0u8; 1]).unwrap();
            let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
            let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            s.write_all(&[&settings[..], &goaway[..]].concat()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            drop(s);
            closed.send(()).unwrap();
        });

        let err = runtime.block_on(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let fd = tcp.as_raw_fd();
            let exec = HeldExecutor::new();
            let io = TokioIo::new(ReadsPastReset::new(tcp));
            let (mut sender, conn) =
                http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(exec.clone(), io)
                    .await
                    .unwrap();
            let sent = sender.send_request(
                Request::post("http://instance/pay")
                    .body(Default::default())
                    .unwrap(),
            );
            // hyper's dispatcher hands the request to h2 (a stream with frames to write).
            let mut conn = Box::pin(conn);
            std::future::poll_fn(|cx| {
                let _ = conn.as_mut().poll(cx);
                std::task::Poll::Ready(())
            })
            .await;
            // Blocking the runtime's thread (no await) until the reset is in: its reactor
            // does not see the GOAWAY arrive.
            go.send(()).unwrap();
            closed_rx.recv().unwrap();
            let started = std::time::Instant::now();
            while tcp_state(fd) != TCP_CLOSE {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no reset arrived"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            tokio::spawn(conn);
            exec.release();
            tokio::time::timeout(Duration::from_secs(10), sent)
                .await
                .expect("answered")
                .expect_err("refused")
        });
        let cause = h2_cause(&err);
        assert!(
            cause.is_some_and(h2_unprocessed),
            "refused by the GOAWAY, not broken: {err:?}"
        );
        server.join().unwrap();
    }

    #[tokio::test]
    async fn an_answer_on_an_open_connection_is_taken() {
        let (_alive, ended) = tokio::sync::watch::channel(());
        let got = await_h2(&tracing::Span::none(), async { 7 }, ended).await;
        assert_eq!(got, Some(7));
    }
}
