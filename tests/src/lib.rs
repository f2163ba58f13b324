//! Test fixtures for end-to-end tests: the real `outrider-proxy` binary started on port 0 with a
//! policy, real upstream servers on 127.0.0.1, and clients. Nothing here is a mock: every byte
//! crosses loopback sockets through the binary users run.

#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub mod control;
pub mod etcd;
pub mod hostile;
pub mod netns;
pub mod pb;
pub mod prometheus;
pub mod service_account;
pub mod w3c;
pub use control::{
    start_control, start_control_with, Control, ControlDirs, Subscription, CONTROL_TOKEN,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// An empty body.
pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// Path of the proxy binary, built once per test process so tests never run a stale binary.
/// `OUTRIDER_PROXY_BIN` overrides it: nextest's setup script (`scripts/build-e2e-binaries`)
/// builds the binaries before the first test and sets it, so no test compiles anything.
pub fn proxy_binary() -> PathBuf {
    static BUILD: Once = Once::new();
    if let Ok(bin) = std::env::var("OUTRIDER_PROXY_BIN") {
        return PathBuf::from(bin);
    }
    BUILD.call_once(|| cargo_build(&["-p", "outrider-proxy", "--bin", "outrider-proxy"]));
    target_debug().join("outrider-proxy")
}

/// Path of the control-plane binary (`outrider-control`), built once per test process along
/// with `outriderctl` so tests never run a stale binary. `OUTRIDER_CONTROL_BIN` overrides it.
pub fn control_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("OUTRIDER_CONTROL_BIN") {
        return PathBuf::from(bin);
    }
    control_bins().join("outrider-control")
}

/// Path of `outriderctl`, built like [`control_binary`]. `OUTRIDER_CTL_BIN` overrides it.
pub fn ctl_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("OUTRIDER_CTL_BIN") {
        return PathBuf::from(bin);
    }
    control_bins().join("outriderctl")
}

fn control_bins() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| cargo_build(&["-p", "outrider-control", "--bins"]));
    target_debug()
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_debug() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"))
        .join("debug")
}

/// `cargo build ARGS` in the workspace (the same commands as `scripts/build-e2e-binaries`).
/// When the binary is stale this compiles inside the calling test and counts against its
/// timeout, so the test's output says so: a test killed while building shows the first line
/// without the second.
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "harness: cargo build {} (compiles here if the binary is stale; \
         scripts/build-e2e-binaries builds it before the tests)",
        args.join(" ")
    );
    let started = Instant::now();
    let status = Command::new(cargo)
        .current_dir(workspace())
        .arg("build")
        .arg("-q")
        .args(args)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build {} failed", args.join(" "));
    eprintln!("harness: built in {:.1?}", started.elapsed());
}

/// A running `outrider-proxy` process.
pub struct Proxy {
    child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub dedicated: Vec<(String, SocketAddr)>,
    logs: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// Writes `policy` to a temporary file and starts the proxy on port 0 everywhere.
pub fn start_proxy(policy: &str) -> Proxy {
    start_proxy_with(policy, &[])
}

/// Like [`start_proxy`], with extra flags.
pub fn start_proxy_with(policy: &str, extra: &[&str]) -> Proxy {
    let dir = TempDir::new();
    let path = dir.path.join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["--policy".into(), path.into()];
    args.extend(extra.iter().map(Into::into));
    spawn_proxy(dir, &args)
}

/// Starts the proxy with `args` (plus port 0 everywhere and info logs) and waits until it
/// listens. `dir` lives as long as the proxy.
pub fn spawn_proxy(dir: TempDir, args: &[std::ffi::OsString]) -> Proxy {
    spawn_proxy_env(dir, args, &[])
}

/// Like [`spawn_proxy`], with extra environment variables.
pub fn spawn_proxy_env(dir: TempDir, args: &[std::ffi::OsString], env: &[(&str, &str)]) -> Proxy {
    spawn_proxy_command(Command::new(proxy_binary()), dir, args, env)
}

/// Like [`start_proxy_with`], with the process's descriptor limit (soft and hard) set to
/// `nofile` before it starts, as `ulimit -n` in its container would.
pub fn start_proxy_with_nofile(policy: &str, extra: &[&str], nofile: u64) -> Proxy {
    let dir = TempDir::new();
    let path = dir.path.join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["--policy".into(), path.into()];
    args.extend(extra.iter().map(Into::into));
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(proxy_binary());
    spawn_proxy_command(shell, dir, &args, &[])
}

/// Starts `command` (the proxy binary or a wrapper that execs it) with the harness's flags
/// then `args`, and waits until it listens.
fn spawn_proxy_command(
    mut command: Command,
    dir: TempDir,
    args: &[std::ffi::OsString],
    env: &[(&str, &str)],
) -> Proxy {
    // An `--admin` in `args` replaces the default (clap refuses a flag given twice).
    let admin_given = args.iter().any(|a| a == "--admin");
    command
        .args([
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--log",
            "info",
        ])
        .args(
            (!admin_given)
                .then_some(["--admin", "127.0.0.1:0"])
                .into_iter()
                .flatten(),
        )
        .args(args)
        .envs(env.iter().copied());
    spawn_proxy_exact(command, dir)
}

/// Starts `command` (the proxy binary, or a wrapper that execs it, with every flag given) and
/// waits until it listens: for proxies whose listeners the test places itself, such as in a
/// network namespace (netns.rs).
pub fn spawn_proxy_exact(mut command: Command, dir: TempDir) -> Proxy {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outrider-proxy");
    let stderr = child.stderr.take().unwrap();
    // Stdout carries the access log; read it always, so a full pipe never stalls the writer.
    let stdout_pipe = child.stdout.take().unwrap();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let out_sink = Arc::clone(&stdout);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout_pipe).lines() {
            let Ok(line) = line else { break };
            out_sink.lock().unwrap().push(line);
        }
    });
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let sink = Arc::clone(&logs);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let mut dedicated = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(remaining) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "proxy did not start; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let field = |name: &str| -> SocketAddr { event[name].as_str().unwrap().parse().unwrap() };
        match event["message"].as_str() {
            Some("service listener bound") => dedicated.push((
                event["service"].as_str().unwrap().to_string(),
                field("listen"),
            )),
            Some("listening") => {
                return Proxy {
                    outbound: field("outbound"),
                    inbound: field("inbound"),
                    admin: field("admin"),
                    dedicated,
                    child,
                    logs,
                    stdout,
                    _dir: dir,
                }
            }
            _ => {}
        }
    }
}

