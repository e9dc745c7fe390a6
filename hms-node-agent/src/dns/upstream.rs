//! Forwarding a query, unchanged, to the resolver the caller asked. Every socket here carries
//! the agent's `SO_MARK`, which the port-53 hooks skip, so the agent's own queries are never
//! captured and sent back to itself.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use hickory_proto::op::Message;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::timeout;

/// Total time a forwarded query may take (glibc's own default timeout is 5 s).
const QUERY_TIMEOUT: Duration = Duration::from_secs(4);
/// UDP is lossy: ask again once if nothing came back by then.
const UDP_RESEND_AFTER: Duration = Duration::from_millis(1000);
const MAX_MESSAGE: usize = 65535;

#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub mark: u32,
}

impl Upstream {
    /// Over UDP; if the answer is truncated, asks again over TCP and returns the full answer
    /// when it fits the caller's UDP size, else the truncated one (the caller then retries
    /// over TCP, which we forward too).
    pub async fn forward_udp(
        &self,
        server: SocketAddr,
        query: &[u8],
        caller_max_udp: usize,
    ) -> anyhow::Result<Vec<u8>> {
        let reply = self.udp_exchange(server, query).await?;
        let truncated = Message::from_vec(&reply)
            .map(|m| m.truncated())
            .unwrap_or(false);
        if truncated {
            match self.forward_tcp(server, query).await {
                Ok(full) if full.len() <= caller_max_udp => return Ok(full),
                Ok(_) => {}
                Err(e) => tracing::debug!(%server, "TCP retry after truncation failed: {e:#}"),
            }
        }
        Ok(reply)
    }

    async fn udp_exchange(&self, server: SocketAddr, query: &[u8]) -> anyhow::Result<Vec<u8>> {
        if query.len() < 2 {
            bail!("query too short to carry an id");
        }
        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
            SocketAddr::V6(_) => "[::]:0".parse()?,
        };
        let sock = UdpSocket::bind(bind)
            .await
            .context("binding upstream UDP socket")?;
        self.mark_socket(SockRef::from(&sock))?;
        sock.connect(server)
            .await
            .with_context(|| format!("connecting to resolver {server}"))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let work = async {
            sock.send(query).await?;
            let mut resent = false;
            loop {
                let wait = if resent {
                    QUERY_TIMEOUT
                } else {
                    UDP_RESEND_AFTER
                };
                match timeout(wait, sock.recv(&mut buf)).await {
                    Ok(Ok(n)) if n >= 2 && buf[..2] == query[..2] => return Ok(n),
                    // A stray or late datagram with another id: keep waiting.
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Err(e),
                    Err(_) if !resent => {
                        resent = true;
                        sock.send(query).await?;
                    }
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no answer",
                        ));
                    }
                }
            }
        };
        let n = timeout(QUERY_TIMEOUT, work)
            .await
            .map_err(|_| anyhow::anyhow!("resolver {server} did not answer in time"))?
            .with_context(|| format!("asking resolver {server} over UDP"))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// One query over TCP (two-byte length prefix, RFC 1035 4.2.2).
    pub async fn forward_tcp(&self, server: SocketAddr, query: &[u8]) -> anyhow::Result<Vec<u8>> {
        let work = async {
            let sock = match server {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }?;
            self.mark_socket(SockRef::from(&sock))
                .map_err(std::io::Error::other)?;
            let mut stream: TcpStream = sock.connect(server).await?;
            let len = u16::try_from(query.len())
                .map_err(|_| std::io::Error::other("query larger than 64 KiB"))?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(query);
            stream.write_all(&framed).await?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        timeout(QUERY_TIMEOUT, work)
            .await
            .map_err(|_| anyhow::anyhow!("resolver {server} did not answer over TCP in time"))?
            .with_context(|| format!("asking resolver {server} over TCP"))
    }

    fn mark_socket(&self, sock: SockRef<'_>) -> anyhow::Result<()> {
        if self.mark != 0 {
            sock.set_mark(self.mark)
                .context("setting SO_MARK on an upstream DNS socket (needs CAP_NET_ADMIN)")?;
        }
        Ok(())
    }
}

/// The first `nameserver` in resolv.conf: where queries go when the caller's original resolver
/// is unknown (its redirect record aged out of the LRU map).
pub fn system_resolver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_first_nameserver() {
        let conf = "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            system_resolver(conf),
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(system_resolver("search x\n"), None);
    }
}
