//! The bounds a policy must stay within: what the parser will read (budgets) and the range of
//! every number in the schema. A policy is pushed to every proxy at once, so a value the proxy
//! cannot use (a timeout of 2^63 s overflows `Instant + Duration`) must fail validation instead.
//! README's "Policy limits" table documents the same numbers.

use std::time::Duration;

/// Largest policy document read, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Deepest nesting of mappings and sequences (a real policy nests about 6 deep).
pub const MAX_DEPTH: usize = 64;
/// Most YAML nodes (mappings, sequences and scalars) in one document: about 5,000 services.
pub const MAX_NODES: usize = 100_000;
/// Most alias (`*name`) uses in one document.
pub const MAX_ALIASES: usize = 1_000;
/// Most parser events replayed from aliases in one document: bounds what anchors can multiply
/// a document into (a billion-laughs document hits it after a few thousand nodes).
pub const MAX_ALIAS_EXPANSION: usize = 5_000;

/// Longest timeout of any kind (connect, request, per-try, idle).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest retry backoff ceiling (`backoff.base`, `backoff.max`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest breaker open time, failure-rate window, ejection or injected delay.
pub const MAX_POLICY_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Most retries after the first try.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Largest request body buffered for replay (`retries.body_limit`).
pub const MAX_RETRY_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest rate, burst, or request count (rate limits, retry budget, breaker limits).
pub const MAX_RATE: u32 = 1_000_000;
/// Largest failure count (breaker and outlier `consecutive_failures`, `half_open_requests`).
pub const MAX_FAILURE_COUNT: u32 = 100_000;
/// Most entries of `opaque_ports`, and of one service's `addresses`.
pub const MAX_PORT_LIST: usize = 1_024;
/// Most matches of one route (`match` and `matches` together), as Gateway API's HTTPRoute.
pub const MAX_ROUTE_MATCHES: usize = 64;
/// Most header conditions, and most query parameter conditions, of one match (as Gateway API).
pub const MAX_MATCH_CONDITIONS: usize = 16;
/// Most regular expressions in one policy: with [`MAX_REGEX_BYTES`], bounds what a policy's
/// regexes may cost a proxy in memory (256 x 2 x 64 KiB, 32 MiB, at worst).
pub const MAX_REGEXES: usize = 256;
/// Largest compiled program of one regex, and largest lazy-DFA cache it may grow, in bytes.
pub const MAX_REGEX_BYTES: usize = 64 * 1024;
/// Most filters of one route, as Gateway API's HTTPRoute.
pub const MAX_ROUTE_FILTERS: usize = 16;
/// Most headers in each of a header modifier's `set`, `add` and `remove` (as Gateway API).
pub const MAX_HEADER_CHANGES: usize = 16;
/// Longest header value a header modifier sets or adds, in bytes (as Gateway API).
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
/// Largest request body mirrored with its request (`request_mirror.body_limit`).
pub const MAX_MIRROR_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Most mirrored requests of one filter in flight (`request_mirror.max_in_flight`).
pub const MAX_MIRROR_IN_FLIGHT: u32 = 10_000;
/// Most rules of `inbound.authorization`: they are tried one by one on every inbound request.
pub const MAX_AUTHZ_RULES: usize = 256;
/// Most entries of one list of an authorization rule (`identities`, `paths`, ...), and of the
/// first form's `allow`.
pub const MAX_AUTHZ_LIST: usize = 256;
