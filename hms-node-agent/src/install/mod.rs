//! `hms-node-agent install` / `uninstall`: running the agent like production. Install copies
//! the running binaries to `/usr/local/bin`, writes `/etc/hms/agent.yaml` (the `run` flags as
//! a commented YAML file) and the systemd units (the service and one socket unit per
//! listener, for socket activation), and enables them where systemd runs. Uninstall undoes
//! all of it and runs `cleanup`, so afterwards nothing of HMS is attached, pinned or running.
//!
//! Every path is under `--root` (default `/`), so a package build or a test can install into
//! a scratch directory; with a root other than `/` systemctl is never called and no process
//! or kernel object of the host is touched unless named explicitly (`--pin-dir`).
//!
//! Install is idempotent: a file whose content would not change is not rewritten. It keeps a
//! manifest (`/etc/hms/.installed`: each file it wrote with a hash of the content, and each
//! directory it created), which is how it tells a config it wrote (replaced when the settings
//! change) from one the user edited (kept unless `--force`), and how uninstall knows what to
//! remove.
//!
//! Socket activation contract with `agent.rs`: the service is started with
//! `LISTEN_FDS`/`LISTEN_FDNAMES` holding one descriptor per socket unit, named `outbound`
//! (TCP), `dns-udp` (UDP), `dns-tcp` (TCP), `inbound` (TCP) and `metrics` (TCP), the names
//! `listeners.rs` looks for. systemd does not guarantee
//! their order, so the agent matches them by name. systemd's `FileDescriptorName=` names every
//! socket of a unit alike, hence one unit per listener.
//!
//! Modules: `settings` (agent.yaml), `units` (the systemd units), `files` (the manifest and
//! writes under the root), `steps` (install), `remove` (uninstall).

use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::config::{AgentConfig, RunArgs};

pub const BIN_DIR: &str = "/usr/local/bin";
pub const AGENT_BIN: &str = "/usr/local/bin/hms-node-agent";
pub const CTL_BIN: &str = "/usr/local/bin/hms-ctl";
/// The seed chapter's name for the CLI: a link to hms-ctl, which reads the name it was called by.
pub const SVC_LINK: &str = "/usr/local/bin/hms-svc";
pub const CONFIG_DIR: &str = "/etc/hms";
pub const CONFIG_PATH: &str = "/etc/hms/agent.yaml";
pub const MANIFEST_PATH: &str = "/etc/hms/.installed";
pub const UNIT_DIR: &str = "/etc/systemd/system";
pub const SERVICE_UNIT: &str = "hms-node-agent.service";
const DEFAULT_STATE_DIR: &str = "/var/lib/hms";
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/hms";
/// What `sd_booted()` checks: systemd is PID 1 on this host.
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

/// Flags of `hms-node-agent install`.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Install under this directory instead of `/` (package builds, tests); systemctl is
    /// then never called.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Overwrite /etc/hms/agent.yaml even if it was edited after the last install.
    #[arg(long)]
    pub force: bool,
    /// Settings to persist in /etc/hms/agent.yaml (the `run` flags). `--config FILE` takes
    /// them from a file (flags win). Without any, an existing agent.yaml is kept as it is.
    #[command(flatten)]
    pub settings: RunArgs,
}

/// Flags of `hms-node-agent uninstall`.
#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// Remove what `install --root DIR` wrote under DIR.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// bpffs directory to clean [default: the installed config's, else /sys/fs/bpf/hms;
    /// with --root other than / only when given].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Also delete the agent's state (embedded registry, certificates) in the state dir.
    #[arg(long)]
    pub purge: bool,
    /// With --purge on the CA's host: yes, take the mesh CA's root keys out of the state dir
    /// too (they are moved to /var/backups/hms-ca-<time>, 0700, never deleted). Without it a
    /// purge on the CA's host refuses and changes nothing.
    #[arg(long, requires = "purge")]
    pub purge_ca_keys: bool,
}

mod files;
mod package;
mod remove;
mod settings;
mod steps;
#[cfg(test)]
mod tests;
mod units;

pub use files::FileAction;
use files::*;
pub use package::{PACKAGE_UNIT_DIR, stage as stage_package};
pub use remove::{UninstallReport, uninstall};
use settings::*;
pub use settings::{parse_config, render_config, render_package_config};
use steps::*;
pub use steps::{InstallReport, install};
pub use units::{
    BY_INSTALL, BY_PACKAGE, LISTENERS, Listener, UnitOrigin, UnitSettings, render_service,
    render_socket,
};
