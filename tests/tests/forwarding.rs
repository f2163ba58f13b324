//! Forwarding: routing by authority, path prefix, absolute-form and dedicated ports; the four
//! HTTP/1.1 <-> HTTP/2 combinations; header rewriting; inbound; splits and load balancing.
//! The real proxy binary against real upstreams on 127.0.0.1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use http::Request;
use outrider_e2e::*;

fn policy_two(a: &Upstream, b: &Upstream) -> String {
    format!(
        "services:
  svc-a: {{ endpoints: [{a}] }}
  svc-b: {{ endpoints: [{b}], listen: 127.0.0.1:0 }}
routes:
  - name: a-prefix
    match: {{ authority: svc, path_prefix: /a/ }}
    service: svc-a
  - name: svc-rest
    match: {{ authority: svc }}
    service: svc-b
",
        a = a.addr,
        b = b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_authority_then_path_prefix_in_order() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&policy_two(&a, &b));

    assert_eq!(
        get(proxy.outbound, "svc", "/a/x").await.json()["server"],
        "a"
    );
    assert_eq!(
        get(proxy.outbound, "svc", "/b/x").await.json()["server"],
        "b"
    );
    // Host matching ignores the port and case.
    assert_eq!(
        get(proxy.outbound, "SVC:8080", "/a/y").await.json()["server"],
        "a"
    );
    let miss = get(proxy.outbound, "other", "/a/x").await;
    assert_eq!(miss.status, 404);
    assert_eq!(
        miss.header("x-outrider-error"),
        Some("no route for authority \"other\"")
    );
    assert_eq!((a.hits(), b.hits()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_route_by_their_uri() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&policy_two(&a, &b));
    // What an app with HTTP_PROXY=http://127.0.0.1:15001 sends.
    let raw = raw_exchange(
        proxy.outbound,
        b"GET http://svc/a/abs?q=1 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["server"], "a");
    // The upstream gets origin-form with the query kept.
    assert_eq!(json["uri"], "/a/abs?q=1");
    assert_eq!(json["headers"]["host"], "svc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_port_sends_everything_to_its_service() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&policy_two(&a, &b));
    let port = proxy.dedicated("svc-b");
    let reply = get(port, &port.to_string(), "/a/anything").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["server"], "b");
    assert_eq!(a.hits(), 0);
}

async fn protocol_case(down: Proto, up: Proto) {
    let server = Upstream::echo(up, "up").await;
    let protocol = if up == Proto::Http2 { "http2" } else { "http1" };
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}], protocol: {protocol} }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        server.addr
    ));
    let body = full(vec![7u8; 100_000]);
    let reply = match down {
        // An h2 client carries the authority in :authority.
        Proto::Http2 => {
            send_h2_via(
                proxy.outbound,
                Request::post("http://svc/p?x=1").body(body).unwrap(),
            )
            .await
        }
        // An h1 client carries it in Host.
        Proto::Http1 => {
            send(
                &http1_client(),
                Request::post(format!("http://{}/p?x=1", proxy.outbound))
                    .header("host", "svc")
                    .body(body)
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(reply.status, 200, "{down:?}->{up:?}");
    let json = reply.json();
    assert_eq!(json["body_len"], 100_000, "{down:?}->{up:?}");
    assert_eq!(json["path"], "/p");
    let expected_version = if up == Proto::Http2 {
        "HTTP/2.0"
    } else {
        "HTTP/1.1"
    };
    assert_eq!(json["version"], expected_version);
    if up == Proto::Http2 {
        // The caller's authority survives as :authority.
        assert_eq!(json["uri"], "http://svc/p?x=1");
        assert!(json["headers"].get("host").is_none(), "{json}");
    } else {
        assert_eq!(json["headers"]["host"], "svc");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_to_http1() {
    protocol_case(Proto::Http1, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_to_http2() {
    protocol_case(Proto::Http1, Proto::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_http1() {
    protocol_case(Proto::Http2, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_http2() {
    protocol_case(Proto::Http2, Proto::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_headers_on_the_way() {
    let server = Upstream::echo(Proto::Http1, "up").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        server.addr
    ));
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/", proxy.outbound))
            .header("host", "svc")
            .header("connection", "x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "gzip")
            .header("x-forwarded-for", "10.1.2.3")
            .header("x-app", "kept")
            .body(empty())
            .unwrap(),
    )
    .await;
    let headers = &reply.json()["headers"];
    for gone in ["x-private", "keep-alive", "proxy-connection", "te"] {
        assert!(headers.get(gone).is_none(), "{gone} forwarded: {headers}");
    }
    assert_eq!(headers["x-app"], "kept");
    assert_eq!(headers["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    let id = headers["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");

    // A caller's request id is kept.
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/", proxy.outbound))
            .header("host", "svc")
            .header("x-request-id", "abc-123")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.json()["headers"]["x-request-id"], "abc-123");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_and_body_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Upstream::echo(Proto::Http1, "up").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        server.addr
    ));
    let mut stream = tokio::net::TcpStream::connect(proxy.outbound)
        .await
        .unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The body is sent only after the interim response, as a careful client does.
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim))
        .await
        .expect("no 100 Continue")
        .unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(b"hello").await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("\"body_len\":5"), "{rest}");
    assert!(!rest.contains("\"expect\""), "Expect forwarded: {rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_local_app() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&format!("inbound:\n  app: {}\n", app.addr));
    let reply = get(proxy.inbound, "my-service", "/in").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["server"], "app");
    assert_eq!(reply.json()["headers"]["host"], "my-service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_endpoints() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}, {}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        a.addr, b.addr
    ));
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(
            get(proxy.outbound, "svc", "/").await.json()["server"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for pair in seen.windows(2) {
        assert_ne!(pair[0], pair[1], "not alternating: {seen:?}");
    }
    assert_eq!((a.hits(), b.hits()), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_steers_away_from_a_busy_endpoint() {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = std::sync::Arc::clone(&release);
    // `slow` holds every request until released; `fast` answers at once.
    let slow = Upstream::start(Proto::Http1, move |_req| {
        let held = std::sync::Arc::clone(&held);
        async move {
            held.notified().await;
            http::Response::new(full("slow"))
        }
    })
    .await;
    let fast = Upstream::echo(Proto::Http1, "fast").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}, {}], load_balancing: least_request }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        slow.addr, fast.addr
    ));
    // Answered requests: `fast`'s, which the proxy no longer counts as in flight once it has
    // their response head, that is before they are answered.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut pending = Vec::new();
    for i in 0..10 {
        let addr = proxy.outbound;
        let answered_count = std::sync::Arc::clone(&answered);
        pending.push(tokio::spawn(async move {
            let status = get(addr, "svc", "/").await.status;
            answered_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            status
        }));
        // Start the next request only once the load the proxy sees is settled: this one is
        // held by `slow` or already answered by `fast`. (Reaching `fast` is not enough: until
        // its answer is back the proxy counts it, and a tie with `slow` is a coin toss.)
        assert!(
            eventually(Duration::from_secs(5), || slow.hits()
                + answered.load(std::sync::atomic::Ordering::SeqCst)
                == i + 1)
            .await,
            "request {i} went nowhere"
        );
    }
    // Round robin would have sent 5 to `slow`; P2C sends at most the first.
    assert!(slow.hits() <= 1, "slow got {}", slow.hits());
    assert!(fast.hits() >= 9);
    release.notify_waiters();
    for p in pending {
        assert_eq!(p.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_follows_weights() {
    let v1 = Upstream::echo(Proto::Http1, "v1").await;
    let v2 = Upstream::echo(Proto::Http1, "v2").await;
    let proxy = start_proxy(&format!(
        "services:\n  v1: {{ endpoints: [{}] }}\n  v2: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: reviews }}\n    split: [ {{ service: v1, weight: 3 }}, {{ service: v2, weight: 1 }} ]\n",
        v1.addr, v2.addr
    ));
    let client = http1_client();
    for _ in 0..400 {
        let r = send(
            &client,
            Request::get(format!("http://{}/", proxy.outbound))
                .header("host", "reviews")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // Expected 300/100; the bounds are seven standard deviations wide.
    assert!((240..=360).contains(&v1.hits()), "v1 got {}", v1.hits());
    assert_eq!(v1.hits() + v2.hits(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_are_resolved() {
    let server = Upstream::echo(Proto::Http1, "dns").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ dns: \"{}\" }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        server.addr
    ));
    // Resolution runs in the background right after start.
    let mut status = 0;
    for _ in 0..100 {
        status = get(proxy.outbound, "svc", "/").await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}
