//! The request path: pick the target from the policy in force, rewrite the request for the
//! upstream, send it through the endpoint's pool, stream the response back. Failures become
//! responses in one place ([`crate::http::rescue`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, Entry, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use outrider_config::Protocol;
use tokio::time::Instant;

use crate::core::errors::{ProxyError, ResponseFlag};
use crate::core::headers::{self, Caller};
use crate::http::attempt::{Failed, Pool, SendAttempt};
use crate::http::captured::Capture;
use crate::http::rescue::rescue;
use crate::http::route_filter::{RequestUrl, RouteFilters};
use crate::http::route_match::RouteRequest;
use crate::http::shared::Shared;
use crate::http::snapshot::{Snapshot, Target};
use crate::io::body::{Observed, ProxyBody};
use crate::io::completion::{self, Completion};
use crate::io::outcome::{self, Deferred, Watch};
use crate::io::pool::Unsent;
use crate::io::request_body::{Counted, ReplayHandle, RequestBody};
use crate::io::tls::UpstreamTls;
use crate::io::upstream::{Endpoint, Upstream};
use crate::policy::breaker::{BreakerRejection, Outcome};
use crate::policy::ratelimit::RateDecision;
use crate::policy::retry::{self, AttemptFailure, RetryPolicy};
use crate::policy::timeout::{BodyStall, Deadlines, Expired, Timer};
use crate::telemetry::metrics::RouteLabels;
use crate::telemetry::routing::count;
use crate::telemetry::span::{RequestSpan, SpanTarget};
use crate::telemetry::{AccessRecord, AttemptSpan, ExchangeReport, Finish, LoggedOnly, SpanSink};
use crate::trace::{SpanId, TraceContext};

/// Which listener a request arrived on; decides how its target is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The shared outbound port: routed by authority and path.
    Outbound,
    /// A service's dedicated port, identified by the `listen:` address in the policy.
    Dedicated(SocketAddr),
    /// The inbound port: to the local app.
    Inbound,
}

/// Serves one request that arrived on a listener of `kind` from `caller`.
pub async fn handle(
    shared: Arc<Shared>,
    kind: ListenerKind,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let server = kind == ListenerKind::Inbound;
    serve(shared, server, caller, req, |snapshot, req, _| {
        select_target(snapshot, kind, req)
            .map(|((target, filters), authority)| (Arc::clone(target), authority, filters.cloned()))
    })
    .await
}

/// Serves one request of a captured connection (routed by its original destination).
pub async fn handle_captured(
    shared: Arc<Shared>,
    capture: Arc<Capture>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let server = capture.inbound;
    serve(shared, server, caller, req, |snapshot, req, metrics| {
        select_captured(snapshot, &capture, metrics, req)
    })
    .await
}

