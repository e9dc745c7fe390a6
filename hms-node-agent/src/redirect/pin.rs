//! The pin directory: which file holds which link or map, reading a pinned link back, and
//! tearing everything down (`hms-node-agent cleanup`: every pin set, see `generation`).
//!
//! Owns the file layout under the pin dir and the few raw `bpf(2)` calls aya 0.14 does not
//! expose (reading a cgroup link's target, forcing a link detach). Must never touch a file it
//! did not name itself: anything unknown in the pin dir is reported and left in place.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use hms_ebpf::{map_names, program_names};
use serde::{Deserialize, Serialize};

/// One kernel program and where its link is pinned.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hook {
    pub program: &'static str,
    /// The cgroup hook, as `bpftool cgroup show` names it.
    pub attach: &'static str,
    /// `bpf_attach_type` the link must have; a pinned link of another type is not ours.
    pub attach_type: u32,
    pub link_file: &'static str,
}

// Values of `enum bpf_attach_type` (include/uapi/linux/bpf.h); stable kernel ABI.
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;

/// Attach order matters: the hooks that consume records (sock_ops promotes them, recvmsg4
/// restores DNS reply sources) go in before the hooks that create them, so no socket is ever
/// redirected without its follow-up in place.
///
/// A pin dir made by an older build lacks the later links (`sock_release`, the `*6` and
/// getpeername hooks):
/// the agent attaches what is missing and adopts the rest.
pub(crate) const HOOKS: [Hook; 10] = [
    Hook {
        program: program_names::SOCK_RELEASE,
        attach: "cgroup_inet_sock_release",
        attach_type: BPF_CGROUP_INET_SOCK_RELEASE,
        link_file: "link_sock_release",
    },
    Hook {
        program: program_names::SOCK_OPS,
        attach: "sock_ops",
        attach_type: BPF_CGROUP_SOCK_OPS,
        link_file: "link_sock_ops",
    },
    Hook {
        program: program_names::RECVMSG4,
        attach: "cgroup_udp4_recvmsg",
        attach_type: BPF_CGROUP_UDP4_RECVMSG,
        link_file: "link_recvmsg4",
    },
    Hook {
        program: program_names::RECVMSG6,
        attach: "cgroup_udp6_recvmsg",
        attach_type: BPF_CGROUP_UDP6_RECVMSG,
        link_file: "link_recvmsg6",
    },
    Hook {
        program: program_names::GETPEERNAME4,
        attach: "cgroup_inet4_getpeername",
        attach_type: BPF_CGROUP_INET4_GETPEERNAME,
        link_file: "link_getpeername4",
    },
    Hook {
        program: program_names::GETPEERNAME6,
        attach: "cgroup_inet6_getpeername",
        attach_type: BPF_CGROUP_INET6_GETPEERNAME,
        link_file: "link_getpeername6",
    },
    Hook {
        program: program_names::SENDMSG4,
        attach: "cgroup_udp4_sendmsg",
        attach_type: BPF_CGROUP_UDP4_SENDMSG,
        link_file: "link_sendmsg4",
    },
    Hook {
        program: program_names::SENDMSG6,
        attach: "cgroup_udp6_sendmsg",
        attach_type: BPF_CGROUP_UDP6_SENDMSG,
        link_file: "link_sendmsg6",
    },
    Hook {
        program: program_names::CONNECT4,
        attach: "cgroup_inet4_connect",
        attach_type: BPF_CGROUP_INET4_CONNECT,
        link_file: "link_connect4",
    },
    Hook {
        program: program_names::CONNECT6,
        attach: "cgroup_inet6_connect",
        attach_type: BPF_CGROUP_INET6_CONNECT,
        link_file: "link_connect6",
    },
];

