//! Trace-context propagation: W3C Trace Context (`traceparent`, `tracestate`) per the W3C
//! Recommendation, B3 (single `b3` header and multi `x-b3-*`) accepted when no `traceparent` is
//! present and forwarded in the format it came in, and parent-based sampling at a ratio.
//!
//! The proxy is a participant in the trace: it continues the caller's trace with a span of its
//! own and forwards its own span id as the parent id. Anything it cannot parse starts a new
//! trace (random ids, never all zeros, the Level 2 `random-trace-id` flag set); an invalid
//! context is never forwarded. A continued trace keeps the caller's random flag.
//!
//! Parsing works on the header bytes and allocates nothing; writing allocates only the header
//! values it inserts (and rebuilds `tracestate` only when several fields or empty members had
//! to be joined).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent` (W3C Trace Context).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context).
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3 single header.
pub static B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi: trace id.
pub static X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// B3 multi: span id.
pub static X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// B3 multi: parent span id.
pub static X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// B3 multi: sampling decision.
pub static X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// B3 multi: debug flag.
pub static X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every trace context header [`TraceContext::inject`] replaces.
static TRACE_HEADERS: [&HeaderName; 8] = [
    &TRACEPARENT,
    &TRACESTATE,
    &B3,
    &X_B3_TRACEID,
    &X_B3_SPANID,
    &X_B3_PARENTSPANID,
    &X_B3_SAMPLED,
    &X_B3_FLAGS,
];

/// Whether `name` is one of [`TRACE_HEADERS`] (a `match` on the lowercase name: a length
/// dispatch, then one comparison).
fn is_trace_header(name: &str) -> bool {
    matches!(
        name,
        "traceparent"
            | "tracestate"
            | "b3"
            | "x-b3-traceid"
            | "x-b3-spanid"
            | "x-b3-parentspanid"
            | "x-b3-sampled"
            | "x-b3-flags"
    )
}

/// Most `tracestate` list members a list may have (W3C Trace Context §3.3.1.1); a longer list
/// is not a valid `tracestate` and is discarded whole.
pub const TRACESTATE_MAX_MEMBERS: usize = 32;

/// `trace-flags` bit 0: the caller may have recorded the trace.
const FLAG_SAMPLED: u8 = 0x01;
/// `trace-flags` bit 1 (Trace Context Level 2): at least the right-most 7 bytes of the trace
/// id are random.
const FLAG_RANDOM: u8 = 0x02;

/// A 16-byte trace id; never all zeros once made by this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros once made by this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random, non-zero trace id.
    pub fn random() -> Self {
        loop {
            let bits = fastrand::u128(..);
            if bits != 0 {
                return Self(bits.to_be_bytes());
            }
        }
    }

    /// Lowercase hex, 32 characters.
    pub fn to_hex(self) -> String {
        hex_string(&self.0)
    }
}

impl SpanId {
    /// A random, non-zero span id.
    pub fn random() -> Self {
        loop {
            let bits = fastrand::u64(..);
            if bits != 0 {
                return Self(bits.to_be_bytes());
            }
        }
    }

    /// Lowercase hex, 16 characters.
    pub fn to_hex(self) -> String {
        hex_string(&self.0)
    }
}

fn hex_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Which B3 encodings the caller used; the forwarded request carries the same ones (plus
/// `traceparent`), so a fleet mixing B3 and W3C services keeps one trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct B3Formats {
    /// The single `b3` header was present.
    pub single: bool,
    /// The `x-b3-*` headers were present.
    pub multi: bool,
    /// The caller's B3 trace id had 64 bits (16 hex digits); forwarded the same width.
    pub trace_id_64: bool,
}

/// Where the context of a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A valid `traceparent` was continued.
    W3c,
    /// A valid B3 context was continued (no `traceparent` was present).
    B3,
    /// No context came in: a new trace.
    New,
    /// A context came in but was invalid: a new trace, the invalid one not forwarded.
    Invalid,
}

/// The trace context of one request as the proxy handles it: the trace it belongs to, the
/// caller's span (the parent), this proxy's span for the request, and what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span, when the trace was continued.
    pub parent_id: Option<SpanId>,
    /// This proxy's span for the request.
    pub span_id: SpanId,
    /// Whether the trace is sampled (recorded and exported).
    pub sampled: bool,
    /// The `random-trace-id` flag (Level 2): the caller's, or set for a trace started here.
    pub random: bool,
    /// The `tracestate` to forward, already checked (absent when none or invalid).
    pub tracestate: Option<HeaderValue>,
    /// B3 encodings to forward besides `traceparent`.
    pub b3: B3Formats,
    /// Where the context came from.
    pub origin: Origin,
}

