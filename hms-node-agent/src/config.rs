//! The agent's settings: command-line flags, optionally a YAML file with the same names
//! (`--config`), and the defaults from DESIGN.md. Flags win over the file. Owns parsing and
//! validation of settings; never opens sockets or files other than the config file.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Deserializer};

/// `SO_MARK` on the agent's own upstream DNS sockets; the port-53 hooks skip marked sockets.
/// "HS" in ASCII.
pub const DEFAULT_DNS_MARK: u32 = 0x4853;

/// Flags of `hms-node-agent run`. Every field is optional so that a `--config` file can fill
/// it; [`AgentConfig::resolve`] applies the defaults.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// YAML file with any of these settings (same names, e.g. `node-name: host-a`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Take the listeners over from the agent running on --admin-socket (an upgrade; see
    /// `hms-ctl agent upgrade`), then make it drain and exit.
    #[arg(long)]
    #[serde(skip)]
    pub takeover: bool,
    /// This host's name in the registry [default: the hostname].
    #[arg(long)]
    pub node_name: Option<String>,
    /// cgroup v2 directory whose processes are redirected [default: the cgroup v2 root].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Where the embedded registry and certificates are kept [default: /var/lib/hms].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Unix socket for hms-ctl, created mode 0600 [default: /run/hms/agent.sock].
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// bpffs directory for pinned programs and maps [default: /sys/fs/bpf/hms].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Range service VIPs are allocated from; keep it in loopback space [default: 127.77.0.0/16].
    #[arg(long)]
    #[serde(default, deserialize_with = "de_from_str")]
    pub vip_cidr: Option<Ipv4Cidr>,
    /// Outbound capture listener [default: 127.0.0.1:15001].
    #[arg(long)]
    pub outbound: Option<SocketAddrV4>,
    /// DNS responder, UDP and TCP [default: 127.0.0.1:15053].
    #[arg(long)]
    pub dns: Option<SocketAddrV4>,
    /// Let `--dns` bind an address other than loopback (e.g. a bridge address containers
    /// use). Even then only clients from this host's own addresses are answered, so the
    /// agent never becomes an open resolver or amplifier [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dns_allow_remote: Option<bool>,
    /// Inbound mTLS listener for other hosts' agents (cross-host transport, not built yet)
    /// [default: 0.0.0.0:15008].
    #[arg(long)]
    pub inbound: Option<SocketAddr>,
    /// The inbound address other hosts dial, published in this host's node record
    /// [default: --inbound; with an unspecified IP (0.0.0.0) the address of the interface
    /// this host reaches the registry through].
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Prometheus metrics listener [default: 127.0.0.1:15090].
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Registry backend: `embedded` [default], or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long)]
    #[serde(default, deserialize_with = "de_from_str")]
    pub registry: Option<RegistryUrl>,
    /// SO_MARK of the agent's own sockets: DNS upstream (the port-53 hooks skip it) and
    /// connections to local instances (they join the sk_msg bypass) [default: 0x4853].
    #[arg(long, value_parser = parse_u32_auto)]
    pub dns_mark: Option<u32>,
    /// SPIFFE trust domain of the mesh's CA [default: the registry's CA, else `hms.local`].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Single-use token from `hms-ctl node token create --node NAME` on the CA's host: lets
    /// this host join a multi-host mesh. Only in the config file (kept 0600): never on a
    /// command line, where every local user can read it; see --join-token-file.
    #[arg(skip)]
    pub join_token: Option<String>,
    /// A file holding the join token (`-`: standard input); read once, at the first start.
    #[arg(long, value_name = "PATH")]
    pub join_token_file: Option<PathBuf>,
    /// Log format: `text` [default] or `json`.
    #[arg(long)]
    #[serde(default, deserialize_with = "de_from_str")]
    pub log_format: Option<LogFormat>,
    /// Move bytes between an app and the proxy with sk_msg/sockhash instead of the loopback
    /// TCP stack (`--sk-msg-bypass=false` turns it off). Takes effect when the agent runs
    /// inside the redirected cgroup (as with the default cgroup v2 root); docs/bench.md has
    /// the measurements [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub sk_msg_bypass: Option<bool>,
    /// Serve IPv6 callers: AAAA answers from --vip6-prefix, listeners on [::1] (same ports as
    /// --outbound and --dns), the prefix routed to loopback. On a host with IPv6 disabled the
    /// agent says so once and serves IPv4 only [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ipv6: Option<bool>,
    /// The IPv6 VIP range, a /96 (not `::ffff:0:0/96`): a service's IPv6 VIP is this prefix
    /// followed by its IPv4 VIP, so every host agrees [default: fd48:4d53::/96].
    #[arg(long)]
    #[serde(default, deserialize_with = "de_from_str")]
    pub vip6_prefix: Option<Ipv6Prefix96>,
    /// Serve gateways from the registry on this host: `all`, or gateway names separated by
    /// commas (`hms-ctl gateway apply` declares them). In the config file also `gateway: true`
    /// or a list of names [default: none].
    #[arg(long, value_name = "all|NAMES")]
    #[serde(default, deserialize_with = "de_gateway")]
    pub gateway: Option<String>,
    /// Resolver the agent asks for external services' host names (`external:` in a spec)
    /// [default: the first `nameserver` of /etc/resolv.conf].
    #[arg(long, value_name = "IP:PORT")]
    pub egress_resolver: Option<SocketAddr>,
    /// Refuse (EPERM) connections from the redirected cgroup to anything that is neither
    /// loopback, nor a VIP, nor a declared external service's address; counted in
    /// `/metrics` and `hms-ctl status` [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub refuse_undeclared_egress: Option<bool>,
}

