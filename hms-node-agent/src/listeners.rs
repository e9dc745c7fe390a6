//! Where the agent's data-path listeners come from, in this order:
//! 1. a running agent handing them over (`--takeover`, see `handover`), so an upgrade never
//!    closes a listening socket;
//! 2. systemd socket activation (`LISTEN_FDS`, named by `FileDescriptorName=` in the
//!    `.socket` unit: `outbound`, `dns-udp`, `dns-tcp`, `inbound`, `metrics`), so
//!    connections queue in the kernel while the agent restarts;
//! 3. binding the configured addresses ourselves.
//!
//! Never closes or re-binds a socket it was given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, bail};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::AgentConfig;

pub const OUTBOUND: &str = "outbound";
pub const DNS_UDP: &str = "dns-udp";
pub const DNS_TCP: &str = "dns-tcp";
pub const INBOUND: &str = "inbound";
pub const METRICS: &str = "metrics";

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
    /// Where they came from, for logs and `status`.
    pub origin: &'static str,
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
            Some(fd) => udp_from(fd)?,
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
        .collect())
    }
}

pub struct TokioListeners {
    pub outbound: TcpListener,
    pub dns_udp: UdpSocket,
    pub dns_tcp: TcpListener,
    pub metrics: TcpListener,
    pub inbound: Option<TcpListener>,
}

fn tcp_from(fd: OwnedFd, name: &str) -> anyhow::Result<std::net::TcpListener> {
    let sock = socket2::Socket::from(fd);
    if sock.r#type()? != socket2::Type::STREAM {
        bail!("the socket passed as `{name}` is not a TCP listener");
    }
    Ok(sock.into())
}

fn udp_from(fd: OwnedFd) -> anyhow::Result<std::net::UdpSocket> {
    let sock = socket2::Socket::from(fd);
    if sock.r#type()? != socket2::Type::DGRAM {
        bail!("the socket passed as `{DNS_UDP}` is not a UDP socket");
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
            OUTBOUND | DNS_UDP | DNS_TCP | INBOUND | METRICS => {
                out.insert(name, owned);
            }
            other => bail!(
                "systemd passed a socket named `{other}`; name them with FileDescriptorName= \
                 outbound, dns-udp, dns-tcp, inbound or metrics"
            ),
        }
    }
    Ok(out)
}
