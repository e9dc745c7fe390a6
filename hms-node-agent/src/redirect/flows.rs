//! Flow records from the kernel: one when a redirected TCP connection is established and one
//! when it closes, as `hms_sock_ops` writes them to the `HMS_FLOW_EVENTS` ring buffer, decoded
//! into std types for the tap hub.
//!
//! Owns the single consumer of that ring buffer and the decoding of [`FlowEvent`] records.
//! Must never hold up the kernel (the ring buffer is lossy: a full buffer drops new records and
//! counts them in `HMS_RINGBUF_DROPS`, see [`Redirector::ringbuf_drops`](super::Redirector)),
//! and never panic on a record it does not understand: a short, oversized or unknown record is
//! counted in [`FlowReader::malformed`] and skipped.
//!
//! What is tracked: the client side only (the app's socket inside the hooked cgroup), for every
//! TCP connection the hooks redirected, to the outbound proxy or (DNS over TCP,
//! [`FlowRecord::dns`]) to the DNS responder.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use hms_ebpf::{
    FLOW_CLOSE, FLOW_EGRESS_REFUSED, FLOW_FLAG_DNS, FLOW_FLAG_V6, FLOW_OPEN, FlowEvent, tcp_state,
};
use tokio::io::unix::AsyncFd;

/// One flow record. Field names follow the client's view: it connected from `client` to
/// `original_dst`, the kernel sent it to `listener` instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub kind: FlowKind,
    /// The client socket's cookie; an open and its close carry the same one.
    pub cookie: u64,
    /// For an IPv6 connection (`FLOW_FLAG_V6`) the kernel record carries only the low 32
    /// bits of the addresses, which is exact for `::1` (what a connection redirected to the
    /// `[::1]` listeners comes from) and `::a.b.c.d` otherwise.
    pub client: SocketAddr,
    /// Where the connection really went: the outbound proxy, or the DNS responder.
    pub listener: SocketAddr,
    /// Where the client asked to go (a VIP and port, or a resolver at port 53). For an IPv6
    /// VIP, its IPv4 VIP (the low 32 bits), which names the same service.
    pub original_dst: SocketAddrV4,
    /// The client dialled an IPv6 address.
    pub ipv6: bool,
    /// DNS over TCP redirected to the DNS responder, not a service connection.
    pub dns: bool,
    /// The caller at connect time: thread-group id (the pid users see), `comm`, cgroup v2 id.
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// Wall-clock time of the client's connect() (converted from CLOCK_MONOTONIC when the
    /// record was read, so it follows later wall-clock steps of the host).
    pub connected_at: SystemTime,
    /// connect() to established (the handshake, including SYN retransmissions).
    pub connect_latency: Duration,
    /// Smoothed RTT when the record was made.
    pub srtt: Duration,
    /// Segments retransmitted so far (SYN retransmissions included).
    pub total_retrans: u32,
    /// The kernel's `bytes_acked` when the record was made: sequence space the peer
    /// acknowledged, i.e. the payload the client sent **plus 1 for its SYN** and plus 1 for
    /// its FIN once acknowledged. 1 in an open record.
    pub bytes_acked: u64,
    /// The kernel's `bytes_received`: payload received in order **plus 1 for the peer's FIN**
    /// if it reached this socket (see [`FlowKind::Close`]). 0 in an open record.
    pub bytes_received: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// The client's connect() completed (the SYN-ACK arrived).
    Open,
    /// The client socket reached `TCP_CLOSE`.
    Close {
        /// Established to closed.
        duration: Duration,
        /// Who ended it, read from the state the socket closed from.
        ended_by: EndedBy,
        /// That state (`hms_ebpf::tcp_state`), for whoever needs more than `ended_by`.
        state_before_close: u8,
    },
    /// connect() refused (EPERM) as undeclared egress: `original_dst` is where it wanted to
    /// go (the low 32 bits of an IPv6 address when `ipv6`); no connection exists.
    EgressRefused,
}

/// How a connection ended, from the client socket's last state before `TCP_CLOSE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    /// The client sent its FIN first (closed from FIN_WAIT1, FIN_WAIT2 or CLOSING). When the
    /// app called close() (not shutdown()), the kernel hands the socket to a time-wait socket
    /// as soon as its FIN is acknowledged, so the peer's FIN is not in `bytes_received`.
    Client,
    /// The peer sent its FIN first (closed from LAST_ACK); the peer's FIN is counted in
    /// `bytes_received`, the client's in `bytes_acked`.
    Peer,
    /// Reset or timed out before an orderly close (any other state).
    Abort,
}

