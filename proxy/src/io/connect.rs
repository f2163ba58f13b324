//! Connecting to one upstream endpoint: TCP with a timeout, `TCP_NODELAY`, TCP keepalive, and
//! connection counting. Each endpoint has its own connector (and pool), so the URI the request carries
//! keeps the caller's authority while the socket goes to the endpoint the balancer chose.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::io::rewind::Rewind;
use crate::io::tls::{HandshakeError, Io, UpstreamTls};
use crate::policy::holdout::HoldOut;
use crate::telemetry::metrics::{ConnectionGuard, ConnectionMetrics};

/// Why a connection to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens there.
    #[error("connect refused to {0}")]
    Refused(SocketAddr),
    /// No answer within the connect timeout.
    #[error("connect timeout to {addr} after {after:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The timeout that expired.
        after: Duration,
    },
    /// Any other OS error.
    #[error("connect error to {addr}: {source}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The mesh TLS handshake failed (untrusted or wrong peer, no identity, timeout).
    #[error("mesh TLS handshake with {addr} failed ({reason}): {message}")]
    Tls {
        /// The endpoint.
        addr: SocketAddr,
        /// Short label, as in the handshake-failure metric.
        reason: &'static str,
        /// rustls's error, as shown.
        message: String,
        /// The handshake's error, when it ran.
        source: Option<io::Error>,
    },
    /// The TLS handshake with an external service failed (untrusted, wrong name, timeout).
    #[error("tls handshake with {addr} failed: {message}")]
    OriginationTls {
        /// The endpoint.
        addr: SocketAddr,
        /// rustls's error, as shown.
        message: String,
        /// The handshake's error, when it ran.
        source: Option<io::Error>,
    },
    /// `max_pending_requests` connections to the service are already being opened.
    #[error("too many pending requests for {0}")]
    PendingLimit(Arc<str>),
}

impl ConnectError {
    /// The failed TLS handshake `error` with `addr`.
    pub fn handshake(addr: SocketAddr, error: HandshakeError) -> Self {
        let HandshakeError {
            reason,
            message,
            origination,
            source,
        } = error;
        match origination {
            true => Self::OriginationTls {
                addr,
                message,
                source,
            },
            false => Self::Tls {
                addr,
                reason,
                message,
                source,
            },
        }
    }
}

/// The service-wide bound on connections being opened at once: each is a request waiting for
/// a connection (`circuit_breaker.max_pending_requests`). Shared by every endpoint's connector.
#[derive(Debug, Clone)]
pub struct PendingLimit {
    service: Arc<str>,
    max: u32,
    pending: Arc<AtomicU32>,
}

impl PendingLimit {
    /// A limit of `max` pending connects for `service`.
    pub fn new(service: Arc<str>, max: u32) -> Self {
        Self {
            service,
            max,
            pending: Arc::new(AtomicU32::new(0)),
        }
    }

    fn enter(&self) -> Result<PendingSlot, ConnectError> {
        // Relaxed: the counter guards no other data.
        self.pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map(|_| PendingSlot(Arc::clone(&self.pending)))
            .map_err(|_| ConnectError::PendingLimit(Arc::clone(&self.service)))
    }
}

/// One connect in progress; released when the connect ends either way.
struct PendingSlot(Arc<AtomicU32>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens connections to one endpoint.
#[derive(Clone)]
pub struct EndpointConnector {
    addr: SocketAddr,
    timeout: Duration,
    metrics: Arc<ConnectionMetrics>,
    pending: Option<PendingLimit>,
    tls: Option<UpstreamTls>,
    hold_out: Option<Arc<HoldOut>>,
}

impl EndpointConnector {
    /// A connector to `addr` that gives up after `timeout`, refusing to open more than
    /// `pending` allows at once.
    pub fn new(
        addr: SocketAddr,
        timeout: Duration,
        metrics: Arc<ConnectionMetrics>,
        pending: Option<PendingLimit>,
    ) -> Self {
        Self {
            addr,
            timeout,
            metrics,
            pending,
            tls: None,
            hold_out: None,
        }
    }

    /// Secures every connection with `tls` (mesh mTLS or TLS origination).
    pub fn with_tls(mut self, tls: Option<UpstreamTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Reports every TCP connect's outcome to the endpoint's `hold_out` record.
    pub fn with_hold_out(mut self, hold_out: Arc<HoldOut>) -> Self {
        self.hold_out = Some(hold_out);
        self
    }
}

impl EndpointConnector {
    /// Opens one connection: TCP within the connect timeout, `TCP_NODELAY`, then TLS when the
    /// service asks for it.
    pub async fn connect(&self) -> Result<TokioIo<CountedStream>, ConnectError> {
        let addr = self.addr;
        let _slot = self.pending.as_ref().map(PendingLimit::enter).transpose()?;
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Err(_) => Err(ConnectError::Timeout {
                addr,
                after: self.timeout,
            }),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err(ConnectError::Refused(addr))
            }
            Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
            Ok(Ok(stream)) => Ok(stream),
        };
        // Whether the endpoint is reachable is decided here, by TCP: a TLS handshake that
        // fails afterwards is a broken peer, not a dead one.
        if let Some(hold_out) = &self.hold_out {
            match &stream {
                Ok(_) => hold_out.connected(),
                Err(error) => {
                    hold_out.connect_failed(error);
                }
            }
        }
        let stream = stream?;
        // Under capture, a connection that comes back to this proxy is recognised as its own.
        let own = crate::io::original_dst::OwnSockets::global().record(&stream);
        // Small request/response writes must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        // A pooled or long-streaming connection to a host that vanished is found and freed.
        crate::io::connection::set_keepalive(&stream);
        let stream = match &self.tls {
            None => Io::Plain(stream),
            Some(tls) => crate::io::tls::connect(tls, addr, stream)
                .await
                .map_err(|e| ConnectError::handshake(addr, e))?,
        };
        let counted = Counted {
            _guard: self.metrics.opened(),
            _own: own,
        };
        Ok(TokioIo::new(Rewind::holding(Bytes::new(), stream, counted)))
    }
}

/// A connection (TCP, or mesh TLS over it) counted in the connection metrics while it lives.
/// Nothing was read from it before it is handed out: the replay is empty.
pub type CountedStream = Rewind<Io, Counted>;

/// What an upstream connection holds while it lives: its place in the connection metrics and
/// its record among the proxy's own sockets.
pub struct Counted {
    _guard: ConnectionGuard,
    _own: Option<crate::io::original_dst::OwnSocket>,
}

impl<H> Rewind<Io, H> {
    /// Whether an idle connection is still open with nothing unread (see [`Io::is_quiet`]).
    pub fn is_quiet(&mut self) -> bool {
        self.unread().is_empty() && self.get_mut().is_quiet()
    }
}
