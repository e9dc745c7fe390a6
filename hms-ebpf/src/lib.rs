//! The ABI between the HMS kernel programs and the agent: map names, program names and the
//! `#[repr(C)]` records stored in maps. Defined once here; both sides use these types.
//!
//! Byte order rule: every address and port stored in a map is in **host order**. The kernel
//! hands us network order (and, for `bpf_sock_ops.remote_port`, a port shifted into the upper
//! 16 bits); the functions in [`byte_order`] are the only place that converts.
#![cfg_attr(not(test), no_std)]

pub mod byte_order;
pub mod rule;

/// Names of the maps, as declared in `main.rs` and pinned under the agent's pin directory.
pub mod map_names {
    /// `ARRAY<u64>`, one entry: when the agent last said it is alive (CLOCK_MONOTONIC ns, the
    /// clock of `bpf_ktime_get_ns`); 0 once it stopped for good. The hooks redirect only
    /// while it is younger than [`AGENT_ALIVE_WINDOW_NS`](super::AGENT_ALIVE_WINDOW_NS).
    pub const AGENT_ALIVE: &str = "HMS_AGENT_ALIVE";
    /// `LRU_HASH` socket cookie -> [`OrigDst`](super::OrigDst): the resolver a UDP DNS socket
    /// asked, kept apart from the TCP records so UDP churn cannot evict them, and removed
    /// when the socket is released.
    pub const DNS_UDP_ORIG: &str = "HMS_DNS_UDP_ORIG";
    pub const CONFIG: &str = "HMS_CONFIG";
    pub const ORIG_BY_COOKIE: &str = "HMS_ORIG_BY_COOKIE";
    pub const ORIG_BY_FLOW: &str = "HMS_ORIG_BY_FLOW";
    /// `BPF_MAP_TYPE_RINGBUF` of [`FlowEvent`](super::FlowEvent) records, read by the agent.
    pub const FLOW_EVENTS: &str = "HMS_FLOW_EVENTS";
    /// `LRU_HASH` socket cookie -> [`FlowState`](super::FlowState): the tracked connections.
    pub const FLOWS: &str = "HMS_FLOWS";
    /// `PERCPU_ARRAY<u64>`, one entry: flow records that could not be reserved in
    /// `HMS_FLOW_EVENTS` (reader too slow or absent). Sum over CPUs.
    pub const RINGBUF_DROPS: &str = "HMS_RINGBUF_DROPS";
    /// `SOCKHASH` [`SockKey`](super::SockKey) -> socket: both ends of each redirected
    /// app <-> proxy connection while the sk_msg bypass is on.
    pub const SOCKS: &str = "HMS_SOCKS";
    /// `PERCPU_ARRAY<u64>`, [`sk_msg_stat`](super::sk_msg_stat) indices: what the sk_msg
    /// program did. Sum over CPUs.
    pub const SK_MSG_STATS: &str = "HMS_SK_MSG_STATS";
    /// `LRU_HASH` [`FlowKey`](super::FlowKey) -> [`BypassBytes`](super::BypassBytes): payload
    /// the bypass carried for a tracked connection, added to its close record.
    pub const BYPASS_BYTES: &str = "HMS_BYPASS_BYTES";
    /// `LRU_HASH` [`SockKey`](super::SockKey) -> u8: the instance's end of an agent ->
    /// local instance connection, expected to join the bypass.
    pub const BYPASS_PENDING: &str = "HMS_BYPASS_PENDING";
    /// `ARRAY`, one [`RedirectConfig6`](super::RedirectConfig6): the IPv6 settings. Its own
    /// map so that maps pinned by an IPv4-only agent keep their layout.
    pub const CONFIG6: &str = "HMS_CONFIG6";
    /// `LRU_HASH` socket cookie -> [`OrigDst6`](super::OrigDst6): sockets that dialled a real
    /// IPv6 destination (IPv4 and mapped ones use `HMS_ORIG_BY_COOKIE`).
    pub const ORIG6_BY_COOKIE: &str = "HMS_ORIG6_BY_COOKIE";
    /// `LRU_HASH` [`FlowKey6`](super::FlowKey6) -> [`OrigDst6`](super::OrigDst6): those
    /// connections once established, for the proxy's IPv6 listener.
    pub const ORIG6_BY_FLOW: &str = "HMS_ORIG6_BY_FLOW";
    /// `SOCKHASH` [`SockKey6`](super::SockKey6) -> socket: the sk_msg bypass for real IPv6
    /// connections (IPv4-mapped ones are IPv4 and use `HMS_SOCKS`). `hms_sk_msg` is attached
    /// to both.
    pub const SOCKS6: &str = "HMS_SOCKS6";
    /// `ARRAY`, one [`EgressConfig`](super::EgressConfig): whether connect4/connect6 refuse
    /// undeclared outside destinations (the host setting `--refuse-undeclared-egress`).
    pub const EGRESS: &str = "HMS_EGRESS";
    /// `HASH` [`EgressAddr`](super::EgressAddr) -> u32 (1): the declared external services'
    /// addresses, which stay reachable while refusal is on.
    pub const EGRESS_ALLOW: &str = "HMS_EGRESS_ALLOW";
    /// `PERCPU_ARRAY<u64>`, one entry: connects refused as undeclared egress. Sum over CPUs.
    pub const EGRESS_REFUSED: &str = "HMS_EGRESS_REFUSED";
}

