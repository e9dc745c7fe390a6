//! Copying bytes both ways between a client and an upstream stream. Half-close is preserved: when one side
//! finishes sending, the other side's write half is shut down, and the opposite direction
//! keeps flowing until it finishes too.

use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;

/// Bytes carried in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// `upstream` is a TCP connection to a local instance or a tunnel stream to another host.
pub async fn splice<U>(mut client: TcpStream, mut upstream: U) -> std::io::Result<Transferred>
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Small request/response exchanges should not wait for Nagle.
    let _ = client.set_nodelay(true);
    let (a, b) = copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(Transferred {
        client_to_upstream: a,
        upstream_to_client: b,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn half_close_lets_the_reply_flow() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (baddr, faddr) = (backend.local_addr().unwrap(), front.local_addr().unwrap());
        // Backend: read everything until EOF, then answer with its length.
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            s.write_all(format!("got {}", all.len()).as_bytes())
                .await
                .unwrap();
        });
        let proxy = tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let u = TcpStream::connect(baddr).await.unwrap();
            splice(c, u).await.unwrap()
        });
        let mut c = TcpStream::connect(faddr).await.unwrap();
        c.write_all(&[7u8; 100_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "got 100000");
        let t = proxy.await.unwrap();
        assert_eq!(t.client_to_upstream, 100_000);
        assert_eq!(t.upstream_to_client, 10);
    }
}
