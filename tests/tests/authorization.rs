//! `inbound.authorization` end to end over mesh mTLS: the real `outrider-control` (CA and
//! policy) and real `outrider-proxy` processes on 127.0.0.1. Two callers with their own
//! certificates, `checkout` (namespace `shop`) and `frontend` (namespace `web`), call the
//! `payments` proxy, whose rules allow and deny by the verified identity and the request;
//! plaintext callers reach its permissive inbound port straight.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use outrider_e2e::control::{start_control, Control, ControlDirs};
use outrider_e2e::pb::echo_client::EchoClient;
use outrider_e2e::pb::echo_server::{Echo, EchoServer};
use outrider_e2e::pb::{EchoReply, EchoRequest};
use outrider_e2e::{empty, get, http1_client, send, Proto, Proxy, Upstream};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
const ERROR: &str = "x-outrider-error";
/// Bound on every single await of a gRPC call.
const STEP: Duration = Duration::from_secs(10);

/// Starts a proxy for `workload` as service account `sa` of namespace `ns`, with policy and
/// certificate from `control`.
fn start_meshed(
    control: &Control,
    dirs: &ControlDirs,
    workload: &str,
    ns: &str,
    sa: &str,
) -> Proxy {
    control.spawn_meshed_proxy(dirs, workload, ns, sa, &[])
}

/// The callee's document: `app` behind a permissive inbound port speaking `protocol`, under
/// `authorization` (the section's body, indented four spaces).
fn callee_doc(app: SocketAddr, protocol: &str, authorization: &str) -> String {
    format!(
        "workload: payments\ninbound:\n  app: {app}\n  protocol: {protocol}\n  mtls: permissive\n  authorization:\n{authorization}"
    )
}

/// A caller's document: authority `payments` goes to the callee over mesh mTLS.
fn caller_doc(workload: &str, callee: SocketAddr, protocol: &str) -> String {
    format!(
        "workload: {workload}
services:
  payments:
    endpoints: [{callee}]
    protocol: {protocol}
    tls: mesh
    identity: {PAYMENTS}
routes:
  - match: {{ authority: payments }}
    service: payments
"
    )
}

/// A control plane, the callee (payments) and its two callers.
struct Mesh {
    dirs: ControlDirs,
    _control: Control,
    app: SocketAddr,
    callee: Proxy,
    checkout: Proxy,
    frontend: Proxy,
}

impl Mesh {
    async fn start(app: SocketAddr, protocol: &str, authorization: &str) -> Self {
        let dirs = ControlDirs::new();
        let control = start_control(&dirs);
        dirs.write("payments.yaml", &callee_doc(app, protocol, authorization));
        let callee = start_meshed(&control, &dirs, "payments", "shop", "payments");
        let caller = |workload: &str, ns: &str| {
            dirs.write(
                &format!("{workload}.yaml"),
                &caller_doc(workload, callee.inbound, protocol),
            );
            start_meshed(&control, &dirs, workload, ns, workload)
        };
        let checkout = caller("checkout", "shop");
        let frontend = caller("frontend", "web");
        for proxy in [&callee, &checkout, &frontend] {
            proxy.wait_ready().await;
        }
        // A proxy that subscribed before its document was read runs the workload's empty
        // policy until the next push: wait for the documents' own.
        callee.wait_policy(&app.to_string()).await;
        checkout.wait_policy(&callee.inbound.to_string()).await;
        frontend.wait_policy(&callee.inbound.to_string()).await;
        Self {
            dirs,
            _control: control,
            app,
            callee,
            checkout,
            frontend,
        }
    }

    /// Replaces the callee's authorization and waits until it runs it (`needle` is in it).
    async fn reauthorize(&self, authorization: &str, needle: &str) {
        self.dirs.write(
            "payments.yaml",
            &callee_doc(self.app, "http1", authorization),
        );
        self.callee.wait_policy(needle).await;
    }

    async fn decisions(&self, rule: &str, action: &str, mode: &str) -> f64 {
        self.callee
            .metric(&format!(
                "outrider_authz_decisions_total{{action=\"{action}\",mode=\"{mode}\",rule=\"{rule}\"}}"
            ))
            .await
    }
}

async fn request(via: &Proxy, method: &str, path: &str) -> outrider_e2e::Reply {
    send(
        &http1_client(),
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", via.outbound))
            .header("host", "payments")
            .body(empty())
            .unwrap(),
    )
    .await
}

