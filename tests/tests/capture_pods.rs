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
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider_e2e::control::{Control, ControlDirs};
use outrider_e2e::netns::{Dialer, Family, Lab, Pod, Sidecar, PROXY_UID};
use outrider_e2e::{empty, full, TestBody};
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

/// The callee's policy: strict mTLS on every captured port, only `a` let in. `inbound.app`
/// names a port where nothing listens: a captured connection must go to its original
/// destination, not there.
fn b_policy() -> String {
    format!(
        "workload: b
inbound:
  app: 127.0.0.1:9
  mtls: strict
  authorization: {{ allow: [{A_ID}] }}
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
    let lab = Lab::new(env!("CARGO_BIN_EXE_netns-probe"))?;
    let a = lab.pod("a", 1);
    let b = lab.pod("b", 2);
    let ext = lab.pod("ext", 3);
    lab.init_ok(&a, a_init);
    lab.init_ok(&b, &[]);
    let dirs = ControlDirs::new();
    dirs.write("a.yaml", &a_policy(&b, a_protocol));
    dirs.write("b.yaml", &b_policy());
    let control = lab.start_control(&dirs);
    let a_proxy = lab.start_sidecar(&a, &control, &dirs, "a", PROXY_UID, &[]);
    let b_proxy = lab.start_sidecar(&b, &control, &dirs, "b", PROXY_UID, &[]);
    a_proxy.wait_ready().await;
    b_proxy.wait_ready().await;
    // Ready means some policy is held; wait for the documents' own.
    a_proxy
        .wait_policy(&b.addr(Family::V4, APP_PORT).to_string())
        .await;
    b_proxy.wait_policy(A_ID).await;
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

/// Serves HTTP/1.1 on `listener` (an app's port, see `Lab::expose`): every request is answered
/// with a JSON echo of its method, path and headers; returns the request count.
fn serve_echo(listener: UnixListener, name: &'static str) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            let service = service_fn(move |req: Request<Incoming>| {
                counter.fetch_add(1, Ordering::SeqCst);
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
    hits
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

fn get(path: &str, host: SocketAddr) -> Request<TestBody> {
    Request::get(path)
        .header("host", host.to_string())
        .body(empty())
        .unwrap()
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
    assert_eq!(app.load(Ordering::SeqCst), 1);

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
    // b refuses plaintext (strict): the request that reached its app came over mTLS.
    assert_eq!(
        mesh.b_proxy
            .metric_sum("outrider_tls_handshake_failures_total", &[])
            .await,
        0.0
    );
}

#[tokio::test]
async fn http1_between_pods_by_pod_ip_crosses_both_sidecars_over_mtls() {
    http1_between_pods(Family::V4).await;
}

#[tokio::test]
async fn http1_between_pods_over_ipv6() {
    http1_between_pods(Family::V6).await;
}
