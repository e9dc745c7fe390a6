//! The admin API on a Unix socket (mode 0600: only root may steer the mesh). One JSON request
//! per line, one JSON answer per line (`hms_ctl::api`). Owns request handling for operators;
//! runs beside the data path and never blocks it: registry writes happen here, readers only
//! swap in the new snapshot.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use hms_ctl::api::{AgentStatus, Listeners, RedirectInfo, Request, Response};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::AgentConfig;
use crate::dns::DnsResponder;
use crate::drain::Drain;
use crate::proxy::Outbound;
use crate::registry::Store;

/// A request line longer than this is refused (a spec is a few hundred bytes).
const MAX_REQUEST: usize = 1 << 20;
/// A connection that sends no request line for this long is closed (a successor taking
/// over sends its confirmation well within it).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Admin {
    pub store: Arc<dyn Store>,
    pub gateway: Arc<crate::gateway::GatewayHost>,
    pub config: AgentConfig,
    pub redirect: RedirectInfo,
    pub started: Instant,
    pub dns: Arc<DnsResponder>,
    pub outbound: Arc<Outbound>,
    pub tap: Arc<crate::tap::TapHub>,
    pub redirector: Arc<crate::redirect::Redirector>,
    /// Duplicates of the data-path listeners, for a successor (`handover`).
    pub handover_fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// How to start a successor (`hms-ctl agent upgrade`).
    pub relaunch: crate::handover::Relaunch,
    /// Notified when a successor confirmed the hand-over: stop accepting and drain.
    pub handed_over: Arc<tokio::sync::Notify>,
    pub identity: Arc<crate::mesh_identity::MeshIdentity>,
    /// The admin socket path belongs to the successor from then on.
    pub socket_handed_over: Arc<std::sync::atomic::AtomicBool>,
    /// Where the listeners came from: `bound`, `systemd` or `hand-over`.
    pub listeners_origin: &'static str,
    /// The agent's limits: the admin connection cap, and what `status` reports.
    pub caps: Arc<crate::limits::Caps>,
}

/// The admin socket file as this agent bound it; removed on drop only if it is still ours
/// (after a hand-over the path belongs to the successor).
pub struct SocketFile {
    path: std::path::PathBuf,
    /// Set once a successor owns the path (inode numbers can be reused, so the file itself
    /// cannot tell).
    pub handed_over: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the admin socket. Refuses to steal it from a live agent unless `replace` (a
/// hand-over, where the old agent is expected to be there).
pub async fn bind_socket(path: &Path, replace: bool) -> anyhow::Result<(UnixListener, SocketFile)> {
    let listener = if replace {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .with_context(|| format!("binding admin socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private (0600)", path.display()))?;
        l
    } else {
        bind(path).await?
    };
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            handed_over: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        },
    ))
}

/// Creates the socket, refusing to steal it from a live agent.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("creating directory {} for the admin socket", dir.display())
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another agent is already serving {}; stop it first or give this one its own --admin-socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale admin socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private (0600)", path.display()))?;
    Ok(listener)
}

