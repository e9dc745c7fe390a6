//! The gateway's own counters in `/metrics` (`hms_gateway_*`). Requests it sends to a backend
//! are also counted by the mesh's HTTP path as caller `gateway` (`hms_requests_total`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub gateway: String,
    pub listener: String,
    /// The route's name; `-` when none matched.
    pub route: String,
    pub status_class: String,
    /// `<method>:<name>` of the door's subject; empty for anonymous requests.
    pub subject: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub gateway: String,
    pub listener: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    /// TLS handshakes that failed: `unknown-sni`, `protocol-version`, `timeout`, `other`.
    pub handshake_failures: Family<ListenerLabels, Counter>,
    /// Certificate files that changed but did not load (the last good one is kept).
    pub certificate_reload_failures: Family<ListenerLabels, Counter>,
    /// Connections ended by a malformed or oversized request head (400/431) or a slow one.
    pub bad_requests: Family<ListenerLabels, Counter>,
}

impl GatewayMetrics {
    pub fn registered(metrics: &Metrics) -> GatewayMetrics {
        let m = GatewayMetrics::default();
        metrics.register(
            "gateway_requests",
            "Requests the gateway answered, by gateway, listener, route, status class and authenticated subject",
            m.requests.clone(),
        );
        metrics.register(
            "gateway_tls_handshake_failures",
            "TLS handshakes the gateway's https listeners refused or lost",
            m.handshake_failures.clone(),
        );
        metrics.register(
            "gateway_certificate_reload_failures",
            "Certificate files that changed but did not load; the listener keeps its last good certificate",
            m.certificate_reload_failures.clone(),
        );
        metrics.register(
            "gateway_bad_requests",
            "Gateway connections ended by a malformed, oversized (431) or too slow request head",
            m.bad_requests.clone(),
        );
        m
    }
}
