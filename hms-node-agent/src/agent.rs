//! Starting and stopping the agent: open the registry, get the listeners (from a predecessor,
//! systemd or bind), attach (or adopt) the eBPF redirect, serve until SIGINT/SIGTERM or a
//! hand-over, then drain. Listeners come before the kernel programs so that a busy port
//! fails the start before any traffic is redirected to it. Pinned programs are left in place on exit: redirection survives a
//! restart, and `hms-node-agent cleanup` is what removes it.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hms_ctl::api::RedirectInfo;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Admin};
use crate::config::{AgentConfig, RegistryUrl};
use crate::dns::DnsResponder;
use crate::dns::upstream::Upstream;
use crate::drain;
use crate::handover::{self, Relaunch};
use crate::listeners::DataListeners;
use crate::mesh_identity::MeshIdentity;
use crate::metrics::Metrics;
use crate::proxy::Outbound;
use crate::redirect::{RedirectOptions, RedirectOptions6, Redirector};
use crate::registry::{EmbeddedStore, EtcdOptions, EtcdStore, Store};
use crate::tap::TapHub;

/// How long in-flight connections get to finish after a stop signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Runs the agent until SIGTERM/SIGINT or a hand-over to a successor. `systemd_fds` are the
/// sockets systemd passed (empty without socket activation).
pub async fn run(
    config: AgentConfig,
    systemd_fds: HashMap<String, std::os::fd::OwnedFd>,
) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "hms-node-agent must run as root (it loads eBPF programs and attaches them to a cgroup); try `sudo hms-node-agent run`"
        );
    }
    // Name a missing kernel feature and the kernel that has it, before any verifier dump.
    crate::probe::check(&config)?;
    // Every listener's cap is a share of the fd limit: raise it first.
    let fd_limit = match crate::limits::raise_nofile() {
        Ok(l) => {
            tracing::info!(
                soft_before = l.soft_before,
                soft = l.soft,
                hard = l.hard,
                "file descriptor limit (RLIMIT_NOFILE) raised to the hard limit"
            );
            l.soft
        }
        Err(e) => {
            let soft = crate::limits::current_nofile();
            tracing::warn!(soft, "could not raise the file descriptor limit: {e}");
            soft
        }
    };
    let caps = Arc::new(crate::limits::Caps::for_fd_limit(fd_limit));
    let store: Arc<dyn Store> = match &config.registry {
        RegistryUrl::Embedded => Arc::new(EmbeddedStore::open(&config.state_dir, config.vip_cidr)?),
        RegistryUrl::Etcd { endpoints, tls } => {
            Arc::new(connect_etcd(&config, endpoints, *tls).await?)
        }
    };
    let multi_host = config.registry.etcd_endpoints().is_some();
    let identity = MeshIdentity::open(
        store.clone(),
        &config.node_name,
        config.state_dir.clone(),
        config.trust_domain.clone(),
        !multi_host,
    )?;

    // Listeners first: from a predecessor (upgrade), from systemd, or bound here. A busy
    // port fails the start before any traffic is redirected to it.
    let relaunch = Relaunch::from_current_process()?;
    let (successor, given, origin) = if config.takeover {
        let admin_socket = config.admin_socket.clone();
        let (successor, fds) =
            tokio::task::spawn_blocking(move || handover::request_listeners(&admin_socket))
                .await??;
        (Some(successor), fds, "hand-over")
    } else if !systemd_fds.is_empty() {
        (None, systemd_fds, "systemd")
    } else {
        (None, HashMap::new(), "bound")
    };
    // The gateway's listeners from a predecessor are the gateway's (made below).
    let mut given = given;
    let mut gateway_given: HashMap<String, std::os::fd::OwnedFd> = given
        .extract_if(|name, _| name.starts_with(crate::gateway::HANDOVER_PREFIX))
        .collect();
    let listeners = DataListeners::acquire(&config, given, origin, multi_host)?;
    let handover_fds = listeners.duplicates()?;
    let listeners = listeners.into_tokio()?;
    // From here on, any exit removes the socket (if still ours) so hms-ctl reports "not
    // running", not a hang.
    let (admin_listener, socket_file) =
        admin::bind_socket(&config.admin_socket, config.takeover).await?;
    let handed_over_to_successor = socket_file.handed_over.clone();

    crate::own_socket::set_mark(config.dns_mark);
    let redirector = Arc::new(
        Redirector::start(&RedirectOptions {
            cgroup: config.cgroup.clone(),
            pin_dir: config.pin_dir.clone(),
            vip_net: config.vip_cidr.network,
            vip_prefix_len: config.vip_cidr.prefix_len,
            outbound: config.outbound,
            dns: config.dns,
            skip_mark: config.dns_mark,
            sk_msg_bypass: config.sk_msg_bypass,
            v6: listeners.v6.as_ref().map(|_| RedirectOptions6 {
                vip_prefix: config.vip6_prefix.0,
                outbound: SocketAddrV6::new(Ipv6Addr::LOCALHOST, config.outbound.port(), 0, 0),
                dns: SocketAddrV6::new(Ipv6Addr::LOCALHOST, config.dns.port(), 0, 0),
            }),
            refuse_undeclared_egress: config.refuse_undeclared_egress,
        })
        .context("setting up the eBPF redirect")?,
    );
    let described = redirector.describe();
    if described.sk_msg_bypass {
        let r = redirector.clone();
        crate::own_socket::on_connected(Box::new(move |local, instance| {
            r.settle_instance_leg(local, instance)
        }));
    }
    // Loading the eBPF object parses the kernel's BTF (about 14 MB, freed right after);
    // hand the freed heap back now rather than carry it for the agent's whole life.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointers are invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
    let redirect_info = RedirectInfo {
        cgroup: config.cgroup.display().to_string(),
        pin_dir: config.pin_dir.display().to_string(),
        vip_cidr: config.vip_cidr.to_string(),
        vip6_range: described.vip6_range.clone(),
        adopted: described.adopted,
        programs: described
            .hooks
            .iter()
            .map(|p| format!("{} ({}, link {})", p.name, p.attach, p.link_id))
            .collect(),
        layout: described.layout.clone(),
        pin_set: described.pin_set.display().to_string(),
        older_sets: described
            .older_sets
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
    };

    let (trigger, drain) = drain::channel();
    let handed_over = Arc::new(tokio::sync::Notify::new());
    let cgroups = crate::cgroup::ServiceCgroups {
        root: crate::cgroup::v2_root()?,
        hooked: config.cgroup.clone(),
    };
    let tap = Arc::new(TapHub::default());
    let metrics = Arc::new(Metrics::new());
    let outbound = Arc::new(Outbound::new(
        store.clone(),
        redirector.clone(),
        cgroups,
        config.node_name.clone(),
        tap.clone(),
        metrics.clone(),
        caps.outbound.clone(),
    ));
    // Egress: outside names resolve at --egress-resolver (else resolv.conf's), marked like
    // the DNS responder's own queries; the kernel learns the declared addresses.
    let egress_resolver = outbound.http.states.egress().clone();
    egress_resolver.configure(config.egress_resolver, config.dns_mark);
    {
        let r = redirector.clone();
        tokio::spawn(crate::proxy::external::keep_declared_set(
            store.clone(),
            egress_resolver,
            move |declared| r.sync_egress(declared),
            drain.clone(),
        ));
    }
    let dns = Arc::new(DnsResponder {
        store: store.clone(),
        origins: redirector.clone(),
        upstream: Upstream {
            mark: config.dns_mark,
        },
        stats: Default::default(),
        caps: caps.clone(),
        local_only: (!config.dns.ip().is_loopback()).then(crate::dns::LocalClients::default),
        vip6_prefix: listeners.v6.as_ref().map(|_| config.vip6_prefix.0),
    });
    let gateway = Arc::new(crate::gateway::GatewayHost::new(
        store.clone(),
        outbound.http.clone(),
        tap.clone(),
        &metrics,
        config.gateway.clone(),
        config.state_dir.join("acme"),
        caps.gateway.clone(),
    ));
    gateway.adopt_handed_over(&mut gateway_given)?;
    let admin = Arc::new(Admin {
        gateway: gateway.clone(),
        store: store.clone(),
        config: config.clone(),
        redirect: redirect_info,
        started: Instant::now(),
        dns: dns.clone(),
        outbound: outbound.clone(),
        tap: tap.clone(),
        redirector: redirector.clone(),
        handover_fds,
        relaunch: relaunch.clone(),
        handed_over: handed_over.clone(),
        socket_handed_over: socket_file.handed_over.clone(),
        identity: identity.clone(),
        listeners_origin: origin,
        caps: caps.clone(),
    });
    metrics.register_collector(Box::new(crate::metrics_state::collector(
        outbound.clone(),
        dns.clone(),
        tap.clone(),
        redirector.clone(),
        identity.clone(),
    )));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(outbound.clone().serve(listeners.outbound, drain.clone()));
    tasks.spawn(dns.clone().serve_udp(listeners.dns_udp, drain.clone()));
    tasks.spawn(dns.clone().serve_tcp(listeners.dns_tcp, drain.clone()));
    if let Some(v6) = listeners.v6 {
        tasks.spawn(outbound.clone().serve(v6.outbound, drain.clone()));
        tasks.spawn(dns.clone().serve_udp(v6.dns_udp, drain.clone()));
        tasks.spawn(dns.clone().serve_tcp(v6.dns_tcp, drain.clone()));
    }
    tasks.spawn(admin.serve(admin_listener, drain.clone()));
    // The gateway's loop ends at once on a host that serves none; it must not end the agent.
    tokio::spawn(gateway.run(drain.clone()));
    tasks.spawn(crate::metrics::serve(
        metrics.clone(),
        listeners.metrics,
        drain.clone(),
        caps.metrics.clone(),
    ));
    let took_over = successor.is_some();
    if let Some(successor) = successor {
        // We serve on the shared listeners now; let the old agent drain and go.
        let announced = tokio::task::spawn_blocking(move || successor.confirm()).await??;
        tracing::info!("took over from the previous agent");
        // Under systemd the service's main process is now this one.
        crate::service_manager::took_over(announced);
        // The ring buffer has one consumer: give the old agent a moment to stop reading.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An upgrade across a change of the eBPF layout: the older pin set's programs still run
    // beside ours; they go once the predecessor no longer accepts (it stops on confirm, a
    // moment after), so every connection they redirected reaches an agent that finds it.
    redirector.retire_older_sets(if took_over {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    });
    let flows = redirector
        .flow_reader()
        .context("reading the kernel's flow records")?;
    // Connections the older pin set's programs redirected report their close there.
    for older in redirector.older_flow_readers() {
        tokio::spawn(crate::flow_feed::run(
            older,
            outbound.clone(),
            tap.clone(),
            metrics.clone(),
            drain.clone(),
        ));
    }
    // The flow feed ends only if the ring buffer fails (or on drain); that must not stop
    // the agent.
    tokio::spawn(crate::flow_feed::run(
        flows,
        outbound.clone(),
        tap.clone(),
        metrics.clone(),
        drain.clone(),
    ));
    tokio::spawn(identity.clone().run(drain.clone()));
    if let Some(inbound_listener) = listeners.inbound {
        // Cross-host traffic starts once this host has a certificate.
        let identity = identity.clone();
        let outbound = outbound.clone();
        let store = store.clone();
        let drain = drain.clone();
        let node_name = config.node_name.clone();
        tasks.spawn(async move {
            let tls = loop {
                if let Some(tls) = identity.tls() {
                    break tls;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = drain.signaled() => return Ok(()),
                }
            };
            let td = tls.spiffe_id().trust_domain().to_string();
            let peers = Arc::new(crate::tunnel::PeerPool::new(tls.clone()));
            outbound.http.pool.set_tunnels(peers.clone(), td.clone());
            tokio::spawn(prune_peers(peers, store.clone(), td, drain.clone()));
            let policy = Arc::new(crate::proxy::inbound::MeshInbound {
                store,
                http: outbound.http.clone(),
                node: node_name,
            });
            let server = crate::tunnel::InboundServer::new_limited(
                &tls,
                policy,
                caps.inbound_handshakes,
                caps.inbound.clone(),
            )?;
            tracing::info!(id = %tls.spiffe_id(), "serving other hosts' tunnels");
            server.serve(inbound_listener, drain).await
        });
    }
    if multi_host {
        tokio::spawn(crate::mesh_node::keep_registered(
            store.clone(),
            identity.clone(),
            config.clone(),
            drain.clone(),
        ));
    }
    let checks = crate::proxy::http::health::run(outbound.http.clone(), drain.clone());
    tasks.spawn(async move {
        checks.await;
        Ok(())
    });

    tracing::info!(
        node = %config.node_name,
        cgroup = %config.cgroup.display(),
        outbound = %config.outbound,
        dns = %config.dns,
        admin = %config.admin_socket.display(),
        services = store.snapshot().len(),
        adopted = described.adopted,
        listeners = origin,
        "agent ready"
    );
    // Type=notify: units ordered after the agent start now; `systemctl status` shows STATUS=.
    let service_names = {
        let store = store.clone();
        move || {
            store
                .snapshot()
                .services()
                .map(|s| s.spec.name.clone())
                .collect::<Vec<String>>()
        }
    };
    crate::service_manager::ready(&config.node_name, &service_names());
    let pending_restart = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(crate::service_manager::keep_status(
        config.node_name.clone(),
        service_names,
        pending_restart.clone(),
        drain.clone(),
    ));

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let failed = loop {
        tokio::select! {
            _ = term.recv() => break None,
            _ = int.recv() => break None,
            _ = handed_over.notified() => break None,
            _ = usr2.recv() => match relaunch.spawn() {
                // The successor takes over through the admin socket; we go on until it
                // confirms.
                Ok(pid) => tracing::info!(successor = pid, "SIGUSR2: started a successor"),
                Err(e) => tracing::error!("SIGUSR2: could not start a successor: {e:#}"),
            },
            _ = hup.recv() => reload(&config, &pending_restart),
            r = tasks.join_next() => break r,
        }
    };
    // Nobody takes over: let the hooks stand aside now, so the host's DNS goes to its own
    // resolvers and VIP connects are refused at once, instead of in 3 s when the heartbeat
    // lapses. A successor (hand-over) beats on; with sockets held by systemd, queries queue
    // for the restarted agent and the lapse decides only if it does not come back.
    if !handed_over_to_successor.load(std::sync::atomic::Ordering::SeqCst) && origin != "systemd" {
        redirector.stand_aside();
    }
    if let Some(r) = failed {
        // A serving loop only returns on drain; anything else is a bug worth stopping for.
        match r {
            Ok(Ok(())) => bail!("a listener stopped unexpectedly"),
            Ok(Err(e)) => return Err(e.context("a listener failed")),
            Err(e) => bail!("a listener task panicked: {e}"),
        }
    }
    tracing::info!(
        in_flight = drain.in_flight(),
        "stopping: draining connections"
    );
    let left = trigger.drain(DRAIN_DEADLINE).await;
    if left > 0 {
        tracing::warn!(left, "drain deadline passed; closing the rest");
    }
    if multi_host && !handed_over_to_successor.load(std::sync::atomic::Ordering::SeqCst) {
        // Our instances leave the registry now instead of when the lease expires.
        let store = store.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || store.leave()).await? {
            tracing::warn!("leaving the registry: {e:#}");
        }
    }
    tracing::info!(
        "agent stopped; redirect programs stay pinned (run `hms-node-agent cleanup` to remove them)"
    );
    Ok(())
}

