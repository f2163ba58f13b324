//! The proxy's lifecycle and admin port (its `/` index), the demo's hints: refusing an invalid policy with file, line and column
//! (exit 64), readiness, `/config`, exact metrics after known traffic, graceful drain on
//! SIGTERM with requests in flight losing none, outbound calls an app makes during its own
//! shutdown served until it has gone, `POST /shutdown`, and `outriderctl wait-ready`.

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

    // Every structural error at once, each with its position.
    std::fs::write(
        &path,
        "services:\n  a:\n    endpoint: [127.0.0.1:1]\n  b:\n    endpoints: [127.0.0.1:2]\n    protocol: h3\n  c: { endpoints: [127.0.0.1:3], timeouts: { idle: soon } }\n",
    )
    .unwrap();
    let out = Command::new(proxy_binary())
        .arg("--policy")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (what, at) in [
        ("services.a.endpoint: unknown field", "3:5"),
        ("services.b.protocol: unknown variant `h3`", "6:15"),
        ("services.c.timeouts.idle: ", "7:52"),
    ] {
        assert!(stderr.contains(what), "{what}\n{stderr}");
        assert!(
            stderr.contains(&format!("at {}:{at}", path.display())),
            "{at}\n{stderr}"
        );
    }

    // Bad flags are usage errors too.
    let out = Command::new(proxy_binary())
        .args(["--policy", "x", "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn hostile_policy_files_are_refused_at_start_quickly_naming_the_budget() {
    let dir = TempDir::new();
    let reference_path = dir.path.join("reference.yaml");
    std::fs::write(&reference_path, hostile::REFUSED_AT_ONCE).unwrap();
    let (out, reference) = start_with_policy(&reference_path);
    assert_eq!(out.status.code(), Some(64));
    for (name, text, budget) in [
        (
            "bomb.yaml",
            hostile::alias_bomb(),
            "budget exceeded: alias expansion is more than 5000 nodes",
        ),
        (
            "deep.yaml",
            hostile::deep_nesting(),
            "budget exceeded: nesting depth is more than 64 levels",
        ),
        (
            "overflow.yaml",
            "services:\n  a: { endpoints: [127.0.0.1:1], timeouts: { request: 9223372036854775807s } }\n"
                .to_string(),
            "services.a.timeouts.request: must be at most 24h",
        ),
    ] {
        let path = dir.path.join(name);
        std::fs::write(&path, text).unwrap();
        let (out, took) = start_with_policy(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(budget), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!(" at {}:", path.display())),
            "{name}: {stderr}"
        );
        // Compared with a file refused at once, so only the parse counts.
        assert!(
            took < reference + Duration::from_millis(100),
            "{name}: took {took:?}, a file refused at once {reference:?}"
        );
    }
}

