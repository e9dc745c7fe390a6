//! The etcd key layout, in one place. Everything lives under one prefix (default `/hms/v1/`):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `services/<name>` | JSON `{spec, vip}`: the global spec (routes, limits) and VIP | none |
//! | `vips/<ip>` | the name holding the VIP (created only if absent: the VIP lock) | none |
//! | `instances/<service>/<node>` | JSON `{addrs}`: where `node` runs `service` | `node`'s |
//! | `nodes/<node>` | JSON [`NodeInfo`](hms_ctl::api::NodeInfo) | `node`'s |
//! | `blobs/<key>` | raw bytes (CA exchange) | none |
//! | `placement/<service>` | JSON `{hosts, vip}`: the hosts the operator lets run it | none |
//! | `members/<node>` | JSON `{joined_unix}`: a host the CA admitted | none |
//!
//! The layout is what etcd's role-based access needs (see `access.rs`): every key a host
//! may write is one key a role can name (`nodes/<node>`, `instances/<service>/<node>`,
//! `services/<service>` of a service placed on it, `blobs/ca/renew/<node>`), and what only
//! the operator may write (`placement/`, `members/`, `vips/`, `blobs/ca/bundle`,
//! `blobs/ca/issued/`) is never inside a host's grant. Hosts read the whole prefix.
//!
//! Parsing never fails loudly: a key this version does not know is ignored, so a newer agent
//! can add kinds of keys without breaking older ones.

use std::net::Ipv4Addr;

use anyhow::bail;

pub const DEFAULT_PREFIX: &str = "/hms/v1/";

const SERVICES: &str = "services/";
const VIPS: &str = "vips/";
const INSTANCES: &str = "instances/";
const NODES: &str = "nodes/";
const BLOBS: &str = "blobs/";
const PLACEMENT: &str = "placement/";
const MEMBERS: &str = "members/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Service(String),
    Vip(Ipv4Addr),
    Instances { service: String, node: String },
    Node(String),
    Blob(String),
    Placement(String),
    Member(String),
}

impl Key {
    pub fn encode(&self, prefix: &str) -> String {
        match self {
            Key::Service(name) => format!("{prefix}{SERVICES}{name}"),
            Key::Vip(ip) => format!("{prefix}{VIPS}{ip}"),
            Key::Instances { service, node } => format!("{prefix}{INSTANCES}{service}/{node}"),
            Key::Node(name) => format!("{prefix}{NODES}{name}"),
            Key::Blob(key) => format!("{prefix}{BLOBS}{key}"),
            Key::Placement(service) => format!("{prefix}{PLACEMENT}{service}"),
            Key::Member(node) => format!("{prefix}{MEMBERS}{node}"),
        }
    }

    /// The key `raw` names, or None for keys outside `prefix` or of kinds this version does
    /// not know.
    pub fn parse(prefix: &str, raw: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(raw).ok()?.strip_prefix(prefix)?;
        let non_empty = |s: &str| (!s.is_empty() && !s.contains('/')).then(|| s.to_string());
        if let Some(name) = rest.strip_prefix(SERVICES) {
            return non_empty(name).map(Key::Service);
        }
        if let Some(ip) = rest.strip_prefix(VIPS) {
            return ip.parse().ok().map(Key::Vip);
        }
        if let Some(pair) = rest.strip_prefix(INSTANCES) {
            let (service, node) = pair.split_once('/')?;
            return Some(Key::Instances {
                service: non_empty(service)?,
                node: non_empty(node)?,
            });
        }
        if let Some(name) = rest.strip_prefix(NODES) {
            return non_empty(name).map(Key::Node);
        }
        if let Some(key) = rest.strip_prefix(BLOBS) {
            return (!key.is_empty()).then(|| Key::Blob(key.to_string()));
        }
        if let Some(name) = rest.strip_prefix(PLACEMENT) {
            return non_empty(name).map(Key::Placement);
        }
        if let Some(name) = rest.strip_prefix(MEMBERS) {
            return non_empty(name).map(Key::Member);
        }
        None
    }
}

/// The prefix of every VIP claim.
pub fn vips_prefix(prefix: &str) -> String {
    format!("{prefix}{VIPS}")
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

/// The prefix of every node's instances of `service`.
pub fn instances_of(prefix: &str, service: &str) -> String {
    format!("{prefix}{INSTANCES}{service}/")
}

/// A prefix always ends in `/` so `/hms/v1` cannot also match `/hms/v10/...`.
pub fn normalize_prefix(prefix: &str) -> String {
    if prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    }
}

/// Node names become one key segment: no `/`, printable ASCII, at most 253 bytes (a
/// hostname).
pub fn validate_node_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
    {
        bail!(
            "`{name}` cannot be a node name in the registry; use up to 253 printable characters without `/` (--node-name)"
        );
    }
    // A node's name is also its etcd user (the CN of its client certificate): `root` is
    // etcd's administrator and `hms-` names are the mesh's own users (join credentials).
    if name == "root" || name.starts_with("hms-") {
        bail!(
            "`{name}` is reserved in the registry (`root` and names starting with `hms-` are etcd users of the mesh itself); choose another --node-name"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/hms/v1/";

    #[test]
    fn every_key_round_trips() {
        let keys = [
            Key::Service("payments-svc".into()),
            Key::Vip(Ipv4Addr::new(127, 77, 3, 9)),
            Key::Instances {
                service: "payments-svc".into(),
                node: "host-a".into(),
            },
            Key::Node("host-a".into()),
            Key::Blob("ca/root.pem".into()),
            Key::Placement("payments-svc".into()),
            Key::Member("host-a".into()),
        ];
        for k in keys {
            let raw = k.encode(P);
            assert!(raw.starts_with(P), "{raw}");
            assert_eq!(Key::parse(P, raw.as_bytes()), Some(k), "{raw}");
        }
        assert_eq!(
            Key::Instances {
                service: "s".into(),
                node: "n".into()
            }
            .encode(P),
            "/hms/v1/instances/s/n"
        );
        assert!(
            Key::Instances {
                service: "s".into(),
                node: "n".into()
            }
            .encode(P)
            .starts_with(&instances_of(P, "s"))
        );
        assert_eq!(vips_prefix(P), "/hms/v1/vips/");
    }

    #[test]
    fn foreign_and_malformed_keys_are_ignored() {
        for raw in [
            "/hms/v2/services/a",
            "/hms/v1/services/",
            "/hms/v1/services/a/b",
            "/hms/v1/vips/not-an-ip",
            "/hms/v1/instances/a",
            "/hms/v1/instances/a/",
            "/hms/v1/instances//n",
            "/hms/v1/instances/a/n/x",
            "/hms/v1/future-kind/x",
            "/hms/v1/blobs/",
        ] {
            assert_eq!(Key::parse(P, raw.as_bytes()), None, "{raw}");
        }
        assert_eq!(Key::parse(P, &[0xff, 0xfe]), None);
    }

    #[test]
    fn prefixes_and_node_names() {
        assert_eq!(normalize_prefix("/hms/v1"), "/hms/v1/");
        assert_eq!(normalize_prefix("/hms/v1/"), "/hms/v1/");
        validate_node_name("host-a.example").unwrap();
        for bad in ["", "a/b", "a b", &"x".repeat(254), "root", "hms-join-a"] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_prefix_ends_where_its_keys_do() {
        assert_eq!(prefix_end(b"/hms/v1/"), b"/hms/v10");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
