//! `cargo xtask vm-test --system`: the hms package on a real Debian 12 system. A root made
//! with debootstrap from Debian's packages (cached in `target/vm-system/base`), systemd as
//! PID 1, Debian's 6.1 kernel (`vm_kernel`), a virtio disk made from that root with
//! `mkfs.ext4 -d` that survives the guest's reboot, no network device. A tiny initramfs
//! (busybox) loads the disk's and the agent's kernel modules and switches to the disk; the
//! guest's driver (`xtask/deb/system-test/hms-vm-driver`, a systemd unit) installs,
//! exercises, reboots and purges the packages and reports `HMS-SYS-*` lines on the serial
//! console, which this module reads, prints and judges.
//!
//! `cargo xtask test` starts the debootstrap early on a thread (`Base::start`) and runs the
//! rest after the kernel VM; qemu is stopped at the driver's `HMS-SYS-DONE`.
//!
//! Owns the guest's root, disk and initramfs and the verdict. Never touches this host's
//! systemd, packages or kernel objects: everything happens in the guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::vm_qemu::{self, Vm};
use crate::vm_rootfs::Rootfs;
use crate::{deb, old_release_build, proc, tools, vm_kernel, workspace};

/// The release before the pin-layout change and before Type=notify (what
/// vm-tests/tests/upgrade_layout.rs upgrades from too).
const OLD_RELEASE: &str = old_release_build::COMMIT;
/// What debootstrap adds to the minimal base: systemd as init, udev for the disk, kmod,
/// the clients and tools the driver uses (curl, bpftool, ip), a resolver (dnsmasq).
const INCLUDE: &str = "systemd,systemd-sysv,udev,kmod,curl,dnsmasq-base,iproute2,bpftool";
/// Modules the initramfs loads: the disk (virtio over PCI, ext4) and the agent's.
const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
const VM_MEMORY: &str = "2048M";
const VM_CPUS: u32 = 2;
/// Two boots, five package operations and the load phases under TCG.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);
const DRIVER: &str = include_str!("../deb/system-test/hms-vm-driver");

/// `cargo xtask vm-test --system`: fails unless every check passed.
pub fn run() -> anyhow::Result<()> {
    let v = run_counted(Base::Foreground)?;
    if !v.broken.is_empty() {
        bail!("{}", v.broken.join("; "));
    }
    Ok(())
}

/// The guest's Debian root (debootstrap, cached): made when the run needs it, or started
/// early on a thread of its own (`cargo xtask test` starts it right after setup, so that its
/// minutes of downloads and unpacking overlap the host's build and tests).
pub enum Base {
    Foreground,
    Background {
        thread: std::thread::JoinHandle<anyhow::Result<PathBuf>>,
        log: PathBuf,
    },
}

impl Base {
    /// Starts the debootstrap (when the cache is not there) on a thread; its output goes to
    /// `target/vm-system/debootstrap.log`, not among the tests' lines.
    pub fn start() -> Base {
        let dir = workspace::target_dir().join("vm-system");
        let log = dir.join("debootstrap.log");
        let thread = {
            let log = log.clone();
            std::thread::spawn(move || {
                std::fs::create_dir_all(&dir)?;
                debootstrap(&dir, Some(&log))
            })
        };
        println!(
            "xtask test: the system VM's Debian root is being made in the background (log: {})",
            log.display()
        );
        Base::Background { thread, log }
    }

    fn get(self, dir: &Path) -> anyhow::Result<PathBuf> {
        match self {
            Base::Foreground => debootstrap(dir, None),
            Base::Background { thread, log } => {
                let t = Instant::now();
                let base = thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the debootstrap thread panicked"))?
                    .with_context(|| format!("the guest's Debian root (log: {})", log.display()))?;
                phase("waiting for the background debootstrap", t);
                Ok(base)
            }
        }
    }
}

