//! An older release's agent, built from this repository's history, for the upgrade tests
//! (checked out and built by `old_release_build`, into `target/old-release/<commit>/`, kept
//! between runs), and installing a binary the way a package manager replaces it.
//!
//! Owns the per-process memo of what was built. Never touches the workspace's own
//! `target/<profile>` binaries.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

/// One build at a time in this process (the tests of a file share the binary).
static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// The `hms-node-agent` binary of `commit`, built on first use (with the release's hms-ctl:
/// `old_release_build` builds both in one go for this test and the system VM alike).
pub fn agent(commit: &str) -> anyhow::Result<PathBuf> {
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(c, _)| c == commit) {
        return Ok(path.clone());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("vm-tests lives in the workspace")?
        .to_path_buf();
    let bins = crate::old_release_build::build(&repo, &target_dir()?, commit)?;
    let binary = bins.join("hms-node-agent");
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