/// Serves one request, its target chosen by `select` in the policy in force; `server`: it
/// came in for the local app.
async fn serve<F>(
    shared: Arc<Shared>,
    server: bool,
    caller: Caller,
    mut req: Request<Incoming>,
    select: F,
) -> Result<Response<ProxyBody>, Infallible>
where
    F: FnOnce(
        &Snapshot,
        &Request<Incoming>,
        &crate::telemetry::metrics::Metrics,
    ) -> Result<Selected, ProxyError>,
{
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let grpc = headers::is_grpc(&req);
    let routed = {
        let snapshot = shared.snapshot.load();
        match select(&snapshot, &req, &shared.metrics) {
            Ok((target, authority, filters)) => Ok((
                target,
                authority,
                filters,
                TraceContext::extract(req.headers(), &snapshot.sampler),
                snapshot
                    .access_log
                    .clone()
                    .map(|log| (log, snapshot.access_log_style)),
            )),
            Err(error) => {
                let response = rescue(&error, grpc);
                if error.is_malformed() {
                    let direction = if server { "inbound" } else { "outbound" };
                    shared.metrics.malformed(direction, response.status());
                }
                snapshot.unrouted.record(
                    req.method(),
                    response.status(),
                    error.flag(),
                    started.elapsed().as_secs_f64(),
                );
                // Requests the proxy refused before routing are logged and traced too: an
                // operator looks for a 404 or 400 by its trace or request id like any other.
                let sink = shared.spans.sink();
                if snapshot.access_log.is_some() || sink.is_some() {
                    let trace = TraceContext::extract(req.headers(), &snapshot.sampler);
                    let times = (started, started_wall);
                    if let (Some(sink), true) = (&sink, trace.sampled) {
                        let labels = &snapshot.unrouted.labels;
                        let side = (server, caller.addr);
                        refused_span(sink, &req, &trace, labels, side, times, &response, &error);
                    }
                    if let Some(log) = &snapshot.access_log {
                        let mut record = AccessRecord::refused(
                            &req,
                            &caller,
                            &trace,
                            &snapshot.unrouted.labels,
                            times,
                            &response,
                            (error.to_string(), error.flag()),
                        );
                        record.style = snapshot.access_log_style;
                        log.record(record);
                    }
                }
                Err(response)
            }
        }
    };
    let (target, authority, filters, trace, log) = match routed {
        Ok(routed) => routed,
        Err(response) => return Ok(response),
    };
    // Set here rather than when the upstream request is prepared, so the access log has it.
    headers::ensure_request_id(req.headers_mut());
    // Loaded only for sampled requests: the sink is behind an ArcSwap (reloads replace it).
    let spans = if trace.sampled {
        shared.spans.sink()
    } else {
        None
    };
    Finish::begin(&target.metrics);
    let (log, style) = log.unzip();
    let logged = log.is_some();
    let finish_spans = spans.is_some();
    let keep_uri = logged || finish_spans;
    let logged_only = style.map(|style| {
        Box::new(LoggedOnly {
            style,
            version: req.version(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            peer_identity: if server {
                caller.identity.clone()
            } else {
                target
                    .upstream
                    .spec
                    .tls
                    .as_ref()
                    .and_then(UpstreamTls::identity)
            },
            ..LoggedOnly::default()
        })
    });
    // The request's completion from here on: dropped before the response (the caller went
    // away), it reports the request as cancelled.
    let mut completion = Completion::new(Finish {
        metrics: Arc::clone(&target.metrics),
        spans,
        access_log: log,
        logged: logged_only,
        server,
        started,
        started_wall,
        method: req.method().clone(),
        uri: keep_uri.then(|| req.uri().clone()),
        authority: authority.clone(),
        peer: caller.addr,
        request_id: req.headers().get(&headers::REQUEST_ID).cloned(),
        request_bytes: logged.then(|| Arc::new(AtomicU64::new(0))),
        status: StatusCode::OK,
        // A server span's version is the caller's; a client span's, the upstream's (`forward`).
        report: ExchangeReport {
            version: server.then(|| req.version()),
            ..ExchangeReport::default()
        },
        http_route: finish_spans.then(|| target.http_route.clone()).flatten(),
        grpc,
        grpc_status: None,
        responded: false,
        cancelled: false,
        trace,
    });
    // A guard, so a request whose caller left before the response is not pending forever.
    let pending = GaugeGuard::inc(&target.metrics.traffic.pending);
    // Boxed: the exchange's future is large (retries, timers, the pool), and hyper moves the
    // request's future into place; a box makes that move a pointer copy. Measured: without
    // it, callgrind counted 13k more instructions per request, nearly all in memcpy.
    let routed = (&*target, filters.as_deref());
    let finish = completion.finish_mut();
    let reporting = Reporting {
        record_spans: finish_spans,
        trace: &finish.trace,
        report: &mut finish.report,
        request_bytes: finish.request_bytes.clone(),
    };
    let exchange = forward(Pool, routed, authority, &caller, req, grpc, reporting);
    let (response, health) = Box::pin(exchange).await;
    drop(pending);
    // Counted when the response ends (`Finish`): only then is it known whether the caller
    // stayed for it.
    let head_elapsed = started.elapsed();
    let finish = completion.finish_mut();
    target
        .metrics
        .observe_headers(finish.report.flag, head_elapsed.as_secs_f64());
    finish.status = response.status();
    finish.responded = true;
    if let Some(logged) = finish.logged.as_deref_mut() {
        logged.head_elapsed = head_elapsed;
    }
    if grpc && (finish_spans || finish.logged.is_some()) {
        // A trailers-only response has its status here; otherwise the trailers bring it.
        finish.grpc_status = outcome::grpc_code(response.headers());
    }
    completion.watch(health);
    Ok(response.map(|body| Observed::wrap(body, completion)))
}

/// Exports the span of a request the proxy answered itself before routing (no route, bad
/// request): no upstream, no attempt.
#[allow(clippy::too_many_arguments)]
fn refused_span<B>(
    sink: &SpanSink,
    req: &Request<B>,
    trace: &TraceContext,
    labels: &RouteLabels,
    (server, peer): (bool, SocketAddr),
    (started, started_wall): (Instant, SystemTime),
    response: &Response<ProxyBody>,
    error: &ProxyError,
) {
    let authority = req.uri().authority().cloned().or_else(|| {
        let host = req.headers().get(header::HOST)?;
        Authority::try_from(host.as_bytes()).ok()
    });
    sink.record(RequestSpan {
        server,
        trace: trace.clone(),
        started,
        started_wall,
        elapsed: started.elapsed(),
        method: req.method().clone(),
        target: SpanTarget::new(Some(req.uri()), authority.as_ref()),
        version: Some(req.version()),
        peer,
        endpoint: None,
        service: Arc::clone(&labels.service),
        route: Arc::clone(&labels.route),
        http_route: None,
        attempts: 0,
        status: Some(response.status()),
        grpc: headers::is_grpc(req),
        grpc_status: outcome::grpc_code(response.headers()),
        error: Some(error.to_string()),
        error_kind: Some(error.kind()),
        cancelled: false,
        flag: error.flag(),
        attempt_spans: Vec::new(),
    });
}

/// Holds a gauge incremented until dropped.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    fn inc(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A request's target, its authority, and the filters of the route match it met.
type Selected = (Arc<Target>, Option<Authority>, Option<Arc<RouteFilters>>);

/// Checks the request and finds its target (with its route's filters) and authority in the
/// policy in force.
fn select_target<'s>(
    snapshot: &'s Snapshot,
    kind: ListenerKind,
    req: &Request<Incoming>,
) -> Result<(crate::http::snapshot::Routed<'s>, Option<Authority>), ProxyError> {
    headers::check_request(req)?;
    let authority = headers::request_authority(req)?;
    let routed = match kind {
        ListenerKind::Outbound => {
            let host = authority.as_ref().map_or("", Authority::host);
            snapshot
                .route_filtered(&RouteRequest::of(host, req))
                .ok_or_else(|| ProxyError::NoRoute(host.to_string()))?
        }
        ListenerKind::Dedicated(listen) => {
            let target = snapshot.dedicated(listen).ok_or_else(|| {
                ProxyError::NotConfigured(format!("no service listens on {listen} in the policy"))
            })?;
            (target, None)
        }
        ListenerKind::Inbound => {
            let target = snapshot
                .inbound()
                .ok_or_else(|| ProxyError::NotConfigured("no inbound app in the policy".into()))?;
            (target, None)
        }
    };
    Ok((routed, authority))
}

