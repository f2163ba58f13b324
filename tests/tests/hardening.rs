//! A misbehaving peer must not crash, stall or fool the sidecar: huge `Retry-After` values,
//! transfer codings the proxy cannot apply, forged reserved headers (by header, underscore
//! spelling or trailer, against a real WSGI app), and loopback admin calls on a dual-stack
//! admin port.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use outrider_e2e::*;

fn route(services: &str) -> String {
    format!("services:\n{services}routes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n")
}

/// Answers every request 503 with `Retry-After: retry_after`.
async fn unavailable(retry_after: &'static str) -> Upstream {
    Upstream::start(Proto::Http1, move |_req| async move {
        let mut res = Response::new(full("busy"));
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        res.headers_mut()
            .insert("retry-after", retry_after.parse().unwrap());
        res
    })
    .await
}

fn get_svc(proxy: &Proxy) -> Request<TestBody> {
    Request::get(format!("http://{}/", proxy.outbound))
        .header("host", "svc")
        .body(empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_passed_back_and_the_proxy_lives_on() {
    let upstream = unavailable("9223372036854775807").await;
    // No request timeout (the default): only `max_retry_after` (default 30s) bounds the wait.
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    // Before: adding the delay to the clock panicked, and the connection died with the proxy.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        send(&http1_client(), get_svc(&proxy)),
    )
    .await
    .expect("answered at once");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("9223372036854775807"));
    assert_eq!(&reply.body[..], b"busy", "the upstream's own response");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 1, "not retried");
    // Still alive and serving.
    let reply = send(&http1_client(), get_svc(&proxy)).await;
    assert_eq!(reply.status, 503);
    assert_eq!(upstream.hits(), 2);
    assert_eq!(proxy.admin_get("/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_cap_is_not_waited_for() {
    let upstream = unavailable("100000").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    // Before: the request waited 100,000 s for its retry.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        send(&http1_client(), get_svc(&proxy)),
    )
    .await
    .expect("answered at once");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("100000"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 1);

    // Within a lowered cap it is waited for; beyond it, not.
    let upstream = unavailable("1").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], max_retry_after: 2s }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    let reply = send(&http1_client(), get_svc(&proxy)).await;
    assert_eq!(reply.status, 503);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 2, "retried after the second asked for");
    let upstream = unavailable("3").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], max_retry_after: 2s }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    let reply = send(&http1_client(), get_svc(&proxy)).await;
    assert_eq!(reply.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 1);
}

/// PUT or POST with `body` on the admin port at `addr`: the status.
async fn admin_call(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(full(body.to_string()))
        .unwrap();
    send(&http1_client(), req).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_on_every_address_takes_loopback_calls_over_ipv4() {
    let mut proxy = start_proxy_with(
        "services:\n  svc: { endpoints: [127.0.0.1:9] }\n",
        &["--admin", "[::]:0", "--shutdown-endpoint"],
    );
    assert!(
        proxy.admin.ip().is_unspecified() && proxy.admin.is_ipv6(),
        "{}",
        proxy.admin
    );
    // An IPv4 caller on a dual-stack socket arrives as ::ffff:127.0.0.1.
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.admin.port()));
    assert_eq!(admin_call(local, "PUT", "/log-level", "debug").await, 200);
    assert_eq!(admin_call(local, "POST", "/shutdown", "").await, 202);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}
