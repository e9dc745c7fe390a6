//! The caller's side: a pool of mTLS HTTP/2 connections to peer agents and the CONNECT
//! streams opened over them.
//!
//! How a stream is opened ([`PeerPool::open`]):
//! 1. Find the peer by (address, expected node ID); a dialer's TLS config accepts only
//!    that node, so a wrong or impersonating peer fails the handshake.
//! 2. Take a live connection to it with a free stream slot (fewer than
//!    [`MAX_STREAMS_PER_CONNECTION`] streams open); if there is none, dial one — one dial
//!    per peer at a time, concurrent openers wait for it and share it.
//! 3. Send `CONNECT <service>:<port>` with `x-hms-caller`. `200` gives a [`TunnelStream`];
//!    any other status is a [`TunnelError::Refused`] carrying the peer's reason.
//! 4. If the connection fails before an answer (the peer restarted, sent GOAWAY, reset),
//!    it is retired from the pool (streams already on it go on) and the open is retried
//!    once on a fresh connection. Nothing of the caller's payload has been sent before an
//!    answer, so that retry — and any retry elsewhere after an error — is always safe.
//!
//! Connections close themselves when the peer goes away (keep-alive pings detect a silent
//! one) and after [`IDLE_TIMEOUT`] without streams.
//!
//! Each connection's end is kept in a [`TunnelLink`] its streams share, so the HTTP layer
//! can charge a failure on a stream rightly: a connection that broke counts once (against
//! the first instance whose request saw it), one the peer drained (GOAWAY, then a clean
//! close) against nothing, and a failure on a connection still up is the instance's own.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::H2Stream;
use super::{
    CALLER_HEADER, CONNECTION_WINDOW, ERROR_HEADER, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE, MAX_STREAMS_PER_CONNECTION, PROTOCOL_HEADER, STREAM_WINDOW,
    StreamProtocol, TunnelTarget, keepalive, validate_caller,
};
use crate::identity::{IdentityError, SpiffeId, TlsIdentity, verify_established};

