//! A misbehaving peer must not crash, stall or fool the sidecar: huge `Retry-After` values,
//! transfer codings the proxy cannot apply, forged reserved headers (by header, underscore
//! spelling or trailer, against a real WSGI app), and loopback admin calls on a dual-stack
//! admin port.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use outrider_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn route(services: &str) -> String {
    format!("services:\n{services}routes:\n  - name: r\n    match: {{ authority: svc }}\n    service: svc\n")
}

/// Answers every request 503 with `Retry-After: retry_after`.
async fn unavailable(retry_after: &'static str) -> Upstream {
    Upstream::start(Proto::Http1, move |_req| async move {
        let mut res = Response::new(full("busy"));
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        res.headers_mut()
            .insert("retry-after", retry_after.parse().unwrap());
        res
    })
    .await
}

fn get_svc(proxy: &Proxy) -> Request<TestBody> {
    Request::get(format!("http://{}/", proxy.outbound))
        .header("host", "svc")
        .body(empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_passed_back_and_the_proxy_lives_on() {
    let upstream = unavailable("9223372036854775807").await;
    // No request timeout (the default): only `max_retry_after` (default 30s) bounds the wait.
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    // Before: adding the delay to the clock panicked, and the connection died with the proxy.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        send(&http1_client(), get_svc(&proxy)),
    )
    .await
    .expect("answered at once");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("9223372036854775807"));
    assert_eq!(&reply.body[..], b"busy", "the upstream's own response");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 1, "not retried");
    // Still alive and serving.
    let reply = send(&http1_client(), get_svc(&proxy)).await;
    assert_eq!(reply.status, 503);
    assert_eq!(upstream.hits(), 2);
    assert_eq!(proxy.admin_get("/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_cap_is_not_waited_for() {
    let upstream = unavailable("100000").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }} }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    // Before: the request waited 100,000 s for its retry.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        send(&http1_client(), get_svc(&proxy)),
    )
    .await
    .expect("answered at once");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("100000"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 1);

    // Within a lowered cap it is waited for; beyond it, not.
    let upstream = unavailable("1").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], max_retry_after: 2s }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    let reply = send(&http1_client(), get_svc(&proxy)).await;
    assert_eq!(reply.status, 503);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 2, "retried after the second asked for");
    let upstream = unavailable("3").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n    retries: {{ attempts: 1, on: [5xx], max_retry_after: 2s }}\n",
        upstream.addr
    )));
    let started = Instant::now();
    let reply = send(&http1_client(), get_svc(&proxy)).await;
    assert_eq!(reply.status, 503);
    // Not retried, and not held for the 3 s asked for either: answered sooner than that (a
    // bound of the wait refused, not of the machine's speed).
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.hits(), 1);
}

/// PUT or POST with `body` on the admin port at `addr`: the status.
async fn admin_call(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(full(body.to_string()))
        .unwrap();
    send(&http1_client(), req).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_on_every_address_takes_loopback_calls_over_ipv4() {
    let mut proxy = start_proxy_with(
        "services:\n  svc: { endpoints: [127.0.0.1:9] }\n",
        &["--admin", "[::]:0", "--shutdown-endpoint"],
    );
    assert!(
        proxy.admin.ip().is_unspecified() && proxy.admin.is_ipv6(),
        "{}",
        proxy.admin
    );
    // An IPv4 caller on a dual-stack socket arrives as ::ffff:127.0.0.1.
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.admin.port()));
    assert_eq!(admin_call(local, "PUT", "/log-level", "debug").await, 200);
    assert_eq!(admin_call(local, "POST", "/shutdown", "").await, 202);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