impl Admin {
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        drain: Drain,
    ) -> anyhow::Result<()> {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("admin accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => return Ok(()),
            };
            let Some(slot) = self.caps.admin.admit() else {
                tracing::warn!("admin connection cap reached with none idle; closing");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = this.connection(stream, &slot) => if let Err(e) = r {
                        tracing::debug!("admin connection ended: {e:#}");
                    },
                    _ = slot.shed() => tracing::debug!("idle admin connection shed at the cap"),
                }
            });
        }
    }

    async fn connection(
        &self,
        stream: UnixStream,
        slot: &crate::limits::ConnSlot,
    ) -> anyhow::Result<()> {
        // A hand-over's successor connects itself: its pid is the new main process's.
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut raw = Vec::new();
        let mut handing_over = false;
        loop {
            raw.clear();
            slot.set_idle(!handing_over);
            let read = read_line_limited(&mut reader, &mut raw, MAX_REQUEST);
            match tokio::time::timeout(IDLE_TIMEOUT, read).await {
                Ok(r) => {
                    if !r? {
                        return Ok(());
                    }
                }
                Err(_) => anyhow::bail!("no request within {IDLE_TIMEOUT:?}; closing"),
            }
            slot.set_idle(false);
            let line = String::from_utf8_lossy(&raw);
            if raw.len() <= MAX_REQUEST
                && let Ok(Request::Handover) = serde_json::from_slice::<Request>(&raw)
            {
                use std::os::fd::AsRawFd;
                // The fds go in the same message as the answer line (SCM_RIGHTS).
                let fd = write.as_ref().as_raw_fd();
                let mut fds: Vec<(String, std::os::fd::OwnedFd)> = self
                    .handover_fds
                    .iter()
                    .map(|(n, f)| f.try_clone().map(|f| (n.clone(), f)))
                    .collect::<Result<_, _>>()?;
                // The gateway's listeners too; past the limit the successor binds them
                // again once this agent has drained (its retry), so those refuse briefly.
                let mut gateway = self.gateway.handover_fds();
                let room = crate::handover::MAX_FDS.saturating_sub(fds.len());
                if gateway.len() > room {
                    tracing::warn!(
                        listeners = gateway.len(),
                        handed_over = room,
                        "more gateway listeners than a hand-over carries; the rest are bound again by the successor"
                    );
                    gateway.truncate(room);
                }
                fds.extend(gateway);
                crate::handover::send_listeners(fd, &fds)?;
                // The successor's confirmation comes on this connection: never shed it.
                handing_over = true;
                tracing::info!("handed the listeners to a successor; waiting for it to confirm");
                continue;
            }
            if raw.len() <= MAX_REQUEST
                && let Ok(Request::Tap {
                    filter,
                    last,
                    follow,
                }) = serde_json::from_slice::<Request>(&raw)
            {
                // A tap owns the rest of the connection: a stream of lines until the client
                // goes away (or, without `follow`, until the recorded events are sent).
                return self.tap(write, filter, last, follow).await;
            }
            let response = if raw.len() > MAX_REQUEST {
                Response::Error {
                    message: format!("request larger than {MAX_REQUEST} bytes"),
                }
            } else {
                match serde_json::from_str::<Request>(&line) {
                    Ok(Request::HandoverDone) if handing_over => {
                        match self.handover_done(peer_pid) {
                            Ok(data) => Response::Ok { data },
                            Err(e) => Response::Error {
                                message: format!("{e:#}"),
                            },
                        }
                    }
                    Ok(req) => self.handle(req).await,
                    Err(e) => Response::Error {
                        message: format!(
                            "not a request this agent understands ({e}); are hms-ctl and the agent the same version?"
                        ),
                    },
                }
            };
            let mut out = serde_json::to_vec(&response)?;
            out.push(b'\n');
            write.write_all(&out).await?;
            if raw.len() > MAX_REQUEST {
                return Ok(());
            }
        }
    }

    /// The successor serves: under systemd it becomes the unit's main process (named by
    /// this one, the main process until now), then this agent drains and exits.
    fn handover_done(&self, successor: Option<u32>) -> anyhow::Result<serde_json::Value> {
        tracing::info!(
            successor,
            "successor confirmed the hand-over: draining and exiting"
        );
        let main_pid_sent = crate::service_manager::hand_main_pid_to(successor);
        self.socket_handed_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.handed_over.notify_one();
        ok(&serde_json::json!({
            "draining": true,
            "main_pid_sent": main_pid_sent,
        }))
    }

    /// Validates and stores a gateway spec; an invalid one changes nothing.
    async fn gateway_apply(&self, file: &str, yaml: String) -> anyhow::Result<serde_json::Value> {
        let spec = hms_ctl::gateway::parse(&yaml, file).map_err(|e| anyhow::anyhow!("{e}"))?;
        let store = self.store.clone();
        let key = crate::gateway::blob_key(&spec.name);
        let value = yaml.clone();
        tokio::task::spawn_blocking(move || store.put_blob(&key, value.as_bytes()))
            .await?
            .map_err(|e| registry_write_error(e, "applying a gateway"))?;
        tracing::info!(gateway = %spec.name, "gateway applied");
        ok(&self.gateway.info(spec, yaml))
    }

    async fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::Deploy { file, yaml } => self.deploy(&file, &yaml).await,
            Request::Undeploy { name } => {
                let store = self.store.clone();
                let n = name.clone();
                match tokio::task::spawn_blocking(move || store.undeploy(&n)).await {
                    Ok(Ok(true)) => {
                        tracing::info!(service = %name, "undeployed");
                        ok(&serde_json::json!({ "undeployed": name }))
                    }
                    Ok(Ok(false)) => Err(anyhow::anyhow!(
                        "no service named `{name}` is deployed (see `hms-ctl list`)"
                    )),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                }
            }
            Request::List => {
                let snap = self.store.snapshot();
                ok(&snap.services().collect::<Vec<_>>())
            }
            Request::Describe { name } => {
                let snap = self.store.snapshot();
                match snap.service(&name) {
                    Some(s) => ok(&hms_ctl::api::ServiceDetail {
                        service: s.clone(),
                        cgroup_dir: self
                            .outbound
                            .http
                            .states
                            .cgroups()
                            .dir_of(&s.spec)
                            .display()
                            .to_string(),
                        health: self.outbound.http.states.health(&name),
                    }),
                    None => Err(anyhow::anyhow!(
                        "no service named `{name}` is deployed (see `hms-ctl list`)"
                    )),
                }
            }
            Request::Status => ok(&self.status().await),
            Request::Tap { .. } => Err(anyhow::anyhow!(
                "a tap is a stream; send it first on its own connection"
            )),
            Request::Handover => Err(anyhow::anyhow!(
                "a hand-over is answered with fds; send it first on its own connection"
            )),
            Request::HandoverDone => self.handover_done(None),
            Request::CaInit { trust_domain } => {
                match crate::identity::validate_trust_domain(&trust_domain) {
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                    Ok(()) => match self.identity.ca_init(&trust_domain).await {
                        Ok(s) => ok(&s),
                        Err(e) => Err(e),
                    },
                }
            }
            Request::CaRotate => match self.identity.rotate().await {
                Ok(s) => ok(&s),
                Err(e) => Err(e),
            },
            Request::CaBackup => match self.identity.ca_backup().await {
                Ok(b) => ok(&b),
                Err(e) => Err(e),
            },
            Request::CaRestore { backup, force } => {
                match serde_json::from_value::<crate::identity::CaBackup>(backup) {
                    Err(e) => Err(anyhow::anyhow!(
                        "that is not a CA backup written by `hms-ctl ca backup`: {e}"
                    )),
                    Ok(backup) => match self.identity.ca_restore(backup, force).await {
                        Ok((summary, replaced)) => ok(&serde_json::json!({
                            "identity": summary,
                            "replaced_ca_moved_to": replaced.map(|p| p.display().to_string()),
                        })),
                        Err(e) => Err(e),
                    },
                }
            }
            Request::NodeTokenCreate { node, ttl_seconds } => {
                let ttl = std::time::Duration::from_secs(ttl_seconds.unwrap_or(3600));
                match node {
                    None => Err(anyhow::anyhow!(
                        "a join token is bound to one new host: pass --node NAME"
                    )),
                    Some(node) => match self.identity.create_token(&node, ttl).await {
                        Ok((t, ticket)) => ok(&serde_json::json!({
                            "token": ticket,
                            "id": t.id,
                            "node": t.node_name,
                            "expires_unix": t.expires_at
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_secs())
                                .unwrap_or(0),
                        })),
                        Err(e) => Err(e),
                    },
                }
            }
            Request::NodeRemove { node } => {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.remove_node(&node)).await {
                    Ok(Ok(r)) => ok(&r),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                }
            }
            Request::Place { service, hosts } => {
                let store = self.store.clone();
                let hosts = hosts.into_iter().collect();
                match tokio::task::spawn_blocking(move || store.place(&service, hosts)).await {
                    Ok(Ok(h)) => ok(&serde_json::json!({ "hosts": h })),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                }
            }
            Request::GatewayApply { file, yaml } => self.gateway_apply(&file, yaml).await,
            Request::GatewayList => {
                let snap = self.store.snapshot();
                let list: Vec<_> = crate::gateway::specs_in(&snap)
                    .into_values()
                    .map(|(spec, yaml)| self.gateway.info(spec, yaml))
                    .collect();
                ok(&list)
            }
            Request::GatewayDescribe { name } => {
                let snap = self.store.snapshot();
                match crate::gateway::specs_in(&snap).remove(&name) {
                    Some((spec, yaml)) => ok(&self.gateway.info(spec, yaml)),
                    None => Err(anyhow::anyhow!(
                        "no gateway named `{name}` (see `hms-ctl gateway list`)"
                    )),
                }
            }
            Request::GatewayDelete { name } => {
                let store = self.store.clone();
                let key = crate::gateway::blob_key(&name);
                match tokio::task::spawn_blocking(move || store.delete_blob(&key)).await {
                    Ok(Ok(true)) => {
                        tracing::info!(gateway = %name, "gateway deleted");
                        ok(&serde_json::json!({ "deleted": name }))
                    }
                    Ok(Ok(false)) => Err(anyhow::anyhow!(
                        "no gateway named `{name}` (see `hms-ctl gateway list`)"
                    )),
                    Ok(Err(e)) => Err(registry_write_error(e, "deleting a gateway")),
                    Err(e) => Err(e.into()),
                }
            }
            Request::Upgrade => match self.relaunch.spawn() {
                Ok(pid) => {
                    tracing::info!(successor = pid, "upgrade: started a successor");
                    ok(&serde_json::json!({ "successor_pid": pid }))
                }
                Err(e) => Err(e),
            },
            Request::RouteSet { service, route } => match hms_ctl::spec::validate_route(&route) {
                Err(m) => Err(anyhow::anyhow!("{m}")),
                Ok(()) => {
                    self.edit(&service, move |spec| {
                        match spec.routes.iter_mut().find(|r| r.path == route.path) {
                            Some(r) => *r = route.clone(),
                            None => spec.routes.push(route.clone()),
                        }
                        Ok(())
                    })
                    .await
                }
            },
            Request::RouteClear { service, path } => {
                self.edit(&service, move |spec| {
                    let before = spec.routes.len();
                    spec.routes.retain(|r| r.path != path);
                    if spec.routes.len() == before {
                        anyhow::bail!(
                            "{} has no route for `{path}` (see `hms-ctl describe {}`)",
                            spec.name,
                            spec.name
                        );
                    }
                    Ok(())
                })
                .await
            }
            Request::LimitSet { service, limit } => {
                self.edit(&service, move |spec| {
                    spec.limit = Some(limit);
                    Ok(())
                })
                .await
            }
            Request::LimitClear { service } => {
                self.edit(&service, |spec| {
                    spec.limit = None;
                    Ok(())
                })
                .await
            }
        };
        match result {
            Ok(data) => Response::Ok { data },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    async fn tap(
        &self,
        mut write: tokio::net::unix::OwnedWriteHalf,
        filter: hms_ctl::api::TapFilter,
        last: Option<usize>,
        follow: bool,
    ) -> anyhow::Result<()> {
        use hms_ctl::api::TapMessage;
        async fn send(
            write: &mut tokio::net::unix::OwnedWriteHalf,
            m: &TapMessage,
        ) -> anyhow::Result<()> {
            let mut line = serde_json::to_vec(m)?;
            line.push(b'\n');
            write.write_all(&line).await?;
            Ok(())
        }
        // `host` is the caller in no service's cgroup (its calls, and its connects refused as
        // undeclared egress); `gateway` is the gateway's caller name (its requests into the
        // mesh and its own answers): both are tapped under those names too.
        if filter.service != "host"
            && filter.service != crate::gateway::CALLER
            && self.store.snapshot().service(&filter.service).is_none()
        {
            let message = format!(
                "no service named `{}` is deployed (see `hms-ctl list`)",
                filter.service
            );
            return send(&mut write, &TapMessage::Error { message }).await;
        }
        // Subscribe before reading the ring so nothing falls between the two.
        let mut sub = follow.then(|| self.tap.subscribe(filter.clone()));
        for e in self.tap.recent(&filter, last.unwrap_or(0)) {
            send(&mut write, &TapMessage::Event(Box::new((*e).clone()))).await?;
        }
        let Some(sub) = sub.as_mut() else {
            return send(&mut write, &TapMessage::End).await;
        };
        let mut reported = 0;
        while let Some(e) = sub.events.recv().await {
            let lost = sub.lost.load(std::sync::atomic::Ordering::Relaxed);
            if lost > reported {
                send(
                    &mut write,
                    &TapMessage::Lost {
                        count: lost - reported,
                    },
                )
                .await?;
                reported = lost;
            }
            send(&mut write, &TapMessage::Event(Box::new((*e).clone()))).await?;
        }
        Ok(())
    }

    /// Applies `edit` to a deployed spec through the registry (persisted, then visible to
    /// the data path on its next request).
    async fn edit(
        &self,
        service: &str,
        mut edit: impl FnMut(&mut hms_ctl::spec::ServiceSpec) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<serde_json::Value> {
        let store = self.store.clone();
        let name = service.to_string();
        let info =
            tokio::task::spawn_blocking(move || store.update_spec(&name, &mut edit)).await??;
        tracing::info!(service = %info.spec.name, routes = info.spec.routes.len(), limit = ?info.spec.limit.map(|l| l.to_string()), "service settings changed");
        ok(&info)
    }

    async fn deploy(&self, file: &str, yaml: &str) -> anyhow::Result<serde_json::Value> {
        let spec = hms_ctl::spec::parse(yaml, file)?;
        let store = self.store.clone();
        let node = self.config.node_name.clone();
        let result = tokio::task::spawn_blocking(move || store.deploy(spec, &node)).await??;
        tracing::info!(
            service = %result.service.spec.name, vip = %result.service.vip,
            port = result.service.spec.port, replaced = result.replaced, "deployed"
        );
        ok(&result)
    }

    async fn status(&self) -> AgentStatus {
        let id = self.identity.summary().await;
        let snapshot = self.store.snapshot();
        let peers = snapshot
            .nodes()
            .filter(|n| n.name != self.config.node_name)
            .map(|n| hms_ctl::api::PeerStatus {
                name: n.name.clone(),
                inbound: n.inbound,
                last_seen_unix_ms: n.last_seen_unix_ms,
                cert_expiry_unix_ms: n.cert_expiry_unix_ms,
                tunnel: self.outbound.http.pool.tunnel_state(&n.name),
            })
            .collect();
        let c = &self.config;
        AgentStatus {
            node: c.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            registry: self.store.describe(),
            state_dir: c.state_dir.display().to_string(),
            services: self.store.snapshot().len(),
            listeners: Listeners {
                outbound: c.outbound.to_string(),
                dns: c.dns.to_string(),
                admin_socket: c.admin_socket.display().to_string(),
            },
            redirect: self.redirect.clone(),
            listeners_from: self.listeners_origin.to_string(),
            dns: self.dns.stats.counters(),
            proxy: self.outbound.stats.counters(),
            http: self.outbound.http.stats.counters(),
            identity: hms_ctl::api::IdentityInfo {
                spiffe_id: id.spiffe_id,
                cert_not_after_unix: id.cert_not_after_unix,
                holds_ca: id.holds_ca,
                trust_bundle_roots: id.trust_bundle_roots,
                waiting_for: id.waiting_for,
                root_fingerprints: id.root_fingerprints,
                trust_bundle_refused_total: id.trust_bundle_refused_total,
                trust_problem: id.trust_problem,
            },
            registry_health: Some(self.store.health()),
            peers,
            ringbuf_records_lost: self.redirector.ringbuf_drops(),
            egress: {
                let (refuse_undeclared, refused_total) = self.redirector.egress_refusal();
                hms_ctl::api::EgressInfo {
                    refuse_undeclared,
                    refused_total,
                }
            },
            limits: Some(self.caps.status()),
            sk_msg: {
                let stats = self.redirector.sk_msg_stats();
                let described = self.redirector.describe();
                hms_ctl::api::SkMsgInfo {
                    enabled: described.sk_msg_bypass,
                    agent_in_cgroup: described.agent_in_cgroup,
                    redirected: stats.redirected,
                    redirected_bytes: stats.redirected_bytes,
                    passed: stats.passed,
                }
            },
            tap_events_lost: self
                .tap
                .lost_total
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Reads one `\n`-terminated line into `buf`, stopping after `max + 1` bytes so a client
/// cannot make the agent buffer without bound. False at end of stream.
async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(!buf.is_empty());
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = (max + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        reader.consume(take);
        if done || buf.len() > max {
            return Ok(true);
        }
    }
}

fn ok<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<serde_json::Value> {
    serde_json::to_value(v).context("encoding the answer")
}

/// A registry write refused by etcd's access control means this host is not the operator.
fn registry_write_error(e: anyhow::Error, what: &str) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("permission denied") {
        anyhow::anyhow!(
            "{what} is the operator's: the registry refused this host's write ({text}); run it on the CA host"
        )
    } else {
        e
    }
}
