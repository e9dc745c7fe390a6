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

/// The listeners systemd opens for the agent: socket unit, `FileDescriptorName=` (what the
/// agent finds in `LISTEN_FDNAMES`), and the kind of socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub unit: &'static str,
    pub fd_name: &'static str,
    pub datagram: bool,
    pub description: &'static str,
}

pub const LISTENERS: [Listener; 5] = [
    Listener {
        unit: "hms-node-agent-outbound.socket",
        fd_name: crate::listeners::OUTBOUND,
        datagram: false,
        description: "outbound capture (redirected connections to service VIPs)",
    },
    Listener {
        unit: "hms-node-agent-dns-udp.socket",
        fd_name: crate::listeners::DNS_UDP,
        datagram: true,
        description: "DNS responder, UDP (redirected port-53 queries)",
    },
    Listener {
        unit: "hms-node-agent-dns-tcp.socket",
        fd_name: crate::listeners::DNS_TCP,
        datagram: false,
        description: "DNS responder, TCP",
    },
    Listener {
        unit: "hms-node-agent-inbound.socket",
        fd_name: crate::listeners::INBOUND,
        datagram: false,
        description: "inbound mTLS from other hosts' agents",
    },
    Listener {
        unit: "hms-node-agent-metrics.socket",
        fd_name: crate::listeners::METRICS,
        datagram: false,
        description: "Prometheus metrics",
    },
];

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

// --- settings: the `run` flags as YAML ------------------------------------------------------

/// One key of agent.yaml: the `run` flag without dashes, what it does, its default.
struct Key {
    name: &'static str,
    doc: &'static str,
    default: &'static str,
}

/// Every `run` setting, in the order agent.yaml lists them. A unit test checks this covers
/// every flag of [`RunArgs`].
const KEYS: &[Key] = &[
    Key {
        name: "node-name",
        doc: "This host's name in the registry (a DNS label).",
        default: "the hostname",
    },
    Key {
        name: "cgroup",
        doc: "cgroup v2 directory whose processes are redirected.",
        default: "the cgroup v2 root",
    },
    Key {
        name: "state-dir",
        doc: "Embedded registry and certificates.",
        default: "/var/lib/hms",
    },
    Key {
        name: "admin-socket",
        doc: "Unix socket hms-ctl talks to (mode 0600).",
        default: "/run/hms/agent.sock",
    },
    Key {
        name: "pin-dir",
        doc: "bpffs directory for pinned programs and maps (`hms-node-agent cleanup` removes it).",
        default: "/sys/fs/bpf/hms",
    },
    Key {
        name: "vip-cidr",
        doc: "Range service VIPs come from; keep it in loopback space.",
        default: "127.77.0.0/16",
    },
    Key {
        name: "outbound",
        doc: "Outbound capture listener (also in hms-node-agent-outbound.socket).",
        default: "127.0.0.1:15001",
    },
    Key {
        name: "dns",
        doc: "DNS responder, UDP and TCP (also in hms-node-agent-dns-{udp,tcp}.socket).",
        default: "127.0.0.1:15053",
    },
    Key {
        name: "dns-allow-remote",
        doc: "Let dns bind off loopback; even then only this host's own addresses are answered.",
        default: "false",
    },
    Key {
        name: "inbound",
        doc: "Inbound mTLS listener for other hosts (also in hms-node-agent-inbound.socket).",
        default: "0.0.0.0:15008",
    },
    Key {
        name: "advertise",
        doc: "Inbound address other hosts dial, published in the node record.",
        default: "inbound; 0.0.0.0 becomes the address of the interface that reaches the registry",
    },
    Key {
        name: "metrics",
        doc: "Prometheus metrics listener, /metrics (also in hms-node-agent-metrics.socket).",
        default: "127.0.0.1:15090",
    },
    Key {
        name: "registry",
        doc: "Registry backend: embedded, or etcd://HOST:PORT[,HOST:PORT...].",
        default: "embedded",
    },
    Key {
        name: "dns-mark",
        doc: "SO_MARK of the agent's own sockets (DNS upstream, local instances); the port-53 hooks skip it.",
        default: "0x4853",
    },
    Key {
        name: "trust-domain",
        doc: "SPIFFE trust domain of the mesh's CA.",
        default: "the registry's CA, else hms.local",
    },
    Key {
        name: "join-token",
        doc: "Single-use token from `hms-ctl node token create --node NAME` on the CA's host (multi-host join); `install --join-token-file FILE` puts it here and keeps this file 0600.",
        default: "none",
    },
    Key {
        name: "log-format",
        doc: "Log format: text or json.",
        default: "text",
    },
    Key {
        name: "sk-msg-bypass",
        doc: "App <-> proxy bytes through sk_msg/sockhash instead of loopback TCP, when the agent runs inside the redirected cgroup (docs/bench.md).",
        default: "true",
    },
    Key {
        name: "ipv6",
        doc: "Serve IPv6 callers: AAAA answers, listeners on [::1] (the IPv4 listeners' ports), the IPv6 VIP range routed to loopback.",
        default: "true",
    },
    Key {
        name: "vip6-prefix",
        doc: "IPv6 VIP range, a /96; a service's IPv6 VIP is the prefix followed by its IPv4 VIP.",
        default: "fd48:4d53::/96",
    },
    Key {
        name: "egress-resolver",
        doc: "Resolver (IP:PORT) the agent asks for external services' host names (`external:` in a spec).",
        default: "the first nameserver of /etc/resolv.conf",
    },
    Key {
        name: "refuse-undeclared-egress",
        doc: "Refuse (EPERM) connects from the redirected cgroup to outside addresses that are no declared external service's.",
        default: "false",
    },
    Key {
        name: "gateway",
        doc: "Serve gateways from the registry on this host: `all` (or `true`), or gateway names separated by commas (`hms-ctl gateway apply`).",
        default: "none",
    },
];

