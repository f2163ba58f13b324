//! Control-plane fixtures: the real `outrider-control` binary on 127.0.0.1:0 with a policy
//! directory and a state directory that outlive it (restart tests), raw subscriptions read
//! line by line, and `outriderctl` runs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use outrider_config::wire::{PolicyUpdate, ServerMessage};

use crate::{
    control_binary, ctl_binary, empty, full, http1_client, http2_client, send, Reply, TempDir,
};

/// The token every fixture control plane is started with.
pub const CONTROL_TOKEN: &str = "test-token-5f0c";

/// Longest the fixture waits for the control plane to answer a request (a subscription: its
/// response head). It answers in milliseconds; a control plane that stops answering fails the
/// test with its logs instead of hanging it until nextest's timeout.
pub const REQUEST_BOUND: Duration = Duration::from_secs(10);

/// A control plane's directories: policies (watched), state, and the token file.
pub struct ControlDirs {
    pub policies: PathBuf,
    pub state: PathBuf,
    pub token_file: PathBuf,
    _root: TempDir,
}

impl ControlDirs {
    pub fn new() -> Self {
        let root = TempDir::new();
        let policies = root.path.join("policies");
        let state = root.path.join("state");
        std::fs::create_dir_all(&policies).unwrap();
        let token_file = root.path.join("token");
        std::fs::write(&token_file, format!("{CONTROL_TOKEN}\n")).unwrap();
        Self {
            policies,
            state,
            token_file,
            _root: root,
        }
    }

    /// Writes a policy document into the watched directory, atomically (temporary file and
    /// rename, as editors and `kubectl cp` do).
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.policies.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.policies.join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.policies.join(name)).unwrap();
    }
}

impl Default for ControlDirs {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `outrider-control serve`.
pub struct Control {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Starts the control plane on 127.0.0.1:0 over `dirs`, with 1 s heartbeats.
pub fn start_control(dirs: &ControlDirs) -> Control {
    start_control_with(dirs, &[])
}

/// Like [`start_control`], with extra flags (a later flag wins, e.g. `--listen 127.0.0.1:N`).
pub fn start_control_with(dirs: &ControlDirs, extra: &[&str]) -> Control {
    start_control_command(Command::new(control_binary()), dirs, extra)
}

/// Like [`start_control_with`], run by `command`: the control binary, or a wrapper that execs
/// it (`ip netns exec NS outrider-control`, tests/src/netns.rs).
pub fn start_control_command(mut command: Command, dirs: &ControlDirs, extra: &[&str]) -> Control {
    let mut child = command
        .arg("serve")
        .arg("--policies")
        .arg(&dirs.policies)
        // `--store etcd://...` replaces the state directory.
        .args(if extra.contains(&"--store") {
            Vec::new()
        } else {
            vec!["--state".into(), dirs.state.clone().into_os_string()]
        })
        .arg("--token-file")
        .arg(&dirs.token_file)
        .args(["--heartbeat-secs", "1", "--workers", "2", "--log", "info"])
        .args(if extra.contains(&"--listen") {
            &[][..]
        } else {
            &["--listen", "127.0.0.1:0"][..]
        })
        .args(extra)
        .env_remove("OUTRIDER_CONTROL_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outrider-control");
    let stderr = child.stderr.take().unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(remaining) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "control plane did not start; logs:\n{}",
                logs.lock().unwrap().join("\n")
            );
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "listening" {
            let addr = event["listen"].as_str().unwrap().parse().unwrap();
            return Control { child, addr, logs };
        }
    }
}

impl Control {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `outrider-proxy` flags that subscribe a proxy to this control plane as `workload`
    /// with the token of `dirs`; a test appends what differs.
    pub fn proxy_flags(&self, dirs: &ControlDirs, workload: &str) -> Vec<std::ffi::OsString> {
        vec![
            "--control".into(),
            self.url().into(),
            "--token-file".into(),
            dirs.token_file.clone().into(),
            "--workload".into(),
            workload.into(),
        ]
    }

