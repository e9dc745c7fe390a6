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

use crate::cgroup::ServiceCgroups;

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
    /// Active health check results (all passing when the spec has no `health:`).
    pub checks: Vec<HealthMark>,
}

impl Endpoints {
    /// May endpoint `i` get a request now: its circuit is not open and its health check
    /// (if any) passes.
    pub fn eligible(&self, i: usize, now: Instant) -> bool {
        self.checks[i].passing() && self.breakers[i].is_eligible(now)
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
    services: Mutex<HashMap<String, Entry>>,
    callers: Mutex<Option<(Arc<Snapshot>, Arc<CallerIndex>)>>,
}

impl ServiceStates {
    pub fn new(cgroups: ServiceCgroups) -> ServiceStates {
        ServiceStates {
            cgroups,
            services: Mutex::new(HashMap::new()),
            callers: Mutex::new(None),
        }
    }

    pub fn cgroups(&self) -> &ServiceCgroups {
        &self.cgroups
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
        let specs: Vec<ServiceSpec> = snapshot
            .services()
            .filter_map(|s| {
                let dir = self.cgroups.dir_of(&s.spec);
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

fn new_endpoints(addrs: Vec<SocketAddrV4>) -> Endpoints {
    Endpoints {
        balancer: Balancer::new(addrs.len()),
        breakers: addrs
            .iter()
            .map(|_| CircuitBreaker::new(BreakerConfig::default()))
            .collect(),
        checks: addrs.iter().map(|_| HealthMark::default()).collect(),
        addrs,
    }
}
