//! The older release both upgrade tests start from, and the one way it is built: the host's
//! vm-tests/tests/upgrade_layout.rs (its agent, through `old_release`) and `cargo xtask
//! vm-test --system` (its agent and hms-ctl, packaged as the old .deb; xtask includes this
//! file with `#[path]`). One definition, so both build the same commit with the same cargo
//! command into the same kept target dir, and whichever runs second finds it built (in
//! `cargo xtask test` the host's upgrade test builds it, the system VM reuses it).
//!
//! Owns `<target>/old-release/<commit>/` (the checked-out sources through a private index,
//! so the repository's HEAD, index and worktrees are left alone, and the build's own target
//! dir). Never touches the workspace's own `target/<profile>` binaries. Uses only std,
//! anyhow and the tool list (`crate::tools`), which both crates have.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The release before the pin-layout change (`OrigDst` 48 -> 56 bytes) and before
/// Type=notify.
pub const COMMIT: &str = "79719c2da50d4ebde004a5f9b39f2a54033d8325";

/// What is built of it, in one cargo invocation: both packages together, so their shared
/// dependencies are compiled once with one set of features. (Built one package per
/// invocation, as before, the two unify features differently and hms-ctl alone cost as much
/// as the agent again.)
pub const BINARIES: &[&str] = &["hms-node-agent", "hms-ctl"];

/// Checks out `commit` (once) and builds [`BINARIES`]; returns the directory they are in
/// (`<target>/old-release/<commit>/target/debug`). `repo` is the repository whose history
/// holds the commit; `target` the workspace's cargo target dir.
pub fn build(repo: &Path, target: &Path, commit: &str) -> anyhow::Result<PathBuf> {
    let dir = target.join("old-release").join(commit);
    let src = dir.join("src");
    let stamp = dir.join("checked-out");
    if !stamp.exists() {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        let out = crate::tools::command("git")
            .arg("-C")
            .arg(repo)
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
    let mut cargo = crate::tools::command("cargo");
    cargo.arg("build");
    for bin in BINARIES {
        cargo.args(["-p", bin]);
    }
    for bin in BINARIES {
        cargo.args(["--bin", bin]);
    }
    // What cargo set for the process calling this (xtask, or a test binary of vm-tests)
    // is not inherited: ring's build script declares `rerun-if-env-changed` on
    // CARGO_MANIFEST_DIR, so a build started from xtask (`.../xtask`) and one from
    // upgrade_layout.rs (`.../vm-tests`) would each find the other's stale and rebuild ring
    // and everything above it (64 s here) instead of reusing it.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_crate_env(&name) {
            cargo.env_remove(name.as_ref());
        }
    }
    let started = std::time::Instant::now();
    let out = cargo
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!(
            "building {} of {commit}: {}",
            BINARIES.join(" and "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "MEASURED: building {} of {commit:.7} took {:.0} s",
        BINARIES.join(" and "),
        started.elapsed().as_secs_f64()
    );
    let bins = dir.join("target/debug");
    for bin in BINARIES {
        if !bins.join(bin).exists() {
            bail!(
                "cargo built {commit} but {} is missing",
                bins.join(bin).display()
            );
        }
    }
    Ok(bins)
}

/// The variables cargo sets for a crate's own build or run (`cargo run`, `cargo test`), as
/// opposed to the user's settings (CARGO_HOME, CARGO_NET_*, ...).
fn is_crate_env(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}
