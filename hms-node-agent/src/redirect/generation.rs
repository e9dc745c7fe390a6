//! Pin sets, one per layout version, and retiring the older ones after an upgrade.
//!
//! The pin dir holds one set per layout (`layout-<version>/`, see `layout`), plus the
//! unversioned set that releases before versioning pinned directly in the pin dir. An agent
//! uses (adopts or creates) the set of its own version. Any other set it finds is older (or
//! newer: a downgrade): its links stay attached beside the agent's own until the agent serves
//! the listeners, because connections and DNS queries the other programs redirected are
//! still arriving; then [`retire`] detaches its links (the record creators first, the hooks
//! that consume their records a grace later) and unpins its maps once no socket is left in
//! its sk_msg bypass. Until then the proxy looks records up in the older set's maps too
//! ([`OlderSet`]), whatever their value layout ([`decode`]).
//!
//! Two generations on one hook: cgroup links run every attached program, in attach order, so
//! the older set's connect4/sendmsg (attached first) rewrite a VIP or a port-53 send and
//! record it in the older maps; the newer programs then see a non-VIP, non-53 address and
//! leave it. recvmsg restores a reply's source from whichever set recorded it (the other
//! finds nothing). sock_ops promotes only its own set's records. Once the older set's agent
//! is gone its heartbeat lapses and its creators stand aside, so the newer ones redirect.
//!
//! Crash safety: every start does the same thing (adopt or attach its own set, then retire
//! all others), so a crash at any step leaves a state the next start (or `cleanup`, which
//! removes every set) finishes: two sets attached until the next agent serves, never none
//! while an agent runs (its own is attached before any other is detached).
//!
//! Owns the set directory names and the retirement order. Never touches its own set's pins.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::MapInfo;
use hms_ebpf::{FlowKey, FlowKey6, OrigDst, OrigDst6, map_names};

use super::pin::{self, sys};

/// Directory name prefix of a versioned pin set.
const SET_PREFIX: &str = "layout-";

/// The hooks that create records (and rewrite destinations): detached first, so the newer
/// set's take over at once and no new record lands in the older maps.
const CREATORS: [&str; 4] = [
    hms_ebpf::program_names::CONNECT4,
    hms_ebpf::program_names::CONNECT6,
    hms_ebpf::program_names::SENDMSG4,
    hms_ebpf::program_names::SENDMSG6,
];

/// Between detaching the older creators and the hooks that consume their records: a DNS
/// query the older sendmsg redirected gets its reply source restored by the older recvmsg (a
/// resolver drops a reply from an unexpected source), and a connect it redirected reaches
/// established under the older sock_ops. A resolver waits 5 s for an answer before it asks
/// again, so a reply later than that is moot.
const CONSUMER_GRACE: Duration = Duration::from_secs(5);

/// How often a retired set's sk_msg bypass is checked for remaining sockets.
const SOCKS_POLL: Duration = Duration::from_millis(500);

pub(crate) fn is_set_dir_name(name: &str) -> bool {
    name.strip_prefix(SET_PREFIX)
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where the set of layout `version` lives.
pub(crate) fn set_dir(pin_dir: &Path, version: &str) -> PathBuf {
    pin_dir.join(format!("{SET_PREFIX}{version}"))
}

/// Every other pin set under `pin_dir` than `own` (the unversioned one included if the pin
/// dir holds any of its files).
pub(crate) fn other_sets(pin_dir: &Path, own: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading pin dir {}", pin_dir.display())),
    };
    let mut sets = Vec::new();
    let mut unversioned = false;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading pin dir {}", pin_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_set_dir_name(&name) {
            let path = entry.path();
            if path != own && path.is_dir() {
                sets.push(path);
            }
        } else if pin::is_link_file(&name) || pin::is_map_file(&name) {
            unversioned = true;
        }
    }
    sets.sort();
    if unversioned {
        sets.insert(0, pin_dir.to_path_buf());
    }
    Ok(sets)
}