/// Runs the system VM; the verdict's `broken` says why a run that did not pass failed.
pub fn run_counted(base: Base) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let qemu = vm_qemu::check_installed()?;
    println!("vm-test --system: qemu is {}", qemu.display());
    let target = workspace::target_dir();
    let vm_dir = target.join("vm");
    let dir = target.join("vm-system");
    std::fs::create_dir_all(&dir)?;

    let kernel = vm_kernel::prepare(&vm_dir)?;
    let mut wanted: Vec<&str> = DISK_MODULES.to_vec();
    wanted.extend_from_slice(vm_kernel::MODULES);
    let modules = vm_kernel::resolve_modules(&kernel.module_dir, &wanted)?;

    let t = Instant::now();
    proc::run(workspace::cargo().args(["build", "--bins"])).context("building the workspace")?;
    phase("cargo build --bins", t);
    let debs = packages(&target, &dir)?;
    let base = base.get(&dir)?;
    let t = Instant::now();
    let root = guest_root(&dir, &base, &debs, &target)?;
    phase(
        "guest root assembled (copy of the base, packages, units)",
        t,
    );
    let disk = dir.join("disk.img");
    let _ = std::fs::remove_file(&disk);
    let t = Instant::now();
    proc::run(
        tools::command("mkfs.ext4")
            .args(["-q", "-F", "-L", "hms-root", "-d"])
            .arg(&root)
            .arg(&disk)
            .arg("3G"),
    )
    .context("making the guest's disk image")?;
    phase("disk image (mkfs.ext4 -d)", t);
    std::fs::remove_dir_all(&root)?;
    let t = Instant::now();
    let initrd = dir.join("initramfs.cpio");
    initramfs(&modules, &initrd)?;
    phase("initramfs", t);

    let probe = vm_dir.join("probe.cpio");
    let accel = if probe.exists() {
        vm_qemu::choose_accel(&vm_dir, &kernel.vmlinuz, &probe)?
    } else {
        vm_qemu::Accel::Tcg
    };
    let log = dir.join("console.log");
    println!(
        "vm-test --system: booting Debian 12 with {} under {accel} (console: {})",
        kernel.release,
        log.display()
    );
    let outcome = vm_qemu::run(
        &Vm {
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            accel,
            memory: VM_MEMORY,
            cpus: VM_CPUS,
            timeout: VM_TIMEOUT,
            log: &log,
            disk: Some(&disk),
            append: "console=ttyS0 root=/dev/vda rw panic=-1 quiet systemd.show_status=false",
            reboot: true,
            // The first boot and the driver's reboot.
            max_boots: 2,
            // The driver's last line; its poweroff is not waited for.
            finished_at: Some("HMS-SYS-DONE"),
        },
        |line| {
            if line.contains("HMS-SYS-") {
                println!("   [system vm] {line}");
            }
        },
    )?;
    let verdict = judge(&outcome.lines);
    println!(
        "vm-test --system: {} checks passed, {} failed; the VM ran {:.0} s, the whole run {:.0} s",
        verdict.passed,
        verdict.failed.len(),
        outcome.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for line in &verdict.measured {
        println!("MEASURED: system VM: {line}");
    }
    let mut verdict = verdict;
    if outcome.timed_out {
        verdict.broken.push(format!(
            "the system VM did not finish within {} s (console: {})",
            VM_TIMEOUT.as_secs(),
            log.display()
        ));
    } else if !verdict.done {
        verdict.broken.push(format!(
            "the guest's driver did not get to the end (console: {})",
            log.display()
        ));
    }
    for f in &verdict.failed {
        verdict
            .broken
            .push(format!("{f} (console: {})", log.display()));
    }
    Ok(verdict)
}

/// One line of the run's time table.
fn phase(what: &str, since: Instant) {
    println!(
        "MEASURED: system VM: {what}: {:.1} s",
        since.elapsed().as_secs_f64()
    );
}

/// What the console said.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    pub passed: usize,
    pub failed: Vec<String>,
    /// `TIME` and `LOAD` lines, for the report.
    pub measured: Vec<String>,
    pub done: bool,
    /// Why the run failed, one line each (filled in by `run_counted`).
    pub broken: Vec<String>,
}

