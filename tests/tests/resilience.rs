//! Resilience policies end to end against misbehaving upstreams: retries (which failures, which
//! methods, which endpoint, how many under a failure storm, which bodies), timeouts (request,
//! per-try, idle) and Retry-After.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use outrider_e2e::*;

fn route(services: &str) -> String {
    format!("services:\n{services}routes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n")
}

/// Answers `status` to the first `fail_first` requests, then echoes the request body back.
/// The body is always read whole first, as a real server would before failing.
async fn fails_first(
    fail_first: usize,
    status: u16,
    retry_after: Option<&'static str>,
) -> Upstream {
    let seen = Arc::new(AtomicUsize::new(0));
    Upstream::start(Proto::Http1, move |req: Request<Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let attempt = req.headers().get("x-outrider-attempt").cloned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut res = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                let mut r = Response::new(full("fail"));
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                if let Some(after) = retry_after {
                    r.headers_mut()
                        .insert("retry-after", after.parse().unwrap());
                }
                r
            } else {
                Response::new(full(body))
            };
            if let Some(attempt) = attempt {
                res.headers_mut().insert("x-seen-attempt", attempt);
            }
            res
        }
    })
    .await
}

fn request(proxy: &Proxy, method: &str, body: impl Into<Bytes>) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(format!("http://{}/", proxy.outbound))
        .header("host", "svc")
        .body(full(body))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_retried_on_a_different_endpoint() {
    let broken = fails_first(usize::MAX, 503, None).await;
    let healthy = fails_first(0, 503, None).await;
    // Random (P2C) picks would often choose `broken` again for a retry, were it not avoided.
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}, {}]\n    load_balancing: least_request\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 5ms }} }}\n",
        broken.addr, healthy.addr
    )));
    let mut retries_seen = 0;
    for _ in 0..20 {
        let reply = send(&http1_client(), request(&proxy, "GET", "")).await;
        assert_eq!(reply.status, 200);
        let attempts: usize = reply
            .header("x-outrider-attempts")
            .unwrap()
            .parse()
            .unwrap();
        // The upstream saw the attempt number the caller is told about.
        assert_eq!(
            reply.header("x-seen-attempt"),
            Some(attempts.to_string().as_str())
        );
        assert!(
            attempts <= 2,
            "retried on the failed endpoint: {attempts} attempts"
        );
        retries_seen += attempts - 1;
    }
    // Every request reached `healthy` exactly once; `broken` only ever as a first try.
    assert_eq!(healthy.hits(), 20);
    assert_eq!(broken.hits(), retries_seen);
    assert_eq!(
        proxy
            .metric(
                "outrider_retried_requests_total{outcome=\"success\",route=\"r\",service=\"svc\"}"
            )
            .await,
        retries_seen as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_total_counts_attempts_and_retried_requests_count_requests() {
    let flaky = fails_first(2, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 3, on: [5xx], backoff: {{ base: 1ms, max: 5ms }} }}\n",
        flaky.addr
    )));
    let reply = send(&http1_client(), request(&proxy, "GET", "")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-outrider-attempts"), Some("3"));
    // One request, two retry attempts.
    assert_eq!(
        proxy
            .metric("outrider_retries_total{route=\"r\",service=\"svc\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric(
                "outrider_retried_requests_total{outcome=\"success\",route=\"r\",service=\"svc\"}"
            )
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_not_retried_once_sent_but_is_after_connect_failure() {
    let flaky = fails_first(1, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 3, on: [connect-failure, 5xx], backoff: {{ base: 1ms, max: 5ms }} }}\n",
        flaky.addr
    )));
    let reply = send(&http1_client(), request(&proxy, "POST", "pay 10")).await;
    assert_eq!(reply.status, 503, "a sent POST must not be retried");
    assert_eq!(flaky.hits(), 1);
    assert_eq!(
        proxy
            .metric("outrider_retried_requests_total{outcome=\"not-retryable\",route=\"r\",service=\"svc\"}")
            .await,
        1.0
    );

    // Nothing listens on the first endpoint: the POST never left, so it is retried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let healthy = fails_first(0, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{closed}, {}]\n    retries: {{ attempts: 1, on: [connect-failure], backoff: {{ base: 1ms, max: 5ms }} }}\n",
        healthy.addr
    )));
    let reply = send(&http1_client(), request(&proxy, "POST", "pay 10")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"pay 10");
    assert_eq!(reply.header("x-outrider-attempts"), Some("2"));
    assert_eq!(healthy.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_may_opt_in_to_retrying_post() {
    let flaky = fails_first(1, 503, None).await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], backoff: {{ base: 1ms, max: 5ms }} }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n    retry_non_idempotent: true\n",
        flaky.addr
    ));
    let reply = send(
        &http1_client(),
        request(&proxy, "POST", "idempotent by key"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(flaky.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_body_is_replayed_byte_for_byte_and_large_body_is_not_retried() {
    let flaky = fails_first(1, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], backoff: {{ base: 1ms, max: 5ms }}, body_limit: 64KiB }}\n",
        flaky.addr
    )));
    let body: Vec<u8> = (0..10 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let reply = send(&http1_client(), request(&proxy, "PUT", body.clone())).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, Bytes::from(body), "replayed body differs");
    assert_eq!(flaky.hits(), 2);

    let flaky = fails_first(1, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], backoff: {{ base: 1ms, max: 5ms }}, body_limit: 64KiB }}\n",
        flaky.addr
    )));
    let reply = send(&http1_client(), request(&proxy, "PUT", vec![1u8; 1 << 20])).await;
    assert_eq!(reply.status, 503);
    assert_eq!(flaky.hits(), 1, "a 1 MiB body must not be retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_caps_retries_in_a_failure_storm() {
    let broken = fails_first(usize::MAX, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 3, on: [5xx], backoff: {{ base: 1ms, max: 1ms }}, budget: {{ ratio: 0.1, min_per_second: 2 }} }}\n",
        broken.addr
    )));
    let started = std::time::Instant::now();
    for _ in 0..100 {
        assert_eq!(
            send(&http1_client(), request(&proxy, "GET", ""))
                .await
                .status,
            503
        );
    }
    let seconds = started.elapsed().as_secs() + 1;
    // Without a budget: 400 calls. With it: 100 requests, 10% of them, plus 2 per second seen.
    let retries = broken.hits() - 100;
    let allowed = 10 + 2 * seconds as usize;
    assert!(retries >= 10, "only {retries} retries");
    assert!(retries <= allowed, "{retries} retries, budget {allowed}");
    assert!(
        proxy
            .metric("outrider_retried_requests_total{outcome=\"budget-denied\",route=\"r\",service=\"svc\"}")
            .await
            >= 80.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_delay() {
    let limited = fails_first(1, 429, Some("1")).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [retriable-status], status: [429], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        limited.addr
    )));
    let started = std::time::Instant::now();
    let reply = send(&http1_client(), request(&proxy, "GET", "x")).await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // A Retry-After beyond the request timeout is not waited for.
    let limited = fails_first(1, 503, Some("30")).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    timeouts: {{ request: 2s }}\n    retries: {{ attempts: 1, on: [5xx], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        limited.addr
    )));
    let started = std::time::Instant::now();
    let reply = send(&http1_client(), request(&proxy, "GET", "x")).await;
    assert_eq!(reply.status, 503);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(limited.hits(), 1);
}

