//! Per-route visibility, end to end: the real control plane, a real proxy subscribed to it and
//! real upstreams on 127.0.0.1. `outriderctl get WORKLOAD --routes` prints the route table in
//! the order the proxy tries it, and crafted requests show the proxy picks routes in exactly
//! that order; every decision is counted by route and match, filter decisions by route, and a
//! route's series leave the proxy's metrics when the route leaves the policy.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use http::Request;
use outrider_e2e::control::{start_control, ControlDirs};
use outrider_e2e::*;
use tokio::time::timeout;

/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);

/// The routes, written in an order unrelated to their precedence; each sends to the service
/// named after it. Expected order (Gateway API precedence): exact, regex, long-prefix,
/// prefix-post, prefix-two-headers, prefix-header, prefix-query, prefix, host-any,
/// hostless-header, hostless.
const ROUTES: &str = "routes:
  - { name: hostless, service: hostless, match: { path: { prefix: / } } }
  - { name: prefix, service: prefix, match: { authority: shop, path: { prefix: /api } } }
  - name: host-any
    service: host-any
    match: { authority: shop }
    filters:
      - request_header_modifier: { set: { x-seen-by: host-any } }
  - { name: prefix-query, service: prefix-query, match: { authority: shop, path: { prefix: /api }, query_params: [{ name: v, present: true }] } }
  - { name: hostless-header, service: hostless-header, match: { headers: [{ name: x-a, present: true }] } }
  - { name: prefix-header, service: prefix-header, match: { authority: shop, path: { prefix: /api }, headers: [{ name: x-a, present: true }] } }
  - { name: long-prefix, service: long-prefix, match: { authority: shop, path: { prefix: /api/v1/users } } }
  - { name: prefix-two-headers, service: prefix-two-headers, match: { authority: shop, path: { prefix: /api }, headers: [{ name: x-a, present: true }, { name: x-b, present: true }] } }
  - name: regex
    service: regex
    matches:
      - { authority: never.example }
      - { authority: shop, path: { regex: '/api/v[0-9]+/users/[0-9]+' } }
  - { name: prefix-post, service: prefix-post, match: { authority: shop, path: { prefix: /api }, method: POST } }
  - { name: exact, service: exact, match: { authority: shop, path: { exact: /api/v1/users/7 } } }
";

/// The route names in precedence order.
const ORDER: [&str; 11] = [
    "exact",
    "regex",
    "long-prefix",
    "prefix-post",
    "prefix-two-headers",
    "prefix-header",
    "prefix-query",
    "prefix",
    "host-any",
    "hostless-header",
    "hostless",
];

/// A request: host, method, path, headers.
type Crafted<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

/// Requests, the k-th meeting every entry of the table from the k-th on and none before it:
/// the proxy must answer each with the k-th route.
const PEELED: [Crafted; 11] = [
    (
        "shop",
        "POST",
        "/api/v1/users/7?v=1",
        &[("x-a", "1"), ("x-b", "1")],
    ),
    (
        "shop",
        "POST",
        "/api/v1/users/8?v=1",
        &[("x-a", "1"), ("x-b", "1")],
    ),
    (
        "shop",
        "POST",
        "/api/v1/users?v=1",
        &[("x-a", "1"), ("x-b", "1")],
    ),
    ("shop", "POST", "/api/v2?v=1", &[("x-a", "1"), ("x-b", "1")]),
    ("shop", "GET", "/api/v2?v=1", &[("x-a", "1"), ("x-b", "1")]),
    ("shop", "GET", "/api/v2?v=1", &[("x-a", "1")]),
    ("shop", "GET", "/api/v2?v=1", &[]),
    ("shop", "GET", "/api/v2", &[]),
    ("shop", "GET", "/other", &[("x-a", "1")]),
    ("elsewhere", "GET", "/other", &[("x-a", "1")]),
    ("elsewhere", "GET", "/other", &[]),
];

async fn served_by(proxy: &Proxy, (host, method, path, headers): Crafted<'_>) -> serde_json::Value {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.outbound))
        .header("host", host);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let reply = timeout(STEP, send(&http1_client(), req.body(empty()).unwrap()))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{host} {method} {path} {headers:?}");
    reply.json()
}