pub fn judge(lines: &[String]) -> Verdict {
    let mut v = Verdict::default();
    for line in lines {
        let Some(at) = line.find("HMS-SYS-") else {
            continue;
        };
        let rest = &line[at + "HMS-SYS-".len()..];
        if rest.starts_with("OK ") {
            v.passed += 1;
        } else if let Some(what) = rest.strip_prefix("FAIL ") {
            v.failed.push(what.to_string());
        } else if let Some(m) = rest
            .strip_prefix("TIME ")
            .or_else(|| rest.strip_prefix("LOAD "))
        {
            v.measured.push(m.to_string());
        } else if rest.starts_with("DONE") {
            v.done = true;
        }
    }
    v
}

/// The three packages the driver installs: this tree's (`current`), the same binaries as a
/// later version (`next`, for an upgrade), and the older release's (`old`).
fn packages(target: &Path, dir: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let out = dir.join("debs");
    let version = deb::workspace_version(&workspace::root())?;
    // The workspace build `run` made (`cargo build --bins`).
    let bins = target.join("debug");
    let t = Instant::now();
    let current = deb::build(&deb::Options {
        release: false,
        version: Some(version.clone()),
        bin_dir: Some(bins.clone()),
        pre_notify: false,
        out_dir: Some(out.clone()),
        lintian: true,
        compress: false,
    })?;
    phase("package hms_current.deb with lintian", t);
    let t = Instant::now();
    let next = deb::build(&deb::Options {
        release: false,
        version: Some(format!("{version}+next1")),
        bin_dir: Some(bins),
        pre_notify: false,
        out_dir: Some(out.clone()),
        lintian: false,
        compress: false,
    })?;
    phase("package hms_next.deb", t);
    let t = Instant::now();
    let old_bins = old_release(target)?;
    phase(
        "the older release's build (cargo, cached in target/old-release)",
        t,
    );
    let t = Instant::now();
    let old = deb::build(&deb::Options {
        release: false,
        version: Some(format!("{version}~old{}", &OLD_RELEASE[..7])),
        bin_dir: Some(old_bins),
        pre_notify: true,
        out_dir: Some(out),
        lintian: false,
        compress: false,
    })?;
    phase("package hms_old.deb", t);
    Ok(vec![
        ("hms_current.deb", current),
        ("hms_next.deb", next),
        ("hms_old.deb", old),
    ])
}

/// The older release's agent and hms-ctl, built from this repository's history into
/// `target/old-release/<commit>/` by the same cargo command as vm-tests' old_release (in
/// `cargo xtask test` the host's upgrade_layout.rs has built it by now).
fn old_release(target: &Path) -> anyhow::Result<PathBuf> {
    old_release_build::build(&workspace::root(), target, OLD_RELEASE)
}

/// The Debian mirror this host's apt uses (as ../shared/tools/fresh-debian-check finds it).
fn mirror() -> anyhow::Result<String> {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    for text in &texts {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let url = match words.as_slice() {
                ["URIs:", url, ..] => url,
                ["deb", url, ..] if !url.starts_with('[') => url,
                ["deb", _opts, url, ..] => url,
                _ => continue,
            };
            if (url.starts_with("http://") || url.starts_with("https://"))
                && url.trim_end_matches('/').ends_with("/debian")
            {
                return Ok(url.to_string());
            }
        }
    }
    bail!("no Debian mirror in /etc/apt/sources.list{{,.d}}; debootstrap needs one")
}

