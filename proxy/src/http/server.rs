//! Accept loops for the data-plane listeners (HTTP/1.1 and prior-knowledge HTTP/2 on the same
//! port) and their graceful drain.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;

use bytes::BytesMut;
use http::StatusCode;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use outrider_config::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::errors::ProxyError;
use crate::core::headers;
use crate::http::captured::{self, Capture};
use crate::http::forward::{self, ListenerKind};
use crate::http::rescue::rescue;
use crate::http::shared::Shared;
use crate::io::connection::{
    self, ConnectionSlot, Expiry, FirstHead, Gated, GatedTimer, IdleWatch, LogLimiter,
};
use crate::io::identity::{ALPN_OUTRIDER_TCP, PEER_IDENTITY_HEADER};
use crate::io::original_dst::{self, Disposition};
use crate::io::rewind::Rewind;
use crate::io::tls;
use crate::telemetry::metrics::ListenerMetrics;

/// Serves `listener` until `stop` turns true, then stops accepting and drains: HTTP/1.1
/// connections close after their in-flight request (`Connection: close`), HTTP/2 ones get
/// GOAWAY. Returns when every connection has ended; the caller bounds that by the drain timeout.
/// A connection past the listener's cap is closed at accept.
pub async fn serve(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let timeouts = shared.connections.timeouts;
    let budget = match kind {
        ListenerKind::Inbound => Arc::clone(&shared.connections.inbound),
        ListenerKind::Outbound | ListenerKind::Dedicated(_) => {
            Arc::clone(&shared.connections.outbound)
        }
    };
    // hyper's own builders, not hyper-util's `auto`: the protocol is known once the first head
    // is read, and `auto` would read the first bytes again to tell it, and then pass every
    // read of the connection through a replay layer of its own.
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // The first head is read before hyper sees the connection (`connection::read_first_head`,
        // by the header-read deadline); hyper's timer runs from the end of each response to the
        // next complete head, which makes it the keep-alive idle timeout.
        .header_read_timeout(timeouts.idle)
        .max_buf_size(headers::MAX_HEADER_BYTES);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        // hyper polls the keepalive's sleep at each of the connection's wakes: gated, a poll
        // that finds it not woken is a load and a compare.
        .timer(GatedTimer)
        .keep_alive_interval(timeouts.http2_keepalive_interval)
        .keep_alive_timeout(timeouts.http2_keepalive_timeout)
        .max_header_list_size(headers::MAX_HEADER_BYTES as u32);
    let builders = Arc::new(Builders { http1, http2 });
    // Every connection holds a receiver; `closed` tells when the last one has ended.
    let (connections, _) = watch::channel(());
    let mut refusals = LogLimiter::default();
    let mut accept_errors = LogLimiter::default();
    let mut loops = LogLimiter::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = budget.try_acquire() else {
                        drop(stream);
                        budget.log_refusal(&mut refusals);
                        continue;
                    };
                    let disposition = disposition(&stream, peer, kind, &shared);
                    if let Disposition::Loop(reason, original) = disposition {
                        shared.metrics.capture.looped(reason.label());
                        if let Some(refused) = loops.hit(Instant::now()) {
                            tracing::warn!(
                                listener = budget.listener(),
                                %peer,
                                original_destination = %original,
                                reason = reason.label(),
                                refused,
                                "captured connection refused: it loops back into this proxy \
                                 (do the capture rules exclude the proxy's UID?)"
                            );
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    connection::set_keepalive(&stream);
                    // The app's outbound connections tell a shutdown when the app has gone.
                    let app_connection = (kind != ListenerKind::Inbound).then(|| shared.app.open());
                    let shared = Arc::clone(&shared);
                    let builders = Arc::clone(&builders);
                    let stop = stop.clone();
                    let held = connections.subscribe();
                    tokio::spawn(async move {
                        let accepted = Accepted { stream, peer, disposition, slot };
                        serve_connection(accepted, kind, shared, &builders, stop).await;
                        drop(app_connection);
                        drop(held);
                    });
                }
                Err(error) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    if let Some(errors) = accept_errors.hit(Instant::now()) {
                        tracing::warn!(%error, errors, "accept failed");
                    }
                    tokio::time::sleep(connection::ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = crate::core::shutdown::stopped(&mut stop) => break,
        }
    }
    drop(listener);
    connections.closed().await;
}

/// hyper's connection builders for both protocols, as configured for a listener.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// An accepted connection, as the accept loop hands it to its task.
struct Accepted {
    stream: TcpStream,
    peer: std::net::SocketAddr,
    disposition: Disposition,
    slot: ConnectionSlot,
}

/// Whether a connection accepted on a `kind` listener was captured: read per connection (one
/// `getsockopt`), on the outbound and inbound listeners (dedicated ports are explicit only).
fn disposition(
    stream: &TcpStream,
    peer: std::net::SocketAddr,
    kind: ListenerKind,
    shared: &Shared,
) -> Disposition {
    if matches!(kind, ListenerKind::Dedicated(_)) {
        return Disposition::Explicit;
    }
    let Ok(local) = stream.local_addr() else {
        return Disposition::Explicit;
    };
    let original = original_dst::original_destination(stream, local);
    let ports = shared.listener_ports.get().map_or(&[][..], Vec::as_slice);
    original_dst::classify(local, peer, original, ports)
}

