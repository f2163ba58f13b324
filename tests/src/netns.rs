//! Pods as network namespaces, for the transparent-capture tests (tests/tests/capture_pods.rs).
//!
//! A [`Lab`] is a hub namespace holding a bridge (and the control plane, at [`HUB_V4`]) and pod
//! namespaces, each joined to the bridge by a veth pair, with addresses in the documentation
//! ranges only: `192.0.2.N/24` and `2001:db8::N/64` for pod `N`. A pod gets its capture rules
//! from the real `outrider-proxy init` and its sidecar is the real `outrider-proxy`, run inside
//! the namespace as the proxy's UID (65532) through `setpriv`.
//!
//! A test process cannot open sockets in another namespace itself (that takes `setns`, and the
//! workspace forbids `unsafe`), so the test's own clients and servers act as a pod's app through
//! relays (`netns-probe relay`, a plain byte relay run inside the pod): a [`Dialer`] is the app
//! connecting out from the pod, [`Lab::expose`] the app listening on a pod port. Everything the
//! relay passes is the test's own bytes, so the app knows nothing about the proxy.
//!
//! Everything is removed on drop, also when the test panics: processes killed, namespaces
//! deleted, files removed. Namespaces a killed test run left behind (their test process gone)
//! are deleted by the next [`Lab::new`].

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::control::{start_control_command, Control, ControlDirs};
use crate::{control_binary, proxy_binary, spawn_proxy_exact, Proxy, Reply, TempDir, TestBody};

/// The hub's address on the bridge: where the control plane listens.
pub const HUB_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The hub's IPv6 address on the bridge.
pub const HUB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
/// The UID the sidecar runs as, which `outrider-proxy init` exempts by default.
pub const PROXY_UID: u32 = 65532;
/// The sidecar's ports in a pod (the defaults of `outrider-proxy init`).
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const ADMIN_PORT: u16 = 15000;

/// Prefix of every namespace a lab creates, followed by the test process's id.
const PREFIX: &str = "orpod";
/// Longest a helper command (ip, nft, init) may take.
const COMMAND_BOUND: Duration = Duration::from_secs(10);

/// Address family of a test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Why the namespace tests cannot run here, if they cannot: not root, or a tool missing.
pub fn missing_prerequisite() -> Option<String> {
    missing_prerequisite_with(&[])
}

/// [`missing_prerequisite`], also needing each of `tools` (a command and an argument it
/// answers, such as `--version`).
pub fn missing_prerequisite_with(tools: &[(&str, &str)]) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Some("not root (network namespaces and netfilter need root)".into());
    }
    let always = [("ip", "-V"), ("nft", "--version"), ("setpriv", "--version")];
    for &(tool, arg) in always.iter().chain(tools) {
        let ran = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !ran.is_ok_and(|s| s.success()) {
            return Some(format!("`{tool}` is not runnable"));
        }
    }
    None
}

/// Whether the namespace tests can run here with `tools` besides the usual ones: `false`
/// skips (the reason printed), unless [`required`], which fails instead.
pub fn can_run(tools: &[(&str, &str)]) -> bool {
    let Some(reason) = missing_prerequisite_with(tools) else {
        return true;
    };
    assert!(!required(), "OUTRIDER_REQUIRE_NETNS is set but: {reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

/// A new directory `<temp>/<prefix><pid>-<n>` (its name returned as the id of the test's
/// namespaces) that the proxy's UID can read, holding executable copies of `binaries` (path,
/// name in the directory): setpriv runs them as that UID.
pub fn shared_dir(prefix: &str, binaries: &[(&Path, &str)]) -> (String, PathBuf) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let id = format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (from, name) in binaries {
        let to = dir.join(name);
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (id, dir)
}

/// Whether the namespace tests must run (CI as root sets OUTRIDER_REQUIRE_NETNS=1): then a
/// missing prerequisite fails them instead of skipping them.
pub fn required() -> bool {
    std::env::var_os("OUTRIDER_REQUIRE_NETNS").is_some()
}

/// A pod: a network namespace with one interface on the lab's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The namespace's name (for `ip netns exec`).
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Pod {
    /// The pod's address in `family`.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }

    /// The pod's address and `port` in `family`.
    pub fn addr(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(family), port)
    }
}

/// The hub, the pods, and every process started in them.
pub struct Lab {
    hub: String,
    namespaces: Mutex<Vec<String>>,
    /// Sockets, relay and proxy copies; readable by the proxy's UID.
    pub dir: PathBuf,
    probe: PathBuf,
    children: Mutex<Vec<Child>>,
    next: AtomicU32,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let children = self.children.get_mut().unwrap_or_else(|e| e.into_inner());
        let namespaces = self.namespaces.get_mut().unwrap_or_else(|e| e.into_inner());
        let namespaces = namespaces.iter().chain(std::iter::once(&self.hub));
        tear_down(children, namespaces, &self.dir);
    }
}

