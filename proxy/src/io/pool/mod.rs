//! The connections to one endpoint: HTTP/1.1 keep-alive connections handed out one request at a
//! time, or one multiplexed HTTP/2 connection.
//!
//! Each endpoint has its own pool, so unlike hyper-util's general client there is no key to hash
//! per request, no connector to clone, and no task to spawn to return a connection: the
//! exchange's completion gives a response body's HTTP/1.1 connection back when the body ends
//! ([`UpstreamBody::release`]).
//!
//! An HTTP/1.1 request without a body (most of them) is exchanged by the request's own task on
//! the connection (`direct`); one with a body, or asking for an upgrade, goes through hyper's
//! client connection, which streams the two directions from a task of its own. Idle connections
//! of either kind wait in their own list; one left by a bodiless exchange is handed to hyper
//! when a request with a body finds no hyper connection idle.

pub mod contract;
pub(crate) mod direct;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use outrider_config::Protocol;

use crate::core::headers::{check_transfer_codings, TransferCodingError};
use crate::io::connect::{ConnectError, CountedStream, EndpointConnector};
use crate::io::request_body::RequestBody;
use contract::{may_resend, Progress};
pub use direct::DirectError;
use direct::{DirectBody, DirectConnection};

/// How often unused HTTP/1.1 connections are swept: one unused through a whole interval (idle
/// for one to two intervals) is closed. Counting sweeps rather than reading the clock keeps
/// time off the request path; a connection the upstream closed sooner is noticed when it is
/// next taken, or by the sweep.
pub const IDLE_SWEEP: Duration = Duration::from_secs(30);

/// Why a request could not be sent to an endpoint or got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened: nothing was sent, and the request comes back.
    #[error("{error}")]
    Connect {
        /// Why.
        error: ConnectError,
        /// The request, intact.
        unsent: Unsent,
    },
    /// The connection failed: handshake, reset, closed mid-exchange, invalid response.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// A bodiless exchange failed: reset, closed before or during the response, invalid
    /// response.
    #[error(transparent)]
    Direct(#[from] DirectError),
    /// The response's body carries a transfer coding the proxy does not pass on (see
    /// `direct::parse_head` for why it is refused rather than forwarded).
    #[error(transparent)]
    TransferCoding(#[from] TransferCodingError),
}

/// A request that never left because no connection could be opened, handed back so that it
/// can go to another endpoint. Boxed: it travels only on this rare path.
pub struct Unsent(pub Box<Request<RequestBody>>);

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Unsent(..)")
    }
}

impl SendError {
    fn unsent(error: ConnectError, req: Request<RequestBody>) -> Self {
        Self::Connect {
            error,
            unsent: Unsent(Box::new(req)),
        }
    }
}

/// Why a new connection could not take a request: its connect failed (then nothing was sent),
/// or its handshake did.
enum OpenError {
    Connect(ConnectError),
    Handshake(SendError),
}

impl OpenError {
    fn with_request(self, req: Request<RequestBody>) -> SendError {
        match self {
            Self::Connect(error) => SendError::unsent(error, req),
            Self::Handshake(error) => error,
        }
    }
}

impl From<hyper::Error> for OpenError {
    fn from(error: hyper::Error) -> Self {
        Self::Handshake(SendError::Http(error))
    }
}

/// Why a response body from an endpoint broke off.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    /// Read through hyper's client connection.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// Read by the request's task.
    #[error(transparent)]
    Direct(#[from] DirectError),
}

type Http1Sender = http1::SendRequest<RequestBody>;
type Http2Sender = http2::SendRequest<RequestBody>;

/// An HTTP/1.1 connection run by hyper, waiting for its next request.
struct IdleConnection {
    sender: Http1Sender,
    /// The sweep count when it was put back.
    sweep: u64,
}

/// An HTTP/1.1 connection the request's task runs, waiting for its next request.
struct IdleDirect {
    connection: Box<DirectConnection>,
    /// The sweep count when it was put back.
    sweep: u64,
}

/// The shared HTTP/2 connection, numbered so that a request that found it broken forgets
/// that one and not a newer one opened meanwhile.
#[derive(Default)]
struct Multiplexed {
    current: Option<(u64, Http2Sender)>,
    /// Connections opened so far: the last one's number.
    opened: u64,
}

