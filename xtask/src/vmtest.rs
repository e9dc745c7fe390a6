//! `cargo xtask vm-test`: the real-kernel suite (`vm-tests`) on a second kernel, Debian's
//! 6.1, inside a QEMU VM with no network. Owns the order of steps and the verdict: build the
//! binaries and the test executables, fetch the kernel (`vm_kernel`), assemble the initramfs
//! (`vm_rootfs`, `vm_init`), boot it (`vm_qemu`), and read the guest's `test result:` and
//! `HMS-VM-*` lines into counts. Never decides what a test checks.
//!
//! Inside the guest the workspace's target directory sits at the same absolute path as on
//! the host (`<target>/debug/deps/<test>`, `<target>/debug/hms-node-agent`, ...), so
//! `vm_tests::bins::path` and any compiled-in path work unchanged. Binaries are copied with
//! their debug info stripped (symbols stay, so backtraces still name functions): that keeps
//! the initramfs near 200 MB instead of over 1 GB.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::test::{Counts, parse_result_line};
use crate::tools;
use crate::vm_init::{EXIT_PREFIX, InitSpec, RESULT_PREFIX, TestBinary};
use crate::vm_qemu::{self, Accel, Vm};
use crate::vm_rootfs::Rootfs;
use crate::{interrupt, proc, setup, vm_init, vm_kernel, workspace};

/// Where the workspace's binaries live inside the guest (their host paths below it).
const GUEST_WORKSPACE: &str = "/hms-workspace";

/// The test files that run in the VM: everything that depends on the kernel (the eBPF
/// programs, their maps, ring buffers, sock_diag, cgroup hooks) and the data path on top of
/// it: redirect, DNS, proxy, taps, identity by cgroup, health checks, bad input, the sk_msg bypass. The rest of
/// the suite (timing-heavy resilience, multi-host with etcd and namespaces, upgrades under
/// load, install) exercises user-space logic that the host run already covers, and under the
/// VM's software emulation it would take far longer than CI allows.
const VM_SUITE: &[&str] = &[
    "redirect",
    "transparent_svc",
    "tap_and_metrics",
    "service_identity",
    "health_check",
    "http_bad_input",
    "http_grpc",
    "http_policy_trace",
    "sk_msg_bypass",
    // connect6/sendmsg6/recvmsg6 on Debian's 6.1 kernel: mapped VIPs, IPv6 VIPs, DNS over
    // IPv6, adopting IPv4-only pins (python3, curl and dig only; the heavy runtimes of
    // real_clients stay on the host).
    "dual_stack",
    "safe_host",
    // The egress refusal in connect4/6 and sendmsg4/6, and TLS origination to outside
    // systems in network namespaces (python3 with requests, curl, dig, nsenter).
    "egress",
];

/// Python packages from Debian's dist-packages the VM's tests import: `requests` and what
/// it imports (egress.rs calls outside systems with it).
const PYTHON_PACKAGES: &[&str] = &[
    "requests",
    "urllib3",
    "idna",
    "charset_normalizer",
    "chardet",
    "certifi",
    // Debian 12's urllib3 1.26 imports six (one file, not a package).
    "six",
];

/// The static busybox from busybox-static: the guest's /init shell and coreutils.
const BUSYBOX: &str = "/usr/bin/busybox";
/// glibc's NSS and resolver modules, loaded with dlopen (so ldd does not list them).
const NSS_LIBS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libnss_files.so.2",
    "/usr/lib/x86_64-linux-gnu/libnss_dns.so.2",
    "/usr/lib/x86_64-linux-gnu/libresolv.so.2",
];
/// Parts of Python's standard library no test imports; leaving them out saves ~30 MB.
const PYTHON_SKIP: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "config-3.11-x86_64-linux-gnu",
    "config-3.12-x86_64-linux-gnu",
];
const VM_MEMORY: &str = "2G";
const VM_CPUS: u32 = 2;
/// The whole suite takes a few minutes under TCG; a hung guest is killed after this.
const VM_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Two vCPUs: two test threads overlap waits without starving each other.
const TEST_THREADS: &str = "--test-threads=2";

