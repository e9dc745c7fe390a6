//! Connections to service instances, pooled per instance. HTTP/1.1 connections carry one
//! request at a time and go back to the idle list once their response has been read to the
//! end; HTTP/2 connections are shared by every request to that instance (multiplexed). A
//! connection that fails or closes is dropped, never reused. Only real instance addresses
//! are ever dialled.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::body::ProxyBody;

/// Idle HTTP/1.1 connections kept per instance; more are closed after use.
const MAX_IDLE_PER_INSTANCE: usize = 32;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddrV4),
    #[error("connecting to {0} failed: {1}")]
    Io(SocketAddrV4, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddrV4, hyper::Error),
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

#[derive(Default)]
pub struct UpstreamPool {
    idle_h1: Mutex<HashMap<SocketAddrV4, Vec<http1::SendRequest<ProxyBody>>>>,
    shared_h2: Mutex<HashMap<SocketAddrV4, http2::SendRequest<ProxyBody>>>,
}

/// A connection checked out for one request.
pub struct Checkout {
    addr: SocketAddrV4,
    sender: Sender,
    /// False for connections that must not be reused (upgrades).
    reusable: bool,
}

impl UpstreamPool {
    /// A ready connection to `addr`: an idle pooled one if there is, else a new one.
    /// An error here means the request was never sent, so retrying it is always safe.
    pub async fn checkout(
        self: &Arc<Self>,
        addr: SocketAddrV4,
        version: Version,
        reusable: bool,
    ) -> Result<Checkout, ConnectError> {
        if reusable {
            match version {
                Version::Http1 => {
                    let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(list) = idle.get_mut(&addr) {
                        while let Some(s) = list.pop() {
                            if s.is_ready() {
                                return Ok(Checkout {
                                    addr,
                                    sender: Sender::H1(s),
                                    reusable,
                                });
                            }
                        }
                    }
                }
                Version::Http2 => {
                    let shared = self.shared_h2.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(s) = shared.get(&addr)
                        && !s.is_closed()
                    {
                        return Ok(Checkout {
                            addr,
                            sender: Sender::H2(s.clone()),
                            reusable,
                        });
                    }
                }
            }
        }
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
            Err(_) => return Err(ConnectError::Timeout(addr)),
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let sender = match version {
            Version::Http1 => {
                let (s, conn) = http1::handshake(io)
                    .await
                    .map_err(|e| ConnectError::Handshake(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(%addr, "upstream HTTP/1 connection ended: {e}");
                    }
                });
                Sender::H1(s)
            }
            Version::Http2 => {
                let (s, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| ConnectError::Handshake(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%addr, "upstream HTTP/2 connection ended: {e}");
                    }
                });
                if reusable {
                    self.shared_h2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(addr, s.clone());
                }
                Sender::H2(s)
            }
        };
        Ok(Checkout {
            addr,
            sender,
            reusable,
        })
    }

    fn checkin_h1(&self, addr: SocketAddrV4, s: http1::SendRequest<ProxyBody>) {
        let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(s);
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
    ) -> Result<Response<hyper::body::Incoming>, hyper::Error> {
        match self.sender {
            Sender::H1(mut s) => {
                let resp = s.send_request(req).await?;
                if self.reusable {
                    let pool = pool.clone();
                    let addr = self.addr;
                    tokio::spawn(async move {
                        // Resolves when the response has been read and the connection can
                        // take another request; errors when it closed.
                        if s.ready().await.is_ok() {
                            pool.checkin_h1(addr, s);
                        }
                    });
                }
                Ok(resp)
            }
            Sender::H2(mut s) => s.send_request(req).await,
        }
    }
}
