//! Transparent capture end to end: pods as network namespaces on a bridge (tests/src/netns.rs),
//! each meshed pod with its rules from the real `outrider-proxy init` and the real
//! `outrider-proxy` as its sidecar (UID 65532), certificates and policy from the real
//! `outrider-control` in the hub. The apps know nothing about the proxy: they call
//! `pod-ip:port` and listen on `0.0.0.0:port`. Addresses are documentation ranges only
//! (192.0.2.0/24, 2001:db8::/64).
//!
//! Pods: `a` (192.0.2.1, meshed caller), `b` (192.0.2.2, meshed callee, `mtls: strict`),
//! `ext` (192.0.2.3: no sidecar, no rules; an outsider caller and servers in no policy).
//!
//! Needs root, `ip netns`, nft and setpriv (and redis-server and redis-cli for the Redis
//! exchange): CI (.ci/run) has them and sets OUTRIDER_REQUIRE_NETNS=1, so there a missing piece
//! fails the tests; elsewhere each test prints why it is skipped.

#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outrider_e2e::control::{Control, ControlDirs};
use outrider_e2e::netns::{metric_sum, Dialer, Family, Lab, Pod, Sidecar, PROXY_UID};
use outrider_e2e::{empty, full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";
const IDENTITY_HEADER: &str = "x-outrider-peer-identity";
/// The app port every test calls.
const APP_PORT: u16 = 8080;
/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);
/// How long the proxy waits for a captured connection's first bytes before it proxies it as
/// opaque TCP (README, "Transparent capture"). An exchange on an opaque port must take well
/// under it: the proxy did not wait.
const DETECTION_TIMEOUT: Duration = Duration::from_millis(1000);

/// Declares the tests `$v4` and `$v6`, running `$body` over IPv4 and over IPv6.
macro_rules! in_both_families {
    ($body:ident: $v4:ident, $v6:ident) => {
        #[tokio::test]
        async fn $v4() {
            $body(Family::V4).await;
        }

        #[tokio::test]
        async fn $v6() {
            $body(Family::V6).await;
        }
    };
}

// ---- the pods ------------------------------------------------------------------------------

/// A lab with pods `a` and `b` meshed (rules installed, sidecars ready with the policies given)
/// and `ext` bare.
struct Mesh {
    // Dropped in this order: sidecars and control before the namespaces go.
    a_proxy: Sidecar,
    b_proxy: Sidecar,
    _control: Control,
    _dirs: ControlDirs,
    a: Pod,
    b: Pod,
    ext: Pod,
    lab: Lab,
}

/// The callee's policy: strict mTLS on every captured port, only `allowed` (usually `a`) let
/// in. `inbound.app` names a port where nothing listens: a captured connection must go to its
/// original destination, not there.
fn b_policy_allowing(allowed: &str) -> String {
    format!(
        "workload: b
inbound:
  app: 127.0.0.1:9
  mtls: strict
  authorization: {{ allow: [{allowed}] }}
"
    )
}

