//! The one place where kernel byte order becomes host order. Kernel context fields and what
//! they hold:
//! - `bpf_sock_addr.user_ip4`, `user_port`: network order (port in the low 16 bits of a u32).
//! - `bpf_sock_ops.remote_ip4`, `local_ip4`: network order.
//! - `bpf_sock_ops.remote_port`: network-order port in the **upper** 16 bits.
//! - `bpf_sock_ops.local_port`: host order.
//! - `sk_msg_md` has the same fields with the same conventions as `bpf_sock_ops` (the kernel
//!   converts both the same way), so the `sock_ops_*` functions serve it too.

/// `bpf_sock_addr.user_ip4` / `bpf_sock_ops.*_ip4` -> host order.
#[inline(always)]
pub fn ip_from_kernel(be: u32) -> u32 {
    u32::from_be(be)
}

/// Host-order IPv4 -> the value to store in `bpf_sock_addr.user_ip4`.
#[inline(always)]
pub fn ip_to_kernel(host: u32) -> u32 {
    host.to_be()
}

/// `bpf_sock_addr.user_port` -> host order.
#[inline(always)]
pub fn sock_addr_port_from_kernel(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// Host-order port -> the value to store in `bpf_sock_addr.user_port`.
#[inline(always)]
pub fn sock_addr_port_to_kernel(port: u16) -> u32 {
    port.to_be() as u32
}

/// `bpf_sock_ops.remote_port` -> host order.
#[inline(always)]
pub fn sock_ops_remote_port(remote_port: u32) -> u16 {
    u16::from_be((remote_port >> 16) as u16)
}

/// `bpf_sock_ops.local_port` -> host order (already is; named so every read goes through here).
#[inline(always)]
pub fn sock_ops_local_port(local_port: u32) -> u16 {
    local_port as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_round_trip_through_sock_addr() {
        // 15001 = 0x3A99; on the wire 0x99 0x3A, as a little-endian u16 that is 0x993A.
        let user_port = sock_addr_port_to_kernel(15001);
        assert_eq!(user_port, u32::from(15001u16.to_be()));
        assert_eq!(sock_addr_port_from_kernel(user_port), 15001);
    }

    #[test]
    fn sock_ops_remote_port_is_upper_half_network_order() {
        let raw = u32::from(8080u16.to_be()) << 16;
        assert_eq!(sock_ops_remote_port(raw), 8080);
    }

    #[test]
    fn ips_round_trip() {
        let host = u32::from_be_bytes([127, 77, 0, 9]);
        assert_eq!(ip_from_kernel(ip_to_kernel(host)), host);
    }
}
