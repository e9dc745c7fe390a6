//! The HMS node agent as a library: the binary in `main.rs` is a thin CLI over these modules,
//! and `vm-tests` drives them directly. One module per concern:
//!
//! | module | owns |
//! | --- | --- |
//! | `config` | flags, config file, defaults |
//! | `cgroup` | finding the cgroup v2 hierarchy |
//! | `redirect` | loading, attaching, pinning and reading the eBPF programs |
//! | `registry` | services, VIPs, instances (the `Store` trait and its backends) |
//! | `dns` | the `*.svc` responder and the upstream forwarder |
//! | `proxy` | the outbound listener and the connection splice |
//! | `tap` | the tap hub: recent events per service and lossy live subscribers |
//! | `metrics` | Prometheus metrics on `--metrics` |
//! | `admin` | the Unix-socket API hms-ctl talks to |
//! | `listeners` | where listeners come from: hand-over, systemd socket activation, or bind |
//! | `handover` | upgrading without closing a listener: fd passing between agents |
//! | `mesh_identity` | this host's certificate and the CA exchange through the registry |
//! | `mesh_node` | this host's record in a multi-host registry |
//! | `drain` | graceful shutdown of listeners and in-flight work |
//! | `identity` | the mesh CA, join tokens, node certificates (SPIFFE IDs), mTLS configs for :15008 |
//! | `gateway` | the door to the outside: gateway listeners, routes, and the checks at the door |
//! | `tunnel` | cross-host transport: the :15008 inbound listener and the pool of HTTP/2 CONNECT-over-mTLS connections to peer agents |
//! | `resilience` | per-request policies: balancing, circuit breaking, retries, rate limits, trace ids, access policy |
//! | `original_dst` | the interface the data path uses to ask where a caller wanted to go |
//! | `own_socket` | the agent's own (marked) connections to instances on this host |
//! | `agent` | starting and stopping all of the above |
//! | `probe` | kernel feature checks at start and `hms-node-agent probe` |
//! | `install` | `install`/`uninstall`: binaries, /etc/hms/agent.yaml, systemd units; the package's units and conffile |
//! | `service_manager` | systemd's notify protocol (READY=1, STATUS=) and `systemctl reload` (SIGHUP re-reads the config) |

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod config;
pub mod dns;
pub mod drain;
pub mod flow_feed;
pub mod gateway;
pub mod handover;
pub mod identity;
pub mod init_mesh;
pub mod install;
pub mod join;
pub mod limits;
pub mod listeners;
pub mod mesh_identity;
pub mod mesh_node;
pub mod metrics;
pub mod metrics_state;
pub mod original_dst;
pub mod own_socket;
pub mod probe;
pub mod proxy;
pub mod redirect;
pub mod registry;
pub mod resilience;
pub mod service_manager;
pub mod tap;
pub mod tunnel;
