//! The outbound listener. For each accepted connection: find where the caller wanted to go
//! (the eBPF record), map the VIP to a service, pick an instance and splice. A connection we
//! cannot place (no record, unknown VIP, wrong port, no instance, dead instance) is closed at
//! once with the reason logged: never a hang. This module never dials a VIP, only real
//! instance addresses, which is what keeps the redirect loop-free.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hms_ctl::api::ServiceInfo;
use tokio::net::{TcpListener, TcpStream};

use crate::drain::Drain;
use crate::original_dst::{self, OriginalDestinations};
use crate::registry::Store;

use super::splice::splice;

/// The port callers may always use (`http://name.svc/`), besides the service's own port.
pub const DEFAULT_SERVICE_PORT: u16 = 80;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub proxied: AtomicU64,
    pub refused: AtomicU64,
    pub active: AtomicU64,
}

impl ProxyStats {
    pub fn counters(&self) -> hms_ctl::api::ProxyCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        hms_ctl::api::ProxyCounters {
            accepted: g(&self.accepted),
            proxied: g(&self.proxied),
            refused: g(&self.refused),
            active: g(&self.active),
        }
    }
}

pub struct Outbound {
    pub store: Arc<dyn Store>,
    pub origins: Arc<dyn OriginalDestinations>,
    pub stats: ProxyStats,
    /// Round-robin position; the HTTP layer replaces this with peak-EWMA balancing.
    next: AtomicUsize,
}

/// Why a connection was closed without being proxied.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no redirect record for this connection (not redirected by HMS, or the record aged out)"
    )]
    NoRecord,
    #[error("{0} is not the VIP of any deployed service")]
    UnknownVip(SocketAddrV4),
    #[error("{service} listens on port {port} (and 80); the caller asked for port {asked}")]
    WrongPort {
        service: String,
        port: u16,
        asked: u16,
    },
    #[error("{0} has no instances")]
    NoInstance(String),
    #[error("connecting to {service} instance {addr} failed: {error}")]
    ConnectFailed {
        service: String,
        addr: SocketAddrV4,
        error: String,
    },
}

impl Outbound {
    pub fn new(store: Arc<dyn Store>, origins: Arc<dyn OriginalDestinations>) -> Outbound {
        Outbound {
            store,
            origins,
            stats: ProxyStats::default(),
            next: AtomicUsize::new(0),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) -> anyhow::Result<()> {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("outbound accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => return Ok(()),
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let guard = drain.guard();
            tokio::spawn(async move {
                let _guard = guard;
                this.stats.active.fetch_add(1, Ordering::Relaxed);
                this.handle(stream, peer).await;
                this.stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let placed = self.place(&client, peer).await;
        match placed {
            Ok((service, instance, upstream, caller)) => {
                self.stats.proxied.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, %service, %instance, %caller, "proxying");
                match splice(client, upstream).await {
                    Ok(t) => tracing::debug!(
                        %peer, %service, sent = t.client_to_upstream, received = t.upstream_to_client,
                        "connection closed"
                    ),
                    Err(e) => tracing::debug!(%peer, %service, "connection ended with error: {e}"),
                }
            }
            Err(refusal) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "closing connection: {refusal}");
                // Dropping `client` closes it; a reset tells the caller at once.
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            }
        }
    }

    async fn place(
        &self,
        client: &TcpStream,
        peer: SocketAddr,
    ) -> Result<(String, SocketAddrV4, TcpStream, String), Refusal> {
        let (SocketAddr::V4(peer), Ok(SocketAddr::V4(local))) = (peer, client.local_addr()) else {
            return Err(Refusal::NoRecord);
        };
        let orig = self.origins.tcp(peer, local).ok_or(Refusal::NoRecord)?;
        let wanted = original_dst::addr(&orig);
        let caller = format!("{}[{}]", original_dst::comm(&orig), orig.pid);
        let snapshot = self.store.snapshot();
        let service = snapshot
            .by_vip(*wanted.ip())
            .ok_or(Refusal::UnknownVip(wanted))?;
        if wanted.port() != DEFAULT_SERVICE_PORT && wanted.port() != service.spec.port {
            return Err(Refusal::WrongPort {
                service: service.spec.name.clone(),
                port: service.spec.port,
                asked: wanted.port(),
            });
        }
        let (addr, upstream) = self.dial(service).await?;
        Ok((service.spec.name.clone(), addr, upstream, caller))
    }

    /// Tries each instance once, starting at the round-robin position.
    async fn dial(&self, service: &ServiceInfo) -> Result<(SocketAddrV4, TcpStream), Refusal> {
        let n = service.instances.len();
        if n == 0 {
            return Err(Refusal::NoInstance(service.spec.name.clone()));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        let mut last_addr = service.instances[0].addr;
        for i in 0..n {
            let addr = service.instances[(start + i) % n].addr;
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => return Ok((addr, s)),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = format!("no answer within {CONNECT_TIMEOUT:?}"),
            }
            last_addr = addr;
        }
        Err(Refusal::ConnectFailed {
            service: service.spec.name.clone(),
            addr: last_addr,
            error: last_error,
        })
    }
}
