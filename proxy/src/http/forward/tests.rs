//! The exchange's policies composed (breaker, retries, backoff, per-try and request timeouts,
//! Retry-After, the retry budget, method safety), run by `forward` against a scripted endpoint
//! on paused time: no sockets, no sleeps. The wire behaviour is the end-to-end tests'.
//!
//! The backoff is full jitter (uniform below its ceiling), so a backoff is asserted within its
//! bound; every other wait (a per-try or request timeout, a Retry-After) is asserted exactly.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use tokio::io::{AsyncWriteExt, DuplexStream};

use super::*;
use crate::core::errors::ErrorKind;
use crate::io::request_body::RequestBody;
use crate::policy::breaker::BreakerState;
use crate::policy::retry::AttemptFailure;
use crate::policy::timeout::Timer;
use crate::telemetry::metrics::Metrics;
use crate::trace::Sampler;

const MS: Duration = Duration::from_millis(1);
const A: &str = "127.0.0.1:1";
const B: &str = "127.0.0.1:2";

/// What the scripted endpoint does with one attempt.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Answers with this status.
    Status(u16),
    /// Answers with this status and `Retry-After: seconds`.
    RetryAfter(u16, u64),
    /// Refuses the connection: nothing was sent.
    Refused,
    /// The connection breaks after the request left, before a response.
    Reset,
    /// Never answers.
    Hang,
}

/// One attempt as the endpoint saw it.
#[derive(Debug, Clone)]
struct Call {
    /// The endpoint it was sent to.
    endpoint: SocketAddr,
    /// When it started and when it ended (answered, or dropped by a timeout), from the test's
    /// start.
    started: Duration,
    ended: Option<Duration>,
    /// Its `x-outrider-attempt`.
    attempt: Option<String>,
}

/// An endpoint (any of the upstream's addresses) that plays `steps` in order, one per attempt,
/// and records the attempts; once the steps run out it answers 200.
struct Script {
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<Call>>,
    epoch: Instant,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self {
            steps: Mutex::new(steps.into_iter().collect()),
            calls: Mutex::new(Vec::new()),
            epoch: Instant::now(),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().expect("calls").len()
    }

    /// The gaps between one attempt's end and the next one's start (the backoffs).
    fn gaps(&self) -> Vec<Duration> {
        let calls = self.calls();
        calls
            .windows(2)
            .map(|pair| pair[1].started - pair[0].ended.expect("ended"))
            .collect()
    }
}

/// Records when the attempt at `index` ended, when dropped: an answer, or a timeout dropping
/// the attempt's future.
struct Ends<'a>(&'a Script, usize);

impl Drop for Ends<'_> {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed();
        if let Some(call) = self.0.calls.lock().expect("calls").get_mut(self.1) {
            call.ended = Some(now);
        }
    }
}

impl SendAttempt for &Script {
    type Body = ();

    async fn send(
        self,
        endpoint: &Endpoint,
        req: Request<RequestBody>,
    ) -> Result<Response<()>, Failed> {
        let index = {
            let mut calls = self.calls.lock().expect("calls");
            calls.push(Call {
                endpoint: endpoint.addr,
                started: self.epoch.elapsed(),
                ended: None,
                attempt: req
                    .headers()
                    .get(&ATTEMPT)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            });
            calls.len() - 1
        };
        let _ends = Ends(self, index);
        let step = self.steps.lock().expect("steps").pop_front();
        let addr = endpoint.addr;
        let failed = |error: ProxyError, unsent| Failed {
            failure: AttemptFailure::of(error.kind()),
            error,
            unsent,
        };
        match step.unwrap_or(Step::Status(200)) {
            Step::Status(status) => Ok(response(status, None)),
            Step::RetryAfter(status, seconds) => Ok(response(status, Some(seconds))),
            Step::Refused => Err(failed(
                ProxyError::ConnectRefused(addr),
                Some(Unsent(Box::new(req))),
            )),
            Step::Reset => Err(failed(
                ProxyError::UpstreamReset {
                    addr,
                    source: "connection reset by peer".into(),
                },
                None,
            )),
            Step::Hang => std::future::pending().await,
        }
    }

    fn respond(_: (), _: Option<Duration>, _: Timer) -> ProxyBody {
        ProxyBody::empty()
    }
}