/// The value of `key` in `args` as a YAML scalar, or `None` when unset.
fn yaml_value(args: &RunArgs, key: &str) -> Option<String> {
    fn s(v: impl fmt::Display) -> String {
        // Single-quoted: no YAML meaning for `[::]:15008`, `*`, `#` and friends.
        format!("'{}'", v.to_string().replace('\'', "''"))
    }
    match key {
        "node-name" => args.node_name.as_ref().map(s),
        "cgroup" => args.cgroup.as_ref().map(|p| s(p.display())),
        "state-dir" => args.state_dir.as_ref().map(|p| s(p.display())),
        "admin-socket" => args.admin_socket.as_ref().map(|p| s(p.display())),
        "pin-dir" => args.pin_dir.as_ref().map(|p| s(p.display())),
        "vip-cidr" => args.vip_cidr.as_ref().map(s),
        "outbound" => args.outbound.as_ref().map(s),
        "dns" => args.dns.as_ref().map(s),
        "dns-allow-remote" => args.dns_allow_remote.map(|b| b.to_string()),
        "inbound" => args.inbound.as_ref().map(s),
        "advertise" => args.advertise.as_ref().map(s),
        "metrics" => args.metrics.as_ref().map(s),
        "registry" => args.registry.as_ref().map(s),
        "dns-mark" => args.dns_mark.map(|m| format!("{m:#x}")),
        "trust-domain" => args.trust_domain.as_ref().map(s),
        "join-token" => args.join_token.as_ref().map(s),
        "log-format" => args
            .log_format
            .map(|f| s(format!("{f:?}").to_ascii_lowercase())),
        "sk-msg-bypass" => args.sk_msg_bypass.map(|b| b.to_string()),
        "ipv6" => args.ipv6.map(|b| b.to_string()),
        "vip6-prefix" => args.vip6_prefix.as_ref().map(s),
        "egress-resolver" => args.egress_resolver.as_ref().map(s),
        "refuse-undeclared-egress" => args.refuse_undeclared_egress.map(|b| b.to_string()),
        "gateway" => args.gateway.as_ref().map(s),
        _ => None,
    }
}

/// The YAML lines of the settings that are set, key by key.
fn set_values(args: &RunArgs) -> Vec<(&'static str, String)> {
    KEYS.iter()
        .filter_map(|k| yaml_value(args, k.name).map(|v| (k.name, v)))
        .collect()
}

/// agent.yaml for these settings: every key documented, unset ones commented out with their
/// default.
pub fn render_config(args: &RunArgs) -> String {
    let mut out = String::from(
        "# HMS node agent settings, read by `hms-node-agent run --config /etc/hms/agent.yaml`.\n\
         # Written by `hms-node-agent install`. Keys are the `run` flags without the dashes;\n\
         # a key left commented out takes the default shown.\n\
         #\n\
         # You may edit this file: `hms-node-agent install` then keeps it (it overwrites an\n\
         # edited file only with --force). After changing outbound, dns, inbound or metrics, run\n\
         # `hms-node-agent install` again: it rewrites the socket units from this file.\n",
    );
    for key in KEYS {
        let _ = writeln!(out, "\n# {}", key.doc);
        match yaml_value(args, key.name) {
            Some(v) => {
                let _ = writeln!(out, "{}: {v}", key.name);
            }
            None => {
                let _ = writeln!(out, "# {}: {}", key.name, key.default);
            }
        }
    }
    out
}

/// Parses agent.yaml the way `run --config` does.
pub fn parse_config(text: &str, path: &Path) -> anyhow::Result<RunArgs> {
    serde_saphyr::from_str::<Option<RunArgs>>(text)
        .map(Option::unwrap_or_default)
        .with_context(|| {
            format!(
                "{}: not a valid agent config (keys are the `run` flags without dashes, e.g. `node-name:`)",
                path.display()
            )
        })
}

/// Flags given on the command line win over those from `--config FILE`.
fn merge(flags: &RunArgs, file: &RunArgs) -> anyhow::Result<RunArgs> {
    let mut yaml = String::new();
    for key in KEYS {
        if let Some(v) = yaml_value(flags, key.name).or_else(|| yaml_value(file, key.name)) {
            let _ = writeln!(yaml, "{}: {v}", key.name);
        }
    }
    parse_config(&yaml, Path::new("<merged settings>"))
}

// --- units ---------------------------------------------------------------------------------

/// What the units are rendered from: the settings in force once defaults are applied.
#[derive(Debug, Clone)]
pub struct UnitSettings {
    pub outbound: std::net::SocketAddrV4,
    pub dns: std::net::SocketAddrV4,
    pub inbound: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub pin_dir: PathBuf,
    /// `None`: the cgroup v2 root, found at run time.
    pub cgroup: Option<PathBuf>,
}

impl UnitSettings {
    /// Applies the agent's own defaults and validation to `args` (a file's settings). The
    /// cgroup is only checked for existence when installing onto this host (`check_cgroup`).
    pub fn resolve(args: &RunArgs, check_cgroup: bool) -> anyhow::Result<UnitSettings> {
        let mut probe = args.clone();
        probe.config = None;
        let explicit_cgroup = args.cgroup.clone();
        if !check_cgroup || probe.cgroup.is_none() {
            // Any existing directory: keeps resolve() from looking for or at the cgroup.
            probe.cgroup = Some("/".into());
        }
        let c = AgentConfig::resolve(probe)?;
        Ok(UnitSettings {
            outbound: c.outbound,
            dns: c.dns,
            inbound: c.inbound,
            metrics: c.metrics,
            state_dir: c.state_dir,
            admin_socket: c.admin_socket,
            pin_dir: c.pin_dir,
            cgroup: explicit_cgroup,
        })
    }

    fn listen_address(&self, l: &Listener) -> String {
        match l.fd_name {
            crate::listeners::OUTBOUND => self.outbound.to_string(),
            crate::listeners::DNS_UDP | crate::listeners::DNS_TCP => self.dns.to_string(),
            crate::listeners::METRICS => self.metrics.to_string(),
            _ => self.inbound.to_string(),
        }
    }
}

/// `dir` relative to `base` when systemd can manage it (`StateDirectory=`, `RuntimeDirectory=`).
fn managed_dir(dir: &Path, base: &str) -> Option<String> {
    let rel = dir.strip_prefix(base).ok()?;
    let rel = rel.to_str()?;
    let plain = !rel.is_empty()
        && rel
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    plain.then(|| rel.to_string())
}

