//! One gateway listener: the socket, TLS (rustls, TLS 1.3 only, certificate by SNI, ALPN h2
//! and http/1.1) and hyper's HTTP/1.1 or HTTP/2 server per connection. Owns the accept path;
//! never decides about a request (that is `request`).
//!
//! The accept path survives whatever a client sends: every connection runs in its own task,
//! the TLS handshake has a deadline, a failed handshake (garbage, TLS 1.2 or older, an SNI
//! no certificate covers) is counted and logged and ends only that connection. A request
//! head over 64 KiB gets 431 from hyper, a head slower than 10 s ends the connection.
//!
//! The routes and certificates a listener uses can change while it runs (`hms-ctl gateway
//! apply`, a renewed certificate file): new requests see the new routes; open connections
//! are not dropped.
//!
//! An upgrade hands the listening sockets to the successor (`handover`, names from
//! [`super::HANDOVER_PREFIX`]): both agents accept on them until the old one drains, and
//! while it drains its HTTP/1.1 responses say `Connection: close` (as the node proxy's do)
//! and its HTTP/2 connections get GOAWAY, so clients move to the successor without an error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use hms_ctl::gateway::{CertificateFiles, ListenerSpec, Protocol};

use super::certs::{CertStore, SniResolver};
use super::door::ConnInfo;
use super::metrics::ListenerLabels;
use super::routes::RouteTable;
use super::{GatewayHost, door};
use crate::drain::Drain;
use crate::limits::Refused;
use crate::proxy::http::MAX_HEADER_BYTES;
use crate::proxy::http::body::ObservedBody;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener serves now; swapped whole when the spec changes.
#[derive(Debug)]
pub struct ListenerConfig {
    pub gateway: String,
    pub spec: ListenerSpec,
    pub routes: RouteTable,
    /// Each route's door, by route name.
    pub doors: std::collections::HashMap<String, door::RouteDoor>,
    /// `redirect_https`: the port of the gateway's first https listener.
    pub https_port: Option<u16>,
    /// https: asks clients for a certificate (the door's `client_cert` authenticators).
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// A running listener.
pub struct ListenerRuntime {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub certificate_files: Vec<CertificateFiles>,
    pub config: RwLock<Arc<ListenerConfig>>,
    pub certs: Option<Arc<CertStore>>,
    /// https: rebuilt with the config (the client verifier follows the routes).
    tls: RwLock<Option<TlsAcceptor>>,
    stop: watch::Sender<bool>,
    /// A duplicate of the listening socket for an upgrade's successor (`handover`); gone
    /// once the listener stops, so a stopped listener is never handed on.
    handover: Mutex<Option<OwnedFd>>,
}

impl ListenerRuntime {
    pub fn config(&self) -> Arc<ListenerConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// New routes (and TLS settings) for the next requests and handshakes.
    pub fn set_config(&self, c: ListenerConfig) -> anyhow::Result<()> {
        if let Some(certs) = &self.certs {
            let acceptor = TlsAcceptor::from(Arc::new(tls_config(
                certs.clone(),
                c.client_verifier.clone(),
            )?));
            *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Some(acceptor);
        }
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
        Ok(())
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops accepting; open connections finish on their own.
    pub fn stop(&self) {
        self.handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let _ = self.stop.send(true);
    }

    /// Another fd of the listening socket, for an upgrade's successor; `None` once stopped.
    pub fn duplicate(&self) -> Option<OwnedFd> {
        let fd = self.handover.lock().unwrap_or_else(|p| p.into_inner());
        fd.as_ref().and_then(|f| f.try_clone().ok())
    }
}

/// The rustls server config of an https listener: TLS 1.3 only, pinned here (rustls is built
/// with TLS 1.2 too, for egress to outside systems), ALPN h2 then http/1.1.
fn tls_config(
    certs: Arc<CertStore>,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver(certs)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Binds and starts serving. Errors name the address (a port taken, a certificate that
/// does not load) so `describe` can say why a listener is not serving.
pub async fn start(
    host: Arc<GatewayHost>,
    config: ListenerConfig,
    drain: Drain,
) -> anyhow::Result<Arc<ListenerRuntime>> {
    let spec = config.spec.clone();
    let addr = SocketAddr::new(spec.bind_ip(), spec.port);
    let certs = match spec.protocol {
        Protocol::Http => None,
        Protocol::Https => {
            let metrics = host.metrics.clone();
            let labels = ListenerLabels {
                gateway: config.gateway.clone(),
                listener: spec.name.clone(),
                reason: "load-failed".into(),
            };
            Some(Arc::new(CertStore::load(
                &spec.certificates,
                Box::new(move |_| {
                    metrics
                        .certificate_reload_failures
                        .get_or_create(&labels)
                        .inc();
                }),
            )?))
        }
    };
    let acceptor = match &certs {
        Some(c) => Some(TlsAcceptor::from(Arc::new(tls_config(
            c.clone(),
            config.client_verifier.clone(),
        )?))),
        None => None,
    };
    // An upgrade's predecessor handed this address's socket over: accept on it (both
    // agents do until the old one drains), so no connection is refused in between.
    let (listener, origin) = match host.take_inherited(addr) {
        Some(l) => {
            l.set_nonblocking(true)?;
            (TcpListener::from_std(l)?, "hand-over")
        }
        None => (bind(addr)?, "bound"),
    };
    let handover = listener
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the gateway listener's socket for a later hand-over")?;
    let (stop, stopped) = watch::channel(false);
    let rt = Arc::new(ListenerRuntime {
        addr,
        protocol: spec.protocol,
        certificate_files: spec.certificates.clone(),
        config: RwLock::new(Arc::new(config)),
        certs,
        tls: RwLock::new(acceptor),
        stop,
        handover: Mutex::new(Some(handover)),
    });
    tracing::info!(%addr, protocol = ?spec.protocol, listener = %spec.name, origin, "gateway listener serving");
    tokio::spawn(accept_loop(host, rt.clone(), listener, stopped, drain));
    Ok(rt)
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot bind gateway listener {addr}: {e}"))?;
    Ok(socket.listen(1024)?)
}

async fn accept_loop(
    host: Arc<GatewayHost>,
    rt: Arc<ListenerRuntime>,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
    drain: Drain,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.wait_for(|s| *s) => break,
            _ = drain.signaled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: back off a little instead of spinning.
                tracing::warn!(addr = %rt.addr, "gateway accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match host.cap.admit_client(peer.ip()) {
            Ok(slot) => slot,
            // Every connection is busy: this one is closed at once (counted by the cap).
            Err(Refused::Busy) => {
                tracing::warn!(%peer, addr = %rt.addr, "gateway connection cap ({}) reached with none idle; closing", host.cap.max());
                continue;
            }
            Err(Refused::Share) => {
                tracing::info!(%peer, addr = %rt.addr, "gateway client holds its share ({}) of the connection cap; closing", host.cap.user_share());
                continue;
            }
        };
        let host = host.clone();
        let rt = rt.clone();
        let acceptor = rt.acceptor();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _guard = drain.guard();
            let idle = slot.idle_flag();
            tokio::select! {
                _ = serve_connection(host, rt, stream, peer, acceptor, drain, idle) => {}
                // Shed to admit a newer connection (a handshake not finished, a kept-alive
                // connection between requests): dropping the work closes this one.
                _ = slot.shed() => tracing::debug!(%peer, "idle gateway connection shed at the cap"),
            }
        });
    }
    tracing::info!(addr = %rt.addr, "gateway listener closed");
}

async fn serve_connection(
    host: Arc<GatewayHost>,
    rt: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    drain: Drain,
    idle: crate::limits::IdleFlag,
) {
    let _ = stream.set_nodelay(true);
    let labels = |reason: &str| {
        let c = rt.config();
        ListenerLabels {
            gateway: c.gateway.clone(),
            listener: c.spec.name.clone(),
            reason: reason.into(),
        }
    };
    match acceptor {
        None => {
            let info = ConnInfo {
                client: peer,
                tls: false,
                sni: None,
                client_chain: Vec::new(),
            };
            serve_http(host, rt, TokioIo::new(stream), info, false, drain, idle).await
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Err(_) => {
                    host.metrics
                        .handshake_failures
                        .get_or_create(&labels("timeout"))
                        .inc();
                    tracing::info!(%peer, addr = %rt.addr, "gateway TLS handshake timed out");
                    return;
                }
                Ok(Err(e)) => {
                    let reason = handshake_reason(&e);
                    host.metrics
                        .handshake_failures
                        .get_or_create(&labels(reason))
                        .inc();
                    tracing::info!(%peer, addr = %rt.addr, reason, "gateway TLS handshake failed: {e}");
                    return;
                }
                Ok(Ok(tls)) => tls,
            };
            let (_, session) = tls.get_ref();
            let h2 = session.alpn_protocol() == Some(b"h2");
            let info = ConnInfo {
                client: peer,
                tls: true,
                sni: session.server_name().map(str::to_owned),
                client_chain: session
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default(),
            };
            serve_http(host, rt, TokioIo::new(tls), info, h2, drain, idle).await
        }
    }
}

