//! A real nginx for tests (Debian's `nginx-light`): one server on a loopback port, its
//! config, pid, logs and temp files in a temp dir of its own, killed on drop. Runs in the
//! foreground as one process (`master_process off`), so no worker outlives the test.
//!
//! The access log records each request's connection number and its position on that
//! connection, so a test can prove nginx rotated its connections (`keepalive_requests`).

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ports;

/// How nginx speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, `listen PORT http2`).
    H2c,
}

pub struct Nginx {
    pub addr: SocketAddrV4,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx answering every request (any method, its body read and discarded)
    /// with `200 <name>`, closing each connection after `keepalive_requests` requests.
    pub fn start(name: &str, listen: Listen, keepalive_requests: u32) -> anyhow::Result<Nginx> {
        let dir = tempfile::Builder::new()
            .prefix("hms-test-nginx-")
            .tempdir()
            .context("temp dir")?;
        let addr = ports::free_addr();
        let d = dir.path().display();
        let http2 = match listen {
            Listen::Http1 => "",
            Listen::H2c => " http2",
        };
        let conf = format!(
            r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format rotation '$connection $connection_requests $request_method $status';
    access_log {d}/access.log rotation;
    keepalive_requests {keepalive_requests};
    server {{
        listen {addr}{http2};
        location / {{
            # Any method; nginx reads and discards a request body before answering.
            default_type text/plain;
            return 200 "{name}\n";
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = crate::tools::command("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nginx (apt-get install nginx-light, or `cargo xtask setup`)")?;
        let mut nginx = Nginx { addr, child, dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!("nginx exited ({status}): {}", nginx.error_log());
            }
            if started.elapsed() > crate::slack(Duration::from_secs(10)) {
                bail!("nginx did not listen on {addr}: {}", nginx.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// The logged requests once there are at least `n` (nginx logs a request after its
    /// response went out, so a client can finish before the last line is written), or
    /// what there is after a generous wait.
    pub fn wait_for_requests(&self, n: usize) -> Vec<(u64, u64, String, u16)> {
        let started = Instant::now();
        loop {
            let seen = self.requests();
            if seen.len() >= n || started.elapsed() > crate::slack(Duration::from_secs(10)) {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `(connection number, request number on it, method, status)` per logged request.
    pub fn requests(&self) -> Vec<(u64, u64, String, u16)> {
        std::fs::read_to_string(self.access_log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next()?.to_string(),
                    f.next()?.parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
