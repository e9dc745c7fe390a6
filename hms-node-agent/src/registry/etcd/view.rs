//! This host's copy of everything under the prefix, kept current by the watch, and the merge
//! that turns it into a [`Snapshot`]: a service is its global record plus every node's
//! instances of it; instances whose service record is gone are left out. Each event changes
//! only the entries its key is about, in a persistent working [`Snapshot`] that publishing
//! clones in O(1): a change costs O(log services) on every host, never a rebuild, and the
//! served specs live only there (no second copy here). Values that do not
//! decode are logged and treated as absent (another agent's bug must not stop this one).
//!
//! Values are checked, not believed: an instance outside loopback is dropped (the inbound
//! side relays only to loopback, and a record pointing elsewhere is a host trying to aim
//! other hosts' traffic at a third party), and a service whose VIP is not claimed in its own
//! name (`vips/<ip>`) is left out (a host placed for one service writing another's VIP into
//! its record would otherwise take that service's traffic).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use hms_ctl::api::{Instance, NodeInfo, ServiceInfo};
use hms_ctl::spec::ServiceSpec;
use serde::{Deserialize, Serialize};

use super::keys::Key;
use crate::registry::{Name, PlacedHosts, Snapshot};

/// The value of `services/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceRecord {
    pub spec: ServiceSpec,
    pub vip: Ipv4Addr,
}

/// The value of `instances/<service>/<node>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceRecord {
    pub addrs: Vec<SocketAddrV4>,
}

/// The value of `placement/<service>`: written by the operator (the CA host) only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlacementRecord {
    pub hosts: BTreeSet<String>,
    /// The VIP claimed for the service when it was first placed.
    pub vip: Ipv4Addr,
}

/// The value of `members/<node>`: written by the CA when it admits a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberRecord {
    pub joined_unix: u64,
}

#[derive(Debug, Default)]
pub struct View {
    prefix: String,
    /// What the data path reads, changed in place by each event (persistent maps: a published
    /// clone keeps what it had, and shares everything this change did not touch). The one
    /// copy of every served service's spec.
    snap: Snapshot,
    /// Service records that are not served (their VIP is not claimed in their name, or not
    /// the placement's): kept so they are served once it is.
    held: BTreeMap<String, ServiceRecord>,
    /// `vips/<ip>` -> the name holding it.
    vip_claims: BTreeMap<Ipv4Addr, String>,
    placement_vips: BTreeMap<String, Ipv4Addr>,
    /// service -> (node, addresses), sorted by node (also of services without a record yet).
    /// A vector, not a map per service: a service runs on a few hosts, and a B-tree's first
    /// node (room for 11) cost ~550 bytes per service.
    instances: BTreeMap<String, Vec<(Name, Vec<SocketAddrV4>)>>,
    /// Every host name seen in an instance or placement key, once: each service's entries
    /// share it instead of holding their own copy. Grows with hosts ever seen, not services.
    host_names: BTreeSet<Name>,
    /// The etcd revision everything here reflects.
    pub revision: i64,
}

impl View {
    pub fn new(prefix: &str, secured: bool) -> View {
        View {
            prefix: prefix.to_string(),
            snap: Snapshot::default().with_members(Arc::default(), secured),
            ..View::default()
        }
    }

    /// Forgets everything (before a full re-list).
    pub fn clear(&mut self) {
        *self = View::new(&self.prefix, self.snap.secured());
    }

