//! Trace-context propagation end to end: app -> proxy A -> proxy B -> app keeps the trace id,
//! changes the parent id at each hop and keeps tracestate; a request without context, or with a
//! malformed one, gets a fresh valid context; B3 callers keep their format; each retry attempt
//! is its own span. Real binaries, real servers on 127.0.0.1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};

use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use outrider_e2e::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Splits a version-00 traceparent into trace id, parent id and flags, checking its shape.
fn fields(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "{traceparent}");
    let hex = |s: &str, len| {
        assert_eq!(s.len(), len, "{traceparent}");
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{traceparent}"
        );
        assert!(s.bytes().any(|b| b != b'0'), "all-zero id in {traceparent}");
        s.to_string()
    };
    (hex(parts[1], 32), hex(parts[2], 16), parts[3].to_string())
}

/// A relay app between the two proxies: records the headers proxy A sent, then forwards the
/// request to `next` (proxy B's inbound port) and returns its answer.
async fn relay(next: std::net::SocketAddr, seen: Arc<Mutex<Vec<HeaderMap>>>) -> Upstream {
    Upstream::start(Proto::Http1, move |req: Request<Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let (parts, _) = req.into_parts();
            seen.lock().unwrap().push(parts.headers.clone());
            let mut forward = Request::get(format!("http://{next}{}", parts.uri.path()));
            for (name, value) in &parts.headers {
                forward = forward.header(name, value);
            }
            let res = http1_client()
                .request(forward.body(empty()).unwrap())
                .await
                .unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            http::Response::new(full(body))
        }
    })
    .await
}

