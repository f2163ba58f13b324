//! What happens to a connection between `accept` and hyper, and the limits that hold for its
//! whole life: the per-listener connection caps (each listener has its own budget, so a flood
//! on one never starves another), TCP keepalive, the deadline on the first request head
//! (protocol detection and the HTTP/1.1 head or HTTP/2 preface are read here, before hyper
//! allocates anything for the connection), the 408 for a head that came too slowly, the
//! bounded logging of refusals, and [`Gated`], which keeps what a connection's task waits on
//! besides hyper cheap to poll.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::telemetry::metrics::ListenerMetrics;

/// The HTTP/2 connection preface a prior-knowledge client starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sent when a request head did not arrive in time and some of it did (RFC 9110 §15.5.9).
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
    x-outrider-error: request head not received in time\r\n\
    connection: close\r\ncontent-length: 0\r\n\r\n";

/// Longest a 408 (or a GOAWAY) may take to leave before the connection is cut anyway: the peer
/// may not be reading.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Pause after a failed accept (out of descriptors, most likely) instead of spinning.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Descriptors kept back from the connection caps for the process itself: listeners, the
/// runtime, the control-plane stream, the access log, the policy watcher, DNS.
pub const RESERVED_FDS: u64 = 64;
/// Default cap of the admin listener (probes and scrapes open few connections).
pub const DEFAULT_ADMIN_CONNECTIONS: u32 = 64;
/// The derived default cap of each data listener never exceeds this: an accepted connection
/// costs memory too (about 20 KiB while idle, measured), not only a descriptor.
pub const MAX_DERIVED_CONNECTIONS: u32 = 16_384;
/// Nor goes below this, however low the descriptor limit.
const MIN_DERIVED_CONNECTIONS: u32 = 8;

/// The kernel's queue of connections accepted but not yet taken by the proxy, per listener.
/// tokio's `TcpListener::bind` asks for 128 (libc's `SOMAXCONN`), while Linux allows 4096
/// (`net.core.somaxconn`): a burst of more connections than that (a flood, or many pods' clients
/// reconnecting at once) overflows the queue, and connections completed by SYN cookies are then
/// dropped with no trace on the proxy's side while their clients believe them established. 1024
/// is Envoy's and Linkerd's choice; the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listening socket on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (as tokio's
/// `TcpListener::bind` sets it). Must be called within the runtime.
pub fn listen(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Like [`listen`] on an IPv6 `addr` that takes IPv6 only (`IPV6_V6ONLY`), so it can sit beside
/// an IPv4 listener on the same port.
pub fn listen_v6_only(addr: std::net::SocketAddrV6) -> io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    socket2::SockRef::from(&socket).set_only_v6(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr.into())?;
    socket.listen(LISTEN_BACKLOG)
}

/// TCP keepalive on accepted and upstream sockets: the first probe after this much silence...
const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// ...then one probe this often...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and the peer is declared dead after this many unanswered: within 90 s of silence.
const KEEPALIVE_PROBES: u32 = 3;

/// Deadlines of a downstream connection's phases (bootstrap flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// From accept to the first complete request head: inbound TLS sniff and handshake,
    /// protocol detection, the HTTP/1.1 head or the HTTP/2 preface and first HEADERS.
    pub header_read: Duration,
    /// A connection with no request in progress for this long is closed (HTTP/1.1: between
    /// a response and the next complete head; HTTP/2: no open stream, then GOAWAY).
    pub idle: Duration,
    /// HTTP/2 PING interval, so a dead peer is found even while a stream is open.
    pub http2_keepalive_interval: Duration,
    /// A PING not acknowledged within this closes the HTTP/2 connection.
    pub http2_keepalive_timeout: Duration,
    /// Longest wait for a captured connection's first bytes to tell its protocol; then it is
    /// proxied as opaque TCP.
    pub detect: Duration,
    /// A connection proxied as opaque TCP with nothing moving either way for this long is
    /// closed.
    pub tcp_idle: Duration,
}

