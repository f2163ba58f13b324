//! Live policy from the control plane, end to end: the real `outrider-control` binary and real
//! `outrider-proxy` processes subscribed to it (`--control`), real upstreams, all on 127.0.0.1.
//! An applied change alters what the proxies do within a measured bound; a rejected document
//! changes nothing; a NACK (a port taken) shows in the control plane's status; a killed control
//! plane is survived and re-joined without a re-push; a proxy restarted while the control plane
//! is down serves its persisted policy; 100 pushes under load lose no request; another token
//! holder can neither take over a proxy's subscription nor forge its ACKs.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use outrider_e2e::*;

/// Push + apply on a loaded 2-core machine: the bound is 100 ms for the push alone.
const APPLY_BOUND: Duration = Duration::from_secs(1);

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

/// Starts a proxy subscribed to `control` as workload `checkout`, persisting in `state`.
fn subscribed_proxy(control_url: &str, dirs: &ControlDirs, id: &str, state: &Path) -> Proxy {
    spawn_proxy(
        TempDir::new(),
        &[
            "--control".into(),
            control_url.into(),
            "--token-file".into(),
            dirs.token_file.clone().into(),
            "--workload".into(),
            "checkout".into(),
            "--proxy-id".into(),
            id.into(),
            "--state-dir".into(),
            state.into(),
        ],
    )
}

/// Waits until `/ready` reads exactly `expected`; returns how long that took.
async fn wait_ready(proxy: &Proxy, expected: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (_, body) = proxy.admin_get("/ready").await;
        // Most proxies here run a workload only the defaults name: what /ready says of that
        // is tested in operator.rs.
        let body = body.replace(
            " workload_named=false note=\"no policy document names this workload; it runs only the defaults\"",
            "",
        );
        if body == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "/ready is {body:?}, not {expected:?}; logs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn version_of(proxy: &Proxy) -> u64 {
    let (_, body) = proxy.admin_get("/config").await;
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    config["version"].as_u64().unwrap()
}

async fn server_of(addr: SocketAddr) -> String {
    let reply = get(addr, "svc", "/").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["server"].as_str().unwrap().to_string()
}

/// The control plane's record of proxy `id`.
async fn proxy_status(control: &Control, id: &str) -> serde_json::Value {
    let status = control.status().await;
    status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["proxy"] == id)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until the control plane reports `id` in `state` (`in-sync`, `nack`, ...).
