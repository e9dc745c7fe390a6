//! The kernel's half of refusing undeclared egress: the `HMS_EGRESS` setting, the
//! `HMS_EGRESS_ALLOW` set of declared external addresses, and the `HMS_EGRESS_REFUSED`
//! counter. Owns writing them; which addresses are declared is decided by the agent
//! (`proxy/external.rs` resolves, `agent.rs` keeps the set current). Must never leave the
//! setting on with an allow set it did not write: the set is filled before refusal is
//! turned on, and every start writes the setting (off included), since a pin set outlives
//! the agent that wrote it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Mutex;

use anyhow::Context;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use hms_ebpf::{EgressAddr, EgressConfig, map_names};

use crate::original_dst::ipv6_words;

pub struct EgressMaps {
    config: Mutex<Array<MapData, EgressConfig>>,
    allow: Mutex<(HashMap<MapData, EgressAddr, u32>, BTreeSet<EgressAddr>)>,
    refused: Mutex<PerCpuArray<MapData, u64>>,
    refuse: bool,
}

/// The map key of an address: the IPv6 form's four words (IPv4 mapped).
pub fn egress_key(ip: IpAddr) -> EgressAddr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    EgressAddr {
        words: ipv6_words(v6),
    }
}

impl EgressMaps {
    /// Takes the three maps out of the loaded object and writes the setting: off until
    /// [`EgressMaps::sync`] has written the allow set once, if `refuse` is on.
    pub fn take(ebpf: &mut aya::Ebpf, refuse: bool) -> anyhow::Result<EgressMaps> {
        let mut config: Array<MapData, EgressConfig> = Array::try_from(
            ebpf.take_map(map_names::EGRESS)
                .context("map HMS_EGRESS missing from the eBPF object")?,
        )?;
        config
            .set(0, EgressConfig::default(), 0)
            .context("writing the egress setting to HMS_EGRESS")?;
        let mut allow: HashMap<MapData, EgressAddr, u32> = HashMap::try_from(
            ebpf.take_map(map_names::EGRESS_ALLOW)
                .context("map HMS_EGRESS_ALLOW missing from the eBPF object")?,
        )?;
        // A previous agent's set: start from nothing, the registry says what is declared.
        let stale: Vec<EgressAddr> = allow.keys().filter_map(Result::ok).collect();
        for k in stale {
            let _ = allow.remove(&k);
        }
        let refused = PerCpuArray::try_from(
            ebpf.take_map(map_names::EGRESS_REFUSED)
                .context("map HMS_EGRESS_REFUSED missing from the eBPF object")?,
        )?;
        Ok(EgressMaps {
            config: Mutex::new(config),
            allow: Mutex::new((allow, BTreeSet::new())),
            refused: Mutex::new(refused),
            refuse,
        })
    }

    /// Makes `HMS_EGRESS_ALLOW` hold exactly `declared`, then (with refusal on) turns the
    /// setting on. Errors name the map; the set stays as far as it got.
    pub fn sync(&self, declared: &BTreeSet<IpAddr>) -> anyhow::Result<()> {
        let want: BTreeSet<EgressAddr> = declared.iter().map(|ip| egress_key(*ip)).collect();
        {
            let mut guard = self.allow.lock().unwrap_or_else(|p| p.into_inner());
            let (map, have) = &mut *guard;
            for k in want.difference(have) {
                map.insert(k, 1, 0)
                    .context("adding a declared external address to HMS_EGRESS_ALLOW")?;
            }
            for k in have.difference(&want) {
                let _ = map.remove(k);
            }
            *have = want;
        }
        if self.refuse {
            self.config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set(
                    0,
                    EgressConfig {
                        refuse_undeclared: 1,
                        agent_tgid: std::process::id(),
                    },
                    0,
                )
                .context("turning egress refusal on in HMS_EGRESS")?;
        }
        Ok(())
    }

    pub fn refusing(&self) -> bool {
        self.refuse
    }

    /// Connects refused since the maps were created (summed over CPUs).
    pub fn refused_total(&self) -> u64 {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match refused.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().copied().fold(0u64, u64::wrapping_add),
            Err(e) => {
                tracing::warn!(error = %e, map = map_names::EGRESS_REFUSED, "map read failed");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_are_mapped_like_the_kernel_sees_them() {
        let k = egress_key("10.98.0.2".parse().unwrap());
        assert_eq!(k.words, [0, 0, 0xffff, 0x0a62_0002]);
        let k6 = egress_key("fd98::2".parse().unwrap());
        assert_eq!(k6.words, [0xfd98_0000, 0, 0, 2]);
    }
}
