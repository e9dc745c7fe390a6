//! The inbound listener (:15008): peer agents' CONNECT streams to this host's instances.
//!
//! Per connection:
//! 1. TLS 1.3 handshake within [`HANDSHAKE_TIMEOUT`]; the peer must present a node
//!    certificate of our trust domain (the server config demands it), then
//!    [`verify_established`] must pass (TLS 1.3, ALPN `h2`). Anything else — no
//!    certificate, another CA, a non-node ID, plain HTTP, garbage — is closed right there.
//! 2. HTTP/2 with at most [`MAX_STREAMS_PER_CONNECTION`] streams at once.
//! 3. Per stream: CONNECT only (else 405), `<service>:<port>` authority and exactly one valid
//!    `x-hms-caller` (else 400), then the [`InboundPolicy`] decides (403/429/503), then a
//!    connect to the loopback instance within [`LOCAL_CONNECT_TIMEOUT`] (else 502), then
//!    `200` and a splice both ways with half-close; a stream declared HTTP is handed to
//!    [`InboundPolicy::relay_http`] instead, and an opaque one that opens with an HTTP
//!    request is cut (it would carry requests past per-request accounting).
//!
//! On drain it stops accepting, sends GOAWAY on every connection (streams in flight run to
//! their end) and returns once every connection has closed. Dropping the `serve` future
//! closes every connection at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::stream::H2Stream;
use super::{
    CALLER_HEADER, CONNECTION_WINDOW, ERROR_HEADER, FlowOutcome, HANDSHAKE_TIMEOUT, InboundFlow,
    InboundPolicy, InboundRequest, LOCAL_CONNECT_TIMEOUT, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE,
    MAX_STREAMS_PER_CONNECTION, PROTOCOL_HEADER, Refusal, STREAM_WINDOW, StreamProtocol,
    TunnelTarget, keepalive, retry_after_secs, validate_caller,
};
use crate::drain::Drain;
use crate::identity::{IdentityError, SpiffeId, TlsIdentity, verify_established};

/// TLS handshakes in progress at once; more connections are closed at once. Bounds what
/// unauthenticated clients can make us hold (each is also bounded in time).
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Streams a peer may reset before we answer (h2's rapid-reset protection).
const MAX_PENDING_RESETS: usize = 64;
/// Data h2 buffers per stream before a write waits for the peer's window (hyper's server
/// default).
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// Counters since start, for metrics and `hms-ctl status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InboundCounters {
    /// TCP connections accepted.
    pub connections_accepted: u64,
    /// Connections closed before or right after the TLS handshake (no or bad certificate,
    /// not TLS, timeout, too many handshakes at once).
    pub handshakes_refused: u64,
    /// Authenticated connections open now.
    pub connections_open: u64,
    /// Streams spliced to an instance.
    pub streams_spliced: u64,
    /// Streams answered with a refusal (any 4xx/5xx).
    pub streams_refused: u64,
    /// Streams open now.
    pub streams_open: u64,
}

#[derive(Default)]
struct Stats {
    connections_accepted: AtomicU64,
    handshakes_refused: AtomicU64,
    connections_open: AtomicU64,
    streams_spliced: AtomicU64,
    streams_refused: AtomicU64,
    streams_open: AtomicU64,
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The :15008 listener. Build once at agent start; `serve` it on the bound listener.
pub struct InboundServer<P> {
    acceptor: TlsAcceptor,
    policy: Arc<P>,
    stats: Stats,
    handshakes: Arc<Semaphore>,
    handshake_timeout: Duration,
    /// Established connections this server may hold (`limits`); none in unit tests.
    conns: Option<Arc<crate::limits::ConnCap>>,
}

impl<P: InboundPolicy> InboundServer<P> {
    /// `tls` is this node's identity; the server follows its renewals and bundle changes.
    pub fn new(tls: &TlsIdentity, policy: Arc<P>) -> Result<Arc<Self>, IdentityError> {
        Self::with_handshake_timeout(tls, policy, HANDSHAKE_TIMEOUT)
    }

