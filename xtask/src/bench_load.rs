//! The bench's load generator (`xtask bench-load`, hidden): one thread, epoll, N keep-alive
//! HTTP/1.1 connections, printing one JSON result line. The bench runs it as a separate,
//! unmodified client process (so it can start inside the agent's cgroup and in a network
//! namespace, pinned to its own core). It resolves the host name once through the system
//! resolver (getaddrinfo), as any program would.
//!
//! Fixed rate is open-loop: request `i` is *scheduled* at `start + i / rate` whatever happened
//! before; it goes out on the first idle connection, and its latency is measured from its
//! scheduled time, so a stall shows up in the percentiles of every request it delayed
//! instead of being hidden (no coordinated omission). Wake-ups come from a timerfd armed at
//! the next scheduled time with the thread's timer slack set to 1 ns. Maximum throughput is
//! closed-loop: each connection sends its next request as soon as the last answer is in.
//! Percentiles are exact (every latency is kept and sorted).
//!
//! `https://` URLs (the gateway rows) go the same way over TLS 1.3 (rustls, ALPN
//! `http/1.1`): each connection's handshake is done, blocking, before the timed part (and on a
//! reconnect, which is counted), so the rows measure requests on established keep-alive TLS
//! connections, as the plain rows do on TCP. `--ca` is the PEM the server's certificate must
//! chain to; `--connect-to` dials that address instead of resolving the URL's host, which
//! stays the SNI and `Host` (as curl's `--resolve`).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::bench_backend::find;

/// How long outstanding requests may take after the sending window before they count as
/// timeouts.
const DRAIN: u64 = 2_000_000_000;
const TIMER: u64 = u64::MAX;

pub struct LoadArgs {
    pub url: String,
    /// Requests per second; None = as fast as the connections go.
    pub rate: Option<u32>,
    pub duration: Duration,
    pub connections: usize,
    /// For https: the CA certificate (PEM) to trust.
    pub ca: Option<PathBuf>,
    /// Dial this address instead of resolving the URL's host.
    pub connect_to: Option<SocketAddr>,
}

struct Conn {
    stream: TcpStream,
    /// The TLS session on `stream` for https URLs.
    tls: Option<rustls::ClientConnection>,
    busy: bool,
    /// When the request in flight was scheduled (open-loop) or sent (closed-loop).
    since: u64,
    buf: Vec<u8>,
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An `http://` URL: host, port, path.
pub fn parse_url(url: &str) -> anyhow::Result<(String, u16, String)> {
    match parse_target(url)? {
        (false, host, port, path) => Ok((host, port, path)),
        (true, ..) => bail!("{url}: only http:// URLs here"),
    }
}

/// An `http://` or `https://` URL: whether TLS, host, port, path.
fn parse_target(url: &str) -> anyhow::Result<(bool, String, u16, String)> {
    let (tls, rest, default_port) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest, 443),
        None => (
            false,
            url.strip_prefix("http://")
                .with_context(|| format!("{url}: only http:// and https:// URLs"))?,
            80,
        ),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().with_context(|| format!("port in {url}"))?),
        None => (authority, default_port),
    };
    Ok((tls, host.to_owned(), port, path.to_owned()))
}

/// What a connection to the target needs: its address, and for https the client config and
/// the server name (SNI, certificate check).
struct Target {
    addr: SocketAddr,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
}

