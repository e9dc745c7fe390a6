//! The one raw netlink step both of the agent's netlink users share (`sockdiag` asks for
//! socket cookies, `local_route` adds and removes the IPv6 VIP route): sending a request to
//! the kernel. Hand-written, like the messages themselves: two fixed requests do not justify
//! a netlink crate and its dependency tree. Owns no socket and never parses answers.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Sends `msg` to the kernel (nl_pid 0) on netlink socket `fd`.
pub(super) fn send_to_kernel(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_nl with nl_pid 0 addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid fd, buffer and address for the duration of the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
