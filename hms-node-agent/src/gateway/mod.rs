//! The mesh's door to the outside: listeners declared by `hms-ctl gateway apply`, TLS with
//! certificates chosen by SNI, routes to `.svc` services through the mesh's own resilience.
//! Inside the mesh the gateway is a caller named `gateway`. What is asked of callers at the
//! door (authentication, per-client limits, CORS, body size) is [`door`]'s.
//!
//! Owns which gateways this host serves and keeping their listeners in step with the
//! registry; never writes the registry on its own (only the admin API's apply/delete do),
//! never dials a VIP (requests go through the node proxy's HTTP path).
//!
//! 1. Specs live in the registry as blobs `gateways/<name>` (the YAML as applied), so every
//!    gateway host reads the same ones; with etcd's access control only the operator's
//!    connection may write them (hosts read the whole prefix).
//! 2. Which hosts serve: `--gateway all` (or `gateway: true` in the config file) serves every
//!    gateway in the registry, `--gateway public,admin` only those; default none.
//! 3. On every registry change (and at start) [`GatewayHost::reconcile`] parses the served
//!    specs with the same `hms_ctl::gateway::parse` the apply used, and for each listener:
//!    same address, protocol and certificate files as a running one -> its routes are
//!    swapped in place (open connections stay); otherwise the old one stops accepting and a
//!    new one binds. Listeners no served spec names stop accepting.
//! 4. Every second the https listeners' certificate files are checked for changes
//!    (`certs`).
//! 5. A listener that did not start (its port still held, a certificate that does not load
//!    yet) is tried again with backoff ([`RETRY_FIRST`] doubling to [`RETRY_MAX`]) without
//!    touching the listeners that serve, so a port freed later is served without a new
//!    apply.
//! 6. An upgrade hands the running listeners to the successor with the node proxy's
//!    (names `gateway <addr>`); the successor's listeners accept on those sockets instead of
//!    binding new ones. Sockets no spec of the successor names are closed after
//!    [`INHERITED_KEEP`].

pub mod acme;
pub mod certs;
pub mod door;
pub mod filters;
pub mod listener;
pub mod metrics;
pub mod request;
pub mod routes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hms_ctl::api::{GatewayInfo, GatewayListenerState};
use hms_ctl::gateway::{AcmeSpec, BLOB_PREFIX, GatewaySpec, Protocol};

use crate::drain::Drain;
use crate::proxy::http::HttpProxy;
use crate::registry::{Snapshot, Store};
use crate::tap::TapHub;
use listener::{ListenerConfig, ListenerRuntime};
use metrics::GatewayMetrics;
use routes::RouteTable;

/// The caller name of every request the gateway sends into the mesh (`allow_from: [gateway]`).
pub const CALLER: &str = "gateway";

/// How often certificate files are checked for changes.
const CERT_CHECK: Duration = Duration::from_secs(1);

/// Step 5: the first retry of a listener that did not start, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Step 6: the name prefix of gateway listeners in an upgrade's hand-over.
pub const HANDOVER_PREFIX: &str = "gateway ";

/// Step 6: how long handed-over sockets wait for a spec to name them (the registry may
/// still be loading when the successor starts).
const INHERITED_KEEP: Duration = Duration::from_secs(30);

/// Step 2: which gateways this host serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Serve {
    #[default]
    None,
    All,
    Named(Vec<String>),
}

impl Serve {
    pub fn parse(text: &str) -> Result<Serve, String> {
        let t = text.trim();
        match t {
            "" | "false" | "none" => Ok(Serve::None),
            "true" | "all" => Ok(Serve::All),
            _ => {
                let names: Vec<String> = t.split(',').map(|s| s.trim().to_string()).collect();
                for n in &names {
                    hms_ctl::spec::validate_dns_label(n).map_err(|m| {
                        format!(
                            "--gateway: `{n}` {m}; use `all` or gateway names separated by commas"
                        )
                    })?;
                }
                Ok(Serve::Named(names))
            }
        }
    }

    pub fn serves(&self, name: &str) -> bool {
        match self {
            Serve::None => false,
            Serve::All => true,
            Serve::Named(n) => n.iter().any(|x| x == name),
        }
    }
}

/// The key of a gateway spec in the registry's blobs.
pub fn blob_key(name: &str) -> String {
    format!("{BLOB_PREFIX}{name}")
}