fn header() -> &'static str {
    "# Written by `hms-node-agent install` from /etc/hms/agent.yaml; it rewrites this file.\n\
     # For local changes use a drop-in (`systemctl edit`), which install leaves alone.\n"
}

/// One socket unit per listener, so each descriptor has its own name in LISTEN_FDNAMES.
pub fn render_socket(l: &Listener, s: &UnitSettings) -> String {
    let mut out = String::from(header());
    let directive = if l.datagram {
        "ListenDatagram"
    } else {
        "ListenStream"
    };
    let _ = write!(
        out,
        "\n[Unit]\n\
         Description=HMS node agent: {desc}\n\
         \n\
         [Socket]\n\
         {directive}={addr}\n\
         # The agent finds this descriptor by name in LISTEN_FDNAMES.\n\
         FileDescriptorName={name}\n\
         # One socket per address, held by systemd across agent restarts: connections queue\n\
         # in the backlog while the agent restarts instead of being refused.\n\
         ReusePort=no\n\
         Service={SERVICE_UNIT}\n\
         \n\
         [Install]\n\
         WantedBy=sockets.target\n",
        desc = l.description,
        addr = s.listen_address(l),
        name = l.fd_name,
    );
    out
}

/// The service unit.
pub fn render_service(s: &UnitSettings) -> String {
    let sockets: Vec<&str> = LISTENERS.iter().map(|l| l.unit).collect();
    let sockets = sockets.join(" ");
    let mut rw: Vec<String> = Vec::new();
    let mut add = |p: &Path| {
        let p = p.display().to_string();
        if !rw.contains(&p) {
            rw.push(p);
        }
    };
    add(&s.state_dir);
    if let Some(dir) = s.admin_socket.parent() {
        add(dir);
    }
    add(Path::new("/sys/fs/bpf"));
    if let Some(dir) = s.pin_dir.parent() {
        add(dir);
    }
    add(Path::new("/sys/fs/cgroup"));
    if let Some(cg) = &s.cgroup {
        add(cg);
    }
    // `-`: a path that does not exist yet is no reason to refuse to start.
    let rw: Vec<String> = rw.into_iter().map(|p| format!("-{p}")).collect();
    // systemd creates (and makes writable under ProtectSystem=strict) state and runtime
    // directories it manages; other places must exist and are only listed above.
    let mut dirs = String::new();
    if let Some(rel) = managed_dir(&s.state_dir, "/var/lib") {
        let _ = write!(dirs, "StateDirectory={rel}\nStateDirectoryMode=0700\n");
    }
    if let Some(rel) = s.admin_socket.parent().and_then(|d| managed_dir(d, "/run")) {
        let _ = write!(dirs, "RuntimeDirectory={rel}\nRuntimeDirectoryMode=0755\n");
    }
    format!(
        "{header}\
         \n[Unit]\n\
         Description=HMS node agent (transparent service mesh)\n\
         Requires={sockets}\n\
         After={sockets} network-online.target\n\
         Wants=network-online.target\n\
         # While the agent is down, redirection stays in the kernel and callers wait: always\n\
         # bring it back, never give up after a burst of failures.\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         Type=exec\n\
         ExecStart={AGENT_BIN} run --config {CONFIG_PATH}\n\
         # The listeners come from the socket units (LISTEN_FDS / LISTEN_FDNAMES).\n\
         Sockets={sockets}\n\
         # Hand-over (upgrade without closing a listener) starts a successor in this cgroup;\n\
         # it becomes the main process by sending MAINPID= to $NOTIFY_SOCKET.\n\
         NotifyAccess=all\n\
         Restart=always\n\
         RestartSec=1\n\
         # SIGTERM to the agent, which stops accepting and drains for at most 10 s; anything\n\
         # else in the cgroup, and the agent after TimeoutStopSec, gets SIGKILL.\n\
         KillMode=mixed\n\
         TimeoutStopSec=15\n\
         \n\
         # Capabilities, and nothing more:\n\
         #   CAP_BPF        load programs, create and pin maps and links (Linux 5.8+)\n\
         #   CAP_PERFMON    the verifier refuses the sock_ops program without it (EACCES)\n\
         #   CAP_NET_ADMIN  attach cgroup sock_addr/sock_ops programs; SO_MARK on DNS upstream sockets\n\
         # No CAP_SYS_ADMIN: CAP_BPF and CAP_PERFMON replace it for BPF since Linux 5.8, which the\n\
         # ring buffer needs anyway. No CAP_SYS_RESOURCE: LimitMEMLOCK below is set by systemd\n\
         # (BPF memory is charged to memlock before Linux 5.11).\n\
         CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN\n\
         AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN\n\
         LimitMEMLOCK=infinity\n\
         # systemd's default is 1024 soft: the agent raises its soft limit to this hard one at\n\
         # start and gives each listener a share of it (see `hms-ctl status`, limits).\n\
         LimitNOFILE=524288\n\
         \n\
         # Hardening that leaves bpf(2), bpffs and cgroupfs usable. Not used on purpose:\n\
         #   ProtectKernelTunables, ProtectControlGroups  make /sys/fs/bpf or /sys/fs/cgroup read-only\n\
         #   PrivateNetwork, IPAddressDeny                the agent is the host's proxy\n\
         #   PrivateUsers                                 capabilities would not reach the kernel\n\
         #   SystemCallFilter=@system-service             bpf(2) is in @privileged\n\
         #   ProtectProc, ProcSubset                      callers are identified through /proc\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ReadWritePaths={rw}\n\
         {dirs}\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         PrivateDevices=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectKernelModules=yes\n\
         RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         SystemCallArchitectures=native\n\
         UMask=0077\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        header = header(),
        rw = rw.join(" "),
    )
}

// --- the manifest --------------------------------------------------------------------------

/// What install wrote: files (path inside the root, FNV-1a hash of the content) and the
/// directories it created.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Manifest {
    files: Vec<(String, u64)>,
    dirs: Vec<String>,
}

