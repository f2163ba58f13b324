//! Failing over between control-plane replicas, end to end with the real binaries: a proxy
//! given several `--control` URLs moves to another replica when its own is killed (resuming
//! by version and hash, so it is not pushed what it has) and keeps serving; one started with
//! a dead or a hung URL first subscribes to, and gets its certificate from, the next (the URLs
//! given by flag or by `OUTRIDER_CONTROL`); a URL's host name is resolved to its replicas; and
//! `outriderctl --server` with several URLs passes an unreachable one, never an answer. The
//! kill tests run replicas on a real 3-member etcd cluster (skipped without etcd, unless
//! OUTRIDER_REQUIRE_ETCD=1): two, and three with the proxy's replica killed during 100 pushes
//! under steady traffic (no request fails, every version the proxy ACKed is in a surviving
//! replica's history, nothing is pushed twice); the others need no shared store.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrider_e2e::control::{
    applied_version, ctl, start_control, start_control_with, ControlDirs, CONTROL_TOKEN,
};
use outrider_e2e::etcd::EtcdCluster;
use outrider_e2e::*;

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

/// Routes host `svc` of workload `checkout` to the upstream at `addr`.
fn route(addr: SocketAddr) -> String {
    format!(
        "workload: checkout
services:
  up: {{ endpoints: [{addr}] }}
routes:
  - match: {{ authority: svc }}
    service: up
"
    )
}

/// A URL nothing listens on (a port bound, then released).
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// A proxy of workload `checkout` subscribed to `urls` (one `--control`, comma-separated),
/// with the token of `dirs`, and `extra` flags.
fn proxy_on(urls: &[String], dirs: &ControlDirs, extra: &[&str]) -> Proxy {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--control".into(),
        urls.join(",").into(),
        "--token-file".into(),
        dirs.token_file.clone().into(),
        "--workload".into(),
        "checkout".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    spawn_proxy(TempDir::new(), &args)
}

