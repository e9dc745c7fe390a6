//! A test DNS resolver on a loopback address, port 53: answers every A query with a fixed
//! address and counts the queries it got. It stands in for "the resolver the caller asked",
//! so tests prove forwarding goes to the caller's choice without any traffic leaving the
//! machine.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

pub struct TestResolver {
    pub addr: SocketAddrV4,
    pub answer: Ipv4Addr,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TestResolver {
    /// Binds `ip:53` (ip in 127/8) and answers A queries with `answer`.
    pub fn start(ip: Ipv4Addr, answer: Ipv4Addr) -> std::io::Result<TestResolver> {
        Self::serve(UdpSocket::bind((ip, 53))?, ip, answer)
    }

    /// Like [`TestResolver::start`], inside network namespace `netns` (`/run/netns/NAME`),
    /// as a container's own resolver would be: the socket is bound from a thread that joined
    /// the namespace, and keeps it.
    pub fn start_in_netns(
        netns: &str,
        ip: Ipv4Addr,
        answer: Ipv4Addr,
    ) -> std::io::Result<TestResolver> {
        let path = format!("/run/netns/{netns}");
        let sock = thread::spawn(move || -> std::io::Result<UdpSocket> {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on a valid namespace fd; it affects only this short-lived thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            UdpSocket::bind((ip, 53))
        })
        .join()
        .map_err(|_| std::io::Error::other("resolver thread panicked"))??;
        Self::serve(sock, ip, answer)
    }

    fn serve(sock: UdpSocket, ip: Ipv4Addr, answer: Ipv4Addr) -> std::io::Result<TestResolver> {
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q2, s2) = (queries.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                q2.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = answer_a(&buf[..n], answer) {
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        Ok(TestResolver {
            addr: SocketAddrV4::new(ip, 53),
            answer,
            queries,
            stop,
        })
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Builds a reply by hand on purpose: the test resolver must not share the agent's DNS code.
fn answer_a(q: &[u8], ip: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // Walk the question name.
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        i += usize::from(q[i]) + 1;
    }
    let qend = i + 5; // zero byte + type + class
    if qend > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let mut r = Vec::with_capacity(qend + 16);
    r.extend_from_slice(&q[..2]); // id
    r.extend_from_slice(&[0x81, 0x80]); // response, RD, RA
    r.extend_from_slice(&[0, 1]); // qdcount
    r.extend_from_slice(if qtype == 1 { &[0, 1] } else { &[0, 0] }); // ancount
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..qend]);
    if qtype == 1 {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}
