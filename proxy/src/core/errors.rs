//! The proxy's own failures, each with the status it is answered with. The one place that
//! turns them into responses is [`rescue`](crate::http::rescue).

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
    #[error("connect error to {addr}: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The OS error.
        reason: std::io::Error,
    },
    /// The upstream closed or reset the connection before a complete response.
    #[error("upstream {0} reset the connection")]
    UpstreamReset(SocketAddr),
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
    /// The TLS handshake with an external service (`tls: { sni }`) failed.
    #[error("tls handshake with {addr} failed: {message}")]
    TlsHandshake {
        /// The endpoint.
        addr: SocketAddr,
        /// rustls's error (untrusted issuer, not valid for the name...).
        message: String,
    },
    /// Any other failure talking to the upstream.
    #[error("upstream {addr} failed: {reason}")]
    Upstream {
        /// The endpoint.
        addr: SocketAddr,
        /// What hyper reported.
        reason: String,
    },
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

impl ProxyError {
    /// The response flag of the response this failure is answered with.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::BadRequest(_) | Self::UnsupportedTransferCoding(_) => {
                ResponseFlag::MalformedRequest
            }
            Self::NotConfigured(_) | Self::NoRoute(_) => ResponseFlag::NoRoute,
            Self::NoEndpoints(_) | Self::AllEjected(_) | Self::AllUnreachable(_) => {
                ResponseFlag::NoHealthyUpstream
            }
            Self::ConnectRefused(_)
            | Self::ConnectTimeout { .. }
            | Self::Connect { .. }
            | Self::TlsHandshake { .. } => ResponseFlag::ConnectFailure,
            Self::UpstreamReset(_) => ResponseFlag::UpstreamReset,
            Self::Upstream { .. } => ResponseFlag::UpstreamProtocolError,
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) => ResponseFlag::UpstreamTimeout,
            Self::RequestBodyTimeout(_) => ResponseFlag::RequestBodyIdle,
            Self::RateLimited { .. } => ResponseFlag::RateLimited,
            Self::FaultAbort(_) => ResponseFlag::FaultInjected,
            Self::PendingLimit(_) | Self::CircuitOpen(_) | Self::ConcurrencyLimit(_) => {
                ResponseFlag::Overflow
            }
            Self::Forbidden { .. } => ResponseFlag::Unauthorized,
        }
    }

    /// The request itself is malformed (counted in `outrider_http_malformed_requests_total`).
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            Self::BadRequest(_) | Self::UnsupportedTransferCoding(_)
        )
    }

    /// The HTTP status this failure is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::FaultAbort(status) => *status,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NoEndpoints(_)
            | Self::AllEjected(_)
            | Self::AllUnreachable(_)
            | Self::PendingLimit(_)
            | Self::NotConfigured(_)
            | Self::CircuitOpen(_)
            | Self::ConcurrencyLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ConnectTimeout { .. } | Self::RequestTimeout(_) | Self::PerTryTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::ConnectRefused(_)
            | Self::Connect { .. }
            | Self::UpstreamReset(_)
            | Self::TlsHandshake { .. }
            | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}
