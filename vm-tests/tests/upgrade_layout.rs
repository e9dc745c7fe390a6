//! Upgrades across a change of the pinned eBPF layout: the new build attaches its own pin set
//! (`layout-<version>/`) beside the old one, takes the listeners over, then retires the old
//! set; calls made meanwhile all succeed, and afterwards one generation is attached.
//!
//! The "other layout" is a real older release, not a layout-skewed twin of this code:
//! commit [`OLD_RELEASE`], the last one before `OrigDst` gained `uid` (48 -> 56 bytes, and
//! `FlowState`, `FlowEvent`, `OrigDst6` with it), which pins directly in the pin dir as every
//! release before versioned pin sets does. That is exactly what users upgrade from, including
//! the hand-over protocol and the old programs' behaviour beside the new ones, which a twin
//! with a build-time switch would only imitate. The cost is one build of that commit's agent
//! (`vm_tests::old_release`: about 2 minutes on 2 cores from a warm cargo registry, into
//! `target/old-release/`, incremental on later runs), well inside the suite's 30 minute
//! budget; CI clones the repository, so the commit's history is there. Like the other
//! upgrade tests this file is not in the VM suite (`xtask/src/vmtest.rs`); run there anyway
//! (no cargo, no sources), its tests say they did not run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;
use vm_tests::load::{finish_load, start_load};
use vm_tests::old_release;

/// The release before the `OrigDst.uid` layout change (and before versioned pin sets).
const OLD_RELEASE: &str = vm_tests::old_release_build::COMMIT;

/// The cgroup hooks one generation attaches (sk_msg sits on its sockhash, not the cgroup).
const HOOKS_PER_SET: usize = 10;

fn old_agent() -> Option<PathBuf> {
    if vm_tests::in_vm() {
        eprintln!("NOT RUN: the VM has neither cargo nor the sources to build {OLD_RELEASE}");
        return None;
    }
    Some(old_release::agent(OLD_RELEASE).expect("building the older release's agent"))
}

fn new_agent() -> PathBuf {
    vm_tests::bins::path("hms-node-agent")
}

/// The agent binary as a package installs it: one path, replaced on upgrade.
struct Installed {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Installed {
    fn with(binary: &Path) -> Installed {
        // Beside the binaries, so installing is a hard link (see `old_release::install`).
        let dir = tempfile::Builder::new()
            .prefix("hms-installed-")
            .tempdir_in(old_release::target_dir().unwrap())
            .unwrap();
        let path = dir.path().join("hms-node-agent");
        old_release::install(binary, &path).unwrap();
        Installed { _dir: dir, path }
    }

