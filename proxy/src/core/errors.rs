//! The proxy's own failures: [`ProxyError`] says what happened (with the endpoint, the limit,
//! and the io/hyper/rustls error as its source); its [`ErrorKind`] decides everything the
//! proxy does about it (status, `grpc-status`, response flag, span `error.type`, the breaker's
//! and outlier detection's verdict, [`Side`] and [`RetrySafety`]), each a `match` here. The one
//! place that turns a failure into a response is [`rescue`](crate::http::rescue).

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// A boxed error from a body or a connection, whose kind is kept by its source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The reason header on every response the proxy itself produces.
pub const ERROR_HEADER: &str = "x-outrider-error";

/// Why the proxy could not deliver a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed; it is never forwarded.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request's body is framed with a transfer coding the proxy cannot decode (RFC 9112
    /// §6.1: answered 501); it is never forwarded.
    #[error("unsupported transfer coding {0}")]
    UnsupportedTransferCoding(String),
    /// The listener has nothing to send to in the policy in force (no `inbound.app`, or a
    /// dedicated port whose service was removed).
    #[error("{0}")]
    NotConfigured(String),
    /// No outbound route matches the request's authority and path.
    #[error("no route for authority {0:?}")]
    NoRoute(String),
    /// The service has no endpoints (an empty list, or DNS returned nothing yet).
    #[error("no endpoints for {0}")]
    NoEndpoints(std::sync::Arc<str>),
    /// The endpoint refused the TCP connection.
    #[error("connect refused to {0}")]
    ConnectRefused(SocketAddr),
    /// The TCP connection did not complete in time.
    #[error("connect timeout to {addr} after {after:?}")]
    ConnectTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The configured connect timeout.
        after: Duration,
    },
    /// Another connection failure (unreachable network, reset during handshake...).
    #[error("connect error to {addr}: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The upstream closed or reset the connection before a complete response head.
    #[error("upstream {addr} reset the connection")]
    UpstreamReset {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's or the direct codec's error.
        #[source]
        source: BoxError,
    },
    /// The request timeout (all attempts and backoff) expired before response headers.
    #[error("request timeout after {}", outrider_config::Duration(*.0))]
    RequestTimeout(Duration),
    /// One attempt's timeout expired before its response headers, with no retry left.
    #[error("per-try timeout after {}", outrider_config::Duration(*.0))]
    PerTryTimeout(Duration),
    /// The caller went silent mid-body for longer than `timeouts.request_body_idle` before the
    /// response started; the upstream's request was reset, not completed.
    #[error("request body idle timeout after {}", outrider_config::Duration(*.0))]
    RequestBodyTimeout(Duration),
    /// A rate limit refused the request; it never reached the upstream.
    #[error("rate limited by {scope}")]
    RateLimited {
        /// What the limit protects (`service payments`, `route checkout`, `inbound`).
        scope: std::sync::Arc<str>,
        /// The bucket size.
        limit: u32,
        /// Time until one token is available.
        retry_after: Duration,
        /// Time until the bucket is full again.
        reset: Duration,
    },
    /// Fault injection answered the request with this status instead of forwarding it.
    #[error("fault injected")]
    FaultAbort(StatusCode),
    /// The service has `max_pending_requests` connections being opened already.
    #[error("too many pending requests for {0}")]
    PendingLimit(std::sync::Arc<str>),
    /// Every endpoint of the service is ejected by outlier detection.
    #[error("all endpoints of {0} are ejected")]
    AllEjected(std::sync::Arc<str>),
    /// A retry found every endpoint of the service held out after a failed connect.
    #[error("no reachable endpoint for {0}: every connect failed lately")]
    AllUnreachable(std::sync::Arc<str>),
    /// The service's circuit breaker is open; the request never reached the upstream.
    #[error("circuit open for {0}")]
    CircuitOpen(std::sync::Arc<str>),
    /// The service has `max_concurrent_requests` requests in flight already.
    #[error("too many concurrent requests for {0}")]
    ConcurrencyLimit(std::sync::Arc<str>),
    /// `inbound.authorization` denied the request.
    #[error("{} (caller {})", match .rule { Some(rule) => format!("denied by rule {rule}"), None => "default deny".to_string() }, .caller.as_deref().unwrap_or("without a mesh identity"))]
    Forbidden {
        /// The deny rule that matched; `None` when no rule did and the default is deny.
        rule: Option<std::sync::Arc<str>>,
        /// The verified caller; `None` for a plaintext caller, who has no identity.
        caller: Option<String>,
    },
    /// The TLS handshake with the upstream failed: mesh mTLS (untrusted or wrong peer, no
    /// identity) or TLS origination to an external service (`tls: { sni }`). A connect-class
    /// failure: nothing of the request was sent. Boxed: a rare path, kept out of the size of
    /// every result on the request path.
    #[error(transparent)]
    TlsHandshake(Box<TlsFailure>),
    /// The upstream's response is not valid HTTP (or carries a transfer coding the proxy does
    /// not pass on).
    #[error("upstream {addr} failed: {}", UpstreamShown(source.as_ref()))]
    UpstreamProtocol {
        /// The endpoint.
        addr: SocketAddr,
        /// The parser's error (hyper, the direct codec, or the transfer-coding check).
        #[source]
        source: BoxError,
    },
}

