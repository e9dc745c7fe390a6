//! Choosing an endpoint for a request: power of two choices over peak-EWMA latency (the
//! algorithm of linkerd2-proxy and tower's `p2c` + `PeakEwma`). Owns each endpoint's latency
//! estimate and in-flight count; never decides whether an endpoint is healthy (the caller
//! passes `eligible`, normally "not ejected by its [`CircuitBreaker`]") and never does I/O.
//!
//! 1. Each endpoint keeps a round-trip estimate, starting at `default_rtt` (1 ms).
//! 2. A sample at least as slow as the estimate replaces it at once (the *peak*): one slow
//!    response makes an endpoint look slow immediately.
//! 3. A faster sample pulls the estimate toward it: `estimate·w + sample·(1 − w)` with
//!    `w = e^(−elapsed/tau)`, `elapsed` the time since the previous sample and tau 10 s, so
//!    good news is believed gradually.
//! 4. For costing, the estimate is regressed toward `default_rtt` by the same weight `w`
//!    measured up to now: `default + (estimate − default)·w`. An endpoint that looked slow
//!    gets no traffic (p2c always prefers the other of the pair), so without this it would
//!    starve forever; with it, it is tried again within a few tau. Under steady traffic `w`
//!    stays near 1 and this changes little.
//! 5. cost = estimate × (in-flight requests + 1).
//! 6. To pick: draw two distinct endpoints uniformly at random among the eligible ones and
//!    take the cheaper (ties go to either). One eligible → it; none → `None`.
//!
//! Hot path: a pick is two RNG draws and two short uncontended mutex sections in the common
//! case (both draws eligible); only when a draw hits an ineligible endpoint does it fall back
//! to one pass over the endpoints (reservoir sampling, still no allocation).
//!
//! [`CircuitBreaker`]: super::breaker::CircuitBreaker

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

/// The time constant of the estimate's decay (tau).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint with no samples yet (and what an idle estimate regresses to).
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Time constant of the exponential decay (tau).
    pub decay: Duration,
    /// Estimate before any sample, and the value an idle estimate regresses to.
    pub default_rtt: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            decay: DEFAULT_DECAY,
            default_rtt: DEFAULT_RTT,
        }
    }
}

/// An endpoint's load as `hms-ctl describe` shows it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EndpointLoad {
    /// The peak-EWMA round-trip estimate now, in milliseconds.
    pub rtt_estimate_ms: f64,
    /// Requests started and not yet finished or dropped.
    pub in_flight: u32,
    /// estimate × (in_flight + 1), in milliseconds: what the balancer compares.
    pub cost_ms: f64,
}

/// Power-of-two-choices balancer over a fixed list of endpoints, addressed by index (the
/// caller keeps the endpoint list in the same order). Rebuild it when the endpoint set
/// changes; in-flight guards keep the old one alive until they finish.
#[derive(Debug)]
pub struct Balancer {
    config: BalanceConfig,
    endpoints: Box<[EndpointStats]>,
}

#[derive(Debug)]
struct EndpointStats {
    in_flight: AtomicU32,
    rtt: Mutex<RttEstimate>,
}

#[derive(Debug, Clone, Copy)]
struct RttEstimate {
    /// The estimate as of `sampled_at`, in nanoseconds.
    rtt_ns: f64,
    /// When the last sample arrived; `None` before the first.
    sampled_at: Option<Instant>,
}

impl RttEstimate {
    /// Weight the estimate at `sampled_at` still carries at `now`: e^(-elapsed/decay).
    fn weight(&self, now: Instant, decay: Duration) -> f64 {
        match self.sampled_at {
            None => 0.0,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_nanos() as f64;
                let tau = decay.as_nanos().max(1) as f64;
                (-elapsed / tau).exp()
            }
        }
    }

    /// Step 4: the estimate as the balancer costs it at `now`.
    fn current(&self, now: Instant, config: &BalanceConfig) -> f64 {
        let default = config.default_rtt.as_nanos() as f64;
        let w = self.weight(now, config.decay);
        default + (self.rtt_ns - default) * w
    }

    /// Steps 2 and 3.
    fn observe(&mut self, rtt: Duration, now: Instant, config: &BalanceConfig) {
        let sample = rtt.as_nanos() as f64;
        self.rtt_ns = if sample >= self.rtt_ns {
            sample
        } else {
            let w = self.weight(now, config.decay);
            self.rtt_ns * w + sample * (1.0 - w)
        };
        self.sampled_at = Some(now);
    }
}

