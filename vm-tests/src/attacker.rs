//! The attacker of the zero-trust tests: root on one host of the mesh. It holds that host's
//! node key and certificate (read from the agent's state dir) and opens its own mTLS
//! HTTP/2 connection to another host's `:15008` with whatever CONNECT headers it likes.
//! It plays the attacker, not the system under test: it verifies no server certificate
//! and sends what a compromised host could send.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hms_node_agent::identity::testing::AcceptAnyServer;

/// Every network step is bounded by this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the destination answered one CONNECT with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `x-hms-error`, empty if absent.
    pub error: String,
    /// The refusal's body, or after a 200 whatever the stream carried back.
    pub body: String,
}

pub struct Attacker {
    config: Arc<ClientConfig>,
}

impl Attacker {
    /// Takes the node key and certificate of the agent whose state dir this is.
    pub fn with_keys_of(state_dir: &Path) -> Attacker {
        let dir = state_dir.join("identity");
        let read = |f: &str| {
            std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("node.pem"))
            .collect::<Result<_, _>>()
            .expect("node.pem");
        let key = PrivateKeyDer::from_pem_slice(&read("node.key")).expect("node.key");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
                .with_client_auth_cert(chain, key)
                .expect("the node's own key and certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = false;
        Attacker {
            config: Arc::new(config),
        }
    }

    /// One CONNECT `authority` with `headers`, from network namespace `netns`, to `peer`.
    /// After a 200 it writes `payload`, half-closes and reads what comes back until the
    /// stream ends.
    pub fn connect(
        &self,
        netns: &str,
        peer: SocketAddr,
        authority: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> Result<Answer, String> {
        let config = self.config.clone();
        crate::mesh::in_netns(netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::time::timeout(
                    IO_TIMEOUT,
                    connect(config, peer, authority, headers, payload),
                )
                .await
                .map_err(|_| format!("no answer within {IO_TIMEOUT:?}"))?
            })
        })
    }
}

async fn connect(
    config: Arc<ClientConfig>,
    peer: SocketAddr,
    authority: &str,
    headers: &[(&str, &str)],
    payload: &[u8],
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(peer)
        .await
        .map_err(|e| format!("TCP connect {peer}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("hms-peer.invalid").unwrap(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(Method::CONNECT).uri(authority);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("CONNECT: {e}"))?;
    let status = resp.status().as_u16();
    let error = resp
        .headers()
        .get("x-hms-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if status != 200 {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Ok(Answer {
            status,
            error,
            body,
        });
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    let mut io = TokioIo::new(upgraded);
    io.write_all(payload)
        .await
        .map_err(|e| format!("writing the payload: {e}"))?;
    io.shutdown()
        .await
        .map_err(|e| format!("half-close: {e}"))?;
    let mut back = Vec::new();
    // A cut stream ends with an error after whatever arrived; that is an answer too.
    let _ = io.read_to_end(&mut back).await;
    Ok(Answer {
        status,
        error,
        body: String::from_utf8_lossy(&back).into_owned(),
    })
}
