//! The cross-host transport: HTTP/2 CONNECT streams over mutual TLS between agents (the
//! HBONE idea of istio/ztunnel, our own wire details).
//!
//! Owns: the inbound listener (:15008) that authenticates peer agents, asks the agent's
//! policy, dials a local instance and splices; and the outbound [`PeerPool`] that keeps one
//! multiplexed connection per peer agent and opens one CONNECT stream per request or raw
//! TCP connection. It never decides who may call what (the [`InboundPolicy`] the agent
//! passes in does), never dials anything but a loopback address on the inbound side (the
//! listener is not a relay), and never trusts a caller header from an unauthenticated peer.
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | the wire contract: [`TunnelTarget`], headers, [`Refusal`], [`InboundPolicy`] |
//! | `inbound.rs` | [`InboundServer`]: TLS accept, peer check, CONNECT handling, splice |
//! | `outbound.rs` | [`PeerPool`], [`TunnelStream`], [`TunnelError`], [`PeerInfo`] |
//! | `stream.rs` | [`H2Stream`]: one CONNECT stream's bytes over h2's send/receive halves |
//!
//! ## Wire contract
//!
//! One TLS 1.3 connection (ALPN `h2`, both sides present node certificates
//! `spiffe://<domain>/node/<name>`) carries many HTTP/2 streams. Each stream is
//!
//! ```text
//! :method CONNECT
//! :authority <service>:<port>        the service's name and its instance port (spec `port`)
//! x-hms-caller <service>|host        who is calling, as the caller's agent identified it
//! x-hms-protocol http/1.1|h2          optional: the stream carries HTTP (absent: opaque)
//! ```
//!
//! The authority names the **service**, not an instance address: the peer owns the mapping
//! to its local instance (always on loopback), so a caller can only reach what the peer's
//! registry says is served there, and the policy decision is made on names. The caller
//! header is believed only because the TLS client certificate proved which agent sent it;
//! the peer node ID is handed to the policy next to it. The policy believes a service
//! caller only if the operator placed that service on the peer's node (see
//! `proxy::inbound`), and relays only to this host's own instances of the target.
//!
//! A stream declared HTTP (`x-hms-protocol`) is served as HTTP by the destination (the
//! policy sees every request in it: rate limits count requests, not streams); a stream
//! declared opaque whose first bytes are an HTTP request or the HTTP/2 preface is cut,
//! so a pooled stream cannot smuggle requests past per-request accounting.
//!
//! The answer is `200` and then raw bytes both ways (half-close preserved: the end of one
//! direction is an HTTP/2 END_STREAM), or a refusal with `x-hms-error: <reason>` using the
//! same reasons as the proxy's own mesh errors, so the caller's agent can answer a remote
//! refusal exactly like a local one:
//!
//! | status | `x-hms-error` | when |
//! | --- | --- | --- |
//! | 400 | `bad-request` | not a valid authority or caller header |
//! | 403 | `denied` | the policy refuses this caller |
//! | 403 | `caller-not-placed` | the caller service is not placed on the peer's node |
//! | 405 | `method-not-allowed` | anything but CONNECT |
//! | 429 | `rate-limited` (+ `retry-after`) | the service's rate limit |
//! | 503 | `no-endpoint` | no instance of the service on this host |
//! | 502 | `connect-failed` | the local instance did not accept the connection |

mod inbound;
mod outbound;
mod stream;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub use inbound::{InboundCounters, InboundServer};
pub use outbound::{LinkFate, PeerInfo, PeerPool, TunnelError, TunnelLink, TunnelStream};
pub use stream::H2Stream;

use crate::identity::SpiffeId;

/// Where peer agents listen unless configured otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 15008;
/// The request header naming the calling service (or `host`).
pub const CALLER_HEADER: &str = "x-hms-caller";
/// The response header naming why a CONNECT was refused (same header as local mesh errors).
pub const ERROR_HEADER: &str = "x-hms-error";
/// The request header declaring what the stream carries ([`StreamProtocol`]).
pub const PROTOCOL_HEADER: &str = "x-hms-protocol";
/// The caller name for processes that belong to no service.
pub const HOST_CALLER: &str = "host";
/// Streams one connection carries at once. The inbound side advertises it; the pool opens
/// another connection to the same peer rather than queueing behind long-lived streams.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 512;

