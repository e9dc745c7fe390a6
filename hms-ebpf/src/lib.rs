//! The ABI between the HMS kernel programs and the agent: map names, program names and the
//! `#[repr(C)]` records stored in maps. Defined once here; both sides use these types.
//!
//! Byte order rule: every address and port stored in a map is in **host order**. The kernel
//! hands us network order (and, for `bpf_sock_ops.remote_port`, a port shifted into the upper
//! 16 bits); the functions in [`byte_order`] are the only place that converts.
#![cfg_attr(not(test), no_std)]

pub mod byte_order;

/// Names of the maps, as declared in `main.rs` and pinned under the agent's pin directory.
pub mod map_names {
    pub const CONFIG: &str = "HMS_CONFIG";
    pub const ORIG_BY_COOKIE: &str = "HMS_ORIG_BY_COOKIE";
    pub const ORIG_BY_FLOW: &str = "HMS_ORIG_BY_FLOW";
}

/// Names of the programs (the functions in `main.rs`).
pub mod program_names {
    pub const CONNECT4: &str = "hms_connect4";
    pub const SENDMSG4: &str = "hms_sendmsg4";
    pub const RECVMSG4: &str = "hms_recvmsg4";
    pub const SOCK_OPS: &str = "hms_sock_ops";
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
    pub _pad: u32,
    pub cgroup_id: u64,
    /// Caller's `comm`, NUL-padded.
    pub comm: [u8; 16],
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

pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
pub const DNS_PORT: u16 = 53;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding fields, valid for any bit pattern.
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
}
