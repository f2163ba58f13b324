//! Who made a response, in metrics, the access log and spans (the `flags` label, Envoy's
//! response flags as the model): a 502 the upstream sent and one the proxy made land in
//! different series. And the series lifecycle: a service and an endpoint that left the policy
//! leave `/metrics` once their requests and connections drained, and endpoint labels stay
//! within `--metrics-endpoint-cap`. Real binaries, real upstreams on 127.0.0.1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use outrider_e2e::*;

const STEP: Duration = Duration::from_secs(10);

/// `outrider_requests_total` of GET requests to `service` through `route` answered `code`
/// with `flag`.
fn requests(code: &str, flag: &str, route: &str, service: &str) -> String {
    let class = format!("{}xx", &code[..1]);
    format!("outrider_requests_total{{code=\"{code}\",direction=\"outbound\",flags=\"{flag}\",method=\"GET\",route=\"{route}\",service=\"{service}\",status_class=\"{class}\"}}")
}

/// Polls the scrape until `series` has `expected` (counted when a response body ends, which
/// can be just after the client has read it); the last value seen.
async fn settled(proxy: &Proxy, series: &str, expected: f64) -> f64 {
    let mut value = proxy.metric(series).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while value != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        value = proxy.metric(series).await;
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_from_the_proxy_and_one_from_the_upstream_land_in_different_series() {
    let upstream = Upstream::start(Proto::Http1, |_req: Request<Incoming>| async move {
        let mut res = http::Response::new(full("the upstream's own 502"));
        *res.status_mut() = http::StatusCode::BAD_GATEWAY;
        res
    })
    .await;
    let addr = upstream.addr;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{addr}] }}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n  - name: faulty\n    match: {{ authority: faulty }}\n    service: svc\n    fault: {{ abort: {{ status: 502, percent: 100 }} }}\naccess_log: json\n"
    ));

    let from_upstream = get(proxy.outbound, "svc", "/upstream").await;
    assert_eq!(from_upstream.status, 502);
    assert_eq!(from_upstream.header("x-outrider-error"), None);
    let injected = get(proxy.outbound, "faulty", "/fault").await;
    assert_eq!(injected.status, 502);
    assert_eq!(injected.header("x-outrider-error"), Some("fault injected"));
    upstream.kill().await;
    let refused = get(proxy.outbound, "svc", "/refused").await;
    assert_eq!(refused.status, 502);
    assert!(
        refused
            .header("x-outrider-error")
            .is_some_and(|e| e.starts_with("connect refused")),
        "{:?}",
        refused.headers
    );
    assert_eq!(get(proxy.outbound, "nowhere", "/nowhere").await.status, 404);

    // Same route, same code: two series, told apart by the flag.
    for (flag, route) in [("-", "r"), ("UF", "r"), ("FI", "faulty")] {
        assert_eq!(
            settled(&proxy, &requests("502", flag, route, "svc"), 1.0).await,
            1.0,
            "502 with flag {flag} on route {route}"
        );
    }
    assert_eq!(
        settled(
            &proxy,
            &requests("404", "NR", ":unrouted", ":unrouted"),
            1.0
        )
        .await,
        1.0
    );
    let duration = |flag: &str| {
        format!("outrider_response_duration_seconds_count{{direction=\"outbound\",flags=\"{flag}\",route=\"r\",service=\"svc\"}}")
    };
    assert_eq!(proxy.metric(&duration("-")).await, 1.0);
    assert_eq!(proxy.metric(&duration("UF")).await, 1.0);

    // The access log says the same, line by line.
    assert!(
        eventually(STEP, || proxy.stdout_lines().len() >= 4).await,
        "{:?}",
        proxy.stdout_lines()
    );
    let lines: Vec<serde_json::Value> = proxy
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let flag_of = |path: &str| {
        let line = lines.iter().find(|l| l["path"] == path).unwrap();
        line["response_flags"].as_str().unwrap().to_string()
    };
    assert_eq!(flag_of("/upstream"), "-");
    assert_eq!(flag_of("/fault"), "FI");
    assert_eq!(flag_of("/refused"), "UF");
    assert_eq!(flag_of("/nowhere"), "NR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_service_and_endpoint_leave_metrics_once_drained_and_the_rest_stay() {
    // `held` answers only when released, so a request to the removed service is in flight
    // across the reload.
    let release = Arc::new(tokio::sync::Notify::new());
    let waiting = Arc::clone(&release);
    let held = Upstream::start(Proto::Http1, move |_req: Request<Incoming>| {
        let waiting = Arc::clone(&waiting);
        async move {
            waiting.notified().await;
            http::Response::new(full("late"))
        }
    })
    .await;
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let kept_route = "  - name: k\n    match: { authority: kept }\n    service: kept\n";
    let proxy = start_proxy(&format!(
        "services:\n  kept: {{ endpoints: [{}, {}] }}\n  gone:\n    endpoints: [{}]\n    circuit_breaker: {{ consecutive_failures: 5, open_for: 1m }}\nroutes:\n{kept_route}  - name: g\n    match: {{ authority: gone }}\n    service: gone\n",
        a.addr, b.addr, held.addr
    ));
    // Round robin: one request to each endpoint of `kept`.
    for _ in 0..2 {
        assert_eq!(get(proxy.outbound, "kept", "/").await.status, 200);
    }
    let outbound = proxy.outbound;
    let in_flight = tokio::spawn(async move { get(outbound, "gone", "/").await });
    let opened = |addr: std::net::SocketAddr, service: &str| {
        format!("outrider_upstream_connections_opened_total{{endpoint=\"{addr}\",service=\"{service}\"}}")
    };
    assert_eq!(settled(&proxy, &opened(held.addr, "gone"), 1.0).await, 1.0);
    for endpoint in [a.addr, b.addr] {
        assert_eq!(proxy.metric(&opened(endpoint, "kept")).await, 1.0);
    }
    let (_, text) = proxy.admin_get("/metrics").await;
    assert!(
        text.contains("outrider_circuit_breaker_state{service=\"gone\",state=\"closed\"} 1"),
        "{text}"
    );

    // Service `gone` leaves the policy; `kept` loses endpoint b.
    save(
        &proxy.policy_path(),
        &format!(
            "services:\n  kept: {{ endpoints: [{}] }}\nroutes:\n{kept_route}",
            a.addr
        ),
    );
    assert_eq!(settled(&proxy, "outrider_policy_version", 2.0).await, 2.0);
    let mentions = |text: &str, what: &str| text.lines().any(|l| l.contains(what));
    let b_label = format!("endpoint=\"{}\"", b.addr);
    let metrics_text = || async { proxy.admin_get("/metrics").await.1 };
    let mut text = metrics_text().await;
    let deadline = tokio::time::Instant::now() + STEP;
    while mentions(&text, &b_label) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = metrics_text().await;
    }
    assert!(
        !mentions(&text, &b_label),
        "series of the removed endpoint remain:\n{text}"
    );
    // Still in flight on `gone`: its series stay until it ends.
    assert!(mentions(&text, "service=\"gone\""), "{text}");
    assert_eq!(proxy.metric(&opened(held.addr, "gone")).await, 1.0);

    release.notify_one();
    assert_eq!(in_flight.await.unwrap().status, 200);
    let deadline = tokio::time::Instant::now() + STEP;
    while mentions(&text, "service=\"gone\"") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = metrics_text().await;
    }
    assert!(
        !mentions(&text, "service=\"gone\""),
        "series of the removed service remain:\n{text}"
    );
    // What stayed keeps its series and counts.
    assert_eq!(proxy.metric(&opened(a.addr, "kept")).await, 1.0);
    assert_eq!(proxy.metric(&requests("200", "-", "k", "kept")).await, 2.0);
    assert_eq!(get(proxy.outbound, "kept", "/").await.status, 200);
    assert_eq!(
        settled(&proxy, &requests("200", "-", "k", "kept"), 3.0).await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_past_the_cap_are_counted_as_other() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let c = Upstream::echo(Proto::Http1, "c").await;
    let proxy = start_proxy_with(
        &format!(
            "services:\n  svc: {{ endpoints: [{}, {}, {}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
            a.addr, b.addr, c.addr
        ),
        &["--metrics-endpoint-cap", "1"],
    );
    for _ in 0..3 {
        assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (1, 1, 1));
    let opened = |endpoint: &str| {
        format!(
            "outrider_upstream_connections_opened_total{{endpoint=\"{endpoint}\",service=\"svc\"}}"
        )
    };
    assert_eq!(proxy.metric(&opened(&a.addr.to_string())).await, 1.0);
    assert_eq!(proxy.metric(&opened("other")).await, 2.0);
    let (_, text) = proxy.admin_get("/metrics").await;
    for past_the_cap in [b.addr, c.addr] {
        assert!(!text.contains(&past_the_cap.to_string()), "{text}");
    }
}

/// Saves `text` the way editors do: a new file renamed over the old one.
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
