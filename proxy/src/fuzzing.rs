//! Entry points for the coverage-guided fuzz targets in `fuzz/` (cargo-fuzz), one per parser
//! that reads what a peer sends: the upstream codec's response head and body framing
//! (`pool/direct.rs`), the trace context headers (`policy/trace.rs`) and the request checks
//! (`headers.rs`), and the routing snapshot built from a policy (`snapshot.rs`). Each runs the
//! proxy's own code on arbitrary bytes and panics when an invariant breaks, so the fuzzer reports it; the unit tests below replay the committed corpus
//! (`fuzz/corpus/<target>/`) and the crashes found so far.
//!
//! Not part of the proxy's API: nothing on the request path calls into this module.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use crate::core::headers;
use crate::http::route_match::RouteRequest;
use crate::http::snapshot::Snapshot;
use crate::io::pool::direct::fuzzing::{self as direct, BodyFraming, ScriptedReads};
use crate::telemetry::metrics::Metrics;
use crate::trace::{self, Origin, Sampler, SpanId, TraceContext};

/// Splits an input into a control byte, a read plan and the payload: the control byte's low bit
/// is a flag, the other seven the plan's length; each plan byte is the size of one read (0: a
/// read that is not ready yet), after which reads are as large as the proxy's own.
fn split_input(data: &[u8]) -> (bool, &[u8], &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return (false, &[], &[]);
    };
    let (plan, payload) = rest.split_at(usize::from(control >> 1).min(rest.len()));
    (control & 1 == 1, plan, payload)
}

/// What reading a response came to, in a form two readings can be compared by.
#[derive(Debug, PartialEq)]
struct ResponseOutcome {
    head: Result<(StatusCode, Version, HeaderMap, BodyFraming, bool), String>,
    body: Option<Result<direct::Body, String>>,
    /// Bytes after the response, when it was read whole.
    left: Option<usize>,
}

fn read_response(payload: &[u8], plan: &[u8], head_request: bool) -> ResponseOutcome {
    let mut reads = ScriptedReads::new(payload, plan);
    let mut read_buf = BytesMut::new();
    let head = match direct::read_head(&mut read_buf, &mut reads, head_request) {
        Ok(head) => head,
        Err(error) => {
            return ResponseOutcome {
                head: Err(error.to_string()),
                body: None,
                left: None,
            }
        }
    };
    let summary = (
        head.response.status(),
        head.response.version(),
        head.response.headers().clone(),
        head.framing,
        head.keep_alive,
    );
    let body = direct::read_body(&mut read_buf, &mut reads, head);
    let left = body
        .is_ok()
        .then(|| read_buf.len().saturating_add(reads.unread()));
    ResponseOutcome {
        head: Ok(summary),
        body: Some(body.map_err(|error| error.to_string())),
        left,
    }
}

/// Fuzz target `response_head`: an upstream's response (head, then body) read by the upstream
/// codec, once in reads of the proxy's own size and once split as the input's plan says (the
/// control byte's flag: the request was HEAD).
///
/// Invariants: how the bytes arrive does not change the outcome; a head's framing agrees with
/// its status and header fields; a connection is kept only when the body has a known end and
/// the framing was unambiguous; a body never holds more than was received and a
/// `content-length` body holds exactly that many bytes.
pub fn response_head(data: &[u8]) {
    let (head_request, plan, payload) = split_input(data);
    let whole = read_response(payload, &[], head_request);
    let split = read_response(payload, plan, head_request);
    assert_eq!(
        whole, split,
        "the outcome depends on how the response was read"
    );
    let Ok((status, _, headers, framing, keep_alive)) = &whole.head else {
        return;
    };
    assert!(!status.is_informational(), "an interim response as final");
    if head_request || *status == StatusCode::NO_CONTENT || *status == StatusCode::NOT_MODIFIED {
        assert_eq!(*framing, BodyFraming::Empty, "a response that has no body");
    }
    if let BodyFraming::Length(n) = framing {
        assert!(*n > 0 && headers.contains_key(header::CONTENT_LENGTH));
    }
    if *keep_alive {
        assert_ne!(
            *framing,
            BodyFraming::UntilClose,
            "kept a connection with no end"
        );
        assert!(
            !(headers.contains_key(header::TRANSFER_ENCODING)
                && headers.contains_key(header::CONTENT_LENGTH)),
            "kept a connection whose response had two framings"
        );
    }
    let Some(Ok(body)) = &whole.body else {
        return;
    };
    assert!(
        body.data.len() <= payload.len(),
        "a body larger than its input"
    );
    match framing {
        BodyFraming::Empty => assert!(body.data.is_empty() && body.trailers.is_none()),
        BodyFraming::Length(n) => {
            assert_eq!(body.data.len() as u64, *n);
            assert!(body.trailers.is_none());
        }
        BodyFraming::UntilClose => assert!(body.trailers.is_none()),
        BodyFraming::Chunked => {}
    }
}