impl Proxy {
    /// The bound address of `service`'s dedicated listener.
    pub fn dedicated(&self, service: &str) -> SocketAddr {
        self.dedicated
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no dedicated listener for {service}"))
    }

    /// The policy file [`start_proxy`] wrote (edit it to test hot reload).
    pub fn policy_path(&self) -> PathBuf {
        self._dir.path.join("policy.yaml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A `kB` field of /proc/PID/status, such as `VmRSS:`.
    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Every stdout line so far (the access log).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// GET on the admin port: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let client = http1_client();
        let res = client
            .request(
                Request::get(format!("http://{}{}", self.admin, path))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Polls the admin `/ready` until 200 (a policy held and, with an identity, a
    /// certificate), for at most 15 s; fails the test with the last answer and the logs.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = self.admin_get("/ready").await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready: {body}\nlogs:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 15 s) until the proxy runs a policy whose admin `/config` contains
    /// `needle`.
    pub async fn wait_policy(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (_, config) = self.admin_get("/config").await;
            if config.contains(needle) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "policy with {needle} never arrived: {config}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of the Prometheus sample named exactly `series` (`name{labels}`), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "outrider-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Which protocol a test server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A real upstream HTTP server on 127.0.0.1:0 that counts the requests it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts a server answering each request with `handler`.
    pub async fn start<H, F>(proto: Proto, handler: H) -> Self
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            // The connections' tasks belong to this one: when it is aborted (`kill`, drop) they
            // go with it and their sockets close, as a dead process's would.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    Some(_) = connections.join_next() => continue,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let handler = handler.clone();
                let counter = Arc::clone(&counter);
                let service = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                connections.spawn(async move {
                    let io = TokioIo::new(stream);
                    let _ = match proto {
                        Proto::Http1 => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .with_upgrades()
                                .await
                        }
                        Proto::Http2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await
                        }
                    };
                });
            }
        });
        Self { addr, hits, task }
    }

    /// A server that answers every request with a JSON description of what it received:
    /// its own name, method, path, version and headers, and the request body's length.
    pub async fn echo(proto: Proto, name: &'static str) -> Self {
        Self::start(proto, move |req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
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
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "path": parts.uri.path(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body_len": body.len(),
            });
            Response::new(full(json.to_string()))
        })
        .await
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops as a killed process does: the listener is closed once this returns (connects
    /// are refused), and so are the connections it had open.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 client (keep-alive pool).
pub fn http1_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A prior-knowledge HTTP/2 (h2c) client.
pub fn http2_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read whole.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `req` with `client` and reads the whole response.
pub async fn send(client: &Client<HttpConnector, TestBody>, req: Request<TestBody>) -> Reply {
    let res = client.request(req).await.expect("request failed");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// GET `path` on `addr` with the given Host header over HTTP/1.1.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    send(
        &http1_client(),
        Request::get(format!("http://{addr}{path}"))
            .header("host", host)
            .body(empty())
            .unwrap(),
    )
    .await
}

/// Writes raw bytes to `addr` and returns everything read until the peer closes or `timeout`.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A body of `remaining` zero bytes produced in 64 KiB chunks as it is polled, so a test can
/// send or serve gigabytes without holding them.
pub struct ZeroBody {
    remaining: u64,
    chunk: Bytes,
}

impl ZeroBody {
    pub fn new(total: u64) -> Self {
        Self {
            remaining: total,
            chunk: Bytes::from(vec![0u8; 64 * 1024]),
        }
    }
}

impl http_body::Body for ZeroBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.slice(..n)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// A body fed chunk by chunk through a channel; ends when the sender is dropped.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, TestBody) {
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);
    impl http_body::Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    (tx, ChannelBody(rx).boxed())
}

/// Counts the bytes of a body as it streams, without keeping them.
pub async fn drain_body<B>(mut body: B) -> u64
where
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            total += bytes::Buf::remaining(&data) as u64;
        }
    }
    total
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Proxy {
    /// Resident set size now (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    /// The names of the proxy's threads now (from /proc/PID/task/*/comm).
    pub fn thread_names(&self) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).unwrap();
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim_end().to_string())
            .collect()
    }
}

/// Sends an HTTP/2 request to `addr` over a fresh h2c connection, keeping the request's own
/// URI authority as :authority.
pub async fn send_h2_via(addr: std::net::SocketAddr, req: Request<TestBody>) -> Reply {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let res = sender.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}