/// SIGHUP (`systemctl reload`): re-reads the config file; says what needs a restart.
fn reload(config: &AgentConfig, pending: &std::sync::Mutex<Vec<&'static str>>) {
    let file = crate::service_manager::config_file()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "no config file (flags only)".into());
    match crate::service_manager::reload(config) {
        Ok(changed) => {
            if changed.is_empty() {
                tracing::info!(%file, "reload: config re-read, nothing changed");
            } else {
                tracing::warn!(
                    %file,
                    changed = %changed.join(", "),
                    "reload: these settings changed and take effect only after `systemctl restart hms-node-agent` (none of them can change live)"
                );
            }
            if let Ok(mut p) = pending.lock() {
                *p = changed;
            }
        }
        Err(e) => tracing::error!(
            %file,
            "reload: the config file is not valid, the agent keeps running with the settings it started with; fix it before the next restart: {e:#}"
        ),
    }
}

/// How often the tunnel pool is checked against the registry's node records.
const PEER_PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// Forgets pooled peers whose node record is gone from the registry (the host left, or its
/// record now names another address), so the pool does not only grow.
async fn prune_peers(
    peers: Arc<crate::tunnel::PeerPool>,
    store: Arc<dyn Store>,
    trust_domain: String,
    drain: drain::Drain,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PEER_PRUNE_INTERVAL) => {}
            _ = drain.signaled() => return,
        }
        let snapshot = store.snapshot();
        let present: Vec<(std::net::SocketAddr, crate::identity::SpiffeId)> = snapshot
            .nodes()
            .filter_map(|n| {
                let id = crate::identity::SpiffeId::node(&trust_domain, &n.name).ok()?;
                Some((n.inbound, id))
            })
            .collect();
        let gone =
            peers.retain_peers(|addr, id| present.iter().any(|(a, i)| *a == addr && i == id));
        if gone > 0 {
            tracing::info!(gone, "forgot tunnel peers that left the registry");
        }
    }
}