/// Removes what a test made, whatever it did: kills `children`, deletes `namespaces` and the
/// directory `dir`.
pub fn tear_down<'a>(
    children: &mut [Child],
    namespaces: impl IntoIterator<Item = &'a String>,
    dir: &Path,
) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    for ns in namespaces {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `args`, panicking with its stderr unless it succeeds within [`COMMAND_BOUND`].
fn run_ok(args: &[&str]) -> Output {
    let output = run_bounded(args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `args` under `timeout` (coreutils), so a hung tool fails the test instead of holding it.
fn run_bounded(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "2", &COMMAND_BOUND.as_secs().to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Deletes the namespaces of earlier test processes that no longer exist (a run killed by a
/// timeout never ran its destructors).
fn delete_stale_namespaces() {
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Lab {
    /// The hub namespace and its bridge, or `None` (the reason printed) where namespaces cannot
    /// be made and OUTRIDER_REQUIRE_NETNS is not set. `probe` is the `netns-probe` binary
    /// (`env!("CARGO_BIN_EXE_netns-probe")`, which only integration tests see).
    pub fn new(probe: &str) -> Option<Lab> {
        if !can_run(&[]) {
            return None;
        }
        delete_stale_namespaces();
        // The proxy runs as its own UID: everything it reads must be reachable by others.
        let (id, dir) = shared_dir(PREFIX, &[(Path::new(probe), "netns-probe")]);
        let probe = dir.join("netns-probe");
        let lab = Lab {
            hub: format!("{id}-hub"),
            namespaces: Mutex::new(Vec::new()),
            dir,
            probe,
            children: Mutex::new(Vec::new()),
            next: AtomicU32::new(0),
        };
        let hub = lab.hub.as_str();
        run_ok(&["ip", "netns", "add", hub]);
        run_ok(&["ip", "-n", hub, "link", "set", "lo", "up"]);
        run_ok(&["ip", "-n", hub, "link", "add", "br0", "type", "bridge"]);
        for addr in [format!("{HUB_V4}/24"), format!("{HUB_V6}/64")] {
            run_ok(&["ip", "-n", hub, "addr", "add", &addr, "dev", "br0", "nodad"]);
        }
        run_ok(&["ip", "-n", hub, "link", "set", "br0", "up"]);
        Some(lab)
    }

    /// The hub namespace's name.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// A new pod with host number `host` (`192.0.2.host`, `2001:db8::host`), on the bridge.
    pub fn pod(&self, name: &str, host: u8) -> Pod {
        assert!((1..254).contains(&host), "host {host} is not a pod address");
        let ns = format!("{}-{name}", self.hub.trim_end_matches("-hub"));
        run_ok(&["ip", "netns", "add", &ns]);
        self.namespaces.lock().unwrap().push(ns.clone());
        let port = format!("v{host}");
        run_ok(&[
            "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &self.hub,
        ]);
        run_ok(&["ip", "-n", &self.hub, "link", "set", &port, "master", "br0"]);
        run_ok(&["ip", "-n", &self.hub, "link", "set", &port, "up"]);
        let v4 = Ipv4Addr::new(192, 0, 2, host);
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(host));
        for addr in [format!("{v4}/24"), format!("{v6}/64")] {
            run_ok(&[
                "ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0", "nodad",
            ]);
        }
        run_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run_ok(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        Pod { ns, v4, v6 }
    }

    /// `outrider-proxy init ARGS` in `pod` (the real binary, the real nft or iptables).
    pub fn init(&self, pod: &Pod, args: &[&str]) -> Output {
        let proxy = proxy_binary();
        let mut full = vec![
            "ip",
            "netns",
            "exec",
            &pod.ns,
            proxy.to_str().unwrap(),
            "init",
        ];
        full.extend_from_slice(args);
        run_bounded(&full)
    }

    /// [`Lab::init`] that must succeed.
    pub fn init_ok(&self, pod: &Pod, args: &[&str]) {
        let output = self.init(pod, args);
        assert!(
            output.status.success(),
            "init {args:?} in {}: {}",
            pod.ns,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `args` in namespace `ns` (bounded), returning its output whatever the status.
    pub fn run_in(&self, ns: &str, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run_bounded(&full)
    }

    /// Starts a `netns-probe listen` in `ns` on `addrs`: a server that speaks first, answering
    /// every connection at once with `TAG local=ADDR orig=none` and closing it.
    pub fn banner_server(&self, ns: &str, tag: &str, addrs: &[SocketAddr]) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.probe)
            .args(["listen", tag])
            .args(addrs.iter().map(ToString::to_string))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.children.lock().unwrap().push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(COMMAND_BOUND).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "banner server in {ns} did not start");
    }

    /// Starts `args` in the background in `ns`; killed when the lab is dropped.
    pub fn spawn_in(&self, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        self.children.lock().unwrap().push(child);
    }

    /// A fresh path in the lab's directory.
    fn socket_path(&self, what: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{what}-{n}.sock"))
    }

    /// Starts a relay in `ns` from `listens` to `target` and waits until it listens.
    fn relay(&self, ns: &str, target: &str, listens: &[String]) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.probe)
            .arg("relay")
            .arg(target)
            .args(listens)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.children.lock().unwrap().push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(COMMAND_BOUND).unwrap_or_default();
        assert_eq!(
            line.trim(),
            "ready",
            "relay in {ns} from {listens:?} to {target} did not start"
        );
    }

    /// The app of `pod` listening on `port` of every pod address (IPv4 and IPv6): returns the
    /// Unix listener the test serves it on. What reaches the port reaches the listener.
    pub fn expose(&self, pod: &Pod, port: u16) -> tokio::net::UnixListener {
        let path = self.socket_path(&format!("app-{port}"));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        self.relay(
            &pod.ns,
            &format!("unix:{}", path.display()),
            &[format!("tcp:0.0.0.0:{port}"), format!("tcp:[::]:{port}")],
        );
        listener
    }

    /// The app of `pod` connecting to `target`: each [`Dialer::connect`] is a new TCP
    /// connection made inside the pod (so its capture rules apply).
    pub fn dialer(&self, pod: &Pod, target: SocketAddr) -> Dialer {
        let path = self.socket_path("dial");
        self.relay(
            &pod.ns,
            &format!("tcp:{target}"),
            &[format!("unix:{}", path.display())],
        );
        Dialer { path, target }
    }

    /// The real control plane in the hub, on [`HUB_V4`], over `dirs`.
    pub fn start_control(&self, dirs: &ControlDirs) -> Control {
        // The proxies read the token as their own UID.
        for path in [&dirs.token_file, &dirs.policies] {
            if let Some(parent) = path.parent() {
                let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
            }
        }
        std::fs::set_permissions(&dirs.token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.hub])
            .arg(control_binary());
        start_control_command(command, dirs, &["--listen", &format!("{HUB_V4}:0")])
    }

    /// The sidecar of `pod`: the real `outrider-proxy` in the pod's namespace as `uid`, for
    /// `workload` with service account `sa` (namespace `shop`), policy and certificate from
    /// `control`, on the pod ports init redirects to. `extra` flags come last.
    pub fn start_sidecar(
        &self,
        pod: &Pod,
        control: &Control,
        dirs: &ControlDirs,
        workload: &str,
        uid: u32,
        extra: &[&str],
    ) -> Sidecar {
        let uid = uid.to_string();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &pod.ns])
            .args([
                "setpriv",
                "--reuid",
                &uid,
                "--regid",
                &uid,
                "--clear-groups",
            ])
            .arg(proxy_binary())
            .args(["--control", &control.url()])
            .arg("--token-file")
            .arg(&dirs.token_file)
            .args(["--workload", workload, "--namespace", "shop"])
            .args(["--service-account", workload])
            // The default listeners, where init redirects: outbound 127.0.0.1:15001 and its
            // IPv6 twin [::1]:15001 (the output chain's redirect), inbound 0.0.0.0:15006 and
            // [::]:15006 (prerouting keeps the pod address), admin 127.0.0.1:15000 (a relay).
            .args(["--log", "info", "--drain-timeout", "1s"])
            .args(extra);
        let proxy = spawn_proxy_exact(command, TempDir::new());
        let admin = self.dialer(pod, SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)));
        Sidecar { proxy, admin }
    }
}