/// Fuzz target `chunked`: a chunked body, from its first chunk-size line through the trailer
/// section, read by the upstream codec's body state machine in reads of the proxy's own size
/// and split as the input's plan says (the control byte's flag is unused).
///
/// Invariants: the same data, trailers and errors however the bytes arrive; the decoded data
/// is shorter than the input.
pub fn chunked(data: &[u8]) {
    let (_, plan, payload) = split_input(data);
    let read = |plan: &[u8]| {
        let mut reads = ScriptedReads::new(payload, plan);
        let mut read_buf = BytesMut::new();
        let body = direct::read_chunked(&mut read_buf, &mut reads);
        let left = read_buf.len().saturating_add(reads.unread());
        match body {
            Ok(body) => Ok((body, left)),
            Err(error) => Err(error.to_string()),
        }
    };
    let whole = read(&[]);
    assert_eq!(
        whole,
        read(plan),
        "the outcome depends on how the body was read"
    );
    if let Ok((body, left)) = &whole {
        // At least `0\r\n` and an empty line (a bare LF ends the trailer section, as httparse
        // reads it) besides the data.
        assert!(
            body.data.len() + 4 <= payload.len() - left,
            "decoded more than read"
        );
    }
}

/// Header fields from `name: value` lines (names and values that are not valid are skipped, as
/// hyper would refuse them).
fn header_lines(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    headers
}

/// Fuzz target `trace`: trace context headers (`name: value` lines) extracted, forwarded and
/// extracted again as the next proxy would.
///
/// Invariants: ids are never zero; only a continued trace has a parent; a forwarded `tracestate`
/// is already clean; what is forwarded (`traceparent`, and B3 in each format that came in) reads
/// back as the same trace with this proxy's span as the parent and the same decision.
pub fn trace(data: &[u8]) {
    let headers = header_lines(data);
    let sampler = Sampler::parent_based(0.5);
    let ctx = TraceContext::extract(&headers, &sampler);
    assert_ne!(ctx.trace_id.0, [0; 16]);
    assert_ne!(ctx.span_id.0, [0; 8]);
    assert!(ctx.parent_id.is_none_or(|p| p.0 != [0; 8]));
    match ctx.origin {
        Origin::W3c => assert!(ctx.parent_id.is_some()),
        Origin::B3 => assert!(ctx.parent_id.is_some() && ctx.tracestate.is_none()),
        Origin::New | Origin::Invalid => {
            assert!(ctx.parent_id.is_none() && ctx.tracestate.is_none())
        }
    }
    if let Some(state) = &ctx.tracestate {
        let mut alone = HeaderMap::new();
        alone.insert(&trace::TRACESTATE, state.clone());
        assert_eq!(trace::sanitize_tracestate(&alone).as_ref(), Some(state));
    }

    let span = SpanId::random();
    let mut forwarded = headers.clone();
    ctx.inject(&mut forwarded, span);
    assert_eq!(forwarded.get_all(&trace::TRACEPARENT).iter().count(), 1);
    assert!(forwarded.get_all(&trace::TRACESTATE).iter().count() <= 1);
    assert_eq!(forwarded.contains_key(&trace::B3), ctx.b3.single);
    assert_eq!(forwarded.contains_key(&trace::X_B3_TRACEID), ctx.b3.multi);
    let next = TraceContext::extract(&forwarded, &sampler);
    let continued = |next: &TraceContext, origin| {
        assert_eq!(next.origin, origin);
        assert_eq!(next.trace_id, ctx.trace_id);
        assert_eq!(next.parent_id, Some(span));
        assert_eq!(next.sampled, ctx.sampled);
    };
    continued(&next, Origin::W3c);
    // The random flag goes on as it came (or as set for a trace started here).
    assert_eq!(next.random, ctx.random);
    assert_eq!(next.tracestate, ctx.tracestate);
    assert_eq!(
        (next.b3.single, next.b3.multi),
        (ctx.b3.single, ctx.b3.multi)
    );

    // Each B3 format forwarded, alone, continues the same trace too.
    let b3_only = |keep: &[&HeaderName]| {
        let mut headers = HeaderMap::new();
        for (name, value) in &forwarded {
            if keep.contains(&name) {
                headers.append(name, value.clone());
            }
        }
        TraceContext::extract(&headers, &sampler)
    };
    if ctx.b3.single {
        continued(&b3_only(&[&trace::B3]), Origin::B3);
    }
    if ctx.b3.multi {
        let multi = [
            &trace::X_B3_TRACEID,
            &trace::X_B3_SPANID,
            &trace::X_B3_PARENTSPANID,
            &trace::X_B3_SAMPLED,
            &trace::X_B3_FLAGS,
        ];
        continued(&b3_only(&multi), Origin::B3);
    }
}

