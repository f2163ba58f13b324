//! Failed saves are visible and healed, end to end: the real `outrider-control` and
//! `outrider-proxy` binaries with their state directories made unwritable. The tests run as
//! root (CI too), so permissions do not stop a write; the ext4 immutable flag (`chattr +i`,
//! e2fsprogs, on Debian by default) does, and is removed when the guard drops, also on a panic.
//!
//! - The control plane: a policy-file change the state directory refuses is not made, shows in
//!   `status` (API and `outriderctl`), `/ready` and `/metrics`, `apply` exits 74 naming the
//!   directory and the OS error, and once the directory takes writes again the change lands as
//!   a new version, with no other directory event, and the proxies converge.
//! - The proxy: an applied policy it cannot persist shows in `/ready` and the metrics while it
//!   keeps serving, and is written once the directory takes writes again.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outrider_e2e::*;

/// Longest a change the state directory refused waits for its next retry (the control plane
/// retries every 5 s at most, the proxy every 10 s), with room for a loaded machine.
const HEAL_BOUND: Duration = Duration::from_secs(20);

/// `chattr +i` on a directory: no entry can be created, renamed or removed in it, even by
/// root. Dropping the guard clears the flag.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Self {
        chattr("+i", dir);
        Self(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, dir: &Path) {
    let out = Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .output()
        .expect("run chattr (e2fsprogs)");
    assert!(
        out.status.success(),
        "chattr {flag} {}: {} (the test needs root and a filesystem with the immutable flag, like ext4)",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Defaults for every workload: host `svc` goes to `service` (`a` or `b`).
fn defaults(a: SocketAddr, b: SocketAddr, service: &str) -> String {
    format!(
        "workload: \"*\"
services:
  a: {{ endpoints: [{a}] }}
  b: {{ endpoints: [{b}] }}
routes:
  - match: {{ authority: svc }}
    service: {service}
"
    )
}

/// A proxy subscribed to `control` as workload `checkout`, persisting in `state`.
fn subscribed_proxy(control: &Control, dirs: &ControlDirs, state: &Path) -> Proxy {
    let mut args = control.proxy_flags(dirs, "checkout");
    args.extend([
        "--proxy-id".into(),
        "pod-1".into(),
        "--state-dir".into(),
        state.into(),
    ]);
    spawn_proxy(TempDir::new(), &args)
}

/// Waits until `/ready` satisfies `pred`; returns its status and body.
async fn wait_ready(proxy: &Proxy, pred: impl Fn(&str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + HEAL_BOUND;
    loop {
        let (status, body) = proxy.admin_get("/ready").await;
        // The proxy runs a workload only the defaults name: what /ready says of that is
        // tested in operator.rs.
        let body = body.replace(
            " workload_named=false note=\"no policy document names this workload; it runs only the defaults\"",
            "",
        );
        if pred(&body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed {body:?}; logs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn server_of(addr: SocketAddr) -> String {
    let reply = get(addr, "svc", "/").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["server"].as_str().unwrap().to_string()
}

/// The value of the control plane's metric `name`.
async fn control_metric(control: &Control, name: &str) -> u64 {
    let reply = control
        .request_with_token("GET", "/metrics", "", None)
        .await;
    assert_eq!(reply.status, 200);
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

/// The control plane's status, polled until `pred` holds.
async fn wait_status(
    control: &Control,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + HEAL_BOUND;
    loop {
        let status = control.status().await;
        if pred(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "status stayed {status}; logs:\n{}",
            control.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version in `state/policy.json`, the proxy's persisted policy, if any.
fn persisted_version(state: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(state.join("policy.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["version"].as_u64()
}

/// Waits until `state/policy.json` holds `version` (it is written just after the policy is
/// applied, so `/ready` may show the version a moment earlier).
async fn wait_persisted(proxy: &Proxy, state: &Path, version: u64) {
    let written = eventually(HEAL_BOUND, || persisted_version(state) == Some(version)).await;
    assert!(
        written,
        "{} holds {:?}, not version {version}; logs:\n{}",
        state.display(),
        persisted_version(state),
        proxy.logs().join("\n")
    );
}

fn ctl(control: &Control, args: &[&str]) -> (Option<i32>, String, String) {
    let out = control.ctl(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_control_state_dir_is_visible_and_the_change_lands_once_it_heals() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let proxy_state = TempDir::new();
    let proxy = subscribed_proxy(&control, &dirs, &proxy_state.path);
    wait_ready(&proxy, |b| {
        b == "ready source=control fresh=true version=1\n"
    })
    .await;
    assert_eq!(server_of(proxy.outbound).await, "a");

    let immutable = Immutable::set(&dirs.state);
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "b"));
    let status = wait_status(&control, |s| s["store"]["healthy"] == false).await;
    let state = dirs.state.display().to_string();
    let store = &status["store"];
    assert_eq!(store["dir"], state.as_str());
    assert_eq!(
        store["error"],
        format!("cannot create {state}/state.json.tmp: Operation not permitted (os error 1)")
    );
    assert_eq!(store["pending"], "files changed: defaults.yaml");
    assert!(store["failing_since_ms"].as_u64().is_some(), "{store}");
    // Not made: the version in force and what the proxy does are unchanged.
    assert_eq!(status["version"], 1);
    assert_eq!(server_of(proxy.outbound).await, "a");

    let (code, stdout, _) = ctl(&control, &["status"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains(&format!("state directory {state} FAILING since "))
            && stdout.contains("Operation not permitted (os error 1)")
            && stdout
                .contains("not yet in force, retried until written: files changed: defaults.yaml"),
        "{stdout}"
    );
    let ready = control.request_with_token("GET", "/ready", "", None).await;
    let ready_body = String::from_utf8_lossy(&ready.body).into_owned();
    assert_eq!(ready.status, 200);
    assert!(
        ready_body.starts_with(&format!("ok store=failing dir={state:?} failing_since="))
            && ready_body.ends_with(" pending=\"files changed: defaults.yaml\"\n"),
        "{ready_body}"
    );
    assert_eq!(
        control_metric(&control, "outrider_control_store_healthy").await,
        0
    );
    assert_eq!(
        control_metric(&control, "outrider_control_store_pending_changes").await,
        1
    );
    // Retried with no directory event: the failures keep coming while the flag is set.
    let failures = control_metric(&control, "outrider_control_store_write_failures_total").await;
    assert!(failures >= 1);
    let retried = eventually(HEAL_BOUND, || {
        let log = control.logs();
        log.iter()
            .filter(|l| l.contains("cannot apply policy file changes"))
            .count()
            >= 3
    })
    .await;
    assert!(retried, "no retries; logs:\n{}", control.logs().join("\n"));

    // apply is refused with EX_IOERR, naming the directory and the OS error.
    let work = TempDir::new();
    let file = work.path.join("checkout.yaml");
    std::fs::write(
        &file,
        "workload: checkout\nservices:\n  c: { endpoints: [127.0.0.1:9] }\n",
    )
    .unwrap();
    let (code, _, stderr) = ctl(&control, &["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, Some(74), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "outriderctl: checkout.yaml not applied: cannot write the new version to the state directory {state}: cannot create {state}/state.json.tmp: Operation not permitted (os error 1); nothing changed\n"
        )
    );

    // The directory takes writes again: the file change lands by itself, the proxy follows.
    drop(immutable);
    let status = wait_status(&control, |s| s["version"] == 2).await;
    assert_eq!(status["store"]["healthy"], true, "{status}");
    assert_eq!(status["store"]["error"], serde_json::Value::Null);
    assert_eq!(status["store"]["pending"], serde_json::Value::Null);
    wait_ready(&proxy, |b| {
        b == "ready source=control fresh=true version=2\n"
    })
    .await;
    assert_eq!(server_of(proxy.outbound).await, "b");
    wait_status(&control, |s| {
        s["proxies"][0]["state"] == "in-sync" && s["proxies"][0]["version_applied"] == 2
    })
    .await;
    let (_, history, _) = ctl(&control, &["history"]);
    let newest = history.lines().nth(1).unwrap_or_default();
    assert!(
        newest.starts_with("2 ") && newest.contains("files changed: defaults.yaml"),
        "{history}"
    );
    let (_, stdout, _) = ctl(&control, &["status"]);
    assert!(!stdout.contains("FAILING"), "{stdout}");
    assert_eq!(
        control_metric(&control, "outrider_control_store_healthy").await,
        1
    );
    assert_eq!(
        control_metric(&control, "outrider_control_store_pending_changes").await,
        0
    );
    assert_eq!(
        String::from_utf8_lossy(
            &control
                .request_with_token("GET", "/ready", "", None)
                .await
                .body
        ),
        "ok\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cannot_persist_says_so_and_persists_once_it_can() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let proxy_state = TempDir::new();
    let proxy = subscribed_proxy(&control, &dirs, &proxy_state.path);
    wait_ready(&proxy, |b| {
        b == "ready source=control fresh=true version=1\n"
    })
    .await;
    wait_persisted(&proxy, &proxy_state.path, 1).await;
    let (_, body) = wait_ready(&proxy, |_| true).await;
    assert_eq!(body, "ready source=control fresh=true version=1\n");

    let immutable = Immutable::set(&proxy_state.path);
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "b"));
    let path = proxy_state.path.display().to_string();
    // Applied first, then the write fails: the detail follows the version.
    let (status, body) = wait_ready(&proxy, |b| b.contains("persisted=false")).await;
    // Still ready: the new policy serves; but a restart now would start from version 1.
    assert_eq!(status, 200);
    assert_eq!(
        body,
        format!(
            "ready source=control fresh=true version=2 persisted=false persist_error=\"{path}/policy.json.tmp: Operation not permitted (os error 1)\"\n"
        )
    );
    assert_eq!(server_of(proxy.outbound).await, "b");
    assert_eq!(persisted_version(&proxy_state.path), Some(1));
    assert_eq!(proxy.metric("outrider_policy_persisted_version").await, 1.0);
    assert!(proxy.metric("outrider_policy_persist_failures_total").await >= 1.0);
    // Retried with no new push: the failures keep coming while the flag is set.
    let mut failures = 0.0;
    let deadline = Instant::now() + HEAL_BOUND;
    while failures < 3.0 {
        assert!(Instant::now() < deadline, "no retries: {failures}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        failures = proxy.metric("outrider_policy_persist_failures_total").await;
    }

    drop(immutable);
    wait_ready(&proxy, |b| {
        b == "ready source=control fresh=true version=2\n"
    })
    .await;
    wait_persisted(&proxy, &proxy_state.path, 2).await;
    assert_eq!(proxy.metric("outrider_policy_persisted_version").await, 2.0);
}
