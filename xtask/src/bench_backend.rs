//! The bench's backend (`xtask bench-backend --listen ADDR`, hidden): a tiny HTTP/1.1
//! keep-alive server that answers every request with 1 KiB, one thread per connection
//! (the bench opens 16 client connections; a proxy adds a few pooled ones). Standard library
//! only, so it costs the same in every scenario and nothing in it can be the mesh's.
//!
//! It also tells which path each request took, so the bench can prove its scenarios go where
//! they claim: a request carrying `x-hms-trace-id` came through an HMS proxy, one carrying
//! `x-bench-via: haproxy` through the bench's HAProxy, anything else straight from the
//! client. `GET /__bench/stats` answers the counts per request path as JSON.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::Context;

/// Response body size.
pub const BODY_BYTES: usize = 1024;
/// Path of the counters.
pub const STATS_PATH: &str = "/__bench/stats";

#[derive(Default, Clone, Copy)]
struct Via {
    direct: u64,
    hms: u64,
    haproxy: u64,
}

type Counts = Arc<Mutex<BTreeMap<String, Via>>>;

pub fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    eprintln!("bench-backend: listening on {}", listener.local_addr()?);
    let counts: Counts = Arc::default();
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {BODY_BYTES}\r\n\r\n"
    )
    .into_bytes();
    response.extend(std::iter::repeat_n(b'x', BODY_BYTES));
    let response: Arc<[u8]> = response.into();
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let _ = stream.set_nodelay(true);
        let counts = Arc::clone(&counts);
        let response = Arc::clone(&response);
        std::thread::spawn(move || serve(stream, &counts, &response));
    }
    Ok(())
}

fn serve(mut stream: TcpStream, counts: &Counts, response: &[u8]) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    loop {
        // Answer every complete request in the buffer (pipelining included).
        while let Some(head_end) = find(&buf[..have], b"\r\n\r\n") {
            let head = &buf[..head_end + 4];
            let req = parse_head(head);
            let total = head_end + 4 + req.content_length;
            if total > buf.len() {
                return; // bodies this large are not part of the bench
            }
            if have < total {
                break;
            }
            let ok = if req.path == STATS_PATH {
                let body = stats_json(counts);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).is_ok()
                    && stream.write_all(body.as_bytes()).is_ok()
            } else {
                {
                    let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
                    let entry = match map.get_mut(req.path.as_str()) {
                        Some(e) => e,
                        None => map.entry(req.path.clone()).or_default(),
                    };
                    match req.via {
                        Path::Direct => entry.direct += 1,
                        Path::Hms => entry.hms += 1,
                        Path::Haproxy => entry.haproxy += 1,
                    }
                }
                stream.write_all(response).is_ok()
            };
            if !ok || req.close {
                return;
            }
            buf.copy_within(total..have, 0);
            have -= total;
        }
        if have == buf.len() {
            return; // a head larger than 64 KiB
        }
        match stream.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
}

enum Path {
    Direct,
    Hms,
    Haproxy,
}

struct Request {
    path: String,
    content_length: usize,
    close: bool,
    via: Path,
}

fn parse_head(head: &[u8]) -> Request {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let mut req = Request {
        path,
        content_length: 0,
        close: false,
        via: Path::Direct,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            req.content_length = value.parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("connection") {
            req.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("x-hms-trace-id") {
            req.via = Path::Hms;
        } else if name.eq_ignore_ascii_case("x-bench-via") && value == "haproxy" {
            req.via = Path::Haproxy;
        }
    }
    req
}

fn stats_json(counts: &Counts) -> String {
    let map = counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let obj: serde_json::Map<String, serde_json::Value> = map
        .into_iter()
        .map(|(path, v)| {
            (
                path,
                serde_json::json!({"direct": v.direct, "hms": v.hms, "haproxy": v.haproxy}),
            )
        })
        .collect();
    serde_json::Value::Object(obj).to_string()
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_the_three_paths_apart() {
        let r = parse_head(b"GET /bench/x HTTP/1.1\r\nHost: a\r\nX-Hms-Trace-Id: 00\r\n\r\n");
        assert!(matches!(r.via, Path::Hms));
        assert_eq!(r.path, "/bench/x");
        let r = parse_head(b"GET / HTTP/1.1\r\nx-bench-via: haproxy\r\ncontent-length: 3\r\n\r\n");
        assert!(matches!(r.via, Path::Haproxy));
        assert_eq!(r.content_length, 3);
        let r = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(matches!(r.via, Path::Direct));
        assert!(r.close);
    }
}