const RULES: &str = "    default: deny
    rules:
      - name: no-admin-from-web
        action: deny
        from: { namespaces: [web] }
        to: { paths: [{ prefix: /admin }] }
      - name: checkout-charges
        action: allow
        from: { identities: ['spiffe://cluster.local/ns/shop/sa/checkout'] }
        to: { paths: [{ prefix: /charge }], methods: [GET, POST] }
      - name: web-reads
        action: allow
        from: { identities: ['spiffe://*/ns/web/sa/*'] }
        to: { methods: [GET] }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_allow_and_deny_by_identity_and_path_deny_first() {
    let app = Upstream::echo(Proto::Http1, "payments-app").await;
    let mesh = Mesh::start(app.addr, "http1", RULES).await;
    // checkout may charge, with its identity shown to the app.
    let reply = request(&mesh.checkout, "POST", "/charge").await;
    assert_eq!(reply.status, 200, "{:?}", reply.header(ERROR));
    assert_eq!(
        reply.json()["headers"]["x-outrider-peer-identity"],
        CHECKOUT
    );
    // ... but nothing else: no rule allows it, so the default denies.
    let reply = request(&mesh.checkout, "GET", "/refund").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header(ERROR),
        Some(format!("default deny (caller {CHECKOUT})").as_str())
    );
    // frontend reads...
    let reply = request(&mesh.frontend, "GET", "/catalog").await;
    assert_eq!(reply.status, 200, "{:?}", reply.header(ERROR));
    // ... except under /admin: the deny rule wins over `web-reads`, however the path is
    // spelt.
    for path in ["/admin/users", "//admin", "/catalog/../admin", "/%61dmin"] {
        let reply = request(&mesh.frontend, "GET", path).await;
        assert_eq!(reply.status, 403, "{path}");
        assert_eq!(
            reply.header(ERROR),
            Some(format!("denied by rule no-admin-from-web (caller {FRONTEND})").as_str()),
            "{path}"
        );
    }
    // Writes from web meet no allow rule.
    let reply = request(&mesh.frontend, "POST", "/charge").await;
    assert_eq!(reply.status, 403);
    assert_eq!(app.hits(), 2, "refused requests never reach the app");

    assert_eq!(
        mesh.decisions("checkout-charges", "allow", "enforce").await,
        1.0
    );
    assert_eq!(mesh.decisions("web-reads", "allow", "enforce").await, 1.0);
    assert_eq!(
        mesh.decisions("no-admin-from-web", "deny", "enforce").await,
        4.0
    );
    assert_eq!(mesh.decisions(":default", "deny", "enforce").await, 2.0);
    let refused = "outrider_requests_total{code=\"403\",direction=\"inbound\",flags=\"UAEX\",method=\"GET\",route=\"inbound\",service=\"app\",status_class=\"4xx\"}";
    assert_eq!(mesh.callee.metric(refused).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_callers_are_refused_unless_a_rule_names_them() {
    let app = Upstream::echo(Proto::Http1, "payments-app").await;
    let mesh = Mesh::start(app.addr, "http1", RULES).await;
    // Straight to the callee's inbound port, without mTLS: no identity, no rule.
    let reply = get(mesh.callee.inbound, "payments", "/charge").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header(ERROR),
        Some("default deny (caller without a mesh identity)")
    );
    mesh.reauthorize(
        "    rules:
      - name: probes
        action: allow
        from: { unauthenticated: true }
        to: { paths: [{ exact: /healthz }] }
",
        "probes",
    )
    .await;
    assert_eq!(
        get(mesh.callee.inbound, "payments", "/healthz")
            .await
            .status,
        200
    );
    assert_eq!(
        get(mesh.callee.inbound, "payments", "/charge").await.status,
        403
    );
    // A caller with an identity is not `unauthenticated`.
    let reply = request(&mesh.checkout, "GET", "/healthz").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header(ERROR),
        Some(format!("default deny (caller {CHECKOUT})").as_str())
    );
    assert_eq!(app.hits(), 1);
    assert_eq!(mesh.decisions("probes", "allow", "enforce").await, 1.0);
    // The rules of the policy before leave the scrape with the last snapshot that had them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = mesh.callee.admin_get("/metrics").await;
        if !metrics.contains("rule=\"web-reads\"") && !metrics.contains("no-admin-from-web") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mesh.decisions("probes", "allow", "enforce").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_counts_would_deny_and_lets_the_request_through() {
    let app = Upstream::echo(Proto::Http1, "payments-app").await;
    let audit = format!("    mode: audit\n{RULES}");
    let mesh = Mesh::start(app.addr, "http1", &audit).await;
    for _ in 0..3 {
        let reply = request(&mesh.frontend, "GET", "/admin/users").await;
        assert_eq!(reply.status, 200, "{:?}", reply.header(ERROR));
    }
    let reply = get(mesh.callee.inbound, "payments", "/charge").await;
    assert_eq!(reply.status, 200, "{:?}", reply.header(ERROR));
    assert_eq!(app.hits(), 4);
    assert_eq!(
        mesh.decisions("no-admin-from-web", "would_deny", "audit")
            .await,
        3.0
    );
    assert_eq!(mesh.decisions(":default", "would_deny", "audit").await, 1.0);
    assert_eq!(
        mesh.decisions("no-admin-from-web", "deny", "enforce").await,
        0.0
    );
    // Logged with the rule and the caller (at most once a second; the count has them all).
    let logged = outrider_e2e::eventually(Duration::from_secs(5), || {
        mesh.callee.logs().iter().any(|l| {
            l.contains("authorization would deny")
                && l.contains("no-admin-from-web")
                && l.contains(FRONTEND)
        })
    });
    assert!(logged.await, "{}", mesh.callee.logs().join("\n"));
    let refused = "outrider_requests_total{code=\"403\",direction=\"inbound\",flags=\"UAEX\",method=\"GET\",route=\"inbound\",service=\"app\",status_class=\"4xx\"}";
    assert_eq!(mesh.callee.metric(refused).await, 0.0);
}

