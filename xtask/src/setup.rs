//! `cargo xtask setup`: installs what building and running HMS needs and skips what is
//! present. Owns how each prerequisite is checked and installed; the list of them is
//! `tools.rs` (Debian packages, rustup's toolchain, bpf-linker). Checks are
//! cheap (dpkg-query, rustup, `bpf-linker --version`) so a no-op run takes about a second.
//! Where it cannot install (not root, no apt-get, no rustup) it prints the exact commands and
//! fails; it never installs anything not listed here. It also mounts bpffs at /sys/fs/bpf
//! when no one has (the agent pins there).

use anyhow::{Context, bail};

use crate::proc;
use crate::tools;
use crate::workspace;

/// The eBPF programs build with nightly's `-Z build-std`, which needs rust-src.
const NIGHTLY: &str = "nightly";
const BPF_LINKER_SERIES: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    println!("setup: checking prerequisites");
    let mut manual = Vec::new();
    apt(&mut manual)?;
    nightly_rust_src(&mut manual)?;
    bpffs(&mut manual)?;
    // bpf-linker links against the apt LLVM: only try it when the packages are in.
    if manual.is_empty() {
        bpf_linker(&mut manual)?;
    } else {
        manual.push(bpf_linker_install_line());
    }
    if !manual.is_empty() {
        bail!(
            "setup could not install everything; run these, then `cargo xtask setup` again:\n    {}",
            manual.join("\n    ")
        );
    }
    println!("setup: everything is present");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn apt(manual: &mut Vec<String>) -> anyhow::Result<()> {
    // Exactly the packages of the tool list (tools.rs), which the tools_guard test checks
    // against what the build, the demo and the tests really run.
    let packages = tools::debian_packages();
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("setup: apt packages present: {}", packages.join(" "));
        return Ok(());
    }
    let install = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    let have_apt = tools::installed("apt-get");
    if !is_root() || !have_apt {
        let why = if have_apt { "not root" } else { "no apt-get" };
        println!("setup: missing apt packages ({why}): {}", missing.join(" "));
        manual.push("sudo apt-get update".to_owned());
        manual.push(format!("sudo {install}"));
        return Ok(());
    }
    println!("setup: installing apt packages: {}", missing.join(" "));
    // Only refresh the package lists when we actually install: it is the slow part.
    proc::run(tools::command("apt-get").args(["update", "-q"]))?;
    // The list holds servers the tests start themselves (nginx, haproxy, etcd, nghttpd).
    // Their packages would start them as host daemons (nginx on port 80 answers what a
    // missed hook should refuse); a policy-rc.d that denies starts, for this install only,
    // keeps them off, as Debian's own container images do.
    let _no_daemons = NoServiceStarts::install()?;
    proc::run(
        tools::command("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// `/usr/sbin/policy-rc.d` answering 101 ("action forbidden") while it lives, so package
/// scripts (invoke-rc.d, deb-systemd-invoke) start no service. Left alone when the host has
/// its own policy.
struct NoServiceStarts {
    written: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn install() -> anyhow::Result<NoServiceStarts> {
        use std::os::unix::fs::PermissionsExt as _;
        if std::path::Path::new(POLICY_RC_D).exists() {
            return Ok(NoServiceStarts { written: false });
        }
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# Written by `cargo xtask setup` for one apt-get install: start no service.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(NoServiceStarts { written: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.written {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    proc::probe(tools::command("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn nightly_rust_src(manual: &mut Vec<String>) -> anyhow::Result<()> {
    let Some(toolchains) = proc::probe(tools::command("rustup").args(["toolchain", "list"])) else {
        println!("setup: rustup not found; the eBPF build needs a nightly toolchain with rust-src");
        manual.push("curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh".to_owned());
        manual.push(format!("rustup toolchain install {NIGHTLY}"));
        manual.push(format!(
            "rustup component add rust-src --toolchain {NIGHTLY}"
        ));
        return Ok(());
    };
    let has_nightly = toolchains
        .lines()
        .any(|l| l.starts_with(&format!("{NIGHTLY}-")) || l.trim() == NIGHTLY);
    if has_nightly {
        println!("setup: {NIGHTLY} toolchain present");
    } else {
        println!("setup: installing the {NIGHTLY} toolchain");
        proc::run(tools::command("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = proc::probe(tools::command("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.trim() == "rust-src") {
        println!("setup: {NIGHTLY} rust-src present");
    } else {
        println!("setup: installing {NIGHTLY} rust-src");
        proc::run(tools::command("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

/// Where the agent pins its links and maps. systemd mounts bpffs here at boot; minimal hosts
/// and containers often do not, and then the agent (and the vm-tests) cannot pin anything.
const BPFFS: &str = "/sys/fs/bpf";

fn bpffs(manual: &mut Vec<String>) -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo to check for bpffs")?;
    if bpffs_mounted(&mountinfo) {
        println!("setup: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    let mount = format!("mount -t bpf bpf {BPFFS}");
    if !is_root() {
        println!("setup: bpffs is not mounted at {BPFFS} (not root)");
        manual.push(format!("sudo {mount}"));
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    proc::run(tools::command("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Whether a `bpf` filesystem is mounted exactly at BPFFS (fields as in `cgroup`).
fn bpffs_mounted(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(left, right)| {
            right.split_whitespace().next() == Some("bpf")
                && left.split_whitespace().nth(4) == Some(BPFFS)
        })
    })
}

/// `bpf-linker 0.13.0` -> true for the series we pin.
fn bpf_linker_version_ok(output: &str) -> bool {
    output
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v == BPF_LINKER_SERIES || v.starts_with(&format!("{BPF_LINKER_SERIES}.")))
}

fn bpf_linker_install_line() -> String {
    format!(
        "LLVM_SYS_221_PREFIX={LLVM_PREFIX} LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
         --version ^{BPF_LINKER_SERIES} --no-default-features --features llvm-22"
    )
}

fn bpf_linker(manual: &mut Vec<String>) -> anyhow::Result<()> {
    match proc::probe(tools::command("bpf-linker").arg("--version")) {
        Some(version) if bpf_linker_version_ok(&version) => {
            println!("setup: {} present", version.trim());
            return Ok(());
        }
        Some(version) => println!(
            "setup: found {}, need {BPF_LINKER_SERIES}.x; reinstalling",
            version.trim()
        ),
        None => println!(
            "setup: installing bpf-linker {BPF_LINKER_SERIES}.x (builds from source, a few minutes)"
        ),
    }
    // Both variables: llvm-sys reads LLVM_SYS_221_PREFIX, but bpf-linker's own build script
    // picks the libLLVM to link from LLVM_PREFIX and otherwise finds a wrong one.
    proc::run(
        workspace::cargo()
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("^{BPF_LINKER_SERIES}"))
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    match proc::probe(tools::command("bpf-linker").arg("--version")) {
        Some(version) if bpf_linker_version_ok(&version) => {
            println!("setup: installed {}", version.trim());
        }
        _ => {
            println!("setup: bpf-linker was installed but is not the one on PATH");
            manual.push("export PATH=\"$HOME/.cargo/bin:$PATH\"".to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_pinned_bpf_linker_series() {
        assert!(bpf_linker_version_ok("bpf-linker 0.13.0\n"));
        assert!(bpf_linker_version_ok("bpf-linker 0.13.2"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.9.14"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.130.0"));
        assert!(!bpf_linker_version_ok(""));
    }

    #[test]
    fn sees_bpffs_only_where_the_agent_pins() {
        let mounted = "40 22 0:37 / /sys/fs/bpf rw,nosuid shared:15 - bpf bpf rw,mode=700\n";
        assert!(bpffs_mounted(mounted));
        let elsewhere = "40 22 0:37 / /mnt/bpf rw - bpf bpf rw\n";
        assert!(!bpffs_mounted(elsewhere));
        assert!(!bpffs_mounted(
            "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        ));
    }
}
