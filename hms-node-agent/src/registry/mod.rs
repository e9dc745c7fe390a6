//! The registry: which services exist, their VIPs and instances, which hosts are in the mesh,
//! and a few opaque blobs (the CA exchange). One [`Store`] trait with two backends: the
//! embedded one (single host, one JSON file) and etcd (many hosts share one registry).
//! Readers (DNS, proxy) only ever see an immutable [`Snapshot`], taken with an `Arc` clone, so
//! nothing on the data path knows which backend is in use or ever waits for a write or for
//! etcd. Snapshots are built from persistent maps, so a new one shares every unchanged
//! service with the last (see [`Snapshot`]).

pub mod embedded;
pub mod etcd;
pub mod vip;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use anyhow::bail;
use tokio::sync::watch;

pub use embedded::EmbeddedStore;
pub use etcd::{CredentialFiles, EtcdOptions, EtcdStore, RemovedNode};
// The registry's vocabulary, for users of the trait that do not depend on hms-ctl.
pub use hms_ctl::api::{DeployResult, Instance, NodeInfo, RegistryHealth, ServiceInfo};
pub use hms_ctl::spec::{ServiceSpec, parse as parse_spec};

/// Opaque values stored beside the services, by key (see [`Store::put_blob`]).
pub type Blobs = BTreeMap<String, Arc<[u8]>>;

