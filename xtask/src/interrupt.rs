//! Ctrl-C (SIGINT) and SIGTERM for xtask. The first signal only sets a flag that long-running
//! commands poll, so they can tear down in order (services, agent, pins, cgroup); a second
//! signal exits at once for a user who does not want to wait. Never does work in the handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // Second signal: the user insists. `_exit` is async-signal-safe; Drop guards do not run.
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handlers for SIGINT and SIGTERM.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic and calls `_exit`.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether the user asked us to stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Fails with a clear message if the user asked us to stop; call between steps.
pub fn check() -> anyhow::Result<()> {
    if requested() {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

/// Sleeps up to `total`, returning early (false) if the user asked us to stop.
pub fn sleep(total: Duration) -> bool {
    let deadline = Instant::now() + total;
    while Instant::now() < deadline {
        if requested() {
            return false;
        }
        std::thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    !requested()
}