/// The gateway specs in a snapshot, by name; a blob that no longer parses (written by a
/// newer hms-ctl?) is logged and skipped.
pub fn specs_in(snapshot: &Snapshot) -> BTreeMap<String, (GatewaySpec, String)> {
    let mut out = BTreeMap::new();
    for (key, value) in snapshot.blobs_under(BLOB_PREFIX) {
        let Ok(yaml) = std::str::from_utf8(value) else {
            tracing::warn!(%key, "gateway spec in the registry is not UTF-8; skipped");
            continue;
        };
        match hms_ctl::gateway::parse(yaml, key) {
            Ok(spec) => {
                out.insert(spec.name.clone(), (spec, yaml.to_string()));
            }
            Err(e) => {
                tracing::warn!(%key, "gateway spec in the registry does not parse; skipped: {e}")
            }
        }
    }
    out
}

pub struct GatewayHost {
    pub store: Arc<dyn Store>,
    pub http: Arc<HttpProxy>,
    pub tap: Arc<TapHub>,
    pub metrics: GatewayMetrics,
    /// The door's counters (refusals, admissions, JWKS loads), shared by every route.
    pub door_metrics: Arc<door::metrics::DoorMetrics>,
    pub serve: Serve,
    /// Every listener's connections together (`limits`): at the cap the oldest idle one is
    /// shed, and one client address holds at most half.
    pub cap: Arc<crate::limits::ConnCap>,
    /// Running listeners by bound address.
    running: Mutex<HashMap<SocketAddr, Arc<ListenerRuntime>>>,
    /// Why a listener is not serving, by `<gateway>/<listener>`.
    problems: Mutex<HashMap<String, String>>,
    /// ACME's seam: HTTP-01 answers (token -> key authorization) every http listener gives
    /// at `/.well-known/acme-challenge/<token>`, before redirects and routes.
    pub acme_challenges: acme::Challenges,
    /// Where ACME clients keep their accounts and certificates (one folder per directory).
    acme_cache: std::path::PathBuf,
    /// The running ACME clients, by (directory, host name): each renews its certificate
    /// until its listener leaves the specs.
    acme_clients: Mutex<HashMap<(String, String), (tokio::task::AbortHandle, AcmeSpec)>>,
    /// ACME's seam: certificates issued at runtime, by host name; every https listener serves
    /// them (also listeners started later).
    issued: Mutex<HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    /// Step 5: listeners wanted but not serving, and when to try them again.
    failed: Mutex<(HashSet<SocketAddr>, Instant, Duration)>,
    /// Step 6: sockets the predecessor handed over, by address, until a listener takes one.
    inherited: Mutex<HashMap<SocketAddr, std::net::TcpListener>>,
    /// Each served spec's authenticators as last compiled: the next compile starts from
    /// their per-client rate tables (`door::Authenticators::keep_tables_of`).
    compiled: Mutex<HashMap<String, Arc<door::Authenticators>>>,
}

impl GatewayHost {
    pub fn new(
        store: Arc<dyn Store>,
        http: Arc<HttpProxy>,
        tap: Arc<TapHub>,
        metrics: &crate::metrics::Metrics,
        serve: Serve,
        acme_cache: std::path::PathBuf,
        cap: Arc<crate::limits::ConnCap>,
    ) -> GatewayHost {
        GatewayHost {
            store,
            http,
            tap,
            metrics: GatewayMetrics::registered(metrics),
            door_metrics: {
                let m = Arc::new(door::metrics::DoorMetrics::default());
                metrics.register_collector(Box::new(door::metrics::DoorCollector(m.clone())));
                m
            },
            serve,
            cap,
            running: Mutex::new(HashMap::new()),
            problems: Mutex::new(HashMap::new()),
            acme_challenges: acme::Challenges::default(),
            acme_cache,
            acme_clients: Mutex::new(HashMap::new()),
            issued: Mutex::new(HashMap::new()),
            failed: Mutex::new((HashSet::new(), Instant::now(), RETRY_FIRST)),
            inherited: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// Step 6 on the successor: the gateway sockets among those a predecessor handed over
    /// (names [`HANDOVER_PREFIX`]`<addr>`); the others are left in `given`.
    pub fn adopt_handed_over(&self, given: &mut HashMap<String, OwnedFd>) -> anyhow::Result<()> {
        let names: Vec<String> = given
            .keys()
            .filter(|n| n.starts_with(HANDOVER_PREFIX))
            .cloned()
            .collect();
        let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            let fd = given.remove(&name).expect("listed above");
            let listener = crate::listeners::tcp_from(fd, &name)?;
            let addr = listener.local_addr()?;
            if name[HANDOVER_PREFIX.len()..].parse::<SocketAddr>().ok() != Some(addr) {
                anyhow::bail!("the hand-over's `{name}` socket listens on {addr}");
            }
            inherited.insert(addr, listener);
        }
        if !inherited.is_empty() {
            tracing::info!(
                listeners = inherited.len(),
                "gateway listeners handed over by the previous agent"
            );
        }
        Ok(())
    }

    /// Step 6 on the running agent: a duplicate of every serving listener's socket.
    pub fn handover_fds(&self) -> Vec<(String, OwnedFd)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .filter_map(|(addr, rt)| {
                rt.duplicate()
                    .map(|fd| (format!("{HANDOVER_PREFIX}{addr}"), fd))
            })
            .collect()
    }