/// A backend that keeps the mesh's services.
///
/// The writing methods block the calling thread until the registry has accepted the change
/// and this store's own [`Snapshot`] shows it: call them from a blocking context
/// (`tokio::task::spawn_blocking`, as the admin API does), never from an async task.
pub trait Store: Send + Sync {
    /// Registers `spec` with this host's instances (`node` is this host's name), replacing
    /// an earlier spec of that name. The VIP of an existing name never changes; other hosts'
    /// instances of the service stay.
    fn deploy(&self, spec: ServiceSpec, node: &str) -> anyhow::Result<DeployResult>;
    /// Changes the stored spec of an existing service in place (routes, limits); the change
    /// is persisted before it becomes visible. Errors if the service does not exist or `edit`
    /// refuses. `edit` may be called more than once when another host wrote concurrently.
    fn update_spec(
        &self,
        name: &str,
        edit: &mut dyn FnMut(&mut ServiceSpec) -> anyhow::Result<()>,
    ) -> anyhow::Result<ServiceInfo>;
    /// Removes a service and every host's instances of it; false if it did not exist.
    fn undeploy(&self, name: &str) -> anyhow::Result<bool>;
    /// Publishes this host's record (inbound address, certificate expiry). With etcd it lives
    /// under this host's lease and is written again if the lease is ever lost.
    fn register_node(&self, node: NodeInfo) -> anyhow::Result<()>;
    /// Stores `value` under `key` (see [`validate_blob_key`]), replacing what was there.
    fn put_blob(&self, key: &str, value: &[u8]) -> anyhow::Result<()>;
    /// Stores `value` under `key` only if the key does not exist yet; false if it did (the
    /// first host to create the mesh CA wins, the others read it).
    fn create_blob(&self, key: &str, value: &[u8]) -> anyhow::Result<bool>;
    /// Reads `key` from the registry itself (not the snapshot), so a value another host just
    /// wrote is seen.
    fn get_blob(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Removes `key`; false if it did not exist (gateway specs: `hms-ctl gateway delete`).
    fn delete_blob(&self, key: &str) -> anyhow::Result<bool>;
    /// Withdraws this host's instances and node record now (a clean stop) instead of when
    /// its lease runs out; the services themselves stay. The store serves no more writes.
    fn leave(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Operator acts (`etcd/operator.rs`): with a secured etcd only the CA host's connection
    /// (etcd's `root`) may make them. Sets the hosts that may run `service`.
    fn place(&self, service: &str, hosts: BTreeSet<String>) -> anyhow::Result<BTreeSet<String>> {
        let _ = (service, hosts);
        bail!("placement is for a multi-host mesh (--registry etcds://HOST:PORT)")
    }
    /// Records a host the CA admitted (and gives it its registry role); refuses a name that
    /// is already a member.
    fn admit(&self, node: &str) -> anyhow::Result<()> {
        let _ = node;
        Ok(())
    }
    /// Whether `node` is a member, read from the registry itself.
    fn is_member(&self, node: &str) -> anyhow::Result<bool> {
        let _ = node;
        Ok(false)
    }
    /// Takes a host out of the mesh (`hms-ctl node remove`).
    fn remove_node(&self, node: &str) -> anyhow::Result<RemovedNode> {
        let _ = node;
        bail!("removing hosts is for a multi-host mesh (--registry etcds://HOST:PORT)")
    }
    /// Lets a join token's bootstrap credential post `node`'s join request.
    fn allow_join(&self, node: &str) -> anyhow::Result<()> {
        let _ = node;
        Ok(())
    }
    /// Ends a join token's bootstrap credential (the host joined, or the token is gone).
    fn end_join(&self, node: &str) -> anyhow::Result<()> {
        let _ = node;
        Ok(())
    }
    /// Nodes whose bootstrap credential still exists.
    fn pending_joins(&self) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// The current state, cheap to take on every connection or query.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// A receiver that sees every new snapshot (services, nodes or blobs changed).
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// Backend, connectivity and revision for `status`.
    fn health(&self) -> RegistryHealth;
    /// Human-readable backend name for `status`.
    fn describe(&self) -> String;
}

/// Where this host's instances of `spec` listen: its `port` and `replicas` on loopback. An
/// external service has none (its endpoint is the outside system, `proxy/external.rs`).
pub(crate) fn local_addrs(spec: &ServiceSpec) -> Vec<SocketAddrV4> {
    if spec.is_external() {
        return Vec::new();
    }
    std::iter::once(spec.port)
        .chain(spec.replicas.iter().copied())
        .map(|port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .collect()
}

/// Blob keys are paths of `[A-Za-z0-9._-]` segments separated by single `/`, at most 256
/// bytes: they become etcd keys and must not escape their prefix.
pub fn validate_blob_key(key: &str) -> anyhow::Result<()> {
    let ok_segment = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if key.is_empty() || key.len() > 256 || !key.split('/').all(ok_segment) {
        bail!(
            "`{key}` is not a registry blob key; use 1-256 bytes of [A-Za-z0-9._-] segments separated by `/`"
        );
    }
    Ok(())
}

/// Service and host names as keys and values of the persistent maps: `Arc<str>`, so copying
/// a map node on a change clones pointers, not strings, and one name is stored once however
/// many entries hold it (a service's name keys its service and its placement; a host's name is
/// shared by every service placed on it).
pub(crate) type Name = Arc<str>;

/// The hosts the operator placed a service on, sorted and without repeats. A boxed slice, not
/// a `BTreeSet<String>`: a B-tree's first node has room for 11 entries (~280 bytes) where a
/// placement holds one or two hosts, and the names are shared (see [`Name`]).
pub(crate) type PlacedHosts = Arc<[Name]>;

/// An immutable view of every service, host and blob, indexed the ways the data path looks
/// them up.
///
/// The maps that grow with the mesh are persistent (`imbl`, the maintained fork of `im`): a
/// clone shares every node with the original and a change copies only the path to the entry
/// it touches. The etcd backend keeps one working `Snapshot`, applies each watch event to it
/// in place and publishes a clone, so a change costs every host O(log services), and the
/// published snapshots share all unchanged services with each other (one copy, not one per
/// snapshot). Service values are `Arc`s, so a copied map node clones pointers only.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    services: imbl::OrdMap<Name, Arc<ServiceInfo>>,
    /// An ordered map, not `imbl::HashMap`: a lookup is a few comparisons of a `u32` either
    /// way, and the hash trie's nodes cost ~115 bytes per entry against the B-tree's ~40.
    by_vip: imbl::OrdMap<Ipv4Addr, Name>,
    /// The external services (`external:`), so a reader that wants only them (the kernel's
    /// declared-address set, on every change) does not walk every service.
    externals: imbl::OrdSet<Name>,
    nodes: imbl::OrdMap<String, NodeInfo>,
    /// Shared between snapshots: a service change does not copy the blobs.
    blobs: Arc<Blobs>,
    /// Which hosts the operator lets run each service (etcd only; see [`Snapshot::placed_on`]).
    placement: imbl::OrdMap<Name, PlacedHosts>,
    /// Hosts the CA admitted (etcd only); a removed host leaves this set.
    members: Arc<BTreeSet<String>>,
    /// Whether the registry itself enforces who writes what (etcd with TLS client
    /// certificates and roles): only then are placement and membership the operator's word.
    secured: bool,
    revision: u64,
}

/// Service name -> the hosts the operator placed it on. Written only with the operator's
/// credential, so a host cannot widen its own placement.
pub type Placement = BTreeMap<String, BTreeSet<String>>;

impl Snapshot {
    pub fn new(services: impl IntoIterator<Item = ServiceInfo>) -> Snapshot {
        let mut snap = Snapshot::default();
        for s in services {
            snap.set_service(s);
        }
        snap
    }

    pub fn with_nodes(mut self, nodes: impl IntoIterator<Item = NodeInfo>) -> Snapshot {
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self
    }

    pub fn with_blobs(mut self, blobs: Arc<Blobs>) -> Snapshot {
        self.blobs = blobs;
        self
    }

    pub fn with_placement(mut self, placement: Arc<Placement>) -> Snapshot {
        self.placement = placement
            .iter()
            .map(|(s, hosts)| {
                let hosts: PlacedHosts = hosts.iter().map(|h| Name::from(h.as_str())).collect();
                (Name::from(s.as_str()), hosts)
            })
            .collect();
        self
    }

    pub fn with_members(mut self, members: Arc<BTreeSet<String>>, secured: bool) -> Snapshot {
        self.members = members;
        self.secured = secured;
        self
    }

    pub fn at_revision(mut self, revision: u64) -> Snapshot {
        self.revision = revision;
        self
    }

    // ---- changes in place, for a backend's working copy (never on a published one) ----

    /// Adds or replaces the service of `info`'s name (and its VIP index entry).
    pub(crate) fn set_service(&mut self, info: ServiceInfo) {
        let name = self.name_of(&info.spec.name);
        let vip = info.vip;
        if info.spec.is_external() {
            self.externals.insert(name.clone());
        } else {
            self.externals.remove(&name);
        }
        if let Some(old) = self.services.insert(name.clone(), Arc::new(info))
            && old.vip != vip
        {
            self.unindex_vip(old.vip, &name);
        }
        self.by_vip.insert(vip, name);
    }

    /// Removes a service; what it was.
    pub(crate) fn remove_service(&mut self, name: &str) -> Option<Arc<ServiceInfo>> {
        let old = self.services.remove(name)?;
        self.externals.remove(name);
        self.unindex_vip(old.vip, name);
        Some(old)
    }

    fn unindex_vip(&mut self, vip: Ipv4Addr, name: &str) {
        if self.by_vip.get(&vip).is_some_and(|n| &**n == name) {
            self.by_vip.remove(&vip);
        }
    }

    /// The service's instances, to change in place (copying only this service if a published
    /// snapshot shares it).
    pub(crate) fn instances_mut(&mut self, name: &str) -> Option<&mut Vec<Instance>> {
        self.services
            .get_mut(name)
            .map(|s| &mut Arc::make_mut(s).instances)
    }

    pub(crate) fn set_node(&mut self, info: NodeInfo) {
        self.nodes.insert(info.name.clone(), info);
    }

    pub(crate) fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// The blobs, to change (copied once if a published snapshot shares them; they are few).
    pub(crate) fn blobs_mut(&mut self) -> &mut Blobs {
        Arc::make_mut(&mut self.blobs)
    }

    /// `hosts` sorted, without repeats (as a `BTreeSet` iterates).
    pub(crate) fn set_placement(&mut self, service: &str, hosts: PlacedHosts) {
        debug_assert!(hosts.windows(2).all(|w| w[0] < w[1]), "hosts not sorted");
        let name = self.name_of(service);
        self.placement.insert(name, hosts);
    }

    /// The name as the maps already hold it (one allocation per name, shared by the service
    /// and its placement), or a new one.
    fn name_of(&self, name: &str) -> Name {
        let held = match self.services.get_key_value(name) {
            Some((k, _)) => Some(k),
            None => self.placement.get_key_value(name).map(|(k, _)| k),
        };
        held.cloned().unwrap_or_else(|| Name::from(name))
    }

    pub(crate) fn remove_placement(&mut self, service: &str) {
        self.placement.remove(service);
    }

    /// Every placed service and its hosts (sorted), in name order.
    pub(crate) fn placements(&self) -> impl Iterator<Item = (&str, &[Name])> {
        self.placement.iter().map(|(s, h)| (&**s, &**h))
    }

    /// The members, to change (copied once if shared; one entry per host).
    pub(crate) fn members_mut(&mut self) -> &mut BTreeSet<String> {
        Arc::make_mut(&mut self.members)
    }

    /// Whether `node` has a member record (whether or not membership is enforced).
    pub(crate) fn is_member_recorded(&self, node: &str) -> bool {
        self.members.contains(node)
    }

    pub(crate) fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }

    pub fn service(&self, name: &str) -> Option<&ServiceInfo> {
        self.services.get(name).map(|s| &**s)
    }

    pub fn by_vip(&self, vip: Ipv4Addr) -> Option<&ServiceInfo> {
        self.by_vip.get(&vip).and_then(|n| self.service(n))
    }

    /// In name order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values().map(|s| &**s)
    }

