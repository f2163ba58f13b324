//! The content of the spans the proxy exports: a request span (server span inbound, client
//! span outbound) and one child client span per attempt under retries, with OpenTelemetry's
//! HTTP and gRPC semantic conventions. A sampled request queues a [`RequestSpan`] (what it
//! already holds, moved or cheaply cloned); the export task turns it into OTLP protobuf,
//! written directly rather than through the opentelemetry types (which cost an allocation
//! per attribute and a deep copy per span when converted).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use http::{Method, StatusCode, Uri, Version};
use opentelemetry::trace::TraceState;
use tokio::time::Instant;

use crate::core::errors::ErrorKind;
use crate::telemetry::metrics::CANCELLED;
use crate::telemetry::AttemptSpan;
use crate::trace::{SpanId, TraceContext};

/// What replaces each query value in `url.query` and `url.full`: OpenTelemetry's word for
/// scrubbed content. Query strings often carry secrets (`?token=...`); the keys stay, so a
/// span still tells which parameters a request had.
const REDACTED: &str = "REDACTED";

/// Everything a request span and its attempts' spans say, taken from the exchange when it
/// ends. This is what the request path queues; the export task encodes it to OTLP protobuf
/// ([`RequestSpan::encode`]), so attribute building and encoding cost the request nothing.
#[derive(Debug)]
pub struct RequestSpan {
    /// Server span (inbound) or client span (outbound).
    pub server: bool,
    /// The request's trace context (its span id is the span's).
    pub trace: TraceContext,
    /// Arrival, monotonic.
    pub started: Instant,
    /// Arrival, wall-clock.
    pub started_wall: SystemTime,
    /// Arrival to end.
    pub elapsed: Duration,
    /// Method.
    pub method: Method,
    /// Authority as routed and the request's path and query.
    pub target: SpanTarget,
    /// HTTP version on this span's side: the caller's for a server span, the upstream's for a
    /// client span.
    pub version: Option<Version>,
    /// The caller's address.
    pub peer: SocketAddr,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// The service (`outrider.service`).
    pub service: Arc<str>,
    /// The route name (`outrider.route`).
    pub route: Arc<str>,
    /// The matched route's template (`http.route`), when a route matched.
    pub http_route: Option<Arc<str>>,
    /// Attempts made.
    pub attempts: u32,
    /// Status sent; `None` when the caller left before the response headers.
    pub status: Option<StatusCode>,
    /// Whether the request was gRPC.
    pub grpc: bool,
    /// The response's `grpc-status`, from its headers or trailers.
    pub grpc_status: Option<u8>,
    /// Why the exchange failed, if it did.
    pub error: Option<String>,
    /// The kind of `error` (`error.type` comes from it).
    pub error_kind: Option<ErrorKind>,
    /// The caller abandoned the exchange before its response ended.
    pub cancelled: bool,
    /// Who made the response (`outrider.response_flags`).
    pub flag: crate::core::errors::ResponseFlag,
    /// The attempts, each a child client span.
    pub attempt_spans: Vec<AttemptSpan>,
}

/// A span's status: unset, or an error with its description.
#[derive(Debug, PartialEq, Eq)]
enum SpanStatus<'a> {
    Unset,
    Error(&'a str),
}

/// OTLP's `Span.SpanKind` values.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// OTLP's `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;
/// `SpanFlags`: the W3C flags, plus "whether the parent is remote is known" and "it is".
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_RANDOM: u32 = 0x02;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

impl RequestSpan {
    /// How many spans it holds: the request's and one per recorded attempt.
    pub fn count(&self) -> u64 {
        1 + self.attempt_spans.len() as u64
    }

