//! Body types on both sides of the proxy. Enums rather than boxed trait objects, so the request
//! path does not allocate for them.
//!
//! - [`ProxyBody`]: the response to the caller: the upstream's body passed through frame by frame
//!   (trailers included), optionally bounded by an idle timeout, or a small body the proxy made.
//! - [`RequestBody`]: the request to the upstream: the caller's body as is, or a replayable view
//!   of it when retries are on; either way read through [`Counted`], which counts the bytes
//!   that actually cross the proxy (a chunked or HTTP/2 body declares no length up front).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::policy::outcome::Watch;
use crate::policy::retry::ReplayBody;
use crate::policy::timeout::{self, Timer};
use crate::pool::UpstreamBody;
use crate::telemetry::Finish;

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming response body went silent for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("response body idle for more than {0:?}")]
pub struct IdleTimeout(pub Duration);

/// A response body sent to the downstream caller.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the upstream as it arrives.
    Upstream {
        /// The upstream body.
        body: UpstreamBody,
        /// Cuts the body if no frame arrives in time.
        idle: Option<IdleTimer>,
        /// Reports the exchange's outcome to the circuit breaker when the body ends.
        watch: Option<Watch>,
    },
    /// Produced by the proxy; `None` once sent.
    Full(Option<Bytes>),
    /// Any of the above, counted, and reported (metrics, access log, spans) when it ends.
    Observed(Box<Observed>),
}

/// A response body that reports its request when it ends, fails, or is dropped unfinished.
pub struct Observed {
    /// The body sent.
    pub body: ProxyBody,
    /// Data bytes sent so far.
    pub bytes: u64,
    /// The report; taken when it is made.
    pub finish: Option<Finish>,
}

impl Observed {
    /// Wraps `body` to report with `finish`.
    pub fn wrap(body: ProxyBody, finish: Finish) -> ProxyBody {
        ProxyBody::Observed(Box::new(Self {
            body,
            bytes: 0,
            finish: Some(finish),
        }))
    }
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("body", &self.body)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            // A body dropped before its end: the caller went away (or the connection broke).
            let error = (!self.body.is_end_stream())
                .then(|| "response body not finished: the caller went away".to_string());
            finish.end(self.bytes, error);
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body that was complete before anyone polled it (no content) still ends the
        // exchange cleanly.
        if let Self::Upstream {
            body,
            watch: Some(watch),
            ..
        } = self
        {
            if body.is_end_stream() {
                watch.end();
            }
        }
    }
}

/// The idle timeout of a streaming body. The timer is armed only when the body has to wait for
/// the upstream: a body whose frames are all there when asked for (most small responses) never
/// puts one in the runtime's timer wheel. It is the exchange's timer when the request had one
/// (already registered: moving it is cheaper than registering another).
#[derive(Debug)]
pub struct IdleTimer {
    /// The longest silence allowed.
    limit: Duration,
    /// When the body was made or last delivered a frame: the silence starts there.
    since: Instant,
    /// Armed at `since + limit` whenever the body waits. Between waits it may still be set
    /// for an older deadline: firing then only polls the body once more.
    timer: Timer,
}