/// The connections to one endpoint.
pub struct EndpointPool {
    connector: EndpointConnector,
    protocol: Protocol,
    /// Idle HTTP/1.1 connections run by hyper, most recently used at the back: reuse takes the
    /// warmest.
    idle: Mutex<VecDeque<IdleConnection>>,
    /// Idle HTTP/1.1 connections for bodiless exchanges, in the same order.
    idle_direct: Mutex<VecDeque<IdleDirect>>,
    /// The HTTP/2 connection, while it is open.
    multiplexed: Mutex<Multiplexed>,
    /// Held while the HTTP/2 connection is being opened, so a burst of requests opens one.
    opening: tokio::sync::Mutex<()>,
    /// Sweeps of the idle lists so far.
    sweeps: AtomicU64,
    /// Whether the idle reaper runs (started with the first connection).
    reaping: std::sync::Once,
}

impl EndpointPool {
    /// A pool that opens its connections with `connector` and speaks `protocol` on them.
    pub fn new(connector: EndpointConnector, protocol: Protocol) -> Arc<Self> {
        Arc::new(Self {
            connector,
            protocol,
            idle: Mutex::new(VecDeque::new()),
            idle_direct: Mutex::new(VecDeque::new()),
            multiplexed: Mutex::new(Multiplexed::default()),
            opening: tokio::sync::Mutex::new(()),
            sweeps: AtomicU64::new(0),
            reaping: std::sync::Once::new(),
        })
    }