    /// Starts a proxy subscribed as `workload` with a mesh identity: service account `sa` of
    /// namespace `ns`, its certificate issued by this control plane; `extra` flags appended.
    pub fn spawn_meshed_proxy(
        &self,
        dirs: &ControlDirs,
        workload: &str,
        ns: &str,
        sa: &str,
        extra: &[std::ffi::OsString],
    ) -> crate::Proxy {
        let mut args = self.proxy_flags(dirs, workload);
        args.extend([
            "--namespace".into(),
            ns.into(),
            "--service-account".into(),
            sa.into(),
        ]);
        args.extend_from_slice(extra);
        crate::spawn_proxy(crate::TempDir::new(), &args)
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Whether a log line matching `pred` shows up within `timeout` (lines reach the test
    /// through a reader thread, a moment after the server wrote them).
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs().iter().any(|l| pred(l)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM: the orderly stop.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL and reap: a crash, nothing flushed on the way out.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A request with the fixture token over HTTP/1.1.
    pub async fn request(&self, method: &str, path: &str, body: &str) -> Reply {
        self.request_with_token(method, path, body, Some(CONTROL_TOKEN))
            .await
    }

    /// A request with the given token (or none).
    pub async fn request_with_token(
        &self,
        method: &str,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url()));
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(full(body.to_string())).unwrap();
        self.bounded(&format!("{method} {path}"), send(&http1_client(), req))
            .await
    }

    /// `fut` (a request to this control plane), or a panic with the control plane's logs when
    /// it takes longer than [`REQUEST_BOUND`].
    async fn bounded<T>(&self, what: &str, fut: impl std::future::Future<Output = T>) -> T {
        match tokio::time::timeout(REQUEST_BOUND, fut).await {
            Ok(out) => out,
            Err(_) => panic!(
                "the control plane did not answer {what} within {REQUEST_BOUND:?}; its logs:\n{}",
                self.logs().join("\n")
            ),
        }
    }

    /// `GET /v1/status` (no token: open from loopback).
    pub async fn status(&self) -> serde_json::Value {
        let reply = self.request_with_token("GET", "/v1/status", "", None).await;
        assert_eq!(reply.status, 200);
        reply.json()
    }

    /// Opens a raw subscription for `workload` as `proxy`, over HTTP/2 when `h2`.
    pub async fn subscribe(&self, workload: &str, proxy: &str, h2: bool) -> Subscription {
        self.subscribe_with(workload, proxy, None, h2).await
    }

    /// Opens a raw subscription presenting `have_hash`.
    pub async fn subscribe_with(
        &self,
        workload: &str,
        proxy: &str,
        have_hash: Option<&str>,
        h2: bool,
    ) -> Subscription {
        let mut uri = format!(
            "{}/v1/subscribe?workload={workload}&proxy={proxy}",
            self.url()
        );
        if let Some(hash) = have_hash {
            uri.push_str(&format!("&have_hash={hash}"));
        }
        self.subscribe_uri(workload, uri, h2).await
    }

    /// Opens a raw subscription over HTTP/1.1 as a proxy that runs version `have_version`
    /// hashing to `have_hash` (one failing over from another replica).
    pub async fn subscribe_resuming(
        &self,
        workload: &str,
        proxy: &str,
        have_hash: &str,
        have_version: u64,
    ) -> Subscription {
        let uri = format!(
            "{}/v1/subscribe?workload={workload}&proxy={proxy}&have_hash={have_hash}&have_version={have_version}",
            self.url()
        );
        self.subscribe_uri(workload, uri, false).await
    }

    async fn subscribe_uri(&self, workload: &str, uri: String, h2: bool) -> Subscription {
        let req = Request::get(uri)
            .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
            .body(empty())
            .unwrap();
        let client = if h2 { http2_client() } else { http1_client() };
        let res = self
            .bounded(&format!("subscribe {workload}"), client.request(req))
            .await
            .expect("subscribe");
        assert_eq!(res.status(), 200, "subscribe refused");
        let session = res
            .headers()
            .get(outrider_config::wire::SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Subscription {
            body: res.into_body(),
            buf: BytesMut::new(),
            session,
        }
    }

    /// Runs `outriderctl ARGS` against this control plane with the fixture token.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.url(), Some(CONTROL_TOKEN), args)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The version an `outriderctl apply` output says it applied as; panics with the output when
/// the apply failed.
pub fn applied_version(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "apply failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, rest) = stdout
        .split_once("applied as version ")
        .unwrap_or_else(|| panic!("no version in {stdout}"));
    rest.split(';').next().unwrap().trim().parse().unwrap()
}

/// Runs `outriderctl ARGS` with `OUTRIDER_CONTROL_URL=url` and the token in the environment.
pub fn ctl(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(ctl_binary());
    cmd.args(args)
        .env("OUTRIDER_CONTROL_URL", url)
        .env_remove("OUTRIDER_CONTROL_TOKEN_FILE");
    match token {
        Some(token) => cmd.env("OUTRIDER_CONTROL_TOKEN", token),
        None => cmd.env_remove("OUTRIDER_CONTROL_TOKEN"),
    };
    cmd.output().expect("run outriderctl")
}

/// A subscription stream, read one ndjson message at a time.
pub struct Subscription {
    body: Incoming,
    buf: BytesMut,
    /// The session id its ACKs must carry.
    pub session: String,
}

impl Subscription {
    /// The next message, or `None` when `timeout` passes or the stream ends first.
    pub async fn next(&mut self, timeout: Duration) -> Option<ServerMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Bytes = self.buf.split_to(end + 1).freeze();
                return Some(
                    serde_json::from_slice(&line[..end])
                        .unwrap_or_else(|e| panic!("bad line {line:?}: {e}")),
                );
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??
                .expect("stream error");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// The next update, skipping heartbeats (and endpoint messages); `None` when `timeout`
    /// passes first.
    pub async fn next_update(&mut self, timeout: Duration) -> Option<PolicyUpdate> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(remaining).await? {
                ServerMessage::Update(update) => return Some(update),
                ServerMessage::Heartbeat | ServerMessage::Endpoints(_) | ServerMessage::Unknown => {
                }
            }
        }
    }
}

/// Makes `dir` look like a Kubernetes ConfigMap volume holding `files`: the data in a
/// timestamped directory, `..data` a symlink to it, each visible file a symlink through
/// `..data`. Calling it again swaps `..data` atomically (symlink + rename), as the kubelet does.
pub fn configmap_swap(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    let data = format!("..2026_11_23_{generation:08}");
    std::fs::create_dir_all(dir.join(&data)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&data).join(name), text).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}
