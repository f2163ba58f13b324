//! The request body on its way to the upstream: [`Counted`] reads the caller's body, counting
//! the bytes that actually cross the proxy (a chunked or HTTP/2 body declares no length up
//! front) and cutting a body whose caller goes silent for longer than
//! `timeouts.request_body_idle`; [`ReplayHandle`] keeps a copy of it for the attempts a retry
//! policy may make; [`RequestBody`] is what one attempt sends, an enum rather than a boxed
//! trait object so the request path does not allocate for it. Whether to retry is
//! decided in `policy::retry`; this is the body that makes a retry possible.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::core::errors::BoxError;
use crate::io::tee::Tee;
use crate::policy::timeout::{self, BodyIdle, BodyStall, Timer};

/// The caller went silent in the middle of its request body for longer than
/// `timeouts.request_body_idle`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body idle for more than {}", outrider_config::Duration(*.0))]
pub struct RequestBodyIdle(pub Duration);

/// Why the caller's request body broke off on its way to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// Reading it failed: the caller went away or sent a malformed body.
    #[error(transparent)]
    Read(#[from] hyper::Error),
    /// The caller went silent for too long.
    #[error(transparent)]
    Idle(#[from] RequestBodyIdle),
}

/// The caller's request body, its data bytes counted as they are read on their way to the
/// upstream. Wraps the body as received, below any retry replay, so a retried request counts
/// its bytes once, as the caller sent them, however many attempts replay them; and so the
/// caller's silence is timed once too, whichever attempt waits for it.
pub struct Counted {
    body: Incoming,
    /// Data bytes read so far.
    seen: u64,
    /// The same, shared with the request's [`Finish`](crate::telemetry::Finish) when the access
    /// log is on.
    shared: Option<Arc<AtomicU64>>,
    /// The route's `outrider_request_bytes_total`; taken when the total is added to it.
    metric: Option<IntCounter>,
    /// Cuts the body when the caller goes silent; `None` for a body that had ended.
    idle: Option<CallerIdle>,
    /// A copy for request mirrors, on routes that have them.
    tee: Option<Box<Tee>>,
}

/// The bound on the caller's silence mid-body. As with [`IdleTimer`], the timer is armed only
/// when the body has to wait for the caller: a frame that is there when asked for costs a
/// store. The silence is timed from the poll that first found nothing, not from the last
/// frame, so time the upstream spent not asking for more (its own backpressure) is not held
/// against the caller. The timer comes from the target's pool when first needed.
struct CallerIdle {
    wait: Wait,
    timer: Timer,
    /// The limit, and where the exchange learns that the body was cut.
    stall: BodyStall,
}

/// Where the caller's body stands with respect to its silence bound.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// The last poll delivered a frame (or none has been made): no silence yet.
    Flowing,
    /// Nothing came since a poll found nothing; cut at this instant.
    Until(Instant),
    /// As `Until`, with a limit too large to give an instant: never cut.
    Unbounded,
    /// Cut: every later poll gets the error again, never a clean end.
    Expired,
}

impl CallerIdle {
    /// The body has nothing to deliver: ready when the silence has lasted too long (and from
    /// then on).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = match self.wait {
            Wait::Expired => return Poll::Ready(()),
            Wait::Unbounded => return Poll::Pending,
            // Read only when the body waits: a timer armed before the lift may still fire once,
            // and then only polls the body again.
            _ if self.stall.lifted() => return Poll::Pending,
            Wait::Until(deadline) => deadline,
            // The one clock read of a wait.
            Wait::Flowing => match Instant::now().checked_add(self.stall.limit()) {
                Some(deadline) => {
                    self.wait = Wait::Until(deadline);
                    deadline
                }
                None => {
                    self.wait = Wait::Unbounded;
                    return Poll::Pending;
                }
            },
        };
        ready!(timeout::arm(&mut self.timer, deadline).as_mut().poll(cx));
        self.wait = Wait::Expired;
        self.stall.set();
        Poll::Ready(())
    }
}

impl Counted {
    /// Counts `body` frame by frame (into `shared` too, when given), and into `metric` once,
    /// when the body ends, fails or is dropped unfinished (then with what passed); cuts it when
    /// the caller is silent for longer than `idle` allows.
    pub fn new(
        body: Incoming,
        shared: Option<Arc<AtomicU64>>,
        metric: &IntCounter,
        idle: Option<&BodyIdle>,
    ) -> Self {
        // A body that has already ended (most GETs) has nothing to add to the metric, nor to
        // wait for.
        let streams = !body.is_end_stream();
        Self {
            metric: streams.then(|| metric.clone()),
            idle: idle.filter(|_| streams).map(|idle| CallerIdle {
                wait: Wait::Flowing,
                timer: Timer::lazy(Arc::clone(&idle.timers)),
                stall: BodyStall::new(idle.limit),
            }),
            body,
            seen: 0,
            shared,
            tee: None,
        }
    }

