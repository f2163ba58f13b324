//! Sending one attempt of a request to one endpoint, behind [`SendAttempt`]: the seam between
//! the exchange's policies (`http::forward`: breaker, retries, backoff, timeouts, Retry-After,
//! budget) and the wire. Production sends through the endpoint's pool ([`Pool`]); unit tests
//! put a scripted endpoint there, so the policies' composition runs on paused time with no
//! sockets. Statically dispatched: the request path is monomorphized for [`Pool`].

use std::future::Future;
use std::time::Duration;

use http::{Request, Response};

use crate::core::errors::ProxyError;
use crate::io::body::ProxyBody;
use crate::io::classify;
use crate::io::pool::{Unsent, UpstreamBody};
use crate::io::request_body::RequestBody;
use crate::io::upstream::Endpoint;
use crate::policy::retry::AttemptFailure;
use crate::policy::timeout::Timer;

/// How an attempt failed: the error, how it counts for retries, and the request itself when
/// no connection could be opened (nothing was sent).
pub(crate) struct Failed {
    /// What went wrong.
    pub error: ProxyError,
    /// How it counts for the retry decision.
    pub failure: AttemptFailure,
    /// The request, when it never left (it may go to another endpoint at once).
    pub unsent: Option<Unsent>,
}

/// Sends one attempt of a request to one endpoint, up to the response head. Timeouts are not
/// its business (the exchange bounds the future it returns), nor is outlier or breaker
/// reporting (the exchange reads the result).
pub(crate) trait SendAttempt: Copy {
    /// The response body an attempt brings back.
    type Body;

    /// Sends `req` to `endpoint`: the response head, or how it failed.
    fn send(
        self,
        endpoint: &Endpoint,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<Self::Body>, Failed>> + Send;

    /// The body handed to the caller for an attempt's `body`: cut after `idle` without a
    /// frame; `timer` is the exchange's, for reuse. Its end goes to the exchange's completion
    /// (`io::completion`), which the exchange hands the response's health.
    fn respond(body: Self::Body, idle: Option<Duration>, timer: Timer) -> ProxyBody;
}

/// The production sender: through the endpoint's connection pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pool;

impl SendAttempt for Pool {
    type Body = UpstreamBody;

    /// Sends through `endpoint`'s pool, counted in its load while it waits.
    async fn send(
        self,
        endpoint: &Endpoint,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        let _in_flight = endpoint.start_request();
        let result = endpoint.pool.send(req).await;
        result.map_err(|e| {
            let (error, unsent) = classify::send_error(e, endpoint.addr);
            Failed {
                failure: AttemptFailure::of(error.kind()),
                error,
                unsent,
            }
        })
    }

    fn respond(body: UpstreamBody, idle: Option<Duration>, timer: Timer) -> ProxyBody {
        ProxyBody::upstream(body, idle, timer)
    }
}
