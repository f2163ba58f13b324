//! What the proxy reports about each request once its response body has ended: metrics (bytes,
//! time to end of stream, requests in flight), the JSON access-log line and the OTLP spans.
//!
//! Neither sink can slow the request path down: each is a bounded channel fed with
//! `try_send` and drained by its own task. When a channel is full the item is dropped and
//! counted (`outrider_spans_dropped_total`, `outrider_access_log_dropped_total`); nothing is
//! ever queued without bound or awaited by a request.

mod access_log;
mod export;
mod json;
pub mod metrics;
pub mod otlp;
pub mod routing;
pub mod span;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::HeaderValue;
use http::uri::Authority;
use http::{Method, StatusCode, Uri};
use tokio::time::Instant;

use crate::core::errors::{ErrorKind, ProxyError, ResponseFlag};
use crate::telemetry::metrics::RouteMetrics;
use crate::trace::{SpanId, TraceContext};

pub use access_log::{
    logged_path, lossless, rfc3339, version_name, AccessLog, AccessLogStyle, AccessRecord,
    LoggedRequest, ACCESS_LOG_QUEUE,
};
pub use export::{ExporterError, SpanSink, Spans, SPAN_QUEUE};

/// One attempt of an exchange, kept for its span when the trace is sampled and exported.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    /// The attempt's span id (the parent the upstream saw).
    pub span_id: SpanId,
    /// 1-based.
    pub number: u32,
    /// The endpoint tried.
    pub endpoint: SocketAddr,
    /// When it started and ended (response headers or failure).
    pub started: Instant,
    /// End of the attempt.
    pub ended: Instant,
    /// Response status, if one came back.
    pub status: Option<StatusCode>,
    /// Failure, if the attempt failed without a response.
    pub error: Option<String>,
    /// The kind of `error` (the span's `error.type` comes from it).
    pub error_kind: Option<ErrorKind>,
}

/// What the exchange did, filled in by the forwarding code.
#[derive(Debug, Default)]
pub struct ExchangeReport {
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// Attempts made.
    pub attempts: u32,
    /// Why the exchange failed, when the proxy answered for the upstream.
    pub error: Option<String>,
    /// The kind of `error`.
    pub error_kind: Option<ErrorKind>,
    /// Attempt spans (only when they are exported).
    pub spans: Vec<AttemptSpan>,
    /// The HTTP version of the request as sent upstream (once prepared).
    pub version: Option<http::Version>,
    /// An upstream sent the response head (the proxy did not make the response).
    pub answered: bool,
    /// Who made the response: set where the proxy makes its own, from the failure's kind.
    pub flag: ResponseFlag,
}

impl ExchangeReport {
    /// The proxy answered for the upstream because of `error`: its flag, kind and text.
    pub fn fail(&mut self, error: &ProxyError) {
        self.flag = error.flag();
        self.error_kind = Some(error.kind());
        self.error = Some(error.to_string());
    }
}

/// Everything needed to report a request when its response body ends. Built once per
/// request, owned by the exchange's completion (`io::completion`) from the start, which
/// reports with it once, when the body ends or the caller goes away (with or without a
/// response): the order of the reports is the completion's.
pub struct Finish {
    /// The matched target's metrics and labels.
    pub metrics: Arc<RouteMetrics>,
    /// Span sink, when the request is sampled and spans are exported.
    pub spans: Option<Arc<SpanSink>>,
    /// Access log, when on.
    pub access_log: Option<Arc<AccessLog>>,
    /// Server span (inbound) or client span (outbound).
    pub server: bool,
    /// Trace context of the request.
    pub trace: TraceContext,
    /// Arrival time, monotonic and wall-clock.
    pub started: Instant,
    /// Arrival time, wall-clock.
    pub started_wall: SystemTime,
    /// Method.
    pub method: Method,
    /// Request target as received; kept only for the access log and spans (a clone of it
    /// would hold on to the caller connection's read buffer until the response ends).
    pub uri: Option<Uri>,
    /// Authority as routed.
    pub authority: Option<Authority>,
    /// The caller's address.
    pub peer: SocketAddr,
    /// `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// Request body bytes forwarded so far, counted by the request body as it is read
    /// ([`crate::io::request_body::Counted`]); only the access log reads it, so only kept
    /// when it is on.
    pub request_bytes: Option<Arc<AtomicU64>>,
    /// Status sent.
    pub status: StatusCode,
    /// What the exchange did.
    pub report: ExchangeReport,
    /// The matched route's template (`http.route`), kept only when spans are exported.
    pub http_route: Option<Arc<str>>,
    /// Whether the request was gRPC.
    pub grpc: bool,
    /// The response's `grpc-status` (headers or trailers); read only when spans are exported.
    pub grpc_status: Option<u8>,
    /// The response headers went out (`status` is the one sent).
    pub responded: bool,
    /// The caller left before the response ended.
    pub cancelled: bool,
    /// What only the access log reads, when it is on.
    pub logged: Option<Box<LoggedOnly>>,
}

