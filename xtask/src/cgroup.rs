//! The demo's cgroup: finding the cgroup v2 mount (from `/proc/self/mountinfo`, never guessed:
//! `/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones), creating a
//! child cgroup, and removing it with whatever still runs inside killed. Never touches a
//! cgroup it did not create.
//!
//! The agent has the same mountinfo parsing; xtask cannot depend on the agent (see Cargo.toml).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The mount point of the cgroup v2 hierarchy.
pub fn v2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo to find the cgroup v2 mount")?;
    v2_root_from_mountinfo(&mountinfo).context(
        "no cgroup2 filesystem is mounted; HMS needs cgroup v2: mount it with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` (hybrid hosts) or boot with systemd's \
         unified hierarchy",
    )
}

/// Lines look like `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SRC SUPER`.
fn v2_root_from_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(left.split_whitespace().nth(4)?)))
    })
}

/// mountinfo writes space, tab, newline and backslash as three octal digits (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v2 directory this process created; removed (processes killed first) on drop.
pub struct OwnedCgroup {
    path: PathBuf,
}

impl OwnedCgroup {
    /// Creates `<root>/<name>`. A directory left over from an earlier run that was killed
    /// hard is emptied and removed first, so every run starts clean.
    pub fn create(root: &Path, name: &str) -> anyhow::Result<Self> {
        let path = root.join(name);
        if path.exists() {
            println!("   removing leftover cgroup {}", path.display());
            remove(&path)?;
        }
        std::fs::create_dir(&path).with_context(|| {
            format!(
                "creating cgroup {}; are you root (try `sudo -E cargo xtask demo`)?",
                path.display()
            )
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a child cgroup `<self>/<name>`; it goes away with this one. Programs attached
    /// to this cgroup also run for its children, so a child is still inside the mesh while
    /// giving the agent a distinct cgroup (and so identity) per service.
    pub fn child(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        match remove(&self.path) {
            Ok(()) => println!("   removed cgroup {}", self.path.display()),
            Err(err) => eprintln!(
                "warning: {err:#}; remove it by hand with `rmdir {}` once it is empty",
                self.path.display()
            ),
        }
    }
}

/// Kills everything in `dir` and its descendants, then removes them, deepest first.
fn remove(dir: &Path) -> anyhow::Result<()> {
    let children = std::fs::read_dir(dir)
        .with_context(|| format!("listing cgroup {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect::<Vec<_>>();
    for child in children {
        remove(&child)?;
    }
    kill_members(dir)?;
    // The kernel refuses rmdir (EBUSY) until killed members are fully gone; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() < deadline && err.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => {
                return Err(err).with_context(|| format!("removing cgroup {}", dir.display()));
            }
        }
    }
}

fn kill_members(dir: &Path) -> anyhow::Result<()> {
    let pids = members(dir)?;
    if pids.is_empty() {
        return Ok(());
    }
    println!("   killing processes still in {}: {pids:?}", dir.display());
    // cgroup.kill (Linux 5.14+) kills atomically, including processes forked meanwhile.
    let kill_file = dir.join("cgroup.kill");
    if std::fs::write(&kill_file, "1").is_err() {
        for pid in &pids {
            // SAFETY: plain kill(2); a pid that has exited meanwhile just fails with ESRCH.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !members(dir)?.is_empty() {
        if Instant::now() >= deadline {
            bail!("processes in {} did not exit after SIGKILL", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn members(dir: &Path) -> anyhow::Result<Vec<libc::pid_t>> {
    let procs = dir.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real cgroups, real processes: needs root, like the demo itself.
    #[test]
    fn teardown_kills_what_runs_in_the_demo_cgroup_and_removes_it() {
        use crate::tools;

        use crate::proc::{Echo, Supervised, join_cgroup_at_exec};

        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test creates a cgroup: run it as root"
        );
        let name = format!("hms-xtask-test-{}", std::process::id());
        let cgroup = OwnedCgroup::create(&v2_root().unwrap(), &name).unwrap();
        let service_dir = cgroup.child("svc").unwrap();

        let mut cmd = tools::command("sleep");
        cmd.arg("600");
        join_cgroup_at_exec(&mut cmd, &service_dir).unwrap();
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let supervised = Supervised::spawn("sleep", cmd, &log, Echo::LogOnly).unwrap();
        // A process nobody supervises, as a service's own child would be.
        let mut stray = tools::command("sleep");
        stray.arg("600");
        join_cgroup_at_exec(&mut stray, cgroup.path()).unwrap();
        let mut stray = stray.spawn().unwrap();

        assert_eq!(members(&service_dir).unwrap().len(), 1);
        assert_eq!(
            members(cgroup.path()).unwrap(),
            vec![stray.id() as libc::pid_t]
        );

        drop(supervised);
        let path = cgroup.path().to_path_buf();
        drop(cgroup);
        assert!(!path.exists(), "{} is still there", path.display());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stray.wait().unwrap().signal(), Some(libc::SIGKILL));
        let _ = std::fs::remove_file(log);
    }

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                         32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v2_root_from_mountinfo(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_a_pure_v2_mount_with_optional_fields() {
        let mountinfo =
            "29 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            v2_root_from_mountinfo(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn a_host_without_cgroup2_has_no_root() {
        let mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(v2_root_from_mountinfo(mountinfo), None);
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain\path"), r"/plain\path");
    }
}