impl IdleTimer {
    /// The body has nothing to deliver yet: ready when the silence has lasted too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        timeout::arm(
            &mut self.timer,
            timeout::deadline_after(self.since, self.limit),
        )
        .as_mut()
        .poll(cx)
    }
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(None)
    }

    /// A body holding `bytes`.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full(Some(bytes))
    }

    /// The upstream's body, bounded by `idle` when set, its end reported to `watch` if any.
    /// `timer` is the exchange's timer, if it made one: the idle timeout reuses it.
    pub fn upstream(
        body: UpstreamBody,
        idle: Option<Duration>,
        watch: Option<Watch>,
        timer: Timer,
    ) -> Self {
        Self::Upstream {
            body,
            idle: idle.map(|limit| IdleTimer {
                limit,
                since: Instant::now(),
                timer,
            }),
            watch,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream { body, idle, watch } => {
                // Whether the body ended with the frame polled, asked once: an HTTP/2 body
                // answers under its connection's lock.
                let mut ended = false;
                let polled = match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        if idle.is_some() || watch.is_some() {
                            ended = body.is_end_stream();
                        }
                        if let Some(idle) = idle {
                            // The silence starts again, unless that was the last frame (most
                            // small responses): nothing is waited for after it.
                            if !ended {
                                idle.since = Instant::now();
                            }
                        }
                        frame.map(|f| f.map_err(|e| Box::new(e) as BoxError))
                    }
                    Poll::Pending => match idle {
                        Some(idle) => match idle.poll_expired(cx) {
                            Poll::Ready(()) => {
                                Some(Err(Box::new(IdleTimeout(idle.limit)) as BoxError))
                            }
                            Poll::Pending => return Poll::Pending,
                        },
                        None => return Poll::Pending,
                    },
                };
                if let Some(watch) = watch {
                    match &polled {
                        Some(Ok(frame)) => {
                            if let Some(trailers) = frame.trailers_ref() {
                                watch.trailers(trailers);
                            }
                            // hyper stops polling a body whose length is reached, so the end
                            // is seen here rather than as a final `None`.
                            if ended {
                                watch.end();
                            }
                        }
                        Some(Err(_)) => watch.fail(),
                        None => watch.end(),
                    }
                }
                Poll::Ready(polled)
            }
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Observed(observed) => {
                let polled = Pin::new(&mut observed.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            observed.bytes += data.len() as u64;
                        }
                    }
                    Poll::Ready(Some(Err(error))) => {
                        if let Some(finish) = observed.finish.take() {
                            finish.end(observed.bytes, Some(error.to_string()));
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(finish) = observed.finish.take() {
                            finish.end(observed.bytes, None);
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Full(bytes) => bytes.is_none(),
            Self::Observed(observed) => observed.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Observed(observed) => observed.body.size_hint(),
        }
    }
}

/// The caller's request body, its data bytes counted as they are read on their way to the
/// upstream. Wraps the body as received, below any retry replay, so a retried request counts
/// its bytes once, as the caller sent them, however many attempts replay them.
pub struct Counted {
    body: Incoming,
    /// Data bytes read so far.
    seen: u64,
    /// The same, shared with the request's [`Finish`] when the access log is on.
    shared: Option<Arc<AtomicU64>>,
    /// The route's `outrider_request_bytes_total`; taken when the total is added to it.
    metric: Option<IntCounter>,
}

impl Counted {
    /// Counts `body` frame by frame (into `shared` too, when given), and into `metric` once,
    /// when the body ends, fails or is dropped unfinished (then with what passed).
    pub fn new(body: Incoming, shared: Option<Arc<AtomicU64>>, metric: &IntCounter) -> Self {
        Self {
            // A body that has already ended (most GETs) has nothing to add to the metric.
            metric: (!body.is_end_stream()).then(|| metric.clone()),
            body,
            seen: 0,
            shared,
        }
    }

    fn record(&mut self) {
        if let Some(metric) = self.metric.take() {
            // Bodiless requests skip the add on the route's shared counter.
            if self.seen > 0 {
                metric.inc_by(self.seen);
            }
        }
    }
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("body", &self.body)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // The exchange ended before the body did (upstream answered early, caller or upstream
        // went away, timeout): count what passed.
        self.record();
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut polled = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &mut polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    this.seen += len;
                    if let Some(shared) = &this.shared {
                        shared.fetch_add(len, Ordering::Relaxed);
                    }
                } else if let Some(trailers) = frame.trailers_mut() {
                    // Request headers are checked on arrival; trailers come after, here.
                    crate::headers::strip_reserved_trailers(trailers);
                }
                // hyper stops polling a body whose declared length is reached: the end is
                // seen here, not as a final `None`.
                if this.body.is_end_stream() {
                    this.record();
                }
            }
            Some(Err(_)) | None => this.record(),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body sent to an upstream.
pub enum RequestBody {
    /// The caller's body, streamed once.
    Direct(Counted),
    /// A replayable view of the caller's body (retries on).
    Replay(ReplayBody),
    /// The caller's body had ended before the request was routed: nothing to send, again and
    /// again across attempts.
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Direct(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Self::Replay(body) => Pin::new(body).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(body) => body.is_end_stream(),
            Self::Replay(body) => body.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Direct(body) => body.size_hint(),
            Self::Replay(body) => body.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}
