//! Retries: which failures are retried, for which methods, how long to back off, how much extra
//! load retries may add (the budget). The body a retry replays is `io::request_body`.
//!
//! Safety first: only idempotent methods are retried after the request may have reached the
//! upstream; POST/PATCH are retried only when the connection never opened (nothing was sent),
//! unless the route opts in. A body larger than `body_limit` is never retried, and a replayed
//! body is the exact bytes of the first, never duplicated or cut.

// Budget counts and replay positions come from peers' traffic: no arithmetic here may panic.
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::backoff;
use http::{HeaderMap, Method, StatusCode};
use outrider_config::{Retries, RetryOn};
use tokio::time::Instant;

use crate::core::errors::{ErrorKind, RetrySafety};
use crate::policy::timeout;

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The connection never opened: nothing was sent.
    Connect,
    /// The connection broke before a response, or the attempt timed out.
    Reset,
    /// The upstream answered with this status.
    Status(StatusCode),
    /// The upstream answered with this gRPC status code in its headers (trailers-only).
    Grpc(u8),
    /// The proxy shed the attempt (a service-wide limit); never retried.
    Shed,
}

impl AttemptFailure {
    /// How an attempt that failed with `kind` (without a response) counts for retries, by the
    /// kind's retry safety: nothing sent (a TCP connect or TLS handshake that failed) is a
    /// connect failure; sent, a reset; never safe, shed.
    pub fn of(kind: ErrorKind) -> Self {
        match kind.retry_safety() {
            RetrySafety::Safe => Self::Connect,
            RetrySafety::IfIdempotent => Self::Reset,
            RetrySafety::Never => Self::Shed,
        }
    }

    /// Whether the request may go again after this failure, whatever the policy lists.
    pub fn retry_safety(self) -> RetrySafety {
        match self {
            Self::Connect => RetrySafety::Safe,
            Self::Reset | Self::Status(_) | Self::Grpc(_) => RetrySafety::IfIdempotent,
            Self::Shed => RetrySafety::Never,
        }
    }
}

/// A compiled retry policy (built once per reload).
#[derive(Debug)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    on_connect: bool,
    on_reset: bool,
    on_gateway: bool,
    on_5xx: bool,
    statuses: Vec<u16>,
    grpc_codes: Vec<u8>,
    backoff_base: Duration,
    backoff_max: Duration,
    /// Longest `Retry-After` waited for.
    max_retry_after: Duration,
    /// Largest request body buffered for replay.
    pub body_limit: u64,
    /// The route allows retrying non-idempotent methods after they were sent.
    pub non_idempotent: bool,
    /// The shared retry budget of the route.
    pub budget: RetryBudget,
}

/// The gRPC code of a status name in `retries.grpc`.
fn grpc_code(name: &str) -> Option<u8> {
    let index = outrider_config::GRPC_STATUS_NAMES
        .iter()
        .position(|n| *n == name)?;
    // The list is in code order starting at CANCELLED (1).
    u8::try_from(index.saturating_add(1)).ok()
}

impl RetryPolicy {
    /// Compiles `config`; `non_idempotent` comes from the route.
    pub fn new(config: &Retries, non_idempotent: bool) -> Self {
        let on = |r| config.on.contains(&r);
        Self {
            attempts: config.attempts,
            on_connect: on(RetryOn::ConnectFailure),
            on_reset: on(RetryOn::Reset),
            on_gateway: on(RetryOn::GatewayError),
            on_5xx: on(RetryOn::FiveXx),
            statuses: if on(RetryOn::RetriableStatus) {
                config.status.clone()
            } else {
                Vec::new()
            },
            grpc_codes: config.grpc.iter().filter_map(|n| grpc_code(n)).collect(),
            backoff_base: config.backoff.base.get(),
            backoff_max: config.backoff.max.get(),
            max_retry_after: config.max_retry_after.get(),
            body_limit: config.body_limit.0,
            non_idempotent,
            budget: RetryBudget::new(config.budget.ratio, config.budget.min_per_second),
        }
    }

    /// Whether this failure kind is listed as retryable, regardless of method.
    pub fn retries_on(&self, failure: AttemptFailure) -> bool {
        match failure {
            AttemptFailure::Connect => self.on_connect,
            AttemptFailure::Reset => self.on_reset || self.on_gateway || self.on_5xx,
            AttemptFailure::Status(status) => {
                let code = status.as_u16();
                (self.on_5xx && status.is_server_error())
                    || (self.on_gateway && matches!(code, 502..=504))
                    || self.statuses.contains(&code)
            }
            AttemptFailure::Grpc(code) => self.grpc_codes.contains(&code),
            AttemptFailure::Shed => false,
        }
    }

    /// Whether `method` may be retried after `failure`. A connect failure sent nothing, so any
    /// method is safe; otherwise only idempotent methods, unless the route opted in
    /// ([`RetrySafety::allows`]).
    pub fn method_allows(&self, method: &Method, failure: AttemptFailure) -> bool {
        failure.retry_safety().allows(method, self.non_idempotent)
    }

