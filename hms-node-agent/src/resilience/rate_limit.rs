//! Per-service request rate limiting with GCRA (the generic cell rate algorithm: a leaky
//! bucket kept as a single timestamp). Owns the decision allow / wait for a slot / reject
//! with `Retry-After`; never sleeps, queues or answers itself (the proxy sleeps for a
//! [`Decision::Wait`] and answers 429 for a [`Decision::Reject`]).
//!
//! With rate `r` the emission interval is `T = 1/r`; a burst `b` gives the tolerance
//! `τ = (b − 1)·T`. The limiter keeps one number, the theoretical arrival time `TAT`: when
//! the schedule of admitted requests would be caught up.
//!
//! 1. For a request at `now`, its slot starts at `start = max(TAT, now)`; `ahead = start − now`
//!    is how far the schedule runs ahead of real time.
//! 2. `ahead ≤ τ` → **Allow**; `TAT = start + T`. So `b` requests pass at once from idle, and
//!    after that one every `T`.
//! 3. Otherwise the request would conform after `wait = ahead − τ`. If `wait` is within the
//!    queue (at most `queue` requests waiting, i.e. `wait ≤ queue·T`) and within `max_wait`
//!    (5 s) → **Wait(wait)**; the slot is reserved (`TAT = start + T`) and the proxy sends
//!    the request after sleeping. A waiter that gives up keeps its slot: the limiter errs on
//!    the side of the protected service.
//! 4. Otherwise → **Reject** with `retry_after = wait`, the time until a request would be
//!    allowed at once; nothing is reserved. [`retry_after_header_secs`] turns it into the
//!    `Retry-After` value (whole seconds, rounded up, at least 1).
//!
//! At 50 rps (burst 50, no queue), 200 requests sent at once: 50 are allowed and 150 get
//! 429 with `Retry-After: 1`; under a sustained flood one more passes every 20 ms.
//!
//! Hot path: one atomic load and one compare-and-swap per request; no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hms_ctl::spec::RateLimit;

/// The longest a queued request may wait for its slot.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it now.
    Allow,
    /// Its slot is reserved: send it after sleeping this long.
    Wait(Duration),
    /// Answer 429 Too Many Requests; a request would be allowed again after `retry_after`.
    Reject { retry_after: Duration },
}

impl Decision {
    /// The `Retry-After` header value for a rejection (see [`retry_after_header_secs`]).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Decision::Reject { retry_after } => Some(retry_after_header_secs(*retry_after)),
            _ => None,
        }
    }
}

/// `Retry-After` is whole seconds: round up, and never say 0 (clients would hammer at once).
pub fn retry_after_header_secs(retry_after: Duration) -> u64 {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    secs.max(1)
}

/// One service's limiter. Share it; [`RateLimiter::check`] takes `&self`.
#[derive(Debug)]
pub struct RateLimiter {
    /// `T` in nanoseconds; `None` when the rate is zero or not a number (everything is
    /// rejected).
    emission_ns: Option<u64>,
    /// `τ` in nanoseconds.
    tolerance_ns: u64,
    queue: u32,
    max_wait: Duration,
    epoch: Instant,
    /// `TAT` in nanoseconds since `epoch`.
    tat_ns: AtomicU64,
    rate_per_sec: f64,
    burst: u32,
}

