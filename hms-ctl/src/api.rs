//! The admin API spoken over the agent's Unix socket: one JSON request per line, one JSON
//! response per line. Owns the wire types only; never does I/O.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::spec::{RateLimit, RouteSpec, ServiceSpec};

/// Default admin socket path; `--socket` and `HMS_SOCKET` override it.
pub const DEFAULT_SOCKET: &str = "/run/hms/agent.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Validate and register a spec. `file` is only used to name the source in errors.
    Deploy {
        file: String,
        yaml: String,
    },
    Undeploy {
        name: String,
    },
    List,
    Describe {
        name: String,
    },
    Status,
    /// Add or replace the settings of one path prefix of a service.
    RouteSet {
        service: String,
        route: RouteSpec,
    },
    RouteClear {
        service: String,
        path: String,
    },
    LimitSet {
        service: String,
        limit: RateLimit,
    },
    LimitClear {
        service: String,
    },
    /// From a successor agent (`--takeover`): answered with the listeners' fds.
    Handover,
    /// From the successor once it serves: stop accepting, drain and exit.
    HandoverDone,
    /// Start a successor of this agent (same flags plus `--takeover`) and hand over to it.
    Upgrade,
    /// Make this host the mesh's CA.
    CaInit {
        trust_domain: String,
    },
    /// Add a new root, move every host onto it, then retire the old one.
    CaRotate,
    /// The CA's directory (root keys included) as one JSON document.
    CaBackup,
    /// Make this host the CA from a `CaBackup` document; `force` replaces a CA that is here
    /// (moved aside first).
    CaRestore {
        backup: serde_json::Value,
        #[serde(default)]
        force: bool,
    },
    /// A single-use, expiring token a host joins with (`--join-token-file`); `node` is
    /// required (a token is bound to one new name).
    NodeTokenCreate {
        node: Option<String>,
        ttl_seconds: Option<u64>,
    },
    /// Take a host out of the mesh (CA host).
    NodeRemove {
        node: String,
    },
    /// Set the hosts that may run a service (CA host).
    Place {
        service: String,
        hosts: Vec<String>,
    },
    /// Validate a gateway spec and keep it in the registry (replacing one of that name);
    /// every gateway host serves it. `file` only names the source in errors.
    GatewayApply {
        file: String,
        yaml: String,
    },
    GatewayList,
    GatewayDescribe {
        name: String,
    },
    GatewayDelete {
        name: String,
    },
    /// Traffic to and from a service: the `last` recorded events, then (with `follow`) live
    /// ones. Answered by a stream of [`TapMessage`] lines instead of one [`Response`].
    Tap {
        filter: TapFilter,
        last: Option<usize>,
        follow: bool,
    },
}

/// Which events a tap wants.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TapFilter {
    /// Events where this service is the caller or the callee.
    pub service: String,
    /// Only calls from `service` to this one.
    #[serde(default)]
    pub to: Option<String>,
    /// Only calls from this one to `service`.
    #[serde(default)]
    pub from: Option<String>,
    /// `2xx`, `4xx`, `5xx` or an exact code like `503`.
    #[serde(default)]
    pub status: Option<String>,
}

impl TapFilter {
    pub fn matches(&self, e: &TapEvent) -> bool {
        let involved = e.callee == self.service || e.caller == self.service;
        let to_ok = self
            .to
            .as_ref()
            .is_none_or(|to| e.caller == self.service && &e.callee == to);
        let from_ok = self
            .from
            .as_ref()
            .is_none_or(|from| e.callee == self.service && &e.caller == from);
        let status_ok = match (&self.status, e.status) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(class), Some(code)) => match class.as_bytes() {
                [d, b'x', b'x'] => u16::from(d - b'0') == code / 100,
                _ => class.parse::<u16>() == Ok(code),
            },
        };
        involved && to_ok && from_ok && status_ok
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TapKind {
    /// One HTTP request and its response.
    Http,
    /// One TCP connection (raw TCP, or the connection that carried HTTP requests).
    Tcp,
}

/// One line of a tap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TapEvent {
    /// When it ended, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    pub kind: TapKind,
    /// The calling service, or `host` for a process in no service's cgroup.
    pub caller: String,
    /// The calling process, `comm[pid]`.
    pub caller_process: String,
    pub callee: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// HTTP: request start to the end of the response. TCP: connection lifetime.
    pub latency_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    #[serde(default)]
    pub retries: u32,
    /// The instance that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The mesh's own decision, when it answered (`timeout`, `denied`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_error: Option<String>,
    /// Request headers (sensitive ones redacted); shown only when asked for by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// TCP: smoothed round-trip time from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
    /// TCP: connect() to established.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<f64>,
    /// Gateway requests: the outside client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Gateway requests: who the door found the client to be (`api-key:ops`, `jwt:alice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// One line of a tap stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum TapMessage {
    Event(Box<TapEvent>),
    /// This subscriber was too slow and missed `count` events (traffic never waits for it).
    Lost {
        count: u64,
    },
    /// No more events (after `last` without `follow`).
    End,
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}