    /// Full-jitter backoff before retry number `retry` (1-based): U[0, min(max, base·2^(retry-1))).
    pub fn backoff(&self, retry: u32) -> Duration {
        self.backoff_with(retry, |ceiling| fastrand::u64(..ceiling))
    }

    /// [`Self::backoff`] with its random draw from `below`, which is given the ceiling in
    /// nanoseconds (never 0: a zero ceiling draws nothing) and returns a number of nanoseconds
    /// under it. Production draws uniformly ([`Self::backoff`]); a test scripts the draws.
    pub fn backoff_with(&self, retry: u32, below: impl FnOnce(u64) -> u64) -> Duration {
        let ceiling =
            backoff::ceiling(self.backoff_base, self.backoff_max, retry.saturating_sub(1));
        let nanos = backoff::nanos(ceiling);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(below(nanos))
    }

    /// Whether a `Retry-After` of `asked` is waited for before the next attempt: only up to
    /// `max_retry_after`, and only if the retry can still start before the request timeout
    /// (`left` of it, when there is one). Otherwise the response goes back as it is.
    pub fn honours_retry_after(&self, asked: Duration, left: Option<Duration>) -> bool {
        asked <= self.max_retry_after && left.is_none_or(|left| asked < left)
    }
}

/// The delay a `Retry-After` header asks for, in its delta-seconds form. (The HTTP-date form is
/// ignored: clocks between pods cannot be trusted to agree.) A number of seconds too large for
/// a `u64` asks for the longest wait there is: the upstream wants no retry soon.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let digits = headers
        .get(http::header::RETRY_AFTER)?
        .as_bytes()
        .trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let seconds = digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?
            .checked_add(u64::from(d.wrapping_sub(b'0')))
    });
    Some(seconds.map_or(Duration::MAX, Duration::from_secs))
}

/// Caps retries at `ratio` of requests plus `min_per_second`, over a sliding 10 s window, so a
/// failing upstream sees at most that much extra load (Linkerd's and Finagle's retry budget).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window: Mutex<BudgetWindow>,
}

const BUDGET_SLOTS: usize = 10;

#[derive(Debug)]
struct BudgetWindow {
    /// Per-second slots of (requests, retries), newest last.
    slots: VecDeque<(u64, u64)>,
    slot_start: Instant,
}

