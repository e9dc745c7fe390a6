//! The one description of "what is redirected, and where to", shared by the IPv4 hooks
//! (`connect4`, `sendmsg4`, `recvmsg4`) and the IPv6 hooks (`connect6`, `sendmsg6`,
//! `recvmsg6`) so the two families cannot drift apart. Pure functions over host-order values:
//! the kernel programs call them, and the host's unit tests check them.
//!
//! Owns: which destinations are VIPs (the IPv4 range; its IPv4-mapped form `::ffff:a.b.c.d`;
//! the IPv6 VIP range, a /96 whose low 32 bits are the service's IPv4 VIP), which traffic is
//! DNS (UDP, or TCP from connect, to port 53, except to the responder itself), and the address
//! a redirected socket is sent to (same family as the one it dialled: an IPv4 or mapped
//! destination goes to the IPv4 listeners, written back in mapped form on an `AF_INET6`
//! socket; a real IPv6 destination goes to the IPv6 listeners, so `IPV6_V6ONLY` sockets work).
//! Must never: decide anything from the socket's family alone (a dual-stack `AF_INET6` socket
//! dialling a mapped VIP is an IPv4 caller), or redirect real IPv6 when the agent has not
//! turned IPv6 on (`RedirectConfig6::enabled`).

use crate::{DNS_PORT, IPPROTO_TCP, IPPROTO_UDP, RedirectConfig, RedirectConfig6};

/// A destination address in host order. IPv4-mapped IPv6 addresses are IPv4 here: that is
/// what the kernel sends them as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    V4(u32),
    /// Four host-order words, most significant first (`fd68:6d73::1` is
    /// `[0xfd68_6d73, 0, 0, 1]`).
    V6([u32; 4]),
}

/// `::ffff:0:0/96`, the third word of an IPv4-mapped address.
const MAPPED_WORD: u32 = 0x0000_ffff;

impl Addr {
    /// From the four host-order words of an `AF_INET6` address; `::ffff:a.b.c.d` becomes V4.
    #[inline(always)]
    pub fn from_v6_words(w: [u32; 4]) -> Addr {
        if w[0] == 0 && w[1] == 0 && w[2] == MAPPED_WORD {
            Addr::V4(w[3])
        } else {
            Addr::V6(w)
        }
    }

    /// The four words an `AF_INET6` socket address holds for this address (mapped for V4).
    #[inline(always)]
    pub fn v6_words(self) -> [u32; 4] {
        match self {
            Addr::V4(ip) => [0, 0, MAPPED_WORD, ip],
            Addr::V6(w) => w,
        }
    }
}

/// Where a redirected socket goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The outbound proxy: a TCP connect to a VIP.
    Outbound,
    /// The DNS responder: UDP, or TCP connect, to port 53.
    Dns,
}

/// The IPv6 settings, if the agent turned IPv6 on.
#[inline(always)]
pub fn v6_enabled(cfg6: Option<&RedirectConfig6>) -> Option<&RedirectConfig6> {
    match cfg6 {
        Some(c) if c.enabled != 0 => Some(c),
        _ => None,
    }
}

/// Whether `addr` is a VIP: in the IPv4 range (plain or mapped), or in the IPv6 range with
/// low 32 bits in the IPv4 range.
#[inline(always)]
pub fn is_vip(cfg: &RedirectConfig, cfg6: Option<&RedirectConfig6>, addr: Addr) -> bool {
    match addr {
        Addr::V4(ip) => ip & cfg.vip_mask == cfg.vip_net,
        Addr::V6(w) => match v6_enabled(cfg6) {
            Some(c6) => {
                w[0] == c6.vip_prefix[0]
                    && w[1] == c6.vip_prefix[1]
                    && w[2] == c6.vip_prefix[2]
                    && w[3] & cfg.vip_mask == cfg.vip_net
            }
            None => false,
        },
    }
}

/// Whether `addr:port` is the DNS responder of that family (its replies are what recvmsg
/// restores, and a query sent straight to it must not be redirected again).
#[inline(always)]
pub fn is_responder(
    cfg: &RedirectConfig,
    cfg6: Option<&RedirectConfig6>,
    addr: Addr,
    port: u16,
) -> bool {
    if port != cfg.dns_port {
        return false;
    }
    match addr {
        Addr::V4(ip) => ip == cfg.dns_ip,
        Addr::V6(w) => match v6_enabled(cfg6) {
            Some(c6) => w == c6.dns_ip,
            None => false,
        },
    }
}