impl Manifest {
    fn parse(text: &str) -> Manifest {
        let mut m = Manifest::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("file"), Some(hash), Some(path)) => {
                    if let Ok(h) = u64::from_str_radix(hash, 16) {
                        m.files.push((path.to_string(), h));
                    }
                }
                (Some("dir"), Some(path), None) => m.dirs.push(path.to_string()),
                _ => {}
            }
        }
        m
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# Files and directories written by `hms-node-agent install`; `uninstall` removes them.\n",
        );
        for (path, hash) in &self.files {
            let _ = writeln!(out, "file {hash:016x} {path}");
        }
        for dir in &self.dirs {
            let _ = writeln!(out, "dir {dir}");
        }
        out
    }

    fn hash_of(&self, path: &str) -> Option<u64> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, h)| *h)
    }

    fn read(root: &Path) -> Manifest {
        std::fs::read_to_string(under(root, MANIFEST_PATH))
            .map(|t| Manifest::parse(&t))
            .unwrap_or_default()
    }
}

/// FNV-1a, 64 bit: stable across builds, enough to notice an edit.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `path` (absolute, as on the installed system) inside `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn is_host_root(root: &Path) -> bool {
    root.canonicalize()
        .map(|p| p == Path::new("/"))
        .unwrap_or(false)
}

fn systemd_running() -> bool {
    Path::new(SYSTEMD_RUNNING).is_dir()
}

// --- install -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAction {
    Wrote,
    Unchanged,
    /// An edited config left as it is (install ran without settings).
    Kept,
}

#[derive(Debug, Default)]
pub struct InstallReport {
    pub root: PathBuf,
    /// Paths as on the installed system.
    pub files: Vec<(String, FileAction)>,
    pub systemd: Vec<String>,
    pub notes: Vec<String>,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !is_host_root(&self.root) {
            writeln!(f, "installed into {}", self.root.display())?;
        }
        for (path, action) in &self.files {
            let what = match action {
                FileAction::Wrote => "wrote    ",
                FileAction::Unchanged => "unchanged",
                FileAction::Kept => "kept     ",
            };
            writeln!(f, "  {what} {path}")?;
        }
        for line in &self.systemd {
            writeln!(f, "  ran      {line}")?;
        }
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

struct Writer<'a> {
    root: &'a Path,
    old: Manifest,
    new: Manifest,
    report: InstallReport,
}

impl Writer<'_> {
    /// Creates the directories leading to `path` that are missing, remembering them.
    fn ensure_dir(&mut self, dir: &str) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(Path::new(dir));
        while let Some(d) = cur {
            if d == Path::new("/") || under(self.root, &d.to_string_lossy()).exists() {
                break;
            }
            missing.push(d.to_string_lossy().into_owned());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            let full = under(self.root, &d);
            std::fs::create_dir(&full).with_context(|| format!("creating {}", full.display()))?;
            self.new.dirs.push(d);
        }
        Ok(())
    }

    /// Writes `content` to `path` (atomically, by rename) unless it already holds it.
    fn file(&mut self, path: &str, content: &[u8], mode: u32) -> anyhow::Result<FileAction> {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        self.ensure_dir(&dir)?;
        let full = under(self.root, path);
        let action = match std::fs::read(&full) {
            Ok(existing) if existing == content => FileAction::Unchanged,
            _ => {
                write_atomic(&full, content, mode)?;
                FileAction::Wrote
            }
        };
        self.new.files.push((path.to_string(), fnv1a(content)));
        self.report.files.push((path.to_string(), action));
        Ok(action)
    }

    /// A relative symlink `path -> target` (a file name in the same directory).
    fn link(&mut self, path: &str, target: &str) -> anyhow::Result<FileAction> {
        let full = under(self.root, path);
        let action = match std::fs::read_link(&full) {
            Ok(t) if t == Path::new(target) => FileAction::Unchanged,
            _ => {
                let tmp = full.with_file_name(".hms-svc.hms-install-tmp");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(target, &tmp)
                    .and_then(|()| std::fs::rename(&tmp, &full))
                    .with_context(|| format!("linking {} -> {target}", full.display()))?;
                FileAction::Wrote
            }
        };
        self.new
            .files
            .push((path.to_string(), fnv1a(target.as_bytes())));
        self.report.files.push((path.to_string(), action));
        Ok(action)
    }
}

fn write_atomic(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.hms-install-tmp"));
    let result = (|| -> io::Result<()> {
        std::fs::write(&tmp, content)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        // Rename, not write in place: replaces a running binary without ETXTBSY.
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// The binaries to install: this executable and `hms-ctl` next to it.
fn source_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("finding this executable (/proc/self/exe)")?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        bail!(
            "{} was replaced or deleted while running; run install from the new binary",
            exe.display()
        );
    }
    let ctl = exe.with_file_name("hms-ctl");
    if !ctl.is_file() {
        bail!(
            "hms-ctl is not next to {} ({} is missing); build both (`cargo build --release --bins`) and run install from there",
            exe.display(),
            ctl.display()
        );
    }
    Ok((exe, ctl))
}

/// The config text to install, and whether it replaces an edited file.
fn decide_config(
    root: &Path,
    args: &InstallArgs,
    old: &Manifest,
) -> anyhow::Result<(String, Option<FileAction>)> {
    let path = under(root, CONFIG_PATH);
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file_settings = match &args.settings.config {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading config file {}", file.display()))?;
            Some(parse_config(&text, file)?)
        }
        None => None,
    };
    let given = file_settings.is_some() || !set_values(&args.settings).is_empty();
    if !given && let Some(text) = existing {
        // No settings asked for: keep what is there (edited or not), units follow it.
        parse_config(&text, &path)?;
        return Ok((text, Some(FileAction::Kept)));
    }
    let settings = match &file_settings {
        Some(file) => merge(&args.settings, file)?,
        None => args.settings.clone(),
    };
    let text = render_config(&settings);
    if let Some(existing) = existing
        && existing != text
    {
        let ours = old.hash_of(CONFIG_PATH) == Some(fnv1a(existing.as_bytes()));
        if !ours && !args.force {
            bail!(
                "{} was edited after install (or not written by it) and differs from the \
                 settings given; keep it by running install without settings, or pass --force \
                 to replace it",
                path.display()
            );
        }
    }
    Ok((text, None))
}