    /// The copy of this body kept for request mirrors, set up on first use.
    pub fn tee(&mut self) -> &mut Tee {
        self.tee.get_or_insert_with(|| Box::new(Tee::new(0)))
    }

    /// What tells the exchange that this body was cut for its caller's silence; `None` when
    /// it cannot be.
    pub fn stall(&self) -> Option<BodyStall> {
        self.idle.as_ref().map(|idle| idle.stall.clone())
    }

    /// A new attempt starts sending the body: the silence it waits for starts with its own
    /// first wait, not with a wait of the attempt before (time spent retrying is not the
    /// caller's silence).
    pub fn restart_idle(&mut self) {
        if let Some(idle) = &mut self.idle {
            if !matches!(idle.wait, Wait::Expired) {
                idle.wait = Wait::Flowing;
            }
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
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        let mut polled = match &mut this.idle {
            None => ready!(Pin::new(&mut this.body).poll_frame(cx)),
            // A body cut once stays cut, even if more arrives: nothing after the cut may reach
            // the upstream as if the body went on.
            Some(idle) if matches!(idle.wait, Wait::Expired) => {
                return Poll::Ready(Some(Err(RequestBodyIdle(idle.stall.limit()).into())))
            }
            Some(idle) => match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(polled) => {
                    idle.wait = Wait::Flowing;
                    polled
                }
                Poll::Pending => {
                    ready!(idle.poll_expired(cx));
                    let limit = idle.stall.limit();
                    this.record();
                    return Poll::Ready(Some(Err(RequestBodyIdle(limit).into())));
                }
            },
        };
        match &mut polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(tee) = &mut this.tee {
                        tee.data(data);
                    }
                    let len = data.len() as u64;
                    this.seen += len;
                    if let Some(shared) = &this.shared {
                        shared.fetch_add(len, Ordering::Relaxed);
                    }
                } else if let Some(trailers) = frame.trailers_mut() {
                    // Request headers are checked on arrival; trailers come after, here.
                    crate::core::headers::strip_reserved_trailers(trailers);
                }
                // hyper stops polling a body whose declared length is reached: the end is
                // seen here, not as a final `None`.
                if this.body.is_end_stream() {
                    this.record();
                    if let Some(tee) = &mut this.tee {
                        tee.end();
                    }
                }
            }
            None => {
                this.record();
                if let Some(tee) = &mut this.tee {
                    tee.end();
                }
            }
            // A broken body is not mirrored: dropping the tee tells its subscribers.
            Some(Err(_)) => {
                this.record();
                this.tee = None;
            }
        }
        Poll::Ready(polled.map(|frame| frame.map_err(RequestBodyError::Read)))
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
    /// A whole body in memory, sent once (a request mirror's copy).
    Buffered(Option<Bytes>),
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
            Self::Buffered(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(body) => body.is_end_stream(),
            Self::Replay(body) => body.is_end_stream(),
            Self::Empty => true,
            Self::Buffered(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Direct(body) => body.size_hint(),
            Self::Replay(body) => body.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
            Self::Buffered(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Hands out the request body of each attempt of an exchange that may be retried: the first
/// attempt streams the caller's body while a copy of up to `limit` bytes is kept; later attempts
/// replay the copy and then continue with whatever the caller has not sent yet.
pub struct ReplayHandle {
    shared: Arc<Mutex<ReplayState>>,
}

/// One attempt's view of a replayable request body. Starting a new attempt fences off the
/// previous one: if its connection still polls it, it gets an error instead of bytes, so an
/// abandoned attempt can never complete with a cut body.
pub struct ReplayBody {
    shared: Arc<Mutex<ReplayState>>,
    generation: u64,
    /// Index of the next buffered chunk this attempt sends.
    position: usize,
    trailers_sent: bool,
}

/// An abandoned attempt's body was polled after a retry started.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
pub struct Superseded;

struct ReplayState {
    source: Option<Counted>,
    chunks: Vec<Bytes>,
    buffered: u64,
    limit: u64,
    /// More than `limit` bytes went through: no further attempt can be made.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    complete: bool,
    size_hint: SizeHint,
    generation: u64,
}

// Replay positions come from peers' traffic: no arithmetic here may panic.
#[cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]
impl ReplayHandle {
    /// Wraps the caller's body, keeping up to `limit` bytes for replay.
    pub fn new(source: Counted, limit: u64) -> Self {
        let size_hint = source.size_hint();
        let complete = source.is_end_stream();
        // A body declared larger than the limit can never be replayed: don't copy any of it.
        let overflowed = size_hint.lower() > limit;
        Self {
            shared: Arc::new(Mutex::new(ReplayState {
                source: Some(source),
                chunks: Vec::new(),
                buffered: 0,
                limit,
                overflowed,
                trailers: None,
                complete,
                size_hint,
                generation: 0,
            })),
        }
    }

    /// The body of the next attempt. Only call it for a retry when [`Self::is_replayable`].
    pub fn body(&self) -> ReplayBody {
        let mut state = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        state.generation = state.generation.wrapping_add(1);
        if let Some(source) = &mut state.source {
            source.restart_idle();
        }
        ReplayBody {
            shared: Arc::clone(&self.shared),
            generation: state.generation,
            position: 0,
            trailers_sent: false,
        }
    }

    /// Whether a further attempt could still be given the whole body.
    pub fn is_replayable(&self) -> bool {
        !self.shared.lock().map(|s| s.overflowed).unwrap_or(true)
    }
}

// Replay positions come from peers' traffic: no arithmetic here may panic.
#[cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]
impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut state = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if state.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if !state.overflowed && this.position < state.chunks.len() {
            let chunk = state.chunks[this.position].clone();
            this.position = this.position.saturating_add(1);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if state.complete {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(trailers) = state.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = state.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.complete = true;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !state.overflowed {
                            state.buffered = state.buffered.saturating_add(data.len() as u64);
                            if state.buffered > state.limit {
                                state.overflowed = true;
                                state.chunks = Vec::new();
                            } else {
                                state.chunks.push(data.clone());
                                this.position = state.chunks.len();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            state.trailers = Some(trailers.clone());
                            state.complete = true;
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        state.complete
            && (state.overflowed || self.position >= state.chunks.len())
            && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.lock().map(|s| s.size_hint).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::{Request, Response};
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::policy::timeout::TimerPool;

    const LIMIT: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    /// The body of a request as hyper's server hands it over, its head (and anything after it)
    /// written by a caller at the other end of an in-memory connection, who goes on writing.
    async fn received(head: &str) -> (Incoming, DuplexStream) {
        let (mut caller, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(req.into_body());
            }
            std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, Infallible>>()
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service),
        );
        caller.write_all(head.as_bytes()).await.unwrap();
        (rx.await.unwrap(), caller)
    }

    fn bounded(body: Incoming, limit: Duration, pool: &Arc<TimerPool>) -> Counted {
        let metric = IntCounter::new("request_bytes", "test").unwrap();
        let idle = BodyIdle {
            limit,
            timers: Arc::clone(pool),
        };
        Counted::new(body, None, &metric, Some(&idle))
    }

    /// Polls `body` once.
    async fn poll_once(body: &mut Counted) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
    }

    /// Reads frames until the body ends or fails: the data bytes, and the failure if any.
    async fn read_all(body: &mut Counted) -> (usize, Option<RequestBodyError>) {
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes += frame.data_ref().map_or(0, Bytes::len),
                Err(error) => return (bytes, Some(error)),
            }
        }
        (bytes, None)
    }

    fn is_idle(error: Option<&RequestBodyError>, limit: Duration) -> bool {
        matches!(error, Some(RequestBodyError::Idle(RequestBodyIdle(l))) if *l == limit)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_caller_is_cut_at_the_limit_and_stays_cut() {
        let head = format!(
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100000000\r\n\r\n{}",
            "x".repeat(1024)
        );
        let (incoming, mut caller) = received(&head).await;
        let pool = Arc::new(TimerPool::default());
        let mut body = bounded(incoming, LIMIT, &pool);
        let stall = body.stall().unwrap();
        let started = Instant::now();
        let (bytes, error) = read_all(&mut body).await;
        assert_eq!(bytes, 1024);
        assert!(is_idle(error.as_ref(), LIMIT), "{error:?}");
        assert_eq!(
            started.elapsed(),
            LIMIT,
            "cut when the silence reached the limit"
        );
        assert_eq!(stall.stalled(), Some(LIMIT), "the exchange can tell");
        // What the caller sends too late never gets through as if the body went on.
        caller.write_all(&[b'y'; 512]).await.unwrap();
        tokio::task::yield_now().await;
        let again = poll_once(&mut body).await;
        assert!(
            matches!(&again, Poll::Ready(Some(Err(RequestBodyError::Idle(_))))),
            "{again:?}"
        );
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("request body idle for more than 1s")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lifted_bound_lets_a_caller_stay_silent_even_with_a_timer_armed() {
        let (incoming, mut caller) =
            received("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n").await;
        let pool = Arc::new(TimerPool::default());
        let mut body = bounded(incoming, LIMIT, &pool);
        let stall = body.stall().unwrap();
        // Waiting arms the timer; the response then starts flowing on a gRPC stream.
        assert!(poll_once(&mut body).await.is_pending());
        stall.lift();
        tokio::spawn(async move {
            tokio::time::sleep(10 * LIMIT).await;
            caller.write_all(&[b'x'; 100]).await.unwrap();
            caller
        });
        let started = Instant::now();
        let (bytes, error) = read_all(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, 100);
        assert_eq!(
            started.elapsed(),
            10 * LIMIT,
            "waited for the caller, not cut"
        );
        assert_eq!(stall.stalled(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_caller_is_never_cut() {
        let (incoming, mut caller) =
            received("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n").await;
        let pool = Arc::new(TimerPool::default());
        let mut body = bounded(incoming, LIMIT, &pool);
        let stall = body.stall().unwrap();
        // 100 bytes every 900 ms: nine seconds in all, never a whole second of silence.
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(900 * MS).await;
                caller.write_all(&[b'x'; 100]).await.unwrap();
            }
            caller
        });
        let started = Instant::now();
        let (bytes, error) = read_all(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, 1000);
        assert_eq!(started.elapsed(), 9000 * MS);
        assert_eq!(stall.stalled(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_upstream_does_not_ask_for_more_is_not_silence() {
        let (incoming, mut caller) =
            received("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 200\r\n\r\n").await;
        let pool = Arc::new(TimerPool::default());
        let mut body = bounded(incoming, LIMIT, &pool);
        caller.write_all(&[b'x'; 100]).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(Bytes::len), Some(100));
        // Five limits with nobody asking for more (an upstream that does not read), then the
        // caller answers within one limit of being asked.
        tokio::time::sleep(5 * LIMIT).await;
        tokio::spawn(async move {
            tokio::time::sleep(900 * MS).await;
            caller.write_all(&[b'x'; 100]).await.unwrap();
            caller
        });
        let (bytes, error) = read_all(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_attempt_times_the_silence_afresh() {
        let (incoming, mut caller) =
            received("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n").await;
        let pool = Arc::new(TimerPool::default());
        let mut body = bounded(incoming, LIMIT, &pool);
        // The first attempt waits, then goes away (the upstream failed) before the limit.
        assert!(poll_once(&mut body).await.is_pending());
        tokio::time::sleep(900 * MS).await;
        // A retry starts sending the body 5 s later: its wait starts now.
        tokio::time::sleep(5 * LIMIT).await;
        body.restart_idle();
        let started = Instant::now();
        assert!(poll_once(&mut body).await.is_pending(), "not cut at once");
        let (bytes, error) = read_all(&mut body).await;
        assert_eq!(bytes, 0);
        assert!(is_idle(error.as_ref(), LIMIT), "{error:?}");
        assert_eq!(started.elapsed(), LIMIT);
        // And restarting does not undo a cut.
        body.restart_idle();
        caller.write_all(&[b'x'; 100]).await.unwrap();
        assert!(matches!(
            poll_once(&mut body).await,
            Poll::Ready(Some(Err(RequestBodyError::Idle(_))))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_past_the_end_of_the_clock_never_cuts_and_never_panics() {
        let (incoming, mut caller) =
            received("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n").await;
        let pool = Arc::new(TimerPool::default());
        let mut body = bounded(incoming, Duration::MAX, &pool);
        assert!(poll_once(&mut body).await.is_pending());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(poll_once(&mut body).await.is_pending());
        caller.write_all(&[b'x'; 10]).await.unwrap();
        let (bytes, error) = read_all(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, 10);
        assert_eq!(pool.len(), 0, "no deadline, no timer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_waited_gives_its_timer_back_for_the_next() {
        let pool = Arc::new(TimerPool::default());
        for _ in 0..2 {
            let (incoming, mut caller) =
                received("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n").await;
            let mut body = bounded(incoming, LIMIT, &pool);
            assert!(poll_once(&mut body).await.is_pending());
            assert_eq!(pool.len(), 0, "the waiting body holds the pool's timer");
            caller.write_all(&[b'x'; 10]).await.unwrap();
            let (bytes, error) = read_all(&mut body).await;
            assert!(error.is_none(), "{error:?}");
            assert_eq!(bytes, 10);
            drop(body);
            assert_eq!(pool.len(), 1, "given back");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_body_has_no_bound() {
        let (incoming, _caller) = received("GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let pool = Arc::new(TimerPool::default());
        let body = bounded(incoming, LIMIT, &pool);
        assert!(body.stall().is_none());
        assert!(body.is_end_stream());
    }
}