/// What a request's access-log line needs beyond its metrics and spans; boxed, so a request
/// that is not logged carries one pointer for it.
#[derive(Debug, Default)]
pub struct LoggedOnly {
    /// How the line is written.
    pub style: AccessLogStyle,
    /// The caller's HTTP version.
    pub version: http::Version,
    /// `user-agent`.
    pub user_agent: Option<HeaderValue>,
    /// The caller's (inbound) or upstream's (outbound) mTLS identity.
    pub peer_identity: Option<HeaderValue>,
    /// From arrival to the response head (the upstream's, when `report.answered`).
    pub head_elapsed: Duration,
}

impl Drop for Finish {
    fn drop(&mut self) {
        // Here rather than in the report, so that whatever ends the request (its completion,
        // or a panic that unwinds past it) it is not counted in flight forever.
        self.metrics.traffic.active.dec();
    }
}

/// How a request ended, as its report reads it: worked out once by [`Finish::ending`], then
/// read by the metrics ([`Finish::count`]), the access log ([`Finish::log`]) and the span
/// ([`Finish::span`]).
#[derive(Debug)]
pub struct Ending {
    /// Response body bytes sent.
    bytes: u64,
    /// From arrival to the end.
    elapsed: Duration,
    /// Who made the response, or that the caller left.
    flag: ResponseFlag,
    /// The kind of `error`.
    error_kind: Option<ErrorKind>,
    /// Why the exchange failed, if it did; taken by the last report that reads it.
    error: Option<String>,
}

impl Finish {
    /// Counts a request to `target` as in flight until its `Finish` is dropped.
    pub fn begin(metrics: &RouteMetrics) {
        metrics.traffic.active.inc();
    }

    /// The request ended after `bytes` response body bytes: `cancelled` when the caller left
    /// before the end, with `error` (its kind and text) when the body broke. The three reports
    /// follow ([`Finish::count`], [`Finish::log`], [`Finish::span`]).
    pub fn ending(
        &mut self,
        bytes: u64,
        cancelled: bool,
        error: Option<(ErrorKind, String)>,
    ) -> Ending {
        self.cancelled = cancelled;
        let flag = if self.cancelled || !self.responded {
            ResponseFlag::DownstreamCancelled
        } else {
            self.report.flag
        };
        let (error_kind, error) = match (self.cancelled, &self.report.error) {
            (true, _) => (
                Some(ErrorKind::DownstreamDisconnect),
                Some(format!(
                    "{}: the caller went away before the response ended",
                    metrics::CANCELLED
                )),
            ),
            (false, Some(reported)) => (self.report.error_kind, Some(reported.clone())),
            (false, None) => error.map_or((None, None), |(kind, text)| (Some(kind), Some(text))),
        };
        Ending {
            bytes,
            elapsed: self.started.elapsed(),
            flag,
            error_kind,
            error,
        }
    }

    /// The metrics: the request counted by status and flag, its response bytes and its time
    /// to the end of the stream.
    pub fn count(&self, ended: &Ending) {
        self.metrics
            .count_ended(&self.method, self.status, ended.flag);
        let traffic = &self.metrics.traffic;
        // `outrider_request_bytes_total` is added to by the request body itself when it ends,
        // which can be after this (an upstream answering before reading the whole body).
        traffic.response_bytes.inc_by(ended.bytes);
        traffic.stream_duration.observe(ended.elapsed.as_secs_f64());
    }

