//! What a `cargo xtask bench` run must not leave behind, checked by the tests that run it:
//! its cgroups (`hms-bench-<pid>-*` under the cgroup v2 root), pin dirs (the same names
//! under `/sys/fs/bpf`) and network namespaces (`hmsb<pid>-*`).

/// Panics naming every cgroup or pin dir of the bench run `pid` that is still there.
pub fn assert_none_left(pid: u64) {
    let root = hms_node_agent::cgroup::v2_root().expect("the cgroup v2 root");
    for (dir, prefix) in [
        (root, format!("hms-bench-{pid}-")),
        ("/sys/fs/bpf".into(), format!("hms-bench-{pid}-")),
        ("/run/netns".into(), format!("hmsb{pid}-")),
    ] {
        // No /run/netns at all is none left.
        let left: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(
            left.is_empty(),
            "the bench left {left:?} in {}",
            dir.display()
        );
    }
}