/// The `/config` of `proxy` once `pred` holds for it, within `bound`; panics with the
/// proxy's logs past it.
async fn wait_config(
    proxy: &Proxy,
    bound: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (_, body) = proxy.admin_get("/config").await;
        let config: serde_json::Value = serde_json::from_str(&body).unwrap();
        if pred(&config) {
            return config;
        }
        assert!(
            started.elapsed() < bound,
            "{what} not within {bound:?}: {config}\nlogs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `config` says the proxy is subscribed to `url`.
fn on_replica(config: &serde_json::Value, url: &str) -> bool {
    config["control_replica"]["url"] == url && config["fresh"] == true
}

/// The `(version, replica URL)` of every update the proxy received, in order.
fn updates_received(proxy: &Proxy) -> Vec<(u64, String)> {
    proxy
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "control-plane update received")
        .map(|event| {
            (
                event["version"].as_u64().unwrap(),
                event["replica"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `outriderctl apply -f` of `text` as document `name` with `--server` from the environment
/// (`OUTRIDER_CONTROL_URL=urls`), off the async threads.
async fn apply(urls: String, name: &str, text: String) -> std::process::Output {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let dir = TempDir::new();
        let file = dir.path.join(name);
        std::fs::write(&file, text).unwrap();
        ctl(
            &urls,
            Some(CONTROL_TOKEN),
            &["apply", "-f", file.to_str().unwrap()],
        )
    })
    .await
    .unwrap()
}

/// Requests to host `svc` through a proxy's outbound port, one after another until stopped.
struct Traffic {
    sent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(outbound: SocketAddr) -> Self {
        let (sent, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (counter, stopped) = (Arc::clone(&sent), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let client = http1_client();
            let mut failed = Vec::new();
            while !stopped.load(Ordering::Acquire) {
                let req = http::Request::get(format!("http://{outbound}/"))
                    .header("host", "svc")
                    .body(empty())
                    .unwrap();
                match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                    Ok(Ok(res)) if res.status() == 200 => {}
                    Ok(Ok(res)) => failed.push(format!("status {}", res.status())),
                    Ok(Err(e)) => failed.push(format!("error {e}")),
                    Err(_) => failed.push("no answer within 5s".into()),
                }
                counter.fetch_add(1, Ordering::AcqRel);
            }
            failed
        });
        Self { sent, stop, task }
    }

    /// Waits (bounded) until 10 more requests have been answered: traffic flows now.
    async fn flowing(&self) {
        let target = self.sent.load(Ordering::Acquire) + 10;
        assert!(
            eventually(Duration::from_secs(10), || self
                .sent
                .load(Ordering::Acquire)
                >= target)
            .await,
            "requests stalled at {}",
            self.sent.load(Ordering::Acquire)
        );
    }

    /// Stops; how many were sent and every one that did not get a 200.
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let failed = self.task.await.unwrap();
        (self.sent.load(Ordering::Acquire), failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_left_for_the_next_which_pushes_only_what_is_new() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let replica = |dirs: &ControlDirs| {
        let url = cluster.url();
        start_control_with(dirs, &["--store", &url, "--etcd-timeout", "5s"])
    };
    let (dirs_a, dirs_b) = (ControlDirs::new(), ControlDirs::new());
    let a = replica(&dirs_a);
    let b = replica(&dirs_b);
    let (url_a, url_b) = (a.url(), b.url());
    let up_a = Upstream::echo(Proto::Http1, "a").await;
    let up_b = Upstream::echo(Proto::Http1, "b").await;
    let v1 = applied_version(&apply(url_a.clone(), "checkout.yaml", route(up_a.addr)).await);

    // Both replicas' tokens are the same file's content.
    let proxy = proxy_on(&[url_a.clone(), url_b.clone()], &dirs_a, &[]);
    wait_config(&proxy, Duration::from_secs(10), "v1 from A", |c| {
        on_replica(c, &url_a) && c["version"] == v1
    })
    .await;
    let traffic = Traffic::start(proxy.outbound);
    traffic.flowing().await;

    // A crashes: the proxy subscribes to B, resuming with what it runs.
    let killed = Instant::now();
    a.kill();
    let config = wait_config(&proxy, Duration::from_secs(5), "subscribed to B", |c| {
        on_replica(c, &url_b)
    })
    .await;
    eprintln!(
        "replica A killed -> proxy subscribed to B: {:?}",
        killed.elapsed()
    );
    traffic.flowing().await;
    assert_eq!(config["version"], v1);

    // A change made on B reaches it.
    let v2 = applied_version(&apply(url_b.clone(), "checkout.yaml", route(up_b.addr)).await);
    assert_eq!(v2, v1 + 1);
    wait_config(&proxy, Duration::from_secs(10), "v2 from B", |c| {
        on_replica(c, &url_b) && c["version"] == v2
    })
    .await;
    traffic.flowing().await;
    let (sent, failed) = traffic.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );

    // Each version was pushed once, v1 by A and v2 by B: B did not push v1 again.
    assert_eq!(
        updates_received(&proxy),
        [(v1, url_a.clone()), (v2, url_b.clone())],
        "{}",
        proxy.logs().join("\n")
    );
    let reply = get(proxy.outbound, "svc", "/").await;
    assert_eq!(reply.json()["server"], "b");
}

/// Workload `checkout`'s document at step `step`: host `svc` routed to the upstream at
/// `addr`, and an unused service whose port makes each step a new version.
fn route_step(addr: SocketAddr, step: u16) -> String {
    format!(
        "workload: checkout
services:
  up: {{ endpoints: [{addr}] }}
  spare: {{ endpoints: [127.0.0.1:{}] }}
routes:
  - match: {{ authority: svc }}
    service: up
",
        10_000 + step
    )
}

/// `POST /v1/apply` of `text` as document `name` on the replica at `url`; the version it was
/// applied as, or a panic with the answer.
async fn apply_api(url: &str, name: &str, text: String) -> u64 {
    let req = http::Request::post(format!("{url}/v1/apply?name={name}"))
        .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
        .body(full(text))
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), send(&http1_client(), req))
        .await
        .unwrap_or_else(|_| panic!("apply on {url}: no answer within 10s"));
    assert_eq!(
        reply.status,
        200,
        "apply on {url}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()["version"].as_u64().unwrap()
}

/// The versions `url`'s history holds now (the newest 50).
async fn history_versions(url: &str) -> Vec<u64> {
    let req = http::Request::get(format!("{url}/v1/history"))
        .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
        .body(empty())
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), send(&http1_client(), req))
        .await
        .unwrap_or_else(|_| panic!("history on {url}: no answer within 10s"));
    assert_eq!(reply.status, 200);
    reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["version"].as_u64().unwrap())
        .collect()
}