/// A connection without streams for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the peer has to answer a CONNECT (it dials its instance within 2 s, or waits
/// for a queued rate-limit slot for up to 5 s).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The peer's `x-hms-error` is logged and passed on; this bounds what we keep of it.
const MAX_REASON_LEN: usize = 64;
/// Streams we may open before the peer's SETTINGS say how many it takes (hyper's default).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Data h2 buffers per stream before a write waits for the peer's window (hyper's client
/// default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Why a tunnel stream could not be opened. Every variant means no payload byte was sent,
/// so the request may be retried (on this or another instance) without harm.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The caller asked for something the wire cannot carry (a bug in the caller).
    #[error("invalid tunnel request: {0}")]
    InvalidRequest(String),
    /// The peer's node ID is not usable (not a node identity) or our TLS config failed.
    #[error("TLS configuration for the peer: {0}")]
    Identity(#[from] IdentityError),
    #[error("connecting to peer agent {peer} failed: {source}")]
    Connect { peer: SocketAddr, source: io::Error },
    /// TLS or HTTP/2 handshake failed: wrong peer identity, untrusted certificate, no `h2`,
    /// or the peer is not an HMS agent.
    #[error("handshake with peer agent {peer} failed: {reason}")]
    Handshake { peer: SocketAddr, reason: String },
    #[error("peer agent {peer} did not {what} within {after:?}")]
    Timeout {
        peer: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    /// The connection or stream failed before the peer answered.
    #[error("tunnel to peer agent {peer} failed: {source}")]
    Stream { peer: SocketAddr, source: h2::Error },
    /// The peer answered the CONNECT with a refusal (`x-hms-error` in `reason`; empty if
    /// the peer gave none).
    #[error("peer agent {peer} refused the stream: {status} {reason}")]
    Refused {
        peer: SocketAddr,
        status: u16,
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// One peer agent as `hms-ctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub node: SpiffeId,
    /// At least one live connection.
    pub connected: bool,
    /// Live connections now (more than one only beyond [`MAX_STREAMS_PER_CONNECTION`]).
    pub connections: usize,
    /// Streams open now.
    pub active_streams: usize,
    /// Connections made since start (handshakes that succeeded).
    pub connections_opened: u64,
    /// Streams opened since start (answered `200`).
    pub streams_opened: u64,
    pub last_used: Option<SystemTime>,
    /// When the peer's certificate on the newest live connection expires.
    pub cert_not_after: Option<SystemTime>,
    /// The last dial or stream error, if the last attempt failed.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PeerKey {
    addr: SocketAddr,
    node: SpiffeId,
}

/// How a tunnel connection stands, for charging failures of the streams it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFate {
    /// Still up: a stream's failure is the stream's (its instance's) own.
    Open,
    /// The peer went away cleanly (GOAWAY, its drain) or the pool closed it idle.
    Drained,
    /// The connection failed: every stream on it failed with it.
    Broken,
}

/// One tunnel connection's end, shared by its streams.
#[derive(Debug)]
pub struct TunnelLink {
    fate: tokio::sync::watch::Sender<LinkFate>,
    charged: AtomicBool,
}

impl TunnelLink {
    fn new() -> Arc<TunnelLink> {
        Arc::new(TunnelLink {
            fate: tokio::sync::watch::channel(LinkFate::Open).0,
            charged: AtomicBool::new(false),
        })
    }

    fn end(&self, fate: LinkFate) {
        self.fate.send_if_modified(|f| {
            let first = *f == LinkFate::Open;
            if first {
                *f = fate;
            }
            first
        });
    }

    /// The connection's fate, waiting up to `wait` for it to end: a stream's error and its
    /// connection's end are reported by different tasks, in either order.
    pub async fn settle(&self, wait: Duration) -> LinkFate {
        let mut rx = self.fate.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|f| *f != LinkFate::Open)).await;
        *rx.borrow()
    }

    /// True for the first caller only: a broken connection counts once.
    pub fn charge(&self) -> bool {
        !self.charged.swap(true, Ordering::AcqRel)
    }
}

/// One HTTP/2 connection to a peer.
struct Connection {
    sender: h2::client::SendRequest<Bytes>,
    link: Arc<TunnelLink>,
    /// Streams open or being opened (slots are reserved before sending).
    active: AtomicUsize,
    /// Set when the connection task ends or the pool retires it; never reused after.
    closed: AtomicBool,
    cert_not_after: Option<SystemTime>,
    born: Instant,
    /// Milliseconds after `born` when a slot was last taken or released.
    last_active_ms: AtomicU64,
}

impl Connection {
    fn usable(&self) -> bool {
        // The connection task sets `closed` when h2's connection ends.
        !self.closed.load(Ordering::Acquire)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    fn take_slot(self: &Arc<Self>) -> Slot {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.touch();
        Slot { conn: self.clone() }
    }
}

struct Peer {
    key: PeerKey,
    config: Arc<ClientConfig>,
    /// Serialises dials to this peer so concurrent openers share one new connection.
    dial: tokio::sync::Mutex<()>,
    connections: Mutex<Vec<Arc<Connection>>>,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
    last_used: Mutex<Option<SystemTime>>,
    last_error: Mutex<Option<String>>,
}

/// A reserved stream slot on a connection; released when dropped.
struct Slot {
    conn: Arc<Connection>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
        self.conn.touch();
    }
}

