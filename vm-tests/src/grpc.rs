//! A real gRPC server for tests: tonic serving the standard `grpc.health.v1.Health` service
//! over h2c on loopback, answering UNAVAILABLE to its first N `Check` calls and SERVING after
//! that, and counting every call so tests assert on what the server saw. It runs on its own
//! tokio runtime in its own thread: nothing is shared with the agent under test (another
//! process anyway). The matching client is the `grpc-probe` binary.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_check_response};

struct FlakyHealth {
    fail_first: usize,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for FlakyHealth {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            return Err(Status::unavailable("warming up"));
        }
        Ok(Response::new(HealthCheckResponse {
            status: health_check_response::ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = tokio_stream::Iter<std::vec::IntoIter<Result<HealthCheckResponse, Status>>>;

    /// Server streaming: `WATCH_MESSAGES` SERVING answers, then the stream ends (tests check
    /// every message of a streamed answer crossed the mesh).
    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let serving = HealthCheckResponse {
            status: health_check_response::ServingStatus::Serving as i32,
        };
        Ok(Response::new(tokio_stream::iter(vec![
            Ok(serving);
            WATCH_MESSAGES
        ])))
    }
}

/// How many messages a `Watch` call streams.
pub const WATCH_MESSAGES: usize = 3;

pub struct GrpcBackend {
    pub addr: SocketAddrV4,
    calls: Arc<AtomicUsize>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl GrpcBackend {
    /// Serves Health on 127.0.0.1 (a free port); the first `fail_first` checks fail with
    /// UNAVAILABLE.
    pub fn start(fail_first: usize) -> anyhow::Result<GrpcBackend> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => anyhow::bail!("bound IPv4, got {other}"),
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let service = HealthServer::new(FlakyHealth {
            fail_first,
            calls: calls.clone(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("tokio runtime for the gRPC backend")?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("gRPC backend: {e}"),
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let served = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = rx.await;
                    })
                    .await;
                if let Err(e) = served {
                    eprintln!("gRPC backend stopped: {e}");
                }
            });
        });
        Ok(GrpcBackend {
            addr,
            calls,
            shutdown: Some(tx),
        })
    }

    /// `Check` calls the server has answered (or is answering).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
