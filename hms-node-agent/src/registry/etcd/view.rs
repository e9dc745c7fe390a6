//! This host's copy of everything under the prefix, kept current by the watch, and the merge
//! that turns it into a [`Snapshot`]: a service is its global record plus every node's
//! instances of it; instances whose service record is gone are left out. Values that do not
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
use crate::registry::{Blobs, Placement, Snapshot};

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
    /// Whether etcd enforces access (see [`Snapshot::secured`]).
    secured: bool,
    services: BTreeMap<String, ServiceRecord>,
    /// `vips/<ip>` -> the name holding it.
    vip_claims: BTreeMap<Ipv4Addr, String>,
    placement: Arc<Placement>,
    placement_vips: BTreeMap<String, Ipv4Addr>,
    members: Arc<BTreeSet<String>>,
    /// service -> node -> addresses.
    instances: BTreeMap<String, BTreeMap<String, Vec<SocketAddrV4>>>,
    nodes: BTreeMap<String, NodeInfo>,
    blobs: Arc<Blobs>,
    /// The etcd revision everything here reflects.
    pub revision: i64,
}

impl View {
    pub fn new(prefix: &str, secured: bool) -> View {
        View {
            prefix: prefix.to_string(),
            secured,
            ..View::default()
        }
    }

    /// Forgets everything (before a full re-list).
    pub fn clear(&mut self) {
        *self = View::new(&self.prefix, self.secured);
    }

    /// Every service with a record (whether or not its VIP checks out).
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Every service with a placement record.
    pub fn placed_services(&self) -> Vec<String> {
        self.placement.keys().cloned().collect()
    }

    /// The services placed on `node`.
    pub fn services_placed_on(&self, node: &str) -> Vec<String> {
        self.placement
            .iter()
            .filter(|(_, hosts)| hosts.contains(node))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Applies a put; the key it changed, if it is one this version knows.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Option<Key> {
        let k = Key::parse(&self.prefix, key)?;
        match &k {
            Key::Service(name) => match decode::<ServiceRecord>(&k, value) {
                Some(rec) if rec.spec.name == *name => {
                    self.services.insert(name.clone(), rec);
                }
                Some(_) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), "registry record names another service; ignored");
                    self.services.remove(name);
                }
                None => {
                    self.services.remove(name);
                }
            },
            Key::Instances { service, node } => match decode::<InstanceRecord>(&k, value) {
                Some(rec) => {
                    let (local, foreign): (Vec<_>, Vec<_>) =
                        rec.addrs.into_iter().partition(|a| a.ip().is_loopback());
                    if !foreign.is_empty() {
                        tracing::warn!(%service, %node, ?foreign, "registry instance record names addresses outside loopback; ignored (instances listen on the host's loopback)");
                    }
                    if local.is_empty() {
                        self.remove_instances(service, node);
                    } else {
                        self.instances
                            .entry(service.clone())
                            .or_default()
                            .insert(node.clone(), local);
                    }
                }
                None => self.remove_instances(service, node),
            },
            Key::Node(name) => match decode::<NodeInfo>(&k, value) {
                Some(info) if info.name == *name => {
                    self.nodes.insert(name.clone(), info);
                }
                _ => {
                    self.nodes.remove(name);
                }
            },
            Key::Blob(blob) => {
                Arc::make_mut(&mut self.blobs).insert(blob.clone(), Arc::from(value));
            }
            Key::Vip(ip) => {
                let holder = String::from_utf8_lossy(value).into_owned();
                self.vip_claims.insert(*ip, holder);
            }
            Key::Placement(service) => match decode::<PlacementRecord>(&k, value) {
                Some(rec) => {
                    Arc::make_mut(&mut self.placement).insert(service.clone(), rec.hosts);
                    self.placement_vips.insert(service.clone(), rec.vip);
                }
                None => self.remove_placement(service),
            },
            Key::Member(node) => {
                if decode::<MemberRecord>(&k, value).is_some() {
                    Arc::make_mut(&mut self.members).insert(node.clone());
                } else if self.members.contains(node) {
                    Arc::make_mut(&mut self.members).remove(node);
                }
            }
        }
        Some(k)
    }

    fn remove_placement(&mut self, service: &str) {
        if self.placement.contains_key(service) {
            Arc::make_mut(&mut self.placement).remove(service);
        }
        self.placement_vips.remove(service);
    }

    /// Applies a delete; the key it removed, if it is one this version knows.
    pub fn delete(&mut self, key: &[u8]) -> Option<Key> {
        let k = Key::parse(&self.prefix, key)?;
        match &k {
            Key::Service(name) => {
                self.services.remove(name);
            }
            Key::Instances { service, node } => self.remove_instances(service, node),
            Key::Node(name) => {
                self.nodes.remove(name);
            }
            Key::Blob(blob) => {
                if self.blobs.contains_key(blob) {
                    Arc::make_mut(&mut self.blobs).remove(blob);
                }
            }
            Key::Vip(ip) => {
                self.vip_claims.remove(ip);
            }
            Key::Placement(service) => self.remove_placement(service),
            Key::Member(node) => {
                if self.members.contains(node) {
                    Arc::make_mut(&mut self.members).remove(node);
                }
            }
        }
        Some(k)
    }

    fn remove_instances(&mut self, service: &str, node: &str) {
        if let Some(by_node) = self.instances.get_mut(service) {
            by_node.remove(node);
            if by_node.is_empty() {
                self.instances.remove(service);
            }
        }
    }

    /// Merges records and instances into what the data path reads.
    pub fn snapshot(&self) -> Snapshot {
        let services = self
            .services
            .iter()
            .filter(|(name, rec)| self.vip_is_its_own(name, rec.vip))
            .map(|(name, rec)| ServiceInfo {
                spec: rec.spec.clone(),
                vip: rec.vip,
                instances: self
                    .instances
                    .get(name)
                    .into_iter()
                    .flat_map(|by_node| by_node.iter())
                    .flat_map(|(node, addrs)| {
                        addrs.iter().map(move |addr| Instance {
                            node: node.clone(),
                            addr: *addr,
                        })
                    })
                    .collect(),
            });
        Snapshot::new(services)
            .with_nodes(self.nodes.values().cloned())
            .with_blobs(self.blobs.clone())
            .with_placement(self.placement.clone())
            .with_members(self.members.clone(), self.secured)
            .at_revision(u64::try_from(self.revision).unwrap_or(0))
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
}
