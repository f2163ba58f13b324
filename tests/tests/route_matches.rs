//! Route matches with Gateway API semantics through the real proxy binary against real
//! upstreams on 127.0.0.1: each condition kind (path exact, segment prefix and regex, method,
//! headers, query parameters), HTTPRoute precedence across routes written in the "wrong"
//! order, a header canary beside a weighted split, a gRPC service/method match with a real
//! tonic client, and an invalid regex refused with its line and column.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use http::Request;
use outrider_e2e::pb::echo_client::EchoClient;
use outrider_e2e::pb::echo_server::{Echo, EchoServer};
use outrider_e2e::pb::{EchoReply, EchoRequest};
use outrider_e2e::*;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Endpoint, Server};
use tonic::{Response, Status};

/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);

/// Echo upstreams named `names`, and the `services:` block of a policy naming each after it.
async fn upstreams(names: &[&'static str]) -> (Vec<Upstream>, String) {
    let mut servers = Vec::new();
    let mut services = String::from("services:\n");
    for name in names {
        let server = Upstream::echo(Proto::Http1, name).await;
        services.push_str(&format!("  {name}: {{ endpoints: [{}] }}\n", server.addr));
        servers.push(server);
    }
    (servers, services)
}

/// A request (method, path, headers) and the upstream that must serve it.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

/// The upstream that served `method path` to `shop` with `headers`.
async fn served_by(proxy: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.outbound))
        .header("host", "shop");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let reply = timeout(STEP, send(&http1_client(), req.body(empty()).unwrap()))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{method} {path} {headers:?}");
    reply.json()["server"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_condition_kind_routes_by_what_the_request_carries() {
    let names = [
        "default", "exact", "prefix", "regex", "post", "header", "hregex", "absent", "query",
    ];
    let (_servers, services) = upstreams(&names).await;
    let policy = format!(
        "{services}routes:
  - {{ match: {{ authority: shop }}, service: default }}
  - {{ matches: [{{ authority: shop, path: {{ exact: /exact }} }}], service: exact }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /foo/ }} }}], service: prefix }}
  - {{ matches: [{{ authority: shop, path: {{ regex: '/users/[0-9]+' }} }}], service: regex }}
  - {{ matches: [{{ authority: shop, method: POST }}], service: post }}
  - matches:
      - {{ authority: shop, headers: [{{ name: X-Tenant, value: acme }}] }}
    service: header
  - matches:
      - {{ authority: shop, headers: [{{ name: x-user, regex: 'u-[0-9]{{3}}' }}] }}
    service: hregex
  - matches:
      - authority: shop
        path: {{ prefix: /guarded }}
        headers: [{{ name: authorization, present: false }}]
    service: absent
  - matches:
      - {{ authority: shop, query_params: [{{ name: variant, value: b }}] }}
      - {{ authority: shop, query_params: [{{ name: debug, present: true }}] }}
    service: query
"
    );
    let proxy = start_proxy(&policy);
    let cases: &[Case] = &[
        ("GET", "/exact", &[], "exact"),
        // An exact path is not a prefix.
        ("GET", "/exact/more", &[], "default"),
        // A prefix takes whole segments only (a trailing `/` in it is ignored).
        ("GET", "/foo", &[], "prefix"),
        ("GET", "/foo/bar", &[], "prefix"),
        ("GET", "/foobar", &[], "default"),
        // A regex must match the whole path.
        ("GET", "/users/42", &[], "regex"),
        ("GET", "/users/42/orders", &[], "default"),
        ("POST", "/", &[], "post"),
        // Header names compare without case, values exactly.
        ("GET", "/", &[("x-tenant", "acme")], "header"),
        ("GET", "/", &[("x-tenant", "ACME")], "default"),
        ("GET", "/", &[("x-user", "u-123")], "hregex"),
        ("GET", "/", &[("x-user", "u-1234")], "default"),
        ("GET", "/guarded/x", &[], "absent"),
        (
            "GET",
            "/guarded/x",
            &[("authorization", "Bearer t")],
            "default",
        ),
        // Either of a route's matches will do.
        ("GET", "/?x=1&variant=b", &[], "query"),
        ("GET", "/?debug", &[], "query"),
        ("GET", "/?variant=a", &[], "default"),
    ];
    for (method, path, headers, expected) in cases {
        assert_eq!(
            served_by(&proxy, method, path, headers).await,
            *expected,
            "{method} {path} {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_specific_match_wins_whatever_the_document_order() {
    let names = [
        "any",
        "short",
        "long",
        "regex",
        "exact",
        "method",
        "one_header",
        "two_headers",
        "query",
        "first",
        "second",
    ];
    let (_servers, services) = upstreams(&names).await;
    // Least specific first: with "first match wins" `any` would take everything.
    let policy = format!(
        "{services}routes:
  - {{ match: {{ authority: shop }}, service: any }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /api }} }}], service: short }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /api/v1 }} }}], service: long }}
  - {{ matches: [{{ authority: shop, path: {{ regex: '/api/v1/items/[0-9]+' }} }}], service: regex }}
  - {{ matches: [{{ authority: shop, path: {{ exact: /api/v1/items/7 }} }}], service: exact }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /q }}, query_params: [{{ name: a, present: true }}] }}], service: query }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /q }}, headers: [{{ name: x-a, present: true }}] }}], service: one_header }}
  - matches:
      - authority: shop
        path: {{ prefix: /q }}
        headers: [{{ name: x-a, present: true }}, {{ name: x-b, present: true }}]
    service: two_headers
  - {{ matches: [{{ authority: shop, path: {{ prefix: /q }}, method: DELETE }}], service: method }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /t }}, headers: [{{ name: x-a, present: true }}] }}], service: first }}
  - {{ matches: [{{ authority: shop, path: {{ prefix: /t }}, headers: [{{ name: x-b, present: true }}] }}], service: second }}