/// One instance of a service: where it listens and on which host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Instance {
    pub node: String,
    pub addr: SocketAddrV4,
}

/// A deployed service as the registry holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceInfo {
    pub spec: ServiceSpec,
    /// The virtual IP that `<name>.svc` resolves to.
    pub vip: Ipv4Addr,
    pub instances: Vec<Instance>,
}

/// A host in the mesh as the registry holds it. With the etcd registry the record lives under
/// the host's lease: it exists exactly while the host's agent is alive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Where other hosts reach this host's inbound mTLS listener (cross-host tunnels).
    pub inbound: SocketAddr,
    /// When the record was last written (registration, re-registration after a lost
    /// lease), milliseconds since the Unix epoch.
    pub last_seen_unix_ms: u64,
    /// When this host's workload certificate expires, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expiry_unix_ms: Option<u64>,
}

/// How the registry backend is doing, for `hms-ctl status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryHealth {
    /// `embedded` or `etcd`.
    pub backend: String,
    /// False while the agent cannot reach the registry and serves its last known state.
    pub connected: bool,
    /// The most recent failure talking to the registry, kept after recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The registry revision the served state reflects (etcd's revision; the embedded
    /// store counts its own changes).
    pub revision: u64,
}

/// `describe`: the service plus what the proxy knows about each instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceDetail {
    #[serde(flatten)]
    pub service: ServiceInfo,
    /// The cgroup directory its instances run in (`cgroup:` resolved, or the default
    /// `<agent cgroup>/<name>`); `hms-ctl run` starts commands there.
    pub cgroup_dir: String,
    /// Empty until the proxy has sent the service HTTP traffic.
    #[serde(default)]
    pub health: Vec<InstanceHealth>,
}

/// Circuit-breaker view of one instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceHealth {
    pub addr: SocketAddrV4,
    /// `closed` (healthy), `open` (ejected) or `half_open` (one probe in flight).
    pub state: String,
    pub consecutive_failures: u32,
    /// Time left in the current ejection.
    pub ejected_for_ms: Option<u64>,
    pub ejections_total: u64,
    /// `passing` or `failing` for services with `health:`; None before the first check.
    #[serde(default)]
    pub health_check: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeployResult {
    pub service: ServiceInfo,
    /// True when the spec replaced an earlier one of the same name.
    pub replaced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub registry: String,
    pub state_dir: String,
    pub services: usize,
    pub listeners: Listeners,
    /// Where the listeners came from: `bound`, `systemd` or `hand-over`.
    #[serde(default)]
    pub listeners_from: String,
    pub redirect: RedirectInfo,
    pub dns: DnsCounters,
    pub proxy: ProxyCounters,
    pub http: HttpCounters,
    /// This host's mesh identity.
    #[serde(default)]
    pub identity: IdentityInfo,
    /// The registry backend's view of itself.
    #[serde(default)]
    pub registry_health: Option<RegistryHealth>,
    /// Other hosts of the mesh.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// Kernel flow records the ring buffer had no room for (TCP taps and flow metrics miss
    /// them).
    pub ringbuf_records_lost: u64,
    /// The fd limit and the listeners' connection caps.
    #[serde(default)]
    pub limits: Option<LimitsInfo>,
    /// The sk_msg bypass between apps and the proxy.
    #[serde(default)]
    pub sk_msg: SkMsgInfo,
    /// Tap events live subscribers missed because they read too slowly.
    pub tap_events_lost: u64,
    /// Egress: whether undeclared outside connects are refused, and how many were.
    #[serde(default)]
    pub egress: EgressInfo,
}

/// The host's egress setting (`--refuse-undeclared-egress`), for `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EgressInfo {
    pub refuse_undeclared: bool,
    /// Connects the kernel refused (EPERM) as undeclared egress since its maps were made.
    pub refused_total: u64,
}

/// The agent's fd limit and what each listener may hold, for `status` (`limits`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LimitsInfo {
    pub fd_limit: u64,
    pub listeners: Vec<ListenerLimit>,
    pub dns_forward_capacity: u64,
    pub dns_forwards_dropped: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ListenerLimit {
    pub listener: String,
    pub cap: u64,
    pub open: u64,
    /// Idle connections closed to admit new ones.
    pub shed: u64,
    /// New connections closed at once (every open one busy).
    pub refused: u64,
    /// New connections closed because their user already held its share of the cap.
    #[serde(default)]
    pub refused_user_share: u64,
}

