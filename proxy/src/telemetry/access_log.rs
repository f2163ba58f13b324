//! The access log: one record per request, queued without waiting (dropped and counted when
//! the queue is full) and formatted (JSON or text) on the writer thread, which writes lines in
//! batches to stdout.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::HeaderValue;
use http::Method;
use outrider_config::QueryLogging;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::json;
use super::logged_target;
use crate::core::errors::ResponseFlag;
use crate::telemetry::metrics::TelemetryMetrics;
use crate::trace::{SpanId, TraceContext, TraceId};

/// How long the access-log writer lets lines gather after writing a batch: lines reach stdout
/// at most this much later, and the queue ([`ACCESS_LOG_QUEUE`] lines) absorbs what arrives
/// meanwhile up to hundreds of thousands of lines per second.
const ACCESS_LOG_BATCH: Duration = Duration::from_millis(20);
/// Bytes of access-log lines the writer gathers before a write(2).
const ACCESS_LOG_WRITE: usize = 64 * 1024;
/// Access-log records the writer takes from the queue at a time.
const ACCESS_LOG_TAKE: usize = 64;
/// Access-log lines waiting for the writer at most.
pub const ACCESS_LOG_QUEUE: usize = 8192;

/// One access-log line. Formatted (JSON or text, the query string redacted or not) on the
/// writer thread, so the request path only moves or reference-counts what it already holds.
#[derive(Debug)]
pub struct AccessRecord {
    /// When the request arrived; written RFC 3339 (UTC).
    pub time: SystemTime,
    /// Trace id and this proxy's span id for the request; absent for a request the parser
    /// refused (written as empty strings).
    pub ids: Option<(TraceId, SpanId)>,
    /// `inbound` or `outbound`.
    pub direction: Arc<str>,
    /// The service.
    pub service: Arc<str>,
    /// The route.
    pub route: Arc<str>,
    /// HTTP method; absent (written empty) for a request the parser refused.
    pub method: Option<Method>,
    /// Host / :authority, the request target, `x-request-id`, `user-agent` and the peer's
    /// identity (see [`LoggedRequest`]).
    pub request: LoggedRequest,
    /// Status sent to the caller.
    pub status: u16,
    /// Who made the response: `-` the upstream, else the proxy's reason (see [`ResponseFlag`]).
    pub response_flags: ResponseFlag,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// Attempts made.
    pub attempts: u32,
    /// From request received to end of response body (written in seconds).
    pub duration: Duration,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Why the request failed, if it did.
    pub error: Option<String>,
    /// The caller's address.
    pub peer: Option<SocketAddr>,
    /// The caller's HTTP version (`HTTP/1.1`, `HTTP/2`...).
    pub http_version: Option<&'static str>,
    /// From request received to the upstream's response headers (written in seconds); absent
    /// when no upstream answered (the proxy made the response).
    pub upstream_duration: Option<Duration>,
    /// The gRPC status sent to the caller (trailers, or a trailers-only response's headers).
    pub grpc_status: Option<u8>,
    /// How the line is written.
    pub style: AccessLogStyle,
}

/// The text a record keeps of its request, each part optional: its authority (Host /
/// :authority), its target (path and query as received, `/` when it has none; the query is
/// redacted or dropped when written), `x-request-id`, `user-agent` (their bytes kept, see
/// [`lossless`]) and the mTLS SPIFFE id of the caller (inbound) or of the upstream
/// (outbound).
///
/// Copied, one part after the other: a request's URI and headers share the caller
/// connection's read buffer, which a queued record would keep alive until it is written, and
/// a header value freed on the writer thread (the last reference to its buffer) cost a
/// cross-thread free. Up to [`LoggedRequest::INLINE`] bytes (the usual case) are kept in the
/// record itself, more in one allocation.
#[derive(Debug, Default)]
pub struct LoggedRequest {
    /// The parts, when they fit.
    inline: Inline,
    /// The parts, when they do not fit inline.
    heap: Option<Box<[u8]>>,
    /// Where each part ends, in [`Part`] order.
    ends: [usize; PARTS],
    /// Which parts there are: bit `1 << part`.
    present: u8,
}

/// The parts of a [`LoggedRequest`], in the order they are kept.
#[derive(Clone, Copy)]
enum Part {
    Authority,
    Target,
    RequestId,
    UserAgent,
    PeerIdentity,
}

const PARTS: usize = 5;

/// [`LoggedRequest`]'s room in the record.
#[derive(Debug)]
struct Inline([u8; LoggedRequest::INLINE]);

impl Default for Inline {
    fn default() -> Self {
        Self([0; LoggedRequest::INLINE])
    }
}

impl LoggedRequest {
    /// Bytes of a request's text kept in the record itself.
    pub const INLINE: usize = 128;

    /// Copies `authority`, `target` and the `[x-request-id, user-agent, peer identity]`
    /// header values.
    pub fn new(
        authority: Option<&str>,
        target: Option<&str>,
        [request_id, user_agent, peer_identity]: [Option<&HeaderValue>; 3],
    ) -> Self {
        let parts = [
            authority.map(str::as_bytes),
            target.map(str::as_bytes),
            request_id.map(HeaderValue::as_bytes),
            user_agent.map(HeaderValue::as_bytes),
            peer_identity.map(HeaderValue::as_bytes),
        ];
        let len = parts.iter().flatten().map(|part| part.len()).sum();
        let mut inline = Inline::default();
        let mut heap = None;
        let room: &mut [u8] = match inline.0.get_mut(..len) {
            Some(room) => room,
            None => heap.insert(vec![0; len].into_boxed_slice()),
        };
        let (mut ends, mut present, mut at) = ([0; PARTS], 0, 0);
        for (i, part) in parts.into_iter().enumerate() {
            if let Some(part) = part {
                room[at..at + part.len()].copy_from_slice(part);
                at += part.len();
                present |= 1 << i;
            }
            ends[i] = at;
        }
        Self {
            inline,
            heap,
            ends,
            present,
        }
    }

