//! Stable VIP allocation: a name always hashes to the same starting address in the range, so
//! a service keeps its VIP across undeploy/redeploy and on every host that uses the same
//! range; collisions probe forward. Never hands out the range's first or last address.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use crate::config::Ipv4Cidr;

/// FNV-1a: tiny, stable across Rust versions and platforms (std's hasher is not).
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The VIP for `name`, avoiding `taken`. None when the range is full.
pub fn allocate(range: Ipv4Cidr, name: &str, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let usable = range.size().checked_sub(2)?;
    if usable == 0 {
        return None;
    }
    let start = fnv1a(name.as_bytes()) % usable;
    (0..usable)
        .map(|i| range.nth(1 + (start + i) % usable))
        .find_map(|ip| ip.filter(|ip| !taken.contains(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_vip() {
        let r: Ipv4Cidr = "127.77.0.0/16".parse().unwrap();
        let a = allocate(r, "payments-svc", &HashSet::new()).unwrap();
        assert_eq!(a, allocate(r, "payments-svc", &HashSet::new()).unwrap());
        assert!(r.contains(a));
    }

    #[test]
    fn collisions_probe_and_full_range_is_none() {
        let r: Ipv4Cidr = "127.77.0.0/30".parse().unwrap(); // two usable addresses
        let mut taken = HashSet::new();
        let a = allocate(r, "a", &taken).unwrap();
        taken.insert(a);
        let b = allocate(r, "a", &taken).unwrap();
        assert_ne!(a, b);
        taken.insert(b);
        assert_eq!(allocate(r, "c", &taken), None);
        for ip in [a, b] {
            assert_ne!(ip, r.network);
            assert_ne!(ip, Ipv4Addr::new(127, 77, 0, 3));
        }
    }
}