impl Peer {
    /// A live connection with a free slot, the slot reserved.
    fn reserve(&self) -> Option<Slot> {
        let mut conns = lock(&self.connections);
        conns.retain(|c| c.usable());
        let conn = conns
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < MAX_STREAMS_PER_CONNECTION as usize)?;
        Some(conn.take_slot())
    }

    fn retire(&self, conn: &Arc<Connection>) {
        conn.closed.store(true, Ordering::Release);
        lock(&self.connections).retain(|c| !Arc::ptr_eq(c, conn));
    }

    fn record_error(&self, e: &TunnelError) {
        *lock(&self.last_error) = Some(e.to_string());
    }

    async fn checkout(self: &Arc<Self>) -> Result<Slot, TunnelError> {
        if let Some(slot) = self.reserve() {
            return Ok(slot);
        }
        let _dialing = self.dial.lock().await;
        if let Some(slot) = self.reserve() {
            return Ok(slot);
        }
        let conn = self.dial().await?;
        let slot = conn.take_slot();
        lock(&self.connections).push(conn);
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(slot)
    }

    async fn dial(self: &Arc<Self>) -> Result<Arc<Connection>, TunnelError> {
        let peer = self.key.addr;
        let timed_out = |what| TunnelError::Timeout {
            peer,
            what,
            after: HANDSHAKE_TIMEOUT,
        };
        let handshake = async {
            let tcp = TcpStream::connect(peer)
                .await
                .map_err(|source| TunnelError::Connect { peer, source })?;
            let _ = tcp.set_nodelay(true);
            // The verifier checks the peer's SPIFFE ID; the name is not used.
            let name = ServerName::try_from("hms-peer.invalid").expect("a valid DNS name");
            let tls = TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| TunnelError::Handshake {
                    peer,
                    reason: e.to_string(),
                })?;
            verify_established(tls.get_ref().1).map_err(|e| TunnelError::Handshake {
                peer,
                reason: e.to_string(),
            })?;
            let cert_not_after = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| not_after(leaf));
            // h2 directly (not hyper's client): our streams are byte streams (`H2Stream`),
            // so hyper's request/upgrade layer only added a copy and a task per write.
            // Settings as hyper's client used them, with our windows and frame size.
            let (sender, conn) = h2::client::Builder::new()
                .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .max_header_list_size(MAX_HEADER_LIST_SIZE)
                .max_send_buffer_size(MAX_SEND_BUFFER)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| TunnelError::Handshake {
                    peer,
                    reason: format!("HTTP/2: {e}"),
                })?;
            Ok((sender, conn, cert_not_after))
        };
        let (sender, conn, cert_not_after) =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(timed_out("complete the handshake")),
            };
        let connection = Arc::new(Connection {
            sender,
            link: TunnelLink::new(),
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            cert_not_after,
            born: Instant::now(),
            last_active_ms: AtomicU64::new(0),
        });
        let watched = connection.clone();
        let node = self.key.node.clone();
        tokio::spawn(async move {
            let mut conn = conn;
            // Pings every KEEPALIVE_INTERVAL, idle or not, detect a silent peer.
            let pings = keepalive(conn.ping_pong());
            tokio::pin!(pings);
            loop {
                tokio::select! {
                    biased;
                    r = &mut conn => {
                        match r {
                            // h2 ends a connection Ok after the peer's GOAWAY (NO_ERROR).
                            Ok(()) => watched.link.end(LinkFate::Drained),
                            Err(e) => {
                                tracing::debug!(%peer, %node, "tunnel connection ended: {e}");
                                watched.link.end(LinkFate::Broken);
                            }
                        }
                        break;
                    }
                    why = &mut pings => {
                        tracing::debug!(%peer, %node, "tunnel connection ended: {why}");
                        watched.link.end(LinkFate::Broken);
                        break;
                    }
                    _ = tokio::time::sleep(IDLE_TIMEOUT / 4) => {
                        // A slot reserved in the instant this retires the connection fails
                        // its stream, and the pool retries that on a new connection.
                        if watched.active.load(Ordering::Acquire) == 0
                            && watched.idle_for() >= IDLE_TIMEOUT
                        {
                            watched.closed.store(true, Ordering::Release);
                            tracing::debug!(%peer, %node, "closing idle tunnel connection");
                            break;
                        }
                    }
                }
            }
            watched.closed.store(true, Ordering::Release);
            // Closed idle by the pool (its streams' fate is set above otherwise).
            watched.link.end(LinkFate::Drained);
        });
        tracing::debug!(%peer, node = %self.key.node, "tunnel connection established");
        Ok(connection)
    }

    async fn open_on(
        &self,
        slot: &Slot,
        target: &TunnelTarget,
        caller: &str,
        protocol: StreamProtocol,
    ) -> Result<H2Stream, TunnelError> {
        let peer = self.key.addr;
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.authority())
            .header(CALLER_HEADER, caller);
        if let Some(p) = protocol.header_value() {
            request = request.header(PROTOCOL_HEADER, p);
        }
        let request = request
            .body(())
            .map_err(|e| TunnelError::InvalidRequest(e.to_string()))?;
        let sender = slot.conn.sender.clone();
        let exchange = async {
            let mut sender = sender
                .ready()
                .await
                .map_err(|source| TunnelError::Stream { peer, source })?;
            let (response, send) = sender
                .send_request(request, false)
                .map_err(|source| TunnelError::Stream { peer, source })?;
            let response = response
                .await
                .map_err(|source| TunnelError::Stream { peer, source })?;
            Ok::<_, TunnelError>((response, send))
        };
        let (response, send) = match tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(TunnelError::Timeout {
                    peer,
                    what: "answer the CONNECT",
                    after: RESPONSE_TIMEOUT,
                });
            }
        };
        if response.status() != StatusCode::OK {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
            };
            let reason = header(ERROR_HEADER)
                .unwrap_or("")
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(MAX_REASON_LEN)
                .collect();
            let retry_after = header(RETRY_AFTER.as_str())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(TunnelError::Refused {
                peer,
                status: response.status().as_u16(),
                reason,
                retry_after,
            });
        }
        Ok(H2Stream::new(send, response.into_body()))
    }
}

