//! The response body to the caller, [`ProxyBody`]: the upstream's body passed through frame by
//! frame (trailers included), optionally bounded by an idle timeout, or a small body the proxy
//! made. An enum rather than a boxed trait object, so the request path does not allocate for
//! it. The request's way out is in [`request_body`](super::request_body).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::core::errors::{BoxError, ErrorKind};
use crate::io::outcome::Watch;
use crate::io::pool::{UpstreamBody, UpstreamBodyError};
use crate::policy::timeout::{self, Timer};
use crate::telemetry::Finish;

/// A streaming response body went silent for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("response body idle for more than {0:?}")]
pub struct IdleTimeout(pub Duration);

/// The kind of a response body's failure (after the response head went out): the idle
/// timeout, a response that stopped being valid HTTP (a bad chunk), or a connection that broke.
pub fn failure_kind(error: &BoxError) -> ErrorKind {
    if error.is::<IdleTimeout>() {
        return ErrorKind::ResponseBodyIdle;
    }
    let invalid = match error.downcast_ref::<UpstreamBodyError>() {
        Some(UpstreamBodyError::Http(error)) => error.is_parse(),
        Some(UpstreamBodyError::Direct(error)) => error.is_invalid(),
        None => false,
    };
    match invalid {
        true => ErrorKind::UpstreamProtocol,
        false => ErrorKind::UpstreamResetAfterHeaders,
    }
}

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
        if let Some(mut finish) = self.finish.take() {
            // A body dropped before its end: the caller went away (a reset stream: a gRPC
            // deadline or cancel; or a closed connection).
            finish.cancelled = !self.body.is_end_stream();
            finish.end(self.bytes, None);
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
                        } else if let (Some(trailers), Some(finish)) =
                            (frame.trailers_ref(), &mut observed.finish)
                        {
                            let wanted = finish.spans.is_some() || finish.logged.is_some();
                            if finish.grpc && wanted {
                                if let Some(code) = crate::io::outcome::grpc_code(trailers) {
                                    finish.grpc_status = Some(code);
                                }
                            }
                        }
                    }
                    Poll::Ready(Some(Err(error))) => {
                        if let Some(finish) = observed.finish.take() {
                            let kind = failure_kind(error);
                            finish.end(observed.bytes, Some((kind, error.to_string())));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::pool::DirectError;

    #[test]
    fn a_broken_body_is_classified_by_its_type() {
        let idle: BoxError = Box::new(IdleTimeout(Duration::from_secs(1)));
        assert_eq!(failure_kind(&idle), ErrorKind::ResponseBodyIdle);
        let truncated: BoxError = Box::new(UpstreamBodyError::Direct(DirectError::Truncated));
        assert_eq!(
            failure_kind(&truncated),
            ErrorKind::UpstreamResetAfterHeaders
        );
        let invalid: BoxError = Box::new(UpstreamBodyError::Direct(DirectError::Invalid(
            "bad chunk size",
        )));
        assert_eq!(failure_kind(&invalid), ErrorKind::UpstreamProtocol);
    }
}
