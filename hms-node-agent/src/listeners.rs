//! Where the agent's data-path listeners come from, in this order:
//! 1. a running agent handing them over (`--takeover`, see `handover`), so an upgrade never
//!    closes a listening socket;
//! 2. systemd socket activation (`LISTEN_FDS`, named by `FileDescriptorName=` in the
//!    `.socket` unit: `outbound`, `dns-udp`, `dns-tcp`, `inbound`, `metrics`), so
//!    connections queue in the kernel while the agent restarts;
//! 3. binding the configured addresses ourselves.
//!
//! The IPv6 listeners (`outbound6`, `dns6-udp`, `dns6-tcp` on `[::1]`, same ports as the
//! IPv4 ones, so the kernel programs need one port per role) are optional: on a host with
//! IPv6 disabled they cannot be bound, the agent says so once and serves IPv4 only.
//!
//! Never closes or re-binds a socket it was given.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, bail};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::AgentConfig;

pub const OUTBOUND: &str = "outbound";
pub const DNS_UDP: &str = "dns-udp";
pub const DNS_TCP: &str = "dns-tcp";
pub const INBOUND: &str = "inbound";
pub const METRICS: &str = "metrics";
pub const OUTBOUND6: &str = "outbound6";
pub const DNS6_UDP: &str = "dns6-udp";
pub const DNS6_TCP: &str = "dns6-tcp";

/// The first fd systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The sockets the data path serves, as std sockets so they can be handed over before being
/// registered with tokio.
pub struct DataListeners {
    pub outbound: std::net::TcpListener,
    pub dns_udp: std::net::UdpSocket,
    pub dns_tcp: std::net::TcpListener,
    pub metrics: std::net::TcpListener,
    /// Cross-host mTLS listener, only in a multi-host mesh.
    pub inbound: Option<std::net::TcpListener>,
    /// IPv6 callers' listeners; `None` with `--ipv6=false` or IPv6 disabled on the host.
    pub v6: Option<V6Listeners>,
    /// Where they came from, for logs and `status`.
    pub origin: &'static str,
}

/// The outbound listener and DNS responder for IPv6 callers, on `[::1]`.
pub struct V6Listeners {
    pub outbound: std::net::TcpListener,
    pub dns_udp: std::net::UdpSocket,
    pub dns_tcp: std::net::TcpListener,
}

impl V6Listeners {
    /// From `given` where it has them, else bound on `[::1]`. `Ok(None)` when the host has
    /// no IPv6 (no `::1`, or the family is not supported).
    fn acquire(
        config: &AgentConfig,
        given: &mut HashMap<String, OwnedFd>,
    ) -> anyhow::Result<Option<V6Listeners>> {
        let outbound_addr = SocketAddrV6::new(Ipv6Addr::LOCALHOST, config.outbound.port(), 0, 0);
        let dns_addr = SocketAddrV6::new(Ipv6Addr::LOCALHOST, config.dns.port(), 0, 0);
        let no_ipv6 = |e: &std::io::Error| {
            e.kind() == std::io::ErrorKind::AddrNotAvailable
                || e.raw_os_error() == Some(libc::EAFNOSUPPORT)
        };
        let outbound = match given.remove(OUTBOUND6) {
            Some(fd) => tcp_from(fd, OUTBOUND6)?,
            None => match std::net::TcpListener::bind(outbound_addr) {
                Ok(l) => l,
                Err(e) if no_ipv6(&e) => {
                    tracing::warn!(
                        "IPv6 is disabled on this host ({e} binding {outbound_addr}): serving \
                         IPv4 callers only; AAAA queries for .svc names get no address"
                    );
                    return Ok(None);
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "binding the IPv6 outbound listener {outbound_addr} (--outbound's \
                             port on [::1]; free it or pass --ipv6=false)"
                        )
                    });
                }
            },
        };
        let dns_udp = match given.remove(DNS6_UDP) {
            Some(fd) => udp_from(fd, DNS6_UDP)?,
            None => std::net::UdpSocket::bind(dns_addr).with_context(|| {
                format!("binding the IPv6 DNS responder {dns_addr}/udp (--dns's port on [::1])")
            })?,
        };
        let dns_tcp = match given.remove(DNS6_TCP) {
            Some(fd) => tcp_from(fd, DNS6_TCP)?,
            None => std::net::TcpListener::bind(dns_addr).with_context(|| {
                format!("binding the IPv6 DNS responder {dns_addr}/tcp (--dns's port on [::1])")
            })?,
        };
        check_addr(&outbound.local_addr()?, &outbound_addr.into(), OUTBOUND6)?;
        check_addr(&dns_udp.local_addr()?, &dns_addr.into(), DNS6_UDP)?;
        check_addr(&dns_tcp.local_addr()?, &dns_addr.into(), DNS6_TCP)?;
        outbound.set_nonblocking(true)?;
        dns_udp.set_nonblocking(true)?;
        dns_tcp.set_nonblocking(true)?;
        Ok(Some(V6Listeners {
            outbound,
            dns_udp,
            dns_tcp,
        }))
    }
}