impl EndedBy {
    fn from_state(state: u8) -> EndedBy {
        match state {
            tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 | tcp_state::CLOSING => EndedBy::Client,
            tcp_state::LAST_ACK => EndedBy::Peer,
            _ => EndedBy::Abort,
        }
    }
}

/// Why a ring buffer record was not turned into a [`FlowRecord`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("flow record of {0} bytes, expected {expected}", expected = size_of::<FlowEvent>())]
    Size(usize),
    #[error("flow record of unknown kind {0}")]
    Kind(u8),
}

/// Decodes one ring buffer record. `clock` maps the kernel's CLOCK_MONOTONIC to wall time.
pub fn decode(bytes: &[u8], clock: &MonotonicClock) -> Result<FlowRecord, DecodeError> {
    let widened;
    let bytes = if bytes.len() == size_of::<FlowEvent>() {
        bytes
    } else {
        widened = widen(bytes).ok_or(DecodeError::Size(bytes.len()))?;
        &widened[..]
    };
    // SAFETY: the length matches, FlowEvent is plain #[repr(C)] integers valid for any bit
    // pattern, and read_unaligned does not need the slice to be aligned.
    let ev: FlowEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let kind = match ev.kind {
        FLOW_OPEN => FlowKind::Open,
        FLOW_CLOSE => FlowKind::Close {
            duration: ns_between(ev.established_ns, ev.closed_ns),
            ended_by: EndedBy::from_state(ev.state_before_close),
            state_before_close: ev.state_before_close,
        },
        FLOW_EGRESS_REFUSED => FlowKind::EgressRefused,
        other => return Err(DecodeError::Kind(other)),
    };
    let comm_len = ev.orig.comm.iter().position(|b| *b == 0).unwrap_or(16);
    let ipv6 = ev.flags & FLOW_FLAG_V6 != 0;
    Ok(FlowRecord {
        kind,
        cookie: ev.cookie,
        client: flow_addr(ipv6, ev.flow.client_ip, ev.flow.client_port),
        listener: flow_addr(ipv6, ev.flow.listener_ip, ev.flow.listener_port),
        original_dst: SocketAddrV4::new(Ipv4Addr::from(ev.orig.ip), ev.orig.port),
        ipv6,
        dns: ev.flags & FLOW_FLAG_DNS != 0,
        pid: ev.orig.pid,
        comm: String::from_utf8_lossy(&ev.orig.comm[..comm_len]).into_owned(),
        cgroup_id: ev.orig.cgroup_id,
        connected_at: clock.wall_time(ev.orig.connect_ns),
        connect_latency: ns_between(ev.orig.connect_ns, ev.established_ns),
        srtt: Duration::from_micros(u64::from(ev.srtt_us)),
        total_retrans: ev.total_retrans,
        bytes_acked: ev.bytes_acked,
        bytes_received: ev.bytes_received,
    })
}

/// A flow address from its record: IPv4, or the low 32 bits of an IPv6 one.
fn flow_addr(ipv6: bool, ip: u32, port: u16) -> SocketAddr {
    if ipv6 {
        SocketAddr::from((Ipv6Addr::from(u128::from(ip)), port))
    } else {
        SocketAddr::from((Ipv4Addr::from(ip), port))
    }
}

/// `to - from`, or zero if the clock readings are out of order (they never should be).
fn ns_between(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

/// CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads) to wall time, by one paired reading.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    wall: SystemTime,
    monotonic_ns: u64,
}

impl MonotonicClock {
    pub fn now() -> MonotonicClock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        MonotonicClock {
            wall: SystemTime::now(),
            monotonic_ns: (ts.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(ts.tv_nsec as u64),
        }
    }

    pub fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        if monotonic_ns <= self.monotonic_ns {
            self.wall - Duration::from_nanos(self.monotonic_ns - monotonic_ns)
        } else {
            self.wall + Duration::from_nanos(monotonic_ns - self.monotonic_ns)
        }
    }
}

