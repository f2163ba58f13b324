//! Resilience policies, each in its own module with a small interface, compiled once per policy
//! load into a [`RoutePolicy`] per route target. The order they apply in is written once, in
//! `forward.rs`: the attempt loop (retries with per-try and request timeouts), then the idle
//! timeout on the response body.
//!
//! `ratelimit` (GCRA token bucket) and `breaker` (circuit breaker with concurrency limit) are
//! complete and unit-tested on paused time, but not yet placed on the request path: they will
//! go in front of the attempt loop, built per service and route in `RoutePolicy`.

pub mod breaker;
pub mod ratelimit;
pub mod retry;

use std::time::Duration;

use outrider_config::{Route, Service};

use self::retry::RetryPolicy;

/// Everything the request path needs to apply policy to one target of one route.
#[derive(Debug, Default)]
pub struct RoutePolicy {
    /// Bound on the whole exchange (every attempt and backoff) until response headers.
    pub request_timeout: Option<Duration>,
    /// Bound on one attempt until its response headers.
    pub per_try_timeout: Option<Duration>,
    /// Bound on silence while the response body streams.
    pub idle_timeout: Option<Duration>,
    /// Retries, when configured.
    pub retry: Option<RetryPolicy>,
}

impl RoutePolicy {
    /// Compiles the policy of `service`, with `route`'s overrides when the target belongs to
    /// a route (dedicated and inbound listeners have none).
    pub fn new(service: Option<&Service>, route: Option<&Route>) -> Self {
        let timeouts = service.map(|s| &s.timeouts);
        let overrides = route.and_then(|r| r.timeouts.as_ref());
        let pick = |over: Option<outrider_config::Duration>,
                    base: Option<outrider_config::Duration>| {
            over.or(base).map(outrider_config::Duration::get)
        };
        let retries = route
            .and_then(|r| r.retries.as_ref())
            .or_else(|| service.and_then(|s| s.retries.as_ref()));
        let non_idempotent = route.is_some_and(|r| r.retry_non_idempotent);
        Self {
            request_timeout: pick(
                overrides.and_then(|o| o.request),
                timeouts.and_then(|t| t.request),
            ),
            per_try_timeout: pick(
                overrides.and_then(|o| o.per_try),
                timeouts.and_then(|t| t.per_try),
            ),
            idle_timeout: pick(
                overrides.and_then(|o| o.idle),
                timeouts.and_then(|t| t.idle),
            ),
            retry: retries
                .filter(|r| r.attempts > 0)
                .map(|r| RetryPolicy::new(r, non_idempotent)),
        }
    }
}
