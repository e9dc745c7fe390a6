//! Zero trust on the data path between hosts (issue 14, P3 and P5): three hosts as network
//! namespaces, a real etcd, real agents. The attacker has root on host-c: it takes host-c's
//! node key and certificate from the agent's state dir and opens its own mTLS connection
//! to host-a's :15008 with any CONNECT it likes (`vm_tests::attacker`).
//!
//! - the destination relays only to its own instances: a port the global spec names but
//!   that is not one of host-a's instance records is refused, and the process listening on
//!   that port on host-a never sees a byte;
//! - a stream not declared HTTP that opens with an HTTP request is cut before the instance
//!   sees it (it would carry requests past per-request rate limits);
//! - `limit: 5rps` on host-a, 50 requests at once from an unmodified HTTP/2 client on
//!   host-c over one connection (nghttp2's `nghttp`): 40 to 45 get 429 with `Retry-After`
//!   and `x-hms-error: rate-limited`, the rest succeed;
//! - a claim `x-hms-caller: payments-svc` from host-c, where payments-svc is not placed, is
//!   refused 403 `caller-not-placed` (needs the operator's placement records; see the test).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vm_tests::attacker::{Answer, Attacker};
use vm_tests::mesh::{Backend, Mesh, text};

/// Waits until something accepts on 127.0.0.1:`port` in host `host`'s namespace.
fn wait_listening(m: &Mesh, host: usize, port: u16) {
    let up = || {
        m.net.hosts[host]
            .command("python3")
            .args([
                "-c",
                "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)",
                &port.to_string(),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
    while !up() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} in host {host}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn inbound_of(m: &Mesh, host: usize) -> SocketAddr {
    SocketAddr::new(m.net.hosts[host].addr, 15008)
}

/// The attacker on host-c, CONNECTing to host-a.
fn attack(m: &Mesh, authority: &str, headers: &[(&str, &str)], payload: &[u8]) -> Answer {
    Attacker::with_keys_of(&m.agents[2].state_dir())
        .connect(
            &m.net.hosts[2].netns,
            inbound_of(m, 0),
            authority,
            headers,
            payload,
        )
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}\n{}", m.agents[0].log()))
}

#[test]
fn host_c_reaches_only_host_a_s_own_instances_and_cannot_smuggle_http_in_an_opaque_stream() {
    let m = Mesh::new();
    let own = vm_tests::ports::free_port();
    let other = vm_tests::ports::free_port();
    // host-a runs ledger-svc on `own`; an unrelated process listens on host-a's `other`.
    let ledger = Backend::start(&m.net, 0, "ledger-svc", own, m.dir.path());
    let bystander = Backend::start(&m.net, 0, "bystander", other, m.dir.path());
    m.deploy(0, &format!("name: ledger-svc\nport: {own}\n"));
    // host-b deploys the same service on `other`: the global spec now names `other`, which
    // is host-b's instance, not host-a's.
    m.deploy(1, &format!("name: ledger-svc\nport: {other}\n"));
    m.wait_for_instances(0, "ledger-svc", 2);
    wait_listening(&m, 0, own);
    wait_listening(&m, 0, other);

    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: ledger-svc\r\nconnection: close\r\n\r\n")
    };
    let declared = [("x-hms-caller", "host"), ("x-hms-protocol", "http/1.1")];

    // A port of the spec that is not one of host-a's instances: refused, nobody dialled.
    let a = attack(
        &m,
        &format!("ledger-svc:{other}"),
        &declared,
        get("/stolen").as_bytes(),
    );
    assert_eq!((a.status, a.error.as_str()), (503, "no-endpoint"), "{a:?}");
    let log = m.agents[0].log();
    assert!(
        log.contains("is not one of this host's instances"),
        "the refusal is logged on host-a:\n{log}"
    );
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert!(
        s["http"]["inbound_not_own_instance"].as_u64() >= Some(1),
        "status counts it: {}",
        s["http"]
    );

    // host-a's own instance, declared HTTP: relayed.
    let a = attack(
        &m,
        &format!("ledger-svc:{own}"),
        &declared,
        get("/own").as_bytes(),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.body.contains("ledger-svc on host-a saw GET /own"),
        "{a:?}"
    );

    // The same request in a stream declared opaque: cut before the instance sees it.
    let a = attack(
        &m,
        &format!("ledger-svc:{own}"),
        &[("x-hms-caller", "host")],
        get("/smuggled").as_bytes(),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body, "",
        "the instance answered an undeclared request: {a:?}"
    );
    let log = m.agents[0].log();
    assert!(log.contains("cut a stream declared opaque"), "{log}");

    let seen = format!("{}{}", ledger.seen(), bystander.seen());
    assert!(seen.contains("GET /own"), "{seen}");
    assert!(
        !seen.contains("/stolen"),
        "reached a port that is not host-a's instance: {seen}"
    );
    assert!(
        !seen.contains("/smuggled"),
        "undeclared HTTP reached the instance: {seen}"
    );
    assert_eq!(bystander.seen(), "", "the bystander saw nothing");
}

/// nghttpd (nghttp2's own server) inside host `host`'s namespace, serving `dir` over h2c.
struct Nghttpd(std::process::Child);

impl Nghttpd {
    fn start(m: &Mesh, host: usize, dir: &std::path::Path, port: u16) -> Nghttpd {
        let child = m.net.hosts[host]
            .command("nghttpd")
            .args(["--no-tls", "-d"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nghttpd (run `cargo xtask setup`)");
        wait_listening(m, host, port);
        Nghttpd(child)
    }
}

impl Drop for Nghttpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fifty_requests_at_once_from_host_c_over_one_connection_get_40_to_45_429s_at_a_5rps_limit() {
    let m = Mesh::new();
    let docs = tempfile::tempdir().unwrap();
    std::fs::write(docs.path().join("ok"), "ok\n").unwrap();
    let port = vm_tests::ports::free_port();
    let _server = Nghttpd::start(&m, 0, docs.path(), port);
    // Burst 5 (one second's worth) and no queue: the issue's acceptance.
    m.deploy(0, &format!("name: rl-svc\nport: {port}\nlimit: 5rps\n"));
    m.wait_for_instances(2, "rl-svc", 1);

    // nghttp sends every request of its command line at once, on one HTTP/2 connection;
    // host-c's agent carries them on one pooled tunnel stream to host-a.
    let out = m.cgs[2]
        .command("nsenter")
        .arg(format!("--net=/run/netns/{}", m.net.hosts[2].netns))
        .arg("--")
        .arg(vm_tests::tools::path_of("nghttp"))
        .args(["-nv", "-m", "50", "-t", "20"])
        .arg("http://rl-svc.svc/ok")
        .output()
        .unwrap();
    let out_text = text(&out);
    let count = |needle: &str| out_text.matches(needle).count();
    let (ok, limited) = (count(":status: 200"), count(":status: 429"));
    let context = || {
        format!(
            "{out_text}\nhost-a:\n{}\nhost-c:\n{}",
            m.agents[0].log(),
            m.agents[2].log()
        )
    };
    assert_eq!(
        ok + limited,
        50,
        "only 200 or 429, 50 answers: {}",
        context()
    );
    assert!(
        (40..=45).contains(&limited),
        "{limited} of 50 got 429 (want 40..=45): {}",
        context()
    );
    // Each 429 is the mesh's own answer, as on one host.
    assert_eq!(count("x-hms-error: rate-limited"), limited, "{}", context());
    assert_eq!(count("retry-after: "), limited, "{}", context());
    // Decided where the service lives: host-a counted them.
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert_eq!(
        s["http"]["rate_limited"].as_u64(),
        Some(limited as u64),
        "{}",
        s["http"]
    );
}

/// P3, caller claims: host-c claims to be payments-svc, which the operator placed on host-b
/// only (`hms-ctl place` on the CA host); host-b's same claim passes.
#[test]
fn host_c_claiming_a_service_not_placed_on_it_gets_403_and_host_b_which_runs_it_passes() {
    let m = Mesh::new();
    let port = vm_tests::ports::free_port();
    let ledger = Backend::start(&m.net, 0, "ledger-svc", port, m.dir.path());
    wait_listening(&m, 0, port);
    m.deploy(
        0,
        &format!("name: ledger-svc\nport: {port}\npolicy:\n  allow_from: [payments-svc]\n"),
    );
    m.place("payments-svc", 1);
    m.wait_for_instances(0, "ledger-svc", 1);
    let request = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: ledger-svc\r\nconnection: close\r\n\r\n")
    };
    let claim = [
        ("x-hms-caller", "payments-svc"),
        ("x-hms-protocol", "http/1.1"),
    ];
    let a = attack(
        &m,
        &format!("ledger-svc:{port}"),
        &claim,
        request("/from-c").as_bytes(),
    );
    assert_eq!(
        (a.status, a.error.as_str()),
        (403, "caller-not-placed"),
        "{a:?}"
    );
    let log = m.agents[0].log();
    assert!(log.contains("is not placed on host-c"), "{log}");
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert_eq!(
        s["http"]["inbound_caller_not_placed"].as_u64(),
        Some(1),
        "{}",
        s["http"]
    );
    let metrics = m.net.hosts[0]
        .command("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}/metrics", m.agents[0].metrics))
        .output()
        .unwrap();
    let metrics = text(&metrics);
    assert!(
        metrics.contains("hms_inbound_refused_total{reason=\"caller-not-placed\"} 1"),
        "{metrics}"
    );

    // The same claim with host-b's key (payments-svc is placed there) passes.
    let a = Attacker::with_keys_of(&m.agents[1].state_dir())
        .connect(
            &m.net.hosts[1].netns,
            inbound_of(&m, 0),
            &format!("ledger-svc:{port}"),
            &claim,
            request("/from-b").as_bytes(),
        )
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.body.contains("ledger-svc on host-a saw GET /from-b"),
        "{a:?}"
    );
    let seen = ledger.seen();
    assert!(!seen.contains("/from-c"), "{seen}");
}

