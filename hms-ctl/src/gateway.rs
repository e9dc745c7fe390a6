//! The gateway spec: what `hms-ctl gateway apply FILE` takes (listeners, routes, the
//! authenticators routes name), kept in the registry so every gateway host serves the same
//! routes. Owns parsing and validation; never touches the registry or a socket.
//!
//! Shaped on Gateway API's `Gateway` + `HTTPRoute`. What a route asks of callers at the door
//! (authentication, per-client rate limits, CORS, body size) is [`door`]'s.

pub mod door;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A validated gateway spec (skeleton: the gateway engineer fills in listeners and matches).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub name: String,
    /// Named authenticators; a route picks one with `auth: NAME`.
    #[serde(default)]
    pub authenticators: BTreeMap<String, door::AuthenticatorSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

/// One route (skeleton: matches, filters and backends are the gateway engineer's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    /// What the door asks of callers on this route: `auth`, `rate_limit`, `cors`, `max_body`.
    #[serde(flatten)]
    pub door: door::RouteDoorSpec,
}
