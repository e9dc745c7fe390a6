//! One listener's connection cap with shedding of the oldest idle connection. Owns the
//! bookkeeping of which connections are open, since when (admission order) and whether
//! each is idle; never closes a socket itself: the shed connection's task is told (through
//! its [`ConnSlot`]) and drops its connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// A connection's requests whose response has not ended yet; with none the connection is
/// idle for its cap (may be shed). Shared by the HTTP listeners (node proxy, gateway).
pub struct InFlight {
    count: AtomicUsize,
    idle: IdleFlag,
}

impl InFlight {
    pub fn new(idle: IdleFlag) -> InFlight {
        InFlight {
            count: AtomicUsize::new(0),
            idle,
        }
    }

    pub fn started(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) == 0 {
            self.idle.set(false);
        }
    }

    pub fn ended(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.set(true);
        }
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By admission order: the first idle entry is the oldest idle connection.
    open: BTreeMap<u64, Entry>,
    /// Open connections per caller (a local user, or an outside client's address), for
    /// listeners that know who their callers are.
    by_user: std::collections::HashMap<ShareKey, usize>,
}

pub struct ConnCap {
    pub name: &'static str,
    max: usize,
    inner: Mutex<Inner>,
    /// Idle connections closed to admit a new one.
    pub shed: AtomicU64,
    /// New connections closed at once because every open one was busy.
    pub refused: AtomicU64,
    /// New connections closed because their user already held its share (see
    /// [`ConnCap::admit_user`]).
    pub refused_user_share: AtomicU64,
}

/// A place under the cap, held by the connection's task; freed when dropped.
pub struct ConnSlot {
    cap: Arc<ConnCap>,
    id: u64,
    idle: IdleFlag,
    shed: Arc<Notify>,
    user: Option<ShareKey>,
}

/// Whose share a connection counts against: a local user (the outbound proxy) or an
/// outside client's address (the gateway; IPv6 by its /64, which one client usually holds
/// whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ShareKey {
    User(u32),
    Client(std::net::IpAddr),
}

impl ConnCap {
    pub fn new(name: &'static str, max: usize) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            name,
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
            shed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_user_share: AtomicU64::new(0),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// How many connections one user may hold: half the cap. Busy connections are never
    /// shed, so without a share one local user holding byte streams open could fill the
    /// whole cap and lock every other user (and service) out; with it, the other half
    /// always remains for everyone else. A user namespace does not help: the kernel reports
    /// the uid of the initial namespace.
    pub fn user_share(&self) -> usize {
        (self.max / 2).max(1)
    }

    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection just accepted whose caller is not known (it starts idle:
    /// nothing asked yet). At the cap the oldest idle connection is told to go; with none
    /// idle, `None`: close the new one.
    pub fn admit(self: &Arc<Self>) -> Option<ConnSlot> {
        self.admit_as(None).ok()
    }

    /// [`admit`](Self::admit) for a connection of a known local user (the outbound proxy
    /// reads it from the kernel's record of the connection), counted against that user's
    /// [`user_share`](Self::user_share).
    pub fn admit_user(self: &Arc<Self>, uid: u32) -> Result<ConnSlot, Refused> {
        self.admit_as(Some(ShareKey::User(uid)))
    }

    /// The same for a listener facing outside clients (the gateway): counted against the
    /// client's address, an IPv6 client by its /64 (which one client usually holds whole),
    /// so one client cannot hold every place busy.
    pub fn admit_client(self: &Arc<Self>, client: std::net::IpAddr) -> Result<ConnSlot, Refused> {
        let key = match client.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())
            }
            v4 => v4,
        };
        self.admit_as(Some(ShareKey::Client(key)))
    }

    fn admit_as(self: &Arc<Self>, key: Option<ShareKey>) -> Result<ConnSlot, Refused> {
        let mut inner = self.lock();
        // The share before the cap: a caller over its share is refused without costing
        // anyone an idle connection. (Checked after shedding, a user at its share opening
        // connections in a loop at a full cap had every one of them shed somebody's idle
        // keep-alive connection before being refused itself: its own held connections
        // first, then other users'.)
        if let Some(key) = key
            && inner.by_user.get(&key).copied().unwrap_or(0) >= self.user_share()
        {
            self.refused_user_share.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Share);
        }
        if inner.open.len() >= self.max {
            let oldest_idle = inner
                .open
                .iter()
                .find(|(_, e)| e.idle.0.load(Ordering::Acquire))
                .map(|(id, _)| *id);
            let Some(id) = oldest_idle else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Busy);
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
        if let Some(key) = key {
            *inner.by_user.entry(key).or_insert(0) += 1;
        }
        Ok(ConnSlot {
            cap: self.clone(),
            id,
            idle,
            shed,
            user: key,
        })
    }
}