/// What a VM run found.
pub struct VmRun {
    pub counts: Counts,
    /// Failures without a failing test to show for them (a crashed test binary, a guest
    /// that never reported): each counts as one failure.
    pub broken: Vec<String>,
}

/// The `cargo xtask vm-test` command: setup, then the suite in the VM.
pub fn run(test_args: &[String]) -> anyhow::Result<()> {
    interrupt::install();
    setup::run()?;
    let run = run_counted(test_args)?;
    for step in &run.broken {
        println!("vm-test: {step}");
    }
    let failed = run.counts.failed + run.broken.len() as u64;
    println!(
        "vm-test summary: {} passed, {} failed, {} skipped",
        run.counts.passed, failed, run.counts.ignored
    );
    if failed > 0 {
        bail!(
            "{failed} failed in the VM; the failing tests and their output are above (and in {})",
            console_log().display()
        );
    }
    Ok(())
}

fn vm_dir() -> PathBuf {
    workspace::target_dir().join("vm")
}

fn console_log() -> PathBuf {
    vm_dir().join("console.log")
}

/// Builds, boots and runs the suite; for `cargo xtask test`, which prints the summary.
pub fn run_counted(test_args: &[String]) -> anyhow::Result<VmRun> {
    let started = Instant::now();
    vm_qemu::check_installed()?;
    let vm_dir = vm_dir();
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    let built = build()?;
    interrupt::check()?;
    let kernel = vm_kernel::prepare(&vm_dir)?;
    println!("vm-test: kernel {} from {}", kernel.release, kernel.package);
    interrupt::check()?;

    let probe = vm_dir.join("probe.cpio");
    probe_initramfs(&probe)?;
    let accel = vm_qemu::choose_accel(&vm_dir, &kernel.vmlinuz, &probe)?;
    interrupt::check()?;

    let initrd = vm_dir.join("initramfs.cpio");
    let size = initramfs(&vm_dir, &kernel, &built, test_args, &initrd)?;
    println!(
        "vm-test: initramfs {} ({} MiB), {} test binaries, ready after {:.0?}",
        initrd.display(),
        size >> 20,
        built.tests.len(),
        started.elapsed()
    );
    if accel == Accel::Tcg {
        println!(
            "vm-test: booting Linux {} under TCG (software emulation: slower than the host)",
            kernel.release
        );
    } else {
        println!("vm-test: booting Linux {} under KVM", kernel.release);
    }
    let log = console_log();
    let outcome = vm_qemu::run(
        &Vm {
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            accel,
            memory: VM_MEMORY,
            cpus: VM_CPUS,
            timeout: VM_TIMEOUT,
            log: &log,
            disk: None,
            append: crate::vm_qemu::APPEND,
            reboot: false,
            max_boots: 1,
            finished_at: None,
        },
        |line| println!("   [vm] {line}"),
    )?;
    let mut run = read_console(&outcome.lines);
    if outcome.timed_out {
        run.broken.push(format!(
            "the VM did not finish within {VM_TIMEOUT:?} and was killed; the console is in {}",
            log.display()
        ));
    }
    println!(
        "vm-test: Linux {} ({accel}): {} passed, {} failed, {} skipped; VM {:.0?}, total {:.0?}",
        kernel.release,
        run.counts.passed,
        run.counts.failed,
        run.counts.ignored,
        outcome.elapsed,
        started.elapsed()
    );
    Ok(run)
}

/// The executables a VM run ships.
#[derive(Debug, Default, PartialEq)]
struct Built {
    /// Test executables (`<target>/debug/deps/<test>-<hash>`).
    tests: Vec<PathBuf>,
    /// Every workspace binary (`<target>/debug/<name>`): the tests find the agent, hms-ctl,
    /// demo-svc, grpc-probe, ... next to their own directory (`vm_tests::bins::path`).
    bins: Vec<PathBuf>,
}

