//! User story: an unprivileged local user who opens as many connections as they can to
//! every listener of the agent cannot stop a `.svc` call or a DNS lookup, even with the
//! agent held to systemd's default 1024 file descriptors; `/metrics` shows the shedding.
//! Real agent, real kernel redirect, the attacker a real process running as `nobody`.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::{curl, tail};

/// Opens connections round-robin to every `host:port` given until 4000 are open or 15 s
/// have passed, prints how many, then keeps opening more (so that any descriptor the agent
/// frees is taken again at once) until stdin closes, holding every one.
const HOG: &str = r#"
import resource, socket, sys, time, json, select
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
targets = [(a.rsplit(':', 1)[0], int(a.rsplit(':', 1)[1])) for a in sys.argv[1:]]
held, failed = [], 0
start = time.monotonic()
while len(held) < 4000 and time.monotonic() - start < 15 and failed < 2000:
    for t in targets:
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(t)
            held.append(s)
        except OSError:
            failed += 1
            s.close()
print(json.dumps({"opened": len(held), "failed": failed}), flush=True)
while len(held) < 15000:
    if select.select([sys.stdin], [], [], 0.005)[0]:
        break
    for t in targets:
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(t)
            held.append(s)
        except OSError:
            s.close()
sys.stdin.read()
"#;

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[test]
fn a_local_user_holding_every_listener_cannot_stop_svc_calls_or_dns_lookups() {
    let cg = TestCgroup::new("hostile").unwrap();
    let agent = TestAgent::start_with_fd_limit(cg.path(), 1024).unwrap();
    let backend = Backend::start("steady-svc", 0).unwrap();
    agent.deploy("steady-svc", backend.addr.port()).unwrap();
    let log = agent.log();
    assert!(
        log.contains("RLIMIT_NOFILE") && log.contains("1024"),
        "the agent logs its fd limit: {}",
        tail(&log, 20)
    );

    // The attacker: not in the meshed cgroup, running as nobody, at every TCP listener.
    let targets = [agent.outbound, agent.dns, agent.metrics].map(|a| a.to_string());
    let mut hog = vm_tests::tools::command("python3");
    hog.args(["-c", HOG])
        .args(&targets)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut hog = hog.spawn().expect("python3");
    let mut first_line = Vec::new();
    let mut out = hog.stdout.take().unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    while !first_line.ends_with(b"\n") {
        assert!(
            started.elapsed() < vm_tests::slack(Duration::from_secs(60)),
            "the attacker never finished opening"
        );
        if out.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        first_line.push(byte[0]);
    }
    let opened: serde_json::Value = serde_json::from_slice(&first_line).expect("hog summary");
    eprintln!("MEASURED: the attacker opened {opened}");
    assert!(
        opened["opened"].as_u64().unwrap_or(0) >= 1000,
        "the attacker must really try: {opened}"
    );

    // While it holds what it could: a .svc call (DNS over UDP, then the outbound proxy) and
    // a DNS lookup over TCP (the capped DNS listener), both from inside the cgroup.
    for i in 0..5 {
        let r = curl(
            cg.command("curl"),
            Duration::from_secs(10),
            &[&format!("http://steady-svc.svc/under-attack/{i}")],
        );
        assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 30));
    }
    let dig = cg
        .command("dig")
        .args([
            "@127.0.0.53",
            "steady-svc.svc",
            "A",
            "+tcp",
            "+short",
            "+tries=1",
            "+time=5",
        ])
        .output()
        .expect("dig");
    let answer = String::from_utf8_lossy(&dig.stdout);
    assert!(
        answer.trim().starts_with("127.77."),
        "DNS over TCP answered the VIP: {answer:?} {}",
        String::from_utf8_lossy(&dig.stderr)
    );

    // The scrape itself gets through (it sheds the oldest idle attacker connection).
    let metrics = vm_tests::tools::command("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/metrics", agent.metrics))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout).to_string();
    let shed_dns = metric(
        &text,
        "hms_listener_connections_shed_total{listener=\"dns_tcp\"}",
    );
    let shed_metrics = metric(
        &text,
        "hms_listener_connections_shed_total{listener=\"metrics\"}",
    );
    let dns_open = metric(&text, "hms_listener_connections{listener=\"dns_tcp\"}");
    let dns_cap = metric(&text, "hms_listener_connection_cap{listener=\"dns_tcp\"}");
    eprintln!(
        "MEASURED: shed dns_tcp {shed_dns}, metrics {shed_metrics}; dns_tcp open {dns_open} of {dns_cap}; fd limit {}",
        metric(&text, "hms_fd_limit")
    );
    assert_eq!(metric(&text, "hms_fd_limit"), 1024, "{text}");
    assert!(shed_dns > 0 && shed_metrics > 0, "{text}");
    assert!(dns_open <= dns_cap, "{text}");
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(status["limits"]["fd_limit"], 1024, "{status}");

    drop(hog.stdin.take());
    let _ = hog.kill();
    let _ = hog.wait();
}

