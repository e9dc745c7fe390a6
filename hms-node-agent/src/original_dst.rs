//! Where a redirected caller wanted to go. The proxy and the DNS responder ask through this
//! trait so they can be exercised without a kernel; the agent plugs in the eBPF-backed
//! `Redirector`.

use std::net::SocketAddrV4;

pub use hms_ebpf::OrigDst;

pub trait OriginalDestinations: Send + Sync {
    /// The original destination of an accepted, redirected TCP connection (consumes it).
    fn tcp(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<OrigDst>;
    /// The resolver a redirected UDP DNS query was sent to.
    fn udp(&self, client: SocketAddrV4, responder: SocketAddrV4) -> Option<OrigDst>;
}

impl OriginalDestinations for crate::redirect::Redirector {
    fn tcp(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<OrigDst> {
        self.take_tcp_orig_dst(client, listener)
    }

    fn udp(&self, client: SocketAddrV4, responder: SocketAddrV4) -> Option<OrigDst> {
        self.udp_orig_dst(client, responder)
    }
}

/// The caller's `comm` as text.
pub fn comm(orig: &OrigDst) -> String {
    let end = orig
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(orig.comm.len());
    String::from_utf8_lossy(&orig.comm[..end]).into_owned()
}

/// The original destination as a socket address.
pub fn addr(orig: &OrigDst) -> SocketAddrV4 {
    SocketAddrV4::new(orig.ip.into(), orig.port)
}
