//! Retries: which failed attempts may be sent again, how long to wait first, and how many
//! retries a service may spend. Owns the safety rules, the backoff and the retry budget;
//! never sends, buffers or sleeps (the proxy does, with what these functions return) and
//! never decides how many attempts a route allows (that is the route's `retries:`).
//!
//! 1. Classify the attempt ([`retry_verdict`]):
//!    - the connection could not be made → retry: the request never left, whatever its
//!      method or body;
//!    - gRPC status UNAVAILABLE (14) on a gRPC call → retry, for any call (gRPC's own
//!      signal that the server did not process it);
//!    - HTTP 502/503/504 or a connection reset after sending → retry only for idempotent
//!      methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE): a POST that was sent may have
//!      taken effect and is never retried;
//!    - anything else (a response the app meant, 500, 429, 4xx) → no retry;
//!    - (not a retry at all, and never classified here: an attempt the instance did not
//!      process — a refused HTTP/2 stream, an HTTP/1.1 request handed back unwritten — is
//!      sent again by the proxy for any method, outside the count and the budget);
//!    - and a sent request is retried only if its body is still in the replay buffer:
//!      bodies over [`MAX_REPLAY_BODY_BYTES`] (64 KiB) are streamed, not kept.
//! 2. Wait before retry `n` (0-based) a uniformly random time in `[0, min(cap, base·2ⁿ)]`
//!    ("full jitter", base 25 ms, cap 1 s) so that clients that failed together do not
//!    retry together ([`RetryBackoff`]).
//! 3. Spend from the service's budget ([`RetryBudget`], Finagle/linkerd style): every
//!    original request deposits, every retry withdraws; a retry is allowed while retries in
//!    the last 10 s stay within 20 % of the requests in those 10 s plus a floor of 10
//!    retries per second (100 per window). When the budget is empty the failure is returned
//!    as is: retries must not multiply load on a service that is already failing.
//!
//! Hot path: classification is pure; the budget is one short mutex section per request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::http::{HeaderMap, Method, header};
use rand::Rng;

/// The largest request body kept for replay; longer bodies are never retried once sent.
pub const MAX_REPLAY_BODY_BYTES: usize = 64 * 1024;
/// gRPC's UNAVAILABLE status code.
pub const GRPC_STATUS_UNAVAILABLE: u32 = 14;

/// What happened to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// No connection to the endpoint: nothing of the request was sent.
    ConnectFailed,
    /// The connection broke after the request (or part of it) was sent, before a response.
    ConnectionReset,
    /// A response arrived. `grpc_status` is the `grpc-status` from headers (trailers-only
    /// responses) or trailers, if the proxy has it.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
}

/// The facts about a request that decide whether it may be sent again.
#[derive(Debug, Clone, Copy)]
pub struct RetryRequest<'a> {
    pub method: &'a Method,
    /// The request is a gRPC call ([`is_grpc`] on its headers).
    pub is_grpc: bool,
    /// The whole body sent so far is still held for replay (it fits in
    /// [`MAX_REPLAY_BODY_BYTES`]; see [`body_fits_replay`]).
    pub body_replayable: bool,
}

/// Whether to send the request again, and if not, why (for taps and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryVerdict {
    Retry,
    DontRetry(NoRetryReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRetryReason {
    /// The outcome is not a failure a retry can fix (including success).
    OutcomeNotRetryable,
    /// The request was sent and its method is not idempotent (e.g. POST).
    NotIdempotent,
    /// The request was sent and its body was too large to keep for replay.
    BodyNotReplayable,
}

impl NoRetryReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            NoRetryReason::OutcomeNotRetryable => "outcome not retryable",
            NoRetryReason::NotIdempotent => "method not idempotent",
            NoRetryReason::BodyNotReplayable => "body too large to replay",
        }
    }
}

/// Step 1: may this attempt be retried? (Budget and attempt count are checked separately.)
pub fn retry_verdict(request: &RetryRequest<'_>, outcome: AttemptOutcome) -> RetryVerdict {
    use NoRetryReason::*;
    let sent_and_retryable = match outcome {
        AttemptOutcome::ConnectFailed => return RetryVerdict::Retry,
        AttemptOutcome::Response {
            grpc_status: Some(GRPC_STATUS_UNAVAILABLE),
            ..
        } if request.is_grpc => Ok(()),
        AttemptOutcome::ConnectionReset
        | AttemptOutcome::Response {
            status: 502..=504, ..
        } => {
            if is_idempotent(request.method) {
                Ok(())
            } else {
                Err(NotIdempotent)
            }
        }
        AttemptOutcome::Response { .. } => Err(OutcomeNotRetryable),
    };
    match sent_and_retryable {
        Ok(()) if request.body_replayable => RetryVerdict::Retry,
        Ok(()) => RetryVerdict::DontRetry(BodyNotReplayable),
        Err(reason) => RetryVerdict::DontRetry(reason),
    }
}