fn response(status: u16, retry_after: Option<u64>) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(status).expect("status");
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The policy `service` (the YAML of service `svc`'s settings, indented under it) compiled,
/// and its target for requests to `svc`.
fn target(service: &str) -> (Snapshot, Arc<Target>) {
    target_routed(service, "")
}

/// As [`target`], with `route` the YAML of the route's settings (indented under it).
fn target_routed(service: &str, route: &str) -> (Snapshot, Arc<Target>) {
    let text = format!(
        "services:\n  svc:\n    endpoints: [{A}, {B}]\n{service}routes:\n  - match: {{ authority: svc }}\n    service: svc\n{route}"
    );
    let loaded = outrider_config::load("p.yaml", &text).expect("valid policy");
    let metrics = Metrics::new("test").expect("metrics");
    let snapshot = Snapshot::build(loaded, 1, &metrics, None);
    let req = Request::get("/").body(()).expect("request");
    let target = Arc::clone(
        snapshot
            .route(&RouteRequest::of("svc", &req))
            .expect("route"),
    );
    (snapshot, target)
}

/// A request as hyper's server hands it over, read from a caller at the other end of an
/// in-memory connection (kept open while the request lives).
async fn received(method: &str) -> (Request<Incoming>, DuplexStream) {
    let (mut caller, server) = tokio::io::duplex(4096);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Mutex::new(Some(tx));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        if let Some(tx) = tx.lock().expect("sender").take() {
            let _ = tx.send(req);
        }
        std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, Infallible>>()
    });
    tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(server), service));
    let head = format!("{method} / HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n");
    caller.write_all(head.as_bytes()).await.expect("write");
    (rx.await.expect("request"), caller)
}

/// What one request through `forward` came to.
struct Exchanged {
    status: StatusCode,
    /// `x-outrider-attempts` on the response (retry policies only).
    attempts: Option<String>,
    report: ExchangeReport,
    /// Virtual time from the request to its response head.
    took: Duration,
}

