//! Per-service state the HTTP layer keeps between requests: the balancer and one circuit
//! breaker per instance, the retry budget, the rate limiter, and the caller index. Rebuilt
//! only when what it depends on changes (the instance list, the limit, the set of specs), so
//! balancer latencies and breaker ejections survive unrelated registry changes.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hms_ctl::api::ServiceInfo;
use hms_ctl::spec::{RateLimit, ServiceSpec};

use super::upstream::Via;
use crate::cgroup::ServiceCgroups;
use crate::proxy::external::{EgressResolver, ExternalTarget};

use crate::registry::Snapshot;
use crate::resilience::balance::Balancer;
use hms_ctl::api::InstanceHealth;

use crate::resilience::breaker::{BreakerConfig, CircuitBreaker};
use crate::resilience::policy::{Caller, CallerIndex};
use crate::resilience::rate_limit::{DEFAULT_MAX_WAIT, RateLimiter};
use crate::resilience::retry::{BudgetConfig, RetryBudget};

/// The endpoints of one service and what the proxy learned about them.
pub struct Endpoints {
    pub addrs: Vec<SocketAddrV4>,
    /// How each instance is reached: directly, or through its host's agent.
    pub vias: Vec<Via>,
    pub balancer: Balancer,
    pub breakers: Vec<CircuitBreaker>,
    /// Active health check results (all passing when the spec has no `health:`).
    pub checks: Vec<HealthMark>,
}

impl Endpoints {
    /// May endpoint `i` get a request now: its circuit is not open and its health check
    /// (if any) passes.
    pub fn eligible(&self, i: usize, now: Instant) -> bool {
        self.checks[i].passing() && self.breakers[i].is_eligible(now)
    }

    /// Whether endpoint `i` is reached from this host itself: a local instance, or an
    /// external service's outside system (this host originates the call).
    pub fn is_local(&self, i: usize) -> bool {
        matches!(self.vias[i], Via::Local | Via::External(_))
    }

    /// Whether the service has an endpoint reached from this host (then this host applies
    /// its policy and rate limit; otherwise the destination host does).
    pub fn has_local(&self) -> bool {
        (0..self.vias.len()).any(|i| self.is_local(i))
    }

    /// The instances to balance over now: healthy local ones if there are any (a call that
    /// stays on the host is cheaper and needs no tunnel), else every healthy one.
    pub fn candidates(&self, now: Instant) -> impl Fn(usize) -> bool + '_ {
        let local_ok = (0..self.addrs.len()).any(|i| self.is_local(i) && self.eligible(i, now));
        move |i| self.eligible(i, now) && (!local_ok || self.is_local(i))
    }
}

/// Consecutive active-check failures that take an instance out of rotation; one success
/// brings it back.
pub const CHECK_FAILURES_TO_FAIL: u32 = 2;

#[derive(Debug, Default)]
pub struct HealthMark {
    failures: AtomicU32,
    checked: AtomicBool,
}

impl HealthMark {
    pub fn passing(&self) -> bool {
        self.failures.load(Ordering::Relaxed) < CHECK_FAILURES_TO_FAIL
    }

