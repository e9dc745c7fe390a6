//! A caller's identity is the service whose cgroup it runs in: `hms-ctl run NAME -- CMD`
//! starts a command there, and access policy decides on that identity.

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::bins;
use vm_tests::cgroup::TestCgroup;

fn status_and_error(out: &std::process::Output) -> (String, String) {
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let status = text.lines().next().unwrap_or("").to_string();
    let error = text
        .lines()
        .find_map(|l| l.strip_prefix("x-hms-error: "))
        .unwrap_or("")
        .trim()
        .to_string();
    (status, error)
}

#[test]
fn hms_ctl_run_starts_a_command_as_the_service_and_policy_uses_that_identity() {
    let cg = TestCgroup::new("identity").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let eligibility = Backend::start("eligibility-svc", 0).unwrap();
    let payments = Backend::start("payments-svc", 0).unwrap();
    agent
        .deploy_yaml(&format!(
            "name: eligibility-svc\nport: {}\npolicy:\n  allow_from: [payments-svc]\n",
            eligibility.addr.port()
        ))
        .unwrap();
    agent.deploy("payments-svc", payments.addr.port()).unwrap();

    // The default cgroup of a service without `cgroup:` is <agent cgroup>/<name>.
    let detail = agent.ctl_json(&["describe", "payments-svc"]).unwrap();
    let dir = cg.path().join("payments-svc");
    assert_eq!(detail["cgroup_dir"], dir.display().to_string());

    // As payments-svc: allowed.
    let out = vm_tests::tools::workspace_binary(bins::path("hms-ctl"))
        .arg("--socket")
        .arg(&agent.socket)
        .args(["run", "payments-svc", "--"])
        .args([
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "5",
            "http://eligibility-svc.svc/check",
        ])
        .output()
        .unwrap();
    let (status, _) = status_and_error(&out);
    assert!(
        status.contains(" 200"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        agent.log()
    );
    assert!(dir.is_dir(), "hms-ctl run created the service's cgroup");

    // As the host (the agent's cgroup itself, no service's): denied, never reaches the backend.
    let out = cg
        .command("curl")
        .args([
            "-sS",
            "-i",
            "--max-time",
            "5",
            "http://eligibility-svc.svc/check",
        ])
        .output()
        .unwrap();
    let (status, error) = status_and_error(&out);
    assert!(status.contains(" 403"), "{status}");
    assert_eq!(error, "denied");
    assert_eq!(eligibility.seen().len(), 1, "only the allowed call arrived");

    // The exit code of the command is hms-ctl's.
    let out = vm_tests::tools::workspace_binary(bins::path("hms-ctl"))
        .arg("--socket")
        .arg(&agent.socket)
        .args(["run", "payments-svc", "--"])
        .arg(vm_tests::tools::path_of("sh"))
        .args(["-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
}