    /// Every service with a record (whether or not its VIP checks out).
    pub fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .snap
            .services()
            .map(|s| s.spec.name.clone())
            .chain(self.held.keys().cloned())
            .collect();
        names.sort();
        names
    }

    /// Every service with a placement record.
    pub fn placed_services(&self) -> Vec<String> {
        self.snap.placements().map(|(s, _)| s.to_string()).collect()
    }

    /// The services placed on `node`.
    pub fn services_placed_on(&self, node: &str) -> Vec<String> {
        self.snap
            .placements()
            .filter(|(_, hosts)| hosts.iter().any(|h| &**h == node))
            .map(|(s, _)| s.to_string())
            .collect()
    }

    /// Applies a put; the key it changed, if it is one this version knows. Touches only what
    /// the key is about: O(log services).
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Option<Key> {
        let k = Key::parse(&self.prefix, key)?;
        match &k {
            Key::Service(name) => {
                self.take_record(name);
                match decode::<ServiceRecord>(&k, value) {
                    Some(rec) if rec.spec.name == *name => self.place_record(name, rec),
                    Some(_) => {
                        tracing::warn!(key = %String::from_utf8_lossy(key), "registry record names another service; ignored");
                    }
                    None => {}
                }
            }
            Key::Instances { service, node } => {
                match decode::<InstanceRecord>(&k, value) {
                    Some(rec) => {
                        let (local, foreign): (Vec<_>, Vec<_>) =
                            rec.addrs.into_iter().partition(|a| a.ip().is_loopback());
                        if !foreign.is_empty() {
                            tracing::warn!(%service, %node, ?foreign, "registry instance record names addresses outside loopback; ignored (instances listen on the host's loopback)");
                        }
                        if local.is_empty() {
                            self.remove_instances(service, node);
                        } else {
                            let node = self.host_name(node);
                            let by_node = self.instances.entry(service.clone()).or_default();
                            match by_node.binary_search_by(|(n, _)| n.cmp(&node)) {
                                Ok(i) => by_node[i].1 = local,
                                Err(i) => {
                                    // Room for exactly one more: a push into an empty vector
                                    // reserves four (160 bytes where most services need 40).
                                    by_node.reserve_exact(1);
                                    by_node.insert(i, (node, local));
                                }
                            }
                        }
                    }
                    None => self.remove_instances(service, node),
                }
                self.refresh_instances(service);
            }
            Key::Node(name) => match decode::<NodeInfo>(&k, value) {
                Some(info) if info.name == *name => self.snap.set_node(info),
                _ => self.snap.remove_node(name),
            },
            Key::Blob(blob) => {
                self.snap.blobs_mut().insert(blob.clone(), Arc::from(value));
            }
            Key::Vip(ip) => {
                let holder = String::from_utf8_lossy(value).into_owned();
                let before = self.vip_claims.insert(*ip, holder.clone());
                self.refresh(&holder);
                if let Some(before) = before.filter(|b| *b != holder) {
                    self.refresh(&before);
                }
            }
            Key::Placement(service) => {
                match decode::<PlacementRecord>(&k, value) {
                    Some(rec) => {
                        // A BTreeSet iterates sorted and without repeats, as PlacedHosts wants.
                        let hosts: PlacedHosts =
                            rec.hosts.iter().map(|h| self.host_name(h)).collect();
                        self.snap.set_placement(service, hosts);
                        self.placement_vips.insert(service.clone(), rec.vip);
                    }
                    None => self.remove_placement(service),
                }
                self.refresh(service);
            }
            Key::Member(node) => {
                if decode::<MemberRecord>(&k, value).is_some() {
                    self.snap.members_mut().insert(node.clone());
                } else if self.snap.is_member_recorded(node) {
                    self.snap.members_mut().remove(node);
                }
            }
        }
        Some(k)
    }

    fn remove_placement(&mut self, service: &str) {
        self.snap.remove_placement(service);
        self.placement_vips.remove(service);
    }

    /// Applies a delete; the key it removed, if it is one this version knows.
    pub fn delete(&mut self, key: &[u8]) -> Option<Key> {
        let k = Key::parse(&self.prefix, key)?;
        match &k {
            Key::Service(name) => {
                self.take_record(name);
            }
            Key::Instances { service, node } => {
                self.remove_instances(service, node);
                self.refresh_instances(service);
            }
            Key::Node(name) => self.snap.remove_node(name),
            Key::Blob(blob) => {
                if self.snap.blob(blob).is_some() {
                    self.snap.blobs_mut().remove(blob);
                }
            }
            Key::Vip(ip) => {
                if let Some(holder) = self.vip_claims.remove(ip) {
                    self.refresh(&holder);
                }
            }
            Key::Placement(service) => {
                self.remove_placement(service);
                self.refresh(service);
            }
            Key::Member(node) => {
                if self.snap.is_member_recorded(node) {
                    self.snap.members_mut().remove(node);
                }
            }
        }
        Some(k)
    }

    /// `node` as every entry shares it (see `host_names`).
    fn host_name(&mut self, node: &str) -> Name {
        if let Some(n) = self.host_names.get(node) {
            return n.clone();
        }
        let n = Name::from(node);
        self.host_names.insert(n.clone());
        n
    }

    fn remove_instances(&mut self, service: &str, node: &str) {
        if let Some(by_node) = self.instances.get_mut(service) {
            by_node.retain(|(n, _)| &**n != node);
            if by_node.is_empty() {
                self.instances.remove(service);
            }
        }
    }

    /// Every node's instances of `service`, merged (node order, then each node's order).
    fn merged_instances(&self, service: &str) -> Vec<Instance> {
        let Some(by_node) = self.instances.get(service) else {
            return Vec::new();
        };
        // Sized up front: collecting a flattened iterator reserves four at first, three
        // wasted 32-byte slots for a service on one host, kept in every served snapshot.
        let mut merged = Vec::with_capacity(by_node.iter().map(|(_, a)| a.len()).sum());
        for (node, addrs) in by_node {
            merged.extend(addrs.iter().map(|addr| Instance {
                node: node.to_string(),
                addr: *addr,
            }));
        }
        merged
    }

    /// A served service's instances changed: replace them in its entry.
    fn refresh_instances(&mut self, service: &str) {
        let merged = self.merged_instances(service);
        if let Some(instances) = self.snap.instances_mut(service) {
            *instances = merged;
        }
    }

    /// Takes `name`'s record out (served or held); the record it was.
    fn take_record(&mut self, name: &str) -> Option<ServiceRecord> {
        if let Some(rec) = self.held.remove(name) {
            return Some(rec);
        }
        let info = self.snap.remove_service(name)?;
        let info = Arc::try_unwrap(info).unwrap_or_else(|shared| (*shared).clone());
        Some(ServiceRecord {
            spec: info.spec,
            vip: info.vip,
        })
    }

    /// Serves `rec` if its VIP checks out, else holds it.
    fn place_record(&mut self, name: &str, rec: ServiceRecord) {
        if self.vip_is_its_own(name, rec.vip) {
            let instances = self.merged_instances(name);
            self.snap.set_service(ServiceInfo {
                spec: rec.spec,
                vip: rec.vip,
                instances,
            });
        } else {
            self.held.insert(name.to_string(), rec);
        }
    }

    /// A claim or placement of `name` changed: judge its record again.
    fn refresh(&mut self, name: &str) {
        if let Some(rec) = self.take_record(name) {
            self.place_record(name, rec);
        }
    }

    /// What the data path reads now: a clone of the working copy, O(1) (shares everything).
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = self.snap.clone();
        snap.set_revision(u64::try_from(self.revision).unwrap_or(0));
        snap
    }
}

