//! The Grafana dashboard (`deploy/grafana/outrider.json`) against a real Prometheus scraping
//! two real proxies and the real control plane under traffic (retries, a rate-limited request,
//! a breaker opening, a policy push, a rejected apply, certificates): every panel's every query,
//! with the dashboard's variables substituted, must return data, and the panels that show
//! activity must show some.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use outrider_e2e::control::{start_control, Control, ControlDirs};
use outrider_e2e::prometheus::{value, Prometheus};
use outrider_e2e::{full, get, start_proxy, Proto, Proxy, Upstream};

const DASHBOARD: &str = include_str!("../../deploy/grafana/outrider.json");

/// What a query must show beyond returning data.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Some sample above zero: the activity the test drove.
    Positive,
    /// Some finite sample (a quantile over observations made in the window).
    Finite,
}

/// Panels (title, target refId) that the traffic below must move.
const EXPECTED: &[(&str, &str, Expect)] = &[
    ("Request rate by service", "A", Expect::Positive),
    ("Success rate by service", "A", Expect::Positive),
    (
        "Latency by service and route (p50, p90, p99)",
        "C",
        Expect::Finite,
    ),
    (
        "Responses by flag: proxy-made vs upstream",
        "A",
        Expect::Positive,
    ),
    (
        "Responses by flag: proxy-made vs upstream",
        "B",
        Expect::Positive,
    ),
    (
        "Retries: retried requests by outcome, and attempts",
        "A",
        Expect::Positive,
    ),
    (
        "Retries: retried requests by outcome, and attempts",
        "B",
        Expect::Positive,
    ),
    ("Rate-limited requests (429)", "A", Expect::Positive),
    ("Circuit breakers not closed", "A", Expect::Positive),
    ("Circuit breaker transitions", "A", Expect::Positive),
    ("Proxies by state", "A", Expect::Positive),
    ("Push latency (commit to ACK)", "B", Expect::Finite),
    ("Changes by result", "A", Expect::Positive),
    ("Rejections by reason", "A", Expect::Positive),
    ("ACKs and NACKs", "A", Expect::Positive),
    (
        "State directory latency (p99) and health",
        "A",
        Expect::Finite,
    ),
    ("Workload certificate expires in", "A", Expect::Positive),
    ("Mesh CA expires in", "A", Expect::Positive),
    ("Certificates issued and refused", "A", Expect::Positive),
];

/// A panel's query as Prometheus evaluates it: Grafana's variables replaced by what "All"
/// and a 1 s scrape interval give.
fn substitute(expr: &str) -> String {
    let expr = expr
        .replace("${service}", ".*")
        .replace("$service", ".*")
        .replace("${workload}", ".*")
        .replace("$workload", ".*")
        .replace("$__rate_interval", "5m");
    assert!(!expr.contains('$'), "unsubstituted variable in {expr}");
    expr
}

/// (panel title, refId, query) of every panel target, rows' nested panels included.
fn panel_queries(dashboard: &serde_json::Value) -> Vec<(String, String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push((
                    panel["title"].as_str().unwrap().to_string(),
                    target["refId"].as_str().unwrap().to_string(),
                    target["expr"].as_str().unwrap().to_string(),
                ));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn start_meshed(control: &Control, dirs: &ControlDirs, workload: &str) -> Proxy {
    control.spawn_meshed_proxy(dirs, workload, "shop", workload, &[])
}

/// Polls until the PromQL `query` returns a sample equal to `expected`.
async fn until_value(prometheus: &Prometheus, query: &str, expected: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let result = prometheus.query(query).await;
        if result.iter().any(|s| value(s) == expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query} never gave {expected}: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the proxy's admin `/config` until it holds `needle`.
async fn until_policy(proxy: &Proxy, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, config) = proxy.admin_get("/config").await;
        if config.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy with {needle} never arrived: {config}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_has_data_from_a_real_prometheus() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let queries = panel_queries(&dashboard);
    for (title, ref_id, _) in EXPECTED {
        assert!(
            queries.iter().any(|(t, r, _)| t == title && r == ref_id),
            "no panel {title:?} with target {ref_id}"
        );
    }

    let ok = Upstream::echo(Proto::Http1, "ok").await;
    // Every other request fails: each first attempt 503, its retry 200.
    let flaky_hits = Arc::new(AtomicUsize::new(0));
    let flaky = Upstream::start(Proto::Http1, move |_req| {
        let hits = Arc::clone(&flaky_hits);
        async move {
            let mut res = Response::new(full("flaky"));
            if hits.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            res
        }
    })
    .await;
    let broken = Upstream::start(Proto::Http1, |_req| async {
        let mut res = Response::new(full("down"));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        res
    })
    .await;

    let dirs = ControlDirs::new();
    let control = start_control(&dirs);
    let Some(prometheus) = Prometheus::start(&[("outrider-control", control.addr)]).await else {
        return;
    };
    // Scraped before anything happens, so every counter's first move is a rate.
    until_value(&prometheus, "up{job=\"outrider-control\"}", 1.0).await;

    let checkout = start_meshed(&control, &dirs, "checkout");
    let payments = start_meshed(&control, &dirs, "payments");
    prometheus.add_targets("outrider-proxy", &[checkout.admin, payments.admin]);
    until_value(&prometheus, "sum(up{job=\"outrider-proxy\"})", 2.0).await;

    // Policy pushed to the running fleet (its push latency measured), and a rejected apply.
    let checkout_doc = format!(
        "workload: checkout
services:
  ok: {{ endpoints: [{ok}] }}
  flaky:
    endpoints: [{flaky}]
    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }} }}
  limited:
    endpoints: [{ok}]
    rate_limit: {{ requests_per_second: 1, burst: 1 }}
  broken:
    endpoints: [{broken}]
    circuit_breaker: {{ consecutive_failures: 2, open_for: 1m }}