/// Default of [`ConnectionTimeouts::detect`]: clients that speak first (HTTP, TLS) write their
/// first bytes right after connecting, well within it on a loaded node; a server-first protocol
/// on a port not in `opaque_ports` waits this long once per connection for its greeting.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default of [`ConnectionTimeouts::tcp_idle`]: Envoy's TCP proxy default. Database pools keep
/// idle connections for minutes; TCP keepalive still finds dead peers sooner.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            detect: DEFAULT_DETECT_TIMEOUT,
            tcp_idle: DEFAULT_TCP_IDLE_TIMEOUT,
        }
    }
}

/// The most connections each listener holds open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The inbound port.
    pub inbound: u32,
    /// The shared outbound port and every dedicated service port, together.
    pub outbound: u32,
    /// The admin port.
    pub admin: u32,
}

impl ConnectionLimits {
    /// The defaults for a process that may open `fd_limit` descriptors, with `admin` for the
    /// admin port: after [`RESERVED_FDS`] and the admin cap, half of what is left is for downstream connections
    /// and half for the upstream connections they lead to (one each, for HTTP/1.1); the
    /// downstream half is split evenly between inbound and outbound. Each cap is at least 8
    /// and at most [`MAX_DERIVED_CONNECTIONS`]. With 1024 descriptors: 224 inbound, 224
    /// outbound, 64 admin.
    pub fn for_fd_limit(fd_limit: u64, admin: u32) -> Self {
        let downstream = fd_limit
            .saturating_sub(RESERVED_FDS)
            .saturating_sub(u64::from(admin))
            / 2;
        let each = u32::try_from(downstream / 2)
            .unwrap_or(u32::MAX)
            .clamp(MIN_DERIVED_CONNECTIONS, MAX_DERIVED_CONNECTIONS);
        Self {
            inbound: each,
            outbound: each,
            admin,
        }
    }

    /// Descriptors these caps may take at worst: every connection, plus one upstream
    /// connection per data-plane connection, plus the reserve.
    pub fn descriptors_needed(&self) -> u64 {
        let data = u64::from(self.inbound) + u64::from(self.outbound);
        data.saturating_mul(2)
            .saturating_add(u64::from(self.admin))
            .saturating_add(RESERVED_FDS)
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::for_fd_limit(1024, DEFAULT_ADMIN_CONNECTIONS)
    }
}

/// The connection deadlines and every listener's budget, shared by the accept loops.
pub struct Connections {
    /// Deadlines of each connection's phases.
    pub timeouts: ConnectionTimeouts,
    /// The inbound port's budget.
    pub inbound: Arc<ConnectionBudget>,
    /// The budget the shared outbound port and the dedicated ports draw from.
    pub outbound: Arc<ConnectionBudget>,
    /// The admin port's budget.
    pub admin: Arc<ConnectionBudget>,
}

impl Connections {
    /// Budgets of `limits`, counted in `metrics`.
    pub fn new(
        timeouts: ConnectionTimeouts,
        limits: ConnectionLimits,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> Self {
        let budget = |name, max| ConnectionBudget::new(name, max, metrics.listener(name));
        Self {
            timeouts,
            inbound: budget("inbound", limits.inbound),
            outbound: budget("outbound", limits.outbound),
            admin: budget("admin", limits.admin),
        }
    }
}

/// One listener's connection budget: a counter checked at accept, no lock.
pub struct ConnectionBudget {
    listener: &'static str,
    max: u32,
    open: AtomicU32,
    /// Open and refused connections, and those closed by a deadline.
    pub metrics: ListenerMetrics,
}

impl ConnectionBudget {
    /// A budget of `max` connections for `listener`, counted in `metrics`.
    pub fn new(listener: &'static str, max: u32, metrics: ListenerMetrics) -> Arc<Self> {
        Arc::new(Self {
            listener,
            max,
            open: AtomicU32::new(0),
            metrics,
        })
    }

