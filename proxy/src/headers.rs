//! Header handling on the way through: request checks, hop-by-hop removal (RFC 9110 §7.6.1),
//! `x-forwarded-*`, `x-request-id`, and finding the request's authority.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Version};

use crate::errors::ProxyError;

/// The request id header, generated when the caller sent none.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Rejects requests that must not be forwarded, before any upstream is touched.
pub fn check_request<B>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT tunnels are not supported"));
    }
    let headers = req.headers();
    // Content-Length with Transfer-Encoding needs no check here: hyper's parser applies RFC
    // 9112 §6.3 (chunked wins, Content-Length removed, connection closed after the request),
    // which leaves nothing to smuggle.
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
            // An address's text is always a valid header value.
            forwarded_for: text.unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        }
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