/// Maps added after the first release: not required beside a set's links (a set an older
/// release pinned lacks them; such a set is retired, see `generation`, not adopted).
pub(crate) const LATER_MAPS: [&str; 9] = [
    map_names::AGENT_ALIVE,
    map_names::DNS_UDP_ORIG,
    map_names::CONFIG6,
    map_names::ORIG6_BY_COOKIE,
    map_names::ORIG6_BY_FLOW,
    map_names::SOCKS6,
    map_names::EGRESS,
    map_names::EGRESS_ALLOW,
    map_names::EGRESS_REFUSED,
];

pub(crate) const MAPS: [&str; 10] = [
    map_names::CONFIG,
    map_names::ORIG_BY_COOKIE,
    map_names::ORIG_BY_FLOW,
    map_names::FLOWS,
    map_names::FLOW_EVENTS,
    map_names::RINGBUF_DROPS,
    map_names::SOCKS,
    map_names::SK_MSG_STATS,
    map_names::BYPASS_BYTES,
    map_names::BYPASS_PENDING,
];

/// Removes the loopback route of the IPv6 VIP prefix recorded in the pinned `HMS_CONFIG6`, if
/// IPv6 was on. The route is shared by every agent on the host using that prefix; a cleanup
/// is for taking HMS off the host (or this pin dir's agent off for good).
fn remove_v6_route(config6: &Path) -> anyhow::Result<Option<String>> {
    let data = aya::maps::MapData::from_pin(config6)
        .with_context(|| format!("opening pinned map {}", config6.display()))?;
    let array: aya::maps::Array<_, hms_ebpf::RedirectConfig6> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data))
            .with_context(|| format!("{} is not the IPv6 config array", config6.display()))?;
    let cfg = array
        .get(&0, 0)
        .with_context(|| format!("reading {}", config6.display()))?;
    if cfg.enabled == 0 {
        return Ok(None);
    }
    let w = cfg.vip_prefix;
    let prefix = crate::original_dst::ipv6_from_words([w[0], w[1], w[2], 0]);
    // Not fatal: the links and maps still go, which is what stops the redirect.
    if let Err(e) = super::local_route::remove(prefix) {
        tracing::warn!(
            "{e:#}; remove it with `ip -6 route del local {prefix}/96 dev lo table local`"
        );
        return Ok(None);
    }
    Ok(Some(format!("{prefix}/96")))
}

/// What a pinned link points at, from `BPF_OBJ_GET_INFO_BY_FD`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CgroupLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    pub link_type: u32,
    /// 0 once the cgroup is gone (the kernel auto-detaches the link then).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub(crate) const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Reads a pinned link back. `Ok(None)` if nothing is pinned there.
pub(crate) fn read_pinned_link(path: &Path) -> anyhow::Result<Option<CgroupLinkInfo>> {
    let fd = match sys::obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("opening pinned link {}", path.display()));
        }
    };
    let info = sys::link_info(&fd).with_context(|| {
        format!(
            "{} is pinned but is not a BPF link; run `hms-node-agent cleanup` for this pin dir",
            path.display()
        )
    })?;
    Ok(Some(info))
}

/// What `cleanup` did, for the CLI to print.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    pub pin_dir: PathBuf,
    /// Link files found, detached and unpinned.
    pub detached_links: Vec<String>,
    pub unpinned_maps: Vec<String>,
    /// The IPv6 VIP prefix whose loopback route was removed (`prefix/96`), if IPv6 was on.
    #[serde(default)]
    pub removed_route: Option<String>,
    pub removed_dir: bool,
    /// Files in the pin dir that are not ours; left in place (so the dir stays too).
    pub left_behind: Vec<String>,
}