routes:
  - {{ name: ok, match: {{ authority: ok }}, service: ok }}
  - {{ name: flaky, match: {{ authority: flaky }}, service: flaky }}
  - {{ name: limited, match: {{ authority: limited }}, service: limited }}
  - {{ name: broken, match: {{ authority: broken }}, service: broken }}
",
        ok = ok.addr,
        flaky = flaky.addr,
        broken = broken.addr
    );
    let payments_doc = format!(
        "workload: payments\nservices:\n  ledger: {{ endpoints: [{}] }}\nroutes:\n  - {{ name: ledger, match: {{ authority: ledger }}, service: ledger }}\n",
        ok.addr
    );
    for (name, doc) in [("checkout", &checkout_doc), ("payments", &payments_doc)] {
        let reply = control
            .request("POST", &format!("/v1/apply?name={name}"), doc)
            .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let reply = control
        .request(
            "POST",
            "/v1/apply?name=typo",
            "workload: checkout\nroutes:\n  - { match: { authority: ok }, service: okk }\n",
        )
        .await;
    assert_eq!(reply.status, 422);
    until_policy(&checkout, "broken").await;
    until_policy(&payments, "ledger").await;

    // One request per service first, scraped before the rest: a request counter series is
    // born with its first request, and a rate needs a sample from before the increase.
    assert_eq!(get(checkout.outbound, "ok", "/").await.status, 200);
    assert_eq!(get(payments.outbound, "ledger", "/").await.status, 200);
    assert_eq!(get(checkout.outbound, "flaky", "/").await.status, 200);
    assert_eq!(get(checkout.outbound, "limited", "/").await.status, 200);
    assert_eq!(get(checkout.outbound, "broken", "/").await.status, 500);
    // And one the proxy answers itself (no route): its series too.
    assert_eq!(get(checkout.outbound, "nowhere", "/").await.status, 404);
    until_value(
        &prometheus,
        "sum(outrider_requests_total{service=~\"ok|ledger|flaky|limited|broken|:unrouted\"})",
        6.0,
    )
    .await;
    // Traffic: plain requests, retried ones, one over a rate limit, a breaker opening.
    for i in 0..20 {
        assert_eq!(
            get(checkout.outbound, "ok", &format!("/{i}")).await.status,
            200
        );
        assert_eq!(get(payments.outbound, "ledger", "/").await.status, 200);
    }
    for _ in 0..5 {
        let reply = get(checkout.outbound, "flaky", "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-outrider-attempts"), Some("2"));
    }
    let limited: Vec<u16> = futures_join(&checkout, "limited", 3).await;
    assert!(limited.contains(&429), "{limited:?}");
    for expected in [500, 503] {
        assert_eq!(get(checkout.outbound, "broken", "/").await.status, expected);
    }
    assert_eq!(get(checkout.outbound, "nowhere", "/").await.status, 404);

    // Every query returns data once Prometheus has scraped it (1 s interval). A query that
    // has shown its data counts as shown: on a loaded machine one round of queries can take
    // long enough for early activity to leave a later round's window.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut shown_once = std::collections::BTreeSet::new();
    loop {
        let mut missing = Vec::new();
        for (i, (title, ref_id, expr)) in queries.iter().enumerate() {
            if shown_once.contains(&i) {
                continue;
            }
            let promql = substitute(expr);
            let result = prometheus.query(&promql).await;
            let expect = EXPECTED
                .iter()
                .find(|(t, r, _)| t == title && r == ref_id)
                .map(|(_, _, e)| *e);
            let shown = match expect {
                None => !result.is_empty(),
                Some(Expect::Positive) => result.iter().any(|s| value(s) > 0.0),
                Some(Expect::Finite) => result.iter().any(|s| value(s).is_finite()),
            };
            if shown {
                shown_once.insert(i);
            } else {
                missing.push(format!(
                    "{title} [{ref_id}] {expect:?}: {promql} -> {result:?}"
                ));
            }
        }
        // The variables' own queries (Grafana's label_values(metric, label)).
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let Some(definition) = variable["definition"].as_str() else {
                continue;
            };
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap();
            let (metric, label) = inner.split_once(", ").unwrap();
            let promql = format!("count by ({label}) ({metric})");
            if prometheus.query(&promql).await.is_empty() {
                missing.push(format!("variable {}: {promql}", variable["name"]));
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "panels without data after 60 s:\n{}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{} panel queries checked against Prometheus", queries.len());
}