/// Checks a captured request and finds its target: a route naming its authority (outbound),
/// else the connection's own target (its destination's service, passthrough, or the app).
fn select_captured(
    snapshot: &Snapshot,
    capture: &Capture,
    metrics: &crate::telemetry::metrics::Metrics,
    req: &Request<Incoming>,
) -> Result<Selected, ProxyError> {
    headers::check_request(req)?;
    let authority = headers::request_authority(req)?;
    if !capture.inbound {
        let host = authority.as_ref().map_or("", Authority::host);
        let request = RouteRequest::of(host, req);
        if let Some((target, filters)) = snapshot.route_by_authority_filtered(&request) {
            return Ok((Arc::clone(target), authority, filters.cloned()));
        }
    }
    Ok((capture.target(snapshot, metrics), authority, None))
}

/// The attempt counter the upstream sees (1-based).
static ATTEMPT: HeaderName = HeaderName::from_static("x-outrider-attempt");
/// How many attempts the exchange took, on the response to the caller.
static ATTEMPTS: HeaderName = HeaderName::from_static("x-outrider-attempts");

/// What `forward` reads from and writes into the request's report ([`Finish`]).
struct Reporting<'a> {
    /// Attempt spans are recorded (the request is sampled and spans are exported).
    record_spans: bool,
    trace: &'a TraceContext,
    report: &'a mut ExchangeReport,
    /// The request body's bytes, counted for the access log when it is on.
    request_bytes: Option<Arc<AtomicU64>>,
}

/// The response to the caller, and its health for the exchange's completion (the breaker
/// permit and deferred endpoint, settled when the response ends; `None` when there is nothing
/// to settle, or it was settled already).
type Forwarded = (Response<ProxyBody>, Option<Watch>);