/// `gateway: true`, `gateway: all`, `gateway: [public, admin]` or `gateway: public,admin`.
fn de_gateway<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Flag(bool),
        Names(Vec<String>),
        Text(String),
    }
    Ok(match Option::<Form>::deserialize(d)? {
        None => None,
        Some(Form::Flag(b)) => Some(if b { "all" } else { "none" }.into()),
        Some(Form::Names(n)) => Some(n.join(",")),
        Some(Form::Text(t)) => Some(t),
    })
}

fn parse_u32_auto(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("`{s}` is not a number: {e}"))
}

fn de_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

impl RunArgs {
    /// Fields set here replace those of `base`.
    fn over(self, base: RunArgs) -> RunArgs {
        RunArgs {
            config: self.config.or(base.config),
            takeover: self.takeover || base.takeover,
            node_name: self.node_name.or(base.node_name),
            cgroup: self.cgroup.or(base.cgroup),
            state_dir: self.state_dir.or(base.state_dir),
            admin_socket: self.admin_socket.or(base.admin_socket),
            pin_dir: self.pin_dir.or(base.pin_dir),
            vip_cidr: self.vip_cidr.or(base.vip_cidr),
            outbound: self.outbound.or(base.outbound),
            dns: self.dns.or(base.dns),
            dns_allow_remote: self.dns_allow_remote.or(base.dns_allow_remote),
            advertise: self.advertise.or(base.advertise),
            inbound: self.inbound.or(base.inbound),
            metrics: self.metrics.or(base.metrics),
            registry: self.registry.or(base.registry),
            dns_mark: self.dns_mark.or(base.dns_mark),
            trust_domain: self.trust_domain.or(base.trust_domain),
            join_token: self.join_token.or(base.join_token),
            join_token_file: self.join_token_file.or(base.join_token_file),
            log_format: self.log_format.or(base.log_format),
            sk_msg_bypass: self.sk_msg_bypass.or(base.sk_msg_bypass),
            ipv6: self.ipv6.or(base.ipv6),
            vip6_prefix: self.vip6_prefix.or(base.vip6_prefix),
            gateway: self.gateway.or(base.gateway),
            egress_resolver: self.egress_resolver.or(base.egress_resolver),
            refuse_undeclared_egress: self
                .refuse_undeclared_egress
                .or(base.refuse_undeclared_egress),
        }
    }
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub takeover: bool,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub pin_dir: PathBuf,
    pub vip_cidr: Ipv4Cidr,
    pub outbound: SocketAddrV4,
    pub dns: SocketAddrV4,
    pub dns_allow_remote: bool,
    pub inbound: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub registry: RegistryUrl,
    pub dns_mark: u32,
    pub trust_domain: Option<String>,
    pub join_token: Option<String>,
    pub log_format: LogFormat,
    pub sk_msg_bypass: bool,
    pub ipv6: bool,
    pub vip6_prefix: Ipv6Prefix96,
    /// Which gateways this host serves.
    pub gateway: crate::gateway::Serve,
    pub egress_resolver: Option<SocketAddr>,
    pub refuse_undeclared_egress: bool,
}