/// The versions the proxy applied from the control plane, in order: each is ACKed right after.
fn versions_applied(proxy: &Proxy) -> Vec<u64> {
    proxy
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "policy applied" && event["source"] == "control")
        .map(|event| event["version"].as_u64().unwrap())
        .collect()
}

/// How many policy versions the kill test applies, and after how many it kills the replica.
const PUSHES: u16 = 100;
const KILL_AFTER: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_proxys_replica_during_100_pushes_under_load_loses_nothing() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let replica = |dirs: &ControlDirs| {
        let url = cluster.url();
        start_control_with(dirs, &["--store", &url, "--etcd-timeout", "5s"])
    };
    let (dirs_a, dirs_b, dirs_c) = (ControlDirs::new(), ControlDirs::new(), ControlDirs::new());
    let a = replica(&dirs_a);
    let b = replica(&dirs_b);
    let c = replica(&dirs_c);
    let (url_a, url_b, url_c) = (a.url(), b.url(), c.url());
    let up = Upstream::echo(Proto::Http1, "up").await;
    let first = apply_api(&url_b, "checkout.yaml", route_step(up.addr, 0)).await;
    // Every replica's view has it before the proxy subscribes: A would otherwise push its
    // empty version 0 first, which no history holds.
    for url in [&url_a, &url_b, &url_c] {
        let started = Instant::now();
        while !history_versions(url).await.contains(&first) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{url} lacks {first}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Subscribed to A, its first URL, with B and C to fail over to.
    let proxy = proxy_on(&[url_a.clone(), url_b.clone(), url_c.clone()], &dirs_a, &[]);
    wait_config(
        &proxy,
        Duration::from_secs(10),
        "the first version from A",
        |c| on_replica(c, &url_a) && c["version"] == first,
    )
    .await;
    let traffic = Traffic::start(proxy.outbound);
    traffic.flowing().await;

    // 100 versions applied one after another on the replicas that stay (B and C in turn),
    // while the proxy receives them from A; the applied versions and, every 10 steps, B's
    // history (it keeps the newest 50), as they were. After `KILL_AFTER` the task waits for
    // A's death and the proxy's move, so that the proxy moves holding the newest version:
    // what the next replica would push again if it did not resume by hash.
    let applied = Arc::new(AtomicUsize::new(0));
    let (resume, resumed) = tokio::sync::oneshot::channel::<()>();
    let pushes = tokio::spawn({
        let (applied, url_b, url_c, upstream) =
            (Arc::clone(&applied), url_b.clone(), url_c.clone(), up.addr);
        async move {
            let mut versions = Vec::new();
            let mut history = std::collections::BTreeSet::new();
            let mut resumed = Some(resumed);
            for step in 1..=PUSHES {
                let url = if step % 2 == 0 { &url_b } else { &url_c };
                versions.push(apply_api(url, "checkout.yaml", route_step(upstream, step)).await);
                applied.fetch_add(1, Ordering::AcqRel);
                if step % 10 == 0 {
                    history.extend(history_versions(&url_b).await);
                }
                if usize::from(step) == KILL_AFTER {
                    if let Some(resumed) = resumed.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(30), resumed).await;
                    }
                }
            }
            (versions, history)
        }
    });

    // A is killed partway through, once the proxy runs the newest version.
    assert!(
        eventually(Duration::from_secs(60), || applied.load(Ordering::Acquire)
            >= KILL_AFTER)
        .await,
        "only {} applies within 60s",
        applied.load(Ordering::Acquire)
    );
    let version_at_kill = first + KILL_AFTER as u64;
    wait_config(
        &proxy,
        Duration::from_secs(10),
        "the newest version from A",
        |c| on_replica(c, &url_a) && c["version"] == version_at_kill,
    )
    .await;
    let killed = Instant::now();
    a.kill();
    let config = wait_config(
        &proxy,
        Duration::from_secs(5),
        "subscribed to B or C",
        |c| on_replica(c, &url_b) || on_replica(c, &url_c),
    )
    .await;
    eprintln!(
        "replica A killed at version {version_at_kill} -> proxy subscribed to {}: {:?}",
        config["control_replica"]["url"],
        killed.elapsed()
    );
    assert_eq!(config["version"], version_at_kill);
    resume.send(()).unwrap();
    let (versions, mut history) = pushes.await.unwrap();
    let last = *versions.last().unwrap();
    assert_eq!(
        versions,
        (first + 1..=last).collect::<Vec<_>>(),
        "each apply its own consecutive version"
    );

    // The proxy runs the last version, from B or C.
    wait_config(&proxy, Duration::from_secs(10), "the last version", |c| {
        c["version"] == last && (on_replica(c, &url_b) || on_replica(c, &url_c))
    })
    .await;
    traffic.flowing().await;
    let (sent, failed) = traffic.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );

    // Every version the proxy applied (and ACKed) is one a surviving replica's history holds.
    history.extend(history_versions(&url_c).await);
    let acked = versions_applied(&proxy);
    assert_eq!(acked.last(), Some(&last));
    let unknown: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|v| !history.contains(v))
        .collect();
    assert!(
        unknown.is_empty(),
        "not in history: {unknown:?} ({history:?})"
    );
    for v in &versions {
        assert!(
            history.contains(v),
            "applied {v}, not in history {history:?}"
        );
    }

    // No re-push: every update received is newer than the one before it, across the move
    // from A to another replica (which resumed from the version and hash the proxy ran, the
    // newest, so it pushed nothing until the next apply); A pushed versions up to the kill,
    // B or C the rest.
    let updates = updates_received(&proxy);
    for pair in updates.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "{pair:?} pushed again or out of order:\n{}",
            proxy.logs().join("\n")
        );
    }
    let moved = updates
        .iter()
        .position(|(_, url)| *url != url_a)
        .expect("updates from another replica");
    assert!(updates[..moved].iter().all(|(_, url)| *url == url_a));
    assert!(updates[moved..].iter().all(|(_, url)| *url != url_a));
    assert!(updates[moved].0 > version_at_kill, "{updates:?}");
    eprintln!(
        "{sent} requests, 0 failed; {} updates received, {} versions applied by the proxy",
        updates.len(),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_first_replica_is_dead_or_hung_subscribes_to_the_next() {
    let dirs = ControlDirs::new();
    let up = Upstream::echo(Proto::Http1, "up").await;
    dirs.write("checkout.yaml", &route(up.addr));
    let live = start_control(&dirs);
    // Accepts connections (the kernel's backlog) and never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("http://{}", hung.local_addr().unwrap());

    // With a mesh identity: the certificate, too, comes from the replica that answers.
    let identity = ["--namespace", "shop", "--service-account", "checkout"];
    let started = Instant::now();
    // The environment twin takes the comma list.
    let mut args: Vec<std::ffi::OsString> = vec![
        "--token-file".into(),
        dirs.token_file.clone().into(),
        "--workload".into(),
        "checkout".into(),
    ];
    args.extend(identity.iter().map(Into::into));
    let urls = format!("{},{}", dead_url(), live.url());
    let after_dead = spawn_proxy_env(TempDir::new(), &args, &[("OUTRIDER_CONTROL", &urls)]);
    let after_hung = proxy_on(&[hung_url.clone(), live.url()], &dirs, &identity);
    // A host name: resolved, and each of its addresses a replica.
    let by_name = format!("http://localhost:{}", live.addr.port());
    let named = proxy_on(std::slice::from_ref(&by_name), &dirs, &[]);
    let config = wait_config(&named, Duration::from_secs(5), "subscribed by name", |c| {
        c["fresh"] == true
    })
    .await;
    assert_eq!(
        config["control_replica"],
        serde_json::json!({ "url": by_name, "address": live.addr.to_string() })
    );

    wait_config(
        &after_dead,
        Duration::from_secs(5),
        "subscribed past the dead URL",
        |c| on_replica(c, &live.url()),
    )
    .await;
    eprintln!("dead first URL -> subscribed: {:?}", started.elapsed());
    // The hung replica is given up at the subscription's response deadline (10 s).
    wait_config(
        &after_hung,
        Duration::from_secs(15),
        "subscribed past the hung URL",
        |c| on_replica(c, &live.url()),
    )
    .await;
    eprintln!("hung first URL -> subscribed: {:?}", started.elapsed());
    assert!(
        after_hung
            .logs()
            .iter()
            .any(|l| l.contains("did not answer within 10s") && l.contains(&hung_url)),
        "{}",
        after_hung.logs().join("\n")
    );
    for proxy in [&after_dead, &after_hung] {
        assert_eq!(get(proxy.outbound, "svc", "/").await.json()["server"], "up");
        let started = Instant::now();
        loop {
            let (_, identity) = proxy.admin_get("/identity").await;
            if identity.contains(CHECKOUT) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no certificate: {identity}\n{}",
                proxy.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outriderctl_passes_an_unreachable_server_but_never_an_answer() {
    let up = Upstream::echo(Proto::Http1, "up").await;
    let (dirs_one, dirs_two) = (ControlDirs::new(), ControlDirs::new());
    // `orders.yaml` is a file of the first replica's policy directory, not of the second's.
    let orders = "workload: orders\nservices: {}\n";
    dirs_one.write("orders.yaml", orders);
    let (one, two) = (start_control(&dirs_one), start_control(&dirs_two));
    let dead = dead_url();

    // The environment twin with a comma list: status and apply reach the live one.
    let urls = format!("{dead},{}", one.url());
    let out = tokio::task::spawn_blocking({
        let urls = urls.clone();
        move || ctl(&urls, Some(CONTROL_TOKEN), &["status"])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach {dead}")), "{stderr}");
    let version = applied_version(&apply(urls, "checkout.yaml", route(up.addr)).await);
    assert_eq!(one.status().await["version"], version);

    // The flag repeated works the same.
    let out = tokio::task::spawn_blocking({
        let (dead, live) = (dead.clone(), one.url());
        move || {
            ctl(
                "",
                Some(CONTROL_TOKEN),
                &["history", "--server", &dead, "--server", &live],
            )
        }
    })
    .await;
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A refusal is the answer: a document the first replica refuses (it comes from its
    // policy directory) is not sent to the second, which would take it.
    let before = two.status().await["version"].clone();
    let out = apply(
        format!("{},{}", one.url(), two.url()),
        "orders.yaml",
        orders.into(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("comes from the policy directory"),
        "{stderr}"
    );
    assert_eq!(two.status().await["version"], before);
    // ...as it does when asked alone.
    let out = apply(two.url(), "orders.yaml", orders.into()).await;
    assert!(applied_version(&out) > before.as_u64().unwrap());
}
