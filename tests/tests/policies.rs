//! Protective policies end to end, through the real binary against real upstreams: rate limits
//! (service, route, inbound, shadow mode), circuit breakers and concurrency limits, outlier
//! ejection and fault injection. Upstream hit counters prove what never reached the upstream.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use http::Request;
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
    // on, tokens come back at +500 ms and +1000 ms, so a 1250 ms run admits BURST + 2. The
    // 250 ms margins either side of the refill instants absorb scheduling jitter.
    const WINDOW: Duration = Duration::from_millis(1250);
    let upstream = Upstream::echo(Proto::Http1, "svc").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    rate_limit: {{ requests_per_second: 2, burst: {BURST} }}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n",
        upstream.addr
    ));
    let started = Instant::now();
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
    assert_eq!(ok, BURST + 2, "admitted");
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
