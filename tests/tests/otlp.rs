//! OTLP export end to end: test collectors built on the opentelemetry-proto types (gRPC through
//! tonic, HTTP/protobuf through hyper) receive the proxies' spans with the right parent/child
//! links, kinds, attributes and resource; with the collector down requests still succeed and
//! the spans are counted as dropped; spans are flushed on graceful shutdown. A collector told
//! to fail its first exports (gRPC UNAVAILABLE, HTTP 503) still gets every span, through the
//! exporter's retries; a non-retryable failure drops the batch at once, counted and logged at
//! WARN; an https:// collector is verified against `--otlp-ca-file`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use outrider_e2e::*;
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A span as received, with the resource it came under.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    resource: Vec<KeyValue>,
    trace_id: String,
    span_id: String,
    parent_id: String,
    kind: i32,
    name: String,
    attributes: Vec<KeyValue>,
    error: bool,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.attributes, key)
    }
}

fn attr(list: &[KeyValue], key: &str) -> Option<String> {
    list.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
    /// Export calls received, failed or not.
    calls: Arc<AtomicUsize>,
    /// Exports still to fail, and how.
    fail_first: Arc<AtomicUsize>,
    failure: Failure,
}

/// How a collector told to fail answers.
#[derive(Clone, Copy, Default)]
enum Failure {
    /// gRPC UNAVAILABLE / HTTP 503: retryable.
    #[default]
    Unavailable,
    /// gRPC INVALID_ARGUMENT / HTTP 400: not retryable.
    Invalid,
}

impl Collector {
    fn failing(n: usize, failure: Failure) -> Self {
        Self {
            fail_first: Arc::new(AtomicUsize::new(n)),
            failure,
            ..Self::default()
        }
    }

    /// Counts a call; true when it is to fail.
    fn call_fails(&self) -> bool {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Got {
                        service: attr(&resource, "service.name").unwrap_or_default(),
                        resource: resource.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_id: hex(&s.parent_span_id),
                        kind: s.kind,
                        name: s.name,
                        attributes: s.attributes,
                        error: s.status.is_some_and(|st| st.code == 2),
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Got> {
        assert!(
            eventually(Duration::from_secs(10), || self.spans.lock().unwrap().len()
                >= n)
            .await,
            "expected {n} spans, got {:?}",
            self.spans()
        );
        self.spans()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.call_fails() {
            return Err(match self.failure {
                Failure::Unavailable => tonic::Status::unavailable("collector warming up"),
                Failure::Invalid => tonic::Status::invalid_argument("rejected batch"),
            });
        }
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC collector on 127.0.0.1:0.
async fn grpc_collector() -> (SocketAddr, Collector) {
    grpc_collector_as(Collector::default()).await
}

async fn grpc_collector_as(collector: Collector) -> (SocketAddr, Collector) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, collector)
}

/// An OTLP/HTTP (protobuf) collector on 127.0.0.1:0, answering POST /v1/traces.
async fn http_collector() -> (SocketAddr, Collector) {
    http_collector_as(Collector::default(), None).await
}

/// An OTLP/HTTP collector, behind TLS when `tls` is given.
async fn http_collector_as(
    collector: Collector,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, Collector) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = collector.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let c = c.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let c = c.clone();
                async move {
                    assert_eq!(req.uri().path(), "/v1/traces");
                    assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    if c.call_fails() {
                        let mut res = http::Response::new(full("no"));
                        *res.status_mut() = match c.failure {
                            Failure::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
                            Failure::Invalid => http::StatusCode::BAD_REQUEST,
                        };
                        return Ok::<_, Infallible>(res);
                    }
                    c.take(ExportTraceServiceRequest::decode(body).unwrap());
                    let reply = ExportTraceServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec();
                    let mut res = http::Response::new(full(reply));
                    res.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/x-protobuf"),
                    );
                    Ok::<_, Infallible>(res)
                }
            });
            let tls = tls.clone();
            tokio::spawn(async move {
                let http1 = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    None => http1.serve_connection(TokioIo::new(stream), service).await,
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        http1.serve_connection(TokioIo::new(stream), service).await
                    }
                };
            });
        }
    });
    (addr, collector)
}

fn tracing_section(collector: SocketAddr, protocol: &str) -> String {
    format!("tracing: {{ sampling: parent_based, ratio: 1.0, otlp: {{ endpoint: 'http://{collector}', protocol: {protocol} }} }}\n")
}

