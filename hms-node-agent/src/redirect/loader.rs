//! Getting the kernel programs attached: load the embedded object, attach each hook to the
//! cgroup and pin its link, or adopt a link a previous agent pinned.
//!
//! Owns the decision "attach or adopt" per hook and the eBPF log drain. Must never attach a
//! hook that is already attached from this pin set (that would run every redirect twice), and
//! never adopt a link that points at a different cgroup than the one asked for.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, MapType, SockHash},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SkMsg, SockOps, links::FdLink},
};
use aya_log::EbpfLogger;
use hms_ebpf::{
    BypassBytes, EgressAddr, EgressConfig, FLOW_EVENTS_BYTES, FlowKey, FlowKey6, FlowState,
    OrigDst, OrigDst6, RedirectConfig, RedirectConfig6, SockKey, SockKey6, map_names,
    program_names, sk_msg_stat,
};

use super::pin::{self, BPF_LINK_TYPE_CGROUP, Hook};

/// The kernel programs, built by build.rs from `hms-ebpf` for this very agent version.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hms-ebpf"));

/// The embedded object, for `layout` to derive the pin set's version from.
pub(crate) fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

/// `aya_log_common::Level` values: what `AYA_LOG_LEVEL` in the object compares against.
const EBPF_LOG_INFO: u8 = 3;
const EBPF_LOG_DEBUG: u8 = 4;

/// How one hook ended up attached.
#[derive(Clone, Debug)]
pub(crate) struct HookState {
    pub hook: Hook,
    pub link_pin: PathBuf,
    pub link_id: u32,
    pub program_id: u32,
    pub adopted: bool,
}

/// Fails early with an instruction instead of a bare EBADF/EINVAL from the kernel later.
pub(crate) fn check_cgroup_dir(cgroup: &Path) -> anyhow::Result<File> {
    let dir = File::open(cgroup).with_context(|| {
        format!(
            "cgroup dir {} does not exist or cannot be opened (create it, or point --cgroup at \
             the cgroup v2 root)",
            cgroup.display()
        )
    })?;
    let fs_type =
        statfs_type(&dir).with_context(|| format!("statfs on cgroup dir {}", cgroup.display()))?;
    if fs_type != libc::CGROUP2_SUPER_MAGIC {
        let hint = match crate::cgroup::v2_root() {
            Ok(root) => format!(
                "the cgroup v2 hierarchy on this host is at {}",
                root.display()
            ),
            Err(e) => format!("{e:#}"),
        };
        bail!(
            "{} is not a cgroup v2 directory; HMS hooks attach to cgroup v2 only ({hint})",
            cgroup.display()
        );
    }
    Ok(dir)
}

/// The pin dir must be on bpffs, or pinning fails with an unhelpful EPERM.
pub(crate) fn prepare_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(pin_dir).with_context(|| {
        format!(
            "creating pin dir {} (not root? is bpffs mounted? `mount -t bpf bpf /sys/fs/bpf`)",
            pin_dir.display()
        )
    })?;
    let dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    let fs_type = statfs_type(&dir).with_context(|| format!("statfs on {}", pin_dir.display()))?;
    if fs_type != libc::BPF_FS_MAGIC {
        bail!(
            "pin dir {} is not on a BPF filesystem; use a path under /sys/fs/bpf (mount it with \
             `mount -t bpf bpf /sys/fs/bpf` if it is missing)",
            pin_dir.display()
        );
    }
    Ok(())
}

fn statfs_type(file: &File) -> io::Result<libc::c_long> {
    // SAFETY: zeroed statfs is a valid out-parameter; fd is valid while `file` lives.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as libc::c_long)
}

/// What a pinned map must look like to be reused by this agent.
struct ExpectedMap {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    /// Checked only where the size is part of the contract: aya sizes its mmap of a ring
    /// buffer from the object, not from the pinned map.
    max_entries: Option<u32>,
}