/// A pinned map of another set, opened by path: its value layout may differ from this
/// build's, so it is read as bytes.
struct RawMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl RawMap {
    fn open(dir: &Path, name: &str) -> Option<RawMap> {
        let path = dir.join(name);
        if !path.exists() {
            return None;
        }
        let opened = MapInfo::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|info| {
                let fd = sys::obj_get(&path)?;
                Ok(RawMap {
                    fd,
                    key_size: info.key_size() as usize,
                    value_size: info.value_size() as usize,
                })
            });
        match opened {
            Ok(map) => Some(map),
            Err(e) => {
                tracing::warn!(map = %path.display(), "opening an older set's map: {e:#}");
                None
            }
        }
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if key.len() != self.key_size {
            return None;
        }
        let mut value = vec![0u8; self.value_size];
        match sys::map_lookup(&self.fd, key, &mut value) {
            Ok(true) => Some(value),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(error = %e, "older set's map lookup failed");
                None
            }
        }
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let value = self.get(key)?;
        if let Err(e) = sys::map_delete(&self.fd, key) {
            tracing::debug!(error = %e, "removing a taken record from an older set");
        }
        Some(value)
    }

    fn is_empty(&self) -> bool {
        sys::map_is_empty(&self.fd, self.key_size).unwrap_or(true)
    }

    /// Takes out of this (sockhash) map the sockets that have no peer in it and are not a
    /// connection to or from the outbound listener (`outbound_port`): the agent's end of a
    /// connection to an instance outside the cgroup, which sock_ops expected to pair and the
    /// agent only settles in its own set's map. Such a socket never carried bypassed data, so
    /// taking it out changes nothing for it; left in, a pooled upstream connection would
    /// keep the set from ever being unpinned.
    fn drop_unpaired_instance_legs(&self, outbound_port: u16) {
        let Ok(keys) = sys::map_keys(&self.fd, self.key_size) else {
            return;
        };
        for key in &keys {
            let Some((peer, ports)) = decode::sock_peer(key) else {
                return;
            };
            if ports.contains(&outbound_port) || keys.contains(&peer) {
                continue;
            }
            if let Err(e) = sys::map_delete(&self.fd, key) {
                tracing::debug!(error = %e, "taking an unpaired socket out of an older sockhash");
            }
        }
    }
}

/// The record maps of an older set, for the proxy's lookups while its connections and
/// queries are still arriving. Holding the fds keeps the maps alive after they are unpinned.
pub(crate) struct OlderSet {
    pub dir: PathBuf,
    orig_by_cookie: Option<RawMap>,
    orig_by_flow: Option<RawMap>,
    /// Absent in sets older than the UDP DNS map: their UDP records are in ORIG_BY_COOKIE.
    dns_udp_orig: Option<RawMap>,
    orig6_by_cookie: Option<RawMap>,
    orig6_by_flow: Option<RawMap>,
}

impl OlderSet {
    pub(crate) fn open(dir: &Path) -> OlderSet {
        OlderSet {
            dir: dir.to_path_buf(),
            orig_by_cookie: RawMap::open(dir, map_names::ORIG_BY_COOKIE),
            orig_by_flow: RawMap::open(dir, map_names::ORIG_BY_FLOW),
            dns_udp_orig: RawMap::open(dir, map_names::DNS_UDP_ORIG),
            orig6_by_cookie: RawMap::open(dir, map_names::ORIG6_BY_COOKIE),
            orig6_by_flow: RawMap::open(dir, map_names::ORIG6_BY_FLOW),
        }
    }

    pub(crate) fn take_flow4(&self, key: &FlowKey) -> Option<OrigDst> {
        let raw = self.orig_by_flow.as_ref()?.take(bytes_of(key))?;
        decode::orig(&raw)
    }

    pub(crate) fn take_cookie4(&self, cookie: u64) -> Option<OrigDst> {
        let raw = self.orig_by_cookie.as_ref()?.take(&cookie.to_ne_bytes())?;
        decode::orig(&raw)
    }

    pub(crate) fn udp4(&self, cookie: u64) -> Option<OrigDst> {
        let map = self
            .dns_udp_orig
            .as_ref()
            .or(self.orig_by_cookie.as_ref())?;
        decode::orig(&map.get(&cookie.to_ne_bytes())?)
    }

    pub(crate) fn take_flow6(&self, key: &FlowKey6) -> Option<OrigDst6> {
        let raw = self.orig6_by_flow.as_ref()?.take(bytes_of(key))?;
        decode::orig6(&raw)
    }

    pub(crate) fn take_cookie6(&self, cookie: u64) -> Option<OrigDst6> {
        let raw = self.orig6_by_cookie.as_ref()?.take(&cookie.to_ne_bytes())?;
        decode::orig6(&raw)
    }

    pub(crate) fn udp6(&self, cookie: u64) -> Option<OrigDst6> {
        decode::orig6(&self.orig6_by_cookie.as_ref()?.get(&cookie.to_ne_bytes())?)
    }
}

