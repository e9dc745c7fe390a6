//! The agent's side of the kernel redirect: attach the `hms-ebpf` programs to a cgroup, keep
//! them pinned across agent restarts, and answer "where did this caller really want to go?".
//!
//! Owns the pinned links and maps under one pin dir and the config record the programs read.
//! Must never attach the same hook twice from one pin set (a second set, of another layout,
//! is attached beside an older one only for an upgrade, which retires the older one), never
//! touch another agent's pin dir or cgroup (several agents run side by side), and never
//! detach its own set on drop: redirection outlives the agent process by design; only
//! [`cleanup`] removes it.
//!
//! - `layout`: this build's layout version (a digest of its maps and programs), which names
//!   the pin set it uses.
//! - `generation`: the pin sets in a pin dir, lookups in an older set's maps, retiring it
//!   after an upgrade.
//! - `loader`: load, attach or adopt, eBPF logs.
//! - `pin`: the files of a pin set, raw link and map queries, `cleanup`.
//! - `sockdiag`: socket cookie of a UDP client from its 4-tuple.
//! - `liveness`: the heartbeat that tells the hooks the agent is alive, and the agent's
//!   network namespace cookie (sockets of other namespaces are left alone).
//! - `flows`: the flow records (open/close of each redirected TCP connection) from the
//!   kernel's ring buffer.
//! - `local_route`: the IPv6 VIP prefix routed to loopback, so a connect that misses the
//!   hooks fails on this host instead of leaving it.

mod egress;
pub mod flows;
mod generation;
mod layout;
mod liveness;
mod loader;
mod local_route;
mod netlink;
mod pin;
mod sockdiag;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash};
use hms_ebpf::{
    FlowKey, FlowKey6, OrigDst, OrigDst6, RedirectConfig, RedirectConfig6, SockKey, map_names,
    program_names, sk_msg_stat,
};

use crate::original_dst::{Original, ipv6_from_words, ipv6_words};
use serde::{Deserialize, Serialize};

pub use flows::{EndedBy, FlowKind, FlowReader, FlowRecord};
pub use pin::{CleanupReport, cleanup};

/// This build's layout version: its pin set is `<pin dir>/layout-<version>` (see `layout`).
pub fn layout_version() -> anyhow::Result<&'static str> {
    layout::current()
}

/// The pin set this build uses under `pin_dir`.
pub fn pin_set_dir(pin_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    Ok(generation::set_dir(pin_dir, layout::current()?))
}

/// What to redirect and where to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectOptions {
    /// cgroup v2 directory whose processes (and descendants) are redirected.
    pub cgroup: PathBuf,
    /// Directory on bpffs for this agent's links and maps, e.g. `/sys/fs/bpf/hms`; they go in
    /// its `layout-<version>/` subdirectory.
    pub pin_dir: PathBuf,
    /// VIP range: TCP connects into it go to `outbound`.
    pub vip_net: Ipv4Addr,
    pub vip_prefix_len: u8,
    pub outbound: SocketAddrV4,
    /// Where port-53 traffic goes.
    pub dns: SocketAddrV4,
    /// `SO_MARK` of the agent's own sockets, which are never redirected. 0 disables.
    pub skip_mark: u32,
    /// Carry app <-> proxy bytes through the sk_msg/sockhash bypass (see `hms_sk_msg`) when
    /// this agent runs inside `cgroup` (it has no effect otherwise, so it stays off then).
    pub sk_msg_bypass: bool,
    /// IPv6 callers: `None` leaves real IPv6 alone (IPv4-mapped destinations are IPv4 and
    /// always redirected).
    pub v6: Option<RedirectOptions6>,
    /// Refuse connects to undeclared outside addresses (`egress`); in force once
    /// [`Redirector::sync_egress`] wrote the declared set.
    pub refuse_undeclared_egress: bool,
}

/// Where IPv6 callers go. The ports are those of the IPv4 listeners (one port per role in
/// the kernel config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectOptions6 {
    /// The /96 IPv6 VIP prefix (low 32 bits zero).
    pub vip_prefix: Ipv6Addr,
    pub outbound: SocketAddrV6,
    pub dns: SocketAddrV6,
}

