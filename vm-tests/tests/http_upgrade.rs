//! `Upgrade` (WebSocket) requests pass through the HTTP layer: the 101 answer reaches the
//! client and the connection then carries raw bytes both ways.

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;

use vm_tests::websocket::{CLIENT, SERVER};

#[test]
fn a_websocket_upgrade_passes_through_and_carries_bytes_both_ways() {
    let cg = TestCgroup::new("upgrade-ws").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let mut server = vm_tests::tools::command("python3")
        .args(["-c", SERVER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut port,
    )
    .unwrap();
    agent
        .deploy("chat-svc", port.trim().parse().unwrap())
        .unwrap();
    let out = cg.command("python3").args(["-c", CLIENT]).output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("HTTP/1.1 101 Switching Protocols"),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert_eq!(lines.next(), Some("HELLO OVER THE UPGRADED STREAM"));
}
