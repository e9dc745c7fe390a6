//! The systemd units: the service and one socket unit per listener, rendered from the
//! settings. Never writes them anywhere (`steps` does, through `files`).

use super::*;

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

    pub(super) fn listen_address(&self, l: &Listener) -> String {
        match l.fd_name {
            crate::listeners::OUTBOUND => self.outbound.to_string(),
            crate::listeners::DNS_UDP | crate::listeners::DNS_TCP => self.dns.to_string(),
            crate::listeners::METRICS => self.metrics.to_string(),
            _ => self.inbound.to_string(),
        }
    }
}

/// `dir` relative to `base` when systemd can manage it (`StateDirectory=`, `RuntimeDirectory=`).
pub(super) fn managed_dir(dir: &Path, base: &str) -> Option<String> {
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

/// Who writes the units and where the agent binary is: `hms-node-agent install` (under
/// `/usr/local`, rewritten from agent.yaml) or the Debian package (`/usr/bin`, shipped as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitOrigin {
    pub agent_bin: &'static str,
    header: &'static str,
}

/// The units `hms-node-agent install` writes into /etc/systemd/system.
pub const BY_INSTALL: UnitOrigin = UnitOrigin {
    agent_bin: AGENT_BIN,
    header: "# Written by `hms-node-agent install` from /etc/hms/agent.yaml; it rewrites this file.\n\
             # For local changes use a drop-in (`systemctl edit`), which install leaves alone.\n",
};

/// The units the `hms` package ships in /lib/systemd/system (`cargo xtask deb`).
pub const BY_PACKAGE: UnitOrigin = UnitOrigin {
    agent_bin: "/usr/bin/hms-node-agent",
    header: "# Shipped by the hms package (rendered from the default /etc/hms/agent.yaml).\n\
             # For local changes (other listen addresses included) use a drop-in\n\
             # (`systemctl edit`); an upgrade replaces this file.\n",
};

/// One socket unit per listener, so each descriptor has its own name in LISTEN_FDNAMES.
pub fn render_socket(l: &Listener, s: &UnitSettings, origin: &UnitOrigin) -> String {
    let mut out = String::from(origin.header);
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
pub fn render_service(s: &UnitSettings, origin: &UnitOrigin) -> String {
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
         # READY=1 once every listener serves (units ordered after this one start then), and\n\
         # STATUS= with the node and what it serves, for `systemctl status`.\n\
         Type=notify\n\
         ExecStart={agent_bin} run --config {CONFIG_PATH}\n\
         # SIGHUP: the agent re-reads {CONFIG_PATH} and logs which changes need a restart\n\
         # (sh's own kill: /bin/kill comes with procps, which a minimal system lacks).\n\
         ExecReload=/bin/sh -c \"kill -HUP $MAINPID\"\n\
         # The listeners come from the socket units (LISTEN_FDS / LISTEN_FDNAMES).\n\
         Sockets={sockets}\n\
         # Hand-over (upgrade without closing a listener) starts a successor in this cgroup,\n\
         # re-parented to PID 1; the main process names it the new one (MAINPID=). all, not\n\
         # main: the successor of an agent older than that names itself.\n\
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
         #   CAP_NET_BIND_SERVICE  listeners below port 1024 (a gateway on :80 or :443)\n\
         # No CAP_SYS_ADMIN: CAP_BPF and CAP_PERFMON replace it for BPF since Linux 5.8, which the\n\
         # ring buffer needs anyway. No CAP_SYS_RESOURCE: LimitMEMLOCK below is set by systemd\n\
         # (BPF memory is charged to memlock before Linux 5.11).\n\
         CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n\
         AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n\
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
        header = origin.header,
        agent_bin = origin.agent_bin,
        rw = rw.join(" "),
    )
}