    /// The bytes of `part`, if there is one.
    fn part(&self, part: Part) -> Option<&[u8]> {
        let i = part as usize;
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let bytes: &[u8] = match &self.heap {
            Some(heap) => heap,
            None => &self.inline.0,
        };
        bytes.get(start..self.ends[i])
    }

    /// The authority's bytes (UTF-8, copied from a `str`), if there is one.
    fn authority_bytes(&self) -> Option<&[u8]> {
        self.part(Part::Authority)
    }

    /// The target's bytes (UTF-8, copied from a `str`), if there is one.
    fn target_bytes(&self) -> Option<&[u8]> {
        self.part(Part::Target)
    }

    /// The authority, if there is one.
    pub fn authority(&self) -> Option<&str> {
        // Always UTF-8: copied from a `str`.
        self.authority_bytes()
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
    }

    /// The target, if there is one.
    pub fn target(&self) -> Option<&str> {
        self.target_bytes()
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
    }

    /// `x-request-id`'s bytes, if it was sent.
    pub fn request_id(&self) -> Option<&[u8]> {
        self.part(Part::RequestId)
    }

    /// `user-agent`'s bytes, if it was sent.
    pub fn user_agent(&self) -> Option<&[u8]> {
        self.part(Part::UserAgent)
    }

    /// The peer's identity, if known.
    pub fn peer_identity(&self) -> Option<&[u8]> {
        self.part(Part::PeerIdentity)
    }
}

/// How access-log lines are written: the policy's `access_log` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessLogStyle {
    /// JSON or text.
    pub text: bool,
    /// What `path` keeps of the query string.
    pub query: QueryLogging,
}

impl AccessLogStyle {
    /// The style `setting` asks for.
    pub fn of(setting: &outrider_config::AccessLog) -> Self {
        Self {
            text: setting.format == outrider_config::AccessLogFormat::Text,
            query: setting.query,
        }
    }
}

/// What a logged request target shows of its query (`query: redact | keep | drop`): redacted,
/// each parameter keeps its name and a non-empty value becomes `REDACTED`
/// (`/p?token=s3cret&debug&x=` is logged `/p?token=REDACTED&debug&x=`).
pub fn logged_path(path: &str, query: QueryLogging) -> Cow<'_, str> {
    // A byte search: `split_once('?')` cost more than the rest for a short path.
    let Some(at) = path.bytes().position(|b| b == b'?') else {
        return Cow::Borrowed(path);
    };
    let (before, params) = (&path[..at], &path[at + 1..]);
    match query {
        QueryLogging::Keep => Cow::Borrowed(path),
        QueryLogging::Drop => Cow::Borrowed(before),
        QueryLogging::Redact => {
            let mut out = String::with_capacity(path.len() + 16);
            out.push_str(before);
            out.push('?');
            for (i, param) in params.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match param.split_once('=') {
                    Some((name, value)) if !value.is_empty() => {
                        out.push_str(name);
                        out.push_str("=REDACTED");
                    }
                    _ => out.push_str(param),
                }
            }
            Cow::Owned(out)
        }
    }
}

/// A header value as text, losing nothing: valid UTF-8 as is, except that a backslash is
/// written `\\`; every byte that is not part of valid UTF-8 is written `\xNN` (two lowercase
/// hex digits). So `req-\xff` in the log is the bytes `req-` and 0xFF, and no two values log
/// alike.
pub fn lossless(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if !text.contains('\\') {
            return Cow::Borrowed(text);
        }
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            out.push_str("\\x");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    Cow::Owned(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `HTTP/1.1` and the like, for the access log.
pub fn version_name(version: http::Version) -> Option<&'static str> {
    Some(match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => return None,
    })
}

impl AccessRecord {
    /// The line of a request the proxy answered itself before routing (no route, bad
    /// request): no upstream, no attempt.
    pub fn refused<B, R: http_body::Body>(
        req: &http::Request<B>,
        caller: &crate::core::headers::Caller,
        trace: &TraceContext,
        labels: &crate::telemetry::metrics::RouteLabels,
        (started, started_wall): (Instant, SystemTime),
        response: &http::Response<R>,
        (error, flag): (String, ResponseFlag),
    ) -> Self {
        Self {
            time: started_wall,
            ids: Some((trace.trace_id, trace.span_id)),
            direction: Arc::clone(&labels.direction),
            service: Arc::clone(&labels.service),
            route: Arc::clone(&labels.route),
            method: Some(req.method().clone()),
            // The Host text of a request refused before routing is kept as sent, even when it
            // is no valid authority.
            request: LoggedRequest::new(
                req.uri().authority().map(|a| a.as_str()).or_else(|| {
                    let host = req.headers().get(http::header::HOST)?;
                    host.to_str().ok()
                }),
                Some(logged_target(Some(req.uri()))),
                [
                    req.headers().get(&crate::core::headers::REQUEST_ID),
                    req.headers().get(http::header::USER_AGENT),
                    caller.identity.as_ref(),
                ],
            ),
            status: response.status().as_u16(),
            response_flags: flag,
            upstream: None,
            attempts: 0,
            duration: started.elapsed(),
            request_bytes: 0,
            response_bytes: response.body().size_hint().exact().unwrap_or(0),
            error: Some(error),
            peer: Some(caller.addr),
            http_version: version_name(req.version()),
            upstream_duration: None,
            // Read here rather than through io::outcome: telemetry sits below io.
            grpc_status: response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            style: AccessLogStyle::default(),
        }
    }

    /// The line of a request the HTTP/1 parser refused (malformed head, headers too large):
    /// nothing of it is known but who sent it and what it was answered.
    pub fn malformed(
        direction: &'static str,
        peer: SocketAddr,
        status: u16,
        error: String,
    ) -> Self {
        let none: Arc<str> = Arc::from("");
        Self {
            time: SystemTime::now(),
            ids: None,
            direction: Arc::from(direction),
            service: Arc::clone(&none),
            route: none,
            method: None,
            request: LoggedRequest::default(),
            status,
            response_flags: ResponseFlag::MalformedRequest,
            upstream: None,
            attempts: 0,
            duration: Duration::ZERO,
            request_bytes: 0,
            response_bytes: 0,
            error: Some(error),
            peer: Some(peer),
            http_version: None,
            upstream_duration: None,
            grpc_status: None,
            style: AccessLogStyle::default(),
        }
    }