"
    );
    let proxy = start_proxy(&policy);
    let both = [("x-a", "1"), ("x-b", "1")];
    let cases: &[Case] = &[
        ("GET", "/other", &[], "any"),
        ("GET", "/api/x", &[], "short"),
        // The longer prefix wins.
        ("GET", "/api/v1/x", &[], "long"),
        // A regex over any prefix.
        ("GET", "/api/v1/items/8", &[], "regex"),
        // An exact path over a regex.
        ("GET", "/api/v1/items/7", &[], "exact"),
        // With the same path: the method first, then the most headers, then query params.
        ("DELETE", "/q?a", &both, "method"),
        ("GET", "/q?a", &both, "two_headers"),
        ("GET", "/q?a", &[("x-a", "1")], "one_header"),
        ("GET", "/q?a", &[], "query"),
        // A tie goes to the route written first.
        ("GET", "/t", &both, "first"),
        ("GET", "/t", &[("x-b", "1")], "second"),
    ];
    for (method, path, headers, expected) in cases {
        assert_eq!(
            served_by(&proxy, method, path, headers).await,
            *expected,
            "{method} {path} {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_canary_goes_to_v2_beside_a_weighted_split() {
    let (_servers, services) = upstreams(&["v1", "v2"]).await;
    // The canary route comes after the default one: precedence, not order, puts it first.
    let policy = format!(
        "{services}routes:
  - name: default
    match: {{ authority: shop }}
    split: [{{ service: v1, weight: 1 }}, {{ service: v2, weight: 1 }}]
  - name: canary
    matches: [{{ authority: shop, headers: [{{ name: x-canary, value: 'true' }}] }}]
    service: v2
"
    );
    let proxy = start_proxy(&policy);
    for _ in 0..30 {
        assert_eq!(
            served_by(&proxy, "GET", "/", &[("x-canary", "true")]).await,
            "v2"
        );
    }
    let mut split: HashMap<String, u32> = HashMap::new();
    for _ in 0..100 {
        *split
            .entry(served_by(&proxy, "GET", "/", &[("x-canary", "false")]).await)
            .or_default() += 1;
    }
    // 1:1 over 100 requests: fewer than 20 on either side has odds below 1e-9.
    let (v1, v2) = (split["v1"], split["v2"]);
    assert!(v1 >= 20 && v2 >= 20, "{split:?}");
    assert_eq!(v1 + v2, 100);
}

/// A gRPC server whose replies name it.
struct NamedEcho(&'static str);

#[tonic::async_trait]
impl Echo for NamedEcho {
    async fn unary(
        &self,
        _request: tonic::Request<EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            text: self.0.into(),
            seq: 0,
            forwarded_for: String::new(),
        }))
    }

    type CountStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn count(
        &self,
        _request: tonic::Request<EchoRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok(EchoReply {
            text: self.0.into(),
            seq: 0,
            forwarded_for: String::new(),
        }))
        .await
        .unwrap();
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ChatStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn chat(
        &self,
        _request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn grpc_server(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        Server::builder()
            .add_service(EchoServer::new(NamedEcho(name)))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_method_match_takes_only_that_method() {
    let (unary_addr, unary_task) = grpc_server("unary-server").await;
    let (rest_addr, rest_task) = grpc_server("rest-server").await;
    let policy = format!(
        "services:
  unary: {{ endpoints: [{unary_addr}], protocol: http2 }}
  rest: {{ endpoints: [{rest_addr}], protocol: http2 }}
routes:
  - {{ match: {{ authority: echo }}, service: rest }}
  - matches: [{{ authority: echo, grpc: {{ service: outrider.test.Echo, method: Unary }} }}]
    service: unary
"
    );
    let proxy = start_proxy(&policy);
    let channel = Endpoint::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .origin("http://echo".parse().unwrap())
        .connect_timeout(STEP);
    let channel = timeout(STEP, channel.connect()).await.unwrap().unwrap();
    let mut client = EchoClient::new(channel);
    let request = || EchoRequest {
        text: "hi".into(),
        count: 1,
    };
    let unary = timeout(STEP, client.unary(request()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unary.into_inner().text, "unary-server");
    // Another method of the same service is not this match's.
    let mut stream = timeout(STEP, client.count(request()))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    let first = timeout(STEP, stream.message()).await.unwrap().unwrap();
    assert_eq!(first.unwrap().text, "rest-server");
    unary_task.abort();
    rest_task.abort();
}

#[test]
fn an_invalid_regex_is_refused_with_its_line_and_column() {
    let dir = TempDir::new();
    let path = dir.path.join("policy.yaml");
    std::fs::write(
        &path,
        "services:
  a: { endpoints: [127.0.0.1:1] }
routes:
  - service: a
    matches:
      - path: { regex: '/v[0-9+' }
      - headers: [{ name: x-id, regex: '(?P<id>[0-9]+' }]
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
            "routes[0].matches[0].path.regex: invalid regex: unclosed character class at \
             {file}:6:24"
        ),
        format!(
            "routes[0].matches[1].headers[0].regex: invalid regex: unclosed group at {file}:7:40"
        ),
    ] {
        assert!(stderr.contains(&expected), "{expected}\n{stderr}");
    }
}
