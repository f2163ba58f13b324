//! A lock-free token-bucket rate limiter, implemented as GCRA (the generic cell rate
//! algorithm): one atomic "theoretical arrival time" per limiter, advanced by a
//! compare-exchange loop, so concurrent requests are counted exactly without a lock.
//!
//! With emission interval `T = 1s / requests_per_second` and tolerance `tau = T * (burst - 1)`,
//! a full bucket admits exactly `burst` requests at once and then one every `T`. Time is
//! [`tokio::time::Instant`], so tests run on paused time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outrider_config::{RateLimit, RateLimitMode};
use tokio::time::Instant;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// What a rate limiter decided about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Under the limit: let through; one token was taken.
    Allowed {
        /// The bucket size (`burst`).
        limit: u32,
        /// How many more requests could pass right now.
        remaining: u32,
    },
    /// Over the limit in enforce mode: reject with 429.
    Limited {
        /// The bucket size (`burst`).
        limit: u32,
        /// Time until one token is available.
        retry_after: Duration,
        /// Time until the bucket is full again.
        reset: Duration,
    },
    /// Over the limit in shadow mode: let through, but count it. No token was taken, so the
    /// bucket behaves exactly as it would in enforce mode.
    ShadowLimited {
        /// The bucket size (`burst`).
        limit: u32,
    },
}

/// A token bucket shared by every request of a route, service or inbound listener. Built once
/// per policy reload and shared through an `Arc`; [`RateLimiter::check`] never locks and never
/// allocates.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimit,
    /// Bucket size, at least 1.
    burst: u32,
    /// `T`: nanoseconds between two tokens.
    interval: u64,
    /// `tau`: how far ahead of now the arrival time may run, `T * (burst - 1)`.
    tolerance: u64,
    /// Origin of the nanosecond clock below.
    base: Instant,
    /// Theoretical arrival time, in nanoseconds since `base`. At or before now: the bucket is
    /// full. Starts at 0, so a new limiter starts full.
    tat: AtomicU64,
}