/// Opens byte-stream connections through a VIP (redirected to the agent, spliced to a
/// service that holds them), sends one byte on each so the proxy sees an opaque stream, and
/// holds them until stdin closes. Prints how many stayed open.
const STREAM_HOG: &str = r#"
import socket, sys, time, json, select, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
vip, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((vip, 80))
        s.sendall(b'x')
        held.append(s)
    except OSError:
        s.close()
time.sleep(1)
alive = 0
for s in held:
    s.setblocking(False)
    try:
        alive += 1 if s.recv(1) != b'' else 0
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(json.dumps({"tried": n, "held": alive}), flush=True)
sys.stdin.read()
"#;

/// An agent held to 1024 fds with two services: `steady-svc` (an HTTP backend) and
/// `hold-svc` (a plain TCP service that accepts and holds: what the attacker streams to);
/// returns `hold-svc`'s VIP.
fn steady_and_hold_services(name: &str) -> (TestCgroup, TestAgent, Backend, std::net::Ipv4Addr) {
    let cg = TestCgroup::new(name).unwrap();
    let agent = TestAgent::start_with_fd_limit(cg.path(), 1024).unwrap();
    let backend = Backend::start("steady-svc", 0).unwrap();
    agent.deploy("steady-svc", backend.addr.port()).unwrap();
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hold_port = hold.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for c in hold.incoming().flatten() {
            kept.push(c);
        }
    });
    let vip = agent.deploy("hold-svc", hold_port).unwrap();
    (cg, agent, backend, vip)
}

/// The attacker: nobody inside the meshed cgroup, like any local user's program (setpriv
/// drops to nobody after the child has joined the cgroup, which needs root), trying `n`
/// byte streams to `vip`. Returns it (holding them until its stdin closes) and its summary.
fn stream_hog(
    cg: &TestCgroup,
    vip: std::net::Ipv4Addr,
    n: u64,
) -> (std::process::Child, serde_json::Value) {
    let mut hog = cg.command("setpriv");
    hog.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(vm_tests::tools::path_of("python3"))
        .args(["-c", STREAM_HOG, &vip.to_string()])
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut hog = hog.spawn().expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let summary = serde_json::from_str(&line).expect("hog summary");
    (hog, summary)
}

#[test]
fn a_local_user_holding_byte_streams_through_a_vip_gets_half_the_proxy_and_no_more() {
    let (cg, agent, _backend, vip) = steady_and_hold_services("streamhog");
    let (mut hog, summary) = stream_hog(&cg, vip, 400);
    // Every other user still gets through: root's calls succeed while the streams are held.
    for i in 0..5 {
        let r = curl(
            cg.command("curl"),
            Duration::from_secs(10),
            &[&format!("http://steady-svc.svc/beside-the-hog/{i}")],
        );
        assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 30));
    }
    let outbound = outbound_limits(&agent);
    eprintln!("MEASURED: the attacker held {summary}; outbound limits {outbound}");
    let cap = outbound["cap"].as_u64().unwrap();
    let held = summary["held"].as_u64().unwrap();
    assert!(
        held <= cap / 2,
        "one user holds at most half the cap ({cap}): {summary}"
    );
    assert!(
        held >= cap / 4,
        "the attacker really held streams: {summary}"
    );
    assert!(
        outbound["refused_user_share"].as_u64().unwrap_or(0) > 0,
        "the rest were refused as over the user's share: {outbound}"
    );

    let metrics = vm_tests::tools::command("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/metrics", agent.metrics))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metric(
            &text,
            "hms_listener_connections_refused_user_share_total{listener=\"outbound\"}"
        ) > 0,
        "{text}"
    );
    drop(hog.stdin.take());
    let _ = hog.kill();
    let _ = hog.wait();
}