fn outbound_policy(service: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "services:\n  {service}: {{ endpoints: [{addr}] }}\nroutes:\n  - name: r\n    match: {{ authority: {service} }}\n    service: {service}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_keeps_the_trace_and_changes_the_parent_at_each_hop() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy_b = start_proxy(&format!("inbound: {{ app: {} }}\n", app.addr));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let middle = relay(proxy_b.inbound, Arc::clone(&seen)).await;
    let proxy_a = start_proxy(&outbound_policy("svc-b", middle.addr, ""));

    let sent = format!("00-{TRACE}-{PARENT}-01");
    let state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy_a.outbound))
            .header("host", "svc-b")
            .header("traceparent", &sent)
            .header("tracestate", state)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let at_app = reply.json()["headers"].clone();

    let from_a = seen.lock().unwrap()[0]["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let (trace_a, parent_a, flags_a) = fields(&from_a);
    let (trace_app, parent_app, flags_app) = fields(at_app["traceparent"].as_str().unwrap());
    assert_eq!(trace_a, TRACE);
    assert_eq!(
        trace_app, TRACE,
        "the last app sees the first app's trace id"
    );
    assert_ne!(parent_a, PARENT, "proxy A forwards its own span id");
    assert_ne!(parent_app, parent_a, "proxy B forwards its own span id");
    assert_eq!((flags_a.as_str(), flags_app.as_str()), ("01", "01"));
    assert_eq!(seen.lock().unwrap()[0]["tracestate"], state);
    assert_eq!(at_app["tracestate"], state, "tracestate survives both hops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_decision_not_to_sample_is_kept() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&outbound_policy("svc", app.addr, ""));
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy.outbound))
            .header("host", "svc")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-00"))
            .body(empty())
            .unwrap(),
    )
    .await;
    let (trace, _, flags) = fields(reply.json()["headers"]["traceparent"].as_str().unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "00"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_context_gets_a_fresh_valid_one_sampled_at_the_ratio() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    // New traces carry the random flag (Trace Context Level 2): our trace ids are random.
    for (ratio, flags) in [("1.0", "03"), ("0.0", "02")] {
        let proxy = start_proxy(&outbound_policy(
            "svc",
            app.addr,
            &format!("tracing: {{ sampling: parent_based, ratio: {ratio} }}\n"),
        ));
        let mut traces = std::collections::HashSet::new();
        for _ in 0..5 {
            let reply = get(proxy.outbound, "svc", "/").await;
            let headers = &reply.json()["headers"];
            let (trace, _, f) = fields(headers["traceparent"].as_str().unwrap());
            assert_eq!(f, flags, "ratio {ratio}");
            assert!(headers.get("tracestate").is_none());
            traces.insert(trace);
        }
        assert_eq!(traces.len(), 5, "every new trace has its own id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_traceparents_are_replaced_never_forwarded() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&outbound_policy("svc", app.addr, ""));
    for bad in [
        format!("00-{TRACE}-{PARENT}-0"),                   // wrong length
        format!("00-{TRACE}-{PARENT}-01-extra"),            // version 00 longer than 55
        format!("00-{}-{PARENT}-01", TRACE.to_uppercase()), // uppercase hex
        format!("00-{}-{PARENT}-01", "0".repeat(32)),       // all-zero trace id
        format!("00-{TRACE}-{}-01", "0".repeat(16)),        // all-zero parent id
        format!("ff-{TRACE}-{PARENT}-01"),                  // version ff
    ] {
        let reply = send(
            &http1_client(),
            Request::get(format!("http://{}/x", proxy.outbound))
                .header("host", "svc")
                .header("traceparent", &bad)
                .header("tracestate", "rojo=1")
                .body(empty())
                .unwrap(),
        )
        .await;
        let headers = &reply.json()["headers"];
        let forwarded = headers["traceparent"].as_str().unwrap();
        assert_ne!(forwarded, bad);
        let (trace, _, _) = fields(forwarded);
        assert_ne!(trace, TRACE, "{bad}: a new trace, not a repaired one");
        assert_ne!(trace.to_uppercase(), TRACE.to_uppercase(), "{bad}");
        assert!(
            headers.get("tracestate").is_none(),
            "{bad}: tracestate of an invalid context must not be forwarded"
        );
    }
    // A future version is parsed by its first four fields and continued as version 00.
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy.outbound))
            .header("host", "svc")
            .header("traceparent", format!("cc-{TRACE}-{PARENT}-01-future"))
            .body(empty())
            .unwrap(),
    )
    .await;
    let (trace, parent, _) = fields(reply.json()["headers"]["traceparent"].as_str().unwrap());
    assert_eq!(trace, TRACE);
    assert_ne!(parent, PARENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_callers_keep_their_format_and_get_traceparent_too() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&outbound_policy("svc", app.addr, ""));
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy.outbound))
            .header("host", "svc")
            .header("b3", format!("{TRACE}-{PARENT}-1"))
            .body(empty())
            .unwrap(),
    )
    .await;
    let headers = &reply.json()["headers"];
    let (trace, span, _) = fields(headers["traceparent"].as_str().unwrap());
    assert_eq!(trace, TRACE);
    assert_eq!(
        headers["b3"].as_str().unwrap(),
        format!("{TRACE}-{span}-1-{PARENT}")
    );

    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy.outbound))
            .header("host", "svc")
            .header("x-b3-traceid", PARENT)
            .header("x-b3-spanid", PARENT)
            .header("x-b3-sampled", "1")
            .body(empty())
            .unwrap(),
    )
    .await;
    let headers = &reply.json()["headers"];
    let (trace, span, flags) = fields(headers["traceparent"].as_str().unwrap());
    assert_eq!(trace, format!("{}{PARENT}", "0".repeat(16)));
    assert_eq!(flags, "01");
    assert_eq!(
        headers["x-b3-traceid"], PARENT,
        "64-bit ids keep their width"
    );
    assert_eq!(headers["x-b3-spanid"].as_str().unwrap(), span);
    assert_eq!(headers["x-b3-parentspanid"], PARENT);
    assert_eq!(headers["x-b3-sampled"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_attempt_is_its_own_span() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&seen);
    let flaky = Upstream::start(Proto::Http1, move |req: Request<Incoming>| {
        let record = Arc::clone(&record);
        async move {
            let mut seen = record.lock().unwrap();
            seen.push(req.headers()["traceparent"].to_str().unwrap().to_string());
            let status = if seen.len() == 1 { 503 } else { 200 };
            let mut res = http::Response::new(empty());
            *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
            res
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 2ms }} }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        flaky.addr
    ));
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy.outbound))
            .header("host", "svc")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let (t1, p1, _) = fields(&seen[0]);
    let (t2, p2, _) = fields(&seen[1]);
    assert_eq!((t1.as_str(), t2.as_str()), (TRACE, TRACE));
    assert_ne!(p1, p2, "each attempt carries its own span id");
    assert_ne!(p1, PARENT);
}