/// How new traces are sampled: parent-based, new traces at `ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampler {
    /// A trace is sampled when the low 63 bits of its id's last 8 bytes fall below this bound;
    /// deterministic, so every proxy that starts or sees the trace decides alike (the
    /// OpenTelemetry `TraceIdRatioBased` rule).
    bound: u64,
}

impl Sampler {
    /// Samples new traces at `ratio` (clamped to 0..=1) and follows the caller's decision.
    pub fn parent_based(ratio: f64) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        // `as` saturates; ratio 1.0 gives 2^63, above every 63-bit value.
        let bound = (ratio * (1u64 << 63) as f64) as u64;
        Self { bound }
    }

    /// The decision for a new trace (or a continued one whose caller deferred the decision).
    pub fn sample_new(&self, trace_id: TraceId) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id.0[8..]);
        (u64::from_be_bytes(low) >> 1) < self.bound
    }

    /// Follows the caller's decision when there is one, else samples at the ratio.
    pub fn decide(&self, trace_id: TraceId, parent: Option<bool>) -> bool {
        parent.unwrap_or_else(|| self.sample_new(trace_id))
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self::parent_based(1.0)
    }
}

/// A parsed `traceparent`: trace id, parent id, sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span.
    pub parent_id: SpanId,
    /// The sampled flag (bit 0 of trace-flags).
    pub sampled: bool,
    /// The random trace id flag (bit 1 of trace-flags, Trace Context Level 2).
    pub random: bool,
}

fn hex_nibble_lower(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes lowercase hex into `out`; uppercase and other characters are errors (W3C
/// HEXDIGLC, and B3's "lower-hex").
fn decode_hex(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (pair, byte) in s.chunks_exact(2).zip(out.iter_mut()) {
        *byte = (hex_nibble_lower(pair[0])? << 4) | hex_nibble_lower(pair[1])?;
    }
    Some(())
}

/// Parses a `traceparent` value by the Recommendation's rules: version `00` strictly (exactly
/// 55 characters), a higher version by its first four fields (at least 55 characters, and a
/// dash after the flags if longer), version `ff` invalid, ids never all zeros, hex lowercase.
pub fn parse_traceparent(value: &[u8]) -> Option<TraceParent> {
    if value.len() < 55 {
        return None;
    }
    let mut version = [0u8; 1];
    decode_hex(&value[0..2], &mut version)?;
    match version[0] {
        0xff => return None,
        0x00 if value.len() != 55 => return None,
        0x00 => {}
        // A future version: only the first four fields are read; whatever follows must be
        // separated by a dash.
        _ if value.len() > 55 && value[55] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    decode_hex(&value[3..35], &mut trace_id)?;
    let mut parent_id = [0u8; 8];
    decode_hex(&value[36..52], &mut parent_id)?;
    let mut flags = [0u8; 1];
    decode_hex(&value[53..55], &mut flags)?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id: TraceId(trace_id),
        parent_id: SpanId(parent_id),
        sampled: flags[0] & FLAG_SAMPLED != 0,
        random: flags[0] & FLAG_RANDOM != 0,
    })
}

/// Formats a version-00 `traceparent` with the two flags the Recommendation defines (Level 2):
/// sampled and random; every other flag bit is 0.
pub fn format_traceparent(
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    random: bool,
) -> HeaderValue {
    let mut out = [0u8; 55];
    out[0] = b'0';
    out[1] = b'0';
    out[2] = b'-';
    write_hex(&mut out[3..35], &trace_id.0);
    out[35] = b'-';
    write_hex(&mut out[36..52], &span_id.0);
    out[52] = b'-';
    let flags = (u8::from(sampled) * FLAG_SAMPLED) | (u8::from(random) * FLAG_RANDOM);
    out[53] = b'0';
    out[54] = HEX[usize::from(flags)];
    header_value(&out)
}

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// A header value from bytes this module produced (hex, dashes, checked tracestate text).
fn header_value(bytes: &[u8]) -> HeaderValue {
    // Cannot fail: every byte is visible ASCII. The fallback keeps the request path free of
    // panics all the same.
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn is_key_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
}

/// A `tracestate` key (Trace Context Level 2): a lowercase letter or digit, then up to 255 of
/// lowercase letters, digits, `_`, `-`, `*`, `/` and `@`. (Level 1's `tenant@system` split with
/// its separate length limits is gone: `foo@`, `a@@b` and a 256-character key with an `@`
/// anywhere are keys.)
fn valid_key(key: &[u8]) -> bool {
    (1..=256).contains(&key.len())
        && (key[0].is_ascii_lowercase() || key[0].is_ascii_digit())
        && key[1..].iter().all(|&c| is_key_char(c))
}

/// A `tracestate` value: 1 to 256 printable ASCII characters without `,` or `=`, the last not
/// a space.
fn valid_value(value: &[u8]) -> bool {
    let nblk = |c: u8| (0x21..=0x7e).contains(&c) && c != b',' && c != b'=';
    (1..=256).contains(&value.len())
        && value.iter().all(|&c| c == b' ' || nblk(c))
        && value.last().is_some_and(|&c| c != b' ')
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |i| i + 1);
    &s[start..end]
}