async fn traced_get(proxy: &Proxy, host: &str, traceparent: &str) -> Reply {
    send(
        &http1_client(),
        Request::get(format!("http://{}/items/7?q=1", proxy.outbound))
            .header("host", host)
            .header("traceparent", traceparent)
            .body(empty())
            .unwrap(),
    )
    .await
}

/// app -> A (client span) -> B (server span) -> app, both exporting over `protocol`.
async fn chain_exports_linked_spans(protocol: &str) {
    let (collector_addr, collector) = match protocol {
        "grpc" => grpc_collector().await,
        _ => http_collector().await,
    };
    let tracing = tracing_section(collector_addr, protocol);
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy_b = start_proxy_with(
        &format!("inbound: {{ app: {} }}\n{tracing}", app.addr),
        &["--workload", "svc-b"],
    );
    let proxy_a = start_proxy_with(
        &format!(
            "services:\n  b: {{ endpoints: [{}] }}\nroutes:\n  - name: to-b\n    match: {{ authority: b }}\n    service: b\n{tracing}",
            proxy_b.inbound
        ),
        &["--workload", "svc-a"],
    );
    let reply = traced_get(&proxy_a, "b:8080", &format!("00-{TRACE}-{PARENT}-01")).await;
    assert_eq!(reply.status, 200);
    let at_app = reply.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();

    let spans = collector.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let a = spans
        .iter()
        .find(|s| s.service == "svc-a")
        .expect("span of A");
    let b = spans
        .iter()
        .find(|s| s.service == "svc-b")
        .expect("span of B");
    for s in [a, b] {
        assert_eq!(s.trace_id, TRACE);
        assert_eq!(s.name, "GET");
        assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.attr("url.path").as_deref(), Some("/items/7"));
        assert_eq!(s.attr("server.address").as_deref(), Some("b"));
        assert_eq!(s.attr("server.port").as_deref(), Some("8080"));
        assert_eq!(s.attr("outrider.attempts").as_deref(), Some("1"));
        assert!(!s.error);
        assert_eq!(
            attr(&s.resource, "deployment.environment").as_deref(),
            Some("e2e"),
            "OTEL_RESOURCE_ATTRIBUTES reaches the resource"
        );
    }
    assert_eq!(a.kind, SpanKind::Client as i32);
    assert_eq!(a.parent_id, PARENT, "A's span is a child of the caller's");
    // http.route is the matched route's template; its name is outrider.route.
    assert_eq!(a.attr("http.route").as_deref(), Some("/*"));
    assert_eq!(a.attr("outrider.route").as_deref(), Some("to-b"));
    assert_eq!(b.kind, SpanKind::Server as i32);
    assert_eq!(b.parent_id, a.span_id, "B's span is a child of A's");
    assert_eq!(b.attr("http.route"), None, "no route matched inbound");
    assert_eq!(b.attr("outrider.route").as_deref(), Some("inbound"));
    assert_eq!(
        at_app,
        format!("00-{TRACE}-{}-01", b.span_id),
        "the app's parent is B's span"
    );
    // Exactly the spans received are counted as exported (once the export call has
    // returned to the proxy), none dropped.
    for proxy in [&proxy_a, &proxy_b] {
        assert_eq!(
            metric_settled(proxy, "outrider_spans_exported_total", 1.0).await,
            1.0
        );
        assert_eq!(proxy.metric("outrider_spans_dropped_total").await, 0.0);
    }
}

/// The metric once it reaches `expected` (or its value after 10 s): counters that the export
/// task updates after the collector answered.
async fn metric_settled(proxy: &Proxy, series: &str, expected: f64) -> f64 {
    metric_settled_within(proxy, series, expected, Duration::from_secs(10)).await
}

