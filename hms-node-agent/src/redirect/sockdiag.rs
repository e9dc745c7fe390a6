//! Finding a local socket's cookie from its 4-tuple with a `NETLINK_SOCK_DIAG` exact lookup.
//!
//! Owns the request/reply encoding. Must never dump socket tables (one exact lookup per call,
//! so the cost does not grow with the number of sockets on the host) and never block for long
//! (a receive timeout bounds every lookup).
//!
//! Written by hand with libc rather than with netlink-packet-sock-diag: it is one fixed-size
//! request and one fixed-layout reply, and the hand-written bytes keep the two kernel quirks
//! (below) visible in one place instead of behind a generic message model.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// Which transport table to search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp,
    Udp,
}

// linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_NOCOOKIE: u32 = !0;
const ALL_STATES: u32 = !0;
/// Offsets inside `struct inet_diag_msg` (after the netlink header).
const DIAG_MSG_ID_OFFSET: usize = 4;
const DIAG_MSG_COOKIE_OFFSET: usize = DIAG_MSG_ID_OFFSET + 2 + 2 + 16 + 16 + 4;
const DIAG_MSG_MIN_LEN: usize = DIAG_MSG_COOKIE_OFFSET + 8;
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// The cookie (`bpf_get_socket_cookie`'s value) of the socket bound at `local` talking to
/// `remote`; `Ok(None)` if no such socket exists. Both addresses are of one family, which is
/// the table searched. An `AF_INET6` dual-stack socket talking IPv4 (a mapped destination)
/// is found by its IPv4 addresses: the kernel's IPv4 lookup matches such sockets too.
pub(crate) fn socket_cookie(
    transport: Transport,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<Option<u64>> {
    if local.is_ipv4() != remote.is_ipv4() {
        return Ok(None);
    }
    let socket = open()?;
    // Quirk 1: the kernel's exact lookup reads the request's src/dst as the *packet's*
    // source/destination for UDP (udp_dump_one: "src and dst are swapped for historical
    // reasons") but as the socket's local/remote for TCP. Try the documented order first and
    // the other if nothing matched, so a kernel that ever straightens this out still works.
    let (first, second) = match transport {
        Transport::Tcp => ((local, remote), (remote, local)),
        Transport::Udp => ((remote, local), (local, remote)),
    };
    for (seq, (src, dst)) in [(1u32, first), (2u32, second)] {
        if let Some(cookie) = lookup(&socket, transport, src, dst, seq, local.port())? {
            return Ok(Some(cookie));
        }
    }
    Ok(None)
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: LOOKUP_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: valid fd, pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The 16 address bytes of `inet_diag_sockid` (IPv4 in the first four).
fn addr_bytes(a: &SocketAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        SocketAddr::V4(v4) => out[..4].copy_from_slice(&v4.ip().octets()),
        SocketAddr::V6(v6) => out = v6.ip().octets(),
    }
    out
}

fn encode_request(transport: Transport, src: SocketAddr, dst: SocketAddr, seq: u32) -> Vec<u8> {
    let total = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;
    let mut buf = Vec::with_capacity(total);
    // struct nlmsghdr (host order).
    buf.extend_from_slice(&(total as u32).to_ne_bytes());
    buf.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    // Quirk 2: no NLM_F_DUMP. With it the kernel walks the whole table; without it, it does
    // the exact 4-tuple lookup we want.
    buf.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2.
    let protocol = match transport {
        Transport::Tcp => libc::IPPROTO_TCP,
        Transport::Udp => libc::IPPROTO_UDP,
    };
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    buf.push(family as u8);
    buf.push(protocol as u8);
    buf.push(0); // idiag_ext: no extra attributes
    buf.push(0); // pad
    buf.extend_from_slice(&ALL_STATES.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order.
    buf.extend_from_slice(&src.port().to_be_bytes());
    buf.extend_from_slice(&dst.port().to_be_bytes());
    buf.extend_from_slice(&addr_bytes(&src));
    buf.extend_from_slice(&addr_bytes(&dst));
    buf.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    buf.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    buf.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    debug_assert_eq!(buf.len(), total);
    buf
}

fn lookup(
    socket: &OwnedFd,
    transport: Transport,
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    want_local_port: u16,
) -> io::Result<Option<u64>> {
    let req = encode_request(transport, src, dst, seq);
    super::netlink::send_to_kernel(socket, &req)?;
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: valid fd and a writable buffer of the given length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        match parse_reply(&buf[..n as usize], seq, want_local_port)? {
            Reply::Cookie(cookie) => return Ok(Some(cookie)),
            Reply::NotFound => return Ok(None),
            Reply::NotOurs => continue,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Cookie(u64),
    NotFound,
    /// A reply to an earlier sequence number (after a timeout); keep reading.
    NotOurs,
}

fn parse_reply(mut buf: &[u8], seq: u32, want_local_port: u16) -> io::Result<Reply> {
    let mut saw_ours = false;
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap_or_default());
        let msg_seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap_or_default());
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated sock_diag reply",
            ));
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        if msg_seq == seq {
            saw_ours = true;
            if kind == NLMSG_ERROR && payload.len() >= 4 {
                let errno = -i32::from_ne_bytes(payload[0..4].try_into().unwrap_or_default());
                return match errno {
                    0 => Ok(Reply::NotFound),
                    libc::ENOENT => Ok(Reply::NotFound),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            if kind == SOCK_DIAG_BY_FAMILY && payload.len() >= DIAG_MSG_MIN_LEN {
                let sport = u16::from_be_bytes([
                    payload[DIAG_MSG_ID_OFFSET],
                    payload[DIAG_MSG_ID_OFFSET + 1],
                ]);
                if sport != want_local_port {
                    return Ok(Reply::NotFound);
                }
                let c = &payload[DIAG_MSG_COOKIE_OFFSET..DIAG_MSG_COOKIE_OFFSET + 8];
                let lo = u32::from_ne_bytes(c[0..4].try_into().unwrap_or_default());
                let hi = u32::from_ne_bytes(c[4..8].try_into().unwrap_or_default());
                return Ok(Reply::Cookie(u64::from(lo) | (u64::from(hi) << 32)));
            }
        }
        // Netlink messages are 4-byte aligned.
        let advance = (len + 3) & !3;
        buf = &buf[advance.min(buf.len())..];
    }
    Ok(if saw_ours {
        Reply::NotFound
    } else {
        Reply::NotOurs
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, UdpSocket};

    #[test]
    fn request_has_the_kernel_layout() {
        let src = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 0x1234));
        let dst = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 53));
        let req = encode_request(Transport::Udp, src, dst, 7);
        assert_eq!(req.len(), 72);
        assert_eq!(&req[16..20], &[libc::AF_INET as u8, 17, 0, 0]);
        assert_eq!(&req[20..24], &ALL_STATES.to_ne_bytes());
        assert_eq!(&req[24..26], &[0x12, 0x34]);
        assert_eq!(&req[26..28], &[0, 53]);
        assert_eq!(&req[28..32], &[127, 0, 0, 1]);
        assert_eq!(&req[44..48], &[127, 0, 0, 2]);
        assert_eq!(&req[64..72], &[0xff; 8]);
    }

    #[test]
    fn error_reply_enoent_is_not_found() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&36u32.to_ne_bytes());
        msg.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&9u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        msg.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_reply(&msg, 9, 1).ok(), Some(Reply::NotFound));
        assert_eq!(parse_reply(&msg, 8, 1).ok(), Some(Reply::NotOurs));
    }

    /// Needs no privileges: sock_diag exact lookups are open to every user.
    #[test]
    fn finds_a_live_udp_socket_and_not_a_missing_one() {
        for (c, s) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let client = UdpSocket::bind(c).expect("bind client");
            let server = UdpSocket::bind(s).expect("bind server");
            let (c, s) = (
                client.local_addr().expect("addr"),
                server.local_addr().expect("addr"),
            );
            client.connect(s).expect("connect");
            let cookie = socket_cookie(Transport::Udp, c, s).expect("lookup");
            assert!(
                matches!(cookie, Some(v) if v != 0),
                "got {cookie:?} for {c}"
            );
            drop(client);
            assert_eq!(socket_cookie(Transport::Udp, c, s).expect("lookup"), None);
        }
    }
}