/// A TLS handshake with an upstream that failed ([`ProxyError::TlsHandshake`]).
#[derive(Debug)]
pub struct TlsFailure {
    /// The endpoint.
    pub addr: SocketAddr,
    /// For mesh mTLS, the short reason of the handshake-failure metric; `None` for TLS
    /// origination.
    pub mesh: Option<&'static str>,
    /// What failed, as shown to the caller (rustls's error, or the identity expected).
    pub message: String,
    /// The handshake's own error, when there is one (not for a configuration that cannot
    /// work, or a handshake timeout).
    pub source: Option<std::io::Error>,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            addr,
            mesh,
            message,
            ..
        } = self;
        match mesh {
            Some(reason) => write!(
                f,
                "mesh TLS handshake with {addr} failed ({reason}): {message}"
            ),
            None => write!(f, "tls handshake with {addr} failed: {message}"),
        }
    }
}

impl std::error::Error for TlsFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// The reason of a [`ProxyError::UpstreamProtocol`]: a transfer coding refused is named; any
/// parse failure is "invalid response" (the parser's own words are in the source).
struct UpstreamShown<'a>(&'a (dyn std::error::Error + Send + Sync + 'static));

impl std::fmt::Display for UpstreamShown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.downcast_ref::<TransferCodingError>() {
            Some(coding) => coding.fmt(f),
            None => f.write_str("invalid response"),
        }
    }
}

/// Why a message's `Transfer-Encoding` cannot be passed on (RFC 9112 §6.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferCodingError {
    /// A coding other than `chunked`. The proxy decodes only `chunked`, and the next hop gets
    /// the message re-framed, so forwarding it without this coding would hand its encoded
    /// bytes on as content.
    #[error("unsupported transfer coding {0}")]
    Unsupported(String),
    /// `chunked` applied twice: decoded once, the body would arrive still chunked.
    #[error("chunked transfer coding applied more than once")]
    ChunkedTwice,
    /// `chunked` is not the final coding (or there is none): the body runs to the close.
    #[error("chunked is not the final transfer coding")]
    ChunkedNotLast,
}

/// Who made a response, and why the proxy made it: one flag per request, after Envoy's
/// response flags (its short codes where it has one). The `flags` label of the request metrics,
/// `response_flags` in the access log and `outrider.response_flags` on spans; a fixed set, so
/// the label's cardinality is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseFlag {
    /// The upstream sent the response (`-`).
    #[default]
    Upstream,
    /// No route, or no service on the listener (`NR`).
    NoRoute,
    /// No endpoint to send to: none known, all ejected, all unreachable (`UH`).
    NoHealthyUpstream,
    /// The connection to the upstream could not be opened (`UF`).
    ConnectFailure,
    /// The request or per-try timeout expired before response headers (`UT`).
    UpstreamTimeout,
    /// The upstream closed or reset the connection before a response (`UC`).
    UpstreamReset,
    /// The upstream's response was not valid HTTP (`UPE`).
    UpstreamProtocolError,
    /// A rate limit refused the request (`RL`).
    RateLimited,
    /// The circuit breaker is open, or a concurrency or pending limit is full (`UO`).
    Overflow,
    /// Fault injection answered instead of the upstream (`FI`).
    FaultInjected,
    /// The caller went away before the response ended (`DC`).
    DownstreamCancelled,
    /// The request was malformed and never forwarded (`DPE`).
    MalformedRequest,
    /// `inbound.authorization` refused the caller (`UAEX`).
    Unauthorized,
    /// The caller's request body stalled past `timeouts.request_body_idle` (`SI`).
    RequestBodyIdle,
    /// The route's `request_redirect` answered instead of the upstream (`RD`).
    Redirect,
}