impl RateLimiter {
    /// `rate_per_sec` requests per second on average, `burst` of them at once from idle
    /// (0 is taken as 1), no queue. A rate of zero, below zero or NaN rejects everything.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = burst.max(1);
        let emission_ns = (rate_per_sec > 0.0).then(|| {
            // Saturating float → int: rates above 1e9/s give T = 0 (no limit), tiny ones
            // a huge T.
            (1e9 / rate_per_sec) as u64
        });
        let tolerance_ns = emission_ns.map_or(0, |t| t.saturating_mul(u64::from(burst - 1)));
        RateLimiter {
            emission_ns,
            tolerance_ns,
            queue: 0,
            max_wait: DEFAULT_MAX_WAIT,
            epoch: Instant::now(),
            tat_ns: AtomicU64::new(0),
            rate_per_sec,
            burst,
        }
    }

    /// A service's `limit:` (`50rps`, `3000rpm`, optional `burst` and `queue`): burst
    /// defaults to one second's worth, queue to 0, and queued requests wait at most
    /// [`DEFAULT_MAX_WAIT`].
    pub fn from_spec(limit: &RateLimit) -> Self {
        Self::new(limit.per_second(), limit.burst_or_default())
            .with_queue(limit.queue.unwrap_or(0), DEFAULT_MAX_WAIT)
    }

    /// Lets up to `queue` requests over the limit wait for their slot, none longer than
    /// `max_wait`.
    pub fn with_queue(mut self, queue: u32, max_wait: Duration) -> Self {
        self.queue = queue;
        self.max_wait = max_wait;
        self
    }

    pub fn rate_per_sec(&self) -> f64 {
        self.rate_per_sec
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Steps 1–4 for one request arriving at `now`.
    pub fn check(&self, now: Instant) -> Decision {
        let Some(emission_ns) = self.emission_ns else {
            return Decision::Reject {
                retry_after: Duration::from_secs(1),
            };
        };
        let now_ns = nanos(now.saturating_duration_since(self.epoch));
        let mut tat = self.tat_ns.load(Ordering::Acquire);
        loop {
            let start = tat.max(now_ns);
            let ahead = start - now_ns;
            let decision = if ahead <= self.tolerance_ns {
                Decision::Allow
            } else {
                let wait = ahead - self.tolerance_ns;
                let queue_room = emission_ns.saturating_mul(u64::from(self.queue));
                if wait <= queue_room && wait <= nanos(self.max_wait) {
                    Decision::Wait(Duration::from_nanos(wait))
                } else {
                    return Decision::Reject {
                        retry_after: Duration::from_nanos(wait),
                    };
                }
            };
            let next = start.saturating_add(emission_ns);
            match self
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return decision,
                Err(current) => tat = current,
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MS: Duration = Duration::from_millis(1);

    fn tally(decisions: impl IntoIterator<Item = Decision>) -> (usize, usize, usize) {
        decisions
            .into_iter()
            .fold((0, 0, 0), |(a, w, r), d| match d {
                Decision::Allow => (a + 1, w, r),
                Decision::Wait(_) => (a, w + 1, r),
                Decision::Reject { .. } => (a, w, r + 1),
            })
    }

    #[test]
    fn at_50_rps_a_burst_of_200_lets_50_through_and_rejects_the_rest_with_retry_after() {
        let limiter = RateLimiter::new(50.0, 50);
        let t0 = Instant::now();
        let decisions: Vec<_> = (0..200).map(|_| limiter.check(t0)).collect();
        assert_eq!(tally(decisions.iter().copied()), (50, 0, 150));
        assert!(decisions[..50].iter().all(|d| *d == Decision::Allow));
        assert_eq!(
            decisions[50],
            Decision::Reject {
                retry_after: 20 * MS
            }
        );
        assert_eq!(decisions[199].retry_after_secs(), Some(1));
        assert_eq!(Decision::Allow.retry_after_secs(), None);
    }

    #[test]
    fn a_sustained_flood_is_held_to_the_rate_after_the_burst() {
        let limiter = RateLimiter::new(50.0, 50);
        let t0 = Instant::now();
        // 200 rps for 10 s.
        let decisions = (0..2000).map(|i| limiter.check(t0 + i * 5 * MS));
        let (allowed, waited, rejected) = tally(decisions);
        assert_eq!(waited, 0);
        assert!(
            (549..=551).contains(&allowed),
            "burst 50 + 50/s × 10 s, got {allowed}"
        );
        assert_eq!(allowed + rejected, 2000);
    }

    #[test]
    fn with_a_queue_excess_requests_wait_for_their_slot_until_the_queue_is_full() {
        let limiter = RateLimiter::new(50.0, 50).with_queue(25, DEFAULT_MAX_WAIT);
        let t0 = Instant::now();
        let decisions: Vec<_> = (0..200).map(|_| limiter.check(t0)).collect();
        assert_eq!(tally(decisions.iter().copied()), (50, 25, 125));
        assert_eq!(decisions[50], Decision::Wait(20 * MS));
        assert_eq!(decisions[74], Decision::Wait(500 * MS));
        assert_eq!(
            decisions[75],
            Decision::Reject {
                retry_after: 520 * MS
            },
            "the first slot after the queue"
        );
        // Once the first waiter's slot has come, there is room for one more.
        assert_eq!(limiter.check(t0 + 20 * MS), Decision::Wait(500 * MS));
    }

    #[test]
    fn no_request_waits_longer_than_the_maximum_wait() {
        let limiter = RateLimiter::new(50.0, 50).with_queue(10_000, Duration::from_secs(1));
        let t0 = Instant::now();
        let decisions: Vec<_> = (0..500).map(|_| limiter.check(t0)).collect();
        assert_eq!(tally(decisions.iter().copied()), (50, 50, 400));
        assert!(decisions.iter().all(|d| match d {
            Decision::Wait(w) => *w <= Duration::from_secs(1),
            _ => true,
        }));
    }

    #[test]
    fn an_idle_service_gets_its_full_burst_back() {
        let limiter = RateLimiter::new(50.0, 50);
        let t0 = Instant::now();
        assert_eq!(tally((0..60).map(|_| limiter.check(t0))), (50, 0, 10));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(tally((0..60).map(|_| limiter.check(t1))), (50, 0, 10));
        // Half a second refills half the burst.
        let t2 = t1 + 500 * MS;
        assert_eq!(tally((0..60).map(|_| limiter.check(t2))), (25, 0, 35));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_header_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_header_secs(20 * MS), 1);
        assert_eq!(retry_after_header_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_header_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_header_secs(Duration::from_secs(60)), 60);
    }

    #[test]
    fn a_spec_limit_of_3000rpm_is_50_per_second_with_a_burst_of_50() {
        let limiter = RateLimiter::from_spec(&RateLimit::parse("3000rpm").unwrap());
        assert_eq!(limiter.rate_per_sec(), 50.0);
        assert_eq!(limiter.burst(), 50);
        let t0 = Instant::now();
        assert_eq!(tally((0..60).map(|_| limiter.check(t0))), (50, 0, 10));
    }

    #[test]
    fn a_spec_queue_lets_that_many_requests_wait() {
        let limit = RateLimit {
            burst: Some(10),
            queue: Some(5),
            ..RateLimit::parse("50rps").unwrap()
        };
        let limiter = RateLimiter::from_spec(&limit);
        let t0 = Instant::now();
        assert_eq!(tally((0..20).map(|_| limiter.check(t0))), (10, 5, 5));
    }

    #[test]
    fn a_limit_of_one_per_minute_asks_the_second_caller_to_come_back_in_a_minute() {
        let limiter = RateLimiter::from_spec(&RateLimit::parse("1rpm").unwrap());
        let t0 = Instant::now();
        assert_eq!(limiter.check(t0), Decision::Allow);
        let second = limiter.check(t0 + Duration::from_secs(15));
        assert_eq!(second.retry_after_secs(), Some(45));
        assert_eq!(limiter.check(t0 + Duration::from_secs(60)), Decision::Allow);
    }

    #[test]
    fn a_zero_or_invalid_rate_rejects_everything_without_panicking() {
        let t0 = Instant::now();
        for rate in [0.0, -5.0, f64::NAN] {
            let limiter = RateLimiter::new(rate, 0);
            assert_eq!(limiter.check(t0).retry_after_secs(), Some(1), "rate {rate}");
        }
        let unlimited = RateLimiter::new(f64::INFINITY, 1);
        assert!((0..1000).all(|_| unlimited.check(t0) == Decision::Allow));
    }

    #[test]
    fn concurrent_callers_never_exceed_the_burst() {
        let limiter = Arc::new(RateLimiter::new(100.0, 100));
        let t0 = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| limiter.check(t0) == Decision::Allow)
                        .count()
                })
            })
            .collect();
        let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(allowed, 100);
    }
}
