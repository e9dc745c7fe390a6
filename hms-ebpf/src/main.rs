//! HMS kernel programs: the cgroup socket hooks that steer an unmodified app's traffic to the
//! node agent, and remember where it really wanted to go.
//!
//! Owns: the redirect decisions (VIP -> outbound listener, port 53 -> DNS responder), the
//! original-destination records (by socket cookie, promoted to a 4-tuple in sock_ops) and the
//! restoration of a DNS reply's source address.
//! Must never: drop or refuse a socket operation (every hook returns "allow"; a missing config
//! or a full map means "leave the socket alone"), or redirect a socket carrying the agent's
//! skip mark (that is how the agent's own upstream DNS avoids looping back into itself).
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
        bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid,
            generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
        },
        macros::{cgroup_sock_addr, map, sock_ops},
        maps::{Array, LruHashMap},
        programs::{SockAddrContext, SockOpsContext},
    };
    use aya_log_ebpf::debug;
    use hms_ebpf::{
        DNS_PORT, FlowKey, IPPROTO_TCP, IPPROTO_UDP, OrigDst, RedirectConfig, byte_order,
    };

    /// cgroup sock_addr programs: 1 lets the syscall proceed (0 would fail it with EPERM).
    const SOCK_ADDR_ALLOW: i32 = 1;
    /// sock_ops programs: the return value is ignored for the callbacks we handle; 1 is the
    /// conventional "ok".
    const SOCK_OPS_OK: u32 = 1;
    /// Enough for the connections of a busy host between connect() and the proxy's accept();
    /// LRU so a record nobody collects (client gave up, proxy down) ages out instead of
    /// filling the map.
    const ORIG_DST_ENTRIES: u32 = 65536;

    #[map(name = "HMS_CONFIG")]
    static HMS_CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);

    #[map(name = "HMS_ORIG_BY_COOKIE")]
    static HMS_ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    #[map(name = "HMS_ORIG_BY_FLOW")]
    static HMS_ORIG_BY_FLOW: LruHashMap<FlowKey, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

    /// A socket address as the hook sees it, in host order.
    #[derive(Clone, Copy)]
    struct Dest {
        ip: u32,
        port: u16,
    }

    #[inline(always)]
    fn config() -> Option<&'static RedirectConfig> {
        let cfg = HMS_CONFIG.get(0)?;
        if cfg.enabled == 0 { None } else { Some(cfg) }
    }

    #[inline(always)]
    fn dest(ctx: &SockAddrContext) -> Dest {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let (ip, port) = unsafe {
            let sa = ctx.sock_addr;
            (
                core::ptr::read_volatile(&(*sa).user_ip4),
                core::ptr::read_volatile(&(*sa).user_port),
            )
        };
        Dest {
            ip: byte_order::ip_from_kernel(ip),
            port: byte_order::sock_addr_port_from_kernel(port),
        }
    }

    #[inline(always)]
    fn set_dest(ctx: &SockAddrContext, to: Dest) {
        // SAFETY: user_ip4/user_port are writable with 4-byte stores in connect4, sendmsg4 and
        // recvmsg4 (the verifier enforces the width; read_volatile/write_volatile keep LLVM
        // from narrowing them).
        unsafe {
            let sa = ctx.sock_addr;
            core::ptr::write_volatile(&mut (*sa).user_ip4, byte_order::ip_to_kernel(to.ip));
            core::ptr::write_volatile(
                &mut (*sa).user_port,
                byte_order::sock_addr_port_to_kernel(to.port),
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

    #[inline(always)]
    fn socket_cookie(ctx: &SockAddrContext) -> u64 {
        // SAFETY: bpf_get_socket_cookie is allowed for sock_addr programs with their ctx.
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    }

    /// Who is calling and where it wanted to go. Runs in the caller's process context
    /// (connect/sendmsg syscalls), so "current" is the caller.
    #[inline(always)]
    fn orig_dst(to: Dest, protocol: u16) -> OrigDst {
        OrigDst {
            ip: to.ip,
            port: to.port,
            protocol,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            _pad: 0,
            // SAFETY: no arguments; allowed in cgroup sock_addr programs.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        }
    }

    /// What a socket's destination should become, if anything.
    #[derive(Clone, Copy)]
    enum Redirect {
        ToOutbound,
        ToDns,
    }

    #[inline(always)]
    fn decide(cfg: &RedirectConfig, to: Dest, protocol: u16, udp_only: bool) -> Option<Redirect> {
        if !udp_only && protocol == IPPROTO_TCP && to.ip & cfg.vip_mask == cfg.vip_net {
            return Some(Redirect::ToOutbound);
        }
        let dns_proto = protocol == IPPROTO_UDP || (!udp_only && protocol == IPPROTO_TCP);
        let is_responder = to.ip == cfg.dns_ip && to.port == cfg.dns_port;
        if dns_proto && to.port == DNS_PORT && !is_responder {
            return Some(Redirect::ToDns);
        }
        None
    }

    /// Shared by connect4 and sendmsg4: record the original destination under the socket's
    /// cookie, then rewrite. If the record cannot be stored we still redirect: the proxy then
    /// sees an unknown connection and refuses it, which is louder than silently bypassing it.
    #[inline(always)]
    fn redirect(ctx: &SockAddrContext, udp_only: bool) {
        let Some(cfg) = config() else { return };
        if carries_skip_mark(ctx, cfg) {
            return;
        }
        let to = dest(ctx);
        let protocol = protocol(ctx);
        let Some(decision) = decide(cfg, to, protocol, udp_only) else {
            return;
        };
        let record = orig_dst(to, protocol);
        let _ = HMS_ORIG_BY_COOKIE.insert(socket_cookie(ctx), record, 0);
        let new = match decision {
            Redirect::ToOutbound => Dest {
                ip: cfg.outbound_ip,
                port: cfg.outbound_port,
            },
            Redirect::ToDns => Dest {
                ip: cfg.dns_ip,
                port: cfg.dns_port,
            },
        };
        set_dest(ctx, new);
        debug!(
            ctx,
            "hms: pid {} {:i}:{} -> {:i}:{}", record.pid, to.ip, to.port, new.ip, new.port
        );
    }

    #[cgroup_sock_addr(connect4)]
    pub fn hms_connect4(ctx: SockAddrContext) -> i32 {
        redirect(&ctx, false);
        SOCK_ADDR_ALLOW
    }

    /// Unconnected UDP (sendto with an address). Connected UDP went through connect4 already.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn hms_sendmsg4(ctx: SockAddrContext) -> i32 {
        redirect(&ctx, true);
        SOCK_ADDR_ALLOW
    }

    /// A resolver (glibc, dig) drops a reply whose source is not the server it asked, so the
    /// responder's address is swapped back for the one recorded at send time.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn hms_recvmsg4(ctx: SockAddrContext) -> i32 {
        restore_reply_source(&ctx);
        SOCK_ADDR_ALLOW
    }

    #[inline(always)]
    fn restore_reply_source(ctx: &SockAddrContext) {
        let Some(cfg) = config() else { return };
        let from = dest(ctx);
        if from.ip != cfg.dns_ip || from.port != cfg.dns_port {
            return;
        }
        // SAFETY: the value is copied out immediately; an LRU eviction racing with us can at
        // worst give a stale record for this very cookie.
        let Some(orig) = (unsafe { HMS_ORIG_BY_COOKIE.get(socket_cookie(ctx)) }) else {
            return;
        };
        if orig.protocol != IPPROTO_UDP {
            return;
        }
        let orig = Dest {
            ip: orig.ip,
            port: orig.port,
        };
        set_dest(ctx, orig);
    }

    #[sock_ops]
    pub fn hms_sock_ops(ctx: SockOpsContext) -> u32 {
        // One arm per callback; flow-record callbacks (state changes, RTT) slot in here.
        if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            promote_to_flow(&ctx);
        }
        SOCK_OPS_OK
    }

    /// The proxy only knows the accepted socket's 4-tuple, not the client's cookie, so once the
    /// client side is established the record moves to a key the proxy can rebuild. On loopback
    /// this runs before the server can accept(): the client handles the SYN-ACK before it sends
    /// the ACK that completes the handshake.
    #[inline(always)]
    fn promote_to_flow(ctx: &SockOpsContext) {
        // SAFETY: bpf_get_socket_cookie is allowed for sock_ops programs with their ctx.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: copied out immediately (see restore_reply_source).
        let Some(orig) = (unsafe { HMS_ORIG_BY_COOKIE.get(cookie) }) else {
            return;
        };
        let orig = *orig;
        let key = FlowKey {
            client_ip: byte_order::ip_from_kernel(ctx.local_ip4()),
            listener_ip: byte_order::ip_from_kernel(ctx.remote_ip4()),
            client_port: byte_order::sock_ops_local_port(ctx.local_port()),
            listener_port: byte_order::sock_ops_remote_port(ctx.remote_port()),
            _pad: 0,
        };
        if HMS_ORIG_BY_FLOW.insert(key, orig, 0).is_ok() && orig.protocol == IPPROTO_TCP {
            let _ = HMS_ORIG_BY_COOKIE.remove(cookie);
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