impl ResponseFlag {
    /// Every flag, in [`ResponseFlag::index`] order.
    pub const ALL: [Self; 15] = [
        Self::Upstream,
        Self::NoRoute,
        Self::NoHealthyUpstream,
        Self::ConnectFailure,
        Self::UpstreamTimeout,
        Self::UpstreamReset,
        Self::UpstreamProtocolError,
        Self::RateLimited,
        Self::Overflow,
        Self::FaultInjected,
        Self::DownstreamCancelled,
        Self::MalformedRequest,
        Self::Unauthorized,
        Self::RequestBodyIdle,
        Self::Redirect,
    ];

    /// The short code (`-` for a response the upstream sent).
    pub fn code(self) -> &'static str {
        match self {
            Self::Upstream => "-",
            Self::NoRoute => "NR",
            Self::NoHealthyUpstream => "UH",
            Self::ConnectFailure => "UF",
            Self::UpstreamTimeout => "UT",
            Self::UpstreamReset => "UC",
            Self::UpstreamProtocolError => "UPE",
            Self::RateLimited => "RL",
            Self::Overflow => "UO",
            Self::FaultInjected => "FI",
            Self::DownstreamCancelled => "DC",
            Self::MalformedRequest => "DPE",
            Self::Unauthorized => "UAEX",
            Self::RequestBodyIdle => "SI",
            Self::Redirect => "RD",
        }
    }

    /// Its position in [`ResponseFlag::ALL`], for tables indexed by flag.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The proxy made the response (or the caller left): anything but [`ResponseFlag::Upstream`].
    pub fn is_proxy_made(self) -> bool {
        self != Self::Upstream
    }
}

/// What failed, as a closed set: every answer the proxy derives from a failure (status,
/// `grpc-status`, response flag, span `error.type`, breaker and outlier verdict, retry safety)
/// is a `match` on it here, so no one recovers a kind from an error's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The endpoint refused the TCP connection.
    ConnectRefused,
    /// The TCP connection did not complete within the connect timeout.
    ConnectTimeout,
    /// Another OS error while connecting (unreachable network...).
    ConnectFailed,
    /// The TLS handshake with the endpoint failed (mesh mTLS or origination).
    TlsHandshake,
    /// The connection broke after the request may have left and before the response head.
    UpstreamResetBeforeHeaders,
    /// The connection broke while the response body was arriving.
    UpstreamResetAfterHeaders,
    /// The upstream's response is not valid HTTP.
    UpstreamProtocol,
    /// The request timeout expired before the response head.
    RequestTimeout,
    /// One attempt's timeout expired before its response head.
    PerTryTimeout,
    /// The response body went silent past its idle timeout.
    ResponseBodyIdle,
    /// The caller's request body went silent past `timeouts.request_body_idle`.
    RequestBodyIdle,
    /// A rate limit refused the request.
    RateLimited,
    /// Fault injection answered instead of the upstream.
    FaultInjected,
    /// The service's circuit breaker is open.
    CircuitOpen,
    /// The service has `max_concurrent_requests` in flight.
    ConcurrencyLimit,
    /// The service has `max_pending_requests` connects under way.
    PendingLimit,
    /// No endpoint to send to: none known, all ejected, or all unreachable lately.
    NoHealthyEndpoint,
    /// No route matches the request.
    NoRoute,
    /// Nothing to send to on this listener in the policy in force.
    NotConfigured,
    /// `inbound.authorization` refused the caller.
    Forbidden,
    /// The caller's request is malformed.
    DownstreamProtocol,
    /// The caller's request body uses a transfer coding the proxy cannot decode.
    UnsupportedTransferCoding,
    /// The caller went away before the response ended.
    DownstreamDisconnect,
}

