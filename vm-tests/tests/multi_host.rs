//! Many hosts: three hosts as network namespaces on one bridge, a real etcd on host A, an
//! agent per host in its own cgroup. Services deployed on A and B are called by name from an
//! unmodified client on C, through mTLS HTTP/2 CONNECT tunnels between the agents.

use std::time::{Duration, Instant};

use vm_tests::mesh::{Backend, Mesh, capture, text};

#[test]
fn a_client_on_host_c_reaches_instances_on_a_and_b_and_the_wire_carries_only_tls() {
    let m = Mesh::new();
    let _a = Backend::start(&m.net, 0, "payments-svc", 7000, m.dir.path());
    let _b = Backend::start(&m.net, 1, "payments-svc", 7000, m.dir.path());
    m.deploy(0, "name: payments-svc\nport: 7000\n");
    m.deploy(1, "name: payments-svc\nport: 7000\n");
    // Both hosts' instances are known on C.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = m.agents[2].ctl_json(&["describe", "payments-svc"]).unwrap();
        if d["instances"].as_array().is_some_and(|i| i.len() == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pcap = m.dir.path().join("host-c.raw");
    let mut cap = capture(&m.net, 2, &pcap);
    std::thread::sleep(Duration::from_millis(500));
    let marker = "HMS-MARKER-7f3a9c-relief-500";
    let mut hosts = std::collections::HashSet::new();
    for n in 0..30 {
        let o = m.curl(
            2,
            &[
                "-X",
                "POST",
                "-d",
                &format!("{marker}-{n}"),
                "http://payments-svc.svc/pay",
            ],
        );
        let body = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            body.starts_with("payments-svc on host-"),
            "{}\n{}",
            text(&o),
            m.agents[2].log()
        );
        hosts.insert(body.split_whitespace().nth(2).unwrap().to_string());
    }
    assert_eq!(hosts.len(), 2, "requests reached both hosts: {hosts:?}");
    let _ = cap.kill();
    let _ = cap.wait();
    let wire = std::fs::read(&pcap).unwrap();
    assert!(
        wire.len() > 1000,
        "the capture saw the traffic ({} bytes)",
        wire.len()
    );
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the wire in clear text"
    );
    let seen = format!("{}{}", _a.seen(), _b.seen());
    assert!(seen.contains(marker), "the marker arrived at the backends");
    // Status shows the peers and live tunnels.
    let s = m.agents[2].ctl_json(&["status"]).unwrap();
    let tunnels: Vec<String> = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["tunnel"].as_str().unwrap().to_string())
        .collect();
    assert!(tunnels.iter().all(|t| t.starts_with("connected")), "{s}");
    let _ = &m.etcd;
}

