//! Protective policies end to end, through the real binary against real upstreams: rate limits
//! (service, route, inbound, shadow mode), circuit breakers and concurrency limits, outlier
//! ejection and fault injection. Upstream hit counters prove what never reached the upstream.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use outrider_e2e::*;

fn get_req(addr: std::net::SocketAddr, host: &str, path: &str) -> Request<TestBody> {
    Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_admits_exactly_burst_plus_refill_under_8_concurrent_clients() {
    const BURST: usize = 10;
    // One token every 500 ms. The bucket starts full at proxy start; from the first request
    // on, tokens come back at +500 ms and +1000 ms, so a 1250 ms run admits BURST + 2. A first
    // request alone starts the clock (its own token counts), so the clients' start-up cannot
    // shift the refill instants; 250 ms margins either side of them absorb the jitter.
    const WINDOW: Duration = Duration::from_millis(1250);
    let upstream = Upstream::echo(Proto::Http1, "svc").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    rate_limit: {{ requests_per_second: 2, burst: {BURST} }}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n",
        upstream.addr
    ));
    let first = Instant::now();
    assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    let started = Instant::now();
    assert!(
        started - first < Duration::from_millis(250),
        "first request too slow"
    );
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let outbound = proxy.outbound;
            tokio::spawn(async move {
                let client = http1_client();
                let (mut ok, mut limited) = (0usize, 0usize);
                // Bounded in time and count.
                for _ in 0..5_000 {
                    if started.elapsed() >= WINDOW {
                        break;
                    }
                    let reply = send(&client, get_req(outbound, "svc", "/")).await;
                    match reply.status {
                        200 => ok += 1,
                        429 => {
                            assert_eq!(reply.header("x-ratelimit-limit"), Some("10"));
                            assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
                            // At most one token interval away, rounded up to whole seconds.
                            assert_eq!(reply.header("retry-after"), Some("1"));
                            let reset: u64 =
                                reply.header("x-ratelimit-reset").unwrap().parse().unwrap();
                            assert!((1..=5).contains(&reset), "reset {reset}");
                            assert_eq!(
                                reply.header("x-outrider-error"),
                                Some("rate limited by service svc")
                            );
                            limited += 1;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
                (ok, limited)
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for client in clients {
        let (o, l) = client.await.unwrap();
        ok += o;
        limited += l;
    }
    assert_eq!(ok + 1, BURST + 2, "admitted");
    assert_eq!(
        upstream.hits(),
        BURST + 2,
        "a limited request reached the upstream"
    );
    assert!(limited > 0);
    let decision = |d: &str| {
        format!(
            "outrider_rate_limit_decisions_total{{decision=\"{d}\",route=\"r\",service=\"svc\"}}"
        )
    };
    assert_eq!(proxy.metric(&decision("allowed")).await, (BURST + 2) as f64);
    assert_eq!(proxy.metric(&decision("rejected")).await, limited as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_limit_overrides_the_service_limit_and_grpc_gets_resource_exhausted() {
    let upstream = Upstream::echo(Proto::Http1, "svc").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    rate_limit: {{ requests_per_second: 1, burst: 5 }}\nroutes:\n  - name: tight\n    match: {{ authority: svc, path_prefix: /tight }}\n    service: svc\n    rate_limit: {{ requests_per_second: 1, burst: 1 }}\n  - name: loose\n    match: {{ authority: svc }}\n    service: svc\n",
        upstream.addr
    ));
    let client = http1_client();
    assert_eq!(
        send(&client, get_req(proxy.outbound, "svc", "/tight"))
            .await
            .status,
        200
    );
    let reply = send(&client, get_req(proxy.outbound, "svc", "/tight")).await;
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some("rate limited by route tight")
    );
    // The route's own bucket took the /tight requests: the service's five are all still there.
    for _ in 0..5 {
        assert_eq!(
            send(&client, get_req(proxy.outbound, "svc", "/other"))
                .await
                .status,
            200
        );
    }
    let grpc = Request::post(format!("http://{}/pkg.Svc/Call", proxy.outbound))
        .header("host", "svc")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    let reply = send(&client, grpc).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("grpc-status"), Some("8"), "RESOURCE_EXHAUSTED");
    assert_eq!(upstream.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_counts_without_rejecting() {
    let upstream = Upstream::echo(Proto::Http1, "svc").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    rate_limit: {{ requests_per_second: 1, burst: 3, mode: shadow }}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n",
        upstream.addr
    ));
    let client = http1_client();
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            send(&client, get_req(proxy.outbound, "svc", "/"))
                .await
                .status,
            200
        );
    }
    assert_eq!(upstream.hits(), 10);
    let decision = |d: &str| {
        format!(
            "outrider_rate_limit_decisions_total{{decision=\"{d}\",route=\"r\",service=\"svc\"}}"
        )
    };
    let allowed = proxy.metric(&decision("allowed")).await;
    let shadowed = proxy.metric(&decision("shadow-rejected")).await;
    assert_eq!(allowed + shadowed, 10.0);
    // Three from the burst, plus one per whole second the loop took (normally none).
    let refill = started.elapsed().as_secs() as f64;
    assert!(
        allowed >= 3.0 && allowed <= 3.0 + refill + 1.0,
        "allowed {allowed}"
    );
    assert_eq!(proxy.metric(&decision("rejected")).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_limit_protects_the_local_app() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&format!(
        "inbound:\n  app: {}\n  rate_limit: {{ requests_per_second: 1, burst: 2 }}\n",
        app.addr
    ));
    let client = http1_client();
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                send(&client, get_req(proxy.inbound, "app", "/"))
                    .await
                    .status,
            );
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(app.hits(), 2);
}