impl std::fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.pin_dir.display();
        let did_something =
            !self.detached_links.is_empty() || !self.unpinned_maps.is_empty() || self.removed_dir;
        if did_something {
            write!(
                f,
                "{dir}: detached {} link(s), unpinned {} map(s)",
                self.detached_links.len(),
                self.unpinned_maps.len()
            )?;
            if let Some(route) = &self.removed_route {
                write!(f, ", removed the loopback route of {route}")?;
            }
            if self.removed_dir {
                write!(f, ", removed the directory")?;
            }
        } else {
            write!(f, "{dir}: nothing of HMS's to clean up")?;
        }
        if !self.left_behind.is_empty() {
            write!(
                f,
                "; left files HMS did not create in place: {} (remove them by hand if stale)",
                self.left_behind.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Detaches every pinned HMS link under `pin_dir`, unpins the maps and removes the directory:
/// every pin set in it (each layout's `layout-<version>/` and the unversioned set older
/// releases pinned directly in `pin_dir`). Idempotent: a missing directory is a successful
/// no-op.
///
/// Links are force-detached (`BPF_LINK_DETACH`) before unpinning, because a still-running
/// agent holding a link fd would otherwise keep the hooks attached after its pin is gone.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<CleanupReport> {
    let mut report = CleanupReport {
        pin_dir: pin_dir.to_path_buf(),
        ..CleanupReport::default()
    };
    let names = match list_dir(pin_dir)? {
        Some(names) => names,
        None => return Ok(report),
    };
    let sets: Vec<String> = names
        .iter()
        .filter(|n| super::generation::is_set_dir_name(n) && pin_dir.join(n).is_dir())
        .cloned()
        .collect();
    // The route's prefix is only recorded in HMS_CONFIG6, so it goes before the maps do.
    for dir in sets
        .iter()
        .map(|s| pin_dir.join(s))
        .chain([pin_dir.to_path_buf()])
    {
        if report.removed_route.is_none() && dir.join(map_names::CONFIG6).exists() {
            report.removed_route = remove_v6_route(&dir.join(map_names::CONFIG6))?;
        }
    }
    for set in &sets {
        let dir = pin_dir.join(set);
        let left = remove_set(&dir, &format!("{set}/"), &mut report)?;
        if left.is_empty() {
            remove_dir(&dir)?;
        } else {
            report
                .left_behind
                .extend(left.into_iter().map(|n| format!("{set}/{n}")));
        }
    }
    let root_files: Vec<String> = names.into_iter().filter(|n| !sets.contains(n)).collect();
    let left = remove_files(pin_dir, &root_files, "", &mut report)?;
    report.left_behind.extend(left);

    if report.left_behind.is_empty() {
        report.removed_dir = remove_dir(pin_dir)?;
    } else {
        tracing::warn!(
            pin_dir = %pin_dir.display(),
            files = ?report.left_behind,
            "pin dir holds files HMS did not create; left them and the dir in place"
        );
    }
    Ok(report)
}

/// The names in `dir`, sorted; `None` if it does not exist.
fn list_dir(dir: &Path) -> anyhow::Result<Option<Vec<String>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading pin dir {} (not root?)", dir.display()));
        }
    };
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading pin dir {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(Some(names))
}

/// Detaches and unpins the set in `dir` (links first); returns the names that are not ours.
fn remove_set(dir: &Path, label: &str, report: &mut CleanupReport) -> anyhow::Result<Vec<String>> {
    let names = list_dir(dir)?.unwrap_or_default();
    remove_files(dir, &names, label, report)
}

fn remove_files(
    dir: &Path,
    names: &[String],
    label: &str,
    report: &mut CleanupReport,
) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    for name in names {
        let path = dir.join(name);
        if is_link_file(name) {
            detach_pinned_link(&path)?;
            remove_pin(&path)?;
            report.detached_links.push(format!("{label}{name}"));
        } else if is_map_file(name) {
            remove_pin(&path)?;
            report.unpinned_maps.push(format!("{label}{name}"));
        } else {
            left.push(name.clone());
        }
    }
    Ok(left)
}

pub(crate) fn is_link_file(name: &str) -> bool {
    HOOKS.iter().any(|h| h.link_file == name)
}

pub(crate) fn is_map_file(name: &str) -> bool {
    MAPS.contains(&name) || LATER_MAPS.contains(&name)
}

/// `Ok(true)` if it was removed, `Ok(false)` if it was already gone.
pub(crate) fn remove_dir(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing pin dir {}", dir.display())),
    }
}

