//! Loopback ports for tests and the bench that hand them to an agent or a server to bind.
//! Shared by xtask (the bench) and vm-tests (`#[path]`), so both follow one rule; std only.
//!
//! Ports come from below the kernel's ephemeral range, never from it: a port picked with
//! `bind(:0)` and released is an ephemeral one, and any test's own client connection may
//! take it as its source port before the agent binds it (seen: "binding the DNS responder
//! ...: Address already in use"). The kernel never hands out ports outside the range on its
//! own, so a port found free there stays free until a test binds it. Each test process
//! starts at its own offset (from its pid), so two suites on one machine (a CI root beside a
//! developer's run) rarely probe the same ports; a port that is taken is skipped.

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports below this are left to well-known services.
const LOWEST: u16 = 10_000;

/// The kernel's ephemeral range (`net.ipv4.ip_local_port_range`), Linux's default if unreadable.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// The pool: [LOWEST, start of the ephemeral range), or above its end when that is larger.
fn pool() -> (u16, u16) {
    let (lo, hi) = ephemeral_range();
    let below = lo.saturating_sub(LOWEST);
    let above = u16::MAX - hi;
    if below >= above {
        (LOWEST, lo)
    } else {
        (hi + 1, u16::MAX)
    }
}

/// A port outside the ephemeral range, free for both TCP and UDP on 127.0.0.1 when asked,
/// and never handed out twice by this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (start, end) = pool();
    let size = u32::from(end - start);
    // First call: this process's own offset into the pool.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % size,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..size {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % size;
        let port = start + n as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port between {start} and {end}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let (lo, hi) = ephemeral_range();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = free_port();
            assert!(!(lo..=hi).contains(&p), "{p} is ephemeral ({lo}-{hi})");
            assert!(p >= LOWEST);
            assert!(seen.insert(p), "{p} handed out twice");
        }
    }
}