/// `(route, match)` of each entry `outriderctl get checkout --routes` prints, in order.
fn printed_order(control: &outrider_e2e::control::Control) -> (Vec<(String, String)>, String) {
    let out = control.ctl(&["get", "checkout", "--routes"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = text
        .lines()
        .filter_map(|line| {
            let (position, rest) = line.trim_start().split_once("  ")?;
            position.parse::<usize>().ok()?;
            let (route, rest) = rest.split_once(" match ")?;
            let (index, _) = rest.split_once(':')?;
            Some((route.to_string(), index.to_string()))
        })
        .collect();
    (entries, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_route_table_is_the_order_the_proxy_picks_routes_in() {
    let mut servers = Vec::new();
    let mut services = String::from("workload: \"*\"\nservices:\n");
    for name in ORDER {
        let server = Upstream::echo(Proto::Http1, name).await;
        services.push_str(&format!("  {name}: {{ endpoints: [{}] }}\n", server.addr));
        servers.push(server);
    }
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &format!("{services}{ROUTES}"));
    let control = start_control(&dirs);
    let proxy = spawn_proxy(TempDir::new(), &control.proxy_flags(&dirs, "checkout"));
    let version = control.status().await["version"].as_u64().unwrap();
    let started = Instant::now();
    while !proxy
        .admin_get("/ready")
        .await
        .1
        .contains(&format!("version={version}"))
    {
        assert!(started.elapsed() < STEP, "{:?}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (printed, text) = printed_order(&control);
    let names: Vec<&str> = printed.iter().map(|(route, _)| route.as_str()).collect();
    // `regex` shows twice: its `never.example` match (an authority, no path: ranked with
    // `host-any`, written later, so after it) and its regex match.
    let expected: Vec<&str> = ORDER[..9]
        .iter()
        .copied()
        .chain(["regex"])
        .chain(ORDER[9..].iter().copied())
        .collect();
    assert_eq!(names, expected, "{text}");
    assert_eq!(printed[1], ("regex".to_string(), "1".to_string()), "{text}");
    assert!(
        text.contains("  9  host-any match 0: authority shop\n     -> host-any 100% (no retries)\n     filters: request_header_modifier {\"set\":{\"x-seen-by\":\"host-any\"}}\n"),
        "{text}"
    );

    // The proxy agrees: each request meets its entry and every later one, and the printed
    // entry answers it.
    for (request, route) in PEELED.into_iter().zip(ORDER) {
        let reply = served_by(&proxy, request).await;
        assert_eq!(reply["server"], route, "{request:?}\n{text}");
        let modified = reply["headers"]["x-seen-by"].as_str();
        assert_eq!(modified == Some("host-any"), route == "host-any", "{reply}");
    }
    for route in ORDER {
        let index = if route == "regex" { 1 } else { 0 };
        let series =
            format!("outrider_route_decisions_total{{match=\"{index}\",route=\"{route}\"}}");
        assert_eq!(proxy.metric(&series).await, 1.0, "{series}");
    }
    let applied = "outrider_route_filter_decisions_total{decision=\"applied\",filter=\"request_header_modifier\",route=\"host-any\"}";
    assert_eq!(proxy.metric(applied).await, 1.0);

    // `exact` and `host-any` leave the policy: their series leave the proxy's metrics.
    let fewer: String = ROUTES
        .split("\n  - ")
        .filter(|route| !route.contains("name: exact") && !route.contains("name: host-any"))
        .collect::<Vec<_>>()
        .join("\n  - ");
    dirs.write("defaults.yaml", &format!("{services}{fewer}"));
    let started = Instant::now();
    loop {
        let (_, metrics) = proxy.admin_get("/metrics").await;
        let gone = !metrics.contains("route=\"exact\"") && !metrics.contains("route=\"host-any\"");
        if gone {
            assert!(
                metrics.contains("outrider_route_decisions_total{match=\"0\",route=\"prefix\"} 1"),
                "the routes that stay keep their counts"
            );
            break;
        }
        assert!(started.elapsed() < STEP, "series stayed:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (printed, text) = printed_order(&control);
    assert!(
        printed.iter().all(|(r, _)| r != "exact" && r != "host-any") && printed.len() == 10,
        "{text}"
    );
    drop(servers);
}
