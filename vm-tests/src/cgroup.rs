//! Throwaway cgroups and pin dirs for tests that attach real eBPF programs.
//!
//! Owns creating and destroying `hms-test-*` child cgroups under the host's cgroup v2 root and
//! `hms-test-*` pin dirs under /sys/fs/bpf. Must never touch a cgroup or pin dir it did not
//! create, and must clean up on drop even when the test panicked: killed processes, removed
//! cgroup, detached programs, removed pins.

use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// How long Drop waits for killed processes to leave the cgroup before giving up.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

fn unique_name(hint: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let hint: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(24)
        .collect();
    format!("hms-test-{hint}-{}-{n}", std::process::id())
}

/// A child cgroup of the cgroup v2 root, removed (with everything in it killed) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(name_hint: &str) -> anyhow::Result<TestCgroup> {
        let root = hms_node_agent::cgroup::v2_root()?;
        let path = root.join(unique_name(name_hint));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating test cgroup {} (not root?)", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's id for this cgroup (what `bpf_get_current_cgroup_id` reports inside it).
    pub fn id(&self) -> anyhow::Result<u64> {
        hms_node_agent::cgroup::cgroup_id(&self.path)
    }

    /// The listed program `name` (`crate::tools`), started inside this cgroup before it
    /// execs, so even its first syscall runs under the cgroup's hooks.
    pub fn command(&self, name: &str) -> Command {
        Self::command_in(&self.path, name)
    }

    /// One of the workspace's own binaries, started inside this cgroup.
    pub fn binary(&self, path: impl AsRef<Path>) -> Command {
        Self::binary_in(&self.path, path)
    }

    /// Like [`TestCgroup::command`], for any cgroup directory (e.g. a child of a test cgroup).
    pub fn command_in(dir: &Path, name: &str) -> Command {
        let mut cmd = crate::tools::command(name);
        Self::enter_at_exec(&mut cmd, dir);
        cmd
    }

    /// Like [`TestCgroup::binary`], for any cgroup directory.
    pub fn binary_in(dir: &Path, path: impl AsRef<Path>) -> Command {
        let mut cmd = crate::tools::workspace_binary(path);
        Self::enter_at_exec(&mut cmd, dir);
        cmd
    }

    /// Makes `cmd`'s process join cgroup `dir` between fork and exec.
    fn enter_at_exec(cmd: &mut Command, dir: &Path) {
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .expect("cgroup path has no NUL");
        // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close) on
        // memory prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" means "the writing process".
                let n = libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn kill_all(&self) {
        let kill_file = self.path.join("cgroup.kill");
        if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
            return;
        }
        for pid in self.pids() {
            // SAFETY: plain kill(2); pids come from our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + EMPTY_TIMEOUT;
        loop {
            self.kill_all();
            if self.pids().is_empty() {
                // An exiting task can keep the cgroup busy for a moment after leaving procs.
                // Child cgroups (services' own, made by tests or `hms-ctl run`) go first.
                remove_children(&self.path);
                match std::fs::remove_dir(&self.path) {
                    Ok(()) => return,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!("test cgroup {} not removed: {e}", self.path.display());
                        return;
                    }
                    Err(_) => {}
                }
            } else if Instant::now() >= deadline {
                eprintln!(
                    "test cgroup {} still has processes {:?}; left in place",
                    self.path.display(),
                    self.pids()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes every cgroup below `dir`, deepest first (cgroupfs only removes empty leaves).
fn remove_children(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_children(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// A unique pin dir path under /sys/fs/bpf (not created: `Redirector::start` does that).
/// On drop, `redirect::cleanup` detaches whatever was pinned there and removes it.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(name_hint: &str) -> PinDir {
        PinDir {
            path: Path::new("/sys/fs/bpf").join(unique_name(name_hint)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = hms_node_agent::redirect::cleanup(&self.path) {
            eprintln!("cleanup of pin dir {} failed: {e:#}", self.path.display());
        }
    }
}