    /// The listener's name (metrics label, logs).
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// The cap.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// A slot for one more connection, or `None` (counted) when the listener is at its cap.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        // Relaxed: the counter guards no other data.
        let acquired = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !acquired {
            self.metrics.rejected.inc();
            return None;
        }
        self.metrics.active.inc();
        Some(ConnectionSlot(Arc::clone(self)))
    }
}

impl ConnectionBudget {
    /// Logs a refused connection, at most once a second with the count.
    pub fn log_refusal(&self, limiter: &mut LogLimiter) {
        if let Some(refused) = limiter.hit(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                max = self.max,
                refused,
                "connections refused: the listener is at its connection cap"
            );
        }
    }
}

/// One open connection of a listener; gives its place back when dropped (with the socket: an
/// upgraded connection keeps it while it lives).
pub struct ConnectionSlot(Arc<ConnectionBudget>);

impl ConnectionSlot {
    /// The budget this slot is part of.
    pub fn budget(&self) -> &Arc<ConnectionBudget> {
        &self.0
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}

/// Lets one log line through per second and says how many events it stands for, so a flood of
/// refusals or accept errors cannot flood the log.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    const EVERY: Duration = Duration::from_secs(1);

    /// A limiter that lets the first line through (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    /// Records one event at `now`; `Some(n)` when a line is due, for the `n` events since the
    /// last one (this one included).
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.suppressed = self.suppressed.saturating_add(1);
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= Self::EVERY);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Turns on TCP keepalive so a peer that vanished (host down, cable cut, NAT entry dropped)
/// is found and its connection freed, on accepted and upstream sockets alike.
pub fn set_keepalive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot set TCP keepalive");
    }
}

/// The instant `after` from now, or a day away when that does not fit (a huge flag value).
pub fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

/// What the bytes before hyper showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstHead {
    /// A complete HTTP/1.1 request head (or more than hyper will take, which it answers 431).
    Http1,
    /// The HTTP/2 preface.
    Http2,
    /// The peer closed (or the read failed) before either.
    Closed,
    /// The deadline passed first.
    TimedOut,
}

/// The first read of a connection: what it is and the bytes read so far, for hyper to read
/// again.
pub struct FirstRead {
    /// What the bytes showed.
    pub head: FirstHead,
    /// Everything read.
    pub bytes: Bytes,
}

impl FirstRead {
    /// A timed-out read that got part of an HTTP/1.1 head: a 408 can be answered.
    pub fn partial_http1(&self) -> bool {
        self.head == FirstHead::TimedOut && !self.bytes.is_empty() && !is_h2_prefix(&self.bytes)
    }
}

/// Reads until the first request head is complete (HTTP/1.1) or the HTTP/2 preface is in,
/// by `deadline`.
pub async fn read_first_head<T: AsyncRead + Unpin>(io: &mut T, deadline: Instant) -> FirstRead {
    read_first_head_after(io, BytesMut::new(), deadline).await
}

/// [`read_first_head`] on a connection whose first bytes, `buf`, were read already (protocol
/// detection on a captured connection).
pub async fn read_first_head_after<T: AsyncRead + Unpin>(
    io: &mut T,
    mut buf: BytesMut,
    deadline: Instant,
) -> FirstRead {
    if let Some(head) = (!buf.is_empty()).then(|| classify(&buf, 0)).flatten() {
        return FirstRead {
            head,
            bytes: buf.freeze(),
        };
    }
    let head = tokio::time::timeout_at(deadline, fill(io, &mut buf))
        .await
        .unwrap_or(FirstHead::TimedOut);
    FirstRead {
        head,
        bytes: buf.freeze(),
    }
}

