//! What the exported spans say, received by an OTLP/gRPC collector built on the
//! opentelemetry-proto types: span status by side (server 4xx unset, client 4xx error), the
//! semantic-convention attributes (`network.protocol.version`, redacted `url.query` and
//! `url.full`, `server.port` from the scheme, `http.route` as the matched template,
//! `trace_state`, the random flag), gRPC spans (`rpc.*` and status by OpenTelemetry's gRPC
//! rules), cancelled gRPC calls marked cancelled (span, metrics, access log), and a span for
//! an unrouted request. Real binaries, a real tonic client and server.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
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
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Response, Status};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const STEP: Duration = Duration::from_secs(10);

/// A span as received.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    parent_id: String,
    kind: i32,
    attributes: Vec<KeyValue>,
    /// 0 unset, 1 ok, 2 error.
    status: i32,
    trace_state: String,
    flags: u32,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                other => format!("{other:?}"),
            })
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = resource
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        parent_id: s
                            .parent_span_id
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect(),
                        kind: s.kind,
                        attributes: s.attributes,
                        status: s.status.map_or(0, |st| st.code),
                        trace_state: s.trace_state,
                        flags: s.flags,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> (SocketAddr, Self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (addr, collector)
    }

    /// The spans received once there are `n` (or after 10 s), cleared.
    async fn take(&self, n: usize) -> Vec<Got> {
        let arrived = eventually(STEP, || self.spans.lock().unwrap().len() >= n).await;
        let spans = std::mem::take(&mut *self.spans.lock().unwrap());
        assert!(arrived, "expected {n} spans, got {spans:?}");
        assert_eq!(spans.len(), n, "{spans:?}");
        spans
    }
}

fn tracing_section(collector: SocketAddr) -> String {
    format!("tracing: {{ sampling: parent_based, ratio: 1.0, otlp: {{ endpoint: 'http://{collector}', protocol: grpc }} }}\n")
}

/// Caller -> proxy A (client span) -> proxy B (server span) -> `app`.
fn chain(app: SocketAddr, collector: SocketAddr, protocol: &str, extra: &str) -> (Proxy, Proxy) {
    let tracing = tracing_section(collector);
    let b = start_proxy_with(
        &format!("inbound: {{ app: {app}, protocol: {protocol} }}\n{tracing}{extra}"),
        &["--workload", "svc-b"],
    );
    let a = start_proxy_with(
        &format!(
            "services:\n  b: {{ endpoints: [{}], protocol: {protocol} }}\nroutes:\n  - name: to-b\n    match: {{ authority: b, path_prefix: / }}\n    service: b\n{tracing}{extra}",
            b.inbound
        ),
        &["--workload", "svc-a"],
    );
    (a, b)
}

