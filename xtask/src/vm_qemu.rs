//! Running the VM: QEMU with the kernel and initramfs, no network device (`-nic none`; the
//! tests only use loopback inside the guest), serial console on stdout. Owns choosing the
//! accelerator, the time limit (qemu is killed when it is exceeded, when xtask is interrupted
//! and when xtask dies), and streaming the console to the user and to a log file. Never
//! interprets the console beyond the probe's sentinel (`vmtest` does).
//!
//! KVM: the CI hosts expose a paravirtual nested /dev/kvm on which this kernel does not boot,
//! so KVM is used only when a probe boot (a two-line init that prints a sentinel) succeeds
//! under it; otherwise TCG, which boots this kernel in about 5 s here. The probe's verdict
//! is cached in `target/vm/accel` per host kernel and guest kernel.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::interrupt;
use crate::tools;

const QEMU: &str = "qemu-system-x86_64";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub struct Vm<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub accel: Accel,
    pub memory: &'a str,
    pub cpus: u32,
    pub timeout: Duration,
    /// Every console line is appended here.
    pub log: &'a Path,
    /// A raw disk image as virtio-blk (`/dev/vda` in the guest), for a guest whose root
    /// survives a reboot (`vm-test --system`).
    pub disk: Option<&'a Path>,
    /// The kernel command line.
    pub append: &'a str,
    /// Let a guest reboot (qemu restarts it with the same kernel, initrd and disk) instead
    /// of exiting at the first reboot.
    pub reboot: bool,
    /// With `reboot`: kill qemu when the firmware starts more boots than this (a guest that
    /// panics at boot would otherwise reboot until the time limit).
    pub max_boots: u32,
    /// A console line that says the guest has nothing more to report: qemu is stopped right
    /// there instead of waiting for the guest's own shutdown (under emulation a systemd
    /// guest takes many seconds to power off, and nothing is checked after the line).
    pub finished_at: Option<&'a str>,
}

/// The suite VM's kernel command line.
pub const APPEND: &str = "console=ttyS0 panic=-1 quiet";

pub struct Outcome {
    /// Console lines, without `\r`.
    pub lines: Vec<String>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Boots the VM and waits for qemu to exit (the guest powers off) or the time limit. Each
/// console line goes to `on_line` as it arrives.
pub fn run(vm: &Vm<'_>, mut on_line: impl FnMut(&str)) -> anyhow::Result<Outcome> {
    let mut cmd = tools::command(QEMU);
    cmd.args(["-accel", vm.accel.name()]);
    if vm.accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    cmd.args(["-m", vm.memory])
        .args(["-smp", &vm.cpus.to_string()])
        .args(["-nographic", "-monitor", "none", "-nic", "none"])
        .args(if vm.reboot { None } else { Some("-no-reboot") })
        .arg("-kernel")
        .arg(vm.kernel)
        .arg("-initrd")
        .arg(vm.initrd)
        .args(["-append", vm.append]);
    if let Some(disk) = vm.disk {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            disk.display()
        ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a Ctrl-C reaches only xtask, which then kills qemu itself.
        .process_group(0);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let line = crate::proc::describe(&cmd);
    println!("$ {line}");
    let mut log = File::create(vm.log).with_context(|| format!("creating {}", vm.log.display()))?;
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "could not start {QEMU}; install it with `cargo xtask setup` (package qemu-system-x86)"
        )
    })?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let stderr = child.stderr.take().context("qemu's stderr")?;
    let readers = [pump(stdout, "", tx.clone()), pump(stderr, "qemu: ", tx)];
    let deadline = start + vm.timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    let mut finished = false;
    let mut boots = 0;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(text) => {
                // Seconds since qemu started on each logged line: where a boot spends its
                // time shows in the log, with `quiet` too.
                let _ = writeln!(log, "[{:8.1}] {text}", start.elapsed().as_secs_f64());
                on_line(&text);
                if text.contains("Booting from ROM") {
                    boots += 1;
                    if vm.reboot && boots > vm.max_boots {
                        let _ = writeln!(log, "xtask: boot {boots} is one too many; stopping qemu");
                        let _ = child.kill();
                    }
                }
                if vm.finished_at.is_some_and(|m| text.contains(m)) && !finished {
                    finished = true;
                    let _ = writeln!(log, "xtask: the guest said it is done; stopping qemu");
                    let _ = child.kill();
                }
                lines.push(text);
            }
            // Both pipes closed: qemu (and anything holding its pipes) has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline || interrupt::requested() {
            timed_out = !interrupt::requested();
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    for reader in readers {
        let _ = reader.join();
    }
    // Lines that arrived between the kill and the end of the pipes.
    for text in rx.try_iter() {
        let _ = writeln!(log, "{text}");
        on_line(&text);
        lines.push(text);
    }
    interrupt::check()?;
    if !timed_out && !finished && !status.success() {
        let tail: Vec<&str> = lines
            .iter()
            .rev()
            .take(20)
            .rev()
            .map(String::as_str)
            .collect();
        bail!(
            "{QEMU} failed ({status}); last console lines:\n{}\n(full log: {})",
            tail.join("\n"),
            vm.log.display()
        );
    }
    Ok(Outcome {
        lines,
        timed_out,
        elapsed: start.elapsed(),
    })
}

