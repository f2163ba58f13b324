//! Gateway API routes as policy, end to end: the real `outrider-control` and `outriderctl`,
//! real `outrider-proxy` processes subscribed to the control plane, real HTTP and gRPC
//! upstreams on 127.0.0.1. An HTTPRoute applied with `outriderctl apply` changes live routing
//! (a header canary beside a 90/10 split) and deleting it changes it back; where its routes
//! and the policy's own overlap, precedence decides and the policy wins ties; an HTTPRoute
//! with a field the translation does not honour, or a backend the policy lacks, is refused
//! with file:line:col and nothing is pushed; a policy entry attaches a rate limit to one
//! HTTPRoute rule by its route name; a GRPCRoute method match takes a real tonic client's
//! calls of that method only.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::Request;
use outrider_e2e::control::{applied_version, ControlDirs};
use outrider_e2e::pb::echo_client::EchoClient;
use outrider_e2e::pb::echo_server::{Echo, EchoServer};
use outrider_e2e::pb::{EchoReply, EchoRequest};
use outrider_e2e::*;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Endpoint, Server};
use tonic::{Response, Status};

/// Bound on every single await, and on a pushed change reaching a proxy.
const STEP: Duration = Duration::from_secs(10);

/// The HTTPRoute of these tests: `x-canary: true` goes to reviews-v2, `/tie` (exact) to
/// reviews-v2 too, everything else 90/10 to reviews-v1 and reviews-v2.
const CANARY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: default
spec:
  parentRefs:
    - group: \"\"
      kind: Service
      name: reviews
  rules:
    - name: canary
      matches:
        - headers:
            - name: x-canary
              value: \"true\"
      backendRefs:
        - name: reviews-v2
          port: 9080
    - name: tie
      matches:
        - path: { type: Exact, value: /tie }
      backendRefs:
        - name: reviews-v2
          port: 9080
    - backendRefs:
        - { name: reviews-v1, port: 9080, weight: 90 }
        - { name: reviews-v2, port: 9080, weight: 10 }
";

/// The policy in the watched directory: the services, a catch-all (no authority, so any
/// HTTPRoute match for `reviews` ranks above it), a `/admin` route more specific than every
/// HTTPRoute match, and `/tie` on host `reviews` exactly as specific as the HTTPRoute's.
fn policy(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        "services:
  reviews: {{ endpoints: [{v1}] }}
  reviews-v1: {{ endpoints: [{v1}] }}
  reviews-v2: {{ endpoints: [{v2}] }}
routes:
  - {{ name: fallback, match: {{ path_prefix: / }}, service: reviews-v1 }}
  - name: admin
    matches: [{{ authority: reviews, path: {{ prefix: /admin }} }}]
    service: reviews-v1
  - name: tie
    matches: [{{ authority: reviews, path: {{ exact: /tie }} }}]
    service: reviews-v1
"
    )
}

async fn exchange(proxy: &Proxy, host: &str, path: &str, canary: bool) -> Reply {
    let mut request = Request::get(format!("http://{}{path}", proxy.outbound)).header("host", host);
    if canary {
        request = request.header("x-canary", "true");
    }
    send(&http1_client(), request.body(empty()).unwrap()).await
}

async fn served_by(proxy: &Proxy, host: &str, path: &str, canary: bool) -> String {
    let reply = exchange(proxy, host, path, canary).await;
    assert_eq!(reply.status, 200, "{host}{path}: {:?}", reply.body);
    reply.json()["server"].as_str().unwrap().to_string()
}

/// Polls until a canary request to `reviews` is served by `server` (a proxy that has no
/// policy yet answers 404).
async fn wait_canary_at(proxy: &Proxy, server: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let reply = exchange(proxy, "reviews", "/", true).await;
        if reply.status == 200 && reply.json()["server"] == server {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "canary never reached {server}; logs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ctl(control: &control::Control, args: Vec<String>) -> std::process::Output {
    let url = control.url();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        control::ctl(&url, Some(control::CONTROL_TOKEN), &args)
    })
    .await
    .unwrap()
}

