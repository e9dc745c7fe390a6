//! Per-service state the HTTP layer keeps between requests: the balancer and one circuit
//! breaker per instance, the retry budget, the rate limiter, and the caller index. Rebuilt
//! only when what it depends on changes (the instance list, the limit, the set of specs), so
//! balancer latencies and breaker ejections survive unrelated registry changes.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hms_ctl::api::ServiceInfo;
use hms_ctl::spec::RateLimit;

use crate::registry::Snapshot;
use crate::resilience::balance::Balancer;
use hms_ctl::api::InstanceHealth;

use crate::resilience::breaker::{BreakerConfig, CircuitBreaker};
use crate::resilience::policy::CallerIndex;
use crate::resilience::rate_limit::{DEFAULT_MAX_WAIT, RateLimiter};
use crate::resilience::retry::{BudgetConfig, RetryBudget};

/// The endpoints of one service and what the proxy learned about them.
pub struct Endpoints {
    pub addrs: Vec<SocketAddrV4>,
    pub balancer: Balancer,
    pub breakers: Vec<CircuitBreaker>,
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
    cgroup_root: PathBuf,
    services: Mutex<HashMap<String, Entry>>,
    callers: Mutex<Option<(Arc<Snapshot>, Arc<CallerIndex>)>>,
}

impl ServiceStates {
    pub fn new(cgroup_root: PathBuf) -> ServiceStates {
        ServiceStates {
            cgroup_root,
            services: Mutex::new(HashMap::new()),
            callers: Mutex::new(None),
        }
    }

    pub fn cgroup_root(&self) -> &std::path::Path {
        &self.cgroup_root
    }

    /// The state for `svc`, rebuilt where its instances or limit changed.
    pub fn get(&self, svc: &ServiceInfo) -> ServiceState {
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let addrs: Vec<SocketAddrV4> = svc.instances.iter().map(|i| i.addr).collect();
        let entry = map.entry(svc.spec.name.clone()).or_insert_with(|| Entry {
            endpoints: Arc::new(new_endpoints(addrs.clone())),
            budget: Arc::new(RetryBudget::new(BudgetConfig::default(), Instant::now())),
            limit: None,
        });
        if entry.endpoints.addrs != addrs {
            entry.endpoints = Arc::new(new_endpoints(addrs));
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
                    .map(|(addr, b)| {
                        let s = b.snapshot(now);
                        InstanceHealth {
                            addr: *addr,
                            state: s.state.to_string(),
                            consecutive_failures: s.consecutive_failures,
                            ejected_for_ms: s.ejected_for_ms,
                            ejections_total: s.ejections_total,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Who runs in which cgroup, rebuilt when the registry changed.
    pub fn callers(&self, snapshot: &Arc<Snapshot>) -> Arc<CallerIndex> {
        let mut cached = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((snap, index)) = cached.as_ref()
            && Arc::ptr_eq(snap, snapshot)
        {
            return index.clone();
        }
        let (index, problems) =
            CallerIndex::from_specs(snapshot.services().map(|s| &s.spec), &self.cgroup_root);
        for p in problems {
            tracing::warn!(service = %p.service, dir = %p.dir.display(), "cgroup not usable for caller identity: {}", p.reason);
        }
        let index = Arc::new(index);
        *cached = Some((snapshot.clone(), index.clone()));
        index
    }
}

fn new_endpoints(addrs: Vec<SocketAddrV4>) -> Endpoints {
    Endpoints {
        balancer: Balancer::new(addrs.len()),
        breakers: addrs
            .iter()
            .map(|_| CircuitBreaker::new(BreakerConfig::default()))
            .collect(),
        addrs,
    }
}
