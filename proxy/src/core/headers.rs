//! Header handling on the way through: request checks, hop-by-hop removal (RFC 9110 §7.6.1),
//! `x-forwarded-*`, `x-request-id`, and finding the request's authority.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Version};

use crate::core::errors::ProxyError;
pub use crate::core::errors::TransferCodingError;

/// Largest request head accepted; larger ones are answered 431 (HTTP/1.1) or refused by
/// HTTP/2 with 431. Envoy's default is 60 KiB.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The request id header, generated when the caller sent none.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Rejects requests that must not be forwarded, before any upstream is touched.
pub fn check_request<B: http_body::Body>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT tunnels are not supported"));
    }
    let headers = req.headers();
    // Only an HTTP/1.1 body of no declared length can have been framed by Transfer-Encoding
    // (HTTP/2 forbids the header): bodiless and Content-Length requests skip the lookup.
    // Content-Length with Transfer-Encoding needs no check: hyper's parser applies RFC
    // 9112 §6.3 (chunked wins, Content-Length removed, connection closed after the request),
    // which leaves nothing to smuggle.
    let body = req.body();
    if req.version() == Version::HTTP_11
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
    {
        check_transfer_codings(headers).map_err(|error| match error {
            TransferCodingError::Unsupported(coding) => {
                ProxyError::UnsupportedTransferCoding(coding)
            }
            TransferCodingError::ChunkedTwice => {
                ProxyError::BadRequest("chunked transfer coding applied more than once")
            }
            // hyper refuses such a request itself (400) before it gets here.
            TransferCodingError::ChunkedNotLast => {
                ProxyError::BadRequest("chunked is not the final transfer coding")
            }
        })?;
    }
    // Refused rather than stripped: CGI, WSGI and Rack servers (and the frameworks on them)
    // map `_` and `-` to the same variable, so `x_outrider_peer_identity` would reach the app
    // as the identity the proxy vouches for, and which spelling wins a merge is up to the app's
    // server. A refusal is visible to the sender and leaves nothing to mis-merge.
    if headers.keys().any(is_reserved_variant) {
        return Err(ProxyError::BadRequest(
            "x-outrider-* header name spelt with underscores",
        ));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one host header"));
    }
    if req.version() == Version::HTTP_11
        && req.uri().authority().is_none()
        && !headers.contains_key(header::HOST)
    {
        return Err(ProxyError::BadRequest("missing host header"));
    }
    Ok(())
}

/// The prefix of the proxy's own header names (`x-outrider-peer-identity` above all).
const RESERVED_PREFIX: &[u8] = b"x-outrider-";

/// Whether `name` is one of the proxy's own, spelt with `-` or `_`. (Names are lowercase.)
fn is_reserved(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    // Most names fail on the first byte.
    name.first() == Some(&b'x')
        && name.len() > RESERVED_PREFIX.len()
        && name
            .iter()
            .zip(RESERVED_PREFIX)
            .all(|(&have, &want)| have == want || want == b'-' && have == b'_')
}

/// Whether `name` is an underscore spelling of one of the proxy's own names.
fn is_reserved_variant(name: &HeaderName) -> bool {
    is_reserved(name) && name.as_str().contains('_')
}

/// Removes the proxy's own header names (either spelling) from a request's trailers: the proxy
/// never sends request trailers of its own, so any such field is forged, and an app may read
/// trailers and headers alike.
pub fn strip_reserved_trailers(trailers: &mut HeaderMap) {
    if !trailers.keys().any(is_reserved) {
        return;
    }
    // Rare: the allocation is fine.
    let reserved: Vec<HeaderName> = trailers
        .keys()
        .filter(|n| is_reserved(n))
        .cloned()
        .collect();
    for name in reserved {
        trailers.remove(name);
    }
}

/// Longest coding name quoted in an error.
const MAX_CODING_QUOTED: usize = 64;

/// Checks that the `Transfer-Encoding` fields of `headers` (all of them, in order) list exactly
/// one coding, `chunked`; no field at all is fine. Transfer parameters (`;q=1`) are ignored.
pub fn check_transfer_codings(headers: &HeaderMap) -> Result<(), TransferCodingError> {
    let mut fields = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if fields.peek().is_none() {
        return Ok(());
    }
    let mut chunked = 0u32;
    let mut unsupported: Option<&[u8]> = None;
    let mut last_chunked = false;
    let codings = fields
        .flat_map(|field| field.as_bytes().split(|&b| b == b','))
        .map(|element| {
            let name = element.split(|&b| b == b';').next().unwrap_or(element);
            name.trim_ascii()
        })
        // Empty list elements are allowed and mean nothing (RFC 9110 §5.6.1).
        .filter(|name| !name.is_empty());
    for name in codings {
        last_chunked = name.eq_ignore_ascii_case(b"chunked");
        if last_chunked {
            chunked = chunked.saturating_add(1);
        } else if unsupported.is_none() {
            unsupported = Some(name);
        }
    }
    if chunked > 1 {
        return Err(TransferCodingError::ChunkedTwice);
    }
    if let Some(name) = unsupported {
        let quoted = &name[..name.len().min(MAX_CODING_QUOTED)];
        return Err(TransferCodingError::Unsupported(
            String::from_utf8_lossy(quoted).to_ascii_lowercase(),
        ));
    }
    if !last_chunked {
        return Err(TransferCodingError::ChunkedNotLast);
    }
    Ok(())
}