/// Names of the programs (the functions in `main.rs`).
pub mod program_names {
    /// `cgroup/sock_release`: drops a socket's DNS record when the socket goes away.
    pub const SOCK_RELEASE: &str = "hms_sock_release";
    pub const CONNECT4: &str = "hms_connect4";
    pub const SENDMSG4: &str = "hms_sendmsg4";
    pub const RECVMSG4: &str = "hms_recvmsg4";
    pub const CONNECT6: &str = "hms_connect6";
    pub const SENDMSG6: &str = "hms_sendmsg6";
    pub const RECVMSG6: &str = "hms_recvmsg6";
    /// `getpeername()` of a redirected connection answers the address the app dialled.
    pub const GETPEERNAME4: &str = "hms_getpeername4";
    pub const GETPEERNAME6: &str = "hms_getpeername6";
    pub const SOCK_OPS: &str = "hms_sock_ops";
    /// Attached to `HMS_SOCKS` (not to a cgroup): runs on every send of a socket in it.
    pub const SK_MSG: &str = "hms_sk_msg";
}

/// The agent's settings as the kernel programs see them (index 0 of `HMS_CONFIG`).
/// All addresses and ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// VIP range: `dst & vip_mask == vip_net` is redirected to the outbound listener.
    pub vip_net: u32,
    pub vip_mask: u32,
    pub outbound_ip: u32,
    pub dns_ip: u32,
    pub outbound_port: u16,
    pub dns_port: u16,
    /// Sockets carrying this `SO_MARK` (the agent's own upstream DNS sockets) are never
    /// redirected. 0 disables the check.
    pub skip_mark: u32,
    /// 1 once the agent has filled this record; the programs do nothing until then.
    pub enabled: u32,
    /// 1: sock_ops puts both ends of each redirected app <-> proxy connection in `HMS_SOCKS`,
    /// and `hms_sk_msg` moves what one end sends straight into the other's receive queue,
    /// skipping the loopback TCP/IP stack. 0: nothing enters the map.
    pub sk_msg_bypass: u32,
    /// The network namespace the agent serves (its netns cookie): sockets in any other
    /// namespace (containers, `ip netns exec`, sandboxes) are left alone, since the agent's
    /// listeners do not exist there. 0 disables the check.
    pub netns_cookie: u64,
}

/// The egress setting (index 0 of `HMS_EGRESS`). Absent or `refuse_undeclared == 0`: no
/// connect is ever refused (the hooks only redirect).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressConfig {
    /// 1: a TCP or UDP connect from the redirected cgroup (agent's namespace, agent alive) to
    /// an address that is neither loopback, nor unspecified, nor a VIP, nor in
    /// `HMS_EGRESS_ALLOW` fails with EPERM, is counted and reported in the flow ring buffer
    /// ([`FLOW_EGRESS_REFUSED`]).
    pub refuse_undeclared: u32,
    /// The agent's own process (thread-group id): its connections (registry, peers,
    /// external services) are never refused, marked or not.
    pub agent_tgid: u32,
}

/// A key of `HMS_EGRESS_ALLOW`: an address as the four host-order words of its IPv6 form
/// (IPv4 as `::ffff:a.b.c.d`, the form `rule::Addr::v6_words` gives), so one map serves
/// both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EgressAddr {
    pub words: [u32; 4],
}

/// How long after the agent's last heartbeat (written every
/// [`AGENT_HEARTBEAT_NS`]) the hooks still redirect. Past it the agent counts as gone: DNS
/// goes to the resolver the caller asked and a VIP connect is refused at once. Long enough
/// that a restart under socket activation (connections and queries wait in the socket
/// manager's queue) is served by the new agent; short enough that a crash loop does not hold
/// the host's DNS.
pub const AGENT_ALIVE_WINDOW_NS: u64 = 3_000_000_000;
/// How often the agent writes its heartbeat: twelve missed beats make it gone.
pub const AGENT_HEARTBEAT_NS: u64 = 250_000_000;
/// The IPv6 settings (index 0 of `HMS_CONFIG6`), host-order words most significant first.
/// Absent or `enabled == 0`: real IPv6 destinations are left alone (IPv4-mapped ones are IPv4
/// and follow [`RedirectConfig`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig6 {
    /// The IPv6 VIP range is this /96 followed by the service's IPv4 VIP, so every host
    /// derives the same IPv6 VIP from the registry's IPv4 one.
    pub vip_prefix: [u32; 3],
    /// The outbound listener's IPv6 address (its port is `RedirectConfig::outbound_port`).
    pub outbound_ip: [u32; 4],
    /// The DNS responder's IPv6 address (port `RedirectConfig::dns_port`).
    pub dns_ip: [u32; 4],
    pub enabled: u32,
}

