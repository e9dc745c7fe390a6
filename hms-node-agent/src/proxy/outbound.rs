//! The outbound listener. For each accepted connection: find where the caller wanted to go
//! (the eBPF record) and who the caller is (its cgroup), map the VIP to a service, then detect
//! the protocol: HTTP goes through the HTTP layer (`http`), anything else is spliced to an
//! instance after the access policy allowed it. A connection we cannot place (no record,
//! unknown VIP, wrong port) is closed at once with the reason logged: never a hang. This module
//! never dials a VIP, only real instance addresses, which keeps the redirect loop-free.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hms_ctl::api::ServiceInfo;
use tokio::net::{TcpListener, TcpStream};

use super::detect::{self, Protocol};
use super::http::upstream::{ConnectError, UpstreamIo, Version};
use super::http::{Downstream, HttpProxy};
use super::splice::splice;
use crate::cgroup::ServiceCgroups;
use crate::drain::Drain;
use crate::limits::Refused;
use crate::original_dst::{self, Original, OriginalDestinations};
use crate::registry::Store;
use crate::resilience::policy::{self, Caller};

/// The port callers may always use (`http://name.svc/`), besides the service's own port.
pub const DEFAULT_SERVICE_PORT: u16 = 80;
/// How long to wait for a client's first bytes before treating the connection as opaque
/// (server-speaks-first protocols send nothing).
const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

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
    pub http: Arc<HttpProxy>,
    pub stats: ProxyStats,
    /// How many caller connections it may hold (`limits`).
    pub cap: Arc<crate::limits::ConnCap>,
    /// Round-robin position for opaque TCP (HTTP is balanced per request in `http`).
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
    #[error("{caller} may not call {service} (policy: {policy})")]
    Denied {
        caller: Caller,
        service: String,
        policy: String,
    },
    #[error("{0} has no instances")]
    NoInstance(String),
    #[error(
        "uid {uid} already holds {share} proxied connections, its share of the outbound cap; \
         close some, or raise the agent's fd limit (LimitNOFILE)"
    )]
    UserShare { uid: u32, share: usize },
    #[error("host {node} refused the connection: {reason}")]
    RefusedByHost { node: String, reason: String },
    #[error("connecting to {service} instance {addr} failed: {error}")]
    ConnectFailed {
        service: String,
        addr: SocketAddrV4,
        error: String,
    },
}

/// A connection matched to a service and a caller.
struct Placement {
    service: ServiceInfo,
    caller: Caller,
    process: String,
}