/// P5, registry values: a spec naming a cgroup above another service's cgroup would make
/// every process there (the host's included) that service. One host, the real redirect:
/// the agent refuses it as an identity (log), so the host stays the host and is denied.
#[test]
fn a_spec_whose_cgroup_is_an_ancestor_of_another_service_s_gives_no_identity() {
    use vm_tests::agent::TestAgent;
    use vm_tests::cgroup::TestCgroup;
    use vm_tests::client::{ChildCgroup, curl, tail};
    const CURL_MAX: Duration = Duration::from_secs(10);

    let cg = TestCgroup::new("zt-cgroup").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let payments = ChildCgroup::new(cg.path(), "payments").unwrap();
    let ledger = vm_tests::backend::Backend::start("ledger-svc", 0).unwrap();
    agent
        .deploy_yaml(&format!(
            "name: ledger-svc\nport: {}\npolicy: {{allow_from: [payments-svc, greedy-svc]}}\n",
            ledger.addr.port()
        ))
        .unwrap();
    agent
        .deploy_yaml(&format!(
            "name: payments-svc\nport: {}\ncgroup: {}\n",
            vm_tests::ports::free_port(),
            payments.path().display()
        ))
        .unwrap();
    // greedy-svc names the test cgroup itself: the parent of payments-svc's cgroup, where
    // the host's own processes (this test's curl) run.
    agent
        .deploy_yaml(&format!(
            "name: greedy-svc\nport: {}\ncgroup: {}\n",
            vm_tests::ports::free_port(),
            cg.path().display()
        ))
        .unwrap();

    // A process in payments-svc's cgroup is payments-svc: allowed.
    let r = curl(
        payments.command("curl"),
        CURL_MAX,
        &["http://ledger-svc.svc/entries"],
    );
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 30));
    // A process in the test cgroup is the host, not greedy-svc: denied.
    let r = curl(
        cg.command("curl"),
        CURL_MAX,
        &["http://ledger-svc.svc/entries"],
    );
    assert_eq!(r.status, 403, "{r}\n{}", tail(&agent.log(), 30));
    assert_eq!(r.header("x-hms-error"), Some("denied"), "{r}");
    let log = agent.log();
    assert!(
        log.contains("refused the registry spec's cgroup") && log.contains("greedy-svc"),
        "the agent says why: {}",
        tail(&log, 30)
    );
    assert_eq!(
        ledger.seen_count(),
        1,
        "only payments-svc's request arrived"
    );
}

