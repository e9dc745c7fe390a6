//! An older release's agent, built from this repository's history, for the upgrade tests:
//! the sources of a commit are checked out (through a private index, so the repository's
//! HEAD, index and worktrees are left alone) into `target/old-release/<commit>/src` and built
//! there with a target dir of their own, kept between runs (a rebuild is then incremental).
//!
//! Owns that directory. Never touches the workspace's own `target/<profile>` binaries.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};

/// One build at a time in this process (the tests of a file share the binary).
static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// The `hms-node-agent` binary of `commit`, built on first use.
pub fn agent(commit: &str) -> anyhow::Result<PathBuf> {
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(c, _)| c == commit) {
        return Ok(path.clone());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("vm-tests lives in the workspace")?
        .to_path_buf();
    let target = target_dir()?;
    let dir = target.join("old-release").join(commit);
    let src = dir.join("src");
    let stamp = dir.join("checked-out");
    if !stamp.exists() {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        let out = crate::tools::command("git")
            .arg("-C")
            .arg(&repo)
            .arg("--work-tree")
            .arg(&src)
            .args(["checkout", commit, "--", "."])
            .env("GIT_INDEX_FILE", dir.join("index"))
            .output()
            .context("running git")?;
        if !out.status.success() {
            bail!(
                "checking out {commit} (needs the repository's history: a full clone): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(&stamp, commit)?;
    }
    let started = std::time::Instant::now();
    let out = crate::tools::command("cargo")
        .args(["build", "-p", "hms-node-agent", "--bin", "hms-node-agent"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!(
            "building the agent of {commit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "MEASURED: building the agent of {commit} took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let binary = dir.join("target/debug/hms-node-agent");
    if !binary.exists() {
        bail!("cargo built {commit} but {} is missing", binary.display());
    }
    built.push((commit.to_string(), binary.clone()));
    Ok(binary)
}

/// The cargo target dir (`target/<profile>/hms-node-agent` -> `target`).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(crate::bins::path("hms-node-agent")
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .to_path_buf())
}

/// Puts `binary` at `installed` the way a package manager replaces a file: another inode
/// renamed over the old path, so a running process keeps its own and the next start (or
/// `hms-ctl agent upgrade`, which starts `argv[0]` again) runs the new one.
///
/// A hard link, not a copy, where both are on one filesystem (`installed` under
/// [`target_dir`]): a copy holds the new file open for writing, and a child another test
/// thread forks meanwhile inherits that fd until it execs, which makes executing the file
/// fail with ETXTBSY.
pub fn install(binary: &Path, installed: &Path) -> anyhow::Result<()> {
    let tmp = installed.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(binary, &tmp).is_err() {
        std::fs::copy(binary, &tmp)
            .with_context(|| format!("copying {} to {}", binary.display(), tmp.display()))?;
    }
    std::fs::rename(&tmp, installed)
        .with_context(|| format!("renaming {} to {}", tmp.display(), installed.display()))?;
    Ok(())
}
