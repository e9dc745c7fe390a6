//! How the kernel side knows the agent is alive: a heartbeat in `HMS_AGENT_ALIVE`.
//!
//! - A dedicated OS thread writes CLOCK_MONOTONIC (the clock of `bpf_ktime_get_ns`) every
//!   `AGENT_HEARTBEAT_NS` (250 ms). The hooks redirect only while the last beat is younger
//!   than `AGENT_ALIVE_WINDOW_NS` (3 s); past that, DNS goes to the resolver the caller asked
//!   and VIP connects are refused at once.
//! - It cannot flap under load: the thread does nothing but one map update per beat and never
//!   waits for the data path or the tokio runtime, so request load, a blocked executor or a
//!   slow registry do not delay it; twelve beats in a row would have to be missed, i.e. the
//!   process is stopped (SIGSTOP, a debugger) or gone.
//! - A final stop writes 0 ([`Heartbeat::stop_for_good`]): DNS fails open at once. A
//!   hand-over to a successor or a restart under socket activation does not: the successor
//!   beats on, and queued queries wait for the restarted agent within the window.
//!
//! Owns the heartbeat thread and the value in the map. Never decides when the agent stops.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{Array, MapData};
use hms_ebpf::AGENT_HEARTBEAT_NS;

/// CLOCK_MONOTONIC now, in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub(crate) struct Heartbeat {
    map: Arc<std::sync::Mutex<Array<MapData, u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Writes the first beat now (so the hooks serve from the first connection), then keeps
    /// beating from a thread of its own.
    pub(crate) fn start(map: Array<MapData, u64>) -> anyhow::Result<Heartbeat> {
        let map = Arc::new(std::sync::Mutex::new(map));
        beat(&map).context("writing the first heartbeat to HMS_AGENT_ALIVE")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_map, thread_stop) = (Arc::clone(&map), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("hms-heartbeat".into())
            .spawn(move || {
                let period = Duration::from_nanos(AGENT_HEARTBEAT_NS);
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    if thread_stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = beat(&thread_map) {
                        tracing::warn!(error = %e, "heartbeat write failed");
                    }
                }
            })
            .context("starting the heartbeat thread")?;
        Ok(Heartbeat {
            map,
            stop,
            thread: Some(thread),
        })
    }

    /// The agent stops and nobody takes over: the hooks stand aside at once (DNS to the
    /// caller's own resolver, VIP connects refused) instead of after the window.
    pub(crate) fn stop_for_good(&mut self) {
        self.halt();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = map.set(0, 0, 0) {
            tracing::warn!(error = %e, "clearing the heartbeat failed; the hooks stand aside in 3 s");
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Heartbeat {
    /// Stops beating but leaves the last beat: a successor (hand-over) or a quick restart
    /// keeps the redirect without a gap; otherwise it lapses after the window.
    fn drop(&mut self) {
        self.halt();
    }
}

fn beat(map: &std::sync::Mutex<Array<MapData, u64>>) -> anyhow::Result<()> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.set(0, monotonic_ns(), 0)?;
    Ok(())
}

/// This process's network namespace cookie (`SO_NETNS_COOKIE`, Linux 5.14), which the hooks
/// compare with each socket's. None where the kernel cannot tell: the hooks then do not
/// compare, as before.
pub(crate) fn own_netns_cookie() -> Option<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket/getsockopt/close on a socket we own; out-pointers are valid.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        libc::close(fd);
        (rc == 0 && cookie != 0).then_some(cookie)
    }
}
