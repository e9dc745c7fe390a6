//! The seed chapter's commands, typed as its users type them (`hms-svc ...`, its 6-line spec
//! file byte for byte), against a real agent with the real redirect.

use std::process::Output;

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;

/// Section 5 of the seed chapter, as printed.
const SEED_SPEC: &str = "# services/eligibility-svc.yaml
name: eligibility-svc
port: 7000
image: hms/eligibility:latest
policy: allow_from_any   # mesh ACL; refine later
";

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "hms-svc failed: {text}");
    text
}

#[test]
fn hms_svc_deploy_limit_route_and_tap_work_as_the_seed_chapter_types_them() {
    let cg = TestCgroup::new("seedcmds").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();

    // hms-svc deploy services/eligibility-svc.yaml
    std::fs::write(services.join("eligibility-svc.yaml"), SEED_SPEC).unwrap();
    let out = agent.svc(&[
        "deploy",
        services.join("eligibility-svc.yaml").to_str().unwrap(),
    ]);
    ok(&out);
    let dig = cg
        .command("dig")
        .args(["+short", "+time=2", "+tries=1", "eligibility-svc.svc"])
        .output()
        .unwrap();
    let vip = String::from_utf8_lossy(&dig.stdout).trim().to_string();
    assert!(
        vip.starts_with("127.77."),
        "eligibility-svc.svc resolves to a VIP after `hms-svc deploy`: {vip:?}"
    );

    // A service with a real instance, so the tap has calls to show.
    let payments = Backend::start("payments-svc", 0).unwrap();
    std::fs::write(
        services.join("payments-svc.yaml"),
        format!("name: payments-svc\nport: {}\n", payments.addr.port()),
    )
    .unwrap();
    ok(&agent.svc(&[
        "deploy",
        services.join("payments-svc.yaml").to_str().unwrap(),
    ]));
    let notify = Backend::start("notify-svc", 0).unwrap();
    std::fs::write(
        services.join("notify-svc.yaml"),
        format!("name: notify-svc\nport: {}\n", notify.addr.port()),
    )
    .unwrap();
    ok(&agent.svc(&["deploy", services.join("notify-svc.yaml").to_str().unwrap()]));

    // hms-svc limit set notify-svc 50rps
    ok(&agent.svc(&["limit", "set", "notify-svc", "50rps"]));
    let described = agent.ctl_json(&["describe", "notify-svc"]).unwrap();
    assert_eq!(
        described["spec"]["limit"]["requests"], 50,
        "the limit is in force: {described}"
    );
    assert_eq!(described["spec"]["limit"]["per_seconds"], 1, "{described}");

    // hms-svc route set ... (section 7: quarantine slow calls with per-route timeouts)
    ok(&agent.svc(&[
        "route",
        "set",
        "payments-svc",
        "/pay",
        "--timeout",
        "2s",
        "--retries",
        "2",
    ]));
    let described = agent.ctl_json(&["describe", "payments-svc"]).unwrap();
    let route = &described["spec"]["routes"][0];
    assert_eq!(route["path"], "/pay", "{described}");
    assert_eq!(route["timeout"], 2000, "{described}");

    for i in 0..12 {
        let curl = cg
            .command("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://payments-svc.svc/pay/{i}"))
            .output()
            .unwrap();
        assert!(
            curl.status.success(),
            "{}",
            String::from_utf8_lossy(&curl.stderr)
        );
    }

    // hms-svc tap payments-svc --last 10
    let tap = ok(&agent.svc(&["tap", "payments-svc", "--last", "10"]));
    let rows: Vec<&str> = tap.lines().filter(|l| l.contains("/pay/")).collect();
    assert_eq!(rows.len(), 10, "the last ten calls, one row each:\n{tap}");
    assert!(rows[9].contains("/pay/11"), "newest last:\n{tap}");
    assert!(
        !tap.contains("/pay/1 "),
        "older calls are not shown:\n{tap}"
    );
    assert!(rows.iter().all(|r| r.contains("200")), "{tap}");

    // Help speaks with the name the user typed.
    let help = ok(&agent.svc(&["--help"]));
    assert!(help.contains("Usage: hms-svc"), "{help}");
    let err = agent.svc(&["deploy", "/nonexistent/spec.yaml"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).starts_with("hms-svc: "),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
}
