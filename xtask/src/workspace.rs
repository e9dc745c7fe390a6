//! Where things are: the workspace root, the cargo target directory and the cargo binary to
//! call. Owns path discovery only; never builds or runs anything.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
        .to_path_buf()
}

/// The cargo target directory, honouring `CARGO_TARGET_DIR` like cargo itself does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        None => root().join("target"),
    }
}

/// A `cargo` command run from the workspace root. Uses the cargo that launched xtask (`CARGO`)
/// so a pinned toolchain stays pinned in nested builds.
pub fn cargo() -> Command {
    let mut cmd = crate::tools::command("cargo");
    cmd.current_dir(root());
    // Not what cargo set for running xtask itself: ring's build script reruns when
    // CARGO_MANIFEST_DIR changes, so a build started from here (`.../xtask`) and one from
    // a shell (unset) would each rebuild ring and everything above it.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if crate::old_release_build::is_crate_env(&name) {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}