/// The redirect decision. `udp_only`: sendmsg hooks (unconnected UDP) never redirect TCP.
#[inline(always)]
pub fn decide(
    cfg: &RedirectConfig,
    cfg6: Option<&RedirectConfig6>,
    to: Addr,
    port: u16,
    protocol: u16,
    udp_only: bool,
) -> Option<Target> {
    if let Addr::V6(_) = to
        && v6_enabled(cfg6).is_none()
    {
        return None;
    }
    if !udp_only && protocol == IPPROTO_TCP && is_vip(cfg, cfg6, to) {
        return Some(Target::Outbound);
    }
    let dns_proto = protocol == IPPROTO_UDP || (!udp_only && protocol == IPPROTO_TCP);
    if dns_proto && port == DNS_PORT && !is_responder(cfg, cfg6, to, port) {
        return Some(Target::Dns);
    }
    None
}

/// Destinations a refusal of undeclared egress never touches: loopback (127/8, `::1`),
/// the unspecified address (a connect to the host itself), and VIPs (a UDP connect to a VIP
/// is not redirected but is the mesh's own address). Declared externals are the map's
/// business, not this rule's.
#[inline(always)]
pub fn egress_exempt(cfg: &RedirectConfig, cfg6: Option<&RedirectConfig6>, to: Addr) -> bool {
    let local = match to {
        Addr::V4(ip) => ip >> 24 == 127 || ip == 0,
        Addr::V6(w) => w[0] == 0 && w[1] == 0 && w[2] == 0 && (w[3] == 1 || w[3] == 0),
    };
    local || is_vip(cfg, cfg6, to)
}

