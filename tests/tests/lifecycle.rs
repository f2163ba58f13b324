//! The proxy's lifecycle and admin port: refusing an invalid policy with file, line and column
//! (exit 64), readiness, `/config`, exact metrics after known traffic, and graceful drain on
//! SIGTERM with requests in flight losing none.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use http::Request;
use outrider_e2e::*;

#[test]
fn invalid_policy_is_refused_with_position_and_exit_64() {
    let dir = TempDir::new();
    let path = dir.path.join("policy.yaml");
    std::fs::write(
        &path,
        "services:
  reviews-v1: { endpoints: [127.0.0.1:9201] }
routes:
  - match: { authority: reviews }
    split:
      - service: reviews-v1
        weight: 0
",
    )
    .unwrap();
    let out = Command::new(proxy_binary())
        .arg("--policy")
        .arg(&path)
        .args([
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "routes[0].split[0].weight: must be > 0 at {}:7:17",
        path.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");

    // A syntax error and an unknown field are refused the same way.
    std::fs::write(&path, "services:\n  a:\n    endpoint: [127.0.0.1:1]\n").unwrap();
    let out = Command::new(proxy_binary())
        .arg("--policy")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `endpoint`"), "{stderr}");
    assert!(
        stderr.contains(&format!("at {}:3:5", path.display())),
        "{stderr}"
    );

    // Bad flags are usage errors too.
    let out = Command::new(proxy_binary())
        .args(["--policy", "x", "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_liveness_readiness_and_config() {
    let policy = "services:\n  svc: { endpoints: [127.0.0.1:9] }\nroutes:\n  - match: { authority: svc }\n    service: svc\n";
    let proxy = start_proxy(policy);
    assert_eq!(proxy.admin_get("/live").await.0, 200);
    assert_eq!(proxy.admin_get("/ready").await.0, 200);
    let (status, body) = proxy.admin_get("/config").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["version"], 1);
    assert_eq!(
        config["content_hash"],
        outrider_config::content_hash(policy)
    );
    assert_eq!(
        config["policy"]["services"]["svc"]["endpoints"][0],
        "127.0.0.1:9"
    );
    assert_eq!(proxy.admin_get("/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_exactly() {
    let server = Upstream::echo(Proto::Http1, "up").await;
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\n  down: {{ endpoints: [{refused}] }}\nroutes:\n  - name: ok\n    match: {{ authority: svc }}\n    service: svc\n  - name: broken\n    match: {{ authority: down }}\n    service: down\n",
        server.addr
    ));
    for _ in 0..3 {
        assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    }
    assert_eq!(get(proxy.outbound, "down", "/").await.status, 502);
    assert_eq!(get(proxy.outbound, "nowhere", "/").await.status, 404);

    let series = |service: &str, route: &str, class: &str| {
        format!("outrider_requests_total{{direction=\"outbound\",route=\"{route}\",service=\"{service}\",status_class=\"{class}\"}}")
    };
    assert_eq!(proxy.metric(&series("svc", "ok", "2xx")).await, 3.0);
    assert_eq!(proxy.metric(&series("svc", "ok", "5xx")).await, 0.0);
    assert_eq!(proxy.metric(&series("down", "broken", "5xx")).await, 1.0);
    assert_eq!(proxy.metric(&series("none", "none", "4xx")).await, 1.0);
    assert_eq!(
        proxy
            .metric("outrider_response_duration_seconds_count{direction=\"outbound\",route=\"ok\",service=\"svc\"}")
            .await,
        3.0
    );
    // One keep-alive connection carried all three requests.
    let endpoint = format!("endpoint=\"{}\",service=\"svc\"", server.addr);
    assert_eq!(
        proxy
            .metric(&format!(
                "outrider_upstream_connections_opened_total{{{endpoint}}}"
            ))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&format!(
                "outrider_upstream_connections_active{{{endpoint}}}"
            ))
            .await,
        1.0
    );
    assert_eq!(proxy.metric("outrider_policy_version").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = std::sync::Arc::clone(&release);
    let server = Upstream::start(Proto::Http1, move |_req| {
        let held = std::sync::Arc::clone(&held);
        async move {
            held.notified().await;
            http::Response::new(full("done"))
        }
    })
    .await;
    let mut proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        server.addr
    ));
    let outbound = proxy.outbound;
    // Four HTTP/1.1 requests on their own connections and two HTTP/2 ones.
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        in_flight.push(tokio::spawn(async move {
            let r = get(outbound, "svc", "/").await;
            (r.status, r.header("connection").map(str::to_string), r.body)
        }));
    }
    for _ in 0..2 {
        in_flight.push(tokio::spawn(async move {
            let r = send_h2_via(outbound, Request::get("http://svc/").body(empty()).unwrap()).await;
            (r.status, None, r.body)
        }));
    }
    assert!(eventually(Duration::from_secs(5), || server.hits() == 6).await);

    proxy.terminate();
    // Draining: not ready, no new connections, the admin port still answers.
    let mut saw_not_ready = false;
    for _ in 0..200 {
        if proxy.admin_get("/ready").await.0 == 503 {
            saw_not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_not_ready, "/ready never turned 503");
    assert!(
        tokio::net::TcpStream::connect(outbound).await.is_err(),
        "outbound still accepting while draining"
    );

    release.notify_waiters();
    for request in in_flight {
        let (status, connection, body) = request.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"done");
        if let Some(connection) = connection {
            assert_eq!(connection, "close");
        }
    }
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(proxy
        .logs()
        .iter()
        .any(|l| l.contains("\"outcome\":\"Drained\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_shutdown() {
    // The upstream never answers; the drain must give up after its timeout and still exit 0.
    let server = Upstream::start(Proto::Http1, |_req| async {
        std::future::pending::<()>().await;
        http::Response::new(empty())
    })
    .await;
    let mut proxy = start_proxy_with(
        &format!(
            "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
            server.addr
        ),
        &["--drain-timeout", "500ms"],
    );
    let outbound = proxy.outbound;
    let stuck = tokio::spawn(async move {
        let client = http1_client();
        client
            .request(
                Request::get(format!("http://{outbound}/"))
                    .header("host", "svc")
                    .body(empty())
                    .unwrap(),
            )
            .await
    });
    assert!(eventually(Duration::from_secs(5), || server.hits() == 1).await);
    let started = std::time::Instant::now();
    proxy.terminate();
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "exited after {took:?}");
    assert!(proxy
        .logs()
        .iter()
        .any(|l| l.contains("\"outcome\":\"TimedOut\"")));
    // The stuck caller sees its connection end rather than hanging forever.
    assert!(tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .unwrap()
        .unwrap()
        .is_err());
}
