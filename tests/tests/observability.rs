//! Access log and metrics end to end: one JSON line per request on stdout with the fields an
//! operator searches by; a `/metrics` scrape after known traffic with exact counts, validated
//! by `promtool check metrics` (installed by `.ci/run`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use outrider_e2e::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn policy(echo: std::net::SocketAddr, dead: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "services:\n  svc: {{ endpoints: [{echo}] }}\n  dead: {{ endpoints: [{dead}] }}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n  - name: d\n    match: {{ authority: dead }}\n    service: dead\n{extra}"
    )
}

async fn closed_port() -> std::net::SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until the metric equals `expected` (counters updated when a response body ends,
/// which can be just after the client has read it), then returns its value.
async fn settled(proxy: &Proxy, series: &str, expected: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = proxy.metric(series).await;
        if value == expected || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let proxy = start_proxy(&policy(echo.addr, dead, "access_log: json\n"));
    let client = http1_client();

    let traced = send(
        &client,
        Request::get(format!("http://{}/a?x=1", proxy.outbound))
            .header("host", "svc")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .body(empty())
            .unwrap(),
    )
    .await;
    let posted = send(
        &client,
        Request::post(format!("http://{}/b", proxy.outbound))
            .header("host", "svc:8080")
            .header("x-request-id", "req-42")
            .body(full("hello"))
            .unwrap(),
    )
    .await;
    let failed = get(proxy.outbound, "dead", "/c").await;
    let unrouted = send(
        &client,
        Request::get(format!("http://{}/d", proxy.outbound))
            .header("host", "nowhere")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .header("x-request-id", "req-404")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (traced.status, posted.status, failed.status, unrouted.status),
        (200, 200, 502, 404)
    );

    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() >= 4).await,
        "{:?}",
        proxy.stdout_lines()
    );
    let lines: Vec<serde_json::Value> = proxy
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 4);
    let by_path = |path: &str| lines.iter().find(|l| l["path"] == path).unwrap().clone();

    let a = by_path("/a?x=REDACTED");
    let seen = traced.json()["headers"].clone();
    assert_eq!(a["trace_id"], TRACE);
    assert_eq!(
        seen["traceparent"],
        format!("00-{TRACE}-{}-01", a["span_id"].as_str().unwrap()).as_str(),
        "the logged span id is the parent the upstream saw"
    );
    assert_eq!(
        a["request_id"], seen["x-request-id"],
        "generated request id logged"
    );
    assert_eq!(a["direction"], "outbound");
    assert_eq!(a["service"], "svc");
    assert_eq!(a["route"], "r");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["authority"], "svc");
    assert_eq!(a["status"], 200);
    assert_eq!(a["upstream"], echo.addr.to_string());
    assert_eq!(a["attempts"], 1);
    assert_eq!(a["request_bytes"], 0);
    assert_eq!(a["response_bytes"], traced.body.len());
    assert!(a["error"].is_null());
    let duration = a["duration_seconds"].as_f64().unwrap();
    assert!(duration > 0.0 && duration < 5.0, "{duration}");
    let time = a["time"].as_str().unwrap();
    assert!(
        time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );

    let b = by_path("/b");
    assert_eq!(b["method"], "POST");
    assert_eq!(b["request_id"], "req-42");
    assert_eq!(b["authority"], "svc:8080");
    assert_eq!(b["request_bytes"], 5);
    assert_eq!(b["response_bytes"], posted.body.len());
    assert_eq!(posted.json()["body_len"], 5);

    let c = by_path("/c");
    assert_eq!(c["status"], 502);
    assert_eq!(c["service"], "dead");
    assert_eq!(c["upstream"], dead.to_string());
    assert!(
        c["error"].as_str().unwrap().contains("refused"),
        "{}",
        c["error"]
    );
    let d = by_path("/d");
    assert_eq!(d["status"], 404);
    assert_eq!(d["trace_id"], TRACE);
    assert_eq!(d["request_id"], "req-404");
    assert_eq!(d["authority"], "nowhere");
    assert_eq!(d["service"], ":unrouted");
    assert_eq!(d["attempts"], 0);
    assert!(d["upstream"].is_null());
    assert_eq!(d["response_bytes"], unrouted.body.len());
    assert!(
        d["error"].as_str().unwrap().contains("no route"),
        "{}",
        d["error"]
    );
    assert_eq!(proxy.metric("outrider_access_log_lines_total").await, 4.0);
    assert_eq!(proxy.metric("outrider_access_log_dropped_total").await, 0.0);
}