/// Builds every workspace binary (as `cargo xtask test` does) and the vm-tests' test
/// executables; returns where cargo put them.
fn build() -> anyhow::Result<Built> {
    let mut built = Built::default();
    let mut bins = workspace::cargo();
    bins.args(["build", "--bins"]);
    let mut tests = workspace::cargo();
    tests.args(["test", "-p", "vm-tests", "--no-run"]);
    for mut cmd in [bins, tests] {
        cmd.arg("--message-format=json-render-diagnostics");
        let line = proc::describe(&cmd);
        println!("$ {line}");
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start `{line}`"))?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}); the compiler's errors are above",
                out.status
            );
        }
        read_artifacts(&String::from_utf8_lossy(&out.stdout), &mut built)?;
    }
    if built.tests.is_empty() {
        bail!("`cargo test -p vm-tests --no-run` built no test executables");
    }
    Ok(built)
}

/// Adds the `executable` of every artifact in cargo's JSON messages: test targets to
/// `tests`, binaries to `bins`.
fn read_artifacts(messages: &str, built: &mut Built) -> anyhow::Result<()> {
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let msg: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("reading cargo's message {line}"))?;
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let list = if msg["profile"]["test"] == true {
            &mut built.tests
        } else {
            &mut built.bins
        };
        list.push(PathBuf::from(exe));
    }
    for list in [&mut built.tests, &mut built.bins] {
        list.sort();
        list.dedup();
    }
    Ok(())
}

/// `.../deps/redirect-5de0ff9e34af55f1` -> `redirect`.
fn test_name(exe: &Path) -> String {
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    match name.rsplit_once('-') {
        Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_owned(),
        _ => name.into_owned(),
    }
}

