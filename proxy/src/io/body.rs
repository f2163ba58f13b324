//! The response body to the caller, [`ProxyBody`]: the upstream's body passed through frame by
//! frame (trailers included), optionally bounded by an idle timeout, or a small body the proxy
//! made. An enum rather than a boxed trait object, so the request path does not allocate for
//! it. The request's way out is in [`request_body`](super::request_body).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::core::errors::{BoxError, ErrorKind};
use crate::io::completion::{Completion, End};
use crate::io::outcome;
use crate::io::pool::{UpstreamBody, UpstreamBodyError};
use crate::policy::timeout::{self, Timer};

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

/// What polling a body gives: a frame, its failure, or its end.
type Polled = Option<Result<Frame<Bytes>, BoxError>>;

/// A response body sent to the downstream caller.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the upstream as it arrives.
    Upstream {
        /// The upstream body.
        body: UpstreamBody,
        /// Cuts the body if no frame arrives in time.
        idle: Option<IdleTimer>,
    },
    /// Produced by the proxy; `None` once sent.
    Full(Option<Bytes>),
    /// Any of the above, counted, its end handed to the exchange's completion (breaker,
    /// outlier detection, metrics, access log, spans).
    Observed(Box<Observed>),
}

/// A response body that sees how it ends (cleanly, with trailers, broken, or dropped
/// unfinished) and hands that to its exchange's [`Completion`], once.
pub struct Observed {
    /// The body sent.
    pub body: ProxyBody,
    /// Data bytes sent so far.
    pub bytes: u64,
    /// Trailers came, with their gRPC status if it was read.
    pub trailers: Option<Option<u8>>,
    /// What the end settles; taken when it comes.
    pub completion: Option<Completion>,
}

impl Observed {
    /// Wraps `body` to hand its end to `completion`.
    pub fn wrap(body: ProxyBody, completion: Completion) -> ProxyBody {
        ProxyBody::Observed(Box::new(Self {
            body,
            bytes: 0,
            trailers: None,
            completion: Some(completion),
        }))
    }

    /// How a body that reached its end ended.
    fn clean_end(&self) -> End {
        match self.trailers {
            Some(code) => End::Trailers(code),
            None => End::Clean,
        }
    }

    /// Hands `end` to the completion, unless it already had the end.
    fn complete(&mut self, end: End) {
        if let Some(completion) = self.completion.take() {
            let upstream = match &mut self.body {
                ProxyBody::Upstream { body, .. } => Some(body),
                _ => None,
            };
            completion.complete(end, self.bytes, upstream);
        }
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
        if self.completion.is_some() {
            // A body complete before anyone polled it (no content), or whose last frame
            // hyper took without polling past it, ended; any other was dropped before its
            // end: the caller went away.
            let end = match self.body.is_end_stream() {
                true => self.clean_end(),
                false => End::Dropped,
            };
            self.complete(end);
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

    /// The upstream's body, bounded by `idle` when set. `timer` is the exchange's timer, if
    /// it made one: the idle timeout reuses it.
    pub fn upstream(body: UpstreamBody, idle: Option<Duration>, timer: Timer) -> Self {
        Self::Upstream {
            body,
            idle: idle.map(|limit| IdleTimer {
                limit,
                since: Instant::now(),
                timer,
            }),
        }
    }

    /// Polls a frame, and says whether the body ended with it (as the upstream body saw it:
    /// asking `is_end_stream` again would cost an HTTP/2 body its connection's lock).
    fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<(Polled, bool)> {
        match self {
            Self::Upstream { body, idle, .. } => {
                let mut ended = false;
                let polled = match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        ended = body.ended();
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
                Poll::Ready((polled, ended))
            }
            Self::Full(bytes) => Poll::Ready((bytes.take().map(|b| Ok(Frame::data(b))), true)),
            Self::Observed(observed) => {
                let polled = ready!(Pin::new(&mut **observed).poll_observed(cx));
                Poll::Ready((polled, false))
            }
        }
    }
}

impl Observed {
    /// Polls the body, counting what passes and handing its end to the completion.
    fn poll_observed(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let (polled, ended) = ready!(this.body.poll_ended(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    let read = this
                        .completion
                        .as_ref()
                        .is_some_and(Completion::wants_trailers);
                    this.trailers = Some(read.then(|| outcome::grpc_code(trailers)).flatten());
                }
                // hyper stops polling a body whose length is reached, so the end is seen
                // here rather than as a final `None`.
                if ended {
                    let end = this.clean_end();
                    this.complete(end);
                }
            }
            Some(Err(error)) => {
                if this.completion.is_some() {
                    let end = End::Error(failure_kind(error), error.to_string());
                    this.complete(end);
                }
            }
            None => {
                let end = this.clean_end();
                this.complete(end);
            }
        }
        Poll::Ready(polled)
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
            Self::Observed(observed) => Pin::new(&mut **observed).poll_observed(cx),
            body => body.poll_ended(cx).map(|(polled, _)| polled),
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
