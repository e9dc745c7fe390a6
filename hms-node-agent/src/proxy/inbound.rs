//! The destination side of cross-host calls: what this host's agent decides when another
//! host's agent opens a tunnel stream to one of its services.
//!
//! The caller comes from what the peer proved, not from the header alone: the peer's node
//! certificate names its host, and a claim `x-hms-caller: <service>` from that host is
//! believed only if the operator placed the service there (`Snapshot::placed_on`, filled
//! from the registry's `placement/<service>` records; no record: nobody may speak for the
//! service); `host` is a claim any member may make. The target must be one of THIS host's
//! own instance records of the service (the global spec's ports are not enough: that would
//! let any node reach any loopback port some spec names). Then the service's policy, and its rate
//! limit: per stream for opaque TCP, per request for streams declared HTTP (served by
//! `inbound_http`). Answers are carried back so the caller gets the same 403/429 and
//! `x-hms-error` as on one host. Never relays anywhere but a loopback instance of its own.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::metrics::ReasonLabels;
use crate::registry::Store;
use crate::resilience::policy::{self, Caller};
use crate::resilience::rate_limit::Decision;
use crate::tunnel::{
    H2Stream, HOST_CALLER, InboundFlow, InboundPolicy, InboundRequest, Refusal, StreamProtocol,
};

use super::http::HttpProxy;

pub struct MeshInbound {
    pub store: Arc<dyn Store>,
    pub http: Arc<HttpProxy>,
    /// This host's node name: the instance records that are ours carry it.
    pub node: String,
}