/// A socket in `HMS_SOCKS`, as that socket sees its connection (host order). The peer of a
/// socket is found under the same key with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The socket's network namespace cookie: the same 4-tuple in another namespace (any
    /// user can `unshare -Urn` and listen on the proxy's address) is another key.
    pub netns: u64,
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u16,
    pub remote_port: u16,
    /// Explicit tail padding: a map key is hashed byte for byte.
    pub _pad: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// [`SockKey`] for a real IPv6 connection (host-order words, most significant first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey6 {
    /// The socket's network namespace cookie, as in [`SockKey`].
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    /// Explicit tail padding: a map key is hashed byte for byte.
    pub _pad: u32,
}

impl SockKey6 {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> SockKey6 {
        SockKey6 {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Payload of one redirected connection that the sk_msg bypass carried, so never counted by
/// the app socket's TCP counters; the close record adds it back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassBytes {
    /// From the app to the proxy.
    pub sent: u64,
    /// From the proxy to the app.
    pub received: u64,
}

/// Indices of `HMS_SK_MSG_STATS`.
pub mod sk_msg_stat {
    /// Sends moved to the peer socket.
    pub const REDIRECTED: u32 = 0;
    /// Bytes in those sends.
    pub const REDIRECTED_BYTES: u32 = 1;
    /// Sends whose peer was not in `HMS_SOCKS` (the proxy's listener is outside the redirected
    /// cgroup, or the map was full): passed to TCP as usual.
    pub const PASSED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// What connect4/sendmsg4 remember about a redirected socket: where the caller wanted to go
/// and who the caller is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip: u32,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u16,
    /// Caller's thread-group id (the user-visible pid) at connect time.
    pub pid: u32,
    /// `ORIG_FLAG_*`. Written as 0 by agents before IPv6 support.
    pub flags: u32,
    pub cgroup_id: u64,
    /// Caller's `comm`, NUL-padded.
    pub comm: [u8; 16],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC, ns since boot) when connect4/sendmsg4 ran.
    pub connect_ns: u64,
    /// Caller's uid as the initial user namespace sees it (a user namespace of its own
    /// does not change it): the agent shares its connection caps out per user.
    pub uid: u32,
    pub _pad: u32,
}

/// [`OrigDst::flags`]: the caller dialled a real IPv6 address; `ip` holds its low 32 bits
/// (for an IPv6 VIP, the service's IPv4 VIP) and [`OrigDst6::ip6`] the whole address.
pub const ORIG_FLAG_V6: u32 = 1;

/// What connect6/sendmsg6 remember about a socket that dialled a real IPv6 destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst6 {
    /// Everything but the address, as for IPv4 (`flags` has `ORIG_FLAG_V6`).
    pub orig: OrigDst,
    /// The destination, host-order words most significant first.
    pub ip6: [u32; 4],
}

/// [`FlowKey`] for an IPv6 connection (client and the proxy's IPv6 listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub client_ip: [u32; 4],
    pub listener_ip: [u32; 4],
    pub client_port: u16,
    pub listener_port: u16,
    pub _pad: u32,
}

/// A TCP connection as the client sees it: its own address and the (rewritten) peer, which is
/// the proxy's listener. The proxy rebuilds this key from `peer_addr()`/`local_addr()` after
/// `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_ip: u32,
    pub listener_ip: u32,
    pub client_port: u16,
    pub listener_port: u16,
    pub _pad: u32,
}

/// Size of `HMS_FLOW_EVENTS` in bytes (a power-of-two multiple of the page size, as the kernel
/// requires). A record takes `size_of::<FlowEvent>()` + 8 header bytes = 136 bytes, so about
/// 1,900 records wait here for a slow reader before new ones are dropped (and counted).
pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;

/// [`FlowEvent::kind`]: the client side of a redirected TCP connection was established.
pub const FLOW_OPEN: u8 = 1;
/// [`FlowEvent::kind`]: a tracked connection reached `TCP_CLOSE`.
pub const FLOW_CLOSE: u8 = 2;
/// [`FlowEvent::kind`]: a connect refused as undeclared egress. Only `orig` (the refused
/// destination, low 32 bits of an IPv6 one with `FLOW_FLAG_V6`, and the caller) and
/// `established_ns` (when) are set.
pub const FLOW_EGRESS_REFUSED: u8 = 3;

