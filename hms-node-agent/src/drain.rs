//! Graceful shutdown as one small mechanism:
//! - every listener loop waits on [`Drain::signaled`] next to `accept()` and stops accepting
//!   when it fires;
//! - every connection or query in flight holds a [`DrainGuard`];
//! - [`DrainTrigger::drain`] fires the signal, then waits until no guard is left or the
//!   deadline passes, and says how many were cut off.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

struct Shared {
    in_flight: AtomicUsize,
    idle: Notify,
}

#[derive(Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    shared: Arc<Shared>,
}

pub struct DrainGuard {
    shared: Arc<Shared>,
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    (
        DrainTrigger {
            signal: tx,
            shared: shared.clone(),
        },
        Drain { signal: rx, shared },
    )
}

impl Drain {
    /// Resolves once shutdown has begun.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger is gone, which also means shutdown.
        let _ = rx.wait_for(|v| *v).await;
    }

    /// True once shutdown has begun.
    pub fn is_signaled(&self) -> bool {
        *self.signal.borrow()
    }

    pub fn guard(&self) -> DrainGuard {
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        DrainGuard {
            shared: self.shared.clone(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.shared.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

impl DrainTrigger {
    /// Signals shutdown and waits up to `deadline` for in-flight work; returns how many were
    /// still running when it gave up.
    pub async fn drain(self, deadline: Duration) -> usize {
        let _ = self.signal.send(true);
        let wait = async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_guards_and_reports_leftovers() {
        let (trigger, drain) = channel();
        let g = drain.guard();
        let d2 = drain.clone();
        let t = tokio::spawn(async move {
            d2.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(g);
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, 0);
        t.await.unwrap();

        let (trigger, drain) = channel();
        let _stuck = drain.guard();
        assert_eq!(trigger.drain(Duration::from_millis(50)).await, 1);
    }
}