fn handshake_reason(e: &std::io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("no server certificate chain resolved") {
        "unknown-sni"
    } else if text.contains("ProtocolVersion") || text.contains("protocol version") {
        "protocol-version"
    } else {
        "other"
    }
}

async fn serve_http<I>(
    host: Arc<GatewayHost>,
    rt: Arc<ListenerRuntime>,
    io: TokioIo<I>,
    info: ConnInfo,
    h2: bool,
    drain: Drain,
    idle: crate::limits::IdleFlag,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let peer = info.client;
    // Idle for the cap while no response body is unsent (between requests, or before the
    // first); the TLS handshake before this counted as idle too.
    let busy = Arc::new(crate::limits::InFlight::new(idle));
    let service = {
        let host = host.clone();
        let rt = rt.clone();
        let drain = drain.clone();
        hyper::service::service_fn(move |req| {
            let host = host.clone();
            let rt = rt.clone();
            let info = info.clone();
            let drain = drain.clone();
            let busy = busy.clone();
            busy.started();
            async move {
                let resp = host.handle(req, &rt, &info, drain.clone()).await;
                let ended = busy.clone();
                let mut resp = resp.map(|b| ObservedBody::new(b, move |_| ended.ended()).boxed());
                if drain.is_signaled()
                    && !h2
                    && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
                {
                    // Draining (stop, upgrade): the connection's last response; the client's
                    // next request opens a connection to the successor. Never a close under
                    // a request that may be on its way (hyper's graceful_shutdown would).
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let result = if h2 {
        let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, service);
        tokio::pin!(served);
        tokio::select! {
            r = served.as_mut() => r,
            _ = drain.signaled() => {
                served.as_mut().graceful_shutdown();
                served.await
            }
        }
    } else {
        crate::proxy::http::http1_server()
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() || e.is_timeout() {
            let c = rt.config();
            host.metrics
                .bad_requests
                .get_or_create(&ListenerLabels {
                    gateway: c.gateway.clone(),
                    listener: c.spec.name.clone(),
                    reason: if e.is_parse_too_large() {
                        "too-large"
                    } else if e.is_timeout() {
                        "timeout"
                    } else {
                        "malformed"
                    }
                    .into(),
                })
                .inc();
            tracing::info!(%peer, addr = %rt.addr, "bad request at the gateway: {e}");
        } else {
            tracing::debug!(%peer, addr = %rt.addr, "gateway connection ended: {e}");
        }
    }
}
