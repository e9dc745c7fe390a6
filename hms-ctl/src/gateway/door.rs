//! What a gateway route asks of a caller at the door: authentication (API key, JWT, client
//! certificate), per-client rate limits, CORS and a maximum body size. Owns the YAML shape of
//! those fields and their validation; the agent's `gateway::door` enforces them.

use serde::{Deserialize, Serialize};

/// One named authenticator (skeleton: the door engineer fills in each kind's fields).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthenticatorSpec {
    ApiKey {},
    Jwt {},
    ClientCert {},
}

/// The door's fields of a route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteDoorSpec {
    /// The name of an authenticator in the spec's `authenticators`; none: anyone may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}
