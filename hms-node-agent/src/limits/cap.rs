//! One listener's connection cap with shedding of the oldest idle connection. Owns the
//! bookkeeping of which connections are open, since when (admission order) and whether
//! each is idle; never closes a socket itself: the shed connection's task is told (through
//! its [`ConnSlot`]) and drops its connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Whether a connection is idle (nothing in progress), settable from wherever the
/// connection's work is seen (a request starting, its response body ending).
#[derive(Debug, Clone)]
pub struct IdleFlag(Arc<AtomicBool>);

impl IdleFlag {
    pub fn set(&self, idle: bool) {
        self.0.store(idle, Ordering::Release);
    }

    /// A flag no cap watches (tests, connections without a cap).
    pub fn detached() -> IdleFlag {
        IdleFlag(Arc::new(AtomicBool::new(true)))
    }
}

struct Entry {
    idle: IdleFlag,
    shed: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By admission order: the first idle entry is the oldest idle connection.
    open: BTreeMap<u64, Entry>,
}

pub struct ConnCap {
    pub name: &'static str,
    max: usize,
    inner: Mutex<Inner>,
    /// Idle connections closed to admit a new one.
    pub shed: AtomicU64,
    /// New connections closed at once because every open one was busy.
    pub refused: AtomicU64,
}

/// A place under the cap, held by the connection's task; freed when dropped.
pub struct ConnSlot {
    cap: Arc<ConnCap>,
    id: u64,
    idle: IdleFlag,
    shed: Arc<Notify>,
}

impl ConnCap {
    pub fn new(name: &'static str, max: usize) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            name,
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
            shed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection just accepted (it starts idle: nothing asked yet). At the
    /// cap the oldest idle connection is told to go; with none idle, `None`: close the new
    /// one.
    pub fn admit(self: &Arc<Self>) -> Option<ConnSlot> {
        let mut inner = self.lock();
        if inner.open.len() >= self.max {
            let oldest_idle = inner
                .open
                .iter()
                .find(|(_, e)| e.idle.0.load(Ordering::Acquire))
                .map(|(id, _)| *id);
            let Some(id) = oldest_idle else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if let Some(victim) = inner.open.remove(&id) {
                // Stored if its task is not waiting yet: it sees it at its next look.
                victim.shed.notify_one();
            }
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let idle = IdleFlag(Arc::new(AtomicBool::new(true)));
        let shed = Arc::new(Notify::new());
        inner.open.insert(
            id,
            Entry {
                idle: idle.clone(),
                shed: shed.clone(),
            },
        );
        Some(ConnSlot {
            cap: self.clone(),
            id,
            idle,
            shed,
        })
    }
}

impl ConnSlot {
    pub fn idle_flag(&self) -> IdleFlag {
        self.idle.clone()
    }

    pub fn set_idle(&self, idle: bool) {
        self.idle.set(idle);
    }

    /// Resolves when the cap shed this connection: drop it.
    pub async fn shed(&self) {
        self.shed.notified().await
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.cap.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_cap_sheds_its_oldest_idle_connection_and_refuses_when_all_are_busy() {
        let cap = ConnCap::new("t", 3);
        let a = cap.admit().unwrap();
        let b = cap.admit().unwrap();
        let c = cap.admit().unwrap();
        a.set_idle(false);
        // b is the oldest idle one.
        let d = cap.admit().expect("admitted by shedding");
        tokio::time::timeout(Duration::from_secs(1), b.shed())
            .await
            .expect("b was told to go");
        assert_eq!(cap.shed.load(Ordering::Relaxed), 1);
        assert_eq!(cap.open(), 3);
        c.set_idle(false);
        d.set_idle(false);
        assert!(cap.admit().is_none(), "all busy: the new one is refused");
        assert_eq!(cap.refused.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(cap.open(), 3, "a shed slot no longer counts");
        drop(a);
        assert!(cap.admit().is_some(), "a freed place admits");
    }
}
