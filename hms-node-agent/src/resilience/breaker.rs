//! Per-endpoint circuit breaking on consecutive failures. Owns one endpoint's breaker state
//! (closed, open until a time, half-open with its single probe in flight) and its ejection
//! backoff; never classifies responses (the caller says success or failure) and never
//! picks endpoints (the balancer asks [`CircuitBreaker::is_eligible`]).
//!
//! 1. Closed: every request may go. Count consecutive failures; any success resets the count.
//! 2. At `failures_to_trip` (5) consecutive failures, trip: the endpoint is ejected (Open)
//!    for a backoff that starts at 1 s and doubles with every ejection in a row, capped at
//!    60 s, jittered to a uniformly random value between half and all of it so that many
//!    proxies ejecting the same endpoint do not all probe it at the same instant.
//! 3. Once the backoff has passed, exactly one request is let through as a probe
//!    (HalfOpen); every other request still sees the endpoint as ejected.
//! 4. Probe succeeds → Closed, failure count and backoff reset. Probe fails → Open again
//!    with the next, longer backoff. Probe dropped without an outcome (the caller cancelled)
//!    → Open with the old, already-passed deadline, so the next request probes.
//!
//! Outcomes of ordinary requests that were sent before the trip and finish while the
//! endpoint is Open or HalfOpen are ignored: only the probe decides.
//!
//! Hot path: while closed, [`CircuitBreaker::is_eligible`] and
//! [`CircuitBreaker::try_acquire`] read one atomic; outcomes take a short mutex section,
//! never held across an `.await`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const DEFAULT_FAILURES_TO_TRIP: u32 = 5;
pub const DEFAULT_INITIAL_EJECTION: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(60);
/// An ejection lasts between `(1 - jitter)` and all of its backoff.
pub const DEFAULT_JITTER: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that eject the endpoint.
    pub failures_to_trip: u32,
    /// The first ejection's backoff; each ejection in a row doubles it.
    pub initial_ejection: Duration,
    /// The longest backoff.
    pub max_ejection: Duration,
    /// Fraction of the backoff that is randomised away: 0 = exact, 0.5 = between half and
    /// all of it, 1 = full jitter. Clamped to 0..=1.
    pub jitter: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures_to_trip: DEFAULT_FAILURES_TO_TRIP,
            initial_ejection: DEFAULT_INITIAL_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            jitter: DEFAULT_JITTER,
        }
    }
}

/// Where a breaker is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; consecutive failures are being counted.
    Closed,
    /// Ejected: no requests until `until`, then one probe.
    Open { until: Instant },
    /// The one probe is in flight; everyone else still sees the endpoint as ejected.
    HalfOpen,
}

impl BreakerState {
    /// The name `hms-ctl describe` prints.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A breaker as `hms-ctl describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BreakerSnapshot {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    pub consecutive_failures: u32,
    /// While open: milliseconds until the next probe may go (0 = the next request probes).
    pub ejected_for_ms: Option<u64>,
    /// How many times this endpoint has been ejected (a failed probe counts as another).
    pub ejections_total: u64,
}

/// One endpoint's circuit breaker. Share it (e.g. in an `Arc` beside the endpoint); every
/// method takes `&self`.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    /// Mirrors `inner.state == Closed` so the closed fast path needs no lock.
    closed: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    /// Ejections since the endpoint was last closed by a successful probe: the backoff's
    /// exponent.
    ejections_in_a_row: u32,
    ejections_total: u64,
    rng: SmallRng,
}