async fn hangs() -> Upstream {
    Upstream::start(Proto::Http1, |_req| async {
        std::future::pending::<()>().await;
        Response::new(empty())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_is_504_with_reason() {
    let stuck = hangs().await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    timeouts: {{ request: 300ms }}\n",
        stuck.addr
    )));
    let started = std::time::Instant::now();
    let reply = send(&http1_client(), request(&proxy, "GET", "")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some("request timeout after 300ms")
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_to_another_endpoint() {
    let stuck = hangs().await;
    let healthy = fails_first(0, 503, None).await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}, {}]\n    timeouts: {{ per_try: 200ms, request: 5s }}\n    retries: {{ attempts: 1, on: [gateway-error], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        stuck.addr, healthy.addr
    )));
    let reply = send(&http1_client(), request(&proxy, "GET", "ok")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-outrider-attempts"), Some("2"));
    assert_eq!((stuck.hits(), healthy.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_cuts_a_silent_stream_but_not_a_chatty_one() {
    // Sends a chunk every 100 ms five times, then goes silent forever.
    let server = Upstream::start(Proto::Http1, |_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for _ in 0..5 {
                tx.send(Bytes::from_static(b"tick")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
            drop(tx);
        });
        Response::new(body)
    })
    .await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    timeouts: {{ idle: 400ms }}\n",
        server.addr
    )));
    let res = http1_client()
        .request(request(&proxy, "GET", ""))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut ticks = 0;
    let ended_with_error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => ticks += 1,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("idle stream never cut");
    // All five messages (100 ms apart, under the 400 ms idle bound) came through; then the
    // silence cut the stream instead of it ending cleanly.
    assert_eq!(ticks, 5);
    assert!(ended_with_error, "a cut stream must not look complete");
}

/// What the load in [`dead_endpoint_under_load`] saw, counted exactly.
struct DeadEndpointRun {
    /// Requests sent in all, and those answered 200.
    total: usize,
    ok: usize,
    /// Failures (a status other than 200, or no response) by when they ended, relative to the
    /// kill: before it, within its first second, later.
    failed_before: usize,
    failed_first_second: usize,
    failed_later: usize,
    /// Requests that ended after the kill.
    after_kill: usize,
    /// Times the proxy held an endpoint out.
    hold_outs: f64,
}

