//! A real HTTP/1.1 backend for tests: answers every request with `200` and a body naming
//! itself and the path, and records what it saw so tests assert on the backend's side, not
//! only on what the client got. Threads and std sockets only: the backend must not share a
//! runtime with the code under test.
//!
//! A [`Behavior`] injects faults by request number (counted across all connections, from 0,
//! in the order requests were fully read): fail the first N with a status, always answer a
//! status, delay every answer, reset the connection, close it mid-body, or send the body
//! slowly. Every request is recorded in [`Backend::seen`] before the fault is applied, so a
//! test counts attempts exactly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the backend had read the whole request.
    pub at: Instant,
}

impl SeenRequest {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower case).
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the backend does with each request. The default answers `200` at once.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Answer requests `0..fail_first` with `fail_status` (503 when unset).
    pub fail_first: usize,
    pub fail_status: Option<u16>,
    /// Answer every request with this status.
    pub always_status: Option<u16>,
    /// Wait this long before answering each request.
    pub delay: Duration,
    /// Reset the connection (SO_LINGER 0, then close) instead of answering requests
    /// `0..reset_first`.
    pub reset_first: usize,
    /// For requests `0..close_mid_body_first`: send the headers and part of the body, then
    /// close the connection.
    pub close_mid_body_first: usize,
    /// Send the head at once, then the body in this many pieces, each after waiting
    /// `slow_body_interval`.
    pub slow_body_chunks: usize,
    pub slow_body_interval: Duration,
}

impl Behavior {
    pub fn ok() -> Behavior {
        Behavior::default()
    }

    /// The first `n` requests get `status`, the rest 200.
    pub fn fail_first(n: usize, status: u16) -> Behavior {
        Behavior {
            fail_first: n,
            fail_status: Some(status),
            ..Behavior::default()
        }
    }

    /// Every request gets `status`.
    pub fn always(status: u16) -> Behavior {
        Behavior {
            always_status: Some(status),
            ..Behavior::default()
        }
    }

    /// Every answer comes after `d`.
    pub fn delay(d: Duration) -> Behavior {
        Behavior {
            delay: d,
            ..Behavior::default()
        }
    }

    /// The connections of the first `n` requests are reset instead of answered.
    pub fn reset_first(n: usize) -> Behavior {
        Behavior {
            reset_first: n,
            ..Behavior::default()
        }
    }

    /// The first `n` answers stop after the headers and a part of the body.
    pub fn close_mid_body_first(n: usize) -> Behavior {
        Behavior {
            close_mid_body_first: n,
            ..Behavior::default()
        }
    }

    /// Every body is sent in `chunks` pieces, `interval` apart.
    pub fn slow_body(chunks: usize, interval: Duration) -> Behavior {
        Behavior {
            slow_body_chunks: chunks,
            slow_body_interval: interval,
            ..Behavior::default()
        }
    }
}

pub struct Backend {
    pub addr: SocketAddrV4,
    pub name: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Listens on 127.0.0.1:`port` (0 picks one) and answers every request with 200.
    pub fn start(name: &str, port: u16) -> std::io::Result<Backend> {
        Backend::start_with(name, port, Behavior::ok())
    }

    /// Listens on 127.0.0.1:`port` (0 picks one) and answers as `behavior` says.
    pub fn start_with(name: &str, port: u16, behavior: Behavior) -> std::io::Result<Backend> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let addr = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => unreachable!("bound IPv4, got {other}"),
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Server {
            name: name.to_string(),
            behavior,
            seen: seen.clone(),
        });
        let st2 = stop.clone();
        listener.set_nonblocking(true)?;
        thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let server = server.clone();
                        thread::spawn(move || server.serve(conn));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Backend {
            addr,
            name: name.to_string(),
            seen,
            stop,
        })
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("lock").clone()
    }

    /// How many requests the backend has read so far.
    pub fn seen_count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Server {
    name: String,
    behavior: Behavior,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

/// What to do with request number `n`.
enum Fault {
    None,
    Status(u16),
    Reset,
    CloseMidBody,
}

impl Server {
    fn fault(&self, n: usize) -> Fault {
        let b = &self.behavior;
        if n < b.reset_first {
            Fault::Reset
        } else if n < b.close_mid_body_first {
            Fault::CloseMidBody
        } else if n < b.fail_first {
            Fault::Status(b.fail_status.unwrap_or(503))
        } else if let Some(s) = b.always_status {
            Fault::Status(s)
        } else {
            Fault::None
        }
    }

    fn serve(&self, conn: TcpStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = conn.set_nodelay(true);
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let mut out = conn;
        loop {
            let Some((method, path, headers, body)) = read_request(&mut reader) else {
                return;
            };
            let n = {
                let mut seen = self.seen.lock().expect("lock");
                seen.push(SeenRequest {
                    method: method.clone(),
                    path: path.clone(),
                    headers,
                    body,
                    at: Instant::now(),
                });
                seen.len() - 1
            };
            if !self.behavior.delay.is_zero() {
                thread::sleep(self.behavior.delay);
            }
            let (status, reason) = match self.fault(n) {
                Fault::Reset => {
                    reset(&out);
                    return;
                }
                Fault::CloseMidBody => {
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n";
                    let _ = out.write_all(head.as_bytes());
                    let _ = out.write_all(b"only part of it");
                    let _ = out.flush();
                    thread::sleep(Duration::from_millis(50));
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Fault::Status(s) => (s, "Injected Failure"),
                Fault::None => (200, "OK"),
            };
            let reply = format!("{} saw {method} {path}\n", self.name);
            let head = format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                reply.len()
            );
            let chunks = self.behavior.slow_body_chunks;
            if chunks <= 1 {
                // One write: head and body in one segment.
                if out.write_all(format!("{head}{reply}").as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            if out.write_all(head.as_bytes()).is_err() {
                return;
            }
            let bytes = reply.as_bytes();
            let size = bytes.len().div_ceil(chunks).max(1);
            for piece in bytes.chunks(size) {
                thread::sleep(self.behavior.slow_body_interval);
                if out.write_all(piece).and_then(|_| out.flush()).is_err() {
                    return;
                }
            }
        }
    }
}

type Request = (String, String, Vec<(String, String)>, Vec<u8>);

/// Reads one request (content-length or chunked body); `None` when the connection ended or
/// the request was not HTTP.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m.to_string(), p.to_string()),
        _ => return None,
    };
    let mut headers = Vec::new();
    let mut content_length = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                content_length = v.parse().unwrap_or(0);
            }
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
            headers.push((k, v));
        }
    }
    let body = if chunked {
        read_chunked(reader)?
    } else {
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body).ok()?;
        body
    };
    Some((method, path, headers, body))
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        if reader.read_line(&mut size_line).ok()? == 0 {
            return None;
        }
        let size_hex = size_line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t).ok()? == 0 || t.trim_end().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// Closes `conn` with a reset instead of a FIN.
fn reset(conn: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // The caller drops its handles; the reader's clone is dropped with it.
}
