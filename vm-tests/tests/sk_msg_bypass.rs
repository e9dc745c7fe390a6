//! The sk_msg/sockhash bypass (on by default; `--sk-msg-bypass=false` turns it off): with the
//! agent inside the redirected cgroup, bytes between an unmodified app and the proxy skip the
//! loopback TCP stack. These tests check that the bypass really carries the traffic (the kernel
//! program's own counters), that it carries it intact in both directions for HTTP and opaque
//! TCP, that the TCP tap still counts the bytes, that it stays out of the way when off or when
//! the agent runs outside the cgroup, and that nothing of it outlives `hms-node-agent cleanup`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;

fn sk_msg_status(agent: &TestAgent) -> serde_json::Value {
    agent.ctl_json(&["status"]).expect("status")["sk_msg"].clone()
}

/// Deterministic bytes that are not all alike, so a reordered or dropped chunk shows.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// An opaque (non-HTTP) TCP service: reads exactly `len` bytes, sends them back, closes.
fn echo_once(len: usize) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).expect("read the whole payload");
        s.write_all(&got).expect("echo");
        got
    });
    (port, handle)
}

/// Sends a file to HOST:PORT (resolved with getaddrinfo, as unmodified apps do), reads until
/// the peer closes, prints `same` when the echo equals what was sent.
const ECHO_CLIENT: &str = r#"
import socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
s = socket.create_connection((host, port), timeout=10)
s.sendall(data)
got = bytearray()
while True:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    got += chunk
print("same" if bytes(got) == data else "different: %d of %d bytes" % (len(got), len(data)))
"#;

fn curl_post(cg: &TestCgroup, url: &str, body: &std::path::Path) -> std::process::Output {
    cg.command("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--data-binary", &format!("@{}", body.display()), url])
        .output()
        .expect("curl (run `cargo xtask setup`)")
}