#[test]
fn allow_from_denies_a_caller_on_another_host_with_403_and_the_backend_never_sees_it() {
    let m = Mesh::new();
    let backend = Backend::start(&m.net, 0, "eligibility-svc", 7100, m.dir.path());
    m.deploy(
        0,
        "name: eligibility-svc\nport: 7100\npolicy:\n  allow_from: [payments-svc]\n",
    );
    m.deploy(0, "name: payments-svc\nport: 7000\n");
    std::thread::sleep(Duration::from_millis(500));
    // The host itself on C is not payments-svc.
    let o = m.curl(2, &["-i", "http://eligibility-svc.svc/check"]);
    let out = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(
        out.starts_with("http/1.1 403"),
        "{}\nC:\n{}\nA:\n{}",
        text(&o),
        m.agents[2].log(),
        m.agents[0].log()
    );
    assert!(out.contains("x-hms-error: denied"), "{out}");
    assert_eq!(
        backend.seen(),
        "",
        "the denied call never reached the backend"
    );
    // A process in payments-svc's cgroup on C: C's agent claims payments-svc, which A
    // believes only once the operator placed payments-svc on C.
    let dir = m.cgs[2].path().join("payments-svc");
    std::fs::create_dir_all(&dir).unwrap();
    let as_payments = || {
        vm_tests::cgroup::TestCgroup::command_in(&dir, "nsenter")
            .arg(format!("--net=/run/netns/{}", m.net.hosts[2].netns))
            .arg("--")
            .arg(vm_tests::tools::path_of("curl"))
            .args([
                "-sS",
                "-i",
                "--max-time",
                "5",
                "http://eligibility-svc.svc/check",
            ])
            .output()
            .unwrap()
    };
    let child = as_payments();
    let out = String::from_utf8_lossy(&child.stdout).to_lowercase();
    assert!(
        out.starts_with("http/1.1 403"),
        "not placed on C: {}\n{}",
        text(&child),
        m.agents[0].log()
    );
    assert!(out.contains("x-hms-error: caller-not-placed"), "{out}");
    assert!(
        m.agents[0]
            .log()
            .contains("caller payments-svc is not placed on host-c"),
        "{}",
        m.agents[0].log()
    );
    assert_eq!(backend.seen(), "");
    m.place("payments-svc", 2);
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(5));
    let child = loop {
        let child = as_payments();
        if String::from_utf8_lossy(&child.stdout)
            .to_lowercase()
            .starts_with("http/1.1 200")
            || std::time::Instant::now() > deadline
        {
            break child;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = String::from_utf8_lossy(&child.stdout).to_lowercase();
    assert!(
        out.starts_with("http/1.1 200"),
        "{}\n{}",
        text(&child),
        m.agents[0].log()
    );
    assert!(backend.seen().contains("GET /check"));
}

#[test]
fn a_dead_hosts_instances_vanish_within_the_lease_ttl_and_calls_go_to_the_other_host() {
    let mut m = Mesh::new();
    let _a = Backend::start(&m.net, 0, "notify-svc", 7200, m.dir.path());
    let b = Backend::start(&m.net, 1, "notify-svc", 7200, m.dir.path());
    m.deploy(0, "name: notify-svc\nport: 7200\n");
    m.deploy(1, "name: notify-svc\nport: 7200\n");
    std::thread::sleep(Duration::from_millis(500));
    m.agents[0].kill9().unwrap();
    let killed = Instant::now();
    // Calls keep succeeding (a dead instance is a connect failure, retried elsewhere).
    let mut failures = 0;
    let gone_at = loop {
        // GET: a request in flight to host-a when it died is retried on host-b.
        let o = m.curl(2, &["http://notify-svc.svc/sms"]);
        if !String::from_utf8_lossy(&o.stdout).starts_with("notify-svc on host-b") {
            failures += 1;
        }
        let d = m.agents[2].ctl_json(&["describe", "notify-svc"]).unwrap();
        let nodes: Vec<&str> = d["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["node"].as_str().unwrap())
            .collect();
        if nodes == ["host-b"] {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "host-a's instance stayed: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "MEASURED: host-a's instance left the registry {} ms after its agent was killed (lease TTL 10 s); {failures} calls failed meanwhile",
        gone_at.as_millis()
    );
    assert!(
        gone_at <= Duration::from_secs(13),
        "vanished within the lease TTL: {gone_at:?}"
    );
    assert_eq!(failures, 0, "calls kept succeeding via host-b");
    assert!(b.seen().contains("GET /sms"));
}

#[test]
fn over_ipv6_only_links_a_client_on_c_reaches_instances_on_a_and_b_through_the_tunnels() {
    let m = Mesh::ipv6_only();
    // No IPv4 on any link: etcd, :15008 and the tunnels can only be using IPv6.
    for h in &m.net.hosts {
        let o = h
            .command("ip")
            .args(["-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "", "{}", h.netns);
    }
    let _a = Backend::start(&m.net, 0, "payments-svc", 7000, m.dir.path());
    let _b = Backend::start(&m.net, 1, "payments-svc", 7000, m.dir.path());
    m.deploy(0, "name: payments-svc\nport: 7000\n");
    m.deploy(1, "name: payments-svc\nport: 7000\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = m.agents[2].ctl_json(&["describe", "payments-svc"]).unwrap();
        if d["instances"].as_array().is_some_and(|i| i.len() == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = m.agents[2].ctl_json(&["status"]).unwrap();
    for p in s["peers"].as_array().unwrap() {
        assert!(
            p["inbound"]
                .as_str()
                .is_some_and(|a| a.starts_with("[fd98::")),
            "peers are reached over IPv6: {s}"
        );
    }
    // Both hosts answer through the mesh (python starts in the background, and the balancer
    // may favour one host for a while): bounded wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = std::collections::HashSet::new();
    while ready.len() < 2 {
        let o = m.curl(2, &["http://payments-svc.svc/ready"]);
        let body = String::from_utf8_lossy(&o.stdout).to_string();
        if body.starts_with("payments-svc on host-") {
            ready.insert(body.split_whitespace().nth(2).unwrap().to_string());
        }
        assert!(
            Instant::now() < deadline,
            "backends not ready: {}",
            text(&o)
        );
    }
    // The client itself by IPv4 and by IPv6 (-4/-6 pick the VIP's family on C).
    for n in 0..20 {
        let family = if n % 2 == 0 { "-4" } else { "-6" };
        let o = m.curl(2, &[family, "http://payments-svc.svc/pay"]);
        let body = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            body.starts_with("payments-svc on host-"),
            "{family}: {}\nC:\n{}",
            text(&o),
            m.agents[2].log()
        );
    }
    let tunnels: Vec<String> = m.agents[2].ctl_json(&["status"]).unwrap()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["tunnel"].as_str().unwrap().to_string())
        .collect();
    assert!(
        tunnels.iter().all(|t| t.starts_with("connected")),
        "{tunnels:?}"
    );
}
