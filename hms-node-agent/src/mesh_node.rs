//! This host's record in a multi-host registry: its name, the inbound address other agents
//! tunnel to, and its certificate's expiry, kept current while the agent runs (the record
//! lives under this host's lease, so it vanishes with the host).
//!
//! The address published is one other hosts can dial ([`advertised_inbound`]): `--advertise`
//! if given; else `--inbound` if it names an address; else (bound to 0.0.0.0, the default)
//! the address of the interface this host reaches the registry through, found by asking
//! the kernel for the route (a UDP `connect`, which sends nothing); else the first
//! non-loopback address of any interface. Never `0.0.0.0`, which would send peers to
//! themselves.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hms_ctl::api::NodeInfo;

use crate::config::{AgentConfig, RegistryUrl};
use crate::drain::Drain;
use crate::mesh_identity::MeshIdentity;
use crate::registry::Store;

const REFRESH: Duration = Duration::from_secs(5);

pub async fn keep_registered(
    store: Arc<dyn Store>,
    identity: Arc<MeshIdentity>,
    config: AgentConfig,
    drain: Drain,
) {
    let mut last: Option<NodeInfo> = None;
    let inbound = advertised_inbound(&config);
    if inbound.ip().is_unspecified() {
        tracing::warn!(
            %inbound,
            "no address of this host to advertise to other hosts; set --advertise IP:PORT"
        );
    } else {
        tracing::info!(%inbound, "advertising this host's inbound address to other hosts");
    }
    loop {
        let summary = identity.summary().await;
        let info = NodeInfo {
            name: config.node_name.clone(),
            inbound,
            last_seen_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            cert_expiry_unix_ms: summary.cert_not_after_unix.map(|s| s * 1000),
        };
        let changed = last.as_ref().is_none_or(|l| {
            l.inbound != info.inbound || l.cert_expiry_unix_ms != info.cert_expiry_unix_ms
        });
        if changed {
            let s = store.clone();
            let i = info.clone();
            match tokio::task::spawn_blocking(move || s.register_node(i)).await {
                Ok(Ok(())) => last = Some(info),
                Ok(Err(e)) => tracing::warn!("registering this host in the registry: {e:#}"),
                Err(e) => tracing::warn!("registering this host: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = drain.signaled() => return,
        }
    }
}

/// The inbound address to publish in this host's node record (see the module doc).
pub fn advertised_inbound(config: &AgentConfig) -> SocketAddr {
    let route = match &config.registry {
        RegistryUrl::Etcd { endpoints, .. } => endpoints.iter().find_map(|e| route_source(e)),
        RegistryUrl::Embedded => None,
    };
    pick_advertised(config.inbound, config.advertise, route, &interface_addrs())
}

/// The local address the kernel would use to reach `endpoint` (`HOST:PORT`): a UDP socket
/// connected there, whose own address is then read. No packet is sent.
fn route_source(endpoint: &str) -> Option<IpAddr> {
    let target = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_socket_addrs()
        .ok()?
        .find(SocketAddr::is_ipv4)?;
    let sock = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

fn interface_addrs() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|ifs| {
            ifs.filter_map(|i| i.address)
                .filter_map(|a| a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))
                .collect()
        })
        .unwrap_or_default()
}

fn pick_advertised(
    inbound: SocketAddr,
    advertise: Option<SocketAddr>,
    route: Option<IpAddr>,
    interfaces: &[IpAddr],
) -> SocketAddr {
    if let Some(a) = advertise {
        return a;
    }
    if !inbound.ip().is_unspecified() {
        return inbound;
    }
    // A registry on this host's loopback says nothing about how others reach it.
    let usable = |ip: &IpAddr| !ip.is_loopback() && !ip.is_unspecified();
    match route
        .filter(usable)
        .or_else(|| interfaces.iter().copied().find(usable))
    {
        Some(ip) => SocketAddr::new(ip, inbound.port()),
        None => inbound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_advertised_address_is_never_unspecified_when_there_is_a_better_one() {
        let ifs: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap()];
        let route = Some("192.168.7.9".parse().unwrap());
        let any = a("0.0.0.0:15008");
        assert_eq!(
            pick_advertised(any, Some(a("10.9.9.9:443")), route, &ifs),
            a("10.9.9.9:443"),
            "--advertise wins"
        );
        assert_eq!(
            pick_advertised(a("10.5.5.5:15008"), None, route, &ifs),
            a("10.5.5.5:15008"),
            "a named --inbound is what peers dial"
        );
        assert_eq!(
            pick_advertised(any, None, route, &ifs),
            a("192.168.7.9:15008"),
            "the interface towards the registry"
        );
        assert_eq!(
            pick_advertised(any, None, Some("127.0.0.1".parse().unwrap()), &ifs),
            a("10.1.2.3:15008"),
            "a registry on loopback: the first real interface"
        );
        assert_eq!(
            pick_advertised(any, None, None, &ifs[..1]),
            any,
            "nothing better"
        );
    }

    #[test]
    fn the_route_to_a_loopback_registry_starts_at_loopback() {
        assert_eq!(
            route_source("127.0.0.1:2379"),
            Some("127.0.0.1".parse().unwrap())
        );
    }
}
