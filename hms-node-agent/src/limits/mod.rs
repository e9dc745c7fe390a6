//! What the agent may hold open, so that no local user (nor any host reaching `:15008`) can
//! exhaust its file descriptors and with them every accept loop. Owns the fd limit raise at
//! start, the per-listener connection caps derived from it ([`Caps`]) and the bound on
//! forwarded DNS queries in flight; never decides what a connection does (the listeners
//! do, asking their [`ConnCap`] first).
//!
//! 1. At start the soft `RLIMIT_NOFILE` is raised to the hard one (systemd gives 1024 soft;
//!    the unit sets `LimitNOFILE`), both logged.
//! 2. Every listener gets a cap, a share of that limit kept well below it: the outbound
//!    proxy a fifth (each connection may hold an upstream socket too), `:15008` a tenth
//!    plus a sixty-fourth for TLS handshakes still pending, DNS-over-TCP and forwarded DNS
//!    queries a thirty-second each, metrics, admin and the gateway's listeners (together;
//!    each may hold an upstream socket too) a sixty-fourth each. What is left (about a
//!    quarter) is for upstream connections, the registry, eBPF maps and logs.
//! 3. A listener at its cap sheds its oldest idle connection (an HTTP/1.1 keep-alive
//!    between requests, an HTTP/2 connection without streams, a DNS connection between
//!    queries, a metrics or admin connection waiting for a request) to admit the new one;
//!    with none idle the new connection is closed at once. Both are counted.
//! 4. A forwarded DNS query needs a slot from a bounded pool; without one it is dropped
//!    and counted (the client retries, as it does for a lost datagram).

pub mod cap;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use cap::{ConnCap, ConnSlot, IdleFlag, InFlight, Refused};

/// The fd limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Step 1: soft `RLIMIT_NOFILE` up to the hard limit.
pub fn raise_nofile() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(FdLimit {
        soft_before,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// The soft fd limit now.
pub fn current_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Step 2 and 4: every listener's cap, from one fd limit.
pub struct Caps {
    pub fd_limit: u64,
    pub outbound: Arc<ConnCap>,
    pub inbound: Arc<ConnCap>,
    /// TLS handshakes `:15008` may have pending at once.
    pub inbound_handshakes: usize,
    pub dns_tcp: Arc<ConnCap>,
    pub metrics: Arc<ConnCap>,
    pub admin: Arc<ConnCap>,
    /// Every gateway listener of this host together (outside clients, each held to half).
    pub gateway: Arc<ConnCap>,
    pub dns_forwards: Arc<tokio::sync::Semaphore>,
    pub dns_forward_capacity: usize,
    pub dns_forwards_dropped: AtomicU64,
}

fn share(limit: u64, divisor: u64, min: u64, max: u64) -> usize {
    usize::try_from((limit / divisor).clamp(min, max)).unwrap_or(usize::MAX)
}

impl Caps {
    pub fn for_fd_limit(fd_limit: u64) -> Caps {
        let n = fd_limit;
        let forwards = share(n, 32, 8, 1024);
        Caps {
            fd_limit,
            outbound: ConnCap::new("outbound", share(n, 5, 16, 65536)),
            inbound: ConnCap::new("inbound", share(n, 10, 8, 16384)),
            inbound_handshakes: share(n, 64, 4, 1024),
            dns_tcp: ConnCap::new("dns_tcp", share(n, 32, 4, 4096)),
            metrics: ConnCap::new("metrics", share(n, 64, 4, 64)),
            admin: ConnCap::new("admin", share(n, 64, 4, 64)),
            gateway: ConnCap::new("gateway", share(n, 64, 8, 32768)),
            dns_forwards: Arc::new(tokio::sync::Semaphore::new(forwards)),
            dns_forward_capacity: forwards,
            dns_forwards_dropped: AtomicU64::new(0),
        }
    }

    pub fn listeners(&self) -> [&Arc<ConnCap>; 6] {
        [
            &self.outbound,
            &self.inbound,
            &self.dns_tcp,
            &self.metrics,
            &self.admin,
            &self.gateway,
        ]
    }

    /// For `hms-ctl status`.
    pub fn status(&self) -> hms_ctl::api::LimitsInfo {
        hms_ctl::api::LimitsInfo {
            fd_limit: self.fd_limit,
            listeners: self
                .listeners()
                .iter()
                .map(|c| hms_ctl::api::ListenerLimit {
                    listener: c.name.to_string(),
                    cap: c.max() as u64,
                    open: c.open() as u64,
                    shed: c.shed.load(Ordering::Relaxed),
                    refused: c.refused.load(Ordering::Relaxed),
                    refused_user_share: c.refused_user_share.load(Ordering::Relaxed),
                })
                .collect(),
            dns_forward_capacity: self.dns_forward_capacity as u64,
            dns_forwards_dropped: self.dns_forwards_dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_stay_well_below_the_systemd_default_limit() {
        let c = Caps::for_fd_limit(1024);
        // Outbound connections may each hold an upstream socket, inbound ones too.
        let worst = 2 * c.outbound.max()
            + 2 * c.inbound.max()
            + c.inbound_handshakes
            + c.dns_tcp.max()
            + c.metrics.max()
            + c.admin.max()
            + 2 * c.gateway.max()
            + c.dns_forward_capacity;
        assert!(worst < 1024 * 3 / 4, "{worst} of 1024");
        assert_eq!(c.outbound.max(), 204);
        assert_eq!(c.metrics.max(), 16);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let l = raise_nofile().unwrap();
        assert_eq!(l.soft, l.hard);
        assert!(l.soft >= l.soft_before);
        assert_eq!(current_nofile(), l.soft);
    }
}
