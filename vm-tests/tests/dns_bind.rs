//! User stories of where the DNS responder listens: never off loopback by accident, and
//! when asked to (`--dns-allow-remote`), still no open resolver: another host's queries go
//! unanswered while this host's own are answered. Real agent in a test host's network
//! namespace, real dig from that host and from another one on the same bridge.

use std::net::SocketAddrV4;

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;
use vm_tests::netns::TestNet;

#[test]
fn dns_off_loopback_is_refused_without_the_flag_and_says_what_to_do() {
    let cg = TestCgroup::new("dns-bind").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = vm_tests::tools::workspace_binary(vm_tests::bins::path("hms-node-agent"))
        .args(["run", "--dns", "0.0.0.0:15953", "--cgroup"])
        .arg(cg.path())
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {err}");
    assert!(
        err.contains("--dns 0.0.0.0:15953 is not a loopback address")
            && err.contains("--dns-allow-remote"),
        "{err}"
    );
}

fn dig(net: &TestNet, from: usize, server: SocketAddrV4, name: &str) -> String {
    let out = net.hosts[from]
        .command("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), name, "A", "+short"])
        .args(["+tries=1", "+time=2"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn with_dns_allow_remote_only_this_hosts_own_addresses_are_answered() {
    let net = TestNet::new(2).unwrap();
    let cg = TestCgroup::new("dns-remote").unwrap();
    let dns = SocketAddrV4::new(net.hosts[0].ipv4(), vm_tests::ports::free_port());
    let agent = TestAgent::start_with_dns(
        cg.path(),
        Some(&net.hosts[0].netns),
        vec!["--dns-allow-remote".into()],
        dns,
    )
    .unwrap();
    let vip = agent.deploy("ledger-svc", 8080).unwrap();

    // This host, at its own bridge address: answered.
    let here = dig(&net, 0, dns, "ledger-svc.svc");
    assert_eq!(here, vip.to_string(), "{}", agent.log());
    // Another host on the same bridge: nothing, not even a refusal to amplify.
    for name in ["ledger-svc.svc", "example.com"] {
        let there = dig(&net, 1, dns, name);
        assert!(
            there.contains("no servers could be reached") && !there.contains(&vip.to_string()),
            "an open resolver answered another host: {there}"
        );
    }
    let metrics = net.hosts[0]
        .command("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}/metrics", agent.metrics))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    let refused = text
        .lines()
        .find(|l| l.starts_with("hms_dns_remote_refused_total"))
        .unwrap_or_default()
        .to_string();
    eprintln!("MEASURED: {refused}");
    assert!(refused.ends_with(" 2"), "{text}");
}