/// Serves one accepted connection: the inbound TLS sniff and handshake (or, captured, protocol
/// detection) and the first request head by the header-read deadline, then hyper, until the
/// connection ends, idles out or a shutdown drains it.
async fn serve_connection(
    accepted: Accepted,
    kind: ListenerKind,
    shared: Arc<Shared>,
    builders: &Builders,
    mut stop: watch::Receiver<bool>,
) {
    let Accepted {
        stream,
        peer,
        disposition,
        slot,
    } = accepted;
    let timeouts = shared.connections.timeouts;
    let budget = Arc::clone(slot.budget());
    let metrics = &budget.metrics;
    let deadline = connection::deadline_after(timeouts.header_read);
    let (mut io, peer_identity, prefix, slot, captured) = if let Disposition::Captured(dst) =
        disposition
    {
        let inbound = kind == ListenerKind::Inbound;
        let accepted = captured::accept(stream, peer, dst, inbound, &shared, slot, &mut stop).await;
        let Some(http) = accepted else {
            return;
        };
        let captured = Some((http.dst, http.inbound));
        (http.io, http.peer_identity, http.bytes, http.slot, captured)
    } else {
        let Some(accepted) =
            accept_explicit(stream, peer, kind, &shared, deadline, &mut stop).await
        else {
            if Instant::now() >= deadline {
                metrics.header_read_timeouts.inc();
            }
            return;
        };
        if accepted.io.alpn() == Some(ALPN_OUTRIDER_TCP) {
            // Mesh-wrapped opaque TCP sent to this port itself (a peer's endpoint naming
            // 15006): opaque bytes, to the app as on a captured port, never read as HTTP.
            let app = shared
                .snapshot
                .load()
                .policy
                .inbound
                .as_ref()
                .map(|i| i.app);
            captured::relay_wrapped(accepted, peer, app, &shared, slot).await;
            return;
        }
        (
            accepted.io,
            accepted.peer_identity,
            BytesMut::new(),
            slot,
            None,
        )
    };
    let first = tokio::select! {
        first = connection::read_first_head_after(&mut io, prefix, deadline) => first,
        () = crate::core::shutdown::stopped(&mut stop) => return,
    };
    match first.head {
        FirstHead::Http1 | FirstHead::Http2 => {}
        FirstHead::Closed => return,
        FirstHead::TimedOut => {
            metrics.header_read_timeouts.inc();
            tracing::debug!(%peer, "no complete request head in time; closed");
            if first.partial_http1() {
                connection::answer_request_timeout(&mut io).await;
            }
            return;
        }
    }
    // HTTP/2: streams are counted for the idle timeout (HTTP/1.1's is hyper's header timer).
    let streams = (first.head == FirstHead::Http2).then(Arc::default);
    let mut idle = streams
        .as_ref()
        .map(|streams| IdleWatch::new(Arc::clone(streams), deadline, timeouts.idle));
    // Captured: routed by the original destination, resolved now for the whole connection.
    let capture = captured.map(|(dst, inbound)| {
        let protocol = match first.head {
            FirstHead::Http2 => Protocol::Http2,
            _ => Protocol::Http1,
        };
        let snapshot = shared.snapshot.load();
        Arc::new(Capture::new(
            dst,
            inbound,
            protocol,
            &snapshot,
            &shared.metrics,
        ))
    });
    let inbound = captured.map_or(kind == ListenerKind::Inbound, |(_, inbound)| inbound);
    let on_error = Arc::clone(&shared);
    let caller = headers::Caller::new(peer).with_identity(peer_identity.clone());
    let service = service_fn(move |mut req| {
        let shared = Arc::clone(&shared);
        let caller = caller.clone();
        let denied = (kind == ListenerKind::Inbound)
            .then(|| inbound_identity(&shared, &mut req, peer_identity.as_ref()))
            .flatten();
        let stream = streams.as_ref().map(connection::StreamCount::open);
        let capture = capture.clone();
        async move {
            let response = match (denied, capture) {
                (Some(error), _) => Ok(rescue(&error, headers::is_grpc(&req))),
                (None, None) => forward::handle(shared, kind, caller, req).await,
                (None, Some(capture)) => {
                    forward::handle_captured(shared, capture, caller, req).await
                }
            };
            response.map(|r| r.map(|body| connection::ServedBody::new(body, stream)))
        }
    });
    // The bytes the first head was read in come first; the slot is held while the socket lives.
    let io = TokioIo::new(Rewind::holding(first.bytes, io, slot));
    // What ends a connection besides hyper: a shutdown (`None`), or an HTTP/2 connection's
    // expiry. Gated: hyper wakes the task several times per request, and these need a look
    // only when they wake it themselves.
    let ending = Gated::new(async {
        tokio::select! {
            biased;
            () = crate::core::shutdown::stopped(&mut stop) => None,
            expiry = expired(&mut idle) => Some(expiry),
        }
    });
    let result = if first.head == FirstHead::Http2 {
        let conn = pin!(builders.http2.serve_connection(io, service));
        drive(conn, |conn| conn.graceful_shutdown(), ending, metrics, peer).await
    } else {
        let conn = pin!(builders.http1.serve_connection(io, service).with_upgrades());
        drive(conn, |conn| conn.graceful_shutdown(), ending, metrics, peer).await
    };
    if let Err(error) = result {
        if error.is_timeout() {
            // HTTP/1.1: no next head within the idle timeout. (hyper ends an HTTP/2 connection
            // whose keepalive PING went unanswered without an error.)
            metrics.idle_timeouts.inc();
        } else if let Some(status) = parser_answer(&error) {
            let direction = if inbound { "inbound" } else { "outbound" };
            on_error.malformed(direction, peer, status, &error);
        } else {
            tracing::debug!(%error, "connection ended with an error");
        }
    }
}