/// RFC 9110's idempotent methods (PATCH and POST are not; CONNECT is never retried).
pub fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// Whether a body of `len` bytes can be kept for replay.
pub fn body_fits_replay(len: u64) -> bool {
    len <= MAX_REPLAY_BODY_BYTES as u64
}

/// A gRPC call carries `content-type: application/grpc` (optionally `+proto`, `+json`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.trim_start().as_bytes();
            ct.len() >= 16
                && ct[..16].eq_ignore_ascii_case(b"application/grpc")
                && matches!(ct.get(16), None | Some(b'+' | b';'))
        })
}

/// The `grpc-status` in response headers or trailers, if present and numeric.
pub fn grpc_status(headers_or_trailers: &HeaderMap) -> Option<u32> {
    headers_or_trailers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Step 2: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBackoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff {
            base: DEFAULT_BACKOFF_BASE,
            cap: DEFAULT_BACKOFF_CAP,
        }
    }
}

impl RetryBackoff {
    /// The longest wait before retry `retry` (0 = the first retry): `min(cap, base·2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.cap)
    }

    /// How long to wait before retry `retry`: uniform in `[0, ceiling(retry)]`.
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }
}

pub const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_BUDGET_RETRY_RATIO: f64 = 0.2;
pub const DEFAULT_BUDGET_MIN_RETRIES_PER_SEC: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// How long a deposit or withdrawal counts (the window).
    pub ttl: Duration,
    /// Retries allowed per original request in the window.
    pub retry_ratio: f64,
    /// Retries allowed per second regardless of traffic (a window holds `ttl` seconds' worth).
    pub min_retries_per_sec: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ttl: DEFAULT_BUDGET_TTL,
            retry_ratio: DEFAULT_BUDGET_RETRY_RATIO,
            min_retries_per_sec: DEFAULT_BUDGET_MIN_RETRIES_PER_SEC,
        }
    }
}

/// The window is kept in this many buckets, so counts expire in steps of `ttl / 10`.
const BUDGET_BUCKETS: usize = 10;

/// Step 3: one service's retry budget over a sliding window of `ttl`.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    epoch: Instant,
    bucket_width: Duration,
    window: Mutex<[Bucket; BUDGET_BUCKETS]>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which `bucket_width` tick since `epoch` these counts belong to.
    tick: u64,
    requests: u64,
    retries: u64,
}

/// Requests and retries in the current window, for `hms-ctl describe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BudgetSnapshot {
    pub requests: u64,
    pub retries: u64,
    /// Retries that may still be spent now.
    pub retries_left: u64,
}

impl RetryBudget {
    /// A budget whose window starts at `now`.
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        let bucket_width = (config.ttl / BUDGET_BUCKETS as u32).max(Duration::from_millis(1));
        RetryBudget {
            config,
            epoch: now,
            bucket_width,
            window: Mutex::new([Bucket::default(); BUDGET_BUCKETS]),
        }
    }

    /// An original request was sent (not a retry).
    pub fn deposit(&self, now: Instant) {
        let tick = self.tick(now);
        let mut window = self.lock();
        current_bucket(&mut window, tick).requests += 1;
    }

    /// Asks to spend one retry: `true` (and recorded) if the budget allows it.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let tick = self.tick(now);
        let mut window = self.lock();
        let (requests, retries) = totals(&window, tick);
        if retries >= self.allowance(requests) {
            return false;
        }
        current_bucket(&mut window, tick).retries += 1;
        true
    }

    pub fn snapshot(&self, now: Instant) -> BudgetSnapshot {
        let tick = self.tick(now);
        let (requests, retries) = totals(&self.lock(), tick);
        BudgetSnapshot {
            requests,
            retries,
            retries_left: self.allowance(requests).saturating_sub(retries),
        }
    }

    /// Retries allowed in a window holding `requests` original requests.
    fn allowance(&self, requests: u64) -> u64 {
        let floor = f64::from(self.config.min_retries_per_sec) * self.config.ttl.as_secs_f64();
        let ratio = self.config.retry_ratio.max(0.0) * requests as f64;
        // The epsilon keeps 0.2 × 1000 = 200.00000000000003 style products whole.
        (floor + ratio + 1e-9).floor() as u64
    }

    fn tick(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos() / self.bucket_width.as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Bucket; BUDGET_BUCKETS]> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn current_bucket(window: &mut [Bucket; BUDGET_BUCKETS], tick: u64) -> &mut Bucket {
    let bucket = &mut window[(tick % BUDGET_BUCKETS as u64) as usize];
    if bucket.tick != tick {
        *bucket = Bucket {
            tick,
            ..Bucket::default()
        };
    }
    bucket
}