/// The app of a pod connecting out (see [`Lab::dialer`]).
pub struct Dialer {
    path: PathBuf,
    /// Where each connection goes, as the app addressed it.
    pub target: SocketAddr,
}

impl Dialer {
    /// The relay's Unix socket (a connection to it is a connection from the pod).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new connection from the pod to the target.
    pub async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.path).await.unwrap()
    }

    /// Sends `req` over a new HTTP/1.1 connection and reads the whole response; `Err` with the
    /// reason when the connection fails or closes before a response.
    pub async fn http1(&self, req: Request<TestBody>) -> Result<Reply, String> {
        let stream = self.connect().await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = res.into_parts();
        let body: Bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// `GET path` over HTTP/1.1 with the target as Host, bounded by `bound`.
    pub async fn get(&self, path: &str, bound: Duration) -> Result<Reply, String> {
        let req = Request::get(path)
            .header("host", self.target.to_string())
            .body(crate::empty())
            .unwrap();
        match tokio::time::timeout(bound, self.http1(req)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no response within {bound:?}")),
        }
    }
}

/// A sidecar in a pod, with its admin port reachable from the test.
pub struct Sidecar {
    pub proxy: Proxy,
    admin: Dialer,
}

impl Sidecar {
    /// GET `path` on the admin port: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let reply = self
            .admin
            .get(path, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("admin {path}: {e}"));
        (
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
        )
    }

    /// Polls `/ready` until 200 (policy and certificate held), at most 15 s.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = self.admin_get("/ready").await;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready: {body}\nlogs:\n{}",
                self.proxy.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/config` until it contains `needle` (the policy the test wrote arrived).
    pub async fn wait_policy(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, config) = self.admin_get("/config").await;
            if config.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "policy with {needle} never arrived: {config}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The whole `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// The sum of every sample of `name` whose labels contain each of `labels`
    /// (`direction="outbound"`).
    pub async fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }

    /// Asserts that [`Self::metric_sum`] of `name` and `labels` is `expected` (the whole
    /// exposition shown otherwise).
    pub async fn assert_count(&self, name: &str, labels: &[&str], expected: f64) {
        let metrics = self.metrics().await;
        let sum = metric_sum(&metrics, name, labels);
        assert_eq!(sum, expected, "{name} {labels:?}\n{metrics}");
    }

    /// Asserts that [`Self::metric_sum`] of `name` and `labels` is at least `least`.
    pub async fn assert_count_at_least(&self, name: &str, labels: &[&str], least: f64) {
        let metrics = self.metrics().await;
        let sum = metric_sum(&metrics, name, labels);
        assert!(
            sum >= least,
            "{name} {labels:?}: {sum} < {least}\n{metrics}"
        );
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.proxy.logs()
    }
}

/// The sum of every sample of `name` in `exposition` whose labels contain each of `labels`.
pub fn metric_sum(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|label| rest.contains(label))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
