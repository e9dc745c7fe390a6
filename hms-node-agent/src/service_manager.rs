//! The agent's side of systemd's service-manager protocol (the unit is `Type=notify`):
//! `READY=1` once every listener serves, `STATUS=` with the node and what it serves (kept
//! current while the agent runs, for `systemctl status`), and `systemctl reload` (SIGHUP):
//! re-read the config file the agent was started with and say, in the log and in
//! `STATUS=`, which settings changed and need a restart.
//!
//! No setting of agent.yaml changes live yet: each one shapes a listener, the pins, the
//! registry connection or the identity, all fixed at start. A reload therefore checks the
//! file (a broken file is reported before the next restart trips over it) and names what a
//! restart would change; it never applies a setting and never stops the agent. Without
//! `NOTIFY_SOCKET` (not under systemd) every call here does nothing.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::config::{AgentConfig, RunArgs};

/// The `run` arguments as given (flags and `--config FILE`), for a reload to resolve again.
static STARTED_WITH: OnceLock<RunArgs> = OnceLock::new();

/// Remembers how the agent was started (main calls this before resolving the settings).
pub fn remember_args(args: &RunArgs) {
    let _ = STARTED_WITH.set(args.clone());
}

fn notify(states: &[NotifyState<'_>]) {
    // `false`: keep NOTIFY_SOCKET for an upgrade's successor, which reports MAINPID= itself.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("telling systemd {states:?} failed: {e}");
    }
}

/// One line for `systemctl status`: the node and the services it serves.
pub fn status_line(node: &str, services: &[String], pending_restart: &[&str]) -> String {
    let mut line = match services.len() {
        0 => format!("node {node}: serving, no services deployed"),
        n => {
            let mut names = services
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if n > 5 {
                names.push_str(", ...");
            }
            format!("node {node}: serving {n} service(s): {names}")
        }
    };
    if !pending_restart.is_empty() {
        line.push_str(&format!(
            "; agent.yaml changed {} (restart to apply)",
            pending_restart.join(", ")
        ));
    }
    line
}

/// `READY=1` and the first `STATUS=`.
pub fn ready(node: &str, services: &[String]) {
    let status = status_line(node, services, &[]);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Keeps `STATUS=` current: the registry's services as this agent sees them, every few
/// seconds (only sent when it changed).
pub async fn keep_status(
    node: String,
    services: impl Fn() -> Vec<String>,
    pending: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    drain: crate::drain::Drain,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut last = String::new();
    loop {
        let pending: Vec<&str> = pending.lock().map(|p| p.clone()).unwrap_or_default();
        let line = status_line(&node, &services(), &pending);
        if line != last {
            notify(&[NotifyState::Status(&line)]);
            last = line;
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_EVERY) => {}
            _ = drain.signaled() => return,
        }
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(5);

/// SIGHUP (`systemctl reload hms-node-agent`): re-reads the config file and returns the
/// settings that differ from the running ones (each needs a restart), or the error that
/// a restart with this file would hit.
pub fn reload(running: &AgentConfig) -> anyhow::Result<Vec<&'static str>> {
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        notify(&[NotifyState::Reloading, now]);
    }
    let result = match STARTED_WITH.get() {
        Some(args) => AgentConfig::resolve(args.clone()).map(|new| changed(running, &new)),
        None => Ok(Vec::new()),
    };
    notify(&[NotifyState::Ready]);
    result
}

/// The file a reload reads, for the log.
pub fn config_file() -> Option<PathBuf> {
    STARTED_WITH.get().and_then(|a| a.config.clone())
}

/// The settings (agent.yaml keys) whose values differ.
pub fn changed(a: &AgentConfig, b: &AgentConfig) -> Vec<&'static str> {
    macro_rules! diff {
        ($($field:ident => $key:literal),* $(,)?) => {{
            let mut out = Vec::new();
            $(if format!("{:?}", a.$field) != format!("{:?}", b.$field) {
                out.push($key);
            })*
            out
        }};
    }
    diff!(
        node_name => "node-name",
        cgroup => "cgroup",
        state_dir => "state-dir",
        admin_socket => "admin-socket",
        pin_dir => "pin-dir",
        vip_cidr => "vip-cidr",
        outbound => "outbound",
        dns => "dns",
        dns_allow_remote => "dns-allow-remote",
        inbound => "inbound",
        advertise => "advertise",
        metrics => "metrics",
        registry => "registry",
        dns_mark => "dns-mark",
        trust_domain => "trust-domain",
        join_token => "join-token",
        log_format => "log-format",
        sk_msg_bypass => "sk-msg-bypass",
        ipv6 => "ipv6",
        vip6_prefix => "vip6-prefix",
        egress_resolver => "egress-resolver",
        refuse_undeclared_egress => "refuse-undeclared-egress",
        gateway => "gateway",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flags: &[&str]) -> AgentConfig {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: RunArgs,
        }
        let mut argv = vec!["x", "--cgroup", "/"];
        argv.extend_from_slice(flags);
        AgentConfig::resolve(P::parse_from(argv).a).unwrap()
    }

    #[test]
    fn a_reload_names_exactly_the_settings_that_changed() {
        let a = config(&["--node-name", "a"]);
        assert!(changed(&a, &a.clone()).is_empty());
        let b = config(&["--node-name", "b", "--metrics", "127.0.0.1:9999"]);
        assert_eq!(changed(&a, &b), vec!["node-name", "metrics"]);
    }

    #[test]
    fn status_names_the_node_and_its_services() {
        let s = status_line("host-a", &["payments-svc".into()], &[]);
        assert_eq!(s, "node host-a: serving 1 service(s): payments-svc");
        let s = status_line("host-a", &[], &["dns"]);
        assert!(s.contains("no services") && s.contains("changed dns (restart"));
    }
}