/// Sends one `method` request to `target` through `forward`, each attempt played by `script`.
async fn exchange(script: &Script, target: &Target, method: &str) -> Exchanged {
    let (req, _caller) = received(method).await;
    let trace = TraceContext::extract(req.headers(), &Sampler::default());
    let mut report = ExchangeReport::default();
    let reporting = Reporting {
        record_spans: false,
        trace: &trace,
        report: &mut report,
        request_bytes: None,
    };
    let caller = Caller::new("127.0.0.1:9".parse().expect("addr"));
    let authority = Some(Authority::from_static("svc"));
    let start = Instant::now();
    let (response, health) = forward(
        script,
        (target, None),
        authority,
        &caller,
        req,
        false,
        reporting,
    )
    .await;
    // The body ends at once, cleanly: the breaker hears the exchange's verdict now.
    if let Some(health) = health {
        crate::io::completion::settle_upstream(health, &crate::io::completion::End::Clean);
    }
    Exchanged {
        status: response.status(),
        attempts: response
            .headers()
            .get(&ATTEMPTS)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        took: start.elapsed(),
        report,
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("addr")
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_within_the_jitter_bound_on_another_endpoint() {
    let (_snapshot, target) =
        target("    retries: { attempts: 3, on: [5xx], backoff: { base: 100ms, max: 1s } }\n");
    let script = Script::new([Step::Status(503), Step::Status(503), Step::Status(503)]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.attempts.as_deref(), Some("4"));
    assert_eq!(done.report.attempts, 4);
    let calls = script.calls();
    let numbers: Vec<_> = calls.iter().map(|c| c.attempt.as_deref()).collect();
    assert_eq!(numbers, [Some("1"), Some("2"), Some("3"), Some("4")]);
    // Each retry avoids the endpoint that just failed: with two, they alternate.
    for pair in calls.windows(2) {
        assert_ne!(pair[0].endpoint, pair[1].endpoint, "{calls:?}");
    }
    // Full jitter under ceilings of 100, 200 and 400 ms (base doubling); answers take no
    // time, so the backoffs are all the time the exchange took. (The timer wheel's 1 ms tick
    // may round a backoff up to the next millisecond.)
    let gaps = script.gaps();
    assert_eq!(gaps.len(), 3);
    for (gap, ceiling) in gaps.iter().zip([100, 200, 400]) {
        assert!(*gap <= ceiling * MS, "backoff {gap:?} over {ceiling} ms");
    }
    assert_eq!(done.took, gaps.iter().sum::<Duration>());
    let retries = &target.metrics.retries;
    assert_eq!(retries.attempts.get(), 3);
    assert_eq!(retries.success.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_pass_the_last_response_back() {
    let (_snapshot, target) =
        target("    retries: { attempts: 2, on: [5xx], backoff: { base: 1ms, max: 1ms } }\n");
    let script = Script::new([Step::Status(503), Step::Status(502), Step::Status(500)]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(
        done.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the last one's"
    );
    assert_eq!(done.attempts.as_deref(), Some("3"));
    assert_eq!(script.count(), 3);
    let retries = &target.metrics.retries;
    assert_eq!(retries.exhausted.get(), 1);
    assert_eq!(retries.success.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_ends_at_its_per_try_timeout_and_the_next_one_is_sent() {
    let (_snapshot, target) = target(
        "    timeouts: { per_try: 200ms, request: 5s }\n    retries: { attempts: 2, on: [reset], backoff: { base: 10ms, max: 10ms } }\n",
    );
    let script = Script::new([Step::Hang, Step::Hang]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.report.attempts, 3);
    let calls = script.calls();
    assert_eq!(calls.len(), 3);
    for hung in &calls[..2] {
        let ended = hung.ended.expect("dropped");
        assert_eq!(
            ended - hung.started,
            200 * MS,
            "exactly the per-try timeout"
        );
    }
    let gaps = script.gaps();
    assert!(gaps.iter().all(|gap| *gap <= 10 * MS), "{gaps:?}");
    assert_eq!(done.took, 400 * MS + gaps.iter().sum::<Duration>());
}

#[tokio::test(start_paused = true)]
async fn the_request_timeout_cuts_the_attempt_in_flight_and_ends_the_exchange() {
    // Attempts of 200 ms each and backoffs of at most 1 ms: the third attempt starts before
    // 500 ms and is cut there, by the request timeout, not by its own per-try timeout.
    let (_snapshot, target) = target(
        "    timeouts: { per_try: 200ms, request: 500ms }\n    retries: { attempts: 5, on: [reset], backoff: { base: 1ms, max: 1ms } }\n",
    );
    let script = Script::new([Step::Hang; 6]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(done.report.error_kind, Some(ErrorKind::RequestTimeout));
    assert_eq!(done.took, 500 * MS, "exactly the request timeout");
    assert_eq!(done.attempts.as_deref(), Some("3"));
    let calls = script.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2].ended, Some(500 * MS));
    assert_eq!(target.metrics.retries.exhausted.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn without_retries_the_per_try_timeout_answers_504() {
    let (_snapshot, target) = target("    timeouts: { per_try: 300ms, request: 2s }\n");
    let script = Script::new([Step::Hang]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(done.report.error_kind, Some(ErrorKind::PerTryTimeout));
    assert_eq!(done.took, 300 * MS);
    assert_eq!(script.count(), 1);
    assert_eq!(done.attempts, None, "no retry policy, no attempts header");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_waited_for_exactly_instead_of_the_backoff() {
    let (_snapshot, target) = target(
        "    retries: { attempts: 2, on: [5xx], backoff: { base: 1ms, max: 1ms }, max_retry_after: 5s }\n",
    );
    let script = Script::new([Step::RetryAfter(503, 2), Step::RetryAfter(503, 3)]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(script.gaps(), [2000 * MS, 3000 * MS]);
    assert_eq!(done.took, 5000 * MS);
    assert_eq!(done.attempts.as_deref(), Some("3"));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_over_the_cap_passes_the_response_back_at_once() {
    let (_snapshot, target) = target(
        "    retries: { attempts: 2, on: [5xx], backoff: { base: 1ms, max: 1ms }, max_retry_after: 5s }\n",
    );
    let script = Script::new([Step::RetryAfter(503, 6)]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(done.took, Duration::ZERO);
    assert_eq!(script.count(), 1);
    assert_eq!(target.metrics.retries.exhausted.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_that_would_outlast_the_request_timeout_is_not_waited_for() {
    let (_snapshot, target) = target(
        "    timeouts: { request: 3s }\n    retries: { attempts: 2, on: [5xx], backoff: { base: 1ms, max: 1ms }, max_retry_after: 10s }\n",
    );
    // 2 s fits in the 3 s; then 1 s does not fit in the 1 s left.
    let script = Script::new([Step::RetryAfter(503, 2), Step::RetryAfter(503, 1)]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(done.took, 2000 * MS);
    assert_eq!(script.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_runs_out_then_refills_with_time() {
    // No share of requests, two retries a second: the first two failing requests are retried,
    // the next three are not.
    let (_snapshot, target) = target(
        "    retries: { attempts: 1, on: [5xx], backoff: { base: 1ms, max: 1ms }, budget: { ratio: 0.0, min_per_second: 2 } }\n",
    );
    let script = Script::new([Step::Status(503); 32]);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(exchange(&script, &target, "GET").await.attempts);
    }
    let two = Some("2".to_owned());
    let one = Some("1".to_owned());
    assert_eq!(
        statuses,
        [two.clone(), two.clone(), one.clone(), one.clone(), one]
    );
    assert_eq!(script.count(), 7);
    let retries = &target.metrics.retries;
    assert_eq!(retries.budget_denied.get(), 3);
    assert_eq!(retries.attempts.get(), 2);
    // A second later the window holds two seconds: two more retries.
    tokio::time::advance(Duration::from_secs(1)).await;
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.attempts, two);
    assert_eq!(retries.budget_denied.get(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_consecutive_failed_requests_not_attempts() {
    let (_snapshot, target) = target(
        "    retries: { attempts: 2, on: [5xx], backoff: { base: 1ms, max: 1ms } }\n    circuit_breaker: { consecutive_failures: 2, open_for: 10s }\n",
    );
    let breaker = target.policy.breaker.as_ref().expect("breaker");
    // Three failed attempts are one failed request.
    let script = Script::new([Step::Status(503); 3]);
    assert_eq!(exchange(&script, &target, "GET").await.status, 503);
    assert_eq!(breaker.state(), BreakerState::Closed);
    // A request that a retry saved is a success: the count starts again.
    let script = Script::new([Step::Status(503)]);
    assert_eq!(exchange(&script, &target, "GET").await.status, 200);
    // Two failed requests in a row (a 503, then a connection reset) open it.
    let script = Script::new([
        Step::Status(503),
        Step::Status(503),
        Step::Status(503),
        Step::Reset,
        Step::Reset,
        Step::Reset,
    ]);
    assert_eq!(exchange(&script, &target, "GET").await.status, 503);
    assert_eq!(breaker.state(), BreakerState::Closed);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(
        done.report.error_kind,
        Some(ErrorKind::UpstreamResetBeforeHeaders)
    );
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(script.count(), 6);
    // Open: refused before any attempt.
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::SERVICE_UNAVAILABLE);
    // The proxy's own refusal is flagged, not reported as an upstream error.
    assert_eq!(done.report.flag, ErrorKind::CircuitOpen.flag());
    assert_eq!(done.took, Duration::ZERO);
    assert_eq!(script.count(), 6, "no attempt while open");
    // After `open_for`, a trial request goes through and closes it.
    tokio::time::advance(Duration::from_secs(10)).await;
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(script.count(), 7);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_post_is_not_retried_once_sent_but_is_when_nothing_left() {
    let (_snapshot, target) = target(
        "    retries: { attempts: 2, on: [connect-failure, reset, 5xx], backoff: { base: 1ms, max: 1ms } }\n",
    );
    // Sent and answered 503: a POST may have had its effect.
    let script = Script::new([Step::Status(503)]);
    let done = exchange(&script, &target, "POST").await;
    assert_eq!(done.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(script.count(), 1);
    // Sent, then the connection broke: the same.
    let script = Script::new([Step::Reset]);
    let done = exchange(&script, &target, "POST").await;
    assert_eq!(
        done.report.error_kind,
        Some(ErrorKind::UpstreamResetBeforeHeaders)
    );
    assert_eq!(script.count(), 1);
    assert_eq!(target.metrics.retries.not_retryable.get(), 2);
    // The connection never opened: nothing was sent, so it goes again.
    let script = Script::new([Step::Refused, Step::Refused]);
    let done = exchange(&script, &target, "POST").await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(script.count(), 3);
    // A GET after a 503 is retried.
    let script = Script::new([Step::Status(503)]);
    assert_eq!(exchange(&script, &target, "GET").await.status, 200);
    assert_eq!(script.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_retries_a_refused_connection_goes_once_to_another_endpoint() {
    let (_snapshot, target) = target("");
    let script = Script::new([Step::Refused]);
    let done = exchange(&script, &target, "POST").await;
    assert_eq!(done.status, StatusCode::OK);
    let calls = script.calls();
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0].endpoint, calls[1].endpoint);
    assert!([addr(A), addr(B)].contains(&calls[1].endpoint));
    assert_eq!(done.took, Duration::ZERO, "no backoff");
    // Only once: a second refusal is the answer.
    let script = Script::new([Step::Refused, Step::Refused, Step::Refused]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.report.error_kind, Some(ErrorKind::ConnectRefused));
    assert_eq!(script.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_refusal_is_reported_with_its_kind() {
    let (_snapshot, target) = target(
        "    circuit_breaker: { consecutive_failures: 1, open_for: 10s, max_concurrent_requests: 1 }\n",
    );
    let breaker = target.policy.breaker.as_ref().expect("breaker");
    // One request in flight (its permit held here) fills the concurrency limit.
    let in_flight = breaker.try_acquire().expect("a permit");
    let script = Script::new([]);
    let done = exchange(&script, &target, "GET").await;
    assert_eq!(done.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(done.report.flag, ErrorKind::ConcurrencyLimit.flag());
    assert_eq!(done.report.error_kind, Some(ErrorKind::ConcurrencyLimit));
    // A failed request opens it; the next is refused as open, with that kind.
    in_flight.record(Outcome::Failure);
    assert_eq!(breaker.state(), BreakerState::Open);
    let done = exchange(&script, &target, "GET").await;
    assert_refused(&done, &script, ErrorKind::CircuitOpen);
}

#[tokio::test(start_paused = true)]
async fn an_injected_abort_is_reported_with_its_kind() {
    let (_snapshot, target) =
        target_routed("", "    fault: { abort: { status: 503, percent: 100 } }\n");
    let script = Script::new([]);
    let done = exchange(&script, &target, "GET").await;
    assert_refused(&done, &script, ErrorKind::FaultInjected);
}

/// `done` was refused with a 503 before any attempt, and reports why as `kind`: its flag,
/// its kind, and its text for the log line and span.
fn assert_refused(done: &Exchanged, script: &Script, kind: ErrorKind) {
    assert_eq!(done.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(done.report.flag, kind.flag());
    assert_eq!(done.report.error_kind, Some(kind));
    assert!(done.report.error.is_some(), "the log line and span say why");
    assert_eq!(script.count(), 0, "no attempt");
}

/// A request's report to `target`, as `serve` builds it (no access log, no spans), counted
/// in flight.
fn finish(target: &Target) -> Finish {
    Finish::begin(&target.metrics);
    Finish {
        metrics: Arc::clone(&target.metrics),
        spans: None,
        access_log: None,
        logged: None,
        server: false,
        started: Instant::now(),
        started_wall: SystemTime::now(),
        method: http::Method::GET,
        uri: None,
        authority: None,
        peer: addr("127.0.0.1:9"),
        request_id: None,
        request_bytes: None,
        status: StatusCode::OK,
        report: ExchangeReport::default(),
        http_route: None,
        grpc: false,
        grpc_status: None,
        responded: false,
        cancelled: false,
        trace: TraceContext::extract(&http::HeaderMap::new(), &Sampler::default()),
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_before_its_response_completes_as_dropped() {
    let (_snapshot, target) =
        target("    circuit_breaker: { consecutive_failures: 1, open_for: 10s }\n");
    let breaker = target.policy.breaker.as_ref().expect("breaker");
    let traffic = &target.metrics.traffic;
    // The handler is dropped with its completion unsettled: the request is reported (its
    // time to the end observed) and no longer in flight.
    let completion = crate::io::completion::Completion::new(finish(&target));
    assert_eq!(traffic.active.get(), 1);
    drop(completion);
    assert_eq!(traffic.active.get(), 0);
    assert_eq!(traffic.stream_duration.get_sample_count(), 1);
    // Through the completion's steps: a health it was handed is settled as `End::Dropped`
    // (a verdict already reached, a 5xx head's, is kept), before the report.
    let mut completion = crate::io::completion::Completion::new(finish(&target));
    let verdict = outcome::of_status(StatusCode::SERVICE_UNAVAILABLE, None);
    completion.watch(Watch::new(breaker.try_acquire().ok(), verdict, None, None));
    drop(completion);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(traffic.stream_duration.get_sample_count(), 2);
    assert_eq!(traffic.active.get(), 0);
}