impl RateLimiter {
    /// Builds a full bucket from `config`; `burst` defaults to `requests_per_second`.
    ///
    /// Zero values (rejected by policy validation) are treated as 1 rather than panicking.
    /// `T` is rounded down to whole nanoseconds, so when the rate does not divide 10^9 the
    /// limiter admits at most `rps / 10^9` (relative) more than configured, never less.
    pub fn new(config: &RateLimit) -> Self {
        let rps = config.requests_per_second.max(1);
        let burst = config.burst.unwrap_or(rps).max(1);
        let interval = (NANOS_PER_SEC / u64::from(rps)).max(1);
        Self {
            config: config.clone(),
            burst,
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            base: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    /// The settings this limiter was built from, so a reload can keep the limiter (and its
    /// state) when they did not change.
    pub fn config(&self) -> &RateLimit {
        &self.config
    }

    /// Takes one token if one is available.
    pub fn check(&self) -> RateDecision {
        self.check_at(Instant::now())
    }

    /// [`RateLimiter::check`] at a given instant: the request path's clock reading, shared with
    /// the request's other policies (and tests make many threads arrive at exactly the same
    /// time with it).
    pub fn check_at(&self, now: Instant) -> RateDecision {
        let now = nanos(now.saturating_duration_since(self.base));
        // Relaxed is enough: `tat` is the only shared state, and compare-exchange on a single
        // atomic is totally ordered.
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            // An idle bucket does not save up more than `burst`: arrivals start from now.
            let start = tat.max(now);
            let ahead = start - now;
            if ahead > self.tolerance {
                return match self.config.mode {
                    RateLimitMode::Enforce => RateDecision::Limited {
                        limit: self.burst,
                        retry_after: Duration::from_nanos(ahead - self.tolerance),
                        reset: Duration::from_nanos(ahead),
                    },
                    RateLimitMode::Shadow => RateDecision::ShadowLimited { limit: self.burst },
                };
            }
            let next = start.saturating_add(self.interval);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    // Tokens left = room still under the tolerance after this one, in `T`s.
                    let room = self.tolerance - ahead;
                    let remaining = u32::try_from(room / self.interval).unwrap_or(u32::MAX);
                    return RateDecision::Allowed {
                        limit: self.burst,
                        remaining,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }
}

/// A duration in nanoseconds, saturating (u64 nanoseconds is 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn limiter(rps: u32, burst: Option<u32>, mode: RateLimitMode) -> RateLimiter {
        RateLimiter::new(&RateLimit {
            requests_per_second: rps,
            burst,
            mode,
        })
    }

    fn is_allowed(d: RateDecision) -> bool {
        matches!(d, RateDecision::Allowed { .. })
    }

    /// Checks `n` times at the current instant and counts the admissions.
    fn admitted(limiter: &RateLimiter, n: usize) -> usize {
        (0..n).filter(|_| is_allowed(limiter.check())).count()
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
    }

    #[tokio::test(start_paused = true)]
    async fn admits_exactly_burst_at_once_then_limits() {
        let l = limiter(10, Some(5), RateLimitMode::Enforce);
        for expected_remaining in (0..5).rev() {
            assert_eq!(
                l.check(),
                RateDecision::Allowed {
                    limit: 5,
                    remaining: expected_remaining
                }
            );
        }
        // T = 100ms; the next token is one T away, the bucket full again after 5 T.
        assert_eq!(
            l.check(),
            RateDecision::Limited {
                limit: 5,
                retry_after: Duration::from_millis(100),
                reset: Duration::from_millis(500),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_counts_down_to_the_next_token() {
        let l = limiter(10, Some(5), RateLimitMode::Enforce);
        assert_eq!(admitted(&l, 5), 5);
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(
            l.check(),
            RateDecision::Limited {
                limit: 5,
                retry_after: Duration::from_millis(70),
                reset: Duration::from_millis(470),
            }
        );
        tokio::time::advance(Duration::from_millis(69)).await;
        assert!(!is_allowed(l.check()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            l.check(),
            RateDecision::Allowed {
                limit: 5,
                remaining: 0
            }
        );
        assert!(!is_allowed(l.check()));
    }

    #[tokio::test(start_paused = true)]
    async fn refill_is_capped_at_burst() {
        let l = limiter(10, Some(5), RateLimitMode::Enforce);
        assert_eq!(admitted(&l, 5), 5);
        // A second idle is worth 10 tokens, but the bucket holds 5.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(admitted(&l, 20), 5);
        // Idle for much longer: still 5.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(admitted(&l, 20), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn steady_rate_admits_rps_per_second() {
        let l = limiter(10, Some(5), RateLimitMode::Enforce);
        assert_eq!(admitted(&l, 5), 5);
        // One token per 100ms: over one second, exactly 10 more.
        let mut total = 0;
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            total += admitted(&l, 3);
        }
        assert_eq!(total, 10);
        // Over ten seconds of a client retrying every 10ms: exactly 100.
        let mut total = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            total += admitted(&l, 1);
        }
        assert_eq!(total, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn burst_defaults_to_the_rate() {
        let l = limiter(4, None, RateLimitMode::Enforce);
        assert_eq!(
            l.check(),
            RateDecision::Allowed {
                limit: 4,
                remaining: 3
            }
        );
        assert_eq!(admitted(&l, 10), 3);
        assert_eq!(
            l.check(),
            RateDecision::Limited {
                limit: 4,
                retry_after: Duration::from_millis(250),
                reset: Duration::from_secs(1),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_reflects_partial_refill() {
        let l = limiter(10, Some(5), RateLimitMode::Enforce);
        assert_eq!(admitted(&l, 5), 5);
        // 250ms = 2.5 tokens back: this request takes one, one whole token is left.
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(
            l.check(),
            RateDecision::Allowed {
                limit: 5,
                remaining: 1
            }
        );
        assert_eq!(admitted(&l, 5), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_never_limits_and_tracks_the_enforced_bucket() {
        let l = limiter(10, Some(5), RateLimitMode::Shadow);
        let decisions: Vec<_> = (0..20).map(|_| l.check()).collect();
        assert!(decisions
            .iter()
            .all(|d| !matches!(d, RateDecision::Limited { .. })));
        assert_eq!(decisions.iter().filter(|d| is_allowed(**d)).count(), 5);
        assert_eq!(
            decisions[5..],
            [RateDecision::ShadowLimited { limit: 5 }; 15]
        );
        // Shadowed requests take no token: after one T, exactly one is under the limit again.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(is_allowed(l.check()));
        assert_eq!(l.check(), RateDecision::ShadowLimited { limit: 5 });
    }

    #[test]
    fn config_is_kept_for_reload_comparison() {
        let config = RateLimit {
            requests_per_second: 7,
            burst: None,
            mode: RateLimitMode::Shadow,
        };
        assert_eq!(RateLimiter::new(&config).config(), &config);
    }

    #[test]
    fn degenerate_values_do_not_panic() {
        // Validation rejects zeros and a rate above 1e9 cannot be represented in nanoseconds;
        // neither may panic.
        let zero = limiter(0, Some(0), RateLimitMode::Enforce);
        assert!(is_allowed(zero.check()));
        let huge = limiter(u32::MAX, Some(u32::MAX), RateLimitMode::Enforce);
        assert!(is_allowed(huge.check()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_checks_at_one_instant_admit_exactly_burst() {
        const TASKS: usize = 8;
        const CHECKS_PER_TASK: usize = 5_000;
        const BURST: u32 = 10_000;
        let l = Arc::new(limiter(1, Some(BURST), RateLimitMode::Enforce));
        // Every task checks at the same instant, so no refill can blur the count.
        let now = Instant::now();
        let start = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let l = Arc::clone(&l);
                let start = Arc::clone(&start);
                tokio::spawn(async move {
                    start.wait().await;
                    (0..CHECKS_PER_TASK)
                        .filter(|_| is_allowed(l.check_at(now)))
                        .count()
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.expect("task panicked");
        }
        assert_eq!(total, BURST as usize);
    }
}