/// A request as hyper's server would hand it over, from an HTTP/1.1 request head; `None` for
/// heads hyper refuses before any of the proxy's code runs.
/// A request body still to come, of no declared length: what a chunked HTTP/1.1 request
/// carries, so the transfer-coding checks run as they do on the wire.
struct BodyToCome;

impl http_body::Body for BodyToCome {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

fn parse_request(data: &[u8]) -> Option<Request<BodyToCome>> {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(_) = parsed.parse(data).ok()? else {
        return None;
    };
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let uri = Uri::try_from(parsed.path?).ok()?;
    let version = match parsed.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut request = Request::new(BodyToCome);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        request.headers_mut().append(name, value);
    }
    Some(request)
}

/// Fuzz target `request_head`: an HTTP/1.1 request head through the checks and header
/// rewriting the proxy applies before forwarding.
///
/// Invariants: CONNECT and several Host fields are refused; an accepted HTTP/1.1 request has an
/// authority; after hop-by-hop removal no hop-by-hop field (nor one named in `Connection`) is
/// left but those an upgrade needs, and no `content-length` beside a removed
/// `transfer-encoding`; `x-forwarded-for` ends with the caller; a request id is set.
pub fn request_head(data: &[u8]) {
    let Some(mut request) = parse_request(data) else {
        return;
    };
    let checked = headers::check_request(&request);
    let authority = headers::request_authority(&request);
    let upgrade = headers::is_upgrade(&request);
    let _ = headers::is_grpc(&request);
    if request.method() == Method::CONNECT {
        assert!(checked.is_err(), "CONNECT accepted");
    }
    if checked.is_err() {
        return;
    }
    assert!(request.headers().get_all(header::HOST).iter().count() <= 1);
    if request.version() == Version::HTTP_11 {
        assert!(
            !matches!(authority, Ok(None)),
            "an HTTP/1.1 request with no authority accepted"
        );
    }

    let fields = request.headers_mut();
    let named: Vec<String> = fields
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let had_transfer_encoding = fields.contains_key(header::TRANSFER_ENCODING);
    headers::strip_hop_by_hop(fields, upgrade);
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        assert!(!fields.contains_key(name), "{name} forwarded");
    }
    assert!(fields
        .get(header::TE)
        .is_none_or(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers")));
    if upgrade {
        assert_eq!(fields.get_all(header::CONNECTION).iter().count(), 1);
        assert_eq!(fields[header::CONNECTION], "upgrade");
    } else {
        assert!(!fields.contains_key(header::CONNECTION));
        assert!(!fields.contains_key(header::UPGRADE));
    }
    for name in &named {
        let needed = upgrade && (name == "upgrade" || name == "connection");
        assert!(
            needed || !fields.contains_key(name.as_str()),
            "{name} forwarded"
        );
    }
    if had_transfer_encoding {
        assert!(!fields.contains_key(header::CONTENT_LENGTH));
    }

    let caller = headers::Caller::new(([127, 0, 0, 1], 40000).into());
    headers::append_forwarded(fields, &caller);
    let forwarded_for = fields.get_all("x-forwarded-for").iter().next_back();
    assert!(forwarded_for.is_some_and(|v| v.as_bytes().ends_with(b"127.0.0.1")));
    headers::ensure_request_id(fields);
    assert!(fields.contains_key(&headers::REQUEST_ID));
}

/// Fuzz target `snapshot`: policy text, parsed and validated as a proxy loads `--policy`; a
/// valid policy is compiled into the routing snapshot twice, the second time over the first
/// as a reload does. Extreme but valid policies (thousands of services, maximal weights, rates
/// and durations, DNS services, dedicated ports) are what the seed corpus and the YAML
/// dictionary steer it to.
///
/// Invariants: building never panics; every service has its upstream, and a rebuild of the
/// same policy keeps each one (the same `Arc`: warm pools and endpoint health survive a reload);
/// a request meeting any match of a route is routed (matches with a regex aside); every `listen` has its dedicated
/// target; there is an inbound target exactly when the policy has `inbound`.
pub fn snapshot(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut loaded) = outrider_config::load("fuzz.yaml", text) else {
        return;
    };
    // A CA bundle is a file read at build time: a path such as /dev/stdin would block the
    // fuzzer, and the TLS config is not what is under test here.
    for service in loaded.policy.services.values_mut() {
        if let Some(outrider_config::ServiceTls::Origination(tls)) = service.tls.as_mut() {
            tls.ca = None;
        }
    }
    // DNS services spawn their resolver on the runtime; it is dropped, never driven.
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    let _entered = runtime.enter();
    let Ok(metrics) = Metrics::new("fuzz") else {
        return;
    };
    let policy = loaded.policy.clone();
    let first = Snapshot::build(loaded.clone(), 1, &metrics, None);
    let second = Snapshot::build(loaded, 2, &metrics, Some(&first));
    for (name, service) in &policy.services {
        let before = first.upstream(name).expect("every service has an upstream");
        let after = second
            .upstream(name)
            .expect("every service has an upstream");
        assert!(
            std::sync::Arc::ptr_eq(before, after),
            "service {name} lost its upstream on an identical reload"
        );
        if let Some(listen) = service.listen {
            assert!(second.dedicated(listen).is_some(), "{listen} not served");
        }
    }
    for route in &policy.routes {
        for m in route.each_match() {
            let Some(request) = request_meeting(m) else {
                continue;
            };
            let host = m.authority.as_deref().unwrap_or("any.host");
            let routed = second.route_filtered(&RouteRequest::of(host, &request));
            assert!(
                routed.is_some(),
                "route {:?} does not route its own match {m:?}",
                route.name
            );
            // A valid policy's filters always make a valid request target and `Location`.
            if let Some((_, Some(filters))) = routed {
                check_filters(filters, host, request.uri());
            }
        }
    }
    assert_eq!(second.inbound().is_some(), policy.inbound.is_some());
}