impl View {
    /// A service's VIP counts only when `vips/<ip>` names the service (both are written in
    /// one transaction, so a consistent registry always has the claim) and, once placed,
    /// when it is the VIP the operator's placement claimed.
    fn vip_is_its_own(&self, name: &str, vip: Ipv4Addr) -> bool {
        let claimed = self.vip_claims.get(&vip).is_some_and(|h| h == name);
        let placed = self.placement_vips.get(name).is_none_or(|p| *p == vip);
        if !(claimed && placed) {
            tracing::debug!(service = %name, %vip, claimed, placed, "registry record's VIP is not claimed in its name; service left out");
        }
        claimed && placed
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &Key, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(?key, error = %e, "registry value does not decode; treated as absent");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/hms/v1/";

    fn spec(name: &str, port: u16) -> ServiceSpec {
        hms_ctl::spec::parse(&format!("name: {name}\nport: {port}\n"), "t").unwrap()
    }

    fn put_service(v: &mut View, name: &str, port: u16, vip: [u8; 4]) {
        let rec = ServiceRecord {
            spec: spec(name, port),
            vip: vip.into(),
        };
        let key = Key::Service(name.into()).encode(P);
        v.put(key.as_bytes(), &serde_json::to_vec(&rec).unwrap());
        v.put(Key::Vip(vip.into()).encode(P).as_bytes(), name.as_bytes());
    }

    fn put_instances(v: &mut View, service: &str, node: &str, ports: &[u16]) {
        let rec = InstanceRecord {
            addrs: ports
                .iter()
                .map(|p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, *p))
                .collect(),
        };
        let key = Key::Instances {
            service: service.into(),
            node: node.into(),
        }
        .encode(P);
        v.put(key.as_bytes(), &serde_json::to_vec(&rec).unwrap());
    }

