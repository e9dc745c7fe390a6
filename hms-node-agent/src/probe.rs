//! Kernel feature probe: before the agent loads anything it asks the kernel, one feature at a
//! time, whether what HMS needs is there, so a host that lacks something gets the feature's
//! name, the first kernel that has it and what to do, instead of a verifier dump or an EINVAL
//! from deep inside the loader. `hms-node-agent probe` prints the same checks as a table.
//!
//! Each check is the smallest real use of the feature: a one-entry map, a two-instruction
//! program of the type and attach type the agent loads (`r0 = 1; exit`, "allow"), a cgroup
//! bpf_link on an empty scratch cgroup, `SO_MARK` on a throwaway socket. Nothing is left
//! behind: every fd is closed and the scratch cgroup removed before the check returns.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::{AgentConfig, DEFAULT_DNS_MARK};

/// One feature and whether this host has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureCheck {
    /// Short name, as printed in the table and in errors.
    pub name: &'static str,
    pub ok: bool,
    /// `false` for features HMS can run without (reported, never fatal).
    pub required: bool,
    /// What was found; for a missing feature, why and what to do.
    pub detail: String,
    /// First mainline kernel that has the feature.
    pub min_kernel: &'static str,
}

/// Runs every check for an agent with this configuration.
pub fn run_for(config: &AgentConfig) -> Vec<FeatureCheck> {
    run(Some(&config.cgroup), &config.pin_dir)
}

/// The agent's start-up gate: every check, and an error naming each missing required feature.
/// Optional features that are missing are only logged.
pub fn check(config: &AgentConfig) -> anyhow::Result<Vec<FeatureCheck>> {
    let checks = run_for(config);
    for c in checks.iter().filter(|c| !c.ok && !c.required) {
        tracing::warn!(feature = c.name, min_kernel = c.min_kernel, "{}", c.detail);
    }
    summarize(&checks)?;
    Ok(checks)
}

/// Err listing every missing required feature (name, minimum kernel, what to do).
pub fn summarize(checks: &[FeatureCheck]) -> anyhow::Result<()> {
    let missing: Vec<String> = checks
        .iter()
        .filter(|c| c.required && !c.ok)
        .map(|c| format!("  - {} (Linux {}+): {}", c.name, c.min_kernel, c.detail))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "this host lacks {} kernel feature(s) HMS needs (kernel {}):\n{}\n\
         run `hms-node-agent probe` for the full list",
        missing.len(),
        kernel_release(),
        missing.join("\n")
    )
}

/// The probe as a table, one line per feature.
pub struct Table<'a>(pub &'a [FeatureCheck]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .0
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(7)
            .max(7);
        writeln!(f, "kernel {}", kernel_release())?;
        writeln!(
            f,
            "{:<width$}  {:<8}  {:<6}  detail",
            "feature", "status", "since"
        )?;
        for c in self.0 {
            let status = match (c.ok, c.required) {
                (true, _) => "ok",
                (false, true) => "MISSING",
                (false, false) => "absent",
            };
            writeln!(
                f,
                "{:<width$}  {:<8}  {:<6}  {}",
                c.name, status, c.min_kernel, c.detail
            )?;
        }
        Ok(())
    }
}

/// Runs every check. `cgroup` is the directory the hooks will attach to (`None`: the cgroup
/// v2 root); `pin_dir` is where links and maps will be pinned (it need not exist yet).
pub fn run(cgroup: Option<&Path>, pin_dir: &Path) -> Vec<FeatureCheck> {
    let mut checks = Vec::new();
    let cgroup_dir = cgroup_v2(cgroup, &mut checks);
    checks.push(bpffs(pin_dir));
    let bpf_ok = bpf_syscall(&mut checks);
    let connect4 = sock_addr_hook(
        &mut checks,
        "cgroup/connect4 hook",
        "4.17",
        BPF_CGROUP_INET4_CONNECT,
        bpf_ok,
    );
    sock_addr_hook(
        &mut checks,
        "cgroup/sendmsg4 hook",
        "4.18",
        BPF_CGROUP_UDP4_SENDMSG,
        bpf_ok,
    );
    sock_addr_hook(
        &mut checks,
        "cgroup/recvmsg4 hook",
        "5.2",
        BPF_CGROUP_UDP4_RECVMSG,
        bpf_ok,
    );
    // AF_INET6 sockets: dual-stack callers of IPv4 VIPs (JVMs, gRPC C-core) and IPv6 ones.
    for (name, min_kernel, attach_type) in [
        ("cgroup/connect6 hook", "4.17", BPF_CGROUP_INET6_CONNECT),
        ("cgroup/sendmsg6 hook", "4.18", BPF_CGROUP_UDP6_SENDMSG),
        ("cgroup/recvmsg6 hook", "5.2", BPF_CGROUP_UDP6_RECVMSG),
        (
            "cgroup/getpeername4 hook",
            "5.8",
            BPF_CGROUP_INET4_GETPEERNAME,
        ),
        (
            "cgroup/getpeername6 hook",
            "5.8",
            BPF_CGROUP_INET6_GETPEERNAME,
        ),
    ] {
        sock_addr_hook(&mut checks, name, min_kernel, attach_type, bpf_ok);
    }
    checks.push(sock_ops(bpf_ok));
    checks.push(ringbuf(bpf_ok));
    checks.push(sk_msg(bpf_ok));
    checks.push(cgroup_link(connect4.as_ref(), cgroup_dir.as_deref()));
    checks.push(btf());
    checks.push(so_mark());
    checks
}