/// A WebSocket upgrade from host-c to an instance on host-a: the destination now serves the
/// declared-HTTP stream itself, and must still pass the 101 and then raw bytes both ways.
#[test]
fn a_websocket_upgrade_across_hosts_passes_the_destination_s_http_relay() {
    use vm_tests::websocket::{CLIENT, SERVER};
    let m = Mesh::new();
    let port = vm_tests::ports::free_port();
    let mut server = m.net.hosts[0]
        .command("python3")
        .args(["-c", SERVER, &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), port.to_string(), "the echo server listens");
    m.deploy(0, &format!("name: chat-svc\nport: {port}\n"));
    m.wait_for_instances(2, "chat-svc", 1);
    let out = m
        .client_on(2, "python3")
        .args(["-c", CLIENT])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let said = String::from_utf8_lossy(&out.stdout);
    let mut lines = said.lines();
    let context = || format!("{}\nhost-a:\n{}", text(&out), m.agents[0].log());
    assert_eq!(
        lines.next(),
        Some("HTTP/1.1 101 Switching Protocols"),
        "{}",
        context()
    );
    assert_eq!(
        lines.next(),
        Some("HELLO OVER THE UPGRADED STREAM"),
        "{}",
        context()
    );
}

/// The instance on host-a closes idle keep-alive connections after one second (Python's
/// `BaseHTTPRequestHandler.timeout`), silently. A Python `http.client` on host-c keeps one
/// connection and POSTs again after the instance closed its side: the destination's relay
/// sends the request on a new instance connection instead of failing it (a POST is never
/// retried by the caller's agent, so a failure here would reach the client).
#[test]
fn a_request_after_the_instance_closed_its_idle_connection_is_sent_on_a_new_one() {
    const SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    timeout = 1
    def do_POST(self):
        n = int(self.headers.get('content-length') or 0)
        body = self.rfile.read(n)
        out = b'got ' + body
        self.send_response(200)
        self.send_header('content-length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"#;
    const CLIENT: &str = r#"
import http.client, time
c = http.client.HTTPConnection('idle-svc.svc', 80, timeout=10)
for i in range(3):
    c.request('POST', '/pay', body=('payment-%d' % i).encode())
    r = c.getresponse()
    print(r.status, r.read().decode(), flush=True)
    time.sleep(2.5)
"#;
    let m = Mesh::new();
    let port = vm_tests::ports::free_port();
    let mut server = m.net.hosts[0]
        .command("python3")
        .args(["-c", SERVER, &port.to_string()])
        .spawn()
        .unwrap();
    wait_listening(&m, 0, port);
    m.deploy(0, &format!("name: idle-svc\nport: {port}\n"));
    m.wait_for_instances(2, "idle-svc", 1);
    let out = m
        .client_on(2, "python3")
        .args(["-c", CLIENT])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        [
            "200 got payment-0",
            "200 got payment-1",
            "200 got payment-2"
        ],
        "{}\nhost-a:\n{}\nhost-c:\n{}",
        text(&out),
        m.agents[0].log(),
        m.agents[2].log()
    );
}
