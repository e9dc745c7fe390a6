//! The etcd registry: several hosts share one registry. Owns the connection to etcd, this
//! host's lease, and the list+watch that keeps a local [`View`] current. It never makes the
//! data path wait: readers get the last published [`Snapshot`], also while etcd is down.
//!
//! - **Reading**: one list of the prefix, then one watch from the revision after it. Every
//!   watch response updates the view in place (only the entries its events are about) and
//!   publishes a clone of it that shares everything unchanged (`view.rs`). A broken watch is resumed
//!   from the last applied revision with backoff (so no change is missed); if that revision
//!   was compacted meanwhile, the prefix is listed again.
//! - **Writing**: global records (spec + VIP) are changed in transactions that compare the
//!   record's revision, retrying on conflict; a new service claims `vips/<ip>` in the same
//!   transaction (create only if absent), so two hosts can never take one VIP: its name's
//!   hash slot first, the next slots when etcd says a slot is taken (`operator.rs`), never a
//!   read of every claim unless the range is crowded.
//! - **Liveness**: this host's instances and node record carry its lease (default 10 s,
//!   renewed every third of it). A dead host stops renewing and etcd deletes its keys. A
//!   lease that expired while etcd was unreachable is replaced and the keys written again.
//!
//! Write methods return once this store's own snapshot shows the change (read your writes).

mod access;
mod keys;
mod operator;
mod view;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use hms_ctl::api::{DeployResult, NodeInfo, RegistryHealth, ServiceInfo};
use hms_ctl::spec::ServiceSpec;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Snapshot, Store, local_addrs, validate_blob_key};
use crate::config::Ipv4Cidr;
pub use crate::identity::etcd_ca::CredentialFiles;
pub use keys::{DEFAULT_PREFIX, Key, validate_node_name};
pub use operator::RemovedNode;
use view::{InstanceRecord, ServiceRecord, View};

/// How often a write retries after losing a race with another host before giving up.
const MAX_TXN_ATTEMPTS: usize = 64;
/// etcd's default limit on operations in one transaction is 128.
const MAX_TXN_OPS: usize = 100;
/// Keys per page when listing: a page of records stays far below the gRPC client's 4 MiB
/// answer limit (a service record is a few hundred bytes of JSON).
const LIST_PAGE: i64 = 1000;

/// How to reach etcd and how this host appears in it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `HOST:PORT` or `http://HOST:PORT`, one per member.
    pub endpoints: Vec<String>,
    /// This host's name: its instances and node record are keyed by it.
    pub node: String,
    /// Where new VIPs come from. Every host must use the same range.
    pub vip_range: Ipv4Cidr,
    /// Every key lives under this prefix.
    pub prefix: String,
    /// Lifetime of this host's lease: how long a dead host's instances stay visible.
    pub lease_ttl: Duration,
    /// Upper bound on one request to etcd.
    pub request_timeout: Duration,
    /// Upper bound on the wait between reconnection attempts.
    pub max_backoff: Duration,
    /// TLS with this client credential (`etcds://`): etcd then knows who writes, and its
    /// roles limit each host to its own records (see `access.rs`). None: plaintext, where
    /// anyone who reaches etcd can write anything (development only).
    pub tls: Option<CredentialFiles>,
    /// This connection is the operator's (the CA host, etcd's `root` user): it places
    /// services, admits and removes hosts and keeps the roles that enforce both.
    pub operator: bool,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, node: &str, vip_range: Ipv4Cidr) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            node: node.to_string(),
            vip_range,
            prefix: DEFAULT_PREFIX.to_string(),
            lease_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            max_backoff: Duration::from_secs(1),
            tls: None,
            operator: false,
        }
    }
}

/// A client of `endpoints` (plaintext, or TLS with a client credential).
pub(crate) async fn connect_client(
    endpoints: &[String],
    tls: Option<(&str, &str, &str)>,
    timeout: Duration,
) -> anyhow::Result<Client> {
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout)
        .with_keep_alive_while_idle(true);
    let scheme = if tls.is_some() { "https://" } else { "http://" };
    let urls: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let bare = e
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            format!("{scheme}{bare}")
        })
        .collect();
    if let Some((ca, cert, key)) = tls {
        connect = connect.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        );
    }
    within(timeout, Client::connect(&urls, Some(connect))).await
}

