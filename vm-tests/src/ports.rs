//! Loopback ports and unique names, so tests in one binary can run in parallel. The port
//! rule (never from the kernel's ephemeral range) lives in xtask's `loopback_ports.rs`,
//! included here as it is, so the bench and the tests share it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};

#[path = "../../xtask/src/loopback_ports.rs"]
mod loopback_ports;

pub use loopback_ports::free_port;

pub fn free_addr() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port())
}

/// A process-unique small number, for names and address blocks.
pub fn unique() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
