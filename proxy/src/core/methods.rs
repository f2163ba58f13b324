//! What a request's method says about repeating it: the one place where the proxy decides it.
//!
//! Two rules, for two different decisions (RFC 9110 §9.2):
//! - [`is_idempotent`]: repeating the request has the effect of sending it once. The retry
//!   policy resends these after a failure once the request may have reached the upstream
//!   (Envoy's and Linkerd's rule for retries on reset), because the operator asked for retries.
//! - [`is_safe`]: the request asks for no change at all. The connection pool resends these on
//!   its own, unasked, when a reused connection ends before any response (Go's net/http rule):
//!   a `PUT` or `DELETE` the upstream may have acted on is not repeated behind the operator's back.

use http::Method;

/// RFC 9110 §9.2.2 idempotent methods: GET, HEAD, OPTIONS, TRACE, PUT and DELETE.
pub fn is_idempotent(method: &Method) -> bool {
    is_safe(method) || matches!(*method, Method::PUT | Method::DELETE)
}

/// RFC 9110 §9.2.1 safe methods: GET, HEAD, OPTIONS and TRACE.
pub fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_methods_are_idempotent_and_put_and_delete_only_idempotent() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(is_safe(&method) && is_idempotent(&method), "{method}");
        }
        for method in [Method::PUT, Method::DELETE] {
            assert!(!is_safe(&method) && is_idempotent(&method), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_safe(&method) && !is_idempotent(&method), "{method}");
        }
        let custom = Method::from_bytes(b"PURGE").expect("a token");
        assert!(!is_safe(&custom) && !is_idempotent(&custom));
    }
}