/// Why a new connection was not admitted (each is counted by the cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// At the cap with every open connection busy.
    Busy,
    /// Its caller already holds [`ConnCap::user_share`] connections.
    Share,
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
        let mut inner = self.cap.lock();
        inner.open.remove(&self.id);
        if let Some(uid) = self.user
            && let Some(held) = inner.by_user.get_mut(&uid)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                inner.by_user.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_user_holds_at_most_half_the_cap_and_others_still_get_in() {
        let cap = ConnCap::new("t", 4);
        let mut held = Vec::new();
        for _ in 0..2 {
            let s = cap.admit_user(65534).unwrap();
            s.set_idle(false);
            held.push(s);
        }
        assert_eq!(
            cap.admit_user(65534).err(),
            Some(Refused::Share),
            "over its share"
        );
        assert_eq!(cap.refused_user_share.load(Ordering::Relaxed), 1);
        let _other = cap.admit_user(0).expect("another user still gets in");
        drop(held.pop());
        let _again = cap
            .admit_user(65534)
            .expect("a freed place is the user's again");
    }

    #[tokio::test]
    async fn a_user_over_its_share_at_a_full_cap_sheds_nobody() {
        let cap = ConnCap::new("t", 4);
        // The cap is full: user 1000 at its share, user 0 with two idle keep-alives.
        let mine: Vec<_> = (0..2).map(|_| cap.admit_user(1000).unwrap()).collect();
        let theirs: Vec<_> = (0..2).map(|_| cap.admit_user(0).unwrap()).collect();
        for _ in 0..10 {
            assert_eq!(cap.admit_user(1000).err(), Some(Refused::Share));
        }
        assert_eq!(
            cap.shed.load(Ordering::Relaxed),
            0,
            "no idle connection was shed"
        );
        for slot in mine.iter().chain(&theirs) {
            assert!(
                tokio::time::timeout(Duration::from_millis(50), slot.shed())
                    .await
                    .is_err(),
                "nobody was told to go"
            );
        }
        // A caller within its share still sheds the oldest idle one.
        let _third = cap.admit_user(7).expect("admitted by shedding");
        assert_eq!(cap.shed.load(Ordering::Relaxed), 1);
        tokio::time::timeout(Duration::from_secs(1), mine[0].shed())
            .await
            .expect("the oldest idle connection was told to go");
    }

    #[test]
    fn an_outside_client_holds_at_most_half_and_its_ipv6_64_counts_as_one() {
        let cap = ConnCap::new("t", 4);
        let a: std::net::IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let s1 = cap.admit_client(a).unwrap();
        let s2 = cap.admit_client(b).unwrap();
        assert_eq!(
            cap.admit_client(a).err(),
            Some(Refused::Share),
            "the same /64 is one client"
        );
        let s3 = cap.admit_client("192.0.2.1".parse().unwrap()).unwrap();
        let s4 = cap
            .admit_client("::ffff:192.0.2.1".parse().unwrap())
            .unwrap();
        drop(s1);
        assert_eq!(
            cap.admit_client("192.0.2.1".parse().unwrap()).err(),
            Some(Refused::Share),
            "the IPv4-mapped address counted as the IPv4 client: its share is taken"
        );
        drop((s2, s3, s4));
    }

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