/// The caller's policy: `b` a mesh service at its pod address and app port, in both families.
/// `protocol` is the service's upstream protocol (`http1` or `http2`).
fn a_policy(b: &Pod, protocol: &str) -> String {
    format!(
        "workload: a
services:
  b:
    endpoints: [\"{}\", \"{}\"]
    protocol: {protocol}
    tls: mesh
    identity: {B_ID}
",
        b.addr(Family::V4, APP_PORT),
        b.addr(Family::V6, APP_PORT),
    )
}

/// Builds the lab (or `None` when it cannot run here: skipped with the reason printed).
async fn mesh(a_protocol: &str) -> Option<Mesh> {
    mesh_with(a_protocol, &[]).await
}

/// [`mesh`] with extra `outrider-proxy init` flags for pod `a`.
async fn mesh_with(a_protocol: &str, a_init: &[&str]) -> Option<Mesh> {
    mesh_with_policy(|b| a_policy(b, a_protocol), a_init, A_ID).await
}

/// [`mesh_with`] with `a`'s policy made by `a_policy` from pod `b`;
/// `b` lets only `b_allowed` in.
async fn mesh_with_policy(
    a_policy: impl Fn(&Pod) -> String,
    a_init: &[&str],
    b_allowed: &str,
) -> Option<Mesh> {
    mesh_with_policies(
        a_policy,
        a_init,
        |_| b_policy_allowing(b_allowed),
        b_allowed,
    )
    .await
}

/// [`mesh_with_policy`] with `b`'s policy made by `b_policy` from pod `b`; `b_needle` is in
/// it (to know it arrived).
async fn mesh_with_policies(
    a_policy: impl Fn(&Pod) -> String,
    a_init: &[&str],
    b_policy: impl Fn(&Pod) -> String,
    b_needle: &str,
) -> Option<Mesh> {
    let lab = Lab::new(env!("CARGO_BIN_EXE_netns-probe"))?;
    let a = lab.pod("a", 1);
    let b = lab.pod("b", 2);
    let ext = lab.pod("ext", 3);
    lab.init_ok(&a, a_init);
    lab.init_ok(&b, &[]);
    let dirs = ControlDirs::new();
    dirs.write("a.yaml", &a_policy(&b));
    dirs.write("b.yaml", &b_policy(&b));
    let control = lab.start_control(&dirs);
    let a_proxy = lab.start_sidecar(&a, &control, &dirs, "a", PROXY_UID, &[]);
    let b_proxy = lab.start_sidecar(&b, &control, &dirs, "b", PROXY_UID, &[]);
    a_proxy.wait_ready().await;
    b_proxy.wait_ready().await;
    // Ready means some policy is held; wait for the documents' own (every `a` policy names
    // b's identity).
    a_proxy.wait_policy(B_ID).await;
    b_proxy.wait_policy(b_needle).await;
    Some(Mesh {
        a_proxy,
        b_proxy,
        _control: control,
        _dirs: dirs,
        a,
        b,
        ext,
        lab,
    })
}

// ---- apps ----------------------------------------------------------------------------------

/// What an app served: connections accepted, requests answered.
#[derive(Default)]
struct AppCounts {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

impl AppCounts {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Serves HTTP/1.1 on `listener` (an app's port, see `Lab::expose`): every request is answered
/// with a JSON echo of its method, path and headers.
fn serve_echo(listener: UnixListener, name: &'static str) -> Arc<AppCounts> {
    let counts = Arc::new(AppCounts::default());
    let app = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            app.connections.fetch_add(1, Ordering::SeqCst);
            let counter = Arc::clone(&app);
            let service = service_fn(move |req: Request<Incoming>| {
                counter.requests.fetch_add(1, Ordering::SeqCst);
                async move {
                    let headers: serde_json::Map<String, serde_json::Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
                            )
                        })
                        .collect();
                    let json = serde_json::json!({
                        "server": name,
                        "method": req.method().as_str(),
                        "path": req.uri().path(),
                        "headers": headers,
                    });
                    Ok::<_, Infallible>(Response::new(full(json.to_string())))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    counts
}

/// Serves a line echo on `listener`: each line read is written back as `echo: LINE`. Counts
/// connections.
fn serve_line_echo(listener: UnixListener) -> Arc<AtomicUsize> {
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read);
                let mut line = String::new();
                while tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line)
                    .await
                    .is_ok_and(|n| n > 0)
                {
                    if write
                        .write_all(format!("echo: {line}").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    conns
}

/// Writes `bytes` on a new connection of `dialer` and reads until `expect_len` bytes came, the
/// peer closed, or [`STEP`] passed; returns what was read and how long it took.
async fn exchange(dialer: &Dialer, bytes: &[u8], expect_len: usize) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = dialer.connect().await;
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = timeout(STEP, async {
        while out.len() < expect_len {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

// ---- HTTP/1.1 between meshed pods --------------------------------------------------------

/// `a`'s app calls `b`'s app by pod address and app port over plain HTTP/1.1: the call crosses
/// both sidecars (each counts it) over mTLS, and `b`'s app sees `a`'s verified identity, not
/// the one `a`'s app claimed.
async fn http1_between_pods(family: Family) {
    let Some(mesh) = mesh("http1").await else {
        return;
    };
    let app = serve_echo(mesh.lab.expose(&mesh.b, APP_PORT), "b-app");
    let target = mesh.b.addr(family, APP_PORT);
    let dialer = mesh.lab.dialer(&mesh.a, target);

    let req = Request::get("/charge")
        .header("host", target.to_string())
        .header(IDENTITY_HEADER, "spiffe://cluster.local/ns/shop/sa/admin")
        .body(empty())
        .unwrap();
    let reply = timeout(STEP, dialer.http1(req)).await.unwrap().unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}\na logs:\n{}\nb logs:\n{}",
        String::from_utf8_lossy(&reply.body),
        mesh.a_proxy.logs().join("\n"),
        mesh.b_proxy.logs().join("\n")
    );
    let echo = reply.json();
    assert_eq!(echo["server"], "b-app");
    assert_eq!(echo["path"], "/charge");
    assert_eq!(echo["headers"][IDENTITY_HEADER], A_ID);
    assert_eq!(app.requests(), 1);

    // Both sidecars saw it: a's outbound for service b, b's inbound.
    let outbound = mesh
        .a_proxy
        .metric_sum(
            "outrider_requests_total",
            &["direction=\"outbound\"", "service=\"b\"", "code=\"200\""],
        )
        .await;
    assert_eq!(outbound, 1.0, "{}", mesh.a_proxy.metrics().await);
    let inbound = mesh
        .b_proxy
        .metric_sum(
            "outrider_requests_total",
            &["direction=\"inbound\"", "code=\"200\""],
        )
        .await;
    assert_eq!(inbound, 1.0, "{}", mesh.b_proxy.metrics().await);
    // a captured one connection for service b; b saw it arrive as TLS (its ClientHello
    // offering the mesh ALPN: b refuses plaintext under strict) and handed it to its app.
    let a_metrics = mesh.a_proxy.metrics().await;
    let captured = metric_sum(
        &a_metrics,
        "outrider_tcp_connections_total",
        &[
            "direction=\"outbound\"",
            "destination=\"b\"",
            "mode=\"http\"",
        ],
    );
    assert_eq!(captured, 1.0, "{a_metrics}");
    let b_metrics = mesh.b_proxy.metrics().await;
    for (name, labels) in [
        (
            "outrider_protocol_detections_total",
            &["direction=\"inbound\"", "protocol=\"tls\""][..],
        ),
        (
            "outrider_tcp_connections_total",
            &[
                "direction=\"inbound\"",
                "destination=\"app\"",
                "mode=\"http\"",
            ][..],
        ),
    ] {
        assert_eq!(
            metric_sum(&b_metrics, name, labels),
            1.0,
            "{name}\n{b_metrics}"
        );
    }
    assert_eq!(
        metric_sum(&b_metrics, "outrider_tls_handshake_failures_total", &[]),
        0.0
    );
}

in_both_families!(
    http1_between_pods:
    http1_between_pods_by_pod_ip_crosses_both_sidecars_over_mtls,
    http1_between_pods_over_ipv6
);

// ---- gRPC (h2c) between meshed pods --------------------------------------------------------

use outrider_e2e::pb;

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// `b`'s gRPC app. Replies carry the caller identity the app was told in `forwarded_for`.
struct GrpcApp;

fn identity_of<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get(IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tonic::async_trait]
impl Echo for GrpcApp {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let identity = identity_of(&request);
        Ok(tonic::Response::new(EchoReply {
            text: request.into_inner().text,
            seq: 0,
            forwarded_for: identity,
        }))
    }

    type CountStream = tokio_stream::wrappers::ReceiverStream<Result<EchoReply, tonic::Status>>;

    async fn count(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::CountStream>, tonic::Status> {
        let identity = identity_of(&request);
        let count = request.into_inner().count;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for seq in 0..count {
                let reply = EchoReply {
                    text: format!("message {seq}"),
                    seq,
                    forwarded_for: identity.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    type ChatStream = tokio_stream::wrappers::ReceiverStream<Result<EchoReply, tonic::Status>>;

    /// Answers each message as it comes: the client sends the next only after the reply, so a
    /// proxy that buffered either direction would stall the call.
    async fn chat(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::ChatStream>, tonic::Status> {
        let identity = identity_of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut seq = 0;
            while let Ok(Some(message)) = inbound.message().await {
                let reply = EchoReply {
                    text: message.text,
                    seq,
                    forwarded_for: identity.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
                seq += 1;
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

/// A tonic connector whose every connection is a new one from a pod (through its dialer).
#[derive(Clone)]
struct PodConnector(std::path::PathBuf);

impl tonic::codegen::Service<http::Uri> for PodConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

/// `a`'s app calls `b`'s gRPC app at `pod-ip:8080` over h2c: unary, server streaming and
/// lock-step bidirectional streaming, each through both sidecars over mTLS with `a`'s identity
/// reaching the app.
#[tokio::test]
async fn grpc_unary_and_streaming_between_pods_over_mtls() {
    let Some(mesh) = mesh_grpc().await else {
        return;
    };
    let listener = mesh.lab.expose(&mesh.b, APP_PORT);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(GrpcApp))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let target = mesh.b.addr(Family::V4, APP_PORT);
    let dialer = mesh.lab.dialer(&mesh.a, target);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}")).unwrap();
    let channel = endpoint.connect_with_connector(PodConnector(dialer.path().to_path_buf()));
    let channel = timeout(STEP, channel).await.unwrap().unwrap();
    let mut client = EchoClient::new(channel);

    let reply = timeout(
        STEP,
        client.unary(EchoRequest {
            text: "hello".into(),
            count: 0,
        }),
    )
    .await
    .unwrap()
    .unwrap_or_else(|status| {
        panic!(
            "unary: {status:?}\na logs:\n{}\nb logs:\n{}",
            mesh.a_proxy.logs().join("\n"),
            mesh.b_proxy.logs().join("\n")
        )
    })
    .into_inner();
    assert_eq!(reply.text, "hello");
    assert_eq!(reply.forwarded_for, A_ID);

    let mut stream = timeout(
        STEP,
        client.count(EchoRequest {
            text: String::new(),
            count: 5,
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    for seq in 0..5 {
        let message = timeout(STEP, stream.message()).await.unwrap().unwrap();
        let message = message.unwrap_or_else(|| panic!("stream ended before {seq}"));
        assert_eq!((message.seq, message.forwarded_for.as_str()), (seq, A_ID));
    }
    assert!(timeout(STEP, stream.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());

    let (tx, rx) = mpsc::channel(1);
    let mut replies = timeout(
        STEP,
        client.chat(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    for seq in 0..3u32 {
        tx.send(EchoRequest {
            text: format!("turn {seq}"),
            count: 0,
        })
        .await
        .unwrap();
        let reply = timeout(STEP, replies.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.text, format!("turn {seq}"));
        assert_eq!(reply.forwarded_for, A_ID);
    }
    drop(tx);
    assert!(timeout(STEP, replies.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());

    // Three calls, each seen by both sidecars.
    mesh.a_proxy
        .assert_count(
            "outrider_requests_total",
            &["direction=\"outbound\"", "service=\"b\""],
            3.0,
        )
        .await;
    mesh.b_proxy
        .assert_count("outrider_requests_total", &["direction=\"inbound\""], 3.0)
        .await;
}

/// [`mesh`] for gRPC: `b` an h2c service of `a`, `b`'s app speaking h2c.
async fn mesh_grpc() -> Option<Mesh> {
    mesh("http2").await
}

// ---- WebSocket between meshed pods ---------------------------------------------------------

/// `a`'s app opens a WebSocket to `b`'s app at `pod-ip:8080`: the upgrade crosses both
/// sidecars, text and a 64 KiB binary message echo byte for byte, the close handshake
/// completes, and `b`'s app saw `a`'s identity on the upgrade request.
#[tokio::test]
async fn websocket_between_pods_over_mtls() {
    let Some(mesh) = mesh("http1").await else {
        return;
    };
    let listener = mesh.lab.expose(&mesh.b, APP_PORT);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut identity = String::new();
                #[allow(clippy::result_large_err)]
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
                        identity = req
                            .headers()
                            .get(IDENTITY_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        Ok(res)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let _ = seen_tx.send(identity);
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let target = mesh.b.addr(Family::V4, APP_PORT);
    let dialer = mesh.lab.dialer(&mesh.a, target);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let request = format!("ws://{target}/chat").into_client_request().unwrap();
    let (mut ws, response) = timeout(
        STEP,
        tokio_tungstenite::client_async(request, dialer.connect().await),
    )
    .await
    .unwrap()
    .unwrap_or_else(|e| {
        panic!(
            "upgrade: {e}\na logs:\n{}\nb logs:\n{}",
            mesh.a_proxy.logs().join("\n"),
            mesh.b_proxy.logs().join("\n")
        )
    });
    assert_eq!(response.status(), 101);
    assert_eq!(timeout(STEP, seen.recv()).await.unwrap().unwrap(), A_ID);

    ws.send(Message::text("hello b")).await.unwrap();
    let echo = timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo, Message::text("hello b"));
    let blob: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let echo = timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo.into_data().as_ref(), &blob[..]);
    ws.close(None).await.unwrap();
    // The server answers the close; then the stream ends.
    let rest = timeout(STEP, async {
        while let Some(message) = ws.next().await {
            if message.is_err() {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    assert!(rest, "the close handshake did not complete cleanly");

    mesh.a_proxy
        .assert_count(
            "outrider_requests_total",
            &["direction=\"outbound\"", "service=\"b\"", "code=\"101\""],
            1.0,
        )
        .await;
    let inbound = mesh
        .b_proxy
        .metric_sum(
            "outrider_requests_total",
            &["direction=\"inbound\"", "code=\"101\""],
        )
        .await;
    assert_eq!(inbound, 1.0, "{}", mesh.b_proxy.metrics().await);
}

// ---- strict: nothing reaches b's app around its sidecar ------------------------------------

/// A caller without a sidecar (`ext`) cannot reach `b`'s app on any captured port under
/// `mtls: strict`: not the app's HTTP port, not another port the app listens on, not with its
/// own TLS, not the inbound port itself; while `a`, through its sidecar, reaches it.
async fn outsider_is_refused(family: Family) {
    let Some(mesh) = mesh("http1").await else {
        return;
    };
    let http_app = serve_echo(mesh.lab.expose(&mesh.b, APP_PORT), "b-app");
    let raw_app = serve_line_echo(mesh.lab.expose(&mesh.b, 9000));

    // The positive control: through a's sidecar, b's app answers.
    let from_a = mesh.lab.dialer(&mesh.a, mesh.b.addr(family, APP_PORT));
    let reply = from_a.get("/", STEP).await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(http_app.requests(), 1);

    for port in [APP_PORT, 9000, outrider_e2e::netns::INBOUND_PORT] {
        let from_ext = mesh.lab.dialer(&mesh.ext, mesh.b.addr(family, port));
        // Plain HTTP.
        let outcome = from_ext.get("/", STEP).await;
        assert!(
            !matches!(outcome, Ok(ref reply) if reply.status == 200),
            "ext reached b's port {port}: {:?}",
            outcome.map(|r| String::from_utf8_lossy(&r.body).into_owned())
        );
        // A raw line.
        let (answer, _) = exchange(&from_ext, b"hello\n", 1).await;
        assert!(
            !answer.contains("echo:"),
            "ext reached b's port {port}: {answer}"
        );
        // The outsider's own TLS, without the mesh ALPN (trusting nothing: whatever answers,
        // what counts is whether a connection reached an app).
        let _ = tls_client_trusting(&from_ext, "b.example", &[b"http/1.1"], None).await;
    }
    assert_eq!(http_app.requests(), 1, "ext reached b's HTTP app");
    assert_eq!(http_app.connections(), 1, "ext reached b's HTTP app");
    assert_eq!(raw_app.load(Ordering::SeqCst), 0, "ext reached b's raw app");
    mesh.b_proxy
        .assert_count_at_least(
            "outrider_tls_handshake_failures_total",
            &["reason=\"plaintext_refused\""],
            1.0,
        )
        .await;
    mesh.b_proxy
        .assert_count_at_least(
            "outrider_tcp_refused_total",
            &["direction=\"inbound\"", "reason=\"unverified\""],
            1.0,
        )
        .await;
}

in_both_families!(
    outsider_is_refused:
    an_outsider_cannot_reach_the_app_on_any_captured_port_under_strict,
    an_outsider_cannot_reach_the_app_on_any_captured_port_under_strict_over_ipv6
);

// ---- passthrough: destinations in no policy ------------------------------------------------

/// A TLS server for `ext.example` on `listener` (the app's own TLS, a CA of the test's): each
/// connection gets one line `alpn=ALPN sni=SNI` after the handshake, then an echo of what it
/// reads. Returns the CA to trust.
fn serve_app_tls(listener: UnixListener) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["ext.example".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der().clone();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"app/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = timeout(STEP, acceptor.accept(stream)).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let line = format!(
                    "alpn={} sni={}\n",
                    String::from_utf8_lossy(conn.alpn_protocol().unwrap_or(b"none")),
                    conn.server_name().unwrap_or("none")
                );
                if tls.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    der
}

type TlsStream = tokio_rustls::client::TlsStream<UnixStream>;

/// A TLS handshake as an app does it, on a new connection of `dialer`, trusting only
/// `trust` (or nothing: then any certificate fails, so only the handshake's start is sent).
async fn tls_client_trusting(
    dialer: &Dialer,
    sni: &str,
    alpn: &[&[u8]],
    trust: Option<&rustls::pki_types::CertificateDer<'static>>,
) -> Result<TlsStream, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = trust {
        roots.add(ca.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    match timeout(STEP, connector.connect(name, dialer.connect().await)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {STEP:?}")),
    }
}

/// `a`'s app calls servers in no policy, in `ext`: HTTP and a line protocol are passed through
/// to where the app meant them to go (never 404), and counted as `passthrough`.
async fn passthrough(family: Family) {
    let Some(mesh) = mesh("http1").await else {
        return;
    };
    let http_app = serve_echo(mesh.lab.expose(&mesh.ext, APP_PORT), "ext-app");
    let raw_app = serve_line_echo(mesh.lab.expose(&mesh.ext, 9000));

    let target = mesh.ext.addr(family, APP_PORT);
    let reply = mesh
        .lab
        .dialer(&mesh.a, target)
        .get("/anywhere", STEP)
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}\na logs:\n{}",
        String::from_utf8_lossy(&reply.body),
        mesh.a_proxy.logs().join("\n")
    );
    assert_eq!(reply.json()["server"], "ext-app");
    assert_eq!(reply.json()["path"], "/anywhere");
    assert_eq!(http_app.requests(), 1);

    let raw = mesh.lab.dialer(&mesh.a, mesh.ext.addr(family, 9000));
    let (answer, _) = exchange(&raw, b"hello ext\n", "echo: hello ext\n".len()).await;
    assert_eq!(answer, "echo: hello ext\n");
    assert_eq!(raw_app.load(Ordering::SeqCst), 1);

    let metrics = mesh.a_proxy.metrics().await;
    let passthrough = metric_sum(
        &metrics,
        "outrider_tcp_connections_total",
        &["direction=\"outbound\"", "destination=\"passthrough\""],
    );
    assert_eq!(passthrough, 2.0, "{metrics}");
    // By class, never by raw address.
    assert!(
        !metrics.contains(&mesh.ext.ip(family).to_string()),
        "{metrics}"
    );
}

in_both_families!(
    passthrough:
    passthrough_http_and_raw_tcp_to_a_destination_in_no_policy,
    passthrough_http_and_raw_tcp_over_ipv6
);

/// `a`'s app speaks its own TLS to a server in no policy, and a server-speaks-first protocol on
/// an opaque port (3306, in the default list): both pass untouched (the app's handshake with
/// the server's certificate and ALPN, the server's greeting byte for byte) and without waiting
/// for protocol detection.
async fn opaque_untouched(family: Family) {
    let Some(mesh) = mesh("http1").await else {
        return;
    };
    let ca = serve_app_tls(mesh.lab.expose(&mesh.ext, 8443));
    let tls_target = mesh.ext.addr(family, 8443);
    let tls_dialer = mesh.lab.dialer(&mesh.a, tls_target);
    let started = Instant::now();
    let mut tls = tls_client_trusting(&tls_dialer, "ext.example", &[b"app/1"], Some(&ca))
        .await
        .unwrap_or_else(|e| panic!("{e}\na logs:\n{}", mesh.a_proxy.logs().join("\n")));
    let mut greeting = vec![0u8; "alpn=app/1 sni=ext.example\n".len()];
    timeout(STEP, tls.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    let tls_took = started.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&greeting),
        "alpn=app/1 sni=ext.example\n"
    );
    tls.write_all(b"ping over app tls").await.unwrap();
    let mut echo = vec![0u8; "ping over app tls".len()];
    timeout(STEP, tls.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo, b"ping over app tls");
    assert!(
        tls_took < DETECTION_TIMEOUT / 2,
        "the app's TLS handshake took {tls_took:?}"
    );

    // The server speaks first: only a proxy that connects at once lets its greeting through
    // before the detection timeout.
    let banner = mesh.ext.addr(family, 3306);
    mesh.lab
        .banner_server(&mesh.ext.ns, "mysql-like", &[banner]);
    let (answer, took) = exchange(&mesh.lab.dialer(&mesh.a, banner), b"", 1).await;
    assert!(
        answer.starts_with(&format!("mysql-like local={banner} ")),
        "{answer:?}\na logs:\n{}",
        mesh.a_proxy.logs().join("\n")
    );
    assert!(took < DETECTION_TIMEOUT / 2, "the greeting took {took:?}");

    let metrics = mesh.a_proxy.metrics().await;
    for (labels, expected) in [
        (&["protocol=\"tls\""][..], 1.0),
        (&["protocol=\"opaque_port\""][..], 1.0),
    ] {
        assert_eq!(
            metric_sum(&metrics, "outrider_protocol_detections_total", labels),
            expected,
            "{labels:?}\n{metrics}"
        );
    }
}

in_both_families!(
    opaque_untouched:
    app_tls_and_a_server_first_protocol_on_an_opaque_port_pass_untouched_at_once,
    app_tls_and_opaque_port_over_ipv6
);

/// Whether redis-server and redis-cli are here; `false` (with the reason printed) skips, unless
/// OUTRIDER_REQUIRE_NETNS says the environment must have them.
fn redis_present() -> bool {
    let present = ["redis-server", "redis-cli"].iter().all(|tool| {
        std::process::Command::new(tool)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !present {
        assert!(
            !outrider_e2e::netns::required(),
            "OUTRIDER_REQUIRE_NETNS is set but redis-server or redis-cli is missing \
             (Debian redis-server, redis-tools)"
        );
        eprintln!("SKIPPED: redis-server or redis-cli missing (Debian redis-server, redis-tools)");
    }
    present
}

/// A real Redis exchange from `a` (redis-cli) to a real redis-server in `ext` on its port,
/// 6379, an opaque port by default: it works, and a fresh connection's PING is answered well
/// within the detection timeout.
async fn redis_exchange(family: Family) {
    if outrider_e2e::netns::missing_prerequisite().is_none() && !redis_present() {
        return;
    }
    let Some(mesh) = mesh("http1").await else {
        return;
    };
    let server = mesh.ext.addr(family, 6379);
    spawn_redis(&mesh.lab, &mesh.ext, server);
    let cli = |args: &[&str]| redis_cli(&mesh.lab, &mesh.a, server, args);
    mesh.wait_for_redis(&mesh.a, server).await;
    assert_eq!(cli(&["SET", "outrider", "captured"]), "OK");
    assert_eq!(cli(&["GET", "outrider"]), "captured");

    let dialer = mesh.lab.dialer(&mesh.a, server);
    let (answer, took) = exchange(&dialer, b"*1\r\n$4\r\nPING\r\n", "+PONG\r\n".len()).await;
    assert_eq!(answer, "+PONG\r\n");
    assert!(took < DETECTION_TIMEOUT / 2, "PING took {took:?}");

    mesh.a_proxy
        .assert_count_at_least(
            "outrider_protocol_detections_total",
            &["protocol=\"opaque_port\""],
            4.0,
        )
        .await;
}

in_both_families!(
    redis_exchange:
    redis_client_and_server_on_an_opaque_port_pass_untouched,
    redis_on_an_opaque_port_over_ipv6
);

/// Redis in a meshed pod under `mtls: strict`: `b` runs redis-server on 6379 (an opaque port)
/// and `a`'s policy has it as a `tls: mesh` service. `a`'s sidecar wraps the opaque stream in
/// mesh mTLS (ALPN `outrider-tcp/1`), `b`'s terminates it, checks `a`'s identity against
/// `authorization` and relays the plaintext to redis-server: PING, SET, GET work, both count a
/// mesh-wrapped relay, and `ext` (no sidecar) is still refused on 6379.
async fn redis_meshed_under_strict(family: Family) {
    let Some(mesh) = meshed_redis(family, A_ID).await else {
        return;
    };
    let server = mesh.b.addr(family, 6379);
    let cli = |pod: &Pod, args: &[&str]| redis_cli(&mesh.lab, pod, server, args);
    mesh.wait_for_redis(&mesh.a, server).await;
    assert_eq!(cli(&mesh.a, &["SET", "outrider", "meshed"]), "OK");
    assert_eq!(cli(&mesh.a, &["GET", "outrider"]), "meshed");

    mesh.a_proxy
        .assert_count_at_least(
            "outrider_tcp_connections_total",
            &["direction=\"outbound\"", "mode=\"opaque_mesh\""],
            3.0,
        )
        .await;
    mesh.b_proxy
        .assert_count_at_least(
            "outrider_tcp_connections_total",
            &["direction=\"inbound\"", "mode=\"opaque_mesh\""],
            3.0,
        )
        .await;

    // The outsider: no sidecar, so plaintext Redis, refused under strict.
    let from_ext = cli(&mesh.ext, &["PING"]);
    assert_ne!(from_ext, "PONG", "ext reached b's redis-server");
    let (answer, _) = exchange(
        &mesh.lab.dialer(&mesh.ext, server),
        b"*1\r\n$4\r\nPING\r\n",
        "+PONG\r\n".len(),
    )
    .await;
    assert_ne!(answer, "+PONG\r\n", "ext reached b's redis-server");
}

impl Mesh {
    /// Polls (bounded, a fresh client each time) until redis-cli in `from` gets PONG from
    /// `server`: redis-server takes a moment to listen.
    async fn wait_for_redis(&self, from: &Pod, server: std::net::SocketAddr) {
        let deadline = Instant::now() + STEP;
        while redis_cli(&self.lab, from, server, &["PING"]) != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server at {server} never answered {}\na logs:\n{}\nb logs:\n{}",
                from.ns,
                self.a_proxy.logs().join("\n"),
                self.b_proxy.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What `redis-cli` in `pod`, calling `server` with `args`, printed.
fn redis_cli(lab: &Lab, pod: &Pod, server: std::net::SocketAddr, args: &[&str]) -> String {
    let host = server.ip().to_string();
    let port = server.port().to_string();
    let mut full = vec!["redis-cli", "-h", &host, "-p", &port];
    full.extend_from_slice(args);
    let output = lab.run_in(&pod.ns, &full);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The lab for the meshed Redis tests: `a` has b's Redis as a `tls: mesh` service, `b` lets
/// only `b_allowed` in and runs redis-server on 6379. `None`: skipped.
async fn meshed_redis(family: Family, b_allowed: &str) -> Option<Mesh> {
    if outrider_e2e::netns::missing_prerequisite().is_none() && !redis_present() {
        return None;
    }
    let a_policy = |b: &Pod| {
        format!(
            "workload: a
services:
  redis:
    endpoints: [\"{}\", \"{}\"]
    tls: mesh
    identity: {B_ID}
",
            b.addr(Family::V4, 6379),
            b.addr(Family::V6, 6379),
        )
    };
    let mesh = mesh_with_policy(a_policy, &[], b_allowed).await?;
    spawn_redis(&mesh.lab, &mesh.b, mesh.b.addr(family, 6379));
    Some(mesh)
}

/// Runs redis-server in `pod`, listening on `server`.
fn spawn_redis(lab: &Lab, pod: &Pod, server: std::net::SocketAddr) {
    let bind = server.ip().to_string();
    let port = server.port().to_string();
    lab.spawn_in(
        &pod.ns,
        &[
            "redis-server",
            "--bind",
            &bind,
            "--port",
            &port,
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            lab.dir.to_str().unwrap(),
        ],
    );
}

/// A sidecar's endpoint may name the peer's inbound port itself (README: "Endpoints naming
/// 15006 keep working"): `a` wraps a Redis stream to b:15006 in mesh mTLS offering only
/// `outrider-tcp/1`, and b's explicit inbound listener relays its plaintext to `inbound.app`
/// (redis-server) after checking `authorization`, as on a captured port, rather than reading
/// Redis commands as an HTTP request (which answered them 400).
#[tokio::test]
async fn redis_wrapped_to_the_explicit_inbound_port_reaches_inbound_app() {
    if outrider_e2e::netns::missing_prerequisite().is_none() && !redis_present() {
        return;
    }
    let explicit = |b: &Pod| b.addr(Family::V4, 15006);
    let a_policy = |b: &Pod| {
        format!(
            "workload: a
services:
  redis:
    endpoints: [\"{}\"]
    tls: mesh
    identity: {B_ID}
",
            explicit(b)
        )
    };
    let b_policy = |b: &Pod| {
        format!(
            "workload: b
inbound:
  app: \"{}\"
  mtls: strict
  authorization: {{ allow: [{A_ID}] }}
",
            b.addr(Family::V4, 6379)
        )
    };
    let Some(mesh) = mesh_with_policies(a_policy, &[], b_policy, A_ID).await else {
        return;
    };
    spawn_redis(&mesh.lab, &mesh.b, mesh.b.addr(Family::V4, 6379));
    let server = explicit(&mesh.b);
    let cli = |args: &[&str]| redis_cli(&mesh.lab, &mesh.a, server, args);
    mesh.wait_for_redis(&mesh.a, server).await;
    assert_eq!(cli(&["SET", "outrider", "explicit"]), "OK");
    assert_eq!(cli(&["GET", "outrider"]), "explicit");
    mesh.b_proxy
        .assert_count_at_least(
            "outrider_tcp_connections_total",
            &["direction=\"inbound\"", "mode=\"opaque_mesh\""],
            3.0,
        )
        .await;
}

/// The same with `b` letting only another identity in: `a`'s wrapped stream is verified and
/// then closed by `authorization`, so redis-server never answers `a`.
#[tokio::test]
async fn redis_from_a_caller_authorization_does_not_allow_is_closed() {
    let Some(mesh) = meshed_redis(Family::V4, "spiffe://cluster.local/ns/shop/sa/other").await
    else {
        return;
    };
    let server = mesh.b.addr(Family::V4, 6379);
    // redis-server is up (checked from inside b: its own outbound capture passes it through)
    // before a's attempt counts.
    mesh.wait_for_redis(&mesh.b, server).await;
    // Closed, not left hanging: redis-cli sees the end at once.
    let started = Instant::now();
    assert_ne!(redis_cli(&mesh.lab, &mesh.a, server, &["PING"]), "PONG");
    assert!(started.elapsed() < STEP / 2, "{:?}", started.elapsed());
    mesh.a_proxy
        .assert_count_at_least(
            "outrider_tcp_connections_total",
            &["direction=\"outbound\"", "mode=\"opaque_mesh\""],
            1.0,
        )
        .await;
    mesh.b_proxy
        .assert_count(
            "outrider_tcp_connections_total",
            &["direction=\"inbound\"", "mode=\"opaque_mesh\""],
            0.0,
        )
        .await;
    mesh.b_proxy
        .assert_count_at_least(
            "outrider_tcp_refused_total",
            &["direction=\"inbound\"", "reason=\"unauthorized\""],
            1.0,
        )
        .await;
}

in_both_families!(
    redis_meshed_under_strict:
    redis_between_meshed_pods_is_wrapped_in_mtls_under_strict,
    redis_between_meshed_pods_under_strict_over_ipv6
);

// ---- a rule set without the UID exclusion --------------------------------------------------

/// `a`'s rules exempt UID 65533 while its sidecar runs as 65532: the sidecar's own connection
/// to where the app was going comes back to it. It recognises its own connection, refuses it
/// with a log line and a metric, and the app gets an answer (an error) at once instead of a
/// connection loop that grows until a limit.
#[tokio::test]
async fn rules_without_the_proxy_uid_exclusion_are_refused_not_looped() {
    // The control plane stays reachable (the sidecar's connections to it would loop too).
    let a_init = [
        "--proxy-uid",
        "65533",
        "--skip-outbound-cidrs",
        "192.0.2.254/32,2001:db8::fe/128",
    ];
    let Some(mesh) = mesh_with("http1", &a_init).await else {
        return;
    };
    let http_app = serve_echo(mesh.lab.expose(&mesh.ext, APP_PORT), "ext-app");
    let started = Instant::now();
    let outcome = mesh
        .lab
        .dialer(&mesh.a, mesh.ext.addr(Family::V4, APP_PORT))
        .get("/", STEP)
        .await;
    let took = started.elapsed();
    assert_eq!(
        outcome.as_ref().map(|reply| reply.status),
        Ok(502),
        "a logs:\n{}",
        mesh.a_proxy.logs().join("\n")
    );
    assert!(
        took < Duration::from_secs(5),
        "the refusal took {took:?}\na logs:\n{}\n{}",
        mesh.a_proxy.logs().join("\n"),
        mesh.a_proxy.metrics().await
    );
    assert_eq!(http_app.connections(), 0);

    let loops = mesh
        .a_proxy
        .metric_sum(
            "outrider_capture_loops_total",
            &["reason=\"own_connection\""],
        )
        .await;
    assert!(loops >= 1.0, "{}", mesh.a_proxy.metrics().await);
    // The loop went round once, not until a cap: a handful of connections at most.
    let accepted = mesh
        .a_proxy
        .metric_sum("outrider_tcp_connections_total", &[])
        .await;
    assert!(accepted <= 4.0, "{}", mesh.a_proxy.metrics().await);
    assert!(
        outrider_e2e::eventually(Duration::from_secs(5), || mesh
            .a_proxy
            .logs()
            .iter()
            .any(|l| l.contains("WARN")
                && l.contains("captured connection refused: it loops back into this proxy")))
        .await,
        "no warning about the loop:\n{}",
        mesh.a_proxy.logs().join("\n")
    );
}
