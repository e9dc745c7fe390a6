//! The embedded registry: single host, kept in memory and persisted as one JSON file in the
//! state directory. Every change is written atomically (temp file, fsync, rename, fsync of the
//! directory) before it becomes visible, so a crash never leaves a half-written registry and
//! an acknowledged deploy survives a restart. A file it cannot read stops the agent rather
//! than being overwritten. Node records are kept in memory only (this host is the only one).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use hms_ctl::api::{DeployResult, Instance, NodeInfo, RegistryHealth, ServiceInfo};
use hms_ctl::spec::ServiceSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Blobs, Snapshot, Store, local_addrs, validate_blob_key, vip};
use crate::config::Ipv4Cidr;

const FILE_NAME: &str = "registry.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    version: u32,
    services: BTreeMap<String, ServiceInfo>,
    /// Added after version 1 shipped; absent in older files.
    #[serde(default)]
    blobs: BTreeMap<String, Vec<u8>>,
}

pub struct EmbeddedStore {
    path: PathBuf,
    vip_range: Ipv4Cidr,
    /// Serialises writers; readers use `snapshot` and never take this lock.
    state: Mutex<Persisted>,
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
    /// Counts published changes, for `health().revision`.
    revision: AtomicU64,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the registry in `state_dir`.
    pub fn open(state_dir: &Path, vip_range: Ipv4Cidr) -> anyhow::Result<EmbeddedStore> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join(FILE_NAME);
        let mut state = match std::fs::read(&path) {
            Ok(bytes) => {
                let p: Persisted = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is not a registry this agent can read; move it away to start empty (its services would be lost)",
                        path.display()
                    )
                })?;
                if p.version != FORMAT_VERSION {
                    bail!(
                        "{} has format version {}, this agent reads version {FORMAT_VERSION}",
                        path.display(),
                        p.version
                    );
                }
                p
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted {
                version: FORMAT_VERSION,
                ..Persisted::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // A changed --vip-cidr: move services whose VIP fell outside into the new range.
        let moved = reassign_out_of_range(&mut state, vip_range)?;
        let store = EmbeddedStore {
            path,
            vip_range,
            snapshot: watch::Sender::new(Arc::new(build_snapshot(&state, &BTreeMap::new(), 0))),
            state: Mutex::new(state),
            nodes: Mutex::new(BTreeMap::new()),
            revision: AtomicU64::new(0),
        };
        if moved {
            let state = store.lock_state();
            store.persist(&state)?;
        }
        Ok(store)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, Persisted> {
        // A panic while holding the lock cannot leave `Persisted` half-updated: every mutation
        // is applied to a clone and swapped in only after it was written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, state: &Persisted) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).context("encoding the registry")?;
        write_atomic(&self.path, &bytes)
    }

    /// Called with the state lock held, so snapshots are published in change order.
    fn publish(&self, state: &Persisted) {
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        self.snapshot
            .send_replace(Arc::new(build_snapshot(state, &nodes, revision)));
    }

    /// Applies `change` to a copy of the state, persists the copy, then swaps it in and
    /// publishes it: a failed write changes nothing.
    fn commit<T>(
        &self,
        change: impl FnOnce(&mut Persisted) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut state = self.lock_state();
        let mut next = Persisted {
            version: FORMAT_VERSION,
            services: state.services.clone(),
            blobs: state.blobs.clone(),
        };
        let out = change(&mut next)?;
        self.persist(&next)?;
        *state = next;
        self.publish(&state);
        Ok(out)
    }
}

fn build_snapshot(
    state: &Persisted,
    nodes: &BTreeMap<String, NodeInfo>,
    revision: u64,
) -> Snapshot {
    let blobs: Blobs = state
        .blobs
        .iter()
        .map(|(k, v)| (k.clone(), Arc::from(v.as_slice())))
        .collect();
    Snapshot::new(state.services.values().cloned())
        .with_nodes(nodes.values().cloned())
        .with_blobs(Arc::new(blobs))
        .at_revision(revision)
}

fn reassign_out_of_range(state: &mut Persisted, range: Ipv4Cidr) -> anyhow::Result<bool> {
    let mut taken: HashSet<Ipv4Addr> = state
        .services
        .values()
        .map(|s| s.vip)
        .filter(|v| range.contains(*v))
        .collect();
    let mut moved = false;
    for svc in state.services.values_mut() {
        if !range.contains(svc.vip) {
            svc.vip = vip::allocate(range, &svc.spec.name, &taken)
                .with_context(|| format!("no free VIP left in {range}"))?;
            taken.insert(svc.vip);
            moved = true;
        }
    }
    Ok(moved)
}

impl Store for EmbeddedStore {
    fn deploy(&self, spec: ServiceSpec, node: &str) -> anyhow::Result<DeployResult> {
        let range = self.vip_range;
        self.commit(move |next| {
            let previous = next.services.get(&spec.name);
            let replaced = previous.is_some();
            let vip = match previous {
                Some(p) => p.vip,
                None => {
                    let taken: HashSet<Ipv4Addr> = next.services.values().map(|s| s.vip).collect();
                    vip::allocate(range, &spec.name, &taken).with_context(|| {
                        format!(
                            "no free VIP left in {range}; undeploy something or widen --vip-cidr"
                        )
                    })?
                }
            };
            let info = ServiceInfo {
                instances: local_addrs(&spec)
                    .into_iter()
                    .map(|addr| Instance {
                        node: node.to_string(),
                        addr,
                    })
                    .collect(),
                spec,
                vip,
            };
            next.services.insert(info.spec.name.clone(), info.clone());
            Ok(DeployResult {
                service: info,
                replaced,
            })
        })
    }

