//! This host's identity in the mesh and the certificate exchange that gives it one. Owns
//! the node's key and certificate, the CA duties when this host holds the CA, and keeping
//! the TLS configs current; never opens a data-path connection.
//!
//! Everything travels through the registry (blobs under `ca/`), so hosts need no other
//! channel:
//! 1. `hms-ctl ca init` on one host creates the CA there and publishes the trust bundle
//!    (`ca/bundle`); that host signs its own certificate directly.
//! 2. `hms-ctl node token create --node NAME` on the CA host prints a single-use, expiring
//!    token bound to NAME (refused for a name that is already a member), carrying the CA's
//!    fingerprint and, with a secured registry, a bootstrap credential (`join.rs`).
//! 3. A joining host (`join.rs`, before its registry connection) posts
//!    `ca/join/<node>` = {token, CSRs}; the CA host redeems the token, admits the host
//!    (member record, etcd user and role) and answers in the same key; the joining host
//!    checks the answer's bundle holds the pinned root and installs it. Private keys never
//!    travel.
//! 4. At half-life (or when the bundle's current root changed) a host publishes
//!    `ca/renew/<node>`, signed with its current key; the CA host answers in
//!    `ca/issued/<node>`. Open connections are never cut: TLS configs pick up the new
//!    certificate and bundle for new handshakes.
//! 5. `hms-ctl ca rotate` adds a new root (published bundle trusts both, and carries the new
//!    root's cross-certificate signed by the old one); every host renews onto it; once every
//!    registered host did, the old root is retired and the one-root bundle published.
//!
//! A bundle in the registry (`ca/bundle`, or the one inside `ca/issued/<node>`) is never
//! believed on its own: a host installs it only if the roots it already trusts vouch for
//! every root in it ([`TrustBundle::admits`]); the CA host trusts only the roots it made.
//! A refused bundle is logged once and counted (`hms_identity_trust_bundle_refused_total`,
//! `hms-ctl status`); a host the mesh's bundle no longer trusts says so and how to re-join.
//!
//! On a single host with the embedded registry the agent makes its own CA in its state dir.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::identity::etcd_ca::{EtcdCa, join_user};
use crate::identity::join_ticket::{EtcdBootstrap, JoinTicket};
use crate::identity::{
    BundleRefused, CA_DIR, CaBackup, CertificateAuthority, IssuedCertificate, NodeIdentity,
    RenewalRequest, TlsIdentity, TrustBundle,
};
use crate::join::JoinMessage;
use crate::registry::Store;

/// The registry blob holding the mesh's trust bundle (JSON [`TrustBundle`]), written by the
/// CA host only. Every reference to it goes through this constant.
pub const TRUST_BUNDLE_KEY: &str = "ca/bundle";
const BUNDLE: &str = TRUST_BUNDLE_KEY;
const DEFAULT_TRUST_DOMAIN: &str = "hms.local";
/// Node certificates live this long (renewed at half-life).
pub const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
const TICK: Duration = Duration::from_millis(300);

fn renew_key(node: &str) -> String {
    format!("ca/renew/{node}")
}
fn issued_key(node: &str) -> String {
    format!("ca/issued/{node}")
}

struct Inner {
    node: Option<NodeIdentity>,
    ca: Option<CertificateAuthority>,
    /// Digests of join/renew requests already answered (the CA host).
    answered: HashSet<u64>,
    /// Hosts still to move onto the new root after a rotation (the CA host).
    rotation_pending: Option<HashSet<String>>,
    /// Hosts given a certificate of the new root during a rotation, with its expiry (unix
    /// ms), until their registry record shows they installed it (the CA host).
    rotation_installing: HashMap<String, u64>,
    /// The serial of the certificate we asked to replace, so we ask once.
    renewal_asked_for: Option<String>,
    /// The two-root bundle we already renewed for (a rotation asks once per host).
    renewed_for_bundle: Option<String>,
    /// The CA host has published its bundle and admitted itself (once per start).
    ca_ready: bool,
    /// When the CA host last ended the bootstrap credentials of hosts that joined.
    joins_swept: Option<std::time::Instant>,
    /// Digests of registry values whose bundle was refused (each is logged and counted once).
    refused: HashSet<u64>,
    /// Roots this CA retired while running (the registry may still show them a moment).
    retired_roots: HashSet<String>,
    /// Why this host's certificate is not trusted by the mesh's bundle, with what to do.
    trust_problem: Option<String>,
}