/// Whose fault a failure is (pingora's `ErrorSource`): the metric and span of a failure, and
/// whether the upstream's health is in question, depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller: a malformed or stalled request, a caller that left, or one refused by
    /// policy for what it is (authorization, no route).
    Downstream,
    /// The upstream: it could not be reached, or failed to answer properly.
    Upstream,
    /// The proxy's own policy (rate limit, breaker, fault, limits) or configuration.
    Internal,
}

/// Whether a failed attempt may be sent again (to this or another endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySafety {
    /// Nothing of the request was sent: any method may go again.
    Safe,
    /// The request may have reached the upstream: only an idempotent method (or a route that
    /// opted in with `retry_non_idempotent`) may go again.
    IfIdempotent,
    /// Never: another attempt would fail the same way, or it is not an attempt's failure.
    Never,
}

impl RetrySafety {
    /// Whether a request with `method` that failed so may go again; `non_idempotent`: the
    /// route's `retry_non_idempotent`. The one place the idempotency rule meets retries.
    pub fn allows(self, method: &http::Method, non_idempotent: bool) -> bool {
        match self {
            Self::Safe => true,
            Self::IfIdempotent => non_idempotent || crate::core::methods::is_idempotent(method),
            Self::Never => false,
        }
    }
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [Self; 23] = [
        Self::ConnectRefused,
        Self::ConnectTimeout,
        Self::ConnectFailed,
        Self::TlsHandshake,
        Self::UpstreamResetBeforeHeaders,
        Self::UpstreamResetAfterHeaders,
        Self::UpstreamProtocol,
        Self::RequestTimeout,
        Self::PerTryTimeout,
        Self::ResponseBodyIdle,
        Self::RequestBodyIdle,
        Self::RateLimited,
        Self::FaultInjected,
        Self::CircuitOpen,
        Self::ConcurrencyLimit,
        Self::PendingLimit,
        Self::NoHealthyEndpoint,
        Self::NoRoute,
        Self::NotConfigured,
        Self::Forbidden,
        Self::DownstreamProtocol,
        Self::UnsupportedTransferCoding,
        Self::DownstreamDisconnect,
    ];

    /// Whose fault it is.
    pub fn side(self) -> Side {
        match self {
            Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::ConnectFailed
            | Self::TlsHandshake
            | Self::UpstreamResetBeforeHeaders
            | Self::UpstreamResetAfterHeaders
            | Self::UpstreamProtocol
            | Self::RequestTimeout
            | Self::PerTryTimeout
            | Self::ResponseBodyIdle
            | Self::NoHealthyEndpoint => Side::Upstream,
            Self::RequestBodyIdle
            | Self::NoRoute
            | Self::Forbidden
            | Self::DownstreamProtocol
            | Self::UnsupportedTransferCoding
            | Self::DownstreamDisconnect => Side::Downstream,
            Self::RateLimited
            | Self::FaultInjected
            | Self::CircuitOpen
            | Self::ConcurrencyLimit
            | Self::PendingLimit
            | Self::NotConfigured => Side::Internal,
        }
    }

    /// Whether the attempt that failed so may be sent again. A TLS handshake failure is
    /// connect-class: the request had not left. A shed attempt (pending limit) would be shed
    /// again: the limit is service-wide.
    pub fn retry_safety(self) -> RetrySafety {
        match self {
            Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::ConnectFailed
            | Self::TlsHandshake => RetrySafety::Safe,
            Self::UpstreamResetBeforeHeaders | Self::UpstreamProtocol | Self::PerTryTimeout => {
                RetrySafety::IfIdempotent
            }
            Self::UpstreamResetAfterHeaders
            | Self::RequestTimeout
            | Self::ResponseBodyIdle
            | Self::RequestBodyIdle
            | Self::RateLimited
            | Self::FaultInjected
            | Self::CircuitOpen
            | Self::ConcurrencyLimit
            | Self::PendingLimit
            | Self::NoHealthyEndpoint
            | Self::NoRoute
            | Self::NotConfigured
            | Self::Forbidden
            | Self::DownstreamProtocol
            | Self::UnsupportedTransferCoding
            | Self::DownstreamDisconnect => RetrySafety::Never,
        }
    }

