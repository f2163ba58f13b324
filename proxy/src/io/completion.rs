//! Where an exchange ends. The response body only observes how it ended ([`End`]: cleanly,
//! with trailers, broken, or dropped by a caller who left) and hands that to
//! [`Completion::complete`], which settles everything that waited for the end, in this order:
//!
//! 1. the circuit breaker's permit (the outcome, and the concurrency slot it held);
//! 2. the outlier report of an endpoint whose outcome was deferred to the body (gRPC);
//! 3. the pool return of the upstream's HTTP/1.1 connection, when the body ended cleanly;
//! 4. the metrics;
//! 5. the access-log line;
//! 6. the spans.
//!
//! A new concern of the way back is a field of [`Completion`] and a step here.
//!
//! The completion exists from the moment the request is routed: the exchange writes its
//! report into it, and hands it the response's health (its [`Watch`]) with the response. A
//! request whose handler is dropped before any response (an HTTP/2 caller's reset: a gRPC
//! deadline or cancel) drops its completion unfinished, which completes it as
//! [`End::Dropped`]: the same steps in the same order. Its breaker permit, still in the
//! exchange, is released without an outcome as the exchange is dropped, just before (the
//! exchange borrows the completion, so it goes first).
//!
//! An exchange that fails before any response settles its permit with `settle_failed` as it
//! answers for the upstream; that and step 1 go through `settle_health`, the one place a
//! breaker outcome is recorded.

use std::sync::Arc;

use crate::core::errors::{ErrorKind, ProxyError};
use crate::io::outcome::{self, Watch};
use crate::io::pool::UpstreamBody;
use crate::io::upstream::{Endpoint, Upstream};
use crate::policy::breaker::{BreakerPermit, Outcome};
use crate::telemetry::Finish;

/// How a response body ended, as the body saw it.
#[derive(Debug)]
pub enum End {
    /// It ended cleanly, without trailers.
    Clean,
    /// It ended with trailers, the gRPC status in them if there was one (read only when
    /// someone wants it: see [`Completion::wants_trailers`]).
    Trailers(Option<u8>),
    /// It broke after the head went out (a reset, the idle timeout, a bad chunk): its kind
    /// and text.
    Error(ErrorKind, String),
    /// It was dropped before its end: the caller went away (a reset stream: a gRPC deadline
    /// or cancel; or a closed connection), with or without a response.
    Dropped,
}

