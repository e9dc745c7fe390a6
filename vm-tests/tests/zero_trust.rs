//! Zero trust in the control plane, shown as an attacker would try it: three network-namespace
//! hosts, a real etcd with TLS, client certificates required and access control on (set up by
//! `hms-node-agent init-mesh`, as the README says), host A the CA and operator.
//!
//! - Nobody without a credential reads or writes the registry; root on host C, holding C's
//!   credential, can write nothing but C's own records (not B's instances, not a spec, a
//!   placement, a membership or the CA's bundle), and `hms-ctl deploy` of a service not
//!   placed on C is refused with the command that would place it.
//! - A token works once, only for the name it was made for, and never for a member's name.
//! - `hms-ctl node remove host-c` ends C's registry access and its calls through the mesh,
//!   while B's calls keep working.

use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;
use vm_tests::mesh::{Backend, Mesh, NAMES, text};

const P: &str = "/hms/v1/";

fn refused(r: anyhow::Result<String>, what: &str) -> String {
    match r {
        Ok(out) => panic!("{what} was allowed: {out}"),
        Err(e) => format!("{e:#}"),
    }
}

/// Calls `payments-svc` from host `i` until `ok` says the answer is the expected one.
fn wait_for(m: &Mesh, i: usize, ok: impl Fn(&std::process::Output) -> bool, what: &str) {
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
    loop {
        let o = m.curl(i, &["http://payments-svc.svc/pay"]);
        if ok(&o) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}\n{}",
            text(&o),
            m.agents[i].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_a_credential_nothing_and_with_host_cs_only_its_own_records() {
    let m = Mesh::new();
    let _a = Backend::start(&m.net, 0, "payments-svc", 7000, m.dir.path());
    m.deploy(0, "name: payments-svc\nport: 7000\n");
    m.deploy(1, "name: payments-svc\nport: 7000\n");

    // No certificate: etcd refuses the connection itself.
    let e = refused(
        m.etcdctl_as(None, &["get", "--prefix", P]),
        "reading without a certificate",
    );
    assert!(
        e.contains("certificate") || e.contains("tls") || e.contains("deadline"),
        "{e}"
    );

    // Host C's credential: reads, and writes its own node record, nothing else.
    let listing = m
        .etcdctl_as(Some(2), &["get", "--prefix", "--keys-only", P])
        .expect("a member reads the registry");
    assert!(
        listing.contains("/hms/v1/services/payments-svc"),
        "{listing}"
    );
    let forged_instance = r#"{"addrs":["127.0.0.1:22"]}"#;
    let writes = [
        ("instances/payments-svc/host-b", forged_instance),
        ("instances/payments-svc/host-c", forged_instance),
        ("services/payments-svc", "{}"),
        ("services/evil-svc", "{}"),
        (
            "placement/payments-svc",
            r#"{"hosts":["host-c"],"vip":"127.77.0.9"}"#,
        ),
        ("members/host-x", r#"{"joined_unix":1}"#),
        ("nodes/host-b", "{}"),
        ("vips/127.77.9.9", "evil-svc"),
        ("blobs/ca/bundle", "{}"),
        ("blobs/ca/issued/host-c", "{}"),
        ("blobs/ca/renew/host-b", "{}"),
    ];
    for (key, value) in writes {
        let e = refused(
            m.etcdctl_as(Some(2), &["put", &format!("{P}{key}"), value]),
            &format!("host-c writing {key}"),
        );
        assert!(e.contains("permission denied"), "{key}: {e}");
    }
    let e = refused(
        m.etcdctl_as(Some(2), &["del", &format!("{P}nodes/host-b")]),
        "host-c deleting host-b's node record",
    );
    assert!(e.contains("permission denied"), "{e}");
    let e = refused(
        m.etcdctl_as(Some(2), &["del", "--prefix", P]),
        "host-c deleting the registry",
    );
    assert!(e.contains("permission denied"), "{e}");
    // Its own renewal slot is its own.
    m.etcdctl_as(Some(2), &["get", &format!("{P}blobs/ca/renew/host-c")])
        .expect("host-c reads its own key");

    // The registry is unchanged: payments-svc still answers on C from A and B.
    wait_for(
        &m,
        2,
        |o| String::from_utf8_lossy(&o.stdout).starts_with("payments-svc on host-"),
        "C calls payments-svc",
    );

    // Deploying an unplaced service on C says what the operator must run.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("svc.yaml");
    std::fs::write(&spec, "name: payments-svc\nport: 7000\n").unwrap();
    let out = m.agents[2].ctl(&["deploy", spec.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("hms-ctl place payments-svc --on host-c"),
        "{}",
        text(&out)
    );
    // And once placed, it deploys.
    m.place("payments-svc", 2);
    let out = m.agents[2].ctl(&["deploy", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A fourth agent in host C's namespace (its own cgroup, ports and state) trying to join.
fn joiner(
    m: &Mesh,
    name: &str,
    token: &std::path::Path,
) -> (anyhow::Result<TestAgent>, TestCgroup) {
    let cg = TestCgroup::new(&format!("zt-{name}")).unwrap();
    let addr = m.net.hosts[2].addr;
    let inbound = std::net::SocketAddr::new(addr, vm_tests::ports::free_addr().port());
    let agent = TestAgent::start_with(
        cg.path(),
        Some(&m.net.hosts[2].netns),
        vec![
            "--registry".into(),
            format!("etcds://{}", m.etcd.endpoint()),
            "--inbound".into(),
            inbound.to_string(),
            "--node-name".into(),
            name.into(),
            "--join-token-file".into(),
            token.display().to_string(),
        ],
    );
    (agent, cg)
}

#[test]
fn a_token_joins_once_only_as_its_own_name_and_never_as_a_member() {
    let m = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    let token = |node: &str| {
        let path = dir
            .path()
            .join(format!("{node}-{}.token", vm_tests::ports::unique()));
        let out = m.agents[0].ctl(&[
            "node",
            "token",
            "create",
            "--node",
            node,
            "--out",
            path.to_str().unwrap(),
        ]);
        (out, path)
    };

    // A member's name cannot even get a token.
    for member in NAMES {
        let (out, _) = token(member);
        assert!(
            !out.status.success(),
            "a token for {member}: {}",
            text(&out)
        );
        assert!(text(&out).contains("already a member"), "{}", text(&out));
    }

    // A token is a secret: 0600.
    let (out, t_d) = token("host-d");
    assert!(out.status.success(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&t_d).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // It cannot be used under another name: the joining host refuses before asking.
    let (wrong, _cg) = joiner(&m, "host-e", &t_d);
    let e = format!(
        "{:#}",
        wrong.err().expect("host-e with host-d's token started")
    );
    assert!(e.contains("the join token is for node `host-d`"), "{e}");

    // Used once: host-d joins and becomes a member.
    let (d, _cg_d) = joiner(&m, "host-d", &t_d);
    let d = d.unwrap_or_else(|e| panic!("host-d joining: {e:#}"));
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
    while !d.ctl_json(&["status"]).unwrap()["identity"]["spiffe_id"].is_string() {
        assert!(
            Instant::now() < deadline,
            "host-d got no identity:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let members = m
        .etcdctl_as(
            Some(0),
            &["get", "--prefix", "--keys-only", &format!("{P}members/")],
        )
        .unwrap();
    assert!(members.contains("members/host-d"), "{members}");

    // Used twice (another host claiming to be host-d with the same token): refused by the
    // CA, and the refusal reaches the joining host.
    let (twice, _cg2) = joiner(&m, "host-d", &t_d);
    let e = format!(
        "{:#}",
        twice
            .err()
            .expect("a second join with a spent token started")
    );
    assert!(
        e.contains("the CA host refused this host's join") && e.contains("already"),
        "{e}"
    );

    // The bootstrap credential of a joined host is gone: its user no longer exists.
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
    loop {
        let users = m.etcdctl_as(Some(0), &["user", "list"]).unwrap();
        if !users.contains("hms-join-host-d") {
            assert!(users.contains("host-d"), "{users}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bootstrap user still there: {users}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn node_remove_ends_the_hosts_registry_access_and_calls_while_others_keep_working() {
    let m = Mesh::new();
    let _a = Backend::start(&m.net, 0, "payments-svc", 7000, m.dir.path());
    m.deploy(0, "name: payments-svc\nport: 7000\n");
    let answered = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).starts_with("payments-svc on host-a")
    };
    wait_for(&m, 1, answered, "B calls payments-svc");
    wait_for(&m, 2, answered, "C calls payments-svc");

    let removed_at = Instant::now();
    let out = m.agents[0].ctl(&["node", "remove", "host-c"]);
    assert!(out.status.success(), "{}", text(&out));

    // C's credential is dead at once.
    let e = refused(
        m.etcdctl_as(Some(2), &["get", &format!("{P}services/payments-svc")]),
        "a removed host reading the registry",
    );
    assert!(
        e.contains("not found") || e.contains("permission denied") || e.contains("invalid"),
        "{e}"
    );
    // C is no member and its records are gone.
    let keys = m
        .etcdctl_as(Some(0), &["get", "--prefix", "--keys-only", P])
        .unwrap();
    assert!(!keys.contains("members/host-c"), "{keys}");
    assert!(!keys.contains("nodes/host-c"), "{keys}");

    // Within 5 s no call from C gets through A; B's calls never stop working.
    let deadline = removed_at + Duration::from_secs(5);
    loop {
        let b = m.curl(1, &["http://payments-svc.svc/pay"]);
        assert!(
            answered(&b),
            "B's call failed after C's removal: {}",
            text(&b)
        );
        let c = m.curl(2, &["--max-time", "2", "http://payments-svc.svc/pay"]);
        if !answered(&c) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C still reaches payments-svc 5 s after its removal: {}\n{}",
            text(&c),
            m.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "MEASURED: host-c's calls stopped {} ms after `node remove`",
        removed_at.elapsed().as_millis()
    );
    // Renewals end too: a renewal request for host-c (C itself can no longer write one;
    // here the operator plants it) is refused by the CA, however it is signed.
    m.etcdctl_as(
        Some(0),
        &["put", &format!("{P}blobs/ca/renew/host-c"), "{}"],
    )
    .unwrap();
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(5));
    while !m.agents[0]
        .log()
        .contains("refused a renewal: the host is not a member")
    {
        assert!(
            Instant::now() < deadline,
            "A answered host-c's renewal:\n{}",
            m.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..10 {
        let c = m.curl(2, &["--max-time", "2", "http://payments-svc.svc/pay"]);
        assert!(!answered(&c), "C reached payments-svc again: {}", text(&c));
        let b = m.curl(1, &["http://payments-svc.svc/pay"]);
        assert!(answered(&b), "{}", text(&b));
    }
}

/// A mesh made with plaintext etcd:// (as earlier releases did) moves to etcds://: the CA
/// host keeps its CA and adds the registry's certificates, etcd restarts with TLS on the same
/// data, the CA host's agent places the services deployed before placement existed on the
/// hosts that run them, and the other host joins again for its registry credential; the
/// service answers throughout the parts that are up.
#[test]
fn a_plaintext_mesh_moves_to_tls_and_keeps_its_services() {
    use vm_tests::etcd::{Etcd, EtcdTls, etcdctl, etcdctl_as};
    use vm_tests::netns::TestNet;

    let net = TestNet::new(2).unwrap();
    let mut etcd = Etcd::start_in(&net.hosts[0].netns, net.hosts[0].addr).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cgs = [
        TestCgroup::new("zt-mig-a").unwrap(),
        TestCgroup::new("zt-mig-b").unwrap(),
    ];
    let args = |i: usize, registry: &str| {
        vec![
            "--registry".to_string(),
            registry.to_string(),
            "--inbound".into(),
            std::net::SocketAddr::new(net.hosts[i].addr, 15008).to_string(),
            "--node-name".into(),
            NAMES[i].into(),
        ]
    };
    let plain = format!("etcd://{}", etcd.endpoint());
    let mut a =
        TestAgent::start_with(cgs[0].path(), Some(&net.hosts[0].netns), args(0, &plain)).unwrap();
    let out = a.ctl(&["ca", "init", "--trust-domain", "test.mesh"]);
    assert!(out.status.success(), "{}", text(&out));
    let token = |a: &TestAgent, tag: &str| {
        let path = dir.path().join(format!("host-b-{tag}.token"));
        let out = a.ctl(&[
            "node",
            "token",
            "create",
            "--node",
            "host-b",
            "--out",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        path
    };
    let mut b_args = args(1, &plain);
    b_args.extend([
        "--join-token-file".into(),
        token(&a, "plain").display().to_string(),
    ]);
    let mut b = TestAgent::start_with(cgs[1].path(), Some(&net.hosts[1].netns), b_args).unwrap();
    let _backend = Backend::start(&net, 0, "payments-svc", 7000, dir.path());
    a.deploy_yaml("name: payments-svc\nport: 7000\n").unwrap();
    let call = |i: usize| {
        cgs[i]
            .command("nsenter")
            .arg(format!("--net=/run/netns/{}", net.hosts[i].netns))
            .arg("--")
            .arg(vm_tests::tools::path_of("curl"))
            .args(["-sS", "--max-time", "3", "http://payments-svc.svc/pay"])
            .output()
            .unwrap()
    };
    let answered = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).starts_with("payments-svc on host-a")
    };
    let wait = |i: usize, what: &str| {
        let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(20));
        loop {
            let o = call(i);
            if answered(&o) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {}", text(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait(1, "B calls payments-svc over the plaintext mesh");
    // As an earlier release left it: no placement records.
    etcdctl(&etcd, &["del", "--prefix", &format!("{P}placement/")]).unwrap();

    // The move: etcd stops (the agents keep serving what they know), the CA host adds the
    // registry's certificates, etcd restarts with TLS on the same data, and each agent is
    // restarted onto etcds:// (its instances, kept under its lease, are adopted).
    etcd.stop();
    let state = a.state_dir();
    let out = vm_tests::mesh::init_mesh(&state, net.hosts[0].addr, "host-a");
    assert!(
        out.status.success(),
        "init-mesh over an existing CA: {}",
        text(&out)
    );
    assert!(text(&out).contains("kept the mesh CA"), "{}", text(&out));
    etcd.require_tls(EtcdTls {
        server_dir: state.join("etcd-server"),
        client_dir: state.join("etcd"),
    });
    etcd.resume().unwrap();
    let secure = format!("etcds://{}", etcd.endpoint());
    a.kill9().unwrap();
    a.extra_args = args(0, &secure);
    a.start_again().unwrap();
    wait(0, "A calls payments-svc after the move");
    let placed = etcdctl_as(
        &etcd,
        Some(&state.join("etcd")),
        &["get", &format!("{P}placement/payments-svc")],
    )
    .unwrap();
    assert!(placed.contains("host-a"), "{placed}");
    // B's old credential is its node certificate only: it joins again for its registry one.
    let mut b_args = args(1, &secure);
    b_args.extend([
        "--join-token-file".into(),
        token(&a, "tls").display().to_string(),
    ]);
    b.kill9().unwrap();
    b.extra_args = b_args;
    b.start_again()
        .unwrap_or_else(|e| panic!("B joining the TLS registry: {e:#}"));
    wait(1, "B calls payments-svc after the move");
    let users = etcdctl_as(&etcd, Some(&state.join("etcd")), &["user", "list"]).unwrap();
    assert!(users.lines().any(|u| u == "host-b"), "{users}");
}