/// An upstream answering 503 while `failing` is set, 200 otherwise.
async fn switchable(failing: Arc<AtomicBool>) -> Upstream {
    Upstream::start(Proto::Http1, move |_req| {
        let failing = Arc::clone(&failing);
        async move {
            let mut res = Response::new(full("x"));
            if failing.load(Ordering::SeqCst) {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            res
        }
    })
    .await
}

fn breaker_policy(addr: std::net::SocketAddr, breaker: &str) -> String {
    format!(
        "services:\n  svc:\n    endpoints: [{addr}]\n    circuit_breaker: {breaker}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n"
    )
}

fn breaker_state(state: &str) -> String {
    format!("outrider_circuit_breaker_state{{service=\"svc\",state=\"{state}\"}}")
}

/// Scrapes the proxy until its breaker for `svc` reports `state` (a scrape brings an open
/// breaker whose time is up to half-open), for up to 5 s.
async fn until_breaker_is(proxy: &Proxy, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric(&breaker_state(state)).await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the breaker never turned {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The wire behaviour of a breaker's cycle. Exact open times (doubling, cap) are unit-tested on
/// paused time in `policy::breaker`; here the wall clock only gives lower bounds, which load
/// cannot break, and each "still open" call states the window it must fall in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_half_opens_and_closes() {
    const OPEN_FOR: Duration = Duration::from_millis(500);
    let failing = Arc::new(AtomicBool::new(true));
    let upstream = switchable(Arc::clone(&failing)).await;
    let proxy = start_proxy(&breaker_policy(
        upstream.addr,
        "{ consecutive_failures: 3, open_for: 500ms, max_open_for: 2s }",
    ));
    let client = http1_client();
    let call = || send(&client, get_req(proxy.outbound, "svc", "/"));
    assert_eq!(proxy.metric(&breaker_state("closed")).await, 1.0);
    let mut tripped_by = Instant::now();
    for _ in 0..3 {
        tripped_by = Instant::now();
        let reply = call().await;
        assert_eq!(
            (reply.status, reply.header("x-outrider-error")),
            (503, None)
        );
    }
    // Open for 500 ms from the third failure (settled as its body ends, so looked for):
    // answered by the proxy, the upstream untouched.
    until_breaker_is(&proxy, "open").await;
    for _ in 0..3 {
        let reply = call().await;
        assert_eq!(
            (reply.status, reply.header("x-outrider-error")),
            (503, Some("circuit open for svc")),
            "{:?} after the third failure",
            tripped_by.elapsed()
        );
    }
    assert_eq!(upstream.hits(), 3);

    // Half-open no sooner than `open_for` after the trip; one probe goes through, fails, and
    // the breaker reopens for twice as long without the upstream seeing anything else.
    until_breaker_is(&proxy, "half_open").await;
    assert!(
        tripped_by.elapsed() >= OPEN_FOR,
        "half-open {:?} after the third failure",
        tripped_by.elapsed()
    );
    let probe_sent = Instant::now();
    let probe = call().await;
    assert_eq!(
        (probe.status, probe.header("x-outrider-error")),
        (503, None)
    );
    assert_eq!(upstream.hits(), 4);
    until_breaker_is(&proxy, "open").await;
    assert_eq!(
        call().await.header("x-outrider-error"),
        Some("circuit open for svc"),
        "{:?} after the probe was sent (open for 1 s)",
        probe_sent.elapsed()
    );
    assert_eq!(upstream.hits(), 4);

    // The upstream recovers; half-open again no sooner than the doubled time, and a probe
    // closes the breaker.
    failing.store(false, Ordering::SeqCst);
    until_breaker_is(&proxy, "half_open").await;
    assert!(
        probe_sent.elapsed() >= 2 * OPEN_FOR,
        "half-open again {:?} after the failed probe was sent: not twice open_for",
        probe_sent.elapsed()
    );
    assert_eq!(call().await.status, 200, "probe after recovery");
    for _ in 0..3 {
        assert_eq!(call().await.status, 200);
    }
    assert_eq!(upstream.hits(), 8);
    assert_eq!(proxy.metric(&breaker_state("closed")).await, 1.0);
    let transitions = |to: &str| {
        format!("outrider_circuit_breaker_transitions_total{{service=\"svc\",to=\"{to}\"}}")
    };
    assert_eq!(proxy.metric(&transitions("open")).await, 2.0);
    assert_eq!(proxy.metric(&transitions("half_open")).await, 2.0);
    assert_eq!(proxy.metric(&transitions("closed")).await, 1.0);
    let logged = proxy
        .logs()
        .iter()
        .filter(|l| l.contains("circuit breaker transition") && l.contains("\"svc\""))
        .count();
    assert_eq!(logged, 5);
}

/// A gRPC (h2c) upstream answering 200 with one empty message and its status in the trailers:
/// UNAVAILABLE for path `/fail` or when `fail_all`, NOT_FOUND otherwise.
async fn grpc_upstream(fail_all: bool) -> Upstream {
    Upstream::start(Proto::Http2, move |req: Request<Incoming>| async move {
        let code = if fail_all || req.uri().path() == "/fail" {
            "14"
        } else {
            "5"
        };
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", code.parse().unwrap());
        let body = full(&b"\0\0\0\0\0"[..])
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        let mut res = Response::new(body);
        res.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        res
    })
    .await
}

fn grpc_call(path: &str) -> Request<TestBody> {
    Request::post(format!("http://svc{path}"))
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failure_in_trailers_ejects_the_endpoint() {
    let failing = grpc_upstream(true).await;
    let healthy = grpc_upstream(false).await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}, {}]\n    protocol: http2\n    outlier_detection: {{ consecutive_failures: 2, base_ejection: 1m }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        failing.addr, healthy.addr
    ));
    for _ in 0..10 {
        let reply = send_h2_via(proxy.outbound, grpc_call("/x")).await;
        assert_eq!(reply.status, 200);
    }
    // Round robin: `failing` got requests 1 and 3; the UNAVAILABLE in their trailers ejected it.
    assert_eq!(failing.hits(), 2);
    assert_eq!(healthy.hits(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failure_in_trailers_counts_and_4xx_does_not() {
    // 200 OK whose trailers say UNAVAILABLE: a failure, though the head looked fine.
    let grpc = grpc_upstream(false).await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    protocol: http2\n    circuit_breaker: {{ consecutive_failures: 2, open_for: 1m }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        grpc.addr
    ));
    let call = |path: &'static str| send_h2_via(proxy.outbound, grpc_call(path));
    // NOT_FOUND (5) is the caller's problem: any number of them leaves the breaker closed.
    for _ in 0..5 {
        assert_eq!(call("/missing").await.status, 200);
    }
    let first = call("/fail").await;
    assert_eq!(first.header("x-outrider-error"), None);
    let _ = call("/fail").await;
    let rejected = call("/missing").await;
    assert_eq!(
        rejected.header("x-outrider-error"),
        Some("circuit open for svc")
    );
    assert_eq!(rejected.header("grpc-status"), Some("14"));
    assert_eq!(grpc.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_fails_fast_while_requests_are_in_flight() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = Arc::clone(&gate);
    let slow = Upstream::start(Proto::Http1, move |_req| {
        let gate = Arc::clone(&held);
        async move {
            let _ = gate.acquire().await.unwrap();
            Response::new(full("done"))
        }
    })
    .await;
    let proxy = start_proxy(&breaker_policy(slow.addr, "{ max_concurrent_requests: 2 }"));
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let outbound = proxy.outbound;
            tokio::spawn(async move { send(&http1_client(), get_req(outbound, "svc", "/")).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || slow.hits() == 2).await);
    // The two in flight hold their permits until the gate opens, below: a third request that
    // waited for one would never be answered, so an answer at all is the fast failure (no
    // wall-clock bound, which flakes on a loaded machine).
    let reply = send(&http1_client(), get_req(proxy.outbound, "svc", "/")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some("too many concurrent requests for svc")
    );
    assert_eq!(slow.hits(), 2);
    gate.add_permits(2);
    for request in in_flight {
        assert_eq!(request.await.unwrap().status, 200);
    }
    // The slots came back when the responses ended.
    gate.add_permits(1);
    assert_eq!(
        send(&http1_client(), get_req(proxy.outbound, "svc", "/"))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_moves_traffic_to_healthy_endpoints() {
    let broken = switchable(Arc::new(AtomicBool::new(true))).await;
    let healthy_a = Upstream::echo(Proto::Http1, "a").await;
    let healthy_b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}, {}, {}]\n    outlier_detection: {{ consecutive_failures: 2, base_ejection: 1m }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        broken.addr, healthy_a.addr, healthy_b.addr
    ));
    let client = http1_client();
    let mut failed = 0;
    for _ in 0..30 {
        if send(&client, get_req(proxy.outbound, "svc", "/"))
            .await
            .status
            != 200
        {
            failed += 1;
        }
    }
    // Round robin sends every third request to `broken` until its second failure ejects it;
    // from then on the healthy endpoints take everything.
    assert_eq!(broken.hits(), 2);
    assert_eq!(failed, 2);
    assert_eq!(healthy_a.hits() + healthy_b.hits(), 28);
    assert!(healthy_a.hits() >= 13 && healthy_b.hits() >= 13);
    assert_eq!(
        proxy
            .metric("outrider_outlier_ejections_total{service=\"svc\"}")
            .await,
        1.0
    );
    assert!(proxy
        .logs()
        .iter()
        .any(|l| l.contains("endpoint ejected") && l.contains(&broken.addr.to_string())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_endpoints_ejected_is_503_without_an_upstream_call() {
    let broken = switchable(Arc::new(AtomicBool::new(true))).await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    outlier_detection: {{ consecutive_failures: 1, max_ejected_percent: 100 }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        broken.addr
    ));
    let first = get(proxy.outbound, "svc", "/").await;
    assert_eq!(
        (first.status, first.header("x-outrider-error")),
        (503, None)
    );
    let second = get(proxy.outbound, "svc", "/").await;
    assert_eq!(second.status, 503);
    assert_eq!(
        second.header("x-outrider-error"),
        Some("all endpoints of svc are ejected")
    );
    assert_eq!(broken.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_at_100_percent_delays_and_aborts() {
    let upstream = Upstream::echo(Proto::Http1, "svc").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\nroutes:\n  - match: {{ authority: svc, path_prefix: /abort }}\n    service: svc\n    fault: {{ abort: {{ status: 503, percent: 100 }} }}\n  - match: {{ authority: svc, path_prefix: /slow }}\n    service: svc\n    fault: {{ delay: {{ duration: 300ms, percent: 100 }} }}\n  - match: {{ authority: svc }}\n    service: svc\n",
        upstream.addr
    ));
    for _ in 0..5 {
        let reply = get(proxy.outbound, "svc", "/abort").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("x-outrider-error"), Some("fault injected"));
    }
    let grpc = Request::post(format!("http://{}/abort/pkg.Svc/Call", proxy.outbound))
        .header("host", "svc")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    assert_eq!(
        send(&http1_client(), grpc).await.header("grpc-status"),
        Some("14")
    );
    assert_eq!(
        upstream.hits(),
        0,
        "an aborted request must not be forwarded"
    );

    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(get(proxy.outbound, "svc", "/slow").await.status, 200);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(upstream.hits(), 3);
    // Other routes are untouched.
    let started = Instant::now();
    assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_limit_fails_fast_while_connections_are_being_opened() {
    // A listener that never accepts, its accept queue filled: the kernel drops further SYNs,
    // so every new connection to it stays pending until the connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    assert!(queued.len() < 16, "the accept queue never filled");
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{addr}]\n    timeouts: {{ connect: 2s }}\n    circuit_breaker: {{ max_pending_requests: 2, consecutive_failures: 1 }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n"
    ));
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let outbound = proxy.outbound;
            tokio::spawn(async move { get(outbound, "svc", "/").await })
        })
        .collect();
    // Give both time to reach the connector.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = get(proxy.outbound, "svc", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some("too many pending requests for svc")
    );
    // Failed fast: answered before either pending connect gave up (at its 2 s timeout), an
    // order rather than a wall-clock bound.
    assert!(
        waiting.iter().all(|request| !request.is_finished()),
        "the refusal came after the pending connects ended"
    );
    for request in waiting {
        assert_eq!(request.await.unwrap().status, 504);
    }
    drop((queued, listener));
}