/// Applies `filters` to a request to `host` for `uri`: a rewritten path is a valid target, a
/// redirect a valid `Location`.
fn check_filters(filters: &crate::http::route_filter::RouteFilters, host: &str, uri: &Uri) {
    if let Some(rewrite) = &filters.rewrite {
        if rewrite.path.is_some() {
            assert!(
                rewrite.path_and_query(uri).is_some(),
                "{uri} rewritten by {rewrite:?} is no request target"
            );
        }
    }
    if let Some(redirect) = &filters.redirect {
        let url = crate::http::route_filter::RequestUrl {
            scheme: "http",
            host,
            port: None,
            path: uri.path(),
            query: uri.query(),
        };
        assert!(
            redirect.respond(&url).is_some(),
            "{uri} redirected by {redirect:?} has no valid Location"
        );
    }
}

/// A request that meets every condition of `m`, when one is easily made: not for a regex, nor
/// for a path or value that an `http` request cannot carry.
fn request_meeting(m: &outrider_config::RouteMatch) -> Option<Request<()>> {
    use outrider_config::matching::PathCondition;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let path = PathCondition::of(m);
    let mut uri = match &path {
        PathCondition::Any => "/".to_string(),
        PathCondition::StrPrefix(prefix) => prefix.to_string(),
        PathCondition::SegmentPrefix(prefix) if prefix.is_empty() => "/".to_string(),
        PathCondition::SegmentPrefix(path) | PathCondition::Exact(path) => path.clone(),
        PathCondition::Regex(_) => return None,
    };
    let mut separator = '?';
    for q in &m.query_params {
        let value = match (&q.value, &q.regex, q.present) {
            (Some(value), _, _) => value.as_str(),
            (None, Some(_), _) => return None,
            (None, None, Some(false)) => continue,
            (None, None, _) => "1",
        };
        uri.push(separator);
        separator = '&';
        uri.extend(utf8_percent_encode(&q.name, NON_ALPHANUMERIC).map(str::to_string));
        uri.push('=');
        uri.extend(utf8_percent_encode(value, NON_ALPHANUMERIC).map(str::to_string));
    }
    let mut request = Request::new(());
    *request.uri_mut() = Uri::try_from(uri).ok()?;
    // A `?` or `#` in the condition ends the request's path early.
    if path.matches_plain(request.uri().path()) != Some(true) {
        return None;
    }
    if let Some(method) = &m.method {
        *request.method_mut() = Method::from_bytes(method.as_bytes()).ok()?;
    }
    for h in &m.headers {
        let value = match (&h.value, &h.regex, h.present) {
            (Some(value), _, _) => value.as_str(),
            (None, Some(_), _) => return None,
            (None, None, Some(false)) => continue,
            (None, None, _) => "1",
        };
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        request
            .headers_mut()
            .append(name, HeaderValue::from_str(value).ok()?);
    }
    if m.grpc.is_some() {
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    Some(request)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Runs every file of `fuzz/corpus/<target>` through `run`; returns how many there were.
    fn replay_corpus(target: &str, run: fn(&[u8])) -> usize {
        let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "fuzz", "corpus", target]
            .iter()
            .collect();
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut count = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            run(&data);
            count += 1;
        }
        count
    }

    /// Found by the fuzzer (a wrong bound in the target, not in the codec): `0\r\n` and a bare
    /// LF end a chunked body, since httparse ends the trailer section at an empty line either way.
    #[test]
    fn a_bare_lf_ends_the_trailer_section() {
        let crash = b"\x16\x01\x01\x00\x01\x01\x01\x01\x01\x02\x00\x030\r\n\n0\r\ngrpc-s2hCONNECTg\x92lo\r\n2\r\n\r\n";
        chunked(crash);
        let mut reads = ScriptedReads::new(b"3\r\nabc\r\n0\r\n\nrest", &[]);
        let mut read_buf = BytesMut::new();
        let body = direct::read_chunked(&mut read_buf, &mut reads).expect("body");
        assert_eq!(body.data, b"abc");
        assert_eq!(&read_buf[..], b"rest");
    }

    /// A chunked body whose first chunk-size line is `ext_len + 3` bytes long, read in reads of
    /// 255 bytes and then `last`.
    fn long_chunk_line(ext_len: usize, last: u8) -> Vec<u8> {
        let mut input = vec![5 << 1, 255, 255, 255, 255, last, b'4', b';'];
        input.resize(input.len() + ext_len, b'e');
        input.extend_from_slice(b"\r\nabcd\r\n0\r\n\r\n");
        input
    }

    /// The chunk-size line limit (1 KiB) holds however the line arrives: a longer line that came
    /// in one read was accepted, the same line in several reads refused.
    #[test]
    fn the_chunk_line_limit_does_not_depend_on_the_reads() {
        // 1,103 bytes, 1,070 of them read before the LF arrives.
        chunked(&long_chunk_line(1100, 50));
        // 1,024 bytes (the most allowed), and 1,025.
        chunked(&long_chunk_line(1021, 4));
        chunked(&long_chunk_line(1022, 5));
        let refused = |input: &[u8]| {
            let mut reads = ScriptedReads::new(input, &[]);
            direct::read_chunked(&mut BytesMut::new(), &mut reads).is_err()
        };
        assert!(refused(&long_chunk_line(1022, 0)[6..]));
        assert!(!refused(&long_chunk_line(1021, 0)[6..]));
    }

    /// The same for the trailer section's limit (64 KiB, as for a head).
    #[test]
    fn the_trailer_limit_does_not_depend_on_the_reads() {
        use crate::io::pool::contract::MAX_TRAILER_BYTES;
        let body = |value_len: usize| {
            let mut body = b"1\r\na\r\n0\r\nx-big: ".to_vec();
            body.resize(body.len() + value_len, b'v');
            body.extend_from_slice(b"\r\n\r\n");
            body
        };
        // 10 reads of 255 bytes, then reads of 8 KiB: the section (past the limit) is not
        // complete in any but the last.
        let mut input = vec![10 << 1];
        input.resize(11, 255);
        input.extend_from_slice(&body(MAX_TRAILER_BYTES + 1000));
        chunked(&input);
        let refused = |value_len| {
            let body = body(value_len);
            let mut reads = ScriptedReads::new(&body, &[]);
            direct::read_chunked(&mut BytesMut::new(), &mut reads).is_err()
        };
        // The section is the value and 11 bytes.
        assert!(refused(MAX_TRAILER_BYTES - 10));
        assert!(!refused(MAX_TRAILER_BYTES - 11));
    }

    #[test]
    fn the_committed_corpus_passes_every_target() {
        for (target, run) in [
            ("response_head", response_head as fn(&[u8])),
            ("chunked", chunked),
            ("trace", trace),
            ("request_head", request_head),
            ("snapshot", snapshot),
        ] {
            assert!(replay_corpus(target, run) >= 5, "{target}: corpus missing");
        }
    }
}