/// The caller's pool of connections to peer agents. Build one at agent start and share it
/// (`Arc`); cheap to call from every request.
pub struct PeerPool {
    tls: TlsIdentity,
    peers: Mutex<HashMap<PeerKey, Arc<Peer>>>,
}

impl PeerPool {
    /// `tls` is this node's identity; dials follow its renewals and bundle changes.
    pub fn new(tls: TlsIdentity) -> Self {
        Self {
            tls,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn peer(&self, addr: SocketAddr, node: &SpiffeId) -> Result<Arc<Peer>, TunnelError> {
        let key = PeerKey {
            addr,
            node: node.clone(),
        };
        let mut peers = lock(&self.peers);
        if let Some(p) = peers.get(&key) {
            return Ok(p.clone());
        }
        let peer = Arc::new(Peer {
            config: self.tls.client_config(node)?,
            key: key.clone(),
            dial: tokio::sync::Mutex::new(()),
            connections: Mutex::new(Vec::new()),
            connections_opened: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
            last_used: Mutex::new(None),
            last_error: Mutex::new(None),
        });
        peers.insert(key, peer.clone());
        Ok(peer)
    }

    /// Opens a stream to `target` on the peer agent at `peer` (its inbound address, usually
    /// `<host>:15008`), which must prove it is `peer_node`. `caller` is the calling service
    /// or `host`.
    pub async fn open(
        &self,
        peer: SocketAddr,
        peer_node: &SpiffeId,
        target: &TunnelTarget,
        caller: &str,
    ) -> Result<TunnelStream, TunnelError> {
        self.open_as(peer, peer_node, target, caller, StreamProtocol::Opaque)
            .await
    }

    /// [`PeerPool::open`] for a stream that will carry `protocol` (declared to the peer,
    /// which serves HTTP streams as HTTP and cuts an opaque one that opens with HTTP).
    pub async fn open_as(
        &self,
        peer: SocketAddr,
        peer_node: &SpiffeId,
        target: &TunnelTarget,
        caller: &str,
        protocol: StreamProtocol,
    ) -> Result<TunnelStream, TunnelError> {
        target.validate().map_err(TunnelError::InvalidRequest)?;
        validate_caller(caller).map_err(TunnelError::InvalidRequest)?;
        let p = self.peer(peer, peer_node)?;
        *lock(&p.last_used) = Some(SystemTime::now());
        let result = self.open_with_retry(&p, target, caller, protocol).await;
        match &result {
            Ok(_) => {
                p.streams_opened.fetch_add(1, Ordering::Relaxed);
                *lock(&p.last_error) = None;
            }
            // The peer answered: the transport is fine.
            Err(TunnelError::Refused { .. }) => *lock(&p.last_error) = None,
            Err(e) => p.record_error(e),
        }
        result
    }

    async fn open_with_retry(
        &self,
        p: &Arc<Peer>,
        target: &TunnelTarget,
        caller: &str,
        protocol: StreamProtocol,
    ) -> Result<TunnelStream, TunnelError> {
        let mut retried = false;
        loop {
            let slot = p.checkout().await?;
            match p.open_on(&slot, target, caller, protocol).await {
                Ok(io) => {
                    return Ok(TunnelStream {
                        io,
                        peer: p.key.addr,
                        _slot: slot,
                    });
                }
                Err(e @ (TunnelError::Stream { .. } | TunnelError::Timeout { .. })) => {
                    // A connection that failed a stream is not trusted with another.
                    p.retire(&slot.conn);
                    if retried {
                        return Err(e);
                    }
                    tracing::debug!(peer = %p.key.addr, "tunnel stream failed ({e}); retrying on a new connection");
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Every peer this pool has dialled, for `hms-ctl status` and metrics.
    pub fn peer_status(&self) -> Vec<PeerInfo> {
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        let mut out: Vec<PeerInfo> = peers
            .iter()
            .map(|p| {
                let conns: Vec<Arc<Connection>> = lock(&p.connections)
                    .iter()
                    .filter(|c| c.usable())
                    .cloned()
                    .collect();
                PeerInfo {
                    addr: p.key.addr,
                    node: p.key.node.clone(),
                    connected: !conns.is_empty(),
                    connections: conns.len(),
                    active_streams: conns.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                    connections_opened: p.connections_opened.load(Ordering::Relaxed),
                    streams_opened: p.streams_opened.load(Ordering::Relaxed),
                    last_used: *lock(&p.last_used),
                    cert_not_after: conns.last().and_then(|c| c.cert_not_after),
                    last_error: lock(&p.last_error).clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| (a.addr, &a.node).cmp(&(b.addr, &b.node)));
        out
    }

    /// Forgets every peer `keep` rejects (it left the mesh, or moved to another address):
    /// its connections close once their streams end and `status` no longer lists it.
    /// Returns how many were forgotten.
    pub fn retain_peers(&self, keep: impl Fn(SocketAddr, &SpiffeId) -> bool) -> usize {
        let gone: Vec<PeerKey> = lock(&self.peers)
            .keys()
            .filter(|k| !keep(k.addr, &k.node))
            .cloned()
            .collect();
        for k in &gone {
            self.remove_peer(k.addr, &k.node);
        }
        gone.len()
    }

    /// Forgets a peer (it left the mesh): its connections close once their streams end.
    pub fn remove_peer(&self, peer: SocketAddr, peer_node: &SpiffeId) {
        let key = PeerKey {
            addr: peer,
            node: peer_node.clone(),
        };
        if let Some(p) = lock(&self.peers).remove(&key) {
            for c in lock(&p.connections).drain(..) {
                c.closed.store(true, Ordering::Release);
            }
        }
    }
}

/// An open CONNECT stream: bytes written reach the instance, bytes read come from it.
/// `shutdown()` half-closes (the instance reads EOF; its reply still flows). Dropping it
/// closes both directions.
pub struct TunnelStream {
    io: H2Stream,
    peer: SocketAddr,
    _slot: Slot,
}

impl TunnelStream {
    /// The peer agent this stream goes through.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection this stream rides on, as failures on it are charged.
    pub fn link(&self) -> Arc<TunnelLink> {
        self._slot.conn.link.clone()
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The end of a certificate's validity, if it parses.
fn not_after(der: &rustls_pki_types::CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