fn bytes_of<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: Pod types are plain #[repr(C)] data without uninitialised padding (the ABI
    // types spell their padding out as fields).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Records of older layouts. Fields were only ever appended to `OrigDst` (`uid` + padding
/// last), so an older record is a prefix of today's; `OrigDst6` embeds one, followed by the
/// 16 address bytes.
pub(crate) mod decode {
    use super::*;

    /// The oldest `OrigDst` layout there is: ip, port, protocol, pid, flags, cgroup_id, comm,
    /// connect_ns.
    const ORIG_MIN: usize = 48;
    const IP6: usize = 16;

    pub(crate) fn orig(raw: &[u8]) -> Option<OrigDst> {
        if raw.len() < ORIG_MIN {
            return None;
        }
        let mut buf = [0u8; size_of::<OrigDst>()];
        let n = raw.len().min(buf.len());
        buf[..n].copy_from_slice(&raw[..n]);
        // SAFETY: OrigDst is plain integers: every byte pattern is a valid value.
        Some(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<OrigDst>()) })
    }

    /// A sockhash key's peer key (local and remote swapped) and its two ports, for the
    /// three layouts there were: `SockKey` before the netns (12 bytes), `SockKey` (24) and
    /// `SockKey6` (48).
    pub(crate) fn sock_peer(key: &[u8]) -> Option<(Vec<u8>, [u16; 2])> {
        let (ip, ip_len, port) = match key.len() {
            12 => (0, 4, 8),
            24 => (8, 4, 16),
            48 => (8, 16, 40),
            _ => return None,
        };
        let mut peer = key.to_vec();
        peer[ip..ip + ip_len].copy_from_slice(&key[ip + ip_len..ip + 2 * ip_len]);
        peer[ip + ip_len..ip + 2 * ip_len].copy_from_slice(&key[ip..ip + ip_len]);
        peer[port..port + 2].copy_from_slice(&key[port + 2..port + 4]);
        peer[port + 2..port + 4].copy_from_slice(&key[port..port + 2]);
        let ports = [
            u16::from_ne_bytes([key[port], key[port + 1]]),
            u16::from_ne_bytes([key[port + 2], key[port + 3]]),
        ];
        Some((peer, ports))
    }

    /// `RedirectConfig::outbound_port` of a raw config record (the same offset in every
    /// layout: the record only ever grew at its end).
    pub(crate) fn outbound_port(raw: &[u8]) -> Option<u16> {
        let b = raw.get(16..18)?;
        Some(u16::from_ne_bytes([b[0], b[1]]))
    }

    pub(crate) fn orig6(raw: &[u8]) -> Option<OrigDst6> {
        let split = raw.len().checked_sub(IP6)?;
        let orig = orig(&raw[..split])?;
        let mut ip6 = [0u32; 4];
        for (i, w) in ip6.iter_mut().enumerate() {
            let b = &raw[split + i * 4..split + i * 4 + 4];
            *w = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        Some(OrigDst6 { orig, ip6 })
    }
}

