//! The destination side of cross-host calls: what this host's agent decides when another
//! host's agent opens a tunnel stream to one of its services. The caller's identity comes
//! from the sending agent, believed because its node certificate was verified; policy and
//! rate limits of the service are applied here, where the service lives, and the answer is
//! carried back so the caller gets the same 403/429 and `x-hms-error` as on one host.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::registry::Store;
use crate::resilience::policy::{self, Caller};
use crate::resilience::rate_limit::Decision;
use crate::tunnel::{InboundFlow, InboundPolicy, InboundRequest, Refusal};

use super::http::HttpProxy;

pub struct MeshInbound {
    pub store: Arc<dyn Store>,
    pub http: Arc<HttpProxy>,
}

impl InboundPolicy for MeshInbound {
    async fn authorize(&self, request: &InboundRequest) -> Result<SocketAddr, Refusal> {
        let snapshot = self.store.snapshot();
        let Some(svc) = snapshot.service(&request.target.service) else {
            return Err(Refusal::NO_ENDPOINT);
        };
        let port = request.target.port;
        if port != svc.spec.port && !svc.spec.replicas.contains(&port) {
            return Err(Refusal::NO_ENDPOINT);
        }
        let caller = if request.caller == "host" {
            Caller::Host
        } else {
            Caller::service(&request.caller)
        };
        if !policy::allows(&svc.spec.policy, &caller) {
            tracing::warn!(
                service = %svc.spec.name, %caller, peer = %request.peer_node,
                "refused a call from another host: denied by policy"
            );
            return Err(Refusal::DENIED);
        }
        let state = self.http.states.get(svc, &snapshot);
        if let Some(limiter) = &state.limiter {
            match limiter.check(Instant::now()) {
                Decision::Allow => {}
                Decision::Wait(d) => tokio::time::sleep(d).await,
                Decision::Reject { retry_after } => return Err(Refusal::rate_limited(retry_after)),
            }
        }
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    fn peer_allowed(&self, peer: &crate::identity::SpiffeId) -> bool {
        peer.node_name()
            .is_some_and(|n| self.store.snapshot().is_member(n))
    }

    fn on_flow(&self, flow: &InboundFlow) {
        tracing::debug!(
            peer = %flow.request.peer_node, caller = %flow.request.caller,
            service = %flow.request.target.service, outcome = ?flow.outcome,
            duration_ms = flow.duration.as_millis() as u64, "inbound tunnel stream ended"
        );
    }
}
