//! The content of the spans the proxy exports: a request span (server span inbound, client
//! span outbound) and one child client span per attempt under retries, with OpenTelemetry's
//! HTTP and gRPC semantic conventions. Built only for sampled requests when spans are
//! exported, so nothing here runs on the request path of an untraced request.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use http::{Method, StatusCode, Uri, Version};
use opentelemetry::trace::{
    SpanContext, SpanId as OtelSpanId, SpanKind, Status, TraceFlags, TraceId as OtelTraceId,
    TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use tokio::time::Instant;

use crate::telemetry::metrics::{RouteLabels, CANCELLED};
use crate::telemetry::AttemptSpan;
use crate::trace::{SpanId, TraceContext};

/// What replaces each query value in `url.query` and `url.full`: OpenTelemetry's word for
/// scrubbed content. Query strings often carry secrets (`?token=...`); the keys stay, so a
/// span still tells which parameters a request had.
const REDACTED: &str = "REDACTED";

/// Everything a request span says, borrowed from the exchange.
pub struct RequestSpan<'a> {
    /// Server span (inbound) or client span (outbound).
    pub server: bool,
    /// The request's trace context (its span id is the span's).
    pub trace: &'a TraceContext,
    /// Arrival, monotonic.
    pub started: Instant,
    /// Arrival, wall-clock.
    pub started_wall: SystemTime,
    /// Arrival to end.
    pub elapsed: Duration,
    /// Method.
    pub method: &'a Method,
    /// Request target as received.
    pub uri: Option<&'a Uri>,
    /// Authority as routed.
    pub authority: Option<&'a Authority>,
    /// HTTP version on this span's side: the caller's for a server span, the upstream's for a
    /// client span.
    pub version: Option<Version>,
    /// The caller's address.
    pub peer: SocketAddr,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// Direction, service and route name.
    pub labels: &'a RouteLabels,
    /// The matched route's template (`http.route`), when a route matched.
    pub http_route: Option<&'a str>,
    /// Attempts made.
    pub attempts: u32,
    /// Status sent; `None` when the caller left before the response headers.
    pub status: Option<StatusCode>,
    /// Whether the request was gRPC.
    pub grpc: bool,
    /// The response's `grpc-status`, from its headers or trailers.
    pub grpc_status: Option<u8>,
    /// Why the exchange failed, if it did.
    pub error: Option<&'a str>,
    /// The caller abandoned the exchange before its response ended.
    pub cancelled: bool,
    /// Who made the response (`outrider.response_flags`).
    pub flag: crate::core::errors::ResponseFlag,
}