/// The access log's lines in order, as JSON.
fn json_lines(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_redacts_query_values_and_names_the_caller() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let proxy = start_proxy(&policy(echo.addr, dead, "access_log: json\n"));

    // A request id that is not UTF-8 (0xFF) is forwarded as is, and logged byte for byte.
    let head = b"GET /login?token=s3cret&debug&empty=&user=bob HTTP/1.1\r\nhost: svc\r\nuser-agent: probe/1.0\r\nx-request-id: req-\xff\\x\r\nconnection: close\r\n\r\n";
    let reply = raw_exchange(proxy.outbound, head, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let dead_reply = raw_exchange(
        proxy.outbound,
        b"GET /gone?key=abc HTTP/1.0\r\nhost: dead\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(dead_reply.starts_with("HTTP/1.0 502"), "{dead_reply}");

    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() >= 2).await,
        "{:?}",
        proxy.stdout_lines()
    );
    let lines = json_lines(&proxy);
    let line = &lines[0];
    assert_eq!(
        line["path"], "/login?token=REDACTED&debug&empty=&user=REDACTED",
        "names kept, values replaced"
    );
    assert!(!proxy.stdout_lines()[0].contains("s3cret"));
    assert_eq!(
        line["request_id"], r"req-\xff\\x",
        "0xFF escaped, the backslash doubled"
    );
    assert_eq!(line["user_agent"], "probe/1.0");
    assert_eq!(line["http_version"], "HTTP/1.1");
    let peer: std::net::SocketAddr = line["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.1");
    let upstream = line["upstream_seconds"]
        .as_f64()
        .expect("an upstream answered");
    let duration = line["duration_seconds"].as_f64().unwrap();
    assert!(
        upstream > 0.0 && upstream <= duration,
        "{upstream} {duration}"
    );
    assert!(line["grpc_status"].is_null());
    assert!(line["peer_identity"].is_null(), "plaintext: no identity");

    let gone = &lines[1];
    assert_eq!(gone["path"], "/gone?key=REDACTED");
    assert_eq!(gone["status"], 502);
    assert_eq!(gone["http_version"], "HTTP/1.0");
    assert!(
        gone["upstream_seconds"].is_null(),
        "no upstream answered: {gone}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_text_format_keeps_or_drops_queries_as_told() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let proxy = start_proxy(&policy(
        echo.addr,
        dead,
        "access_log: { format: text, query: drop }\n",
    ));
    let reply = raw_exchange(
        proxy.outbound,
        b"GET /q?token=s3cret HTTP/1.1\r\nhost: svc\r\nuser-agent: say \"hi\"\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        eventually(Duration::from_secs(5), || !proxy.stdout_lines().is_empty()).await,
        "no line"
    );
    let line = proxy.stdout_lines()[0].clone();
    assert!(!line.starts_with('{'), "{line}");
    assert!(!line.contains("token"), "query dropped: {line}");
    assert!(line.contains(" outbound svc/r 127.0.0.1:"), "{line}");
    assert!(line.contains(" \"GET /q HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains(r#" user_agent="say \"hi\"""#), "{line}");
    assert!(line.contains(&format!(" upstream={}", echo.addr)), "{line}");
    assert!(line.contains(" upstream_seconds="), "{line}");
    assert!(line.contains(" response_flags=- "), "{line}");

    // The same proxy, told to keep query strings.
    let reloads = "outrider_policy_reloads_total{result=\"ok\"}";
    let before = proxy.metric(reloads).await;
    save(
        &proxy.policy_path(),
        &policy(
            echo.addr,
            dead,
            "access_log: { format: text, query: keep }\n",
        ),
    );
    assert_eq!(settled(&proxy, reloads, before + 1.0).await, before + 1.0);
    raw_exchange(
        proxy.outbound,
        b"GET /q?token=s3cret HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() >= 2).await,
        "{:?}",
        proxy.stdout_lines()
    );
    assert!(
        proxy.stdout_lines()[1].contains("\"GET /q?token=s3cret HTTP/1.1\""),
        "{:?}",
        proxy.stdout_lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_counted_and_logged_within_a_bound() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let proxy = start_proxy(&policy(echo.addr, dead, "access_log: json\n"));
    let series = |code: &str| {
        format!("outrider_http_malformed_requests_total{{code=\"{code}\",direction=\"outbound\"}}")
    };

    let bad = raw_exchange(
        proxy.outbound,
        b"GET /a HTTP/1.1\r\nhost: svc\r\nbad header\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert_eq!(settled(&proxy, &series("400"), 1.0).await, 1.0);
    assert!(
        eventually(Duration::from_secs(5), || !proxy.stdout_lines().is_empty()).await,
        "the malformed request is logged"
    );
    let line = &json_lines(&proxy)[0];
    assert_eq!(line["status"], 400);
    assert_eq!(line["direction"], "outbound");
    assert!(
        line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request: "),
        "{line}"
    );

    // Too many header bytes: 431.
    let mut huge = b"GET /a HTTP/1.1\r\nhost: svc\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("x-filler-{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let large = raw_exchange(proxy.outbound, &huge, Duration::from_secs(5)).await;
    assert!(large.starts_with("HTTP/1.1 431"), "{large}");
    assert_eq!(settled(&proxy, &series("431"), 1.0).await, 1.0);

    // An unsupported transfer coding: refused (501) by the proxy's own check, counted too.
    let coding = raw_exchange(
        proxy.outbound,
        b"POST /a HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(coding.starts_with("HTTP/1.1 501"), "{coding}");
    assert_eq!(settled(&proxy, &series("501"), 1.0).await, 1.0);

    // A flood of garbage is counted in full but logged at most once a second.
    for _ in 0..30 {
        raw_exchange(
            proxy.outbound,
            b"\x01\x02 garbage\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
    }
    assert_eq!(settled(&proxy, &series("400"), 31.0).await, 31.0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logged_400 = json_lines(&proxy)
        .iter()
        .filter(|l| l["status"] == 400)
        .count();
    assert!(
        (1..=5).contains(&logged_400),
        "31 malformed requests, {logged_400} lines"
    );
}

/// Saves `text` the way editors do: a new file renamed over the old one.
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writer_starts_with_the_first_policy_that_logs() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let proxy = start_proxy(&policy(echo.addr, dead, "access_log: off\n"));
    assert_eq!(get(proxy.outbound, "svc", "/quiet").await.status, 200);
    // A proxy that does not log has no writer thread (nor its queue).
    let writer = |proxy: &Proxy| proxy.thread_names().iter().any(|t| t == "access-log");
    assert!(!writer(&proxy), "{:?}", proxy.thread_names());

    save(
        &proxy.policy_path(),
        &policy(echo.addr, dead, "access_log: json\n"),
    );
    assert!(
        eventually(Duration::from_secs(10), || writer(&proxy)).await,
        "no writer after the reload; logs:\n{}",
        proxy.logs().join("\n")
    );
    assert_eq!(get(proxy.outbound, "svc", "/loud").await.status, 200);
    assert_eq!(get(proxy.outbound, "nowhere", "/refused").await.status, 404);
    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() == 2).await,
        "{:?}",
        proxy.stdout_lines()
    );
    let mut paths: Vec<String> = proxy
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
        .collect();
    paths.sort();
    assert_eq!(paths, ["\"/loud\"", "\"/refused\""]);

    // Off again: the writer ends with the last request of the policy that logged, and nothing
    // more is written.
    save(
        &proxy.policy_path(),
        &policy(echo.addr, dead, "access_log: off\n"),
    );
    let reloads = "outrider_policy_reloads_total{result=\"ok\"}";
    assert_eq!(settled(&proxy, reloads, 3.0).await, 3.0);
    assert!(
        eventually(Duration::from_secs(5), || !writer(&proxy)).await,
        "the writer outlived the policy that logged: {:?}",
        proxy.thread_names()
    );
    assert_eq!(get(proxy.outbound, "svc", "/quiet-again").await.status, 200);
    let series = "outrider_response_stream_duration_seconds_count{direction=\"outbound\",route=\"r\",service=\"svc\"}";
    assert_eq!(settled(&proxy, series, 3.0).await, 3.0);
    assert_eq!(proxy.metric("outrider_access_log_lines_total").await, 2.0);
    assert_eq!(proxy.stdout_lines().len(), 2);

    // And on once more: a new writer, and its lines are written.
    save(
        &proxy.policy_path(),
        &policy(echo.addr, dead, "access_log: json\n"),
    );
    assert_eq!(settled(&proxy, reloads, 4.0).await, 4.0);
    assert_eq!(get(proxy.outbound, "svc", "/loud-again").await.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() == 3).await,
        "{:?}",
        proxy.stdout_lines()
    );
    assert!(proxy.stdout_lines()[2].contains("/loud-again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_during_shutdown_are_logged_before_exit() {
    // The app answers request i after 1.5 s + 5i ms, so 20 inbound requests are in flight at
    // SIGTERM and end one by one just before the proxy exits. The writer pauses after each
    // write to let lines gather, so without a final flush the last lines die with the process.
    let app = Upstream::start(
        Proto::Http1,
        |req: Request<hyper::body::Incoming>| async move {
            let i: u64 = req
                .uri()
                .path()
                .trim_start_matches("/late/")
                .parse()
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(1500 + 5 * i)).await;
            hyper::Response::new(full("late"))
        },
    )
    .await;
    let mut proxy = start_proxy(&format!(
        "inbound:\n  app: {}\naccess_log: json\n",
        app.addr
    ));
    let inbound = proxy.inbound;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move { get(inbound, "app", &format!("/late/{i}")).await.status })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || app.hits() == 20).await,
        "{} of 20 reached the app",
        app.hits()
    );
    proxy.terminate();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    // The pipe holds whatever the proxy wrote before it exited; the reader thread drains it.
    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() >= 20).await,
        "{} of 20 lines written before exit",
        proxy.stdout_lines().len()
    );
    assert_eq!(proxy.stdout_lines().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_runs_only_the_threads_it_needs() {
    // Every thread costs a stack and a malloc arena; a feature the policy leaves off
    // (access log, span export) must not start one. With --workers 1 the runtime is the main
    // thread; the policy file watcher has its own, and reading and parsing the file takes a
    // blocking-pool thread (tokio names it `tokio-rt-worker`; it lingers for 10 s).
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let proxy = start_proxy(&policy(echo.addr, closed_port().await, ""));
    assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    let names = proxy.thread_names();
    let expected = |name: &str| {
        name == "outrider-proxy" || name.starts_with("notify-rs") || name == "tokio-rt-worker"
    };
    assert!(names.iter().all(|n| expected(n)), "{names:?}");
    assert!(names.len() <= 3, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_nothing() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let proxy = start_proxy(&policy(echo.addr, closed_port().await, "access_log: off\n"));
    for _ in 0..3 {
        assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    }
    // The requests were counted (so they were reported) and nothing reached the log.
    let series = "outrider_response_stream_duration_seconds_count{direction=\"outbound\",route=\"r\",service=\"svc\"}";
    assert_eq!(settled(&proxy, series, 3.0).await, 3.0);
    assert_eq!(proxy.metric("outrider_access_log_lines_total").await, 0.0);
    assert!(
        proxy.stdout_lines().is_empty(),
        "{:?}",
        proxy.stdout_lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_known_traffic_are_exact_and_pass_promtool() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let proxy = start_proxy_with(&policy(echo.addr, dead, ""), &["--workload", "checkout"]);
    let client = http1_client();
    let mut response_bytes = 0;
    for i in 0..5 {
        let reply = get(proxy.outbound, "svc", &format!("/get/{i}")).await;
        assert_eq!(reply.status, 200);
        response_bytes += reply.body.len();
    }
    for _ in 0..2 {
        let reply = send(
            &client,
            Request::post(format!("http://{}/post", proxy.outbound))
                .header("host", "svc")
                .body(full("0123456789"))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, 200);
        response_bytes += reply.body.len();
    }
    assert_eq!(get(proxy.outbound, "dead", "/").await.status, 502);
    assert_eq!(get(proxy.outbound, "nowhere", "/").await.status, 404);
    let purge = send(
        &client,
        Request::builder()
            .method("PURGE")
            .uri(format!("http://{}/", proxy.outbound))
            .header("host", "nowhere")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(purge.status, 404);

    let labels = "direction=\"outbound\",route=\"r\",service=\"svc\"";
    let m = |name: &str, extra: &str| format!("{name}{{{labels}{extra}}}");
    let upstream_made = "direction=\"outbound\",flags=\"-\",route=\"r\",service=\"svc\"";
    assert_eq!(
        settled(
            &proxy,
            &m("outrider_response_bytes_total", ""),
            response_bytes as f64
        )
        .await,
        response_bytes as f64
    );
    // Labels come out sorted by name: code, direction and flags before the route labels,
    // method between them.
    let requests = |code: &str, method: &str, route: &str, service: &str, class: &str| {
        let flag = match code {
            "502" => "UF",
            "404" => "NR",
            _ => "-",
        };
        format!("outrider_requests_total{{code=\"{code}\",direction=\"outbound\",flags=\"{flag}\",method=\"{method}\",route=\"{route}\",service=\"{service}\",status_class=\"{class}\"}}")
    };
    assert_eq!(
        proxy
            .metric(&requests("200", "GET", "r", "svc", "2xx"))
            .await,
        5.0
    );
    assert_eq!(
        proxy
            .metric(&requests("200", "POST", "r", "svc", "2xx"))
            .await,
        2.0
    );
    assert_eq!(
        proxy.metric(&m("outrider_request_bytes_total", "")).await,
        20.0
    );
    assert_eq!(proxy.metric(&m("outrider_requests_active", "")).await, 0.0);
    assert_eq!(proxy.metric(&m("outrider_requests_pending", "")).await, 0.0);
    assert_eq!(
        proxy
            .metric(&format!(
                "outrider_response_duration_seconds_count{{{upstream_made}}}"
            ))
            .await,
        7.0
    );
    assert_eq!(
        settled(
            &proxy,
            &m("outrider_response_stream_duration_seconds_count", ""),
            7.0
        )
        .await,
        7.0
    );
    assert_eq!(
        proxy
            .metric(&requests("502", "GET", "d", "dead", "5xx"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&requests("404", "GET", ":unrouted", ":unrouted", "4xx"))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&requests("404", "other", ":unrouted", ":unrouted", "4xx"))
            .await,
        1.0,
        "an extension method is counted as other, never under its own name"
    );
    let (_, text) = proxy.admin_get("/metrics").await;
    let request_series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("outrider_requests_total{"))
        .collect();
    assert_eq!(
        request_series.len(),
        5,
        "one series per method and code seen, no zero series: {request_series:#?}"
    );
    assert!(!text.contains("PURGE"));
    assert_eq!(
        proxy
            .metric(&format!(
                "outrider_upstream_connections_opened_total{{endpoint=\"{}\",service=\"svc\"}}",
                echo.addr
            ))
            .await,
        1.0,
        "one keep-alive connection carried all seven requests"
    );
    assert_eq!(proxy.metric("outrider_policy_version").await, 1.0);
    let (_, text) = proxy.admin_get("/metrics").await;
    assert!(
        text.contains(&format!(
            "outrider_build_info{{version=\"{}\",workload=\"checkout\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(proxy.metric("process_resident_memory_bytes").await > 1_000_000.0);
    assert!(proxy.metric("process_open_fds").await >= 5.0);
    // The process collector's standard series: CPU time spent so far (the proxy has served
    // requests and started a runtime), and a start time in the last minutes.
    assert!(proxy.metric("process_cpu_seconds_total").await > 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = proxy.metric("process_start_time_seconds").await;
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "process_start_time_seconds {started}, now {now}"
    );
    // Bounded cardinality: no raw path or peer port appears in any label.
    for path in ["/get/0", "/post"] {
        assert!(!text.contains(path), "raw path {path} in metrics");
    }

    promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_labels_never_share_a_series_with_real_names() {
    // A service and a route named `none` and a route named `listen`: the names the
    // placeholders of unrouted requests and dedicated listeners once used.
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let proxy = start_proxy(&format!(
        "services:\n  none: {{ endpoints: [{}], listen: 127.0.0.1:0 }}\nroutes:\n  - name: none\n    match: {{ authority: none }}\n    service: none\n  - name: listen\n    match: {{ authority: listen }}\n    service: none\n",
        echo.addr
    ));
    assert_eq!(get(proxy.outbound, "none", "/").await.status, 200);
    assert_eq!(get(proxy.outbound, "listen", "/").await.status, 200);
    assert_eq!(get(proxy.outbound, "nowhere", "/").await.status, 404);
    assert_eq!(get(proxy.dedicated("none"), "none", "/").await.status, 200);
    let count = |route: &str, service: &str| {
        let flag = if route == ":unrouted" { "NR" } else { "-" };
        format!("outrider_response_duration_seconds_count{{direction=\"outbound\",flags=\"{flag}\",route=\"{route}\",service=\"{service}\"}}")
    };
    for (route, service) in [
        ("none", "none"),
        ("listen", "none"),
        (":unrouted", ":unrouted"),
        (":listen", "none"),
    ] {
        assert_eq!(
            settled(&proxy, &count(route, service), 1.0).await,
            1.0,
            "route {route} of service {service}"
        );
    }
    let (_, text) = proxy.admin_get("/metrics").await;
    promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_a_route_that_left_the_policy_go_once_its_requests_drain() {
    // `slow` holds its requests until released, so one is in flight across the reload.
    let release = Arc::new(tokio::sync::Notify::new());
    let held = Arc::clone(&release);
    let slow = Upstream::start(Proto::Http1, move |_req: Request<hyper::body::Incoming>| {
        let held = Arc::clone(&held);
        async move {
            held.notified().await;
            http::Response::new(full("late"))
        }
    })
    .await;
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let kept = format!(
        "services:\n  kept: {{ endpoints: [{}] }}\n  gone: {{ endpoints: [{}] }}\nroutes:\n  - name: k\n    match: {{ authority: kept }}\n    service: kept\n",
        echo.addr, slow.addr
    );
    let proxy = start_proxy(&format!(
        "{kept}  - name: g\n    match: {{ authority: gone }}\n    service: gone\n"
    ));
    assert_eq!(get(proxy.outbound, "kept", "/").await.status, 200);
    let outbound = proxy.outbound;
    let in_flight = tokio::spawn(async move { get(outbound, "gone", "/").await });
    let active = "outrider_requests_active{direction=\"outbound\",route=\"g\",service=\"gone\"}";
    assert_eq!(settled(&proxy, active, 1.0).await, 1.0);

    save(&proxy.policy_path(), &kept);
    assert_eq!(settled(&proxy, "outrider_policy_version", 2.0).await, 2.0);
    assert_eq!(get(proxy.outbound, "kept", "/").await.status, 200);
    // Still in flight: its series stay.
    let (_, text) = proxy.admin_get("/metrics").await;
    assert!(text.contains(active), "{text}");

    release.notify_one();
    assert_eq!(in_flight.await.unwrap().status, 200);
    // Route g left the policy (service `gone` stayed: its by-address target keeps series).
    let gone = |text: &str| !text.lines().any(|l| l.contains("route=\"g\""));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = proxy.admin_get("/metrics").await.1;
    while !gone(&text) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = proxy.admin_get("/metrics").await.1;
    }
    assert!(gone(&text), "series of the removed route remain:\n{text}");
    // The route that stayed kept its series and counts across the reload.
    assert_eq!(
        proxy
            .metric("outrider_response_duration_seconds_count{direction=\"outbound\",flags=\"-\",route=\"k\",service=\"kept\"}")
            .await,
        2.0
    );
    promtool_check(&text);
}

/// Runs `promtool check metrics` on an exposition. `.ci/run` installs promtool and sets
/// OUTRIDER_REQUIRE_PROMTOOL=1, so there a missing promtool fails the test.
fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            assert!(
                std::env::var_os("OUTRIDER_REQUIRE_PROMTOOL").is_none(),
                "promtool required but not runnable: {e}"
            );
            eprintln!("promtool not installed; exposition not validated");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn admin_put(proxy: &Proxy, path: &str, body: &str) -> Reply {
    send(
        &http1_client(),
        Request::put(format!("http://{}{path}", proxy.admin))
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_run_time() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let proxy = start_proxy(&policy(echo.addr, closed_port().await, ""));
    let failed_logged = |proxy: &Proxy| {
        proxy
            .logs()
            .iter()
            .filter(|l| l.contains("\"request failed\""))
            .count()
    };
    assert_eq!(proxy.admin_get("/log-level").await, (200, "info\n".into()));
    assert_eq!(get(proxy.outbound, "dead", "/").await.status, 502);
    // The admin answer below is logged after the request's debug line would have been.
    let reply = admin_put(&proxy, "/log-level", "debug").await;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"debug\n"[..]));
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .logs()
            .iter()
            .any(|l| l.contains("log filter changed")))
        .await
    );
    assert_eq!(failed_logged(&proxy), 0, "debug lines before the change");
    assert_eq!(proxy.admin_get("/log-level").await, (200, "debug\n".into()));

    assert_eq!(get(proxy.outbound, "dead", "/").await.status, 502);
    assert!(
        eventually(Duration::from_secs(5), || failed_logged(&proxy) == 1).await,
        "debug line after the change"
    );
    let line = proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("\"request failed\""))
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["level"], "DEBUG");
    assert_eq!(event["service"], "dead");

    let bad = admin_put(&proxy, "/log-level", "outrider_proxy=notalevel").await;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    assert_eq!(proxy.admin_get("/log-level").await, (200, "debug\n".into()));
    let reply = send(
        &http1_client(),
        Request::post(format!("http://{}/log-level", proxy.admin))
            .body(full("info"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 405);
}

/// Request chunks of the uploads below: 100,000 bytes in three chunks of unequal size.
const UPLOAD: [usize; 3] = [40_000, 35_000, 25_000];
/// Response chunks the upstreams stream back without a length: 50,000 bytes.
const DOWNLOAD: [usize; 3] = [20_000, 20_000, 10_000];

/// A body streamed chunk by chunk with no declared length: chunked on HTTP/1.1, DATA frames
/// with no content-length on HTTP/2.
fn streamed(chunks: [usize; 3], byte: u8) -> TestBody {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for n in chunks {
            if tx.send(bytes::Bytes::from(vec![byte; n])).await.is_err() {
                return;
            }
        }
    });
    body
}

/// An upstream that reads the request body to its end and answers with [`DOWNLOAD`] streamed
/// without a length, telling in headers what it received: `x-received` (body bytes) and
/// `x-content-length` (the header as it arrived, `none` when absent). With `fail_first`, the
/// first request (body read all the same) is answered 503, to be retried.
async fn sink(proto: Proto, fail_first: bool) -> Upstream {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Upstream::start(proto, move |req: Request<hyper::body::Incoming>| {
        let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let length = req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .map_or("none".to_string(), |v| v.to_str().unwrap().to_string());
            let received = drain_body(req.into_body()).await;
            let status = if fail_first && call == 0 { 503 } else { 200 };
            http::Response::builder()
                .status(status)
                .header("x-received", received)
                .header("x-content-length", length)
                .body(streamed(DOWNLOAD, b'r'))
                .unwrap()
        }
    })
    .await
}

/// The request and response bytes of chunked HTTP/1.1 and HTTP/2 bodies are the bytes that
/// crossed the proxy, on the outbound and inbound listeners, once per request under retries;
/// the old Content-Length reading counted each of these uploads as 0 (and a
/// per-attempt count would give the retried one 200,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_counted_as_they_cross_whatever_the_framing() {
    let h1 = sink(Proto::Http1, false).await;
    let h2 = sink(Proto::Http2, false).await;
    let flaky = sink(Proto::Http1, true).await;
    let route = |name: &str, service: &str| {
        format!("  - name: {name}\n    match: {{ authority: {name} }}\n    service: {service}\n")
    };
    let proxy = start_proxy(&format!(
        "access_log: json\nservices:\n  h1: {{ endpoints: [{}] }}\n  h2: {{ endpoints: [{}], protocol: http2 }}\n  flaky:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], body_limit: 256KiB, backoff: {{ base: 1ms, max: 5ms }} }}\nroutes:\n{}{}{}{}inbound: {{ app: {} }}\n",
        h1.addr,
        h2.addr,
        flaky.addr,
        route("chunked", "h1"),
        route("sized", "h1"),
        route("h2c", "h2"),
        route("retried", "flaky"),
        h1.addr,
    ));
    let client = http1_client();
    let upload = |addr: std::net::SocketAddr, host: &str, path: &str, body: TestBody| {
        Request::put(format!("http://{addr}{path}"))
            .header("host", host)
            .body(body)
            .unwrap()
    };
    let total: usize = UPLOAD.iter().sum();
    let downloaded: usize = DOWNLOAD.iter().sum();

    let chunked = send(
        &client,
        upload(
            proxy.outbound,
            "chunked",
            "/chunked",
            streamed(UPLOAD, b'c'),
        ),
    )
    .await;
    let sized = send(
        &client,
        upload(proxy.outbound, "sized", "/sized", full(vec![b's'; total])),
    )
    .await;
    let h2c = send_h2_via(
        proxy.outbound,
        Request::put("http://h2c/h2c")
            .body(streamed(UPLOAD, b'h'))
            .unwrap(),
    )
    .await;
    let retried = send(
        &client,
        upload(
            proxy.outbound,
            "retried",
            "/retried",
            streamed(UPLOAD, b'r'),
        ),
    )
    .await;
    let inbound = send(
        &client,
        upload(proxy.inbound, "app", "/inbound", streamed(UPLOAD, b'i')),
    )
    .await;
    let total_text = total.to_string();
    for (name, reply, length) in [
        ("chunked", &chunked, "none"),
        ("sized", &sized, total_text.as_str()),
        ("h2c", &h2c, "none"),
        ("retried", &retried, "none"),
        ("inbound", &inbound, "none"),
    ] {
        assert_eq!(reply.status, 200, "{name}");
        assert_eq!(
            reply.header("x-received"),
            Some(total_text.as_str()),
            "{name}: the upstream got the whole upload"
        );
        assert_eq!(
            reply.header("x-content-length"),
            Some(length),
            "{name}: the upload's framing reached the upstream as sent"
        );
        assert_eq!(reply.body.len(), downloaded, "{name}");
    }
    assert_eq!(flaky.hits(), 2, "the retried upload was sent twice");

    let series = |name: &str, direction: &str, route: &str, service: &str| {
        format!("{name}{{direction=\"{direction}\",route=\"{route}\",service=\"{service}\"}}")
    };
    for (direction, route, service) in [
        ("outbound", "chunked", "h1"),
        ("outbound", "sized", "h1"),
        ("outbound", "h2c", "h2"),
        ("outbound", "retried", "flaky"),
        ("inbound", "inbound", "app"),
    ] {
        let requests = series("outrider_request_bytes_total", direction, route, service);
        assert_eq!(
            settled(&proxy, &requests, total as f64).await,
            total as f64,
            "{requests}"
        );
        let responses = series("outrider_response_bytes_total", direction, route, service);
        assert_eq!(
            settled(&proxy, &responses, downloaded as f64).await,
            downloaded as f64,
            "{responses}"
        );
    }

    assert!(
        eventually(Duration::from_secs(5), || proxy.stdout_lines().len() >= 5).await,
        "{:?}",
        proxy.stdout_lines()
    );
    let lines: Vec<serde_json::Value> = proxy
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 5, "{lines:#?}");
    for (path, attempts) in [
        ("/chunked", 1),
        ("/sized", 1),
        ("/h2c", 1),
        ("/retried", 2),
        ("/inbound", 1),
    ] {
        let line = lines.iter().find(|l| l["path"] == path).unwrap();
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["attempts"], attempts, "{line}");
        assert_eq!(line["request_bytes"], total, "{line}");
        assert_eq!(line["response_bytes"], downloaded, "{line}");
    }
}