/// Saves a new policy over the proxy's file the way editors do, and waits until the proxy
/// reports `version`.
async fn reload(proxy: &Proxy, text: &str, version: u64) {
    let path = proxy.policy_path();
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = proxy.admin_get("/config").await;
        let config: serde_json::Value = serde_json::from_str(&body).unwrap();
        if config["version"].as_u64() == Some(version) {
            return;
        }
        assert!(Instant::now() < deadline, "version {version} never applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_breaker_and_bucket_state_unless_their_settings_change() {
    let broken = switchable(Arc::new(AtomicBool::new(true))).await;
    let echo = Upstream::echo(Proto::Http1, "lim").await;
    let policy = |failures: u32, burst: u32, request_timeout: &str| {
        format!(
            "services:\n  brk:\n    endpoints: [{}]\n    timeouts: {{ request: {request_timeout} }}\n    circuit_breaker: {{ consecutive_failures: {failures}, open_for: 1m }}\n  lim:\n    endpoints: [{}]\n    timeouts: {{ request: {request_timeout} }}\n    rate_limit: {{ requests_per_second: 1, burst: {burst} }}\nroutes:\n  - match: {{ authority: brk }}\n    service: brk\n  - match: {{ authority: lim }}\n    service: lim\n",
            broken.addr, echo.addr
        )
    };
    let proxy = start_proxy(&policy(1, 5, "5s"));
    let circuit_open = |r: &Reply| r.header("x-outrider-error") == Some("circuit open for brk");
    assert!(!circuit_open(&get(proxy.outbound, "brk", "/").await));
    assert!(circuit_open(&get(proxy.outbound, "brk", "/").await));
    let drained_at = Instant::now();
    let mut admitted = 0;
    for _ in 0..5 {
        admitted += usize::from(get(proxy.outbound, "lim", "/").await.status == 200);
    }
    assert_eq!(admitted, 5);
    assert_eq!(get(proxy.outbound, "lim", "/").await.status, 429);

    // Other settings of both services change; the breaker and the bucket do not.
    reload(&proxy, &policy(1, 5, "6s"), 2).await;
    assert!(circuit_open(&get(proxy.outbound, "brk", "/").await));
    assert_eq!(broken.hits(), 1, "the open breaker was reset by the reload");
    let mut admitted = 0;
    for _ in 0..5 {
        admitted += usize::from(get(proxy.outbound, "lim", "/").await.status == 200);
    }
    // A fresh bucket would admit all five; the kept one only what refilled since it drained.
    let refilled = drained_at.elapsed().as_secs() as usize;
    assert!(refilled < 4, "too slow to tell: {refilled} s");
    assert!(
        admitted <= refilled + 1,
        "{admitted} admitted after {refilled} s"
    );

    // Changed settings start fresh: a closed breaker, a full bucket.
    reload(&proxy, &policy(2, 4, "6s"), 3).await;
    assert!(!circuit_open(&get(proxy.outbound, "brk", "/").await));
    assert_eq!(broken.hits(), 2);
    let mut admitted = 0;
    for _ in 0..4 {
        admitted += usize::from(get(proxy.outbound, "lim", "/").await.status == 200);
    }
    assert_eq!(admitted, 4);
}
