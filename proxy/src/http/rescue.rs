//! The one place that turns a [`ProxyError`] into the response the caller sees: the status,
//! the `x-outrider-error` reason header, and for gRPC callers the matching `grpc-status` (each
//! from the error's kind), so a client always learns why the proxy answered instead of the
//! upstream.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::Response;

use crate::core::errors::{ProxyError, ERROR_HEADER};
use crate::io::body::ProxyBody;

/// Seconds for Retry-After and x-ratelimit-reset: rounded up, so a client that waits that long
/// finds a token, and at least 1 (`Retry-After: 0` invites an immediate retry storm).
fn whole_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Turns a failure into the response the caller sees.
pub fn rescue(error: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    let status = error.status();
    let reason = error.to_string();
    // Reasons are built from addresses and fixed text; the fallback only guards against an OS
    // error message with bytes a header cannot carry.
    let reason_value =
        HeaderValue::from_str(&reason).unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
    let mut response = if grpc {
        // A trailers-only gRPC response: the status travels in the headers.
        let mut r = Response::new(ProxyBody::empty());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(error.grpc_status()));
        r.headers_mut().insert("grpc-message", reason_value.clone());
        r
    } else {
        let mut body = reason.into_bytes();
        body.push(b'\n');
        let mut r = Response::new(ProxyBody::full(Bytes::from(body)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    *response.status_mut() = status;
    response.headers_mut().insert(ERROR_HEADER, reason_value);
    if let ProxyError::RateLimited {
        limit,
        retry_after,
        reset,
        ..
    } = error
    {
        let headers = response.headers_mut();
        headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds(*retry_after)));
        headers.insert("x-ratelimit-limit", HeaderValue::from(*limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        headers.insert(
            "x-ratelimit-reset",
            HeaderValue::from(whole_seconds(*reset)),
        );
    }
    if error.kind().closes_connection() {
        // (hyper drops this header on HTTP/2, where it is not allowed.)
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    #[test]
    fn a_stalled_request_body_is_408_and_deadline_exceeded_for_grpc() {
        let error = ProxyError::RequestBodyTimeout(Duration::from_secs(30));
        let plain = rescue(&error, false);
        assert_eq!(plain.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            plain.headers()[ERROR_HEADER],
            "request body idle timeout after 30s"
        );
        assert_eq!(plain.headers()[http::header::CONNECTION], "close");
        let grpc = rescue(&error, true);
        assert_eq!(grpc.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(grpc.headers()["grpc-status"], "4");
        assert_eq!(
            grpc.headers()["grpc-message"],
            "request body idle timeout after 30s"
        );
    }
}
