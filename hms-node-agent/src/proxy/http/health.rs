//! Active health checks, for specs that ask for one (`health: /path` or `health: tcp`):
//! every [`CHECK_INTERVAL`] each instance is probed (an HTTP GET expecting 2xx/3xx, or a TCP
//! connect); two failures in a row take it out of rotation, one success brings it back. The
//! proxy's circuit breakers still act on real traffic; checks only add what traffic cannot
//! see (an idle instance that died). Checks run on their own task and never delay requests.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::HttpProxy;
use crate::drain::Drain;

pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Probes every service with a `health:` until drained.
pub async fn run(proxy: Arc<HttpProxy>, drain: Drain) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = drain.signaled() => return,
        }
        let snapshot = proxy.store.snapshot();
        for svc in snapshot.services() {
            let Some(check) = svc.spec.health.clone() else {
                continue;
            };
            let state = proxy.states.get(svc, &snapshot);
            for (i, addr) in state.endpoints.addrs.iter().enumerate() {
                // Each host checks its own instances; others' reach us through breakers.
                if !state.endpoints.is_local(i) {
                    continue;
                }
                let ok = probe(*addr, &check).await;
                if !ok {
                    tracing::debug!(service = %svc.spec.name, %addr, %check, "health check failed");
                }
                let was = state.endpoints.checks[i].passing();
                state.endpoints.checks[i].record(ok);
                if was != state.endpoints.checks[i].passing() {
                    tracing::info!(
                        service = %svc.spec.name, %addr,
                        "health check now {}", if ok { "passing: back in rotation" } else { "failing: out of rotation" }
                    );
                }
            }
        }
    }
}

/// One probe: `tcp` connects; a path sends `GET path` over a fresh HTTP/1.1 connection.
pub async fn probe(addr: SocketAddrV4, check: &str) -> bool {
    let work = async {
        let stream = crate::own_socket::connect(addr).await.ok()?;
        if check == "tcp" {
            return Some(true);
        }
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = Request::get(check)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, "hms-health-check")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        let ok = resp.status().is_success() || resp.status().is_redirection();
        let _ = resp.into_body().collect().await;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, work).await,
        Ok(Some(true))
    )
}