impl AgentConfig {
    pub fn resolve(args: RunArgs) -> anyhow::Result<AgentConfig> {
        let args = match &args.config {
            Some(path) => args.clone().over(load_file(path)?),
            None => args,
        };
        let cgroup = match args.cgroup {
            Some(c) => c,
            None => crate::cgroup::v2_root()?,
        };
        let config = AgentConfig {
            takeover: args.takeover,
            node_name: match args.node_name {
                Some(n) => n,
                None => hostname(),
            },
            cgroup,
            state_dir: args.state_dir.unwrap_or_else(|| "/var/lib/hms".into()),
            admin_socket: args
                .admin_socket
                .unwrap_or_else(|| hms_ctl::api::DEFAULT_SOCKET.into()),
            pin_dir: args.pin_dir.unwrap_or_else(|| "/sys/fs/bpf/hms".into()),
            vip_cidr: args
                .vip_cidr
                .unwrap_or(Ipv4Cidr::new(Ipv4Addr::new(127, 77, 0, 0), 16)),
            outbound: args
                .outbound
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001)),
            dns: args
                .dns
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053)),
            dns_allow_remote: args.dns_allow_remote.unwrap_or(false),
            advertise: args.advertise,
            inbound: args
                .inbound
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 15008))),
            metrics: args
                .metrics
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 15090))),
            registry: args.registry.unwrap_or(RegistryUrl::Embedded),
            dns_mark: args.dns_mark.unwrap_or(DEFAULT_DNS_MARK),
            trust_domain: args.trust_domain,
            join_token: match (args.join_token, &args.join_token_file) {
                (Some(t), _) => Some(t),
                (None, Some(path)) => Some(read_join_token(path)?),
                (None, None) => None,
            },
            log_format: args.log_format.unwrap_or_default(),
            sk_msg_bypass: args.sk_msg_bypass.unwrap_or(true),
            ipv6: args.ipv6.unwrap_or(true),
            vip6_prefix: args.vip6_prefix.unwrap_or_default(),
            gateway: match &args.gateway {
                None => crate::gateway::Serve::None,
                Some(t) => crate::gateway::Serve::parse(t).map_err(|m| anyhow::anyhow!("{m}"))?,
            },
            egress_resolver: args.egress_resolver,
            refuse_undeclared_egress: args.refuse_undeclared_egress.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        hms_ctl::spec::validate_dns_label(&self.node_name)
            .map_err(|m| anyhow::anyhow!("--node-name `{}` {m}", self.node_name))?;
        if !self.cgroup.is_dir() {
            bail!(
                "--cgroup {} is not a directory; create it (mkdir under the cgroup v2 root) or omit the flag to use the root",
                self.cgroup.display()
            );
        }
        if self.vip_cidr.contains(*self.outbound.ip()) || self.vip_cidr.contains(*self.dns.ip()) {
            bail!(
                "--vip-cidr {} overlaps the outbound or DNS listener address; pick another range",
                self.vip_cidr
            );
        }
        if self.vip_cidr.prefix_len > 30 {
            bail!(
                "--vip-cidr {} is too small; use a /30 or larger",
                self.vip_cidr
            );
        }
        if !self.dns.ip().is_loopback() && !self.dns_allow_remote {
            bail!(
                "--dns {} is not a loopback address: other hosts could use the agent as an open resolver. Keep it on 127.0.0.1, or add --dns-allow-remote (then only this host's own addresses are answered)",
                self.dns
            );
        }
        if self.dns.port() == hms_ebpf::DNS_PORT {
            bail!("--dns must not use port 53: that port is what the agent captures");
        }
        Ok(())
    }
}