/// The attached redirect. Dropping it leaves the programs attached and pinned.
pub struct Redirector {
    status: RedirectStatus,
    orig_by_cookie: Mutex<HashMap<MapData, u64, OrigDst>>,
    dns_udp_orig: Mutex<HashMap<MapData, u64, OrigDst>>,
    heartbeat: Mutex<liveness::Heartbeat>,
    /// The agent's network namespace cookie (0: unknown, not compared).
    netns_cookie: u64,
    orig_by_flow: Mutex<HashMap<MapData, FlowKey, OrigDst>>,
    orig6_by_cookie: Mutex<HashMap<MapData, u64, OrigDst6>>,
    orig6_by_flow: Mutex<HashMap<MapData, FlowKey6, OrigDst6>>,
    /// Taken by the first `flow_reader()`: a ring buffer has one consumer.
    flow_events: Mutex<Option<RingBuf<MapData>>>,
    ringbuf_drops: Mutex<PerCpuArray<MapData, u64>>,
    sk_msg_stats: Mutex<PerCpuArray<MapData, u64>>,
    /// `HMS_SOCKS` and `HMS_BYPASS_PENDING`, for [`Redirector::settle_instance_leg`].
    instance_leg: Option<Mutex<InstanceLeg>>,
    /// Pin sets of other layouts found at start (an upgrade): looked up after our own maps
    /// until [`Redirector::retire_older_sets`] is done with them.
    older: Arc<Mutex<Vec<Arc<generation::OlderSet>>>>,
    egress: egress::EgressMaps,
    _log_drain: Option<loader::LogDrain>,
}

/// How long an older set's records stay readable after it was retired: connections its
/// programs redirected just before are still in the listeners' accept queues.
const OLDER_SET_RETAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The maps `settle_instance_leg` works on.
struct InstanceLeg {
    socks: SockHash<MapData, SockKey>,
    pending: HashMap<MapData, SockKey, u8>,
}

/// Counters of the sk_msg bypass (`HMS_SK_MSG_STATS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkMsgStats {
    /// Sends moved straight to the peer socket.
    pub redirected: u64,
    pub redirected_bytes: u64,
    /// Sends of sockets in the map whose peer was not there: went through TCP.
    pub passed: u64,
}

/// For `hms-ctl status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectStatus {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// This build's layout version (see `layout`), which names its pin set.
    #[serde(default)]
    pub layout: String,
    /// The pin set this agent uses: `pin_dir/layout-<version>`.
    #[serde(default)]
    pub pin_set: PathBuf,
    /// Sets of other layouts found at start, retired once this agent serves.
    #[serde(default)]
    pub older_sets: Vec<PathBuf>,
    /// True when every hook was adopted from a previous agent's pins (nothing newly attached).
    pub adopted: bool,
    /// `net/prefix`, e.g. `127.77.0.0/16`.
    pub vip_range: String,
    pub outbound: SocketAddrV4,
    pub dns: SocketAddrV4,
    /// The IPv6 VIP range (`prefix/96`) when IPv6 callers are served.
    pub vip6_range: Option<String>,
    pub skip_mark: u32,
    /// Whether kernel-side `aya-log` records are forwarded to the agent's log (best effort).
    pub ebpf_logs: bool,
    /// Names of the attached programs, e.g. `hms_connect4`.
    pub programs: Vec<String>,
    /// Whether sock_ops puts app <-> proxy connections in the sk_msg bypass (asked for, and
    /// the agent runs inside the cgroup).
    pub sk_msg_bypass: bool,
    /// Whether this agent runs inside `cgroup` (the proxy's sockets are then seen by
    /// sock_ops, which the bypass needs).
    pub agent_in_cgroup: bool,
    /// One entry per hook, with kernel ids and pin paths.
    pub hooks: Vec<AttachedProgram>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProgram {
    /// Function name in `hms-ebpf` (also what `bpftool` shows).
    pub name: String,
    /// cgroup hook, in bpftool's words (`cgroup_inet4_connect`, `sock_ops`, ...).
    pub attach: String,
    pub program_id: u32,
    pub link_id: u32,
    pub link_pin: PathBuf,
    /// Attached by a previous agent and taken over by this one.
    pub adopted: bool,
}