    /// Appends the line in its style (without the newline) to `out`; `cache` is the writer's.
    fn write_to(&self, out: &mut Vec<u8>, cache: &mut LineCache) -> std::io::Result<()> {
        let time = cache.clock.rfc3339(self.time);
        if self.style.text {
            let path = logged_path(self.request.target().unwrap_or(""), self.style.query);
            self.write_text(&time, &path, out)
        } else {
            self.write_json(&time, out, &mut cache.labels);
            Ok(())
        }
    }

    /// The JSON form: one object, its fields in this order, absent ones `null`.
    fn write_json(&self, time: &[u8; 27], out: &mut Vec<u8>, labels: &mut Labels) {
        let header = |out: &mut Vec<u8>, bytes: &[u8]| {
            if !json::plain_ascii(out, bytes) {
                json::string(out, &lossless(bytes));
            }
        };
        out.reserve(768);
        match self.ids {
            // The fixed-width start made on the stack and copied at once.
            Some((trace, span)) => {
                let mut head = *HEAD;
                head[HEAD_TIME..HEAD_TIME + 27].copy_from_slice(time);
                hex(&mut head[HEAD_TRACE..HEAD_TRACE + 32], &trace.0);
                hex(&mut head[HEAD_SPAN..HEAD_SPAN + 16], &span.0);
                out.extend_from_slice(&head);
            }
            // Neither id: empty strings.
            None => {
                out.extend_from_slice(&HEAD[..HEAD_TIME]);
                out.extend_from_slice(time);
                out.extend_from_slice(b"\",\"trace_id\":\"\",\"span_id\":\"\",\"request_id\":");
            }
        }
        json::or_null(out, self.request.request_id(), header);
        out.extend_from_slice(labels.json(self));
        out.extend_from_slice(b",\"method\":");
        method(out, self.method.as_ref());
        out.extend_from_slice(b",\"authority\":");
        json::or_null(out, self.request.authority_bytes(), json::utf8);
        out.extend_from_slice(b",\"path\":");
        let target = self.request.target_bytes().unwrap_or_default();
        // Copied as it is unless it has a query to redact or drop.
        if target.contains(&b'?') {
            let target = std::str::from_utf8(target).unwrap_or_default();
            json::string(out, &logged_path(target, self.style.query));
        } else {
            json::utf8(out, target);
        }
        out.extend_from_slice(b",\"status\":");
        json::uint(out, u64::from(self.status));
        // The flags' codes are capital letters and `-`: nothing to escape (a test checks).
        out.extend_from_slice(b",\"response_flags\":\"");
        out.extend_from_slice(self.response_flags.code().as_bytes());
        out.extend_from_slice(b"\",\"upstream\":");
        json::or_null(out, self.upstream.as_ref(), json::socket_addr);
        out.extend_from_slice(b",\"attempts\":");
        json::uint(out, u64::from(self.attempts));
        out.extend_from_slice(b",\"duration_seconds\":");
        json::seconds(out, self.duration);
        out.extend_from_slice(b",\"request_bytes\":");
        json::uint(out, self.request_bytes);
        out.extend_from_slice(b",\"response_bytes\":");
        json::uint(out, self.response_bytes);
        out.extend_from_slice(b",\"error\":");
        json::or_null(out, self.error.as_deref(), json::string);
        out.extend_from_slice(b",\"peer\":");
        json::or_null(out, self.peer.as_ref(), json::socket_addr);
        out.extend_from_slice(b",\"user_agent\":");
        json::or_null(out, self.request.user_agent(), header);
        out.extend_from_slice(b",\"http_version\":");
        version(out, self.http_version);
        out.extend_from_slice(b",\"upstream_seconds\":");
        json::or_null(out, self.upstream_duration, json::seconds);
        out.extend_from_slice(b",\"grpc_status\":");
        json::or_null(out, self.grpc_status, |out, code| {
            json::uint(out, u64::from(code))
        });
        out.extend_from_slice(b",\"peer_identity\":");
        json::or_null(out, self.request.peer_identity(), header);
        out.push(b'}');
    }

    /// The text form: `time direction service/route peer "METHOD path VERSION" status
    /// duration`, then `key=value` for each field that is set, strings quoted.
    fn write_text(
        &self,
        time: &[u8; 27],
        path: &str,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        out.write_all(time)?;
        write!(
            out,
            " {} {}/{} {} \"{} {} {}\" {} {:.6}s",
            self.direction,
            dash(&self.service),
            dash(&self.route),
            self.peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
            dash(self.method.as_ref().map_or("", Method::as_str)),
            quoted_inner(dash(path)),
            self.http_version.unwrap_or("-"),
            self.status,
            self.duration.as_secs_f64(),
        )?;
        write!(
            out,
            " response_flags={} request_bytes={} response_bytes={} attempts={}",
            self.response_flags.code(),
            self.request_bytes,
            self.response_bytes,
            self.attempts
        )?;
        if let Some(upstream) = self.upstream {
            write!(out, " upstream={upstream}")?;
        }
        if let Some(upstream) = self.upstream_duration {
            write!(out, " upstream_seconds={:.6}", upstream.as_secs_f64())?;
        }
        if let Some(code) = self.grpc_status {
            write!(out, " grpc_status={code}")?;
        }
        if let Some(authority) = self.request.authority() {
            write!(out, " authority=\"{}\"", quoted_inner(authority))?;
        }
        for (name, value) in [
            ("peer_identity", self.request.peer_identity()),
            ("request_id", self.request.request_id()),
            ("user_agent", self.request.user_agent()),
        ] {
            if let Some(value) = value {
                write!(out, " {name}=\"{}\"", quoted_inner(&lossless(value)))?;
            }
        }
        if let Some((trace, span)) = self.ids {
            write!(
                out,
                " trace_id={} span_id={}",
                trace.to_hex(),
                span.to_hex()
            )?;
        }
        if let Some(error) = &self.error {
            write!(out, " error=\"{}\"", quoted_inner(error))?;
        }
        Ok(())
    }
}