    #[test]
    fn a_service_merges_every_nodes_instances() {
        let mut v = View::new(P, false);
        put_service(&mut v, "pay", 7000, [127, 77, 0, 5]);
        put_instances(&mut v, "pay", "host-b", &[7000]);
        put_instances(&mut v, "pay", "host-a", &[7000, 7001]);
        let snap = v.snapshot();
        let svc = snap.by_vip(Ipv4Addr::new(127, 77, 0, 5)).unwrap();
        let got: Vec<(String, u16)> = svc
            .instances
            .iter()
            .map(|i| (i.node.clone(), i.addr.port()))
            .collect();
        assert_eq!(
            got,
            [
                ("host-a".to_string(), 7000),
                ("host-a".to_string(), 7001),
                ("host-b".to_string(), 7000)
            ]
        );
    }

    #[test]
    fn a_nodes_record_replaces_its_instances_and_host_names_are_stored_once() {
        let mut v = View::new(P, false);
        for name in ["pay", "bill"] {
            put_service(
                &mut v,
                name,
                7000,
                [127, 77, 0, if name == "pay" { 5 } else { 6 }],
            );
            put_instances(&mut v, name, "host-a", &[7000]);
            let placed = PlacementRecord {
                hosts: ["host-a".to_string(), "host-b".to_string()].into(),
                vip: [127, 77, 0, if name == "pay" { 5 } else { 6 }].into(),
            };
            v.put(
                Key::Placement(name.into()).encode(P).as_bytes(),
                &serde_json::to_vec(&placed).unwrap(),
            );
        }
        // A second record of the same node replaces its addresses, it does not add a node.
        put_instances(&mut v, "pay", "host-a", &[7001, 7002]);
        let snap = v.snapshot();
        let ports: Vec<u16> = snap
            .service("pay")
            .unwrap()
            .instances
            .iter()
            .map(|i| i.addr.port())
            .collect();
        assert_eq!(ports, [7001, 7002]);
        assert!(snap.placed_on("pay", "host-b") && !snap.placed_on("pay", "host-c"));
        // Both services' instance and placement entries share one copy of each host name.
        let a = &v.instances["pay"][0].0;
        assert!(Arc::ptr_eq(a, &v.instances["bill"][0].0));
        assert!(Arc::ptr_eq(a, &snap.placement("bill").unwrap()[0]));
        assert_eq!(v.services_placed_on("host-b"), ["bill", "pay"]);
    }

    #[test]
    fn instances_without_a_service_record_are_not_served() {
        let mut v = View::new(P, false);
        put_instances(&mut v, "ghost", "host-a", &[1]);
        assert!(v.snapshot().is_empty());
        put_service(&mut v, "ghost", 1, [127, 77, 0, 6]);
        assert_eq!(v.snapshot().service("ghost").unwrap().instances.len(), 1);
        v.delete(Key::Service("ghost".into()).encode(P).as_bytes());
        assert!(v.snapshot().is_empty());
    }