/// [`FlowEvent::flags`]: the connection was redirected to the DNS responder (DNS over TCP to
/// port 53), not to the outbound proxy.
pub const FLOW_FLAG_DNS: u8 = 1;

/// [`FlowEvent::flags`]: an IPv6 connection (to an IPv6 VIP or resolver). The record's
/// `flow` then holds the low 32 bits of the client and listener addresses (`::1` is 1), and
/// `orig` has `ORIG_FLAG_V6`.
pub const FLOW_FLAG_V6: u8 = 2;

/// Linux TCP states (`BPF_TCP_*` in include/uapi/linux/bpf.h, the same numbers as
/// `TCP_*` in include/net/tcp_states.h), as [`FlowEvent::state_before_close`] reports them.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// What sock_ops keeps (in `HMS_FLOWS`, by the client socket's cookie) about a tracked
/// connection between its open and close records: everything the close record repeats.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub orig: OrigDst,
    pub flow: FlowKey,
    /// `bpf_ktime_get_ns()` at `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`.
    pub established_ns: u64,
    /// `FLOW_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// One record in `HMS_FLOW_EVENTS`: a redirected TCP connection, seen from the client's (the
/// app's) socket, opened or closed. Only the client side is tracked: the proxy's sockets are
/// outside the hooked cgroup, or carry no original-destination record.
///
/// Timestamps are `bpf_ktime_get_ns()`: CLOCK_MONOTONIC in ns since boot (not wall time).
/// Connect latency = `established_ns - orig.connect_ns`; duration = `closed_ns -
/// established_ns`.
///
/// The counters are the kernel's own (`struct tcp_sock`, what `ss -ti` shows), read when the
/// record is made:
/// - `bytes_acked`: sequence space the peer acknowledged: the payload the client sent, plus 1
///   for its SYN, plus 1 for its FIN once that was acknowledged.
/// - `bytes_received`: sequence space received in order: the payload the client received, plus
///   1 for the peer's FIN if it reached this socket (after the client closed first, the FIN is
///   handled by the time-wait socket and not counted here).
/// - With the sk_msg bypass, payload it carried never enters TCP; the close record adds it to
///   both counters (from `HMS_BYPASS_BYTES`), so they mean the same with and without it.
/// - `srtt_us`: smoothed RTT in **microseconds** (the kernel keeps it scaled by 8; sock_ops
///   already shifted it).
/// - `total_retrans`: segments retransmitted over the connection's life (SYN included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `FLOW_OPEN` or `FLOW_CLOSE`.
    pub kind: u8,
    /// `FLOW_FLAG_*`.
    pub flags: u8,
    /// For `FLOW_CLOSE`: the TCP state the socket left for `TCP_CLOSE` ([`tcp_state`]), which
    /// tells who closed first (`FIN_WAIT2`/`FIN_WAIT1`: the client; `LAST_ACK`: the peer;
    /// `ESTABLISHED`/`CLOSE_WAIT`: a reset). 0 for `FLOW_OPEN`.
    pub state_before_close: u8,
    pub _pad: [u8; 5],
    /// The client socket's cookie (`bpf_get_socket_cookie`): pairs an open with its close.
    pub cookie: u64,
    pub established_ns: u64,
    /// 0 for `FLOW_OPEN`.
    pub closed_ns: u64,
    /// Client address and the listener it was redirected to (host order).
    pub flow: FlowKey,
    /// Where the client wanted to go, who it is, and when it called connect (`connect_ns`).
    pub orig: OrigDst,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub srtt_us: u32,
    pub total_retrans: u32,
}

pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
pub const DNS_PORT: u16 = 53;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding fields, valid for any bit pattern.
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::BypassBytes {}
    unsafe impl aya::Pod for super::RedirectConfig6 {}
    unsafe impl aya::Pod for super::OrigDst6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::SockKey6 {}
    unsafe impl aya::Pod for super::EgressConfig {}
    unsafe impl aya::Pod for super::EgressAddr {}
}

// The layouts are the ABI: a change here must be deliberate (and makes a pinned map of the old
// size be refused by the agent, which asks for a cleanup).
const _: () = {
    assert!(size_of::<OrigDst>() == 56);
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<SockKey>() == 24);
    assert!(size_of::<RedirectConfig>() == 40);
    assert!(size_of::<RedirectConfig6>() == 48);
    assert!(size_of::<OrigDst6>() == 72);
    assert!(size_of::<FlowKey6>() == 40);
    assert!(size_of::<SockKey6>() == 48);
    assert!(size_of::<FlowState>() == 88);
    assert!(size_of::<FlowEvent>() == 128);
    assert!(align_of::<FlowEvent>() == 8);
    assert!(size_of::<EgressConfig>() == 8);
    assert!(size_of::<EgressAddr>() == 16);
};