/// The start of a JSON line with both ids, up to `request_id`'s value; the time and the ids
/// are written over its zeros at [`HEAD_TIME`], [`HEAD_TRACE`] and [`HEAD_SPAN`].
const HEAD: &[u8; 126] = b"{\"time\":\"0000-00-00T00:00:00.000000Z\",\"trace_id\":\"\
    00000000000000000000000000000000\",\"span_id\":\"0000000000000000\",\"request_id\":";
const HEAD_TIME: usize = 9;
const HEAD_TRACE: usize = HEAD_TIME + 27 + 14;
const HEAD_SPAN: usize = HEAD_TRACE + 32 + 13;

/// `bytes` (a multiple of 8 long) in lowercase hex, filling `out` (twice as long): eight bytes
/// at a time in one integer, where a table lookup per digit cost several times as much.
fn hex(out: &mut [u8], bytes: &[u8]) {
    const fn lanes(byte: u8) -> u128 {
        u128::from_ne_bytes([byte; 16])
    }
    for (out, chunk) in out.chunks_exact_mut(16).zip(bytes.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        // Each byte spread to a 16-bit lane, then each nibble to a byte, first bytes highest.
        let mut x = u128::from(u64::from_be_bytes(word));
        x = ((x & 0xffff_ffff_0000_0000) << 32) | (x & 0xffff_ffff);
        x = ((x & 0x0000_0000_ffff_0000_0000_0000_ffff_0000) << 16)
            | (x & 0x0000_0000_0000_ffff_0000_0000_0000_ffff);
        x = ((x & 0x0000_ff00_0000_ff00_0000_ff00_0000_ff00) << 8)
            | (x & 0x0000_00ff_0000_00ff_0000_00ff_0000_00ff);
        x = ((x & 0x00f0_00f0_00f0_00f0_00f0_00f0_00f0_00f0) << 4)
            | (x & 0x000f_000f_000f_000f_000f_000f_000f_000f);
        // A nibble from 10 gets past `9` to `a` (0x61 - 0x3a = 39 more); no lane carries.
        let letters = ((x + lanes(6)) >> 4) & lanes(1);
        x += lanes(b'0') + letters * 39;
        out.copy_from_slice(&x.to_be_bytes());
    }
}

/// A method as a JSON string: the usual ones as constants, without [`json::string`]'s scan.
fn method(out: &mut Vec<u8>, method: Option<&Method>) {
    let name = method.map_or("", Method::as_str);
    let quoted: &[u8] = match name {
        "GET" => b"\"GET\"",
        "POST" => b"\"POST\"",
        "PUT" => b"\"PUT\"",
        "DELETE" => b"\"DELETE\"",
        "HEAD" => b"\"HEAD\"",
        "OPTIONS" => b"\"OPTIONS\"",
        "PATCH" => b"\"PATCH\"",
        _ => return json::string(out, name),
    };
    out.extend_from_slice(quoted);
}

/// An HTTP version as JSON (`null` when unknown): the usual ones as constants, without
/// [`json::string`]'s scan.
fn version(out: &mut Vec<u8>, version: Option<&str>) {
    let quoted: &[u8] = match version {
        None => b"null",
        Some("HTTP/1.1") => b"\"HTTP/1.1\"",
        Some("HTTP/2") => b"\"HTTP/2\"",
        Some(other) => return json::string(out, other),
    };
    out.extend_from_slice(quoted);
}

/// What the access-log writer keeps from line to line: most lines in a row share their second
/// and their route.
#[derive(Default)]
struct LineCache {
    clock: TimeText,
    labels: Labels,
}

/// The JSON of the last line's direction, service and route (`,"direction":…,"route":…`),
/// made again only when a line has other labels. They are told apart by address: the labels
/// are held, so no other labels can take their place in memory meanwhile.
#[derive(Default)]
struct Labels {
    of: Option<[Arc<str>; 3]>,
    json: Vec<u8>,
}

impl Labels {
    fn json(&mut self, record: &AccessRecord) -> &[u8] {
        let labels = [&record.direction, &record.service, &record.route];
        let same = self.of.as_ref().is_some_and(|of| {
            of.iter()
                .zip(labels)
                .all(|(held, label)| Arc::ptr_eq(held, label))
        });
        if !same {
            self.json.clear();
            for (name, label) in [&b",\"direction\":"[..], b",\"service\":", b",\"route\":"]
                .into_iter()
                .zip(labels)
            {
                self.json.extend_from_slice(name);
                json::string(&mut self.json, label);
            }
            self.of = Some(labels.map(Arc::clone));
        }
        &self.json
    }
}

/// `-` for an empty field in the text form.
fn dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