    /// The services with `external:`, in name order.
    pub fn external_services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.externals.iter().filter_map(|n| self.service(n))
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Hosts whose agents are alive (etcd) or this host (embedded, once registered).
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn blob(&self, key: &str) -> Option<&Arc<[u8]>> {
        self.blobs.get(key)
    }

    /// Blobs whose key starts with `prefix`, in key order.
    pub fn blobs_under<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Arc<[u8]>)> + 'a {
        self.blobs
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The hosts the operator placed `service` on (sorted); None when it was never placed.
    pub fn placement(&self, service: &str) -> Option<&[Name]> {
        self.placement.get(service).map(|h| &**h)
    }

    /// Whether the operator let host `node` run `service`: the only hosts that may speak for
    /// the service as a caller on other hosts, or write its spec.
    pub fn placed_on(&self, service: &str, node: &str) -> bool {
        self.placement
            .get(service)
            .is_some_and(|hosts| hosts.binary_search_by(|h| (**h).cmp(node)).is_ok())
    }

    /// Whether host `node` may hold a tunnel to this one. With a secured registry only the
    /// CA's members may (a removed host is refused at once); without one, every host whose
    /// certificate verifies (the registry cannot tell an admitted host from a forged record).
    pub fn is_member(&self, node: &str) -> bool {
        !self.secured || self.members.contains(node)
    }

    /// The CA's members, in name order.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        self.members.iter()
    }

    /// See [`Snapshot::is_member`].
    pub fn secured(&self) -> bool {
        self.secured
    }

    /// The registry revision this snapshot reflects.
    pub fn revision(&self) -> u64 {
        self.revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_keys_stay_inside_their_prefix() {
        for good in ["ca/root.pem", "ca", "nodes/host-1/cert.pem", "a.b_c-d"] {
            validate_blob_key(good).unwrap();
        }
        for bad in ["", "/ca", "ca/", "ca//x", "../x", "ca/../x", "a b", "ä"] {
            assert!(validate_blob_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn external_services_are_indexed_as_they_come_and_go() {
        let svc = |yaml: &str, vip: [u8; 4]| ServiceInfo {
            spec: parse_spec(yaml, "t").unwrap(),
            vip: vip.into(),
            instances: Vec::new(),
        };
        let mut snap = Snapshot::new([
            svc("name: pay\nport: 7000\n", [127, 77, 0, 1]),
            svc(
                "name: bank\nexternal: https://bank.example:443\n",
                [127, 77, 0, 2],
            ),
        ]);
        let names = |s: &Snapshot| -> Vec<String> {
            s.external_services().map(|x| x.spec.name.clone()).collect()
        };
        assert_eq!(names(&snap), ["bank"]);
        let before = snap.clone();
        // Redefined as an ordinary service, then removed: the index follows.
        snap.set_service(svc("name: bank\nport: 7001\n", [127, 77, 0, 2]));
        assert!(names(&snap).is_empty());
        assert_eq!(names(&before), ["bank"]);
        snap.set_service(svc(
            "name: bank\nexternal: https://bank.example:443\n",
            [127, 77, 0, 2],
        ));
        snap.remove_service("bank");
        assert!(names(&snap).is_empty());
        assert!(snap.by_vip([127, 77, 0, 2].into()).is_none());
        assert_eq!(
            snap.by_vip([127, 77, 0, 1].into()).unwrap().spec.name,
            "pay"
        );
    }
}