    fn update_spec(
        &self,
        name: &str,
        edit: &mut dyn FnMut(&mut ServiceSpec) -> anyhow::Result<()>,
    ) -> anyhow::Result<ServiceInfo> {
        self.commit(|next| {
            let svc = next.services.get_mut(name).with_context(|| {
                format!("no service named `{name}` is deployed (see `hms-ctl list`)")
            })?;
            edit(&mut svc.spec)?;
            if svc.spec.name != name {
                bail!("a spec edit may not rename the service `{name}`");
            }
            Ok(svc.clone())
        })
    }

    fn undeploy(&self, name: &str) -> anyhow::Result<bool> {
        if !self.lock_state().services.contains_key(name) {
            return Ok(false);
        }
        self.commit(|next| Ok(next.services.remove(name).is_some()))
    }

    fn register_node(&self, node: NodeInfo) -> anyhow::Result<()> {
        let state = self.lock_state();
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.name.clone(), node);
        self.publish(&state);
        Ok(())
    }

    fn put_blob(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        validate_blob_key(key)?;
        self.commit(|next| {
            next.blobs.insert(key.to_string(), value.to_vec());
            Ok(())
        })
    }

    fn create_blob(&self, key: &str, value: &[u8]) -> anyhow::Result<bool> {
        validate_blob_key(key)?;
        if self.lock_state().blobs.contains_key(key) {
            return Ok(false);
        }
        self.commit(|next| Ok(next.blobs.insert(key.to_string(), value.to_vec()).is_none()))
    }

    fn get_blob(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        validate_blob_key(key)?;
        Ok(self.lock_state().blobs.get(key).cloned())
    }

    fn delete_blob(&self, key: &str) -> anyhow::Result<bool> {
        validate_blob_key(key)?;
        if !self.lock_state().blobs.contains_key(key) {
            return Ok(false);
        }
        self.commit(|next| Ok(next.blobs.remove(key).is_some()))
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    fn health(&self) -> RegistryHealth {
        RegistryHealth {
            backend: "embedded".into(),
            connected: true,
            last_error: None,
            revision: self.revision.load(Ordering::Relaxed),
        }
    }

    fn describe(&self) -> String {
        format!("embedded ({})", self.path.display())
    }
}

/// Replaces `path` with `bytes` so that readers see the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, port: u16) -> ServiceSpec {
        hms_ctl::spec::parse(&format!("name: {name}\nport: {port}\n"), "t").unwrap()
    }

    fn range() -> Ipv4Cidr {
        "127.77.0.0/16".parse().unwrap()
    }

    #[test]
    fn deploys_survive_reopen_with_the_same_vip() {
        let dir = tempfile::tempdir().unwrap();
        let vip = {
            let s = EmbeddedStore::open(dir.path(), range()).unwrap();
            let r = s.deploy(spec("payments-svc", 7000), "node-a").unwrap();
            assert!(!r.replaced);
            r.service.vip
        };
        let s = EmbeddedStore::open(dir.path(), range()).unwrap();
        let snap = s.snapshot();
        let svc = snap.service("payments-svc").unwrap();
        assert_eq!(svc.vip, vip);
        assert_eq!(snap.by_vip(vip).unwrap().spec.port, 7000);
        assert_eq!(svc.instances[0].addr, "127.0.0.1:7000".parse().unwrap());
    }

    #[test]
    fn redeploy_replaces_and_keeps_vip_undeploy_removes() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path(), range()).unwrap();
        let a = s.deploy(spec("a", 1000), "n").unwrap();
        let b = s.deploy(spec("a", 2000), "n").unwrap();
        assert!(b.replaced);
        assert_eq!(a.service.vip, b.service.vip);
        assert_eq!(s.snapshot().service("a").unwrap().spec.port, 2000);
        assert!(s.undeploy("a").unwrap());
        assert!(!s.undeploy("a").unwrap());
        assert!(s.snapshot().is_empty());
        assert!(
            EmbeddedStore::open(dir.path(), range())
                .unwrap()
                .snapshot()
                .is_empty()
        );
    }

    #[test]
    fn spec_updates_persist_and_unknown_services_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path(), range()).unwrap();
        s.deploy(spec("a", 1000), "n").unwrap();
        s.update_spec("a", &mut |sp| {
            sp.limit = Some(hms_ctl::spec::RateLimit::parse("50rps").unwrap());
            Ok(())
        })
        .unwrap();
        assert!(s.update_spec("b", &mut |_| Ok(())).is_err());
        let reopened = EmbeddedStore::open(dir.path(), range()).unwrap();
        assert_eq!(
            reopened
                .snapshot()
                .service("a")
                .unwrap()
                .spec
                .limit
                .unwrap()
                .requests,
            50
        );
    }

    #[test]
    fn a_corrupt_file_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = EmbeddedStore::open(dir.path(), range()).err().unwrap();
        assert!(format!("{err:#}").contains("move it away"));
        assert_eq!(
            std::fs::read(dir.path().join(FILE_NAME)).unwrap(),
            b"{not json"
        );
    }

    #[test]
    fn a_changed_range_moves_vips_into_it() {
        let dir = tempfile::tempdir().unwrap();
        EmbeddedStore::open(dir.path(), range())
            .unwrap()
            .deploy(spec("a", 1), "n")
            .unwrap();
        let other: Ipv4Cidr = "127.88.0.0/24".parse().unwrap();
        let s = EmbeddedStore::open(dir.path(), other).unwrap();
        assert!(other.contains(s.snapshot().service("a").unwrap().vip));
    }
}