async fn fill<T: AsyncRead + Unpin>(io: &mut T, buf: &mut BytesMut) -> FirstHead {
    loop {
        let searched = buf.len();
        // Small: most heads are a few hundred bytes; the buffer grows for larger ones.
        buf.reserve(1024);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return FirstHead::Closed,
            Ok(_) => {}
        }
        if let Some(head) = classify(buf, searched) {
            return head;
        }
    }
}

fn is_h2_prefix(buf: &[u8]) -> bool {
    let n = buf.len().min(H2_PREFACE.len());
    buf[..n] == H2_PREFACE[..n]
}

/// What `buf` is, if that is known yet; bytes before `searched` were looked at already.
fn classify(buf: &[u8], searched: usize) -> Option<FirstHead> {
    if is_h2_prefix(buf) {
        return (buf.len() >= H2_PREFACE.len()).then_some(FirstHead::Http2);
    }
    if buf.len() >= crate::core::headers::MAX_HEADER_BYTES || head_complete(buf, searched) {
        return Some(FirstHead::Http1);
    }
    None
}

/// Whether `buf` holds a request line and headers up to the empty line that ends them. Empty
/// lines before the request line do not count (RFC 9112 §2.2 lets a server ignore them).
fn head_complete(buf: &[u8], searched: usize) -> bool {
    let Some(start) = buf.iter().position(|&b| b != b'\r' && b != b'\n') else {
        return false;
    };
    // The end may straddle the previous read: look back up to 2 bytes.
    let from = searched.saturating_sub(2).max(start);
    let rest = &buf[from..];
    rest.windows(2).any(|w| w == b"\n\n") || rest.windows(3).any(|w| w == b"\n\r\n")
}

/// Answers 408 and closes, within [`CLOSE_GRACE`].
pub async fn answer_request_timeout<T: AsyncWrite + Unpin>(io: &mut T) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        io.write_all(REQUEST_TIMEOUT).await?;
        io.shutdown().await
    })
    .await;
}

/// A future polled only after it has woken its task, not each time the task is polled.
///
/// hyper wakes a connection's task several times per request, and the task polls everything it
/// waits on each time. What it waits on besides hyper (the shutdown signal, the HTTP/2 idle
/// watch, hyper's HTTP/2 keepalive timer) wakes it about never, yet polling each of those
/// takes a lock or a waker clone; behind this, such a poll is a load and a compare. The future gets
/// a waker of its own, which notes that it was woken and then wakes the task. One allocation,
/// when made.
pub struct Gated<F> {
    future: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    /// `flag` as a waker, for the future's polls.
    waker: Waker,
    /// The task waker `flag` holds, if it holds one: registering the same again would cost
    /// two atomic swaps per poll. (A wake takes it from `flag`, and the next poll, seeing the
    /// wake, registers it again.)
    registered: Option<Waker>,
}

struct WakeFlag {
    /// The future woke (or has yet to be polled): poll it at the next turn.
    woken: AtomicBool,
    /// The task that polls the future.
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Gated<F> {
    /// `future`, polled at the first poll and then only after it wakes.
    pub fn new(future: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            future: Box::pin(future),
            waker: Waker::from(Arc::clone(&flag)),
            flag,
            registered: None,
        }
    }

    /// The future, to change it; it is polled at the next poll.
    pub fn inner_mut(&mut self) -> Pin<&mut F> {
        self.flag.woken.store(true, Ordering::Relaxed);
        self.future.as_mut()
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let woken = this.flag.woken.load(Ordering::Acquire);
        // Registered before the flag is cleared: a wake in between is not lost. Unless woken,
        // `flag` still holds the waker registered last.
        let current = this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if woken || !current {
            this.flag.task.register(cx.waker());
            this.registered = Some(cx.waker().clone());
        }
        // The swap (ordered before the future's poll) clears the flag only when it is set.
        if !woken || !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.future
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

/// hyper's timer for HTTP/2 connections: tokio's sleeps, [`Gated`]. hyper polls its keepalive
/// sleep each time it polls the connection, several times per request, for a deadline a
/// keepalive interval away.
#[derive(Debug, Clone, Copy, Default)]
pub struct GatedTimer;

/// A tokio sleep behind [`Gated`], for hyper.
struct GatedSleep(Gated<tokio::time::Sleep>);

impl Future for GatedSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.get_mut().0).poll(cx)
    }
}

