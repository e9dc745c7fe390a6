//! HMS kernel programs: the cgroup socket hooks that steer an unmodified app's traffic to the
//! node agent, and remember where it really wanted to go.
//!
//! Owns: applying the redirect decisions of `hms_ebpf::rule` (VIP -> outbound listener,
//! port 53 -> DNS responder) in both families: `connect4`/`sendmsg4`/`recvmsg4` for
//! `AF_INET` sockets and `connect6`/`sendmsg6`/`recvmsg6` for `AF_INET6` ones (dual-stack
//! sockets dialling IPv4-mapped addresses are IPv4 callers and share the IPv4 maps; real IPv6
//! destinations have maps of their own), the
//! original-destination records (by socket cookie, promoted to a 4-tuple in sock_ops), the
//! restoration of a DNS reply's source address, and the flow records (open/close of every
//! redirected TCP connection, client side) sent to the agent through a ring buffer, and,
//! when the agent turns it on, the sk_msg bypass: both ends of a redirected app <-> proxy
//! connection go into a sockhash and what one sends is moved straight into the other's receive
//! queue (`hms_sk_msg`), skipping the loopback TCP/IP stack.
//! Must never: drop or refuse a socket operation (every hook returns "allow"; a missing config
//! or a full map means "leave the socket alone") -- with one exception the agent turns on:
//! with `EgressConfig::refuse_undeclared`, connect4/connect6 refuse (EPERM) a connect to an
//! undeclared outside address (`refuse_undeclared_egress`) -- or redirect a socket carrying the agent's
//! skip mark (that is how the agent's own upstream DNS avoids looping back into itself), or
//! wait for the agent: a flow record that does not fit in the ring buffer is dropped and
//! counted in `HMS_RINGBUF_DROPS`, never retried.
//!
//! Byte order: every value written to a map is host order, converted only through
//! `hms_ebpf::byte_order`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{
            BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
            BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, bpf_sock_ops,
            sk_action::SK_PASS,
        },
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
            generated::{
                bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
                bpf_ktime_get_ns,
            },
        },
        macros::{cgroup_sock, cgroup_sock_addr, map, sk_msg, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
        programs::{SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
    };
    use aya_log_ebpf::debug;
    use hms_ebpf::{
        AGENT_ALIVE_WINDOW_NS, BypassBytes, EgressAddr, EgressConfig, FLOW_CLOSE,
        FLOW_EGRESS_REFUSED, FLOW_EVENTS_BYTES, FLOW_FLAG_DNS, FLOW_FLAG_V6, FLOW_OPEN, FlowEvent,
        FlowKey, FlowKey6, FlowState, IPPROTO_TCP, IPPROTO_UDP, ORIG_FLAG_V6, OrigDst, OrigDst6,
        RedirectConfig, RedirectConfig6, SockKey, SockKey6, byte_order,
        rule::{self, Addr},
        sk_msg_stat,
    };

    /// `AF_INET6` (include/linux/socket.h), as `bpf_sock_ops.family` reports it.
    const AF_INET6: u32 = 10;

    /// cgroup sock_addr programs: 1 lets the syscall proceed, 0 fails it with EPERM.
    const SOCK_ADDR_ALLOW: i32 = 1;
    const SOCK_ADDR_REFUSE: i32 = 0;
    /// sock_ops programs: the return value is ignored for the callbacks we handle; 1 is the
    /// conventional "ok".
    const SOCK_OPS_OK: u32 = 1;
    /// Enough for the connections of a busy host between connect() and the proxy's accept();
    /// LRU so a record nobody collects (client gave up, proxy down) ages out instead of
    /// filling the map.
    const ORIG_DST_ENTRIES: u32 = 65536;
    /// Addresses of declared external services (each resolves to a few).
    const EGRESS_ALLOW_ENTRIES: u32 = 4096;

    #[map(name = "HMS_CONFIG")]
    static HMS_CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);

    #[map(name = "HMS_ORIG_BY_COOKIE")]
    static HMS_ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// The agent's heartbeat (`AGENT_ALIVE_WINDOW_NS`): written by the agent only.
    #[map(name = "HMS_AGENT_ALIVE")]
    static HMS_AGENT_ALIVE: Array<u64> = Array::pinned(1, 0);

    /// The resolver each redirected UDP DNS socket asked, by cookie; `hms_sock_release`
    /// removes a socket's record when the socket goes away. LRU as a backstop for sockets
    /// whose release we never see (the hook attached after they were created).
    #[map(name = "HMS_DNS_UDP_ORIG")]
    static HMS_DNS_UDP_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    #[map(name = "HMS_ORIG_BY_FLOW")]
    static HMS_ORIG_BY_FLOW: LruHashMap<FlowKey, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// The IPv6 settings; missing or disabled means real IPv6 is left alone.
    #[map(name = "HMS_CONFIG6")]
    static HMS_CONFIG6: Array<RedirectConfig6> = Array::pinned(1, 0);

    /// Sockets that dialled a real IPv6 VIP or resolver, by cookie (IPv4 and mapped
    /// destinations are in `HMS_ORIG_BY_COOKIE`).
    #[map(name = "HMS_ORIG6_BY_COOKIE")]
    static HMS_ORIG6_BY_COOKIE: LruHashMap<u64, OrigDst6> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// Those connections once established, by the client's IPv6 4-tuple.
    #[map(name = "HMS_ORIG6_BY_FLOW")]
    static HMS_ORIG6_BY_FLOW: LruHashMap<FlowKey6, OrigDst6> =
        LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// Open/close records for the agent. Lossy by design: see `emit`.
    #[map(name = "HMS_FLOW_EVENTS")]
    static HMS_FLOW_EVENTS: RingBuf = RingBuf::pinned(FLOW_EVENTS_BYTES, 0);

    /// Redirected TCP connections between their open and close records, by client cookie. LRU:
    /// a connection whose close we never see (state callbacks could not be enabled, the program
    /// was replaced) ages out; with more than this many connections open at once the oldest
    /// lose their close record.
    #[map(name = "HMS_FLOWS")]
    static HMS_FLOWS: LruHashMap<u64, FlowState> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// Records that did not fit in `HMS_FLOW_EVENTS`, per CPU (index 0).
    #[map(name = "HMS_RINGBUF_DROPS")]
    static HMS_RINGBUF_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

    /// Both ends of each redirected app <-> proxy connection while the bypass is on. A socket
    /// leaves the map by itself when it closes; when the map is full, new connections simply
    /// take the TCP path.
    #[map(name = "HMS_SOCKS")]
    static HMS_SOCKS: SockHash<SockKey> = SockHash::pinned(ORIG_DST_ENTRIES, 0);

    /// `HMS_SOCKS` for real IPv6 connections.
    #[map(name = "HMS_SOCKS6")]
    static HMS_SOCKS6: SockHash<SockKey6> = SockHash::pinned(ORIG_DST_ENTRIES, 0);

    /// Payload the bypass carried per tracked connection (by the app side's 4-tuple), until
    /// its close record takes it.
    #[map(name = "HMS_BYPASS_BYTES")]
    static HMS_BYPASS_BYTES: LruHashMap<FlowKey, BypassBytes> =
        LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// Instance-side sockets expected to join the bypass (key: the instance's view of the
    /// connection), written when the agent's end joins and taken when the instance's end is
    /// established. LRU: an expected end that never shows up (the instance is outside the
    /// redirected cgroup) ages out.
    #[map(name = "HMS_BYPASS_PENDING")]
    static HMS_BYPASS_PENDING: LruHashMap<SockKey, u8> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// What `hms_sk_msg` did, per CPU (`sk_msg_stat` indices).
    #[map(name = "HMS_SK_MSG_STATS")]
    static HMS_SK_MSG_STATS: PerCpuArray<u64> = PerCpuArray::pinned(sk_msg_stat::COUNT, 0);

    /// The egress setting; all zero (nothing refused) until the agent writes it.
    #[map(name = "HMS_EGRESS")]
    static HMS_EGRESS: Array<EgressConfig> = Array::pinned(1, 0);

    /// Declared external services' addresses (written by the agent from the registry).
    #[map(name = "HMS_EGRESS_ALLOW")]
    static HMS_EGRESS_ALLOW: HashMap<EgressAddr, u32> = HashMap::pinned(EGRESS_ALLOW_ENTRIES, 0);

    /// Connects refused as undeclared egress.
    #[map(name = "HMS_EGRESS_REFUSED")]
    static HMS_EGRESS_REFUSED: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

    /// Which `bpf_sock_addr` address fields a hook reads and writes.
    #[derive(Clone, Copy)]
    enum Family {
        /// `user_ip4` (connect4, sendmsg4, recvmsg4).
        Inet,
        /// `user_ip6` (connect6, sendmsg6, recvmsg6).
        Inet6,
    }

    #[inline(always)]
    fn config() -> Option<&'static RedirectConfig> {
        let cfg = HMS_CONFIG.get(0)?;
        if cfg.enabled == 0 { None } else { Some(cfg) }
    }

    /// `None` unless the agent turned IPv6 on (an agent before IPv6 support never writes it).
    #[inline(always)]
    fn config6() -> Option<&'static RedirectConfig6> {
        rule::v6_enabled(HMS_CONFIG6.get(0))
    }

    /// The socket address the syscall carries, in host order.
    #[inline(always)]
    fn dest(ctx: &SockAddrContext, family: Family) -> (Addr, u16) {
        // SAFETY: the kernel hands every sock_addr program a valid context; user_ip4 is
        // readable in the IPv4 hooks and user_ip6 (4-byte words) in the IPv6 ones.
        unsafe {
            let sa = ctx.sock_addr;
            let port =
                byte_order::sock_addr_port_from_kernel(core::ptr::read_volatile(&(*sa).user_port));
            let addr = match family {
                Family::Inet => Addr::V4(byte_order::ip_from_kernel(core::ptr::read_volatile(
                    &(*sa).user_ip4,
                ))),
                Family::Inet6 => Addr::from_v6_words([
                    byte_order::ip_from_kernel(core::ptr::read_volatile(&(*sa).user_ip6[0])),
                    byte_order::ip_from_kernel(core::ptr::read_volatile(&(*sa).user_ip6[1])),
                    byte_order::ip_from_kernel(core::ptr::read_volatile(&(*sa).user_ip6[2])),
                    byte_order::ip_from_kernel(core::ptr::read_volatile(&(*sa).user_ip6[3])),
                ]),
            };
            (addr, port)
        }
    }

    /// Rewrites the socket address. On an `AF_INET6` socket an IPv4 address is written in
    /// mapped form; an `AF_INET` socket is only ever given IPv4 (the rule keeps the family of
    /// the destination).
    #[inline(always)]
    fn set_dest(ctx: &SockAddrContext, family: Family, addr: Addr, port: u16) {
        // SAFETY: user_ip4/user_ip6 words/user_port are writable with 4-byte stores in the
        // connect, sendmsg and recvmsg hooks of their family (the verifier enforces the width;
        // write_volatile keeps LLVM from narrowing or merging them).
        unsafe {
            let sa = ctx.sock_addr;
            match (family, addr) {
                (Family::Inet, Addr::V4(ip)) => {
                    core::ptr::write_volatile(&mut (*sa).user_ip4, byte_order::ip_to_kernel(ip))
                }
                (Family::Inet, Addr::V6(_)) => return,
                (Family::Inet6, addr) => {
                    let w = addr.v6_words();
                    core::ptr::write_volatile(
                        &mut (*sa).user_ip6[0],
                        byte_order::ip_to_kernel(w[0]),
                    );
                    core::ptr::write_volatile(
                        &mut (*sa).user_ip6[1],
                        byte_order::ip_to_kernel(w[1]),
                    );
                    core::ptr::write_volatile(
                        &mut (*sa).user_ip6[2],
                        byte_order::ip_to_kernel(w[2]),
                    );
                    core::ptr::write_volatile(
                        &mut (*sa).user_ip6[3],
                        byte_order::ip_to_kernel(w[3]),
                    );
                }
            }
            core::ptr::write_volatile(
                &mut (*sa).user_port,
                byte_order::sock_addr_port_to_kernel(port),
            );
        }
    }

    #[inline(always)]
    fn protocol(ctx: &SockAddrContext) -> u16 {
        // SAFETY: valid context; `protocol` is a readable u32.
        unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) as u16 }
    }

    /// The agent's own sockets carry `skip_mark`; they must reach the real destination.
    #[inline(always)]
    fn carries_skip_mark(ctx: &SockAddrContext, cfg: &RedirectConfig) -> bool {
        if cfg.skip_mark == 0 {
            return false;
        }
        // SAFETY: `sk` is always set for sock_addr programs (the verifier types it as a
        // non-null socket pointer) and `mark` is one of its readable fields.
        let mark = unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            core::ptr::read_volatile(&(*sk).mark)
        };
        mark == cfg.skip_mark
    }

    /// Whether the socket behind `ctx` lives in the network namespace the agent serves. The
    /// agent's listeners exist only there: a socket in a container or another netns that was
    /// rewritten to 127.0.0.1:<agent port> would reach nothing (or whatever listens there
    /// in its namespace), so such sockets are left exactly as they are.
    #[inline(always)]
    fn in_agent_netns(cfg: &RedirectConfig, ctx: *mut core::ffi::c_void) -> bool {
        // SAFETY: bpf_get_netns_cookie takes the program's own context (sock_addr, sock_ops
        // and sk_msg programs are allowed to call it).
        cfg.netns_cookie == 0 || unsafe { bpf_get_netns_cookie(ctx) } == cfg.netns_cookie
    }

    /// Whether the agent's heartbeat is recent (`AGENT_ALIVE_WINDOW_NS`). A stopped agent
    /// writes 0, a crashed one stops writing: either way DNS then goes to the resolver the
    /// caller asked and a VIP connect to its own (loopback) address, refused at once.
    #[inline(always)]
    fn agent_alive() -> bool {
        let Some(beat) = HMS_AGENT_ALIVE.get(0) else {
            return false;
        };
        // SAFETY: no arguments; available to every program type.
        let now = unsafe { bpf_ktime_get_ns() };
        *beat != 0 && now.saturating_sub(*beat) < AGENT_ALIVE_WINDOW_NS
    }

    #[inline(always)]
    fn socket_cookie(ctx: &SockAddrContext) -> u64 {
        // SAFETY: bpf_get_socket_cookie is allowed for sock_addr programs with their ctx.
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    }

    /// Who is calling and where it wanted to go. Runs in the caller's process context
    /// (connect/sendmsg syscalls), so "current" is the caller.
    #[inline(always)]
    fn orig_dst(ip: u32, port: u16, protocol: u16, flags: u32) -> OrigDst {
        OrigDst {
            ip,
            port,
            protocol,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            flags,
            // SAFETY: no arguments; allowed in cgroup sock_addr programs.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            // SAFETY: no arguments; available to every program type.
            connect_ns: unsafe { bpf_ktime_get_ns() },
            // Low half: the uid (high half: gid).
            uid: bpf_get_current_uid_gid() as u32,
            _pad: 0,
        }
    }

    /// Shared by the connect and sendmsg hooks of both families: record the original
    /// destination under the socket's cookie, then rewrite. If the record cannot be stored we
    /// still redirect: the proxy then sees an unknown connection and refuses it, which is
    /// louder than silently bypassing it.
    #[inline(always)]
    /// Returns the hook's verdict: [`SOCK_ADDR_REFUSE`] only for a connect refused as
    /// undeclared egress, [`SOCK_ADDR_ALLOW`] for everything else.
    fn redirect(ctx: &SockAddrContext, family: Family, udp_only: bool) -> i32 {
        let Some(cfg) = config() else {
            return SOCK_ADDR_ALLOW;
        };
        if carries_skip_mark(ctx, cfg) || !in_agent_netns(cfg, ctx.as_ptr()) || !agent_alive() {
            return SOCK_ADDR_ALLOW;
        }
        let cfg6 = config6();
        let (to, port) = dest(ctx, family);
        let protocol = protocol(ctx);
        let Some(target) = rule::decide(cfg, cfg6, to, port, protocol, udp_only) else {
            // A datagram sent with an address (sendmsg4/6) is refused like a connect: DNS
            // to any resolver was redirected just above, everything else is egress.
            if refuses_egress(cfg, cfg6, to) {
                report_refused_egress(to, port, protocol);
                return SOCK_ADDR_REFUSE;
            }
            return SOCK_ADDR_ALLOW;
        };
        let Some((new, new_port)) = rule::target_addr(cfg, cfg6, to, target) else {
            return SOCK_ADDR_ALLOW;
        };
        let cookie = socket_cookie(ctx);
        let pid = match to {
            Addr::V4(ip) => {
                let record = orig_dst(ip, port, protocol, 0);
                let records = if protocol == IPPROTO_UDP {
                    &HMS_DNS_UDP_ORIG
                } else {
                    &HMS_ORIG_BY_COOKIE
                };
                let _ = records.insert(cookie, record, 0);
                record.pid
            }
            Addr::V6(w) => {
                let record = OrigDst6 {
                    orig: orig_dst(w[3], port, protocol, ORIG_FLAG_V6),
                    ip6: w,
                };
                let _ = HMS_ORIG6_BY_COOKIE.insert(cookie, record, 0);
                record.orig.pid
            }
        };
        set_dest(ctx, family, new, new_port);
        debug!(ctx, "hms: pid {} port {} -> port {}", pid, port, new_port);
        SOCK_ADDR_ALLOW
    }

    /// Whether a connect or unconnected datagram to `to` (not redirected) is undeclared
    /// egress the agent refuses.
    #[inline(always)]
    fn refuses_egress(cfg: &RedirectConfig, cfg6: Option<&RedirectConfig6>, to: Addr) -> bool {
        let Some(egress) = HMS_EGRESS.get(0) else {
            return false;
        };
        if egress.refuse_undeclared == 0
            || (bpf_get_current_pid_tgid() >> 32) as u32 == egress.agent_tgid
            || rule::egress_exempt(cfg, cfg6, to)
        {
            return false;
        }
        let key = EgressAddr {
            words: to.v6_words(),
        };
        // SAFETY: the value is only tested for presence.
        unsafe { HMS_EGRESS_ALLOW.get(&key) }.is_none()
    }

    /// Counts a refused connect and tells the agent (flow ring buffer; dropped and counted
    /// like any flow record when it is full).
    #[inline(always)]
    fn report_refused_egress(to: Addr, port: u16, protocol: u16) {
        if let Some(n) = HMS_EGRESS_REFUSED.get_ptr_mut(0) {
            // SAFETY: this CPU's live u64 slot; not atomic (see `count_drop`).
            unsafe { *n += 1 };
        }
        let (ip, flags) = match to {
            Addr::V4(ip) => (ip, 0),
            Addr::V6(w) => (w[3], ORIG_FLAG_V6),
        };
        let Some(mut entry) = HMS_FLOW_EVENTS.reserve::<FlowEvent>(0) else {
            count_drop();
            return;
        };
        let orig = orig_dst(ip, port, protocol, flags);
        entry.write(FlowEvent {
            kind: FLOW_EGRESS_REFUSED,
            flags: if flags != 0 { FLOW_FLAG_V6 } else { 0 },
            established_ns: orig.connect_ns,
            orig,
            ..FlowEvent::default()
        });
        entry.submit(0);
    }

    #[cgroup_sock_addr(connect4)]
    pub fn hms_connect4(ctx: SockAddrContext) -> i32 {
        redirect(&ctx, Family::Inet, false)
    }

    /// `AF_INET6` sockets: dual-stack ones dialling mapped VIPs (JVMs, gRPC C-core, .NET do
    /// this for every IPv4 address) and real IPv6 VIPs.
    #[cgroup_sock_addr(connect6)]
    pub fn hms_connect6(ctx: SockAddrContext) -> i32 {
        redirect(&ctx, Family::Inet6, false)
    }

    /// Unconnected UDP (sendto with an address). Connected UDP went through connect4 already.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn hms_sendmsg4(ctx: SockAddrContext) -> i32 {
        redirect(&ctx, Family::Inet, true)
    }

    /// Unconnected UDP on `AF_INET6` sockets, to a mapped or real IPv6 resolver.
    #[cgroup_sock_addr(sendmsg6)]
    pub fn hms_sendmsg6(ctx: SockAddrContext) -> i32 {
        redirect(&ctx, Family::Inet6, true)
    }

    /// A resolver (glibc, dig) drops a reply whose source is not the server it asked, so the
    /// responder's address is swapped back for the one recorded at send time.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn hms_recvmsg4(ctx: SockAddrContext) -> i32 {
        restore_reply_source(&ctx, Family::Inet);
        SOCK_ADDR_ALLOW
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn hms_recvmsg6(ctx: SockAddrContext) -> i32 {
        restore_reply_source(&ctx, Family::Inet6);
        SOCK_ADDR_ALLOW
    }

    /// An app asking its connected socket who the peer is gets the VIP it dialled, not the
    /// proxy's listener (clients log it, some compare it with what they resolved).
    #[cgroup_sock_addr(getpeername4)]
    pub fn hms_getpeername4(ctx: SockAddrContext) -> i32 {
        restore_peer(&ctx, Family::Inet);
        SOCK_ADDR_ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn hms_getpeername6(ctx: SockAddrContext) -> i32 {
        restore_peer(&ctx, Family::Inet6);
        SOCK_ADDR_ALLOW
    }

    /// Only sockets connected to the outbound listener by the redirect, found in `HMS_FLOWS`
    /// (kept from established to close); an IPv6 VIP is rebuilt from the prefix and the
    /// record's low 32 bits, which is what an IPv6 VIP is.
    #[inline(always)]
    fn restore_peer(ctx: &SockAddrContext, family: Family) {
        let Some(cfg) = config() else { return };
        let cfg6 = config6();
        let (peer, port) = dest(ctx, family);
        let to_outbound = port == cfg.outbound_port
            && match peer {
                Addr::V4(ip) => ip == cfg.outbound_ip,
                Addr::V6(w) => cfg6.is_some_and(|c6| w == c6.outbound_ip),
            };
        if !to_outbound || !in_agent_netns(cfg, ctx.as_ptr()) {
            return;
        }
        // SAFETY: copied out immediately (see restore_reply_source).
        let Some(state) = (unsafe { HMS_FLOWS.get(socket_cookie(ctx)) }) else {
            return;
        };
        let orig = state.orig;
        let dialled = if orig.flags & ORIG_FLAG_V6 != 0 {
            let Some(c6) = cfg6 else { return };
            Addr::V6([
                c6.vip_prefix[0],
                c6.vip_prefix[1],
                c6.vip_prefix[2],
                orig.ip,
            ])
        } else {
            Addr::V4(orig.ip)
        };
        set_dest(ctx, family, dialled, orig.port);
    }

    #[inline(always)]
    fn restore_reply_source(ctx: &SockAddrContext, family: Family) {
        let Some(cfg) = config() else { return };
        let cfg6 = config6();
        let (from, port) = dest(ctx, family);
        if !rule::is_responder(cfg, cfg6, from, port) || !in_agent_netns(cfg, ctx.as_ptr()) {
            return;
        }
        let cookie = socket_cookie(ctx);
        // SAFETY (both lookups): the value is copied out immediately; an LRU eviction racing
        // with us can at worst give a stale record for this very cookie.
        let (addr, port) = match from {
            // The IPv4 responder answered: the query went to an IPv4 (or mapped) resolver.
            Addr::V4(_) => match unsafe { HMS_DNS_UDP_ORIG.get(cookie) } {
                Some(orig) => (Addr::V4(orig.ip), orig.port),
                None => return,
            },
            Addr::V6(_) => match unsafe { HMS_ORIG6_BY_COOKIE.get(cookie) } {
                Some(orig) if orig.orig.protocol == IPPROTO_UDP => {
                    (Addr::V6(orig.ip6), orig.orig.port)
                }
                _ => return,
            },
        };
        set_dest(ctx, family, addr, port);
    }

    /// A socket of the cgroup goes away: its DNS record (if it asked a resolver) goes with it.
    /// A connected UDP socket gets several answers (glibc asks A and AAAA on one socket), so
    /// "answered" is only certain once the socket is released.
    #[cgroup_sock(sock_release)]
    pub fn hms_sock_release(ctx: SockContext) -> i32 {
        // SAFETY: bpf_get_socket_cookie takes the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = HMS_DNS_UDP_ORIG.remove(&cookie);
        // IPv6 resolvers' records (and any IPv6 TCP record never promoted) live here.
        let _ = HMS_ORIG6_BY_COOKIE.remove(&cookie);
        SOCK_ADDR_ALLOW
    }

    #[sock_ops]
    pub fn hms_sock_ops(ctx: SockOpsContext) -> u32 {
        // Sockets of other network namespaces never join anything: a listener there on the
        // proxy's tuple must not receive a meshed app's bytes through the bypass.
        match config() {
            Some(cfg) if in_agent_netns(cfg, ctx.as_ptr()) => {}
            _ => return SOCK_OPS_OK,
        }
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_proxy_accepted(&ctx),
            // args[0] = old state, args[1] = new state. Sockets we enabled state callbacks for
            // (in on_established) get here, and any socket another program enabled them for;
            // on_close ignores those (no HMS_FLOWS entry).
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
            _ => {}
        }
        SOCK_OPS_OK
    }

    #[inline(always)]
    fn sock_ops_cookie(ctx: &SockOpsContext) -> u64 {
        // SAFETY: bpf_get_socket_cookie is allowed for sock_ops programs with their ctx.
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    }

    /// Whether the socket speaks real IPv6. A dual-stack `AF_INET6` socket connected to a
    /// mapped address runs IPv4 underneath: its `*_ip4` fields are the IPv4 addresses (the
    /// kernel's `tcp_v4_connect` set them), so it is handled exactly like an `AF_INET` one.
    #[inline(always)]
    fn is_real_v6(ctx: &SockOpsContext) -> bool {
        ctx.family() == AF_INET6 && matches!(Addr::from_v6_words(remote_ip6(ctx)), Addr::V6(_))
    }

    #[inline(always)]
    fn remote_ip6(ctx: &SockOpsContext) -> [u32; 4] {
        // SAFETY: valid context; each word is read with its own 4-byte width, as the verifier
        // demands for ctx fields.
        unsafe {
            let ops = ctx.ops;
            [
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).remote_ip6[0])),
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).remote_ip6[1])),
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).remote_ip6[2])),
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).remote_ip6[3])),
            ]
        }
    }

    #[inline(always)]
    fn local_ip6(ctx: &SockOpsContext) -> [u32; 4] {
        // SAFETY: as remote_ip6.
        unsafe {
            let ops = ctx.ops;
            [
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).local_ip6[0])),
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).local_ip6[1])),
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).local_ip6[2])),
                byte_order::ip_from_kernel(core::ptr::read_volatile(&(*ops).local_ip6[3])),
            ]
        }
    }

    /// The client side of a redirected connection is established: make its record findable by
    /// the proxy, start tracking it for the close record, and say it opened.
    #[inline(always)]
    fn on_established(ctx: &SockOpsContext) {
        let cookie = sock_ops_cookie(ctx);
        let (orig, flow, flags) = if is_real_v6(ctx) {
            match promote_v6(ctx, cookie) {
                Some(found) => found,
                None => return,
            }
        } else {
            // SAFETY: copied out immediately (see restore_reply_source).
            let Some(orig) = (unsafe { HMS_ORIG_BY_COOKIE.get(cookie) }) else {
                join_instance_leg(ctx);
                return;
            };
            let orig = *orig;
            let flow = promote_to_flow(ctx, cookie, &orig);
            (orig, flow, flow_flags(&flow))
        };
        let state = FlowState {
            orig,
            flow,
            // SAFETY: no arguments; available to every program type.
            established_ns: unsafe { bpf_ktime_get_ns() },
            flags,
            _pad: [0; 7],
        };
        if HMS_FLOWS.insert(cookie, state, 0).is_ok() {
            // Keep whatever another program asked for on this socket; add state changes.
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
            if ctx.set_cb_flags(flags as i32).is_err() {
                // No state callbacks, so no close record: do not keep a record nobody removes.
                let _ = HMS_FLOWS.remove(cookie);
            }
        }
        emit(ctx, FLOW_OPEN, 0, cookie, &state, 0, BypassBytes::default());
        let joined = if state.flags & FLOW_FLAG_V6 != 0 {
            join_bypass6(ctx)
        } else {
            join_bypass(ctx)
        };
        if state.flags & FLOW_FLAG_DNS == 0 && joined {
            let _ = HMS_BYPASS_BYTES.insert(flow, BypassBytes::default(), 0);
        }
    }

    /// The proxy's side of a redirected connection: a connection accepted on the outbound
    /// listener. Runs when the handshake completes, before the client can send (on loopback the
    /// client's ACK is processed right after its own ESTABLISHED callback), so no payload ever
    /// sits in the TCP queue behind payload the bypass delivered. Only seen when the listener
    /// was created in the redirected cgroup (the agent runs inside it, as with the default
    /// cgroup v2 root).
    #[inline(always)]
    fn on_proxy_accepted(ctx: &SockOpsContext) {
        let Some(cfg) = config() else { return };
        if is_real_v6(ctx) {
            // The proxy's end on its [::1] listener.
            if let Some(c6) = config6() {
                let key = sock_key6(ctx);
                if key.local_ip == c6.outbound_ip && key.local_port == cfg.outbound_port {
                    join_bypass6(ctx);
                }
            }
            return;
        }
        let key = sock_key(ctx);
        if key.local_ip == cfg.outbound_ip && key.local_port == cfg.outbound_port {
            join_bypass(ctx);
        } else if HMS_BYPASS_PENDING.get_ptr(&key).is_some() {
            // The instance's end of an agent -> instance connection (see join_instance_leg).
            let _ = HMS_BYPASS_PENDING.remove(&key);
            join_bypass(ctx);
        }
    }

    /// The agent's own connection to an instance on this host: the agent marks those sockets
    /// with `skip_mark`. Its end joins the bypass, and the instance's end is expected: on
    /// loopback the instance's passive-established callback runs right after this one, before
    /// the agent can send, and finds its key in `HMS_BYPASS_PENDING`. Only seen when the agent
    /// runs in the redirected cgroup; the instance's end only when the instance does too.
    #[inline(always)]
    fn join_instance_leg(ctx: &SockOpsContext) {
        let Some(cfg) = config() else { return };
        if cfg.sk_msg_bypass == 0 || cfg.skip_mark == 0 {
            return;
        }
        // SAFETY: `sk` is the ctx's socket pointer (null unless it is a full socket); `mark` is
        // a readable u32 of it.
        let mark = unsafe {
            let sk = (*ctx.ops).__bindgen_anon_2.sk;
            if sk.is_null() {
                return;
            }
            core::ptr::read_volatile(&(*sk).mark)
        };
        let key = sock_key(ctx);
        // 127.0.0.0/8: an instance on this host (other hosts are reached through tunnels).
        if mark != cfg.skip_mark || key.remote_ip >> 24 != 127 {
            return;
        }
        if join_bypass(ctx) {
            let _ = HMS_BYPASS_PENDING.insert(key.peer(), 0, 0);
        }
    }

    #[inline(always)]
    fn sock_key(ctx: &SockOpsContext) -> SockKey {
        SockKey {
            // SAFETY: sock_ops programs may call bpf_get_netns_cookie with their context.
            netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            local_ip: byte_order::ip_from_kernel(ctx.local_ip4()),
            remote_ip: byte_order::ip_from_kernel(ctx.remote_ip4()),
            local_port: byte_order::sock_ops_local_port(ctx.local_port()),
            remote_port: byte_order::sock_ops_remote_port(ctx.remote_port()),
            _pad: 0,
        }
    }

    /// Puts this socket in `HMS_SOCKS` when the bypass is on. Both ends are needed before any
    /// byte moves; with one end only, `hms_sk_msg` finds no peer and passes the bytes to TCP.
    #[inline(always)]
    fn join_bypass(ctx: &SockOpsContext) -> bool {
        match config() {
            Some(cfg) if cfg.sk_msg_bypass != 0 => {}
            _ => return false,
        }
        let key = sock_key(ctx);
        // SAFETY: `ops` is this invocation's valid context, which the helper takes as is.
        let ops = unsafe { &mut *ctx.ops };
        HMS_SOCKS.update(key, ops as &mut bpf_sock_ops, 0).is_ok()
    }

    #[inline(always)]
    fn sock_key6(ctx: &SockOpsContext) -> SockKey6 {
        SockKey6 {
            // SAFETY: sock_ops programs may call bpf_get_netns_cookie with their context.
            netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            local_ip: local_ip6(ctx),
            remote_ip: remote_ip6(ctx),
            local_port: byte_order::sock_ops_local_port(ctx.local_port()),
            remote_port: byte_order::sock_ops_remote_port(ctx.remote_port()),
            _pad: 0,
        }
    }

    /// `join_bypass` for a real IPv6 socket, into `HMS_SOCKS6`.
    #[inline(always)]
    fn join_bypass6(ctx: &SockOpsContext) -> bool {
        match config() {
            Some(cfg) if cfg.sk_msg_bypass != 0 => {}
            _ => return false,
        }
        let key = sock_key6(ctx);
        // SAFETY: `ops` is this invocation's valid context, which the helper takes as is.
        let ops = unsafe { &mut *ctx.ops };
        HMS_SOCKS6.update(key, ops as &mut bpf_sock_ops, 0).is_ok()
    }

    /// Runs on every send of a socket in `HMS_SOCKS`: the bytes go straight into the peer
    /// socket's receive queue. Must never drop: a peer that is not in the map (one end joined,
    /// the other could not) means "send it through TCP as usual".
    #[sk_msg]
    pub fn hms_sk_msg(ctx: SkMsgContext) -> u32 {
        // SAFETY: the kernel hands every sk_msg program a valid `sk_msg_md`.
        let family = unsafe { core::ptr::read_volatile(&(*ctx.msg).family) };
        if family == AF_INET6 {
            let key6 = sk_msg_key6(&ctx);
            // Dual-stack sockets talking IPv4 (mapped) are keyed by their IPv4 addresses in
            // HMS_SOCKS, as sock_ops put them there.
            if matches!(Addr::from_v6_words(key6.remote_ip), Addr::V6(_)) {
                return sk_msg_v6(&ctx, &key6);
            }
        }
        // SAFETY: each field is read with its own width, as the verifier demands.
        let key = unsafe {
            let md = ctx.msg;
            SockKey {
                // The sender's namespace: its peer in HMS_SOCKS must be in the same one.
                netns: bpf_get_netns_cookie(ctx.as_ptr()),
                local_ip: byte_order::ip_from_kernel(core::ptr::read_volatile(&(*md).local_ip4)),
                remote_ip: byte_order::ip_from_kernel(core::ptr::read_volatile(&(*md).remote_ip4)),
                local_port: byte_order::sock_ops_local_port(core::ptr::read_volatile(
                    &(*md).local_port,
                )),
                remote_port: byte_order::sock_ops_remote_port(core::ptr::read_volatile(
                    &(*md).remote_port,
                )),
                _pad: 0,
            }
        };
        let size = u64::from(ctx.size());
        // bpf_msg_redirect_hash answers SK_DROP when the peer is missing, without marking the
        // message for redirect; returning SK_PASS then sends it the normal way.
        if HMS_SOCKS.redirect_msg(&ctx, key.peer(), u64::from(BPF_F_INGRESS)) == SK_PASS as i64 {
            count(sk_msg_stat::REDIRECTED, 1);
            count(sk_msg_stat::REDIRECTED_BYTES, size);
            count_flow_bytes(&key, size);
        } else {
            count(sk_msg_stat::PASSED, 1);
        }
        SK_PASS
    }

    #[inline(always)]
    fn sk_msg_key6(ctx: &SkMsgContext) -> SockKey6 {
        // SAFETY: valid context; each word is read with its own 4-byte width.
        unsafe {
            let md = ctx.msg;
            let w = |p: *const u32| byte_order::ip_from_kernel(core::ptr::read_volatile(p));
            SockKey6 {
                // The sender's namespace: its peer in HMS_SOCKS6 must be in the same one.
                netns: bpf_get_netns_cookie(ctx.as_ptr()),
                local_ip: [
                    w(&(*md).local_ip6[0]),
                    w(&(*md).local_ip6[1]),
                    w(&(*md).local_ip6[2]),
                    w(&(*md).local_ip6[3]),
                ],
                remote_ip: [
                    w(&(*md).remote_ip6[0]),
                    w(&(*md).remote_ip6[1]),
                    w(&(*md).remote_ip6[2]),
                    w(&(*md).remote_ip6[3]),
                ],
                local_port: byte_order::sock_ops_local_port(core::ptr::read_volatile(
                    &(*md).local_port,
                )),
                remote_port: byte_order::sock_ops_remote_port(core::ptr::read_volatile(
                    &(*md).remote_port,
                )),
                _pad: 0,
            }
        }
    }

    /// The IPv6 half of `hms_sk_msg`: the same move through `HMS_SOCKS6`, and the same
    /// counters (the connection's `HMS_BYPASS_BYTES` key holds the addresses' low 32 bits,
    /// as its flow record does).
    #[inline(always)]
    fn sk_msg_v6(ctx: &SkMsgContext, key: &SockKey6) -> u32 {
        let size = u64::from(ctx.size());
        if HMS_SOCKS6.redirect_msg(ctx, key.peer(), u64::from(BPF_F_INGRESS)) == SK_PASS as i64 {
            count(sk_msg_stat::REDIRECTED, 1);
            count(sk_msg_stat::REDIRECTED_BYTES, size);
            if let (Some(cfg), Some(c6)) = (config(), config6()) {
                let from_proxy =
                    key.local_ip == c6.outbound_ip && key.local_port == cfg.outbound_port;
                let app = if from_proxy { key.peer() } else { *key };
                add_flow_bytes(
                    FlowKey {
                        client_ip: app.local_ip[3],
                        listener_ip: app.remote_ip[3],
                        client_port: app.local_port,
                        listener_port: app.remote_port,
                        _pad: 0,
                    },
                    from_proxy,
                    size,
                );
            }
        } else {
            count(sk_msg_stat::PASSED, 1);
        }
        SK_PASS
    }

    /// Adds a bypassed send to its connection's `HMS_BYPASS_BYTES` entry, found by the app
    /// side's 4-tuple: the sender's own key when the app sent, the peer's when the proxy did.
    #[inline(always)]
    fn count_flow_bytes(key: &SockKey, size: u64) {
        let Some(cfg) = config() else { return };
        let from_proxy = key.local_ip == cfg.outbound_ip && key.local_port == cfg.outbound_port;
        let app = if from_proxy { key.peer() } else { *key };
        let flow = FlowKey {
            client_ip: app.local_ip,
            listener_ip: app.remote_ip,
            client_port: app.local_port,
            listener_port: app.remote_port,
            _pad: 0,
        };
        add_flow_bytes(flow, from_proxy, size);
    }

    #[inline(always)]
    fn add_flow_bytes(flow: FlowKey, from_proxy: bool, size: u64) {
        if let Some(bytes) = HMS_BYPASS_BYTES.get_ptr_mut(&flow) {
            // SAFETY: a live map value. Not atomic: each direction is only ever written by
            // sends on one socket, which the kernel serializes under that socket's lock.
            unsafe {
                if from_proxy {
                    (*bytes).received += size;
                } else {
                    (*bytes).sent += size;
                }
            }
        }
    }

    #[inline(always)]
    fn count(index: u32, by: u64) {
        if let Some(slot) = HMS_SK_MSG_STATS.get_ptr_mut(index) {
            // SAFETY: a live, aligned u64 of this CPU's slot; see count_drop on atomicity.
            unsafe { *slot += by };
        }
    }

    /// The proxy only knows the accepted socket's 4-tuple, not the client's cookie, so once the
    /// client side is established the record moves to a key the proxy can rebuild. On loopback
    /// this runs before the server can accept(): the client handles the SYN-ACK before it sends
    /// the ACK that completes the handshake.
    #[inline(always)]
    fn promote_to_flow(ctx: &SockOpsContext, cookie: u64, orig: &OrigDst) -> FlowKey {
        let key = FlowKey {
            client_ip: byte_order::ip_from_kernel(ctx.local_ip4()),
            listener_ip: byte_order::ip_from_kernel(ctx.remote_ip4()),
            client_port: byte_order::sock_ops_local_port(ctx.local_port()),
            listener_port: byte_order::sock_ops_remote_port(ctx.remote_port()),
            _pad: 0,
        };
        if HMS_ORIG_BY_FLOW.insert(key, *orig, 0).is_ok() && orig.protocol == IPPROTO_TCP {
            let _ = HMS_ORIG_BY_COOKIE.remove(cookie);
        }
        key
    }

    /// `promote_to_flow` for a socket that dialled a real IPv6 VIP or resolver: the record
    /// moves to the IPv6 4-tuple the proxy's IPv6 listener rebuilds. The flow record carries
    /// the low 32 bits of both addresses and `FLOW_FLAG_V6`.
    #[inline(always)]
    fn promote_v6(ctx: &SockOpsContext, cookie: u64) -> Option<(OrigDst, FlowKey, u8)> {
        // SAFETY: copied out immediately (see restore_reply_source).
        let orig6 = *unsafe { HMS_ORIG6_BY_COOKIE.get(cookie) }?;
        let (local, remote) = (local_ip6(ctx), remote_ip6(ctx));
        let client_port = byte_order::sock_ops_local_port(ctx.local_port());
        let listener_port = byte_order::sock_ops_remote_port(ctx.remote_port());
        let key = FlowKey6 {
            client_ip: local,
            listener_ip: remote,
            client_port,
            listener_port,
            _pad: 0,
        };
        if HMS_ORIG6_BY_FLOW.insert(key, orig6, 0).is_ok() && orig6.orig.protocol == IPPROTO_TCP {
            let _ = HMS_ORIG6_BY_COOKIE.remove(cookie);
        }
        let flow = FlowKey {
            client_ip: local[3],
            listener_ip: remote[3],
            client_port,
            listener_port,
            _pad: 0,
        };
        let to_dns = match (config(), config6()) {
            (Some(cfg), Some(_)) => {
                rule::is_responder(cfg, config6(), Addr::V6(remote), listener_port)
            }
            _ => false,
        };
        let flags = FLOW_FLAG_V6 | if to_dns { FLOW_FLAG_DNS } else { 0 };
        Some((orig6.orig, flow, flags))
    }

    /// DNS over TCP lands on the DNS responder, everything else on the outbound listener.
    #[inline(always)]
    fn flow_flags(flow: &FlowKey) -> u8 {
        match config() {
            Some(cfg) if flow.listener_ip == cfg.dns_ip && flow.listener_port == cfg.dns_port => {
                FLOW_FLAG_DNS
            }
            _ => 0,
        }
    }

    /// A tracked connection reached TCP_CLOSE (after FIN/ACK, a reset or a timeout): send its
    /// final counters and forget it. Runs before the kernel unhashes the socket, and the
    /// tcp_sock counters are still those of the whole connection.
    #[inline(always)]
    fn on_close(ctx: &SockOpsContext) {
        let cookie = sock_ops_cookie(ctx);
        // SAFETY: copied out immediately.
        let Some(state) = (unsafe { HMS_FLOWS.get(cookie) }) else {
            return;
        };
        let state = *state;
        let _ = HMS_FLOWS.remove(cookie);
        // SAFETY: copied out immediately.
        let bypassed = unsafe { HMS_BYPASS_BYTES.get(&state.flow) }.copied();
        if bypassed.is_some() {
            let _ = HMS_BYPASS_BYTES.remove(&state.flow);
        }
        // SAFETY: no arguments; available to every program type.
        let now = unsafe { bpf_ktime_get_ns() };
        emit(
            ctx,
            FLOW_CLOSE,
            ctx.arg(0) as u8,
            cookie,
            &state,
            now,
            bypassed.unwrap_or_default(),
        );
    }

    /// Writes one record straight into the ring buffer. If it is full (the agent is slow or not
    /// running), the record is dropped and counted; the connection is never held up.
    #[inline(always)]
    fn emit(
        ctx: &SockOpsContext,
        kind: u8,
        state_before_close: u8,
        cookie: u64,
        state: &FlowState,
        closed_ns: u64,
        bypassed: BypassBytes,
    ) {
        let Some(mut entry) = HMS_FLOW_EVENTS.reserve::<FlowEvent>(0) else {
            count_drop();
            return;
        };
        // SAFETY: `ops` is the valid context of this invocation. The tcp_sock fields read 0
        // when the socket is not a full socket (the verifier rewrites the loads to check), and
        // each is read with its own width, as the verifier demands for ctx fields.
        let (bytes_acked, bytes_received, srtt_scaled, total_retrans) = unsafe {
            let ops = ctx.ops;
            (
                core::ptr::read_volatile(&(*ops).bytes_acked),
                core::ptr::read_volatile(&(*ops).bytes_received),
                core::ptr::read_volatile(&(*ops).srtt_us),
                core::ptr::read_volatile(&(*ops).total_retrans),
            )
        };
        entry.write(FlowEvent {
            kind,
            flags: state.flags,
            state_before_close,
            _pad: [0; 5],
            cookie,
            established_ns: state.established_ns,
            closed_ns,
            flow: state.flow,
            orig: state.orig,
            bytes_acked: bytes_acked + bypassed.sent,
            bytes_received: bytes_received + bypassed.received,
            // tcp_sock.srtt_us is the smoothed RTT << 3.
            srtt_us: srtt_scaled >> 3,
            total_retrans,
        });
        entry.submit(0);
    }

    #[inline(always)]
    fn count_drop() {
        if let Some(slot) = HMS_RINGBUF_DROPS.get_ptr_mut(0) {
            // SAFETY: the map value is a live, 8-byte aligned u64 of this CPU's slot. Not an
            // atomic add (the BPF target has no Rust atomics): a softirq interrupting a
            // sock_ops run on the same CPU could lose an increment, which a counter of
            // already-lost records can afford.
            unsafe { *slot += 1 };
        }
    }
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_get_current_comm and friends are GPL-only helpers.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
