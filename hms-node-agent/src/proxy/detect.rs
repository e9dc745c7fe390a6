//! Protocol detection by peeking at the first bytes a client sends, without consuming them:
//! the HTTP/2 prior-knowledge preface, an HTTP/1.x request line, or anything else (kept on the
//! L4 path). Protocols where the server speaks first send nothing, so detection gives up
//! after a short wait and treats the connection as opaque.

use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method we recognise plus the space after it.
const MAX_METHOD: usize = 16;

/// What `bytes` (a prefix of the stream) says, or None if more bytes are needed.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // An HTTP/1 request line starts with a token of upper-case letters and a space.
    for (i, b) in bytes.iter().take(MAX_METHOD + 1).enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Some(Protocol::Http1),
            _ => return Some(Protocol::Opaque),
        }
    }
    if bytes.len() > MAX_METHOD {
        Some(Protocol::Opaque)
    } else {
        None
    }
}

/// Peeks until [`classify`] decides or `wait` passes.
pub async fn detect(stream: &TcpStream, wait: Duration) -> Protocol {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Protocol::Opaque,
            Ok(Ok(n)) => n,
        };
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        // Not enough yet: peek returns at once while bytes sit in the buffer, so wait a
        // little for more instead of spinning.
        if tokio::time::Instant::now() >= deadline {
            return Protocol::Opaque;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_http2_and_the_rest() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /pay HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None, "needs the whole preface");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Opaque),
            "TLS"
        );
        assert_eq!(classify(b"hello"), Some(Protocol::Opaque));
        assert_eq!(classify(b" GET"), Some(Protocol::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTU"), Some(Protocol::Opaque));
    }
}