/// HTTP requests through the proxy since the agent started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpCounters {
    pub requests: u64,
    pub retries: u64,
    pub denied: u64,
    pub rate_limited: u64,
    pub timeouts: u64,
    pub mesh_errors: u64,
    /// Malformed or oversized request heads, and clients too slow to send one.
    #[serde(default)]
    pub bad_requests: u64,
    /// Attempts an instance did not process (connection rotation), sent again.
    #[serde(default)]
    pub unprocessed: u64,
    /// Tunnel streams from other hosts refused because the claimed caller service is not
    /// placed on the sending host.
    #[serde(default)]
    pub inbound_caller_not_placed: u64,
    /// Tunnel streams from other hosts to a port that is not one of this host's instances.
    #[serde(default)]
    pub inbound_not_own_instance: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IdentityInfo {
    pub spiffe_id: Option<String>,
    pub cert_not_after_unix: Option<u64>,
    pub holds_ca: bool,
    pub trust_bundle_roots: usize,
    /// What the host still needs before it can talk to other hosts.
    pub waiting_for: Option<String>,
    /// `sha256:<hex>` of each root this host trusts.
    #[serde(default)]
    pub root_fingerprints: Vec<String>,
    /// Distinct trust bundles from the registry this host refused (a root no trusted root
    /// vouched for) since it started.
    #[serde(default)]
    pub trust_bundle_refused_total: u64,
    /// Set when the mesh's trust bundle no longer trusts this host's certificate: why, and
    /// what to do (re-join).
    #[serde(default)]
    pub trust_problem: Option<String>,
}

/// Another host as this one sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub inbound: SocketAddr,
    pub last_seen_unix_ms: u64,
    pub cert_expiry_unix_ms: Option<u64>,
    /// `connected`, `idle` (no tunnel yet) or the last error.
    pub tunnel: String,
}

/// DNS answers given since the agent started, by kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsCounters {
    pub vip: u64,
    pub nodata: u64,
    pub nxdomain: u64,
    pub formerr: u64,
    pub forwarded: u64,
    pub servfail: u64,
    pub dropped: u64,
}

/// Outbound connections since the agent started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxyCounters {
    pub accepted: u64,
    pub proxied: u64,
    pub refused: u64,
    pub active: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Listeners {
    pub outbound: String,
    pub dns: String,
    pub admin_socket: String,
}

/// The sk_msg/sockhash bypass: whether it is on and what it carried since the maps were made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkMsgInfo {
    pub enabled: bool,
    /// Whether the agent runs inside the redirected cgroup. The proxy's end of a connection
    /// joins the bypass only then; otherwise every send is `passed` to TCP.
    pub agent_in_cgroup: bool,
    /// Sends moved straight into the peer socket.
    pub redirected: u64,
    pub redirected_bytes: u64,
    /// Sends whose peer socket was not in the bypass, carried by TCP.
    pub passed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RedirectInfo {
    pub cgroup: String,
    pub pin_dir: String,
    pub vip_cidr: String,
    /// The IPv6 VIP range (`prefix/96`) when IPv6 callers are served; `None` with IPv6 off
    /// or disabled on the host (then only IPv4 and IPv4-mapped callers are).
    #[serde(default)]
    pub vip6_range: Option<String>,
    /// True when this agent took over programs pinned by an earlier run.
    pub adopted: bool,
    pub programs: Vec<String>,
    /// The layout version of this agent's kernel programs and maps; its pin set is
    /// `pin_dir/layout-<version>`.
    #[serde(default)]
    pub layout: String,
    #[serde(default)]
    pub pin_set: String,
    /// Pin sets of other layouts (an upgrade across a layout change) found at start; retired
    /// (detached, then unpinned) once this agent serves.
    #[serde(default)]
    pub older_sets: Vec<String>,
}

/// A gateway as `hms-ctl gateway list/describe` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GatewayInfo {
    pub spec: crate::gateway::GatewaySpec,
    /// The YAML as applied.
    pub yaml: String,
    /// Whether this host serves it (`--gateway`), and what its listeners are doing here.
    pub served_here: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<GatewayListenerState>,
}

/// One listener of a gateway on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GatewayListenerState {
    pub name: String,
    pub address: String,
    /// `serving`, or why not (a port taken, a certificate that does not load).
    pub state: String,
    /// https: the host names its certificates cover, with each one's expiry (unix seconds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<String>,
}