/// `hms-node-agent install`.
pub fn install(args: &InstallArgs) -> anyhow::Result<InstallReport> {
    // The join token comes from a file (never argv, where every local user can read it) and
    // goes into the 0600 config file.
    let mut args = args.clone();
    if let Some(path) = args.settings.join_token_file.take() {
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the join token from {}", path.display()))?;
        args.settings.join_token = Some(token.trim().to_string());
    }
    let args = &args;
    let root = args.root.as_path();
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    if args.settings.takeover {
        bail!(
            "--takeover belongs to `hms-node-agent run` (an upgrade's successor); install does not persist it"
        );
    }
    let host = is_host_root(root);
    let (exe, ctl) = source_binaries()?;
    let old = Manifest::read(root);
    let (config_text, config_action) = decide_config(root, args, &old)?;
    let settings = parse_config(&config_text, Path::new(CONFIG_PATH))?;
    let units = UnitSettings::resolve(&settings, host)?;

    let mut w = Writer {
        root,
        old,
        new: Manifest::default(),
        report: InstallReport {
            root: root.to_path_buf(),
            ..InstallReport::default()
        },
    };
    // Directories created by an earlier install are still ours to remove.
    w.new.dirs = w.old.dirs.clone();

    let mut changed = false;
    for (src, dst) in [(&exe, AGENT_BIN), (&ctl, CTL_BIN)] {
        let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        changed |= w.file(dst, &bytes, 0o755)? == FileAction::Wrote;
    }
    w.link(SVC_LINK, "hms-ctl")?;
    let old_hash = w.old.hash_of(CONFIG_PATH);
    // A join token is a secret: a config that holds one is readable by root only (and stays
    // so when an unchanged file is kept).
    let config_mode = if settings.join_token.is_some() {
        0o600
    } else {
        0o644
    };
    let action = w.file(CONFIG_PATH, config_text.as_bytes(), config_mode)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let path = under(root, CONFIG_PATH);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(config_mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    changed |= action == FileAction::Wrote;
    if config_action == Some(FileAction::Kept) {
        // An existing config left as it is: edited by the user unless it is what install
        // wrote last time. It keeps the old hash (so settings given later still need --force
        // to replace the edits); one install never wrote is never claimed.
        if old_hash != Some(fnv1a(config_text.as_bytes()))
            && let Some(last) = w.report.files.last_mut()
        {
            last.1 = FileAction::Kept;
        }
        match old_hash {
            Some(h) => {
                if let Some(e) = w.new.files.iter_mut().find(|(p, _)| p == CONFIG_PATH) {
                    e.1 = h;
                }
            }
            None => w.new.files.retain(|(p, _)| p != CONFIG_PATH),
        }
    }
    let mut sockets_changed = false;
    for l in &LISTENERS {
        let a = w.file(
            &format!("{UNIT_DIR}/{}", l.unit),
            render_socket(l, &units).as_bytes(),
            0o644,
        )?;
        sockets_changed |= a == FileAction::Wrote;
    }
    changed |= sockets_changed;
    changed |= w.file(
        &format!("{UNIT_DIR}/{SERVICE_UNIT}"),
        render_service(&units).as_bytes(),
        0o644,
    )? == FileAction::Wrote;

    w.ensure_dir(CONFIG_DIR)?;
    let manifest = w.new.render();
    write_atomic(&under(root, MANIFEST_PATH), manifest.as_bytes(), 0o644)?;

    let mut report = w.report;
    let by_hand = format!("{AGENT_BIN} run --config {CONFIG_PATH}");
    if !host {
        report.notes.push(format!(
            "not enabled: --root is not / (on the target host: `systemctl daemon-reload && systemctl enable --now {}`)",
            enable_list().join(" ")
        ));
    } else if !systemd_running() {
        report.notes.push(format!(
            "systemd is not running on this host ({SYSTEMD_RUNNING} is missing): the units are \
             written but not enabled. Start the agent by hand, as root:\n    {by_hand}"
        ));
    } else {
        let was_active = systemctl_quiet(&["is-active", "--quiet", SERVICE_UNIT]);
        systemctl(&["daemon-reload"], &mut report.systemd)?;
        let mut enable = vec!["enable", "--now"];
        enable.extend(enable_list());
        systemctl(&enable, &mut report.systemd)?;
        if was_active && changed {
            // Restart hands over: the socket units keep the listeners open meanwhile.
            systemctl(&["try-restart", SERVICE_UNIT], &mut report.systemd)?;
        }
        if was_active && sockets_changed {
            report.notes.push(format!(
                "listen addresses changed: they take effect after `systemctl stop {SERVICE_UNIT} && systemctl restart {}`",
                LISTENERS.map(|l| l.unit).join(" ")
            ));
        }
        report
            .notes
            .push("enabled and started; `systemctl status hms-node-agent` shows it".into());
    }
    Ok(report)
}

fn enable_list() -> Vec<&'static str> {
    let mut v: Vec<&str> = LISTENERS.iter().map(|l| l.unit).collect();
    v.push(SERVICE_UNIT);
    v
}