/// A gRPC app: `Unary` echoes; the streaming calls are not needed here.
struct EchoApp;

#[tonic::async_trait]
impl Echo for EchoApp {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        Ok(tonic::Response::new(EchoReply {
            text: request.into_inner().text,
            seq: 0,
            forwarded_for: String::new(),
        }))
    }

    type CountStream = tokio_stream::Empty<Result<EchoReply, Status>>;

    async fn count(
        &self,
        _: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::CountStream>, Status> {
        Err(Status::unimplemented("count"))
    }

    type ChatStream = tokio_stream::Empty<Result<EchoReply, Status>>;

    async fn chat(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::ChatStream>, Status> {
        Err(Status::unimplemented("chat"))
    }
}

/// A tonic client speaking h2c to `proxy`'s outbound port, with `:authority` `payments`.
async fn grpc_client(proxy: &Proxy) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .origin("http://payments".parse().unwrap())
        .connect_timeout(STEP);
    EchoClient::new(timeout(STEP, channel.connect()).await.unwrap().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_grpc_caller_gets_permission_denied() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let server = tokio::spawn(
        Server::builder()
            .add_service(EchoServer::new(EchoApp))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let rules = "    rules:
      - name: no-web-grpc
        action: deny
        from: { namespaces: [web] }
        to: { headers: [{ name: content-type, regex: 'application/grpc.*' }] }
      - name: checkout-unary
        action: allow
        from: { service_accounts: [checkout] }
        to: { paths: [{ exact: /outrider.test.Echo/Unary }] }
";
    let mesh = Mesh::start(app, "http2", rules).await;
    let call = || {
        tonic::Request::new(EchoRequest {
            text: "pay".into(),
            count: 0,
        })
    };
    let reply = timeout(STEP, grpc_client(&mesh.checkout).await.unary(call()))
        .await
        .unwrap()
        .expect("checkout may call Unary");
    assert_eq!(reply.into_inner().text, "pay");
    // Another method of the same service: no rule allows it.
    let status = timeout(STEP, grpc_client(&mesh.checkout).await.count(call()))
        .await
        .unwrap()
        .expect_err("default deny");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        format!("default deny (caller {CHECKOUT})")
    );
    let status = timeout(STEP, grpc_client(&mesh.frontend).await.unary(call()))
        .await
        .unwrap()
        .expect_err("denied by rule");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        format!("denied by rule no-web-grpc (caller {FRONTEND})")
    );
    assert_eq!(mesh.decisions("no-web-grpc", "deny", "enforce").await, 1.0);
    server.abort();
}