    /// Sends `req` (for HTTP/1.1 in origin form with `Host`, for HTTP/2 with an absolute URI:
    /// as `forward::prepare` makes it) on a pooled or new connection and returns the
    /// response head; the body streams on. A request that a reused connection closed under
    /// before sending any of it goes out again on another one.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match self.protocol {
            Protocol::Http1 => self.send_http1(req).await,
            Protocol::Http2 => self.send_http2(req).await,
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let upgrade = req.headers().contains_key(header::UPGRADE);
        if req.body().is_end_stream() && !upgrade {
            return self.send_direct(req).await;
        }
        loop {
            let (mut sender, reused) = match self.checkout_http1() {
                Some(sender) => (sender, true),
                None => match self.checkout_direct().and_then(|c| c.into_io()) {
                    Some(io) => (
                        Box::pin(Self::handshake_http1(TokioIo::new(io))).await?,
                        true,
                    ),
                    // Boxed: connecting (TCP, TLS) is a large future, and the rare path;
                    // inline it would make every request's future as large.
                    None => match Box::pin(self.open_http1()).await {
                        Ok(sender) => (sender, false),
                        Err(error) => return Err(error.with_request(req)),
                    },
                },
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    // A protocol switch nobody asked for: refused as the bodiless exchange
                    // refuses it (hyper would pass it on, and the connection with it).
                    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                    if switched && !upgrade {
                        return Err(SendError::Direct(DirectError::Invalid(
                            "101 to a request that asked no upgrade",
                        )));
                    }
                    // hyper reads `gzip, chunked` as chunked and `chunked, gzip` to the close,
                    // and would leave the other coding for us to drop. Only a body without a
                    // declared length can have been framed by Transfer-Encoding. (The sender
                    // is dropped: the connection closes under a body nobody reads.)
                    let body = response.body();
                    if !body.is_end_stream() && body.size_hint().exact().is_none() {
                        check_transfer_codings(response.headers())?;
                    }
                    // After a protocol switch the connection belongs to the tunnel.
                    let reuse = (!switched).then(|| (Arc::clone(self), sender));
                    return Ok(response.map(|body| UpstreamBody {
                        kind: Kind::Http {
                            body,
                            reuse,
                            trailers_seen: false,
                        },
                        ended: false,
                    }));
                }
                Err(mut error) => match error.take_message() {
                    // The upstream closed an idle connection as we picked it: hyper gives back
                    // only a request that never left.
                    Some(unsent) if may_resend(reused, Progress::Unsent, unsent.method()) => {
                        req = unsent
                    }
                    _ => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }

    async fn send_http2(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let ((number, mut sender), reused) = match self.shared_http2() {
                Some(shared) => (shared, true),
                None => match Box::pin(self.open_http2()).await {
                    Ok(opened) => opened,
                    Err(error) => return Err(error.with_request(req)),
                },
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(response.map(|body| UpstreamBody {
                        kind: Kind::Http {
                            body,
                            reuse: None,
                            trailers_seen: false,
                        },
                        ended: false,
                    }))
                }
                Err(mut error) => match error.take_message() {
                    // The connection went away under the request (GOAWAY, closed): forget it,
                    // even if it does not say closed yet, so the next turn opens a new one.
                    Some(unsent) if reused => {
                        self.forget_http2(number);
                        req = unsent;
                    }
                    _ => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }

    /// Sends a request without a body on a connection of its own, from this task.
    async fn send_direct(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (mut parts, ended) = req.into_parts();
        loop {
            let (mut connection, reused) = match self.checkout_direct() {
                Some(connection) => (connection, true),
                None => match Box::pin(self.open_direct()).await {
                    Ok(connection) => (connection, false),
                    Err(error) => {
                        return Err(SendError::unsent(error, Request::from_parts(parts, ended)))
                    }
                },
            };
            match connection.exchange(&mut parts).await {
                Ok(head) => {
                    let body = DirectBody::new(connection, &head);
                    let pool = head.keep_alive.then(|| Arc::clone(self));
                    return Ok(head.response.map(|()| UpstreamBody {
                        kind: Kind::Direct { body, pool },
                        ended: false,
                    }));
                }
                // The upstream closed an idle connection as we picked it (it did not say so in
                // time): send again, where that is safe, on another. A new connection ends it.
                Err(error) if may_resend(reused, error.progress(), &parts.method) => {}
                Err(error) => return Err(SendError::Direct(error)),
            }
        }
    }

    /// The warmest idle bodiless-exchange connection that can take a request; closed ones are
    /// dropped on the way.
    fn checkout_direct(&self) -> Option<Box<DirectConnection>> {
        let mut idle = self
            .idle_direct
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while let Some(mut idle) = idle.pop_back() {
            if idle.connection.is_reusable() {
                return Some(idle.connection);
            }
        }
        None
    }

    /// Takes back a connection whose bodiless exchange has ended.
    fn check_in_direct(&self, connection: Box<DirectConnection>) {
        let sweep = self.sweeps.load(Ordering::Relaxed);
        self.idle_direct
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(IdleDirect { connection, sweep });
    }

    async fn open_direct(self: &Arc<Self>) -> Result<Box<DirectConnection>, ConnectError> {
        Ok(DirectConnection::new(self.connect().await?.into_inner()))
    }

    /// The warmest idle connection that can take a request; closed ones are dropped on the way.
    fn checkout_http1(&self) -> Option<Http1Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(connection) = idle.pop_back() {
            if connection.sender.is_ready() {
                return Some(connection.sender);
            }
        }
        None
    }

    /// Takes back an HTTP/1.1 connection whose exchange has ended.
    fn check_in(self: Arc<Self>, mut sender: Http1Sender) {
        if sender.is_ready() {
            self.push_idle(sender);
        } else if !sender.is_closed() {
            // The connection task has not yet seen the end of the exchange (the request body
            // may still be going out): take it back once it has. A body dropped outside the
            // runtime (at shutdown) lets its connection go instead.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if sender.ready().await.is_ok() {
                        self.push_idle(sender);
                    }
                });
            }
        }
    }

    fn push_idle(&self, sender: Http1Sender) {
        let sweep = self.sweeps.load(Ordering::Relaxed);
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(IdleConnection { sender, sweep });
    }

    async fn open_http1(self: &Arc<Self>) -> Result<Http1Sender, OpenError> {
        let io = self.connect().await.map_err(OpenError::Connect)?;
        Self::handshake_http1(io)
            .await
            .map_err(OpenError::Handshake)
    }

    /// Starts hyper's HTTP/1.1 client on `io`, with its connection task.
    async fn handshake_http1(io: TokioIo<CountedStream>) -> Result<Http1Sender, SendError> {
        let (mut sender, connection) = contract::http1_builder().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        sender.ready().await?;
        Ok(sender)
    }

    /// The open HTTP/2 connection's number and sender.
    fn shared_http2(&self) -> Option<(u64, Http2Sender)> {
        let shared = self
            .multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shared
            .current
            .as_ref()
            .filter(|(_, s)| !s.is_closed())
            .cloned()
    }

    /// Opens the HTTP/2 connection unless another request just did; the flag says whether
    /// the sender was already in use.
    async fn open_http2(self: &Arc<Self>) -> Result<((u64, Http2Sender), bool), OpenError> {
        let _opening = self.opening.lock().await;
        if let Some(shared) = self.shared_http2() {
            return Ok((shared, true));
        }
        let io = self.connect().await.map_err(OpenError::Connect)?;
        let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        sender.ready().await?;
        let mut shared = self
            .multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shared.opened += 1;
        let number = shared.opened;
        shared.current = Some((number, sender.clone()));
        Ok(((number, sender), false))
    }

    /// Drops HTTP/2 connection `number` if it is still the shared one (not a newer one).
    fn forget_http2(&self, number: u64) {
        let mut shared = self
            .multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shared.current.as_ref().is_some_and(|(n, _)| *n == number) {
            shared.current = None;
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<TokioIo<CountedStream>, ConnectError> {
        self.reaping.call_once(|| {
            tokio::spawn(reap_idle(Arc::downgrade(self)));
        });
        self.connector.connect().await
    }
}

/// Every [`IDLE_SWEEP`], for as long as the pool lives: closes the HTTP/1.1 connections that
/// stayed unused since the sweep before, and those the upstream closed.
async fn reap_idle(pool: Weak<EndpointPool>) {
    loop {
        tokio::time::sleep(IDLE_SWEEP).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let sweep = pool.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        // Put back before the previous sweep: unused for at least a whole interval.
        let recent = |put_back: u64| put_back + 2 > sweep;
        pool.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|c| recent(c.sweep) && !c.sender.is_closed());
        pool.idle_direct
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain_mut(|c| recent(c.sweep) && c.connection.is_reusable());
    }
}