impl RequestSpan<'_> {
    /// The span and its attempts' child spans, for `scope`.
    pub fn build(&self, attempts: &[AttemptSpan], scope: &InstrumentationScope) -> Vec<SpanData> {
        let mut spans = Vec::with_capacity(1 + attempts.len());
        spans.push(self.request_span(scope));
        let wall = |at: Instant| self.started_wall + at.saturating_duration_since(self.started);
        let method = method_name(self.method);
        let host = self.authority.map(Authority::host);
        for attempt in attempts {
            let mut attributes = vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("network.peer.address", attempt.endpoint.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(attempt.endpoint.port())),
            ];
            if let Some(host) = host {
                attributes.push(KeyValue::new("server.address", host.to_string()));
            }
            if attempt.number > 1 {
                attributes.push(KeyValue::new(
                    "http.request.resend_count",
                    i64::from(attempt.number - 1),
                ));
            }
            let status = match (attempt.status, &attempt.error) {
                (_, Some(reason)) => {
                    attributes.push(KeyValue::new(
                        "error.type",
                        error_type(reason, StatusCode::BAD_GATEWAY),
                    ));
                    Status::error(reason.clone())
                }
                (Some(code), None) => {
                    attributes.push(KeyValue::new(
                        "http.response.status_code",
                        i64::from(code.as_u16()),
                    ));
                    // An attempt is a client span: 4xx and 5xx are errors.
                    if code.is_client_error() || code.is_server_error() {
                        attributes.push(KeyValue::new("error.type", code.as_str().to_string()));
                        Status::error("")
                    } else {
                        Status::Unset
                    }
                }
                (None, None) => Status::Unset,
            };
            spans.push(SpanData {
                span_context: self.context(attempt.span_id),
                parent_span_id: OtelSpanId::from_bytes(self.trace.span_id.0),
                parent_span_is_remote: false,
                span_kind: SpanKind::Client,
                name: Cow::Borrowed(method),
                start_time: wall(attempt.started),
                end_time: wall(attempt.ended),
                attributes,
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status,
                instrumentation_scope: scope.clone(),
            });
        }
        spans
    }

    fn context(&self, span: SpanId) -> SpanContext {
        let mut flags = TraceFlags::SAMPLED;
        if self.trace.random {
            flags = TraceFlags::new(flags.to_u8() | 0x02);
        }
        // The tracestate forwarded with the request. OpenTelemetry's parser knows only Level 1
        // keys (`tenant@system`); a Level 2 key it refuses leaves the span's empty.
        let state = self
            .trace
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceState::from_str(v).ok())
            .unwrap_or(TraceState::NONE);
        SpanContext::new(
            OtelTraceId::from_bytes(self.trace.trace_id.0),
            OtelSpanId::from_bytes(span.0),
            flags,
            false,
            state,
        )
    }

    fn request_span(&self, scope: &InstrumentationScope) -> SpanData {
        let method = method_name(self.method);
        let path = self.uri.map_or("/", Uri::path);
        let query = self.uri.and_then(Uri::query).map(redact_query);
        let mut attributes = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.scheme", "http"),
            KeyValue::new("url.path", path.to_string()),
            KeyValue::new("outrider.service", self.labels.service.to_string()),
            KeyValue::new("outrider.route", self.labels.route.to_string()),
            KeyValue::new("outrider.attempts", i64::from(self.attempts)),
            KeyValue::new("outrider.response_flags", self.flag.code()),
        ];
        if let Some(route) = self.http_route {
            attributes.push(KeyValue::new("http.route", route.to_string()));
        }
        if let Some(status) = self.status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
        }
        if let Some(version) = self.version.and_then(protocol_version) {
            attributes.push(KeyValue::new("network.protocol.version", version));
        }
        if let Some(authority) = self.authority {
            attributes.push(KeyValue::new(
                "server.address",
                authority.host().to_string(),
            ));
            // Without a port in Host, the scheme's default one (the proxy speaks http to the
            // app and to its upstreams' sidecars; TLS origination is below url.scheme).
            let port = authority.port_u16().unwrap_or(80);
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        if self.server {
            attributes.push(KeyValue::new("client.address", self.peer.ip().to_string()));
            if let Some(query) = &query {
                attributes.push(KeyValue::new("url.query", query.clone()));
            }
        } else {
            if let Some(authority) = self.authority {
                let mut full = format!("http://{}{path}", authority.as_str());
                if let Some(query) = &query {
                    let _ = write!(full, "?{query}");
                }
                attributes.push(KeyValue::new("url.full", full));
            }
            if let Some(endpoint) = self.endpoint {
                attributes.push(KeyValue::new(
                    "network.peer.address",
                    endpoint.ip().to_string(),
                ));
                attributes.push(KeyValue::new(
                    "network.peer.port",
                    i64::from(endpoint.port()),
                ));
            }
        }
        if self.grpc {
            attributes.push(KeyValue::new("rpc.system", "grpc"));
            // `/package.Service/Method`.
            if let Some((service, rpc)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) {
                attributes.push(KeyValue::new("rpc.service", service.to_string()));
                attributes.push(KeyValue::new("rpc.method", rpc.to_string()));
            }
            if let Some(code) = self.grpc_status {
                attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            }
        }
        let (error_type, status) = self.outcome();
        if let Some(error_type) = error_type {
            attributes.push(KeyValue::new("error.type", error_type));
        }
        SpanData {
            span_context: self.context(self.trace.span_id),
            parent_span_id: self
                .trace
                .parent_id
                .map_or(OtelSpanId::INVALID, |p| OtelSpanId::from_bytes(p.0)),
            parent_span_is_remote: self.trace.parent_id.is_some(),
            span_kind: if self.server {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            name: Cow::Borrowed(method),
            start_time: self.started_wall,
            end_time: self.started_wall + self.elapsed,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: scope.clone(),
        }
    }

    /// `error.type` and span status, by OpenTelemetry's conventions: a caller that left is an
    /// error (`cancelled`); so is a failure of the proxy's own. A gRPC status decides for gRPC
    /// (client span: any code but OK; server span: only the codes that mean the server
    /// failed). Otherwise by HTTP status: 5xx is an error on both sides, 4xx on a client span
    /// only (on a server span it is the caller's mistake, not the server's failure).
    fn outcome(&self) -> (Option<String>, Status) {
        if self.cancelled {
            return (
                Some(CANCELLED.to_string()),
                Status::error("the caller went away before the response ended"),
            );
        }
        if let Some(reason) = self.error {
            match self.status {
                // The caller's mistake even when the proxy answered it (a 404 for no route, a
                // 429): not a failure of this server.
                Some(s) if self.server && s.is_client_error() => return (None, Status::Unset),
                status => {
                    let status = status.unwrap_or(StatusCode::BAD_GATEWAY);
                    let kind = error_type(reason, status);
                    return (Some(kind), Status::error(reason.to_string()));
                }
            }
        }
        if let (true, Some(code)) = (self.grpc, self.grpc_status) {
            let failed = match self.server {
                true => GRPC_SERVER_ERRORS.contains(&code),
                false => code != 0,
            };
            return match failed {
                true => (Some(grpc_code_name(code).to_string()), Status::error("")),
                false => (None, Status::Unset),
            };
        }
        match self.status {
            Some(s) if s.is_server_error() || (!self.server && s.is_client_error()) => {
                (Some(s.as_str().to_string()), Status::error(""))
            }
            _ => (None, Status::Unset),
        }
    }
}

