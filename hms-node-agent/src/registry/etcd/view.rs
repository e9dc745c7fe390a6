//! This host's copy of everything under the prefix, kept current by the watch, and the merge
//! that turns it into a [`Snapshot`]: a service is its global record plus every node's
//! instances of it; instances whose service record is gone are left out. Values that do not
//! decode are logged and treated as absent (another agent's bug must not stop this one).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use hms_ctl::api::{Instance, NodeInfo, ServiceInfo};
use hms_ctl::spec::ServiceSpec;
use serde::{Deserialize, Serialize};

use super::keys::Key;
use crate::registry::{Blobs, Snapshot};

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

#[derive(Debug, Default)]
pub struct View {
    prefix: String,
    services: BTreeMap<String, ServiceRecord>,
    /// service -> node -> addresses.
    instances: BTreeMap<String, BTreeMap<String, Vec<SocketAddrV4>>>,
    nodes: BTreeMap<String, NodeInfo>,
    blobs: Arc<Blobs>,
    /// The etcd revision everything here reflects.
    pub revision: i64,
}

impl View {
    pub fn new(prefix: &str) -> View {
        View {
            prefix: prefix.to_string(),
            ..View::default()
        }
    }

    /// Forgets everything (before a full re-list).
    pub fn clear(&mut self) {
        *self = View::new(&self.prefix);
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
                    self.instances
                        .entry(service.clone())
                        .or_default()
                        .insert(node.clone(), rec.addrs);
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
            // VIP claims matter only to writers, who read them from etcd in a transaction.
            Key::Vip(_) => {}
        }
        Some(k)
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
            Key::Vip(_) => {}
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
        let services = self.services.iter().map(|(name, rec)| ServiceInfo {
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
            .at_revision(u64::try_from(self.revision).unwrap_or(0))
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
        let mut v = View::new(P);
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
        let mut v = View::new(P);
        put_instances(&mut v, "ghost", "host-a", &[1]);
        assert!(v.snapshot().is_empty());
        put_service(&mut v, "ghost", 1, [127, 77, 0, 6]);
        assert_eq!(v.snapshot().service("ghost").unwrap().instances.len(), 1);
        v.delete(Key::Service("ghost".into()).encode(P).as_bytes());
        assert!(v.snapshot().is_empty());
    }

    #[test]
    fn deletes_nodes_blobs_and_bad_values() {
        let mut v = View::new(P);
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
}