/// Forwards one routed request through its policies (rate limit, faults, breaker, the attempt
/// loop), each attempt sent by `sender`.
async fn forward<S: SendAttempt>(
    sender: S,
    (target, filters): (&Target, Option<&RouteFilters>),
    authority: Option<Authority>,
    caller: &Caller,
    mut req: Request<Incoming>,
    grpc: bool,
    reporting: Reporting<'_>,
) -> Forwarded {
    let Reporting {
        record_spans,
        trace,
        report,
        request_bytes,
    } = reporting;
    let policy = &target.policy;
    // A redirect is the route's answer, not a failure: before the policies that guard the
    // upstream (rate limit, faults, breaker), which it never reaches.
    if let Some((redirect, counts)) = filters.and_then(|f| Some((f.redirect.as_ref()?, &f.counts)))
    {
        let url = RequestUrl {
            scheme: req.uri().scheme_str().unwrap_or("http"),
            host: authority.as_ref().map_or("", Authority::host),
            port: authority.as_ref().and_then(Authority::port_u16),
            path: req.uri().path(),
            query: req.uri().query(),
        };
        report.flag = ResponseFlag::Redirect;
        let (applied, refused) = counts.redirect.as_ref().map(|(a, r)| (a, r)).unzip();
        if let Some(response) = redirect.respond(&url) {
            count(applied);
            return (response, None);
        }
        count(refused);
        let error = ProxyError::BadRequest("request path cannot be a redirect's Location");
        report.fail(&error);
        return (rescue(&error, grpc), None);
    }
    // One clock reading for the policies below (rate limit, request timeout, first attempt,
    // retry budget): they run back to back without waiting, except after an injected delay.
    let mut now = Instant::now();
    if let Some(limit) = &policy.limit {
        let decisions = &target.metrics.rate_limit;
        match limit.limiter.check_at(now) {
            RateDecision::Allowed { .. } => decisions.allowed.inc(),
            RateDecision::ShadowLimited { .. } => decisions.shadow_rejected.inc(),
            RateDecision::Limited {
                limit: burst,
                retry_after,
                reset,
            } => {
                decisions.rejected.inc();
                let error = ProxyError::RateLimited {
                    scope: Arc::clone(&limit.scope),
                    limit: burst,
                    retry_after,
                    reset,
                };
                report.fail(&error);
                return (rescue(&error, grpc), None);
            }
        }
    }
    if let Some(fault) = &policy.fault {
        let faults = fault.decide();
        if let Some(delay) = faults.delay {
            tokio::time::sleep(delay).await;
            now = Instant::now();
        }
        if let Some(status) = faults.abort {
            let error = ProxyError::FaultAbort(status);
            report.fail(&error);
            return (rescue(&error, grpc), None);
        }
    }
    let permit = match &policy.breaker {
        None => None,
        Some(breaker) => match breaker.try_acquire() {
            Ok(permit) => Some(permit),
            Err(rejection) => {
                let service = Arc::clone(breaker.name());
                let error = match rejection {
                    BreakerRejection::Open => ProxyError::CircuitOpen(service),
                    BreakerRejection::ConcurrencyLimit => ProxyError::ConcurrencyLimit(service),
                };
                // Its kind, like a rate limit's: the access log and span say why.
                report.fail(&error);
                return (rescue(&error, grpc), None);
            }
        },
    };
    let upgrade = headers::is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    // Counted as read for the upstream, below the retry replay: once per request, whatever
    // its framing (Content-Length, chunked, HTTP/2 DATA frames).
    let mut body = Counted::new(
        body,
        request_bytes,
        &target.metrics.traffic.request_bytes,
        policy.request_body_idle.as_ref(),
    );
    let stall = body.stall();
    let retry = policy.retry.as_ref().filter(|_| !upgrade);
    // Under retries the head carries the first attempt's own span from the start (later
    // attempts replace it); without, the upstream's parent is this proxy's span.
    let span = match retry {
        Some(_) => SpanId::random(),
        None => trace.span_id,
    };
    let parts = match prepare((target, filters), parts, authority, caller, trace, span) {
        Ok(parts) => {
            report.version = report.version.or(Some(parts.version));
            parts
        }
        Err(error) => {
            report.fail(&error);
            return (rescue(&error, grpc), None);
        }
    };

    // Copies for the route's mirrors start now, in their own tasks; an upgrade is not copied.
    if let Some(mirrors) = target.mirrors.as_deref() {
        match upgrade {
            false => crate::http::mirror::dispatch(mirrors, &parts, &mut body),
            true => crate::http::mirror::skip(mirrors),
        }
    }
    // A hashing balancer's key, read once for every attempt's pick.
    let affinity = target.upstream.affinity(&parts.headers);
    let mut log = AttemptLog {
        attempts: 1,
        endpoint: None,
        spans: Vec::new(),
        record: record_spans,
    };
    // One timer for the request timeout, each attempt's per-try timeout and the backoffs.
    let deadlines = Deadlines::start(now, policy.request_timeout, policy.per_try_timeout);
    let mut timer = Timer::from_pool(policy.timers.as_ref());
    let result = match retry {
        None => {
            let req = Request::from_parts(parts, RequestBody::Direct(body));
            let upstream = &target.upstream;
            let sending = (&deadlines, stall.as_ref());
            let picking = (affinity, &mut log);
            send_without_retries(sender, upstream, req, sending, &mut timer, now, picking).await
        }
        Some(retry) => {
            let exchange = Exchange {
                deadlines: &deadlines,
                stall: stall.as_ref(),
                timer: &mut timer,
                trace,
                first_span: span,
                now,
                affinity,
                log: &mut log,
            };
            exchange_with_retries(sender, target, retry, parts, body, exchange).await
        }
    };
    let (mut response, health) = match result {
        Ok(Answer {
            mut response,
            grpc: grpc_code,
        }) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(downstream) = downstream_upgrade {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(tunnel(downstream, upstream_upgrade));
                }
            } else {
                headers::strip_hop_by_hop(response.headers_mut(), false);
            }
            // The upstream's responses only: the proxy's own answers keep their headers.
            if let Some(filters) = filters {
                if let Some(changes) = &filters.response_headers {
                    changes.apply(response.headers_mut());
                    count(filters.counts.response_headers.as_ref());
                }
            }
            let deferred = response
                .extensions_mut()
                .remove::<Deferred>()
                .map(|Deferred(endpoint)| (Arc::clone(&target.upstream), endpoint));
            let verdict = outcome::of_status(response.status(), grpc_code);
            if grpc {
                // The stream is live both ways now: a client silent while it receives is not
                // stalled (see `BodyStall::lift`).
                if let Some(stall) = &stall {
                    stall.lift();
                }
            }
            report.answered = true;
            let health = Watch::new(permit, verdict, deferred, stall);
            let response = response.map(|body| S::respond(body, policy.idle_timeout, timer));
            (response, health)
        }
        Err(error) => {
            tracing::debug!(service = %target.upstream.spec.name, %error, "request failed");
            // Settled now: the proxy's answer says nothing more of the upstream.
            completion::settle_failed(permit, &error);
            report.fail(&error);
            (rescue(&error, grpc), None)
        }
    };
    report.attempts = log.attempts;
    report.endpoint = log.endpoint;
    report.spans = log.spans;
    if policy.retry.is_some() {
        response
            .headers_mut()
            .insert(ATTEMPTS.clone(), attempt_value(log.attempts));
    }
    (response, health)
}