/// `text` for inside double quotes: `"` and `\\` escaped with a backslash, control characters
/// as `\xNN`, so a line is always one line and its quoted fields end where they seem to.
fn quoted_inner(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() && c.is_ascii() => {
                let byte = c as u8;
                out.push_str("\\x");
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Writes access-log lines to stdout from its own thread (stdout is a blocking file; a slow
/// reader of it must stall that thread, never the runtime); the request path only
/// `try_send`s into a bounded channel. The snapshots of policies that log share one; a proxy
/// that does not log has neither the thread nor the queue, and once the last holder is gone
/// the thread writes what is queued and ends.
pub struct AccessLog {
    queue: mpsc::Sender<AccessRecord>,
    metrics: TelemetryMetrics,
    progress: Arc<LogProgress>,
}

/// Lines queued and lines flushed to stdout, so a shutdown can wait for the last ones.
#[derive(Default)]
struct LogProgress {
    queued: AtomicU64,
    flushed: AtomicU64,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start(metrics: TelemetryMetrics) -> std::io::Result<Self> {
        // Tokio's bounded channel allocates its slots in blocks of 32 as lines queue up, so an
        // idle log costs nothing; std's sync_channel allocated and touched all 8,192 slots
        // (2.5 MiB) at once.
        let (queue, rx) = mpsc::channel(ACCESS_LOG_QUEUE);
        let lines = metrics.access_log_lines.clone();
        let progress = Arc::new(LogProgress::default());
        let writer_progress = Arc::clone(&progress);
        let mut out = stdout_file();
        let pause = || std::thread::sleep(ACCESS_LOG_BATCH);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_access_log(rx, &mut out, (&lines, &writer_progress), pause))?;
        Ok(Self {
            queue,
            metrics,
            progress,
        })
    }

    /// Queues a line, or drops and counts it when the writer is behind.
    pub fn record(&self, record: AccessRecord) {
        if self.queue.try_send(record).is_err() {
            self.metrics.access_log_dropped.inc();
        } else {
            self.progress.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits, at most `timeout`, until every line queued so far is flushed to stdout; whether
    /// they were. For shutdown: the writer batches, so the last requests' lines would
    /// otherwise die with the process.
    pub async fn flushed(&self, timeout: Duration) -> bool {
        let queued = self.progress.queued.load(Ordering::Relaxed);
        let deadline = crate::policy::timeout::deadline_after(Instant::now(), timeout);
        while self.progress.flushed.load(Ordering::Acquire) < queued {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

/// File descriptor 1 as a file, written straight: std's stdout is line-buffered whatever it
/// is, and searched each buffer handed to it for its last newline. When there is no stdout,
/// lines are discarded as std's stdout discards them.
fn stdout_file() -> Box<dyn std::io::Write + Send> {
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(std::io::sink()),
    }
}

/// The writer thread: writes what is queued as one batch, calls `pause` (lines gather
/// meanwhile), and again, until the queue is closed and empty.
fn write_access_log(
    mut rx: mpsc::Receiver<AccessRecord>,
    out: &mut dyn std::io::Write,
    (lines, progress): (&prometheus::IntCounter, &LogProgress),
    mut pause: impl FnMut(),
) {
    // Lines are made in place in `buf`, written once it holds ACCESS_LOG_WRITE bytes or the
    // batch ends: one write(2) for many lines, and a line is never split between two.
    let mut buf = Vec::with_capacity(ACCESS_LOG_WRITE + 4096);
    let mut cache = LineCache::default();
    // Taken from the queue a few at a time: one move of each record and one release of queue
    // slots for them all (a lock), where taking them one by one moved each several times.
    let mut records = Vec::with_capacity(ACCESS_LOG_TAKE);
    // A plain thread, outside the runtime: blocking_recv_many parks it until a line comes, and
    // returns 0 once the queue is closed and empty.
    while rx.blocking_recv_many(&mut records, ACCESS_LOG_TAKE) > 0 {
        let mut batch = 0;
        // Write everything already queued.
        loop {
            for record in &records {
                let start = buf.len();
                if record.write_to(&mut buf, &mut cache).is_ok() {
                    buf.push(b'\n');
                    batch += 1;
                } else {
                    buf.truncate(start);
                }
                if buf.len() >= ACCESS_LOG_WRITE {
                    if out.write_all(&buf).is_err() {
                        return;
                    }
                    buf.clear();
                }
            }
            records.clear();
            // Only this thread takes from the queue: not empty now, not empty below.
            if rx.is_empty() {
                break;
            }
            rx.blocking_recv_many(&mut records, ACCESS_LOG_TAKE);
        }
        if out.write_all(&buf).is_err() {
            return;
        }
        buf.clear();
        lines.inc_by(batch);
        progress.flushed.fetch_add(batch, Ordering::Release);
        // Let lines gather before the next batch: under load, waking for each line cost a
        // futex wake-up on the request path and a write(2) per line, about doubling the CPU per
        // request. An idle log still blocks in blocking_recv, with no periodic wake-ups.
        pause();
    }
}

/// RFC 3339 UTC with microseconds: `2023-11-14T22:13:20.123456Z`.
pub fn rfc3339(at: SystemTime) -> String {
    // Only ASCII digits and separators are written.
    String::from_utf8_lossy(&TimeText::default().rfc3339(at)).into_owned()
}

/// RFC 3339 text of wall-clock times with the date and time to the second formatted once per
/// second: the access-log writer's, whose lines mostly share their second (the calendar
/// arithmetic cost more than the rest of the timestamp).
#[derive(Default)]
struct TimeText {
    /// The second since the epoch `text` is of, if any yet.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS`.
    text: [u8; 19],
}

impl TimeText {
    /// `at` in UTC with microseconds, as `2023-11-14T22:13:20.123456Z`.
    fn rfc3339(&mut self, at: SystemTime) -> [u8; 27] {
        let since = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            self.text = date_time_text(second);
            self.second = Some(second);
        }
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        out[..19].copy_from_slice(&self.text);
        // Two digits at a time: a line's only per-line digits of the time.
        let micros = u64::from(since.subsec_micros());
        out[20..22].copy_from_slice(&json::pair(micros / 10_000));
        out[22..24].copy_from_slice(&json::pair(micros / 100));
        out[24..26].copy_from_slice(&json::pair(micros));
        out
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of `second` since the epoch.
fn date_time_text(second: u64) -> [u8; 19] {
    // Past year 9999 (out of `time`'s range) the epoch stands in; the clock is our own.
    let date = i64::try_from(second)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (year, month, day) = date.to_calendar_date();
    let (hour, minute, second) = date.to_hms();
    let mut out = *b"0000-00-00T00:00:00";
    let fields: [(usize, usize, i64); 6] = [
        (0, 4, i64::from(year)),
        (5, 2, i64::from(u8::from(month))),
        (8, 2, i64::from(day)),
        (11, 2, i64::from(hour)),
        (14, 2, i64::from(minute)),
        (17, 2, i64::from(second)),
    ];
    for (start, width, value) in fields {
        digits(&mut out[start..start + width], value);
    }
    out
}

/// `value` in decimal filling `slot`, zero-padded (clamped to what fits).
fn digits(slot: &mut [u8], value: i64) {
    // Digit by digit: fmt's machinery cost several times the arithmetic.
    let max = u32::try_from(slot.len())
        .ok()
        .and_then(|width| 10_i64.checked_pow(width))
        .map_or(i64::MAX, |limit| limit - 1);
    let mut value = value.clamp(0, max);
    for slot in slot.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(rfc3339(at), "2023-11-14T22:13:20.123456Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
        let end_of_year = SystemTime::UNIX_EPOCH + Duration::from_micros(1_798_761_599_999_999);
        assert_eq!(rfc3339(end_of_year), "2026-12-31T23:59:59.999999Z");
    }

    #[test]
    fn a_reused_clock_writes_what_a_fresh_one_writes() {
        let mut clock = TimeText::default();
        let base = 1_798_761_598_999_990_u64;
        // Within a second, across seconds, a day and a year, backwards, and before the epoch.
        let steps = [0, 5, 9, 10, 11, 500_000, 1_000_009, 1_000_010, 2_000_000, 3]
            .map(|micros| SystemTime::UNIX_EPOCH + Duration::from_micros(base + micros));
        let earlier = [
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH - Duration::from_secs(1),
            SystemTime::UNIX_EPOCH + Duration::from_micros(999_999),
        ];
        for at in steps.into_iter().chain(earlier) {
            let fresh = TimeText::default().rfc3339(at);
            assert_eq!(clock.rfc3339(at), fresh, "{}", rfc3339(at));
        }
        assert_eq!(
            String::from_utf8_lossy(&clock.rfc3339(steps[7])),
            "2027-01-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn query_values_are_redacted_names_kept() {
        let path = "/p?token=s3cret&debug&x=&a=b=c";
        assert_eq!(
            logged_path(path, QueryLogging::Redact),
            "/p?token=REDACTED&debug&x=&a=REDACTED"
        );
        assert_eq!(logged_path(path, QueryLogging::Keep), path);
        assert_eq!(logged_path(path, QueryLogging::Drop), "/p");
        assert_eq!(logged_path("/p", QueryLogging::Redact), "/p");
        assert_eq!(logged_path("/p?", QueryLogging::Redact), "/p?");
    }

    #[test]
    fn header_bytes_are_logged_without_loss() {
        assert_eq!(lossless(b"req-42"), "req-42");
        assert_eq!(lossless(b"req-\xff"), "req-\\xff");
        assert_eq!(
            lossless(b"a\\xff"),
            "a\\\\xff",
            "a literal backslash is doubled"
        );
        assert_eq!(lossless("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(lossless(b"\xc3"), "\\xc3", "a cut-off UTF-8 sequence");
    }

    /// The line as the derived `Serialize` wrote it before the hand-written JSON: the
    /// reference the writer is checked against.
    #[derive(serde::Serialize)]
    struct ReferenceLine {
        time: String,
        trace_id: String,
        span_id: String,
        request_id: Option<String>,
        direction: String,
        service: String,
        route: String,
        method: String,
        authority: Option<String>,
        path: String,
        status: u16,
        response_flags: &'static str,
        upstream: Option<SocketAddr>,
        attempts: u32,
        duration_seconds: f64,
        request_bytes: u64,
        response_bytes: u64,
        error: Option<String>,
        peer: Option<SocketAddr>,
        user_agent: Option<String>,
        http_version: Option<&'static str>,
        upstream_seconds: Option<f64>,
        grpc_status: Option<u8>,
        peer_identity: Option<String>,
    }

    fn reference_json(record: &AccessRecord) -> String {
        let header = |v: Option<&[u8]>| v.map(|v| lossless(v).into_owned());
        let line = ReferenceLine {
            time: rfc3339(record.time),
            trace_id: record.ids.map(|(t, _)| t.to_hex()).unwrap_or_default(),
            span_id: record.ids.map(|(_, s)| s.to_hex()).unwrap_or_default(),
            request_id: header(record.request.request_id()),
            direction: record.direction.to_string(),
            service: record.service.to_string(),
            route: record.route.to_string(),
            method: record
                .method
                .as_ref()
                .map_or("", Method::as_str)
                .to_string(),
            authority: record.request.authority().map(str::to_string),
            path: logged_path(record.request.target().unwrap_or(""), record.style.query)
                .into_owned(),
            status: record.status,
            response_flags: record.response_flags.code(),
            upstream: record.upstream,
            attempts: record.attempts,
            duration_seconds: record.duration.as_secs_f64(),
            request_bytes: record.request_bytes,
            response_bytes: record.response_bytes,
            error: record.error.clone(),
            peer: record.peer,
            user_agent: header(record.request.user_agent()),
            http_version: record.http_version,
            upstream_seconds: record.upstream_duration.map(|d| d.as_secs_f64()),
            grpc_status: record.grpc_status,
            peer_identity: header(record.request.peer_identity()),
        };
        serde_json::to_string(&line).expect("serialized")
    }

    #[test]
    fn json_lines_are_what_serde_json_wrote() {
        let mut records = vec![AccessRecord::malformed(
            "inbound",
            "[::1]:9".parse().expect("address"),
            431,
            "headers too large: \"x\\y\"\n\u{1}\u{7f}".into(),
        )];
        let weird = [
            "plain",
            "quote \" backslash \\ tab\t nl\n cr\r \u{8}\u{c}\u{1f}",
            "caf\u{e9} \u{2028} \u{1f600}",
        ];
        // Durations written from their nanoseconds (10 µs to 1 s) and through serde_json
        // (the rest), at and beside the bounds.
        let durations = [
            Duration::from_nanos(12_300),
            Duration::from_nanos(100),
            Duration::from_millis(12_500),
            Duration::ZERO,
            Duration::from_nanos(9_999),
            Duration::from_nanos(10_000),
            Duration::from_nanos(999_999_999),
            Duration::from_secs(1),
            Duration::from_nanos(123_456_789),
            Duration::MAX,
        ];
        let addresses = [
            "[fd00::7]:8080",
            "10.1.2.3:65535",
            "0.0.0.0:0",
            "192.168.100.255:80",
        ];
        for (i, duration) in durations.into_iter().enumerate() {
            let text = weird[i % weird.len()];
            let header = HeaderValue::from_bytes(
                text.replace(['\n', '\r', '\t', '\u{8}', '\u{c}', '\u{1f}'], "")
                    .as_bytes(),
            )
            .expect("header");
            let raw = HeaderValue::from_bytes(b"req-\xff\\x41").expect("header");
            let address = |at: usize| addresses[at % addresses.len()].parse().expect("address");
            let identity = HeaderValue::from_static("spiffe://cluster.local/ns/default/sa/shop");
            // Past the room kept in the record with the rest.
            let long_agent = HeaderValue::from_str(&"agent/1.0 ".repeat(20)).expect("header");
            let headers = [
                (i % 5 != 4).then_some(&raw),
                Some(if i % 4 == 3 { &long_agent } else { &header }),
                (i % 2 == 0).then_some(&identity),
            ];
            records.push(AccessRecord {
                time: SystemTime::UNIX_EPOCH
                    + Duration::from_micros(1_700_000_000_123_456 + i as u64),
                ids: Some((TraceId([0xab; 16]), SpanId([0x01; 8]))),
                direction: Arc::from("outbound"),
                service: Arc::from(text),
                route: Arc::from(""),
                method: Some(Method::from_bytes(b"PURGE").expect("method")),
                request: match i % 4 {
                    0 => LoggedRequest::new(
                        Some("shop:8080"),
                        Some("/p/caf%C3%A9?token=s3cret&debug&x="),
                        headers,
                    ),
                    1 => LoggedRequest::new(
                        Some(text),
                        Some("/p/caf%C3%A9?token=s3cret&debug&x="),
                        headers,
                    ),
                    2 => LoggedRequest::new(None, Some("/"), headers),
                    _ => LoggedRequest::new(Some(""), None, headers),
                },
                status: 503,
                response_flags: ResponseFlag::ALL[i % ResponseFlag::ALL.len()],
                upstream: Some(address(i)),
                attempts: 3,
                duration,
                request_bytes: u64::MAX,
                response_bytes: 0,
                error: Some(text.to_string()),
                peer: Some(address(i + 1)),
                http_version: Some("HTTP/2"),
                upstream_duration: Some(durations[(i + 3) % durations.len()]),
                grpc_status: Some(14),
                style: AccessLogStyle {
                    text: false,
                    query: [QueryLogging::Redact, QueryLogging::Keep, QueryLogging::Drop][i % 3],
                },
            });
        }
        // One writer's cache over all of them, each twice: the second line of a record reuses
        // what the first left in the cache.
        let mut cache = LineCache::default();
        for record in records.iter().flat_map(|record| [record, record]) {
            let mut out = Vec::new();
            record.write_to(&mut out, &mut cache).expect("written");
            let line = String::from_utf8(out).expect("UTF-8");
            assert_eq!(line, reference_json(record));
        }
    }

    #[test]
    fn ids_are_written_in_hex_as_their_to_hex() {
        // Every byte value at every place of both ids.
        for byte in 0..=255u8 {
            for at in 0..16 {
                let mut trace = [byte.wrapping_mul(7); 16];
                trace[at] = byte;
                let mut span = [byte.wrapping_add(at as u8); 8];
                span[at % 8] = byte;
                let (trace, span) = (TraceId(trace), SpanId(span));
                let mut out = [0u8; 48];
                hex(&mut out[..32], &trace.0);
                hex(&mut out[32..], &span.0);
                let expected = format!("{}{}", trace.to_hex(), span.to_hex());
                assert_eq!(String::from_utf8_lossy(&out), expected);
            }
        }
    }

    #[test]
    fn methods_are_written_as_json_strings() {
        for name in [
            "GET",
            "POST",
            "PUT",
            "DELETE",
            "HEAD",
            "OPTIONS",
            "PATCH",
            "CONNECT",
            "TRACE",
            "PURGE",
            "get",
            "X-Custom-Method-Long",
        ] {
            let parsed = Method::from_bytes(name.as_bytes()).expect("method");
            let mut out = Vec::new();
            method(&mut out, Some(&parsed));
            let expected = serde_json::to_vec(name).expect("serialized");
            assert_eq!(out, expected, "{name}");
        }
        let mut out = Vec::new();
        method(&mut out, None);
        assert_eq!(out, b"\"\"");
    }

    #[test]
    fn versions_are_written_as_json_strings() {
        let versions = [
            http::Version::HTTP_09,
            http::Version::HTTP_10,
            http::Version::HTTP_11,
            http::Version::HTTP_2,
            http::Version::HTTP_3,
        ];
        for name in versions.map(version_name).into_iter().chain([None]) {
            let mut out = Vec::new();
            version(&mut out, name);
            assert_eq!(
                out,
                serde_json::to_vec(&name).expect("serialized"),
                "{name:?}"
            );
        }
    }

    #[test]
    fn response_flag_codes_need_no_escape() {
        // write_json copies them between quotes as they are.
        for flag in ResponseFlag::ALL {
            let mut out = Vec::new();
            json::string(&mut out, flag.code());
            assert_eq!(out, format!("\"{}\"", flag.code()).into_bytes());
        }
    }

    #[test]
    fn logged_requests_keep_their_authority_and_target_apart() {
        let cases = [
            (Some("shop:8080"), Some("/p?q=1")),
            (Some(""), Some("/")),
            (Some("[::1]:9"), Some("")),
            (None, Some("/x")),
            (Some("shop"), None),
            (None, None),
        ];
        // Around the room kept in the record: inline, just fits, one byte more.
        let long = "x".repeat(2 * LoggedRequest::INLINE);
        let cases = cases.into_iter().chain([
            (Some(&long[..10]), Some(&long[..LoggedRequest::INLINE - 10])),
            (Some(&long[..10]), Some(&long[..LoggedRequest::INLINE - 9])),
            (None, Some(&long[..LoggedRequest::INLINE])),
            (Some(&long[..LoggedRequest::INLINE + 1]), None),
            (Some(&long[..]), Some(&long[..])),
        ]);
        for (authority, target) in cases {
            let agent = HeaderValue::from_static("agent/1.0");
            let id = HeaderValue::from_bytes(b"req-\xff").expect("header");
            for headers in [[None, None, None], [Some(&id), Some(&agent), Some(&agent)]] {
                let logged = LoggedRequest::new(authority, target, headers);
                assert_eq!((logged.authority(), logged.target()), (authority, target));
                let [request_id, user_agent, peer_identity] =
                    headers.map(|h| h.map(HeaderValue::as_bytes));
                assert_eq!(
                    (
                        logged.request_id(),
                        logged.user_agent(),
                        logged.peer_identity()
                    ),
                    (request_id, user_agent, peer_identity)
                );
                let len = [
                    authority.map(str::as_bytes),
                    target.map(str::as_bytes),
                    request_id,
                    user_agent,
                    peer_identity,
                ]
                .into_iter()
                .flatten()
                .map(<[u8]>::len)
                .sum::<usize>();
                assert_eq!(logged.heap.is_some(), len > LoggedRequest::INLINE);
            }
        }
        let none = LoggedRequest::default();
        assert_eq!((none.authority(), none.target()), (None, None));
        assert_eq!(
            (none.request_id(), none.user_agent(), none.peer_identity()),
            (None, None, None)
        );
    }

    #[test]
    fn text_lines_quote_and_escape_what_could_break_them() {
        let mut record = AccessRecord::malformed(
            "inbound",
            "127.0.0.1:9".parse().expect("address"),
            400,
            "bad \"head\"\nnext".into(),
        );
        record.style.text = true;
        let mut out = Vec::new();
        record
            .write_to(&mut out, &mut LineCache::default())
            .expect("written");
        let line = String::from_utf8(out).expect("UTF-8");
        assert!(
            line.ends_with(
                " inbound -/- 127.0.0.1:9 \"- - -\" 400 0.000000s response_flags=DPE request_bytes=0 response_bytes=0 attempts=0 error=\"bad \\\"head\\\"\\x0anext\""
            ),
            "{line}"
        );
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;
    use std::sync::Mutex;

    /// Keeps each write(2) the writer would make.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("writes").push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        /// Lines per write.
        fn lines(&self) -> Vec<usize> {
            let writes = self.0.lock().expect("writes");
            writes
                .iter()
                .map(|w| w.split(|&b| b == b'\n').count() - 1)
                .collect()
        }
    }

    fn record(error_len: usize) -> AccessRecord {
        let peer = "127.0.0.1:9".parse().expect("address");
        AccessRecord::malformed("inbound", peer, 400, "e".repeat(error_len))
    }

    fn counters() -> (prometheus::IntCounter, LogProgress) {
        let lines = prometheus::IntCounter::new("lines", "lines").expect("counter");
        (lines, LogProgress::default())
    }

    #[test]
    fn what_is_queued_goes_out_in_one_write_and_all_of_it_before_the_writer_ends() {
        let (tx, rx) = mpsc::channel(ACCESS_LOG_QUEUE);
        for _ in 0..100 {
            tx.try_send(record(10)).expect("queued");
        }
        // Closed with lines still queued, as when the last snapshot that logs goes.
        drop(tx);
        let writes = Writes::default();
        let (lines, progress) = counters();
        let mut pauses = 0;
        write_access_log(rx, &mut writes.clone(), (&lines, &progress), || pauses += 1);
        assert_eq!(writes.lines(), [100]);
        assert_eq!(pauses, 1);
        assert_eq!(lines.get(), 100);
        assert_eq!(progress.flushed.load(Ordering::Acquire), 100);
        for line in writes.0.lock().expect("writes")[0].split(|&b| b == b'\n') {
            if !line.is_empty() {
                serde_json::from_slice::<serde_json::Value>(line).expect("a JSON line");
            }
        }
    }

    #[test]
    fn a_large_batch_is_written_in_chunks_that_end_at_a_line_end() {
        let (tx, rx) = mpsc::channel(ACCESS_LOG_QUEUE);
        // About 1,300 bytes a line: 300 lines are several chunks.
        for _ in 0..300 {
            tx.try_send(record(1_000)).expect("queued");
        }
        drop(tx);
        let writes = Writes::default();
        let (lines, progress) = counters();
        write_access_log(rx, &mut writes.clone(), (&lines, &progress), || {});
        let all = writes.0.lock().expect("writes").clone();
        assert!(all.len() > 2, "{} writes", all.len());
        for (i, write) in all.iter().enumerate() {
            assert_eq!(write.last(), Some(&b'\n'), "write {i} ends a line");
            if i + 1 < all.len() {
                assert!(
                    write.len() >= ACCESS_LOG_WRITE,
                    "write {i}: {}",
                    write.len()
                );
                assert!(
                    write.len() < ACCESS_LOG_WRITE + 2_000,
                    "write {i}: {}",
                    write.len()
                );
            }
        }
        assert_eq!(writes.lines().iter().sum::<usize>(), 300);
        assert_eq!(progress.flushed.load(Ordering::Acquire), 300);
    }

    #[test]
    fn lines_that_come_while_the_writer_pauses_wait_for_its_next_batch() {
        let (tx, rx) = mpsc::channel(ACCESS_LOG_QUEUE);
        let writes = Writes::default();
        // The writer tells when it pauses and waits to be let go: the test decides what is
        // queued meanwhile.
        let (paused_tx, paused) = std::sync::mpsc::channel();
        let (resume, resume_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let mut out = writes.clone();
            std::thread::spawn(move || {
                let (lines, progress) = counters();
                write_access_log(rx, &mut out, (&lines, &progress), || {
                    let _ = paused_tx.send(());
                    let _ = resume_rx.recv();
                });
                progress.flushed.load(Ordering::Acquire)
            })
        };
        let deadline = Duration::from_secs(10);
        tx.try_send(record(10)).expect("queued");
        paused.recv_timeout(deadline).expect("first batch written");
        assert_eq!(writes.lines(), [1]);
        for _ in 0..50 {
            tx.try_send(record(10)).expect("queued");
        }
        resume.send(()).expect("writer waits");
        paused.recv_timeout(deadline).expect("second batch written");
        assert_eq!(writes.lines(), [1, 50]);
        drop(tx);
        resume.send(()).expect("writer waits");
        assert_eq!(writer.join().expect("writer ends"), 51);
    }
}