impl hyper::rt::Sleep for GatedSleep {}

impl hyper::rt::Timer for GatedTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(GatedSleep(Gated::new(tokio::time::sleep(duration))))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = Instant::from_std(deadline);
        Box::pin(GatedSleep(Gated::new(tokio::time::sleep_until(deadline))))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<GatedSleep>() {
            Some(gated) => gated
                .get_mut()
                .0
                .inner_mut()
                .reset(Instant::from_std(new_deadline)),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// The streams of one HTTP/2 connection: how many were started and how many are open (until
/// their response body is done), for the idle timeout. Per connection, not per request.
#[derive(Debug, Default)]
pub struct StreamCount {
    started: AtomicU64,
    open: AtomicU32,
}

impl StreamCount {
    /// Counts a stream open until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> OpenStream {
        // Relaxed: counters only, read by the connection's own idle check.
        self.started.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(self))
    }
}

/// One open stream; see [`StreamCount`].
#[derive(Debug)]
pub struct OpenStream(Arc<StreamCount>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why an HTTP/2 connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request within the header-read timeout.
    HeaderRead,
    /// No open stream for the idle timeout.
    Idle,
}

impl Expiry {
    /// `header_read` or `idle`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeaderRead => "header_read",
            Self::Idle => "idle",
        }
    }
}

/// Watches an HTTP/2 connection's streams: the first must start by the header-read deadline,
/// and the connection expires once no stream has been open for the idle timeout. Checked on a
/// timer a quarter of the idle timeout apart, so the close comes between 1 and 1.25 idle
/// timeouts after the last stream ended, without reading the clock per request.
pub struct IdleWatch {
    streams: Arc<StreamCount>,
    header_deadline: Instant,
    next: Instant,
    period: Duration,
    seen: u64,
    quiet: u32,
}

impl IdleWatch {
    /// Quiet checks in a row that make an idle connection: with checks `idle / 4` apart, the
    /// fifth comes at least one idle timeout after the last stream ended (the first counts
    /// the period the last stream ended in).
    const QUIET_CHECKS: u32 = 5;

    /// A watch from now, whose first stream must start by `header_deadline`.
    pub fn new(streams: Arc<StreamCount>, header_deadline: Instant, idle: Duration) -> Self {
        let period = (idle / 4).max(Duration::from_millis(1));
        Self {
            streams,
            header_deadline,
            next: deadline_after(period),
            period,
            seen: 0,
            quiet: 0,
        }
    }

    /// Resolves when the connection has expired.
    pub async fn expired(&mut self) -> Expiry {
        loop {
            let waiting_for_first = self.streams.started.load(Ordering::Relaxed) == 0;
            let wake = if waiting_for_first {
                self.next.min(self.header_deadline)
            } else {
                self.next
            };
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            let started = self.streams.started.load(Ordering::Relaxed);
            if started == 0 {
                if now >= self.header_deadline {
                    return Expiry::HeaderRead;
                }
                // Until the first request, the header-read deadline is the one that counts.
                self.next = deadline_after(self.period);
                continue;
            }
            if now < self.next {
                continue;
            }
            self.next = deadline_after(self.period);
            let open = self.streams.open.load(Ordering::Relaxed);
            self.quiet = match (open, started == self.seen) {
                // Streams came and went since the last check: the last ended in this period.
                (0, false) => 1,
                (0, true) => self.quiet.saturating_add(1),
                _ => 0,
            };
            self.seen = started;
            if self.quiet >= Self::QUIET_CHECKS {
                return Expiry::Idle;
            }
        }
    }
}