fn split(spans: &[Got]) -> (&Got, &Got) {
    let a = spans.iter().find(|s| s.service == "svc-a").unwrap();
    let b = spans.iter().find(|s| s.service == "svc-b").unwrap();
    assert_eq!(a.kind, SpanKind::Client as i32);
    assert_eq!(b.kind, SpanKind::Server as i32);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_spans_follow_the_conventions() {
    let (collector_addr, collector) = Collector::start().await;
    let app = Upstream::start(Proto::Http1, |req: Request<Incoming>| async move {
        let mut res = http::Response::new(empty());
        if req.uri().path().ends_with("/missing") {
            *res.status_mut() = http::StatusCode::NOT_FOUND;
        }
        res
    })
    .await;
    let (a, _b) = chain(app.addr, collector_addr, "http1", "");
    let http = http1_client();
    let call = |path: &str| {
        send(
            &http,
            Request::get(format!("http://{}{path}", a.outbound))
                .header("host", "b")
                .header("traceparent", format!("00-{TRACE}-{PARENT}-03"))
                .header("tracestate", "rojo=00f067aa0ba902b7")
                .body(empty())
                .unwrap(),
        )
    };
    assert_eq!(call("/items/7?token=s3cret&q=1").await.status, 200);
    let spans = collector.take(2).await;
    let (client, server) = split(&spans);
    for s in [client, server] {
        assert_eq!(s.status, 0, "{s:?}");
        assert_eq!(s.attr("error.type"), None);
        assert_eq!(s.attr("network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(s.attr("server.address").as_deref(), Some("b"));
        assert_eq!(
            s.attr("server.port").as_deref(),
            Some("80"),
            "Host without a port"
        );
        assert_eq!(
            s.trace_state, "rojo=00f067aa0ba902b7",
            "the tracestate forwarded"
        );
        assert_eq!(s.flags & 0x03, 0x03, "sampled and random: {:#x}", s.flags);
        assert_eq!(
            s.attr("outrider.response_flags").as_deref(),
            Some("-"),
            "the upstream's response"
        );
    }
    assert_eq!(client.parent_id, PARENT);
    assert_eq!(
        client.attr("url.full").as_deref(),
        Some("http://b/items/7?token=REDACTED&q=REDACTED")
    );
    assert_eq!(client.attr("url.query"), None);
    assert_eq!(client.attr("http.route").as_deref(), Some("/*"));
    assert_eq!(client.attr("outrider.route").as_deref(), Some("to-b"));
    assert_eq!(
        server.attr("url.query").as_deref(),
        Some("token=REDACTED&q=REDACTED")
    );
    assert_eq!(server.attr("url.full"), None);
    assert_eq!(server.attr("http.route"), None, "no route matched inbound");

    // 404: an error for the client, the caller's mistake for the server.
    assert_eq!(call("/items/missing").await.status, 404);
    let spans = collector.take(2).await;
    let (client, server) = split(&spans);
    assert_eq!(client.status, 2, "{client:?}");
    assert_eq!(client.attr("error.type").as_deref(), Some("404"));
    assert_eq!(server.status, 0, "{server:?}");
    assert_eq!(server.attr("error.type"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrouted_request_gets_a_span() {
    let (collector_addr, collector) = Collector::start().await;
    let proxy = start_proxy(&format!(
        "services:\n  svc: {{ endpoints: ['127.0.0.1:1'] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n{}",
        tracing_section(collector_addr)
    ));
    let reply = send(
        &http1_client(),
        Request::get(format!("http://{}/x", proxy.outbound))
            .header("host", "nowhere:8080")
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 404);
    let spans = collector.take(1).await;
    let span = &spans[0];
    assert_eq!(span.parent_id, PARENT);
    assert_eq!(
        span.attr("http.response.status_code").as_deref(),
        Some("404")
    );
    assert_eq!(span.attr("server.address").as_deref(), Some("nowhere"));
    assert_eq!(span.attr("server.port").as_deref(), Some("8080"));
    assert_eq!(span.attr("http.route"), None);
    assert_eq!(span.attr("error.type").as_deref(), Some("404"));
    assert_eq!(span.attr("outrider.response_flags").as_deref(), Some("NR"));
    assert_eq!(
        span.status, 2,
        "the proxy found no route: a client-side failure"
    );
}

use outrider_e2e::pb;

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// Unary answers by text: `missing` NOT_FOUND, `unavailable` UNAVAILABLE, `slow` after 3 s.
struct Statuses;

#[tonic::async_trait]
impl Echo for Statuses {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        let text = request.into_inner().text;
        match text.as_str() {
            "missing" => return Err(Status::not_found("no such thing")),
            "unavailable" => return Err(Status::unavailable("try later")),
            "slow" => tokio::time::sleep(Duration::from_secs(3)).await,
            _ => {}
        }
        Ok(Response::new(EchoReply {
            text,
            seq: 0,
            forwarded_for: String::new(),
        }))
    }

    type CountStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn count(
        &self,
        _: tonic::Request<EchoRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        Err(Status::unimplemented("count"))
    }

    type ChatStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn chat(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        Err(Status::unimplemented("chat"))
    }
}

async fn grpc_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        Server::builder()
            .add_service(EchoServer::new(Statuses))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

async fn grpc_client(proxy: SocketAddr) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin("http://b".parse().unwrap())
        .connect_timeout(STEP);
    EchoClient::new(timeout(STEP, channel.connect()).await.unwrap().unwrap())
}

fn traced(text: &str) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest {
        text: text.to_string(),
        count: 0,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{PARENT}-01").parse().unwrap(),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_spans_carry_rpc_attributes_and_status_by_side() {
    let (collector_addr, collector) = Collector::start().await;
    let app = grpc_app().await;
    let (a, _b) = chain(app, collector_addr, "http2", "");
    let mut client = grpc_client(a.outbound).await;

    client.unary(traced("hello")).await.unwrap();
    let spans = collector.take(2).await;
    let (c, s) = split(&spans);
    for span in [c, s] {
        assert_eq!(span.attr("rpc.system").as_deref(), Some("grpc"));
        assert_eq!(
            span.attr("rpc.service").as_deref(),
            Some("outrider.test.Echo")
        );
        assert_eq!(span.attr("rpc.method").as_deref(), Some("Unary"));
        assert_eq!(span.attr("rpc.grpc.status_code").as_deref(), Some("0"));
        assert_eq!(span.attr("network.protocol.version").as_deref(), Some("2"));
        assert_eq!(span.status, 0, "{span:?}");
    }

    // NOT_FOUND: an error for the client; not one the server's conventions count.
    let status = client.unary(traced("missing")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let spans = collector.take(2).await;
    let (c, s) = split(&spans);
    assert_eq!(c.attr("rpc.grpc.status_code").as_deref(), Some("5"));
    assert_eq!(
        (c.status, c.attr("error.type").as_deref()),
        (2, Some("NOT_FOUND"))
    );
    assert_eq!(s.attr("rpc.grpc.status_code").as_deref(), Some("5"));
    assert_eq!((s.status, s.attr("error.type")), (0, None));

    // UNAVAILABLE: an error on both sides.
    let status = client.unary(traced("unavailable")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let spans = collector.take(2).await;
    let (c, s) = split(&spans);
    for span in [c, s] {
        assert_eq!(span.attr("rpc.grpc.status_code").as_deref(), Some("14"));
        assert_eq!(span.status, 2, "{span:?}");
        assert_eq!(span.attr("error.type").as_deref(), Some("UNAVAILABLE"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_grpc_call_is_marked_cancelled() {
    let (collector_addr, collector) = Collector::start().await;
    let app = grpc_app().await;
    let (a, _b) = chain(app, collector_addr, "http2", "access_log: json\n");
    let mut client = grpc_client(a.outbound).await;
    // The caller gives up by dropping the call (its stream is reset), not with a
    // `grpc-timeout`: that header goes through to the app, whose tonic server enforces it too
    // and answers CANCELLED at about the same moment, so which of the two reached the proxies
    // first was a race (the spans then showed the app's `CANCELLED` answer instead).
    let gave_up = timeout(Duration::from_millis(200), client.unary(traced("slow"))).await;
    assert!(gave_up.is_err(), "the slow call answered: {gave_up:?}");
    // Both proxies saw the caller leave: A's caller reset the stream, and A's reset of its
    // upstream stream reached B.
    let spans = collector.take(2).await;
    for span in &spans {
        assert_eq!(
            span.attr("error.type").as_deref(),
            Some("cancelled"),
            "{span:?}"
        );
        assert_eq!(span.status, 2);
        assert_eq!(
            span.attr("http.response.status_code"),
            None,
            "no response went out"
        );
        assert_eq!(span.attr("outrider.response_flags").as_deref(), Some("DC"));
    }
    assert!(
        eventually(STEP, || a
            .stdout_lines()
            .iter()
            .any(|l| l.contains("\"status\":0")))
        .await,
        "{:?}",
        a.stdout_lines()
    );
    let line = a
        .stdout_lines()
        .into_iter()
        .find(|l| l.contains("\"status\":0"))
        .unwrap();
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        line["error"].as_str().unwrap().starts_with("cancelled:"),
        "{line}"
    );
    assert_eq!(line["response_flags"], "DC", "{line}");
    let (_, metrics) = a.admin_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("outrider_requests_total{")
                && l.contains("code=\"cancelled\"")
                && l.contains("flags=\"DC\"")
                && l.contains("route=\"to-b\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("outrider_requests_total{")
                && l.contains("route=\"to-b\"")
                && l.contains("code=\"200\"")),
        "{metrics}"
    );
}