/// The dashboard panel `title`'s query `ref_id`, substituted.
fn panel_query(dashboard: &serde_json::Value, title: &str, ref_id: &str) -> String {
    let (_, _, expr) = panel_queries(dashboard)
        .into_iter()
        .find(|(t, r, _)| t == title && r == ref_id)
        .unwrap();
    substitute(&expr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_leaves_cancelled_calls_out_and_flags_tell_who_answered() {
    // `/ok` 200, `/bad` the upstream's own 502, `/hang` never answered (the caller gives up).
    let upstream = Upstream::start(
        Proto::Http1,
        |req: http::Request<hyper::body::Incoming>| async move {
            match req.uri().path() {
                "/hang" => std::future::pending().await,
                "/bad" => {
                    let mut res = Response::new(full("bad"));
                    *res.status_mut() = StatusCode::BAD_GATEWAY;
                    res
                }
                _ => Response::new(full("ok")),
            }
        },
    )
    .await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\n  down: {{ endpoints: [{dead}] }}\nroutes:\n  - {{ name: r, match: {{ authority: svc }}, service: svc }}\n  - {{ name: d, match: {{ authority: down }}, service: down }}\n",
        upstream.addr
    ));
    let Some(prometheus) = Prometheus::start(&[("outrider-proxy", proxy.admin)]).await else {
        return;
    };
    until_value(&prometheus, "up{job=\"outrider-proxy\"}", 1.0).await;
    // Rounds of one success, one failure and one cancelled call: equal counts, so equal
    // rates, and a success rate of exactly 1/2 with cancelled calls left out (2/3 were they
    // successes, 1/3 failures).
    let round = || async {
        assert_eq!(get(proxy.outbound, "svc", "/ok").await.status, 200);
        assert_eq!(get(proxy.outbound, "svc", "/bad").await.status, 502);
        let hits = upstream.hits();
        let mut caller = tokio::net::TcpStream::connect(proxy.outbound)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut caller,
            b"GET /hang HTTP/1.1\r\nhost: svc\r\n\r\n",
        )
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while upstream.hits() == hits {
            assert!(
                tokio::time::Instant::now() < deadline,
                "/hang never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(caller);
    };
    round().await;
    assert_eq!(get(proxy.outbound, "down", "/").await.status, 502);
    // All three series born in one scrape, before the rest of the traffic.
    until_value(
        &prometheus,
        "count(outrider_requests_total{service=\"svc\"} == 1)",
        3.0,
    )
    .await;
    for _ in 0..2 {
        round().await;
    }
    assert_eq!(get(proxy.outbound, "down", "/").await.status, 502);
    until_value(
        &prometheus,
        "outrider_requests_total{service=\"down\"}",
        2.0,
    )
    .await;
    until_value(
        &prometheus,
        "count(outrider_requests_total{service=\"svc\"} == 3)",
        3.0,
    )
    .await;
    let by_labels = |result: &[serde_json::Value], label: &str, value: &str| {
        result
            .iter()
            .find(|s| s["metric"][label] == value)
            .map(outrider_e2e::prometheus::value)
    };

    let success = prometheus
        .query(&panel_query(&dashboard(), "Success rate by service", "A"))
        .await;
    let rate = by_labels(&success, "service", "svc").unwrap();
    assert!(
        (rate - 0.5).abs() < 1e-9,
        "success rate {rate}: {success:?}"
    );

    let title = "Responses by flag: proxy-made vs upstream";
    let proxy_made = prometheus
        .query(&panel_query(&dashboard(), title, "A"))
        .await;
    for flag in ["DC", "UF"] {
        assert!(
            by_labels(&proxy_made, "flags", flag).is_some_and(|v| v > 0.0),
            "{flag}: {proxy_made:?}"
        );
    }
    assert!(
        !proxy_made.iter().any(|s| s["metric"]["flags"] == "-"),
        "{proxy_made:?}"
    );
    let from_upstream = prometheus
        .query(&panel_query(&dashboard(), title, "B"))
        .await;
    assert!(
        by_labels(&from_upstream, "service", "svc").is_some_and(|v| v > 0.0),
        "{from_upstream:?}"
    );
    assert!(
        by_labels(&from_upstream, "service", "down").is_none(),
        "the dead service's 502s are the proxy's: {from_upstream:?}"
    );
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(DASHBOARD).unwrap()
}

/// `n` concurrent GETs to `host` through the proxy's outbound port: their statuses.
async fn futures_join(proxy: &Proxy, host: &'static str, n: usize) -> Vec<u16> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let addr = proxy.outbound;
        tasks.spawn(async move { get(addr, host, "/").await.status });
    }
    let mut statuses = Vec::new();
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.unwrap());
    }
    statuses
}