impl RetryBudget {
    /// A budget allowing `ratio` extra load plus `min_per_second` retries.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        let mut slots = VecDeque::with_capacity(BUDGET_SLOTS);
        slots.push_back((0, 0));
        Self {
            ratio,
            min_per_second,
            window: Mutex::new(BudgetWindow {
                slots,
                slot_start: Instant::now(),
            }),
        }
    }

    fn with_window<T>(&self, now: Instant, f: impl FnOnce(&mut BudgetWindow) -> T) -> T {
        // The lock guards a few integer updates; a poisoned lock still holds valid counters.
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        while now.duration_since(window.slot_start) >= Duration::from_secs(1) {
            // Never past `now`, so never past what an Instant holds.
            window.slot_start = timeout::deadline_after(window.slot_start, Duration::from_secs(1));
            window.slots.push_back((0, 0));
            if window.slots.len() > BUDGET_SLOTS {
                window.slots.pop_front();
            }
            if now.duration_since(window.slot_start) > Duration::from_secs(BUDGET_SLOTS as u64) {
                // Idle for longer than the window: start afresh.
                window.slots.clear();
                window.slots.push_back((0, 0));
                window.slot_start = now;
            }
        }
        f(&mut window)
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Counts one original request that arrived at `now` (a clock reading the caller already
    /// has).
    pub fn deposit_at(&self, now: Instant) {
        self.with_window(now, |w| {
            if let Some(last) = w.slots.back_mut() {
                last.0 = last.0.saturating_add(1);
            }
        });
    }

    /// Takes one retry from the budget, or returns false when it is spent.
    pub fn withdraw(&self) -> bool {
        let (ratio, min) = (self.ratio, self.min_per_second);
        self.with_window(Instant::now(), |w| {
            let (requests, retries) = w.slots.iter().fold((0u64, 0u64), |(r, t), (a, b)| {
                (r.saturating_add(*a), t.saturating_add(*b))
            });
            let seconds = w.slots.len() as f64;
            let allowed = ratio * requests as f64 + f64::from(min) * seconds;
            if (retries as f64) < allowed {
                if let Some(last) = w.slots.back_mut() {
                    last.1 = last.1.saturating_add(1);
                }
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn], non_idempotent: bool) -> RetryPolicy {
        let config = Retries {
            attempts: 2,
            on: on.to_vec(),
            status: vec![409],
            grpc: vec!["unavailable".into()],
            backoff: outrider_config::Backoff::default(),
            budget: outrider_config::RetryBudget::default(),
            body_limit: outrider_config::ByteSize(1024),
            max_retry_after: outrider_config::Duration::from_secs(30),
        };
        RetryPolicy::new(&config, non_idempotent)
    }

    #[test]
    fn post_is_retried_only_when_nothing_was_sent() {
        let p = policy(&[RetryOn::ConnectFailure, RetryOn::FiveXx], false);
        assert!(p.method_allows(&Method::POST, AttemptFailure::Connect));
        assert!(!p.method_allows(&Method::POST, AttemptFailure::Reset));
        assert!(!p.method_allows(
            &Method::PATCH,
            AttemptFailure::Status(StatusCode::BAD_GATEWAY)
        ));
        assert!(p.method_allows(&Method::PUT, AttemptFailure::Reset));
        let opted_in = policy(&[RetryOn::FiveXx], true);
        assert!(opted_in.method_allows(&Method::POST, AttemptFailure::Reset));
    }

    #[test]
    fn classifies_statuses() {
        let p = policy(&[RetryOn::GatewayError, RetryOn::RetriableStatus], false);
        assert!(p.retries_on(AttemptFailure::Status(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!p.retries_on(AttemptFailure::Status(StatusCode::INTERNAL_SERVER_ERROR)));
        assert!(p.retries_on(AttemptFailure::Status(StatusCode::CONFLICT)));
        assert!(!p.retries_on(AttemptFailure::Connect));
        assert!(p.retries_on(AttemptFailure::Grpc(14)));
        assert!(!p.retries_on(AttemptFailure::Grpc(13)));
    }

    #[test]
    fn backoff_is_jittered_under_a_growing_capped_ceiling() {
        let p = policy(&[], false);
        for _ in 0..1000 {
            assert!(p.backoff(1) < Duration::from_millis(25));
            assert!(p.backoff(2) < Duration::from_millis(50));
            assert!(p.backoff(9) < Duration::from_millis(250));
        }
    }

    #[test]
    fn backoff_is_the_draw_under_each_retrys_ceiling() {
        // Defaults: base 25 ms, max 250 ms.
        let p = policy(&[], false);
        let draws = [0, 12_500_000, 49_999_999, 249_999_999, 1];
        let retries = [1, 2, 2, 9, 40];
        let mut ceilings = Vec::new();
        let delays: Vec<_> = retries
            .iter()
            .zip(draws)
            .map(|(&retry, draw)| {
                p.backoff_with(retry, |ceiling| {
                    ceilings.push(ceiling);
                    draw
                })
            })
            .collect();
        let ns = Duration::from_nanos;
        assert_eq!(
            delays,
            [
                ns(0),
                ns(12_500_000),
                ns(49_999_999),
                ns(249_999_999),
                ns(1)
            ]
        );
        let ms = 1_000_000;
        assert_eq!(ceilings, [25 * ms, 50 * ms, 50 * ms, 250 * ms, 250 * ms]);
        // A zero ceiling waits nothing and draws nothing.
        let mut config = Retries {
            attempts: 2,
            on: Vec::new(),
            status: Vec::new(),
            grpc: Vec::new(),
            backoff: outrider_config::Backoff::default(),
            budget: outrider_config::RetryBudget::default(),
            body_limit: outrider_config::ByteSize(1024),
            max_retry_after: outrider_config::Duration::from_secs(30),
        };
        config.backoff.base = outrider_config::Duration::from_secs(0);
        let zero = RetryPolicy::new(&config, false);
        let drawn = zero.backoff_with(3, |_| panic!("a draw under a zero ceiling"));
        assert_eq!(drawn, Duration::ZERO);
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "2".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("header"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn huge_retry_after_saturates_instead_of_overflowing() {
        let mut h = HeaderMap::new();
        for (value, expected) in [
            (
                "9223372036854775807",
                Some(Duration::from_secs(i64::MAX as u64)),
            ),
            ("18446744073709551615", Some(Duration::from_secs(u64::MAX))),
            ("99999999999999999999999999", Some(Duration::MAX)),
            (" 7 ", Some(Duration::from_secs(7))),
            ("-1", None),
            ("1.5", None),
            ("", None),
        ] {
            h.insert(http::header::RETRY_AFTER, value.parse().expect("header"));
            assert_eq!(retry_after(&h), expected, "{value:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_within_the_cap_and_the_time_left() {
        let p = policy(&[RetryOn::FiveXx], false);
        let secs = Duration::from_secs;
        assert!(p.honours_retry_after(secs(30), None));
        assert!(!p.honours_retry_after(secs(31), None), "over the cap");
        assert!(!p.honours_retry_after(Duration::MAX, None));
        assert!(p.honours_retry_after(secs(1), Some(secs(2))));
        assert!(
            !p.honours_retry_after(secs(2), Some(secs(2))),
            "the retry could not start before the request timeout"
        );
        assert!(!p.honours_retry_after(Duration::MAX, Some(secs(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_at_ratio_plus_minimum() {
        let budget = RetryBudget::new(0.2, 1);
        for _ in 0..100 {
            budget.deposit();
        }
        // 20% of 100 plus 1 per second over the one second seen so far.
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 21);
        // Time passing adds the per-second minimum, not more.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
        // After a quiet window the budget starts afresh.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(budget.withdraw());
    }
}