fn load_file(path: &Path) -> anyhow::Result<RunArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| {
        format!(
            "{}: not a valid agent config (keys are the `run` flags without dashes, e.g. `node-name:`)",
            path.display()
        )
    })
}

pub fn hostname() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".into());
    // The node name becomes a DNS label and a SPIFFE path segment.
    let label: String = raw
        .split('.')
        .next()
        .unwrap_or("node")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "node".into()
    } else {
        label.chars().take(63).collect()
    }
}

/// The IPv6 VIP range: a /96 whose low 32 bits are filled with the service's IPv4 VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Prefix96(pub Ipv6Addr);

/// "HMS" in ASCII after the ULA `fd`: unique-local space, never routed beyond a site, and
/// the agent routes it to loopback on top.
pub const DEFAULT_VIP6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd48, 0x4d53, 0, 0, 0, 0, 0, 0);

impl Default for Ipv6Prefix96 {
    fn default() -> Self {
        Ipv6Prefix96(DEFAULT_VIP6_PREFIX)
    }
}

impl Ipv6Prefix96 {
    /// The IPv6 VIP of the service whose IPv4 VIP is `vip`.
    pub fn vip6(&self, vip: Ipv4Addr) -> Ipv6Addr {
        let mut b = self.0.octets();
        b[12..].copy_from_slice(&vip.octets());
        Ipv6Addr::from(b)
    }
}

impl fmt::Display for Ipv6Prefix96 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/96", self.0)
    }
}

impl FromStr for Ipv6Prefix96 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a prefix; write it like fd48:4d53::/96"))?;
        if len != "96" {
            return Err(format!(
                "`{s}`: the IPv6 VIP range must be a /96 (its low 32 bits carry the IPv4 VIP)"
            ));
        }
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|e| format!("`{addr}` is not an IPv6 address: {e}"))?;
        let mut b = addr.octets();
        b[12..].fill(0);
        let net = Ipv6Addr::from(b);
        if net.to_ipv4_mapped().is_some() || net.is_unspecified() || net.is_loopback() {
            return Err(format!(
                "`{s}` overlaps IPv4-mapped, unspecified or loopback space; pick a unique-local \
                 /96 such as fd48:4d53::/96"
            ));
        }
        Ok(Ipv6Prefix96(net))
    }
}

/// An IPv4 network, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Cidr {
        let mask = Self::mask_of(prefix_len);
        Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        }
    }

    fn mask_of(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len))
        }
    }

    pub fn mask(&self) -> u32 {
        Self::mask_of(self.prefix_len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Number of addresses in the range.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// The `i`-th address of the range.
    pub fn nth(&self, i: u64) -> Option<Ipv4Addr> {
        (i < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + i as u32))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an IPv4 range; write it like 127.77.0.0/16");
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        Ok(Ipv4Cidr::new(ip, len))
    }
}

/// The join token from a file (0600 as written by `hms-ctl node token create --out`) or
/// stdin.
fn read_join_token(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the join token from standard input")?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the join token from {}", path.display()))?
    };
    Ok(text.trim().to_string())
}

/// Which registry backend holds the mesh's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryUrl {
    Embedded,
    /// `etcd://` (plaintext: development only) or `etcds://` (TLS with this host's client
    /// certificate; etcd's roles then limit each host to its own records).
    Etcd {
        endpoints: Vec<String>,
        tls: bool,
    },
}

impl RegistryUrl {
    pub fn etcd_endpoints(&self) -> Option<&[String]> {
        match self {
            RegistryUrl::Embedded => None,
            RegistryUrl::Etcd { endpoints, .. } => Some(endpoints),
        }
    }