pub(crate) fn detach_pinned_link(path: &Path) -> anyhow::Result<()> {
    let fd = match sys::obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "opening pinned link {} (not root? needs CAP_BPF)",
                    path.display()
                )
            });
        }
    };
    match sys::link_detach(&fd) {
        Ok(()) => Ok(()),
        // Already detached (its cgroup was removed) or not a link at all: unpinning is all
        // that is left to do.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLINK | libc::EINVAL)) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("detaching pinned link {}", path.display())),
    }
}

pub(crate) fn remove_pin(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unpinning {}", path.display())),
    }
}

/// Raw `bpf(2)` commands. The attr layouts are the leading fields of `union bpf_attr`; the
/// kernel zero-extends shorter attrs, so only the fields we use are declared.
pub(crate) mod sys {
    use super::*;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_DETACH: libc::c_long = 34;

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`, valid for the
        // duration of the call, and its size is passed alongside.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T as *mut libc::c_void,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
            path_fd: i32,
            _pad: u32,
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut attr = ObjGet {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: BPF_OBJ_GET returned a fresh fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    pub(super) fn link_info(fd: &OwnedFd) -> io::Result<CgroupLinkInfo> {
        /// `struct bpf_link_info` up to the cgroup member of its union (which starts 8-byte
        /// aligned at offset 16), padded generously; the kernel fills at most its own size.
        #[repr(C, align(8))]
        struct LinkInfoRaw {
            type_: u32,
            id: u32,
            prog_id: u32,
            _pad: u32,
            cgroup_id: u64,
            attach_type: u32,
            _rest: [u8; 108],
        }
        #[repr(C)]
        struct GetInfo {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut raw = LinkInfoRaw {
            type_: 0,
            id: 0,
            prog_id: 0,
            _pad: 0,
            cgroup_id: 0,
            attach_type: 0,
            _rest: [0; 108],
        };
        let mut attr = GetInfo {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<LinkInfoRaw>() as u32,
            info: &mut raw as *mut LinkInfoRaw as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(CgroupLinkInfo {
            link_id: raw.id,
            program_id: raw.prog_id,
            link_type: raw.type_,
            cgroup_id: if raw.type_ == BPF_LINK_TYPE_CGROUP {
                raw.cgroup_id
            } else {
                0
            },
            attach_type: raw.attach_type,
        })
    }

    #[repr(C)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        /// `value` for lookups, `next_key` for BPF_MAP_GET_NEXT_KEY.
        value: u64,
        flags: u64,
    }

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

    /// `Ok(false)` when the key is not in the map. `value` must be the map's value size.
    pub(crate) fn map_lookup(fd: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut attr = MapElem {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn map_delete(fd: &OwnedFd, key: &[u8]) -> io::Result<()> {
        let mut attr = MapElem {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: 0,
            flags: 0,
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every key of a hash map (`key_size` is the map's). A map changing meanwhile may give
    /// a key twice or miss one, which the caller's next round makes up for.
    pub(crate) fn map_keys(fd: &OwnedFd, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut next = vec![0u8; key_size];
            let mut attr = MapElem {
                map_fd: fd.as_raw_fd() as u32,
                _pad: 0,
                // A null key asks for the first one.
                key: keys.last().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => keys.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
            // A hash map cannot hold more than this many keys; stop a cycle if it does.
            if keys.len() > 1 << 24 {
                return Ok(keys);
            }
        }
    }

    /// Whether the (hash) map holds any key; `key_size` is the map's.
    pub(crate) fn map_is_empty(fd: &OwnedFd, key_size: usize) -> io::Result<bool> {
        let mut next = vec![0u8; key_size.max(1)];
        // A null key asks for the first one.
        let mut attr = MapElem {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: 0,
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
            Err(e) => Err(e),
        }
    }

    pub(super) fn link_detach(fd: &OwnedFd) -> io::Result<()> {
        #[repr(C)]
        struct LinkDetach {
            link_fd: u32,
        }
        let mut attr = LinkDetach {
            link_fd: fd.as_raw_fd() as u32,
        };
        bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
    }
}