    fn replace_with(&self, binary: &Path) {
        old_release::install(binary, &self.path).unwrap();
    }
}

/// `(program name, attach type)` of every program attached to the cgroup itself.
fn cgroup_programs(cg: &TestCgroup) -> Vec<(String, String)> {
    let out = vm_tests::tools::command("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg.path())
        .output()
        .expect("bpftool (run `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let json: serde_json::Value = serde_json::from_str(&text).expect("bpftool JSON");
    json.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["attach_type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Exactly one generation: every hook once.
fn assert_one_generation(cg: &TestCgroup, agent: &TestAgent) {
    let progs = cgroup_programs(cg);
    assert_eq!(progs.len(), HOOKS_PER_SET, "one set attached: {progs:#?}");
    let mut names: Vec<&str> = progs.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), HOOKS_PER_SET, "each hook once: {progs:#?}");
    let entries = pin_dir_entries(&agent.pin_dir);
    let set = agent.pin_set();
    assert_eq!(
        entries,
        vec![set.file_name().unwrap().to_string_lossy().into_owned()],
        "the pin dir holds this build's set and nothing else"
    );
}

fn pin_dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits (bounded) until the pin dir holds only the serving agent's set, i.e. the older one
/// was retired; returns when that was seen.
fn wait_for_retirement(agent: &TestAgent) -> Instant {
    let set = agent.pin_set();
    let only = vec![set.file_name().unwrap().to_string_lossy().into_owned()];
    // Settle (1 s) + the consumers' grace (5 s) + polling.
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(30));
    loop {
        if pin_dir_entries(&agent.pin_dir) == only {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the older pin set was not retired: {:?}\n{}",
            pin_dir_entries(&agent.pin_dir),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn upgrade(agent: &TestAgent) -> u32 {
    let before = agent.pid().unwrap();
    let out = agent.ctl(&["agent", "upgrade"]);
    assert!(
        out.status.success(),
        "upgrade failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let after = agent.pid().unwrap();
    assert_ne!(before, after, "the upgrade replaced the process");
    after
}

fn curl_ok(cg: &TestCgroup, agent: &TestAgent, url: &str) {
    let out = cg
        .command("curl")
        .args([
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .expect("curl (run `cargo xtask setup`)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "curl {url}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
}

fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn an_upgrade_from_the_release_before_a_layout_change_fails_no_request_and_leaves_one_set() {
    upgrade_from_the_release_under_load(false);
}

/// The same with the agents inside the meshed cgroup, as with the default cgroup (the root):
/// the sk_msg bypass is on, so the release's sock_ops puts both ends of the connections its
/// connect4 redirected into its sockhash, the new agent's proxy ends included, and the set's
/// maps stay until those connections closed.
#[test]
fn an_upgrade_across_a_layout_change_with_the_sk_msg_bypass_on_fails_no_request() {
    upgrade_from_the_release_under_load(true);
}

fn upgrade_from_the_release_under_load(inside_cgroup: bool) {
    let Some(old) = old_agent() else { return };
    let installed = Installed::with(&old);
    let cg = TestCgroup::new("layout-up").unwrap();
    let agent = TestAgent::start_binary(cg.path(), installed.path.clone(), inside_cgroup).unwrap();
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(
        status["sk_msg"]["enabled"], inside_cgroup,
        "the bypass is on exactly inside the cgroup: {status}"
    );
    let backend = Backend::start("payments-svc", 0).unwrap();
    agent.deploy("payments-svc", backend.addr.port()).unwrap();
    // The older release pins straight into the pin dir.
    assert!(agent.pin_dir.join("link_connect4").exists());
    assert!(
        pin_dir_entries(&agent.pin_dir)
            .iter()
            .all(|n| !n.starts_with("layout-")),
        "{:?}",
        pin_dir_entries(&agent.pin_dir)
    );
    assert_eq!(cgroup_programs(&cg).len(), HOOKS_PER_SET);

    let secs = 20;
    let load = start_load(&cg, "payments-svc", secs, 200);
    std::thread::sleep(Duration::from_secs(4));
    installed.replace_with(&new_agent());
    let upgraded_at = wall();
    upgrade(&agent);
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(
        status["redirect"]["layout"],
        hms_node_agent::redirect::layout_version().unwrap(),
        "{status}"
    );
    assert_eq!(
        status["redirect"]["older_sets"],
        serde_json::json!([agent.pin_dir.display().to_string()]),
        "the new agent found the release's set: {status}"
    );
    // Overlap: the new set is attached beside the old one until the hand-over settled.
    let overlap = cgroup_programs(&cg).len();
    // With the bypass on, the kept-alive caller's connection (made through the release's
    // connect4 during the overlap) holds the release's sockhash until the load ends.
    let (summary, retired) = if inside_cgroup {
        let summary = finish_load(load);
        (summary, wait_for_retirement(&agent))
    } else {
        let retired = wait_for_retirement(&agent);
        (finish_load(load), retired)
    };
    let retired_at = wall() - retired.elapsed().as_secs_f64();
    assert_one_generation(&cg, &agent);

    let ok = summary["ok"].as_u64().unwrap();
    let fails = summary["fails"].as_array().unwrap();
    let during: usize = summary["oks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| (upgraded_at..retired_at).contains(&t.as_f64().unwrap()))
        .count();
    eprintln!(
        "MEASURED: upgrade from {OLD_RELEASE:.7} across a layout change (sk_msg bypass {}): {ok} requests ok, {} failed; {overlap} programs attached right after the hand-over; older set retired {:.1} s after the upgrade started, {during} requests succeeded in between",
        if inside_cgroup { "on" } else { "off" },
        fails.len(),
        retired_at - upgraded_at
    );
    assert!(
        fails.is_empty(),
        "failed requests: {fails:?}\n{}",
        agent.log()
    );
    assert!(ok > u64::from(secs) * 50, "the load really ran: {ok}");
    assert!(during > 100, "requests ran during the overlap: {during}");
    assert_eq!(backend.seen_count() as u64, ok);
    curl_ok(&cg, &agent, "http://payments-svc.svc/after");
}

#[test]
fn new_then_old_then_new_leaves_one_generation() {
    let Some(old) = old_agent() else { return };
    let new = new_agent();
    let installed = Installed::with(&new);
    let cg = TestCgroup::new("layout-back").unwrap();
    let agent = TestAgent::start_binary(cg.path(), installed.path.clone(), false).unwrap();
    let backend = Backend::start("ledger-svc", 0).unwrap();
    agent.deploy("ledger-svc", backend.addr.port()).unwrap();
    assert_one_generation(&cg, &agent);
    let set = agent.pin_set();

    // A downgrade to a release without pin sets: it pins its own set beside ours (it does
    // not know sets), so both stay attached while it runs.
    installed.replace_with(&old);
    upgrade(&agent);
    assert!(agent.pin_dir.join("link_connect4").exists());
    assert!(set.join("link_connect4").exists());
    // Once our agent's heartbeat lapsed (3 s after it exited) its programs stand aside and
    // the release's redirect serves.
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(20));
    loop {
        let out = cg
            .command("curl")
            .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("http://ledger-svc.svc/old")
            .output()
            .unwrap();
        if out.stdout == b"200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the older release never served: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    installed.replace_with(&new);
    upgrade(&agent);
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(agent.pin_set(), set, "the same set again: {status}");
    wait_for_retirement(&agent);
    assert_one_generation(&cg, &agent);
    curl_ok(&cg, &agent, "http://ledger-svc.svc/new");
    eprintln!("MEASURED: new -> {OLD_RELEASE:.7} -> new: one generation attached after");
}

/// The release drains (nothing in flight) and exits, closing its copies of the listeners.
fn wait_until_exited(agent: &TestAgent, release_pid: u32) {
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(5));
    while std::fs::read_to_string(format!("/proc/{release_pid}/stat"))
        .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the release did not exit\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_crash_of_the_new_agent_during_the_overlap_and_a_restart_leave_one_generation() {
    let Some(old) = old_agent() else { return };
    let installed = Installed::with(&old);
    let cg = TestCgroup::new("layout-crash").unwrap();
    let mut agent = TestAgent::start_binary(cg.path(), installed.path.clone(), false).unwrap();
    let backend = Backend::start("notify-svc", 0).unwrap();
    agent.deploy("notify-svc", backend.addr.port()).unwrap();

    installed.replace_with(&new_agent());
    let release_pid = agent.pid().unwrap();
    upgrade(&agent);
    // The release drains (nothing in flight) and exits, closing its copies of the listeners,
    // so the restart below can bind them.
    wait_until_exited(&agent, release_pid);
    // The older set's consumers (sock_ops among them) go 6 s after the hand-over at the
    // earliest: this is the middle of the overlap.
    assert!(
        agent.pin_dir.join("link_sock_ops").exists(),
        "the overlap is still on: {:?}",
        pin_dir_entries(&agent.pin_dir)
    );
    agent.kill9().unwrap();
    let attached = cgroup_programs(&cg).len();
    assert!(
        attached > HOOKS_PER_SET,
        "both sets attached at the crash: {attached}"
    );

    agent.start_again().unwrap();
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(
        status["redirect"]["adopted"], true,
        "own set adopted: {status}"
    );
    wait_for_retirement(&agent);
    assert_one_generation(&cg, &agent);
    curl_ok(&cg, &agent, "http://notify-svc.svc/after-crash");
    eprintln!(
        "MEASURED: SIGKILL during the overlap ({attached} programs attached), restart: one generation, calls served"
    );
}

#[test]
fn cleanup_removes_both_sets_of_an_interrupted_upgrade() {
    let Some(old) = old_agent() else { return };
    let installed = Installed::with(&old);
    let cg = TestCgroup::new("layout-clean").unwrap();
    let mut agent = TestAgent::start_binary(cg.path(), installed.path.clone(), false).unwrap();
    installed.replace_with(&new_agent());
    upgrade(&agent);
    let set = agent.pin_set();
    agent.kill9().unwrap();
    assert!(agent.pin_dir.join("link_sock_ops").exists());
    assert!(set.join("link_sock_ops").exists());
    assert_eq!(cgroup_programs(&cg).len(), 2 * HOOKS_PER_SET);

    let out = agent.cleanup();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(cgroup_programs(&cg), Vec::new(), "nothing attached: {text}");
    assert!(!agent.pin_dir.exists(), "pin dir removed: {text}");
    eprintln!(
        "MEASURED: cleanup of an interrupted upgrade: {}",
        text.trim()
    );
}

/// A crash half way through retiring: the release's connect/sendmsg links are gone, its
/// other hooks and its maps are still there. The restarted agent finishes the job.
#[test]
fn a_crash_half_way_through_retiring_is_finished_by_the_next_start() {
    let Some(old) = old_agent() else { return };
    let installed = Installed::with(&old);
    let cg = TestCgroup::new("layout-half").unwrap();
    let mut agent = TestAgent::start_binary(cg.path(), installed.path.clone(), false).unwrap();
    let backend = Backend::start("audit-svc", 0).unwrap();
    agent.deploy("audit-svc", backend.addr.port()).unwrap();
    installed.replace_with(&new_agent());
    let release_pid = agent.pid().unwrap();
    upgrade(&agent);
    wait_until_exited(&agent, release_pid);
    // Creators go 1 s after the hand-over, the rest 5 s after them: wait for the first.
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
    while agent.pin_dir.join("link_connect4").exists() {
        assert!(
            Instant::now() < deadline,
            "connect4 never detached\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        agent.pin_dir.join("link_sock_ops").exists(),
        "half way: {:?}",
        pin_dir_entries(&agent.pin_dir)
    );
    agent.kill9().unwrap();
    let attached = cgroup_programs(&cg).len();
    assert!(
        attached > HOOKS_PER_SET && attached < 2 * HOOKS_PER_SET,
        "half retired at the crash: {attached} programs"
    );

    agent.start_again().unwrap();
    wait_for_retirement(&agent);
    assert_one_generation(&cg, &agent);
    curl_ok(&cg, &agent, "http://audit-svc.svc/after-crash");
    eprintln!(
        "MEASURED: SIGKILL half way through retiring ({attached} programs attached), restart: one generation, calls served"
    );
}