/// The status hyper's HTTP/1 server answered a request head it could not parse with, if it
/// answered one (its `on_error`): 431 for too many or too large headers, 414 for a long URI,
/// 400 for any other malformed method, target, version or header. A connection that ended
/// for another reason (or an HTTP/2 one: its malformed streams are reset) has none.
fn parser_answer(error: &hyper::Error) -> Option<StatusCode> {
    if !error.is_parse() || error.is_parse_status() || error.is_parse_version_h2() {
        return None;
    }
    if error.is_parse_too_large() {
        // hyper tells the two apart only by their message.
        return Some(if error.to_string().starts_with("URI too long") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        });
    }
    // `Parse::Internal` (a parser bug) is not answered; its message says so.
    if error.to_string().contains("internal error") {
        return None;
    }
    Some(StatusCode::BAD_REQUEST)
}

/// The explicit-mode start of a connection: on the inbound port, the plaintext/mTLS sniff
/// and handshake. `None`: refused or gone (see [`tls::accept_inbound`]) or stopped.
async fn accept_explicit(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    kind: ListenerKind,
    shared: &Shared,
    deadline: Instant,
    stop: &mut watch::Receiver<bool>,
) -> Option<tls::Accepted> {
    if kind != ListenerKind::Inbound {
        return Some(tls::Accepted {
            io: tls::Io::Plain(stream),
            peer_identity: None,
        });
    }
    let mode = shared
        .snapshot
        .load()
        .policy
        .inbound
        .as_ref()
        .map(|i| i.mtls)
        .unwrap_or_default();
    tokio::select! {
        accepted = tls::accept_inbound(stream, peer, shared.mesh.as_ref(), mode, deadline) => accepted,
        () = crate::core::shutdown::stopped(stop) => None,
    }
}

/// Runs hyper's `conn` until it ends, and closes it gracefully (`graceful_shutdown`) once
/// `ending` resolves: at a shutdown, or when an HTTP/2 connection expires (`Some`), which is
/// then cut if it has not ended within [`connection::CLOSE_GRACE`].
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    mut ending: Gated<E>,
    metrics: &ListenerMetrics,
    peer: std::net::SocketAddr,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
    E: Future<Output = Option<Expiry>>,
{
    let mut closing = false;
    // After an idle close starts, the GOAWAY exchange gets a moment, not forever (a drain is
    // bounded by the drain timeout instead).
    let mut cut_at: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => return result,
            ending = &mut ending, if !closing => {
                graceful_shutdown(conn.as_mut());
                closing = true;
                if let Some(expiry) = ending {
                    match expiry {
                        Expiry::HeaderRead => metrics.header_read_timeouts.inc(),
                        Expiry::Idle => metrics.idle_timeouts.inc(),
                    }
                    tracing::debug!(%peer, expiry = expiry.as_str(), "HTTP/2 connection expired; GOAWAY");
                    cut_at = Some(connection::deadline_after(connection::CLOSE_GRACE));
                }
            }
            () = sleep_until(cut_at), if cut_at.is_some() => return Ok(()),
        }
    }
}

/// Resolves when an HTTP/2 connection's [`IdleWatch`] expires; never for HTTP/1.1.
async fn expired(idle: &mut Option<IdleWatch>) -> Expiry {
    match idle {
        Some(watch) => watch.expired().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// On the inbound port: replaces any caller-sent identity header with the verified one (none
/// for plaintext callers) and applies `inbound.authorization` (see [`Authorizer`]); `Some` is
/// the refusal.
///
/// [`Authorizer`]: crate::http::authz::Authorizer
fn inbound_identity<B>(
    shared: &Shared,
    req: &mut http::Request<B>,
    verified: Option<&http::HeaderValue>,
) -> Option<ProxyError> {
    let headers = req.headers_mut();
    headers.remove(PEER_IDENTITY_HEADER);
    if let Some(id) = verified {
        headers.insert(PEER_IDENTITY_HEADER, id.clone());
    }
    let snapshot = shared.snapshot.load();
    let refused = snapshot
        .authorization()?
        .check_request(verified, req)
        .err()?;
    // Counted here, as the request goes no further (untimed: it is answered at once).
    snapshot
        .inbound_metrics()
        .count_ended(req.method(), refused.status(), refused.flag());
    Some(refused)
}
