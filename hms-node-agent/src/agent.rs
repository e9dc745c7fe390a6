//! Starting and stopping the agent: open the registry, bind every listener, attach (or adopt)
//! the eBPF redirect, serve until SIGINT/SIGTERM, then drain. Listeners are bound before the
//! kernel programs are attached so that a busy port fails the start before any traffic is
//! redirected to it. Pinned programs are left in place on exit: redirection survives a
//! restart, and `hms-node-agent cleanup` is what removes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hms_ctl::api::RedirectInfo;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Admin};
use crate::config::{AgentConfig, RegistryUrl};
use crate::dns::DnsResponder;
use crate::dns::upstream::Upstream;
use crate::drain;
use crate::metrics::Metrics;
use crate::proxy::Outbound;
use crate::redirect::{RedirectOptions, Redirector};
use crate::registry::{EmbeddedStore, Store};
use crate::tap::TapHub;

/// How long in-flight connections get to finish after a stop signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "hms-node-agent must run as root (it loads eBPF programs and attaches them to a cgroup); try `sudo hms-node-agent run`"
        );
    }
    let store: Arc<dyn Store> = match &config.registry {
        RegistryUrl::Embedded => Arc::new(EmbeddedStore::open(&config.state_dir, config.vip_cidr)?),
        RegistryUrl::Etcd(_) => bail!(
            "the etcd registry backend is not available in this build yet; use --registry embedded"
        ),
    };

    let outbound_listener = TcpListener::bind(config.outbound).await.with_context(|| {
        format!(
            "binding the outbound listener {} (--outbound)",
            config.outbound
        )
    })?;
    let dns_udp = UdpSocket::bind(config.dns)
        .await
        .with_context(|| format!("binding the DNS responder {}/udp (--dns)", config.dns))?;
    let dns_tcp = TcpListener::bind(config.dns)
        .await
        .with_context(|| format!("binding the DNS responder {}/tcp (--dns)", config.dns))?;
    let admin_listener = admin::bind(&config.admin_socket).await?;
    // From here on, any exit removes the socket so hms-ctl reports "not running", not a hang.
    let _socket_file = RemoveOnDrop(config.admin_socket.clone());

    let redirector = Arc::new(
        Redirector::start(&RedirectOptions {
            cgroup: config.cgroup.clone(),
            pin_dir: config.pin_dir.clone(),
            vip_net: config.vip_cidr.network,
            vip_prefix_len: config.vip_cidr.prefix_len,
            outbound: config.outbound,
            dns: config.dns,
            skip_mark: config.dns_mark,
        })
        .context("setting up the eBPF redirect")?,
    );
    let described = redirector.describe();
    let redirect_info = RedirectInfo {
        cgroup: config.cgroup.display().to_string(),
        pin_dir: config.pin_dir.display().to_string(),
        vip_cidr: config.vip_cidr.to_string(),
        adopted: described.adopted,
        programs: described
            .hooks
            .iter()
            .map(|p| format!("{} ({}, link {})", p.name, p.attach, p.link_id))
            .collect(),
    };

    let (trigger, drain) = drain::channel();
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
        tap.clone(),
        metrics.clone(),
    ));
    let dns = Arc::new(DnsResponder {
        store: store.clone(),
        origins: redirector.clone(),
        upstream: Upstream {
            mark: config.dns_mark,
        },
        stats: Default::default(),
    });
    let admin = Arc::new(Admin {
        store: store.clone(),
        config: config.clone(),
        redirect: redirect_info,
        started: Instant::now(),
        dns: dns.clone(),
        outbound: outbound.clone(),
        tap: tap.clone(),
        redirector: redirector.clone(),
    });
    metrics.register_collector(Box::new(crate::metrics_state::collector(
        outbound.clone(),
        dns.clone(),
        tap.clone(),
        redirector.clone(),
    )));
    let flows = redirector
        .flow_reader()
        .context("reading the kernel's flow records")?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(outbound.clone().serve(outbound_listener, drain.clone()));
    tasks.spawn(dns.clone().serve_udp(dns_udp, drain.clone()));
    tasks.spawn(dns.clone().serve_tcp(dns_tcp, drain.clone()));
    tasks.spawn(admin.serve(admin_listener, drain.clone()));
    tasks.spawn(crate::metrics::serve(
        metrics.clone(),
        config.metrics,
        drain.clone(),
    ));
    // The flow feed ends only if the ring buffer fails; that must not stop the agent.
    tokio::spawn(crate::flow_feed::run(
        flows,
        outbound.clone(),
        tap.clone(),
        metrics.clone(),
    ));
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
        "agent ready"
    );

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let failed = tokio::select! {
        _ = term.recv() => None,
        _ = int.recv() => None,
        r = tasks.join_next() => r,
    };
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
    tracing::info!(
        "agent stopped; redirect programs stay pinned (run `hms-node-agent cleanup` to remove them)"
    );
    Ok(())
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