/// The outbound listener's line of `hms-ctl status`'s limits (cap, open, shed, refused...).
fn outbound_limits(agent: &TestAgent) -> serde_json::Value {
    let status = agent.ctl_json(&["status"]).unwrap();
    status["limits"]["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["listener"] == "outbound"))
        .cloned()
        .unwrap_or_default()
}

/// Opens `n` HTTP/1.1 keep-alive connections (Python's http.client, one GET each), prints
/// how many answered, waits for a line on stdin, then sends a second GET on each same
/// connection and prints how many still answered there (a connection the agent closed in
/// between fails: http.client does not reconnect an open connection by itself).
const KEEPALIVE_HOLDER: &str = r#"
import http.client, json, sys
host, n = sys.argv[1], int(sys.argv[2])
conns = []
for i in range(n):
    c = http.client.HTTPConnection(host, 80, timeout=10)
    c.request('GET', '/first/%d' % i)
    r = c.getresponse()
    r.read()
    if r.status == 200:
        conns.append(c)
print(json.dumps({'opened': len(conns)}), flush=True)
sys.stdin.readline()
kept = 0
for i, c in enumerate(conns):
    try:
        c.request('GET', '/second/%d' % i)
        r = c.getresponse()
        r.read()
        kept += r.status == 200
    except (OSError, http.client.HTTPException):
        pass
print(json.dumps({'kept': kept}), flush=True)
"#;

/// The cap is full: another user's kept-alive connections (idle between requests) fill the
/// half the attacker may not take, the attacker holds its half busy and keeps opening more.
/// Each of those is refused as over its share, and none may cost anybody an idle connection
/// (before, each was admitted at the full cap by shedding the oldest idle connection, then
/// refused: an unprivileged user could close everyone's kept-alive connections in a loop).
#[test]
fn a_local_user_over_its_share_at_a_full_cap_closes_nobody_elses_kept_alive_connections() {
    let (cg, agent, _backend, vip) = steady_and_hold_services("shareshed");
    let cap = outbound_limits(&agent)["cap"].as_u64().unwrap();
    let share = cap / 2;

    // Root's service: kept-alive connections, idle once answered.
    let mut holder = cg.command("python3");
    holder
        .args(["-c", KEEPALIVE_HOLDER, "steady-svc.svc"])
        .arg((cap - share).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut holder = holder.spawn().expect("python3");
    let mut holder_out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut holder_out, &mut line).unwrap();
    let opened: serde_json::Value = serde_json::from_str(&line).expect("holder's first line");
    assert_eq!(
        opened["opened"].as_u64(),
        Some(cap - share),
        "{opened}\n{}",
        tail(&agent.log(), 30)
    );

    // The attacker (nobody): its half, then a hundred more tries at the full cap.
    let (mut hog, summary) = stream_hog(&cg, vip, share + 100);
    let limits = outbound_limits(&agent);
    eprintln!("MEASURED: the attacker held {summary}; outbound limits {limits}");
    assert_eq!(
        summary["held"].as_u64(),
        Some(share),
        "the attacker holds its share: {summary} {limits}"
    );
    assert!(
        limits["refused_user_share"].as_u64().unwrap_or(0) >= 100,
        "the tries past its share were refused as such: {limits}"
    );
    assert_eq!(
        limits["shed"].as_u64(),
        Some(0),
        "no idle connection was shed for a connection then refused: {limits}"
    );

    // Every kept-alive connection of root's still answers, on the same connection.
    std::io::Write::write_all(holder.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut holder_out, &mut line).unwrap();
    let kept: serde_json::Value = serde_json::from_str(&line).expect("holder's second line");
    assert_eq!(
        kept["kept"].as_u64(),
        Some(cap - share),
        "{kept}\n{}",
        tail(&agent.log(), 30)
    );
    let _ = holder.wait();
    drop(hog.stdin.take());
    let _ = hog.kill();
    let _ = hog.wait();
}

/// Opens connections to the gateway's plain-HTTP listener from one source address: `busy`
/// of them send a request to a slow backend (in flight for the whole test), then `idle`
/// more send nothing. Prints, as JSON, how many of each the gateway closed at once, then
/// holds everything until stdin closes.
const GATEWAY_HOG: &str = r#"
import json, socket, sys, time
src, port, busy, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def opened(send):
    s = socket.socket()
    s.bind((src, 0))
    s.connect(('127.0.0.1', port))
    if send:
        s.sendall(b'GET /slow HTTP/1.1\r\nHost: shop.test\r\n\r\n')
    return s
def closed(s):
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b''
    except BlockingIOError:
        return False
    except OSError:
        return True
held_busy = [opened(True) for _ in range(busy)]
time.sleep(1)
held_idle = [opened(False) for _ in range(idle)]
time.sleep(1)
print(json.dumps({
    'busy_closed': sum(closed(s) for s in held_busy),
    'idle_closed': sum(closed(s) for s in held_idle),
}), flush=True)
sys.stdin.read()
"#;

/// An outside client at the gateway's door, the agent held to 1024 fds (gateway cap 16):
/// one address keeps at most half the places busy and gets nothing more; another client's
/// idle connections are shed for a newcomer; and through it all other clients get answers
/// at the gateway and meshed callers at their `.svc` names.
#[test]
fn an_outside_client_holding_gateway_connections_gets_half_and_others_still_get_in() {
    let cg = TestCgroup::new("hostile-gw").unwrap();
    let agent =
        TestAgent::start_with_fd_limit_and(cg.path(), 1024, vec!["--gateway".into(), "all".into()])
            .unwrap();
    let slow = Backend::start_with(
        "slow-svc",
        0,
        vm_tests::backend::Behavior::delay(Duration::from_secs(60)),
    )
    .unwrap();
    let fast = Backend::start("fast-svc", 0).unwrap();
    agent.deploy("slow-svc", slow.addr.port()).unwrap();
    agent.deploy("fast-svc", fast.addr.port()).unwrap();
    let port = vm_tests::ports::free_port();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gateway.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: door\nlisteners:\n  - name: web\n    port: {port}\n    protocol: http\nroutes:\n  - name: slow\n    hostnames: [shop.test]\n    matches: [{{path: {{prefix: /slow}}}}]\n    timeout: 90s\n    backends: [{{service: slow-svc}}]\n  - name: fast\n    hostnames: [shop.test]\n    backends: [{{service: fast-svc}}]\n"
        ),
    )
    .unwrap();
    let out = agent.ctl(&["gateway", "apply", spec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from = |src: &str| {
        curl(
            vm_tests::tools::command("curl"),
            Duration::from_secs(10),
            &[
                "--interface",
                src,
                "-H",
                "Host: shop.test",
                &format!("http://127.0.0.1:{port}/fast"),
            ],
        )
    };
    let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
    while from("127.0.0.9").status != 200 {
        assert!(
            Instant::now() < deadline,
            "gateway never served\n{}",
            tail(&agent.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let scrape = || {
        let m = vm_tests::tools::command("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("http://{}/metrics", agent.metrics))
            .output()
            .unwrap();
        String::from_utf8_lossy(&m.stdout).to_string()
    };
    assert_eq!(
        metric(
            &scrape(),
            "hms_listener_connection_cap{listener=\"gateway\"}"
        ),
        16,
        "1024 fds give the gateway 16 connections"
    );
    let hog = |src: &str, busy: u32, idle: u32| {
        let mut c = vm_tests::tools::command("python3");
        c.args(["-c", GATEWAY_HOG, src, &port.to_string()])
            .args([busy.to_string(), idle.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = c.spawn().expect("python3");
        let mut out = child.stdout.take().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") && out.read(&mut byte).unwrap_or(0) == 1 {
            line.push(byte[0]);
        }
        let summary: serde_json::Value =
            serde_json::from_slice(&line).unwrap_or_else(|e| panic!("hog summary {e}: {line:?}"));
        (child, summary)
    };

    // The attacker (127.0.0.2): 12 requests in flight, then 20 idle connections. It keeps 8
    // (half the cap) busy; everything else it opens is closed at once.
    let (attacker, got) = hog("127.0.0.2", 12, 20);
    eprintln!("MEASURED: the attacker's connections closed at once: {got}");
    assert_eq!(got["busy_closed"], 4, "{got}\n{}", tail(&agent.log(), 20));
    assert_eq!(got["idle_closed"], 20, "{got}");
    // Another client still gets answers, one request after another.
    for _ in 0..5 {
        let r = from("127.0.0.3");
        assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 20));
    }
    // A third client fills the rest with idle connections (8: its share, the cap is full)...
    let (idler, got) = hog("127.0.0.4", 0, 8);
    assert_eq!(got["idle_closed"], 0, "{got}");
    // ...and a newcomer is let in by shedding the oldest idle one, not refused.
    let r = from("127.0.0.5");
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 20));
    // Meshed callers are untouched.
    let r = curl(
        cg.command("curl"),
        Duration::from_secs(10),
        &["http://fast-svc.svc/mesh"],
    );
    assert_eq!(r.status, 200, "{r}");

    let text = scrape();
    let shed = metric(
        &text,
        "hms_listener_connections_shed_total{listener=\"gateway\"}",
    );
    let by_share = metric(
        &text,
        "hms_listener_connections_refused_user_share_total{listener=\"gateway\"}",
    );
    eprintln!("MEASURED: gateway cap 16: {by_share} refused by the client share, {shed} idle shed");
    assert_eq!(by_share, 24, "4 busy + 20 idle of the attacker");
    assert!(shed >= 1, "the newcomer shed an idle connection: {shed}");
    for mut child in [attacker, idler] {
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
    }
}