impl Redirector {
    /// Load the programs, attach them to `cgroup` as bpf_links (which coexist with any other
    /// programs on the same hooks, i.e. allow-multi), pin maps and links under `pin_dir`,
    /// write the config. If `pin_dir` already holds our pinned
    /// links (previous agent, crash, restart), adopt them: reuse the pinned maps, update the
    /// config, do not attach a second time.
    pub fn start(opts: &RedirectOptions) -> anyhow::Result<Redirector> {
        let cgroup = loader::check_cgroup_dir(&opts.cgroup)?;
        let agent_in_cgroup = crate::cgroup::v2_root()
            .and_then(|root| crate::cgroup::cgroup_of_pid(&root, std::process::id()))
            .is_ok_and(|own| own.starts_with(&opts.cgroup));
        // The proxy's end of a connection only joins the bypass when sock_ops sees it, i.e.
        // when the agent runs inside the redirected cgroup; otherwise the app's end alone
        // would make every send look for a peer that never comes.
        let sk_msg_bypass = opts.sk_msg_bypass && agent_in_cgroup;
        if opts.sk_msg_bypass && !agent_in_cgroup {
            tracing::info!(
                cgroup = %opts.cgroup.display(),
                "sk_msg bypass stays off: this agent runs outside the redirected cgroup, so the \
                 proxy's sockets cannot join it (run the agent inside that cgroup; the default \
                 cgroup v2 root covers it)"
            );
        }
        let mut config = redirect_config(opts)?;
        config.sk_msg_bypass = u32::from(sk_msg_bypass);
        config.netns_cookie = liveness::own_netns_cookie().unwrap_or_else(|| {
            tracing::warn!(
                "this kernel does not tell the agent its network namespace (SO_NETNS_COOKIE, \
                 Linux 5.14): processes of the cgroup in other namespaces are redirected too"
            );
            0
        });
        let cgroup_id = crate::cgroup::cgroup_id(&opts.cgroup)?;
        loader::prepare_pin_dir(&opts.pin_dir)?;
        let layout = layout::current()?;
        let set = generation::set_dir(&opts.pin_dir, layout);
        loader::prepare_pin_dir(&set)?;
        let older_dirs = generation::other_sets(&opts.pin_dir, &set)?;
        if !older_dirs.is_empty() {
            tracing::info!(
                layout,
                older = ?older_dirs,
                "pin sets of other layouts found: attaching this build's beside them; they \
                 are retired once this agent serves"
            );
        }
        // Links without their maps would leave adopted programs writing to maps we cannot
        // see; that state is only reachable by hand, so ask for a cleanup rather than guess.
        let any_link = pin::HOOKS.iter().any(|h| set.join(h.link_file).exists());
        let missing_map = pin::MAPS.iter().find(|m| !set.join(m).exists());
        if let (true, Some(map)) = (any_link, missing_map) {
            bail!(
                "pin dir {} has pinned links but no map {map}; run `hms-node-agent cleanup` \
                 (it detaches the old programs) and start again",
                set.display()
            );
        }
        loader::check_pinned_maps(&set)?;
        let mut ebpf = loader::load_object(&set)?;

        // Config first: a hook attached a moment later already sees the right addresses.
        {
            let map = ebpf
                .map_mut(map_names::CONFIG)
                .context("map HMS_CONFIG missing from the eBPF object")?;
            let mut array: Array<&mut MapData, RedirectConfig> = Array::try_from(map)?;
            array
                .set(0, config, 0)
                .context("writing the redirect config to HMS_CONFIG")?;
        }
        // Written every start, disabled included: a previous agent may have turned IPv6 on.
        let config6 = redirect_config6(opts)?;
        {
            let map = ebpf
                .map_mut(map_names::CONFIG6)
                .context("map HMS_CONFIG6 missing from the eBPF object")?;
            let mut array: Array<&mut MapData, RedirectConfig6> = Array::try_from(map)?;
            array
                .set(0, config6, 0)
                .context("writing the IPv6 redirect config to HMS_CONFIG6")?;
        }
        if let Some(v6) = &opts.v6 {
            // Best effort: the hooks redirect IPv6 VIPs without it; it only keeps a missed
            // hook (a process outside the cgroup) from sending packets off the host.
            if let Err(e) = local_route::add(v6.vip_prefix) {
                tracing::warn!(
                    prefix = %format!("{}/96", v6.vip_prefix),
                    "could not route the IPv6 VIP range to loopback: {e:#}; processes outside \
                     the redirected cgroup dialling an IPv6 VIP follow the host's routes"
                );
            }
        }

        // Alive before any hook can act: a hook attached without a beat would stand aside.
        let heartbeat = liveness::Heartbeat::start(Array::try_from(
            ebpf.take_map(map_names::AGENT_ALIVE)
                .context("map HMS_AGENT_ALIVE missing from the eBPF object")?,
        )?)?;

        let mut hooks = Vec::with_capacity(pin::HOOKS.len());
        for hook in pin::HOOKS {
            hooks.push(loader::attach_or_adopt(
                &mut ebpf,
                hook,
                &cgroup,
                &opts.cgroup,
                cgroup_id,
                &set,
            )?);
        }
        let adopted = hooks.iter().all(|h| h.adopted);
        let any_fresh = hooks.iter().any(|h| !h.adopted);
        let adopted_programs: Vec<u32> = hooks
            .iter()
            .filter(|h| h.adopted)
            .map(|h| h.program_id)
            .collect();
        // Attached to the sockhash, not to the cgroup, so attached on every start (it replaces
        // an earlier agent's program on the map; sockets keep the one they joined with).
        loader::attach_sk_msg(&mut ebpf)?;
        let log_drain = loader::LogDrain::start(any_fresh.then_some(&mut ebpf), &adopted_programs);

        let egress = egress::EgressMaps::take(&mut ebpf, opts.refuse_undeclared_egress)?;
        let orig_by_cookie = HashMap::try_from(
            ebpf.take_map(map_names::ORIG_BY_COOKIE)
                .context("map HMS_ORIG_BY_COOKIE missing from the eBPF object")?,
        )?;
        let dns_udp_orig = HashMap::try_from(
            ebpf.take_map(map_names::DNS_UDP_ORIG)
                .context("map HMS_DNS_UDP_ORIG missing from the eBPF object")?,
        )?;
        let orig_by_flow = HashMap::try_from(
            ebpf.take_map(map_names::ORIG_BY_FLOW)
                .context("map HMS_ORIG_BY_FLOW missing from the eBPF object")?,
        )?;
        let orig6_by_cookie = HashMap::try_from(
            ebpf.take_map(map_names::ORIG6_BY_COOKIE)
                .context("map HMS_ORIG6_BY_COOKIE missing from the eBPF object")?,
        )?;
        let orig6_by_flow = HashMap::try_from(
            ebpf.take_map(map_names::ORIG6_BY_FLOW)
                .context("map HMS_ORIG6_BY_FLOW missing from the eBPF object")?,
        )?;
        let flow_events = RingBuf::try_from(
            ebpf.take_map(map_names::FLOW_EVENTS)
                .context("map HMS_FLOW_EVENTS missing from the eBPF object")?,
        )?;
        let ringbuf_drops = PerCpuArray::try_from(
            ebpf.take_map(map_names::RINGBUF_DROPS)
                .context("map HMS_RINGBUF_DROPS missing from the eBPF object")?,
        )?;

        let sk_msg_stats = PerCpuArray::try_from(
            ebpf.take_map(map_names::SK_MSG_STATS)
                .context("map HMS_SK_MSG_STATS missing from the eBPF object")?,
        )?;
        let instance_leg = if sk_msg_bypass {
            Some(Mutex::new(InstanceLeg {
                socks: SockHash::try_from(
                    ebpf.take_map(map_names::SOCKS)
                        .context("map HMS_SOCKS missing from the eBPF object")?,
                )?,
                pending: HashMap::try_from(
                    ebpf.take_map(map_names::BYPASS_PENDING)
                        .context("map HMS_BYPASS_PENDING missing from the eBPF object")?,
                )?,
            }))
        } else {
            None
        };

        let status = RedirectStatus {
            cgroup: opts.cgroup.clone(),
            pin_dir: opts.pin_dir.clone(),
            layout: layout.to_string(),
            pin_set: set.clone(),
            older_sets: older_dirs.clone(),
            adopted,
            vip_range: format!("{}/{}", opts.vip_net, opts.vip_prefix_len),
            outbound: opts.outbound,
            dns: opts.dns,
            vip6_range: opts.v6.as_ref().map(|v6| format!("{}/96", v6.vip_prefix)),
            skip_mark: opts.skip_mark,
            ebpf_logs: log_drain.is_some(),
            programs: hooks
                .iter()
                .map(|h| h.hook.program.to_string())
                .chain([program_names::SK_MSG.to_string()])
                .collect(),
            sk_msg_bypass,
            agent_in_cgroup,
            hooks: hooks
                .iter()
                .map(|h| AttachedProgram {
                    name: h.hook.program.to_string(),
                    attach: h.hook.attach.to_string(),
                    program_id: h.program_id,
                    link_id: h.link_id,
                    link_pin: h.link_pin.clone(),
                    adopted: h.adopted,
                })
                .collect(),
        };
        tracing::info!(
            cgroup = %opts.cgroup.display(),
            pin_set = %set.display(),
            adopted,
            sk_msg_bypass,
            "eBPF redirect attached"
        );
        // After our own links: from here on either set's records are found.
        let older = older_dirs
            .iter()
            .map(|dir| Arc::new(generation::OlderSet::open(dir)))
            .collect();
        Ok(Redirector {
            status,
            orig_by_cookie: Mutex::new(orig_by_cookie),
            dns_udp_orig: Mutex::new(dns_udp_orig),
            heartbeat: Mutex::new(heartbeat),
            netns_cookie: config.netns_cookie,
            orig_by_flow: Mutex::new(orig_by_flow),
            orig6_by_cookie: Mutex::new(orig6_by_cookie),
            orig6_by_flow: Mutex::new(orig6_by_flow),
            flow_events: Mutex::new(Some(flow_events)),
            ringbuf_drops: Mutex::new(ringbuf_drops),
            sk_msg_stats: Mutex::new(sk_msg_stats),
            instance_leg,
            older: Arc::new(Mutex::new(older)),
            egress,
            _log_drain: log_drain,
        })
    }

