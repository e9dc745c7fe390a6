//! Clients for HTTP-layer tests that run INSIDE a test cgroup (only redirected connections
//! reach the agent's HTTP layer): `curl` with its answer parsed, a raw-bytes client (python3)
//! for malformed and slow requests, and [`ChildCgroup`], a service's own cgroup below the
//! test cgroup so a process can call as that service. Every call has a timeout; nothing here
//! resolves a name outside `.svc`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// What `curl -i` got, parsed.
#[derive(Debug, Clone)]
pub struct Reply {
    /// curl's exit code (0 = a full answer arrived; 18 = partial body; 28 = timed out).
    pub exit: Option<i32>,
    /// The final response's status (0 if none arrived).
    pub status: u16,
    /// The final response's headers, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "curl exit {:?}, status {}, after {:?}\nheaders: {:?}\nbody: {}\nstderr: {}",
            self.exit, self.status, self.elapsed, self.headers, self.body, self.stderr
        )
    }
}

/// Runs `curl -sS -i --max-time MAX ARGS` as `cmd` (a `Command` for "curl" placed in a
/// cgroup, e.g. `cg.command("curl")`) and parses the last response.
pub fn curl(mut cmd: Command, max_time: Duration, args: &[&str]) -> Reply {
    let started = Instant::now();
    let out = cmd
        .args(["-sS", "-i", "--max-time"])
        .arg(format!("{:.1}", max_time.as_secs_f64()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl (run `cargo xtask setup`)");
    let elapsed = started.elapsed();
    let mut reply = parse_response(&out.stdout);
    reply.exit = out.status.code();
    reply.stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    reply.elapsed = elapsed;
    reply
}

/// Parses `curl -i` output: the last head (after any 1xx) and the body.
fn parse_response(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let mut rest = text.as_str();
    let mut status = 0u16;
    let mut headers = Vec::new();
    let mut body = String::new();
    while rest.starts_with("HTTP/") {
        let (head, after) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        let mut lines = head.split("\r\n");
        status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        body = after.to_string();
        rest = after;
        if !(100..200).contains(&status) {
            break;
        }
    }
    Reply {
        exit: None,
        status,
        headers,
        body,
        stderr: String::new(),
        elapsed: Duration::ZERO,
    }
}

/// How a raw exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEnd {
    /// The agent closed the connection (FIN).
    Closed,
    /// The agent reset it.
    Reset,
    /// Nothing more within the read timeout; the connection was still open.
    TimedOut,
    /// Could not connect.
    ConnectFailed(String),
}

#[derive(Debug, Clone)]
pub struct RawReply {
    pub received: Vec<u8>,
    pub end: RawEnd,
    /// From connect to the end.
    pub elapsed: Duration,
    pub stderr: String,
}

impl RawReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }

    /// The status of the first response in `received`, if any.
    pub fn status(&self) -> Option<u16> {
        let t = self.text();
        let line = t.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
}

/// The raw client: connects to HOST:PORT (resolving it with getaddrinfo, as unmodified apps
/// do), sends stdin, keeps reading until the peer closes or `read_timeout` passes without
/// data, prints what came back and reports how it ended on stderr.
const RAW_CLIENT: &str = r#"
import socket, sys, time
host, port, read_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
payload = sys.stdin.buffer.read()
t0 = time.monotonic()
try:
    s = socket.create_connection((host, port), timeout=5)
except Exception as e:
    sys.stderr.write("END connect-failed %d %s\n" % (0, e)); sys.exit(0)
s.settimeout(read_timeout)
end = "closed"
try:
    s.sendall(payload)
except (ConnectionResetError, BrokenPipeError):
    end = "reset"
got = b""
while True:
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        end = "timeout"; break
    except ConnectionResetError:
        end = "reset"; break
    if not chunk:
        break
    got += chunk
sys.stdout.buffer.write(got)
sys.stderr.write("END %s %d\n" % (end, int((time.monotonic() - t0) * 1000)))
"#;

/// Sends `payload` to `host:port` from a process started by `cmd` (a `Command` for
/// "python3" placed in a cgroup) and reads the answer (see [`RAW_CLIENT`]).
pub fn raw_exchange(
    mut cmd: Command,
    host: &str,
    port: u16,
    payload: &[u8],
    read_timeout: Duration,
) -> anyhow::Result<RawReply> {
    let mut child = cmd
        .args(["-c", RAW_CLIENT, host, &port.to_string()])
        .arg(format!("{:.3}", read_timeout.as_secs_f64()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(payload)
        .context("writing the payload")?;
    let out = wait_output(child, read_timeout + Duration::from_secs(10))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("END "))
        .with_context(|| format!("raw client did not finish: {stderr}"))?
        .to_string();
    let mut words = last.split_whitespace().skip(1);
    let kind = words.next().unwrap_or("");
    let ms: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let end = match kind {
        "closed" => RawEnd::Closed,
        "reset" => RawEnd::Reset,
        "timeout" => RawEnd::TimedOut,
        _ => RawEnd::ConnectFailed(last.clone()),
    };
    Ok(RawReply {
        received: out.stdout,
        end,
        elapsed: Duration::from_millis(ms),
        stderr,
    })
}

/// Waits for `child` at most `limit`, killing it after that.
pub fn wait_output(mut child: std::process::Child, limit: Duration) -> anyhow::Result<Output> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "process did not finish in {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child directory of a test cgroup: where one service's instances (and its callers) run.
/// Drop it before its parent: it kills what runs in it and removes the directory.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    pub fn new(parent: &Path, name: &str) -> anyhow::Result<ChildCgroup> {
        let path = parent.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ChildCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listed program `name`, started inside this cgroup.
    pub fn command(&self, name: &str) -> Command {
        crate::cgroup::TestCgroup::command_in(&self.path, name)
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("child cgroup {} not removed: {e}", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The last `lines` lines of `log` (agent logs in assertion messages).
/// Colour codes are removed.
pub fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    strip_ansi(&all[all.len().saturating_sub(lines)..].join("\n"))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
