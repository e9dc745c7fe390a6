//! The door's counters on `/metrics`: refusals by route and reason, admissions by route and
//! method, and each JWKS load's outcome (a failing issuer shows here while the last good keys
//! keep working). Owns the series; registered into the agent's registry as one collector so
//! the shared `Metrics` struct needs no door fields.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReason {
    pub route: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteMethod {
    pub route: String,
    /// `none`, `api-key`, `jwt` or `client-cert`.
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksLoad {
    pub authenticator: String,
    /// `ok` or `failed`.
    pub result: String,
}

#[derive(Debug, Default)]
pub struct DoorMetrics {
    pub refused: Family<RouteReason, Counter>,
    pub admitted: Family<RouteMethod, Counter>,
    pub jwks_loads: Family<JwksLoad, Counter>,
}

impl DoorMetrics {
    pub fn refused(&self, route: &str, reason: &str) {
        self.refused
            .get_or_create(&RouteReason {
                route: route.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn admitted(&self, route: &str, method: &str) {
        self.admitted
            .get_or_create(&RouteMethod {
                route: route.into(),
                method: method.into(),
            })
            .inc();
    }

    pub fn jwks_load(&self, authenticator: &str, ok: bool) {
        self.jwks_loads
            .get_or_create(&JwksLoad {
                authenticator: authenticator.into(),
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Loads of `authenticator`'s JWKS that ended `ok` or not.
    pub fn jwks_load_count(&self, authenticator: &str, ok: bool) -> u64 {
        self.jwks_loads
            .get_or_create(&JwksLoad {
                authenticator: authenticator.into(),
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .get()
    }
}

/// Hands the agent's registry a view of the shared counters (`hms_gateway_door_*`).
#[derive(Debug)]
pub struct DoorCollector(pub std::sync::Arc<DoorMetrics>);

impl Collector for DoorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let e = encoder.encode_descriptor(
            "gateway_door_refused",
            "Requests the gateway's door refused, by route and reason (x-hms-error)",
            None,
            m.refused.metric_type(),
        )?;
        m.refused.encode(e)?;
        let e = encoder.encode_descriptor(
            "gateway_door_admitted",
            "Requests the gateway's door let in, by route and authentication method",
            None,
            m.admitted.metric_type(),
        )?;
        m.admitted.encode(e)?;
        let e = encoder.encode_descriptor(
            "gateway_jwks_loads",
            "Loads of a JWT authenticator's key set, by outcome; a failed one keeps the last good keys",
            None,
            m.jwks_loads.metric_type(),
        )?;
        m.jwks_loads.encode(e)?;
        Ok(())
    }
}