    /// Once this agent serves the listeners (its predecessor stopped accepting): detach the
    /// older pin sets found at start and unpin them (see `generation::retire`), on a thread
    /// of its own; their records stay readable for [`OLDER_SET_RETAIN`] after. Returns at
    /// once. A no-op without older sets. `settle`: how long the predecessor (if any) may still
    /// be accepting.
    pub fn retire_older_sets(&self, settle: std::time::Duration) {
        let sets: Vec<Arc<generation::OlderSet>> =
            self.older.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if sets.is_empty() {
            return;
        }
        let older = Arc::clone(&self.older);
        let pin_dir = self.status.pin_dir.clone();
        let spawned = std::thread::Builder::new()
            .name("hms-retire".into())
            .spawn(move || {
                std::thread::sleep(settle);
                let mut all = true;
                for set in &sets {
                    if let Err(e) = generation::retire(&set.dir, set.dir == pin_dir) {
                        all = false;
                        tracing::error!(
                            set = %set.dir.display(),
                            "retiring an older pin set: {e:#}; the next agent start retries, \
                             or run `hms-node-agent cleanup` with the agent stopped"
                        );
                    }
                }
                std::thread::sleep(OLDER_SET_RETAIN);
                if all {
                    older.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("could not start retiring the older pin sets: {e}");
        }
    }

    fn older_sets(&self) -> Vec<Arc<generation::OlderSet>> {
        self.older.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Original destination of an accepted TCP connection; client = accepted socket's
    /// peer_addr, listener = its local_addr (either family). Removes the entry.
    pub fn take_tcp_orig_dst(&self, client: SocketAddr, listener: SocketAddr) -> Option<Original> {
        match (client, listener) {
            (SocketAddr::V4(c), SocketAddr::V4(l)) => self.take_tcp4(c, l).map(Original::v4),
            (SocketAddr::V6(c), SocketAddr::V6(l)) => self.take_tcp6(c, l),
            _ => None,
        }
    }

    fn take_tcp4(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<OrigDst> {
        let key = FlowKey {
            client_ip: u32::from(*client.ip()),
            listener_ip: u32::from(*listener.ip()),
            client_port: client.port(),
            listener_port: listener.port(),
            _pad: 0,
        };
        {
            let mut flows = self.orig_by_flow.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(orig) = lookup(&flows, &key, "HMS_ORIG_BY_FLOW") {
                if let Err(e) = flows.remove(&key) {
                    tracing::debug!(error = %e, "removing a taken flow record");
                }
                return Some(orig);
            }
        }
        let older = self.older_sets();
        if let Some(orig) = older.iter().find_map(|set| set.take_flow4(&key)) {
            return Some(orig);
        }
        // sock_ops runs before the proxy can accept() on loopback, so this is only reached if
        // the flow map was full or the client is in another netns; the record may still be
        // under the client's cookie.
        let cookie = self.cookie_of(sockdiag::Transport::Tcp, client.into(), listener.into())?;
        let mut cookies = self
            .orig_by_cookie
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(orig) = lookup(&cookies, &cookie, "HMS_ORIG_BY_COOKIE") else {
            drop(cookies);
            return older.iter().find_map(|set| set.take_cookie4(cookie));
        };
        if let Err(e) = cookies.remove(&cookie) {
            tracing::debug!(error = %e, "removing a taken cookie record");
        }
        Some(orig)
    }

    /// As `take_tcp4` for the IPv6 listener. The cookie fallback also serves a sock_ops
    /// program adopted from a build before IPv6 support, which never promotes these records.
    fn take_tcp6(&self, client: SocketAddrV6, listener: SocketAddrV6) -> Option<Original> {
        let key = FlowKey6 {
            client_ip: ipv6_words(*client.ip()),
            listener_ip: ipv6_words(*listener.ip()),
            client_port: client.port(),
            listener_port: listener.port(),
            _pad: 0,
        };
        let found = {
            let mut flows = self.orig6_by_flow.lock().unwrap_or_else(|p| p.into_inner());
            let found = lookup(&flows, &key, "HMS_ORIG6_BY_FLOW");
            if found.is_some()
                && let Err(e) = flows.remove(&key)
            {
                tracing::debug!(error = %e, "removing a taken flow record");
            }
            found
        };
        let older = self.older_sets();
        let found = match found.or_else(|| older.iter().find_map(|set| set.take_flow6(&key))) {
            Some(f) => f,
            None => {
                let cookie =
                    self.cookie_of(sockdiag::Transport::Tcp, client.into(), listener.into())?;
                let mut cookies = self
                    .orig6_by_cookie
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match lookup(&cookies, &cookie, "HMS_ORIG6_BY_COOKIE") {
                    Some(found) => {
                        if let Err(e) = cookies.remove(&cookie) {
                            tracing::debug!(error = %e, "removing a taken cookie record");
                        }
                        found
                    }
                    None => {
                        drop(cookies);
                        older.iter().find_map(|set| set.take_cookie6(cookie))?
                    }
                }
            }
        };
        Some(original6(found))
    }

    /// Original destination (resolver the caller asked) of a UDP DNS query received on the
    /// responder at `responder` from `client`. The record stays: recvmsg needs it to restore
    /// the reply's source (a socket may get several answers); the kernel removes it when the
    /// socket is released.
    pub fn udp_orig_dst(&self, client: SocketAddr, responder: SocketAddr) -> Option<Original> {
        let cookie = self.cookie_of(sockdiag::Transport::Udp, client, responder)?;
        if client.is_ipv4() {
            let own = {
                let records = self.dns_udp_orig.lock().unwrap_or_else(|p| p.into_inner());
                lookup(&records, &cookie, "HMS_DNS_UDP_ORIG")
            };
            own.or_else(|| self.older_sets().iter().find_map(|s| s.udp4(cookie)))
                .map(Original::v4)
        } else {
            let own = {
                let cookies = self
                    .orig6_by_cookie
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                lookup(&cookies, &cookie, "HMS_ORIG6_BY_COOKIE")
            };
            own.or_else(|| self.older_sets().iter().find_map(|s| s.udp6(cookie)))
                .map(original6)
        }
    }

    /// Makes the kernel's set of declared external addresses exactly `declared` (and, with
    /// `--refuse-undeclared-egress`, turns refusal on after the first write).
    pub fn sync_egress(&self, declared: &std::collections::BTreeSet<std::net::IpAddr>) {
        if let Err(e) = self.egress.sync(declared) {
            tracing::warn!("updating the declared external addresses in the kernel: {e:#}");
        }
    }

    /// Whether undeclared egress is refused, and how many connects were.
    pub fn egress_refusal(&self) -> (bool, u64) {
        (self.egress.refusing(), self.egress.refused_total())
    }

    /// The agent stops and no successor takes over: the hooks stand aside now (DNS to each
    /// caller's own resolver, VIP connects refused at once) rather than when the heartbeat
    /// lapses. Not for hand-overs or socket-activated restarts, which keep the redirect.
    pub fn stand_aside(&self) {
        self.heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_for_good();
    }

    /// The reader of the kernel's flow records (one open and one close record per redirected
    /// TCP connection). Only one exists per `Redirector`: a second call fails.
    pub fn flow_reader(&self) -> anyhow::Result<FlowReader> {
        let ring = self
            .flow_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .context(
                "the flow record reader was already taken; a ring buffer has one consumer, so \
                 share the records from that reader",
            )?;
        Ok(FlowReader::new(ring))
    }

    /// Readers of the older pin sets' flow record ring buffers (an upgrade across a layout
    /// change): the connections their sock_ops tracks (those their connect4 redirected) end
    /// there. Their layout is widened to today's (`flows::decode`). Take them once the
    /// predecessor stopped reading (a ring buffer has one consumer); each call opens them
    /// anew, so call once.
    pub fn older_flow_readers(&self) -> Vec<FlowReader> {
        self.older_sets()
            .iter()
            .filter_map(|set| {
                let path = set.dir.join(map_names::FLOW_EVENTS);
                let ring = MapData::from_pin(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|data| Ok(RingBuf::try_from(aya::maps::Map::RingBuf(data))?));
                match ring {
                    Ok(ring) => Some(FlowReader::new(ring)),
                    Err(e) => {
                        tracing::warn!(
                            map = %path.display(),
                            "the older pin set's flow records cannot be read (its connections \
                             miss from TCP taps and flow metrics): {e:#}"
                        );
                        None
                    }
                }
            })
            .collect()
    }

    /// Flow records the kernel dropped because the ring buffer was full (summed over CPUs,
    /// since the maps were created; survives agent restarts). Should stay 0; if it grows the
    /// reader is too slow. A failed read is logged and counts as 0.
    pub fn ringbuf_drops(&self) -> u64 {
        let drops = self.ringbuf_drops.lock().unwrap_or_else(|p| p.into_inner());
        match drops.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().copied().fold(0u64, u64::wrapping_add),
            Err(e) => {
                tracing::warn!(error = %e, map = map_names::RINGBUF_DROPS, "map read failed");
                0
            }
        }
    }

    /// What `hms_sk_msg` did since the maps were created (summed over CPUs; survives agent
    /// restarts). A failed read is logged and counts as 0.
    pub fn sk_msg_stats(&self) -> SkMsgStats {
        let stats = self.sk_msg_stats.lock().unwrap_or_else(|p| p.into_inner());
        let read = |index: u32| match stats.get(&index, 0) {
            Ok(per_cpu) => per_cpu.iter().copied().fold(0u64, u64::wrapping_add),
            Err(e) => {
                tracing::warn!(error = %e, map = map_names::SK_MSG_STATS, "map read failed");
                0
            }
        };
        SkMsgStats {
            redirected: read(sk_msg_stat::REDIRECTED),
            redirected_bytes: read(sk_msg_stat::REDIRECTED_BYTES),
            passed: read(sk_msg_stat::PASSED),
        }
    }

    /// Right after the agent connected to an instance on this host (`local` -> `instance`):
    /// sock_ops put the agent's end in the bypass and expected the instance's end, which on
    /// loopback joins before `connect()` returns, if the instance runs in the redirected
    /// cgroup. If it is still expected, it never will be: take the agent's end out again, so
    /// its sends go straight to TCP instead of looking for a peer each time.
    pub fn settle_instance_leg(&self, local: SocketAddrV4, instance: SocketAddrV4) {
        let Some(leg) = &self.instance_leg else {
            return;
        };
        let ours = SockKey {
            netns: self.netns_cookie,
            local_ip: u32::from(*local.ip()),
            remote_ip: u32::from(*instance.ip()),
            local_port: local.port(),
            remote_port: instance.port(),
            _pad: 0,
        };
        let theirs = ours.peer();
        let mut leg = leg.lock().unwrap_or_else(|p| p.into_inner());
        if leg.pending.get(&theirs, 0).is_ok() {
            let _ = leg.pending.remove(&theirs);
            if let Err(e) = leg.socks.remove(&ours) {
                tracing::debug!(error = %e, %local, %instance, "taking a one-sided socket out of the bypass");
            }
        }
    }

    /// For `hms-ctl status`: attached program names, cgroup, pin dir, whether adopted.
    pub fn describe(&self) -> &RedirectStatus {
        &self.status
    }

    /// The client socket is local (the hooks only see local processes), so the kernel can
    /// tell us its cookie from the 4-tuple.
    fn cookie_of(
        &self,
        transport: sockdiag::Transport,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Option<u64> {
        match sockdiag::socket_cookie(transport, client, server) {
            Ok(cookie) => cookie,
            Err(e) => {
                tracing::warn!(error = %e, %client, %server, ?transport, "sock_diag lookup failed");
                None
            }
        }
    }
}

fn original6(found: OrigDst6) -> Original {
    Original {
        orig: found.orig,
        ip6: Some(ipv6_from_words(found.ip6)),
    }
}

fn lookup<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    map_name: &str,
) -> Option<V> {
    match map.get(key, 0) {
        Ok(orig) => Some(orig),
        Err(MapError::KeyNotFound) => None,
        Err(e) => {
            tracing::warn!(error = %e, map = map_name, "map lookup failed");
            None
        }
    }
}

/// Validates the options and turns them into what the kernel programs read.
fn redirect_config(opts: &RedirectOptions) -> anyhow::Result<RedirectConfig> {
    // /0 would send every TCP connect in the cgroup to the proxy, including the proxy's own
    // dials to real endpoints when it shares the cgroup.
    if !(1..=32).contains(&opts.vip_prefix_len) {
        bail!(
            "VIP prefix length {} is out of range; use 1..=32 (default range 127.77.0.0/16)",
            opts.vip_prefix_len
        );
    }
    let mask = u32::MAX << (32 - u32::from(opts.vip_prefix_len));
    let net = u32::from(opts.vip_net) & mask;
    if u32::from(*opts.outbound.ip()) & mask == net {
        bail!(
            "outbound listener {} is inside the VIP range {}/{}: redirected connections would \
             loop; pick an address outside it",
            opts.outbound,
            opts.vip_net,
            opts.vip_prefix_len
        );
    }
    Ok(RedirectConfig {
        vip_net: net,
        vip_mask: mask,
        outbound_ip: u32::from(*opts.outbound.ip()),
        dns_ip: u32::from(*opts.dns.ip()),
        outbound_port: opts.outbound.port(),
        dns_port: opts.dns.port(),
        skip_mark: opts.skip_mark,
        enabled: 1,
        sk_msg_bypass: u32::from(opts.sk_msg_bypass),
        netns_cookie: 0,
    })
}

/// The IPv6 part of the kernel config; disabled without `opts.v6`.
fn redirect_config6(opts: &RedirectOptions) -> anyhow::Result<RedirectConfig6> {
    let Some(v6) = &opts.v6 else {
        return Ok(RedirectConfig6::default());
    };
    if v6.outbound.port() != opts.outbound.port() || v6.dns.port() != opts.dns.port() {
        bail!(
            "the IPv6 listeners {} and {} must use the IPv4 listeners' ports ({} and {})",
            v6.outbound,
            v6.dns,
            opts.outbound.port(),
            opts.dns.port()
        );
    }
    let w = ipv6_words(v6.vip_prefix);
    Ok(RedirectConfig6 {
        vip_prefix: [w[0], w[1], w[2]],
        outbound_ip: ipv6_words(*v6.outbound.ip()),
        dns_ip: ipv6_words(*v6.dns.ip()),
        enabled: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RedirectOptions {
        RedirectOptions {
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            pin_dir: PathBuf::from("/sys/fs/bpf/hms"),
            vip_net: Ipv4Addr::new(127, 77, 3, 4),
            vip_prefix_len: 16,
            outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
            dns: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053),
            skip_mark: 0x4853,
            sk_msg_bypass: false,
            v6: None,
            refuse_undeclared_egress: false,
        }
    }

    #[test]
    fn config_is_host_order_and_normalises_the_vip_net() {
        let cfg = redirect_config(&opts()).expect("valid");
        assert_eq!(cfg.vip_net, u32::from(Ipv4Addr::new(127, 77, 0, 0)));
        assert_eq!(cfg.vip_mask, 0xffff_0000);
        assert_eq!(cfg.outbound_ip, 0x7f00_0001);
        assert_eq!(cfg.outbound_port, 15001);
        assert_eq!(cfg.enabled, 1);
    }

    #[test]
    fn refuses_a_zero_prefix_and_an_outbound_inside_the_vips() {
        let mut o = opts();
        o.vip_prefix_len = 0;
        assert!(format!("{:#}", redirect_config(&o).unwrap_err()).contains("1..=32"));
        let mut o = opts();
        o.outbound = SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, 1), 15001);
        assert!(format!("{:#}", redirect_config(&o).unwrap_err()).contains("loop"));
    }
}