impl MeshInbound {
    fn refused(&self, reason: &'static str) {
        let counter = match reason {
            "caller-not-placed" => &self.http.stats.inbound_caller_not_placed,
            _ => &self.http.stats.inbound_not_own_instance,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.http
            .metrics
            .inbound_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}

impl InboundPolicy for MeshInbound {
    async fn authorize(&self, request: &InboundRequest) -> Result<SocketAddr, Refusal> {
        let snapshot = self.store.snapshot();
        let peer = request.peer_node.node_name().unwrap_or("");
        let Some(svc) = snapshot.service(&request.target.service) else {
            return Err(Refusal::NO_ENDPOINT);
        };
        let port = request.target.port;
        let ours = svc
            .instances
            .iter()
            .any(|i| i.node == self.node && i.addr.port() == port);
        if !ours {
            self.refused("not-own-instance");
            tracing::warn!(
                service = %svc.spec.name, port, %peer, caller = %request.caller,
                "refused a call from another host: port {port} is not one of this host's instances of {}",
                svc.spec.name
            );
            return Err(Refusal::NO_ENDPOINT);
        }
        let caller = if request.caller == HOST_CALLER {
            Caller::Host
        } else {
            if !snapshot.placed_on(&request.caller, peer) {
                self.refused("caller-not-placed");
                tracing::warn!(
                    service = %svc.spec.name, %peer, claim = %request.caller,
                    "refused a call from another host: caller {} is not placed on {peer}",
                    request.caller
                );
                return Err(Refusal::CALLER_NOT_PLACED);
            }
            Caller::service(&request.caller)
        };
        if !policy::allows(&svc.spec.policy, &caller) {
            tracing::warn!(
                service = %svc.spec.name, %caller, %peer,
                "refused a call from another host: denied by policy"
            );
            return Err(Refusal::DENIED);
        }
        // An HTTP stream is limited per request as it is served (`inbound_http`).
        if request.protocol == StreamProtocol::Opaque {
            let state = self.http.states.get(svc, &snapshot);
            if let Some(limiter) = &state.limiter {
                match limiter.check(Instant::now()) {
                    Decision::Allow => {}
                    Decision::Wait(d) => tokio::time::sleep(d).await,
                    Decision::Reject { retry_after } => {
                        return Err(Refusal::rate_limited(retry_after));
                    }
                }
            }
        }
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    async fn relay_http(
        &self,
        request: &InboundRequest,
        downstream: H2Stream,
        upstream: tokio::net::TcpStream,
    ) -> (u64, u64, Option<String>) {
        super::inbound_http::relay(
            self.http.clone(),
            self.store.clone(),
            request,
            downstream,
            upstream,
        )
        .await
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{Ipv4Addr, SocketAddrV4};

    use hms_ctl::api::{DeployResult, Instance, NodeInfo, RegistryHealth, ServiceInfo};
    use hms_ctl::spec::ServiceSpec;
    use tokio::sync::watch;

    use super::*;
    use crate::identity::SpiffeId;
    use crate::registry::Snapshot;
    use crate::tunnel::TunnelTarget;

    /// The registry as one fixed snapshot: the policy only reads it.
    struct Fixed(Arc<Snapshot>);

    impl Store for Fixed {
        fn deploy(&self, _: ServiceSpec, _: &str) -> anyhow::Result<DeployResult> {
            anyhow::bail!("read-only")
        }
        fn update_spec(
            &self,
            _: &str,
            _: &mut dyn FnMut(&mut ServiceSpec) -> anyhow::Result<()>,
        ) -> anyhow::Result<ServiceInfo> {
            anyhow::bail!("read-only")
        }
        fn undeploy(&self, _: &str) -> anyhow::Result<bool> {
            anyhow::bail!("read-only")
        }
        fn register_node(&self, _: NodeInfo) -> anyhow::Result<()> {
            anyhow::bail!("read-only")
        }
        fn put_blob(&self, _: &str, _: &[u8]) -> anyhow::Result<()> {
            anyhow::bail!("read-only")
        }
        fn create_blob(&self, _: &str, _: &[u8]) -> anyhow::Result<bool> {
            anyhow::bail!("read-only")
        }
        fn get_blob(&self, _: &str) -> anyhow::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn delete_blob(&self, _: &str) -> anyhow::Result<bool> {
            anyhow::bail!("read-only")
        }
        fn snapshot(&self) -> Arc<Snapshot> {
            self.0.clone()
        }
        fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
            watch::channel(self.0.clone()).1
        }
        fn health(&self) -> RegistryHealth {
            RegistryHealth {
                backend: "fixed".into(),
                connected: true,
                last_error: None,
                revision: 0,
            }
        }
        fn describe(&self) -> String {
            "fixed".into()
        }
    }

    fn service(yaml: &str, instances: &[(&str, u16)]) -> ServiceInfo {
        ServiceInfo {
            spec: hms_ctl::spec::parse(yaml, "t").unwrap(),
            vip: Ipv4Addr::new(127, 77, 0, 1),
            instances: instances
                .iter()
                .map(|(node, port)| Instance {
                    node: node.to_string(),
                    addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, *port),
                })
                .collect(),
        }
    }

    fn inbound(snapshot: Snapshot) -> MeshInbound {
        let store: Arc<dyn Store> = Arc::new(Fixed(Arc::new(snapshot)));
        let http = Arc::new(HttpProxy::new(
            store.clone(),
            crate::cgroup::ServiceCgroups {
                root: "/sys/fs/cgroup".into(),
                hooked: "/sys/fs/cgroup/hms".into(),
            },
            "host-a".into(),
            Arc::new(crate::tap::TapHub::default()),
            Arc::new(crate::metrics::Metrics::new()),
        ));
        MeshInbound {
            store,
            http,
            node: "host-a".into(),
        }
    }

    fn request(peer: &str, caller: &str, port: u16) -> InboundRequest {
        InboundRequest {
            peer_node: SpiffeId::node("mesh.test", peer).unwrap(),
            peer_addr: "10.0.0.3:40000".parse().unwrap(),
            caller: caller.into(),
            target: TunnelTarget::new("ledger", port).unwrap(),
            protocol: StreamProtocol::Http1,
        }
    }

    fn services() -> Vec<ServiceInfo> {
        vec![
            service(
                "name: ledger\nport: 7001\npolicy: {allow_from: [payments]}\n",
                &[("host-a", 7000), ("host-b", 7001)],
            ),
            service("name: payments\nport: 8000\n", &[("host-b", 8000)]),
        ]
    }

    #[tokio::test]
    async fn a_claim_is_believed_only_from_a_host_the_service_is_placed_on() {
        let placement: BTreeMap<String, BTreeSet<String>> = [
            ("payments".to_string(), ["host-b".to_string()].into()),
            (
                "ledger".to_string(),
                ["host-a".to_string(), "host-b".to_string()].into(),
            ),
        ]
        .into();
        let p = inbound(Snapshot::new(services()).with_placement(Arc::new(placement)));
        // host-b runs payments: believed, allowed by ledger's policy.
        assert!(
            p.authorize(&request("host-b", "payments", 7000))
                .await
                .is_ok()
        );
        // host-c claims payments: not placed there.
        assert_eq!(
            p.authorize(&request("host-c", "payments", 7000)).await,
            Err(Refusal::CALLER_NOT_PLACED)
        );
        // `host` is anyone's claim; ledger's policy then refuses it.
        assert_eq!(
            p.authorize(&request("host-c", "host", 7000)).await,
            Err(Refusal::DENIED)
        );
        let c = p.http.stats.counters();
        assert_eq!(c.inbound_caller_not_placed, 1);
        let text = p.http.metrics.render().unwrap();
        assert!(
            text.contains("hms_inbound_refused_total{reason=\"caller-not-placed\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn only_this_host_s_own_instances_are_reachable() {
        let placement: BTreeMap<String, BTreeSet<String>> =
            [("payments".to_string(), ["host-b".to_string()].into())].into();
        let p = inbound(Snapshot::new(services()).with_placement(Arc::new(placement)));
        // 7001 is the spec's port, but host-b's instance, not ours.
        assert_eq!(
            p.authorize(&request("host-b", "payments", 7001)).await,
            Err(Refusal::NO_ENDPOINT)
        );
        assert_eq!(
            p.authorize(&request("host-b", "payments", 7000)).await,
            Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)))
        );
        assert_eq!(p.http.stats.counters().inbound_not_own_instance, 1);
    }

    #[tokio::test]
    async fn without_placement_records_no_host_speaks_for_a_service() {
        let p = inbound(Snapshot::new(services()));
        assert_eq!(
            p.authorize(&request("host-b", "payments", 7000)).await,
            Err(Refusal::CALLER_NOT_PLACED)
        );
        // `host` needs no placement; ledger's policy refuses it.
        assert_eq!(
            p.authorize(&request("host-b", "host", 7000)).await,
            Err(Refusal::DENIED)
        );
    }
}
