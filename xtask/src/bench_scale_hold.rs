//! `xtask bench-hold` (hidden): the scale bench's connection holder, an unmodified client
//! process like `bench-load`. It resolves the URL's host once through the system resolver,
//! opens N keep-alive HTTP/1.1 connections and sends one GET on each (so each is a real,
//! proxied connection with its upstream side), prints `{"open": N, "refused": R}`, then obeys lines on
//! stdin until it closes:
//!
//! - `check`: one GET on every connection; prints `{"answered": K, "failed": F}`;
//! - `active RATE SECONDS`: GETs round-robin over all connections, RATE per second, for
//!   SECONDS; prints the same.
//!
//! Owns nothing but its sockets; never measures latency (`bench-load` does, beside it).

use std::io::{BufRead, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench_load::{complete, parse_url};

pub fn run(url: &str, connections: usize, uid: Option<u32>) -> anyhow::Result<()> {
    raise_nofile();
    if let Some(uid) = uid {
        // Its own user: the agent lets one user hold half its outbound cap, and the
        // bench's 1000 rps client (root) must not be refused for the holder's connections.
        // SAFETY: setresuid(2) on our own process.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            bail!("setresuid({uid}): {}", std::io::Error::last_os_error());
        }
    }
    let (host, port, path) = parse_url(url)?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes();
    let mut conns = Vec::with_capacity(connections);
    let mut buf = Vec::new();
    // A connection the agent refuses or sheds (its outbound cap) is counted, not fatal:
    // where the cap bites is part of the curve.
    let mut refused = 0usize;
    for _ in 0..connections {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            refused += 1;
            continue;
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        match get(&mut s, &request, &mut buf) {
            Ok(()) => conns.push(s),
            Err(_) => refused += 1,
        }
    }
    if conns.is_empty() {
        bail!("none of {connections} connections to {addr} answered");
    }
    println!(
        "{}",
        serde_json::json!({"open": conns.len(), "refused": refused})
    );
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (mut answered, mut failed) = (0u64, 0u64);
        let mut one = |s: &mut TcpStream| match get(s, &request, &mut buf) {
            Ok(()) => answered += 1,
            Err(_) => failed += 1,
        };
        match words.as_slice() {
            ["check"] => conns.iter_mut().for_each(&mut one),
            ["active", rate, secs] => {
                let rate: f64 = rate.parse().context("active RATE")?;
                let secs: f64 = secs.parse().context("active SECONDS")?;
                let start = Instant::now();
                let total = (rate * secs) as u64;
                for i in 0..total {
                    // Paced sends (this is load, not a measurement).
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let n = conns.len();
                    one(&mut conns[i as usize % n]);
                }
            }
            _ => bail!("bench-hold: unknown command `{line}`"),
        }
        println!(
            "{}",
            serde_json::json!({"answered": answered, "failed": failed})
        );
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// One request and its whole answer (status 2xx) on a keep-alive connection.
fn get(s: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<()> {
    s.write_all(request)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((status, _)) = complete(buf)? {
            if !(200..300).contains(&status) {
                bail!("status {status}");
            }
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Soft RLIMIT_NOFILE up to the hard limit: 8,000 connections need more than the usual 1024.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
