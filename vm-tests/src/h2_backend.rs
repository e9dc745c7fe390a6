//! A real hyper HTTP/2 (h2c) backend that can shut down gracefully, the way a hyper or tonic
//! service does on SIGTERM: stop accepting, send GOAWAY on every connection (hyper's
//! `graceful_shutdown`: a GOAWAY with the maximum stream id, a PING, then a GOAWAY with the
//! last stream it will serve), finish the streams it took and close. Like every hyper server
//! it closes at once, without reading what the client sent after that GOAWAY (frames of the
//! streams it refused): its kernel then resets the connection, which the client must cope
//! with (nginx and Go linger instead; hyper, tonic and axum do not). It runs on a runtime of
//! its own in its own thread, apart from the code under test (the agent is another process).
//!
//! [`GracefulH2Backend::start_holding`] makes one that holds its first requests unanswered
//! until [`GracefulH2Backend::break_connections`] drops every connection at once (no
//! GOAWAY: a crash or a network break as the client sees it); later requests are answered.

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
    received: Arc<AtomicU64>,
    broken: tokio::sync::watch::Sender<u64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GracefulH2Backend {
    /// Listens on a loopback port; answers every request (after reading its body) with
    /// `200 <name>`.
    pub fn start(name: &str) -> anyhow::Result<GracefulH2Backend> {
        Self::start_holding(name, 0)
    }

    /// Like [`GracefulH2Backend::start`], holding the first `hold` requests unanswered.
    pub fn start_holding(name: &str, hold: u64) -> anyhow::Result<GracefulH2Backend> {
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
        let counters = Counters {
            served: served.clone(),
            received: Arc::new(AtomicU64::new(0)),
            hold,
        };
        let received = counters.received.clone();
        let (broken, broken_rx) = tokio::sync::watch::channel(0u64);
        let name: Bytes = format!("{name}\n").into();
        let thread = std::thread::spawn(move || {
            runtime.block_on(serve(listener, name, counters, broken_rx, rx));
        });
        Ok(GracefulH2Backend {
            addr,
            served,
            received,
            broken,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Requests that arrived so far (answered or held).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Drops every open connection at once, without GOAWAY; keeps listening.
    pub fn break_connections(&self) {
        self.broken.send_modify(|generation| *generation += 1);
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

#[derive(Clone)]
struct Counters {
    served: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    hold: u64,
}

async fn serve(
    listener: std::net::TcpListener,
    name: Bytes,
    counters: Counters,
    broken: tokio::sync::watch::Receiver<u64>,
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
                let counters = counters.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    let counters = counters.clone();
                    async move {
                        let n = counters.received.fetch_add(1, Ordering::Relaxed);
                        if n < counters.hold {
                            // Until the connection is dropped.
                            std::future::pending::<()>().await;
                        }
                        // Read the whole body first, as an application would.
                        let _ = req.into_body().collect().await;
                        counters.served.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(name)))
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                let mut broken = broken.clone();
                // Only connections open at the time of a break are dropped by it.
                let born = *broken.borrow();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        // Dropping the connection closes the socket under every stream.
                        _ = broken.wait_for(|g| *g > born) => {}
                    }
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