impl DataListeners {
    /// Uses `given` (from a hand-over or systemd) where it has a socket, binds the rest.
    pub fn acquire(
        config: &AgentConfig,
        mut given: HashMap<String, OwnedFd>,
        origin: &'static str,
        with_inbound: bool,
    ) -> anyhow::Result<DataListeners> {
        let outbound = match given.remove(OUTBOUND) {
            Some(fd) => tcp_from(fd, OUTBOUND)?,
            None => std::net::TcpListener::bind(config.outbound).with_context(|| {
                format!(
                    "binding the outbound listener {} (--outbound)",
                    config.outbound
                )
            })?,
        };
        let dns_udp = match given.remove(DNS_UDP) {
            Some(fd) => udp_from(fd, DNS_UDP)?,
            None => std::net::UdpSocket::bind(config.dns)
                .with_context(|| format!("binding the DNS responder {}/udp (--dns)", config.dns))?,
        };
        let dns_tcp = match given.remove(DNS_TCP) {
            Some(fd) => tcp_from(fd, DNS_TCP)?,
            None => std::net::TcpListener::bind(config.dns)
                .with_context(|| format!("binding the DNS responder {}/tcp (--dns)", config.dns))?,
        };
        let metrics = match given.remove(METRICS) {
            Some(fd) => tcp_from(fd, METRICS)?,
            None => std::net::TcpListener::bind(config.metrics).with_context(|| {
                format!(
                    "binding the metrics listener {} (--metrics)",
                    config.metrics
                )
            })?,
        };
        let inbound = if with_inbound {
            let l = match given.remove(INBOUND) {
                Some(fd) => tcp_from(fd, INBOUND)?,
                None => std::net::TcpListener::bind(config.inbound).with_context(|| {
                    format!(
                        "binding the inbound listener {} (--inbound)",
                        config.inbound
                    )
                })?,
            };
            check_addr(&l.local_addr()?, &config.inbound, INBOUND)?;
            l.set_nonblocking(true)?;
            Some(l)
        } else {
            None
        };
        let v6 = if config.ipv6 {
            V6Listeners::acquire(config, &mut given)?
        } else {
            None
        };
        check_addr(&outbound.local_addr()?, &config.outbound.into(), OUTBOUND)?;
        check_addr(&metrics.local_addr()?, &config.metrics, METRICS)?;
        metrics.set_nonblocking(true)?;
        check_addr(&dns_tcp.local_addr()?, &config.dns.into(), DNS_TCP)?;
        check_addr(&dns_udp.local_addr()?, &config.dns.into(), DNS_UDP)?;
        outbound.set_nonblocking(true)?;
        dns_tcp.set_nonblocking(true)?;
        dns_udp.set_nonblocking(true)?;
        Ok(DataListeners {
            outbound,
            dns_udp,
            dns_tcp,
            metrics,
            inbound,
            v6,
            origin,
        })
    }

    /// Registers them with the tokio runtime.
    pub fn into_tokio(self) -> anyhow::Result<TokioListeners> {
        Ok(TokioListeners {
            outbound: TcpListener::from_std(self.outbound)?,
            dns_udp: UdpSocket::from_std(self.dns_udp)?,
            dns_tcp: TcpListener::from_std(self.dns_tcp)?,
            metrics: TcpListener::from_std(self.metrics)?,
            inbound: self.inbound.map(TcpListener::from_std).transpose()?,
            v6: match self.v6 {
                Some(v6) => Some(TokioV6Listeners {
                    outbound: TcpListener::from_std(v6.outbound)?,
                    dns_udp: UdpSocket::from_std(v6.dns_udp)?,
                    dns_tcp: TcpListener::from_std(v6.dns_tcp)?,
                }),
                None => None,
            },
        })
    }