    /// Appends the request's span and its attempts' spans to `out`, each as a `spans` field
    /// of an OTLP `ScopeSpans` message, encoded in place.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // Split once: every span of the request reports the same host.
        let host = self.target.authority().map(host_and_port);
        let mut ip = IpText::default();
        let framed = pb::open(out, SCOPE_SPANS_SPANS);
        self.encode_request_span(out, host, &mut ip);
        pb::close(out, framed);
        for attempt in &self.attempt_spans {
            let framed = pb::open(out, SCOPE_SPANS_SPANS);
            self.encode_attempt(attempt, out, host.map(|(host, _)| host), &mut ip);
            pb::close(out, framed);
        }
    }

    /// The span's tracestate: the one forwarded with the request. OpenTelemetry's parser
    /// knows only Level 1 keys (`tenant@system`); a Level 2 key it refuses leaves the span's
    /// empty.
    fn trace_state(&self) -> String {
        self.trace
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceState::from_str(v).ok())
            .map(|state| state.header())
            .unwrap_or_default()
    }

    /// The fields every span of the request shares, up to its name.
    fn encode_head(&self, out: &mut Vec<u8>, span: SpanId, parent: Option<SpanId>, remote: bool) {
        pb::bytes(out, 1, &self.trace.trace_id.0);
        pb::bytes(out, 2, &span.0);
        let state = self.trace_state();
        if !state.is_empty() {
            pb::bytes(out, 3, state.as_bytes());
        }
        if let Some(parent) = parent {
            pb::bytes(out, 4, &parent.0);
        }
        let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
        if self.trace.random {
            flags |= FLAG_RANDOM;
        }
        if remote {
            flags |= FLAG_IS_REMOTE;
        }
        pb::fixed32(out, 16, flags);
        pb::bytes(out, 5, method_name(&self.method).as_bytes());
    }

    /// Wall-clock nanoseconds of `at`, a monotonic time of this exchange.
    fn wall_nanos(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.started);
        unix_nanos(self.started_wall).saturating_add(nanos(since))
    }

    fn encode_attempt(
        &self,
        attempt: &AttemptSpan,
        out: &mut Vec<u8>,
        host: Option<&str>,
        ip: &mut IpText,
    ) {
        self.encode_head(out, attempt.span_id, Some(self.trace.span_id), false);
        pb::varint(out, 6, KIND_CLIENT);
        pb::fixed64(out, 7, self.wall_nanos(attempt.started));
        pb::fixed64(out, 8, self.wall_nanos(attempt.ended));
        pb::attr_str(out, "http.request.method", method_name(&self.method));
        pb::attr_text(out, "network.peer.address", ip.of(attempt.endpoint.ip()));
        pb::attr_int(out, "network.peer.port", i64::from(attempt.endpoint.port()));
        if let Some(host) = host {
            pb::attr_str(out, "server.address", host);
        }
        if attempt.number > 1 {
            pb::attr_int(
                out,
                "http.request.resend_count",
                i64::from(attempt.number - 1),
            );
        }
        let status = match (attempt.status, &attempt.error) {
            (_, Some(reason)) => {
                let kind = error_type(attempt.error_kind, StatusCode::BAD_GATEWAY);
                pb::attr_str(out, "error.type", &kind);
                SpanStatus::Error(reason)
            }
            (Some(code), None) => {
                pb::attr_int(out, "http.response.status_code", i64::from(code.as_u16()));
                // An attempt is a client span: 4xx and 5xx are errors.
                if code.is_client_error() || code.is_server_error() {
                    pb::attr_str(out, "error.type", code.as_str());
                    SpanStatus::Error("")
                } else {
                    SpanStatus::Unset
                }
            }
            (None, None) => SpanStatus::Unset,
        };
        pb::status(out, &status);
    }

    fn encode_request_span(
        &self,
        out: &mut Vec<u8>,
        host: Option<(&str, Option<u16>)>,
        ip: &mut IpText,
    ) {
        let remote = self.trace.parent_id.is_some();
        self.encode_head(out, self.trace.span_id, self.trace.parent_id, remote);
        pb::varint(
            out,
            6,
            if self.server {
                KIND_SERVER
            } else {
                KIND_CLIENT
            },
        );
        let start = unix_nanos(self.started_wall);
        pb::fixed64(out, 7, start);
        pb::fixed64(out, 8, start.saturating_add(nanos(self.elapsed)));
        let method = method_name(&self.method);
        let path = self.target.path();
        let query = self.target.query().map(redact_query);
        pb::attr_str(out, "http.request.method", method);
        pb::attr_str(out, "url.scheme", "http");
        pb::attr_str(out, "url.path", path);
        pb::attr_str(out, "outrider.service", &self.service);
        pb::attr_str(out, "outrider.route", &self.route);
        pb::attr_int(out, "outrider.attempts", i64::from(self.attempts));
        pb::attr_str(out, "outrider.response_flags", self.flag.code());
        if let Some(route) = &self.http_route {
            pb::attr_str(out, "http.route", route);
        }
        if let Some(status) = self.status {
            pb::attr_int(out, "http.response.status_code", i64::from(status.as_u16()));
        }
        if let Some(version) = self.version.and_then(protocol_version) {
            pb::attr_str(out, "network.protocol.version", version);
        }
        if let Some((host, port)) = host {
            pb::attr_str(out, "server.address", host);
            // Without a port in Host, the scheme's default one (the proxy speaks http to the
            // app and to its upstreams' sidecars; TLS origination is below url.scheme).
            pb::attr_int(out, "server.port", i64::from(port.unwrap_or(80)));
        }
        if self.server {
            pb::attr_text(out, "client.address", ip.of(self.peer.ip()));
            if let Some(query) = &query {
                pb::attr_str(out, "url.query", query);
            }
        } else {
            if let Some(authority) = self.target.authority() {
                let full = [
                    "http://",
                    authority,
                    path,
                    if query.is_some() { "?" } else { "" },
                    query.as_deref().unwrap_or(""),
                ];
                pb::attr_concat(out, "url.full", &full);
            }
            if let Some(endpoint) = self.endpoint {
                pb::attr_text(out, "network.peer.address", ip.of(endpoint.ip()));
                pb::attr_int(out, "network.peer.port", i64::from(endpoint.port()));
            }
        }
        if self.grpc {
            pb::attr_str(out, "rpc.system", "grpc");
            // `/package.Service/Method`.
            if let Some((service, rpc)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) {
                pb::attr_str(out, "rpc.service", service);
                pb::attr_str(out, "rpc.method", rpc);
            }
            if let Some(code) = self.grpc_status {
                pb::attr_int(out, "rpc.grpc.status_code", i64::from(code));
            }
        }
        let (error_type, status) = self.outcome();
        if let Some(error_type) = error_type {
            pb::attr_str(out, "error.type", &error_type);
        }
        pb::status(out, &status);
    }

    /// `error.type` and span status, by OpenTelemetry's conventions: a caller that left is an
    /// error (`cancelled`); so is a failure of the proxy's own. A gRPC status decides for gRPC
    /// (client span: any code but OK; server span: only the codes that mean the server
    /// failed). Otherwise by HTTP status: 5xx is an error on both sides, 4xx on a client span
    /// only (on a server span it is the caller's mistake, not the server's failure).
    fn outcome(&self) -> (Option<Cow<'static, str>>, SpanStatus<'_>) {
        if self.cancelled {
            return (
                Some(Cow::Borrowed(CANCELLED)),
                SpanStatus::Error("the caller went away before the response ended"),
            );
        }
        if let Some(reason) = &self.error {
            match self.status {
                // The caller's mistake even when the proxy answered it (a 404 for no route, a
                // 429): not a failure of this server.
                Some(s) if self.server && s.is_client_error() => return (None, SpanStatus::Unset),
                status => {
                    let status = status.unwrap_or(StatusCode::BAD_GATEWAY);
                    let kind = error_type(self.error_kind, status);
                    return (Some(kind), SpanStatus::Error(reason));
                }
            }
        }
        if let (true, Some(code)) = (self.grpc, self.grpc_status) {
            let failed = match self.server {
                true => GRPC_SERVER_ERRORS.contains(&code),
                false => code != 0,
            };
            return match failed {
                true => (
                    Some(Cow::Borrowed(grpc_code_name(code))),
                    SpanStatus::Error(""),
                ),
                false => (None, SpanStatus::Unset),
            };
        }
        match self.status {
            Some(s) if s.is_server_error() || (!self.server && s.is_client_error()) => (
                Some(Cow::Owned(s.as_str().to_string())),
                SpanStatus::Error(""),
            ),
            _ => (None, SpanStatus::Unset),
        }
    }
}