/// Rewrites the caller's request head for the upstream: hop-by-hop headers out, forwarding
/// headers in (the trace context with `span` as the parent), the upstream's version, and the
/// caller's authority where that version carries it: `Host` and an origin-form URI for
/// HTTP/1.1, an absolute URI (`:authority`) for HTTP/2.
fn prepare(
    (target, filters): (&Target, Option<&RouteFilters>),
    mut parts: http::request::Parts,
    mut authority: Option<Authority>,
    caller: &Caller,
    trace: &TraceContext,
    span: SpanId,
) -> Result<http::request::Parts, ProxyError> {
    let upstream = &target.upstream;
    let upgrade = parts.headers.contains_key(header::UPGRADE) && parts.version == Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    // The downstream's 100-continue is answered by our server when the body is first read;
    // passing Expect on would make the upstream wait for an interim response we never relay.
    parts.headers.remove(header::EXPECT);
    // The route's changes to the caller's request; the proxy's own headers (forwarding, trace
    // context) are added after them, so a filter cannot forge or drop them by accident.
    let mut rewritten_path = None;
    if let Some(filters) = filters {
        if let Some(changes) = &filters.request_headers {
            changes.apply(&mut parts.headers);
            count(filters.counts.request_headers.as_ref());
        }
        if let Some(rewrite) = &filters.rewrite {
            let (applied, refused) = filters.counts.rewrite.as_ref().map(|(a, r)| (a, r)).unzip();
            if let Some(host) = &rewrite.authority {
                // The caller's Host goes: the new authority is written below, as Host or
                // :authority.
                parts.headers.remove(header::HOST);
                authority = Some(host.clone());
            }
            if rewrite.path.is_some() {
                let Some(path) = rewrite.path_and_query(&parts.uri) else {
                    count(refused);
                    return Err(ProxyError::BadRequest(
                        "rewritten path is not a valid target",
                    ));
                };
                rewritten_path = Some(path);
            }
            count(applied);
        }
    }
    headers::append_forwarded(&mut parts.headers, caller);
    // x-request-id is already there: handle() set it for the access log.
    trace.inject(&mut parts.headers, span);

    let authority = match authority {
        Some(a) => a,
        // HTTP/1.0 without Host on a dedicated or inbound port: name the service.
        None => Authority::try_from(upstream.spec.name.as_bytes())
            .map_err(|_| ProxyError::BadRequest("request has no authority"))?,
    };
    let path = rewritten_path.unwrap_or_else(|| {
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    });
    match upstream.spec.protocol {
        Protocol::Http1 => {
            // HTTP/1.1 sends the path (origin form) and the authority in Host (RFC 9112 §3.2);
            // an HTTP/2 caller sent it as :authority only.
            parts.version = Version::HTTP_11;
            if let Entry::Vacant(host) = parts.headers.entry(header::HOST) {
                let value = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
                host.insert(value);
            }
            parts.uri = Uri::from(path);
        }
        Protocol::Http2 => {
            // HTTP/2 carries the authority in :authority (RFC 9113 §8.3.1).
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(authority);
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri)
                .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        }
    }
    Ok(parts)
}