/// Two endpoints behind `services` (which names them `{a}` and `{b}`); 16 callers send GETs
/// back to back through the proxy; after 1 s `b` is killed (listener and connections closed,
/// so connects are refused), and the callers go on for 3 s more.
async fn dead_endpoint_under_load(label: &str, service: &str) -> DeadEndpointRun {
    const CALLERS: usize = 16;
    const BEFORE: Duration = Duration::from_secs(1);
    const AFTER: Duration = Duration::from_secs(3);
    let ok = || async { Response::new(full("ok")) };
    let a = Upstream::start(Proto::Http1, move |_| ok()).await;
    let b = Upstream::start(Proto::Http1, move |_| ok()).await;
    let service = service
        .replace("{a}", &a.addr.to_string())
        .replace("{b}", &b.addr.to_string());
    let proxy = start_proxy(&route(&service));
    let started = tokio::time::Instant::now();
    let kill_at = started + BEFORE;
    let stop_at = kill_at + AFTER;
    let outbound = proxy.outbound;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            tokio::spawn(async move {
                let client = http1_client();
                // (ended at, relative to the start; answered 200)
                let mut results = Vec::new();
                while tokio::time::Instant::now() < stop_at {
                    let req = Request::get(format!("http://{outbound}/"))
                        .header("host", "svc")
                        .body(empty())
                        .unwrap();
                    // Bounded: a request that hangs counts as failed rather than stalling.
                    let sent = tokio::time::timeout(Duration::from_secs(5), async {
                        let res = client.request(req).await.ok()?;
                        let status = res.status();
                        res.into_body().collect().await.ok()?;
                        Some(status)
                    })
                    .await;
                    let answered = matches!(sent, Ok(Some(StatusCode::OK)));
                    results.push((started.elapsed(), answered));
                }
                results
            })
        })
        .collect();
    tokio::time::sleep_until(kill_at).await;
    assert!(b.hits() > 0, "b took traffic before the kill");
    b.kill().await;
    // The kill's instant for the counts below: once the listener is closed (the sockets of
    // its connections close at once after).
    let killed = started.elapsed();
    let mut run = DeadEndpointRun {
        total: 0,
        ok: 0,
        failed_before: 0,
        failed_first_second: 0,
        failed_later: 0,
        after_kill: 0,
        hold_outs: 0.0,
    };
    for caller in callers {
        for (ended, answered) in caller.await.unwrap() {
            run.total += 1;
            let after_kill = ended >= killed;
            run.after_kill += usize::from(after_kill);
            if answered {
                run.ok += 1;
            } else if !after_kill {
                run.failed_before += 1;
            } else if ended < killed + Duration::from_secs(1) {
                run.failed_first_second += 1;
            } else {
                run.failed_later += 1;
            }
        }
    }
    run.hold_outs = proxy
        .metric("outrider_endpoint_unavailable_total{service=\"svc\"}")
        .await;
    eprintln!(
        "{label}: {} requests ({} after the kill), {} ok; failed: {} before the kill, {} in \
         its first second, {} later; hold-outs {}",
        run.total,
        run.after_kill,
        run.ok,
        run.failed_before,
        run.failed_first_second,
        run.failed_later,
        run.hold_outs
    );
    drop(a);
    run
}

/// Issue 16 point 6: with two endpoints, one killed under load, and the default retry
/// settings (no `retries` block at all; then a `retries` block with only `attempts`), at most
/// 0.1% of requests fail and none after the first second. The dead endpoint is held out after
/// its first refused connect, and the requests that were connecting to it go to the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_costs_callers_almost_nothing() {
    for (label, service) in [
        ("no retries", "  svc:\n    endpoints: [{a}, {b}]\n"),
        (
            "retries: { attempts: 2 }",
            "  svc:\n    endpoints: [{a}, {b}]\n    retries: { attempts: 2 }\n",
        ),
    ] {
        let run = dead_endpoint_under_load(label, service).await;
        assert!(
            run.after_kill >= 1000,
            "too little load for 0.1% to mean anything: {} requests after the kill",
            run.after_kill
        );
        let failed = run.total - run.ok;
        assert!(
            failed * 1000 <= run.total,
            "{failed} of {} requests failed (over 0.1%)",
            run.total
        );
        assert_eq!(
            run.failed_later, 0,
            "requests failed later than 1 s after the kill"
        );
        // The dead endpoint was tried again as its hold-outs ran out (after 125-250 ms, then
        // 250-500 ms, ...), and was held out again: those tries cost no caller anything.
        assert!(
            run.hold_outs >= 2.0,
            "held out {} times in 3 s",
            run.hold_outs
        );
    }
}