/// Retires the set in `dir` (not this agent's own): creators' links, a grace, the other
/// links, then (once its sk_msg bypass holds no socket) its maps and, for a versioned set,
/// its directory. Blocking; runs on a thread of its own. Each step is idempotent, so a set
/// left half-retired by a crash is finished by the next agent.
pub(crate) fn retire(dir: &Path, is_pin_root: bool) -> anyhow::Result<()> {
    let detach = |hook: &pin::Hook| -> anyhow::Result<bool> {
        let path = dir.join(hook.link_file);
        if !path.exists() {
            return Ok(false);
        }
        pin::detach_pinned_link(&path)?;
        pin::remove_pin(&path)?;
        Ok(true)
    };
    let mut creators = 0;
    for hook in pin::HOOKS.iter().filter(|h| CREATORS.contains(&h.program)) {
        creators += usize::from(detach(hook)?);
    }
    if creators > 0 {
        tracing::info!(set = %dir.display(), "older pin set: connect/sendmsg detached, this agent's redirect now");
        std::thread::sleep(CONSUMER_GRACE);
    }
    for hook in pin::HOOKS.iter().filter(|h| !CREATORS.contains(&h.program)) {
        detach(hook)?;
    }
    // Sockets in its bypass carry data through its sk_msg program; unpinning the sockhash
    // frees it and takes them out mid-stream. They leave it when they close.
    let socks: Vec<RawMap> = [map_names::SOCKS, map_names::SOCKS6]
        .iter()
        .filter_map(|m| RawMap::open(dir, m))
        .collect();
    let outbound_port = RawMap::open(dir, map_names::CONFIG)
        .and_then(|config| config.get(&0u32.to_ne_bytes()))
        .and_then(|raw| decode::outbound_port(&raw));
    let mut said = false;
    loop {
        if let Some(port) = outbound_port {
            for map in &socks {
                map.drop_unpaired_instance_legs(port);
            }
        }
        if socks.iter().all(RawMap::is_empty) {
            break;
        }
        if !said {
            tracing::info!(set = %dir.display(), "older pin set detached; its maps stay until the connections in its sk_msg bypass close");
            said = true;
        }
        std::thread::sleep(SOCKS_POLL);
    }
    drop(socks);
    for map in pin::MAPS.iter().chain(pin::LATER_MAPS.iter()) {
        pin::remove_pin(&dir.join(map))?;
    }
    if !is_pin_root {
        pin::remove_dir(dir)?;
    }
    tracing::info!(set = %dir.display(), "older pin set retired");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sockhash_peer_key_is_what_the_kernel_side_peer_is_in_every_layout() {
        let key = hms_ebpf::SockKey {
            netns: 9,
            local_ip: 0x7f00_0001,
            remote_ip: 0x7f00_0002,
            local_port: 40000,
            remote_port: 15001,
            _pad: 0,
        };
        let (peer, ports) = decode::sock_peer(bytes_of(&key)).unwrap();
        assert_eq!(peer, bytes_of(&key.peer()));
        assert_eq!(ports, [40000, 15001]);
        let key6 = hms_ebpf::SockKey6 {
            netns: 9,
            local_ip: [0, 0, 0, 1],
            remote_ip: [0, 0, 0xffff, 0x7f00_0001],
            local_port: 40000,
            remote_port: 15001,
            _pad: 0,
        };
        let (peer6, ports6) = decode::sock_peer(bytes_of(&key6)).unwrap();
        assert_eq!(peer6, bytes_of(&key6.peer()));
        assert_eq!(ports6, [40000, 15001]);
        // Before the netns: local_ip, remote_ip, local_port, remote_port.
        let old = &bytes_of(&key)[8..20];
        let (old_peer, old_ports) = decode::sock_peer(old).unwrap();
        assert_eq!(old_peer, &bytes_of(&key.peer())[8..20]);
        assert_eq!(old_ports, [40000, 15001]);
        assert_eq!(decode::sock_peer(&[0; 7]), None);
    }

    #[test]
    fn the_outbound_port_is_read_from_a_raw_config() {
        let cfg = hms_ebpf::RedirectConfig {
            outbound_port: 15001,
            ..Default::default()
        };
        assert_eq!(decode::outbound_port(bytes_of(&cfg)), Some(15001));
        assert_eq!(decode::outbound_port(&bytes_of(&cfg)[..16]), None);
    }

    #[test]
    fn set_dir_names_are_the_prefix_and_hex_only() {
        assert!(is_set_dir_name("layout-0123abcd"));
        assert!(!is_set_dir_name("layout-"));
        assert!(!is_set_dir_name("layout-../x"));
        assert!(!is_set_dir_name("HMS_CONFIG"));
    }

    #[test]
    fn an_older_orig_dst_is_a_prefix_and_its_v6_record_ends_with_the_address() {
        let now = OrigDst {
            ip: 0x7f4d_0001,
            port: 80,
            protocol: 6,
            pid: 42,
            flags: 0,
            cgroup_id: 7,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            connect_ns: 99,
            uid: 1000,
            _pad: 0,
        };
        let raw = bytes_of(&now);
        assert_eq!(decode::orig(raw), Some(now));
        // The layout before `uid`: 48 bytes, uid reads as 0.
        let old = decode::orig(&raw[..48]).unwrap();
        assert_eq!(
            (old.ip, old.port, old.pid, old.connect_ns),
            (now.ip, 80, 42, 99)
        );
        assert_eq!(old.uid, 0);
        assert_eq!(decode::orig(&raw[..40]), None);

        let ip6 = [1, 2, 3, 4];
        let mut old6 = raw[..48].to_vec();
        for w in ip6 {
            old6.extend_from_slice(&u32::to_ne_bytes(w));
        }
        let got = decode::orig6(&old6).unwrap();
        assert_eq!(got.ip6, ip6);
        assert_eq!(got.orig.port, 80);
        let new6 = OrigDst6 { orig: now, ip6 };
        assert_eq!(decode::orig6(bytes_of(&new6)), Some(new6));
    }
}