/// A response body from an endpoint. It only observes its end ([`UpstreamBody::ended`]); the
/// exchange's completion gives its HTTP/1.1 connection back ([`UpstreamBody::release`]). One
/// dropped at its end without a completion (an attempt's response a retry set aside) gives it
/// back itself; one dropped before its end leaves the connection to close.
pub struct UpstreamBody {
    kind: Kind,
    /// The last frame was delivered (trailers, a frame that reached the length, or the end).
    ended: bool,
}

enum Kind {
    /// Read by hyper's client connection (HTTP/2, or an HTTP/1.1 request with a body).
    Http {
        body: Incoming,
        reuse: Option<(Arc<EndpointPool>, Http1Sender)>,
        /// Trailers came: they are the last frame, though `Incoming` does not say it ended.
        trailers_seen: bool,
    },
    /// Read by the request's task from its connection (a bodiless HTTP/1.1 request).
    Direct {
        body: DirectBody,
        /// Where the connection goes back to, if it stays open.
        pool: Option<Arc<EndpointPool>>,
    },
}

impl UpstreamBody {
    /// The body delivered its last frame: cheaper to ask than [`Body::is_end_stream`] (an
    /// HTTP/2 body answers that under its connection's lock), and known since that frame.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Gives the HTTP/1.1 connection back to its pool if the body was read to its end and the
    /// connection can take another request; else (or a second time) nothing.
    pub fn release(&mut self) {
        match &mut self.kind {
            Kind::Http { reuse, .. } => {
                if let Some((pool, sender)) = reuse.take() {
                    pool.check_in(sender);
                }
            }
            Kind::Direct { body, pool } => {
                if let Some(pool) = pool.take() {
                    if let Some(connection) = body.take_reusable() {
                        pool.check_in_direct(connection);
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Http { body, reuse, .. } => f
                .debug_struct("UpstreamBody")
                .field("body", body)
                .field("pooled", &reuse.is_some())
                .finish(),
            Kind::Direct { body, pool } => f
                .debug_struct("UpstreamBody")
                .field("ended", &body.is_end_stream())
                .field("pooled", &pool.is_some())
                .finish(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A safety net beside the completion's pool return (`io::completion`, step 3): a body
        // that ended without reaching a completion (an attempt's response set aside by a
        // retry, a mirror's response read to its end) still frees its connection; after the
        // completion's release this finds nothing to give back.
        if self.is_end_stream() {
            self.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Http {
                body,
                reuse,
                trailers_seen,
            } => {
                let polled = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &polled {
                    // A caller's server need not poll again after trailers, the last frame.
                    Some(Ok(frame)) if frame.is_trailers() => {
                        *trailers_seen = true;
                        this.ended = true;
                    }
                    // hyper stops polling a body whose length is reached: the end is seen here.
                    Some(Ok(_)) => this.ended = body.is_end_stream(),
                    None => this.ended = true,
                    // A broken body leaves a broken connection.
                    Some(Err(_)) => *reuse = None,
                }
                Poll::Ready(polled.map(|frame| frame.map_err(UpstreamBodyError::Http)))
            }
            Kind::Direct { body, .. } => {
                let polled = ready!(body.poll_frame(cx));
                this.ended = body.is_end_stream();
                Poll::Ready(polled.map(|frame| frame.map_err(UpstreamBodyError::Direct)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Http {
                body,
                trailers_seen,
                ..
            } => *trailers_seen || body.is_end_stream(),
            Kind::Direct { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Http { body, .. } => body.size_hint(),
            Kind::Direct { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::telemetry::metrics::Metrics;

    /// An upstream answering each request with an empty 200 on a keep-alive connection; it
    /// reports each connection's end (the proxy closed it).
    async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed, ends) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        head.extend_from_slice(&buf[..n]);
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    }
                    let _ = closed.send(());
                });
            }
        });
        (addr, ends)
    }

    fn http1_pool(addr: SocketAddr) -> Arc<EndpointPool> {
        let metrics = Metrics::new("test").unwrap();
        let connector = EndpointConnector::new(
            addr,
            Duration::from_secs(1),
            metrics.connections("svc", &addr.to_string()),
            None,
        );
        EndpointPool::new(connector, Protocol::Http1)
    }

    async fn get(pool: &Arc<EndpointPool>) {
        let req = Request::get("/")
            .header("host", "svc")
            .body(RequestBody::Empty)
            .unwrap();
        let response = pool.send(req).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }

    fn idle(pool: &EndpointPool) -> usize {
        pool.idle_direct.lock().unwrap().len()
    }

    /// Moves the paused clock on by one sweep interval and lets the reaper run.
    async fn sweep() {
        // The timer rounds a deadline up to the next millisecond.
        tokio::time::advance(IDLE_SWEEP + Duration::from_millis(1)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_connection_is_closed_after_a_whole_unused_sweep_interval() {
        let (addr, mut ends) = upstream().await;
        let pool = http1_pool(addr);
        get(&pool).await;
        assert_eq!(idle(&pool), 1);

        // Put back before the first sweep: kept by it, as it may have been used just before.
        tokio::time::pause();
        sweep().await;
        assert_eq!(pool.sweeps.load(Ordering::Relaxed), 1);
        assert_eq!(idle(&pool), 1);

        // Used again between sweeps: the next sweep keeps it too.
        tokio::time::resume();
        get(&pool).await;
        assert_eq!(idle(&pool), 1, "the same connection was reused");
        tokio::time::pause();
        sweep().await;
        assert_eq!(pool.sweeps.load(Ordering::Relaxed), 2);
        assert_eq!(idle(&pool), 1);
        assert!(ends.try_recv().is_err(), "closed while in use");

        // Unused through a whole interval: closed, and the upstream sees it close.
        sweep().await;
        assert_eq!(pool.sweeps.load(Ordering::Relaxed), 3);
        assert_eq!(idle(&pool), 0);
        tokio::time::resume();
        tokio::time::timeout(Duration::from_secs(5), ends.recv())
            .await
            .expect("the upstream saw the connection close")
            .unwrap();

        // The next request opens a new connection.
        get(&pool).await;
        assert_eq!(idle(&pool), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_reaper_ends_with_its_pool() {
        let (addr, _ends) = upstream().await;
        let pool = http1_pool(addr);
        get(&pool).await;
        let weak = Arc::downgrade(&pool);
        drop(pool);
        tokio::time::pause();
        sweep().await;
        assert!(weak.upgrade().is_none(), "the reaper keeps its pool alive");
        // Left: the upstream's accept loop, and its connection task until it reads the close.
        tokio::time::resume();
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while alive() > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(alive(), 1, "the reaper outlived its pool");
    }
}