fn pump(
    stream: impl Read + Send + 'static,
    prefix: &'static str,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let text = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(format!("{prefix}{text}")).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// The accelerator to use: `HMS_VM_ACCEL=kvm|tcg` if set, else the cached probe verdict, else
/// a probe boot under KVM (only when /dev/kvm can be opened), else TCG.
pub fn choose_accel(vm_dir: &Path, kernel: &Path, probe_initrd: &Path) -> anyhow::Result<Accel> {
    match std::env::var("HMS_VM_ACCEL").ok().as_deref() {
        Some("kvm") => return Ok(Accel::Kvm),
        Some("tcg") => return Ok(Accel::Tcg),
        Some(other) if !other.is_empty() => {
            bail!("HMS_VM_ACCEL={other} is not understood; use kvm or tcg (or unset it to probe)")
        }
        _ => {}
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("vm-test: /dev/kvm is not usable; using TCG (software emulation)");
        return Ok(Accel::Tcg);
    }
    let cache = vm_dir.join("accel");
    let key = format!("{} {}", host_release(), kernel.display());
    if let Some(accel) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|text| cached_verdict(&text, &key))
    {
        println!(
            "vm-test: using {accel} (probed before; delete {} to probe again)",
            cache.display()
        );
        return Ok(accel);
    }
    println!("vm-test: probing whether this kernel boots under KVM here");
    let log = vm_dir.join("probe-console.log");
    let outcome = run(
        &Vm {
            kernel,
            initrd: probe_initrd,
            accel: Accel::Kvm,
            memory: "256M",
            cpus: 1,
            timeout: Duration::from_secs(20),
            log: &log,
            disk: None,
            append: APPEND,
            reboot: false,
            max_boots: 1,
            finished_at: None,
        },
        |_| {},
    );
    let accel = match outcome {
        Ok(o) if o.lines.iter().any(|l| l.contains(crate::vm_init::PROBE_OK)) => Accel::Kvm,
        Ok(_) => {
            println!(
                "vm-test: the kernel did not boot under KVM (see {}); using TCG",
                log.display()
            );
            Accel::Tcg
        }
        Err(err) => {
            println!("vm-test: KVM probe failed ({err:#}); using TCG");
            Accel::Tcg
        }
    };
    let _ = std::fs::write(&cache, format!("{key}\n{accel}\n"));
    Ok(accel)
}

fn cached_verdict(text: &str, key: &str) -> Option<Accel> {
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    match lines.next()? {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Where qemu is, for a clear error before building anything.
pub fn check_installed() -> anyhow::Result<PathBuf> {
    if !tools::installed(QEMU) {
        bail!("{QEMU} is not installed: run `cargo xtask setup` (installs qemu-system-x86)");
    }
    Ok(tools::path_of(QEMU))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_a_probe_only_for_the_same_kernels() {
        let text = "6.18.44 /t/vmlinuz\ntcg\n";
        assert_eq!(cached_verdict(text, "6.18.44 /t/vmlinuz"), Some(Accel::Tcg));
        assert_eq!(cached_verdict(text, "6.19.0 /t/vmlinuz"), None);
        assert_eq!(
            cached_verdict("6.18.44 /t/vmlinuz\n", "6.18.44 /t/vmlinuz"),
            None
        );
    }
}