pub struct EtcdStore {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    client: Client,
    opts: EtcdOptions,
    view: Mutex<View>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The revision the view reflects; writers wait on it to read their own writes.
    applied: watch::Sender<i64>,
    status: Mutex<Status>,
    /// The current lease; held across every write that uses it, so a replacement lease and
    /// the keys written under it are never interleaved with such a write.
    lease: tokio::sync::Mutex<Option<i64>>,
    /// What this host keeps under its lease: key -> (value, revision it was written at).
    owned: Mutex<BTreeMap<String, (Vec<u8>, i64)>>,
}

#[derive(Debug, Default)]
struct Status {
    connected: bool,
    last_error: Option<String>,
}

impl EtcdStore {
    /// Connects, lists the registry and takes a lease. Fails (naming the endpoints) when etcd
    /// cannot be reached now; after that the store rides out outages by itself. Must be called
    /// inside a tokio runtime, which runs the store's background tasks.
    pub async fn connect(opts: EtcdOptions) -> anyhow::Result<EtcdStore> {
        keys::validate_node_name(&opts.node)?;
        if opts.endpoints.is_empty() {
            bail!("etcd:// needs at least one HOST:PORT");
        }
        let mut opts = opts;
        opts.prefix = keys::normalize_prefix(&opts.prefix);
        let where_ = opts.endpoints.join(",");
        let creds = match &opts.tls {
            Some(files) => {
                let read = |p: &std::path::Path| {
                    std::fs::read_to_string(p).with_context(|| {
                        format!("reading this host's etcd credential {}", p.display())
                    })
                };
                Some((read(&files.ca)?, read(&files.cert)?, read(&files.key)?))
            }
            None => None,
        };
        let client = connect_client(
            &opts.endpoints,
            creds
                .as_ref()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
            opts.request_timeout,
        )
        .await
        .with_context(|| format!("connecting to etcd at {where_}"))?;
        if opts.operator && opts.tls.is_some() {
            access::bootstrap(&client, &opts.prefix, opts.request_timeout)
                .await
                .with_context(|| format!("turning on etcd's access control at {where_}"))?;
        }
        let shared = Arc::new(Shared {
            client,
            view: Mutex::new(View::new(&opts.prefix, opts.tls.is_some())),
            snapshot: watch::Sender::new(Arc::new(Snapshot::default())),
            applied: watch::Sender::new(0),
            status: Mutex::new(Status::default()),
            lease: tokio::sync::Mutex::new(None),
            owned: Mutex::new(BTreeMap::new()),
            opts,
        });
        shared.relist().await.with_context(|| {
            format!("cannot read the registry from etcd at {where_}; is etcd running there? (--registry)")
        })?;
        shared
            .adopt_own_keys()
            .await
            .with_context(|| format!("reading this host's keys from etcd at {where_}"))?;
        if shared.opts.operator && shared.opts.tls.is_some() {
            shared.migrate_unplaced().await.with_context(|| {
                format!("placing services deployed before placement existed (etcd at {where_})")
            })?;
        }
        {
            let mut lease = shared.lease.lock().await;
            shared
                .ensure_lease(&mut lease)
                .await
                .with_context(|| format!("taking a lease from etcd at {where_}"))?;
        }
        let tasks = vec![
            tokio::spawn(shared.clone().watch_loop()),
            tokio::spawn(shared.clone().lease_loop()),
        ];
        Ok(EtcdStore {
            shared,
            runtime: tokio::runtime::Handle::current(),
            tasks,
        })
    }

    /// Withdraws this host now (revokes its lease: its instances and node record vanish
    /// everywhere) and stops the background tasks. Dropping the store without this leaves
    /// the keys until the lease runs out, which is what a crashed host looks like.
    pub async fn leave_now(&self) -> anyhow::Result<()> {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.revoke().await
    }

