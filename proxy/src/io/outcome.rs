//! How an exchange ended, as the circuit breaker counts it. A failure is a connect failure, a
//! reset, a timeout, a 5xx, or a gRPC UNAVAILABLE, INTERNAL or DEADLINE_EXCEEDED status, in the
//! response headers (trailers-only responses) or in the trailers at the end of the body. 4xx
//! and other gRPC statuses are the caller's problem, not the upstream's, and count as success.
//!
//! A verdict that needs the body (gRPC trailers, a reset mid-stream) is reached when the body
//! ends, by the exchange's completion ([`completion`](super::completion)), from a [`Watch`]
//! that holds the breaker permit until then, so the request also counts against the
//! concurrency limit until its body is done. With outlier detection, a gRPC response whose
//! status is still to come also reports to its endpoint from there.

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

/// The outcome a gRPC status `code` gives.
pub fn of_grpc_code(code: u8) -> Outcome {
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

/// Carries a breaker permit, and an endpoint awaiting its outcome, from the exchange to its
/// completion ([`completion`](super::completion)), which settles them when the response body
/// ends. It settles nothing itself: dropped unsettled, its permit is released without an
/// outcome.
pub struct Watch {
    /// The breaker's permit, holding a slot of the concurrency limit until the body is done.
    pub permit: Option<BreakerPermit>,
    /// An endpoint whose outcome outlier detection awaits (a deferred gRPC status).
    pub endpoint: Option<(Arc<Upstream>, Arc<Endpoint>)>,
    /// The outcome the response head gave, if it decided.
    pub verdict: Option<Outcome>,
    /// Says whether the request body was cut for the caller's silence.
    pub stall: Option<BodyStall>,
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

    /// Whether the request body was cut for the caller's silence: a body that broke then says
    /// nothing about the upstream.
    pub fn stalled(&self) -> bool {
        self.stall.as_ref().is_some_and(|s| s.stalled().is_some())
    }
}