impl Balancer {
    /// A balancer over `endpoint_count` endpoints with the default decay and RTT.
    pub fn new(endpoint_count: usize) -> Self {
        Self::with_config(endpoint_count, BalanceConfig::default())
    }

    pub fn with_config(endpoint_count: usize, config: BalanceConfig) -> Self {
        let endpoints = (0..endpoint_count)
            .map(|_| EndpointStats {
                in_flight: AtomicU32::new(0),
                rtt: Mutex::new(RttEstimate {
                    rtt_ns: config.default_rtt.as_nanos() as f64,
                    sampled_at: None,
                }),
            })
            .collect();
        Balancer { config, endpoints }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// [`Balancer::pick_with`] with the thread's RNG and the current time.
    pub fn pick(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        self.pick_with(&mut rand::rng(), Instant::now(), eligible)
    }

    /// Step 6: the cheaper of two distinct random eligible endpoints; the only eligible one
    /// if there is one; `None` if none is. `eligible` must not change state (it may be called
    /// for any index, more than once): check the breaker with `is_eligible`, and take its
    /// permit only for the endpoint this returns.
    pub fn pick_with<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        now: Instant,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        if n >= 2 {
            // Fast path: two distinct uniform draws, both eligible (the usual case).
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            if eligible(a) && eligible(b) {
                return Some(self.cheaper(a, b, now));
            }
        }
        // Slow path: a uniform pair among the eligible by reservoir sampling (k = 2).
        let mut chosen: [Option<usize>; 2] = [None, None];
        let mut seen = 0usize;
        for i in (0..n).filter(|&i| eligible(i)) {
            seen += 1;
            if seen <= 2 {
                chosen[seen - 1] = Some(i);
            } else {
                let slot = rng.random_range(0..seen);
                if slot < 2 {
                    chosen[slot] = Some(i);
                }
            }
        }
        match chosen {
            [Some(a), Some(b)] => {
                // The reservoir keeps index order; shuffle so ties do not favour low indices.
                let (a, b) = if rng.random::<bool>() { (a, b) } else { (b, a) };
                Some(self.cheaper(a, b, now))
            }
            [Some(a), None] => Some(a),
            _ => None,
        }
    }

    fn cheaper(&self, a: usize, b: usize, now: Instant) -> usize {
        if self.cost_ns(b, now) < self.cost_ns(a, now) {
            b
        } else {
            a
        }
    }

    /// Step 5, in nanoseconds.
    fn cost_ns(&self, idx: usize, now: Instant) -> f64 {
        let ep = &self.endpoints[idx];
        let pending = ep.in_flight.load(Ordering::Relaxed);
        let estimate = lock(&ep.rtt).current(now, &self.config);
        estimate * f64::from(pending.saturating_add(1))
    }

    /// Marks a request to endpoint `idx` as started at `now`. Call
    /// [`InFlight::finish`] when its response arrives to record the latency; dropping the
    /// guard instead (connect failure, cancellation) only ends the in-flight count, so a
    /// fast failure never makes an endpoint look fast (the breaker counts failures).
    ///
    /// Panics if `idx` is not below [`Balancer::len`] (indices come from [`Balancer::pick`]).
    pub fn start(&self, idx: usize, now: Instant) -> InFlight<'_> {
        let endpoint = &self.endpoints[idx];
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            balancer: self,
            idx,
            started: now,
        }
    }

    /// Endpoint `idx`'s load at `now`, for `hms-ctl describe`.
    pub fn load(&self, idx: usize, now: Instant) -> EndpointLoad {
        let ep = &self.endpoints[idx];
        let in_flight = ep.in_flight.load(Ordering::Relaxed);
        let estimate_ns = lock(&ep.rtt).current(now, &self.config);
        EndpointLoad {
            rtt_estimate_ms: estimate_ns / 1e6,
            in_flight,
            cost_ms: estimate_ns * f64::from(in_flight.saturating_add(1)) / 1e6,
        }
    }
}