/// What waits for an exchange's end, settled once by [`Completion::complete`] (or, dropped
/// unsettled, as [`End::Dropped`]).
pub struct Completion {
    /// The breaker permit and the endpoint awaiting its outcome, when there are any; handed
    /// over with the response ([`Completion::watch`]).
    health: Option<Watch>,
    /// The request's report: metrics, access log, spans.
    finish: Finish,
    /// Settled: its drop has nothing left to do.
    settled: bool,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("health", &self.health)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Completion {
    /// The completion of a request that reports with `finish`; it has no response yet.
    pub fn new(finish: Finish) -> Self {
        Self {
            health: None,
            finish,
            settled: false,
        }
    }

    /// The request's report, for the exchange to fill in until the end.
    pub fn finish_mut(&mut self) -> &mut Finish {
        &mut self.finish
    }

    /// Settles `health` (the response's breaker permit and deferred endpoint, if any) when
    /// the exchange ends.
    pub fn watch(&mut self, health: Option<Watch>) {
        self.health = health;
    }

    /// Whether the gRPC status of trailers is read: the breaker or outlier detection may need
    /// it, and the span and access log show it for a gRPC request.
    pub fn wants_trailers(&self) -> bool {
        let finish = &self.finish;
        self.health.is_some()
            || (finish.grpc && (finish.spans.is_some() || finish.logged.is_some()))
    }

    /// Settles the exchange that ended as `end`, after `bytes` response body bytes, with
    /// `upstream` the upstream's body when the response came from one.
    pub fn complete(mut self, end: End, bytes: u64, upstream: Option<&mut UpstreamBody>) {
        self.settle(end, bytes, upstream);
        // `self` drops here, and its `finish` with it: the request is no longer in flight.
    }

    /// The steps, in order (see the module's documentation).
    fn settle(&mut self, end: End, bytes: u64, upstream: Option<&mut UpstreamBody>) {
        self.settled = true;
        // 1 and 2: the breaker permit, then the outlier report.
        if let Some(health) = self.health.take() {
            settle_upstream(health, &end);
        }
        // 3: the pool return. A broken or unfinished body leaves its connection to close.
        if let (Some(upstream), End::Clean | End::Trailers(_)) = (upstream, &end) {
            upstream.release();
        }
        let finish = &mut self.finish;
        let (cancelled, error) = match end {
            End::Clean => (false, None),
            End::Trailers(code) => {
                if finish.grpc && code.is_some() {
                    finish.grpc_status = code;
                }
                (false, None)
            }
            End::Error(kind, text) => (false, Some((kind, text))),
            End::Dropped => (true, None),
        };
        let mut ended = finish.ending(bytes, cancelled, error);
        // 4: the metrics.
        finish.count(&ended);
        // 5: the access-log line.
        finish.log(&mut ended);
        // 6: the spans.
        finish.span(ended);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // Unsettled: the request's handler was dropped before any response (the caller went
        // away), or a body was dropped without handing over its end.
        if !self.settled {
            self.settle(End::Dropped, 0, None);
        }
    }
}

/// Settles the upstream's health for an exchange that ended as `end`: the breaker permit
/// records the outcome (or is released without one), then an endpoint awaiting the outcome
/// is reported to outlier detection.
pub(crate) fn settle_upstream(health: Watch, end: &End) {
    let stalled = matches!(end, End::Error(..)) && health.stalled();
    let Watch {
        permit,
        endpoint,
        verdict,
        ..
    } = health;
    let outcome = match end {
        // A clean end: the head's verdict, else success.
        End::Clean => Some(verdict.unwrap_or(Outcome::Success)),
        // A gRPC status in the trailers decides, unless the head already did.
        End::Trailers(code) => Some(
            verdict
                .or(code.map(outcome::of_grpc_code))
                .unwrap_or(Outcome::Success),
        ),
        // A broken body fails the upstream whatever the head said, unless it broke because
        // the caller went silent mid-upload: that says nothing about the upstream, so the
        // outcome is left as the head gave it.
        End::Error(..) if stalled => verdict,
        End::Error(..) => Some(Outcome::Failure),
        // The caller went away: a verdict already reached is kept.
        End::Dropped => verdict,
    };
    settle_health(permit, endpoint, outcome);
}

/// Settles the breaker permit of an exchange that failed before any response (the proxy
/// answers for the upstream): the error's verdict ([`outcome::of_error`]), or none when it
/// says nothing about the upstream. Outlier detection heard of it with the attempt.
pub(crate) fn settle_failed(permit: Option<BreakerPermit>, error: &ProxyError) {
    settle_health(permit, None, outcome::of_error(error));
}

/// The one place a breaker outcome is recorded: `permit` records `outcome` (without an
/// outcome it is dropped: released unrecorded), then `endpoint`, awaiting it, is reported to
/// outlier detection.
fn settle_health(
    permit: Option<BreakerPermit>,
    endpoint: Option<(Arc<Upstream>, Arc<Endpoint>)>,
    outcome: Option<Outcome>,
) {
    // 1: the breaker permit.
    if let (Some(permit), Some(outcome)) = (permit, outcome) {
        permit.record(outcome);
    }
    // 2: the outlier report.
    if let (Some((upstream, endpoint)), Some(outcome)) = (endpoint, outcome) {
        upstream.report(&endpoint, outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::StatusCode;
    use outrider_config::CircuitBreaker as BreakerConfig;

    use super::*;
    use crate::policy::breaker::{BreakerState, CircuitBreaker};
    use crate::policy::timeout::BodyStall;

    fn breaker() -> Arc<CircuitBreaker> {
        let config = BreakerConfig {
            consecutive_failures: Some(1),
            failure_rate: None,
            open_for: outrider_config::Duration::from_secs(10),
            half_open_requests: 1,
            max_open_for: outrider_config::Duration::from_secs(60),
            max_concurrent_requests: None,
            max_pending_requests: None,
        };
        Arc::new(CircuitBreaker::new("svc".into(), &config))
    }

    /// A 200 whose body then breaks, with the request body cut for the caller's silence or not.
    fn broken_body(breaker: &Arc<CircuitBreaker>, stalled: bool) {
        let stall = BodyStall::new(Duration::from_secs(1));
        if stalled {
            stall.set();
        }
        let permit = breaker.try_acquire().ok();
        let verdict = outcome::of_status(StatusCode::OK, None);
        let watch = Watch::new(permit, verdict, None, Some(stall)).expect("a permit to watch");
        let reset = End::Error(ErrorKind::UpstreamResetAfterHeaders, "reset".into());
        settle_upstream(watch, &reset);
    }

    /// A 200 whose body ends as `end`, its permit from `breaker`.
    fn ended(breaker: &Arc<CircuitBreaker>, end: End) {
        let permit = breaker.try_acquire().ok();
        let verdict = outcome::of_status(StatusCode::OK, None);
        let watch = Watch::new(permit, verdict, None, None).expect("a permit to watch");
        settle_upstream(watch, &end);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_status_in_the_trailers_decides() {
        let b = breaker();
        ended(&b, End::Trailers(Some(0)));
        ended(&b, End::Trailers(None));
        ended(&b, End::Clean);
        assert_eq!(b.state(), BreakerState::Closed);
        // UNAVAILABLE.
        ended(&b, End::Trailers(Some(14)));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_who_left_before_a_verdict_says_nothing_of_the_upstream() {
        let b = breaker();
        ended(&b, End::Dropped);
        assert_eq!(b.state(), BreakerState::Closed);
        // A 5xx head had decided: the caller leaving does not undo it.
        let permit = b.try_acquire().ok();
        let verdict = outcome::of_status(StatusCode::SERVICE_UNAVAILABLE, None);
        let watch = Watch::new(permit, verdict, None, None).expect("a permit to watch");
        settle_upstream(watch, &End::Dropped);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_cut_for_the_callers_silence_is_not_the_upstreams_failure() {
        let b = breaker();
        broken_body(&b, true);
        assert_eq!(b.state(), BreakerState::Closed);
        broken_body(&b, false);
        assert_eq!(b.state(), BreakerState::Open, "any other break is");
    }
}