// --- the checks ---------------------------------------------------------------------------

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn cgroup_v2(cgroup: Option<&Path>, checks: &mut Vec<FeatureCheck>) -> Option<PathBuf> {
    let mut c = FeatureCheck {
        name: "cgroup v2",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "4.5",
    };
    let dir = match cgroup {
        Some(dir) => Ok(dir.to_path_buf()),
        None => crate::cgroup::v2_root(),
    };
    let dir = match dir {
        Ok(d) => d,
        Err(e) => {
            c.detail = format!(
                "{e:#}; mount it (`mount -t cgroup2 none /sys/fs/cgroup`) or boot with \
                 systemd.unified_cgroup_hierarchy=1"
            );
            checks.push(c);
            return None;
        }
    };
    match fs_magic(&dir) {
        Ok(m) if m == CGROUP2_SUPER_MAGIC => {
            c.ok = true;
            c.detail = format!("{} is cgroup2", dir.display());
        }
        Ok(m) => {
            c.detail = format!(
                "{} is not a cgroup v2 directory (filesystem magic {m:#x}); the hooks need \
                 one: pass --cgroup DIR under the cgroup2 mount",
                dir.display()
            );
        }
        Err(e) => {
            c.detail = format!(
                "{}: {e}; create it or pass --cgroup DIR under the cgroup2 mount",
                dir.display()
            );
        }
    }
    let ok = c.ok;
    checks.push(c);
    ok.then_some(dir)
}

fn bpffs(pin_dir: &Path) -> FeatureCheck {
    let mut c = FeatureCheck {
        name: "bpffs at pin dir",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "4.4",
    };
    // The pin dir itself may not exist yet: the agent creates it inside the nearest existing
    // ancestor, whose filesystem is the one that counts.
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(pin_dir);
    match fs_magic(existing) {
        Ok(BPF_FS_MAGIC) => {
            c.ok = true;
            c.detail = format!("{} is on bpffs", existing.display());
        }
        Ok(_) => {
            c.detail = format!(
                "{} is not on bpffs, so pins would not survive the agent; run \
                 `mount -t bpf bpf /sys/fs/bpf` (or pass --pin-dir under a bpffs mount)",
                existing.display()
            );
        }
        Err(e) => c.detail = format!("{}: {e}", existing.display()),
    }
    c
}

fn bpf_syscall(checks: &mut Vec<FeatureCheck>) -> bool {
    let mut c = FeatureCheck {
        name: "bpf() syscall",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "3.19",
    };
    match map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1) {
        Ok(_fd) => {
            c.ok = true;
            c.detail = "created an array map".into();
        }
        Err(e) => c.detail = explain(&e, "creating a one-entry array map"),
    }
    let ok = c.ok;
    checks.push(c);
    ok
}

fn sock_addr_hook(
    checks: &mut Vec<FeatureCheck>,
    name: &'static str,
    min_kernel: &'static str,
    attach_type: u32,
    bpf_ok: bool,
) -> Option<OwnedFd> {
    let mut c = FeatureCheck {
        name,
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel,
    };
    let mut fd = None;
    if !bpf_ok {
        c.detail = "not tried: the bpf() syscall is unusable".into();
    } else {
        match prog_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type) {
            Ok(p) => {
                c.ok = true;
                c.detail = "loaded a cgroup sock_addr program".into();
                fd = Some(p);
            }
            Err(e) => {
                c.detail = explain(
                    &e,
                    &format!(
                        "loading a cgroup sock_addr program for this hook (needs Linux {min_kernel}+)"
                    ),
                )
            }
        }
    }
    checks.push(c);
    fd
}

