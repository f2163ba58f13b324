//! Resilience policies, each in its own module with a small interface, compiled once per policy
//! load into a [`RoutePolicy`] per route target. The order they apply in is written once, in
//! `forward.rs`: the rate limit, then injected faults, then the circuit breaker, then the attempt loop (retries with per-try and request
//! timeouts), then the idle timeout on the response body. The request body's idle bound runs
//! beside the attempt loop, on the body as the upstream connection reads it.
//!
//! Stateful policies (rate limiters, breakers) are shared through `Arc`s: one per service, route
//! or inbound listener, built by `Snapshot::build` and carried over a reload when their settings
//! did not change.
//!
//! Adding a policy: the checklist in `README.md` in this folder names every file it touches.

pub mod backoff;
pub mod breaker;
pub mod fault;
pub mod hash;
pub mod holdout;
pub mod outlier;
pub mod ratelimit;
pub mod retry;
pub mod timeout;

use std::sync::Arc;
use std::time::Duration;

use outrider_config::{Route, Service};

use self::breaker::CircuitBreaker;
use self::fault::FaultPolicy;
use self::ratelimit::RateLimiter;
use self::retry::RetryPolicy;
use self::timeout::{BodyIdle, TimerPool};

/// A rate limiter and what it protects, for the reason a rejected caller reads.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The bucket, shared by every request in its scope.
    pub limiter: Arc<RateLimiter>,
    /// `service payments`, `route checkout` or `inbound`.
    pub scope: Arc<str>,
}

/// The stateful policies of one scope, built once and shared by every target in it.
#[derive(Debug, Clone, Default)]
pub struct Stateful {
    /// The rate limit, when configured.
    pub limit: Option<Limit>,
    /// The circuit breaker and concurrency limit (services only).
    pub breaker: Option<Arc<CircuitBreaker>>,
}

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
    /// The rate limit in force: the route's when it has one, else the service's.
    pub limit: Option<Limit>,
    /// The service's circuit breaker.
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// The route's injected faults.
    pub fault: Option<FaultPolicy>,
    /// Timers reused across exchanges, when a timeout of the exchange is set.
    pub timers: Option<Arc<TimerPool>>,
    /// Bound on the caller's silence mid-body (on by default).
    pub request_body_idle: Option<BodyIdle>,
}

impl RoutePolicy {
    /// Compiles the policy of `service`, with `route`'s overrides when the target belongs to
    /// a route (dedicated and inbound listeners have none).
    /// `service_state` and `route_state` hold the limiters of the service and the route; the
    /// route's, when set, overrides the service's.
    pub fn new(
        service: Option<&Service>,
        route: Option<&Route>,
        service_state: &Stateful,
        route_state: &Stateful,
    ) -> Self {
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
            limit: route_state
                .limit
                .clone()
                .or_else(|| service_state.limit.clone()),
            breaker: service_state.breaker.clone(),
            fault: route.and_then(|r| r.fault.as_ref()).map(FaultPolicy::new),
            timers: None,
            request_body_idle: None,
        }
        .with_timers(pick(
            overrides.and_then(|o| o.request_body_idle),
            timeouts.map(|t| t.request_body_idle),
        ))
    }

    /// The inbound listener's policy: its rate limit, and the request body bound of
    /// `inbound.timeouts`.
    pub fn inbound(limit: Option<Limit>, request_body_idle: Duration) -> Self {
        Self {
            limit,
            ..Self::default()
        }
        .with_timers(Some(request_body_idle))
    }

    /// Sets up the timer pool, shared by the exchange's timeouts and the request body's bound.
    /// The exchange takes a timer only when one of its own timeouts is set: a request without
    /// a body (most) then pays nothing for the body's bound.
    fn with_timers(mut self, request_body_idle: Option<Duration>) -> Self {
        let timed = self.request_timeout.is_some()
            || self.per_try_timeout.is_some()
            || self.idle_timeout.is_some();
        self.timers = timed.then(Arc::default);
        self.request_body_idle = request_body_idle.map(|limit| BodyIdle {
            limit,
            timers: self.timers.clone().unwrap_or_default(),
        });
        self
    }
}