/// A response head, with its `grpc-status` (a trailers-only gRPC response's) read once for
/// outlier detection, the retry decision and the breaker.
struct Answer<B> {
    response: Response<B>,
    grpc: Option<u8>,
}

/// One attempt's result: the response head, or what went wrong and how it counts for retries.
type Attempted<B> = Result<Answer<B>, (ProxyError, AttemptFailure)>;

/// A request under no retry policy: one attempt, except that a request whose connection could
/// not be opened (nothing was sent, so this is always safe, and adds no load to any app) goes
/// once more, to an endpoint that is not held out; the one that failed now is. So a dead
/// endpoint costs its callers nothing even without retries; with retries, the policy decides
/// (`connect-failure`).
async fn send_without_retries<S: SendAttempt>(
    sender: S,
    upstream: &Upstream,
    mut req: Request<RequestBody>,
    (deadlines, stall): (&Deadlines, Option<&BodyStall>),
    timer: &mut Timer,
    mut now: Instant,
    (affinity, log): (Option<u64>, &mut AttemptLog),
) -> Result<Answer<S::Body>, ProxyError> {
    let mut endpoint = upstream.pick_for(affinity, None)?;
    let mut failed_over = false;
    // One call site for the attempt: its future (large) has one place in this one.
    loop {
        log.endpoint = Some(endpoint.addr);
        let sending = (deadlines, stall);
        let failed =
            match send_attempt(sender, upstream, &endpoint, req, sending, timer, now).await? {
                Ok(answer) => return Ok(answer),
                Err(failed) => failed,
            };
        match failed {
            Failed {
                error,
                unsent: Some(Unsent(unsent)),
                ..
            } if !failed_over => {
                let Ok(next) = upstream.pick_for(affinity, Some(endpoint.addr)) else {
                    return Err(error);
                };
                (endpoint, req, now, failed_over) = (next, *unsent, Instant::now(), true);
            }
            failed => return Err(failed.error),
        }
    }
}

/// Sends one attempt to `endpoint` of `upstream` (see [`send_attempt`]), for the retry loop.
async fn send_once<S: SendAttempt>(
    sender: S,
    upstream: &Upstream,
    endpoint: &Arc<Endpoint>,
    req: Request<RequestBody>,
    sending: (&Deadlines, Option<&BodyStall>),
    timer: &mut Timer,
    now: Instant,
) -> Result<Attempted<S::Body>, ProxyError> {
    let attempted = send_attempt(sender, upstream, endpoint, req, sending, timer, now).await?;
    Ok(attempted.map_err(|failed| (failed.error, failed.failure)))
}