fn expected_maps() -> [ExpectedMap; 19] {
    let map = |name, map_type, key_size, value_size| ExpectedMap {
        name,
        map_type,
        key_size,
        value_size,
        max_entries: None,
    };
    [
        map(
            map_names::CONFIG,
            MapType::Array,
            size_of::<u32>(),
            size_of::<RedirectConfig>(),
        ),
        map(
            map_names::ORIG_BY_COOKIE,
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<OrigDst>(),
        ),
        map(
            map_names::AGENT_ALIVE,
            MapType::Array,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
        map(
            map_names::DNS_UDP_ORIG,
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<OrigDst>(),
        ),
        map(
            map_names::ORIG_BY_FLOW,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<OrigDst>(),
        ),
        map(
            map_names::FLOWS,
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<FlowState>(),
        ),
        map(
            map_names::RINGBUF_DROPS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
        map(
            map_names::BYPASS_BYTES,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<BypassBytes>(),
        ),
        map(
            map_names::BYPASS_PENDING,
            MapType::LruHash,
            size_of::<SockKey>(),
            size_of::<u8>(),
        ),
        map(
            map_names::SOCKS,
            MapType::SockHash,
            size_of::<SockKey>(),
            size_of::<u32>(),
        ),
        ExpectedMap {
            max_entries: Some(sk_msg_stat::COUNT),
            ..map(
                map_names::SK_MSG_STATS,
                MapType::PerCpuArray,
                size_of::<u32>(),
                size_of::<u64>(),
            )
        },
        map(
            map_names::CONFIG6,
            MapType::Array,
            size_of::<u32>(),
            size_of::<RedirectConfig6>(),
        ),
        map(
            map_names::ORIG6_BY_COOKIE,
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<OrigDst6>(),
        ),
        map(
            map_names::ORIG6_BY_FLOW,
            MapType::LruHash,
            size_of::<FlowKey6>(),
            size_of::<OrigDst6>(),
        ),
        map(
            map_names::SOCKS6,
            MapType::SockHash,
            size_of::<SockKey6>(),
            size_of::<u32>(),
        ),
        map(
            map_names::EGRESS,
            MapType::Array,
            size_of::<u32>(),
            size_of::<EgressConfig>(),
        ),
        map(
            map_names::EGRESS_ALLOW,
            MapType::Hash,
            size_of::<EgressAddr>(),
            size_of::<u32>(),
        ),
        map(
            map_names::EGRESS_REFUSED,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
        ExpectedMap {
            max_entries: Some(FLOW_EVENTS_BYTES),
            ..map(map_names::FLOW_EVENTS, MapType::RingBuf, 0, 0)
        },
    ]
}

/// Maps pinned by an agent built with different ABI types would be reused by aya as they are
/// and the programs would read garbage; refuse instead.
pub(crate) fn check_pinned_maps(pin_dir: &Path) -> anyhow::Result<()> {
    for expected in expected_maps() {
        let path = pin_dir.join(expected.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let (key_size, value_size) = (expected.key_size, expected.value_size);
        let cleanup = "(left by another HMS version?); run `hms-node-agent cleanup` to remove it";
        let map_type = info.map_type().ok();
        if map_type != Some(expected.map_type) {
            bail!(
                "pinned map {} is a {map_type:?} map but this agent expects {:?} {cleanup}",
                path.display(),
                expected.map_type,
            );
        }
        if info.key_size() as usize != key_size || info.value_size() as usize != value_size {
            bail!(
                "pinned map {} has key/value size {}/{} but this agent expects \
                 {key_size}/{value_size} {cleanup}",
                path.display(),
                info.key_size(),
                info.value_size()
            );
        }
        if let Some(max_entries) = expected.max_entries
            && info.max_entries() != max_entries
        {
            bail!(
                "pinned map {} has size {} but this agent expects {max_entries} {cleanup}",
                path.display(),
                info.max_entries(),
            );
        }
    }
    Ok(())
}

/// Loads the object (maps are created, or reopened from their pins; programs are not yet
/// loaded into the kernel).
pub(crate) fn load_object(pin_dir: &Path) -> anyhow::Result<Ebpf> {
    // Kernel-side debug logs cost a ring-buffer write per redirect: only emit them when the
    // agent would show them.
    let level = if tracing::enabled!(target: "hms_ebpf", tracing::Level::DEBUG) {
        EBPF_LOG_DEBUG
    } else {
        EBPF_LOG_INFO
    };
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global("AYA_LOG_LEVEL", &level, false)
        .load(EBPF_OBJECT)
        .context(
            "loading the HMS eBPF object (not root? needs CAP_BPF, CAP_NET_ADMIN and \
             CAP_SYS_ADMIN; a kernel older than 5.7 lacks the cgroup links HMS uses)",
        )
}

/// Attaches `hook` fresh, or adopts its pinned link. A pinned link whose cgroup is gone is
/// stale (the kernel already detached it) and gets replaced.
pub(crate) fn attach_or_adopt(
    ebpf: &mut Ebpf,
    hook: Hook,
    cgroup: &File,
    cgroup_path: &Path,
    cgroup_id: u64,
    pin_dir: &Path,
) -> anyhow::Result<HookState> {
    let link_pin = pin_dir.join(hook.link_file);
    if let Some(info) = pin::read_pinned_link(&link_pin)? {
        let ours = info.link_type == BPF_LINK_TYPE_CGROUP && info.attach_type == hook.attach_type;
        if !ours {
            bail!(
                "{} is not an HMS {} link; run `hms-node-agent cleanup` for pin dir {}",
                link_pin.display(),
                hook.attach,
                pin_dir.display()
            );
        }
        if info.cgroup_id == cgroup_id {
            return Ok(HookState {
                hook,
                link_pin,
                link_id: info.link_id,
                program_id: info.program_id,
                adopted: true,
            });
        }
        if info.cgroup_id != 0 {
            bail!(
                "pin dir {} holds a {} link attached to another cgroup (id {}), not {}; give \
                 each agent its own pin dir, or run `hms-node-agent cleanup` on this one",
                pin_dir.display(),
                hook.attach,
                info.cgroup_id,
                cgroup_path.display()
            );
        }
        tracing::info!(link = %link_pin.display(), "replacing a pinned link whose cgroup is gone");
        std::fs::remove_file(&link_pin)
            .with_context(|| format!("removing stale link pin {}", link_pin.display()))?;
    }

    let fd_link = attach(ebpf, hook, cgroup).with_context(|| {
        format!(
            "attaching {} to cgroup {} (not root? needs CAP_BPF and CAP_NET_ADMIN)",
            hook.program,
            cgroup_path.display()
        )
    })?;
    let info = fd_link
        .info()
        .with_context(|| format!("reading back the {} link", hook.program))?;
    let (link_id, program_id) = (info.id(), info.program_id());
    // If pinning fails the FdLink is dropped here, which detaches the hook again: we never
    // leave an attachment behind that a later agent could not find.
    fd_link
        .pin(&link_pin)
        .with_context(|| format!("pinning link {}", link_pin.display()))?;
    Ok(HookState {
        hook,
        link_pin,
        link_id,
        program_id,
        adopted: false,
    })
}

/// Cgroup bpf_links always coexist with other programs on the hook (the kernel attaches them
/// with allow-multi semantics), and `BPF_LINK_CREATE` rejects any attach flag with EINVAL.
/// aya 0.14 passes the mode through as that flag (aya-rs/aya#1078), so "allow multiple" is
/// spelled `Single` here; the kernel still runs our programs alongside everyone else's.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn attach(ebpf: &mut Ebpf, hook: Hook, cgroup: &File) -> anyhow::Result<FdLink> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    if hook.program == hms_ebpf::program_names::SOCK_RELEASE {
        let program: &mut CgroupSock = program.try_into()?;
        program.load().context("loading (verifier)")?;
        let id = program.attach(cgroup, LINK_ATTACH_MODE)?;
        Ok(program.take_link(id)?.try_into()?)
    } else if hook.program == hms_ebpf::program_names::SOCK_OPS {
        let program: &mut SockOps = program.try_into()?;
        program.load().context("loading (verifier)")?;
        let id = program.attach(cgroup, LINK_ATTACH_MODE)?;
        Ok(program.take_link(id)?.try_into()?)
    } else {
        let program: &mut CgroupSockAddr = program.try_into()?;
        program.load().context("loading (verifier)")?;
        let id = program.attach(cgroup, LINK_ATTACH_MODE)?;
        Ok(program.take_link(id)?.try_into()?)
    }
}

/// Loads `hms_sk_msg` and attaches it to `HMS_SOCKS`. The attachment belongs to the map, not
/// to this process: the link is forgotten so that dropping it (at exit, or when the agent hands
/// over to its successor) never detaches it; the kernel releases the program when the map's
/// last pin and fd are gone (`hms-node-agent cleanup`). Attaching again replaces the program a
/// previous agent attached.
pub(crate) fn attach_sk_msg(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map_fd = |ebpf: &Ebpf, name: &str| -> anyhow::Result<_> {
        let map = ebpf
            .map(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        let fd = if name == map_names::SOCKS6 {
            let socks: SockHash<_, SockKey6> = SockHash::try_from(map)?;
            socks.fd().try_clone()
        } else {
            let socks: SockHash<_, SockKey> = SockHash::try_from(map)?;
            socks.fd().try_clone()
        };
        fd.with_context(|| format!("duplicating the {name} fd"))
    };
    let socks = map_fd(ebpf, map_names::SOCKS)?;
    let socks6 = map_fd(ebpf, map_names::SOCKS6)?;
    let program: &mut SkMsg = ebpf
        .program_mut(program_names::SK_MSG)
        .ok_or_else(|| {
            anyhow!(
                "program {} missing from the eBPF object",
                program_names::SK_MSG
            )
        })?
        .try_into()?;
    program
        .load()
        .context("loading hms_sk_msg (verifier; sk_msg needs Linux 4.17+)")?;
    // One program on both sockhashes: it picks the map by the socket's family.
    for (fd, name) in [(&socks, map_names::SOCKS), (&socks6, map_names::SOCKS6)] {
        let id = program
            .attach(fd)
            .with_context(|| format!("attaching hms_sk_msg to {name}"))?;
        std::mem::forget(program.take_link(id)?);
    }
    Ok(())
}

/// Forwards kernel-side `aya_log_ebpf` records to the agent's logger from a small thread.
/// Best effort: the redirect works the same without it.
pub(crate) struct LogDrain {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const LOG_POLL_INTERVAL: Duration = Duration::from_millis(250);

impl LogDrain {
    /// `fresh`: the object whose programs this agent loaded itself. `adopted_programs`:
    /// programs a previous agent loaded; their log ring buffer belongs to that load, so it is
    /// found through a program that logs (not every program does, e.g. sock_ops).
    pub(crate) fn start(fresh: Option<&mut Ebpf>, adopted_programs: &[u32]) -> Option<Self> {
        let mut loggers = Vec::new();
        if let Some(ebpf) = fresh {
            match EbpfLogger::init(ebpf) {
                Ok(l) => loggers.push(l),
                Err(e) => tracing::debug!(error = %e, "eBPF logs unavailable"),
            }
        }
        if let Some(logger) = adopted_programs
            .iter()
            .find_map(|id| EbpfLogger::init_from_id(*id).ok())
        {
            loggers.push(logger);
        } else if !adopted_programs.is_empty() {
            tracing::debug!("eBPF logs of adopted programs unavailable");
        }
        if loggers.is_empty() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("hms-ebpf-log".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    let mut fds: Vec<libc::pollfd> = loggers
                        .iter()
                        .map(|l| libc::pollfd {
                            fd: l.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        })
                        .collect();
                    // SAFETY: fds is a live array of pollfd of the given length.
                    unsafe {
                        libc::poll(
                            fds.as_mut_ptr(),
                            fds.len() as libc::nfds_t,
                            LOG_POLL_INTERVAL.as_millis() as libc::c_int,
                        )
                    };
                    for logger in &mut loggers {
                        logger.flush();
                    }
                }
            });
        match thread {
            Ok(thread) => Some(Self {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::debug!(error = %e, "could not start the eBPF log thread");
                None
            }
        }
    }
}

impl Drop for LogDrain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