#[test]
fn by_default_http_and_opaque_tcp_take_the_bypass_and_arrive_intact() {
    let cg = TestCgroup::new("skmsg").expect("test cgroup");
    let agent = TestAgent::start_inside(cg.path(), vec![]).expect("agent");
    let s = sk_msg_status(&agent);
    assert_eq!(s["enabled"], true, "{s}");
    assert_eq!(s["agent_in_cgroup"], true, "{s}");

    // HTTP: a 1 MiB upload must reach the backend byte for byte.
    let backend = Backend::start("upload-svc", 0).expect("backend");
    agent
        .deploy("upload-svc", backend.addr.port())
        .expect("deploy");
    let body = payload(1 << 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("body");
    std::fs::write(&file, &body).expect("write body");
    let before = sk_msg_status(&agent)["redirected"].as_u64().unwrap_or(0);
    let o = curl_post(&cg, "http://upload-svc.svc/upload", &file);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "200",
        "curl: {}\nagent log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        agent.log()
    );
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "one request reached the backend");
    assert!(seen[0].body == body, "the upload arrived altered");
    let s = sk_msg_status(&agent);
    let after = s["redirected"].as_u64().unwrap_or(0);
    assert!(
        after > before,
        "the request did not go through the bypass: {s}\nagent log:\n{}",
        agent.log()
    );
    assert!(
        s["redirected_bytes"].as_u64().unwrap_or(0) >= body.len() as u64,
        "the bypass carried fewer bytes than the upload: {s}"
    );
    assert_eq!(s["passed"], 0, "a send found no peer in the bypass: {s}");

    // Opaque TCP, 4 MiB each way through the proxy's splice; the client compares what came
    // back itself (its output stays small).
    let len = 4 << 20;
    let (port, server) = echo_once(len);
    agent.deploy("echo-svc", port).expect("deploy echo");
    let data = payload(len);
    let data_file = dir.path().join("echo");
    std::fs::write(&data_file, &data).expect("write echo payload");
    let o = cg
        .command("python3")
        .args(["-c", ECHO_CLIENT, "echo-svc.svc", &port.to_string()])
        .arg(&data_file)
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "same",
        "stderr: {}\nagent log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        agent.log()
    );
    assert!(server.join().expect("echo server") == data);
    // The flow tap counts the payload the bypass carried (it never entered TCP's counters).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let tap = agent.ctl(&["tap", "echo-svc", "--last", "10", "-o", "json"]);
        let text = String::from_utf8_lossy(&tap.stdout).into_owned();
        let flow = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["request_bytes"].as_u64().is_some_and(|n| n > 0));
        if let Some(e) = flow {
            assert_eq!(e["request_bytes"], len as u64, "{e}");
            assert_eq!(e["response_bytes"], len as u64, "{e}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no flow event for echo-svc in the tap:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = sk_msg_status(&agent);
    assert!(
        s["redirected_bytes"].as_u64().unwrap_or(0) >= (body.len() + 2 * len) as u64,
        "the opaque connection did not go through the bypass: {s}"
    );
    assert_eq!(s["passed"], 0, "{s}");
}

#[test]
fn an_agent_outside_the_cgroup_keeps_the_bypass_off() {
    let cg = TestCgroup::new("skmsg-out").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let s = sk_msg_status(&agent);
    assert_eq!(s["enabled"], false, "{s}");
    assert_eq!(s["agent_in_cgroup"], false, "{s}");
}

#[test]
fn with_the_bypass_off_nothing_enters_it() {
    let cg = TestCgroup::new("skmsg-off").expect("test cgroup");
    let agent =
        TestAgent::start_inside(cg.path(), vec!["--sk-msg-bypass=false".into()]).expect("agent");
    let backend = Backend::start("plain-svc", 0).expect("backend");
    agent
        .deploy("plain-svc", backend.addr.port())
        .expect("deploy");
    let o = cg
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://plain-svc.svc/"])
        .output()
        .expect("curl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = sk_msg_status(&agent);
    assert_eq!(s["enabled"], false, "{s}");
    assert_eq!(s["redirected"], 0, "{s}");
    assert_eq!(s["passed"], 0, "{s}");
}

#[test]
fn cleanup_leaves_no_sk_msg_program_or_sockhash() {
    let cg = TestCgroup::new("skmsg-clean").expect("test cgroup");
    let mut agent = TestAgent::start_inside(cg.path(), vec![]).expect("agent");
    let backend = Backend::start("gone-svc", 0).expect("backend");
    agent
        .deploy("gone-svc", backend.addr.port())
        .expect("deploy");
    let o = cg
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://gone-svc.svc/"])
        .output()
        .expect("curl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let out = vm_tests::tools::command("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool (run `cargo xtask setup`)");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    // This agent's sockhash, and the sk_msg program that uses it (other tests' agents have
    // their own).
    let socks = agent.pin_set().join("HMS_SOCKS");
    let socks_id = bpftool(&["map", "show", "pinned", socks.to_str().expect("utf-8")])["id"]
        .as_u64()
        .expect("HMS_SOCKS is pinned");
    let ours = || -> Vec<u64> {
        bpftool(&["prog", "show"])
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == "hms_sk_msg")
            .filter(|p| {
                p["map_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(socks_id)))
            })
            .filter_map(|p| p["id"].as_u64())
            .collect()
    };
    let map_alive =
        || bpftool(&["map", "show", "id", &socks_id.to_string()])["id"].as_u64() == Some(socks_id);
    assert!(
        !ours().is_empty(),
        "no hms_sk_msg program uses this agent's HMS_SOCKS"
    );
    agent.stop().expect("stop");
    let out = agent.cleanup();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The kernel frees the program once the map's last user reference is gone and the
    // connections that used it are closed (curl exited; the proxy's ends died with it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = ours();
        let alive = map_alive();
        if left.is_empty() && !alive {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after cleanup, sk_msg programs {left:?} are still loaded (sockhash {socks_id} \
             alive: {alive})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_instance_in_the_cgroup_is_reached_through_the_bypass_too() {
    let cg = TestCgroup::new("skmsg-inst").expect("test cgroup");
    let agent = TestAgent::start_inside(cg.path(), vec![]).expect("agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let page = payload(256 << 10);
    std::fs::write(dir.path().join("page"), &page).expect("write page");
    // An instance inside the redirected cgroup: both legs (app <-> proxy, proxy <-> instance)
    // can skip TCP.
    let port = vm_tests::ports::free_port();
    let mut server = cg
        .command("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.deploy("page-svc", port).expect("deploy");
    let before = sk_msg_status(&agent);
    let o = cg
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://page-svc.svc/page"])
        .output()
        .expect("curl");
    let _ = server.kill();
    let _ = server.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == page, "the page came back altered");
    let after = sk_msg_status(&agent);
    let moved = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    // The page crossed both legs: at least twice its size went through the bypass.
    assert!(
        moved("redirected_bytes") >= 2 * page.len() as u64,
        "before {before}, after {after}"
    );
    assert_eq!(moved("passed"), 0, "before {before}, after {after}");
}

#[test]
fn mapped_and_ipv6_callers_take_the_bypass_like_ipv4_ones() {
    let cg = TestCgroup::new("skmsg6").expect("test cgroup");
    let agent = TestAgent::start_inside(cg.path(), vec![]).expect("agent");
    let backend = Backend::start("upload6-svc", 0).expect("backend");
    let vip = agent
        .deploy("upload6-svc", backend.addr.port())
        .expect("deploy");
    let [a, b, c, d] = vip.octets();
    let v6 = format!(
        "fd48:4d53::{:x}:{:x}",
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d])
    );
    let body = payload(256 << 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("body");
    std::fs::write(&file, &body).expect("write body");
    // curl dials an IPv6 literal with an AF_INET6 socket: the mapped VIP is an IPv4
    // connection underneath (HMS_SOCKS), the IPv6 VIP a real IPv6 one (HMS_SOCKS6).
    for (family, host) in [
        ("ipv4", vip.to_string()),
        ("mapped", format!("[::ffff:{vip}]")),
        ("ipv6", format!("[{v6}]")),
    ] {
        let before = sk_msg_status(&agent)["redirected"].as_u64().unwrap_or(0);
        let o = curl_post(&cg, &format!("http://{host}/upload/{family}"), &file);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "200",
            "{family}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            agent.log()
        );
        let seen = backend.seen();
        let last = seen.last().expect("the backend saw it");
        assert_eq!(last.path, format!("/upload/{family}"));
        assert!(last.body == body, "{family}: the upload arrived altered");
        let s = sk_msg_status(&agent);
        assert!(
            s["redirected"].as_u64().unwrap_or(0) > before,
            "{family} did not go through the bypass: {s}"
        );
    }
}