    /// The connection to the endpoint could not be opened (TCP or TLS): what retry's
    /// `connect-failure` means, and a failure outlier detection counts.
    pub fn is_connect_failure(self) -> bool {
        self.retry_safety() == RetrySafety::Safe
    }

    /// The breaker's and outlier detection's verdict: the failure says the upstream is
    /// unhealthy. `false`: it says nothing about the upstream (the caller's doing, the
    /// proxy's own policy, or no endpoint tried).
    pub fn is_upstream_failure(self) -> bool {
        match self {
            Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::ConnectFailed
            | Self::TlsHandshake
            | Self::UpstreamResetBeforeHeaders
            | Self::UpstreamResetAfterHeaders
            | Self::UpstreamProtocol
            | Self::RequestTimeout
            | Self::PerTryTimeout
            | Self::ResponseBodyIdle => true,
            Self::RequestBodyIdle
            | Self::RateLimited
            | Self::FaultInjected
            | Self::CircuitOpen
            | Self::ConcurrencyLimit
            | Self::PendingLimit
            | Self::NoHealthyEndpoint
            | Self::NoRoute
            | Self::NotConfigured
            | Self::Forbidden
            | Self::DownstreamProtocol
            | Self::UnsupportedTransferCoding
            | Self::DownstreamDisconnect => false,
        }
    }

    /// The HTTP status the proxy answers with. A fault's own status overrides
    /// [`ErrorKind::FaultInjected`]'s (see [`ProxyError::status`]); a failure after the
    /// response head has none to send, and is given the status it would have had before.
    pub fn status(self) -> StatusCode {
        match self {
            Self::DownstreamProtocol => StatusCode::BAD_REQUEST,
            Self::RequestBodyIdle => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NoHealthyEndpoint
            | Self::PendingLimit
            | Self::NotConfigured
            | Self::CircuitOpen
            | Self::ConcurrencyLimit
            | Self::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            Self::ConnectTimeout
            | Self::RequestTimeout
            | Self::PerTryTimeout
            | Self::ResponseBodyIdle => StatusCode::GATEWAY_TIMEOUT,
            Self::ConnectRefused
            | Self::ConnectFailed
            | Self::TlsHandshake
            | Self::UpstreamResetBeforeHeaders
            | Self::UpstreamResetAfterHeaders
            | Self::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            // Envoy's and nginx's code for a caller that left (never sent: no one listens).
            Self::DownstreamDisconnect => CLIENT_CLOSED_REQUEST,
        }
    }

