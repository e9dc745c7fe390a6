//! `hms-ctl run NAME -- CMD`: starts a command inside a service's cgroup, so the mesh knows
//! its calls come from that service (access policy, taps) and redirects them. The agent says
//! which directory that is; this module only creates it and moves the child there before
//! `exec`, so not one instruction of the command runs outside it.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Runs `argv` in `cgroup_dir` and returns its exit code.
pub fn run_in_cgroup(cgroup_dir: &Path, argv: &[String]) -> anyhow::Result<i32> {
    let Some((program, args)) = argv.split_first() else {
        bail!("nothing to run; usage: hms-ctl run NAME -- COMMAND [ARGS...]");
    };
    std::fs::create_dir_all(cgroup_dir).with_context(|| {
        format!(
            "creating cgroup {} (hms-ctl run needs root, like the agent)",
            cgroup_dir.display()
        )
    })?;
    let procs_path = cgroup_dir.join("cgroup.procs");
    // Opened before fork: the child only issues one write(2), nothing that allocates.
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {} (needs root)", procs_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only calls write(2) on an fd opened before fork.
    unsafe {
        cmd.pre_exec(move || (&procs).write_all(b"0"));
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting `{program}`"))?;
    Ok(status.code().unwrap_or(128 + 9))
}
