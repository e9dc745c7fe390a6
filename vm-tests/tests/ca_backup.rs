//! The CA's keys are never lost (issue 14, P6): `hms-ctl ca backup` writes them to a file
//! (0600, never over an existing one); the CA host loses its state; `hms-ctl ca restore`
//! makes it the CA again, and a certificate it issues after the restore is trusted by the
//! hosts that joined before. Three hosts as network namespaces, a real etcd, real agents.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use vm_tests::mesh::{Backend, Mesh, text};

fn ctl_ok(m: &Mesh, host: usize, args: &[&str]) -> String {
    let out = m.agents[host].ctl(args);
    assert!(
        out.status.success(),
        "hms-ctl {args:?}: {}\n{}",
        text(&out),
        m.agents[host].log()
    );
    text(&out)
}

/// curl from host `from` until it answers 200 with `want` (a tunnel may still be dialling),
/// within a bounded time.
fn call_until(m: &Mesh, from: usize, url: &str, want: &str) {
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(15));
    loop {
        let o = m.curl(from, &["-f", url]);
        if o.status.success() && String::from_utf8_lossy(&o.stdout).contains(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} from host {from}: {}\n{}\n{}",
            text(&o),
            m.agents[from].log(),
            m.agents[1].log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_ca_host_loses_its_state_and_a_restored_backup_issues_certificates_the_other_hosts_trust() {
    let mut m = Mesh::new();
    let backup_dir = tempfile::tempdir().unwrap();
    let file = backup_dir.path().join("mesh-ca.json");
    let file_arg = file.to_str().unwrap().to_string();

    let said = ctl_ok(&m, 0, &["ca", "backup", "--out", &file_arg]);
    assert!(said.contains("0600"), "{said}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read(&file).unwrap();
    // Never over an existing file.
    let again = m.agents[0].ctl(&["ca", "backup", "--out", &file_arg]);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("never overwrites"),
        "{}",
        text(&again)
    );
    assert_eq!(std::fs::read(&file).unwrap(), first);
    // Only the CA's host has the keys to back up.
    let elsewhere = backup_dir.path().join("from-b.json");
    let o = m.agents[1].ctl(&["ca", "backup", "--out", elsewhere.to_str().unwrap()]);
    assert!(!o.status.success() && !elsewhere.exists(), "{}", text(&o));

    // A restore on a host that holds a CA is refused without --force.
    let o = m.agents[0].ctl(&["ca", "restore", &file_arg]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));

    // host-a loses its CA and its own identity.
    let state = m.agents[0].state_dir();
    let old_cert = std::fs::read_to_string(state.join("identity/node.pem")).unwrap();
    m.agents[0].stop().unwrap();
    std::fs::remove_dir_all(state.join("ca")).unwrap();
    std::fs::remove_dir_all(state.join("identity")).unwrap();
    m.agents[0].start_again().unwrap();
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert!(!s["identity"]["holds_ca"].as_bool().unwrap_or(true), "{s}");

    let said = ctl_ok(&m, 0, &["ca", "restore", &file_arg]);
    assert!(said.contains("holds the mesh's CA again"), "{said}");
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert_eq!(s["identity"]["holds_ca"], true, "{s}");
    let new_cert = std::fs::read_to_string(state.join("identity/node.pem")).unwrap();
    assert_ne!(
        new_cert, old_cert,
        "host-a has a certificate issued after the restore"
    );
    // As the restore says: restarted, its registry connection is the operator's again.
    assert!(said.contains("Restart its agent"), "{said}");
    m.agents[0].restart().unwrap();
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert_eq!(s["identity"]["holds_ca"], true, "{s}");

    // Tunnels both ways between host-a (new certificate) and host-b / host-c (joined
    // before, never told anything): host-a calls host-b, host-c calls host-a.
    let on_b = vm_tests::ports::free_port();
    let on_a = vm_tests::ports::free_port();
    let _b = Backend::start(&m.net, 1, "pay-svc", on_b, m.dir.path());
    let _a = Backend::start(&m.net, 0, "ledger-svc", on_a, m.dir.path());
    m.deploy(1, &format!("name: pay-svc\nport: {on_b}\n"));
    m.deploy(0, &format!("name: ledger-svc\nport: {on_a}\n"));
    m.wait_for_instances(0, "pay-svc", 1);
    m.wait_for_instances(2, "ledger-svc", 1);
    call_until(&m, 0, "http://pay-svc.svc/x", "pay-svc on host-b");
    call_until(&m, 2, "http://ledger-svc.svc/y", "ledger-svc on host-a");

    // And it still issues: a new join token is answered (the CA works, not just its cert).
    ctl_ok(&m, 0, &["node", "token", "create", "--node", "host-d"]);
}