/// A record of an older layout (an older pin set's ring buffer, read while it is retired) in
/// today's: only `OrigDst` ever grew (fields appended: `uid` + padding), so the bytes before
/// its end stay where they are, the fields after it move up, and the new ones read 0.
fn widen(bytes: &[u8]) -> Option<[u8; size_of::<FlowEvent>()]> {
    const ORIG: usize = std::mem::offset_of!(FlowEvent, orig);
    const AFTER_ORIG: usize = std::mem::offset_of!(FlowEvent, bytes_acked);
    const TAIL: usize = size_of::<FlowEvent>() - AFTER_ORIG;
    // The oldest OrigDst (before `uid`).
    const ORIG_MIN: usize = 48;
    let orig_len = bytes.len().checked_sub(ORIG + TAIL)?;
    if !(ORIG_MIN..AFTER_ORIG - ORIG).contains(&orig_len) {
        return None;
    }
    let mut out = [0u8; size_of::<FlowEvent>()];
    out[..ORIG + orig_len].copy_from_slice(&bytes[..ORIG + orig_len]);
    out[AFTER_ORIG..].copy_from_slice(&bytes[ORIG + orig_len..]);
    Some(out)
}

/// The one consumer of `HMS_FLOW_EVENTS` (a ring buffer has a single consumer position, so
/// [`Redirector::flow_reader`](super::Redirector::flow_reader) hands it out once).
///
/// Records written while no reader ran (agent restart) are still in the buffer, up to its
/// size, and come out first.
pub struct FlowReader {
    ring: Ring,
    malformed: u64,
}

enum Ring {
    /// Not yet registered with tokio: `AsyncFd` needs a runtime, which `next` has.
    Plain(RingBuf<MapData>),
    Async(AsyncFd<RingBuf<MapData>>),
    /// Registration failed; the error was logged.
    Broken,
}

