//! The IPv6 VIP prefix as a `local` route on `lo` (what `ip -6 route add local PREFIX/96 dev
//! lo table local` does), so a connect to an IPv6 VIP that misses the hooks (a process outside
//! the redirected cgroup) is answered by this host's stack, ECONNREFUSED, and no packet ever
//! leaves the host. The IPv4 VIPs need nothing: 127.0.0.0/8 is local already.
//!
//! Owns the one `RTM_NEWROUTE`/`RTM_DELROUTE` request. Must never touch a route other than
//! `local PREFIX/96 dev lo` in the local table. Written by hand like `sockdiag`: one fixed
//! request and an ack.

use std::{
    io,
    net::Ipv6Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::Context as _;

// linux/netlink.h, linux/rtnetlink.h.
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const PREFIX_LEN: u8 = 96;

/// Adds the route; one that exists already (another agent on this host) is fine.
pub(crate) fn add(prefix: Ipv6Addr) -> anyhow::Result<()> {
    match request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, prefix) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("adding route local {prefix}/96 dev lo")),
    }
}

/// Removes the route; a missing one is fine.
pub(crate) fn remove(prefix: Ipv6Addr) -> anyhow::Result<()> {
    match request(RTM_DELROUTE, 0, prefix) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing route local {prefix}/96 dev lo")),
    }
}

fn encode(kind: u16, flags: u16, prefix: Ipv6Addr, lo: u32) -> Vec<u8> {
    let total = 16 + 12 + (4 + 16) + (4 + 4);
    let mut buf = Vec::with_capacity(total);
    // struct nlmsghdr.
    buf.extend_from_slice(&(total as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct rtmsg.
    buf.extend_from_slice(&[
        libc::AF_INET6 as u8,
        PREFIX_LEN,
        0,
        0,
        RT_TABLE_LOCAL,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ]);
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // RTA_DST, RTA_OIF.
    buf.extend_from_slice(&20u16.to_ne_bytes());
    buf.extend_from_slice(&RTA_DST.to_ne_bytes());
    buf.extend_from_slice(&prefix.octets());
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&RTA_OIF.to_ne_bytes());
    buf.extend_from_slice(&lo.to_ne_bytes());
    debug_assert_eq!(buf.len(), total);
    buf
}

fn request(kind: u16, flags: u16, prefix: Ipv6Addr) -> io::Result<()> {
    // SAFETY: a NUL-terminated literal.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = encode(kind, flags, prefix, lo);
    super::netlink::send_to_kernel(&fd, &req)?;
    let mut buf = [0u8; 1024];
    // SAFETY: valid fd and buffer. The kernel acks route requests synchronously.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(io::Error::other("unexpected rtnetlink reply"));
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(-errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_has_the_kernel_layout() {
        let p: Ipv6Addr = "fd48:4d53::".parse().unwrap();
        let req = encode(RTM_NEWROUTE, NLM_F_CREATE, p, 1);
        assert_eq!(req.len(), 56);
        assert_eq!(&req[16..24], &[10, 96, 0, 0, 255, 4, 254, 2]);
        assert_eq!(&req[32..36], &[0xfd, 0x48, 0x4d, 0x53]);
        assert_eq!(&req[52..56], &1u32.to_ne_bytes());
    }
}
