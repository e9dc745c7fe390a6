//! Per-request resilience policies for the node proxy's HTTP layer, one file per policy. Owns
//! the decisions (which endpoint, may this retry, is this caller allowed, must this request
//! wait); never does I/O on the data path, never sleeps, and never holds a lock across an
//! `.await`: every type here is a plain struct the proxy calls synchronously with the current
//! time, so the algorithms are tested deterministically with injected clocks and seeded RNGs.
//!
//! The order a request meets them in (see DESIGN.md, "Data path"):
//!
//! | step | module | decides |
//! | --- | --- | --- |
//! | 1 | [`trace`] | the request's `x-hms-trace-id` (kept or minted) |
//! | 2 | [`policy`] | who is calling (cgroup → service) and whether they may |
//! | 3 | [`rate_limit`] | allow now, wait for a slot, or 429 with `Retry-After` |
//! | 4 | [`balance`] | which endpoint: power of two choices over peak-EWMA latency |
//! | 5 | [`breaker`] | whether an endpoint is ejected, and its one probe after backoff |
//! | 6 | [`retry`] | whether a failed attempt may be retried, after what delay, within budget |

pub mod balance;
pub mod breaker;
pub mod policy;
pub mod rate_limit;
pub mod retry;
pub mod trace;