    pub fn secured(&self) -> bool {
        matches!(self, RegistryUrl::Etcd { tls: true, .. })
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryUrl::Embedded => f.write_str("embedded"),
            RegistryUrl::Etcd { endpoints, tls } => {
                let scheme = if *tls { "etcds" } else { "etcd" };
                write!(f, "{scheme}://{}", endpoints.join(","))
            }
        }
    }
}

impl FromStr for RegistryUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embedded" {
            return Ok(RegistryUrl::Embedded);
        }
        let (rest, tls) = match (s.strip_prefix("etcds://"), s.strip_prefix("etcd://")) {
            (Some(rest), _) => (rest, true),
            (_, Some(rest)) => (rest, false),
            _ => {
                return Err(format!(
                    "`{s}` is not a registry; use `embedded`, `etcds://HOST:PORT[,HOST:PORT...]` (TLS), or `etcd://...` (plaintext, development only)"
                ));
            }
        };
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err("etcd:// and etcds:// need at least one HOST:PORT".into());
        }
        Ok(RegistryUrl::Etcd { endpoints, tls })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{s}` is not a log format; use `text` or `json`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_contains() {
        let c: Ipv4Cidr = "127.77.3.9/16".parse().unwrap();
        assert_eq!(c.to_string(), "127.77.0.0/16");
        assert!(c.contains(Ipv4Addr::new(127, 77, 200, 1)));
        assert!(!c.contains(Ipv4Addr::new(127, 78, 0, 1)));
        assert_eq!(c.size(), 65536);
        assert!("127.0.0.1".parse::<Ipv4Cidr>().is_err());
        assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn config_file_fills_what_flags_leave_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        std::fs::write(
            &file,
            format!(
                "node-name: host-a\ncgroup: {}\noutbound: 127.0.0.1:25001\nvip-cidr: 127.99.0.0/24\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let args = RunArgs {
            config: Some(file),
            outbound: Some("127.0.0.1:35001".parse().unwrap()),
            ..Default::default()
        };
        let c = AgentConfig::resolve(args).unwrap();
        assert_eq!(c.node_name, "host-a");
        assert_eq!(c.outbound.port(), 35001, "flag wins over file");
        assert_eq!(c.vip_cidr.to_string(), "127.99.0.0/24");
        assert_eq!(c.dns.port(), 15053);
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        std::fs::write(&file, "nodename: x\n").unwrap();
        let err = AgentConfig::resolve(RunArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("nodename"), "{err:#}");
    }

    #[test]
    fn registry_urls() {
        assert_eq!(
            "embedded".parse::<RegistryUrl>().unwrap(),
            RegistryUrl::Embedded
        );
        assert_eq!(
            "etcd://10.0.0.1:2379,10.0.0.2:2379"
                .parse::<RegistryUrl>()
                .unwrap(),
            RegistryUrl::Etcd {
                endpoints: vec!["10.0.0.1:2379".into(), "10.0.0.2:2379".into()],
                tls: false
            }
        );
        assert!("consul://x".parse::<RegistryUrl>().is_err());
    }

    #[test]
    fn the_ipv6_vip_prefix_is_a_unique_local_96_and_carries_the_ipv4_vip() {
        let p: Ipv6Prefix96 = "fd48:4d53::/96".parse().unwrap();
        assert_eq!(p, Ipv6Prefix96::default());
        assert_eq!(
            p.vip6(Ipv4Addr::new(127, 77, 3, 4)),
            "fd48:4d53::7f4d:304".parse::<Ipv6Addr>().unwrap()
        );
        // Host bits are dropped, like an IPv4 CIDR's.
        assert_eq!(
            "fd00:1::9/96".parse::<Ipv6Prefix96>().unwrap().to_string(),
            "fd00:1::/96"
        );
        for bad in ["fd48::/64", "fd48::", "::ffff:0:0/96", "::/96", "nope/96"] {
            assert!(bad.parse::<Ipv6Prefix96>().is_err(), "{bad}");
        }
    }
}