async fn metric_settled_within(
    proxy: &Proxy,
    series: &str,
    expected: f64,
    within: Duration,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let value = proxy.metric(series).await;
        if value == expected || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set_resource_env() {
    // Each test runs in its own process under nextest; the proxies inherit the variable.
    std::env::set_var("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_receives_linked_client_and_server_spans() {
    set_resource_env();
    chain_exports_linked_spans("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_receives_linked_client_and_server_spans() {
    set_resource_env();
    chain_exports_linked_spans("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_attempts_are_child_spans_of_the_request_span() {
    let (collector_addr, collector) = grpc_collector().await;
    let hits = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&hits);
    let flaky = Upstream::start(Proto::Http1, move |req: Request<Incoming>| {
        let record = Arc::clone(&record);
        async move {
            let mut seen = record.lock().unwrap();
            seen.push(req.headers()["traceparent"].to_str().unwrap().to_string());
            let mut res = http::Response::new(empty());
            if seen.len() == 1 {
                *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            res
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        "services:\n  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 2ms }} }}\nroutes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n{}",
        flaky.addr,
        tracing_section(collector_addr, "grpc")
    ));
    let reply = traced_get(&proxy, "svc", &format!("00-{TRACE}-{PARENT}-01")).await;
    assert_eq!(reply.status, 200);
    let spans = collector.wait_for(3).await;
    assert_eq!(spans.len(), 3, "{spans:?}");
    let request = spans.iter().find(|s| s.parent_id == PARENT).unwrap();
    assert_eq!(request.attr("outrider.attempts").as_deref(), Some("2"));
    assert_eq!(
        request.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    let mut attempts: Vec<&Got> = spans
        .iter()
        .filter(|s| s.parent_id == request.span_id)
        .collect();
    attempts.sort_by_key(|s| s.attr("http.request.resend_count"));
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].attr("http.request.resend_count"), None);
    assert_eq!(
        attempts[0].attr("http.response.status_code").as_deref(),
        Some("503")
    );
    assert!(attempts[0].error);
    assert_eq!(
        attempts[1].attr("http.request.resend_count").as_deref(),
        Some("1")
    );
    assert_eq!(
        attempts[1].attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(!attempts[1].error);
    assert_eq!(
        attempts[0].attr("network.peer.port"),
        Some(flaky.addr.port().to_string())
    );
    // The upstream saw each attempt's own span as its parent.
    let seen = hits.lock().unwrap().clone();
    assert_eq!(seen[0], format!("00-{TRACE}-{}-01", attempts[0].span_id));
    assert_eq!(seen[1], format!("00-{TRACE}-{}-01", attempts[1].span_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_requests_succeed_and_spans_are_counted_dropped() {
    // A port that was bound and released: connections to it are refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n{}",
        app.addr,
        tracing_section(dead, "grpc")
    ));
    const N: usize = 300;
    let client = http1_client();
    let started = Instant::now();
    for _ in 0..N {
        let one = Instant::now();
        let reply = send(
            &client,
            Request::get(format!("http://{}/", proxy.outbound))
                .header("host", "svc")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, 200);
        assert!(
            one.elapsed() < Duration::from_millis(500),
            "a request waited on export"
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{N} requests took {took:?}");
    // Counted once the exporter gives up: 6 tries with 7.75 to 15.5 s of backoff between them.
    let dropped = metric_settled_within(
        &proxy,
        "outrider_spans_dropped_total",
        N as f64,
        Duration::from_secs(25),
    )
    .await;
    assert_eq!(dropped, N as f64, "every span counted as dropped");
    assert_eq!(proxy.metric("outrider_spans_exported_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_flushed_on_graceful_shutdown() {
    let (collector_addr, collector) = grpc_collector().await;
    let app = Upstream::echo(Proto::Http1, "app").await;
    let mut proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n{}",
        app.addr,
        tracing_section(collector_addr, "grpc")
    ));
    for _ in 0..3 {
        assert_eq!(get(proxy.outbound, "svc", "/").await.status, 200);
    }
    // Well inside the batch delay: only the shutdown flush can deliver them this early.
    proxy.terminate();
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(collector.spans().len(), 3, "{:?}", collector.spans());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_export_nothing() {
    let (collector_addr, collector) = grpc_collector().await;
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n{}",
        app.addr,
        tracing_section(collector_addr, "grpc")
    ));
    for _ in 0..5 {
        traced_get(&proxy, "svc", &format!("00-{TRACE}-{PARENT}-00")).await;
    }
    traced_get(&proxy, "svc", &format!("00-{TRACE}-{PARENT}-01")).await;
    // Spans leave the queue in order: had the unsampled requests produced any, they would
    // have arrived no later than the sampled one.
    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0].parent_id, PARENT);
}

/// Replaces the policy file the way an editor does (write aside, rename over).
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_version(proxy: &Proxy, version: f64) {
    assert_eq!(
        metric_settled(proxy, "outrider_policy_version", version).await,
        version,
        "policy version {version} never applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_the_collector() {
    let (first_addr, first) = grpc_collector().await;
    let (second_addr, second) = http_collector().await;
    let app = Upstream::echo(Proto::Http1, "app").await;
    let routes = format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n",
        app.addr
    );
    let proxy = start_proxy(&routes);
    let path = proxy.policy_path();
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    traced_get(&proxy, "svc", &traceparent).await;

    save(
        &path,
        &format!("{routes}{}", tracing_section(first_addr, "grpc")),
    );
    wait_version(&proxy, 2.0).await;
    traced_get(&proxy, "svc", &traceparent).await;
    assert_eq!(first.wait_for(1).await.len(), 1);

    save(
        &path,
        &format!("{routes}{}", tracing_section(second_addr, "http")),
    );
    wait_version(&proxy, 3.0).await;
    traced_get(&proxy, "svc", &traceparent).await;
    assert_eq!(second.wait_for(1).await.len(), 1);

    save(&path, &routes);
    wait_version(&proxy, 4.0).await;
    traced_get(&proxy, "svc", &traceparent).await;
    // Spans leave in order and the last collector got exactly its one: nothing after the
    // tracing section went away, and nothing before it was added.
    assert_eq!(
        metric_settled(&proxy, "outrider_spans_exported_total", 2.0).await,
        2.0
    );
    assert_eq!(first.spans().len(), 1);
    assert_eq!(second.spans().len(), 1);
    assert_eq!(proxy.metric("outrider_spans_dropped_total").await, 0.0);
}

/// Five requests through a proxy exporting to `collector_addr` (one batch): their spans.
async fn five_traced_requests(collector_addr: SocketAddr, protocol: &str) -> Proxy {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n{}",
        app.addr,
        tracing_section(collector_addr, protocol)
    ));
    for _ in 0..5 {
        let reply = traced_get(&proxy, "svc", &format!("00-{TRACE}-{PARENT}-01")).await;
        assert_eq!(reply.status, 200);
    }
    proxy
}

/// The collector fails the first three exports with a retryable status; the exporter retries
/// the batch (backoff 0.25-0.5 s, 0.5-1 s, 1-2 s) and every span arrives.
async fn retryable_failures_lose_no_span(protocol: &str) {
    let failing = Collector::failing(3, Failure::Unavailable);
    let (addr, collector) = match protocol {
        "grpc" => grpc_collector_as(failing).await,
        _ => http_collector_as(failing, None).await,
    };
    let proxy = five_traced_requests(addr, protocol).await;
    assert_eq!(collector.wait_for(5).await.len(), 5);
    assert_eq!(
        collector.calls(),
        4,
        "three failed tries, then the one accepted"
    );
    assert_eq!(
        metric_settled(&proxy, "outrider_spans_exported_total", 5.0).await,
        5.0
    );
    assert_eq!(proxy.metric("outrider_spans_dropped_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_unavailable_three_times_still_gets_every_span() {
    retryable_failures_lose_no_span("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_503_three_times_still_gets_every_span() {
    retryable_failures_lose_no_span("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_answer_drops_the_batch_counted_and_warned() {
    let (addr, collector) = grpc_collector_as(Collector::failing(1, Failure::Invalid)).await;
    let proxy = five_traced_requests(addr, "grpc").await;
    // Dropped after the one try: a retry would have come within half a second and counted the
    // spans only after the last one, seconds later.
    assert_eq!(
        metric_settled(&proxy, "outrider_spans_dropped_total", 5.0).await,
        5.0
    );
    assert_eq!(collector.calls(), 1);
    assert!(collector.spans().is_empty());
    assert_eq!(proxy.metric("outrider_spans_exported_total").await, 0.0);
    // The operator sees why, at WARN (not only a rising counter).
    let logs = proxy.logs();
    assert!(
        logs.iter().any(|l| l.contains("WARN")
            && l.contains("span export failed")
            && l.contains("gRPC status 3")),
        "{logs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_collector_is_verified_against_the_ca_file() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (addr, collector) = http_collector_as(Collector::default(), Some(acceptor)).await;

    let dir = TempDir::new();
    let ca_file = dir.path.join("collector-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy = start_proxy_with(
        &format!(
            "services:\n  svc: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\ntracing: {{ ratio: 1.0, otlp: {{ endpoint: 'https://localhost:{}', protocol: http }} }}\n",
            app.addr,
            addr.port()
        ),
        &["--otlp-ca-file", ca_file.to_str().unwrap()],
    );
    let reply = traced_get(&proxy, "svc", &format!("00-{TRACE}-{PARENT}-01")).await;
    assert_eq!(reply.status, 200);
    let spans = collector.wait_for(1).await;
    assert_eq!(spans[0].trace_id, TRACE);
    assert_eq!(
        metric_settled(&proxy, "outrider_spans_exported_total", 1.0).await,
        1.0
    );
}
