//! The DNS responder on `--dns` (UDP and TCP). Redirected port-53 traffic lands here:
//! `*.svc` is answered from the registry, everything else is forwarded verbatim to the
//! resolver the caller asked. Nothing a caller sends may stop it: every message is handled in
//! its own task and every failure is logged and answered (SERVFAIL/FORMERR) or dropped.
//! What it may hold is bounded (`limits`): DNS-over-TCP connections by a cap that sheds the
//! oldest idle one, forwarded queries by a pool (a query without a slot is dropped and
//! counted, as a lost datagram would be).
//! The same responder serves the IPv4 listener and, with IPv6 on, the `[::1]` one; AAAA
//! answers come from the IPv6 VIP prefix only when IPv6 callers can be served.

pub mod answer;
pub mod upstream;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::drain::Drain;
use crate::original_dst::OriginalDestinations;
use crate::registry::Store;
use answer::{Decision, Outcome};
use upstream::Upstream;

/// Counts of answers by kind, for `status` and metrics.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub vip: AtomicU64,
    pub nodata: AtomicU64,
    pub nxdomain: AtomicU64,
    pub formerr: AtomicU64,
    pub forwarded: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped: AtomicU64,
}

impl DnsStats {
    pub fn counters(&self) -> hms_ctl::api::DnsCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        hms_ctl::api::DnsCounters {
            vip: g(&self.vip),
            nodata: g(&self.nodata),
            nxdomain: g(&self.nxdomain),
            formerr: g(&self.formerr),
            forwarded: g(&self.forwarded),
            servfail: g(&self.servfail),
            dropped: g(&self.dropped),
        }
    }

    fn count(&self, o: Outcome) {
        let c = match o {
            Outcome::Vip => &self.vip,
            Outcome::NoData => &self.nodata,
            Outcome::NxDomain => &self.nxdomain,
            Outcome::FormErr => &self.formerr,
            Outcome::Forwarded => &self.forwarded,
            Outcome::Dropped => &self.dropped,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct DnsResponder {
    pub store: Arc<dyn Store>,
    pub origins: Arc<dyn OriginalDestinations>,
    pub upstream: Upstream,
    pub stats: DnsStats,
    pub caps: Arc<crate::limits::Caps>,
    /// Set when `--dns` is bound off loopback (`--dns-allow-remote`): queries from
    /// anywhere but this host's own addresses are dropped, never answered.
    pub local_only: Option<LocalClients>,
    /// The IPv6 VIP prefix when IPv6 callers are served (AAAA answers); `None`: AAAA is
    /// NODATA, so no client tries an address nobody listens for.
    pub vip6_prefix: Option<Ipv6Addr>,
}

/// This host's own addresses (loopback and every interface's), to tell local clients from
/// remote ones. Addresses come and go: the list is read again at most every 5 s.
#[derive(Default)]
pub struct LocalClients {
    cache: Mutex<Option<(Instant, Vec<IpAddr>)>>,
    /// Queries and connections from other hosts, dropped.
    pub refused: AtomicU64,
}

const LOCAL_ADDRS_TTL: Duration = Duration::from_secs(5);

impl LocalClients {
    pub fn is_local(&self, ip: IpAddr) -> bool {
        if ip.is_loopback() {
            return true;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let stale = cache
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > LOCAL_ADDRS_TTL);
        if stale {
            let addrs = nix::ifaddrs::getifaddrs()
                .map(|ifs| {
                    ifs.filter_map(|i| i.address)
                        .filter_map(|a| {
                            a.as_sockaddr_in()
                                .map(|v4| IpAddr::V4(v4.ip()))
                                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                        })
                        .collect()
                })
                .unwrap_or_default();
            *cache = Some((Instant::now(), addrs));
        }
        let local = cache.as_ref().is_some_and(|(_, a)| a.contains(&ip));
        if !local {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        local
    }
}

impl DnsResponder {
    /// Serves UDP until drained.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket, drain: Drain) -> anyhow::Result<()> {
        let sock = Arc::new(sock);
        let local = sock.local_addr().context("DNS UDP socket address")?;
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(v) => v,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here; they concern one peer.
                        tracing::debug!("DNS UDP receive error: {e}");
                        continue;
                    }
                },
                _ = drain.signaled() => return Ok(()),
            };
            if let Some(local) = &self.local_only
                && !local.is_local(peer.ip())
            {
                tracing::debug!(%peer, "DNS query from another host dropped (--dns-allow-remote answers this host only)");
                continue;
            }
            let query = buf[..n].to_vec();
            let this = self.clone();
            let sock = sock.clone();
            let guard = drain.guard();
            tokio::spawn(async move {
                let _guard = guard;
                if let Some(reply) = this.handle_udp(&query, peer, local).await
                    && let Err(e) = sock.send_to(&reply, peer).await
                {
                    tracing::debug!(%peer, "sending DNS reply failed: {e}");
                }
            });
        }
    }

    async fn handle_udp(
        &self,
        query: &[u8],
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Vec<u8>> {
        let (decision, outcome) = answer::decide(query, &self.store.snapshot(), self.vip6_prefix);
        self.stats.count(outcome);
        match decision {
            Decision::Reply(r) => Some(r),
            Decision::Drop => None,
            Decision::Forward => {
                let upstream = self.origins.udp(peer, local).map(|o| o.wanted());
                let max_udp = Message::from_vec(query)
                    .map(|m| usize::from(m.max_payload()))
                    .unwrap_or(512);
                let Some(_slot) = self.forward_slot() else {
                    tracing::debug!(%peer, "DNS forward pool full; query dropped");
                    return None;
                };
                match self.resolve_upstream(upstream, local) {
                    Some(server) => match self.upstream.forward_udp(server, query, max_udp).await {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::warn!(%peer, %server, "DNS forward failed: {e:#}");
                            self.servfail(query)
                        }
                    },
                    None => self.servfail(query),
                }
            }
        }
    }

    /// A place in the bounded pool of forwarded queries, or `None` (counted) when full.
    fn forward_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let slot = self.caps.dns_forwards.try_acquire().ok();
        if slot.is_none() {
            self.caps
                .dns_forwards_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        slot
    }

    /// The caller's resolver, else the system's, never ourselves.
    fn resolve_upstream(&self, asked: Option<SocketAddr>, local: SocketAddr) -> Option<SocketAddr> {
        let server = asked.or_else(|| {
            let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            upstream::system_resolver(&conf)
        });
        match server {
            Some(s) if s != local => Some(s),
            _ => {
                tracing::warn!("no upstream resolver known for a forwarded query");
                None
            }
        }
    }

    fn servfail(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.stats.servfail.fetch_add(1, Ordering::Relaxed);
        let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
        let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
        if let Ok(q) = Message::from_vec(query) {
            m.add_queries(q.queries().iter().cloned());
            m.set_recursion_desired(q.recursion_desired());
        }
        m.to_vec().ok()
    }

    /// Serves TCP (length-prefixed messages, several per connection) until drained.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        drain: Drain,
    ) -> anyhow::Result<()> {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("DNS TCP accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => return Ok(()),
            };
            if let Some(local) = &self.local_only
                && !local.is_local(peer.ip())
            {
                tracing::debug!(%peer, "DNS TCP connection from another host closed (--dns-allow-remote answers this host only)");
                continue;
            }
            let Some(slot) = self.caps.dns_tcp.admit() else {
                tracing::warn!(%peer, "DNS TCP connection cap reached with none idle; closing");
                continue;
            };
            let this = self.clone();
            let guard = drain.guard();
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    r = this.handle_tcp(stream, peer, &slot) => if let Err(e) = r {
                        tracing::debug!(%peer, "DNS TCP connection ended: {e:#}");
                    },
                    _ = slot.shed() => tracing::debug!(%peer, "idle DNS TCP connection shed at the cap"),
                }
            });
        }
    }

    async fn handle_tcp(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        slot: &crate::limits::ConnSlot,
    ) -> anyhow::Result<()> {
        let local = stream.local_addr()?;
        let upstream = self.origins.tcp(peer, local).map(|o| o.wanted());
        // An idle or slow client must not hold a task forever.
        let idle = std::time::Duration::from_secs(10);
        loop {
            slot.set_idle(true);
            let mut len = [0u8; 2];
            match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Ok(()),
            }
            slot.set_idle(false);
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            tokio::time::timeout(idle, stream.read_exact(&mut query))
                .await
                .context("client too slow sending its query")??;
            let (decision, outcome) =
                answer::decide(&query, &self.store.snapshot(), self.vip6_prefix);
            self.stats.count(outcome);
            let reply = match decision {
                Decision::Reply(r) => Some(r),
                Decision::Drop => None,
                Decision::Forward => match self
                    .forward_slot()
                    .and_then(|slot| Some((slot, self.resolve_upstream(upstream, local)?)))
                {
                    Some((_slot, server)) => {
                        match self.upstream.forward_tcp(server, &query).await {
                            Ok(r) => Some(r),
                            Err(e) => {
                                tracing::warn!(%peer, %server, "DNS forward over TCP failed: {e:#}");
                                self.servfail(&query)
                            }
                        }
                    }
                    None => self.servfail(&query),
                },
            };
            let Some(reply) = reply else { return Ok(()) };
            let len = u16::try_from(reply.len()).context("reply larger than 64 KiB")?;
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply);
            stream.write_all(&framed).await?;
        }
    }
}
