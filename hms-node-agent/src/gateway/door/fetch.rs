//! One HTTP GET for a JWKS URL (`http://` or `https://`, TLS 1.3 with the system's roots
//! or a given CA bundle), with a size cap. Owns only that; the caller bounds the time.
//! Never follows redirects: an issuer's key URL that moves is a configuration change.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::header::{ACCEPT, HOST, HeaderValue};
use hyper::http::uri::Scheme;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// Debian's bundle of the system's trusted roots (ca-certificates).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

pub async fn get(url: &str, ca: Option<&Path>, max_bytes: usize) -> anyhow::Result<Vec<u8>> {
    let uri: hyper::Uri = url.parse().context("not a URL")?;
    let https = match uri.scheme() {
        Some(s) if *s == Scheme::HTTPS => true,
        Some(s) if *s == Scheme::HTTP => false,
        _ => bail!("only http:// and https:// URLs"),
    };
    let host = uri.host().context("the URL names no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = Request::get(path)
        .header(
            HOST,
            HeaderValue::from_str(uri.authority().context("no authority")?.as_str())?,
        )
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .body(Empty::<Bytes>::new())?;
    let resp = if https {
        let mut roots = rustls::RootCertStore::empty();
        let pem_path = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
        let pem = std::fs::read(pem_path)
            .with_context(|| format!("cannot read the CA bundle {}", pem_path.display()))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.with_context(|| format!("{} is not PEM", pem_path.display()))?;
            roots.add(cert).ok();
        }
        if roots.is_empty() {
            bail!("{} holds no CA certificate", pem_path.display());
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(bare_host.clone())
            .with_context(|| format!("`{host}` is not a server name"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {host}:{port}"))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    if !resp.status().is_success() {
        bail!("answered {}", resp.status());
    }
    let body = Limited::new(resp.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

async fn send<T>(
    io: TokioIo<T>,
    req: Request<Empty<Bytes>>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}