/// The debootstrap root, made once (the stamp names what it was made with); with `log`,
/// debootstrap's output goes there instead of to the terminal.
fn debootstrap(dir: &Path, log: Option<&Path>) -> anyhow::Result<PathBuf> {
    let base = dir.join("base");
    let stamp = base.join(".hms-debootstrap-complete");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == INCLUDE) {
        println!("vm-test --system: Debian root cached in {}", base.display());
        return Ok(base);
    }
    let tmp = dir.join("base.tmp");
    for d in [&base, &tmp] {
        if d.exists() {
            // An interrupted debootstrap can leave its /proc, /sys (or a bind of /dev)
            // mounted inside: removing the tree through them would reach this host's.
            let mounted = mounts_under(d);
            if !mounted.is_empty() {
                bail!(
                    "{} still has mounts inside ({}), left by an interrupted debootstrap: unmount them (`umount -R PATH`) and run again",
                    d.display(),
                    mounted.join(", ")
                );
            }
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    let mirror = mirror()?;
    let t = Instant::now();
    println!("vm-test --system: debootstrap bookworm from {mirror} (once; cached)");
    let mut cmd = tools::command("debootstrap");
    cmd.args([
        "--variant=minbase",
        &format!("--include={INCLUDE}"),
        "bookworm",
    ])
    .arg(&tmp)
    .arg(&mirror);
    if let Some(log) = log {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(out.try_clone()?).stderr(out);
    }
    // Ends with xtask (a failed build returns before the system VM is reached): SIGTERM, on
    // which debootstrap unmounts what it mounted in the root. The signal follows the thread
    // that started it, which waits for it to the end.
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    proc::run(&mut cmd).context("debootstrap of the guest's root")?;
    std::fs::write(tmp.join(".hms-debootstrap-complete"), INCLUDE)?;
    std::fs::rename(&tmp, &base)?;
    println!(
        "MEASURED: system VM: debootstrap took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(base)
}

/// Mount points at or below `dir` (from /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// The guest's root for this run: the cached base plus the packages, the demo services,
/// their units and the driver.
fn guest_root(
    dir: &Path,
    base: &Path,
    debs: &[(&str, PathBuf)],
    target: &Path,
) -> anyhow::Result<PathBuf> {
    let root = dir.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    proc::run(tools::command("cp").arg("-a").arg(base).arg(&root))
        .context("copying the Debian root")?;
    let put = |path: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let full = root.join(path.trim_start_matches('/'));
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&full);
        std::fs::write(&full, text).with_context(|| format!("writing {}", full.display()))?;
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    for (name, deb) in debs {
        let to = root.join("root/hms").join(name);
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(deb, &to).with_context(|| format!("copying {}", deb.display()))?;
    }
    put(
        "/root/hms/specs/eligibility.yaml",
        "name: eligibility-svc\ncgroup: eligibility.service\nport: 7102\npolicy: {allow_from: [payments-svc]}\n",
        0o644,
    )?;
    put(
        "/root/hms/specs/payments.yaml",
        "name: payments-svc\ncgroup: payments.service\nport: 7103\n",
        0o644,
    )?;
    let demo = root.join("usr/local/bin/demo-svc");
    std::fs::create_dir_all(demo.parent().unwrap())?;
    proc::run(
        tools::command("strip")
            .args(["--strip-debug", "-o"])
            .arg(&demo)
            .arg(target.join("debug/demo-svc")),
    )?;
    put("/usr/local/sbin/hms-vm-driver", DRIVER, 0o755)?;
    let unit = |desc: &str, exec: &str, extra: &str| {
        format!(
            "[Unit]\nDescription={desc}\n{extra}\n[Service]\nExecStart={exec}\n\n[Install]\nWantedBy=multi-user.target\n"
        )
    };
    let units = [
        (
            "hms-vm-driver.service",
            "[Unit]\nDescription=HMS system test driver (cargo xtask vm-test --system)\n\
             After=multi-user.target\n\n[Service]\nType=simple\n\
             ExecStart=/usr/local/sbin/hms-vm-driver\n\
             StandardOutput=journal+console\nStandardError=journal+console\n\n\
             [Install]\nWantedBy=multi-user.target\n"
                .to_string(),
        ),
        (
            "eligibility.service",
            unit(
                "demo eligibility-svc",
                "/usr/local/bin/demo-svc --role eligibility --listen 127.0.0.1:7102",
                "",
            ),
        ),
        (
            "payments.service",
            unit(
                "demo payments-svc",
                "/usr/local/bin/demo-svc --role payments --listen 127.0.0.1:7103",
                "",
            ),
        ),
        (
            "intruder.service",
            unit("a unit no policy allows", "/bin/sleep infinity", ""),
        ),
        (
            "hms-vm-resolver.service",
            unit(
                "the guest's own resolver (answers probe.test)",
                "/usr/sbin/dnsmasq --keep-in-foreground --no-resolv --no-hosts --user=root \
                 --listen-address=127.0.0.1 --bind-interfaces --port=53 \
                 --address=/probe.test/10.9.9.9",
                "Before=nss-lookup.target\nWants=nss-lookup.target\n",
            ),
        ),
    ];
    for (name, text) in &units {
        put(&format!("/etc/systemd/system/{name}"), text, 0o644)?;
        let link = root
            .join("etc/systemd/system/multi-user.target.wants")
            .join(name);
        std::fs::create_dir_all(link.parent().unwrap())?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}"), &link)?;
    }
    let default = root.join("etc/systemd/system/default.target");
    let _ = std::fs::remove_file(&default);
    std::os::unix::fs::symlink("/lib/systemd/system/multi-user.target", &default)?;
    put(
        "/etc/fstab",
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
        0o644,
    )?;
    // No package lists: the guest has no network, and apt would parse debootstrap's copy
    // of the archive's index (tens of MB, slow under emulation) at every install. apt then
    // resolves a local .deb's dependencies from what is installed (dpkg's status).
    for dir in ["var/lib/apt/lists", "var/cache/apt"] {
        let d = root.join(dir);
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
    }
    // A persistent journal: the driver reads how the reboot stopped the agent from the
    // boot before (journald keeps it on disk when this directory exists).
    std::fs::create_dir_all(root.join("var/log/journal"))?;
    put("/etc/hostname", "hms-vm\n", 0o644)?;
    put(
        "/etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 hms-vm\n::1 localhost\n",
        0o644,
    )?;
    put("/etc/resolv.conf", "nameserver 127.0.0.1\n", 0o644)?;
    // A fixed machine id: systemd would otherwise treat the first boot as a "first boot"
    // each run (presets, a warning), and journald needs one.
    put(
        "/etc/machine-id",
        "4853484d53564d54455354484d533031\n",
        0o444,
    )?;
    Ok(root)
}