/// `ScopeSpans.spans`.
const SCOPE_SPANS_SPANS: u32 = 2;

/// Nanoseconds since the Unix epoch (0 before it), as OTLP times are.
fn unix_nanos(at: SystemTime) -> u64 {
    nanos(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A request's authority and target as its spans report them, copied into one allocation of
/// their own when the exchange ends (the request's URI shares the caller connection's read
/// buffer, which a queued span would otherwise keep alive) and not parsed again: the parts'
/// bounds are kept, and the host is split off only when the span is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanTarget {
    /// The authority, the path, then `?` and the query when there is one.
    text: Box<str>,
    /// Where the authority ends (0 without one).
    authority_end: usize,
    /// Where the path ends (the `?`, or the end).
    path_end: usize,
    has_query: bool,
}

impl SpanTarget {
    /// `authority` as routed and `uri`'s path and query (the path is `/` without a URI, as
    /// for a request refused before it was read whole).
    pub fn new(uri: Option<&Uri>, authority: Option<&Authority>) -> Self {
        let authority = authority.map_or("", Authority::as_str);
        let path = uri.map_or("/", Uri::path);
        let query = uri.and_then(Uri::query);
        let query_len = query.map_or(0, |q| q.len() + 1);
        let mut text = String::with_capacity(authority.len() + path.len() + query_len);
        text.push_str(authority);
        text.push_str(path);
        if let Some(query) = query {
            text.push('?');
            text.push_str(query);
        }
        Self {
            text: text.into_boxed_str(),
            authority_end: authority.len(),
            path_end: authority.len() + path.len(),
            has_query: query.is_some(),
        }
    }

    /// The authority, if the request had one.
    pub fn authority(&self) -> Option<&str> {
        let authority = self.text.get(..self.authority_end)?;
        (!authority.is_empty()).then_some(authority)
    }

    /// The path (empty for an authority-form target).
    pub fn path(&self) -> &str {
        self.text
            .get(self.authority_end..self.path_end)
            .unwrap_or_default()
    }

    /// The query, without its `?`.
    pub fn query(&self) -> Option<&str> {
        let start = self.path_end.checked_add(1)?;
        self.has_query.then(|| self.text.get(start..)).flatten()
    }
}

/// An authority's host and port, read as [`Authority::host`] and [`Authority::port_u16`] read
/// them (userinfo skipped; an IPv6 host keeps its brackets), without their string searches.
fn host_and_port(authority: &str) -> (&str, Option<u16>) {
    let host_port = match authority.bytes().rposition(|b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let host = match host_port.as_bytes().first() {
        Some(b'[') => match host_port.bytes().position(|b| b == b']') {
            Some(end) => &host_port[..=end],
            None => host_port,
        },
        _ => match host_port.bytes().position(|b| b == b':') {
            Some(colon) => &host_port[..colon],
            None => host_port,
        },
    };
    let port = authority
        .bytes()
        .rposition(|b| b == b':')
        .and_then(|colon| authority[colon + 1..].parse::<u16>().ok());
    (host, port)
}

/// An IP address's text, formatted on the stack; the last one is kept, as a request's span
/// and its attempt's usually name the same endpoint.
struct IpText {
    buf: [u8; 48],
    last: Option<(std::net::IpAddr, usize)>,
}

impl Default for IpText {
    fn default() -> Self {
        Self {
            buf: [0; 48],
            last: None,
        }
    }
}

impl IpText {
    /// `ip`'s text (ASCII), as `Display` writes it.
    fn of(&mut self, ip: std::net::IpAddr) -> &[u8] {
        use std::io::Write as _;
        let written = match self.last {
            Some((last, written)) if last == ip => written,
            // From a table: `fmt` cost more than the rest of the attribute.
            _ => match ip {
                std::net::IpAddr::V4(v4) => {
                    let mut at = 0;
                    for octet in v4.octets() {
                        let entry = super::json::OCTETS[usize::from(octet)];
                        // All three bytes: what follows the digits is overwritten next.
                        self.buf[at..at + 3].copy_from_slice(&entry[..3]);
                        at += usize::from(entry[3]);
                        self.buf[at] = b'.';
                        at += 1;
                    }
                    // Without the last dot.
                    at - 1
                }
                std::net::IpAddr::V6(_) => {
                    let mut rest = &mut self.buf[..];
                    // The longest IPv6 text is 45 bytes: it fits.
                    let _ = write!(rest, "{ip}");
                    48 - rest.len()
                }
            },
        };
        self.last = Some((ip, written));
        &self.buf[..written]
    }
}

/// The few protobuf writes an OTLP span needs, with lengths computed up front so nothing
/// nested is built as a message first (prost's generated types cost an allocation per
/// attribute key and value, and computed nested lengths again at each level).
pub(crate) mod pb {
    use prost::encoding::{encode_varint, encoded_len_varint};

    const VARINT: u32 = 0;
    const FIXED64: u32 = 1;
    const LEN: u32 = 2;
    const FIXED32: u32 = 5;
    /// `Span.attributes`.
    const SPAN_ATTRIBUTES: u32 = 9;
    /// `Span.status`.
    const SPAN_STATUS: u32 = 15;

    /// A varint; one to three bytes below 2^21, what nearly everything a span holds takes
    /// (lengths, status codes, ports).
    #[inline(always)]
    fn uvarint(out: &mut Vec<u8>, value: u64) {
        if value < 0x80 {
            out.push(value as u8);
        } else if value < 0x4000 {
            out.extend_from_slice(&[value as u8 | 0x80, (value >> 7) as u8]);
        } else if value < 0x20_0000 {
            out.extend_from_slice(&[
                value as u8 | 0x80,
                (value >> 7) as u8 | 0x80,
                (value >> 14) as u8,
            ]);
        } else {
            encode_varint(value, out);
        }
    }

    /// A length-delimited field being written in place: where its content starts.
    pub struct Open(usize);

    /// Starts a length-delimited field of `field` whose content is written next, then
    /// [`close`]d. Two bytes are kept for its length, which a span's nearly always takes
    /// (128 to 16383 bytes), so it is written in place rather than built aside and copied.
    #[inline]
    pub fn open(out: &mut Vec<u8>, field: u32) -> Open {
        key(out, field, LEN);
        out.extend_from_slice(&[0x80, 0x00]);
        Open(out.len())
    }

    /// Writes the length of the field `open` started, now that its content is written.
    #[inline]
    pub fn close(out: &mut Vec<u8>, open: Open) {
        let Open(start) = open;
        let len = out.len() - start;
        let len_at = start - 2;
        if (0x80..0x4000).contains(&len) {
            out[len_at] = len as u8 | 0x80;
            out[len_at + 1] = (len >> 7) as u8;
            return;
        }
        // Shorter or longer: the content moves to fit the length's real size (a padded
        // varint is valid protobuf, but not what every collector's decoder is tested with).
        let mut prefix = Vec::with_capacity(10);
        uvarint(&mut prefix, len as u64);
        match prefix.len() {
            1 => {
                out[len_at] = prefix[0];
                out.copy_within(start.., len_at + 1);
                out.truncate(len_at + 1 + len);
            }
            _ => {
                out.splice(len_at..start, prefix);
            }
        }
    }

    #[inline(always)]
    fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
        uvarint(out, u64::from(field << 3 | wire));
    }

    #[inline(always)]
    fn key_len(field: u32) -> usize {
        encoded_len_varint(u64::from(field << 3))
    }

    /// The key and length of a length-delimited field whose `len` bytes follow.
    #[inline(always)]
    pub fn header(out: &mut Vec<u8>, field: u32, len: usize) {
        key(out, field, LEN);
        uvarint(out, len as u64);
    }

    /// A length-delimited field (bytes, string or an encoded message).
    #[inline(always)]
    pub fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
        key(out, field, LEN);
        uvarint(out, value.len() as u64);
        out.extend_from_slice(value);
    }

    /// The length of a length-delimited field holding `len` bytes.
    #[inline]
    pub fn bytes_len(field: u32, len: usize) -> usize {
        key_len(field) + encoded_len_varint(len as u64) + len
    }

    /// A varint field.
    #[inline(always)]
    pub fn varint(out: &mut Vec<u8>, field: u32, value: u64) {
        key(out, field, VARINT);
        uvarint(out, value);
    }

    /// A fixed64 field.
    #[inline(always)]
    pub fn fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
        key(out, field, FIXED64);
        out.extend_from_slice(&value.to_le_bytes());
    }

    /// A fixed32 field.
    #[inline(always)]
    pub fn fixed32(out: &mut Vec<u8>, field: u32, value: u32) {
        key(out, field, FIXED32);
        out.extend_from_slice(&value.to_le_bytes());
    }

    /// `Span.attributes` key, `KeyValue` length, its `key` field's key and length (`name`
    /// follows), for an attribute whose `AnyValue` is `any_len` bytes: one-byte lengths when
    /// the whole pair is under 128 bytes, as nearly every attribute is.
    #[inline(always)]
    fn attr_head(out: &mut Vec<u8>, name: &str, any_len: usize) {
        // KeyValue { key = 1, value = 2 }
        let pair_len = bytes_len(1, name.len()) + bytes_len(2, any_len);
        out.reserve(pair_len + 3);
        match u8::try_from(pair_len) {
            Ok(short) if short < 0x80 => {
                // `name.len() < pair_len`, so it is a one-byte length too.
                out.extend_from_slice(&[(SPAN_ATTRIBUTES << 3 | LEN) as u8, short, 0x0a]);
                out.push(name.len() as u8);
            }
            _ => {
                key(out, SPAN_ATTRIBUTES, LEN);
                uvarint(out, pair_len as u64);
                header(out, 1, name.len());
            }
        }
        // Inlined with a constant name: a few moves, not a call to memcpy.
        out.extend_from_slice(name.as_bytes());
        header(out, 2, any_len);
    }

    /// A `KeyValue` attribute of a span whose string value is `parts` joined.
    #[inline(always)]
    pub fn attr_concat(out: &mut Vec<u8>, name: &str, parts: &[&str]) {
        let text_len: usize = parts.iter().map(|part| part.len()).sum();
        // AnyValue { string_value = 1 }
        attr_head(out, name, bytes_len(1, text_len));
        header(out, 1, text_len);
        for part in parts {
            out.extend_from_slice(part.as_bytes());
        }
    }

    /// A `KeyValue` attribute of a span with a string value.
    #[inline(always)]
    pub fn attr_str(out: &mut Vec<u8>, name: &str, value: &str) {
        attr_text(out, name, value.as_bytes());
    }

    /// A `KeyValue` attribute of a span with a string value given as its UTF-8 bytes.
    #[inline(always)]
    pub fn attr_text(out: &mut Vec<u8>, name: &str, value: &[u8]) {
        // AnyValue { string_value = 1 }
        attr_head(out, name, bytes_len(1, value.len()));
        bytes(out, 1, value);
    }

    /// A `KeyValue` attribute of a span with an int value.
    #[inline(always)]
    pub fn attr_int(out: &mut Vec<u8>, name: &str, value: i64) {
        // int64 is a varint of the two's complement.
        let value = value as u64;
        // AnyValue { int_value = 3 }
        attr_head(out, name, key_len(3) + encoded_len_varint(value));
        varint(out, 3, value);
    }

    /// `Span.status`, always present (as the OpenTelemetry SDK's conversion writes it):
    /// `Status { message = 2, code = 3 }`, defaults left out.
    pub(super) fn status(out: &mut Vec<u8>, status: &super::SpanStatus<'_>) {
        match status {
            super::SpanStatus::Unset => bytes(out, SPAN_STATUS, &[]),
            super::SpanStatus::Error(message) => {
                let mut len = key_len(3) + encoded_len_varint(super::STATUS_ERROR);
                if !message.is_empty() {
                    len += bytes_len(2, message.len());
                }
                key(out, SPAN_STATUS, LEN);
                uvarint(out, len as u64);
                if !message.is_empty() {
                    bytes(out, 2, message.as_bytes());
                }
                varint(out, 3, super::STATUS_ERROR);
            }
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

/// A low-cardinality `error.type`: the failure's kind's name, else (a kind without one, or
/// none known) the HTTP status.
fn error_type(kind: Option<ErrorKind>, status: StatusCode) -> Cow<'static, str> {
    match kind.and_then(ErrorKind::error_type) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(status.as_str().to_string()),
    }
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
pub(crate) mod tests {
    use super::*;

    use std::fmt::Write as _;

    use opentelemetry::trace::{
        SpanContext, SpanId as OtelSpanId, SpanKind, Status, TraceFlags, TraceId as OtelTraceId,
    };
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span as ProtoSpan};
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message;

    use crate::core::errors::ResponseFlag;
    use crate::trace::Sampler;

    impl RequestSpan {
        /// The spans as the exporter built them before it encoded by hand: the reference the
        /// encoding is checked against.
        pub(crate) fn reference_build(
            &self,
            attempts: &[AttemptSpan],
            scope: &InstrumentationScope,
        ) -> Vec<SpanData> {
            let mut spans = Vec::with_capacity(1 + attempts.len());
            spans.push(self.reference_request_span(scope));
            let wall = |at: Instant| self.started_wall + at.saturating_duration_since(self.started);
            let method = method_name(&self.method);
            // Parsed by `http`, to check the encoder's own split.
            let authority = self.reference_authority();
            let host = authority.as_ref().map(Authority::host);
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
                            error_type(attempt.error_kind, StatusCode::BAD_GATEWAY).into_owned(),
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
                    span_context: self.reference_context(attempt.span_id),
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

        fn reference_authority(&self) -> Option<Authority> {
            self.target
                .authority()
                .map(|text| text.parse().expect("an authority"))
        }

        fn reference_context(&self, span: SpanId) -> SpanContext {
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

        fn reference_request_span(&self, scope: &InstrumentationScope) -> SpanData {
            let method = method_name(&self.method);
            let path = self.target.path();
            let query = self.target.query().map(redact_query);
            let authority = self.reference_authority();
            let mut attributes = vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.scheme", "http"),
                KeyValue::new("url.path", path.to_string()),
                KeyValue::new("outrider.service", self.service.to_string()),
                KeyValue::new("outrider.route", self.route.to_string()),
                KeyValue::new("outrider.attempts", i64::from(self.attempts)),
                KeyValue::new("outrider.response_flags", self.flag.code()),
            ];
            if let Some(route) = self.http_route.as_deref() {
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
            if let Some(authority) = &authority {
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
                if let Some(authority) = &authority {
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
                if let Some((service, rpc)) = path.strip_prefix('/').and_then(|p| p.split_once('/'))
                {
                    attributes.push(KeyValue::new("rpc.service", service.to_string()));
                    attributes.push(KeyValue::new("rpc.method", rpc.to_string()));
                }
                if let Some(code) = self.grpc_status {
                    attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
                }
            }
            let (error_type, status) = self.reference_outcome();
            if let Some(error_type) = error_type {
                attributes.push(KeyValue::new("error.type", error_type));
            }
            SpanData {
                span_context: self.reference_context(self.trace.span_id),
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
        fn reference_outcome(&self) -> (Option<String>, Status) {
            if self.cancelled {
                return (
                    Some(CANCELLED.to_string()),
                    Status::error("the caller went away before the response ended"),
                );
            }
            if let Some(reason) = self.error.as_deref() {
                match self.status {
                    // The caller's mistake even when the proxy answered it (a 404 for no route, a
                    // 429): not a failure of this server.
                    Some(s) if self.server && s.is_client_error() => return (None, Status::Unset),
                    status => {
                        let status = status.unwrap_or(StatusCode::BAD_GATEWAY);
                        let kind = error_type(self.error_kind, status).into_owned();
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

    fn request(server: bool) -> RequestSpan {
        let trace = TraceContext::extract(&http::HeaderMap::new(), &Sampler::parent_based(1.0));
        let started = Instant::now();
        RequestSpan {
            server,
            trace,
            started,
            started_wall: SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            elapsed: Duration::from_micros(1_234),
            method: Method::GET,
            target: target(Some("/items/7"), Some("shop")),
            version: Some(Version::HTTP_11),
            peer: "127.0.0.1:40000".parse().expect("address"),
            endpoint: Some("10.0.0.7:8080".parse().expect("address")),
            service: Arc::from("shop"),
            route: Arc::from("items"),
            http_route: None,
            attempts: 1,
            status: Some(StatusCode::OK),
            grpc: false,
            grpc_status: None,
            error: None,
            error_kind: None,
            cancelled: false,
            flag: ResponseFlag::Upstream,
            attempt_spans: Vec::new(),
        }
    }

    fn target(uri: Option<&'static str>, authority: Option<&'static str>) -> SpanTarget {
        SpanTarget::new(
            uri.map(Uri::from_static).as_ref(),
            authority.map(Authority::from_static).as_ref(),
        )
    }

    fn attempt(span: &RequestSpan, number: u32, millis: u64) -> AttemptSpan {
        AttemptSpan {
            span_id: SpanId::random(),
            number,
            endpoint: "[fd00::7]:8080".parse().expect("address"),
            started: span.started + Duration::from_millis(millis),
            ended: span.started + Duration::from_millis(millis + 3),
            status: Some(StatusCode::OK),
            error: None,
            error_kind: None,
        }
    }

    /// Requests whose spans take every branch of the conventions.
    pub(crate) fn corpus() -> Vec<RequestSpan> {
        let mut spans = vec![request(true), request(false)];

        let mut continued = request(false);
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03";
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(parent));
        headers.insert(
            "tracestate",
            http::HeaderValue::from_static("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        );
        continued.trace = TraceContext::extract(&headers, &Sampler::parent_based(1.0));
        continued.target = target(Some("/p?token=s3cret&debug&x="), Some("shop.internal:8443"));
        continued.http_route = Some(Arc::from("/p"));
        continued.version = Some(Version::HTTP_2);
        continued.attempts = 3;
        continued.status = Some(StatusCode::SERVICE_UNAVAILABLE);
        continued.flag = ResponseFlag::ConnectFailure;
        continued.error = Some("upstream connect timed out".to_string());
        continued.error_kind = Some(ErrorKind::ConnectTimeout);
        let mut first = attempt(&continued, 1, 1);
        first.status = None;
        first.error = Some("connection refused".to_string());
        first.error_kind = Some(ErrorKind::ConnectRefused);
        let mut second = attempt(&continued, 2, 5);
        second.status = Some(StatusCode::SERVICE_UNAVAILABLE);
        let mut third = attempt(&continued, 3, 9);
        third.status = Some(StatusCode::NOT_FOUND);
        continued.attempt_spans = vec![first, second, third];
        spans.push(continued);

        let mut level2 = request(true);
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(parent));
        headers.insert("tracestate", http::HeaderValue::from_static("a@b=1,c=2"));
        level2.trace = TraceContext::extract(&headers, &Sampler::parent_based(1.0));
        level2.target = target(Some("/caf%C3%A9?q=1"), Some("[fd00::1]"));
        level2.peer = "[::1]:9".parse().expect("address");
        spans.push(level2);

        for (server, code) in [(true, 14), (true, 5), (false, 5), (false, 0)] {
            let mut grpc = request(server);
            grpc.target = target(Some("/echo.Echo/Unary"), Some("user@echo:50051"));
            grpc.method = Method::POST;
            grpc.version = Some(Version::HTTP_2);
            grpc.grpc = true;
            grpc.grpc_status = Some(code);
            spans.push(grpc);
        }

        let mut long = request(false);
        let path = format!("/{}", "p".repeat(20_000));
        long.target = SpanTarget::new(
            Some(&Uri::try_from(path).expect("uri")),
            Some(&Authority::from_static("shop")),
        );
        spans.push(long);

        let mut cancelled = request(true);
        cancelled.cancelled = true;
        cancelled.status = None;
        cancelled.error = Some("cancelled: the caller went away".to_string());
        cancelled.error_kind = Some(ErrorKind::DownstreamDisconnect);
        cancelled.flag = ResponseFlag::DownstreamCancelled;
        spans.push(cancelled);

        for (server, status, reason) in [
            (
                true,
                StatusCode::NOT_FOUND,
                Some(("no route", ErrorKind::NoRoute)),
            ),
            (false, StatusCode::NOT_FOUND, None),
            (
                true,
                StatusCode::BAD_GATEWAY,
                Some((
                    "connection reset by peer",
                    ErrorKind::UpstreamResetBeforeHeaders,
                )),
            ),
            (
                false,
                StatusCode::GATEWAY_TIMEOUT,
                Some(("per-try timeout", ErrorKind::PerTryTimeout)),
            ),
            (
                false,
                StatusCode::BAD_GATEWAY,
                Some(("tls handshake failed", ErrorKind::TlsHandshake)),
            ),
            (true, StatusCode::INTERNAL_SERVER_ERROR, None),
        ] {
            let mut failed = request(server);
            failed.status = Some(status);
            failed.error = reason.map(|(text, _)| text.to_string());
            failed.error_kind = reason.map(|(_, kind)| kind);
            failed.method = Method::from_bytes(b"PURGE").expect("method");
            failed.target = target(None, None);
            failed.version = None;
            failed.endpoint = None;
            spans.push(failed);
        }
        spans
    }

    #[test]
    fn encoded_spans_decode_as_the_sdk_conversion_built_them() {
        let scope = InstrumentationScope::builder("outrider-proxy")
            .with_version("1.2.3")
            .build();
        for span in corpus() {
            let expected: Vec<ProtoSpan> = span
                .reference_build(&span.attempt_spans, &scope)
                .into_iter()
                .map(ProtoSpan::from)
                .collect();
            let mut encoded = Vec::new();
            span.encode(&mut encoded);
            let decoded = ScopeSpans::decode(&encoded[..]).expect("valid protobuf");
            assert_eq!(decoded.spans, expected, "{span:?}");
        }
    }

    #[test]
    fn a_span_target_reads_as_the_uri_and_authority_it_copies() {
        for uri in [
            "/",
            "/p/q?token=1&x",
            "/p?",
            "http://shop:8080/a?b",
            "*",
            "shop:443",
        ] {
            let parsed = Uri::from_static(uri);
            let copy = SpanTarget::new(Some(&parsed), None);
            assert_eq!(
                (copy.path(), copy.query(), copy.authority()),
                (parsed.path(), parsed.query(), None),
                "{uri}"
            );
        }
        let none = SpanTarget::new(None, None);
        assert_eq!((none.path(), none.query()), ("/", None));
        let both = target(Some("/x?y=1"), Some("shop:81"));
        assert_eq!(
            (both.authority(), both.path(), both.query()),
            (Some("shop:81"), "/x", Some("y=1"))
        );
    }

    #[test]
    fn hosts_and_ports_split_as_http_splits_them() {
        for text in [
            "shop",
            "shop:8080",
            "shop:",
            "[::1]",
            "[::1]:9",
            "[fd00::7]:65535",
            "user@shop",
            "user:pw@shop:81",
            "a@b@c:1",
            "127.0.0.1:80",
            "x:99999",
        ] {
            let Ok(authority) = text.parse::<Authority>() else {
                continue;
            };
            assert_eq!(
                host_and_port(text),
                (authority.host(), authority.port_u16()),
                "{text}"
            );
        }
    }

    #[test]
    fn fields_written_in_place_get_their_shortest_length() {
        for len in [0, 5, 127, 128, 300, 16383, 16384, 70_000] {
            let content = vec![7u8; len];
            let mut out = vec![1, 2, 3];
            let open = pb::open(&mut out, 2);
            out.extend_from_slice(&content);
            pb::close(&mut out, open);
            let mut expected = vec![1, 2, 3];
            pb::bytes(&mut expected, 2, &content);
            assert_eq!(out, expected, "{len}");
        }
    }

    #[test]
    fn varints_are_what_prost_writes() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            1 << 40,
            u64::MAX,
        ] {
            let mut expected = Vec::new();
            prost::encoding::encode_varint(value, &mut expected);
            let mut out = Vec::new();
            pb::varint(&mut out, 1, value);
            assert_eq!(out[0], 0x08);
            assert_eq!(out[1..], expected[..], "{value}");
        }
    }

    #[test]
    fn long_attributes_take_multi_byte_lengths() {
        let long = "v".repeat(300);
        for (name, value) in [("k", long.as_str()), ("k", &long[..120]), ("k", "")] {
            let mut out = Vec::new();
            pb::attr_str(&mut out, name, value);
            // `out` is the field of a span (tag 9, then the pair's length).
            assert_eq!(out[0], 0x4a);
            let (len, skip) = if out[1] < 0x80 {
                (usize::from(out[1]), 2)
            } else {
                (usize::from(out[1] & 0x7f) | usize::from(out[2]) << 7, 3)
            };
            assert_eq!(out.len(), skip + len, "{}", value.len());
            let pair = opentelemetry_proto::tonic::common::v1::KeyValue::decode(&out[skip..])
                .expect("valid protobuf");
            let text = match pair.value.and_then(|v| v.value) {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(t)) => t,
                other => panic!("{other:?}"),
            };
            assert_eq!((pair.key.as_str(), text.as_str()), (name, value));
        }
    }

    #[test]
    fn ip_text_is_the_display_form() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "fd00::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().expect("address");
            assert_eq!(IpText::default().of(ip), ip.to_string().as_bytes());
        }
        // The kept text is the last address's, never an earlier one's.
        let mut text = IpText::default();
        for ip in ["10.0.0.1", "10.0.0.1", "::1", "10.0.0.22", "10.0.0.22"] {
            let ip: std::net::IpAddr = ip.parse().expect("address");
            assert_eq!(text.of(ip), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn an_int_attribute_keeps_its_sign() {
        let mut out = Vec::new();
        pb::attr_int(&mut out, "k", -3);
        let expected = opentelemetry_proto::tonic::common::v1::KeyValue {
            key: "k".to_string(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                value: Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(-3)),
            }),
        };
        // `out` is the field of a span (tag 9): strip the key and length to decode the pair.
        let pair = opentelemetry_proto::tonic::common::v1::KeyValue::decode(&out[2..])
            .expect("valid protobuf");
        assert_eq!(pair, expected);
    }

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
