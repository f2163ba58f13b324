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
            .metric("outrider_retries_total{outcome=\"success\",route=\"r\",service=\"svc\"}")
            .await,
        retries_seen as f64
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
            .metric("outrider_retries_total{outcome=\"not-retryable\",route=\"r\",service=\"svc\"}")
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
            .metric("outrider_retries_total{outcome=\"budget-denied\",route=\"r\",service=\"svc\"}")
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