/// The etcd registry with this host's credential: joining first when this host has none
/// yet and was given a token. The CA host connects as etcd's `root` (the operator).
async fn connect_etcd(
    config: &AgentConfig,
    endpoints: &[String],
    tls: bool,
) -> anyhow::Result<EtcdStore> {
    let holds_ca = config
        .state_dir
        .join(crate::identity::CA_DIR)
        .join("ca.json")
        .exists();
    if !holds_ca
        && let Some(token) = &config.join_token
        && crate::join::needed(&config.state_dir, tls)
    {
        let ticket = crate::identity::join_ticket::JoinTicket::decode(token)?;
        if tls && ticket.etcd.is_none() {
            bail!(
                "the join token carries no registry credential (it was made for a plaintext etcd://); create a new one on the CA host"
            );
        }
        crate::join::join(&ticket, endpoints, &config.state_dir, &config.node_name).await?;
    }
    let mut opts = EtcdOptions::new(endpoints.to_vec(), &config.node_name, config.vip_cidr);
    opts.operator = holds_ca;
    if tls {
        let files = crate::registry::CredentialFiles::under(&config.state_dir);
        if !files.exist() {
            bail!(
                "this host has no registry credential in {}: on the CA host run `hms-node-agent init-mesh` first; on any other host start once with --join-token-file FILE (from `hms-ctl node token create --node {}` on the CA host)",
                config
                    .state_dir
                    .join(crate::registry::CredentialFiles::DIR)
                    .display(),
                config.node_name
            );
        }
        opts.tls = Some(files);
    } else {
        tracing::warn!(
            "the registry is plaintext etcd://: anyone who reaches etcd can read and write the mesh (add services, claim callers, change the CA bundle); use etcds:// outside development"
        );
    }
    // etcd may still be starting (started just before, or a unit ordered beside ours):
    // wait for it a while, saying so, rather than exit at once.
    let deadline = std::time::Instant::now() + ETCD_START_WAIT;
    loop {
        match EtcdStore::connect(opts.clone()).await {
            Ok(store) => return Ok(store),
            Err(e) if std::time::Instant::now() < deadline && is_unreachable(&e) => {
                tracing::info!("waiting for etcd: {e:#}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("connecting to the etcd registry (--registry)"),
        }
    }
}

/// How long a starting agent waits for an unreachable etcd before it gives up.
const ETCD_START_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// etcd not (yet) answering, as opposed to answering with a refusal.
fn is_unreachable(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    !text.contains("permission denied")
        && !text.contains("certificate")
        && !text.contains("authentication")
        && !text.contains("reading this host's etcd credential")
        && !text.contains("reserved")
}
