//! demo-svc: one binary, four roles - the seed story's identity, eligibility, payments and
//! notify services. Owns the HTTP/1.1 server, the per-request log line and the shared
//! response helpers; what each role answers lives in `roles.rs`.
//!
//! It knows nothing about the mesh on purpose: it listens on a plain loopback port and calls
//! other services by name (`http://identity-svc.svc/...`) through the system resolver, like
//! any unmodified program would.

mod roles;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use roles::{Role, Services};

/// Request bodies in this story are a few dozen bytes; anything past this is refused.
const MAX_BODY: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "One of the four demo services of the HMS seed story")]
struct Args {
    /// Which service to be.
    #[arg(long, value_enum)]
    role: Role,
    /// Where to listen, e.g. 127.0.0.1:7103.
    #[arg(long)]
    listen: SocketAddr,
    /// payments only: after both checks pass, POST the transfer to this URL (e.g.
    /// http://treasury-api.svc/transfer, an outside system behind the mesh's egress) and put
    /// its receipt id into the answer. Without it, /pay approves without calling out.
    #[arg(long, value_name = "URL")]
    treasury: Option<String>,
}

pub type HttpResponse = Response<Full<Bytes>>;

/// A JSON response with the given status.
pub fn json(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON `{"error": ...}` response; every error says what was wrong with the request.
pub fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    json(status, serde_json::json!({ "error": message.into() }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "binding {}; is another process using that port? pick another with --listen",
            args.listen
        )
    })?;
    let services = Arc::new(Services::new(args.role, args.treasury));
    println!(
        "{} listening on http://{}",
        args.role.service_name(),
        args.listen
    );

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    // Out of fds and similar: keep serving the connections we have.
                    Err(err) => {
                        eprintln!("accept failed: {err}");
                        continue;
                    }
                };
                let services = Arc::clone(&services);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&services), req));
                    if let Err(err) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        eprintln!("connection error: {err}");
                    }
                });
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    println!("{} stopping", args.role.service_name());
    Ok(())
}

/// Reads the body (bounded), lets the role answer, and logs one line per request.
async fn handle(
    services: Arc<Services>,
    req: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let (parts, body) = req.into_parts();
    let (resp, note) = match Limited::new(body, MAX_BODY).collect().await {
        Ok(body) => services.answer(&parts, body.to_bytes()).await,
        Err(err) => (
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("could not read the request body ({err}); send at most {MAX_BODY} bytes"),
            ),
            String::new(),
        ),
    };
    println!(
        "{} {method} {target} -> {} ({} ms){}",
        services.role().service_name(),
        resp.status().as_u16(),
        started.elapsed().as_millis(),
        note
    );
    Ok(resp)
}
