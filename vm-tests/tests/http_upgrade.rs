//! `Upgrade` (WebSocket) requests pass through the HTTP layer: the 101 answer reaches the
//! client and the connection then carries raw bytes both ways.

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;

/// Answers an Upgrade request with 101, then echoes every byte back upper-cased.
const SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 0)); s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
head = b''
while b'\r\n\r\n' not in head:
    head += c.recv(1024)
ok = b'upgrade: websocket' in head.lower()
c.sendall(b'HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n' if ok else b'HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n')
while True:
    d = c.recv(1024)
    if not d:
        break
    c.sendall(d.upper())
"#;

const CLIENT: &str = r#"
import socket
c = socket.create_connection(('chat-svc.svc', 80), timeout=5)
c.sendall(b'GET /chat HTTP/1.1\r\nHost: chat-svc.svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
head = b''
while b'\r\n\r\n' not in head:
    head += c.recv(1024)
print(head.split(b'\r\n')[0].decode())
c.sendall(b'hello over the upgraded stream')
got = b''
while len(got) < 30:
    got += c.recv(1024)
print(got.decode())
"#;

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