    /// The `grpc-status` a gRPC caller gets (a trailers-only response): the code gRPC's own
    /// HTTP mapping gives the status ([`grpc_status_for`]).
    pub fn grpc_status(self) -> &'static str {
        grpc_status_for(self.status())
    }

    /// The response flag: the `flags` metric label, `response_flags` in the access log and
    /// `outrider.response_flags` on spans.
    pub fn flag(self) -> ResponseFlag {
        match self {
            Self::DownstreamProtocol | Self::UnsupportedTransferCoding => {
                ResponseFlag::MalformedRequest
            }
            Self::NotConfigured | Self::NoRoute => ResponseFlag::NoRoute,
            Self::NoHealthyEndpoint => ResponseFlag::NoHealthyUpstream,
            // Envoy's UF covers a TLS handshake that failed: the connection never carried
            // the request.
            Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::ConnectFailed
            | Self::TlsHandshake => ResponseFlag::ConnectFailure,
            Self::UpstreamResetBeforeHeaders | Self::UpstreamResetAfterHeaders => {
                ResponseFlag::UpstreamReset
            }
            Self::UpstreamProtocol => ResponseFlag::UpstreamProtocolError,
            Self::RequestTimeout | Self::PerTryTimeout | Self::ResponseBodyIdle => {
                ResponseFlag::UpstreamTimeout
            }
            Self::RequestBodyIdle => ResponseFlag::RequestBodyIdle,
            Self::RateLimited => ResponseFlag::RateLimited,
            Self::FaultInjected => ResponseFlag::FaultInjected,
            Self::PendingLimit | Self::CircuitOpen | Self::ConcurrencyLimit => {
                ResponseFlag::Overflow
            }
            Self::Forbidden => ResponseFlag::Unauthorized,
            Self::DownstreamDisconnect => ResponseFlag::DownstreamCancelled,
        }
    }

    /// The metric label of this kind: its response flag's code (the `flags` label of the
    /// request metrics), a fixed set of bounded cardinality.
    pub fn metric_label(self) -> &'static str {
        self.flag().code()
    }

    /// The span's `error.type` (OpenTelemetry's low-cardinality failure class), when the
    /// kind has a name of its own; `None`: the HTTP status code stands for it, as the
    /// conventions ask when nothing more specific is known.
    pub fn error_type(self) -> Option<&'static str> {
        match self {
            Self::ConnectTimeout
            | Self::RequestTimeout
            | Self::PerTryTimeout
            | Self::ResponseBodyIdle
            | Self::RequestBodyIdle => Some("timeout"),
            Self::ConnectRefused => Some("connection_refused"),
            Self::UpstreamResetBeforeHeaders | Self::UpstreamResetAfterHeaders => {
                Some("connection_reset")
            }
            Self::DownstreamDisconnect => Some("cancelled"),
            Self::ConnectFailed
            | Self::TlsHandshake
            | Self::UpstreamProtocol
            | Self::RateLimited
            | Self::FaultInjected
            | Self::CircuitOpen
            | Self::ConcurrencyLimit
            | Self::PendingLimit
            | Self::NoHealthyEndpoint
            | Self::NoRoute
            | Self::NotConfigured
            | Self::Forbidden
            | Self::DownstreamProtocol
            | Self::UnsupportedTransferCoding => None,
        }
    }

    /// The request itself is malformed (counted in `outrider_http_malformed_requests_total`).
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            Self::DownstreamProtocol | Self::UnsupportedTransferCoding
        )
    }

    /// The answer closes the caller's connection: a client that sent one malformed request
    /// cannot be trusted to frame the next one; one that stalled mid-body has left the rest of
    /// it unread on the connection.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Self::DownstreamProtocol | Self::UnsupportedTransferCoding | Self::RequestBodyIdle
        )
    }
}

/// 499, the status Envoy and nginx log for a caller that went away (no one receives it).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// The gRPC status code a gRPC caller gets for an HTTP status the proxy produced (gRPC's
/// HTTP-to-gRPC mapping, with the proxy's own choices for 400 and 501).
pub fn grpc_status_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "13",      // INTERNAL
        StatusCode::NOT_FOUND => "12",        // UNIMPLEMENTED
        StatusCode::NOT_IMPLEMENTED => "12",  // UNIMPLEMENTED
        StatusCode::FORBIDDEN => "7",         // PERMISSION_DENIED
        StatusCode::TOO_MANY_REQUESTS => "8", // RESOURCE_EXHAUSTED
        StatusCode::REQUEST_TIMEOUT => "4",   // DEADLINE_EXCEEDED (the caller stalled)
        StatusCode::GATEWAY_TIMEOUT => "4",   // DEADLINE_EXCEEDED
        _ => "14",                            // UNAVAILABLE (502, 503)
    }
}