async fn apply(control: &control::Control, file: &Path) -> std::process::Output {
    ctl(
        control,
        vec!["apply".into(), "-f".into(), file.display().to_string()],
    )
    .await
}

/// Writes `text` as `docs/name` and applies that file.
async fn apply_text(
    control: &control::Control,
    docs: &TempDir,
    name: &str,
    text: &str,
) -> std::process::Output {
    let file = docs.path.join(name);
    std::fs::write(&file, text).unwrap();
    apply(control, &file).await
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The setup most tests share: echo upstreams `v1` and `v2`, [`policy`] in the control plane's
/// watched directory, and a proxy subscribed as `checkout` that routes by it.
struct Reviews {
    control: control::Control,
    proxy: Proxy,
    _upstreams: (Upstream, Upstream),
    _dirs: ControlDirs,
}

/// Starts [`Reviews`] and waits until its proxy routes canaries to `v1`.
async fn reviews() -> Reviews {
    let v1 = Upstream::echo(Proto::Http1, "v1").await;
    let v2 = Upstream::echo(Proto::Http1, "v2").await;
    let dirs = ControlDirs::new();
    dirs.write("reviews.yaml", &policy(v1.addr, v2.addr));
    let control = control::start_control(&dirs);
    let proxy = spawn_proxy(TempDir::new(), &control.proxy_flags(&dirs, "checkout"));
    wait_canary_at(&proxy, "v1").await;
    Reviews {
        control,
        proxy,
        _upstreams: (v1, v2),
        _dirs: dirs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_httproute_changes_live_routing_and_deleting_it_changes_it_back() {
    // The upstreams and the directory are bound, not `..`: they live to the test's end.
    let Reviews {
        control,
        proxy,
        _upstreams,
        _dirs,
    } = reviews().await;

    let docs = TempDir::new();
    let file = docs.path.join("httproute.yaml");
    std::fs::write(&file, CANARY).unwrap();
    let out = apply(&control, &file).await;
    let version = applied_version(&out);
    wait_canary_at(&proxy, "v2").await;

    // Every host form of the Service, with or without a port.
    for host in [
        "reviews:9080",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local:9080",
    ] {
        assert_eq!(served_by(&proxy, host, "/", true).await, "v2", "{host}");
    }
    // Another Service's name is not the parent's.
    assert_eq!(served_by(&proxy, "ratings", "/", true).await, "v1");

    // Without the header: 90/10. Over 200 requests fewer than 3 on v2 has odds below 1e-6.
    let mut split: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        *split
            .entry(served_by(&proxy, "reviews", "/", false).await)
            .or_default() += 1;
    }
    let (on_v1, on_v2) = (split["v1"], split.get("v2").copied().unwrap_or(0));
    assert!(on_v2 >= 3 && on_v1 >= 140, "{split:?}");

    // Precedence across the policy's routes and the HTTPRoute's: the policy's `/admin`
    // prefix is more specific than the canary's (path before headers); `/tie` on `reviews`
    // is as specific on both sides, and the policy's own route wins the tie; on another host
    // form only the HTTPRoute's matches.
    assert_eq!(served_by(&proxy, "reviews", "/admin/x", true).await, "v1");
    assert_eq!(served_by(&proxy, "reviews", "/tie", false).await, "v1");
    assert_eq!(
        served_by(&proxy, "reviews.default", "/tie", false).await,
        "v2"
    );

    // `get` shows the translated routes by name, `history` the document by kind and name.
    let get = text(&ctl(&control, vec!["get".into(), "checkout".into()]).await);
    assert!(
        get.contains("name: httproute.default.reviews.canary")
            && get.contains("name: httproute.default.reviews.rule-2"),
        "{get}"
    );
    let history = text(&ctl(&control, vec!["history".into()]).await);
    assert!(
        history.contains("httproute.yaml (HTTPRoute default/reviews)"),
        "{history}"
    );

    // Replaced without its canary rule: the header goes by weight again (the tie rule stays).
    let without_canary = CANARY.replace(
        "    - name: canary
      matches:
        - headers:
            - name: x-canary
              value: \"true\"
      backendRefs:
        - name: reviews-v2
          port: 9080
",
        "",
    );
    assert_ne!(without_canary, CANARY);
    std::fs::write(&file, &without_canary).unwrap();
    let replaced = applied_version(&apply(&control, &file).await);
    assert!(replaced > version);
    let deadline = Instant::now() + STEP;
    loop {
        let get = text(&ctl(&control, vec!["get".into(), "checkout".into()]).await);
        if !get.contains("httproute.default.reviews.canary") {
            break;
        }
        assert!(Instant::now() < deadline, "{get}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + STEP;
    let mut seen = HashMap::<String, usize>::new();
    while seen.len() < 2 {
        *seen
            .entry(served_by(&proxy, "reviews", "/", true).await)
            .or_default() += 1;
        assert!(Instant::now() < deadline, "{seen:?}");
    }

    // Deleted: back to the policy's own routes.
    let out = ctl(&control, vec!["delete".into(), "httproute.yaml".into()]).await;
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + STEP;
    while served_by(&proxy, "reviews.default", "/tie", false).await != "v1" {
        assert!(Instant::now() < deadline, "the HTTPRoute stayed in force");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..50 {
        assert_eq!(served_by(&proxy, "reviews", "/", true).await, "v1");
    }
}

/// An HTTPRoute whose parent Service no policy has is accepted (Kubernetes takes it too, and
/// reports it not attached) but routes nothing: `apply` says so in a warning, the proxies'
/// policy stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_whose_parent_no_policy_has_is_accepted_with_a_warning() {
    // The upstreams and the directory are bound, not `..`: they live to the test's end.
    let Reviews {
        control,
        proxy,
        _upstreams,
        _dirs,
    } = reviews().await;
    let (_, config) = proxy.admin_get("/config").await;
    let before: serde_json::Value = serde_json::from_str(&config).unwrap();

    let docs = TempDir::new();
    let ratings = CANARY.replace(
        "      kind: Service\n      name: reviews\n",
        "      kind: Service\n      name: ratings\n",
    );
    let out = apply_text(&control, &docs, "ratings.yaml", &ratings).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let warned = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        warned.contains("warning:")
            && warned.contains("HTTPRoute default/reviews")
            && warned.contains("no policy has a service named `ratings`"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("pushed to no workload"),
        "{}",
        text(&out)
    );

    // Taken as a document, pushed to no proxy: the canary still goes to v1.
    let (_, config) = proxy.admin_get("/config").await;
    let after: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(after["version"], before["version"]);
    assert_eq!(served_by(&proxy, "reviews", "/", true).await, "v1");

    // Applied again unchanged: nothing new to warn about.
    let out = apply_text(&control, &docs, "ratings.yaml", &ratings).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("warning:"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_it_cannot_honour_is_refused_with_its_place_and_nothing_is_pushed() {
    // The upstreams and the directory are bound, not `..`: they live to the test's end.
    let Reviews {
        control,
        proxy,
        _upstreams,
        _dirs,
    } = reviews().await;
    let before = control.status().await["version"].as_u64().unwrap();

    let docs = TempDir::new();
    // Line 13, column 7: the first rule's sessionPersistence.
    let sticky = CANARY.replace(
        "      matches:\n        - headers:",
        "      sessionPersistence: { sessionName: s }\n      matches:\n        - headers:",
    );
    let out = apply_text(&control, &docs, "sticky.yaml", &sticky).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("spec.rules[0].sessionPersistence: not supported")
            && said.contains("sticky.yaml:13:7"),
        "{said}"
    );

    // A backend the workload's policy does not have: refused at composition, with the
    // backendRef's place.
    let unknown = CANARY.replace("name: reviews-v1", "name: reviews-v9");
    let out = apply_text(&control, &docs, "unknown.yaml", &unknown).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("names the Service `reviews-v9`") && said.contains("unknown.yaml:27:11"),
        "{said}"
    );

    // A parent Gateway (north-south) is no mesh route.
    let gateway = CANARY.replace(
        "    - group: \"\"\n      kind: Service\n      name: reviews",
        "    - name: edge",
    );
    let out = apply_text(&control, &docs, "gateway.yaml", &gateway).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("gateway.yaml:8:7"), "{}", text(&out));

    // Nothing taken, nothing pushed: the same version, the same routing.
    assert_eq!(control.status().await["version"], before);
    let (_, config) = proxy.admin_get("/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["version"], before);
    assert_eq!(served_by(&proxy, "reviews", "/", true).await, "v1");
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
async fn a_grpcroute_method_match_takes_that_method_of_a_real_grpc_client() {
    let (unary_addr, unary_task) = grpc_server("unary-server").await;
    let (rest_addr, rest_task) = grpc_server("rest-server").await;
    let dirs = ControlDirs::new();
    // One file of three documents: the policy, and the GRPCRoute (a second one of another
    // Service, which this workload does not have, is left out of its policy).
    dirs.write(
        "echo.yaml",
        &format!(
            "services:
  echo: {{ endpoints: [{rest_addr}], protocol: http2 }}
  echo-unary: {{ endpoints: [{unary_addr}], protocol: http2 }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{ name: echo }}
spec:
  parentRefs: [{{ kind: Service, name: echo }}]
  rules:
    - matches:
        - method: {{ service: outrider.test.Echo, method: Unary }}
      backendRefs: [{{ name: echo-unary }}]
    - backendRefs: [{{ name: echo }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{ name: elsewhere }}
spec:
  parentRefs: [{{ kind: Service, name: not-here }}]
  rules:
    - backendRefs: [{{ name: not-here-either }}]
"
        ),
    );
    let control = control::start_control(&dirs);
    let proxy = spawn_proxy(TempDir::new(), &control.proxy_flags(&dirs, "checkout"));
    let channel = Endpoint::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .origin("http://echo.default.svc.cluster.local".parse().unwrap())
        .connect_timeout(STEP);
    let channel = timeout(STEP, channel.connect()).await.unwrap().unwrap();
    let mut client = EchoClient::new(channel);
    let request = || EchoRequest {
        text: "hi".into(),
        count: 1,
    };
    // The proxy may not have its policy yet: poll until the route answers.
    let deadline = Instant::now() + STEP;
    let unary = loop {
        match timeout(STEP, client.unary(request())).await.unwrap() {
            Ok(reply) => break reply.into_inner().text,
            Err(status) => {
                assert!(Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(unary, "unary-server");
    // Another method of the same service is not this match's: the rule without matches.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_entry_attaches_a_rate_limit_to_an_httproute_rule_by_name() {
    let v1 = Upstream::echo(Proto::Http1, "v1").await;
    let v2 = Upstream::echo(Proto::Http1, "v2").await;
    let dirs = ControlDirs::new();
    // The attachment names a route no document has yet: the directory's policy is refused
    // until the HTTPRoute is there, so both go in at once, as one file.
    dirs.write(
        "reviews.yaml",
        &format!(
            "{}  - name: httproute.default.reviews.canary
    rate_limit: {{ requests_per_second: 1, burst: 1 }}
---
{CANARY}",
            policy(v1.addr, v2.addr)
        ),
    );
    let control = control::start_control(&dirs);
    let proxy = spawn_proxy(TempDir::new(), &control.proxy_flags(&dirs, "checkout"));
    wait_canary_at(&proxy, "v2").await;
    // The canary rule's own bucket: a second canary request in a row is refused...
    let deadline = Instant::now() + STEP;
    loop {
        let first = exchange(&proxy, "reviews", "/", true).await.status;
        let second = exchange(&proxy, "reviews", "/", true).await.status;
        if second == 429 {
            break;
        }
        assert!(Instant::now() < deadline, "never limited: {first} {second}");
    }
    // ...while the other rules, which nothing was attached to, are not limited.
    for _ in 0..20 {
        assert_eq!(exchange(&proxy, "reviews", "/", false).await.status, 200);
    }
    let get = text(&ctl(&control, vec!["get".into(), "checkout".into()]).await);
    assert!(get.contains("requests_per_second: 1"), "{get}");
}