    #[test]
    fn deletes_nodes_blobs_and_bad_values() {
        let mut v = View::new(P, false);
        put_service(&mut v, "pay", 7000, [127, 77, 0, 5]);
        put_instances(&mut v, "pay", "host-a", &[7000]);
        put_instances(&mut v, "pay", "host-b", &[7000]);
        v.delete(
            Key::Instances {
                service: "pay".into(),
                node: "host-a".into(),
            }
            .encode(P)
            .as_bytes(),
        );
        let snap = v.snapshot();
        assert_eq!(snap.service("pay").unwrap().instances.len(), 1);

        let node = NodeInfo {
            name: "host-a".into(),
            inbound: "10.0.0.1:15008".parse().unwrap(),
            last_seen_unix_ms: 1,
            cert_expiry_unix_ms: None,
        };
        let nkey = Key::Node("host-a".into()).encode(P);
        v.put(nkey.as_bytes(), &serde_json::to_vec(&node).unwrap());
        v.put(Key::Blob("ca/root.pem".into()).encode(P).as_bytes(), b"PEM");
        let snap = v.snapshot();
        assert_eq!(snap.node("host-a"), Some(&node));
        assert_eq!(&**snap.blob("ca/root.pem").unwrap(), b"PEM");
        assert_eq!(snap.blobs_under("ca/").count(), 1);
        assert_eq!(snap.blobs_under("cb/").count(), 0);

        // An undecodable value replaces (removes) the old one instead of keeping stale data.
        v.put(nkey.as_bytes(), b"{garbage");
        v.put(Key::Service("pay".into()).encode(P).as_bytes(), b"[]");
        let after = v.snapshot();
        assert!(after.node("host-a").is_none());
        assert!(after.service("pay").is_none());
        // The earlier snapshot is immutable.
        assert!(snap.service("pay").is_some());
        v.delete(Key::Blob("ca/root.pem".into()).encode(P).as_bytes());
        assert!(v.snapshot().blob("ca/root.pem").is_none());
        assert!(snap.blob("ca/root.pem").is_some());
    }

    #[test]
    fn records_that_overreach_are_not_believed() {
        let mut v = View::new(P, true);
        // An instance record aiming other hosts at a third party keeps only loopback.
        put_service(&mut v, "pay", 7000, [127, 77, 0, 5]);
        let key = Key::Instances {
            service: "pay".into(),
            node: "host-c".into(),
        }
        .encode(P);
        let rec = InstanceRecord {
            addrs: vec![
                "10.9.9.9:22".parse().unwrap(),
                "127.0.0.1:7000".parse().unwrap(),
            ],
        };
        v.put(key.as_bytes(), &serde_json::to_vec(&rec).unwrap());
        let snap = v.snapshot();
        let addrs: Vec<String> = snap
            .service("pay")
            .unwrap()
            .instances
            .iter()
            .map(|i| i.addr.to_string())
            .collect();
        assert_eq!(addrs, ["127.0.0.1:7000"]);

        // A record claiming another service's VIP is left out; the owner keeps it.
        let forged = ServiceRecord {
            spec: spec("evil", 1),
            vip: [127, 77, 0, 5].into(),
        };
        v.put(
            Key::Service("evil".into()).encode(P).as_bytes(),
            &serde_json::to_vec(&forged).unwrap(),
        );
        let snap = v.snapshot();
        assert!(snap.service("evil").is_none());
        assert_eq!(
            snap.by_vip([127, 77, 0, 5].into()).unwrap().spec.name,
            "pay"
        );

        // Placement and membership come from their own records.
        let placed = PlacementRecord {
            hosts: ["host-a".to_string()].into(),
            vip: [127, 77, 0, 5].into(),
        };
        v.put(
            Key::Placement("pay".into()).encode(P).as_bytes(),
            &serde_json::to_vec(&placed).unwrap(),
        );
        v.put(
            Key::Member("host-a".into()).encode(P).as_bytes(),
            br#"{"joined_unix":1}"#,
        );
        let snap = v.snapshot();
        assert!(snap.placed_on("pay", "host-a"));
        assert!(!snap.placed_on("pay", "host-c"));
        assert!(snap.is_member("host-a"));
        assert!(!snap.is_member("host-c"));
        v.delete(Key::Member("host-a".into()).encode(P).as_bytes());
        assert!(!v.snapshot().is_member("host-a"));
        // A record whose VIP differs from the placement's claim is left out.
        let moved = PlacementRecord {
            vip: [127, 77, 0, 9].into(),
            ..placed
        };
        v.put(
            Key::Placement("pay".into()).encode(P).as_bytes(),
            &serde_json::to_vec(&moved).unwrap(),
        );
        assert!(v.snapshot().service("pay").is_none());
    }

