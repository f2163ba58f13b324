//! The proxy's runtime side of transparent capture, in real network namespaces: a "pod"
//! namespace with the real `outrider-proxy` (as UID 65532) behind the rules `outrider-proxy
//! init` installs, and apps that know nothing of the proxy (`http-probe`, `netns-probe`); a
//! "remote" namespace over a veth pair stands in for the rest of the network. Addresses are
//! documentation ranges only. Pod-to-pod mesh TLS is the end-to-end suite's (tests/tests/pods).
//!
//! Needs root, `ip netns`, nft and setpriv: CI (.ci/run) has them and sets
//! OUTRIDER_REQUIRE_NETNS=1, so there a missing piece fails the tests; elsewhere each test
//! prints why it is skipped.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outrider_e2e::proxy_binary;

const POD: &str = "198.51.100.1";
const REMOTE: &str = "198.51.100.2";
const PROXY_UID: &str = "65532";

/// A pod namespace (capture rules, the proxy) and a remote one joined by a veth pair, with
/// their processes; all removed on drop.
struct Pod {
    pod: String,
    remote: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let namespaces = [&self.pod, &self.remote];
        outrider_e2e::netns::tear_down(&mut self.children, namespaces, &self.dir);
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes (these tests are synchronous:
/// each step is another process in a namespace).
fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sh(args: &[&str]) -> Output {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Pod {
    /// The namespaces with the capture rules installed and a proxy serving `policy` (as
    /// `uid`), or `None` (with the reason printed) where they cannot be made.
    fn start(policy: &str, uid: &str) -> Option<Pod> {
        if !outrider_e2e::netns::can_run(&[]) {
            return None;
        }
        // setpriv runs the proxy as its UID: it needs copies it can reach.
        let (id, dir) = outrider_e2e::netns::shared_dir(
            "orrun",
            &[
                (&proxy_binary(), "outrider-proxy"),
                (env!("CARGO_BIN_EXE_netns-probe").as_ref(), "netns-probe"),
                (env!("CARGO_BIN_EXE_http-probe").as_ref(), "http-probe"),
            ],
        );
        std::fs::write(dir.join("policy.yaml"), policy).unwrap();
        std::fs::set_permissions(
            dir.join("policy.yaml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let mut pod = Pod {
            pod: format!("{id}-pod"),
            remote: format!("{id}-remote"),
            dir,
            children: Vec::new(),
        };
        let (p, r) = (pod.pod.clone(), pod.remote.clone());
        sh(&["ip", "netns", "add", &p]);
        sh(&["ip", "netns", "add", &r]);
        sh(&[
            "ip", "-n", &p, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &r,
        ]);
        for (ns, addr) in [(&p, POD), (&r, REMOTE)] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        let mut init = pod.exec(&p, None, "outrider-proxy", &["init", "--mode", "nft"]);
        let output = init.output().unwrap();
        assert!(
            output.status.success(),
            "init: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let policy = pod.dir.join("policy.yaml");
        let mut proxy = pod.exec(
            &p,
            Some(uid),
            "outrider-proxy",
            &["--policy", policy.to_str().unwrap()],
        );
        let child = proxy
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(pod.dir.join("proxy.log")).unwrap())
            .spawn()
            .unwrap();
        pod.children.push(child);
        let ready = poll_until(Duration::from_secs(10), || {
            pod.get(&p, "127.0.0.1:15000", "admin", "/ready")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        });
        assert!(ready, "proxy not ready: {}", pod.log());
        Some(pod)
    }

    /// `tool args` in `ns`, as `uid` when given.
    fn exec(&self, ns: &str, uid: Option<&str>, tool: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            command.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        command.arg(self.dir.join(tool)).args(args);
        command
    }

    /// Starts `tool args` in `ns`, a server that prints `ready`.
    fn serve(&mut self, ns: &str, tool: &str, args: &[&str]) {
        let mut child = self
            .exec(ns, None, tool, args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "{tool} {args:?} did not start");
    }

    /// One GET from `ns` to `addr` with `host` (the pod's app is the client when `ns` is the
    /// pod): the status line, `--`, the body; `None` on a transport error.
    fn get(&self, ns: &str, addr: &str, host: &str, path: &str) -> Option<String> {
        let output = self
            .exec(ns, None, "http-probe", &["get", addr, host, path])
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8(output.stdout).unwrap().trim().to_string())
    }

    /// A raw TCP connect from `ns`: what a server-first listener said, and how long it took.
    fn connect(&self, ns: &str, addr: &str) -> (String, Duration) {
        let started = Instant::now();
        let output = self
            .exec(ns, None, "netns-probe", &["connect", addr])
            .output()
            .unwrap();
        let answer = String::from_utf8(output.stdout).unwrap().trim().to_string();
        (answer, started.elapsed())
    }

    /// The proxy's metrics lines that contain every one of `parts`.
    fn metric(&self, parts: &[&str]) -> Vec<String> {
        let text = self
            .get(&self.pod, "127.0.0.1:15000", "admin", "/metrics")
            .unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }
}

const OUTBOUND_POLICY: &str = "
services:
  shop:
    endpoints: [198.51.100.2:8081]
    # A ClusterIP-like address nothing listens on: only the service's policy gets it through.
    addresses: [198.51.100.2:8082]
routes:
  - match: { authority: routed.example }
    service: shop
  # A catch-all route applies to explicit traffic only.
  - match: { path_prefix: / }
    service: shop
inbound: { app: 127.0.0.1:9 }
";

#[test]
fn captured_http_goes_to_its_service_by_address_or_route_and_elsewhere_passes_through() {
    let Some(mut pod) = Pod::start(OUTBOUND_POLICY, PROXY_UID) else {
        return;
    };
    let remote = pod.remote.clone();
    let p = pod.pod.clone();
    let shop = format!("{REMOTE}:8081");
    let other = format!("{REMOTE}:8080");
    pod.serve(&remote, "http-probe", &["serve", "shop", &shop]);
    pod.serve(&remote, "http-probe", &["serve", "elsewhere", &other]);
    let clusterip = format!("{REMOTE}:8082");
    let answer = pod.get(&p, &clusterip, "shop.example", "/a");
    assert_eq!(
        answer.as_deref(),
        Some("HTTP/1.1 200 OK\n--\nshop host=shop.example")
    );
    // A destination in no service is where it goes, never 404, even with a catch-all route.
    let answer = pod.get(&p, &other, "example.com", "/b");
    assert_eq!(
        answer.as_deref(),
        Some("HTTP/1.1 200 OK\n--\nelsewhere host=example.com")
    );
    // A route naming the authority applies on top.
    let answer = pod.get(&p, &other, "routed.example", "/c");
    assert_eq!(
        answer.as_deref(),
        Some("HTTP/1.1 200 OK\n--\nshop host=routed.example")
    );
    assert_eq!(
        pod.metric(&[
            "outrider_requests_total",
            "service=\"passthrough\"",
            "code=\"200\""
        ])
        .len(),
        1
    );
    assert_eq!(
        pod.metric(&[
            "outrider_tcp_connections_total",
            "destination=\"shop\"",
            "mode=\"http\""
        ]),
        ["outrider_tcp_connections_total{destination=\"shop\",direction=\"outbound\",mode=\"http\"} 1"]
    );
}

#[test]
fn opaque_ports_relay_at_once_and_server_first_protocols_after_the_detection_timeout() {
    let Some(mut pod) = Pod::start(OUTBOUND_POLICY, PROXY_UID) else {
        return;
    };
    let remote = pod.remote.clone();
    let p = pod.pod.clone();
    let redis = format!("{REMOTE}:6379");
    let unlisted = format!("{REMOTE}:7000");
    pod.serve(
        &remote,
        "netns-probe",
        &["listen", "greeting", &redis, &unlisted],
    );
    let (answer, took) = pod.connect(&p, &redis);
    assert_eq!(answer, format!("greeting local={redis} orig=none"));
    assert!(took < Duration::from_millis(900), "{took:?}");
    // Not in opaque_ports: the proxy waits its 1 s detection timeout for the client to speak.
    let (answer, took) = pod.connect(&p, &unlisted);
    assert_eq!(answer, format!("greeting local={unlisted} orig=none"));
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert_eq!(
        pod.metric(&["outrider_protocol_detections_total"]),
        [
            "outrider_protocol_detections_total{direction=\"outbound\",protocol=\"opaque_port\"} 1",
            "outrider_protocol_detections_total{direction=\"outbound\",protocol=\"timeout\"} 1"
        ]
    );
    let greeting_bytes = format!("greeting local={redis} orig=none\n").len();
    assert_eq!(
        pod.metric(&["outrider_tcp_bytes_total", "to_downstream"]),
        [format!(
            "outrider_tcp_bytes_total{{destination=\"passthrough\",direction=\"outbound\",way=\"to_downstream\"}} {}",
            2 * greeting_bytes
        )]
    );
}

#[test]
fn captured_inbound_reaches_the_app_at_its_original_destination() {
    let Some(mut pod) = Pod::start(OUTBOUND_POLICY, PROXY_UID) else {
        return;
    };
    let (remote, p) = (pod.remote.clone(), pod.pod.clone());
    let app = format!("{POD}:8080");
    pod.serve(&p, "http-probe", &["serve", "app", &app]);
    // inbound.app (127.0.0.1:9) is for explicit traffic: a captured call goes to 8080.
    let answer = pod.get(&remote, &app, "pod.example", "/");
    assert_eq!(
        answer.as_deref(),
        Some("HTTP/1.1 200 OK\n--\napp host=pod.example")
    );
    assert_eq!(
        pod.metric(&["outrider_requests_total", "direction=\"inbound\""])
            .len(),
        1
    );
}

#[test]
fn strict_inbound_refuses_plaintext_on_every_captured_port() {
    let policy = OUTBOUND_POLICY.replace(
        "inbound: { app: 127.0.0.1:9 }",
        "inbound: { app: 127.0.0.1:9, mtls: strict }",
    );
    let Some(mut pod) = Pod::start(&policy, PROXY_UID) else {
        return;
    };
    let (remote, p) = (pod.remote.clone(), pod.pod.clone());
    let app = format!("{POD}:8080");
    pod.serve(&p, "http-probe", &["serve", "app", &app]);
    // The same call is answered under `permissive` (see the test above); under `strict` the
    // plaintext connection is closed.
    assert_eq!(pod.get(&remote, &app, "pod.example", "/"), None);
}

#[test]
fn rules_without_the_proxy_uid_exclusion_are_refused_as_a_loop() {
    // The rules exclude UID 65532; a proxy running as root is captured by them.
    let Some(mut pod) = Pod::start(OUTBOUND_POLICY, "0") else {
        return;
    };
    let (remote, p) = (pod.remote.clone(), pod.pod.clone());
    let other = format!("{REMOTE}:8080");
    pod.serve(&remote, "http-probe", &["serve", "elsewhere", &other]);
    let answer = pod.get(&p, &other, "example.com", "/").unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(
        pod.metric(&["outrider_capture_loops_total"]),
        ["outrider_capture_loops_total{reason=\"own_connection\"} 1"]
    );
    assert!(
        pod.log()
            .contains("captured connection refused: it loops back into this proxy"),
        "{}",
        pod.log()
    );
}