/// A TLS handshake (inbound) or dial + TLS + HTTP/2 handshake (outbound) must finish within
/// this, so half-open or silent peers cannot pin resources.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the inbound side waits for a local instance to accept.
pub const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on idle connections detect a vanished peer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control windows: large enough that one stream fills a LAN link without waiting for
/// window updates; the connection window bounds what a slow reader can make us buffer.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// A CONNECT request is a handful of headers; anything larger is not ours.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// The service a tunnel stream is for: `<service>:<port>` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TunnelTarget {
    /// The service name (a DNS label, as in its spec).
    pub service: String,
    /// The port its instances listen on (the spec's `port`).
    pub port: u16,
}

impl TunnelTarget {
    pub fn new(service: impl Into<String>, port: u16) -> Result<Self, String> {
        let target = Self {
            service: service.into(),
            port,
        };
        target.validate()?;
        Ok(target)
    }

    fn validate(&self) -> Result<(), String> {
        hms_ctl::spec::validate_dns_label(&self.service)
            .map_err(|e| format!("service name {:?} {e}", self.service))?;
        if self.port == 0 {
            return Err(format!("port 0 is not a port (service {})", self.service));
        }
        Ok(())
    }

    /// The CONNECT authority: `<service>:<port>`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }

    /// Reads a CONNECT authority back.
    pub fn parse_authority(authority: &str) -> Result<Self, String> {
        let (service, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("authority {authority:?} is not <service>:<port>"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("authority {authority:?} has no valid port"))?;
        Self::new(service, port)
    }
}

impl fmt::Display for TunnelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

/// A caller name is a service name (DNS label) or `host`.
pub fn validate_caller(caller: &str) -> Result<(), String> {
    if caller == HOST_CALLER {
        return Ok(());
    }
    hms_ctl::spec::validate_dns_label(caller)
        .map_err(|e| format!("caller {caller:?} is neither `host` nor a service name: it {e}"))
}

/// Why the inbound side refused a stream: the CONNECT answer the caller's agent receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status of the CONNECT answer (403, 429, 502, 503, ...).
    pub status: u16,
    /// The `x-hms-error` value: the same reasons the proxy uses for its own mesh errors.
    pub reason: &'static str,
    /// Sent as `retry-after` (whole seconds, rounded up).
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// 403 `denied`: the service's policy does not allow this caller.
    pub const DENIED: Refusal = Refusal {
        status: 403,
        reason: "denied",
        retry_after: None,
    };
    /// 403 `caller-not-placed`: the peer node claims a caller service the operator did not
    /// place on it.
    pub const CALLER_NOT_PLACED: Refusal = Refusal {
        status: 403,
        reason: "caller-not-placed",
        retry_after: None,
    };
    /// 503 `no-endpoint`: no instance of the service runs on this host.
    pub const NO_ENDPOINT: Refusal = Refusal {
        status: 503,
        reason: "no-endpoint",
        retry_after: None,
    };
    /// 502 `connect-failed`: the local instance did not accept the connection.
    pub const CONNECT_FAILED: Refusal = Refusal {
        status: 502,
        reason: "connect-failed",
        retry_after: None,
    };
    pub(crate) const BAD_REQUEST: Refusal = Refusal {
        status: 400,
        reason: "bad-request",
        retry_after: None,
    };
    pub(crate) const METHOD_NOT_ALLOWED: Refusal = Refusal {
        status: 405,
        reason: "method-not-allowed",
        retry_after: None,
    };

    /// 429 `rate-limited` with `retry-after`.
    pub fn rate_limited(retry_after: Duration) -> Refusal {
        Refusal {
            status: 429,
            reason: "rate-limited",
            retry_after: Some(retry_after),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)?;
        if let Some(after) = self.retry_after {
            write!(f, " (retry after {after:?})")?;
        }
        Ok(())
    }
}

/// One CONNECT as the inbound side received it, after the peer was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRequest {
    /// The sending agent, proven by its TLS client certificate.
    pub peer_node: SpiffeId,
    /// The sending agent's address.
    pub peer_addr: SocketAddr,
    /// The calling service (a DNS label) or `host`, as the sending agent identified it.
    pub caller: String,
    pub target: TunnelTarget,
    /// What the caller's agent says the stream carries.
    pub protocol: StreamProtocol,
}