    pub(super) fn with_handshake_timeout(
        tls: &TlsIdentity,
        policy: Arc<P>,
        handshake_timeout: Duration,
    ) -> Result<Arc<Self>, IdentityError> {
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(tls.server_config()?),
            policy,
            stats: Stats::default(),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            handshake_timeout,
            conns: None,
        }))
    }

    /// Like [`InboundServer::new`], within the agent's limits: at most `handshakes` TLS
    /// handshakes pending and `conns` established connections (a full cap refuses new
    /// ones: established peers are mesh nodes, never shed).
    pub fn new_limited(
        tls: &TlsIdentity,
        policy: Arc<P>,
        handshakes: usize,
        conns: Arc<crate::limits::ConnCap>,
    ) -> Result<Arc<Self>, IdentityError> {
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(tls.server_config()?),
            policy,
            stats: Stats::default(),
            handshakes: Arc::new(Semaphore::new(handshakes.min(MAX_PENDING_HANDSHAKES))),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            conns: Some(conns),
        }))
    }

    pub fn counters(&self) -> InboundCounters {
        let s = &self.stats;
        InboundCounters {
            connections_accepted: s.connections_accepted.load(Ordering::Relaxed),
            handshakes_refused: s.handshakes_refused.load(Ordering::Relaxed),
            connections_open: s.connections_open.load(Ordering::Relaxed),
            streams_spliced: s.streams_spliced.load(Ordering::Relaxed),
            streams_refused: s.streams_refused.load(Ordering::Relaxed),
            streams_open: s.streams_open.load(Ordering::Relaxed),
        }
    }

    /// Accepts until `drain` fires, then lets every connection finish its streams (each
    /// holds a drain guard, so the agent's drain deadline bounds the wait) and returns.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) -> anyhow::Result<()> {
        let mut connections = JoinSet::new();
        loop {
            let (tcp, from) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("inbound accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                _ = drain.signaled() => break,
            };
            self.stats
                .connections_accepted
                .fetch_add(1, Ordering::Relaxed);
            let slot = match &self.conns {
                None => None,
                Some(cap) => match cap.admit() {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::warn!(%from, "inbound: connection cap reached; closing");
                        continue;
                    }
                },
            };
            if let Some(slot) = &slot {
                slot.set_idle(false);
            }
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                self.stats
                    .handshakes_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%from, "inbound: too many TLS handshakes in progress; closing");
                continue;
            };
            let this = self.clone();
            let drain = drain.clone();
            let guard = drain.guard();
            connections.spawn(async move {
                let _guard = guard;
                let _slot = slot;
                this.serve_connection(tcp, from, permit, drain).await;
            });
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        from: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
        drain: Drain,
    ) {
        let _ = tcp.set_nodelay(true);
        let tls =
            match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return self.refuse_handshake(from, &e.to_string()),
                Err(_) => return self.refuse_handshake(from, "TLS handshake timed out"),
            };
        drop(permit);
        let peer_node = match verify_established(tls.get_ref().1) {
            Ok(id) => id,
            Err(e) => return self.refuse_handshake(from, &e.to_string()),
        };
        if !self.policy.peer_allowed(&peer_node) {
            return self
                .refuse_handshake(from, &format!("{peer_node} is not a member of the mesh"));
        }
        let _open = Gauge::up(&self.stats.connections_open);
        tracing::debug!(%from, peer = %peer_node, "inbound: peer connected");
        let this = self.clone();
        let watched = peer_node.clone();
        // A host removed from the mesh loses its open tunnels (spliced streams included).
        let revoked = async move {
            loop {
                tokio::time::sleep(super::MEMBERSHIP_CHECK).await;
                if !this.policy.peer_allowed(&watched) {
                    return watched;
                }
            }
        };

        // h2 directly (not hyper's server): a stream's bytes are an `H2Stream`, so hyper's
        // request/upgrade layer only added a copy, a channel and a task per write. Settings
        // as hyper's server used them, with our limits.
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(%from, peer = %peer_node, "inbound: HTTP/2 handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%from, peer = %peer_node, "inbound: no HTTP/2 preface in time");
                return;
            }
        };
        let pings = keepalive(conn.ping_pong());
        tokio::pin!(pings, revoked);
        let peer = Arc::new((peer_node, from));
        let mut draining = false;
        // Accepting also drives the connection: it runs until every stream has ended after
        // a GOAWAY (ours on drain, or the peer's), or the connection fails.
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((req, respond))) => {
                        let this = self.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move { this.handle(req, respond, &peer.0, peer.1).await });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%from, "inbound: connection ended: {e}");
                        break;
                    }
                    None => break,
                },
                _ = drain.signaled(), if !draining => {
                    // GOAWAY: no new streams; the ones in flight run to their end.
                    draining = true;
                    conn.graceful_shutdown();
                }
                why = &mut pings => {
                    tracing::debug!(%from, "inbound: connection ended: {why}");
                    break;
                }
                peer = &mut revoked => {
                    tracing::warn!(%from, %peer, "inbound: closing the connection of a host that is no longer a member");
                    break;
                }
            }
        }
    }

    fn refuse_handshake(&self, from: SocketAddr, why: &str) {
        self.stats
            .handshakes_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%from, "inbound: closing connection: {why}");
    }

    /// One stream, in its own task: check, authorize, dial, answer, and splice.
    async fn handle(
        self: Arc<Self>,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer_node: &SpiffeId,
        peer_addr: SocketAddr,
    ) {
        if let Err(answer) = self
            .accept_stream(req, &mut respond, peer_node, peer_addr)
            .await
        {
            self.send_refusal(respond, answer);
        }
    }

    /// Answers `200` and relays the stream until it ends, or returns the refusal to send.
    async fn accept_stream(
        self: &Arc<Self>,
        req: Request<RecvStream>,
        respond: &mut SendResponse<Bytes>,
        peer_node: &SpiffeId,
        peer_addr: SocketAddr,
    ) -> Result<(), (Refusal, String)> {
        if req.method() != Method::CONNECT {
            return Err((
                Refusal::METHOD_NOT_ALLOWED,
                "hms: the mesh port only accepts CONNECT".to_owned(),
            ));
        }
        let request = match parse_request(&req, peer_node, peer_addr) {
            Ok(r) => r,
            Err(why) => {
                tracing::warn!(%peer_addr, peer = %peer_node, "inbound: bad CONNECT: {why}");
                return Err((Refusal::BAD_REQUEST, format!("hms: {why}")));
            }
        };
        let started = Instant::now();
        let refused = |this: &Self, refusal: Refusal, message: String| {
            this.policy.on_flow(&InboundFlow {
                request: request.clone(),
                outcome: FlowOutcome::Refused(refusal),
                duration: started.elapsed(),
            });
            Err((refusal, message))
        };
        let instance = match self.policy.authorize(&request).await {
            Ok(addr) => addr,
            Err(refusal) => {
                tracing::debug!(caller = %request.caller, target = %request.target, peer = %peer_node, "inbound: refused: {refusal}");
                let message = format!("hms: {} refused: {}", request.target, refusal.reason);
                return refused(self, refusal, message);
            }
        };
        if !instance.ip().is_loopback() {
            tracing::error!(target = %request.target, %instance, "inbound: the policy chose a non-loopback instance; refusing to relay");
            let message = format!("hms: {} has no local instance address", request.target);
            return refused(self, Refusal::CONNECT_FAILED, message);
        }
        let upstream =
            match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, crate::own_socket::connect(instance))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let message = format!("hms: connecting to {} failed: {e}", request.target);
                    return refused(self, Refusal::CONNECT_FAILED, message);
                }
                Err(_) => {
                    let message = format!(
                        "hms: {} did not accept within {LOCAL_CONNECT_TIMEOUT:?}",
                        request.target
                    );
                    return refused(self, Refusal::CONNECT_FAILED, message);
                }
            };
        let _ = upstream.set_nodelay(true);
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                // The peer reset the stream while we dialled: nothing to relay.
                tracing::debug!(peer = %request.peer_node, target = %request.target, "inbound: stream gone before the answer: {e}");
                return Ok(());
            }
        };
        self.stats.streams_spliced.fetch_add(1, Ordering::Relaxed);
        let _open = Gauge::up(&self.stats.streams_open);
        let downstream = H2Stream::new(send, req.into_body());
        let (to_instance, from_instance, error) = if request.protocol != StreamProtocol::Opaque {
            self.policy.relay_http(&request, downstream, upstream).await
        } else {
            let (sent, received, error) = splice_opaque(downstream, upstream).await;
            if let Some(e) = &error
                && e.kind() == std::io::ErrorKind::InvalidData
            {
                tracing::warn!(peer = %request.peer_node, caller = %request.caller, target = %request.target, "inbound: cut a stream declared opaque: {e}");
            }
            (sent, received, error.map(|e| e.to_string()))
        };
        self.policy.on_flow(&InboundFlow {
            request,
            outcome: FlowOutcome::Spliced {
                instance,
                to_instance,
                from_instance,
                error,
            },
            duration: started.elapsed(),
        });
        Ok(())
    }

    /// Answers a refusal: status, `x-hms-error` (+ `retry-after`) and a one-line message.
    fn send_refusal(
        &self,
        mut respond: SendResponse<Bytes>,
        (refusal, message): (Refusal, String),
    ) {
        self.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
        let mut resp = Response::new(());
        *resp.status_mut() =
            StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(refusal.reason));
        if let Some(after) = refusal.retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
        }
        let mut body = message;
        body.push('\n');
        // The peer may have reset the stream meanwhile; then nobody reads the answer.
        if let Ok(mut send) = respond.send_response(resp, false) {
            let _ = send.send_data(Bytes::from(body), true);
        }
    }
}