fn sock_ops(bpf_ok: bool) -> FeatureCheck {
    let mut c = FeatureCheck {
        name: "sock_ops program",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "4.13",
    };
    if !bpf_ok {
        c.detail = "not tried: the bpf() syscall is unusable".into();
        return c;
    }
    match prog_load(BPF_PROG_TYPE_SOCK_OPS, 0) {
        Ok(_fd) => {
            c.ok = true;
            c.detail = "loaded a sock_ops program".into();
        }
        Err(e) => c.detail = explain(&e, "loading a sock_ops program (needs Linux 4.13+)"),
    }
    c
}

/// The agent always loads `hms_sk_msg` and its sockhash (whether the bypass is on is a
/// runtime switch), so both must exist.
fn sk_msg(bpf_ok: bool) -> FeatureCheck {
    let mut c = FeatureCheck {
        name: "sockhash map + sk_msg program",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "4.18",
    };
    if !bpf_ok {
        c.detail = "not tried: the bpf() syscall is unusable".into();
        return c;
    }
    let key = size_of::<hms_ebpf::SockKey>() as u32;
    let made = map_create(BPF_MAP_TYPE_SOCKHASH, key, 4, 1)
        .map_err(|e| explain(&e, "creating a sockhash map (needs Linux 4.18+)"))
        .and_then(|_map| {
            prog_load(BPF_PROG_TYPE_SK_MSG, 0)
                .map_err(|e| explain(&e, "loading an sk_msg program (needs Linux 4.17+)"))
        });
    match made {
        Ok(_fd) => {
            c.ok = true;
            c.detail = "created a sockhash and loaded an sk_msg program (the bypass)".into();
        }
        Err(detail) => c.detail = detail,
    }
    c
}

fn ringbuf(bpf_ok: bool) -> FeatureCheck {
    let mut c = FeatureCheck {
        name: "ringbuf map",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "5.8",
    };
    if !bpf_ok {
        c.detail = "not tried: the bpf() syscall is unusable".into();
        return c;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    match map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, page) {
        Ok(_fd) => {
            c.ok = true;
            c.detail = "created a ring buffer map (flow records)".into();
        }
        Err(e) => {
            c.detail = explain(
                &e,
                "creating a ring buffer map, which carries the kernel's flow records (needs Linux 5.8+)",
            )
        }
    }
    c
}

fn cgroup_link(prog: Option<&OwnedFd>, cgroup: Option<&Path>) -> FeatureCheck {
    let mut c = FeatureCheck {
        name: "cgroup bpf_link",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "5.7",
    };
    let Some(prog) = prog else {
        c.detail = "not tried: no cgroup/connect4 program to link".into();
        return c;
    };
    let Some(cgroup) = cgroup else {
        c.detail = "not tried: no cgroup v2 directory".into();
        return c;
    };
    // A real link on an empty cgroup of our own: affects no process, gone when the fd closes.
    let scratch = cgroup.join(format!("hms-probe-{}", std::process::id()));
    match std::fs::create_dir(&scratch) {
        Ok(()) => {
            let result = std::fs::File::open(&scratch)
                .and_then(|dir| link_create(prog, dir.as_raw_fd(), BPF_CGROUP_INET4_CONNECT));
            let _ = std::fs::remove_dir(&scratch);
            match result {
                Ok(_link) => {
                    c.ok = true;
                    c.detail = "linked a program to a scratch cgroup".into();
                }
                Err(e) => c.detail = explain(&e, "creating a cgroup bpf_link (needs Linux 5.7+)"),
            }
        }
        Err(mkdir_err) => {
            // Cannot make a scratch cgroup (read-only cgroupfs?): ask without attaching. A
            // kernel that knows BPF_LINK_CREATE rejects the bad target fd with EBADF; one that
            // does not rejects the command with EINVAL.
            match link_create(prog, -1, BPF_CGROUP_INET4_CONNECT) {
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
                    c.ok = true;
                    c.detail = format!(
                        "BPF_LINK_CREATE known (probed without attaching: {}: {mkdir_err})",
                        scratch.display()
                    );
                }
                Ok(_) => {
                    c.ok = true;
                    c.detail = "BPF_LINK_CREATE known".into();
                }
                Err(e) => c.detail = explain(&e, "BPF_LINK_CREATE for cgroups (needs Linux 5.7+)"),
            }
        }
    }
    c
}

fn btf() -> FeatureCheck {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    let ok = path.exists();
    FeatureCheck {
        name: "kernel BTF",
        ok,
        // The HMS programs use no CO-RE relocations against kernel types; aya uses the
        // kernel's BTF when present and loads without it otherwise.
        required: false,
        detail: if ok {
            format!("{} present", path.display())
        } else {
            format!(
                "{} is missing (kernel built without CONFIG_DEBUG_INFO_BTF); HMS works \
                 without it, tools like `bpftool` show less",
                path.display()
            )
        },
        min_kernel: "5.4",
    }
}