/// The tiny initramfs for the KVM probe: busybox and a two-line init.
fn probe_initramfs(path: &Path) -> anyhow::Result<()> {
    let mut fs = Rootfs::new();
    fs.host_file(BUSYBOX, Path::new(BUSYBOX))
        .context("busybox-static is missing: run `cargo xtask setup`")?;
    fs.symlink("/usr/sbin/poweroff", "/usr/bin/busybox");
    fs.symlink("/usr/bin/echo", "/usr/bin/busybox");
    fs.data("/init", vm_init::PROBE_SCRIPT, 0o755);
    // Renamed into place: the system VM, running beside this one in `cargo xtask test`,
    // boots the probe too when it finds it.
    let tmp = path.with_extension("cpio.tmp");
    fs.write_cpio(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Assembles the suite's initramfs at `out`; returns its size.
fn initramfs(
    vm_dir: &Path,
    kernel: &vm_kernel::Kernel,
    built: &Built,
    test_args: &[String],
    out: &Path,
) -> anyhow::Result<u64> {
    let mut fs = Rootfs::new();
    for dir in [
        "/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/var/lib", "/var/tmp",
    ] {
        fs.dir(dir);
    }
    let stripped = vm_dir.join("stripped");
    std::fs::create_dir_all(&stripped)?;

    // Workspace binaries and tests keep their layout (tests find the binaries next to
    // their own directory) under GUEST_WORKSPACE, because the host path may lie under a
    // directory the guest mounts a tmpfs on (a checkout in /tmp, say).
    let inside = |p: &Path| Path::new(GUEST_WORKSPACE).join(p.strip_prefix("/").unwrap_or(p));
    for bin in &built.bins {
        let small = strip(bin, &stripped)?;
        fs.elf_at(&inside(bin), &small)?;
    }
    let mut guest_tests = Vec::new();
    for test in built
        .tests
        .iter()
        .filter(|t| VM_SUITE.contains(&test_name(t).as_str()))
    {
        let small = strip(test, &stripped)?;
        fs.elf_at(&inside(test), &small)?;
        guest_tests.push(TestBinary {
            name: test_name(test),
            path: inside(test).to_string_lossy().into_owned(),
        });
    }

    // Tools the tests call, with their libraries.
    for tool in tools::vm_programs() {
        let path = Path::new(tool);
        let real = std::fs::canonicalize(path).with_context(|| {
            format!("{tool} is missing (the vm-tests run it): run `cargo xtask setup`")
        })?;
        if real != path {
            fs.symlink(tool, &real.to_string_lossy());
        }
        fs.elf_with_libs(&real)?;
    }
    python_stdlib(&mut fs)?;
    for lib in NSS_LIBS {
        let path = Path::new(lib);
        if path.exists() {
            fs.elf_with_libs(path)?;
        }
    }
    etc(&mut fs);

    // Kernel modules, flat in one directory.
    let mut modules = Vec::new();
    for ko in &kernel.modules {
        let guest = format!(
            "/usr/lib/modules/{}/hms/{}",
            kernel.release,
            ko.file_name().unwrap_or_default().to_string_lossy()
        );
        fs.host_file(&guest, ko)?;
        modules.push(guest);
    }

    let workdir = workspace::root().join("vm-tests");
    let workdir = workdir.to_string_lossy();
    fs.dir(&workdir);
    let mut args = vec![TEST_THREADS.to_owned(), "--color=never".to_owned()];
    args.extend(test_args.iter().cloned());
    let init = vm_init::script(&InitSpec {
        modules: &modules,
        tests: &guest_tests,
        test_args: &args,
        workdir: &workdir,
    });
    fs.data("/init", init, 0o755);
    fs.busybox(Path::new(BUSYBOX))
        .context("busybox-static is missing: run `cargo xtask setup`")?;
    fs.write_cpio(out)
}

/// A copy of `src` without debug info in `dir`, reused while it is newer than `src`.
fn strip(src: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let dst = dir.join(src.file_name().context("binary without a file name")?);
    let fresh = match (std::fs::metadata(src), std::fs::metadata(&dst)) {
        (Ok(s), Ok(d)) => d.modified()? >= s.modified()?,
        (Err(err), _) => {
            return Err(err).with_context(|| {
                format!("{} is missing; was the build interrupted?", src.display())
            });
        }
        _ => false,
    };
    if !fresh {
        let status = tools::command("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dst)
            .arg(src)
            .status()
            .context("running strip (binutils): run `cargo xtask setup`")?;
        if !status.success() {
            bail!(
                "`strip --strip-debug -o {} {}` failed ({status})",
                dst.display(),
                src.display()
            );
        }
    }
    Ok(dst)
}

/// Python's standard library for `python3 -c 'import socket, sys, time ...'`.
fn python_stdlib(fs: &mut Rootfs) -> anyhow::Result<()> {
    let python = std::fs::canonicalize("/usr/bin/python3").context("/usr/bin/python3")?;
    let version = python
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let stdlib = Path::new("/usr/lib").join(&version);
    if !stdlib.join("os.py").exists() {
        bail!(
            "{} has no os.py: python3's standard library is not where Debian puts it",
            stdlib.display()
        );
    }
    fs.host_tree(&stdlib, PYTHON_SKIP)?;
    let dist = Path::new("/usr/lib/python3/dist-packages");
    for package in PYTHON_PACKAGES {
        let dir = dist.join(package);
        let module = dist.join(format!("{package}.py"));
        if module.exists() {
            fs.host_file(&module.to_string_lossy(), &module)?;
            continue;
        }
        // chardet and charset_normalizer are alternatives; requests needs one of them, and
        // a urllib3 2.x does not import six.
        if !dir.exists() && matches!(*package, "chardet" | "charset_normalizer" | "six") {
            continue;
        }
        if !dir.join("__init__.py").exists() {
            bail!(
                "{} is missing: the VM's tests need Python's {package} (`cargo xtask setup` installs python3-requests)",
                dir.display()
            );
        }
        fs.host_tree(&dir, &["__pycache__"])?;
    }
    Ok(())
}

/// Name resolution as on a host whose resolver is on loopback (the agent's port-53 hooks
/// take the queries), and the users the tools expect.
fn etc(fs: &mut Rootfs) {
    fs.data("/etc/resolv.conf", "nameserver 127.0.0.1\n", 0o644);
    fs.data(
        "/etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 hms-vm\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    );
    fs.data(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\nservices: files\nprotocols: files\n",
        0o644,
    );
    fs.data("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", 0o644);
    fs.data("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644);
    fs.data("/etc/hostname", "hms-vm\n", 0o644);
    for file in ["/etc/services", "/etc/protocols"] {
        if Path::new(file).exists() {
            let _ = fs.host_file(file, Path::new(file));
        }
    }
}

/// Counts from the guest's console: cargo's `test result:` lines, plus a broken step for each
/// binary that exited non-zero without a failing test, and for a run that never reported.
fn read_console(lines: &[String]) -> VmRun {
    let mut run = VmRun {
        counts: Counts::default(),
        broken: Vec::new(),
    };
    let mut since_exit = Counts::default();
    let mut result = None;
    for line in lines {
        let line = line.trim();
        if let Some(counts) = parse_result_line(line) {
            since_exit.add(counts);
            run.counts.add(counts);
        } else if let Some(rest) = line.strip_prefix(EXIT_PREFIX) {
            let mut words = rest.split_whitespace();
            let (name, rc) = (words.next().unwrap_or("?"), words.next().unwrap_or("?"));
            if rc != "0" && since_exit.failed == 0 {
                run.broken.push(format!(
                    "test binary {name} exited with status {rc} without a failing test (crash? see its output above)"
                ));
            }
            since_exit = Counts::default();
        } else if let Some(rest) = line.strip_prefix(RESULT_PREFIX) {
            result = Some(rest.trim().to_owned());
        }
    }
    if result.is_none() {
        run.broken.push(format!(
            "the VM never printed `{RESULT_PREFIX}` (kernel panic, crashed /init or timeout); see {}",
            console_log().display()
        ));
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn counts_results_and_crashed_binaries() {
        let run = read_console(&lines(
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n\
             HMS-VM-EXIT: redirect 0\n\
             thread 'main' panicked\n\
             HMS-VM-EXIT: agent 101\n\
             test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n\
             HMS-VM-EXIT: dns 101\n\
             HMS-VM-RESULT: failed\n",
        ));
        assert_eq!(run.counts.passed, 4);
        assert_eq!(run.counts.failed, 2);
        assert_eq!(run.counts.ignored, 1);
        assert_eq!(run.broken.len(), 1, "{:?}", run.broken);
        assert!(run.broken[0].contains("agent"));
    }

    #[test]
    fn a_run_without_the_sentinel_is_broken() {
        let run = read_console(&lines("Kernel panic - not syncing\n"));
        assert_eq!(run.broken.len(), 1);
    }

    #[test]
    fn sorts_cargo_artifacts_into_tests_and_binaries() {
        let messages = r#"{"reason":"compiler-artifact","profile":{"test":true},"executable":"/t/debug/deps/redirect-5de0ff9e34af55f1"}
{"reason":"compiler-artifact","profile":{"test":false},"executable":"/t/debug/hms-ctl"}
{"reason":"compiler-artifact","profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let mut built = Built::default();
        read_artifacts(messages, &mut built).unwrap();
        assert_eq!(
            built,
            Built {
                tests: vec![PathBuf::from("/t/debug/deps/redirect-5de0ff9e34af55f1")],
                bins: vec![PathBuf::from("/t/debug/hms-ctl")],
            }
        );
        assert_eq!(test_name(&built.tests[0]), "redirect");
    }
}
