//! The registry: which services exist, their VIPs and instances. One [`Store`] trait, with
//! backends behind it (today the embedded one; etcd is next). Readers (DNS, proxy) only ever
//! see an immutable [`Snapshot`], so nothing on the data path knows which backend is in use
//! or waits for a write.

pub mod embedded;
pub mod vip;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use hms_ctl::api::{DeployResult, ServiceInfo};
use hms_ctl::spec::ServiceSpec;

pub use embedded::EmbeddedStore;

/// A backend that keeps the mesh's services.
pub trait Store: Send + Sync {
    /// Registers `spec` with an instance on `node`, replacing an earlier spec of that name.
    /// The VIP of an existing name never changes.
    fn deploy(&self, spec: ServiceSpec, node: &str) -> anyhow::Result<DeployResult>;
    /// Changes the stored spec of an existing service in place (routes, limits); the change
    /// is persisted before it becomes visible. Errors if the service does not exist or `edit`
    /// refuses.
    fn update_spec(
        &self,
        name: &str,
        edit: &mut dyn FnMut(&mut ServiceSpec) -> anyhow::Result<()>,
    ) -> anyhow::Result<ServiceInfo>;
    /// Removes a service; false if it did not exist.
    fn undeploy(&self, name: &str) -> anyhow::Result<bool>;
    /// The current state, cheap to take on every connection or query.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// Human-readable backend name for `status`.
    fn describe(&self) -> String;
}

/// An immutable view of every service, indexed the ways the data path looks them up.
#[derive(Debug, Default)]
pub struct Snapshot {
    services: BTreeMap<String, ServiceInfo>,
    by_vip: HashMap<Ipv4Addr, String>,
}

impl Snapshot {
    pub fn new(services: impl IntoIterator<Item = ServiceInfo>) -> Snapshot {
        let services: BTreeMap<String, ServiceInfo> = services
            .into_iter()
            .map(|s| (s.spec.name.clone(), s))
            .collect();
        let by_vip = services
            .values()
            .map(|s| (s.vip, s.spec.name.clone()))
            .collect();
        Snapshot { services, by_vip }
    }

    pub fn service(&self, name: &str) -> Option<&ServiceInfo> {
        self.services.get(name)
    }

    pub fn by_vip(&self, vip: Ipv4Addr) -> Option<&ServiceInfo> {
        self.by_vip.get(&vip).and_then(|n| self.services.get(n))
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}