fn systemctl(args: &[&str], log: &mut Vec<String>) -> anyhow::Result<()> {
    let line = format!("systemctl {}", args.join(" "));
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .with_context(|| format!("running {line}"))?;
    log.push(line.clone());
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

fn systemctl_quiet(args: &[&str]) -> bool {
    Command::new("systemctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// --- uninstall -----------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct UninstallReport {
    pub root: PathBuf,
    pub systemd: Vec<String>,
    pub stopped: Vec<i32>,
    pub cleanup: Option<String>,
    pub removed: Vec<String>,
    pub notes: Vec<String>,
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !is_host_root(&self.root) {
            writeln!(f, "uninstalling from {}", self.root.display())?;
        }
        for line in &self.systemd {
            writeln!(f, "  ran      {line}")?;
        }
        for pid in &self.stopped {
            writeln!(f, "  stopped  agent pid {pid}")?;
        }
        if let Some(c) = &self.cleanup {
            writeln!(f, "  {c}")?;
        }
        for path in &self.removed {
            writeln!(f, "  removed  {path}")?;
        }
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

/// `hms-node-agent uninstall`.
pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<UninstallReport> {
    let root = args.root.as_path();
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    let host = is_host_root(root);
    let mut report = UninstallReport {
        root: root.to_path_buf(),
        ..UninstallReport::default()
    };
    // The installed settings say where the pins and state are.
    let config_path = under(root, CONFIG_PATH);
    let installed = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| parse_config(&t, &config_path).ok())
        .unwrap_or_default();
    // The CA's root keys leave the state dir only when the operator says so, before
    // anything is stopped or removed.
    if args.purge && !args.purge_ca_keys {
        let state = installed
            .state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let ca = under(root, &state.to_string_lossy()).join(crate::identity::CA_DIR);
        if ca.is_dir() {
            bail!(
                "this host holds the mesh CA's root keys ({}/{}); nothing was changed. Every host's \
                 trust in the mesh depends on them: save a copy with `hms-ctl ca backup --out FILE` \
                 first, then run `hms-node-agent uninstall --purge --purge-ca-keys` (the keys are \
                 moved to {CA_BACKUP_DIR}/hms-ca-<time>, 0700), or uninstall without --purge",
                state.display(),
                crate::identity::CA_DIR
            );
        }
    }

    // 1. Nothing running: the units, then any agent started by hand from the installed binary.
    if host && systemd_running() {
        let mut disable = vec!["disable", "--now"];
        disable.extend(enable_list());
        if let Err(e) = systemctl(&disable, &mut report.systemd) {
            report.notes.push(format!("warning: {e:#}"));
        }
    }
    report.stopped = stop_agents(&under(root, AGENT_BIN))?;

    // 2. Nothing attached or pinned.
    let pin_dir = match (&args.pin_dir, host) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(
            installed
                .pin_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
        ),
        (None, false) => None,
    };
    match pin_dir {
        Some(p) => {
            let r = crate::redirect::cleanup(&p)?;
            report.cleanup = Some(r.to_string());
        }
        None => report.notes.push(
            "kernel cleanup skipped: --root is not /, so the host's pins are left alone (pass --pin-dir to clean one)"
                .into(),
        ),
    }

    // 3. No file.
    let manifest = Manifest::read(root);
    let mut files: Vec<String> = vec![
        AGENT_BIN.into(),
        CTL_BIN.into(),
        SVC_LINK.into(),
        CONFIG_PATH.into(),
        format!("{UNIT_DIR}/{SERVICE_UNIT}"),
    ];
    files.extend(LISTENERS.iter().map(|l| format!("{UNIT_DIR}/{}", l.unit)));
    for (p, _) in &manifest.files {
        if !files.contains(p) {
            files.push(p.clone());
        }
    }
    files.push(MANIFEST_PATH.into());
    for f in &files {
        let full = under(root, f);
        match std::fs::remove_file(&full) {
            Ok(()) => report.removed.push(f.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", full.display())),
        }
    }
    if args.purge {
        purge_state(root, &installed, &mut report)?;
    }
    // Directories install created (deepest first), and /etc/hms, if empty.
    let mut dirs = manifest.dirs.clone();
    if !dirs.iter().any(|d| d == CONFIG_DIR) {
        dirs.push(CONFIG_DIR.into());
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for d in dirs {
        let full = under(root, &d);
        if std::fs::remove_dir(&full).is_ok() {
            report.removed.push(format!("{d}/"));
        }
    }
    if host
        && systemd_running()
        && let Err(e) = systemctl(&["daemon-reload"], &mut report.systemd)
    {
        report.notes.push(format!("warning: {e:#}"));
    }
    if !args.purge {
        let state = installed
            .state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if under(root, &state.to_string_lossy()).exists() {
            report.notes.push(format!(
                "kept the agent's state in {} (registry, certificates); `uninstall --purge` deletes it",
                state.display()
            ));
        }
    }
    Ok(report)
}

/// Deletes the state dir and the runtime dir, refusing paths that are not plainly HMS's.
fn purge_state(
    root: &Path,
    installed: &RunArgs,
    report: &mut UninstallReport,
) -> anyhow::Result<()> {
    let state = installed
        .state_dir
        .clone()
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    let looks_ours = |p: &Path| {
        p.is_absolute()
            && p.components().count() > 2
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("hms"))
    };
    if !looks_ours(&state) {
        bail!(
            "not purging state dir {}: its name does not contain `hms`; delete it yourself",
            state.display()
        );
    }
    let full = under(root, &state.to_string_lossy());
    // The mesh's CA keys are never lost to a purge: on the CA's host they move to a backup
    // directory first, and the report says where (purging the last copy of the root keys
    // would end every host's trust in the mesh).
    let ca = full.join(crate::identity::CA_DIR);
    if ca.is_dir() {
        let kept = backup_ca(root, &ca)?;
        report.notes.push(format!(
            "kept the mesh CA's keys (this host is the CA) at {kept}: move them back to \
             {}/{} to restore, or delete them yourself once another host holds the CA",
            state.display(),
            crate::identity::CA_DIR
        ));
    }
    match std::fs::remove_dir_all(&full) {
        Ok(()) => report.removed.push(format!("{}/", state.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", full.display())),
    }
    let socket = installed
        .admin_socket
        .clone()
        .unwrap_or_else(|| hms_ctl::api::DEFAULT_SOCKET.into());
    let full = under(root, &socket.to_string_lossy());
    if std::fs::remove_file(&full).is_ok() {
        report.removed.push(socket.display().to_string());
    }
    if let Some(dir) = socket.parent().filter(|d| looks_ours(d))
        && std::fs::remove_dir(under(root, &dir.to_string_lossy())).is_ok()
    {
        report.removed.push(format!("{}/", dir.display()));
    }
    Ok(())
}

/// Where a purge moves the CA's directory: `/var/backups/hms-ca-<unix seconds>`, mode 0700.
const CA_BACKUP_DIR: &str = "/var/backups";

/// Moves the CA directory `ca` into a new backup directory (under `root`); its path as the
/// host sees it.
fn backup_ca(root: &Path, ca: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let parent = under(root, CA_BACKUP_DIR);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let (mut name, mut n) = (format!("hms-ca-{stamp}"), 1);
    while parent.join(&name).exists() {
        name = format!("hms-ca-{stamp}-{n}");
        n += 1;
    }
    let dest = parent.join(&name);
    if std::fs::rename(ca, &dest).is_err() {
        // Another file system: copy, then the purge removes the original with the state.
        copy_tree(ca, &dest).with_context(|| {
            format!(
                "backing up the CA from {} to {}",
                ca.display(),
                dest.display()
            )
        })?;
    }
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dest.display()))?;
    Ok(format!("{CA_BACKUP_DIR}/{name}"))
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dst)?;
        } else {
            std::fs::copy(entry.path(), &dst)?;
        }
    }
    Ok(())
}