/// The authority a request is addressed to: the URI's (absolute-form or HTTP/2 `:authority`)
/// or else the Host header's.
pub fn request_authority<B>(req: &Request<B>) -> Result<Option<Authority>, ProxyError> {
    if let Some(authority) = req.uri().authority() {
        return Ok(Some(authority.clone()));
    }
    match req.headers().get(header::HOST) {
        None => Ok(None),
        Some(host) => Authority::try_from(host.as_bytes())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("invalid host header")),
    }
}

/// True if the request asks for a protocol upgrade (WebSocket) on HTTP/1.1.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has_token(req.headers(), "upgrade")
}

/// True if the request carries a gRPC content type.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` survives and `Connection:
/// upgrade` is set again, so a WebSocket handshake reaches the upstream.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names present (cheap comparisons) spares
    // six removes that would each hash a name and probe for nothing.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Headers named in Connection are hop-by-hop too. Rare, so the allocation is fine.
        let named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !(t.is_empty() || keep_upgrade && t == "upgrade"))
            .collect();
        for name in named {
            headers.remove(name.as_str());
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    if headers.remove(header::TRANSFER_ENCODING).is_some() {
        // The message was framed by its transfer coding, not its length: a Content-Length
        // beside it must not be passed on (RFC 9112 §6.3), or the next hop waits for bytes that
        // never come.
        headers.remove(header::CONTENT_LENGTH);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC relies on it.
    let te_is_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The headers [`strip_hop_by_hop`] always looks at (names listed in `Connection` are only
/// there when `Connection` is).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// A caller connection's address, with its `x-forwarded-for` text made once for all the
/// requests on the connection (a clone per request shares it: no formatting, no allocation).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's address.
    pub addr: SocketAddr,
    /// The caller's verified mTLS SPIFFE id (inbound mesh connections).
    pub identity: Option<HeaderValue>,
    forwarded_for: HeaderValue,
}

impl Caller {
    /// The caller at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let mut buffer = [0u8; 15];
        let text = match addr.ip() {
            IpAddr::V4(v4) => HeaderValue::from_str(ipv4_text(v4, &mut buffer)),
            IpAddr::V6(v6) => HeaderValue::from_str(&v6.to_string()),
        };
        Self {
            addr,
            identity: None,
            // An address's text is always a valid header value.
            forwarded_for: text.unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        }
    }
}

impl Caller {
    /// The same caller, verified by mTLS as `identity`.
    pub fn with_identity(mut self, identity: Option<HeaderValue>) -> Self {
        self.identity = identity;
        self
    }
}

/// Appends the caller's address to `x-forwarded-for` and the scheme to `x-forwarded-proto`.
pub fn append_forwarded(headers: &mut HeaderMap, caller: &Caller) {
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(absent) => {
            absent.insert(caller.forwarded_for.clone());
        }
        Entry::Occupied(_) => {
            let text = caller.forwarded_for.to_str().unwrap_or("unknown");
            append_list(headers, &X_FORWARDED_FOR, text);
        }
    }
    match headers.entry(&X_FORWARDED_PROTO) {
        Entry::Occupied(_) => append_list(headers, &X_FORWARDED_PROTO, "http"),
        // The common case, no proxy before us: a static value, no allocation.
        Entry::Vacant(absent) => {
            absent.insert(HeaderValue::from_static("http"));
        }
    }
}