impl Outbound {
    pub fn new(
        store: Arc<dyn Store>,
        origins: Arc<dyn OriginalDestinations>,
        cgroups: ServiceCgroups,
        local_node: String,
        tap: Arc<crate::tap::TapHub>,
        metrics: Arc<crate::metrics::Metrics>,
        cap: Arc<crate::limits::ConnCap>,
    ) -> Outbound {
        Outbound {
            http: Arc::new(HttpProxy::new(
                store.clone(),
                cgroups,
                local_node,
                tap,
                metrics,
            )),
            store,
            origins,
            stats: ProxyStats::default(),
            cap,
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
            // Who is calling first (the kernel's record of the connection), so a user over
            // its share is refused before the cap sheds anyone's idle connection.
            let found = match self.origin(&stream, peer) {
                Ok(found) => found,
                Err(refusal) => {
                    self.refuse(stream, peer, refusal);
                    continue;
                }
            };
            let uid = found.orig.uid;
            let slot = match self.cap.admit_user(uid) {
                Ok(slot) => slot,
                Err(Refused::Busy) => {
                    // Every connection is busy: this one is closed at once (counted by the cap).
                    tracing::warn!(%peer, "outbound connection cap ({}) reached with none idle; closing", self.cap.max());
                    continue;
                }
                Err(Refused::Share) => {
                    let refusal = Refusal::UserShare {
                        uid,
                        share: self.cap.user_share(),
                    };
                    self.refuse(stream, peer, refusal);
                    continue;
                }
            };
            let this = self.clone();
            let guard = drain.guard();
            let drain = drain.clone();
            tokio::spawn(async move {
                let _guard = guard;
                // The service and the caller's identity: off the accept loop (the caller
                // index may be rebuilt, a process's cgroup read from /proc).
                let placement = match this.place(found) {
                    Ok(p) => p,
                    Err(refusal) => return this.refuse(stream, peer, refusal),
                };
                this.stats.active.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = this.handle(stream, peer, placement, drain, slot.idle_flag()) => {}
                    // Shed to admit a newer connection: dropping the work closes this one.
                    _ = slot.shed() => tracing::debug!(%peer, "idle connection shed at the cap"),
                }
                this.stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn handle(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        placement: Placement,
        drain: Drain,
        idle: crate::limits::IdleFlag,
    ) {
        self.stats.proxied.fetch_add(1, Ordering::Relaxed);
        let protocol = detect::detect(&client, DETECT_TIMEOUT).await;
        let name = placement.service.spec.name.clone();
        tracing::debug!(%peer, service = %name, caller = %placement.caller, process = %placement.process, ?protocol, "accepted");
        if protocol != Protocol::Opaque {
            // Its requests are tapped one by one; the kernel's close record of this
            // connection then only feeds metrics, not a second tap line.
            self.http.tap.mark_http_flow(peer);
        }
        let version = match protocol {
            Protocol::Http1 => Version::Http1,
            Protocol::Http2 => Version::Http2,
            Protocol::Opaque => {
                // A byte stream is never idle as far as the cap can tell.
                idle.set(false);
                return self.splice_opaque(client, peer, placement).await;
            }
        };
        self.http
            .clone()
            .serve_connection(
                client,
                version,
                Downstream {
                    service: name,
                    caller: placement.caller,
                    caller_process: placement.process,
                    peer,
                },
                drain,
                idle,
            )
            .await;
    }

    fn refuse(&self, client: TcpStream, peer: SocketAddr, refusal: Refusal) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "closing connection: {refusal}");
        // A reset tells the caller at once instead of a silent close.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    }

    async fn splice_opaque(&self, client: TcpStream, peer: SocketAddr, p: Placement) {
        let service = &p.service;
        let state = self.http.states.get(service, &self.store.snapshot());
        let here = state.endpoints.has_local();
        // With no instance here, the destination host's agent applies the policy.
        if here && !policy::allows(&service.spec.policy, &p.caller) {
            return self.refuse(
                client,
                peer,
                Refusal::Denied {
                    caller: p.caller,
                    service: service.spec.name.clone(),
                    policy: service.spec.policy.to_string(),
                },
            );
        }
        let (addr, upstream) = match self.dial(service, &state, &p.caller).await {
            Ok(v) => v,
            Err(refusal) => return self.refuse(client, peer, refusal),
        };
        match splice(client, upstream).await {
            Ok(t) => tracing::debug!(
                %peer, service = %service.spec.name, %addr, sent = t.client_to_upstream,
                received = t.upstream_to_client, "connection closed"
            ),
            Err(e) => {
                tracing::debug!(%peer, service = %service.spec.name, "connection ended with error: {e}")
            }
        }
    }

    /// The kernel's record of an accepted, redirected connection (its caller's uid, cgroup,
    /// pid and the VIP it asked for); taking it consumes it.
    fn origin(&self, client: &TcpStream, peer: SocketAddr) -> Result<Original, Refusal> {
        let Ok(local) = client.local_addr() else {
            return Err(Refusal::NoRecord);
        };
        self.origins.tcp(peer, local).ok_or(Refusal::NoRecord)
    }

    /// The service a redirected connection asked for and who is calling it. Both listeners
    /// land here: IPv4 (and IPv4-mapped) callers on the IPv4 one, IPv6 callers on `[::1]`.
    /// An IPv6 VIP carries its service's IPv4 VIP in its low 32 bits, so from here on both
    /// families are the same caller to the same service.
    fn place(&self, found: Original) -> Result<Placement, Refusal> {
        let orig = found.orig;
        let wanted = found.vip();
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
        Ok(Placement {
            caller: self.caller_of(orig.cgroup_id, orig.pid, &snapshot),
            process: format!("{}[{}]", original_dst::comm(&orig), orig.pid),
            service: service.clone(),
        })
    }

    /// The service whose cgroup the caller runs in (or an ancestor's), else the host.
    pub fn caller_of(
        &self,
        cgroup_id: u64,
        pid: u32,
        snapshot: &Arc<crate::registry::Snapshot>,
    ) -> Caller {
        let index = self.http.states.callers(snapshot);
        match index.caller_by_cgroup_id(cgroup_id) {
            Caller::Host => {
                // A child cgroup of a service's cgroup, or one created after the index was
                // built: match the process's cgroup path against every service's directory.
                match crate::cgroup::cgroup_of_pid(&self.http.states.cgroups().root, pid) {
                    Ok(dir) => self.http.states.caller_by_path(snapshot, &dir),
                    Err(_) => Caller::Host,
                }
            }
            found => found,
        }
    }

    /// Tries each candidate instance once (local ones first), starting at the round-robin
    /// position.
    async fn dial(
        &self,
        service: &ServiceInfo,
        state: &super::http::state::ServiceState,
        caller: &Caller,
    ) -> Result<(SocketAddrV4, UpstreamIo), Refusal> {
        let endpoints = &state.endpoints;
        let now = std::time::Instant::now();
        let candidates = endpoints.candidates(now);
        let order: Vec<usize> = (0..endpoints.addrs.len())
            .filter(|i| candidates(*i))
            .collect();
        if order.is_empty() {
            return Err(Refusal::NoInstance(service.spec.name.clone()));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let caller = caller.to_string();
        let mut last_error = String::new();
        let mut last_addr = endpoints.addrs[order[0]];
        for k in 0..order.len() {
            let i = order[(start + k) % order.len()];
            let addr = endpoints.addrs[i];
            match self
                .http
                .pool
                .connect(addr, &endpoints.vias[i], &service.spec.name, &caller)
                .await
            {
                Ok(io) => return Ok((addr, io)),
                Err(ConnectError::Refused { node, reason, .. }) => {
                    return Err(Refusal::RefusedByHost { node, reason });
                }
                Err(e) => last_error = e.to_string(),
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