async fn wait_state(control: &Control, id: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = proxy_status(control, id).await;
        if p["state"] == state {
            return p;
        }
        assert!(Instant::now() < deadline, "{id} never {state}: {p}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `outriderctl apply -f file` off the async threads.
async fn ctl_apply(control: &Control, file: &Path) -> std::process::Output {
    let url = control.url();
    let file = file.to_path_buf();
    tokio::task::spawn_blocking(move || {
        outrider_e2e::control::ctl(
            &url,
            Some(CONTROL_TOKEN),
            &["apply", "-f", file.to_str().unwrap()],
        )
    })
    .await
    .unwrap()
}

fn applied_count(proxy: &Proxy) -> usize {
    proxy
        .logs()
        .iter()
        .filter(|l| l.contains("\"policy applied\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_change_reaches_the_proxy_within_the_bound() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let state = TempDir::new();
    let proxy = subscribed_proxy(&control.url(), &dirs, "pod-1", &state.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v1}\n"),
        APPLY_BOUND * 5,
    )
    .await;
    assert_eq!(server_of(proxy.outbound).await, "a");
    let synced = wait_state(&control, "pod-1", "in-sync").await;
    assert_eq!(synced["version_applied"], v1);

    // `outriderctl apply` of a workload-specific document sends checkout's `svc` to b (each
    // document is validated alone, so it names the service it routes to).
    let docs = TempDir::new();
    let file = docs.path.join("checkout.yaml");
    let doc = format!(
        "workload: checkout\nservices:\n  b: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: b\n",
        b.addr
    );
    std::fs::write(&file, &doc).unwrap();
    let started = Instant::now();
    let out = ctl_apply(&control, &file).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut took = None;
    while started.elapsed() < APPLY_BOUND * 5 {
        if server_of(proxy.outbound).await == "b" {
            took = Some(started.elapsed());
            break;
        }
    }
    let took = took.expect("the proxy never routed to b");
    eprintln!("outriderctl apply (route change) -> proxy routes by it: {took:?}");
    assert!(took < APPLY_BOUND, "{took:?}");
    let v2 = control.status().await["version"].as_u64().unwrap();
    assert!(v2 > v1);
    assert_eq!(version_of(&proxy).await, v2);
    assert_eq!(
        wait_state(&control, "pod-1", "in-sync").await["version_applied"],
        v2
    );
    let status = control.ctl(&["status"]);
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.contains("pod-1") && l.contains("in-sync") && l.contains(&v2.to_string())),
        "{table}"
    );

    // A rate limit on that route: one request a second, the second in a row gets 429.
    std::fs::write(
        &file,
        format!("{doc}    rate_limit: {{ requests_per_second: 1, burst: 1 }}\n"),
    )
    .unwrap();
    let started = Instant::now();
    let out = ctl_apply(&control, &file).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut took = None;
    while started.elapsed() < APPLY_BOUND * 5 {
        let first = get(proxy.outbound, "svc", "/").await.status;
        let second = get(proxy.outbound, "svc", "/").await.status;
        if second == 429 {
            assert!(first == 200 || first == 429);
            took = Some(started.elapsed());
            break;
        }
        assert_eq!((first, second), (200, 200));
    }
    let took = took.expect("the rate limit never applied");
    eprintln!("outriderctl apply (rate limit) -> proxy limits: {took:?}");
    assert!(took < APPLY_BOUND, "{took:?}");
    let v3 = control.status().await["version"].as_u64().unwrap();
    assert_eq!(
        wait_state(&control, "pod-1", "in-sync").await["version_applied"],
        v3
    );

    // Persisted exactly as pushed.
    let persisted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path.join("policy.json")).unwrap()).unwrap();
    assert_eq!(persisted["version"], v3);
    assert_eq!(persisted["workload"], "checkout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_document_is_rejected_and_nothing_changes() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let state = TempDir::new();
    let proxy = subscribed_proxy(&control.url(), &dirs, "pod-1", &state.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v1}\n"),
        APPLY_BOUND * 5,
    )
    .await;

    // Invalid by the schema (no such service) and by syntax: both refused with positions.
    let reply = control
        .request(
            "POST",
            "/v1/apply?name=checkout",
            "workload: checkout\nroutes:\n  - match: { authority: svc }\n    service: nope\n",
        )
        .await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(body.contains("nope") && body.contains(":4:"), "{body}");
    let reply = control
        .request("POST", "/v1/apply?name=checkout", "routes: [unclosed\n")
        .await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);

    // Refused: no version taken, same routing.
    assert_eq!(control.status().await["version"], v1);
    assert_eq!(server_of(proxy.outbound).await, "a");

    // And the proxy heard nothing: pushes arrive in order, so once the next valid change is
    // in force, anything the refusals had sent would have been applied or refused before it.
    let reply = control
        .request(
            "POST",
            "/v1/apply?name=checkout",
            &format!(
                "workload: checkout\nservices:\n  c: {{ endpoints: [{}] }}\nroutes:\n  - match: {{ authority: svc }}\n    service: c\n",
                b.addr
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let v2 = control.status().await["version"].as_u64().unwrap();
    assert_eq!(v2, v1 + 1, "a refused document took a version");
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v2}\n"),
        APPLY_BOUND * 5,
    )
    .await;
    assert_eq!(server_of(proxy.outbound).await, "b");
    // Its log is read in order: once v2's line is in, any earlier one is too.
    let v2_applied = format!("\"version\":{v2},");
    assert!(
        eventually(APPLY_BOUND, || proxy.logs().iter().any(|l| l
            .contains("\"policy applied\"")
            && l.contains(&v2_applied)))
        .await,
        "{}",
        proxy.logs().join("\n")
    );
    assert_eq!(applied_count(&proxy), 2, "{}", proxy.logs().join("\n"));
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"error\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_keeps_the_old_policy_and_shows_in_status() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let state = TempDir::new();
    let proxy = subscribed_proxy(&control.url(), &dirs, "pod-1", &state.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_state(&control, "pod-1", "in-sync").await;

    // Valid for the control plane, impossible for this proxy: the port is taken here.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let doc = format!(
        "workload: checkout\nservices:\n  b: {{ endpoints: [{}], listen: {taken} }}\nroutes:\n  - match: {{ authority: svc }}\n    service: b\n",
        b.addr
    );
    let reply = control
        .request("POST", "/v1/apply?name=checkout", &doc)
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let p = wait_state(&control, "pod-1", "nack").await;
    let v2 = control.status().await["version"].as_u64().unwrap();
    assert_eq!(p["version_applied"], v1);
    assert_eq!(p["last_nack"]["version"], v2);
    let reason = p["last_nack"]["error"].as_str().unwrap();
    assert!(
        reason.contains(&format!("cannot listen on {taken} for service `b`")),
        "{reason}"
    );
    assert_eq!(version_of(&proxy).await, v1);
    assert_eq!(server_of(proxy.outbound).await, "a");
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"error\"}")
            .await,
        1.0
    );

    // The next version the proxy can apply clears it.
    drop(holder);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let doc = doc.replace(&taken.to_string(), &free.to_string());
    let reply = control
        .request("POST", "/v1/apply?name=checkout", &doc)
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let p = wait_state(&control, "pod-1", "in-sync").await;
    assert!(p["version_applied"].as_u64().unwrap() > v2);
    assert_eq!(server_of(free).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_control_plane_is_rejoined_without_a_re_push_and_proxies_converge() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let addr = control.addr;
    let (s1, s2) = (TempDir::new(), TempDir::new());
    let p1 = subscribed_proxy(&control.url(), &dirs, "pod-1", &s1.path);
    let p2 = subscribed_proxy(&control.url(), &dirs, "pod-2", &s2.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_state(&control, "pod-1", "in-sync").await;
    wait_state(&control, "pod-2", "in-sync").await;

    control.kill();
    for proxy in [&p1, &p2] {
        // Still serving the last good policy, and saying it may be stale.
        wait_ready(
            proxy,
            &format!("ready source=control fresh=false version={v1}\n"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(server_of(proxy.outbound).await, "a");
    }
    // Down long enough for each proxy to fail a reconnect (its second "subscription ended"),
    // so the rejoin below is a reconnect from backoff, not the first retry.
    for proxy in [&p1, &p2] {
        let failures = || {
            proxy
                .logs()
                .iter()
                .filter(|l| l.contains("control-plane subscription ended"))
                .count()
        };
        assert!(
            eventually(Duration::from_secs(5), || failures() >= 2).await,
            "{}",
            proxy.logs().join("\n")
        );
    }

    let restarted = Instant::now();
    let control = start_control_with(&dirs, &["--listen", &addr.to_string()]);
    assert_eq!(control.status().await["version"], v1, "history lost");
    for proxy in [&p1, &p2] {
        // Reconnect bound: backoff capped at 10 s, plus a margin.
        wait_ready(
            proxy,
            &format!("ready source=control fresh=true version={v1}\n"),
            Duration::from_secs(15),
        )
        .await;
    }
    eprintln!(
        "control plane restart -> both proxies resubscribed: {:?}",
        restarted.elapsed()
    );
    for id in ["pod-1", "pod-2"] {
        // A resumed proxy ACKs what it runs, so the restarted server knows it is in sync.
        assert_eq!(
            wait_state(&control, id, "in-sync").await["version_applied"],
            v1
        );
    }
    // Resumed, not re-pushed: each proxy applied exactly one policy in its life.
    assert_eq!(applied_count(&p1), 1);
    assert_eq!(applied_count(&p2), 1);

    // And both converge on the next change.
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "b"));
    let v2 = v1 + 1;
    for proxy in [&p1, &p2] {
        wait_ready(
            proxy,
            &format!("ready source=control fresh=true version={v2}\n"),
            APPLY_BOUND * 5,
        )
        .await;
        assert_eq!(server_of(proxy.outbound).await, "b");
    }
    assert_eq!(control.status().await["version"], v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_control_plane_is_down_serves_the_persisted_policy() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "b"));
    let control = start_control(&dirs);
    let (url, addr) = (control.url(), control.addr);
    let state = TempDir::new();
    let proxy = subscribed_proxy(&url, &dirs, "pod-1", &state.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v1}\n"),
        APPLY_BOUND * 5,
    )
    .await;
    // The ACK follows the fsync of the persisted copy.
    wait_state(&control, "pod-1", "in-sync").await;
    control.kill();
    drop(proxy); // SIGKILL: nothing flushed on the way out

    // Control plane down, proxy restarted: the persisted policy serves, marked as such.
    let proxy = subscribed_proxy(&url, &dirs, "pod-1", &state.path);
    let (status, body) = proxy.admin_get("/ready").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        format!("ready source=disk fresh=false version={v1}\n")
    );
    assert_eq!(server_of(proxy.outbound).await, "b");

    // Without a persisted policy there is nothing to serve: not ready.
    let empty_state = TempDir::new();
    let fresh_pod = subscribed_proxy(&url, &dirs, "pod-2", &empty_state.path);
    let (status, body) = fresh_pod.admin_get("/ready").await;
    assert_eq!(status, 503);
    assert_eq!(body, "not ready source=none fresh=false version=0\n");
    assert_eq!(get(fresh_pod.outbound, "svc", "/").await.status, 404);

    // The control plane comes back: the persisted policy is confirmed, the new pod gets one.
    let control = start_control_with(&dirs, &["--listen", &addr.to_string()]);
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v1}\n"),
        Duration::from_secs(15),
    )
    .await;
    wait_ready(
        &fresh_pod,
        &format!("ready source=control fresh=true version={v1}\n"),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(server_of(fresh_pod.outbound).await, "b");
    assert_eq!(
        applied_count(&proxy),
        1,
        "the persisted policy was re-pushed"
    );
    wait_state(&control, "pod-1", "in-sync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_and_the_proxy_stays_unready() {
    let dirs = ControlDirs::new();
    // Not an empty policy: the control plane versions a workload by when its merged policy
    // last changed, and an empty one never changed (version 0).
    dirs.write(
        "defaults.yaml",
        "workload: \"*\"\nservices: { s: { endpoints: [127.0.0.1:9] } }\n",
    );
    let control = start_control(&dirs);
    let wrong = TempDir::new();
    let token_file = wrong.path.join("token");
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    let state = TempDir::new();
    let proxy = spawn_proxy(
        TempDir::new(),
        &[
            "--control".into(),
            control.url().into(),
            "--token-file".into(),
            token_file.into(),
            "--workload".into(),
            "checkout".into(),
            "--state-dir".into(),
            state.path.clone().into(),
        ],
    );
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .logs()
            .iter()
            .any(|l| l.contains("refused the token (401)")))
        .await
    );
    assert_eq!(proxy.admin_get("/ready").await.0, 503);
    // Logged before the 401 left, but read from the control plane's stderr by a thread of
    // its own: not necessarily in yet when the proxy's line is.
    assert!(
        eventually(Duration::from_secs(5), || control
            .logs()
            .iter()
            .any(|l| l.contains("unauthorized request refused")))
        .await
    );
    assert_eq!(control.status().await["proxies"], serde_json::json!([]));

    // The right token from the environment instead of a file is accepted.
    let proxy = spawn_proxy_env(
        TempDir::new(),
        &[
            "--control".into(),
            control.url().into(),
            "--workload".into(),
            "checkout".into(),
            "--proxy-id".into(),
            "pod-env".into(),
        ],
        &[("OUTRIDER_CONTROL_TOKEN", CONTROL_TOKEN)],
    );
    let v = control.status().await["version"].as_u64().unwrap();
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v}\n"),
        APPLY_BOUND * 5,
    )
    .await;
    wait_state(&control, "pod-env", "in-sync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pushes_under_load_lose_no_request() {
    const PUSHES: u64 = 100;
    const CLIENTS: usize = 4;
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let state = TempDir::new();
    let proxy = subscribed_proxy(&control.url(), &dirs, "pod-1", &state.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_ready(
        &proxy,
        &format!("ready source=control fresh=true version={v1}\n"),
        APPLY_BOUND * 5,
    )
    .await;

    let outbound = proxy.outbound;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
        clients.push(tokio::spawn(async move {
            // Half keep connections alive across pushes, half open one per request.
            let pooled = http1_client();
            let mut failures = Vec::new();
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && sent < 50_000 {
                sent += 1;
                let client = if i % 2 == 0 {
                    pooled.clone()
                } else {
                    http1_client()
                };
                let req = Request::get(format!("http://{outbound}/"))
                    .header("host", "svc")
                    .body(empty())
                    .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == 200 => {
                        use http_body_util::BodyExt;
                        match res.into_body().collect().await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.push(format!("body: {e}")),
                        }
                    }
                    Ok(res) => failures.push(format!("status {}", res.status())),
                    Err(e) => failures.push(format!("request: {e:?}")),
                }
            }
            failures
        }));
    }
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut last = v1;
    for i in 0..PUSHES {
        let target = if i % 2 == 0 { "b" } else { "a" };
        let edited = Instant::now();
        dirs.write("defaults.yaml", &defaults(a.addr, b.addr, target));
        // Each edit is its own version once the control plane's debounce has passed.
        loop {
            let v = version_of(&proxy).await;
            if v > last {
                last = v;
                break;
            }
            assert!(
                edited.elapsed() < Duration::from_secs(5),
                "push {i} never applied; proxy logs:\n{}",
                proxy.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        slowest = slowest.max(edited.elapsed());
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let served = ok.load(Ordering::Relaxed);
    eprintln!(
        "{PUSHES} pushes in {elapsed:?} (slowest edit -> applied {slowest:?}); {served} requests ok, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(served > 500, "too little load to mean anything: {served}");
    assert!(a.hits() > 0 && b.hits() > 0);
    assert_eq!(last, v1 + PUSHES);
    assert_eq!(
        wait_state(&control, "pod-1", "in-sync").await["version_applied"],
        last
    );
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"error\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hijacking_subscription_and_forged_acks_are_refused() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "a"));
    let control = start_control(&dirs);
    let state = TempDir::new();
    let proxy = subscribed_proxy(&control.url(), &dirs, "p1", &state.path);
    let v1 = control.status().await["version"].as_u64().unwrap();
    wait_state(&control, "p1", "in-sync").await;

    // Another token holder subscribes as p1, for another workload: refused, p1 untouched.
    let req = Request::get(format!(
        "{}/v1/subscribe?workload=intruder&proxy=p1",
        control.url()
    ))
    .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
    .body(empty())
    .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), http1_client().request(req))
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(res.status(), 409);
    // (Had it been accepted, the stream would be open; it is dropped here either way.)
    drop(res);

    // Forged ACKs: a version never sent, and one without p1's session.
    for forged in [
        serde_json::json!({"proxy": "p1", "workload": "checkout", "version": 99999,
                           "content_hash": "forged"}),
        serde_json::json!({"proxy": "p1", "workload": "checkout", "version": 99999,
                           "content_hash": "forged", "error": "made up"}),
    ] {
        let reply = control
            .request("POST", "/v1/ack", &forged.to_string())
            .await;
        assert_eq!(reply.status, 409, "{forged}: {:?}", reply.body);
    }
    let p1 = wait_state(&control, "p1", "in-sync").await;
    assert_eq!(p1["workload"], "checkout");
    assert_eq!(p1["version_applied"], v1);
    assert_eq!(p1["connected"], true);
    assert!(p1["last_nack"].is_null(), "{p1}");

    // The real proxy still converges on the next change.
    dirs.write("defaults.yaml", &defaults(a.addr, b.addr, "b"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while server_of(proxy.outbound).await != "b" {
        assert!(Instant::now() < deadline, "p1 never applied the change");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let p1 = wait_state(&control, "p1", "in-sync").await;
    assert!(p1["version_applied"].as_u64().unwrap() > v1, "{p1}");
}