/// SIGTERM (then, after the drain deadline, SIGKILL) to every `run` process of the installed
/// binary. Returns their pids.
fn stop_agents(binary: &Path) -> anyhow::Result<Vec<i32>> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let me = std::process::id() as i32;
    let deleted = format!("{} (deleted)", binary.display());
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(pids);
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe != binary && exe.to_string_lossy() != deleted {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).nth(1) == Some(b"run".as_slice()) {
            pids.push(pid);
        }
    }
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let alive = |pid: i32| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    Ok(pids)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> RunArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec!["x"];
        argv.extend_from_slice(flags);
        <P as clap::Parser>::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn keys_cover_every_run_flag() {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            run: RunArgs,
        }
        let ids: Vec<String> = <P as clap::CommandFactory>::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(ids.len() > 5, "{ids:?}");
        for id in ids {
            // `--config` is the file itself; `--takeover` is a one-shot of an upgrade.
            // The token file is read by install into `join-token` (0600 config).
            if id == "config" || id == "help" || id == "takeover" || id == "join_token_file" {
                continue;
            }
            let key = id.replace('_', "-");
            assert!(
                KEYS.iter().any(|k| k.name == key),
                "`run --{key}` is not persisted by install: add it to KEYS and yaml_value()"
            );
        }
    }

    #[test]
    fn config_round_trips_the_flags() {
        let mut given = args(&[
            "--node-name",
            "host-a",
            "--cgroup",
            "/sys/fs/cgroup/my mesh",
            "--state-dir",
            "/srv/hms-state",
            "--vip-cidr",
            "127.88.0.0/20",
            "--outbound",
            "127.0.0.1:25001",
            "--dns",
            "127.0.0.2:25053",
            "--inbound",
            "[::]:25008",
            "--metrics",
            "127.0.0.1:25090",
            "--registry",
            "etcd://10.0.0.1:2379,10.0.0.2:2379",
            "--dns-mark",
            "0x1234",
            "--log-format",
            "json",
            "--pin-dir",
            "/sys/fs/bpf/it's",
            "--admin-socket",
            "/run/x/a.sock",
            "--trust-domain",
            "mesh.example",
            "--sk-msg-bypass=false",
            "--dns-allow-remote",
            "--advertise",
            "10.0.0.7:25008",
            "--ipv6=false",
            "--vip6-prefix",
            "fd00:1234::/96",
            "--egress-resolver",
            "127.0.0.53:53",
            "--refuse-undeclared-egress",
            "--gateway",
            "public,admin",
        ]);
        // Only from a file (install reads --join-token-file into it).
        given.join_token = Some("hms2.abc".into());
        let text = render_config(&given);
        let back = parse_config(&text, Path::new("t")).unwrap();
        for key in KEYS {
            assert_eq!(
                yaml_value(&back, key.name),
                yaml_value(&given, key.name),
                "{}\n{text}",
                key.name
            );
            assert!(yaml_value(&given, key.name).is_some(), "{} set", key.name);
        }
        assert_eq!(back.dns_mark, Some(0x1234));
        assert_eq!(back.inbound, Some("[::]:25008".parse().unwrap()));
        assert_eq!(back.sk_msg_bypass, Some(false));
        assert_eq!(back.ipv6, Some(false));
        assert_eq!(back.vip6_prefix, Some("fd00:1234::/96".parse().unwrap()));
        assert_eq!(back.refuse_undeclared_egress, Some(true));
    }

    #[test]
    fn unset_settings_are_commented_defaults() {
        let text = render_config(&args(&["--node-name", "n1"]));
        assert!(text.contains("\nnode-name: 'n1'\n"), "{text}");
        assert!(text.contains("\n# outbound: 127.0.0.1:15001\n"), "{text}");
        let back = parse_config(&text, Path::new("t")).unwrap();
        assert_eq!(back.node_name.as_deref(), Some("n1"));
        assert!(back.outbound.is_none() && back.dns_mark.is_none());
        // Every documented default is what the agent uses.
        let defaults = KEYS
            .iter()
            .filter(|k| !k.default.contains(' '))
            .map(|k| format!("{}: {}\n", k.name, k.default))
            .collect::<String>();
        let parsed = parse_config(&defaults, Path::new("defaults")).unwrap();
        let mut with_cgroup = parsed.clone();
        with_cgroup.cgroup = Some("/".into());
        let c = AgentConfig::resolve(with_cgroup).unwrap();
        let d = AgentConfig::resolve(RunArgs {
            cgroup: Some("/".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.outbound, c.dns, c.inbound, c.metrics, c.dns_mark),
            (d.outbound, d.dns, d.inbound, d.metrics, d.dns_mark)
        );
        assert_eq!((c.vip_cidr, c.registry), (d.vip_cidr, d.registry));
        assert_eq!(
            (c.state_dir, c.admin_socket, c.pin_dir, c.log_format),
            (d.state_dir, d.admin_socket, d.pin_dir, d.log_format)
        );
    }

    #[test]
    fn the_agent_reads_what_install_writes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        for flags in [
            &[][..],
            &[
                "--node-name",
                "n2",
                "--dns-mark",
                "0x99",
                "--inbound",
                "[::1]:9",
            ][..],
        ] {
            std::fs::write(&file, render_config(&args(flags))).unwrap();
            let c = AgentConfig::resolve(RunArgs {
                config: Some(file.clone()),
                cgroup: Some(dir.path().to_path_buf()),
                ..Default::default()
            })
            .unwrap();
            if !flags.is_empty() {
                assert_eq!(c.node_name, "n2");
                assert_eq!(c.dns_mark, 0x99);
                assert_eq!(c.inbound, "[::1]:9".parse().unwrap());
            }
        }
    }

    #[test]
    fn flags_win_over_a_config_file() {
        let file = args(&["--node-name", "from-file", "--outbound", "127.0.0.1:1"]);
        let flags = args(&["--node-name", "from-flag"]);
        let m = merge(&flags, &file).unwrap();
        assert_eq!(m.node_name.as_deref(), Some("from-flag"));
        assert_eq!(m.outbound, Some("127.0.0.1:1".parse().unwrap()));
    }

    fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    }

    #[test]
    fn socket_units_listen_where_the_config_says() {
        let given = args(&[
            "--outbound",
            "127.0.0.1:25001",
            "--dns",
            "127.0.0.3:25053",
            "--inbound",
            "[::]:25008",
            "--metrics",
            "127.0.0.1:25090",
        ]);
        let text = render_config(&given);
        let s =
            UnitSettings::resolve(&parse_config(&text, Path::new("t")).unwrap(), false).unwrap();
        let units: Vec<String> = LISTENERS.iter().map(|l| render_socket(l, &s)).collect();
        assert_eq!(directive(&units[0], "ListenStream"), ["127.0.0.1:25001"]);
        assert_eq!(directive(&units[1], "ListenDatagram"), ["127.0.0.3:25053"]);
        assert_eq!(directive(&units[2], "ListenStream"), ["127.0.0.3:25053"]);
        assert_eq!(directive(&units[3], "ListenStream"), ["[::]:25008"]);
        assert_eq!(directive(&units[4], "ListenStream"), ["127.0.0.1:25090"]);
        for (l, u) in LISTENERS.iter().zip(&units) {
            assert_eq!(directive(u, "FileDescriptorName"), [l.fd_name]);
            assert_eq!(directive(u, "Service"), [SERVICE_UNIT]);
            assert_eq!(directive(u, "ReusePort"), ["no"]);
        }
        // Defaults when nothing is set.
        let s = UnitSettings::resolve(&RunArgs::default(), false).unwrap();
        assert_eq!(
            directive(&render_socket(&LISTENERS[0], &s), "ListenStream"),
            ["127.0.0.1:15001"]
        );
        assert_eq!(
            directive(&render_socket(&LISTENERS[1], &s), "ListenDatagram"),
            ["127.0.0.1:15053"]
        );
        assert_eq!(
            directive(&render_socket(&LISTENERS[3], &s), "ListenStream"),
            ["0.0.0.0:15008"]
        );
    }

    #[test]
    fn service_runs_the_installed_config_with_its_sockets() {
        let s = UnitSettings::resolve(&args(&["--state-dir", "/srv/hms"]), false).unwrap();
        let unit = render_service(&s);
        assert_eq!(
            directive(&unit, "ExecStart"),
            ["/usr/local/bin/hms-node-agent run --config /etc/hms/agent.yaml"]
        );
        let sockets = directive(&unit, "Sockets")[0];
        for l in &LISTENERS {
            assert!(sockets.contains(l.unit), "{sockets}");
        }
        assert_eq!(directive(&unit, "Restart"), ["always"]);
        assert_eq!(directive(&unit, "KillMode"), ["mixed"]);
        let rw = directive(&unit, "ReadWritePaths")[0];
        assert!(
            rw.contains("-/srv/hms ") && rw.contains("-/sys/fs/bpf "),
            "{rw}"
        );
        assert!(
            directive(&unit, "StateDirectory").is_empty(),
            "/srv is not systemd's"
        );
        assert_eq!(directive(&unit, "RuntimeDirectory"), ["hms"]);
        let caps = directive(&unit, "CapabilityBoundingSet")[0];
        assert!(caps.contains("CAP_BPF") && !caps.contains("CAP_SYS_ADMIN"));
        let stop: u64 = directive(&unit, "TimeoutStopSec")[0].parse().unwrap();
        assert!(stop > 10, "above the agent's 10 s drain");
    }

    #[test]
    fn systemd_manages_state_and_runtime_dirs_it_can() {
        let s = UnitSettings::resolve(
            &args(&[
                "--state-dir",
                "/var/lib/hms/a",
                "--admin-socket",
                "/run/hms-b/x.sock",
            ]),
            false,
        )
        .unwrap();
        let unit = render_service(&s);
        assert_eq!(directive(&unit, "StateDirectory"), ["hms/a"]);
        assert_eq!(directive(&unit, "RuntimeDirectory"), ["hms-b"]);
        assert_eq!(managed_dir(Path::new("/var/lib"), "/var/lib"), None);
        assert_eq!(managed_dir(Path::new("/var/lib/a b"), "/var/lib"), None);
    }

    #[test]
    fn manifest_round_trips() {
        let m = Manifest {
            files: vec![("/etc/hms/agent.yaml".into(), 0xdead_beef)],
            dirs: vec!["/etc/hms".into(), "/usr/local/bin".into()],
        };
        assert_eq!(Manifest::parse(&m.render()), m);
        assert_eq!(m.hash_of("/etc/hms/agent.yaml"), Some(0xdead_beef));
    }

    #[test]
    fn install_keeps_an_edited_config_and_replaces_its_own() {
        let root = tempfile::tempdir().unwrap();
        let mk = |flags: &[&str], force: bool| InstallArgs {
            root: root.path().to_path_buf(),
            force,
            settings: args(flags),
        };
        let old = Manifest::default();
        // Fresh: written from the flags.
        let (text, _) =
            decide_config(root.path(), &mk(&["--node-name", "a"], false), &old).unwrap();
        let path = under(root.path(), CONFIG_PATH);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        let ours = Manifest {
            files: vec![(CONFIG_PATH.into(), fnv1a(text.as_bytes()))],
            dirs: vec![],
        };
        // Ours and unedited: new settings replace it.
        let (text2, _) =
            decide_config(root.path(), &mk(&["--node-name", "b"], false), &ours).unwrap();
        assert!(text2.contains("node-name: 'b'"));
        // Edited: refused, unless --force; kept when no settings are given.
        std::fs::write(&path, format!("{text}# my note\n")).unwrap();
        let err = decide_config(root.path(), &mk(&["--node-name", "b"], false), &ours)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        assert!(decide_config(root.path(), &mk(&["--node-name", "b"], true), &ours).is_ok());
        let (kept, action) = decide_config(root.path(), &mk(&[], false), &ours).unwrap();
        assert!(kept.ends_with("# my note\n"));
        assert_eq!(action, Some(FileAction::Kept));
    }
}