/// A chunked POST of `hello` to `host` framed with `Transfer-Encoding: {codings}`.
fn chunked_post(host: &str, codings: &str) -> String {
    format!(
        "POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {codings}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_transfer_codings_other_than_one_chunked_are_refused_unforwarded() {
    let upstream = Upstream::echo(Proto::Http1, "svc").await;
    let proxy = start_proxy(&route(&format!(
        "  svc:\n    endpoints: [{}]\n",
        upstream.addr
    )));
    let exchange = |request: String| async move {
        raw_exchange(proxy.outbound, request.as_bytes(), Duration::from_secs(5)).await
    };
    // Before: forwarded as plain chunked, the app reading gzip bytes as content.
    for codings in ["gzip, chunked", "gzip\r\nTransfer-Encoding: chunked"] {
        let answer = exchange(chunked_post("svc", codings)).await;
        assert!(answer.starts_with("HTTP/1.1 501 "), "{answer}");
        assert!(
            answer.contains("x-outrider-error: unsupported transfer coding gzip\r\n"),
            "{answer}"
        );
    }
    // Before: decoded once, the body arriving still chunked.
    for codings in ["chunked, chunked", "chunked\r\nTransfer-Encoding: chunked"] {
        let answer = exchange(chunked_post("svc", codings)).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(
            answer.contains(
                "x-outrider-error: bad request: chunked transfer coding applied more than once\r\n"
            ),
            "{answer}"
        );
    }
    assert_eq!(upstream.hits(), 0, "nothing forwarded");
    // One chunked coding is the normal case.
    let answer = exchange(chunked_post("svc", "chunked")).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains(r#""body_len":5"#), "{answer}");
    assert_eq!(upstream.hits(), 1);
}

/// An upstream that reads each request (head and Content-Length body) and answers it with the
/// raw bytes `response`, then closes; counts the requests.
async fn raw_upstream(response: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + length {
                        break;
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_transfer_codings_other_than_one_chunked_are_502() {
    for (response, reason) in [
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            "unsupported transfer coding gzip",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "chunked transfer coding applied more than once",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "chunked transfer coding applied more than once",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
            "unsupported transfer coding gzip",
        ),
    ] {
        let (upstream, hits) = raw_upstream(response).await;
        let proxy = start_proxy(&route(&format!("  svc:\n    endpoints: [{upstream}]\n")));
        let expected = format!("upstream {upstream} failed: {reason}");
        // A bodiless GET is read by the proxy's own codec; a POST with a body by hyper's client.
        for (method, body) in [("GET", ""), ("POST", "hello")] {
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{}/", proxy.outbound))
                .header("host", "svc")
                .body(full(body))
                .unwrap();
            let reply = send(&http1_client(), req).await;
            // Before: 200, the coding dropped and its bytes passed on as content.
            assert_eq!(reply.status, 502, "{method} {}", String::from_utf8_lossy(response));
            assert_eq!(reply.header("x-outrider-error"), Some(&expected[..]), "{method}");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}

/// A WSGI app (Python's wsgiref) on 127.0.0.1 that answers each request with the `HTTP_*`
/// variables of its environ as JSON: what a CGI/WSGI framework would read as headers.
struct WsgiApp {
    child: Child,
    addr: SocketAddr,
}

const WSGI_APP: &str = r#"
import json
from wsgiref.simple_server import make_server, WSGIRequestHandler

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;

impl WsgiApp {
    fn start() -> Self {
        let mut child = Command::new("python3")
            .args(["-c", WSGI_APP])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("port: {line:?}"));
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for WsgiApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wsgi_app_behind_inbound_never_sees_a_forged_peer_identity() {
    let app = WsgiApp::start();
    let proxy = start_proxy(&format!("inbound:\n  app: {}\n", app.addr));
    let call = |name: &'static str| {
        let req = Request::get(format!("http://{}/", proxy.inbound))
            .header("host", "app")
            .header("x-custom", "seen")
            .header(name, "spiffe://cluster.local/ns/default/sa/admin")
            .body(empty())
            .unwrap();
        async move { send(&http1_client(), req).await }
    };
    // The dashed name is replaced by the verified identity: none for a plaintext caller.
    let reply = call("x-outrider-peer-identity").await;
    assert_eq!(reply.status, 200);
    let environ = reply.json();
    assert_eq!(
        environ["HTTP_X_CUSTOM"], "seen",
        "the app sees headers: {environ}"
    );
    assert!(
        environ.get("HTTP_X_OUTRIDER_PEER_IDENTITY").is_none(),
        "{environ}"
    );
    // Before: the underscore spelling reached the app as HTTP_X_OUTRIDER_PEER_IDENTITY.
    for variant in ["x_outrider_peer_identity", "x-outrider_peer-identity"] {
        let reply = call(variant).await;
        assert_eq!(
            reply.status,
            400,
            "{variant}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(
            reply.header("x-outrider-error"),
            Some("bad request: x-outrider-* header name spelt with underscores")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reserved_trailers_are_removed_on_the_way_to_the_app() {
    // A WSGI app cannot see trailers: this app reports the trailer names it received.
    let app = Upstream::start(Proto::Http1, |req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let names: Vec<String> = collected
            .trailers()
            .map(|t| t.keys().map(ToString::to_string).collect())
            .unwrap_or_default();
        Response::new(full(serde_json::to_string(&names).unwrap()))
    })
    .await;
    let proxy = start_proxy(&format!("inbound:\n  app: {}\n", app.addr));
    let forged = "spiffe://cluster.local/ns/default/sa/admin";
    let request = format!(
        "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\
         Trailer: x-outrider-peer-identity, x_outrider_peer_identity, x-kept\r\n\
         Connection: close\r\n\r\n\
         5\r\nhello\r\n0\r\n\
         x-outrider-peer-identity: {forged}\r\nx_outrider_peer_identity: {forged}\r\nx-kept: 1\r\n\r\n"
    );
    let answer = raw_exchange(proxy.inbound, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // Before: both forged trailers reached the app.
    assert!(answer.ends_with(r#"["x-kept"]"#), "{answer}");
    assert_eq!(app.hits(), 1);
}