/// Starts the proxy on the policy file `path` three times; the last output and the wall time
/// of the fastest run.
fn start_with_policy(path: &std::path::Path) -> (std::process::Output, Duration) {
    hostile::fastest_of_three(|| {
        Command::new(proxy_binary())
            .arg("--policy")
            .arg(path)
            .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0"])
            .output()
            .unwrap()
    })
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

    // The root lists the endpoints, and each one it lists answers.
    let (status, index) = proxy.admin_get("/").await;
    assert_eq!(status, 200);
    assert_eq!(
        index,
        "outrider-proxy admin endpoints:
GET  /live        200 while the process runs
GET  /ready       200 once a policy is in force (the body says its source and version)
GET  /metrics     Prometheus text
GET  /config      the policy in force, as JSON
GET  /identity    the workload certificate held (mesh TLS)
GET  /log-level   the log filter in force; PUT one (loopback callers only)
"
    );
    for line in index.lines().skip(1) {
        let path = line.split_whitespace().nth(1).unwrap();
        assert_ne!(proxy.admin_get(path).await.0, 404, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_says_once_what_to_try_with_the_addresses_it_bound() {
    // The demo's upstreams listen on the fixed ports of deploy/examples/demo.yaml (9101, ...,
    // below the ephemeral range the other tests' port-0 listeners come from).
    let proxy = spawn_proxy(TempDir::new(), &["--demo".into()]);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .logs()
            .iter()
            .any(|l| l == "Ctrl-C stops it."))
        .await,
        "{}",
        proxy.logs().join("\n")
    );
    let logs = proxy.logs();
    let intro = "outrider-proxy --demo is up. Try, from another shell:";
    assert_eq!(logs.iter().filter(|l| *l == intro).count(), 1, "{logs:?}");
    let commands: Vec<&str> = logs
        .iter()
        .filter_map(|l| l.strip_prefix("  curl "))
        .map(|l| l.split("   # ").next().unwrap().trim_end())
        .collect();
    let (out, admin) = (proxy.outbound, proxy.admin);
    let expected = [
        format!("-H 'Host: payments' http://{out}/v1/charge"),
        format!("-x http://{out} http://reviews/r"),
        format!("--http2-prior-knowledge -H 'Host: payments' http://{out}/v1/x"),
        "http://127.0.0.1:9001/anything".to_string(),
        format!("http://{}/hello", proxy.inbound),
        format!("-i -H 'Host: nope' http://{out}/"),
        format!("http://{admin}/"),
    ];
    assert_eq!(commands, expected, "{logs:?}");
    // The first works as printed.
    let reply = get(out, "payments", "/v1/charge").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["service"], "payments");
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

    let series = |service: &str, route: &str, class: &str, code: &str| {
        let flag = match code {
            "502" if service == "down" => "UF",
            "404" => "NR",
            _ => "-",
        };
        format!("outrider_requests_total{{code=\"{code}\",direction=\"outbound\",flags=\"{flag}\",method=\"GET\",route=\"{route}\",service=\"{service}\",status_class=\"{class}\"}}")
    };
    assert_eq!(proxy.metric(&series("svc", "ok", "2xx", "200")).await, 3.0);
    assert_eq!(proxy.metric(&series("svc", "ok", "5xx", "502")).await, 0.0);
    assert_eq!(
        proxy.metric(&series("down", "broken", "5xx", "502")).await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&series(":unrouted", ":unrouted", "4xx", "404"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("outrider_response_duration_seconds_count{direction=\"outbound\",flags=\"-\",route=\"ok\",service=\"svc\"}")
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
    let inbound = proxy.inbound;
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
    // Inbound stops accepting at once; outbound serves on while the app has calls open.
    assert!(
        tokio::net::TcpStream::connect(inbound).await.is_err(),
        "inbound still accepting while draining"
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
        .any(|l| l.contains("\"outcome\":\"drained\"")));
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
        .any(|l| l.contains("\"outcome\":\"timed_out\"")));
    // The stuck caller sees its connection end rather than hanging forever.
    assert!(tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .unwrap()
        .unwrap()
        .is_err());
}

/// Sends GET `path` with `host` over an already open HTTP/1.1 connection.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    host: &str,
    path: &str,
) -> u16 {
    let res = sender
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status().as_u16();
    let _ = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_calls_the_app_makes_while_shutting_down_are_served_until_it_has_gone() {
    let server = Upstream::echo(Proto::Http1, "up").await;
    let app = Upstream::echo(Proto::Http1, "app").await;
    let mut proxy = start_proxy_with(
        &format!(
            "services:\n  svc: {{ endpoints: [{up}], listen: 127.0.0.1:0 }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\ninbound:\n  app: {app}\n",
            up = server.addr,
            app = app.addr
        ),
        &["--drain-timeout", "30s"],
    );
    let (outbound, inbound, dedicated) = (proxy.outbound, proxy.inbound, proxy.dedicated("svc"));
    assert_eq!(get(inbound, "anything", "/").await.status, 200);

    // The app holds a keep-alive connection to the outbound port, as a pooled client does.
    let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut pooled, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(get_on(&mut pooled, "svc", "/before").await, 200);

    let signalled = std::time::Instant::now();
    proxy.terminate();
    assert!(
        eventually(Duration::from_secs(5), || {
            std::net::TcpStream::connect(inbound).is_err()
        })
        .await,
        "inbound still accepting after SIGTERM"
    );
    assert_eq!(proxy.admin_get("/ready").await.0, 503);

    // The app shuts down over 1.5 s and keeps calling out meanwhile: on its pooled connection,
    // on new connections to the shared port and to the dedicated one. Each gap is shorter
    // than the quiet period, and the pooled connection stays open the whole time anyway.
    let mut served = 0;
    for i in 0..15 {
        assert_eq!(
            get_on(&mut pooled, "svc", &format!("/pooled/{i}")).await,
            200
        );
        assert_eq!(get(outbound, "svc", &format!("/new/{i}")).await.status, 200);
        assert_eq!(
            get(dedicated, "any", &format!("/dedicated/{i}"))
                .await
                .status,
            200
        );
        served += 3;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, 45);
    // Still up a full second after SIGTERM, far past the quiet period, because the app's
    // pooled connection is open.
    assert!(signalled.elapsed() >= Duration::from_millis(1500));
    assert_eq!(proxy.wait_exit(Duration::from_millis(300)), None);
    assert_eq!(get_on(&mut pooled, "svc", "/last").await, 200);

    // The app exits: its connection closes. The proxy follows after the quiet period, long
    // before the 30 s drain timeout.
    let gone = std::time::Instant::now();
    drop(pooled);
    let _ = conn.await;
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let after_app = gone.elapsed();
    assert!(
        after_app >= Duration::from_millis(900) && after_app < Duration::from_secs(5),
        "exited {after_app:?} after the app had gone"
    );
    assert_eq!(server.hits(), 1 + 15 * 3 + 1);
    let logs = proxy.logs();
    assert!(
        logs.iter().any(|l| l.contains("\"app_gone\":true")),
        "{logs:?}"
    );
    assert!(logs.iter().any(|l| l.contains("\"outcome\":\"drained\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_stops_the_proxy_only_when_enabled() {
    let policy = "services:\n  svc: { endpoints: [127.0.0.1:9] }\n";
    let post = |admin: std::net::SocketAddr| async move {
        send(
            &http1_client(),
            Request::post(format!("http://{admin}/shutdown"))
                .body(empty())
                .unwrap(),
        )
        .await
        .status
    };

    // Off by default: the path does not exist.
    let mut proxy = start_proxy(policy);
    assert_eq!(post(proxy.admin).await, 404);
    assert_eq!(proxy.wait_exit(Duration::from_millis(300)), None);
    assert_eq!(proxy.admin_get("/ready").await.0, 200);

    let mut proxy = start_proxy_with(policy, &["--shutdown-endpoint"]);
    assert_eq!(proxy.admin_get("/shutdown").await.0, 405);
    assert_eq!(proxy.admin_get("/ready").await.0, 200);
    let started = std::time::Instant::now();
    assert_eq!(post(proxy.admin).await, 202);
    // No app connections: it exits after the quiet period, with a clean drain.
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(proxy
        .logs()
        .iter()
        .any(|l| l.contains("shutdown requested on the admin port")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_returns_once_the_proxy_is_ready_and_gives_up_on_timeout() {
    let proxy = start_proxy("services:\n  svc: { endpoints: [127.0.0.1:9] }\n");
    let out = Command::new(ctl_binary())
        .args([
            "wait-ready",
            "--admin",
            &proxy.admin.to_string(),
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Nothing listens there: it gives up after the timeout with exit 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(ctl_binary())
        .args([
            "wait-ready",
            "--admin",
            &closed.to_string(),
            "--timeout",
            "300ms",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready after"));
}