/// busybox, the modules and an /init that mounts the disk and hands over to systemd.
fn initramfs(modules: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut fs = Rootfs::new();
    for d in ["/proc", "/sys", "/dev", "/newroot", "/modules"] {
        fs.dir(d);
    }
    let mut script = String::from(
        "#!/usr/bin/busybox sh\n\
         # The system VM's initramfs (xtask/src/vm_system.rs): load the disk's modules, mount\n\
         # /dev/vda, switch to its systemd.\n\
         export PATH=/usr/bin:/usr/sbin:/bin:/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n",
    );
    for (i, ko) in modules.iter().enumerate() {
        let name = format!(
            "/modules/{i:02}-{}",
            ko.file_name().unwrap().to_string_lossy()
        );
        fs.host_file(&name, ko)?;
        script.push_str(&format!("insmod {name} 2>/dev/null\n"));
    }
    script.push_str(
        "i=0\n\
         while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
         mount -t ext4 -o rw /dev/vda /newroot || { echo 'initramfs: cannot mount /dev/vda'; poweroff -f; }\n\
         umount /proc /sys\n\
         mount --move /dev /newroot/dev\n\
         exec switch_root /newroot /sbin/init\n",
    );
    fs.data("/init", script, 0o755);
    fs.busybox(Path::new("/usr/bin/busybox"))
        .context("busybox-static is missing: run `cargo xtask setup`")?;
    fs.write_cpio(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_counts_checks_and_needs_the_end() {
        let lines: Vec<String> = [
            "[  OK  ] Started x",
            "HMS-SYS-OK install (apt-get)",
            "HMS-SYS-TIME restart 1.2",
            "HMS-SYS-LOAD restart ok=300 failed=0",
            "HMS-SYS-FAIL policy-403: got 200",
        ]
        .map(String::from)
        .to_vec();
        let v = judge(&lines);
        assert_eq!(v.passed, 1);
        assert_eq!(v.failed, vec!["policy-403: got 200".to_string()]);
        assert_eq!(v.measured.len(), 2);
        assert!(!v.done);
        let mut lines = lines;
        lines.push("hms-vm-driver[1]: HMS-SYS-DONE".into());
        assert!(judge(&lines).done);
    }
}