fn parse_request(
    req: &Request<RecvStream>,
    peer_node: &SpiffeId,
    peer_addr: SocketAddr,
) -> Result<InboundRequest, String> {
    let authority = req
        .uri()
        .authority()
        .ok_or("the CONNECT has no authority; expected <service>:<port>")?;
    let target = TunnelTarget::parse_authority(authority.as_str())?;
    let mut callers = req.headers().get_all(CALLER_HEADER).iter();
    let caller = match (callers.next(), callers.next()) {
        (Some(v), None) => v
            .to_str()
            .map_err(|_| format!("{CALLER_HEADER} is not text"))?,
        (None, _) => return Err(format!("{CALLER_HEADER} is missing")),
        (Some(_), Some(_)) => return Err(format!("{CALLER_HEADER} is given more than once")),
    };
    validate_caller(caller)?;
    let mut protocols = req.headers().get_all(PROTOCOL_HEADER).iter();
    let protocol = match (protocols.next(), protocols.next()) {
        (None, _) => None,
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|_| format!("{PROTOCOL_HEADER} is not text"))?,
        ),
        (Some(_), Some(_)) => return Err(format!("{PROTOCOL_HEADER} is given more than once")),
    };
    Ok(InboundRequest {
        peer_node: peer_node.clone(),
        peer_addr,
        caller: caller.to_owned(),
        target,
        protocol: StreamProtocol::parse(protocol)?,
    })
}

