//! The rules both HTTP/1.1 clients keep: the proxy's own exchange for requests without a body
//! (`super::direct`) and hyper's client connection for the others. An upstream's response
//! gets the same answer whichever reads it; `tests/tests/upstream_http1.rs` runs each case of a
//! table through both and compares.

use http::Method;
use hyper::client::conn::http1;

use crate::core::methods::is_safe;

/// Largest response head (status line and header fields, each interim response on its own)
/// accepted; larger gets 502. The same as the proxy's own listeners take from callers.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields a response head may have. hyper's default: it is left unset in
/// [`http1_builder`], since setting it moves hyper's field array to the heap on every response.
pub const MAX_HEADERS: usize = 100;
/// Largest trailer section after a chunked body: hyper applies its head limit to trailers too.
pub const MAX_TRAILER_BYTES: usize = MAX_HEAD_BYTES;
/// Most trailer fields after a chunked body: hyper counts them against its field limit.
pub const MAX_TRAILERS: usize = MAX_HEADERS;

/// hyper's HTTP/1.1 client, held to the limits above.
pub fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    // Without it hyper reads a head until its whole read buffer (about 400 KiB) is full.
    builder.max_header_size(MAX_HEAD_BYTES);
    builder
}

/// How far an exchange on a connection got before the connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The request did not get out whole: the upstream cannot have acted on it.
    Unsent,
    /// The request went out and the connection ended before any byte of a response: the
    /// upstream may have closed it while idle (and never seen the request) or failed while
    /// handling it.
    Unanswered,
    /// Some of a response had arrived.
    Answered,
}

/// Whether a request that failed on a connection goes out again on another one: only when the
/// connection was reused (a new one failing says the upstream is in trouble), and then when
/// the request never left, or may have but is safe to repeat (the rule Go's net/http applies
/// to reused connections: see [`crate::core::methods`]). hyper's client hands a request back only when it never
/// left, so for it the second case does not arise.
pub fn may_resend(reused: bool, progress: Progress, method: &Method) -> bool {
    reused
        && match progress {
            Progress::Unsent => true,
            Progress::Unanswered => is_safe(method),
            Progress::Answered => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_reused_connection_resends_and_only_what_is_safe() {
        for progress in [Progress::Unsent, Progress::Unanswered, Progress::Answered] {
            assert!(!may_resend(false, progress, &Method::GET), "{progress:?}");
        }
        assert!(may_resend(true, Progress::Unsent, &Method::POST));
        assert!(may_resend(true, Progress::Unanswered, &Method::GET));
        assert!(may_resend(true, Progress::Unanswered, &Method::HEAD));
        assert!(!may_resend(true, Progress::Unanswered, &Method::POST));
        assert!(!may_resend(true, Progress::Unanswered, &Method::DELETE));
        assert!(!may_resend(true, Progress::Answered, &Method::GET));
    }
}
