//! A real hyper HTTP/2 (h2c) backend that can shut down gracefully, the way a hyper or tonic
//! service does on SIGTERM: stop accepting, send GOAWAY on every connection (hyper's
//! `graceful_shutdown`: a GOAWAY with the maximum stream id, a PING, then a GOAWAY with the
//! last stream it will serve), finish the streams it took and close. It runs on a runtime of
//! its own in its own thread, apart from the code under test (the agent is another process).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;

pub struct GracefulH2Backend {
    pub addr: SocketAddrV4,
    served: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GracefulH2Backend {
    /// Listens on a loopback port; answers every request (after reading its body) with
    /// `200 <name>`.
    pub fn start(name: &str) -> anyhow::Result<GracefulH2Backend> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => anyhow::bail!("bound IPv4, got {other}"),
        };
        let served = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("backend runtime")?;
        let counter = served.clone();
        let name: Bytes = format!("{name}\n").into();
        let thread = std::thread::spawn(move || {
            runtime.block_on(serve(listener, name, counter, rx));
        });
        Ok(GracefulH2Backend {
            addr,
            served,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops listening, sends GOAWAY on every connection and returns once they have all
    /// finished the streams they took (at most 10 s).
    pub fn shutdown_gracefully(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GracefulH2Backend {
    fn drop(&mut self) {
        self.shutdown_gracefully();
    }
}

async fn serve(
    listener: std::net::TcpListener,
    name: Bytes,
    served: Arc<AtomicU64>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let graceful = GracefulShutdown::new();
    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let name = name.clone();
                let served = served.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    let served = served.clone();
                    async move {
                        // Read the whole body first, as an application would.
                        let _ = req.into_body().collect().await;
                        served.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(name)))
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
