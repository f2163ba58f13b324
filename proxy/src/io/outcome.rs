//! How an exchange ended, as the circuit breaker counts it. A failure is a connect failure, a
//! reset, a timeout, a 5xx, or a gRPC UNAVAILABLE, INTERNAL or DEADLINE_EXCEEDED status, in the
//! response headers (trailers-only responses) or in the trailers at the end of the body. 4xx
//! and other gRPC statuses are the caller's problem, not the upstream's, and count as success.
//!
//! A verdict that needs the body (gRPC trailers, a reset mid-stream) is reached by a
//! [`Watch`] that travels inside the response body and holds the breaker permit, so the
//! request also counts against the concurrency limit until its body is done. With outlier
//! detection, a gRPC response whose status is still to come also reports to its endpoint from
//! there.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, Response, StatusCode};

use crate::core::errors::ProxyError;
use crate::io::upstream::{Endpoint, Upstream};
use crate::policy::breaker::{BreakerPermit, Outcome};
use crate::policy::timeout::BodyStall;

/// The gRPC status header (or trailer); named once rather than parsed from a string per lookup.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// gRPC codes that mean the upstream failed: DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE.
const GRPC_FAILURES: [u8; 3] = [4, 13, 14];

/// The outcome of an exchange that ended in a proxy error, or `None` when the error says
/// nothing about the upstream's health (no endpoint to try): the kind's verdict
/// ([`ErrorKind::is_upstream_failure`](crate::core::errors::ErrorKind::is_upstream_failure)).
pub fn of_error(error: &ProxyError) -> Option<Outcome> {
    error
        .kind()
        .is_upstream_failure()
        .then_some(Outcome::Failure)
}

/// The outcome as far as the response head tells: a 5xx or a failing gRPC status in the
/// headers is a failure; a gRPC status in the headers ends the exchange (trailers-only); else
/// `None`: the body decides (its trailers, or whether it ends cleanly).
pub fn of_head<B>(response: &Response<B>) -> Option<Outcome> {
    if response.status().is_server_error() {
        return Some(Outcome::Failure);
    }
    grpc(response.headers())
}

/// [`of_head`] for a head whose status is `status` and whose `grpc-status` was already read
/// ([`grpc_code`]).
pub fn of_status(status: StatusCode, grpc: Option<u8>) -> Option<Outcome> {
    if status.is_server_error() {
        return Some(Outcome::Failure);
    }
    grpc.map(of_grpc_code)
}

/// The code of a `grpc-status` in `headers` (headers or trailers), if there is a valid one.
pub fn grpc_code(headers: &HeaderMap) -> Option<u8> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// The outcome a `grpc-status` in `headers` (headers or trailers) gives, if there is one.
pub fn grpc(headers: &HeaderMap) -> Option<Outcome> {
    grpc_code(headers).map(of_grpc_code)
}

fn of_grpc_code(code: u8) -> Outcome {
    if GRPC_FAILURES.contains(&code) {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

/// Whether a response is gRPC (its status may come in the trailers).
pub fn is_grpc<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Marks a response whose endpoint awaits its outcome for outlier detection (a gRPC response
/// without a status in its headers); carried in the response's extensions.
#[derive(Clone)]
pub struct Deferred(pub Arc<Endpoint>);

/// Carries a breaker permit, and an endpoint awaiting its outcome, through the response body
/// until the exchange's outcome is known.
pub struct Watch {
    permit: Option<BreakerPermit>,
    endpoint: Option<(Arc<Upstream>, Arc<Endpoint>)>,
    verdict: Option<Outcome>,
    /// Says whether the request body was cut for the caller's silence.
    stall: Option<BodyStall>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("permit", &self.permit)
            .field("endpoint", &self.endpoint.as_ref().map(|(_, e)| e.addr))
            .field("verdict", &self.verdict)
            .finish()
    }
}

impl Watch {
    /// Watches an exchange admitted with `permit` (if a breaker is configured), whose head
    /// gave `verdict`, and whose `endpoint` awaits the outcome (if deferred); `stall` tells
    /// when the request body was cut for the caller's silence. `None` when there is nothing
    /// to watch for.
    pub fn new(
        permit: Option<BreakerPermit>,
        verdict: Option<Outcome>,
        endpoint: Option<(Arc<Upstream>, Arc<Endpoint>)>,
        stall: Option<BodyStall>,
    ) -> Option<Self> {
        (permit.is_some() || endpoint.is_some()).then_some(Self {
            permit,
            endpoint,
            verdict,
            stall,
        })
    }

    /// The body delivered trailers: a gRPC status there decides, unless the head already did.
    pub fn trailers(&mut self, trailers: &HeaderMap) {
        if self.verdict.is_none() {
            self.verdict = grpc(trailers);
        }
    }

    /// The body ended cleanly: the verdict so far, else success.
    pub fn end(&mut self) {
        let outcome = self.verdict.unwrap_or(Outcome::Success);
        self.settle(outcome);
    }

    /// The body broke (reset, idle timeout): a failure whatever the head said, unless it broke
    /// because the caller went silent mid-upload: that says nothing about the upstream, so
    /// the outcome is left as the head gave it (see `Drop`).
    pub fn fail(&mut self) {
        if self.stall.as_ref().is_some_and(|s| s.stalled().is_some()) {
            return;
        }
        self.settle(Outcome::Failure);
    }

    fn settle(&mut self, outcome: Outcome) {
        if let Some(permit) = self.permit.take() {
            permit.record(outcome);
        }
        if let Some((upstream, endpoint)) = self.endpoint.take() {
            upstream.report(&endpoint, outcome);
        }
    }
}

impl Drop for Watch {
    /// A body dropped before its end (the caller went away) keeps a verdict already reached;
    /// with none, the permit is released without an outcome.
    fn drop(&mut self) {
        if let Some(outcome) = self.verdict {
            self.settle(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use outrider_config::CircuitBreaker as BreakerConfig;

    use super::*;
    use crate::policy::breaker::{BreakerState, CircuitBreaker};

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
        let mut watch = Watch::new(permit, of_status(StatusCode::OK, None), None, Some(stall))
            .expect("a permit to watch");
        watch.fail();
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