/// TLS 1.3 only (what the gateway serves), trusting only `ca`, offering HTTP/1.1 by ALPN.
fn tls_config(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading the CA certificate {}", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("a certificate in {}", ca.display()))?)
            .with_context(|| format!("trusting {}", ca.display()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .context("TLS 1.3 with the ring provider")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connected, non-blocking socket registered with `epoll`; for https with its handshake
/// done (blocking, so it is never part of a measured request).
fn connect(
    target: &Target,
    epoll: i32,
    index: usize,
) -> anyhow::Result<(TcpStream, Option<rustls::ClientConnection>)> {
    let addr = target.addr;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let tls = match &target.tls {
        Some((config, name)) => {
            let mut tls = rustls::ClientConnection::new(Arc::clone(config), name.clone())
                .context("starting a TLS session")?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            while tls.is_handshaking() {
                tls.complete_io(&mut stream)
                    .with_context(|| format!("TLS handshake with {addr}"))?;
            }
            stream.set_read_timeout(None)?;
            Some(tls)
        }
        None => None,
    };
    stream.set_nonblocking(true)?;
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: index as u64,
    };
    // SAFETY: valid epoll fd and socket fd; the event is copied by the kernel.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut ev) } != 0 {
        bail!("epoll_ctl: {}", std::io::Error::last_os_error());
    }
    Ok((stream, tls))
}

/// Sends `request` on an idle connection; false when the socket is broken (on an idle
/// socket a request of ~100 bytes, or its one TLS record, always fits the send buffer).
fn send(c: &mut Conn, request: &[u8]) -> bool {
    match &mut c.tls {
        None => matches!(c.stream.write(request), Ok(n) if n == request.len()),
        Some(tls) => {
            if tls.writer().write_all(request).is_err() {
                return false;
            }
            flush(tls, &mut c.stream)
        }
    }
}

/// Writes out what the TLS session has queued; false on any error (a broken socket).
fn flush(tls: &mut rustls::ClientConnection, stream: &mut TcpStream) -> bool {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads what arrived (decrypted for https) into `c.buf`; true when the connection broke
/// or the server closed it.
fn receive(c: &mut Conn, read_buf: &mut [u8]) -> bool {
    let Some(tls) = &mut c.tls else {
        loop {
            match c.stream.read(read_buf) {
                Ok(0) => return true,
                Ok(n) => c.buf.extend_from_slice(&read_buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    };
    loop {
        match tls.read_tls(&mut c.stream) {
            Ok(0) => return true,
            Ok(_) => {
                if tls.process_new_packets().is_err() {
                    return true;
                }
                loop {
                    match tls.reader().read(read_buf) {
                        // close_notify: the server ended the session.
                        Ok(0) => return true,
                        Ok(n) => c.buf.extend_from_slice(&read_buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => return true,
                    }
                }
                // A key update or alert the session owes the server.
                if !flush(tls, &mut c.stream) {
                    return true;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Complete response in `buf`? Returns (status, total length).
pub fn complete(buf: &[u8]) -> anyhow::Result<Option<(u16, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("response without a status line")?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .context("response without content-length (the bench's backend always sends one)")?;
    let total = head_end + 4 + length;
    Ok((buf.len() >= total).then_some((status, total)))
}

pub fn run(args: &LoadArgs) -> anyhow::Result<()> {
    let result = generate(args)?;
    println!("{result}");
    Ok(())
}

fn generate(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let (https, host, port, path) = parse_target(&args.url)?;
    let addr = match args.connect_to {
        Some(a) => a,
        None => (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"))?,
    };
    let tls = if https {
        let ca = args
            .ca
            .as_deref()
            .context("an https URL needs --ca (the PEM its certificate chains to)")?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .with_context(|| format!("`{host}` is not a TLS server name"))?;
        Some((tls_config(ca)?, name))
    } else {
        None
    };
    let target = Target { addr, tls };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: hms-bench\r\n\r\n")
        .into_bytes();

    // SAFETY: plain syscalls creating fds we own (closed when the process exits).
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let timer = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if epoll < 0 || timer < 0 {
        bail!("epoll/timerfd: {}", std::io::Error::last_os_error());
    }
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: TIMER,
    };
    // SAFETY: valid fds.
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, timer, &mut ev) };
    let arm = |at: u64| {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid timerfd; an absolute CLOCK_MONOTONIC time.
        unsafe {
            libc::timerfd_settime(timer, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
    };

    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (stream, tls) = connect(&target, epoll, i)?;
        conns.push(Conn {
            stream,
            tls,
            busy: false,
            since: 0,
            buf: Vec::with_capacity(4096),
        });
    }
    // What was negotiated, so the TLS rows can show they were measured the same way.
    let tls_info = conns.first().and_then(|c| c.tls.as_ref()).map(|t| {
        serde_json::json!({
            "version": t.protocol_version().map(|v| format!("{v:?}")),
            "cipher_suite": t.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())),
            "key_exchange": t.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
            "alpn": t.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
        })
    });
    let mut idle: VecDeque<usize> = (0..conns.len()).collect();
    let mut pending: VecDeque<u64> = VecDeque::new();
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 16);
    let (mut errors, mut non_2xx, mut reconnects) = (0u64, 0u64, 0u64);
    let duration = args.duration.as_nanos() as u64;
    let start = now_ns() + 1_000_000;
    let end = start + duration;
    let mut scheduled = 0u64;
    let next_at = |n: u64, rate: u32| start + (n as u128 * 1_000_000_000 / rate as u128) as u64;
    let mut last_done = start;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut read_buf = vec![0u8; 64 * 1024];

    loop {
        let now = now_ns();
        if let Some(rate) = args.rate {
            while next_at(scheduled, rate) <= now && next_at(scheduled, rate) < end {
                pending.push_back(next_at(scheduled, rate));
                scheduled += 1;
            }
        }
        // Send what is due on idle connections.
        while let Some(&i) = idle.front() {
            let since = match args.rate {
                Some(_) => match pending.pop_front() {
                    Some(t) => t,
                    None => break,
                },
                None if now >= start && now < end => now,
                None => break,
            };
            idle.pop_front();
            let c = &mut conns[i];
            if send(c, &request) {
                c.busy = true;
                c.since = since;
            } else {
                errors += 1;
                (c.stream, c.tls) = connect(&target, epoll, i)?;
                c.buf.clear();
                reconnects += 1;
                idle.push_back(i);
            }
        }
        let busy = conns.iter().filter(|c| c.busy).count();
        let sending_done = match args.rate {
            Some(rate) => next_at(scheduled, rate) >= end && pending.is_empty(),
            None => now >= end,
        };
        if sending_done && busy == 0 {
            break;
        }
        if now >= end + DRAIN {
            break;
        }
        let wake = match args.rate {
            Some(rate) if !sending_done => next_at(scheduled, rate).min(end),
            None if now < start => start,
            None if now < end => end,
            _ => end + DRAIN,
        };
        arm(wake.max(now + 1));
        // SAFETY: events buffer of the given length.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            bail!("epoll_wait: {err}");
        }
        for ev in &events[..n as usize] {
            let key = ev.u64;
            if key == TIMER {
                let mut expirations = [0u8; 8];
                // SAFETY: reading 8 bytes from the timerfd into a buffer of 8.
                unsafe { libc::read(timer, expirations.as_mut_ptr().cast(), 8) };
                continue;
            }
            let i = key as usize;
            let c = &mut conns[i];
            let broken = receive(c, &mut read_buf);
            if c.busy
                && let Some((status, total)) = complete(&c.buf)?
            {
                let done = now_ns();
                latencies.push(done.saturating_sub(c.since));
                last_done = last_done.max(done);
                if !(200..300).contains(&status) {
                    non_2xx += 1;
                }
                c.buf.drain(..total);
                c.busy = false;
                if !broken {
                    idle.push_back(i);
                }
            }
            if broken {
                if c.busy {
                    errors += 1;
                }
                c.busy = false;
                c.buf.clear();
                (c.stream, c.tls) = connect(&target, epoll, i)?;
                reconnects += 1;
                idle.push_back(i);
            }
        }
    }
    let timeouts = conns.iter().filter(|c| c.busy).count() as u64;
    let unsent = pending.len() as u64;
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx] as f64 / 1000.0
    };
    let elapsed = (last_done.max(end) - start) as f64 / 1e9;
    let completed = latencies.len() as u64;
    Ok(serde_json::json!({
        "addr": addr.to_string(),
        "completed": completed,
        "errors": errors,
        "non_2xx": non_2xx,
        "timeouts": timeouts,
        "unsent": unsent,
        "reconnects": reconnects,
        "elapsed_s": elapsed,
        "rps": completed as f64 / elapsed,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": pct(1.0),
        "tls": tls_info,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_url("http://bench-svc.svc/bench/x").unwrap(),
            ("bench-svc.svc".into(), 80, "/bench/x".into())
        );
        assert_eq!(
            parse_url("http://127.0.0.1:7000").unwrap(),
            ("127.0.0.1".into(), 7000, "/".into())
        );
        assert!(parse_url("https://x").is_err());
        assert_eq!(
            parse_target("https://bench-gw.test:8443/bench/x").unwrap(),
            (true, "bench-gw.test".into(), 8443, "/bench/x".into())
        );
        assert_eq!(parse_target("https://x").unwrap().2, 443);
        assert!(parse_target("ftp://x").is_err());
    }

    #[test]
    fn finds_complete_responses() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(complete(r).unwrap(), Some((200, r.len())));
        assert_eq!(complete(&r[..r.len() - 1]).unwrap(), None);
        assert!(complete(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
