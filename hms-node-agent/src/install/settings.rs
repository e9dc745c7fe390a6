//! agent.yaml: every `run` setting as a documented YAML key, rendering, parsing and merging
//! with flags. Never writes a file (`files`) or renders units (`units`).

use super::*;

/// One key of agent.yaml: the `run` flag without dashes, what it does, its default.
pub(super) struct Key {
    pub(super) name: &'static str,
    pub(super) doc: &'static str,
    pub(super) default: &'static str,
}

/// Every `run` setting, in the order agent.yaml lists them. A unit test checks this covers
/// every flag of [`RunArgs`].
pub(super) const KEYS: &[Key] = &[
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
pub(super) fn yaml_value(args: &RunArgs, key: &str) -> Option<String> {
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
pub(super) fn set_values(args: &RunArgs) -> Vec<(&'static str, String)> {
    KEYS.iter()
        .filter_map(|k| yaml_value(args, k.name).map(|v| (k.name, v)))
        .collect()
}

/// agent.yaml for these settings: every key documented, unset ones commented out with their
/// default.
pub fn render_config(args: &RunArgs) -> String {
    render_config_with(
        args,
        "# HMS node agent settings, read by `hms-node-agent run --config /etc/hms/agent.yaml`.\n\
         # Written by `hms-node-agent install`. Keys are the `run` flags without the dashes;\n\
         # a key left commented out takes the default shown.\n\
         #\n\
         # You may edit this file: `hms-node-agent install` then keeps it (it overwrites an\n\
         # edited file only with --force). After changing outbound, dns, inbound or metrics, run\n\
         # `hms-node-agent install` again: it rewrites the socket units from this file.\n",
    )
}

/// The package's conffile: every key commented out with its default.
pub fn render_package_config() -> String {
    render_config_with(
        &RunArgs::default(),
        "# HMS node agent settings, read by `hms-node-agent run --config /etc/hms/agent.yaml`.\n\
         # Keys are the `run` flags without the dashes; a key left commented out takes the\n\
         # default shown.\n\
         #\n\
         # A conffile of the hms package: upgrades keep your edits (dpkg asks when the packaged\n\
         # file changed too). `systemctl reload hms-node-agent` re-reads it and logs which\n\
         # changes need `systemctl restart hms-node-agent`. outbound, dns, inbound and metrics\n\
         # are also the socket units' addresses: change those with a drop-in as well\n\
         # (`systemctl edit hms-node-agent-outbound.socket`), then stop the service and restart\n\
         # its sockets.\n",
    )
}

fn render_config_with(args: &RunArgs, header: &str) -> String {
    let mut out = String::from(header);
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
pub(super) fn merge(flags: &RunArgs, file: &RunArgs) -> anyhow::Result<RunArgs> {
    let mut yaml = String::new();
    for key in KEYS {
        if let Some(v) = yaml_value(flags, key.name).or_else(|| yaml_value(file, key.name)) {
            let _ = writeln!(yaml, "{}: {v}", key.name);
        }
    }
    parse_config(&yaml, Path::new("<merged settings>"))
}