impl ProxyError {
    /// What failed. Every other property of the failure comes from it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BadRequest(_) => ErrorKind::DownstreamProtocol,
            Self::UnsupportedTransferCoding(_) => ErrorKind::UnsupportedTransferCoding,
            Self::NotConfigured(_) => ErrorKind::NotConfigured,
            Self::NoRoute(_) => ErrorKind::NoRoute,
            Self::NoEndpoints(_) | Self::AllEjected(_) | Self::AllUnreachable(_) => {
                ErrorKind::NoHealthyEndpoint
            }
            Self::ConnectRefused(_) => ErrorKind::ConnectRefused,
            Self::ConnectTimeout { .. } => ErrorKind::ConnectTimeout,
            Self::Connect { .. } => ErrorKind::ConnectFailed,
            Self::TlsHandshake(_) => ErrorKind::TlsHandshake,
            Self::UpstreamReset { .. } => ErrorKind::UpstreamResetBeforeHeaders,
            Self::UpstreamProtocol { .. } => ErrorKind::UpstreamProtocol,
            Self::RequestTimeout(_) => ErrorKind::RequestTimeout,
            Self::PerTryTimeout(_) => ErrorKind::PerTryTimeout,
            Self::RequestBodyTimeout(_) => ErrorKind::RequestBodyIdle,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::FaultAbort(_) => ErrorKind::FaultInjected,
            Self::PendingLimit(_) => ErrorKind::PendingLimit,
            Self::CircuitOpen(_) => ErrorKind::CircuitOpen,
            Self::ConcurrencyLimit(_) => ErrorKind::ConcurrencyLimit,
            Self::Forbidden { .. } => ErrorKind::Forbidden,
        }
    }

    /// The response flag of the response this failure is answered with.
    pub fn flag(&self) -> ResponseFlag {
        self.kind().flag()
    }

    /// The request itself is malformed (counted in `outrider_http_malformed_requests_total`).
    pub fn is_malformed(&self) -> bool {
        self.kind().is_malformed()
    }

    /// The HTTP status this failure is answered with: the kind's, or an injected fault's own.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::FaultAbort(status) => *status,
            _ => self.kind().status(),
        }
    }

    /// The `grpc-status` a gRPC caller gets: the kind's, or for an injected fault the one its
    /// status maps to.
    pub fn grpc_status(&self) -> &'static str {
        match self {
            Self::FaultAbort(status) => grpc_status_for(*status),
            _ => self.kind().grpc_status(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Method;

    use super::*;

    /// A kind, its status, grpc-status, flag, `error.type`, side, retry safety, upstream failure.
    type Row = (
        ErrorKind,
        u16,
        &'static str,
        &'static str,
        Option<&'static str>,
        Side,
        RetrySafety,
        bool,
    );

    /// Every kind's answers, one row each: status, grpc-status, flag, `error.type`, side,
    /// retry safety, and whether the breaker and outlier detection count it as the upstream's
    /// failure.
    #[test]
    fn each_kind_answers_from_one_table() {
        use ErrorKind as K;
        use RetrySafety::{IfIdempotent, Never, Safe};
        use Side::{Downstream as D, Internal as I, Upstream as U};
        #[rustfmt::skip]
        let table: [Row; 23] = [
            (K::ConnectRefused, 502, "14", "UF", Some("connection_refused"), U, Safe, true),
            (K::ConnectTimeout, 504, "4", "UF", Some("timeout"), U, Safe, true),
            (K::ConnectFailed, 502, "14", "UF", None, U, Safe, true),
            (K::TlsHandshake, 502, "14", "UF", None, U, Safe, true),
            (K::UpstreamResetBeforeHeaders, 502, "14", "UC", Some("connection_reset"), U, IfIdempotent, true),
            (K::UpstreamResetAfterHeaders, 502, "14", "UC", Some("connection_reset"), U, Never, true),
            (K::UpstreamProtocol, 502, "14", "UPE", None, U, IfIdempotent, true),
            (K::RequestTimeout, 504, "4", "UT", Some("timeout"), U, Never, true),
            (K::PerTryTimeout, 504, "4", "UT", Some("timeout"), U, IfIdempotent, true),
            (K::ResponseBodyIdle, 504, "4", "UT", Some("timeout"), U, Never, true),
            (K::RequestBodyIdle, 408, "4", "SI", Some("timeout"), D, Never, false),
            (K::RateLimited, 429, "8", "RL", None, I, Never, false),
            (K::FaultInjected, 503, "14", "FI", None, I, Never, false),
            (K::CircuitOpen, 503, "14", "UO", None, I, Never, false),
            (K::ConcurrencyLimit, 503, "14", "UO", None, I, Never, false),
            (K::PendingLimit, 503, "14", "UO", None, I, Never, false),
            (K::NoHealthyEndpoint, 503, "14", "UH", None, U, Never, false),
            (K::NoRoute, 404, "12", "NR", None, D, Never, false),
            (K::NotConfigured, 503, "14", "NR", None, I, Never, false),
            (K::Forbidden, 403, "7", "UAEX", None, D, Never, false),
            (K::DownstreamProtocol, 400, "13", "DPE", None, D, Never, false),
            (K::UnsupportedTransferCoding, 501, "12", "DPE", None, D, Never, false),
            (K::DownstreamDisconnect, 499, "14", "DC", Some("cancelled"), D, Never, false),
        ];
        assert_eq!(
            table.map(|row| row.0),
            ErrorKind::ALL,
            "one row per kind, in order"
        );
        for (kind, status, grpc, flag, error_type, side, retry, upstream) in table {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
            assert_eq!(kind.grpc_status(), grpc, "{kind:?}");
            assert_eq!(kind.flag().code(), flag, "{kind:?}");
            assert_eq!(kind.metric_label(), flag, "{kind:?}");
            assert_eq!(kind.error_type(), error_type, "{kind:?}");
            assert_eq!(kind.side(), side, "{kind:?}");
            assert_eq!(kind.retry_safety(), retry, "{kind:?}");
            assert_eq!(kind.is_upstream_failure(), upstream, "{kind:?}");
            assert_eq!(kind.is_connect_failure(), retry == Safe, "{kind:?}");
        }
    }

    #[test]
    fn only_idempotent_methods_go_again_after_the_request_may_have_arrived() {
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(RetrySafety::IfIdempotent.allows(&method, false), "{method}");
        }
        for method in [Method::POST, Method::PATCH] {
            assert!(
                !RetrySafety::IfIdempotent.allows(&method, false),
                "{method}"
            );
            assert!(
                RetrySafety::IfIdempotent.allows(&method, true),
                "opted in: {method}"
            );
            assert!(
                RetrySafety::Safe.allows(&method, false),
                "nothing sent: {method}"
            );
        }
        assert!(!RetrySafety::Never.allows(&Method::GET, true));
    }

    #[test]
    fn a_failure_is_no_larger_than_before_it_kept_its_sources() {
        // Results on the request path carry it: 64 bytes, as when TLS failures held a string.
        assert!(
            std::mem::size_of::<ProxyError>() <= 64,
            "{}",
            std::mem::size_of::<ProxyError>()
        );
    }

    #[test]
    fn a_fault_answers_with_its_own_status_and_the_grpc_code_for_it() {
        let fault = ProxyError::FaultAbort(StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(fault.kind(), ErrorKind::FaultInjected);
        assert_eq!(fault.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(fault.grpc_status(), "8");
        assert_eq!(fault.flag(), ResponseFlag::FaultInjected);
    }

    #[test]
    fn errors_keep_their_cause_as_source_and_show_the_reason() {
        let addr: SocketAddr = "10.0.0.7:8443".parse().expect("address");
        let cause = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad certificate");
        let mesh = ProxyError::TlsHandshake(Box::new(TlsFailure {
            addr,
            mesh: Some("wrong_identity"),
            message: "invalid peer certificate".into(),
            source: Some(cause()),
        }));
        assert_eq!(
            mesh.to_string(),
            "mesh TLS handshake with 10.0.0.7:8443 failed (wrong_identity): invalid peer certificate"
        );
        let source = std::error::Error::source(&mesh).expect("a source");
        assert!(
            source.downcast_ref::<std::io::Error>().is_some(),
            "{source:?}"
        );
        let origination = ProxyError::TlsHandshake(Box::new(TlsFailure {
            addr,
            mesh: None,
            message: "invalid peer certificate: UnknownIssuer".into(),
            source: None,
        }));
        assert_eq!(
            origination.to_string(),
            "tls handshake with 10.0.0.7:8443 failed: invalid peer certificate: UnknownIssuer"
        );
        assert!(std::error::Error::source(&origination).is_none());
        assert_eq!(mesh.kind(), origination.kind());
        let coding = ProxyError::UpstreamProtocol {
            addr,
            source: Box::new(TransferCodingError::Unsupported("gzip".into())),
        };
        assert_eq!(
            coding.to_string(),
            "upstream 10.0.0.7:8443 failed: unsupported transfer coding gzip"
        );
        let parse = ProxyError::UpstreamProtocol {
            addr,
            source: Box::new(cause()),
        };
        assert_eq!(
            parse.to_string(),
            "upstream 10.0.0.7:8443 failed: invalid response"
        );
        assert!(std::error::Error::source(&parse).is_some());
        let timeout = ProxyError::PerTryTimeout(Duration::from_millis(250));
        assert_eq!(timeout.kind().error_type(), Some("timeout"));
    }
}
