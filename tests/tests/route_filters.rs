//! Route filters with Gateway API's HTTPRoute semantics through the real proxy binary against
//! real upstreams on 127.0.0.1: header modifiers as the upstream and the caller see them (and
//! not on the proxy's own error responses), URL rewrites of path and host over HTTP/1.1 and
//! HTTP/2 upstreams, redirects answered by the proxy over HTTP/1.1 and HTTP/2 and counted per
//! route, and bad filters refused with their line and column.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use outrider_e2e::*;
use tokio::time::timeout;

/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);

/// An upstream that answers with every value of every request header (`name -> [values]`), its
/// path and URI, and sends back headers of its own for the response modifier to change.
async fn header_echo() -> Upstream {
    Upstream::start(
        Proto::Http1,
        |req: Request<hyper::body::Incoming>| async move {
            let (parts, body) = req.into_parts();
            let _ = body.collect().await;
            let mut headers = serde_json::Map::new();
            for name in parts.headers.keys() {
                let values: Vec<serde_json::Value> = parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap().into())
                    .collect();
                headers.insert(name.as_str().to_string(), values.into());
            }
            let json = serde_json::json!({ "path": parts.uri.path(), "headers": headers });
            Response::builder()
                .header("x-internal", "secret")
                .header("x-tag", "up")
                .body(full(json.to_string()))
                .unwrap()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers_change_what_the_upstream_and_the_caller_see() {
    let up = header_echo().await;
    let policy = format!(
        "services:
  up: {{ endpoints: [{up}] }}
  gone: {{ endpoints: [127.0.0.1:1] }}
routes:
  - name: shop
    matches: [{{ authority: shop }}]
    service: up
    filters:
      - request_header_modifier:
          set: {{ X-Env: canary }}
          add: {{ x-tag: b }}
          remove: [X-Debug]
      - response_header_modifier:
          set: {{ x-served-by: outrider }}
          add: {{ X-Tag: proxy }}
          remove: [x-internal]
  - name: gone
    matches: [{{ authority: gone }}]
    service: gone
    filters:
      - response_header_modifier: {{ set: {{ x-served-by: outrider }} }}
",
        up = up.addr
    );
    let proxy = start_proxy(&policy);
    let req = Request::get(format!("http://{}/items", proxy.outbound))
        .header("host", "shop")
        .header("x-env", "prod")
        .header("x-env", "staging")
        .header("x-tag", "a")
        .header("x-debug", "1")
        .body(empty())
        .unwrap();
    let reply = timeout(STEP, send(&http1_client(), req)).await.unwrap();
    assert_eq!(reply.status, 200);
    let seen = &reply.json()["headers"];
    // Set replaces every value, add appends, remove drops; names without case.
    assert_eq!(seen["x-env"], serde_json::json!(["canary"]), "{seen}");
    assert_eq!(seen["x-tag"], serde_json::json!(["a", "b"]), "{seen}");
    assert!(seen.get("x-debug").is_none(), "{seen}");
    // The proxy's own forwarding headers are still there.
    assert!(seen.get("x-request-id").is_some(), "{seen}");
    let values = |name: &str| -> Vec<&str> {
        reply
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(values("x-served-by"), ["outrider"]);
    assert_eq!(values("x-tag"), ["up", "proxy"]);
    assert!(values("x-internal").is_empty());

    // A response the proxy made (nothing listens at the endpoint) is not the upstream's: the
    // route's response headers are not added to it.
    let reply = timeout(STEP, get(proxy.outbound, "gone", "/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 502, "{:?}", reply.headers);
    assert!(reply.header("x-outrider-error").is_some());
    assert_eq!(reply.header("x-served-by"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_rewrites_change_the_path_and_host_the_upstream_sees() {
    let h1 = Upstream::echo(Proto::Http1, "h1").await;
    let h2 = Upstream::echo(Proto::Http2, "h2").await;
    let policy = format!(
        "services:
  h1: {{ endpoints: [{h1}] }}
  h2: {{ endpoints: [{h2}], protocol: http2 }}
routes:
  - matches: [{{ authority: shop, path: {{ prefix: /v1/ }} }}, {{ authority: shop, path: {{ prefix: /legacy }} }}]
    service: h1
    filters:
      - url_rewrite: {{ hostname: internal.example, path: {{ replace_prefix_match: /api/v2 }} }}
  - matches: [{{ authority: shop, path: {{ exact: /old }} }}]
    service: h2
    filters:
      - url_rewrite: {{ hostname: h2.internal, path: {{ replace_full_path: /new }} }}
  - matches: [{{ authority: shop, path: {{ prefix: /keep }} }}]
    service: h1
    filters:
      - url_rewrite: {{ path: {{ replace_prefix_match: '' }} }}
",
        h1 = h1.addr,
        h2 = h2.addr
    );
    let proxy = start_proxy(&policy);
    // (request path, upstream, path it sees, its URI)
    let cases = [
        (
            "/v1/items?page=2",
            "h1",
            "/api/v2/items",
            "/api/v2/items?page=2",
        ),
        ("/v1", "h1", "/api/v2", "/api/v2"),
        ("/v1/", "h1", "/api/v2/", "/api/v2/"),
        // Each match replaces its own prefix.
        ("/legacy/a/b", "h1", "/api/v2/a/b", "/api/v2/a/b"),
        ("/keep/x", "h1", "/x", "/x"),
        ("/keep", "h1", "/", "/"),
        ("/old?x=1", "h2", "/new", "http://h2.internal/new?x=1"),
    ];
    for (path, server, seen_path, seen_uri) in cases {
        let reply = timeout(STEP, get(proxy.outbound, "shop", path))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{path}");
        let json = reply.json();
        assert_eq!(json["server"], server, "{path}");
        assert_eq!(json["path"], seen_path, "{path}");
        assert_eq!(json["uri"], seen_uri, "{path}");
        if server == "h1" {
            // HTTP/1.1: the new authority is the Host header.
            let host = &json["headers"]["host"];
            let expected = if path.starts_with("/keep") {
                "shop"
            } else {
                "internal.example"
            };
            assert_eq!(host, expected, "{path}");
        } else {
            // HTTP/2: in :authority (the URI), and no Host header.
            assert!(json["headers"].get("host").is_none(), "{json}");
        }
    }
    // An HTTP/2 caller's :authority is rewritten too.
    let req = Request::get("http://shop/v1/x").body(empty()).unwrap();
    let reply = timeout(STEP, send_h2_via(proxy.outbound, req))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let json = reply.json();
    assert_eq!(json["path"], "/api/v2/x");
    assert_eq!(json["headers"]["host"], "internal.example", "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_answered_by_the_proxy_over_http1_and_http2() {
    let up = Upstream::echo(Proto::Http1, "up").await;
    let policy = format!(
        "services:
  up: {{ endpoints: [{up}] }}
routes:
  - name: docs
    matches: [{{ authority: old.example, path: {{ prefix: /docs }} }}]
    service: up
    filters:
      - request_redirect:
          scheme: https
          hostname: new.example
          path: {{ replace_prefix_match: /guide }}
          status_code: 301
  - name: moved
    matches: [{{ authority: shop, path: {{ exact: /moved }} }}]
    service: up
    filters:
      - request_redirect: {{ path: {{ replace_full_path: /here }} }}
  - name: port
    matches: [{{ authority: shop, path: {{ exact: /port }} }}]
    service: up
    filters:
      - request_redirect: {{ port: 8443, status_code: 308 }}
",
        up = up.addr
    );
    let proxy = start_proxy(&policy);
    // (Host, path, status, Location)
    let cases = [
        (
            "old.example",
            "/docs/a/b?x=1",
            301,
            "https://new.example/guide/a/b?x=1",
        ),
        // The scheme's well-known port, which is left out.
        (
            "old.example:8080",
            "/docs",
            301,
            "https://new.example/guide",
        ),
        // 302 by default; the request's own host and port.
        ("shop", "/moved?a=b", 302, "http://shop/here?a=b"),
        ("shop:8080", "/moved", 302, "http://shop:8080/here"),
        ("shop:80", "/moved", 302, "http://shop/here"),
        ("shop", "/port", 308, "http://shop:8443/port"),
    ];
    for (host, path, status, location) in cases {
        let reply = timeout(STEP, get(proxy.outbound, host, path))
            .await
            .unwrap();
        assert_eq!(reply.status, status, "{host}{path}");
        assert_eq!(reply.header("location"), Some(location), "{host}{path}");
        assert!(reply.body.is_empty(), "{host}{path}");
    }
    // HTTP/2: the authority comes from :authority.
    let req = Request::get("http://old.example:8080/docs/z?q")
        .body(empty())
        .unwrap();
    let reply = timeout(STEP, send_h2_via(proxy.outbound, req))
        .await
        .unwrap();
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.header("location"),
        Some("https://new.example/guide/z?q")
    );
    assert_eq!(up.hits(), 0, "a redirect is never forwarded");

    // Counted per route, with the redirect's response flag.
    let series = |route: &str, code: &str| {
        format!(
            "outrider_requests_total{{code=\"{code}\",direction=\"outbound\",flags=\"RD\",method=\"GET\",route=\"{route}\",service=\"up\",status_class=\"3xx\"}}"
        )
    };
    let expected = [
        (series("docs", "301"), 3.0),
        (series("moved", "302"), 3.0),
        (series("port", "308"), 1.0),
    ];
    for (series, count) in expected {
        assert_eq!(settled(&proxy, &series, count).await, count, "{series}");
    }
}

/// Waits until the metric equals `expected` (counted when a response body ends, which can be
/// just after the client has read it), then returns its value.
async fn settled(proxy: &Proxy, series: &str, expected: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = proxy.metric(series).await;
        if value == expected || tokio::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn bad_filters_are_refused_with_their_line_and_column() {
    let dir = TempDir::new();
    let path = dir.path.join("policy.yaml");
    std::fs::write(
        &path,
        "services:
  a: { endpoints: [127.0.0.1:1] }
routes:
  - service: a
    matches: [{ path: { exact: /v1 } }]
    filters:
      - request_header_modifier: { set: { connection: close }, add: { x-a: \"a\\nb\" } }
      - url_rewrite: { path: { replace_prefix_match: /v2 } }
      - request_redirect: { status_code: 200 }
",
    )
    .unwrap();
    let out = Command::new(proxy_binary())
        .arg("--policy")
        .arg(&path)
        .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display();
    for expected in [
        format!(
            "routes[0].filters[0].request_header_modifier.set.connection: `connection` belongs \
             to the connection or the message framing; the proxy sets it, a filter cannot at \
             {file}:7:55"
        ),
        format!(
            "routes[0].filters[0].request_header_modifier.add.x-a: a header value holds visible \
             ASCII and spaces only (no control characters, no line breaks) at {file}:7:76"
        ),
        format!(
            "routes[0].filters[1].url_rewrite.path.replace_prefix_match: needs every match of \
             the route to be a `path: {{ prefix }}` match (the prefix it replaces) at {file}:8:54"
        ),
        format!(
            "routes[0].filters[2].request_redirect: a route either rewrites or redirects: \
             `request_redirect` and filters[1]'s `url_rewrite` cannot go together at {file}:9:9"
        ),
        format!(
            "routes[0].filters[2].request_redirect.status_code: must be a redirect status: 301, \
             302, 303, 307 or 308 at {file}:9:42"
        ),
    ] {
        assert!(stderr.contains(&expected), "{expected}\n{stderr}");
    }
}