    fn block_on<T>(&self, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        self.runtime.block_on(f)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Store for EtcdStore {
    fn deploy(&self, spec: ServiceSpec, node: &str) -> anyhow::Result<DeployResult> {
        self.block_on(self.shared.deploy(spec, node))
    }

    fn update_spec(
        &self,
        name: &str,
        edit: &mut dyn FnMut(&mut ServiceSpec) -> anyhow::Result<()>,
    ) -> anyhow::Result<ServiceInfo> {
        self.block_on(self.shared.update_spec(name, edit))
    }

    fn undeploy(&self, name: &str) -> anyhow::Result<bool> {
        self.block_on(self.shared.undeploy(name))
    }

    fn register_node(&self, node: NodeInfo) -> anyhow::Result<()> {
        self.block_on(self.shared.register_node(node))
    }

    fn put_blob(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        self.block_on(self.shared.put_blob(key, value, false))
            .map(|_| ())
    }

    fn create_blob(&self, key: &str, value: &[u8]) -> anyhow::Result<bool> {
        self.block_on(self.shared.put_blob(key, value, true))
    }

    fn get_blob(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.block_on(self.shared.get_blob(key))
    }

    fn delete_blob(&self, key: &str) -> anyhow::Result<bool> {
        self.block_on(self.shared.delete_blob(key))
    }

    fn leave(&self) -> anyhow::Result<()> {
        self.block_on(self.leave_now())
    }

    fn place(
        &self,
        service: &str,
        hosts: std::collections::BTreeSet<String>,
    ) -> anyhow::Result<std::collections::BTreeSet<String>> {
        self.block_on(self.shared.place(service, hosts))
    }

    fn admit(&self, node: &str) -> anyhow::Result<()> {
        self.block_on(self.shared.admit(node))
    }

    fn is_member(&self, node: &str) -> anyhow::Result<bool> {
        self.block_on(self.shared.is_member(node))
    }

    fn remove_node(&self, node: &str) -> anyhow::Result<RemovedNode> {
        self.block_on(self.shared.remove_node(node))
    }

    fn allow_join(&self, node: &str) -> anyhow::Result<()> {
        if self.shared.opts.tls.is_none() {
            return Ok(());
        }
        let s = &self.shared;
        self.block_on(access::add_join_user(
            &s.client,
            s.prefix(),
            node,
            s.timeout(),
        ))
    }

    fn end_join(&self, node: &str) -> anyhow::Result<()> {
        if self.shared.opts.tls.is_none() {
            return Ok(());
        }
        let s = &self.shared;
        self.block_on(access::remove_join_user(&s.client, node, s.timeout()))
    }

    fn pending_joins(&self) -> anyhow::Result<Vec<String>> {
        if self.shared.opts.tls.is_none() {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        self.block_on(access::join_users(&s.client, s.timeout()))
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshot.subscribe()
    }

    fn health(&self) -> RegistryHealth {
        let status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        RegistryHealth {
            backend: "etcd".into(),
            connected: status.connected,
            last_error: status.last_error.clone(),
            revision: u64::try_from(*self.shared.applied.borrow()).unwrap_or(0),
        }
    }

    fn describe(&self) -> String {
        let access = match (&self.shared.opts.tls, self.shared.opts.operator) {
            (Some(_), true) => "TLS, access control on, this host is the operator",
            (Some(_), false) => "TLS, access control on",
            (None, _) => "PLAINTEXT: anyone who reaches etcd can rewrite the mesh",
        };
        format!(
            "etcd ({}, prefix {}, node {}; {access})",
            self.shared.opts.endpoints.join(","),
            self.shared.opts.prefix,
            self.shared.opts.node
        )
    }
}

/// Runs `f` with a deadline: a request to an unreachable etcd must not hang its caller (the
/// client's balancer waits for a ready endpoint without a bound).
async fn within<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(anyhow::Error::from),
        Err(_) => bail!("etcd did not answer within {limit:?}"),
    }
}

/// etcd answers "revision of auth store is old" when a user or role change was applied
/// between its permission check of a request and the request's apply (another host being
/// admitted, a placement granting roles). The request itself was fine: send it again, as
/// etcd's own Go client does.
pub(super) fn auth_raced(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("revision of auth store is old")
}

/// [`within`] for a request that may be sent again: retried (a few times, briefly) when it
/// only lost the race above.
pub(super) async fn within_retrying_auth_race<T, Fut>(
    limit: Duration,
    mut request: impl FnMut() -> Fut,
) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match within(limit, request()).await {
            Err(e) if auth_raced(&e) && attempt < 6 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            r => return r,
        }
    }
}

/// etcd's "permission denied" becomes what the operator can do about it.
fn explain_denied(e: anyhow::Error, service: &str, node: &str) -> anyhow::Error {
    if format!("{e:#}").contains("permission denied") {
        e.context(format!(
            "etcd refused this host's write for `{service}`: it is not placed on {node}; on the CA host run `hms-ctl place {service} --on {node}`"
        ))
    } else {
        e
    }
}