    #[test]
    fn a_change_copies_only_the_service_it_is_about() {
        let mut v = View::new(P, false);
        let names: Vec<String> = (0..300).map(|i| format!("svc-{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            put_service(
                &mut v,
                n,
                7000 + i,
                [127, 77, 1 + (i / 200) as u8, (i % 200) as u8 + 1],
            );
        }
        let before = v.snapshot();
        put_instances(&mut v, "svc-7", "host-b", &[7007]);
        let after = v.snapshot();
        for n in &names {
            let shared = Arc::ptr_eq(
                before.services.get(n.as_str()).unwrap(),
                after.services.get(n.as_str()).unwrap(),
            );
            assert_eq!(shared, n != "svc-7", "{n}");
        }
        // The earlier snapshot still shows what it showed.
        assert!(before.service("svc-7").unwrap().instances.is_empty());
        assert_eq!(after.service("svc-7").unwrap().instances.len(), 1);
        assert_eq!(after.len(), 300);
        assert_eq!(
            after.by_vip([127, 77, 1, 8].into()).unwrap().spec.name,
            "svc-7"
        );
    }

    #[test]
    fn a_claim_that_moves_moves_the_service() {
        let mut v = View::new(P, false);
        let vip: Ipv4Addr = [127, 77, 0, 5].into();
        // Record first, claim later (the order a re-list delivers them in).
        let rec = |name: &str| ServiceRecord {
            spec: spec(name, 7000),
            vip,
        };
        for name in ["a", "b"] {
            v.put(
                Key::Service(name.into()).encode(P).as_bytes(),
                &serde_json::to_vec(&rec(name)).unwrap(),
            );
        }
        assert!(v.snapshot().is_empty());
        let claim = Key::Vip(vip).encode(P);
        v.put(claim.as_bytes(), b"a");
        let snap = v.snapshot();
        assert_eq!(snap.by_vip(vip).unwrap().spec.name, "a");
        assert!(snap.service("b").is_none());
        v.put(claim.as_bytes(), b"b");
        let snap = v.snapshot();
        assert_eq!(snap.by_vip(vip).unwrap().spec.name, "b");
        assert!(snap.service("a").is_none());
        assert_eq!(v.service_names(), ["a", "b"]);
        v.delete(claim.as_bytes());
        let snap = v.snapshot();
        assert!(snap.is_empty());
        assert!(snap.by_vip(vip).is_none());
        // A record changing its VIP leaves the old index entry.
        v.put(claim.as_bytes(), b"a");
        let moved = ServiceRecord {
            vip: [127, 77, 0, 6].into(),
            ..rec("a")
        };
        v.put(Key::Vip(moved.vip).encode(P).as_bytes(), b"a");
        v.put(
            Key::Service("a".into()).encode(P).as_bytes(),
            &serde_json::to_vec(&moved).unwrap(),
        );
        let snap = v.snapshot();
        assert!(snap.by_vip(vip).is_none());
        assert_eq!(snap.by_vip(moved.vip).unwrap().spec.name, "a");
    }
}
