//! Connections the agent itself opens to service instances on this host. They carry the
//! agent's socket mark (`--dns-mark`), which does two things: the port-53 hooks skip marked
//! sockets (an instance listening on port 53 is dialled, not turned back into the agent's own
//! DNS responder when the agent runs inside the redirected cgroup), and sock_ops recognises the
//! agent's end of an agent -> instance connection, which then joins the sk_msg bypass.
//!
//! The mark is one process-wide value fixed at start (`set_mark`), read by every place that
//! dials an instance (the HTTP pool, opaque TCP, tunnels from other hosts, health checks);
//! a global avoids threading it through each of their constructors.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

static MARK: AtomicU32 = AtomicU32::new(0);

/// Told of every connection made here (local address, instance), so the redirect can take a
/// one-sided socket back out of the sk_msg bypass (`Redirector::settle_instance_leg`).
type Settle = Box<dyn Fn(SocketAddrV4, SocketAddrV4) + Send + Sync>;
static SETTLE: OnceLock<Settle> = OnceLock::new();

/// Called once at start, when the bypass is on.
pub fn on_connected(settle: Settle) {
    let _ = SETTLE.set(settle);
}

/// Called once at start; 0 leaves sockets unmarked.
pub fn set_mark(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

/// Connects to an instance, with the agent's mark on the socket. A mark the kernel refuses
/// (no CAP_NET_ADMIN) only costs the bypass of this connection, so it is not an error.
///
/// Instances are registered as `127.0.0.1:PORT`; one that listens on `[::1]:PORT` only (many
/// servers bind `localhost`, which may resolve to `::1` first) is reached there when
/// 127.0.0.1 refuses. Refusal on loopback is immediate, so this costs nothing when the
/// instance is down, and the IPv4 error is the one reported.
pub async fn connect(addr: impl Into<SocketAddr>) -> std::io::Result<TcpStream> {
    let addr = addr.into();
    match connect_once(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && is_v4_loopback(&addr) => {
            connect_once(SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port())))
                .await
                .map_err(|_| e)
        }
        other => other,
    }
}

fn is_v4_loopback(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(a) if *a.ip() == std::net::Ipv4Addr::LOCALHOST)
}

async fn connect_once(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let mark = MARK.load(Ordering::Relaxed);
    if mark != 0
        && let Err(e) = SockRef::from(&sock).set_mark(mark)
    {
        tracing::debug!(%addr, "SO_MARK on an instance connection refused: {e}");
    }
    let stream = sock.connect(addr).await?;
    if let (Some(settle), SocketAddr::V4(instance), Ok(SocketAddr::V4(local))) =
        (SETTLE.get(), addr, stream.local_addr())
    {
        settle(local, instance);
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_the_mark_when_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        set_mark(0x4853);
        let stream = connect(addr).await.expect("connect");
        let mark = SockRef::from(&stream).mark().unwrap_or(0);
        // Root (CAP_NET_ADMIN) gets the mark; elsewhere the connection still works.
        if nix::unistd::geteuid().is_root() {
            assert_eq!(mark, 0x4853);
        }
        set_mark(0);
    }

    #[tokio::test]
    async fn an_instance_on_ipv6_loopback_only_is_reached_by_its_ipv4_registration() {
        let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect(SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connect falls back to [::1]");
        assert_eq!(
            stream.peer_addr().unwrap(),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port))
        );
        drop(listener);
        let err = connect(SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