/// `addr` in dotted-decimal form, written into `buffer`.
fn ipv4_text(addr: std::net::Ipv4Addr, buffer: &mut [u8; 15]) -> &str {
    let mut len = 0;
    for (i, octet) in addr.octets().into_iter().enumerate() {
        if i > 0 {
            buffer[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buffer[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buffer[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buffer[len] = b'0' + octet % 10;
        len += 1;
    }
    // Only ASCII digits and dots were written.
    std::str::from_utf8(&buffer[..len]).unwrap_or("0.0.0.0")
}

fn append_list(headers: &mut HeaderMap, name: &HeaderName, item: &str) {
    // One hash and probe for the name, whether or not the header is there.
    match headers.entry(name) {
        Entry::Occupied(mut present) => {
            let value = match present.get().to_str() {
                Ok(existing) if !existing.is_empty() => {
                    HeaderValue::from_str(&format!("{existing}, {item}"))
                }
                _ => HeaderValue::from_str(item),
            };
            if let Ok(value) = value {
                present.insert(value);
            }
        }
        Entry::Vacant(absent) => {
            // One copy into the header value, not two.
            if let Ok(value) = HeaderValue::from_str(item) {
                absent.insert(value);
            }
        }
    }
}

/// Sets `x-request-id` to a fresh UUID v4 unless the caller sent one.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key(&REQUEST_ID) {
        headers.insert(REQUEST_ID.clone(), new_request_id());
    }
}

/// A random UUID v4 as a header value.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    /// Where each byte's two digits go in `8-4-4-4-12` form.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&fastrand::u64(..).to_be_bytes());
    bytes[8..].copy_from_slice(&fastrand::u64(..).to_be_bytes());
    // Version 4, variant 10xx.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    for (byte, at) in bytes.into_iter().zip(AT) {
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
    }
    // Always valid: hex digits and dashes.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codings(fields: &[&'static str]) -> Result<(), TransferCodingError> {
        let mut h = HeaderMap::new();
        for field in fields {
            h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(field));
        }
        check_transfer_codings(&h)
    }

    #[test]
    fn reserved_names_are_recognised_in_either_spelling() {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
        for reserved in [
            "x-outrider-peer-identity",
            "x_outrider_peer_identity",
            "X_Outrider-Peer_Identity",
            "x-outrider_attempt",
        ] {
            assert!(is_reserved(&name(reserved)), "{reserved}");
        }
        for variant in ["x_outrider_peer_identity", "x-outrider-peer_identity"] {
            assert!(is_reserved_variant(&name(variant)), "{variant}");
        }
        assert!(!is_reserved_variant(&name("x-outrider-peer-identity")));
        for other in [
            "x-outrider",
            "x-outrider-",
            "x-outriders",
            "x_request_id",
            "host",
        ] {
            assert!(!is_reserved(&name(other)), "{other}");
        }
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "x-outrider-peer-identity",
            HeaderValue::from_static("forged"),
        );
        trailers.insert(
            "x_outrider_peer_identity",
            HeaderValue::from_static("forged"),
        );
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        strip_reserved_trailers(&mut trailers);
        assert_eq!(trailers.keys().collect::<Vec<_>>(), ["grpc-status"]);
    }

    #[test]
    fn transfer_codings_follow_rfc_9112() {
        use TransferCodingError::*;
        assert_eq!(codings(&[]), Ok(()));
        assert_eq!(codings(&["chunked"]), Ok(()));
        assert_eq!(codings(&["Chunked"]), Ok(()));
        assert_eq!(codings(&[" chunked ,"]), Ok(()), "empty elements");
        assert_eq!(codings(&["chunked;ext=1"]), Ok(()), "parameters");
        let gzip = Err(Unsupported("gzip".into()));
        assert_eq!(codings(&["gzip, chunked"]), gzip);
        assert_eq!(codings(&["GZIP", "chunked"]), gzip, "across fields");
        assert_eq!(codings(&["chunked, gzip"]), gzip);
        assert_eq!(codings(&["identity"]), Err(Unsupported("identity".into())));
        assert_eq!(codings(&["chunked, chunked"]), Err(ChunkedTwice));
        assert_eq!(codings(&["chunked", "chunked"]), Err(ChunkedTwice));
        assert_eq!(codings(&["gzip, chunked, chunked"]), Err(ChunkedTwice));
        assert_eq!(codings(&[""]), Err(ChunkedNotLast));
        assert_eq!(codings(&[" , "]), Err(ChunkedNotLast));
        let long = "x".repeat(100);
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_str(&long).expect("value"),
        );
        assert_eq!(
            check_transfer_codings(&h),
            Err(Unsupported("x".repeat(MAX_CODING_QUOTED)))
        );
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let caller = Caller::new("127.0.0.1:4000".parse().expect("addr"));
        append_forwarded(&mut h, &caller);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        append_forwarded(&mut h, &Caller::new("[::1]:4000".parse().expect("addr")));
        append_forwarded(&mut h, &caller);
        assert_eq!(h["x-forwarded-for"], "::1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http, http");
    }

    #[test]
    fn formats_ipv4_like_display() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.250",
        ] {
            let addr: std::net::Ipv4Addr = text.parse().expect("ip");
            assert_eq!(ipv4_text(addr, &mut [0; 15]), addr.to_string());
        }
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let s = a.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        let groups: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert!(s
            .bytes()
            .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
