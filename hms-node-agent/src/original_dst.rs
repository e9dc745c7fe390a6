//! Where a redirected caller wanted to go. The proxy and the DNS responder ask through this
//! trait so they can be exercised without a kernel; the agent plugs in the eBPF-backed
//! `Redirector`. Both address families: the addresses given are the accepted socket's (or the
//! datagram's) as the agent sees them.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use hms_ebpf::ORIG_FLAG_V6;
pub use hms_ebpf::OrigDst;

/// A kernel record, and for a caller that dialled a real IPv6 address the whole of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Original {
    pub orig: OrigDst,
    pub ip6: Option<Ipv6Addr>,
}

impl Original {
    pub fn v4(orig: OrigDst) -> Original {
        Original { orig, ip6: None }
    }

    /// The destination as the caller dialled it (an IPv6 VIP or resolver stays IPv6).
    pub fn wanted(&self) -> SocketAddr {
        match self.ip6 {
            Some(ip6) if self.orig.flags & ORIG_FLAG_V6 != 0 => {
                SocketAddr::from((ip6, self.orig.port))
            }
            _ => SocketAddr::V4(addr(&self.orig)),
        }
    }

    /// The IPv4 VIP (and port) to look the service up by: an IPv6 VIP carries the service's
    /// IPv4 VIP in its low 32 bits, so one registry entry serves both families.
    pub fn vip(&self) -> SocketAddrV4 {
        addr(&self.orig)
    }
}

pub trait OriginalDestinations: Send + Sync {
    /// The original destination of an accepted, redirected TCP connection (consumes it).
    fn tcp(&self, client: SocketAddr, listener: SocketAddr) -> Option<Original>;
    /// The resolver a redirected UDP DNS query was sent to.
    fn udp(&self, client: SocketAddr, responder: SocketAddr) -> Option<Original>;
}

impl OriginalDestinations for crate::redirect::Redirector {
    fn tcp(&self, client: SocketAddr, listener: SocketAddr) -> Option<Original> {
        self.take_tcp_orig_dst(client, listener)
    }

    fn udp(&self, client: SocketAddr, responder: SocketAddr) -> Option<Original> {
        self.udp_orig_dst(client, responder)
    }
}

/// The caller's `comm` as text.
pub fn comm(orig: &OrigDst) -> String {
    let end = orig
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(orig.comm.len());
    String::from_utf8_lossy(&orig.comm[..end]).into_owned()
}

/// The original destination as an IPv4 socket address (for an IPv6 one, its low 32 bits).
pub fn addr(orig: &OrigDst) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(orig.ip), orig.port)
}

/// Host-order words (as the kernel records hold them) to an address, and back.
pub fn ipv6_from_words(w: [u32; 4]) -> Ipv6Addr {
    let mut b = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    Ipv6Addr::from(b)
}

pub fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let b = ip.octets();
    std::array::from_fn(|i| {
        u32::from_be_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_an_ipv6_vip_keeps_its_ipv4_vip() {
        let ip: Ipv6Addr = "fd48:4d53::7f4d:304".parse().unwrap();
        assert_eq!(ipv6_words(ip), [0xfd48_4d53, 0, 0, 0x7f4d_0304]);
        assert_eq!(ipv6_from_words(ipv6_words(ip)), ip);
        let o = Original {
            orig: OrigDst {
                ip: 0x7f4d_0304,
                port: 80,
                flags: ORIG_FLAG_V6,
                ..OrigDst::default()
            },
            ip6: Some(ip),
        };
        assert_eq!(o.wanted(), "[fd48:4d53::7f4d:304]:80".parse().unwrap());
        assert_eq!(o.vip(), "127.77.3.4:80".parse().unwrap());
    }
}