    /// The access-log line, when the log is on.
    /// What only the log needs is moved into the record (the span, next, does not read it).
    pub fn log(&mut self, ended: &mut Ending) {
        let (Some(log), Some(logged)) = (&self.access_log, self.logged.take()) else {
            return;
        };
        // The span reads the error after the line: it is cloned only when a span follows.
        let error = match self.spans {
            Some(_) => ended.error.clone(),
            None => ended.error.take(),
        };
        let labels = &self.metrics.labels;
        log.record(AccessRecord {
            time: self.started_wall,
            ids: Some((self.trace.trace_id, self.trace.span_id)),
            direction: Arc::clone(&labels.direction),
            service: Arc::clone(&labels.service),
            route: Arc::clone(&labels.route),
            method: Some(self.method.clone()),
            // Copied, not shared: the request's URI, authority and headers share the caller
            // connection's read buffer, which a queued record would keep alive for as long as
            // it waits (a full queue's worth while the collector or stdout is slow), and the
            // writer thread freeing the last reference to a buffer cost a cross-thread free.
            // Copied as plain text: parsing the copies again into an `Authority` and a `Uri`
            // cost more than copying them.
            request: LoggedRequest::new(
                self.authority.as_ref().map(Authority::as_str),
                Some(logged_target(self.uri.as_ref())),
                [
                    self.request_id.as_ref(),
                    logged.user_agent.as_ref(),
                    logged.peer_identity.as_ref(),
                ],
            ),
            // 0: no response went out (as Envoy logs it).
            status: if self.responded {
                self.status.as_u16()
            } else {
                0
            },
            response_flags: ended.flag,
            upstream: self.report.endpoint,
            attempts: self.report.attempts,
            duration: ended.elapsed,
            // Final whenever the upstream read the whole request before its response
            // ended (the usual order: a byte reaches the upstream only after it is
            // counted). An upstream that answers early (a 413, a streaming reply cut
            // short) leaves the request body unfinished: the line then has the bytes
            // that passed so far, while the metric gets the rest when the body ends.
            request_bytes: self
                .request_bytes
                .as_ref()
                .map_or(0, |seen| seen.load(Ordering::Relaxed)),
            response_bytes: ended.bytes,
            error,
            peer: Some(self.peer),
            http_version: version_name(logged.version),
            upstream_duration: self.report.answered.then_some(logged.head_elapsed),
            grpc_status: self.grpc_status,
            style: logged.style,
        });
    }

    /// The request's spans (and its attempts'), when it is sampled and spans are exported.
    /// What only the span needs is moved out of the report.
    pub fn span(&mut self, ended: Ending) {
        let Some(sink) = &self.spans else {
            return;
        };
        let labels = &self.metrics.labels;
        sink.record(span::RequestSpan {
            server: self.server,
            trace: self.trace.clone(),
            started: self.started,
            started_wall: self.started_wall,
            elapsed: ended.elapsed,
            method: self.method.clone(),
            // Copied, as for the access log.
            target: span::SpanTarget::new(self.uri.as_ref(), self.authority.as_ref()),
            version: self.report.version,
            peer: self.peer,
            endpoint: self.report.endpoint,
            service: Arc::clone(&labels.service),
            route: Arc::clone(&labels.route),
            http_route: self.http_route.take(),
            attempts: self.report.attempts,
            status: self.responded.then_some(self.status),
            grpc: self.grpc,
            grpc_status: self.grpc_status,
            error: ended.error,
            error_kind: ended.error_kind,
            cancelled: self.cancelled,
            flag: ended.flag,
            attempt_spans: std::mem::take(&mut self.report.spans),
        });
    }
}

/// What an access-log line keeps of `uri`: its path and query (`/` without them, or without a
/// URI); copied into the record by [`LoggedRequest::new`].
pub fn logged_target(uri: Option<&Uri>) -> &str {
    uri.and_then(Uri::path_and_query)
        .map_or("/", |p| p.as_str())
}