/// A response body that keeps its stream counted as open (HTTP/2) until hyper is done with it.
#[derive(Debug)]
pub struct ServedBody<B> {
    body: B,
    _stream: Option<OpenStream>,
}

impl<B> ServedBody<B> {
    /// `body`, counted in `stream` when there is one.
    pub fn new(body: B, stream: Option<OpenStream>) -> Self {
        Self {
            body,
            _stream: stream,
        }
    }
}

impl<B: Body + Unpin> Body for ServedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn caps_derive_from_the_descriptor_limit() {
        let limits = ConnectionLimits::for_fd_limit(1024, DEFAULT_ADMIN_CONNECTIONS);
        assert_eq!(
            (limits.inbound, limits.outbound, limits.admin),
            (224, 224, 64)
        );
        assert!(limits.descriptors_needed() <= 1024);
        let low = ConnectionLimits::for_fd_limit(256, DEFAULT_ADMIN_CONNECTIONS);
        assert_eq!((low.inbound, low.outbound), (32, 32));
        assert!(low.descriptors_needed() <= 256);
        assert_eq!(
            ConnectionLimits::for_fd_limit(0, 64).inbound,
            MIN_DERIVED_CONNECTIONS
        );
        assert_eq!(
            ConnectionLimits::for_fd_limit(u64::MAX, 64).inbound,
            MAX_DERIVED_CONNECTIONS
        );
    }

    #[test]
    fn budget_refuses_past_its_cap_and_frees_on_drop() {
        let metrics = crate::telemetry::metrics::Metrics::new("test").unwrap();
        let budget = ConnectionBudget::new("inbound", 2, metrics.listener("inbound"));
        let a = budget.try_acquire().unwrap();
        let _b = budget.try_acquire().unwrap();
        assert!(budget.try_acquire().is_none());
        assert_eq!(budget.metrics.rejected.get(), 1);
        assert_eq!(budget.metrics.active.get(), 2);
        drop(a);
        assert!(budget.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn log_limiter_lets_one_line_a_second_through_with_the_count() {
        let mut limiter = LogLimiter::default();
        let start = Instant::now();
        assert_eq!(limiter.hit(start), Some(1));
        for _ in 0..99 {
            assert_eq!(limiter.hit(start + Duration::from_millis(500)), None);
        }
        assert_eq!(limiter.hit(start + Duration::from_secs(1)), Some(100));
    }

    #[test]
    fn classifies_heads_and_the_preface() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0),
            Some(FirstHead::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.1\n\n", 0), Some(FirstHead::Http1));
        // Split across reads: the end is found from where the last search stopped.
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(classify(head, head.len() - 1), Some(FirstHead::Http1));
        // Leading empty lines are not a head.
        assert_eq!(classify(b"\r\n\r\n", 0), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n", 0), None);
        assert_eq!(classify(H2_PREFACE, 0), Some(FirstHead::Http2));
        assert_eq!(
            classify(&[b'a'; crate::core::headers::MAX_HEADER_BYTES], 0),
            Some(FirstHead::Http1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn first_read_times_out_with_what_came() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let read = read_first_head(&mut server, deadline).await;
        assert_eq!(read.head, FirstHead::TimedOut);
        assert!(read.partial_http1());
        assert_eq!(Instant::now(), deadline);

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let read = read_first_head(&mut server, Instant::now() + Duration::from_secs(1)).await;
        assert_eq!(read.head, FirstHead::TimedOut);
        assert!(!read.partial_http1());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_watch_expires_between_one_and_one_and_a_quarter_idle_timeouts() {
        let streams = Arc::new(StreamCount::default());
        let start = Instant::now();
        let idle = Duration::from_secs(60);
        let mut watch = IdleWatch::new(Arc::clone(&streams), start + Duration::from_secs(10), idle);
        // A stream opens before the header deadline and stays open past several checks.
        let stream = streams.open();
        let ended = start + Duration::from_secs(100);
        let stream_task = tokio::spawn(async move {
            tokio::time::sleep_until(ended).await;
            drop(stream);
        });
        assert_eq!(watch.expired().await, Expiry::Idle);
        let quiet = Instant::now() - ended;
        assert!(quiet >= idle && quiet <= idle + idle / 4, "{quiet:?}");
        stream_task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_watch_expires_at_the_header_deadline_without_a_stream() {
        for idle in [Duration::from_secs(60), Duration::from_secs(1)] {
            let streams = Arc::new(StreamCount::default());
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut watch = IdleWatch::new(streams, deadline, idle);
            assert_eq!(watch.expired().await, Expiry::HeaderRead);
            assert_eq!(Instant::now(), deadline);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_watch_counts_from_the_last_stream_when_idle_is_shorter_than_header_read() {
        let streams = Arc::new(StreamCount::default());
        let start = Instant::now();
        let idle = Duration::from_secs(1);
        let mut watch = IdleWatch::new(Arc::clone(&streams), start + Duration::from_secs(10), idle);
        // A stream starts and ends between two checks (250 ms apart).
        let ended = start + Duration::from_millis(900);
        let stream_task = tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_millis(800)).await;
            let stream = streams.open();
            tokio::time::sleep_until(ended).await;
            drop(stream);
        });
        assert_eq!(watch.expired().await, Expiry::Idle);
        let quiet = Instant::now() - ended;
        assert!(quiet >= idle && quiet <= idle + idle / 4, "{quiet:?}");
        stream_task.await.unwrap();
    }

    /// What a gated future saw: how often it was polled, and the waker of its last poll.
    #[derive(Default)]
    struct Probe {
        polls: AtomicU32,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probe {
        fn wake(&self) {
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    #[test]
    fn a_gated_future_is_polled_at_first_and_then_only_after_it_wakes() {
        let probe = Arc::new(Probe::default());
        let inner = Arc::clone(&probe);
        let mut gated = Gated::new(std::future::poll_fn(move |cx| {
            inner.polls.fetch_add(1, Ordering::Relaxed);
            *inner.waker.lock().unwrap() = Some(cx.waker().clone());
            if inner.ready.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        let task = Arc::new(Probe::default());
        let task_waker = Waker::from(Arc::new(TaskWake(Arc::clone(&task))));
        let mut cx = Context::from_waker(&task_waker);
        for _ in 0..5 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(
            probe.polls.load(Ordering::Relaxed),
            1,
            "polled once, to register"
        );
        // Its wake reaches the task, and the next poll reaches it.
        probe.wake();
        assert_eq!(task.polls.load(Ordering::Relaxed), 1, "the task was woken");
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(probe.polls.load(Ordering::Relaxed), 2);
        probe.ready.store(true, Ordering::Relaxed);
        probe.wake();
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(probe.polls.load(Ordering::Relaxed), 3);
    }

    /// A task's waker that counts its wakes in `polls`.
    struct TaskWake(Arc<Probe>);

    impl Wake for TaskWake {
        fn wake(self: Arc<Self>) {
            self.0.polls.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gated_timer_sleeps_fire_at_their_deadline_even_when_reset() {
        use hyper::rt::Timer;
        let timer = GatedTimer;
        let start = Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(10));
        // Polled (registered) first, then moved earlier and later, as hyper's keepalive does: a
        // reset is looked at without a wake.
        assert!(futures_poll_once(&mut sleep).await.is_pending());
        timer.reset(&mut sleep, (start + Duration::from_secs(5)).into_std());
        assert!(futures_poll_once(&mut sleep).await.is_pending());
        sleep.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        timer.reset(&mut sleep, (start + Duration::from_secs(30)).into_std());
        sleep.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        let until = timer.sleep_until((start + Duration::from_secs(40)).into_std());
        until.await;
        assert_eq!(start.elapsed(), Duration::from_secs(40));
    }

    async fn futures_poll_once(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx))).await
    }
}