/// Sends one attempt to `endpoint` of `upstream`, bounded by the per-try timeout until
/// response headers, and reports the attempt's outcome to outlier detection. `Err` is the
/// request timeout, or the caller's silence mid-body (`stall` says when the body was cut for
/// it), either of which ends the exchange there (the attempt is not reported).
async fn send_attempt<S: SendAttempt>(
    sender: S,
    upstream: &Upstream,
    endpoint: &Arc<Endpoint>,
    req: Request<RequestBody>,
    (deadlines, stall): (&Deadlines, Option<&BodyStall>),
    timer: &mut Timer,
    now: Instant,
) -> Result<Result<Answer<S::Body>, Failed>, ProxyError> {
    // The per-try bound is applied here, on the exchange's one timer, not by the sender. The
    // attempt's future (the pool's, with connecting and handshakes: large) stays pinned here and
    // the timeout code only borrows it: passed by value, each async layer above would hold its
    // own copy, and the request's whole future grows by as many.
    let work = pin!(sender.send(endpoint, req));
    let mut result = match deadlines.attempt(timer, now, work).await {
        Ok(Ok(response)) => Ok(Answer {
            grpc: outcome::grpc_code(response.headers()),
            response,
        }),
        // The body was cut for the caller's silence, and the attempt failed with it: the
        // caller's doing, not the upstream's, and no other attempt would do better.
        Ok(Err(failed)) => match stall.and_then(BodyStall::stalled) {
            Some(limit) => return Err(ProxyError::RequestBodyTimeout(limit)),
            None => Err(failed),
        },
        Err(Expired::PerTry(limit)) => Err(Failed {
            error: ProxyError::PerTryTimeout(limit),
            failure: AttemptFailure::Reset,
            unsent: None,
        }),
        Err(Expired::Request(limit)) => return Err(ProxyError::RequestTimeout(limit)),
    };
    if upstream.detects_outliers() {
        match &mut result {
            Ok(Answer { response, grpc }) => match outcome::of_status(response.status(), *grpc) {
                Some(outcome) => upstream.report(endpoint, outcome),
                // A gRPC status still to come in the trailers: the body reports it.
                None if outcome::is_grpc(response) => {
                    response
                        .extensions_mut()
                        .insert(Deferred(Arc::clone(endpoint)));
                }
                None => upstream.report(endpoint, Outcome::Success),
            },
            Err(failed) => {
                if let Some(outcome) = outcome::of_error(&failed.error) {
                    upstream.report(endpoint, outcome);
                }
            }
        }
    }
    Ok(result)
}

/// What, if anything, is wrong with a response, for the retry decision.
fn response_failure<B>(answer: &Answer<B>) -> Option<AttemptFailure> {
    let status = answer.response.status();
    if status.is_server_error() || status.is_client_error() {
        return Some(AttemptFailure::Status(status));
    }
    // A trailers-only gRPC response carries its status in the headers.
    let code = answer.grpc?;
    (code != 0).then_some(AttemptFailure::Grpc(code))
}

/// What the attempt loop reports back besides its result; what it holds when the request
/// timeout ends the exchange is reported too.
struct AttemptLog {
    /// Attempts made (the current one included).
    attempts: u32,
    /// The endpoint of the latest attempt.
    endpoint: Option<SocketAddr>,
    /// Attempt spans, when `record`.
    spans: Vec<AttemptSpan>,
    record: bool,
}

/// `x-outrider-attempt`'s value: the common small numbers without formatting one.
fn attempt_value(attempt: u32) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(attempt as usize) {
        Some(digit) => HeaderValue::from_static(digit),
        None => HeaderValue::from(attempt),
    }
}

/// The per-request state the attempt loop works with.
struct Exchange<'a> {
    deadlines: &'a Deadlines,
    /// Set when the caller's body is cut for its silence.
    stall: Option<&'a BodyStall>,
    timer: &'a mut Timer,
    trace: &'a TraceContext,
    /// The first attempt's span, already in the head.
    first_span: SpanId,
    /// When the exchange started (the first attempt starts then).
    now: Instant,
    /// The hash of the request's key, for a hashing balancer.
    affinity: Option<u64>,
    log: &'a mut AttemptLog,
}