/// The `tracestate` to forward from every `tracestate` field of a request (multiple fields are
/// one comma-separated list, RFC 9110 §5.3). Empty and whitespace-only members are allowed and
/// skipped; a key seen before keeps its first member (the later one is dropped). A list that
/// is not a valid `tracestate` (a member that is not `key=value` by the grammar, or more than
/// 32 members) is discarded whole: the Recommendation lets a vendor discard the header or only
/// the invalid entries (§4.3, step 3), and the W3C test suite checks the former. `None` when
/// nothing remains. When nothing had to change, the caller's value is passed on as is.
pub fn sanitize_tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut fields = headers.get_all(&TRACESTATE).iter();
    let first = fields.next()?;
    let single = fields.next().is_none();
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut changed = !single;
    let mut members = 0;
    for field in headers.get_all(&TRACESTATE) {
        for member in field.as_bytes().split(|&c| c == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                changed = true;
                continue;
            }
            members += 1;
            let eq = member.iter().position(|&c| c == b'=')?;
            let key = &member[..eq];
            if members > TRACESTATE_MAX_MEMBERS
                || !valid_key(key)
                || !valid_value(&member[eq + 1..])
            {
                return None;
            }
            if kept
                .iter()
                .any(|k| k.split(|&c| c == b'=').next() == Some(key))
            {
                changed = true;
                continue;
            }
            kept.push(member);
        }
    }
    if kept.is_empty() {
        return None;
    }
    if !changed && first.as_bytes().len() == kept.iter().map(|m| m.len() + 1).sum::<usize>() - 1 {
        return Some(first.clone());
    }
    Some(header_value(&kept.join(&b","[..])))
}

/// A B3 context as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct B3Context {
    /// Ids, absent for a decision-only header (`b3: 0`).
    ids: Option<(TraceId, SpanId, bool)>,
    /// `Some` when the caller decided; `None` defers the decision to us.
    sampled: Option<bool>,
}

/// A B3 trace id: 16 or 32 lowercase hex digits (64-bit ids left-padded with zeros), not zero.
fn parse_b3_trace_id(s: &[u8]) -> Option<(TraceId, bool)> {
    let mut id = [0u8; 16];
    let short = match s.len() {
        16 => {
            decode_hex(s, &mut id[8..])?;
            true
        }
        32 => {
            decode_hex(s, &mut id)?;
            false
        }
        _ => return None,
    };
    (id != [0; 16]).then_some((TraceId(id), short))
}

fn parse_b3_span_id(s: &[u8]) -> Option<SpanId> {
    let mut id = [0u8; 8];
    decode_hex(s, &mut id)?;
    (id != [0; 8]).then_some(SpanId(id))
}

