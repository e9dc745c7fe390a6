//! User story: an agent bound to the default `0.0.0.0:15008` publishes an address other
//! hosts can dial, not `0.0.0.0` (which would send them to themselves). Two test hosts on a
//! bridge, a real etcd on the first, real agents in each host's network namespace.

use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;
use vm_tests::etcd::Etcd;
use vm_tests::netns::TestNet;

#[test]
fn an_agent_on_0_0_0_0_advertises_the_address_it_reaches_the_registry_from() {
    let net = TestNet::new(2).unwrap();
    let etcd = Etcd::start_in(&net.hosts[0].netns, net.hosts[0].addr).unwrap();
    let registry = format!("etcd://{}", etcd.endpoint());
    let cgs = [
        TestCgroup::new("adv-a").unwrap(),
        TestCgroup::new("adv-b").unwrap(),
    ];
    let a = TestAgent::start_with(
        cgs[0].path(),
        Some(&net.hosts[0].netns),
        vec![
            "--registry".into(),
            registry.clone(),
            "--inbound".into(),
            format!("{}:15008", net.hosts[0].addr),
            "--node-name".into(),
            "adv-a".into(),
        ],
    )
    .unwrap();
    let b = TestAgent::start_with(
        cgs[1].path(),
        Some(&net.hosts[1].netns),
        vec![
            "--registry".into(),
            registry,
            "--inbound".into(),
            "0.0.0.0:15008".into(),
            "--node-name".into(),
            "adv-b".into(),
        ],
    )
    .unwrap();
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(20));
    let seen = loop {
        let s = a.ctl_json(&["status"]).unwrap();
        if let Some(p) = s["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "adv-b"))
        {
            break p["inbound"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "host b never registered: {s}\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("MEASURED: host b (bound to 0.0.0.0:15008) advertised {seen}");
    assert_eq!(seen, format!("{}:15008", net.hosts[1].addr));
}