/// Leave to go ahead with one request; report how it went with [`Permit::success`] or
/// [`Permit::failure`]. Dropping it without either counts as neither.
#[derive(Debug)]
#[must_use = "report the request's outcome with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    /// For a probe, the deadline that had passed when it was let through.
    probe_of: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_rng(config, SmallRng::from_rng(&mut rand::rng()))
    }

    /// A breaker whose jitter comes from a seeded RNG, for deterministic tests.
    pub fn with_seed(config: BreakerConfig, seed: u64) -> Self {
        Self::with_rng(config, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(config: BreakerConfig, rng: SmallRng) -> Self {
        CircuitBreaker {
            config,
            closed: AtomicBool::new(true),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                ejections_in_a_row: 0,
                ejections_total: 0,
                rng,
            }),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Whether a request at `now` would get a permit (closed, or open with its backoff
    /// passed and no probe in flight). Changes nothing: safe to call for every candidate.
    pub fn is_eligible(&self, now: Instant) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        match self.lock().state {
            BreakerState::Closed => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen => false,
        }
    }

    /// Steps 1 and 3: a permit if the endpoint may take a request now; the probe permit if
    /// the backoff has just passed; `None` while ejected or while another request probes.
    pub fn try_acquire(&self, now: Instant) -> Option<Permit<'_>> {
        if self.closed.load(Ordering::Acquire) {
            return Some(self.permit(None));
        }
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Some(self.permit(None)),
            BreakerState::Open { until } if now >= until => {
                inner.state = BreakerState::HalfOpen;
                Some(self.permit(Some(until)))
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => None,
        }
    }

    fn permit(&self, probe_of: Option<Instant>) -> Permit<'_> {
        Permit {
            breaker: self,
            probe_of,
        }
    }

    /// The state now. (`Open` with a passed deadline means the next request probes.)
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// What `hms-ctl describe` shows, as of `now`.
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let inner = self.lock();
        let ejected_for_ms = match inner.state {
            BreakerState::Open { until } => {
                let left = until.saturating_duration_since(now);
                Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        BreakerSnapshot {
            state: inner.state.name(),
            consecutive_failures: inner.consecutive_failures,
            ejected_for_ms,
            ejections_total: inner.ejections_total,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every field stays consistent between statements, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, probe_of: Option<Instant>, success: bool, now: Instant) {
        let mut inner = self.lock();
        match (probe_of, inner.state) {
            // Step 4: the probe decides.
            (Some(_), BreakerState::HalfOpen) => {
                if success {
                    inner.state = BreakerState::Closed;
                    inner.consecutive_failures = 0;
                    inner.ejections_in_a_row = 0;
                    self.closed.store(true, Ordering::Release);
                } else {
                    inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                    self.eject(&mut inner, now);
                }
            }
            // Step 1.
            (None, BreakerState::Closed) => {
                if success {
                    inner.consecutive_failures = 0;
                } else {
                    inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                    if inner.consecutive_failures >= self.config.failures_to_trip.max(1) {
                        self.eject(&mut inner, now);
                    }
                }
            }
            // A request sent before the trip finished while ejected: ignored.
            _ => {}
        }
    }

    /// Step 2: open for the next jittered backoff.
    fn eject(&self, inner: &mut Inner, now: Instant) {
        let backoff = self.backoff(inner.ejections_in_a_row);
        let jitter = self.config.jitter.clamp(0.0, 1.0);
        let keep = 1.0 - jitter * inner.rng.random::<f64>();
        inner.state = BreakerState::Open {
            until: now + backoff.mul_f64(keep),
        };
        inner.ejections_in_a_row = inner.ejections_in_a_row.saturating_add(1);
        inner.ejections_total += 1;
        self.closed.store(false, Ordering::Release);
    }

    /// The un-jittered backoff of the ejection that follows `ejections_in_a_row` others.
    fn backoff(&self, ejections_in_a_row: u32) -> Duration {
        let factor = 2u32.saturating_pow(ejections_in_a_row);
        self.config
            .initial_ejection
            .saturating_mul(factor)
            .min(self.config.max_ejection)
    }

    fn cancel_probe(&self, probe_of: Instant) {
        let mut inner = self.lock();
        if inner.state == BreakerState::HalfOpen {
            inner.state = BreakerState::Open { until: probe_of };
        }
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new(BreakerConfig::default())
    }
}

impl Permit<'_> {
    /// Whether this request is the probe after an ejection.
    pub fn is_probe(&self) -> bool {
        self.probe_of.is_some()
    }

    /// The endpoint answered well.
    pub fn success(mut self, now: Instant) {
        let probe_of = self.probe_of.take();
        self.breaker.record(probe_of, true, now);
    }

    /// The endpoint failed this request (connect error, reset, 5xx, timeout: the caller's
    /// classification).
    pub fn failure(mut self, now: Instant) {
        let probe_of = self.probe_of.take();
        self.breaker.record(probe_of, false, now);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(until) = self.probe_of.take() {
            self.breaker.cancel_probe(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const SEC: Duration = Duration::from_secs(1);

    fn exact() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn fail_n(b: &CircuitBreaker, n: u32, now: Instant) {
        for _ in 0..n {
            b.try_acquire(now).expect("closed").failure(now);
        }
    }

    /// Fails the probe at `at` and returns when the next probe may go.
    fn fail_probe(b: &CircuitBreaker, at: Instant) -> Instant {
        let probe = b.try_acquire(at).expect("probe");
        assert!(probe.is_probe());
        probe.failure(at);
        match b.state() {
            BreakerState::Open { until } => until,
            other => panic!("expected open, got {other:?}"),
        }
    }

    #[test]
    fn a_tripped_circuit_stops_calling_the_bad_endpoint_and_probes_after_backoff() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let t0 = Instant::now();
        fail_n(&b, 4, t0);
        assert!(b.is_eligible(t0), "four failures are not enough");
        fail_n(&b, 1, t0);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + SEC });

        let almost = t0 + SEC - Duration::from_millis(1);
        assert!(!b.is_eligible(almost));
        assert!(b.try_acquire(almost).is_none());

        let after = t0 + SEC;
        assert!(b.is_eligible(after));
        let probe = b.try_acquire(after).expect("one probe after the backoff");
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.is_eligible(after), "others still see it ejected");
        assert!(b.try_acquire(after).is_none(), "exactly one probe");
        probe.success(after);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.try_acquire(after).unwrap().is_probe());
    }

    #[test]
    fn a_success_resets_the_consecutive_failure_count() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let now = Instant::now();
        fail_n(&b, 4, now);
        b.try_acquire(now).unwrap().success(now);
        assert_eq!(b.snapshot(now).consecutive_failures, 0);
        fail_n(&b, 4, now);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn each_failed_probe_ejects_twice_as_long_up_to_sixty_seconds() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let mut now = Instant::now();
        fail_n(&b, 5, now);
        let mut expected = vec![];
        for _ in 0..8 {
            let BreakerState::Open { until } = b.state() else {
                panic!("open")
            };
            expected.push((until - now).as_secs());
            now = until;
            fail_probe(&b, now);
        }
        assert_eq!(expected, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn a_successful_probe_closes_the_circuit_and_resets_the_backoff() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let t0 = Instant::now();
        fail_n(&b, 5, t0);
        let t1 = fail_probe(&b, t0 + SEC); // now 2 s
        assert_eq!(t1, t0 + 3 * SEC);
        b.try_acquire(t1).unwrap().success(t1);
        assert_eq!(b.state(), BreakerState::Closed);
        fail_n(&b, 5, t1);
        assert_eq!(b.state(), BreakerState::Open { until: t1 + SEC });
    }

    #[test]
    fn jitter_keeps_each_ejection_between_half_and_all_of_its_backoff() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let b = CircuitBreaker::with_seed(BreakerConfig::default(), seed);
            let now = Instant::now();
            fail_n(&b, 5, now);
            let BreakerState::Open { until } = b.state() else {
                panic!("open")
            };
            let ms = (until - now).as_millis();
            assert!((500..=1000).contains(&ms), "{ms} ms");
            seen.insert(ms);
        }
        assert!(seen.len() > 10, "ejections are spread out: {seen:?}");
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_request_probe() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let t0 = Instant::now();
        fail_n(&b, 5, t0);
        let later = t0 + 2 * SEC;
        drop(b.try_acquire(later).expect("probe"));
        assert!(b.is_eligible(later));
        let probe = b.try_acquire(later).expect("a new probe");
        assert!(probe.is_probe());
        probe.success(later);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn responses_to_requests_sent_before_the_trip_do_not_change_the_ejection() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let t0 = Instant::now();
        let stragglers: Vec<_> = (0..3).map(|_| b.try_acquire(t0).unwrap()).collect();
        fail_n(&b, 5, t0);
        let mut stragglers = stragglers.into_iter();
        stragglers.next().unwrap().success(t0);
        stragglers.next().unwrap().failure(t0);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + SEC });

        let probe = b.try_acquire(t0 + SEC).unwrap();
        stragglers.next().unwrap().success(t0 + SEC);
        assert_eq!(b.state(), BreakerState::HalfOpen, "only the probe decides");
        probe.failure(t0 + SEC);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + 3 * SEC
            }
        );
    }

    #[test]
    fn describe_shows_state_failures_remaining_ejection_and_total_ejections() {
        let b = CircuitBreaker::with_seed(exact(), 1);
        let t0 = Instant::now();
        fail_n(&b, 2, t0);
        assert_eq!(
            b.snapshot(t0),
            BreakerSnapshot {
                state: "closed",
                consecutive_failures: 2,
                ejected_for_ms: None,
                ejections_total: 0,
            }
        );
        fail_n(&b, 3, t0);
        let snap = b.snapshot(t0 + Duration::from_millis(300));
        assert_eq!(snap.state, "open");
        assert_eq!(snap.ejected_for_ms, Some(700));
        assert_eq!(snap.ejections_total, 1);
        let _probe = b.try_acquire(t0 + SEC).unwrap();
        assert_eq!(b.snapshot(t0 + SEC).state, "half_open");
        let json = serde_json::to_string(&b.snapshot(t0 + SEC)).unwrap();
        assert!(json.contains("\"state\":\"half_open\""), "{json}");
    }

    #[test]
    fn only_one_of_many_concurrent_requests_gets_the_probe() {
        let b = Arc::new(CircuitBreaker::with_seed(exact(), 1));
        let t0 = Instant::now();
        fail_n(&b, 5, t0);
        let later = t0 + 2 * SEC;
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, barrier) = (b.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match b.try_acquire(later) {
                        Some(p) => {
                            // Hold the probe until every thread has tried.
                            std::mem::forget(p);
                            1
                        }
                        None => 0,
                    }
                })
            })
            .collect();
        let probes: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(probes, 1);
    }
}
