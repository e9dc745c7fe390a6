//! Per-client rate limits at the door: one GCRA bucket (the mesh's own
//! [`RateLimiter`](crate::resilience::rate_limit::RateLimiter)) per API key, subject or
//! address, in a table of at most `max_clients` entries so a flood of new clients cannot
//! grow memory. Owns the table and its eviction; never answers (the door turns a
//! rejection into 429 with `Retry-After`).
//!
//! Eviction: a client idle for at least a full refill (burst ÷ rate) has a full bucket
//! again, exactly as a new entry would, so forgetting it changes no decision; those go
//! first. Only if every remembered client is active are the least recently seen eighth
//! forgotten (they get a fresh burst: the limiter errs toward letting a client in over
//! refusing a newcomer because the table is full). Both sweeps are O(n) and free many
//! entries at once, so their cost is spread over the inserts that follow.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hms_ctl::gateway::door::{ClientKey, ClientRateLimit};

use crate::resilience::rate_limit::{Decision, RateLimiter};

#[derive(Debug)]
struct Entry {
    limiter: RateLimiter,
    last_seen: Instant,
}

#[derive(Debug)]
pub struct ClientLimits {
    pub by: ClientKey,
    rate_per_sec: f64,
    burst: u32,
    max_clients: usize,
    /// Time for an empty bucket to fill again.
    refill: Duration,
    table: Mutex<HashMap<String, Entry>>,
    /// What it was made from: a re-applied spec keeps the table (and every client's bucket)
    /// of a route whose limit did not change.
    made_from: (ClientRateLimit, bool),
}

impl ClientLimits {
    pub fn new(spec: &ClientRateLimit, authenticated: bool) -> ClientLimits {
        let rate_per_sec = spec.rate.per_second();
        let burst = spec.burst_or_default();
        ClientLimits {
            by: spec.by_or_default(authenticated),
            rate_per_sec,
            burst,
            max_clients: spec.max_clients_or_default() as usize,
            refill: Duration::from_secs_f64(f64::from(burst) / rate_per_sec),
            table: Mutex::new(HashMap::new()),
            made_from: (spec.clone(), authenticated),
        }
    }

    /// Whether `spec` (on a route with or without authentication) makes this same table.
    pub fn same_settings(&self, spec: &ClientRateLimit, authenticated: bool) -> bool {
        self.made_from.0 == *spec && self.made_from.1 == authenticated
    }

    /// The name a client's bucket goes by: its IPv4 address, or its IPv6 /64.
    pub fn address_key(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let s = v6.segments();
                    format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        }
    }

    /// One request from `client` at `now`: allowed, or rejected with its retry-after.
    pub fn check(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if !table.contains_key(client) && table.len() >= self.max_clients {
            self.make_room(&mut table, now);
        }
        let entry = table.entry(client.to_owned()).or_insert_with(|| Entry {
            limiter: RateLimiter::new(self.rate_per_sec, self.burst),
            last_seen: now,
        });
        entry.last_seen = now;
        match entry.limiter.check(now) {
            Decision::Allow | Decision::Wait(_) => Ok(()),
            Decision::Reject { retry_after } => Err(retry_after),
        }
    }

    fn make_room(&self, table: &mut HashMap<String, Entry>, now: Instant) {
        let refill = self.refill;
        table.retain(|_, e| now.saturating_duration_since(e.last_seen) < refill);
        if table.len() < self.max_clients {
            return;
        }
        let mut seen: Vec<Instant> = table.values().map(|e| e.last_seen).collect();
        let drop = (self.max_clients / 8).max(1).min(seen.len());
        let (_, cutoff, _) = seen.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        let mut left = drop;
        table.retain(|_, e| {
            if left > 0 && e.last_seen <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
    }

    /// How many clients are remembered now.
    pub fn remembered(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hms_ctl::spec::RateLimit;

    fn limits(rate: &str, burst: u32, max_clients: u32) -> ClientLimits {
        ClientLimits::new(
            &ClientRateLimit {
                rate: RateLimit::parse(rate).unwrap(),
                burst: Some(burst),
                by: Some(ClientKey::Address),
                max_clients: Some(max_clients),
            },
            false,
        )
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let l = limits("1rps", 2, 100);
        let t = Instant::now();
        assert!(l.check("a", t).is_ok());
        assert!(l.check("a", t).is_ok());
        let retry = l.check("a", t).unwrap_err();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_millis(1100),
            "{retry:?}"
        );
        // Another client is not slowed by the first.
        assert!(l.check("b", t).is_ok());
        assert!(l.check("a", t + Duration::from_millis(1100)).is_ok());
    }

    #[test]
    fn a_flood_of_new_clients_stays_within_max_clients_and_keeps_active_ones_limited() {
        let l = limits("1rpm", 1, 1000);
        let t = Instant::now();
        assert!(l.check("heavy", t).is_ok());
        for i in 0..100_000u32 {
            let now = t + Duration::from_micros(u64::from(i));
            let _ = l.check(
                &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                now,
            );
            // The heavy client keeps coming: it is never among the least recently seen.
            if i % 100 == 0 {
                assert!(
                    l.check("heavy", now).is_err(),
                    "heavy client was forgotten at {i}"
                );
            }
            assert!(l.remembered() <= 1000);
        }
    }

    #[test]
    fn idle_clients_are_forgotten_first_and_come_back_with_a_full_bucket() {
        let l = limits("10rps", 10, 2);
        let t = Instant::now();
        for _ in 0..10 {
            l.check("old", t).unwrap();
        }
        l.check("recent", t + Duration::from_millis(900)).unwrap();
        // `old`'s bucket refilled after 1 s: forgetting it for `new` changes nothing.
        l.check("new", t + Duration::from_millis(1100)).unwrap();
        assert_eq!(l.remembered(), 2);
        for _ in 0..10 {
            l.check("old", t + Duration::from_millis(1200)).unwrap();
        }
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientLimits::address_key(a), ClientLimits::address_key(b));
        assert_ne!(ClientLimits::address_key(a), ClientLimits::address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ClientLimits::address_key(mapped), "192.0.2.7");
    }
}