/// An upstream that answers 413 once it has read the first chunk of an upload, before the
/// rest is sent: the access line (written when the response ends) has the bytes that passed
/// by then, and the metric (added when the request body ends) the same, as nothing more crossed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_counts_the_bytes_that_passed() {
    let first = UPLOAD[0];
    let refuser = Upstream::start(Proto::Http1, move |req: Request<hyper::body::Incoming>| {
        use http_body_util::BodyExt;
        async move {
            let mut body = req.into_body();
            let mut read = 0;
            while read < first {
                match body.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                    _ => break,
                }
            }
            http::Response::builder()
                .status(413)
                .header("x-received", read)
                .body(full("too large"))
                .unwrap()
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        "access_log: json\nservices:\n  refuser: {{ endpoints: [{}] }}\nroutes:\n  - name: early\n    match: {{ authority: early }}\n    service: refuser\n",
        refuser.addr
    ));
    let (tx, body) = channel_body();
    tx.send(bytes::Bytes::from(vec![b'e'; first]))
        .await
        .unwrap();
    let reply = send(
        &http1_client(),
        Request::put(format!("http://{}/early", proxy.outbound))
            .header("host", "early")
            .body(body)
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.header("x-received"), Some(first.to_string().as_str()));
    assert!(
        eventually(Duration::from_secs(5), || !proxy.stdout_lines().is_empty()).await,
        "no access line"
    );
    // The upload is still open when the line is written: it has what passed so far.
    let line: serde_json::Value = serde_json::from_str(&proxy.stdout_lines()[0]).unwrap();
    assert_eq!(line["status"], 413, "{line}");
    assert_eq!(line["request_bytes"], first, "{line}");
    assert_eq!(line["response_bytes"], "too large".len(), "{line}");
    // The caller ends its upload without sending more: the body ends, the metric is added.
    drop(tx);
    let series =
        "outrider_request_bytes_total{direction=\"outbound\",route=\"early\",service=\"refuser\"}";
    assert_eq!(
        settled(&proxy, series, first as f64).await,
        first as f64,
        "{series}"
    );
}

/// The proxy's own log fields are plain text, not Rust debug text (`"outcome":"drained"`, not
/// `"Drained"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_logs_show_plain_values() {
    let echo = Upstream::echo(Proto::Http1, "echo").await;
    let dead = closed_port().await;
    let mut proxy = start_proxy(&policy(echo.addr, dead, ""));
    proxy.terminate();
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let logs = proxy.logs();
    let field = |message: &str, name: &str| -> serde_json::Value {
        let line = logs
            .iter()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no {message:?} in {logs:?}"));
        serde_json::from_str::<serde_json::Value>(line).unwrap()[name].clone()
    };
    assert_eq!(field("shutdown complete", "outcome"), "drained");
    assert_eq!(field("draining", "drain_timeout"), "30s");
}