/// A request in flight to one endpoint; counts toward that endpoint's cost until dropped.
#[derive(Debug)]
#[must_use = "dropping the guard at once ends the request's in-flight count"]
pub struct InFlight<'a> {
    balancer: &'a Balancer,
    idx: usize,
    started: Instant,
}

impl InFlight<'_> {
    /// The endpoint this request went to.
    pub fn endpoint(&self) -> usize {
        self.idx
    }

    /// Records `now - started` as a latency sample (steps 2 and 3) and ends the request.
    pub fn finish(self, now: Instant) {
        let rtt = now.saturating_duration_since(self.started);
        let ep = &self.balancer.endpoints[self.idx];
        lock(&ep.rtt).observe(rtt, now, &self.balancer.config);
        // Drop decrements the in-flight count.
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.balancer.endpoints[self.idx]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The estimate is plain data that is valid after any panic, so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const MS: Duration = Duration::from_millis(1);

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    /// Sends one request to `idx` that takes `rtt`, finishing at `at + rtt`.
    fn sample(b: &Balancer, idx: usize, at: Instant, rtt: Duration) {
        b.start(idx, at).finish(at + rtt);
    }

    fn estimate_ms(b: &Balancer, idx: usize, now: Instant) -> f64 {
        b.load(idx, now).rtt_estimate_ms
    }

    #[test]
    fn a_slow_endpoint_stops_getting_traffic_once_its_latency_is_seen() {
        let b = Balancer::new(3);
        let t0 = Instant::now();
        sample(&b, 0, t0, MS);
        sample(&b, 1, t0, MS);
        sample(&b, 2, t0, 100 * MS);
        let now = t0 + 100 * MS;
        let mut rng = rng();
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            let i = b.pick_with(&mut rng, now, |_| true).unwrap();
            counts[i] += 1;
        }
        assert_eq!(
            counts[2], 0,
            "every pair containing the slow endpoint has a cheaper one"
        );
        assert!(counts[0] > 1200 && counts[1] > 1200, "{counts:?}");
    }

    #[test]
    fn one_slow_response_raises_the_estimate_at_once() {
        let b = Balancer::new(1);
        let t0 = Instant::now();
        for i in 0..10 {
            sample(&b, 0, t0 + i * 10 * MS, MS);
        }
        let after = t0 + 100 * MS;
        sample(&b, 0, after, 250 * MS);
        let est = estimate_ms(&b, 0, after + 250 * MS);
        assert!(
            (est - 250.0).abs() < 0.01,
            "peak should be taken as is, got {est}"
        );
    }

    #[test]
    fn faster_responses_lower_the_estimate_gradually_with_time_constant_tau() {
        let b = Balancer::new(1);
        let t0 = Instant::now();
        sample(&b, 0, t0, 100 * MS); // estimate 100 ms at t0 + 100 ms
        // One tau later a 10 ms response: 100/e + 10(1 - 1/e) = 43.1.
        let t1 = t0 + 100 * MS + DEFAULT_DECAY - 10 * MS;
        sample(&b, 0, t1, 10 * MS);
        let est = estimate_ms(&b, 0, t1 + 10 * MS);
        assert!((est - 43.1).abs() < 0.1, "got {est}");

        // A burst of fast responses at the same instant does not move it.
        let t2 = t1 + 10 * MS;
        sample(&b, 0, t2, Duration::ZERO);
        assert!((estimate_ms(&b, 0, t2) - est).abs() < 1e-9);

        // Steady 10 ms responses every second for a minute converge on 10 ms.
        for s in 1..=60 {
            sample(&b, 0, t2 + Duration::from_secs(s) - 10 * MS, 10 * MS);
        }
        let est = estimate_ms(&b, 0, t2 + Duration::from_secs(60));
        assert!((est - 10.0).abs() < 0.5, "got {est}");
    }

    #[test]
    fn an_endpoint_that_looked_slow_is_tried_again_after_being_idle() {
        let b = Balancer::new(2);
        let t0 = Instant::now();
        sample(&b, 0, t0, 500 * MS);
        let mut rng = rng();
        assert_eq!(b.pick_with(&mut rng, t0 + 500 * MS, |_| true), Some(1));
        // Eight taus later its estimate is back near the default, below endpoint 1's 2 ms.
        let later = t0 + 8 * DEFAULT_DECAY;
        sample(&b, 1, later - 2 * MS, 2 * MS);
        assert!(estimate_ms(&b, 0, later) < 1.5);
        assert_eq!(b.pick_with(&mut rng, later, |_| true), Some(0));
    }

    #[test]
    fn requests_in_flight_make_a_busy_endpoint_costlier() {
        let b = Balancer::new(2);
        let t0 = Instant::now();
        let _busy = [b.start(0, t0), b.start(0, t0)];
        assert_eq!(b.load(0, t0).in_flight, 2);
        assert!((b.load(0, t0).cost_ms - 3.0).abs() < 1e-9, "1 ms × (2 + 1)");
        let mut rng = rng();
        for _ in 0..100 {
            assert_eq!(b.pick_with(&mut rng, t0, |_| true), Some(1));
        }
    }

    #[test]
    fn a_dropped_request_ends_in_flight_without_recording_latency() {
        let b = Balancer::new(1);
        let t0 = Instant::now();
        let guard = b.start(0, t0);
        assert_eq!(guard.endpoint(), 0);
        assert_eq!(b.load(0, t0).in_flight, 1);
        drop(guard); // e.g. connect failed after 3 s
        let load = b.load(0, t0 + Duration::from_secs(3));
        assert_eq!(load.in_flight, 0);
        assert!((load.rtt_estimate_ms - 1.0).abs() < 1e-9);
    }

    #[test]
    fn an_ejected_endpoint_is_never_picked() {
        let b = Balancer::new(4);
        let now = Instant::now();
        let mut rng = rng();
        for _ in 0..1000 {
            let i = b.pick_with(&mut rng, now, |i| i != 2).unwrap();
            assert_ne!(i, 2);
        }
    }

    #[test]
    fn with_one_eligible_endpoint_it_takes_every_request() {
        let b = Balancer::new(5);
        let now = Instant::now();
        let mut rng = rng();
        for _ in 0..100 {
            assert_eq!(b.pick_with(&mut rng, now, |i| i == 3), Some(3));
        }
        assert_eq!(Balancer::new(1).pick_with(&mut rng, now, |_| true), Some(0));
    }

    #[test]
    fn with_no_eligible_endpoint_there_is_no_pick() {
        let now = Instant::now();
        let mut rng = rng();
        assert_eq!(Balancer::new(3).pick_with(&mut rng, now, |_| false), None);
        let empty = Balancer::new(0);
        assert!(empty.is_empty());
        assert_eq!(empty.pick_with(&mut rng, now, |_| true), None);
        assert_eq!(empty.pick(|_| true), None);
    }

    #[test]
    fn equal_endpoints_share_traffic_evenly_even_when_one_is_ejected() {
        let b = Balancer::new(4);
        let now = Instant::now();
        let mut rng = rng();
        let mut counts = [0u32; 4];
        for _ in 0..6000 {
            counts[b.pick_with(&mut rng, now, |i| i != 0).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        for &c in &counts[1..] {
            assert!((1700..2300).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn the_pick_is_deterministic_for_a_given_seed() {
        let b = Balancer::new(8);
        let now = Instant::now();
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..50)
                .map(|_| b.pick_with(&mut rng, now, |i| i % 3 != 0).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
    }
}
