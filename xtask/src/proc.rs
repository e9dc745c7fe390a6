//! Child processes for xtask: running a command and checking its status, starting a child
//! inside a cgroup, and `Supervised`, a long-running child that is always stopped (SIGTERM,
//! then SIGKILL) when dropped, so error paths and Ctrl-C never leave it behind. Never creates
//! or removes cgroups (that is `cgroup`'s job).

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The command line as a user would type it, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$&|;{}".contains(c)) {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio, echoing it first; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = describe(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`; is it installed and on PATH?"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or None if it is missing or fails. For cheap
/// presence checks (`dpkg-query`, `rustup ... list`, `bpf-linker --version`).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes the child join `cgroup` (cgroup v2 directory) between fork and exec, so nothing it
/// runs ever executes outside the cgroup whose hooks redirect its traffic.
pub fn join_cgroup_at_exec(cmd: &mut Command, cgroup: &Path) -> anyhow::Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .context("cgroup path contains a NUL byte")?;
    // SAFETY: between fork and exec we only call async-signal-safe functions (open, write,
    // close) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" means "the writing process", i.e. this child.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

/// How long a child gets between SIGTERM and SIGKILL: enough for the agent to drain and
/// detach, short enough that a wedged child does not hold up teardown.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Where a supervised child's output goes besides its log file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Also print each line to our stdout, prefixed with the child's name.
    Prefixed,
    /// Log file only (for chatty children such as the agent).
    LogOnly,
}

/// A long-running child process that is stopped when dropped.
pub struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Supervised {
    /// Starts `cmd` in its own process group (so Ctrl-C reaches only xtask, which then stops
    /// children in order), with SIGTERM as its parent-death signal (so a killed xtask does not
    /// leave it running), stdout and stderr copied to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, echo: Echo) -> anyhow::Result<Self> {
        let line = describe(&cmd);
        let file = File::create(log).with_context(|| format!("creating log {}", log.display()))?;
        let file = Arc::new(Mutex::new(file));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}: `{line}`"))?;
        if let Some(out) = child.stdout.take() {
            pump(name, out, Arc::clone(&file), echo);
        }
        if let Some(err) = child.stderr.take() {
            pump(name, err, file, echo);
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
            exit: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the child has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                println!("   stopped {} ({status})", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "   {} ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.name
        );
        let _ = self.child.kill();
        self.exit = self.child.wait().ok();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// Copies a child's output to its log (and maybe our stdout) on a detached thread; the thread
/// ends at EOF, i.e. when the child and anything it forked have closed the pipe.
fn pump(name: &str, stream: impl Read + Send + 'static, log: Arc<Mutex<File>>, echo: Echo) {
    let name = name.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut file) = log.lock() {
                let _ = writeln!(file, "{line}");
            }
            if echo == Echo::Prefixed {
                println!("   [{name}] {line}");
            }
        }
    });
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