    pub fn record(&self, ok: bool) {
        self.checked.store(true, Ordering::Relaxed);
        if ok {
            self.failures.store(0, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `passing`/`failing`, or None before the first check.
    pub fn describe(&self) -> Option<&'static str> {
        self.checked
            .load(Ordering::Relaxed)
            .then(|| if self.passing() { "passing" } else { "failing" })
    }
}

pub struct ServiceState {
    pub endpoints: Arc<Endpoints>,
    pub budget: Arc<RetryBudget>,
    pub limiter: Option<Arc<RateLimiter>>,
}

struct Entry {
    endpoints: Arc<Endpoints>,
    budget: Arc<RetryBudget>,
    limit: Option<(RateLimit, Arc<RateLimiter>)>,
}

pub struct ServiceStates {
    cgroups: ServiceCgroups,
    /// This host's name in the registry: instances on it are local.
    local_node: String,
    services: Mutex<HashMap<String, Entry>>,
    callers: Mutex<Option<(Arc<Snapshot>, Arc<CallerIndex>)>>,
    /// The agent's own cgroup directory (no spec may name it or an ancestor).
    agent_cgroup: std::sync::OnceLock<Option<std::path::PathBuf>>,
    /// Where external services' host names are resolved.
    egress: Arc<EgressResolver>,
}

impl ServiceStates {
    pub fn new(cgroups: ServiceCgroups, local_node: String) -> ServiceStates {
        ServiceStates {
            cgroups,
            local_node,
            services: Mutex::new(HashMap::new()),
            callers: Mutex::new(None),
            agent_cgroup: std::sync::OnceLock::new(),
            egress: Arc::default(),
        }
    }

    /// The resolver of external services' host names (configured at start).
    pub fn egress(&self) -> &Arc<EgressResolver> {
        &self.egress
    }

    pub fn cgroups(&self) -> &ServiceCgroups {
        &self.cgroups
    }

    /// The state for `svc`, rebuilt where its instances or limit changed. Instances on
    /// hosts whose record is gone from the registry are left out (unreachable).
    pub fn get(&self, svc: &ServiceInfo, snapshot: &Snapshot) -> ServiceState {
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        // The common case (nothing changed) allocates nothing: this runs on every request.
        if !map.contains_key(&svc.spec.name) {
            let (addrs, vias) = self.reachable(svc, snapshot);
            map.insert(
                svc.spec.name.clone(),
                Entry {
                    endpoints: Arc::new(new_endpoints(addrs, vias)),
                    budget: Arc::new(RetryBudget::new(BudgetConfig::default(), Instant::now())),
                    limit: None,
                },
            );
        }
        let entry = map.get_mut(&svc.spec.name).expect("inserted above");
        if !self.unchanged(&entry.endpoints, svc, snapshot) {
            let (addrs, vias) = self.reachable(svc, snapshot);
            entry.endpoints = Arc::new(new_endpoints(addrs, vias));
        }
        match (&svc.spec.limit, &entry.limit) {
            (None, _) => entry.limit = None,
            (Some(want), Some((have, _))) if want == have => {}
            (Some(want), _) => {
                let limiter = RateLimiter::from_spec(want)
                    .with_queue(want.queue.unwrap_or(0), DEFAULT_MAX_WAIT);
                entry.limit = Some((*want, Arc::new(limiter)));
            }
        }
        ServiceState {
            endpoints: entry.endpoints.clone(),
            budget: entry.budget.clone(),
            limiter: entry.limit.as_ref().map(|(_, l)| l.clone()),
        }
    }

    /// The instances this host can reach, and how.
    fn reachable(&self, svc: &ServiceInfo, snapshot: &Snapshot) -> (Vec<SocketAddrV4>, Vec<Via>) {
        if let Some(ext) = &svc.spec.external {
            // Every host calls the outside system itself: one endpoint, whatever the
            // registry's instance records say.
            let target = ExternalTarget::new(&svc.spec.name, ext, self.egress.clone());
            return (
                vec![target.placeholder_addr()],
                vec![Via::External(Arc::new(target))],
            );
        }
        svc.instances
            .iter()
            .filter_map(|i| {
                if i.node == self.local_node {
                    return Some((i.addr, Via::Local));
                }
                let n = snapshot.node(&i.node)?;
                Some((
                    i.addr,
                    Via::Peer {
                        node: n.name.clone(),
                        inbound: n.inbound,
                    },
                ))
            })
            .unzip()
    }

    /// Whether `endpoints` still match what [`Self::reachable`] would build, without
    /// building it.
    fn unchanged(&self, endpoints: &Endpoints, svc: &ServiceInfo, snapshot: &Snapshot) -> bool {
        match (&svc.spec.external, endpoints.vias.as_slice()) {
            (Some(want), [Via::External(have)]) => return have.spec == **want,
            (Some(_), _) | (None, [Via::External(_)]) => return false,
            (None, _) => {}
        }
        let mut built = endpoints.addrs.iter().zip(&endpoints.vias);
        for i in &svc.instances {
            let want_via = if i.node == self.local_node {
                None
            } else {
                match snapshot.node(&i.node) {
                    Some(n) => Some(n),
                    None => continue,
                }
            };
            let Some((addr, via)) = built.next() else {
                return false;
            };
            let same_via = match (want_via, via) {
                (None, Via::Local) => true,
                (Some(n), Via::Peer { node, inbound }) => *node == n.name && *inbound == n.inbound,
                _ => false,
            };
            if *addr != i.addr || !same_via {
                return false;
            }
        }
        built.next().is_none()
    }

    /// Breaker state of each instance of `name` (empty if it has seen no traffic yet).
    pub fn health(&self, name: &str) -> Vec<InstanceHealth> {
        let now = Instant::now();
        let map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name)
            .map(|e| {
                e.endpoints
                    .addrs
                    .iter()
                    .zip(&e.endpoints.breakers)
                    .zip(&e.endpoints.checks)
                    .map(|((addr, b), check)| {
                        let s = b.snapshot(now);
                        InstanceHealth {
                            addr: *addr,
                            state: s.state.to_string(),
                            consecutive_failures: s.consecutive_failures,
                            ejected_for_ms: s.ejected_for_ms,
                            ejections_total: s.ejections_total,
                            health_check: check.describe().map(str::to_string),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The service whose cgroup directory is `dir` or one of its ancestors (the deepest
    /// match), else the host. Path-based, so it sees directories created after the index.
    pub fn caller_by_path(&self, snapshot: &Snapshot, dir: &std::path::Path) -> Caller {
        self.identity_dirs(snapshot)
            .into_iter()
            .filter(|(_, d, refused)| refused.is_none() && dir.starts_with(d))
            .max_by_key(|(_, d, _)| d.components().count())
            .map_or(Caller::Host, |(s, _, _)| Caller::service(&s.spec.name))
    }

    /// Every service's cgroup directory, and why it may not serve as the service's
    /// identity ([`crate::cgroup::identity_refusal`]): specs come from the registry.
    fn identity_dirs<'a>(
        &self,
        snapshot: &'a Snapshot,
    ) -> Vec<(&'a ServiceInfo, std::path::PathBuf, Option<String>)> {
        let dirs: Vec<(&ServiceInfo, std::path::PathBuf)> = snapshot
            .services()
            .map(|s| (s, self.cgroups.dir_of(&s.spec)))
            .collect();
        let agent = self.agent_cgroup.get_or_init(|| {
            crate::cgroup::cgroup_of_pid(&self.cgroups.root, std::process::id()).ok()
        });
        dirs.iter()
            .map(|(s, d)| {
                // A default directory nobody created yet holds no process to steal.
                let others = dirs
                    .iter()
                    .filter(|(o, od)| o.spec.cgroup.is_some() || od.is_dir())
                    .map(|(o, od)| (o.spec.name.as_str(), od.as_path()));
                let refused = crate::cgroup::identity_refusal(&s.spec, d, agent.as_deref(), others);
                (*s, d.clone(), refused)
            })
            .collect()
    }

    /// Who runs in which cgroup, rebuilt when the registry changed.
    pub fn callers(&self, snapshot: &Arc<Snapshot>) -> Arc<CallerIndex> {
        let mut cached = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((snap, index)) = cached.as_ref()
            && Arc::ptr_eq(snap, snapshot)
        {
            return index.clone();
        }
        // Resolve every service's directory (defaults included); a default directory that
        // nobody created yet simply has no callers.
        let specs: Vec<ServiceSpec> = self
            .identity_dirs(snapshot)
            .into_iter()
            .filter_map(|(s, dir, refused)| {
                if let Some(why) = refused {
                    tracing::warn!(service = %s.spec.name, dir = %dir.display(), "refused the registry spec's cgroup as the service's caller identity: {why}; its processes count as the host");
                    return None;
                }
                if s.spec.cgroup.is_none() && !dir.is_dir() {
                    return None;
                }
                let mut spec = s.spec.clone();
                spec.cgroup = Some(dir.display().to_string());
                Some(spec)
            })
            .collect();
        let (index, problems) = CallerIndex::from_specs(specs.iter(), &self.cgroups.root);
        for p in problems {
            tracing::warn!(service = %p.service, dir = %p.dir.display(), "cgroup not usable for caller identity: {}", p.reason);
        }
        let index = Arc::new(index);
        *cached = Some((snapshot.clone(), index.clone()));
        index
    }
}

fn new_endpoints(addrs: Vec<SocketAddrV4>, vias: Vec<Via>) -> Endpoints {
    Endpoints {
        vias,
        balancer: Balancer::new(addrs.len()),
        breakers: addrs
            .iter()
            .map(|_| CircuitBreaker::new(BreakerConfig::default()))
            .collect(),
        checks: addrs.iter().map(|_| HealthMark::default()).collect(),
        addrs,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hms_ctl::api::{Instance, NodeInfo};

    use super::*;

    fn states() -> ServiceStates {
        ServiceStates::new(
            ServiceCgroups {
                root: "/sys/fs/cgroup".into(),
                hooked: "/sys/fs/cgroup/hms".into(),
            },
            "host-a".into(),
        )
    }

    fn service(instances: &[(&str, u16)]) -> ServiceInfo {
        ServiceInfo {
            spec: hms_ctl::spec::parse("name: pay\nport: 7000\n", "t").unwrap(),
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

    fn snapshot(svc: &ServiceInfo, b_inbound: &str) -> Snapshot {
        Snapshot::new([svc.clone()]).with_nodes([NodeInfo {
            name: "host-b".into(),
            inbound: b_inbound.parse().unwrap(),
            last_seen_unix_ms: 0,
            cert_expiry_unix_ms: None,
        }])
    }

    #[test]
    fn endpoints_are_kept_while_nothing_changed_and_rebuilt_when_something_did() {
        let st = states();
        let svc = service(&[("host-a", 7000), ("host-b", 7000), ("host-gone", 7000)]);
        let snap = snapshot(&svc, "10.0.0.2:15008");
        let first = st.get(&svc, &snap).endpoints;
        assert_eq!(
            first.addrs.len(),
            2,
            "a host without a node record is unreachable"
        );
        assert_eq!(first.vias[0], Via::Local);
        assert!(Arc::ptr_eq(&first, &st.get(&svc, &snap).endpoints));
        // Another inbound address for host-b: rebuilt.
        let moved = snapshot(&svc, "10.0.0.9:15008");
        let second = st.get(&svc, &moved).endpoints;
        assert!(!Arc::ptr_eq(&first, &second));
        // Another instance port: rebuilt.
        let svc2 = service(&[("host-a", 7001), ("host-b", 7000)]);
        let third = st.get(&svc2, &snapshot(&svc2, "10.0.0.9:15008")).endpoints;
        assert!(!Arc::ptr_eq(&second, &third));
        assert_eq!(third.addrs[0].port(), 7001);
    }
}