fn so_mark() -> FeatureCheck {
    let mut c = FeatureCheck {
        name: "SO_MARK",
        ok: false,
        required: true,
        detail: String::new(),
        min_kernel: "2.6.25",
    };
    let result = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .and_then(|s| s.set_mark(DEFAULT_DNS_MARK));
    match result {
        Ok(()) => {
            c.ok = true;
            c.detail = "set a mark on a UDP socket (DNS upstream loop avoidance)".into();
        }
        Err(e) => {
            c.detail = explain(
                &e,
                "setting SO_MARK on the DNS upstream sockets, which the port-53 hooks skip",
            )
        }
    }
    c
}

/// A missing feature's errno in words, with what to do.
fn explain(e: &io::Error, what: &str) -> String {
    let fix = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "not permitted: run as root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
             (before Linux 5.11 also raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity)"
        }
        Some(libc::ENOSYS) => "the kernel is built without CONFIG_BPF_SYSCALL",
        Some(libc::EINVAL) | Some(libc::E2BIG) | Some(libc::EOPNOTSUPP) => {
            "the kernel does not know it: upgrade the kernel"
        }
        _ => "",
    };
    if fix.is_empty() {
        format!("{what}: {e}")
    } else {
        format!("{what}: {e}; {fix}")
    }
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `buf` a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, not on every target
    let magic = buf.f_type as i64;
    Ok(magic)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

// --- raw bpf(2) ---------------------------------------------------------------------------
// Values from include/uapi/linux/bpf.h (stable kernel ABI).

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TYPE_SK_MSG: u32 = 16;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;

/// `union bpf_attr`, large enough for every command used here; unused bytes stay zero, which
/// is what the kernel requires of them.
#[repr(C, align(8))]
struct Attr([u32; 32]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` points to a zero-padded bpf_attr of the size passed; the kernel reads at
    // most that many bytes and writes nothing back for these commands.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr as *mut libc::c_void,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success these commands return a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

fn map_create(map_type: u32, key: u32, value: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut a = Attr([0; 32]);
    a.0[0] = map_type;
    a.0[1] = key;
    a.0[2] = value;
    a.0[3] = max_entries;
    bpf(BPF_MAP_CREATE, &mut a)
}

fn prog_load(prog_type: u32, expected_attach_type: u32) -> io::Result<OwnedFd> {
    // r0 = 1; exit  ("allow" for every cgroup hook)
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut a = Attr([0; 32]);
    a.0[0] = prog_type;
    a.0[1] = insns.len() as u32;
    let insns_ptr = insns.as_ptr() as u64;
    a.0[2] = insns_ptr as u32;
    a.0[3] = (insns_ptr >> 32) as u32;
    let license_ptr = license.as_ptr() as u64;
    a.0[4] = license_ptr as u32;
    a.0[5] = (license_ptr >> 32) as u32;
    // log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16], prog_ifindex:
    // zero. expected_attach_type is at byte 68.
    a.0[17] = expected_attach_type;
    bpf(BPF_PROG_LOAD, &mut a)
}

fn link_create(prog: &OwnedFd, target_fd: i32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut a = Attr([0; 32]);
    a.0[0] = prog.as_raw_fd() as u32;
    a.0[1] = target_fd as u32;
    a.0[2] = attach_type;
    bpf(BPF_LINK_CREATE, &mut a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, ok: bool, required: bool) -> FeatureCheck {
        FeatureCheck {
            name,
            ok,
            required,
            detail: "why".into(),
            min_kernel: "5.8",
        }
    }

    #[test]
    fn summary_names_each_missing_required_feature_only() {
        let checks = [
            check("ringbuf map", false, true),
            check("kernel BTF", false, false),
            check("SO_MARK", true, true),
        ];
        let err = summarize(&checks).unwrap_err().to_string();
        assert!(err.contains("ringbuf map (Linux 5.8+): why"), "{err}");
        assert!(!err.contains("kernel BTF"), "{err}");
        assert!(!err.contains("SO_MARK"), "{err}");
        assert!(summarize(&checks[1..]).is_ok());
    }

    #[test]
    fn table_has_one_line_per_feature() {
        let checks = [
            check("ringbuf map", false, true),
            check("SO_MARK", true, true),
        ];
        let text = Table(&checks).to_string();
        assert_eq!(text.lines().count(), 2 + checks.len(), "{text}");
        assert!(text.contains("MISSING"));
    }
}