    /// The handed-over socket of `addr`, if the predecessor served it.
    pub(crate) fn take_inherited(&self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr)
    }

    /// Steps 3 and 4, until the agent drains.
    pub async fn run(self: Arc<Self>, drain: Drain) {
        if self.serve == Serve::None {
            return;
        }
        let mut updates = self.store.subscribe();
        let mut tick = tokio::time::interval(CERT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_revision = None;
        let started = Instant::now();
        loop {
            let snapshot = updates.borrow_and_update().clone();
            let specs = specs_in(&snapshot);
            let fingerprint: Vec<(String, String)> = specs
                .iter()
                .map(|(n, (_, y))| (n.clone(), y.clone()))
                .collect();
            if last_revision.as_ref() != Some(&fingerprint) {
                self.reconcile(&specs, &drain).await;
                last_revision = Some(fingerprint);
            }
            let retry_in = self.retry_in();
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                _ = tick.tick() => {
                    self.reload_certificates();
                    if started.elapsed() >= INHERITED_KEEP {
                        self.inherited.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    }
                }
                _ = tokio::time::sleep(retry_in.unwrap_or(RETRY_MAX)), if retry_in.is_some() => {
                    self.start_failed(&specs, &drain).await;
                }
                _ = drain.signaled() => break,
            }
        }
        for rt in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            rt.stop();
        }
        for task in self
            .acme_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            task.0.abort();
        }
    }

    fn reload_certificates(&self) {
        let running: Vec<Arc<ListenerRuntime>> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for rt in running {
            if let Some(c) = &rt.certs {
                c.reload_changed();
            }
        }
    }

    /// Every listener the served specs ask for, built (routes, doors, TLS settings), and
    /// why a listener or route is not, by `<gateway>/<name>`.
    fn wanted_listeners(
        &self,
        specs: &BTreeMap<String, (GatewaySpec, String)>,
    ) -> (HashMap<SocketAddr, ListenerConfig>, HashMap<String, String>) {
        let mut wanted: HashMap<SocketAddr, ListenerConfig> = HashMap::new();
        let mut problems = HashMap::new();
        for (name, (spec, _)) in specs.iter().filter(|(n, _)| self.serve.serves(n)) {
            let https_port = spec
                .listeners
                .iter()
                .find(|l| l.protocol == Protocol::Https)
                .map(|l| l.port);
            // One set per spec: its routes share JWKS caches and CA files.
            let authenticators = door::Authenticators::compile(
                &spec.authenticators,
                self.door_metrics.clone(),
                &door::DoorOptions::default(),
            )
            .map(Arc::new);
            if let Ok(a) = &authenticators {
                let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(previous) = compiled.get(name) {
                    let limited = spec.routes.iter().filter(|r| r.door.rate_limit.is_some());
                    a.keep_tables_of(previous, limited.map(|r| r.name.as_str()));
                }
                compiled.insert(name.clone(), a.clone());
            }
            for l in &spec.listeners {
                let addr = SocketAddr::new(l.bind_ip(), l.port);
                if wanted.contains_key(&addr) {
                    problems.insert(
                        format!("{name}/{}", l.name),
                        format!("{addr} is already a listener of another gateway"),
                    );
                    continue;
                }
                let mut doors = HashMap::new();
                for r in &spec.routes {
                    let compiled = authenticators
                        .as_ref()
                        .map_err(|e| anyhow::anyhow!("{e:#}"))
                        .and_then(|a| door::RouteDoor::compile(&r.name, &r.door, a));
                    match compiled {
                        Ok(d) => {
                            doors.insert(r.name.clone(), d);
                        }
                        Err(e) => {
                            // A door that cannot be built must not leave the route open.
                            tracing::warn!(gateway = %name, route = %r.name, "route's door does not build; the route is not served: {e:#}");
                            problems.insert(format!("{name}/{}", r.name), format!("{e:#}"));
                        }
                    }
                }
                let mut routes_spec = spec.clone();
                routes_spec.routes.retain(|r| doors.contains_key(&r.name));
                // Asks (never requires) for a client certificate when a route here uses a
                // client_cert authenticator.
                let client_verifier = authenticators.as_ref().ok().and_then(|a| {
                    a.client_verifier(
                        routes_spec
                            .routes
                            .iter()
                            .filter(|r| r.listeners.is_empty() || r.listeners.contains(&l.name))
                            .filter_map(|r| r.door.auth.as_deref()),
                    )
                });
                wanted.insert(
                    addr,
                    ListenerConfig {
                        gateway: name.clone(),
                        spec: l.clone(),
                        routes: RouteTable::for_listener(&routes_spec, &l.name),
                        doors,
                        https_port,
                        client_verifier,
                    },
                );
            }
        }
        self.compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| specs.contains_key(name) && self.serve.serves(name));
        (wanted, problems)
    }

    async fn reconcile(
        self: &Arc<Self>,
        specs: &BTreeMap<String, (GatewaySpec, String)>,
        drain: &Drain,
    ) {
        let (wanted, mut problems) = self.wanted_listeners(specs);
        let mut failed = HashSet::new();
        // Stop what is no longer wanted, or wanted differently.
        let mut keep = HashMap::new();
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for (addr, rt) in running.drain() {
                match wanted.get(&addr) {
                    Some(w)
                        if w.spec.protocol == rt.protocol
                            && w.spec.certificates == rt.certificate_files =>
                    {
                        keep.insert(addr, rt);
                    }
                    _ => {
                        tracing::info!(%addr, "gateway listener no longer in the spec; closing");
                        rt.stop();
                    }
                }
            }
        }
        for (addr, config) in wanted {
            let key = format!("{}/{}", config.gateway, config.spec.name);
            if let Some(rt) = keep.get(&addr) {
                if let Err(e) = rt.set_config(config) {
                    tracing::warn!(%addr, listener = %key, "gateway listener keeps its TLS settings: {e:#}");
                    problems.insert(key, format!("{e:#}"));
                }
                continue;
            }
            match listener::start(self.clone(), config, drain.clone()).await {
                Ok(rt) => {
                    self.serve_issued(&rt);
                    keep.insert(addr, rt);
                }
                Err(e) => {
                    tracing::warn!(%addr, listener = %key, "gateway listener not serving (tried again with backoff): {e:#}");
                    problems.insert(key, format!("{e:#}"));
                    failed.insert(addr);
                }
            }
        }
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = keep;
        *self.problems.lock().unwrap_or_else(|p| p.into_inner()) = problems;
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) =
            (failed, Instant::now() + RETRY_FIRST, RETRY_FIRST);
        self.reconcile_acme(specs);
    }

    /// Certificates ACME issued so far, on a listener that just started.
    fn serve_issued(&self, rt: &ListenerRuntime) {
        if let Some(c) = &rt.certs {
            for (name, key) in self.issued.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                c.insert(name, key.clone());
            }
        }
    }

    /// Step 5: how long until the next try of the listeners that did not start, if any.
    fn retry_in(&self) -> Option<Duration> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        (!failed.0.is_empty()).then(|| failed.1.saturating_duration_since(Instant::now()))
    }

    /// Step 5: tries the listeners that did not start again; the serving ones (their
    /// connections, their doors' rate tables) are not touched.
    async fn start_failed(
        self: &Arc<Self>,
        specs: &BTreeMap<String, (GatewaySpec, String)>,
        drain: &Drain,
    ) {
        let retry: HashSet<SocketAddr> = {
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.0.clone()
        };
        let (mut wanted, _) = self.wanted_listeners(specs);
        wanted.retain(|addr, _| retry.contains(addr));
        let mut still = HashSet::new();
        for (addr, config) in wanted {
            let key = format!("{}/{}", config.gateway, config.spec.name);
            if self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&addr)
            {
                continue;
            }
            match listener::start(self.clone(), config, drain.clone()).await {
                Ok(rt) => {
                    self.serve_issued(&rt);
                    tracing::info!(%addr, listener = %key, "gateway listener serving after a retry");
                    self.running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(addr, rt);
                    self.problems
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                }
                Err(e) => {
                    tracing::debug!(%addr, listener = %key, "gateway listener still not serving: {e:#}");
                    self.problems
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, format!("{e:#}"));
                    still.insert(addr);
                }
            }
        }
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let backoff = (failed.2 * 2).min(RETRY_MAX);
        *failed = (still, Instant::now() + backoff, backoff);
    }

    /// One ACME client per (directory, host name) an https listener of a served spec asks
    /// for; clients no spec asks for any more stop.
    fn reconcile_acme(self: &Arc<Self>, specs: &BTreeMap<String, (GatewaySpec, String)>) {
        let mut wanted = HashMap::new();
        for (name, (spec, _)) in specs.iter().filter(|(n, _)| self.serve.serves(n)) {
            for l in &spec.listeners {
                if let (Some(a), Some(host)) = (&l.acme, &l.hostname) {
                    let key = (a.directory.clone(), host.to_ascii_lowercase());
                    wanted.entry(key).or_insert((name.clone(), a.clone()));
                }
            }
        }
        let mut clients = self.acme_clients.lock().unwrap_or_else(|p| p.into_inner());
        // A client whose settings changed (contact, the directory's root) starts again.
        clients.retain(|key, (task, running)| {
            let keep = wanted.get(key).is_some_and(|(_, a)| a == running);
            if !keep {
                tracing::info!(directory = %key.0, host = %key.1, "ACME certificate no longer asked for as it was; its client stops");
                task.abort();
            }
            keep
        });
        for (key, (gateway, a)) in wanted {
            if clients.contains_key(&key) {
                continue;
            }
            let (directory, host) = key.clone();
            // One cache folder per directory: an account belongs to one CA.
            let folder: String = directory
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let client = acme::AcmeClient::new(
                acme::AcmeConfig {
                    directory_url: directory.clone(),
                    directory_root: a.directory_ca.as_ref().map(Into::into),
                    contact: a.contact.clone(),
                    cache_dir: self.acme_cache.join(folder),
                },
                self.acme_challenges.clone(),
            );
            let host_arc = Arc::clone(self);
            tracing::info!(%gateway, %directory, %host, "ACME: obtaining a certificate");
            let task = tokio::spawn(async move {
                client
                    .run(vec![host], |name, key| {
                        tracing::info!(host = %name, "ACME: certificate installed");
                        host_arc.install_certificate(name, key)
                    })
                    .await
            });
            clients.insert(key, (task.abort_handle(), a));
        }
    }

    /// `describe`/`list`: the spec and, on a host that serves it, its listeners' state.
    pub fn info(&self, spec: GatewaySpec, yaml: String) -> GatewayInfo {
        let served_here = self.serve.serves(&spec.name);
        let mut listeners = Vec::new();
        if served_here {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
            for l in &spec.listeners {
                let addr = SocketAddr::new(l.bind_ip(), l.port);
                let rt = running
                    .get(&addr)
                    .filter(|rt| rt.config().gateway == spec.name);
                let key = format!("{}/{}", spec.name, l.name);
                let state = match (rt, problems.get(&key)) {
                    (Some(_), _) => "serving".to_string(),
                    (None, Some(p)) => format!("not serving: {p}"),
                    (None, None) => "starting".to_string(),
                };
                let certificates = rt
                    .and_then(|rt| rt.certs.as_ref())
                    .map(|c| {
                        c.states()
                            .into_iter()
                            .map(|s| {
                                let mut line = format!(
                                    "{} names {} expires {}",
                                    s.file,
                                    s.names.join(","),
                                    s.not_after_unix.map(|t| t.to_string()).unwrap_or_default()
                                );
                                if let Some(p) = s.problem {
                                    line.push_str(&format!(
                                        " (reload failed, serving the last good one: {p})"
                                    ));
                                }
                                line
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                listeners.push(GatewayListenerState {
                    name: l.name.clone(),
                    address: addr.to_string(),
                    state,
                    certificates,
                });
            }
        }
        GatewayInfo {
            spec,
            yaml,
            served_here,
            listeners,
        }
    }

    /// ACME's seam: serve `key` for `hostname` on every https listener from now on (the
    /// same store file reloads go through).
    pub fn install_certificate(&self, hostname: &str, key: Arc<rustls::sign::CertifiedKey>) {
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hostname.to_ascii_lowercase(), key.clone());
        for rt in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if let Some(c) = &rt.certs {
                c.insert(hostname, key.clone());
            }
        }
    }

    /// The store for ACME and tests: the certificate store of the https listener on `addr`.
    pub fn certificates_of(&self, addr: SocketAddr) -> Option<Arc<certs::CertStore>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .and_then(|rt| rt.certs.clone())
    }
}