/// Copies both ways until both directions have finished, shutting down each write side
/// when its source ends (half-close), or until the first error. Returns the bytes moved
/// `a -> b` and `b -> a` even when it ends with an error.
pub(super) async fn splice_counted<A, B>(a: A, b: B) -> (u64, u64, Option<std::io::Error>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    splice_inner(a, b, false).await
}

/// [`splice_counted`] for a stream declared opaque: if the caller's first bytes are an
/// HTTP/1 request line or the HTTP/2 preface, nothing is relayed and the stream ends with
/// an `InvalidData` error (HTTP must be declared, so the destination sees every request).
async fn splice_opaque<A, B>(a: A, b: B) -> (u64, u64, Option<std::io::Error>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    splice_inner(a, b, true).await
}

async fn splice_inner<A, B>(a: A, b: B, refuse_http: bool) -> (u64, u64, Option<std::io::Error>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let result = tokio::try_join!(
        async {
            if refuse_http && refuse_undeclared_http(&mut ar, &mut bw, &mut a_to_b).await? {
                use tokio::io::AsyncWriteExt;
                return bw.shutdown().await;
            }
            copy_then_shutdown(&mut ar, &mut bw, &mut a_to_b).await
        },
        copy_then_shutdown(&mut br, &mut aw, &mut b_to_a),
    );
    (a_to_b, b_to_a, result.err())
}

/// Reads the caller's first bytes until they tell whether they are HTTP (at most the
/// length of the HTTP/2 preface), then passes them on if they are not. True when the
/// caller's side already ended.
async fn refuse_undeclared_http<R, W>(
    r: &mut R,
    w: &mut W,
    moved: &mut u64,
) -> std::io::Result<bool>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use crate::proxy::detect::{H2_PREFACE, Protocol, classify};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // HTTP/1 servers skip empty lines before a request line (RFC 9112 2.2): look past
    // them, or `\r\nGET ...` would pass as opaque.
    const MAX_LEADING_BLANKS: usize = 64;
    let limit = H2_PREFACE.len() + MAX_LEADING_BLANKS;
    let mut head = Vec::with_capacity(limit);
    let mut buf = [0u8; 64];
    let mut ended = false;
    let verdict = loop {
        let want = (limit - head.len()).min(buf.len());
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            ended = true;
            break Protocol::Opaque;
        }
        head.extend_from_slice(&buf[..n]);
        let blanks = head
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
            .count();
        match classify(&head[blanks..]) {
            Some(p) => break p,
            None if blanks > MAX_LEADING_BLANKS || head.len() >= limit => {
                break Protocol::Opaque;
            }
            None => {}
        }
    };
    if verdict != Protocol::Opaque {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it opens with {verdict:?} but was not declared HTTP ({PROTOCOL_HEADER})"),
        ));
    }
    w.write_all(&head).await?;
    *moved += head.len() as u64;
    Ok(ended)
}

async fn copy_then_shutdown<R, W>(r: &mut R, w: &mut W, moved: &mut u64) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other side learns this direction is finished.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        *moved += n as u64;
    }
}
