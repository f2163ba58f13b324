//! The app's own probes, forwarded by the sidecar: a pod with HTTP, TCP and gRPC probes (on its
//! containers and on a native sidecar, an init container with `restartPolicy: Always`) is
//! injected by the real `outriderctl inject`, and the real `outrider-proxy` is started with
//! the probe configuration inject wrote on its container (`OUTRIDER_APP_PROBES`, and
//! `OUTRIDER_POD_IP` as the downward API would set it, here 127.0.0.1). Its admin port's
//! `/app-health/<container>/<kind>` performs each original probe against real servers on
//! 127.0.0.1: 503 while the app fails, 200 once it is healthy, 503 within the timeout for a
//! closed or silent port, 404 for a probe that was never configured. The kubelet and the
//! capture rules are what a cluster adds (see capture_init.rs for the rules).

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use outrider_e2e::*;

const POLICY: &str = "services:\n  nothing: { endpoints: [127.0.0.1:9] }\n";

/// Runs `outriderctl inject` on `manifest` and returns the proxy container's env entry `name`.
fn injected_env(manifest: &str, name: &str) -> Option<serde_json::Value> {
    let mut inject = std::process::Command::new(ctl_binary())
        .args(["inject", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut inject.stdin.take().unwrap(), manifest.as_bytes()).unwrap();
    let out = inject.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod: serde_json::Value =
        serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outrider-proxy")
        .unwrap()
        .clone();
    proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

/// A gRPC health server (h2c) answering `grpc.health.v1.Health/Check` with NOT_SERVING (2)
/// until `serving` turns true, then SERVING (1).
async fn grpc_health_server(serving: Arc<AtomicBool>) -> Upstream {
    Upstream::start(Proto::Http2, move |req: Request<Incoming>| {
        let serving = Arc::clone(&serving);
        async move {
            assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
            let request = req.into_body().collect().await.unwrap().to_bytes();
            // HealthCheckRequest { service: "web" }, length-prefixed.
            assert_eq!(&request[..], [0, 0, 0, 0, 5, 0x0a, 3, b'w', b'e', b'b']);
            let status = if serving.load(Ordering::SeqCst) { 1 } else { 2 };
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_probes_are_performed_by_the_proxy_against_the_app() {
    // The app: /healthz fails until it is told it is healthy; it must see the probe's header.
    let healthy = Arc::new(AtomicBool::new(false));
    let app_healthy = Arc::clone(&healthy);
    let app = Upstream::start(Proto::Http1, move |req: Request<Incoming>| {
        let healthy = app_healthy.load(Ordering::SeqCst);
        async move {
            assert_eq!(req.uri().path_and_query().unwrap(), "/healthz?deep=1");
            assert_eq!(req.headers()["x-probe"], "kubelet");
            let status = if healthy { 204 } else { 500 };
            Response::builder().status(status).body(empty()).unwrap()
        }
    })
    .await;
    let serving = Arc::new(AtomicBool::new(false));
    let grpc = grpc_health_server(Arc::clone(&serving)).await;
    // A port nothing listens on, and one that accepts (the kernel's backlog) but never answers.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();

    let manifest = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  initContainers:
  - name: shipper
    image: shipper:1
    restartPolicy: Always
    startupProbe:
      tcpSocket: {{port: {app_port}}}
  containers:
  - name: app
    image: web:1
    ports: [{{name: http, containerPort: {app_port}}}]
    livenessProbe:
      httpGet:
        path: /healthz?deep=1
        port: http
        httpHeaders: [{{name: X-Probe, value: kubelet}}]
    readinessProbe:
      tcpSocket: {{port: {app_port}}}
    startupProbe:
      grpc: {{port: {grpc_port}, service: web}}
  - name: broken
    image: broken:1
    livenessProbe:
      tcpSocket: {{port: {closed_port}}}
      timeoutSeconds: 2
    readinessProbe:
      httpGet: {{path: /, port: {silent_port}}}
      timeoutSeconds: 1
",
        app_port = app.addr.port(),
        grpc_port = grpc.addr.port(),
    );
    let probes = injected_env(&manifest, "OUTRIDER_APP_PROBES").unwrap();
    let probes = probes["value"].as_str().unwrap().to_string();
    let pod_ip = injected_env(&manifest, "OUTRIDER_POD_IP").unwrap();
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");

    let dir = TempDir::new();
    let policy = dir.path.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let proxy = spawn_proxy_env(
        dir,
        &["--policy".into(), policy.into()],
        &[
            ("OUTRIDER_APP_PROBES", &probes),
            ("OUTRIDER_POD_IP", "127.0.0.1"),
        ],
    );

    // Failing, then healthy: the app's status decides, as the kubelet would count it.
    let (status, body) = proxy.admin_get("/app-health/app/liveness").await;
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            format!("unhealthy: http {}/healthz?deep=1: HTTP 500\n", app.addr).as_str()
        )
    );
    healthy.store(true, Ordering::SeqCst);
    let (status, body) = proxy.admin_get("/app-health/app/liveness").await;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            format!("healthy: http {}/healthz?deep=1: HTTP 204\n", app.addr).as_str()
        )
    );
    assert_eq!(app.hits(), 2);

    let (status, body) = proxy.admin_get("/app-health/app/readiness").await;
    assert_eq!(
        (status, body),
        (200, format!("healthy: tcp {} connected\n", app.addr))
    );
    // The native sidecar's probe, served the same way.
    let (status, body) = proxy.admin_get("/app-health/shipper/startup").await;
    assert_eq!(
        (status, body),
        (200, format!("healthy: tcp {} connected\n", app.addr))
    );

    let (status, body) = proxy.admin_get("/app-health/app/startup").await;
    assert_eq!(
        (status, body),
        (
            503,
            format!(
                "unhealthy: gRPC {}: serving status 2, not SERVING\n",
                grpc.addr
            )
        )
    );
    serving.store(true, Ordering::SeqCst);
    let (status, body) = proxy.admin_get("/app-health/app/startup").await;
    assert_eq!(
        (status, body),
        (200, format!("healthy: gRPC {}: SERVING\n", grpc.addr))
    );

    // A closed port fails at once; a silent one when the probe's timeout (1s) runs out.
    let started = Instant::now();
    let (status, body) = proxy.admin_get("/app-health/broken/liveness").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with(&format!("unhealthy: tcp 127.0.0.1:{closed_port}: ")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let (status, body) = proxy.admin_get("/app-health/broken/readiness").await;
    let elapsed = started.elapsed();
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "unhealthy: no answer within the probe's timeout (1s)\n"
        )
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    drop(silent);

    // Only the configured probes exist.
    for path in [
        "/app-health/app/ready",
        "/app-health/worker/liveness",
        "/app-health/",
        "/app-health/app/liveness/x",
    ] {
        assert_eq!(proxy.admin_get(path).await.0, 404, "{path}");
    }
}

#[test]
fn a_probe_that_names_a_host_is_refused_at_start() {
    for (probes, message) in [
        (
            r#"{"app/liveness":{"httpGet":{"host":"169.254.169.254","path":"/latest/meta-data","port":80}}}"#,
            "unknown field `host`",
        ),
        (
            r#"{"app/liveness":{"exec":{"command":["true"]}}}"#,
            "unknown field `exec`",
        ),
        (
            r#"{"app":{"tcpSocket":{"port":80}}}"#,
            "`app` is not <container>/",
        ),
    ] {
        let out = std::process::Command::new(proxy_binary())
            .args(["--demo", "--app-probes", probes])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{probes}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("outrider-proxy: --app-probes: "),
            "{stderr}"
        );
        assert!(stderr.contains(message), "{stderr}");
    }
}
