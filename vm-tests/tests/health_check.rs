//! Active health checks: an instance that fails its check is taken out of rotation before
//! any request has to find out, and `hms-ctl describe` says so.

use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;
use vm_tests::ports;

#[test]
fn an_instance_failing_its_health_check_gets_no_traffic_and_describe_shows_it() {
    let cg = TestCgroup::new("health").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let good = Backend::start("checked-svc", 0).unwrap();
    let dead_port = ports::free_port();
    agent
        .deploy_yaml(&format!(
            "name: checked-svc\nport: {}\nreplicas: [{dead_port}]\nhealth: /healthz\n",
            good.addr.port()
        ))
        .unwrap();
    // Wait for two failed checks of the dead instance (checks run every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let d = agent.ctl_json(&["describe", "checked-svc"]).unwrap();
        let h = d["health"].as_array().cloned().unwrap_or_default();
        let dead_failing = h.iter().any(|i| {
            i["addr"].as_str() == Some(&format!("127.0.0.1:{dead_port}"))
                && i["health_check"] == "failing"
        });
        if dead_failing {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "dead instance never marked failing: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let good_addr = good.addr.to_string();
    assert!(
        health
            .iter()
            .any(|i| i["addr"].as_str() == Some(&good_addr) && i["health_check"] == "passing"),
        "{health:?}"
    );
    // Every request goes to the passing instance on the first try: no connect failures,
    // so no retries were needed.
    let retries_before = agent.ctl_json(&["status"]).unwrap()["http"]["retries"]
        .as_u64()
        .unwrap();
    for i in 0..20 {
        let o = cg
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://checked-svc.svc/r{i}"),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let retries_after = agent.ctl_json(&["status"]).unwrap()["http"]["retries"]
        .as_u64()
        .unwrap();
    assert_eq!(
        retries_after, retries_before,
        "no request tried the dead instance"
    );
    // The health checks reached the good backend too.
    assert!(good.seen().iter().any(|r| r.path == "/healthz"));
    assert_eq!(
        good.seen()
            .iter()
            .filter(|r| r.path.starts_with("/r"))
            .count(),
        20
    );
}