/// gRPC codes that make a server span an error (OpenTelemetry's gRPC conventions): UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
const GRPC_SERVER_ERRORS: [u8; 6] = [2, 4, 12, 13, 14, 15];

/// The canonical name of a gRPC status code.
fn grpc_code_name(code: u8) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "_OTHER",
    }
}

/// `network.protocol.version` of an HTTP version.
fn protocol_version(version: Version) -> Option<&'static str> {
    match version {
        Version::HTTP_09 => Some("0.9"),
        Version::HTTP_10 => Some("1.0"),
        Version::HTTP_11 => Some("1.1"),
        Version::HTTP_2 => Some("2"),
        Version::HTTP_3 => Some("3"),
        _ => None,
    }
}

/// A query string with every value replaced by [`REDACTED`]: `a=1&b&c=` keeps `a=REDACTED&b&c=`.
fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, value)) if !value.is_empty() => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    out
}

/// A low-cardinality `error.type`: the proxy's error kind, from its message.
fn error_type(reason: &str, status: StatusCode) -> String {
    let kind = if reason.contains("timed out") || reason.contains("timeout") {
        "timeout"
    } else if reason.contains("refused") {
        "connection_refused"
    } else if reason.contains("reset") || reason.contains("closed") {
        "connection_reset"
    } else {
        return status.as_str().to_string();
    };
    kind.to_string()
}

/// Standard methods as static strings (span names need `'static` to avoid an allocation).
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        // Semantic conventions: unknown methods are reported as _OTHER.
        _ => "_OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_redacted_keys_kept() {
        assert_eq!(
            redact_query("token=s3cret&q=1"),
            "token=REDACTED&q=REDACTED"
        );
        assert_eq!(redact_query("flag&empty=&a=b=c"), "flag&empty=&a=REDACTED");
        assert_eq!(redact_query(""), "");
    }

    #[test]
    fn grpc_server_errors_are_the_conventions_six() {
        let names: Vec<&str> = GRPC_SERVER_ERRORS
            .iter()
            .map(|&c| grpc_code_name(c))
            .collect();
        assert_eq!(
            names,
            [
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS"
            ]
        );
    }
}
