//! `hms-node-agent install` / `uninstall` / `probe`, for real: the units it writes pass
//! `systemd-analyze verify`, install is idempotent and keeps an edited config, uninstall
//! leaves no file behind and nothing attached or pinned in the kernel, and the feature probe
//! finds everything on this kernel. Installs go into scratch roots (`--root`), never into
//! this host's /usr or /etc.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::bins;
use vm_tests::cgroup::TestCgroup;

const UNITS: [&str; 6] = [
    "hms-node-agent.service",
    "hms-node-agent-outbound.socket",
    "hms-node-agent-dns-udp.socket",
    "hms-node-agent-dns-tcp.socket",
    "hms-node-agent-inbound.socket",
    "hms-node-agent-metrics.socket",
];

/// Root is needed to load eBPF and create cgroups.
fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root (loads eBPF programs and creates cgroups)");
        return false;
    }
    true
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn agent(args: &[&str]) -> Output {
    vm_tests::tools::workspace_binary(bins::path("hms-node-agent"))
        .args(args)
        .output()
        .expect("running hms-node-agent")
}

fn agent_ok(args: &[&str]) -> String {
    let out = agent(args);
    assert!(
        out.status.success(),
        "hms-node-agent {args:?}: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch_root(hint: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("hms-install-{hint}-"))
        .tempdir()
        .expect("scratch root")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every path under `root`, relative, sorted; directories end in `/`.
fn walk(root: &Path) -> Vec<String> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ft = entry.file_type().expect("file type");
            if ft.is_dir() {
                out.push(format!("{rel}/"));
                go(root, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

/// ExecReload runs `/bin/sh -c "kill -HUP $MAINPID"`; verify checks, inside the root, that
/// /bin/sh is executable.
fn place_sh(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/sh", root.join("bin/sh")).expect("copying /bin/sh into the root");
}

#[test]
fn generated_units_pass_systemd_analyze_verify() {
    if !privileged() {
        return;
    }
    if which("systemd-analyze").is_none() {
        if std::env::var_os("HMS_IN_VM").is_some() {
            eprintln!("SKIPPED: the VM image carries no systemd; verified on the host run");
            return;
        }
        panic!(
            "`systemd-analyze` is not installed: run `cargo xtask setup` (it installs the Debian package `systemd`)"
        );
    }
    let defaults: &[&str] = &[];
    let custom: &[&str] = &[
        "--node-name",
        "verify-node",
        "--outbound",
        "127.0.0.1:25001",
        "--dns",
        "127.0.0.1:25053",
        "--inbound",
        "[::]:25008",
        "--state-dir",
        "/srv/hms-state",
        "--admin-socket",
        "/run/hms-x/agent.sock",
        "--pin-dir",
        "/sys/fs/bpf/hms-x",
        "--registry",
        "embedded",
        "--log-format",
        "json",
    ];
    for (hint, flags) in [("default", defaults), ("custom", custom)] {
        let root = scratch_root(hint);
        let mut args = vec!["install", "--root", s(root.path())];
        args.extend_from_slice(flags);
        agent_ok(&args);
        place_sh(root.path());
        // verify resolves dependencies (sysinit.target, sockets.target, ...) inside the root:
        // give it this host's unit library.
        let lib = root.path().join("usr/lib/systemd");
        std::fs::create_dir_all(&lib).unwrap();
        let cp = vm_tests::tools::command("cp")
            .args(["-a", "/usr/lib/systemd/system"])
            .arg(&lib)
            .output()
            .expect("cp");
        assert!(
            cp.status.success(),
            "copying the unit library: {}",
            describe(&cp)
        );

        let out = vm_tests::tools::command("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", s(root.path())))
            .args(UNITS)
            .output()
            .expect("running systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify ({hint} settings) complains: {}\nunits:\n{}",
            describe(&out),
            UNITS
                .iter()
                .map(
                    |u| std::fs::read_to_string(root.path().join("etc/systemd/system").join(u))
                        .unwrap_or_default()
                )
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// The Debian package's units (`hms-node-agent package-files`, what `cargo xtask deb` ships
/// in /lib/systemd/system) pass `systemd-analyze verify` too, with the binary where their
/// ExecStart says, and are the notify service the package promises.
#[test]
fn package_units_pass_systemd_analyze_verify() {
    if !privileged() {
        return;
    }
    if which("systemd-analyze").is_none() {
        if std::env::var_os("HMS_IN_VM").is_some() {
            eprintln!("SKIPPED: the VM image carries no systemd; verified on the host run");
            return;
        }
        panic!(
            "`systemd-analyze` is not installed: run `cargo xtask setup` (it installs the Debian package `systemd`)"
        );
    }
    let root = scratch_root("package");
    agent_ok(&["package-files", "--out", s(root.path())]);
    place_sh(root.path());
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(bins::path("hms-node-agent"), bin.join("hms-node-agent")).unwrap();
    let lib = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&lib).unwrap();
    let cp = vm_tests::tools::command("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&lib)
        .output()
        .expect("cp");
    assert!(
        cp.status.success(),
        "copying the unit library: {}",
        describe(&cp)
    );
    // The package's own directory, where the verify looks for them by name.
    for u in UNITS {
        std::fs::copy(
            root.path().join("lib/systemd/system").join(u),
            lib.join("system").join(u),
        )
        .unwrap();
    }
    let out = vm_tests::tools::command("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", s(root.path())))
        .args(UNITS)
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let service = std::fs::read_to_string(
        root.path()
            .join("lib/systemd/system/hms-node-agent.service"),
    )
    .unwrap();
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify of the package's units complains: {}\n{service}",
        describe(&out)
    );
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/hms-node-agent run --config /etc/hms/agent.yaml",
        "ExecReload=/bin/sh -c \"kill -HUP $MAINPID\"",
        "LimitNOFILE=524288",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "{line} missing:\n{service}"
        );
    }
    let caps: Vec<&str> = service
        .lines()
        .filter(|l| {
            l.starts_with("CapabilityBoundingSet=") || l.starts_with("AmbientCapabilities=")
        })
        .collect();
    assert_eq!(caps.len(), 2, "{service}");
    for l in caps {
        assert!(
            l.contains("CAP_NET_BIND_SERVICE") && !l.contains("CAP_SYS_ADMIN"),
            "{l}"
        );
    }
    // The conffile is what `run --config` reads: every key commented out, the defaults.
    let conf = std::fs::read_to_string(root.path().join("etc/hms/agent.yaml")).unwrap();
    assert!(
        conf.lines()
            .all(|l| l.trim().is_empty() || l.starts_with('#')),
        "{conf}"
    );
}

/// `bpftool cgroup show` ids of the programs attached to `cg`.
fn attached_ids(cg: &Path) -> Vec<u64> {
    let out = vm_tests::tools::command("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg)
        .output()
        .expect("bpftool (run `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "bpftool cgroup show: {}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let json: serde_json::Value = serde_json::from_str(&text).expect("bpftool JSON");
    json.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

fn prog_exists(id: u64) -> bool {
    vm_tests::tools::command("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn install_is_idempotent_and_uninstall_leaves_nothing() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("install").expect("test cgroup");
    let mut running = TestAgent::start(cg.path()).expect("agent");
    let ids = attached_ids(cg.path());
    assert!(
        !ids.is_empty(),
        "the agent attached nothing:\n{}",
        running.log()
    );
    let pin_dir = running.pin_dir.clone();
    // What a service stop leaves: the programs stay attached through their pins.
    running.stop().expect("stop agent");
    assert_eq!(
        attached_ids(cg.path()),
        ids,
        "pins keep the hooks after a stop"
    );

    let root = scratch_root("cycle");
    let r = s(root.path());
    let first = agent_ok(&["install", "--root", r, "--node-name", "node-a"]);
    let expected = [
        "etc/",
        "etc/hms/",
        "etc/hms/.installed",
        "etc/hms/agent.yaml",
        "etc/systemd/",
        "etc/systemd/system/",
        "etc/systemd/system/hms-node-agent-dns-tcp.socket",
        "etc/systemd/system/hms-node-agent-dns-udp.socket",
        "etc/systemd/system/hms-node-agent-inbound.socket",
        "etc/systemd/system/hms-node-agent-metrics.socket",
        "etc/systemd/system/hms-node-agent-outbound.socket",
        "etc/systemd/system/hms-node-agent.service",
        "usr/",
        "usr/local/",
        "usr/local/bin/",
        "usr/local/bin/hms-ctl",
        "usr/local/bin/hms-node-agent",
        "usr/local/bin/hms-svc",
    ];
    assert_eq!(walk(root.path()), expected, "install output:\n{first}");
    // The seed chapter's name for the CLI: a link, so both names run the same binary.
    assert_eq!(
        std::fs::read_link(root.path().join("usr/local/bin/hms-svc")).unwrap(),
        std::path::Path::new("hms-ctl")
    );
    let svc_help = vm_tests::tools::workspace_binary(root.path().join("usr/local/bin/hms-svc"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&svc_help.stdout).contains("Usage: hms-svc"),
        "{}",
        describe(&svc_help)
    );
    assert!(first.contains("not enabled: --root is not /"), "{first}");
    let config = root.path().join("etc/hms/agent.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\nnode-name: 'node-a'\n"), "{text}");
    assert_eq!(
        std::fs::read(root.path().join("usr/local/bin/hms-node-agent")).unwrap(),
        std::fs::read(bins::path("hms-node-agent")).unwrap()
    );
    // The installed binary runs and reads the installed config.
    let installed = root.path().join("usr/local/bin/hms-node-agent");
    let help = vm_tests::tools::workspace_binary(&installed)
        .arg("--version")
        .output()
        .unwrap();
    assert!(help.status.success(), "{}", describe(&help));

    // Idempotent: the same install again rewrites nothing.
    let again = agent_ok(&["install", "--root", r, "--node-name", "node-a"]);
    assert!(
        !again.contains("wrote"),
        "second install rewrote files:\n{again}"
    );
    // New settings replace a config install wrote itself...
    let changed = agent_ok(&["install", "--root", r, "--node-name", "node-b"]);
    assert!(
        changed.contains("wrote     /etc/hms/agent.yaml"),
        "{changed}"
    );
    // ...but not one the user edited, unless --force.
    let edited = std::fs::read_to_string(&config).unwrap() + "# tuned by hand\n";
    std::fs::write(&config, &edited).unwrap();
    let refused = agent(&["install", "--root", r, "--node-name", "node-c"]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "{}",
        describe(&refused)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    let kept = agent_ok(&["install", "--root", r]);
    assert!(kept.contains("kept      /etc/hms/agent.yaml"), "{kept}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    agent_ok(&["install", "--root", r, "--node-name", "node-c", "--force"]);
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("node-name: 'node-c'")
    );
    assert_eq!(walk(root.path()), expected);

    // State the agent would have written is kept unless --purge.
    let state = root.path().join("var/lib/hms");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("registry.json"), "{}").unwrap();

    let out = agent_ok(&["uninstall", "--root", r, "--pin-dir", s(&pin_dir)]);
    assert!(out.contains("kept the agent's state"), "{out}");
    assert_eq!(
        walk(root.path()),
        [
            "var/",
            "var/lib/",
            "var/lib/hms/",
            "var/lib/hms/registry.json"
        ],
        "uninstall output:\n{out}"
    );
    let out = agent_ok(&["uninstall", "--root", r, "--purge"]);
    assert_eq!(walk(root.path()), ["var/", "var/lib/"], "{out}");

    // A join token is a secret: the config holding it is root's alone.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    agent_ok(&["install", "--root", r, "--node-name", "node-t"]);
    assert_eq!(mode(&root.path().join("etc/hms/agent.yaml")), 0o644);
    let token_file = root.path().join("token");
    std::fs::write(&token_file, "hms2.secret\n").unwrap();
    agent_ok(&[
        "install",
        "--root",
        r,
        "--node-name",
        "node-t",
        "--join-token-file",
        token_file.to_str().unwrap(),
        "--force",
    ]);
    let config = std::fs::read_to_string(root.path().join("etc/hms/agent.yaml")).unwrap();
    assert!(config.contains("hms2.secret"), "{config}");
    std::fs::remove_file(&token_file).unwrap();
    assert_eq!(mode(&root.path().join("etc/hms/agent.yaml")), 0o600);
    agent_ok(&["uninstall", "--root", r, "--purge"]);

    // On the CA's host, a purge keeps the CA's keys: moved to a backup it names, 0700.
    agent_ok(&["install", "--root", r, "--node-name", "node-ca"]);
    let ca = root.path().join("var/lib/hms/ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("root-key.pem"), "the only copy").unwrap();
    // Not without the explicit confirmation: refused, and nothing changed.
    let refused = agent(&["uninstall", "--root", r, "--purge"]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    let said = describe(&refused);
    assert!(
        said.contains("--purge-ca-keys") && said.contains("hms-ctl ca backup"),
        "says what to run: {said}"
    );
    assert_eq!(
        std::fs::read_to_string(ca.join("root-key.pem")).unwrap(),
        "the only copy"
    );
    assert!(
        root.path().join("etc/hms/agent.yaml").exists(),
        "nothing removed: {said}"
    );
    let out = agent_ok(&["uninstall", "--root", r, "--purge", "--purge-ca-keys"]);
    let backups: Vec<String> = walk(root.path())
        .into_iter()
        .filter(|p| p.starts_with("var/backups/hms-ca-"))
        .collect();
    assert_eq!(
        backups.len(),
        2,
        "a directory and the key: {backups:?}\n{out}"
    );
    let kept = root.path().join(&backups[1]);
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "the only copy");
    assert_eq!(mode(kept.parent().unwrap()), 0o700);
    let named = format!("/{}", backups[0].trim_end_matches('/'));
    assert!(
        out.contains(&named) && out.contains("kept the mesh CA's keys"),
        "the purge says where the keys went ({named}):\n{out}"
    );
    assert!(!root.path().join("var/lib/hms").exists(), "{out}");

    // Nothing attached, nothing pinned, and the programs themselves are gone.
    assert!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    assert!(attached_ids(cg.path()).is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids.iter().any(|id| prog_exists(*id)) {
        assert!(
            Instant::now() < deadline,
            "programs {ids:?} still loaded after uninstall"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn probe_finds_every_feature_on_this_kernel() {
    if !privileged() {
        return;
    }
    let out = agent(&["probe"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "probe: {}", describe(&out));
    let rows: Vec<&str> = text.lines().skip(2).collect();
    for name in [
        "cgroup v2",
        "bpffs at pin dir",
        "bpf() syscall",
        "cgroup/connect4 hook",
        "cgroup/sendmsg4 hook",
        "cgroup/recvmsg4 hook",
        "sock_ops program",
        "ringbuf map",
        "sockhash map + sk_msg program",
        "cgroup bpf_link",
        "kernel BTF",
        "SO_MARK",
    ] {
        let row = rows
            .iter()
            .find(|r| r.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` row:\n{text}"));
        let status = row[name.len()..].split_whitespace().next();
        assert_eq!(status, Some("ok"), "{name}:\n{text}");
    }
    // A pin dir that is not on bpffs is reported by name, with what to do.
    let tmp = scratch_root("probe");
    let out = agent(&["probe", "--pin-dir", s(&tmp.path().join("pins"))]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bpffs at pin dir") && err.contains("mount -t bpf"),
        "{}",
        describe(&out)
    );
}