    /// Duplicates of the three fds, for handing them to a successor.
    pub fn duplicates(&self) -> anyhow::Result<Vec<(String, OwnedFd)>> {
        Ok([
            (OUTBOUND.into(), self.outbound.try_clone()?.into()),
            (DNS_UDP.into(), self.dns_udp.try_clone()?.into()),
            (DNS_TCP.into(), self.dns_tcp.try_clone()?.into()),
            (METRICS.into(), self.metrics.try_clone()?.into()),
        ]
        .into_iter()
        .chain(
            self.inbound
                .as_ref()
                .map(|l| l.try_clone().map(|l| (INBOUND.into(), l.into())))
                .transpose()?,
        )
        .chain(match &self.v6 {
            Some(v6) => vec![
                (OUTBOUND6.into(), v6.outbound.try_clone()?.into()),
                (DNS6_UDP.into(), v6.dns_udp.try_clone()?.into()),
                (DNS6_TCP.into(), v6.dns_tcp.try_clone()?.into()),
            ],
            None => Vec::new(),
        })
        .collect())
    }
}

pub struct TokioListeners {
    pub outbound: TcpListener,
    pub dns_udp: UdpSocket,
    pub dns_tcp: TcpListener,
    pub metrics: TcpListener,
    pub inbound: Option<TcpListener>,
    pub v6: Option<TokioV6Listeners>,
}

pub struct TokioV6Listeners {
    pub outbound: TcpListener,
    pub dns_udp: UdpSocket,
    pub dns_tcp: TcpListener,
}

pub(crate) fn tcp_from(fd: OwnedFd, name: &str) -> anyhow::Result<std::net::TcpListener> {
    let sock = socket2::Socket::from(fd);
    if sock.r#type()? != socket2::Type::STREAM {
        bail!("the socket passed as `{name}` is not a TCP listener");
    }
    Ok(sock.into())
}

fn udp_from(fd: OwnedFd, name: &str) -> anyhow::Result<std::net::UdpSocket> {
    let sock = socket2::Socket::from(fd);
    if sock.r#type()? != socket2::Type::DGRAM {
        bail!("the socket passed as `{name}` is not a UDP socket");
    }
    Ok(sock.into())
}

/// A passed socket must be the one the config names, or the eBPF redirect would point
/// somewhere else than where we listen.
fn check_addr(got: &SocketAddr, want: &SocketAddr, name: &str) -> anyhow::Result<()> {
    if got != want {
        bail!(
            "the `{name}` socket handed to the agent listens on {got}, but the config says {want}; \
             make the .socket unit and the agent's flags agree"
        );
    }
    Ok(())
}

/// Sockets passed by systemd (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`), by name. The
/// variables are removed so children do not inherit them.
pub fn from_systemd() -> anyhow::Result<HashMap<String, OwnedFd>> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    // SAFETY: single-threaded at this point of start-up (called before the runtime starts).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let mut out = HashMap::new();
    if !pid_ok || count <= 0 {
        return Ok(out);
    }
    for i in 0..count {
        let fd = LISTEN_FDS_START + i;
        let name = names.get(i as usize).cloned().unwrap_or_default();
        // SAFETY: systemd passed us fds 3..3+LISTEN_FDS; each is owned from here on.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Mark close-on-exec: the agent execs a successor on upgrade.
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        match name.as_str() {
            OUTBOUND | DNS_UDP | DNS_TCP | INBOUND | METRICS | OUTBOUND6 | DNS6_UDP | DNS6_TCP => {
                out.insert(name, owned);
            }
            other => bail!(
                "systemd passed a socket named `{other}`; name them with FileDescriptorName= \
                 outbound, dns-udp, dns-tcp, inbound, metrics, outbound6, dns6-udp or dns6-tcp"
            ),
        }
    }
    Ok(out)
}
