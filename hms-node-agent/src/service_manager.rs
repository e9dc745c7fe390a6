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
//!
//! An upgrade's hand-over changes the unit's main process; systemd must supervise the
//! successor as it did the first agent (wait for it at a stop, so `systemctl stop` is a
//! SIGTERM and a drain). Two things make that so:
//! - the successor leaves its predecessor's process tree first ([`leave_predecessor_tree`]),
//!   so it is PID 1's child: a main process that is not systemd's child is "alien"
//!   ("Supervising process N which is not our child"), and systemd 252 neither waits for
//!   an alien main process at a stop nor spares it the SIGKILL that follows the SIGTERM;
//! - the predecessor, the unit's main process, names the successor (`MAINPID=`) once it
//!   serves ([`hand_main_pid_to`]). A predecessor that does not (releases before this one)
//!   leaves it to the successor ([`took_over`]), which is why the unit keeps
//!   `NotifyAccess=all`.

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

/// An upgrade's successor (`run --takeover`) under systemd: fork, and let the first process
/// exit at once; the second, orphaned, is re-parented to PID 1 (systemd) and goes on as the
/// agent. Returns once that happened. Without `NOTIFY_SOCKET` (not under systemd: a test
/// harness, a shell) the successor stays its predecessor's child, as it was started.
///
/// Must run before any thread exists: only the forking thread goes on in the child.
pub fn leave_predecessor_tree() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use nix::unistd::{ForkResult, fork, getpid, getppid};
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let first = getpid();
    // SAFETY: main calls this before the runtime or any other thread exists, so the child
    // is a complete copy of a single-threaded process.
    match unsafe { fork() }.context("forking to leave the predecessor's process tree")? {
        // Nothing of the first process's state needs unwinding: it has done nothing yet.
        // SAFETY: _exit ends this process at once; nothing runs after it.
        ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        ForkResult::Child => {
            // The parent's exit re-parents us; systemd checks our parent when it is told
            // our pid, so make sure that happened (it is a matter of microseconds).
            for _ in 0..1000 {
                if getppid() != first {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            anyhow::bail!(
                "the successor's first process (pid {first}) did not exit; systemd would not supervise this one as its child"
            )
        }
    }
}

/// The predecessor's side of a hand-over under systemd: the unit's main process names its
/// successor (`successor`: the pid the hand-over connection came from) as the new main
/// process, before it drains. Returns whether it told systemd.
pub fn hand_main_pid_to(successor: Option<u32>) -> bool {
    let Some(pid) = successor else {
        return false;
    };
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    notify(&[NotifyState::MainPid(pid)]);
    tracing::info!(
        successor = pid,
        "told systemd the successor is the main process now"
    );
    true
}

/// The successor's side, once its predecessor agreed to drain: `READY=1` (it serves), and
/// `MAINPID=` itself when the predecessor did not name it (`announced`: a release before
/// [`hand_main_pid_to`]; the unit's `NotifyAccess=all` accepts it from this process).
pub fn took_over(announced: bool) {
    if announced {
        notify(&[NotifyState::Ready]);
    } else {
        notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
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