impl FlowReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> FlowReader {
        FlowReader {
            ring: Ring::Plain(ring),
            malformed: 0,
        }
    }

    /// The next record, waiting for one. `None` only if the ring buffer cannot be polled
    /// (logged); a caller loops `while let Some(record) = reader.next().await`.
    pub async fn next(&mut self) -> Option<FlowRecord> {
        loop {
            if let Some(record) = self.try_next() {
                return Some(record);
            }
            let ring = match std::mem::replace(&mut self.ring, Ring::Broken) {
                // SAFETY: the RingBuf owns its map fd, which stays open and the same for as long
                // as the RingBuf (now owned by the AsyncFd) lives.
                Ring::Plain(ring) => match unsafe {
                    AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
                } {
                    Ok(ring) => ring,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot poll the flow record ring buffer");
                        return None;
                    }
                },
                Ring::Async(ring) => ring,
                Ring::Broken => return None,
            };
            self.ring = Ring::Async(ring);
            let Ring::Async(ring) = &mut self.ring else {
                unreachable!("just set")
            };
            let decoded = {
                let mut guard = match ring.readable_mut().await {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::warn!(error = %e, "polling the flow record ring buffer failed");
                        self.ring = Ring::Broken;
                        return None;
                    }
                };
                // Read before clearing readiness: a record submitted after this check bumps
                // the readiness again, so the next wait cannot miss it.
                let next = guard
                    .get_inner_mut()
                    .next()
                    .map(|item| decode(&item, &MonotonicClock::now()));
                match next {
                    Some(decoded) => decoded,
                    None => {
                        guard.clear_ready();
                        continue;
                    }
                }
            };
            if let Some(record) = self.count_malformed(decoded) {
                return Some(record);
            }
        }
    }

    /// The next record if one is waiting, without blocking (no runtime needed).
    pub fn try_next(&mut self) -> Option<FlowRecord> {
        loop {
            let ring = match &mut self.ring {
                Ring::Plain(ring) => ring,
                Ring::Async(ring) => ring.get_mut(),
                Ring::Broken => return None,
            };
            let decoded = decode(&ring.next()?, &MonotonicClock::now());
            if let Some(record) = self.count_malformed(decoded) {
                return Some(record);
            }
        }
    }

    /// Records skipped because they could not be decoded (an agent and kernel programs of
    /// different versions; should stay 0).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    fn count_malformed(&mut self, decoded: Result<FlowRecord, DecodeError>) -> Option<FlowRecord> {
        match decoded {
            Ok(record) => Some(record),
            Err(e) => {
                self.malformed += 1;
                tracing::debug!(error = %e, "skipping a flow record");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hms_ebpf::{FlowKey, OrigDst};

    use super::*;

    fn event(kind: u8) -> FlowEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        FlowEvent {
            kind,
            flags: 0,
            state_before_close: if kind == FLOW_CLOSE {
                tcp_state::FIN_WAIT2
            } else {
                0
            },
            _pad: [0; 5],
            cookie: 42,
            established_ns: 2_000_000,
            closed_ns: if kind == FLOW_CLOSE { 9_000_000 } else { 0 },
            flow: FlowKey {
                client_ip: u32::from(Ipv4Addr::LOCALHOST),
                listener_ip: u32::from(Ipv4Addr::LOCALHOST),
                client_port: 40000,
                listener_port: 15001,
                _pad: 0,
            },
            orig: OrigDst {
                ip: u32::from(Ipv4Addr::new(127, 77, 0, 5)),
                port: 80,
                protocol: hms_ebpf::IPPROTO_TCP,
                pid: 1234,
                flags: 0,
                cgroup_id: 99,
                comm,
                connect_ns: 1_500_000,
                uid: 1000,
                _pad: 0,
            },
            bytes_acked: 102,
            bytes_received: 7,
            srtt_us: 30,
            total_retrans: 0,
        }
    }

    fn bytes(ev: &FlowEvent) -> Vec<u8> {
        // SAFETY: FlowEvent is plain #[repr(C)] data with explicit padding fields.
        unsafe {
            std::slice::from_raw_parts(
                (ev as *const FlowEvent).cast::<u8>(),
                size_of::<FlowEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn a_record_of_the_layout_before_the_uid_decodes_with_uid_0() {
        let clock = MonotonicClock::now();
        let now = bytes(&event(FLOW_CLOSE));
        let expected = decode(&now, &clock).expect("decodes");
        // 120 bytes: OrigDst was 48 (no uid + padding), the fields after it 8 bytes earlier.
        let orig = std::mem::offset_of!(FlowEvent, orig);
        let after = std::mem::offset_of!(FlowEvent, bytes_acked);
        let mut old = now[..orig + 48].to_vec();
        old.extend_from_slice(&now[after..]);
        assert_eq!(old.len(), 120);
        let got = decode(&old, &clock).expect("an older record decodes");
        assert_eq!(got.kind, expected.kind);
        assert_eq!(got.original_dst, expected.original_dst);
        assert_eq!(got.bytes_acked, expected.bytes_acked);
        assert_eq!(got.total_retrans, expected.total_retrans);
        assert_eq!(got.pid, expected.pid);
        assert!(matches!(
            decode(&old[..100], &clock),
            Err(DecodeError::Size(100))
        ));
    }

    #[test]
    fn a_close_record_decodes_into_std_types_and_derived_durations() {
        let clock = MonotonicClock::now();
        let r = decode(&bytes(&event(FLOW_CLOSE)), &clock).expect("decodes");
        assert_eq!(
            r.kind,
            FlowKind::Close {
                duration: Duration::from_millis(7),
                ended_by: EndedBy::Client,
                state_before_close: tcp_state::FIN_WAIT2,
            }
        );
        assert_eq!(r.original_dst, "127.77.0.5:80".parse().unwrap());
        assert_eq!(r.client, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(r.listener, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(r.comm, "curl");
        assert_eq!((r.pid, r.cgroup_id, r.cookie), (1234, 99, 42));
        assert_eq!(r.connect_latency, Duration::from_micros(500));
        assert_eq!(r.srtt, Duration::from_micros(30));
        assert!(!r.dns);
    }

    #[test]
    fn short_long_and_unknown_records_are_errors_not_panics() {
        let clock = MonotonicClock::now();
        let good = bytes(&event(FLOW_OPEN));
        assert!(decode(&good, &clock).is_ok());
        assert_eq!(decode(&good[..10], &clock), Err(DecodeError::Size(10)));
        assert_eq!(decode(&[], &clock), Err(DecodeError::Size(0)));
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long, &clock).is_err());
        assert_eq!(decode(&bytes(&event(9)), &clock), Err(DecodeError::Kind(9)));
        // Out-of-order clocks and a comm without NUL are still fine.
        let mut odd = event(FLOW_CLOSE);
        odd.closed_ns = 1;
        odd.orig.comm = [b'x'; 16];
        let r = decode(&bytes(&odd), &clock).expect("decodes");
        assert_eq!(r.comm.len(), 16);
        assert!(matches!(r.kind, FlowKind::Close { duration, .. } if duration.is_zero()));
    }

    #[test]
    fn monotonic_readings_map_to_wall_time_around_now() {
        let clock = MonotonicClock::now();
        let earlier = clock.wall_time(clock.monotonic_ns - 1_000_000_000);
        assert_eq!(
            clock.wall.duration_since(earlier).unwrap(),
            Duration::from_secs(1)
        );
    }
}
