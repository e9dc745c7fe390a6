//! Locating the workspace's binaries (hms-node-agent, hms-ctl, demo-svc) next to the test
//! executable, so tests run exactly what a user runs.

use std::path::PathBuf;

/// `target/<profile>/<name>`. Panics with what to run when it has not been built.
pub fn path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test-binary> -> target/debug
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `cargo xtask test` does it)",
        p.display()
    );
    p
}