/// The attempt loop: retries what the policy allows, on a different endpoint when there is one,
/// after a jittered backoff (or the upstream's Retry-After), within the retry budget.
async fn exchange_with_retries<S: SendAttempt>(
    sender: S,
    target: &Target,
    retry: &RetryPolicy,
    mut parts: http::request::Parts,
    body: Counted,
    exchange: Exchange<'_>,
) -> Result<Answer<S::Body>, ProxyError> {
    let Exchange {
        deadlines,
        stall,
        timer,
        trace,
        first_span,
        now,
        affinity,
        log,
    } = exchange;
    let metrics = &target.metrics.retries;
    retry.budget.deposit_at(now);
    // A body that had ended before the request was routed (most GETs) needs no replay buffer:
    // every attempt sends it empty.
    let replay = (!body.is_end_stream()).then(|| ReplayHandle::new(body, retry.body_limit));
    // In the head every attempt copies (as the first attempt's), so that each later copy only
    // replaces values in place (a clone has no spare room: an insert of a new name would grow
    // it).
    parts
        .headers
        .insert(ATTEMPT.clone(), HeaderValue::from_static("1"));
    let mut previous = None;
    let mut connect_error = None;
    let mut attempt: u32 = 1;
    loop {
        log.attempts = attempt;
        let endpoint = match (
            target.upstream.pick_for(affinity, previous),
            connect_error.take(),
        ) {
            (Ok(endpoint), _) => endpoint,
            // Every endpoint is held out after a failed connect: the last one's error stands.
            (Err(ProxyError::AllUnreachable(_)), Some(error)) => return Err(error),
            (Err(error), _) => return Err(error),
        };
        let mut req = Request::new(match &replay {
            Some(replay) => RequestBody::Replay(replay.body()),
            None => RequestBody::Empty,
        });
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        let (attempt_span, attempt_start) = if attempt == 1 {
            (first_span, now)
        } else {
            metrics.attempts.inc();
            let span = SpanId::random();
            req.headers_mut()
                .insert(ATTEMPT.clone(), attempt_value(attempt));
            trace.reinject(req.headers_mut(), span);
            (span, Instant::now())
        };
        // Only a recorded span needs the time.
        let attempt_started = log.record.then(Instant::now);
        let outcome = send_once(
            sender,
            &target.upstream,
            &endpoint,
            req,
            (deadlines, stall),
            timer,
            attempt_start,
        )
        .await?;
        log.endpoint = Some(endpoint.addr);
        if let Some(started) = attempt_started {
            log.spans.push(AttemptSpan {
                span_id: attempt_span,
                number: attempt,
                endpoint: endpoint.addr,
                started,
                ended: Instant::now(),
                status: outcome.as_ref().ok().map(|answer| answer.response.status()),
                error: outcome.as_ref().err().map(|(error, _)| error.to_string()),
                error_kind: outcome.as_ref().err().map(|(error, _)| error.kind()),
            });
        }
        let failure = match &outcome {
            Ok(answer) => match response_failure(answer) {
                Some(failure) if retry.retries_on(failure) => failure,
                _ => {
                    if attempt > 1 && !answer.response.status().is_server_error() {
                        metrics.success.inc();
                    }
                    return outcome.map_err(|(error, _)| error);
                }
            },
            Err((_, failure)) if retry.retries_on(*failure) => *failure,
            Err(_) => return outcome.map_err(|(error, _)| error),
        };
        let verdict = if !retry.method_allows(&parts.method, failure)
            || !replay.as_ref().is_none_or(ReplayHandle::is_replayable)
        {
            Some(&metrics.not_retryable)
        } else if attempt > retry.attempts {
            Some(&metrics.exhausted)
        } else if !retry.budget.withdraw() {
            Some(&metrics.budget_denied)
        } else {
            None
        };
        if let Some(counter) = verdict {
            counter.inc();
            return outcome.map_err(|(error, _)| error);
        }
        let mut delay = retry.backoff(attempt);
        if let Ok(Answer { response, .. }) = &outcome {
            if matches!(response.status().as_u16(), 429 | 503) {
                if let Some(asked) = retry::retry_after(response.headers()) {
                    // Waited for only up to `max_retry_after` and within the request timeout;
                    // beyond either, the response goes back as it is.
                    let left = deadlines
                        .request_deadline()
                        .map(|d| d.saturating_duration_since(Instant::now()));
                    if !retry.honours_retry_after(asked, left) {
                        metrics.exhausted.inc();
                        return outcome.map_err(|(error, _)| error);
                    }
                    delay = asked;
                }
            }
        }
        // The response (if any) is dropped before the backoff; a connect error is kept for
        // the next pick.
        connect_error = match outcome {
            Err((error, AttemptFailure::Connect)) => Some(error),
            _ => None,
        };
        deadlines.backoff(timer, delay).await?;
        previous = Some(endpoint.addr);
        attempt += 1;
    }
}

/// Copies bytes both ways between an upgraded downstream and upstream connection.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
    }
}

/// A static header value for responses the admin port and demo produce.
pub(crate) fn text_plain() -> HeaderValue {
    HeaderValue::from_static("text/plain; charset=utf-8")
}

#[cfg(test)]
mod tests;