fn parse_b3_sampling(s: &[u8]) -> Option<bool> {
    match s {
        // `d` is debug, which implies sampled.
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]` or `b3: {SamplingState}`.
fn parse_b3_single(value: &[u8]) -> Option<B3Context> {
    if value.len() == 1 {
        return Some(B3Context {
            ids: None,
            sampled: Some(parse_b3_sampling(value)?),
        });
    }
    let mut fields = value.split(|&c| c == b'-');
    let (trace_id, short) = parse_b3_trace_id(fields.next()?)?;
    let span_id = parse_b3_span_id(fields.next()?)?;
    let sampled = match fields.next() {
        None => None,
        Some(s) => Some(parse_b3_sampling(s)?),
    };
    if let Some(parent) = fields.next() {
        parse_b3_span_id(parent)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(B3Context {
        ids: Some((trace_id, span_id, short)),
        sampled,
    })
}

/// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled` (`1`/`0`, legacy `true`/`false`) and
/// `x-b3-flags: 1` (debug, implies sampled). Either both ids or neither.
fn parse_b3_multi(headers: &HeaderMap) -> Option<B3Context> {
    let get = |name: &HeaderName| headers.get(name).map(HeaderValue::as_bytes);
    let sampled = match (get(&X_B3_FLAGS), get(&X_B3_SAMPLED)) {
        (Some(b"1"), _) => Some(true),
        (Some(_), _) => return None,
        (None, None) => None,
        (None, Some(b"1" | b"true")) => Some(true),
        (None, Some(b"0" | b"false")) => Some(false),
        (None, Some(_)) => return None,
    };
    let ids = match (get(&X_B3_TRACEID), get(&X_B3_SPANID)) {
        (Some(trace), Some(span)) => {
            let (trace_id, short) = parse_b3_trace_id(trace)?;
            let span_id = parse_b3_span_id(span)?;
            if let Some(parent) = get(&X_B3_PARENTSPANID) {
                parse_b3_span_id(parent)?;
            }
            Some((trace_id, span_id, short))
        }
        (None, None) if sampled.is_some() => None,
        _ => return None,
    };
    Some(B3Context { ids, sampled })
}

impl TraceContext {
    /// The context of a request arriving with `headers`: the caller's trace continued when its
    /// `traceparent` (or, without one, its B3 context) is valid, else a new trace; sampled by
    /// `sampler`. This proxy's span id is always fresh.
    pub fn extract(headers: &HeaderMap, sampler: &Sampler) -> Self {
        let b3 = B3Formats {
            single: headers.contains_key(&B3),
            multi: headers.contains_key(&X_B3_TRACEID) || headers.contains_key(&X_B3_SAMPLED),
            trace_id_64: false,
        };
        let mut traceparents = headers.get_all(&TRACEPARENT).iter();
        if let Some(first) = traceparents.next() {
            // More than one traceparent field cannot be one valid value.
            let parsed = match traceparents.next() {
                None => parse_traceparent(first.as_bytes()),
                Some(_) => None,
            };
            return match parsed {
                Some(parent) => Self {
                    trace_id: parent.trace_id,
                    parent_id: Some(parent.parent_id),
                    span_id: SpanId::random(),
                    sampled: parent.sampled,
                    random: parent.random,
                    // The Recommendation: tracestate is read only with a valid traceparent.
                    tracestate: sanitize_tracestate(headers),
                    b3,
                    origin: Origin::W3c,
                },
                None => Self::new_trace(sampler, None, b3, Origin::Invalid),
            };
        }
        if !(b3.single || b3.multi) {
            return Self::new_trace(sampler, None, b3, Origin::New);
        }
        let parsed = match headers.get(&B3) {
            Some(single) => parse_b3_single(single.as_bytes()),
            None => parse_b3_multi(headers),
        };
        match parsed {
            Some(B3Context {
                ids: Some((trace_id, parent_id, short)),
                sampled,
            }) => Self {
                trace_id,
                parent_id: Some(parent_id),
                span_id: SpanId::random(),
                sampled: sampler.decide(trace_id, sampled),
                // B3 says nothing of how its ids were made.
                random: false,
                tracestate: None,
                b3: B3Formats {
                    trace_id_64: short,
                    ..b3
                },
                origin: Origin::B3,
            },
            // A decision without ids: a new trace that keeps the caller's decision.
            Some(B3Context { ids: None, sampled }) => {
                Self::new_trace(sampler, sampled, b3, Origin::New)
            }
            None => Self::new_trace(sampler, None, b3, Origin::Invalid),
        }
    }

    fn new_trace(sampler: &Sampler, decided: Option<bool>, b3: B3Formats, origin: Origin) -> Self {
        let trace_id = TraceId::random();
        Self {
            trace_id,
            parent_id: None,
            span_id: SpanId::random(),
            sampled: sampler.decide(trace_id, decided),
            // `TraceId::random`: all 16 bytes are pseudo-random, uniformly.
            random: true,
            tracestate: None,
            b3,
            origin,
        }
    }

    /// Replaces every trace header in `headers` with this context, `span_id` as the parent the
    /// next hop sees (this proxy's request span, or the attempt's span under retries).
    pub fn inject(&self, headers: &mut HeaderMap, span_id: SpanId) {
        // Most requests carry none or only a traceparent: one pass over the names present,
        // compared by length and bytes, instead of eight removes that each hash a name.
        if headers.keys().any(|name| is_trace_header(name.as_str())) {
            for name in TRACE_HEADERS {
                headers.remove(name);
            }
        }
        self.reinject(headers, span_id);
    }

    /// Writes this context's headers with `span_id` as the parent over headers that
    /// [`Self::inject`] already cleaned: each header is replaced in place, none removed, so a
    /// retry attempt's copy of the request head is not rehashed or grown.
    pub fn reinject(&self, headers: &mut HeaderMap, span_id: SpanId) {
        headers.insert(
            TRACEPARENT.clone(),
            format_traceparent(self.trace_id, span_id, self.sampled, self.random),
        );
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE.clone(), state.clone());
        }
        if !(self.b3.single || self.b3.multi) {
            return;
        }
        let trace_hex = if self.b3.trace_id_64 {
            &self.trace_id.0[8..]
        } else {
            &self.trace_id.0[..]
        };
        let mut trace = [0u8; 32];
        let trace = &mut trace[..trace_hex.len() * 2];
        write_hex(trace, trace_hex);
        let mut span = [0u8; 16];
        write_hex(&mut span, &span_id.0);
        let sampled: &[u8] = if self.sampled { b"1" } else { b"0" };
        let parent = self.parent_id.map(|p| {
            let mut out = [0u8; 16];
            write_hex(&mut out, &p.0);
            out
        });
        if self.b3.single {
            let mut single = Vec::with_capacity(32 + 1 + 16 + 2 + 17);
            single.extend_from_slice(trace);
            single.push(b'-');
            single.extend_from_slice(&span);
            single.push(b'-');
            single.extend_from_slice(sampled);
            if let Some(parent) = &parent {
                single.push(b'-');
                single.extend_from_slice(parent);
            }
            headers.insert(B3.clone(), header_value(&single));
        }
        if self.b3.multi {
            headers.insert(X_B3_TRACEID.clone(), header_value(trace));
            headers.insert(X_B3_SPANID.clone(), header_value(&span));
            if let Some(parent) = &parent {
                headers.insert(X_B3_PARENTSPANID.clone(), header_value(parent));
            }
            headers.insert(X_B3_SAMPLED.clone(), header_value(sampled));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_header_matcher_knows_exactly_the_listed_headers() {
        for name in TRACE_HEADERS {
            assert!(is_trace_header(name.as_str()), "{name}");
        }
        for other in [
            "host",
            "x-request-id",
            "traceparents",
            "b",
            "x-b3",
            "tracestat",
        ] {
            assert!(!is_trace_header(other), "{other}");
        }
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn tp(value: &str) -> Option<TraceParent> {
        parse_traceparent(value.as_bytes())
    }

    fn valid(ctx: &TraceContext) {
        assert_ne!(ctx.trace_id.0, [0; 16]);
        assert_ne!(ctx.span_id.0, [0; 8]);
    }

    #[test]
    fn parses_version_00() {
        let p = tp(&format!("00-{TRACE}-{PARENT}-01")).expect("valid");
        assert_eq!(p.trace_id.to_hex(), TRACE);
        assert_eq!(p.parent_id.to_hex(), PARENT);
        assert!(p.sampled);
        let p = tp(&format!("00-{TRACE}-{PARENT}-00")).expect("valid");
        assert!(!p.sampled);
        assert!(!p.random);
        // Bit 0 is sampled, bit 1 random; other bits are ignored.
        let p = tp(&format!("00-{TRACE}-{PARENT}-02")).expect("valid");
        assert!(!p.sampled && p.random);
        let p = tp(&format!("00-{TRACE}-{PARENT}-03")).expect("valid");
        assert!(p.sampled && p.random);
        let p = tp(&format!("00-{TRACE}-{PARENT}-fc")).expect("valid");
        assert!(!p.sampled && !p.random);
    }

    #[test]
    fn version_00_is_strict() {
        for bad in [
            format!("00-{TRACE}-{PARENT}-01-"),        // longer than 55
            format!("00-{TRACE}-{PARENT}-01-extra"),   // future fields in version 00
            format!("00-{TRACE}-{PARENT}-1"),          // short flags
            format!("00-{}-{PARENT}-01", &TRACE[1..]), // short trace id
            format!("00-{TRACE}0-{PARENT}-01"),        // long trace id
            format!("00-{TRACE}-{}-01", &PARENT[1..]), // short parent id
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()), // uppercase hex
            format!("00-{TRACE}-{}-01", PARENT.to_uppercase()),
            format!("00-{TRACE}-{PARENT}-0A"),
            format!("00-{}-{PARENT}-01", "0".repeat(32)), // all-zero trace id
            format!("00-{TRACE}-{}-01", "0".repeat(16)),  // all-zero parent id
            format!("00_{TRACE}-{PARENT}-01"),            // wrong separator
            format!("00-{TRACE}_{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}_01"),
            format!("0g-{TRACE}-{PARENT}-01"), // non-hex version
            format!("00-{}g-{PARENT}-01", &TRACE[1..]), // non-hex trace id
            format!(" 00-{TRACE}-{PARENT}-01"),
            String::new(),
        ] {
            assert_eq!(tp(&bad), None, "{bad:?} must be invalid");
        }
    }

    #[test]
    fn version_ff_is_invalid() {
        assert_eq!(tp(&format!("ff-{TRACE}-{PARENT}-01")), None);
    }

    #[test]
    fn future_versions_parse_first_four_fields() {
        let p = tp(&format!("01-{TRACE}-{PARENT}-01")).expect("exactly 55");
        assert_eq!(p.trace_id.to_hex(), TRACE);
        let p = tp(&format!("cc-{TRACE}-{PARENT}-01-what-the-future-holds")).expect("longer");
        assert!(p.sampled);
        // After the flags, a future version must continue with a dash.
        assert_eq!(tp(&format!("cc-{TRACE}-{PARENT}-01x")), None);
        // Its first four fields follow the same rules as 00.
        assert_eq!(tp(&format!("cc-{}-{PARENT}-01-x", "0".repeat(32))), None);
        assert_eq!(tp(&format!("cc-{TRACE}-{PARENT}-0-x")), None);
    }

    #[test]
    fn formats_version_00_with_the_sampled_and_random_flags_only() {
        let p = tp(&format!("00-{TRACE}-{PARENT}-ff")).expect("valid");
        let v = format_traceparent(p.trace_id, p.parent_id, p.sampled, p.random);
        assert_eq!(v, format!("00-{TRACE}-{PARENT}-03").as_str());
        for (sampled, random, flags) in [
            (false, false, "00"),
            (true, false, "01"),
            (false, true, "02"),
            (true, true, "03"),
        ] {
            let v = format_traceparent(p.trace_id, p.parent_id, sampled, random);
            assert_eq!(v, format!("00-{TRACE}-{PARENT}-{flags}").as_str());
            assert_eq!(
                tp(v.to_str().expect("ascii")),
                Some(TraceParent {
                    sampled,
                    random,
                    ..p
                })
            );
        }
    }

    #[test]
    fn the_random_flag_is_kept_when_continued_and_set_when_started_here() {
        for (flags, random) in [("00", false), ("01", false), ("02", true), ("03", true)] {
            let h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-{flags}"))]);
            let ctx = TraceContext::extract(&h, &Sampler::default());
            assert_eq!(ctx.random, random, "{flags}");
            let mut out = HeaderMap::new();
            ctx.inject(&mut out, ctx.span_id);
            let sent = tp(out["traceparent"].to_str().expect("ascii")).expect("valid");
            assert_eq!(
                (sent.sampled, sent.random),
                (ctx.sampled, random),
                "{flags}"
            );
        }
        // Started here (no context, an invalid one): our ids are random.
        for h in [
            HeaderMap::new(),
            headers(&[("traceparent", "00-bad")]),
            headers(&[("b3", "1")]),
        ] {
            let ctx = TraceContext::extract(&h, &Sampler::default());
            assert!(ctx.random);
            let mut out = HeaderMap::new();
            ctx.inject(&mut out, ctx.span_id);
            assert!(out["traceparent"].to_str().expect("ascii").ends_with("-03"));
        }
        // A B3 caller's ids may not be random: the flag stays unset.
        let h = headers(&[("b3", &format!("{TRACE}-{PARENT}-1"))]);
        assert!(!TraceContext::extract(&h, &Sampler::default()).random);
    }

    #[test]
    fn continues_a_valid_traceparent_with_a_new_span() {
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))]);
        let ctx = TraceContext::extract(&h, &Sampler::parent_based(0.0));
        assert_eq!(ctx.origin, Origin::W3c);
        assert_eq!(ctx.trace_id.to_hex(), TRACE);
        assert_eq!(ctx.parent_id.map(SpanId::to_hex).as_deref(), Some(PARENT));
        assert_ne!(ctx.span_id.to_hex(), PARENT);
        // Parent-based: the caller sampled, so we sample even at ratio 0.
        assert!(ctx.sampled);
        let mut out = HeaderMap::new();
        ctx.inject(&mut out, ctx.span_id);
        assert_eq!(
            out["traceparent"],
            format!("00-{TRACE}-{}-01", ctx.span_id.to_hex()).as_str()
        );
        // The caller's decision not to sample holds even at ratio 1.
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))]);
        assert!(!TraceContext::extract(&h, &Sampler::parent_based(1.0)).sampled);
    }

    #[test]
    fn invalid_or_absent_traceparent_starts_a_new_trace() {
        for (value, origin) in [
            (None, Origin::New),
            (Some(format!("00-{TRACE}-{PARENT}")), Origin::Invalid),
            (Some(format!("ff-{TRACE}-{PARENT}-01")), Origin::Invalid),
            (
                Some(format!("00-{}-{PARENT}-01", "0".repeat(32))),
                Origin::Invalid,
            ),
        ] {
            let mut h = headers(&[("tracestate", "congo=t61rcWkgMzE")]);
            if let Some(v) = &value {
                h.insert("traceparent", HeaderValue::from_str(v).expect("value"));
            }
            let ctx = TraceContext::extract(&h, &Sampler::parent_based(1.0));
            assert_eq!(ctx.origin, origin, "{value:?}");
            assert_ne!(ctx.trace_id.to_hex(), TRACE);
            assert_eq!(ctx.parent_id, None);
            valid(&ctx);
            // Without a valid traceparent, tracestate is not read or forwarded.
            assert_eq!(ctx.tracestate, None);
            let mut out = h.clone();
            ctx.inject(&mut out, ctx.span_id);
            let forwarded = out["traceparent"].to_str().expect("ascii");
            assert!(tp(forwarded).is_some(), "{forwarded}");
            assert!(!out.contains_key("tracestate"));
        }
    }

    #[test]
    fn two_traceparent_fields_are_invalid() {
        let v = format!("00-{TRACE}-{PARENT}-01");
        let h = headers(&[("traceparent", &v), ("traceparent", &v)]);
        let ctx = TraceContext::extract(&h, &Sampler::default());
        assert_eq!(ctx.origin, Origin::Invalid);
    }

    #[test]
    fn new_ids_are_random_and_never_zero() {
        let a = TraceContext::extract(&HeaderMap::new(), &Sampler::default());
        let b = TraceContext::extract(&HeaderMap::new(), &Sampler::default());
        valid(&a);
        valid(&b);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
    }

    fn state(values: &[&str]) -> Option<String> {
        let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("tracestate", *v)).collect();
        sanitize_tracestate(&headers(&pairs)).map(|v| v.to_str().expect("ascii").to_string())
    }

    #[test]
    fn tracestate_passes_unchanged_when_valid() {
        let v = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,a1b2@vendor_x=some value";
        assert_eq!(state(&[v]).as_deref(), Some(v));
    }

    #[test]
    fn tracestate_fields_are_combined_and_whitespace_trimmed() {
        assert_eq!(
            state(&["rojo=1 ,\t", " congo=2"]).as_deref(),
            Some("rojo=1,congo=2")
        );
        assert_eq!(state(&[""]), None);
        assert_eq!(state(&[" , "]), None);
    }

    #[test]
    fn an_invalid_tracestate_member_discards_the_whole_header() {
        for bad in [
            "Upper=1",   // uppercase key
            "_abc=1",    // a key starts with a letter or digit
            "@foo=1",    // ... not with an at sign
            "foo =1",    // space in the key
            "foo.bar=1", // '.' is no key character
            "novalue=",  // empty value
            "noequals",  // no '='
            "k=a=b",     // '=' in value
            "k=\u{7f}",  // control character
        ] {
            let Ok(_) = HeaderValue::from_str(bad) else {
                continue;
            };
            assert_eq!(state(&[&format!("rojo=1,{bad},congo=2")]), None, "{bad:?}");
            // In a field of its own too: the fields are one list.
            assert_eq!(state(&["rojo=1", bad]), None, "{bad:?}");
        }
        assert_eq!(state(&["foo=1", &format!("{}=1", "z".repeat(257))]), None);
        assert_eq!(state(&[&format!("a=1,b={}", "v".repeat(257))]), None);
        let max_value = "v".repeat(256);
        assert!(state(&[&format!("a={max_value}")]).is_some());
        // A repeated key keeps its first occurrence.
        assert_eq!(state(&["a=1,b=2,a=3"]).as_deref(), Some("a=1,b=2"));
    }

    #[test]
    fn tracestate_keys_follow_the_level_2_grammar() {
        for key in [
            "foo@".to_string(),
            "foo@@bar".to_string(),
            "foo@bar@baz".to_string(),
            "1abc".to_string(),
            "z".repeat(256),
            format!("{}@{}", "t".repeat(241), "v".repeat(14)),
            format!("{}@v", "t".repeat(242)),
            format!("t@{}", "v".repeat(15)),
        ] {
            let v = format!("foo=1,{key}=1");
            assert_eq!(state(&[&v]), Some(v), "{key}");
        }
    }

    #[test]
    fn more_than_32_tracestate_members_discard_the_whole_header() {
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v{i}")).collect();
        assert_eq!(state(&[&members.join(",")]), None);
        let exact = members[..32].join(",");
        assert_eq!(state(&[&exact]), Some(exact.clone()));
        // Empty members do not count.
        assert_eq!(state(&[&format!("{exact},,")]), Some(exact));
    }

    #[test]
    fn tracestate_is_forwarded_with_a_valid_traceparent() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "rojo=1"),
            ("tracestate", "congo=2"),
        ]);
        let ctx = TraceContext::extract(&h, &Sampler::default());
        let mut out = HeaderMap::new();
        ctx.inject(&mut out, ctx.span_id);
        assert_eq!(out["tracestate"], "rojo=1,congo=2");
    }

    #[test]
    fn b3_single_is_accepted_and_forwarded_in_both_formats() {
        let h = headers(&[("b3", &format!("{TRACE}-{PARENT}-1-0000000000000001"))]);
        let ctx = TraceContext::extract(&h, &Sampler::parent_based(0.0));
        assert_eq!(ctx.origin, Origin::B3);
        assert_eq!(ctx.trace_id.to_hex(), TRACE);
        assert_eq!(ctx.parent_id.map(SpanId::to_hex).as_deref(), Some(PARENT));
        assert!(ctx.sampled);
        let mut out = h.clone();
        ctx.inject(&mut out, ctx.span_id);
        let span = ctx.span_id.to_hex();
        assert_eq!(out["b3"], format!("{TRACE}-{span}-1-{PARENT}").as_str());
        assert_eq!(out["traceparent"], format!("00-{TRACE}-{span}-01").as_str());
        assert!(!out.contains_key("x-b3-traceid"));
    }

    #[test]
    fn b3_single_variants() {
        let s = Sampler::parent_based(1.0);
        let ctx = |v: &str| TraceContext::extract(&headers(&[("b3", v)]), &s);
        // 64-bit trace ids are left-padded and forwarded at their width.
        let c = ctx(&format!("{PARENT}-{PARENT}-0"));
        assert_eq!(c.origin, Origin::B3);
        assert_eq!(c.trace_id.to_hex(), format!("{}{PARENT}", "0".repeat(16)));
        assert!(!c.sampled);
        let mut out = HeaderMap::new();
        c.inject(&mut out, c.span_id);
        assert!(out["b3"]
            .to_str()
            .expect("ascii")
            .starts_with(&format!("{PARENT}-")));
        // Debug means sampled; no sampling state defers to our sampler.
        assert!(ctx(&format!("{TRACE}-{PARENT}-d")).sampled);
        assert!(ctx(&format!("{TRACE}-{PARENT}")).sampled);
        assert!(
            !TraceContext::extract(
                &headers(&[("b3", &format!("{TRACE}-{PARENT}"))]),
                &Sampler::parent_based(0.0)
            )
            .sampled
        );
        // A bare decision: new trace, decision kept.
        let c = ctx("0");
        assert_eq!(c.origin, Origin::New);
        assert!(!c.sampled);
        valid(&c);
        for bad in [
            format!("{}-{PARENT}-1", "0".repeat(32)),
            format!("{TRACE}-{}-1", "0".repeat(16)),
            format!("{TRACE}-{PARENT}-x"),
            format!("{}-{PARENT}-1", TRACE.to_uppercase()),
            format!("{TRACE}-{PARENT}-1-{PARENT}-extra"),
            format!("{}-{PARENT}", &TRACE[2..]),
            "x".to_string(),
        ] {
            let c = ctx(&bad);
            assert_eq!(c.origin, Origin::Invalid, "{bad}");
            valid(&c);
        }
    }

    #[test]
    fn b3_multi_is_accepted_and_forwarded_in_both_formats() {
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-parentspanid", "0000000000000001"),
            ("x-b3-sampled", "1"),
        ]);
        let ctx = TraceContext::extract(&h, &Sampler::parent_based(0.0));
        assert_eq!(ctx.origin, Origin::B3);
        assert_eq!(ctx.trace_id.to_hex(), TRACE);
        assert!(ctx.sampled);
        let mut out = h.clone();
        ctx.inject(&mut out, ctx.span_id);
        assert_eq!(out["x-b3-traceid"], TRACE);
        assert_eq!(out["x-b3-spanid"], ctx.span_id.to_hex().as_str());
        assert_eq!(out["x-b3-parentspanid"], PARENT);
        assert_eq!(out["x-b3-sampled"], "1");
        assert!(out.contains_key("traceparent"));
        assert!(!out.contains_key("b3"));
        // Debug flag implies sampled; legacy "false" is a decision.
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-flags", "1"),
        ]);
        assert!(TraceContext::extract(&h, &Sampler::parent_based(0.0)).sampled);
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "false"),
        ]);
        assert!(!TraceContext::extract(&h, &Sampler::parent_based(1.0)).sampled);
        // A trace id without a span id is invalid.
        let h = headers(&[("x-b3-traceid", TRACE)]);
        assert_eq!(
            TraceContext::extract(&h, &Sampler::default()).origin,
            Origin::Invalid
        );
    }

    #[test]
    fn traceparent_wins_over_b3_and_b3_is_rewritten() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("b3", &format!("{}-{PARENT}-1", "a".repeat(32))),
        ]);
        let ctx = TraceContext::extract(&h, &Sampler::default());
        assert_eq!(ctx.origin, Origin::W3c);
        assert_eq!(ctx.trace_id.to_hex(), TRACE);
        let mut out = h.clone();
        ctx.inject(&mut out, ctx.span_id);
        assert!(out["b3"].to_str().expect("ascii").starts_with(TRACE));
    }

    #[test]
    fn sampler_ratio_is_deterministic_and_close_to_the_ratio() {
        let s = Sampler::parent_based(0.1);
        let sampled = (0..20_000)
            .filter(|_| s.sample_new(TraceId::random()))
            .count();
        assert!(
            (1_600..=2_400).contains(&sampled),
            "{sampled} of 20000 at 0.1"
        );
        let id = TraceId::random();
        assert_eq!(s.sample_new(id), s.sample_new(id));
        assert!(Sampler::parent_based(1.0).sample_new(TraceId([0xff; 16])));
        assert!(!Sampler::parent_based(0.0).sample_new(TraceId([0; 16])));
        assert!(!Sampler::parent_based(f64::NAN).sample_new(TraceId([1; 16])));
    }
}