fn is_lease_gone(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("lease not found")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Exponential backoff: 100 ms doubling up to the configured maximum, each wait drawn at
/// random from its upper half ("equal jitter"): after an etcd outage every host's watch and
/// lease retry, and hosts whose revision was compacted re-list the whole prefix; without
/// jitter 500 hosts would do it in the same instant, every round.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Backoff::FIRST,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.jittered()).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// This round's wait: between half the nominal wait and all of it.
    fn jittered(&self) -> Duration {
        let nominal = self.next.min(self.max);
        let half = nominal / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

enum WatchEnd {
    Compacted,
    Failed(anyhow::Error),
}

impl Shared {
    fn prefix(&self) -> &str {
        &self.opts.prefix
    }

    fn key(&self, k: Key) -> String {
        k.encode(self.prefix())
    }

    fn timeout(&self) -> Duration {
        self.opts.request_timeout
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, connected: bool, error: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.connected = connected;
        if error.is_some() {
            s.last_error = error;
        }
    }

    fn is_connected(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connected
    }

    fn failed(&self, what: &str, e: &anyhow::Error) {
        let was = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connected;
        if was {
            tracing::warn!(error = %format!("{e:#}"), "{what}; serving the last known registry state and retrying");
        } else {
            tracing::debug!(error = %format!("{e:#}"), "{what}");
        }
        self.set_status(false, Some(format!("{what}: {e:#}")));
    }

    /// Publishes the view as the new snapshot (called with the view lock held, so snapshots
    /// go out in revision order).
    fn publish(&self, view: &View) {
        self.snapshot.send_replace(Arc::new(view.snapshot()));
        self.applied.send_replace(view.revision);
    }

    /// Every key under `prefix` as of one revision, read a page at a time (a whole
    /// 10,000-service registry is over the 4 MiB the gRPC client accepts in one answer);
    /// the keys in order and that revision. A page whose revision was compacted meanwhile
    /// fails the list (the caller lists again).
    async fn list(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> anyhow::Result<(Vec<etcd_client::KeyValue>, i64)> {
        let end = keys::prefix_end(prefix.as_bytes());
        let mut kv = self.client.kv_client();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            if keys_only {
                opts = opts.with_keys_only();
            }
            let mut resp = within(self.timeout(), kv.get(from.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let page = resp.take_kvs();
            let Some(last) = page.last() else { break };
            // The next page starts right after this page's last key.
            from = last.key().to_vec();
            from.push(0);
            out.extend(page);
            if !more {
                break;
            }
        }
        Ok((out, revision))
    }

    /// Replaces the view with a fresh list of the prefix; returns its revision.
    async fn relist(&self) -> anyhow::Result<i64> {
        let (kvs, revision) = self.list(self.prefix(), false).await?;
        let mut view = self.lock_view();
        view.clear();
        for kv in &kvs {
            view.put(kv.key(), kv.value());
        }
        view.revision = revision;
        self.publish(&view);
        drop(view);
        self.set_status(true, None);
        Ok(revision)
    }

    async fn watch_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.opts.max_backoff);
        let mut relist = false;
        loop {
            if relist {
                match self.relist().await {
                    Ok(_) => relist = false,
                    Err(e) => {
                        self.failed("re-listing the registry failed", &e);
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            match self.watch_once(&mut backoff).await {
                WatchEnd::Compacted => {
                    tracing::info!("registry history was compacted past our revision; re-listing");
                    relist = true;
                }
                WatchEnd::Failed(e) => {
                    self.failed("the registry watch broke", &e);
                    backoff.wait().await;
                }
            }
        }
    }

    /// One watch from the revision after the view's, until it breaks.
    async fn watch_once(&self, backoff: &mut Backoff) -> WatchEnd {
        let from = self.lock_view().revision + 1;
        let mut client = self.client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream =
            match within(self.timeout(), client.watch(self.prefix(), Some(options))).await {
                Ok(s) => s,
                Err(e) => return WatchEnd::Failed(e.context("starting the registry watch")),
            };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Failed(anyhow::anyhow!("etcd closed the watch")),
                Err(e) => return WatchEnd::Failed(anyhow::Error::from(e)),
            };
            if resp.compact_revision() > 0 {
                return WatchEnd::Compacted;
            }
            if resp.canceled() {
                return WatchEnd::Failed(anyhow::anyhow!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ));
            }
            if resp.created() {
                // Events from `from` on follow; the view's revision moves with them.
                if !self
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .connected
                {
                    tracing::info!(from, "registry watch (re)established");
                }
                self.set_status(true, None);
                backoff.reset();
                continue;
            }
            let mut removed_services = Vec::new();
            let mut view = self.lock_view();
            let mut revision = view.revision;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                revision = revision.max(kv.mod_revision());
                let changed = match event.event_type() {
                    EventType::Put => view.put(kv.key(), kv.value()),
                    EventType::Delete => view.delete(kv.key()),
                };
                if let (EventType::Delete, Some(Key::Service(name))) = (event.event_type(), changed)
                {
                    removed_services.push((name, kv.mod_revision()));
                }
            }
            if resp.events().is_empty() {
                // A progress notification: everything up to the header's revision was sent.
                if let Some(h) = resp.header() {
                    revision = revision.max(h.revision());
                }
            }
            if revision != view.revision || !resp.events().is_empty() {
                view.revision = revision;
                self.publish(&view);
            }
            drop(view);
            self.forget_instances_of(&removed_services);
        }
    }

    /// A service undeployed (from any host) no longer has this host's instances: do not
    /// write them again with a new lease.
    fn forget_instances_of(&self, removed: &[(String, i64)]) {
        if removed.is_empty() {
            return;
        }
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        for (service, at) in removed {
            let key = self.key(Key::Instances {
                service: service.clone(),
                node: self.opts.node.clone(),
            });
            if owned.get(&key).is_some_and(|(_, written)| written < at) {
                owned.remove(&key);
            }
        }
    }

    /// Waits until the view reflects `revision` (bounded: the write already succeeded).
    async fn caught_up(&self, revision: i64) {
        let mut rx = self.applied.subscribe();
        let wait = rx.wait_for(|r| *r >= revision);
        if tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            tracing::debug!(
                revision,
                "the registry watch has not caught up with our write yet"
            );
        }
    }

    // ---- the lease ----

    async fn lease_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.opts.max_backoff);
        let interval = (self.opts.lease_ttl / 3).max(Duration::from_millis(200));
        loop {
            let id = {
                let mut lease = self.lease.lock().await;
                match self.ensure_lease(&mut lease).await {
                    Ok(id) => id,
                    Err(e) => {
                        drop(lease);
                        self.failed("renewing this host's registry lease failed", &e);
                        backoff.wait().await;
                        continue;
                    }
                }
            };
            match self.keep_alive(id, interval, &mut backoff).await {
                Ok(()) => {
                    // Expired (etcd was unreachable longer than the TTL): take a new one.
                    tracing::warn!(
                        lease = id,
                        "this host's registry lease expired; registering again"
                    );
                    let mut lease = self.lease.lock().await;
                    if *lease == Some(id) {
                        *lease = None;
                    }
                }
                Err(e) => {
                    self.failed("renewing this host's registry lease failed", &e);
                    backoff.wait().await;
                }
            }
        }
    }

    /// Renews lease `id` every `interval` until it expires (Ok) or the connection fails.
    async fn keep_alive(
        &self,
        id: i64,
        interval: Duration,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let mut client = self.client.lease_client();
        let (mut keeper, mut responses) = match within(self.timeout(), client.keep_alive(id)).await
        {
            Ok(pair) => pair,
            Err(e) if is_lease_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        backoff.reset();
        loop {
            // Renew first, then wait: after a reconnect the lease may be close to expiry,
            // and the answer is also what tells the health that etcd is back.
            keeper.keep_alive().await?;
            match tokio::time::timeout(self.timeout(), responses.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    // etcd answered: connected. Without this, a stale keep-alive stream
                    // failing after the watch had already reconnected left the health at
                    // "disconnected" until the next watch event, which may never come.
                    if !self.is_connected() {
                        self.set_status(true, None);
                    }
                }
                Ok(Ok(Some(_))) => return Ok(()),
                Ok(Ok(None)) => bail!("etcd closed the lease keep-alive stream"),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => bail!(
                    "etcd did not answer a lease keep-alive within {:?}",
                    self.timeout()
                ),
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// The current lease, or a new one with every owned key written under it.
    async fn ensure_lease(&self, lease: &mut Option<i64>) -> anyhow::Result<i64> {
        if let Some(id) = *lease {
            return Ok(id);
        }
        let ttl = i64::try_from(self.opts.lease_ttl.as_secs().max(1)).unwrap_or(10);
        let mut client = self.client.lease_client();
        let id = within(self.timeout(), client.grant(ttl, None)).await?.id();
        let node_key = self.key(Key::Node(self.opts.node.clone()));
        let entries: Vec<(String, Vec<u8>)> = {
            let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
            owned
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect()
        };
        for chunk in entries.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    let v = if *k == node_key {
                        refresh_node(v)
                    } else {
                        v.clone()
                    };
                    TxnOp::put(k.clone(), v, Some(PutOptions::new().with_lease(id)))
                })
                .collect();
            within(
                self.timeout(),
                self.client.kv_client().txn(Txn::new().and_then(ops)),
            )
            .await?;
        }
        if !entries.is_empty() {
            tracing::info!(
                lease = id,
                keys = entries.len(),
                "registered this host's instances under a new lease"
            );
        }
        *lease = Some(id);
        Ok(id)
    }

    /// A restarted agent takes over what its previous run registered (instances of services
    /// still deployed, its node record): they move to the new lease instead of expiring with
    /// the old one.
    async fn adopt_own_keys(&self) -> anyhow::Result<()> {
        let (kvs, _) = self.list(self.prefix(), false).await?;
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        for kv in &kvs {
            let mine = match Key::parse(self.prefix(), kv.key()) {
                Some(Key::Instances { node, .. }) | Some(Key::Node(node)) => node == self.opts.node,
                _ => false,
            };
            if mine && let Ok(key) = kv.key_str() {
                owned.insert(key.to_string(), (kv.value().to_vec(), kv.mod_revision()));
            }
        }
        Ok(())
    }

    async fn revoke(&self) -> anyhow::Result<()> {
        let mut lease = self.lease.lock().await;
        if let Some(id) = lease.take() {
            within(self.timeout(), self.client.lease_client().revoke(id)).await?;
        }
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    /// Runs a transaction that writes keys under this host's lease, taking a new lease (and
    /// rewriting every owned key) if etcd says the lease is gone.
    async fn txn_with_lease(
        &self,
        lease: &mut Option<i64>,
        build: &mut dyn FnMut(i64) -> anyhow::Result<Txn>,
    ) -> anyhow::Result<etcd_client::TxnResponse> {
        for _ in 0..2 {
            let id = self.ensure_lease(lease).await?;
            let txn = build(id)?;
            match within(self.timeout(), self.client.kv_client().txn(txn)).await {
                Err(e) if is_lease_gone(&e) => {
                    *lease = None;
                }
                other => return other,
            }
        }
        bail!("etcd keeps losing this host's lease; check etcd's health")
    }

    // ---- writes ----

    async fn get_record(&self, name: &str) -> anyhow::Result<Option<(ServiceRecord, i64)>> {
        let key = self.key(Key::Service(name.to_string()));
        let resp = within(self.timeout(), self.client.kv_client().get(key, None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let rec: ServiceRecord = serde_json::from_slice(kv.value()).with_context(|| {
            format!(
                "the registry's record of `{name}` does not decode; undeploy and deploy it again"
            )
        })?;
        Ok(Some((rec, kv.mod_revision())))
    }

    async fn taken_vips(&self) -> anyhow::Result<HashSet<Ipv4Addr>> {
        let prefix = keys::vips_prefix(self.prefix());
        let (kvs, _) = self.list(&prefix, true).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| match Key::parse(self.prefix(), kv.key()) {
                Some(Key::Vip(ip)) => Some(ip),
                _ => None,
            })
            .collect())
    }

    async fn deploy(&self, spec: ServiceSpec, node: &str) -> anyhow::Result<DeployResult> {
        if node != self.opts.node {
            bail!(
                "this registry connection belongs to node `{}`, not `{node}`",
                self.opts.node
            );
        }
        let name = spec.name.clone();
        let svc_key = self.key(Key::Service(name.clone()));
        let inst_key = self.key(Key::Instances {
            service: name.clone(),
            node: node.to_string(),
        });
        let inst_val = serde_json::to_vec(&InstanceRecord {
            addrs: local_addrs(&spec),
        })?;
        // The VIP is the placement's (claimed when the service was first placed), so a host
        // never needs to write VIP claims.
        let vip = self.placed_vip(&name, node).await?;
        let range = self.opts.vip_range;
        if !range.contains(vip) {
            bail!(
                "`{name}` already has VIP {vip} outside this agent's --vip-cidr {range}; every host must use the same --vip-cidr"
            );
        }
        let vip_key = self.key(Key::Vip(vip));
        let mut lease = self.lease.lock().await;
        for _ in 0..MAX_TXN_ATTEMPTS {
            let existing = self.get_record(&name).await?;
            let replaced = existing.is_some();
            let txn_compare = match existing {
                Some((_, mod_rev)) => vec![Compare::mod_revision(
                    svc_key.clone(),
                    CompareOp::Equal,
                    mod_rev,
                )],
                None => vec![Compare::create_revision(
                    svc_key.clone(),
                    CompareOp::Equal,
                    0,
                )],
            };
            let mut txn_compare = txn_compare;
            txn_compare.push(Compare::value(
                vip_key.clone(),
                CompareOp::Equal,
                name.as_bytes(),
            ));
            let record = serde_json::to_vec(&ServiceRecord {
                spec: spec.clone(),
                vip,
            })?;
            let resp = self
                .txn_with_lease(&mut lease, &mut |id| {
                    let ops = vec![
                        TxnOp::put(svc_key.clone(), record.clone(), None),
                        TxnOp::put(
                            inst_key.clone(),
                            inst_val.clone(),
                            Some(PutOptions::new().with_lease(id)),
                        ),
                    ];
                    Ok(Txn::new().when(txn_compare.clone()).and_then(ops))
                })
                .await
                .map_err(|e| explain_denied(e, &name, node))?;
            if !resp.succeeded() {
                // Another host changed the record meanwhile: look again.
                continue;
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            self.owned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(inst_key.clone(), (inst_val.clone(), revision));
            drop(lease);
            self.caught_up(revision).await;
            let service = self.snapshot_service(&name).unwrap_or_else(|| ServiceInfo {
                instances: Vec::new(),
                spec: spec.clone(),
                vip,
            });
            return Ok(DeployResult { service, replaced });
        }
        bail!("deploying `{name}` kept racing with other hosts' writes; try again")
    }

    fn snapshot_service(&self, name: &str) -> Option<ServiceInfo> {
        self.snapshot.borrow().service(name).cloned()
    }

    async fn update_spec(
        &self,
        name: &str,
        edit: &mut dyn FnMut(&mut ServiceSpec) -> anyhow::Result<()>,
    ) -> anyhow::Result<ServiceInfo> {
        let svc_key = self.key(Key::Service(name.to_string()));
        for _ in 0..MAX_TXN_ATTEMPTS {
            let (mut rec, mod_rev) = self.get_record(name).await?.with_context(|| {
                format!("no service named `{name}` is deployed (see `hms-ctl list`)")
            })?;
            edit(&mut rec.spec)?;
            if rec.spec.name != name {
                bail!("a spec edit may not rename the service `{name}`");
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    svc_key.clone(),
                    CompareOp::Equal,
                    mod_rev,
                )])
                .and_then([TxnOp::put(svc_key.clone(), serde_json::to_vec(&rec)?, None)]);
            let resp = within(self.timeout(), self.client.kv_client().txn(txn)).await?;
            if !resp.succeeded() {
                continue;
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            self.caught_up(revision).await;
            return Ok(self.snapshot_service(name).unwrap_or(ServiceInfo {
                spec: rec.spec,
                vip: rec.vip,
                instances: Vec::new(),
            }));
        }
        bail!("changing `{name}` kept racing with other hosts' writes; try again")
    }

    async fn undeploy(&self, name: &str) -> anyhow::Result<bool> {
        let svc_key = self.key(Key::Service(name.to_string()));
        // A host of a secured registry removes the spec and its own instances; the VIP and
        // placement stay the operator's (a later deploy gets the same VIP). The operator, or
        // anyone without TLS, removes everything.
        let whole = self.opts.tls.is_none() || self.opts.operator;
        for _ in 0..MAX_TXN_ATTEMPTS {
            let Some((rec, mod_rev)) = self.get_record(name).await? else {
                return Ok(false);
            };
            let mut ops = vec![TxnOp::delete(svc_key.clone(), None)];
            if whole {
                ops.extend([
                    TxnOp::delete(self.key(Key::Vip(rec.vip)), None),
                    TxnOp::delete(self.key(Key::Placement(name.to_string())), None),
                    TxnOp::delete(
                        keys::instances_of(self.prefix(), name),
                        Some(DeleteOptions::new().with_prefix()),
                    ),
                ]);
            } else {
                ops.push(TxnOp::delete(
                    self.key(Key::Instances {
                        service: name.to_string(),
                        node: self.opts.node.clone(),
                    }),
                    None,
                ));
            }
            let placed = self.get_placement(name).await?.map(|(r, _)| r.hosts);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    svc_key.clone(),
                    CompareOp::Equal,
                    mod_rev,
                )])
                .and_then(ops);
            let resp = within(self.timeout(), self.client.kv_client().txn(txn))
                .await
                .map_err(|e| explain_denied(e, name, &self.opts.node))?;
            if !resp.succeeded() {
                continue;
            }
            if whole && self.opts.tls.is_some() {
                for host in placed.unwrap_or_default() {
                    access::revoke_service(
                        &self.client,
                        self.prefix(),
                        &host,
                        name,
                        self.timeout(),
                    )
                    .await?;
                }
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            self.forget_instances_of(&[(name.to_string(), revision + 1)]);
            self.caught_up(revision).await;
            return Ok(true);
        }
        bail!("undeploying `{name}` kept racing with other hosts' writes; try again")
    }

    async fn register_node(&self, node: NodeInfo) -> anyhow::Result<()> {
        if node.name != self.opts.node {
            bail!(
                "this registry connection belongs to node `{}`, not `{}`",
                self.opts.node,
                node.name
            );
        }
        let key = self.key(Key::Node(node.name.clone()));
        let value = serde_json::to_vec(&node)?;
        let mut lease = self.lease.lock().await;
        let resp = self
            .txn_with_lease(&mut lease, &mut |id| {
                Ok(Txn::new().and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                )]))
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (value, revision));
        drop(lease);
        self.caught_up(revision).await;
        Ok(())
    }

    /// Writes a blob; with `only_if_absent`, false when the key already existed.
    async fn put_blob(
        &self,
        key: &str,
        value: &[u8],
        only_if_absent: bool,
    ) -> anyhow::Result<bool> {
        validate_blob_key(key)?;
        let k = self.key(Key::Blob(key.to_string()));
        let mut txn = Txn::new();
        if only_if_absent {
            txn = txn.when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)]);
        }
        let txn = txn.and_then([TxnOp::put(k, value.to_vec(), None)]);
        let resp = within(self.timeout(), self.client.kv_client().txn(txn)).await?;
        if !resp.succeeded() {
            return Ok(false);
        }
        self.caught_up(resp.header().map(|h| h.revision()).unwrap_or(0))
            .await;
        Ok(true)
    }

    async fn delete_blob(&self, key: &str) -> anyhow::Result<bool> {
        validate_blob_key(key)?;
        let k = self.key(Key::Blob(key.to_string()));
        let resp = within(self.timeout(), self.client.kv_client().delete(k, None)).await?;
        if resp.deleted() == 0 {
            return Ok(false);
        }
        self.caught_up(resp.header().map(|h| h.revision()).unwrap_or(0))
            .await;
        Ok(true)
    }

    async fn get_blob(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        validate_blob_key(key)?;
        let k = self.key(Key::Blob(key.to_string()));
        let resp = within(self.timeout(), self.client.kv_client().get(k, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }
}

/// The node record written again under a new lease carries the time of that write.
fn refresh_node(value: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<NodeInfo>(value) {
        Ok(mut n) => {
            n.last_seen_unix_ms = unix_ms();
            serde_json::to_vec(&n).unwrap_or_else(|_| value.to_vec())
        }
        Err(_) => value.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_waits_are_jittered_within_their_upper_half() {
        let mut b = Backoff::new(Duration::from_secs(1));
        b.next = Duration::from_secs(1);
        let waits: Vec<Duration> = (0..64).map(|_| b.jittered()).collect();
        assert!(
            waits
                .iter()
                .all(|w| *w >= Duration::from_millis(500) && *w <= Duration::from_secs(1))
        );
        // 64 draws from a continuous range are not all the same instant.
        assert!(waits.iter().any(|w| *w != waits[0]));
    }
}