/// What one tunnel stream carries, as the caller's agent declares it (`x-hms-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamProtocol {
    /// Raw bytes (opaque TCP); no header.
    Opaque,
    /// One HTTP/1.1 connection (many requests one after another).
    Http1,
    /// One HTTP/2 connection (prior knowledge; many requests at once).
    Http2,
}

impl StreamProtocol {
    /// The header value, None for opaque streams (sent without the header).
    pub fn header_value(self) -> Option<&'static str> {
        match self {
            StreamProtocol::Opaque => None,
            StreamProtocol::Http1 => Some("http/1.1"),
            StreamProtocol::Http2 => Some("h2"),
        }
    }

    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None => Ok(StreamProtocol::Opaque),
            Some("http/1.1") => Ok(StreamProtocol::Http1),
            Some("h2") => Ok(StreamProtocol::Http2),
            Some(other) => Err(format!(
                "{PROTOCOL_HEADER} {other:?} is neither `http/1.1` nor `h2`"
            )),
        }
    }
}

/// How one inbound stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowOutcome {
    /// Answered with a refusal; nothing was spliced.
    Refused(Refusal),
    /// Spliced to `instance` until both directions finished (or `error`).
    Spliced {
        instance: SocketAddr,
        /// Bytes from the caller delivered to the instance.
        to_instance: u64,
        /// Bytes from the instance delivered to the caller.
        from_instance: u64,
        error: Option<String>,
    },
}

/// A finished inbound stream, for taps and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFlow {
    pub request: InboundRequest,
    pub outcome: FlowOutcome,
    pub duration: Duration,
}

/// The agent's decisions for the inbound side. Implemented by the agent (policy, rate
/// limit, instance lookup); the tunnel only carries the answer.
pub trait InboundPolicy: Send + Sync + 'static {
    /// Allow the stream by returning the local instance to splice to (a loopback address:
    /// anything else is refused with 502 and logged, so the listener can never relay), or
    /// refuse it. May wait (e.g. a queued rate-limit slot); the caller's agent waits too.
    fn authorize(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = Result<SocketAddr, Refusal>> + Send;

    /// Relays a stream declared HTTP once authorized: `downstream` is the tunnel stream,
    /// `upstream` the connected local instance. The default splices bytes; the agent serves
    /// HTTP on it so that it sees (and rate-limits) every request. Returns the bytes moved
    /// each way and the error that ended it, as the splice does.
    fn relay_http(
        &self,
        _request: &InboundRequest,
        downstream: H2Stream,
        upstream: tokio::net::TcpStream,
    ) -> impl Future<Output = (u64, u64, Option<String>)> + Send {
        async move {
            let (sent, received, error) = inbound::splice_counted(downstream, upstream).await;
            (sent, received, error.map(|e| e.to_string()))
        }
    }

    /// Called once per stream that reached [`authorize`](Self::authorize), when it ends.
    /// Must not block: it runs on the data path.
    fn on_flow(&self, _flow: &InboundFlow) {}

    /// Whether the verified peer may hold a connection at all: checked at the handshake and
    /// every [`MEMBERSHIP_CHECK`] after, so a host removed from the mesh loses its open
    /// tunnels too (its certificate stays valid until it expires). Must not block.
    fn peer_allowed(&self, _peer: &crate::identity::SpiffeId) -> bool {
        true
    }
}

/// How often an open inbound connection's peer is checked against the membership.
pub const MEMBERSHIP_CHECK: Duration = Duration::from_millis(500);

/// `retry-after` in whole seconds, rounded up, at least 1.
fn retry_after_secs(after: Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

/// Pings the peer every [`KEEPALIVE_INTERVAL`] on one connection (both sides do, idle or
/// not, as hyper's keep-alive did) and returns why the connection must close once a pong
/// does not come within [`KEEPALIVE_TIMEOUT`]. Pending forever otherwise: a ping that fails
/// because the connection is ending leaves the connection's own end to say why.
async fn keepalive(ping_pong: Option<h2::PingPong>) -> String {
    let Some(mut pings) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => {
                return format!(
                    "the peer did not answer a keep-alive ping within {KEEPALIVE_TIMEOUT:?}"
                );
            }
        }
    }
}