/// Requests and retries in buckets no older than the window.
fn totals(window: &[Bucket; BUDGET_BUCKETS], tick: u64) -> (u64, u64) {
    window
        .iter()
        .filter(|b| b.tick <= tick && tick - b.tick < BUDGET_BUCKETS as u64)
        .fold((0, 0), |(req, ret), b| (req + b.requests, ret + b.retries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn req(method: &Method) -> RetryRequest<'_> {
        RetryRequest {
            method,
            is_grpc: false,
            body_replayable: true,
        }
    }

    fn status(status: u16) -> AttemptOutcome {
        AttemptOutcome::Response {
            status,
            grpc_status: None,
        }
    }

    fn grpc(code: u32) -> AttemptOutcome {
        AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(code),
        }
    }

    const NOT_IDEMPOTENT: RetryVerdict = RetryVerdict::DontRetry(NoRetryReason::NotIdempotent);

    #[test]
    fn a_post_that_was_sent_is_never_retried() {
        for method in [Method::POST, Method::PATCH] {
            let r = req(&method);
            assert_eq!(
                retry_verdict(&r, AttemptOutcome::ConnectionReset),
                NOT_IDEMPOTENT
            );
            for s in [502, 503, 504] {
                assert_eq!(retry_verdict(&r, status(s)), NOT_IDEMPOTENT, "{method} {s}");
            }
        }
    }

    #[test]
    fn a_request_that_never_left_is_always_retried() {
        let huge_post = RetryRequest {
            method: &Method::POST,
            is_grpc: false,
            body_replayable: false,
        };
        assert_eq!(
            retry_verdict(&huge_post, AttemptOutcome::ConnectFailed),
            RetryVerdict::Retry
        );
    }

    #[test]
    fn idempotent_requests_are_retried_on_gateway_errors_and_resets() {
        for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let r = req(&method);
            for outcome in [
                status(502),
                status(503),
                status(504),
                AttemptOutcome::ConnectionReset,
            ] {
                assert_eq!(
                    retry_verdict(&r, outcome),
                    RetryVerdict::Retry,
                    "{method} {outcome:?}"
                );
            }
        }
    }

    #[test]
    fn answers_the_app_meant_are_not_retried() {
        let r = req(&Method::GET);
        for s in [200, 204, 301, 400, 404, 429, 500, 501, 505] {
            assert_eq!(
                retry_verdict(&r, status(s)),
                RetryVerdict::DontRetry(NoRetryReason::OutcomeNotRetryable),
                "{s}"
            );
        }
    }

    #[test]
    fn grpc_unavailable_is_retried_for_any_grpc_call() {
        let call = RetryRequest {
            method: &Method::POST,
            is_grpc: true,
            body_replayable: true,
        };
        assert_eq!(
            retry_verdict(&call, grpc(GRPC_STATUS_UNAVAILABLE)),
            RetryVerdict::Retry
        );
        for other in [0, 2, 4, 8, 13] {
            assert_eq!(
                retry_verdict(&call, grpc(other)),
                RetryVerdict::DontRetry(NoRetryReason::OutcomeNotRetryable),
                "grpc-status {other}"
            );
        }
        // gRPC calls are POSTs: a bare 503 or a reset after sending is not retried.
        assert_eq!(retry_verdict(&call, status(503)), NOT_IDEMPOTENT);
        // A grpc-status header on a plain HTTP POST is not a gRPC signal.
        assert_eq!(
            retry_verdict(&req(&Method::POST), grpc(14)),
            RetryVerdict::DontRetry(NoRetryReason::OutcomeNotRetryable)
        );
    }

    #[test]
    fn a_body_too_large_to_replay_is_not_retried_once_sent() {
        let r = RetryRequest {
            method: &Method::PUT,
            is_grpc: false,
            body_replayable: body_fits_replay(MAX_REPLAY_BODY_BYTES as u64 + 1),
        };
        assert_eq!(
            retry_verdict(&r, status(503)),
            RetryVerdict::DontRetry(NoRetryReason::BodyNotReplayable)
        );
        assert!(body_fits_replay(64 * 1024));
        assert!(body_fits_replay(0));
    }

    #[test]
    fn grpc_calls_and_statuses_are_recognised_from_headers() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_grpc(&h), grpc, "{ct}");
        }
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(14));
        h.insert("grpc-status", "unavailable".parse().unwrap());
        assert_eq!(grpc_status(&h), None);
    }

    #[test]
    fn retry_delays_grow_exponentially_with_full_jitter_up_to_the_cap() {
        let backoff = RetryBackoff::default();
        let ceilings: Vec<u128> = (0..8).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [25, 50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(1));

        let mut rng = SmallRng::seed_from_u64(3);
        for n in 0..8 {
            let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(n, &mut rng)).collect();
            assert!(delays.iter().all(|d| *d <= backoff.ceiling(n)));
            let mean = delays.iter().sum::<Duration>() / 200;
            let half = backoff.ceiling(n) / 2;
            assert!(
                mean > half.mul_f64(0.8) && mean < half.mul_f64(1.2),
                "retry {n}: mean {mean:?}"
            );
        }
    }

    #[test]
    fn retry_delays_are_reproducible_with_a_seed() {
        let b = RetryBackoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
        };
        let run = || {
            let mut rng = SmallRng::seed_from_u64(9);
            (0..5).map(|n| b.delay(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn with_no_traffic_the_floor_allows_ten_retries_a_second() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(BudgetConfig::default(), t0);
        let allowed = (0..500).filter(|_| budget.try_withdraw(t0)).count();
        assert_eq!(allowed, 100, "10/s × 10 s window");
        assert_eq!(budget.snapshot(t0).retries_left, 0);
    }

    #[test]
    fn retries_are_limited_to_a_fifth_of_requests_plus_the_floor() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(BudgetConfig::default(), t0);
        for _ in 0..1000 {
            budget.deposit(t0);
        }
        let allowed = (0..1000).filter(|_| budget.try_withdraw(t0)).count();
        assert_eq!(allowed, 100 + 200);
        assert_eq!(
            budget.snapshot(t0),
            BudgetSnapshot {
                requests: 1000,
                retries: 300,
                retries_left: 0
            }
        );
    }

    #[test]
    fn a_failing_service_gets_no_retry_storm_and_the_budget_refills_as_the_window_slides() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(BudgetConfig::default(), t0);
        // 100 rps, every request fails and wants a retry, for 30 s.
        let mut retried = 0;
        for ms in (0..30_000).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            budget.deposit(now);
            if budget.try_withdraw(now) {
                retried += 1;
            }
        }
        // First window: the floor (100) plus 20 %; then 20 % of the 100 rps + 10/s floor = 30/s.
        assert!(retried < 3000 * 45 / 100, "retried {retried} of 3000");
        let steady = budget.snapshot(t0 + Duration::from_millis(29_990));
        assert_eq!(steady.requests, 1000);
        assert!(steady.retries <= 300, "{steady:?}");

        // Ten seconds of silence later everything has expired.
        let later = t0 + Duration::from_secs(41);
        assert_eq!(
            budget.snapshot(later),
            BudgetSnapshot {
                requests: 0,
                retries: 0,
                retries_left: 100
            }
        );
        assert!(budget.try_withdraw(later));
    }

    #[test]
    fn deposits_count_for_ten_seconds_only() {
        let t0 = Instant::now();
        let cfg = BudgetConfig {
            min_retries_per_sec: 0,
            ..BudgetConfig::default()
        };
        let budget = RetryBudget::new(cfg, t0);
        for _ in 0..10 {
            budget.deposit(t0);
        }
        assert_eq!(
            budget
                .snapshot(t0 + Duration::from_millis(9_999))
                .retries_left,
            2
        );
        assert_eq!(
            budget.snapshot(t0 + Duration::from_secs(10)).retries_left,
            0
        );
        assert!(!budget.try_withdraw(t0 + Duration::from_secs(10)));
    }
}