/// The address and port a socket that dialled `to` is sent to for `target`: the listener of
/// the same family. `None` only for real IPv6 with IPv6 off (which [`decide`] never picks).
#[inline(always)]
pub fn target_addr(
    cfg: &RedirectConfig,
    cfg6: Option<&RedirectConfig6>,
    to: Addr,
    target: Target,
) -> Option<(Addr, u16)> {
    let port = match target {
        Target::Outbound => cfg.outbound_port,
        Target::Dns => cfg.dns_port,
    };
    let addr = match to {
        Addr::V4(_) => Addr::V4(match target {
            Target::Outbound => cfg.outbound_ip,
            Target::Dns => cfg.dns_ip,
        }),
        Addr::V6(_) => {
            let c6 = v6_enabled(cfg6)?;
            Addr::V6(match target {
                Target::Outbound => c6.outbound_ip,
                Target::Dns => c6.dns_ip,
            })
        }
    };
    Some((addr, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: u32 = 0x7f4d_0304; // 127.77.3.4
    const PREFIX: [u32; 3] = [0xfd68_6d73, 0, 0];

    fn cfg() -> RedirectConfig {
        RedirectConfig {
            vip_net: 0x7f4d_0000,
            vip_mask: 0xffff_0000,
            outbound_ip: 0x7f00_0001,
            dns_ip: 0x7f00_0001,
            outbound_port: 15001,
            dns_port: 15053,
            skip_mark: 0x4853,
            enabled: 1,
            sk_msg_bypass: 0,
            netns_cookie: 0,
        }
    }

    fn cfg6() -> RedirectConfig6 {
        RedirectConfig6 {
            vip_prefix: PREFIX,
            outbound_ip: [0, 0, 0, 1],
            dns_ip: [0, 0, 0, 1],
            enabled: 1,
        }
    }

    #[test]
    fn loopback_unspecified_and_vips_are_exempt_from_egress_refusal() {
        let (c, c6) = (cfg(), cfg6());
        for exempt in [
            Addr::V4(0x7f00_0001),
            Addr::V4(0x7f0a_0b0c),
            Addr::V4(0),
            Addr::V4(VIP),
            Addr::from_v6_words([0, 0, 0xffff, 0x7f00_0001]),
            Addr::V6([0, 0, 0, 1]),
            Addr::V6([0, 0, 0, 0]),
            Addr::V6([PREFIX[0], PREFIX[1], PREFIX[2], VIP]),
        ] {
            assert!(egress_exempt(&c, Some(&c6), exempt), "{exempt:?}");
        }
        for outside in [
            Addr::V4(0x0a62_0002),
            Addr::from_v6_words([0, 0, 0xffff, 0x0a62_0002]),
            Addr::V6([0xfd98_0000, 0, 0, 2]),
            Addr::V6([0, 0, 0, 2]),
        ] {
            assert!(!egress_exempt(&c, Some(&c6), outside), "{outside:?}");
        }
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let mapped = Addr::from_v6_words([0, 0, 0xffff, VIP]);
        assert_eq!(mapped, Addr::V4(VIP));
        assert_eq!(mapped.v6_words(), [0, 0, 0xffff, VIP]);
        assert_eq!(Addr::from_v6_words([0, 0, 0, 1]), Addr::V6([0, 0, 0, 1]));
    }

    #[test]
    fn a_mapped_vip_goes_to_the_ipv4_listener_in_mapped_form() {
        let to = Addr::from_v6_words([0, 0, 0xffff, VIP]);
        let (c, c6) = (cfg(), cfg6());
        assert_eq!(
            decide(&c, None, to, 80, IPPROTO_TCP, false),
            Some(Target::Outbound)
        );
        let (addr, port) = target_addr(&c, Some(&c6), to, Target::Outbound).unwrap();
        assert_eq!(
            (addr.v6_words(), port),
            ([0, 0, 0xffff, 0x7f00_0001], 15001)
        );
    }

    #[test]
    fn a_v6_vip_goes_to_the_ipv6_listener_only_when_ipv6_is_on() {
        let to = Addr::V6([PREFIX[0], PREFIX[1], PREFIX[2], VIP]);
        let (c, mut c6) = (cfg(), cfg6());
        assert_eq!(
            decide(&c, Some(&c6), to, 8080, IPPROTO_TCP, false),
            Some(Target::Outbound)
        );
        assert_eq!(
            target_addr(&c, Some(&c6), to, Target::Outbound),
            Some((Addr::V6([0, 0, 0, 1]), 15001))
        );
        // Outside the IPv4 range in the low bits, or another prefix: not a VIP.
        let low_outside = Addr::V6([PREFIX[0], 0, 0, 0x0a00_0001]);
        assert_eq!(
            decide(&c, Some(&c6), low_outside, 80, IPPROTO_TCP, false),
            None
        );
        let other_prefix = Addr::V6([0xfd00_0000, 0, 0, VIP]);
        assert_eq!(
            decide(&c, Some(&c6), other_prefix, 80, IPPROTO_TCP, false),
            None
        );
        c6.enabled = 0;
        assert_eq!(decide(&c, Some(&c6), to, 80, IPPROTO_TCP, false), None);
        assert_eq!(decide(&c, None, to, 80, IPPROTO_TCP, false), None);
    }

    #[test]
    fn port_53_is_dns_in_both_families_but_not_the_responder() {
        let (c, c6) = (cfg(), cfg6());
        let v6_resolver = Addr::V6([0xfd00_0000, 0, 0, 0x53]);
        let mapped_resolver = Addr::from_v6_words([0, 0, 0xffff, 0x7f00_0035]);
        for to in [v6_resolver, mapped_resolver, Addr::V4(0x0a00_0001)] {
            assert_eq!(
                decide(&c, Some(&c6), to, 53, IPPROTO_UDP, true),
                Some(Target::Dns)
            );
            assert_eq!(
                decide(&c, Some(&c6), to, 53, IPPROTO_TCP, false),
                Some(Target::Dns)
            );
            // sendmsg never sees TCP, and never redirects it.
            assert_eq!(decide(&c, Some(&c6), to, 53, IPPROTO_TCP, true), None);
        }
        assert_eq!(
            target_addr(&c, Some(&c6), v6_resolver, Target::Dns),
            Some((Addr::V6([0, 0, 0, 1]), 15053))
        );
        assert!(is_responder(&c, Some(&c6), Addr::V6([0, 0, 0, 1]), 15053));
        assert!(is_responder(&c, Some(&c6), Addr::V4(0x7f00_0001), 15053));
        assert!(!is_responder(&c, None, Addr::V6([0, 0, 0, 1]), 15053));
        // A resolver that listens on 53 at the responder's address is still redirected:
        // only the responder's own port is exempt.
        assert_eq!(
            decide(
                &c,
                Some(&c6),
                Addr::V4(0x7f00_0001),
                15053,
                IPPROTO_UDP,
                true
            ),
            None
        );
    }
}
