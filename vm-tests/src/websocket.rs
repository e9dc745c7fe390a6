//! A WebSocket echo pair for the upgrade tests: a server that answers an `Upgrade` request
//! with 101 and then echoes every byte upper-cased, and a client that upgrades
//! `chat-svc.svc` and says what came back.

/// Answers an Upgrade request with 101, then echoes every byte back upper-cased. Listens
/// on 127.0.0.1 at the port given as its argument (none: any) and prints the port.
pub const SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1]) if len(sys.argv) > 1 else 0)); s.listen()
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

pub const CLIENT: &str = r#"
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