pub struct MeshIdentity {
    store: Arc<dyn Store>,
    node_name: String,
    state_dir: PathBuf,
    trust_domain: Option<String>,
    inner: Mutex<Inner>,
    tls: RwLock<Option<TlsIdentity>>,
    /// Distinct trust bundles from the registry this host refused.
    bundles_refused: AtomicU64,
    /// Whether the mesh's bundle no longer trusts this host's certificate.
    trust_broken: AtomicBool,
}

/// For `hms-ctl status`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct IdentitySummary {
    pub spiffe_id: Option<String>,
    pub cert_not_after_unix: Option<u64>,
    pub holds_ca: bool,
    pub trust_bundle_roots: usize,
    pub waiting_for: Option<String>,
    /// `sha256:<hex>` of each trusted root.
    pub root_fingerprints: Vec<String>,
    /// Distinct trust bundles from the registry refused since start.
    pub trust_bundle_refused_total: u64,
    /// The mesh's bundle does not trust this host's certificate: why, and what to do.
    pub trust_problem: Option<String>,
}

/// The CA host's own node certificate, signed directly (it needs no join).
pub fn own_certificate(
    state_dir: &std::path::Path,
    ca: &CertificateAuthority,
    node_name: &str,
) -> anyhow::Result<NodeIdentity> {
    let mut node = NodeIdentity::load_or_create(state_dir, ca.trust_domain(), node_name)?;
    let csr = node.create_csr()?;
    let issued = ca.sign_node_csr(&csr, node_name, CERT_TTL)?;
    node.install_issued(&issued)?;
    Ok(node)
}

fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MeshIdentity {
    /// Loads what this host already has (CA, key, certificate) from its state dir.
    pub fn open(
        store: Arc<dyn Store>,
        node_name: &str,
        state_dir: PathBuf,
        trust_domain: Option<String>,
        single_host: bool,
    ) -> anyhow::Result<Arc<MeshIdentity>> {
        let this = MeshIdentity {
            store,
            node_name: node_name.to_string(),
            state_dir: state_dir.clone(),
            trust_domain,
            inner: Mutex::new(Inner {
                node: None,
                ca: None,
                answered: HashSet::new(),
                rotation_pending: None,
                rotation_installing: HashMap::new(),
                renewal_asked_for: None,
                renewed_for_bundle: None,
                ca_ready: single_host,
                joins_swept: None,
                refused: HashSet::new(),
                retired_roots: HashSet::new(),
                trust_problem: None,
            }),
            tls: RwLock::new(None),
            bundles_refused: AtomicU64::new(0),
            trust_broken: AtomicBool::new(false),
        };
        {
            let mut inner = this.inner.try_lock().expect("fresh mutex");
            if single_host {
                let td = this
                    .trust_domain
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
                let (ca, node) = crate::identity::bootstrap_local(&state_dir, &td, node_name)
                    .context("making this host's own CA (single host)")?;
                inner.ca = Some(ca);
                inner.node = Some(node);
            } else if let Ok(ca) = CertificateAuthority::load(&state_dir) {
                inner.node = Some(NodeIdentity::load_or_create(
                    &state_dir,
                    ca.trust_domain(),
                    node_name,
                )?);
                inner.ca = Some(ca);
            } else if let Some(td) = this.known_trust_domain() {
                inner.node = Some(NodeIdentity::load_or_create(&state_dir, &td, node_name)?);
            }
            this.refresh_tls(&inner)?;
        }
        Ok(Arc::new(this))
    }

    fn known_trust_domain(&self) -> Option<String> {
        self.trust_domain.clone().or_else(|| {
            let snap = self.store.snapshot();
            let b = snap.blob(BUNDLE)?;
            serde_json::from_slice::<TrustBundle>(b)
                .ok()
                .map(|b| b.trust_domain().to_string())
        })
    }

    /// The TLS identity, once this host has a certificate.
    pub fn tls(&self) -> Option<TlsIdentity> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn trust_domain(&self) -> Option<String> {
        self.tls().map(|t| t.spiffe_id().trust_domain().to_string())
    }

    fn refresh_tls(&self, inner: &Inner) -> anyhow::Result<()> {
        let Some(node) = &inner.node else {
            return Ok(());
        };
        if node.not_after().is_none() || node.trust_bundle().is_none() {
            return Ok(());
        }
        let mut tls = self.tls.write().unwrap_or_else(|p| p.into_inner());
        match tls.as_ref() {
            Some(t) => t.update_from(node)?,
            None => *tls = Some(TlsIdentity::from_node(node)?),
        }
        Ok(())
    }

    pub async fn summary(&self) -> IdentitySummary {
        let inner = self.inner.lock().await;
        let status = inner.node.as_ref().map(|n| n.status());
        IdentitySummary {
            spiffe_id: status.as_ref().map(|s| s.spiffe_id.to_string()),
            cert_not_after_unix: inner.node.as_ref().and_then(|n| n.not_after()).map(unix),
            holds_ca: inner.ca.is_some(),
            trust_bundle_roots: status.map(|s| s.trust_bundle_roots).unwrap_or(0),
            root_fingerprints: inner
                .node
                .as_ref()
                .and_then(|n| n.trust_bundle())
                .map(TrustBundle::root_fingerprints)
                .unwrap_or_default(),
            trust_bundle_refused_total: self.trust_bundles_refused(),
            trust_problem: inner.trust_problem.clone(),
            waiting_for: if self.tls().is_some() {
                None
            } else if inner.node.is_none() {
                Some("a CA: run `hms-ctl ca init --trust-domain DOMAIN` on one host (or `hms-node-agent init-mesh` before etcd starts), or start this one with --join-token-file".into())
            } else {
                Some("a certificate from the CA host (is the CA host's agent running?)".into())
            },
        }
    }

    /// Distinct trust bundles from the registry refused since start (for `/metrics`).
    pub fn trust_bundles_refused(&self) -> u64 {
        self.bundles_refused.load(Ordering::Relaxed)
    }

    /// Whether the mesh's bundle no longer trusts this host's certificate (for `/metrics`).
    pub fn trust_chain_broken(&self) -> bool {
        self.trust_broken.load(Ordering::Relaxed)
    }

    /// Logs and counts a refused bundle, once per distinct registry value.
    fn refuse(&self, seen: &mut HashSet<u64>, value: &[u8], source: &str, why: &BundleRefused) {
        if !seen.insert(digest(value)) {
            return;
        }
        self.bundles_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            root = %why.root_fingerprint,
            source,
            "refused a trust bundle from the registry: {}; this host keeps the roots it trusts. \
             Only `hms-ctl ca rotate` on the CA host adds a root (with a cross-certificate by \
             the current one): whoever wrote this bundle can write the registry",
            why.reason
        );
    }

    /// Records whether `mesh` (the registry's bundle) still trusts this host's certificate.
    fn check_chain(&self, inner: &mut Inner, mesh: &TrustBundle, now: SystemTime) {
        let Some(node) = inner.node.as_ref() else {
            return;
        };
        let problem = node.verify_certificate_against(mesh, now).err().map(|e| {
            format!(
                "the mesh's trust bundle (roots {}) does not trust this host's certificate ({e}): \
                 it missed a CA rotation while away, or the registry's bundle was replaced. \
                 Calls to and from other hosts fail until it re-joins: on the CA host run \
                 `hms-ctl node remove {name}` and `hms-ctl node token create --node {name} \
                 --out FILE`, copy FILE here, then stop this agent, remove {}, and start it \
                 again with --join-token-file FILE",
                mesh.root_fingerprints().join(", "),
                self.state_dir.join(crate::identity::IDENTITY_DIR).display(),
                name = self.node_name,
            )
        });
        if problem.is_some() && problem != inner.trust_problem {
            tracing::error!("{}", problem.as_deref().unwrap_or_default());
        } else if problem.is_none() && inner.trust_problem.is_some() {
            tracing::info!("the mesh's trust bundle trusts this host's certificate again");
        }
        self.trust_broken
            .store(problem.is_some(), Ordering::Relaxed);
        inner.trust_problem = problem;
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn Store>) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store)).await?
    }

    async fn publish_bundle(&self, bundle: &TrustBundle) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(bundle)?;
        self.blocking(move |s| s.put_blob(BUNDLE, &bytes)).await
    }

    /// `hms-ctl ca init`: make this host the mesh's CA.
    pub async fn ca_init(&self, trust_domain: &str) -> anyhow::Result<IdentitySummary> {
        {
            let mut inner = self.inner.lock().await;
            if let Some(ca) = &inner.ca {
                if ca.trust_domain() == trust_domain {
                    drop(inner);
                    return Ok(self.summary().await);
                }
                bail!(
                    "this host already holds the CA of trust domain `{}`",
                    ca.trust_domain()
                );
            }
            if let Some(existing) = self.store.snapshot().blob(BUNDLE) {
                let td = serde_json::from_slice::<TrustBundle>(existing)
                    .map(|b| b.trust_domain().to_string())
                    .unwrap_or_default();
                bail!(
                    "the mesh already has a CA (trust domain `{td}`) on another host; join it with a token from `hms-ctl node token create` there"
                );
            }
            let ca = CertificateAuthority::init(&self.state_dir, trust_domain)?;
            let bundle = ca.trust_bundle();
            let claimed = {
                let bytes = serde_json::to_vec(&bundle)?;
                self.blocking(move |s| s.create_blob(BUNDLE, &bytes))
                    .await?
            };
            if !claimed {
                bail!("another host created the mesh's CA at the same moment; join it instead");
            }
            let node = own_certificate(&self.state_dir, &ca, &self.node_name)?;
            inner.ca = Some(ca);
            inner.node = Some(node);
            self.refresh_tls(&inner)?;
            tracing::info!(trust_domain, "this host now holds the mesh CA");
        }
        Ok(self.summary().await)
    }

    /// `hms-ctl ca backup`: the CA directory as one document (it holds the root keys).
    pub async fn ca_backup(&self) -> anyhow::Result<CaBackup> {
        let inner = self.inner.lock().await;
        let ca = inner.ca.as_ref().context(
            "this host does not hold the CA; run this on the host where `hms-ctl ca init` ran",
        )?;
        let backup = ca.backup()?;
        tracing::info!(trust_domain = %backup.trust_domain, files = backup.files.len(), "the CA's keys were backed up through the admin socket");
        Ok(backup)
    }

    /// `hms-ctl ca restore`: makes this host the CA again from a backup. With a CA here
    /// already it refuses unless `force`, and then moves the current CA directory aside
    /// (0700, named in the answer) before restoring. A backup of another trust domain than
    /// the registry's bundle is refused: its certificates would be trusted by no host.
    /// Returns the identity summary and where the replaced CA went, if one was.
    pub async fn ca_restore(
        &self,
        backup: CaBackup,
        force: bool,
    ) -> anyhow::Result<(IdentitySummary, Option<PathBuf>)> {
        let mut inner = self.inner.lock().await;
        let registry_bundle = self
            .store
            .snapshot()
            .blob(BUNDLE)
            .and_then(|b| serde_json::from_slice::<TrustBundle>(b).ok());
        if let Some(b) = &registry_bundle
            && b.trust_domain() != backup.trust_domain
        {
            bail!(
                "the backup is of trust domain `{}` but this mesh's is `{}`; restore it on a host of that mesh",
                backup.trust_domain,
                b.trust_domain()
            );
        }
        let ca_dir = self.state_dir.join(CA_DIR);
        let mut replaced = None;
        if inner.ca.is_some() || ca_dir.exists() {
            if !force {
                bail!(
                    "this host already holds a CA ({}); to replace it run `hms-ctl ca restore FILE --force` (the current one is moved aside first, and kept)",
                    ca_dir.display()
                );
            }
            let stamp = unix(SystemTime::now());
            let aside = self.state_dir.join(format!("{CA_DIR}-replaced-{stamp}"));
            std::fs::rename(&ca_dir, &aside)
                .with_context(|| format!("moving the current CA aside to {}", aside.display()))?;
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("restricting {}", aside.display()))?;
            }
            tracing::warn!(aside = %aside.display(), "ca restore --force: the CA that was here is kept there");
            inner.ca = None;
            replaced = Some(aside);
        }
        let ca = CertificateAuthority::restore(&self.state_dir, &backup)?;
        let bundle = ca.trust_bundle();
        if let Some(b) = &registry_bundle
            && b.fingerprint() != bundle.fingerprint()
        {
            tracing::warn!(
                "the restored CA's roots differ from the registry's trust bundle (a rotation after the backup?); publishing the restored roots"
            );
        }
        let node = own_certificate(&self.state_dir, &ca, &self.node_name)?;
        inner.ca = Some(ca);
        inner.node = Some(node);
        self.refresh_tls(&inner)?;
        drop(inner);
        if registry_bundle.as_ref().map(|b| b.fingerprint()) != Some(bundle.fingerprint()) {
            self.publish_bundle(&bundle).await?;
        }
        tracing::info!(trust_domain = %bundle.trust_domain(), "this host holds the mesh CA again (restored from a backup)");
        Ok((self.summary().await, replaced))
    }

    /// `hms-ctl node token create --node NAME`: a token bound to NAME, carrying the CA's
    /// fingerprint and (secured registry) a bootstrap credential that can only post NAME's
    /// join request.
    pub async fn create_token(
        &self,
        node: &str,
        ttl: Duration,
    ) -> anyhow::Result<(crate::identity::JoinToken, String)> {
        crate::registry::etcd::validate_node_name(node)?;
        let member = {
            let node = node.to_string();
            self.blocking(move |s| s.is_member(&node)).await?
        };
        if member || node == self.node_name {
            bail!(
                "`{node}` is already a member of the mesh; a name cannot be taken twice (if that host is gone: `hms-ctl node remove {node}` first)"
            );
        }
        let mut inner = self.inner.lock().await;
        let ca = inner.ca.as_mut().context(
            "this host does not hold the CA; run this on the host where `hms-ctl ca init` ran",
        )?;
        let token = ca.create_join_token(Some(node), ttl, SystemTime::now())?;
        let bundle = ca.trust_bundle();
        let current_root = bundle
            .roots_der()
            .last()
            .map(|d| crate::identity::root_fingerprint(d))
            .context("the CA has no root")?;
        let trust_domain = ca.trust_domain().to_string();
        drop(inner);
        let etcd = if self.store.snapshot().secured() {
            let etcd_ca = EtcdCa::load_or_create(&self.state_dir.join(CA_DIR), &trust_domain)?;
            let cred = etcd_ca.client(&join_user(node), Some(ttl))?;
            let n = node.to_string();
            self.blocking(move |s| s.allow_join(&n)).await?;
            Some(EtcdBootstrap {
                ca_pem: etcd_ca.cert_pem().to_string(),
                cert_pem: cred.cert_pem,
                key_pem: cred.key_pem,
            })
        } else {
            None
        };
        let ticket = JoinTicket {
            node: node.to_string(),
            trust_domain,
            secret: token.secret.clone(),
            ca_sha256: current_root,
            etcd,
        };
        Ok((token, ticket.encode()))
    }

    /// `hms-ctl ca rotate`: a new root; hosts move onto it; the old one is retired after.
    pub async fn rotate(&self) -> anyhow::Result<IdentitySummary> {
        {
            let mut inner = self.inner.lock().await;
            let ca = inner.ca.as_mut().context(
                "this host does not hold the CA; run this on the host where `hms-ctl ca init` ran",
            )?;
            ca.rotate()?;
            let bundle = ca.trust_bundle();
            let pending: HashSet<String> = self
                .store
                .snapshot()
                .nodes()
                .map(|n| n.name.clone())
                .chain(std::iter::once(self.node_name.clone()))
                .collect();
            inner.rotation_pending = Some(pending);
            inner.rotation_installing.clear();
            drop(inner);
            self.publish_bundle(&bundle).await?;
            tracing::info!("CA rotation started: new root published beside the old one");
        }
        Ok(self.summary().await)
    }

    /// Keeps the identity current until drained.
    pub async fn run(self: Arc<Self>, drain: crate::drain::Drain) {
        loop {
            if let Err(e) = self.step().await {
                tracing::warn!("identity: {e:#}");
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = drain.signaled() => return,
            }
        }
    }

    /// Installs the bundles the registry offers (`ca/bundle`, and the one that comes with a
    /// certificate in `ca/issued/<us>`) only as far as this host's trusted roots vouch for
    /// them; the CA host trusts its own roots alone.
    fn install_trusted_bundles(
        &self,
        inner: &mut Inner,
        snapshot: &crate::registry::Snapshot,
        now: SystemTime,
    ) -> anyhow::Result<()> {
        let Inner {
            node,
            ca,
            refused,
            retired_roots,
            ..
        } = &mut *inner;
        let Some(node) = node.as_mut() else {
            return Ok(());
        };
        let published = snapshot.blob(BUNDLE);
        let parsed = published.map(|b| serde_json::from_slice::<TrustBundle>(b));
        if let (Some(raw), Some(Err(e))) = (published, &parsed) {
            let why = BundleRefused {
                root_fingerprint: String::new(),
                reason: format!("it is not a trust bundle: {e}"),
            };
            self.refuse(refused, raw, BUNDLE, &why);
        }
        let mesh = parsed.and_then(Result::ok);

        if let Some(ca) = ca.as_ref() {
            // The CA host: its node trusts exactly the CA's roots, never the registry's.
            let own = ca.trust_bundle();
            if node.trust_bundle().map(TrustBundle::fingerprint) != Some(own.fingerprint())
                && node.not_after().is_some()
            {
                node.install_trust_bundle(&own)?;
            }
            if let (Some(raw), Some(b)) = (published, mesh.as_ref())
                && b.fingerprint() != own.fingerprint()
            {
                let mine = own.root_fingerprints();
                let foreign = b
                    .root_fingerprints()
                    .into_iter()
                    .find(|f| !mine.contains(f) && !retired_roots.contains(f));
                let why = if b.trust_domain() != own.trust_domain() {
                    Some(BundleRefused {
                        root_fingerprint: b
                            .root_fingerprints()
                            .first()
                            .cloned()
                            .unwrap_or_default(),
                        reason: format!(
                            "it is for trust domain {:?}, this CA serves {:?}",
                            b.trust_domain(),
                            own.trust_domain()
                        ),
                    })
                } else {
                    foreign.map(|f| BundleRefused {
                        root_fingerprint: f,
                        reason: "this CA host did not make that root".into(),
                    })
                };
                if let Some(why) = why {
                    self.refuse(refused, raw, BUNDLE, &why);
                }
            }
            return Ok(());
        }

        if node.not_after().is_none() {
            return Ok(());
        }
        if let (Some(raw), Some(b), Some(trusted)) =
            (published, mesh.as_ref(), node.trust_bundle().cloned())
            && b.fingerprint() != trusted.fingerprint()
        {
            match trusted.admits(b, now) {
                Ok(()) if node.verify_certificate_against(b, now).is_ok() => {
                    node.install_trust_bundle(b)?;
                    tracing::info!(
                        roots = b.len(),
                        fingerprints = %b.root_fingerprints().join(","),
                        "installed the mesh's trust bundle (every root vouched for)"
                    );
                }
                // Vouched for, but it no longer trusts our certificate: keep ours;
                // check_chain below says what to do.
                Ok(()) => {}
                Err(why) => self.refuse(refused, raw, BUNDLE, &why),
            }
        }
        // A certificate addressed to us that we do not have yet: its bundle passes the same
        // test before `install_issued` may install it (the lead's join flow pins the first
        // one). One we installed already is not judged again: its bundle is older than ours.
        let key = issued_key(&self.node_name);
        let current = node.status().certificate.map(|c| c.serial);
        if let Some(raw) = snapshot.blob(&key)
            && let Ok(issued) = serde_json::from_slice::<IssuedCertificate>(raw)
            && current.as_deref() != Some(issued.serial.as_str())
            && issued.not_after > now
            && let Some(trusted) = node.trust_bundle()
            && let Err(why) = trusted.admits(&issued.trust_bundle, now)
        {
            self.refuse(refused, raw, &key, &why);
        }
        if let Some(b) = mesh.as_ref() {
            self.check_chain(inner, b, now);
        }
        Ok(())
    }

    async fn step(&self) -> anyhow::Result<()> {
        let snapshot = self.store.snapshot();
        let mut inner = self.inner.lock().await;
        let now = SystemTime::now();

        // A host that learned the trust domain only now (from the registry) gets its key.
        if inner.node.is_none()
            && let Some(td) = self.known_trust_domain()
        {
            inner.node = Some(NodeIdentity::load_or_create(
                &self.state_dir,
                &td,
                &self.node_name,
            )?);
        }

        if inner.ca.is_some() {
            self.ca_duties(&mut inner, &snapshot).await?;
        }
        // The CA host answers join and renewal requests.
        if inner.ca.is_some() {
            let mut answers: Vec<(String, IssuedCertificate)> = Vec::new();
            let requests: Vec<(String, Arc<[u8]>)> = snapshot
                .blobs_under("ca/join/")
                .chain(snapshot.blobs_under("ca/renew/"))
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            // During a rotation nothing is signed by the new root until every live host
            // still to move has asked to renew: a host asks only once it installed the
            // two-root bundle, so no host meets a new-root certificate it does not trust yet.
            let live: HashSet<String> = snapshot.nodes().map(|n| n.name.clone()).collect();
            let asking: HashSet<&str> = requests
                .iter()
                .filter(|(_, v)| !inner.answered.contains(&digest(v)))
                .filter_map(|(k, _)| k.strip_prefix("ca/renew/"))
                .collect();
            let hold_rotation = inner.rotation_pending.as_ref().is_some_and(|p| {
                p.iter().any(|n| {
                    *n != self.node_name && live.contains(n) && !asking.contains(n.as_str())
                })
            });
            for (key, value) in requests {
                let d = digest(&value);
                if inner.answered.contains(&d) {
                    continue;
                }
                if hold_rotation
                    && let Some(node) = key.strip_prefix("ca/renew/")
                    && inner
                        .rotation_pending
                        .as_ref()
                        .is_some_and(|p| p.contains(node))
                {
                    continue;
                }
                inner.answered.insert(d);
                if let Some(node) = key.strip_prefix("ca/join/") {
                    if let Ok(JoinMessage::Request {
                        token,
                        csr_pem,
                        etcd_csr_pem,
                    }) = serde_json::from_slice::<JoinMessage>(&value)
                    {
                        let answer = self
                            .answer_join(&mut inner, node, &token, &csr_pem, etcd_csr_pem, now)
                            .await
                            .unwrap_or_else(|e| {
                                tracing::warn!(%node, "refused a join request: {e:#}");
                                JoinMessage::Refused {
                                    reason: format!("{e:#}"),
                                }
                            });
                        let bytes = serde_json::to_vec(&answer)?;
                        let key = crate::join::join_blob(node);
                        inner.answered.insert(digest(&bytes));
                        self.blocking(move |s| s.put_blob(&key, &bytes)).await?;
                    }
                    continue;
                }
                let node = key.trim_start_matches("ca/renew/").to_string();
                if !snapshot.is_member(&node) {
                    tracing::warn!(%node, "refused a renewal: the host is not a member (removed?)");
                    continue;
                }
                let ca = inner.ca.as_mut().expect("checked above");
                let result = serde_json::from_slice::<RenewalRequest>(&value)
                    .context("malformed renewal request")
                    .and_then(|r| ca.renew(&r, CERT_TTL, now).map_err(anyhow::Error::from))
                    .map(|c| (node, c));
                match result {
                    Ok((node, cert)) => {
                        tracing::info!(%node, serial = %cert.serial, "issued a node certificate");
                        answers.push((node, cert));
                    }
                    Err(e) => {
                        tracing::warn!(request = %key, "refused a certificate request: {e:#}")
                    }
                }
            }
            for (node, cert) in answers {
                if let Some(p) = inner.rotation_pending.as_mut()
                    && p.remove(&node)
                {
                    inner
                        .rotation_installing
                        .insert(node.clone(), unix(cert.not_after) * 1000);
                }
                let bytes = serde_json::to_vec(&cert)?;
                self.blocking(move |s| s.put_blob(&issued_key(&node), &bytes))
                    .await?;
            }
            // Our own certificate: renew directly.
            let own_due = inner.node.as_ref().is_some_and(|n| n.needs_renewal(now))
                || (!hold_rotation
                    && inner
                        .rotation_pending
                        .as_ref()
                        .is_some_and(|p| p.contains(&self.node_name)));
            if own_due {
                let ca = inner.ca.take().expect("checked above");
                let node = inner.node.as_mut().context("CA host without a node key")?;
                let csr = node.create_csr()?;
                let issued = ca.sign_node_csr(&csr, &self.node_name, CERT_TTL);
                inner.ca = Some(ca);
                let issued = issued?;
                inner
                    .node
                    .as_mut()
                    .expect("checked above")
                    .install_issued(&issued)?;
                if let Some(p) = inner.rotation_pending.as_mut() {
                    p.remove(&self.node_name);
                }
                self.refresh_tls(&inner)?;
            }
            // Every host moved onto the new root and installed its certificate (its registry
            // record shows the new expiry; a host that left needs nothing): retire the old
            // one. Retiring when a certificate is merely issued would refuse the host's old
            // certificate in the moment before it installs the new one.
            inner.rotation_installing.retain(|n, not_after_ms| {
                snapshot
                    .node(n)
                    .is_some_and(|r| r.cert_expiry_unix_ms.is_none_or(|e| e < *not_after_ms))
            });
            let installed = inner.rotation_installing.is_empty();
            if let Some(p) = inner.rotation_pending.as_mut() {
                p.retain(|n| live.contains(n) || *n == self.node_name);
                if p.is_empty() && installed {
                    inner.rotation_pending = None;
                    let ca = inner.ca.as_mut().expect("checked above");
                    let before = ca.trust_bundle().root_fingerprints();
                    ca.retire_old()?;
                    let bundle = ca.trust_bundle();
                    let kept = bundle.root_fingerprints();
                    inner
                        .retired_roots
                        .extend(before.into_iter().filter(|f| !kept.contains(f)));
                    tracing::info!("CA rotation done: old root retired");
                    let bytes = serde_json::to_vec(&bundle)?;
                    self.blocking(move |s| s.put_blob(BUNDLE, &bytes)).await?;
                }
            }
        }

        if inner.node.is_none() {
            return Ok(());
        }
        self.install_trusted_bundles(&mut inner, &snapshot, now)?;
        let holds_ca = inner.ca.is_some();
        let node = inner.node.as_mut().expect("checked above");
        // A certificate addressed to us that we do not have yet (never on the CA host, which
        // signs its own; never with a bundle our roots do not vouch for).
        if let Some(b) = snapshot.blob(&issued_key(&self.node_name))
            && !holds_ca
            && let Ok(issued) = serde_json::from_slice::<IssuedCertificate>(b)
            && node
                .trust_bundle()
                .is_none_or(|t| t.admits(&issued.trust_bundle, now).is_ok())
        {
            let current = node.status().certificate.map(|c| c.serial);
            if current.as_deref() != Some(issued.serial.as_str()) && issued.not_after > now {
                match node.install_issued(&issued) {
                    Ok(()) => {
                        tracing::info!(serial = %issued.serial, "installed a new node certificate")
                    }
                    Err(e) => tracing::debug!("issued certificate not for our current key: {e}"),
                }
            }
        }
        let has_cert = node.not_after().is_some_and(|t| t > now);
        if has_cert && inner.ca.is_none() {
            // Renew at half-life, or when the bundle's roots changed since issuance
            // (a CA rotation).
            let node = inner.node.as_ref().expect("checked above");
            let serial = node.status().certificate.map(|c| c.serial);
            let bundle_fp = node.trust_bundle().map(|b| b.fingerprint());
            let two_roots = node.trust_bundle().is_some_and(|b| b.len() > 1);
            let needs_renewal = node.needs_renewal(now);
            let rotated = two_roots && inner.renewed_for_bundle != bundle_fp;
            let due = needs_renewal && inner.renewal_asked_for != serial;
            if rotated || due {
                let node = inner.node.as_mut().expect("checked above");
                let request = node.create_renewal_request()?;
                let bytes = serde_json::to_vec(&request)?;
                let key = renew_key(&self.node_name);
                self.blocking(move |s| s.put_blob(&key, &bytes)).await?;
                inner.renewal_asked_for = serial;
                if rotated {
                    inner.renewed_for_bundle = bundle_fp;
                }
                tracing::info!(
                    rotated,
                    "asked the CA host to renew this host's certificate"
                );
            }
        }
        self.refresh_tls(&inner)?;
        Ok(())
    }

    /// Once per start on the CA host: the bundle is in the registry and this host is a
    /// member (after `init-mesh` neither is yet). Every few seconds: the bootstrap
    /// credentials of hosts that have joined (their node record is up) end.
    async fn ca_duties(
        &self,
        inner: &mut Inner,
        snapshot: &crate::registry::Snapshot,
    ) -> anyhow::Result<()> {
        if !inner.ca_ready {
            let ca = inner.ca.as_ref().expect("checked by the caller");
            if snapshot.blob(BUNDLE).is_none() {
                let bytes = serde_json::to_vec(&ca.trust_bundle())?;
                self.blocking(move |s| s.create_blob(BUNDLE, &bytes).map(drop))
                    .await?;
            }
            let me = self.node_name.clone();
            self.blocking(move |s| {
                if s.is_member(&me)? {
                    return Ok(());
                }
                s.admit(&me)
            })
            .await?;
            inner.ca_ready = true;
        }
        let due = inner
            .joins_swept
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3));
        if due && snapshot.secured() {
            inner.joins_swept = Some(std::time::Instant::now());
            let pending = self.blocking(|s| s.pending_joins()).await?;
            for node in pending {
                if snapshot.node(&node).is_some() {
                    self.blocking(move |s| s.end_join(&node)).await?;
                }
            }
        }
        Ok(())
    }

    /// A join request: the name must be new, the token valid and bound to it; then the host
    /// is admitted (member record, etcd user and role) and gets its certificates.
    async fn answer_join(
        &self,
        inner: &mut Inner,
        node: &str,
        token: &str,
        csr_pem: &str,
        etcd_csr_pem: Option<String>,
        now: SystemTime,
    ) -> anyhow::Result<JoinMessage> {
        let n = node.to_string();
        if node == self.node_name || self.blocking(move |s| s.is_member(&n)).await? {
            bail!("`{node}` is already a member of the mesh; a name cannot be taken twice");
        }
        let ca = inner
            .ca
            .as_mut()
            .context("this host does not hold the CA")?;
        let issued = ca.redeem_and_sign(token, csr_pem, node, CERT_TTL, now)?;
        let etcd_cert_pem = match etcd_csr_pem {
            Some(csr) => {
                let etcd_ca =
                    EtcdCa::load_or_create(&self.state_dir.join(CA_DIR), ca.trust_domain())?;
                Some(etcd_ca.sign_client_csr(&csr, node)?)
            }
            None => None,
        };
        let n = node.to_string();
        self.blocking(move |s| s.admit(&n)).await?;
        tracing::info!(%node, serial = %issued.serial, "admitted a host to the mesh");
        Ok(JoinMessage::Answer {
            issued: Box::new(issued),
            etcd_cert_pem,
        })
    }
}
